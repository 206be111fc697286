"""The test support's own promises that a flaky run would otherwise be the first to tell: `postqueue_listed` takes
each queued message once, `queue_empty` trusts no single empty listing, and `free_port` never hands two
pytest-xdist workers of a run the same port."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.ports import worker_ports
from tests.support.postfix import PostfixInstance, postqueue_listed

ROOT = Path(__file__).resolve().parents[2]


def queued(queue_name: str, queue_id: str) -> str:
    return json.dumps({"queue_name": queue_name, "queue_id": queue_id, "sender": "s@x",
                       "recipients": [{"address": "r@x"}]})


def test_postqueue_listed_takes_a_message_showq_listed_twice_once():
    # showq read active, then deferred: 4F2A1's delivery failed between the two reads, and it was listed in both
    stdout = "\n".join([queued("active", "4F2A1"), queued("active", "4F2A2"), queued("deferred", "4F2A1")]) + "\n"
    listed = postqueue_listed(stdout.encode())
    assert [(m["queue_id"], m["queue_name"]) for m in listed] == [("4F2A1", "deferred"), ("4F2A2", "active")]
    assert postqueue_listed(b"") == []


async def test_a_private_postfix_queue_is_empty_once_read_empty_twice_in_a_row(monkeypatch):
    # the first "empty" read missed a message moving from incoming to active (showq reads active first)
    listings = [b"Mail queue is empty\n", b"-Queue ID-  --Size-- ...\n", b"Mail queue is empty\n",
                b"Mail queue is empty\n", b"never read\n"]
    pf = PostfixInstance(Path("/nonexistent"), 0)
    monkeypatch.setattr(pf, "run", lambda *argv: subprocess.CompletedProcess(argv, 0, listings.pop(0), b""))
    await pf.queue_empty(timeout=5)
    assert listings == [b"never read\n"]


def handed_out(worker: str, count: int, calls: int) -> list[int]:
    """The ports `free_port` hands out in a fresh process that is xdist worker `worker` of `count`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTEST_XDIST_WORKER": worker,
           "PYTEST_XDIST_WORKER_COUNT": str(count)}
    script = f"from tests.support.ports import free_port\nprint([free_port() for _ in range({calls})])"
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


def test_free_port_hands_two_workers_of_a_run_no_common_port():
    # 500 draws each from the same 12,000 ports would share about 20 numbers, and repeat some within a worker
    first, second = handed_out("gw0", 2, 500), handed_out("gw1", 2, 500)
    assert len(set(first)) == len(first) and len(set(second)) == len(second)
    assert not set(first) & set(second)


def test_worker_ports_are_equal_disjoint_slices_below_the_ephemeral_range():
    shares = [worker_ports({"PYTEST_XDIST_WORKER": f"gw{n}", "PYTEST_XDIST_WORKER_COUNT": "3"}) for n in range(3)]
    whole = worker_ports({})
    assert [len(share) for share in shares] == [len(whole) // 3] * 3
    assert shares[0].start == whole.start and shares[2].stop <= whole.stop
    assert all(a.stop == b.start for a, b in zip(shares, shares[1:]))


def test_a_worker_started_in_place_of_a_crashed_one_shares_a_slice_inside_the_span():
    # xdist names the replacements gw3, gw4, ... while the count stays 3: their slices were past the span, in the
    # ephemeral range or past 65535 (where bind raises OverflowError)
    shares = [worker_ports({"PYTEST_XDIST_WORKER": f"gw{n}", "PYTEST_XDIST_WORKER_COUNT": "3"}) for n in range(8)]
    assert shares[3:] == [shares[0], shares[1], shares[2], shares[0], shares[1]]
    whole = worker_ports({})
    for worker, count in (("gwx", "3"), ("master", "3"), ("gw1", "0"), ("gw1", "x"), ("gw1", "")):
        assert worker_ports({"PYTEST_XDIST_WORKER": worker, "PYTEST_XDIST_WORKER_COUNT": count}) == whole
