"""Differential test: sender-dependent routing (sender_dependent_relayhost_maps and
sender_dependent_default_transport_maps) against a private Postfix configured alike. Both relay every message to
one of four smtp-sinks on 127.0.0.1 (the next hops), shared by the two servers; each message's Subject names the
server and the probe, so the dumps show which next hop got which sender's mail. The probes are what an admin of a
multi-account relay would notice: the whole address, its extension, @domain, a bare user of this host's origin,
the null sender, DUNNO, the relay class (relayhost maps only), and transport_maps and a transport's own next hop
overruling the sender."""
from __future__ import annotations

import contextlib
import re

import aiosmtplib
import pytest

from tests.support.postfix import smtp_sink
from tests.support import eventually, postfix_instance, queue_becomes, rcpt_reply

pytestmark = pytest.mark.interop

PROBES = [  # (envelope sender, recipient)
    ("alice@acct.test", "x@remote.test"),      # the whole address: hop 1
    ("alice+tag@acct.test", "x@remote.test"),  # without its extension: hop 1
    ("bob@acct.test", "x@remote.test"),        # @domain: hop 2
    ("root@origin.test", "x@remote.test"),     # a bare user key, for myorigin's addresses: hop 2
    ("root@other.test", "x@remote.test"),      # ... not for others: relayhost (hop 0)
    ("", "x@remote.test"),                     # the null sender, as <>: hop 3
    ("dunno@acct.test", "x@remote.test"),      # DUNNO: relayhost
    ("carol@plain.test", "x@remote.test"),     # no entry: relayhost
    ("alice@acct.test", "x@relay.test"),       # the relay class takes the sender's relayhost too
    ("dave@special.test", "x@relay.test"),     # ... but not its default transport: relayhost
    ("dave@special.test", "x@remote.test"),    # its default transport, whose own next hop wins: hop 3
    ("eve@lmtp.test", "x@remote.test"),        # a default transport without a next hop keeps the sender's relayhost
    ("alice@acct.test", "x@tm.test"),          # transport_maps overrule the sender: hop 0
]


def settings(hops: list[int]) -> dict[str, str]:
    """main.cf-style settings (one string each), the same for both servers but for their syntax."""
    hop = [f"[127.0.0.1]:{port}" for port in hops]
    return {
        "relayhost": hop[0],
        "sender_dependent_relayhost_maps": (
            f"inline:{{ {{alice@acct.test = {hop[1]}}}, {{@acct.test = {hop[2]}}}, {{root = {hop[2]}}},"
            f" {{<> = {hop[3]}}}, {{dunno@acct.test = DUNNO}}, {{@lmtp.test = {hop[2]}}} }}"),
        "sender_dependent_default_transport_maps": (
            f"inline:{{ {{@special.test = smtp:{hop[3]}}}, {{@lmtp.test = smtp:}} }}"),
        "transport_maps": f"inline:{{ {{tm.test = smtp:{hop[0]}}} }}",
    }


async def send_probes(port: int, server: str) -> None:
    for i, (sender, rcpt) in enumerate(PROBES):
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10) as client:
            await client.ehlo()
            await client.sendmail(sender, [rcpt], f"Subject: {server}-probe-{i}\r\n\r\nx\r\n".encode())


def hops_reached(dumps, server: str) -> dict[int, set[tuple[int, str]]]:
    """Per probe, the (next hop, MAIL FROM) pairs its copies went out with, from the smtp-sinks' dumps."""
    out: dict[int, set[tuple[int, str]]] = {}
    for n, dump in enumerate(dumps):
        text = dump.read_text(errors="replace") if dump.exists() else ""
        for message in text.split("X-Client-Addr:")[1:]:
            subject = re.search(rf"^Subject: {server}-probe-(\d+)", message, re.MULTILINE)
            sender = re.search(r"^X-Mail-Args: <(.*?)>", message, re.MULTILINE)
            if subject and sender:
                out.setdefault(int(subject.group(1)), set()).add((n, sender.group(1)))
    return out


async def test_sender_dependent_routing_matches_a_real_postfix(mailflow_server):
    async with contextlib.AsyncExitStack() as stack:
        sinks = [await stack.enter_async_context(smtp_sink()) for _ in range(4)]
        ports, dumps = [port for port, _ in sinks], [dump for _, dump in sinks]
        routing = settings(ports)
        async with postfix_instance({"myhostname": "pf.test", "myorigin": "origin.test",
                                     "mydestination": "local.test", "relay_domains": "relay.test",
                                     "recipient_delimiter": "+",
                                     **routing}) as pf:
            await send_probes(pf.port, "pf")
            await pf.queue_empty()
        mf = await mailflow_server(myorigin="origin.test", mynetworks=["127.0.0.0/8"],
                                   **{k: v if k == "relayhost" else [v] for k, v in routing.items()})
        await send_probes(mf.smtp_addresses[0][1], "mf")
        await queue_becomes(mf.store, {})
        every = set(range(len(PROBES)))
        await eventually(lambda: set(hops_reached(dumps, "pf")) == every and set(hops_reached(dumps, "mf")) == every,
                         what="every probe at a next hop")
        postfix_went, mailflow_went = hops_reached(dumps, "pf"), hops_reached(dumps, "mf")
    assert mailflow_went == postfix_went
    # the edges themselves, so that a change in both cannot pass unnoticed
    assert [sorted(postfix_went[i])[0][0] for i in range(len(PROBES))] == [1, 1, 2, 2, 0, 3, 0, 0, 1, 0, 3, 2, 0]
    assert postfix_went[5] == {(3, "")}


async def test_a_sender_routed_to_the_error_transport_is_refused_at_rcpt_as_postfix_refuses_it(mailflow_server):
    """Postfix's smtpd resolves a recipient with the MAIL FROM sender (smtpd_resolve_addr) and refuses at RCPT
    what resolves to the error transport, so a sender-dependent `error:` default transport makes no backscatter:
    the same reply from both, and the other senders' mail is taken."""
    blocked = "inline:{ {@blocked.test=error:5.7.1 not allowed off site} }"
    async with postfix_instance({"mydestination": "", "sender_dependent_default_transport_maps": blocked}) as pf:
        postfix = [(await rcpt_reply(pf.port, "x@remote.test", sender)).text
                   for sender in ("eve@blocked.test", "ann@ok.test")]
    mf = await mailflow_server(mydestination=[], sender_dependent_default_transport_maps=[blocked],
                               mynetworks=["127.0.0.0/8"])
    mailflow = [(await rcpt_reply(mf.smtp_addresses[0][1], "x@remote.test", sender)).text
                for sender in ("eve@blocked.test", "ann@ok.test")]
    assert mailflow == postfix
    assert postfix[0].startswith("550 5.7.1 <x@remote.test>:") and postfix[1].startswith("250")
