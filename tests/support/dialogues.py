"""Seeded SMTP dialogues for the differential test of the dialogue against Postfix's smtpd
(tests/interop/test_dialogue_vs_postfix.py).

- `generated(seed)`: one session of 3 to 15 steps, the same for the same seed. A step is a `Step`: one or more
  command units sent at once (more than one: a pipelined group), each unit a command line with its CRLF, a BDAT's
  chunk after it; and the content sent after a 354 to the group's last unit (DATA is only ever last).

What is drawn: verbs in odd case, with extra, missing or trailing blanks or a tab; HELO/EHLO with odd names or
none; RSET, NOOP, HELP with arguments; commands out of order; unknown verbs, junk lines, lines near and over the
line limit; MAIL and RCPT parameters valid and not (SIZE, BODY, RET, ENVID, NOTIFY, ORCPT, AUTH, duplicated,
unknown, without '=' or value); BDAT chunks (sizes, LAST, zero, after DATA and before, without MAIL); DATA with
content; pipelined groups. Left out on purpose (the differences kept, test_smtpd_vs_postfix.py's docstring): VRFY,
bare LF or CR, NUL, anything not ASCII (SMTPUTF8 too), STARTTLS. Every chunk is exactly the size its BDAT names
(a BDAT without its blank, an unknown verb, has none) and a group's DATA is its last unit, so that no server is
left waiting for input the generator will not send, nor gets a chunk's lines as commands.
"""
from __future__ import annotations

import random
import re
from typing import Callable, NamedTuple

from mailflow.syntax import ascii_upper


class Step(NamedTuple):
    units: tuple[bytes, ...]  # each with its CRLF (and a BDAT's chunk)
    content: bytes = b""  # sent after a 354 to the last unit, ending with the CRLF . CRLF (or command lines after it)


def commands_after_data(content: bytes) -> int:
    """How many command lines `content` holds after its end-of-data line (pipelined in the same write: each gets a
    reply of its own after the content's)."""
    end = 3 if content.startswith(b".\r\n") else content.find(b"\r\n.\r\n") + 5
    return content[end:].count(b"\r\n") if end >= 3 else 0


CONTENTS = [b"Subject: probe\r\n\r\nbody\r\n.\r\n", b"Subject: dots\r\n\r\n..a\r\n.b\r\n.\r\n",
            b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 80 + b".\r\n",  # past message_size_limit (4096)
            b"Subject: long line\r\n\r\n" + b"z" * 1500 + b"\r\n.\r\n", b".\r\n"]
HELO_NAMES = ["client.test", "", "bad_host!", "[127.0.0.1]", "[1.2.3]", "localhost", "a b", "client.test.",
              "x" * 300, "-x.test", "192.0.2.1", "[IPv6:::1]"]
SENDERS = ["<s@remote.test>", "<>", "s@remote.test", "<s@remote.test", "<bob>", " <s@remote.test>", "",
           "<postmaster>", "<s@local.test>", "<@hop.test:s@remote.test>"]
RECIPIENTS = ["<alice@local.test>", "<alice@local.test>", "<nobody@local.test>", "<x@elsewhere.test>",
              "<postmaster>", "<x@relay.test>", "alice@local.test", "<>", "<alice@local.test", ""]
MAIL_PARAMS = {
    # (not over message_size_limit: Postfix 3.7 keeps a refused size for the next MAIL, docs/security.md)
    "SIZE": ["100", "0", "abc", "", "99999999999999999999", "-1", "4096", "0100"],
    "BODY": ["7BIT", "8BITMIME", "BINARYMIME", "8bitmime", "junk", ""],
    "RET": ["FULL", "HDRS", "hdrs", "X", ""],
    "ENVID": ["abc", "a+2Bb", "a+zz", "", "x" * 120, "a+2"],
    "AUTH": ["<>", "s@remote.test", "x+2Bz", ""],
}
RCPT_PARAMS = {
    "NOTIFY": ["NEVER", "SUCCESS", "SUCCESS,FAILURE", "NEVER,SUCCESS", "DELAY", "", "FOO", "success,delay", ",",
               "FAILURE,NEVER"],
    "ORCPT": ["rfc822;alice@local.test", "rfc822;a+2Bb@x.test", "rfc822;a+zz", "x-type;foo", "rfc822", ";x",
              "utf-8;a\\x{41}", "utf-8;a\\x{zz}", "RFC822;x@y.test", ""],
}
UNKNOWN_PARAMS = ["FOO=bar", "FOO", "X-Y=1", "=x", "A=B=C"]
JUNK = ["FOO", "XYZZY a b", "MAILFROM:<s@remote.test>", "asdf", "123", "<s@remote.test>", "Subject: hi", ":", "-",
        "DATAX", "RCPTTO:<alice@local.test>", "EHLOclient.test", "QUITX", "TURN", "SEND FROM:<s@remote.test>",
        "AUTH PLAIN AGFAYg==", "EXPN alice", "XCLIENT NAME=x.test", "XFORWARD NAME=x.test", "ETRN relay.test",
        "ETRN", "ETRN elsewhere.test"]
LINE_LIMIT = 2048  # line_length_limit, the CRLF counted
NEAR_LIMIT = [505, 510, 512, 513, 1000, 2040, 2045, 2046, 2047, 2048]
OVER_LIMIT = [2049, 2050, 2060, 4100]


def odd_verb(rng: random.Random, verb: str) -> str:
    """The verb in odd case now and then."""
    if rng.random() < 0.3:
        return "".join(c.lower() if rng.random() < 0.5 else c for c in verb)
    return verb


def joined(rng: random.Random, verb: str, rest: str) -> str:
    """`verb rest` with the blanks between them odd now and then: two, a tab, none; trailing blanks."""
    verb = odd_verb(rng, verb)
    sep = rng.choice([" "] * 8 + ["  ", "\t", "", " \t"]) if rest else ""
    line = verb + sep + rest
    if rng.random() < 0.1:
        line += rng.choice([" ", "  ", "\t"])
    if rng.random() < 0.03:
        line = " " + line
    return line


def params(rng: random.Random, table: dict[str, list[str]]) -> str:
    out = []
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        kind = rng.random()
        if kind < 0.75:
            name = rng.choice(list(table))
            value = rng.choice(table[name])
            name = odd_verb(rng, name)
            out.append(f"{name}={value}" if rng.random() < 0.9 else name)
        else:
            out.append(rng.choice(UNKNOWN_PARAMS))
        if out and rng.random() < 0.1:
            out.append(out[-1])  # duplicated
    return "".join(rng.choice([" "] * 9 + ["  "]) + p for p in out)


def line(text: str) -> bytes:
    return text.encode() + b"\r\n"


def hello(rng: random.Random) -> bytes:
    return line(joined(rng, rng.choice(["EHLO", "EHLO", "HELO"]), rng.choice(HELO_NAMES)))


def path_and_params(rng: random.Random, paths: list[str], table: dict[str, list[str]]) -> str:
    """A path and parameters; with no path, none with a ',': Postfix would read the first as the path, a list with
    an empty member (`RCPT TO: NOTIFY=,`), which mailflow refuses on purpose (docs/security.md). (One with a `<`,
    `MAIL FROM: AUTH=<>`, is an RFC 822 phrase before `<>` to both: the null sender.)"""
    path = rng.choice(paths)
    return with_params(path, params(rng, table))


def with_params(path: str, more: str) -> str:
    """`path` and the parameters `more`, none if there is no path and they hold a ',' (`path_and_params`)."""
    return path + ("" if not path.strip() and "," in more else more)


def mail(rng: random.Random) -> bytes:
    return line(joined(rng, "MAIL", odd_verb(rng, "FROM:") + path_and_params(rng, SENDERS, MAIL_PARAMS)))


def rcpt(rng: random.Random) -> bytes:
    return line(joined(rng, "RCPT", odd_verb(rng, "TO:") + path_and_params(rng, RECIPIENTS, RCPT_PARAMS)))


def bdat(rng: random.Random) -> bytes:
    size = rng.choice([0, 0, 1, 4, 4, 10, 100, 5000])
    last = rng.choice(["", "", " LAST", " LAST", " last", "  LAST"])
    chunk = (b"ab\r\n" * (size // 4 + 1))[:size]
    if rng.random() < 0.06:  # malformed: both servers hang up (the chunk's size is unknown)
        return line(rng.choice(["BDAT", "BDAT x", "BDAT 4 LAST x", "BDAT -1", "BDAT 4 FIRST"]))
    command = joined(rng, "BDAT", f"{size}{last}")
    return line(command) + (chunk if ascii_upper(command.lstrip()).startswith(("BDAT ", "BDAT\t")) else b"")


def data(rng: random.Random) -> bytes:
    return line(joined(rng, "DATA", rng.choice([""] * 9 + ["x"])))


def other(rng: random.Random) -> bytes:
    verb = rng.choice(["RSET", "NOOP", "HELP"])
    return line(joined(rng, verb, rng.choice(["", "", "", "x", "a b", "MAIL"])))


def junk(rng: random.Random) -> bytes:
    return line(rng.choice(JUNK))


def long_line(rng: random.Random) -> bytes:
    """A line near the limit, or over it as an unknown command: over it, Postfix 3.7 runs the line's first
    line_length_limit bytes and mailflow refuses the line (docs/security.md): the same reply only for a verb both
    refuse. A MAIL or RCPT near it is padded with blanks before its last parameter, not with a long value, and no
    EHLO is: Postfix counts its queue file in message_size_limit (the envelope, and the Received header that names
    the HELO), mailflow the content as Postfix's smtpd counts it (docs/config.md)."""
    if rng.random() < 0.3:
        head, tail, length = "FOO ", "", rng.choice(OVER_LIMIT)
    else:
        head, tail = rng.choice([("NOOP ", ""), ("FOO ", ""), ("RSET ", ""),
                                 ("MAIL FROM:<s@remote.test>", " BODY=8BITMIME"),
                                 ("RCPT TO:<alice@local.test>", " NOTIFY=NEVER")])
        length = rng.choice(NEAR_LIMIT)
    pad = (" " if tail else "x") * (length - len(head) - len(tail) - 2)  # the length counts the CRLF
    return line(head + pad + tail)


# weights: a session is mostly a transaction, out of order now and then
Draw = Callable[[random.Random], bytes]
UNITS: list[tuple[Draw, int]] = [(hello, 2), (mail, 4), (rcpt, 5), (bdat, 2), (data, 2), (other, 2), (junk, 2),
                                 (long_line, 1)]


def unit(rng: random.Random, units: list[tuple[Draw, int]] = UNITS) -> bytes:
    return rng.choices([u for u, _ in units], [w for _, w in units])[0](rng)


def is_data(unit_: bytes) -> bool:
    return unit_.lstrip().upper().startswith(b"DATA")


AUTH_WORD = re.compile(rb"[ \t]+auth=[^ \t\r]*", re.IGNORECASE)


def resets(unit_: bytes) -> bool:
    """Whether `unit_` ends any transaction state for sure: an RSET without argument, a HELO or EHLO with one name
    (Postfix's rset_cmd and helo_cmd call mail_reset and rcpt_reset; a refused one, 501, does not)."""
    words = unit_.split()
    return (len(words) == 1 and words[0].upper() == b"RSET") or \
        (len(words) == 2 and words[0].upper() in (b"HELO", b"EHLO"))


def one_auth_mail(steps: list[Step]) -> list[Step]:
    """`steps` with AUTH= taken out of every MAIL after one that has one, until an RSET, HELO or EHLO (`resets`):
    Postfix 3.7 keeps a refused MAIL's AUTH= value until the transaction ends, so its next AUTH= is
    `503 5.5.4 Error: multiple AUTH= options`; mailflow judges each MAIL by what it declares (docs/security.md)."""
    seen, out = False, []
    for step in steps:
        units = []
        for unit_ in step.units:
            seen = seen and not resets(unit_)
            if unit_.lstrip()[:4].upper() == b"MAIL":
                unit_, found = (AUTH_WORD.sub(b"", unit_), False) if seen else (unit_, bool(AUTH_WORD.search(unit_)))
                seen = seen or found
            units.append(unit_)
        out.append(step._replace(units=tuple(units)))
    return out


BDAT_WORDS = re.compile(rb"\s*bdat[ \t]+(\d+)([ \t]+last)?[ \t]*\r\n", re.IGNORECASE)


def no_content_after_refused_last(steps: list[Step]) -> list[Step]:
    """`steps` without the BDATs and DATAs after a BDAT LAST that may have been refused as a chunk past
    message_size_limit or after a null chunk (`BDAT 0` without LAST): Postfix 3.7.11 and earlier (fixed in 3.7.22):
    its skip_bdat ends such a transaction without resetting its recipient state, so a later BDAT or DATA without
    MAIL and RCPT is judged on what is left (552 for a chunk past the limit again, `501 5.5.4 Syntax: DATA` for a
    DATA with an argument; its smtpd dies of a SIGSEGV at a DATA or a small BDAT without LAST). mailflow answers 503
    5.5.1 Error: need RCPT command (docs/security.md). Kept until an RSET, HELO or EHLO (`resets`), or a new
    MAIL."""
    risky = done = False
    out = []
    for step in steps:
        units = []
        for unit_ in step.units:
            if resets(unit_) or unit_.lstrip()[:4].upper() == b"MAIL":
                risky = done = False
            if done and (is_data(unit_) or unit_.lstrip()[:4].upper() == b"BDAT"):
                continue
            units.append(unit_)
            words = BDAT_WORDS.match(unit_)
            if words:
                risky = risky or int(words[1]) > 4096 or (int(words[1]) == 0 and not words[2])
                done = risky and bool(words[2])
        if units:
            out.append(step._replace(units=tuple(units)))
    return out


def generated(seed: int, postfix_keeps_refused_transactions: bool = True, units: list[tuple[Draw, int]] = UNITS,
              opening: tuple[Draw, Draw] = (mail, rcpt), group_chance: float = 0.2,
              mask: Callable[[list[Step]], list[Step]] = list) -> list[Step]:
    """The session of `seed`; without the BDATs and DATAs after a refused BDAT LAST where the Postfix compared with
    keeps that transaction (3.7.11 and earlier, fixed in 3.7.22: `no_content_after_refused_last`). `units` (each
    with its weight) draws its units, `opening` the MAIL and RCPT a session begins with more often than not, a
    pipelined group now and then (`group_chance`); `mask` is applied before no_content_after_refused_last
    (tests/support/wide_dialogues.py draws its own sessions so)."""
    rng = random.Random(seed)
    steps: list[Step] = []
    if rng.random() < 0.8:
        steps.append(Step((hello(rng),)))
    if rng.random() < 0.6:
        steps += [Step((opening[0](rng),)), Step((opening[1](rng),))]
    length = rng.randint(3, 15)
    while len(steps) < length:
        if rng.random() < group_chance:  # a pipelined group, DATA (if any) last
            group = [u for u in (unit(rng, units) for _ in range(rng.randint(2, 4))) if not is_data(u)]
            if rng.random() < 0.4:
                group.append(data(rng))
            steps.append(Step(tuple(group) or (data(rng),), rng.choice(CONTENTS)))
        else:
            one = unit(rng, units)
            steps.append(Step((one,), rng.choice(CONTENTS) if is_data(one) else b""))
    steps = mask(one_auth_mail(steps[:15]))
    return no_content_after_refused_last(steps) if postfix_keeps_refused_transactions else steps
