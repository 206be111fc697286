"""The Postfix policy delegation protocol (SMTPD_POLICY_README), client side: `check_policy_service`.

Owns: one query to an endpoint (`inet:host:port` or `unix:/path`, parsed by `mailflow.syntax.parse_endpoint`):
`name=value` lines and an empty line out, `action=...` (plus any other attributes, ignored) and an empty line back.

    PolicyClient(spec, timeout).query(attributes) -> action text      raises PolicyError

Each query uses a connection of its own (Postfix keeps one open; a policy server must accept both), so
nothing needs closing. Failure behaviour: a refused connection, a timeout (`timeout` bounds the whole
exchange), a closed connection, an oversized or malformed reply all raise `PolicyError`; the caller answers
with smtpd's `policy_service_default_action` (Postfix: 451 4.3.5 Server configuration problem).
Attribute values never carry a line end (they are replaced by spaces), so a client cannot inject attributes.
"""
from __future__ import annotations

import asyncio
import re

from mailflow.syntax import parse_endpoint

MAX_REPLY_BYTES = 64 * 1024  # a reply line beyond this is a broken server, not a long action


class PolicyError(Exception):
    """The policy server could not be asked or gave no usable answer."""


def encode_request(attributes: dict[str, str]) -> bytes:
    lines = [f"{name}={_one_line(value)}\n" for name, value in attributes.items()]
    return ("".join(lines) + "\n").encode("utf-8", "replace")


def _one_line(value: object) -> str:
    return re.sub(r"[\r\n\0]", " ", str(value))


def parse_reply(lines: list[str]) -> str:
    """The `action` attribute of a reply (empty if its value is: Postfix takes that as OK); PolicyError when there
    is none."""
    for line in lines:
        name, eq, value = line.partition("=")
        if eq and name.strip() == "action":
            return value.strip()
    raise PolicyError("reply without an action")


class PolicyClient:
    def __init__(self, spec: str, timeout: float):
        self.spec = spec
        self._endpoint = parse_endpoint(spec)
        self._timeout = timeout

    async def query(self, attributes: dict[str, str]) -> str:
        try:
            async with asyncio.timeout(self._timeout):
                return await self._exchange(encode_request(attributes))
        except TimeoutError:
            raise PolicyError(f"timeout after {self._timeout:g}s") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            raise PolicyError(f"{type(e).__name__}: {e}") from None

    async def _exchange(self, request: bytes) -> str:
        reader, writer = await self._connect()
        try:
            writer.write(request)
            await writer.drain()
            lines: list[str] = []
            while True:
                line = (await reader.readuntil(b"\n")).decode("utf-8", "replace").rstrip("\r\n")
                if not line:
                    return parse_reply(lines)
                lines.append(line)
        finally:
            writer.close()

    async def _connect(self):
        kind, where, port = self._endpoint
        if kind == "unix":
            return await asyncio.open_unix_connection(where, limit=MAX_REPLY_BYTES)
        return await asyncio.open_connection(where, port, limit=MAX_REPLY_BYTES)
