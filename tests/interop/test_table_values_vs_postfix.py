"""Differential test: the values of canonical_maps and virtual_alias_maps are RFC 822 address lists, parsed as Postfix's
mail_addr_crunch parses them (tok822), against a private Postfix configured alike. Both relay every message to their
own smtp-sink, whose dump shows the MAIL FROM and the RCPT TOs the next hop got. The values are those an admin
writes: a display name and angle brackets, a comment, a group, addresses side by side without a comma, a quoted
local part with a blank, a display name that holds a comma, a source route, a user without a domain, a trailing
dot, needless quotes, empty items and `<>` or a comment inside a list (no address); `@domain` first in a list
(Postfix puts the local part before the whole value and quotes all before its last '@': one odd address); a
value that holds no address (a comment alone, an empty group, `Joe <>`) refuses the message with 451, as
Postfix's "non-address result" does. Canonical maps take the first address of the value (sender and recipient).

Left out: a value that is `<>` alone, which Postfix makes the null address and its resolver then
empty_address_recipient (MAILER-DAEMON); mailflow has no such setting and bounces the recipient."""
from __future__ import annotations

import shutil

import pytest

from tests.support.postfix import probe_envelopes, smtp_sink
from tests.interop.test_tables_vs_postfix import readable_folder
from tests.support import eventually, postfix_instance, send_probe

pytestmark = pytest.mark.interop

VALUES = {  # key (local part at v.test) -> the table's value
    "display": "Joe Smith <joe@d.test>",
    "angle": "<angle@d.test>",
    "comment": "com@d.test (the comment)",
    "group": "team: g1@d.test, g2@d.test;",
    "side": "s1@d.test s2@d.test",
    "quoted": '"joe smith"@d.test',
    "qcomma": '"Smith, Joe" <qc@d.test>, other@d.test',
    "route": "<@relay.test:routed@d.test>",
    "atdom": "@d.test, extra@d.test",
    "bare": "plainuser",
    "dot": "dot@d.test.",
    "needless": '"needless"@d.test',
    "nothing": "(no address here)",
    "emptygrp": "undisclosed:;",
    "mixed": "m1@d.test, (just a comment), <>",
    "commas": "a1@d.test,,a2@d.test",
    "joedisp": "Joe <>",
    "atlater": "l1@d.test, @e.test",
}

CANONICAL = {"cdisplay": "Ann Canon <ann@c.test>", "cgroup": "grp: c1@c.test, c2@c.test;", "ccomment": "(x) cc@c.test"}


def table_file(folder, name: str, values: dict[str, str], domain: str) -> str:
    (folder / name).write_text("".join(f"{key}@{domain} {value}\n" for key, value in values.items()))
    return f"texthash:{folder}/{name}"


PROBES = [("s@remote.test", [f"{key}@v.test"]) for key in VALUES] + [
    (f"{key}@c.test", ["r@x.test"]) for key in CANONICAL] + [("s@remote.test", [f"{key}@c.test" for key in CANONICAL])]


async def send_probes(port: int) -> list[int | None]:
    return [await send_probe(port, sender, rcpts, f"Subject: probe-{i}\r\nFrom: s@remote.test\r\n\r\nx")
            for i, (sender, rcpts) in enumerate(PROBES)]


async def run(port: int, dump) -> dict[int, tuple]:
    replies = await send_probes(port)
    accepted = [i for i, code in enumerate(replies) if code == 250]
    arrived = await eventually(lambda: sorted(probe_envelopes(dump)) == accepted and probe_envelopes(dump), timeout=20)
    return {i: (replies[i], arrived.get(i)) for i in range(len(PROBES))}


async def test_table_values_are_parsed_as_a_real_postfix_parses_them(mailflow_server):
    folder = readable_folder()
    virtual = table_file(folder, "virtual", VALUES, "v.test")
    canonical = table_file(folder, "canonical", CANONICAL, "c.test")
    common = {"myhostname": "mx.origin.test", "myorigin": "origin.test"}
    async with smtp_sink() as (pf_sink, pf_dump), smtp_sink() as (mf_sink, mf_dump):
        async with postfix_instance({**common, "mydestination": "", "relayhost": f"[127.0.0.1]:{pf_sink}",
                                     "canonical_maps": canonical, "virtual_alias_maps": virtual}) as pf:
            postfix = await run(pf.port, pf_dump)
        mf = await mailflow_server(**common, mydestination=[], relayhost=f"[127.0.0.1]:{mf_sink}",
                                   mynetworks=["127.0.0.0/8"], canonical_maps=[canonical],
                                   virtual_alias_maps=[virtual])
        mailflow = await run(mf.smtp_addresses[0][1], mf_dump)
    shutil.rmtree(folder)
    diff = {f"{i}: {PROBES[i]}": (postfix[i], mailflow[i]) for i in postfix if postfix[i] != mailflow[i]}
    assert diff == {}
    # the edges themselves, so that the same change on both sides cannot pass unnoticed
    keys = list(VALUES)
    assert postfix[keys.index("display")][1][1] == ["<joe@d.test> ORCPT=rfc822;display@v.test"]
    assert postfix[keys.index("group")][1][1] == [f"<g{i}@d.test> ORCPT=rfc822;group@v.test" for i in (1, 2)]
    assert postfix[keys.index("atdom")][1][1] == ['<"atdom@d.test, extra"@d.test> ORCPT=rfc822;atdom@v.test']
    assert postfix[keys.index("mixed")][1][1] == ["<m1@d.test> ORCPT=rfc822;mixed@v.test"]
    assert [postfix[keys.index(k)][0] for k in ("nothing", "emptygrp", "joedisp")] == [451, 451, 451]
    assert postfix[len(VALUES)][1][0] == ["ann@c.test"]
