"""Differential test: postscreen's early tests against a private Postfix 3.7 postscreen (master.cf: postscreen on
the port, `smtpd pass`, dnsblog, tlsproxy) configured alike, with no DNS: a client that talks before its turn
(greet_action drop), a patient client (PASS NEW, to smtpd), and the same client again (PASS OLD, no teaser).
Compared: each reply as the client reads it, and postscreen's log lines (the client's port normalised).

Not compared: the DNSBL paths (Postfix's dnsblog asks the system resolver, which this test cannot point at the
in-process DNS; tests/e2e/test_postscreen.py checks mailflow's against postscreen's source). One difference
seen and kept: Postfix's postscreen leaves the pregreeting input unread (it peeks), so closing after its 521 makes
the kernel reset the connection, which may lose the 521 at the client; mailflow has read the input and closes
cleanly, so the 521 always arrives.
"""
from __future__ import annotations

import asyncio
import logging
import re

import pytest

from tests.support import free_port, postfix_instance

pytestmark = pytest.mark.interop

HOST = "mx.mailflow.test"
GREET_WAIT = 1


async def dialogue(port: int) -> list[bytes]:
    """What the three clients read: the pregreeter's teaser and refusal, the patient one's greeting (then QUIT),
    the returning one's greeting."""
    seen = []
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    seen.append(await asyncio.wait_for(reader.readline(), 5))
    writer.write(b"EHLO zombie.test\r\n")
    await writer.drain()
    try:
        seen.append(await asyncio.wait_for(reader.readline(), 5))
    except ConnectionResetError:  # (Postfix: see the module doc)
        seen.append(b"<reset>")
    writer.close()
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        greeting = b""
        while True:
            line = await asyncio.wait_for(reader.readline(), GREET_WAIT + 5)
            greeting += line
            if not line or line[3:4] != b"-":
                break
        seen.append(greeting)
        writer.write(b"QUIT\r\n")
        await writer.drain()
        seen.append(await asyncio.wait_for(reader.readline(), 5))
        writer.close()
    return seen


def postscreen_lines(lines: list[str]) -> list[str]:
    return [re.sub(r"\]:\d+", "]:PORT", line) for line in lines]


async def test_pregreet_and_pass_as_postfix(mailflow_server, caplog):
    caplog.set_level(logging.INFO, logger="mailflow.postscreen")
    mf = await mailflow_server(smtpd={"banner": "ESMTP Postfix", "postscreen": {
        "enable": True, "access_list": [], "greet_wait": GREET_WAIT, "greet_action": "drop"}})
    ours = await dialogue(mf.smtp_addresses[0][1])
    our_log = postscreen_lines([r.getMessage() for r in caplog.records if r.name == "mailflow.postscreen"])

    port = free_port()
    master = (f"127.0.0.1:{port} inet n - n - 1 postscreen\n"
              "smtpd pass - - n - - smtpd\n"
              "dnsblog unix - - n - 0 dnsblog\n"
              "tlsproxy unix - - n - 0 tlsproxy\n")
    async with postfix_instance(main_cf={"myhostname": HOST, "postscreen_greet_wait": f"{GREET_WAIT}s",
                                         "postscreen_greet_action": "drop", "postscreen_access_list": "",
                                         "postscreen_cache_map": "btree:$data_directory/postscreen_cache"},
                                master_cf=master) as pf:
        theirs = await dialogue(port)
        await asyncio.sleep(0.3)
        their_log = postscreen_lines(re.findall(r"/postscreen\[\d+\]: (.*)$", pf.maillog, re.M))
    their_log = [line for line in their_log if not line.startswith("cache ")]  # (its cache file's upkeep)

    if theirs[1] == b"<reset>":
        theirs[1] = ours[1]
    assert ours == theirs
    assert ours[0] == b"220-mx.mailflow.test ESMTP Postfix\r\n" and ours[1] == b"521 5.5.1 Protocol error\r\n"
    assert our_log == their_log, (our_log, their_log)
    assert [" ".join(line.split()[:2]) for line in our_log] == [
        "CONNECT from", "PREGREET 18", "DISCONNECT [127.0.0.1]:PORT", "CONNECT from", "PASS NEW", "CONNECT from",
        "PASS OLD"], our_log
