"""The delivery agents' content encoders (mailflow/transports/encode.py): chunk by chunk, the same bytes as the
whole-message rules they stream, wherever the chunk boundaries fall."""
from __future__ import annotations

import quopri
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailflow.transports.downgrade import Downgrade, downgrade_8bit
from mailflow.transports.encode import (MAX_HOLD, FinalNewline, SmtpData, ToLf, dot_quoting, encode, from_quoting,
                                        mboxrd_quoting)

# The rules as whole-message functions: what each encoder must produce.


def whole_smtp_data(content: bytes) -> bytes:
    content = re.sub(rb"\r\n|\n|\r(?!\n)", b"\r\n", content)
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    return re.sub(rb"(?m)^\.", b"..", whole_folding(content))


def whole_folding(content: bytes) -> bytes:
    """Postfix's smtp_line_length_limit = 998: a longer line goes out in pieces of 998 octets at most, each after
    the first begun with a space (CRLF SPACE inserted)."""
    return b"\r\n".join(b"\r\n".join([line[:998]] + [b" " + line[at:at + 997] for at in range(998, len(line), 997)])
                         for line in content.split(b"\r\n"))


def whole_mboxrd(text: bytes) -> bytes:
    return re.sub(rb"(?m)^(>*From )", rb">\1", text)


def whole_pipe_quoting(text: bytes) -> bytes:
    lines = text.split(b"\n")
    lines = [b">" + line if line.startswith(b"From ") else line for line in lines]
    return b"\n".join(b"." + line if line.startswith(b".") else line for line in lines)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


# Content built from the pieces that matter: line ends of every kind, dots, From_ lines, '>' runs.
pieces = st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"From ", b"From", b">", b">>>", b"x", b"hello ",
                          b"\xc3\xa9", b" ", b"F", b"r"])
contents = st.lists(pieces, max_size=60).map(b"".join)
cut_lists = st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)


@settings(max_examples=150, deadline=None)
@given(contents, cut_lists)
def test_smtp_data_is_the_whole_rule_whatever_the_chunks(content, cuts):
    assert b"".join(encode(split(content, cuts), SmtpData())) == whole_smtp_data(content)


long_pieces = st.sampled_from([b"\r\n", b"\n", b".", b"x", b"y" * 400, b"w" * 997, b"v" * 998, b"u" * 999])


@settings(max_examples=100, deadline=None)
@given(st.lists(long_pieces, max_size=30).map(b"".join), cut_lists)
def test_smtp_data_breaks_lines_over_998_octets_whatever_the_chunks(content, cuts):
    out = b"".join(encode(split(content, cuts), SmtpData()))
    assert out == whole_smtp_data(content)
    assert max(len(line) for line in out.split(b"\r\n")) <= 999  # 998, or 999 when a leading dot was doubled


@pytest.mark.parametrize("line, sent", [(b"X-Long: " + b"w" * 1519, [998, 530]), (b"x" * 1500, [998, 503]),
                                        (b"X-Long2: " + b"a" * 1500, [998, 512])])
def test_a_long_line_goes_out_as_postfix_sends_it(line, sent):
    """What Postfix 3.7.11 relayed for the same lines (smtp_line_length_limit = 998): 998 octets, then CRLF SPACE
    and the rest."""
    out = b"".join(encode([line + b"\r\n\r\nbody\r\n"], SmtpData(crlf=True)))
    assert [len(piece) for piece in out.split(b"\r\n")] == [*sent, 0, 4, 0]
    assert out.replace(b"\r\n ", b"") == line + b"\r\n\r\nbody\r\n"


@settings(max_examples=150, deadline=None)
@given(contents, cut_lists)
def test_lf_and_mboxrd_quoting_are_the_whole_rules_whatever_the_chunks(content, cuts):
    out = b"".join(encode(split(content, cuts), ToLf(), mboxrd_quoting()))
    assert out == whole_mboxrd(content.replace(b"\r\n", b"\n"))


@settings(max_examples=150, deadline=None)
@given(contents, cut_lists)
def test_pipe_quoting_is_the_whole_rule_whatever_the_chunks(content, cuts):
    out = b"".join(encode(split(content, cuts), ToLf(), from_quoting(), dot_quoting()))
    assert out == whole_pipe_quoting(content.replace(b"\r\n", b"\n"))


def test_a_long_run_of_greater_than_signs_is_not_held_back_whole():
    run = b">" * (MAX_HOLD * 100)
    quoting = mboxrd_quoting()
    sent = quoting.feed(run)
    assert len(sent) >= len(run) - 4  # only a possible "From" start waits
    assert sent + quoting.feed(b"From x\n") + quoting.flush() == b">" + run + b"From x\n"


def test_final_newline_only_when_missing():
    assert b"".join(encode([b"a\n", b"b"], FinalNewline())) == b"a\nb\n"
    assert b"".join(encode([b"a\n"], FinalNewline())) == b"a\n"
    assert b"".join(encode([], FinalNewline())) == b""


def test_smtp_data_of_nothing_is_one_empty_line():
    assert b"".join(encode([], SmtpData())) == b"\r\n"
    assert b"".join(encode([b".a\r\n..b\r\nc.\r\n.\r\n"], SmtpData())) == b"..a\r\n...b\r\nc.\r\n..\r\n"
    assert b"".join(encode([b"bare\nlf\rcr\r\nno end"], SmtpData())) == b"bare\r\nlf\r\ncr\r\nno end\r\n"


MIME = (b"Content-Type: multipart/mixed; boundary=\"b1\"\r\nContent-Transfer-Encoding: 8bit\r\n\r\npreamble\r\n"
        b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        b"caf\xc3\xa9 " + b"y" * 200 + b" end  \r\n.dot\r\n--b1\r\nContent-Type: message/rfc822\r\n\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\nna\xc3\xafve\r\n--b1--\r\nepilogue\r\n")


@settings(max_examples=100, deadline=None)
@given(cut_lists)
def test_the_7bit_conversion_streams_to_the_same_bytes(cuts):
    converter = Downgrade()
    out = b"".join(converter.feed(piece) for piece in split(MIME, cuts)) + converter.flush()
    assert out == downgrade_8bit(MIME)
    assert out.isascii()


def test_a_very_long_8bit_line_is_converted_in_pieces_with_soft_breaks():
    body = b"\xc3\xa9" * 100_000  # 200 KB without a line end
    message = b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body + b"\r\nnext\r\n"
    converter = Downgrade()
    out = b"".join(converter.feed(message[i:i + 4096]) for i in range(0, len(message), 4096)) + converter.flush()
    lines = out.split(b"\r\n")
    assert max(map(len, lines)) <= 76
    assert quopri.decodestring(out.split(b"\r\n\r\n", 1)[1]) == body + b"\r\nnext\r\n"
