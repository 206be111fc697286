"""`mailflow sendmail`: the Sendmail-compatible command line of local submission (Postfix sendmail(1) + postdrop).

It runs as the submitting user, needs no running server, and writes each message with its envelope into
`<queue_directory>/maildrop/` (mailflow/maildrop.py), then wakes the server's pickup stage (a missing socket is
not an error: pickup scans the maildrop when the server starts). docs/sendmail.md is the user's guide.
The queue directory must exist (else the message is not stored, exit 73 naming it: a wrong configuration would
strand the mail where no server looks); when no server holds the queue's lock (queuelock.py) a warning on stderr
says the mail waits in the maildrop until one starts (exit 0: it is stored, as with Postfix's postdrop).

- `parse_args(argv) -> Options` (options.py): Sendmail's options; `--help` is mode "help" (the caller prints HELP,
  exit 0). Raises `UsageError` (exit 64, EX_USAGE).
- `run(options, config, stdin, stdout, stderr) -> int` (deliver.py): deliver and `-bs` (stdio_smtp.py); the other
  modes are mailflow.cli's commands. Exit codes are sysexits values (deliver.py lists them).
- Message handling (reading.py): standard input is streamed into the maildrop file, never held whole: only the
  header section is kept (at most `header_size_limit` bytes; past that the rest goes on as it is), for -t. Line ends
  become CRLF, and a CR inside a line a space (as Postfix stores it: never a line end); without `-i` a line holding
  a lone "." ends the input; the leading mbox "From " lines (">From " too) are dropped; `-t` adds the To/Cc/Bcc
  addresses (Resent-To/Cc/Bcc when the message has one of those, as Postfix's sendmail) to those of the
  command line; Bcc and Resent-Bcc fields are left to cleanup, which removes them (message_drop_headers) after it
  has seen them, as Postfix's does: a Resent-Bcc makes a message a resent one. `-bs` DATA is streamed the same way;
  too big is `552 5.3.4`.
- Identity (identity.py): the uid and login name of the process (`os.getuid()`); the sender is login@myorigin
  unless `-f`/`-r` names one this login may use; the full name is `-F`, else $NAME, else the passwd GECOS field.
- submitter.py: the maildrop file and the wake-up, for one identity.
- settings.py: `SubmitSettings`, what these modules read of a configuration (a `Config` serves too: pickup's), and
  the record `mailflow serve` keeps of them so that deliver and -bs start without the configuration model.
"""
from typing import Any

from mailflow.sendmail.deliver import run
from mailflow.sendmail.identity import Identity, current_identity, may_submit, may_use_sender
from mailflow.sendmail.options import HELP, USAGE, Options, UsageError, parse_args, parse_notify, program_mode
from mailflow.sendmail.reading import LINE_PIECE, clean_address, header_recipients, read_message, split_input
from mailflow.sendmail.submitter import Submitter, queue_problem

__all__ = [
    "HELP", "LINE_PIECE", "USAGE", "Identity", "Options", "StdioSmtp",
    "Submitter", "UsageError", "clean_address", "current_identity", "header_recipients", "may_submit",
    "may_use_sender", "parse_args", "parse_notify", "program_mode", "queue_problem", "read_message", "run",
    "split_input",
]


def __getattr__(name: str) -> Any:
    """`StdioSmtp`, loaded on first use: deliver mode (`-t`, the common one) needs no SMTP dialogue (smtpd's
    replies, parameter checks and session log: ~10 ms of every start)."""
    if name == "StdioSmtp":
        from mailflow.sendmail.stdio_smtp import StdioSmtp

        return StdioSmtp
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
