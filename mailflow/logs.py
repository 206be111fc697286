"""The mail log: one line per event, in Postfix's words, so that pflogsumm, fail2ban, logwatch and admins' greps
read it as they read Postfix's.

What it owns
- `printable(text)`: Postfix's printable(3): every character that is not printable becomes '?' (valid UTF-8
  printable characters stay: mailflow always speaks SMTPUTF8). Every client-supplied string that reaches a log
  line or a tool's output goes through it; the formatters apply it to every line once more.
- `MailLog`: one method per message event, each line starting with the queue id: client (smtpd's
  `QID: client=host[ip]`, with `sasl_method=, sasl_username=` after AUTH, `sasl_sender=` after MAIL's AUTH=;
  pickup's `QID: uid=N from=<s>`),
  message-id (cleanup), queued (`from=<s>, size=N, nrcpt=N (queue active)`; `opened` for a message held on
  arrival, when qmgr first takes it), sent / deferred / bounced (Postfix's log_adhoc: `to=<r>[, orig_to=<o>],
  relay=…[, conn_use=N], delay=T, delays=a/b/c/d, dsn=…, status=… (text)`; a bounce soft_bounce kept
  deferred says `dsn=4.X.X, status=SOFTBOUNCE`, as Postfix's bounce_append, its event `deferred`), the times as
  `format_tv` writes them, `delays` as `log_delays` computes them from the result's stamps; the event's fields
  also name the transport, and carry the times as numbers), expired
  (qmgr's `from=<s>, status=expired, returned to sender`, after the attempt's `status=deferred` lines: the
  recipients it returns, `bounced` "message expired: …", go to the observer only, as Postfix logs no line for
  them), notice, removed, corrupt, verified (an address verification probe's result: `VRFY000001: to=<a>,
  relay=…, dsn=…, status=deliverable (text)`); and postsuper's, for what an operator did (`operator`: `QID:
  removed`, `placed on hold`, `released from hold`, `requeued`; `operator_total`: `Deleted: N messages`… without a
  queue id), written by the queue tools (mailflow.queue_tools.apply) in the server for the admin API and in the
  command's own process (`tool_mail_log`). Nothing else writes to the `mailflow.mail` logger. `MailLog(observer=f)`
  also hands each event to `f(queue_id, event, fields)` (the capture server's queue histories; metrics), after
  the line is logged; an observer that raises is logged once per event and changes nothing else.
- `SmtpdLog`: smtpd's session events, in Postfix smtpd's words: `connect from host[ip]`, `disconnect from
  host[ip] ehlo=1 mail=1 … commands=N`, `NOQUEUE: reject: RCPT from host[ip]: 554 5.7.1 …; from=<s> to=<r>
  proto=ESMTP helo=<h>` (`hold:`, `discard:`, `redirect:`, `bcc:`, `filter:`, `warn:`, `info:` alike),
  `Anonymous TLS connection established from …` (`Trusted …` with a client certificate; asked for from
  tls_loglevel 1 only), `SSL_accept error from host[ip]: Connection timed out` (and its other reasons),
  `warning: host[ip]: SASL PLAIN authentication failed: …` (and `… authentication aborted`), `too many errors
  after CMD from …`, `improper command pipelining after CMD from …: <input>` (the input as Postfix's escape(3)
  writes it: `\\r\\n`), `warning: Illegal address syntax from … in CMD command: …`, `warning: QID: queue file
  size limit exceeded`.
- `setup_logging(log_config, hostname)`: `[log] format = "text"` writes syslog-style lines,
  `TIMESTAMP HOST SYSLOG_NAME/SERVICE[PID]: [warning: ]TEXT` (RFC 3339 time, `syslog_name` default
  "postfix-mailflow", the service being the stage: smtpd, cleanup, qmgr, smtp, local, pipe, pickup, master…);
  `"json"` writes one JSON object per line with `event` and the fields. `[log] file` writes to a file
  (reopened when logrotate moves it) instead of stderr. A write to it that fails (the disk full) loses that line
  and nothing else, as Postfix's postlogd drops what it cannot write: mail goes on, and stderr says so in one line
  (`LogFileHandler`): at the first failure, then once a minute with the count, then when writes work again;
  never Python's traceback for every line.
- `tool_warnings(prefix)`: a command's warnings on stderr, `PREFIX: warning: TEXT`, printable, while it runs.
- `tool_mail_log(log_config, hostname)`: the MailLog of a command that runs beside the server (`mailflow queue
  hold` …): the same `[log] file` and format, lines with the command's own pid, as Postfix's postsuper writes to
  maillog_file; none with no `[log] file` (the server's stderr is no place another process can write to).
  `tool_logger` is its logger, for a command that writes other lines too (`sendmail -bs`: smtpd's session lines
  and `client=`, as Postfix's stand-alone smtpd writes them).

Failure behaviour: logging never raises into the caller (the logging module's rule); a line is never split by
client input (line ends and other controls are replaced). No line is longer than LOG_TEXT_LIMIT bytes of text
after its prefix (time, host, program, level): the formatters cut what is longer, as Postfix's msg_logger and
msg_syslog write at most 2000 bytes of a record's text (a command's stderr, ToolFormatter, is cut alike, where
Postfix's msg_vstream writes the whole text), so a peer's reply, a milter's or policy server's text or
a header quoted whole cannot make one line that syslog and journald would split or drop. A JSON record's line is
at most JSON_RECORD_LIMIT bytes whole (its message and string fields, the traceback too, cut to their shares of it
as JSON writes them: quotes and backslashes doubled; a text keeps its start, a traceback its last lines), unless
its keys and its values other than strings (numbers, the four delays: written whole) alone take more, as no
record's fields do (they are the code's, never a stranger's). A
record's traceback shows its last TRACEBACK_LINES lines and the exception on one line: an error whose text holds
line ends, or a deep recursion, makes a few lines, not thousands.
"""
from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import sys
import time
import traceback
from datetime import datetime
from typing import TYPE_CHECKING, Iterator, Union

from mailflow import address
if TYPE_CHECKING:  # (annotations only: sendmail, run once per message, loads neither the model nor pydantic)
    from mailflow.config import LogConfig
    from mailflow.model import ConnStats, MsgStats, RcptResult
    from mailflow.sendmail.settings import LogSettings

MAIL_LOGGER = "mailflow.mail"
SMTPD_LOGGER = "mailflow.smtpd"
# Postfix smtpd's command table order (the disconnect line lists the commands in it); "unknown" is the rest.
COMMAND_ORDER = ("helo", "ehlo", "xclient", "xforward", "starttls", "auth", "mail", "rcpt", "data", "bdat", "rset",
                 "noop", "vrfy", "etrn", "quit", "help", "unknown")
_SERVICE_ALIASES = {"mail": "qmgr", "mbox": "local", "store": "qmgr", "addressmap": "cleanup"}
_LEVEL_PREFIX = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "fatal: "}
_SMTPD_LOGGER = logging.getLogger(SMTPD_LOGGER)  # every session's SmtpdLog writes here (one lookup, not one a session)
# postsuper's words (src/postsuper/postsuper.c): action -> (the line of each message, its summary's name), and the
# event a line is for a MailLog observer (a deletion is "removed", as qmgr's)
POSTSUPER = {"delete": ("removed", "Deleted"), "hold": ("placed on hold", "Placed on hold"),
             "release": ("released from hold", "Released from hold"), "requeue": ("requeued", "Requeued")}
_POSTSUPER_EVENT = {"delete": "removed", "hold": "held", "release": "released", "requeue": "requeued"}


LOG_TEXT_LIMIT = 2000  # bytes of a record's text written (Postfix's MSG_LOGGER_RECLEN and MSG_SYSLOG_RECLEN)
JSON_RECORD_LIMIT = 4000  # bytes of a JSON record's line, its fields and their quoting all together
TRACEBACK_LINES = 20  # the last lines of a traceback a record shows (its innermost frames)


def cut_for_log(text: str) -> str:
    """`text` cut to its first LOG_TEXT_LIMIT bytes as UTF-8 (a character never split), as Postfix's `%.2000s`."""
    if len(text) * 4 <= LOG_TEXT_LIMIT:  # (no character is more than 4 bytes: the common case, not encoded)
        return text
    return text.encode("utf-8", "surrogatepass")[:LOG_TEXT_LIMIT].decode("utf-8", "ignore")


def log_text(text: str) -> str:
    """`cut_for_log(printable(text))`, cut first: a character's replacement is one character, so the text past the
    first LOG_TEXT_LIMIT characters, which the cut drops anyway, is never walked (a megabyte took printable 85 ms)."""
    return cut_for_log(printable(text[:LOG_TEXT_LIMIT]))


def printable(text: object, replacement: str = "?") -> str:
    """`text` with every non-printable character (controls, line and paragraph separators, format characters,
    unpaired surrogates, non-ASCII spaces) replaced by `replacement`; printable Unicode is kept."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else replacement for c in s)


_ESCAPES = {7: "\\a", 8: "\\b", 9: "\\t", 10: "\\n", 11: "\\v", 12: "\\f", 13: "\\r", 92: "\\\\"}


def escaped(data: bytes) -> str:
    """Postfix's escape(3), which smtpd applies to the input it quotes: printable ASCII as it is (a backslash
    doubled), \\r \\n \\t … for those controls, \\ooo (octal) for any other byte."""
    return "".join(_ESCAPES.get(b) or (chr(b) if 32 <= b < 127 else f"\\{b:03o}") for b in data)


def client_name(hostname: str, addr: str) -> str:
    """`host[ip]` as Postfix writes a client ("unknown" when it has no verified name)."""
    return f"{printable(hostname or 'unknown')}[{printable(addr)}]"


class MailLog:
    def __init__(self, logger: logging.Logger | None = None, observer=None):
        """`observer(queue_id, event, fields)`: also told every event (None: nobody)."""
        self._log = logger or logging.getLogger(MAIL_LOGGER)
        self._observer = observer

    @property
    def active(self) -> bool:
        """Whether mail events go anywhere (level info or lower, or an observer): callers skip work done only
        for an event."""
        return self._observer is not None or self._log.isEnabledFor(logging.INFO)

    def _emit(self, queue_id: str, event: str, line: str, *, service: str, level: int = logging.INFO,
              logged: bool = True, id_first: bool = True, **fields) -> None:
        """`line` logged after `queue_id: ` (`id_first`; else the line names it itself), and told to the observer."""
        fields = {k: printable(v) if isinstance(v, str) else v for k, v in fields.items()}
        if logged:
            extra = {"queue_id": queue_id, "event": event, "fields": fields, "service": service}
            if id_first:
                self._log.log(level, "%s: %s", queue_id, printable(line), extra=extra)
            else:
                self._log.log(level, "%s", printable(line), extra=extra)
        if self._observer is not None:
            try:
                self._observer(queue_id, event, fields)
            except Exception:
                logging.getLogger("mailflow").exception("%s: mail event observer failed", queue_id)

    def received(self, queue_id: str, client: str, *, sasl_method: str = "", sasl_username: str = "",
                 sasl_sender: str | None = None) -> None:
        """smtpd accepted a message from `client` (`host[ip]`), logged before cleanup's and qmgr's lines; with
        the login after AUTH, and MAIL's AUTH= sender when given, an empty one too (Postfix's `sasl_sender=`)."""
        if not self.active:
            return
        sasl = f", sasl_method={sasl_method}, sasl_username={sasl_username}" if sasl_username else ""
        sasl += f", sasl_sender={sasl_sender}" if sasl_sender is not None else ""
        self._emit(queue_id, "received", f"client={client}{sasl}", service="smtpd", client=client,
                   sasl_method=sasl_method, sasl_username=sasl_username, sasl_sender=sasl_sender or "")

    def picked_up(self, queue_id: str, uid: int, sender: str, *, orig_id: str = "") -> None:
        """pickup took a message submitted by local user `uid` (`mailflow sendmail`), or (`orig_id`: its old queue
        id) copied one an operator requeued: `uid=N from=<s> orig_id=OLD`, Postfix's pickup words for that."""
        if not self.active:
            return
        line = f"uid={uid} from=<{sender}>"
        if orig_id:
            self._emit(queue_id, "received", f"{line} orig_id={orig_id}", service="pickup", uid=uid, sender=sender,
                       orig_id=orig_id)
        else:
            self._emit(queue_id, "received", line, service="pickup", uid=uid, sender=sender)

    def message_id(self, queue_id: str, message_id: str, *, resent: bool = False) -> None:
        """cleanup's `message-id=<…>` (`resent-message-id=<…>` for a Resent-Message-ID field, as Postfix's)."""
        if self.active:
            event = "resent-message-id" if resent else "message-id"
            self._emit(queue_id, event, f"{event}={message_id}", service="cleanup", message_id=message_id)

    def queued(self, queue_id: str, sender: str, size: int, nrcpt: int, *, logged: bool = True) -> None:
        """The message is in the queue: qmgr's `from=<s>, size=N, nrcpt=N (queue active)`. Not `logged` for a
        message put on hold as it arrived (the observer alone is told): qmgr logs the line when it first takes
        that message (`opened`), as Postfix's qmgr does."""
        if self.active if logged else self._observer is not None:
            self._active_line(queue_id, "queued", sender, size, nrcpt, logged=logged)

    def opened(self, queue_id: str, sender: str, size: int, nrcpt: int) -> None:
        """qmgr's `from=` line for a message entering the active queue again (a retry, a release, a restart) or for
        the first time after it was held on arrival; an event of its own, since the message was `queued` when it
        arrived (the metrics count it once)."""
        if self.active:
            self._active_line(queue_id, "opened", sender, size, nrcpt)

    def _active_line(self, queue_id: str, event: str, sender: str, size: int, nrcpt: int, logged: bool = True) -> None:
        self._emit(queue_id, event, f"from=<{sender}>, size={size}, nrcpt={nrcpt} (queue active)", service="qmgr",
                   logged=logged, sender=sender, size=size, nrcpt=nrcpt)

    def result(self, queue_id: str, result: RcptResult, stats: MsgStats, now: float, *, program: str = "qmgr",
               logged: bool = True) -> None:
        """One recipient's result line, its times from `stats` (`result.stats`, else the attempt's) and
        `result.conn`, `now` the time of the line, under `program` (the delivery agent's, `Transport.program`;
        qmgr for a result qmgr made); with `logged` false the observer alone is told (a recipient
        returned for its age: Postfix logs the attempt's `status=deferred` line and qmgr's `status=expired` line,
        no `status=bounced`, and pflogsumm counts those)."""
        if not (self.active if logged else self._observer is not None):
            return
        event = result.outcome.value  # sent, deferred, bounced: the status words of Postfix's lines
        status = SOFT_BOUNCE_STATUS if result.soft_bounced else event
        named = result.named
        to = named.address
        original = address.shown_original(named.original)  # (as Postfix logs it: without quotes that add nothing)
        if not original or original.casefold() == to.casefold():  # (Postfix compares them with strcasecmp_utf8)
            original = ""
        orig = f", orig_to=<{original}>" if original else ""
        use = result.conn.use if result.conn is not None else 0
        reuse = f", conn_use={use}" if use > 1 else ""
        delay, delays = log_delays(stats, result.conn, now)
        shown = "/".join(format_tv(d) for d in delays)
        self._emit(queue_id, event,
                   f"to=<{to}>{orig}, relay={result.relay}{reuse}, delay={format_tv(delay)}, delays={shown}, "
                   f"dsn={result.dsn}, status={status} ({result.text})", service=program,
                   logged=logged, to=to, orig_to=original, relay=result.relay, conn_use=use, delay=round(delay, 3),
                   delays=[round(d, 3) for d in delays], dsn=result.dsn, status=status, reason=result.text,
                   transport=result.transport)

    def verified(self, probe_id: str, to: str, *, relay: str, dsn: str, status: str, text: str, agent: str) -> None:
        """An address verification probe's result (Postfix's verify_append: the answering agent's log_adhoc line
        with the probe's action as status: deliverable, undeliverable, undeliverable-but-not-cached), under the
        probe's own id (`VRFY000001`), as no message is queued for it."""
        if self.active:
            self._emit(probe_id, "verified", f"to=<{to}>, relay={relay}, dsn={dsn}, status={status} ({text})",
                       service=agent, to=to, relay=relay, dsn=dsn, status=status, reason=text)

    def expired(self, queue_id: str, sender: str) -> None:
        """A message past its queue lifetime: its pending recipients are returned to the sender (Postfix qmgr)."""
        if self.active:
            self._emit(queue_id, "expired", f"from=<{sender}>, status=expired, returned to sender", service="qmgr",
                       sender=sender, status="expired")

    def notice(self, queue_id: str, kind: str, notice_id: str, *, postmaster: bool = False) -> None:
        """A notice queued: to the sender, or (a double bounce) the postmaster copy."""
        if not self.active:
            return
        what = {"failure": "non-delivery", "delay": "delay", "success": "delivery status"}.get(kind, kind)
        to = "postmaster" if postmaster else "sender"
        self._emit(queue_id, "notice", f"{to} {what} notification: {notice_id}", service="bounce", kind=kind,
                   notice_id=notice_id)

    def notice_discarded(self, queue_id: str) -> None:
        """A double bounce that bounced: dropped, never a triple bounce."""
        self._emit(queue_id, "notice-discarded", "undeliverable postmaster notification discarded",
                   service="bounce", level=logging.WARNING)

    def removed(self, queue_id: str) -> None:
        if self.active:
            self._emit(queue_id, "removed", "removed", service="qmgr")

    def gone(self, queue_id: str, *, deferred: bool) -> None:
        """The end of an attempt found no message to remove or defer (`deferred`): an operator deleted it first
        (postsuper's `removed` was logged then). Postfix's qmgr warns in its own words, the queue id inside them:
        `qmgr_active_done: remove QID from active: No such file or directory`, `qmgr_active_defer: rename QID from
        active to deferred: No such file or directory`. A warning: written at level warning too."""
        if self._observer is None and not self._log.isEnabledFor(logging.WARNING):
            return
        line = (f"qmgr_active_defer: rename {queue_id} from active to deferred" if deferred
                else f"qmgr_active_done: remove {queue_id} from active")
        self._emit(queue_id, "gone", f"{line}: No such file or directory", service="qmgr", level=logging.WARNING,
                   id_first=False)

    def operator(self, queue_id: str, action: str) -> None:
        """postsuper's line for one message an operator's `action` (a key of POSTSUPER) took."""
        if self.active:
            self._emit(queue_id, _POSTSUPER_EVENT[action], POSTSUPER[action][0], service="postsuper", action=action)

    def operator_total(self, action: str, count: int) -> None:
        """postsuper's summary of one command, `Deleted: 2 messages` (a line without a queue id, as postsuper's)."""
        if self.active:
            name = POSTSUPER[action][1]
            self._log.info("%s: %d message%s", name, count, "" if count == 1 else "s",
                           extra={"event": "postsuper", "fields": {"action": action, "messages": count},
                                  "service": "postsuper"})

    def signed(self, queue_id: str, field: str, domain: str, selector: str) -> None:
        """A DKIM-Signature or ARC set added (OpenDKIM's `DKIM-Signature field added (s=…, d=…)`)."""
        self._emit(queue_id, "signed", f"{field} field added (s={selector}, d={domain})", service="cleanup",
                   field=field, domain=domain, selector=selector)

    def sender_rewritten(self, queue_id: str, sender: str, rewritten: str) -> None:
        """SRS: a forwarded message's sender became an address of this host."""
        self._emit(queue_id, "srs", f"forwarded: sender <{sender}> rewritten to <{rewritten}>", service="cleanup",
                   sender=sender, rewritten=rewritten)

    def not_signed(self, queue_id: str, what: str, reason: str) -> None:
        """A signature or seal this host would have added, left off (the message goes on without it)."""
        self._emit(queue_id, "not_signed", f"no {what} added: {reason}", service="cleanup", what=what,
                   reason=reason)

    def corrupt(self, queue_id: str, reason: str) -> None:
        """qmgr set a message aside in the corrupt queue: a warning, as Postfix's `saving corrupt file`."""
        if self.active:
            self._emit(queue_id, "corrupt", f"moved to the corrupt queue: {reason}", service="qmgr", reason=reason,
                       level=logging.WARNING)


SOFT_BOUNCE_STATUS = "SOFTBOUNCE"  # a bounce soft_bounce kept deferred: its line's status (its event: deferred)


def log_delays(stats: MsgStats, conn: ConnStats | None, now: float) -> tuple[float, tuple[float, float, float, float]]:
    """`delay` and `delays` (a, b, c, d) as Postfix's log_adhoc computes them: from arrival to the end (the
    agent's `done`, else `now`); a: before the active queue (arrival to this attempt's entry into it), b: in it
    (to the hand-off to a delivery agent; to the end when there was none), c: connection set-up (to the session
    ready for MAIL FROM; 0 without ConnStats, a non-network agent's: the SMTP and LMTP clients date a set-up that
    failed at the failure, smtp_bulk_fail's), d: transmission (from the set-up, else the hand-off, to the end).
    A difference below zero (a clock stepped back) counts as zero."""
    end = stats.done or now
    delay = max(0.0, end - stats.arrival)
    active, handoff = stats.active, stats.handoff
    if not active:
        return delay, (delay, 0.0, 0.0, 0.0)
    before = max(0.0, active - stats.arrival)
    if not handoff:
        return delay, (before, max(0.0, end - active), 0.0, 0.0)
    setup = conn.setup_done if conn is not None else 0.0
    connected = max(0.0, setup - handoff) if setup else 0.0
    return delay, (before, max(0.0, handoff - active), connected, max(0.0, end - (setup or handoff)))


def format_tv(seconds: float) -> str:
    """A time as Postfix's format_tv writes `delay=` and `delays=` (two significant digits, a resolution of 10 ms:
    delay_logging_resolution_limit = 2): `0`, `0.01`, `0.12`, `1.2`, `12`, `123`; trailing zeros dropped. Below
    zero counts as zero. (Its arithmetic on whole microseconds: below 1 s hundredths, below 10 s tenths, then
    seconds, each rounded half up at that resolution, the resolution chosen before the rounding.)"""
    usec = round(seconds * 1_000_000)
    if usec < 995_000:  # 0 s, rounded to hundredths (from 0.995 s that is 1)
        if usec < 5_000:
            return "0"
        return f"0.{(usec + 5_000) // 10_000:02d}".rstrip("0")
    if usec < 10_000_000:  # whole seconds 0 to 9, rounded to tenths (9.95 s is 10)
        tenths = (usec + 50_000) // 100_000
        return str(tenths // 10) if tenths % 10 == 0 else f"{tenths // 10}.{tenths % 10}"
    return str((usec + 500_000) // 1_000_000)


class SmtpdLog:
    """smtpd's session events (see the module doc). `client` is always `host[ip]` (see `client_name`)."""

    def __init__(self, logger: logging.Logger | None = None, service: str = "smtpd"):
        """`service`: the program the lines are written as (cleanup for its end-of-message milter lines)."""
        self._log = logger or _SMTPD_LOGGER
        self._service = service

    @property
    def active(self) -> bool:
        """Whether session events (level info) are written: callers skip work done only for a line."""
        return self._log.isEnabledFor(logging.INFO)

    def _emit(self, level: int, event: str, line: str, **fields) -> None:
        fields = {k: printable(v) if isinstance(v, str) else v for k, v in fields.items()}
        self._log.log(level, "%s", printable(line), extra={"event": event, "fields": fields, "service": self._service})

    def connect(self, client: str) -> None:
        if not self.active:
            return
        self._emit(logging.INFO, "connect", f"connect from {client}", client=client)

    def disconnect(self, client: str, counts: dict[str, list[int]]) -> None:
        """`counts`: command name -> [succeeded, total] (Postfix 3.x `ehlo=1 rcpt=0/1 commands=1/2`)."""
        if not self.active:
            return
        self._emit(logging.INFO, "disconnect", f"disconnect from {client}{command_stats(counts)}", client=client,
                   commands={k: v[:] for k, v in counts.items()})

    def reject(self, stage: str, client: str, reply: str, *, sender: str | None, recipient: str = "",
               protocol: str = "ESMTP", helo: str = "", action: str = "reject", queue_id: str = "") -> None:
        """A refusal at MAIL, RCPT, DATA or END-OF-MESSAGE (`action` "reject"; "reject_warning": one warn_if_reject
        made only a warning), an access action where it was met
        (`action` "hold", "discard", "redirect", "bcc", "filter", `reply` its text: `<s@d>: Sender address
        triggers HOLD action`), a message a filter held or discarded (with its queue id), or an access WARN or
        INFO (`action` "warn" / "info", `reply` its text): Postfix's log_whatsup, named by `queue_id`, the
        transaction's, NOQUEUE before it has one."""
        if not self.active:
            return
        queue_id = queue_id or "NOQUEUE"
        envelope = "" if sender is None else f"from=<{sender}> "
        envelope += f"to=<{recipient}> " if recipient else ""
        helo_part = f" helo=<{helo}>" if helo else ""
        self._emit(logging.INFO, action,
                   f"{queue_id}: {action}: {stage} from {client}: {reply}; {envelope}proto={protocol}{helo_part}",
                   queue_id=queue_id, stage=stage, client=client, reply=reply, sender=sender or "",
                   recipient=recipient, protocol=protocol, helo=helo)

    def tls_established(self, client: str, version: str, cipher: str, bits: int, trust: str = "Anonymous") -> None:
        """tls_misc.c's summary: `trust` Anonymous (no client certificate), Trusted or Untrusted (one, verified or
        not)."""
        if not self.active:
            return
        self._emit(logging.INFO, "tls", f"{trust} TLS connection established from {client}: {version} with "
                   f"cipher {cipher} ({bits}/{bits} bits)", client=client, version=version, cipher=cipher,
                   trust=trust.lower())

    def tls_accept_failed(self, client: str, reason: str, problem: str = "") -> None:
        """A server TLS handshake that failed (tls_server.c): `SSL_accept error from host[ip]: reason` ("Connection
        timed out", "lost connection", "-1" for a TLS protocol error, whose `problem` follows as
        `warning: TLS library problem: …`)."""
        self._emit(logging.INFO, "tls-failed", f"SSL_accept error from {client}: {reason}", client=client,
                   reason=reason)
        if problem:
            self._emit(logging.WARNING, "tls-problem", f"TLS library problem: {problem}", client=client,
                       reason=problem)

    def auth_failed(self, client: str, mechanism: str, reason: str, username: str | None = None) -> None:
        """`username` None: the client gave no name (Postfix: `(unavailable)`); an empty name is logged empty."""
        self._emit(logging.WARNING, "auth-failed",
                   f"{client}: SASL {mechanism} authentication failed: {reason}, "
                   f"sasl_username={'(unavailable)' if username is None else username}",
                   client=client, mechanism=mechanism, reason=reason, sasl_username=username)

    def auth_aborted(self, client: str, mechanism: str) -> None:
        self._emit(logging.WARNING, "auth-aborted", f"{client}: SASL {mechanism} authentication aborted",
                   client=client, mechanism=mechanism)

    def too_many_errors(self, after: str, client: str) -> None:
        if not self.active:
            return
        self._emit(logging.INFO, "too-many-errors", f"too many errors after {after} from {client}",
                   after=after, client=client)

    def improper_pipelining(self, after: str, client: str, pending: bytes) -> None:
        if not self.active:
            return
        text = escaped(pending[:100])  # (as Postfix quotes it: `MAIL FROM:<a@b>\\r\\n`)
        self._emit(logging.INFO, "pipelining", f"improper command pipelining after {after} from {client}: {text}",
                   after=after, client=client, pending=text)

    def non_smtp_command(self, client: str, line: bytes) -> None:
        text = escaped(line)[:100]  # (Postfix's smtpd: escape(3), then `%.100s`)
        self._emit(logging.WARNING, "non-smtp", f"non-SMTP command from {client}: {text}", client=client, text=text)

    def illegal_address(self, client: str, command: str, text: str) -> None:
        self._emit(logging.WARNING, "illegal-address", f"Illegal address syntax from {client} in {command} "
                   f"command: {text[:200]}", client=client, command=command, text=text[:200])

    def command_replaced(self, client: str, old: str, new: str) -> None:
        """smtpd_command_filter's rewrite: `host[ip]: replacing command "old" with "new"` (each cut to 100)."""
        self._emit(logging.INFO, "command-replaced", f'{client}: replacing command "{old[:100]}" with "{new[:100]}"',
                   client=client, old=old[:100], new=new[:100])

    def command_filter_failed(self, queue_id: str, table: str, line: str, stage: str, client: str,
                              reply: str) -> None:
        """smtpd_command_filter could not answer: Postfix's `warning: TYPE:NAME lookup error for "line"` and its
        SMTP_ERR_DATA line, `NOQUEUE: reject: STAGE from host[ip]: 421 4.3.0 HOST Server local data error`."""
        self._emit(logging.WARNING, "command-filter-error", f'{table} lookup error for "{line[:100]}"', table=table)
        queue_id = queue_id or "NOQUEUE"
        self._emit(logging.INFO, "reject", f"{queue_id}: reject: {stage} from {client}: {reply}", queue_id=queue_id,
                   stage=stage, client=client, reply=reply)

    def local_data_error(self, queue_id: str, stage: str, client: str, reply: str, feature: str = "") -> None:
        """A table smtpd needs at EHLO could not answer: Postfix's `warning: don't know what EHLO features to
        announce to host[ip]` (the keywords to discard), or with `feature` its `don't know if EHLO feature AUTH
        should be announced to host[ip]` (sasl_exceptions_networks), then its SMTP_ERR_DATA line, `NOQUEUE:
        reject: EHLO from host[ip]: 421 4.3.0 HOST Server local data error` (no envelope after it)."""
        warning = (f"don't know if EHLO feature {feature} should be announced to {client}" if feature
                   else f"don't know what EHLO features to announce to {client}")
        self._emit(logging.WARNING, "ehlo-features", warning, client=client)
        queue_id = queue_id or "NOQUEUE"
        self._emit(logging.INFO, "reject", f"{queue_id}: reject: {stage} from {client}: {reply}", queue_id=queue_id,
                   stage=stage, client=client, reply=reply)

    def discarding_ehlo_keywords(self, text: str) -> None:
        """Postfix's `discarding EHLO keywords: PIPELINING DSN` at an EHLO (ehlo_keywords.discard_log_text)."""
        self._emit(logging.INFO, "discard-ehlo-keywords", text, text=text)

    def malformed_bdat(self, queue_id: str, client: str, line: str) -> None:
        """`QID: malformed BDAT command syntax from host[ip]: line` (the command line as sent), NOQUEUE without
        a queue id: Postfix's bdat_cmd, as for the BDAT warnings below."""
        queue_id = queue_id or "NOQUEUE"
        self._emit(logging.WARNING, "bdat", f"{queue_id}: malformed BDAT command syntax from {client}: "
                   f"{printable(line)[:100]}", queue_id=queue_id, client=client, text=line[:100])

    def null_bdat(self, queue_id: str, client: str) -> None:
        queue_id = queue_id or "NOQUEUE"
        self._emit(logging.WARNING, "bdat", f"{queue_id}: null BDAT request from {client}", queue_id=queue_id,
                   client=client)

    def queue_file_too_big(self, queue_id: str) -> None:
        """Content past message_size_limit: Postfix's smtpd's `warning: QID: queue file size limit exceeded`
        (NOQUEUE without a queue id: sendmail -bs, whose message has no name until it is stored)."""
        queue_id = queue_id or "NOQUEUE"
        self._emit(logging.WARNING, "too-big", f"{queue_id}: queue file size limit exceeded", queue_id=queue_id)

    def bdat_too_big(self, queue_id: str, client: str) -> None:
        queue_id = queue_id or "NOQUEUE"
        self._emit(logging.WARNING, "bdat", f"{queue_id}: BDAT request from {client} exceeds message size limit",
                   queue_id=queue_id, client=client)

    def timeout(self, after: str, client: str) -> None:
        if not self.active:
            return
        self._emit(logging.INFO, "timeout", f"timeout after {after} from {client}", after=after, client=client)

    def lost_connection(self, after: str, client: str) -> None:
        if not self.active:
            return
        self._emit(logging.INFO, "lost-connection", f"lost connection after {after} from {client}",
                   after=after, client=client)

    def tls_refused(self, request: str, client: str, service: str) -> None:
        """A handshake refused to a client past its new TLS session rate: `request` is "STARTTLS request" or "TLS
        service request" (implicit TLS), Postfix's words."""
        self._emit(logging.WARNING, "limit", f"Refusing {request} from {client} for service {service}",
                   client=client, service_name=service)

    def limit_exceeded(self, what: str, count: int, client: str, service: str) -> None:
        """anvil: `what` is "Connection rate", "Connection concurrency" or an event's (anvil.EVENT_LIMITS: "Message
        delivery request rate"...), Postfix's words."""
        self._emit(logging.WARNING, "limit", f"{what} limit exceeded: {count} from {client} for service "
                   f"{service}", what=what, count=count, client=client, service_name=service)


def command_stats(counts: dict[str, list[int]]) -> str:
    """` ehlo=1 mail=1 rcpt=0/1 quit=1 commands=3/4`: per command succeeded[/total], then all together."""
    parts, ok_all, total_all = [], 0, 0
    for name in COMMAND_ORDER:
        ok, total = counts.get(name, (0, 0))
        if total:
            parts.append(f" {name}={ok}" + (f"/{total}" if ok != total else ""))
            ok_all += ok
            total_all += total
    parts.append(f" commands={ok_all}" + (f"/{total_all}" if ok_all != total_all or not total_all else ""))
    return "".join(parts)


# ------------------------------------------------------------------------------------------------ formats


def service_of(record: logging.LogRecord) -> str:
    """The Postfix-style service a record is attributed to: its `service`, else from the logger name."""
    service = getattr(record, "service", None)
    if service:
        return service
    parts = record.name.split(".")
    if parts[0] != "mailflow":
        return "master"
    if len(parts) == 1:
        return "master"
    return _SERVICE_ALIASES.get(parts[1], parts[1])


class SyslogFormatter(logging.Formatter):
    """`2026-12-03T10:05:01.123456+00:00 mx.example postfix-mailflow/smtpd[1234]: warning: text`."""

    def __init__(self, hostname: str, syslog_name: str, pid: int | None = None):
        super().__init__()
        self._hostname = hostname
        self._syslog_name = syslog_name
        self._pid = pid if pid is not None else os.getpid()

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="microseconds")
        prefix = f"{stamp} {self._hostname} {self._syslog_name}/{service_of(record)}[{self._pid}]: "
        return _printable_lines(prefix + _LEVEL_PREFIX.get(record.levelno, ""), record, self)


def _printable_lines(head: str, record: logging.LogRecord, formatter: logging.Formatter) -> str:
    """A record's message and its traceback's lines (`exception_lines`), each after `head` and printable."""
    lines = [head + log_text(record.getMessage())]
    if record.exc_info:
        lines += [head + log_text(line) for line in exception_lines(record.exc_info, formatter)]
    return "\n".join(lines)


def exception_lines(exc_info, formatter: logging.Formatter) -> list[str]:
    """A traceback as a log shows it: its last TRACEBACK_LINES lines (a line before them says how many were left
    out), then the exception (`Type: message`) on one line, whatever line ends its message holds."""
    text = formatter.formatException(exc_info).rstrip("\n")  # (its message's own line ends too)
    error = exc_info[1]
    last = "".join(traceback.format_exception_only(type(error), error)).rstrip("\n") if error is not None else ""
    if last and text.endswith(last):
        text = text[:-len(last)]
    lines = text.splitlines()
    if len(lines) > TRACEBACK_LINES:
        lines = [f"({len(lines) - TRACEBACK_LINES} lines of the traceback left out)"] + lines[-TRACEBACK_LINES:]
    return lines + ([last.replace("\n", " ")] if last else [])


class JsonFormatter(logging.Formatter):
    """One JSON object per record, its line at most JSON_RECORD_LIMIT bytes (`_json_line`)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "service": service_of(record),
        }
        if hasattr(record, "queue_id"):
            out["queue_id"] = record.queue_id
        if hasattr(record, "event"):
            fields = getattr(record, "fields", {})
            out.update(event=record.event, **{k: cut_for_log(v) if isinstance(v, str) else v
                                              for k, v in fields.items()})
        else:
            out["message"] = log_text(record.getMessage())
        if record.exc_info:
            out["exception"] = "\n".join(log_text(line) for line in exception_lines(record.exc_info, self))
        return _json_line(out)


def _json_line(record: dict) -> str:
    """`record` as one JSON line of at most JSON_RECORD_LIMIT bytes: when it is longer, its string values share
    what the rest leaves, each cut to its share (a short one keeps its whole text, the long ones split the rest;
    shares count the text as JSON writes it, quotes and backslashes doubled): a text keeps its start, a traceback
    (`exception`) its last lines (`_json_cut_lines`). Keys and values other than strings are kept whole: when
    they alone take more than the limit, the line is longer (the strings cut to nothing)."""
    line = json.dumps(record, ensure_ascii=False)
    if len(line) * 4 <= JSON_RECORD_LIMIT or len(line.encode()) <= JSON_RECORD_LIMIT:
        return line
    texts = {key: value for key, value in record.items() if isinstance(value, str)}
    rest = _json_size({key: "" if key in texts else value for key, value in record.items()})
    left = JSON_RECORD_LIMIT - rest
    out = dict(record)
    for n, key in enumerate(sorted(texts, key=lambda k: _json_size(texts[k]))):
        cut = _json_cut_lines if key == "exception" else _json_cut
        out[key] = cut(texts[key], max(0, left) // (len(texts) - n))
        left -= _json_size(out[key]) - 2
    return json.dumps(out, ensure_ascii=False)


def _json_size(value: object) -> int:
    """Bytes of `value` written as JSON (a string's quotes too)."""
    return len(json.dumps(value, ensure_ascii=False).encode())


def _json_cut(text: str, budget: int) -> str:
    """The longest start of `text` that JSON writes in `budget` bytes, its quotes left out."""
    if _json_size(text) - 2 <= budget:
        return text
    low, high = 0, min(len(text), budget)  # (a character is at least one byte written)
    while low < high:
        mid = (low + high + 1) // 2
        if _json_size(text[:mid]) - 2 <= budget:
            low = mid
        else:
            high = mid - 1
    return text[:low]


def _json_cut_lines(text: str, budget: int) -> str:
    """`text` written by JSON in `budget` bytes, its quotes left out, its first lines dropped (a line saying how
    many in their place): a traceback keeps its innermost frames and the exception, its last line. A last line
    longer than the budget alone keeps its start."""
    if _json_size(text) - 2 <= budget:
        return text
    lines = text.split("\n")
    kept, size = 0, 0  # the last `kept` lines, each with the line end before it, take `size` bytes
    for line in reversed(lines[1:]):  # (at least the first line goes)
        grown = size + _json_size(line)  # (its quotes' two bytes: the line end before it, written "\n")
        if len(_left_out(len(lines) - kept - 1)) + grown > budget:
            break
        kept, size = kept + 1, grown
    head = _left_out(len(lines) - max(kept, 1))
    if kept:
        return "\n".join([head, *lines[-kept:]])
    if budget < len(head) + 2:  # (no room for the line saying so)
        return _json_cut(lines[-1], budget)
    return f"{head}\n{_json_cut(lines[-1], budget - len(head) - 2)}"


def _left_out(lines: int) -> str:
    return f"({lines} line{'' if lines == 1 else 's'} left out)"


WRITE_FAILURE_REPORT_INTERVAL = 60.0  # seconds between the lines that say the log file still cannot be written


class LogFileHandler(logging.handlers.WatchedFileHandler):
    """`[log] file`: a write that fails with an OSError is reported on stderr in one line (see the module doc),
    not with logging's traceback per record; other errors (a bug of a formatter) keep logging's report."""

    def __init__(self, path: str, clock=time.monotonic):
        super().__init__(path, encoding="utf-8")
        self._clock = clock
        self._lost = 0  # records not written since writes last worked
        self._reported_at = 0.0
        self._erred = False

    def emit(self, record: logging.LogRecord) -> None:
        """WatchedFileHandler's emit, with the reopening (logrotate moved the file) inside the error handling: an
        OSError there (no descriptor left, the old file's buffer not flushed on a full disk) reached the caller."""
        self._erred = False
        try:
            self.reopenIfNeeded()
            if self.stream is None:  # (a reopening that failed left none)
                self.stream = self._open()
                self._statstream()
        except OSError:
            self.handleError(record)
            return
        logging.StreamHandler.emit(self, record)
        if not self._erred and self._lost:
            self._report(f"the log file {self.baseFilename} is written again after {self._lost} failed writes")
            self._lost = 0

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
            return
        self._erred = True
        self._lost += 1
        now = self._clock()
        if self._lost == 1 or now - self._reported_at >= WRITE_FAILURE_REPORT_INTERVAL:
            self._reported_at = now
            self._report(f"cannot write the log file {self.baseFilename}: {error.strerror or error}"
                         f" ({self._lost} failed writes)")

    @staticmethod
    def _report(text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(f"mailflow: warning: {text}\n")
            sys.stderr.flush()


def _handler(log_config: Union[LogConfig, LogSettings], hostname: str) -> logging.Handler:
    """Where a `LogConfig` writes (its file, else stderr), in its format. Raises OSError (the file)."""
    path = log_config.file
    handler: logging.Handler
    handler = LogFileHandler(path) if path else logging.StreamHandler(sys.stderr)
    if log_config.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(SyslogFormatter(hostname, log_config.syslog_name))
    return handler


def setup_logging(log_config: LogConfig, hostname: str) -> None:
    """Root logging from a `LogConfig` (level, format, syslog_name, file); stderr when no file is named."""
    handler = _handler(log_config, hostname)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(log_config.level.upper())
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's own per-command chatter


@contextlib.contextmanager
def tool_logger(log_config: Union[LogConfig, LogSettings], hostname: str) -> Iterator[logging.Logger]:
    """The logger of a command beside the server (see the module doc): its lines go to `[log] file` in the
    server's format; with no file it writes nothing. Raises OSError when the file cannot be opened."""
    logger = logging.Logger(MAIL_LOGGER)  # this command's own, outside logging's registry: no global state
    handler = _handler(log_config, hostname) if log_config.file else None
    if handler is None:
        logger.disabled = True
    else:
        logger.addHandler(handler)
        logger.setLevel(log_config.level.upper())
    try:
        yield logger
    finally:
        if handler is not None:
            handler.close()


class ToolFormatter(logging.Formatter):
    """`PREFIX: warning: text`, as Postfix's commands write to stderr (msg_vstream), every line printable and cut
    as the log's are (`_printable_lines`): there mailflow differs, msg_vstream writes a line whole."""

    def __init__(self, prefix: str):
        super().__init__()
        self._prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        return _printable_lines(f"{self._prefix}: {_LEVEL_PREFIX.get(record.levelno, '')}", record, self)


@contextlib.contextmanager
def tool_warnings(prefix: str) -> Iterator[None]:
    """While it is open, the warnings (and errors) a command's code logs, such as a lookup that failed, go to
    stderr as `ToolFormatter` writes them (they went through Python's last-resort handler, raw: an address's
    escape sequence reached the terminal)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(ToolFormatter(prefix))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


@contextlib.contextmanager
def tool_mail_log(log_config: LogConfig, hostname: str) -> Iterator[MailLog]:
    """The MailLog of a command beside the server (`tool_logger`'s lines). Raises OSError as it does."""
    with tool_logger(log_config, hostname) as logger:
        yield MailLog(logger)
