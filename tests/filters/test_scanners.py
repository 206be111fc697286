"""mailflow's spamd and clamd clients against scripted peers on 127.0.0.1 (the real daemons are in
test_real_filters.py): what goes on the wire, how replies are read, and that every way a scanner can fail
(down, silent, refusing, babbling) ends as `ScanResult.failed` within the timeout."""
from __future__ import annotations

import asyncio
import struct

import pytest

from mailflow.config.filters import ClamdConfig, SpamdConfig
from mailflow.content import Content
from mailflow.filters.scanners import (REPLY_LIMIT, VIRUS_NAME_LIMIT, Clamd, ScannerError, Spamd, parse_clamd_reply,
                                       parse_spamd_reply)
from tests.support import SmtpClient, eventually, free_port, maildir_messages, send, spooled
from tests.support.ports import sockets_to

MESSAGE = b"From: <s@example.test>\r\nSubject: hi\r\n\r\nbody\r\n"


class ScriptedScanner:
    """A peer that reads a request the way the daemon would, records it, and answers with `reply`
    (None: never answers)."""

    def __init__(self, reply: bytes | None, read):
        self.reply, self._read = reply, read
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> "ScriptedScanner":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def address(self) -> str:
        assert self.server is not None
        return "127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.requests.append(await self._read(reader))
            if self.reply is None:
                await reader.read()  # until the client gives up
            else:
                writer.write(self.reply)
                await writer.drain()
        finally:
            writer.close()


async def spamd_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.split(b"Content-length: ")[1].split(b"\r\n")[0])
    return head + await reader.readexactly(length)


async def clamd_request(reader: asyncio.StreamReader) -> bytes:
    data = await reader.readexactly(10)
    while True:
        (size,) = struct.unpack("!I", await reader.readexactly(4))
        if not size:
            return data
        data += await reader.readexactly(size)


def spamd(address: str, **settings) -> Spamd:
    return Spamd(SpamdConfig(address=address, **settings))


SPAM_RULES = b"GTUBE,MISSING_DATE,EVIL\r\nX-Injected: 1"
SPAM_REPLY = b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: True ; 1004.2 / 5.0\r\n\r\n%b" % (
    len(SPAM_RULES), SPAM_RULES)


# ---------------------------------------------------------------------------------------------- spamd


async def test_spamd_gets_symbols_with_the_exact_length_and_the_message_streamed_from_its_file(tmp_path):
    data = MESSAGE + b"x" * 300_000 + b"\r\n"  # past the in-memory limit: a spool file
    async with ScriptedScanner(SPAM_REPLY, spamd_request) as peer:
        result = await spamd(peer.address, size_limit=1_000_000).check(spooled(tmp_path, data))
    assert peer.requests == [b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(data) + data]
    assert (result.found, result.score, result.threshold, result.failed) == (True, 1004.2, 5.0, "")
    assert result.name == "GTUBE,MISSING_DATE"  # (what is not a rule name never reaches a header)


async def test_spamd_ham_and_an_error_code():
    ham = b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 4.2 / 5.0\r\n\r\n"
    async with ScriptedScanner(ham, spamd_request) as peer:
        result = await spamd(peer.address).check(Content.of(MESSAGE))
    assert (result.found, result.score, result.name, result.failed, result.scanned) == (False, 4.2, "", "", True)
    refused = b"SPAMD/1.0 76 Bad header line: (Content-Length mismatch: Expected 100 bytes, got 3 bytes)\r\n"
    async with ScriptedScanner(refused, spamd_request) as peer:
        result = await spamd(peer.address).check(Content.of(MESSAGE))
    assert result.failed.startswith("spamd: 76 Bad header line") and not result.found


async def test_spamd_down_silent_or_babbling_is_a_failure_within_the_timeout():
    loop = asyncio.get_running_loop()
    assert (await spamd(f"127.0.0.1:{free_port()}").check(Content.of(MESSAGE))).failed.startswith("spamd: ")
    async with ScriptedScanner(None, spamd_request) as peer:
        started = loop.time()
        result = await spamd(peer.address, timeout=0.3).check(Content.of(MESSAGE))
    assert result.failed == "spamd: timeout" and loop.time() - started < 5
    endless = b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 1 / 5\r\nX-Pad: " + b"a" * (REPLY_LIMIT + 10)
    too_long_body = b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: True ; 1 / 5\r\n\r\n" % (REPLY_LIMIT + 1)
    cut = b"SPAMD/1.1 0 EX_OK\r\nContent-length: 50\r\nSpam: True ; 1 / 5\r\n\r\nGTUBE"
    # headers each within the limit, together past it (32 of them held 2 MB of one reply)
    many = b"SPAMD/1.1 0 EX_OK\r\n" + b"".join(b"X-%d: %b\r\n" % (i, b"a" * 30_000) for i in range(3)) + \
        b"Spam: True ; 1 / 5\r\n\r\n"
    # closed before the empty line that ends the headers: a verdict that came whole, in a reply that did not
    closed = b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 0.1 / 5.0\r\n"
    for reply in (endless, too_long_body, cut, many, closed, closed + b"Content-le", b"HTTP/1.1 200 OK\r\n\r\n",
                  b"SPAMD/1.1 0 EX_OK\r\n\r\n", b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; x / 5\r\n\r\n"):
        async with ScriptedScanner(reply, spamd_request) as peer:
            result = await spamd(peer.address, timeout=5).check(Content.of(MESSAGE))
        assert result.failed.startswith("spamd: ") and not result.found, (reply[:60], result)
        if reply.startswith(closed):
            assert result.failed == "spamd: ScannerError: the connection closed within the reply's headers"


async def test_spamd_passes_a_message_over_its_size_limit_unscanned():
    async with ScriptedScanner(SPAM_REPLY, spamd_request) as peer:
        result = await spamd(peer.address, size_limit=10).check(Content.of(MESSAGE))
    assert not result.scanned and not result.found and peer.requests == []


def test_the_spamd_reply_parser():
    ok = b"SPAMD/1.1 0 EX_OK\r\n"
    assert parse_spamd_reply(ok, {"spam": "Yes ; 7.5 / 5.0"}, b"A_RULE").found  # (older spamd says Yes)
    assert not parse_spamd_reply(ok, {"spam": "False ; 0.0 / 5.0"}, b"").found
    with pytest.raises(ScannerError):
        parse_spamd_reply(ok, {}, b"")
    for malformed in ("True ; nan / 5.0", "True ; inf / 5.0", "False ; 1.0 / 1e999"):  # (each a float() takes)
        with pytest.raises(ScannerError, match="no number"):
            parse_spamd_reply(ok, {"spam": malformed}, b"")
    with pytest.raises(ScannerError):
        parse_spamd_reply(b"RSPAMD/3 0 OK\r\n", {"spam": "True ; 1 / 5"}, b"")


# ---------------------------------------------------------------------------------------------- clamd


async def test_clamd_gets_the_content_in_length_prefixed_chunks(tmp_path):
    data = MESSAGE + b"y" * 200_000
    async with ScriptedScanner(b"stream: Eicar-Test-Signature FOUND\0", clamd_request) as peer:
        result = await Clamd(ClamdConfig(address=peer.address)).check(spooled(tmp_path, data))
    assert peer.requests == [b"zINSTREAM\0" + data]
    assert (result.found, result.name) == (True, "Eicar-Test-Signature")


async def test_clamd_silent_or_babbling_is_a_failure():
    async with ScriptedScanner(None, clamd_request) as peer:
        result = await Clamd(ClamdConfig(address=peer.address, timeout=0.3)).check(Content.of(MESSAGE))
    assert result.failed == "clamd: timeout"
    async with ScriptedScanner(b"stream: " + b"z" * (REPLY_LIMIT + 10), clamd_request) as peer:
        result = await Clamd(ClamdConfig(address=peer.address, timeout=5)).check(Content.of(MESSAGE))
    assert result.failed.startswith("clamd: ") and not result.found


def test_the_clamd_reply_parser():
    assert parse_clamd_reply("stream: OK") == parse_clamd_reply("OK")
    assert parse_clamd_reply("INSTREAM size limit exceeded. ERROR").failed.startswith("clamd: INSTREAM size")


async def test_a_virus_name_with_a_line_end_or_controls_stays_inside_its_one_header_line(mailflow_server, tmp_path):
    """clamd's name reaches X-Virus-Status (action tag) and the reply: a broken or hostile clamd's CR LF there added
    a header of its choosing to the message, and 60 000 characters made one header line of them."""
    hostile = b"stream: Evil.Sig\r\nX-Injected: yes\x01 FOUND\0"
    long_name = b"stream: " + b"N" * 60_000 + b" FOUND\0"
    for reply, expected in ((hostile, b"X-Virus-Status: Infected (Evil.Sig??X-Injected: yes?)\n"),
                            (long_name, b"X-Virus-Status: Infected (" + b"N" * VIRUS_NAME_LIMIT + b")\n")):
        mailbox = tmp_path / "mail" / "alice" / "Maildir"
        for old in (mailbox / "new").glob("*"):
            old.unlink()
        async with ScriptedScanner(reply, clamd_request) as peer:
            mf = await mailflow_server(clamd={"address": peer.address, "action": "tag"})
            await send(mf.smtp_addresses[0][1], "s@example.test", ["alice@local.test"], MESSAGE)
            data = (await eventually(lambda: maildir_messages(mailbox)))[0]
            await mf.stop()
        assert expected in data and b"\nX-Injected" not in data, data[:400]


async def test_a_refusal_names_the_virus_as_kept_printable_and_cut(mailflow_server):
    """The 554 reply (clamd's default action) quotes the name as the scanner keeps it: one reply line."""
    hostile = b"stream: Evil.Sig\r\n250 ok\x01" + b"N" * 200 + b" FOUND\0"
    async with ScriptedScanner(hostile, clamd_request) as peer:
        mf = await mailflow_server(clamd={"address": peer.address})
        client = await SmtpClient.connect(mf.smtp_addresses[0][1])
        reply = await client.send_message(MESSAGE)
        await client.close()
    name = ("Evil.Sig??250 ok?" + "N" * 200)[:VIRUS_NAME_LIMIT]
    assert (reply.code, reply.text) == (554, f"554 5.7.1 Message rejected: virus found ({name})")


class DeafScanner:
    """A scanner that takes connections and never reads from them (hung, or overloaded), keeping them open."""

    def __init__(self) -> None:
        self.connections: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> "DeafScanner":
        self.server = await asyncio.start_server(lambda _, writer: self.connections.append(writer), "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc) -> None:
        for writer in self.connections:
            writer.close()
        self.server.close()

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.mark.parametrize("scanner", [Spamd, Clamd])
async def test_a_scanner_that_stops_reading_keeps_no_connection_past_the_timeout(tmp_path, scanner):
    """The message is streamed until the peer stops taking it; at the timeout what is still unsent is dropped and
    the connection closed at once: a close that waited to send it kept the socket (and its buffer) as long as
    the peer kept it open, one per message scanned, until the server ran out of descriptors."""
    content = spooled(tmp_path, MESSAGE + b"z" * 20_000_000)  # past what the sockets' buffers take
    config = SpamdConfig if scanner is Spamd else ClamdConfig
    async with DeafScanner() as peer:
        result = await scanner(config(address=peer.address, timeout=0.5, size_limit=30_000_000)).check(content)
        assert result.failed.endswith(": timeout")
        await asyncio.sleep(0.2)
        assert len(peer.connections) == 1 and sockets_to(peer.port) == 0  # (the peer's side is held open)
