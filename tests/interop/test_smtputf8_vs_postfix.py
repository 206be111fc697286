"""Differential test of SMTPUTF8 at the door: the same sessions to a private Postfix with SMTPUTF8 on and to mailflow
must get the same reply codes, enhanced codes and, where the words are Postfix's own, the same words.

The private Postfix runs with `strict_smtputf8 = yes`: mailflow always refuses a UTF-8 envelope address in a
transaction that did not declare SMTPUTF8 (docs/security.md; Postfix's default takes it). A path Postfix cannot parse
(a U-label without an A-label) is refused by both with 501 and the same enhanced code; mailflow's words name the
address there, as for every path it refuses after parsing (docs/security.md), so only the codes are compared.
"""
from __future__ import annotations

import pytest

from tests.support import SmtpClient, postfix_instance

pytestmark = pytest.mark.interop

E, M = "EHLO client.test", "MAIL FROM:<s@remote.test>"
MU = M + " SMTPUTF8"
SESSIONS: dict[str, list[str]] = {
    "a UTF-8 sender, undeclared": [E, "MAIL FROM:<j\u00fcrgen@remote.test>"],
    "a UTF-8 recipient, undeclared": [E, M, "RCPT TO:<j\u00fcrgen@relay.test>"],
    "declared": [E, "MAIL FROM:<j\u00fcrgen@remote.test> SMTPUTF8", "RCPT TO:<j\u00fcrgen@relay.test>",
                 "RCPT TO:<a@b\u00fccher.relay.test>"],
    "U-labels without an A-label": [E, MU, "RCPT TO:<a@ab--\u00fc.relay.test>", "RCPT TO:<a@\u0301x.relay.test>",
                                    "RCPT TO:<a@x\u3000y.relay.test>"],
    "a sender's U-label without an A-label": [E, "MAIL FROM:<a@ab--\u00fc.remote.test> SMTPUTF8"],
    "a UTF-8 domain, undeclared: a syntax error, before the local part's 553": [
        E, "MAIL FROM:<s@r\u00e9mote.test>", "MAIL FROM:<j\u00fcrgen@r\u00e9mote.test>", M,
        "RCPT TO:<a@b\u00fccher.relay.test>", "RCPT TO:<j\u00fcrgen@b\u00fccher.relay.test>"],
}
WORDS_COMPARED = ("a UTF-8 sender, undeclared", "a UTF-8 recipient, undeclared", "declared",
                  "a UTF-8 domain, undeclared: a syntax error, before the local part's 553")


async def replies(port: int, session: list[str]) -> list[tuple[int | None, str]]:
    c = await SmtpClient.connect(port)
    out = []
    for line in session:
        reply = await c.cmd(line)
        words = reply.text.split("\n")[-1][4:]
        out.append((reply.code, words if line != E else ""))
    await c.close()
    return out


async def test_smtputf8_sessions_get_the_replies_a_real_postfix_gives(mailflow_server):
    async with postfix_instance({"myhostname": "mx.pf.test", "mydestination": "", "relay_domains": "relay.test",
                                 "parent_domain_matches_subdomains": "relay_domains",
                                 "smtputf8_enable": "yes", "strict_smtputf8": "yes"}) as pf:
        postfix = {name: await replies(pf.port, session) for name, session in SESSIONS.items()}
    mf = await mailflow_server(mydestination=[], mynetworks=["127.0.0.0/8"], relay_domains=["relay.test"])
    mailflow = {name: await replies(mf.smtp_addresses[0][1], session) for name, session in SESSIONS.items()}
    for name in SESSIONS:
        if name in WORDS_COMPARED:
            assert mailflow[name] == postfix[name], name
        else:
            assert [(code, w.split()[:1]) for code, w in mailflow[name]] == [
                (code, w.split()[:1]) for code, w in postfix[name]], name
    # what both did, so that the same mistake on both sides cannot pass unnoticed
    assert postfix["a UTF-8 sender, undeclared"][1] == (553, "5.6.7 Must declare SMTPUTF8 to send unicode address")
    assert [code for code, _ in postfix["declared"]] == [250, 250, 250, 250]
    assert [code for code, _ in postfix["U-labels without an A-label"]][2:] == [501, 501, 501]
    assert postfix["a UTF-8 domain, undeclared: a syntax error, before the local part's 553"][1:] == [
        (501, "5.1.7 Bad sender address syntax")] * 2 + [(250, "2.1.0 Ok")] + [
        (501, "5.1.3 Bad recipient address syntax")] * 2
    assert postfix["a sender's U-label without an A-label"][1][0] == 501
