"""`pcre:/path` tables (pcre_table(5)) on RE2: Postfix's PCRE rules, leftmost-first, no backtracking.

The file format is regexp:'s (mailflow.tables.regexp shares its `if`/`endif` structure, prefilter sets and lookup):
`/pattern/flags result`, `!/pattern/ result` (each `!` toggles; blanks may come between), `if /pattern/` …
`endif` (nested), `#` comments, continuation lines. The delimiter is the first character after the `!`s (any
character but a blank; a rule line itself starts with a non-alphanumeric one), a backslash escapes it, and the
pattern keeps its backslashes, as Postfix's dict_pcre.c reads it.

Matching is PCRE's leftmost-first (RE2 `longest_match = False`): `/^(a|ab)/ $1` against `abc` answers `a` (regexp:,
leftmost-longest as POSIX, answers `ab`), non-greedy quantifiers are honoured (`/^<(.+?)>/ $1` against `<a>b>`
answers `a`). As in Postfix 3.7 (which never asks PCRE for UTF mode), patterns and keys
are bytes: `.` is one byte, caseless matching folds ASCII letters, a key that is not UTF-8 (surrogates, as
Python's surrogateescape gives them) is matched as the bytes it came from (RE2's Latin-1 mode folds
no byte above 0x7F either: `(?i)\\xc0` does not match 0xE0, tests/unit/test_tables.py).

Flags (each toggles; the defaults are Postfix's, caseless and dot-all): i caseless, m multi-line (`^`/`$` at line
breaks), s dot-all (`.` matches a line break), x extended (blanks and `#` comments in the pattern are left out
here, RE2 has no such mode), A anchored (at the key's start), U ungreedy (RE2's (?U)), E dollar-end-only (RE2's
`$` is always so: a key never ends in a line break here, mailflow asks none that does), X (PCRE1's "extra",
ignored by Postfix's PCRE2 build: accepted, no effect).

Syntax: PCRE constructs RE2 lacks but can say otherwise are rewritten to what matches the same bytes
(_in_re2_syntax: `\\s` with VT, `\\v` `\\h` and their negations, `\\e`, `\\cX`, `\\o{…}`, `\\N` (`\\N{2}` a count),
`\\Z`, `(?#…)`; a `(?x)` outside any group: _inline_extended); what RE2
has no equivalent of is a bad line naming it ("RE2 has no \\G …").

The result: `$n`, `${n}`, `$(n)` (n >= 1, at most the pattern's groups) the text of group n, empty when the
group did not take part; `$$` a dollar; any other `$` is a bad line (Postfix's mac_parse). A result that is not
UTF-8 (a group that cut a character in two, `/^(.)/ $1` against `é`) cannot be answered (`LookupRetry`), as Postfix
refuses it in `postmap -q` ("non-UTF-8 value", a query error, with smtputf8_enable = yes, its default), except by
cleanup's header and body checks (`lookup_unchecked`: the bytes, as Postfix's cleanup takes them). A key that
is not UTF-8 is matched as its bytes: cleanup's header and body checks hand such a line's bytes (as surrogates,
mailflow.filters.content_checks.as_key), as Postfix's cleanup does (its checks' maps are not UTF-8 checked:
tests/interop/test_pcre_vs_postfix.py); `postmap -q` with smtputf8_enable = yes does not look such a key up
("non-UTF-8 key", not found), `mailflow table query` does.

One capture differs: a group repeated by `*`, `+` or `{n,m}` whose last repetition matches the empty string is
that empty repetition in PCRE, the last non-empty one in RE2 (`/^((a?))*b$/ $1` against `ab`: `` in Postfix, `a`
here). Patterns whose repeated groups always take a character answer as Postfix's (tests/interop's random ones).

Cost: as regexp:'s (one RE2 set pass over all rules, then one search of the answering rule): about 4-5 us for a
20-rule file and a short key, a miss or a hit on the last rule, on the machine the tests run on; linear in the key
while RE2's DFA fits its memory, key length x rules past that (mailflow.tables.regexp's doc: milliseconds to
seconds for long keys against big tables, which cleanup matches in a worker thread).

Failure behaviour: a line Postfix's pcre warns about and skips (a pattern RE2 cannot take: back-references,
look-around, atomic groups, possessive quantifiers, recursion, conditionals; a bad flag or `$n`; an `if` without
`endif`) makes the whole table fail with `LookupRetry` naming file:line and the reason, as regexp: does:
`mailflow check-config` and `mailflow table query` report it, a reload refuses it, and a running server's lookups
in it answer 4.3.0 (the mail waits) until it is fixed. A table missing a rule would answer wrongly (a skipped
REJECT lets the mail in).
"""
from __future__ import annotations

import re
from typing import Any, Callable

import re2

from mailflow.errors import LookupRetry
from mailflow.tables.files import BLANKS, split_pattern_rule
from mailflow.tables.regexp import Piece, RulesTable, lookup_rules, parse_result, parse_rules

_FLAGS = "imsxAEUX"
_EXTENDED_BLANKS = BLANKS + "\x85"  # what PCRE2's x flag leaves out of a pattern's bytes (0x85 is NEL)
# RE2's errors for what PCRE has and RE2 has not: the construct, named as a PCRE user knows it
_UNSUPPORTED = [(re.compile(r"invalid escape sequence: \\[1-9]"), "a back-reference"),
                (re.compile(r"invalid escape sequence: \\g"), "a back-reference or subroutine call"),
                (re.compile(r"invalid perl operator: \(\?<?[=!]"), "a look-around assertion"),
                (re.compile(r"invalid perl operator: \(\?>"), "an atomic group"),
                (re.compile(r"invalid perl operator: \(\?(?:R|[0-9+-]|&)"), "a recursion or subroutine call"),
                (re.compile(r"invalid perl operator: \(\?\("), "a conditional group"),
                (re.compile(r"bad repetition operator: (?:[*+?]|\{[\d,]*\})\+"), "a possessive quantifier")]


def _options() -> "re2.Options":
    options = re2.Options()
    options.encoding = re2.Options.Encoding.LATIN1  # bytes, as PCRE without UTF mode
    options.longest_match = False  # leftmost-first, as PCRE
    options.log_errors = False
    return options


def parse_pcre(source: str) -> Any:
    return parse_rules(source, _parse_pattern, parse_result, _options())


def _parse_pattern(number: int, text: str) -> tuple[Any, bool, str]:
    """`!/pattern/flags rest` -> (compiled pattern, negated, rest), as dict_pcre_get_pattern reads it."""
    rule = split_pattern_rule(number, text)
    return _compile(number, rule.pattern, rule.flags), rule.negated, rule.rest


def _compile(number: int, pattern: str, flags: str):
    """The RE2 pattern for a PCRE pattern and its flags (defaults caseless and dot-all, each flag toggles)."""
    on = {"i": True, "s": True}
    for flag in flags:
        if flag not in _FLAGS:
            raise ValueError(f"line {number}: unknown regexp option {flag!r} (pcre_table(5) has {', '.join(_FLAGS)})")
        on[flag] = not on.get(flag, False)
    try:
        if on.get("x"):
            pattern = _bytewise(_without_extended_blanks, pattern)
        elif (inline_x := _inline_extended(pattern)) is not None:
            pattern = inline_x[0] + _bytewise(_without_extended_blanks, inline_x[1])
        pattern = _in_re2_syntax(pattern)
    except ValueError as e:
        raise ValueError(f"line {number}: {e}") from None
    inline = "".join(f for f in "imsU" if on.get(f))
    text = pattern.encode("utf-8", "surrogateescape")
    try:
        if on.get("A"):  # the pattern must stand alone first: `a)|(b` wrapped would be `\A(?:a)|(b)`
            re2.compile(text, _options())
            text = rb"\A(?:" + text + b")"
        return re2.compile((f"(?{inline})".encode() if inline else b"") + text, _options())
    except re2.error as e:
        raise ValueError(f"line {number}: {_reason(pattern, e)}") from None


# PCRE escapes RE2 lacks or reads otherwise, as the bytes each matches (PCRE2 without UTF mode, its default "C"
# locale tables): \s has VT (RE2's has not), \v is vertical space (RE2's is VT alone), \h horizontal space.
_SPACE = frozenset(b"\t\n\x0b\f\r ")
_VERTICAL = frozenset(b"\n\x0b\f\r\x85")
_HORIZONTAL = frozenset(b"\t \xa0")
_BYTE_SETS = {"s": _SPACE, "v": _VERTICAL, "h": _HORIZONTAL}
_SIMPLE = {"e": "\\x1b", "E": ""}  # escape, and a \E with no \Q before it (PCRE ignores it)
_NOT_IN_RE2 = {"G": "\\G (the end of the previous match)", "K": "\\K (reset the match start)",
               "X": "\\X (an extended grapheme cluster)", "R": "\\R (any line break sequence)",
               "o": "\\o{...} (octal)", "g": "\\g (a back-reference or subroutine call)",
               "k": "\\k (a named back-reference)"}
_MAX_REPEAT = 1000  # RE2's limit on a counted repetition
_COUNT = re.compile(r"\{(\d+)(?:,(\d*))?\}")
_FLAG_GROUP = re.compile(r"\(\?([A-Za-z]*)(?:-([A-Za-z]*))?[):]")  # `(?ix)`, `(?-x)`, `(?x:`


def _inline_extended(pattern: str) -> tuple[str, str] | None:
    """A `(?x)` (alone or with other letters, `(?ix)`) outside any group: PCRE
    reads the rest of the pattern as the x flag does. (the pattern before it with the x left out, the rest) to
    have its blanks left out; None when there is no such group (_in_re2_syntax names any other inline x)."""
    depth, i, n = 0, 0, len(pattern)
    while i < n:
        char = pattern[i]
        if pattern.startswith("\\Q", i):
            end = pattern.find("\\E", i + 2)
            i = n if end < 0 else end + 2
        elif char == "\\":
            i += 2
        elif char == "[":
            i = _class_end(pattern, i)
        elif pattern.startswith("(?#", i):
            end = pattern.find(")", i)
            i = n if end < 0 else end + 1
        elif (group := _FLAG_GROUP.match(pattern, i)) is not None:
            on, off = group.group(1), group.group(2) or ""
            if "x" not in group.group(0):
                depth += group.group(0).endswith(":")
                i = group.end()
                continue
            if depth or group.group(0).endswith(":") or "x" in off or on.count("x") != 1:
                return None
            letters = on.replace("x", "") + (f"-{off}" if off else "")
            return pattern[:i] + (f"(?{letters})" if letters else ""), pattern[group.end():]
        else:
            depth += char == "("
            depth -= char == ")" and depth > 0
            i += 1
    return None


def _in_re2_syntax(pattern: str) -> str:
    """`pattern` with each PCRE construct RE2 lacks but can say otherwise rewritten to what matches the same bytes:
    `\\s` `\\S` `\\v` `\\V` `\\h` `\\H` as their byte sets, `\\e` `\\cX` `\\xH` as `\\xNN`, `\\N` as `[^\\n]`,
    `\\Z` as `\\z` (no key mailflow asks ends in a line break, as for `$`), `(?#...)` and a stray `\\E` left out.
    Raises ValueError naming what RE2 has no equivalent of (\\G, \\K, \\R, a count over 1000, branch reset…)."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        char = pattern[i]
        if pattern.startswith("\\Q", i):
            end = pattern.find("\\E", i + 2)
            end = n if end < 0 else end + 2
            out.append(pattern[i:end])
            i = end
        elif char == "\\":
            text, i = _escape(pattern, i, in_class=False)
            out.append(text)
        elif char == "[":
            text, i = _class(pattern, i)
            out.append(text)
        elif pattern.startswith("(?#", i):
            end = pattern.find(")", i)
            if end < 0:
                raise ValueError("a (?# comment without its closing )")
            i = end + 1
        elif pattern.startswith("(?|", i):
            raise ValueError("RE2 has no branch reset group (?|...)")
        elif pattern.startswith("(*", i):
            raise ValueError("RE2 has no (*VERB) or start-of-pattern option")
        elif pattern.startswith("(?", i) and (group := _FLAG_GROUP.match(pattern, i)) and "x" in group.group(0):
            raise ValueError("RE2 has no inline (?x) but one outside any group: write the x flag "
                             "after the pattern's closing delimiter (/pattern/x)")
        elif char == "{" and (count := _COUNT.match(pattern, i)):
            if any(c and int(c) > _MAX_REPEAT for c in count.groups()):
                raise ValueError(f"RE2 has no repetition count over {_MAX_REPEAT} ({count.group(0)})")
            out.append(count.group(0))
            i = count.end()
        else:
            out.append(char)
            i += 1
    return "".join(out)


def _escape(pattern: str, i: int, *, in_class: bool) -> tuple[str, int]:
    """The RE2 text of the escape at `pattern[i]` (a backslash) and the index after it."""
    letter = pattern[i + 1:i + 2]
    if letter.lower() in _BYTE_SETS:
        members = _BYTE_SETS[letter.lower()]
        members = members if letter.islower() else frozenset(range(256)) - members
        return (_ranges(members) if in_class else f"[{_ranges(members)}]"), i + 2
    if letter in _SIMPLE:
        return _SIMPLE[letter], i + 2
    if letter == "c" and i + 2 < len(pattern) and pattern[i + 2].isascii():
        return f"\\x{ord(pattern[i + 2].upper()) ^ 0x40:02x}", i + 3
    if letter == "x" and pattern.startswith("{", i + 2) and "}" in pattern[i + 3:]:
        end = pattern.index("}", i + 3) + 1
        return pattern[i:end], end  # \x{hh}: RE2's own (its braces are no repetition count)
    if letter == "x" and (digits := re.match(r"[0-9A-Fa-f]{1,2}", pattern[i + 2:i + 4])):
        return f"\\x{int(digits.group(0), 16):02x}", i + 2 + digits.end()
    if letter == "N" and not in_class and (not pattern.startswith("{", i + 2) or _COUNT.match(pattern, i + 2)):
        return "[^\\n]", i + 2  # (`\\N{2}`: a count, PCRE2 without UTF mode; `\\N{U+e9}` RE2 refuses, as PCRE2)
    if letter == "o" and (octal := re.match(r"\{([0-7]+)\}", pattern[i + 2:])):
        if int(octal.group(1), 8) > 0xFF:
            raise ValueError(f"a character code over 0xff in \\o{octal.group(0)} (no UTF mode: PCRE2 refuses it)")
        return f"\\x{int(octal.group(1), 8):02x}", i + 2 + octal.end()
    if letter == "Z" and not in_class:
        return "\\z", i + 2
    if letter in _NOT_IN_RE2:
        raise ValueError(f"RE2 has no {_NOT_IN_RE2[letter]}")
    return pattern[i:i + 2], i + 2


def _class(pattern: str, start: int) -> tuple[str, int]:
    """The character class opened at `start` with its escapes rewritten, and the index after it."""
    end = _class_end(pattern, start)
    out, i = [], start
    while i < end:
        if pattern[i] == "\\" and i > start:
            text, i = _escape(pattern, i, in_class=True)
            out.append(text)
        elif pattern.startswith("[:", i) and i > start:
            close = pattern.find(":]", i + 2) + 2
            out.append(pattern[i:close])
            i = close
        else:
            out.append(pattern[i])
            i += 1
    return "".join(out), end


def _ranges(members: frozenset[int]) -> str:
    """A class's inside for these bytes: `\\xNN` and `\\xNN-\\xNN` runs."""
    runs, values = [], sorted(members)
    first = previous = values[0]
    for value in values[1:] + [-1]:
        if value != previous + 1:
            runs.append(f"\\x{first:02x}" + (f"-\\x{previous:02x}" if previous != first else ""))
            first = value
        previous = value
    return "".join(runs)


def _reason(pattern: str, error: Exception) -> str:
    """Why RE2 refused `pattern`, in its words about the pattern as written (not the flags mailflow put in)."""
    try:
        re2.compile(pattern.encode("utf-8", "surrogateescape"), _options())
    except re2.error as e:
        error = e
    message = error.args[0] if error.args else error
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
    for found, construct in _UNSUPPORTED:
        if found.search(text):
            return f"{construct} is not supported (mailflow's pcre: runs on RE2: {text})"
    return f"bad regular expression: {text}"


def _bytewise(rewrite: Callable[[str], str], pattern: str) -> str:
    """`rewrite` applied to the pattern's bytes (each a character of the string it is given), as PCRE without UTF
    mode reads a pattern: a byte 0x85 inside a UTF-8 character is a blank to the x flag."""
    text = rewrite(pattern.encode("utf-8", "surrogateescape").decode("latin-1"))
    return text.encode("latin-1").decode("utf-8", "surrogateescape")


def _without_extended_blanks(pattern: str) -> str:
    """PCRE's x flag, which RE2 lacks: blanks (_EXTENDED_BLANKS, bytes) outside a character class and `#` to the end
    of the pattern left
    out; an escaped character, a class and \\Q…\\E are kept as written."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        char = pattern[i]
        if char == "\\" and pattern.startswith("\\Q", i):
            end = pattern.find("\\E", i + 2)
            end = n if end < 0 else end + 2
            out.append(pattern[i:end])
            i = end
        elif char == "\\":
            out.append(pattern[i:i + 2])
            i += 2
        elif char == "[":
            end = _class_end(pattern, i)
            out.append(pattern[i:end])
            i = end
        elif pattern.startswith("(?#", i):  # a comment group, left out later (_in_re2_syntax)
            end = pattern.find(")", i)
            end = n if end < 0 else end + 1
            out.append(pattern[i:end])
            i = end
        elif char == "#":
            break
        else:
            if char not in _EXTENDED_BLANKS:
                out.append(char)
            i += 1
    return "".join(out)


def _class_end(pattern: str, start: int) -> int:
    """The index after the character class opened at `start` (a `]` first in it is a member; `[:alpha:]` and
    escapes inside it are skipped whole); the pattern's end when it is not closed (RE2 then says so)."""
    i = start + 1
    if pattern.startswith("^", i):
        i += 1
    if pattern.startswith("]", i):
        i += 1
    while i < len(pattern):
        if pattern[i] == "\\":
            i += 2
        elif pattern.startswith("[:", i) and pattern.find(":]", i + 2) > 0:
            i = pattern.find(":]", i + 2) + 2
        elif pattern[i] == "]":
            return i + 1
        else:
            i += 1
    return len(pattern)


def _expand(result: str | tuple[Piece, ...], m) -> str:
    if isinstance(result, str):
        return result
    parts = [piece.encode("utf-8", "surrogateescape") if isinstance(piece, str) else (m.group(piece) or b"")
             for piece in result]
    return b"".join(parts).decode("utf-8", "surrogateescape")


def _key_bytes(key: str) -> bytes:
    try:
        return key.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate surrogateescape never makes: as the UTF-8 of its code point
        return key.encode("utf-8", "surrogatepass")


class PcreTable(RulesTable):
    parse = staticmethod(parse_pcre)

    def _non_utf8_value(self, key: str, value: str) -> str:
        raise LookupRetry(f"table {self.name}: key {key!r}: non-UTF-8 value {value!r}")

    def lookup_unchecked(self, key: str) -> str | None:
        """The answer as its bytes, each one that is not UTF-8 a surrogate: cleanup's checks take it (Postfix's
        cleanup does not UTF-8 check its maps)."""
        return lookup_rules(self._file.current(), _key_bytes(key), _expand)
