"""The queue tools' selections and layouts (mailflow/queue_tools/), and the store queries behind them on a
real queue file with no server: chunked changes, pages, domain extraction, qshape's age buckets."""
from __future__ import annotations

import dataclasses
import io
import time

import pytest

import json
import re

from mailflow import queue_tools as qt
from mailflow.content import Content, FilePart
from mailflow.model import Recipient
from mailflow.store import (DestinationRow, MessageDetail, MessageRow, NewMessage, RecipientRow, ShapeCount,
                            Store)

T0 = 1_700_000_000.0  # Tue Nov 14 22:13:20 2023 UTC


@pytest.fixture
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


# ---------------------------------------------------------------------------------------------- selections


def test_ids_are_cleaned_deduplicated_and_checked():
    sel = qt.parse_selection(["ABC123*", "DEF456!", "ABC123"])
    assert sel.ids == ("ABC123", "DEF456") and not sel.everything
    with pytest.raises(qt.SelectionError, match="'x-y' is not a queue id"):
        qt.parse_selection(["x-y"])
    warnings: list[str] = []
    sel = qt.parse_selection(["x-y", "ABC123", "../z"], invalid=warnings.append)
    assert sel.ids == ("ABC123",) and warnings == ["'x-y' is not a queue id", "'../z' is not a queue id"]
    assert qt.parse_selection(["x-y"], invalid=warnings.append).ids == ()  # never everything
    warnings.clear()  # a word longer than Postfix's mail_queue_id_ok takes (255) is none, and is not repeated whole
    assert qt.parse_selection(["A" * 255, "B" * 5000], invalid=warnings.append).ids == ("A" * 255,)
    assert warnings == [f"{'B' * 100!r}... (5000 characters) is not a queue id"]


def test_all_means_any_id_and_cannot_mix_with_ids():
    assert qt.parse_selection(["ALL"]) == qt.Selection()
    with pytest.raises(qt.SelectionError, match="not 'ABC'; give queue ids without ALL"):
        qt.parse_selection(["ALL", "ABC"])
    with pytest.raises(qt.SelectionError, match="not 'ABC'; give queue ids without ALL"):
        qt.parse_selection(["ALL", "deferred", "ABC"])
    with pytest.raises(qt.SelectionError, match="not both"):
        qt.parse_selection(["ALL", "-"], stdin=io.StringIO("ABC\n"))


def test_a_word_after_all_that_names_no_queue_is_refused_by_name():
    """`ALL deferd` (a typo) names the word, as postsuper's "invalid directory name: deferd" does."""
    with pytest.raises(qt.SelectionError, match=r"with ALL come queue names only \(incoming, .*\), not 'deferd'"):
        qt.parse_selection(["ALL", "hold", "deferd"])
    with pytest.raises(qt.SelectionError, match=r"^with ALL come .*, not '0123456789ABCDEF'; give queue ids"):
        qt.parse_selection(["0123456789ABCDEF", "ALL"])  # (before ALL: not said to come after it)
    with pytest.raises(qt.SelectionError, match=r"not 'a', 'b', 'c', \.\.\.; give"):
        qt.parse_selection(["ALL", "a", "b", "c", "d"])


def test_all_followed_by_queue_names_is_all_of_those_queues_as_postsuper_takes_it():
    sel = qt.parse_selection(["ALL", "Deferred", "hold"])
    assert sel == qt.Selection(queues=("deferred", "hold")) and not sel.everything
    assert sel.within(qt.ACTIONS["delete"].sources) == ("deferred", "hold")
    assert sel.within(qt.ACTIONS["release"].sources) == ("hold",)
    assert qt.Selection().within(("incoming", "hold")) == ("incoming", "hold")


def test_a_bare_selection_is_refused_unless_optional():
    with pytest.raises(qt.SelectionError, match="say which messages"):
        qt.parse_selection([])
    assert qt.parse_selection([], required=False).everything


def test_dash_reads_ids_from_stdin_as_mailq_prints_them():
    sel = qt.parse_selection(["-"], stdin=io.StringIO("AAA111*\nBBB222!  CCC333\n\n"))
    assert sel.ids == ("AAA111", "BBB222", "CCC333")
    empty = qt.parse_selection(["-"], stdin=io.StringIO(""))
    assert empty.ids == () and not empty.everything  # nothing on stdin selects nothing, never everything


def test_selectors_are_normalised():
    sel = qt.parse_selection([], sender="<Alice@X.test>", to_domain="@B.Example.", older_than="2d")
    assert (sel.sender, sel.rcpt_domain, sel.older_than) == ("Alice@X.test", "b.example", 172800.0)
    assert qt.parse_selection([], to_domain="bücher.example").rcpt_domain == "xn--bcher-kva.example"
    for null in ("<>", "MAILER-DAEMON", ""):
        assert qt.parse_selection([], sender=null).sender == ""
    assert sel.filters(T0) == {"sender": "Alice@X.test", "rcpt_domain": "b.example", "arrived_before": T0 - 172800}
    assert qt.Selection().filters(T0)["arrived_before"] is None


def test_bad_selectors_say_what_is_wrong():
    with pytest.raises(qt.SelectionError, match="--older-than: 'soon' is not a duration"):
        qt.parse_selection([], older_than="soon")
    with pytest.raises(qt.SelectionError, match="not a domain"):
        qt.parse_selection([], to_domain="@")


def test_queue_names():
    assert qt.parse_queues("Incoming, hold,incoming") == ("incoming", "hold")
    assert qt.parse_queues("all") == qt.QUEUES
    with pytest.raises(qt.SelectionError, match="unknown queue bogus"):
        qt.parse_queues("deferred,bogus")


def test_each_action_applies_to_the_queues_postsuper_would():
    assert set(qt.ACTIONS["hold"].sources) == {"incoming", "active", "deferred"}
    assert qt.ACTIONS["release"].sources == ("hold",)
    assert set(qt.ACTIONS["requeue"].sources) == {"incoming", "active", "deferred", "hold"}
    assert qt.ACTIONS["delete"].sources == qt.QUEUES
    assert qt.ACTIONS["flush"].sources == ("deferred",)


# ---------------------------------------------------------------------------------------------- mailq layout


def row(qid="0123456789", queue="deferred", size=1234, arrival=T0, sender="s@remote.test"):
    return MessageRow(qid, queue, size, arrival, sender, arrival + 60, 1)


def rcpt(address, reason="", status="pending", dsn="", original=None):
    return RecipientRow(address, address if original is None else original, status, dsn, reason)


def test_mailq_entry_columns_match_postfix(utc):
    lines = qt.mailq_entry(row(), [rcpt("bob@relay.test")])
    assert lines == ["0123456789     1234 Tue Nov 14 22:13:20  s@remote.test",
                     " " * 41 + "bob@relay.test"]
    # postqueue prints its header with "%-11s %7s %-20s %s", so it sits one column right of the data
    assert qt.mailq_header("0123456789") == qt.MAILQ_SHORT_HEADER == (
        f"{'-Queue ID-':<11} {'--Size--':>7} {'----Arrival Time----':<20} -Sender/Recipient-------")


def test_mailq_pads_the_day_with_a_space_as_postqueue_does(utc):
    assert qt.mailq_time(T0 + 20 * 86400) == "Mon Dec  4 22:13:20"  # (postqueue: "%a %b %e %H:%M:%S")
    assert qt.mailq_time(T0) == "Tue Nov 14 22:13:20"


def test_mailq_marks_active_and_held_and_names_the_null_sender(utc):
    assert qt.mailq_entry(row(queue="active"), [])[0].startswith("0123456789*")
    assert qt.mailq_entry(row(queue="hold"), [])[0].startswith("0123456789!")
    assert qt.mailq_entry(row(queue="incoming", sender=""), [])[0].endswith("  MAILER-DAEMON")


def test_long_queue_ids_push_the_columns_and_recipients_follow_the_sender(utc):
    first, second = qt.mailq_entry(row(qid="18A2B3C4D5E6F7A8", queue="active"), [rcpt("bob@relay.test")])
    assert first == "18A2B3C4D5E6F7A8*     1234 Tue Nov 14 22:13:20 s@remote.test"  # postqueue's long-id layout
    assert first.index("s@remote.test") == second.index("bob@relay.test") == 47
    # and its own headings ("%-17s %8s %-19s %s"), as postqueue prints them with enable_long_queue_ids
    assert qt.mailq_header("18A2B3C4D5E6F7A8") == qt.MAILQ_HEADER == (
        "----Queue ID----- --Size-- ---Arrival Time---- --Sender/Recipient------")
    assert qt.MAILQ_HEADER.index("--Sender") == 47


def test_reasons_group_recipients_like_postfix():
    refused = "connect to 127.0.0.1[127.0.0.1]:2: Connection refused"
    long = "host mx.example[192.0.2.1] said: 450 4.2.1 " + "x" * 60
    lines = qt.mailq_entry(row(), [rcpt("a@x", refused), rcpt("plain@x"), rcpt("b@x", refused), rcpt("c@x", long)])
    pad = " " * 41
    assert lines[1:] == [f"{'':>{76 - len(refused)}}({refused})", pad + "a@x", pad + "b@x",
                         f"({long})", pad + "c@x", " " * 58 + "(reason unavailable)", pad + "plain@x"]
    assert len(lines[1]) == 78  # short reasons end at column 78
    # (postqueue's showq_compat.c: "(reason unavailable)" when the previous recipient had a reason and this one
    # has none, so it is not read as sharing that reason; no line when no recipient has one)
    assert qt.mailq_entry(row(), [rcpt("plain@x"), rcpt("other@x")])[1:] == [pad + "plain@x", pad + "other@x"]


def test_control_characters_are_not_printed():
    lines = qt.mailq_entry(row(sender="evil\r\n@x"), [rcpt("a@x", "line\nbreak")])
    assert "evil??@x" in lines[0] and lines[1].endswith("(line?break)")


def test_footer():
    assert qt.mailq_footer(2047, 1) == "-- 1 Kbytes in 1 Request."
    assert qt.mailq_footer(0, 3) == "-- 0 Kbytes in 3 Requests."


def test_entry_json_has_every_recipient_with_its_status():
    item = qt.entry_json(row(), [rcpt("a@x", "busy", dsn="4.2.1"), rcpt("b@x", status="sent", dsn="2.0.0")])
    assert item == {"id": "0123456789", "queue": "deferred", "size": 1234, "arrival": T0, "sender": "s@remote.test",
                    "attempts": 1, "next_attempt": T0 + 60,
                    "recipients": [{"address": "a@x", "status": "pending", "dsn": "4.2.1", "reason": "busy"},
                                   {"address": "b@x", "status": "sent", "dsn": "2.0.0", "reason": ""}]}


def test_postqueue_json_has_postfix_names_and_types():
    item = qt.entry_postqueue_json(row(arrival=T0 + 0.75, sender=""), [rcpt("a@x", "busy"), rcpt("b@x")])
    # postqueue -j (Postfix 3.7): whole seconds, the null sender named, delay_reason only when there is one
    assert json.dumps(item) == (
        '{"queue_name": "deferred", "queue_id": "0123456789", "arrival_time": 1700000000, "message_size": 1234, '
        '"forced_expire": false, "sender": "MAILER-DAEMON", '
        '"recipients": [{"address": "a@x", "delay_reason": "busy"}, {"address": "b@x"}]}')


# ---------------------------------------------------------------------------------------------- show


def detail(queue="deferred", next_attempt=T0 + 90, sender="", client="client.test[192.0.2.9]", envid=""):
    return MessageDetail("0123456789", queue, 40, T0 - 300, sender, next_attempt, 2, client=client, envid=envid,
                         ret="", smtputf8=False, body_type="7BIT", warned=False, created=T0 - 300)


def show_text(detail, recipients, content: bytes | Content | None, headers_only: bool, now: float) -> str:
    out = io.StringIO()
    if isinstance(content, bytes):
        content = Content.of(content)
    qt.write_show(out, detail, recipients, content, qt.HEADERS_ONLY if headers_only else qt.SHOW_PARTS, now)
    return out.getvalue()


def message_text(content: Content) -> tuple[str, str]:
    head, body = qt.message_text(content)
    return head, "".join(body)


def test_content_is_split_into_headers_and_body_with_lf():
    assert message_text(Content.of(b"A: 1\r\nB: 2\r\n\r\nbody\r\n")) == ("A: 1\nB: 2\n", "body\n")
    assert message_text(Content.of(b"A: 1\r\n")) == ("A: 1\n", "")
    assert message_text(Content.of(b"\r\nonly body\r\n")) == ("", "only body\n")
    assert message_text(Content.of(b"A: 1\n\nbare LF\n")) == ("A: 1\n", "bare LF\n")


def test_the_body_is_read_in_chunks_and_decoded_across_them(tmp_path):
    body = "caf\u00e9 \u2603\r\n".encode() * 20_000  # multi-byte characters across every chunk boundary
    path = tmp_path / "content"
    path.write_bytes(body)
    content = Content((b"Subject: big\r\n\r\n", FilePart(str(path), 0, len(body))))
    head, pieces = qt.message_text(content)
    pieces = list(pieces)
    assert head == "Subject: big\n" and len(pieces) > 1
    assert "".join(pieces) == body.decode().replace("\r\n", "\n")


def test_show_text_sections(utc):
    text = show_text(detail(), [rcpt("bob@x", "refused", dsn="4.4.1", original="Bob@X")], b"A: 1\r\n\r\nbody\r\n",
                     False, T0)
    assert text == (
        "*** ENVELOPE RECORDS deferred/0123456789 ***\n"
        "queue_id:       0123456789\n"
        "queue:          deferred\n"
        "message_size:   40\n"
        "arrival_time:   2023-11-14 22:08:20 (5m00s ago)\n"
        "create_time:    2023-11-14 22:08:20 (5m00s ago)\n"
        "sender:         MAILER-DAEMON\n"
        "client:         client.test[192.0.2.9]\n"
        "attempts:       2\n"
        "next_attempt:   2023-11-14 22:14:50 (in 1m30s)\n"
        "body_type:      7BIT\n"
        "recipient:      bob@x\n"
        "  original:     Bob@X\n"
        "  status:       pending 4.4.1\n"
        "  reason:       refused\n"
        "*** MESSAGE CONTENTS deferred/0123456789 ***\n"
        "A: 1\n"
        "\n"
        "body\n"
        "*** MESSAGE FILE END deferred/0123456789 ***\n")
    assert "\nbody\n" not in show_text(detail(), [], b"A: 1\r\n\r\nbody\r\n", True, T0)


def test_show_names_a_recipients_dsn_parameters_as_postcat_does(utc):
    """NOTIFY and ORCPT per recipient (postcat's notify_flags and dsn_orig_rcpt), in text and JSON."""
    given = dataclasses.replace(rcpt("bob@x"), notify="SUCCESS,DELAY", orcpt="utf-8;\u00e9\x1b@x")
    text = show_text(detail(), [given, rcpt("carol@x")], b"A: 1\r\n\r\nbody\r\n", False, T0)
    assert ("recipient:      bob@x\n"
            "  dsn:          notify=SUCCESS,DELAY orcpt=utf-8;\u00e9?@x\n"
            "  status:       pending\n"
            "recipient:      carol@x\n"
            "  status:       pending\n") in text
    out = io.StringIO()
    qt.write_show_json(out, detail(), [given], Content.of(b"A: 1\r\n\r\n"), qt.HEADERS_ONLY)
    [shown] = json.loads(out.getvalue())["recipients"]
    assert (shown["notify"], shown["orcpt"]) == ("SUCCESS,DELAY", "utf-8;\u00e9\x1b@x")


def test_show_json_streams_the_body_into_valid_json():
    out = io.StringIO()
    qt.write_show_json(out, detail(), [], Content.of(b"A: 1\r\n\r\nq\"uote \\ caf\xc3\xa9\r\n"), qt.SHOW_PARTS)
    shown = json.loads(out.getvalue())
    assert shown["headers"] == "A: 1\n" and shown["body"] == "q\"uote \\ caf\u00e9\n"
    out = io.StringIO()
    qt.write_show_json(out, detail(), [], Content.of(b"A: 1\r\n\r\nbody\r\n"), qt.HEADERS_ONLY)
    assert json.loads(out.getvalue())["body"] is None


def test_show_says_why_a_message_is_not_due():
    assert "next_attempt:   - (on hold" in show_text(detail("hold"), [], b"", False, T0)
    assert "next_attempt:   now" in show_text(detail("incoming", T0 - 5), [], b"", False, T0)
    assert "missing (a corrupt entry)" in show_text(detail("corrupt"), [], None, False, T0)


def test_durations_are_short():
    assert [qt.ago(s) for s in (5, 65, 3725, 90000)] == ["5s", "1m05s", "1h02m", "1d01h"]


# ---------------------------------------------------------------------------------------------- shape, destinations


def test_shape_buckets_are_qshape_defaults():
    assert qt.SHAPE_LABELS == ("T", "5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+")
    assert qt.shape_limits()[0] == 300 and qt.shape_limits()[-1] == 1280 * 60


def test_shape_rows_sort_by_total_then_name_length_and_keep_the_top():
    counts = [ShapeCount("b.example", 1, 3), ShapeCount("aa.example", 1, 2), ShapeCount("a.example", 10, 2),
              ShapeCount("c.example", 2, 1)]
    total, domains = qt.shape_rows(counts, top=2)
    assert total == [8, 5, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert domains == [("b.example", [3, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
                       ("a.example", [2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2])]
    assert len(qt.shape_rows(counts, top=0)[1]) == 4


def test_shape_layout_is_qshapes():
    total, domains = qt.shape_rows([ShapeCount("example.com", 1, 1234), ShapeCount("x" * 70 + ".example", 10, 1)],
                                   top=20)
    text = qt.format_shape(total, domains).splitlines()
    # columns as wide as TOTAL's numbers (+1, at least 3); the domain gets the rest of 80 columns
    assert text[0] == f"{'':>35}    T    5 10 20 40 80 160 320 640 1280 1280+"
    assert text[1] == f"{'TOTAL':>35} 1235 1234  0  0  0  0   0   0   0    0     1"
    assert text[3].startswith("+") and text[3].split()[0].endswith("x.example") and len(text[3]) == len(text[1])
    assert all(len(line) <= 80 for line in text)


def test_destinations_table_and_json(utc):
    rows = [DestinationRow("smtp", "[127.0.0.1]:2525", 0, 0, 0, 3, T0 + 120, "connect refused", T0 - 1),
            DestinationRow("local", "mx.test", 5, 1, 2, 0, 0.0, "", T0),
            DestinationRow("smtp", "slow.test", 1, 0, 4, 0, 0.0, "", T0, paused_until=T0 + 30)]
    text = qt.format_destinations(rows, T0).splitlines()
    assert text[0].split() == list(qt.DESTINATION_HEADER)
    assert "2023-11-14 22:15:20 (in 2m00s)  -" in text[1] and text[1].endswith("(1s ago)  connect refused")
    assert text[2].endswith("(0s ago)  -") and "  -  " in text[2]
    assert re.split(r"\s{2,}", text[3])[6:] == ["-", "2023-11-14 22:13:50 (in 30s)", "2023-11-14 22:13:20 (0s ago)",
                                                "-"]  # not dead, paused 30 s more
    assert [(d["dead_until"], d["paused_until"]) for d in qt.destinations_json(rows)] == [
        (T0 + 120, None), (None, None), (None, T0 + 30)]


# ---------------------------------------------------------------------------------------------- progress


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_counts_tenths_off_a_terminal_and_in_place_on_one():
    err = io.StringIO()
    p = qt.Progress(err, "hold", 10_000)
    for done in range(1000, 10_001, 1000):
        p.update(done)
    p.finish()
    assert err.getvalue().splitlines() == [f"hold: {n}/10000 messages" for n in range(1000, 10_001, 1000)]
    tty = Tty()
    p = qt.Progress(tty, "delete", 2)
    p.update(1)
    p.update(2)
    p.finish()
    assert tty.getvalue() == "\rdelete: 1/2 messages\rdelete: 2/2 messages\n"


# ---------------------------------------------------------------------------------------------- on a real queue file


def new(qid: str, arrival: float, rcpts: list[str], sender="s@remote.test") -> NewMessage:
    return NewMessage(qid, sender, arrival, Content.of(b"Subject: x\r\n\r\nbody\r\n"),
                      tuple(Recipient(i, a, a) for i, a in enumerate(rcpts)))


@pytest.fixture
async def store(tmp_path):
    s = await Store.open(tmp_path / "queue.db", backlog_limit=100_000)
    yield s
    await s.close()


async def test_changes_go_in_chunks_with_progress_and_bump_the_generation(store):
    import asyncio

    now = time.time()
    await asyncio.gather(*(store.insert(new(f"{i:016X}", now, ["a@x.test"])) for i in range(2500)))
    generation, commits = await store.generation(), store.commits
    err = io.StringIO()
    done, missed = await qt.apply(store, qt.ACTIONS["hold"], qt.Selection(), now, err, chunk=1000, progress_over=2000)
    assert (done, missed) == (2500, [])
    assert store.commits - commits == 3, "one transaction per chunk of 1000"
    assert await store.generation() == generation + 3
    assert err.getvalue().splitlines()[-1] == "hold: 2500/2500 messages"
    assert await store.counts() == {"hold": 2500}

    ids = qt.parse_selection([f"{i:016X}" for i in range(0, 2500, 2)] + ["FFFFFFFFFFFFFFFF"])
    done, missed = await qt.apply(store, qt.ACTIONS["release"], ids, now, io.StringIO())
    assert (done, missed) == (1250, ["FFFFFFFFFFFFFFFF"])
    assert await store.counts() == {"hold": 1250, "deferred": 1250}

    done, _ = await qt.apply(store, qt.ACTIONS["delete"], qt.Selection(), now, io.StringIO())
    assert done == 2500 and await store.counts() == {}


async def test_list_streams_pages_in_id_order(store, utc):
    for i in range(5):
        await store.insert(new(f"{i:016X}", T0, [f"r{i}@x.test"]))
    out = io.StringIO()
    pages = [p async for p in qt.pages(store, qt.LISTED_QUEUES, qt.Selection(), T0, ids_only=True, size=2)]
    assert pages == [[f"{0:016X}", f"{1:016X}"], [f"{2:016X}", f"{3:016X}"], [f"{4:016X}"]]
    assert await qt.write_mailq(store, out, qt.LISTED_QUEUES, qt.Selection(), T0) == 5
    assert out.getvalue().endswith("\n\n-- 0 Kbytes in 5 Requests.\n")
    empty = io.StringIO()
    await qt.write_mailq(store, empty, ("hold",), qt.Selection(), T0)
    assert empty.getvalue() == "Mail queue is empty\n"


async def test_the_store_answers_with_named_rows(store):
    await store.insert(NewMessage("R1", "", T0, Content.of(b"Subject: x\r\n\r\nbody\r\n"),
                                  (Recipient(0, "a@x.test", "A@X.test"),
                                   Recipient(1, "b@y.test", "b@y.test", "SUCCESS,DELAY", "rfc822;first@y.test")),
                                  smtputf8=True, body_type="8BITMIME", client="c[192.0.2.1]", envid="E1", ret="HDRS"))
    size = len(b"Subject: x\r\n\r\nbody\r\n")
    assert await store.message_page(queues=qt.QUEUES) == [MessageRow("R1", "incoming", size, T0, "", T0, 0)]
    assert await store.message_detail("R1") == MessageDetail(
        "R1", "incoming", size, T0, "", T0, 0, client="c[192.0.2.1]", envid="E1", ret="HDRS", smtputf8=True,
        body_type="8BITMIME", warned=False, created=T0)
    assert await store.message_detail("NONE") is None
    assert await store.recipients_of(["R1", "NONE"]) == {"R1": [RecipientRow("a@x.test", "A@X.test", "pending", "", ""),
                                                              RecipientRow("b@y.test", "b@y.test", "pending", "", "",
                                                                           notify="SUCCESS,DELAY",
                                                                           orcpt="rfc822;first@y.test")]}
    assert sorted(await store.shape_counts(qt.QUEUES, T0, qt.shape_limits()), key=lambda c: c.domain) == [
        ShapeCount("x.test", 1, 1), ShapeCount("y.test", 1, 1)]
    await store.save_destinations([("smtp", "[mx.test]", 1, 0, 2, 0, 0.0, "", T0 + 9)], T0)
    assert await store.destination_rows() == [DestinationRow("smtp", "[mx.test]", 1, 0, 2, 0, 0.0, "", T0,
                                                             paused_until=T0 + 9)]


async def test_recipient_domain_is_after_the_last_at_in_any_case(store):
    now = time.time()
    await store.insert(new("A1", now, ['"odd@local"@Quoted.Example.']))
    await store.insert(new("A2", now, ["plain@b.example", "other@c.example"]))
    await store.insert(new("A3", now, ["unqualified"]))
    counts = {cell.domain for cell in await store.shape_counts(qt.QUEUES, now, qt.shape_limits())}
    assert counts == {"quoted.example", "b.example", "c.example", "unqualified"}
    assert await store.message_ids(queues=qt.QUEUES, rcpt_domain="quoted.example") == ["A1"]
    assert await store.message_ids(queues=qt.QUEUES, rcpt_domain="c.example") == ["A2"]


async def test_shape_buckets_at_their_edges(store):
    now = time.time()
    ages = {"B0": 0, "B1": 299, "B2": 300, "B9": 76_799, "B10": 76_800, "B11": 10**6}
    for qid, age in ages.items():
        await store.insert(new(qid, now - age, ["r@x.test"]))
    total, _ = qt.shape_rows(await store.shape_counts(qt.QUEUES, now, qt.shape_limits()), 20)
    assert total == [6, 2, 1, 0, 0, 0, 0, 0, 0, 1, 2]


async def test_shape_counts_pending_recipients_only(store):
    from mailflow.model import Delivered, Outcome, RcptResult

    now = time.time()
    await store.insert(new("C1", now, ["a@x.test", "b@x.test"]))
    await store.claim(["C1"], now)
    sent = RcptResult(Recipient(0, "a@x.test", "a@x.test"), Outcome.SENT, "2.0.0", "ok")
    later = RcptResult(Recipient(1, "b@x.test", "b@x.test"), Outcome.DEFERRED, "4.4.1", "refused")
    await store.record_results("C1", [(sent, False), (later, False)])
    await store.finish(Delivered("C1", next_attempt=now + 60))
    total, domains = qt.shape_rows(await store.shape_counts(("deferred",), now, qt.shape_limits()), 20)
    assert total[0] == 1 and domains == [("x.test", [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0])]


async def test_shape_by_sender_counts_messages_by_the_sender_domain(store):
    now = time.time()
    await store.insert(new("S1", now, ["a@x.test", "b@y.test"], sender="Alice@Src.Example"))
    await store.insert(new("S2", now - 600, ["c@x.test"], sender="bob@src.example"))
    await store.insert(new("S3", now, ["d@x.test"], sender=""))
    counts = await store.shape_counts(qt.QUEUES, now, qt.shape_limits(), senders=True)
    total, domains = qt.shape_rows(counts, 0)
    # qshape -s: a message each, not a recipient each; the null sender is MAILER-DAEMON
    assert total[:4] == [3, 2, 0, 1]
    assert domains == [("src.example", [2, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0]),
                       ("MAILER-DAEMON", [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0])]


def test_show_prints_client_strings_printable(utc):
    hostile = detail(sender="s\x1b[2J@x", client="c\u2028[192.0.2.9]", envid="id\x08\u0085")
    text = show_text(hostile, [rcpt("r\x1b@x", original="")], b"Subject: \x1b[31mred\r\n\r\nb\x07\tx\r\n",
                     False, T0)
    assert not any(ch in text for ch in "\x1b\x08\x07\u0085\u2028")
    assert "envid=id??" in text and "sender:         s?[2J@x" in text and "Subject: ?[31mred" in text
    assert "b?\tx" in text  # tabs stay


async def test_a_library_error_of_queue_show_is_the_command_s_line_on_stderr(tmp_path):
    """The store logs a content file that is missing; `mailflow queue show` printed that through Python's
    last-resort handler, as it was (no command name; a control character would reach the terminal raw). Every
    command but serve writes such lines as `mailflow address` does: `mailflow queue show: error: …`, printable."""
    import subprocess
    import sys

    queue = tmp_path / "q"
    queue.mkdir()
    source = tmp_path / "body"
    source.write_bytes(b"body\r\n")
    s = await Store.open(queue / "queue.db", backlog_limit=100)
    await s.insert(NewMessage("ABC123", "s@x.test", T0, Content((b"Subject: x\r\n\r\n", FilePart(str(source), 0, 6))),
                              (Recipient(0, "r@x.test", "r@x.test"),)))
    await s.close()
    (queue / "content" / "ABC123").unlink()
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'queue_directory = "{queue}"\n')
    result = subprocess.run([sys.executable, "-m", "mailflow", "queue", "show", "ABC123", "-c", str(cfg)],
                            capture_output=True, text=True, timeout=30)
    assert f"mailflow queue show: error: ABC123: content file {queue}/content/ABC123 is missing" in \
        result.stderr.splitlines(), result.stderr
