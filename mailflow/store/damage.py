"""The values of queue rows, checked before they become rows: a database edited by hand (or damaged) may hold 'x'
where a time belongs, a negative size, a status no code writes. SQLite keeps what it is given where the schema's
types are only affinities, so the store cannot count on them.

    Columns((name, kind), ...)                      the columns of a row, each kind one of KINDS (made once: it
                                                    keeps what a sound row's check needs); `.names` in order and
                                                    `.select_list` ("id, sender, ..."): what a SELECT reads, so a
                                                    query's columns and their kinds are written once
    checked(values, columns[, suspect]) -> (values, damage)
                                                    each value that is not of its kind is replaced by a stand-in
                                                    (0 for a number, text for text) and named in `damage`
                                                    ("arrival is 'x', not a time; size is -5, not a size"), "" when
                                                    every value is sound
    sort_time(value) -> float                       a time to sort by: +inf for one that is none
    undecodable(error) -> bool                      the error of a read that met text which is not UTF-8
    lenient_text(raw) -> str                        the text_factory of such a read retried: text that is not
                                                    UTF-8 comes as NotUtf8 (its bytes kept as surrogates), which
                                                    `checked` names as damaged

Text that is not UTF-8 (`sender = CAST(x'ff61' AS TEXT)`) fails the whole read in Python's sqlite3; the store
retries that read, and only that one, with `lenient_text` (engine.fetch_leniently): a sound read pays nothing.

What becomes of a damaged row is the caller's: the operator tools list it marked as damaged with the others
(Postfix's showq lists what it can of a bad queue file with a warning), qmgr moves the message to the corrupt queue
(Postfix's qmgr does so with a queue file it cannot read).
"""
from __future__ import annotations

import json
import math
import sqlite3
from typing import Any, Callable, NamedTuple, Sequence

from mailflow.syntax import is_utf8_text

MAX_TIME = 253402300799.0  # 9999-12-31 23:59:59 UTC: past it, time.localtime() cannot say the date
STATUSES = ("pending", "sent", "bounced")
# schema.sql's; maildrop: requeued, not yet copied
QUEUES = ("incoming", "active", "deferred", "hold", "corrupt", "maildrop")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_time(value: object) -> bool:
    return _number(value) and 0 <= value <= MAX_TIME  # type: ignore[operator]  # (NaN fails both)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_text(value: object) -> bool:
    """Text that is UTF-8: not a NotUtf8, nor text with its surrogates (read through JSON from one)."""
    return type(value) is str and is_utf8_text(value)


def _is_owned(value: object) -> bool:
    """'' or what the store writes for RcptResult.owned: a JSON array of failures, each an array of 4 or 5 texts
    (owner, list, status, text[, Diagnostic-Code])."""
    if value == "":
        return True
    try:
        failures = json.loads(value) if _is_text(value) else None  # type: ignore[arg-type]
    except ValueError:
        return False
    return isinstance(failures, list) and all(
        isinstance(f, list) and len(f) in (4, 5) and all(_is_text(v) for v in f) for f in failures)


def _text(value: object) -> str:
    """A stand-in for text: bytes and surrogates (text that was not UTF-8) as U+FFFD, so it can be printed."""
    if isinstance(value, str):
        return value if is_utf8_text(value) else _raw(value).decode("utf-8", "replace")
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def _raw(text: str) -> bytes:
    """The bytes text that was not UTF-8 was read from (its surrogates back as bytes)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that no byte became ("\\ud800" in JSON)
        return text.encode("utf-8", "replace")


class Kind(NamedTuple):
    """What a column holds: `sound(value)` says whether a value is one; `stand_in(value)` replaces one that is not;
    `expected` names it ("a time"); `python_type` is the type Python's sqlite3 gives for a sound value."""

    sound: Callable[[object], bool]
    stand_in: Callable[[object], object]
    expected: str
    python_type: type


KINDS: dict[str, Kind] = {
    "time": Kind(_is_time, lambda v: 0.0, "a time", float),
    "size": Kind(_is_count, lambda v: 0, "a size", int),
    "count": Kind(_is_count, lambda v: 0, "a count", int),
    "flag": Kind(lambda v: v in (0, 1) and not isinstance(v, float), lambda v: 0, "0 or 1", int),
    "text": Kind(_is_text, _text, "text", str),
    "owned": Kind(_is_owned, lambda v: "", "failures told to list owners (JSON)", str),
    "status": Kind(lambda v: v in STATUSES, _text, "pending, sent or bounced", str),
    "queue": Kind(lambda v: v in QUEUES, _text, "a queue name", str),
}


class Columns:
    """The columns of a row as `checked` takes them: (name, kind) pairs, each kind a key of KINDS. Made once per
    query: it keeps what the check of a sound row needs (the Python types SQLite gives for it, and the columns
    whose values have bounds beyond their type), and the query's column list, in the same order."""

    def __init__(self, *columns: tuple[str, str]):
        self.columns = columns
        self.names = tuple(name for name, _ in columns)
        self.select_list = ", ".join(self.names)
        self.types = tuple(KINDS[kind].python_type for _, kind in columns)
        self.bounded = tuple((i, KINDS[kind].sound) for i, (_, kind) in enumerate(columns) if kind != "text")


class NotUtf8(str):
    """Text read from a column whose bytes are not UTF-8 (by `lenient_text`): its bytes kept as surrogates. Not a
    str to `checked`, which names it as damaged."""


def lenient_text(raw: bytes) -> str:
    """The text_factory of a read retried after `undecodable`: text as ever, and NotUtf8 where it is not UTF-8."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return NotUtf8(raw.decode("utf-8", "surrogateescape"))


def undecodable(error: BaseException) -> bool:
    """True for the error of a read that met text which is not UTF-8 (Python's sqlite3 says so)."""
    return isinstance(error, sqlite3.OperationalError) and str(error).startswith("Could not decode to UTF-8")


def checked(values: Sequence[Any], columns: Columns, *, suspect: bool = False) -> tuple[Sequence[Any], str]:
    """See the module docstring. A sound row (every value of the type SQLite gives for its kind, and within its
    kind's bounds) is checked without a call per value: qmgr checks every message it takes. `suspect`: check
    every value (the values came out of text that was not UTF-8, through JSON: plain str with surrogates)."""
    if not suspect and tuple(map(type, values)) == columns.types and all(
            sound(values[i]) for i, sound in columns.bounded):
        return values, ""
    out: list[Any] = []
    problems = []
    for value, (name, kind) in zip(values, columns.columns):
        sound, stand_in, expected, _ = KINDS[kind]
        if sound(value):
            out.append(value)
        else:
            out.append(stand_in(value))
            problems.append(f"{name} is {_shown(value)}, not {expected}")
    return out, "; ".join(problems)


def sort_time(value: object) -> float:
    return float(value) if _number(value) and not math.isnan(value) else math.inf  # type: ignore[arg-type]


def _shown(value: object) -> str:
    if isinstance(value, str) and not is_utf8_text(value):
        value = _raw(value)  # shown as the bytes it is: b'\\xffa'
    text = "NULL" if value is None else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
