"""The tables that live in the spec itself: `inline:`, `static:`, `fail:`.

- `inline:{ key=value, { key = text with spaces } }`: elements separated by whitespace or commas; keys case-folded
  (syntax.fold_key); the last of duplicate keys wins (as in Postfix's inline:, unlike its file tables, where the first
  does).
- `static:value`, `static:{ value with spaces }`: every key answers the value.
- `fail:name`: every lookup raises LookupRetry (a deliberate failure, for tests and for disabling a map).

    open_inline(spec, name) / open_static(spec, name) / FailTable(spec)
    table_entries(spec) -> ((key, value), ...) | None   an inline:, static: ("" its key) or fail: (none) spec's
                           entries, None for another type: the one walk of such a table (serve's descriptor
                           estimate, the import's relay rerouting)

Failure behaviour: a malformed inline or static spec raises `ConfigError("", spec, reason)` when opened (the
caller names the file and key); lookups in these tables never fail, except fail:'s.
"""
from __future__ import annotations

from mailflow.errors import ConfigError, LookupRetry
from mailflow.syntax import fold_key, split_outside_braces, table_type


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
        table[fold_key(key)] = value  # the last wins, as in Postfix
    return table


def _split_elements(spec: str, body: str) -> list[str]:
    """Split at whitespace and commas outside braces."""
    try:
        return split_outside_braces(body)
    except ValueError as e:
        raise ConfigError("", spec, f"inline: {e}") from None


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
        return self._entries.get(fold_key(key))

    def entries(self) -> list[tuple[str, str]]:
        """(key, value) of every element, in the spec's order: `postmap -s`."""
        return list(self._entries.items())


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


def open_inline(spec: str, name: str) -> InlineTable:
    return InlineTable(spec, _parse_inline(spec, name))


def open_static(spec: str, name: str) -> StaticTable:
    return StaticTable(spec, _parse_static(spec, name))


def table_entries(spec: str) -> tuple[tuple[str, str], ...] | None:
    """(key, value) of each entry of an inline: spec (keys in lower case, in order), ("", value) of a static:
    one, none of a fail: one; None for a table of another type (its entries are not in the spec). Raises
    ConfigError for a malformed spec."""
    kind, name = table_type(spec), spec.partition(":")[2]
    if kind == "inline":
        return tuple(_parse_inline(spec, name).items())
    if kind == "static":
        return (("", _parse_static(spec, name)),)
    if kind == "fail":
        return ()
    return None
