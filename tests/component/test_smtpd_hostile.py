"""Hostile SMTP dialogues, generated from a seed, against a real mailflow on 127.0.0.1 (STARTTLS and AUTH offered).

A dialogue is a list of steps (commands, message content, junk) drawn from what attackers and broken clients send:
NUL, 8-bit and UTF-8 bytes in commands, overlong lines, bare CR or LF anywhere, commands out of order or glued
together, pipelining after DATA, BDAT, STARTTLS and AUTH, `BDAT 0 LAST`, BDAT sizes that are not numbers or are far
larger than the data, AUTH with bad base64 or a huge initial response, MAIL and RCPT parameters repeated, unknown,
empty, `=` alone, with malformed xtext, SMTPUTF8 misused, XCLIENT and XFORWARD from a client not authorised, a PROXY
header on a plain listener, STARTTLS twice and TLS garbage after STARTTLS, and ASCII control characters and
Unicode spaces (\\x1c-\\x1f, U+0085, U+00A0, U+2003) that str.split() would take for a word break. A share of the
dialogues are clean: EHLO, then whole envelopes, only their content spoiled (NUL, bare CR or LF) now and then.
With forbid_unauth_pipelining off each dialogue is sent whole; with it on (the default), as a client keeping RFC
2920: each step's replies awaited until an EHLO is accepted, then each group's; the replies are counted, not timed
(`converse_in_groups`), so a seed replays its dialogues. Then the client half-closes and reads until the server
closes. After each one:
- every reply line is `DDD-text` or `DDD text` ending in CRLF, with an enhanced status code (RFC 2034) on every
  reply but the greeting, 334, 354, HELO's and EHLO's own lines (mailflow's ETRN replies have one, Postfix's do
  not: docs/security.md), a multi-line reply keeps its code, and nothing follows a reply that ends the session
  (221, 421, 521, 554 protocol synchronization);
- a new session is still greeted and answered at once;
at the end:
- the messages delivered are exactly those whose `250 … queued as ID` a client saw, each delivered once, whole
  (its body as sent), and the queue is empty; every message of a clean dialogue before its first spoiled one was
  queued (so that the check above has messages to look at, a spoiled one among them);
- nothing was logged with a traceback, and no error was logged (nor raised where nobody could catch it).

The second test floods (10 MB without a line end, a BDAT far bigger than its data, 100k pipelined RCPTs, a crowd
of slow sessions) against `mailflow serve` in a process of its own and checks that its peak RSS (VmHWM) grows by less
than a line's worth of the flood, each flooding session ends within its deadline, and a NOOP session is answered
promptly throughout.

HOSTILE_SEED and HOSTILE_DIALOGUES change the seed and the count (the seed is in every failure message).
"""
from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
import re
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest
import trustme

from mailflow.passwords import hash_password
from tests.support import ServerProcess, ServerThread, base_settings, free_port, merged, to_toml
from tests.support.raw import answers_noop, converse, peak_rss_mb, read_until_closed, reset_peak_rss

# an exception nobody could raise (a destructor's, a thread's) is a failure too, not a warning
pytestmark = [pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")]

SEED = int(os.environ.get("HOSTILE_SEED", "20261206"))
DIALOGUES = int(os.environ.get("HOSTILE_DIALOGUES", "150"))
HOST = "mx.mailflow.test"
SENDER = b"<s@remote.test>"
RCPT_OK = b"<alice@local.test>"

REPLY_LINE = re.compile(rb"([2-5]\d\d)([ -])(.*)", re.S)
ENHANCED = re.compile(rb"[245]\.\d{1,3}\.\d{1,3}( |$)")
EHLO_KEYWORD = re.compile(rb"[A-Z0-9][A-Z0-9-]*(?: .*)?")  # a line of the EHLO reply after its first
CLOSING = (b"221 ", b"421 ", b"521 ", b"554 5.5.0 Error: SMTP protocol synchronization")  # each ends the session
QUEUED = re.compile(rb"^250 2\.0\.0 Ok: (?:\d+ bytes )?queued as (\w+)\r$", re.M)
# what str.split() breaks a word at and Postfix's smtpd_token does not: `BDAT 4\x1cLAST` must not be a last chunk
NOT_WHITE_SPACE = [b"\x1c", b"\x1d", b"\x1e", b"\x1f", "\u0085".encode(), "\u00a0".encode(), "\u2003".encode()]
TOKEN = re.compile(rb"^Subject: hostile-(\d+-\d+)$", re.M)  # (a Maildir file has LF line ends)


# --------------------------------------------------------------------------------------------- the generator


@dataclass
class Dialogue:
    steps: list[bytes] = field(default_factory=list)
    bodies: dict[str, bytes] = field(default_factory=dict)  # token -> the message's body section as sent (unstuffed)
    must_queue: list[str] = field(default_factory=list)  # tokens of a clean dialogue's messages before a spoiled one


def _xtext(rng: random.Random) -> bytes:
    return rng.choice([b"a+2Bb", b"a+zz", b"+", b"+4", b"a+0D+0Ab", b"caf+C3+A9", b"", b"x" * 300, b"\xc3\xa9",
                       b"a b", b"+00", b"++41"])


def _mail_parameters(rng: random.Random) -> list[bytes]:
    pool = [b"SIZE=100", b"SIZE=", b"SIZE=abc", b"SIZE=99999999999999999999", b"SIZE=-1", b"BODY=8BITMIME",
            b"BODY=7BIT", b"BODY=BINARYMIME", b"BODY=", b"RET=FULL", b"RET=HDRS", b"RET=", b"RET",
            b"ENVID=" + _xtext(rng), b"SMTPUTF8", b"SMTPUTF8=YES", b"AUTH=<>", b"AUTH=" + _xtext(rng), b"FOO=bar",
            b"FOO", b"=", b"==", b"=x", b"", b"X-\xff=1"]
    chosen = rng.sample(pool, rng.choice([0, 0, 0, 1, 1, 2, 3]))
    if chosen and rng.random() < 0.3:
        chosen.append(rng.choice(chosen))  # repeated
    return chosen


def _rcpt_parameters(rng: random.Random) -> list[bytes]:
    pool = [b"NOTIFY=NEVER", b"NOTIFY=FAILURE,DELAY", b"NOTIFY=", b"NOTIFY=NEVER,FAILURE", b"NOTIFY=FOO", b"NOTIFY",
            b"ORCPT=rfc822;" + _xtext(rng), b"ORCPT=utf-8;a\\x{D800}@b", b"ORCPT=utf-8;\\x{110000}", b"ORCPT=",
            b"ORCPT=;x", b"SMTPUTF8", b"SIZE=1", b"FOO=bar", b"=", b""]
    chosen = rng.sample(pool, rng.choice([0, 0, 0, 1, 2]))
    if chosen and rng.random() < 0.3:
        chosen.append(rng.choice(chosen))
    return chosen


def _body(rng: random.Random, token: str) -> tuple[bytes, bytes]:
    """(the header and body section as stored, the body section alone): short lines, some starting with a dot, some
    8-bit."""
    lines = []
    for i in range(rng.randint(0, 6)):
        line = rng.choice([b"plain text", b".leading dot", b"..two dots", b".", b"caf\xc3\xa9 \xff 8-bit", b"",
                           b"x" * rng.randint(1, 300), b"MAIL FROM:<inside@body.test>", b"BDAT 0 LAST"])
        lines.append(line + b" %d" % i if line == b"." else line)
    body = b"".join(line + b"\r\n" for line in lines)
    return b"Subject: hostile-" + token.encode() + b"\r\n\r\n" + body, body


def _stuffed(content: bytes) -> bytes:
    return b"".join(b"." + line if line.startswith(b".") else line for line in content.splitlines(keepends=True))


def _content_mutation(rng: random.Random, content: bytes) -> bytes:
    """Bytes that must make the message refused (NUL, bare CR, bare LF), put anywhere in it before its last byte
    (after it, they would spoil the end-of-data line instead: the server would wait for one until its timeout)."""
    at = rng.randint(0, len(content) - 1)
    return content[:at] + rng.choice([b"\0", b"\r", b"\n"]) + content[at:]


def _message_steps(rng: random.Random, dialogue: Dialogue, token: str) -> list[bytes]:
    """The steps of one message's content (DATA or BDAT chunks); its body kept in `dialogue.bodies` unless it was
    spoiled (then it must not be queued)."""
    content, body = _body(rng, token)
    if rng.random() < 0.15:
        content = _content_mutation(rng, content)
    else:
        dialogue.bodies[token] = body
    if rng.random() < 0.5:
        return [b"DATA\r\n", _stuffed(content) + b".\r\n"]
    steps, rest = [], content
    while rest and rng.random() < 0.5:
        cut = rng.randint(1, len(rest))
        steps.append(b"BDAT %d\r\n" % cut + rest[:cut])
        rest = rest[cut:]
    if rng.random() < 0.1:  # `BDAT 9\x1cLAST`: one malformed word to Postfix (521), not a last chunk to be queued
        dialogue.bodies.pop(token, None)
        steps.append(b"BDAT %d" % len(rest) + rng.choice(NOT_WHITE_SPACE) + b"LAST\r\n" + rest)
    else:
        steps.append(b"BDAT %d LAST\r\n" % len(rest) + rest)
    return steps


def _auth(rng: random.Random) -> list[bytes]:
    good = base64.b64encode(b"\0alice\0s3cret")
    return rng.choice([
        [b"AUTH PLAIN " + good + b"\r\n"],
        [b"AUTH PLAIN " + base64.b64encode(b"\0alice\0wrong") + b"\r\n"],
        [b"AUTH PLAIN !!!!\r\n"], [b"AUTH PLAIN =\r\n"], [b"AUTH PLAIN " + b"QUFB" * 5000 + b"\r\n"],
        [b"AUTH PLAIN\r\n", good + b"\r\n"], [b"AUTH PLAIN\r\n", b"*\r\n"], [b"AUTH PLAIN\r\n", b"%%%\r\n"],
        [b"AUTH PLAIN\r\n", b"QUFB" * 5000 + b"\r\n"], [b"AUTH PLAIN " + base64.b64encode(b"\0\xff\0\xfe") + b"\r\n"],
        [b"AUTH LOGIN\r\n", base64.b64encode(b"alice") + b"\r\n", base64.b64encode(b"s3cret") + b"\r\n"],
        [b"AUTH LOGIN " + base64.b64encode(b"alice") + b"\r\n", b"*\r\n"], [b"AUTH CRAM-MD5\r\n"], [b"AUTH\r\n"],
        [b"AUTH PLAIN a b\r\n"],
    ])


def _envelope(rng: random.Random) -> list[bytes]:
    steps = [b"MAIL FROM:" + rng.choice([SENDER] * 6 + [b"<>", b"<\xc3\xa9@remote.test>", b"s@remote.test",
                                                      b"<s@remote.test", b"<-s@remote.test>"])
             + b"".join(b" " + p for p in _mail_parameters(rng)) + b"\r\n"]
    for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):
        path = rng.choice([RCPT_OK] * 6 + [b"<nobody@local.test>", b"<x@elsewhere.test>",
                           b"<\xc3\xa9@local.test>", b"<>", b"alice@local.test", b"<alice@local.test"])
        steps.append(b"RCPT TO:" + path + b"".join(b" " + p for p in _rcpt_parameters(rng)) + b"\r\n")
    return steps


def _odd_command(rng: random.Random) -> list[bytes]:
    return rng.choice([
        [b"RSET\r\n"], [b"NOOP\r\n"], [b"QUIT\r\n"], [b"VRFY alice\r\n"], [b"ETRN relay.test\r\n"], [b"HELP\r\n"],
        [b"EXPN alice\r\n"], [b"HELO\r\n"], [b"EHLO\r\n"], [b"EHLO \xc3\xa9.test\r\n"], [b"HELO hostile.test\r\n"],
        [b"STARTTLS\r\n"], [b"STARTTLS\r\n", b"STARTTLS\r\n"], [b"STARTTLS x\r\n"],
        [b"STARTTLS\r\n", b"\x16\x03\x01\x00\x05hello" + bytes(rng.randrange(256) for _ in range(200))],
        [b"STARTTLS\r\n", b"\x16\x03\x01\xff\xff" + b"\0" * 100], [b"STARTTLS\r\nNOOP\r\n"],
        [b"XCLIENT ADDR=192.0.2.1 NAME=spoofed.test\r\n"], [b"XCLIENT\r\n"], [b"XFORWARD NAME=spoofed.test\r\n"],
        [b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 25\r\n"], [b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c" + b"\0" * 12],
        [b"BDAT 0 LAST\r\n"], [b"BDAT 0\r\n"], [b"BDAT x\r\n"], [b"BDAT -1\r\n"], [b"BDAT 1e3\r\n"], [b"BDAT\r\n"],
        [b"BDAT 99999999999999999999999\r\n"], [b"BDAT 50000\r\nshort"], [b"BDAT 3 LAST extra\r\nabc"],
        [b"DATA\r\n"], [b"DATA x\r\n"], [b"GET / HTTP/1.1\r\nHost: mx\r\n\r\n"], [b"Subject: not a command\r\n"],
        [b"<s@remote.test>\r\n"], [bytes(rng.randrange(256) for _ in range(rng.randint(1, 60)))],
        [b"NOOP " + b"x" * rng.choice([2040, 2041, 2042, 5000]) + b"\r\n"],
    ])


def _mutated(rng: random.Random, step: bytes) -> bytes:
    """One command line spoiled as a broken client or an attacker spoils it."""
    at = rng.randint(0, len(step))
    kind = rng.randrange(10)
    if kind == 9:  # in place of a space, or anywhere
        spaces = [i for i, byte in enumerate(step) if byte == 0x20]
        at = rng.choice(spaces) if spaces and rng.random() < 0.7 else at
        return step[:at] + rng.choice(NOT_WHITE_SPACE) + step[at + (step[at:at + 1] == b" "):]
    if kind == 0:
        return step[:at] + b"\0" + step[at:]
    if kind == 1:
        return step[:at] + bytes([rng.randrange(128, 256)]) + step[at:]
    if kind == 2:
        return step[:at] + "\u00e9\u4e2d\U0001f600".encode()[: rng.randint(1, 9)] + step[at:]
    if kind == 3:
        return step[:at] + b"\r" + step[at:]
    if kind == 4:
        return step[:at] + b"\n" + step[at:]
    if kind == 5:
        return step.rstrip(b"\r\n") + b"y" * rng.choice([2048, 3000, 70000]) + b"\r\n"
    if kind == 6:
        return step.replace(b"\r\n", b"\n")
    if kind == 7:
        return step.rstrip(b"\r\n")  # glued to the next step
    return step.lower()


def dialogue(rng: random.Random, number: int) -> Dialogue:
    if rng.random() < 0.3:
        return _clean_dialogue(rng, number)
    d = Dialogue()
    plan: list[list[bytes]] = []
    hello = rng.random()
    if hello < 0.75:
        plan.append([b"EHLO hostile.test\r\n"])
    elif hello < 0.85:
        plan.append([b"HELO hostile.test\r\n"])
    for message in range(rng.randint(1, 4)):
        kind = rng.random()
        if kind < 0.5:
            plan.append(_envelope(rng))
            plan.append(_message_steps(rng, d, f"{number}-{message}"))
        elif kind < 0.65:
            plan.append(_auth(rng))
        else:
            plan.append(_odd_command(rng))
    if rng.random() < 0.2:
        i, j = rng.randrange(len(plan)), rng.randrange(len(plan))
        plan[i], plan[j] = plan[j], plan[i]  # commands in the wrong order
    for group in plan:
        for step in group:
            content = not step[:4].isalpha() or step.startswith((b"Subject: hostile", b"BDAT "))
            d.steps.append(_mutated(rng, step) if not content and rng.random() < 0.06 else step)
    if rng.random() < 0.5:
        d.steps.append(b"QUIT\r\n")
    return d


def _clean_dialogue(rng: random.Random, number: int) -> Dialogue:
    """EHLO, then messages whose envelopes are taken (alice, a sender of remote.test), their content spoiled now
    and then: every message before the first spoiled one must be queued (a spoiled DATA may end the session)."""
    d = Dialogue(steps=[b"EHLO hostile.test\r\n"])
    spoiled = False
    for message in range(rng.randint(1, 4)):
        token = f"{number}-{message}"
        d.steps += [b"MAIL FROM:" + SENDER + b"\r\n", b"RCPT TO:" + RCPT_OK + b"\r\n"]
        d.steps += _message_steps(rng, d, token)
        spoiled = spoiled or token not in d.bodies
        if not spoiled:
            d.must_queue.append(token)
    if rng.random() < 0.5:
        d.steps.append(b"QUIT\r\n")
    return d


# ------------------------------------------------------------------------------------------------- the checks


def reply_problems(output: bytes) -> list[str]:
    """What is wrong with a session's replies (empty: nothing). Output after `220 … Ready to start TLS` is TLS."""
    tls_at = output.find(b" Ready to start TLS\r\n")
    if tls_at >= 0:
        output = output[:tls_at + len(b" Ready to start TLS\r\n")]
    if not output:
        return []
    problems = []
    if not output.endswith(b"\r\n"):
        problems.append(f"unterminated last line: {output[-80:]!r}")
    lines = output.split(b"\r\n")[:-1]
    code_of_reply = None
    in_ehlo_reply = False  # a line after `250-mx.mailflow.test`, in the same reply: a keyword
    for i, line in enumerate(lines):
        match = REPLY_LINE.fullmatch(line)
        if match is None or b"\r" in line or b"\n" in line:
            problems.append(f"malformed line: {line[:100]!r}")
            continue
        code, separator, text = match.groups()
        if code_of_reply is not None and code != code_of_reply:
            problems.append(f"a multi-line reply changed its code: {line[:100]!r}")
        first_of_reply = code_of_reply is None
        code_of_reply = code if separator == b"-" else None
        hello = code == b"250" and (
            (first_of_reply and text == HOST.encode()) or (in_ehlo_reply and EHLO_KEYWORD.fullmatch(text)))
        in_ehlo_reply = bool(hello) and separator == b"-"
        hello = hello or text in (b"Syntax: HELO hostname", b"Syntax: EHLO hostname")
        greeting = i == 0 and code in (b"220", b"554", b"421")
        if not (greeting or hello or code in (b"334", b"354") or ENHANCED.match(text)):
            problems.append(f"no enhanced status code: {line[:100]!r}")
        if separator == b" " and line.startswith(CLOSING) and i != len(lines) - 1 and not greeting:
            problems.append(f"replies after a closing {code.decode()}: {lines[i + 1][:100]!r}")
    return problems


ENDS_A_GROUP = re.compile(rb"(?i)(EHLO|HELO|DATA|VRFY|NOOP|QUIT|STARTTLS)\b")  # (a message's content too)
FINAL_LINE = re.compile(rb"^\d{3} ", re.M)
EHLO_ACCEPTED = b"250-" + HOST.encode() + b"\r\n"
TLS_STARTS = b" Ready to start TLS\r\n"
SERVER_DEADLINE = 2.0  # the server's command (and STARTTLS) timeout: hostile_settings


def converse_in_groups(port: int, steps: list[bytes], limit: float = 6.0) -> bytes:
    """The greeting, then the steps as a client that keeps RFC 2920 (until an EHLO is accepted, each step's replies
    are awaited before the next step is sent; after it, each group's), then the sending side closed; everything
    the server said until it closed the connection. The replies awaited are counted (`replies_expected`), not
    timed: the wait ends when they have all come or the server closed (past its command deadline, when it waits
    for input that the count expected it to answer). What is sent when depends only on what was said before, so a
    seed replays its dialogues."""
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
        out, _ = _await_replies(s, b"", 1)
        expected = 1  # final reply lines, the greeting's among them
        try:
            for step in steps:
                content = _last_reply_code(out) == b"354"  # (every reply before it has come: DATA ends a group)
                s.sendall(step)
                expected += replies_expected(step, content)
                if content or ENDS_A_GROUP.match(step) or EHLO_ACCEPTED not in out:
                    out, closed = _await_replies(s, out, expected)
                    if closed:
                        return out
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server closed first: what it said is still read below
        return out + read_until_closed(s, limit)


def replies_expected(step: bytes, content: bool) -> int:
    """The final reply lines a step gets: one for a message's `content` (sent after 354) and for a BDAT chunk (its
    data may hold line ends), else one for each line end (a line glued to the next step: none). Too many only makes
    the client wait until the server closes the session; too few would let it send early."""
    if content or (step.startswith(b"BDAT ") and b"\r\n" in step):
        return 1
    return step.count(b"\r\n")


def _last_reply_code(said: bytes) -> bytes:
    finals = FINAL_LINE.findall(said)
    return finals[-1][:3] if finals else b""


def _await_replies(s: socket.socket, out: bytes, count: int) -> tuple[bytes, bool]:
    """`out` and what the server says until `count` final reply lines were said in all (those after STARTTLS's
    220 are TLS: not counted), or it closed (and whether it did). Bounded: a server waiting for input closes the
    session at its command deadline."""
    deadline = time.monotonic() + SERVER_DEADLINE + 3.0
    while len(FINAL_LINE.findall(out.split(TLS_STARTS)[0])) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"the server neither answered nor closed within its deadline: {out[-300:]!r}"
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except OSError:
            return out, True
        if not chunk:
            return out, True
        out += chunk
        if TLS_STARTS in out:  # TLS now: the server ends the session on what follows
            return out, False
    return out, False


class Troubles(logging.Handler):
    """Log records with a traceback, or at ERROR and above, from any thread."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR or "Traceback" in record.getMessage():
            self.records.append(record)


@pytest.fixture
def troubles():
    handler = Troubles()
    logging.getLogger().addHandler(handler)
    yield handler
    logging.getLogger().removeHandler(handler)


def hostile_settings(tmp_path, **smtpd) -> dict:
    ca = trustme.CA()
    cert = tmp_path / "cert.pem"
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
    users = tmp_path / "users"
    users.write_text(f"alice {hash_password('s3cret', n=1024, r=8, p=1)}\n")
    return merged(base_settings(tmp_path), {"smtpd": {
        "listen": ["127.0.0.1:0"], "timeout": "2s", "tls_cert_file": str(cert), "starttls_timeout": "2s",
        "sasl_auth_enable": True, "sasl_user_maps": [f"texthash:{users}"], "allow_plaintext_auth_on_loopback": True,
        "auth_failure_delay": 0, "error_sleep_time": 0, "message_size_limit": 100_000,
        "forbid_unauth_pipelining": False,
        # no relaying even after AUTH: every message queued is for alice and must reach her Maildir
        "relay_restrictions": ["permit_mynetworks", "reject_unauth_destination"], **smtpd}})


# -------------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("pipelining_checked", [False, True], ids=["pipelining-unchecked", "pipelining-checked"])
def test_generated_hostile_dialogues_keep_replies_well_formed_and_messages_whole(tmp_path, troubles,
                                                                                 pipelining_checked):
    """With forbid_unauth_pipelining off (dialogues sent whole reach deep), and on (Postfix 3.9's default and
    mailflow's: dialogues sent in RFC 2920 groups)."""
    server = ServerThread(hostile_settings(tmp_path, forbid_unauth_pipelining=pipelining_checked))
    rng = random.Random(SEED + pipelining_checked)
    queued: list[bytes] = []
    bodies: dict[str, bytes] = {}
    must_queue: list[str] = []
    started = time.monotonic()
    try:
        for number in range(DIALOGUES):
            d = dialogue(rng, number)
            output = (converse_in_groups(server.port, d.steps) if pipelining_checked else
                      converse(server.port, b"".join(d.steps), limit=6.0))
            where = (f"seed {SEED}, pipelining checked {pipelining_checked}, dialogue {number}: {d.steps!r:.2000}\n"
                     f"replies: {output!r:.2000}")
            assert reply_problems(output) == [], where
            queued += QUEUED.findall(output.split(TLS_STARTS)[0])
            bodies.update(d.bodies)
            must_queue += d.must_queue
            answers_noop(server.port, within=2.0)
        messages = server.settle(tmp_path / "mail" / "alice" / "Maildir", len(queued))
        ids = [re.search(rb"\bid (\w+)", m).group(1) for m in messages]  # (the Received header mailflow added)
        assert sorted(ids) == sorted(queued), f"seed {SEED}: delivered {ids}, queued {queued}"
        tokens = []
        for message in messages:  # each whole: its body as sent (local delivery writes LF line ends)
            token = TOKEN.search(message)
            assert token is not None and token.group(1).decode() in bodies, f"seed {SEED}: {message[:300]!r}"
            tokens.append(token.group(1).decode())
            body = bodies[tokens[-1]].replace(b"\r\n", b"\n")
            assert message.endswith(b"\n\n" + body), f"seed {SEED}: {message!r}"
        # the whole-or-nothing check above had messages to look at: a clean dialogue's are all queued
        assert set(must_queue) <= set(tokens), f"seed {SEED}: not queued: {sorted(set(must_queue) - set(tokens))}"
        assert len(must_queue) >= DIALOGUES // 5, f"seed {SEED}: only {len(must_queue)} clean messages"
        assert troubles.records == [], f"seed {SEED}: " + "\n".join(
            logging.Formatter().format(r) for r in troubles.records[:3])
        print(f"hostile: seed {SEED}, {DIALOGUES} dialogues, {len(queued)} messages queued and delivered whole "
              f"({len(must_queue)} from clean dialogues), {time.monotonic() - started:.1f} s")
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------------- floods


class Canary(threading.Thread):
    """A new session's NOOP every 50 ms while a flood runs: the slowest answer."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port, self.slowest, self.failure = port, 0.0, None
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                self.slowest = max(self.slowest, answers_noop(self.port, within=3.0))
            except (AssertionError, OSError) as e:
                self.failure = repr(e)
            self._done.wait(0.05)

    def __enter__(self) -> "Canary":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self.join(10)


class Flood(threading.Thread):
    """`fn(port)` in a thread of its own; `result()` waits for what it returned (30 s at most)."""

    def __init__(self, fn, port: int):
        super().__init__(daemon=True)
        self._fn, self._port, self._result, self._error = fn, port, None, None
        self.start()

    def run(self) -> None:
        try:
            self._result = self._fn(self._port)
        except BaseException as e:  # (re-raised by result())
            self._error = e

    def result(self):
        self.join(30)
        assert not self.is_alive(), f"{self._fn.__name__} still running"
        if self._error is not None:
            raise self._error
        return self._result


def _garbage_without_line_end(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        reader = s.makefile("rb")
        reader.readline()
        block = b"x" * 65536
        for _ in range(160):  # 10 MB
            s.sendall(block)
        s.sendall(b"\r\nNOOP\r\n")
        return reader.readline() + reader.readline()


def _bdat_bigger_than_its_data(port: int) -> tuple[bytes, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        reader = s.makefile("rb")
        reader.readline()
        s.sendall(b"EHLO hostile.test\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@local.test>\r\n"
                  b"BDAT 99999\r\nonly this")
        started = time.monotonic()
        return reader.read(), time.monotonic() - started  # (until the server closes)


def _pipelined_recipients(port: int, count: int = 100_000) -> tuple[bytes, float]:
    payload = (b"EHLO hostile.test\r\nMAIL FROM:<s@remote.test>\r\n" + b"RCPT TO:<alice@local.test>\r\n" * count
               + b"QUIT\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.recv(4096)
        started = time.monotonic()
        sender = threading.Thread(target=_send_quietly, args=(s, payload), daemon=True)
        sender.start()
        out = bytearray()
        while chunk := _recv_quietly(s):
            out += chunk
        sender.join(10)
        return bytes(out), time.monotonic() - started


def _send_quietly(s: socket.socket, data: bytes) -> None:
    try:
        s.sendall(data)
    except OSError:
        pass  # the server hung up (the error limit)


def _recv_quietly(s: socket.socket) -> bytes:
    try:
        return s.recv(1 << 20)
    except OSError:
        return b""


def _slow_sessions(port: int, count: int = 30) -> list[float]:
    """`count` sessions sending one byte of a command every 0.3 s: how long each lasted (the server must end them
    at its 2 s command deadline)."""
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
    started = time.monotonic()
    ended: dict[int, float] = {}
    try:
        for s in sockets:
            s.recv(4096)
            s.setblocking(False)
        while len(ended) < count and time.monotonic() - started < 8:
            for i, s in enumerate(sockets):
                if i in ended:
                    continue
                try:
                    s.send(b"N")
                    if s.recv(4096) == b"":
                        ended[i] = time.monotonic() - started
                except BlockingIOError:
                    pass
                except OSError:
                    ended[i] = time.monotonic() - started
            time.sleep(0.3)
    finally:
        for s in sockets:
            s.close()
    return [ended.get(i, float("inf")) for i in range(count)]


FLOOD_GROWTH_MB = 8  # of the server's peak RSS: under the 10 MB line a server that buffered it would hold


def test_floods_leave_memory_bounded_and_other_sessions_served(tmp_path):
    # (error limits out of the way, so that the 100k RCPTs are all read and answered: a server that hangs up with
    # input unread resets the connection, and the client may lose the replies it had not read yet)
    port = free_port()
    settings = hostile_settings(tmp_path, listen=[f"127.0.0.1:{port}"], hard_error_limit=1_000_000,
                                recipient_overshoot_limit=1_000_000)
    config = tmp_path / "mailflow.toml"
    config.write_text(to_toml(merged(settings, {"log": {"level": "warning"}})))
    server = ServerProcess(config, tmp_path / "server.log", port)
    asyncio.run(server.start())
    try:
        answers_noop(port, within=2.0)
        reset_peak_rss(server.proc.pid)  # (the start-up's peak is not the floods')
        baseline = peak_rss_mb(server.proc.pid)
        with Canary(port) as canary:  # the floods at once
            recipients, chunk, slow = (Flood(fn, port) for fn in (_pipelined_recipients, _bdat_bigger_than_its_data,
                                                                   _slow_sessions))
            assert _garbage_without_line_end(port) == b"500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n"
            output, lasted = chunk.result()
            assert output.endswith(b"421 4.4.2 mx.mailflow.test Error: timeout exceeded\r\n") and lasted < 5.0
            assert max(slow.result()) < 5.0  # (the command deadline is 2 s)
            output, lasted = recipients.result()
            # each answered: the first 1000 taken, the others refused (recipient_limit; no error limit here)
            assert output.count(b"250 2.1.5 Ok\r\n") == 1000 and lasted < 30.0, output[-300:]
            assert output.count(b"452 4.5.3 Error: too many recipients\r\n") == 99_000, output[-300:]
            assert output.endswith(b"221 2.0.0 Bye\r\n") and reply_problems(b"220 greeting\r\n" + output) == []
        peak = peak_rss_mb(server.proc.pid)
        assert canary.failure is None, canary.failure
        assert canary.slowest < 1.0, f"a NOOP session waited {canary.slowest:.2f} s during a flood"
        assert peak - baseline < FLOOD_GROWTH_MB, f"the server's peak RSS grew from {baseline:.0f} MB to {peak:.0f} MB"
        troubles = [line for line in server.log_lines("]: ") if "]: error: " in line or "]: fatal: " in line]
        assert troubles + server.log_lines("Traceback") == []
        print(f"floods: the server's peak RSS {baseline:.1f} MB, then {peak:.1f} MB; slowest NOOP session "
              f"{canary.slowest:.3f} s")
    finally:
        server.kill()


@pytest.mark.parametrize("output, problem", [
    (b"220 mx ESMTP\r\n250 Ok\r\n", "no enhanced status code"),
    (b"220 mx ESMTP\r\n250 2.0.0 Ok", "unterminated"),
    (b"220 mx ESMTP\r\n25O 2.0.0 Ok\r\n", "malformed"),
    (b"220 mx ESMTP\r\n250-2.0.0 a\r\n550 5.0.0 b\r\n", "changed its code"),
    (b"220 mx ESMTP\r\n221 2.0.0 Bye\r\n250 2.0.0 Ok\r\n", "after a closing 221"),
    (b"220 mx ESMTP\r\n500 5.5.2 a\rb\r\n", "malformed"),
    (b"220 mx ESMTP\r\n250 OK\r\n", "no enhanced status code"),  # (a keyword's form, outside an EHLO reply)
    (b"220 mx ESMTP\r\n250-mx.mailflow.test\r\n250 SIZE 100\r\n250 OK\r\n", "no enhanced status code"),
    (b"220 mx ESMTP\r\n554 5.5.0 Error: SMTP protocol synchronization\r\n250 2.0.0 Ok\r\n", "after a closing 554"),
])
def test_the_reply_checker_finds_what_it_looks_for(output, problem):
    assert any(problem in found for found in reply_problems(output))
    fine = (b"220 mx ESMTP\r\n250-mx.mailflow.test\r\n250 SIZE 100\r\n354 Go\r\n334 \r\n501 Syntax: HELO hostname\r\n"
            b"250 2.0.0 Ok\r\n220 2.0.0 Ready to start TLS\r\n\x15\x03")
    assert reply_problems(fine) == []


def test_a_hostile_path_word_leaves_other_sessions_answered(tmp_path):
    """One MAIL line whose path word makes a backtracking check try every split of its atoms (27 of them froze the
    server about 3 s, 40 for hours: smtpd is one event loop) is refused, and a second client is answered at once
    meanwhile. The server runs in a process of its own, so that a frozen one cannot freeze the test's client."""
    port = free_port()
    config = tmp_path / "mailflow.toml"
    config.write_text(to_toml(merged(hostile_settings(tmp_path, listen=[f"127.0.0.1:{port}"]),
                                     {"log": {"level": "warning"}})))
    server = ServerProcess(config, tmp_path / "server.log", port)
    asyncio.run(server.start())
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5.0) as hostile:
            reader = hostile.makefile("rb")
            assert reader.readline().startswith(b"220 ")
            hostile.sendall(b"EHLO client.test\r\n")
            while not reader.readline().startswith(b"250 "):
                pass
            for word in (b"a" * 40 + b"@<x@y.test>", b'"J"' + b"a" * 40 + b";<x@y.test>"):
                hostile.sendall(b"MAIL FROM:" + word + b"\r\n")
                answers_noop(port, within=2.0)
                assert reader.readline() == b"501 5.1.7 Bad sender address syntax\r\n"
    finally:
        server.kill()
