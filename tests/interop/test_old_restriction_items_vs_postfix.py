"""Differential test, against a private Postfix 3.7, of three things a Postfix main.cf may name that mailflow took
late: the permit_inet_interfaces item, the check_relay_domains item (Postfix 3.7's old relay guard, warned of as
going away) and the smtpd_null_access_lookup_key setting.

One configuration serves every session: the relay list sends each recipient domain to a class (inet.test:
permit_inet_interfaces, then reject) or to check_relay_domains, and the sender list's table has a key for the
null sender under another name than `<>`. Compared: every reply (XCLIENT's by its code: it is the banner), the
reject and permit lines of the log (both items are logged permits), and check_relay_domains' warning that it is
going away. Postfix's inet_interfaces is 127.0.0.1 (the harness's); its own address for permit_inet_interfaces is
the connection's client, which XCLIENT does not change (smtpd_check.c asks state->sockaddr), and 127.0.0.2, a
loopback address it does not listen on, is not its own.
"""
from __future__ import annotations

import logging
import socket

import pytest

from tests.interop.test_restriction_items_vs_postfix import logged
from tests.support import SmtpClient, postfix_instance

pytestmark = pytest.mark.interop

RELAY_TABLE = "inline:{ {inet.test=c_inet} }"
SENDER_TABLE = "inline:{ {nullsender=REJECT the null key}, {<>=REJECT the angle brackets} }"
PERMITS = ["permit_inet_interfaces", "check_relay_domains"]
# (client address to connect from, commands)
SESSIONS: dict[str, tuple[str, list[str]]] = {
    "permit_inet_interfaces, this host": ("127.0.0.1", ["HELO c.test", "MAIL FROM:<s@remote.test>",
                                                        "RCPT TO:<x@inet.test>"]),
    "permit_inet_interfaces, XCLIENT names another client": (
        "127.0.0.1", ["XCLIENT ADDR=192.0.2.1 NAME=[UNAVAILABLE]", "HELO c.test", "MAIL FROM:<s@remote.test>",
                      "RCPT TO:<x@inet.test>"]),
    "permit_inet_interfaces, another loopback address": ("127.0.0.2", ["HELO c.test", "MAIL FROM:<s@remote.test>",
                                                                       "RCPT TO:<x@inet.test>"]),
    "check_relay_domains": ("127.0.0.1", ["XCLIENT ADDR=192.0.2.1 NAME=mx.other.test", "HELO c.test",
                                          "MAIL FROM:<s@remote.test>", "RCPT TO:<r@relay.test>",
                                          "RCPT TO:<x@elsewhere.test>"]),
    "check_relay_domains, a client in relay_domains": (
        "127.0.0.1", ["XCLIENT ADDR=192.0.2.1 NAME=mx.relay.test", "HELO c.test", "MAIL FROM:<s@remote.test>",
                      "RCPT TO:<x@elsewhere.test>"]),
    "smtpd_null_access_lookup_key": ("127.0.0.1", ["HELO c.test", "MAIL FROM:<>", "RCPT TO:<r@relay.test>",
                                                   "RSET", "MAIL FROM:<s@remote.test>", "RCPT TO:<r@relay.test>"]),
}
MAIN_CF = {
    "myhostname": "pf.test", "relay_domains": "relay.test", "relayhost": "[127.0.0.1]:9",
    "smtpd_authorized_xclient_hosts": "127.0.0.1",
    "smtpd_null_access_lookup_key": "nullsender", "smtpd_log_access_permit_actions": ", ".join(PERMITS),
    "smtpd_restriction_classes": "c_inet", "c_inet": "permit_inet_interfaces, reject",
    "smtpd_relay_restrictions": f"check_recipient_access {RELAY_TABLE}, check_relay_domains",
    "smtpd_sender_restrictions": f"check_sender_access {SENDER_TABLE}",
}
MAILFLOW = {
    "myhostname": "pf.test", "relay_domains": ["relay.test"], "relayhost": "[127.0.0.1]:9",
    "smtpd": {"listen": ["127.0.0.1:0"], "authorized_xclient_hosts": ["127.0.0.1"], "error_sleep_time": "0s",
              "null_access_lookup_key": "nullsender", "log_access_permit_actions": PERMITS,
              "restriction_classes": {"c_inet": ["permit_inet_interfaces", "reject"]},
              "relay_restrictions": [f"check_recipient_access {RELAY_TABLE}", "check_relay_domains"],
              "sender_restrictions": [f"check_sender_access {SENDER_TABLE}"]},
}
LOGGED = (": reject: ", ": permit: ")
GOING_AWAY = ('support for restriction "check_relay_domains" will be removed from Postfix; '
              'use "reject_unauth_destination" instead')



async def replay(port: int) -> dict[str, list[str]]:
    got = {}
    for name, (source, commands) in SESSIONS.items():
        sock = socket.socket()
        sock.bind((source, 0))
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        async with await SmtpClient.connect(port, sock=sock) as client:
            replies = [(await client.cmd(command)).text for command in commands]
        got[name] = [r.split()[0] if c.startswith("XCLIENT") else r for c, r in zip(commands, replies)]  # (banner)
    return got


async def test_old_items_and_the_null_key_as_postfix(mailflow_server, caplog):
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    async with postfix_instance(MAIN_CF) as postfix:
        offset = await postfix.sessions_ended()
        expected = await replay(postfix.port)
        postfix_log = await postfix.logged("disconnect from", count=len(SESSIONS), since=offset)
    mf = await mailflow_server(**MAILFLOW)
    got = await replay(mf.smtp_addresses[0][1])

    assert {s: (expected[s], got[s]) for s in expected if expected[s] != got[s]} == {}
    assert logged((r.getMessage() for r in caplog.records), LOGGED) == logged(postfix_log.splitlines(), LOGGED)
    # what Postfix did, so that the same mistake on both sides cannot pass unnoticed
    assert expected["permit_inet_interfaces, this host"][-1] == "250 2.1.5 Ok"
    assert expected["permit_inet_interfaces, XCLIENT names another client"][-1] == "250 2.1.5 Ok"
    assert expected["permit_inet_interfaces, another loopback address"][-1] == \
        "554 5.7.1 <x@inet.test>: Recipient address rejected: Access denied"
    assert expected["check_relay_domains"][-2:] == [
        "250 2.1.5 Ok", "554 5.7.1 <x@elsewhere.test>: Recipient address rejected: Relay access denied"]
    assert expected["check_relay_domains, a client in relay_domains"][-1] == "250 2.1.5 Ok"
    assert expected["smtpd_null_access_lookup_key"][2] == "554 5.7.1 <>: Sender address rejected: the null key"
    assert expected["smtpd_null_access_lookup_key"][-1] == "250 2.1.5 Ok"
    # the going-away warning: Postfix's once per smtpd process (which sessions share, as it happens), mailflow's
    # once per listener's restrictions
    assert GOING_AWAY in postfix_log and [r.getMessage() for r in caplog.records].count(GOING_AWAY) == 1
