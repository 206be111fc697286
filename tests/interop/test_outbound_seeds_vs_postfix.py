"""Seeded differential of the outbound SMTP client against Postfix 3.7's smtp(8): what
test_smtp_faults_vs_postfix.py takes one behaviour at a time, combined. Each seed makes one scenario (a message to
its own scripted peer, through that file's ScriptedPeer and run_both): 1-5 recipients, each RCPT answered from a
pool (250, 251, 4xx, 5xx, with and without enhanced codes, multi-line, mixed codes in one reply, a hang-up), MAIL,
DATA, end-of-DATA, RSET (a reused session's probe) and QUIT replies from pools, the greeting refused or lost, the
EHLO keywords offered (PIPELINING, SIZE below or above the message, 8BITMIME with an 8-bit body, DSN with NOTIFY
given, SMTPUTF8 with a UTF-8 address, ENHANCEDSTATUSCODES), EHLO refused (HELO then) or lost. Each seed also picks
the settings both servers share: the defaults, a destination recipient limit of 2
(`smtp_destination_recipient_limit`; mailflow's `queue.transport_destination_recipient_limit.smtp`) with one
session at a time to a destination (a destination concurrency of 1), so that a job reuses the session the one
before it left, RSET probe and all (else parallel sessions left the RSET pool unheard), or a fallback
relay that accepts everything (`smtp_fallback_relay`; mailflow's `smtp.fallback_relay`), so that a first next hop
that fails hands its recipients to a second. (smtp_skip_5xx_greeting is always on in mailflow, Postfix's default: a
5xx greeting is in the greeting pool.)

Compared per recipient: the log's relay, dsn, status and text word for word (the message sizes in a SIZE refusal
set aside: the two servers' messages differ in size), the notice's RFC 3464 fields, and how many times the peers
took the message for it (a RCPT accepted in a transaction whose content was accepted: none lost, none twice).

Two differences are deliberate, and left out of the pools. A peer that answers 421 and does not hang up: mailflow
takes the 421 as the end of the session (RFC 5321 3.8; mailflow.transports.smtp.chat), where Postfix reads on and
takes the replies that follow (a RCPT's 421 is one more 4xx to it). And a cached session keeps the SIZE limit its
EHLO gave: Postfix's smtp_session_passivate saves the features but not the limit, so a message over it that goes
over a reused session is sent anyway (and refused by the peer, or not), where mailflow bounces it 5.3.4 as on a
new session (docs/transports.md).

CURATED holds the scenarios the seeds revealed something with, and their neighbours; set MAILFLOW_OUTBOUND_SEEDS
(`1-200`, or `1,5,9`) to run `test_generated_scenarios_end_as_with_postfix` over that many seeds.
"""
from __future__ import annotations

import functools
import os
import random
import re
from collections import Counter

import pytest

from tests.interop.test_smtp_faults_vs_postfix import (CLOSE, END_OF_DATA, THEN_CLOSE, Scenario, ScriptedPeer,
                                                       run_both)
from tests.support.seeds import seed_list

pytestmark = pytest.mark.interop

PF_NAME, MF_NAME = "pf.test", "mx.mailflow.test"  # the two servers' EHLO/HELO names: whose session a peer heard

GREETINGS = [b"220 peer.test ESMTP\r\n"] * 8 + [b"421 4.3.2 busy\r\n" + THEN_CLOSE, b"554 5.7.1 go away\r\n", CLOSE]
# (a 421 is followed by the peer's hang-up, as RFC 5321 3.8 has it; one that is not: DELIBERATE)
RCPTS = [b"250 2.1.5 Ok\r\n"] * 6 + [
    b"250 Ok\r\n", b"251 2.1.5 will forward\r\n", b"450 4.2.0 greylisted\r\n", b"451 4.3.0 local error\r\n",
    b"452 4.5.3 Too many recipients\r\n", b"550 5.1.1 no such user\r\n", b"551 5.1.6 user not local\r\n",
    b"552 5.2.2 mailbox full\r\n", b"553 5.1.3 bad address\r\n", b"554 5.7.1 refused\r\n", b"450 busy\r\n",
    b"550 no such user here\r\n", b"550-5.1.1 no such\r\n550 5.1.1 user here\r\n",
    b"250-first\r\n550 5.1.1 second\r\n", b"450-4.2.0 first\r\n550 5.1.1 second\r\n",
    b"550-5.1.1 first\r\n250 2.1.5 second\r\n", b"421 4.7.0 too fast\r\n" + THEN_CLOSE,
    b"250 2.1.5 Ok\r\n" + THEN_CLOSE, b"550 5.1.1 no\r\n" + THEN_CLOSE, CLOSE]
MAILS = [b"250 2.1.0 Ok\r\n"] * 10 + [
    b"250 Ok\r\n", b"451 4.3.0 later\r\n", b"452 4.3.1 full\r\n", b"550 5.7.1 not you\r\n", b"553 bad sender\r\n",
    b"421 4.3.2 shutting down\r\n" + THEN_CLOSE, b"550-5.7.1 not\r\n550 5.7.1 you\r\n",
    b"250 2.1.0 Ok\r\n" + THEN_CLOSE, CLOSE]
DATAS = [b"354 go ahead\r\n"] * 10 + [b"451 4.3.0 later\r\n", b"554 5.5.1 no valid recipients\r\n",
                                       b"250 2.0.0 done already\r\n", b"421 4.3.2 bye\r\n" + THEN_CLOSE,
                                       b"354 go ahead\r\n" + THEN_CLOSE, CLOSE]
DOTS = [b"250 2.0.0 Ok: queued as X1\r\n"] * 6 + [
    b"250 queued\r\n", b"451 4.3.0 try again\r\n", b"452 4.3.1 no room\r\n", b"552 5.3.4 too big\r\n",
    b"554 5.7.1 rejected as spam\r\n", b"554-5.7.1 rejected\r\n554 5.7.1 as spam\r\n",
    b"250-2.0.0 Ok\r\n450 4.0.0 no\r\n", b"421 4.3.2 bye\r\n" + THEN_CLOSE, b"250 2.0.0 Ok\r\n" + THEN_CLOSE, CLOSE]
RSETS = [b"250 2.0.0 Ok\r\n"] * 4 + [b"500 5.5.1 what\r\n", b"421 4.3.2 bye\r\n" + THEN_CLOSE, CLOSE]
QUITS = [b"221 2.0.0 Bye\r\n", b"500 what\r\n", CLOSE]
SETTINGS = ("defaults", "recipient-limit-2", "fallback-relay")


def ehlo_reply(rng: random.Random, eightbit: bool, notify: bool, utf8: bool) -> bytes:
    """An EHLO reply offering some of the keywords; those the message would use, now and then left out."""
    words = [word for word, offered in [
        ("PIPELINING", rng.random() < 0.6),
        (rng.choice(["SIZE 100", "SIZE 10240000", "SIZE"]), rng.random() < 0.5),
        ("8BITMIME", not eightbit or rng.random() < 0.5),
        ("DSN", not notify or rng.random() < 0.5),
        ("SMTPUTF8", not utf8 or rng.random() < 0.5),
        ("ENHANCEDSTATUSCODES", rng.random() < 0.7)] if offered]
    lines = ["peer.test", *words]
    return b"".join(f"250{'-' if i < len(lines) - 1 else ' '}{line}\r\n".encode() for i, line in enumerate(lines))


def generated(seed: int) -> tuple[str, Scenario]:
    """The settings and the scenario of one seed."""
    rng = random.Random(seed)
    eightbit, notify, utf8 = rng.random() < 0.3, rng.random() < 0.3, rng.random() < 0.2
    recipients = [f"r{n}" for n in range(1, rng.randint(1, 5) + 1)]
    if utf8:
        recipients[-1] = "j\u00fcrgen"
    replies = {r: rng.choice(RCPTS) for r in recipients}
    script = {"greeting": rng.choice(GREETINGS), "MAIL": rng.choice(MAILS), "DATA": rng.choice(DATAS),
              "DOT": rng.choice(DOTS), "QUIT": rng.choice(QUITS), "RSET": rng.choice(RSETS),
              "RCPT": lambda address: replies[address.partition("@")[0]]}
    roll = rng.random()
    if roll < 0.03:
        script["EHLO"] = CLOSE
    elif roll < 0.1:
        script["EHLO"] = b"502 5.5.2 Error: command not recognized\r\n"
    elif roll < 0.13:
        script["EHLO"], script["HELO"] = b"500 5.5.1 no\r\n", b"501 5.5.4 not you\r\n"
    else:
        script["EHLO"] = ehlo_reply(rng, eightbit, notify, utf8)
    mail_options = (*(["BODY=8BITMIME"] if eightbit else []), *(["SMTPUTF8"] if utf8 else []))
    body = "gr\u00fc\u00dfe aus K\u00f6ln\r\n" if eightbit else "hello\r\n"
    setting = rng.choice(SETTINGS)
    if setting == "recipient-limit-2":  # (a reused session keeps its SIZE limit: DELIBERATE)
        script["EHLO"] = script["EHLO"].replace(b"SIZE 100\r\n", b"SIZE 10240000\r\n")
    return setting, Scenario(script, tuple(recipients), notify="SUCCESS,FAILURE" if notify else "",
                             mail_options=mail_options, body=body)


def answered(reply: bytes) -> bool:
    """Whether a scripted reply accepts: its last line's code is 2xx."""
    lines = reply.removesuffix(THEN_CLOSE).splitlines()
    return bool(lines) and lines[-1][:1] == b"2"


def deliveries(peers: list[ScriptedPeer], name: str) -> Counter[str]:
    """How many times the peers took the message for each recipient in the sessions of the server called `name`:
    a RCPT accepted after a MAIL accepted, in a transaction whose content was accepted (the end of the content
    heard, its reply 2xx)."""
    taken: Counter[str] = Counter()
    for peer in peers:
        for heard in peer.sessions:
            if not heard or heard[0].split()[1:2] != [name.encode()]:
                continue
            accepted: list[str] = []
            sender_taken = False
            for line in heard:
                verb = line.split()[0].upper() if line.split() else b""
                if verb in (b"MAIL", b"RSET"):
                    accepted, sender_taken = [], verb == b"MAIL" and answered(reply_to(peer, "MAIL", ""))
                elif verb == b"RCPT" and sender_taken:
                    address = line.decode("utf-8", "replace").partition("<")[2].partition(">")[0]
                    if answered(reply_to(peer, "RCPT", address)):
                        accepted.append(address)
                elif line == END_OF_DATA:
                    if answered(reply_to(peer, "DOT", "")):
                        taken.update(accepted)
                    accepted = []
    return taken


def reply_to(peer: ScriptedPeer, what: str, argument: str) -> bytes:
    """The peer's reply to a MAIL, RCPT or the end of the content (its default: accepted)."""
    answer = peer.script.get(what, b"250 2.0.0 Ok\r\n")
    return answer(argument) if callable(answer) else answer


SIZE = re.compile(r"(message\s*size\s*)\d+(\s*exceeds)")  # (a notice's fields have their white space removed)


def comparable_outcomes(ended: dict) -> dict:
    return {r: (relay, dsn, status, SIZE.sub(r"\1N\2", text)) for r, (relay, dsn, status, text) in ended.items()}


def comparable_notices(notices: dict) -> dict:
    return {r: {**fields, "Diagnostic-Code": SIZE.sub(r"\1N\2", (fields["Diagnostic-Code"] or "")
                                                      .replace("X-Postfix;", "X-Mailflow;"))}
            for r, fields in notices.items()}


async def differences(mailflow_server, smtp_peer, tmp_path, cases: dict[str, tuple[str, Scenario]],
                      postfix_ended: dict | None = None, heard: dict[str, list[ScriptedPeer]] | None = None) -> dict:
    """Every recipient whose end differs between Postfix and mailflow, over the cases (name: setting, scenario;
    one run per setting), with what each server did; and mailflow's recipients taken other than once when sent.
    `postfix_ended` gets Postfix's (relay, dsn, status, text) of each recipient; `heard` each setting's peers."""
    by_setting: dict[str, dict[str, Scenario]] = {}
    for name, (setting, scenario) in cases.items():
        by_setting.setdefault(setting, {})[name] = scenario
    found: dict = {}
    for setting, scenarios in by_setting.items():
        fallback = await ScriptedPeer({}).start()
        postfix: dict = {"smtputf8_enable": "yes"}
        smtp: dict = {}
        queue: dict = {}
        if setting == "recipient-limit-2":  # (one session at a time: a job's session is the next one's, RSET and all)
            postfix |= {"smtp_destination_recipient_limit": "2", "smtp_destination_concurrency_limit": "1"}
            queue = {"transport_destination_recipient_limit": {"smtp": 2}, "default_destination_concurrency_limit": 1}
        elif setting == "fallback-relay":
            postfix["smtp_fallback_relay"] = f"[127.0.0.1]:{fallback.port}"
            smtp = {"fallback_relay": [f"[127.0.0.1]:{fallback.port}"]}
        peers: list[ScriptedPeer] = [fallback]
        if heard is not None:
            heard[setting] = peers
        started = []

        async def start_mailflow(**settings):
            started.append(await mailflow_server(**settings))
            return started[-1]

        queue_directory = str(tmp_path / f"queue-{setting}-{min(scenarios)}")
        try:
            (pf_ended, pf_notices), (mf_ended, mf_notices) = await run_both(
                start_mailflow, functools.partial(smtp_peer, enable_SMTPUTF8=True), scenarios, postfix=postfix,
                smtp=smtp, queue=queue, peers=peers, mailflow={"queue_directory": queue_directory})
        finally:
            await fallback.stop()
            for mf in started:
                await mf.stop()
        pf_ended, mf_ended = comparable_outcomes(pf_ended), comparable_outcomes(mf_ended)
        if postfix_ended is not None:
            postfix_ended.update(pf_ended)
        pf_notices, mf_notices = comparable_notices(pf_notices), comparable_notices(mf_notices)
        pf_taken, mf_taken = (deliveries(peers, name) for name in (PF_NAME, MF_NAME))
        for r in sorted(set(pf_ended) | set(mf_ended)):
            pf = (pf_ended.get(r), pf_notices.get(r), pf_taken[r])
            mf = (mf_ended.get(r), mf_notices.get(r), mf_taken[r])
            sent_once = mf_taken[r] == (1 if (mf_ended.get(r) or ("",) * 3)[2] == "sent" else 0)
            if pf != mf or not sent_once:
                found[f"{setting} {r}"] = {"postfix": pf, "mailflow": mf}
    return found


CURATED = {
    # recipient limit 2, a UTF-8 recipient among ASCII ones, no SMTPUTF8 offered: Postfix's qmgr sorts the
    # recipients before it cuts them into deliveries (jürgen@ goes with r1@, which bounces 5.6.7 beside it)
    "utf8-among-ascii": ("recipient-limit-2", Scenario(
        {"EHLO": b"250-peer.test\r\n250-8BITMIME\r\n250 DSN\r\n",
         "RCPT": lambda a: b"452 4.5.3 Too many recipients\r\n" if a.startswith("r1@") else b"250 2.1.5 Ok\r\n"},
        ("r1", "r2", "r3", "r4", "j\u00fcrgen"), mail_options=("SMTPUTF8",))),
    # every job's recipients in that order (seed 106): the peer hangs up at the RCPT of a@, which Postfix sends
    # first, before b@'s (refused had it been asked)
    "hangup-at-the-first-in-order": ("defaults", Scenario(
        {"EHLO": b"250-peer.test\r\n250 8BITMIME\r\n",
         "RCPT": lambda a: CLOSE if a.startswith("a@") else b"554 5.7.1 refused\r\n"}, ("b", "a"))),
    # the local part's case counts (Postfix's strcmp after the folded domain): B@ before a@, so the hang-up at B@
    # defers a@ too, where a@ first would have been refused 5.7.1
    "hangup-at-the-upper-case-first": ("defaults", Scenario(
        {"EHLO": b"250-peer.test\r\n250 8BITMIME\r\n",
         "RCPT": lambda a: CLOSE if a.startswith("B@") else b"554 5.7.1 refused\r\n"}, ("a", "B"))),
    # neighbours: the first next hop refuses or hangs up, the fallback takes what it did not
    "fallback-after-4xx": ("fallback-relay", Scenario(
        {"RCPT": lambda a: b"450 4.2.0 greylisted\r\n" if a.startswith("r1@") else b"250 2.1.5 Ok\r\n"},
        ("r1", "r2"))),
    "fallback-after-lost-dot": ("fallback-relay", Scenario({"DOT": CLOSE}, ("r1", "r2"))),
    "fallback-not-after-5xx": ("fallback-relay", Scenario({"RCPT": b"550 5.1.1 no\r\n"}, ("r1",))),
    "limit-2-dot-lost-then-quit-unanswered": ("recipient-limit-2", Scenario(
        {"DOT": b"250 2.0.0 Ok\r\n" + THEN_CLOSE, "QUIT": CLOSE}, ("r1", "r2", "r3"))),
}


def resets(peers: list[ScriptedPeer], name: str) -> int:
    """How many RSETs the peers heard in the sessions of the server called `name`."""
    return sum(line.split()[:1] == [b"RSET"] for peer in peers for heard in peer.sessions
               if heard and heard[0].split()[1:2] == [name.encode()] for line in heard)


async def test_curated_scenarios_end_as_with_postfix(mailflow_server, smtp_peer, tmp_path):
    pf_ended: dict = {}
    heard: dict[str, list[ScriptedPeer]] = {}
    assert await differences(mailflow_server, smtp_peer, tmp_path, CURATED, pf_ended, heard) == {}
    # with a recipient limit of 2 a session is reused (one at a time to a destination), so RSET is heard
    assert resets(heard["recipient-limit-2"], PF_NAME) > 0 and resets(heard["recipient-limit-2"], MF_NAME) > 0
    # Postfix's own, so that a change on both sides cannot pass unnoticed
    ended = {r.partition(".")[0]: got[1:3] for r, got in pf_ended.items()}
    assert {r: ended[r] for r in ("r1@utf8-among-ascii", "r2@utf8-among-ascii", "b@hangup-at-the-first-in-order",
                                  "a@hangup-at-the-upper-case-first", "r1@fallback-after-4xx",
                                  "r1@fallback-not-after-5xx")} == {
        "r1@utf8-among-ascii": ("5.6.7", "bounced"), "r2@utf8-among-ascii": ("2.0.0", "sent"),
        "b@hangup-at-the-first-in-order": ("4.4.2", "deferred"),
        "a@hangup-at-the-upper-case-first": ("4.4.2", "deferred"), "r1@fallback-after-4xx": ("2.0.0", "sent"),
        "r1@fallback-not-after-5xx": ("5.1.1", "bounced")}


@pytest.mark.timeout(3600)
@pytest.mark.skipif(not os.environ.get("MAILFLOW_OUTBOUND_SEEDS"), reason="set MAILFLOW_OUTBOUND_SEEDS=1-200 to run")
async def test_generated_scenarios_end_as_with_postfix(mailflow_server, smtp_peer, tmp_path):
    seeds = seed_list(os.environ["MAILFLOW_OUTBOUND_SEEDS"])
    found: dict = {}
    for start in range(0, len(seeds), 15):  # (a Postfix and a mailflow per 15 seeds: a failure stays readable)
        batch = {f"seed{seed}": generated(seed) for seed in seeds[start:start + 15]}
        found.update(await differences(mailflow_server, smtp_peer, tmp_path, batch))
    assert found == {}, "\n".join(f"{r}:\n  postfix  {got['postfix']}\n  mailflow {got['mailflow']}"
                                   for r, got in found.items())

