"""smtpd's listeners: start them on the running loop (never aiosmtpd's threaded Controller) and stop them
gracefully: close the listeners, let messages being committed finish within a grace period, then close what
is left. A session cut mid-DATA loses nothing: its client got no 250 and sends the message again.
"""
from __future__ import annotations

import asyncio

from mailflow.config import Config, parse_hostport
from mailflow.stages.smtpd.handler import SmtpdHandler
from mailflow.stages.smtpd.session import SmtpSession


class Smtpd:
    """The listeners. `await start()`, `addresses`, `await stop(grace)`."""

    def __init__(self, config: Config, handler: SmtpdHandler):
        self._config = config
        self._handler = handler
        self._servers: list[asyncio.base_events.Server] = []
        self.sessions: set[SmtpSession] = set()

    def _session(self) -> SmtpSession:
        c = self._config
        return SmtpSession(
            self._handler,
            sessions=self.sessions,
            hostname=c.myhostname,
            ident=c.smtpd.banner,
            data_size_limit=c.smtpd.message_size_limit or None,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=c.smtpd.timeout,
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for item in self._config.smtpd.listen:
            host, port = parse_hostport(item)
            self._servers.append(await loop.create_server(self._session, host, port))

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.sockets[0].getsockname()[:2] for s in self._servers if s.sockets]

    async def stop(self, grace: float = 10.0) -> None:
        """Close the listeners, wait (within `grace`) for messages being committed, close every session.

        A session cut mid-DATA loses nothing: its client got no 250 and will send the message again.
        """
        loop = asyncio.get_running_loop()
        for server in self._servers:
            server.close()
        deadline = loop.time() + grace
        while self._handler.submitting and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
