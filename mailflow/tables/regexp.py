"""`regexp:/path` tables (regexp_table(5)) on RE2: no pattern backtracks.

`/pattern/flags result`, `!/pattern/ result`, `if /pattern/` … `endif`; the first match wins; results as Postfix's
mac_parse reads them (parse_result, shared with pcre:): `$12`, `${12}`, `$(12)` group 12, `$$` a dollar, `$0`, `$1st`,
a group the pattern lacks or a lone `$` a bad line; flags `i` (toggles case-insensitive, on by default) and `m`
(multi-line). Patterns are RE2 syntax (a superset of POSIX ERE without back-references), matched leftmost-longest as
POSIX regexec does. The key is matched as it is (`fixed = False`: `find` asks the full key only). Reloaded like
texthash (files.Reloading). A key may hold line breaks (header_checks: a folded header with its breaks kept, as
Postfix's cleanup gives it): `.` matches a break too, unless the rule has the `m` flag (REG_NEWLINE), as in Postfix's
POSIX regexec; a key without a break is answered alike either way. A key holding surrogates (bytes that were not
UTF-8, as Python's surrogateescape gives them: cleanup's header and body checks, `mailflow table query` reading its
keys, sendmail's header values) is matched with each one as U+FFFD, a character `.` matches as Postfix's byte-wise
regexec matches the byte (RE2's UTF-8 mode matches no such byte but with \\C); a `$n` over it gives the byte back to
cleanup's checks (`lookup_unchecked`, as Postfix's cleanup writes it) and U+FFFD to every other caller (`lookup`).

Cost: no backtracking (`/^(a+)+$/` against `aaaa…b` answers at once); one pass of each RE2 set (SET_RULES of a
file's rules, fewer where RE2 refused a set: _Prefilter) tells which rules match, then only the rules named (and the
`if`s and negated rules) are looked at, and only the answering rule is searched for its groups (100 000 rules: 0.2 ms
a miss on a short key). A pass is linear in the key while RE2's DFA fits its memory budget (about 5 us for a 20-rule
miss on a short key), and costs key length x rules once it does not (300 rules `/^Subject:.*wordN.{0,40}x/`: 0.2 ms
on a 3.3 KB key, 39 ms on 4.4 KB; 2000 rules `/^Subject:.*\\bwordN\\b/`: about 1 s on a 100 KB one); a rule no set
of MIN_SET_RULES could hold is searched in turn. Building a set holds the GIL, in a worker thread too (RE2's
compile: 2 to 40 ms for 500 patterns that fit, about 0.1 s for a set RE2 refuses, whatever its size).
The search releases the GIL: cleanup matches a key longer than content_checks.LONG_KEY in a worker thread.

`if` and `endif` are the words in any case not followed by an ASCII letter or digit (files.pattern_keyword, which
`config import`'s scan uses too); text after `endif` is a bad line (Postfix ignores it with a warning).

Failure behaviour: a bad pattern, flag or `$n` makes the whole table fail with `LookupRetry` naming file:line.
"""
from __future__ import annotations

import heapq
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

import re2

from mailflow.tables.files import FromFile, Reloading, logical_lines, pattern_keyword, split_pattern_rule

_SURROGATES = re.compile("[\ud800-\udfff]")


class _Rule:
    """One regexp_table line: a match rule (result set) or an `if` (end = index of its endif)."""

    def __init__(self, regex, negate: bool, result: str | None):
        self.regex, self.negate, self.result, self.end = regex, negate, result, 0
        self.in_set = False  # its pattern is in one of the file's prefilter sets


class _Rules:
    """A file's rules (None for an endif), their prefilter sets, and the positions of the rules a lookup visits
    whatever the sets say (`always`, in order): an `if` or a negated rule (a miss decides for them too), a rule no
    set holds (searched in turn)."""

    def __init__(self, rules: list[_Rule | None], prefilter: "_Prefilter"):
        self.rules, self.prefilter = rules, prefilter
        self.always = [i for i, rule in enumerate(rules)
                       if rule is not None and (rule.result is None or rule.negate or not rule.in_set)]


# A part of the result: literal text, or the number of a group.
Piece = str | int
_MACRO = re.compile(r"\$(?:\$|\{([^}]*)\}|\(([^)]*)\)|([A-Za-z0-9_]*))")


def parse_regexp(source: str) -> _Rules:
    """The rules (None for an endif) and their prefilter sets."""
    return parse_rules(source, _parse_pattern, parse_result, _options(ignore_case=False))


def parse_rules(source: str, parse_pattern: Callable[[int, str], tuple[Any, bool, str]],
                parse_result: Callable[[int, str, Any, bool], Any], set_options) -> _Rules:
    """A file of regexp_table(5) or pcre_table(5) rules: the `if`/`endif` structure is the same for both; the
    types differ in `parse_pattern(line number, text) -> (compiled pattern, negated, the rest of the text)` and
    `parse_result(line number, text, compiled pattern, negated) -> the result as lookups expand it` (each raises
    ValueError("line N: …")), and in the RE2 options of the prefilter set. Raises RuleErrors naming every refused
    line, as Postfix warns about each line it skips (each `if` left without `endif` too)."""
    rules: list[_Rule | None] = []
    open_ifs: list[tuple[int, _Rule]] = []  # the `if` rules not yet ended, with their line numbers
    errors: list[str] = []  # every refused line, not only the first: a migrated file is fixed in one pass
    for number, line in logical_lines(source):
        keyword, text = pattern_keyword(line)
        if keyword == "endif":
            if not open_ifs:
                errors.append(f"line {number}: endif without if")
                continue
            if text:  # (Postfix: "ignoring extra text after ENDIF"; the block ends there all the same)
                errors.append(f"line {number}: text after endif")
            open_ifs.pop()[1].end = len(rules)
            rules.append(None)  # the endif itself: nothing to do
            continue
        is_if = keyword == "if"
        try:
            regex, negate, rest = parse_pattern(number, text)
            if is_if and rest:
                raise ValueError(f"line {number}: text after the 'if' pattern")
            if not is_if and not rest:
                raise ValueError(f"line {number}: no result after the pattern")
            result = None if is_if else parse_result(number, rest, regex, negate)
        except ValueError as e:
            errors.append(str(e))
            if not is_if:
                continue
            regex, negate, result = None, False, None  # a bad `if` still opens a block: its endif is no error
        rule = _Rule(regex, negate, result)
        if is_if:
            open_ifs.append((number, rule))
        rules.append(rule)
    errors += [f"line {number}: if without endif at the end of the file" for number, _ in open_ifs]
    if errors:
        raise RuleErrors(errors)
    return _Rules(rules, _Prefilter(rules, set_options))


class RuleErrors(ValueError):
    """Every line of a regexp_table(5) or pcre_table(5) file its type refuses (`lines`: "line N: reason" each, in
    file order); the message names them all."""

    def __init__(self, lines: list[str]):
        super().__init__("; ".join(lines))
        self.lines = lines


# each `$` error's hint: lines earlier mailflow releases took as they were (`US$ 5`, `$x`, `$0`, `$1st`) fail the
# table now, as Postfix skips them (docs/config.md, "Upgrading: `$` in a regexp: or pcre: result")
LITERAL_DOLLAR = "; write $$ for a literal $"


def parse_result(number: int, text: str, regex, negate: bool) -> str | tuple[Piece, ...]:
    """The result as Postfix's mac_parse and dict_regexp_prescan / dict_pcre_prescan read it (both types): a plain
    string when it names no group (`$$` made `$`), else its literal parts and group numbers. `$12` is group 12;
    `$0`, a group the pattern lacks, `$1st` and a `$` with no name are bad lines."""
    pieces: list[Piece] = []
    position = 0
    for m in _MACRO.finditer(text):
        pieces.append(text[position:m.start()])
        position = m.end()
        if m.group(0) == "$$":
            pieces.append("$")
            continue
        name = next((g for g in m.groups() if g is not None), "")
        if not name:
            raise ValueError(f"line {number}: bad replacement syntax: a $ without a group number{LITERAL_DOLLAR}")
        if not name.isdigit() or not name.isascii():
            raise ValueError(f"line {number}: non-numeric replacement index {name!r}{LITERAL_DOLLAR}")
        if int(name) < 1 or int(name) > regex.groups:
            raise ValueError(f"line {number}: out of range replacement index {name!r} "
                             f"(the pattern has {regex.groups} group(s)){LITERAL_DOLLAR}")
        if negate:
            raise ValueError(f"line {number}: ${name} in the result of a negated (!) pattern")
        pieces.append(int(name))
    pieces.append(text[position:])
    if all(isinstance(piece, str) for piece in pieces):
        return "".join(str(piece) for piece in pieces)
    return tuple(piece for piece in pieces if piece != "")


SET_RULES = 500  # patterns in a file's first RE2 sets: a compile holds the GIL (2000 long ones: 0.1 s, 500: 40 ms)
MIN_SET_RULES = 32  # a refused set is split in halves down to this size; a set refused at it is searched rule by rule


class _Prefilter:
    """RE2::Sets of the patterns, SET_RULES each at first: one pass of each over the key tells which rules match,
    so a lookup makes one call per set (then one `search` for the groups of the rule that answers; a pass's cost
    still grows with its rules on a long key: the module doc). A set RE2 refuses to build (its memory budget: 2000
    rules `/^X-Spam-N: .*(yes|sure)[a-z]{0,20}end/` are past it, 500 are not) is split in halves and each built
    again, down to MIN_SET_RULES; only the rules of a set refused at that size are left out (`in_set` False) and
    searched in turn."""

    def __init__(self, rules: list[_Rule | None], options):
        self._sets: list[tuple[Any, list[int]]] = []  # a set, and the position in `rules` of each of its patterns
        held = [(i, rule) for i, rule in enumerate(rules) if rule is not None]
        for start in range(0, len(held), SET_RULES):
            self._add_set(held[start:start + SET_RULES], options)

    def _add_set(self, chunk: list[tuple[int, _Rule]], options) -> None:
        """`chunk`'s patterns as one set, or (RE2 refusing it) as sets of each half, down to MIN_SET_RULES."""
        patterns = re2.Set.SearchSet(options)
        try:
            for _, rule in chunk:
                patterns.Add(rule.regex.pattern)  # (in order: the set's index n is the chunk's n-th rule)
            patterns.Compile()
        except re2.error:
            if len(chunk) > MIN_SET_RULES:
                half = len(chunk) // 2
                self._add_set(chunk[:half], options)
                self._add_set(chunk[half:], options)
            return
        for _, rule in chunk:
            rule.in_set = True
        self._sets.append((patterns, [i for i, _ in chunk]))

    def matching(self, key) -> set[int]:
        """The positions of the rules of the sets whose pattern matches `key`."""
        return {positions[n] for patterns, positions in self._sets for n in patterns.Match(key) or ()}


def _parse_pattern(number: int, text: str) -> tuple[Any, bool, str]:
    """`!/pattern/flags rest` -> (compiled pattern, negated, rest), as dict_regexp_get_pat reads it."""
    rule = split_pattern_rule(number, text)
    ignore_case, multi_line = True, False
    for flag in rule.flags:
        if flag == "i":
            ignore_case = not ignore_case
        elif flag == "m":
            multi_line = not multi_line
        else:
            raise ValueError(f"line {number}: unknown or unsupported flag {flag!r} (mailflow has i, m)")
    return _compile(number, rule.pattern, ignore_case, multi_line), rule.negated, rule.rest


def _options(*, ignore_case: bool) -> "re2.Options":
    options = re2.Options()
    options.case_sensitive = not ignore_case
    options.longest_match = True
    options.log_errors = False
    return options


def _compile(number: int, pattern: str, ignore_case: bool, multi_line: bool):
    """An RE2 pattern: linear-time matching (no backtracking), POSIX leftmost-longest semantics. The flags
    are written into the pattern, so that the prefilter set (one options object for all) sees them too: `.`
    matches a line break (RE2's `s`) as in POSIX regexec without REG_NEWLINE, which the `m` flag asks for."""
    flags = ("i" if ignore_case else "") + ("m" if multi_line else "s")
    try:
        return re2.compile((f"(?{flags})" if flags else "") + pattern, _options(ignore_case=False))
    except re2.error as e:
        reason = e.args[0].decode("utf-8", "replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise ValueError(f"line {number}: bad regular expression: {reason}") from None


def _expand(result: str | tuple[Piece, ...], m) -> str:
    if isinstance(result, str):
        return result
    return "".join(piece if isinstance(piece, str) else (m.group(piece) or "") for piece in result)


def _expand_from(result: str | tuple[Piece, ...], m, key: str) -> str:
    """`result` with each group's text taken from `key` at the group's span (`m` matched a copy of `key` of the
    same length, its surrogates each U+FFFD)."""
    if isinstance(result, str):
        return result
    return "".join(piece if isinstance(piece, str) else key[m.start(piece):m.end(piece)] if m.start(piece) >= 0
                   else "" for piece in result)


class RulesTable(FromFile, ABC):
    """What regexp: and pcre: tables share: the file's rules (`parse`, reloaded as files.Reloading), `lookup` on
    top of the subclass's `lookup_unchecked`, and what an answer holding surrogates (bytes that are not UTF-8)
    becomes for every caller but cleanup's checks (`_non_utf8_value`)."""
    fixed = False
    blocking = False  # RE2 answers from memory; a long key's cost is the caller's to move off the loop (LONG_KEY)
    parse: Callable[[str], _Rules]  # the file's text to its rules

    def __init__(self, name: str, path: Path, clock: Callable[[], float]):
        self.name = name
        self._file = Reloading(name, path, clock, self.parse)

    def lookup(self, key: str) -> str | None:
        value = self.lookup_unchecked(key)
        if value is not None and not value.isascii() and _SURROGATES.search(value):
            return self._non_utf8_value(key, value)
        return value

    @abstractmethod
    def lookup_unchecked(self, key: str) -> str | None:
        """The answer as cleanup's header and body checks take it: surrogates (bytes that are not UTF-8) kept."""

    @abstractmethod
    def _non_utf8_value(self, key: str, value: str) -> str:
        """What `lookup` answers for `value` (from `key`) when it holds surrogates."""


class RegexpTable(RulesTable):
    parse = staticmethod(parse_regexp)

    def _non_utf8_value(self, key: str, value: str) -> str:
        return _SURROGATES.sub("\ufffd", value)  # (a `$n` of a key's byte that is not UTF-8: no reply carries it)

    def lookup_unchecked(self, key: str) -> str | None:
        """The answer with each `$n` taken from `key` as it came: a byte that is not UTF-8 (a surrogate) goes back
        as that surrogate, as Postfix's cleanup writes the byte back (it was matched as U+FFFD, one character each:
        the spans are the same). Cleanup's header and body checks take it (content_checks.lookup_action)."""
        if key.isascii() or not _SURROGATES.search(key):
            return lookup_rules(self._file.current(), key, _expand)
        return lookup_rules(self._file.current(), _SURROGATES.sub("\ufffd", key),
                            lambda result, m: _expand_from(result, m, key))


def lookup_rules(parsed: _Rules, key, expand: Callable[[Any, Any], str]) -> str | None:
    """The first applying rule's result, `expand(result, match)` when the rule has groups to fill in (a key of
    the type the patterns take: str for regexp, bytes for pcre). Only the rules the sets say match and those
    visited always (`_Rules.always`) are looked at: a rule that is none of them cannot apply (100 000 rules walked
    one by one took 10 ms a key, with the sets' answer known)."""
    rules = parsed.rules
    matching = parsed.prefilter.matching(key)
    skip_to = 0  # past an `if` that does not apply: its block's rules are not looked at
    previous = -1  # (an `if` or negated rule a set names comes twice: in `always` and in `matching`)
    for i in heapq.merge(parsed.always, sorted(matching)):
        rule = rules[i]
        if i < skip_to or i == previous or rule is None:
            continue
        previous = i
        if not rule.in_set:
            m = rule.regex.search(key)
        elif i not in matching:
            m = None
        elif rule.result is None or rule.negate:
            m = True  # it matches, and no groups are needed (an `if`, or a negated rule)
        else:
            m = rule.regex.search(key)
        if (m is None) != rule.negate:  # this rule does not apply
            if rule.result is None:
                skip_to = rule.end + 1  # skip the if block
            continue
        if rule.result is not None:
            return expand(rule.result, m) if m is not None else rule.result
    return None
