"""Differential test of the automatic BCC recipients (always_bcc, sender_bcc_maps, recipient_bcc_maps) against a
real Postfix 3.7: the same maps and messages to a private Postfix and to mailflow, each relaying everything to its
own smtp-sink. What is compared per message: the DATA reply, the envelope sender and the recipients the sink saw,
each with the ORCPT and NOTIFY it went out with (sorted: Postfix's queue manager reorders them).

The probes: which sender sender_bcc_maps is asked with (after sender_canonical_maps and masquerading; an
extension dropped for the key; a `user` key of this host's domain; never the null sender), which recipient
recipient_bcc_maps is asked with (after recipient_canonical_maps, before virtual alias expansion; `user+ext`), the
BCC address itself rewritten (qualified, canonical-mapped, virtual-expanded), NOTIFY=NEVER on every BCC copy, a BCC
address the client also named (both kept, as Postfix keeps them), two BCC lookups giving one address (one copy),
mail submitted with each one's sendmail (pickup: BCC too), a listener with receive_override_options =
no_address_mappings (no automatic BCC; header_checks' BCC all the same), and header_checks' BCC action
(NOTIFY=NEVER too, after always_bcc, a recipient the client named kept twice; none once a REDIRECT has replaced
the recipients, a header_checks' or an access table's). And the milters' envelope edits against the automatic BCC
copies (Postfix's cleanup looks them up before its milters run): a milter-added recipient gets no copy, a deleted
one keeps its copy, a CHGFROM adds the new sender's copy to the first sender's. A header_checks BCC of an aliased
message: one copy (local's forwarded copy is not checked again). And main.cf's
receive_override_options = no_address_mappings (mailflow: [smtpd]'s own) covering sendmail's mail as well.

Two differences are deliberate (docs/config.md) and asserted as such: a table value of several addresses (Postfix
takes the whole value as one address, `"m1@arch.test, m2"@arch.test`; mailflow takes the first, logged), and the
DSN parameters of a message a REDIRECT sends on: both send it to the redirect address alone, mailflow as a new
recipient (no NOTIFY, the redirect address its original), Postfix's queue manager with the DSN parameters of the
recipient it sorts first, a BCC copy's NOTIFY=NEVER here (so its failure would be reported to no one).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.postfix import dumped_messages, probe_envelopes, smtp_sink
from tests.interop.test_tables_vs_postfix import readable_folder
from tests.support import eventually, free_port, postfix_instance, queue_becomes, send_probe
from tests.support.milters import reply, scripted_milter

pytestmark = pytest.mark.interop

COMMON = {"myhostname": "mx.origin.test", "myorigin": "origin.test"}
SENDER_CANONICAL = "inline:{ {sc@remote.test = mapped@remote.test} }"
RECIPIENT_CANONICAL = "inline:{ {rc@x.test = rc-mapped@x.test}, {bcc-canon@arch.test = bcc-canon-out@arch.test} }"
VIRTUAL = "inline:{ {list@v.test = a@d.test, b@d.test}, {valias@arch.test = va1@d.test, va2@d.test} }"
SENDER_BCC = ("inline:{ {mapped@remote.test = s-bcc@arch.test}, {sc@remote.test = premap@arch.test},"
              " {@example.test = masq-bcc@arch.test}, {multi@remote.test = m1@arch.test, m2@arch.test},"
              " {ext@remote.test = ext-bcc@arch.test}, {joe = joe-bcc@arch.test},"
              " {same@remote.test = shared@arch.test}, {rcpt@remote.test = r@x.test} }")
RECIPIENT_BCC = ("inline:{ {rc-mapped@x.test = r-bcc@arch.test}, {rc@x.test = premap@arch.test},"
                 " {list@v.test = list-bcc@arch.test}, {a@d.test = post-virtual@arch.test},"
                 " {u@y.test = u-bcc@arch.test}, {self@x.test = self@x.test}, {tovirt@x.test = valias@arch.test},"
                 " {tocanon@x.test = bcc-canon@arch.test}, {unq@x.test = unqualified},"
                 " {two1@x.test = shared@arch.test}, {two2@x.test = shared@arch.test},"
                 " {toall@x.test = big@arch.test} }")
ALWAYS_BCC = "big@arch.test"
RECIPIENT_ACCESS = "check_recipient_access inline:{ {redir@x.test = REDIRECT red@remote.test} }"

# (envelope sender, envelope recipients); each is one message over SMTP
PROBES = [
    ("sc@remote.test", ["r@x.test"]),
    ("u@host.example.test", ["r@x.test"]),
    ("ext+tag@remote.test", ["r@x.test"]),
    ("joe", ["r@x.test"]),
    ("", ["r@x.test"]),
    ("s@remote.test", ["rc@x.test"]),
    ("s@remote.test", ["list@v.test"]),
    ("s@remote.test", ["u+ext@y.test"]),
    ("s@remote.test", ["self@x.test"]),
    ("s@remote.test", ["tovirt@x.test"]),
    ("s@remote.test", ["tocanon@x.test"]),
    ("s@remote.test", ["unq@x.test"]),
    ("same@remote.test", ["two1@x.test", "two2@x.test"]),
    ("s@remote.test", ["big@arch.test"]),
    ("s@remote.test", ["toall@x.test"]),
    ("rcpt@remote.test", ["r@x.test"]),
    ("s@remote.test", ["r@x.test", "r@x.test"]),
    ("", ["r@x.test"]),  # header_checks: BCC hbc@arch.test
    ("s@remote.test", ["r@x.test"]),  # header_checks: BCC r@x.test (a recipient named too)
    ("s@remote.test", ["rc@x.test", "r@x.test"]),  # header_checks BCC, body_checks REDIRECT red@remote.test
    ("s@remote.test", ["redir@x.test", "r@x.test"]),  # check_recipient_access: REDIRECT red@remote.test
    ("multi@remote.test", ["r@x.test"]),  # a deliberate difference: see DELIBERATE
]
UNMAPPED = len(PROBES)  # the same as probe 0, to the no_address_mappings listener
LOCAL = UNMAPPED + 1  # sendmail -f sc@remote.test r@x.test
DELIBERATE = len(PROBES) - 1
HEADER_CHECKS = ("/^Subject: probe-17$/ BCC hbc@arch.test\n/^Subject: probe-18$/ BCC r@x.test\n"
                 f"/^Subject: probe-19$/ BCC hbc@arch.test\n/^Subject: probe-{UNMAPPED}$/ BCC hbc@arch.test\n")
BODY_CHECKS = "/^body-19$/ REDIRECT red@remote.test\n"


def addresses(result: tuple) -> list[str]:
    return [rcpt.split()[0] for rcpt in result[1][1]]


async def send(port: int, index: int, sender: str, rcpts: list[str]) -> int | None:
    return await send_probe(port, sender, rcpts, f"Subject: probe-{index}\r\nFrom: x@y.test\r\n\r\nbody-{index}")



async def run(port: int, unmapped_port: int, sendmail: list[str], dump: Path) -> dict[int, tuple]:
    replies = [await send(port, i, sender, rcpts) for i, (sender, rcpts) in enumerate(PROBES)]
    replies.append(await send(unmapped_port, UNMAPPED, *PROBES[0]))
    done = subprocess.run([*sendmail, "-f", "sc@remote.test", "r@x.test"], capture_output=True, timeout=20,
                          input=f"Subject: probe-{LOCAL}\n\nx\n".encode())
    assert done.returncode == 0, done.stderr
    replies.append(250)
    arrived = await eventually(lambda: len(probe_envelopes(dump)) == len(replies) and probe_envelopes(dump), timeout=20)
    return {i: (code, arrived.get(i)) for i, code in enumerate(replies)}


async def test_automatic_bcc_recipients_match_a_real_postfix(mailflow_server, write_config, tmp_path):
    folder = readable_folder()
    (folder / "header_checks").write_text(HEADER_CHECKS)
    (folder / "body_checks").write_text(BODY_CHECKS)
    header_checks, body_checks = f"regexp:{folder}/header_checks", f"regexp:{folder}/body_checks"
    tables = {"sender_canonical_maps": SENDER_CANONICAL, "recipient_canonical_maps": RECIPIENT_CANONICAL,
              "virtual_alias_maps": VIRTUAL, "sender_bcc_maps": SENDER_BCC, "recipient_bcc_maps": RECIPIENT_BCC}
    async with smtp_sink() as (pf_sink, pf_dump), smtp_sink() as (mf_sink, mf_dump):
        unmapped = free_port()
        unmapped_line = f"127.0.0.1:{unmapped} inet n - n - - smtpd -o receive_override_options=no_address_mappings\n"
        async with postfix_instance({
            **COMMON, **tables, "mydestination": "local.test", "recipient_delimiter": "+",
            "local_recipient_maps": "", "relayhost": f"[127.0.0.1]:{pf_sink}", "masquerade_domains": "example.test",
            "always_bcc": ALWAYS_BCC, "header_checks": header_checks,
            "body_checks": body_checks, "smtpd_recipient_restrictions": RECIPIENT_ACCESS,
        }, master_cf=unmapped_line) as pf:
            postfix = await run(pf.port, unmapped, ["sendmail", "-C", str(pf.etc)], pf_dump)
        settings = {**COMMON, **{key: [spec] for key, spec in tables.items()}, "mydestination": ["local.test"],
                    "local_recipient_maps": [], "relayhost": f"[127.0.0.1]:{mf_sink}", "mynetworks": ["127.0.0.0/8"],
                    "masquerade_domains": ["example.test"], "always_bcc": ALWAYS_BCC,
                    "checks": {"header_checks": [header_checks], "body_checks": [body_checks]},
                    "smtpd": {"listen": ["127.0.0.1:0"], "recipient_restrictions": [RECIPIENT_ACCESS],
                              "listeners": [{"address": "127.0.0.1:0", "overrides": {
                                  "receive_override_options": ["no_address_mappings"]}}]}}
        mf = await mailflow_server(**settings)
        config = write_config(tmp_path / "mailflow.toml", **settings)
        (_, port), (_, unmapped_port) = mf.smtp_addresses
        mailflow = await run(port, unmapped_port, [sys.executable, "-m", "mailflow", "sendmail", "-C", str(config)],
                             mf_dump)
    shutil.rmtree(folder)
    redirected = (19, 20)
    diff = {i: (postfix[i], mailflow[i]) for i in postfix if postfix[i] != mailflow[i] and i not in (DELIBERATE,
                                                                                                     *redirected)}
    assert diff == {}, postfix
    for i in redirected:
        assert addresses(mailflow[i]) == addresses(postfix[i]) == ["<red@remote.test>"], i
        assert mailflow[i][1][1] == ["<red@remote.test> ORCPT=rfc822;red@remote.test"], i
    assert "<m1@arch.test> ORCPT=rfc822;m1@arch.test NOTIFY=NEVER" in mailflow[DELIBERATE][1][1]
    assert '<"m1@arch.test, m2"@arch.test>' in " ".join(postfix[DELIBERATE][1][1])  # (else no difference left)
    # the edges themselves, so that the same change on both sides cannot pass unnoticed
    never = "NOTIFY=NEVER"
    assert postfix[0][1] == (["mapped@remote.test"], ["<big@arch.test> ORCPT=rfc822;big@arch.test " + never,
                                                      "<r@x.test> ORCPT=rfc822;r@x.test",
                                                      "<s-bcc@arch.test> ORCPT=rfc822;s-bcc@arch.test " + never])
    assert postfix[4][1][1] == ["<big@arch.test> ORCPT=rfc822;big@arch.test " + never,
                                "<r@x.test> ORCPT=rfc822;r@x.test"]  # the null sender: not looked up
    assert "<r-bcc@arch.test> ORCPT=rfc822;r-bcc@arch.test " + never in postfix[5][1][1]  # after canonical
    assert "<list-bcc@arch.test> ORCPT=rfc822;list-bcc@arch.test " + never in postfix[6][1][1]  # before virtual
    assert postfix[8][1][1].count("<self@x.test> ORCPT=rfc822;self@x.test " + never) == 1  # named and BCC: both
    assert len(postfix[8][1][1]) == 3
    assert "<va1@d.test> ORCPT=rfc822;valias@arch.test " + never in postfix[9][1][1]  # the BCC address expanded
    assert len([r for r in postfix[12][1][1] if r.startswith("<shared@arch.test>")]) == 1
    assert "<hbc@arch.test> ORCPT=rfc822;hbc@arch.test " + never in postfix[17][1][1]  # header_checks: NEVER too
    assert postfix[18][1][1].count("<r@x.test> ORCPT=rfc822;r@x.test " + never) == 1 and len(postfix[18][1][1]) == 3
    assert postfix[19][1][1] == ["<red@remote.test> ORCPT=rfc822;big@arch.test NOTIFY=NEVER"]  # see REDIRECTED
    assert postfix[UNMAPPED][1] == (["sc@remote.test"], ["<hbc@arch.test> ORCPT=rfc822;hbc@arch.test " + never,
                                                        "<r@x.test> ORCPT=rfc822;r@x.test"])  # header_checks' only
    assert postfix[LOCAL][1] == postfix[0][1]  # sendmail's mail gets them too


MILTER_EDITS = {b"E": reply(b"+", b"<added@remote.test>\0") + reply(b"-", b"<del@remote.test>\0")
                + reply(b"e", b"<new@remote.test>\0") + reply(b"c")}
MILTER_SENDER_BCC = "inline:{ {s@remote.test = old-copy@arch.test}, {new@remote.test = new-copy@arch.test} }"
MILTER_RECIPIENT_BCC = ("inline:{ {r@remote.test = r-copy@arch.test}, {added@remote.test = added-copy@arch.test},"
                        " {del@remote.test = del-copy@arch.test} }")


async def test_milter_envelope_edits_and_automatic_bcc_match_a_real_postfix(mailflow_server):
    maps = {"sender_bcc_maps": MILTER_SENDER_BCC, "recipient_bcc_maps": MILTER_RECIPIENT_BCC}
    async with scripted_milter(MILTER_EDITS) as milter, smtp_sink() as (pf_sink, pf_dump), \
            smtp_sink() as (mf_sink, mf_dump):
        async with postfix_instance({**COMMON, **maps, "mydestination": "local.test", "smtpd_milters": milter.spec,
                                     "relayhost": f"[127.0.0.1]:{pf_sink}"}) as pf:
            assert await send(pf.port, 0, "s@remote.test", ["r@remote.test", "del@remote.test"]) == 250
            postfix = await eventually(lambda: probe_envelopes(pf_dump).get(0), timeout=20)
        mf = await mailflow_server(**COMMON, **{key: [spec] for key, spec in maps.items()},
                                   relayhost=f"[127.0.0.1]:{mf_sink}", mynetworks=["127.0.0.0/8"],
                                   smtpd={"listen": ["127.0.0.1:0"], "milters": [milter.spec]},
                                   milter={"command_timeout": "2s", "content_timeout": "2s"})
        assert await send(mf.smtp_addresses[0][1], 0, "s@remote.test", ["r@remote.test", "del@remote.test"]) == 250
        mailflow = await eventually(lambda: probe_envelopes(mf_dump).get(0), timeout=20)
    assert mailflow == postfix
    never = "NOTIFY=NEVER"
    assert postfix == (["new@remote.test"], [
        "<added@remote.test> ORCPT=rfc822;added@remote.test",  # added by the milter: no copy
        f"<del-copy@arch.test> ORCPT=rfc822;del-copy@arch.test {never}",  # deleted by it: the copy stays
        f"<new-copy@arch.test> ORCPT=rfc822;new-copy@arch.test {never}",  # CHGFROM: the new sender's copy too
        f"<old-copy@arch.test> ORCPT=rfc822;old-copy@arch.test {never}",
        f"<r-copy@arch.test> ORCPT=rfc822;r-copy@arch.test {never}",
        "<r@remote.test> ORCPT=rfc822;r@remote.test"])


async def test_main_receive_override_options_cover_sendmail_as_postfixs_do(mailflow_server, write_config, tmp_path):
    # Postfix's pickup honours main.cf's receive_override_options (pickup.c); mailflow's, [smtpd]'s own: with
    # no_address_mappings neither the SMTP message nor sendmail's gets the always_bcc copy (the filter set-up's
    # front side, docs/filtering.md)
    async def one_each(port: int, sendmail: list[str], dump: Path) -> dict[int, tuple]:
        assert await send(port, 0, "sc@remote.test", ["r@x.test"]) == 250
        done = subprocess.run([*sendmail, "-f", "sc@remote.test", "r@x.test"], capture_output=True, timeout=20,
                              input=b"Subject: probe-1\n\nx\n")
        assert done.returncode == 0, done.stderr
        return await eventually(lambda: len(probe_envelopes(dump)) == 2 and probe_envelopes(dump), timeout=20)

    main = {"always_bcc": ALWAYS_BCC, "sender_canonical_maps": SENDER_CANONICAL}
    async with smtp_sink() as (pf_sink, pf_dump), smtp_sink() as (mf_sink, mf_dump):
        async with postfix_instance({**COMMON, **main, "mydestination": "local.test",
                                     "relayhost": f"[127.0.0.1]:{pf_sink}",
                                     "receive_override_options": "no_address_mappings"}) as pf:
            postfix = await one_each(pf.port, ["sendmail", "-C", str(pf.etc)], pf_dump)
        settings = {**COMMON, "always_bcc": ALWAYS_BCC, "sender_canonical_maps": [SENDER_CANONICAL],
                    "mydestination": ["local.test"], "relayhost": f"[127.0.0.1]:{mf_sink}",
                    "mynetworks": ["127.0.0.0/8"], "smtpd": {"listen": ["127.0.0.1:0"],
                                                             "receive_override_options": ["no_address_mappings"]}}
        mf = await mailflow_server(**settings)
        config = write_config(tmp_path / "mailflow.toml", **settings)
        mailflow = await one_each(mf.smtp_addresses[0][1],
                                  [sys.executable, "-m", "mailflow", "sendmail", "-C", str(config)], mf_dump)
    assert mailflow == postfix
    unmapped = (["sc@remote.test"], ["<r@x.test> ORCPT=rfc822;r@x.test"])  # no canonical mapping, no BCC copy
    assert postfix == {0: unmapped, 1: unmapped}


async def test_a_header_checks_bcc_copies_an_aliased_message_once_as_postfix_does(mailflow_server):
    # Postfix's local forwards an alias's copy without CLEANUP_FLAG_FILTER (internal_mail_filter_classes, empty
    # by default): header_checks never see it, so its BCC is not made again per forwarded copy
    folder = readable_folder()
    (folder / "header_checks").write_text("/^Subject: probe-/ BCC hbc@arch.test\n")
    checks = f"regexp:{folder}/header_checks"
    aliases = "inline:{ {list = a@remote.test, b@remote.test} }"
    async with smtp_sink() as (pf_sink, pf_dump), smtp_sink() as (mf_sink, mf_dump):
        async with postfix_instance({**COMMON, "mydestination": "local.test", "alias_maps": aliases,
                                     "header_checks": checks, "relayhost": f"[127.0.0.1]:{pf_sink}"}) as pf:
            assert await send(pf.port, 0, "s@remote.test", ["list@local.test"]) == 250
            await pf.queue_empty()
            postfix = await eventually(lambda: len(dumped_messages(pf_dump)) >= 2 and sink_envelopes(pf_dump),
                                       timeout=20)
        mf = await mailflow_server(**COMMON, mydestination=["local.test"], alias_maps=[aliases],
                                   checks={"header_checks": [checks]}, relayhost=f"[127.0.0.1]:{mf_sink}",
                                   mynetworks=["127.0.0.0/8"])
        assert await send(mf.smtp_addresses[0][1], 0, "s@remote.test", ["list@local.test"]) == 250
        await queue_becomes(mf.store, {})
        mailflow = await eventually(lambda: len(dumped_messages(mf_dump)) >= 2 and sink_envelopes(mf_dump),
                                    timeout=20)
    shutil.rmtree(folder)
    assert mailflow == postfix
    assert postfix == [["<a@remote.test>", "<b@remote.test>"], ["<hbc@arch.test>"]]


def sink_envelopes(dump: Path) -> list[list[str]]:
    """The recipients of each message the sink took, sorted."""
    return sorted(sorted(rcpt.split()[0] for rcpt in re.findall(r"^X-Rcpt-Args: (.*)$", message, re.MULTILINE))
                  for message in dumped_messages(dump))
