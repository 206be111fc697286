"""smtpd's DATA scanning shortcut (mailflow/stages/smtpd/wire.py `_line_dot`): hopping from dot to dot with memchr
finds exactly what one search for CRLF "." finds, wherever the dots, line ends and bounds fall."""
from __future__ import annotations

from hypothesis import given, strategies as st

from mailflow.stages.smtpd.wire import DOT_HOPS, _line_dot

PIECES = [b"\r\n", b".", b"\r\n.", b"\r", b"\n", b"x", b"ab.cd", b"\r\n.\r\n", b"."]


@given(st.lists(st.sampled_from(PIECES), max_size=3 * DOT_HOPS), st.integers(0, 200), st.integers(0, 200))
def test_line_dot_is_the_search_for_crlf_dot(pieces, a, b):
    buf = bytearray(b"".join(pieces))
    pos, end = sorted((a % (len(buf) + 1), b % (len(buf) + 1)))
    assert _line_dot(buf, pos, end) == buf.find(b"\r\n.", pos, end)


def test_many_dots_before_the_line_dot_still_find_it():
    buf = bytearray(b"a." * (DOT_HOPS * 3) + b"\r\n.x")
    assert _line_dot(buf, 0, len(buf)) == len(buf) - 4
