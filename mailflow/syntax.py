r"""Small pure vocabularies that the configuration and the components share, each written once.

A leaf: it imports only the standard library, so `mailflow.config` (below every component) and any component
may use it without an import cycle.

    parse_duration(value) -> float              seconds: a number, or "30s", "5m", "1h", "5d", "1w"; at most
                                                DURATION_MAX (Postfix's time values are ints: conv_time refuses
                                                more), never nan or infinite
    parse_hostport(value, default_port=None)    "host:port", "[2001:db8::1]:25" -> (host, port); brackets dropped
    parse_endpoint(spec)                        "inet:host:port" -> ("inet", host, port); "unix:/path" -> ("unix",
                                                path, 0) (Postfix's policy service endpoints)
    parse_policy_service(arg) -> PolicyServiceSpec  check_policy_service's argument: an endpoint, or Postfix 3.0's
                                                `{ endpoint, timeout=10s, default_action=DUNNO, ... }` with the
                                                service's own smtpd_policy_service_* values (POLICY_SERVICE_*)
    TABLE_TYPES, FILE_TABLE_TYPES               the lookup table types (mailflow.tables implements each one), and
                                                those whose name is a file
    table_type(spec) -> str                     the type of a "type:name" spec, in lower case ("" without a colon)
    check_table_spec(spec) -> spec              "type:name" with a type of TABLE_TYPES (any case)
    table_type_hint(kind) -> str                for a Postfix type mailflow lacks (hash:, proxy:),
                                                what to write instead
    is_hostname(name)                           RFC 1123 letters-digits-hyphen labels, at most 255 characters,
                                                one trailing dot allowed
    parse_ip(text) -> IPv4Address | IPv6Address | None
    is_ip_address(text), is_ipv4(text)          an IP address (IPv4 or IPv6) / an IPv4 address, as written
    is_postfix_ipv4(text)                       Postfix's valid_ipv4_hostaddr: four dot-separated decimal octets,
                                                leading zeros taken, a first octet 0 only in 0.0.0.0
    has_control(text), mask_control(text)       C0 control characters and DEL: present? / each replaced by "?"
    parse_octet_count(text) -> int | None       an SMTP size (`SIZE=`, `BDAT`): ASCII digits, leading zeros taken;
                                                None past OFF_T_MAX (ValueError: not digits)
    command_words(text) -> [words]              an SMTP command's argument split as Postfix's smtpd_token splits
                                                it: at ASCII white space only (COMMAND_BLANKS: [ \t\n\v\f\r],
                                                Postfix's ISSPACE) outside `"…"` and `<…>` and not after a
                                                backslash; \x1c-\x1f, U+0085, U+00A0 and U+2000-U+200A, which
                                                str.split() breaks at, stay in a word
    next_command_word(text, start) -> (word, end)   one such word: the first after `start`, and where it ends
    unterminated_command_word(text) -> bool        whether the first one leaves a quote or angle bracket open
    verb_and_argument(line), verb_and_argument_bytes(line)   a command line's verb and the rest: split at space,
                                                tab, VT and FF, as Postfix's smtpd (smtpd and sendmail -bs)
    fold_key(key)                               a lookup table key folded as Postfix folds keys and queries of its
                                                texthash:, hash: (postalias's too) and inline: tables: Unicode case
                                                folding (dict_utf8, smtputf8_enable = yes): `Straße` is `strasse`
    ascii_upper(text)                           only the ASCII letters in upper case (Postfix's strcasecmp: a
                                                keyword spelled with `ſ` or `ı` is not SIZE or BODY=8BITMIME)
    is_utf8_text(text)                          no lone surrogate: text that can be encoded as UTF-8 (one check for
                                                sendmail's arguments, maildrop envelopes, the admin API's JSON and
                                                the store's damaged-record reader)
    echoed(text)                                a value someone else chose, for an error or a log line: repr() of at
                                                most ECHO_LIMIT (100) characters
    ENVID_MAX, is_printable_ascii(text)         RFC 3461's ENVID length bound; printable US-ASCII only (space to
                                                '~': what an ENVID must be, being written into notices' headers)
    split_outside_braces(text) -> [words]       split at whitespace and commas outside `{...}` (Postfix's
                                                mystrtokq with CHARS_BRACE: `inline:{ a=b, c=d }` stays one word)
    postfix_int(value), postfix_time(value)     a number / a time in seconds as Postfix reads one (strtol into a C
                                                int; conv_time), None when Postfix refuses it
    query_integer(text) -> int | None           an HTTP API's number parameter as Go's strconv.Atoi reads it (an
                                                optional sign, ASCII digits, a 64-bit int): the capture API's
                                                (Mailpit's reader) and the admin API's alike
    ENHANCED_STATUS, is_enhanced_status(text)   an enhanced status code (RFC 3463) as Postfix's dsn_valid takes
                                                it: class 2, 4 or 5, subject and detail of 1 to 3 ASCII digits
                                                (what every reader of a code as Postfix reads one uses; two keep
                                                checks of their own on purpose: metrics' _DSN takes only RFC
                                                3463's subjects 0-7, to bound its series' labels, and status'
                                                with_enhanced_code leaves alone a reply whose text starts 2., 4.
                                                or 5. with two dots and digits of any length, so that a
                                                line that has a code of some kind is not given a second one)
    split_leading_dsn(text) -> (dsn | None, rest)   the enhanced status code a reply text starts with (Postfix's
                                                dsn_split: `4.7.1 text`), the text after it and its blanks

Failure behaviour: the parsers raise `ValueError` with a reason fit for a configuration error (config turns it
into `FILE: KEY: REASON`); the predicates never raise.
"""
from __future__ import annotations

import ipaddress
import math
import re
from typing import NamedTuple

ENVID_MAX = 100  # RFC 3461 section 4.4: characters of an ENVID
DURATION_MAX = 2**31 - 1  # seconds (about 68 years): the longest time Postfix's conv_time takes
OFF_T_MAX = 2**63 - 1  # the largest size Postfix's off_cvt_string takes (a bigger one is an overflow)
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")
_HOSTPORT = re.compile(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,255}}$){_LABEL}(?:\.{_LABEL})*\.?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")

TABLE_TYPES = ("texthash", "inline", "static", "regexp", "pcre", "cidr", "sqlite", "accounts", "unix", "fail")
FILE_TABLE_TYPES = ("texthash", "regexp", "pcre", "cidr", "sqlite", "accounts")  # the name after the colon is a file
BLOCKING_TABLE_TYPES = ("sqlite", "unix")  # a lookup may wait on I/O (mailflow.tables: `blocking`)


def parse_duration(value: object) -> float:
    seconds = _duration_seconds(value)
    if seconds > DURATION_MAX:  # (compared before any float conversion: an int may have 400 digits)
        raise ValueError(f"{value!r} is longer than {DURATION_MAX} seconds (about 68 years, Postfix's limit)")
    return float(seconds)


def _duration_seconds(value: object) -> int | float:
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '30s', '5m', '1h', '5d'")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        if not (isinstance(value, float) and math.isnan(value)):
            return value
    elif isinstance(value, str):
        m = _DURATION.fullmatch(value)
        if m:
            return float(m.group(1)) * DURATION_UNITS[m.group(2) or "s"]
    raise ValueError(f"{value!r} is not a duration (use seconds, or '30s', '5m', '1h', '5d', '1w')")


def parse_hostport(value: str, default_port: int | None = None) -> tuple[str, int]:
    """'127.0.0.1:2525', '[::1]:25', 'mx.example:587' -> (host, port). Brackets are dropped."""
    m = _HOSTPORT.fullmatch(value.strip())
    if not m:
        raise ValueError(f"{value!r} is not host:port")
    host = m.group(1) or m.group(3)
    port = m.group(2) or m.group(4)
    if port is None:
        if default_port is None:
            raise ValueError(f"{value!r} needs a port (host:port)")
        return host, default_port
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: port out of range")
    return host, int(port)


def parse_endpoint(spec: str) -> tuple[str, str, int]:
    """A policy service: `inet:host:port` (port 1-65535; `[v6 address]:port`) or `unix:/absolute/path`."""
    kind, colon, rest = spec.partition(":")
    if kind == "unix" and colon and rest.startswith("/"):
        return "unix", rest, 0
    if kind == "inet" and colon:
        try:
            host, port = parse_hostport(rest)
        except ValueError:
            pass
        else:
            if port:
                return "inet", host, port
    raise ValueError(f"{spec!r} is not a policy service (inet:host:port or unix:/path)")


def table_type(spec: str) -> str:
    kind, colon, _ = spec.partition(":")
    return kind.strip().lower() if colon else ""


# Postfix table types a migrated configuration may name, and what to write in mailflow instead
POSTFIX_TYPE_HINTS = {
    **dict.fromkeys(("hash", "btree", "lmdb", "cdb", "dbm", "sdbm"),
                    "name the source file as texthash:FILE (it is read as it is, no postmap needed)"),
    "proxy": "drop the proxy: prefix (mailflow reads the table itself)",
}


def table_type_hint(kind: str) -> str:
    """For a Postfix table type mailflow does not have, what to write instead (with a leading "; "), else ""."""
    hint = POSTFIX_TYPE_HINTS.get(kind)
    return f"; {hint}" if hint else ""


def check_table_spec(spec: str) -> str:
    """`spec` when it is `type:name` with a known type (in any case); else ValueError naming the types (and, for
    a Postfix type such as hash:, what to write instead)."""
    kind = table_type(spec)
    if kind not in TABLE_TYPES:
        raise ValueError(f"{spec!r} is not a lookup table (type:name with type one of {', '.join(TABLE_TYPES)})"
                         + table_type_hint(kind))
    return spec


def is_hostname(name: str) -> bool:
    return _HOSTNAME.fullmatch(name) is not None


def parse_ip(text: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address `text` holds, or None when it holds none (any other value than a string included)."""
    if not isinstance(text, str):
        return None  # ip_address() would take an int as an address
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def is_ip_address(text: str) -> bool:
    return parse_ip(text) is not None


def is_ipv4(text: str) -> bool:
    ip = parse_ip(text)
    return ip is not None and ip.version == 4


_DOTTED_QUAD = re.compile(r"[0-9]+(?:\.[0-9]+){3}")


def is_postfix_ipv4(text: str) -> bool:
    """Postfix's valid_ipv4_hostaddr: four decimal octets joined by dots, each at most 255 with any leading zeros
    (`01.2.3.4` is one); a first octet 0 only in an address of zeros (`0.1.2.3` is none, `0.0.0.0` is). Unlike
    `is_ipv4` (Python's ipaddress, which refuses leading zeros)."""
    if not text.isascii() or _DOTTED_QUAD.fullmatch(text) is None:
        return False
    octets = [int(octet) for octet in text.split(".")]
    return all(octet <= 255 for octet in octets) and (octets[0] != 0 or not any(octets))


def has_control(text: str) -> bool:
    return _CONTROL.search(text) is not None


def mask_control(text: str, replacement: str = "?") -> str:
    return _CONTROL.sub(replacement, text)


COMMAND_BLANKS = " \t\n\v\f\r"  # what separates a command's words: C's isspace() in the C locale (Postfix's ISSPACE)
_COMMAND_WORD = re.compile(r"[^ \t\n\v\f\r]+")
_QUOTING = re.compile(r'["<\\]')  # what makes a span of a command one word, blanks and all
# what str.split() must not see: quoting (`"`, `<`, `\`) and where it breaks beyond COMMAND_BLANKS (\x1c-\x1f,
# non-ASCII spaces): one class of what it may see (ASCII but those), faster than isascii() and a second search
_NOT_FOR_STR_SPLIT = re.compile(r"[^\x00-\x1b !#-;=-\[\]-\x7f]")


def command_words(text: str | None) -> list[str]:
    r"""The words of a client's command argument, split as Postfix's smtpd_token (smtp_next_token, smtp_quoted)
    splits them: at ASCII white space only, outside `<…>` and `"…"` (a quote opens inside angle brackets; a
    bracket does not open inside quotes), a backslash taking the next character into the word; an unclosed bracket
    or quote runs to the end. The characters are kept as written. `ENVID="a b" RET=HDRS` is two words.
    str.split() also breaks at \x1c-\x1f and Unicode spaces, where Postfix sees one word: `BDAT 4\x1cLAST` would be
    a last chunk here and a syntax error (521, hang-up) there, two parsers framing one message apart."""
    if not text:
        return []
    if _NOT_FOR_STR_SPLIT.search(text) is None:  # the usual command: plain ASCII words and blanks
        return text.split()
    if _QUOTING.search(text) is None:
        return _COMMAND_WORD.findall(text)
    words: list[str] = []
    start = 0
    while True:
        word, start = next_command_word(text, start)
        if not word:
            return words
        words.append(word)


# A command's verb: after any leading blanks, up to the next (Postfix splits a command on space, tab, vertical tab and
# form feed, though RFC 5321 has only SP: `MAIL<TAB>FROM:<a@b>` is a MAIL command to it)
_VERB_PATTERN = r"[ \t\v\f]*([^ \t\v\f]*)[ \t\v\f]*"
_VERB = re.compile(_VERB_PATTERN)
_VERB_BYTES = re.compile(_VERB_PATTERN.encode())


def verb_and_argument(line: str) -> tuple[str, str]:
    """A command line's verb and what follows it, as smtpd splits a line (verb_and_argument_bytes), for `sendmail
    -bs`, which reads its lines as text."""
    match = _VERB.match(line)  # every line matches: each part may be empty
    assert match is not None
    return match.group(1), line[match.end():]


def verb_and_argument_bytes(line: bytes) -> tuple[bytes, bytes]:
    """A command line's verb and what follows it, the line as read from the wire."""
    match = _VERB_BYTES.match(line)  # every line matches: each part may be empty
    assert match is not None  # (not typing.cast: a call of its own, five a message)
    return match.group(1), line[match.end():]


def next_command_word(text: str, start: int = 0) -> tuple[str, int]:
    """The command word (see command_words) at or after `start` (blanks before it skipped), and the index just
    past it; ("", len(text)) when only blanks remain."""
    word, end, _ = _command_word(text, start)
    return word, end


# A first command word `<...>` without quotes, backslashes or a second `<`, then a blank or the end: closed (the
# common MAIL/RCPT path, answered without _command_word's character loop: ~0.3 us instead of ~2.5 us).
_CLOSED_PATH_WORD = re.compile(r'[ \t\n\v\f\r]*<[^<>"\\]*>[^<"\\ \t\n\v\f\r]*(?:[ \t\n\v\f\r]|\Z)')


def unterminated_command_word(text: str) -> bool:
    """Whether the first command word of `text` ends with a quote or angle bracket still open: it ran to the end
    of the line (Postfix's smtpd_token marks it SMTPD_TOK_ERROR)."""
    return _CLOSED_PATH_WORD.match(text) is None and _command_word(text, 0)[2]


def _command_word(text: str, start: int) -> tuple[str, int, bool]:
    """next_command_word's (word, end), and whether a quote or angle bracket was left open."""
    end = len(text)
    while start < end and text[start] in COMMAND_BLANKS:
        start += 1
    closing: list[str] = []  # the closing characters awaited, innermost last
    i = start
    while i < end:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if closing and c == closing[-1]:
            closing.pop()
        elif c == '"' or (c == "<" and (not closing or closing[-1] == ">")):
            closing.append('"' if c == '"' else ">")
        elif not closing and c in COMMAND_BLANKS:
            break
        i += 1
    i = min(i, end)
    return text[start:i], i, bool(closing)


def fold_key(key: str) -> str:
    """`key` as a table with case-insensitive keys holds it and is asked it: str.casefold(), Unicode's full case
    folding, which is what Postfix's casefold() (ICU's) gives: `Straße` and `STRASSE` are both `strasse`, final
    `ς` is `σ` (str.lower() kept `ß` and `ς`: a key Postfix finds was not found)."""
    return key.casefold()


def ascii_upper(text: str) -> str:
    """`text` with its ASCII letters in upper case and nothing else changed, as C's toupper() in the C locale:
    what an SMTP keyword is compared in (str.upper() maps `ſ` to S, `ı` to I and `ﬆ` to ST)."""
    return text.translate(_ASCII_UPPER)


def is_utf8_text(text: str) -> bool:
    """False for text holding a lone surrogate (Python's surrogateescape of bytes that were not UTF-8, JSON's
    `\\ud800`): no such text can be encoded to be stored, logged or sent."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


ECHO_LIMIT = 100  # characters of a refused value echoed back in an error or a log line


def echoed(text: str) -> str:
    """A value someone else chose, for an error text or a log line: repr() (quotes, escapes) of at most
    ECHO_LIMIT characters, `…` after it when cut: a megabyte key or field name is not written back whole."""
    return repr(text[:ECHO_LIMIT]) + ("…" if len(text) > ECHO_LIMIT else "")


def is_printable_ascii(text: str) -> bool:
    """Only space to '~' (Postfix's allprint()): no line break or control character can reach a header."""
    return all(" " <= c <= "~" for c in text)


def ascii_digits(text: str | bytes) -> bool:
    """Whether `text` is ASCII digits only, as SMTP, DSN and DNS record fields write numbers (str.isdigit takes
    `²` and `١`, which int() refuses or reads as another number; int() itself takes `+1`, `-1` and `1_0`)."""
    return text.isascii() and text.isdigit()


INT64 = range(-2**63, 2**63)


def query_integer(text: str) -> int | None:
    """A whole number in an HTTP API's query parameter, as Go's strconv.Atoi reads one (Mailpit's, so the capture
    API's; the admin API reads its own the same way): an optional sign, then ASCII digits (leading zeros, as many
    as given), within a 64-bit int; None for anything else (int() also takes `1_0`, ` 1` and `١`, and is slow on
    thousands of digits)."""
    sign = text[:1] if text[:1] in ("+", "-") else ""
    digits = text.removeprefix(sign)
    significant = digits.lstrip("0") or "0"
    if not ascii_digits(digits) or len(significant) > 19:
        return None
    number = int(sign + significant)
    return number if number in INT64 else None


def query_seconds(text: str) -> float | None:
    """A span of seconds in an HTTP API's query parameter, whole or with a fraction (`0.5`, `.5`, `5.`: as
    `Sink.wait_for(timeout=0.5)` takes it), with an optional `+` and leading zeros as `query_integer` takes them;
    ASCII digits only, at most 19 significant ones before the point; None for anything else."""
    whole, _, fraction = text.removeprefix("+").partition(".")
    significant = whole.lstrip("0")
    if not (whole or fraction) or not all(ascii_digits(part) for part in (whole, fraction) if part) \
            or len(significant) > 19:
        return None
    return float(f"{significant or 0}.{fraction[:20] or 0}")


def parse_octet_count(text: str) -> int | None:
    """An SMTP size (RFC 1870 `SIZE=`, RFC 3030 `BDAT`): `1*DIGIT`, leading zeros allowed; None when it
    exceeds OFF_T_MAX (what Postfix calls a file system imposed limit). ValueError when it is not digits."""
    if not ascii_digits(text):
        raise ValueError(f"not a number: {text!r}")
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(OFF_T_MAX)):  # (also keeps int() away from a huge string)
        return None
    value = int(digits)
    return value if value <= OFF_T_MAX else None


# check_policy_service { endpoint, name=value, ... }: the smtpd_policy_service_* settings a service may override
# (Postfix 3.7's smtpd_check.c time_table, int_table, str_table: the names without that prefix), with their minimums
POLICY_SERVICE_DURATIONS = {"timeout": 1, "max_idle": 1, "max_ttl": 1, "retry_delay": 1}
POLICY_SERVICE_COUNTS = {"request_limit": 0, "try_limit": 1}
POLICY_SERVICE_TEXTS = ("default_action", "policy_context")  # (not empty)


class PolicyServiceSpec(NamedTuple):
    """A check_policy_service argument: the endpoint and the service's own values (seconds for the durations)."""

    endpoint: str
    overrides: dict[str, int | str]


def parse_policy_service(arg: str) -> PolicyServiceSpec:
    """`inet:host:port`, `unix:/path`, or `{ endpoint, name=value, { name = value with spaces }, ... }` with names
    of POLICY_SERVICE_DURATIONS, _COUNTS and _TEXTS. ValueError naming the trouble (Postfix stops: fatal)."""
    text = arg.strip()
    if not text.startswith("{"):
        parse_endpoint(text)
        return PolicyServiceSpec(text, {})
    if not text.endswith("}"):
        raise ValueError(f"{text!r}: a policy service in braces must end with '}}'")
    words = split_outside_braces(text[1:-1])
    if not words:
        raise ValueError(f"empty policy service: {text!r}")
    parse_endpoint(words[0])
    return PolicyServiceSpec(words[0], dict(_policy_override(word) for word in words[1:]))


def _policy_override(word: str) -> tuple[str, int | str]:
    """One `name=value` (or `{ name = value }`) of a policy service in braces, its value checked."""
    inner = word[1:-1] if word.startswith("{") and word.endswith("}") else word
    name, eq, value = inner.partition("=")
    name, value = name.strip(), value.strip()
    if not eq or not name:
        raise ValueError(f"policy service option {word!r} is not name=value (braces allow spaces: "
                         "{ default_action = 451 4.3.5 try later })")
    if name in POLICY_SERVICE_DURATIONS:
        seconds = postfix_time(value)
        if seconds is None or seconds < POLICY_SERVICE_DURATIONS[name]:
            raise ValueError(f"policy service option {name}={value}: whole seconds (or m, h, d, w), at least "
                             f"{POLICY_SERVICE_DURATIONS[name]}s")
        return name, seconds
    if name in POLICY_SERVICE_COUNTS:
        count = postfix_int(value)
        if count is None or count < POLICY_SERVICE_COUNTS[name]:
            raise ValueError(f"policy service option {name}={value}: a number, at least {POLICY_SERVICE_COUNTS[name]}")
        return name, count
    if name in POLICY_SERVICE_TEXTS:
        if not value:
            raise ValueError(f"policy service option {name}= is empty")
        return name, value
    known = (*POLICY_SERVICE_DURATIONS, *POLICY_SERVICE_COUNTS, *POLICY_SERVICE_TEXTS)
    raise ValueError(f"unknown policy service option {name!r} (known: {', '.join(known)})")


_STRTOL = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)")  # what C's strtol reads in base 10
_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
INT_MAX = 2**31 - 1  # a C int's bound, Postfix's for its numbers and times


def postfix_int(value: str) -> int | None:
    """`value` as Postfix reads a number (mail_conf_int, attr_override: strtol, all of it, a C int), else None."""
    number = _STRTOL.fullmatch(value)
    return int(number[1]) if number and -INT_MAX - 1 <= int(number[1]) <= INT_MAX else None


def postfix_time(value: str, default_unit: str = "s") -> int | None:
    """`value` in seconds as Postfix's conv_time reads a time (mail_conf_time, attr_override): a whole number, not
    negative, then a unit (s, m, h, d, w; none: `default_unit`), at most INT_MAX seconds; else None. As conv_time,
    only the character after the number is looked at (`10sx` is 10s)."""
    number = _STRTOL.match(value)
    if number is None or not 0 <= int(number[1]) <= INT_MAX:
        return None
    factor = _TIME_UNITS.get(value[number.end():number.end() + 1] or default_unit)
    if factor is None or (factor > 1 and int(number[1]) >= INT_MAX // factor):
        return None
    return int(number[1]) * factor


ENHANCED_STATUS = r"[245]\.[0-9]{1,3}\.[0-9]{1,3}"  # (a pattern: class.subject.detail, ASCII digits only)
_ENHANCED_STATUS = re.compile(ENHANCED_STATUS)
_LEADING_DSN = re.compile(rf"{ENHANCED_STATUS}(?:\s+|$)")


def is_enhanced_status(text: str) -> bool:
    """`text` is an enhanced status code, whole (see ENHANCED_STATUS)."""
    return _ENHANCED_STATUS.fullmatch(text) is not None


def split_leading_dsn(text: str) -> tuple[str | None, str]:
    """(the enhanced status code `text` starts with, the text after it and its blanks); (None, text) without one."""
    found = _LEADING_DSN.match(text)
    return (found.group().rstrip(), text[found.end():]) if found else (None, text)


def split_outside_braces(text: str) -> list[str]:
    """The words of `text`: split at whitespace and commas, except inside braces (nested braces counted).
    ValueError for an unbalanced brace."""
    words: list[str] = []
    current: list[str] = []
    depth = 0
    for c in text:
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth < 0:
                raise ValueError("unbalanced '}'")
        if depth == 0 and (c.isspace() or c == ","):
            if current:
                words.append("".join(current))
            current = []
        else:
            current.append(c)
    if depth:
        raise ValueError("unbalanced '{'")
    if current:
        words.append("".join(current))
    return words
