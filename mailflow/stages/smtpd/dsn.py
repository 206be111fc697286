"""RFC 3461 DSN parameters on MAIL (RET, ENVID) and RCPT (NOTIFY, ORCPT): parse, check, carry to cleanup.

The session takes these parameters from the MAIL/RCPT line (`split_params`; ENVID and ORCPT keep their
case), checks them here (`mail_params`, `rcpt_params`), and keeps them on its transaction (state.Transaction:
`dsn_ret`, `dsn_envid`, and one `(notify, orcpt)` per accepted recipient in `rcpt_dsn`), which carries them to
cleanup in the model Envelope.

Failure behaviour: a malformed or repeated parameter raises `DsnError` naming it; the session answers it with
`501 5.5.4` (`status.bad_dsn_parameter`). Nothing here does I/O.
"""
from __future__ import annotations

import re

from mailflow.syntax import ENVID_MAX, is_printable_ascii

MAIL_KEYS = ("RET", "ENVID")
RCPT_KEYS = ("NOTIFY", "ORCPT")
NOTIFY_WORDS = {"SUCCESS", "FAILURE", "DELAY"}
_XCHAR = re.compile(rb"[\x21-\x2a\x2c-\x3c\x3e-\x7e]")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")


class DsnError(ValueError):
    """A DSN parameter the client got wrong; the text is safe to show it."""


def split_params(tokens: list[str], keys: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """Take the `keys` parameters out of `tokens` (`KEY=value` words): (their values by upper-case key, the
    other tokens in order). A key given twice, or without a value, raises DsnError."""
    found: dict[str, str] = {}
    rest: list[str] = []
    for token in tokens:
        key, eq, value = token.partition("=")
        if key.upper() not in keys:
            rest.append(token)
            continue
        if key.upper() in found:
            raise DsnError(f"duplicate {key.upper()} parameter")
        if not eq or not value:
            raise DsnError(f"{key.upper()} needs a value")
        found[key.upper()] = value
    return found, rest


def xtext_decode(text: str) -> str:
    """RFC 3461 xtext: printable ASCII except '+' and '=', with `+HH` for any other byte."""
    raw = text.encode("ascii", errors="strict") if text.isascii() else None
    if raw is None:
        raise DsnError("xtext must be ASCII")
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i:i + 1] == b"+":
            hexpart = raw[i + 1:i + 3]
            if len(hexpart) != 2 or not re.fullmatch(rb"[0-9A-F]{2}", hexpart):
                raise DsnError("malformed xtext")
            out.append(int(hexpart, 16))
            i += 3
        elif _XCHAR.fullmatch(raw[i:i + 1]):
            out += raw[i:i + 1]
            i += 1
        else:
            raise DsnError("malformed xtext")
    return out.decode("utf-8", errors="replace")


def mail_params(found: dict[str, str]) -> tuple[str, str]:
    """(ret, envid) from MAIL's RET and ENVID values; '' for a parameter not given. An ENVID must decode to
    printable US-ASCII (RFC 3461 4.4; Postfix refuses the others too): it is written into notices' headers."""
    ret = found.get("RET", "").upper()
    if ret and ret not in ("FULL", "HDRS"):
        raise DsnError("RET must be FULL or HDRS")
    envid = ""
    if "ENVID" in found:
        if len(found["ENVID"]) > ENVID_MAX:
            raise DsnError("ENVID too long")
        envid = xtext_decode(found["ENVID"])
        if not is_printable_ascii(envid):  # RFC 3461 4.4, Postfix's allprint(): no CR LF for a notice
            raise DsnError("ENVID must be printable ASCII")
    return ret, envid


def rcpt_params(found: dict[str, str]) -> tuple[str, str]:
    """(notify, orcpt) from RCPT's NOTIFY and ORCPT values: notify as an upper-case comma list (a word given
    twice counts once, as Postfix takes it), orcpt as `type;address` with the xtext decoded; '' for a parameter
    not given, and for an ORCPT with an empty address (which Postfix takes too: there is nothing to report)."""
    notify = ""
    if "NOTIFY" in found:
        words = list(dict.fromkeys(w.upper() for w in found["NOTIFY"].split(",")))
        if words == ["NEVER"]:
            notify = "NEVER"
        elif all(w in NOTIFY_WORDS for w in words):
            notify = ",".join(words)
        else:
            raise DsnError("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
    orcpt = ""
    if "ORCPT" in found:
        addr_type, semi, xtext = found["ORCPT"].partition(";")
        if not semi or not _ADDR_TYPE.match(addr_type):
            raise DsnError("ORCPT must be addr-type;xtext")
        orcpt = f"{addr_type.lower()};{xtext_decode(xtext)}" if xtext else ""
    return notify, orcpt

