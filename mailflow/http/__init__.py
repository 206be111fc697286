"""The one HTTP layer: an aiohttp application on the server's own loop (no thread), serving the routes that the
features register: the capture API of `[sink]` (mailflow.capture.mailpit) on `[http] listen`, the admin API, the
queue page and /metrics (mailflow.admin) on `[admin] listen`. One implementation, one set of limits, one place
that starts and stops each listener.

    HttpServer(listen, middlewares=())      `listen`: "host:port" addresses (loopback by default); `middlewares`:
                                            aiohttp middlewares run for every request (the admin's access checks)
        add_routes(feature, routes)         a feature's aiohttp route definitions (web.RouteTableDef or a list),
                                            before start(); a path registered twice is refused (ValueError)
        await start()                       binds every address (port 0: an ephemeral one)
        addresses -> [(host, port)]         what was bound
        await stop()                        closes the listeners and the open connections
        features -> [name]

Loaded only by what serves HTTP (aiohttp takes a third of a second to import): `Mailflow` imports it when a
feature is enabled.

Limits: request bodies up to MAX_BODY bytes (413 beyond); no access log (a client must not be able to fill
the log); a handler that raises gets 500 and one logged traceback (aiohttp's).

Failure behaviour: `start` raises OSError when an address cannot be bound (the caller stops the server);
`stop` never raises.
"""
from __future__ import annotations

import logging
from typing import Iterable

from aiohttp import web

from mailflow.syntax import parse_hostport

log = logging.getLogger("mailflow.http")

MAX_BODY = 1024 * 1024


class HttpServer:
    """See the module docstring."""

    def __init__(self, listen: Iterable[str], middlewares: Iterable = ()):
        self._listen = [parse_hostport(item) for item in listen]
        self._app = web.Application(client_max_size=MAX_BODY, middlewares=list(middlewares))
        self._runner: web.AppRunner | None = None
        self._sites: list[web.TCPSite] = []
        self.features: list[str] = []

    def add_routes(self, feature: str, routes: Iterable[web.AbstractRouteDef]) -> None:
        if self._runner is not None:
            raise RuntimeError("routes are added before the HTTP server starts")
        try:
            self._app.router.add_routes(routes)
        except RuntimeError as e:  # aiohttp: a route that is already registered
            raise ValueError(f"{feature}: {e}") from None
        self.features.append(feature)

    @property
    def app(self) -> web.Application:
        """The application, for a feature that keeps state in it (`app[key]`) or adds a cleanup."""
        return self._app

    async def start(self) -> None:
        self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await self._runner.setup()
        try:
            for host, port in self._listen:
                site = web.TCPSite(self._runner, host, port)
                await site.start()
                self._sites.append(site)
        except BaseException:
            await self.stop()
            raise
        log.info("HTTP listening on %s for %s", ", ".join(f"{h}:{p}" for h, p in self.addresses),
                 ", ".join(self.features) or "nothing")

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [tuple(a[:2]) for a in self._runner.addresses] if self._runner is not None else []

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            try:
                await runner.cleanup()
            except Exception:
                log.exception("stopping the HTTP server")
        self._sites = []
