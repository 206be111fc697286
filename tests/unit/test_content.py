"""mailflow.content: Content derived without copies and read in bounded chunks; Spool keeps small messages in
memory, big ones in a file, stops keeping past its limit or when it cannot write, and leaves nothing behind."""
from __future__ import annotations

import asyncio
import errno
import os

import pytest

from mailflow import status
from mailflow.content import CHUNK, MEMORY_LIMIT, Content, FilePart, Spool, Truncated
from mailflow.stages.smtpd.wire import refusal


async def spooled(spool: Spool, data: bytes, piece: int = 50_000) -> None:
    for i in range(0, len(data), piece):
        spool.append(memoryview(data)[i:i + piece])
        await spool.drain()


async def test_a_small_message_stays_in_memory(tmp_path):
    spool = Spool(tmp_path)
    await spooled(spool, b"x" * MEMORY_LIMIT)
    content = await spool.finish()
    assert content.in_memory and content.to_bytes() == b"x" * MEMORY_LIMIT
    assert list(tmp_path.iterdir()) == []


async def test_a_big_message_goes_to_a_file_removed_by_discard(tmp_path):
    data = bytes(range(256)) * 5000  # 1.28 MB
    spool = Spool(tmp_path)
    await spooled(spool, data)
    content = await spool.finish()
    [path] = tmp_path.iterdir()
    assert path.name.startswith(".spool-") and not content.in_memory
    assert content.to_bytes() == data and content.size == len(data)
    assert max(len(c) for c in content.chunks()) <= CHUNK
    assert b"".join([c async for c in content.stream()]) == data
    spool.discard()
    spool.discard()
    assert list(tmp_path.iterdir()) == []


async def test_past_its_limit_a_spool_only_counts(tmp_path):
    spool = Spool(tmp_path, max_size=1_000_000)
    await spooled(spool, b"y" * 3_000_000)
    assert spool.exceeded and not spool.keeping and spool.size == 3_000_000
    assert list(tmp_path.iterdir()) == []  # the file went as soon as the limit was passed
    assert refusal(spool, nul=False) == status.MESSAGE_TOO_BIG


async def test_a_spool_that_cannot_write_keeps_reading_and_is_refused_451(tmp_path):
    spool = Spool(tmp_path / "missing")
    await spooled(spool, b"z" * 1_000_000)  # never raises: the client's data must still be read to its end
    assert isinstance(spool.failure, FileNotFoundError) and not spool.keeping
    assert refusal(spool, nul=False) == status.QUEUE_ERROR
    spool.failure = OSError(errno.ENOSPC, "No space left on device")
    assert refusal(spool, nul=False) == status.QUEUE_FULL


async def test_discard_while_a_block_is_being_written_is_safe(tmp_path):
    spool = Spool(tmp_path)
    spool.append(b"w" * (MEMORY_LIMIT * 3))
    writing = asyncio.ensure_future(spool.drain())
    await asyncio.sleep(0)
    writing.cancel()
    spool.discard()  # closes its descriptor at once; the writer thread uses a duplicate
    await asyncio.gather(writing, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_default_executor()  # the writer thread has finished
    assert list(tmp_path.iterdir()) == []


def test_derived_contents_share_the_bytes_and_files(tmp_path):
    path = tmp_path / "body"
    path.write_bytes(b"0123456789" * 10)
    content = Content((b"Head: 1\r\n", FilePart(str(path), 10, 90)))
    assert content.size == 99
    fuller = content.prepend(b"Delivered-To: a@b\r\n")
    assert fuller.parts[1] is content.parts[0] and fuller.size == 99 + 19
    rest = fuller.after(19 + 4)
    assert rest.to_bytes() == b": 1\r\n" + b"0123456789" * 9
    assert rest.after(5).parts == (FilePart(str(path), 10, 90),)
    assert rest.after(6).parts == (FilePart(str(path), 11, 89),)
    assert fuller.read_prefix(30) == (b"Delivered-To: a@b\r\nHead: 1\r\n0123456789" * 1)[:30]
    assert Content((b"", b"x", b"")).parts == (b"x",)


def test_a_file_shorter_than_its_part_is_truncated(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(b"abc")
    content = Content((FilePart(str(path), 0, 10),))
    with pytest.raises(Truncated):
        content.to_bytes()
    with pytest.raises(Truncated):
        content.read_prefix(10)


def test_held_content_reads_its_files_through_descriptors_opened_once_and_closes_them(tmp_path):
    """Content.held: the file parts read through descriptors opened on entry (the file may then go: a child that
    switched to a user who cannot open it reads the same bytes), each file once, all closed on exit."""
    path = tmp_path / "spool"
    path.write_bytes(b"0123456789" * 20_000)
    content = Content((b"head\n", FilePart(str(path), 10, 150_000), FilePart(str(path), 0, 5)))
    with content.held() as held:
        assert len(held.descriptors) == 1
        path.unlink()  # (opening by path would fail now)
        assert b"".join(held.content.chunks(1000)) == b"head\n" + (b"0123456789" * 20_000)[10:150_010] + b"01234"
        assert held.content.after(20).read_prefix(3) == b"567"
        assert asyncio.run(_collect(held.content.before(8))) == b"head\n012"
    for fd in held.descriptors:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_held_content_of_a_missing_file_raises_and_leaves_nothing_open(tmp_path):
    (tmp_path / "there").write_bytes(b"x" * 10)
    content = Content((FilePart(str(tmp_path / "there"), 0, 10), FilePart(str(tmp_path / "gone"), 0, 10)))
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(FileNotFoundError):
        with content.held():
            pass
    assert len(os.listdir("/proc/self/fd")) == before


async def _collect(content: Content) -> bytes:
    return b"".join([chunk async for chunk in content.stream(3)])
