"""`cidr:/path` tables (cidr_table(5)): the first rule whose network holds the key's IP address answers.

The file, as Postfix 3.7's dict_cidr.c and cidr_match.c read it (postmap(1) input lines: `#` comments, a line
starting with whitespace continues the one before):
    NETWORK/LENGTH  result     `192.0.2.0/24`, `2001:db8::/32`; its host bits must be zero (`10.1.2.3/8` is
                               refused: "…, perhaps you should use "10.0.0.0/8" instead")
    ADDRESS  result            one address (all bits)
    !PATTERN  result           an address of the pattern's family outside it (`!` may repeat, spaces may follow)
    if PATTERN … endif         the rules between apply only to an address inside it (`if !PATTERN`: outside);
                               blocks nest; `if` and `endif` in any case
A pattern holding a colon is IPv6; it may be bracketed: `[2001:db8::1]`, `[2001:db8::]/32`, `[2001:db8::/32]`.

Keys: an IPv4 or IPv6 address as the C library's inet_pton reads it (as Postfix reads it); anything else
(`[192.0.2.1]`, `IPv6:…`, `01.2.3.4`, a host name) is not found. A key is held only by patterns of its own
family (`::ffff:192.0.2.1` is IPv6): a negated pattern or an `if` of the other family never applies. A pattern
table (`fixed = False`): check_client_access asks it the client's name (never found) and address.

Cost: the rules between two negated or `if` lines are indexed by prefix length, so a lookup costs a dict probe
per distinct length there (at most 33 for IPv4), not one test per rule; the rest is Postfix's linear walk.
Reloaded like texthash (files.Reloading).

Failure behaviour: a line Postfix skips with a warning (a bad pattern or mask, host bits set, no result, text
after `endif`, `endif` without `if`, an `if` without `endif`) makes the whole table fail with `LookupRetry`
naming file:line and Postfix's reason, as regexp: does: a table missing a rule would answer wrongly.
"""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable

from mailflow.tables.files import BLANKS, FromFile, Reloading, logical_lines, pattern_keyword, split_key

_FAMILIES = {32: socket.AF_INET, 128: socket.AF_INET6}


class _Network:
    """A parsed pattern: its size in bits (32, 128: the family), network and mask as integers."""

    def __init__(self, bits: int, net: int, length: int):
        self.bits, self.net, self.length = bits, net, length
        self.mask = _mask(bits, length)

    def holds(self, address: int) -> bool:
        """Whether the network holds `address`, one of its own family."""
        return address & self.mask == self.net


class _Rule:
    """A negated rule (a result) or an `if` (no result; `end`: the index of its endif)."""

    def __init__(self, network: _Network, negate: bool, result: str | None):
        self.network, self.negate, self.result, self.end = network, negate, result, 0

    def applies(self, bits: int, address: int) -> bool:
        """Postfix's cidr_match_entry: never for an address of the other family, negated or not."""
        return bits == self.network.bits and self.network.holds(address) != self.negate


class _Run:
    """Consecutive plain rules, indexed: family -> [(mask, {network: (position, result)})]; the first of the
    rules holding an address is the one with the lowest position."""

    def __init__(self) -> None:
        self._by_length: dict[int, dict[int, dict[int, tuple[int, str]]]] = {32: {}, 128: {}}
        self._size = 0
        self.index: dict[int, list[tuple[int, dict[int, tuple[int, str]]]]] = {32: [], 128: []}

    def add(self, network: _Network, result: str) -> None:
        self._by_length[network.bits].setdefault(network.length, {}).setdefault(network.net, (self._size, result))
        self._size += 1

    def seal(self) -> None:
        """Build the index once the run is complete."""
        self.index = {bits: [(_mask(bits, length), nets) for length, nets in lengths.items()]
                      for bits, lengths in self._by_length.items()}

    def find(self, bits: int, address: int) -> str | None:
        best = None
        for mask, nets in self.index[bits]:
            hit = nets.get(address & mask)
            if hit is not None and (best is None or hit[0] < best[0]):
                best = hit
        return best[1] if best is not None else None


def _mask(bits: int, length: int) -> int:
    return ((1 << length) - 1) << (bits - length)


def _packed(bits: int, text: str) -> int | None:
    try:
        return int.from_bytes(socket.inet_pton(_FAMILIES[bits], text), "big")
    except (OSError, ValueError):  # not an address (ValueError: a NUL or a surrogate in the text)
        return None


def key_address(key: str) -> tuple[int, int] | None:
    """(bits, address) of a key, the family told by a colon as Postfix tells it; None when it is no address."""
    bits = 128 if ":" in key else 32
    address = _packed(bits, key)
    return None if address is None else (bits, address)


def parse_network(pattern: str) -> _Network:
    """cidr_match_parse: `addr`, `addr/len`, `[addr]`, `[addr]/len`, `[addr/len]`; ValueError in Postfix's words."""
    if pattern.startswith("["):
        inside, bracket, after = pattern[1:].partition("]")
        if not bracket:
            raise ValueError(f"missing ']' character after \"[{inside}\"")
        if after and not after.startswith("/"):
            raise ValueError(f"garbage after \"[{inside}]\"")
        address, slash, length = (inside, "/", after[1:]) if after else inside.partition("/")
    else:
        address, slash, length = pattern.partition("/")
    bits = 128 if ":" in address else 32
    if not slash:
        net = _packed(bits, address)
        if net is None:
            raise ValueError(f"bad address pattern: \"{address}\"")
        return _Network(bits, net, bits)
    return _masked_network(bits, address, length)


def _masked_network(bits: int, address: str, length: str) -> _Network:
    net = _packed(bits, address)
    if not (length.isascii() and length.isdigit()):
        reason = "bad mask value"
    elif int(length) > bits:
        reason = "bad mask length"
    elif net is None:
        reason = "bad network value"
    else:
        network = _Network(bits, net & _mask(bits, int(length)), int(length))
        if network.net != net:
            better = socket.inet_ntop(_FAMILIES[bits], network.net.to_bytes(bits // 8, "big"))
            raise ValueError(f"non-null host address bits in \"{address}/{length}\", perhaps you should use "
                             f"\"{better}/{network.length}\" instead")
        return network
    raise ValueError(f"{reason} in \"{address}/{length}\"")


def _negations(text: str) -> tuple[bool, str]:
    """Leading `!` and spaces: (negated, the rest)."""
    negate = False
    for i, c in enumerate(text):
        if c == "!":
            negate = not negate
        elif c not in BLANKS:
            return negate, text[i:]
    return negate, ""


def _parse_rule(line: str) -> _Rule | tuple[_Network, str] | None:
    """One logical line: an `if` or a negated rule (_Rule), a plain rule (network, result), or None (endif)."""
    keyword, text = pattern_keyword(line)  # (the regexp: and pcre: tables' test: Postfix's strncasecmp, !ISALNUM)
    if keyword == "if":
        negate, pattern = _negations(text)
        if not pattern:
            raise ValueError("no address pattern")
        return _Rule(parse_network(pattern), negate, None)
    if keyword == "endif":
        if text:
            raise ValueError("garbage after ENDIF")
        return None
    negate, rest = _negations(line)
    pattern, result = split_key(rest)
    if not pattern:
        raise ValueError("no address pattern")
    network = parse_network(pattern)
    if not result:
        raise ValueError("no lookup result")
    return _Rule(network, negate, result) if negate else (network, result)


def parse_cidr(source: str) -> list[_Run | _Rule | None]:
    """The steps of a file: runs of plain rules, negated rules and ifs, None for an endif."""
    steps: list[_Run | _Rule | None] = []
    open_ifs: list[tuple[int, _Rule]] = []  # (line, rule) of the ifs not yet ended
    for number, line in logical_lines(source):
        try:
            rule = _parse_rule(line)
            if rule is None and not open_ifs:
                raise ValueError("ENDIF without IF")
        except ValueError as e:
            raise ValueError(f"line {number}: {e}") from None
        if isinstance(rule, tuple):
            run = steps[-1] if steps else None
            if not isinstance(run, _Run):
                run = _Run()
                steps.append(run)
            run.add(*rule)
            continue
        if rule is None:
            open_ifs.pop()[1].end = len(steps)
        elif rule.result is None:
            open_ifs.append((number, rule))
        steps.append(rule)
    if open_ifs:
        raise ValueError(f"line {open_ifs[-1][0]}: IF has no matching ENDIF")
    for step in steps:
        if isinstance(step, _Run):
            step.seal()
    return steps


def _lookup(steps: list[_Run | _Rule | None], key: str) -> str | None:
    found = key_address(key)
    if found is None:
        return None
    bits, address = found
    i = 0
    while i < len(steps):
        step = steps[i]
        i += 1
        if isinstance(step, _Run):
            result = step.find(bits, address)
            if result is not None:
                return result
        elif step is not None:
            if step.applies(bits, address):
                if step.result is not None:
                    return step.result
            elif step.result is None:
                i = step.end + 1  # an if that does not apply: past its endif
    return None


class CidrTable(FromFile):
    fixed = False  # a pattern table: asked full keys only
    blocking = False  # answers from memory; the file is re-read off the loop (see Reloading)

    def __init__(self, name: str, path: Path, clock: Callable[[], float]):
        self.name = name
        self._file = Reloading(name, path, clock, parse_cidr)

    def lookup(self, key: str) -> str | None:
        return _lookup(self._file.current(), key)
