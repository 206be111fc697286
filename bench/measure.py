"""Measuring the servers: warm-up, then every cell (size x sessions) RUNS times, interleaved, medians per cell.

Contract:
- `one_run(...)` starts a fresh sink, drives N messages over C sessions at the server, and returns a `Run`:
  accept_rate = N / seconds until the load generator exited (every message got 250 after DATA);
  e2e_rate    = N / seconds until the sink had received N messages and the load generator had exited (both
                clocks start at the load's start, so e2e <= accept).
  After the N-th arrival the sink stays up for `drain` seconds; anything more that arrives is `extra`
  (late or duplicate deliveries; should be 0). A failed run says why and how many messages got through.
- `measure_all(servers, ...)` warms each (already started) server up with `warmup` messages (2 KB, 10
  sessions), then for each cell does run 1 on every server, run 2 on every server (order rotated), ... so
  that a change in the machine's load hits both sides alike. Every run is bounded by min(run_timeout, what is
  left of the overall deadline); runs that no longer fit are recorded as skipped. After a failed run the
  server is reset (empty queue) so left-overs cannot reach the next run's sink; a server that cannot be
  reset or warmed up is dropped and its remaining cells are recorded as skipped with the reason.
- Each measured run is metered (procstat.Meter on the server's processes, from just before the load starts to
  the end of the drain window): the server's CPU seconds, context switches and peak memory during the run.
  A cell's figures per message are the sums over its successful runs divided by their messages (the delta over
  the cell, the other server's runs excluded), its peak memory the largest of its runs', its steal the machine's
  (procstat: CPU time the hypervisor gave away) over those runs' windows.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

from procstat import Meter, Usage
from smtp_tools import Sink, Tools, run_source


@dataclass(frozen=True)
class Cell:
    size: int
    sessions: int

    @property
    def key(self) -> str:
        return f"{self.size // 1000}KBx{self.sessions}" if self.size >= 1000 else f"{self.size}Bx{self.sessions}"


@dataclass
class Run:
    ok: bool
    count: int
    accept_s: float | None = None
    e2e_s: float | None = None
    delivered: int = 0
    extra: int = 0
    duplicates: int = 0
    why: str = ""
    usage: Usage | None = None  # the server's, during the run (procstat)

    @property
    def accept_rate(self) -> float | None:
        return self.count / self.accept_s if self.accept_s else None

    @property
    def e2e_rate(self) -> float | None:
        return self.count / self.e2e_s if self.ok and self.e2e_s else None


@dataclass
class CellResult:
    cell: Cell
    runs: list[Run] = field(default_factory=list)
    skipped: bool = False
    note: str = ""

    def median(self, attr: str) -> float | None:
        values = [v for r in self.runs if (v := getattr(r, attr))]  # accept counts even if e2e then failed
        return statistics.median(values) if values else None

    @property
    def accept_med(self) -> float | None:
        return self.median("accept_rate")

    @property
    def e2e_med(self) -> float | None:
        return self.median("e2e_rate")

    @property
    def usage(self) -> Usage | None:
        """The server's usage summed over the successful runs (memory: the largest peak); None without one."""
        metered = [r.usage for r in self.runs if r.ok and r.usage is not None]
        if not metered:
            return None
        total = Usage()
        for usage in metered:
            total = total.add(usage)
        return total

    @property
    def metered_messages(self) -> int:
        return sum(r.count for r in self.runs if r.ok and r.usage is not None)

    def per_message(self, attr: str, scale: float = 1.0) -> float | None:
        """A usage figure (cpu_s, vcs, ivcs) per message over the cell's successful runs, times `scale`."""
        usage, count = self.usage, self.metered_messages
        return getattr(usage, attr) * scale / count if usage is not None and count else None

    @property
    def cpu_ms(self) -> float | None:
        """Server CPU milliseconds per message."""
        return self.per_message("cpu_s", 1000.0)

    def to_json(self) -> dict:
        usage = self.usage
        return {"size": self.cell.size, "sessions": self.cell.sessions, "skipped": self.skipped, "note": self.note,
                "accept_med": self.accept_med, "e2e_med": self.e2e_med,
                "cpu_ms_per_msg": self.cpu_ms, "vcs_per_msg": self.per_message("vcs"),
                "ivcs_per_msg": self.per_message("ivcs"),
                "peak_rss_mb": usage and usage.rss_mb, "peak_pss_mb": usage and usage.pss_mb,
                "steal_pct": usage and usage.steal_pct,
                "runs": [dict(asdict(r), accept_rate=r.accept_rate, e2e_rate=r.e2e_rate) for r in self.runs]}


@dataclass
class Settings:
    count: int
    runs: int
    warmup: int
    run_timeout: float
    drain: float
    deadline: float  # time.monotonic() after which no new run starts


def time_left(settings: Settings) -> float:
    return settings.deadline - time.monotonic()


def one_run(tools: Tools, port: int, sink_port: int, cell: Cell, count: int, timeout: float, drain: float,
            meter: Meter | None = None) -> Run:
    """One measured load through a fresh sink; see the module contract. `meter`: the server's, read from just
    before the load to the end of the drain window (the run's `usage`)."""
    sink = Sink.start(tools, sink_port)
    if meter is not None:
        meter.start()
    try:
        run = _load(tools, port, sink, cell, count, timeout, drain)
    finally:
        usage = meter.stop() if meter is not None else None
        sink.stop()
    run.usage = usage
    return run


def _load(tools: Tools, port: int, sink: Sink, cell: Cell, count: int, timeout: float, drain: float) -> Run:
    t0 = time.perf_counter()
    ok, accept_s, why = run_source(tools, port, cell.sessions, cell.size, count, timeout)
    if not ok:
        return Run(False, count, delivered=sink.count, why=why)
    arrived = sink.wait_for(count, timeout - (time.perf_counter() - t0))
    if arrived is None:
        return Run(False, count, accept_s=accept_s, delivered=sink.count,
                   why=f"only {sink.count}/{count} delivered within {timeout:.0f} s")
    time.sleep(drain)
    return Run(True, count, accept_s, max(arrived - t0, accept_s), delivered=count,
               extra=max(0, sink.count - count), duplicates=sink.duplicates)


def warm_up(server, tools: Tools, settings: Settings, log) -> None:
    """Send `warmup` messages (2 KB, 10 sessions) through the relay path; raises RuntimeError on failure."""
    if settings.warmup <= 0:
        return
    run = one_run(tools, server.port, server.sink_port, Cell(2000, 10), settings.warmup,
                  min(settings.run_timeout, max(5.0, time_left(settings))), settings.drain)
    if not run.ok:
        raise RuntimeError(f"warm-up failed: {run.why}")
    log(f"  {server.name} warm-up: {settings.warmup} msgs, accept {run.accept_rate:.0f}/s, e2e {run.e2e_rate:.0f}/s")


def describe_run(name: str, cell: Cell, index: int, run: Run) -> str:
    where = f"  {cell.key:<9} run {index + 1} {name:<8}"
    if not run.ok:
        return f"{where}: FAILED: {run.why}"
    extra = f", {run.extra} extra deliveries ({run.duplicates} duplicates)" if run.extra or run.duplicates else ""
    cpu = f", server CPU {run.usage.cpu_s * 1000 / run.count:.2f} ms/msg" if run.usage is not None else ""
    if run.usage is not None and run.usage.steal_pct is not None:
        cpu += f", steal {run.usage.steal_pct:.0f} %"
    return (f"{where}: accept {run.accept_rate:5.0f}/s ({run.accept_s:.2f} s), "
            f"e2e {run.e2e_rate:5.0f}/s ({run.e2e_s:.2f} s){cpu}{extra}")


@dataclass
class Contender:
    """A started server, its results per cell, and why it was dropped (empty while still measured)."""

    server: object
    results: dict[Cell, CellResult] = field(default_factory=dict)
    dropped: str = ""

    @property
    def name(self) -> str:
        return self.server.name

    def result(self, cell: Cell) -> CellResult:
        return self.results.setdefault(cell, CellResult(cell))


def measure_one(c: Contender, tools: Tools, cell: Cell, index: int, settings: Settings, log) -> None:
    """Run number `index` of `cell` on one server; resets the server after a failure."""
    result = c.result(cell)
    budget = min(settings.run_timeout, time_left(settings))
    if budget < 5:
        result.skipped, result.note = True, "overall time budget (BUDGET) used up"
        return
    try:
        run = one_run(tools, c.server.port, c.server.sink_port, cell, settings.count, budget, settings.drain,
                      Meter(c.server.pid()))
    except RuntimeError as e:  # the sink would not start
        run = Run(False, settings.count, why=str(e))
    result.runs.append(run)
    if c.server.crashed():
        run.why += " (server process exited)"
    log(describe_run(c.name, cell, index, run))
    if not run.ok or c.server.crashed():
        log(f"  {c.name}: resetting (fresh queue) after the failed run")
        try:
            c.server.reset()
        except RuntimeError as e:
            c.dropped = f"could not be restarted: {str(e).splitlines()[0]}"
            log(f"  {c.name}: dropped: {e}")


def measure_all(servers: list, tools: Tools, cells: list[Cell], settings: Settings, log) -> dict[str, list[CellResult]]:
    """Warm-up, then cells with interleaved runs; {server name: [CellResult per cell, in order]}."""
    contenders = [Contender(s) for s in servers]
    for c in contenders:
        try:
            warm_up(c.server, tools, settings, log)
        except RuntimeError as e:
            c.dropped = str(e).splitlines()[0]
            log(f"  {c.name}: dropped: {e}")
    for cell in cells:
        for index in range(settings.runs):
            live = [c for c in contenders if not c.dropped]
            shift = index % max(1, len(live))
            for c in live[shift:] + live[:shift]:
                if not c.dropped:
                    measure_one(c, tools, cell, index, settings, log)
    return {c.name: finish(c, cells) for c in contenders}


def finish(c: Contender, cells: list[Cell]) -> list[CellResult]:
    """Results in cell order; a cell with fewer runs than asked because the server was dropped says so."""
    out = []
    for cell in cells:
        result = c.result(cell)
        if c.dropped and not result.runs:
            result.skipped, result.note = True, f"{c.name} {c.dropped}"
        out.append(result)
    return out
