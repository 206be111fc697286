"""Differential test of smtp.fallback_relay and smtp.bind_address: a private Postfix 3.7 (smtp_fallback_relay,
smtp_bind_address) and mailflow, configured alike, relay one message per destination to the same peers on loopback
and must end each recipient alike (relay, status, enhanced code, text: the fallback named as the relay of what it
delivered) and write the same client lines beside the results (`connect to …: Connection refused` alone, the
soft error of a server that is not the final one as `QID: host … said: 451 …`, `warning: smtp_connect_addr: bind
…`); the peers see the connection come from the address each was told to bind to.

Destinations (transport_maps -> smtp:[127.0.0.1]:port): `unreachable` (nothing listens: the fallback delivers),
`greylisting` (451 to RCPT: the fallback delivers), `refusing` (550 to RCPT: bounced, the fallback never sees it),
`sender` (where the bounce goes). And mail for the relayhost: Postfix appends the fallback relays to it too.
"""
from __future__ import annotations

import logging

import pytest

from tests.interop.test_client_log_vs_postfix import client_lines, mailflow_lines, postfix_client_lines, results
from tests.support import eventually, postfix_instance, send
from tests.support.ports import free_port

pytestmark = pytest.mark.interop

MESSAGE = b"Subject: fallback\r\n\r\nhello\r\n"
SENDER = "someone@sender.test"


def transport_map(routes: dict[str, int]) -> str:
    return "inline:{" + ", ".join(f"{name}.test=smtp:[127.0.0.1]:{port}" for name, port in routes.items()) + "}"


async def relay_with_postfix(routes: dict[str, int], main_cf: dict[str, str], expected: set[str]) -> list[str]:
    async with postfix_instance({"myhostname": "pf.test", "mydestination": "", "transport_maps": transport_map(routes),
                                 **main_cf}) as pf:
        for name in sorted(routes):
            if name != "sender":
                await send(pf.port, SENDER, [f"a@{name}.test"], MESSAGE)
        await eventually(lambda: set(results(postfix_client_lines(pf.maillog))) >= expected or None, timeout=20,
                         what="Postfix ended every recipient")
        return postfix_client_lines(pf.maillog)


async def relay_with_mailflow(mailflow_server, routes: dict[str, int], smtp: dict, expected: set[str],
                              caplog, **overrides) -> list[str]:
    for logger in ("mailflow.mail", "mailflow.smtp"):
        caplog.set_level(logging.INFO, logger=logger)
    mf = await mailflow_server(mynetworks=["127.0.0.0/8"], transport_maps=[transport_map(routes)],
                               smtp={"tls_security_level": "none", **smtp}, **overrides)
    for name in sorted(routes):
        if name != "sender":
            await send(mf.smtp_addresses[0][1], SENDER, [f"a@{name}.test"], MESSAGE)
    await eventually(lambda: set(results(mailflow_lines(caplog))) >= expected or None, timeout=20,
                     what="mailflow ended every recipient")
    return mailflow_lines(caplog)


async def test_the_fallback_relay_takes_what_the_next_hop_could_not_as_postfix_s(mailflow_server, smtp_peer, caplog):
    greylisting = await smtp_peer()
    refusing = await smtp_peer()
    fallback = await smtp_peer()
    sender = await smtp_peer()
    greylisting.handler.rcpt_replies["a@greylisting.test"] = "451 4.7.1 greylisted, try again later"
    refusing.handler.rcpt_replies["a@refusing.test"] = "550 5.1.1 no such user"
    closed = free_port()
    routes = {"unreachable": closed, "greylisting": greylisting.port, "refusing": refusing.port,
              "sender": sender.port}
    expected = {"a@unreachable.test", "a@greylisting.test", "a@refusing.test", SENDER}
    relay = f"[127.0.0.1]:{fallback.port}"
    postfix = await relay_with_postfix(routes, {"smtp_fallback_relay": relay}, expected)
    postfix_got = sorted(rcpt for m in fallback.messages for rcpt in m.rcpt_tos)
    fallback.messages.clear()
    mailflow = await relay_with_mailflow(mailflow_server, routes, {"fallback_relay": [relay]}, expected, caplog)
    assert results(mailflow) == results(postfix)
    assert client_lines(mailflow) == client_lines(postfix)
    assert sorted(rcpt for m in fallback.messages for rcpt in m.rcpt_tos) == postfix_got
    # Postfix's own, so that a change on both sides cannot pass unnoticed
    by_fallback = f"127.0.0.1[127.0.0.1]:{fallback.port}"
    assert postfix_got == ["a@greylisting.test", "a@unreachable.test"]
    assert {rcpt: got[:3] for rcpt, got in results(postfix).items() if rcpt != SENDER} == {
        "a@unreachable.test": (by_fallback, "2.0.0", "sent"), "a@greylisting.test": (by_fallback, "2.0.0", "sent"),
        "a@refusing.test": (f"127.0.0.1[127.0.0.1]:{refusing.port}", "5.1.1", "bounced")}
    assert client_lines(postfix) == sorted([
        f"smtp: connect to 127.0.0.1[127.0.0.1]:{closed}: Connection refused",
        "smtp: QID: host 127.0.0.1[127.0.0.1] said: 451 4.7.1 greylisted, try again later (in reply to RCPT TO "
        "command)"])


@pytest.mark.parametrize("enforce", [False, True])
async def test_the_bind_address_as_postfix_s(mailflow_server, smtp_peer, caplog, tmp_path, enforce):
    """127.0.0.2 is bound and seen by the peer; 192.0.2.1 cannot be (no address of this host): a warning, then the
    connection goes from any address, or with enforce the mail is deferred 4.4.0 server configuration error."""
    bound, unbindable, sender = await smtp_peer(), await smtp_peer(), await smtp_peer()
    expected = {"a@bound.test", "a@unbindable.test"}
    lines = {}
    for server, setting in (("postfix", "smtp_bind_address"), ("mailflow", "bind_address")):
        got = []
        for name, peer, address in (("bound", bound, "127.0.0.2"), ("unbindable", unbindable, "192.0.2.1")):
            routes = {name: peer.port, "sender": sender.port}
            if server == "postfix":
                got += await relay_with_postfix(routes, {setting: address, "smtp_bind_address_enforce":
                                                         "yes" if enforce else "no"}, {f"a@{name}.test"})
            else:
                caplog.clear()
                got += await relay_with_mailflow(mailflow_server, routes,
                                                 {setting: address, "bind_address_enforce": enforce},
                                                 {f"a@{name}.test"}, caplog,
                                                 queue_directory=str(tmp_path / name))
        lines[server] = got
        assert [m.client for m in bound.messages] == ["127.0.0.2"]
        assert [m.client for m in unbindable.messages] == ([] if enforce else ["127.0.0.1"])
        bound.messages.clear()
        unbindable.messages.clear()
    assert results(lines["mailflow"]) == results(lines["postfix"])
    assert set(results(lines["postfix"])) >= expected
    assert client_lines(lines["mailflow"]) == client_lines(lines["postfix"])
    warning = "smtp: warning: smtp_connect_addr: bind 192.0.2.1: Cannot assign requested address"
    assert warning in lines["postfix"] and warning in lines["mailflow"]
    if enforce:
        assert results(lines["postfix"])["a@unbindable.test"][1:] == ("4.4.0", "deferred", "server configuration error")


async def test_mail_for_the_relayhost_goes_to_the_fallback_relay_too_as_postfix_s(mailflow_server, smtp_peer, caplog):
    """Postfix's smtp_connect_inet appends the fallback relays to whatever next hop it was given, the relayhost
    included (its relayhost exception is only for the 4.3.5 of a hard failure at the end)."""
    fallback = await smtp_peer()
    closed = free_port()
    relay = f"[127.0.0.1]:{fallback.port}"
    async with postfix_instance({"myhostname": "pf.test", "mydestination": "", "relayhost": f"[127.0.0.1]:{closed}",
                                 "smtp_fallback_relay": relay}) as pf:
        await send(pf.port, SENDER, ["a@far.test"], MESSAGE)
        await eventually(lambda: results(postfix_client_lines(pf.maillog)) or None, timeout=20)
        postfix = postfix_client_lines(pf.maillog)
    for logger in ("mailflow.mail", "mailflow.smtp"):
        caplog.set_level(logging.INFO, logger=logger)
    mf = await mailflow_server(mynetworks=["127.0.0.0/8"], relayhost=f"[127.0.0.1]:{closed}",
                               smtp={"fallback_relay": [relay]})
    await send(mf.smtp_addresses[0][1], SENDER, ["a@far.test"], MESSAGE)
    await eventually(lambda: results(mailflow_lines(caplog)) or None, timeout=20)
    assert results(mailflow_lines(caplog)) == results(postfix)
    assert client_lines(mailflow_lines(caplog)) == client_lines(postfix)
    assert results(postfix)["a@far.test"][:3] == (f"127.0.0.1[127.0.0.1]:{fallback.port}", "2.0.0", "sent")
    assert [m.rcpt_tos for m in fallback.messages] == [["a@far.test"], ["a@far.test"]]
