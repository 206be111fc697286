#!/usr/bin/env python3
"""`make bench`: the same SMTP load through mailflow and through a throwaway Postfix relay, in one run.

Contract:
- Starts Postfix and mailflow (SERVERS drops one), each relaying all mail to its own sink port on 127.0.0.1;
  warms them up; measures every cell (SIZES x SESSIONS) RUNS times with COUNT messages, the runs of the two
  servers interleaved: accept msg/s (until the load generator exits) and end-to-end msg/s (until the sink has
  all), medians per cell; and, from /proc over each run (bench/procstat.py), the server's CPU ms, voluntary
  and involuntary context switches per message and its peak memory (all its processes: Postfix's master and
  every daemon under it).
- Prints progress, a table per server, the mailflow ÷ Postfix ratio table (every cell), the JSON path
  (bench-results/), then `e2e_ratio_vs_postfix=R` (mailflow e2e ÷ Postfix e2e, 2 KB x 10 sessions, 2
  decimals), the worst cell's name, and as the very LAST line `e2e_ratio_vs_postfix_min=R`: the lowest e2e
  ratio of all cells. Either is `n/a` when a side has no figure (e.g. Postfix not installed, a cell failed).
- PINNED=1 (`make bench-pinned`): each server runs on CPU SERVER_CPU only (`taskset -c`, inherited by every
  process it starts), the harness, load generator and sinks on TOOLS_CPU: the cost per message without the
  use of a second core by a server's other processes or threads.
- Without smtp-source/smtp-sink it uses the built-in loadgen.py/capture_sink.py and measures mailflow only.
- Bounded: each run <= RUN_TIMEOUT s, no new run after BUDGET s; servers are stopped and the temp dir removed
  on every exit path (including Ctrl-C and SIGTERM). Only 127.0.0.1, ports 2500-2599.
- Exit status 0 when every requested and available server was measured without a failed run, extra delivery
  or left-over queued message; 1 otherwise; 2 for bad settings; 130 on interrupt. The last line is printed
  in every case.

Environment (defaults): COUNT=1000 RUNS=3 SESSIONS=1,10,50 SIZES=2000,100000 WARMUP=100 SERVERS=postfix,mailflow
RUN_TIMEOUT=60 BUDGET=420 DRAIN=1 TOOLS=auto|builtin RESULTS_DIR=bench-results KEEP_TMP=0 MAILFLOW_CMD=(auto)
PINNED=0 SERVER_CPU=0 TOOLS_CPU=1
"""
from __future__ import annotations

import os
import platform
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import Cell, CellResult, Settings, measure_all  # noqa: E402
from report import (headline_ratio, most_stolen, ratio_table, server_table, steal_note, worst_ratio,  # noqa: E402
                    write_json)
from servers import MailflowServer, PostfixServer, ServerError, mailflow_command  # noqa: E402
from smtp_tools import Tools  # noqa: E402

HEADLINE_CELL = Cell(2000, 10)
PORT_RANGE = range(2500, 2600)


@dataclass(frozen=True)
class Options:
    count: int
    runs: int
    sessions: list[int]
    sizes: list[int]
    warmup: int
    servers: list[str]
    run_timeout: float
    budget: float
    drain: float
    tools: str
    results_dir: Path
    keep_tmp: bool
    pinned: bool = False
    server_cpu: int = 0
    tools_cpu: int = 1

    @classmethod
    def from_env(cls, env=os.environ) -> "Options":
        ints = lambda key, default: [int(x) for x in env.get(key, default).split(",") if x.strip()]
        servers = [s.strip() for s in env.get("SERVERS", "postfix,mailflow").split(",") if s.strip()]
        unknown = set(servers) - {"postfix", "mailflow"}
        if unknown:
            raise SystemExit(f"SERVERS: unknown {sorted(unknown)} (use postfix,mailflow)")
        try:
            return cls(count=int(env.get("COUNT", 1000)), runs=int(env.get("RUNS", 3)),
                       sessions=ints("SESSIONS", "1,10,50"), sizes=ints("SIZES", "2000,100000"),
                       warmup=int(env.get("WARMUP", 100)), servers=servers,
                       run_timeout=float(env.get("RUN_TIMEOUT", 60)), budget=float(env.get("BUDGET", 420)),
                       drain=float(env.get("DRAIN", 1)), tools=env.get("TOOLS", "auto"),
                       results_dir=Path(env.get("RESULTS_DIR", "bench-results")), keep_tmp=env.get("KEEP_TMP") == "1",
                       pinned=env.get("PINNED", "0") == "1", server_cpu=int(env.get("SERVER_CPU", 0)),
                       tools_cpu=int(env.get("TOOLS_CPU", 1)))
        except ValueError as e:
            raise SystemExit(f"bad setting in the environment: {e}") from None

    def check_pinning(self) -> None:
        """PINNED=1 needs taskset and two distinct CPUs this process may use."""
        if not self.pinned:
            return
        usable = os.sched_getaffinity(0)
        if self.server_cpu == self.tools_cpu or not {self.server_cpu, self.tools_cpu} <= usable:
            raise SystemExit(f"PINNED=1: SERVER_CPU={self.server_cpu} and TOOLS_CPU={self.tools_cpu} must be two "
                             f"different CPUs among {sorted(usable)}")
        if not shutil.which("taskset"):
            raise SystemExit("PINNED=1 needs taskset (util-linux)")

    @property
    def server_cpus(self) -> str | None:
        """The CPU list for the servers' taskset, None when not pinned."""
        return str(self.server_cpu) if self.pinned else None

    def cells(self) -> list[Cell]:
        return [Cell(size, sessions) for size in self.sizes for sessions in self.sessions]


def log(text: str) -> None:
    print(text, flush=True)


def free_ports(n: int) -> list[int]:
    """n ports in 2500-2599 that nothing on 127.0.0.1 listens on right now."""
    found = []
    for port in PORT_RANGE:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT left-overs do not block a listener
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == n:
            return found
    raise SystemExit("no free ports in 127.0.0.1:2500-2599")


def interrupt_on_signals() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt (also when SIGINT was inherited as ignored), so cleanup runs."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def postfix_usable(tools: Tools) -> tuple[bool, str]:
    if not tools.postfix_tools:
        return False, "smtp-source/smtp-sink are not installed (or TOOLS=builtin)"
    return PostfixServer.available()


def cpu_model() -> str:
    """The CPU's model name as lscpu shows it (from /proc/cpuinfo), or "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine() -> dict:
    return {"host": platform.node(), "cpus": os.cpu_count(), "cpu_model": cpu_model(),
            "python": platform.python_version(), "platform": platform.platform()}


def summarize_log(path: Path) -> list[str]:
    """mailflow's own output (level=warning): distinct lines, most frequent first, at most 10."""
    try:
        text = path.read_text(errors="replace")
        lines = [l for l in text.splitlines() if l.strip() and not l.startswith("--- bench:")]
    except OSError:
        return []
    counts: dict[str, int] = {}
    for line in lines:
        counts[line[:200]] = counts.get(line[:200], 0) + 1
    return [f"{n}x {text}" for text, n in sorted(counts.items(), key=lambda kv: -kv[1])[:10]]


class Bench:
    """One `make bench` sitting: the servers, their results, and the cleanup."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.tools = Tools.detect(opts.tools)
        self.mailflow_port, self.mailflow_sink, self.postfix_port, self.postfix_sink = free_ports(4)
        self.tmp = Path(tempfile.mkdtemp(prefix="mailflow-bench-"))
        os.chmod(self.tmp, 0o755)  # Postfix's daemons (user postfix) must traverse it
        self.started: list = []
        self.results: dict[str, list[CellResult]] = {}
        self.states: dict[str, dict] = {}
        self.problems: list[str] = []
        self.mailflow_log: list[str] = []
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.cleaned = False

    def make_server(self, name: str):
        cpus = self.opts.server_cpus
        if name == "mailflow":
            return MailflowServer(self.tmp / "mailflow", self.mailflow_port, self.mailflow_sink, cpus)
        return PostfixServer(self.tmp / "postfix", self.postfix_port, self.postfix_sink, cpus)

    def start_server(self, name: str):
        """The started server, or None (the reason goes to problems)."""
        server = self.make_server(name)
        self.started.append(server)
        try:
            server.start()
        except ServerError as e:
            self.problems.append(f"{name} did not start: {e}")
            log(f"{name} did not start: {e}")
            return None
        log(f"{name} on 127.0.0.1:{server.port}, relaying to its sink on 127.0.0.1:{server.sink_port}")
        return server

    def note_problems(self) -> None:
        for name, results in self.results.items():
            failed = sum(1 for r in results for run in r.runs if not run.ok)
            skipped = sum(1 for r in results if r.skipped)
            extra = sum(run.extra for r in results for run in r.runs)
            if failed or skipped:
                self.problems.append(f"{name}: {failed} failed runs, {skipped} cells skipped or incomplete")
            if extra:
                self.problems.append(f"{name}: {extra} extra deliveries (duplicates or strays) in the drain windows")

    def run(self) -> None:
        o = self.opts
        log(f"mailflow bench: COUNT={o.count} RUNS={o.runs} SIZES={o.sizes} SESSIONS={o.sessions} WARMUP={o.warmup} "
            f"RUN_TIMEOUT={o.run_timeout:.0f}s BUDGET={o.budget:.0f}s; tools: {self.tools.describe()}; "
            f"{os.cpu_count()} CPUs ({cpu_model()})")
        if o.pinned:  # the load generator and the sinks inherit this process's CPU
            os.sched_setaffinity(0, {o.tools_cpu})
            log(f"pinned: each server on CPU {o.server_cpu} only; harness, load generator and sinks on CPU "
                f"{o.tools_cpu}")
        usable, why = postfix_usable(self.tools)
        if "postfix" in o.servers and not usable:
            log(f"Postfix not measured: {why}")
        names = [n for n in o.servers if n != "postfix" or usable]
        servers = [s for s in map(self.start_server, names) if s is not None]
        settings = Settings(o.count, o.runs, o.warmup, o.run_timeout, o.drain, time.monotonic() + o.budget)
        self.states = {s.name: {"at_start": s.state()} for s in servers}
        try:
            self.results = measure_all(servers, self.tools, o.cells(), settings, log)
            for server in servers:
                self.record_final_state(server)
        finally:
            for server in servers:
                server.stop()
        self.note_problems()

    def record_final_state(self, server) -> None:
        """After the last run (and its drain window): what is still queued, memory and CPU used."""
        start, end = self.states[server.name]["at_start"], server.state()
        self.states[server.name]["at_end"] = end
        usage = ""
        if "rss_mb" in end:
            usage = f"RSS {start.get('rss_mb', '?')} -> {end['rss_mb']} MB, CPU {end.get('cpu_s', '?')} s; "
        log(f"  {server.name} after the load: {usage}still queued: {end.get('queued') or 'nothing'}")
        if end.get("queued"):
            self.problems.append(f"{server.name}: messages still queued after the last run: {end['queued']}")

    def cleanup(self) -> None:
        """Stops every server started (idempotent), keeps mailflow's log in RESULTS_DIR, removes the temp dir."""
        if self.cleaned:
            return
        for server in reversed(self.started):
            server.stop()
        log_path = self.tmp / "mailflow" / "mailflow.log"
        self.mailflow_log = summarize_log(log_path)
        if self.mailflow_log:
            self.opts.results_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(log_path, self.opts.results_dir / f"bench-{self.stamp}-mailflow.log")
        if self.opts.keep_tmp:
            log(f"kept temp dir {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.cleaned = True

    def report(self) -> tuple[str, str, str]:
        """Prints the tables and writes the JSON; returns the headline ratio, the worst cell and its ratio."""
        mf, pf = self.results.get("mailflow"), self.results.get("postfix")
        for name, results in (("Postfix", pf), ("mailflow", mf)):
            if results:
                log("\n" + server_table(name, results))
        if mf and pf:
            log("\n" + ratio_table(mf, pf))
        if note := steal_note(most_stolen(mf, pf)):
            log(note)
        if self.mailflow_log:
            log(f"\nmailflow log (level=warning), most frequent lines (full log: "
                f"{self.opts.results_dir}/bench-{self.stamp}-mailflow.log):")
            for line in self.mailflow_log:
                log(f"  {line}")
        for problem in self.problems:
            log(f"PROBLEM: {problem.splitlines()[0]}")
        ratio = headline_ratio(mf, pf, HEADLINE_CELL)
        worst_cell, worst = worst_ratio(mf, pf)
        path = write_json(self.opts.results_dir, self.payload(ratio, worst_cell, worst))
        log(f"\nresults: {path}")
        return ratio, worst_cell, worst

    def payload(self, ratio: str, worst_cell: str, worst: str) -> dict:
        o = self.opts
        return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(), "tools": self.tools.describe(),
                "mailflow_command": mailflow_command(),
                "settings": {"count": o.count, "runs": o.runs, "sizes": o.sizes, "sessions": o.sessions,
                             "warmup": o.warmup, "run_timeout": o.run_timeout, "budget": o.budget, "drain": o.drain,
                             "pinned": {"server_cpu": o.server_cpu, "tools_cpu": o.tools_cpu} if o.pinned else None},
                "results": {name: {r.cell.key: r.to_json() for r in res} for name, res in self.results.items()},
                "e2e_ratio_vs_postfix": ratio, "headline_cell": HEADLINE_CELL.key,
                "e2e_ratio_vs_postfix_min": worst, "worst_cell": worst_cell,
                "steal_pct_max": most_stolen(*self.results.values()),
                "server_state": self.states, "problems": self.problems, "mailflow_log_top": self.mailflow_log}


def main() -> int:
    interrupt_on_signals()
    ratio, worst_cell, worst, status, bench = "n/a", "", "n/a", 1, None
    try:
        opts = Options.from_env()
        opts.check_pinning()
        bench = Bench(opts)
        bench.run()
        bench.cleanup()
        ratio, worst_cell, worst = bench.report()
        status = 1 if bench.problems else 0
    except KeyboardInterrupt:
        log("\ninterrupted: stopping servers and removing the temp dir")
        status = 130
    except SystemExit as e:  # bad settings or no free port
        log(f"bench: {e}")
        status = 2
    except Exception:  # a harness bug: still clean up and end with the contract's last line
        traceback.print_exc(file=sys.stdout)
        status = 1
    finally:
        if bench is not None:
            try:
                bench.cleanup()
            except KeyboardInterrupt:
                bench.cleanup()
    print(f"e2e_ratio_vs_postfix={ratio}", flush=True)
    if worst_cell:
        print(f"worst cell: {worst_cell}", flush=True)
    print(f"e2e_ratio_vs_postfix_min={worst}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
