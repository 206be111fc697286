"""Differential test of the commands outside a mail transaction that run restriction lists: ETRN (Postfix's
smtpd_check_etrn: the client and helo lists, with smtpd_delay_reject = yes, then smtpd_etrn_restrictions) and
VRFY (disable_vrfy_command off: smtpd_check_rcpt, the lists and the recipient tables of RCPT), with either
delay_reject setting, against a private Postfix 3.7 configured alike: the same sessions, the replies
compared word for word (a greeting, an EHLO or an XCLIENT reply by its code; an enhanced status code that
Postfix's reply lacks is not compared: mailflow gives every reply one, docs/security.md), the reject and warn log
lines, and each session's disconnect line with its command counts.

One access table answers for clients (192.0.2.N through XCLIENT; 192.0.2.50 is outside mynetworks), HELO names,
senders and recipients; the etrn list asks another for the sites.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from tests.support import postfix_instance, script_dir, sessions_over
from tests.support.sessions import (POSTFIX_BASE, disconnects, replay_sessions, replayed, restriction_settings,
                                    xclient)

pytestmark = pytest.mark.interop

ACCESS = """\
127.0.0.2 REJECT
192.0.2.1 REJECT
192.0.2.2 DEFER_IF_PERMIT client maybe
192.0.2.3 HOLD client hold
192.0.2.6 DEFER_IF_REJECT client dir
192.0.2.8 WARN client warn
bad.helo REJECT bad helo
bad@s.test REJECT bad sender
r@relay.test REJECT rcpt no
"""
SITES = """\
refused.test REJECT no flush for you
later.test DEFER_IF_PERMIT etrn maybe
"""
EHLO = "EHLO client.test"
ETRN = "ETRN relay.test"
SESSIONS = {
    "a site of relay_domains, another, a bad one, in a transaction": [
        EHLO, ETRN, "ETRN other.test", "ETRN #relay.test", "ETRN bad..site", "ETRN", "MAIL FROM:<a@s.test>", ETRN,
        "QUIT"],
    "no HELO": [ETRN, "QUIT"],
    "client refused": [EHLO, ETRN, "QUIT"],
    "client refused after XCLIENT": [xclient(1), EHLO, ETRN, "QUIT"],
    "client DEFER_IF_PERMIT": [xclient(2), EHLO, ETRN, "ETRN other.test", "QUIT"],
    "client DEFER_IF_REJECT, the etrn list rejects": [xclient(6), EHLO, "ETRN refused.test", "QUIT"],
    "client HOLD": [xclient(3), EHLO, ETRN, "QUIT"],
    "client WARN": [xclient(8), EHLO, ETRN, "QUIT"],
    "helo refused": ["EHLO bad.helo", ETRN, "QUIT"],
    "the etrn list": [EHLO, "ETRN refused.test", "ETRN @sub.refused.test", "ETRN later.test", ETRN, "QUIT"],
    "VRFY from mynetworks": [
        EHLO, "VRFY", "VRFY SMTPUTF8", "VRFY alice@local.test", "VRFY <alice@local.test>", "VRFY  alice",
        "VRFY nobody@local.test", "VRFY x@elsewhere.test", "VRFY r@relay.test", "VRFY a@relay.test SMTPUTF8",
        "VRFY Joe <a@relay.test>", "VRFY postmaster", "VRFY <a b@relay.test>", "VRFY <a@relay.test> x", "VRFY <>",
        "VRFY a@", "VRFY a@bad..test", "VRFY -user@local.test", "VRFY @hop.test:a@relay.test", "VRFY a@relay.test.",
        "QUIT"],
    "VRFY from elsewhere": [
        xclient(50), EHLO, "VRFY x@elsewhere.test", "VRFY Joe <x@elsewhere.test>", "VRFY nobody@local.test",
        "VRFY alice@local.test", "VRFY alice", "VRFY postmaster", "VRFY postmaster@local.test", "QUIT"],
    "VRFY in a transaction": [xclient(50), EHLO, "MAIL FROM:<bad@s.test>", "VRFY a@relay.test", "RSET",
                              "MAIL FROM:<a@s.test>", "VRFY a@relay.test", "VRFY r@relay.test", "QUIT"],
    "VRFY, client refused": [EHLO, "VRFY a@relay.test", "QUIT"],
    "VRFY, client DEFER_IF_PERMIT": [xclient(2), EHLO, "VRFY a@relay.test", "VRFY r@relay.test", "QUIT"],
    "VRFY, client WARN": [xclient(8), EHLO, "VRFY a@relay.test", "QUIT"],
    "VRFY, client HOLD": [xclient(3), EHLO, "VRFY a@relay.test", "QUIT"],
    "VRFY, helo refused": ["EHLO bad.helo", "VRFY a@relay.test", "QUIT"],
}
SOURCES = {"client refused": "127.0.0.2", "VRFY, client refused": "127.0.0.2"}  # else 127.0.0.1


def postfix_settings(folder: Path) -> dict[str, str]:
    access = f"texthash:{folder}/access"
    return {
        "smtpd_client_restrictions": f"check_client_access {access}",
        "smtpd_helo_restrictions": f"check_helo_access {access}",
        "smtpd_sender_restrictions": f"check_sender_access {access}",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "smtpd_recipient_restrictions": f"check_recipient_access {access}",
        "smtpd_etrn_restrictions": f"check_etrn_access texthash:{folder}/sites",
    }


async def replay(port: int) -> dict[str, list[tuple[str, str]]]:
    """Each session's (command, reply as `shown`), the first the greeting."""
    return {name: [(command, shown(command, reply)) for command, reply in pairs]
            for name, pairs in (await replay_sessions(port, SESSIONS, SOURCES)).items()}


def shown(command: str, reply) -> str:
    if reply is None or reply.code is None:
        return "closed"
    if reply.code in (220, 250) and (not command or command.startswith(("EHLO", "HELO", "XCLIENT"))):
        return str(reply.code)  # the banner and the keywords differ
    return reply.text


DSN = re.compile(r"(\d{3} )[245]\.\d{1,3}\.\d{1,3} ")


def same(postfix: str, mailflow: str) -> bool:
    """The same reply; one of Postfix's without an enhanced status code is compared without mailflow's."""
    return postfix == mailflow or (not DSN.match(postfix) and DSN.sub(r"\1", mailflow, count=1) == postfix)


def differences(postfix: dict, mailflow: dict) -> list[str]:
    """`session: command -> postfix's reply | mailflow's` for each reply that differs."""
    return [f"{name}: {a[0]} -> {a[1]} | {b[1]}" for name in SESSIONS
            for a, b in zip(postfix[name], mailflow[name] + [("", "")] * len(postfix[name])) if not same(a[1], b[1])]


LOGGED = re.compile(r"(?:.*/smtpd\[\d+\]: )?(?:warning: )?((?:NOQUEUE: (?:reject|warn): |reject: ETRN |Illegal "
                    r"address syntax ).*)")


def logged(lines) -> list[str]:
    """The reject and warn lines (`NOQUEUE: reject: ETRN from ...`, `reject: ETRN site... from ...`, `Illegal
    address syntax from ... in VRFY command: ...`), without syslog's prefix."""
    found = (LOGGED.fullmatch(line) for line in lines)
    return [m[1] for m in found if m]


def skips(lines) -> list[str]:
    """Postfix's warnings of a skipped access action (`access table …: action HOLD is unavailable in …`), the
    parameters it names called as mailflow calls them."""
    found = [line.split(": warning: ", 1)[1] for line in lines if ": warning: access table " in line]
    return [line.replace("smtpd_delay_reject=no", "delay_reject = false").replace("smtpd_etrn_", "etrn_")
            for line in found]


@pytest.mark.parametrize("delay", ["yes", "no"])
async def test_etrn_and_vrfy_run_the_lists_postfix_runs(delay, mailflow_server, caplog):
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    with script_dir() as tables:  # (a folder the postfix user can read, removed afterwards)
        folder = tables.path
        (folder / "access").write_text(ACCESS)
        (folder / "sites").write_text(SITES)
        lists = postfix_settings(folder)
        async with postfix_instance({
            **POSTFIX_BASE, "local_recipient_maps": "inline:{alice=ok}", "disable_vrfy_command": "no",
            "smtputf8_enable": "yes", "smtpd_delay_reject": delay, **lists,
        }) as pf:
            postfix, lines = await replayed(pf, replay)
            postfix_log, postfix_disconnects, postfix_skips = logged(lines), disconnects(lines), skips(lines)
        mf = await mailflow_server(myhostname="pf.test", mydestination=["local.test"], relay_domains=["relay.test"],
                                   relayhost="[127.0.0.1]:9", mynetworks=["127.0.0.0/8"],
                                   local_recipient_maps=["inline:{alice=ok}"], smtpd={
            "authorized_xclient_hosts": ["127.0.0.0/8"], "error_sleep_time": "0s", "delay_reject": delay == "yes",
            "disable_vrfy_command": False, **restriction_settings(lists)})
        mailflow = await replay(mf.smtp_addresses[0][1])
        await sessions_over(mf)

    diffs = differences(postfix, mailflow)
    assert not diffs, "\n".join(diffs)
    messages = [r.getMessage() for r in caplog.records]
    assert logged(messages) == postfix_log
    assert disconnects(messages) == postfix_disconnects
    # an action that marks a message, met where there is none (ETRN; before MAIL), is skipped with Postfix's
    # warning, whatever delay_reject says (VRFY outside a transaction with delay_reject true: the same words)
    assert [m for m in messages if m.startswith("access table ")] == postfix_skips
