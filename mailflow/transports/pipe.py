"""pipe: delivery to external commands (Postfix pipe(8)), and the command runner that local(8) shares.

Runner (used by pipe services and by local's `|command` destinations):
- `run_command(argv, *, stdin, env, time_limit, output_limit, user=None, cwd=None, umask=None, spool=None)
  -> CommandResult`: runs argv directly (a shell only for ["/bin/sh", "-c", cmd], a file without `#!`) in a new
  session, with exactly `env` plus PATH=/usr/bin:/bin. Its stdin is `stdin` (bytes, or an async iterable of chunks)
  written whole first to an unlinked temporary file in `spool`'s directory (the queue's content directory, where
  smtpd spools: its free space is what queue_minfree watches; None: the system's temporary directory), rewound: the
  command starts only once its input is complete, so nothing it starts (a script that runs its deliverer without
  `exec`, a pipeline) can ever read a message cut off by a crash of mailflow. A command that outlives a killed
  server finishes its whole message; the delivery is run again after the restart (a duplicate, as the
  at-least-once rule allows, never a cut copy). The file has no name (nothing to sweep after a crash) and is closed
  when the command has started; the command gets a read-only descriptor of it (opened through /proc/self/fd; without
  /proc, from a name of its own, unlinked before anything is written: see `SpoolFiles`), so that a command running as
  another user cannot change its own input (one running as mailflow's own user can open it again read-write through
  /proc/self/fd/0). A chunk that cannot be read raises before anything runs; a file that cannot be made or written
  is `CommandNotRun` (dsn 4.3.1 for a full disk or quota, else 4.3.0: `_not_spooled`). Each run holds a copy of its
  message (20 parallel deliveries of a 50 MB message: 1 GB), so `spool` (a `CommandSpool`: the directory, the bytes its
  file system keeps free, how to read its free space; `command_spool(config)` keeps smtpd's floor, max(queue_minfree,
  1.5 x message_size_limit), with the smallest message_size_limit of the listeners) bounds them: a copy whose whole size
  (checked before the first write: `CommandSpool.for_copy`) or next piece (about SPOOL_WRITE bytes) would leave no more
  than the floor free is not written but `CommandNotRun` with dsn 4.3.1, "insufficient system storage" (the numbers in a
  warning line keyed by the queue id), deferred with nothing lost, as smtpd refuses mail at the same floor. (A copy it
  must be: the command never reads the stored bytes, since its lines end in LF, not the stored CRLF, and pipe's flags
  add headers and quoting; Postfix streams from its queue file.) A spool file the worker thread opens for a delivery
  cancelled meanwhile is closed by that thread. It keeps the first `output_limit` bytes of the command's merged
  stdout+stderr and drains the rest, and kills its whole process group at the time limit (or when the delivery is
  cancelled; never a group whose number may have been reused once the command ended: see `_Group`); a cancel that
  comes once the command's output ended does not lose its status when the command exits within CANCEL_REAP_WAIT seconds
  (it may have exited, not reaped yet): it is returned, the cancel raised at the caller's next wait
  (mailflow.uncut.postpone_cancel), so that the delivery is recorded. The delivery
  ends then, whatever holds the command's output pipe: it is ours (`_Output`) and closed at the limit,
  so neither a command killed with its output unread nor a program it left running in a session of its own can
  hold the delivery or a descriptor of ours. `user`: as root, run as that user (its groups too), through util-linux's
  setpriv so that the spawn is a vfork (never a fork of the whole server on the event loop: `_spawn_as`; a setpriv
  found unfit by its check is not used, with one warning: `_SetprivCheck`), setpriv's own
  failures reported as the switch's and the exec's were; not as root, only our own user. A file the kernel cannot
  run (ENOEXEC, no `#!`) is run as `/bin/sh FILE args`, as glibc's execvp runs it for Postfix's pipe_command() and
  exec_command() (setpriv's execvp does; run directly, `_started`).
  `umask`: the command's (None: mailflow's own). Raises `CommandNotRun` when it
  cannot start the command (unknown user, no privilege to switch, root requested, exec or chdir failed, its input
  not spooled): callers defer with its `dsn` (4.3.0; 4.3.1 for the spool's disk) and its `diagnostic`,
  `x-unix; <why>` (Postfix's: the child's fatal message, x-unix).
- `run_shell_command(command, **same) -> CommandResult`: a local `|command`, run as Postfix's exec_command runs
  it: a command without shell metacharacters is split on blanks and run directly (its program searched on
  PATH); `/bin/sh -c command` when it has some, or when that exec fails ENOENT for a bare name (not a program,
  perhaps a shell built-in), as exec_command falls back to the shell.
- `command_status(result, command) -> (Outcome, dsn, text)`: Postfix's rules. Exit 0: SENT 2.0.0. Output that
  begins with an enhanced status code (class 2, 4 or 5, as Postfix's dsn_valid() takes one): the text after it,
  DEFERRED with a 4.X.X, else BOUNCED with a 5.X.X, and a 2.X.X bounces as 5.0.0 with Postfix's warning
  `bounce_append: ignoring dsn code "2.X.X"` (a bounce is a 5.X.X). A <sysexits.h> code: its table entry
  (EX_TEMPFAIL 75 and EX_OSERR 71 defer 4.3.0; the others bounce, e.g. EX_NOUSER 67 5.1.1, EX_CONFIG 78
  5.3.5). Any other status: BOUNCED 5.3.0. A signal: DEFERRED 4.3.0. The time limit: BOUNCED 5.3.0, as
  Postfix's pipe_command() bounces it. The text carries the command's output as Postfix quotes it (one line:
  tabs and newlines made spaces, other unprintable characters '_', nothing trimmed).
- `command_diagnostic(result) -> str`: a failed command's Diagnostic-Code as Postfix's pipe_command() gives it
  (dsb_unix): `x-unix; <output>`, or when there is none the sys_exits text ("internal software error" for the
  time limit or a signal, the table's text for a <sysexits.h> code, "unknown mail system error N" otherwise);
  for "D.S.N text" output the text. "" for a success. Results of failed commands carry it
  (`RcptResult.diagnostic`), so their notices say what Postfix's do.

`PipeTransport(service, name=…)`: one `[pipe.NAME]` service. Per request:
1. size_limit exceeded: every recipient bounces 5.2.3. A sender with control characters: every recipient
   bounces 5.1.7; a recipient with control characters bounces 5.1.3. Nothing runs for them. Unless
   `allow_min_user` (Postfix's parameter), the same for a sender, or any per-recipient macro value (the
   address, its original, user, extension, mailbox), beginning with '-': it would reach argv as an option.
2. Flag D: a recipient already named in a Delivered-To header is a loop (5.4.6).
3. The command runs once for all remaining recipients (argv elements holding a per-recipient macro expand to
   one element per recipient), or once per recipient when flags D or O are set (those headers name one
   recipient: Postfix requires transport_destination_recipient_limit = 1 for them). Its result applies to
   every recipient of that run; `deliver_each` yields each run's results as it ends. With D or O (`delivers_each`)
   qmgr records each run's as it comes; a single run's go with the job's end.
argv macros (their grammar is `mailflow.pipe_argv`; each value one argv element, never a shell): per recipient
${recipient}, ${original_recipient}, ${user}, ${extension}, ${mailbox}, ${domain}; per request ${sender} (null
sender: `null_sender`, default MAILER-DAEMON), ${nexthop}, ${queue_id}, ${size}, and the message's client
attributes (`DeliveryRequest.client_attributes`): ${client_address}, ${client_helo}, ${client_hostname},
${client_port}, ${client_protocol} (SMTP or ESMTP), ${sasl_method}, ${sasl_sender}, ${sasl_username}, each
"" when not known (mail submitted with sendmail, notices), as Postfix's pipe(8) passes them.
Flags (stdin, `command_input`, is the message with LF line endings, as Postfix pipe writes it, converted chunk
by chunk as the command reads it): F a "From sender date" line, R Return-Path: (for the null sender both name
`null_sender`, as Postfix's pipe(8) writes them; From_ says MAILER-DAEMON when that is empty), O X-Original-To:,
D Delivered-To: (in that order); ">" quotes lines starting "From ", "." doubles a leading dot, B appends a blank
line; X says the command does final delivery: a success is `delivered`, else `relayed` (`RcptResult.relayed`: the
action a success notice gives, as Postfix's pipe(8) treats its command as a gateway); h folds ${domain}/${nexthop}
and recipient domains to lower case, u folds recipient local parts, q quotes address local parts RFC 5322-style.
Address values are the internal form, as Postfix's queue keeps addresses: a quoted local part without its quotes
(`"a b"@x.test` is ${recipient} `a b@x.test`, ${user} `a b`; with q `"a b"@x.test` again).
Identity: `user`, or when empty mailflow's own user (`nobody` when mailflow runs as root). Working directory:
`directory`, or "/". Environment: PATH only (Postfix's export_environment is not copied).
Never raises for a delivery problem; results carry relay=NAME.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import errno
import functools
import logging
import os
import pwd
import re
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterable, AsyncIterator, Callable

from mailflow import address
from mailflow.config import DEFAULTS, PipeService
from mailflow.config.queue import free_space, leaves_too_little, queue_floor
from mailflow.content import Content
from mailflow.message import HEADER_READ_LIMIT, delivered_to, read_header
from mailflow.model import DeliveryReport, DeliveryRequest, Outcome, RcptResult, Recipient
from mailflow.store.engine import CONTENT_DIRECTORY
from mailflow.pipe_argv import expand_argv, parse_argv
from mailflow.syntax import has_control, split_leading_dsn
from mailflow.tables import split_extension
from mailflow.transports.encode import Encoder, FinalNewline, ToLf, aencode, dot_quoting, from_quoting
from mailflow.uncut import postpone_cancel

log = logging.getLogger("mailflow.pipe")

DEFAULT_PATH = "/usr/bin:/bin"
SHELL = "/bin/sh"  # what a local command with shell metacharacters is given to (Postfix's _PATH_BSHELL)
CANCEL_REAP_WAIT = 1.0  # seconds a stop's cancel waits for a command whose output ended to be reaped (its status kept)

# ------------------------------------------------------------------------------------------------ the runner


@dataclass(frozen=True)
class CommandSpool:
    """Where commands' input is written before they run (`directory`), and the bytes of its file system a copy must
    leave free (`keep_free`; `free_space()`: the bytes free there, None: not checked). `for_copy` names one copy:
    its message (`queue_id`, which its log lines name) and about how many bytes it takes (`expected`: checked once
    before anything is written)."""

    directory: str | os.PathLike[str]
    keep_free: int = 0
    free_space: Callable[[], int] | None = None
    queue_id: str = ""
    expected: int = 0
    files: "SpoolFiles" = dataclasses.field(default_factory=lambda: SpoolFiles(), compare=False, repr=False)

    def for_copy(self, queue_id: str, expected: int) -> "CommandSpool":
        return dataclasses.replace(self, queue_id=queue_id, expected=expected)


def command_spool(config) -> CommandSpool:
    """The queue's content directory, beside smtpd's spool files, keeping free what smtpd keeps free before it
    takes mail (max(queue_minfree, 1.5 x message_size_limit)) on the listener that keeps the least free (the
    smallest message_size_limit of the listeners', [smtpd]'s when there is none): every delivery to a command
    holds a copy of its message for the command's run (20 parallel deliveries of a 50 MB message are 1 GB), and
    those copies must not take the disk below what the last listener still taking mail needs; while any listener
    takes mail, commands are delivered (a listener with a larger limit refuses 452 4.3.1 first, which its client
    retries, while a deferred copy would wait for a queue run)."""
    directory = str(config.queue_path / CONTENT_DIRECTORY)
    limits = [settings.message_size_limit for _, _, settings, _ in config.smtpd.listener_settings()]
    size_limit = min(limits, default=config.smtpd.message_size_limit)
    return CommandSpool(directory, queue_floor(config.queue.queue_minfree, size_limit),
                        functools.partial(free_space, directory))


@dataclass(frozen=True)
class CommandResult:
    """How a command ended: its exit code, or the signal that killed it, or the time limit; and its output
    (stdout and stderr merged, at most output_limit bytes, decoded as UTF-8 with replacement)."""

    exit_code: int | None
    signal: int | None
    timed_out: bool
    output: str


class CommandNotRun(Exception):
    """The command could not be started; nothing ran. `text` says why (for the log and a deferral with `dsn`);
    `exec_failure`, when the exec itself failed, says it in the words of Postfix's child (`execvp PROG: why`)."""

    def __init__(self, text: str, exec_errno: int | None = None, exec_failure: str = "", dsn: str = "4.3.0"):
        super().__init__(text)
        self.text = text
        self.dsn = dsn  # the deferral's status: 4.3.1 when the spool's file system is short of space
        self.exec_errno = exec_errno  # the errno of the exec itself, when that is what failed
        self.exec_failure = exec_failure

    @property
    def diagnostic(self) -> str:
        """The deferral's Diagnostic-Code, `x-unix; <why>`: Postfix's pipe_command() reports a command its child
        could not exec (or chdir to run) with the child's fatal message as the output, x-unix."""
        return f"x-unix; {self.text}"

    def of_the_shell(self) -> "CommandNotRun":
        """The same failure, of the shell a local command is given to (`/bin/sh -c command`): Postfix's
        exec_command() runs that with execl, so its child says `execl /bin/sh: why`, not execvp."""
        if self.exec_errno is None:
            return self
        return CommandNotRun(self.text, self.exec_errno, f"execl {SHELL}: {os.strerror(self.exec_errno)}")

    def as_postfix_says(self, fatal_prefix: str) -> tuple[str, str]:
        """(the deferral's text, its Diagnostic-Code) as Postfix's notices give them: a failed exec is the child's
        fatal message `<fatal_prefix>execvp PROG: why` (`execl /bin/sh: why` for a local command's shell; local:
        "local: fatal: ", pipe: "pipe: fatal: pipe_command: ") as the output of a command that exited EX_TEMPFAIL;
        anything else in mailflow's words."""
        if not self.exec_failure:
            return self.text, self.diagnostic
        output = f"{fatal_prefix}{self.exec_failure}"
        return f"{SYSEXITS[EX_TEMPFAIL][1]}. Command output: {output}", f"x-unix; {output}"


@dataclass(frozen=True)
class _Identity:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


# Characters no shell gives a meaning to: Postfix's command_expansion_filter (what reaches a local command's
# environment unchanged) and, with blanks, exec_command's ok_chars.
SHELL_SAFE = frozenset("1234567890!@%-_=+:,./abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# exec_command: a command made only of these (and at least one that is not a blank) needs no shell: it is split on
# blanks and run directly.
_NO_SHELL_NEEDED = SHELL_SAFE | {" ", "\t"}


def direct_argv(command: str) -> list[str] | None:
    """The words a command is run as without a shell (exec_command's test), None when it needs a shell."""
    words = command.split()
    return words if words and set(command) <= _NO_SHELL_NEEDED else None


def _shell_may_run(e: "CommandNotRun", program: str) -> bool:
    """Whether a failed direct exec goes to `/bin/sh -c command`, as exec_command's does: a bare name that is no
    program (ENOENT, not a path). (A file the kernel cannot run was already given to /bin/sh by _run, as execvp
    gives it.)"""
    return e.exec_errno == errno.ENOENT and "/" not in program


async def run_shell_command(command: str, **how: Any) -> CommandResult:
    """A local `|command` as Postfix's exec_command runs it (see the module docstring); `how`: run_command's
    keywords. Run directly, a command's own signal is seen as one (Postfix defers 4.3.0), not as the shell's
    exit status 128+N (a bounce), and a path that is not there cannot be run (CommandNotRun: deferred, as
    Postfix's failed execvp), where the shell would say "not found" with status 127 (a bounce). The program is
    searched on PATH by the child, as the user it runs as. Raises CommandNotRun (a shell that cannot be run:
    `execl /bin/sh: why`, as exec_command's)."""
    words = direct_argv(command)
    message = await _spooled_within(how["time_limit"], how.pop("stdin"), how.pop("spool", None))
    try:
        if words is not None:
            try:
                return await _run(words, message, **how)
            except CommandNotRun as e:
                if not _shell_may_run(e, words[0]):
                    raise
            os.lseek(message, 0, os.SEEK_SET)  # (not read: the exec failed)
        try:
            return await _run([SHELL, "-c", command], message, **how)
        except CommandNotRun as e:
            raise e.of_the_shell() from None
    finally:
        os.close(message)


def _identity(user: str | None) -> _Identity | None:
    """Whom to run as: None = as we are. Raises CommandNotRun for an unknown user, root, or a switch we lack
    the privilege for."""
    if not user:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise CommandNotRun(f"cannot run a command as user {user}: no such user") from None
    if os.geteuid() != 0:
        if entry.pw_uid == os.geteuid():
            return None
        raise CommandNotRun(f"cannot switch to user {user}: not running as root")
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise CommandNotRun(f"refusing to run a command with root privileges (user {user})")
    return _Identity(user, entry.pw_uid, entry.pw_gid, tuple(os.getgrouplist(user, entry.pw_gid)))


async def run_command(argv: list[str], *, stdin: bytes | AsyncIterable[bytes],
                      spool: CommandSpool | None = None, **how: Any) -> CommandResult:
    """Run argv to completion or to the time limit; see the module docstring (`how`: env, time_limit,
    output_limit, user, cwd, umask). Raises CommandNotRun, or what reading `stdin` raised (nothing run then)."""
    message = await _spooled_within(how["time_limit"], stdin, spool)
    try:
        return await _run(argv, message, **how)
    finally:
        os.close(message)  # (the file goes with its last descriptor)


async def _run(argv: list[str], message: int, *, env: dict[str, str], time_limit: float, output_limit: int,
               user: str | None = None, cwd=None, umask: int | None = None) -> CommandResult:
    """argv run with the spooled input `message` (a descriptor at offset 0, left open) as its stdin."""
    who = _identity(user)
    spawned, switch, through_setpriv = await _spawn_as(who, argv)
    if umask is not None:
        switch["umask"] = umask
    loop = asyncio.get_running_loop()
    read_end, write_end = os.pipe()  # the command's stdout and stderr (see _Output)
    try:
        proc = await _started(spawned, not through_setpriv, stdin=message, stdout=write_end, stderr=write_end,
                              env={"PATH": DEFAULT_PATH, **env}, cwd=cwd, start_new_session=True, **switch)
    except OSError as e:
        os.close(read_end)
        if cwd is not None and e.filename == str(cwd):
            raise CommandNotRun(f"cannot change directory to {cwd}{_as_whom(who)}: {e.strerror}") from None
        raise _spawn_failed(e, argv, who, through_setpriv) from None
    finally:
        os.close(write_end)
    look_past = _setpriv_line_limit(argv) if through_setpriv else 0
    output = _Output(output_limit, loop.create_future(), look_past=look_past)
    read_file = os.fdopen(read_end, "rb", buffering=0)
    reading: asyncio.ReadTransport | None = None
    group = _Group(proc.pid)
    reaped = asyncio.ensure_future(proc.wait())
    reaped.add_done_callback(lambda _: group.leader_ended())
    try:  # (from the spawn on: a cancel while the pipe is being connected must leave nothing running or open)
        reading, _ = await loop.connect_read_pipe(lambda: output, read_file)
        async with asyncio.timeout(time_limit):
            await output.ended
            code = await proc.wait()
    except TimeoutError:
        group.kill()
        return CommandResult(None, None, True, output.text())
    except asyncio.CancelledError:  # (a stop's): a command that had ended already has its status, handed on first
        if not output.ended.done():
            raise
        await asyncio.wait({reaped}, timeout=CANCEL_REAP_WAIT)  # (its output ended: its exit may not be reaped yet)
        if proc.returncode is None:
            raise
        postpone_cancel()
        code = proc.returncode
    finally:
        if reading is not None:
            reading.close()  # (a program that left the group may hold the other end for ever)
        else:
            read_file.close()
        if proc.returncode is None:  # the time limit, or cancelled: leave nothing running behind us
            group.kill()
            await asyncio.shield(proc.wait())
    if code < 0:
        return CommandResult(None, -code, False, output.text())
    failure = _setpriv_failure(code, output.whole_kept(), argv[0]) if through_setpriv else None
    if failure is not None:
        raise _not_run(argv, who, *failure)
    return CommandResult(code, None, False, output.text())


SETPRIV = "/usr/bin/setpriv"  # util-linux's (essential in Debian): switches identity, then execvp()s its command
_SETPRIV_LINE = re.compile(r"setpriv: (.*): ([^:\n]*)\n")  # err(3)'s `setpriv: what: why`, alone in the output
_SWITCH_FAILED = frozenset({"setresuid failed", "setresgid failed", "setgroups failed"})  # exit 127 (PRIVERR)
_ERRNO_OF = {os.strerror(number): number for number in errno.errorcode}  # (setpriv runs in the C locale: env is PATH)


def _setpriv_line_limit(argv: list[str]) -> int:
    """Bytes of output enough for setpriv's failure line about argv, whatever the output limit."""
    return len(argv[0].encode("utf-8", "surrogateescape")) + 256


async def _spawn_as(who: _Identity | None, argv: list[str]) -> tuple[list[str], dict[str, Any], bool]:
    """What create_subprocess_exec runs to run argv as `who`, the keywords that switch identity, and whether it goes
    through setpriv (whose own failures then read as the command's: `_setpriv_failure`). As root, through SETPRIV
    (when `_SetprivCheck` found it works): given user, group or groups, CPython's _posixsubprocess fork()s this
    whole process on the event loop's thread (page tables copied, then copy-on-write faults until the child execs:
    30 ms at 10 MB, 120 ms at 1 GB of RSS per command), where without them it vfork()s (the parent waits only for
    the exec, whatever its size); setpriv makes the switch in the vfork()ed child's program (setresuid, setresgid,
    setgroups, after _posixsubprocess's chdir, umask and new session, as root as before), in the same process. It
    keeps its capabilities until its own exec, so it execs a second setpriv, without options, that runs with none: its
    execvp() of the command finds and opens it with the user's rights only (a program the user may not reach is
    EACCES, as with the switch made before the exec), and says why it failed as the first would. Without a setpriv
    that works: the keywords (a fork)."""
    if who is None:
        return argv, {}, False
    if not await _SETPRIV_CHECK.works(SETPRIV):
        return argv, {"user": who.uid, "group": who.gid, "extra_groups": list(who.groups)}, False
    return _through_setpriv(SETPRIV, who.uid, who.gid, who.groups, argv), {}, True


def _through_setpriv(setpriv: str, uid: int, gid: int, groups: tuple[int, ...], argv: list[str]) -> list[str]:
    """argv run as uid, gid and groups by `setpriv`, doubled (the second runs with no capabilities: _spawn_as). The
    check (_setpriv_unfit) runs what this makes, so that it tests what commands run."""
    listed = ",".join(str(group) for group in groups)
    return [setpriv, f"--reuid={uid}", f"--regid={gid}", f"--groups={listed}", "--", setpriv, "--", *argv]


CHECK_AGAIN_AFTER = 600.0  # seconds after a check of setpriv that could not finish before the next one
CHECK_RUN_LIMIT = 10.0  # seconds each of the check's runs of setpriv may take


class _SetprivCheck:
    """Whether what is at a setpriv path does what _spawn_as and _setpriv_failure rely on (`_setpriv_unfit`): checked
    by one thread of its own at a time, every command waiting for the verdict awaiting that one run (none holds a
    thread of the loop's default executor, which table lookups share). `start` begins it early (as root, when the
    transports are built), `works` gives the verdict. A verdict (the runs' output or status) is kept for the
    process's life, with one warning when setpriv is unfit. A check that could not finish (a run timed out, or
    could not be spawned: EAGAIN, ENOMEM) gives none: commands use the keywords (a fork) until a check begun
    CHECK_AGAIN_AFTER seconds later, or more, gives one, with one warning per such check."""

    def __init__(self, verdicts: dict[str, bool] | None = None, *, again_after: float = CHECK_AGAIN_AFTER,
                 clock: Callable[[], float] = time.monotonic):
        self._verdicts = dict(verdicts or {})
        self._running: dict[str, concurrent.futures.Future[bool]] = {}
        self._next_try: dict[str, float] = {}  # after a check that could not finish: when to check again
        self._again_after = again_after
        self._clock = clock
        self._lock = threading.Lock()  # the loop's thread starts checks, their thread ends them

    async def works(self, setpriv: str) -> bool:
        """Whether commands may run through `setpriv`: its verdict, awaiting the check under way or begun now (False
        while a check that could not finish waits its interval)."""
        verdict = self._verdicts.get(setpriv)
        if verdict is not None:
            return verdict
        running = self.start(setpriv)
        return False if running is None else await asyncio.wrap_future(running)

    def start(self, setpriv: str) -> concurrent.futures.Future[bool] | None:
        """The check of `setpriv` under way, begun now unless there is a verdict (None then, or while a check that
        could not finish waits its interval)."""
        with self._lock:
            if setpriv in self._verdicts or self._clock() < self._next_try.get(setpriv, float("-inf")):
                return None
            running = self._running.get(setpriv)
            if running is None:
                running = self._running[setpriv] = concurrent.futures.Future()
                running.set_running_or_notify_cancel()  # (so that a waiter's cancel cannot cancel it)
                threading.Thread(target=self._check, args=(setpriv, running), name="setpriv-check",
                                 daemon=True).start()
            return running

    def _check(self, setpriv: str, running: concurrent.futures.Future[bool]) -> None:
        verdict = None
        try:
            verdict = self._verdict(setpriv)
        finally:  # (whatever happened, the waiters get an answer: False but for a verdict that it works)
            with self._lock:
                del self._running[setpriv]
                if verdict is None:
                    self._next_try[setpriv] = self._clock() + self._again_after
                else:
                    self._verdicts[setpriv] = verdict
            running.set_result(bool(verdict))

    def _verdict(self, setpriv: str) -> bool | None:
        try:
            unfit = _setpriv_unfit(setpriv)
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("%s could not be checked (%s): commands run as a user are forked with the server until a "
                        "check %.0f s later or more", setpriv, e, self._again_after)
            return None
        if unfit:
            log.warning("%s is not used to run commands as a user (they are forked with the server): %s",
                        setpriv, unfit)
        return not unfit


_SETPRIV_CHECK = _SetprivCheck()  # the process's: what is at a path stays what it was, as far as it may


def start_setpriv_check() -> None:
    """As root, begin checking SETPRIV (in a thread of its own) so that the first command run as a user need not
    wait for it."""
    if os.geteuid() == 0:
        _SETPRIV_CHECK.start(SETPRIV)


def _setpriv_unfit(setpriv: str) -> str:
    """Why `setpriv` is not fit for _spawn_as ("" when it is), from three runs (raising OSError or
    SubprocessError, a timeout, when one could not end): `--version` names util-linux (busybox's has no --reuid);
    switched to uid and gid 65534, it runs a second setpriv that runs /bin/true (exit 0); and the same for a program
    that is not there is setpriv's line `failed to execute PROG: No such file or directory` with status 127 (older
    util-linux says `cannot execute` and exits 1; a setpriv under another name says so in its own name). (A setpriv
    only root may run passes: the first execs the second with root's capabilities still.)"""
    missing = "/nonexistent/mailflow-setpriv-check"
    not_found = (os.strerror(errno.ENOENT), errno.ENOENT)
    checks: tuple[tuple[list[str], Callable[[int, str], bool]], ...] = (
        ([setpriv, "--version"], lambda code, output: "util-linux" in output),
        (_through_setpriv(setpriv, 65534, 65534, (65534,), ["/bin/true"]), lambda code, output: code == 0),
        (_through_setpriv(setpriv, 65534, 65534, (65534,), [missing]),
         lambda code, output: _setpriv_failure(code, output, missing) == not_found))
    for argv, fit in checks:
        ran = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env={"PATH": DEFAULT_PATH}, cwd="/", timeout=CHECK_RUN_LIMIT, check=False)
        output = ran.stdout.decode("utf-8", "surrogateescape")
        if not fit(ran.returncode, output):
            return f"{' '.join(argv)}: exit status {ran.returncode}, output {output[:200]!r}"
    return ""


def _setpriv_failure(code: int, output: str, program: str) -> tuple[str, int | None] | None:
    """When a run of `program` through SETPRIV ended as setpriv's own failure, not the command's: why (for
    _not_run) and the exec's errno (None when it is not the command's exec that failed). Its whole output
    (`output`: at least the first _setpriv_line_limit bytes, whatever the output limit) is one line that setpriv
    writes at one of its two stages and its status the one setpriv gives with it:
    - `setpriv: failed to execute PROGRAM: why`, status 127 when `why` is ENOENT's text, else 126 (errexec): the
      command's exec failed (`why` an errno's text: the same errno, and so `execvp PROGRAM: why`, as the exec's
      OSError without setpriv);
    - `setpriv: failed to execute SETPRIV: why`, same statuses: the second setpriv could not be run (no exec_errno);
    - `setpriv: setresuid failed: why` (or setresgid, setgroups), status 127: the switch failed (no exec_errno).
    Any other output or status is the command's own result. What cannot be told apart: a command that prints one
    of these lines naming itself (or setpriv) and exits with that status, as if it had not run."""
    failed = _SETPRIV_LINE.fullmatch(output)
    if failed is None or failed[2] not in _ERRNO_OF:
        return None
    what, why = failed[1], failed[2]
    exec_status = 127 if _ERRNO_OF[why] == errno.ENOENT else 126
    if what == f"failed to execute {program}" and code == exec_status:
        return why, _ERRNO_OF[why]
    if what == f"failed to execute {SETPRIV}" and code == exec_status:
        return f"{SETPRIV}: {why}", None
    if what in _SWITCH_FAILED and code == 127:
        return why, None
    return None


async def _started(spawned: list[str], direct: bool, **how: Any) -> asyncio.subprocess.Process:
    """create_subprocess_exec(*spawned, **how). A file the kernel cannot run (ENOEXEC: no `#!`), when exec'ed
    `direct`ly (not through setpriv, whose execvp does the same), is run again as glibc's execvp runs it (and so
    Postfix's pipe_command and exec_command): `/bin/sh FILE args`, FILE as found on the command's PATH."""
    try:
        return await asyncio.create_subprocess_exec(*spawned, **how)
    except OSError as e:
        if not direct or e.errno != errno.ENOEXEC or e.filename != spawned[0]:
            raise
    script = _found_on(how["env"]["PATH"], spawned[0])
    return await asyncio.create_subprocess_exec(SHELL, script, *spawned[1:], **how)


def _found_on(path: str, program: str) -> str:
    """The file an exec of `program` (no `/`: searched on `path`) that failed ENOEXEC tried: the first that is there
    (a candidate before it failed ENOENT or ENOTDIR: any other error would have been the one reported)."""
    if "/" in program:
        return program
    candidates = [os.path.join(directory, program) for directory in path.split(os.pathsep)]
    return next((candidate for candidate in candidates if os.path.exists(candidate)), program)


def _spawn_failed(e: OSError, argv: list[str], who: _Identity | None, through_setpriv: bool) -> CommandNotRun:
    """The spawn of argv (through setpriv or not) raised `e` (not a chdir's): the command's exec failed (its errno)
    only when argv itself was exec'ed; setpriv's own exec failing (removed since its check) is said as setpriv's,
    but for E2BIG: the arguments are argv's (setpriv adds a few dozen bytes), which its own exec would have been
    refused as well, so it is the command's exec failing (`execl /bin/sh: ...` in a delay notice, as Postfix's)."""
    if through_setpriv and e.errno == errno.E2BIG:
        return _not_run(argv, who, str(e.strerror), e.errno)
    if through_setpriv:
        return _not_run(argv, who, f"{e.filename}: {e.strerror}" if e.filename else str(e.strerror), None)
    return _not_run(argv, who, str(e.strerror), e.errno if e.filename == argv[0] else None)


def _as_whom(who: _Identity | None) -> str:
    return f" as {who.name}" if who else ""


def _not_run(argv: list[str], who: _Identity | None, why: str, exec_errno: int | None) -> CommandNotRun:
    """argv could not be started: `why` (an errno's text); `exec_errno` when its exec is what failed."""
    return CommandNotRun(f"cannot run {argv[0]}{_as_whom(who)}: {why}", exec_errno,
                         f"execvp {argv[0]}: {why}" if exec_errno is not None else "")


SPOOL_WRITE = 256 * 1024  # a command's input is written to its file in pieces of about this size


async def _spooled_within(limit: float, data: bytes | AsyncIterable[bytes], spool: CommandSpool | None) -> int:
    """_spooled within the command's time limit: a queue file or spool disk that stops answering holds the
    delivery no longer than the command itself could (CommandNotRun: deferred 4.3.0), as feeding the command did
    when the input was a pipe."""
    try:
        async with asyncio.timeout(limit):
            return await _spooled(data, spool or CommandSpool(tempfile.gettempdir()))
    except TimeoutError:
        raise CommandNotRun(f"cannot spool the command's input within {limit:g}s") from None


async def _spooled(data: bytes | AsyncIterable[bytes], spool: CommandSpool) -> int:
    """A read-only descriptor of an unlinked file in the spool's directory holding all of `data`, at its offset 0
    (the caller closes it). Small chunks are gathered into SPOOL_WRITE pieces, each written by a worker thread
    once the file system has room for it above `spool.keep_free` (the first piece: room for the whole copy,
    `spool.expected`, see _Room). Raises what reading `data` raises, and CommandNotRun when the file cannot be
    made or written (its errno's text), or when the copy would take the file system below `keep_free` (dsn 4.3.1,
    "insufficient system storage": nothing lost, the delivery is tried again later)."""
    fd, read_only = await _made_in_thread(spool.files.make, spool.directory)
    room = _Room(spool)
    try:
        pending: list[bytes] = []
        size = 0
        async for chunk in _chunks(data):
            pending.append(chunk)
            size += len(chunk)
            if size >= SPOOL_WRITE:
                await _write_spool(fd, pending, room)
                pending, size = [], 0
        await _write_spool(fd, pending, room)
    except BaseException:
        os.close(read_only)
        raise
    finally:
        os.close(fd)
    return read_only


PROC_FD = "/proc/self/fd"  # where a descriptor's file is opened again by its number
NO_PROC = (errno.ENOENT, errno.ENOTDIR)  # what opening through PROC_FD fails with when no /proc is mounted there


class SpoolFiles:
    """Makes a command's spool file: (a read-write, a read-only descriptor) of one new file in `directory` that has
    no name, each at its own offset 0: the command gets the read-only one, so that it cannot change its own input.
    The file is made without a name and opened again through /proc/self/fd (its own link: no other process can put
    another file there); without /proc (a chroot, a sandbox) it is made with a name of its own (O_EXCL, mode 0600,
    in the queue's 0700 content directory: no other user can open it), opened read-only by that name, unlinked, and
    checked to be the file written (st_dev, st_ino); every descriptor is closed when any step fails. A /proc found
    missing (NO_PROC) is remembered: later files are made by name at once. One per CommandSpool (its copies share
    it)."""

    def __init__(self) -> None:
        self._proc_missing = False  # (set from any worker thread, only ever to True: no thread can undo another's)

    def make(self, directory: str | os.PathLike[str]) -> tuple[int, int]:
        if not self._proc_missing:
            fd = _unnamed_file(directory)
            try:
                return fd, os.open(f"{PROC_FD}/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                os.close(fd)
                if e.errno in NO_PROC:
                    self._proc_missing = True
        return _named_spool_file(directory)


def _named_spool_file(directory: str | os.PathLike[str]) -> tuple[int, int]:
    """SpoolFiles.make without /proc."""
    fd, path = tempfile.mkstemp(dir=os.fspath(directory))
    opened = [fd]
    try:
        try:
            opened.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW))
        finally:
            os.unlink(path)
        written, read_only = os.fstat(fd), os.fstat(opened[1])
        if (written.st_dev, written.st_ino) != (read_only.st_dev, read_only.st_ino):
            raise OSError(errno.ESTALE, f"{path} was not the file made when it was opened again")
        return fd, opened[1]
    except BaseException:
        _close_all(tuple(opened))
        raise


def _unnamed_file(directory: str | os.PathLike[str]) -> int:
    """A new file in `directory` with no name (O_TMPFILE where the file system has it, else made and unlinked)."""
    with tempfile.TemporaryFile(dir=os.fspath(directory), buffering=0) as file:
        return os.dup(file.fileno())


async def _made_in_thread(make: Callable[[str | os.PathLike[str]], tuple[int, int]],
                          directory: str | os.PathLike[str]) -> tuple[int, int]:
    """The descriptors `make(directory)` opens, made by a worker thread. A caller cancelled while the thread runs
    never sees them: then the side that comes second (the thread, or the cancel once the thread is done) closes
    them. Raises CommandNotRun for an OSError."""
    handoff = _Handoff()
    making = asyncio.get_running_loop().run_in_executor(None, handoff.made_by, make, directory)
    try:
        return await asyncio.shield(making)
    except OSError as e:
        raise _not_spooled(e, directory) from None
    except asyncio.CancelledError:
        handoff.abandon()
        _orphaned(making)
        raise


STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT)  # the spool's file system (or the queue user's quota there) is full


def _not_spooled(error: OSError, directory: str | os.PathLike[str]) -> CommandNotRun:
    """The one wording of a spool file that could not be made or written: its errno's text; dsn 4.3.1 when the file
    system is full (STORAGE_ERRORS: the mail system's own disk, X.3.1 "mail system full", as the floor's refusal and
    smtpd's queue file write error say it), else 4.3.0."""
    return CommandNotRun(f"cannot spool the command's input in {directory}: {error.strerror}",
                         dsn="4.3.1" if error.errno in STORAGE_ERRORS else "4.3.0")


def _orphaned(work: asyncio.Future) -> None:
    """A thread's call whose caller was cancelled: its error, if any, is nobody's now (retrieved when it ends, so
    asyncio logs no "exception never retrieved")."""
    work.add_done_callback(lambda done: done.cancelled() or done.exception())


class _Handoff:
    """A descriptor passed from a worker thread to a caller that may stop waiting for it (see _made_in_thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fds: tuple[int, ...] = ()
        self._abandoned = False

    def made_by(self, make: Callable[[str | os.PathLike[str]], tuple[int, int]],
                directory: str | os.PathLike[str]) -> tuple[int, int]:
        fds = make(directory)
        with self._lock:
            if self._abandoned:
                _close_all(fds)
            else:
                self._fds = fds
        return fds

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            _close_all(self._fds)


def _close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        os.close(fd)


async def _chunks(data: bytes | AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(data, bytes):
        yield data
    else:
        async for chunk in data:
            yield chunk


async def _write_spool(fd: int, chunks: list[bytes], room: "_Room") -> None:
    """`chunks` written whole by a worker thread, through a descriptor of its own (closed by that thread): a
    cancelled spool (the time limit, a stop) closes `fd` while the thread may still write, and the number, reused
    by the next open, would take the message's bytes. Refused (CommandNotRun, 4.3.1) when the file system has no
    room for it (`room.check`, in the thread: a statvfs may block as a write may)."""
    if not chunks:
        return
    own = os.dup(fd)
    writing = asyncio.get_running_loop().run_in_executor(None, _write_and_close, own, b"".join(chunks), room)
    try:  # (shielded: a cancel must not stop the thread before it starts, which would leave `own` open)
        await asyncio.shield(writing)
    except OSError as e:
        raise _not_spooled(e, room.spool.directory) from None
    except asyncio.CancelledError:
        _orphaned(writing)
        raise


class _Room:
    """The free-space checks of one copy, made by the threads that write its pieces, one after another. The first
    piece is written only if the whole copy (`spool.expected`, when more than the piece) leaves more than
    `spool.keep_free` free (leaves_too_little: smtpd's comparison), each later one if it does: a copy that cannot
    fit is deferred before anything is written, and parallel copies that each fitted when they began go below the
    floor by at most one piece each. A free space that cannot be read is no refusal (the write will say whether
    the disk works): one warning, and no more checks for this copy."""

    def __init__(self, spool: CommandSpool):
        self.spool = spool
        self._read_free = spool.free_space  # (None: not checked, none given or one that failed)
        self._first = True

    def check(self, size: int) -> None:
        """Raises CommandNotRun (4.3.1, "insufficient system storage"; the numbers are in the warning line)."""
        spool, taking = self.spool, max(size, self.spool.expected) if self._first else size
        self._first = False
        if self._read_free is None:
            return
        try:
            free = self._read_free()
        except OSError as e:
            self._read_free = None
            log.warning("%s: cannot read the free space of %s: %s (the command's input is spooled unchecked)",
                        spool.queue_id or "NOQUEUE", spool.directory, e)
            return
        if leaves_too_little(free, spool.keep_free, taking):
            log.warning("%s: insufficient system storage to spool a command's input in %s: %d bytes free, %d to "
                        "write, %d kept free", spool.queue_id or "NOQUEUE", spool.directory, free, taking,
                        spool.keep_free)
            raise CommandNotRun("insufficient system storage", dsn="4.3.1")


def _write_and_close(fd: int, data: bytes, room: _Room) -> None:
    try:
        room.check(len(data))
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


class _Output(asyncio.Protocol):
    """The command's merged stdout and stderr, read from a pipe of our own until its end: the first `limit` bytes
    kept (at least `look_past`, for whole_kept()), the rest read and dropped, `ended` done at the end. The pipe is
    ours rather than asyncio's subprocess one, whose Process.wait() also waits for its pipes to close: a command
    killed with its output pipe full (no longer read) or a program that left its group holding it would keep the
    delivery waiting for ever."""

    def __init__(self, limit: int, ended: asyncio.Future, look_past: int = 0):
        self._limit = limit
        self._keep = max(limit, look_past)  # (`whole_kept()`: at least the first `look_past` bytes)
        self._kept = bytearray()
        self.ended = ended

    def data_received(self, data: bytes) -> None:
        if len(self._kept) < self._keep:
            self._kept += data[:self._keep - len(self._kept)]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(None)

    def text(self) -> str:
        return self._kept[:self._limit].decode("utf-8", errors="replace")

    def whole_kept(self) -> str:
        """What was kept, past `limit` up to `look_past` bytes (text() stops at the limit), its bytes that are not
        UTF-8 kept as surrogates (as in argv: a program's name is compared with it)."""
        return self._kept.decode("utf-8", errors="surrogateescape")


class _Group:
    """The command's process group (it leads its own session; the group's number is its pid). `kill()` SIGKILLs
    the group, offspring included, also once the command itself was reaped: a job it left behind
    (`sh -c 'job & exit 0'`) keeps the group, and so its number, in use. But a job that left the group (`setsid`)
    may keep our output pipe open while the group is empty: the number is free then, and another session may have
    it by the time limit (root would kill it). So once the command's end was seen (`leader_ended`) the group is
    signalled only while /proc shows a member that started no later than that: a member of a group that reused
    the number started after our command was reaped. Before, the command's own pid holds the number: signalled
    without a look (a /proc of another pid namespace, or none, would hide it and the time limit would never end
    the command). (Left: the loop turns between the reap, in asyncio's watcher, and `leader_ended`; the moment
    between the look and the signal; a number handed out again within the clock tick, 10 ms, in which the end was
    seen: /proc counts in ticks. Each needs the pid numbers to wrap in that moment.)"""

    def __init__(self, pgid: int, proc_dir: str = "/proc"):
        self.pgid = pgid
        self._proc_dir = proc_dir
        self._ended: float | None = None  # CLOCK_BOOTTIME seconds, as /proc's start times count

    def leader_ended(self) -> None:
        self._ended = time.clock_gettime(time.CLOCK_BOOTTIME)

    def kill(self) -> None:
        if self._ended is not None and not self._has_member_started_by(self._ended):
            return  # (until its end is seen, the command's own pid holds the number: no look needed, nor a /proc
            # that may not show it: another pid namespace's, or none)
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _has_member_started_by(self, seconds: float) -> bool:
        ticks = seconds * os.sysconf("SC_CLK_TCK")
        try:
            names = os.listdir(self._proc_dir)
        except OSError:
            return False
        for name in names:
            if not name.isdigit():
                continue
            try:
                with open(f"{self._proc_dir}/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()  # (the command name may hold ')' and blanks)
            except (OSError, IndexError):
                continue  # (ended meanwhile)
            if len(fields) > 19 and int(fields[2]) == self.pgid and int(fields[19]) <= ticks:
                return True  # (fields[2]: pgrp, fields[19]: starttime, in clock ticks since boot)
        return False


# ------------------------------------------------------------------------------------------- exit statuses

# Postfix's sys_exits table (<sysexits.h> codes 64-78): enhanced status code and text.
SYSEXITS: dict[int, tuple[str, str]] = {
    64: ("5.3.0", "command line usage error"),
    65: ("5.6.0", "data format error"),
    66: ("5.3.0", "cannot open input"),
    67: ("5.1.1", "user unknown"),
    68: ("5.1.2", "host name unknown"),
    69: ("5.3.0", "service unavailable"),
    70: ("5.3.0", "internal software error"),
    71: ("4.3.0", "system resource problem"),
    72: ("5.3.0", "critical OS file missing"),
    73: ("5.2.0", "can't create user output file"),
    74: ("5.3.0", "input/output error"),
    75: ("4.3.0", "temporary failure"),
    76: ("5.5.0", "remote error in protocol"),
    77: ("5.7.0", "permission denied"),
    78: ("5.3.5", "local configuration error"),
}
EX_TEMPFAIL = 75
EX_SOFTWARE = 70  # what Postfix's pipe_command() says of a command killed (a signal, the time limit) in silence


def printable_output(output: str) -> str:
    """Command output as one diagnostic line, cleaned as Postfix's pipe_command() cleans it: each tab and newline
    becomes a space, any other character that is not printable '_'; nothing is trimmed or collapsed."""
    return "".join(" " if c in "\t\n" else c if c.isprintable() else "_" for c in output)


def command_status(result: CommandResult, command: str) -> tuple[Outcome, str, str]:
    """(outcome, enhanced status code, diagnostic) for a finished command, by Postfix's rules. For SENT the
    text is the command's output without trailing blanks (possibly empty): the caller words the success."""
    said = printable_output(result.output)
    output = f". Command output: {said}" if said else ""
    if result.timed_out:
        return Outcome.BOUNCED, "5.3.0", f'Command time limit exceeded: "{command}"{output}'
    if result.signal is not None:
        return Outcome.DEFERRED, "4.3.0", f'Command died with signal {result.signal}: "{command}"{output}'
    code = result.exit_code
    if code == 0:
        return Outcome.SENT, "2.0.0", said.rstrip()
    dsn, after = split_leading_dsn(said)
    if dsn:
        return (*_failure(dsn), after or f'command failed with status {code}: "{command}"')
    if code in SYSEXITS:
        dsn, meaning = SYSEXITS[code]
        return (*_failure(dsn), meaning + output)
    return Outcome.BOUNCED, "5.3.0", f'Command died with status {code}: "{command}"{output}'


def command_diagnostic(result: CommandResult) -> str:
    """The Diagnostic-Code of a failed command, `x-unix; text`, as Postfix's pipe_command() passes it to
    dsb_unix(); "" when the command succeeded."""
    said = printable_output(result.output)
    if result.timed_out or result.signal is not None:
        return f"x-unix; {said or SYSEXITS[EX_SOFTWARE][1]}"
    code = result.exit_code
    if code == 0:
        return ""
    dsn, after = split_leading_dsn(said)
    if dsn:
        return f"x-unix; {after}"
    known = SYSEXITS.get(code) if code is not None else None
    return f"x-unix; {said or (known[1] if known else f'unknown mail system error {code}')}"


def _failure(dsn: str) -> tuple[Outcome, str]:
    """What a failed command's status code makes of its delivery, as Postfix's pipe(8) sends it on: a 4.X.X defers;
    any other bounces, and bounce_append() takes only a 5.X.X (a 2.X.X from the command's output is 5.0.0)."""
    if dsn.startswith("4"):
        return Outcome.DEFERRED, dsn
    if not dsn.startswith("5"):
        log.warning('bounce_append: ignoring dsn code "%s"', dsn)
        return Outcome.BOUNCED, "5.0.0"
    return Outcome.BOUNCED, dsn


# ------------------------------------------------------------------------------------------ argv values

_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


def quote_local(local: str) -> str:
    """A local part as RFC 5322 wants it: as is when it is a dot-atom (or 8-bit), else a quoted string."""
    if not local or _ATEXT.fullmatch(local) or not local.isascii():
        return local
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _address_value(addr: str, flags: str) -> str:
    local, domain = address.split(addr)
    if "u" in flags:
        local = local.lower()
    if "h" in flags:
        domain = domain.lower()
    if "q" in flags:
        local = quote_local(local)
    return f"{local}@{domain}" if "@" in addr else local


def recipient_values(rcpt: Recipient, flags: str, delimiter: str) -> dict[str, str]:
    """The per-recipient macro values of one recipient, from its internal form (as Postfix's pipe(8))."""
    addr = address.internal_form(rcpt.address)
    local, domain = address.split(addr)
    user, ext = split_extension(local, delimiter)
    if "u" in flags:
        local, user, ext = local.lower(), user.lower(), ext.lower()
    original = address.internal_form(address.shown_original(rcpt.original or rcpt.address))
    return {"recipient": _address_value(addr, flags), "original_recipient": _address_value(original, flags),
            "user": user, "extension": ext[1:], "mailbox": local,
            "domain": domain.lower() if "h" in flags else domain}


# ------------------------------------------------------------------------------------------ the message


def command_head(*, sender: str, flags: str, recipient: str = "", original: str = "", now: float = 0.0) -> bytes:
    """The lines the flags put before the message (F, R, O, D)."""
    null_from = sender or "MAILER-DAEMON"
    head = []
    if "F" in flags:
        head.append(f"From {null_from}  {time.asctime(time.localtime(now))}")
    if "R" in flags:
        head.append(f"Return-Path: <{sender}>")
    if "O" in flags and original:
        head.append(f"X-Original-To: {original}")
    if "D" in flags:
        head.append(f"Delivered-To: {recipient}")
    return "".join(h + "\n" for h in head).encode("utf-8")


def command_input(content: Content, head: bytes, flags: str) -> AsyncIterator[bytes]:
    """The message as the command reads it: `head` (command_head), then the content with LF line ends and quoted
    lines, chunk by chunk."""
    encoders: list[Encoder] = [ToLf(), *([from_quoting()] if ">" in flags else []),
                               *([dot_quoting()] if "." in flags else []), FinalNewline()]

    async def chunks() -> AsyncIterator[bytes]:
        yield head
        async for chunk in aencode(content.stream(), *encoders):
            yield chunk
        if "B" in flags:
            yield b"\n"

    return chunks()


# ------------------------------------------------------------------------------------------ the transport


class PipeTransport:
    program = "pipe"  # the Postfix delivery agent whose name its result lines are logged under

    def __init__(self, service: PipeService, *, name: str, recipient_delimiter: str = DEFAULTS.recipient_delimiter,
                 now: Callable[[], float] = time.time, allow_min_user: bool = False, spool: CommandSpool | None = None):
        self._service = service
        self._name = name
        self._delimiter = recipient_delimiter
        self._allow_min_user = allow_min_user
        self._templates = parse_argv(service.argv)
        self._now = now
        self._spool = spool

    @property
    def delivers_each(self) -> bool:
        """One run per recipient (flag D or O), one after another: qmgr records each result as it comes
        (`deliver_each`); a single run for all of them has all its results at once, recorded with the job's end."""
        return "D" in self._service.flags or "O" in self._service.flags

    async def deliver(self, request: DeliveryRequest) -> DeliveryReport:
        return await DeliveryReport.gathered(request.recipients, self.deliver_each(request))

    async def deliver_each(self, request: DeliveryRequest) -> AsyncIterator[RcptResult]:
        """The recipients' results as they are known: those refused before any run, then each run's (one run per
        recipient with flag D or O, one after another: qmgr records each as it comes)."""
        s = self._service
        refusal = self._refused_message(request)
        if refusal is not None:
            outcome, dsn, text = refusal
            for result in DeliveryReport.uniform(request.recipients, outcome, dsn, text, relay=self._name).results:
                yield result
            return
        ready = []
        seen = self._delivered_to(request) if "D" in s.flags else frozenset()
        values = {r.index: recipient_values(r, s.flags, self._delimiter) for r in request.recipients}
        for rcpt in request.recipients:
            if has_control(rcpt.address) or has_control(rcpt.original):
                yield self._result(rcpt, Outcome.BOUNCED, "5.1.3", "bad recipient address syntax: control characters")
            elif any(self._min_user(v) for v in values[rcpt.index].values()):
                yield self._result(rcpt, Outcome.BOUNCED, "5.1.3", "bad recipient address syntax: begins with '-'")
            elif rcpt.address.lower() in seen:
                yield self._result(rcpt, Outcome.BOUNCED, "5.4.6", f"mail forwarding loop for {rcpt.address}")
            else:
                ready.append(rcpt)
        for batch in ([[r] for r in ready] if self.delivers_each else [ready] if ready else []):
            for result in await self._run_batch(request, batch, values):
                yield result

    def _refused_message(self, request: DeliveryRequest) -> tuple[Outcome, str, str] | None:
        """Why no recipient of the message is delivered: too big for the service, a sender it refuses; None."""
        if self._service.size_limit and request.content.size > self._service.size_limit:
            return Outcome.BOUNCED, "5.2.3", "message too large"
        if has_control(request.sender):
            return Outcome.BOUNCED, "5.1.7", "bad sender address syntax: control characters"
        if self._min_user(request.sender):
            return Outcome.BOUNCED, "5.1.7", "bad sender address syntax: begins with '-'"
        return None

    async def close(self) -> None:
        pass

    async def _run_batch(self, request: DeliveryRequest, batch: list[Recipient],
                         values: dict[int, dict[str, str]]) -> list[RcptResult]:
        """One run of the command for `batch`; `values`: the per-recipient macro values, by recipient index."""
        s = self._service
        argv = expand_argv(self._templates, self._request_values(request), [values[r.index] for r in batch])
        first = batch[0]
        head = command_head(sender=request.sender or s.null_sender, flags=s.flags, recipient=first.address,
                            original=address.shown_original(first.original or first.address), now=self._now())
        stdin = command_input(request.content, head, s.flags)
        spool = self._spool and self._spool.for_copy(request.queue_id, len(head) + request.content.size)
        log.debug("%s: %s: running %s", request.queue_id, self._name, argv)
        try:
            result = await run_command(argv, stdin=stdin, env={}, time_limit=s.time_limit,
                                       output_limit=s.output_limit, user=self._user(), cwd=s.directory or "/",
                                       spool=spool)
        except CommandNotRun as e:
            log.warning("%s: %s: %s", request.queue_id, self._name, e.text)
            text, diagnostic = e.as_postfix_says("pipe: fatal: pipe_command: ")
            return [self._result(r, Outcome.DEFERRED, e.dsn, text, diagnostic=diagnostic) for r in batch]
        outcome, dsn, text = command_status(result, argv[0])
        if outcome is Outcome.SENT:
            text = f"delivered via {self._name} service" + (f" ({text[:100]})" if text else "")
            relayed = "X" not in s.flags  # the command is a gateway unless it does final delivery (flag X)
            return [self._result(r, outcome, dsn, text, relayed=relayed) for r in batch]
        diagnostic = command_diagnostic(result)
        return [self._result(r, outcome, dsn, text, diagnostic=diagnostic) for r in batch]

    def _request_values(self, request: DeliveryRequest) -> dict[str, str]:
        s = self._service
        sender = address.internal_form(request.sender) or s.null_sender
        if sender and request.sender and "q" in s.flags:
            sender = _address_value(sender, "q")
        c = request.client_attributes
        return {"sender": sender, "nexthop": request.nexthop.lower() if "h" in s.flags else request.nexthop,
                "queue_id": request.queue_id, "size": str(request.content.size),
                "client_address": c.address, "client_helo": c.helo, "client_hostname": c.name,
                "client_port": c.port, "client_protocol": c.protocol, "sasl_method": c.sasl_method,
                "sasl_sender": c.sasl_sender, "sasl_username": c.sasl_username}

    def _min_user(self, value: str) -> bool:
        return not self._allow_min_user and value.startswith("-")

    def _user(self) -> str | None:
        if self._service.user:
            return self._service.user
        return "nobody" if os.geteuid() == 0 else None

    @staticmethod
    def _delivered_to(request: DeliveryRequest) -> frozenset[str]:
        return delivered_to(read_header(request.content, HEADER_READ_LIMIT)[0])

    def _result(self, rcpt: Recipient, outcome: Outcome, dsn: str, text: str, *, relayed: bool = False,
                diagnostic: str = "") -> RcptResult:
        return RcptResult(rcpt, outcome, dsn, text, relay=self._name, relayed=relayed, diagnostic=diagnostic)
