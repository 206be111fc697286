"""`sendmail -bs`: an SMTP server on standard input/output for scripts (Postfix runs smtpd there).

    StdioSmtp(reader, writer, submitter, opts, logger=None).run() -> 0

HELO, EHLO, MAIL, RCPT, DATA, RSET, NOOP, VRFY, QUIT; each message goes to the maildrop through the Submitter.
EHLO offers what Postfix's smtpd offers under -bs but ETRN and CHUNKING: PIPELINING, SIZE (`[smtpd]
message_size_limit`), VRFY (unless `[smtpd] disable_vrfy_command`), ENHANCEDSTATUSCODES, 8BITMIME, DSN, SMTPUTF8.
MAIL and RCPT take their paths as smtpd does (`address.parse_path`: without angle brackets too, a source route
dropped) and their parameters with smtpd's own code (mailflow.smtp_parameters: in the order given, the first bad
one answering, in Postfix's words): MAIL's SIZE (a malformed one `501 5.5.4`, one past the limit `552 5.3.4`),
BODY=7BIT|8BITMIME (the message's body type, as -B), SMTPUTF8 (8-bit addresses are found by pickup in any case),
AUTH= (accepted, unused), RET and ENVID (RFC 3461: the message's; -N, -R, -V and -B do not apply, as under
Postfix's -bs); RCPT's NOTIFY and ORCPT, kept per recipient in the maildrop file (`rcpt_notify`, `rcpt_orcpt`); a
malformed or repeated DSN parameter is `501 5.5.4 Bad RET parameter syntax` (`Error: Bad NOTIFY parameter syntax`,
...), any other parameter `555 5.5.4 Unsupported option`.
STARTTLS, AUTH, XCLIENT and XFORWARD get Postfix's stand-alone smtpd's answers (502, 503, 550); a command line
that is not UTF-8 `500 5.5.2 Error: bad UTF-8 syntax`, an empty one `500 5.5.2 Error: bad syntax`, one longer than
`[smtpd] max_line_length` (its CRLF counted) is read to its end and answered `500 5.5.2 Error: line too long`, as
smtpd answers it (Postfix's smtpd cuts it there and answers what is left).
Pipelining works since input is read line by line. The greeting is smtpd's (`[smtpd] banner`), as Postfix's
smtpd_banner is under -bs. Every reply comes from mailflow.status (the EHLO lines are the only plain strings).
DATA is streamed like standard input in deliver mode (a CR inside a line becomes a space, a line of any length
stays one); too big is `552 5.3.4`; input ending mid-message stores nothing. Past `[smtpd] recipient_limit`
recipients RCPT is answered `452 4.5.3 Error: too many recipients` (Postfix runs smtpd under -bs, with its limit).
Errors are counted as Postfix's smtpd counts them under -bs, with mailflow's smtpd's settings: each command answered
with a 4xx or 5xx reply is one (a 452 for recipient_limit only past `[smtpd] recipient_overshoot_limit` in the
transaction), and so is each HELO, EHLO, RSET, NOOP or VRFY past `[smtpd] junk_command_limit` of them; from
`[smtpd] soft_error_limit` errors on every reply waits `[smtpd] error_sleep_time` first, and at
`[smtpd] hard_error_limit` the session ends with `421 4.7.0 <host> Error: too many errors` (before the next command
is read, exit 0). A queued message forgives the errors and the junk commands so far.
`[smtpd]`'s reply settings apply as Postfix's stand-alone smtpd applies them: reject_footer under every 4xx and 5xx
(its client `localhost[127.0.0.1]`, port 0: Postfix's smtpd_peer_assume_local_client), strict_rfc821_envelopes (a
path without angle brackets 501 5.1.7 / 5.1.3), discard_ehlo_keywords, or discard_ehlo_keyword_address_maps' value
for 127.0.0.1 (a discarded keyword is not offered and its parameters are refused as smtpd refuses them; a table that
cannot answer is logged as the session starts, as smtpd logs it, and makes EHLO `421 4.3.0 <host> Server local data
error`, logged as Postfix's `warning: don't know what EHLO features to announce to localhost[127.0.0.1]` and
`NOQUEUE: reject: EHLO from localhost[127.0.0.1]: 421 …`, and ends the session, with no `lost connection` line).
The session is logged (through `logger`: `logs.tool_logger`'s, `[log] file`) as Postfix's stand-alone smtpd logs
it, with mailflow's smtpd's lines (mailflow.session_log, logs.SmtpdLog) as smtpd: `connect from
localhost[127.0.0.1]`, `NAME: client=localhost[127.0.0.1]` for each message stored (NAME: its maildrop file, as
Postfix's names postdrop's queue file), `warning: Illegal address syntax from localhost[127.0.0.1] in RCPT command:
<a b>` (MAIL's, VRFY's alike), `warning: NOQUEUE: queue file size limit exceeded` (smtpd's line for a message too
big; NOQUEUE as the message, not stored, never has a name: Postfix's names its postdrop file, made at the first
accepted RCPT, and logs its client= line there too), `too many errors after CMD from …`, `lost connection after
CMD from …` (input ended without QUIT) and `disconnect from localhost[127.0.0.1] ehlo=1 mail=1 rcpt=1/2 …
commands=N/M`. No reject lines but EHLO's 421 above: Postfix's smtpd under -bs runs no restriction list, so it
logs none (checked against Postfix 3.7.11).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from typing import BinaryIO, Callable, Iterator

from mailflow import address, status
from mailflow.ehlo_keywords import discards_for, keyword_name
from mailflow.junk_commands import JunkCount
from mailflow.logs import MailLog, SmtpdLog
from mailflow.maildrop import MaildropError
from mailflow.message import CRLF, MAILBOX_LINE, mailbox_labels_kept, mailbox_line, mailbox_line_room, unlabelled
from mailflow.reply_footer import FooterClient, footer_lines, footer_values
from mailflow.sendmail.options import Options, UsageError
from mailflow.sendmail.reading import LINE_PIECE, clean_address, clean_recipient, header_overflows, line_pieces
from mailflow.sendmail.submitter import Submitter
from mailflow.session_log import SessionLog
from mailflow.stray_cr import lone_cr_as_space
from mailflow.smtp_parameters import PathRefusal, checked_path, mail_parameters, path_text, rcpt_parameters
from mailflow.syntax import COMMAND_BLANKS, ascii_upper, command_words, verb_and_argument
from mailflow.tables import open_table

# the client as Postfix's stand-alone smtpd names it (smtpd_peer_assume_local_client): its footer's $client...,
# the key of discard_ehlo_keyword_address_maps
CLIENT_ADDRESS, CLIENT_NAME, CLIENT_PORT = "127.0.0.1", "localhost", "0"
CLIENT = f"{CLIENT_NAME}[{CLIENT_ADDRESS}]"  # its name in the log lines (Postfix's namaddr)


class StdioSmtp:
    """`sendmail -bs`: an SMTP server on standard input/output for scripts (Postfix runs smtpd there).
    HELO, EHLO, MAIL, RCPT, DATA, RSET, NOOP, VRFY, QUIT; each message goes to the maildrop. Pipelining works
    since input is read line by line. Returns 0 at QUIT, at the end of input, or when the client stops reading
    the replies (a broken pipe: quietly, no traceback)."""

    JUNK_COMMANDS = frozenset({"HELO", "EHLO", "RSET", "NOOP", "VRFY"})  # Postfix's SMTPD_CMD_FLAG_LIMIT (no ETRN)

    def __init__(self, reader: BinaryIO, writer: BinaryIO, submitter: Submitter, opts: Options,
                 sleep: Callable[[float], None] = time.sleep, logger: logging.Logger | None = None):
        """`logger`: where the session's lines go (None: nowhere)."""
        self._in = reader
        self._out = writer
        self._sub = submitter
        self._limits = submitter.config.smtpd  # [smtpd]: the limits and words smtpd would use here
        self._opts = opts
        self._host = submitter.config.myhostname
        self._soft_bounce = submitter.config.soft_bounce  # 5xx replies go out as 4xx, as smtpd's do
        self._sleep = sleep
        self._errors = 0  # commands answered with an error since the last queued message (smtpd's error_count)
        self._junk = JunkCount(self.JUNK_COMMANDS, self._limits.junk_command_limit)  # since then (smtpd's junk_cmds)
        self._helo = ""  # the name HELO or EHLO gave (the footer's $helo_name)
        self._discarded: frozenset[str] = frozenset()  # the EHLO keywords discarded: chosen at the connection
        self._discards_unknown = False  # discard_ehlo_keyword_address_maps could not answer: EHLO gets a 421
        logger = logger or _silent_logger()
        self._logger = logger
        self._mail_log = MailLog(logger)
        self._record = SessionLog(lambda: CLIENT, SmtpdLog(logger))  # smtpd's session lines and command counts
        self._data_bytes = 0  # of the DATA content being read
        self._labelled = 0  # how many leading From lines of it _data_lines labelled `X-Mailbox-Line: `
        self._reset()

    def _reset(self) -> None:
        self._sender: str | None = None
        self._recipients: list[str] = []
        self._rcpt_dsn: list[tuple[str, str]] = []  # (NOTIFY, ORCPT) of each recipient, as RCPT gave them
        self._overshoot = 0  # RCPTs refused for recipient_limit in this transaction
        self._message_opts = self._opts  # then what MAIL's BODY=, RET= and ENVID= said (not -B, -R, -V, -N)

    def _reply(self, reply: "status.Reply | str", counts_as_error: bool = True) -> None:
        """A reply from the catalogue (plain strings only for the EHLO lines, all in one), after
        error_sleep_time once soft_error_limit errors were made (as Postfix's smtpd_chat_reply waits); an error
        reply (4xx, 5xx) counts as one unless told otherwise. A 4xx or 5xx gets `[smtpd] reject_footer`, then under
        soft_bounce a 5xx goes out as 4xx (smtpd's order)."""
        limits = self._limits
        if self._errors >= limits.soft_error_limit and limits.error_sleep_time:
            self._sleep(limits.error_sleep_time)
        text = str(reply)
        if limits.reject_footer and text[:1] in ("4", "5"):
            text = status.with_footer(text, *footer_lines(limits.reject_footer, self._footer_values()))
        if self._soft_bounce:
            text = status.soft_bounced(text)
        self._out.write(text.encode("utf-8") + b"\r\n")
        self._out.flush()
        self._record.replied(int(text[:3]) if text[:3].isdigit() else 0)
        if counts_as_error and isinstance(reply, status.Reply) and reply.code >= 400:
            self._errors += 1

    def _footer_values(self) -> dict[str, str]:
        """The footer's macros as Postfix's stand-alone smtpd gives them (see protocol.py's for a socket's)."""
        client = FooterClient(f"{CLIENT_NAME}[{CLIENT_ADDRESS}]", CLIENT_ADDRESS, CLIENT_PORT, CLIENT_NAME, self._helo)
        return footer_values(self._host, self._sender, self._recipients[0] if self._recipients else None, client)

    def run(self) -> int:
        try:
            return self._session()
        except BrokenPipeError:  # the client stopped reading: the session is over (what was stored stays stored)
            _discard_output(self._out)
            return 0
        finally:
            self._record.ended()

    def _session(self) -> int:
        self._record.connect()
        # chosen for the client as it connects, a table's failure logged then (Postfix's smtpd_state_init)
        self._discarded, self._discards_unknown = _discards(self._limits, self._logger)
        self._reply(status.greeting(self._host, self._limits.banner))  # (smtpd's, as Postfix's -bs)
        while True:
            if self._errors >= self._limits.hard_error_limit:
                self._record.too_many_errors()
                self._reply(status.too_many_errors(self._host))
                return 0
            line = self._in.readline(self._limits.max_line_length)
            if not line:
                return 0
            if not line.endswith(b"\n") and len(line) == self._limits.max_line_length:
                self._skip_line()  # one reply for one command, as smtpd gives it
                self._record.command(None)  # (smtpd counts a malformed line as an unknown command)
                self._reply(status.LINE_TOO_LONG)
                continue
            try:
                text = line.rstrip(b"\r\n").decode("utf-8")
            except UnicodeDecodeError:  # (never an address made up of replacement characters)
                self._record.command(None)
                self._reply(status.BAD_UTF8)
                continue
            verb, arg = verb_and_argument(text)  # as smtpd splits a line: at ASCII blanks only
            verb = ascii_upper(verb)  # (str.upper() makes QU\u0131T a QUIT)
            handler = getattr(self, f"_do_{verb}", None) if verb.isascii() and verb.isalpha() else None
            self._record.command(verb if handler is not None else None)
            if handler is None:
                self._reply(status.NOT_RECOGNIZED if verb else status.BAD_SYNTAX)
                continue
            if handler(arg.strip(COMMAND_BLANKS)) is False:
                return 0
            if self._junk.answered(verb):  # one more error from the (junk_command_limit + 2)th on
                self._errors += 1

    def _skip_line(self) -> None:
        """Read through the end of the current line (or of the input) without keeping it."""
        while (piece := self._in.readline(LINE_PIECE)) and not piece.endswith(b"\n"):
            pass

    def _do_HELO(self, arg: str) -> None:
        self._reset()
        if arg:
            self._helo = arg
        self._reply(status.helo_accepted(self._host) if arg else status.hello_syntax("HELO"))

    def _do_EHLO(self, arg: str) -> bool | None:
        if not arg:
            self._reply(status.hello_syntax("EHLO"))
            return None
        self._helo = arg
        if self._discards_unknown:  # as smtpd: discard_ehlo_keyword_address_maps could not answer
            refusal = status.local_data_error(self._host)
            self._record.lines.local_data_error("", "EHLO", CLIENT, str(refusal))
            self._record.server_hung_up = True  # (no "lost connection": the server ends the session)
            self._reply(refusal)
            return False
        self._reset()
        self._reply("\r\n".join(status.ehlo_lines(self._host, self._keywords())))
        return None

    def _keywords(self) -> list[str]:
        """EHLO's keywords, in the order of Postfix's smtpd, without the discarded ones."""
        limit = self._limits.message_size_limit
        vrfy = [] if self._limits.disable_vrfy_command else ["VRFY"]
        offered = ["PIPELINING", f"SIZE {limit}" if limit else "SIZE", *vrfy, "ENHANCEDSTATUSCODES", "8BITMIME",
                   "DSN", "SMTPUTF8"]
        return [keyword for keyword in offered if keyword_name(keyword) not in self._discarded]

    def _do_MAIL(self, arg: str) -> None:
        if self._sender is not None:
            return self._reply(status.NESTED_MAIL)
        parsed = _path(arg, "MAIL", status.SENDER_SYNTAX, self._limits.strict_rfc821_envelopes)
        if isinstance(parsed, PathRefusal):
            return self._refuse_path("MAIL", parsed)
        given, words = parsed
        taken = mail_parameters(words, self._limits.message_size_limit, self._discarded)  # (smtpd's own reading)
        if isinstance(taken, status.Reply):
            return self._reply(taken)
        options, ret, envid, _ = taken  # (AUTH=: accepted, unused, as smtpd without SASL)
        try:
            sender = clean_address(given, self._sub.config.origin) if given else ""
        except UsageError:
            return self._reply(status.bad_sender_syntax(given))
        if self._sub.sender_problem(sender):
            return self._reply(status.sender_login_mismatch(sender, self._sub.identity.login))
        self._sender = sender
        body_type = next((option[5:] for option in options if option.startswith("BODY=")), "")
        # the dialogue's own DSN and body type only: Postfix's smtpd under -bs takes none of -N, -R, -V, -B
        self._message_opts = dataclasses.replace(self._opts, body_type=body_type, ret=ret, envid=envid, notify="")
        self._reply(status.SENDER_OK)

    def _do_RCPT(self, arg: str) -> None:
        if self._sender is None:
            return self._reply(status.NEED_MAIL)
        parsed = _path(arg, "RCPT", status.RECIPIENT_SYNTAX, self._limits.strict_rfc821_envelopes)
        if isinstance(parsed, PathRefusal):
            return self._refuse_path("RCPT", parsed)
        given, words = parsed
        dsn = rcpt_parameters(words, self._discarded)
        if isinstance(dsn, status.Reply):
            return self._reply(dsn)
        if len(self._recipients) >= self._limits.recipient_limit:  # as Postfix's smtpd under -bs
            self._overshoot += 1
            return self._reply(status.TOO_MANY_RECIPIENTS,
                               counts_as_error=self._overshoot > self._limits.recipient_overshoot_limit)
        try:
            self._recipients.append(clean_recipient(given, self._sub.config.origin))
        except UsageError:
            return self._reply(status.bad_address_syntax(given))
        self._rcpt_dsn.append(dsn)
        self._reply(status.RCPT_OK)

    def _refuse_path(self, command: str, refusal: PathRefusal) -> None:
        """Answer MAIL's or RCPT's path refusal, logged where Postfix's smtpd warns of it (checked_path)."""
        if refusal.logged is not None:
            self._record.lines.illegal_address(CLIENT, command, refusal.logged)
        self._reply(refusal.reply)

    def _do_DATA(self, arg: str) -> None:
        if not self._recipients:
            return self._reply(status.no_recipients(self._sender is not None))
        assert self._sender is not None  # a recipient needs MAIL first
        self._reply(status.START_DATA)
        self._data_bytes = 0
        self._record.content("DATA", lambda: self._data_bytes)
        lines = self._data_lines()
        try:
            head, rest = self._sub.split(lines)
            head = self._unlabelled_if_too_big(head)
            name = self._sub.store(self._sender, self._recipients, itertools.chain((head,), rest),
                                   self._message_opts, self._rcpt_dsn)
        except _EndOfInput:
            return  # end of input mid-message: nothing is stored
        except MaildropError as e:
            too_big = e.code == os.EX_DATAERR
            if too_big:  # as smtpd logs it, NOQUEUE: the message has no name until it is stored
                self._record.lines.queue_file_too_big("")
            if not self._skip(lines):
                return
            self._reply(status.MESSAGE_TOO_BIG if too_big else status.QUEUE_ERROR)
        else:
            self._mail_log.received(name, CLIENT)  # (Postfix's at the first accepted RCPT: smtpd_delay_open)
            self._reply(status.queued(name))
            self._errors = 0  # a message queued forgives what came before (Postfix)
            self._junk.forgive()
        self._reset()

    def _data_lines(self) -> Iterator[bytes]:
        """The DATA content, unstuffed, line by line, up to the "." line; _EndOfInput when input ends first. A
        line longer than LINE_PIECE comes in pieces, only the last ending in CRLF (as read_message gives it): it
        stays one line, as Postfix's smtpd keeps it. The mbox `From ` lines it starts with (`>From ` too, tested
        on the line as sent, before unstuffing: mailflow.message.mailbox_line), are
        labelled `X-Mailbox-Line: `, header fields, as Postfix's smtpd labels them, when they fit, labelled, within
        header_size_limit bytes (mailflow.message.mailbox_line_room: smtpd's DATA rule, decided on the whole line,
        so a leading line that may be one is held, at most that many bytes, until it is whole); a line starting
        with a blank right after them gets the empty line before it, which ends the header section, as Postfix's
        smtpd puts it."""
        at_start, leading, labelled = True, True, 0
        self._labelled = 0
        limit = self._sub.config.header_size_limit
        held = b""  # (a leading line that may be a From line, until its end or until it cannot fit)
        for text, complete, _ in line_pieces(self._in):
            self._data_bytes += len(text) + 2 * complete  # (the bytes received, as a line of them with its CRLF)
            if at_start and complete and text == b".":
                self._record.message_ended()
                return
            if leading:
                held += text
                fits = len(held) + 2 <= mailbox_line_room(labelled, limit)
                found = mailbox_line(held) if fits else False  # (a line too long to label is none)
                if not complete and found is not False:
                    at_start = False
                    continue
                leading = complete and found is True
                text, held, at_start = held, b"", True  # (the line from its start)
                if leading:
                    labelled += len(MAILBOX_LINE) + len(text) + 2
                    self._labelled += 1
                elif labelled and text.startswith((b" ", b"\t")):
                    yield CRLF  # (the end of the header section, as Postfix's smtpd writes it there)
            piece = lone_cr_as_space(text[1:] if at_start and text.startswith(b".") else text)
            if leading:
                piece = MAILBOX_LINE + piece
            yield piece + CRLF if complete else piece
            at_start = complete
        raise _EndOfInput()

    def _unlabelled_if_too_big(self, head: bytes) -> bytes:
        """`head` (the first header_size_limit bytes and more of DATA's content, as _data_lines made it) with the
        leading From lines it labelled unlabelled when the header section, labelled, passes header_size_limit:
        smtpd's DATA rule, the one helper (mailflow.message.mailbox_labels_kept), the From lines then body, not a
        message cleanup refuses. The labelled lines, within the limit, are all in `head`; nothing after them was
        labelled."""
        if not self._labelled:
            return head
        limit = self._sub.config.header_size_limit
        return mailbox_labels_kept(head, lambda: unlabelled(head, self._labelled),
                                   lambda labels: not header_overflows(labels, limit))

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
        written, _ = address.vrfy_argument(arg, "smtputf8" not in self._discarded)
        if self._limits.disable_vrfy_command:
            self._reply(status.VRFY_DISABLED)
        elif not written:
            self._reply(status.VRFY_SYNTAX)
        elif not address.vrfy_address(written):
            self._record.lines.illegal_address(CLIENT, "VRFY", written)
            self._reply(status.RECIPIENT_SYNTAX)
        else:
            self._reply(status.vrfy_answer(written))

    def _do_QUIT(self, arg: str) -> bool:
        self._reply(status.BYE)
        return False

    def _do_STARTTLS(self, arg: str) -> None:
        self._reply(status.NOT_IMPLEMENTED)  # (Postfix's smtpd under -bs: no TLS on a pipe)

    def _do_AUTH(self, arg: str) -> None:
        self._reply(status.AUTH_NOT_ENABLED)

    def _do_XCLIENT(self, arg: str) -> None:
        self._reply(status.XCLIENT_DENIED)

    _do_XFORWARD = _do_XCLIENT


class _EndOfInput(Exception):
    """-bs: standard input ended in the middle of DATA."""


def _silent_logger() -> logging.Logger:
    """A logger that writes nothing (a session nobody asked to log), outside logging's registry."""
    logger = logging.Logger("mailflow.sendmail")
    logger.disabled = True
    return logger


def _discard_output(out: BinaryIO) -> None:
    """After a broken pipe: what is still buffered for `out` goes nowhere, so that the interpreter's last flush
    does not fail with a traceback."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a file descriptor (a test's BytesIO): nothing to do
        pass


def _path(arg: str, command: str, bad_path: status.Reply, strict: bool) -> tuple[str, list[str]] | PathRefusal:
    """(the address, the parameter words) of MAIL's `FROM:<a@b> PARAMS` / RCPT's `TO:…`, the path read as smtpd
    reads it (path_text, checked_path); else the refusal: the usage reply without the keyword or a path (not
    logged), `bad_path` for a malformed one (logged where smtpd logs it)."""
    text = path_text(arg, command)
    if isinstance(text, status.Reply):
        return PathRefusal(text)
    path = checked_path(text, command, bad_path, strict)
    if isinstance(path, PathRefusal):
        return path
    found, _, rest = path
    return found, command_words(rest)


def _discards(smtpd, logger: logging.Logger) -> tuple[frozenset[str], bool]:
    """(the EHLO keywords discarded, whether discard_ehlo_keyword_address_maps could not answer) for the -bs
    client, as smtpd chooses them (stages/smtpd/ehlo_discards.py): the maps' value for 127.0.0.1, else
    discard_ehlo_keywords. A table that cannot answer is logged to `logger` as smtpd's warning."""
    maps = [open_table(spec) for spec in smtpd.discard_ehlo_keyword_address_maps]
    as_smtpd = logging.LoggerAdapter(logger, {"service": "smtpd"})
    return discards_for(maps, CLIENT_ADDRESS, frozenset(smtpd.discard_ehlo_keywords), logger=as_smtpd)
