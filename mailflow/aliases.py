"""Parse aliases(5), ~/.forward and :include: files into frozen alias targets. Pure: text in, values out.

This module owns only the syntax. It reads no files, follows no :include:, looks up no user and expands
nothing; the table layer reads and reloads the files, and the local router expands.

Targets (frozen dataclasses; `Target` is their union):
- `AddressTarget(address)`: `user`, `user@domain` or `<user@domain>`; forwarded, and aliased again. `\\user` is
  the address `user`: Postfix's local drops the backslash when it reads the value (tok822_parse) and gives the name
  no meaning of its own (a user named in its own .forward gets its mailbox through local(8)'s .forward rules).
- `MailboxTarget(address)`: `\\\\user` (two backslashes; the tokenizer keeps one, and recipient.c's `\\user` branch
  takes it): that user's mailbox, with no alias lookup and no .forward (`address` without the backslashes). A
  name that still starts with a backslash (`\\\\\\\\user`, read as `\\\\user`) is kept unchecked: no user has it.
- `CommandTarget(command)`: `|command` or `"|command with spaces, or commas"`; `command` has no `|`.
- `FileTarget(path)`: `/absolute/path`; append to that file. Only a value starting with `/` is a file, as in
  Postfix's local: `mail/inbox`, `~/mbox` are addresses (and `./mbox` a bad one).
- `IncludeTarget(path)`: `:include:/absolute/path` (any case, optional space after the second colon).

Functions:
- `parse_aliases(text, filename) -> {name: (target, ...)}`: the whole aliases file.
- `parse_aliases_with_warnings(text, filename) -> (aliases, warnings)`: the same, plus `FILE: line N: ...` texts.
- `parse_forward(text, filename) -> (target, ...)`: a .forward file; may be empty.
- `parse_include(text, filename) -> (target, ...)`: an :include: file (the same syntax as .forward).
- `parse_value(text, source) -> (target, ...)`: one value list, as an alias table returns it.
- `alias_values(text, filename) -> {name: value text}`: an aliases file's entries, values unread (a table's view).
- `stored_value(value) -> str`: a value list as postalias stores it and `postalias -q` prints it: its tokens
  written again (Postfix's tok822_externalize: `a,b ,` is `a, b, `).
- `is_privileged(target) -> bool`: True for command, file and include targets.
- `format_aliases(aliases) -> str` / `format_target(target) -> str`: write back text that parses to the same map.

Syntax (Postfix aliases(5), compatible with sendmail):
- `name: value, value, ...`. A line that starts with whitespace continues the entry above it. Blank lines and
  lines whose first non-blank character is `#` are skipped anywhere, also inside a continued entry. `#` elsewhere
  is data (Postfix: only whole-line comments); a name holding `#`, `:`, `@` or whitespace must be quoted.
- Names are case-folded as table keys are (syntax.fold_key: `Straße` is `strasse`, as postalias stores it). As
  with Postfix's postalias, the first entry for a name counts; a later duplicate is ignored with a warning.
- Values are split at commas outside double quotes; empty items (`a, , b`, a trailing comma) are skipped. A value
  that is one whole quoted string is unquoted; inside quotes only `\\"` and `\\\\` are escapes, any other backslash
  is literal (in a command or a file name). A quoted name is read as Postfix's local reads it, every backslash
  escaping the next character: `"\\user"` is the address `user`, `"\\\\user"` (a backslash left) is the mailbox
  form, as `\\\\user` unquoted. A value with quotes in part
  (`"john doe"@example.com`) is kept verbatim as an address.
- Addresses must be RFC 5321 mailboxes (a bare `user` is checked as a local part); case is kept as written. An
  item that is not one as written is read as Postfix's local reads every value, with its RFC 822 parser
  (mailflow.header_addresses): `Joe <joe@x>` and `joe@x (Joe)` are joe@x, `a@x b@y` is two addresses, a group's
  name and its `;` are dropped. (Postfix splits commands and file names at blanks too, `|cmd arg` being `|cmd`
  and the address `arg`; here a command or a file name is the whole item, blanks and all.)

Failures: `AliasSyntaxError(filename, line, reason)`, a `ConfigError` whose str reads `FILE: line N: reason`,
for: a line without `:`, an empty name, an empty value list, an unterminated quote in a name (one in a value is
closed at its end, as Postfix's local closes it), `:include:` without an absolute path, an empty command, a bad
address, a control character (CR before LF is allowed), a continuation line with no entry above it. The first error
stops the parse: a bad file yields no map. (`alias_values` checks only what is no value's: names, `:`, lines.)

Contract for callers: privileged targets (`is_privileged`) may come only from the aliases file, a .forward or an
:include: file that the administrator allows (Postfix allow_mail_to_commands / allow_mail_to_files). Never build
a target from a recipient address a client sent: a recipient `"|cmd"@domain` is an AddressTarget at most.
Special names (`owner-NAME`, `postmaster`, `MAILER-DAEMON`) are ordinary names here; their meaning is the
router's. Duplicated targets inside one value list are kept; de-duplication and loop checks belong to expansion.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Union

from mailflow.address import BAD_DOMAIN, BAD_LOCAL_PART, mailbox_syntax_error
from mailflow.errors import ConfigError
from mailflow.header_addresses import value_addresses
from mailflow.syntax import COMMAND_BLANKS as BLANKS  # (Postfix's ISSPACE, as tables.files.BLANKS)
from mailflow.syntax import fold_key


@dataclass(frozen=True)
class AddressTarget:
    address: str


@dataclass(frozen=True)
class MailboxTarget:
    address: str


@dataclass(frozen=True)
class CommandTarget:
    command: str


@dataclass(frozen=True)
class FileTarget:
    path: str


@dataclass(frozen=True)
class IncludeTarget:
    path: str


Target = Union[AddressTarget, MailboxTarget, CommandTarget, FileTarget, IncludeTarget]
Aliases = dict[str, tuple[Target, ...]]


class AliasSyntaxError(ConfigError):
    """`FILE: line N: reason`; `line` is 1-based. `address_problem`: for a target refused as an address, why
    (mailbox_syntax_error's reason), else None."""

    def __init__(self, filename: str, line: int, reason: str, address_problem: str | None = None):
        super().__init__(filename, f"line {line}", reason)
        self.line = line
        self.address_problem = address_problem


def is_privileged(target: Target) -> bool:
    """Command, file and include targets run code or write files: allowed only from trusted files (see above)."""
    return isinstance(target, (CommandTarget, FileTarget, IncludeTarget))


# ---------------------------------------------------------------------------------------------- reading

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")  # tab is whitespace; "\n" never reaches it
_INCLUDE = ":include:"
_SPECIAL_STARTS = ("|", "/", "\\", ".", "~")  # a command, a file, a backslashed name, a relative path


class _Text:
    """One logical line: its text, and where each physical line starts, to name the line of a column."""

    def __init__(self, filename: str, lineno: int, text: str):
        self.filename, self.text = filename, text
        self._starts, self._linenos = [0], [lineno]

    def add(self, lineno: int, text: str) -> None:
        self._starts.append(len(self.text))
        self._linenos.append(lineno)
        self.text += text

    def line_at(self, offset: int) -> int:
        return self._linenos[bisect.bisect_right(self._starts, offset) - 1]

    def error(self, offset: int, reason: str, address_problem: str | None = None) -> AliasSyntaxError:
        return AliasSyntaxError(self.filename, self.line_at(offset), reason, address_problem)


def _physical_lines(text: str, filename: str):
    """(line number, line) for each line that is not blank and not a comment; control characters refused."""
    for number, line in enumerate(text.split("\n"), start=1):
        if line.endswith("\r"):
            line = line[:-1]
        bad = _CONTROL.search(line)
        if bad:
            raise AliasSyntaxError(filename, number, f"control character {ord(bad.group()):#04x}")
        stripped = line.strip(BLANKS)
        if stripped and not stripped.startswith("#"):
            yield number, line


def _closing_quote(text: str, start: int) -> int:
    """Index of the `"` closing the string opened at `start`, or -1."""
    i = start + 1
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in '"\\':
            i += 2
        elif text[i] == '"':
            return i
        else:
            i += 1
    return -1


def _unquote(inner: str) -> str:
    return re.sub(r'\\(["\\])', r"\1", inner)


def _split_values(line: _Text, start: int) -> list[tuple[int, str]]:
    """Split `line.text[start:]` at commas outside quotes: (offset, stripped item), empty items dropped. A quoted
    string never closed runs to the end of the value and is closed there, as Postfix's local reads it (tok822_scan:
    `"|/bin/x` is the command /bin/x, `"joe@x.test` the address joe@x.test)."""
    items, text, i, item_start, unclosed = [], line.text, start, start, False
    while i <= len(text):
        if i == len(text) or text[i] == ",":
            raw = text[item_start:i]
            if raw.strip():
                items.append((item_start + len(raw) - len(raw.lstrip()), raw.strip() + ('"' if unclosed else "")))
            item_start = i + 1
            i += 1
        elif text[i] == '"':
            end = _closing_quote(text, i)
            unclosed = end < 0
            i = len(text) if unclosed else end + 1
        else:
            i += 1
    return items


def _target(line: _Text, offset: int, item: str) -> Target:
    """Classify one value (already split and stripped)."""
    if item[0] == '"' and _closing_quote(item, 0) == len(item) - 1:
        read = re.sub(r"\\(.)", r"\1", item[1:-1]).strip()  # (as local(8)'s tokenizer reads a quoted string)
        if read.startswith("\\"):  # (`"\\user"`: a backslash left, recipient.c's mailbox branch)
            return _mailbox(line, offset, read[1:])
        item = _unquote(item[1:-1]).strip()
        if not item:
            raise line.error(offset, "empty value")
    if item.startswith("<") and item.endswith(">"):
        return _address(line, offset, item[1:-1].strip())
    if item.startswith("|"):
        command = item[1:].strip()
        if not command:
            raise line.error(offset, "empty command")
        return CommandTarget(command)
    if item[:len(_INCLUDE)].lower() == _INCLUDE:
        path = item[len(_INCLUDE):].strip()
        if not path.startswith("/"):
            raise line.error(offset, f":include: needs an absolute path, not {path!r}")
        return IncludeTarget(path)
    if item.startswith("/"):
        return FileTarget(item)
    if item.startswith("\\\\"):  # (the tokenizer keeps one backslash of two: recipient.c's mailbox branch)
        return _mailbox(line, offset, re.sub(r"\\(.)", r"\1", item)[1:])
    if item.startswith("\\"):
        return _address(line, offset, item[1:])  # (local(8): `\user` is `user`, tok822_parse drops the backslash)
    return _address(line, offset, item)


def _targets(line: _Text, offset: int, item: str) -> tuple[Target, ...]:
    """The targets of one comma-separated item: one (`_target`), or, for an item that is not one address as it
    is written, the addresses Postfix's local finds in it with its RFC 822 parser (tok822): `Joe <joe@x>` is
    joe@x, `joe@x (Joe)` too, `a@x b@y` is two, a group's name is dropped; an item in which that parser finds
    something that is no address keeps `_target`'s error."""
    try:
        return (_target(line, offset, item),)
    except AliasSyntaxError as error:
        if error.address_problem not in (BAD_LOCAL_PART, BAD_DOMAIN):
            raise  # (not an address, or a relative path, an empty command, ...)
        whole_quoted = item[0] == '"' and _closing_quote(item, 0) == len(item) - 1
        if item.startswith("\\") and not item.startswith("\\\\"):
            item = item[1:]  # (`\nobody (copy)` is `nobody (copy)`: local(8)'s tokenizer drops the backslash)
        if whole_quoted or item.startswith(_SPECIAL_STARTS) or item[:len(_INCLUDE)].lower() == _INCLUDE:
            raise
        found = value_addresses(item)
        if not found or None in found or any(_address_error(a) for a in found if a is not None):
            raise
        return tuple(AddressTarget(a) for a in found if a is not None)


def _mailbox(line: _Text, offset: int, name: str) -> MailboxTarget:
    """The mailbox form's name, its one backslash taken off by recipient.c. A name that still starts with one
    (`\\\\\\\\user` read as `\\\\user`) is no address, but local(8) takes it: no user has it, so it bounces `5.1.1
    unknown user: "\\user"` (not a bad alias value that defers the whole alias)."""
    if name.startswith("\\") and name.isprintable():
        return MailboxTarget(name)
    return MailboxTarget(_address(line, offset, name).address)


def _address(line: _Text, offset: int, address: str) -> AddressTarget:
    reason = _address_error(address)
    if reason:
        raise line.error(offset, f"bad address {address!r}: {reason}", address_problem=reason)
    return AddressTarget(address)


def _address_error(address: str) -> str | None:
    if not address:
        return "empty address"
    # A bare local name is checked as the local part of a mailbox; the domain here is only a placeholder.
    return mailbox_syntax_error(address if _has_domain(address) else address + "@localhost")


def _has_domain(address: str) -> bool:
    """An '@' outside quoted strings (`"a@b"` alone is a local part)."""
    return "@" in re.sub(r'"(?:\\.|[^"\\])*"', "", address)


def _values(line: _Text, start: int) -> tuple[Target, ...]:
    return tuple(t for offset, item in _split_values(line, start) for t in _targets(line, offset, item))


def _name(line: _Text) -> tuple[str, int]:
    """The entry's name (folded, as the table's keys: syntax.fold_key) and the offset just after its colon."""
    text = line.text
    if text.startswith('"'):
        end = _closing_quote(text, 0)
        if end < 0:
            raise line.error(0, "unterminated quote")
        name = _unquote(text[1:end])
        rest = text[end + 1:]
        colon = end + 1 + len(rest) - len(rest.lstrip())
        if colon >= len(text) or text[colon] != ":":
            raise line.error(end, "missing ':' after the quoted name")
    else:
        colon = text.find(":")
        if colon < 0:
            raise line.error(0, "missing ':' (expected 'name: value, ...')")
        name = text[:colon].strip(BLANKS)
        if any(c in BLANKS for c in name) or "@" in name or '"' in name:
            raise line.error(0, f"name {name!r} must be quoted (whitespace, '@' or '\"'), or is missing its ':'")
    if not name.strip():
        raise line.error(0, "empty name")
    return fold_key(name), colon + 1


def _logical_lines(text: str, filename: str):
    current: _Text | None = None
    for number, physical in _physical_lines(text, filename):
        if physical[0] in BLANKS:  # (ASCII, as Postfix's readllines: a line starting with U+00A0 is an entry)
            if current is None:
                raise AliasSyntaxError(filename, number, "continuation line without an entry above it")
            current.add(number, physical)
            continue
        if current is not None:
            yield current
        current = _Text(filename, number, physical)
    if current is not None:
        yield current


def _entries(text: str, filename: str) -> tuple[list[tuple[_Text, str, int]], list[str]]:
    """(logical line, name, offset of its values) per entry, first entry per name; plus the duplicate warnings."""
    entries: list[tuple[_Text, str, int]] = []
    seen_at: dict[str, int] = {}
    warnings: list[str] = []
    for line in _logical_lines(text, filename):
        name, start = _name(line)
        if not _split_values(line, start):
            raise line.error(start, f"no values for {name!r}")
        first = line.line_at(0)
        if name in seen_at:
            warnings.append(f"{filename}: line {first}: duplicate entry {name!r} (first at line {seen_at[name]}); "
                            "this one is ignored")
            continue
        seen_at[name] = first
        entries.append((line, name, start))
    return entries, warnings


def parse_aliases_with_warnings(text: str, filename: str) -> tuple[Aliases, list[str]]:
    entries, warnings = _entries(text, filename)
    return {name: _values(line, start) for line, name, start in entries}, warnings


def alias_values(text: str, filename: str) -> dict[str, str]:
    """{name: its value list as written} for an alias table: the file's structure is checked (names, colons,
    continuations, control characters, an empty value list), its values are not. As Postfix's local, a value is
    read when its alias is expanded (`parse_value`), so one value mailflow cannot take fails only that alias."""
    return {name: line.text[start:].strip() for line, name, start in _entries(text, filename)[0]}


def stored_value(value: str) -> str:
    """An alias table's value list as postalias(1) stores it, and `postalias -q` prints it: the value's tokens, as
    Postfix's tokenizer finds them (tok822_scan), written again as tok822_externalize writes a token list. Blanks
    between tokens go; one space comes after each comma (a trailing one too: `x,` is `x, `, `x,,y` is `x, , y`),
    before a `<`, and between two words (atoms, quoted strings, comments, literals), none around other operators
    (`x; y` is `x;y`, `grp: x` is `grp:x`, `<  j@x  >` is `<j@x>`). A comment is kept as written; a quoted string
    and a literal have their backslashes read and written again (`"x\\"y"` stays, `"a\\b"` is `"ab"`); an atom
    has them read (`\\a` is `a`) and is quoted when what is left holds an operator or a blank (`\\\\a` is
    `"\\\\a"`). (Only for showing: local(8) reads the value as written, aliases.parse_value.)"""
    tokens = _scan(value)
    shown: list[str] = []
    for n, (kind, text) in enumerate(tokens):
        following = tokens[n + 1][0] if n + 1 < len(tokens) else ""
        blank = kind == "," or following == "<" or (kind in _WORDS and following in _WORDS)
        shown.append(text + " " if blank else text)
    return "".join(shown)


_SCAN_BLANKS = " \t\r\n"  # what the tokenizer skips between tokens, and reads as a space inside one
_OPERATORS = '|%!()<>@,;:\\".[]'  # tok822_scan's one-character operators (RFC 822 specials, `|`, `%`, `!`)
_WORDS = ("atom", "quoted", "comment", "literal")  # the tokens that are no operator


def _scan(text: str) -> list[tuple[str, str]]:
    """(kind, the token as tok822_externalize writes it) of each token, in order; kind is one of _WORDS or the
    operator itself. Never raises: an unclosed quote, literal or comment runs to the end (and is closed there,
    but for a comment), as tok822_scan takes it."""
    tokens: list[tuple[str, str]] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c in _SCAN_BLANKS:
            i += 1
        elif c == "(":
            end = _comment_end(text, i)
            tokens.append(("comment", text[i:end]))
            i = end
        elif c in '"[':
            inner, i = _collect(text, i + 1, '"' if c == '"' else "]")
            i += 1  # (past the closing character, if any)
            tokens.append(("quoted", _quoted(inner)) if c == '"' else ("literal", "[" + _escaped(inner, "\\") + "]"))
        elif c in _OPERATORS and c != "\\":
            tokens.append((c, c))
            i += 1
        else:
            atom, i = _collect(text, i, _SCAN_BLANKS + _OPERATORS)
            plain = not any(ch in _OPERATORS or ch == " " or ch < " " or ch == "\x7f" for ch in atom)
            tokens.append(("atom", atom) if plain else ("quoted", _quoted(atom)))
    return tokens


def _collect(text: str, i: int, stops: str) -> tuple[str, int]:
    """The characters from `i` up to one of `stops` or the end, a backslash taking the next one whatever it is and
    going, a blank read as a space (Postfix's COLLECT); and the index where it stopped."""
    collected: list[str] = []
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 1
            if i == len(text):
                break
            c = text[i]
        elif c in stops:
            break
        collected.append(" " if c in _SCAN_BLANKS else c)
        i += 1
    return "".join(collected), i


def _comment_end(text: str, start: int) -> int:
    """The index after the comment opened at `start`: its parentheses nest, a backslash escapes the next
    character; the end of the text if it is never closed."""
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        i += 1
        if c == "\\":
            i += 1
        elif c in "()":
            depth += 1 if c == "(" else -1
            if depth == 0:
                break
    return min(i, len(text))


def _quoted(text: str) -> str:
    return '"' + _escaped(text, '"\\') + '"'


def _escaped(text: str, special: str) -> str:
    return "".join("\\" + c if c in special else c for c in text)


def parse_aliases(text: str, filename: str) -> Aliases:
    return parse_aliases_with_warnings(text, filename)[0]


def parse_forward(text: str, filename: str) -> tuple[Target, ...]:
    """Each non-comment line is a comma-separated value list; lines do not continue one another."""
    return tuple(target for line in parse_lines(text, filename) for target in line)


def parse_lines(text: str, filename: str) -> tuple[tuple[Target, ...], ...]:
    """`parse_forward`'s targets line by line (each non-comment line's own), for a reader that stops after a line
    (local(8) reads no further line of a .forward or :include: file once one defers)."""
    return tuple(_values(_Text(filename, number, physical), 0) for number, physical in _physical_lines(text, filename))


def parse_include(text: str, filename: str) -> tuple[Target, ...]:
    return parse_forward(text, filename)


def parse_value(text: str, source: str) -> tuple[Target, ...]:
    """One entry's value list as a lookup table returns it (`alice, bob@example.com, |"cmd"`)."""
    return _values(_Text(source, 1, text), 0)


# ---------------------------------------------------------------------------------------------- writing

_PLAIN = re.compile(r"[^\s\",#:@<>\\]+")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_target(target: Target) -> str:
    """One value as it would appear on the right of an alias entry."""
    if isinstance(target, CommandTarget):
        return _quote("|" + target.command)
    if isinstance(target, FileTarget):
        return target.path if _PLAIN.fullmatch(target.path) else _quote(target.path)
    if isinstance(target, IncludeTarget):
        return _quote(_INCLUDE + target.path)
    if isinstance(target, MailboxTarget):  # (read back, each backslash escapes the next; a name that is not a
        if _PLAIN.fullmatch(target.address):  # plain atom is quoted, or `\\\\x y, z@evil.test` reads as two)
            return "\\\\" + target.address
        return _quote("\\" + target.address)
    return f"<{target.address}>"


def format_aliases(aliases: Aliases) -> str:
    """Text for `aliases` that `parse_aliases` reads back as the same map; one value per continuation line."""
    out = []
    for name, targets in aliases.items():
        shown = name if _PLAIN.fullmatch(name) else _quote(name)
        out.append(f"{shown}: " + ",\n    ".join(format_target(t) for t in targets) + "\n")
    return "".join(out)
