"""8BITMIME to 7BIT conversion for peers without 8BITMIME (Postfix's MIME output conversion)."""
from __future__ import annotations

import email
import email.policy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailflow.content import Content
from mailflow.transports.downgrade import (MAX_HEADER, Downgrade, content_type_of, downgrade_8bit, entity_facts,
                                           labelled_8bit, labelled_domain, parse_headers, utf8_header_section)


def test_a_single_part_labelled_8bit_becomes_quoted_printable():
    message = (b"Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n"
               b"Content-Transfer-Encoding: 8BIT\r\n\r\nna\xc3\xafve = yes \r\n")
    assert downgrade_8bit(message) == (b"Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n"
                                       b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                                       b"na=C3=AFve =3D yes=20\r\n")


async def test_only_a_label_in_a_header_section_marks_a_message_8bit():
    """cleanup's marking reads the MIME structure as the conversion does: the words in a body are no label, a
    part's label is, and so is one split across the chunks the content is read in."""
    part = b"--b\r\nContent-Transfer-Encoding: 8bit\r\n\r\nx\r\n--b--\r\n"
    multipart = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    assert not await labelled_8bit(Content((b"Subject: x\r\n\r\nContent-Transfer-Encoding: 8bit\r\n",)))
    assert not await labelled_8bit(Content((b"Content-Transfer-Encoding: base64\r\n\r\nx\r\n",)))
    assert await labelled_8bit(Content((multipart, part)))
    assert await labelled_8bit(Content((multipart + part[:17], part[17:])))  # (cut in "Tran|sfer-")
    assert await labelled_8bit(Content((b"Content-Transfer-Encoding: 8bit (labelled)\r\n\r\nx\r\n",)))


async def test_a_message_of_one_entity_is_judged_by_its_header_and_any_case_of_the_field_name_counts():
    """cleanup gives its header block apart (the content begins with it; the empty line ending it begins the
    body): with no multipart or message Content-Type there is no part header to look for in the body, which is
    not read then; the field name in lower or upper case, or mixed by word, is the label all the same; a folded
    multipart Content-Type still has its parts read."""
    body = b"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n--b\r\nContent-Transfer-Encoding: 8bit\r\n\r\nx\r\n--b--\r\n"

    async def marked(header: bytes) -> bool:
        return await labelled_8bit(Content((header, body)), header=header)

    assert not await marked(b"Subject: one entity\r\n")
    for name in (b"content-transfer-encoding", b"CONTENT-TRANSFER-ENCODING", b"Content-transfer-Encoding"):
        assert await marked(b"Subject: x\r\n" + name + b": 8BIT\r\n")
    assert not await marked(b"Subject: x\r\ncontent-transfer-encoding: 7bit\r\n")
    assert await marked(b"content-type:\r\n\tMultipart/Mixed; boundary=b\r\n")
    assert await labelled_8bit(Content((b"Content-Type: message/rfc822\r\n",
                                        b"\r\nContent-Transfer-Encoding: binary\r\n\r\nx\r\n")),
                               header=b"Content-Type: message/rfc822\r\n")


async def test_a_part_s_label_with_blanks_before_its_colon_marks_the_message_and_is_converted():
    """Postfix's mime_state reads a part's `Content-Transfer-Encoding : 8bit` as the label (its cleanup marks the
    message BODY=8BITMIME, checked against Postfix 3.7.11: tests/interop/test_cleanup_content_vs_postfix.py); Python's
    header parser took the line for no field, and the message was not marked."""
    multipart = b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
    part = b"--b\r\nContent-Transfer-Encoding\t : 8bit\r\n\r\n\xe9\r\n--b--\r\n"
    assert await labelled_8bit(Content((multipart, part)), header=multipart[:-2])
    assert downgrade_8bit(multipart + part) == multipart + (b"--b\r\nContent-Transfer-Encoding: quoted-printable\r\n"
                                                           b"\r\n=E9\r\n--b--\r\n")


def test_a_folded_label_is_dropped_whole_and_the_new_one_ends_the_section_as_postfix_writes_it():
    message = b"Content-Transfer-Encoding:\r\n 8bit\r\nX-After: kept\r\n\r\n\xe9\r\n"
    assert downgrade_8bit(message) == (b"X-After: kept\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
                                       b"=E9\r\n")


@pytest.mark.parametrize("labels, written, body", [
    ([b"8bit", b"7bit"], [b"7bit"], b"\xe9"),  # (the last label Postfix's mime_state knows decides; a field read
    ([b"7bit", b"8bit"], [b"7bit", b"quoted-printable"], b"=E9"),  # while the entity is 8-bit is dropped)
    ([b"8bit", b"x-unknown"], [b"quoted-printable"], b"=E9"),
    ([b"base64", b"binary"], [b"base64", b"quoted-printable"], b"=E9"),
])
async def test_several_labels_are_read_and_written_as_postfixs_mime_state_does(labels, written, body):
    """Compared with a private Postfix 3.7.11 (tests/interop/test_8bitmime_vs_postfix.py, `labelled 7bit then
    8bit` ...): mailflow read the first label and replaced each."""
    head = b"Content-Type: text/plain\r\n" + b"".join(b"Content-Transfer-Encoding: %s\r\n" % label for label in labels)
    message = head + b"\r\n\xe9\r\n"
    assert downgrade_8bit(message) == (b"Content-Type: text/plain\r\n" + b"".join(
        b"Content-Transfer-Encoding: %s\r\n" % label for label in written) + b"\r\n" + body + b"\r\n")
    assert await labelled_8bit(Content((message,)), header=head)


_PART_AFTER_A_NON_FIELD = b"Content-Transfer-Encoding: 8bit\r\n\r\n\xe9\r\n"


@pytest.mark.parametrize("part, converted", [
    # a line that is no field ends the section where it stands (the label goes before it), the rest is body
    (b"Content-Type: message/rfc822\r\n\r\nFrom x@y Mon\r\n" + _PART_AFTER_A_NON_FIELD, None),
    (b" x\r\n" + _PART_AFTER_A_NON_FIELD, None),
    (b":x\r\n" + _PART_AFTER_A_NON_FIELD, None),
    (b"Content-Transfer-Encoding: 8bit\r\ngarbage line\r\nSubject: s\r\n\r\n\xe9\r\n",
     b"Content-Transfer-Encoding: quoted-printable\r\ngarbage line\r\nSubject: s\r\n\r\n=E9\r\n"),
])
def test_a_line_that_is_no_field_ends_the_header_section_for_the_label_as_for_the_parse(part, converted):
    """Postfix's mime_state ends a header section at the first line is_header() rejects (one that does not continue
    a field): its label, if any, goes before it, and labels after it are body (None: the part passes unchanged; as a
    private Postfix 3.7.11 sends each, tests/interop/test_8bitmime_vs_postfix.py). mailflow parsed past it and added
    its label after the last line: two labels, or one past the end of the section."""
    multipart = b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
    out = downgrade_8bit(multipart + b"--b\r\n" + part + b"--b--\r\n")
    assert out == multipart + b"--b\r\n" + (converted or part) + b"--b--\r\n"
    sections = [entity.split(b"\r\n\r\n", 1)[0] for entity in out.split(b"--b\r\n")[1:]]
    assert all(section.lower().count(b"content-transfer-encoding") <= 1 for section in sections)


def test_a_binary_label_and_a_label_with_a_comment_are_8bit_too():
    """Postfix's mime_state reads the label as a token (comments skipped) and puts binary in the 8-bit domain:
    a private Postfix 3.7.11 relaying to a peer without 8BITMIME converts both."""
    binary = b"Content-Transfer-Encoding: BINARY\r\n\r\nbin \xc3\xa4\r\n"
    commented = b"Content-Transfer-Encoding: 8bit (raw\r\n (text))\r\n\r\ncm \xc3\xa4\r\n"
    multipart = (b"Content-Type: multipart/mixed; boundary=b\r\nContent-Transfer-Encoding: binary\r\n\r\n"
                 b"--b\r\n\r\nx\r\n--b--\r\n")
    assert [downgrade_8bit(m) for m in (binary, commented, multipart)] == [
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\nbin =C3=A4\r\n",
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncm =C3=A4\r\n",
        multipart.replace(b"binary", b"7bit")]


def test_unlabelled_and_7bit_content_passes_byte_for_byte():
    unlabelled = b"Subject: caf\xc3\xa9\r\n\r\ncaf\xc3\xa9\r\n"  # Postfix sends these as they are
    seven_bit = b"Content-Transfer-Encoding: 7bit\r\n\r\nplain\r\n"
    base64 = b"Content-Transfer-Encoding: base64\r\n\r\nAAEC\r\n"
    assert [downgrade_8bit(m) for m in (unlabelled, seven_bit, base64)] == [unlabelled, seven_bit, base64]


def test_multipart_parts_are_converted_and_the_container_relabelled():
    message = (b"Content-Type: multipart/alternative; boundary=b1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
               b"pre\r\n--b1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\xc3\xa9\r\n"
               b"--b1 \r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n--b1--\r\nepi \xff\r\n")
    assert downgrade_8bit(message) == (
        b"Content-Type: multipart/alternative; boundary=b1\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
        b"pre\r\n--b1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=C3=A9\r\n"
        b"--b1 \r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n--b1--\r\nepi \xff\r\n")


def test_a_forwarded_message_is_converted_inside():
    inner = b"Subject: inner\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\xc3\xa9\r\n"
    message = (b"Content-Type: multipart/mixed; boundary=\"o\"\r\n\r\n--o\r\nContent-Type: message/rfc822\r\n"
               b"Content-Transfer-Encoding: 8bit\r\n\r\n" + inner + b"--o--\r\n")
    converted = downgrade_8bit(message)
    assert converted.isascii()
    assert b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 7bit\r\n" in converted
    assert b"Subject: inner\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=C3=A9\r\n--o--" in converted


def test_digest_parts_default_to_messages():
    message = (b"Content-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\n"
               b"Subject: one\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\xe9\r\n--d--\r\n")
    assert b"Subject: one\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=E9\r\n" in downgrade_8bit(message)


def test_a_missing_closing_boundary_still_converts_the_last_part():
    message = b"Content-Type: multipart/mixed; boundary=z\r\n\r\n--z\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\xe9\r\n"
    assert downgrade_8bit(message).endswith(b"--z\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=E9\r\n")


text_lines = st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
                              max_size=120), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(text_lines)
def test_conversion_is_7bit_and_decodes_to_the_original_text(lines):
    body = "\r\n".join(lines).encode() + b"\r\n"
    message = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + body
    converted = downgrade_8bit(message)
    assert converted.isascii()
    assert all(len(line) <= 78 for line in converted.split(b"\r\n"))
    parsed = email.message_from_bytes(converted, policy=email.policy.compat32)
    assert parsed.get_payload(decode=True) == body


def postfix_qp(line: bytes) -> bytes:
    """mime_state_downgrade's loop, character by character, for one line (without its line end)."""
    out, current = [], b""
    for byte in line:
        if len(current) > 72:
            out.append(current + b"=")
            current = b""
        current += b"=%02X" % byte if (byte < 32 and byte != 9) or byte == 61 or byte > 126 else bytes([byte])
    if current[-1:] in (b" ", b"\t"):
        current = current[:-1] + b"=%02X" % current[-1]
    return b"\r\n".join(out + [current])


HEAD = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
QP_HEAD = HEAD.replace(b"8bit", b"quoted-printable")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from([b"a", b"a", b"a", b" ", b"\t", b"=", b"\xc3\xa9", b"\x00", b"\x7f", b"~"]),
                         min_size=60, max_size=200).map(b"".join), max_size=6))
def test_lines_break_where_postfixs_mime_state_breaks_them(lines):
    body = b"".join(line + b"\r\n" for line in lines)
    assert downgrade_8bit(HEAD + body) == QP_HEAD + b"".join(postfix_qp(line) + b"\r\n" for line in lines)


def test_a_line_longer_than_the_line_buffer_is_encoded_as_one_line_whatever_the_chunks():
    """Past MAX_LINE a line is passed on in pieces; the soft breaks still fall where one pass over it puts them,
    also when a CR LF is split between two chunks."""
    line = ("ab\u00e9 = " * 30_000).encode()
    expected = QP_HEAD + postfix_qp(line) + b"\r\nend\r\n"
    for chunk in (len(line) + 200, 65_537, 4096, 1000):
        message = HEAD + line + b"\r\nend\r\n"
        converter = Downgrade()
        converted = b"".join(converter.feed(message[i:i + chunk]) for i in range(0, len(message), chunk))
        assert converted + converter.flush() == expected, chunk


async def test_a_big_mime_message_is_read_once_in_a_worker_thread(monkeypatch):
    """Past READ_INLINE the parts are parsed off the event loop (a MIME message almost always names
    Content-Transfer-Encoding somewhere, so it is parsed whole, in one pass); the label in its last part counts."""
    import mailflow.transports.downgrade as downgrade
    threads = []
    real = downgrade._parts_found
    monkeypatch.setattr(downgrade, "_parts_found", lambda chunks, fact: threads.append(1) or real(chunks, fact))
    header = b'Content-Type: multipart/mixed; boundary="b"\r\n'
    filler = b"--b\r\nContent-Transfer-Encoding: base64\r\n\r\n" + b"QUJD" * 19 + b"\r\n"
    body = b"\r\n" + filler * (downgrade.READ_INLINE // len(filler) + 1)
    last = b"--b\r\nContent-Transfer-Encoding: 8bit\r\n\r\nx\r\n--b--\r\n"
    assert await labelled_8bit(Content((header, body, last)), header=header)
    assert not await labelled_8bit(Content((header, body, b"--b--\r\n")), header=header)
    assert threads == [1, 1]


async def test_a_header_section_with_8bit_bytes_is_found_in_any_entity():
    """utf8_header_section: the message's own header fields, a MIME part's, an attached message's, one past the
    header section limit; not 8-bit bytes in a body (Postfix's cleanup flags SMTPUTF8_FLAG_HEADER per header)."""
    top = b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n'
    part = b"--b\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; filename=\"%s\"\r\n\r\n%s\r\n--b--\r\n"
    attached = (b"--b\r\nContent-Type: message/rfc822\r\n\r\nSubject: %s\r\n\r\n%s\r\n--b--\r\n")
    for rest, expected in ((part % (b"caf\xc3\xa9", b"x"), True), (part % (b"cafe", b"caf\xe9"), False),
                           (attached % (b"caf\xe9", b"x"), True), (attached % (b"cafe", b"caf\xe9"), False)):
        content = Content((top, b"\r\n" + rest))
        assert await utf8_header_section(content, header=top) is expected, rest
        assert await utf8_header_section(content) is expected, rest
    plain = b"Subject: caf\xc3\xa9\r\n"
    assert await utf8_header_section(Content((plain, b"\r\nbody\r\n")), header=plain)
    assert not await utf8_header_section(Content((b"Subject: x\r\n", b"\r\ncaf\xe9\r\n")), header=b"Subject: x\r\n")
    long_field = b"X-Long: " + b"a" * (MAX_HEADER + 10) + b"\xe9\r\n"
    assert await utf8_header_section(Content((top, b"\r\n--b\r\n" + long_field + b"\r\nx\r\n--b--\r\n")),
                                     header=top)


async def test_a_message_global_part_and_a_type_after_a_comment_are_read_within_as_postfix_reads_them():
    """Postfix's mime_state descends into message/global as into message/rfc822 (cleanup's flags), not into other
    message/* types, and reads `Content-Type: (c) multipart/mixed` as multipart/mixed (header_token): both were
    bodies here, so an 8-bit header field or label inside was missed."""
    top = b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n'
    attached = b"--b\r\nContent-Type: message/%s\r\n%s\r\nSubject: %s\r\n%s\r\nx\r\n--b--\r\n"
    label = b"Content-Transfer-Encoding: 8bit\r\n"
    for kind, outer_label, subject, expected in ((b"global", b"", b"caf\xc3\xa9", True),
                                                 (b"global", label, b"caf\xc3\xa9", True),
                                                 (b"global", b"", b"cafe", False),
                                                 (b"partial; id=1", b"", b"caf\xc3\xa9", False),
                                                 (b"external-body", b"", b"caf\xc3\xa9", False)):
        content = Content((top, b"\r\n" + attached % (kind, outer_label, subject, b"")))
        assert await utf8_header_section(content, header=top) is expected, (kind, outer_label)
    inner_label = Content((top, b"\r\n" + attached % (b"global", b"", b"x", label)))
    assert await labelled_8bit(inner_label, header=top)
    commented = b"MIME-Version: 1.0\r\nContent-Type: (c) multipart/mixed; boundary=b\r\n"
    part = b"\r\n--b\r\nContent-Type: text/plain; name=\"K\xc3\xb6ln\"\r\n%s\r\n\xe9\r\n--b--\r\n"
    assert await utf8_header_section(Content((commented, part % b"")), header=commented)
    assert await labelled_8bit(Content((commented, part % label)), header=commented)
    assert b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=E9\r\n" in downgrade_8bit(commented + part % label)


def test_the_conversion_reads_within_message_global_only_when_it_is_7bit_as_postfix_does():
    """With MIME_OPT_DOWNGRADE, Postfix's mime_state descends into a message/global entity in the 7-bit domain
    (its inner 8bit part converted); one labelled 8bit is a body: quoted-printable, as a leaf."""
    inner = b"Subject: inner\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\xc3\xa9\r\n"
    message = (b"Content-Type: multipart/mixed; boundary=o\r\n\r\n--o\r\nContent-Type: message/global\r\n%s\r\n"
               b"%s--o--\r\n")
    within = downgrade_8bit(message % (b"", inner))
    assert b"Subject: inner\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=C3=A9\r\n--o--" in within
    leaf = downgrade_8bit(message % (b"Content-Transfer-Encoding: 8bit\r\n", inner))
    assert (b"Content-Type: message/global\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
            b"Subject: inner\r\nContent-Transfer-Encoding: 8bit\r\n\r\n=C3=A9\r\n--o--") in leaf


# entity_facts skips the parse of a header section without a Content-* field: its answers are the parse's, whatever
# the section (fields in any case, blanks before the colon, folding, bare CR or LF line ends, garbage lines).
_HEADER_PIECES = [b"Content-Type: multipart/mixed; boundary=b", b"content-type : message/rfc822",
                  b"Content-Type: (c) multipart/mixed; boundary=c", b"Content-Type: message/global",
                  b"CONTENT-TRANSFER-ENCODING: 8bit", b"Content-Transfer-Encoding: (c) binary", b"Content-ID: <x>",
                  b"X-Content-Type: multipart/mixed; boundary=q", b"Subject: Content-Type: text/html", b" folded",
                  b"\tContent-Type: multipart/alternative; boundary=z", b"not a field", b"From x", b"X: \xe9t\xe9",
                  b"X: a\rContent-Type: multipart/mixed; boundary=r", b"", b"X: a\x0bContent-Type: text/html"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_HEADER_PIECES), st.sampled_from([b"\r\n", b"\n"])), max_size=6),
       st.sampled_from(["text/plain", "message/rfc822"]))
def test_entity_facts_are_the_parse_s(lines, default_type):
    header_lines = [text + end for text, end in lines]
    info = parse_headers(header_lines, default_type)
    content_type = content_type_of(info)
    parsed = (content_type, labelled_domain(info.get_all("content-transfer-encoding") or []),
              info.get_boundary() if content_type.startswith("multipart/") else None)
    assert entity_facts(header_lines, default_type) == parsed
