"""Differential test of when the client, helo and sender restriction lists run (Postfix's smtpd_delay_reject,
mailflow's delay_reject: at RCPT, or at connect and XCLIENT, HELO/EHLO and MAIL), with either setting, against a
private Postfix 3.7 configured alike: the same sessions, the replies compared word for word (a
greeting or an EHLO reply by its code: the banners and keywords differ) and the reject, warn and hold log
lines too, and each session's disconnect line with its command counts (XCLIENT among them).

The lists ask one access table for clients (192.0.2.N through XCLIENT), HELO names, senders and recipients,
and the client list holds restrictions that need what a client has not said yet at connect (a recipient, a
sender, a HELO name), so that what each of them does when it runs early is seen too. The messages put on hold
are counted on both sides (a HOLD met before MAIL is skipped when the lists run early).
"""
from __future__ import annotations

import logging
import re
import sqlite3
from pathlib import Path

import pytest

from tests.support import postfix_instance, script_dir, sessions_over
from tests.support.sessions import (POSTFIX_BASE, disconnects, replay_sessions, replayed, restriction_settings,
                                    xclient)

pytestmark = pytest.mark.interop

ACCESS = """\
127.0.0.2 REJECT
127.0.0.3 421 go away
192.0.2.1 REJECT
192.0.2.2 DEFER_IF_PERMIT client maybe
192.0.2.3 HOLD client hold
192.0.2.5 450 later
192.0.2.6 DEFER_IF_REJECT client dir
192.0.2.7 OK
192.0.2.8 WARN client warn
192.0.2.9 521 bye
bad.helo REJECT bad helo
dip.helo DEFER_IF_PERMIT helo maybe
hold.helo HOLD helo hold
dir.helo DEFER_IF_REJECT helo dir
bad@s.test REJECT bad sender
dip@s.test DEFER_IF_PERMIT sender maybe
hold@s.test HOLD sender hold
dir@s.test DEFER_IF_REJECT sender dir
r@relay.test REJECT rcpt no
"""
EARLY = "early@s.test REJECT sender in the client list\n"  # check_sender_access in the client list


EHLO, MAIL, RCPT = "EHLO client.test", "MAIL FROM:<a@s.test>", "RCPT TO:<a@relay.test>"
REFUSED_RCPT = "RCPT TO:<r@relay.test>"
MESSAGE = "Subject: hold?\r\n\r\nbody\r\n."  # after DATA
SESSIONS = {
    "connect refused": [EHLO, MAIL, RCPT, "STARTTLS", "NOOP", "QUIT"],
    "connect refused with 421": [EHLO, "QUIT"],
    "client refused": [xclient(1), EHLO, MAIL, RCPT, "NOOP", "FOO", xclient(7), "QUIT"],
    "client deferred": [xclient(5), EHLO, MAIL, RCPT, "QUIT"],
    "client 521": [xclient(9), EHLO],
    "client refused, to the error limit": [xclient(1), *["NOOP"] * 21],
    "client DEFER_IF_PERMIT": [xclient(2), EHLO, MAIL, RCPT, REFUSED_RCPT, "QUIT"],
    "client DEFER_IF_REJECT, a later list rejects": [xclient(6), EHLO, MAIL, REFUSED_RCPT, "QUIT"],
    "client HOLD": [xclient(3), EHLO, MAIL, RCPT, "DATA", MESSAGE, "QUIT"],
    "client WARN": [xclient(8), EHLO, MAIL, RCPT, "QUIT"],
    "client OK, the helo list still runs": [xclient(7), "EHLO bad.helo", MAIL, RCPT, "QUIT"],
    "helo refused": ["EHLO bad.helo", MAIL, RCPT, "HELO bad.helo", "EHLO client.test", MAIL, RCPT, "QUIT"],
    "helo refused inside a transaction": [EHLO, MAIL, "EHLO bad.helo", RCPT, "QUIT"],
    "helo DEFER_IF_PERMIT, then a good one": ["EHLO dip.helo", MAIL, RCPT, "RSET", EHLO, MAIL, RCPT, "QUIT"],
    "helo DEFER_IF_REJECT, a later list rejects": ["EHLO dir.helo", MAIL, REFUSED_RCPT, "QUIT"],
    "helo DEFER_IF_PERMIT, then XCLIENT": ["EHLO dip.helo", xclient(7), MAIL, RCPT, "QUIT"],
    "helo HOLD": ["EHLO hold.helo", MAIL, RCPT, "DATA", MESSAGE, "QUIT"],
    "sender refused, then another": [EHLO, "MAIL FROM:<bad@s.test>", RCPT, MAIL, RCPT, "QUIT"],
    "sender DEFER_IF_PERMIT, then another": [EHLO, "MAIL FROM:<dip@s.test>", RCPT, "RSET", MAIL, RCPT, "QUIT"],
    "sender DEFER_IF_REJECT, a later list rejects": [EHLO, "MAIL FROM:<dir@s.test>", REFUSED_RCPT, "QUIT"],
    "sender HOLD": [EHLO, "MAIL FROM:<hold@s.test>", RCPT, "DATA", MESSAGE, "QUIT"],
    "no HELO": [MAIL, RCPT, "QUIT"],
    "reject_unauth_destination in the client list": [EHLO, MAIL, "RCPT TO:<x@elsewhere.test>", "QUIT"],
    "check_sender_access in the client list": [EHLO, "MAIL FROM:<early@s.test>", RCPT, "QUIT"],
    "reject_non_fqdn_helo_hostname in the client list": ["EHLO nodot", MAIL, RCPT, "QUIT"],
}
SOURCES = {"connect refused": "127.0.0.2", "connect refused with 421": "127.0.0.3"}  # else 127.0.0.1


def postfix_settings(folder: Path) -> dict[str, str]:
    access, early = f"texthash:{folder}/access", f"texthash:{folder}/early"
    return {
        "smtpd_client_restrictions": f"check_client_access {access}, reject_unauth_destination, "
                                     f"reject_non_fqdn_helo_hostname, check_sender_access {early}",
        "smtpd_helo_restrictions": f"check_helo_access {access}",
        "smtpd_sender_restrictions": f"check_sender_access {access}",
        "smtpd_recipient_restrictions": f"check_recipient_access {access}",
    }


async def replay(port: int) -> dict[str, list[str]]:
    """Each session's replies, the first the greeting (or what comes in its place), as `shown`."""
    return {name: [shown(command, reply) for command, reply in pairs]
            for name, pairs in (await replay_sessions(port, SESSIONS, SOURCES)).items()}


def shown(command: str, reply) -> str:
    if reply is None or reply.code is None:
        return f"{command} -> closed"
    if reply.code in (220, 250) and (not command or command.startswith(("EHLO", "HELO", "XCLIENT"))):
        return f"{command} -> {reply.code}"  # the banner and the keywords differ
    if command == MESSAGE and reply.code == 250:
        return "message -> 250 queued"
    return f"{command} -> {reply.text}"


def differences(postfix: dict[str, list[str]], mailflow: dict[str, list[str]]) -> list[str]:
    """`session: postfix's reply | mailflow's` for each reply that differs."""
    return [f"{name}: {a} | {b}" for name in SESSIONS
            for a, b in zip(postfix[name], mailflow[name] + [""] * len(postfix[name])) if a != b]


def postfix_held(pf) -> int:
    return sum(message["queue_name"] == "hold" for message in pf.listed())


def mailflow_held(db: Path) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute("SELECT count(*) FROM message WHERE queue = 'hold'").fetchone()[0]
    finally:
        con.close()


LOGGED = re.compile(r"(?:.*/smtpd\[\d+\]: )?(NOQUEUE|[0-9A-F]+): ((?:reject|warn|hold): .*)")


def logged(lines) -> list[str]:
    """The reject, warn and hold lines (`NOQUEUE: reject: RCPT from ...`), without syslog's prefix, a queue id
    as `QID`."""
    found = (LOGGED.fullmatch(line) for line in lines)
    return [f"{'NOQUEUE' if m[1] == 'NOQUEUE' else 'QID'}: {m[2]}" for m in found if m]


@pytest.mark.parametrize("delay", ["yes", "no"])
async def test_lists_run_when_postfix_runs_them(delay, mailflow_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    with script_dir() as tables:  # (a folder the postfix user can read, removed afterwards)
        folder = tables.path
        (folder / "access").write_text(ACCESS)
        (folder / "early").write_text(EARLY)
        lists = postfix_settings(folder)
        async with postfix_instance({
            **POSTFIX_BASE, "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_delay_reject": delay, **lists,
        }) as pf:
            postfix, lines = await replayed(pf, replay)
            postfix_log, postfix_disconnects = logged(lines), disconnects(lines)
            held = postfix_held(pf)
        mf = await mailflow_server(myhostname="pf.test", mydestination=["local.test"], relayhost="[127.0.0.1]:9",
                                   mynetworks=["127.0.0.0/8"], smtpd={
            "authorized_xclient_hosts": ["127.0.0.0/8"], "error_sleep_time": "0s", "delay_reject": delay == "yes",
            "relay_restrictions": ["permit_mynetworks", "reject_unauth_destination"], **restriction_settings(lists)})
        mailflow = await replay(mf.smtp_addresses[0][1])
        await sessions_over(mf)

    diffs = differences(postfix, mailflow)
    assert not diffs, "\n".join(diffs)
    assert logged(r.getMessage() for r in caplog.records) == postfix_log
    assert disconnects(r.getMessage() for r in caplog.records) == postfix_disconnects
    assert mailflow_held(tmp_path / "queue" / "queue.db") == held
    # what Postfix did, so that the same mistake on both sides cannot pass unnoticed: a DEFER_IF_REJECT holds
    # within its own list only (smtpd_check.c resets it at each stage), a DEFER_IF_PERMIT to the RCPT
    assert postfix["client DEFER_IF_REJECT, a later list rejects"][4] == \
        "RCPT TO:<r@relay.test> -> 554 5.7.1 <r@relay.test>: Recipient address rejected: rcpt no"
    assert postfix["client DEFER_IF_PERMIT"][4] == \
        "RCPT TO:<a@relay.test> -> 450 4.7.1 <unknown[192.0.2.2]>: Client host rejected: client maybe"
    skipped = [r.getMessage() for r in caplog.records if "is always skipped" in r.getMessage()]
    if delay == "yes":
        assert postfix["connect refused"][:2] == [" -> 220", "EHLO client.test -> 250"]
        assert postfix["helo refused"][3] == \
            "RCPT TO:<a@relay.test> -> 554 5.7.1 <bad.helo>: Helo command rejected: bad helo"
        assert held == 3 and skipped == []
        return
    assert postfix["connect refused"][:3] == [
        " -> 554 5.7.1 <unknown[127.0.0.2]>: Client host rejected: Access denied",
        "EHLO client.test -> 503 5.7.0 Error: access denied for unknown[127.0.0.2]",
        "MAIL FROM:<a@s.test> -> 503 5.7.0 Error: access denied for unknown[127.0.0.2]"]
    assert postfix["connect refused"][-1] == "QUIT -> 221 2.0.0 Bye"
    assert postfix["connect refused with 421"][-1] == "EHLO client.test -> closed"
    assert postfix["client refused, to the error limit"][-2:] == [
        "NOOP -> 421 4.7.0 pf.test Error: too many errors", "NOOP -> closed"]
    assert postfix["helo refused inside a transaction"][3:5] == [
        "EHLO bad.helo -> 554 5.7.1 <bad.helo>: Helo command rejected: bad helo",
        "RCPT TO:<a@relay.test> -> 250 2.1.5 Ok"]  # the refused EHLO left the transaction as it was
    assert postfix["sender refused, then another"][3] == "RCPT TO:<a@relay.test> -> 503 5.5.1 Error: need MAIL command"
    assert postfix["reject_unauth_destination in the client list"][3] == "RCPT TO:<x@elsewhere.test> -> 250 2.1.5 Ok"
    assert "NOQUEUE: warn: XCLIENT from unknown[192.0.2.8]: client warn; proto=SMTP" in postfix_log
    # XCLIENT forgets the HELO name (smtpd.c's helo_reset) but not its DEFER_IF_PERMIT (defer_if_permit_helo)
    assert postfix["helo DEFER_IF_PERMIT, then XCLIENT"][4] == \
        "RCPT TO:<a@relay.test> -> 450 4.7.1 <dip.helo>: Helo command rejected: helo maybe"
    assert held == 1  # the sender list's HOLD; the client and helo lists' are skipped (and logged)
    assert len(skipped) == 2
    assert "action HOLD is always skipped in Client host or Helo command restrictions" in skipped[0]
