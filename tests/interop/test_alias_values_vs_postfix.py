"""Differential test: the values of local aliases (alias_maps) are read as Postfix's local(8) reads them, with its
RFC 822 parser (tok822), against a private Postfix 3.7 configured alike. Both forward every alias's addresses to
their own smtp-sink (relayhost), whose dump shows the RCPT TOs. The values: a display name with angle brackets, a
quoted display name holding a comma, a comment, addresses side by side without a comma, a group, a quoted local
part with a blank, a plain list. (mailflow refused the whole aliases file over the first four.)"""
from __future__ import annotations

import re

import pytest

from tests.support.postfix import smtp_sink
from tests.support import SmtpClient, eventually, postfix_instance

pytestmark = pytest.mark.interop

ALIASES = ("inline:{ {a1 = Joe <joe@d.test>}, {a2 = \"Smith, Joe\" <qc@d.test>, o2@d.test},"
           " {a3 = joe3@d.test (Joe)}, {a4 = s1@d.test s2@d.test}, {a5 = grp: g1@d.test, g2@d.test;},"
           " {a6 = \"joe smith\"@d.test}, {a7 = p1@d.test, <p2@d.test>} }")
NAMES = ["a1", "a2", "a3", "a4", "a5", "a6", "a7"]
COMMON = {"myhostname": "mx.local.test", "myorigin": "local.test"}


async def send(port: int) -> None:
    for name in NAMES:
        client = await SmtpClient.connect(port)
        assert (await client.cmd("EHLO client.test")).code == 250
        assert (await client.cmd("MAIL FROM:<s@remote.test>")).code == 250
        assert (await client.cmd(f"RCPT TO:<{name}@local.test>")).code == 250, name
        assert (await client.cmd("DATA")).code == 354
        assert (await client.cmd(f"Subject: probe-{name}\r\nFrom: s@remote.test\r\n\r\nx\r\n.")).code == 250
        await client.close()


def arrivals(dump) -> dict[str, list[str]]:
    """Per alias (the probe's Subject): the RCPT TOs the sink got, sorted (each server may split them its way)."""
    out: dict[str, list[str]] = {}
    text = dump.read_text(errors="replace") if dump.exists() else ""
    for message in text.split("X-Client-Addr:")[1:]:
        subject = re.search(r"^Subject: probe-(a\d)", message, re.MULTILINE)
        if subject and "X-Mail-Args: <>" not in message:
            out.setdefault(subject.group(1), []).extend(re.findall(r"^X-Rcpt-Args: <(.*?)>", message, re.MULTILINE))
    return {name: sorted(rcpts) for name, rcpts in out.items()}


async def run(port: int, dump, expected: int) -> dict[str, list[str]]:
    await send(port)
    return await eventually(lambda: sum(map(len, arrivals(dump).values())) == expected and arrivals(dump), timeout=20)


async def test_alias_values_are_read_as_postfixs_local_reads_them(mailflow_server):
    async with smtp_sink() as (pf_sink, pf_dump), smtp_sink() as (mf_sink, mf_dump):
        async with postfix_instance({**COMMON, "mydestination": "local.test", "relayhost": f"[127.0.0.1]:{pf_sink}",
                                     "local_recipient_maps": "", "alias_maps": ALIASES}) as pf:
            postfix = await run(pf.port, pf_dump, 11)
        mf = await mailflow_server(**COMMON, mydestination=["local.test"], relayhost=f"[127.0.0.1]:{mf_sink}",
                                   mynetworks=["127.0.0.0/8"], alias_maps=[ALIASES])
        mailflow = await run(mf.smtp_addresses[0][1], mf_dump, 11)
    assert mailflow == postfix
    assert postfix == {"a1": ["joe@d.test"], "a2": ["o2@d.test", "qc@d.test"], "a3": ["joe3@d.test"],
                       "a4": ["s1@d.test", "s2@d.test"], "a5": ["g1@d.test", "g2@d.test"],
                       "a6": ['"joe smith"@d.test'], "a7": ["p1@d.test", "p2@d.test"]}
