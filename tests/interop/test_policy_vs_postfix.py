"""Differential test of policy delegation (check_policy_service): one scripted policy server behind a private
Postfix and behind mailflow, configured alike; each of the server's answers must give the same RCPT reply.

Not compared, because mailflow differs on purpose (docs/security.md): an answer Postfix cannot carry out
(`451 4.3.5 <rcpt>: Recipient address rejected: Server configuration error`, Postfix without the prefix).
"""
from __future__ import annotations

import asyncio

import pytest

from tests.support import SmtpClient, free_port, postfix_instance
from tests.support.policy import PolicyServer, read_request

pytestmark = pytest.mark.interop

ANSWERS = {  # the recipient's local part -> what the policy server answers for it
    "reject-with-code": "REJECT 5.1.2 bad mailbox",
    "reject-with-code-of-the-wrong-class": "REJECT 4.1.2 wrong class",
    "defer-with-code": "DEFER 4.2.0 greylisted",
    "defer-with-code-of-the-wrong-class": "DEFER 5.2.0 wrong class",
    "defer-without-text": "DEFER",
    "postgrey": "DEFER_IF_PERMIT 4.2.0 Greylisted, see http://postgrey.schweikert.ch/help/local.test.html",
    "defer-if-permit-without-text": "DEFER_IF_PERMIT",
    "unknown-defer-if-reject": "DEFER_IF_REJECT 4.2.0 soft",  # (unknown-*: no such user, a later refusal)
    "unknown-defer-if-reject-without-text": "DEFER_IF_REJECT",
    "unknown-postgrey": "DEFER_IF_PERMIT 4.2.0 Greylisted, see http://postgrey.schweikert.ch/help/local.test.html",
    # controls in the text (a broken or hostile server): each a space, the reply one printable line
    "reject-with-controls": "REJECT 5.7.1 a\rb\x01c\td\x7fe",
    "defer-with-controls": "DEFER a\x1bb",
}
MALFORMED = {  # answers Postfix warns about and takes as DUNNO (the next item, `reject`, decides), or as OK
    "prepend-without-header": "PREPEND",
    "prepend-not-a-header": "PREPEND not a header",
    "redirect-without-address": "REDIRECT",
    "redirect-not-an-address": "REDIRECT nobody",
    "bcc-without-address": "BCC",
    "bcc-not-an-address": "BCC nobody",
    "filter-without-value": "FILTER",
    "filter-without-nexthop": "FILTER smtp",
    "empty": "",  # "has empty value": OK
    "blank": "   ",
}


class ScriptedPolicy(PolicyServer):
    """SMTPD_POLICY_README's server side: answers each request by the recipient's local part (DUNNO else)."""

    def __init__(self, answers: dict[str, str] = ANSWERS):
        self.answers = answers
        self.requests: list[dict[str, str]] = []
        self.connections = 0  # accepted so far

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while request := await read_request(reader):
                self.requests.append(request)
                local = request.get("recipient", "").partition("@")[0]
                writer.write(f"{self.reply_lines(local)}\n\n".encode())
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def reply_lines(self, local: str) -> str:
        return f"action={self.answers.get(local, 'DUNNO')}"


async def replies(port: int, answers: dict[str, str] = ANSWERS) -> dict[str, str]:
    got = {}
    for local in answers:
        client = await SmtpClient.connect(port)
        assert (await client.cmd("EHLO client.test")).code == 250
        assert (await client.cmd("MAIL FROM:<s@remote.test>")).code == 250
        # (the servers' own policy timeouts decide the reply: the wait for it must outlast them on a loaded machine,
        # where Postfix's RCPT behind a dead service once took over the default 5 s)
        got[local] = (await client.cmd(f"RCPT TO:<{local}@local.test>", timeout=30)).text
        await client.close()
    return got


async def test_policy_answers_give_the_replies_postfix_gives(mailflow_server):
    users = ",".join(f"{local}=ok" for local in ANSWERS if not local.startswith("unknown-"))
    async with ScriptedPolicy() as policy:
        async with postfix_instance({
            "myhostname": "pf.test", "mydestination": "local.test", "local_recipient_maps": f"inline:{{{users}}}",
            "smtpd_recipient_restrictions": f"check_policy_service {policy.spec}",
        }) as pf:
            postfix = await replies(pf.port)
        connections = {"postfix": policy.connections}
        mf = await mailflow_server(local_recipient_maps=[f"inline:{{{users}}}"],
                                   smtpd={"recipient_restrictions": [f"check_policy_service {policy.spec}"]})
        mailflow = await replies(mf.smtp_addresses[0][1])
        connections["mailflow"] = policy.connections - connections["postfix"]
    assert {local: reply for local, reply in mailflow.items() if reply != postfix[local]} == {}, postfix
    # one session after another: a kept connection serves them all (Postfix: one per smtpd process)
    assert connections["mailflow"] == 1 <= connections["postfix"] < len(ANSWERS), connections
    # the answers themselves, so that a change on both sides cannot pass unnoticed
    assert postfix["reject-with-code-of-the-wrong-class"] == \
        "554 5.1.2 <reject-with-code-of-the-wrong-class@local.test>: Recipient address rejected: wrong class"
    assert postfix["postgrey"] == ("450 4.2.0 <postgrey@local.test>: Recipient address rejected: Greylisted, see "
                                   "http://postgrey.schweikert.ch/help/local.test.html")
    assert postfix["defer-without-text"].endswith(": Recipient address rejected: Access denied")
    assert postfix["unknown-defer-if-reject"] == \
        "450 4.2.0 <unknown-defer-if-reject@local.test>: Recipient address rejected: soft"
    assert postfix["unknown-postgrey"].startswith("450 4.2.0 ")  # before the implied unknown-user check
    assert postfix["reject-with-controls"] == \
        "554 5.7.1 <reject-with-controls@local.test>: Recipient address rejected: a b c d e"


async def test_malformed_answers_are_taken_as_postfix_takes_them(mailflow_server):
    users = ",".join(f"{local}=ok" for local in MALFORMED)
    async with ScriptedPolicy(MALFORMED) as policy:
        async with postfix_instance({
            "myhostname": "pf.test", "mydestination": "local.test", "local_recipient_maps": f"inline:{{{users}}}",
            "smtpd_recipient_restrictions": f"check_policy_service {policy.spec}, reject",
        }) as pf:
            postfix = await replies(pf.port, MALFORMED)
        mf = await mailflow_server(local_recipient_maps=[f"inline:{{{users}}}"], smtpd={
            "recipient_restrictions": [f"check_policy_service {policy.spec}", "reject"]})
        mailflow = await replies(mf.smtp_addresses[0][1], MALFORMED)
    assert {local: reply for local, reply in mailflow.items() if reply != postfix[local]} == {}, postfix
    assert postfix["prepend-not-a-header"] == \
        "554 5.7.1 <prepend-not-a-header@local.test>: Recipient address rejected: Access denied"
    assert postfix["empty"] == postfix["blank"] == "250 2.1.5 Ok"


COMPARED = ("request", "protocol_state", "protocol_name", "helo_name", "sender", "recipient", "recipient_count",
            "client_address", "size", "sasl_method", "sasl_username", "encryption_protocol", "etrn_domain",
            "server_address", "policy_context")


async def one_message(port: int) -> tuple[int, str]:
    """The message's session; the client's port and the queue id the 250 named."""
    client = await SmtpClient.connect(port)
    client_port = client.writer.get_extra_info("sockname")[1]
    for command in ("EHLO client.test", "MAIL FROM:<s@remote.test> SIZE=100", "RCPT TO:<alice@local.test>",
                    "RCPT TO:<bob@local.test>", "DATA"):
        assert (await client.cmd(command)).code in (250, 354), command
    queued = await client.cmd(b"Subject: t\r\n\r\nbody\r\n.")
    assert queued.code == 250
    await client.close()
    return client_port, queued.text.rpartition(" ")[2]


async def test_the_requests_carry_the_attributes_postfix_sends(mailflow_server):
    """Each RCPT's and the DATA request's attributes, and one `instance` for the message's requests."""
    users = "inline:{alice=ok, bob=ok}"
    lists = {"recipient_restrictions": "check_policy_service", "data_restrictions": "check_policy_service"}
    async with ScriptedPolicy() as policy:
        async with postfix_instance({
            "myhostname": "pf.test", "mydestination": "local.test", "local_recipient_maps": users,
            "relayhost": "[127.0.0.1]:9", **{f"smtpd_{name}": f"{item} {policy.spec}" for name, item in lists.items()},
            "smtpd_policy_service_policy_context": "submission",
        }) as pf:
            client_port, queued_as = await one_message(pf.port)
            ports, queue_ids = {"postfix": (client_port, pf.port)}, {"postfix": queued_as}
        postfix, policy.requests[:] = list(policy.requests), []
        mf = await mailflow_server(local_recipient_maps=[users], relayhost="[127.0.0.1]:9", smtpd={
            **{name: [f"{item} {policy.spec}"] for name, item in lists.items()},
            "policy_service_policy_context": "submission"})
        client_port, queue_ids["mailflow"] = await one_message(mf.smtp_addresses[0][1])
        ports["mailflow"] = (client_port, mf.smtp_addresses[0][1])
        mailflow = policy.requests
    assert [{k: r.get(k) for k in COMPARED} for r in mailflow] == [{k: r.get(k) for k in COMPARED} for r in postfix]
    assert set(postfix[0]) - set(mailflow[0]) == set()  # every attribute Postfix sends
    assert len(postfix[0]) == 29 and postfix[0]["policy_context"] == "submission"
    for side, requests in (("postfix", postfix), ("mailflow", mailflow)):  # each session's own ports
        assert {(r["client_port"], r["server_port"]) for r in requests} == {tuple(map(str, ports[side]))}, side
    # queue_id: from the RCPT after the first accepted one on (Postfix opens its queue file at that one), the id
    # the message is queued as
    for side, requests in (("postfix", postfix), ("mailflow", mailflow)):
        assert [r["queue_id"] for r in requests] == ["", queue_ids[side], queue_ids[side]], side
    assert [r["protocol_state"] for r in postfix] == ["RCPT", "RCPT", "DATA"]
    assert [r["recipient_count"] for r in postfix] == ["0", "0", "2"]  # non-zero only from DATA on
    assert len({r["instance"] for r in mailflow}) == 1 and mailflow[0]["instance"]


async def test_behind_a_proxy_the_header_names_client_and_server(mailflow_server):
    """Behind a balancer (smtpd_upstream_proxy_protocol = haproxy), Postfix's policy requests carry the client
    the PROXY header names (client_address, client_port) and the address that client connected to, the
    header's destination (server_address, server_port), not the balancer's connection."""
    header = b"PROXY TCP4 192.0.2.10 203.0.113.5 40001 2525\r\n"
    async with ScriptedPolicy() as policy:
        async with postfix_instance({
            "myhostname": "pf.test", "mydestination": "local.test", "local_recipient_maps": "inline:{alice=ok, bob=ok}",
            "smtpd_upstream_proxy_protocol": "haproxy",
            "smtpd_recipient_restrictions": f"check_policy_service {policy.spec}",
        }) as pf:
            await rcpt_behind(pf.port, header)
        mf = await mailflow_server(local_recipient_maps=["inline:{alice=ok, bob=ok}"], smtpd={
            "listen": [], "recipient_restrictions": [f"check_policy_service {policy.spec}"],
            "listeners": [{"address": "127.0.0.1:0", "role": "mta",
                           "overrides": {"upstream_proxy_protocol": "haproxy"}}]})
        await rcpt_behind(mf.smtp_addresses[0][1], header)
    attributes = ("client_address", "client_port", "server_address", "server_port")
    postfix, mailflow = ({k: r[k] for k in attributes} for r in policy.requests)
    assert postfix == {"client_address": "192.0.2.10", "client_port": "40001", "server_address": "203.0.113.5",
                       "server_port": "2525"}
    assert mailflow == postfix


XCLIENTS = ("XCLIENT ADDR=192.0.2.10 PORT=40001 DESTADDR=203.0.113.5 DESTPORT=2525",
            "XCLIENT NAME=[UNAVAILABLE] REVERSE_NAME=r.test ADDR=192.0.2.11 PORT=99999 DESTADDR=198.51.100.5 "
            "DESTPORT=[UNAVAILABLE]",
            "XCLIENT NAME=n.test ADDR=192.0.2.12 PORT=[UNAVAILABLE] DESTADDR=[UNAVAILABLE]",
            "XCLIENT REVERSE_NAME=[TEMPUNAVAIL] ADDR=192.0.2.13 PORT=25",
            "XCLIENT NAME=[UNAVAILABLE] PORT=40004",  # (no ADDR: the reverse name stays the one found at connect)
            "XCLIENT NAME=[TEMPUNAVAIL] ADDR=192.0.2.14 PORT=40005",
            "XCLIENT ADDR=IPV6:::ffff:192.0.2.15 PORT=40006 DESTADDR=IPv6:::FFFF:198.51.100.6",  # (IPv4-mapped)
            "XCLIENT ADDR=192.0.2.16 PORT=0 DESTPORT=0",  # (0, not unknown: that is [UNAVAILABLE]'s)
            "XCLIENT ADDR=192.0.2.17 PORT=00025 DESTPORT=00587")  # (the digits as sent)


async def test_xclient_names_the_client_and_server_of_the_requests(mailflow_server):
    """smtpd.c xclient_cmd: ADDR and PORT name the client, DESTADDR and DESTPORT the server (`unknown` for
    [UNAVAILABLE], a port of up to five digits as given: 00025 stays 00025), NAME the client's name and reverse
    name, REVERSE_NAME the reverse name only; ADDR alone keeps the names (the front end's). mailflow refused
    DESTADDR, DESTPORT and REVERSE_NAME and a port above 65535, sent the client name as the reverse name and reset
    it at ADDR."""
    attributes = ("client_address", "client_port", "client_name", "reverse_client_name", "server_address",
                  "server_port")
    async with ScriptedPolicy() as policy:
        async with postfix_instance({
            "myhostname": "pf.test", "mydestination": "local.test", "local_recipient_maps": "inline:{alice=ok}",
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
            "smtpd_recipient_restrictions": f"check_policy_service {policy.spec}",
        }) as pf:
            for xclient in XCLIENTS:
                await rcpt_after(pf.port, xclient)
        postfix, policy.requests[:] = [seen(r, attributes, pf.port) for r in policy.requests], []
        mf = await mailflow_server(local_recipient_maps=["inline:{alice=ok}"], smtpd={
            "authorized_xclient_hosts": ["127.0.0.0/8"],
            "recipient_restrictions": [f"check_policy_service {policy.spec}"]})
        for xclient in XCLIENTS:
            await rcpt_after(mf.smtp_addresses[0][1], xclient)
        mailflow = [seen(r, attributes, mf.smtp_addresses[0][1]) for r in policy.requests]
    assert mailflow == postfix
    assert postfix[0] == {"client_address": "192.0.2.10", "client_port": "40001", "client_name": "localhost",
                          "reverse_client_name": "localhost", "server_address": "203.0.113.5", "server_port": "2525"}
    assert postfix[1]["reverse_client_name"] == "r.test" and postfix[1]["server_port"] == "unknown"
    assert [(r["client_name"], r["reverse_client_name"]) for r in postfix[4:6]] == [("unknown", "localhost")] * 2
    assert (postfix[6]["client_address"], postfix[6]["server_address"]) == ("192.0.2.15", "198.51.100.6")
    assert (postfix[7]["client_port"], postfix[7]["server_port"]) == ("0", "0")
    assert (postfix[8]["client_port"], postfix[8]["server_port"]) == ("00025", "00587")


def seen(request: dict[str, str], attributes: tuple[str, ...], listener: int) -> dict[str, str]:
    """The request's `attributes`, the server's own listening port as LISTENER (each side has its own)."""
    got = {k: request[k] for k in attributes}
    return {**got, "server_port": "LISTENER"} if got["server_port"] == str(listener) else got


async def rcpt_after(port: int, xclient: str) -> None:
    client = await SmtpClient.connect(port)
    for command in ("EHLO front.test", xclient, "EHLO client.test", "MAIL FROM:<s@remote.test>",
                    "RCPT TO:<alice@local.test>"):
        assert (await client.cmd(command)).code in (220, 250), command
    await client.close()


async def rcpt_behind(port: int, header: bytes) -> None:
    client = await SmtpClient.connect(port, first=header)
    for command in ("EHLO client.test", "MAIL FROM:<s@remote.test>", "RCPT TO:<alice@local.test>"):
        assert (await client.cmd(command)).code == 250, command
    await client.close()


async def test_lists_run_early_send_the_requests_postfix_sends(mailflow_server):
    """delay_reject false (smtpd_delay_reject = no): the client, helo and sender lists' requests at connect, EHLO
    and MAIL, what they name (protocol_state CONNECT, EHLO, MAIL) and what is known by then."""
    users = "inline:{alice=ok, bob=ok}"
    lists = {"client_restrictions": "check_policy_service", "helo_restrictions": "check_policy_service",
             "sender_restrictions": "check_policy_service"}
    async with ScriptedPolicy() as policy:
        async with postfix_instance({
            "myhostname": "pf.test", "mydestination": "local.test", "local_recipient_maps": users,
            "relayhost": "[127.0.0.1]:9", "smtpd_delay_reject": "no",
            **{f"smtpd_{name}": f"{item} {policy.spec}" for name, item in lists.items()},
        }) as pf:
            client_port, _ = await one_message(pf.port)
        # (the session's own: the instance's readiness check connected first)
        postfix = [r for r in policy.requests if r["client_port"] == str(client_port)]
        policy.requests[:] = []
        mf = await mailflow_server(local_recipient_maps=[users], relayhost="[127.0.0.1]:9", smtpd={
            "delay_reject": False, **{name: [f"{item} {policy.spec}"] for name, item in lists.items()}})
        await one_message(mf.smtp_addresses[0][1])
        mailflow = policy.requests
    assert [r["protocol_state"] for r in postfix] == ["CONNECT", "EHLO", "MAIL"]
    assert [r["size"] for r in postfix] == ["0", "0", "100"]
    assert [{k: r.get(k) for k in COMPARED} for r in mailflow] == [{k: r.get(k) for k in COMPARED} for r in postfix]


async def test_a_services_own_settings_in_braces_override_the_main_ones_as_in_postfix(mailflow_server):
    """Postfix 3.0's `check_policy_service { endpoint, name=value, ... }`: the first service sends its own
    policy_context (not smtpd's), the second, which cannot be asked, answers with its own default_action (braced:
    it has spaces) after its own timeout; try_limit=1 spares Postfix its retry a second later."""
    dead = f"inet:127.0.0.1:{free_port()}"
    async with ScriptedPolicy({"alice": "DUNNO"}) as policy:
        items = [f"check_policy_service {{ {policy.spec}, policy_context=per-service, max_idle=10s }}",
                 f"check_policy_service {{ {dead}, timeout=2s, try_limit=1, retry_delay=1s, "
                 "{ default_action = 450 4.7.1 policy down } }"]
        async with postfix_instance({
            "myhostname": "pf.test", "mydestination": "local.test", "local_recipient_maps": "inline:{alice=ok}",
            "smtpd_recipient_restrictions": ", ".join(items), "smtpd_policy_service_policy_context": "main",
        }) as pf:
            postfix = await replies(pf.port, {"alice": ""})
        postfix_requests, policy.requests[:] = list(policy.requests), []
        mf = await mailflow_server(local_recipient_maps=["inline:{alice=ok}"], smtpd={
            "recipient_restrictions": items, "policy_service_policy_context": "main"})
        mailflow = await replies(mf.smtp_addresses[0][1], {"alice": ""})
        mailflow_requests = policy.requests
    assert mailflow == postfix == {"alice": "450 4.7.1 <alice@local.test>: Recipient address rejected: policy down"}
    assert [r["policy_context"] for r in mailflow_requests] == [r["policy_context"] for r in postfix_requests] == \
        ["per-service"]


RAW = {  # the recipient's local part -> the reply's lines as the policy server writes them (its empty line follows)
    "blank-before-the-name": " action=REJECT 5.7.1 spaced",
    "blank-after-the-name": "action =REJECT 5.7.1 spaced",
    "two-actions": "action=REJECT 5.7.1 first\naction=OK",
    "another-attribute-first": "x=1\naction=REJECT 5.7.1 second line",
}


class RawPolicy(ScriptedPolicy):
    """Writes each answer's lines as they are, not as one `action=` line."""

    def reply_lines(self, local: str) -> str:
        return self.answers.get(local, "action=DUNNO")


async def test_reply_lines_are_read_as_postfix_reads_them(mailflow_server):
    """An attribute's name is what stands before its `=`, blanks included (Postfix's attr_scan_plain): ` action`
    and `action ` are not `action`, and a reply without one gets the default action (mailflow took both as the
    action). Not compared: `action= REJECT …`, a blank after the `=`, which Postfix reads as a restriction list
    (`reject`: Access denied) and mailflow as the action REJECT with its text."""
    users = ",".join(f"{local}=ok" for local in RAW)
    async with RawPolicy(RAW) as policy:
        async with postfix_instance({
            "myhostname": "pf.test", "mydestination": "local.test", "local_recipient_maps": f"inline:{{{users}}}",
            "smtpd_recipient_restrictions": f"check_policy_service {policy.spec}",
        }) as pf:
            postfix = await replies(pf.port, RAW)
        mf = await mailflow_server(local_recipient_maps=[f"inline:{{{users}}}"],
                                   smtpd={"recipient_restrictions": [f"check_policy_service {policy.spec}"]})
        mailflow = await replies(mf.smtp_addresses[0][1], RAW)
    assert {local: reply for local, reply in mailflow.items() if reply != postfix[local]} == {}, postfix
    assert postfix["blank-before-the-name"] == postfix["blank-after-the-name"].replace("after", "before") == \
        "451 4.3.5 <blank-before-the-name@local.test>: Recipient address rejected: Server configuration problem"
