"""A scripted milter for the tests: the filter side of the Milter protocol on 127.0.0.1, port 0, speaking the
real wire format (4-byte length, 1-byte command, payload), told what to answer to each command.

    async with scripted_milter({b"R": reply(b"r")}) as milter:   # reject every RCPT
        milter.spec                         "inet:127.0.0.1:PORT" (for smtpd milters / Postfix's smtpd_milters)
        milter.sessions                     per connection, every packet received: [(command, payload), ...]
        milter.macros(b"M")                 the macros sent before each MAIL of every session, as dicts

A script maps a command letter (b"C" connect, b"H" HELO, b"M", b"R", b"T" DATA, b"L" header, b"N", b"B" body,
b"E" end of message) to what is written back: bytes (one or more packets, or garbage), HANG (nothing, for
ever), CLOSE (the connection is closed), Drip(data, every) (the bytes one at a time, `every` seconds apart),
Held(released, data) (`data` once the test sets the event `released`), or a callable (session number, payload) ->
one of those. Commands not
in the script get CONTINUE; the negotiation gets `optneg` (default: version 6, every action, every event, each
answered). MACRO, ABORT and QUIT get no answer, as the protocol says.
"""
from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass
from typing import Callable, Union

HANG = "hang"
CLOSE = "close"


@dataclass(frozen=True)
class Drip:
    """An answer written a byte at a time, `every` seconds apart: a milter that is slow but never silent."""

    data: bytes
    every: float


@dataclass(frozen=True)
class Held:
    """An answer held back until the test sets `released`: a milter that answers when the test says so."""

    released: asyncio.Event
    data: bytes


Answer = Union[bytes, str, Drip, Held]
Script = dict[bytes, Union[Answer, Callable[[int, bytes], Answer]]]
SILENT = (b"D", b"A", b"Q", b"K")  # MACRO, ABORT, QUIT, QUIT_NC: no reply


def reply(command: bytes, payload: bytes = b"") -> bytes:
    """One packet from the milter."""
    return struct.pack("!I", len(payload) + 1) + command + payload


def optneg(version: int = 6, actions: int = 0x1FF, protocol: int = 0, macros: bytes = b"") -> bytes:
    return reply(b"O", struct.pack("!III", version, actions, protocol) + macros)


def replycode(text: str) -> bytes:
    """SMFIR_REPLYCODE: the milter's own SMTP reply (lines joined by CRLF for a multi-line one)."""
    return reply(b"y", text.encode() + b"\0")


class ScriptedMilter:
    def __init__(self, script: Script, negotiation: Answer):
        self._script = script
        self._negotiation = negotiation
        self.sessions: list[list[tuple[bytes, bytes]]] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self.port = 0

    @property
    def spec(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def macros(self, stage: bytes) -> list[dict[str, str]]:
        """Every SMFIC_MACRO packet for `stage`, decoded."""
        found = []
        for session in self.sessions:
            for command, payload in session:
                if command == b"D" and payload[:1] == stage:
                    parts = payload[1:].split(b"\0")[:-1]
                    found.append({parts[i].decode(): parts[i + 1].decode() for i in range(0, len(parts) - 1, 2)})
        return found

    def commands(self, session: int = -1) -> bytes:
        """The command letters of one session, in order (b"OCDHDM..." ), macros included."""
        return b"".join(command for command, _ in self.sessions[session])

    async def start(self) -> "ScriptedMilter":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        number = len(self.sessions)
        received: list[tuple[bytes, bytes]] = []
        self.sessions.append(received)
        try:
            while True:
                (length,) = struct.unpack("!I", await reader.readexactly(4))
                packet = await reader.readexactly(length)
                command, payload = packet[:1], packet[1:]
                received.append((command, payload))
                if command == b"Q":
                    break
                answer = self._answer(number, command, payload)
                if answer == HANG:
                    await asyncio.sleep(3600)
                if answer == CLOSE:
                    break
                if isinstance(answer, Drip):
                    await _drip(writer, answer)
                if isinstance(answer, Held):
                    await answer.released.wait()
                    answer = answer.data
                if isinstance(answer, bytes) and answer:
                    writer.write(answer)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # (cancelled: the milter is closing)
        finally:
            writer.close()
            self._tasks.discard(task)

    def _answer(self, number: int, command: bytes, payload: bytes) -> Answer:
        if command == b"O":
            return self._negotiation
        step = self._script.get(command)
        if step is None:
            return b"" if command in SILENT else reply(b"c")
        return step(number, payload) if callable(step) else step


async def _drip(writer: asyncio.StreamWriter, drip: Drip) -> None:
    for byte in drip.data:
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(drip.every)


@contextlib.asynccontextmanager
async def scripted_milter(script: Script | None = None, negotiation: Answer | None = None):
    milter = await ScriptedMilter(script or {}, negotiation if negotiation is not None else optneg()).start()
    try:
        yield milter
    finally:
        await milter.close()
