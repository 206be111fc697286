"""Differential test of cleanup's address rewriting against a real Postfix 3.7: the same messages, from a client on
this host (so that header addresses are rewritten too), to a private Postfix and to mailflow configured alike, each
relaying everything (local mail too) to its own smtp-sink. What is compared per message: the DATA reply, the
envelope sender and recipients (with the ORCPT each went out with) the sink saw, and the addresses of the address
header fields (addresses only: Postfix writes a rewritten field anew, mailflow changes only its addresses).

The probes: sender_canonical_maps, recipient_canonical_maps and canonical_maps together (which is asked first, which
applies to which class of address, envelope and header), `@domain` and `user` keys, an unmatched +extension carried
onto a canonical or virtual result, regexp tables (case-insensitive, `$1` keeping the address's case), a
multi-valued canonical entry (the first address), the sender MAILER-DAEMON@myorigin (the null sender), `user%domain`
(the percent hack of an address without '@': `user@domain`, not `user%domain@myorigin`), header addresses with
needless quotes or a trailing dot (tidied before the tables are asked: `"joe"@x.test.` is `joe@x.test`), a quoted
source route (`"@a.test:joe"@x.test`: dropped from the envelope; kept in a header, written back bare as
`@a.test:joe@x.test`, where only a written route is dropped),
masquerade_domains with a `!` entry and masquerade_exceptions (header recipients masqueraded, envelope recipients
not), virtual_alias_maps (one-to-many with duplicates, an alias in its own expansion, `user@domain` before
`@domain`, a loop, the recursion and expansion limits: 451 4.6.0).

One difference is deliberate (docs/config.md) and asserted as one: canonical_maps that never settle (a loop) are
refused with 451 4.6.0; Postfix logs "message not accepted" yet accepts the message.

Every message carries its own From: the From each server adds to a message without one is
test_added_headers_vs_postfix.py's subject, not this test's.
"""
from __future__ import annotations

import email.utils
import re
import shutil
from pathlib import Path

import pytest

from tests.support.postfix import smtp_sink
from tests.interop.test_tables_vs_postfix import readable_folder
from tests.support import eventually, postfix_instance, send_probe

pytestmark = pytest.mark.interop

SENDER_CANONICAL = ("inline:{ {s1@remote.test = sc1@canon.test}, {@sdom.test = @sdom-out.test},"
                    " {joe = joe.smith@local.test}, {both@x.test = sender-wins@x.test} }")
RECIPIENT_CANONICAL = ("inline:{ {both@x.test = rcpt-wins@x.test}, {r1@x.test = rc1@y.test},"
                       " {@rdom.test = @rdom-out.test}, {postmaster = pm@x.test} }")
CANONICAL = ("inline:{ {both@x.test = common@x.test}, {sender-wins@x.test = sender-common@x.test},"
             " {rc1@y.test = rc1-common@y.test}, {ext@x.test = ext-out@y.test}, {multi@x.test = m1@y.test, m2@y.test},"
             " {mailer-daemon = md@x.test}, {loop1@x.test = loop2@x.test}, {loop2@x.test = loop1@x.test} }")
CANONICAL_REGEXP = "/^re-(.*)@re\\.test$/ $1@re-out.test\n"
VIRTUAL = ("inline:{ {list@v.test = a@d.test, b@d.test, a@d.test, A@D.TEST}, {self@v.test = self@v.test, other@d.test},"
           " {loopa@v.test = loopb@v.test}, {loopb@v.test = loopa@v.test}, {c1@v.test = c2@v.test},"
           " {c2@v.test = c3@v.test}, {c3@v.test = c4@v.test}, {c4@v.test = c5@v.test},"
           " {big@v.test = b1@d.test, b2@d.test, b3@d.test, b4@d.test, b5@d.test}, {@cat.test = catch@d.test},"
           " {user@cat.test = user-exact@d.test} }")
MASQUERADE = ["!keep.example.test", "example.test"]

# (envelope sender, envelope recipients, header fields); each is one message
PROBES = [
    ("s1@remote.test", ["r1@x.test"], "From: s1@remote.test\r\nTo: r1@x.test\r\n"),
    ("both@x.test", ["both@x.test"], "From: both@x.test\r\nTo: both@x.test\r\nCc: joe\r\n"),
    ("u@sdom.test", ["u+tag@rdom.test"], "From: u+e@sdom.test\r\nTo: u+tag@rdom.test\r\n"),
    ("joe", ["joe+x@local.test"], "From: joe\r\nReply-To: joe\r\n"),
    ("ext+tag@x.test", ["ext+tag@x.test"], "From: ext+tag@x.test\r\n"),
    ("multi@x.test", ["multi@x.test"], "From: multi@x.test\r\n"),
    ("mailer-daemon@local.test", ["postmaster"], "From: MAILER-DAEMON\r\nTo: postmaster\r\n"),
    ("re-Joe@RE.test", ["re-Ann@RE.TEST"], "From: re-Joe@RE.test\r\n"),
    ("Both@X.Test", ["BOTH@x.test"], "From: Both@X.Test\r\nTo: Both@X.TEST\r\n"),
    ("u@host.example.test", ["r@host.example.test"], "From: u@host.example.test\r\nTo: r@host.example.test\r\n"),
    ("u@a.keep.example.test", ["r@x.test"], "From: u@keep.example.test\r\nTo: a@b.keep.example.test\r\n"),
    ("root@host.example.test", ["r@x.test"], "From: ROOT@host.example.test\r\nCc: u@HOST.Example.TEST\r\n"),
    ("s@remote.test", ["list@v.test"], "From: s@remote.test\r\n"),
    ("s@remote.test", ["self@v.test"], "From: s@remote.test\r\n"),
    ("s@remote.test", ["user@cat.test", "user+ext@cat.test", "other+ext@cat.test"], "From: s@remote.test\r\n"),
    ("s@remote.test", ["a@d.test", "a@d.test", "A@d.test"], "From: s@remote.test\r\n"),
    ("s@remote.test", ["loopa@v.test"], "From: s@remote.test\r\n"),
    ("s@remote.test", ["c1@v.test"], "From: s@remote.test\r\n"),
    ("s@remote.test", ["big@v.test"], "From: s@remote.test\r\n"),
    ("MAILER-DAEMON@origin.test", ["a@x.test"], "From: s@remote.test\r\n"),
    ("MAILER-DAEMON", ["a@x.test"], "From: s@remote.test\r\n"),
    ("s@remote.test", ["c2@v.test"], "From: s@remote.test\r\n"),
    ("user%y.test", ["joe%y.test"], "From: s@remote.test\r\nTo: user%y.test, a%b@y.test\r\n"),
    ("s@remote.test", ["r@x.test"], 'From: "both"@x.test, ext@x.test., <"j.k"@x.test.>\r\nTo: "w"@local.test.\r\n'),
    ('"@a.test:s"@remote.test', ['"@a.test:r"@x.test'],
     'From: "@a.test:s"@remote.test\r\nTo: "@a.test:joe"@x.test, "@a.test:al"\r\nCc: <@r.test:bob@y.test>\r\n'),
    ("loop1@x.test", ["r@x.test"], "From: s@remote.test\r\n"),  # a deliberate difference: see DELIBERATE
]
# canonical_maps that never settle: Postfix warns "message not accepted" but accepts it anyway; mailflow refuses
DELIBERATE = {len(PROBES) - 1: (451, None)}
FIELDS = ("From", "To", "Cc", "Reply-To")


async def send_probes(port: int) -> list[int | None]:
    """Each probe as one message (its index in the Subject); the reply to its DATA content."""
    return [await send_probe(port, sender, rcpts, f"Subject: probe-{i}\r\n{head}\r\nx")
            for i, (sender, rcpts, head) in enumerate(PROBES)]


def arrivals(dump: Path) -> dict[int, tuple]:
    """Per probe: (envelope sender, sorted recipients with their ORCPT, {field: addresses}) at the sink."""
    out = {}
    text = dump.read_text(errors="replace") if dump.exists() else ""
    for message in text.split("X-Client-Addr:")[1:]:
        subject = re.search(r"^Subject: probe-(\d+)", message, re.MULTILINE)
        if subject:
            head = message.split("\n\n", 1)[0]
            fields = {name: [a for _, a in email.utils.getaddresses(
                re.findall(rf"^{name}:(.*(?:\n[ \t].*)*)", head, re.MULTILINE | re.IGNORECASE))] for name in FIELDS}
            out[int(subject.group(1))] = (re.findall(r"^X-Mail-Args: <(.*?)>", message, re.MULTILINE),
                                          sorted(re.findall(r"^X-Rcpt-Args: (.*)$", message, re.MULTILINE)), fields)
    return out


async def run(port: int, dump: Path) -> dict[int, tuple]:
    replies = await send_probes(port)
    accepted = [i for i, code in enumerate(replies) if code == 250]
    arrived = await eventually(lambda: sorted(arrivals(dump)) == accepted and arrivals(dump), timeout=20)
    return {i: (replies[i], arrived.get(i)) for i in range(len(PROBES))}


async def test_address_rewriting_matches_a_real_postfix(mailflow_server):
    folder = readable_folder()
    (folder / "canonical.regexp").write_text(CANONICAL_REGEXP)
    regexp = f"regexp:{folder}/canonical.regexp"
    common = {"myhostname": "mx.origin.test", "myorigin": "origin.test"}
    async with smtp_sink() as (pf_sink, pf_dump), smtp_sink() as (mf_sink, mf_dump):
        async with postfix_instance({
            **common, "mydestination": "local.test", "recipient_delimiter": "+", "local_recipient_maps": "",
            "relayhost": f"[127.0.0.1]:{pf_sink}", "local_transport": f"smtp:[127.0.0.1]:{pf_sink}",
            "sender_canonical_maps": f"{SENDER_CANONICAL}, {regexp}",
            "recipient_canonical_maps": f"{RECIPIENT_CANONICAL}, {regexp}", "canonical_maps": CANONICAL,
            "masquerade_domains": ", ".join(MASQUERADE), "masquerade_exceptions": "root",
            "virtual_alias_maps": VIRTUAL, "virtual_alias_recursion_limit": "3", "virtual_alias_expansion_limit": "4",
        }) as pf:
            postfix = await run(pf.port, pf_dump)
        mf = await mailflow_server(
            **common, mydestination=["local.test"], local_recipient_maps=[], relayhost=f"[127.0.0.1]:{mf_sink}",
            local_transport=f"smtp:[127.0.0.1]:{mf_sink}", mynetworks=["127.0.0.0/8"],
            sender_canonical_maps=[SENDER_CANONICAL, regexp], recipient_canonical_maps=[RECIPIENT_CANONICAL, regexp],
            canonical_maps=[CANONICAL], masquerade_domains=MASQUERADE, masquerade_exceptions=["root"],
            virtual_alias_maps=[VIRTUAL], virtual_alias_recursion_limit=3, virtual_alias_expansion_limit=4)
        mailflow = await run(mf.smtp_addresses[0][1], mf_dump)
    shutil.rmtree(folder)
    diff = {f"{i}: {PROBES[i][0]} -> {PROBES[i][1]}": (postfix[i], mailflow[i])
            for i in postfix if postfix[i] != mailflow[i] and i not in DELIBERATE}
    assert diff == {}, postfix
    assert {i: mailflow[i] for i in DELIBERATE} == DELIBERATE
    assert postfix[len(PROBES) - 1][0] == 250  # (were Postfix to refuse it too, the difference would be gone)
    # the edges themselves, so that the same change on both sides cannot pass unnoticed
    both = postfix[PROBES.index(("both@x.test", ["both@x.test"], PROBES[1][2]))]
    assert both[1][0] == ["sender-common@x.test"] and both[1][1] == ["<rcpt-wins@x.test> ORCPT=rfc822;both@x.test"]
    assert both[1][2]["Cc"] == ["joe@origin.test"]  # no recipient_canonical entry for joe: the user key is sender's
    assert postfix[4][1][0] == ["ext-out+tag@y.test"] and postfix[7][1][0] == ["Joe@re-out.test"]
    assert postfix[9][1][0] == ["u@example.test"] and postfix[9][1][2]["To"] == ["r@example.test"]
    assert postfix[9][1][1] == ["<r@host.example.test> ORCPT=rfc822;r@host.example.test"]  # envelope: not masqueraded
    assert postfix[12][1][1] == ["<a@d.test> ORCPT=rfc822;list@v.test", "<b@d.test> ORCPT=rfc822;list@v.test"]
    assert [postfix[i][0] for i in (16, 17, 18)] == [451, 451, 451]  # a loop, too deep, too many
    assert postfix[19][1][0] == postfix[20][1][0] == [""]  # MAILER-DAEMON@myorigin: the null sender, not mapped
    assert postfix[21][0] == 451  # c2 -> c3 -> c4 -> c5: as many rewrites as the limit, and c5 still to look up
    assert postfix[22][1][:2] == (["user@y.test"], ["<joe@y.test> ORCPT=rfc822;joe%y.test"])  # the percent hack
    assert postfix[22][1][2]["To"] == ["user@y.test", "a%b@y.test"]  # ... of an address without '@' only
    assert postfix[23][1][2]["From"] == ["sender-common@x.test", "ext-out@y.test", "j.k@x.test"]  # tidied, mapped
    assert postfix[23][1][2]["To"] == ["w@local.test"]
    routes = postfix[24][1]  # a quoted route: gone from the envelope, kept in a header, where a written one goes
    assert routes[:2] == (["s@remote.test"], ['<r@x.test> ORCPT=rfc822;"@a.test:r"@x.test']), routes
    # written back bare (`To: @a.test:joe@x.test, @a.test:al@origin.test`), which email.utils reads as groups
    assert routes[2]["To"] == ["@a.test", "joe@x.test", "@a.test", "al@origin.test"]
    assert routes[2]["Cc"] == ["bob@y.test"]
