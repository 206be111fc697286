"""Lookup tables in Postfix's `type:name` form (DATABASE_README): one small class per type, no global state.

A table answers `lookup(key) -> str | None`: None means "not found" and nothing else. Any failure to answer
(file missing or unreadable, bad line or regexp found at (re)load, database error) raises `LookupRetry`
naming the table; callers defer (4.3.0), never treat it as "not found" (Postfix `DICT_ERR_RETRY`).

- `open_table(spec, *, base_dir=None, clock=time.monotonic) -> Table`: parse `type:name`. Bad spec or unknown
  type raises `ConfigError(file="", key=spec, reason)`; the caller fills in the file and key. File-backed
  tables (texthash, regexp) read their file at the first lookup, not here; sqlite reads its .cf here.
- `find_address(tables, address, *, delimiter="+", local_domain=False) -> (table, key, value) | None`:
  virtual(5)/canonical(5) key order, every table asked each key before the next key (Postfix maps_find).
- `find_local(tables, local_part, *, delimiter="+")`: aliases(5) key order; `find(tables, keys)` for other
  orders (transport(5)). `lookup_address` / `lookup_local`: the same for one table, -> (key, value) | None.
- `TableCache(clock).open(specs, aliases=False)`: the tables of one setting; a spec named twice is opened once.
  `await TableCache.run(fn, *args)`: run `fn` (which looks things up in this cache's tables) without holding
  up the event loop: inline when every table opened here answers from memory, in a worker thread when one
  may wait on I/O (sqlite), with a deadline (LookupRetry past it). `await TableCache.preload()`: read every
  file-backed table once, in a worker thread (a server calls it before it listens).

What a lookup may cost the one event loop (every session and delivery shares it):
- in-memory tables (inline, static, texthash, the aliases form of texthash) answer from a dict: O(1), inline;
- regexp patterns run on RE2 (google-re2): linear in the key, no backtracking, so no pattern can freeze the
  loop (`/^(a+)+$/` against `aaaa…b` answers at once); one RE2 set pass over all of a file's rules tells
  which match (about 5 us for a 20-rule miss), then only the answering rule is searched for its groups;
- a changed file is re-read and parsed in a worker thread while lookups go on answering from the previous
  contents (Postfix daemons likewise keep a table until they restart); only the very first read of a file
  outside a running loop (the CLI, a test) happens in the caller;
- sqlite may wait on the disk or a lock (`blocking = True`): the query is aborted at its deadline
  (`timeout` in the .cf, default SQLITE_TIMEOUT seconds) wherever it runs, and callers on the loop run such
  lookups through `TableCache.run`, which moves them to a worker thread.

Types:
- `texthash:/path`: postmap(1) input: `key value` lines, `#` comment lines, a line starting with whitespace
  continues the previous one; keys case-insensitive; first of duplicate keys wins. Re-read when the file's
  inode, size or mtime changes, checked at most once a second by the injected clock. A malformed line makes
  the whole table fail (LookupRetry naming file:line) until fixed: a half-read table would answer wrongly.
- `inline:{ key=value, { key = text with spaces } }`: elements separated by whitespace or commas.
- `static:value`, `static:{ value with spaces }`: every key answers the value.
- `regexp:/path`: regexp_table(5): `/pattern/flags result`, `!/pattern/ result`, `if /pattern/` … `endif`;
  first match wins; `$1`, `${1}`, `$$` in results; flags `i` (toggles case-insensitive, on by default) and
  `m` (multi-line). Patterns are RE2 syntax (a superset of POSIX ERE without back-references), matched
  leftmost-longest as POSIX regexec does. Reloaded like texthash.
- `sqlite:/path.cf`: sqlite_table(5): `dbpath = …`, `query = SELECT … WHERE k='%s'`; `%s` the key, `%u` its
  local part, `%d` its domain (no domain or empty local part: not found, no query), `%%` a percent sign;
  values SQL-quoted (quotes doubled). The database is opened read-only; rows are joined with commas.
  `timeout = seconds` (default SQLITE_TIMEOUT, as ldap_table(5)'s timeout): a query still running (or
  waiting for a lock) past it is aborted and the lookup raises LookupRetry.
- `fail:name`: every lookup raises LookupRetry.

Fixed-string tables fold keys to lower case (Postfix `DICT_FLAG_FOLD_FIX`); regexp tables see the key as is
and have `fixed = False`, so `find` asks them the first (full) key only (Postfix mail_addr_find).
Relative paths (spec, dbpath) are taken from `base_dir` when given, else from the current directory.
"""
from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Callable, Protocol, TypeVar

import re2

from mailflow.errors import ConfigError, LookupRetry

TYPES = ("texthash", "inline", "static", "regexp", "sqlite", "fail")
RELOAD_INTERVAL = 1.0
SQLITE_TIMEOUT = 5.0  # seconds a sqlite lookup may take, unless its .cf says `timeout = ...`
RUN_GRACE = 0.5  # TableCache.run waits this much past the slowest blocking table's own deadline

T = TypeVar("T")


class Table(Protocol):
    name: str  # the spec, for messages
    fixed: bool  # False for pattern tables (regexp): asked the full key only
    blocking: bool  # a lookup may wait on I/O (a database): run it off the event loop (TableCache.run)

    def lookup(self, key: str) -> str | None: ...


def open_table(spec: str, *, base_dir: Path | None = None, clock: Callable[[], float] = time.monotonic,
               aliases: bool = False) -> Table:
    """`aliases`: a texthash file is in aliases(5) format (`name: value, value`), as alias_maps files are."""
    kind, colon, name = spec.partition(":")
    kind = kind.strip().lower()
    if not colon or not kind:
        raise ConfigError("", spec, "expected a table as type:name (e.g. texthash:/etc/mailflow/virtual)")
    if kind == "inline":
        return InlineTable(spec, _parse_inline(spec, name))
    if kind == "static":
        return StaticTable(spec, _parse_static(spec, name))
    if kind == "fail":
        return FailTable(spec)
    if kind in ("texthash", "regexp", "sqlite"):
        if not name.strip():
            raise ConfigError("", spec, f"{kind}: needs a file name ({kind}:/path)")
        path = _resolve(name.strip(), base_dir)
        if kind == "texthash":
            return TexthashTable(spec, path, clock, parse=_parse_alias_file if aliases else _parse_texthash)
        if kind == "regexp":
            return RegexpTable(spec, path, clock)
        return SqliteTable(spec, path, base_dir)
    raise ConfigError("", spec, f"unknown table type {kind!r}; mailflow has {', '.join(TYPES)}")


def address_keys(address: str, *, delimiter: str = "+", local_domain: bool = False) -> list[str]:
    """Postfix mail_addr_find order: `user+ext@domain`, `user@domain`, then (only when `local_domain`: the
    domain is one of this host's) `user+ext` and `user`, then `@domain`. An address without '@' gets the
    aliases(5) keys (`local_keys`)."""
    local, at, domain = address.rpartition("@")
    if not at:
        return local_keys(address, delimiter=delimiter)
    keys = [address]
    user, ext = split_extension(local, delimiter)
    if ext:
        keys.append(f"{user}@{domain}")
    if local_domain:
        keys += [local, user] if ext else [local]
    keys.append(f"@{domain}")
    return keys


def local_keys(local_part: str, *, delimiter: str = "+") -> list[str]:
    """aliases(5) order: `user+ext`, then `user`."""
    user, ext = split_extension(local_part, delimiter)
    return [local_part, user] if ext else [local_part]


def find(tables: list[Table], keys: list[str]) -> tuple[str, str, str] | None:
    """(table name, key, value) for the first key any table answers: every table is asked one key before the
    next key is tried (Postfix maps_find). Pattern tables (`fixed = False`) are asked the first key only.
    LookupRetry propagates."""
    for i, key in enumerate(keys):
        for table in tables:
            if i and not table.fixed:
                continue
            value = table.lookup(key)
            if value is not None:
                return table.name, key, value
    return None


def find_address(tables: list[Table], address: str, *, delimiter: str = "+",
                 local_domain: bool = False) -> tuple[str, str, str] | None:
    return find(tables, address_keys(address, delimiter=delimiter, local_domain=local_domain))


def find_local(tables: list[Table], local_part: str, *, delimiter: str = "+") -> tuple[str, str, str] | None:
    return find(tables, local_keys(local_part, delimiter=delimiter))


def lookup_address(table: Table, address: str, *, delimiter: str = "+",
                   local_domain: bool = False) -> tuple[str, str] | None:
    """`find_address` in one table: (key, value) or None."""
    found = find_address([table], address, delimiter=delimiter, local_domain=local_domain)
    return found[1:] if found else None


class TableCache:
    """Opens each `type:name` once per process, so settings that name the same file share one reader (and
    one reload). `open(specs)` returns the tables of one setting, in order."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._open: dict[tuple[str, bool], Table] = {}

    def open(self, specs, *, aliases: bool = False) -> list[Table]:
        tables = []
        for spec in specs:
            key = (spec, aliases)
            if key not in self._open:
                self._open[key] = open_table(spec, clock=self._clock, aliases=aliases)
            tables.append(self._open[key])
        return tables

    @property
    def blocking(self) -> bool:
        """Some table opened here may wait on I/O when asked (sqlite)."""
        return any(t.blocking for t in self._open.values())

    async def run(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` without holding up the event loop: called inline when every table opened here answers
        from memory (the common case costs nothing), else in a worker thread, waited for at most the slowest
        blocking table's deadline (plus RUN_GRACE). Past that: LookupRetry. Exceptions of `fn` propagate."""
        blocking = [t for t in self._open.values() if t.blocking]
        if not blocking:
            return fn(*args)
        deadline = max(getattr(t, "timeout", SQLITE_TIMEOUT) for t in blocking) + RUN_GRACE
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(None, fn, *args), deadline)
        except TimeoutError:
            raise LookupRetry(f"table lookup took longer than {deadline:g}s") from None

    async def preload(self) -> None:
        """Read every file-backed table now, in a worker thread: the first lookups find them loaded."""
        files = [t for t in self._open.values() if isinstance(t, (TexthashTable, RegexpTable))]
        if files:
            await asyncio.get_running_loop().run_in_executor(None, _load_all, files)


def _load_all(tables: list) -> None:
    for table in tables:
        table.load()


def lookup_local(table: Table, local_part: str, *, delimiter: str = "+") -> tuple[str, str] | None:
    """`find_local` in one table: (key, value) or None."""
    found = find_local([table], local_part, delimiter=delimiter)
    return found[1:] if found else None


def split_extension(local: str, delimiter: str) -> tuple[str, str]:
    """'user+ext' -> ('user', '+ext'), splitting at the first of any delimiter character; never leaves an
    empty user ('+ext' stays whole). An empty delimiter means no extensions."""
    if not delimiter:
        return local, ""
    for i, c in enumerate(local):
        if c in delimiter:
            return (local[:i], local[i:]) if i else (local, "")
    return local, ""


def _resolve(name: str, base_dir: Path | None) -> Path:
    path = Path(name)
    return path if path.is_absolute() or base_dir is None else base_dir / path


# ------------------------------------------------------------------------------------ in-memory tables

def _braced(text: str) -> str | None:
    """'{ a b }' -> 'a b' (whitespace inside the braces dropped); None when not braced."""
    text = text.strip()
    if text.startswith("{") and text.endswith("}"):
        return text[1:-1].strip()
    return None


def _parse_inline(spec: str, name: str) -> dict[str, str]:
    body = _braced(name)
    if body is None:
        raise ConfigError("", spec, "inline: expected inline:{ key=value, { key = text with spaces } }")
    table: dict[str, str] = {}
    for element in _split_elements(spec, body):
        inner = _braced(element)
        key, eq, value = (inner if inner is not None else element).partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            raise ConfigError("", spec, f"inline: {element!r} is not key=value (braces allow spaces: "
                                        "{ key = text with spaces })")
        table.setdefault(key.lower(), value)
    return table


def _split_elements(spec: str, body: str) -> list[str]:
    """Split at whitespace and commas outside braces."""
    elements, current, depth = [], [], 0
    for c in body:
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth < 0:
                raise ConfigError("", spec, "inline: unbalanced '}'")
        if depth == 0 and (c.isspace() or c == ","):
            if current:
                elements.append("".join(current))
            current = []
        else:
            current.append(c)
    if depth:
        raise ConfigError("", spec, "inline: unbalanced '{'")
    if current:
        elements.append("".join(current))
    return elements


def _parse_static(spec: str, name: str) -> str:
    inner = _braced(name)
    value = inner if inner is not None else name
    if not value:
        raise ConfigError("", spec, "static: needs a value (static:value or static:{ value with spaces })")
    return value


class InlineTable:
    fixed = True
    blocking = False

    def __init__(self, name: str, entries: dict[str, str]):
        self.name, self._entries = name, entries

    def lookup(self, key: str) -> str | None:
        return self._entries.get(key.lower())


class StaticTable:
    fixed = True
    blocking = False

    def __init__(self, name: str, value: str):
        self.name, self._value = name, value

    def lookup(self, key: str) -> str | None:
        return self._value


class FailTable:
    fixed = True
    blocking = False

    def __init__(self, name: str):
        self.name = name

    def lookup(self, key: str) -> str | None:
        raise LookupRetry(f"table {self.name} is a fail: table; every lookup fails")


# --------------------------------------------------------------------------------- file-backed tables

class _Reloading:
    """A file parsed into a value, re-read when its inode, size or mtime changes (checked at most once per
    RELOAD_INTERVAL of `clock`). `current()` returns the value or raises LookupRetry while the file is
    unreadable or bad. `parse(text)` raises ValueError("line N: …").

    On a running event loop the check and the re-read happen in a worker thread: `current()` goes on
    answering from the previous contents until the new ones are parsed. Elsewhere (no loop in this thread),
    and while the table is failing (there are no good contents to answer from), they happen in the caller. The state is one tuple, replaced whole, so a reader never sees half of it."""

    def __init__(self, name: str, path: Path, clock: Callable[[], float], parse: Callable[[str], object]):
        self._name, self._path, self._clock, self._parse = name, path, clock, parse
        self._lock = threading.Lock()
        self._checked: float | None = None
        self._state: tuple[object, tuple | None, str | None] | None = None  # (value, signature, error)
        self._pending = False  # a re-read is under way in a worker thread

    def load(self) -> None:
        """Check the file and re-read it if it changed, in the calling thread."""
        with self._lock:
            self._checked = self._clock()
            self._state = self._read(self._state)

    def current(self) -> object:
        if self._state is None:
            self.load()  # the first lookup of a table nobody preloaded
        elif self._clock() - self._checked >= RELOAD_INTERVAL:
            self._checked = self._clock()
            if self._state[2] is None:
                self._refresh()
            else:
                self.load()  # nothing good to answer from meanwhile: a failed table is retried in the caller
        value, _, error = self._state
        if error is not None:
            raise LookupRetry(error)
        return value

    def _refresh(self) -> None:
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
            self._state = (None, None, f"table {self._name}: cannot reload {self._path}: {future.exception()}")

    def _read(self, previous):
        try:
            st = os.stat(self._path)
            if previous is not None and previous[2] is None and _signature(st) == previous[1]:
                return previous
            with open(self._path, encoding="utf-8") as f:
                signature = _signature(os.fstat(f.fileno()))
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            return None, None, f"table {self._name}: cannot read {self._path}: {getattr(e, 'strerror', None) or e}"
        try:
            return self._parse(text), signature, None
        except ValueError as e:
            return None, None, f"table {self._name}: {self._path}, {e}"


def _signature(st: os.stat_result) -> tuple:
    return st.st_ino, st.st_size, st.st_mtime_ns


def logical_lines(text: str) -> list[tuple[int, str]]:
    """postmap(1) input rules: blank and `#` lines are skipped; a line starting with whitespace continues
    the previous logical line. Returns [(first line number, text)]."""
    lines: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0].isspace():
            if not lines:
                raise ValueError(f"line {number}: a continuation line (starting with whitespace) comes first")
            first, previous = lines[-1]
            lines[-1] = (first, previous + line.rstrip())
        else:
            lines.append((number, line.rstrip()))
    return lines


def _parse_texthash(text: str) -> dict[str, str]:
    table: dict[str, str] = {}
    for number, line in logical_lines(text):
        parts = line.split(None, 1)
        if len(parts) < 2:
            raise ValueError(f"line {number}: expected 'key whitespace value', got {line!r}")
        table.setdefault(parts[0].lower(), parts[1].strip())
    return table


def _parse_alias_file(text: str) -> dict[str, str]:
    """aliases(5) text -> {name: value list as text}; a syntax error names its line."""
    from mailflow.aliases import AliasSyntaxError, format_target, parse_aliases

    try:
        entries = parse_aliases(text, "")
    except AliasSyntaxError as e:
        raise ValueError(f"line {e.line}: {e.reason}") from None
    return {name: ", ".join(format_target(t) for t in targets) for name, targets in entries.items()}


class TexthashTable:
    fixed = True
    blocking = False  # answers from memory; the file is re-read off the loop (see _Reloading)

    def __init__(self, name: str, path: Path, clock: Callable[[], float],
                 parse: Callable[[str], dict[str, str]] = _parse_texthash):
        self.name = name
        self._file = _Reloading(name, path, clock, parse)

    def load(self) -> None:
        self._file.load()

    def lookup(self, key: str) -> str | None:
        return self._file.current().get(key.lower())


class _Rule:
    """One regexp_table line: a match rule (result set) or an `if` (end = index of its endif)."""

    def __init__(self, regex, negate: bool, result: str | None):
        self.regex, self.negate, self.result, self.end = regex, negate, result, 0
        self.set_index = -1  # its pattern's index in the file's prefilter set


_SUBST = re.compile(r"\$(?:(\d)|\{(\d+)\}|\((\d+)\)|(\$))")


def _parse_regexp(source: str) -> list:
    rules: list = []
    open_ifs: list[int] = []
    for number, line in logical_lines(source):
        if line.strip().lower() == "endif":
            if not open_ifs:
                raise ValueError(f"line {number}: endif without if")
            rules[open_ifs.pop()].end = len(rules)
            rules.append(None)  # the endif itself: nothing to do
            continue
        is_if = re.match(r"if\s", line, re.IGNORECASE) is not None
        text = line[2:].lstrip() if is_if else line
        regex, negate, rest = _parse_pattern(number, text)
        if is_if:
            if rest:
                raise ValueError(f"line {number}: text after the 'if' pattern")
            open_ifs.append(len(rules))
            rules.append(_Rule(regex, negate, None))
            continue
        if not rest:
            raise ValueError(f"line {number}: no result after the pattern")
        for m in _SUBST.finditer(rest):
            group = m.group(1) or m.group(2) or m.group(3)
            if group is None:
                continue
            if negate:
                raise ValueError(f"line {number}: ${group} in the result of a negated (!) pattern")
            if int(group) > regex.groups:
                raise ValueError(f"line {number}: ${group} but the pattern has {regex.groups} group(s)")
        rules.append(_Rule(regex, negate, rest))
    if open_ifs:
        raise ValueError("if without endif at the end of the file")
    return rules, _prefilter(rules)


def _prefilter(rules: list):
    """One RE2::Set of every pattern: a single pass over the key tells which rules match, so a lookup costs
    one call however many rules the file has (then one `search` for the groups of the rule that answers).
    None when the set cannot be built (RE2's memory budget): each rule is then searched in turn."""
    patterns = re2.Set.SearchSet(_options(ignore_case=False))
    try:
        for rule in rules:
            if rule is not None:
                rule.set_index = patterns.Add(rule.regex.pattern)
        patterns.Compile()
    except re2.error:
        return None
    return patterns


def _parse_pattern(number: int, text: str) -> tuple[object, bool, str]:
    negate = text.startswith("!")
    if negate:
        text = text[1:].lstrip()
    if not text or text[0].isspace() or text[0].isalnum() or text[0] == "\\":
        raise ValueError(f"line {number}: expected /pattern/ (optionally !/pattern/ or if /pattern/)")
    delim, i, pattern = text[0], 1, []
    while i < len(text) and text[i] != delim:
        if text[i] == "\\" and i + 1 < len(text):
            pattern.append(text[i])
            i += 1
        pattern.append(text[i])
        i += 1
    if i >= len(text):
        raise ValueError(f"line {number}: the pattern has no closing {delim}")
    flags_end = i + 1
    while flags_end < len(text) and not text[flags_end].isspace():
        flags_end += 1
    ignore_case, multi_line = True, False
    for flag in text[i + 1:flags_end]:
        if flag == "i":
            ignore_case = not ignore_case
        elif flag == "m":
            multi_line = not multi_line
        else:
            raise ValueError(f"line {number}: unknown or unsupported flag {flag!r} (mailflow has i, m)")
    return _compile(number, "".join(pattern), ignore_case, multi_line), negate, text[flags_end:].strip()


def _options(*, ignore_case: bool) -> "re2.Options":
    options = re2.Options()
    options.case_sensitive = not ignore_case
    options.longest_match = True
    options.log_errors = False
    return options


def _compile(number: int, pattern: str, ignore_case: bool, multi_line: bool):
    """An RE2 pattern: linear-time matching (no backtracking), POSIX leftmost-longest semantics. The flags
    are written into the pattern, so that the prefilter set (one options object for all) sees them too."""
    flags = ("i" if ignore_case else "") + ("m" if multi_line else "")
    try:
        return re2.compile((f"(?{flags})" if flags else "") + pattern, _options(ignore_case=False))
    except re2.error as e:
        reason = e.args[0].decode("utf-8", "replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise ValueError(f"line {number}: bad regular expression: {reason}") from None


def _expand(result: str, m) -> str:
    def group(s: re.Match) -> str:
        if s.group(4):
            return "$"
        return m.group(int(s.group(1) or s.group(2) or s.group(3))) or ""
    return _SUBST.sub(group, result)


class RegexpTable:
    fixed = False
    blocking = False  # RE2: linear in the key, whatever the pattern

    def __init__(self, name: str, path: Path, clock: Callable[[], float]):
        self.name = name
        self._file = _Reloading(name, path, clock, _parse_regexp)

    def load(self) -> None:
        self._file.load()

    def lookup(self, key: str) -> str | None:
        rules, prefilter = self._file.current()
        matching = set(prefilter.Match(key) or ()) if prefilter is not None else None  # None: no match
        i = 0
        while i < len(rules):
            rule = rules[i]
            i += 1
            if rule is None:
                continue
            if matching is not None and rule.set_index not in matching:
                m = None
            elif matching is not None and (rule.result is None or rule.negate):
                m = True  # it matches, and no groups are needed (an `if`, or a negated rule)
            else:
                m = rule.regex.search(key)
            if (m is None) != rule.negate:  # this rule does not apply
                if rule.result is None:
                    i = rule.end + 1  # skip the if block
                continue
            if rule.result is not None:
                return _expand(rule.result, m) if m is not None else rule.result
        return None


# ------------------------------------------------------------------------------------------- sqlite

_SQLITE_KEYS = ("dbpath", "query", "timeout")
_SQLITE_REQUIRED = ("dbpath", "query")
_ESCAPES = re.compile(r"%(.?)", re.DOTALL)
_PROGRESS_STEPS = 1000  # SQLite VM instructions between two looks at the clock


class SqliteTable:
    """sqlite_table(5). The .cf file is read when the table is opened (a ConfigError if it is bad); the
    database is opened read-only at the first lookup in each thread (lookups run in worker threads, see
    TableCache.run) and again after any error. A query past its deadline is interrupted (SQLite's progress
    handler), a lock is waited for at most until the deadline (busy timeout): LookupRetry either way."""

    fixed = True
    blocking = True

    def __init__(self, name: str, cf: Path, base_dir: Path | None):
        self.name = name
        settings = _read_cf(name, cf)
        self._db = _resolve(settings["dbpath"], base_dir)
        self._query = settings["query"]
        self.timeout = _timeout(cf, settings.get("timeout"))
        for m in _ESCAPES.finditer(self._query):
            if m.group(1) not in ("s", "u", "d", "%"):
                raise ConfigError(str(cf), "query", f"unknown expansion %{m.group(1)} (mailflow has %s, %u, "
                                                    "%d and %%)")
        self._local = threading.local()  # this thread's connection and the deadline of its query

    def lookup(self, key: str) -> str | None:
        key = key.lower()
        local, at, domain = key.rpartition("@")
        if not at:
            local, domain = key, ""
        values = {"s": key, "u": local, "d": domain, "%": "%"}
        if "\0" in key or (not local and "%u" in self._query) or (not domain and "%d" in self._query):
            return None  # sqlite_table(5): the query is suppressed; nothing can match
        sql = _ESCAPES.sub(lambda m: "%" if m.group(1) == "%" else values[m.group(1)].replace("'", "''"),
                           self._query)
        self._local.deadline = time.monotonic() + self.timeout
        try:
            rows = self._connection().execute(sql).fetchall()
        except sqlite3.Error as e:
            self._close()
            reason = f"no answer within {self.timeout:g}s" if self._late() else str(e)
            raise LookupRetry(f"table {self.name}: database {self._db}: {reason}") from None
        found = [str(row[0]) for row in rows if row and row[0] is not None]
        return ",".join(found) if found else None

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            uri = f"file:{urllib.parse.quote(str(self._db))}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=self.timeout, check_same_thread=False)
            conn.set_progress_handler(self._late, _PROGRESS_STEPS)
            self._local.conn = conn
        return conn

    def _late(self) -> bool:
        """SQLite's progress handler: True (abort the statement) once this thread's query is past its deadline."""
        return time.monotonic() > getattr(self._local, "deadline", float("inf"))

    def _close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _timeout(cf: Path, value: str | None) -> float:
    if value is None:
        return SQLITE_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 3600:
        raise ConfigError(str(cf), "timeout", f"expected seconds (more than 0, at most 3600), got {value!r}")
    return seconds


def _read_cf(name: str, cf: Path) -> dict[str, str]:
    try:
        text = cf.read_text(encoding="utf-8")
        lines = logical_lines(text)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(cf), "", f"cannot read sqlite table config: {getattr(e, 'strerror', None) or e}")
    except ValueError as e:
        raise ConfigError(str(cf), "", str(e))
    settings: dict[str, str] = {}
    for number, line in lines:
        key, eq, value = line.partition("=")
        key = key.strip()
        if not eq:
            raise ConfigError(str(cf), f"line {number}", "expected 'name = value'")
        if key not in _SQLITE_KEYS:
            raise ConfigError(str(cf), key, f"unknown parameter (mailflow's sqlite tables have "
                                            f"{', '.join(_SQLITE_KEYS)})")
        settings[key] = value.strip()
    for key in _SQLITE_REQUIRED:
        if not settings.get(key):
            raise ConfigError(str(cf), key, "missing (sqlite tables need dbpath and query)")
    return settings
