"""cleanup (mailflow.stages.cleanup) and the header helpers it uses (mailflow.message), and `Cleanup.submit`
against a recording store."""
from __future__ import annotations

import dataclasses
import logging
import random

import pytest

from mailflow.content import Content
from mailflow import message
from mailflow.errors import PermanentError
from mailflow.logs import MailLog
from mailflow.message import header_names, header_value, read_header, rfc5322_date, split_header
from mailflow.model import ClientInfo, Envelope, LocalUser, Recipient, Submission
from mailflow.stages.cleanup import Cleanup, QueueIdGenerator
from mailflow.transports import downgrade
from mailflow.store import NewMessage

NOW = 1_700_000_000.25  # 2023-11-14T22:13:20.25Z
HOST = "mx.example.test"

# ---------------------------------------------------------------------------------------------- split_header


@pytest.mark.parametrize("content, head, rest", [
    (b"Subject: x\r\n\r\nbody\r\n", b"Subject: x\r\n", b"\r\nbody\r\n"),
    (b"A: 1\r\nB: 2\r\n\r\n\r\nbody\r\n\r\n", b"A: 1\r\nB: 2\r\n", b"\r\n\r\nbody\r\n\r\n"),
    (b"Subject: x\r\n\r\n", b"Subject: x\r\n", b"\r\n"),
    (b"Subject: x\r\n", b"Subject: x\r\n", b""),  # no body at all
    (b"Subject: x", b"Subject: x\r\n", b""),  # no final CRLF: one is supplied
    (b"\r\nbody only\r\n", b"", b"\r\nbody only\r\n"),  # empty header section
    (b"", b"", b""),
    (b"Subject: a\r\n folded\r\n\r\nb", b"Subject: a\r\n folded\r\n", b"\r\nb"),
    (b"Subject: x\n\nbody\n", b"Subject: x\n", b"\nbody\n"),  # bare LF line ends
    (b"Subject: x\r\n\nbody", b"Subject: x\r\n", b"\nbody"),
    (b"Subject: x\n\r\nbody", b"Subject: x\n", b"\r\nbody"),
    (b"\nbody", b"", b"\nbody"),
    (b"Subject: x\n", b"Subject: x\n", b""),
    # the header section ends at the first line that is no header field (Postfix's is_header)
    (b"Subject: x\r\nbody text\r\n\r\nmore\r\n", b"Subject: x\r\n", b"body text\r\n\r\nmore\r\n"),
    (b"From: a\r\nnot a header line\r\nSubject: late\r\n\r\nb\r\n", b"From: a\r\n",
     b"not a header line\r\nSubject: late\r\n\r\nb\r\n"),
    (b"X-Spaced :  v\r\n\r\nb", b"X-Spaced :  v\r\n", b"\r\nb"),
    (b" leading blank\r\nA: 1\r\n\r\n", b"", b" leading blank\r\nA: 1\r\n\r\n"),
    (b"From someone@example.test Mon Dec  1\r\nA: 1\r\n", b"", b"From someone@example.test Mon Dec  1\r\nA: 1\r\n"),
    (b"Subject: x\r\nbody without line end", b"Subject: x\r\n", b"body without line end"),
])
def test_split_header(content, head, rest):
    assert split_header(content) == (head, rest)


def test_split_header_halves_join_back_when_the_content_has_a_body():
    content = b"From: a@b\r\nTo: c@d\r\n\r\nline 1\r\n\r\nline 3\r\n"
    head, rest = split_header(content)
    assert head + rest == content


# ---------------------------------------------------------------------------------------------- header_names / value

HEAD = (
    b"Received: from a\r\n"
    b"\tby b; Tue, 1 Jan 2030 00:00:00 +0000\r\n"
    b"received: from c\r\n"
    b"Subject: first part\r\n"
    b"  second part\r\n"
    b"\tthird part\r\n"
    b"X-Empty:\r\n"
    b"X-Spaced :  v  \r\n"
    b"not a header line\r\n"
    b"Message-ID: <id@example.test>\r\n"
    b"Subject: second subject\r\n"
)


LONG = 200_000  # past the limit below (which must leave room for Postfix's line_length_limit, 2048)
LIMIT = 5000


@pytest.mark.parametrize("content, head", [
    (b"a" * LONG + b"\r\n", b""),  # no colon in its first 2048 bytes: body, as Postfix's is_header says
    (b"To: x@y.test\r\n" + b"[" + b"7," * LONG + b"0]\r\n", b"To: x@y.test\r\n"),
    (b"To: x@y.test\r\n" + b"a b" * LONG + b"\r\n", b"To: x@y.test\r\n"),  # no field's name has a blank inside
    (b"Subject: " + b"a" * LONG + b"\r\n\r\nbody\r\n", None),  # a field too long
    (b"Subject: x\r\n " + b"a" * LONG + b"\r\n", None),  # a continuation line too long
    (b"X-A: 1\r\n" * 20000 + b"\r\nbody\r\n", None),  # fields past the limit
    (b"X-A: 1\r\n" * 624 + b"X-Long: v\r\n", None),  # a field cut at the limit, its colon not read yet
    # Postfix's is_header (mime_state, Postfix 3.7.11's postcat): a first line that starts with a blank continues
    # no field, so it is body however long; a colon past the line's first 2048 bytes makes no field; a line of
    # name characters that runs past the limit is body once 2048 of its bytes show no colon
    (b" " + b"a" * LONG + b"\r\n", b""),
    (b"\t" + b"a" * LONG + b"\r\nTo: x@y.test\r\n", b""),
    (b"X" * 3000 + b": y\r\n\r\nbody\r\n", b""),
    (b"To: x@y.test\r\n" + b"X" * 3000 + b": y\r\n", b"To: x@y.test\r\n"),
    (b"X-A: 1\r\n" * 600 + b"X" * 2100 + b"\r\n", b"X-A: 1\r\n" * 600),
    (b"X-A: 1\r\n" * 600 + b"X" * 2046 + b": y\r\n", None),  # (a field: its colon within 2048 bytes)
])
def test_a_long_first_body_line_ends_the_header_section_but_a_long_field_is_too_big(content, head):
    """cleanup took a first body line longer than header_size_limit (no header field) for an endless header section
    and refused the message 5.3.4: `sendmail user < report.log` bounced."""
    assert read_header(Content((content,)), LIMIT) == ((head, True) if head is not None else (content[:LIMIT], False))


@pytest.mark.parametrize("content", [b"Subject: " + b"a" * LONG + b"\r\n\r\nbody\r\n",
                                     b"X-A: 1\r\n" * 600 + b"X" * 2100 + b"\r\n", b"X-A: 1\r\n" * 20000])
def test_read_header_scans_each_read_for_the_fields_end_once(content, monkeypatch):
    """An oversized header section's last read (limit + 2 + LINE_LENGTH bytes) was scanned for the fields' end four
    times (header_end, then header_fits' own two)."""
    class Counting:
        def __init__(self, pattern):
            self.pattern, self.scans = pattern, 0

        def match(self, data, *args):
            self.scans += 1
            return self.pattern.match(data, *args)

    counting = Counting(message._FIELDS)
    monkeypatch.setattr(message, "_FIELDS", counting)
    reads = []

    class Recording(Content):
        def read_prefix(self, n):
            reads.append(n)
            return super().read_prefix(n)

    read_header(Recording((content,)), LIMIT)
    assert counting.scans == len(reads)


def test_header_names_lower_case_in_order_skipping_continuations():
    assert header_names(HEAD) == ["received", "received", "subject", "x-empty", "x-spaced", "message-id",
                                  "subject"]


def test_header_names_of_nothing():
    assert header_names(b"") == []


@pytest.mark.parametrize("name, value", [
    ("subject", "first part second part third part"),  # unfolded, the first one
    ("message-id", "<id@example.test>"),
    ("x-empty", ""),
    ("x-spaced", "v"),
    ("received", "from a by b; Tue, 1 Jan 2030 00:00:00 +0000"),
    ("x-missing", ""),
])
def test_header_value(name, value):
    assert header_value(HEAD, name) == value


def test_header_value_does_not_match_a_continuation_line_that_looks_like_a_header():
    head = b"X-A: one\r\n Subject: not really\r\n"
    assert header_value(head, "subject") == ""
    assert header_value(head, "x-a") == "one Subject: not really"


def test_header_value_name_is_case_insensitive():
    assert header_value(HEAD, "Message-ID") == "<id@example.test>"


# ---------------------------------------------------------------------------------------------- queue ids


class FixedClock:
    def __init__(self, now: float = NOW):
        self.now = now

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:  # pragma: no cover - cleanup never sleeps
        raise AssertionError("cleanup should not sleep")


def test_queue_ids_unique_and_increasing_with_a_frozen_clock():
    ids = QueueIdGenerator(FixedClock(), random.Random(1))
    got = [ids.next() for _ in range(1000)]
    assert len(set(got)) == 1000
    assert got == sorted(got)
    assert all(len(q) == 16 and q == q.upper() and int(q, 16) >= 0 for q in got)


def test_queue_ids_keep_increasing_when_the_clock_goes_back():
    clock = FixedClock()
    ids = QueueIdGenerator(clock, random.Random(1))
    first = ids.next()
    clock.now -= 60
    assert ids.next() > first


def test_queue_ids_stay_ordered_across_the_40_bit_wrap():
    wrap = 2**40 / 1_000_000  # seconds
    clock = FixedClock(wrap * 1546 - 0.5)  # half a second before a wrap, in our own decade
    ids = QueueIdGenerator(clock, random.Random(1))
    before = ids.next()
    clock.now += 1.0
    assert ids.next() > before


# ---------------------------------------------------------------------------------------------- Cleanup.submit


class RecordingStore:
    """Implements the one Store method cleanup uses: `async insert(NewMessage)`. It keeps each message with
    its content as bytes, and the Content itself in `contents`."""

    def __init__(self):
        self.inserted: list[NewMessage] = []
        self.contents: list[Content] = []

    async def insert(self, msg: NewMessage) -> None:
        self.contents.append(msg.content)
        self.inserted.append(dataclasses.replace(msg, content=msg.content.to_bytes()))


@pytest.fixture
def env():
    class Env:
        store = RecordingStore()
        clock = FixedClock()
        woken = 0

        def wake(self):
            Env.woken += 1

    e = Env()
    e.cleanup = Cleanup(e.store, myhostname=HOST, clock=e.clock, rng=random.Random(7), log=MailLog(),
                        on_queued=e.wake)
    return e


def submission(content: bytes, *recipients: str, sender: str = "alice@remote.test") -> Submission:
    return Submission(
        envelope=Envelope(sender, recipients or ("bob@example.test",)),
        content=Content.of(content),
        client=ClientInfo(addr="192.0.2.7", port=40000, helo="client.remote.test", hostname="client.remote.test"),
    )


FULL = (
    b"From: Alice <alice@remote.test>\r\n"
    b"To: bob@example.test\r\n"
    b"Date: Tue, 14 Nov 2023 22:00:00 +0000\r\n"
    b"Message-ID: <orig@remote.test>\r\n"
    b"Subject: hi\r\n"
    b"\r\n"
)
BODY = b"body line\r\n\r\n.leading dot\r\nFrom: not a header\r\n\x00\xff 8-bit \xc3\xa9\r\n  trailing  \r\n"


async def test_submit_prepends_received_with_queue_id_and_for_clause(env):
    qid = await env.cleanup.submit(submission(FULL + BODY))
    [msg] = env.store.inserted
    assert msg.queue_id == qid
    first_header = msg.content.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[:3]
    assert first_header == [
        b"Received: from client.remote.test (client.remote.test [192.0.2.7])",
        f"\tby {HOST} (mailflow) with ESMTP id {qid}".encode(),
        b"\tfor <bob@example.test>;",
    ]
    assert header_value(split_header(msg.content)[0], "received").endswith(rfc5322_date(NOW))
    assert env.woken == 1


@pytest.mark.parametrize("addr, helo, hostname, received", [
    ("2001:db8::7", "client.remote.test", "unknown", b"Received: from client.remote.test (unknown [IPv6:2001:db8::7])"),
    ("192.0.2.7", "", "localhost", b"Received: from localhost (localhost [192.0.2.7])"),
    ("::1", "", "unknown", b"Received: from unknown (unknown [IPv6:::1])"),
])
async def test_received_names_the_client_as_postfixs_smtpd_does(env, addr, helo, hostname, received):
    """An IPv6 address behind RFC 5321's `IPv6:` tag (Postfix's rfc_addr); no HELO: the client's name in its place
    (smtpd.c: `helo_name ? helo_name : name`)."""
    sub = submission(FULL + BODY)
    sub = dataclasses.replace(sub, client=ClientInfo(addr=addr, port=40000, helo=helo, hostname=hostname))
    await env.cleanup.submit(sub)
    assert env.store.inserted[0].content.split(b"\r\n", 1)[0] == received


async def test_submit_with_several_recipients_has_no_for_clause(env):
    await env.cleanup.submit(submission(FULL + BODY, "a@example.test", "b@example.test"))
    head = split_header(env.store.inserted[0].content)[0]
    received = header_value(head, "received")
    assert "for <" not in received
    assert received.startswith("from client.remote.test")


async def test_submit_keeps_headers_that_are_present_and_the_body_byte_for_byte(env):
    qid = await env.cleanup.submit(submission(FULL + BODY))
    msg = env.store.inserted[0]
    head, rest = split_header(msg.content)
    assert rest == b"\r\n" + BODY
    assert msg.content.endswith(FULL + BODY)
    names = header_names(head)
    assert names.count("message-id") == names.count("date") == names.count("from") == 1
    assert header_value(head, "message-id") == "<orig@remote.test>"
    assert (msg.sender, msg.arrival, msg.client) == ("alice@remote.test", NOW, "client.remote.test[192.0.2.7]")
    assert msg.recipients == (Recipient(0, "bob@example.test", "bob@example.test"),)
    assert qid in head.decode()


async def test_submit_adds_message_id_date_and_from_when_missing(env):
    content = b"Subject: bare\r\n\r\n" + BODY
    qid = await env.cleanup.submit(submission(content))
    head, rest = split_header(env.store.inserted[0].content)
    assert rest == b"\r\n" + BODY
    assert header_value(head, "message-id") == f"<20231114221320.{qid}@{HOST}>"
    assert header_value(head, "date") == rfc5322_date(NOW) == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert header_value(head, "from") == "alice@remote.test"  # Postfix's form: the address, no brackets
    assert header_value(head, "subject") == "bare"


@pytest.mark.parametrize("present, added", [
    (b"message-id: <x@y>\r\n", {"date", "from"}),
    (b"DATE: Tue, 14 Nov 2023 22:00:00 +0000\r\n", {"message-id", "from"}),
    (b"From: a@b\r\n", {"message-id", "date"}),
])
async def test_submit_adds_only_what_is_missing(env, present, added):
    await env.cleanup.submit(submission(present + b"\r\nbody\r\n"))
    names = header_names(split_header(env.store.inserted[0].content)[0])
    for name in ("message-id", "date", "from"):
        assert names.count(name) == 1
    original = set(header_names(present))
    assert {n for n in ("message-id", "date", "from") if n not in original} == added


@pytest.mark.parametrize("present, added", [
    (b"Resent-From: r@example.test\r\nResent-To: t@example.test\r\n" + b"From: a@x.test\r\nDate: x\r\n"
     b"Message-ID: <m@x.test>\r\n", ["resent-message-id", "resent-date"]),
    (b"Resent-To: t@example.test\r\nSubject: s\r\n", ["resent-message-id", "resent-date", "resent-from"]),
    (b"Resent-Message-ID: <r@y>\r\nResent-From: r@y\r\n", ["resent-date"]),  # no plain Message-ID, Date, From
])
async def test_a_resent_message_gets_the_resent_fields_it_lacks(env, present, added):
    """As Postfix's cleanup: with Resent- fields, what is missing is the Resent- kind, not Message-ID and Date."""
    await env.cleanup.submit(submission(present + b"\r\nbody\r\n"))
    names = header_names(split_header(env.store.inserted[0].content)[0])
    assert names == ["received", *header_names(present), *added]


async def test_a_resent_field_postfix_does_not_know_makes_no_resent_message(env):
    """Postfix's cleanup adds the Resent- kind only for a Resent- field of its header_opts (HDR_OPT_RR);
    `Resent-Comment` is an ordinary field (checked against Postfix 3.7.11: mailflow added Resent-Message-ID,
    Resent-Date and Resent-From)."""
    await env.cleanup.submit(submission(b"Resent-Comment: c\r\n\r\nbody\r\n"))
    names = header_names(split_header(env.store.inserted[0].content)[0])
    assert names == ["received", "resent-comment", "message-id", "date", "from"]


async def test_a_field_name_with_blanks_before_its_colon_is_written_without_them(env):
    """Postfix's cleanup (mime_state) writes the obsolete `name SP :` as `name:` (checked against Postfix 3.7.11);
    a continuation line and the body keep theirs."""
    content = b"Subject : spaced\r\nX-Tab\t: tabbed\r\n folded : line\r\nX-Plain: a : b\r\n\r\nBody : x\r\n"
    await env.cleanup.submit(submission(content))
    stored = env.store.inserted[0].content
    assert stored.endswith(b"Subject: spaced\r\nX-Tab: tabbed\r\n folded : line\r\nX-Plain: a : b\r\n"
                           + stored.split(b"X-Plain: a : b\r\n")[1])
    assert stored.endswith(b"\r\n\r\nBody : x\r\n")


async def test_a_label_written_with_blanks_before_its_colon_marks_the_message_8bitmime(env):
    """`Content-Transfer-Encoding : 8bit` is Postfix's `Content-Transfer-Encoding: 8bit` (it normalizes the name
    first), so it marks the message 8BITMIME (checked against Postfix 3.7.11); mailflow's label reader did not see
    the field."""
    await env.cleanup.submit(submission(b"MIME-Version: 1.0\r\nContent-Transfer-Encoding :  8bit\r\n\r\nx\r\n"))
    assert env.store.inserted[0].body_type == "8BITMIME"


@pytest.mark.parametrize("classes, smtpd_mail, local_mail", [
    (("sendmail", "verify"), False, True), (("smtpd",), True, False), (("all",), True, True), ((), False, False),
    (("bounce", "notify", "qmqpd", "verify"), False, False)])
async def test_smtputf8_autodetect_classes_mark_mail_with_8bit_header_bytes_smtputf8(env, classes, smtpd_mail,
                                                                                    local_mail):
    """smtputf8_autodetect_classes (Postfix's, default sendmail, verify): the mail of a class it names is marked
    SMTPUTF8 when a header section holds a byte that is not ASCII (a MIME part's too); never for a body's bytes."""
    cleanup = Cleanup(env.store, myhostname=HOST, clock=env.clock, rng=random.Random(7), log=MailLog(),
                      on_queued=env.wake, smtputf8_autodetect=classes)
    part = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
            b"Content-Disposition: attachment; filename=\"K\xc3\xb6ln\"\r\n\r\nx\r\n--b--\r\n")
    messages = [b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nx\r\n", part, b"Subject: x\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"]
    local = LocalUser(uid=1000, login="alice")
    for content in messages:
        await cleanup.submit(submission(content))
        await cleanup.submit(dataclasses.replace(submission(content), submitter=local))
    flags = [m.smtputf8 for m in env.store.inserted]
    assert flags == [smtpd_mail, local_mail] * 2 + [False, False]


_PART = b"--b\r\nContent-Disposition: attachment; filename=\"K\xc3\xb6ln\"\r\n\r\nx\r\n--b--\r\n"


@pytest.mark.parametrize("content, smtputf8", [
    (b"Subject: x\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n", False),
    (b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nx\r\n", True),
    (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" + _PART, True),
    (b"MIME-Version: 1.0\r\nContent-Type: (c) multipart/mixed; boundary=b\r\n\r\n" + _PART, True),
    (b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n" + _PART, False),  # (no part: body text)
    (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\n"
     + b"y" * 76 + b"\r\n" * (1 << 14) + _PART, True),  # (over READ_INLINE: read in a thread)
])
async def test_the_autodetect_reads_the_parts_of_a_message_whose_added_fields_are_ascii(env, content, smtputf8):
    """A local submission whose added fields are ASCII (no full name) is judged on its header section and
    parts' as the whole content would be."""
    cleanup = Cleanup(env.store, myhostname=HOST, clock=env.clock, rng=random.Random(7), log=MailLog(),
                      on_queued=env.wake)
    await cleanup.submit(dataclasses.replace(submission(content), submitter=LocalUser(uid=1000, login="alice")))
    assert env.store.inserted[0].smtputf8 is smtputf8


async def test_the_autodetect_does_not_read_the_body_of_a_big_message_with_no_parts(env, monkeypatch):
    """A message that is one entity is judged by its header section alone: a local submission over 1 MiB with
    ASCII added fields is not read through the MIME parser again (it was, in a thread, from the spool)."""
    fed: list[int] = []
    feed = downgrade.Downgrade.feed
    monkeypatch.setattr(downgrade.Downgrade, "feed", lambda self, chunk: fed.append(len(chunk)) or feed(self, chunk))
    cleanup = Cleanup(env.store, myhostname=HOST, clock=env.clock, rng=random.Random(7), log=MailLog(),
                      on_queued=env.wake)
    big = b"Subject: x\r\n\r\n" + (b"Gr\xc3\xbc\xc3\x9fe " * 9 + b"\r\n") * (1 << 14)
    assert len(big) > downgrade.READ_INLINE
    await cleanup.submit(dataclasses.replace(submission(big), submitter=LocalUser(uid=1000, login="alice")))
    assert env.store.inserted[0].smtputf8 is False
    assert sum(fed) < 4096


@pytest.mark.parametrize("sender, fullname, added", [
    # Postfix 3.7.11's (tests/interop/test_added_headers_vs_postfix.py compares the others with sendmail -F)
    ("j\u00f6e@remote.test", "J\u00f6e", "From: J\u00f6e <j\u00f6e@remote.test>".encode()),
    ("s@remote.test", "Jos\udce9", b"From: Jos\xe9 <s@remote.test>"),  # a Latin-1 byte, as sendmail carries it
    ("s@remote.test", "a\r\nb\0c", b"From: a b <s@remote.test>"), ("s@remote.test", "\0x", b"From: s@remote.test"),
])
async def test_a_local_users_full_name_is_written_as_postfix_writes_it(env, sender, fullname, added):
    sub = dataclasses.replace(submission(b"Subject: x\r\n\r\nbody\r\n", sender=sender),
                              submitter=LocalUser(uid=1000, login="joe", fullname=fullname))
    await env.cleanup.submit(sub)
    assert added + b"\r\n" in env.store.inserted[0].content


async def test_the_from_made_from_a_full_name_does_not_make_the_message_smtputf8(env):
    """Postfix's cleanup writes the From it adds past cleanup_out_header (CLEANUP_OUT_BUF: no SMTPUTF8 header
    flag), so `sendmail -F "Jos\u00e9 M\u00fcller"` with ASCII header fields goes to a peer without SMTPUTF8
    (compared with 3.7.11: tests/interop/test_smtputf8_autodetect_vs_postfix.py); its own 8-bit fields and a
    part's still count with such a From."""
    part = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
            b"Content-Disposition: attachment; filename=\"K\xc3\xb6ln\"\r\n\r\nx\r\n--b--\r\n")
    contents = [b"Subject: x\r\n\r\nbody\r\n", b"Subject: x\r\n\r\nbody\r\n", b"Subject: K\xc3\xb6ln\r\n\r\nx\r\n",
                part]
    for content, fullname in zip(contents, ["Jos\u00e9 M\u00fcller", "Jos\udce9", "Jos\udce9", "Jos\u00e9"]):
        await env.cleanup.submit(dataclasses.replace(submission(content),
                                                     submitter=LocalUser(uid=1000, login="jose", fullname=fullname)))
    assert [m.smtputf8 for m in env.store.inserted] == [False, False, True, True]
    assert b"From: Jos\xc3\xa9 M\xc3\xbcller <alice@remote.test>\r\n" in env.store.inserted[0].content
    assert b"From: Jos\xe9 <alice@remote.test>\r\n" in env.store.inserted[1].content


async def test_null_sender_gets_mailer_daemon_from(env):
    """As Postfix's cleanup writes it: MAILER-DAEMON, unqualified (checked against Postfix 3.7)."""
    await env.cleanup.submit(submission(b"Subject: bounce\r\n\r\nx\r\n", sender=""))
    head = split_header(env.store.inserted[0].content)[0]
    assert header_value(head, "from") == "MAILER-DAEMON"


async def test_message_without_header_section_or_body(env):
    await env.cleanup.submit(submission(b"\r\njust a body\r\n"))
    content = env.store.inserted[0].content
    head, rest = split_header(content)
    assert rest == b"\r\njust a body\r\n"
    assert header_names(head) == ["received", "message-id", "date", "from"]
    await env.cleanup.submit(submission(b""))
    assert header_names(env.store.inserted[1].content) == ["received", "message-id", "date", "from"]


async def test_with_this_hosts_own_received_header_fifty_hops_are_a_loop(env):
    """As Postfix counts (checked against Postfix 3.7 with hopcount_limit 50): 48 Received headers pass, 49 are
    refused, for with the one this host adds they make 50."""
    hops = b"".join(b"Received: from h%d by h%d; Tue, 14 Nov 2023 22:00:00 +0000\r\n" % (i, i) for i in range(49))
    await env.cleanup.submit(submission(hops[: hops.index(b"Received: from h48 ")] + b"\r\nbody\r\n"))
    assert len(env.store.inserted) == 1
    with pytest.raises(PermanentError) as info:
        await env.cleanup.submit(submission(hops + b"\r\nbody\r\n"))
    assert info.value.dsn == "5.4.0"  # Postfix's reply for it (5.4.6 is its forwarding-loop bounce)
    assert "too many hops" in info.value.text
    assert len(env.store.inserted) == 1  # nothing committed
    assert env.woken == 1  # qmgr not woken for the refused message


@pytest.mark.parametrize("dropped", [b"Bcc: hidden@example.test\r\n", b"bcc:hidden@example.test,\r\n\tother@x.test\r\n",
                                     b"Resent-Bcc: rb@example.test\r\n", b"Return-Path: <old@example.test>\r\n",
                                     b"Content-Length: 5\r\n"])
async def test_message_drop_headers_are_removed_with_their_continuations(env, dropped):
    """Postfix's message_drop_headers (its default): a Bcc never reaches the other recipients."""
    await env.cleanup.submit(submission(b"Subject: x\r\n" + dropped + b"To: a@example.test\r\n\r\nbody\r\n"))
    head, rest = split_header(env.store.inserted[0].content)
    assert dropped not in head and b"Subject: x\r\nTo: a@example.test\r\n" in head and rest == b"\r\nbody\r\n"


@pytest.mark.parametrize("cut", [0, 3, 4, 5, 25])  # (4: at a line start; 3: before its LF)
def test_a_dropped_field_cut_at_the_header_limit_is_dropped_whole_from_what_a_notice_returns(env, cut):
    """pickup returns a message refused for its too big header section less its Bcc (without_dropped_fields): a Bcc
    cut at header_size_limit left the continuation lines past the cut in the notice (`x.test,\r\n secret049@...`),
    which went to double_bounce_recipient with a null sender. Cut anywhere in the field, none of it is returned."""
    bcc = b"Bcc: first@x.test,\r\n" + b"".join(b" secret%05d@x.test,\r\n" % i for i in range(6000))
    padding = b"X-Pad: " + b"p" * (cut + 10) + b"\r\n"  # (moves where the limit cuts the Bcc)
    data = b"Subject: hi\r\n" + padding + bcc + b" last@x.test\r\nTo: a@x.test\r\n\r\nbody\r\n"
    returned = env.cleanup.without_dropped_fields(Content.of(data)).to_bytes()
    assert returned == b"Subject: hi\r\n" + padding + b"To: a@x.test\r\n\r\nbody\r\n"


@pytest.mark.parametrize("name", [b"Bcc", b"Resent-Bcc"])
def test_a_dropped_field_cut_inside_its_name_is_dropped_whole_from_what_a_notice_returns(env, name):
    """A cut inside the name (`B|cc:`, `Resent-B|cc:`) left no bcc field in the cut head: the Bcc went back whole."""
    limit = env.cleanup._header_size_limit
    bcc = name + b": first@x.test,\r\n" + b"".join(b" secret%05d@x.test,\r\n" % i for i in range(6000))
    for into in range(1, len(name) + 2):  # (len(name) + 1: right after the colon)
        start = b"Subject: hi\r\n"
        pad = limit - into - len(start) - len(b"X-Pad: \r\n")
        padding = b"X-Pad: " + b"p" * pad + b"\r\n"
        data = start + padding + bcc + b" last@x.test\r\nTo: a@x.test\r\n\r\nbody\r\n"
        returned = env.cleanup.without_dropped_fields(Content.of(data)).to_bytes()
        assert returned == start + padding + b"To: a@x.test\r\n\r\nbody\r\n", into


@pytest.mark.parametrize("content, head_names, body", [
    (b"Subject: probe\r\nthis is body text\r\n", ["subject"], b"\r\nthis is body text\r\n"),
    (b"From: a@example.test\r\nnot a header line\r\nSubject: late\r\n\r\nbody\r\n", ["from"],
     b"\r\nnot a header line\r\nSubject: late\r\n\r\nbody\r\n"),
])
async def test_a_header_section_ended_by_a_line_that_is_no_field_gets_its_empty_line(env, content, head_names, body):
    """As Postfix: the body starts at the first line that is no header field, the empty line is put before it,
    and the headers cleanup adds go above it."""
    await env.cleanup.submit(submission(content))
    head, rest = split_header(env.store.inserted[0].content)
    added_from = ["from"] * ("from" not in head_names)
    assert header_names(head) == ["received", *head_names, "message-id", "date", *added_from]
    assert rest == body


async def test_received_lines_in_the_body_do_not_count_as_hops(env):
    body = b"".join(b"Received: from h%d\r\n" % i for i in range(60))
    await env.cleanup.submit(submission(b"Subject: x\r\n\r\n" + body))
    assert len(env.store.inserted) == 1


async def test_thousand_submissions_with_a_frozen_clock_get_unique_increasing_ids(env):
    ids = [await env.cleanup.submit(submission(b"Subject: x\r\n\r\ny\r\n")) for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert ids == sorted(ids)
    assert [m.queue_id for m in env.store.inserted] == ids
    assert all(m.arrival == NOW for m in env.store.inserted)


async def test_store_failure_propagates_and_does_not_wake_qmgr(env):
    async def broken(msg):
        raise OSError("disk full")

    env.store.insert = broken
    with pytest.raises(OSError):
        await env.cleanup.submit(submission(FULL + BODY))
    assert env.woken == 0


async def test_bare_lf_message_gets_its_headers_before_the_body(env):
    try:
        await env.cleanup.submit(submission(b"Subject: lf only\n\nthe body\r\n"))
    except PermanentError:
        return
    content = env.store.inserted[0].content
    assert content.index(b"Message-ID:") < content.index(b"the body")


LF_HEAD = b"Subject: s\nFrom: a@remote.test\nDate: Tue, 14 Nov 2023 22:00:00 +0000\nMessage-ID: <m@remote.test>\n"


async def test_bare_lf_headers_that_are_present_are_not_added_again(env):
    await env.cleanup.submit(submission(LF_HEAD + b"\nbody\n"))
    content = env.store.inserted[0].content
    for name in (b"Message-ID:", b"Date:", b"From:"):
        assert content.count(name) == 1, name


async def test_bare_lf_received_headers_count_as_hops(env):
    with pytest.raises(PermanentError):
        await env.cleanup.submit(submission(b"Received: from x by y\n" * 51 + b"\nbody\n"))



@pytest.mark.parametrize("data, pos, found", [
    (b"From a\r\n", 0, True), (b">>>From a\r\n", 0, True), (b"x\r\n>From a", 3, True),
    (b"From\r\n", 0, False), (b"from a\r\n", 0, False), (b".From a\r\n", 0, False), (b" From a\r\n", 0, False),
    (b"", 0, None), (b">>Fro", 0, None), (b"x\r\nFrom", 3, None),  # (not known until more comes)
])
def test_mailbox_line_is_the_raw_line_test(data, pos, found):
    assert message.mailbox_line(data, pos) is found


def test_mailbox_lines_labels_the_lines_counted_with_crlf_line_ends():
    data = b"From a\r\n>From b\nSubject: s\r\n"
    assert message.mailbox_lines(data, 2) == (16, b"X-Mailbox-Line: From a\r\nX-Mailbox-Line: >From b\r\n")
    assert message.mailbox_lines(data, 0) == (0, b"")
    assert message.mailbox_lines(b"From a", 1) == (0, b"")  # (an incomplete line is none)


def test_normalized_field_names_removes_blanks_before_a_field_s_colon_only():
    head = b"Subject : s\r\nX-Tab\t\t: t\r\n folded : kept\r\nTo: a : b\r\n"
    assert message.normalized_field_names(head) == b"Subject: s\r\nX-Tab: t\r\n folded : kept\r\nTo: a : b\r\n"
    plain = b"Subject: s\r\n"
    assert message.normalized_field_names(plain) is plain  # (no copy when there is nothing to do)


@pytest.mark.parametrize("content, logged", [
    # a resent message without Message-ID: the Resent-Message-ID cleanup adds, then `message-id=<>`, as Postfix's
    # cleanup_message.c logs them (mailflow logged `message-id=` with an empty value)
    (b"Resent-Bcc: x@example.test\r\nSubject: s\r\n\r\nx\r\n",
     ["resent-message-id=<20231114221320.QID@mx.example.test>", "message-id=<>"]),
    (b"Resent-Message-ID: <r@remote.test>\r\nResent-From: r@remote.test\r\n\r\nx\r\n",
     ["resent-message-id=<r@remote.test>", "message-id=<>"]),
    (b"Message-ID: <m@remote.test>\r\nResent-To: t@remote.test\r\n\r\nx\r\n",
     ["message-id=<m@remote.test>", "resent-message-id=<20231114221320.QID@mx.example.test>"]),
    (b"Subject: s\r\n\r\nx\r\n", ["message-id=<20231114221320.QID@mx.example.test>"]),
])
async def test_the_message_ids_are_logged_as_postfix_s_cleanup_logs_them(env, caplog, content, logged):
    caplog.set_level(logging.INFO)
    qid = await env.cleanup.submit(submission(content))
    lines = [r.getMessage() for r in caplog.records if "message-id=" in r.getMessage()]
    assert lines == [f"{qid}: " + line.replace("QID", qid).replace("mx.example.test", HOST) for line in logged]
