"""The error vocabulary: temporary versus permanent is always explicit, and the default is temporary.

- `TemporaryError(dsn, text)`: try again later (4xx); anything unclassified is treated like this.
- `PermanentError(dsn, text)`: give up on this recipient (5xx).
- `LookupRetry`: a table or DNS lookup failed (not "not found"); callers defer with 4.3.0 / 451.
- `ConfigError`: a configuration problem, always naming the file, the key and the reason.
"""
from __future__ import annotations


class DeliveryError(Exception):
    """Base for delivery failures that carry an enhanced status code and a diagnostic text."""

    permanent = False

    def __init__(self, dsn: str, text: str):
        super().__init__(f"{dsn} {text}")
        self.dsn = dsn
        self.text = text


class TemporaryError(DeliveryError):
    permanent = False


class PermanentError(DeliveryError):
    permanent = True


class LookupRetry(TemporaryError):
    """A lookup could not be answered now (unreadable table, DNS server failure)."""

    def __init__(self, text: str):
        super().__init__("4.3.0", text)


class ConfigError(Exception):
    """A bad configuration: `file: key: reason`. Printed as is; never a traceback."""

    def __init__(self, file: str, key: str, reason: str):
        self.file, self.key, self.reason = file, key, reason
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {reason}")
