"""The admin listener (`[admin]`, docs/operations.md): `/metrics`, `/healthz`, `/readyz`, the admin API (api.py, and
accounts.py for the account database) and the queue page (page.py), served by the one HTTP layer (mailflow.http) on
`[admin] listen`, behind the access checks of access.py (bearer tokens from `[admin] token_file`; loopback only without
them).

    Admin(config, server, metrics)
        await start()          reads the token file, binds the listener
        addresses              what was bound
        await stop()

`server` is the running Mailflow (read at each request: see api.routes); `metrics` its mailflow.metrics.Metrics.

Failure behaviour: `start` raises ConfigError for a token file that cannot be used (access.read_tokens) and
OSError for an address that cannot be bound; `stop` never raises.
"""
from __future__ import annotations

import logging
import os

from mailflow.admin import accounts, api, page
from mailflow.admin.access import Access, read_tokens
from mailflow.config import AdminConfig
from mailflow.http import HttpServer
from mailflow.metrics import Metrics

log = logging.getLogger("mailflow.admin")


class Admin:
    """See the module docstring."""

    def __init__(self, config: AdminConfig, server, metrics: Metrics):
        self._config = config
        self._server = server
        self._metrics = metrics
        self._http: HttpServer | None = None

    async def start(self) -> None:
        tokens = {}
        if self._config.token_file:
            tokens = read_tokens(self._config.token_file)
            _warn_if_readable(self._config.token_file)
        self._http = HttpServer(self._config.listen, middlewares=[api.json_errors, Access(tokens).middleware])
        self._http.add_routes("admin API", api.routes(self._server, self._metrics))
        self._http.add_routes("accounts API", accounts.routes(self._server))
        self._http.add_routes("queue page", page.routes())
        self._http.app.on_response_prepare.append(page.security_headers)
        await self._http.start()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return self._http.addresses if self._http is not None else []

    async def stop(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            await http.stop()


def _warn_if_readable(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & 0o004:
        log.warning("admin: the token file %s is readable by every user (chmod o-r)", path)
