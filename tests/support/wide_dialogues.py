"""Seeded SMTP dialogues wider than tests/support/dialogues.py's, for a differential against a private Postfix with
SMTPUTF8 and VRFY on (tests/interop/test_wide_dialogue_vs_postfix.py).

- `generated(seed)`: one session of 3 to 15 `Step`s (dialogues.py's: units sent at once, then the content after a
  354), the same for the same seed.
- `odd_generated(seed)`: a session of the odd stream, seeds of its own: `generated`'s units and 8-bit bytes inside
  MAIL and RCPT parameters, blanks around `FROM:`'s colon and between parameter words (tabs, none, several), and
  command lines that are empty or blanks only; now and then commands in the write of a DATA's content, after its
  end (`commands_after_content`).
- `split_at_bare_lf(steps)`: the same session as a client exempt from the bare-LF check sends it (Postfix's
  smtpd_forbid_bare_newline_exclusions, $mynetworks by default): a bare LF ends its command line, so each command
  line is cut after every bare LF in it and each piece gets its own reply.
- `reply_key(text)`: a reply as compared: its code, and the class and subject of its enhanced status code
  (`550 5.1`), or the code alone where the reply has none.

Besides what dialogues.py draws (its units are reused: odd verbs and blanks, HELO names, parameters, BDAT, DATA,
junk, long lines), these sessions hold: address forms (quoted local parts, source routes of one hop and more, IPv4
and IPv6 address literals good and bad, UTF-8 local parts and domains, empty, `<>`, a missing bracket, blanks
inside and around, unqualified names, the postmaster in any case) in MAIL, RCPT and VRFY; SMTPUTF8 and every other
MAIL and RCPT parameter; VRFY with and without an address; 8-bit bytes in commands, valid UTF-8 and not; a NUL in a
command; a bare LF or CR inside or at the end of a command line.

What is left out, and why, is dialogues.py's: its masks (`one_auth_mail`, `no_content_after_refused_last`) are
applied here too, no SIZE= past message_size_limit is drawn, and a line over line_length_limit is an unknown verb.
And an RSET follows a VRFY of a UTF-8 address without its SMTPUTF8 word (`rset_after_undeclared_utf8_vrfy`:
Postfix ends the transaction there, mailflow does not; docs/security.md). Every chunk is the size its BDAT names,
and a group's DATA is its last unit, so that no server waits for input.
"""
from __future__ import annotations

import random
import re
from typing import Callable

from tests.support import dialogues
from tests.support.dialogues import Step, joined, line, odd_verb, with_params

LOCAL_PARTS = ["s", "alice", "alice", "nobody", "postmaster", "PostMaster", '"a b"', '"al\\"ice"', '""', '"alice"',
               "a.b", ".a", "a.", "a..b", "a+tag", "-a", "a%relay.test", "a!b", "j\u00fcrgen", "\u00e9", "a" * 64,
               "a" * 65, '"@a.test:b"', '"@x"']
DOMAINS = ["remote.test", "local.test", "local.test", "relay.test", "sub.relay.test", "elsewhere.test", "LOCAL.TEST",
           "local.test.", "[127.0.0.1]", "[192.0.2.1]", "[1.2.3]", "[999.1.1.1]", "[IPv6:::1]", "[IPv6:2001:db8::1]",
           "[ipv6:2001:DB8::1]", "[IPv6:zz::1]", "[IPv6:1.2.3.4]", "[::1]", "[text]", "b\u00fccher.relay.test",
           "r\u00e9mote.test", "a_b.test", "1.2.3.4", "-x.test", "x" * 64 + ".test", ""]
ROUTES = ["@hop.test:", "@a.test,@b.test:", "@[127.0.0.1]:", "@local.test:", "@:"]


def address(rng: random.Random) -> str:
    """An address without brackets: a local part, an `@` and a domain mostly, an unqualified name now and then."""
    local = rng.choice(LOCAL_PARTS)
    if rng.random() < 0.1:
        return local
    return f"{local}@{rng.choice(DOMAINS)}"


def path(rng: random.Random) -> str:
    """A path in one of the forms a client writes, well-formed or not."""
    kind = rng.random()
    addr = address(rng)
    if kind < 0.55:
        return f"<{addr}>"
    if kind < 0.65:
        return f"<{rng.choice(ROUTES)}{addr}>"
    return rng.choice([addr, "<>", "", " ", f"< {addr}>", f"<{addr} >", f"<{addr}", f"{addr}>", f" <{addr}>",
                       "<<>>", f"<{addr}> ", f"<{addr.replace('@', ' @')}>", "< >", '<"">'])


MAIL_PARAMS = {**dialogues.MAIL_PARAMS, "SMTPUTF8": [""], "SIZE": dialogues.MAIL_PARAMS["SIZE"] + ["1", "2048"],
               "ENVID": dialogues.MAIL_PARAMS["ENVID"] + ["caf+C3+A9", "a b"]}
RCPT_PARAMS = {**dialogues.RCPT_PARAMS,
               "ORCPT": dialogues.RCPT_PARAMS["ORCPT"] + ["utf-8;j\u00fcrgen@local.test", "rfc822;j\u00fcrgen@x.test",
                                                          "utf-8;a\\x{FC}b@x.test"]}


def params(rng: random.Random, table: dict[str, list[str]]) -> str:
    """dialogues.py's parameters, `SMTPUTF8` without a value (it has none) more often than not."""
    return dialogues.params(rng, table).replace("SMTPUTF8=", "SMTPUTF8" if rng.random() < 0.8 else "SMTPUTF8=")


def with_path(rng: random.Random, verb: str, keyword: str, table: dict[str, list[str]], plain: str) -> bytes:
    """The command with a path, `plain` (a path taken) two times in five, and parameters."""
    target, more = plain if rng.random() < 0.4 else path(rng), params(rng, table)
    return line(joined(rng, verb, odd_verb(rng, keyword) + with_params(target, more)))


def mail(rng: random.Random) -> bytes:
    return with_path(rng, "MAIL", "FROM:", MAIL_PARAMS, "<s@remote.test>")


def rcpt(rng: random.Random) -> bytes:
    return with_path(rng, "RCPT", "TO:", RCPT_PARAMS, "<alice@local.test>")


def vrfy(rng: random.Random) -> bytes:
    argument = rng.choice([path(rng), address(rng), "", f"{path(rng)} SMTPUTF8", f"{path(rng)} FOO", "alice"])
    return line(joined(rng, "VRFY", argument))


EIGHT_BIT = [b"\xe9", b"\xc3\xa9", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\xe2\x80\x83"]


def raw_bytes(rng: random.Random) -> bytes:
    """A command with a byte a client should not send there: 8-bit (UTF-8 or not), a NUL, a bare LF or CR."""
    base = rng.choice([b"NOOP x", b"RSET", b"HELP", b"MAIL FROM:<s@remote.test>", b"RCPT TO:<alice@local.test>",
                       b"EHLO client.test", b"VRFY alice", b"FOO bar"])
    odd = rng.choice(EIGHT_BIT * 3 + [b"\x00", b"\n", b"\r"])
    where = rng.choice(["end", "middle", "local part"])
    if where == "end":
        return base + odd + b"\r\n"
    if where == "local part" and b"<" in base:
        return base.replace(b"<", b"<" + odd, 1) + b"\r\n"
    cut = rng.randint(1, len(base))
    return base[:cut] + odd + base[cut:] + b"\r\n"


UNITS = [(dialogues.hello, 2), (mail, 4), (rcpt, 5), (vrfy, 2), (dialogues.bdat, 2), (dialogues.data, 2),
         (dialogues.other, 2), (dialogues.junk, 1), (dialogues.long_line, 1), (raw_bytes, 1)]


def undeclared_utf8_vrfy(unit_: bytes) -> bool:
    """Whether `unit_` is a VRFY with a byte that is not ASCII and no last word SMTPUTF8."""
    words = unit_.split()
    return bool(words) and words[0].upper() == b"VRFY" and not unit_.isascii() and words[-1].upper() != b"SMTPUTF8"


def rset_after_undeclared_utf8_vrfy(steps: list[Step]) -> list[Step]:
    """`steps` with an RSET after each step that holds a VRFY of a UTF-8 address without its SMTPUTF8 word: Postfix
    3.7.11's vrfy_cmd (strict_smtputf8) ends the transaction as it answers 553 5.6.7, mailflow's leaves it as it was
    (docs/security.md); after the RSET both sessions are alike again."""
    out = []
    for step in steps:
        out.append(step)
        if any(undeclared_utf8_vrfy(u) for u in step.units):
            out.append(Step((b"RSET\r\n",)))
    return out


def generated(seed: int, postfix_keeps_refused_transactions: bool = True) -> list[Step]:
    """The session of `seed`: dialogues.py's, drawn from UNITS, with its masks and `rset_after_undeclared_utf8_vrfy`."""
    return dialogues.generated(seed, postfix_keeps_refused_transactions, UNITS, (mail, rcpt), group_chance=0.15,
                               mask=rset_after_undeclared_utf8_vrfy)


# The odd stream (`odd_generated`, seeds of its own: the sessions `generated` draws stay as they were): 8-bit bytes
# inside MAIL and RCPT parameters, and blanks where a client puts them oddly (tabs between parameter words, blanks
# around `FROM:`'s colon and after it, none between a path and its first parameter), and command lines that are empty
# or blanks only.
PARAMETER_WORDS = {
    "MAIL": ["ENVID=", "AUTH=", "RET=", "BODY=", "SIZE=", "FOO=", "SMTPUTF8="],
    "RCPT": ["NOTIFY=", "ORCPT=rfc822;", "ORCPT=utf-8;", "ORCPT=", "FOO="],
}
ODD_BYTES = [b"\xe9", b"\xc3\xa9", b"\xff", b"\xc3", b"\xe2\x80\x83", b"\xc2\xa0"]


def eight_bit_parameter(rng: random.Random) -> bytes:
    """A MAIL or RCPT whose parameter holds an 8-bit byte (UTF-8 or not) in its value, its name or as a word of its
    own, SMTPUTF8 declared now and then."""
    verb = rng.choice(["MAIL", "RCPT"])
    head = b"MAIL FROM:<s@remote.test>" if verb == "MAIL" else b"RCPT TO:<alice@local.test>"
    name = rng.choice(PARAMETER_WORDS[verb]).encode()
    odd = rng.choice(ODD_BYTES)
    word = rng.choice([name + odd, name + b"a" + odd + b"@x.test", name[:1] + odd + name[1:] + b"x", odd,
                       name + b"x+C3+A9" + odd])
    utf8 = b" SMTPUTF8" if verb == "MAIL" and rng.random() < 0.3 else b""
    return head + rng.choice([b"", utf8]) + b" " + word + rng.choice([b"", utf8]) + b"\r\n"


def odd_blanks(rng: random.Random) -> bytes:
    """A MAIL or RCPT with blanks where a client should not put them, or none where it should."""
    verb, keyword, target, table = rng.choice([("MAIL", "FROM", "<s@remote.test>", MAIL_PARAMS),
                                               ("RCPT", "TO", "<alice@local.test>", RCPT_PARAMS)])
    colon = rng.choice([":", " :", ": ", ":\t", " : ", "\t:", ":  ", ": \t"])
    words = params(rng, table).split() or [rng.choice(["FOO=bar", "NOTIFY=NEVER" if verb == "RCPT" else "BODY=7BIT"])]
    first = rng.choice([" ", "\t", "", " \t", "\t\t"])
    between = [rng.choice([" ", "\t", "  ", " \t "]) for _ in words[1:]]
    rest = first + words[0] + "".join(b + w for b, w in zip(between, words[1:]))
    return line(joined(rng, verb, odd_verb(rng, keyword) + colon + target + rest + rng.choice(["", "", " ", "\t"])))


def blank_line(rng: random.Random) -> bytes:
    """A command line with no command: empty, or blanks only."""
    return rng.choice([b"", b" ", b"\t", b"  \t ", b"\x0b", b"\x0c"]) + b"\r\n"


ODD_UNITS = [*UNITS, (eight_bit_parameter, 3), (odd_blanks, 3), (blank_line, 1)]
AFTER_CONTENT = [b"RSET\r\n", b"NOOP\r\n", b"MAIL FROM:<s@remote.test>\r\n", b"RCPT TO:<alice@local.test>\r\n",
                 b"HELP\r\n", b"FOO\r\n", b"\r\n", b"EHLO client.test\r\n"]


def commands_after_content(seed: int) -> Callable[[list[Step]], list[Step]]:
    """A mask that puts, now and then, commands in the same write as a DATA's content, after its final dot (a client
    that pipelines past the end of data). A random stream of its own, so that the units drawn stay the same. The
    replay reads their replies right after the content's (dialogues.commands_after_data)."""
    rng = random.Random(f"after content {seed}")

    def mask(steps: list[Step]) -> list[Step]:
        return [step._replace(content=step.content + b"".join(rng.sample(AFTER_CONTENT, rng.randint(1, 3))))
                if step.content and rng.random() < 0.4 else step for step in steps]
    return mask


def odd_generated(seed: int, postfix_keeps_refused_transactions: bool = True) -> list[Step]:
    """The odd stream's session of `seed`: `generated`'s units and eight_bit_parameter, odd_blanks and blank_line,
    the same masks, and `commands_after_content`."""
    after_content = commands_after_content(seed)
    return dialogues.generated(seed, postfix_keeps_refused_transactions, ODD_UNITS, (mail, rcpt), group_chance=0.15,
                               mask=lambda steps: after_content(rset_after_undeclared_utf8_vrfy(steps)))


def split_at_bare_lf(steps: list[Step]) -> list[Step]:
    """See the module doc. Only a unit's command line is cut (a BDAT's chunk after it is data); content is not."""
    return [step._replace(units=tuple(piece for u in step.units for piece in _lines(u))) for step in steps]


def _lines(unit_: bytes) -> list[bytes]:
    command, crlf, chunk = unit_.partition(b"\r\n")
    *ended, last = command.split(b"\n")
    return [*(piece + b"\n" for piece in ended), last + crlf + chunk]


ENHANCED = re.compile(r"(\d{3})[ -]([245])\.(\d{1,3})\.\d{1,3}(?: |$)")


def reply_key(text: str | None) -> str:
    """See the module doc: the last line of a reply as `code class.subject`, or `code`; None (no reply, the
    connection closed) as `closed`."""
    if not text:
        return "closed"
    last = text.splitlines()[-1]
    if not last[:3].isdigit():
        return text
    found = ENHANCED.match(last)
    return f"{found[1]} {found[2]}.{found[3]}" if found else last[:3]
