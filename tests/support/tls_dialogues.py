"""Seeded SMTP dialogues that involve TLS, for the differential test against Postfix's smtpd
(tests/interop/test_tls_dialogue_vs_postfix.py); the plain-text stream is tests/support/dialogues.py, whose
command units this one draws on.

- `generated(seed)`: one session of 3 to 12 steps, the same for the same seed, and the service it goes to: `mta`
  (smtpd_tls_security_level = may), `submission` (encrypt) or `submissions` (wrapper mode: TLS from the first
  byte). A step is a `Step`: command units sent at once (more than one: a pipelined group) and, for the last unit
  of a step, what follows its reply (`after`):
  - `content`: the message sent after a 354;
  - `tls`, after a STARTTLS answered 220: `handshake` (the units pipelined after that STARTTLS are never
    answered: both servers discard plaintext read ahead of the handshake), `plain` (a plain-text command line
    where the handshake should be: the handshake fails) or `abort` (the connection closed, no handshake);
  - a last step may be `ABRUPT`: the connection closed without QUIT (inside TLS: no close_notify).

What is drawn: STARTTLS at every point (before and after EHLO, after HELO, inside a transaction, twice, with an
argument, in odd case, pipelined after other commands and before them), then EHLO or HELO again or commands before
it; AUTH PLAIN and LOGIN (right, wrong, with and without an initial response, before TLS, before EHLO); MAIL,
RCPT (a local and a relayed recipient), DATA, RSET, NOOP, HELP, QUIT, unknown verbs; the plain stream's units
(dialogues.unit) now and then. Left out on purpose: what dialogues.py leaves out, and the documented differences
of test_submission_vs_postfix.py's DELIBERATE (a mechanism other than PLAIN and LOGIN, base64 that is not, the
reason after a 535, AUTH without an EHLO since TLS began: `no_auth_without_ehlo`), STARTTLS inside a mail
transaction (`no_starttls_in_a_transaction`), VRFY (off in mailflow), and an AUTH= in a MAIL after one that had
one, until an RSET, HELO or EHLO (`dialogues.one_auth_mail`: Postfix keeps a refused MAIL's AUTH= for the next
MAIL). That mask rewrites every session with a second AUTH= (its MAIL goes without it), not only those where the
first MAIL was refused, so sessions drawn before it was added test fewer AUTH= parameters than they did.
"""
from __future__ import annotations

import base64
import random
from typing import NamedTuple

from tests.support import dialogues

ALICE = "alice@example.test"  # tests/support/dovecot.py's users


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class Step(NamedTuple):
    units: tuple[bytes, ...]  # each with its CRLF
    content: bytes = b""  # sent after a 354 to the last unit
    tls: str = "handshake"  # after a 220 to a STARTTLS unit: handshake, plain or abort


ABRUPT = Step((), tls="abrupt")  # the client closes without QUIT
SERVICES = ["mta", "mta", "submission", "submission", "submissions"]
STARTTLS = ["STARTTLS"] * 8 + ["starttls", "StartTLS", "STARTTLS now", "STARTTLS ", "STARTTLS  x"]
# each with the answers it asks for (a 334 each): sent as steps of their own after it; where the AUTH was refused
# they are commands (500 on both)
AUTHS = [("AUTH PLAIN " + b64(f"\0{ALICE}\0alicepw"), 0)] * 4 + [
    ("AUTH PLAIN " + b64(f"\0{ALICE}\0nope"), 0), ("AUTH LOGIN", 2), ("AUTH LOGIN " + b64(ALICE), 1),
    ("AUTH PLAIN", 1), ("AUTH", 0), ("AUTH PLAIN =", 0), ("AUTH plain " + b64(f"\0{ALICE}\0alicepw"), 0)]
ANSWERS = [b64(f"\0{ALICE}\0alicepw"), b64(ALICE), b64("alicepw"), "*", ""]  # to a 334, as a unit of its own
SENDERS = ["<s@remote.test>", f"<{ALICE}>", "<>", f"<{ALICE}> AUTH=<{ALICE}>", "<s@remote.test> SIZE=100"]
RECIPIENTS = ["<alice@local.test>", "<alice@local.test>", "<x@elsewhere.test>", "<nobody@local.test>"]
OTHER = ["RSET", "NOOP", "HELP", "NOOP x", "FOO", "ETRN relay.test", "ETRN local.test", "XCLIENT NAME=x.test",
         "DATA x", "BDAT 0 LAST"]


def line(text: str) -> bytes:
    return text.encode() + b"\r\n"


def starttls(rng: random.Random) -> bytes:
    return line(rng.choice(STARTTLS))


def hello(rng: random.Random) -> bytes:
    return line(rng.choice(["EHLO c.test"] * 6 + ["HELO c.test"] * 2 + ["EHLO", "ehlo c.test"]))


def auth(rng: random.Random) -> list[Step]:
    """An AUTH, a step of its own, and a step for each answer it asks for (the right one, mostly)."""
    command, answers = rng.choice(AUTHS)
    out = [Step((line(command),))]
    for n in range(answers):
        right = b64(f"\0{ALICE}\0alicepw") if command == "AUTH PLAIN" else b64("alicepw") if n or " " in command \
            else b64(ALICE)
        out.append(Step((line(right if rng.random() < 0.7 else rng.choice(ANSWERS)),)))
    return out


def answer(rng: random.Random) -> bytes:
    return line(rng.choice(ANSWERS))


def mail(rng: random.Random) -> bytes:
    return line("MAIL FROM:" + rng.choice(SENDERS))


def rcpt(rng: random.Random) -> bytes:
    return line("RCPT TO:" + rng.choice(RECIPIENTS))


def data(rng: random.Random) -> bytes:
    return b"DATA\r\n"


def other(rng: random.Random) -> bytes:
    return line(rng.choice(OTHER))


def plain_unit(rng: random.Random) -> bytes:
    """One of the plain stream's units, without its long lines and BDATs (those are dialogues.py's business)."""
    while True:
        unit = dialogues.unit(rng)
        if len(unit) < 500 and not unit.lstrip()[:4].upper() == b"BDAT" and not dialogues.is_data(unit):
            return unit


UNITS = [(starttls, 4), (hello, 4), (answer, 1), (mail, 3), (rcpt, 3), (data, 1), (other, 2),
         (plain_unit, 1)]


def unit(rng: random.Random) -> bytes:
    return rng.choices([u for u, _ in UNITS], [w for _, w in UNITS])[0](rng)


def is_starttls(unit_: bytes) -> bool:
    return unit_.strip().upper() == b"STARTTLS"


def after_220(rng: random.Random) -> str:
    return rng.choice(["handshake"] * 12 + ["plain", "abort"])


def step(rng: random.Random) -> list[Step]:
    """One unit, an AUTH exchange, or now and then a pipelined group (DATA only last)."""
    if rng.random() < 0.12:
        return auth(rng)
    if rng.random() < 0.25:
        group = [u for u in (unit(rng) for _ in range(rng.randint(2, 4))) if not dialogues.is_data(u)]
        if rng.random() < 0.3:
            group.append(data(rng))
        units = tuple(group) or (data(rng),)
    else:
        units = (unit(rng),)
    return [Step(units, rng.choice(dialogues.CONTENTS[:2]), after_220(rng))]


def opening(rng: random.Random) -> list[Step]:
    """Most sessions begin as a client does: EHLO, STARTTLS, (EHLO); then the draw goes its way."""
    out = [Step((hello(rng),))] if rng.random() < 0.85 else []
    if rng.random() < 0.6:
        out.append(Step((starttls(rng),), tls=after_220(rng)))
        if rng.random() < 0.7:
            out.append(Step((hello(rng),)))
    return out


def no_auth_without_ehlo(steps: list[Step], tls_at_start: bool = False) -> list[Step]:
    """`steps` without the AUTH commands sent inside TLS without an EHLO since TLS began (none yet, or after a
    HELO, a STARTTLS; a HELO inside TLS after the plaintext EHLO too; an EHLO pipelined after a STARTTLS does not
    count, it may have been discarded): Postfix takes them, mailflow answers `503 5.5.1 Error: send EHLO first`
    (docs/security.md; checked by test_submission_vs_postfix.py's DELIBERATE). Those sent before TLS stay (both
    refuse them alike: 503 authentication not enabled, 530 on an encrypt service); `tls_at_start`: wrapper mode.
    Whether a STARTTLS began TLS is not known here: any STARTTLS counts as one (an AUTH after a refused STARTTLS
    is left out too)."""
    ehlo, tls, out = False, tls_at_start, []
    for step_ in steps:
        units, after_starttls = [], False
        for unit_ in step_.units:
            words = unit_.split()
            verb = words[0].upper() if words else b""
            if verb == b"AUTH" and tls and not ehlo:
                continue
            if (verb == b"EHLO" and len(words) == 2) or (verb == b"HELO" and len(words) >= 2):
                # (pipelined after a STARTTLS: maybe discarded; `HELO a b` is taken by both, seed 72359)
                ehlo = verb == b"EHLO" and not after_starttls
            elif verb == b"STARTTLS":
                ehlo, tls, after_starttls = False, True, True
            units.append(unit_)
        if units or not step_.units:
            out.append(step_._replace(units=tuple(units)))
    return out


def no_starttls_in_a_transaction(steps: list[Step]) -> list[Step]:
    """`steps` without the STARTTLS commands that may come inside a mail transaction (after a MAIL, until an RSET,
    HELO or EHLO: `dialogues.resets`; a DATA is not taken to end it, as it may have been refused): Postfix takes
    them and resets the transaction, mailflow answers `503 5.5.1 Error: MAIL transaction in progress`
    (docs/security.md)."""
    open_, out = False, []
    for step_ in steps:
        units = []
        for unit_ in step_.units:
            open_ = (open_ and not dialogues.resets(unit_)) or unit_.lstrip()[:4].upper() == b"MAIL"
            if not (open_ and unit_.split()[:1] and unit_.split()[0].upper() == b"STARTTLS"):
                units.append(unit_)
        if units or not step_.units:
            out.append(step_._replace(units=tuple(units)))
    return out


def generated(seed: int) -> tuple[str, list[Step]]:
    """(the service, the steps) of `seed`."""
    rng = random.Random(seed)
    service = rng.choice(SERVICES)
    steps = opening(rng)
    length = rng.randint(3, 12)
    while len(steps) < length:
        steps += step(rng)
    if rng.random() < 0.15:
        steps.append(ABRUPT)
    steps = dialogues.one_auth_mail(no_starttls_in_a_transaction(steps))  # (seed 72116: AUTH= after a refused MAIL's)
    return service, no_auth_without_ehlo(steps, tls_at_start=service == "submissions")
