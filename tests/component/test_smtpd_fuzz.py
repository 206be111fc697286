"""Hostile input, property-based: random byte streams (valid commands, CR/LF/NUL, dots, BDAT, junk) sent to a
real mailflow over a socket. Properties: smtpd never crashes (a fresh session still answers NOOP) and never
queues a message the client did not complete (messages delivered == "250 ... queued as" replies received).

The server runs in a thread of its own (its own event loop); hypothesis drives blocking sockets. Pipelining
checks are off here so that streams reach deeper than the first pipelined command. FUZZ_EXAMPLES raises the
number of examples for a longer run (docs/security.md records one).
"""
from __future__ import annotations

import os
import re

from hypothesis import HealthCheck, given, settings, strategies as st

from tests.support import ServerThread, base_settings, merged
from tests.support.raw import answers_noop, converse


EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "120"))
QUEUED = re.compile(rb"^250 2\.0\.0 Ok: (?:\d+ bytes )?queued as ", re.M)

FRAGMENTS = [
    b"EHLO fuzz.test\r\n", b"HELO fuzz.test\r\n", b"MAIL FROM:<s@remote.test>\r\n",
    b"MAIL FROM:<s@remote.test> RET=HDRS ENVID=x\r\n", b"RCPT TO:<alice@local.test>\r\n",
    b"RCPT TO:<alice@local.test> NOTIFY=NEVER\r\n", b"RCPT TO:<evil@victim.example>\r\n", b"DATA\r\n",
    b"BDAT 5\r\n", b"BDAT 3 LAST\r\n", b"BDAT 0 LAST\r\n", b"RSET\r\n", b"NOOP\r\n", b"VRFY alice\r\n",
    b"QUIT\r\n", b"Subject: f\r\n\r\nbody\r\n", b".\r\n", b"..\r\n", b"\r\n.\r\n", b"\n.\n", b"\r.\r",
    b"\n", b"\r", b"\r\n", b"\0", b".", b"x" * 3000, b"STARTTLS\r\n", b"AUTH PLAIN AAAA\r\n",
]
ENVELOPE = b"EHLO fuzz.test\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@local.test>\r\n"
PREFIXES = [b"", ENVELOPE + b"DATA\r\nSubject: f\r\n\r\n", ENVELOPE + b"BDAT 4\r\nab\r\n"]
tail = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=40)), max_size=25).map(b"".join)
stream = st.tuples(st.sampled_from(PREFIXES), tail).map(b"".join)


def test_random_streams_never_crash_smtpd_nor_queue_incomplete_mail(tmp_path):
    settings_ = merged(base_settings(tmp_path), {"smtpd": {
        "listen": ["127.0.0.1:0"], "timeout": "2s", "forbid_unauth_pipelining": False,
        "error_sleep_time": 0, "message_size_limit": 100_000}})
    server = ServerThread(settings_)
    queued = 0
    try:
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(stream)
        def check(data: bytes) -> None:
            nonlocal queued
            replies = converse(server.port, data)
            queued += len(QUEUED.findall(replies))
            answers_noop(server.port, within=5.0)

        check()
        assert len(server.settle(tmp_path / "mail" / "alice" / "Maildir", queued, within=15)) == queued
        print(f"fuzz: {EXAMPLES} examples, {queued} messages completed and delivered")
    finally:
        server.stop()
