"""Differential test of MAIL FROM / RCPT TO argument forms and of message_size_limit against a private Postfix 3.7
configured alike (test_dialogue_vs_postfix.py's POSTFIX and MAILFLOW: strict_rfc821_envelopes = no, the default;
message_size_limit = 4096; 127.0.0.1 outside mynetworks, so a remote recipient is a relay attempt). One Postfix
serves every case; each case is a session (EHLO, then its commands and a QUIT) sent to both servers, and their
replies compared as that test compares them (`compared`, `alike`: code, enhanced code, text, queue id masked).

Forms: Postfix's smtpd takes the first command word after `FROM:`/`TO:` (its smtpd_token: `<…>` and `"…"` hold
blanks, parentheses do not) and reads it as RFC 822 (extract_addr, tok822): comments anywhere (`<a@b>(c)`,
`a(c)@b`, `<a@b (c)>`), a phrase before the angle brackets (`"Joe"<a@b>`, `<Joe <a@b>>`, `AUTH=<>`), blanks inside
them (`< >`) are taken, the one address kept. mailflow reads them alike (address.undressed_path): the address judged
by the relay check and the restrictions is the one queued, never the comment or phrase beside it (the `relay:`
cases: a remote address dressed in a local one's comment or phrase is `554 5.7.1 Relay access denied` on both, a
local one dressed in a remote one's is taken on both). A phrase and its path as two words (`Joe <a@b>`,
`<a@b> (c)`) are an address and an unknown parameter to both (555). Several addresses are 501 on both, and so are
two words a comment separates (`<ali(c)ce@b>`, `<a@b(c)test>`: never joined into `alice@b`, `a@btest`); two words
of a phrase a comment separates are a phrase (`Jo(c)e<a@b>`, `"Joe"(c)"Smith"<a@b>`): taken by both.

Differences kept (KEPT: each case's first differing reply, Postfix's then mailflow's, asserted as such), because
Postfix's reading there is a quirk of its RFC 822 parser that a user would not want taken in an envelope:
- a group (`<g: a@b;>`, `<Joe: a@b>`, `<:a@b>`): Postfix takes its member, and an empty one (`<g:;>`) as the null
  sender, which would change where bounces go; mailflow 501 5.1.7 / 5.1.3. Unbracketed (`g: a@b;`), Postfix reads
  `g:` as the null sender and `a@b;` as an unknown parameter (555); mailflow 501.
- text after the brackets (`<a@b>;`, `<a@b>,`, `<a@b>>`): Postfix drops the special; mailflow 501, as it answers
  `<a@b>x` (which Postfix refuses too).
- a comment never closed (`<a@b>(`; `<a@b>(x y)`, which Postfix's command tokenizer splits at the blank: 555
  for its `y)`): Postfix's tokenizer closes it at the end of the word; mailflow 501.
- a phrase that is not words (`J@e<a@b>`, an address before the address: Postfix takes the second; `VRFY J@e <a@b>`
  alike, 252 from Postfix; a backslash outside quotes, `Jo(c)\\e<a@b>`), text after an empty route-addr (`<(c)>x`:
  Postfix reads `x` as the address): mailflow 501.
- a blank inside the address (`<a @b>`): Postfix's tokenizer drops it; mailflow 501 (docs/config.md,
  strict_rfc821_envelopes), as it refuses `<a b@c>`, which Postfix refuses too; and so a comment between two words
  of the address after a phrase (`Jo(c)e<ali(c)ce@local.test>`: Postfix joins them, 250 for alice, where it refuses
  `<ali(c)ce@local.test>`). Blanks at either end inside the brackets (`< a@b>`, `<a@b >`) are taken alike.
- a vertical tab or form feed in the address (`<\\va@b>`): an atom's character to Postfix's tokenizer, which skips
  only space, tab, CR and LF (so `<a@b\\v>` is 501 on both, its domain not a domain), and so part of a local part
  it then looks up (550 User unknown); mailflow 501, as for any control character in an address.
- a source route before a phrase (`<@r:Joe <a@b>>`): Postfix cuts the route and takes the address; mailflow 501.
  Neither is a relay hole: `<@local.test:Joe <x@evil.test>>` is 554 from Postfix, 501 from mailflow.
- a source route after a comment or a blank (`<(c)@local.test:x@evil.test>`, `< @local.test:x@evil.test>`):
  Postfix cuts a route only where the path starts with `@`, before its tokenizer drops the comment or blank, so it
  judges and names the whole `@local.test:x@evil.test`;
  mailflow drops the comment, then the route, and names `x@evil.test`. Both refuse it (554 Relay access denied),
  only the address named in the reply differs.
- the null sender three pairs deep or with a comment after two (`<<<> > >`, `<<>>(c)`): Postfix's tokenizer reads
  an empty route-addr, the null sender; mailflow 501, as both refuse `<<<a@b>>>` and `<<a@b>>(c)` (two pairs at
  most, the outer one stripped only where the word ends in `>`).
- a garbage source route and nothing after it (`<@](c) Joe @r,@s:>`, `<@;Joe ,(c)@r,@s:(c)>`,
  `<@.\\vlocal.test(c): >`): Postfix cuts the route at its first `:` and takes what is left, nothing, as the null
  sender; mailflow reads the comment as a blank and refuses the blank inside the address (501) before it would
  cut the route. Only stricter: no address is judged or queued that Postfix would not.
- message_size_limit (docs/config.md): Postfix bounds its queue file, which holds the envelope and the Received
  header cleanup adds, so a message within the limit by its own count is `552 5.3.4 Error: message file too big`
  in a band below the limit (measured here: 3100 octets taken, 3300 refused, at a limit of 4096, by DATA, one
  BDAT LAST or two chunks); mailflow counts the message as RFC 1870's SIZE announces it, and takes it up to the
  limit. Past the limit both refuse alike (DATA after the content, a BDAT chunk before it: `Chunk exceeds message
  size limit`), and SIZE= at, below and over the limit is answered alike.
Not compared: the DSN ORCPT Postfix records for a dressed recipient without ORCPT= (the whole word, `"Joe"<a@b>`);
mailflow's is the address.
"""
from __future__ import annotations

import asyncio

import pytest

from tests.support import postfix_instance
from tests.support.dialogues import Step
from tests.interop.test_dialogue_vs_postfix import MAILFLOW, POSTFIX, alike, compared, replay

pytestmark = pytest.mark.interop

EHLO = Step((b"EHLO client.test\r\n",))
SENDER = "MAIL FROM:<s@remote.test>"


def line(text: str) -> Step:
    return Step((f"{text}\r\n".encode(),))


def mail(form: str) -> list[Step]:
    """MAIL with `form` after `FROM:`, then a RCPT that tells whether the MAIL was taken."""
    return [EHLO, line(f"MAIL FROM:{form}"), line("RCPT TO:<alice@local.test>")]


def rcpt(form: str) -> list[Step]:
    return [EHLO, line(SENDER), line(f"RCPT TO:{form}")]


def content(size: int) -> bytes:
    """A message of `size` octets (at least 20) as both servers count it: lines with their CRLF, no dot first."""
    head = b"Subject: s\r\n\r\n"
    lines = (size - len(head) - 2) // 72  # full lines, then one of 2 to 73 octets
    return head + (b"y" * 70 + b"\r\n") * lines + b"z" * (size - len(head) - 72 * lines - 2) + b"\r\n"


def sent(kind: str, size: int, declared: str = "") -> list[Step]:
    """A message of `size` octets to alice by DATA, one BDAT LAST or two BDAT chunks (`BDAT2`)."""
    steps = [EHLO, line(SENDER + declared), line("RCPT TO:<alice@local.test>")]
    body = content(size)
    if kind == "DATA":
        return [*steps, Step((b"DATA\r\n",), body + b".\r\n")]
    if kind == "BDAT":
        return [*steps, Step((f"BDAT {size} LAST\r\n".encode() + body,))]
    half = size // 2
    return [*steps, Step((f"BDAT {half}\r\n".encode() + body[:half],)),
            Step((f"BDAT {size - half} LAST\r\n".encode() + body[half:],))]


CASES: dict[str, list[Step]] = {
    **{f"mail {form}": mail(form) for form in [
        "<a@b.test>(comment)", "a@b.test(comment)", "(comment)a@b.test", "()<a@b.test>", "<(c)a@b.test>",
        "<a(c)@b.test>", "<a@b.test (c)>", "<a@b.test>(c) SIZE=10", "<>(null)", "<(null)>", "< >", "<\t>",
        "< a@b.test>", "<a@b.test >", "<a@b.test\t>",
        '"Joe"<a@b.test>', "Joe<a@b.test>", "<Joe <a@b.test>>", '<"Joe" <a@b.test>>', "<Joe<a@b.test>>",
        "AUTH=<>", '<"a(b)"@b.test>(c)', '"Joe"<@r.test:a@b.test>', "<Joe <@r.test:a@b.test>>", "<a@b.test>(a(b)c)",
        r"<a@b.test>(a\)b)", '<a@b.test>("x y")', '"J\\"oe"<a@b.test>', "<a@b.test(c)>(d)", "<a@(c)b.test>",
        "<postmaster(c)>", "<a@b.test>(c)<c@d.test>", "<a(c).b(d)@(e)b.test(f)>",
        # a comment separates words: two words side by side are two addresses (501), never joined into one
        "<a@b(c)test>", "<a(c)b@b.test>", "a(b)(c)d@b.test", '<"a"(c)b@b.test>', "<a@[127.0.0.1](c)x>",
        # ... and the words of a phrase, as a blank does: taken
        "Jo(c)e<a@b.test>", '"Joe"(c)"Smith"<a@b.test>', "<Jo(c)e <a@b.test>>", "Joe(c)Smith<a@b.test>",
        '"J"(c)oe<a@b.test>', r"Jo(c)\e<a@b.test>", "Jo(c)e<a(c)b@b.test>",
        # blanks at the ends around a nested path: skipped
        "<Joe <a@b.test> >", '<"Joe" <a@b.test> >', "< <a@b.test> >", "<< a@b.test> >", "<\t<a@b.test>\t>",
        "<a@b.test> > SIZE=10",
        # two pairs at most, the outer one stripped only where the word ends in it: refused alike
        "<<<a@b.test> > >", "<< <a@b.test>> >", "<<<a@b.test>> >", "<< <a@b.test> >>", "<<<a@b.test>>>",
        "<<a@b.test>>(c)", "< <a@b.test> >(c)", "<<a@b.test> >(c)", "<<<> > >", "<<>>(c)",
        # a parenthesis in a quoted string is no comment; a source route after a blank
        '<"a(b)"@b.test>', '<"a)"@b.test>', '<"(x)"@b.test> SIZE=10', "< @r.test:a@b.test>", "<\t@r.test:a@b.test >",
        # two words: an address and an unknown parameter to both
        "Joe <a@b.test>", '"Joe" <a@b.test>', "<a@b.test> (comment)", "a@b.test (comment)", "<a@b.test> <c@d.test>",
        # refused alike
        "<a@b.test, c@d.test>", "<a@b.test,c@d.test>", "a@b.test,c@d.test", "<a@b.test>x", "<<a@b.test>",
        # kept differences
        "<group: a@b.test;>", "<group:;>", "group: a@b.test;", "<Joe: a@b.test>", "<:a@b.test>", "<a@b.test>;",
        "<a@b.test>,", "<a@b.test>>", "<@r.test:Joe <a@b.test>>", "<a @b.test>", "<a@b.test>(", "<a@b.test>(x y)",
        "<<a@b.test>(c)>", "<(c)>x", "J@e<a@b.test>", "<@](c) Joe @r,@s:>", "<@;Joe ,(c)@r,@s:(c)>",
        "<@.\vlocal.test(c): >",
    ]},
    **{f"rcpt {form}": rcpt(form) for form in [
        '"Joe"<alice@local.test>', "<alice@local.test>(c) NOTIFY=NEVER", "alice@local.test(c)",
        "<Joe <alice@local.test>>", "<alice@local.test, alice@local.test>", "< >", "<>(c)",
        "<ali(c)ce@local.test>", "<x@evil.te(c)st>", "<alice@local(c).test>", "<alice@local.test\v>",
        "<alice@local.test\f>", "<alice@local.test\v (c)>", "<\valice@local.test>", "Jo(c)e<ali(c)ce@local.test>",
        '"Joe" <alice@local.test>', "<alice@local.test>;", "<group: alice@local.test;>",
    ]},
    **{f"relay: rcpt {form}": rcpt(form) for form in [
        '"Joe"<x@evil.test>', "<x@evil.test (alice@local.test)>", '<"alice@local.test" <x@evil.test>>',
        "x@evil.test(alice@local.test)", "<(alice@local.test)x@evil.test>", "<x@evil.test>(<alice@local.test>)",
        "<alice@local.test (x@evil.test)>", "<alice@local.test>(x@evil.test)", "<alice@local.test> <x@evil.test>",
        "<@local.test:Joe <x@evil.test>>", "<(c)@local.test:x@evil.test>", "Al(c)ice<x@evil.test>",
        "<Al(c)ice <x@evil.test>>", "x(c)evil<alice@local.test>", "< @local.test:x@evil.test>",
        "< @evil.test:alice@local.test>", "<<<x@evil.test> > >",
    ]},
    **{f"size {value}": [EHLO, line(f"{SENDER} SIZE={value}")] for value in ("4095", "4096", "4097", "0")},
    **{f"{kind} {size}": sent(kind, size) for kind in ("DATA", "BDAT", "BDAT2")
       for size in (3100, 3300, 4096, 4097, 4098, 5000)},
    "DATA 3000 after SIZE=4096": sent("DATA", 3000, " SIZE=4096"),
    "BDAT 4097 after SIZE=100": sent("BDAT", 4097, " SIZE=100"),
}

GROUP = ("250 2.1.0 Ok", "501 5.1.7 Bad sender address syntax")
RCPT_GROUP = ("250 2.1.5 Ok", "501 5.1.3 Bad recipient address syntax")
TOO_BIG = ("552 5.3.4 Error: message file too big", "250 2.0.0 Ok: queued as QID")
KEPT: dict[str, tuple[str, str]] = {
    **{f"mail {form}": GROUP for form in ["<group: a@b.test;>", "<group:;>", "<Joe: a@b.test>", "<:a@b.test>",
                                          "<a@b.test>;", "<a@b.test>,", "<a@b.test>>", "<@r.test:Joe <a@b.test>>",
                                          "<a @b.test>", "<a@b.test>(", "<(c)>x",
                                          "J@e<a@b.test>", r"Jo(c)\e<a@b.test>", "Jo(c)e<a(c)b@b.test>",
                                          "<<<> > >", "<<>>(c)", "<@](c) Joe @r,@s:>",
                                          "<@;Joe ,(c)@r,@s:(c)>", "<@.\vlocal.test(c): >"]},
    "mail <a@b.test>(x y)": ("555 5.5.4 Unsupported option: y)", GROUP[1]),
    "mail group: a@b.test;": ("555 5.5.4 Unsupported option: a@b.test;", GROUP[1]),
    "rcpt <\valice@local.test>": ("550 5.1.1 < alice@local.test>: Recipient address rejected: User unknown in local "
                                  "recipient table", RCPT_GROUP[1]),
    "rcpt <alice@local.test>;": RCPT_GROUP, "rcpt Jo(c)e<ali(c)ce@local.test>": RCPT_GROUP,
    "rcpt <group: alice@local.test;>": RCPT_GROUP,
    "relay: rcpt <@local.test:Joe <x@evil.test>>": ("554 5.7.1 <x@evil.test>: Relay access denied", RCPT_GROUP[1]),
    **{f"relay: rcpt {form}": ("554 5.7.1 <@local.test:x@evil.test>: Relay access denied",
                               "554 5.7.1 <x@evil.test>: Relay access denied")
       for form in ("<(c)@local.test:x@evil.test>", "< @local.test:x@evil.test>")},
    **{f"DATA {size}": TOO_BIG for size in (3300, 4096)},
    **{f"BDAT {size}": (TOO_BIG[0], f"250 2.0.0 Ok: {size} bytes queued as QID") for size in (3300, 4096)},
    **{f"BDAT2 {size}": (TOO_BIG[0], f"250 2.0.0 Ok: {size} bytes queued as QID") for size in (3300, 4096)},
}


def first_difference(postfix: list[str], mailflow: list[str]) -> tuple[str, str] | None:
    for p, m in zip(postfix, mailflow):
        if p != m:
            return p, m
    return None


async def test_envelope_forms_and_sizes_match_a_real_postfix(mailflow_server):
    mf = await mailflow_server(**MAILFLOW)
    port = mf.smtp_addresses[0][1]
    found, relays = {}, {}
    async with postfix_instance(POSTFIX) as pf:
        for name, steps in CASES.items():
            postfix, ours = compared(*await asyncio.gather(replay(pf.port, steps), replay(port, steps)))
            if name.startswith("relay:"):
                relays[name] = (postfix[3], ours[3])
            if name in KEPT:
                if first_difference(postfix, ours) != KEPT[name] or postfix[-1:] == ["timeout"]:
                    found[name] = (postfix, ours)
            elif not alike(postfix, ours):
                found[name] = (postfix, ours)
    for name, (postfix, ours) in found.items():
        print(f"{name}:\n   PF {postfix}\n   MF {ours}")
    assert found == {}
    # the relay check judged the address queued: refused where it is the remote one, whatever the local one beside it
    denied = "554 5.7.1 <x@evil.test>: Relay access denied"
    assert {name for name, (_, ours) in relays.items() if ours == denied} == {
        f"relay: rcpt {form}" for form in ['"Joe"<x@evil.test>', "<x@evil.test (alice@local.test)>",
                                           '<"alice@local.test" <x@evil.test>>', "x@evil.test(alice@local.test)",
                                           "<(alice@local.test)x@evil.test>", "<x@evil.test>(<alice@local.test>)",
                                           "<(c)@local.test:x@evil.test>", "Al(c)ice<x@evil.test>",
                                           "<Al(c)ice <x@evil.test>>", "< @local.test:x@evil.test>"]}
    assert {name for name, (_, ours) in relays.items() if ours == "250 2.1.5 Ok"} == {
        "relay: rcpt <alice@local.test (x@evil.test)>", "relay: rcpt <alice@local.test>(x@evil.test)",
        "relay: rcpt x(c)evil<alice@local.test>", "relay: rcpt < @evil.test:alice@local.test>"}


def test_content_is_the_size_named():
    assert all(len(content(size)) == size for size in range(20, 5001))
