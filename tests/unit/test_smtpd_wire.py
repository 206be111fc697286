"""smtpd's input buffer (mailflow/stages/smtpd/wire.py) on its own: what the protocol feeds it, its flow control,
and the DATA scanning shortcut (`_line_dot`: hopping from dot to dot with memchr finds exactly what one search for
CRLF "." finds, wherever the dots, line ends and bounds fall). The protocol rules are tested through real sessions
(tests/component/test_smtpd_*.py)."""
from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, strategies as st

from mailflow.content import Spool
from mailflow.stages.smtpd.wire import DOT_HOPS, HIGH_WATER, Wire, _line_dot

PIECES = [b"\r\n", b".", b"\r\n.", b"\r", b"\n", b"x", b"ab.cd", b"\r\n.\r\n", b"."]


@given(st.lists(st.sampled_from(PIECES), max_size=3 * DOT_HOPS), st.integers(0, 200), st.integers(0, 200))
def test_line_dot_is_the_search_for_crlf_dot(pieces, a, b):
    buf = bytearray(b"".join(pieces))
    pos, end = sorted((a % (len(buf) + 1), b % (len(buf) + 1)))
    assert _line_dot(buf, pos, end) == buf.find(b"\r\n.", pos, end)


def test_many_dots_before_the_line_dot_still_find_it():
    buf = bytearray(b"a." * (DOT_HOPS * 3) + b"\r\n.x")
    assert _line_dot(buf, 0, len(buf)) == len(buf) - 4


async def test_the_transport_is_paused_past_the_high_water_mark_and_resumed_when_a_reader_needs_more(tmp_path):
    switches: list[bool] = []
    received: list[int] = []
    wire = Wire("mx.test", received.append, reading=switches.append)
    line = b"x" * 998 + b"\r\n"
    while sum(received) <= HIGH_WATER:
        wire.feed(line)
    assert switches == [False] and sum(received) > HIGH_WATER  # paused once, however much more is fed
    wire.feed(line)
    assert switches == [False]
    while wire.pending():  # the lines already received are read without resuming
        await wire.read_line(1000)
    assert switches == [False]
    reader = asyncio.ensure_future(wire.read_line(1000))
    await asyncio.sleep(0)
    assert switches == [False, True]  # the reader wants more: reading resumes
    wire.feed(b"QUIT\r\n")
    assert await reader == b"QUIT"


async def test_end_of_input_ends_every_read():
    wire = Wire("mx.test")
    wire.feed(b"PROXY TCP4")
    wire.feed_eof()
    with pytest.raises(asyncio.IncompleteReadError):
        await wire.readexactly(12)
    with pytest.raises(ConnectionResetError):
        await wire.read_data(Spool("/nonexistent", memory_limit=1 << 20))
    failed = Wire("mx.test")
    failed.feed_eof(TimeoutError("lost"))
    with pytest.raises(TimeoutError):
        await failed.read_line(100)


class CountingSpool(Spool):
    """A spool that counts the pieces it is given."""

    def __init__(self) -> None:
        super().__init__("/nonexistent", memory_limit=1 << 30)
        self.pieces = 0

    def append(self, data) -> None:
        self.pieces += 1
        super().append(data)


@pytest.mark.parametrize("line", [b"..", b"..x", b".."*40], ids=["dot", "dot-x", "long"])
async def test_text_full_of_dotted_lines_is_unstuffed_in_bulk_not_line_by_line(line):
    """A client can send a message of nothing but dot-stuffed lines: each one must not cost a step of Python
    (2.4 million of them took 1.75 s of the event loop, 60 times a plain message of the same size)."""
    wire = Wire("mx.test")
    spool = CountingSpool()
    lines = 20_000
    wire.feed(b"Subject: dots\r\n\r\n" + (line + b"\r\n") * lines + b"..\r\n.\r\nQUIT\r\n")
    assert await wire.read_data(spool) is None
    assert spool.pieces < 100  # one piece per dotted line before
    content = (await spool.finish()).to_bytes()
    assert content == b"Subject: dots\r\n\r\n" + (line[1:] + b"\r\n") * lines + b".\r\n"
    assert await wire.read_line(100) == b"QUIT"


LINES = [b"", b"x", b".", b"..", b"...", b".x", b"..x", b"a.b", b"x" * 70]


@given(st.lists(st.sampled_from(LINES[1:]) | st.just(b""), max_size=80), st.lists(st.integers(1, 400), max_size=8),
       st.booleans())
async def test_dot_unstuffing_is_exact_wherever_the_reads_fall(lines, cuts, many_dots):
    """Reading DATA gives back each line without its stuffed dot, one by one or in bulk past
    STUFFED_ONE_BY_ONE dotted lines, however the input is split; what follows the terminator stays."""
    lines = [b"..y"] * (40 if many_dots else 0) + [line for line in lines if line != b"."]
    sent = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\nNOOP\r\n"
    wire = Wire("mx.test")
    spool = Spool("/nonexistent", memory_limit=1 << 30)
    reader = asyncio.ensure_future(wire.read_data(spool))
    at = 0
    for cut in cuts + [len(sent)]:
        wire.feed(sent[at:at + cut])
        at += cut
        await asyncio.sleep(0)
    wire.feed(sent[at:])
    assert await reader is None
    assert (await spool.finish()).to_bytes() == b"".join(line + b"\r\n" for line in lines)
    assert await wire.read_line(100) == b"NOOP"
