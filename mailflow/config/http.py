"""`[http]`: the one HTTP listener (mailflow.http) that serves the features that speak HTTP: the capture API of
`[sink]` now, the admin API and the queue page later. It is opened only when a feature has routes to serve.

    HttpConfig

Loopback by default: nothing is served beyond it unless `listen` names another address.

Failure behaviour: a bad value raises ValueError (a ConfigError once loaded).
"""
from __future__ import annotations

from mailflow.config.base import HostPorts, Section


class HttpConfig(Section):
    """The HTTP listener (docs/config.md, "[http]")."""

    # host:port addresses; Mailpit's port by default, so its clients find the capture API where they look.
    listen: HostPorts = ("127.0.0.1:8025",)
