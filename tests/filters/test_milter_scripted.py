"""mailflow's milter client against a scripted milter (tests/support/milters.py) that misbehaves on purpose: what
the SMTP client is told, compared with what Postfix's smtpd tells it with the same milter (observed with a
private Postfix 3.7 and smtpd_milters; the replies are Postfix's milter8.c and smtpd.c)."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import struct
import threading

import pytest

from mailflow import status
from mailflow.filters.milter.client import MilterConnection, MilterSettings
from mailflow.filters.milter.protocol import MACRO_NAMES_LIMIT
from mailflow.maildrop import MaildropMessage, write_maildrop
from tests.support import SmtpClient, eventually, maildir_messages, queue_becomes
from tests.support.ports import sockets_to
from tests.support.milters import HANG, Drip, Held, optneg, replycode, reply, scripted_milter

MESSAGE = b"From: <s@remote.test>\r\nSubject: scripted\r\nX-Old: 1\r\n\r\nline one\r\n"


@pytest.fixture
async def milter_server(mailflow_server):
    """A mailflow whose listener asks one scripted milter (short timeouts); yields (milter, smtp port)."""
    async def start(script=None, negotiation=None, smtpd=None, **milter_settings):
        milter = await stack.enter_async_context(scripted_milter(script, negotiation))
        settings = {"command_timeout": "2s", "content_timeout": "2s", "connect_timeout": "2s", **milter_settings}
        mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "milters": [milter.spec], **(smtpd or {})},
                                   milter=settings)
        return milter, mf.smtp_addresses[0][1]

    async with contextlib.AsyncExitStack() as stack:
        yield start


async def test_a_refusal_at_helo_answers_every_mail_and_not_helo(milter_server):
    """Postfix: the milter's reject at HELO leaves EHLO its 250; MAIL gets 550 5.7.1 Command rejected, and so
    does every later MAIL of the session (the milter is not asked again)."""
    milter, port = await milter_server({b"H": reply(b"r")})
    client = await SmtpClient.connect(port)
    ehlo = await client.cmd("EHLO client.test")
    assert ehlo.code == 250 and ehlo.lines[-1] == "ENHANCEDSTATUSCODES", ehlo
    assert await client.cmd("MAIL FROM:<s@remote.test>") == status.MILTER_REJECTED
    assert (await client.cmd("RSET")).code == 250
    assert await client.cmd("MAIL FROM:<s@remote.test>") == status.MILTER_REJECTED
    await client.close()
    assert b"M" not in milter.commands(0)


@pytest.mark.parametrize("command", ["HELO", "EHLO"])
async def test_a_421_of_the_milter_at_helo_answers_helo_or_ehlo_and_ends_the_session(milter_server, command):
    """Postfix's helo_cmd and ehlo_cmd: check_milter_reply's 421 is the command's reply, and the connection ends."""
    _, port = await milter_server({b"H": replycode("421 4.7.0 bye now")})
    client = await SmtpClient.connect(port)
    assert await client.cmd(f"{command} client.test") == (421, "421 4.7.0 bye now")
    assert await client.closed()


@pytest.mark.parametrize("script", [{b"C": reply(b"t")}, {b"C": replycode("450 4.7.1 not now")}])
async def test_a_tempfail_at_connect_answers_mail_for_the_session(milter_server, script):
    _, port = await milter_server(script)
    client = await SmtpClient.connect(port)
    assert (await client.cmd("HELO client.test")).code == 250
    first, second = await client.cmd("MAIL FROM:<s@remote.test>"), None
    await client.cmd("RSET")
    second = await client.cmd("MAIL FROM:<s@remote.test>")
    await client.close()
    assert first == second and first.code in (450, 451), (first, second)


async def test_discard_at_connect_is_not_allowed_and_the_mail_is_delivered(milter_server, tmp_path, caplog):
    """Postfix: `DISCARD action is not allowed for connect or helo` (logged); the messages are queued."""
    _, port = await milter_server({b"C": reply(b"d")})
    client = await SmtpClient.connect(port)
    assert (await client.send_message(MESSAGE)).code == 250
    await client.close()
    await eventually(lambda: maildir_messages(tmp_path / "mail" / "alice" / "Maildir"))
    assert any("DISCARD action is not allowed for connect or helo" in r.getMessage() for r in caplog.records)


async def test_a_milter_that_breaks_the_negotiation_leaves_ehlo_alone(milter_server):
    """Postfix: the milter is closed, EHLO is answered in full, and milter_default_action answers MAIL."""
    _, port = await milter_server(negotiation=reply(b"c"))
    client = await SmtpClient.connect(port)
    ehlo = await client.cmd("EHLO client.test")
    assert ehlo.code == 250 and ehlo.lines[-1] == "ENHANCEDSTATUSCODES", ehlo
    assert await client.cmd("MAIL FROM:<s@remote.test>") == status.FILTER_UNAVAILABLE
    await client.close()


async def test_an_accept_at_connect_silences_that_milter_only(mailflow_server):
    async with scripted_milter({b"C": reply(b"a")}) as first, scripted_milter({b"M": reply(b"r")}) as second:
        mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "milters": [first.spec, second.spec]})
        client = await SmtpClient.connect(mf.smtp_addresses[0][1])
        assert (await client.cmd("EHLO client.test")).code == 250
        assert await client.cmd("MAIL FROM:<s@remote.test>") == status.MILTER_REJECTED
        await client.close()
        assert b"H" not in first.commands(0) and b"M" in second.commands(0)


async def test_a_multi_line_reply_of_the_milter_is_sent_as_it_is(milter_server, caplog):
    caplog.set_level(logging.INFO, logger="mailflow")
    _, port = await milter_server({b"R": replycode("550-5.7.1 first line\r\n550 5.7.1 second 100%% sure")})
    client = await SmtpClient.connect(port)
    assert (await client.cmd("EHLO client.test")).code == 250
    assert (await client.cmd("MAIL FROM:<s@remote.test>")).code == 250
    assert await client.cmd("RCPT TO:<alice@local.test>") == (550, "550-5.7.1 first line\n550 5.7.1 second 100% sure")
    await client.close()
    assert any("reject: RCPT from" in r.getMessage() and "550-5.7.1 first line??550 5.7.1 second" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("command", [b"M", b"R"])
async def test_a_milter_s_reply_naming_a_quoted_address_is_sent_as_it_is(milter_server, command):
    """Postfix passes a milter's reply text on unchanged: only its own refusals name the address in the internal
    form (`<a.b c@x>`); mailflow rewrote a milter's text that began with the quoted address too."""
    text = '550 5.7.1 <"a.b c"@remote.test> is blocked by milter policy'
    _, port = await milter_server({command: replycode(text)}, smtpd={"relay_restrictions": [
        "check_client_access inline:{127.0.0.1=OK}", "reject_unauth_destination"]})
    client = await SmtpClient.connect(port)
    assert (await client.cmd("EHLO client.test")).code == 250
    mail = await client.cmd('MAIL FROM:<"a.b c"@remote.test>')
    if command == b"R":
        assert mail.code == 250, mail
        mail = await client.cmd('RCPT TO:<"a.b c"@remote.test>')
    assert mail == (550, text)
    await client.close()


@pytest.mark.parametrize("text", ["450 5.7.1 the other class", "550", "250 2.0.0 fine", "999 9.9.9 what",
                                  "550-5.7.1 no last line"])
async def test_a_malformed_reply_of_the_milter_is_a_configuration_problem(milter_server, text):
    """Postfix: `malformed reply` logged, the milter closed, 451 4.3.5 for this command and the next MAIL."""
    milter, port = await milter_server({b"R": replycode(text)}, default_action="reject")
    client = await SmtpClient.connect(port)
    assert (await client.cmd("EHLO client.test")).code == 250
    assert (await client.cmd("MAIL FROM:<s@remote.test>")).code == 250
    assert await client.cmd("RCPT TO:<alice@local.test>") == status.MILTER_CONFIGURATION_PROBLEM
    assert (await client.cmd("RSET")).code == 250
    assert await client.cmd("MAIL FROM:<s@remote.test>") == status.MILTER_CONFIGURATION_PROBLEM
    await client.close()
    assert len(milter.sessions) == 1


async def test_the_reject_default_action_is_service_unavailable(milter_server):
    _, port = await milter_server({b"M": reply(b"Z")}, default_action="reject")
    client = await SmtpClient.connect(port)
    assert (await client.cmd("EHLO client.test")).code == 250
    assert await client.cmd("MAIL FROM:<s@remote.test>") == (550, "550 5.5.0 Service unavailable")
    await client.close()


@pytest.mark.parametrize("answer, expected", [(reply(b"4"), status.MILTER_SHUTDOWN),
                                              (replycode("421 4.7.0 bye now"), (421, "421 4.7.0 bye now"))],
                         ids=["shutdown", "replycode 421"])
async def test_shutdown_or_a_421_of_the_milter_ends_the_session(milter_server, answer, expected):
    """Postfix: 421 to the command, then the connection is closed (observed; smtpd.c)."""
    _, port = await milter_server({b"R": answer})
    client = await SmtpClient.connect(port)
    assert (await client.cmd("EHLO client.test")).code == 250
    assert (await client.cmd("MAIL FROM:<s@remote.test>")).code == 250
    assert await client.cmd("RCPT TO:<alice@local.test>") == expected
    assert await client.closed()


def header_edit(command: bytes, name: str, value: bytes, index: int | None = None) -> bytes:
    """SMFIR_ADDHEADER (no index), SMFIR_INSHEADER or SMFIR_CHGHEADER."""
    position = struct.pack("!I", index) if index is not None else b""
    return reply(command, position + name.encode() + b"\0" + value + b"\0")


async def test_header_edits_cannot_break_the_header_section(milter_server, tmp_path, caplog):
    """A line break in a value continues the field (Postfix indents the next line with a TAB); a name that is not
    one is ignored and logged (Postfix writes `X Bad: v`, which ends mailflow's header section: a deliberate
    difference, docs/filtering.md)."""
    edits = [header_edit(b"h", "X-Injected", b"a\r\nBcc: victim@remote.test"), header_edit(b"h", "X-Lf", b"a\nb"),
             header_edit(b"h", "X Bad", b"v"), header_edit(b"h", "", b"v"), header_edit(b"m", "X-Old", b"two", 1)]
    _, port = await milter_server({b"E": b"".join(edits) + reply(b"c")})
    client = await SmtpClient.connect(port)
    assert (await client.send_message(MESSAGE)).code == 250
    await client.close()
    [data] = await eventually(lambda: maildir_messages(tmp_path / "mail" / "alice" / "Maildir"))
    head, body = data.split(b"\n\n", 1)
    assert b"\nX-Injected: a\n\tBcc: victim@remote.test\n" in head and b"\nX-Lf: a\n\tb\n" in head
    assert b"\nX-Old: two\n" in head and b"X Bad" not in data and b"\n: v" not in data
    assert body == b"line one\n"
    assert sum("is not one: edit ignored" in r.getMessage() for r in caplog.records) == 2


async def test_a_flood_of_ignored_edits_is_warned_of_ten_times_then_counted_in_one_line(milter_server, tmp_path,
                                                                                          caplog):
    """A milter's edits that are ignored with a warning (a name that is no header name, a recipient that is no
    address, an argument of an added recipient) are told one by one for the first ten of a message, then counted:
    one line at the message's end gives how many more there were. A milter that sends thousands (within the size
    limit) makes eleven lines, not thousands; the good edits among them are still made."""
    edits = [header_edit(b"h", f"X Bad{i}", b"v") for i in range(3000)] + [header_edit(b"h", "X-Good", b"kept")]
    edits += [reply(b"+", b"not an address\0")] * 2000 + [reply(b"2", b"<bob@local.test>\0NOTIFY=BOGUS\0")]
    _, port = await milter_server({b"E": b"".join(edits) + reply(b"c")})
    client = await SmtpClient.connect(port)
    sent = await client.send_message(MESSAGE)
    assert sent.code == 250, sent
    await client.close()
    [data] = await eventually(lambda: maildir_messages(tmp_path / "mail" / "alice" / "Maildir"))
    assert b"\nX-Good: kept\n" in data
    await eventually(lambda: maildir_messages(tmp_path / "mail" / "bob" / "Maildir"), what="the added recipient")
    queue_id = sent.text.split()[-1]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "milter" in r.getMessage()]
    assert len(warnings) == 11 and all(w.startswith(f"{queue_id}: milter ") for w in warnings), warnings[:20]
    assert sum("is not one: edit ignored" in w for w in warnings) == 10
    assert warnings[-1].endswith(": 4991 more edits or edit arguments ignored"), warnings[-1]


async def test_the_count_of_ignored_edits_is_logged_when_the_milter_then_fails(milter_server, caplog):
    """A milter that sends a flood of ignored edits and then no final reply (it times out): the ten warnings, the
    count of the others and the failure are logged. The count line was written with the final reply only, so a
    milter that failed after its flood left no trace of most of it."""
    edits = [header_edit(b"h", f"X Bad{i}", b"v") for i in range(3000)]
    _, port = await milter_server({b"E": b"".join(edits)}, content_timeout="1s")
    client = await SmtpClient.connect(port)
    sent = await client.send_message(MESSAGE)
    await client.close()
    assert sent.code == 451, sent  # (the milter's default_action: tempfail)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "milter" in r.getMessage()]
    assert sum("is not one: edit ignored" in w for w in warnings) == 10, warnings[:20]
    assert any(w.endswith(": 2990 more edits or edit arguments ignored") for w in warnings), warnings[10:]


async def test_edits_past_the_message_size_limit_refuse_the_message_as_postfix_does(milter_server, tmp_path, caplog):
    """Postfix writes a milter's edits into the queue file, which stops at message_size_limit: 552 5.3.4 Error:
    message file too big, with cleanup's warning "queue file size limit exceeded" (observed with a private
    Postfix 3.7 and the same milter). No more of the edits than the limit is kept, however much the milter sends,
    and its replies are read to the final one: the next message of the session is filtered as usual."""
    line = b"x" * 998 + b"\r\n"
    big = b"".join(reply(b"b", line * 60) for _ in range(40)) + reply(b"a")  # 2.4 MB in 60 KB chunks
    answers = iter([big, reply(b"b", b"new body\r\n") + reply(b"a")])
    _, port = await milter_server({b"E": lambda session, _: next(answers)}, smtpd={"message_size_limit": 100_000})
    client = await SmtpClient.connect(port)
    with caplog.at_level(logging.WARNING, logger="mailflow.cleanup"):
        assert await client.send_message(MESSAGE) == status.MESSAGE_TOO_BIG
    assert (await client.send_message(MESSAGE, ehlo=False)).code == 250
    await client.close()
    [data] = await eventually(lambda: maildir_messages(tmp_path / "mail" / "alice" / "Maildir"))
    assert data.endswith(b"\n\nnew body\n")
    assert [r.getMessage().partition(": ")[2] for r in caplog.records if r.name == "mailflow.cleanup"] == [
        "queue file size limit exceeded"]


async def test_a_flood_of_tiny_edits_counts_what_each_costs_to_keep_against_the_size_limit(milter_server):
    """40,000 recipient deletions of 3 bytes each are 120 KB of payload but held 2.5 MB or more in memory (each kept
    edit is Python objects): counted with what keeping each costs, they exceed a 150 KB limit and the message is
    refused as too big, where counted by payload alone a milter could make one session hold 20 times the limit."""
    flood = reply(b"-", b"ab\0") * 40_000 + reply(b"a")
    _, port = await milter_server({b"E": flood}, smtpd={"message_size_limit": 150_000})
    client = await SmtpClient.connect(port)
    assert await client.send_message(MESSAGE) == status.MESSAGE_TOO_BIG
    await client.close()


async def test_a_body_replaced_in_small_chunks_is_counted_by_its_bytes_not_as_so_many_edits(milter_server, tmp_path):
    """libmilter passes smfi_replacebody's chunks as the milter hands them: a milter rewriting the body line by line
    sends one per line. A 4 MB body in 80-byte chunks (about 6 MB held) was counted as 80 + 128 bytes a chunk,
    10.4 MB, and refused under a 10 MB limit, where Postfix, whose queue file is about 4 MB, accepts it."""
    line = b"y" * 78 + b"\r\n"
    lines = 50_000
    _, port = await milter_server({b"E": reply(b"b", line) * lines + reply(b"a")}, content_timeout="20s",
                                  smtpd={"message_size_limit": 10_240_000})
    client = await SmtpClient.connect(port)
    assert (await client.send_message(MESSAGE)).code == 250
    await client.close()
    [data] = await eventually(lambda: maildir_messages(tmp_path / "mail" / "alice" / "Maildir"), timeout=20)
    assert data.count(b"y" * 78 + b"\n") == lines


async def test_the_size_limit_of_the_edits_is_the_message_s_across_its_milters(mailflow_server):
    """Each milter's edits were held to the limit on its own, so N milters could make one message hold N times
    message_size_limit in memory: the milters' edits of one message count together. Two milters that each delete
    1,000 recipients (about 0.9 of a 150 KB limit each, as they are counted) make the message too big."""
    flood = reply(b"-", b"ab\0") * 1_000 + reply(b"a")
    second_answers = iter([reply(b"a"), flood])  # the first message: the first milter's edits alone
    async with scripted_milter({b"E": flood}) as first, \
            scripted_milter({b"E": lambda session, _: next(second_answers)}) as second:
        mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "milters": [first.spec, second.spec],
                                          "message_size_limit": 150_000})
        client = await SmtpClient.connect(mf.smtp_addresses[0][1])
        assert (await client.send_message(MESSAGE)).code == 250
        assert await client.send_message(MESSAGE, ehlo=False) == status.MESSAGE_TOO_BIG
        await client.close()


async def test_a_milter_s_own_too_big_reply_is_logged_as_its_reject_not_as_the_size_limit(milter_server, caplog):
    """A milter may answer the message with the very text of smtpd's size refusal (552 5.3.4 Error: message file
    too big): Postfix logs that as the milter's reject (milter-reject: END-OF-MESSAGE), not as its own limit. Only
    the size check's own reply (status.MESSAGE_TOO_BIG, by identity) is the size limit's."""
    _, port = await milter_server({b"E": replycode("552 5.3.4 Error: message file too big")})
    client = await SmtpClient.connect(port)
    with caplog.at_level(logging.INFO, logger="mailflow.cleanup"):
        assert await client.send_message(MESSAGE) == status.MESSAGE_TOO_BIG
        await client.close()
        said = await eventually(lambda: [r.getMessage().partition(": ")[2] for r in caplog.records
                                         if r.name == "mailflow.cleanup" and "END-OF-MESSAGE" in r.getMessage()])
    assert said[0].startswith("milter-reject: END-OF-MESSAGE from ") and "5.3.4 Error: message file too big" in said[0]
    assert not any("size limit exceeded" in r.getMessage() for r in caplog.records)


async def test_edits_past_a_listener_s_own_message_size_limit_refuse_the_message(milter_server, caplog):
    """A listener's override of message_size_limit (master.cf's -o) is the limit of its milters' edits: Postfix's
    cleanup, which writes them into the queue file, stops at the limit of the smtpd service that made it."""
    grown = reply(b"b", (b"x" * 998 + b"\r\n") * 150) + reply(b"a")  # a 150 KB body: under the main limit (10 MB)
    _, port = await milter_server({b"E": grown}, smtpd={"listen": [], "listeners": [
        {"address": "127.0.0.1:0", "overrides": {"message_size_limit": 100_000}}]})
    client = await SmtpClient.connect(port)
    with caplog.at_level(logging.WARNING, logger="mailflow.cleanup"):
        assert await client.send_message(MESSAGE) == status.MESSAGE_TOO_BIG
    await client.close()
    assert [r.getMessage().partition(": ")[2] for r in caplog.records if r.name == "mailflow.cleanup"] == [
        "queue file size limit exceeded"]


def threads_editing_headers(monkeypatch) -> list[threading.Thread]:
    """The threads the milter's header edits are applied on (message.edit_header watched), in call order."""
    from mailflow.filters.milter import message

    threads: list[threading.Thread] = []
    edit = message.edit_header
    monkeypatch.setattr(message, "edit_header", lambda *args: (threads.append(threading.current_thread()),
                                                               edit(*args))[1])
    return threads


async def test_thousands_of_header_edits_are_applied_off_the_event_loop(milter_server, tmp_path, monkeypatch):
    """A change looks for its field among all the fields (as Postfix's cleanup does): 10 000 changes of fields the
    message lacks (each one added) took 7 s, on the event loop, and the size limit lets a milter send 70 000. Past
    EDIT_WORK_INLINE (about edits x fields) they are applied in a worker thread."""
    threads = threads_editing_headers(monkeypatch)
    changes = b"".join(reply(b"m", struct.pack("!I", 1) + b"X-C%d\0v\0" % i) for i in range(2000))
    _, port = await milter_server({b"E": changes + reply(b"a")})
    client = await SmtpClient.connect(port)
    assert (await client.send_message(MESSAGE)).code == 250
    await client.close()
    [delivered] = await eventually(lambda: maildir_messages(tmp_path / "mail" / "alice" / "Maildir"))
    assert b"\nX-C0: v\n" in delivered and b"\nX-C1999: v\n" in delivered
    assert threads and threading.current_thread() not in threads


async def test_a_few_edits_of_a_big_header_section_are_applied_off_the_event_loop(milter_server, tmp_path,
                                                                                  monkeypatch):
    """What an edit costs is the fields it looks through: 100 changes over 17 000 fields held the loop 0.12 s (1 s
    on a loaded host), when only the count of edits sent them to a worker thread (past 100). 20 changes over
    10 000 fields are applied in one (and so would be a single change: 20 ms for 17 000 fields)."""
    threads = threads_editing_headers(monkeypatch)
    changes = b"".join(reply(b"m", struct.pack("!I", 1) + b"X-Old\0v%d\0" % i) for i in range(20))
    _, port = await milter_server({b"E": changes + reply(b"a")})
    client = await SmtpClient.connect(port)
    big = MESSAGE.replace(b"X-Old: 1\r\n", b"X-Old: 1\r\n" + b"A:b\r\n" * 10_000)
    assert (await client.send_message(big)).code == 250
    await client.close()
    [delivered] = await eventually(lambda: maildir_messages(tmp_path / "mail" / "alice" / "Maildir"))
    assert b"\nX-Old: v19\n" in delivered
    assert threads and threading.current_thread() not in threads


async def test_a_burst_of_edits_already_read_is_taken_a_slice_a_turn(milter_server, tmp_path, monkeypatch):
    """10 000 edits a milter sends at once were taken in as few turns of the event loop as the socket's buffer
    allowed (3 here; 0.4 s held, every other session waiting): they are taken REPLY_SLICE a turn."""
    from mailflow.filters.milter import client as milter_client

    turns = [0]  # turns of the loop so far, counted by a task that yields each turn
    seen: set[int] = set()  # the turns in which an edit was taken
    collect = milter_client._collect
    monkeypatch.setattr(milter_client, "_collect", lambda *args: (seen.add(turns[0]), collect(*args))[1])

    async def count_turns() -> None:
        while True:
            turns[0] += 1
            await asyncio.sleep(0)

    removals = reply(b"m", struct.pack("!I", 1) + b"X-Absent\0\0") * 10_000  # (cheap to apply: nothing to remove)
    _, port = await milter_server({b"E": removals + reply(b"a")})
    counter = asyncio.create_task(count_turns())
    try:
        client = await SmtpClient.connect(port)
        assert (await client.send_message(MESSAGE)).code == 250
        await client.close()
    finally:
        counter.cancel()
    await eventually(lambda: maildir_messages(tmp_path / "mail" / "alice" / "Maildir"))
    assert len(seen) >= 10_000 // milter_client.REPLY_SLICE


async def test_a_milter_that_holds_one_session_does_not_hold_another(milter_server):
    """The first session's milter holds its answer to RCPT: that session waits for it, while a second session
    meanwhile is served in full; the answer (tempfail: 451 4.7.1) then reaches the first."""
    released = asyncio.Event()
    milter, port = await milter_server({b"R": lambda session, _: Held(released, reply(b"t")) if session == 0
                                        else reply(b"c")}, command_timeout="60s")
    stuck = await SmtpClient.connect(port)
    await eventually(lambda: milter.sessions)  # (the milter's session 0 is the stuck one's)
    other = await SmtpClient.connect(port)
    await stuck.cmd("EHLO client.test")
    await stuck.cmd("MAIL FROM:<s@remote.test>")
    waiting = asyncio.create_task(stuck.cmd("RCPT TO:<alice@local.test>"))
    await eventually(lambda: any(command == b"R" for command, _ in milter.sessions[0]))
    assert (await other.send_message(MESSAGE)).code == 250
    assert not waiting.done()  # (the milter has not answered: nothing else can answer it)
    released.set()
    assert await waiting == status.FILTER_UNAVAILABLE
    await stuck.close()
    await other.close()


async def test_a_milter_slow_to_answer_connect_delays_no_other_sessions_greeting(milter_server):
    """The milters hear of the client before the greeting (Postfix's smtpd_proto): the first session's milter holds
    its answer to the connect event, so that session's greeting waits for it, while a second session meanwhile is
    greeted and served in full; the answer (tempfail) then gives the first its 220, and 451 4.7.1 at MAIL."""
    released = asyncio.Event()
    milter, port = await milter_server({b"C": lambda session, _: Held(released, reply(b"t")) if session == 0
                                        else reply(b"c")}, command_timeout="60s")
    stuck = await SmtpClient.connect(port, greet=False)
    greeting = asyncio.create_task(stuck.reply())
    await eventually(lambda: milter.sessions)  # (the milter's session 0 is the stuck one's)
    other = await SmtpClient.connect(port)
    assert (await other.send_message(MESSAGE)).code == 250
    assert not greeting.done()  # (the milter has not answered: nothing else can greet it)
    released.set()
    assert (await greeting).code == 220
    assert (await stuck.cmd("EHLO client.test")).code == 250
    assert await stuck.cmd("MAIL FROM:<s@remote.test>") == status.FILTER_UNAVAILABLE
    await stuck.close()
    await other.close()


async def test_smtpds_timeout_does_not_run_while_the_milters_are_waited_for(milter_server):
    """Postfix's smtpd_timeout bounds the client's input and output only: a milter slower than it at connect,
    HELO, MAIL, RCPT or the end of the message is waited for up to its own timeout (2 s here; smtpd's is 1 s), and
    then milter_default_action (accept) answers for it: the session goes on (mailflow's command deadline said
    `421 4.4.2 … Error: timeout exceeded` after 1 s), and its deadline runs again after the wait (a client silent
    then gets the 421). One session per event, side by side."""
    helos: dict[int, str] = {}

    def answer(event: bytes):
        def step(session: int, payload: bytes):
            if event == b"H":
                helos[session] = payload.rstrip(b"\0").decode()
            held = session == 0 if event == b"C" else helos.get(session) == f"{event.decode()}.test"
            return HANG if held else reply(b"c")
        return step

    milter, port = await milter_server({event: answer(event) for event in (b"C", b"H", b"M", b"R", b"E")},
                                       smtpd={"timeout": "1s"}, default_action="accept")

    async def session(helo: str) -> list[int | None]:
        """Each reply's code, up to a 421 or the connection's end."""
        client = await SmtpClient.connect(port, greet=False)
        codes = [(await client.reply()).code]
        for command in (f"EHLO {helo}", "MAIL FROM:<s@remote.test>", "RCPT TO:<alice@local.test>", "DATA",
                        MESSAGE + b"."):
            if codes[-1] in (None, 421):
                break
            codes.append((await client.cmd(command)).code)
        if codes[-1] == 250:  # then silence: smtpd's deadline runs again after the wait, whichever it was
            codes.append((await asyncio.wait_for(client.reply(), 30)).code)
        await client.close()
        return codes

    held_at_connect = asyncio.create_task(session("any.test"))
    await eventually(lambda: milter.sessions)  # (the milter's session 0 is that one's)
    others = await asyncio.gather(*(session(f"{event}.test") for event in "HMRE"))
    assert [await held_at_connect, *others] == [[220, 250, 250, 250, 354, 250, 421]] * 5


async def test_the_negotiation_is_read_under_command_timeout_as_postfix_reads_it(milter_server):
    """Postfix's milter8_connect: connect_timeout bounds the connection, the negotiation's reply is a command's
    (milter_command_timeout). A milter that takes longer than connect_timeout to negotiate is used, not failed."""
    milter, port = await milter_server({b"M": reply(b"r")}, negotiation=Drip(optneg(), 0.05),  # (about 0.85 s)
                                       connect_timeout=0.3, command_timeout="5s")
    client = await SmtpClient.connect(port)
    await client.cmd("EHLO client.test")
    assert await client.cmd("MAIL FROM:<s@remote.test>") == status.MILTER_REJECTED  # (not the default action's)
    await client.close()


@pytest.mark.parametrize("commands", [[], ["QUIT"]], ids=["no command", "QUIT only"])
async def test_the_milters_hear_of_a_client_that_never_reaches_them_with_a_command(milter_server, commands):
    """Postfix tells them at the greeting: a session that sends nothing, or only QUIT, is connected and ended."""
    milter, port = await milter_server()
    client = await SmtpClient.connect(port)
    for command in commands:
        assert (await client.cmd(command)).code == 221
    await client.close()
    await eventually(lambda: milter.sessions and milter.commands(0).endswith(b"Q"))
    assert milter.commands(0).replace(b"D", b"") == b"OCQ"


async def test_a_client_over_its_connection_limit_is_not_told_to_the_milters(milter_server):
    """The admission comes first (Postfix's smtpd_proto: anvil's 421 before the connect event)."""
    milter, port = await milter_server(smtpd={"client_connection_count_limit": 1})
    first = await SmtpClient.connect(port)
    second = await SmtpClient.connect(port, greet=False)
    assert (await second.reply()).code == 421
    await second.close()
    assert (await first.cmd("QUIT")).code == 221
    await first.close()
    await eventually(lambda: milter.sessions and milter.commands(0).endswith(b"Q"))
    assert len(milter.sessions) == 1


async def test_a_client_the_client_list_refuses_at_connect_is_not_told_to_the_milters(milter_server):
    """delay_reject false: the client list's refusal takes the greeting's place and the milters never hear of the
    client (Postfix's smtpd_proto: the connect event is the greeting's other branch)."""
    milter, port = await milter_server(smtpd={"delay_reject": False, "client_restrictions": ["reject"]})
    client = await SmtpClient.connect(port, greet=False)
    assert (await client.reply()).code == 554
    assert (await client.cmd("QUIT")).code == 221
    await client.close()
    assert milter.sessions == []


@pytest.mark.parametrize("answer, greeting, expected", [(reply(b"r"), 554, status.MILTER_REJECTED),
                                                        (reply(b"t"), 220, status.MILTER_TRY_AGAIN)],
                         ids=["reject", "tempfail"])
async def test_auth_gets_the_refusal_a_milter_made_at_connect(mailflow_server, pki, users, answer, greeting,
                                                              expected):
    """Postfix's smtpd_sasl_auth_cmd asks milter_other_event: the refusal that holds for the session answers AUTH,
    a 4xx as 454 4.3.0 Try again later (Sendmail's way). On a submissions listener the milters hear of the client
    once the TLS handshake is done, before the greeting (Postfix's wrapper mode)."""
    _, cert, ctx = pki
    async with scripted_milter({b"C": answer}) as milter:
        mf = await mailflow_server(smtpd={"tls_cert_file": cert, "sasl_user_maps": [users], "auth_failure_delay": 0,
                                          "milters": [milter.spec],
                                          "listeners": [{"address": "127.0.0.1:0", "role": "submissions"}]})
        client = await SmtpClient.connect(mf.smtpd.address_of("submissions")[1], tls=ctx, greet=False)
        assert (await client.reply()).code == greeting
        assert (await client.cmd("EHLO client.test")).code == 250
        login = base64.b64encode(b"\0alice\0s3cret").decode()
        assert await client.cmd(f"AUTH PLAIN {login}") == expected
        await client.close()
        assert milter.commands(0).replace(b"D", b"").rstrip(b"Q") == b"OC"  # (not asked again: HELO not sent)


async def test_after_starttls_the_milters_are_not_told_of_the_client_again(mailflow_server, pki):
    """Postfix keeps its milters over STARTTLS: one connect event, then HELO again after the handshake."""
    _, cert, ctx = pki
    async with scripted_milter() as milter:
        mf = await mailflow_server(smtpd={"tls_cert_file": cert, "milters": [milter.spec]})
        client = await SmtpClient.connect(mf.smtp_addresses[0][1])
        assert (await client.cmd("EHLO client.test")).code == 250
        await client.starttls(ctx)
        assert (await client.cmd("EHLO client.test")).code == 250
        assert (await client.cmd("QUIT")).code == 221
        await client.close()
        await eventually(lambda: milter.commands(0).endswith(b"Q"))
        assert milter.commands(0).replace(b"D", b"") == b"OCHHQ"


async def test_a_milter_dribbling_its_reply_is_cut_at_command_timeout_and_holds_no_other_session(milter_server):
    """The milter answers RCPT a byte every 0.7 s: never silent for a read's timeout, but the reply as a whole
    takes 3.5 s. command_timeout (2 s) bounds the whole reply: 451 4.7.1 (the default action) at 2 s, not the
    milter's late CONTINUE; a second session meanwhile is served in full."""
    _, port = await milter_server({b"R": lambda session, _: Drip(reply(b"c"), 0.7) if session == 0 else reply(b"c")})
    loop = asyncio.get_running_loop()
    stuck, other = await SmtpClient.connect(port), await SmtpClient.connect(port)
    await stuck.cmd("EHLO client.test")
    await stuck.cmd("MAIL FROM:<s@remote.test>")
    started = loop.time()
    waiting = asyncio.create_task(stuck.cmd("RCPT TO:<alice@local.test>"))
    assert (await other.send_message(MESSAGE)).code == 250
    assert loop.time() - started < 1.5 and not waiting.done()
    assert await waiting == status.FILTER_UNAVAILABLE
    assert loop.time() - started < 3.0
    await stuck.close()
    await other.close()


async def test_connect_macros_name_this_server_as_postfix_does(milter_server):
    """Postfix's defaults: {daemon_name} is $myhostname (milter_macro_daemon_name), {daemon_addr} the server
    address the client connected to."""
    milter, port = await milter_server()
    client = await SmtpClient.connect(port)
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<s@remote.test>")
    await client.close()
    [connect] = milter.macros(b"C")
    assert connect["{daemon_addr}"] == "127.0.0.1"
    assert connect["{daemon_name}"] == connect["j"] != "mailflow"


async def test_behind_a_proxy_the_daemon_macros_name_the_address_the_client_connected_to(mailflow_server):
    """Postfix's smtpd_milter_eval: {daemon_addr} and {daemon_port} are dest_addr and dest_port, which a PROXY
    header sets to its destination (smtpd_haproxy.c), not the balancer's connection. (A milter asks for those
    beyond Postfix's default milter_connect_macros with SETSYMLIST.)"""
    asks = optneg(macros=struct.pack("!I", 0) + b"{daemon_addr} {daemon_port} {client_addr} {client_port}\0")
    async with scripted_milter(negotiation=asks) as milter:
        mf = await mailflow_server(smtpd={"listen": [], "milters": [milter.spec], "listeners": [
            {"address": "127.0.0.1:0", "role": "mta", "overrides": {"upstream_proxy_protocol": "haproxy"}}]})
        header = b"PROXY TCP4 192.0.2.10 203.0.113.5 40001 2525\r\n"
        client = await SmtpClient.connect(mf.smtp_addresses[0][1], first=header)
        await client.cmd("EHLO client.test")
        await client.cmd("MAIL FROM:<s@remote.test>")
        await client.close()
        [connect] = milter.macros(b"C")
    assert (connect["{daemon_addr}"], connect["{daemon_port}"]) == ("203.0.113.5", "2525")
    assert (connect["{client_addr}"], connect["{client_port}"]) == ("192.0.2.10", "40001")


async def test_macro_lists_past_the_limit_are_cut_with_one_warning_and_their_first_names_still_sent(milter_server,
                                                                                                     caplog):
    """A milter's SETSYMLIST lists for MAIL and RCPT of 60 000 names each: the first MACRO_NAMES_LIMIT of each are
    kept ({rcpt_addr}, first, is sent), the rest ignored ({mail_addr}, last, is not), with one warning."""
    filler = b" ".join(b"x%d" % n for n in range(60_000))
    lists = struct.pack("!I", 2) + filler + b" {mail_addr}\0" + struct.pack("!I", 3) + b"{rcpt_addr} " + filler + b"\0"
    lists += struct.pack("!I", 42) + b"{i}\0"  # (a stage that is none: Postfix's "ignoring unknown macro type")
    milter, port = await milter_server(negotiation=optneg(macros=lists))
    client = await SmtpClient.connect(port)
    await client.cmd("EHLO client.test")
    assert (await client.cmd("MAIL FROM:<s@remote.test>")).code == 250
    assert (await client.cmd("RCPT TO:<alice@local.test>")).code == 250
    await client.close()
    assert milter.macros(b"M") == []
    assert milter.macros(b"R") == [{"{rcpt_addr}": "alice@local.test"}]
    warnings = [r.getMessage() for r in caplog.records if "macro list" in r.getMessage()]
    assert warnings == [f"milter {milter.spec}: macro list of stage 2, 3 longer than {MACRO_NAMES_LIMIT} names: "
                        "the rest ignored"]
    assert [r.getMessage() for r in caplog.records if "unknown macro" in r.getMessage()] == [
        f"milter {milter.spec}: ignoring unknown macro type 42"]


async def test_a_sender_or_recipient_that_is_not_an_address_is_ignored_and_logged(milter_server, tmp_path, caplog):
    """CHGFROM and ADDRCPT take what MAIL FROM and RCPT TO would; anything else is ignored with a warning (Postfix
    makes an address of anything, `not an address` becoming `not@$myorigin`). A good one is still added."""
    edits = [reply(b"e", b"<a b@remote.test>\0"), reply(b"+", b"not an address\0"),
             reply(b"+", b"<bob\x01@local.test>\0"), reply(b"2", b"<x@bad_domain..test>\0NOTIFY=NEVER\0"),
             reply(b"2", b"<bob@local.test>\0NOTIFY=BOGUS\0")]
    _, port = await milter_server({b"E": b"".join(edits) + reply(b"c")})
    client = await SmtpClient.connect(port)
    sent = await client.send_message(MESSAGE)
    assert sent.code == 250
    await client.close()
    for user in ("alice", "bob"):
        [data] = await eventually(lambda: maildir_messages(tmp_path / "mail" / user / "Maildir"))
        assert data.startswith(b"Return-Path: <s@remote.test>\n"), data[:200]
    queue_id = sent.text.split()[-1]
    warnings = [r.getMessage() for r in caplog.records if "milter" in r.getMessage() and r.levelname == "WARNING"]
    assert sum("is not an address: edit ignored" in w for w in warnings) == 4
    assert any("bad NOTIFY parameter of an added recipient" in w for w in warnings)
    assert len(warnings) == 5 and all(w.startswith(f"{queue_id}: milter ") for w in warnings), warnings


async def test_a_nested_pair_from_a_milter_is_no_address_and_never_the_null_sender(milter_server, tmp_path, caplog):
    """CHGFROM and ADDRCPT read one pair of angle brackets: a nested pair (`< <>>`, `<<bob@b>>`, `< <bob@b> >`),
    which MAIL FROM and RCPT TO take as Postfix's smtpd does, is ignored with a warning; Postfix's cleanup strips no
    pair (`< <>>` becomes the sender `">"@$myorigin`), and a null sender so reached would drop the bounces."""
    edits = [reply(b"e", b"< <>>\0"), reply(b"+", b"<<bob@local.test>>\0"), reply(b"+", b"< <bob@local.test>>\0"),
             reply(b"2", b"<\t<bob@local.test> >\0NOTIFY=NEVER\0")]
    _, port = await milter_server({b"E": b"".join(edits) + reply(b"c")})
    client = await SmtpClient.connect(port)
    sent = await client.send_message(MESSAGE)
    assert sent.code == 250
    await client.close()
    [data] = await eventually(lambda: maildir_messages(tmp_path / "mail" / "alice" / "Maildir"))
    assert data.startswith(b"Return-Path: <s@remote.test>\n"), data[:200]
    warnings = [r.getMessage() for r in caplog.records if "milter" in r.getMessage() and r.levelname == "WARNING"]
    assert sum("is not an address: edit ignored" in w for w in warnings) == 4, warnings


async def test_a_quarantine_is_followed_by_the_events_own_reply(mailflow_server):
    """A milter's quarantine is no final reply (Postfix's milter8 reads on): the event's answer follows it. Here a
    quarantine at the first RCPT, then continue; a reject at the second: the first recipient is taken, the second
    refused, and the message is held. Read as final, every later reply of the session was one event late."""
    def at_rcpt(session: int, payload: bytes) -> bytes:
        if b"<alice@" in payload:
            return reply(b"q", b"suspicious\0") + reply(b"c")
        return reply(b"r")

    async with scripted_milter({b"R": at_rcpt}) as milter:
        mf = await mailflow_server(smtpd={"milters": [milter.spec]}, milter={"command_timeout": "2s"})
        client = await SmtpClient.connect(mf.smtp_addresses[0][1])
        await client.cmd("EHLO client.test")
        assert (await client.cmd("MAIL FROM:<s@remote.test>")).code == 250
        assert (await client.cmd("RCPT TO:<alice@local.test>")).code == 250
        assert await client.cmd("RCPT TO:<bob@local.test>") == status.MILTER_REJECTED
        assert (await client.cmd("DATA")).code == 354
        assert (await client.cmd(MESSAGE.decode() + ".")).code == 250
        await client.close()
        await queue_becomes(mf.store, {"hold": 1})


async def test_smtpds_no_milters_turns_non_smtpd_milters_off_for_sendmails_mail(mailflow_server, tmp_path):
    """Postfix's pickup honours main.cf's receive_override_options (pickup.c): no_milters there means no
    non_smtpd_milters; mailflow's pickup takes [smtpd]'s own value. The milter would reject the message."""
    async with scripted_milter({b"E": reply(b"r")}) as milter:
        mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "receive_override_options": ["no_milters"]},
                                   milter={"non_smtpd_milters": [milter.spec], "command_timeout": "2s"})
        write_maildrop(mf.config.queue_path / "maildrop",
                       MaildropMessage(sender="alice@local.test", recipients=("bob@local.test",), uid=os.getuid(),
                                       user="alice"), [b"Subject: picked up\r\n\r\nx\r\n"])
        mf.pickup.wake()
        await eventually(lambda: maildir_messages(tmp_path / "mail" / "bob" / "Maildir"))
        assert milter.sessions == []


def _header_names(milter) -> list[bytes]:
    return [payload.split(b"\0")[0] for session in milter.sessions for command, payload in session if command == b"L"]


DROPPED = (b"From: <s@remote.test>\r\nBcc: bob@local.test\r\nResent-Bcc: carol@local.test\r\nSubject : s\r\n"
           b"X-Old: 1\r\n\r\nline one\r\n")


async def test_smtpd_milters_are_not_shown_the_dropped_fields_and_see_names_normalized(milter_server, tmp_path):
    """Postfix's cleanup removes message_drop_headers "after header_checks and before invoking Milter applications"
    and writes names normalized: the milter sees no Bcc nor Resent-Bcc (blind recipients were disclosed to
    archivers and DLP filters) and `Subject`, not `Subject ` (observed with a private Postfix 3.7). An edit's index
    counts the fields the milter was shown (SMFIR_INSHEADER 2 is after Subject), and cleanup still sees the
    Resent-Bcc: the message stays a resent one (its Resent-Message-ID added)."""
    milter, port = await milter_server({b"E": header_edit(b"i", "X-Ins", b"v", 2) + reply(b"c")})
    client = await SmtpClient.connect(port)
    assert (await client.send_message(DROPPED)).code == 250
    await client.close()
    [data] = await eventually(lambda: maildir_messages(tmp_path / "mail" / "alice" / "Maildir"))
    names = _header_names(milter)
    assert b"Subject" in names and not {b"Bcc", b"Resent-Bcc", b"Subject "} & set(names), names
    head = data.split(b"\n\n", 1)[0]
    assert head.index(b"\nSubject: s\n") < head.index(b"\nX-Ins: v\n") < head.index(b"\nX-Old: 1\n"), head
    assert b"Bcc" not in head and b"\nResent-Message-ID: " in head, head


async def test_non_smtpd_milters_are_not_shown_the_dropped_fields(mailflow_server, tmp_path):
    """The same at pickup (non_smtpd_milters): sendmail leaves Bcc to cleanup, which removes it after the milters
    in mailflow; the milters must not see it (they did, since sendmail stopped stripping it)."""
    async with scripted_milter({}) as milter:
        mf = await mailflow_server(milter={"non_smtpd_milters": [milter.spec], "command_timeout": "2s"})
        write_maildrop(mf.config.queue_path / "maildrop",
                       MaildropMessage(sender="alice@local.test", recipients=("bob@local.test",), uid=os.getuid(),
                                       user="alice"), [b"To: bob@local.test\r\nBcc: carol@local.test\r\n"
                                                       b"Subject : picked up\r\n\r\nx\r\n"])
        mf.pickup.wake()
        await eventually(lambda: maildir_messages(tmp_path / "mail" / "bob" / "Maildir"))
        names = _header_names(milter)
        assert b"Subject" in names and not {b"Bcc", b"Subject "} & set(names), names


async def test_under_soft_bounce_a_milters_own_550_with_a_percent_is_a_4xx(mailflow_server, caplog):
    """milter8 softens a milter's reply once it is found well-formed (after `%` is dropped): `550 %5.7.1` is
    answered and logged 450 4.7.1, as `550 5.7.1` is."""
    caplog.set_level(logging.INFO, logger="mailflow")
    async with scripted_milter({b"R": replycode("550 %5.7.1 go away")}) as milter:
        mf = await mailflow_server(soft_bounce=True, smtpd={"listen": ["127.0.0.1:0"], "milters": [milter.spec]})
        client = await SmtpClient.connect(mf.smtp_addresses[0][1])
        assert (await client.cmd("EHLO client.test")).code == 250
        assert (await client.cmd("MAIL FROM:<s@remote.test>")).code == 250
        assert await client.cmd("RCPT TO:<alice@local.test>") == (450, "450 4.7.1 go away")
        await client.close()
    rejects = [r.getMessage() for r in caplog.records if "reject: RCPT from" in r.getMessage()]
    assert rejects and all("450 4.7.1 go away" in line for line in rejects), rejects


async def test_a_cancelled_close_of_a_milter_that_stopped_reading_keeps_no_connection():
    """The close of a milter's connection cancelled while it waits for the milter to take what is unsent (the
    session stopped): the connection is dropped all the same, or its socket and buffer stayed as long as the
    milter kept the connection open."""
    connections: list[asyncio.StreamWriter] = []

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4 + 13)  # the negotiation; then nothing is read again
        writer.write(optneg())
        connections.append(writer)

    server = await asyncio.start_server(deaf, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        milter = MilterConnection(f"inet:127.0.0.1:{port}", MilterSettings("tempfail", 6, 2.0, 2.0, 2.0))
        await milter.open()
        milter.write(b"z" * 20_000_000)  # more than the sockets' buffers take: the close waits to send it
        closing = asyncio.create_task(milter.close())
        await asyncio.sleep(0.3)
        closing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await closing
        await eventually(lambda: sockets_to(port) == 0, timeout=5)
    finally:
        for writer in connections:
            writer.close()
        server.close()


async def test_a_milter_that_stops_reading_keeps_no_connection_past_the_session(mailflow_server):
    """A milter that asks for no replies and then stops reading: the message's body fills the sockets' buffers,
    content_timeout ends the wait (451 4.7.1), and the connection is closed with what is unsent dropped; a close
    that waited to send it kept the socket and its buffer as long as the milter kept the connection open."""
    connections: list[asyncio.StreamWriter] = []

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4 + 13)  # the negotiation; then nothing is read again
        no_replies = 0x1000 | 0x2000 | 0x4000 | 0x8000 | 0x10000 | 0x40000 | 0x80000 | 0x80  # NR_* of every event
        writer.write(optneg(protocol=no_replies))
        connections.append(writer)

    server = await asyncio.start_server(deaf, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "milters": [f"inet:127.0.0.1:{port}"],
                                          "message_size_limit": 30_000_000}, milter={"content_timeout": "1s"})
        client = await SmtpClient.connect(mf.smtp_addresses[0][1])  # (the milter is asked at the greeting)
        await eventually(lambda: connections, timeout=5)
        assert sockets_to(port) == 1
        body = b"z" * 998 + b"\r\n"  # 20 MB: past what the sockets' buffers take
        assert await client.send_message(MESSAGE + body * 20_000) == status.FILTER_UNAVAILABLE
        await client.close()
        # (within the close's 1 s wait for the milter to take what was sent; `deaf` still holds its own side)
        await eventually(lambda: sockets_to(port) == 0, timeout=5)
    finally:
        for writer in connections:
            writer.close()
        server.close()
