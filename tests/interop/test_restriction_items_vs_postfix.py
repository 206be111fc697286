"""Differential test of the restriction items a Postfix main.cf names that need no DNS, against a private Postfix
3.7 with Dovecot SASL and mailflow asking the same Dovecot, both configured alike: warn_if_reject,
reject_unauth_pipelining, reject_multi_recipient_bounce (at RCPT and in data_restrictions, at DATA),
reject_plaintext_session, permit_auth_destination, permit_naked_ip_address, reject_unlisted_sender (the item and
smtpd_reject_unlisted_sender), the four sender-login items with sender_login_maps, and check_sasl_access.

Each item is a restriction class that check_recipient_access names for one recipient (`<item>@relay.test`), so
one configuration serves every session. Every reply from MAIL on is compared (code, enhanced code and text), and
so are the `reject` and `reject_warning` log lines (queue ids masked) and permit_naked_ip_address's deprecation
warning. One Postfix and one Dovecot serve the module; each test starts its mailflow. A second, plain Postfix
compares multi_recipient_bounce_reject_code and the permits log_access_permit_actions logs.

Not compared: the EHLO replies (the keywords differ on purpose: docs/security.md); a session under TLS (the e2e
tests of tests/e2e/test_restriction_items.py check reject_plaintext_session's pass there).
"""
from __future__ import annotations

import asyncio
import base64
import logging
import re

import pytest

from tests.support import SmtpClient, dovecot_instance, postfix_instance

pytestmark = pytest.mark.interop

ALICE_PLAIN = "AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0alicepw").decode()
CLASSES = {  # smtpd_restriction_classes: one for each recipient of RECIPIENTS
    "c_pipe": ["reject_unauth_pipelining"],
    "c_multi": ["reject_multi_recipient_bounce"],
    "c_wmulti": ["warn_if_reject", "reject_multi_recipient_bounce"],
    # a warned class goes on after its warnings (Postfix's warn_if_reject holds for the whole next item)
    "c_warn": ["warn_if_reject", "reject_plaintext_session", "warn_if_reject", "c_inner", "reject"],
    "c_inner": ["reject_non_fqdn_helo_hostname", "reject_plaintext_session", "permit"],
    "c_plain": ["reject_plaintext_session"],
    # a warned DEFER_IF_PERMIT is logged though another is pending; the pending one defers the permit
    "c_wdefer": ["check_sender_access inline:{ {s@remote.test=DEFER_IF_PERMIT first} }", "warn_if_reject",
                 "check_recipient_access inline:{ {wdefer@relay.test=DEFER_IF_PERMIT second} }", "permit"],
    # a policy server's default action and an access action's 4.3.0 are policies' verdicts: only warned of
    "c_wpol": ["warn_if_reject", "check_policy_service inet:127.0.0.1:9", "warn_if_reject",
               "check_sender_access inline:{ {s@remote.test=451 4.3.0 busy} }"],
    # an access table that cannot answer: check_access's "451 4.3.5 Server configuration error", a table's value
    "c_wfail": ["warn_if_reject", "check_sender_access fail:down"],
    "c_authdest": ["permit_auth_destination", "reject"],
    "c_naked": ["permit_naked_ip_address", "reject"],
    "c_uls": ["reject_unlisted_sender"],
    "c_slm": ["reject_sender_login_mismatch"],
    "c_aslm": ["reject_authenticated_sender_login_mismatch"],
    "c_kslm": ["reject_known_sender_login_mismatch"],
    "c_uslm": ["reject_unauthenticated_sender_login_mismatch"],
    "c_sasl": ["check_sasl_access inline:{ {alice@example.test=REJECT no alice} }"],
}
RECIPIENTS = "inline:{" + ", ".join(f"{name[2:]}@relay.test={name}" for name in CLASSES if name != "c_inner") + \
    ", elsewhere.test=c_authdest}"  # (relayed for a client logged in: permit_auth_destination has no opinion)
SENDER_LOGINS = "inline:{alice@local.test=alice@example.test, bob@local.test=bob@example.test, " \
                "carol@pf.test=carol@example.test, {@shared.test=bob@example.test alice@example.test}}"
LOGIN_RCPTS = [f"RCPT TO:<{n}@relay.test>" for n in ("slm", "aslm", "kslm", "uslm")]
# None: read one more reply (to a pipelined command); a BDAT chunk's size counts the CRLF each command is sent with
SESSIONS: dict[str, list[str | bytes | None]] = {
    "pipelining after HELO": ["HELO c.test", b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<pipe@relay.test>", None],
    "pipelining EHLO allows": ["EHLO c.test", b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<pipe@relay.test>", None],
    "DATA pipelined with the content": ["EHLO c.test", "MAIL FROM:<s@remote.test>", "RCPT TO:<a@relay.test>",
                                        b"DATA\r\nSubject: pipelined"],
    "a multi-recipient bounce": ["EHLO c.test", "MAIL FROM:<>", "RCPT TO:<multi@relay.test>",
                                 "RCPT TO:<multi@relay.test>", "RCPT TO:<b@relay.test>", "DATA"],
    "a multi-recipient bounce, VRFY after one recipient": ["EHLO c.test", "MAIL FROM:<>", "RCPT TO:<a@relay.test>",
                                                          "VRFY multi@relay.test"],
    "a multi-recipient bounce, by BDAT": ["EHLO c.test", "MAIL FROM:<>", "RCPT TO:<a@relay.test>",
                                          "RCPT TO:<b@relay.test>", b"BDAT 6\r\nabcd", b"BDAT 4 LAST\r\nef", "NOOP"],
    # Postfix's bdat_cmd runs smtpd_check_data before it compares the chunk with message_size_limit
    "a multi-recipient bounce, a first chunk past the size limit": [
        "EHLO c.test", "MAIL FROM:<>", "RCPT TO:<a@relay.test>", "RCPT TO:<b@relay.test>",
        b"BDAT 200002 LAST\r\n" + b"x" * 200000, "NOOP"],
    "a multi-recipient bounce, warned": ["EHLO c.test", "MAIL FROM:<>", "RCPT TO:<wmulti@relay.test>",
                                         "RCPT TO:<wmulti@relay.test>"],
    "warn_if_reject, an item and a class": ["EHLO c", "MAIL FROM:<s@remote.test>", "RCPT TO:<warn@relay.test>"],
    "warn_if_reject over a policy's 4.3.x": ["EHLO c.test", "MAIL FROM:<s@remote.test>", "RCPT TO:<wpol@relay.test>"],
    "warn_if_reject over a table that cannot answer": ["EHLO c.test", "MAIL FROM:<s@remote.test>",
                                                       "RCPT TO:<wfail@relay.test>"],
    "warn_if_reject over a DEFER_IF_PERMIT, one pending": ["EHLO c.test", "MAIL FROM:<s@remote.test>",
                                                           "RCPT TO:<wdefer@relay.test>"],
    "plaintext": ["EHLO c.test", "MAIL FROM:<s@remote.test>", "RCPT TO:<plain@relay.test>"],
    "permit_auth_destination": ["EHLO c.test", "MAIL FROM:<s@remote.test>", "RCPT TO:<authdest@relay.test>",
                                "RCPT TO:<x@elsewhere.test>"],
    "permit_auth_destination, logged in": ["EHLO c.test", ALICE_PLAIN, "MAIL FROM:<alice@local.test>",
                                           "RCPT TO:<x@elsewhere.test>"],
    "permit_naked_ip_address": [
        "EHLO 1.2.3.4", "MAIL FROM:<s@remote.test>", "RCPT TO:<naked@relay.test>", "RSET",
        "EHLO [1.2.3.4]", "MAIL FROM:<s@remote.test>", "RCPT TO:<naked@relay.test>", "RSET",
        "EHLO 1.2.3.999", "MAIL FROM:<s@remote.test>", "RCPT TO:<naked@relay.test>", "RSET",
        "EHLO c.test", "MAIL FROM:<s@remote.test>", "RCPT TO:<naked@relay.test>"],
    # Postfix's valid_ipv4_hostaddr: leading zeros taken, a first octet 0 not, and no IPv6 without `IPv6:`
    "permit_naked_ip_address, Postfix's IPv4 syntax": [
        "EHLO 2001::1", "MAIL FROM:<s@remote.test>", "RCPT TO:<naked@relay.test>", "RSET",
        "EHLO ::1", "MAIL FROM:<s@remote.test>", "RCPT TO:<naked@relay.test>", "RSET",
        "EHLO 0.1.2.3", "MAIL FROM:<s@remote.test>", "RCPT TO:<naked@relay.test>", "RSET",
        "EHLO 01.2.3.4", "MAIL FROM:<s@remote.test>", "RCPT TO:<naked@relay.test>", "RSET",
        "EHLO 0.0.0.0", "MAIL FROM:<s@remote.test>", "RCPT TO:<naked@relay.test>"],
    "reject_unlisted_sender": ["EHLO c.test", "MAIL FROM:<nobody@local.test>", "RCPT TO:<uls@relay.test>", "RSET",
                               "MAIL FROM:<alice@local.test>", "RCPT TO:<uls@relay.test>"],
    "smtpd_reject_unlisted_sender": ["EHLO c.test", "MAIL FROM:<nobody@local.test>", "RCPT TO:<a@relay.test>"],
    "sender logins, not logged in": [
        "EHLO c.test", "MAIL FROM:<alice@local.test>", *LOGIN_RCPTS, "RSET",
        "MAIL FROM:<free@remote.test>", *LOGIN_RCPTS, "RCPT TO:<sasl@relay.test>"],
    "sender logins, logged in": [
        "EHLO c.test", ALICE_PLAIN, "MAIL FROM:<bob@local.test>", *LOGIN_RCPTS, "RSET",
        "MAIL FROM:<free@remote.test>", *LOGIN_RCPTS, "RSET",
        "MAIL FROM:<x@shared.test>", *LOGIN_RCPTS, "RCPT TO:<sasl@relay.test>"],
    # the maps are asked the sender as Postfix resolves it: qualified (myorigin), the percent hack applied
    "sender logins, resolved first": [
        "EHLO c.test", ALICE_PLAIN, "MAIL FROM:<carol>", "RCPT TO:<kslm@relay.test>", "RSET",
        "MAIL FROM:<BOB@Local.Test>", "RCPT TO:<kslm@relay.test>", "RSET",
        "MAIL FROM:<bob%local.test@local.test>", "RCPT TO:<kslm@relay.test>"],
    "sender logins, resolved first, not logged in": ["EHLO c.test", "MAIL FROM:<carol>", "RCPT TO:<uslm@relay.test>"],
}


def postfix_settings(auth_socket: str) -> dict[str, str]:
    return {
        "myhostname": "pf.test", "mydestination": "local.test", "mynetworks": "192.0.2.0/24",
        "local_recipient_maps": "inline:{alice=ok, bob=ok}", "relay_domains": "relay.test",
        "relayhost": "[127.0.0.1]:9", "smtpd_forbid_unauth_pipelining": "no", "smtpd_reject_unlisted_sender": "yes",
        "message_size_limit": "100000",
        "smtpd_sasl_auth_enable": "yes", "smtpd_sasl_type": "dovecot", "smtpd_sasl_path": auth_socket,
        "smtpd_sender_login_maps": SENDER_LOGINS,
        "smtpd_relay_restrictions": "permit_sasl_authenticated, reject_unauth_destination",
        "smtpd_recipient_restrictions": f"check_recipient_access {RECIPIENTS}",
        "smtpd_data_restrictions": "reject_unauth_pipelining, reject_multi_recipient_bounce",
        "smtpd_restriction_classes": ", ".join(CLASSES), **{name: ", ".join(items) for name, items in CLASSES.items()},
    }


def mailflow_settings(auth_socket: str) -> dict:
    return {
        "myhostname": "pf.test", "mydestination": ["local.test"], "mynetworks": ["192.0.2.0/24"],
        "local_recipient_maps": ["inline:{alice=ok, bob=ok}"], "relay_domains": ["relay.test"],
        "relayhost": "[127.0.0.1]:9",
        "smtpd": {"forbid_unauth_pipelining": False, "reject_unlisted_sender": True, "error_sleep_time": "0s",
                  "disable_vrfy_command": False, "message_size_limit": 100000,
                  "sasl_auth_enable": True, "sasl_type": "dovecot", "sasl_path": auth_socket,
                  "allow_plaintext_auth_on_loopback": True, "sender_login_maps": [SENDER_LOGINS],
                  "relay_restrictions": ["permit_sasl_authenticated", "reject_unauth_destination"],
                  "recipient_restrictions": [f"check_recipient_access {RECIPIENTS}"],
                  "data_restrictions": ["reject_unauth_pipelining", "reject_multi_recipient_bounce"],
                  "restriction_classes": CLASSES},
    }


async def replay(port: int) -> dict[str, list[str]]:
    """Each session's replies (a HELO or EHLO reply as its code only)."""
    got = {}
    for name, commands in SESSIONS.items():
        replies = []
        async with await SmtpClient.connect(port) as client:
            for command in commands:
                reply = await (client.reply() if command is None else client.cmd(command))
                hello = isinstance(command, str) and command[:4] in ("EHLO", "HELO")
                replies.append(str(reply.code) if hello else reply.text)
        got[name] = replies
    return got


QUEUE_ID = re.compile(r"^[0-9A-F]{6,}: ")
LOGGED = (": reject: ", ": reject_warning: ", "permit_naked_ip_address is deprecated")


def logged(lines, marks: tuple[str, ...] = LOGGED) -> list[str]:
    """The lines holding one of `marks` (by default the reject and reject_warning lines and the deprecation
    warnings), without syslog's prefix or `warning: `, a queue id as QID."""
    out = []
    for line in lines:
        if any(mark in line for mark in marks):
            text = line.split("]: ", 1)[-1] if "/smtpd[" in line else line
            out.append(QUEUE_ID.sub("QID: ", text.removeprefix("warning: ")))
    return out


@pytest.fixture(scope="module")
def sasl_dovecot():
    with dovecot_instance() as dovecot:
        yield dovecot


@pytest.fixture(scope="module")
def postfix(sasl_dovecot):
    instance = postfix_instance(postfix_settings(str(sasl_dovecot.auth_socket)))
    loop = asyncio.new_event_loop()
    try:
        yield loop.run_until_complete(instance.__aenter__())
    finally:
        loop.run_until_complete(instance.__aexit__(None, None, None))
        loop.close()


async def test_the_items_reply_and_log_as_postfix_does(postfix, sasl_dovecot, mailflow_server, caplog):
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    offset = await postfix.sessions_ended()
    expected = await replay(postfix.port)
    # (Postfix writes its log through postlogd, a moment after the replies: each session's lines are all there once
    # its disconnect line is)
    postfix_log = await postfix.logged("disconnect from", count=len(SESSIONS), since=offset)
    mf = await mailflow_server(**mailflow_settings(str(sasl_dovecot.auth_socket)))
    got = await replay(mf.smtp_addresses[0][1])

    assert {s: (expected[s], got[s]) for s in expected if expected[s] != got[s]} == {}
    assert logged(r.getMessage() for r in caplog.records) == logged(postfix_log.splitlines())
    # what Postfix did, so that the same mistake on both sides cannot pass unnoticed
    assert expected["pipelining after HELO"][-1] == \
        "503 5.5.0 <pipe@relay.test>: Recipient address rejected: Improper use of SMTP command pipelining"
    assert expected["pipelining EHLO allows"][-1] == "250 2.1.5 Ok"
    assert expected["DATA pipelined with the content"][-1] == \
        "503 5.5.0 <DATA>: Data command rejected: Improper use of SMTP command pipelining"
    assert expected["a multi-recipient bounce"][-3:] == [
        "550 5.5.3 <multi@relay.test>: Recipient address rejected: Multi-recipient bounce", "250 2.1.5 Ok",
        "550 5.5.3 <DATA>: Data command rejected: Multi-recipient bounce"]
    assert expected["a multi-recipient bounce, by BDAT"][-3:] == [
        "550 5.5.3 <DATA>: Data command rejected: Multi-recipient bounce",
        "551 5.0.0 Discarded 4 bytes after earlier error", "250 2.0.0 Ok"]
    assert expected["a multi-recipient bounce, a first chunk past the size limit"][-2] == \
        "550 5.5.3 <DATA>: Data command rejected: Multi-recipient bounce"
    assert expected["a multi-recipient bounce, VRFY after one recipient"][-1].startswith("252 ")
    assert expected["warn_if_reject, an item and a class"][-1] == "250 2.1.5 Ok"
    assert expected["warn_if_reject over a policy's 4.3.x"][-1] == "250 2.1.5 Ok"
    assert expected["warn_if_reject over a DEFER_IF_PERMIT, one pending"][-1] == \
        "450 4.7.1 <s@remote.test>: Sender address rejected: first"
    assert any("reject_warning: " in line and "450 4.7.1 <wdefer@relay.test>: Recipient address rejected: second;"
               in line for line in postfix.maillog.splitlines())
    assert expected["plaintext"][-1] == "450 4.7.1 Session encryption is required"
    assert expected["permit_auth_destination"][2] == "250 2.1.5 Ok"
    assert expected["permit_auth_destination, logged in"][-1] == \
        "554 5.7.1 <x@elsewhere.test>: Recipient address rejected: Access denied"
    assert expected["permit_naked_ip_address"][2::4] == [
        "250 2.1.5 Ok", "554 5.7.1 <naked@relay.test>: Recipient address rejected: Access denied",
        "501 5.5.2 <1.2.3.999>: Helo command rejected: invalid ip address",
        "554 5.7.1 <naked@relay.test>: Recipient address rejected: Access denied"]
    assert expected["permit_naked_ip_address, Postfix's IPv4 syntax"][2::4] == [
        "501 5.5.2 <2001::1>: Helo command rejected: invalid ip address",
        "501 5.5.2 <::1>: Helo command rejected: invalid ip address",
        "501 5.5.2 <0.1.2.3>: Helo command rejected: invalid ip address", "250 2.1.5 Ok", "250 2.1.5 Ok"]
    assert expected["smtpd_reject_unlisted_sender"][-1] == \
        "550 5.1.0 <nobody@local.test>: Sender address rejected: User unknown in local recipient table"
    assert expected["sender logins, not logged in"][2:6] == [
        "553 5.7.1 <alice@local.test>: Sender address rejected: not logged in", "250 2.1.5 Ok",
        "553 5.7.1 <alice@local.test>: Sender address rejected: not logged in",
        "553 5.7.1 <alice@local.test>: Sender address rejected: not logged in"]
    assert expected["sender logins, resolved first"][3::3] == [
        "553 5.7.1 <carol>: Sender address rejected: not owned by user alice@example.test",
        "553 5.7.1 <BOB@Local.Test>: Sender address rejected: not owned by user alice@example.test",
        "553 5.7.1 <bob%local.test@local.test>: Sender address rejected: not owned by user alice@example.test"]
    assert expected["sender logins, logged in"][-1] == \
        "554 5.7.1 <alice@example.test>: SASL login name rejected: no alice"


CODE_AND_PERMITS = {  # multi_recipient_bounce_reject_code, and the permits log_access_permit_actions may log
    "restrictions": "reject_multi_recipient_bounce, permit_naked_ip_address, permit_auth_destination, reject",
    "sessions": [["EHLO c.test", "MAIL FROM:<>", "RCPT TO:<alice@local.test>", "RCPT TO:<bob@local.test>"],
                 ["EHLO 1.2.3.4", "MAIL FROM:<s@remote.test>", "RCPT TO:<alice@local.test>"]],
}
PERMIT_OR_REJECT = (": reject: ", ": permit: ")


async def test_the_bounce_code_and_logged_permits_as_postfix(mailflow_server, caplog):
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    permits = ["permit_auth_destination", "permit_naked_ip_address"]
    main_cf = {"mydestination": "local.test", "local_recipient_maps": "inline:{alice=ok, bob=ok}",
               "multi_recipient_bounce_reject_code": "450", "smtpd_log_access_permit_actions": ", ".join(permits),
               "smtpd_relay_restrictions": "reject_unauth_destination",  # (a naked IP permits what the client chooses)
               "smtpd_recipient_restrictions": CODE_AND_PERMITS["restrictions"]}
    async with postfix_instance(main_cf) as postfix:
        offset = await postfix.sessions_ended()
        expected = [await replay_one(postfix.port, s) for s in CODE_AND_PERMITS["sessions"]]
        postfix_lines = (await postfix.logged("disconnect from", count=len(CODE_AND_PERMITS["sessions"]),
                                              since=offset)).splitlines()
    mf = await mailflow_server(mydestination=["local.test"], local_recipient_maps=["inline:{alice=ok, bob=ok}"], smtpd={
        "multi_recipient_bounce_reject_code": 450, "log_access_permit_actions": permits, "error_sleep_time": "0s",
        "relay_restrictions": ["reject_unauth_destination"],
        "recipient_restrictions": CODE_AND_PERMITS["restrictions"].split(", ")})
    got = [await replay_one(mf.smtp_addresses[0][1], s) for s in CODE_AND_PERMITS["sessions"]]
    assert got == expected
    assert expected[0][-1] == "450 4.5.3 <bob@local.test>: Recipient address rejected: Multi-recipient bounce"
    theirs = logged_lines(postfix_lines)
    assert logged_lines(r.getMessage() for r in caplog.records) == theirs and len(theirs) == 3


async def replay_one(port: int, commands: list[str]) -> list[str]:
    async with await SmtpClient.connect(port) as client:
        replies = [(await client.cmd(command)).text for command in commands]
    return [r.split("\r\n")[-1] if r.startswith("250") and "\r\n" in r else r for r in replies][1:]


def logged_lines(lines) -> list[str]:
    """The permit and reject lines, without syslog's prefix, a queue id as QID."""
    return [QUEUE_ID.sub("QID: ", line.split("]: ", 1)[-1] if "/smtpd[" in line else line) for line in lines
            if any(mark in line for mark in PERMIT_OR_REJECT)]
