"""`mailflow sendmail` in deliver mode and -bs: who may submit, then the message into the maildrop.

    run(options, config, stdin, stdout, stderr, identity=None) -> exit code

Exit codes (sysexits): 0; 64 EX_USAGE (no recipients, bad address); 65 EX_DATAERR (bigger than
`message_size_limit`: "message file too big", or a header section larger than `header_size_limit`); 77
EX_NOPERM (not in `authorized_submit_users`, or a sender `local_login_sender_maps` does not allow); 73
EX_CANTCREAT / 75 EX_TEMPFAIL when the message cannot be stored (and 75 when a table cannot answer). Every failure
prints one line on stderr; a standard error that cannot be written (a pipe nobody reads) changes no exit
code: a stored message is 0 whatever its warnings or -v's line met. SIGTERM or SIGHUP before the message is
stored removes its unfinished file and ends the process by that signal (nothing is left behind).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
from typing import BinaryIO, Callable, Iterator, TextIO

from mailflow.errors import LookupRetry
from mailflow.maildrop import MaildropError
from mailflow.sendmail.identity import Identity, current_identity, may_submit
from mailflow.sendmail.options import Options, UsageError
from mailflow.sendmail.reading import (argument_recipients, argument_sender, clean_recipient, header_overflows,
                                       header_recipients, read_message)
from mailflow.sendmail.settings import Settings
from mailflow.sendmail.submitter import Submitter

CLEANUP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # (SIGINT already raises KeyboardInterrupt)


class Signalled(BaseException):
    """A signal arrived while the message was being read or written (its file is removed on the way out)."""

    def __init__(self, number: int):
        super().__init__(number)
        self.number = number


def run(opts: Options, config: Settings, stdin: BinaryIO, stdout: BinaryIO, stderr: TextIO,
        identity: Identity | None = None) -> int:
    """deliver or -bs; returns the exit code. SIGTERM or SIGHUP while a message is being stored removes its
    unfinished maildrop file, as Postfix's postdrop does, then ends the process by that signal."""
    with _cleanup_on_signals() as caught:
        try:
            return _run(opts, config, stdin, stdout, stderr, identity)
        except Signalled as e:
            caught.append(e.number)
    stderr.flush()
    os.kill(os.getpid(), caught[0])  # the default action again: the caller sees the signal
    return os.EX_TEMPFAIL  # (not reached for a signal whose default ends the process)


@contextlib.contextmanager
def _cleanup_on_signals() -> Iterator[list[int]]:
    """While inside, CLEANUP_SIGNALS not ignored by the caller raise Signalled (so that write_maildrop removes its
    temporary file); on the way out the previous handlers are back. Outside the main thread (signals cannot be caught
    there) nothing."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(number: int, frame) -> None:
        raise Signalled(number)

    # A signal the caller ignores (SIGHUP under nohup) stays ignored, as Postfix's postdrop leaves it.
    previous = {number: signal.signal(number, handler) for number in CLEANUP_SIGNALS
                if signal.getsignal(number) is not signal.SIG_IGN}
    try:
        yield caught
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def _run(opts: Options, config: Settings, stdin: BinaryIO, stdout: BinaryIO, stderr: TextIO,
         identity: Identity | None) -> int:
    me = identity or current_identity()
    say = _warner(stderr)
    for note in opts.notes if opts.verbose else ():
        say(note)
    try:
        if not may_submit(me.login, config.sendmail.authorized_submit_users):
            say(f"user {me.login} (uid {me.uid}) is not allowed to submit mail (authorized_submit_users)")
            return os.EX_NOPERM
        # as given, bytes that are not UTF-8 too (surrogate escapes): cleanup writes them as Postfix's does
        fullname = opts.fullname if opts.fullname is not None else os.environ.get("NAME") or me.gecos
        submitter = Submitter(config, me, fullname, say)
        if opts.mode == "smtp":
            return _smtp(stdin, stdout, submitter, opts, say)
        return _deliver(opts, config, stdin, stderr, submitter, say)
    except LookupRetry as e:
        say(f"cannot decide now: {e.text}")
        return os.EX_TEMPFAIL
    except UsageError as e:
        say(str(e))
        return os.EX_USAGE


def _warner(stderr: TextIO) -> Callable[[str], None]:
    """One line on standard error; a write error there (a pipe nobody reads) is ignored: the exit code says what
    happened, and once the message is stored it must be 0 (a caller that retried on failure would send it twice)."""
    def say(text: str) -> None:
        try:
            stderr.write(f"sendmail: {text}\n")
            stderr.flush()
        except OSError:
            pass

    return say


def _smtp(stdin: BinaryIO, stdout: BinaryIO, submitter: Submitter, opts: Options, say) -> int:
    """-bs, its session logged to `[log] file` as smtpd's (a file that cannot be opened: a warning, no log)."""
    from mailflow.logs import tool_logger
    from mailflow.sendmail.stdio_smtp import StdioSmtp

    config = submitter.config
    with contextlib.ExitStack() as opened:
        try:
            logger = opened.enter_context(tool_logger(config.log, config.myhostname))
        except OSError as e:
            say(f"warning: cannot write the mail log {config.log.file}: {e.strerror}")
            logger = None
        return StdioSmtp(stdin, stdout, submitter, opts, logger=logger).run()


def _deliver(opts: Options, config: Settings, stdin: BinaryIO, stderr: TextIO, submitter: Submitter, say) -> int:
    origin = config.origin
    if not opts.extract and not opts.recipients:
        raise UsageError("no recipients: name them on the command line or use -t")
    recipients = [address for arg in opts.recipients for address in argument_recipients(arg, origin)]
    me = submitter.identity
    sender = argument_sender(opts.sender, origin, say) if opts.sender is not None else f"{me.login}@{origin}"
    problem = submitter.sender_problem(sender)
    if problem:
        say(problem)
        return os.EX_NOPERM
    head, rest = submitter.split(read_message(stdin, opts.ignore_dots))
    if header_overflows(head, config.header_size_limit):  # cleanup would refuse it; -t would miss recipients
        say(f"message not stored: the header section is larger than header_size_limit "
            f"({config.header_size_limit} bytes)")
        return os.EX_DATAERR
    if opts.extract:
        recipients += [clean_recipient(r, origin) for r in header_recipients(head)]
    if not recipients:  # (`sendmail ''` or `sendmail ,` name no address either)
        raise UsageError("no recipient addresses found in the message header (-t)" if opts.extract
                         else "no recipient addresses found on the command line")
    try:
        name = submitter.store(sender, recipients, itertools.chain((head,), rest), opts)
    except MaildropError as e:
        say(f"message not stored: {e}")
        return e.code
    if opts.verbose:
        say(f"queued as maildrop/{name}: from=<{sender}>, {len(recipients)} recipient(s), uid {me.uid}")
    return 0
