"""Differential test of recipient bookkeeping against a real Postfix 3.7: the same transactions to a private Postfix
and to mailflow configured alike, each relaying to its own smtp-sink. What is compared per message: the recipients
the sink saw, each with the ORCPT and NOTIFY it went out with; and the to=/orig_to= of each delivery's log line.

The probes: the original recipient is the address as the client wrote it (quotes, trailing dot, case, a source
route: Postfix sends it as ORCPT, and shows it in X-Original-To and orig_to without the route and the quotes that
add nothing), while the address itself is tidied; and which recipients are duplicates (Postfix cleanup's key: the
address, NOTIFY, ORCPT and original recipient, without case; SUCCESS not counted for an alias's members), so that
the same copies go out.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.interop.test_content_vs_postfix import virtual_alias_copies
from tests.support.postfix import smtp_sink
from tests.support import SmtpClient, eventually, postfix_instance

pytestmark = pytest.mark.interop

COMMON = {"myhostname": "mx.origin.test", "myorigin": "origin.test"}
VIRTUAL = "inline:{ {list@v.test = a@x.test, b@x.test} }"
# per message: the paths of its RCPT commands
PROBES = [
    ['<"joe"@X.Test.>'],
    ["<Ann@X.TEST.>", '<"b.c"@x.test>', '<"b c"@x.test>', "<@relay.test:route@x.test>"],
    ["<a@x.test>", "<a@x.test>", "<A@X.TEST>"],
    ["<a@x.test>", "<list@v.test>"],
    ["<a@x.test> NOTIFY=NEVER", "<a@x.test> NOTIFY=SUCCESS", "<a@x.test> NOTIFY=SUCCESS,FAILURE",
     "<a@x.test> NOTIFY=FAILURE,SUCCESS"],
    ["<a@x.test> ORCPT=rfc822;one@x.test", "<a@x.test> ORCPT=rfc822;two@x.test", "<a@x.test> ORCPT=rfc822;ONE@x.test"],
    ['<"joe"@x.test>', "<joe@x.test>", "<joe@x.test.>", "<@r.test:joe@x.test>"],
    ["<list@v.test> NOTIFY=NEVER", "<list@v.test> NOTIFY=SUCCESS"],
    ["<list@v.test> NOTIFY=SUCCESS", "<a@x.test> ORCPT=rfc822;list@v.test"],
]
# A known difference (docs/config.md): Postfix turns NOTIFY=SUCCESS off for the members of an alias of several
# addresses and sends the sender one "expanded" success notice itself; mailflow sends no such notice, so it passes
# the members' NOTIFY on as it was given (the same copies go out either way).
KNOWN_PROBE = len(PROBES) - 1
KNOWN = {KNOWN_PROBE: ["<a@x.test> ORCPT=rfc822;list@v.test", "<a@x.test> ORCPT=rfc822;list@v.test NOTIFY=SUCCESS",
                       "<b@x.test> ORCPT=rfc822;list@v.test NOTIFY=SUCCESS"]}


async def send_probes(port: int) -> None:
    for i, rcpts in enumerate(PROBES):
        client = await SmtpClient.connect(port)
        assert (await client.cmd("EHLO client.test")).code == 250
        assert (await client.cmd("MAIL FROM:<s@remote.test>")).code == 250
        for rcpt in rcpts:
            assert (await client.cmd(f"RCPT TO:{rcpt}")).code == 250, rcpt
        assert (await client.cmd("DATA")).code == 354
        assert (await client.cmd(f"From: s@remote.test\r\nSubject: probe-{i}\r\n\r\nx\r\n.")).code == 250
        await client.close()


def arrivals(dump: Path) -> dict[int, list[str]]:
    """Per probe: the sorted RCPT arguments (address, ORCPT, NOTIFY) the sink was given, then the recipient the
    Received header names (`for <…>`, a message of one recipient)."""
    out = {}
    text = dump.read_text(errors="replace") if dump.exists() else ""
    for message in text.split("X-Client-Addr:")[1:]:
        subject = re.search(r"^Subject: probe-(\d+)", message, re.MULTILINE)
        if subject and "\nX-Mail-Args: <>" not in message:  # (not a notice, which quotes the probe's Subject)
            named = re.search(r"^\tfor <(.*)>;", message, re.MULTILINE)  # (the Received for clause of 1 recipient)
            out[int(subject.group(1))] = sorted(re.findall(r"^X-Rcpt-Args: (.*)$", message, re.MULTILINE)) + (
                [f"for <{named.group(1)}>"] if named else [])
    return out


async def run(port: int, dump: Path) -> dict[int, list[str]]:
    await send_probes(port)
    return await eventually(lambda: len(arrivals(dump)) == len(PROBES) and arrivals(dump), timeout=20)


def logged(log: str) -> list[tuple[str, str]]:
    """The (to, orig_to) of each delivery line of a mail log, sorted (not the notices' to the sender)."""
    return sorted(r for r in re.findall(r" to=<([^>]*)>(?:, orig_to=<([^>]*)>)?, relay=", log)
                  if r[0] != "s@remote.test")


async def all_logged(log, arrived: dict[int, list[str]]) -> list[tuple[str, str]]:
    count = sum(len([r for r in rcpts if not r.startswith("for <")]) for rcpts in arrived.values())
    return await eventually(lambda: len(logged(log())) == count and logged(log()))


async def test_recipients_go_on_as_a_real_postfix_sends_them(mailflow_server, caplog):
    caplog.set_level("INFO")
    async with smtp_sink() as (pf_sink, pf_dump), smtp_sink() as (mf_sink, mf_dump):
        async with postfix_instance({**COMMON, "relayhost": f"[127.0.0.1]:{pf_sink}", "virtual_alias_maps": VIRTUAL,
                                     "relay_domains": "x.test"}) as pf:
            postfix = await run(pf.port, pf_dump)
            postfix_log = await all_logged(lambda: pf.maillog, postfix)
        mf = await mailflow_server(**COMMON, relayhost=f"[127.0.0.1]:{mf_sink}", virtual_alias_maps=[VIRTUAL],
                                   relay_domains=["x.test"], mynetworks=["127.0.0.0/8"])
        mailflow = await run(mf.smtp_addresses[0][1], mf_dump)
        mailflow_log = await all_logged(lambda: caplog.text, mailflow)
    assert {i: mailflow[i] for i in mailflow if i not in KNOWN} == {i: postfix[i] for i in postfix if i not in KNOWN}
    assert {i: mailflow[i] for i in KNOWN} == KNOWN
    assert postfix[KNOWN_PROBE][1:] == [f"<{m}@x.test> ORCPT=rfc822;list@v.test NOTIFY=NEVER" for m in "ab"]
    assert mailflow_log == postfix_log
    assert ("joe@X.Test", "joe@X.Test.") in postfix_log and ('"b c"@x.test', "") in postfix_log
    assert postfix[2] == ["<a@x.test> ORCPT=rfc822;a@x.test"]  # the same recipient, whatever its case: one copy
    assert len(postfix[3]) == len(postfix[4]) == 3 and len(postfix[5]) == 2 and len(postfix[6]) == 4
    assert postfix[7] == [f"<{m}@x.test> ORCPT=rfc822;list@v.test NOTIFY=NEVER" for m in "ab"]
    # what both did, so that the same change on both sides cannot pass unnoticed
    assert postfix[0] == ['<joe@X.Test> ORCPT=rfc822;"joe"@X.Test.', "for <joe@X.Test.>"]
    assert postfix[1] == ['<"b c"@x.test> ORCPT=rfc822;"b+20c"@x.test', "<Ann@X.TEST> ORCPT=rfc822;Ann@X.TEST.",
                          '<b.c@x.test> ORCPT=rfc822;"b.c"@x.test',
                          "<route@x.test> ORCPT=rfc822;@relay.test:route@x.test"]


async def test_x_original_to_is_the_recipient_as_written_as_in_a_real_postfix(mailflow_server, tmp_path):
    """virtual(8) Maildir delivery through a virtual alias: X-Original-To is the RCPT address as the client wrote
    it (case, trailing dot), but for quotes that add nothing; Delivered-To the alias's member."""
    postfix, mailflow = await virtual_alias_copies(mailflow_server, tmp_path, '"Team"@VDomain.Test.')
    assert mailflow == postfix
    assert postfix == [b"Return-Path: <bob@client.test>", b"X-Original-To: Team@VDomain.Test.",
                       b"Delivered-To: alice@vdomain.test"]
