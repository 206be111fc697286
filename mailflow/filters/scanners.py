"""Content scanners without a middleman: SpamAssassin's spamd and ClamAV's clamd.

    Spamd(config.spamd).check(content) -> ScanResult      CHECK through aiospamc: spam or not, the score
    Clamd(config.clamd).check(content) -> ScanResult      INSTREAM: the content streamed in chunks
    ScanResult(found, score, threshold, name, failed)     failed: could not scan (down, slow, refused)

spamd gets the message whole (its protocol sends a Content-length first), so only messages up to
`size_limit` (spamc's 500 KB by default) are scanned; bigger ones are passed unscanned, as spamc does. clamd
reads the content as a stream: `zINSTREAM`, then chunks each preceded by its 4-byte length, then a zero
length; it answers `stream: OK` or `stream: NAME FOUND`; a message over `size_limit` is not scanned
(clamd's own StreamMaxLength would refuse it).

Failure behaviour: nothing raises for a scanner that is down, slow or answers nonsense: `ScanResult.failed`
says why (the caller applies the section's `on_failure`: accept or tempfail). Every exchange is bounded by
`timeout`.
"""
from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass

import aiospamc
from aiospamc.connections import Timeout
from aiospamc.exceptions import ClientException, ParseError
from aiospamc.responses import ResponseException

from mailflow.content import Content
from mailflow.syntax import parse_hostport

log = logging.getLogger("mailflow.smtpd")

CLAMD_CHUNK = 64 * 1024


@dataclass(frozen=True)
class ScanResult:
    found: bool = False  # spam / a virus
    score: float = 0.0
    threshold: float = 0.0
    name: str = ""  # the virus, or the spam rules
    failed: str = ""  # why it could not be scanned ("" scanned)
    scanned: bool = True  # False: too big, passed unscanned


def _endpoint(address: str) -> tuple[str, int] | str:
    if address.startswith("unix:"):
        return address[5:]
    return parse_hostport(address)


class Spamd:
    """SpamAssassin's spamd through aiospamc (its CHECK command)."""

    def __init__(self, config):
        self._endpoint = _endpoint(config.address)
        self._timeout = config.timeout
        self._size_limit = config.size_limit

    async def check(self, content: Content) -> ScanResult:
        if content.size > self._size_limit:
            return ScanResult(scanned=False)
        message = content.read_prefix(content.size) if content.in_memory else await asyncio.to_thread(
            content.read_prefix, content.size)
        where = ({"socket_path": self._endpoint} if isinstance(self._endpoint, str)
                 else {"host": self._endpoint[0], "port": self._endpoint[1]})
        try:
            reply = await asyncio.wait_for(
                aiospamc.check(message, timeout=Timeout(total=self._timeout), **where), self._timeout + 1)
            spam = reply.headers["Spam"]
        except (ClientException, ResponseException, ParseError, TimeoutError, OSError, KeyError, ValueError) as e:
            return ScanResult(failed=f"spamd: {type(e).__name__}: {e}"[:200])
        return ScanResult(found=bool(spam.value), score=float(spam.score), threshold=float(spam.threshold))


class Clamd:
    """ClamAV's clamd: INSTREAM, the content as a stream."""

    def __init__(self, config):
        self._endpoint = _endpoint(config.address)
        self._timeout = config.timeout
        self._size_limit = config.size_limit

    async def check(self, content: Content) -> ScanResult:
        if content.size > self._size_limit:
            return ScanResult(scanned=False)
        try:
            answer = await asyncio.wait_for(self._instream(content), self._timeout)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            return ScanResult(failed=f"clamd: {type(e).__name__}: {e}"[:200])
        return parse_clamd_reply(answer)

    async def _instream(self, content: Content) -> str:
        if isinstance(self._endpoint, str):
            reader, writer = await asyncio.open_unix_connection(self._endpoint)
        else:
            reader, writer = await asyncio.open_connection(*self._endpoint)
        try:
            writer.write(b"zINSTREAM\0")
            async for chunk in content.stream(CLAMD_CHUNK):
                writer.write(struct.pack("!I", len(chunk)) + chunk)
                await writer.drain()
            writer.write(struct.pack("!I", 0))
            await writer.drain()
            return (await reader.readuntil(b"\0"))[:-1].decode("utf-8", "replace")
        finally:
            writer.close()


def parse_clamd_reply(answer: str) -> ScanResult:
    """`stream: OK`, `stream: NAME FOUND`, or an error (`INSTREAM size limit exceeded. ERROR`)."""
    text = answer.partition(": ")[2] if ": " in answer else answer
    if text == "OK":
        return ScanResult()
    if text.endswith(" FOUND"):
        return ScanResult(found=True, name=text[:-6])
    return ScanResult(failed=f"clamd: {answer[:200]}")
