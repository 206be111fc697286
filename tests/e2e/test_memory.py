"""Bounded memory with a real `mailflow serve`: many concurrent big messages keep the server's peak RSS bounded
(content is spooled as it arrives and streamed to the mailbox), and every message arrives intact.

A load test (marked `load`, ~10-20 s): 30 sessions each send a 10 MB message at once to a local Maildir.
"""
from __future__ import annotations

import asyncio
import hashlib
import re

import pytest

from tests.support import ServerProcess, SmtpClient, eventually, free_port
from tests.support.raw import peak_rss_mb

SESSIONS = 30
SIZE = 10_000_000  # under the default message_size_limit (10 240 000)
PEAK_LIMIT_MB = 250  # of VmHWM; the whole-message code peaked near 1 GB here
LINE = b"X" * 78 + b"\r\n"
BLOCK = LINE * 800  # 64 KB of body lines; each chunk is a numbered line, then BLOCK
CHUNKS = SIZE // (len(BLOCK) + 13)


def chunk(message: int, n: int) -> bytes:
    return b"%04d %06d\r\n" % (message, n) + BLOCK


def expected_body_digest(message: int) -> str:
    """The body as the Maildir file has it (LF line ends)."""
    digest = hashlib.sha256()
    block = BLOCK.replace(b"\r\n", b"\n")
    for n in range(CHUNKS):
        digest.update(b"%04d %06d\n" % (message, n) + block)
    return digest.hexdigest()


async def send_big(port: int, message: int) -> None:
    """One session, one 10 MB message written chunk by chunk (the test holds no message whole either)."""
    client = await SmtpClient.connect(port, timeout=60)
    try:
        for command, code in (("EHLO load.test", 250), ("MAIL FROM:<load@remote.test>", 250),
                              ("RCPT TO:<alice@local.test>", 250), ("DATA", 354)):
            reply = await client.cmd(command, timeout=60)
            assert reply.code == code, reply
        await client.send(b"Subject: big %d\r\nX-Load-Id: %d\r\n\r\n" % (message, message))
        for n in range(CHUNKS):
            await client.send(chunk(message, n))
        reply = await client.cmd(".", timeout=60)
        assert reply.code == 250, reply
        await client.send(b"QUIT\r\n")
    finally:
        await client.close()


def delivered_digests(new) -> dict[int, str]:
    """X-Load-Id -> sha256 of the body, for each Maildir file (read in pieces)."""
    out = {}
    for path in new.iterdir():
        with open(path, "rb") as f:
            head = b""
            while b"\n\n" not in head:
                head += f.read(65536)
            head, first = head.split(b"\n\n", 1)
            digest = hashlib.sha256(first)
            while data := f.read(1 << 20):
                digest.update(data)
        out[int(re.search(rb"\nX-Load-Id: (\d+)\n", head).group(1))] = digest.hexdigest()
    return out


@pytest.mark.load
@pytest.mark.timeout(120)
async def test_thirty_concurrent_ten_megabyte_messages_keep_the_server_small(tmp_path, write_config):
    port = free_port()
    config = write_config(tmp_path / "mailflow.toml", smtpd={"listen": [f"127.0.0.1:{port}"]},
                          log={"level": "warning"})
    server = ServerProcess(config, tmp_path / "server.log", port)
    await server.start()
    new = tmp_path / "mail" / "alice" / "Maildir" / "new"
    try:
        await asyncio.gather(*(send_big(port, i) for i in range(SESSIONS)))
        await eventually(lambda: new.is_dir() and len(list(new.iterdir())) == SESSIONS, timeout=60, step=0.2)
        peak = peak_rss_mb(server.proc.pid)
    finally:
        server.kill()
    assert delivered_digests(new) == {i: expected_body_digest(i) for i in range(SESSIONS)}
    assert peak < PEAK_LIMIT_MB, f"peak RSS {peak:.0f} MB"
