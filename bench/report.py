"""Presenting results: one table per server, a ratio table, the JSON file and the final ratio lines.

Contract:
- `server_table(name, results)` -> text: per cell accept msg/s and e2e msg/s (medians), the server's CPU ms,
  voluntary and involuntary context switches per message and its peak memory (RSS and PSS MB; procstat.py),
  the machine's steal over the cell's runs, the individual runs, and any failure/skip/extra-delivery notes.
- `most_stolen(*results)` -> the largest steal % of any cell (None when no cell knows it); `steal_note(pct)` -> a
  line saying the sitting was not on a quiet machine when more than QUIET_STEAL_PCT was stolen, else "".
- `ratio_table(mailflow, postfix)` -> text: for every cell either server has, mailflow ÷ Postfix for accept and
  e2e (> 1: mailflow faster) and for CPU per message (< 1: mailflow cheaper); n/a where a side has no figure.
- `headline_ratio(mailflow, postfix, cell)` -> "R.RR" or "n/a" (missing server, cell or median).
- `worst_ratio(mailflow, postfix)` -> (cell key, "R.RR"): the lowest e2e ratio over every cell; ("", "n/a")
  when a server is missing or any cell has no ratio (a cell without figures could be the worst one).
- `write_json(dir, payload)` -> path of bench-results/bench-YYYYmmdd-HHMMSS.json.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from measure import Cell, CellResult

QUIET_STEAL_PCT = 5.0  # above this much of the machine's CPU taken by the hypervisor, a sitting is not quiet


def fmt_rate(value: float | None) -> str:
    return f"{value:.0f}" if value else "-"


def fmt_ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "n/a"


def fmt_figure(value: float | None, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if value is not None else "-"


def cell_notes(result: CellResult) -> str:
    notes = [f"run {i + 1}: {r.why}" for i, r in enumerate(result.runs) if not r.ok]
    notes += [f"run {i + 1}: {r.extra} extra deliveries ({r.duplicates} dup)" for i, r in enumerate(result.runs)
              if r.ok and (r.extra or r.duplicates)]
    if result.skipped:
        notes.append(f"skipped: {result.note}")
    return "; ".join(notes)


def server_table(name: str, results: list[CellResult]) -> str:
    lines = [f"{name}: messages/s (median of runs; accept = until the load generator exits, e2e = until the sink has "
             f"all); server CPU ms, voluntary/involuntary context switches per message and peak memory over the "
             f"cell's runs; steal: the machine's CPU time the hypervisor took over those runs",
             f"{'size':>7} {'sessions':>8} | {'accept/s':>8} {'e2e/s':>7} | {'cpu ms':>6} {'vcs':>6} {'ivcs':>6} "
             f"{'RSS MB':>7} {'PSS MB':>7} {'steal %':>7} | runs accept / e2e",
             "-" * 118]
    for r in results:
        acc = [round(x.accept_rate) for x in r.runs if x.accept_rate]
        e2e = [round(x.e2e_rate) for x in r.runs if x.e2e_rate]
        usage = r.usage
        lines.append(f"{r.cell.size:>7} {r.cell.sessions:>8} | {fmt_rate(r.accept_med):>8} {fmt_rate(r.e2e_med):>7} | "
                     f"{fmt_figure(r.cpu_ms):>6} {fmt_figure(r.per_message('vcs'), 1):>6} "
                     f"{fmt_figure(r.per_message('ivcs'), 1):>6} {fmt_figure(usage and usage.rss_mb, 0):>7} "
                     f"{fmt_figure(usage and usage.pss_mb, 0):>7} {fmt_figure(usage and usage.steal_pct, 0):>7} | "
                     f"{acc} / {e2e}")
        if notes := cell_notes(r):
            lines.append(f"{'':>17}! {notes}")
    return "\n".join(lines)


def by_cell(results: list[CellResult]) -> dict[Cell, CellResult]:
    return {r.cell: r for r in results}


def all_cells(mailflow: list[CellResult], postfix: list[CellResult]) -> list[Cell]:
    """Every cell either server has, in the order measured."""
    return list(dict.fromkeys([r.cell for r in mailflow] + [r.cell for r in postfix]))


def ratio_table(mailflow: list[CellResult], postfix: list[CellResult]) -> str:
    mf, pf = by_cell(mailflow), by_cell(postfix)
    lines = ["mailflow ÷ Postfix (same load, same run; accept and e2e > 1: mailflow is faster; "
             "cpu < 1: mailflow uses less CPU per message)",
             f"{'size':>7} {'sessions':>8} | {'accept':>7} {'e2e':>7} | {'cpu':>7}", "-" * 46]
    for cell in all_cells(mailflow, postfix):
        m, p = mf.get(cell), pf.get(cell)
        lines.append(f"{cell.size:>7} {cell.sessions:>8} | {fmt_ratio(m and m.accept_med, p and p.accept_med):>7} "
                     f"{fmt_ratio(m and m.e2e_med, p and p.e2e_med):>7} | "
                     f"{fmt_ratio(m and m.cpu_ms, p and p.cpu_ms):>7}")
    return "\n".join(lines)


def headline_ratio(mailflow: list[CellResult] | None, postfix: list[CellResult] | None, cell: Cell) -> str:
    if not mailflow or not postfix:
        return "n/a"
    m, p = by_cell(mailflow).get(cell), by_cell(postfix).get(cell)
    return fmt_ratio(m and m.e2e_med, p and p.e2e_med)


def worst_ratio(mailflow: list[CellResult] | None, postfix: list[CellResult] | None) -> tuple[str, str]:
    if not mailflow or not postfix:
        return "", "n/a"
    mf, pf = by_cell(mailflow), by_cell(postfix)
    ratios = []
    for cell in all_cells(mailflow, postfix):
        m, p = mf.get(cell), pf.get(cell)
        if not (m and p and m.e2e_med and p.e2e_med):
            return "", "n/a"
        ratios.append((m.e2e_med / p.e2e_med, cell.key))
    if not ratios:
        return "", "n/a"
    ratio, key = min(ratios)
    return key, f"{ratio:.2f}"


def most_stolen(*results: list[CellResult] | None) -> float | None:
    stolen = [usage.steal_pct for res in results for r in res or []
              if (usage := r.usage) is not None and usage.steal_pct is not None]
    return max(stolen) if stolen else None


def steal_note(pct: float | None) -> str:
    if pct is None or pct <= QUIET_STEAL_PCT:
        return ""
    return (f"NOTE: the hypervisor took up to {pct:.0f} % of the machine's CPU during a cell's runs (steal, "
            f"/proc/stat): not a quiet machine; both servers ran under it, but the figures do not compare with a "
            f"quiet sitting's")


def write_json(directory: Path, payload: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / time.strftime("bench-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps(payload, indent=1))
    return path
