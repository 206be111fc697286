"""What a server costs while it works: CPU, context switches and memory of its processes, from /proc (Linux).

Contract:
- `Meter(root_pid)` watches a server: the root process (mailflow's one process; Postfix's master) and all its
  descendants (Postfix's smtpd, cleanup, qmgr, trivial-rewrite, smtp... found through
  /proc/PID/task/TID/children), every thread of each.
- `meter.start()` takes the opening reading and starts a sampler thread (every `interval`, 0.2 s) that notes each
  task's context switches and the server's memory; `meter.stop()` takes the closing reading, ends the thread
  and returns a `Usage`: the deltas between the two readings.
    cpu_s     user+system CPU seconds: of the live processes, plus what the root has collected from children
              that exited and were reaped meanwhile (cutime+cstime: Postfix's master reaps its daemons), so a
              daemon that ends in the middle of a run (Postfix's max_use) is counted whole;
    vcs, ivcs voluntary / involuntary context switches, summed over every task; a task that ended meanwhile
              counts up to its last sample (the kernel keeps no per-process total after the exit);
    rss_mb    the largest sum of VmRSS over the processes seen by a sample (shared pages counted once per
              process that maps them, so a many-process server looks bigger than it is);
    pss_mb    the same with Pss (smaps_rollup: shared pages split between the processes that map them), the
              fair figure for comparing one process with many;
    steal_ticks, all_ticks  the whole machine's (/proc/stat's `cpu` line, every CPU): ticks the hypervisor gave to
              another guest while this one wanted to run (steal), and all ticks, over the same window. A cell run
              with more than a few per cent stolen was not measured on a quiet machine, whatever else ran.
- Best effort: a process or task that vanishes between listing and reading is skipped; a Meter whose root is
  gone reads nothing (all zeros) rather than raising. No error from here may fail a run.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Usage:
    cpu_s: float = 0.0
    vcs: int = 0
    ivcs: int = 0
    rss_mb: float = 0.0
    pss_mb: float = 0.0
    steal_ticks: int = 0
    all_ticks: int = 0

    def add(self, other: "Usage") -> "Usage":
        """Two runs' usage together (memory: the larger peak)."""
        return Usage(self.cpu_s + other.cpu_s, self.vcs + other.vcs, self.ivcs + other.ivcs,
                     max(self.rss_mb, other.rss_mb), max(self.pss_mb, other.pss_mb),
                     self.steal_ticks + other.steal_ticks, self.all_ticks + other.all_ticks)

    @property
    def steal_pct(self) -> float | None:
        """Per cent of the machine's CPU time the hypervisor stole over the window; None if unknown."""
        return 100.0 * self.steal_ticks / self.all_ticks if self.all_ticks else None


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def machine_ticks() -> tuple[int, int]:
    """(steal, all) ticks of every CPU since boot, from /proc/stat's `cpu` line; (0, 0) if unreadable."""
    first = _read("/proc/stat").split("\n", 1)[0].split()
    if len(first) < 9 or first[0] != "cpu":
        return 0, 0
    ticks = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal (guest is within user)
    return ticks[7], sum(ticks)


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (field 3, `state`, is index 0)."""
    text = _read(f"/proc/{pid}/stat")
    return text.rsplit(")", 1)[1].split() if text else []


def _status_value(text: str, key: str) -> int:
    for line in text.splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def _tasks(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def tree(root: int) -> list[int]:
    """`root` and its descendants, as far as /proc shows them now."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if not os.path.exists(f"/proc/{pid}"):
            continue
        found.append(pid)
        for tid in _tasks(pid):
            todo.extend(int(c) for c in _read(f"/proc/{pid}/task/{tid}/children").split())
    return found


class Meter:
    """See the module docstring."""

    def __init__(self, root_pid: int, interval: float = 0.2) -> None:
        self.root = root_pid
        self.interval = interval
        self._switches: dict[tuple[int, str, str], tuple[int, int]] = {}  # (pid, start time, tid) -> last seen
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._opening: tuple[float, int, int] = (0.0, 0, 0)
        self._machine_opening: tuple[int, int] = (0, 0)
        self._rss = self._pss = 0.0

    def _cpu_ticks(self, pids: list[int]) -> int:
        ticks = 0
        for pid in pids:
            fields = _stat_fields(pid)
            if len(fields) > 14:
                ticks += int(fields[11]) + int(fields[12])  # utime, stime (all its threads)
                if pid == self.root:
                    ticks += int(fields[13]) + int(fields[14])  # cutime, cstime: children reaped
        return ticks

    def _sample(self) -> list[int]:
        """Note every task's context switches and the memory of the processes now; returns the pids."""
        pids = tree(self.root)
        rss = pss = 0
        for pid in pids:
            fields = _stat_fields(pid)
            started = fields[19] if len(fields) > 19 else ""
            for tid in _tasks(pid):
                status = _read(f"/proc/{pid}/task/{tid}/status")
                if status:
                    seen = (_status_value(status, "voluntary_ctxt_switches"),
                            _status_value(status, "nonvoluntary_ctxt_switches"))
                    with self._lock:
                        self._switches[(pid, started, tid)] = seen
            rss += _status_value(_read(f"/proc/{pid}/status"), "VmRSS:")
            pss += _status_value(_read(f"/proc/{pid}/smaps_rollup"), "Pss:")
        with self._lock:
            self._rss = max(self._rss, rss / 1024)
            self._pss = max(self._pss, pss / 1024)
        return pids

    def _switch_totals(self) -> tuple[int, int]:
        with self._lock:
            return sum(v for v, _ in self._switches.values()), sum(i for _, i in self._switches.values())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> None:
        self._rss = self._pss = 0.0
        pids = self._sample()
        self._opening = (self._cpu_ticks(pids) / TICKS, *self._switch_totals())
        self._machine_opening = machine_ticks()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="procstat", daemon=True)
        self._thread.start()

    def stop(self) -> Usage:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        pids = self._sample()
        cpu, vcs, ivcs = self._cpu_ticks(pids) / TICKS, *self._switch_totals()
        steal, every = machine_ticks()
        cpu0, vcs0, ivcs0 = self._opening
        steal0, every0 = self._machine_opening
        return Usage(round(cpu - cpu0, 3), vcs - vcs0, ivcs - ivcs0, round(self._rss, 1), round(self._pss, 1),
                     steal - steal0, every - every0)
