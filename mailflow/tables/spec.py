"""`open_table(spec)`: from Postfix's `type:name` to a table of that type.

    open_table(spec, *, base_dir=None, clock=time.monotonic, aliases=False) -> Table
    check_spec(spec) -> spec      a known type and, for a table the spec holds (inline:, static:) or the system's
                                  (unix:), one that opens; ValueError naming the problem (configuration's check)

`aliases`: a texthash file is in aliases(5) format, as alias_maps files are. File-backed tables (texthash,
regexp, pcre, cidr, accounts) read their file at the first lookup (or TableCache.preload), not here; sqlite reads
its .cf here. `accounts:PATH#MAP` names a map of the account database (mailflow.tables.accounts); `unix:passwd.byname`
and `unix:group.byname` the system's users and groups (mailflow.tables.unix).
Relative paths (the spec's, sqlite's dbpath) are taken from `base_dir` when given, else from the current
directory.

Failure behaviour: a bad spec or an unknown type raises `ConfigError(file="", key=spec, reason)`; the caller
fills in the file and key. check_spec reads no file: a file-backed table's problems are mailflow.tables.check's.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from mailflow.errors import ConfigError
from mailflow.syntax import FILE_TABLE_TYPES, TABLE_TYPES, check_table_spec, table_type, table_type_hint
from mailflow.tables.base import Table, resolve_path
from mailflow.tables.memory import FailTable, open_inline, open_static
from mailflow.tables.unix import UnixTable


def open_table(spec: str, *, base_dir: Path | None = None, clock: Callable[[], float] = time.monotonic,
               aliases: bool = False) -> Table:
    """`aliases`: a texthash file is in aliases(5) format (`name: value, value`), as alias_maps files are."""
    kind, name = table_type(spec), spec.partition(":")[2]
    if not kind:
        raise ConfigError("", spec, "expected a table as type:name (e.g. texthash:/etc/mailflow/virtual)")
    if kind == "inline":
        return open_inline(spec, name)
    if kind == "static":
        return open_static(spec, name)
    if kind == "fail":
        return FailTable(spec)
    if kind == "unix":
        return UnixTable(spec, name.strip())
    if kind in FILE_TABLE_TYPES:
        if not name.strip():
            raise ConfigError("", spec, f"{kind}: needs a file name ({kind}:/path)")
        return _open_file_table(kind, spec, name, resolve_path(name.strip(), base_dir), base_dir, clock, aliases)
    raise ConfigError("", spec, f"unknown table type {kind!r}; mailflow has {', '.join(TABLE_TYPES)}"
                                + table_type_hint(kind))


def _open_file_table(kind: str, spec: str, name: str, path: Path, base_dir: Path | None,
                     clock: Callable[[], float], aliases: bool) -> Table:
    """A file-backed table: each type's module is imported when a spec names it (cidr and texthash bring the
    aliases parser, regexp and pcre RE2, accounts and sqlite sqlite3): the configuration's check and sendmail, which
    open none of them or few, do not load them all at each start."""
    if kind == "texthash":
        from mailflow.tables.files import TexthashTable

        return TexthashTable(spec, path, clock, aliases=aliases)
    if kind == "regexp":
        from mailflow.tables.regexp import RegexpTable

        return RegexpTable(spec, path, clock)
    if kind == "pcre":
        from mailflow.tables.pcre import PcreTable

        return PcreTable(spec, path, clock)
    if kind == "cidr":
        from mailflow.tables.cidr import CidrTable

        return CidrTable(spec, path, clock)
    if kind == "accounts":
        from mailflow.tables.accounts import AccountsTable, parse_spec

        db, map_name = parse_spec(spec, name)
        return AccountsTable(spec, resolve_path(db, base_dir), map_name, clock)
    from mailflow.tables.sqlite import SqliteTable

    return SqliteTable(spec, path, base_dir)


def check_spec(spec: str) -> str:
    """`spec`, when its type is known and a table it holds itself (inline:, static:) or the system's (unix:) opens:
    their syntax errors show when the configuration is read, as a file-backed table's show in check-config.
    Raises ValueError."""
    check_table_spec(spec)
    if table_type(spec) in ("inline", "static", "unix"):
        try:
            open_table(spec)
        except ConfigError as e:
            raise ValueError(e.reason) from None
    return spec
