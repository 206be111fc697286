"""`[admin]`: the operator's HTTP listener (mailflow.admin): `/metrics`, `/healthz`, `/readyz`, the admin API and
the queue page (docs/operations.md).

    AdminConfig
    beyond_loopback(address) -> bool      "host:port" names an address other than a loopback one

Loopback by default. Bound beyond loopback (any address that is not 127.0.0.0/8 or ::1, a wildcard included)
it needs `token_file`: a configuration without one is refused here, so that `check-config` says so too. The
file's contents are read at start (mailflow.admin.tokens).

Failure behaviour: a bad value raises ValueError (a ConfigError once loaded).
"""
from __future__ import annotations

import ipaddress

from pydantic import model_validator

from mailflow.config.base import HostPorts, Section
from mailflow.syntax import parse_hostport


def beyond_loopback(address: str) -> bool:
    """True unless `address` ("host:port") is a loopback IP or "localhost": a wildcard (0.0.0.0, ::, "") or a
    host name may be reached from elsewhere."""
    host, _ = parse_hostport(address)
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


class AdminConfig(Section):
    """The admin listener (docs/config.md, "[admin]")."""

    enable: bool = False
    # host:port addresses of the admin listener (port 0: an ephemeral one).
    listen: HostPorts = ("127.0.0.1:8026",)
    # Bearer tokens, one `name:token` a line (a line without a name: the token "admin"); '#' starts a comment.
    # Required when `listen` goes beyond loopback; when set, every request but /healthz and /readyz needs one.
    token_file: str = ""

    @model_validator(mode="after")
    def _token_beyond_loopback(self) -> "AdminConfig":
        if self.enable and not self.token_file:
            wide = [a for a in self.listen if beyond_loopback(a)]
            if wide:
                raise ValueError(f"admin.listen {wide[0]!r} is beyond loopback: set admin.token_file (the bearer "
                                 "tokens the admin API requires there)")
        return self
