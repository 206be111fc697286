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

Types:
- `texthash:/path`: postmap(1) input: `key value` lines, `#` comment lines, a line starting with whitespace
  continues the previous one; keys case-insensitive; first of duplicate keys wins. Re-read when the file's
  inode, size or mtime changes, checked at most once a second by the injected clock. A malformed line makes
  the whole table fail (LookupRetry naming file:line) until fixed: a half-read table would answer wrongly.
- `inline:{ key=value, { key = text with spaces } }`: elements separated by whitespace or commas.
- `static:value`, `static:{ value with spaces }`: every key answers the value.
- `regexp:/path`: regexp_table(5): `/pattern/flags result`, `!/pattern/ result`, `if /pattern/` … `endif`;
  first match wins; `$1`, `${1}`, `$$` in results; flags `i` (toggles case-insensitive, on by default) and
  `m` (multi-line). Python `re` syntax stands in for POSIX ERE. Reloaded like texthash.
- `sqlite:/path.cf`: sqlite_table(5): `dbpath = …`, `query = SELECT … WHERE k='%s'`; `%s` the key, `%u` its
  local part, `%d` its domain (no domain or empty local part: not found, no query), `%%` a percent sign;
  values SQL-quoted (quotes doubled). The database is opened read-only; rows are joined with commas.
- `fail:name`: every lookup raises LookupRetry.

Fixed-string tables fold keys to lower case (Postfix `DICT_FLAG_FOLD_FIX`); regexp tables see the key as is
and have `fixed = False`, so `find` asks them the first (full) key only (Postfix mail_addr_find).
Relative paths (spec, dbpath) are taken from `base_dir` when given, else from the current directory.
"""
from __future__ import annotations

import os
import re
import sqlite3
import time
import urllib.parse
from pathlib import Path
from typing import Callable, Protocol

from mailflow.errors import ConfigError, LookupRetry

TYPES = ("texthash", "inline", "static", "regexp", "sqlite", "fail")
RELOAD_INTERVAL = 1.0


class Table(Protocol):
    name: str  # the spec, for messages
    fixed: bool  # False for pattern tables (regexp): asked the full key only

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

    def __init__(self, name: str, entries: dict[str, str]):
        self.name, self._entries = name, entries

    def lookup(self, key: str) -> str | None:
        return self._entries.get(key.lower())


class StaticTable:
    fixed = True

    def __init__(self, name: str, value: str):
        self.name, self._value = name, value

    def lookup(self, key: str) -> str | None:
        return self._value


class FailTable:
    fixed = True

    def __init__(self, name: str):
        self.name = name

    def lookup(self, key: str) -> str | None:
        raise LookupRetry(f"table {self.name} is a fail: table; every lookup fails")


# --------------------------------------------------------------------------------- file-backed tables

class _Reloading:
    """A file parsed into a value, re-read when its inode, size or mtime changes (checked at most once per
    RELOAD_INTERVAL of `clock`). `current()` returns the value or raises LookupRetry while the file is
    unreadable or bad. `parse(text)` raises ValueError("line N: …")."""

    def __init__(self, name: str, path: Path, clock: Callable[[], float], parse: Callable[[list], object]):
        self._name, self._path, self._clock, self._parse = name, path, clock, parse
        self._checked: float | None = None
        self._signature: tuple | None = None
        self._value: object = None
        self._error: str | None = None

    def current(self) -> object:
        now = self._clock()
        if self._checked is None or now - self._checked >= RELOAD_INTERVAL:
            self._checked = now
            self._refresh()
        if self._error is not None:
            raise LookupRetry(self._error)
        return self._value

    def _refresh(self) -> None:
        try:
            st = os.stat(self._path)
            if self._error is None and _signature(st) == self._signature:
                return
            with open(self._path, encoding="utf-8") as f:
                signature = _signature(os.fstat(f.fileno()))
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            self._error = f"table {self._name}: cannot read {self._path}: {getattr(e, 'strerror', None) or e}"
            return
        try:
            value = self._parse(text)
        except ValueError as e:
            self._error = f"table {self._name}: {self._path}, {e}"
            return
        self._value, self._signature, self._error = value, signature, None


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

    def __init__(self, name: str, path: Path, clock: Callable[[], float],
                 parse: Callable[[str], dict[str, str]] = _parse_texthash):
        self.name = name
        self._file = _Reloading(name, path, clock, parse)

    def lookup(self, key: str) -> str | None:
        return self._file.current().get(key.lower())


class _Rule:
    """One regexp_table line: a match rule (result set) or an `if` (end = index of its endif)."""

    def __init__(self, regex: re.Pattern, negate: bool, result: str | None):
        self.regex, self.negate, self.result, self.end = regex, negate, result, 0


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
    return rules


def _parse_pattern(number: int, text: str) -> tuple[re.Pattern, bool, str]:
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
    flags = re.IGNORECASE
    for flag in text[i + 1:flags_end]:
        if flag == "i":
            flags ^= re.IGNORECASE
        elif flag == "m":
            flags ^= re.MULTILINE
        else:
            raise ValueError(f"line {number}: unknown or unsupported flag {flag!r} (mailflow has i, m)")
    try:
        regex = re.compile("".join(pattern), flags)
    except re.error as e:
        raise ValueError(f"line {number}: bad regular expression: {e}") from None
    return regex, negate, text[flags_end:].strip()


def _expand(result: str, m: re.Match) -> str:
    def group(s: re.Match) -> str:
        if s.group(4):
            return "$"
        return m.group(int(s.group(1) or s.group(2) or s.group(3))) or ""
    return _SUBST.sub(group, result)


class RegexpTable:
    fixed = False

    def __init__(self, name: str, path: Path, clock: Callable[[], float]):
        self.name = name
        self._file = _Reloading(name, path, clock, _parse_regexp)

    def lookup(self, key: str) -> str | None:
        rules = self._file.current()
        i = 0
        while i < len(rules):
            rule = rules[i]
            i += 1
            if rule is None:
                continue
            m = rule.regex.search(key)
            if (m is None) != rule.negate:  # this rule does not apply
                if rule.result is None:
                    i = rule.end + 1  # skip the if block
                continue
            if rule.result is not None:
                return _expand(rule.result, m) if m is not None else rule.result
        return None


# ------------------------------------------------------------------------------------------- sqlite

_SQLITE_KEYS = ("dbpath", "query")
_ESCAPES = re.compile(r"%(.?)", re.DOTALL)


class SqliteTable:
    """sqlite_table(5). The .cf file is read when the table is opened (a ConfigError if it is bad); the
    database is opened read-only at the first lookup and again after any error."""

    fixed = True

    def __init__(self, name: str, cf: Path, base_dir: Path | None):
        self.name = name
        settings = _read_cf(name, cf)
        self._db = _resolve(settings["dbpath"], base_dir)
        self._query = settings["query"]
        for m in _ESCAPES.finditer(self._query):
            if m.group(1) not in ("s", "u", "d", "%"):
                raise ConfigError(str(cf), "query", f"unknown expansion %{m.group(1)} (mailflow has %s, %u, "
                                                    "%d and %%)")
        self._conn: sqlite3.Connection | None = None

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
        try:
            if self._conn is None:
                uri = f"file:{urllib.parse.quote(str(self._db))}?mode=ro"
                self._conn = sqlite3.connect(uri, uri=True, timeout=1.0, check_same_thread=False)
            rows = self._conn.execute(sql).fetchall()
        except sqlite3.Error as e:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            raise LookupRetry(f"table {self.name}: database {self._db}: {e}") from None
        found = [str(row[0]) for row in rows if row and row[0] is not None]
        return ",".join(found) if found else None


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
    for key in _SQLITE_KEYS:
        if not settings.get(key):
            raise ConfigError(str(cf), key, "missing (sqlite tables need dbpath and query)")
    return settings
