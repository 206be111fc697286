"""local: delivery for the local address class (Postfix local(8)).

Per recipient of the request (one beginning with '-' bounces 5.1.3 unless allow_min_user, as in Postfix):
1. `LocalExpander.expand` (aliases, .forward; see mailflow.transports.local.aliasing), given the addresses already in
   the message's `Delivered-To:` headers so that a forwarding loop bounces (5.4.6); one past INLINE_LEAVES
   leaves (or past aliasing.INLINE_VISITS_PER_LEAF times as many addresses visited), or one that reads a .forward
   or :include: file with a user's rights (asuser.call_as's child), is made (again) in a worker thread, not on the event
   loop.
2. A `Pass` leaf (local.mailbox_transport, local.fallback_transport) is handed to that transport of `peers` (the
   registry of mailflow.transports) for that address and nexthop (none: the request's), as Postfix's deliver_pass:
   when it is the recipient's only leaf, that agent's result is the recipient's (its relay and reply, about the
   address passed; when an alias or .forward expanded the recipient, the address goes with its NOTIFY without
   SUCCESS, as alias.c passes it on, and the expansion's own notice reports success); a transport that is not
   there or raises defers 4.3.0. A mailbox_command is a Command (4.).
   Mailboxes (`mbox.mailbox_location`): `<maildir_base>/<user>/<home_mailbox>`, a Maildir when home_mailbox ends
   in "/" (the default `Maildir/`), else an mbox file; with home_mailbox "" the file `<mail_spool_directory>/<user>`.
   As root, a Maildir of a local user who is also a system user is created with that user's uid and gid
   (directories 0700, files 0600), as local(8) writes with the recipient's rights; such a user's mbox file is
   created as theirs, and one that another uid owns defers 4.2.0 (Postfix's strict_mailbox_ownership). Each
   copy starts with Return-Path, X-Original-To (the recipient as the client gave it) and Delivered-To (the
   recipient of the request, as local(8)'s: an alias's address in its members' copies, files and commands); one copy
   per local part (its extension included: `alice` and `alice+x` get two) per request, however many of its
   recipients lead there (Postfix's duplicate filter does it within one recipient's expansion, its key
   "mailbox <local part>"), and so one mailbox_command run and one pass per address (`_Filled`); a
   recipient led to one already done gets its result. mbox files get a From_
   line, mboxrd quoting and the `mailbox_delivery_lock` locks (see mailflow.transports.local.mbox).
3. Forwarded addresses (and the members of an :include: file or of a list with an owner- alias, which local(8)
   resubmits): one new message per recipient and sender, queued through cleanup by `forward(...)`, from the
   message's sender, or from the list's owner when an owner- alias names one; `Delivered-To: <recipient>`
   prepended; each new recipient keeping the recipient's NOTIFY without SUCCESS, and unless the sender changed
   its original address, ORCPT and the message's ENVID and RET; the message's client attributes go with it but
   the port (`app.forwarder`, as Postfix's local(8) forward.c).
4. Commands (allowed ones, see `_command`): run through pipe's runner as Postfix's exec_command runs them
   (`run_shell_command`: directly when the command has no shell metacharacters (a script without `#!` as
   `/bin/sh script args`, as execvp runs it), else, or when it is a bare name that is no program, `/bin/sh -c
   command`), with local(8)'s environment: USER, LOGNAME, SENDER (empty for the null sender), RECIPIENT, LOCAL;
   DOMAIN, EXTENSION and ORIGINAL_RECIPIENT when there is one; HOME=<maildir_base>/<user> and SHELL for a command a
   user's .forward names (an alias has no home); and those of CLIENT_HOSTNAME, CLIENT_ADDRESS, CLIENT_HELO,
   CLIENT_PROTOCOL, SASL_METHOD, SASL_SENDER, SASL_USERNAME the message's client attributes know (message
   context with shell-special characters replaced by '_'); the message with a From_ line, Return-Path,
   X-Original-To and Delivered-To on stdin (local(8)'s, not quoted as in an mbox); in the home (a .forward's
   command, when the home exists) or /, with umask 077 (what a command creates is its user's alone, as under
   Postfix's local(8)), when mailflow runs as root as the leaf's `rights` (the system user whose .forward named
   it) or else `default_privs`, killed after `command_time_limit`; exit statuses mapped as pipe(8) does.
   Without `commands` settings they defer (4.3.5). Under a mailing list with an owner- alias the sender is the
   owner and there is no original recipient (no ORIGINAL_RECIPIENT, no X-Original-To), as local(8) gives them.
5. Files (allowed ones): appended in mbox format under the mailbox locks (the same sender as commands); as root
   by a child (asuser.call_as) running as the leaf's `rights` or else `default_privs`; `/dev/null` discards.
   A file name ending in "/" is a Maildir, written by such a child too (mailflow.transports.local.maildir_file,
   local(8)'s deliver_maildir): its directories made as needed, "delivered to maildir".
   A file whose directory does not exist is not created (its directories neither: deferred 4.2.0 until someone
   makes it), and an executable file is not written (bounced 5.7.1 "file is executable", as local(8)). A file
   in a directory its writer may not write is appended to without the dotlock (a warning), as local(8) does.
The recipient's result (about the member, `expanded`, when an alias led it to one mailbox only, as local(8) logs it;
with `expansion` when an alias, a list or a .forward expanded it: its success notice says "alias expanded", as
local(8)'s; with `owner` when the one part that bounced was a list's command or file, or a file it may not write:
its failure notice goes to the list's owner, as local(8)'s bounce_workaround sends it; with `owned` instead when
several parts bounced (of lists with an owner- alias or not), or one or more beside a part deferred: each failure,
with its own status, text and Diagnostic-Code, is told on its own (a list's to its owner in a notice of its own,
about its list; the others to the sender, each in its one notice, about its member) and logged on a line of its own,
as bounce_workaround calls bounce_one once per failure, up to OWNED_NOTICE_LIMIT of each (past it counted); with
`diagnostic`, a failed command's `x-unix; <output>` (a program that could not be executed is told as Postfix's child
tells it, `temporary failure. Command output: local: fatal: execvp PROG: why`, or `execl /bin/sh: why` for the shell
of a command with shell metacharacters; other reasons not to run, `x-unix; <why>`), when one part failed): deferred
if any part must be retried (a retry repeats the parts already done, as local(8) does); else bounced when a part was
refused (unknown user, loop, restricted command, a command's permanent failure), the rest being delivered; else
sent, naming every destination; an expansion that came to nothing (an alias whose one :include: file includes only
itself) is sent with no log line (`unlogged`), as local(8) returns success for it and logs nothing. A recipient
deferred forwards nothing (local(8)'s forward_finish cancels the new messages: the retry sends them). Once a
destination named in a .forward or :include: file defers, those of the file's later lines (`Leaf.lines`) are left
for the retry, not tried, logged nor forwarded (local(8)'s deliver_token_stream reads no further line), unless also
named somewhere not stopped (local(8) meets it there): the places (`aliasing.Met`) are walked in the order local(8)
reads them and the first one got to settles its key (a file restricted on such a line and allowed after it is
written; allowed there and restricted after it, refused).

Failures: never raises for a recipient (what is no delivery problem, a bug, defers that recipient 4.3.0
"unknown mail transport error", logged with its traceback); an OS error writing a Maildir defers (4.2.0), but a quota or
the file size limit (EDQUOT, EFBIG; `local.mailbox_size_limit` for each mbox file, /file destination and
Maildir file) bounces 5.2.2, as Postfix's local(8) does; an mbox or file append that fails defers or bounces as
mailflow.transports.local.mbox says (busy 4.2.0, full 5.2.2, a symlink 5.2.0). The texts are local(8)'s: the
reason mbox or maildir.write_failure gives (mail_copy's, mbox_open's) after "cannot update mailbox PATH for user
USER. " (the mailbox, local/mailbox.c) or "cannot append message to file PATH: " (a /file, local/file.c); a Maildir's
"maildir delivery failed: …". A table or file that cannot be read defers (4.3.0); a forward cleanup cannot queue
defers (4.3.0).

Stop: a recipient expanded to several destinations is one result (the store has no record per destination), so a
stop's cancel between two of them would either leave it queued, its mailboxes written already written again by the
retry, or finish it with the later ones never written. Neither: the cancel waits for the rest of its destinations
(mailflow.uncut), UNCUT_LIMIT seconds at most; past that it goes through, warned. When the destination under way is
the recipient's last and in a write (a mailbox's, a file's, virtual's for a pass: an uncut within the walk), it is
left to end, and when it ends while qmgr records the results back the recipient's result is handed on
(DeliveryRequest.settled_late) and recorded; else (another may follow it, or it is in a lock wait, a command, a
forward or an LMTP pass) the delivery is cut off there, no destination after it started: the recipient stays
queued, as the warning says (its parts done are then repeated by the retry, as local(8)'s are when it is killed in
the middle of one). A recipient's one destination is not waited for as a whole: a stop's cancel cuts a lock wait,
a command, a forward or a pass at once (pipe's rules for a command that has exited), and only a mailbox or file
write under way is waited for, by its own uncut, which past the limit hands on the recipient's result to come the
same way; a pass to virtual likewise, by virtual's own write uncut (its result made the recipient's by `_pass`).
"""
from __future__ import annotations

import asyncio
import logging
import os
import pwd
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterable, Mapping, NamedTuple, Protocol

from mailflow import address
from mailflow.clock import Clock
from mailflow.config import DEFAULTS, LocalConfig
from mailflow.dsn_parameters import without_success
from mailflow.errors import DeliveryError
from mailflow.message import HEADER_READ_LIMIT, delivered_to, read_header
from mailflow.model import (ClientAttributes, DeliveryReport, DeliveryRequest, Outcome, OwnedFailure, RcptResult,
                            Recipient)
from mailflow.transports.local.aliasing import (Command, ExpansionTooBig, File, Forward, LocalExpander, Mailbox, Met,
                                                Pass, Refused, first_of_each_key, identity, is_safe_user)
from mailflow.transports.local.asuser import rights_for
from mailflow.tables import split_extension
from mailflow.transports.encode import ToLf, aencode
from mailflow.transports.maildir import MaildirWriter, Owner, mailbox_prefix, spool_missing, write_failure
from mailflow.transports.local.maildir_file import deliver_maildir_file
from mailflow.transports.local.mbox import HeldEntry, append_mbox, from_line, mailbox_location, mbox_entry
from mailflow.workers import BoundedWorkers
from mailflow.transports.pipe import (SHELL_SAFE, CommandNotRun, CommandSpool, command_spool, command_diagnostic,
                                      command_status, run_shell_command)
from mailflow.uncut import Late, SettleLate, Within, settling_late, uncut

log = logging.getLogger("mailflow.local")


class Peer(Protocol):
    """Another delivery agent (mailflow.transports.Transport) that mailbox_transport or fallback_transport name."""

    program: str

    async def deliver(self, request: DeliveryRequest) -> DeliveryReport: ...


# forward(request, recipient, addresses, content, sender=None) -> queue id of the new message; `sender` replaces
# the envelope sender (a mailing list's owner), None keeps it.
ForwardFn = Callable[..., Awaitable[str]]


@dataclass(frozen=True)
class CommandSettings:
    """How `|command` destinations run: as `default_privs` when mailflow is root, at most `time_limit` seconds,
    `output_limit` bytes of output kept for the diagnostic (Postfix default_privs, command_time_limit)."""

    default_privs: str = DEFAULTS.local.default_privs
    time_limit: float = DEFAULTS.local.command_time_limit
    recipient_delimiter: str = DEFAULTS.recipient_delimiter
    output_limit: int = 2048
    spool: CommandSpool | None = None  # where a command's input is written first (pipe.run_command); None: the system's

    @classmethod
    def from_config(cls, config) -> "CommandSettings":
        return cls(config.local.default_privs, config.local.command_time_limit, config.recipient_delimiter,
                   spool=command_spool(config))


ListOf = tuple[str, str] | None  # the list a destination was delivered for: its owner and address (None: none)


class Part(NamedTuple):
    """What one destination of a recipient got: outcome, status, text, and a failed command's Diagnostic-Code
    (`x-unix; output`, pipe.command_diagnostic)."""

    outcome: Outcome
    dsn: str
    text: str
    diagnostic: str = ""


@dataclass
class _Filled:
    """What a request's mailbox deliveries got, by the leaf's `identity`: a user's Maildir or mbox, its
    mailbox_command, an address passed to mailbox_transport (or fallback_transport) is delivered once per request
    however many recipients lead there."""

    mailboxes: dict[tuple, Part] = field(default_factory=dict)
    passes: dict[tuple, RcptResult] = field(default_factory=dict)

INLINE_LEAVES = 200  # leaves of an expansion made on the event loop at most (~14 ms of local members); more: a thread
OFF_LOOP_EXPANSIONS = 2  # expansions made in worker threads at once at most (threads of the agent's own)
FILE_WRITERS = 2  # `/file` appends made at once at most (threads of the agent's own: see `_file`)
OFF_LOOP_WAIT = 60.0  # seconds an expansion waits for one of those at most (then 4.3.0: two hung ones cannot stall all)


class LocalTransport:
    program = "local"  # the Postfix delivery agent whose name its result lines are logged under

    def __init__(self, expander: LocalExpander, *, local: LocalConfig, writer: MaildirWriter, clock: Clock,
                 forward: ForwardFn | None = None, relay: str = "local", commands: CommandSettings | None = None,
                 allow_min_user: bool = False, peers: Mapping[str, Peer] | None = None,
                 close_wait: float = DEFAULTS.shutdown_grace):
        self._close_wait = close_wait  # (the stop's grace: how long close() waits for a /file append under way)
        self._peers = {} if peers is None else peers  # the transports by name (filled after): Pass leaves
        self._allow_min_user = allow_min_user
        self._expander = expander
        self._local = local
        self._commands = commands
        self._writer = writer
        self._clock = clock
        self._forward = forward
        self._relay = relay
        # expansions only read (tables, :include: and .forward files): one stuck in a hung read must not keep the
        # stopped server from exiting; the /file writers' threads are joined at the exit (an entry is never cut)
        self._workers = BoundedWorkers(OFF_LOOP_EXPANSIONS, OFF_LOOP_WAIT, "local expansion", daemon=True)
        self._file_writers = BoundedWorkers(FILE_WRITERS, OFF_LOOP_WAIT, "local file write")  # (see `_file`)

    delivers_each = True  # one recipient after another: qmgr records each result as it comes (`deliver_each`)

    async def deliver(self, request: DeliveryRequest) -> DeliveryReport:
        return await DeliveryReport.gathered(request.recipients, self.deliver_each(request))

    async def deliver_each(self, request: DeliveryRequest) -> AsyncIterator[RcptResult]:
        """Each recipient's result as its delivery ends, one after another (qmgr records each at once)."""
        seen = delivered_to(read_header(request.content, HEADER_READ_LIMIT)[0])
        filled = _Filled()
        for rcpt in request.recipients:
            yield await self._each_recipient(request, rcpt, seen, filled)

    async def _each_recipient(self, request: DeliveryRequest, rcpt: Recipient, seen: frozenset[str],
                              filled: _Filled) -> RcptResult:
        """`_deliver_recipient`; what it raises (a bug, not a delivery problem) defers this recipient alone, 4.3.0
        as Postfix's qmgr defers the recipients of an agent that died: the others' results stand, so a recipient
        delivered already is not delivered again at every retry."""
        try:
            return await self._deliver_recipient(request, rcpt, seen, filled)
        except Exception:
            log.exception("%s: local delivery to <%s> failed", request.queue_id, rcpt.address)
            return self._result(rcpt, Outcome.DEFERRED, "4.3.0", "unknown mail transport error")

    async def close(self) -> None:
        """The expansions' threads are let go; a /file append under way (its delivery cancelled at the stop) is
        waited for, `close_wait` s at most, so it ends whole (or rolled back) before the store closes."""
        self._workers.close()
        if not await self._file_writers.close_within(self._close_wait):
            log.warning("local: a /file append still runs %gs after the stop; the exit waits for it", self._close_wait)

    async def _deliver_recipient(self, request: DeliveryRequest, rcpt: Recipient, seen: frozenset[str],
                                 filled: _Filled) -> RcptResult:
        if not self._allow_min_user and rcpt.address.startswith("-"):  # Postfix allow_min_user = no
            return self._result(rcpt, Outcome.BOUNCED, "5.1.3", "bad recipient address syntax: begins with '-'")
        try:
            met, expansion = await self._expand(request.queue_id, rcpt, seen)
        except DeliveryError as e:
            return self._result(rcpt, Outcome.DEFERRED, e.dsn, e.text)
        leaves = first_of_each_key(met)
        if len(leaves) == 1 and isinstance(leaves[0], Pass):  # reported as the other agent reports it
            def reported(passed: RcptResult) -> RcptResult:  # (its late result too, past a stop's cut-off)
                return replace(passed, recipient=rcpt, expanded=_other(leaves[0].address, rcpt), expansion=expansion,
                               next_hop_notifies=passed.next_hop_notifies and not expansion)  # else the expansion tells
            return reported(await self._pass_once(request, rcpt, leaves[0], filled, expansion, reported))
        if len(leaves) <= 1:  # (a stop's cancel cuts it at once, but in a write: the write's own uncut waits)
            def sole(written: Part) -> list[RcptResult]:  # (the result to hand on when the write ends past the limit)
                return [self._recipient_result(rcpt, [written], [_list_of(leaves[0])], leaves, expansion)]
            parts, lists, tried = await self._deliver_leaves(request, rcpt, met, filled, expansion, sole=sole)
        else:  # (a stop's cancel waits for each destination; past the limit, the result may follow)
            def made(done: tuple[list[Part], list[ListOf], list]) -> list[RcptResult]:
                return [self._recipient_result(rcpt, *done, expansion)]
            walk = _Walk()
            parts, lists, tried = await uncut(
                self._deliver_leaves(request, rcpt, met, filled, expansion, walk),
                f"{request.queue_id}: the delivery of <{rcpt.address}> to its {len(leaves)} destinations",
                late=_unless_more(walk, settling_late(request.settled_late, made)), within=walk.writes)
        return self._recipient_result(rcpt, parts, lists, tried, expansion)

    def _recipient_result(self, rcpt: Recipient, parts: list[Part], lists: list[ListOf], leaves: list,
                          expansion: str) -> RcptResult:
        """The recipient's one result from what each destination got (`_deliver_leaves`)."""
        result = _naming_the_member(self._combine(rcpt, parts), rcpt, leaves, parts)
        owner = _failures_owner(result, parts, lists)
        owned = _owned_failures(result, parts, lists, _members(rcpt, leaves, parts))
        delivered = (_summary([part.text for part in parts if part.outcome is Outcome.SENT])
                     if owned and result.outcome is Outcome.BOUNCED else "")  # (a deferred line names them)
        return replace(result, expansion=expansion, owner=owner, owned=owned, delivered=delivered, unlogged=not parts,
                       expanded=result.expanded or _owners_list(rcpt, owner, parts, lists)
                       or _sole_mailbox(rcpt, leaves))

    async def _expand(self, queue_id: str, rcpt: Recipient, seen: frozenset[str]) -> tuple[list, str]:
        """The recipient's expansion (`expand_recipient`): as the tables run it (inline when they answer from
        memory) up to INLINE_LEAVES leaves; a bigger one, or one that forks to read a file as a user, is made again in
        a worker thread, so that a list of thousands of local members (~67 us each) or forks (milliseconds each)
        do not hold up the event loop. They run in the agent's own OFF_LOOP_EXPANSIONS threads (mailflow.workers; the
        others wait on the loop, OFF_LOOP_WAIT s at most, then 4.3.0), never the default executor's, which the
        queue's fsyncs, Maildir and mbox writes and smtpd share: an alias of 200 users with a .forward forks for
        1-13 s (measured: 8 such deliveries made a to_thread call wait 1.9 s). A thread stays counted until its
        expansion ends, also when the delivery was cancelled or a sqlite table's deadline fired. Its warnings are
        logged once."""
        warnings: list[str] = []
        expand = partial(self._expander.expand_recipient, rcpt.address, delivered_to=seen, warn=warnings.append,
                         queue_id=queue_id)
        try:
            try:
                return await self._expander.tables.run(partial(expand, leaf_budget=INLINE_LEAVES))
            except ExpansionTooBig:
                warnings.clear()
                async with self._workers.slot() as submit:  # (the wait for a thread is not the table's deadline)
                    return await self._expander.tables.run(expand, off_loop=True, workers=submit)
        finally:  # (also those told before an expansion failed: a bad alias value's)
            for text in warnings:
                log.warning("%s: %s", queue_id, text)

    async def _deliver_leaves(self, request: DeliveryRequest, rcpt: Recipient, met: list[Met], filled: _Filled,
                              expansion: str, walk: _Walk | None = None,
                              sole: _Sole | None = None) -> tuple[list[Part], list[ListOf], list]:
        """What each destination got, and with it the list it was delivered for (a command's or a file's under a
        list with an owner- alias: its owner and address; None for the others), and the leaves it tried. As
        local(8), the places are walked in the order they were read and the first one got to settles its key
        (its duplicate filter); as its deliver_token_stream, once a destination named in a .forward or :include:
        file defers, the places on that file's later lines are not got to (what they name is left for the retry,
        unless met at another place: not tried, logged nor forwarded); and once any destination defers, nothing
        is forwarded (forward_finish cancels the new messages of a recipient that is deferred: the retry sends
        them). `expansion`: how the recipient was expanded. `walk` is told at each destination whether another
        may follow it (a stop's cut-off: `_unless_more`). `sole`: the recipient's result from its one destination's
        part, handed on when that write ends past a stop's cut-off (`_late`)."""
        parts: list[Part] = []
        lists: list[ListOf] = []
        tried: list = []
        stopped: dict[int, int] = {}  # a file (its number in the expansion): the line that deferred
        settled: set[tuple] = set()  # the keys got to
        for index, (leaf, key, place) in enumerate(met):
            if key in settled or any(line > stopped.get(file, line) for file, line in place):
                continue
            if walk is not None:
                walk.more = partial(_may_follow, met, index, settled, tried)
            settled.add(key)
            tried.append(leaf)
            if isinstance(leaf, Forward):
                continue
            if isinstance(leaf, Mailbox):
                parts.append(await self._mailbox_once(request, rcpt, leaf, filled, sole))
            elif isinstance(leaf, Command):
                parts.append(await (self._mailbox_once(request, rcpt, leaf, filled) if leaf.source == "mailbox"
                                    else self._command(request, rcpt, leaf)))
            elif isinstance(leaf, File):
                parts.append(await self._file(request, rcpt, leaf, sole))
            elif isinstance(leaf, Pass):
                passed = await self._pass_once(request, rcpt, leaf, filled, expansion)
                parts.append(Part(passed.outcome, passed.dsn, passed.text, passed.diagnostic))
            elif isinstance(leaf, Refused):
                who = "" if leaf.address.lower() == rcpt.address.lower() else f"{leaf.address}: "
                parts.append(Part(Outcome.BOUNCED, leaf.dsn, who + leaf.text))
            if parts[-1].outcome is Outcome.DEFERRED:
                for file, line in place:  # (the place it was read at: its files stop there)
                    stopped.setdefault(file, line)
            lists.append(_list_of(leaf))
        if any(part.outcome is Outcome.DEFERRED for part in parts):  # local(8)'s forward_finish cancels
            return parts, lists, [leaf for leaf in tried if not isinstance(leaf, Forward)]  # them: the retry sends
        by_sender: dict[str | None, list[Forward]] = {}
        for leaf in tried:
            if isinstance(leaf, Forward):
                by_sender.setdefault(leaf.sender, []).append(leaf)
        for sent, (sender, forwards) in enumerate(by_sender.items(), 1):
            if walk is not None:
                walk.more = partial(bool, len(by_sender) - sent)
            parts.append(await self._forward_copy(request, rcpt, tuple(f.address for f in forwards), sender,
                                                  shown=tuple(f.goes_to or f.address for f in forwards)))
            lists.append(None)
        return parts, lists, tried

    async def _mailbox_once(self, request: DeliveryRequest, rcpt: Recipient, leaf: Mailbox | Command,
                            filled: _Filled, sole: _Sole | None = None) -> Part:
        """The user's mailbox (a Maildir or mbox, or its mailbox_command), delivered once per request."""
        key = identity(leaf)
        if key not in filled.mailboxes:
            filled.mailboxes[key] = await (self._mailbox(request, rcpt, leaf, sole) if isinstance(leaf, Mailbox)
                                           else self._command(request, rcpt, leaf))
        return filled.mailboxes[key]

    async def _pass_once(self, request: DeliveryRequest, rcpt: Recipient, leaf: Pass, filled: _Filled,
                         expansion: str, reported: Callable[[RcptResult], RcptResult] | None = None) -> RcptResult:
        """`_pass`, once per request for an address (local(8)'s been_here "mailbox"): a recipient that leads there
        again gets the first result."""
        key = identity(leaf)
        if key not in filled.passes:
            filled.passes[key] = await self._pass(request, rcpt, leaf, expansion, reported)
        return filled.passes[key]

    def _combine(self, rcpt: Recipient, parts: list[Part]) -> RcptResult:
        """Deferred if any part must be retried, else bounced if any failed, else sent; texts of the others
        follow in "(also: …)". Each in `_summary`'s words: a list's thousand mailboxes are one text."""
        done = [part.text for part in parts if part.outcome is Outcome.SENT]
        for outcome in (Outcome.DEFERRED, Outcome.BOUNCED):
            bad = [part for part in parts if part.outcome is outcome]
            if bad:
                result = self._result(rcpt, outcome, bad[0].dsn, _also(_summary([part.text for part in bad]), done))
                return replace(result, diagnostic=bad[0].diagnostic if len(bad) == 1 else "")
        return self._result(rcpt, Outcome.SENT, "2.0.0", _summary(done))

    async def _mailbox(self, request: DeliveryRequest, rcpt: Recipient, leaf: Mailbox, sole: _Sole | None) -> Part:
        """The user's Maildir or mbox file (`local.home_mailbox`, `local.mail_spool_directory`)."""
        path, kind, home = mailbox_location(self._local, leaf.user)
        prefix = mailbox_prefix(request.sender, rcpt.address, rcpt.original or rcpt.address)
        owner = await self._owner(leaf.user)
        if kind == "maildir":
            sent = Part(Outcome.SENT, "2.0.0", "delivered to maildir")  # local(8)'s words: the path is not named
            try:
                await self._writer.write(path, prefix, request.content, _maildir_owner(owner, path, home),
                                         self._local.mailbox_size_limit, queue_id=request.queue_id,
                                         settle_late=_settle_late(request, sole),
                                         late_results=_late_results(sole, sent))
            except OSError as e:
                return Part(*write_failure(e))
            return sent
        sent = Part(Outcome.SENT, "2.0.0", "delivered to mailbox")
        entry = mbox_entry(request.content, sender=request.sender, arrival=self._clock.time(), prepend=prefix)
        spool_made = home is not None or os.geteuid() != 0  # (as root the spool is the operator's: Postfix's too)
        try:
            await append_mbox(path, entry, locks=self._local.mailbox_delivery_lock, owner=owner,
                              home=None if owner is None else home, size_limit=self._local.mailbox_size_limit,
                              create_parents=spool_made, queue_id=request.queue_id,
                              settle_late=_settle_late(request, sole), late_results=_late_results(sole, sent))
        except DeliveryError as e:
            if not spool_made and not path.parent.is_dir():
                return _spool_missing(path.parent)
            return _failed(e, f"cannot update mailbox {path} for user {leaf.user}. ")  # (local/mailbox.c's words)
        return sent

    async def _owner(self, user: str) -> tuple[int, int] | None:
        """As root, a local user who is also a system user gets a mailbox of its own: its uid and primary gid
        (Postfix's local(8) writes with the recipient's rights). Other local users' mailboxes, and everything when
        mailflow is not root, belong to mailflow's user."""
        if os.geteuid() != 0:
            return None
        try:
            account = await asyncio.to_thread(pwd.getpwnam, user)
        except KeyError:
            return None
        return account.pw_uid, account.pw_gid

    async def _file(self, request: DeliveryRequest, rcpt: Recipient, leaf: File, sole: _Sole | None) -> Part:
        """A `/file` destination, appended in mbox format under the mailbox locks; `/dev/null` discards. As
        root the append runs in a child (asuser.call_as) as the .forward's user or `default_privs` (Postfix writes files
        with the alias owner's or the user's rights, never root's: a .forward must not reach /etc/passwd). The
        append runs in one of the agent's own FILE_WRITERS threads: a file that never answers (a FUSE file the user
        serves, a hung NFS mount) holds one of those, never a thread the queue's fsyncs and smtpd share; once
        neither finished anything for OFF_LOOP_WAIT s, the next /file deliveries defer 4.3.0. A child whose write then
        makes no progress for command_time_limit is stopped and its write undone, its thread
        freed: 4.3.0 (mbox._append_once_as). Postfix's command_time_limit covers commands only (its local(8) has no
        limit on a file write but the daemon watchdog); the threads here are shared, so a hung write gets one."""
        if leaf.path == os.devnull:
            return Part(Outcome.SENT, "2.0.0", f"delivered to file: {leaf.path}")
        sender, original = _envelope(request, rcpt, leaf.sender)
        as_user = rights_for(leaf.rights, self._local.default_privs)
        prefix = mailbox_prefix(sender, rcpt.address, original)
        if leaf.path.endswith("/"):  # (local/file.c: a Maildir)
            return await self._maildir_file(request, leaf, prefix, as_user, sole)
        sent = Part(Outcome.SENT, "2.0.0", f"delivered to file: {leaf.path}")
        entry = HeldEntry(request.content, partial(mbox_entry, sender=sender, arrival=self._clock.time(),
                                                   prepend=prefix))
        try:  # (held: the child as `as_user` cannot open the queue's files; the writing thread opens them)
            await append_mbox(Path(leaf.path), entry, locks=self._local.mailbox_delivery_lock, user=as_user,
                              size_limit=self._local.mailbox_size_limit, create_parents=False,
                              file_destination=True, workers=self._file_writers.run,
                              write_limit=self._local.command_time_limit, queue_id=request.queue_id,
                              settle_late=_settle_late(request, sole), late_results=_late_results(sole, sent))
        except DeliveryError as e:
            return _failed(e, f"cannot append message to file {leaf.path}: ")  # (local/file.c's words)
        return sent

    async def _maildir_file(self, request: DeliveryRequest, leaf: File, prefix: bytes, as_user: str | None,
                            sole: _Sole | None) -> Part:
        """A `/dir/` destination: a Maildir written as `as_user` (mailflow's own user when None), never as root, in
        one of the FILE_WRITERS threads under a /file append's time limits (local.maildir_file)."""
        sent = Part(Outcome.SENT, "2.0.0", "delivered to maildir")  # (local(8)'s words: the path is not named)
        try:
            await deliver_maildir_file(Path(leaf.path), prefix, request.content, name=self._writer.unique_name(),
                                       user=as_user, size_limit=self._local.mailbox_size_limit,
                                       workers=self._file_writers.run, write_limit=self._local.command_time_limit,
                                       queue_id=request.queue_id, settle_late=_settle_late(request, sole),
                                       late_results=_late_results(sole, sent))
        except DeliveryError as e:
            return _failed(e)
        return sent

    async def _pass(self, request: DeliveryRequest, rcpt: Recipient, leaf: Pass, expansion: str = "",
                    reported: Callable[[RcptResult], RcptResult] | None = None) -> RcptResult:
        """Hand `leaf.address` to the transport `leaf` names (Postfix's deliver_pass), to `leaf.nexthop` or the
        nexthop local was given; its result, about the address it was given. A transport that is not there, fails
        or answers with no result defers 4.3.0, as deliver_pass says. The address of a recipient an alias or
        .forward expanded (`expansion`) goes with its NOTIFY without SUCCESS, as alias.c passes it on: the
        expansion reports success. The results the transport says are final before its report
        (DeliveryRequest.settled) or hands on past a stop's cut-off (its write's: DeliveryRequest.settled_late)
        are made the recipient's by `reported` (a pass that is the recipient's one destination); without it they
        are not taken (the transport cuts its write off: the uncut around the recipient's destinations hands theirs
        on), as local(8) passes a recipient with offset -1 so that the agent never marks the original done: the
        address passed may be the recipient's own (`alice: \\alice, bob`), and qmgr would record the recipient
        delivered with its other destinations still to come."""
        log.info("%s: passing <%s> to transport=%s", request.queue_id, leaf.address, leaf.transport)
        given = replace(rcpt, address=leaf.address, notify=without_success(rcpt.notify) if expansion else rcpt.notify)
        peer = self._peers.get(leaf.transport)
        if peer is None:
            return self._result(given, Outcome.DEFERRED, "4.3.0", "mail transport unavailable")
        try:
            report = await peer.deliver(replace(request, recipients=(given,), nexthop=leaf.nexthop or request.nexthop,
                                                on_settled=_passed_settled(request, reported, peer.program),
                                                on_late=_passed_late(request, reported, peer.program)))
        except Exception:
            log.exception("%s: transport %s failed for <%s>", request.queue_id, leaf.transport, leaf.address)
            return self._result(given, Outcome.DEFERRED, "4.3.0", "unknown mail transport error")
        if len(report.results) != 1:
            log.warning("%s: transport %s gave no result for <%s>", request.queue_id, leaf.transport, leaf.address)
            return self._result(given, Outcome.DEFERRED, "4.3.0", "unknown mail transport error")
        return replace(report.results[0], program=peer.program)

    async def _forward_copy(self, request: DeliveryRequest, rcpt: Recipient, addresses: tuple[str, ...],
                            sender: str | None = None, shown: tuple[str, ...] = ()) -> Part:
        """Queue one copy to `addresses`; its result names `shown` (default `addresses`): where each goes."""
        shown = shown or addresses
        if self._forward is None:
            return Part(Outcome.DEFERRED, "4.3.5", "forwarding is not possible here (no cleanup to queue it)")
        content = request.content.prepend(f"Delivered-To: {rcpt.address}\r\n".encode("utf-8"))
        try:
            queue_id = await self._forward(request, rcpt, addresses, content, sender=sender)
        except DeliveryError as e:
            return Part(Outcome.DEFERRED, "4.3.0", f"cannot forward to {_some(addresses)}: {e.text}")
        except Exception as e:
            log.exception("%s: forwarding to %s failed", request.queue_id, _some(addresses))
            return Part(Outcome.DEFERRED, "4.3.0", f"cannot forward to {_some(addresses)}: {e}")
        return Part(Outcome.SENT, "2.0.0", f"forwarded as {queue_id} to {_some(shown)}")

    async def _command(self, request: DeliveryRequest, rcpt: Recipient, leaf: Command) -> Part:
        """Run one `|command` destination (see the module docstring)."""
        settings = self._commands
        if settings is None:
            return Part(Outcome.DEFERRED, "4.3.5", f"command delivery is not set up here: |{leaf.command}")
        local, domain = address.split(leaf.address)
        user, ext = split_extension(local.lower(), settings.recipient_delimiter)
        home = Path(os.path.abspath(Path(self._local.maildir_base) / user)) if is_safe_user(user) else Path("/")
        sender, original = _envelope(request, rcpt, leaf.sender)
        when_known = {"ORIGINAL_RECIPIENT": address.shown_original(original) if original else "",
                      "DOMAIN": domain.lower(), "EXTENSION": ext[1:], **_client_environment(request.client_attributes)}
        context = {"USER": user, "LOGNAME": user, "SENDER": sender, "RECIPIENT": leaf.address, "LOCAL": local.lower(),
                   **{name: value for name, value in when_known.items() if value}}  # SENDER even when null
        env = {**({"HOME": str(home), "SHELL": "/bin/sh"} if leaf.forward else {}),
               **{k: "".join(c if c in SHELL_SAFE else "_" for c in v) for k, v in context.items()}}
        try:
            prefix = from_line(sender, self._clock.time()) + mailbox_prefix(sender, rcpt.address, original)
            spool = settings.spool and settings.spool.for_copy(request.queue_id, len(prefix) + request.content.size)
            stdin = aencode(request.content.prepend(prefix).stream(), ToLf())
            result = await run_shell_command(leaf.command, stdin=stdin, env=env, time_limit=settings.time_limit,
                                             output_limit=settings.output_limit,
                                             user=rights_for(leaf.rights, settings.default_privs),
                                             cwd=home if leaf.forward and home.is_dir() else "/", umask=0o077,
                                             spool=spool)
        except CommandNotRun as e:
            log.warning("%s: command %r for %s not run: %s", request.queue_id, leaf.command, leaf.address, e.text)
            return Part(Outcome.DEFERRED, e.dsn, *e.as_postfix_says("local: fatal: "))
        outcome, dsn, text = command_status(result, leaf.command)
        if outcome is Outcome.SENT:
            return Part(outcome, dsn, f"delivered to command: {leaf.command}")
        return Part(outcome, dsn, text, command_diagnostic(result))

    def _result(self, rcpt: Recipient, outcome: Outcome, dsn: str, text: str) -> RcptResult:
        return RcptResult(rcpt, outcome, dsn, text, relay=self._relay)


_Sole = Callable[[Part], list[RcptResult]]  # a recipient's result from its one destination's part


def _settle_late(request: DeliveryRequest, sole: _Sole | None) -> SettleLate | None:
    """A write's `settle_late` when it is its recipient's one destination (`sole`): past a stop's cut-off, the write
    is left to end and the recipient's result handed on (DeliveryRequest.settled_late); None for one of several
    destinations (the uncut around them all hands theirs on)."""
    return None if sole is None else request.settled_late


def _late_results(sole: _Sole | None, sent: Part) -> Callable[[], list[RcptResult]]:
    """A write's `late_results`: the recipient's result from its one destination's part, `sent` (none without
    `sole`, whose write hands none on: `_settle_late`)."""
    return list if sole is None else partial(sole, sent)


def _list_of(leaf) -> ListOf:
    """The list a destination was delivered for: a command's or a file's under a list with an owner- alias, its
    owner and address; None for the others."""
    owner = leaf.sender if isinstance(leaf, (Command, File, Refused)) else None
    return (owner, leaf.address) if owner is not None else None


def _passed_late(request: DeliveryRequest, reported: Callable[[RcptResult], RcptResult] | None,
                 program: str) -> Callable[[Callable[[], Awaitable[list[RcptResult]]]], None] | None:
    """The `on_late` of a request passed to another transport (`_pass`): its late results handed on to `request`'s,
    each with the passing transport's `program` and made the recipient's by `reported`; None without `reported`
    or one to hand them to."""
    if reported is None or request.on_late is None:
        return None
    on_late = request.on_late

    def passed_late(late: Callable[[], Awaitable[list[RcptResult]]]) -> None:
        async def results() -> list[RcptResult]:
            return [reported(replace(result, program=program)) for result in await late()]
        on_late(results)
    return passed_late


def _passed_settled(request: DeliveryRequest, reported: Callable[[RcptResult], RcptResult] | None,
                    program: str) -> Callable[[Iterable[RcptResult]], None] | None:
    """The `on_settled` of a request passed to another transport (`_pass`): the results it says are final, each
    with the passing transport's `program` and made the recipient's by `reported`, told to `request`; None
    without `reported` (one of the recipient's destinations: its result is not the recipient's) or one to tell."""
    if reported is None or request.on_settled is None:
        return None
    on_settled = request.on_settled

    def passed_settled(results: Iterable[RcptResult]) -> None:
        on_settled([reported(replace(result, program=program)) for result in results])
    return passed_settled


class _Walk:
    """`_deliver_leaves`'s word on a recipient's destinations for a stop's cut-off: `more()`, whether another may
    still be started after the one under way; `writes`, the write uncuts under way in it (a mailbox's, a file's, or
    virtual's for a pass: none in a lock wait, a command, a forward or an LMTP pass)."""

    def __init__(self) -> None:
        self.more: Callable[[], bool] = partial(bool, False)
        self.writes = Within()


def _may_follow(met: list[Met], index: int, settled: set[tuple], tried: list) -> bool:
    """Whether a destination may be started after `met[index]`'s: a later place whose key is not settled yet, or a
    forward (sent after them all)."""
    return any(isinstance(leaf, Forward) for leaf in tried) or any(key not in settled for _, key, _ in met[index + 1:])


def _unless_more(walk: _Walk, late: Late) -> Late:
    """`late` for a recipient's destinations, taken only when the one under way is the last (`walk.more()`) and is
    in a write (`walk.writes`): its end makes the recipient's result. Else the cut-off cuts the delivery there (a
    lock wait would go on and might begin its append after the stop), and uncut's warning says the recipient stays
    queued (the destinations done are delivered again by the retry, as when local(8) is killed)."""
    def handed_on(running: asyncio.Future) -> bool:
        return not walk.more() and walk.writes.count > 0 and late(running)
    return handed_on


def _naming_the_member(result: RcptResult, rcpt: Recipient, leaves: list, parts: list[Part]) -> RcptResult:
    """A recipient that bounced only because one alias member does not exist is reported about that member, as
    Postfix's local(8) does: "<member> (expanded from <recipient>)" in the log and the notice."""
    members = [leaf for leaf in leaves if isinstance(leaf, Refused) and leaf.address.lower() != rcpt.address.lower()]
    bounced = [part for part in parts if part[0] is Outcome.BOUNCED]
    if result.outcome is not Outcome.BOUNCED or len(members) != 1 or len(bounced) != 1:
        return result
    member = members[0].address
    return replace(result, text=result.text.removeprefix(f"{member}: "), expanded=member)


def _other(addr: str, rcpt: Recipient) -> str:
    """`addr` when it is not the recipient's own address (an alias member's), else ""."""
    return addr if addr.lower() != rcpt.address.lower() else ""


def _sole_mailbox(rcpt: Recipient, leaves: list) -> str:
    """The address of the one mailbox an alias (or luser_relay) led the recipient to, its Maildir, mbox file or
    mailbox_command ("" when it is not that): its result is logged about that address, `to=<member>,
    orig_to=<alias>`, as local(8) logs each delivery it makes."""
    mailbox = len(leaves) == 1 and (isinstance(leaves[0], Mailbox)
                                    or isinstance(leaves[0], Command) and leaves[0].source == "mailbox")
    if mailbox and leaves[0].address.lower() != rcpt.address.lower():
        return leaves[0].address
    return ""


def _envelope(request: DeliveryRequest, rcpt: Recipient, owner: str | None) -> tuple[str, str]:
    """The sender and the original recipient a command or file destination is given: the message's, or under a
    mailing list with an owner- alias that owner and none (local(8) replaces the sender and drops the ORCPT)."""
    if owner is not None:
        return owner, ""
    return request.sender, rcpt.original or rcpt.address


NAMED_FORWARDS = 10  # addresses a forwarded copy's success text names at most (a list may have thousands)


def _some(addresses: tuple[str, ...]) -> str:
    """The first NAMED_FORWARDS addresses, and how many more there are."""
    named = ", ".join(addresses[:NAMED_FORWARDS])
    more = len(addresses) - NAMED_FORWARDS
    return f"{named} and {more} more" if more > 0 else named


def _failures_owner(result: RcptResult, parts: list[Part], lists: list[ListOf]) -> str:
    """Who a bounced recipient's failure notice goes to instead of the sender: the list owner, when the one part
    that bounced was a command or file of a list with an owner- alias, or a file refused there (local(8)'s
    bounce_workaround sends it to the owner, and the sender hears nothing; a restricted command it reports to the
    sender); "" otherwise, and when several parts bounced or the recipient was deferred (`_owned_failures`)."""
    failed = _failures(result, parts, lists)
    if result.outcome is not Outcome.BOUNCED or len(failed) != 1 or failed[0][1] is None:
        return ""
    return failed[0][1][0]


def _owned_failures(result: RcptResult, parts: list[Part], lists: list[ListOf],
                    members: list[str]) -> tuple[OwnedFailure, ...]:
    """Each failure of a bounced recipient whose parts failed several times, whoever it is told to ("owned" by
    its list's owner or, owner "", by the sender): one of a list with an owner- alias for that owner, about its
    list; one of no list (an alias of failing commands, unknown members: the main case) for the sender, about the
    member it names (`members`: the address a part is about, "" for the recipient itself); each with its own text
    and Diagnostic-Code, as local(8)'s bounce_workaround calls bounce_one once per failed delivery and bounce(8)
    lists the sender's. () for one failure (`_failures_owner`, or the result itself). A deferred recipient's parts
    that bounced, one too: told and logged now, as local(8) logs each bounce_append at once and qmgr has bounce(8)
    send them at the end of the attempt while the recipient waits for its retry (which repeats them). Bounded by
    `_bounded`."""
    failed = [(part, where, member) for (part, where), member in zip(_failures(result, parts, lists), members)]
    if len(failed) < (2 if result.outcome is Outcome.BOUNCED else 1):
        return ()
    owned = [OwnedFailure(where[0], where[1], part.dsn, part.text, part.diagnostic) if where is not None else
             OwnedFailure("", member or result.recipient.address, part.dsn,
                          part.text.removeprefix(f"{member}: ") if member else part.text, part.diagnostic)
             for part, where, member in failed]
    return _bounded(owned)


def _members(rcpt: Recipient, leaves: list, parts: list[Part]) -> list[str]:
    """For each bounced part (in `_failures`' order), the member address it is about: a refused alias member's,
    "" for the others (a command or a file fails as the recipient)."""
    delivered = [leaf for leaf in leaves if isinstance(leaf, (Mailbox, Command, File, Pass, Refused))]  # (as parts)
    members = [_other(leaf.address, rcpt) if isinstance(leaf, Refused) else "" for leaf in delivered]
    members += [""] * (len(parts) - len(members))  # (the forwarded copies come last)
    return [member for part, member in zip(parts, members) if part.outcome is Outcome.BOUNCED]


OWNED_NOTICE_LIMIT = 100  # a recipient's failures told one by one at most, to owners and to the sender each


def _bounded(owned: list[OwnedFailure]) -> tuple[OwnedFailure, ...]:
    """A recipient's failures as told, bounded whatever their number (an alias or .forward may expand to 100 000
    failing commands, each with up to output_limit bytes of output, all held in memory as the notice, the log
    lines and the recipient row): up to OWNED_NOTICE_LIMIT owners' failures a notice each, past it one per list
    (`_per_list`); up to OWNED_NOTICE_LIMIT of the sender's each listed in its notice, past it the last listed
    says how many more (`_senders_bounded`). Within the limit this is what Postfix tells (bounce(8) lists all)."""
    to_owners = [failure for failure in owned if failure.owner]
    if len(to_owners) > OWNED_NOTICE_LIMIT:
        owned = _per_list(owned)
    return _senders_bounded(owned)


def _per_list(owned: list[OwnedFailure]) -> list[OwnedFailure]:
    """Failures told to list owners too many for a notice each: one per (owner, list), its first failure's status
    and words and how many more there were, so the notices, their log lines and the stored result stay bounded by
    the lists. (Postfix's bounce_one sends them all.) The failures told to the sender stay in their place."""
    per_list: dict[tuple[str, str], int] = {}
    for failure in owned:
        if failure.owner:
            key = (failure.owner, failure.address)
            per_list[key] = per_list.get(key, 0) + 1
    kept = []
    for failure in owned:
        key = (failure.owner, failure.address)
        if not failure.owner:
            kept.append(failure)
        elif key in per_list:  # (its first failure: the others are counted in it)
            kept.append(_and_more(failure, per_list.pop(key) - 1))
    return kept


def _senders_bounded(owned: list[OwnedFailure]) -> tuple[OwnedFailure, ...]:
    """The failures told to the sender, the first OWNED_NOTICE_LIMIT of them each in its place, the last of those
    saying how many more were left out (Postfix's bounce(8) lists every one: equal up to the limit); the owners'
    as they are."""
    told = 0
    kept = []
    for failure in owned:
        if not failure.owner:
            told += 1
            if told > OWNED_NOTICE_LIMIT:
                continue
        kept.append(failure)
    if told > OWNED_NOTICE_LIMIT:
        last = max(n for n, failure in enumerate(kept) if not failure.owner)
        kept[last] = _and_more(kept[last], told - OWNED_NOTICE_LIMIT)
    return tuple(kept)


def _and_more(failure: OwnedFailure, more: int) -> OwnedFailure:
    """`failure`, its text saying how many more failures it stands for (none: as it is)."""
    return failure._replace(text=f"{failure.text} (and {more} more failures)") if more else failure


def _failures(result: RcptResult, parts: list[Part], lists: list[ListOf]) -> list[tuple[Part, ListOf]]:
    """The parts that bounced, each with the list it was delivered for; none when the recipient was sent."""
    if result.outcome is Outcome.SENT:
        return []
    return [(part, where) for part, where in zip(parts, lists) if part.outcome is Outcome.BOUNCED]


def _owners_list(rcpt: Recipient, owner: str, parts: list[Part], lists: list[ListOf]) -> str:
    """The list a failure told to its `owner` is about, when it is not the recipient itself (an alias of one
    list): its notice and log line name that list, "<list> (expanded from <recipient>)", as local(8)'s; "" when
    there is no owner, or the recipient is the list."""
    if not owner:
        return ""
    failed = {where[1] for part, where in zip(parts, lists) if part.outcome is Outcome.BOUNCED and where is not None}
    return _other(failed.pop(), rcpt) if len(failed) == 1 else ""


def _client_environment(c: ClientAttributes) -> dict[str, str]:
    """local(8)'s CLIENT_* and SASL_* variables: those of the message's client attributes that are known."""
    named = {"CLIENT_HOSTNAME": c.name, "CLIENT_ADDRESS": c.address, "CLIENT_HELO": c.helo,
             "CLIENT_PROTOCOL": c.protocol, "SASL_METHOD": c.sasl_method, "SASL_SENDER": c.sasl_sender,
             "SASL_USERNAME": c.sasl_username}
    return {name: value for name, value in named.items() if value}


def _maildir_owner(owner: tuple[int, int] | None, maildir: Path, home: Path | None) -> Owner | None:
    """Who owns what the Maildir write creates: in a home, the home (0700 when made) and all below it; in the
    mail spool, the Maildir `<spool>/<user>/` and below, taken as a home (a root-owned link there followed: the
    administrator may make the top-level Maildir in advance, postconf(5)), the spool staying the operator's and
    never made. (Postfix's local(8) writes every Maildir with the user's rights.)"""
    if owner is None:
        return None
    return Owner(*owner, home, home=True) if home is not None else Owner(*owner, maildir, home=True, spool=True)


def _spool_missing(spool: Path) -> Part:
    return Part(Outcome.DEFERRED, "4.2.0", spool_missing(spool))


def _failed(e: DeliveryError, prefix: str = "") -> Part:
    """`e` as a part's result, its text after `prefix` (what local(8) says of the destination)."""
    return Part(Outcome.BOUNCED if e.permanent else Outcome.DEFERRED, e.dsn, prefix + e.text)


def _also(text: str, done: list[str]) -> str:
    """`text`, then the parts done in "(also: …)" (a command's output may end in a blank: not before that)."""
    return f"{text.rstrip()} (also: {_summary(done)})" if done else text


NAMED_TEXTS = 10  # different texts of a recipient's parts its result names at most


def _summary(texts: list[str]) -> str:
    """The texts of a recipient's parts joined with "; ", each once with how many parts said it ("delivered to
    maildir (1200 times)"), the first NAMED_TEXTS of them and how many more: a list of 100 000 members gives a
    line a log, a recipient row and a notice can hold."""
    counts: dict[str, int] = {}
    for text in texts:
        counts[text] = counts.get(text, 0) + 1
    named = [text if n == 1 else f"{text} ({n} times)" for text, n in list(counts.items())[:NAMED_TEXTS]]
    more = len(counts) - NAMED_TEXTS
    return "; ".join(named) + (f"; and {more} more" if more > 0 else "")
