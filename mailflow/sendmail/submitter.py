"""`Submitter`: stores messages for one identity under one configuration: the sender check, the maildrop file
(mailflow.maildrop), the wake-up of the server's pickup stage.

    Submitter(config, identity, fullname, say).store(sender, recipients, chunks, opts) -> maildrop file name
    Submitter.sender_problem(sender) -> str    why this login may not use `sender` ("" when it may)
    queue_problem(queue) -> str                why mail cannot be left for a server in `queue` ("" when it can)

Failure behaviour: `store` raises MaildropError with the sysexits code to exit with (73 when the queue directory
is missing: a wrong configuration would strand the mail where no server looks; 65 when the message is bigger
than message_size_limit); with no server holding the queue's lock, `say` warns once that the mail waits.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from mailflow.maildrop import MaildropError, MaildropMessage, wake_pickup, write_maildrop
from mailflow.queuelock import queue_owner
from mailflow.sendmail.identity import Identity, may_use_sender
from mailflow.sendmail.options import Options
from mailflow.sendmail.reading import split_input
from mailflow.sendmail.settings import Settings


@dataclass
class Submitter:
    """Stores messages for one identity under one configuration: the checks, the maildrop, the wake-up."""

    config: Settings
    identity: Identity
    fullname: str
    say: Callable[[str], object] = lambda text: None  # a warning for the user (stderr)
    _told_no_server: bool = False

    def sender_problem(self, sender: str) -> str:
        if may_use_sender(self.identity.login, sender, self.config):
            return ""
        return (f"user {self.identity.login} (uid {self.identity.uid}) may not use the sender address "
                f"<{sender}> (local_login_sender_maps)")

    def store(self, sender: str, recipients: list[str], chunks: Iterable[bytes], opts: Options,
              rcpt_dsn: Sequence[tuple[str, str]] = ()) -> str:
        """Write the message (streamed from `chunks`) into the maildrop and wake pickup. `rcpt_dsn`: one
        (NOTIFY, ORCPT) per recipient (-bs's RCPT parameters; () for none). Raises MaildropError (EX_DATAERR when
        it is bigger than message_size_limit)."""
        message = MaildropMessage(sender=sender, recipients=tuple(recipients), uid=self.identity.uid,
                                  user=self.identity.login, fullname=self.fullname, time=time.time(),
                                  notify=opts.notify, ret=opts.ret, envid=opts.envid,
                                  rcpt_notify=tuple(n for n, _ in rcpt_dsn), rcpt_orcpt=tuple(o for _, o in rcpt_dsn),
                                  body_type=opts.body_type)  # "" = 8BITMIME if a byte is not ASCII
        queue = self.config.queue_path
        problem = queue_problem(queue)
        if problem:
            raise MaildropError(problem, os.EX_CANTCREAT)
        name = write_maildrop(queue / "maildrop", message, chunks, size_limit=self.config.smtpd.message_size_limit)
        wake_pickup(queue)
        if not self._told_no_server and _no_server(queue):
            self._told_no_server = True
            self.say(f"warning: no mailflow server is running on {queue}: the mail waits in its maildrop until one "
                     "starts")
        return name

    def split(self, lines: Iterable[bytes]) -> tuple[bytes, Iterator[bytes]]:
        return split_input(lines, self.config.header_size_limit)


def _no_server(queue: Path) -> bool:
    """Whether no server holds the queue's lock; False when this user cannot tell (the lock file unreadable: the
    mail is stored all the same, so nothing is said)."""
    try:
        return queue_owner(queue) is None
    except OSError:
        return False


def queue_problem(queue: Path) -> str:
    """Why mail cannot be left for a server in `queue` ("" when it can): the directory must exist, made by the
    server (a relative queue_directory is taken from the configuration file's directory)."""
    if queue.is_dir():
        return ""
    what = "is not a directory" if queue.exists() else "does not exist"
    return (f"the queue directory {queue} {what}: check queue_directory in the configuration "
            "(-C, $MAILFLOW_CONFIG) and that mailflow serve has run with it")
