"""leaf: smtpd's reject footer template (Postfix 3.7's smtpd_reject_footer: smtp_reply_footer.c, smtpd_expand.c).

    FOOTER_MACROS                  the names a footer may use, as Postfix 3.7's smtpd_expand_lookup knows them
    check_footer(template, macros=FOOTER_MACROS)   the template, or ValueError (a macro not in `macros`, a malformed
                                   one, a control character, one that is not ASCII: a reply is ASCII, RFC 5321 4.2)
    POSTSCREEN_FOOTER_MACROS       the ones postscreen's footer knows (psc_expand_lookup)
    footer_gripe(template)         why a footer from a table cannot be used (a control or non-ASCII character); None
    footer_lines(template, values, missing=None, allowed=None) -> (continues, lines)
                                   the template cut at each `\\n` (backslash, n: main.cf's spelling; a real line
                                   break counts as one too), each piece expanded with `values` (filtered by
                                   `allowed`, expansion_filtered); `continues` when it began with `\\c` (its
                                   first piece goes at the end of the reply's last line, not on a line of its
                                   own); `missing(name)` told of
                                   each macro without a value as the expansion looks it up (postscreen warns)
    address_values(prefix, addr)   $sender, $sender_name, $sender_domain (or recipient's) as Postfix gives them
    footer_values(server_name, sender, recipient, client)
                                   every macro's value now, as Postfix's smtpd_expand_lookup gives them (`client`:
                                   FooterClient, None before there is one): smtpd's and sendmail -bs's one list
    postscreen_footer_values(server_name, client_address, client_port)   postscreen's (psc_expand_lookup)
    expansion_filtered(values, allowed=None)   the macros' values as Postfix's smtpd_expand_filter lets them
                                   through: a character not in `allowed` becomes `_` (None: the default filter, a tab
                                   and printable ASCII)
    unescaped(text)                a character list written as Postfix writes one (expansion_filter: `\t`, `\40`,
                                   `\\`), as its unescape() reads it

status.with_footer puts the lines under a reply. The macros' values are filtered as Postfix's smtpd_expand_filter
does: a character other than a tab or printable ASCII becomes `_`.

Failure behaviour: check_footer raises ValueError; footer_lines does not raise for a checked template (a macro
the session has no value for is ""). Postfix expands an unknown one to "" with a warning: here smtpd's footer
refuses one at load (as postscreen's own), while postscreen's copy of smtpd's footer, which keeps smtpd's macros,
expands those postscreen does not know to "" with Postfix's warning (through `missing`).
"""
from __future__ import annotations

import re
import time
from typing import Callable, NamedTuple

from mailflow.local_macros import check_macros, expand_macros

FOOTER_MACROS = ("server_name", "client", "client_address", "client_port", "client_name", "reverse_client_name",
                 "helo_name", "sender", "sender_name", "sender_domain", "recipient", "recipient_name",
                 "recipient_domain", "localtime")
POSTSCREEN_FOOTER_MACROS = ("server_name", "client_address", "client_port", "localtime")  # psc_expand_lookup's
LINE_BREAK = "\\n"  # the two characters, as main.cf writes it
CONTINUE = "\\c"  # at the start only
_FILTERED = re.compile(r"[^\t\x20-\x7e]")  # what smtpd_expansion_filter (its default) does not let through
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_NOT_ASCII = re.compile(r"[^\x00-\x7f]")


def check_footer(template: str, macros: tuple[str, ...] = FOOTER_MACROS) -> str:
    """The template when it can be used, its macros among `macros`; ValueError naming the trouble."""
    for piece in _pieces(template)[1]:
        if _CONTROL.search(piece):
            raise ValueError("a control character (write \\n, a backslash and n, for a line break)")
        if _NOT_ASCII.search(piece):
            raise ValueError("a character that is not ASCII (SMTP replies are ASCII)")
        check_macros(piece, macros)
    return template


def footer_gripe(template: str) -> str | None:
    """Why a footer looked up from a table cannot go under a reply (a control or non-ASCII character: a reply is
    ASCII, and a line break is `\\n`); None when it can."""
    if _CONTROL.search(template.replace("\r\n", "\n").replace("\n", LINE_BREAK)):
        return "a control character"
    if _NOT_ASCII.search(template):
        return "a character that is not ASCII"
    return None


def footer_lines(template: str, values: dict[str, str], missing: Callable[[str], None] | None = None,
                 allowed: str | None = None) -> tuple[bool, list[str]]:
    """(continues, the footer's lines expanded, the values filtered by `allowed`); see the module doc."""
    filtered = expansion_filtered(values, allowed)
    continues, pieces = _pieces(template)
    return continues, [expand_macros(piece, filtered, missing) for piece in pieces]


def expansion_filtered(values: dict[str, str], allowed: str | None = None) -> dict[str, str]:
    """See the module doc."""
    if allowed is None:
        return {name: _FILTERED.sub("_", value) for name, value in values.items()}
    return {name: "".join(c if c in allowed else "_" for c in value) for name, value in values.items()}


_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_ESCAPE = re.compile(r"\\([0-7]{1,3}|.)", re.S)


def unescaped(text: str) -> str:
    """See the module doc: `\\a` … `\\v`, up to three octal digits (`\\40` a space), any other escaped
    character itself; a backslash at the end is dropped."""
    def one(m: re.Match) -> str:
        code = m[1]
        if code[0] in "01234567":
            return chr(int(code, 8) & 0xFF)
        return _ESCAPES.get(code, code)
    return _ESCAPE.sub(one, text.removesuffix("\\") if _odd_backslashes_at_end(text) else text)


def _odd_backslashes_at_end(text: str) -> bool:
    return (len(text) - len(text.rstrip("\\"))) % 2 == 1


def address_values(prefix: str, addr: str | None) -> dict[str, str]:
    """`prefix` ("sender" or "recipient"), `prefix_name` and `prefix_domain` for `addr` as Postfix's
    smtpd_expand_addr gives them: all "" when there is none (None), `<>` (name too) for the null address."""
    if addr is None:
        return {prefix: "", f"{prefix}_name": "", f"{prefix}_domain": ""}
    if not addr:
        return {prefix: "<>", f"{prefix}_name": "<>", f"{prefix}_domain": ""}
    local, at, domain = addr.rpartition("@")
    return {prefix: addr, f"{prefix}_name": local if at else addr, f"{prefix}_domain": domain if at else ""}


class FooterClient(NamedTuple):
    """The client's macros: $client (`name[address]`), $client_address, $client_port, $client_name and
    $reverse_client_name (the name as smtpd knows it), $helo_name."""
    client: str
    address: str
    port: str
    name: str
    helo: str


def postscreen_footer_values(server_name: str, client_address: str, client_port: str) -> dict[str, str]:
    """postscreen's macros now (Postfix's psc_expand_lookup): any other expands to ""."""
    return {"server_name": server_name, "client_address": client_address, "client_port": client_port,
            "localtime": time.strftime("%b %d %H:%M:%S")}


def footer_values(server_name: str, sender: str | None, recipient: str | None,
                  client: FooterClient | None = None) -> dict[str, str]:
    """The footer's macros now: `sender` None before MAIL ("" the null sender), `recipient` the transaction's
    first accepted one (None: none yet)."""
    values = {"server_name": server_name, "localtime": time.strftime("%b %d %H:%M:%S")}
    if client is not None:
        values.update(client=client.client, client_address=client.address, client_port=client.port,
                      client_name=client.name, reverse_client_name=client.name, helo_name=client.helo)
    values.update(address_values("sender", sender))
    values.update(address_values("recipient", recipient))
    return values


def _pieces(template: str) -> tuple[bool, list[str]]:
    text = template.replace("\r\n", "\n").replace("\n", LINE_BREAK)
    continues = text.startswith(CONTINUE)
    return continues, (text[len(CONTINUE):] if continues else text).split(LINE_BREAK)
