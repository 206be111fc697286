"""Differential test of seeded SMTP dialogues wider than test_dialogue_vs_postfix.py's (tests/support/
wide_dialogues.py: address forms, SMTPUTF8, VRFY, 8-bit bytes, NUL and bare CR or LF in commands, on top of that
test's units) against a private Postfix configured alike, with SMTPUTF8 and VRFY on in both
(test_dialogue_vs_postfix.py's POSTFIX and MAILFLOW otherwise: the same domains, mynetworks, relay rules, limits and
error counters). One Postfix serves every session.

Compared, reply by reply: the code and the enhanced status code's class and subject (`550 5.1`; the code alone
where Postfix's reply has none), not the words; who closes the session. The replay and the reading of a reset are
test_dialogue_vs_postfix.py's, which reads one reply a unit: where the client is exempt from the bare-LF check
(`exempt_from_the_bare_lf_check`: a configuration with 127.0.0.1 in mynetworks) a bare LF ends a command line, so
its sessions are sent `split_at_bare_lf`, one unit a line, or every later reply would be read out of step.

SEEDS run as a regular test. MAILFLOW_WIDE_SEEDS=1-20000 runs those seeds instead (an exploration, about 4 minutes:
1-5000 took 59 s; add `--timeout 900 -p no:logging`), MAILFLOW_WIDE_REPORT=FILE gets each difference as it is
found, with the seed, the units sent and both servers' replies side by side. The odd stream (wide_dialogues.py's
`odd_generated`: 8-bit bytes inside MAIL and RCPT parameters, odd blanks around and between them, empty and blank
command lines, on top of the wide units; and commands pipelined in the write of a DATA's content, after its end,
whose replies the replay reads right after the content's) runs ODD_SEEDS so, and MAILFLOW_WIDE_ODD_SEEDS instead
(measured: 1000 seeds in 21 s, 22000 in about 9 minutes on a busy machine).

A difference that is one of ACCEPTED (deliberate differences documented in docs/security.md and docs/config.md;
`accepted` also knows one that depends on the session before it, `lost_to_a_nested_mail`) is counted apart and not
a failure, and the session runs again without the unit that made it (`without_unit`; RERUNS times at most), so
that what comes after it is compared too. Every other difference fails the test.
As in test_dialogue_vs_postfix.py, a seed during which Postfix's smtpd dies of a signal (Postfix 3.7.11's BDAT
faults, fixed in 3.7.22) or whose replies were lost to a reset is listed apart (its farewells as `reply_key` writes
them, KEYED_FAREWELLS); the kept SEEDS have neither.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import re

import pytest

from tests.support import postfix_instance
from tests.support.seeds import seed_list
from tests.support.dialogues import Step, commands_after_data
from tests.support.wide_dialogues import generated, odd_generated, reply_key, split_at_bare_lf
from tests.interop.test_dialogue_vs_postfix import (MAILFLOW, POSTFIX, SIGNALLED, compared, describe, died,
                                                     lost_to_a_reset, replay, write)

pytestmark = pytest.mark.interop

# 1-300 (221: a VRFY of a UTF-8 address without SMTPUTF8, 553 5.6.7; 81, 131: `"@x"@[IPv6:...]`, 501; 169: an
# unqualified quoted route, `"@a.test:b"`, 554 at VRFY; 160: a second accepted difference, met on a run again), 398
# (a quoted route, `"@a.test:b"@remote.test`, taken), 692 (`""@[IPv6:...]`, 501), 1143 (an accepted `"@x"@`), 3310
# (two accepted bare LFs) and 4071 (an accepted difference that depends on the session before it: SMTPUTF8 lost to
# a nested MAIL)
SEEDS = [*range(1, 301), 398, 692, 1143, 3310, 4071]
WIDE_POSTFIX = {**POSTFIX, "smtputf8_enable": "yes", "strict_smtputf8": "yes", "disable_vrfy_command": "no",
                "smtpd_forbid_bare_newline": "reject"}
WIDE_MAILFLOW = {**MAILFLOW, "smtpd": {**MAILFLOW["smtpd"], "disable_vrfy_command": False}}


def seeds() -> list[int]:
    return seed_list(os.environ.get("MAILFLOW_WIDE_SEEDS", "")) or SEEDS


def labels(steps: list[Step], replies: list[str]) -> list[bytes]:
    """What each of `replies` (as `replay` lists them) answers: the greeting, each unit, a step's content after its
    354, QUIT, then the close."""
    out = [b"<greeting>"]
    for step in steps:
        out += step.units
        if step.content and replies[len(out) - 1:len(out)] == ["354"]:
            out.append(b"<content>")
            out += [b"<after the content>"] * commands_after_data(step.content)
    return [*out, b"QUIT\r\n", b"<close>"]


def first_difference(steps: list[Step], postfix: list[str],
                     mailflow: list[str]) -> tuple[bytes, str, str, list[tuple[bytes, str]]]:
    """(what the first differing reply answers, Postfix's reply, mailflow's, the units and replies before it)."""
    at = next((i for i, (p, m) in enumerate(zip(postfix, mailflow)) if p != m), min(len(postfix), len(mailflow)))
    named = labels(steps, postfix)
    return (named[at] if at < len(named) else b"<after>", postfix[at] if at < len(postfix) else "",
            mailflow[at] if at < len(mailflow) else "", list(zip(named[:at], postfix[:at])))


def without_extra_enhanced_code(postfix: str, mailflow: str) -> str:
    """mailflow's reply key without its enhanced code's part where Postfix's reply has none (ETRN's: mailflow gives
    every reply one, docs/security.md), the codes alike."""
    return mailflow[:3] if len(postfix) == 3 and postfix.isdigit() and mailflow[:4] == postfix + " " else mailflow


BARE_LF = re.compile(rb"\n(?!$)")
BARE_CR = re.compile(rb"\r(?!\n)")
BLANK_INSIDE = re.compile(rb"<[^<>]*[^<> \t][ \t]+@[^<>]*>")
LONE_CLOSING_BRACKET = re.compile(rb'(?i)(?:from:|to:|vrfy)[ \t]*(?:"[^"]*"|[^<> \t"])[^<>]*>')
ROUTED_NO_DOMAIN = re.compile(rb'(?:[%!][^@<> \t]*|"[^"]*@[^"]*")@(?![^<> \t\r\n])')
VRFY_OPEN_PATH = re.compile(rb"(?i)^\s*vrfy\s+<[^>]*$")


def vrfy_words(unit: bytes) -> int:
    """How many words a VRFY's argument has, a last SMTPUTF8 not counted; 0 for another command."""
    words = unit.split()
    if not words or words[0].upper() != b"VRFY":
        return 0
    return len(words) - 1 - (words[-1].upper() == b"SMTPUTF8")


# The deliberate differences, each as the first differing reply it makes (mailflow's) and what the unit holds:
ACCEPTED = {
    # docs/security.md, "A command line or DATA or BDAT content with a bare LF, or a bare CR": mailflow 521 5.5.2 and
    # a hang-up; Postfix 3.7.11 (smtpd_forbid_bare_newline = reject) answers a bare LF 550 5.5.2 and hangs up, and
    # takes a bare CR as part of the command
    "a bare LF in a command": lambda unit, mf: bool(BARE_LF.search(unit)) and mf == "521 5.5",
    "a bare CR in a command": lambda unit, mf: bool(BARE_CR.search(unit)) and mf == "521 5.5",
    # docs/security.md, "NUL in a command": 500 5.5.2; Postfix reads the command up to the NUL
    "a NUL in a command": lambda unit, mf: b"\0" in unit and mf == "500 5.5",
    # docs/security.md's table of path forms: Postfix's RFC 822 tokenizer drops a blank inside an address
    # (`<a @b>`) and a `>` without its `<` (`a@b>`); mailflow refuses both (501 5.1.7 or 5.1.3)
    "a blank inside an address": lambda unit, mf: bool(BLANK_INSIDE.search(unit)) and mf == "501 5.1",
    "a `>` without its `<`": lambda unit, mf: bool(LONE_CLOSING_BRACKET.search(unit)) and mf == "501 5.1",
    # the same table: `<a%relay.test@>` is a@relay.test to Postfix (`<a!b@>` b@a, `<"@x"@>` ""@x), no domain to
    # mailflow (501, as `<a@>` to both)
    "a routed local part and no domain": lambda unit, mf: bool(ROUTED_NO_DOMAIN.search(unit)) and mf == "501 5.1",
    # docs/config.md, disable_vrfy_command: Postfix's vrfy_cmd joins the words and takes the last address of them
    # (`VRFY <> FOO` is FOO), and takes a `<` without its `>`, which its RCPT refuses; mailflow reads the argument
    # as a RCPT path and refuses both (501 5.1.3)
    "a VRFY of two words": lambda unit, mf: vrfy_words(unit) > 1 and mf == "501 5.1",
    "a VRFY's `<` without its `>`": lambda unit, mf: bool(VRFY_OPEN_PATH.match(unit.rstrip())) and mf == "501 5.1",
}


def is_mail(unit: bytes) -> bool:
    return unit.lstrip()[:4].upper() == b"MAIL"


SMTPUTF8_WORD = re.compile(rb"(?i)[> \t]SMTPUTF8(?=[ \t\r\n]|$)")  # (a parameter: not `<smtputf8@x>`, `SMTPUTF8=`)
UNDECLARED_UTF8 = ("553 5.6", "501 5.1")  # Postfix's refusals of an undeclared UTF-8 address (a UTF-8 domain: 501)


def lost_to_a_nested_mail(unit: bytes, postfix: str, mailflow: str, history: list[tuple[bytes, str]]) -> bool:
    """Whether `unit`, a MAIL, RCPT or VRFY that is not ASCII, comes after a nested MAIL (503) in a transaction whose
    MAIL declared SMTPUTF8 (a parameter word), Postfix refusing it as undeclared UTF-8 and mailflow not: Postfix's
    mail_cmd clears the transaction's SMTPUTF8 (and BODY=, RET=) before it refuses a nested MAIL, so its later UTF-8
    addresses are 553 5.6.7, or 501 for a UTF-8 domain; mailflow's transaction keeps what its MAIL declared
    (docs/security.md)."""
    if unit.isascii() or unit.lstrip()[:4].upper() not in (b"MAIL", b"RCPT", b"VRFY"):
        return False
    if postfix not in UNDECLARED_UTF8 or mailflow in UNDECLARED_UTF8:
        return False
    declared = nested = False
    for command, reply in history:
        if is_mail(command) and reply.startswith("250"):
            declared, nested = bool(SMTPUTF8_WORD.search(command.rstrip(b"\r\n"))), False
        elif is_mail(command) and reply == "503 5.5":
            nested = declared
    return nested


def accepted(unit: bytes, postfix: str, mailflow: str, history: list[tuple[bytes, str]]) -> str | None:
    """The name of the deliberate difference (ACCEPTED) the first difference is (Postfix's reply and mailflow's to
    `unit`), `history` the units and replies before it; None for another."""
    if lost_to_a_nested_mail(unit, postfix, mailflow, history):
        return "SMTPUTF8 lost to a nested MAIL"
    return next((name for name, matches in ACCEPTED.items() if matches(unit, mailflow)), None)


def exempt_from_the_bare_lf_check(postfix_config: dict[str, str]) -> bool:
    """Whether this test's client, 127.0.0.1, is in Postfix's smtpd_forbid_bare_newline_exclusions ($mynetworks by
    default; mailflow's smtpd.forbid_bare_newline_exclusions alike): a bare LF then ends its command line."""
    networks = postfix_config.get("smtpd_forbid_bare_newline_exclusions", postfix_config["mynetworks"])
    return any(ipaddress.ip_address("127.0.0.1") in ipaddress.ip_network(net, strict=False)
               for net in networks.replace(",", " ").split())


# test_dialogue_vs_postfix.py's FAREWELLS as `reply_key` writes them: its `554 5.5.0 ` (a pipelined group the server
# refuses, then closes) is `554 5.5`, which no other reply a server closes after is keyed as
KEYED_FAREWELLS = ("221 ", "421 ", "521 ", "554 5.5")
RERUNS = 4  # accepted differences dropped from one session at most, each followed by a run of what is left


def without_unit(steps: list[Step], postfix: list[str], at: int) -> list[Step] | None:
    """`steps` without the unit that Postfix's reply number `at` answers (numbered as `labels` names them); None where
    that reply answers no unit (the greeting, a step's content, QUIT, the close)."""
    number = 0  # (0: the greeting)
    for index, step in enumerate(steps):
        for position in range(len(step.units)):
            number += 1
            if number == at:
                units = step.units[:position] + step.units[position + 1:]
                return [*steps[:index], *([step._replace(units=units)] if units else []), *steps[index + 1:]]
        if step.content and postfix[number:number + 1] == ["354"]:
            number += 1 + commands_after_data(step.content)
    return None


async def differences(mailflow_server, seed_list: list[int], report: str | None = None,
                      postfix_config: dict[str, str] = WIDE_POSTFIX, mailflow_config: dict | None = None,
                      draw=generated):
    """(the seeds whose replies differ other than as ACCEPTED, each with its lines of report; those that differ as
    ACCEPTED, each with the names of its accepted differences; the seeds during which Postfix's smtpd died; those
    whose replies were `lost_to_a_reset`). `draw(seed, pf.keeps_refused_transactions)` makes each session. After an
    accepted difference the session runs again without the unit that made it (`without_unit`, RERUNS times at most),
    so that a difference after it is not hidden. A client exempt from the bare-LF check sends each session
    `split_at_bare_lf`, so that one reply answers each piece."""
    mf = await mailflow_server(**(mailflow_config or WIDE_MAILFLOW))
    port = mf.smtp_addresses[0][1]
    exempt = exempt_from_the_bare_lf_check(postfix_config)
    found: dict[int, list[str]] = {}
    kept: dict[int, list[str]] = {}
    crashed, reset = [], []
    async with postfix_instance(postfix_config) as pf:
        for seed in seed_list:
            steps: list[Step] | None = draw(seed, pf.keeps_refused_transactions)
            steps = split_at_bare_lf(steps) if exempt else steps
            for _ in range(RERUNS + 1):
                if steps is None:
                    break
                before = pf.maillog.count(SIGNALLED)
                postfix, mailflow = await asyncio.gather(replay(pf.port, steps, reply_key),
                                                         replay(port, steps, reply_key))
                postfix, ours = compared(postfix, mailflow)
                ours = [without_extra_enhanced_code(p, m) for p, m in zip(postfix, ours)] + ours[len(postfix):]
                if ours == postfix and postfix[-1:] != ["timeout"]:
                    break
                unit, theirs, mine, history = first_difference(steps, postfix, ours)
                why = accepted(unit, theirs, mine, history)
                if not why and await died(pf, before):
                    crashed.append(seed)
                    break
                if not why and lost_to_a_reset(postfix, ours, KEYED_FAREWELLS):
                    reset.append(seed)
                    break
                lines = [f"seed {seed}: {why or 'DIFFERENCE'} at {unit!r}: PF {theirs!r} MF {mine!r}",
                         *(f"   {u!r}" for u in describe(steps)),
                         *(f"  {'  ' if p == m else '!='} PF {p!r}  MF {m!r}" for p, m in
                           zip(postfix + [""] * len(ours), ours + [""] * len(postfix)))]
                write(report, "\n".join(lines))
                if not why:
                    found[seed] = lines
                    break
                kept.setdefault(seed, []).append(why)
                steps = without_unit(steps, postfix, len(history))
    return found, kept, crashed, reset


async def test_wide_seeded_dialogues_match_a_real_postfix(mailflow_server):
    found, kept, crashed, reset = await differences(mailflow_server, seeds(), os.environ.get("MAILFLOW_WIDE_REPORT"))
    for lines in found.values():
        print("\n".join(lines))
    print(f"accepted differences: {len(kept)}; Postfix's smtpd died: {crashed}; replies lost to a reset: {reset}")
    assert found == {}
    if seeds() == SEEDS:  # (the kept sessions: every one compared)
        assert crashed == reset == []


ODD_SEEDS = [*range(1, 101)]


def odd_seeds() -> list[int]:
    return seed_list(os.environ.get("MAILFLOW_WIDE_ODD_SEEDS", "")) or ODD_SEEDS


async def test_odd_seeded_dialogues_match_a_real_postfix(mailflow_server):
    report = os.environ.get("MAILFLOW_WIDE_REPORT")
    found, kept, crashed, reset = await differences(mailflow_server, odd_seeds(), report, draw=odd_generated)
    for lines in found.values():
        print("\n".join(lines))
    print(f"accepted differences: {len(kept)}; Postfix's smtpd died: {crashed}; replies lost to a reset: {reset}")
    assert found == {}
    if odd_seeds() == ODD_SEEDS:
        assert crashed == reset == []


# sessions whose replies would be read out of step (a bare LF inside a command line before their last unit: 341 of
# seeds 1-20000, three of them then differ at the close or by a later reply's code)
BARE_LF_SEEDS = [1968, 2805, 8054]


async def test_a_bare_lf_ends_the_command_line_of_a_client_in_mynetworks_in_both(mailflow_server):
    # smtpd_forbid_bare_newline_exclusions ($mynetworks): `RS\nET\r\n` is two commands with a reply each
    postfix_config = {**WIDE_POSTFIX, "mynetworks": "127.0.0.0/8"}
    mailflow_config = {**WIDE_MAILFLOW, "mynetworks": ["127.0.0.0/8"]}
    assert exempt_from_the_bare_lf_check(postfix_config) and not exempt_from_the_bare_lf_check(WIDE_POSTFIX)
    found, kept, crashed, reset = await differences(mailflow_server, BARE_LF_SEEDS, None, postfix_config,
                                                    mailflow_config)
    assert found == {} and crashed == reset == []


def test_a_difference_is_accepted_only_where_its_unit_and_reply_are_the_documented_ones():
    assert accepted(b"MAIL FROM:a@b.test>\r\n", "250 2.1", "501 5.1", []) == "a `>` without its `<`"
    assert accepted(b"MAIL FROM:<a@b.test>\r\n", "250 2.1", "501 5.1", []) is None
    assert accepted(b"MAIL FROM:a@b.test>\r\n", "501 5.1", "250 2.1", []) is None
    assert accepted(b"NOOP \nx\r\n", "550 5.5", "521 5.5", []) == "a bare LF in a command"
    assert accepted(b"NOOP x\r\n", "250 2.0", "521 5.5", []) is None
    assert accepted(b'RCPT TO:<"@x"@>\r\n', "554 5.7", "501 5.1", []) == "a routed local part and no domain"
    assert accepted(b'RCPT TO:<"@x"@y.test>\r\n', "554 5.7", "501 5.1", []) is None


def test_smtputf8_lost_to_a_nested_mail_is_accepted_only_for_an_address_postfix_refuses_as_undeclared():
    nested = [(b"MAIL FROM:<s@r.test> SMTPUTF8\r\n", "250 2.1"), (b"MAIL FROM:<t@r.test>\r\n", "503 5.5")]
    utf8 = "RCPT TO:<\u00e9@x.test>\r\n".encode()
    assert accepted(utf8, "553 5.6", "554 5.7", nested) == "SMTPUTF8 lost to a nested MAIL"
    assert accepted("VRFY \u00e9@b\u00fccher.test\r\n".encode(), "501 5.1", "252 2.0", nested)
    assert accepted(utf8, "553 5.6", "554 5.7", nested[:1]) is None  # (no nested MAIL)
    assert accepted(b"RCPT TO:<e@x.test>\r\n", "553 5.6", "554 5.7", nested) is None  # (ASCII)
    assert accepted("NOOP \u00e9\r\n".encode(), "553 5.6", "250 2.0", nested) is None  # (no address command)
    assert accepted(utf8, "250 2.1", "554 5.7", nested) is None  # (Postfix did not refuse it as undeclared)
    assert accepted(utf8, "553 5.6", "501 5.1", nested) is None  # (mailflow refused it as undeclared too)
    undeclared = [(b"MAIL FROM:<smtputf8@r.test>\r\n", "250 2.1"), nested[1]]  # (the word in the path)
    assert accepted(utf8, "553 5.6", "554 5.7", undeclared) is None
    valued = [(b"MAIL FROM:<s@r.test> SMTPUTF8=x\r\n", "250 2.1"), nested[1]]  # (no such parameter)
    assert accepted(utf8, "553 5.6", "554 5.7", valued) is None


def test_a_session_goes_on_without_the_unit_of_an_accepted_difference():
    steps = [Step((b"EHLO a.test\r\n",)), Step((b"MAIL FROM:<s@r.test>\r\n", b"DATA\r\n"), b"x\r\n.\r\n"),
             Step((b"NOOP\r\n",))]
    postfix = ["220", "250", "250 2.1", "354", "250 2.0", "250 2.0", "221 2.0", "closed"]
    assert without_unit(steps, postfix, 2) == [steps[0], Step((b"DATA\r\n",), b"x\r\n.\r\n"), steps[2]]
    assert without_unit(steps, postfix, 5) == steps[:2]
    assert without_unit(steps, postfix, 1) == steps[1:]
    assert without_unit(steps, postfix, 4) is None  # (the content's reply)
    assert without_unit(steps, postfix, 6) is None  # (QUIT's)


async def test_a_difference_after_an_accepted_one_is_compared_too(mailflow_server):
    # two accepted differences in one session, then a unit both answer alike: each is met on a run of its own
    session = [Step((b"EHLO client.test\r\n",)), Step((b"MAIL FROM:s@remote.test>\r\n",)),
               Step((b"VRFY alice @local.test\r\n",)), Step((b"NOOP\r\n",))]
    found, kept, crashed, reset = await differences(mailflow_server, [1], draw=lambda seed, keeps: session)
    assert found == {} and kept == {1: ["a `>` without its `<`", "a VRFY of two words"]}


def test_a_reply_is_named_by_the_unit_or_content_it_answers():
    steps = [Step((b"EHLO a.test\r\n",)), Step((b"MAIL FROM:<>\r\n", b"DATA\r\n"), b"x\r\n.\r\n"), Step((b"NOOP\r\n",))]
    replies = ["220", "250", "250 2.1", "354", "250 2.0", "250 2.0", "221 2.0", "closed"]
    assert labels(steps, replies) == [b"<greeting>", b"EHLO a.test\r\n", b"MAIL FROM:<>\r\n", b"DATA\r\n",
                                      b"<content>", b"NOOP\r\n", b"QUIT\r\n", b"<close>"]
    assert first_difference(steps, replies, [*replies[:5], "500 5.5", *replies[6:]])[:3] == (
        b"NOOP\r\n", "250 2.0", "500 5.5")
    assert reply_key("250-mx\n250 2.1.0 Ok") == "250 2.1" and reply_key("459 <x>: no") == "459"


def test_a_pipelining_refusal_lost_to_a_reset_is_not_judged():
    # odd seed 4030 (without EHLO: long junk lines, a 5000-byte chunk and a RCPT in one write): Postfix's 554 5.5.0
    # and close reached the client as a reset, mailflow's as the reply and a close
    postfix = ["220", "250 2.1", "555 5.5", "500 5.5", "500 5.5", "reset"]
    mailflow = [*postfix[:-1], "554 5.5", "closed"]
    assert lost_to_a_reset(postfix, mailflow, KEYED_FAREWELLS)
    assert not lost_to_a_reset(postfix, [*postfix[:-1], "554 5.1", "closed"], KEYED_FAREWELLS)


def test_commands_pipelined_after_the_content_get_replies_of_their_own():
    contents = (b".\r\n", b".\r\nRSET\r\n", b"x\r\n.\r\n", b"x\r\n..\r\n.\r\nFOO\r\n\r\n")
    assert [commands_after_data(content) for content in contents] == [0, 1, 0, 2]
    steps = [Step((b"DATA\r\n",), b"x\r\n.\r\nFOO\r\nRSET\r\n"), Step((b"NOOP\r\n",))]
    replies = ["220", "354", "250 2.0", "500 5.5", "250 2.0", "250 2.0", "221 2.0", "closed"]
    assert labels(steps, replies)[3:6] == [b"<after the content>", b"<after the content>", b"NOOP\r\n"]
    assert without_unit(steps, replies, 5) == steps[:1]


async def test_a_session_that_pipelines_after_the_content_is_read_in_step(mailflow_server):
    # odd seed 61710's opening: without EHLO, two commands in the content's write, then one command a step; read a
    # reply short after the content, the client ran ahead of both servers and Postfix refused its next MAIL as
    # pipelined (554 5.5.0) where mailflow had not seen it so yet
    session = [Step((b"HELO localhost\r\n",)), Step((b"MAIL FROM:<s@remote.test>\r\n",)),
               Step((b"RCPT TO:<alice@local.test>\r\n",)),
               Step((b"DATA\r\n",), b"Subject: x\r\n\r\nb\r\n.\r\nFOO\r\nRSET\r\n"), Step((b"HELP\r\n",)),
               Step((b"MAIL FROM:<s@remote.test>\r\n",)), Step((b"RCPT TO:<alice@local.test>\r\n",)),
               Step((b"NOOP\r\n",))]
    found, kept, crashed, reset = await differences(mailflow_server, [1], draw=lambda seed, keeps: session)
    assert found == kept == {} and crashed == reset == []
