"""leaf: the reply to a client a DNS list names (Postfix 3.7's rbl_reject_reply, rbl_expand_lookup and the TXT
reason of rbl_pagein: smtpd_check.c), standard library and sibling leaves only.

    DEFAULT_RBL_REPLY            Postfix's default_rbl_reply
    RBL_MACROS                   the names a template may use: $rbl_code, $rbl_domain, $rbl_reason (and its old name
                                 $rbl_txt), $rbl_what, $rbl_class, then smtpd's own (reply_footer.FOOTER_MACROS)
    check_rbl_template(template) the template, or ValueError (an unknown or malformed macro, a character that is
                                 not ASCII: a reply is ASCII, RFC 5321 4.2, or a control character but a tab: a
                                 line break in a map's value would end the reply early; as
                                 reply_footer.check_footer refuses them): the configuration's check of
                                 default_rbl_reply, and of a map's template before use (Postfix sends such bytes
                                 as they are)
    txt_reason(records)          the list's TXT records as Postfix makes the reason: each record's text, non-printable
                                 bytes as spaces, joined with " / ", at most TXT_LIMIT characters
    rbl_expanded(template, values) -> the checked template expanded (values filtered as smtpd_expansion_filter does:
                                 a character other than a tab or printable ASCII becomes `_`)
    rbl_reply_split(expanded) -> (code, dsn, text) | None
                                 the expansion split as Postfix splits it: `ddd [x.y.z] text` (the enhanced code
                                 4.7.1 when it gives none; the text `Service unavailable` when it is empty); None
                                 when it does not start with a 4xx or 5xx code and a space (Postfix then logs `rbl
                                 response code configuration error` and answers 450 4.7.1 Service unavailable)
    rbl_reply_parts(template, values) -> rbl_reply_split(rbl_expanded(template, values))

Failure behaviour: check_rbl_template raises ValueError for a template that cannot be expanded (an unknown name
too: Postfix's mac_expand reports an undefined macro; Postfix: `bad rbl reply template`, the default used instead);
the others take a checked template (a malformed one: ValueError). Nothing else raises.
"""
from __future__ import annotations

import re

from mailflow.local_macros import check_macros, expand_macros
from mailflow.reply_footer import FOOTER_MACROS, expansion_filtered
from mailflow.syntax import split_leading_dsn

DEFAULT_RBL_REPLY = ("$rbl_code Service unavailable; $rbl_class [$rbl_what] blocked using $rbl_domain"
                     "${rbl_reason?; $rbl_reason}")
RBL_MACROS = ("rbl_code", "rbl_domain", "rbl_reason", "rbl_txt", "rbl_what", "rbl_class", *FOOTER_MACROS)
TXT_LIMIT = 500  # Postfix's RBL_TXT_LIMIT: the reason's length at most
TXT_SEPARATOR = " / "
DEFAULT_DSN = "4.7.1"
_REPLY = re.compile(r"([45][0-9][0-9]) (.*)", re.DOTALL)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # (as reply_footer.check_footer refuses them)


def check_rbl_template(template: str) -> str:
    """`template` when it is ASCII without control characters (a tab aside) and every macro in it is one of
    RBL_MACROS and well formed; ValueError otherwise."""
    if _CONTROL.search(template):
        raise ValueError("a control character (a reply is one line of text)")
    if not template.isascii():
        raise ValueError("a character that is not ASCII (SMTP replies are ASCII)")
    return check_macros(template, RBL_MACROS)


def txt_reason(records: list[str]) -> str:
    """Postfix 3.7's reason from a DNS list's TXT records, in the order the DNS gave them: each record's text with
    a byte that is not printable ASCII as a space (dns_lookup; a UTF-8 character is as many spaces as it has bytes),
    joined with " / " while more than 3 characters are left, cut at TXT_LIMIT."""
    reason = ""
    for i, record in enumerate(records):
        space = TXT_LIMIT - len(reason)
        if space <= 0:
            break
        reason += _printable(record)[:space]
        if i + 1 < len(records) and TXT_LIMIT - len(reason) > len(TXT_SEPARATOR):
            reason += TXT_SEPARATOR
    return reason


def rbl_reply_parts(template: str, values: dict[str, str]) -> tuple[int, str, str] | None:
    """(code, enhanced code, text) of the expanded template; see the module doc."""
    return rbl_reply_split(rbl_expanded(template, values))


def rbl_reply_split(expanded: str) -> tuple[int, str, str] | None:
    """(code, enhanced code, text) of an expanded template; see the module doc."""
    reply = _REPLY.fullmatch(expanded)
    if reply is None:
        return None
    dsn, text = split_leading_dsn(reply[2].lstrip())  # (dsn_split skips blanks before the code too)
    return int(reply[1]), dsn or DEFAULT_DSN, text or "Service unavailable"


def rbl_expanded(template: str, values: dict[str, str]) -> str:
    """The checked template expanded with `values` filtered."""
    return expand_macros(template, expansion_filtered(values))


def _printable(record: str) -> str:
    """`record` as Postfix's dns_lookup keeps a TXT string: a byte that is not printable ASCII becomes a space."""
    return "".join(ch if " " <= ch <= "~" else " " * len(ch.encode("utf-8", "replace")) for ch in record)
