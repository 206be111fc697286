"""The SMTP family's client core without sockets: the sans-IO reply parser, the Wire that queues replies in order,
the EHLO/LHLO extensions and the command builders (MAIL, RCPT, DSN parameters, envelope screening)."""
from __future__ import annotations

import asyncio
import cProfile
import pstats

import pytest

from mailflow.content import Content
from mailflow.model import DeliveryRequest, Outcome, Recipient
from mailflow.transports.downgrade import Downgrade
from mailflow.transports.smtp.addr import Peer
from mailflow.transports.smtp.chat import READ_AHEAD, ConnectionClosed, Wire
from mailflow.transports.smtp.commands import (
    Extensions,
    cannot_take,
    content_encoding,
    dsn_mail_params,
    dsn_rcpt_params,
    mail_command,
    rcpt_command,
    screen_envelope,
    xtext,
)
from mailflow.transports.smtp.reply import (
    GARBAGE_KEPT,
    MAX_LINE_LENGTH,
    MAX_REPLY_LENGTH,
    MAX_REPLY_LINES,
    MalformedReply,
    Reply,
    ReplyParser,
)
from tests.support.calls import callees


def replies(*chunks: bytes) -> list[Reply]:
    """Every complete reply in `chunks`, fed one chunk at a time."""
    parser, out = ReplyParser(), []
    for chunk in chunks:
        parser.receive_data(chunk)
        while (reply := parser.next_reply()) is not None:
            out.append(reply)
    return out


# ---------------------------------------------------------------------------------------------- the parser


def test_multi_line_reply_joins_its_texts_without_codes():
    [reply] = replies(b"250-lmtp.test\r\n250-PIPELINING\r\n250 SIZE 1000\r\n")
    assert (reply.code, reply.lines) == (250, ["lmtp.test", "PIPELINING", "SIZE 1000"])
    assert replies(b"354\r\n") == [Reply(354, "")]
    assert replies(b"220 bare LF\n") == [Reply(220, "bare LF")]


def test_replies_split_anywhere_come_out_whole_and_in_order():
    chunks = (b"250 2.1.0 Ok\r\n250-first\r", b"\n250-second\r\n250 2.1.5 last\r\n55", b"0 5.1.1 no\r\n")
    assert [(r.code, r.message) for r in replies(*chunks)] == [
        (250, "2.1.0 Ok"), (250, "first\nsecond\n2.1.5 last"), (550, "5.1.1 no")]
    parser = ReplyParser()
    parser.receive_data(b"250-partial\r\n250 ")
    assert parser.next_reply() is None and parser.buffered
    parser.clear()  # STARTTLS: what came before the handshake is dropped
    assert not parser.buffered
    parser.receive_data(b"220 fresh\r\n")
    assert parser.next_reply() == Reply(220, "fresh")


def test_lmtp_final_replies_are_one_reply_per_recipient():
    data = (b"250 2.0.0 <a@x.test> Saved\r\n452-4.2.2 <b@x.test> Mailbox is\r\n452 4.2.2 full\r\n"
            b"550 5.1.1 <c@x.test> User doesn't exist\r\n")
    got = replies(data)
    assert [(r.code, r.dsn()) for r in got] == [(250, "2.0.0"), (452, "4.2.2"), (550, "5.1.1")]
    assert got[1].one_line == "452-4.2.2 <b@x.test> Mailbox is 452 4.2.2 full"  # as Postfix logs it


@pytest.mark.parametrize("garbage", [
    b"hello there",  # no code
    b"25",  # too short
    b"2x0 ok",  # not digits
    b"250_ok",  # neither space nor hyphen after the code
    b"2500 ok",  # four digits
    b"",  # an empty line
])
def test_a_line_that_is_no_reply_line_is_read_past_into_the_next_reply_as_postfix_does(garbage):
    """Postfix's smtp_chat_resp warns and reads on: the reply is the one the next `ddd ` line ends, the garbage
    its first lines."""
    assert replies(garbage + b"\r\n") == []  # no reply yet: the next line decides
    [reply] = replies(garbage + b"\r\n550 5.1.1 no such user\r\n")
    assert (reply.code, reply.dsn(), reply.garbage, reply.garbage_count) == (550, "5.1.1", (garbage.decode(),), 1)
    assert reply.one_line == f"{garbage.decode()} 550 5.1.1 no such user".strip()
    [clean] = replies(b"550 5.1.1 no such user\r\n")
    assert (clean.garbage, clean.garbage_count) == ((), 0)


def test_of_many_garbage_lines_a_reply_keeps_a_few_and_counts_them_all():
    garbage = [f"junk {n}".encode() for n in range(GARBAGE_KEPT + 5)]
    [reply] = replies(b"\r\n".join(garbage) + b"\r\n250 2.0.0 Ok\r\n")
    assert reply.garbage == tuple(line.decode() for line in garbage[:GARBAGE_KEPT])
    assert (reply.garbage_count, reply.message, reply.code) == (GARBAGE_KEPT + 5, "2.0.0 Ok", 250)


def test_a_reply_whose_codes_change_takes_its_last_lines_code_as_postfix_does():
    [reply] = replies(b"250-first\r\n550 5.1.1 second\r\n")
    assert (reply.code, reply.dsn(), reply.one_line) == (550, "5.1.1", "250-first 550 5.1.1 second")


def test_a_multi_line_reply_reads_as_postfix_writes_it():
    [reply] = replies(b"550-5.1.1 The account does not exist.\r\n550-5.1.1 Please try\r\n"
                      b"550 5.1.1 https://support.example/?p=NoSuchUser x\r\n")
    assert reply.one_line == ("550-5.1.1 The account does not exist. 550-5.1.1 Please try "
                              "550 5.1.1 https://support.example/?p=NoSuchUser x")
    assert reply.message.splitlines()[1] == "5.1.1 Please try" and reply == Reply(550, reply.message)


def test_an_overlong_line_keeps_its_beginning_and_the_rest_is_dropped_as_postfix_does():
    assert MAX_LINE_LENGTH == 2048  # Postfix's line_length_limit
    [whole] = replies(b"550 5.1.1 " + b"x" * (MAX_LINE_LENGTH - 10) + b"\r\n")  # exactly the limit
    assert whole.message == "5.1.1 " + "x" * (MAX_LINE_LENGTH - 10)
    [cut, next_one] = replies(b"550 5.1.1 " + b"y" * 5000, b"z" * 70_000, b"\r\n250 2.0.0 next\r\n")
    assert (cut.code, cut.dsn(), cut.message) == (550, "5.1.1", "5.1.1 " + "y" * (MAX_LINE_LENGTH - 10))
    assert next_one == Reply(250, "2.0.0 next")
    parser = ReplyParser()
    parser.receive_data(b"250-" + b"x" * 70_000)  # no line end ever comes: nothing kept past the limit
    assert parser.next_reply() is None and len(parser._buffer) == 0


def test_an_overlong_line_ends_its_reply_only_at_its_line_end_as_postfix_smtp_get():
    """Postfix's smtp_get (SMTP_GET_FLAG_SKIP) reads past the rest of an overlong line before it returns the line:
    "250 " and 100 MB with no line end is no reply yet (the reply's timeout ends it), however much has come."""
    parser = ReplyParser()
    parser.receive_data(b"250 " + b"x" * 100_000)
    assert parser.next_reply() is None and parser.buffered
    parser.receive_data(b"y" * 100_000 + b"\r")
    assert parser.next_reply() is None and len(parser._buffer) == 0
    parser.receive_data(b"\n250 2.0.0 next\r\n")
    assert parser.next_reply() == Reply(250, "x" * (MAX_LINE_LENGTH - 4))
    assert parser.next_reply() == Reply(250, "2.0.0 next") and not parser.buffered


def test_too_many_lines_or_bytes_in_one_reply_is_malformed():
    [many] = replies(b"250-x\r\n" * (MAX_REPLY_LINES - 1) + b"250 2.0.0 end\r\n")
    kept = MAX_LINE_LENGTH // len(b"250-x\n") + 1  # lines are kept while those kept are shorter than the limit
    assert (many.code, len(many.wire), many.lines[-1], many.dsn()) == (250, kept, "2.0.0 end", "2.0.0")
    assert many.one_line == "250-x " * (kept - 1) + "250-x"  # the text as written stops there (Postfix's too)
    with pytest.raises(MalformedReply, match=f"over {MAX_REPLY_LINES} lines"):
        replies(b"250-x\r\n" * MAX_REPLY_LINES + b"250 end\r\n")
    line = b"250-" + b"y" * 1000 + b"\r\n"
    with pytest.raises(MalformedReply, match=f"over {MAX_REPLY_LENGTH} bytes"):
        replies(line * (MAX_REPLY_LENGTH // len(line) + 1) + b"250 end\r\n")


def test_text_that_is_not_utf8_is_replaced_not_passed_on():
    [reply] = replies(b"550 5.1.1 caf\xe9\r\n")
    assert reply.message == "5.1.1 caf\ufffd"
    reply.message.encode("utf-8")  # a diagnostic is always storable


def test_reply_codes_and_one_line():
    assert Reply(550, "no such user").dsn() == "5.0.0"
    assert Reply(250, "2.1.5 Ok").dsn() == "2.1.5"
    # a code of another class than the reply's is not the reply's: x.0.0, as Postfix's smtp_chat_resp makes it
    assert Reply(550, "4.2.2 mailbox full").dsn() == "5.0.0"
    assert Reply(250, "5.1.1 odd").dsn() == "2.0.0"
    assert Reply(421, "5.3.2 odd").dsn("4") == "4.0.0"
    assert Reply(550, "5.7.1 no").dsn("4") == "4.7.1"
    assert Reply(354, "go ahead").dsn() == "5.5.0"  # where 2xx, 4xx or 5xx was due: Postfix's protocol error
    assert Reply(354, "go ahead").dsn("4") == "4.5.0"
    assert Reply(421, "4.3.2 bye").dsn("4") == "4.3.2"
    assert Reply(999, "what").dsn() == "5.5.0"
    assert Reply(250, "2.0.0 first\n2.0.0 second").one_line == "250-2.0.0 first 250 2.0.0 second"
    assert Reply(550, "first\n5.7.1 second").dsn() == "5.7.1"  # the last line's, as Postfix takes it


# ---------------------------------------------------------------------------------------------- the wire


class FakeTransport(asyncio.Transport):
    def __init__(self):
        super().__init__()
        self.paused = False

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    def is_closing(self):
        return False


def wire() -> tuple[Wire, FakeTransport]:
    transport = FakeTransport()
    w = Wire()
    w.connection_made(transport)
    return w, transport


async def test_pipelined_replies_in_odd_chunks_come_out_in_order():
    reader, _ = wire()
    for chunk in (b"250 2.1.0 Ok\r\n250-first\r", b"\n250-second\r\n250 2.1.5 last\r\n55", b"0 5.1.1 no\r\n"):
        reader.data_received(chunk)
    got = [await reader.reply(1) for _ in range(3)]
    assert [(r.code, r.message) for r in got] == [
        (250, "2.1.0 Ok"), (250, "first\nsecond\n2.1.5 last"), (550, "5.1.1 no")]
    assert not reader.buffered


async def test_a_reply_that_arrives_later_wakes_the_reader():
    reader, _ = wire()
    waiting = asyncio.create_task(reader.reply(1))
    await asyncio.sleep(0)
    reader.data_received(b"354 go ahead\r\n")
    assert (await waiting).code == 354


async def test_timeout_and_connection_loss():
    reader, _ = wire()
    with pytest.raises(TimeoutError):
        await reader.reply(0.01)
    reader.data_received(b"250 queued before the end\r\n")
    reader.connection_lost(None)
    assert (await reader.reply(1)).code == 250  # what arrived before the loss is still read
    with pytest.raises(ConnectionClosed):
        await reader.reply(1)
    assert reader.failed


async def test_the_replies_waited_for_share_one_timer_and_each_wait_keeps_its_own_end():
    """Each wait times out at its own end (an earlier or a later one than the wait before's), the waits of a
    session setting the wire's one timer again only when theirs ends sooner: no timer made and cancelled a
    reply; a lost connection lets the timer go."""
    reader, _ = wire()
    loop = asyncio.get_running_loop()

    async def answered_soon(timeout: float) -> int:
        loop.call_later(0.01, reader.data_received, b"250 ok\r\n")
        return (await reader.reply(timeout)).code

    assert await answered_soon(5) == 250  # (the timer set for 5 s stays)
    started = loop.time()
    with pytest.raises(TimeoutError):
        await reader.reply(0.05)  # (sooner: set again)
    assert 0.04 <= loop.time() - started < 1
    profile = cProfile.Profile()
    profile.enable()
    try:
        codes = [await answered_soon(5) for _ in range(3)]
    finally:
        profile.disable()
    assert codes == [250] * 3
    by_the_wire = [(name, made) for (_, _, name), (*_, callers) in pstats.Stats(profile).stats.items()
                   if name in ("call_later", "call_at", "cancel")
                   for (caller_file, *_), (made, *_) in callers.items() if caller_file.endswith("chat.py")]
    assert by_the_wire == [("call_at", 1)]  # (the timer set for the first of them serves the others)
    started = loop.time()
    loop.call_later(0.15, reader.data_received, b"250 late\r\n")
    assert (await reader.reply(0.3)).code == 250  # (a later end than the timer set: waited for whole)
    assert loop.time() - started >= 0.14
    reader.connection_lost(None)
    assert reader._timer is None


async def test_garbage_waits_for_the_reply_after_it_and_an_endless_line_times_out():
    reader, _ = wire()
    reader.data_received(b"hello there\r\n")
    with pytest.raises(TimeoutError):
        await reader.reply(0.05)
    reader.data_received(b"250 2.0.0 Ok\r\n")
    assert (await reader.reply(1)).garbage == ("hello there",)
    endless, _ = wire()
    endless.data_received(b"250-" + b"x" * 70_000)  # cut at MAX_LINE_LENGTH; the reply is still not over
    with pytest.raises(TimeoutError):
        await endless.reply(0.05)


async def test_after_a_reply_too_long_nothing_more_is_read_as_a_reply():
    """The reply that ends an over-long one must not pass for the answer to the command (nor anything after it)."""
    reader, _ = wire()
    reader.data_received(b"250-x\r\n" * MAX_REPLY_LINES)
    reader.data_received(b"250 2.0.0 the end\r\n250 2.0.0 and more\r\n")
    with pytest.raises(MalformedReply, match="reply too long"):
        await reader.reply(1)
    with pytest.raises(MalformedReply):
        await reader.reply(1)


async def test_reading_pauses_while_too_many_replies_wait_unread():
    reader, transport = wire()
    reader.data_received(b"250 ok\r\n" * READ_AHEAD)
    assert transport.paused
    for _ in range(READ_AHEAD // 2 + 1):
        await reader.reply(1)
    assert not transport.paused


async def test_replies_read_ahead_are_parsed_as_they_are_taken(monkeypatch):
    """One read of many pipelined replies (256 KB: ~18 000 replies to RCPT) was parsed whole as it came, in one
    loop turn: READ_AHEAD at most wait parsed, the rest as the reader takes them, in order, reading paused until
    none is left; the replies read before a loss are all still taken, then the loss."""
    parsed: list[Reply] = []
    next_reply = ReplyParser.next_reply

    def counting(self):
        reply = next_reply(self)
        if reply is not None:
            parsed.append(reply)
        return reply

    monkeypatch.setattr(ReplyParser, "next_reply", counting)
    count = 3 * READ_AHEAD
    reader, transport = wire()
    reader.data_received(b"".join(b"250 2.1.5 r%d\r\n" % i for i in range(count)))
    assert len(parsed) == READ_AHEAD and transport.paused
    taken = []
    for _ in range(count):
        taken.append((await reader.reply(1)).message)
        assert len(parsed) - len(taken) <= READ_AHEAD
        assert transport.paused or len(parsed) == count
    assert taken == [f"2.1.5 r{i}" for i in range(count)] and not transport.paused and not reader.buffered
    lost, _ = wire()
    lost.data_received(b"250 ok\r\n" * count)
    lost.connection_lost(None)
    assert [(await lost.reply(1)).code for _ in range(count)] == [250] * count
    with pytest.raises(ConnectionClosed):
        await lost.reply(1)


async def test_a_reply_read_costs_no_line_end_method_nor_error_class_test():
    """A reply line's CR is found by a slice's test (every line passes there) and a read with no failure before it
    skips the failure's class test: the replies are the same, CRs and all."""
    reader, _ = wire()
    profile = cProfile.Profile()
    profile.runcall(reader.data_received, b"250 ok\r\n220-a\r\r\n220 b\n")
    assert [(await reader.reply(1)).one_line for _ in range(2)] == ["250 ok", "220-a 220 b"]
    assert "<built-in method builtins.isinstance>" not in callees(profile, "data_received", "chat.py")
    assert "<method 'endswith' of 'bytearray' objects>" not in callees(profile, "next_reply", "reply.py")


# ---------------------------------------------------------------------------------------------- commands


def request(*recipients: Recipient, sender="s@x.test", content=b"Subject: hi\r\n\r\nbody\r\n", **kw):
    rcpts = recipients or (Recipient(0, "r@y.test", "r@y.test"),)
    return DeliveryRequest("Q", sender, rcpts, "y.test", Content.of(content), **kw)


EVERYTHING = Extensions.from_reply(
    Reply(250, "mx.test\nPIPELINING\nSIZE 100\n8BITMIME\nSMTPUTF8\nDSN\nAUTH PLAIN LOGIN"))


def test_extensions_from_an_ehlo_or_lhlo_reply():
    assert EVERYTHING.supports("pipelining") and EVERYTHING.supports("SMTPUTF8")
    assert EVERYTHING.size_limit == 100
    assert EVERYTHING.auth_methods == ("plain", "login")
    old_style = Extensions.from_reply(Reply(250, "mx.test\nAUTH=LOGIN\nSIZE"))
    assert old_style.supports("auth") and old_style.auth_methods == ("login",)
    assert old_style.size_limit == 0  # SIZE without a number: no limit
    assert not Extensions().supports("size")  # after HELO: nothing


@pytest.mark.parametrize("advertised, limit", [
    ("SIZE 10240000 and more", 10240000),  # the first word, as Postfix's mystrtok takes it
    ("SIZE " + "9" * 5000, 0),  # past off_t (and past Python's int() of a string): no limit, as off_cvt_string
    ("SIZE 9223372036854775808", 0),
    ("SIZE 9223372036854775807", 2 ** 63 - 1),
    ("SIZE \u00b2", 0),  # a digit to str.isdigit, not to Postfix's alldig: no limit
    ("SIZE -5", 0),
])
def test_a_size_limit_postfix_would_not_take_is_no_limit_and_no_crash(advertised, limit):
    assert Extensions.from_reply(Reply(250, f"mx.test\n{advertised}")).size_limit == limit


@pytest.mark.parametrize("garbage", [b"SIZE 10", b"STARTTLS"])
def test_a_garbage_line_in_an_ehlo_reply_offers_nothing_as_with_postfix(garbage):
    """Postfix's smtp_proto takes the first word of every line of an EHLO reply as its code: a garbage line's
    keyword is never read as one. It stays in the diagnostic."""
    [reply] = replies(b"250-mx.test\r\n" + garbage + b"\r\n250 8BITMIME\r\n")
    offered = Extensions.from_reply(reply)
    assert offered.keywords == {"8bitmime": ""} and offered.size_limit == 0 and not offered.supports("starttls")
    assert (reply.garbage, reply.one_line) == ((garbage.decode(),), f"250-mx.test {garbage.decode()} 250 8BITMIME")


def test_mail_command_carries_what_the_peer_offers_and_the_message_calls_for():
    plain = request()
    assert mail_command(plain, Extensions()) == b"MAIL FROM:<s@x.test>\r\n"
    assert mail_command(request(sender=""), Extensions()) == b"MAIL FROM:<>\r\n"
    size = plain.content.size
    expected = f"MAIL FROM:<s@x.test> SIZE={size} BODY=8BITMIME\r\n".encode()
    assert mail_command(plain, EVERYTHING, "BODY=8BITMIME") == expected
    dsn = request(envid="e1", ret="full", smtputf8=True)
    assert mail_command(dsn, EVERYTHING) == f"MAIL FROM:<s@x.test> SIZE={size} SMTPUTF8 RET=FULL ENVID=e1\r\n".encode()
    utf8 = request(sender="andré@x.test")
    assert mail_command(utf8, EVERYTHING).endswith(b" SMTPUTF8\r\n")  # needed, though not flagged
    assert mail_command(utf8, Extensions()) == "MAIL FROM:<andré@x.test>\r\n".encode()


def test_rcpt_command_has_dsn_parameters_only_for_a_peer_that_offers_dsn():
    r = Recipient(0, "jürgen@y.test", "first@y.test", notify="SUCCESS")
    assert rcpt_command(r, Extensions()) == "RCPT TO:<jürgen@y.test>\r\n".encode()
    expected = "RCPT TO:<jürgen@y.test> ORCPT=rfc822;first@y.test NOTIFY=SUCCESS\r\n".encode()
    assert rcpt_command(r, EVERYTHING) == expected


def test_dsn_parameters_are_xtext_and_orcpt_is_synthesised_from_the_original():
    assert xtext("a+b=c d\x01é") == "a+2Bb+3Dc+20d+01+C3+A9"
    assert [xtext(t) for t in ("a+b", "a=b", "a\x7fb", "é", "!*,<>~@x.test", "")] == \
        ["a+2Bb", "a+3Db", "a+7Fb", "+C3+A9", "!*,<>~@x.test", ""]  # (each alone: the as-is shortcut's edges)
    req = DeliveryRequest("Q", "s@x.test", (), "x.test", b"", envid="id=1 +", ret="hdrs")
    assert dsn_mail_params(req) == [b"RET=HDRS", b"ENVID=id+3D1+20+2B"]
    assert dsn_mail_params(DeliveryRequest("Q", "s@x.test", (), "x.test", b"")) == []
    given = Recipient(0, "a@x.test", "first@x.test", notify="SUCCESS,FAILURE", orcpt="rfc822;o+x@x.test")
    assert dsn_rcpt_params(given) == [b"ORCPT=rfc822;o+2Bx@x.test", b"NOTIFY=SUCCESS,FAILURE"]
    assert dsn_rcpt_params(Recipient(0, "a@x.test", "First@x.test")) == [b"ORCPT=rfc822;First@x.test"]
    assert dsn_rcpt_params(Recipient(0, "a@x.test", "")) == []
    utf8 = Recipient(0, "a@x.test", "jöe@bücher.test", notify="NEVER")
    assert dsn_rcpt_params(utf8, smtputf8=True) == [b"ORCPT=utf-8;j\\x{F6}e@b\\x{FC}cher.test", b"NOTIFY=NEVER"]


def test_xtext_writes_each_character_as_rfc_3461_does_and_leaves_plain_text_as_it_is():
    """Every character 0-255 (and some beyond) alone and between xchars: printable ASCII but "+" and "=" as is,
    every other byte of its UTF-8 as +HH; text with nothing to escape is returned itself (no work a character)."""
    for code in [*range(256), 0x2028, 0x1F600]:
        c = chr(code)
        escaped = c if 0x21 <= code <= 0x7E and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode())
        assert xtext(f"a{c}b") == f"a{escaped}b"
        assert xtext(c) == escaped
    assert xtext("") == ""
    plain = "rfc822-style.Address_with~all!xchars@dest.test"
    assert xtext(plain) is plain


def test_a_non_ascii_orcpt_is_quoted_by_its_type_as_postfixs_smtp_client_quotes_it():
    """smtp_proto.c: a queued `rfc822;` ORCPT goes as xtext (+HH of the UTF-8 bytes), a `utf-8;` one with
    uxtext's \\x{HEX}; one made up is `utf-8;` only for a message that asked for SMTPUTF8."""
    stored = Recipient(0, "a@x.test", "jöe@bücher.test", orcpt="rfc822;jöe@bücher.test")
    assert dsn_rcpt_params(stored) == [b"ORCPT=rfc822;j+C3+B6e@b+C3+BCcher.test"]
    assert dsn_rcpt_params(stored, smtputf8=True) == [b"ORCPT=rfc822;j+C3+B6e@b+C3+BCcher.test"]
    given = Recipient(0, "a@x.test", "a@x.test", orcpt="utf-8;jöe\t@x.test")
    assert dsn_rcpt_params(given) == [b"ORCPT=utf-8;j\\x{F6}e\\x{09}@x.test"]
    made_up = Recipient(0, "a@x.test", "jöe@bücher.test")
    assert dsn_rcpt_params(made_up) == [b"ORCPT=rfc822;j+C3+B6e@b+C3+BCcher.test"]


def test_addresses_with_control_characters_never_reach_a_command():
    good, evil = Recipient(0, "ok@y.test", "ok@y.test"), Recipient(1, "x@y.test>\r\nRCPT TO:<z@y.test", "")
    outcomes, sendable = screen_envelope(request(good, evil))
    assert sendable == [good]
    assert (outcomes.results[evil].outcome, outcomes.results[evil].dsn) == (Outcome.BOUNCED, "5.1.3")
    assert outcomes.results[evil].text == "<x@y.test>??RCPT TO:<z@y.test>: Bad recipient address syntax"
    outcomes, sendable = screen_envelope(request(good, sender="s\x00@x.test"))
    assert sendable == [] and outcomes.results[good].dsn == "5.1.7"


def test_what_a_peer_cannot_take_bounces_before_mail():
    peer = Peer("mx.y.test", "192.0.2.1", 25)
    assert cannot_take(EVERYTHING, peer, request()) is None
    too_big = cannot_take(EVERYTHING, peer, request(content=b"x" * 101))
    assert (too_big.dsn, too_big.permanent) == ("5.3.4", True)
    assert too_big.text == "message size 101 exceeds size limit 100 of server mx.y.test[192.0.2.1]"
    utf8 = request(Recipient(0, "jürgen@y.test", "jürgen@y.test"))
    assert cannot_take(Extensions(), peer, utf8).dsn == "5.6.7"
    assert cannot_take(Extensions(), peer, request(smtputf8=True)) is None  # flagged, but nothing needs it


def test_8bitmime_content_goes_as_it_is_or_is_converted():
    eight = request(body_type="8BITMIME")
    assert content_encoding(EVERYTHING, eight) == ((), "BODY=8BITMIME")
    encoders, body = content_encoding(Extensions(), eight)
    assert body is None and [type(e) for e in encoders] == [Downgrade]
    assert content_encoding(EVERYTHING, request()) == ((), None)
    encoders, body = content_encoding(Extensions(), request())  # a part may say 8bit whatever BODY the client gave
    assert body is None and [type(e) for e in encoders] == [Downgrade]


def test_8bit_header_fields_go_as_they_are_whatever_the_peer_offers():
    """Postfix's smtp(8) encodes no header field: 8-bit bytes go as they are to a peer without SMTPUTF8 (only the
    body is converted, for a peer without 8BITMIME), so that a DKIM signature over them stays whole."""
    eight_bit = request(content=b"Subject: Gr\xc3\xbc\xc3\x9fe\r\nFrom: Jos\xe9 <j@x.test>\r\n\r\nx\r\n")
    no_smtputf8 = Extensions.from_reply(Reply(250, "mx.test\nPIPELINING\nSIZE 100\n8BITMIME\nDSN"))
    assert content_encoding(no_smtputf8, eight_bit) == ((), None)
    assert content_encoding(EVERYTHING, eight_bit) == ((), None)
    encoders, _ = content_encoding(Extensions(), eight_bit)
    assert [type(e) for e in encoders] == [Downgrade]


@pytest.mark.parametrize("text, dsn", [("5.1.1 no such user", "5.1.1"), ("5.\u0661.1 no", "5.0.0"),
                                       ("5.1.\u0661\u0661 no", "5.0.0")])
def test_an_enhanced_code_is_ascii_digits_only_as_postfixs_dsn_valid_reads_it(text, dsn):
    """A peer's `5.١.1` (Arabic-Indic digits, which a Unicode `\\d` takes) is no enhanced code: the reply's class
    and x.0.0, never a Status: field of non-ASCII in a DSN."""
    assert Reply(550, text).dsn() == dsn
