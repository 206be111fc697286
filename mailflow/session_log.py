"""One smtpd session's log: its connect and disconnect lines, with Postfix's per-command counts (smtpd's, and
`sendmail -bs`'s, which Postfix runs as a stand-alone smtpd: a leaf, so that sendmail need not load smtpd).

What it owns
- `SessionLog(client, lines=None)`: `client()` names the client (host[ip]) as known at the time, asked only
  when a line is written; `lines` the `logs.SmtpdLog` to write through (None: smtpd's; sendmail -bs gives its
  own, on `logs.tool_logger`). `connect()` ("connect from host[ip]"); `command(verb)` counts a command
  (`None`: one Postfix counts as "unknown") and remembers it as where the session is (Postfix's "... after
  RCPT from ...", "after UNKNOWN" for an unknown one); `replied(code)` records the outcome of the command being
  answered (a final reply: 4xx and 5xx count as failed; 334 and 354 are not final, nor STARTTLS's 220: the
  handshake decides, `handshake_done()` when it succeeds; XCLIENT never succeeds, its 220 neither: Postfix's
  smtpd jumps back to the greeting before it counts the command, so its log says `xclient=0/1`);
  `content(verb, size)` while DATA or BDAT content is read
  (`size()`: its bytes so far) and `message_ended()` once its end was read, until the next command;
  `timed_out()`; `too_many_errors()` (the session ends at hard_error_limit: "too many errors after X", X the
  last command or END-OF-MESSAGE); `ended()` at the end of the session, however it ended: "lost connection after
  X" unless the client said QUIT or the server hung up, then "disconnect from host[ip] ehlo=1 mail=1 ...
  commands=N". X is as Postfix writes it: the last command, `DATA (N bytes)` / `BDAT (N bytes)` in message
  content (the bytes of content received), `END-OF-MESSAGE` after it (a connection lost there is not logged: the
  message was answered).
- `lines`: the `logs.SmtpdLog` through which the session writes its other events (reject, TLS, pipelining...).
- `server_hung_up`: set when the server ended the session (a refusal, a timeout, a shutdown): no "lost
  connection" line then.

Failure behaviour: bookkeeping and log lines only; nothing raises.
"""
from __future__ import annotations

from typing import Callable

from mailflow.logs import COMMAND_ORDER, SmtpdLog

END_OF_MESSAGE = "END-OF-MESSAGE"  # Postfix's "where" once the content's end was read
NOT_FINAL = (334, 354)  # replies that continue the command they answer
_COUNTED = {name.upper(): name for name in COMMAND_ORDER if name != "unknown"}  # verb -> its name in the log


class SessionLog:
    def __init__(self, client: Callable[[], str], lines: SmtpdLog | None = None):
        self._client = client
        self.lines = lines or SmtpdLog()
        self.connected = False  # "connect from" was logged: "disconnect from" will be
        self.server_hung_up = False
        self.where = "CONNECT"  # the last command received
        self.counts: dict[str, list[int]] = {}  # Postfix's per-command [succeeded, total]
        self._pending: str | None = None  # counted; its final reply not sent yet
        self._content: tuple[str, Callable[[], int]] | None = None  # in DATA/BDAT content: the verb, its bytes
        self._message_ended = False

    def connect(self) -> None:
        self.connected = True
        if self.lines.active:
            self.lines.connect(self._client())

    def command(self, verb: str | None, *, moves_where: bool = True) -> None:
        """One more command; `verb` (upper case) None or one Postfix does not count by name: "unknown".
        `moves_where` False: counted, but not where the session is (a command refused for want of STARTTLS:
        Postfix's "lost connection after" names the last one that got past that check)."""
        name = _COUNTED.get(verb, "unknown") if verb is not None else "unknown"
        self.counts.setdefault(name, [0, 0])[1] += 1
        self._pending = name
        if moves_where:
            self._content, self._message_ended = None, False
            self.where = verb if verb is not None and name != "unknown" else "UNKNOWN"  # (Postfix's words)

    def failed_command(self) -> None:
        """One more unknown command that fails whatever it is answered: a non-SMTP command (its 221 is Postfix's
        farewell, not the command's success: `unknown=0/1`)."""
        self.command(None)
        self._pending = None

    def content(self, verb: str, size: Callable[[], int]) -> None:
        """DATA or BDAT content is being read; `size()`: its bytes so far (BDAT: every chunk's)."""
        self._content = (verb, size)

    def message_ended(self) -> None:
        """The end of the message content was read."""
        self._content, self._message_ended = None, True

    def _after(self) -> str:
        """Where the session is, in Postfix's words for its "timeout after" and "lost connection after" lines."""
        if self._message_ended:
            return END_OF_MESSAGE
        if self._content is not None:
            verb, size = self._content
            return f"{verb} ({size()} bytes)"
        return self.where

    def replied(self, code: int) -> None:
        """A reply line was sent; `code` 0 for a continuation line. STARTTLS's 220 is not its outcome: the
        handshake's is (`handshake_done`)."""
        if code and code not in NOT_FINAL and self._pending is not None:
            if self._pending == "starttls" and code == 220:
                return
            self.counts[self._pending][0] += code < 400 and self._pending != "xclient"
            self._pending = None

    def handshake_done(self) -> None:
        """The TLS handshake after STARTTLS succeeded: the command did (one that fails leaves it failed, as
        Postfix counts `starttls=0/1`)."""
        if self._pending == "starttls":
            self.counts["starttls"][0] += 1
            self._pending = None

    def too_many_errors(self) -> None:
        """The session ends at hard_error_limit (before the next command is read): `too many errors after X`,
        X the last command, `END-OF-MESSAGE` once a message's end was read (Postfix's state->where then)."""
        if self.lines.active:
            self.lines.too_many_errors(END_OF_MESSAGE if self._message_ended else self.where, self._client())
        self.server_hung_up = True

    def timed_out(self) -> None:
        if self.connected and not self.server_hung_up and self.lines.active:
            self.lines.timeout(self._after(), self._client())
        self.server_hung_up = True

    @property
    def client_left(self) -> bool:
        """The client went away without QUIT while the server still talked (Postfix's SMTP_ERR_EOF: its
        "lost connection" reason); False once the server ended the session (a refusal, a timeout, a stop)."""
        return not self.server_hung_up and "quit" not in self.counts

    def ended(self) -> None:
        logged = self.connected and self.lines.active
        client = self._client() if logged else ""  # (named only for a line: the name costs a few calls)
        if logged:
            if not self.server_hung_up and "quit" not in self.counts and not self._message_ended:
                self.lines.lost_connection(self._after(), client)
            self.lines.disconnect(client, self.counts)
        self._client = lambda: client  # the session is over: the session itself is no longer held
        self._content = None
