"""Lookup tables in Postfix's `type:name` form (DATABASE_README): one small module per type, no global state.

A table answers `lookup(key) -> str | None`: None means "not found" and nothing else. Any failure to answer
(file missing or unreadable, bad line or regexp found at (re)load, database error) raises `LookupRetry`
naming the table; callers defer (4.3.0), never treat it as "not found" (Postfix `DICT_ERR_RETRY`).

The package, split by job like Postfix's util/dict_*.c (callers import from here):
    base.py     the Table protocol; where a relative file name is taken from
    spec.py     open_table(spec, *, base_dir=None, clock=time.monotonic, aliases=False) -> Table; check_spec
    search.py   key orders and the search order: find, find_address, find_local, lookup_address, lookup_local,
                address_keys, local_keys, split_extension (Postfix mail_addr_find, maps_find)
    cache.py    TableCache: each spec opened once; `run` keeps blocking lookups off the event loop; `preload`;
                a reload's generation takes over the file tables of the one in force whose files are unchanged
    check.py    table_problems: the file-backed tables of a configuration that cannot answer now
    retire.py   RetiredTables: a replaced generation's parsed files let go a piece at a time, off the collector's pass
    memory.py   inline:, static:, fail:
    files.py    re-reading a changed file off the loop (Reloading), postmap(1) input lines, texthash:
    regexp.py   regexp: on RE2 (leftmost-longest, as POSIX regexec); its rule structure and lookup shared with
    pcre.py     pcre: on RE2 (leftmost-first, byte-wise, as Postfix's PCRE)
    cidr.py     cidr: (networks; the rules between negated and `if` lines indexed by prefix length)
    sqlite.py   sqlite: (the one type whose lookup may wait)
    accounts.py accounts:PATH#MAP, a map of the account database (mailflow.accounts), answers kept per key
The table types' names are mailflow.syntax.TABLE_TYPES (config validates specs with them).

What a lookup may cost the one event loop (every session and delivery shares it):
- in-memory tables (inline, static, texthash, the aliases form of texthash) answer from a dict: O(1), inline;
- regexp and pcre patterns run on RE2, no backtracking: linear in the key while RE2's DFA fits its memory, key
  length x rules past it (milliseconds to seconds for a header of tens of KB against hundreds of rules), so
  content checks (cleanup's, the SMTP and LMTP clients') match a header section or body longer than
  content_checks.LONG_KEY (2 KB) in a worker thread;
- cidr answers with a dict probe per prefix length (at most 33 for IPv4) however many networks it lists;
- a changed file is re-read and parsed in a worker thread while lookups go on answering from the previous
  contents (Postfix daemons likewise keep a table until they restart); only the very first read of a file
  outside a running loop (the CLI, a test) happens in the caller;
- accounts answers a key asked before from memory, a new key with one indexed query (microseconds; a lock is
  waited for only while `mailflow account` commits, at most a second), and looks at whether the database
  changed at most twice a second;
- sqlite may wait on the disk or a lock (`blocking = True`): the query is aborted at its deadline wherever it
  runs, and callers on the loop run such lookups through `TableCache.run`, which moves them to a worker thread.

Fixed-string tables fold keys to lower case (Postfix `DICT_FLAG_FOLD_FIX`); regexp, pcre and cidr tables see the
key as is and have `fixed = False`, so `find` asks them the first (full) key only (Postfix mail_addr_find).
"""
from mailflow.tables.base import Table
from mailflow.tables.cache import TableCache
from mailflow.tables.memory import FailTable, InlineTable, StaticTable
from mailflow.tables.search import (address_keys, find, find_address, find_local, local_keys, lookup_address,
                                    lookup_local, split_extension)
from mailflow.tables.spec import check_spec, open_table

__all__ = [
    "FailTable", "InlineTable", "StaticTable", "Table", "TableCache", "address_keys", "check_spec", "find",
    "find_address", "find_local", "local_keys", "lookup_address", "lookup_local", "open_table", "split_extension",
]
