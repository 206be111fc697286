"""The capture server's pure parts: the mailbox's bounds and waiting, what a message holds (mime), Mailpit's
search syntax, smtpd's transcript record, the Sink's inbound rules and a destination's script."""
from __future__ import annotations

import asyncio
import cProfile
import hashlib
import pstats
import re
import threading
import time
from email.message import EmailMessage

import pytest

from mailflow.capture import mime, search
from mailflow.capture.mailbox import CapturedEnvelope, Criteria, Mailbox, WaitTimeout, footprint, written_address
from mailflow.clock import VirtualClock
from mailflow.stages.smtpd.restrictions import Facts
from mailflow.stages.smtpd.transcript import SessionObserver, Transcript, tls_description
from mailflow.testing.destinations import Script, Step
from mailflow.testing.faults import InboundFaults


def raw(subject: str = "Hi", to: str = "Bob <bob@example.com>", body: str = "hello") -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "Ann <ann@shop.test>", to, subject
    msg.set_content(body)
    return bytes(msg)


def mailbox(**limits) -> Mailbox:
    return Mailbox(max_messages=limits.get("max_messages", 10), max_bytes=limits.get("max_bytes", 10**6),
                   clock=VirtualClock())


def add(box: Mailbox, subject: str = "Hi", rcpts=("bob@example.com",), queue_id: str = "Q1", **kw):
    return box.add(CapturedEnvelope("ann@shop.test", tuple(rcpts)), raw(subject, **kw), queue_id)


# ---------------------------------------------------------------------------------------------- mailbox


def test_the_oldest_messages_make_room():
    box = mailbox(max_messages=2)
    for n in range(3):
        add(box, f"m{n}", queue_id=f"Q{n}")
    assert [m.subject for m in box.messages] == ["m1", "m2"] and (box.accepted, box.deleted) == (3, 1)
    small = mailbox(max_bytes=len(raw("a")) * 2 + 10)
    for n in range(4):
        add(small, "a", queue_id=f"Q{n}")
    assert len(small.messages) == 2


def test_one_queue_id_captured_twice_gets_two_ids():
    box = mailbox()
    first, second = add(box, queue_id="Q"), add(box, queue_id="Q")
    assert first.id == "Q" and second.id != "Q" and second.id.startswith("Q.")
    assert box.latest() is second and box.get("Q") is first


async def test_wait_returns_when_enough_arrive_and_reports_what_did():
    box = mailbox()
    waiting = asyncio.ensure_future(box.wait(Criteria(to="*@example.com"), count=2, timeout=5))
    add(box, "one", queue_id="A")
    await asyncio.sleep(0)
    assert not waiting.done()
    add(box, "two", queue_id="B")
    assert [m.subject for m in await waiting] == ["one", "two"]
    with pytest.raises(WaitTimeout) as failure:
        await box.wait(Criteria(sender="nobody@x", subject=re.compile("^t")), timeout=0.01)
    assert str(failure.value).splitlines() == [
        "waited 0.01s for 1 message (sender='nobody@x' subject='^t'): 0 matched; 2 arrived:",
        "  1. <ann@shop.test> -> <bob@example.com>: 'one' (queue id A)",
        "  2. <ann@shop.test> -> <bob@example.com>: 'two' (queue id B)"]
    assert isinstance(failure.value, AssertionError)


async def test_a_failed_wait_says_how_many_the_bounds_dropped_and_what_keeps_them():
    # "0 matched; 2 arrived" for a wait on the first of three messages, which had arrived and been dropped at
    # max_messages: the test's author looked for a bug in the application
    box = mailbox(max_messages=2)
    for n in range(3):
        add(box, f"m{n}", queue_id=f"Q{n}")
    with pytest.raises(WaitTimeout) as failure:
        await box.wait(Criteria(subject="m0"), timeout=0)
    assert str(failure.value).splitlines()[:2] == [
        "waited 0s for 1 message (subject='m0'): 0 matched; 2 arrived:",
        "  (and 1 older dropped: the capture keeps [sink] max_messages = 2 and max_bytes = 1000000 (a Sink's "
        'sink={"max_messages": …, "max_bytes": …}); raise them to keep more)']
    box.clear()  # (a shared Sink's next test: what was dropped before is none of its business)
    with pytest.raises(WaitTimeout) as failure:
        await box.wait(Criteria(subject="m0"), timeout=0)
    assert "dropped" not in str(failure.value)


async def test_a_failed_wait_lists_the_newest_messages_and_counts_them_all():
    """A wait that failed on a Sink shared by a whole suite used to list every message it held (1000 lines)."""
    box = mailbox(max_messages=200)
    for n in range(120):
        add(box, f"n{n}", queue_id=f"Q{n}")
    with pytest.raises(WaitTimeout) as failure:
        await box.wait(Criteria(to="nobody@example.com"), 1, timeout=0.01)
    lines = str(failure.value).splitlines()
    assert lines[0].endswith("0 matched; 120 arrived:") and lines[1] == "  (70 older not listed)"
    assert lines[2].startswith("  71. ") and "'n70'" in lines[2] and lines[-1].startswith("  120. ")
    assert len(lines) == 52


def test_criteria():
    msg = add(mailbox(), "Your Order 42", rcpts=("Bob@Example.com", "x@y.test"))
    assert Criteria(to="bob@example.com").matches(msg) and Criteria(to="*@y.test").matches(msg)
    assert not Criteria(to="bob@example").matches(msg)
    assert Criteria(sender="ANN@shop.test", subject="Order").matches(msg)
    assert not Criteria(subject="order").matches(msg) and Criteria(subject=re.compile("(?i)order")).matches(msg)
    assert not Criteria(match=lambda m: False).matches(msg)


async def test_an_address_literal_matches_itself_not_as_a_character_class():
    """`y@[127.0.0.1]` has a `[`, so it was taken as a glob whose [127.0.0.1] matches one character: waiting
    for, or refusing, an address-literal recipient never matched it."""
    msg = add(mailbox(), rcpts=("postmaster@[127.0.0.1]",))
    assert Criteria(to="postmaster@[127.0.0.1]").matches(msg) and Criteria(to="*@[127.0.0.1]").matches(msg)
    assert not Criteria(to="postmaster@[127.0.0.2]").matches(msg)
    faults = InboundFaults()
    faults.reject(rcpt="*@[127.0.0.1]")
    facts = Facts("127.0.0.1", sender="a@x.test", recipient="postmaster@[127.0.0.1]")
    assert await faults.check("rcpt", facts, ()) is not None


async def test_a_criterion_of_the_wrong_type_is_refused_at_once():
    """to=[...] used to wait out its timeout when nothing came, and raise AttributeError at the first message."""
    box = mailbox()
    for wrong in ({"to": ["a@x.test", "b@x.test"]}, {"sender": b"a@x.test"}, {"subject": b"Hi"}, {"match": 1}):
        with pytest.raises(TypeError, match=f"{next(iter(wrong))}= takes"):
            await box.wait(Criteria(**wrong), 1, timeout=0.5)


def test_an_address_written_as_a_report_writes_it_is_refused_naming_the_one_to_write():
    # to="<bob@example.com>", copied from a WaitTimeout's list, or "Bob <bob@example.com>" from the To header,
    # matched nothing: the wait timed out listing the very message it was after
    for name, written, bare in [("to", "<bob@example.com>", "bob@example.com"),
                                ("to", "Bob <bob@example.com>", "bob@example.com"),
                                ("to", '"Smith, Bob" <*@example.com>', "*@example.com"),
                                ("sender", "<>", ""), ("sender", " a@shop.test", "a@shop.test"),
                                # no space before the <, a trailing comment, spaces inside the brackets
                                ("to", "Bob<bob@example.com>", "bob@example.com"),
                                ("to", "bob@example.com (Bob (the builder))", "bob@example.com"),
                                ("to", "< bob@example.com >", "bob@example.com")]:
        with pytest.raises(ValueError) as refused:
            Criteria(**{name: written})
        assert str(refused.value) == (f"{name}= takes the envelope address alone, as between the < > of MAIL FROM, "
                                      f"RCPT TO or a report: {name}={bare!r}, not {written!r}")
    for address in ("*@[192.0.2.1]", "", '"a<b>"@x.test', '"a (b)"@x.test', '"<x> y"@x.test'):
        assert Criteria(to=address).to == address
    started = time.perf_counter()  # (a backtracking pattern took 0.5 s for 8 000 spaces, quadratically more after)
    assert written_address(" " * 200_000 + "x") == "x" and time.perf_counter() - started < 1


def test_a_wait_for_the_null_sender_says_so():
    """sender="" (a bounce's <>) used to be reported as "any message" when the wait timed out."""
    assert Criteria(sender="").describe() == "sender=''"
    assert Criteria().describe() == "any message"


# ---------------------------------------------------------------------------------------------- mime


def test_bodies_attachments_inline_parts_and_links():
    msg = EmailMessage()
    msg["Subject"] = "x"
    msg.set_content("see https://a.test/1, and mailto:help@a.test.")
    msg.add_alternative('<a href="https://a.test/2">two</a><img src="cid:pic">', subtype="html")
    msg.get_payload()[1].add_related(b"GIF89a", maintype="image", subtype="gif", cid="<pic>")
    msg.add_attachment(b"\x00\x01", maintype="application", subtype="octet-stream", filename="blob.bin")
    parsed = mime.parse(bytes(msg))
    assert mime.text_body(parsed).startswith("see") and "<a href" in mime.html_body(parsed)
    attached, inline = mime.attachments(parsed)
    assert [(a.part_id, a.filename, a.data) for a in attached] == [("2", "blob.bin", b"\x00\x01")]
    assert [(a.part_id, a.content_id, a.content_type) for a in inline] == [("1.2.2", "pic", "image/gif")]
    assert attached[0].checksums()["SHA256"] == hashlib.sha256(b"\x00\x01").hexdigest()
    assert mime.links(mime.text_body(parsed), mime.html_body(parsed)) == ["https://a.test/1", "mailto:help@a.test", "https://a.test/2"]
    snippet = mime.snippet(mime.text_body(parsed), mime.html_body(parsed))
    assert snippet == "see https://a.test/1, and mailto:help@a.test."


def test_a_message_without_text_gets_its_snippet_from_the_html():
    msg = EmailMessage()
    msg.set_content("<p>Hello <b>there</b></p>", subtype="html")
    parsed = mime.parse(bytes(msg))
    assert mime.snippet(mime.text_body(parsed), mime.html_body(parsed)) == "Hello there"


def test_a_broken_message_does_not_raise():
    parsed = mime.parse(b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nContent-Type: text/plain; "
                        b"charset=nonsense\r\n\r\nhi\r\n")
    assert mime.text_body(parsed).strip() == "hi"
    assert mime.attachments(parsed) == ([], [])
    assert mime.addresses(parsed, "To") == []


# ---------------------------------------------------------------------------------------------- search


def test_search_syntax():
    assert search.parse('to:bob -subject:"big sale" !is:read words "two words" http://x.test') == [
        search.Term(False, "to", "bob"), search.Term(True, "subject", "big sale"), search.Term(True, "is", "read"),
        search.Term(False, "", "words"), search.Term(False, "", "two words"), search.Term(False, "", "http://x.test")]
    assert search.parse("") == []


def test_search_places():
    box = mailbox()
    add(box, "Big sale", rcpts=("bob@example.com", "hidden@example.com"), queue_id="A",
                body="prices cut")
    second = add(box, "Receipt", rcpts=("carol@example.com",), to="Carol <carol@example.com>", queue_id="B")
    second.read = True

    def found(query):
        terms = search.parse(query)
        return [m.queue_id for m in box.messages if search.matches(terms, m)]

    assert found("to:bob") == ["A"] and found("to:hidden") == ["A"] and found("bcc:hidden") == ["A"]
    assert found("from:ann") == ["A", "B"] and found('subject:"big sale"') == ["A"]
    assert found("prices") == ["A"] and found("-prices") == ["B"]
    assert found("is:read") == ["B"] and found("is:unread") == ["A"] and found("has:attachment") == []
    assert found("addressed:carol") == ["B"] and found("to:carol subject:receipt") == ["B"]


# ---------------------------------------------------------------------------------------------- transcript


class Limits(SessionObserver):
    line_limit = 3
    byte_limit = 1024


def test_a_transcript_keeps_no_credentials_and_stays_bounded():
    hung_up = []
    t = Transcript(Limits(), "unknown[127.0.0.1]", lambda: hung_up.append(1))
    t.reply("220 hi")
    t.command(b"AUTH PLAIN AGFsaWNlAHMzY3JldA==")
    t.reply(b"235 2.7.0 Authentication successful")
    t.command(b"MAIL FROM:<a@b>")
    assert t.snapshot().lines == (("S", "220 hi"), ("C", "AUTH PLAIN ****"),
                                  ("S", "235 2.7.0 Authentication successful"))
    assert t.snapshot().omitted == 1
    t.hang_up()
    assert hung_up == [1]


@pytest.mark.parametrize("line,kept", [
    ("auth login dXNlcg==", "auth login ****"),
    ("\fAUTH PLAIN AGFsaWNl", "AUTH PLAIN ****"),  # any space str.split sees before the command
    ("\u00a0AUTH PLAIN AGFsaWNl", "AUTH PLAIN ****"),
    (" AUTH PLAIN AGFsaWNl ", "AUTH PLAIN ****"),
    ("AUTH PLAIN", "AUTH PLAIN"),
    ("MAIL FROM:<a@b> ", "MAIL FROM:<a@b>"),
    ("", ""),
])
def test_a_transcript_keeps_no_credentials_whatever_the_space_before_auth(line, kept):
    t = Transcript(Limits(), "unknown[127.0.0.1]", lambda: None)
    t.command(line.encode())
    assert t.snapshot().lines == (("C", kept),)


def test_a_command_that_cannot_be_auth_is_kept_without_the_redaction_being_asked():
    """Most command lines begin with a letter other than A: kept as they are (stripped), no word split for them."""
    t = Transcript(Limits(), "unknown[127.0.0.1]", lambda: None)
    profile = cProfile.Profile()
    profile.runcall(t.command, b"MAIL FROM:<a@b> ")
    assert t.snapshot().lines == (("C", "MAIL FROM:<a@b>"),)
    assert not [f for f in pstats.Stats(profile).stats if f[2] in ("_redacted", "<method 'split' of 'str' objects>")]


def test_tls_description():
    assert tls_description({"cipher": ("TLS_AES_256_GCM_SHA384", "TLSv1.3", 256)}) == "TLSv1.3 TLS_AES_256_GCM_SHA384"
    assert tls_description(None) == ""


# ---------------------------------------------------------------------------------------------- Sink rules


async def test_inbound_rules_match_then_are_spent():
    faults = InboundFaults()
    rule = faults.defer(rcpt="*@later.test", times=2)
    faults.reject(sender="spam@*", at="mail", code=553, text="Not you")
    rcpt = Facts("127.0.0.1", sender="a@shop.test", recipient="x@later.test")
    assert await faults.check("rcpt", rcpt, ("x@later.test",)) == "451 4.7.1 Try again later"
    assert await faults.check("rcpt", Facts("127.0.0.1", sender="a@b", recipient="x@now.test"), ()) is None
    assert await faults.check("rcpt", rcpt, ()) is not None and rule.spent
    assert await faults.check("rcpt", rcpt, ()) is None
    assert await faults.check("mail", Facts("127.0.0.1", sender="spam@x.test"), ()) == "553 5.7.1 Not you"


def test_bad_rules_are_refused():
    faults = InboundFaults()
    with pytest.raises(ValueError, match="5xx"):
        faults.reject(code=451)
    with pytest.raises(ValueError, match="4xx"):
        faults.defer(code=550)
    with pytest.raises(ValueError, match="no recipient"):
        faults.reject(rcpt="a@b", at="mail")
    with pytest.raises(ValueError, match="at="):
        faults.reject(at="quit")
    # a pattern as a report writes it refused nothing: the test's own client got its 250
    with pytest.raises(ValueError, match=r"rcpt= takes the envelope address alone, as between the < > of MAIL FROM, "
                                         r"RCPT TO or a report: rcpt='bad@x.test', not '<bad@x.test>'"):
        faults.reject(rcpt="<bad@x.test>")
    with pytest.raises(ValueError, match=r"rcpt='bad@x.test', not 'bad@x.test \(Bad\)'"):
        faults.reject(rcpt="bad@x.test (Bad)")
    with pytest.raises(ValueError, match=r"sender='\*@spam.test', not 'Spam <\*@spam.test>'"):
        faults.defer(sender="Spam <*@spam.test>")
    assert faults.rules == []


def test_a_destination_script_is_used_step_by_step_at_its_moment():
    script = Script(Step("refuse")).times(2).then(451).times(1).then(250)
    assert script.take("connection") is None  # a lookup step waits for the lookup
    assert [script.take("lookup").kind for _ in range(2)] == ["refuse", "refuse"]
    assert script.take("lookup") is None
    step = script.take("transaction")
    assert (step.kind, step.code) == ("reply", 451)
    assert script.take("transaction").code == 250 and script.take("transaction").code == 250  # always, at the end


async def test_close_ends_the_parse_thread_and_a_later_parse_uses_the_default_pool():
    # the mailbox's parse thread lived on until the cyclic GC ran: ten Sinks a test suite kept, ten threads
    before = set(threading.enumerate())
    box = mailbox()
    first, second = add(box, queue_id="Q1"), add(box, queue_id="Q2")
    await first.parse_off_loop()
    (thread,) = [t for t in set(threading.enumerate()) - before if t.name.startswith("capture-parse")]
    box.close()
    for _ in range(100):
        if not thread.is_alive():
            break
        await asyncio.sleep(0.02)
    assert not thread.is_alive()
    await second.parse_off_loop()
    assert second.text.strip() == "hello"


async def test_what_a_parse_keeps_counts_toward_max_bytes():
    # a parse kept up to 13 times the raw size (a To of 12 000 short addresses as (name, address) tuples), and
    # max_bytes counted the raw bytes alone: it bounded nothing
    to = ",\r\n ".join(f"a{i}@b.c" for i in range(12_000))
    box = mailbox(max_bytes=1_000_000)
    older = add(box, queue_id="OLDER")
    many = box.add(CapturedEnvelope("ann@shop.test", ("bob@example.com",)),
                   f"To: {to}\r\nSubject: s\r\n\r\nhi\r\n".encode(), "MANY")
    assert box.messages == [older, many]  # (the raw bytes fit)
    await many.parse_off_loop()
    assert len(many.contacts["To"]) == 12_000 and box.messages == [many] and box.deleted == 1
    box.delete(["MANY"])
    assert box._bytes == 0


def test_one_part_the_email_package_fails_on_hides_only_itself():
    # Python 3.11's get_content_disposition raises IndexError on `attachment; filename*`: the never-raise
    # wrapper around the whole of attachments() gave no attachment at all
    msg = EmailMessage()
    msg["Subject"] = "s"
    msg.set_content("the body text")
    for i in range(2):
        msg.add_attachment(b"%PDF" + bytes([i]), maintype="application", subtype="pdf", filename=f"good{i}.pdf")
    sent = bytes(msg)  # (its boundary made)
    boundary = f"--{msg.get_boundary()}".encode()
    bad = boundary + b"\nContent-Type: application/octet-stream\nContent-Disposition: attachment; filename*\n\nxx\n"
    parsed = mime.parse(sent.replace(boundary + b"--", bad + boundary + b"--"))
    assert len(mime.parts(parsed)) == 4 and mime.text_body(parsed) == "the body text\n"
    assert [a.filename for a in mime.attachments(parsed)[0]] == ["good0.pdf", "good1.pdf"]


def test_a_malformed_message_is_logged_and_a_bug_is_not_hidden(monkeypatch, caplog):
    # the never-raise wrappers caught every exception and logged nothing: a TypeError of the code's own gave ""
    msg = EmailMessage()
    msg["Subject"] = "s"
    msg.add_attachment(b"x", maintype="application", subtype="pdf", filename="a.pdf")
    sent = bytes(msg).replace(b'attachment; filename="a.pdf"', b"attachment; filename*")
    with caplog.at_level("DEBUG", logger="mailflow.capture"):
        assert mime.attachments(mime.parse(sent)) == ([], [])
    assert "_attachment failed on a malformed message (IndexError" in caplog.text
    monkeypatch.setattr(mime, "_body_part", lambda msg, subtype: 1 + "")
    with pytest.raises(TypeError):
        mime.text_body(mime.parse(raw()))


@pytest.mark.parametrize("to, read", [
    # read raw, the comma of a Q-encoded word split it into a bogus address `=?utf-8?q?Doe`
    (b"=?utf-8?q?Doe,_John?= <j@x.example>, b@x.example", [("Doe, John", "j@x.example"), ("", "b@x.example")]),
    # 8-bit text before an encoded word left the word undecoded
    ("J\u00f6rg =?utf-8?q?M=C3=BCller?= <a@b.example>".encode(), [("J\u00f6rg M\u00fcller", "a@b.example")]),
    (b"=?utf-8?q?J=C3=B6rg?=  =?iso-8859-1?q?=E9?= <a@b.example>", [("J\u00f6rg\u00e9", "a@b.example")]),
    (b"=?unknown?q?x?= <j@x.example>", [("=?unknown?q?x?=", "j@x.example")]),
])
def test_addresses_decode_each_encoded_word_of_a_name(to, read):
    assert mime.addresses(mime.header_only(b"To: " + to + b"\r\n\r\nx\r\n"), "To") == read


def test_the_footprint_of_header_fields_counts_each_field():
    # raw_items() is an iterator: its size alone was counted, some 50 bytes for any header
    header = b"".join(b"X-Field-%d: %s\r\n" % (i, b"v" * 100) for i in range(1000))
    assert footprint(mime.header_only(header + b"\r\nbody\r\n")) > len(header)
