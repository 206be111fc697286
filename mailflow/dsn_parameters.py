"""RFC 3461 DSN parameters on MAIL (RET, ENVID) and RCPT (NOTIFY, ORCPT): each value checked as Postfix's smtpd
checks it (mail_cmd, rcpt_cmd). A leaf: smtpd and `sendmail -bs` read the words with mailflow.smtp_parameters
(the first bad word answers, and a parameter given twice is refused as malformed), which checks the values
here: `ret`, `envid`, `notify`, `orcpt`; the maildrop checks what a file holds with `is_notify_value` and
`is_orcpt_value` (the values these functions return, nothing else). Local delivery passes a recipient's NOTIFY on
to what an alias expands it to with `without_success`.

`xtext_encode` writes xtext as Postfix's xtext_quote (for policy requests). `made_up_orcpt(address, smtputf8)`:
the ORCPT Postfix makes up for a recipient that came without one (cleanup for sendmail's and a list's copies, the
SMTP client for a queued row without one).

What Postfix takes, and so what is taken here: xtext with `+hh` in either case and any other character as itself
(`xtext_decode`, Postfix's xtext_unquote; the decoded value ends at a NUL, as Postfix's C string does); RFC 6533's
`\\x{HEX}` for an ORCPT of type utf-8 (`uxtext_decode`); NOTIFY words in any case, repeated, or with empty items
between commas; an ENVID of any length, printable US-ASCII once decoded (RFC 3461 4.4, Postfix's allprint(): it
goes into notices' headers); an ORCPT of any non-empty type (kept only when the type is an RFC 3461 atom: the
value reaches next hops and notices).

Failure behaviour: a malformed value raises `DsnError`; smtp_parameters answers it with Postfix's reply for that
parameter (`status.BAD_RET`, `BAD_ENVID`, `BAD_NOTIFY`, `BAD_ORCPT`). Nothing here does I/O.
"""
from __future__ import annotations

import re

from mailflow.syntax import ascii_upper, is_printable_ascii

NOTIFY_WORDS = ("SUCCESS", "FAILURE", "DELAY")
_HEX = "0123456789abcdefABCDEF"
_UNICODE_ESCAPE = re.compile(r"\\x\{([^}]*)(\}?)")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")


class DsnError(ValueError):
    """A DSN parameter value the client got wrong."""


def _c_string(raw: bytes) -> str:
    """What Postfix keeps of decoded bytes: up to the first NUL, as text (bytes that are not UTF-8 replaced)."""
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def xtext_decode(text: str) -> str:
    """RFC 3461 xtext as Postfix's xtext_unquote reads it: `+` and two hex digits (either case) is that byte,
    any other character stands for itself; DsnError for a `+` without two hex digits."""
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "+":
            pair = text[i + 1:i + 3]
            if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                raise DsnError("malformed xtext")
            out.append(int(pair, 16))
            i += 3
        else:
            out += text[i].encode("utf-8", errors="surrogateescape")
            i += 1
    return _c_string(bytes(out))


def xtext_encode(text: str) -> str:
    """xtext as Postfix's xtext_quote(buf, text, "") writes it (global/xtext.c): `+` and every byte outside
    `!`..`~` (of the UTF-8 form) as `+XX`, `=` kept, where RFC 3461 would quote it too (the policy requests'
    ccert_subject and ccert_issuer, its one use: not for DSN parameters)."""
    return "".join(chr(b) if 33 <= b <= 126 and b != 0x2B else f"+{b:02X}" for b in text.encode())


def uxtext_decode(text: str) -> str:
    """RFC 6533 utf-8-addr-xtext as Postfix's uxtext_unquote reads it: `\\x{HEX}` is that code point (at most
    U+10FFFF), any other character stands for itself; DsnError for an escape without its hex digits and `}`."""
    out = bytearray()
    pos = 0
    for escape in _UNICODE_ESCAPE.finditer(text):
        digits, closed = escape.groups()
        if not closed or any(d not in _HEX for d in digits) or (digits and int(digits, 16) > 0x10FFFF):
            raise DsnError("malformed utf-8-addr-xtext")
        out += text[pos:escape.start()].encode("utf-8", errors="surrogateescape")
        out += chr(int(digits or "0", 16)).encode("utf-8", errors="surrogatepass")
        pos = escape.end()
    out += text[pos:].encode("utf-8", errors="surrogateescape")
    return _c_string(bytes(out))


def ret(value: str) -> str:
    """RET=FULL or RET=HDRS (any case): the upper-case word."""
    value = ascii_upper(value)
    if value not in ("FULL", "HDRS"):
        raise DsnError("RET must be FULL or HDRS")
    return value


def envid(value: str) -> str:
    """ENVID=xtext: the decoded id, which must be non-empty printable US-ASCII."""
    decoded = xtext_decode(value)
    if not decoded or not is_printable_ascii(decoded):
        raise DsnError("ENVID must be printable ASCII")
    return decoded


def notify(value: str) -> str:
    """NOTIFY=NEVER or a comma list of SUCCESS, FAILURE, DELAY (any case; a word given twice counts once, an
    empty item is skipped, as Postfix's name_mask takes them): an upper-case comma list."""
    words = list(dict.fromkeys(ascii_upper(word) for word in value.split(",") if word))
    if words == ["NEVER"]:
        return "NEVER"
    if not words or any(word not in NOTIFY_WORDS for word in words):
        raise DsnError("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
    return ",".join(words)


def orcpt(value: str) -> str:
    """ORCPT=type;address: `type;address` with the type as the client wrote it (`RFC822;` stays so: Postfix's smtpd
    and a milter's added recipient keep it, and it reaches next hops and notices so) and the address decoded
    (uxtext for type utf-8 in any case, else xtext); "" for one that names no address, or whose type is no RFC 3461
    atom (taken, as Postfix takes any type, but not passed on)."""
    addr_type, semi, encoded = value.partition(";")
    if not semi or not addr_type:
        raise DsnError("ORCPT must be addr-type;xtext")
    addr = uxtext_decode(encoded) if ascii_upper(addr_type) == "UTF-8" else xtext_decode(encoded)
    return f"{addr_type};{addr}" if addr and _ADDR_TYPE.match(addr_type) else ""


def without_success(value: str) -> str:
    """A recipient's NOTIFY (as `notify` returns it, "" none given) for the addresses an alias or a .forward
    expands it to: SUCCESS removed, NEVER when nothing is left, as Postfix's local(8) passes it on (the
    expansion itself is what reports success)."""
    words = [word for word in value.split(",") if word and word != "SUCCESS"]
    return ",".join(words) or ("NEVER" if value else "")


def is_notify_value(value: str) -> bool:
    """`value` is "" (none given), NEVER or an upper-case comma list of SUCCESS, FAILURE, DELAY (what `notify`
    returns; a word may be repeated, as sendmail's -N once wrote it)."""
    words = value.split(",") if value else []
    return words == ["NEVER"] or all(w in NOTIFY_WORDS for w in words)


def is_orcpt_value(value: str) -> bool:
    """`value` is what `orcpt` returns: "" or `type;address`, the type an RFC 3461 atom (in any case) and the
    address non-empty, without a NUL."""
    if not value:
        return True
    addr_type, semi, addr = value.partition(";")
    return bool(semi and addr and "\0" not in addr and _ADDR_TYPE.match(addr_type))


def made_up_orcpt(address: str, smtputf8: bool) -> str:
    """`rfc822;ADDRESS`, or `utf-8;ADDRESS` for a non-ASCII address of a message that asked for SMTPUTF8 (Postfix's
    cleanup_addr.c and smtp_proto.c alike); "" without an address."""
    if not address:
        return ""
    return f"{'utf-8' if smtputf8 and not address.isascii() else 'rfc822'};{address}"
