"""The error vocabulary: temporary versus permanent is always explicit, and the default is temporary.

- `DeliveryError(dsn, text, reason)`: `text` is what a client or a bounce may be told, `reason` what the log
  says (defaults to `text`; may name a table, a file or a peer that the client must not see).
- `TemporaryError(dsn, text, reason)`: try again later (4xx); anything unclassified is treated like this.
- `PermanentError(dsn, text, reason)`: give up on this recipient (5xx).
- `MessageTooBig(dsn, text, reason)`: a permanent refusal because a size limit is passed (X.3.4): SMTP says 552.
- `ContentRejected(dsn, text, reason)`: a content check (header/body checks) refused the message: SMTP says 550.
- `Overloaded`: too many writes are waiting in the store: answer 451 4.3.1 and let the client retry.
- `LookupRetry`: a table or DNS lookup failed (not "not found"); callers defer with 4.3.0 / 451.
- `ConfigError`: a configuration problem, always naming the file, the key and the reason.
- `os_reason(error) -> str`: an OS error in the system's words ("Connection refused", "Address already in use";
  "Connection timed out" for a timeout), as Postfix's %m prints them.
- `detached(error) -> error`: the same error without its traceback nor the exception it was raised during, for a
  failure kept past its `except` clause (a later result): its traceback's frames would hold it in turn, a
  reference cycle that only the garbage collector frees, with every frame and local of the failed attempt.
- `tls_failure(error) -> (reason, problem)`: why a TLS handshake failed, in the words of Postfix's
  `SSL_connect error to …` (tls_client.c) and `SSL_accept error from …` (tls_server.c) lines: "-1" for a TLS
  protocol error, with the library's description of it as `problem` (Postfix's `warning: TLS library problem:
  …`); else the system's words for an OS error or a timeout ("Connection timed out", "Connection reset by
  peer"), or "lost connection" when the peer closed, with `problem` "".

What an SMTP client is answered for each of these is one table, `mailflow.status.error_reply`: nothing else
picks a reply code from an error's class, dsn or text.
"""
from __future__ import annotations

import errno
import os
import re
from typing import TypeVar

E = TypeVar("E", bound=BaseException)

_PROBLEM_SOURCE = re.compile(r" \(_ssl\.c:\d+\)$")  # the place in Python's source an SSLError names


def os_reason(error: BaseException | None) -> str:
    """See the module docstring; anything else by its text (else its class name)."""
    if isinstance(error, TimeoutError):
        return "Connection timed out"
    if isinstance(error, OSError) and error.errno and error.errno > 0:
        return os.strerror(error.errno)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def detached(error: E) -> E:
    """See the module docstring."""
    error.__traceback__ = error.__context__ = error.__cause__ = None
    return error


def tls_failure(error: BaseException) -> tuple[str, str]:
    """See the module docstring. asyncio reports its own handshake timeout (ssl_handshake_timeout) as a
    ConnectionAbortedError without an errno, and a peer that closed during the handshake as a ConnectionError
    without one."""
    import ssl  # (loaded already by whatever spoke TLS: sendmail, which never does, does not load it)

    if isinstance(error, ssl.SSLError):
        return "-1", _PROBLEM_SOURCE.sub("", str(error))
    if isinstance(error, (TimeoutError, ConnectionAbortedError)) and not getattr(error, "errno", None):
        return os.strerror(errno.ETIMEDOUT), ""
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno), ""
    return "lost connection", ""


class DeliveryError(Exception):
    """Base for delivery failures that carry an enhanced status code and a diagnostic text."""

    permanent = False

    def __init__(self, dsn: str, text: str, reason: str = ""):
        super().__init__(f"{dsn} {text}")
        self.dsn = dsn
        self.text = text
        self.reason = reason or text


class TemporaryError(DeliveryError):
    permanent = False


class PermanentError(DeliveryError):
    permanent = True


class MessageTooBig(PermanentError):
    """The message (or its header section) is larger than a limit: refused for good, 552 in SMTP."""


class ContentRejected(PermanentError):
    """A content check refused the message (header_checks / body_checks REJECT): 550 in SMTP."""


class LookupRetry(TemporaryError):
    """A lookup could not be answered now (unreadable table, DNS server failure)."""

    def __init__(self, text: str):
        super().__init__("4.3.0", text)


class Overloaded(Exception):
    """Too many writes are waiting: the caller should answer 451 and let the client retry."""


class ConfigError(Exception):
    """A bad configuration: `file: key: reason`. Printed as is; never a traceback."""

    def __init__(self, file: str, key: str, reason: str):
        self.file, self.key, self.reason = file, key, reason
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {reason}")
