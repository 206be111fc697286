"""Pure address handling: split, normalise domains, check RFC 5321 syntax. No I/O, no config (a leaf).

- `split(addr) -> (local, domain)`: at the last '@'; domain "" for an unqualified address; `split_words(addr)`
  the same outside quoted strings (an address as written or in Postfix's quoting: `"x@y"` has no domain).
- `tidy(addr, envelope=True)`: needless quotes and one trailing dot dropped (`"joe"@x.test.` is `joe@x.test`), and a
  written source route (`@a.test:joe@x.test`), as Postfix's trivial-rewrite does to every address; a quoted one
  (`"@a.test:joe"@x.test` is `joe@x.test`) only from an envelope address (smtpd's, sendmail's, an alias's or a
  .forward's target: Postfix's internal form, whose route its quoting leaves bare), not from a header's, whose
  quoted string stays one word; `is_tidy(addr)`: a cheap look that tidy has nothing to do; `bared_route(addr)`:
  such a header address once qualified as Postfix writes it back (`"@a.test:joe"@x.test` is `@a.test:joe@x.test`).
- `unquoted_local(local)`, `quoted_local(local)`: a quoted local part's content; a local part quoted if it must be;
  `internal_local(local)`, `external_local(local)`: a local part as written (atoms and quoted strings joined by
  dots, as Postfix's tokenizer takes them: `a."b c"`) in Postfix's internal form (`a.b c`) and in its own quoting
  (`"a.b c"`), which is the form every address has inside mailflow; `as_internal_local(local)`: the internal form
  of any local part (one that is not words as it is, or without its quotes); `percent_split(addr)`: the percent hack's
  split of an address without a domain at its last `%` outside quotes; `bang_split(addr)`: swap_bangpath's, at
  its first `!`;
  `shown_original(addr)`: an original recipient as Postfix shows it (route and needless quotes dropped);
  `route_length(addr)`: the length of its source route (`@a,@b:`), 0 without one;
  `internal_form(addr)`: an address as Postfix's queue keeps it (a quoted local part without its quotes).
- `normalise_domain(d)`: lower case, no trailing dot, IDNA A-label for matching ("" if it cannot be).
- `ascii_domain(d)`: a domain's A-label form as Postfix's midna_domain_to_ascii makes it (UTS 46 without
  transitional mapping: `straße.test` is `xn--strae-oqa.test`, not `strasse.test`); UnicodeError when it has none.
- `mailbox_syntax_error(addr) -> str | None`: why an address is not an RFC 5321 mailbox (None if it is).
- `hostname_gripe(name) -> str | None`: why Postfix's valid_hostname refuses a host name, in the words of its
  warning; `is_valid_hostname(name)`: it takes it (ETRN's site, myhostname, XCLIENT's NAME).
- `parse_path(text) -> (address, rest)`: the address of a MAIL FROM / RCPT TO argument and the parameters
  after it; raises `PathError` (see its doc for what is accepted, as Postfix accepts it); `parse_written_path`
  also gives the address as the client wrote it (Postfix's original recipient: quotes, trailing dot kept);
  `undressed_path(word)`: a path word in an RFC 822 form Postfix's extract_addr takes (a comment, a phrase before
  the brackets, blanks at their ends) as a plain path for it, or None; `is_dressed(word)`: it has a comment, to be
  undressed before it is parsed.
- `has_unsafe_characters(addr)`, `printable(addr)`: CR, LF, NUL or another C0 control or DEL, which would end or
  forge an SMTP command line (an address with one never reaches the wire); the address with each shown as `?`.
- `is_min_user(addr)`: the address begins with '-' (Postfix allow_min_user: such an address could reach a
  command's argv as an option).
- `client_ip(text) -> IPv4Address | IPv6Address | None`: a client's IP address, IPv4-mapped IPv6 as IPv4;
"""
from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata

import idna

from mailflow.syntax import COMMAND_BLANKS, ascii_upper, command_words, is_postfix_ipv4, parse_ip

# The character classes are written as what they leave out of ASCII (every non-ASCII character is in): the same
# sets as [A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\x80-\U0010ffff] and the like, but a class with a range up to U+10FFFF
# takes re 10-20 ms to compile, paid by every program that imports this module (sendmail once per message).
_ATEXT = r"""[^\x00-\x20"(),.:;<>@\[\\\]\x7f]"""  # RFC 5322 atext, and any non-ASCII character
_ATOM = f"{_ATEXT}+"
_DOT_ATOM = rf"{_ATOM}(?:\.{_ATOM})*"
_QUOTED = r'"(?:[^\x00-\x1f"\\\x7f]|\\[\x20-\x7e])*"'  # qtext (\x20 \x21 \x23-\x5b \x5d-\x7e), non-ASCII
_LOCAL_RE = re.compile(rf"(?:{_DOT_ATOM}|{_QUOTED})")
# A local part as Postfix's tokenizer (tok822) takes one in an envelope or header address: atoms and quoted strings
# joined by dots or by the routing operators `%` and `!` (tok822 specials), a dot also first, last or doubled
# (`a."b c"`, `"a"."b"`, `a..b`, `.a`, `a.`, `"a b"%here`, `x!"y z"`); two words side by side (`"a""b"`, `"a"b`) are
# two addresses to tok822_parse, which adds the comma they lack (smtpd: 501). The atoms of _WORDS_RE leave the
# operators out, so that no text matches two ways (linear time).
_WORD = re.compile(rf"{_ATOM}|{_QUOTED}|\.")
_ATOM_NO_OPERATOR = r"""[^\x00-\x20"(),.:;<>@\[\\\]\x7f%!]+"""
_WORDS_RE = re.compile(rf"(?:{_ATOM_NO_OPERATOR}|{_QUOTED})?(?:[.%!](?:{_ATOM_NO_OPERATOR}|{_QUOTED})?)*")
_DOT_ATOM_RE = re.compile(_DOT_ATOM)
_QUOTED_PAIR = re.compile(r"\\(.)")
# A label as Postfix's valid_hostname takes it: letters, digits, hyphens inside, and underscores anywhere (real
# domains have them, against RFC 952); a domain of digits and dots only is an address without its brackets.
_LABEL_END = r"[^\x00-\x2f:-@\[-\^`{-\x7f]"  # [A-Za-z0-9_], and any non-ASCII character
_LABEL_INSIDE = r"[^\x00-\x2c./:-@\[-\^`{-\x7f]"  # the same and "-"
_LABEL = rf"{_LABEL_END}(?:{_LABEL_INSIDE}*{_LABEL_END})?"
_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
# the same for an ASCII domain, each label at most 63 characters (`_labels_fit`'s count, in one match)
_ASCII_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_ASCII_DOMAIN_RE = re.compile(rf"{_ASCII_LABEL}(?:\.{_ASCII_LABEL})*\.?")
_NUMERIC_DOMAIN = re.compile(r"[0-9.]+")
_A_LABELS = re.compile(rb"[A-Za-z0-9_\-.]+")  # (the codec maps U+3002 and its kin to dots: more labels)
# RFC 5321's 64-octet local part is not enforced (Postfix does not either): VERP and SRS addresses, mailflow's own
# among them, are longer. The whole address is bounded by the 256-octet path, less its angle brackets.
MAX_ADDRESS = 254
MAX_LABEL, MAX_HOSTNAME = 63, 255  # Postfix's VALID_LABEL_LEN, VALID_HOSTNAME_LEN
TOKENIZER_BLANKS = " \t"  # what Postfix's tokenizer (tok822_scan) skips, less CR and LF (never in a command word)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1 controls
_UNSAFE_IN_ADDRESS = re.compile(r"[\x00-\x1f\x7f]")  # what ends or forges a command line


class PathError(ValueError):
    """A MAIL/RCPT argument whose path cannot be taken apart (the reason is for the log)."""


def parse_path(text: str) -> tuple[str, str]:
    """(address, what follows it) for the argument of `MAIL FROM:` or `RCPT TO:`: `parse_written_path`'s."""
    addr, _, rest = parse_written_path(text)
    return addr, rest


def parse_written_path(text: str) -> tuple[str, str, str]:
    """(address, the address as written, what follows it) for the argument of `MAIL FROM:` or `RCPT TO:` (the
    keyword removed). The address as written is the path without its angle brackets, its source route, quotes,
    trailing dot and case as the client wrote them (Postfix's original recipient).

    RFC 5321 4.1.2 `Reverse-path / Forward-path`, with what Postfix (smtpd_strict_rfc821_envelope = no) also
    takes: spaces before the path, a path without angle brackets (it ends at the first space outside a quoted
    string), a path in two pairs of them (`<<a@b>>`, `< <a@b> >`; not three), a source route `@a,@b:` (dropped,
    RFC 5321 C; up to its first ':' even inside an address literal, as Postfix's smtpd cuts it:
    `@[IPv6:2001:db8::1]:u@x` leaves `2001:db8::1]:u@x`, refused here, one odd address to Postfix), and one
    trailing dot on the domain (dropped).
    `<>` gives "", and so does `<"">`. A tab, vertical tab or form feed separates like a space (COMMAND_BLANKS:
    Postfix's smtpd_token splits command words at each). Spaces and tabs at either end inside the brackets are
    dropped (`< >` is `<>`, `< a@b\t>` is `<a@b>`), strict_rfc821_envelopes or not, as Postfix's tokenizer skips
    them; a vertical tab or form feed there stays, part of the address.
    The local part may be atoms and quoted strings joined by dots, a dot also first, last or doubled, as Postfix's
    tokenizer takes it (`a."b c"`, `"a"."b"`, `a..b`, `joe.`; not `"a""b"`: two addresses to it); the address
    comes back with it in Postfix's own quoting (`external_local`): `a."b c"@x` is `"a.b c"@x`, `"alice"@b` is
    `alice@b`, `"a\\b"@x` is `ab@x`.
    Refused (PathError): a `<` without its `>`, anything but a blank right after the `>`, a
    bracket in an unbracketed path, and any address that is not `local-part[@domain]` with such a local part: an
    unquoted space, a backslash or another character outside atext, an empty label. Whether a
    domain is required, and UTF-8, are for the caller."""
    text = text.lstrip(COMMAND_BLANKS)
    if text.startswith("<"):
        # `<<a@b>>`: brackets in brackets, taken as Postfix takes them (the usual path, one pair: no call)
        depth, start = _opening(text) if text[1:2] in _OPENING_NEXT else (1, 1)
        end = _find_unquoted(text, ">", start)  # the first '>' closing them
        after = end + 1 if depth == 1 and end >= 0 else _closing(text, end, depth)
        if after < 0:
            raise PathError("no closing '>'")
        path, rest = text[start:end].strip(TOKENIZER_BLANKS), text[after:]
        if rest and rest[0] not in COMMAND_BLANKS:
            raise PathError("junk after '>'")
    else:
        end = _find_unquoted(text, COMMAND_BLANKS, 0)
        end = len(text) if end < 0 else end
        path, rest = text[:end], text[end:]
        if "<" in path or ">" in path:
            raise PathError("unbalanced '<' or '>'")
    written = path
    # every hop cut, each at its first ':', a literal's too (Postfix's extract_addr cuts one, trivial-rewrite one more:
    # `@a:@b:u@x` is `u@x` in both, but `@a:@b:@c:u@x` stays `@c:u@x` in Postfix: docs/security.md)
    while path.startswith("@") and ":" in path:
        path = path[path.index(":") + 1:]
    if path:
        local, domain = split_words(path)  # (an '@' in quotes is the local part's)
        at = "@" if len(local) < len(path) else ""
        dot_atom = bool(local) and _DOT_ATOM_RE.fullmatch(local) is not None  # (the usual case: its own quoting)
        internal = None if dot_atom else internal_local(local)
        if not at and internal is not None and "@" in internal and not is_quoted_route(internal):
            # Postfix keeps the internal form (`"x@y"` is `x@y`) and its quote_822_local splits that at its last
            # '@' whenever the address is rewritten or resolved: `a."x@y"` is `"a.x"@y`, taken as such (but for
            # a route first, `"@a.test:x@y"`, which rewriting drops: `tidy`)
            internal, at, domain = internal.rpartition("@")
        if domain.endswith(".") and not domain.endswith(".."):
            domain = domain[:-1]
        if (not dot_atom and internal is None) or (at and not domain):
            raise PathError("malformed local part" if domain or not at else "empty domain")
        if internal is not None:
            local = quoted_local(internal)
        path = f"{local}@{domain}" if at else ("" if local == '""' else local)  # `<"">` is `<>`, as in Postfix
    return path, written, rest.strip(COMMAND_BLANKS)


_BLANK = frozenset(TOKENIZER_BLANKS)  # one of them (a set: the empty string past the end is none)
_OPENING_NEXT = _BLANK | {"<"}  # what may follow the first '<' where more open


def _opening(text: str) -> tuple[int, int]:
    """(how many, where the path starts) of the `<` that open `text` (which starts with one): `<<a@b>>`, and with
    spaces or tabs between them, `< <a@b> >`, which Postfix's tokenizer skips, strict_rfc821_envelopes or not.
    Two at most: Postfix's extract_addr strips one pair and its tokenizer reads one route-addr inside
    (`<<<a@b>>>`: 501)."""
    depth, at = 1, 1
    while depth < 2 and text[at:at + 1] in _OPENING_NEXT:  # (Postfix: one pair its smtpd strips, one route-addr)
        blank = at
        while text[blank:blank + 1] in _BLANK:
            blank += 1
        if text[blank:blank + 1] != "<":
            break
        depth, at = depth + 1, blank + 1
    return depth, at


def _closing(text: str, end: int, depth: int) -> int:
    """Where the `depth` `>` that close a path end, the first at `end` (-1: none there) and the others after it,
    spaces or tabs between them skipped (`<<a@b> >`); -1 when they are not all there."""
    if end < 0:
        return -1
    at = end + 1
    for _ in range(depth - 1):
        while text[at:at + 1] in _BLANK:
            at += 1
        if text[at:at + 1] != ">":
            return -1
        at += 1
    return at


# RFC 5322 phrase words (obs: dots too), one character or quoted string a repetition: each branch starts with its own
# character, so no text matches two ways and a failed match backtracks in linear time (`(?:{_ATOM}|…)*` is
# `(a+)*`: 2^n ways to split n octets of atext, seconds for 27 of them in a MAIL line, hours for 40)
_PHRASE_RE = re.compile(rf"(?:{_ATEXT}|{_QUOTED}|[.{COMMAND_BLANKS}])*")


def is_dressed(word: str) -> bool:
    """A path word with a parenthesis (a comment: `<a@b>(c)`, `<a@b (c)>`), which parse_written_path would take
    into the address: undressed_path reads it first; not one inside a quoted string (`<"a(b)"@c>`, a valid path,
    strict_rfc821_envelopes or not). A look at the word alone, cheap on the usual path (no parenthesis)."""
    if "(" not in word and ")" not in word:
        return False
    return '"' not in word or _find_unquoted(word, "(", 0) >= 0 or _find_unquoted(word, ")", 0) >= 0


def undressed_path(word: str) -> str | None:
    """An RFC 822 path word (the first command word of MAIL's or RCPT's argument, syntax.next_command_word) as a
    plain path, as Postfix's extract_addr (tok822, strict_rfc821_envelopes = no) finds its one address: comments
    dropped (`<a@b>(c)`, `a(c)@b`, `<a@b (c)>`: nested, with quoted pairs; never inside a quoted string or an
    address literal; a comment separates words as a blank does: between two of a phrase, taken, `Jo(c)e<a@b>`;
    between two of the address, refused, `ali(c)ce@b`), a phrase before the angle brackets dropped (`"Joe"<a@b>`,
    `<Joe <a@b>>`, `<Joe <a@b> >`; or none, `<<a@b>(c)>`). The result is `<address>`, for
    parse_written_path to judge (which drops the blanks at either end inside the brackets): that address is the
    one the relay check and delivery see, as in Postfix.
    None when the word is no such form: a comment never closed or a `)` without its `(`, a phrase that is not
    words, text after the brackets (`<a@b>;`, `<a@b>>`). What is left must still be one address to
    parse_written_path: more than one (`a@b,c@d`) or a group (`g: a@b;`) it refuses. Call this only for a word
    parse_written_path refuses as it is (the forms it takes are left to it)."""
    text = _without_comments(word)
    if text is None:
        return None
    text = text.strip(TOKENIZER_BLANKS)  # (a comment as a word of its own: VRFY's `<a@b> (c)`)
    bracketed = text.startswith("<") and text.endswith(">") and len(text) > 1
    inner = text[1:-1].strip(TOKENIZER_BLANKS) if bracketed else text  # (one pair, as extract_addr strips one)
    at = _find_unquoted(inner, "<", 0)
    if at == 0 and bracketed and not (word.startswith("<") and word.endswith(">")):
        return None  # `<<a@b>>(c)`: Postfix strips a pair only where the word ends in it: two route-addrs to it
    if at >= 0:  # `phrase <address>`: the phrase goes (`<<a@b>(c)>`, `< <a@b> >`: none)
        if not _PHRASE_RE.fullmatch(inner[:at]) or not inner.endswith(">"):
            return None
        inner, bracketed = inner[at + 1:-1], True
    if "<" in inner or ">" in inner or _find_unquoted(inner.strip(TOKENIZER_BLANKS), COMMAND_BLANKS, 0) >= 0:
        return None  # (a blank inside the address: two words, `ali(c)ce@b`)
    return f"<{inner}>" if bracketed else inner  # (`a@b(c)` is `a@b`; parse_written_path drops the end blanks)


def _without_comments(word: str) -> str | None:
    """`word` without its RFC 822 comments (outside quoted strings and address literals); None when a comment is
    never closed or a `)` has no `(`. A comment between two word characters becomes a space: to Postfix's
    tokenizer it separates two words, which a phrase may be (`Jo(c)e <a@b>`, `"J"(c)"S"<a@b>`: taken) and an
    address may not (`ali(c)ce@x`, `a@b(c)test`: two addresses to Postfix, 501; undressed_path refuses an
    address with a blank inside), where dropping it would join them into an address the client never wrote."""
    if "(" not in word and ")" not in word:
        return word
    out: list[str] = []
    depth, quoted, literal, i = 0, False, False, 0
    after_word = False  # the comments just dropped follow a word character
    while i < len(word):
        c = word[i]
        if c == "\\":
            if not depth:
                if after_word:
                    out.append(" ")
                    after_word = False
                out.append(word[i:i + 2])
            i += 2
            continue
        if depth:
            depth += 1 if c == "(" else -1 if c == ")" else 0
            after_word = not depth and bool(out) and _in_word(out[-1])
        elif quoted or literal:
            out.append(c)
            quoted = quoted and c != '"'
            literal = literal and c != "]"
        elif c == "(":
            depth = 1
        elif c == ")":
            return None
        else:
            if after_word and _in_word(c):
                out.append(" ")  # two words (a phrase's: `Jo(c)e <a@b>`; an address's is refused)
            out.append(c)
            quoted, literal, after_word = c == '"', c == "[", False
        i += 1
    return None if depth or quoted else "".join(out)


_SEPARATING = frozenset(" \t\r\n|%!()<>@,;:.")  # what Postfix's tokenizer (tok822_scan) ends an atom at: its operators


def _in_word(piece: str) -> bool:
    """`piece` (a character, or a quoted pair) is part of a word to Postfix's tokenizer: atext (and any other
    character that is no operator), a quote, a literal's bracket, a backslash and what it escapes."""
    return len(piece) > 1 or piece not in _SEPARATING


def tidy(addr: str, *, envelope: bool = True) -> str:
    """`"joe"@x.test.` -> `joe@x.test`: a source route dropped (written, `@a:joe@x.test`, or, in an `envelope`
    address, quoted, `"@a:joe"@x.test`: `_quoted_route_dropped`), the local part in Postfix's own quoting
    (`external_local`: `a."b c"` is `"a.b c"`), and one trailing dot dropped from the domain (not from `x..` or a
    domain that is only a dot), as Postfix's trivial-rewrite tidies every address it rewrites (quote_822_local,
    rewrite_tree). A local part that is no words (`external_local`) is left as it is. `envelope` False: a header's
    address, whose quoted string Postfix's rewrite takes as one word: `"@a:joe"@x.test` keeps its route (see
    `bared_route` for how Postfix writes it back)."""
    addr = addr[route_length(addr):]
    addr = _quoted_route_dropped(addr) if envelope else addr
    local, domain = split_words(addr)
    at = len(local) < len(addr)
    if domain.endswith(".") and len(domain) > 1 and not domain.endswith(".."):
        domain = domain[:-1]
    local = external_local(local) if local else local
    return f"{local}@{domain}" if at else local


def _quoted_route_dropped(addr: str) -> str:
    """`addr` without the source route that begins the internal form of its quoted local part
    (`"@a.test:alice"@x.test`, `@a.test:alice@x.test` inside, is `alice@x.test`): Postfix's quote_822_local leaves
    a leading `@...:` of the internal form unquoted, up to its first `:`, so its rewrite_tree drops it as a route.
    Unqualified (`"@a.test:x@y.test"`), what follows the route is split at its last `@`, as quote_822_local splits
    it; with nothing after the route and no domain it is left as it is, as rewrite_tree leaves a route that ends
    the address. A `:` only in the domain is no route; nor is a route whose first `:` falls inside an address
    literal (`"@[IPv6:2001:db8::1]:a"@x.test`): cut there it would leave no address (the smtp client's header
    mapping drops such a route whole, at the literal's end: transports/generic.py)."""
    local, domain = split_words(addr)
    internal = internal_local(local) if local.startswith('"') else None
    if internal is None or not is_quoted_route(internal):
        return addr
    route, _, rest = internal.partition(":")
    if "[" in route:
        return addr
    qualified = len(local) < len(addr)
    if not (rest or qualified):
        return addr
    if qualified:
        return f"{quoted_local(rest)}@{domain}"
    user, at, host = rest.rpartition("@")
    return f"{quoted_local(user)}@{host}" if at else quoted_local(rest)


def bared_route(addr: str) -> str:
    """A qualified address whose quoted local part begins with a source route, written as Postfix's quoting
    (quote_822_local) writes its internal form: the route bare up to its first `:`, what follows quoted if it must
    be (`"@a.test:joe"@x.test` is `@a.test:joe@x.test`, `"@a:b c"@x.test` is `@a:"b c"@x.test`), as Postfix writes
    a header address back after rewriting it. Any other address is returned as it is."""
    local, domain = split_words(addr)
    internal = internal_local(local) if domain and local.startswith('"') else None
    if internal is None or not is_quoted_route(internal):
        return addr
    route, _, rest = internal.partition(":")
    return f"{route}:{quoted_local(rest)}@{domain}"


def is_quoted_route(internal: str) -> bool:
    """Whether the internal form of a local part begins with a source route (`@a.test:x`), which Postfix's
    quote_822_local leaves unquoted, up to its first `:`."""
    return internal.startswith("@") and ":" in internal


def is_tidy(addr: str) -> bool:
    """`tidy` has nothing to do: no quote, no doubled dot, no dot before the '@', first or last, no route. Cheap
    (callers' fast path); it may say False of an address that tidy leaves as it is (`a@.`)."""
    return ('"' not in addr and ".." not in addr and ".@" not in addr and addr[:1] not in (".", "@")
            and not addr.endswith("."))


def unquoted_local(local: str) -> str | None:
    """The content of a quoted local part (`"a@b"` -> `a@b`, quoted pairs undone); None when it is not one."""
    if len(local) > 1 and local.startswith('"') and local.endswith('"'):
        return _QUOTED_PAIR.sub(r"\1", local[1:-1])
    return None


def unescaped(text: str) -> str:
    """`text` with each backslash dropped and the character after it kept, as Postfix's tokenizer reads words."""
    return _QUOTED_PAIR.sub(r"\1", text) if "\\" in text else text


def internal_form(addr: str) -> str:
    """An address as Postfix's queue keeps it, which pipe(8) expands: a quoted local part without its quotes
    (`"a b"@x.test` is `a b@x.test`); pipe's flag q quotes it again."""
    local, at, domain = addr.rpartition("@")
    if '"' in domain:  # (that '@' is inside the quoted string of an unqualified address: `"@a.test:b"`)
        local, at, domain = addr, "", ""
    bare = unquoted_local(local if at else addr)
    if bare is None:
        return addr
    return f"{bare}@{domain}" if at else bare


def internal_local(local: str) -> str | None:
    """A local part as written (atoms and quoted strings joined by dots, `_WORDS_RE`) in Postfix's internal form:
    quotes opened and their quoted pairs undone (`a."b c"` is `a.b c`, `"a\\b"` is `ab`); None when it is not such words
    (a quoted string never closed, an unquoted space or special)."""
    if not local or not _WORDS_RE.fullmatch(local):
        return None
    if '"' not in local:
        return local
    return "".join(_QUOTED_PAIR.sub(r"\1", w[1:-1]) if w[0] == '"' else w for w in _WORD.findall(local))


def as_internal_local(local: str) -> str:
    """A local part as written, in Postfix's internal form as `internal_local` makes it; one that is not words
    (`internal_local`) without its quotes if it is one quoted string, else as it is. One without a quote (a
    dot-atom, the usual case) is its own internal form: no regex for it."""
    if '"' not in local:
        return local
    internal = internal_local(local)
    if internal:
        return internal
    bare = unquoted_local(local)
    return local if bare is None else bare


def external_local(local: str) -> str:
    """A local part as written, in Postfix's own quoting (quote_822_local of its internal form): a dot-atom as it
    is, anything else as one quoted string with `"` and `\\` escaped (`a."b c"` is `"a.b c"`, `"a"."b"` is `a.b`,
    `joe.` is `"joe."`); a local part that is not words (`internal_local`) is returned as it is."""
    if _DOT_ATOM_RE.fullmatch(local):
        return local
    internal = internal_local(local)
    return local if internal is None else quoted_local(internal)


def percent_split(addr: str) -> tuple[str, str] | None:
    """An address without a domain split at its last `%` outside quoted strings, as Postfix's rewrite_tree finds
    the percent hack's operator among the words as given (a `%` in quotes is none): (the user part in Postfix's
    quoting, the rest in internal form); None when there is no such `%`. Given as written (a header),
    `"<x>".user%y.test` is (`"<x>.user"`, `y.test`) and `"user%y.test"` is none; given in Postfix's quoting (the
    envelope), `user%y.test` is (`user`, `y.test`)."""
    addr = addr[route_length(addr):]
    at = _unquoted_operator(addr, "%", last=True)
    if at < 0:
        return None
    user, via = addr[:at], addr[at + 1:]
    return external_local(user), internal_local(via) or via


def bang_split(addr: str) -> tuple[str, str] | None:
    """An address without a domain split at its first `!` outside quoted strings, as Postfix's rewrite_tree swaps
    a UUCP path (swap_bangpath, `site!user` is `user@site`): (the user part after it in Postfix's quoting, the
    site before it in internal form); None when there is no such `!`. `"a\\b".u!h` is (`h`, `ab.u`), `a!b!c` is
    (`b!c`, `a`), `"a!b"` none."""
    addr = addr[route_length(addr):]
    bang = _unquoted_operator(addr, "!", last=False)
    if bang < 0:
        return None
    site, user = addr[:bang], addr[bang + 1:]
    return (external_local(user) if user else ""), internal_local(site) or site


def _unquoted_operator(addr: str, operator: str, *, last: bool) -> int:
    """The index of the first (or `last`) `operator` outside quoted strings, or -1."""
    if '"' not in addr:  # (the usual address: one search, no character loop on every MAIL and RCPT)
        return addr.rfind(operator) if last else addr.find(operator)
    found = -1
    quoted = False
    i = 0
    while i < len(addr):
        c = addr[i]
        if quoted and c == "\\":
            i += 1
        elif c == '"':
            quoted = not quoted
        elif c == operator and not quoted:
            found = i
            if not last:
                return found
        i += 1
    return found


def quoted_local(local: str) -> str:
    """A local part as an address writes it: as it is when it is a dot-atom, else in quotes (quote_822_local)."""
    if _DOT_ATOM_RE.fullmatch(local):
        return local
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


def shown_original(addr: str) -> str:
    """An original recipient (the RCPT address as written) as Postfix shows it in X-Original-To, a notice's
    "expanded from" and the log's orig_to: a source route dropped, the local part in quotes only if it needs them,
    the domain as it is (`"Team"@X.Test.` is `Team@X.Test.`, `joe.@x.test.` is `"joe."@x.test.`). ORCPT and
    Original-Recipient keep it as written."""
    addr = addr[route_length(addr):]
    local, domain = split_words(addr)
    if len(local) < len(addr):
        return f"{external_local(local)}@{domain}"
    internal = internal_local(addr)
    if internal and "@" in internal:  # (`"x@y"`: Postfix's internal form split at its last '@', as parse_path does)
        user, _, domain = internal.rpartition("@")
        return f"{quoted_local(user)}@{domain}"
    return external_local(addr)


_ROUTE = re.compile(r"@(?:[^:\[]|\[[^\]]*\])*:")  # (each branch starts with its own character: linear)


def route_length(addr: str) -> int:
    """The length of the source route that starts `addr` (`@a,@b:`, up to the first `:` outside an address
    literal, `@[IPv6:2001:db8::1]:u@x`), 0 without one."""
    if not addr.startswith("@"):
        return 0
    route = _ROUTE.match(addr)
    return route.end() if route else 0


_COMMAND_BLANK = re.compile(f"[{COMMAND_BLANKS}]")


def _find_unquoted(text: str, chars: str, start: int) -> int:
    """The index of the first of `chars` (one character, or COMMAND_BLANKS) at or after `start` outside a quoted
    string (whose quoted pairs are skipped too), or -1."""
    if text.find('"', start) < 0:  # nothing quoted (the usual path): the first one is the answer
        if len(chars) == 1:
            return text.find(chars, start)
        blank = _COMMAND_BLANK.search(text, start)
        return blank.start() if blank else -1
    quoted = False
    i = start
    while i < len(text):
        c = text[i]
        if quoted and c == "\\":
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c in chars and not quoted:
            return i
        i += 1
    return -1


def is_min_user(addr: str) -> bool:
    """Postfix allow_min_user = no refuses these: the address begins with '-'."""
    return addr.startswith("-")


def split(address: str) -> tuple[str, str]:
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain


def split_words(address: str) -> tuple[str, str]:
    """`split` for an address as written or in Postfix's quoting, at its last '@' outside quoted strings: `"x@y"`
    is unqualified (`split` would cut its quotes). Not for the internal form, whose quotes are no quotes."""
    at = _unquoted_operator(address, "@", last=True)
    return (address, "") if at < 0 else (address[:at], address[at + 1:])


def normalise_domain(domain: str) -> str:
    d = domain.strip().rstrip(".").lower()
    if d.startswith("[") or d.isascii():
        return d
    try:
        return ascii_domain(d)
    except UnicodeError:
        return ""


_DEVIATIONS = frozenset("\u00df\u03c2\u200c\u200d")  # UTS 46's deviation characters: ß, final sigma, ZWNJ, ZWJ


def ascii_domain(domain: str) -> str:
    """See the module docstring. Python's IDNA 2003 codec maps the deviation characters away (ß to ss, ς to σ),
    so a label holding one is converted by the idna package without transitional processing, as Postfix's
    default (enable_idna2003_compatibility = no); every other label as before, by the codec."""
    if domain.isascii():
        return domain
    labels = domain.split(".")
    if "" in labels[:-1]:
        raise UnicodeError("empty label")
    return ".".join(_ascii_label(label) for label in labels)


def _ascii_label(label: str) -> str:
    if label.isascii():
        return label
    if _DEVIATIONS.intersection(label):
        return idna.encode(label, uts46=True, transitional=False).decode("ascii")  # IDNAError is a UnicodeError
    return label.encode("idna").decode("ascii")


BAD_LOCAL_PART = "bad local part"  # two of mailbox_syntax_error's reasons, which callers tell apart by value
BAD_DOMAIN = "bad domain"


def mailbox_syntax_error(address: str) -> str | None:
    """None when `address` is `local@domain` per RFC 5321 (RFC 6531 for UTF-8); else the reason (BAD_LOCAL_PART,
    BAD_DOMAIN or another text)."""
    if len(address.encode("utf-8")) > MAX_ADDRESS:
        return "address too long"
    if _CONTROL.search(address):
        return "control character in address"
    local, domain = split(address)
    if not domain:
        return "no domain"
    if not _LOCAL_RE.fullmatch(local):
        return BAD_LOCAL_PART
    return None if is_valid_domain(domain) else BAD_DOMAIN


def is_valid_domain(domain: str) -> bool:
    """An address's domain: a domain name as Postfix's valid_hostname takes it (at most 255 octets, not all digits
    and dots), or an address literal. Not `is_valid_hostname`, on purpose: a domain may also hold UTF-8 labels
    (SMTPUTF8; each counted in its A-label form) and end in one dot, and this runs for every address (a compiled
    expression, not hostname_gripe's loop, which is there for its warning's words). On an ASCII name without a
    trailing dot or brackets the two agree (tests/unit/test_address.py keeps them so)."""
    if domain.startswith("["):
        return is_address_literal(domain)
    if len(domain) > 255:
        return False
    if domain.isascii():  # (most: labels and their lengths in one match)
        return _ASCII_DOMAIN_RE.fullmatch(domain) is not None and not _NUMERIC_DOMAIN.fullmatch(domain)
    return bool(_DOMAIN_RE.fullmatch(domain)) and _labels_fit(domain) and not _NUMERIC_DOMAIN.fullmatch(domain)


def hostname_gripe(name: str) -> str | None:
    """Why Postfix's valid_hostname refuses `name`, in the words of its warning (after "valid_hostname: "); None
    when it takes it: labels of letters, digits, `_` and inner `-`, at most 63 octets, not all digits, at most 255
    octets in all."""
    label_length, non_numeric = 0, False
    if not name:
        return "empty hostname"
    for i, ch in enumerate(name):
        following = name[i + 1:i + 2]
        if ch.isascii() and (ch.isalnum() or ch == "_"):
            label_length += 1
            if label_length > MAX_LABEL:
                return f"hostname label too long: {name[:100]}"
            non_numeric = non_numeric or not ch.isdigit()
        elif ch == ".":
            if label_length == 0 or not following:
                return f"misplaced delimiter: {name[:100]}"
            label_length = 0
        elif ch == "-":
            non_numeric, label_length = True, label_length + 1
            if label_length == 1 or following in ("", "."):
                return f"misplaced hyphen: {name[:100]}"
        else:
            return f"invalid character {ch.encode()[0]}(decimal): {name[:100]}"
    if not non_numeric:
        return f"numeric hostname: {name[:100]}"
    return f"bad length {len(name)} for {name[:100]}..." if len(name) > MAX_HOSTNAME else None


def is_valid_hostname(name: str) -> bool:
    """A host name as Postfix's valid_hostname takes it (hostname_gripe): ASCII, no trailing dot, no literal;
    where a host name is named (myhostname, ETRN's site, XCLIENT's NAME), not an address's domain
    (`is_valid_domain`, which also takes UTF-8 labels, a trailing dot and literals)."""
    return hostname_gripe(name) is None


def is_address_literal(domain: str) -> bool:
    """`[192.0.2.1]` or `[IPv6:2001:db8::1]` (the tag in any case), holding a real address (RFC 5321 4.1.3)."""
    return literal_ip(domain) is not None


def literal_ip(domain: str) -> str | None:
    """The address of an address literal (`[IPv6:2001:DB8::1]` -> `2001:db8::1`), None when `domain` is not one
    (RFC 5321 4.1.3: IPv4, or IPv6 behind its tag, in any case), as Postfix's valid_ipv4_hostaddr and
    valid_ipv6_hostaddr take them: an octet may have leading zeros when it is below 8 (`[192.0.2.01]` is
    192.0.2.1; `[192.0.2.010]`, octal 8 to the inet_aton Postfix connects through, is none), a first octet 0
    only in 0.0.0.0 (`[0.1.2.3]` is none), no IPv6 zone id."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        return _ipv6_hostaddr(inner[5:])
    return _ipv4_hostaddr(inner)


def is_valid_helo_literal(helo: str) -> bool:
    """Postfix's reject_invalid_hostaddr test of a HELO name that starts with `[`: the brackets off (when both are
    there around something), then valid_mailhost_addr: behind an `IPv6:` tag (any case) an IPv6 address, else an
    IPv4 address as valid_ipv4_hostaddr takes it (leading zeros allowed: `[192.0.2.010]` is one here, though
    literal_ip refuses it as a destination)."""
    inner = helo[1:-1] if len(helo) > 2 and helo[0] == "[" and helo[-1] == "]" else helo
    if inner[:5].lower() == "ipv6:":
        return _ipv6_hostaddr(inner[5:]) is not None
    return is_postfix_ipv4(inner)


def is_host_address(text: str) -> bool:
    """Postfix's valid_hostaddr: a bare IPv4 address as its valid_ipv4_hostaddr takes it (leading zeros allowed)
    or, when `text` holds a colon, a bare IPv6 address as literal_ip takes it between brackets."""
    return _ipv6_hostaddr(text) is not None if ":" in text else is_postfix_ipv4(text)


def _ipv4_hostaddr(text: str) -> str | None:
    """Postfix's valid_ipv4_hostaddr (syntax.is_postfix_ipv4) that names one address however it is read: an octet
    with a leading zero only below 8 (`01`, `007`). Postfix connects through glibc's inet_aton, which reads `010`
    as octal 8 and refuses `09`, where the text says 10 and 9: such a literal is none here (5.1.3), rather than
    mail sent to a host other than the one written, or than Postfix's. The address without leading zeros, or
    None."""
    if not is_postfix_ipv4(text):
        return None
    octets = text.split(".")
    if any(len(octet) > 1 and octet[0] == "0" and int(octet) >= 8 for octet in octets):
        return None
    return ".".join(str(int(octet)) for octet in octets)


def _ipv6_hostaddr(text: str) -> str | None:
    """Postfix's valid_ipv6_hostaddr (2 to 7 colons, at most one `::`, fields of at most 4 hex digits, an IPv4
    tail as _ipv4_hostaddr takes it after 2 to 6 colons), the address also being one `ipaddress` can read (what
    a connection needs); written in its short form, or None."""
    head, dot, _ = text.partition(".")
    fields = (head.rpartition(":")[0] if dot else text).split(":")
    colons = len(fields) - 1 + (1 if dot else 0)
    if not 2 <= colons <= (6 if dot else 7) or text.count("::") > 1:
        return None
    if (text.startswith(":") and not text.startswith("::")) or (text.endswith(":") and not text.endswith("::")):
        return None
    if any(len(f) > 4 or not all(c in "0123456789abcdefABCDEF" for c in f) for f in fields):
        return None
    if dot:
        tail = _ipv4_hostaddr(text.rpartition(":")[2])
        if tail is None:
            return None
        text = text.rpartition(":")[0] + ":" + tail
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        return None


def _labels_fit(domain: str) -> bool:
    """Each label at most 63 octets, counted in its ASCII (A-label) form (RFC 1035 2.3.4); a label that is not ASCII
    must have one (`_converts`)."""
    for label in domain.rstrip(".").split("."):
        try:
            encoded = label.encode("ascii") if label.isascii() else _converts(label)
        except UnicodeError:
            return False
        if not 0 < len(encoded) <= 63:
            return False
    return True


def _converts(label: str) -> bytes:
    """The A-label of a U-label, refused (UnicodeError) where Postfix's midna_domain_to_ascii (UTS 46, then
    valid_hostname) refuses it and Python's IDNA 2003 codec would not: a leading combining mark, hyphens in the
    third and fourth places, a result that is not letters, digits, hyphens and underscores (U+3000 maps to a
    space)."""
    if unicodedata.category(label[0]).startswith("M") or label[2:4] == "--":
        raise UnicodeError("not a U-label")
    encoded = _ascii_label(label).encode("ascii")
    if not _A_LABELS.fullmatch(encoded):
        raise UnicodeError("not a host name")
    return encoded


def has_unsafe_characters(address: str) -> bool:
    """CR, LF, NUL or another control character would end or forge a command line."""
    return bool(_UNSAFE_IN_ADDRESS.search(address))


def printable(address: str) -> str:
    return _UNSAFE_IN_ADDRESS.sub("?", address)


def is_utf8(address: str) -> bool:
    return not address.isascii()


@functools.lru_cache(maxsize=1024)  # a pure function; every session parses its client's address several times
def client_ip(text) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address in `text` (`::ffff:1.2.3.4` counts as `1.2.3.4`), or None when it is not one."""
    ip = parse_ip(text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


def vrfy_argument(arg: str, smtputf8_offered: bool = True) -> tuple[str, bool]:
    """VRFY's argument as Postfix reads it: its words (command_words) joined by one space (collapse_args), a last
    word SMTPUTF8 dropped ("" when nothing is left: the usage reply); and whether it was there (RFC 6531: the
    address may then be UTF-8). Where SMTPUTF8 is not offered (`smtputf8_offered` false: a discarded EHLO keyword)
    that word stays part of the argument, as in Postfix."""
    words = command_words(arg)
    smtputf8 = smtputf8_offered and bool(words) and ascii_upper(words[-1]) == "SMTPUTF8"
    if smtputf8:
        words.pop()
    return " ".join(words), smtputf8


def vrfy_address(text: str) -> str:
    """The address of VRFY's argument (vrfy_argument's: the words joined by one space), as Postfix's extract_addr
    finds it there (never strictly): the argument read as MAIL's and RCPT's path word is, a path (`<a@b>`, `a@b`,
    a source route dropped) or an RFC 822 form of one (undressed_path: a comment, `<a@b>(c)`, a phrase before the
    brackets, `Joe <a@b>`, `<Joe <a@b>>`, blanks at the ends inside them, `<a@b >`); "" when there is none, or
    more words."""
    if not is_dressed(text):
        found = _path_alone(text)
        if found is not None:
            return found
    plain = undressed_path(text)
    return "" if plain is None else _path_alone(plain) or ""


def _path_alone(text: str) -> str | None:
    """The address of `text` when it is a path and nothing more (parse_written_path's), else None."""
    try:
        addr, _, rest = parse_written_path(text)
    except PathError:
        return None
    return None if rest else addr
