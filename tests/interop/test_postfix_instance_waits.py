"""The private Postfix's log waits (tests/support/postfix.py) that the differential tests build on: `flushed` returns
only once every line sent to postlogd before it is in the log; `sessions_ended` waits for an open session and, when
one stays open, says how many are (a test that left its client open), not only that they "did not all end"."""
from __future__ import annotations

import pytest

from tests.support import SmtpClient, postfix_instance

pytestmark = pytest.mark.interop


async def test_flushed_returns_once_the_lines_sent_before_it_are_in_the_log():
    async with postfix_instance({"myhostname": "pf.test"}) as pf:
        await pf.sessions_ended()
        for n in range(3):
            assert pf.run("postlog", "-t", "mailflow-test/line", f"line {n} before the mark").returncode == 0
            offset = await pf.flushed()
            assert f"line {n} before the mark" in pf.maillog[:offset]


async def test_sessions_ended_names_how_many_sessions_a_test_left_open():
    async with postfix_instance({"myhostname": "pf.test"}) as pf:
        await pf.sessions_ended()
        async with await SmtpClient.connect(pf.port), await SmtpClient.connect(pf.port):
            with pytest.raises(AssertionError, match=r"within 1s: 2 still open \(.*did a test leave a client open"):
                await pf.sessions_ended(timeout=1)
        offset = await pf.sessions_ended(timeout=5)
        assert pf.maillog[:offset].count("disconnect from") == 3  # the readiness probe's and the two
