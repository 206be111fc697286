"""The server side of Postfix's policy delegation protocol, for tests: `PolicyServer` listens on 127.0.0.1 (an
async context manager; `spec` is its `inet:127.0.0.1:PORT`) and hands each connection to the subclass's
`_serve(reader, writer)`; `read_request(reader)` reads one request's attributes (None: the client closed);
`RecordingPolicy` answers DUNNO (or its `action`) to every request and keeps them (`requests`)."""
from __future__ import annotations

import asyncio
from typing import Self

MAX_ATTRIBUTES = 100  # in one request (Postfix 3.7 sends 29)


class PolicyServer:
    spec = ""  # inet:127.0.0.1:PORT once started

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.spec = f"inet:127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class RecordingPolicy(PolicyServer):
    """Answers every request `action` (DUNNO) and keeps its attributes, in order."""

    def __init__(self, action: str = "DUNNO"):
        self.requests: list[dict[str, str]] = []
        self._answer = f"action={action}\n\n".encode()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while request := await read_request(reader):
            self.requests.append(request)
            writer.write(self._answer)
            await writer.drain()
        writer.close()


async def read_request(reader: asyncio.StreamReader) -> dict[str, str] | None:
    """One request's attributes, up to its empty line; None when the connection ends first (or the request never
    ends within MAX_ATTRIBUTES lines)."""
    request: dict[str, str] = {}
    for _ in range(MAX_ATTRIBUTES):
        line = await reader.readline()
        if line in (b"", b"\n"):
            return request if line == b"\n" else None
        name, _, value = line.decode().rstrip("\n").partition("=")
        request[name] = value
    return None
