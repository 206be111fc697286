"""Differential test: smtpd's abuse limits and timeouts against a private Postfix configured alike (low limits,
so that each comparison takes seconds). Compared: the reply (code, enhanced code, text word for word, the host
name normalised), when it comes, and what is logged: the per-client connection count and rate (anvil, the time
unit included), the per-client message, recipient and AUTH rates (which MAIL, RCPT, VRFY and AUTH commands
count), the new TLS session rate with STARTTLS, smtpd_timeout between commands, in DATA and BDAT content and
after the message, and smtpd_starttls_timeout for a stalled handshake (STARTTLS, and a wrapper-mode service); a
failed or abandoned handshake, STARTTLS followed at once by the end of input, and the connection count limit of a
wrapper-mode service (its 421 over TLS); message_size_limit against a milter whose edits (a replaced body) go past
it.

Not compared: the new TLS session rate with implicit TLS (that test's Postfix has no wrapper-mode service;
tests/component/test_frontdoor.py covers mailflow's), resumed TLS sessions (likewise); line_length_limit and
header_size_limit, where mailflow differs on purpose (docs/security.md, docs/config.md: a long command line is
refused, a big header refused).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import re
import socket
import ssl

import pytest

from tests.support.milters import reply, scripted_milter
from tests.support import (LOOPBACK_CLIENT, SmtpClient, accepts, as_prompt_as, eventually, free_port,
                           half_client_hello, postfix_instance, sessions_over, timed)
from tests.support.maillog import library_reason

pytestmark = pytest.mark.interop

PF_HOST, MF_HOST = "pf.test", "mx.mailflow.test"
# 127.0.0.1 must not be exempt from the limits on either side: mynetworks (Postfix's default
# smtpd_client_event_limit_exceptions, mailflow's exemption) does not hold it
NETWORKS = "192.0.2.0/24"


def same_host(text: str) -> str:
    return text.replace(PF_HOST, "HOST").replace(MF_HOST, "HOST")


async def greeting(port: int) -> SmtpClient | str:
    """A connection and its first reply: the client when it is a greeting, else the reply's text (hosts
    normalised) after the server closed the connection."""
    c = await SmtpClient.connect(port, greet=False)
    reply = await c.reply()
    if reply.code == 220:
        return c
    assert await c.closed(), reply
    await c.close()
    return same_host(reply.text)


async def leave(c: SmtpClient) -> None:
    """QUIT and wait for the server's close: the session's count is given back before the next connection."""
    assert (await c.cmd("QUIT")).code == 221
    assert await c.closed()
    await c.close()


async def connection_limits(port: int) -> list[str]:
    """Count limit 2, rate limit 5 per time unit: each attempt's first reply ("220" for a greeting). The first
    connection of the time unit is the readiness probe (postfix_instance's; `accepts` for mailflow)."""
    seen: list[str] = []
    held: list[SmtpClient] = []

    async def attempt() -> None:
        c = await greeting(port)
        if isinstance(c, SmtpClient):
            held.append(c)
        seen.append("220" if isinstance(c, SmtpClient) else c)

    for _ in range(3):  # the 2nd to 4th connections: the third at once is one too many
        await attempt()
    await leave(held.pop(0))
    await attempt()  # the 5th: admitted
    await attempt()  # the 6th: past both limits at once
    while held:
        await leave(held.pop())
    await attempt()  # the 7th: past the rate only
    return seen


async def admitted_again(port: int, unit: float) -> bool:
    """A client refused for its rate that keeps trying every half second is admitted again once the time unit
    is over (Postfix's anvil counts per time unit from the first connection; each refused attempt counts too, so
    a sliding window would keep such a client out for good). Tries for the time unit and 2 s more."""
    for _ in range(int((unit + 2) / 0.5)):
        c = await greeting(port)
        if isinstance(c, SmtpClient):
            await leave(c)
            return True
        await asyncio.sleep(0.5)
    return False


UNIT = 3  # seconds: the whole of connection_limits must come within the first one
LIMITS_PF = {"smtpd_client_connection_count_limit": "2", "smtpd_client_connection_rate_limit": "5",
             "anvil_rate_time_unit": f"{UNIT}s"}
LIMITS_MF = {"client_connection_count_limit": 2, "client_connection_rate_limit": 5, "anvil_rate_time_unit": f"{UNIT}s"}


def anvil_warning(text: str) -> bool:
    return "limit exceeded" in text or text.startswith("Refusing ")


def pf_warnings(maillog: str) -> list[str]:
    """Postfix's anvil warnings (the service named as master.cf names it: smtp for the usual one)."""
    return [re.sub(r"for service \S+$", "for service smtp", line.split("warning: ", 1)[1])
            for line in maillog.splitlines() if "warning: " in line and anvil_warning(line.split("warning: ", 1)[1])]


def mf_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and anvil_warning(r.getMessage())]


async def test_connection_limits_match_a_real_postfix(mailflow_server, caplog):
    caplog.set_level(logging.INFO)
    mf = await mailflow_server(mynetworks=[NETWORKS], smtpd=LIMITS_MF)
    port = mf.smtp_addresses[0][1]
    async with postfix_instance({"myhostname": PF_HOST, "mynetworks": NETWORKS, **LIMITS_PF}) as pf:
        assert accepts(port)  # (each server's time unit starts with its readiness probe, just before its side)

        async def postfix_side() -> tuple[list[str], str, bool]:
            seen = await connection_limits(pf.port)
            await eventually(lambda: len(pf_warnings(pf.maillog)) >= 3, what="Postfix's anvil warnings")
            return seen, pf.maillog, await admitted_again(pf.port, UNIT)

        async def mailflow_side() -> tuple[list[str], list[str], bool]:
            seen = await connection_limits(port)
            return seen, mf_warnings(caplog), await admitted_again(port, UNIT)

        # each server counts its own clients: the two run at once
        (postfix, pf_log, pf_admitted), (mailflow, mf_warned, mf_admitted) = await asyncio.gather(
            postfix_side(), mailflow_side())
    assert mailflow == postfix
    assert mf_warned == pf_warnings(pf_log)
    assert pf_admitted and mf_admitted
    # the replies themselves, so that a change on both sides cannot pass unnoticed
    refused = "421 4.7.0 HOST Error: too many connections from 127.0.0.1"
    assert postfix == ["220", "220", refused, "220", refused, refused]
    # past both limits, Postfix names the concurrency: it checks the count first
    assert pf_warnings(pf_log) == [f"Connection {what} limit exceeded: {n} from {LOOPBACK_CLIENT} for service smtp"
                                   for what, n in [("concurrency", 3), ("concurrency", 3), ("rate", 7)]]


# smtpd_client_<name>_rate_limit (Postfix), client_<name>_rate_limit (mailflow)
EVENT_LIMITS = {"message": 2, "recipient": 3, "auth": 2, "new_tls_session": 1}


async def events(port: int) -> list[str]:
    """Per-client event limits within one time unit: each command and its reply (hosts normalised). A refused
    command still counts (an unknown user, a malformed path); the usage error comes before the count; VRFY
    counts as a recipient; an AUTH refused because AUTH is not offered counts."""
    c = await SmtpClient.connect(port)
    assert (await c.cmd("EHLO client.test")).code == 250
    seen = []
    for line in ["MAIL FROM:<s@remote.test>", "RCPT TO:<alice@local.test>", "RCPT TO:<carol@local.test>",
                 "RCPT TO:<bad", "RCPT TO:<alice@local.test>", "RCPT TO:", "VRFY alice@local.test", "RSET",
                 "MAIL FROM:<bad", "MAIL FROM:<s@remote.test>", "MAIL FROM:", "AUTH PLAIN", "AUTH", "AUTH PLAIN",
                 "NOOP"]:
        seen.append(f"{line} -> {same_host((await c.cmd(line)).text)}")
    await leave(c)
    return seen


async def tls_sessions(port: int, ctx: ssl.SSLContext) -> list[str]:
    """Three sessions with STARTTLS: the reply to it, then the first reply over TLS (the server speaks first only
    to refuse; else the code of EHLO's), or after a refused STARTTLS the reply to NOOP."""
    seen = []
    for _ in range(3):
        c = await SmtpClient.connect(port)
        assert (await c.cmd("EHLO client.test")).code == 250
        reply = await c.cmd("STARTTLS")
        seen.append(f"STARTTLS -> {same_host(reply.text)}")
        if reply.code == 220:
            await c.writer.start_tls(ctx, server_hostname="localhost")
            try:
                seen.append(f"first over TLS: {same_host((await c.reply(timeout=0.5)).text)}")
            except asyncio.TimeoutError:
                seen.append(f"EHLO over TLS -> {(await c.cmd('EHLO client.test')).code}")
        else:
            seen.append(f"NOOP -> {(await c.cmd('NOOP')).text}")
        await c.close()
    return seen


async def test_event_limits_match_a_real_postfix(mailflow_server, caplog, pki):
    caplog.set_level(logging.INFO)
    _, cert, ctx = pki
    limits = {f"smtpd_client_{name}_rate_limit": str(n) for name, n in EVENT_LIMITS.items()}
    async with postfix_instance({"myhostname": PF_HOST, "mynetworks": NETWORKS, "mydestination": "local.test",
                                 "local_recipient_maps": "inline:{alice=ok}", "smtpd_error_sleep_time": "0",
                                 "smtpd_tls_cert_file": cert, "smtpd_tls_key_file": cert,
                                 "smtpd_tls_security_level": "may", **limits}) as pf:
        postfix = await events(pf.port) + await tls_sessions(pf.port, ctx)
        await eventually(lambda: len(pf_warnings(pf.maillog)) >= 6, what="Postfix's anvil warnings")
        pf_log = pf.maillog
    mf = await mailflow_server(mynetworks=[NETWORKS], smtpd={"disable_vrfy_command": False,  # Postfix's default
                                                             "error_sleep_time": 0,  # past 10 errors: no tarpit
                                                             "tls_cert_file": cert,
                                                             **{f"client_{name}_rate_limit": n
                                                                for name, n in EVENT_LIMITS.items()}})
    port = mf.smtp_addresses[0][1]
    assert accepts(port)  # a connection first, as Postfix's readiness probe
    mailflow = await events(port) + await tls_sessions(port, ctx)
    assert mailflow == postfix
    assert mf_warnings(caplog) == pf_warnings(pf_log)
    # Postfix's own, so that a change on both sides cannot pass unnoticed
    assert "MAIL FROM:<s@remote.test> -> 450 4.7.1 Error: too much mail from 127.0.0.1" in postfix
    assert "VRFY alice@local.test -> 450 4.7.1 Error: too many recipients from 127.0.0.1" in postfix
    assert "AUTH PLAIN -> 450 4.7.1 Error: too many AUTH commands from 127.0.0.1" in postfix
    ready = "STARTTLS -> 220 2.0.0 Ready to start TLS"
    assert postfix[-6:] == [ready, "EHLO over TLS -> 250", ready,  # the 2nd handshake is one too many, then none
                            f"first over TLS: 421 4.7.0 HOST Error: too many new TLS sessions from {LOOPBACK_CLIENT}",
                            f"STARTTLS -> 454 4.7.0 Error: too many new TLS sessions from {LOOPBACK_CLIENT}",
                            "NOOP -> 250 2.0.0 Ok"]
    assert pf_warnings(pf_log) == [f"{what} rate limit exceeded: {n} from {LOOPBACK_CLIENT} for service smtp"
                                   for what, n in [("Recipient address", 4), ("Recipient address", 5),
                                                   ("Message delivery request", 3), ("AUTH command", 3),
                                                   ("New TLS session", 2)]] + [
        f"Refusing STARTTLS request from {LOOPBACK_CLIENT} for service smtp"]


BODY_SO_FAR = b"Subject: slow\r\n\r\nbody"  # then the client stalls


async def stall(port: int, stage: str) -> str:
    """smtpd_timeout of 1 s: the client stalls (or, for "lost", goes away) at `stage`; the server's last reply."""
    c = await SmtpClient.connect(port)
    assert (await c.cmd("EHLO client.test")).code == 250
    if stage != "command":
        await c.envelope(ehlo=False)
    if stage in ("data", "lost in data", "message", "lost after message"):
        assert (await c.cmd("DATA")).code == 354
        await c.send(BODY_SO_FAR)
    if stage in ("message", "lost after message"):
        assert (await c.cmd(b"\r\n.")).code == 250
    if stage == "bdat":
        await c.send(b"BDAT 6\r\nab\r\ncd")
        assert (await c.reply()).code == 250
        await c.send(b"BDAT 100\r\nef")
    if stage.startswith("lost"):
        await c.close()
        return "closed"
    reply = await c.reply()
    assert await c.closed()
    await c.close()
    return same_host(reply.text)


STAGES = ("command", "data", "message", "bdat", "lost in data", "lost after message")


async def timeouts(port: int) -> list[str]:
    return [await stall(port, stage) for stage in STAGES]


def pf_timeouts(maillog: str) -> list[str]:
    return [line.split("]: ", 1)[1] for line in maillog.splitlines()  # (not the readiness probe's CONNECT)
            if "smtpd[" in line and re.search(r"]: (timeout|lost connection) after (?!CONNECT)", line)]


def mf_timeouts(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if re.match(r"(timeout|lost connection) after", r.getMessage())]


def bdat_bytes(lines: list[str]) -> list[str]:
    """The lines with BDAT's byte count as N: Postfix's counts its buffers (the command line's too)."""
    return [re.sub(r"BDAT \(\d+ bytes\)", "BDAT (N bytes)", line) for line in lines]


async def test_timeouts_match_a_real_postfix(mailflow_server, caplog):
    caplog.set_level(logging.INFO)
    async with postfix_instance({"myhostname": PF_HOST, "mynetworks": NETWORKS, "mydestination": "local.test",
                                 "local_recipient_maps": "inline:{alice=ok}", "smtpd_timeout": "1s"}) as pf:
        mf = await mailflow_server(mynetworks=[NETWORKS], smtpd={"timeout": "1s"})

        async def postfix_side() -> tuple[tuple[list[str], float], str]:
            seen = await timed(timeouts(pf.port))
            ended = await pf.sessions_ended()
            return seen, pf.maillog[:ended]

        async def mailflow_side() -> tuple[list[str], float]:
            seen = await timed(timeouts(mf.smtp_addresses[0][1]))
            await sessions_over(mf)
            return seen

        # each server's stalls, one after the other; the two servers at once, so that mailflow's stalls (four
        # smtpd_timeouts) are bounded by Postfix's in the same run (a timeout 3x too long fails)
        ((postfix, pf_waited), pf_log), (mailflow, mf_waited) = await asyncio.gather(postfix_side(), mailflow_side())
    assert mailflow == postfix
    assert pf_waited >= 4
    as_prompt_as(mf_waited, pf_waited, "four stalls under smtpd_timeout 1s")
    assert bdat_bytes(mf_timeouts(caplog)) == bdat_bytes(pf_timeouts(pf_log))
    # Postfix's own, so that a change on both sides cannot pass unnoticed: the same 421 wherever the client
    # stalls; the byte count of DATA content (its complete lines); no line for a connection lost once the
    # message was answered
    assert postfix == ["421 4.4.2 HOST Error: timeout exceeded"] * 4 + ["closed"] * 2
    assert bdat_bytes(pf_timeouts(pf_log)) == [f"{what} from {LOOPBACK_CLIENT}" for what in [
        "timeout after EHLO", "timeout after DATA (17 bytes)", "timeout after END-OF-MESSAGE",
        "timeout after BDAT (N bytes)", "lost connection after DATA (17 bytes)"]]


async def stalled_handshake(port: int, starttls: bool, sent: bytes) -> tuple[str, str, float]:
    """A client that starts a TLS handshake (after STARTTLS, or at once on an implicit-TLS port), sends `sent` of it
    and then nothing: what the server sends after that, and how many seconds later it closed the connection
    (smtpd_timeout 1 s, smtpd_starttls_timeout 2 s)."""
    c = await SmtpClient.connect(port, greet=starttls)
    if starttls:
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("STARTTLS")).code == 220
    started = asyncio.get_running_loop().time()
    await c.send(sent)
    rest = await c.rest()
    waited = asyncio.get_running_loop().time() - started
    await c.close()
    return "STARTTLS" if starttls else "implicit", rest.decode("ascii", "replace"), waited


async def stalled_handshakes(port: int, implicit_port: int) -> list[tuple[str, str, float]]:
    return list(await asyncio.gather(*(stalled_handshake(p, p == port, sent)
                                       for p in (port, implicit_port) for sent in (b"", half_client_hello()))))


HANDSHAKE_END = re.compile(r"(SSL_accept error |TLS library problem: |timeout after |lost connection after "
                           r"|disconnect )")


def pf_handshake_ends(maillog: str) -> list[str]:
    lines = [line.split("]: ", 1)[1].removeprefix("warning: ") for line in maillog.splitlines() if "smtpd[" in line]
    return sorted(library_reason(line) for line in lines if HANDSHAKE_END.match(line))


def mf_handshake_ends(caplog) -> list[str]:
    return sorted(library_reason(r.getMessage()) for r in caplog.records if HANDSHAKE_END.match(r.getMessage()))


async def test_a_stalled_tls_handshake_ends_as_with_a_real_postfix(mailflow_server, caplog, pki, users):
    """smtpd_starttls_timeout (2 s) bounds the handshake, not smtpd_timeout (1 s), after STARTTLS and on an
    implicit-TLS (wrapper-mode) port alike; past it the connection is closed without a word (a plaintext 421
    would land in the middle of the client's handshake), `SSL_accept error … Connection timed out` and `lost
    connection after STARTTLS` (CONNECT) are logged, and the failed STARTTLS counts as one (`starttls=0/1`). The
    sessions give back their slots and per-client counts."""
    caplog.set_level(logging.INFO)
    _, cert, ctx = pki
    pf_implicit_port = free_port()
    async with postfix_instance({"myhostname": PF_HOST, "mynetworks": NETWORKS, "smtpd_timeout": "1s",
                                 "smtpd_starttls_timeout": "2s", "smtpd_tls_cert_file": cert,
                                 "smtpd_tls_key_file": cert, "smtpd_tls_security_level": "may"},
                                master_cf=f"127.0.0.1:{pf_implicit_port} inet n - n - - smtpd "
                                          f"-o smtpd_tls_wrappermode=yes\n") as pf:
        mf = await mailflow_server(mynetworks=[NETWORKS], smtpd={
            "timeout": "1s", "starttls_timeout": "2s", "tls_cert_file": cert, "sasl_user_maps": [users],
            "listeners": [{"address": "127.0.0.1:0", "role": "submissions"}],
            "max_sessions": 2, "client_connection_count_limit": 2})  # as many as the stalled sessions of a listener
        port, implicit_port = mf.smtp_addresses[0][1], mf.smtpd.address_of("submissions")[1]

        async def postfix_side() -> tuple[list[tuple[str, str, float]], str]:
            probe = await pf.sessions_ended()
            stalled = await stalled_handshakes(pf.port, pf_implicit_port)
            ended = await pf.sessions_ended()
            return stalled, pf.maillog[probe:ended]

        async def mailflow_side() -> list[tuple[str, str, float]]:
            stalled = await stalled_handshakes(port, implicit_port)
            await sessions_over(mf)
            return stalled

        # each server times its own sessions: the two run at once
        (postfix, pf_log), mailflow = await asyncio.gather(postfix_side(), mailflow_side())
    assert [end[:2] for end in mailflow] == [end[:2] for end in postfix]
    # a timer never fires early; on a loaded machine it fires late, as late on both sides (they run at once):
    # mailflow's close is bounded by Postfix's in the same run (a starttls_timeout 3x too long fails)
    for (way, _, mf_waited), (_, _, pf_waited) in zip(mailflow, postfix):
        assert mf_waited > 1.5 and pf_waited > 1.5, (mailflow, postfix)
        as_prompt_as(mf_waited, pf_waited, f"the close of a stalled handshake ({way})")
    assert mf_handshake_ends(caplog) == pf_handshake_ends(pf_log)
    # their slots and per-client counts were given back: two sessions at once are admitted again, on each listener
    clients = [await SmtpClient.connect(p, tls=ctx if p == implicit_port else None)
               for p in (port, implicit_port) for _ in range(2)]
    for c in clients:
        await leave(c)
    # Postfix's own, so that a change on both sides cannot pass unnoticed
    assert [end[:2] for end in postfix] == [(way, "") for way in ("STARTTLS", "STARTTLS", "implicit", "implicit")]
    assert pf_handshake_ends(pf_log) == sorted(
        [f"SSL_accept error from {LOOPBACK_CLIENT}: Connection timed out"] * 4
        + [f"lost connection after {where} from {LOOPBACK_CLIENT}" for where in ("STARTTLS", "CONNECT") * 2]
        + [f"disconnect from {LOOPBACK_CLIENT} {counts}" for counts in ("ehlo=1 starttls=0/1 commands=1/2",
                                                                         "commands=0/0") * 2])


async def broken_handshake(port: int, sent: bytes, leaves: bool) -> str:
    """After STARTTLS, `sent` in place of a TLS handshake, then (`leaves`) the client closes: what the server sent
    after, until it closed (or reset: the kernel does so when what `sent` leaves is unread)."""
    c = await SmtpClient.connect(port)
    assert (await c.cmd("EHLO client.test")).code == 250
    assert (await c.cmd("STARTTLS")).code == 220
    await c.send(sent)
    if leaves:
        await c.close()
        return "left"
    try:
        rest = await c.rest()
    except ConnectionResetError:
        rest = b""
    await c.close()
    return rest.decode("ascii", "replace")


async def broken_handshakes(port: int) -> list[str]:
    return [await broken_handshake(port, sent, leaves) for sent, leaves in [
        (b"GET / HTTP/1.0\r\n\r\n", False), (half_client_hello(), True), (b"", True)]]


async def test_a_failed_tls_handshake_is_logged_as_by_a_real_postfix(mailflow_server, caplog, pki):
    """`SSL_accept error from host[ip]: -1` and the library's reason (`warning: TLS library problem: …`) for a
    client that does not speak TLS, `…: lost connection` for one that leaves during the handshake or before it;
    then `lost connection after STARTTLS`, and the STARTTLS counts as failed (`starttls=0/1`)."""
    caplog.set_level(logging.INFO)
    _, cert, _ = pki
    async with postfix_instance({"myhostname": PF_HOST, "mynetworks": NETWORKS, "smtpd_tls_cert_file": cert,
                                 "smtpd_tls_key_file": cert, "smtpd_tls_security_level": "may"}) as pf:
        probe = await pf.sessions_ended()
        postfix = await broken_handshakes(pf.port)
        ended = await pf.sessions_ended()
        pf_log = pf.maillog[probe:ended]
    mf = await mailflow_server(mynetworks=[NETWORKS], smtpd={"tls_cert_file": cert})
    mailflow = await broken_handshakes(mf.smtp_addresses[0][1])
    await sessions_over(mf)
    assert mailflow == postfix
    assert mf_handshake_ends(caplog) == pf_handshake_ends(pf_log)
    # Postfix's own, so that a change on both sides cannot pass unnoticed
    assert postfix == ["", "left", "left"]
    assert pf_handshake_ends(pf_log) == sorted(
        [f"SSL_accept error from {LOOPBACK_CLIENT}: {why}" for why in ("-1", "lost connection", "lost connection")]
        + ["TLS library problem: http request"]
        + [f"lost connection after STARTTLS from {LOOPBACK_CLIENT}"] * 3
        + [f"disconnect from {LOOPBACK_CLIENT} ehlo=1 starttls=0/1 commands=1/2"] * 3)


async def milter_edited(port: int) -> list[str]:
    """One session, two messages through the milter: the replies to their end of DATA."""
    client = await SmtpClient.connect(port)
    replies = [(await client.send_message(rcpt="alice@local.test", ehlo=not i)).text for i in range(2)]
    await client.close()
    return [same_host(r.rpartition(" as ")[0] or r) for r in replies]


async def test_milter_edits_past_the_message_size_limit_refuse_the_message_as_postfix_does(mailflow_server,
                                                                                           caplog):
    """Postfix writes a milter's edits into the queue file, which stops at message_size_limit: the message is
    refused as too big, cleanup warns, and the milter's next message in the session is handled as usual."""
    line = b"x" * 998 + b"\r\n"
    big = b"".join(reply(b"b", line * 60) for _ in range(10)) + reply(b"a")  # 600 KB in 60 KB chunks
    small = reply(b"b", b"new body\r\n") + reply(b"a")
    users = "inline:{alice=ok}"
    caplog.set_level(logging.WARNING, logger="mailflow.cleanup")
    answers = itertools.cycle([big, small])  # the first message of each server's session gets the big one
    async with scripted_milter({b"E": lambda session, _: next(answers)}) as milter:
        async with postfix_instance({"myhostname": PF_HOST, "mydestination": "local.test", "relayhost": "[127.0.0.1]:9",
                                     "local_recipient_maps": users, "message_size_limit": "100000",
                                     "smtpd_milters": milter.spec}) as pf:
            postfix = await milter_edited(pf.port)
            await eventually(lambda: "queue file size limit exceeded" in pf.maillog, what="the warning")
        mf = await mailflow_server(local_recipient_maps=[users], relayhost="[127.0.0.1]:9",
                                   smtpd={"milters": [milter.spec], "message_size_limit": 100_000})
        mailflow = await milter_edited(mf.smtp_addresses[0][1])
    assert mailflow == postfix == ["552 5.3.4 Error: message file too big", "250 2.0.0 Ok: queued"]
    assert [r.getMessage().partition(": ")[2] for r in caplog.records if r.name == "mailflow.cleanup"] == [
        "queue file size limit exceeded"]


def starttls_then_gone(port: int, way: str) -> str:
    """(Blocking: run in a thread.) STARTTLS and at once the end of the client's side; the client still reads.
    `way`: "half-close" (after EHLO's reply), "pipelined" (EHLO, an unknown command and STARTTLS in one burst: with
    the error tarpit's sleep the server reads the end of input before it reads STARTTLS). Returns the codes of what
    the server sent after EHLO's reply until it closed. (A client that closes the whole connection at once is not
    compared: whether it is gone before the 220 is written, Postfix's `lost connection`, or gets it unread and
    resets the connection, `Connection reset by peer`, is a race.)"""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, raw.makefile("rb") as replies:
        replies.readline()  # the greeting
        if way == "pipelined":
            raw.sendall(b"EHLO client.test\r\nNOT-A-COMMAND\r\nSTARTTLS\r\n")
        else:
            raw.sendall(b"EHLO client.test\r\n")
        while replies.readline()[3:4] == b"-":  # EHLO's reply
            pass
        if way != "pipelined":
            raw.sendall(b"STARTTLS\r\n")
        raw.shutdown(socket.SHUT_WR)
        return "".join(line[:9] + "\n" for line in replies.read().decode("ascii", "replace").splitlines())


WAYS = ("half-close", "pipelined")


async def starttls_then_gone_each_way(port: int) -> list[str]:
    return [await asyncio.to_thread(starttls_then_gone, port, way) for way in WAYS]


async def test_starttls_then_the_end_of_input_is_answered_and_logged_as_by_a_real_postfix(mailflow_server, caplog,
                                                                                         pki):
    """A client that sends STARTTLS and at once ends its input still gets `220 2.0.0 Ready to start TLS`, also when
    the server has read that end before it reads the STARTTLS (a pipelined burst behind the error tarpit's
    sleep); the handshake that cannot follow is logged as one the client abandoned (`SSL_accept error from
    host[ip]: lost connection`, `lost connection after STARTTLS`), and the STARTTLS counts as failed."""
    caplog.set_level(logging.INFO)
    _, cert, _ = pki
    async with postfix_instance({"myhostname": PF_HOST, "mynetworks": NETWORKS, "smtpd_tls_cert_file": cert,
                                 "smtpd_tls_key_file": cert, "smtpd_tls_security_level": "may",
                                 "smtpd_soft_error_limit": "1", "smtpd_error_sleep_time": "1s"}) as pf:
        mf = await mailflow_server(mynetworks=[NETWORKS], smtpd={"tls_cert_file": cert,
                                                                 "forbid_unauth_pipelining": False,
                                                                 "soft_error_limit": 1, "error_sleep_time": "1s"})

        async def postfix_side() -> tuple[list[str], str]:
            probe = await pf.sessions_ended()
            replies = await starttls_then_gone_each_way(pf.port)
            ended = await pf.sessions_ended()
            return replies, pf.maillog[probe:ended]

        async def mailflow_side() -> list[str]:
            replies = await starttls_then_gone_each_way(mf.smtp_addresses[0][1])
            await sessions_over(mf)
            return replies

        # the clients run in threads, one server each: the two run at once
        (postfix, pf_log), mailflow = await asyncio.gather(postfix_side(), mailflow_side())
    assert mailflow == postfix
    assert mf_handshake_ends(caplog) == pf_handshake_ends(pf_log)
    # Postfix's own, so that a change on both sides cannot pass unnoticed
    assert postfix == ["220 2.0.0\n", "500 5.5.2\n220 2.0.0\n"]
    assert pf_handshake_ends(pf_log) == sorted(
        [f"SSL_accept error from {LOOPBACK_CLIENT}: lost connection"] * 2
        + [f"lost connection after STARTTLS from {LOOPBACK_CLIENT}"] * 2
        + [f"disconnect from {LOOPBACK_CLIENT} ehlo=1 starttls=0/1 commands=1/2"]
        + [f"disconnect from {LOOPBACK_CLIENT} ehlo=1 starttls=0/1 unknown=0/1 commands=1/3"])


async def refused_over_tls(port: int, ctx: ssl.SSLContext) -> list[str]:
    """Connection count limit 1 on an implicit-TLS port: a first TLS session is held while a second one makes its
    handshake; that one's first reply over TLS (hosts normalised), and whether the server then closed."""
    first = await SmtpClient.connect(port, tls=ctx)
    second = await SmtpClient.connect(port, tls=ctx, greet=False)
    reply = await second.reply()
    closed = await second.closed()
    await second.close()
    await leave(first)
    return [same_host(reply.text), "closed" if closed else "open"]


REFUSAL_LINE = re.compile(r"(connect from|disconnect from|Anonymous TLS connection established|.* limit exceeded)")


def refusal_lines(lines) -> list[str]:
    """The lines of the sessions (connections, TLS, anvil), in order: the cipher details after the bits and the
    service a warning names (a master.cf service is named by its address) cut."""
    return [re.sub(r" for service \S+$", "", re.sub(r"(bits\)).*", r"\1", line)) for line in lines
            if REFUSAL_LINE.match(line)]


async def test_a_connection_limit_on_an_implicit_tls_port_refuses_over_tls_as_a_real_postfix(mailflow_server, caplog,
                                                                                            pki, users):
    """Postfix's wrapper mode completes the TLS handshake before its anvil check: the 421 of a client past its
    connection count comes over TLS (written before the handshake it would be garbage to a TLS client), and the
    warning is logged after the TLS line."""
    caplog.set_level(logging.INFO)
    _, cert, ctx = pki
    implicit_port = free_port()
    async with postfix_instance({"myhostname": PF_HOST, "mynetworks": NETWORKS, "smtpd_tls_cert_file": cert,
                                 "smtpd_tls_key_file": cert, "smtpd_tls_loglevel": "1"},  # (mailflow's TLS lines)
                                master_cf=f"127.0.0.1:{implicit_port} inet n - n - - smtpd -o smtpd_tls_wrappermode=yes"
                                          f" -o smtpd_client_connection_count_limit=1\n") as pf:
        probe = await pf.sessions_ended()
        postfix = await refused_over_tls(implicit_port, ctx)
        ended = await pf.sessions_ended()
        pf_log = [line.split("]: ", 1)[1].removeprefix("warning: ") for line in pf.maillog[probe:ended].splitlines()
                  if "smtpd[" in line]
    mf = await mailflow_server(mynetworks=[NETWORKS], smtpd={
        "tls_cert_file": cert, "sasl_user_maps": [users], "tls_loglevel": 1,
        "listeners": [{"address": "127.0.0.1:0", "role": "submissions",
                       "overrides": {"client_connection_count_limit": 1}}]})
    mailflow = await refused_over_tls(mf.smtpd.address_of("submissions")[1], ctx)
    await sessions_over(mf)
    assert mailflow == postfix
    assert refusal_lines(r.getMessage() for r in caplog.records if r.name == "mailflow.smtpd") == refusal_lines(pf_log)
    # Postfix's own, so that a change on both sides cannot pass unnoticed
    assert postfix == ["421 4.7.0 HOST Error: too many connections from 127.0.0.1", "closed"]
    tls = "Anonymous TLS connection established from " + LOOPBACK_CLIENT
    assert [line.partition(":")[0] if line.startswith(tls) else line for line in refusal_lines(pf_log)] == [
        f"connect from {LOOPBACK_CLIENT}", tls, f"connect from {LOOPBACK_CLIENT}", tls,
        f"Connection concurrency limit exceeded: 2 from {LOOPBACK_CLIENT}",
        f"disconnect from {LOOPBACK_CLIENT} commands=0/0",
        f"disconnect from {LOOPBACK_CLIENT} quit=1 commands=1"]


# junk commands: HELO, EHLO, NOOP, VRFY, RSET, ETRN count, in a transaction too; past the junk limit each is an error
JUNK_PF = {"smtpd_junk_command_limit": "2", "smtpd_hard_error_limit": "3", "smtpd_soft_error_limit": "10",
           "smtpd_error_sleep_time": "0", "disable_vrfy_command": "yes"}
JUNK_MF = {"junk_command_limit": 2, "hard_error_limit": 3, "soft_error_limit": 10, "error_sleep_time": "0s",
           "disable_vrfy_command": True}
JUNK_DIALOGUE = ["EHLO client.test", "NOOP", "MAIL FROM:<s@remote.test>", "NOOP", "RSET", "HELO client.test",
                 "VRFY alice", "NOOP", "NOOP", "NOOP"]


async def junk_replies(port: int) -> list[str]:
    """Each command of JUNK_DIALOGUE and its reply's first line (host normalised), until the server closes."""
    c = await SmtpClient.connect(port)
    seen = []
    for line in JUNK_DIALOGUE:
        reply = await c.cmd(line)
        seen.append(f"{line} -> {same_host(reply.text.splitlines()[0]) if reply.text else 'closed'}")
        if reply.code in (None, 421):  # (the server closes: Postfix's close may reach the client as a reset)
            await c.close()
            return seen
    await leave(c)
    return seen


async def test_junk_commands_count_as_postfix_counts_them(mailflow_server):
    async with postfix_instance({"myhostname": PF_HOST, "mynetworks": NETWORKS, **JUNK_PF}) as pf:
        postfix = await junk_replies(pf.port)
    mf = await mailflow_server(mynetworks=[NETWORKS], smtpd=JUNK_MF)
    mailflow = await junk_replies(mf.smtp_addresses[0][1])
    assert mailflow == postfix
    assert postfix[-1] == "NOOP -> 421 4.7.0 HOST Error: too many errors"


async def errors_then_a_big_message(port: int) -> list[str]:
    """hard_error_limit 2: a refused RCPT, then a message past message_size_limit; each reply's first line (host
    normalised) until the server closes."""
    c = await SmtpClient.connect(port)
    seen = []
    for line in ["EHLO client.test", "MAIL FROM:<s@remote.test>", "RCPT TO:<nobody@local.test>",
                 "RCPT TO:<alice@local.test>", "DATA"]:
        seen.append(f"{line} -> {same_host((await c.cmd(line)).text.splitlines()[0])}")
    await c.send(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n.\r\n")
    seen.append(f"message -> {(await c.reply()).text.splitlines()[0]}")
    reply = await c.cmd("NOOP")
    seen.append(f"NOOP -> {same_host(reply.text.splitlines()[0]) if reply.text else 'closed'}")
    await c.close()
    return seen


async def test_too_many_errors_after_a_message_is_logged_after_end_of_message_as_by_postfix(mailflow_server, caplog):
    """Postfix sets state->where to END-OF-MESSAGE once a message's end was read: the session ending at
    hard_error_limit there logs `too many errors after END-OF-MESSAGE` (mailflow said `after DATA`)."""
    caplog.set_level(logging.INFO)
    async with postfix_instance({"myhostname": PF_HOST, "mynetworks": NETWORKS, "mydestination": "local.test",
                                 "local_recipient_maps": "inline:{alice=ok}", "message_size_limit": "60",
                                 "smtpd_hard_error_limit": "2", "smtpd_error_sleep_time": "0"}) as pf:
        postfix = await errors_then_a_big_message(pf.port)
        await eventually(lambda: "too many errors" in pf.maillog, what="Postfix's too many errors line")
        pf_said = [line.split("]: ", 1)[1] for line in pf.maillog.splitlines() if "too many errors after" in line]
    mf = await mailflow_server(mynetworks=[NETWORKS], local_recipient_maps=["inline:{alice=ok}"],
                               smtpd={"hard_error_limit": 2, "error_sleep_time": "0s", "message_size_limit": 60})
    mailflow = await errors_then_a_big_message(mf.smtp_addresses[0][1])
    await sessions_over(mf)
    mf_said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("too many errors after")]
    assert mailflow == postfix
    assert mf_said == pf_said == [f"too many errors after END-OF-MESSAGE from {LOOPBACK_CLIENT}"]
