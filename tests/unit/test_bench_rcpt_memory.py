"""bench/rcpt_memory.py: what it reports of the threads' stacks at each climb, and the arguments it takes."""
from __future__ import annotations

import linecache
import threading

import pytest

from bench import rcpt_memory


def blocked_in(filename: str, started: threading.Event, release: threading.Event) -> threading.Thread:
    """A thread whose innermost frame is a function of `filename`, waiting for `release`."""
    namespace: dict = {}
    exec(compile("def wait(started, release):\n    started.set()\n    release.wait(10)\n", filename, "exec"),
         namespace)
    thread = threading.Thread(target=namespace["wait"], args=(started, release), daemon=True)
    thread.start()
    assert started.wait(10)
    return thread


def test_a_climb_names_the_package_frames_only_and_reads_no_source():
    """Only frames of mailflow's package are named, not a file under some other directory called mailflow (the
    bench's own, in a checkout of that name), and no source line is read: a traceback's lines were loaded into
    linecache at each climb, growing the memory the bench measures."""
    release = threading.Event()
    threads = [blocked_in(rcpt_memory.PACKAGE + "stage_under_test.py", threading.Event(), release),
               blocked_in("/srv/mailflow/bench/bench_under_test.py", threading.Event(), release)]
    linecache.clearcache()
    try:
        found = rcpt_memory.where(threading.get_ident())
    finally:
        release.set()
        for thread in threads:
            thread.join(10)
    named = found.split(" | ")  # (with the idle workers other tests of this process left: mailflow's frames too)
    assert "stage_under_test.py:3 wait" in named and not any("bench_under_test" in stack for stack in named)
    assert not linecache.cache


@pytest.mark.parametrize("argv", [[], ["0"], [str(rcpt_memory.MAX_LISTS + 1)], ["many"], ["2", "remote"]])
def test_the_bench_refuses_what_it_cannot_run_with_its_usage(argv, capsys):
    """LISTS is one RCPT a list, so 1 to smtpd's recipient_limit; the scenario relay or local."""
    with pytest.raises(SystemExit) as refused:
        rcpt_memory.parse_args(argv)
    assert refused.value.code == 2 and "usage: " in capsys.readouterr().err


def test_the_bench_takes_lists_and_a_scenario():
    assert (rcpt_memory.parse_args(["1000", "local"]).lists, rcpt_memory.parse_args(["3"]).kind) == (1000, "relay")
