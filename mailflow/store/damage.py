"""The values of queue rows, checked before they become rows: a database edited by hand (or damaged) may hold 'x'
where a time belongs, a negative size, a status no code writes. SQLite keeps what it is given where the schema's
types are only affinities, so the store cannot count on them.

    Columns((name, kind), ...)                      the columns of a row, each kind one of KINDS (made once: it
                                                    keeps what a sound row's check needs)
    checked(values, columns) -> (values, damage)    each value that is not of its kind is replaced by a stand-in
                                                    (0 for a number, text for text) and named in `damage`
                                                    ("arrival is 'x', not a time; size is -5, not a size"), "" when
                                                    every value is sound
    sort_time(value) -> float                       a time to sort by: +inf for one that is none

What becomes of a damaged row is the caller's: the operator tools list it marked as damaged with the others
(Postfix's showq lists what it can of a bad queue file with a warning), qmgr moves the message to the corrupt queue
(Postfix's qmgr does so with a queue file it cannot read).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

MAX_TIME = 253402300799.0  # 9999-12-31 23:59:59 UTC: past it, time.localtime() cannot say the date
STATUSES = ("pending", "sent", "bounced")
QUEUES = ("incoming", "active", "deferred", "hold", "corrupt")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_time(value: object) -> bool:
    return _number(value) and 0 <= value <= MAX_TIME  # type: ignore[operator]  # (NaN fails both)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


# kind -> (is it one, a stand-in for one that is not, what it should have been)
KINDS: dict[str, tuple[Callable[[object], bool], Callable[[object], object], str]] = {
    "time": (_is_time, lambda v: 0.0, "a time"),
    "size": (_is_count, lambda v: 0, "a size"),
    "count": (_is_count, lambda v: 0, "a count"),
    "flag": (lambda v: v in (0, 1) and not isinstance(v, float), lambda v: 0, "0 or 1"),
    "text": (lambda v: isinstance(v, str), _text, "text"),
    "status": (lambda v: v in STATUSES, _text, "pending, sent or bounced"),
    "queue": (lambda v: v in QUEUES, _text, "a queue name"),
}


_TYPES = {"time": float, "size": int, "count": int, "flag": int, "text": str, "status": str, "queue": str}


class Columns:
    def __init__(self, *columns: tuple[str, str]):
        self.columns = columns
        self.types = tuple(_TYPES[kind] for _, kind in columns)  # what SQLite gives for a sound row
        self.bounded = tuple((i, KINDS[kind][0]) for i, (_, kind) in enumerate(columns) if kind != "text")


def checked(values: Sequence[Any], columns: Columns) -> tuple[Sequence[Any], str]:
    """See the module docstring. A sound row (every value of the type SQLite gives for its kind, and within its
    kind's bounds) is checked without a call per value: qmgr checks every message it takes."""
    if tuple(map(type, values)) == columns.types and all(sound(values[i]) for i, sound in columns.bounded):
        return values, ""
    out: list[Any] = []
    problems = []
    for value, (name, kind) in zip(values, columns.columns):
        sound, stand_in, expected = KINDS[kind]
        if sound(value):
            out.append(value)
        else:
            out.append(stand_in(value))
            problems.append(f"{name} is {_shown(value)}, not {expected}")
    return out, "; ".join(problems)


def sort_time(value: object) -> float:
    return float(value) if _number(value) and not math.isnan(value) else math.inf  # type: ignore[arg-type]


def _shown(value: object) -> str:
    text = "NULL" if value is None else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
