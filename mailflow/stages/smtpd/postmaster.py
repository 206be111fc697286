"""smtpd's postmaster notices: the transcript of a session with errors (Postfix's smtpd_chat_notify).

With notify_classes naming a class smtpd files its errors under (bounce, data, policy, protocol, resource,
software; Postfix's default: resource, software), a session whose refusals fall in one of them (each refusal's
class is the one its status.Reply was given where it was made, as Postfix's smtpd_check_reject(state,
MAIL_ERROR_x, ...): never read from the reply's words, which may hold what the client sent) ends with a
notice to the postmaster: "Transcript of session follows.", each line of the dialogue as Postfix writes it
(` Out: 220 ...`, ` In:  EHLO ...`, wrapped at 78 columns, continuations indented by 4), the reason of an aborted
session, "For other details, see the local mail logfile". It goes to error_notice_recipient, or to
bounce_notice_recipient when one of the session's errors is of the class bounce (named in notify_classes or not;
its To: field names error_notice_recipient all the same, as Postfix's), from the double-bounce sender (so a notice
that cannot be delivered is dropped, never a notice about a notice), through cleanup as any local mail.

    transcript_notice(...) -> bytes         the notice (CRLF lines, header and body)
    SessionNotices(config, submit)          the session observer (stages.smtpd.transcript) that sends them;
                                           reconfigure(config) at a reload; await close() at the stop
                                           (at most CLOSE_TIMEOUT seconds)

Decisions:
- As Postfix's smtpd, a message accepted forgives the errors before it (its error mask is cleared at a 250 for
  DATA or BDAT); the transcript itself is the whole session's since its last flush.
- As Postfix's smtpd at smtpd_history_flush_threshold: at HELO, EHLO, RSET and the end of a message (the
  session's `checkpoint`), a record past FLUSH_THRESHOLD lines is flushed (at XCLIENT, whatever its length): its
  notice sent if its errors fall in a named class (with no reason: the session goes on), then its lines and
  errors cleared; the session's end sends what is left the same way. The reason of an aborted
  session is the one the session set where it ended (`Transcript.reason`: "timeout", "lost connection", "too
  many errors"; none for QUIT or an end the server chose, as Postfix's).
- Bounded: its own record of a session (only while a class of smtpd's is named; not the transcript the other
  observers read, whose limits are theirs) keeps at most BYTE_LIMIT bytes (each line cut at transcript.MAX_LINE,
  counted one more for its end): past them lines are counted, and the notice says how many it leaves out. At
  most PENDING_LIMIT notices wait for cleanup at once; past that a notice is dropped and logged (Postfix's smtpd
  posts with post_mail_fopen_nowait: a notice that cannot be posted now is dropped, with a warning): one
  warning a REPORT_INTERVAL at most, the next saying how many were dropped untold since.
- A failure to queue a notice is logged and touches nothing else (the session has ended, or goes on).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from mailflow.clock import Clock, SystemClock
from mailflow.content import Content
from mailflow.faults import REPORT_INTERVAL
from mailflow.logs import printable
from mailflow.model import ClientInfo, Envelope, Submission
from mailflow.stages.bounce import line_wrap, notice_recipient
from mailflow.stages.smtpd.transcript import MAX_LINE, SessionObserver, Transcript

log = logging.getLogger("mailflow.smtpd")

SMTPD_CLASSES = ("bounce", "data", "policy", "protocol", "resource", "software")  # what smtpd's errors are filed as
FLUSH_THRESHOLD = 100  # Postfix's smtpd_history_flush_threshold: lines of a record before it is flushed
BYTE_LIMIT = 32_768  # bytes of a record's lines
PENDING_LIMIT = 64  # notices waiting for cleanup at once
CLOSE_TIMEOUT = 10.0  # seconds the stop waits for the notices under way
WIDTH, INDENT = 78, 4  # Postfix's smtpd_chat_notify: line_wrap(..., LENGTH 78, INDENT 4)


def transcript_notice(*, lines: list[str], omitted: int, client: str, reason: str, myhostname: str,
                      header_to: str) -> bytes:
    """The notice, as Postfix's smtpd_chat_notify writes it (cleanup adds Received, Message-ID): `lines` the
    dialogue, a line each ("In:  command", "Out: reply"); `header_to` the To: address (Postfix's always names
    error_notice_recipient there, even for a notice that goes to bounce_notice_recipient)."""
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{myhostname}>",
        f"To: Postmaster <{printable(header_to)}>",
        f"Subject: mailflow SMTP server: errors from {printable(client)}",
    ]  # (cleanup adds Received, Message-ID and Date, as Postfix's does)
    body = ["", "Transcript of session follows.", ""]
    for line in lines:
        body += [" " + piece for piece in line_wrap(printable(line), WIDTH, INDENT)]
    if omitted:
        body.append(f" ({omitted} more lines of the session not kept)")
    body.append("")
    if reason:
        body.append(f"Session aborted, reason: {reason}")
    body += ["", "For other details, see the local mail logfile"]
    return ("\r\n".join(head + body) + "\r\n").encode("utf-8", "replace")


class _Record:
    """What one session's notice needs: its lines since the last flush (bounded), how many were left out, the
    classes of its errors since then."""

    __slots__ = ("lines", "size", "omitted", "errors")

    def __init__(self) -> None:
        self.lines: list[str] = []  # one string a line, as the notice writes it ("In:  ...", "Out: ...")
        self.size = self.omitted = 0
        self.errors: set[str] = set()

    def keep(self, prefix: str, text: str) -> None:
        """Each line of `text` (a reply may have several), cut at MAX_LINE, after `prefix`."""
        for line in (text.split("\r\n") if "\r\n" in text else (text,)):
            line = prefix + line[:MAX_LINE]
            size = self.size + len(line) + 1
            if size > BYTE_LIMIT:
                self.omitted += 1
                continue
            self.lines.append(line)
            self.size = size

    @property
    def count(self) -> int:
        return len(self.lines) + self.omitted


class SessionNotices(SessionObserver):
    """The session observer that sends the postmaster a session's transcript (see the module docstring).
    `submit` is cleanup's (Submission -> queue id). It keeps its own record of each session (the transcript's
    lines are the other observers', at their limits): none while notify_classes names no class of smtpd's."""

    line_limit = 0
    byte_limit = 0

    def __init__(self, config, submit: Callable[[Submission], Awaitable[str]], clock: Clock | None = None):
        self._submit = submit
        self._clock = clock or SystemClock()
        self._dropped_untold = 0  # notices dropped since the last warning about it
        self._dropped_told_at = -REPORT_INTERVAL
        self._records: dict[Transcript, _Record] = {}
        self._pending: set[asyncio.Task] = set()
        self.reconfigure(config)

    def reconfigure(self, config) -> None:
        """The classes and recipients of `config` (a reload): sessions from now on, and those under way at their
        end."""
        q = config.queue
        self._classes = frozenset(c for c in q.notify_classes if c in SMTPD_CLASSES)
        self._myhostname = config.myhostname
        self._error_to, self._bounce_to = q.error_notice_recipient, q.bounce_notice_recipient

    @property
    def active(self) -> bool:  # type: ignore[override]
        return bool(self._classes)

    def started(self, transcript: Transcript) -> None:
        if self._classes:
            self._records[transcript] = _Record()

    def commanded(self, transcript: Transcript, text: str) -> None:
        record = self._records.get(transcript)
        if record is not None:
            record.keep("In:  ", text)

    def replied(self, transcript: Transcript, line: str) -> None:
        record = self._records.get(transcript)
        if record is None:
            return
        record.keep("Out: ", line.rstrip("\r\n"))

    def refused(self, transcript: Transcript, error_class: str) -> None:
        record = self._records.get(transcript)
        if record is not None:
            record.errors.add(error_class)

    def queued(self, transcript: Transcript, queue_id: str) -> None:
        record = self._records.get(transcript)
        if record is not None:
            record.errors.clear()  # a message accepted forgives the errors before it (Postfix's smtpd)

    def checkpoint(self, transcript: Transcript, everything: bool) -> None:
        """Postfix's chat_reset(state, threshold): past the threshold (0 for `everything`), the notice if one is
        due (no reason: the session goes on), then the lines and errors cleared."""
        record = self._records.get(transcript)
        if record is not None and record.count > (0 if everything else FLUSH_THRESHOLD):
            transcript.identify()  # (the client as known now: after PROXY or XCLIENT)
            self._notify(transcript, record, "")
            self._records[transcript] = _Record()

    def ended(self, transcript: Transcript) -> None:
        record = self._records.pop(transcript, None)
        if record is not None:
            self._notify(transcript, record, transcript.reason)

    def _notify(self, transcript: Transcript, record: _Record, reason: str) -> None:
        """The notice of `record`'s lines, when its errors fall in a named class."""
        if not record.errors & self._classes:
            return
        to = self._bounce_to if "bounce" in record.errors else self._error_to  # (bounce named or not)
        if not to:
            return
        if len(self._pending) >= PENDING_LIMIT:
            self._dropped(transcript.client)
            return
        to, header_to = (notice_recipient(a, self._myhostname) for a in (to, self._error_to or to))
        notice = transcript_notice(lines=record.lines, omitted=record.omitted, client=transcript.client,
                                   reason=reason, myhostname=self._myhostname, header_to=header_to)
        task = asyncio.get_running_loop().create_task(self._send(notice, to, transcript.client))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _dropped(self, client: str) -> None:
        """A notice dropped for want of room: warned of once a REPORT_INTERVAL at most (a client making errors in
        every session cannot make a line each)."""
        now = self._clock.time()
        if now - self._dropped_told_at < REPORT_INTERVAL:
            self._dropped_untold += 1
            return
        more = f" ({self._dropped_untold} more dropped since the last warning)" if self._dropped_untold else ""
        log.warning("postmaster notify: %s: dropped, %d notices wait for the queue already%s", client,
                    len(self._pending), more)
        self._dropped_told_at, self._dropped_untold = now, 0

    async def _send(self, notice: bytes, to: str, client: str) -> None:
        envelope = Envelope(f"double-bounce@{self._myhostname}", (to,))
        local = ClientInfo(addr="127.0.0.1", helo=self._myhostname, protocol="local")
        try:
            await self._submit(Submission(envelope, Content.of(notice), local))
        except Exception as e:
            log.warning("postmaster notify: the transcript of a session of %s could not be queued: %s", client, e)
        # (queued: cleanup logs it as any message; Postfix's smtpd logs no line of its own for the notice)

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Wait for the notices under way (the store must stay open until they are queued), at most `timeout`
        seconds: past that those still waiting are cancelled and counted in a warning (a stop is not held up by
        a stalled store)."""
        if not self._pending:
            return
        _, late = await asyncio.wait(set(self._pending), timeout=timeout)
        for task in late:
            task.cancel()
        if late:
            log.warning("postmaster notify: %d notices not queued at the stop (the queue did not take them within "
                        "%g s)", len(late), timeout)
            await asyncio.gather(*late, return_exceptions=True)

