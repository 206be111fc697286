"""Differential test: the same recipients, sent over SMTP to a private Postfix and to mailflow configured alike,
must get the same RCPT reply class and end up at the same final addresses. Both servers hand every message
(local ones too: local_transport is smtp to the sink) to an smtp-sink, whose dump shows the RCPT TO each
recipient went out with. The probes are the routing edges a Postfix admin would notice: own address literals,
exact versus parent-style domain lists, postmaster, the error transport at RCPT, the percent hack (in a quoted
local part too), and a second `@domain` virtual alias result."""
from __future__ import annotations

import re

import aiosmtplib
import pytest

from tests.support import eventually, postfix_instance, queue_becomes
from tests.support.postfix import smtp_sink

pytestmark = pytest.mark.interop

PROBES = [
    "alice@local.test",
    "nobody@local.test",
    "postmaster@local.test",  # not in local_recipient_maps: taken anyway
    "dave%remote.test@local.test",  # the percent hack makes it remote: relay denied
    "alice%localhost@local.test",  # ... or local again
    '"dave@remote.test"@local.test',  # a quoted local part is opened (resolve_dequoted_address): relay denied
    '"alice@localhost"@local.test',  # ... or local again
    "alice@[127.0.0.1]",  # an address of this server: local
    "x@sub.relay.test",  # relay_domains covers subdomains
    "x@sub.local.test",  # mydestination does not
    "gone@local.test",  # transport_maps -> error: refused at RCPT with its text
    "info@local.test",  # virtual alias: bob@relay.test, @relay.test
]


async def probe(port: int) -> dict[str, int]:
    """RCPT reply code per probe; accepted ones are sent, one message each, tagged by index."""
    codes = {}
    for i, rcpt in enumerate(PROBES):
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10) as client:
            await client.ehlo()
            await client.mail("s@remote.test")
            reply = await client.execute_command(f"RCPT TO:<{rcpt}>".encode())
            codes[rcpt] = reply.code
            if reply.code == 250:
                await client.data(f"Subject: probe-{i}\r\n\r\nx\r\n".encode())
    return codes


def arrivals(dump) -> dict[str, set[str]]:
    """Final RCPT TO addresses per probe, from an smtp-sink dump."""
    out: dict[str, set[str]] = {}
    text = dump.read_text(errors="replace") if dump.exists() else ""
    for message in text.split("X-Client-Addr:")[1:]:
        subject = re.search(r"^Subject: probe-(\d+)", message, re.MULTILINE)
        rcpts = re.findall(r"^X-Rcpt-Args: <(.*?)>", message, re.MULTILINE)
        if subject:
            out.setdefault(PROBES[int(subject.group(1))], set()).update(rcpts)
    return out


async def test_routing_edges_match_a_real_postfix(mailflow_server):
    async with smtp_sink() as (pf_sink, pf_dump), smtp_sink() as (mf_sink, mf_dump):
        async with postfix_instance({
            "myhostname": "pf.test", "mydestination": "local.test, localhost", "relay_domains": "relay.test",
            "mynetworks": "192.0.2.0/24", "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "relayhost": f"[127.0.0.1]:{pf_sink}", "local_transport": f"smtp:[127.0.0.1]:{pf_sink}",
            "local_recipient_maps": "inline:{alice=ok}", "recipient_delimiter": "+",
            "transport_maps": "inline:{ {gone@local.test = error:5.7.1 moved away} }",
            "virtual_alias_maps": "inline:{ {info@local.test = bob@relay.test, @relay.test} }",
        }) as pf:
            postfix_codes = await probe(pf.port)
            await pf.queue_empty()
        mf = await mailflow_server(
            mydestination=["local.test", "localhost"], relay_domains=["relay.test"], mynetworks=["192.0.2.0/24"],
            relayhost=f"[127.0.0.1]:{mf_sink}", local_transport=f"smtp:[127.0.0.1]:{mf_sink}",
            local_recipient_maps=["inline:{alice=ok}"],
            transport_maps=["inline:{ {gone@local.test = error:5.7.1 moved away} }"],
            virtual_alias_maps=["inline:{ {info@local.test = bob@relay.test, @relay.test} }"])
        mailflow_codes = await probe(mf.smtp_addresses[0][1])
        await queue_becomes(mf.store, {})
        expected = {p for p, code in postfix_codes.items() if code == 250}
        await eventually(lambda: set(arrivals(pf_dump)) == expected and set(arrivals(mf_dump)) == expected)
        postfix_went, mailflow_went = arrivals(pf_dump), arrivals(mf_dump)
    assert mailflow_codes == postfix_codes
    assert mailflow_went == postfix_went
    # the edges themselves, so that a change in both cannot pass unnoticed
    assert postfix_codes["gone@local.test"] == 550 and postfix_codes["postmaster@local.test"] == 250
    assert postfix_codes["dave%remote.test@local.test"] == 554
    assert postfix_went["info@local.test"] == {"bob@relay.test", '""@relay.test'}
    assert postfix_went["alice%localhost@local.test"] == {"alice@localhost"}
    assert postfix_codes['"dave@remote.test"@local.test'] == 554
    assert postfix_went['"alice@localhost"@local.test'] == {"alice@localhost"}
