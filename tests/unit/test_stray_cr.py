"""mailflow.stray_cr: a stray CR mended as Postfix 3.7.11 stores it, checked against a private Postfix's (the
expected contents below are what it relayed: tests/interop/test_bdat_vs_postfix.py keeps the comparison)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailflow.stray_cr import StrayCr

A = b"a" * 2047


def mended(pieces: list[bytes], limit: int = 2048) -> bytes:
    mender = StrayCr(limit)
    out = []
    for piece in pieces:
        got = mender.feed(bytearray(piece), len(piece))
        out.append(piece if got is None else got)
    return b"".join(out) + mender.end()


LINES = [

    (b"a\r\r\n", b"a\r\n"),  # every CR before the LF dropped
    (b"a\r \r\n", b"a  \r\n"),
    (b"a\rb\r\n", b"a b\r\n"),
    (b"Subject: x\rBcc: y\r\n", b"Subject: x Bcc: y\r\n"),
    (b"\r\r\n", b"\r\n"),  # the header/body blank line
    (b"\rbody\r\n", b" body\r\n"),
    (A + b"\r\r\n", A + b" \r\n"),  # the first CR ended a full record (2048 octets): a space
    (b"a" * 2046 + b"\r\r\r\n", b"a" * 2046 + b"  \r\n"),
    (A + b"\r\n", A + b"\r\n"),  # a full record's CR and the LF after it end the line together
    (b"a" * 2048 + b"\r\r\n", b"a" * 2048 + b"\r\n"),
    (A + b"\rb\r\n", A + b" b\r\n"),
    (b"abc\r", b"abc "), (b"abc\r\r", b"abc  "),  # the content's end
]


@pytest.mark.parametrize("sent, stored", LINES)
def test_a_stray_cr_is_stored_as_postfix_stores_it(sent, stored):
    assert mended([sent]) == stored
    assert mended([bytes([byte]) for byte in sent]) == stored  # (whatever the pieces)


def test_many_lines_in_one_piece_are_mended_each_as_alone():
    """(the lines between a piece's first and last LF are mended at once when none spans records)"""
    whole = [(sent, stored) for sent, stored in LINES if sent.endswith(b"\n")]
    short = [(sent, stored) for sent, stored in whole if len(sent) < 2048]
    for lines in (short, whole):
        assert mended([b"".join(sent for sent, _ in lines) * 3]) == b"".join(stored for _, stored in lines) * 3


def test_only_the_lines_spanning_records_are_mended_one_by_one(monkeypatch):
    """(a line of a record or more among many short ones: the short ones are mended at once, at C speed; it was a
    Python call for each line of the piece, 2.8 s of the loop for 10 MB)"""
    calls = []
    one_by_one = StrayCr._line
    monkeypatch.setattr(StrayCr, "_line", lambda mender, text: calls.append(len(text)) or one_by_one(mender, text))
    long = b"y" * 2048 + b"\r\r\n"
    sent = b"\r\n" + (long + b"a\r\r\n" + b"\n" * 4000) * 2 + long + b"\rz"
    assert mended([sent]) == b"\r\n" + (b"y" * 2048 + b"\r\na\r\n" + b"\r\n" * 4000) * 2 + b"y" * 2048 + b"\r\n z"
    assert calls == [1] + [2050] * 3  # the first line (it may go on a line begun before) and the long ones


def test_content_without_a_stray_cr_goes_on_as_it_is():
    """(no copy: None); a mended piece has its line ends CRLF, a bare LF too."""
    mender = StrayCr()
    assert [mender.feed(bytearray(piece), len(piece)) for piece in (b"a\r\nb\nc", b"d\r", b"\ne\nf\r\n")] == [
        None, b"d", b"\r\ne\r\nf\r\n"]  # (a CR ending a piece is held: a LF may follow)
    assert mender.end() == b""


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"aaa", b"\r", b"\n", b"\r\n", b" "]), max_size=40),
       st.lists(st.integers(1, 12), max_size=8))
def test_the_pieces_the_content_comes_in_change_nothing(parts, cuts):
    sent = b"".join(parts)
    pieces, at = [], 0
    for cut in cuts:
        pieces.append(sent[at:at + cut])
        at += cut
    pieces.append(sent[at:])
    crlf = mended(pieces, limit=4).replace(b"\r\n", b"\n")  # (a mended piece's bare LF is written CRLF)
    assert crlf == mended([sent], limit=4).replace(b"\r\n", b"\n")
