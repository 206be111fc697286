"""bench/killhunt.py's mbox check: a cut entry with its retry glued on must be seen (review L2 b)."""
from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

from mailflow.transports.local.mbox import format_mbox_entry

ROOT = Path(__file__).resolve().parents[2]


def killhunt():
    spec = importlib.util.spec_from_file_location("killhunt", ROOT / "bench" / "killhunt.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("killhunt", module)  # (its dataclasses look their module up there)
    spec.loader.exec_module(sys.modules["killhunt"])
    return sys.modules["killhunt"]


def entry(token: str) -> bytes:
    return format_mbox_entry(f"X-Token: {token}\n\nbody\nEND-{token}\n".encode(), sender="s@r.test", arrival=0)


def test_a_cut_entry_glued_to_its_retry_is_a_problem_and_one_on_a_line_of_its_own_is_counted(tmp_path):
    """The check split entries at From_ lines that start a line: a cut entry followed by its retry on the same line
    read as one whole copy (its END line is the retry's), and nothing was flagged."""
    hunt = killhunt()
    box = tmp_path / "mbox"
    box.write_bytes(entry("a") + entry("b")[:55] + entry("b"))  # the retry's From_ glued to the cut line
    stats: Counter = Counter()
    counts, bad = hunt.mbox_tokens(box, stats)
    assert counts["a"] == 1 and counts["b"] == 0
    assert bad == ["entries glued together b: a From_ line inside a line"]
    box.write_bytes(entry("a") + entry("b")[:55] + b"\n" + entry("b"))  # as an append now leaves it
    stats = Counter()
    counts, bad = hunt.mbox_tokens(box, stats)
    assert (counts["a"], counts["b"], bad, stats["mbox_cut_entries"]) == (1, 1, [], 1)


def test_a_notice_without_the_returned_messages_end_counts_in_a_bounce_box(tmp_path):
    """A notice returns the headers only (its X-Token, no END line): counted as cut, every bounce read as lost."""
    hunt = killhunt()
    box = tmp_path / "mbox"
    box.write_bytes(format_mbox_entry(b"Subject: Undelivered\n\nX-Token: c\n", sender="", arrival=0))
    assert hunt.mbox_tokens(box, notices=True)[0]["c"] == 1
