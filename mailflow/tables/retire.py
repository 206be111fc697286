"""Letting go of the tables a reload replaced without holding up the event loop.

    tables = RetiredTables()
    tables.retire(file_tables)    each of `file_tables` (what a reload lets go: TableCache.built()'s list, the
                                  replaced generation's tables the new one did not take over, or a refused
                                  reload's TableCache.abandoned()) is let go once nothing uses it, its parsed
                                  contents a piece at a time; a table taken over by the generation in force must
                                  never be passed here (its contents would be taken apart under it)
    await tables.close()          what is still kept is let go at once (the stop)

Why: a replaced generation (routers, restriction lists, content checks, transports) is a web of objects that
refer to each other, freed by the garbage collector's pass that finds it unreachable, in one call that holds the GIL.
With its tables in it, that pass freed every parsed rule too: 100 000-rule regexp and pcre files, a 100 000-line
cidr and texthash file held the loop 2.3 s (serve's collection after a reload; 0.55 s for the same pass with nothing
to free). So what holds each table's parsed contents (its `reading`, files.Reloading) is kept here, apart from the
tables: the collector frees the table objects (a few), and once one of them is gone (`weakref.finalize`, whichever
pass, whenever the last session or delivery that used it ends: each part of a generation holds only its own tables)
the contents its reading holds then (its file re-read since the reload: the new ones) are taken apart on the loop,
PIECE items at a time with a turn of the loop between two pieces. A table still in use is never touched: only what no
table refers to any more is dropped.
"""
from __future__ import annotations

import asyncio
import weakref
from typing import Iterator

from mailflow.tables import cidr, regexp

PIECE = 2000  # items of a list or dict dropped between two turns of the loop (a few ms for parsed rules)
# the parsed objects of the file tables' contents (regexp and pcre rules, cidr rules), taken apart like containers;
# any other object is dropped whole, never emptied (it may be in use elsewhere)
PARSED = (regexp._Rules, regexp._Rule, regexp._Prefilter, cidr._Rule, cidr._Run, cidr._Network)


class RetiredTables:
    """See the module docstring."""

    def __init__(self) -> None:
        self._dropping: set[asyncio.Task] = set()
        self._kept: list[list] = []  # each retired table's `reading` (in a list of its own), until dropped

    def retire(self, tables: list) -> None:
        """See the module docstring. From the event loop; never raises (a reload calls it once nothing may fail).
        What is kept is each table's `reading` (its Reloading), not the contents it holds now: a table an old
        session still uses may re-read its file after the reload, and the contents it holds when it goes are the
        ones to take apart."""
        loop = asyncio.get_running_loop()
        for table in tables:
            reading = [table.reading]
            try:
                weakref.finalize(table, _gone, loop, self._drop, reading)
            except TypeError:  # (a table that cannot be watched: its contents go with it, in the collector's pass)
                continue
            self._kept.append(reading)

    def _drop(self, reading: list) -> None:
        if any(kept is reading for kept in self._kept):
            self._kept = [kept for kept in self._kept if kept is not reading]
            contents = [value for value in (source.contents() for source in reading) if value is not None]
            reading.clear()
            task = asyncio.get_running_loop().create_task(_taken_apart(contents), name="retired-tables")
            self._dropping.add(task)
            task.add_done_callback(self._dropping.discard)

    async def close(self) -> None:
        for task in self._dropping:
            task.cancel()
        await asyncio.gather(*self._dropping, return_exceptions=True)
        for reading in self._kept:  # (the tables' finalizers hold these lists: emptied, they hold nothing)
            reading.clear()
        self._kept = []


def _gone(loop: asyncio.AbstractEventLoop, drop, contents: list) -> None:
    """A retired table is gone (from the collector's pass, in whichever thread ran it): its contents dropped on the
    loop. (Asked, not checked first: the loop may close in between.)"""
    try:
        loop.call_soon_threadsafe(drop, contents)
    except RuntimeError:  # the loop is closed: the process is ending, nothing to spare
        pass


async def _taken_apart(contents: list) -> None:
    while contents:
        for _ in _pieces(contents.pop()):
            await asyncio.sleep(0)


def _pieces(value: object) -> Iterator[None]:
    """Takes `value` apart: each list, dict and parsed object (PARSED) in it is emptied PIECE members
    at a time, those members that are such containers set aside to be taken apart in turn, so that each drop frees
    little (the rest, a tuple or a compiled pattern, is dropped whole); yields after every PIECE members."""
    stack, count = [value], 0
    while stack:
        item = stack.pop()
        members = _some_members(item)
        if _divisible(item):  # (not emptied yet: its next piece after these members)
            stack.append(item)
        stack.extend(member for member in members if _divisible(member))
        count += len(members)
        del item, members
        if count >= PIECE:
            count = 0
            yield


def _some_members(item: object) -> list:
    """Up to PIECE of what `item` (a container _divisible says is worth it) holds, taken out of it."""
    if isinstance(item, list):
        piece = item[-PIECE:]
        del item[-PIECE:]
        return piece
    if isinstance(item, dict):
        return [item.popitem()[1] for _ in range(min(PIECE, len(item)))]
    if _parsed_object(item):
        attributes = vars(item)
        members = list(attributes.values())
        attributes.clear()
        return members
    return []


def _divisible(item: object) -> bool:
    """Something to take apart rather than drop whole: a list or dict not yet empty, or a parsed object with
    attributes left."""
    if isinstance(item, (list, dict)):
        return len(item) > 0
    return _parsed_object(item) and bool(vars(item))


def _parsed_object(item: object) -> bool:
    return type(item) in PARSED
