"""Differential test of the SMTP and LMTP clients' connection cache and RSET probe: a private Postfix 3.7 (its
smtp(8) or lmtp(8), told to cache sessions to the peer's address by *_connection_cache_destinations, as it caches on
demand) and mailflow (which always caches, connection_cache_time_limit) each deliver three messages, one after the
other, to a scripted peer of their own; the peers hear the same commands: one session, EHLO or LHLO once, and the
RSET probe before each reuse (smtp_reuse_common; mailflow pipelines it with MAIL when it can, Postfix sends it
alone: the order on the wire is the same, and `heard` compares verbs only, so the component tests tell the two
apart), with and without PIPELINING, and none after a refused end of data (the final replies end the transaction:
Postfix's SMTP_STATE_DOT caches the session without RSET). QUIT is left out: Postfix's scache closes an idle session
without one, mailflow QUITs it."""
from __future__ import annotations

import logging
import re
from typing import Callable

import pytest

from tests.interop.test_smtp_faults_vs_postfix import EHLO, END_OF_DATA, MailLogLines, ScriptedPeer
from tests.support import SmtpClient, eventually, postfix_instance

pytestmark = pytest.mark.interop

PEER_HOST = "127.0.0.2"  # (no other peer has it: Postfix caches the sessions to it only)
RCPTS = [f"u{n}@box.test" for n in range(3)]
WITHOUT_PIPELINING = EHLO.replace(b"250-PIPELINING\r\n", b"")


async def deliver_one_after_the_other(port: int, maillog: Callable[[], str]) -> None:
    """Each message once the last is done with (`done_with`): its result, then its `removed` line, which the
    server writes once its delivery agent has finished (Postfix's qmgr hears from the agent after it cached the
    session). Waiting for the peer to hear DATA let Postfix's qmgr give the next message to a second lmtp process
    before the first had cached its session after a refused end of data: a new session now and then."""
    for n, rcpt in enumerate(RCPTS):
        client = await SmtpClient.connect(port)
        for command in ("EHLO client.test", "MAIL FROM:<s@sender.test>", f"RCPT TO:<{rcpt}>", "DATA"):
            await client.cmd(command)
        assert (await client.cmd("Subject: cached\r\n\r\nbody\r\n.")).code == 250
        await client.cmd("QUIT")
        await client.close()
        await eventually(lambda: done_with(maillog(), rcpt), timeout=15, what=f"{rcpt} done with")


def done_with(maillog: str, rcpt: str) -> bool:
    """Whether the message to `rcpt` has its result and then its `removed` line (not some other message's: a
    notice's)."""
    found = re.search(rf"(\w+): to=<{re.escape(rcpt)}>,.* status=", maillog)
    return found is not None and f"{found.group(1)}: removed" in maillog


def heard(peer: ScriptedPeer) -> list[str]:
    """The verbs the peer heard, session by session ("|" between sessions), QUIT left out."""
    verbs = []
    for session in peer.sessions:
        verbs += [line.split()[0].decode() for line in session
                  if line.split() and line.split()[0] != b"QUIT" and line != END_OF_DATA]
        verbs.append("|")
    return verbs


def refused_first() -> Callable[[str], bytes]:
    """The end-of-data reply: the first message's one recipient refused, the others accepted."""
    replies = iter([b"550 5.2.0 <u0@box.test> refused\r\n"])
    return lambda _: next(replies, b"250 2.0.0 <u@box.test> Saved\r\n")


@pytest.mark.parametrize("transport, script", [
    ("smtp", lambda: {"EHLO": EHLO}),
    ("smtp", lambda: {"EHLO": WITHOUT_PIPELINING}),
    ("lmtp", lambda: {}),
    ("lmtp", lambda: {"DOT": refused_first()}),
], ids=["smtp-pipelining", "smtp-no-pipelining", "lmtp-accepted", "lmtp-first-refused"])
async def test_sessions_are_reused_after_an_rset_probe_as_postfix_s_client_does(mailflow_server, transport, script):
    """`script()`: the peer's replies (each peer its own: refused_first's replies are used up)."""
    pf_peer = await ScriptedPeer(script()).start(PEER_HOST)
    mf_peer = await ScriptedPeer(script()).start(PEER_HOST)
    mail_logger, mf_log = logging.getLogger("mailflow.mail"), MailLogLines()
    level = mail_logger.level
    try:
        async with postfix_instance({
            "mydestination": "", "relay_domains": "box.test", "mynetworks": "127.0.0.0/8",
            "transport_maps": f"inline:{{box.test={transport}:[{PEER_HOST}]:{pf_peer.port}}}",
            f"{transport}_connection_cache_destinations": PEER_HOST,
        }) as pf:
            await deliver_one_after_the_other(pf.port, lambda: pf.maillog)
        mf = await mailflow_server(relay_domains=["box.test"], mynetworks=["127.0.0.0/8"],
                                   transport_maps=[f"inline:{{box.test={transport}:[{PEER_HOST}]:{mf_peer.port}}}"])
        mail_logger.addHandler(mf_log)
        mail_logger.setLevel(logging.INFO)
        await deliver_one_after_the_other(mf.smtp_addresses[0][1], lambda: "\n".join(mf_log.lines))
    finally:
        mail_logger.removeHandler(mf_log)
        mail_logger.setLevel(level)
        await pf_peer.stop()
        await mf_peer.stop()
    greeting = "LHLO" if transport == "lmtp" else "EHLO"
    assert heard(mf_peer) == heard(pf_peer) == [greeting] + ["MAIL", "RCPT", "DATA", "RSET"] * 2 + [
        "MAIL", "RCPT", "DATA", "|"]
