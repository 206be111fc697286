"""Differential test of the DNS-based restriction items against a private Postfix 3.7, both configured alike, on
the paths that ask no DNS (Postfix's smtpd cannot be pointed at a DNS server on a port; the DNS paths are
tests/e2e/test_smtpd_dns_restrictions.py, their replies taken from Postfix's source): an address literal is its
own MX and A host and has no NS (check_server_access), a bare address as HELO name is its own A host,
reject_unknown_helo_hostname checks a literal for being one, permit_mx_backup permits a relay domain (logged
with smtpd_log_access_permit_actions) and not an address literal nor a routed recipient of a relay domain (which
reject_unauth_destination refuses: Postfix's RESOLVE_FLAG_ROUTED), and an OK from a server access table is a
configuration error (forbid_allowlist). Replies are compared word for word, and so are the log lines."""
from __future__ import annotations

import logging

import pytest

from tests.support import SmtpClient, postfix_instance

pytestmark = pytest.mark.interop

TABLE = "inline:{ { 192.0.2.1 = REJECT bad server }, 192.0.2.2=OK, 192.0.2.3=DUNNO }"
HELO = [f"check_helo_a_access {TABLE}", "reject_unknown_helo_hostname"]
SENDER = [f"check_sender_ns_access {TABLE}", f"check_sender_mx_access {TABLE}"]
RELAY = ["permit_mx_backup", "reject_unauth_destination"]
SESSIONS = {  # name -> (HELO name, sender, recipient)
    "a literal HELO name": ("[192.0.2.9]", "", "alice@local.test"),
    "an IPv6 literal HELO name": ("[IPv6:2001:db8::1]", "", "alice@local.test"),
    "an IPv6 literal with a zone id": ("[IPv6:fe80::1%eth0]", "", "alice@local.test"),
    "a literal that is no address": ("[not.an.address]", "", "alice@local.test"),
    "a literal is its own A host": ("[192.0.2.1]", "", "alice@local.test"),
    "a bare address is its own A host": ("192.0.2.1", "", "alice@local.test"),
    "a literal is its own MX host": ("[192.0.2.9]", "s@[192.0.2.1]", "alice@local.test"),
    "an OK is refused": ("[192.0.2.9]", "s@[192.0.2.2]", "alice@local.test"),
    "DUNNO ends the check": ("[192.0.2.9]", "s@[192.0.2.3]", "alice@local.test"),
    "a relay domain": ("[192.0.2.9]", "", "x@relay.test"),
    "a literal is not backed up": ("[192.0.2.9]", "", "x@[192.0.2.9]"),
    "a routed relay recipient (%)": ("[192.0.2.9]", "", "user%victim.example@relay.test"),
    "a routed relay recipient (!)": ("[192.0.2.9]", "", "victim.example!user@relay.test"),
}


async def replies(port: int) -> dict[str, str]:
    """The first reply of each session that is not 250 (MAIL or RCPT), else RCPT's."""
    answers = {}
    for name, (helo, sender, rcpt) in SESSIONS.items():
        client = await SmtpClient.connect(port)
        try:
            assert (await client.cmd(f"EHLO {helo}")).code == 250
            reply = await client.cmd(f"MAIL FROM:<{sender}>")
            if reply.code == 250:
                reply = await client.cmd(f"RCPT TO:<{rcpt}>")
            answers[name] = reply.text
        finally:
            await client.close()
    return answers


def postfix_lines(maillog: str) -> list[str]:
    """smtpd's permit lines and warnings, without syslog's prefix."""
    lines = [line.split("]: ", 1)[1] for line in maillog.splitlines() if "/smtpd[" in line and "]: " in line]
    return [line.removeprefix("warning: ") for line in lines
            if line.startswith("NOQUEUE: permit: ") or line.startswith("warning: restriction ")
            or line.startswith("warning: this is not") or line.startswith("warning: use DUNNO")]


async def test_the_dns_free_paths_of_the_dns_items_match_a_real_postfix(mailflow_server, caplog):
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    async with postfix_instance({
        "myhostname": "pf.test", "mydestination": "local.test", "relay_domains": "relay.test",
        "local_recipient_maps": "inline:{alice=ok}",
        "smtpd_helo_restrictions": ", ".join(HELO), "smtpd_sender_restrictions": ", ".join(SENDER),
        "smtpd_relay_restrictions": ", ".join(RELAY), "smtpd_log_access_permit_actions": "permit_mx_backup",
    }) as pf:
        offset = await pf.sessions_ended()
        postfix = await replies(pf.port)
        postfix_logged = postfix_lines(await pf.logged("disconnect from", count=len(postfix), since=offset))
    mf = await mailflow_server(mydestination=["local.test"], relay_domains=["relay.test"],
                               smtpd={"helo_restrictions": HELO, "sender_restrictions": SENDER,
                                      "relay_restrictions": RELAY, "log_access_permit_actions": ["permit_mx_backup"]})
    mailflow = await replies(mf.smtp_addresses[0][1])
    assert {name: (postfix[name], mailflow[name]) for name in SESSIONS if postfix[name] != mailflow[name]} == {}
    assert postfix["a literal is its own MX host"] == "554 5.7.1 <s@[192.0.2.1]>: Sender address rejected: bad server"
    assert postfix["an OK is refused"] == "451 4.3.5 Server configuration error"
    assert postfix["a routed relay recipient (%)"] == "554 5.7.1 <user%victim.example@relay.test>: Relay access denied"
    mailflow_logged = [m for m in caplog.messages if m.startswith(("NOQUEUE: permit: ", "restriction ", "this is not",
                                                                   "use DUNNO"))]
    assert mailflow_logged == postfix_logged
    assert len(postfix_logged) == 7  # four permits (alice@local.test too: a local domain is permitted) and 3 warnings


async def test_reject_maps_rbl_with_no_lists_warns_once_and_passes_as_postfix_3_7(mailflow_server, caplog):
    """Postfix 3.7's old reject_maps_rbl (the lists, maps_rbl_domains, left empty: no DNS) logs that it is going
    away, once (per smtpd process), and has no opinion; mailflow refused the item as unknown."""
    caplog.set_level(logging.WARNING, logger="mailflow.smtpd")
    async with postfix_instance({"myhostname": "pf.test", "mydestination": "local.test",
                                 "local_recipient_maps": "inline:{alice=ok}",
                                 "smtpd_client_restrictions": "reject_maps_rbl"}) as pf:
        offset = await pf.sessions_ended()
        postfix = [await rcpt_reply(pf.port) for _ in range(2)]
        logged = await pf.logged("disconnect from", count=2, since=offset)
    postfix_logged = [line.split("warning: ", 1)[1] for line in logged.splitlines() if "reject_maps_rbl" in line]
    mf = await mailflow_server(mydestination=["local.test"], local_recipient_maps=["inline:{alice=ok}"],
                               smtpd={"client_restrictions": ["reject_maps_rbl"]})
    mailflow = [await rcpt_reply(mf.smtp_addresses[0][1]) for _ in range(2)]
    assert mailflow == postfix == ["250 2.1.5 Ok"] * 2
    warning = ('support for restriction "reject_maps_rbl" will be removed from Postfix; use "reject_rbl_client '
               'domain-name" instead')
    # once per process: mailflow's one; Postfix's once per smtpd process (a loaded machine may start a second)
    assert [m for m in caplog.messages if "reject_maps_rbl" in m] == [warning]
    assert postfix_logged and set(postfix_logged) == {warning}


async def rcpt_reply(port: int) -> str:
    client = await SmtpClient.connect(port)
    try:
        assert (await client.cmd("EHLO c.test")).code == 250
        assert (await client.cmd("MAIL FROM:<s@remote.test>")).code == 250
        return (await client.cmd("RCPT TO:<alice@local.test>")).text
    finally:
        await client.close()
