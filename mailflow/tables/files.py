"""File-backed tables re-read when their file changes, and the `texthash:` type (postmap(1) input, no database).

- `Reloading(name, path, clock, parse)`: a file parsed into a value, re-read when its stamp (device, inode, size,
  mtime, ctime) changes (checked at most once per RELOAD_INTERVAL of the injected clock); on a running event loop
  the re-read happens in a worker thread while lookups go on answering from the previous contents.
- `FromFile`: what the tables read from a file share (`load()`, `contents()`: the parsed file held now;
  `unchanged()`: whether those are the file's as it is now, so a reload may keep the table: TableCache). A reload
  is the operator's way to have a table read again (Postfix's remedy for a changed regexp or pcre file), so
  `unchanged()` trusts a stamp only as far as it can: it opens the file to look (an NFS client's stat() may answer
  from its attribute cache for up to a minute; the open revalidates it), compares it with the stamp of the
  descriptor the contents were read from, and says no for a stamp not clearly older than the start of that read
  (mtime or ctime within RACY_MARGIN of it, or after: a same-size rewrite within the file system's timestamp tick
  leaves the stamp as it was, as git's "racily clean" entries). That costs one read more at the first reload right
  after an edit; the check of every RELOAD_INTERVAL keeps to its stat().
- `logical_lines(text)`: postmap(1) input rules (blank and `#` lines skipped, a line starting with whitespace
  continues the previous one); shared with the regexp, pcre and sqlite parsers.
- `split_pattern_rule(number, text)`: a regexp: or pcre: rule's `!`s, pattern, flags and result, as Postfix reads
  them (the one delimiter scanner of both types and of the import's scan).
- `pattern_keyword(line)`: whether a regexp: or pcre: line is an `if` or an `endif` (the one test of both types
  and of the import's scan).
- `split_key(line)`: a line's key (or cidr: pattern) and value, split at the first blank.
- `table_file_entries(kind, text)`: (line, key or pattern, value) of each entry of a texthash:, regexp:, pcre: or
  cidr: file (SCANNED_TABLE_FILES) as written, `$n` not substituted: what `config import` scans for routes to relay.
- `texthash:/path`: `key value` lines; keys case-insensitive (syntax.fold_key, Postfix's Unicode case folding);
  first of duplicate keys wins. With `aliases`, the
  file is in aliases(5) format (`name: value, value`, mailflow.aliases), as alias_maps files are.
  `TexthashTable.load()` reads the file now (TableCache.preload calls it off the loop); `entries()` lists them
  all (`mailflow table dump`, postmap -s).

Failure behaviour: a missing or unreadable file, one that is not a regular file (a FIFO, /dev/zero) or is larger
than mailflow.files.TABLE_LIMIT, or a malformed line, makes the whole table fail with
`LookupRetry` naming file:line until fixed: a half-read table would answer wrongly.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Generic, NamedTuple, TypeVar

from mailflow.errors import LookupRetry
from mailflow.files import TABLE_LIMIT, read_regular_file_stat, stat_revalidated
from mailflow.syntax import fold_key

RELOAD_INTERVAL = 1.0
RACY_MARGIN = 1_000_000_000  # ns: a read's stamp is trusted by a reload once its mtime and ctime are older than this
#                              before the read's start (a coarse file system's timestamp tick: a second)


T = TypeVar("T")


class Reloading(Generic[T]):
    """A file parsed into a value, re-read when its stamp (_signature) changes (checked at most once per
    RELOAD_INTERVAL of `clock`). `current()` returns the value or raises LookupRetry while the file is
    unreadable or bad. `parse(text)` raises ValueError("line N: …").

    On a running event loop the check and the re-read happen in a worker thread: `current()` goes on
    answering from the previous contents until the new ones are parsed. Elsewhere (no loop in this thread),
    and while the table is failing (there are no good contents to answer from), they happen in the caller. The state is
    one tuple, replaced whole, so a reader never sees half of it."""

    def __init__(self, name: str, path: Path, clock: Callable[[], float], parse: Callable[[str], T]):
        self._name, self._path, self._clock, self._parse = name, path, clock, parse
        self._lock = threading.Lock()
        self._checked = 0.0  # when the file was last looked at (once there is a state)
        # (value, signature, error, settled: the signature shows any write since the read began: _settled)
        self._state: tuple[Any, tuple | None, str | None, bool] | None = None
        self._pending = False  # a re-read is under way in a worker thread

    def load(self) -> None:
        """Check the file and re-read it if it changed, in the calling thread."""
        with self._lock:
            self._checked = self._clock()
            self._state = self._read(self._state)

    def contents(self) -> T | None:
        """The value now held, None before the first read or while the file fails (a retiring generation keeps
        it past the table, to drop it a piece at a time: mailflow.tables.retire)."""
        state = self._state
        return state[0] if state is not None else None

    def unchanged(self) -> bool:
        """Whether the value held was read, without error, from the file as it is now: the same stamp (device,
        inode, size, mtime and ctime) as the descriptor it was read from, looked at now through an open of the file
        (files.stat_revalidated, in the caller's thread), and that stamp clearly older than the read (see the module
        docstring). False before the first read, while the file fails, or when it cannot be looked at."""
        state = self._state
        if state is None or state[2] is not None or not state[3]:
            return False
        try:
            return _signature(stat_revalidated(self._path)) == state[1]
        except OSError:
            return False

    def current(self) -> T:
        if self._state is None:
            self.load()  # the first lookup of a table nobody preloaded
        elif self._clock() - self._checked >= RELOAD_INTERVAL:
            self._checked = self._clock()
            if self._state[2] is None:
                self._refresh()
            else:
                self.load()  # nothing good to answer from meanwhile: a failed table is retried in the caller
        assert self._state is not None  # load() set it
        value, _, error, _ = self._state
        if error is not None:
            raise LookupRetry(error)
        return value

    def _refresh(self) -> None:
        import asyncio  # (here: the CLI's tables, sendmail's among them, never need it, and it costs ~20 ms to load)

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.load()  # no event loop in this thread (the CLI, a lookup worker): nothing to hold up
            return
        if not self._pending:
            self._pending = True
            loop.run_in_executor(None, self.load).add_done_callback(self._reloaded)

    def _reloaded(self, future) -> None:
        self._pending = False
        if not future.cancelled() and future.exception() is not None:
            self._state = (None, None, f"table {self._name}: cannot reload {self._path}: {future.exception()}", False)

    def _read(self, previous):
        started = time.time_ns()  # (the file's clock: see _settled)
        try:
            if previous is not None and previous[2] is None and _signature(os.stat(self._path)) == previous[1]:
                return previous
            # the stamp of the descriptor read (a change after its fstat is seen at the next check)
            data, st = read_regular_file_stat(self._path, TABLE_LIMIT, null_is_empty=True)
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:  # RefusedFile too: a FIFO or /dev/zero named as a table
            return (None, None, f"table {self._name}: cannot read {self._path}: {getattr(e, 'strerror', None) or e}",
                    False)
        try:
            return self._parse(text), _signature(st), None, _settled(st, started)
        except ValueError as e:
            return None, None, f"table {self._name}: {self._path}, {e}", False


class FromFile:
    """What a table read into memory from a file (texthash, regexp, pcre, cidr: its Reloading in `_file`) offers
    beside its lookups."""
    _file: Reloading

    def load(self) -> None:
        """Read the file now, in the calling thread (a server's preload, off the loop)."""
        self._file.load()

    def contents(self):
        """The parsed file now held (None while there is none): see Reloading.contents."""
        return self._file.contents()

    def unchanged(self) -> bool:
        """Its parsed file is the file as it is now (see Reloading.unchanged): a reload may keep the table."""
        return self._file.unchanged()

    @property
    def reading(self) -> Reloading:
        """What holds the parsed file, re-reading it when it changes: a retired table's contents are taken from it
        once the table is gone (mailflow.tables.retire), whatever read is the last by then."""
        return self._file


def _signature(st: os.stat_result) -> tuple:
    """A file's identity and stamp: another file put in its place (a rename over it, another file system) changes
    the first two, a write the rest; ctime too, which no one sets back as `touch -d` sets mtime back."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _settled(st: os.stat_result, started: int) -> bool:
    """Whether a stamp read at `started` (time.time_ns()) would show any write made since: its mtime and ctime
    older than that by RACY_MARGIN (a write just after the read, within the file system's timestamp tick, may
    leave both as they were; an mtime set ahead is never settled, and the file is read at every reload)."""
    return max(st.st_mtime_ns, st.st_ctime_ns) < started - RACY_MARGIN


def logical_lines(text: str) -> list[tuple[int, str]]:
    """postmap(1) input rules as Postfix's readllines reads them: a line ends at LF; blank and `#` lines are skipped;
    a line starting with a blank continues the previous logical line. A blank is BLANKS (ASCII, Postfix's
    ISSPACE): a line starting with U+00A0 or U+2003 starts an entry, and one is never cut or trimmed at U+2028 or
    U+00A0 (str.splitlines and str.strip would). Returns [(first line number, text)]."""
    lines: list[tuple[int, str]] = []
    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.strip(BLANKS)
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in BLANKS:
            if not lines:
                raise ValueError(f"line {number}: a continuation line (starting with whitespace) comes first")
            first, previous = lines[-1]
            lines[-1] = (first, previous + line.rstrip(BLANKS))
        else:
            lines.append((number, line.rstrip(BLANKS)))
    return lines


SCANNED_TABLE_FILES = ("texthash", "regexp", "pcre", "cidr")


def table_file_entries(kind: str, text: str) -> list[tuple[int, str, str]]:
    """(line number, key or pattern, value) of each entry of a `kind` file (SCANNED_TABLE_FILES); the `if` and
    `endif` lines of a regexp, pcre or cidr file have no value and are skipped. Raises ValueError("line N: …") for a
    continuation line first."""
    entries = []
    for number, line in logical_lines(text):
        if kind in ("regexp", "pcre"):
            lookup, value = _split_regexp_rule(line)
        else:
            lookup, value = split_key(line)
        if value and not (kind != "texthash" and lookup.lower() in ("if", "endif")):
            entries.append((number, lookup, value))
    return entries


def _split_regexp_rule(line: str) -> tuple[str, str]:
    """`/pattern/flags value` (or `!/pattern/`) -> (pattern with its `!`s, delimiters and flags, value); an `if`
    line's pattern has no value; a line split_pattern_rule refuses is all pattern."""
    if pattern_keyword(line)[0]:
        return "if", ""
    text = line.strip()
    try:
        rule = split_pattern_rule(0, text)
    except ValueError:
        return text, ""
    return rule.written, rule.rest


BLANKS = " \t\n\v\f\r"  # Postfix's ISSPACE: ASCII only (not U+00A0, U+2003, \x1c-\x1f as str.isspace)


class PatternRule(NamedTuple):
    negated: bool
    pattern: str  # as written between the delimiters, backslashes kept
    flags: str
    rest: str  # the result (or nothing, for an `if`), blanks stripped
    written: str  # the text up to the flags' end: `!` `/pattern/flags`


def pattern_keyword(line: str) -> tuple[str, str]:
    """A regexp_table(5) or pcre_table(5) logical line as Postfix reads its start: ("endif", any text after it)
    or ("if", the text after it: the pattern) for the word in any case not followed by an ASCII letter or digit
    (`if/x/` too: Postfix's strncasecmp and ISALNUM), else ("", line)."""
    for word in ("endif", "if"):
        after = line[len(word):len(word) + 1]
        if line[:len(word)].lower() == word and not (after.isascii() and after.isalnum()):
            return word, line[len(word):].strip(BLANKS)
    return "", line


def split_pattern_rule(number: int, text: str) -> PatternRule:
    """A regexp_table(5) or pcre_table(5) rule's text as dict_regexp_get_pat and dict_pcre_get_pattern read it:
    `!`s (each toggles, blanks may come between), the delimiter (the first other character; a rule line begins with
    a non-alphanumeric one), the pattern up to the next unescaped delimiter (a backslash escapes it and is kept),
    flags up to a blank, then the rest. Raises ValueError("line N: …") naming what is missing."""
    negated, i = False, 0
    while i < len(text) and (text[i] == "!" or text[i] in BLANKS):
        negated ^= text[i] == "!"
        i += 1
    if i == len(text) or (i == 0 and text[0].isalnum()):
        raise ValueError(f"line {number}: expected /pattern/ (optionally !/pattern/ or if /pattern/)")
    delimiter, start = text[i], i + 1
    i = start
    while i < len(text) and text[i] != delimiter:
        i += 2 if text[i] == "\\" else 1
    if i >= len(text):
        raise ValueError(f"line {number}: the pattern has no closing {delimiter}")
    flags_end = i + 1
    while flags_end < len(text) and text[flags_end] not in BLANKS:
        flags_end += 1
    return PatternRule(negated, text[start:i], text[i + 1:flags_end], text[flags_end:].strip(BLANKS),
                       text[:flags_end])


def _parse_texthash(text: str) -> dict[str, str]:
    table: dict[str, str] = {}
    for number, line in logical_lines(text):
        key, value = split_key(line)
        if not value:
            raise ValueError(f"line {number}: expected 'key whitespace value', got {line!r}")
        table.setdefault(fold_key(key), value)
    return table


def split_key(line: str) -> tuple[str, str]:
    """A logical line's key and value (blanks stripped), split at the first blank (BLANKS, as postmap; a cidr:
    pattern and its result the same way)."""
    end = next((i for i, c in enumerate(line) if c in BLANKS), len(line))
    return line[:end], line[end:].strip(BLANKS)


def _parse_alias_file(text: str) -> dict[str, str]:
    """aliases(5) text -> {name: value list as written}; a syntax error names its line. Values are not read here
    but when their alias is expanded (local's aliasing), so a value mailflow cannot take fails that alias alone,
    never the table's other keys. (The parser loads here: only alias_maps files need it.)"""
    from mailflow.aliases import AliasSyntaxError, alias_values

    try:
        return alias_values(text, "")
    except AliasSyntaxError as e:
        raise ValueError(f"line {e.line}: {e.reason}") from None


class TexthashTable(FromFile):
    fixed = True
    blocking = False  # answers from memory; the file is re-read off the loop (see Reloading)

    def __init__(self, name: str, path: Path, clock: Callable[[], float], *, aliases: bool = False):
        self.name = name
        self._file = Reloading(name, path, clock, _parse_alias_file if aliases else _parse_texthash)

    def lookup(self, key: str) -> str | None:
        return self._file.current().get(fold_key(key))

    def entries(self) -> list[tuple[str, str]]:
        """(key, value) of every entry, in the file's order (the first of duplicate keys): `postmap -s`."""
        return list(self._file.current().items())
