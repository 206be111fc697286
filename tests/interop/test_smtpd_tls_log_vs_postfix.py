"""Differential test of smtpd's TLS summary line: a private Postfix and mailflow, each with services (master.cf
lines with `-o`; mailflow's listeners with overrides) at smtpd_tls_loglevel 0 (the default) and 1, for STARTTLS
and implicit TLS (wrapper mode; mailflow's submissions listener). Compared: every smtpd line of a session that
goes well, in order. At 0 there is no TLS line; at 1 tls_misc.c's `Anonymous TLS connection established from
host[ip]: TLSv1.3 with cipher … (256/256 bits)`, compared up to its bits (Postfix 3.7.11 goes on with
` key-exchange X25519 server-signature … server-digest SHA256`, which Python's ssl module does not tell).

Failed handshakes, which both log at any level, are compared in tests/interop/test_limits_vs_postfix.py.
"""
from __future__ import annotations

import logging
import re
import ssl

import pytest

from tests.support import LOOPBACK_CLIENT, SmtpClient, free_port, postfix_instance, sessions_over

pytestmark = pytest.mark.interop

# (implicit TLS, smtpd_tls_loglevel) of each service, in the order the sessions run
SERVICES = [(False, 0), (False, 1), (True, 0), (True, 1)]
SUMMARY_TAIL = re.compile(r"(bits\)).*")


async def tls_session(port: int, ctx: ssl.SSLContext, implicit: bool) -> None:
    """A session that goes well: EHLO, STARTTLS, EHLO, QUIT (implicit TLS: EHLO, QUIT)."""
    c = await SmtpClient.connect(port, tls=ctx if implicit else None)
    assert (await c.cmd("EHLO client.test")).code == 250
    if not implicit:
        await c.starttls(ctx)
        assert (await c.cmd("EHLO client.test")).code == 250
    assert (await c.cmd("QUIT")).code == 221
    await c.close()


def compared(sessions: list[list[str]]) -> list[list[str]]:
    """The lines of each session, the summary cut after its bits."""
    return [[SUMMARY_TAIL.sub(r"\1", line) for line in lines] for lines in sessions]


async def postfix_sessions(cert: str, ctx: ssl.SSLContext) -> list[list[str]]:
    """Each service's smtpd lines for one session, the main port's at the default level."""
    ports = [free_port() for _ in SERVICES[1:]]
    options = [" -o smtpd_tls_wrappermode=yes" * implicit + f" -o smtpd_tls_loglevel={level}" * bool(level)
               for implicit, level in SERVICES[1:]]
    async with postfix_instance({"myhostname": "pf.test", "smtpd_tls_cert_file": cert, "smtpd_tls_key_file": cert,
                                 "smtpd_tls_security_level": "may"},
                                master_cf="".join(f"127.0.0.1:{port} inet n - n - - smtpd{option}\n"
                                                  for port, option in zip(ports, options))) as pf:
        sessions = []
        for port, (implicit, _) in zip([pf.port, *ports], SERVICES):
            start = await pf.sessions_ended()
            await tls_session(port, ctx, implicit)
            text = await pf.logged("disconnect from", since=start)
            sessions.append([line.split("]: ", 1)[1] for line in text.splitlines() if "/smtpd[" in line])
        return sessions


async def mailflow_sessions(mailflow_server, cert: str, users: str, ctx: ssl.SSLContext, caplog) -> list[list[str]]:
    """The same through mailflow: the default listener at level 0, then listeners with overrides."""
    listeners = [{"address": "127.0.0.1:0", "role": "submissions" if implicit else "mta",
                  "overrides": {"tls_loglevel": level}} for implicit, level in SERVICES[1:]]
    mf = await mailflow_server(smtpd={"tls_cert_file": cert, "sasl_user_maps": [users], "listeners": listeners})
    sessions = []
    for (_, port), (implicit, _) in zip(mf.smtp_addresses, SERVICES):
        start = len(caplog.records)
        await tls_session(port, ctx, implicit)
        await sessions_over(mf)
        sessions.append([r.getMessage() for r in caplog.records[start:] if r.name == "mailflow.smtpd"])
    return sessions


async def test_the_tls_summary_line_follows_smtpd_tls_loglevel_as_postfix_s(mailflow_server, pki, users, caplog):
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    _, cert, ctx = pki
    postfix = await postfix_sessions(cert, ctx)
    mailflow = await mailflow_sessions(mailflow_server, cert, users, ctx, caplog)
    assert compared(mailflow) == compared(postfix)
    # Postfix's own, so that a change on both sides cannot pass unnoticed
    summary = f"Anonymous TLS connection established from {LOOPBACK_CLIENT}: TLSv1.3 with cipher "
    assert [[line.startswith(summary) for line in session] for session in postfix] == [
        [False, False], [False, True, False], [False, False], [False, True, False]]
