"""The addresses in a message's address header fields, rewritten in place (Postfix cleanup's header address
rewriting: `user` becomes `user@myorigin`, canonical maps and masquerading apply to header addresses too).

    SENDER_FIELDS, RECIPIENT_FIELDS         the fields of each class, as Postfix's header_opts classes them
    address_spans(value) -> [(start, end)]  where each mailbox's address is in a field's value (bytes after the
                                            colon, folding included): inside `<...>` (its source route too, which
                                            the rewrite drops as Postfix's does) when the mailbox has one, else
                                            its words; group names, display names, comments and `<>` are no
                                            addresses
    mailbox_spans(value) -> [(start, end) | None]
                                            the same, one item per mailbox, where a mailbox without angle
                                            brackets whose words stand side by side is one mailbox per word, as
                                            Postfix's tok822_parse adds the commas they lack (`a@x b@y` is two,
                                            `Joe a@x` too): None for a mailbox that is still not one address
                                            (sendmail's recipients, on its command line and under -t)
    value_addresses(value: str) -> (str | None, ...)
                                            the addresses of a table value (canonical, virtual alias and generic
                                            maps) as Postfix's mail_addr_crunch parses it: mailbox_spans' addresses
                                            as text, None for a mailbox that is no address (cached: pure; the
                                            cache holds at most VALUE_CACHE_ENTRIES values and about
                                            VALUE_CACHE_BYTES of text, so lists of thousands of members cannot
                                            make it hold tens of MB)
    closed_address(address) -> address      a quoted string or literal never closed, closed at the end as Postfix's
                                            tokenizer closes it (`bob@[192.0.2.1` is bob@[192.0.2.1])
    rewrite_address_fields(head, sender, recipient) -> bytes
                                            the header section with every address of a sender field passed
                                            through `sender` and of a recipient field through `recipient`
                                            (str -> str); a field none of whose addresses changed stays byte for
                                            byte, and in one that changed only the addresses do (display names,
                                            comments and folding stay; Postfix instead writes the field anew)

A leaf module beside mailflow.message. Malformed input never raises: a mailbox whose words are not one address
(`John Smith`, a comment or blanks between its words, a stray special) is left as it is, and so is an address
that is not UTF-8 (it never reaches a lookup table).
"""
from __future__ import annotations

import functools
import re
import threading
from collections import OrderedDict
from typing import Callable

from mailflow.message import header_fields

# Postfix global/header_opts.c: HDR_OPT_SENDER and HDR_OPT_RECIP (Return-Path, Bcc and Resent-Bcc are usually
# dropped before this, by message_drop_headers)
SENDER_FIELDS = frozenset({"disposition-notification-to", "errors-to", "from", "mail-followup-to", "reply-to",
                           "resent-from", "resent-sender", "return-path", "return-receipt-to", "sender"})
RECIPIENT_FIELDS = frozenset({"apparently-to", "bcc", "cc", "resent-bcc", "resent-cc", "resent-reply-to",
                              "resent-to", "to"})

_BLANK = b" \t\r\n"
_SPECIALS = b",;:<>@"
_WORD_END = _BLANK + _SPECIALS + b'("['

# The usual field, one plain address bare or in angle brackets: found without the tokenizer (~1 µs, not ~6)
_ONE_PLAIN = re.compile(rb"[ \t]*(<)?([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+(?:@[A-Za-z0-9.-]+)?)(?(1)>)[ \t]*(?:\r?\n)?")

# Postfix's header_address_token_limit: the addresses past this many tokens of one field are left as they came
# (Postfix drops them), so a field of thousands of addresses costs no more than this
TOKEN_LIMIT = 10240

Token = tuple[str, int, int]  # kind (word, quoted, literal, comment, blank, or the special itself), start, end


def _comment_end(value: bytes, start: int) -> int:
    """The end (exclusive) of the comment opened at `start` (nested comments and backslash escapes skipped);
    the end of `value` when it is never closed."""
    depth, i = 0, start
    while i < len(value):
        c = value[i]
        if c == 0x5C:  # backslash
            i += 2
            continue
        if c == 0x28:
            depth += 1
        elif c == 0x29:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return len(value)


def _quoted_end(value: bytes, start: int, close: int) -> int:
    """The end (exclusive) of the quoted string or literal whose content starts at `start`."""
    i = start
    while i < len(value):
        c = value[i]
        if c == 0x5C:
            i += 2
            continue
        if c == close:
            return i + 1
        i += 1
    return len(value)


def _tokens(value: bytes) -> list[Token]:
    """The tokens of a field value, at most TOKEN_LIMIT of them."""
    tokens: list[Token] = []
    i = 0
    while i < len(value) and len(tokens) < TOKEN_LIMIT:
        c = value[i]
        if c in _BLANK:
            end = i + 1
            while end < len(value) and value[end] in _BLANK:
                end += 1
            tokens.append(("blank", i, end))
        elif c == 0x28:  # (
            end = _comment_end(value, i)
            tokens.append(("comment", i, end))
        elif c == 0x22:  # "
            end = _quoted_end(value, i + 1, 0x22)
            tokens.append(("quoted", i, end))
        elif c == 0x5B:  # [
            end = _quoted_end(value, i + 1, 0x5D)
            tokens.append(("literal", i, end))
        elif c in _SPECIALS:
            end = i + 1
            tokens.append((chr(c), i, end))
        else:
            end = i + 1
            while end < len(value) and value[end] not in _WORD_END:
                end += 1
            tokens.append(("word", i, end))
        i = end
    return tokens


def _mailboxes(tokens: list[Token]) -> list[list[Token]]:
    """The tokens of each mailbox: separated by commas, a group's name (up to its colon) and its closing
    semicolon dropped; inside angle brackets nothing separates."""
    mailboxes: list[list[Token]] = [[]]
    angle = False
    for token in tokens:
        kind = token[0]
        if kind == "<":
            angle = True
        elif kind == ">":
            angle = False
        elif not angle and kind in (",", ";"):
            mailboxes.append([])
            continue
        elif not angle and kind == ":":
            mailboxes[-1] = []  # a group's display name
            continue
        mailboxes[-1].append(token)
    return [m for m in mailboxes if m]


def _address_span(mailbox: list[Token], with_route: bool = False) -> tuple[int, int] | None:
    """Where the address of one mailbox is, or None: no address, or words that are not one address. With
    `with_route`, the span of an address in angle brackets starts with its source route (`@a,@b:`), if any."""
    kinds = [kind for kind, _, _ in mailbox]
    route_start = None
    if "<" in kinds:
        inside = mailbox[kinds.index("<") + 1:]
        if ">" not in [kind for kind, _, _ in inside]:
            return None
        inside = inside[:[kind for kind, _, _ in inside].index(">")]
        route_end = max((i for i, (kind, _, _) in enumerate(inside) if kind == ":"), default=-1)
        words = inside[route_end + 1:]
        if with_route and route_end >= 0 and inside[0][0] == "@":
            route_start = inside[0][1]
    else:
        words = mailbox
    significant = [i for i, (kind, _, _) in enumerate(words) if kind not in ("blank", "comment")]
    if not significant:
        return None
    first, last = significant[0], significant[-1]
    if any(kind not in ("word", "quoted", "literal", "@") for kind, _, _ in words[first:last + 1]):
        return None  # blanks, comments or specials between the words: not one address
    return words[first][1] if route_start is None else route_start, words[last][2]


def address_spans(value: bytes) -> list[tuple[int, int]]:
    plain = _ONE_PLAIN.fullmatch(value)
    if plain is not None:
        return [plain.span(2)]
    return _spans_of_tokens(value)


def mailbox_spans(value: bytes) -> list[tuple[int, int] | None]:
    """Where the address of each mailbox of `value` is, None for one that is not one address (a command-line
    recipient list, where nothing may be dropped unsaid: a value past TOKEN_LIMIT ends with a None too). Words
    side by side outside angle brackets are a mailbox each, as Postfix's tok822_parse takes them."""
    tokens = _tokens(value)
    mailboxes = [part for mailbox in _mailboxes(tokens) for part in _missing_commas(mailbox, value)]
    spans = [_address_span(mailbox) for mailbox in mailboxes]
    return spans + [None] if tokens and tokens[-1][2] < len(value) else spans


VALUE_CACHE_ENTRIES = 1024  # table values remembered parsed (one value, `@example.com`, answers many lookups)
VALUE_CACHE_BYTES = 4 << 20  # and about this much of their text and addresses in all (a list's value can be 70 KB)


class _ParsedValues:
    """value_addresses' cache: the values used most recently, at most `entries` of them and about `limit` bytes of
    text (each value counted with its addresses); a value larger than the whole budget is parsed each time. Used
    from worker threads too (cleanup maps off the loop): a lock guards it. `cache_clear` and `cache_info` as
    functools.lru_cache's."""

    def __init__(self, parse: Callable[[str], tuple[str | None, ...]], entries: int, limit: int):
        self._parse = parse
        self._entries = entries
        self._limit = limit
        self._parsed: OrderedDict[str, tuple[str | None, ...]] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = 0
        self._lock = threading.Lock()
        functools.update_wrapper(self, parse)

    def __call__(self, value: str) -> tuple[str | None, ...]:
        with self._lock:
            parsed = self._parsed.get(value)
            if parsed is not None:
                self._parsed.move_to_end(value)
                self._hits += 1
                return parsed
            self._misses += 1
        parsed = self._parse(value)
        cost = _text_cost(value, parsed)
        if cost <= self._limit:
            with self._lock:
                if value not in self._parsed:
                    self._parsed[value] = parsed
                    self._bytes += cost
                    self._evict()
        return parsed

    def _evict(self) -> None:
        while len(self._parsed) > self._entries or self._bytes > self._limit:
            value, parsed = self._parsed.popitem(last=False)
            self._bytes -= _text_cost(value, parsed)

    def cache_clear(self) -> None:
        with self._lock:
            self._parsed.clear()
            self._bytes = self._hits = self._misses = 0

    def cache_info(self) -> functools._CacheInfo:
        with self._lock:
            return functools._CacheInfo(self._hits, self._misses, self._entries, len(self._parsed))


def _text_cost(value: str, parsed: tuple[str | None, ...]) -> int:
    return len(value) + sum(len(address) for address in parsed if address) + 56 * (1 + len(parsed))


def _value_addresses(value: str) -> tuple[str | None, ...]:
    """The addresses of a table value as Postfix's mail_addr_crunch parses it (RFC 822 tokens: `Joe <joe@x>` is
    `joe@x`, a comment or a group's name is none, words side by side are an address each, commas separate), None
    for a mailbox that is not one address (`a@b>x`, `<>`, a comment alone, `"`); one whose quoted string or literal
    is never closed is closed (`closed_address`)."""
    raw = value.encode("utf-8", "surrogateescape")
    return tuple(None if span is None else _closed_or_none(raw[span[0]:span[1]].decode("utf-8", "surrogateescape"))
                 for span in mailbox_spans(raw))


value_addresses = _ParsedValues(_value_addresses, VALUE_CACHE_ENTRIES, VALUE_CACHE_BYTES)


def _closed_or_none(address: str) -> str | None:
    return closed_address(address) or None


# RFC 5322 atext, and any character that is not ASCII (RFC 6532): a local part of these needs no quotes
_ATOM_TEXT = r"[^\x00-\x20\x7f()<>\[\]:;@\\,.\"]+"
_DOT_ATOM = re.compile(rf"{_ATOM_TEXT}(?:\.{_ATOM_TEXT})*")


def closed_address(address: str) -> str:
    """An address whose last quoted string or address literal is never closed, closed at its end as Postfix's
    tokenizer (tok822_scan) closes it; any other is returned as it is. A literal gets its `]` (`bob@[192.0.2.1` is
    bob@[192.0.2.1]); a quoted string its `"`, and the address is then written as Postfix writes the internal form
    that gives (quotes opened, the local part before the last '@' quoted again only when it must be): `"joe@x.test`
    is joe@x.test, `"joe smith@x.test` is "joe smith"@x.test, as Postfix's sendmail takes them (only sendmail:
    mailflow's aliases and .forward close the quote by their own rule, aliases._split_values, and refuse `"joe
    smith@x.test`). A backslash outside quotes escapes the next character, as in Postfix's tokenizer:
    `a\\"b@x.test` opens no quoted string, and is written so too ("a\\"b"@x.test)."""
    quoted = literal = escaped = False
    internal: list[str] = []
    i = 0
    while i < len(address):
        c = address[i]
        if c == "\\" and i + 1 < len(address):  # a quoted-pair, outside quotes too (`a\"b` opens none)
            internal.append(address[i:i + 2] if literal else address[i + 1])
            escaped = escaped or not (quoted or literal)
            i += 2
            continue
        if c == '"' and not literal:
            quoted = not quoted
        else:
            literal = (literal and c != "]") or (not quoted and c == "[")
            internal.append(c)
        i += 1
    if literal:
        return address + "]"
    if not (quoted or escaped):
        return address
    local, at, domain = "".join(internal).rpartition("@")
    if not at and not domain:  # `"` alone: nothing (-f's null sender, as Postfix's)
        return ""
    if not at:
        local = domain
    if not _DOT_ATOM.fullmatch(local):
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{local}@{domain}" if at else local


_WORDS = ("word", "quoted", "literal")


def _missing_commas(mailbox: list[Token], value: bytes) -> list[list[Token]]:
    """A mailbox without angle brackets cut before each word that follows another word with only blanks or
    comments between them: where Postfix's tok822_parse adds a missing comma (`a@x b@y`, `Joe a@x`). A dot is an
    operator of its own in Postfix's tokenizer, not part of an atom: words joined by one are one local part
    (`a."b c"@x`, `"a"."b"@x`), never two mailboxes."""
    if any(kind == "<" for kind, _, _ in mailbox):
        return [mailbox]
    parts: list[list[Token]] = [[]]
    previous: Token | None = None  # the last token that is not a blank or a comment
    for token in mailbox:
        if (token[0] in _WORDS and previous is not None and previous[0] in _WORDS
                and not _dot_between(value, previous, token)):
            parts.append([])
        parts[-1].append(token)
        previous = token if token[0] not in ("blank", "comment") else previous
    return parts


def _dot_between(value: bytes, before: Token, after: Token) -> bool:
    """Whether a dot joins two words (one ends with it or the other starts with it; quoted strings and literals
    hold theirs inside)."""
    return (before[0] == "word" and value[before[2] - 1] == 0x2E) or (after[0] == "word" and value[after[1]] == 0x2E)


def _spans_of_tokens(value: bytes) -> list[tuple[int, int]]:
    tokens = _tokens(value)
    mailboxes = _mailboxes(tokens)
    if tokens and tokens[-1][2] < len(value):  # cut at TOKEN_LIMIT: the last mailbox may be cut too
        mailboxes = mailboxes[:-1]
    spans = (_address_span(mailbox, with_route=True) for mailbox in mailboxes)
    return [span for span in spans if span is not None]


def _rewritten_value(value: bytes, rewrite: Callable[[str], str]) -> bytes | None:
    """The value with its addresses rewritten, or None when none of them changed."""
    out, done = [], 0
    for start, end in address_spans(value):
        try:
            old = value[start:end].decode("utf-8")
        except UnicodeDecodeError:  # not text: no table is asked about it
            continue
        new = rewrite(old)
        if new != old:
            out += [value[done:start], new.encode("utf-8")]
            done = end
    return b"".join(out) + value[done:] if out else None


def rewrite_address_fields(head: bytes, sender: Callable[[str], str], recipient: Callable[[str], str]) -> bytes:
    out: list[bytes] = []
    changed = False
    for name, lines in header_fields(head):
        field = b"".join(lines)
        rewrite = sender if name in SENDER_FIELDS else recipient if name in RECIPIENT_FIELDS else None
        if rewrite is not None:
            label, colon, value = field.partition(b":")
            new_value = _rewritten_value(value, rewrite)
            if new_value is not None:
                field, changed = label + colon + new_value, True
        out.append(field)
    return b"".join(out) if changed else head
