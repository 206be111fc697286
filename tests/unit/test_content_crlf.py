"""Content marked CRLF-clean (Content.crlf): who may mark it, and that the SMTP client's trust in the mark
changes nothing it sends for content that deserves it."""
from __future__ import annotations

import random

import pytest

from mailflow.content import Content, Spool, crlf_only
from mailflow.logs import MailLog
from mailflow.model import ClientInfo, Envelope, Submission
from mailflow.stages.cleanup import Cleanup
from mailflow.transports.encode import SmtpData, encode
from tests.unit.test_cleanup_headers import FixedClock, RecordingStore

MESSAGE = b"Subject: hi\r\nFrom: <a@remote.test>\r\n\r\n.dot line\r\nbody\r\n\r\nend\r\n"


@pytest.mark.parametrize("data, clean", [
    (b"", True), (b"a\r\nb\r\n", True), (b"a\r\nb", True), (b"a\nb\r\n", False), (b"a\rb\r\n", False),
    (b"a\r\n\r", False), (b"\n", False), (b"a\n\r", False),
])
def test_crlf_only(data, clean):
    assert crlf_only(data) is clean


async def test_a_spool_marks_what_its_writer_checked(tmp_path):
    for checked in (True, False):
        spool = Spool(tmp_path)
        spool.append(MESSAGE)
        assert (await spool.finish(crlf=checked)).crlf is checked
        spool.discard()


def cleanup() -> tuple[Cleanup, RecordingStore]:
    store = RecordingStore()
    return Cleanup(store, myhostname="mx.example.test", clock=FixedClock(), rng=random.Random(7), log=MailLog(),
                   on_queued=lambda: None), store


def submission(content: Content, headers: tuple[str, ...] = ()) -> Submission:
    return Submission(envelope=Envelope("a@remote.test", ("b@example.test",)), content=content,
                      client=ClientInfo(addr="192.0.2.7", helo="client.test", hostname="client.test"),
                      headers=headers)


@pytest.mark.parametrize("marked, headers, kept", [
    (True, (), True),
    (True, ("Authentication-Results: mx.example.test; spf=pass",), True),
    (True, ("X-Folded: one\n\ttwo",), False),  # a filter's header with a bare LF: the client must mend it
    (False, (), False),
])
async def test_cleanup_keeps_the_mark_only_when_what_it_adds_is_clean(marked, headers, kept):
    c, store = cleanup()
    await c.submit(submission(Content((MESSAGE,), crlf=marked), headers))
    [queued] = store.contents
    assert queued.crlf is kept


def smtp_data(chunks: list[bytes], crlf: bool) -> bytes:
    return b"".join(encode(chunks, SmtpData(crlf=crlf)))


def test_trusting_the_mark_sends_the_same_bytes_for_clean_content():
    rng = random.Random(11)
    for _ in range(500):
        lines = [rng.choice([b"", b".", b"..x", b"text", b"a.b", b" .", b"\x00\xff"]) for _ in range(rng.randint(0, 8))]
        data = b"".join(line + b"\r\n" for line in lines) + rng.choice([b"", b"no end", b"."])
        cuts = sorted(rng.sample(range(len(data) + 1), min(3, len(data) + 1)))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        assert smtp_data(chunks, crlf=True) == smtp_data(chunks, crlf=False), data


def test_unmarked_content_is_mended():
    assert smtp_data([b"a\nb\rc\r\n"], crlf=False) == b"a\r\nb\r\nc\r\n"
