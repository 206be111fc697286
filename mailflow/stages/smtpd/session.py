"""The SMTP protocol edge: a thin aiosmtpd `SMTP` subclass, one per client connection.

It tracks live sessions (for graceful shutdown) and gives every reply an enhanced status code
(ENHANCEDSTATUSCODES, RFC 2034), except the greeting and EHLO/HELO. Policy lives in the handler
(`handler.py`); this module only speaks the protocol.
"""
from __future__ import annotations

import asyncio

from aiosmtpd.smtp import SMTP

from mailflow import status


class SmtpSession(SMTP):
    """One client connection. Adds enhanced status codes and registers itself while alive."""

    def __init__(self, handler, *, sessions: set, **kwargs):
        super().__init__(handler, **kwargs)
        self._sessions = sessions
        self._replies_sent = 0
        self._in_hello = False  # EHLO/HELO replies carry no enhanced codes (RFC 2034)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._sessions.discard(self)
        super().connection_lost(error)

    async def push(self, line: str) -> None:
        if self._replies_sent and not self._in_hello:  # the first reply is the greeting
            line = status.with_enhanced_code(line)
        self._replies_sent += 1
        await super().push(line)

    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_hello = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_hello = False

    async def smtp_HELO(self, hostname: str) -> None:
        self._in_hello = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._in_hello = False
