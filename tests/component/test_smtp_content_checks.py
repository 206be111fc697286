"""smtp_header_checks, smtp_mime_header_checks, smtp_nested_header_checks, smtp_body_checks ([smtp] header_checks
and the like): the SMTP client edits the content of outgoing mail as it streams it to a capturing peer on loopback,
with smtp(8)'s actions only (Postfix's hbc_action), logged as Postfix's smtp logs them; generic maps work on the
checked header."""
from __future__ import annotations

import logging
import time

import pytest

from mailflow.config import LmtpConfig, SmtpConfig
from mailflow.content import Content
from mailflow.dns import StaticResolver
from mailflow.model import DeliveryRequest, Outcome, Recipient
from mailflow.tables import TableCache
from mailflow.transports.encode import encode
from mailflow.transports.generic import GenericMaps
from mailflow.transports.smtp import SmtpTransport
from mailflow.transports.smtp_checks import LINE_PIECE, OutboundChecks
from tests.support import big_message, spooled
from tests.support.content import lookups_seen

PRIVACY = ("/^Received:.*with ESMTPSA/ IGNORE", "/^X-Originating-IP:/ IGNORE", "/^User-Agent:/ IGNORE",
           "/^Subject: (.*)/ REPLACE Subject: [ext] $1", "/^X-Warn:/ WARN stripped soon", "/^X-Info:/ INFO",
           "/^X-Pre:/ PREPEND X-Added: yes", "/^X-Reject:/ REJECT no", "/^X-Bad:/ REPLACE not a header",
           "/^Content-Type:/ IGNORE")
HEAD = (b"Received: from pc (pc [10.0.0.5])\r\n\tby mx with ESMTPSA id 1\r\n"
        b"Received: from a by b with ESMTP id 2\r\n"
        b"X-Originating-IP: 10.0.0.5\r\n"
        b"User-Agent: Thunderbird\r\n"
        b"Subject: hello\r\n"
        b"X-Warn: 1\r\nX-Info: 2\r\nX-Pre: 3\r\nX-Reject: 4\r\nX-Bad: 5\r\n"
        b"From: joe@box.local\r\n"
        b"Content-Type: text/plain\r\n")
BODY = b"\r\nsecret line\r\nkeep\r\nwarn me\r\n"


@pytest.fixture
def checks(tmp_path):
    """checks(header=lines or a table spec, mime=..., nested=..., body=...) -> OutboundChecks (lines: a regexp
    file)."""
    tables = TableCache()

    def make(header=(), mime=(), nested=(), body=()) -> OutboundChecks:
        specs = []
        for kind, lines in zip(("header", "mime", "nested", "body"), (header, mime, nested, body)):
            if isinstance(lines, str):
                specs.append(tables.open([lines]))
                continue
            (tmp_path / kind).write_text("".join(f"{line}\n" for line in lines))
            specs.append(tables.open([f"regexp:{tmp_path / kind}"]) if lines else [])
        return OutboundChecks(*specs)
    return make


def make_request(port: int, content: Content, **kw) -> DeliveryRequest:
    return DeliveryRequest("Q1", "joe@box.local", (Recipient(0, "carol@remote.test", "carol@remote.test"),),
                           f"[127.0.0.1]:{port}", content, **kw)


async def deliver(request: DeliveryRequest, outbound: OutboundChecks | None, generic: GenericMaps | None = None):
    config = SmtpConfig(tls_security_level="none", connect_timeout=2, helo_timeout=2, command_timeout=2,
                        data_timeout=2)
    transport = SmtpTransport(config, resolver=StaticResolver(), helo_name="box.local", checks=outbound,
                              generic=generic)
    try:
        return await transport.deliver(request)
    finally:
        await transport.close()


async def test_the_privacy_recipe_strips_and_edits_headers_as_they_go_out_logged_as_postfix(smtp_peer, caplog,
                                                                                          checks):
    peer = await smtp_peer()
    caplog.set_level(logging.INFO, "mailflow.smtp")
    report = await deliver(make_request(peer.port, Content.of(HEAD + BODY)), checks(PRIVACY))
    assert [r.outcome for r in report.results] == [Outcome.SENT]
    [message] = peer.messages
    assert message.content == (
        b"Received: from a by b with ESMTP id 2\r\n"
        b"Subject: [ext] hello\r\n"
        b"X-Warn: 1\r\nX-Info: 2\r\nX-Added: yes\r\nX-Pre: 3\r\nX-Reject: 4\r\nX-Bad: 5\r\n"
        b"From: joe@box.local\r\n"
        b"Content-Type: text/plain\r\n"  # a MIME header: smtp_mime_header_checks only (none here)
        + BODY)
    lines = [r.getMessage() for r in caplog.records]
    assert "Q1: replace: header Subject: hello: Subject: [ext] hello" in lines
    assert "Q1: warning: header X-Warn: 1: stripped soon" in lines
    assert "Q1: info: header X-Info: 2" in lines
    assert "Q1: prepend: header X-Pre: 3: X-Added: yes" in lines
    assert "unsupported command in smtp_header_checks map: REJECT no" in lines
    assert 'bad REPLACE header text "not a header" in smtp_header_checks map -- need "headername: headervalue"' \
        in lines
    assert not any("IGNORE" in line or "User-Agent" in line for line in lines)  # IGNORE is not logged


async def test_body_checks_edit_lines_of_a_spooled_message_as_it_streams(smtp_peer, tmp_path, checks):
    peer = await smtp_peer()
    body = big_message(600_000, long_line=False).split(b"\r\n\r\n", 1)[1]
    content = spooled(tmp_path, b"Subject: s\r\n\r\nsecret line\r\n" + body + b"warn me\r\n")
    outbound = checks(body=["/^secret/ IGNORE", "/^warn me$/ REPLACE [edited]"])
    await deliver(make_request(peer.port, content), outbound)
    [message] = peer.messages
    assert message.content == b"Subject: s\r\n\r\n" + body + b"[edited]\r\n"


MIME = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\nSubject: m\r\n\r\n"
        b"preamble secret\r\n--b1\r\nContent-Type: text/plain\r\nX-Part: 1\r\n\r\nsecret\r\n--b1\r\n"
        b"Content-Type: message/rfc822\r\n\r\nX-Nested: n\r\n\tfolded\r\nSubject: inner\r\n\r\nsecret inner\r\n"
        b"--b1--\r\nepilogue\r\n")


def test_part_headers_go_through_mime_and_nested_checks_and_boundaries_are_body_lines(checks, caplog):
    caplog.set_level(logging.INFO, logger="mailflow.smtp")
    outbound = checks(mime=["/^X-Part:/ IGNORE", "/^MIME-Version:/ REPLACE MIME-Version: 1.0 (x)"],
                      nested=["/^X-Nested: n\\n\\tfolded/ IGNORE"],
                      body=["/^secret/ REPLACE hidden", "/^--b1/ WARN boundary seen"])
    head, rest = MIME.split(b"\r\n\r\n", 1)
    head += b"\r\n"
    rest = b"\r\n" + rest
    assert outbound.head("Q1", head) == head.replace(b"1.0\r\n", b"1.0 (x)\r\n", 1)
    for size in (1, 7, 4096):
        caplog.clear()
        chunks = [(head + rest)[i:i + size] for i in range(0, len(head + rest), size)]
        sent = b"".join(encode(chunks, outbound.body("Q1", head)))
        assert sent == head + rest.replace(b"X-Part: 1\r\n", b"").replace(b"X-Nested: n\r\n\tfolded\r\n", b"") \
            .replace(b"secret inner", b"hidden") \
            .replace(b"\r\nsecret\r\n", b"\r\nhidden\r\n"), size
        seen = [r.getMessage() for r in caplog.records if "boundary seen" in r.getMessage()]
        # (as Postfix 3.7.11's smtp: `warning: body --b1: boundary-seen` for each boundary, the closing one too)
        assert seen == ["Q1: warning: body --b1: boundary seen"] * 2 + ["Q1: warning: body --b1--: boundary seen"]


def test_a_part_header_section_ends_at_a_line_that_is_no_header_field(checks):
    """Postfix's mime_state: the first line that is no header field ends a part's header section and is a body
    line (3.7.11's smtp: `warning: body after garbage: ...`); body checks are not skipped up to an empty line."""
    outbound = checks(mime=["/^X-Garbage-Part:/ IGNORE"], body=["/^secret/ REPLACE hidden"])
    head = b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n"
    rest = b"\r\n--b1\r\nX-Garbage-Part: 1\r\nsecret not a header line\r\nsecret after\r\nX-Not-Part: 2\r\n--b1--\r\n"
    sent = b"".join(encode([head + rest], outbound.body("Q1", head)))
    assert sent == head + b"\r\n--b1\r\nhidden\r\nhidden\r\nX-Not-Part: 2\r\n--b1--\r\n"


def test_the_tail_of_a_line_sent_in_pieces_is_no_boundary_wherever_the_chunks_end(checks):
    """A line longer than LINE_PIECE goes on in pieces; its tail is no line of its own (Postfix never looks for
    a boundary at the start of a continued record): the same parse for any chunk split."""
    outbound = checks(mime=["/^X-Part:/ IGNORE"], body=["/^secret/ REPLACE hidden"])
    head = b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n"
    content = head + b"\r\n--b1\r\n\r\n" + b"x" * LINE_PIECE + b"--b1\r\nX-Part: 1\r\nsecret\r\n--b1--\r\n"
    cut = content.index(b"--b1\r\nX-Part") + 4
    expected = content.replace(b"secret", b"hidden")  # (X-Part is a body line: no part header section began)
    for chunks in ([content], [content[:cut], content[cut:]], [content[:cut - 4], content[cut - 4:]]):
        assert b"".join(encode(chunks, outbound.body("Q1", head))) == expected


def test_a_part_header_line_too_long_to_hold_goes_on_as_it_streams(checks):
    """What a part's header section holds is bounded (FIELD_LIMIT): a longer line goes out unchecked as it comes,
    not held until its line end."""
    outbound = checks(mime=["/^X-Long:/ IGNORE"], body=["/^secret/ REPLACE hidden"])
    head = b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n"
    encoder = outbound.body("Q1", head)
    sent = encoder.feed(head + b"\r\n--b1\r\nX-Short: 1\r\nX-Long: ")
    chunk = b"x" * 65536
    for _ in range(32):  # 2 MiB of one line
        sent += encoder.feed(chunk)
        assert len(sent) > len(head) + 2 * 65536 or _ < 2
    sent += encoder.feed(b"\r\n\tstill long\r\nX-Other: 2\r\n\r\nsecret\r\n--b1--\r\n") + encoder.flush()
    assert sent == head + b"\r\n--b1\r\nX-Short: 1\r\nX-Long: " + chunk * 32 + \
        b"\r\n\tstill long\r\nX-Other: 2\r\n\r\nhidden\r\n--b1--\r\n"


LONG = [b"b1"] + [b"%02d" % i + b"c" * 60000 for i in range(20)]


@pytest.mark.parametrize(("body", "seconds"), [
    (b"".join(b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1) for i in range(1, 20000))
     + b"-- \r\n" * 20000, 5),  # nesting without end, then lines a boundary might start (was 41 s)
    (b"--b1\r\n" + b"X-A: 1\r\n" * 200_000 + b"\r\nbody\r\n--b1--\r\n", 5),  # a part header of many fields
    (b"--b1\r\nX-Long: a\r\n" + b" x\r\n" * 16000 + b"\r\nbody\r\n--b1--\r\n", 0.5),  # one field of many lines
    (b"".join(b"--%s\r\nContent-Type: multipart/mixed; boundary=%s\r\n\r\n" % (LONG[i], LONG[i + 1]) for i in range(20))
     + b"--c\r\n" * 400_000, 5),  # long boundaries open, then lines a boundary might start
], ids=["nesting", "fields", "folded", "long-boundaries"])
def test_the_walk_costs_each_byte_a_bounded_amount_of_work(checks, body, seconds):
    """Postfix bounds the open boundaries (mime_nesting_limit 100, mime_boundary_length_limit 2048); mailflow too,
    and counts what it holds as it goes: the hostile shapes that were quadratic (tens of seconds) take well under
    a few seconds of event-loop time."""
    outbound = checks(mime=["/^X-B:/ IGNORE"], body=["/^secret/ REPLACE hidden"])
    head = b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n"
    content = head + b"\r\n" + body
    started = time.process_time()
    sent = b"".join(encode([content], outbound.body("Q", head)))
    assert sent == content
    assert time.process_time() - started < seconds


def test_a_long_line_is_matched_in_pieces_as_postfix_queues_it(checks):
    outbound = checks(body=["/^y+$/ REPLACE z"])
    head = b"Subject: s\r\n"
    content = head + b"\r\n" + b"x" * 10 + b"y" * LINE_PIECE + b"\r\n" + b"y" * (LINE_PIECE + 5) + b"\r\n"
    sent = b"".join(encode([content], outbound.body("Q1", head)))
    assert sent == head + b"\r\n" + b"x" * 10 + b"y" * (LINE_PIECE - 10) + b"z\r\n" + b"z" + b"z\r\n"


async def test_generic_maps_rewrite_the_checked_header(smtp_peer, checks):
    peer = await smtp_peer()
    from mailflow.config import Config
    from mailflow.routing.rewrite import Rewriter
    config = Config(myhostname="box.local", mydestination=("box.local",))
    rewriter = Rewriter(config)
    generic = GenericMaps(TableCache().open(["inline:{ {joe@box.local = joe.user@example.com} }"]),
                          delimiter="+", qualify=rewriter.qualify, find_address=rewriter.find_address)
    outbound = checks(["/^User-Agent:/ IGNORE", "/^X-Pre:/ PREPEND Reply-To: joe@box.local"])
    await deliver(make_request(peer.port, Content.of(b"User-Agent: x\r\nX-Pre: 1\r\nFrom: joe@box.local\r\n\r\nb\r\n")),
                  outbound, generic)
    [message] = peer.messages
    assert message.mail_from == "joe.user@example.com"
    assert message.content == (b"Reply-To: joe.user@example.com\r\nX-Pre: 1\r\nFrom: joe.user@example.com\r\n"
                               b"\r\nb\r\n")


async def test_a_header_check_that_cannot_answer_defers_before_any_session(smtp_peer, caplog, checks):
    peer = await smtp_peer()
    report = await deliver(make_request(peer.port, Content.of(b"Subject: s\r\n\r\nb\r\n")), checks("fail:down"))
    assert [(r.outcome, r.dsn) for r in report.results] == [(Outcome.DEFERRED, "4.3.0")]
    assert "Q1: smtp header checks lookup error" in caplog.text
    assert peer.messages == []


async def test_an_address_probe_looks_nothing_up(smtp_peer, caplog, checks):
    peer = await smtp_peer()
    caplog.set_level(logging.INFO, "mailflow.smtp")
    report = await deliver(make_request(peer.port, Content(), verify=True), checks("fail:down", body="fail:down"))
    assert [r.outcome for r in report.results] == [Outcome.SENT]


@pytest.mark.parametrize("setting", ["header_checks", "mime_header_checks", "nested_header_checks", "body_checks"])
def test_the_settings_are_table_lists_checked_at_load(setting):
    from pydantic import ValidationError
    assert getattr(SmtpConfig(**{setting: ["regexp:/etc/x"]}), setting) == ("regexp:/etc/x",)
    with pytest.raises(ValidationError):
        SmtpConfig(**{setting: ["nosuchtype:/etc/x"]})


@pytest.mark.parametrize(("section", "setting"), [
    *((SmtpConfig, name) for name in ("mime_header_checks", "nested_header_checks", "body_checks", "reply_filter")),
    *((LmtpConfig, name) for name in ("mime_header_checks", "nested_header_checks", "body_checks"))])
def test_a_table_whose_lookup_may_wait_is_refused_where_each_line_is_looked_up_on_the_loop(section, setting):
    """These are looked up on the event loop for each line as the content streams: a sqlite: or unix: lookup would
    hold up every session (header_checks, asked once per message, runs off the loop and may be any type)."""
    from pydantic import ValidationError
    for spec in ("sqlite:/etc/x.cf", "unix:passwd.byname"):
        with pytest.raises(ValidationError, match="lookup may wait"):
            section(**{setting: ["regexp:/etc/y", spec]})
    assert section(header_checks=["sqlite:/etc/x.cf"]).header_checks == ("sqlite:/etc/x.cf",)


async def test_a_body_check_that_cannot_answer_ends_the_session_and_defers(smtp_peer, checks, caplog):
    peer = await smtp_peer()
    report = await deliver(make_request(peer.port, Content.of(b"Subject: s\r\n\r\nb\r\n")), checks(body="fail:down"))
    assert [(r.outcome, r.dsn, r.text) for r in report.results] == [
        (Outcome.DEFERRED, "4.3.0", "local data error while talking to 127.0.0.1[127.0.0.1]")]
    assert not report.site_ok  # (Postfix's smtp_bulk_fail with THROTTLE)
    assert "Q1: smtp body checks lookup error" in caplog.text
    assert peer.messages == []


# ---------------------------------------------------------------------------------------- smtp_reply_filter


async def reply_filtered(request: DeliveryRequest, tables: list[str]):
    config = SmtpConfig(tls_security_level="none", connect_timeout=2, helo_timeout=2, command_timeout=2,
                        data_timeout=2, reply_filter=tuple(tables))
    transport = SmtpTransport(config, resolver=StaticResolver(), helo_name="box.local")
    try:
        return await transport.deliver(request)
    finally:
        await transport.close()


async def test_the_reply_filter_rewrites_each_reply_line_before_it_is_parsed_and_logs_it(smtp_peer, tmp_path,
                                                                                          caplog):
    peer = await smtp_peer()
    peer.handler.rcpt_replies["carol@remote.test"] = "550 5.7.1 <carol@remote.test>: blocked"
    table = tmp_path / "reply_filter"
    table.write_text("/^550 5\\.7\\.1 (.*)$/ 450 4.7.1 $1 (softened)\n")
    caplog.set_level(logging.INFO, "mailflow.smtp")
    report = await reply_filtered(make_request(peer.port, Content.of(b"Subject: s\r\n\r\nb\r\n")),
                                  [f"regexp:{table}"])
    assert [(r.outcome, r.dsn, r.text) for r in report.results] == [
        (Outcome.DEFERRED, "4.7.1", "host 127.0.0.1[127.0.0.1] said: 450 4.7.1 <carol@remote.test>: blocked "
                                    "(softened) (in reply to RCPT TO command)")]
    assert (f'127.0.0.1[127.0.0.1]:{peer.port}: replacing server reply "550 5.7.1 <carol@remote.test>: blocked" '
            'with "450 4.7.1 <carol@remote.test>: blocked (softened)"') in [r.getMessage() for r in caplog.records]


async def test_a_reply_filter_that_cannot_answer_ends_the_session_with_a_local_data_error(smtp_peer, caplog):
    peer = await smtp_peer()
    report = await reply_filtered(make_request(peer.port, Content.of(b"Subject: s\r\n\r\nb\r\n")), ["fail:down"])
    assert [(r.outcome, r.dsn, r.text) for r in report.results] == [
        (Outcome.DEFERRED, "4.3.0", "local data error while talking to 127.0.0.1[127.0.0.1]")]
    assert "Q1: table fail:down lookup error for 220 " in caplog.text
    assert not report.site_ok and peer.messages == []


@pytest.mark.parametrize("setting", ["header_checks", "body_checks", "reply_filter"])
def test_check_config_names_a_table_that_cannot_answer(setting, tmp_path):
    from mailflow.cli.server import table_problems
    from mailflow.config import Config
    config = Config(smtp=SmtpConfig(**{setting: [f"regexp:{tmp_path}/missing"]}))
    [problem] = table_problems(config, "mailflow.toml")
    assert (problem.file, problem.key) == ("mailflow.toml", f"smtp.{setting}")
    assert "missing" in problem.reason


def test_each_client_takes_its_own_sections_settings_and_none_set_builds_nothing(tmp_path):
    from mailflow.config import Config, LmtpConfig
    from mailflow.transports import build_outbound_checks
    (tmp_path / "h").write_text("/^X:/ IGNORE\n")
    config = Config(lmtp=LmtpConfig(header_checks=[f"regexp:{tmp_path}/h"]))
    assert build_outbound_checks(config.smtp, TableCache(), "smtp") is None  # (no per-message work)
    lmtp = build_outbound_checks(config.lmtp, TableCache(), "lmtp")
    assert lmtp is not None and lmtp.program == "lmtp" and lmtp.head("Q1", b"X: 1\r\nY: 2\r\n") == b"Y: 2\r\n"


def test_strip_removes_and_logs_and_a_tab_may_end_the_action_word(checks, caplog):
    """As Postfix 3.7.11's smtp: `strip: header X-Strip: 1: stripped`, `replace: header X-Tab: 1: X-Tab: replaced`
    (hbc_action: STRIP since 3.2; the action word ends at strcspn(cmd, " \\t"))."""
    caplog.set_level(logging.INFO, logger="mailflow.smtp")
    outbound = checks(header=["/^X-Strip:/ STRIP stripped", "/^X-Tab:/ REPLACE\tX-Tab: replaced"],
                      body=["/^drop$/ STRIP\tgone"])
    head = b"X-Strip: 1\r\nX-Tab: 1\r\nSubject: s\r\n"
    assert outbound.head("Q1", head) == b"X-Tab: replaced\r\nSubject: s\r\n"
    assert b"".join(encode([head + b"\r\ndrop\r\nkeep\r\n"], outbound.body("Q1", head))) == head + b"\r\nkeep\r\n"
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["Q1: strip: header X-Strip: 1: stripped", "Q1: replace: header X-Tab: 1: X-Tab: replaced",
                     "Q1: strip: body drop: gone"]


def test_only_postfixs_mime_headers_go_to_mime_header_checks(checks):
    """Postfix 3.7.11's smtp: `Content-Language: en` matched by smtp_header_checks (`warning: header
    Content-Language: en: cl-in-header-checks`), not smtp_mime_header_checks (header_opts.c HDR_OPT_MIME)."""
    outbound = checks(header=["/^Content-Language:/ REPLACE X-Was: header_checks"],
                      mime=["/^Content-Language:/ REPLACE X-Was: mime", "/^Content-Type:/ REPLACE X-Was: mime type"])
    head = b"Content-Language: en\r\nContent-Type: text/plain\r\n"
    assert outbound.head("Q1", head) == b"X-Was: header_checks\r\nX-Was: mime type\r\n"


async def test_a_header_check_table_past_its_deadline_is_named_in_the_deferral(smtp_peer, monkeypatch):
    """smtp_header_checks on a table that may wait, asked off the loop with a deadline (TableCache.run): past it the
    message is deferred naming the header checks, not smtp_generic_maps (which are not set)."""
    import time as clock

    import mailflow.tables.cache

    class SlowTable:  # (a sqlite: table's shape: blocking, its own deadline, and a lookup slower than that)
        name, fixed, blocking, timeout = "sqlite:/slow.cf", False, True, 0.05

        def lookup(self, key: str) -> str | None:
            clock.sleep(0.8)
            return None
    monkeypatch.setattr(mailflow.tables.cache, "open_table", lambda spec, **kw: SlowTable())
    tables = TableCache()
    outbound = OutboundChecks(tables.open(["sqlite:/slow.cf"]), [], [], [])
    peer = await smtp_peer()
    config = SmtpConfig(tls_security_level="none", connect_timeout=2, helo_timeout=2, command_timeout=2)
    transport = SmtpTransport(config, resolver=StaticResolver(), helo_name="box.local", checks=outbound, tables=tables)
    try:
        report = await transport.deliver(make_request(peer.port, Content.of(b"Subject: s\r\n\r\nb\r\n")))
    finally:
        await transport.close()
    [result] = report.results
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.3.0")
    assert "smtp header checks lookup error" in result.text and "generic" not in result.text
    assert peer.messages == []


def test_a_long_lines_pieces_are_the_same_wherever_the_chunks_end(checks):
    """A line of two whole pieces is looked up as those two pieces for any chunk split (no empty third piece
    when the chunk ends before its CR LF)."""
    outbound = checks(body=["/^$/ REPLACE EMPTY", "/^y+$/ REPLACE z"])
    head = b"Subject: s\r\n"
    content = head + b"\r\n" + b"y" * (2 * LINE_PIECE) + b"\r\nend\r\n"
    expected = head + b"\r\nzz\r\nend\r\n"
    for cut in range(len(content) - 12, len(content) - 3):
        assert b"".join(encode([content[:cut], content[cut:]], outbound.body("Q1", head))) == expected, cut


def test_a_header_too_long_to_check_is_read_and_reported_once_with_generic_maps(checks, caplog):
    """Past HEADER_READ_LIMIT the header goes out as queued: one warning naming the checks and the generic maps
    (it was read, and warned about, a second time by the maps)."""
    from mailflow.config import Config
    from mailflow.message import HEADER_READ_LIMIT
    from mailflow.routing.rewrite import Rewriter
    from mailflow.transports.smtp_checks import outbound_wire_form
    rewriter = Rewriter(Config(myhostname="box.local", mydestination=("box.local",)))
    generic = GenericMaps(TableCache().open(["inline:{ {joe@box.local = joe.user@example.com} }"]),
                          delimiter="+", qualify=rewriter.qualify, find_address=rewriter.find_address)
    head = b"From: joe@box.local\r\n" + b"X-Long: " + b"x" * HEADER_READ_LIMIT + b"\r\n"
    request = make_request(25, Content.of(head + b"\r\nbody\r\n"))
    wire = outbound_wire_form(request, checks(["/^X-Long:/ IGNORE"]), generic)
    assert wire.sender == "joe.user@example.com" and wire.head is None
    warned = [r.getMessage() for r in caplog.records if "header section longer" in r.getMessage()]
    assert warned == [f"Q1: header section longer than {HEADER_READ_LIMIT} bytes: smtp header and body checks and "
                      "smtp_generic_maps leave the message as queued"]


@pytest.mark.parametrize("in_file", [False, True])
async def test_a_long_key_is_matched_off_the_event_loop_in_the_message_s_order(smtp_peer, tmp_path, checks,
                                                                                 monkeypatch, in_file):
    """As cleanup's checks (content_checks.LONG_KEY): a header field longer than LONG_KEY sends the header pass to a
    worker thread, a content longer than LONG_KEY its body and part headers; a short message is matched on the loop
    as before; the order of the lookups and what goes out are unchanged."""
    import mailflow.transports.smtp_checks as module

    seen = lookups_seen(monkeypatch, module)
    outbound = checks(header=["/^X-Late:/ REPLACE X-Late: seen"], body=["/^z/ REPLACE edited"])
    peer = await smtp_peer()

    def content(data: bytes) -> Content:
        return spooled(tmp_path, data) if in_file else Content.of(data)

    await deliver(make_request(peer.port, content(b"X-A: 1\r\nX-Late: 1\r\n\r\nz\r\n")), outbound)
    assert peer.messages[-1].content == b"X-A: 1\r\nX-Late: seen\r\n\r\nedited\r\n"
    assert seen == [("X-A: ", not in_file), ("X-Lat", not in_file), ("z", True)]  # (a file's header: off the loop)
    seen.clear()
    long_field = b"X-Long: " + b"\r\n ".join([b"y" * 500] * 5)  # (folded: no line is cut at 998 octets)
    assert len(long_field) > module.LONG_KEY
    await deliver(make_request(peer.port, content(b"X-A: 1\r\n" + long_field + b"\r\nX-Late: 1\r\n\r\nz\r\n")),
                  outbound)
    assert peer.messages[-1].content == b"X-A: 1\r\n" + long_field + b"\r\nX-Late: seen\r\n\r\nedited\r\n"
    assert seen == [("X-A: ", False), ("X-Lon", False), ("X-Lat", False), ("z", False)]
    seen.clear()  # many fields each under LONG_KEY: the header section's size decides
    short_fields = b"".join(b"X-Many: " + b"y" * 900 + b"\r\n" for _ in range(4))
    await deliver(make_request(peer.port, content(short_fields + b"X-Late: 1\r\n\r\nz\r\n")), outbound)
    assert peer.messages[-1].content == short_fields + b"X-Late: seen\r\n\r\nedited\r\n"
    assert seen == [("X-Man", False)] * 4 + [("X-Lat", False), ("z", False)]


def test_a_pcre_result_that_is_not_utf8_goes_out_as_its_bytes(checks, tmp_path):
    """As Postfix's smtp(8) (checked with a private Postfix 3.7.11 and smtp-sink): a `$1` of a Latin-1 header, or
    one that cuts a character in two, is written as its bytes; it was a lookup error (the delivery deferred, or
    the session ended in the body)."""
    (tmp_path / "checks.pcre").write_bytes(b"/^X-Rep: (.*)$/ REPLACE X-Replaced: [$1]\n"
                                           b"/^cut body (\xc3\xa9+)(.)/ REPLACE body [$1][$2]\n")
    spec = f"pcre:{tmp_path / 'checks.pcre'}"
    outbound = checks(header=spec, body=spec)
    head = b"X-Rep: caf\xe9\r\nSubject: s\r\n"
    assert outbound.head("Q1", head) == b"X-Replaced: [caf\xe9]\r\nSubject: s\r\n"
    body = b"".join(encode([head + "\r\ncut body ééx\r\n".encode()], outbound.body("Q1", head)))
    assert body == head + b"\r\nbody [\xc3\xa9][\xc3]\r\n"
