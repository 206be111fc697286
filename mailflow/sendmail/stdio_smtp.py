"""`sendmail -bs`: an SMTP server on standard input/output for scripts (Postfix runs smtpd there).

    StdioSmtp(reader, writer, submitter, opts).run() -> 0

HELO, EHLO, MAIL, RCPT, DATA, RSET, NOOP, VRFY, QUIT; each message goes to the maildrop through the Submitter.
EHLO offers PIPELINING, SIZE (`[smtpd] message_size_limit`), 8BITMIME and ENHANCEDSTATUSCODES; a MAIL whose
SIZE= is past the limit is answered `552 5.3.4`, as Postfix's smtpd under -bs answers it (other MAIL and RCPT
parameters are ignored: 8-bit content is found by its bytes).
Pipelining works since input is read line by line. Every reply comes from mailflow.status (the greeting and the
EHLO lines are the only plain strings). DATA is streamed like standard input in deliver mode (a CR inside a
line becomes a space); too big is
`552 5.3.4`; input ending mid-message stores nothing. Past `[smtpd] recipient_limit` recipients RCPT is
answered `452 4.5.3 Error: too many recipients` (Postfix runs smtpd under -bs, with its limit).
"""
from __future__ import annotations

import itertools
import os
import re
from typing import BinaryIO, Iterator

from mailflow import address, status
from mailflow.maildrop import MaildropError
from mailflow.message import CRLF
from mailflow.sendmail.options import Options, UsageError
from mailflow.sendmail.reading import clean_address, clean_recipient, lone_cr_as_space, without_bcc
from mailflow.sendmail.submitter import Submitter
from mailflow.syntax import parse_octet_count


class StdioSmtp:
    """`sendmail -bs`: an SMTP server on standard input/output for scripts (Postfix runs smtpd there).
    HELO, EHLO, MAIL, RCPT, DATA, RSET, NOOP, VRFY, QUIT; each message goes to the maildrop. Pipelining works
    since input is read line by line. Returns 0 at QUIT, at the end of input, or when the client stops reading
    the replies (a broken pipe: quietly, no traceback)."""

    LINE_LIMIT = 65536

    def __init__(self, reader: BinaryIO, writer: BinaryIO, submitter: Submitter, opts: Options):
        self._in = reader
        self._out = writer
        self._sub = submitter
        self._opts = opts
        self._host = submitter.config.myhostname
        self._reset()

    def _reset(self) -> None:
        self._sender: str | None = None
        self._recipients: list[str] = []

    def _reply(self, reply: "status.Reply | str") -> None:
        """A reply from the catalogue; plain strings only for the greeting and the EHLO lines."""
        self._out.write(str(reply).encode("utf-8") + b"\r\n")
        self._out.flush()

    def run(self) -> int:
        try:
            return self._session()
        except BrokenPipeError:  # the client stopped reading: the session is over (what was stored stays stored)
            _discard_output(self._out)
            return 0

    def _session(self) -> int:
        self._reply(f"220 {self._host} ESMTP mailflow (sendmail -bs)")
        while True:
            line = self._in.readline(self.LINE_LIMIT)
            if not line:
                return 0
            verb, _, arg = line.rstrip(b"\r\n").decode("utf-8", "replace").strip().partition(" ")
            handler = getattr(self, f"_do_{verb.upper()}", None) if verb.isalpha() else None
            if handler is None:
                self._reply(status.NOT_RECOGNIZED)
            elif handler(arg.strip()) is False:
                return 0

    def _do_HELO(self, arg: str) -> None:
        self._reset()
        self._reply(f"250 {self._host}" if arg else status.syntax("HELO hostname"))

    def _do_EHLO(self, arg: str) -> None:
        if not arg:
            return self._reply(status.syntax("EHLO hostname"))
        self._reset()
        limit = self._sub.config.smtpd.message_size_limit
        for line in (f"250-{self._host}", "250-PIPELINING", f"250-SIZE {limit}" if limit else "250-SIZE",
                     "250-8BITMIME", "250 ENHANCEDSTATUSCODES"):
            self._reply(line)

    def _do_MAIL(self, arg: str) -> None:
        if self._sender is not None:
            return self._reply(status.NESTED_MAIL)
        address = _path(arg, "FROM")
        if address is None:
            return self._reply(status.syntax("MAIL FROM:<address>"))
        if self._declared_too_big(arg):
            return self._reply(status.SIZE_EXCEEDS_LIMIT)
        try:
            sender = clean_address(address, self._sub.config.origin) if address else ""
        except UsageError:
            return self._reply(status.bad_sender_syntax(address))
        if self._sub.sender_problem(sender):
            return self._reply(status.sender_login_mismatch(sender, self._sub.identity.login))
        self._sender = sender
        self._reply(status.SENDER_OK)

    def _declared_too_big(self, arg: str) -> bool:
        """MAIL's SIZE= is past message_size_limit (or past any size: parse_octet_count's None, as smtpd reads it)."""
        limit = self._sub.config.smtpd.message_size_limit
        for word in arg.split()[1:]:
            name, _, value = word.partition("=")
            if name.upper() == "SIZE" and limit:
                try:
                    size = parse_octet_count(value)
                except ValueError:
                    return False  # (a malformed SIZE: the parameters are not otherwise checked here)
                return size is None or size > limit
        return False

    def _do_RCPT(self, arg: str) -> None:
        if self._sender is None:
            return self._reply(status.NEED_MAIL)
        address = _path(arg, "TO")
        if not address:
            return self._reply(status.syntax("RCPT TO:<address>"))
        if len(self._recipients) >= self._sub.config.smtpd.recipient_limit:  # as Postfix's smtpd under -bs
            return self._reply(status.TOO_MANY_RECIPIENTS)
        try:
            self._recipients.append(clean_recipient(address, self._sub.config.origin))
        except UsageError:
            return self._reply(status.bad_address_syntax(address))
        self._reply(status.RCPT_OK)

    def _do_DATA(self, arg: str) -> None:
        if not self._recipients:
            return self._reply(status.no_recipients(self._sender is not None))
        assert self._sender is not None  # a recipient needs MAIL first
        self._reply(status.START_DATA)
        lines = self._data_lines()
        try:
            head, rest = self._sub.split(lines)
            name = self._sub.store(self._sender, self._recipients, itertools.chain((without_bcc(head),), rest),
                                   self._opts)
        except _EndOfInput:
            return  # end of input mid-message: nothing is stored
        except MaildropError as e:
            if not self._skip(lines):
                return
            self._reply(status.MESSAGE_TOO_BIG if e.code == os.EX_DATAERR else status.QUEUE_ERROR)
        else:
            self._reply(status.queued(name))
        self._reset()

    def _data_lines(self) -> Iterator[bytes]:
        """The DATA content, unstuffed, line by line, up to the "." line; _EndOfInput when input ends first."""
        while True:
            raw = self._in.readline(self.LINE_LIMIT)
            if not raw:
                raise _EndOfInput()
            line = lone_cr_as_space(raw.rstrip(b"\r\n"))
            if line == b".":
                return
            yield (line[1:] if line.startswith(b".") else line) + CRLF

    @staticmethod
    def _skip(lines: Iterator[bytes]) -> bool:
        """Read what is left of a refused message's DATA; False when the input ended first."""
        try:
            for _ in lines:
                pass
        except _EndOfInput:
            return False
        return True

    def _do_RSET(self, arg: str) -> None:
        self._reset()
        self._reply(status.OK)

    def _do_NOOP(self, arg: str) -> None:
        self._reply(status.OK)

    def _do_VRFY(self, arg: str) -> None:
        """As Postfix's smtpd in stand-alone mode: off with disable_vrfy_command (its setting applies there too),
        else the argument's syntax only, no restriction list."""
        written, _ = address.vrfy_argument(arg)
        if self._sub.config.smtpd.disable_vrfy_command:
            self._reply(status.VRFY_DISABLED)
        elif not written:
            self._reply(status.VRFY_SYNTAX)
        elif not address.vrfy_address(written):
            self._reply(status.RECIPIENT_SYNTAX)
        else:
            self._reply(status.vrfy_answer(written))

    def _do_QUIT(self, arg: str) -> bool:
        self._reply(status.BYE)
        return False


class _EndOfInput(Exception):
    """-bs: standard input ended in the middle of DATA."""


def _discard_output(out: BinaryIO) -> None:
    """After a broken pipe: what is still buffered for `out` goes nowhere, so that the interpreter's last flush
    does not fail with a traceback."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a file descriptor (a test's BytesIO): nothing to do
        pass


def _path(arg: str, keyword: str) -> str | None:
    """The address of `FROM:<a@b> PARAMS` / `TO:<a@b>`; None when malformed. Parameters are ignored."""
    m = re.fullmatch(rf"{keyword}:\s*<([^<>]*)>(\s+.*)?", arg, re.IGNORECASE)
    return m.group(1) if m else None
