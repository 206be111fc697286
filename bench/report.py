"""Presenting results: one table per server, a ratio table, the JSON file and the final ratio line.

Contract:
- `server_table(name, results)` -> text: per cell accept msg/s and e2e msg/s (medians), the individual
  runs, and any failure/skip/extra-delivery notes.
- `ratio_table(mailflow, postfix)` -> text: per cell mailflow ÷ Postfix for accept and e2e.
- `headline_ratio(mailflow, postfix, cell)` -> "R.RR" or "n/a" (missing server, cell or median).
- `write_json(dir, payload)` -> path of bench-results/bench-YYYYmmdd-HHMMSS.json.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from measure import Cell, CellResult


def fmt_rate(value: float | None) -> str:
    return f"{value:.0f}" if value else "-"


def fmt_ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "n/a"


def cell_notes(result: CellResult) -> str:
    notes = [f"run {i + 1}: {r.why}" for i, r in enumerate(result.runs) if not r.ok]
    notes += [f"run {i + 1}: {r.extra} extra deliveries ({r.duplicates} dup)" for i, r in enumerate(result.runs)
              if r.ok and (r.extra or r.duplicates)]
    if result.skipped:
        notes.append(f"skipped: {result.note}")
    return "; ".join(notes)


def server_table(name: str, results: list[CellResult]) -> str:
    lines = [f"{name}: messages/s (median of runs; accept = until the load generator exits, e2e = until the sink has all)",
             f"{'size':>7} {'sessions':>8} | {'accept/s':>8} {'e2e/s':>7} | runs accept / e2e",
             "-" * 72]
    for r in results:
        acc = [round(x.accept_rate) for x in r.runs if x.accept_rate]
        e2e = [round(x.e2e_rate) for x in r.runs if x.e2e_rate]
        lines.append(f"{r.cell.size:>7} {r.cell.sessions:>8} | {fmt_rate(r.accept_med):>8} {fmt_rate(r.e2e_med):>7} | "
                     f"{acc} / {e2e}")
        if notes := cell_notes(r):
            lines.append(f"{'':>17}! {notes}")
    return "\n".join(lines)


def by_cell(results: list[CellResult]) -> dict[Cell, CellResult]:
    return {r.cell: r for r in results}


def ratio_table(mailflow: list[CellResult], postfix: list[CellResult]) -> str:
    pf = by_cell(postfix)
    lines = ["mailflow ÷ Postfix (same load, same run; > 1 means mailflow is faster)",
             f"{'size':>7} {'sessions':>8} | {'accept':>7} {'e2e':>7}", "-" * 36]
    for r in mailflow:
        p = pf.get(r.cell)
        lines.append(f"{r.cell.size:>7} {r.cell.sessions:>8} | "
                     f"{fmt_ratio(r.accept_med, p and p.accept_med):>7} {fmt_ratio(r.e2e_med, p and p.e2e_med):>7}")
    return "\n".join(lines)


def headline_ratio(mailflow: list[CellResult] | None, postfix: list[CellResult] | None, cell: Cell) -> str:
    if not mailflow or not postfix:
        return "n/a"
    m, p = by_cell(mailflow).get(cell), by_cell(postfix).get(cell)
    return fmt_ratio(m and m.e2e_med, p and p.e2e_med)


def write_json(directory: Path, payload: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / time.strftime("bench-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps(payload, indent=1))
    return path
