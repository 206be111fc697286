"""`mailflow sendmail`: the Sendmail-compatible command line of local submission (Postfix sendmail(1) + postdrop).

It runs as the submitting user, needs no running server, and writes each message with its envelope into
`<queue_directory>/maildrop/` (mailflow/maildrop.py), then wakes the server's pickup stage (a missing socket is
not an error: pickup scans the maildrop when the server starts). docs/sendmail.md is the user's guide.
The queue directory must exist (else the message is not stored, exit 73 naming it: a wrong configuration would
strand the mail where no server looks); when no server holds the queue's lock (queuelock.py) a warning on stderr
says the mail waits in the maildrop until one starts (exit 0: it is stored, as with Postfix's postdrop).

- `parse_args(argv) -> Options`: Sendmail's options, clustered or not (`-ti`, `-fsender`, `-f sender`), options
  and recipients in any order, `--` ending the options; `--help` is mode "help" (the caller prints HELP, exit 0).
  Raises `UsageError` (exit 64, EX_USAGE).
  Modes: deliver (default, `-bm`), `-bs` SMTP on stdin/stdout, `-bp` mailq, `-bv` address test, `-q` flush,
  `-bi`/`-I` newaliases (nothing to rebuild: mailflow reads its tables directly). Options that only make sense to
  Sendmail (`-o*` but `-oi`, `-O`, `-L`, `-h`, `-X`, `-A`, `-p`, `-G`, `-U`, `-n`, `-m`, `-c`, …) are accepted and
  ignored, as Postfix does; an unknown letter is ignored with a note under `-v`.
- `run(options, config, stdin, stdout, stderr) -> int`: deliver and `-bs` (the other modes are cli.py's commands).
  Exit codes (sysexits): 0; 64 EX_USAGE (no recipients, bad address); 65 EX_DATAERR (the message is bigger
  than `message_size_limit`: "message file too big"); 77 EX_NOPERM (not in `authorized_submit_users`, or a
  sender `local_login_sender_maps` does not allow); 73 EX_CANTCREAT / 75 EX_TEMPFAIL when the message cannot
  be stored (and 75 when a table cannot answer). Every failure prints one line on stderr.
- Message handling: standard input is streamed into the maildrop file, never held whole: only the header
  section is kept (at most `header_size_limit` bytes; past that the rest goes on as it is), for -t and Bcc.
  Line ends become CRLF (`read_message`: lines, a very long one in pieces); without `-i` a line holding a lone
  "." ends the input; a leading mbox "From " line is dropped; `-t` adds the To/Cc/Bcc addresses (Resent-To/Cc/
  Bcc when the message has Resent- headers) to those of the command line; Bcc and Resent-Bcc headers are
  removed from every message. `-bs` DATA is streamed the same way; too big is `552 5.3.4`.
- Identity: the uid and login name of the process (`os.getuid()`); the sender is login@myorigin unless `-f`/`-r`
  names one this login may use; the full name is `-F`, else $NAME, else the passwd GECOS field.
"""
from __future__ import annotations

import email.utils
import itertools
import os
import pwd
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, TextIO

from mailflow import status
from mailflow.config import Config
from mailflow.errors import LookupRetry
from mailflow.maildrop import EX_CANTCREAT, EX_DATAERR, MaildropError, MaildropMessage, wake_pickup, write_maildrop
from mailflow.message import CRLF, header_fields, split_header
from mailflow.queuelock import queue_owner

EX_USAGE = 64
EX_NOPERM = 77
EX_TEMPFAIL = 75
LINE_PIECE = 65536  # standard input is read a line at a time, a longer line in pieces of this size

WITH_ARGUMENT = set("ABCFLNORVXbfhoprq")  # letters whose value is the rest of the word or the next word
OPTIONAL_ARGUMENT = {"q"}  # -q alone is valid: its value may only be attached (-q30m, -qRsite)
IGNORED = set("46AGLOUXchmnpx")  # Sendmail options with no meaning here (Postfix ignores them too)
IGNORED_MODES = {"h", "H", "m"}  # -bh, -bH: ignored; -bm: deliver (the default)
MODES = {"s": "smtp", "p": "mailq", "v": "verify", "i": "newaliases", "m": "deliver"}
NOTIFY_WORDS = ("SUCCESS", "FAILURE", "DELAY")

USAGE = "usage: sendmail [-t] [-i] [-f sender] [-F name] [-N dsn] [-bs|-bp|-bv|-bi|-q] [--] [recipient ...]"
HELP = f"""{USAGE}

Reads a message on standard input and queues it for the recipients (mailflow's local submission; docs/sendmail.md).
  -t            take the recipients from To:, Cc: and Bcc: (and drop Bcc:)
  -i, -oi       a line with a single dot does not end the message
  -f sender     the envelope sender (-r too); -F name: the full name for a From: header made here
  -N dsn        never, or success,failure,delay: which delivery notices to ask for; -R full|hdrs, -V envid
  -C file       the mailflow configuration (default: $MAILFLOW_CONFIG)
  -bs           speak SMTP on standard input and output
  -bp           list the queue (as mailq); -q: flush it (-qRsite: one site's mail)
  -bv addr...   show how each address would be routed; -bi: newaliases (checks the alias tables)
Exit status: 0, 64 usage, 75 try again later, 77 not allowed (sysexits)."""


class UsageError(Exception):
    pass


@dataclass
class Options:
    mode: str = "deliver"
    extract: bool = False  # -t
    ignore_dots: bool = False  # -i, -oi
    sender: str | None = None  # -f, -r
    fullname: str | None = None  # -F
    notify: str = ""  # -N, as RFC 3461 NOTIFY (NEVER or a comma list)
    ret: str = ""  # -R full|hdrs
    envid: str = ""  # -V
    body_type: str = ""  # -B 7BIT|8BITMIME ("" = detect)
    verbose: int = 0
    config: str | None = None  # -C
    flush_site: str = ""  # -qRsite
    recipients: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # ignored options, shown with -v


def parse_args(argv: list[str]) -> Options:
    opts = Options()
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word == "--help":
            opts.mode = "help"
            return opts
        if word == "--":
            opts.recipients += words[i:]
            break
        if not word.startswith("-") or word == "-":
            opts.recipients.append(word)
            continue
        j = 1
        while j < len(word):
            letter = word[j]
            j += 1
            value = None
            if letter in WITH_ARGUMENT:
                value = word[j:]
                j = len(word)
                if not value and letter not in OPTIONAL_ARGUMENT:
                    if i >= len(words):
                        raise UsageError(f"option -{letter} requires an argument")
                    value = words[i]
                    i += 1
            _apply(opts, letter, value)
    return opts


def _apply(opts: Options, letter: str, value: str | None) -> None:
    if letter == "t":
        opts.extract = True
    elif letter == "i":
        opts.ignore_dots = True
    elif letter == "v":
        opts.verbose += 1
    elif letter in "fr":
        opts.sender = value
    elif letter == "F":
        opts.fullname = value
    elif letter == "C":
        opts.config = value
    elif letter == "N":
        opts.notify = parse_notify(value)
    elif letter == "R":
        if value.lower() not in ("full", "hdrs"):
            raise UsageError(f"-R {value}: use full or hdrs")
        opts.ret = value.upper()
    elif letter == "V":
        if not value or not value.isascii() or any(c.isspace() or c in "+=" or ord(c) < 33 for c in value):
            raise UsageError(f"-V {value!r}: not a valid envelope id")
        opts.envid = value
    elif letter == "B":
        if value.upper() not in ("7BIT", "8BITMIME"):
            raise UsageError(f"-B {value}: use 7BIT or 8BITMIME")
        opts.body_type = value.upper()
    elif letter == "b":
        _mode(opts, value)
    elif letter == "I":
        opts.mode = "newaliases"
    elif letter == "q":
        opts.mode = "flush"
        if value and value[0] == "R":  # -qRsite: the mail for one site; -q30m (an interval) means "now" here
            opts.flush_site = value[1:]
    elif letter == "o":
        if value[:1] == "i":
            opts.ignore_dots = True
        else:
            opts.notes.append(f"-o{value} ignored")
    elif letter in IGNORED:
        opts.notes.append(f"-{letter}{value or ''} ignored")
    else:
        opts.notes.append(f"-{letter}: unknown option, ignored")


def _mode(opts: Options, value: str) -> None:
    if value == "d" or value == "D" or value == "l":
        raise UsageError(f"-b{value}: daemon mode is `mailflow serve`")
    if value in MODES:
        opts.mode = MODES[value]
    elif value in IGNORED_MODES:
        opts.notes.append(f"-b{value} ignored")
    else:
        raise UsageError(f"-b{value}: unsupported mode")


def parse_notify(value: str) -> str:
    """-N: "never", or a comma list of success, failure, delay (any case) -> RFC 3461 NOTIFY."""
    words = [w.strip().upper() for w in value.split(",") if w.strip()]
    if words == ["NEVER"]:
        return "NEVER"
    if not words or not all(w in NOTIFY_WORDS for w in words) or len(set(words)) != len(words):
        raise UsageError(f"-N {value}: use never, or a list of success, failure, delay")
    return ",".join(words)


# ---------------------------------------------------------------------------------------------- who may do what


@dataclass(frozen=True)
class Identity:
    uid: int
    login: str
    gecos: str


def current_identity() -> Identity:
    uid = os.getuid()
    try:
        entry = pwd.getpwuid(uid)
        return Identity(uid, entry.pw_name, entry.pw_gecos.split(",", 1)[0].strip())
    except KeyError:  # a uid without a passwd entry (containers): named by its number
        return Identity(uid, f"uid{uid}", "")


def may_submit(login: str, items: tuple[str, ...]) -> bool:
    """authorized_submit_users: the first item that matches `login` decides; no match means no."""
    from mailflow.tables import open_table

    for item in items:
        if ":" in item:
            if open_table(item).lookup(login) is not None:
                return True
        elif item.startswith("!") and item[1:] == login:
            return False
        elif item == login:
            return True
    return False


def may_use_sender(login: str, sender: str, config: Config) -> bool:
    """local_login_sender_maps: login@myorigin always; else the first table that knows `login` decides."""
    from mailflow.tables import open_table

    origin = config.origin
    if sender.lower() in (login.lower(), f"{login}@{origin}".lower()):
        return True
    for spec in config.sendmail.local_login_sender_maps:
        value = open_table(spec).lookup(login)
        if value is not None:
            return any(_sender_matches(p, sender, origin) for p in re.split(r"[\s,]+", value.strip()) if p)
    return False


def _sender_matches(pattern: str, sender: str, origin: str) -> bool:
    if pattern == "*":
        return True
    if pattern == "<>":
        return sender == ""
    if not sender:
        return False
    if pattern.startswith("@"):
        return sender.lower().endswith(pattern.lower())
    wanted = pattern if "@" in pattern else f"{pattern}@{origin}"
    return sender.lower() == wanted.lower()


# ---------------------------------------------------------------------------------------------- the message


def clean_address(value: str, origin: str) -> str:
    """`<a@b>` -> `a@b`; "" and "<>" stay the null sender; a bare local part gets @myorigin."""
    address = value.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    if any(c in address for c in "<>\r\n\0") or any(c.isspace() for c in address):
        raise UsageError(f"{value!r}: bad address syntax")
    if address and "@" not in address:
        address = f"{address}@{origin}"
    return address


def read_message(stream: BinaryIO, ignore_dots: bool) -> Iterator[bytes]:
    """The message from standard input, as lines ending in CRLF (a line longer than LINE_PIECE comes in pieces,
    the last ending in CRLF); a lone "." ends it unless `ignore_dots`; a leading mbox "From " line is dropped."""
    first, at_start, skipping, carry = True, True, False, b""
    while raw := stream.readline(LINE_PIECE):
        complete = raw.endswith(b"\n")
        data, carry = carry + raw, b""
        if not complete:  # a CR at the end of a piece may be the first half of the line end
            kept = data.rstrip(b"\r")
            data, carry = kept, data[len(kept):]
        if at_start:
            if first and data.startswith(b"From "):  # an mbox separator, not a header (Postfix drops it too)
                skipping = True
            elif complete and not ignore_dots and data.rstrip(b"\r\n") == b".":
                return
        first = False
        if not skipping:
            yield data.rstrip(b"\r\n") + CRLF if complete else data
        skipping = skipping and not complete
        at_start = complete
    if not at_start and not skipping:  # the last line had no line end
        yield CRLF


def split_input(lines: Iterable[bytes], limit: int) -> tuple[bytes, Iterator[bytes]]:
    """(the header section of `lines` - at most about `limit` bytes of it -, the lines that follow, starting with
    the empty line). A header section longer than `limit` is cut there: the rest goes on as body."""
    head: list[bytes] = []
    size, at_start = 0, True
    rest = iter(lines)
    for line in rest:
        if at_start and line == CRLF:
            return b"".join(head), itertools.chain((line,), rest)
        head.append(line)
        size += len(line)
        at_start = line.endswith(CRLF)
        if size > limit:
            break
    return b"".join(head), rest


def header_recipients(content: bytes) -> list[str]:
    """-t: the addresses of To, Cc and Bcc (Resent-To/-Cc/-Bcc when any Resent- header is present)."""
    fields = header_fields(split_header(content)[0])
    resent = any(name.startswith("resent-") for name, _ in fields)
    wanted = ("resent-to", "resent-cc", "resent-bcc") if resent else ("to", "cc", "bcc")
    values = []
    for name, field_lines in fields:
        if name in wanted:
            text = b"".join(field_lines).decode("utf-8", "replace")
            values.append(" ".join(text.split(":", 1)[1].split()))
    return [addr for _, addr in email.utils.getaddresses(values) if addr]


def without_bcc(content: bytes) -> bytes:
    head, rest = split_header(content)
    if not content.endswith(b"\n") and not rest:
        head = content  # a header section without its final line end stays so
    kept = [b"".join(lines) for name, lines in header_fields(head) if name not in ("bcc", "resent-bcc")]
    return b"".join(kept) + rest


# ---------------------------------------------------------------------------------------------- running


@dataclass
class Submitter:
    """Stores messages for one identity under one configuration: the checks, the maildrop, the wake-up."""

    config: Config
    identity: Identity
    fullname: str
    say: Callable[[str], object] = lambda text: None  # a warning for the user (stderr)
    _told_no_server: bool = False

    def sender_problem(self, sender: str) -> str:
        if may_use_sender(self.identity.login, sender, self.config):
            return ""
        return (f"user {self.identity.login} (uid {self.identity.uid}) may not use the sender address "
                f"<{sender}> (local_login_sender_maps)")

    def store(self, sender: str, recipients: list[str], chunks: Iterable[bytes], opts: Options) -> str:
        """Write the message (streamed from `chunks`) into the maildrop and wake pickup. Raises MaildropError
        (EX_DATAERR when it is bigger than message_size_limit)."""
        message = MaildropMessage(sender=sender, recipients=tuple(recipients), uid=self.identity.uid,
                                  user=self.identity.login, fullname=self.fullname, time=time.time(),
                                  notify=opts.notify, ret=opts.ret, envid=opts.envid,
                                  body_type=opts.body_type)  # "" = 8BITMIME if a byte is not ASCII
        queue = self.config.queue_path
        problem = queue_problem(queue)
        if problem:
            raise MaildropError(problem, EX_CANTCREAT)
        name = write_maildrop(queue / "maildrop", message, chunks, size_limit=self.config.smtpd.message_size_limit)
        wake_pickup(queue / "public" / "pickup")
        if not self._told_no_server and queue_owner(queue) is None:
            self._told_no_server = True
            self.say(f"warning: no mailflow server is running on {queue}: the mail waits in its maildrop until one "
                     "starts")
        return name

    def split(self, lines: Iterable[bytes]) -> tuple[bytes, Iterator[bytes]]:
        return split_input(lines, self.config.header_size_limit)


def run(opts: Options, config: Config, stdin: BinaryIO, stdout: BinaryIO, stderr: TextIO,
        identity: Identity | None = None) -> int:
    """deliver or -bs; returns the exit code."""
    me = identity or current_identity()
    say = lambda text: stderr.write(f"sendmail: {text}\n")  # noqa: E731
    for note in opts.notes if opts.verbose else ():
        say(note)
    try:
        if not may_submit(me.login, config.sendmail.authorized_submit_users):
            say(f"user {me.login} (uid {me.uid}) is not allowed to submit mail (authorized_submit_users)")
            return EX_NOPERM
        fullname = opts.fullname if opts.fullname is not None else os.environ.get("NAME") or me.gecos
        submitter = Submitter(config, me, fullname, say)
        if opts.mode == "smtp":
            return StdioSmtp(stdin, stdout, submitter, opts).run()
        return _deliver(opts, config, stdin, stderr, submitter, say)
    except LookupRetry as e:
        say(f"cannot decide now: {e.text}")
        return EX_TEMPFAIL
    except UsageError as e:
        say(str(e))
        return EX_USAGE


def queue_problem(queue: Path) -> str:
    """Why mail cannot be left for a server in `queue` ("" when it can): the directory must exist, made by the
    server (a relative queue_directory is taken from the configuration file's directory)."""
    if queue.is_dir():
        return ""
    what = "is not a directory" if queue.exists() else "does not exist"
    return (f"the queue directory {queue} {what}: check queue_directory in the configuration "
            "(-C, $MAILFLOW_CONFIG) and that mailflow serve has run with it")


def _deliver(opts: Options, config: Config, stdin: BinaryIO, stderr: TextIO, submitter: Submitter, say) -> int:
    origin = config.origin
    if not opts.extract and not opts.recipients:
        raise UsageError("no recipients: name them on the command line or use -t")
    recipients = [clean_address(r, origin) for arg in opts.recipients for r in arg.split(",") if r.strip()]
    me = submitter.identity
    sender = clean_address(opts.sender, origin) if opts.sender is not None else f"{me.login}@{origin}"
    problem = submitter.sender_problem(sender)
    if problem:
        say(problem)
        return EX_NOPERM
    head, rest = submitter.split(read_message(stdin, opts.ignore_dots))
    if opts.extract:
        recipients += [clean_address(r, origin) for r in header_recipients(head)]
    if not recipients:
        raise UsageError("no recipient addresses found in the message header (-t)")
    try:
        name = submitter.store(sender, recipients, itertools.chain((without_bcc(head),), rest), opts)
    except MaildropError as e:
        say(f"message not stored: {e}")
        return e.code
    if opts.verbose:
        say(f"queued as maildrop/{name}: from=<{sender}>, {len(recipients)} recipient(s), uid {me.uid}")
    return 0


# ---------------------------------------------------------------------------------------------- -bs


class StdioSmtp:
    """`sendmail -bs`: an SMTP server on standard input/output for scripts (Postfix runs smtpd there).
    HELO, EHLO, MAIL, RCPT, DATA, RSET, NOOP, VRFY, QUIT; each message goes to the maildrop. Pipelining works
    since input is read line by line. Returns 0 at QUIT or end of input."""

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
        for line in (f"250-{self._host}", "250-PIPELINING", "250-8BITMIME", "250 ENHANCEDSTATUSCODES"):
            self._reply(line)

    def _do_MAIL(self, arg: str) -> None:
        if self._sender is not None:
            return self._reply(status.NESTED_MAIL)
        address = _path(arg, "FROM")
        if address is None:
            return self._reply(status.syntax("MAIL FROM:<address>"))
        try:
            sender = clean_address(address, self._sub.config.origin) if address else ""
        except UsageError:
            return self._reply(status.bad_sender_syntax(address))
        if self._sub.sender_problem(sender):
            return self._reply(status.sender_login_mismatch(sender, self._sub.identity.login))
        self._sender = sender
        self._reply(status.SENDER_OK)

    def _do_RCPT(self, arg: str) -> None:
        if self._sender is None:
            return self._reply(status.NEED_MAIL)
        address = _path(arg, "TO")
        if not address:
            return self._reply(status.syntax("RCPT TO:<address>"))
        try:
            self._recipients.append(clean_address(address, self._sub.config.origin))
        except UsageError:
            return self._reply(status.bad_address_syntax(address))
        self._reply(status.RCPT_OK)

    def _do_DATA(self, arg: str) -> None:
        if not self._recipients:
            return self._reply(status.NEED_RCPT)
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
            self._reply(status.MESSAGE_TOO_BIG if e.code == EX_DATAERR else status.QUEUE_ERROR)
        else:
            self._reply(status.queued(name))
        self._reset()

    def _data_lines(self) -> Iterator[bytes]:
        """The DATA content, unstuffed, line by line, up to the "." line; _EndOfInput when input ends first."""
        while True:
            raw = self._in.readline(self.LINE_LIMIT)
            if not raw:
                raise _EndOfInput()
            line = raw.rstrip(b"\r\n")
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
        self._reply(status.CANNOT_VRFY)

    def _do_QUIT(self, arg: str) -> bool:
        self._reply(status.BYE)
        return False


class _EndOfInput(Exception):
    """-bs: standard input ended in the middle of DATA."""


def _path(arg: str, keyword: str) -> str | None:
    """The address of `FROM:<a@b> PARAMS` / `TO:<a@b>`; None when malformed. Parameters are ignored."""
    m = re.fullmatch(rf"{keyword}:\s*<([^<>]*)>(\s+.*)?", arg, re.IGNORECASE)
    return m.group(1) if m else None


def config_path(opts: Options) -> str | None:
    """-C FILE, else $MAILFLOW_CONFIG, else None (the built-in defaults)."""
    return opts.config or os.environ.get("MAILFLOW_CONFIG") or None


def program_mode(argv0: str) -> list[str] | None:
    """Extra options when invoked under a Sendmail name (a link): sendmail, mailq (-bp), newaliases (-bi)."""
    return {"sendmail": [], "mailq": ["-bp"], "newaliases": ["-bi"]}.get(Path(argv0).name)

