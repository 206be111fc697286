"""Differential test of addresses in RFC 822 quoting against a real Postfix 3.7: a private Postfix and mailflow,
configured alike, each relaying everything (local mail too) to its own smtp-sink, get the same addresses as MAIL
FROM, as RCPT TO (with and without ORCPT) and in From/Reply-To/To/Cc, from 127.0.0.1 (a client whose header
addresses are rewritten). Compared per probe: the replies to MAIL, RCPT and the end of DATA; the envelope the sink
saw (MAIL FROM, RCPT TO with its ORCPT); the header fields' values as written (not taken apart: the quoting is the
point); and the delivery lines' to= and orig_to=. (Through sendmail, command line and -t: test_sendmail_vs_postfix.py.)

Postfix's smtpd takes a local part of atoms and quoted strings joined by dots (tok822), keeps it in internal form
(quotes opened, quoted pairs undone) and writes it out in its own quoting (quote_822_local) wherever it leaves:
`a."b c"@x.test` is sent as `"a.b c"@x.test`, `"a"."b"` as `a.b`, `"a\\b"` as `ab`, `joe.` as `"joe."`; two words
side by side (`"a""b"`) are two addresses to it: 501. A header address is rewritten from its words as written: the
percent hack of an unqualified one sees a `%` outside quotes only, and a source route goes. Table keys are asked in
Postfix's quoting, the extension split off the internal form (`"v 3+ext"@x.test` finds `"v 3"@x.test`); access
tables (check_recipient_access) and local(8)'s alias_maps (a second test, through local delivery) are asked each
key in internal form too (`"w.1."@x.test` finds `w.1.@x.test`, `"al.1."@alias.test` the alias `al.1.`), virtual
alias tables not; a third test (MAPS) asks transport, relocated, bcc, relay recipient, virtual mailbox and canonical
maps an internal-form key and a quoted one each (Postfix's mail_addr_find legacy form; canonical: quoted only).

CURATED holds the cases the seeded generator (`generated`) found, and their neighbours; set MAILFLOW_QUOTE_SEEDS
(`1,2,3`) to run `test_generated_addresses_match_a_real_postfix` over that many seeds of 40 addresses more.

swap_bangpath (Postfix's default yes): `site!user` without a domain is `user@site`, the `!` found among the words as
given, before the percent hack (`a!b%c` is `b%c@a`); `site!user@<a local domain>` resolves to `user@site`.
"""
from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path

import pytest

from tests.support import SmtpClient, eventually, postfix_instance, queue_becomes
from tests.support.postfix import dumped_messages, smtp_sink

pytestmark = pytest.mark.interop

ATOMS = ["a", "Bob", "x-y", "o'neil", "joe+tag", "A.B", "user%y.test", "u!h", "Z"]
QUOTED_CONTENT = ["b c", "a", "", "a.b", "a..b", ".a", "a.", "x@y", "a,b", "a\\\"b", "a\\\\b", "a\\b", "<x>", "a;b",
                  "A B", "a(b)", "a:b", "%p", "a]b"]
DOMAINS = ["x.test", "X.Test", "x.test.", "local.test", "[192.0.2.1]", "[IPv6:2001:db8::1]", ""]

# found by the generator (seeds 1 to 5) or next to what it found
CURATED = [
    'a."b c"@x.test', '"a"."b"@x.test', '"a\\b"@x.test', '"a\\\\b"@x.test', '"b c"@x.test', '"a.b"@x.test',
    '"a..b"@x.test', "a..b@x.test", ".a@x.test", "joe+tag.@x.test.", '""@x.test', '"".@X.Test',
    '"".o\'neil."a(b)"@X.Test', '".a"."a\\"b"@X.Test', 'Z."<x>"."a\\\\b"@[IPv6:2001:db8::1]',
    '"<x>".Z.Bob@[192.0.2.1]', '"a;b"."x@y"@X.Test', 'o\'neil."A B"."b c"@local.test',
    # the percent hack: in internal form in the envelope, among the words as written in a header
    '""@local.test',  # an empty local part of a local domain: MAILER-DAEMON@local.test (resolve.c)
    "user%y.test.@local.test", '"user%y.test"', '"user%y.test"@local.test', '"<x>".Bob.user%y.test',
    'user%y.test.a."a..b"', 'user%y.test."a(b)"@local.test',  # (the last: 501, its resolved domain is no host name)
    # a source route (in a header inside angle brackets only: outside them it is a group's name)
    '@r1.test,@r2.test:"a.b".joe+tag.a@x.test.', '@r1.test,@r2.test:"a:b"', '@r1.test,@r2.test:"a."."b c"@[192.0.2.1]',
    # words side by side: two addresses to Postfix, 501
    '"a;b""a..b"@x.test', '"a\\\\b"A..B@[192.0.2.1]',
    # table keys (VIRTUAL)
    "v.1.@x.test", '"v.2."@x.test', '"v 3+ext"@x.test', '"v 3"@x.test', '"v 3+"@x.test',
    # access keys (ACCESS)
    "w.1.@x.test", '"w 2"@x.test', '"w 2+ext"@x.test',
    # swap_bangpath: among the words as given, the first '!', before the percent hack; resolve's for a local domain
    '"a\\b".u!h', "u!h", 'u!"b c"', "a!b!c", "a!b%c", "a%b!c", '"a!b"', "x.u!h@local.test", '"a!b"@local.test',
    "a!b%c@local.test", '"a b!c%d.test"@local.test', '"a b.test!c"@local.test',
    # seeds 70000-70084: an '@' in quotes only (the envelope's internal form split at it, a header's address
    # unqualified), the percent hack's empty user, a lone `""` in a header (left), a backslash in a dequoted bang path
    '"x@y"', 'Z."x@y"', '"a.".x-y."x@y"', 'u!h."x@y"', '"%p"', '"%p".Z', '""', '@r1.test,@r2.test:""',
    '"a\\\\b".u!h@local.test',
]

COMMON = {"myhostname": "mx.origin.test", "myorigin": "origin.test"}
# keys in Postfix's quoting, and one in internal form (`v.2.@x.test`), which Postfix's virtual aliasing never asks
VIRTUAL = 'inline:{ {"v.1."@x.test = v1@y.test}, {v.2.@x.test = v2@y.test}, {"v 3"@x.test = v3@y.test} }'
# check_recipient_access: Postfix asks each key in its quoting, then in internal form
ACCESS = 'inline:{ {w.1.@x.test = REJECT internal key}, {"w 2"@x.test = REJECT quoted key} }'
FIELDS = ("From", "Reply-To", "To", "Cc")
DELIVERY = re.compile(r"to=<(.*?)>, (?:orig_to=<(.*?)>, )?relay=")


def random_local(rng: random.Random) -> str:
    """A local part of dot-atoms and quoted strings, now and then side by side or with a doubled, leading or
    trailing dot."""
    words = []
    for _ in range(rng.choice([1, 1, 2, 2, 3])):
        words.append(rng.choice(ATOMS) if rng.random() < 0.5 else '"' + rng.choice(QUOTED_CONTENT) + '"')
    local = ("" if rng.random() < 0.1 else ".").join(words)
    roll = rng.random()
    if roll < 0.05:
        local = local.replace(".", "..", 1) if "." in local else local + ".."
    elif roll < 0.1:
        local = "." + local
    elif roll < 0.15:
        local = local + "."
    return local


def generated(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        domain = rng.choice(DOMAINS)
        address = random_local(rng) + (f"@{domain}" if domain else "")
        out.append("@r1.test,@r2.test:" + address if rng.random() < 0.05 else address)
    return out


def xtext(text: str) -> str:
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}" for c in text)


def probes(addresses: list[str]) -> list[tuple[str, str, str, bool]]:
    """(sender, recipient, header fields, with ORCPT) per probe: each address as the sender and in From/Reply-To,
    and as the recipient and in To/Cc, with and without ORCPT."""
    out = []
    for a in addresses:
        bare = a if not a.startswith("@") else f"<{a}>"  # (a route outside angle brackets is a group's name)
        out.append((a, "r@x.test", f"From: {bare}\r\nReply-To: <{a}>\r\n", False))
        out.append(("s@x.test", a, f"To: {bare}\r\nCc: Name <{a}>\r\n", False))
        out.append(("s@x.test", a, f"To: {bare}\r\n", True))
    return out


async def send_one(port: int, index: int, probe) -> tuple:
    """The replies to MAIL, RCPT and the end of DATA, as far as the transaction went."""
    sender, rcpt, head, orcpt = probe
    client = await SmtpClient.connect(port)
    try:
        assert (await client.cmd("EHLO client.test")).code == 250
        mail = (await client.cmd(f"MAIL FROM:<{sender}>")).code
        if mail != 250:
            return (mail,)
        params = f" ORCPT=rfc822;{xtext(rcpt)}" if orcpt else ""
        rcpt_code = (await client.cmd(f"RCPT TO:<{rcpt}>{params}")).code
        if rcpt_code != 250:
            return (mail, rcpt_code)
        assert (await client.cmd("DATA")).code == 354
        return (mail, rcpt_code, (await client.cmd(f"Subject: probe-{index}\r\n{head}\r\nx\r\n.")).code)
    finally:
        await client.close()


def arrivals(dump: Path) -> dict[int, tuple]:
    """Per probe: (MAIL arguments, sorted RCPT arguments, the address fields' values) as the sink got them."""
    out = {}
    for message in dumped_messages(dump):
        subject = re.search(r"^Subject: probe-(\d+)", message, re.MULTILINE)
        if subject:
            head = message.split("\n\n", 1)[0]
            fields = tuple((name, value.strip()) for name in FIELDS
                           for value in re.findall(rf"^{name}:(.*(?:\n[ \t].*)*)", head, re.MULTILINE))
            out[int(subject.group(1))] = (re.findall(r"^X-Mail-Args: (.*)$", message, re.MULTILINE),
                                          sorted(re.findall(r"^X-Rcpt-Args: (.*)$", message, re.MULTILINE)), fields)
    return out


async def run(port: int, dump: Path, all_probes) -> dict[int, tuple]:
    replies = [await send_one(port, i, p) for i, p in enumerate(all_probes)]
    accepted = [i for i, r in enumerate(replies) if r == (250, 250, 250)]
    arrived = await eventually(lambda: sorted(arrivals(dump)) == accepted and arrivals(dump), timeout=30)
    return {i: (replies[i], arrived.get(i)) for i in range(len(all_probes))}


async def compare(mailflow_server, caplog, addresses: list[str]) -> tuple[dict, dict, list, list]:
    """(Postfix's results, mailflow's, Postfix's sorted (to, orig_to) pairs, mailflow's)."""
    all_probes = probes(addresses)
    async with smtp_sink() as (pf_sink, pf_dump), smtp_sink() as (mf_sink, mf_dump):
        async with postfix_instance({
            **COMMON, "mydestination": "local.test", "local_recipient_maps": "",
            "relayhost": f"[127.0.0.1]:{pf_sink}", "local_transport": f"smtp:[127.0.0.1]:{pf_sink}",
            "virtual_alias_maps": VIRTUAL, "recipient_delimiter": "+",
            "smtpd_recipient_restrictions": f"check_recipient_access {ACCESS}",
        }) as pf:
            postfix = await run(pf.port, pf_dump, all_probes)
            await pf.queue_empty()
            pf_log = await delivery_lines(lambda: [pf.maillog], delivered(postfix))
        caplog.set_level(logging.INFO)
        mf = await mailflow_server(
            **COMMON, mydestination=["local.test"], local_recipient_maps=[], relayhost=f"[127.0.0.1]:{mf_sink}",
            local_transport=f"smtp:[127.0.0.1]:{mf_sink}", mynetworks=["127.0.0.0/8"], virtual_alias_maps=[VIRTUAL],
            recipient_delimiter="+", smtpd={"recipient_restrictions": [f"check_recipient_access {ACCESS}"]})
        mailflow = await run(mf.smtp_addresses[0][1], mf_dump, all_probes)
        await queue_becomes(mf.store, {})
        mf_log = await delivery_lines(lambda: [r.getMessage() for r in caplog.records], delivered(mailflow))
    return postfix, mailflow, pf_log, mf_log


def delivered(results: dict) -> int:
    """How many delivery lines the results make: one per recipient the sink got."""
    return sum(len(arrived[1]) for _, arrived in results.values() if arrived)


async def delivery_lines(texts, count: int) -> list[tuple[str, str]]:
    """The sorted (to, orig_to) pairs of the logs `texts()` gives, once there are `count` (the logs are written
    after the sink has the mail); the caller has waited for an empty queue, so no line is still to come: one more
    than `count` fails."""
    def found() -> list[tuple[str, str]] | None:
        pairs = sorted(m.groups("") for text in texts() for m in DELIVERY.finditer(text))
        return pairs if len(pairs) >= count else None
    pairs = await eventually(found, timeout=20, what=f"{count} delivery lines logged")
    assert len(pairs) == count, f"{len(pairs)} delivery lines logged, {count} expected: {pairs}"
    return pairs


async def test_delivery_lines_fail_on_a_line_more_than_delivered():
    log = "to=<a@x.test>, relay=sink\nto=<b@x.test>, orig_to=<c@x.test>, relay=sink\n"
    assert await delivery_lines(lambda: [log], 2) == [("a@x.test", ""), ("b@x.test", "c@x.test")]
    with pytest.raises(AssertionError, match="2 delivery lines logged, 1 expected"):
        await delivery_lines(lambda: [log], 1)


def differences(addresses: list[str], postfix: dict, mailflow: dict) -> dict:
    return differences_of(probes(addresses), postfix, mailflow)


def differences_of(all_probes: list, postfix: dict, mailflow: dict) -> dict:
    return {f"{i}: {all_probes[i]}": (postfix[i], mailflow[i]) for i in postfix if postfix[i] != mailflow[i]}


async def test_quoted_addresses_come_through_as_through_a_real_postfix(mailflow_server, caplog):
    postfix, mailflow, pf_log, mf_log = await compare(mailflow_server, caplog, CURATED)
    assert differences(CURATED, postfix, mailflow) == {}
    assert pf_log == mf_log
    # the edges themselves, so that the same change on both sides cannot pass unnoticed
    by_address = {a: [postfix[3 * i + k] for k in range(3)] for i, a in enumerate(CURATED)}
    assert by_address['"a\\b".u!h'][0][1][0] == ["<h@ab.u>"]  # swap_bangpath
    sent, received, _ = by_address['a."b c"@x.test']
    assert sent[1][0] == ['<"a.b c"@x.test>'] and sent[1][2] == (("From", '"a.b c"@x.test'),
                                                                  ("Reply-To", '<"a.b c"@x.test>'))
    assert received[1][1] == ['<"a.b c"@x.test> ORCPT=rfc822;a."b+20c"@x.test']  # ORCPT: as written
    assert by_address['"a"."b"@x.test'][0][1][0] == ["<a.b@x.test>"]
    assert by_address['"a\\b"@x.test'][0][1][0] == ["<ab@x.test>"]
    assert by_address["joe+tag.@x.test."][0][1][0] == ['<"joe+tag."@x.test>']
    assert ('"joe+tag."@x.test', '"joe+tag."@x.test.') in pf_log  # orig_to: Postfix's quoting, the domain as written
    assert by_address['"a;b""a..b"@x.test'][0][0] == (501,)
    assert by_address['user%y.test."a(b)"@local.test'][0][0] == (501,)
    assert by_address['""@local.test'][1][1][1] == ['<MAILER-DAEMON@local.test> ORCPT=rfc822;""@local.test']
    assert by_address['"user%y.test"'][0][1][:1] == (["<user@y.test>"],)  # the envelope: opened, then the hack
    assert by_address['"user%y.test"'][0][1][2][0] == ("From", "user%y.test@origin.test")  # a header: no hack
    assert by_address['"<x>".Bob.user%y.test'][0][1][2][0] == ("From", '"<x>.Bob.user"@y.test')
    assert by_address['@r1.test,@r2.test:"a:b"'][0][1][2][0] == ("From", '<"a:b"@origin.test>')  # route dropped
    assert by_address['"v 3+ext"@x.test'][1][1][1] == ['<v3+ext@y.test> ORCPT=rfc822;"v+203+2Bext"@x.test']
    assert by_address['"v.2."@x.test'][1][1][1][0].startswith('<"v.2."@x.test>')  # no internal-form key asked
    assert by_address["w.1.@x.test"][1][0] == by_address['"w 2+ext"@x.test'][1][0] == (250, 554)  # access: both


@pytest.mark.skipif(not os.environ.get("MAILFLOW_QUOTE_SEEDS"), reason="set MAILFLOW_QUOTE_SEEDS=1,2,3 to run")
async def test_generated_addresses_match_a_real_postfix(mailflow_server, caplog):
    """The seeded generator: differences are printed, then asserted none. Left out: an empty local part at an
    IPv6 literal (`""@[IPv6:2001:db8::1]`), which Postfix refuses (501) as its quote_822_local takes the internal
    form's `@[IPv6:` for a source route: a quirk, not followed. Known and left (seeds 70000-70084), Postfix's
    tokenizer quirks, rare and differing only in nonsense: a comma, `<` or `(` that Postfix's rescan of an internal
    form gets a space before when it writes the tokens out again (`"<x>".a.u!h` in a header is its `h@ <x>.a.u`;
    `u!h."a(b)"@<local domain>` resolves to its `"h.a (b)"@u`, and a quoted `\"` there loses its backslash);
    a header's `user%y.test."a."` (its `user@y.test.a.`: mailflow drops that trailing dot); a header's source route
    before words with an '@' and a '%' in quotes (`<@r1,@r2:user%y.test."x@y">`: its `<"user@y.test.x"@y>`), or
    without one (seeds 70085-70164: `user%y.test."x@y"`, `user%y.test."a\\b"`); a `\"` in a dequoted bang path of a
    local domain (`"a\\"b".Bob.u!h@<local domain>`: Postfix's rescan reads a quoted string from that quote on and
    finds no `!`, taking the address; mailflow answers 501)."""
    addresses = [a for seed in os.environ["MAILFLOW_QUOTE_SEEDS"].split(",") for a in generated(int(seed), 40)
                 if not a.startswith('""@[IPv6:')]
    postfix, mailflow, pf_log, mf_log = await compare(mailflow_server, caplog, addresses)
    diff = differences(addresses, postfix, mailflow)
    for probe, (theirs, ours) in diff.items():
        print("DIFF", probe, "\n   PF", theirs, "\n   MF", ours)
    assert diff == {}
    assert pf_log == mf_log


# local(8)'s alias_maps: asked each key in Postfix's quoting, then in internal form (get_alias)
ALIASES = "inline:{ {al.1. = a1@y.test}, {al.2 = a2@y.test} }"
ALIAS_PROBES = ["al.1.@alias.test", '"al.1."@alias.test', "al.1.+x@alias.test", '"al.2+x"@alias.test']


async def test_aliases_are_found_as_a_real_postfix_s_local_finds_them(mailflow_server):
    """A recipient of a local domain through local(8)'s alias_maps, relayed on to the sink: what the sink gets
    (`al.1.@alias.test`, which smtpd makes `"al.1."@alias.test`, finds the key `al.1.` asked second)."""
    local = {"mydestination": "alias.test", "local_recipient_maps": "", "recipient_delimiter": "+"}
    all_probes = [("s@x.test", rcpt, "To: x@x.test\r\n", False) for rcpt in ALIAS_PROBES]
    async with smtp_sink() as (pf_sink, pf_dump), smtp_sink() as (mf_sink, mf_dump):
        async with postfix_instance({**COMMON, **local, "alias_maps": ALIASES,
                                     "relayhost": f"[127.0.0.1]:{pf_sink}"}) as pf:
            postfix = await run(pf.port, pf_dump, all_probes)
        mf = await mailflow_server(**COMMON, mydestination=["alias.test"], local_recipient_maps=[],
                                   recipient_delimiter="+", alias_maps=[ALIASES], relayhost=f"[127.0.0.1]:{mf_sink}",
                                   mynetworks=["127.0.0.0/8"])
        mailflow = await run(mf.smtp_addresses[0][1], mf_dump, all_probes)
    assert differences_of(all_probes, postfix, mailflow) == {}
    assert [postfix[i][1][1][0].split()[0] for i in range(len(ALIAS_PROBES))] == [
        "<a1@y.test>", "<a1@y.test>", "<a1@y.test>", "<a2@y.test>"]


# The maps Postfix asks with mail_addr_find in its legacy form (each key quoted, then internal where it differs) and
# those it asks with mail_addr_map (quoted only): one key in internal form (`x.1.`) and one quoted (`"x 2"`) each.
MAPS = {
    "transport_maps": 'inline:{ {t.1.@x.test = error:5.1.1 t1 internal}, {"t 2"@x.test = error:5.1.1 t2 quoted} }',
    "relocated_maps": 'inline:{ {r.1.@local.test = r1@y.test}, {"r 2"@local.test = r2@y.test} }',
    "recipient_bcc_maps": 'inline:{ {b.1.@x.test = rbcc1@y.test}, {"b 2"@x.test = rbcc2@y.test} }',
    "sender_bcc_maps": 'inline:{ {s.1.@x.test = sbcc1@y.test}, {"s 2"@x.test = sbcc2@y.test} }',
    "relay_recipient_maps": 'inline:{ {e.1.@relay.test = ok}, {"e 2"@relay.test = ok} }',
    "virtual_mailbox_maps": 'inline:{ {m.1.@vm.test = ok}, {"m 2"@vm.test = ok} }',
    "canonical_maps": 'inline:{ {c.1.@x.test = c1@y.test}, {"c 2"@x.test = c2@y.test} }',  # quoted only
    # smtpd's check_rcpt_maps: whole addresses and @domain too
    "local_recipient_maps": ('inline:{ {joe@local.test = x}, {@local2.test = x}, {"l.1."@local.test = x}, '
                             '{r.1.@local.test = x}, {"r 2"@local.test = x} }'),
}
MAP_RECIPIENTS = [
    "t.1.@x.test", '"t.1."@x.test', "t.1.+e@x.test", '"t 2"@x.test', '"t 2+e"@x.test',
    "r.1.@local.test", '"r 2"@local.test', '"r 2+e"@local.test',
    "b.1.@x.test", "b.1.+e@x.test", '"b 2+e"@x.test',
    "e.1.@relay.test", '"e.1."@relay.test', "e.1.+e@relay.test", '"e 2"@relay.test', "zz@relay.test",
    "m.1.@vm.test", '"m 2+e"@vm.test', "zz@vm.test",
    "c.1.@x.test", '"c 2+e"@x.test',
    "joe@local.test", "joe+e@local.test", "any@local2.test", "l.1.@local.test", "nobody@local.test",
]
MAP_PROBES = ([("s@x.test", rcpt, "To: x@x.test\r\n", False) for rcpt in MAP_RECIPIENTS]
              + [(sender, "r@x.test", "To: x@x.test\r\n", False) for sender in ("s.1.@x.test", '"s 2+e"@x.test')])


async def test_maps_are_asked_in_the_form_postfix_asks_each(mailflow_server):
    """Each map's keys in Postfix's form for it (docs/config.md, "The form of table keys"): the RCPT reply (transport
    error, relocated, unknown in the relay or virtual mailbox table), the BCC copy, the canonical address."""
    async with smtp_sink() as (pf_sink, pf_dump), smtp_sink() as (mf_sink, mf_dump):
        sink = f"smtp:[127.0.0.1]:{pf_sink}"
        async with postfix_instance({
            **COMMON, "mydestination": "local.test local2.test", "relay_domains": "relay.test",
            "virtual_mailbox_domains": "vm.test", "relayhost": f"[127.0.0.1]:{pf_sink}", "local_transport": sink,
            "virtual_transport": sink, "relay_transport": sink, "recipient_delimiter": "+", **MAPS,
        }) as pf:
            postfix = await run(pf.port, pf_dump, MAP_PROBES)
        sink = f"smtp:[127.0.0.1]:{mf_sink}"
        mf = await mailflow_server(
            **COMMON, mydestination=["local.test", "local2.test"], relay_domains=["relay.test"],
            virtual_mailbox_domains=["vm.test"], relayhost=f"[127.0.0.1]:{mf_sink}", local_transport=sink,
            virtual_transport=sink, relay_transport=sink, mynetworks=["127.0.0.0/8"], recipient_delimiter="+",
            **{name: [spec] for name, spec in MAPS.items()})
        mailflow = await run(mf.smtp_addresses[0][1], mf_dump, MAP_PROBES)
    assert differences_of(MAP_PROBES, postfix, mailflow) == {}
    # the edges themselves: each internal-form key found where Postfix finds it, the canonical one not
    by_rcpt = {probe[1]: postfix[i] for i, probe in enumerate(MAP_PROBES[:len(MAP_RECIPIENTS)])}
    assert [by_rcpt[a][0] for a in ("t.1.+e@x.test", '"t 2+e"@x.test', "r.1.@local.test", "zz@relay.test",
                                    "zz@vm.test", "nobody@local.test")] == [(250, 550)] * 6
    assert [by_rcpt[a][0] for a in ("e.1.+e@relay.test", "m.1.@vm.test", "b.1.+e@x.test", "c.1.@x.test",
                                    "joe+e@local.test", "any@local2.test", "l.1.@local.test")] == [(250, 250, 250)] * 7
    assert "<rbcc1@y.test> ORCPT=rfc822;rbcc1@y.test NOTIFY=NEVER" in by_rcpt["b.1.+e@x.test"][1][1]
    assert by_rcpt["c.1.@x.test"][1][1] == ['<"c.1."@x.test> ORCPT=rfc822;c.1.@x.test']  # not canonical-mapped
    assert "<sbcc1@y.test> ORCPT=rfc822;sbcc1@y.test NOTIFY=NEVER" in postfix[len(MAP_RECIPIENTS)][1][1]


# smtp_generic_maps and a header's source route, from a client whose header addresses cleanup leaves alone
GENERIC = 'inline:{ {u@x.test = v@y.test}, {@z.test = @w.test} }'
GENERIC_PROBES = [("s@x.test", "r@x.test", head, False) for head in (
    "To: <@r.test:u@x.test>\r\nCc: <@r.test:a@z.test>\r\n", 'Cc: <@r.test:"a b"@z.test>, <@q.test:u@z.test>\r\n',
    "To: <u@x.test>\r\nCc: x@z.test\r\n")]


async def test_generic_maps_ask_a_routed_header_address_as_postfix_does(mailflow_server):
    """Postfix's smtp_map11 asks the route as part of the local part (`"@r.test:u"@x.test`: only `@domain` finds
    it) and writes a result without the route (`<a@w.test>`); no result leaves the address, route and all."""
    async with smtp_sink() as (pf_sink, pf_dump), smtp_sink() as (mf_sink, mf_dump):
        async with postfix_instance({**COMMON, "relayhost": f"[127.0.0.1]:{pf_sink}", "smtp_generic_maps": GENERIC,
                                     "local_header_rewrite_clients": ""}) as pf:
            postfix = await run(pf.port, pf_dump, GENERIC_PROBES)
        mf = await mailflow_server(**COMMON, relayhost=f"[127.0.0.1]:{mf_sink}", mynetworks=["127.0.0.0/8"],
                                   smtp={"generic_maps": [GENERIC]}, local_header_rewrite_clients=())
        mailflow = await run(mf.smtp_addresses[0][1], mf_dump, GENERIC_PROBES)
    assert differences_of(GENERIC_PROBES, postfix, mailflow) == {}
    assert postfix[0][1][2] == (("To", "<@r.test:u@x.test>"), ("Cc", "<a@w.test>"))
    assert postfix[1][1][2] == (("Cc", '<"a b"@w.test>, <u@w.test>'),)
    assert postfix[2][1][2] == (("To", "<v@y.test>"), ("Cc", "x@w.test"))


# The percent hack's edges, from a client outside mynetworks: an empty user (`%x.test` is `@x.test`, taken) or an
# empty domain (`a%b%` is `a%b@`, whose `@` Postfix's resolve strips as a local domain's, then `a@b`; `user%` is
# `user@`: 501), and quoted local parts that open to them (relayed nowhere: 554)
PERCENT_EDGES = ["user%@local.test", "%x.test@local.test", "a%b%@local.test", "u%x.test%@local.test",
                 "u%x.test@local.test", "u%x@local.test", "u%.@local.test", '"u%"@local.test', '"%"@local.test',
                 '"x@other.test@"@local.test', '"x%other.test%"@local.test', "%local.test@local.test"]


# `%` and `!` join words as a dot does (tok822 specials): `"a b"%local.test` is `a b%local.test`, routed on from a
# local domain (`"a"%"b"@local.test` is relaying to b: 554); `"a"+"b"` and `a"b"` are still two words side by side
WORD_JOINS = ['"a b"%local.test@local.test', '"a"!b@local.test', 'x!"y z"@local.test', '"a"%"b"@local.test',
              'x%"y z"@local.test', '"a b"%local.test', '"a"!"b"@local.test', '"a"+"b"@local.test', 'a"b"@local.test',
              '"x@other.test"%local.test@local.test', 'x%"other.test"@local.test', '"a b"!x%"c d"@local.test',
              '"a"%"b".%local.test@local.test']


async def percent_replies(port: int, addresses: list[str]) -> list[tuple[str, ...]]:
    """Per address: the MAIL reply's code and status, then RCPT's to it (after MAIL FROM:<s@x.test>)."""
    out = []
    for addr in addresses:
        client = await SmtpClient.connect(port)
        try:
            assert (await client.cmd("EHLO client.test")).code == 250
            mail = (await client.cmd(f"MAIL FROM:<{addr}>")).text.split()[:2]
            await client.cmd("RSET")
            assert (await client.cmd("MAIL FROM:<s@x.test>")).code == 250
            rcpt = (await client.cmd(f"RCPT TO:<{addr}>")).text.split()[:2]
            out.append((addr, *mail, *rcpt))
        finally:
            await client.close()
    return out


@pytest.mark.parametrize("addresses", [PERCENT_EDGES, WORD_JOINS], ids=["percent-edges", "word-joins"])
async def test_the_percent_hack_s_edges_answer_as_a_real_postfix(mailflow_server, addresses):
    """MAIL and RCPT of each address, from a client outside mynetworks, against Postfix 3.7.11 (review of hunt-quote
    #4, #5): the codes and statuses; none is relayed where Postfix refuses it."""
    local = {"mydestination": "local.test", "local_recipient_maps": ""}
    async with postfix_instance({**COMMON, **local, "mynetworks": "192.0.2.0/24",
                                 "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination"}) as pf:
        postfix = await percent_replies(pf.port, addresses)
    mf = await mailflow_server(**COMMON, mydestination=["local.test"], local_recipient_maps=[],
                               mynetworks=["192.0.2.0/24"])
    mailflow = await percent_replies(mf.smtp_addresses[0][1], addresses)
    assert mailflow == postfix
    by_address = {reply[0]: reply[1:] for reply in postfix}
    if addresses is WORD_JOINS:
        assert by_address['"a b"%local.test@local.test'][2:] == ("250", "2.1.5")
        assert by_address['"a"%"b"@local.test'][2:] == by_address['x!"y z"@local.test'][2:] == ("554", "5.7.1")
        assert by_address['"a"+"b"@local.test'][2:] == ("501", "5.1.3")
        return
    assert by_address["%x.test@local.test"] == ("250", "2.1.0", "554", "5.7.1")  # `@x.test`: not ours
    assert by_address["a%b%@local.test"][2] == by_address['"x@other.test@"@local.test'][2] == "554"
    assert by_address["user%@local.test"] == ("501", "5.1.7", "501", "5.1.3")


# An empty user left by the percent hack, from a client inside mynetworks: `%x.test@local.test` is `""@x.test`,
# relayed on; `%local.test@local.test` is `""@local.test`, MAILER-DAEMON (empty_address_recipient)
EMPTY_USERS = ["%x.test@local.test", "%local.test@local.test", '""@local.test', "%local.test%@local.test"]
EMPTY_USER_PROBES = ([("s@x.test", rcpt, "To: x@x.test\r\n", False) for rcpt in EMPTY_USERS]
                     + [(sender, "r@x.test", "To: x@x.test\r\n", False) for sender in EMPTY_USERS])


async def test_an_empty_user_of_the_percent_hack_goes_where_a_real_postfix_sends_it(mailflow_server):
    """What the sink gets for each (local mail relayed to it too), from 127.0.0.1 in mynetworks (review of
    hunt-finalB #1: mailflow sent `<@x.test>`, and local(8) got `<@local.test>`)."""
    local = {"mydestination": "local.test", "local_recipient_maps": ""}
    async with smtp_sink() as (pf_sink, pf_dump), smtp_sink() as (mf_sink, mf_dump):
        sink = f"smtp:[127.0.0.1]:{pf_sink}"
        async with postfix_instance({**COMMON, **local, "relayhost": f"[127.0.0.1]:{pf_sink}",
                                     "local_transport": sink}) as pf:
            postfix = await run(pf.port, pf_dump, EMPTY_USER_PROBES)
        sink = f"smtp:[127.0.0.1]:{mf_sink}"
        mf = await mailflow_server(**COMMON, mydestination=["local.test"], local_recipient_maps=[],
                                   relayhost=f"[127.0.0.1]:{mf_sink}", local_transport=sink, mynetworks=["127.0.0.0/8"])
        mailflow = await run(mf.smtp_addresses[0][1], mf_dump, EMPTY_USER_PROBES)
    assert differences_of(EMPTY_USER_PROBES, postfix, mailflow) == {}
    assert [postfix[i][1][1][0].split()[0] for i in range(2)] == ['<""@x.test>', "<MAILER-DAEMON@local.test>"]


# The refusals of MAIL, RCPT and VRFY name the address in Postfix's internal form (its extract_addr's): quotes
# opened, quoted pairs undone; the log's from=/to= keep the quoting (compared above)
REFUSED = ['"a.b c"@local.test', 'a."b c"@local.test', '"a\\\\b"@local.test', '"joe."@local.test', "plain@local.test",
           '"w 2"@x.test', '"s p"@deny.test']
REFUSAL_SETTINGS = {"check_sender_access": "inline:{ {deny.test = REJECT} }"}


async def refusal_texts(port: int) -> list[str]:
    """The reply to MAIL (the sender list refusing deny.test), RCPT and VRFY of each REFUSED address."""
    texts = []
    for a in REFUSED:
        client = await SmtpClient.connect(port)
        try:
            assert (await client.cmd("EHLO client.test")).code == 250
            texts.append((await client.cmd(f"MAIL FROM:<{a}>")).text)
            await client.cmd("RSET")
            assert (await client.cmd("MAIL FROM:<s@x.test>")).code == 250
            texts.append((await client.cmd(f"RCPT TO:<{a}>")).text)
            texts.append((await client.cmd(f"VRFY <{a}>")).text)
        finally:
            await client.close()
    return texts


async def test_refusals_name_the_address_as_a_real_postfix_names_it(mailflow_server):
    sender_list = f"check_sender_access {REFUSAL_SETTINGS['check_sender_access']}"
    async with postfix_instance({**COMMON, "mydestination": "local.test", "smtpd_delay_reject": "no",
                                 "disable_vrfy_command": "no", "smtpd_sender_restrictions": sender_list,
                                 "smtpd_recipient_restrictions": f"check_recipient_access {ACCESS}"}) as pf:
        postfix = await refusal_texts(pf.port)
    mf = await mailflow_server(**COMMON, mydestination=["local.test"], mynetworks=["127.0.0.0/8"],
                               smtpd={"delay_reject": False, "disable_vrfy_command": False,
                                      "sender_restrictions": [sender_list],
                                      "recipient_restrictions": [f"check_recipient_access {ACCESS}"]})
    mailflow = await refusal_texts(mf.smtp_addresses[0][1])
    assert mailflow == postfix
    assert "550 5.1.1 <a.b c@local.test>: Recipient address rejected: User unknown in local recipient table" in postfix
    assert "554 5.7.1 <s p@deny.test>: Sender address rejected: Access denied" in postfix
