"""smtp_generic_maps ([smtp] generic_maps): the SMTP client rewrites MAIL FROM, RCPT TO and the header's address
fields of outgoing mail on the wire (Postfix smtp_map11.c, mail_addr_map), against a capturing peer on loopback;
the queue's addresses (the results) stay as queued; a spooled message streams through with only its header
section swapped."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import threading
import tracemalloc

import pytest

from mailflow.config import Config, SmtpConfig
from mailflow.content import Content
from mailflow.dns import StaticResolver
from mailflow.model import DeliveryRequest, Outcome, Recipient
from mailflow.routing.rewrite import Rewriter
from mailflow.tables import TableCache
from mailflow.transports.encode import encode
from mailflow.transports.generic import GenericMaps, HeaderSwap
from mailflow.transports.smtp import SmtpTransport, trouble
from tests.support import big_message, spooled

TABLE = ("inline:{ {joe@box.local = joe.user@example.com}, {@box.local = @example.com},"
         " {ann@box.local = ann}, {root = admin@example.com}, {two@box.local = a@example.com b@example.com},"
         " {bob+list@box.local = lists@example.com}, {bob@box.local = @example.net} }")
CONFIG = Config(myhostname="box.local", mydestination=("box.local",), myorigin="example.org")
HEAD = (b"From: Joe <joe@box.local>\r\n"
        b"To: carol@remote.test, \"Dee D.\" <dee@box.local>,\r\n\tfred+x@box.local (Fred)\r\n"
        b"Subject: joe@box.local stays in a subject\r\n"
        b"Message-ID: <1@box.local>\r\n"
        b"\r\n")
BODY = b"joe@box.local in the body stays\r\n"


def generic(table: str = TABLE, config: Config = CONFIG) -> GenericMaps:
    rewriter = Rewriter(config)
    return GenericMaps(TableCache().open([table]), delimiter=config.recipient_delimiter, qualify=rewriter.qualify,
                       find_address=rewriter.find_address)


@pytest.mark.parametrize("queued, sent", [
    ("joe@box.local", "joe.user@example.com"),   # the whole address
    ("joe+x@box.local", "joe.user@example.com"),  # without its extension; the extension is not carried over
    ("sam@box.local", "sam@example.com"),        # @domain -> @other: the local part kept
    ("sam+x@box.local", "sam+x@example.com"),    # ... whole, as the @domain key matched it
    ("bob+list@box.local", "lists@example.com"),
    ("bob+other@box.local", "bob@example.net"),  # @other after a match without the extension: without it too
    ("sam+list@box.local", "sam+list@example.com"),
    ("ann@box.local", "ann@example.org"),        # a value without a domain gets @myorigin
    ("root@box.local", "admin@example.com"),     # a bare user key, for this host's domains
    ("root@remote.test", "root@remote.test"),    # ... only
    ("two@box.local", "a@example.com"),          # several: the first (Postfix warns)
    ("", ""),                                    # the null sender is never looked up
])
def test_the_address_as_it_goes_out(queued, sent):
    assert generic().address(queued) == sent


def test_a_multi_valued_result_is_logged_under_the_queue_id(caplog):
    request = DeliveryRequest("Q7", "two@box.local", (Recipient(0, "carol@remote.test", "carol@remote.test"),), "x",
                              Content.of(b"From: two@box.local\r\n\r\nx\r\n"))
    wire = generic().wire_form(request)
    assert (wire.sender, wire.recipients) == ("a@example.com", {})
    assert [r.getMessage() for r in caplog.records].count(
        "Q7: multi-valued smtp_generic_maps result for two@box.local") == 2  # the sender, and From


@pytest.mark.parametrize("value, sent", [
    ("Joe <joe@example.com>", "joe@example.com"),        # parsed as Postfix's mail_addr_crunch, not split on blanks
    ('"joe smith"@example.com', '"joe smith"@example.com'),  # a blank inside quotes
    ("a@example.com, Bee <b@example.com>", "a@example.com"),
])
def test_a_value_is_parsed_as_an_address_list(value, sent):
    assert generic(f"inline:{{ {{x@box.local = {value}}} }}").address("x@box.local") == sent


def test_a_quoted_local_part_alone_is_qualified_and_goes_out_quoted():
    """`"<a@b>SIZE=1"` has no '@' outside its quotes: a value without a domain, qualified @myorigin as `joe` is
    (address.split_words), and its brackets stay inside the quotes on the wire (no ESMTP parameter injected)."""
    mapped = generic('inline:{ {x@box.local = "<a@b>SIZE=1"} }').address("x@box.local")
    assert mapped == '"<a@b>SIZE=1"@example.org'
    from mailflow.transports.generic import wire_problem
    assert wire_problem(mapped) is None


@pytest.mark.parametrize("value", ["joe@", "@", "<>", "a@b>SMTPUTF8"])
def test_a_value_that_is_not_local_at_domain_is_a_lookup_failure(value, caplog):
    from mailflow.errors import LookupRetry
    with pytest.raises(LookupRetry, match="inline:"):
        generic(f"inline:{{ {{x@box.local = {value}}} }}").address("x@box.local", queue_id="Q3")
    assert any(r.getMessage().startswith("Q3: smtp_generic_maps: table inline:") for r in caplog.records)


def test_a_refusal_shows_no_control_character_of_an_inline_table_name(caplog):
    from mailflow.errors import LookupRetry
    with pytest.raises(LookupRetry) as refused:
        generic("inline:{ {x@box.local = <a\x01b@example.com>} }").address("x@box.local", queue_id="Q4")
    assert "\x01" not in refused.value.text and "\x01" not in caplog.text


def test_a_value_that_holds_no_address_is_a_lookup_failure_logged_under_the_queue_id(caplog):
    from mailflow.errors import LookupRetry
    with pytest.raises(LookupRetry, match="holds no address"):
        generic("inline:{ {x@box.local = ,} }").address("x@box.local", queue_id="Q5")
    assert any(r.getMessage().startswith("Q5: smtp_generic_maps: table inline:")
               and r.getMessage().endswith("holds no address") for r in caplog.records)


def test_header_swap_puts_the_new_header_in_place_whatever_the_chunks():
    content = HEAD + BODY
    new = b"From: X <x@y>\r\n\r\n"
    for size in (1, 3, len(HEAD) - 1, len(HEAD), len(HEAD) + 1, 4096):
        chunks = [content[i:i + size] for i in range(0, len(content), size)]
        assert b"".join(encode(chunks, HeaderSwap(len(HEAD), new))) == new + BODY


def make_request(port: int, content: Content, *rcpts: str, sender: str = "joe@box.local", **kw) -> DeliveryRequest:
    recipients = tuple(Recipient(i, a, a) for i, a in enumerate(rcpts or ("carol@remote.test",)))
    return DeliveryRequest("Q1", sender, recipients, f"[127.0.0.1]:{port}", content, **kw)


def make_transport(maps: GenericMaps | None) -> SmtpTransport:
    config = SmtpConfig(tls_security_level="none", connect_timeout=2, helo_timeout=2, command_timeout=2,
                        data_timeout=2)
    return SmtpTransport(config, resolver=StaticResolver(), helo_name="box.local", generic=maps)


async def deliver(transport: SmtpTransport, request: DeliveryRequest):
    try:
        return await transport.deliver(request)
    finally:
        await transport.close()


async def test_envelope_and_header_addresses_go_out_mapped_and_the_results_keep_the_queued_ones(smtp_peer):
    peer = await smtp_peer()
    request = make_request(peer.port, Content.of(HEAD + BODY), "carol@remote.test", "root@box.local")
    report = await deliver(make_transport(generic()), request)
    [message] = peer.messages
    assert message.mail_from == "joe.user@example.com"
    assert message.rcpt_tos == ["carol@remote.test", "admin@example.com"]
    assert message.content == (
        b"From: Joe <joe.user@example.com>\r\n"
        b"To: carol@remote.test, \"Dee D.\" <dee@example.com>,\r\n\tfred+x@example.com (Fred)\r\n"
        b"Subject: joe@box.local stays in a subject\r\n"
        b"Message-ID: <1@box.local>\r\n"
        b"\r\n" + BODY)
    assert [(r.recipient.address, r.outcome) for r in report.results] == [
        ("carol@remote.test", Outcome.SENT), ("root@box.local", Outcome.SENT)]
    assert f"SIZE={len(HEAD + BODY)}" in message.mail_options  # (announced as queued, as Postfix does)


async def test_a_spooled_message_streams_through_with_its_header_swapped(smtp_peer, tmp_path):
    peer = await smtp_peer()
    body = big_message(600_000, long_line=False).split(b"\r\n\r\n", 1)[1]
    content = spooled(tmp_path, HEAD + body)
    await deliver(make_transport(generic()), make_request(peer.port, content))
    [message] = peer.messages
    head, _, rest = message.content.partition(b"\r\n\r\n")
    assert head.startswith(b"From: Joe <joe.user@example.com>\r\n") and rest == body
    big_body = body * 8  # ~5 MB, to a peer that keeps none of it: the message is never held whole
    sink, received = await hashing_peer()
    request = make_request(sink.sockets[0].getsockname()[1], spooled(tmp_path, HEAD + big_body))
    tracemalloc.start()
    try:
        report = await deliver(make_transport(generic()), request)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        sink.close()
        await sink.wait_closed()
    assert [r.outcome for r in report.results] == [Outcome.SENT]
    assert received == [hashlib.sha256(head + b"\r\n\r\n" + big_body).hexdigest()]
    assert peak < len(big_body) // 4, peak  # (~8 chunks: socket buffers, the peer's reader, the header)


async def hashing_peer() -> tuple[asyncio.Server, list[str]]:
    """An SMTP peer on loopback that keeps only the SHA-256 of each message it takes (dot-stuffing undone)."""
    received: list[str] = []

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"DATA":
                writer.write(b"354 go on\r\n")
                digest = hashlib.sha256()
                while (line := await reader.readline()) not in (b".\r\n", b""):
                    digest.update(line[1:] if line.startswith(b".") else line)
                received.append(digest.hexdigest())
            writer.write(b"221 bye\r\n" if verb == b"QUIT" else b"250 ok\r\n")
            if verb == b"QUIT":
                break
        writer.close()

    return await asyncio.start_server(session, "127.0.0.1", 0), received


async def test_nothing_mapped_sends_the_message_as_it_is(smtp_peer):
    peer = await smtp_peer()
    content = b"From: carol@remote.test\r\nTo: dave@remote.test\r\n\r\nx\r\n"
    await deliver(make_transport(generic()), make_request(peer.port, Content.of(content), sender="carol@remote.test"))
    assert [(m.mail_from, m.content) for m in peer.messages] == [("carol@remote.test", content)]


async def test_a_table_that_cannot_answer_defers_every_recipient_before_any_session(smtp_peer):
    peer = await smtp_peer()
    request = make_request(peer.port, Content.of(HEAD + BODY), "carol@remote.test", "dave@remote.test")
    report = await deliver(make_transport(generic("fail:down")), request)
    assert {(r.outcome, r.dsn) for r in report.results} == {(Outcome.DEFERRED, "4.3.0")}
    assert "smtp_generic_maps lookup error" in report.results[0].text
    assert peer.messages == []


async def test_an_address_probe_says_the_mapped_addresses(smtp_peer):
    peer = await smtp_peer()
    peer.handler.rcpt_replies["admin@example.com"] = "550 5.1.1 unknown"
    report = await deliver(make_transport(generic()),
                           make_request(peer.port, Content(), "root@box.local", verify=True))
    assert [(r.recipient.address, r.outcome) for r in report.results] == [("root@box.local", Outcome.BOUNCED)]


def sqlite_table(tmp_path, rows: dict[str, str]) -> str:
    db = tmp_path / "generic.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE m (k TEXT PRIMARY KEY, v TEXT)")
        con.executemany("INSERT INTO m VALUES (?, ?)", rows.items())
    con.close()
    (tmp_path / "generic.cf").write_text(f"dbpath = {db}\nquery = SELECT v FROM m WHERE k='%s'\n")
    return f"sqlite:{tmp_path / 'generic.cf'}"


UNSENDABLE = {
    "crlf@box.local": '"x\r\nRCPT TO:<victim@evil.test>"@example.com',  # a command of its own, and a header line
    "nul@box.local": "ann\x00z@example.com",
    "del@box.local": "ann\x7f@example.com",
}


@pytest.mark.parametrize("queued", sorted(UNSENDABLE))
async def test_a_result_that_would_forge_a_command_defers_and_never_reaches_the_wire(smtp_peer, tmp_path, caplog,
                                                                                     queued):
    peer = await smtp_peer()
    maps = generic(sqlite_table(tmp_path, UNSENDABLE))
    request = make_request(peer.port, Content.of(b"From: " + queued.encode() + b"\r\n\r\nx\r\n"), sender=queued)
    report = await deliver(make_transport(maps), request)
    assert {(r.outcome, r.dsn) for r in report.results} == {(Outcome.DEFERRED, "4.3.0")}
    assert "generic.cf" in report.results[0].text and "control character" in report.results[0].text
    assert "\r" not in report.results[0].text and "\x00" not in report.results[0].text
    assert any(r.getMessage().startswith("Q1: smtp_generic_maps: table sqlite:") for r in caplog.records)
    assert peer.messages == []


UTF8_TABLE = "inline:{ {jöe@box.local = joe@example.com}, {ann@box.local = änn@example.com} }"


async def test_a_utf8_address_sent_as_ascii_needs_no_smtputf8(smtp_peer):
    peer = await smtp_peer(enable_SMTPUTF8=False)
    request = make_request(peer.port, Content.of(b"From: carol@remote.test\r\n\r\nx\r\n"), sender="jöe@box.local",
                           smtputf8=True)
    report = await deliver(make_transport(generic(UTF8_TABLE)), request)
    assert [r.outcome for r in report.results] == [Outcome.SENT]
    assert [m.mail_from for m in peer.messages] == ["joe@example.com"]


async def test_an_ascii_address_sent_as_utf8_asks_for_smtputf8(smtp_peer):
    with_it, without = await smtp_peer(enable_SMTPUTF8=True), await smtp_peer(enable_SMTPUTF8=False)
    content = Content.of(b"From: carol@remote.test\r\n\r\nx\r\n")
    await deliver(make_transport(generic(UTF8_TABLE)), make_request(with_it.port, content, sender="ann@box.local"))
    [message] = with_it.messages
    assert (message.mail_from, message.smtputf8) == ("änn@example.com", True)
    report = await deliver(make_transport(generic(UTF8_TABLE)), make_request(without.port, content,
                                                                              sender="ann@box.local"))
    assert [(r.outcome, r.dsn) for r in report.results] == [(Outcome.BOUNCED, "5.6.7")] and without.messages == []


async def test_a_header_address_mapped_to_utf8_needs_smtputf8(smtp_peer):
    with_it, without = await smtp_peer(enable_SMTPUTF8=True), await smtp_peer(enable_SMTPUTF8=False)
    content = Content.of(b"From: ann@box.local\r\n\r\nx\r\n")
    for peer in (with_it, without):
        report = await deliver(make_transport(generic(UTF8_TABLE)),
                               make_request(peer.port, content, sender="carol@remote.test"))
    [message] = with_it.messages
    assert (message.smtputf8, message.content) == (True, "From: änn@example.com\r\n\r\nx\r\n".encode())
    assert [(r.outcome, r.dsn) for r in report.results] == [(Outcome.BOUNCED, "5.6.7")] and without.messages == []


def test_a_header_section_too_long_to_map_goes_as_queued_with_a_warning(caplog):
    from mailflow.message import HEADER_READ_LIMIT
    head = b"From: joe@box.local\r\n" + b"X-Filler: " + b"x" * HEADER_READ_LIMIT + b"\r\n\r\n"
    request = DeliveryRequest("Q5", "carol@remote.test", (Recipient(0, "dave@remote.test", "dave@remote.test"),),
                              "x", Content.of(head + b"body\r\n"))
    assert generic().wire_form(request).head is None
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"Q5: header section longer than {HEADER_READ_LIMIT} bytes: smtp_generic_maps leaves its addresses as queued"]


class ThreadRecordingMaps(GenericMaps):
    """GenericMaps that note the thread each wire_form runs in."""

    threads: list[threading.Thread]

    def wire_form(self, request):
        self.threads.append(threading.current_thread())
        return super().wire_form(request)


async def test_the_header_of_a_spooled_or_big_message_is_mapped_off_the_event_loop(smtp_peer, tmp_path):
    peer = await smtp_peer()
    config = CONFIG
    rewriter = Rewriter(config)
    maps = ThreadRecordingMaps(TableCache().open([TABLE]), delimiter=config.recipient_delimiter,
                               qualify=rewriter.qualify, find_address=rewriter.find_address)
    maps.threads = []
    big_head = HEAD[:-2] + b"Cc: " + b", ".join(b"u%d@box.local" % i for i in range(2000)) + b"\r\n\r\n"
    transport = make_transport(maps)
    try:
        for content in (Content.of(HEAD + BODY), Content.of(big_head + BODY), spooled(tmp_path, HEAD + BODY * 20_000)):
            await transport.deliver(make_request(peer.port, content))
    finally:
        await transport.close()
    loop_thread = threading.current_thread()
    assert [thread is loop_thread for thread in maps.threads] == [True, False, False]
    assert len(peer.messages) == 3 and b"Cc: u0@example.com, u1@example.com" in peer.messages[1].content


def test_one_table_value_is_parsed_once_for_many_addresses():
    from mailflow.header_addresses import value_addresses
    value_addresses.cache_clear()
    maps = generic()
    assert [maps.address(f"u{i}@box.local") for i in range(100)] == [f"u{i}@example.com" for i in range(100)]
    assert value_addresses.cache_info().misses == 1  # `@example.com`, tokenized once (a 5000-address header: 2x)


async def test_a_recipient_screened_out_is_not_mapped_and_the_others_go(smtp_peer):
    peer = await smtp_peer()
    request = make_request(peer.port, Content.of(HEAD + BODY), "bad\x01@box.local", "sam@box.local")
    report = await deliver(make_transport(generic()), request)
    assert [(r.outcome, r.dsn) for r in report.results] == [(Outcome.BOUNCED, "5.1.3"), (Outcome.SENT, "2.0.0")]
    assert [m.rcpt_tos for m in peer.messages] == [["sam@example.com"]]


async def test_a_job_of_more_than_a_slice_says_every_recipient_mapped(monkeypatch, smtp_peer):
    """A job of more than trouble.SLICE recipients makes its RCPT commands a slice a loop turn (proto's
    `_rcpt_commands_in_slices`): each says its address as mapped, as a job of few does, and the header is swapped."""
    monkeypatch.setattr(trouble, "SLICE", 10)
    peer = await smtp_peer()
    queued = [f"u{i:02d}@box.local" for i in range(25)]
    report = await deliver(make_transport(generic()), make_request(peer.port, Content.of(HEAD + BODY), *queued))
    [message] = peer.messages
    assert message.rcpt_tos == [f"u{i:02d}@example.com" for i in range(25)]
    assert message.content.startswith(b"From: Joe <joe.user@example.com>\r\n")
    assert [(r.recipient.address, r.outcome) for r in report.results] == [(a, Outcome.SENT) for a in queued]


async def test_the_relay_client_s_generic_maps_and_header_checks_lines_are_relay_smtp_s(smtp_peer, caplog, tmp_path):
    """Postfix's relay process (`-o syslog_name=postfix/$service_name`) writes every line as relay/smtp, those of
    smtp_generic_maps and smtp_header_checks too (their names stay smtp_*: relay runs smtp(8) with its settings);
    the smtp transport's stay smtp's."""
    from mailflow.clock import VirtualClock
    from mailflow.logs import service_of
    from mailflow.routing.router import Router
    from mailflow.transports import build_transports

    peer = await smtp_peer()
    (tmp_path / "checks").write_text("/^Subject:/ WARN subject seen\n")
    config = Config(myhostname="box.local", mydestination=("box.local",), myorigin="example.org",
                    smtp={"tls_security_level": "none", "generic_maps": [TABLE],
                          "header_checks": [f"regexp:{tmp_path}/checks"]})
    transports = build_transports(config, StaticResolver(), VirtualClock(), Router(config))
    caplog.set_level(logging.INFO, "mailflow")
    for name in ("relay", "smtp"):
        await deliver(transports[name], make_request(peer.port, Content.of(b"Subject: s\r\n\r\nx\r\n"),
                                                     sender="two@box.local"))
    lines = [(service_of(r), r.getMessage()) for r in caplog.records if r.name.startswith("mailflow.")
             and ("generic_maps" in r.getMessage() or "subject seen" in r.getMessage())]
    assert lines == [
        ("relay/smtp", "Q1: warning: header Subject: s: subject seen"),
        ("relay/smtp", "Q1: multi-valued smtp_generic_maps result for two@box.local"),
        ("smtp", "Q1: warning: header Subject: s: subject seen"),
        ("smtp", "Q1: multi-valued smtp_generic_maps result for two@box.local"),
    ]


@pytest.mark.parametrize("field, sent", [
    (b"<@r.test:a@z.test>", b"<a@w.test>"),                          # the route asked in the local part, dropped
    (b"<@[IPv6:2001:db8::1]:a@z.test>", b"<a@w.test>"),               # the route ends at the `:` after the literal
    (b"<@[IPv6:2001:db8::1],@[192.0.2.1]:a@z.test>", b"<a@w.test>"),  # (review of hunt-finalB #4)
])
def test_a_routed_header_address_loses_its_whole_route_when_mapped(field, sent):
    request = DeliveryRequest("Q8", "s@remote.test", (Recipient(0, "r@remote.test", "r@remote.test"),), "x",
                              Content.of(b"Cc: " + field + b"\r\n\r\nx\r\n"))
    wire = generic("inline:{ {@z.test = @w.test} }").wire_form(request)
    assert wire.head is not None and wire.head[1] == b"Cc: " + sent + b"\r\n"
