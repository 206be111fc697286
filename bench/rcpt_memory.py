"""What one message of many recipients costs in memory: the process's peak RSS, and where it climbed.

    PYTHONPATH=. python bench/rcpt_memory.py LISTS [relay|local]     (one scenario a process: ru_maxrss is its peak)

LISTS RCPT to virtual alias lists of 1 000 members each (bench/stalls.py's fanout): `relay` members are relay.test
addresses sent to a closed 127.0.0.1 port (deferred), `local` ones unknown local users (bounced: one failure notice
of LISTS x 1 000 recipients). RSS is sampled every 20 ms; each new high by STEP_MB is printed with the mailflow
frames each thread was running then, so the phase that makes the peak (cleanup's expansion, the store insert, the
attempt's results, the notice) can be read off.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

import mailflow
from bench.stalls import fanout, header, run
from mailflow.config import DEFAULTS

STEP_MB = 10
PACKAGE = str(Path(mailflow.__file__).parent) + "/"  # (the package's own files: not the bench's, wherever it is)
MAX_LISTS = DEFAULTS.smtpd.recipient_limit  # one RCPT a list, in one transaction


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def where(own: int) -> str:
    """The innermost mailflow frames of each thread but `own` that runs mailflow's code."""
    found = []
    for ident, frame in sys._current_frames().items():
        ours = innermost_of_package(frame) if ident != own else []
        if ours:
            found.append(" <- ".join(ours))
    return " | ".join(found)


def innermost_of_package(frame: FrameType | None, count: int = 3) -> list[str]:
    """The `count` innermost frames of mailflow's package on a thread's stack, walked outward (no source is read:
    a traceback's lines would be loaded into linecache at each climb, the memory measured)."""
    ours: list[str] = []
    while frame is not None and len(ours) < count:
        code = frame.f_code
        if code.co_filename.startswith(PACKAGE):
            ours.append(f"{code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno} {code.co_name}")
        frame = frame.f_back
    return ours


def climb(marks: list[tuple[float, float, str]], stop: threading.Event, started: float) -> None:
    high = rss_mb()
    while not stop.wait(0.02):
        now = rss_mb()
        if now > high + STEP_MB:
            high = now
            marks.append((time.monotonic() - started, now, where(threading.get_ident())))


def main(lists: int, kind: str) -> None:
    marks: list[tuple[float, float, str]] = []
    stop = threading.Event()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = fanout(Path(tmp), lists, domain="relay.test" if kind == "relay" else "local.test")
        if kind == "relay":
            overrides["transport_maps"] = ["inline:{ relay.test=smtp:[127.0.0.1]:9 }"]
        before = rss_mb()
        sampler = threading.Thread(target=climb, args=(marks, stop, time.monotonic()), daemon=True)
        sampler.start()
        run(f"{lists}x1000/{kind}", header() + "\r\nbody\r\n", overrides, Path(tmp),
            [f"list{i}@local.test" for i in range(lists)], settle=60 + lists)
        stop.set()
        sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{lists * 1000} recipients ({kind}): {before:.0f} MB before the server, peak {peak:.0f} MB, "
          f"{(peak - before) * 2**20 / (lists * 1000):.0f} bytes a recipient; {rss_mb():.0f} MB at the end")
    for seconds, mb, frames in marks:
        print(f"  {seconds:7.2f} s {mb:6.0f} MB  {frames[:300]}")


def lists_count(text: str) -> int:
    lists = int(text)
    if not 1 <= lists <= MAX_LISTS:
        raise argparse.ArgumentTypeError(f"{lists}: 1 to {MAX_LISTS} (smtpd's recipient_limit: one RCPT a list)")
    return lists


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("lists", metavar="LISTS", type=lists_count, help=f"lists of 1 000 members (1 to {MAX_LISTS})")
    ap.add_argument("kind", nargs="?", choices=("relay", "local"), default="relay",
                    help="members deferred (relay, the default) or bounced (local)")
    return ap.parse_args(argv)


if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    main(args.lists, args.kind)
