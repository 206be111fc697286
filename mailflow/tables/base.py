"""What every lookup table is: the `Table` protocol, and where a relative file name is taken from.

    Table                          name (the spec, for messages), fixed, blocking, lookup(key) -> str | None
    ListedTable                    entries() -> [(key, value)]: a table that can list them all (postmap -s)
    resolve_path(name, base_dir)   a table's file: absolute as written, else under `base_dir` (None: as written,
                                   from the current directory)

`lookup` returns None for "not found" and nothing else; any failure to answer raises `LookupRetry` naming the
table (Postfix DICT_ERR_RETRY): callers defer, never treat it as "not found".
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable


class Table(Protocol):
    name: str  # the spec, for messages
    fixed: bool  # False for pattern tables (regexp, pcre, cidr): asked the full key only
    blocking: bool  # a lookup may wait on I/O (a database): run it off the event loop (TableCache.run)

    def lookup(self, key: str) -> str | None: ...


@runtime_checkable
class ListedTable(Protocol):
    """A table whose entries can all be listed (texthash:, inline:), as Postfix's `postmap -s` lists those."""

    def entries(self) -> list[tuple[str, str]]: ...


def resolve_path(name: str, base_dir: Path | None) -> Path:
    path = Path(name)
    return path if path.is_absolute() or base_dir is None else base_dir / path
