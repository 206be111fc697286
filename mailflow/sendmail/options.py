"""The command line of `mailflow sendmail` (Sendmail's, as Postfix's sendmail(1) takes it).

    parse_args(argv) -> Options     options clustered or not (`-ti`, `-fsender`, `-f sender`), options and
                                    recipients in any order, `--` ending the options; `--help` is mode "help"
    parse_notify(value) -> str      -N: "never", or a comma list of success, failure, delay -> RFC 3461 NOTIFY
    program_mode(argv0)             extra options when invoked under a Sendmail name (a link): sendmail, mailq
                                    (-bp), newaliases (-bi); None for any other name
    USAGE, HELP

Modes: deliver (default, `-bm`), `-bs` SMTP on stdin/stdout, `-bp` mailq, `-bv` address test, `-q` flush (`-qRsite`
one site's mail, `-qIqueueid` one message), `-bi`/`-I` newaliases, and "ignore" (`-bh`, `-bH`, `-q` with an
interval such as `-q30m`: Postfix's sendmail exits 0 at once, reading nothing). The option letters are Postfix's
(its getopt list; WITH_ARGUMENT those that take a value): those that only make sense to Sendmail (`-o*` but `-oi`,
`-O`, `-L`, `-h`, `-A`, `-e`, `-p`, `-G`, `-U`, `-m`, `-c`, `-x`) are accepted and ignored with a note (shown under
`-v`); `-XV` (VERP, which mailflow does not do; also `-V xy`, a two-character -V value, as Postfix takes it) is
ignored with a warning, the mail still going.

Failure behaviour: `UsageError` (exit 64, EX_USAGE), in the words of Postfix's sendmail, for a letter Postfix does
not know (`invalid option -- 'Z'`: a typo never sends mail to the word after it), `-n`, `-X` but `-XV`, a
missing argument, an unsupported mode or `-q` form, a bad -B value, `-t` outside delivery mode, and recipients in
a mode that takes none. A bad -N or -R value, or a -V value that is not printable ASCII or longer than 100
characters, is ignored with a warning in `Options.warnings` (the caller prints them, -v or not), as Postfix's
sendmail does: the mail still goes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mailflow.syntax import ENVID_MAX, is_printable_ascii

# The letters of Postfix's sendmail (its getopt list "A:B:C:F:GIL:N:O:R:UV:X:b:ce:f:h:imno:p:r:q:tvx"); any other
# is a usage error.
WITH_ARGUMENT = set("ABCFLNORVXbefhopqr")  # letters whose value is the rest of the word or the next word
OPTIONAL_ARGUMENT = {"q"}  # -q alone is valid: its value may only be attached (-q30m, -qRsite)
IGNORED = set("AGLOUcehmpx")  # Sendmail options with no meaning here (Postfix ignores them too)
MODES = {"s": "smtp", "p": "mailq", "v": "verify", "i": "newaliases", "m": "deliver",
         "h": "ignore", "H": "ignore"}  # -bh, -bH: Postfix's sendmail exits 0 at once
# the modes that take no recipient argument, in the words of Postfix's refusal
NO_RECIPIENTS = {"smtp": "stand-alone mode", "mailq": "display queue mode", "flush": "flush queue mode",
                 "newaliases": "alias initialization mode"}
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
  -bv addr...   show how each address would be routed (as mail from -f's sender, else from you)
  -bi           newaliases (checks the alias tables)
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
    flush_id: str = ""  # -qIqueueid
    queue_interval: str = ""  # -q30m: Sendmail's queue runner interval (Postfix's sendmail then does nothing)
    recipients: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # ignored options, shown with -v
    warnings: list[str] = field(default_factory=list)  # bad -N, -R, -V values, ignored: always shown


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
            value = ""  # a letter without an argument gets none
            if letter in WITH_ARGUMENT:
                value = word[j:]
                j = len(word)
                if not value and letter not in OPTIONAL_ARGUMENT:
                    if i >= len(words):
                        raise UsageError(f"option -{letter} requires an argument")
                    value = words[i]
                    i += 1
            _apply(opts, letter, value)
    _check_combination(opts)
    return opts


def _check_combination(opts: Options) -> None:
    """Postfix's sendmail's checks of options that do not go together; an interval (-q30m) ends in doing nothing."""
    if opts.extract and opts.mode == "verify":
        raise UsageError("-t option cannot be used with -bv")
    if opts.extract and opts.mode != "deliver":
        raise UsageError("-t can be used only in delivery mode")
    if opts.recipients and opts.mode in NO_RECIPIENTS:
        what = "flush site" if opts.flush_site else NO_RECIPIENTS[opts.mode]
        raise UsageError(f"{what} requires no recipient")
    if opts.queue_interval:
        opts.mode = "ignore"


def _apply(opts: Options, letter: str, value: str) -> None:
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
    elif letter in "NRV":
        _dsn_option(opts, letter, value)
    elif letter == "B":
        if value.upper() not in ("7BIT", "8BITMIME"):
            raise UsageError(f"-B {value}: use 7BIT or 8BITMIME")
        opts.body_type = value.upper()
    elif letter == "b":
        _mode(opts, value)
    elif letter == "I":
        opts.mode = "newaliases"
    elif letter == "q":
        _queue_option(opts, value)
    elif letter == "n":
        raise UsageError("-n option not supported")
    elif letter == "X":
        if value[:1] != "V":
            raise UsageError(f"unsupported: -X{value[:1]}")
        opts.warnings.append(f"-X{value} (VERP) is not supported -- ignored")
    elif letter == "o":
        if value[:1] == "i":
            opts.ignore_dots = True
        else:
            opts.notes.append(f"-o{value} ignored")
    elif letter in IGNORED:
        opts.notes.append(f"-{letter}{value} ignored")
    else:  # (a letter Postfix's getopt does not know: the word after it must not become a recipient)
        raise UsageError(f"invalid option -- '{letter}'")


def _queue_option(opts: Options, value: str) -> None:
    """-q (flush now), -qRsite, -qIqueueid; -q30m, a queue runner's interval, is taken and nothing done, as by
    Postfix's sendmail; any other -q form is a usage error."""
    if value[:1].isdigit():
        opts.queue_interval = value
        return
    opts.mode = "flush"
    if not value:
        return
    if value[0] == "R":
        opts.flush_site = value[1:]
        if not opts.flush_site:
            raise UsageError("specify: -qRsitename")
    elif value[0] == "I":
        opts.flush_id = value[1:]
        if not opts.flush_id:
            raise UsageError("specify: -qIqueueid")
    else:
        raise UsageError(f"-q{value[0]} is not implemented")


def _dsn_option(opts: Options, letter: str, value: str) -> None:
    """-N, -R, -V: a bad value is ignored with a warning (and clears an earlier one), as Postfix's sendmail does,
    rather than losing the mail. An envelope id is any printable ASCII (the SMTP client writes it as xtext)."""
    if letter == "N":
        try:
            opts.notify = parse_notify(value)
        except UsageError:
            opts.notify = ""
            opts.warnings.append("bad -N option value -- ignored")
    elif letter == "R":
        good = value.lower() in ("full", "hdrs")
        opts.ret = value.upper() if good else ""
        if not good:
            opts.warnings.append("bad -R option value -- ignored")
    elif len(value) == 2:  # Postfix takes `-V xy` for the -XVxy of before Postfix 2.3 (VERP)
        opts.warnings.append(f"-V{value} (VERP) is not supported -- ignored")
    elif len(value) > ENVID_MAX:
        opts.warnings.append("too long -V option value -- ignored")
    elif not value or not is_printable_ascii(value):  # (Postfix's allprint() is false for "" too)
        opts.warnings.append("bad syntax in -V option value -- ignored")
    else:
        opts.envid = value


def _mode(opts: Options, value: str) -> None:
    if value[:1] in ("d", "l"):
        raise UsageError(f"-b{value[:1]}: daemon mode is `mailflow serve`")
    if value[:1] in MODES:  # (only the first letter counts, as with Postfix: -bvx is -bv)
        opts.mode = MODES[value[:1]]
    else:
        raise UsageError(f"unsupported: -b{value[:1]}")


def parse_notify(value: str) -> str:
    """-N: "never", or a comma list of success, failure, delay (any case) -> RFC 3461 NOTIFY."""
    words = [w.strip().upper() for w in value.split(",") if w.strip()]
    if words == ["NEVER"]:
        return "NEVER"
    if not words or not all(w in NOTIFY_WORDS for w in words) or len(set(words)) != len(words):
        raise UsageError(f"-N {value}: use never, or a list of success, failure, delay")
    return ",".join(words)


def program_mode(argv0: str) -> list[str] | None:
    """Extra options when invoked under a Sendmail name (a link): sendmail, mailq (-bp), newaliases (-bi)."""
    return {"sendmail": [], "mailq": ["-bp"], "newaliases": ["-bi"]}.get(Path(argv0).name)
