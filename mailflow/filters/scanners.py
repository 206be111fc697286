"""Content scanners without a middleman: SpamAssassin's spamd and ClamAV's clamd, each spoken to directly.

    Spamd(config.spamd).check(content) -> ScanResult      SYMBOLS: spam or not, the score, the rules that hit
    Clamd(config.clamd).check(content) -> ScanResult      INSTREAM: the content streamed in chunks
    ScanResult(found, score, threshold, name, failed, scanned)   failed: could not scan (down, slow, refused)
    parse_spamd_reply(status, headers, body) / parse_clamd_reply(answer) -> ScanResult   (sans-IO)

What both share (`StreamScanner`): the endpoint (`host:port` or `unix:/path`), one connection per message, the
size limit (a bigger message is passed unscanned, `scanned=False`, as spamc does), one deadline (`timeout`)
for the whole exchange, the content streamed from its Content chunk by chunk (a spooled message is never read
whole), and a reply read up to REPLY_LIMIT bytes (clamd's answer; spamd's status line and headers together, and
its body besides: 64 KB + 64 KB at most). An exchange that breaks off (the timeout, a connection refused or
closed, what is no reply, a cancellation) aborts its connection, what is unsent dropped: nothing outlives it. A
failure the scanner answers (a spamd error code, a clamd ERROR) ends the exchange as a verdict does, and the
connection is closed.

spamd (SpamAssassin's SPAMC/SPAMD protocol 1.5): `SYMBOLS SPAMC/1.5`, a `Content-length` header, an empty line,
the message; spamd answers `SPAMD/1.1 0 EX_OK`, a `Spam: True ; 1004.2 / 5.0` header (and the Content-length
of its body), an empty line and the names of the rules that hit, comma-separated. A code other than 0
(`SPAMD/1.0 76 Bad header line: ...`) is a failure.
clamd: `zINSTREAM`, then chunks each preceded by its 4-byte length, then a zero length; it answers
`stream: OK` or `stream: NAME FOUND` (NUL-terminated; NAME kept to VIRUS_NAME_LIMIT characters, each one that
is not printable ASCII a `?`: it goes into X-Virus-Status and the reply); a message over `size_limit` is not
scanned (clamd's own StreamMaxLength would refuse it).

Failure behaviour: nothing raises for a scanner that is down, slow or answers nonsense: `ScanResult.failed`
says why (the caller applies the section's `on_failure`: accept or tempfail). OSError from reading a spooled
message is a failure too.
"""
from __future__ import annotations

import asyncio
import math
import re
import struct
from dataclasses import dataclass

from mailflow.config.filters import ClamdConfig, SpamdConfig
from mailflow.content import CHUNK, Content
from mailflow.syntax import parse_hostport

CLAMD_CHUNK = 64 * 1024
REPLY_LIMIT = 64 * 1024  # the most read of a scanner's reply: a line, spamd's headers, its list of rules
SPAMD_HEADER_LINES = 32  # spamd sends two; more is not spamd
RULE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # a SpamAssassin rule name (anything else is dropped)
VIRUS_NAME_LIMIT = 100  # characters of clamd's name for what it found that are kept (its signatures' are shorter)


@dataclass(frozen=True)
class ScanResult:
    found: bool = False  # spam / a virus
    score: float = 0.0
    threshold: float = 0.0
    name: str = ""  # the virus, or the spam rules that hit (comma-separated)
    failed: str = ""  # why it could not be scanned ("" scanned)
    scanned: bool = True  # False: too big, passed unscanned


class ScannerError(Exception):
    """The scanner answered something its protocol does not allow (or more than REPLY_LIMIT)."""


def _endpoint(address: str) -> tuple[str, int] | str:
    if address.startswith("unix:"):
        return address[5:]
    return parse_hostport(address)


class StreamScanner:
    """One scanner daemon over a stream connection; subclasses speak its protocol in `_exchange`."""

    name = ""

    def __init__(self, config: SpamdConfig | ClamdConfig):
        self._endpoint = _endpoint(config.address)
        self._timeout = config.timeout
        self._size_limit = config.size_limit

    async def check(self, content: Content) -> ScanResult:
        if content.size > self._size_limit:
            return ScanResult(scanned=False)
        try:  # (asyncio.timeout, not wait_for: wait_for's frame holds the task it made, and the task a failure
            async with asyncio.timeout(self._timeout):  # whose traceback holds that frame, a cycle per failure)
                return await self._connected(content)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                ScannerError) as e:
            return ScanResult(failed=f"{self.name}: {_why(e)}"[:200])

    async def _connected(self, content: Content) -> ScanResult:
        if isinstance(self._endpoint, str):
            reader, writer = await asyncio.open_unix_connection(self._endpoint, limit=REPLY_LIMIT)
        else:
            reader, writer = await asyncio.open_connection(*self._endpoint, limit=REPLY_LIMIT)
        try:
            result = await self._exchange(reader, writer, content)
        except BaseException:  # a failure, or the timeout's cancellation: what is unsent is dropped (a close would
            writer.transport.abort()  # keep the socket, and that, for as long as a peer that stopped reading keeps it)
            raise
        writer.close()
        return result

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        content: Content) -> ScanResult:
        raise NotImplementedError


def _why(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, asyncio.IncompleteReadError):
        return "the connection closed before the reply ended"
    if isinstance(error, asyncio.LimitOverrunError):
        return f"a reply longer than {REPLY_LIMIT} bytes"
    return f"{type(error).__name__}: {error}"


# ---------------------------------------------------------------------------------------------- spamd


class Spamd(StreamScanner):
    """SpamAssassin's spamd (SYMBOLS); see the module doc."""

    name = "spamd"

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        content: Content) -> ScanResult:
        writer.write(b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % content.size)
        async for chunk in content.stream(CHUNK):
            writer.write(chunk)
            await writer.drain()
        await writer.drain()
        status = await reader.readline()
        headers: dict[str, str] = {}
        unread = REPLY_LIMIT - len(status)  # the status line and the headers together (each line alone is bounded)
        for _ in range(SPAMD_HEADER_LINES):
            line = await reader.readline()
            unread -= len(line)
            if unread < 0:
                raise ScannerError(f"a status line and headers longer than {REPLY_LIMIT} bytes")
            # closed within the headers: the Spam header may have come whole, the reply did not (an error's status
            # line comes alone, and the close after it is its end)
            if (line or headers) and not line.endswith(b"\n"):
                raise ScannerError("the connection closed within the reply's headers")
            if not line.strip():
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        else:
            raise ScannerError(f"more than {SPAMD_HEADER_LINES} header lines")
        length = int(headers.get("content-length", "0"))
        if not 0 <= length <= REPLY_LIMIT:
            raise ScannerError(f"a body of {length} bytes")
        body = await reader.readexactly(length) if length else b""
        return parse_spamd_reply(status, headers, body)


def parse_spamd_reply(status: bytes, headers: dict[str, str], body: bytes) -> ScanResult:
    """spamd's reply: its status line, its headers (names lower-case), its body (SYMBOLS: the rules)."""
    words = status.decode("latin-1").strip().split(None, 2)
    if len(words) < 2 or not words[0].startswith("SPAMD/"):
        raise ScannerError(f"not a spamd reply: {status[:80]!r}")
    if words[1] != "0":
        return ScanResult(failed=f"spamd: {' '.join(words[1:])}"[:200])
    spam = headers.get("spam")
    if spam is None:
        raise ScannerError("no Spam header in the reply")
    flag, _, scores = spam.partition(";")
    score, _, threshold = scores.partition("/")
    numbers = float(score), float(threshold)
    if not all(math.isfinite(n) for n in numbers):  # (float() takes nan, inf and 1e999: no score spamd gives)
        raise ScannerError(f"a score that is no number: {spam[:80]!r}")
    rules = ",".join(r for r in (r.strip() for r in body.decode("latin-1").split(",")) if RULE_NAME.fullmatch(r))
    return ScanResult(found=flag.strip().lower() in ("true", "yes"), score=numbers[0], threshold=numbers[1],
                      name=rules)


# ---------------------------------------------------------------------------------------------- clamd


class Clamd(StreamScanner):
    """ClamAV's clamd: INSTREAM, the content as a stream."""

    name = "clamd"

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        content: Content) -> ScanResult:
        writer.write(b"zINSTREAM\0")
        async for chunk in content.stream(CLAMD_CHUNK):
            writer.write(struct.pack("!I", len(chunk)) + chunk)
            await writer.drain()
        writer.write(struct.pack("!I", 0))
        await writer.drain()
        answer = (await reader.readuntil(b"\0"))[:-1].decode("utf-8", "replace")
        return parse_clamd_reply(answer)


def parse_clamd_reply(answer: str) -> ScanResult:
    """`stream: OK`, `stream: NAME FOUND`, or an error (`INSTREAM size limit exceeded. ERROR`)."""
    text = answer.partition(": ")[2] if ": " in answer else answer
    if text == "OK":
        return ScanResult()
    if text.endswith(" FOUND"):
        return ScanResult(found=True, name=_printable_ascii(text[:-6][:VIRUS_NAME_LIMIT]))
    return ScanResult(failed=f"clamd: {answer[:200]}")


def _printable_ascii(text: str) -> str:
    """`text` with each character that is not printable ASCII made a `?`: a name that goes into a header line and
    a reply, where a CR LF would begin a header or a reply line of the scanner's choosing."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)
