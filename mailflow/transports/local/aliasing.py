"""Local alias and .forward expansion: what Postfix's local(8) does before it writes a mailbox.

`LocalExpander(config, rewriter).expand(address, delivered_to=…) -> [Leaf, ...]` turns one local recipient into
what to do with it when nothing defers (`expand_recipient` gives each place it met them at, `Met`, and says whether
the recipient itself was an alias, a list with an owner- alias or a user with a .forward, for its success notice):
- `Mailbox(user, address)`: write the user's Maildir (`address` goes into Delivered-To).
- `Forward(address, sender)`: leaves local delivery; the local agent queues it as a new message, from `sender`
  when set (the owner of a mailing list), else from the message's sender.
- `Command(command, address, source, rights, sender, forward)` / `File(path, address, source, rights, sender)`:
  run a command / append to a file, as the system user `rights` (None: default_privs when mailflow is root; see
  "Whose rights"), from `sender` when set (the owner of a mailing list, as for a Forward), else the message's.
- `Pass(transport, nexthop, address)`: hand the address to another transport (mailbox_transport,
  fallback_transport).
- `Refused(address, dsn, text, sender)`: cannot be delivered (unknown user, forwarding loop, restricted command
  or file); `sender`: the list owner its failure is reported to (a restricted file under a list, as local(8)).

Rules, as local(8):
0. An address met again at a nesting level it was met at already in the expansion gets nothing more, as local(8)'s
   duplicate filter keys it ("recipient LEVEL ADDRESS"; `MEMBER_LEVELS`, `INCLUDE_LEVELS`): a list's member
   resubmitted settles it for that name met later in a .forward at that level (seeds 7113, 7116). (Where the first
   place is on a line a deferral keeps local(8) from reading, it still settles it here.)
1. An address already named in a `Delivered-To:` header of the message is a forwarding loop (5.4.6).
2. `alias_maps` (key: the local part with its extension, then without): the value list replaces the address.
   An alias that lists itself (`alice: alice, bob`) sends that name on to step 3 (Postfix's exp_from); an alias
   met again, on another branch or in a cycle (`a: b`, `b: a`), is expanded again at its deeper level, as
   local(8): an address met past NESTING_LIMIT (less ALIAS_CHECK_LEVELS), alias or not, is Refused 5.4.6
   `alias database loop for NAME` (local(8)'s deliver_alias), so a cycle, and a chain of 25 aliases and more,
   ends there, each address at a level once (rule 0), and what the walk reads first at its deep end (an
   :include: file, read once) is not read again above it (seeds 7158, 7019, 7027, 7031). An alias met again
   through an :include: file or a user's .forward is expanded again in the same way, under that file: the user
   met in its own .forward again its mailbox (rule 4).
   Addresses in the list are qualified with myorigin; one that trivial-rewrite resolves to the local transport is
   expanded here again, any other becomes a Forward.
   Mailing lists (local(8)): when an alias `name` has an `owner-name` alias, everything its expansion sends on
   goes out from `owner-name@myorigin` (so its bounces reach the owner), its commands and files get that sender
   too (and no original recipient: local(8) drops the DSN ORCPT of a list), and a local address in its expansion
   that is no alias is not delivered here but resubmitted (a Forward): the new message passes cleanup, so
   canonical and virtual alias maps apply to it again. The same resubmission holds for every address of an
   `:include:` file (with the sender unchanged unless an owner- alias set it).
3. A user that local_recipient_maps do not know, or whose name cannot be a directory (a '/', a leading '.'),
   is Refused: 5.1.1 unknown user. Nothing is read for it. (`unknown_user(user, addr)`: that refusal or None; also
   what address verification answers for a local address.)
4. The user's `.forward` (`<home>/.forward+ext`, then `<home>/.forward`; home = `<maildir_base>/<user>/`)
   replaces the user; once that file is expanded, a user met again gets nothing more (met again while it is
   expanded, the mailbox: local(8)'s been_here "forward <path>" before "forward-done"). So in it, the user's own
   name (through the same file: `bob+x` in `.forward+x` but `bob` there reads `.forward`, as local(8)) means
   the mailbox, and so does `\\bob`, which is `bob` (local(8) drops the backslash as it reads the line: in
   `.forward+x` it reads `.forward` too, and gets the mailbox only when that file is open already or absent); an
   alias is expanded in place (local(8)'s deliver_switch looks aliases up first; `forwarder`: its local users
   other than the .forward's own are resubmitted, dotforward's owner attribute); every other address, local or
   not, becomes a Forward (a new message, so that virtual aliases apply and a loop between users ends at
   Delivered-To). Each `.forward` is read once an expansion, however often its user is met (as root a read is a
   fork as the user).
5. Otherwise the user's mailbox (`Mailbox`), as local(8)'s mailbox.c and unknown.c route it: with
   local.mailbox_transport a `Pass(transport, nexthop, address)` for any user, known or not (the local agent
   hands the address to that transport); else for a user rule 3 refuses, local.fallback_transport (a Pass), or
   local.luser_relay: the address it expands to (mailflow.local_macros) is expanded as an alias member would be
   (a local one here, once: unknown in turn, or the recipient itself, it is Refused 5.1.1; another a Forward); an
   unknown local part met again in the same expansion gets nothing more (unknown.c's been_here), so a relay that
   leads back to an unknown user through an alias ends there; the relay address keeps the name of the alias that
   led to it (exp_from), so that alias met again is a user, not expanded again (Postfix 3.7's 5.1.1 for it);
   else for a known user local.mailbox_command, a `Command` of source "mailbox" (run as the user, with HOME;
   allow_mail_to_commands does not apply to it).
Whose rights (local(8)'s "delivery rights"): when mailflow runs as root and the user is also a system user
(not root), its .forward is opened as that user, by a child of asuser.call_as, and the commands, files and
:include: files the .forward names (directly or through an :include:) carry that user in `rights`: they run and
are read as the user. An :include: file an alias names and a system user other than root owns gives what it names
that owner's rights in the same way (include.c: its owner must not act as default_privs; an owner uid without a
name defers 4.3.5). Otherwise `rights` is None: as root they use `local.default_privs`, never root. The first
.forward name that exists is the one used; as local(8), it is ignored with a warning, and the user gets the
mailbox, when it is not a regular file (a symbolic link is not followed), has an owner other than root and the
user (mailflow's own user when it is not root; and root only, not hard-linked, for a user with no system
account, read as root), is world-writable, or cannot be opened for lack of permission. So a .forward cannot show
a file its user may not read: its lines would come back in the defer text.
Commands and files are allowed only from the sources in `allow_mail_to_commands` / `allow_mail_to_files`
("alias", "forward", "include"); otherwise the leaf is Refused with 5.7.1. Nothing a client sends can become
a command or file: those come only from alias values and files on this host.
`expand_recipient` gives each place a destination was met at (`Met`: the leaf, its duplicate key, the .forward
and :include: files and their lines, or outside any), in the order local(8) reads them, for the agent to read no
further line of a file once one defers and to settle each key at the first place it gets to, as local(8)'s
duplicate filter does (a file restricted on a line not got to and allowed at a later place is written, seed 7048;
one allowed there and restricted later is refused); `expand` what is delivered when nothing defers.
Duplicate leaves are dropped (one mailbox copy per local part, its extension included; addresses compared without
case; an address resubmitted once, from the sender of the first place naming it, as local(8)'s deliver_indirect,
whose filter keys the address alone (seed 7045: a list member met again under another list); a command once per
user whose expansion names it and rights, a file once per rights, a restricted one too: `_privileged`); an
:include: file met again in the same expansion (one that includes itself, two that include each other) adds nothing,
as local(8)'s duplicate filter skips it. At most EXPANSION_LIMIT places met (`Met`), EXPANSION_WORK_LIMIT
addresses visited and destinations met, remote ones too (lists of the same members each walked, a cycle walked to
the nesting limit, a .forward naming a big alias on each line: bounded by work), INCLUDE_DEPTH
nested :include: files and SMALL_FILE_LIMIT bytes of each file. Given a `leaf_budget` (the caller runs it on the
event loop), an expansion that meets more leaves than that (duplicates counted: the work, not what is kept), that
would fork a child to read a file with a user's rights, or parse a file or an alias value of more than
INLINE_FILE_BYTES, raises ExpansionTooBig.

Failures: `LookupRetry` (4.3.0) when a table cannot answer; `TemporaryError` 4.3.0 when a .forward or
:include: file cannot be read, 4.3.5 when one (or an alias value) has bad syntax, 4.6.0 beyond the limits. The
caller defers the recipient; the administrator or the user can fix the file. An alias value is read here, not when
its table loads (as local(8)): a bad one defers its alias alone, with a warning naming the table and the key.
"""
from __future__ import annotations

import errno
import logging
import os
import pwd
import stat
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple, Union

from mailflow import address
from mailflow.aliases import (AddressTarget, AliasSyntaxError, CommandTarget, FileTarget, IncludeTarget,
                              MailboxTarget, Target, parse_lines, parse_value)
from mailflow.errors import TemporaryError
from mailflow.files import FileTooLarge, read_bounded, read_regular_file_stat
from mailflow.local_macros import expand_local_macros
from mailflow.model import AddressClass
from mailflow.tables import split_extension
from mailflow.transports.local.asuser import call_as, rights_for

log = logging.getLogger("mailflow.local")

# Leaves of one recipient's expansion at most: only a runaway is stopped. Postfix's local(8) counts none (an alias
# or :include: list of 1200 members is forwarded as one message); a 1000 here deferred such lists for good. Local
# members cost ~67 us each to expand (the user's .forward looked for): 100 000 take ~7 s, which the local agent
# spends in a worker thread, not on the event loop (agent.INLINE_LEAVES).
EXPANSION_LIMIT = 100_000
# Addresses visited and destinations met in one expansion at most (duplicates too: the work, ~20-30 us each, so up
# to ~30 s in a worker thread): past it 4.6.0, as past EXPANSION_LIMIT. Bounds what dedup hides: `all: l1..ln` with
# each li naming `u1..un` visits n*n addresses for n leaves kept (as local(8) does, each uj passed over after its
# first visit), a cycle walked to the nesting limit with its remote members met at each level, a .forward naming a
# big list on each line.
EXPANSION_WORK_LIMIT = 10 * EXPANSION_LIMIT
INLINE_VISITS_PER_LEAF = 4  # addresses visited on the event loop per leaf of its budget at most; more: a thread
SMALL_FILE_LIMIT = 1_000_000  # bytes of a .forward or :include: file read at most
INLINE_FILE_BYTES = 16_384  # bytes of such a file (or alias value) parsed on the event loop at most (~5 ms); more: a
# worker thread
INCLUDE_DEPTH = 10


Lines = tuple[tuple[int, int], ...]  # a place: (file, line) of each .forward or :include: file it was read in
FileLines = tuple[tuple[Target, ...], ...]  # what a .forward or :include: file names, line by line


@dataclass(frozen=True)
class Mailbox:
    user: str
    address: str


@dataclass(frozen=True)
class Forward:
    address: str
    sender: str | None = None  # the new message's envelope sender; None: the message's own
    goes_to: str = ""  # the address qmgr delivers the copy to, when its resolve takes `address` apart (a mailbox-
    # form name holding an @, `"\\\\x@elsewhere.test"@myorigin`, goes to `"\\\\x"@elsewhere.test`): local's log names it


@dataclass(frozen=True)
class Command:
    command: str
    address: str
    source: str
    rights: str | None = None  # the system user it runs as (a .forward's owner); None: default_privs as root
    sender: str | None = None  # the envelope sender it is given (a mailing list's owner); None: the message's
    forward: bool = False  # named by a user's .forward (directly or through :include:): it gets the user's HOME


@dataclass(frozen=True)
class File:
    path: str
    address: str
    source: str
    rights: str | None = None  # the system user it is written as; None: default_privs as root
    sender: str | None = None  # the envelope sender its entry names (a mailing list's owner); None: the message's


@dataclass(frozen=True)
class Pass:
    """The recipient `address` handed to another transport (local.mailbox_transport, local.fallback_transport:
    Postfix's deliver_pass); `nexthop` "" means the nexthop local was given."""

    transport: str
    nexthop: str
    address: str


@dataclass(frozen=True)
class Refused:
    address: str
    dsn: str
    text: str
    sender: str | None = None  # a list's owner its failure is reported to (a restricted file of the list)


Leaf = Union[Mailbox, Forward, Command, File, Pass, Refused]


class Met(NamedTuple):
    """A destination met at one place of an expansion: the `leaf`, its duplicate `key` (local(8)'s been_here: the
    first place the local agent gets to settles it) and the `place` it was read at, the .forward and :include: files
    and their lines, outermost first (the expansion's file number, the line's; `()` outside any file, which no
    deferral stops)."""

    leaf: Leaf
    key: tuple
    place: Lines


def first_of_each_key(met: list[Met]) -> list[Leaf]:
    """The leaf of each key's first place: what is delivered when nothing defers."""
    settled: set[tuple] = set()
    leaves = []
    for leaf, key, _ in met:
        if key not in settled:
            settled.add(key)
            leaves.append(leaf)
    return leaves


def read_small_file(path: Path) -> str | None:
    """The file's text, None when it does not exist. Raises TemporaryError when it cannot be read, is not a regular
    file (a .forward naming :include: of a FIFO must not hold the delivery, nor :include:/dev/zero fill memory), is
    world-writable (anyone could name its members: local(8) refuses such an :include: file too) or is larger than
    SMALL_FILE_LIMIT."""
    data = _small_file_bytes(path)
    return None if data is None else _small_text(path, data)


def _small_file_bytes(path: Path) -> bytes | None:
    """`read_small_file`'s bytes, not decoded yet (their number is what the event loop's limit counts)."""
    found = _small_file_bytes_stat(path)
    return None if found is None else found[0]


def _small_file_bytes_stat(path: Path) -> tuple[bytes, os.stat_result] | None:
    """`_small_file_bytes`, and the fstat() of the file read (whose owner an :include: file's rights come from)."""
    try:
        data, st = read_regular_file_stat(path, SMALL_FILE_LIMIT)
    except FileNotFoundError:
        return None
    except FileTooLarge:
        raise TemporaryError("4.3.0", f"cannot read {path}: larger than {SMALL_FILE_LIMIT} bytes") from None
    except OSError as e:  # RefusedFile: "is a FIFO, not a regular file"
        raise TemporaryError("4.3.0", f"cannot read {path}: {e.strerror}") from None
    if st.st_mode & stat.S_IWOTH:
        raise TemporaryError("4.3.0", f"cannot read {path}: world writable")
    return data, st


def _small_file_bytes_as(path: Path, user: str, queue_id: str = "") -> bytes | None:
    """`_small_file_bytes` with `user`'s rights (asuser.call_as: a child forked for it; this process stays root);
    the child's log lines keyed by `queue_id`."""
    data = call_as(user, f"read {path}", _file_or_nothing, path, queue_id=queue_id)
    return None if data[:1] == b"N" else data[1:]


def _small_text(path: Path, data: bytes) -> str:
    """A small file's bytes as text; TemporaryError 4.3.0 past SMALL_FILE_LIMIT or when they are not UTF-8."""
    if len(data) > SMALL_FILE_LIMIT:
        raise TemporaryError("4.3.0", f"cannot read {path}: larger than {SMALL_FILE_LIMIT} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TemporaryError("4.3.0", f"cannot read {path}: {e}") from None


def _file_or_nothing(path: Path) -> bytes:
    """"F" and the file's bytes (as `_small_file_bytes` gives them), "N" when there is no such file; raises
    TemporaryError as it does (asuser.call_as carries it to the caller)."""
    data = _small_file_bytes(path)
    return b"N" if data is None else b"F" + data


def read_forward(path: Path, owners: tuple[int, ...], single_link: bool = False) -> bytes:
    """A .forward, with the rights of the caller (in a child: asuser.call_as): "F" and its bytes; "N" when it does
    not exist; "I" and a warning when it exists but local(8) would not use it (not a regular file, a symbolic link
    included; owned by a uid not in `owners`; world-writable; more than one link with `single_link`; cannot be
    opened for lack of permission). Raises OSError when it cannot be read for another reason."""
    try:  # O_NONBLOCK: a FIFO planted there opens at once and is refused below, instead of holding the delivery
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return b"N"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"Ifile {path} is not a regular file".encode()
        if e.errno in (errno.EACCES, errno.EPERM):
            return f"Icannot open file {path}: {e.strerror}".encode()
        raise
    try:
        st = os.fstat(fd)
        problem = _forward_problem(st, owners, single_link)
        if problem:
            return f"Ifile {path} {problem}".encode()
        with os.fdopen(os.dup(fd), "rb") as f:
            return b"F" + read_bounded(f, st.st_size, SMALL_FILE_LIMIT)
    finally:
        os.close(fd)


def _forward_problem(st: os.stat_result, owners: tuple[int, ...], single_link: bool) -> str:
    """Why local(8) would pass over a .forward with this status ("" when it would not)."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid not in owners:
        return f"has bad owner uid {st.st_uid}"
    if st.st_mode & stat.S_IWOTH:
        return "is world writable"
    if single_link and st.st_nlink > 1:
        return f"has {st.st_nlink} links"
    return ""


def forward_reader(user: str, forking: Callable[[], None] = lambda: None,
                   queue_id: str = "") -> tuple[str | None, Callable[[Path], bytes]]:
    """Whose rights a user's .forward carries (see "Whose rights"), and how to read it: as root, a system user's
    own rights in a child forked only when the file is there (`forking()` called first; its log lines keyed by
    `queue_id`); root's for a user with no system account (only root's own single-link files); mailflow's own
    user's when it is not root."""
    if os.geteuid() != 0:
        return None, partial(read_forward, owners=(0, os.geteuid()))
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        uid = 0
    if uid == 0:
        return None, partial(read_forward, owners=(0,), single_link=True)

    def as_user(path: Path) -> bytes:
        if not os.path.lexists(path):
            return b"N"
        forking()
        return call_as(user, f"read {path}", read_forward, path, (0, uid), queue_id=queue_id)
    return user, as_user


@dataclass(frozen=True)
class _Origin:
    """Where an address came from: the alias name, or the local part a .forward was read for (`bob+x` for .forward+x),
    whose expansion named it (`name`, local(8)'s exp_from), the kind of that expansion ("alias" or "forward"), the
    source for allow_mail_to_* ("alias", "forward", "include"), and the address that was expanded. `owner`: the
    sender of what this expansion sends on (an owner- alias's address); `resubmit`: local users it reaches get a new
    message instead of a delivery here (a mailing list with an owner, or an :include: file; an alias named in an
    :include: file that a user's .forward led to, with no list between, is judged as in the .forward itself:
    local(8)'s deliver_switch looks aliases up before it forwards an :include: file's addresses, and the owner
    attribute the alias's members meet is then the .forward's user, not an address); `rights`: the system user whose
    rights its commands, files and :include: files use (a .forward's owner), None: default_privs; `forwarder`: the
    user whose .forward this expansion is in (local(8)'s owner attribute that dotforward sets): a local user reached
    here other than it is resubmitted, it itself gets its mailbox; `level`: the nesting level local(8) visits the
    addresses named here at (`_Expansion.first_visit`)."""

    name: str | None = None
    kind: str = "alias"
    source: str = "alias"
    address: str | None = None
    owner: str | None = None
    resubmit: bool = False
    rights: str | None = None
    forwarder: str | None = None
    level: int = 1  # (the recipient's own: local(8)'s deliver_recipient counts one from 0)


# Nesting levels local(8) counts between a recipient and the addresses it leads to, one for each of its functions
# on the way (deliver_recipient, deliver_switch, deliver_alias or deliver_dotforward or deliver_unknown,
# deliver_resolve_tree): an alias's members, a .forward's and a luser_relay address are 4 deeper than the recipient
# expanded, and an :include: file's are 1 deeper than those of the alias or file naming it (deliver_include).
MEMBER_LEVELS = 4
INCLUDE_LEVELS = 1
# local(8)'s deliver_alias bounces every address it is given past this level, alias or not ("alias database loop for
# NAME"): an alias chain or cycle ends there. It counts 2 levels from the address's own (deliver_switch's, its own).
NESTING_LIMIT = 100
ALIAS_CHECK_LEVELS = 2


class ExpansionTooBig(Exception):
    """An expansion given a `leaf_budget` grew past it, or was about to fork a child (a file read with a user's
    rights): too big for the event loop, the caller makes it again off it."""


class _Expansion:
    """The state of one recipient's expansion: what was seen, what came out."""

    def __init__(self, delivered_to: frozenset[str], warn: Callable[[str], None], leaf_budget: int | None = None,
                 queue_id: str = ""):
        self.delivered_to = delivered_to
        self.queue_id = queue_id  # (what the lines of a child reading a file as a user are keyed by)
        self.warn = warn
        self.leaf_budget = leaf_budget
        self.forwards_done: set[str | None] = set()  # .forward files expanded (local(8)'s "forward-done")
        self.forward_files: dict[Path, tuple[bool, FileLines | None]] = {}  # each .forward looked for: whether it is
        # there and its lines (None: the mailbox); read once an expansion (as root, a fork as its user each time)
        self.forwards_open: set[str | None] = set()  # .forward files being expanded (local(8)'s been_here
        # "forward <path>" without "forward-done": its user met again inside, through it, gets the mailbox)
        self.includes_done: set[tuple[str | None, str]] = set()  # (rights, path) of the :include: files read
        self.recipients: set[tuple[int, str]] = set()  # (level, address) of each address visited (local(8)'s
        # "recipient LEVEL ADDRESS")
        self.met: list[Met] = []  # in the order local(8) would read them
        self.places: set[tuple[tuple, Lines]] = set()  # (key, place) of each Met
        self.kept: dict[tuple, Leaf] = {}  # by key: the leaf last met (its Mets share it while it stays the same)
        self.offered = 0  # leaves met, duplicates too: the work done, which the budget bounds
        self.visits = 0  # addresses visited, the same one again too: the work EXPANSION_WORK_LIMIT bounds
        self.relayed: set[str] = set()  # addresses luser_relay made: unknown too, they are refused
        self.unknown_done: set[str] = set()  # local parts routed as unknown users already (local(8)'s been_here)
        self.kind = ""  # how the recipient itself was expanded: "alias" (an alias or .forward), "list", "" not
        self.files = 0  # .forward and :include: files read so far (a file's number in `Met.place`)
        self.lines: Lines = ()  # the file lines being expanded now, outermost first

    def visited(self) -> None:
        """One more address visited; TemporaryError 4.6.0 past EXPANSION_WORK_LIMIT (the leaves kept may stay few
        while lists of the same members are walked). With a `leaf_budget`, ExpansionTooBig past
        INLINE_VISITS_PER_LEAF times it: visits that add no leaf (an address met again, a .forward done) are work
        on the event loop too (`a: b1..b1000`, each bi `ghost x1000` held it 24 s)."""
        self.visits += 1
        if self.leaf_budget is not None and self.visits > INLINE_VISITS_PER_LEAF * self.leaf_budget:
            raise ExpansionTooBig()
        if self.visits > EXPANSION_WORK_LIMIT:
            raise TemporaryError("4.6.0", f"alias expansion visited more than {EXPANSION_WORK_LIMIT} addresses")

    def first_visit(self, level: int, addr: str) -> bool:
        """Whether `addr` is visited at `level` for the first time in this expansion: local(8)'s duplicate filter
        passes over an address met again at a nesting level it was met at already ("recipient LEVEL ADDRESS", case
        folded), whatever leads there (a list's member resubmitted settles it for the same name met later in a
        .forward at that level, which then gives no mailbox: seeds 7113, 7116)."""
        key = (level, addr.lower())
        if key in self.recipients:
            return False
        self.recipients.add(key)
        return True

    def parsing(self, size: int) -> None:
        """A .forward or :include: file, or an alias value, of `size` bytes is about to be parsed: past
        INLINE_FILE_BYTES too long for the event loop, where a `leaf_budget` expansion runs (a user's 1 MB .forward
        held it 0.4 s, an alias of 10 000 members 0.2 s)."""
        if self.leaf_budget is not None and size > INLINE_FILE_BYTES:
            raise ExpansionTooBig()

    def forking(self) -> None:
        """A child is about to be forked to read a file with a user's rights: a fork costs milliseconds (4 ms for
        a process of 86 MB, 64 ms for 1.1 GB), too long for the event loop, where a `leaf_budget` expansion runs."""
        if self.leaf_budget is not None:
            raise ExpansionTooBig()

    def add(self, leaf: Leaf, key: tuple | None = None) -> None:
        """`leaf` met here under `key` (default: its `identity`), unless its key was met at this place already or
        outside any file (that Met is always got to first: this one would never count), or it is a Forward met
        already (forwards are sent only when nothing defers, when the first place settles its key). Each one met is
        work (`visited`: a remote member never visits), and at most EXPANSION_LIMIT places are kept."""
        self.visited()
        self.offered += 1
        if self.leaf_budget is not None and self.offered > self.leaf_budget:  # (20 000 times one member: work too)
            raise ExpansionTooBig()
        key = identity(leaf) if key is None else key
        if (key, self.lines) in self.places or (key, ()) in self.places or (isinstance(leaf, Forward)
                                                                            and key in self.kept):
            return
        kept = self.kept.get(key)
        if len(self.met) >= EXPANSION_LIMIT:
            raise TemporaryError("4.6.0", f"alias expansion larger than {EXPANSION_LIMIT} destinations")
        if kept != leaf:  # (else shared: a list's member met on 10 000 lines is one object)
            self.kept[key] = kept = leaf
        self.places.add((key, self.lines))
        self.met.append(Met(kept, key, self.lines))


def identity(leaf: Leaf) -> tuple:
    """What makes two leaves the same delivery: one mailbox copy per local part (with its extension, without case:
    local(8)'s been_here "mailbox", so `alice` and `alice+x` are two copies), addresses compared without case (the
    local agent also keeps a request's mailbox deliveries by it: one copy per local part per request)."""
    if isinstance(leaf, Mailbox):
        return "mailbox", address.split(leaf.address)[0].lower()
    if isinstance(leaf, Forward):
        return "forward", leaf.address.lower()  # (once, from the first list met: local(8)'s "indirect ADDRESS")
    if isinstance(leaf, Command):  # mailbox_command runs once per address (it is given RECIPIENT, EXTENSION); the
        return "command", leaf.rights, leaf.command, leaf.address.lower()  # others' key: LocalExpander._privileged
    if isinstance(leaf, Pass):
        return "pass", leaf.address.lower()
    if isinstance(leaf, File):
        return "file", leaf.rights, leaf.path
    return "refused", leaf.address.lower(), leaf.dsn, leaf.text


def is_safe_user(user: str) -> bool:
    """A name that can be a directory under maildir_base: no '/', no leading '.', no control characters."""
    return bool(user) and "/" not in user and not user.startswith(".") and user.isprintable()


class LocalExpander:
    def __init__(self, config, rewriter):
        self._config = config
        self._rewriter = rewriter
        self.tables = rewriter.tables  # `await expander.tables.run(...)` on the event loop

    def home(self, user: str) -> Path:
        return Path(self._config.local.maildir_base) / user

    def expand(self, addr: str, *, delivered_to: frozenset[str] = frozenset(),
               warn: Callable[[str], None] = log.warning) -> list[Leaf]:
        """What is delivered when nothing defers (`first_of_each_key`). `warn(text)`: told of what local(8) logs as
        a warning and passes over (an ignored .forward)."""
        return first_of_each_key(self.expand_recipient(addr, delivered_to=delivered_to, warn=warn)[0])

    def expand_recipient(self, addr: str, *, delivered_to: frozenset[str] = frozenset(),
                         warn: Callable[[str], None] = log.warning,
                         leaf_budget: int | None = None, queue_id: str = "") -> tuple[list[Met], str]:
        """Each destination met at each place that may count (`Met`), in the order local(8) reads them, and how
        the recipient itself was expanded, for its success notice (local(8)'s DSN "expanded"): "alias" by an alias
        or its .forward, "list" by an alias with an owner- alias (the sender replaced), "" not at all (its own
        mailbox, or a refusal). `leaf_budget`: raise ExpansionTooBig rather than go past that many leaves.
        `queue_id`: keys the log lines of the children reading files as users."""
        state = _Expansion(frozenset(a.lower() for a in delivered_to), warn, leaf_budget, queue_id)
        self._visit(state, self._rewriter.qualify(addr), _Origin())
        return state.met, state.kind

    def _visit(self, state: _Expansion, addr: str, origin: "_Origin") -> None:
        state.visited()
        if not state.first_visit(origin.level, addr):
            return
        if addr.lower() in state.delivered_to:
            state.add(Refused(addr, "5.4.6", f"mail forwarding loop for {addr}"))
            return
        local, domain = address.split(addr)
        user, ext = split_extension(local.lower(), self._config.recipient_delimiter)
        looped = _looked_up_name(local.lower(), user, ext, origin.name)
        if origin.level + ALIAS_CHECK_LEVELS > NESTING_LIMIT and looped is not None:
            state.add(Refused(addr, "5.4.6", f"alias database loop for {looped}"))  # (alias or not)
            return
        found = self._rewriter.alias(addr)
        if found is not None and found[1].lower() != origin.name:
            self._alias(state, addr, found, origin)
            return
        if origin.resubmit:
            state.add(Forward(addr, origin.owner))  # local(8): a list member is a new message, not a delivery
            return
        if origin.forwarder not in (None, user):  # (local(8)'s owner attribute: another user than the .forward's)
            state.add(Forward(addr, origin.owner))
            return
        if self.unknown_user(user, addr) is not None:
            self._mailbox(state, user, addr, origin)  # mailbox_transport, or local(8)'s unknown.c
            return
        path, rights, forward = self._forward_file(state, user, ext)
        if path in state.forwards_done:
            return  # this .forward was expanded already: nothing more for this user
        if forward is None or path in state.forwards_open:  # (named in itself: the mailbox)
            self._mailbox(state, user, addr, origin)
            return
        if origin.address is None:  # the recipient's own .forward
            state.kind = "alias"
        state.forwards_open.add(path)
        try:
            self._lines(state, addr, forward,
                        _Origin(local.lower(), "forward", "forward", addr, rights=rights,
                                forwarder=user, level=origin.level + MEMBER_LEVELS))
        finally:
            state.forwards_open.discard(path)
        state.forwards_done.add(path)

    def _alias(self, state: _Expansion, addr: str, found: tuple[str, str, str], origin: "_Origin") -> None:
        table, key, value = found
        name = key.lower()
        state.parsing(len(value))  # (its parse is linear in its characters: 10 000 members held the loop 0.2 s)
        try:
            targets = parse_value(value, f"{table} {key!r}")
        except AliasSyntaxError as e:  # (Postfix's local reads a value only now, and so does this: see aliases.py)
            state.warn(f"{table}: bad value for key {key!r}: {e.reason}")
            raise TemporaryError("4.3.5", f"bad alias value for {key!r} in {table}: {e.reason}") from None
        owner, resubmit = origin.owner, origin.resubmit
        if origin.source == "include" and origin.forwarder is not None and origin.owner is None:
            resubmit = False  # (an alias in an :include: file a user's .forward led to: see _Origin.resubmit)
        listed = self._rewriter.alias(f"owner-{name}@{address.split(addr)[1]}") is not None
        if listed:
            owner, resubmit = self._rewriter.qualify(f"owner-{name}"), True
        if origin.address is None:  # the recipient itself is the alias
            state.kind = "list" if listed else "alias"
        self._targets(state, addr, targets, _Origin(name, "alias", "alias", addr, owner,
                                                    resubmit, forwarder=origin.forwarder,
                                                    level=origin.level + MEMBER_LEVELS))

    def _forward_file(self, state: _Expansion, user: str, ext: str
                      ) -> tuple[str | None, str | None, tuple[tuple[Target, ...], ...] | None]:
        """The user's .forward (its path, None when there is none), the rights it carries and what it names, line
        by line; None for the mailbox (no .forward, an empty one, or one local(8) ignores)."""
        rights, read = forward_reader(user, state.forking, state.queue_id)
        for name in ([f".forward{ext}"] if ext else []) + [".forward"]:
            path = self.home(user) / name
            if path not in state.forward_files:  # (met again: a user in its own .forward, or in another's)
                state.forward_files[path] = self._read_forward_file(state, path, read)
            there, lines = state.forward_files[path]
            if there:
                return str(path), rights, lines
        return None, rights, None

    def _read_forward_file(self, state: _Expansion, path: Path, read: Callable[[Path], bytes]
                           ) -> tuple[bool, FileLines | None]:
        """Whether the .forward `path` is there, and what it names, line by line (None: the mailbox)."""
        try:
            found = read(path)
        except OSError as e:
            raise TemporaryError("4.3.0", f"cannot read {path}: {e.strerror or e}") from None
        if found[:1] == b"I":
            state.warn(found[1:].decode("utf-8", "replace"))
            return True, None
        if found[:1] == b"F":
            state.parsing(len(found) - 1)
            lines = self._parse(_small_text(path, found[1:]), path)
            return True, lines if any(lines) else None  # an empty one: the mailbox
        return False, None

    def _lines(self, state: _Expansion, owner: str, lines: tuple[tuple[Target, ...], ...], origin: "_Origin",
               depth: int = 0) -> None:
        """A .forward's or :include: file's targets, each line's leaves met at the file (numbered in this
        expansion) and the line (`Met.place`), for the agent to read no further line once one defers."""
        state.files += 1
        file, outer = state.files, state.lines
        try:
            for number, targets in enumerate(lines):
                state.lines = outer + ((file, number),)
                self._targets(state, owner, targets, origin, depth)
        finally:
            state.lines = outer

    def _targets(self, state: _Expansion, owner: str, targets, origin: "_Origin", depth: int = 0) -> None:
        for target in targets:
            if isinstance(target, AddressTarget):
                self._address(state, target.address, origin)
            elif isinstance(target, MailboxTarget):
                self._backslashed(state, target.address, origin)
            elif isinstance(target, CommandTarget):
                command = Command(target.command, owner, origin.source, origin.rights, origin.owner,
                                  origin.kind == "forward")
                self._privileged(state, command, self._config.local.allow_mail_to_commands, "command")
            elif isinstance(target, FileTarget):
                self._privileged(state, File(target.path, owner, origin.source, origin.rights, origin.owner),
                                 self._config.local.allow_mail_to_files, "file")
            elif isinstance(target, IncludeTarget):
                self._include(state, owner, target.path, origin, depth)

    def _address(self, state: _Expansion, text: str, origin: "_Origin") -> None:
        """An alias or .forward result that resolves to local delivery is expanded here (`_visit`: under a .forward
        an alias in place, the .forward's owner its mailbox, another local user a new message, so that virtual
        aliases apply to it and a loop between users' .forward files ends at Delivered-To); any other leaves."""
        addr = self._rewriter.qualify(text)
        if self._is_local_delivery(addr):
            self._visit(state, addr, origin)
        else:
            state.add(Forward(addr, origin.owner))

    def _backslashed(self, state: _Expansion, text: str, origin: "_Origin") -> None:
        """`\\\\user` (aliases.MailboxTarget), as local(8)'s recipient.c takes an address that still starts with a
        backslash: qualified with myorigin, and when that is local the user's mailbox (`_mailbox`: mailbox_transport,
        an unknown user's routes), with no alias lookup, no .forward and no resubmission, even under a list or in an
        :include: file; when it is not local, a Forward of `"\\\\user"@myorigin`, the backslash kept, as Postfix 3.7.11
        forwards it (its resolve.c rewrites and resolves the address as it is)."""
        state.visited()
        if text.startswith("\\"):  # (a name left with a backslash: `"\\\\user"`, `\\\\user`)
            text = address.quoted_local(text)
        addr = self._rewriter.qualify(text)
        local, domain = address.split_words(addr)
        name = address.as_internal_local(local)
        if not self._is_local_delivery(addr):  # (the backslash kept: the next hop's local(8) reads the mailbox form)
            forward = f"{address.quoted_local(chr(92) + name)}@{domain}"
            goes_to = self._rewriter.resolve(forward).address if "@" in name else ""
            state.add(Forward(forward, origin.owner, goes_to=goes_to if goes_to != forward else ""))
            return
        user = split_extension(name.lower(), self._config.recipient_delimiter)[0]
        self._mailbox(state, user, addr, origin)

    def _is_local_delivery(self, addr: str) -> bool:
        res = self._rewriter.resolve(addr)
        local_name = self._config.local_transport.partition(":")[0]
        return res.address_class is AddressClass.LOCAL and res.transport == local_name

    def unknown_user(self, user: str, addr: str) -> Refused | None:
        """Rule 3: the refusal of `user` (the mailbox name of `addr`), None when it may have a mailbox. May raise
        LookupRetry."""
        if is_safe_user(user) and self._rewriter.is_local_user(addr):
            return None
        return Refused(addr, "5.1.1", f"unknown user: \"{user}\"")

    def _mailbox(self, state: _Expansion, user: str, addr: str, origin: "_Origin") -> None:
        """Rule 5, as local(8)'s mailbox.c: local.mailbox_transport (for any user, known or not), else for an
        unknown user `_unknown`, else local.mailbox_command, else the mailbox."""
        local = self._config.local
        if local.mailbox_transport:
            state.add(_pass(local.mailbox_transport, addr))
            return
        refused = self.unknown_user(user, addr)
        if refused is not None:
            self._unknown(state, addr, refused, origin)
        elif local.mailbox_command:
            state.add(Command(local.mailbox_command, addr, "mailbox", _system_user(user), forward=True))
        else:
            state.add(Mailbox(user, addr))

    def _unknown(self, state: _Expansion, addr: str, refused: Refused, origin: "_Origin") -> None:
        """A recipient that is no local user, as local(8)'s unknown.c: local.fallback_transport, else the address
        local.luser_relay expands to (expanded here when it is local, else resent), else the refusal. A relay
        address that is the recipient itself, or one that is unknown in turn, is refused. A local part met here
        again in the same expansion gets nothing more (unknown.c's been_here "deliver_unknown"): a relay that
        leads back through an alias to an unknown user ends there. The relay address keeps the alias name whose
        expansion led here (local(8)'s exp_from): met again, that alias is not expanded again but is a user (so
        `postmaster: boss` with luser_relay postmaster bounces "unknown user: postmaster", as Postfix 3.7)."""
        values = self._macro_values(addr)
        if values["local"] in state.unknown_done:
            return
        state.unknown_done.add(values["local"])
        local = self._config.local
        if local.fallback_transport:
            state.add(_pass(local.fallback_transport, addr))
            return
        if not local.luser_relay or addr.lower() in state.relayed:
            state.add(refused)
            return
        relay = self._rewriter.qualify(expand_local_macros(local.luser_relay, values))
        if relay.lower() == addr.lower():
            state.add(refused)
            return
        state.relayed.add(relay.lower())
        self._address(state, relay, _Origin(origin.name, address=addr,
                                            level=origin.level + MEMBER_LEVELS))

    def _macro_values(self, addr: str) -> dict[str, str]:
        """luser_relay's macros for `addr`, from its internal form lower-cased as local(8)'s state.msg_attr
        (`"ghost+a b"@x` has the extension `a b`, not `a b"`); $recipient the internal form as it is."""
        internal = address.internal_form(addr)
        local_part, domain = address.split(internal.lower())
        user, ext = split_extension(local_part, self._config.recipient_delimiter)
        return {"user": user, "local": local_part, "mailbox": local_part, "extension": ext[1:],
                "recipient_delimiter": ext[:1] or self._config.recipient_delimiter[:1], "domain": domain,
                "recipient": internal}

    def _privileged(self, state: _Expansion, leaf: Command | File, allowed: tuple[str, ...], kind: str) -> None:
        """A command or file its source may name; else its refusal, 5.7.1 restricted. As local(8)'s duplicate
        filter: a command runs once per user whose expansion names it (the alias name or the .forward's owner:
        `a1: "|cmd", a2` and `a2: "|cmd"` run it twice) and rights, and its restriction is judged first
        (token.c); a file is written once per rights, judged after that (file.c), so a file met first where it
        is restricted is not written where it is allowed, and one written is not refused where it is not."""
        if isinstance(leaf, Command):
            if leaf.source in allowed:
                user = split_extension(address.split(leaf.address)[0].lower(), self._config.recipient_delimiter)[0]
                state.add(leaf, ("command", leaf.rights, leaf.command, user))
            else:  # (reported to the sender, even under a list: local(8)'s bounce_append)
                state.add(Refused(leaf.address, "5.7.1", f"mail to {kind} is restricted"))
        elif leaf.source in allowed:
            state.add(leaf)
        else:  # local(8) reports a restricted file to a list's owner (bounce_workaround)
            state.add(Refused(leaf.address, "5.7.1", f"mail to {kind} is restricted", leaf.sender), identity(leaf))

    def _include(self, state: _Expansion, owner: str, path: str, origin: "_Origin", depth: int) -> None:
        done = (origin.rights, path)  # (local(8)'s "include UID PATH": named again with other rights, read again)
        if done in state.includes_done:
            return  # read once per expansion, as local(8)'s duplicate filter does: a file including itself ends
        state.includes_done.add(done)
        if depth >= INCLUDE_DEPTH:
            raise TemporaryError("4.6.0", f":include: files nested deeper than {INCLUDE_DEPTH} ({path})")
        rights = origin.rights
        user_named = origin.kind == "forward" or rights is not None
        as_user = rights_for(rights, self._config.local.default_privs) if user_named else None
        if as_user is not None:  # never root's rights for what a user names
            state.forking()
            data = _small_file_bytes_as(Path(path), as_user, state.queue_id)
        else:
            found = _small_file_bytes_stat(Path(path))
            data = None if found is None else found[0]
            if found is not None and rights is None and os.geteuid() == 0:
                rights = _include_owner(state, path, found[1].st_uid)
        if data is None:
            raise TemporaryError("4.3.0", f"cannot read :include: file {path}: no such file")
        state.parsing(len(data))  # (bytes, as a .forward's: decoded once, off the loop past INLINE_FILE_BYTES)
        text = _small_text(Path(path), data)
        included = _Origin(origin.name, origin.kind, "include", origin.address,
                           origin.owner, True, rights, origin.forwarder, origin.level + INCLUDE_LEVELS)
        self._lines(state, owner, self._parse(text, Path(path)), included, depth + 1)

    @staticmethod
    def _parse(text: str, path: Path) -> tuple[tuple[Target, ...], ...]:
        try:
            return parse_lines(text, str(path))
        except AliasSyntaxError as e:
            raise TemporaryError("4.3.5", str(e)) from None


def _include_owner(state: _Expansion, path: str, uid: int) -> str | None:
    """The rights an :include: file named where there are none yet (a root-owned alias) gives what it names, as
    local(8)'s include.c: its owner's when not root (so that the owner cannot act as default_privs), None
    (default_privs) for root's. TemporaryError 4.3.5 when the owner's uid has no name, as include.c defers it."""
    if uid == 0:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        state.warn(f"cannot find username for uid {uid}")  # (include.c's two warnings, worded as it words them)
        state.warn(f"{path}: cannot find :include: file owner username")
        raise TemporaryError("4.3.5", "mail system configuration error") from None


def _looked_up_name(local: str, user: str, ext: str, exp_from: str | None) -> str | None:
    """The first name local(8)'s deliver_alias checks the nesting level for: it is given the local part, then (with
    an extension) the user, and passes over the name its expansion came from (exp_from) before that check, so
    `bob+x` met in bob's .forward+x past the limit bounces for `bob`; None when both are that name."""
    names = (local, user) if ext else (local,)
    return next((name for name in names if name != exp_from), None)


def _pass(setting: str, addr: str) -> Pass:
    transport, _, nexthop = setting.partition(":")
    return Pass(transport, nexthop, addr)


def _system_user(user: str) -> str | None:
    """The system user whose rights a mailbox_command of `user` runs with (local(8) runs it as the recipient):
    `user` as root when it is a system user other than root; None (default_privs as root) otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        return user if pwd.getpwnam(user).pw_uid != 0 else None
    except KeyError:
        return None
