"""The test support's own promises that a flaky run would otherwise be the first to tell: `postqueue_listed` takes
each queued message once."""
from __future__ import annotations

import json

from tests.support.postfix import postqueue_listed


def queued(queue_name: str, queue_id: str) -> str:
    return json.dumps({"queue_name": queue_name, "queue_id": queue_id, "sender": "s@x",
                       "recipients": [{"address": "r@x"}]})


def test_postqueue_listed_takes_a_message_showq_listed_twice_once():
    # showq read incoming, then active: 4F2A1 moved between the two reads and was listed in both
    stdout = "\n".join([queued("incoming", "4F2A1"), queued("incoming", "4F2A2"), queued("active", "4F2A1")]) + "\n"
    listed = postqueue_listed(stdout.encode())
    assert [(m["queue_id"], m["queue_name"]) for m in listed] == [("4F2A1", "active"), ("4F2A2", "incoming")]
    assert postqueue_listed(b"") == []

