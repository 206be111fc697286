"""MAIL's and RCPT's parameter words (RFC 5321 4.1.1.2, 4.1.1.3), taken as Postfix's smtpd takes them: one
implementation for smtpd (stages/smtpd/transaction.py) and `sendmail -bs` (sendmail/stdio_smtp.py), which
imports it without loading smtpd (a -bs run is one process per message: it must start fast).

    path_text(arg, command) -> text | status.Reply      what follows MAIL's `FROM:` or RCPT's `TO:`: the path and
                                                       its parameter words, not yet parsed (address.parse_path)
    path_word(text) -> str                             its first word as Postfix's smtpd_token reads one: the
                                                       address its `Illegal address syntax` warning quotes
    checked_path(text, command, bad, strict) -> (address, as written, rest) | PathRefusal
                                                       the path read (address.parse_written_path; an RFC 822
                                                       form undressed first, address.undressed_path), or `bad`
                                                       and whether Postfix's smtpd warns of it
    mail_parameters(words, size_limit, discarded) -> (options, RET, ENVID, AUTH) | status.Reply
    rcpt_parameters(words, discarded) -> (NOTIFY, ORCPT) | status.Reply

MAIL takes SIZE, BODY=7BIT|8BITMIME, SMTPUTF8, AUTH= (RFC 4954: accepted, not trusted) and the RFC 3461 RET and
ENVID; RCPT takes NOTIFY and ORCPT. Each DSN value is checked by mailflow.dsn_parameters.

Failure behaviour: nothing raises for a client's input. Without its keyword (`FROM:`, `TO:`, in any case) or
with nothing but spaces and tabs after it the argument is refused with Postfix's usage reply, `501 5.5.4 Syntax:
MAIL FROM:<address>` (RCPT's alike). Of the parameter words the first bad one answers, in the order given, as in
Postfix's mail_cmd and rcpt_cmd: an unknown parameter `555 5.5.4 Unsupported option`; a malformed or repeated
DSN parameter 501 5.5.4 in Postfix's words (`status.BAD_RET`, `BAD_ENVID`, `BAD_NOTIFY`, `BAD_ORCPT`); a bad
SIZE 501 5.5.4, one past OFF_T_MAX 552 5.3.4, one over the size limit 552 5.3.4 once all are taken; a second
AUTH= after one that named a sender 503 5.5.4. Where smtpd discards the DSN keyword (discard_ehlo_keywords) every
DSN parameter is refused `501 5.7.1 DSN support is disabled`; where it discards SMTPUTF8 that one is unsupported.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from mailflow import address, dsn_parameters as dsn, status
from mailflow.logs import printable
from mailflow.syntax import (COMMAND_BLANKS, ascii_upper, next_command_word, parse_octet_count,
                             unterminated_command_word)


PATH_KEYWORDS = {"MAIL": "FROM:", "RCPT": "TO:"}  # what each command's argument begins with (RFC 5321 4.1.1)
DSN_CHECKS: dict[str, tuple[Callable[[str], str], status.Reply]] = {
    "RET": (dsn.ret, status.BAD_RET), "ENVID": (dsn.envid, status.BAD_ENVID),
    "NOTIFY": (dsn.notify, status.BAD_NOTIFY), "ORCPT": (dsn.orcpt, status.BAD_ORCPT)}


def path_text(arg: str | None, command: str) -> str | status.Reply:
    """What follows the keyword of MAIL's or RCPT's argument (`command`: "MAIL" or "RCPT"), as given: the path and
    its parameter words; the usage reply when the keyword is missing or no path follows it (`<>` is one)."""
    keyword = PATH_KEYWORDS[command]
    text = (arg or "")[len(keyword):]
    if not arg or ascii_upper(arg[:len(keyword)]) != keyword or not text.strip(COMMAND_BLANKS):
        return status.syntax(f"{command} {keyword}<address>")
    return text


def path_word(text: str) -> str:
    """The first word of `text` (path_text's) as Postfix's smtpd_token takes one (syntax.command_words): the
    address its `Illegal address syntax` warning quotes. `<a b> NOTIFY=NEVER` gives `<a b>`."""
    return next_command_word(text)[0]


class PathRefusal(NamedTuple):
    """MAIL's or RCPT's path refused: the reply, and the word Postfix's smtpd quotes in its `Illegal address
    syntax` warning (None: no warning)."""
    reply: status.Reply
    logged: str | None = None


def checked_path(text: str, command: str, bad: status.Reply, strict: bool) -> tuple[str, str, str] | PathRefusal:
    """(address, the address as written, what follows it) of `text` (path_text's), or `bad` (501 5.1.7 / 5.1.3):
    for a first word that leaves a quote or angle bracket open, unlogged (Postfix's tokenizer refuses the command
    before its extract_addr); for a malformed path, RCPT's null one, or one without angle brackets when `strict`
    (strict_rfc821_envelopes), logged with `path_word`. Unless `strict`, a first word in an RFC 822 form Postfix's
    extract_addr takes (`<a@b>(c)`, `"Joe"<a@b>`: address.undressed_path) is read as its one address, which is the
    one judged and delivered to; its written form is that address, not the comment or phrase. Spaces and tabs at
    either end inside the brackets (`< >`, `<a@b >`) are dropped, strict or not. The one reading of smtpd and
    `sendmail -bs`."""
    if unterminated_command_word(text):
        return PathRefusal(bad)
    path = _read_path(text, strict)
    if path is None:
        return PathRefusal(bad, path_word(text))
    addr, written, rest = path
    if (command == "RCPT" and not addr) or (strict and not text.lstrip(COMMAND_BLANKS).startswith("<")):
        return PathRefusal(bad, path_word(text))
    return addr, written, rest


def _read_path(text: str, strict: bool) -> tuple[str, str, str] | None:
    """parse_written_path's reading of `text` (which drops the blanks at either end inside the brackets, as
    Postfix's tokenizer does, strict or not); unless `strict`, of its first word undressed as Postfix's
    extract_addr takes an RFC 822 form (address.undressed_path) where that word has a comment (address.is_dressed:
    `<a@b>(c)`, `<a@b (c)>`; the address is never judged with one in it) or is refused as it is (a phrase before
    the brackets). `strict` (strict_rfc821_envelopes): a comment or phrase is refused, as Postfix refuses them
    then, and so is a source route not right after the first `<` (`< @r:a@b>`, `<<@r:a@b>>`). None when there
    is no address. The first word is read once at most, and not at all on the usual path (no parenthesis in
    `text`)."""
    dressed = ("(" in text or ")" in text) and address.is_dressed(text)  # (the usual path: no parenthesis, no call)
    word = next_command_word(text) if dressed else None
    if word is not None and address.is_dressed(word[0]):
        if strict:
            return None
    else:
        try:
            path = address.parse_written_path(text)
        except address.PathError:
            if strict:
                return None
        else:
            return None if strict and _route_not_first(text, path[1]) else path
        word = word or next_command_word(text)  # (a phrase before the brackets, say)
    plain = address.undressed_path(word[0])
    if plain is None:
        return None
    try:
        return address.parse_written_path(plain + text[word[1]:])
    except address.PathError:
        return None


def _route_not_first(text: str, written: str) -> bool:
    """A source route (the written path starts with `@`) anywhere but right after the first `<`: `< @r:a@b>`,
    `<<@r:a@b>>`, `< <@r:a@b>>`, which strict Postfix refuses (its smtpd cuts a route only where `@` follows the
    first `<`, and its RFC 822 parser reads what is left as a group, no address). Decided from parse_written_path's
    own reading (`written` keeps the route), not a second one."""
    return written.startswith("@") and text.lstrip(COMMAND_BLANKS)[1:2] != "@"


def _take_dsn(found: dict[str, str], key: str, value: str, discarded: frozenset[str]) -> status.Reply | None:
    """One RFC 3461 parameter's checked value into `found`; Postfix's refusal when it is malformed or repeated,
    or when DSN is a discarded EHLO keyword (`501 5.7.1 DSN support is disabled`)."""
    if "dsn" in discarded:
        return status.DSN_DISABLED
    check, refusal = DSN_CHECKS[key]
    if key in found:
        return refusal
    try:
        found[key] = check(value)
    except dsn.DsnError:
        return refusal
    return None


def mail_parameters(words: list[str], size_limit: int | None,
                    discarded: frozenset[str] = frozenset()) -> tuple[list[str], str, str, str | None] | status.Reply:
    """(options for the handler, RET, ENVID, AUTH) of MAIL's parameter words, or the refusal. The words are taken
    in the order given and the first bad one answers, as in Postfix's mail_cmd; the declared SIZE (the last one
    given) is compared with the limit after them all, as Postfix's smtpd_check_size. Options are upper case:
    `BODY=8BITMIME`, `SIZE=n`, `SMTPUTF8`. AUTH is the AUTH= value as given (printable; None for `<>` or none,
    "" for an empty one), which Postfix keeps as the message's sasl_sender. `discarded`: the EHLO keywords
    discarded (smtpd's discard_ehlo_keywords): without DSN its parameters are refused, without SMTPUTF8 that one is
    unknown."""
    options: dict[str, str] = {}  # by keyword: the option as the handler gets it
    found: dict[str, str] = {}  # RET and ENVID
    auth: str | None = None  # (an AUTH= other than <>, its value may be empty: Postfix's sasl_sender is set)
    declared = 0  # the last SIZE= given
    for word in words:
        key, eq, value = word.partition("=")
        key = ascii_upper(key)
        if key == "SMTPUTF8" and not eq and "smtputf8" not in discarded:
            options[key] = key
        elif key == "BODY" and ascii_upper(value) in ("7BIT", "8BITMIME"):
            options[key] = f"BODY={ascii_upper(value)}"
        elif key == "SIZE" and eq:
            size = _declared_size(value)
            if isinstance(size, status.Reply):
                return size
            declared, options[key] = size, f"SIZE={size}"
        elif key == "AUTH" and eq:  # RFC 4954 section 5: accepted from anyone, trusted from no one
            if auth is not None:  # Postfix refuses a second AUTH= once one named a sender (one after AUTH=<> is taken)
                return status.MULTIPLE_AUTH
            auth = None if value == "<>" else printable(value)
        elif key in ("RET", "ENVID") and eq:
            refusal = _take_dsn(found, key, value, discarded)
            if refusal is not None:
                return refusal
        else:
            return status.unsupported_option(word)
    if size_limit and declared > size_limit:
        return status.SIZE_EXCEEDS_LIMIT
    return list(options.values()), found.get("RET", ""), found.get("ENVID", ""), auth


def _declared_size(value: str) -> int | status.Reply:
    try:
        size = parse_octet_count(value)
    except ValueError:
        return status.BAD_SIZE_SYNTAX
    return status.SIZE_OVERFLOW if size is None else size


def rcpt_parameters(words: list[str], discarded: frozenset[str] = frozenset()) -> tuple[str, str] | status.Reply:
    """(NOTIFY, ORCPT) of RCPT's parameter words, or the refusal of the first bad one (Postfix's rcpt_cmd);
    `discarded` as for mail_parameters."""
    found: dict[str, str] = {}
    for word in words:
        key, eq, value = word.partition("=")
        key = ascii_upper(key)
        if key not in ("NOTIFY", "ORCPT") or not eq:
            return status.unsupported_option(word)
        refusal = _take_dsn(found, key, value, discarded)
        if refusal is not None:
            return refusal
    return found.get("NOTIFY", ""), found.get("ORCPT", "")
