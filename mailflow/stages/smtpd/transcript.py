"""Session transcripts: what an SMTP session said, for a consumer that asks (the capture server, metrics).

Off unless a consumer asks: `Smtpd(..., observer=...)` gives each session a `Transcript`; without an observer
a session keeps none and pays one `is None` test per command and reply.

    SessionObserver            what a consumer implements (the methods here do nothing):
        active                           whether it wants sessions now (False: a session keeps no transcript)
        started(transcript)              a connection was accepted (before the greeting)
        commanded(transcript, text)      one command line is read (AUTH's credentials left out)
        replied(transcript, line)        one reply line is sent (told just before the write)
        refused(transcript, error_class) the reply just told is a refusal smtpd files under `error_class`
                                         (status.Reply.error_class: policy, protocol, bounce, ...)
        queued(transcript, queue_id)     a message of the session was committed; the transcript holds its 250
        checkpoint(transcript, everything)  where Postfix's smtpd flushes its history (HELO, EHLO, RSET, the end of
                                         a message; XCLIENT, `everything`: whatever its length)
        ended(transcript)                the session is over, however it ended
        line_limit, byte_limit           how much one transcript keeps (0 lines: none, and no work for it)
    SessionObservers(*observers)  several as one (each told every event; the transcript keeps the most asked)
    Transcript                 one session's record: `client`, `helo`, `tls`, `login` (filled by the session as
                               it learns them), `reason` (why the session was aborted, as Postfix names it: "timeout",
                               "lost connection", "too many errors"; "" when it ended otherwise: set by the session
                               where it ends), `command(line)`, `reply(line, error_class)`,
                               `checkpoint(everything)`, `snapshot()` -> model.SessionTranscript, `hang_up()`
                               (the server ends the session, as at shutdown)

Bounded: a transcript keeps at most `line_limit` lines and `byte_limit` bytes of text (each line cut at
MAX_LINE characters); past that lines are counted, not kept. Never kept: AUTH's credentials (the command keeps
its mechanism only; the answers to its challenges are not commands) and message content.

Failure behaviour: an exception raised by an observer is logged and does not reach the session.
"""
from __future__ import annotations

import logging
from typing import Callable

from mailflow.config import DEFAULTS
from mailflow.model import SessionTranscript

log = logging.getLogger("mailflow.smtpd")

MAX_LINE = 1000  # characters of one line kept (an SMTP command line is at most 512 octets, RFC 5321 4.5.3.1.4)


class SessionObserver:
    """See the module docstring. Subclass and override what you need."""

    line_limit: int = DEFAULTS.sink.transcript_line_limit
    byte_limit: int = DEFAULTS.sink.transcript_byte_limit
    active: bool = True

    def started(self, transcript: "Transcript") -> None:
        pass

    def commanded(self, transcript: "Transcript", text: str) -> None:
        pass

    def replied(self, transcript: "Transcript", line: str) -> None:
        pass

    def refused(self, transcript: "Transcript", error_class: str) -> None:
        pass

    def queued(self, transcript: "Transcript", queue_id: str) -> None:
        pass

    def checkpoint(self, transcript: "Transcript", everything: bool) -> None:
        pass

    def ended(self, transcript: "Transcript") -> None:
        pass


class SessionObservers(SessionObserver):
    """Several observers as one (the capture server's and the metrics'): each is told every event, a failing one
    alone is logged; the transcript keeps the most lines and bytes any of them asks for."""

    def __init__(self, *observers: SessionObserver):
        self._observers = observers
        self.line_limit = max(o.line_limit for o in observers)
        self.byte_limit = max(o.byte_limit for o in observers)

    @property
    def active(self) -> bool:  # type: ignore[override]  # (asked at each session: an observer's may change)
        return any(o.active for o in self._observers)

    def started(self, transcript: "Transcript") -> None:
        for o in self._observers:
            Transcript._tell(o.started, transcript)

    def commanded(self, transcript: "Transcript", text: str) -> None:
        for o in self._observers:
            Transcript._tell(o.commanded, transcript, text)

    def replied(self, transcript: "Transcript", line: str) -> None:
        for o in self._observers:
            Transcript._tell(o.replied, transcript, line)

    def refused(self, transcript: "Transcript", error_class: str) -> None:
        for o in self._observers:
            Transcript._tell(o.refused, transcript, error_class)

    def queued(self, transcript: "Transcript", queue_id: str) -> None:
        for o in self._observers:
            Transcript._tell(o.queued, transcript, queue_id)

    def checkpoint(self, transcript: "Transcript", everything: bool) -> None:
        for o in self._observers:
            Transcript._tell(o.checkpoint, transcript, everything)

    def ended(self, transcript: "Transcript") -> None:
        for o in self._observers:
            Transcript._tell(o.ended, transcript)


class Transcript:
    """One session's record (see the module docstring)."""

    def __init__(self, observer: SessionObserver, client: str, hang_up: Callable[[], None],
                 identify: Callable[["Transcript"], None] | None = None):
        self.observer = observer
        self.client = client
        self.helo = ""
        self.tls = ""
        self.login = ""
        self.reason = ""
        self.lines: list[tuple[str, str]] = []
        self.omitted = 0
        self._bytes = 0
        self._hang_up = hang_up
        self._identify = identify

    def identify(self) -> None:
        """Bring client, helo, tls and login up to date (the session's, as known now: after PROXY, XCLIENT,
        STARTTLS, AUTH), for an observer about to use them mid-session; the session does it itself before
        `queued` and `ended`."""
        if self._identify is not None:
            self._identify(self)

    def command(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        first = text[:1]  # (a line whose first character cannot begin AUTH is kept as it is: most, without a call)
        text = text.strip() if first.isalpha() and first not in "Aa" else _redacted(text)
        observer = self.observer
        if observer.line_limit:
            self._keep("C", text)
        try:  # (_tell written out: two events a command, in every session)
            observer.commanded(self, text)
        except Exception:
            log.exception("session observer %s failed", "commanded")

    def reply(self, line: str | bytes, error_class: str | None = None) -> None:
        """One reply line sent; `error_class`: the class of the refusal it is (None: none, or no refusal)."""
        text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
        observer = self.observer
        if observer.line_limit:
            self._keep("S", text.rstrip("\r\n"))
        try:  # (as in command)
            observer.replied(self, text)
        except Exception:
            log.exception("session observer %s failed", "replied")
        if error_class is not None:
            self._tell(self.observer.refused, self, error_class)

    def snapshot(self) -> SessionTranscript:
        return SessionTranscript(self.client, self.helo, self.tls, self.login, tuple(self.lines), self.omitted)

    def hang_up(self) -> None:
        self._hang_up()

    def started(self) -> None:
        self._tell(self.observer.started, self)

    def queued(self, queue_id: str) -> None:
        self._tell(self.observer.queued, self, queue_id)

    def checkpoint(self, everything: bool = False) -> None:
        self._tell(self.observer.checkpoint, self, everything)

    def ended(self) -> None:
        self._hang_up = _nothing  # the session is over; the observer may keep this record without holding it
        self._identify = None
        self._tell(self.observer.ended, self)

    def _keep(self, who: str, text: str) -> None:
        text = text[:MAX_LINE]
        if len(self.lines) >= self.observer.line_limit or self._bytes + len(text) > self.observer.byte_limit:
            self.omitted += 1
            return
        self.lines.append((who, text))
        self._bytes += len(text)

    @staticmethod
    def _tell(method, *args) -> None:
        try:
            method(*args)
        except Exception:
            log.exception("session observer %s failed", getattr(method, "__qualname__", method))


def _nothing() -> None:
    """A hang-up once the session is over."""


def _redacted(line: str) -> str:
    """An AUTH command keeps its mechanism only: `AUTH PLAIN <credentials>` -> `AUTH PLAIN ****` (`command` keeps a
    line whose first character is a letter other than A as it is, whatever space str.split sees)."""
    words = line.split()
    if len(words) > 2 and words[0].upper() == "AUTH":
        return f"{words[0]} {words[1]} ****"
    return line.strip()


def tls_description(ssl: dict | None) -> str:
    """"TLSv1.3 TLS_AES_256_GCM_SHA384" from a session's `ssl` (cipher: name, version, bits), "" without TLS."""
    cipher = ssl.get("cipher") if isinstance(ssl, dict) else None
    if not cipher:
        return ""
    name, version = cipher[0], cipher[1] if len(cipher) > 1 else ""
    return f"{version} {name}".strip()
