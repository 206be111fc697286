"""Local alias and .forward expansion: what Postfix's local(8) does before it writes a mailbox.

`LocalExpander(config, rewriter).expand(address, delivered_to=…) -> [Leaf, ...]` turns one local recipient into
what to do with it:
- `Mailbox(user, address)`: write the user's Maildir (`address` goes into Delivered-To).
- `Forward(address)`: leaves local delivery; the local agent queues it as a new message.
- `Command(command, address, source)` / `File(path, address, source)`: run a command / append to a file.
- `Refused(address, dsn, text)`: cannot be delivered (unknown user, forwarding loop, restricted command).

Rules, as local(8):
1. An address already named in a `Delivered-To:` header of the message is a forwarding loop (5.4.6).
2. `alias_maps` (key: the local part with its extension, then without): the value list replaces the address.
   An alias name expands once per recipient: a name met again (`alice: alice, bob`, or a loop `a: b`, `b: a`)
   goes on to step 3 instead. Addresses in the list are qualified with myorigin; one that trivial-rewrite
   resolves to the local transport is expanded here again, any other becomes a Forward.
3. A user that local_recipient_maps do not know, or whose name cannot be a directory (a '/', a leading '.'),
   is Refused: 5.1.1 unknown user. Nothing is read for it.
4. The user's `.forward` (`<home>/.forward+ext`, then `<home>/.forward`; home = `<maildir_base>/<user>/`), read
   once per user the same way; `\\user` means the user's own mailbox with no further expansion.
5. Otherwise the user's mailbox.
Commands and files are allowed only from the sources in `allow_mail_to_commands` / `allow_mail_to_files`
("alias", "forward", "include"); otherwise the leaf is Refused with 5.7.1. Nothing a client sends can become
a command or file: those come only from alias values and files on this host.
Duplicate leaves are dropped (one mailbox per user; addresses compared without case). At most EXPANSION_LIMIT leaves and INCLUDE_DEPTH nested :include: files.

Failures: `LookupRetry` (4.3.0) when a table cannot answer; `TemporaryError` 4.3.0 when a .forward or
:include: file cannot be read, 4.3.5 when one (or an alias value) has bad syntax, 4.6.0 beyond the limits. The
caller defers the recipient; the administrator or the user can fix the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

from mailflow import address
from mailflow.aliases import (AddressTarget, AliasSyntaxError, CommandTarget, FileTarget, IncludeTarget,
                              MailboxTarget, Target, parse_forward, parse_include, parse_value)
from mailflow.errors import TemporaryError
from mailflow.model import AddressClass
from mailflow.tables import split_extension

EXPANSION_LIMIT = 1000
INCLUDE_DEPTH = 10


@dataclass(frozen=True)
class Mailbox:
    user: str
    address: str


@dataclass(frozen=True)
class Forward:
    address: str


@dataclass(frozen=True)
class Command:
    command: str
    address: str
    source: str


@dataclass(frozen=True)
class File:
    path: str
    address: str
    source: str


@dataclass(frozen=True)
class Refused:
    address: str
    dsn: str
    text: str


Leaf = Union[Mailbox, Forward, Command, File, Refused]


def read_small_file(path: Path) -> str | None:
    """The file's text, None when it does not exist. Raises TemporaryError when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise TemporaryError("4.3.0", f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


class _Expansion:
    """The state of one recipient's expansion: what was seen, what came out."""

    def __init__(self, delivered_to: frozenset[str]):
        self.delivered_to = delivered_to
        self.aliases_seen: set[str] = set()
        self.forwards_seen: set[str] = set()
        self.leaves: list[Leaf] = []
        self.keys: set[tuple] = set()

    def add(self, leaf: Leaf) -> None:
        key = _identity(leaf)
        if key not in self.keys:
            if len(self.leaves) >= EXPANSION_LIMIT:
                raise TemporaryError("4.6.0", f"alias expansion larger than {EXPANSION_LIMIT} destinations")
            self.keys.add(key)
            self.leaves.append(leaf)


def _identity(leaf: Leaf) -> tuple:
    """What makes two leaves the same delivery: one mailbox per user, addresses compared without case."""
    if isinstance(leaf, Mailbox):
        return "mailbox", leaf.user
    if isinstance(leaf, Forward):
        return "forward", leaf.address.lower()
    if isinstance(leaf, Command):
        return "command", leaf.command
    if isinstance(leaf, File):
        return "file", leaf.path
    return "refused", leaf.address.lower(), leaf.dsn, leaf.text


def is_safe_user(user: str) -> bool:
    """A name that can be a directory under maildir_base: no '/', no leading '.', no control characters."""
    return bool(user) and "/" not in user and not user.startswith(".") and user.isprintable()


class LocalExpander:
    def __init__(self, config, rewriter, *, read_file: Callable[[Path], str | None] = read_small_file):
        self._config = config
        self._rewriter = rewriter
        self._read = read_file

    def home(self, user: str) -> Path:
        return Path(self._config.local.maildir_base) / user

    def expand(self, addr: str, *, delivered_to: frozenset[str] = frozenset()) -> list[Leaf]:
        state = _Expansion(frozenset(a.lower() for a in delivered_to))
        self._visit(state, self._rewriter.qualify(addr))
        return state.leaves

    def _visit(self, state: _Expansion, addr: str) -> None:
        if addr.lower() in state.delivered_to:
            state.add(Refused(addr, "5.4.6", f"mail forwarding loop for {addr}"))
            return
        found = self._rewriter.alias(addr)
        if found is not None and found[1].lower() not in state.aliases_seen:
            table, key, value = found
            state.aliases_seen.add(key.lower())
            try:
                targets = parse_value(value, f"{table} {key!r}")
            except AliasSyntaxError as e:
                raise TemporaryError("4.3.5", f"bad alias value for {key!r} in {table}: {e.reason}") from None
            self._targets(state, addr, targets, "alias", depth=0)
            return
        local, domain = address.split(addr)
        user, ext = split_extension(local.lower(), self._config.recipient_delimiter)
        if not (is_safe_user(user) and self._rewriter.is_local_user(addr)):
            state.add(Refused(addr, "5.1.1", f"unknown user: \"{user}\""))
            return
        if user not in state.forwards_seen:
            state.forwards_seen.add(user)
            forward = self._forward_file(user, ext)
            if forward is not None:
                self._targets(state, addr, forward, "forward", depth=0)
                return
        self._mailbox(state, user, addr)

    def _forward_file(self, user: str, ext: str) -> tuple[Target, ...] | None:
        names = ([f".forward{ext}"] if ext else []) + [".forward"]
        for name in names:
            path = self.home(user) / name
            text = self._read(path)
            if text is not None:
                targets = self._parse(parse_forward, text, path)
                return targets or None  # an empty .forward delivers to the mailbox
        return None

    def _targets(self, state: _Expansion, owner: str, targets, source: str, depth: int) -> None:
        domain = address.split(owner)[1]
        for target in targets:
            if isinstance(target, AddressTarget):
                self._address(state, target.address)
            elif isinstance(target, MailboxTarget):
                self._mailbox(state, target.user.lower(), f"{target.user}@{domain}")
            elif isinstance(target, CommandTarget):
                self._privileged(state, Command(target.command, owner, source),
                                 self._config.local.allow_mail_to_commands, "command")
            elif isinstance(target, FileTarget):
                self._privileged(state, File(target.path, owner, source),
                                 self._config.local.allow_mail_to_files, "file")
            elif isinstance(target, IncludeTarget):
                self._include(state, owner, target.path, depth)

    def _address(self, state: _Expansion, text: str) -> None:
        addr = self._rewriter.qualify(text)
        res = self._rewriter.resolve(addr)
        local_name = self._config.local_transport.partition(":")[0]
        if res.address_class is AddressClass.LOCAL and res.transport == local_name:
            self._visit(state, addr)
        else:
            state.add(Forward(addr))

    def _mailbox(self, state: _Expansion, user: str, addr: str) -> None:
        if is_safe_user(user) and self._rewriter.is_local_user(addr):
            state.add(Mailbox(user, addr))
        else:
            state.add(Refused(addr, "5.1.1", f"unknown user: \"{user}\""))

    def _privileged(self, state: _Expansion, leaf: Command | File, allowed: tuple[str, ...], kind: str) -> None:
        if leaf.source in allowed:
            state.add(leaf)
        else:
            state.add(Refused(leaf.address, "5.7.1", f"mail to {kind} is restricted"))

    def _include(self, state: _Expansion, owner: str, path: str, depth: int) -> None:
        if depth >= INCLUDE_DEPTH:
            raise TemporaryError("4.6.0", f":include: files nested deeper than {INCLUDE_DEPTH} ({path})")
        text = self._read(Path(path))
        if text is None:
            raise TemporaryError("4.3.0", f"cannot read :include: file {path}: no such file")
        self._targets(state, owner, self._parse(parse_include, text, Path(path)), "include", depth + 1)

    @staticmethod
    def _parse(parse, text: str, path: Path) -> tuple[Target, ...]:
        try:
            return parse(text, str(path))
        except AliasSyntaxError as e:
            raise TemporaryError("4.3.5", str(e)) from None
