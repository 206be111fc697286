"""The capture API (Mailpit's API v1 subset and mailflow's wait/history) over the one HTTP layer, asked with
aiohttp's client on the test's loop; and the HTTP layer itself (loopback by default, routes by feature)."""
from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from collections import Counter
from email.message import EmailMessage

import aiohttp
import aiosmtplib
import pytest
from aiohttp import web

from mailflow.capture import mailbox as capture_mailbox
from mailflow.capture import mailpit, search
from mailflow.capture.mailbox import SLICE, CapturedEnvelope
from mailflow.clock import VirtualClock
from mailflow.config import DEFAULTS
from mailflow.http import HttpServer
from mailflow.testing import Sink
from tests.support import LoopLag, eventually



def mail(subject: str, to: str = "Bob <bob@example.com>", attach: bool = False) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Shop <shop@shop.test>"
    msg["To"] = to
    msg["Cc"] = "audit@shop.test"
    msg["Subject"] = subject
    msg["List-Unsubscribe"] = "<https://shop.test/unsub>"
    msg.set_content(f"Body of {subject}: https://shop.test/x\n")
    if attach:
        msg.add_alternative("<p>html <img src=\"cid:logo\"></p>", subtype="html")
        msg.get_payload()[1].add_related(b"\x89PNG", maintype="image", subtype="png", cid="<logo>")
        msg.add_attachment(b"a,b\n1,2\n", maintype="text", subtype="csv", filename="data.csv")
    return msg


@pytest.fixture
async def api():
    async with Sink(http_api=True) as sink, aiohttp.ClientSession(sink.http_url) as http:
        async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port) as client:
            await client.send_message(mail("First"), sender="shop@shop.test",
                                      recipients=["bob@example.com", "audit@shop.test", "hidden@example.com"])
            await client.send_message(mail("Second", attach=True), sender="shop@shop.test")
        await sink.wait_for(count=2, match=lambda m: True)
        yield sink, http


async def get_json(http, path, status=200):
    async with http.get(path) as response:
        assert response.status == status, await response.text()
        return await response.json()


async def test_messages_and_info(api):
    sink, http = api
    listing = await get_json(http, "/api/v1/messages")
    assert (listing["total"], listing["unread"], listing["count"], listing["messages_count"]) == (2, 2, 2, 2)
    second, first = listing["messages"]  # newest first
    assert (first["Subject"], second["Subject"]) == ("First", "Second")
    assert first["From"] == {"Name": "Shop", "Address": "shop@shop.test"}
    assert first["To"] == [{"Name": "Bob", "Address": "bob@example.com"}]
    assert first["Bcc"] == [{"Name": "", "Address": "hidden@example.com"}]
    assert first["Snippet"] == "Body of First: https://shop.test/x" and second["Attachments"] == 1
    assert first["Created"].endswith("Z") and first["Read"] is False
    page = await get_json(http, "/api/v1/messages?start=1&limit=1")
    assert [m["Subject"] for m in page["messages"]] == ["First"] and page["start"] == 1
    info = await get_json(http, "/api/v1/info")
    assert info["Messages"] == 2 and info["RuntimeStats"]["SMTPAccepted"] == 2
    async with http.get("/api/v1/messages?limit=x") as response:
        assert response.status == 400


class Bystander:
    """Another task on the server's loop: counts the turns it gets while a request runs."""

    def __init__(self):
        self.turns = 0

    async def __aenter__(self):
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc):
        self._task.cancel()

    async def _run(self):
        for _ in range(1_000_000):
            self.turns += 1
            await asyncio.sleep(0)


def fill(sink: Sink, n: int) -> None:
    for i in range(n):  # as the capture transport adds them
        raw = f"From: a@shop.test\r\nSubject: m{i}\r\n\r\nbody {i}\r\n".encode()
        sink.server.capture.mailbox.add(CapturedEnvelope("a@shop.test", ("b@example.com",)), raw, f"Q{i}")


async def test_listing_every_message_hands_the_loop_back_between_summaries(monkeypatch):
    # a summary parses its message: listing all of 10 000 (limit=0) held the server's loop 3.7 s
    seen: list[int] = []  # at each summary made, how many turns the bystander had had
    summary = mailpit.summary
    n = 3 * SLICE
    async with Sink(http_api=True) as sink, aiohttp.ClientSession(sink.http_url) as http:
        fill(sink, n)
        async with Bystander() as other:
            monkeypatch.setattr(mailpit, "summary", lambda m: seen.append(other.turns) or summary(m))
            listing = await get_json(http, "/api/v1/messages?limit=0")
    assert [m["Subject"] for m in listing["messages"]] == [f"m{i}" for i in reversed(range(n))]
    assert len(seen) == n and max(Counter(seen).values()) <= SLICE


@pytest.mark.parametrize("method, path, body, searched", [
    ("GET", "/api/v1/search?query=body&limit=1", None, 1),
    ("GET", "/api/v1/message/latest?query=body", None, 1),
    ("PUT", "/api/v1/messages", {"Search": "body", "Read": True}, 1),
    ("DELETE", "/api/v1/search?query=body", None, 1),
    ("GET", f"/api/v1/wait?query=body&count={3 * SLICE + 1}&timeout=0", None, 2),  # the wait, then its report
    # (timeout=0: the wait parses and judges every message there first)
])
async def test_a_search_hands_the_loop_back_between_messages(monkeypatch, method, path, body, searched):
    # a text term parses each message: a first search of 10 000 held the server's loop 3.7 s
    seen: list[int] = []  # at each message searched, how many turns the bystander had had
    matches = search.matches
    n = 3 * SLICE
    async with Sink(http_api=True) as sink, aiohttp.ClientSession(sink.http_url) as http:
        fill(sink, n)
        async with Bystander() as other:
            monkeypatch.setattr(search, "matches", lambda terms, m: seen.append(other.turns) or matches(terms, m))
            async with http.request(method, path, json=body) as response:
                assert response.status in (200, 408), await response.text()
    assert len(seen) == searched * n and max(Counter(seen).values()) <= SLICE


async def test_one_message_its_raw_headers_parts_and_history(api):
    sink, http = api
    second = sink.messages[1]
    detail = await get_json(http, "/api/v1/message/latest")
    assert detail["ID"] == second.id and detail["Read"] is True
    assert detail["Text"].startswith("Body of Second") and "cid:logo" in detail["HTML"]
    attachments = [(a["FileName"], a["ContentType"], a["Size"]) for a in detail["Attachments"]]
    assert attachments == [("data.csv", "text/csv", 8)]
    assert [(a["ContentID"], a["ContentType"]) for a in detail["Inline"]] == [("logo", "image/png")]
    assert detail["ReturnPath"] == "shop@shop.test"
    assert detail["ListUnsubscribe"]["Links"] == ["https://shop.test/unsub"]
    async with http.get(f"/api/v1/message/{second.id}/raw") as response:
        assert await response.read() == second.raw
    headers = await get_json(http, f"/api/v1/message/{second.id}/headers")
    assert headers["Subject"] == ["Second"] and "Message-Id" in headers and "Received" in headers
    part = detail["Attachments"][0]["PartID"]
    async with http.get(f"/api/v1/message/{second.id}/part/{part}") as response:
        assert (response.status, await response.read()) == (200, b"a,b\n1,2\n")
    history = await get_json(http, f"/api/v1/message/{second.id}/history")
    assert history["QueueID"] == second.queue_id
    assert history["Envelope"]["To"] == ["bob@example.com", "audit@shop.test"]
    assert history["Session"]["Lines"][0]["From"] == "server"
    assert [e["Event"] for e in history["Events"]][:3] == ["received", "message-id", "queued"]
    async with http.get("/api/v1/message/NOSUCHID") as response:
        assert (response.status, await response.text()) == (404, "Message not found")
    assert (await get_json(http, "/api/v1/messages"))["unread"] == 1


async def test_search_mark_and_delete(api):
    sink, http = api
    found = await get_json(http, "/api/v1/search?query=subject:first")
    assert [m["Subject"] for m in found["messages"]] == ["First"] and found["messages_count"] == 1
    for query, subjects in [("to:hidden@example.com", ["First"]), ("from:shop@shop.test", ["Second", "First"]),
                            ('"body of second"', ["Second"]), ("-subject:first", ["Second"]),
                            ("has:attachment", ["Second"]), ("bcc:hidden", ["First"])]:
        result = await get_json(http, f"/api/v1/search?query={query}")
        assert [m["Subject"] for m in result["messages"]] == subjects, query
    async with http.get("/api/v1/search?query=") as response:
        assert response.status == 400
    async with http.put("/api/v1/messages", json={"IDs": [sink.messages[0].id], "Read": True}) as response:
        assert await response.text() == "ok"
    assert [m["Subject"] for m in (await get_json(http, "/api/v1/search?query=is:unread"))["messages"]] == ["Second"]
    async with http.delete("/api/v1/search?query=subject:second") as response:
        assert response.status == 200
    assert [m.subject for m in sink.messages] == ["First"]
    async with http.delete("/api/v1/messages", data={"ids": [sink.messages[0].id]}) as response:  # form fields
        assert response.status == 200
    assert sink.messages == []


async def test_delete_all_with_json(api):
    sink, http = api
    async with http.delete("/api/v1/messages", json={"IDs": []}) as response:
        assert await response.text() == "ok"
    assert sink.messages == [] and (await get_json(http, "/api/v1/info"))["RuntimeStats"]["MessagesDeleted"] == 2


async def test_wait_long_polls_until_the_message_comes(api):
    sink, http = api
    waiting = asyncio.ensure_future(get_json(http, "/api/v1/wait?query=subject:third&timeout=5"))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port) as client:
        await client.send_message(mail("Third"))
    result = await waiting
    assert [m["Subject"] for m in result["messages"]] == ["Third"]
    async with http.get("/api/v1/wait?query=subject:fourth&timeout=0") as response:
        timed_out = await response.json()
        assert response.status == 408
    assert "0 matched; 3 arrived" in timed_out["error"]


async def test_the_http_layer_is_loopback_by_default_and_features_register_routes():
    assert DEFAULTS.http.listen == ("127.0.0.1:8025",)
    server = HttpServer(["127.0.0.1:0"])
    table = web.RouteTableDef()

    @table.get("/hello")
    async def hello(request):
        return web.Response(text="hi")

    server.add_routes("greeting", table)
    with pytest.raises(ValueError, match="another"):
        again = web.RouteTableDef()
        again.get("/hello")(hello)
        server.add_routes("another", again)
    await server.start()
    try:
        host, port = server.addresses[0]
        assert host == "127.0.0.1"
        async with aiohttp.ClientSession() as http, http.get(f"http://{host}:{port}/hello") as response:
            assert await response.text() == "hi"
        with pytest.raises(RuntimeError):
            server.add_routes("late", table)
    finally:
        await server.stop()
    assert server.addresses == []


async def test_no_http_listener_without_a_feature(tmp_path):
    async with Sink() as sink:
        assert sink.http_url is None and sink.server.http is None


async def test_waits_are_bounded_in_number_and_time():
    async with Sink(http_api=True, sink={"waiters_limit": 1, "wait_time_limit": "0.2s"}) as sink, \
            aiohttp.ClientSession(sink.http_url) as http:
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.ensure_future(http.get("/api/v1/wait?query=nothing&timeout=3600"))
        await asyncio.sleep(0.05)
        async with http.get("/api/v1/wait?query=nothing") as second:
            assert second.status == 503
        response = await first
        assert response.status == 408 and loop.time() - started < 2  # capped at wait_time_limit
        response.release()


async def test_request_bodies_are_read_as_mailpit_reads_them(api):
    sink, http = api
    first, second = sink.messages
    # JSON whatever the Content-Type (a browser's fetch() sends text/plain), field names in any case (Go's decoder)
    async with http.put("/api/v1/messages", data=f'{{"ids": ["{first.id}"], "read": true}}',
                        headers={"Content-Type": "text/plain;charset=UTF-8"}) as response:
        assert (response.status, await response.text()) == (200, "ok")
    assert (first.read, second.read) == (True, False)
    async with http.put("/api/v1/messages", json={"Search": "subject:second", "Read": True}) as response:
        assert response.status == 200
    async with http.put("/api/v1/messages", json={"IDs": [first.id], "Search": "x", "Read": False}) as response:
        assert response.status == 400
    assert (first.read, second.read) == (True, True)
    async with http.delete("/api/v1/messages", data=f'{{"IDs": ["{second.id}"]}}') as response:  # no Content-Type
        assert response.status == 200
    assert sink.messages == [first]


async def test_bodies_of_the_wrong_shape_are_refused_and_change_nothing(api):
    sink, http = api
    json_type = {"Content-Type": "application/json"}
    for method, body, headers, status in [
            ("PUT", b"", {}, 400), ("PUT", b" \r\n", {}, 400), ("PUT", b"[]", json_type, 400),
            ("PUT", b'{"IDs": "abc", "Read": true}', {}, 400),
            ("PUT", b'{"IDs": [1, 2], "Read": true}', {}, 400), ("PUT", b'{"Read": "yes please"}', {}, 400),
            ("PUT", b'{"Search": 5, "Read": true}', {}, 400), ("PUT", b'{"Read": tru', {}, 400),
            ("PUT", b'\xff{"Read": true}', {"Content-Type": "application/json; charset=bogus"}, 400),
            ("PUT", b"--x--junk", {"Content-Type": "multipart/form-data; boundary=x"}, 415),
            ("PUT", b"[" * 100_000, json_type, 400),  # deeper than the JSON parser goes: no 500, no traceback
            ("DELETE", b"[]", {}, 400), ("DELETE", b'{"IDs": {"a": 1}}', json_type, 400),
            ("DELETE", b'{"IDs": "' + sink.messages[0].id.encode() + b'"}', json_type, 400)]:
        async with http.request(method, "/api/v1/messages", data=body, headers=headers) as response:
            assert response.status == status, (method, body, await response.text())
    assert len(sink.messages) == 2 and not any(m.read for m in sink.messages)


async def test_a_part_is_served_with_mailpits_disposition_whatever_its_file_name(api):
    sink, http = api
    raw = ("From: a@shop.test\r\nTo: b@example.com\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
           "Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
           "--B\r\nContent-Type: application/octet-stream\r\n"
           "Content-Disposition: attachment; filename*=utf-8''a%0D%0AX-Evil%3A%201%22.txt\r\n\r\nAAA\r\n"
           "--B\r\nContent-Type: application/pdf\r\n"
           "Content-Disposition: attachment; filename*=utf-8''%C3%A9t%C3%A9.pdf\r\n\r\nBBB\r\n"
           "--B\r\nContent-Type: image/png\r\nContent-ID: <logo@shop.test>\r\n"
           "Content-Disposition: inline\r\n\r\nCCC\r\n"
           "--B--\r\n")
    async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port) as client:
        await client.sendmail("a@shop.test", ["b@example.com"], raw)
    [message] = await sink.wait_for(subject="parts")
    shown = []
    for part in ("2", "3", "4"):
        async with http.get(f"/api/v1/message/{message.id}/part/{part}") as response:
            shown.append((response.status, response.headers["Content-Disposition"], await response.read()))
    assert shown == [(200, 'attachment; filename="a%0D%0AX-Evil:%201%22.txt"', b"AAA"),  # (not an image, PDF, text)
                     (200, 'inline; filename="%C3%A9t%C3%A9.pdf"', b"BBB"),
                     (200, 'inline; filename="logo@shop.test"', b"CCC")]


async def test_latest_with_a_query_limit_zero_and_the_probes_as_mailpit(api):
    sink, http = api
    first, second = sink.messages
    for path in ("/api/v1/message/latest?query=subject:first", "/api/v1/message/latest/headers?query=subject:first"):
        async with http.get(path) as response:
            assert response.status == 200
            assert "First" in await response.text(), path
    async with http.get("/api/v1/message/latest/raw?query=subject:nothing") as response:
        assert (response.status, await response.text()) == (404, "Message not found")
    async with http.get("/api/v1/message/latest/raw") as response:
        assert await response.read() == second.raw
    assert len((await get_json(http, "/api/v1/messages?limit=0"))["messages"]) == 2  # 0: all
    assert [m["Subject"] for m in (await get_json(http, "/api/v1/search?query=shop&limit=0&start=1"))["messages"]] \
        == ["First"]
    for probe in ("/livez", "/readyz"):
        async with http.get(probe) as response:
            assert (response.status, await response.read()) == (200, b"")


async def test_a_search_of_many_words_costs_one_look_at_each_message_and_is_bounded_in_terms():
    """A word repeated 4000 times (a URL's worth) made each message's text 4000 times: a second of the server's
    loop per message of 300 KB. A term given twice counts once; past search.MAX_TERMS distinct ones, 400."""
    async with Sink(http_api=True) as sink, aiohttp.ClientSession(sink.http_url) as http:
        for i in range(2):
            raw = b"From: a@shop.test\r\nSubject: big\r\n\r\n" + b"hello world e\r\n" * 20_000
            sink.server.capture.mailbox.add(CapturedEnvelope("a@shop.test", ("b@example.com",)), raw, f"Q{i}")
        async with LoopLag() as lag:
            listing = await get_json(http, "/api/v1/search?query=" + "+".join(["e"] * 4000))
        # (the bound: a loaded host stays under it; a text made per term held the loop 2 s for these two)
        assert listing["messages_count"] == 2 and lag.longest < 0.5
        words = [f"w{i}" for i in range(search.MAX_TERMS + 1)]
        for method, path, body in [("GET", "/api/v1/search?query=" + "+".join(words), None),
                                   ("PUT", "/api/v1/messages", {"Search": " ".join(words), "Read": True}),
                                   ("GET", "/api/v1/wait?timeout=0&query=" + "+".join(words), None)]:
            async with http.request(method, path, json=body) as response:
                assert (response.status, await response.text()) == (
                    400, f"Error: the search has {search.MAX_TERMS + 1} terms, at most {search.MAX_TERMS}")
        assert (await get_json(http, "/api/v1/search?query=" + "+".join(words[:-1])))["messages_count"] == 0


async def test_a_new_message_is_looked_at_once_by_each_wait_not_the_whole_mailbox_again(monkeypatch):
    """Each long poll looked at every message again whenever one arrived: 64 waits on 1000 messages of 90 KB cost
    9 s of the server's loop per message captured. Each wait now looks at the new message only, and is still
    answered by it."""
    looked = []
    matches = search.matches
    monkeypatch.setattr(search, "matches", lambda terms, m: looked.append(m.id) or matches(terms, m))
    n, waits = 2 * SLICE, 8
    async with Sink(http_api=True) as sink, aiohttp.ClientSession(sink.http_url) as http:
        fill(sink, n)

        async def wait() -> tuple[int, dict]:
            async with http.get("/api/v1/wait?query=subject:awaited&timeout=10") as response:
                return response.status, await response.json()

        waiting = [asyncio.ensure_future(wait()) for _ in range(waits)]
        await eventually(lambda: len(looked) == waits * n, what="each wait looked at the mailbox once")
        raw = b"From: a@shop.test\r\nSubject: unrelated\r\n\r\nbody\r\n"
        sink.server.capture.mailbox.add(CapturedEnvelope("a@shop.test", ("b@example.com",)), raw, "NEW1")
        await eventually(lambda: len(looked) >= waits * (n + 1), what="each wait looked at the new message")
        await asyncio.sleep(0.05)
        assert looked[waits * n:] == ["NEW1"] * waits
        raw = b"From: a@shop.test\r\nSubject: awaited\r\n\r\nbody\r\n"
        sink.server.capture.mailbox.add(CapturedEnvelope("a@shop.test", ("b@example.com",)), raw, "NEW2")
        answers = await asyncio.wait_for(asyncio.gather(*waiting), 5)
    assert [(status, [m["ID"] for m in body["messages"]]) for status, body in answers] == [(200, ["NEW2"])] * waits
    assert looked[waits * (n + 1):] == ["NEW2"] * waits


async def test_a_wait_for_read_messages_sees_one_marked_read_while_it_waits():
    """A wait kept each message's first verdict: one for `is:read` (or `-is:unread`) never saw a message marked
    read during the wait (408). The read flag is judged again, and marking a message read wakes the waits."""
    async with Sink(http_api=True) as sink, aiohttp.ClientSession(sink.http_url) as http:
        fill(sink, 2)
        first = sink.messages[0]
        waiting = [asyncio.ensure_future(get_json(http, f"/api/v1/wait?query={query}&timeout=5"))
                   for query in ("is:read", "-is:unread+subject:m0")]
        await asyncio.sleep(0.1)
        assert not any(w.done() for w in waiting)
        async with http.put("/api/v1/messages", json={"IDs": [first.id], "Read": True}) as response:
            assert response.status == 200
        answers = await asyncio.wait_for(asyncio.gather(*waiting), 2)
    assert [[m["ID"] for m in answer["messages"]] for answer in answers] == [[first.id], [first.id]]


async def test_wait_for_asks_a_match_callable_again_about_every_message_when_one_arrives():
    """A `match` callable may read what changes after capture (`history`, the read flag): a wait asks it again
    about each message whenever it is woken, unless the criteria say it is settled."""
    async with Sink() as sink:
        fill(sink, 1)
        wanted: set[str] = set()
        waiting = asyncio.ensure_future(sink.wait_for(match=lambda m: m.id in wanted, timeout=5))
        await asyncio.sleep(0.05)
        wanted.add(sink.messages[0].id)  # the first message now matches: the next arrival wakes the wait
        raw = b"From: a@shop.test\r\nSubject: later\r\n\r\nbody\r\n"
        sink.server.capture.mailbox.add(CapturedEnvelope("a@shop.test", ("b@example.com",)), raw, "LATER")
        [found] = await asyncio.wait_for(waiting, 2)
    assert found.id == "Q0"


async def test_headers_are_given_as_mailpit_gives_them_encoded_words_kept_lines_unfolded(api):
    """Mailpit returns Go's net/textproto header values: as sent, not RFC 2047-decoded, each folded line trimmed
    and joined by one space; a client comparing a header with what it sent expects those."""
    sink, http = api
    raw = (b"From: =?utf-8?q?J=C3=BCrgen?= <j@shop.test>\r\nTo: bob@example.com\r\n"
           b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= and\r\n\tmore  \r\nX-Trace: a   b,\r\n    c\r\n"
           b"X-Late:\r\n  hello world\r\n\r\nhello\r\n")
    async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port) as client:
        await client.sendmail("j@shop.test", ["bob@example.com"], raw)
    await sink.wait_for(count=3, match=lambda m: True)
    headers = await get_json(http, "/api/v1/message/latest/headers")
    assert headers["From"] == ["=?utf-8?q?J=C3=BCrgen?= <j@shop.test>"]
    assert headers["Subject"] == ["=?utf-8?q?Gr=C3=BC=C3=9Fe?= and more"]
    assert headers["X-Trace"] == ["a   b, c"]
    assert headers["X-Late"] == ["hello world"]  # a value begun on a continuation line: no leading blank
    assert "\t" not in headers["Received"][0] and "\n" not in headers["Received"][0]
    assert (await get_json(http, "/api/v1/message/latest"))["Subject"] == "Grüße and more"  # decoded, as Mailpit's


async def test_raw_with_dl_is_offered_as_a_file_named_after_the_id(api):
    sink, http = api
    latest = sink.messages[-1]
    async with http.get("/api/v1/message/latest/raw?dl=1") as response:
        assert response.headers["Content-Disposition"] == f'attachment; filename="{latest.id}.eml"'
        assert await response.read() == latest.raw
    async with http.get("/api/v1/message/latest/raw") as response:
        assert "Content-Disposition" not in response.headers


def many_parts(n: int) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@shop.test", "b@example.com", "parts"
    msg.set_content("the text")
    for i in range(n):
        msg.add_attachment(b"x" * 50, maintype="application", subtype="octet-stream", filename=f"f{i}.bin")
    return msg.as_bytes()


@pytest.mark.parametrize("path", ["/api/v1/messages", "/api/v1/message/Q1", "/api/v1/search?query=text",
                                  "/api/v1/wait?query=text"])
async def test_a_message_of_many_parts_is_parsed_off_the_servers_loop(path):
    # the email package takes ~2 ms a MIME part: 1500 parts held every session and delivery 3 s on the first look
    # (a summary, the message, a search, a wait); parsed in a worker thread, the loop waits at most the GIL's switch
    # interval (5 ms) at a time
    async with Sink(http_api=True) as sink, aiohttp.ClientSession(sink.http_url) as http:
        sink.server.capture.mailbox.add(CapturedEnvelope("a@shop.test", ("b@example.com",)), many_parts(1500), "Q1")
        async with LoopLag() as lag:
            async with http.get(path) as response:
                assert response.status == 200, await response.text()
            await asyncio.sleep(3 * LoopLag.TICK)  # the lag's last tick, late by a stall that ended the request
    assert lag.longest < 0.5, lag.longest  # (on the loop: 0.74-1.44 s; off it, up to 0.2-0.3 s on a loaded machine)


async def test_a_message_asked_for_by_many_at_once_is_parsed_once(monkeypatch):
    made: list[bytes] = []
    parse = capture_mailbox._made
    monkeypatch.setattr(capture_mailbox, "_made", lambda raw: made.append(raw) or parse(raw))
    async with Sink(http_api=True) as sink, aiohttp.ClientSession(sink.http_url) as http:
        sink.server.capture.mailbox.add(CapturedEnvelope("a@shop.test", ("b@example.com",)), many_parts(100), "Q1")

        async def ask(path):
            async with http.get(path) as response:
                return response.status

        paths = ["/api/v1/message/Q1", "/api/v1/messages", "/api/v1/search?query=text", "/api/v1/wait?query=text"]
        assert await asyncio.gather(*(ask(p) for p in paths * 4)) == [200] * 16
    assert len(made) == 1


async def test_a_number_parameter_is_ascii_digits_as_mailpit_reads_it(api):
    sink, http = api
    for value in ("1_0", "%D9%A3", "%201", "1.0", "9" * 5000, "9223372036854775808"):  # (int() takes the first
        # three; the last is past Go's int64)
        async with http.get(f"/api/v1/messages?limit={value}") as response:
            assert (response.status, (await response.text())[:20]) == (400, "limit: not a number:"), value
    for value in (f"{'9' * 400}", "1e3", "-1", "0x10", "nan", ".", "%2B", "%2B-1", "1.2.3", "1.%2B2", "9" * 20):
        # (float() of the first overflowed: a 500)
        async with http.get(f"/api/v1/wait?timeout={value}") as response:
            assert (response.status, (await response.text())[:33]) == (400, "timeout: not a number of seconds:")
    # "+5" (taken before fractions were, and as Atoi takes start and limit), ".5", "5.", any number of leading zeros
    for value in ("%2B0", "%2B.05", ".05", "0.", "0" * 25 + ".05"):
        async with http.get(f"/api/v1/wait?query=nothing&timeout={value}") as response:
            assert response.status == 408, (value, response.status, await response.text())
    assert (await get_json(http, "/api/v1/messages?start=9223372036854775807"))["messages"] == []  # Go's largest
    assert len((await get_json(http, "/api/v1/messages?limit=%2B1&start=0"))["messages"]) == 1  # "+1", as Atoi


def nested(depth: int) -> bytes:
    """A message of `depth` multiparts each inside the last: deeper than the email package's parser recurses."""
    opened = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(depth))
    closed = b"".join(b"--b%d--\r\n" % i for i in reversed(range(depth)))
    return b"From: a@shop.test\r\nSubject: nested\r\n" + opened + b"Content-Type: text/plain\r\n\r\nhi\r\n" + closed


@pytest.mark.parametrize("broken", [
    b"From: x@shop.test\r\nSubject: bad\r\nContent-Disposition: attachment; filename*\r\n\r\nbody\r\n",
    b"From: x@shop.test\r\nSubject: bad\r\nContent-Type: ;filename*\r\n\r\nbody\r\n",
    nested(1000)], ids=["get_content_disposition-raises", "parse-raises", "nested-1000-deep"])
async def test_a_message_the_email_package_fails_on_breaks_no_request_nor_wait(broken):
    # Python 3.11's email package raises IndexError on the first and RecursionError on the second: raised in the
    # shared parse, it made every listing, search, /raw and /wait of the mailbox 500, and a Sink wait for another
    # message's subject raise
    async with Sink(http_api=True) as sink, aiohttp.ClientSession(sink.http_url) as http:
        mailbox = sink.server.capture.mailbox
        mailbox.add(CapturedEnvelope("a@shop.test", ("b@example.com",)), broken, "BAD")
        mailbox.add(CapturedEnvelope("a@shop.test", ("b@example.com",)), b"Subject: ok\r\n\r\nfine\r\n", "OK")
        [found] = await sink.wait_for(subject="ok", timeout=2)
        assert found.id == "OK"
        paths = ["/api/v1/messages", "/api/v1/search?query=fine", "/api/v1/wait?query=fine&timeout=1",
                 "/api/v1/message/BAD", "/api/v1/message/BAD/headers", "/api/v1/message/BAD/history"]
        for path in paths:
            async with http.get(path) as response:
                assert response.status == 200, (path, await response.text())
        async with http.get("/api/v1/message/BAD/raw") as response:
            assert await response.read() == broken
        async with http.put("/api/v1/messages", json={"Search": "is:unread", "Read": True}) as response:
            assert response.status == 200
        summary = (await get_json(http, "/api/v1/messages"))["messages"][1]
        assert summary["Subject"] == broken.split(b"Subject: ")[1].split(b"\r")[0].decode()


async def test_a_parse_that_failed_is_tried_again_by_the_next_ask(monkeypatch):
    # a MemoryError in the worker thread failed that ask; kept, it failed every later ask of the message
    parse, failures = capture_mailbox._made, [MemoryError()]
    monkeypatch.setattr(capture_mailbox, "_made", lambda raw: parse(raw) if not failures else _raise(failures.pop()))
    box = capture_mailbox.Mailbox(max_messages=10, max_bytes=10**6, clock=VirtualClock())
    message = box.add(CapturedEnvelope("a@shop.test", ("b@example.com",)), b"Subject: again\r\n\r\nx\r\n", "Q1")
    with pytest.raises(MemoryError):
        await message.parse_off_loop()
    await message.parse_off_loop()
    assert message.subject == "again"


def _raise(error: BaseException):
    raise error


async def test_a_to_of_ten_thousand_addresses_is_read_once_off_the_loop_not_at_each_listing():
    # the summary and a to: term read To with policy.default's header objects at each call: 308 KB of To held
    # the server's loop 5-10 s on every listing of the mailbox
    to = ", ".join(f"User {i} <u{i}@example.com>" for i in range(10_000))
    raw = f"From: =?utf-8?q?J=C3=BCrgen?= <j@shop.test>\r\nTo: {to}\r\nSubject: wide\r\n\r\nhi\r\n".encode()
    async with Sink(http_api=True) as sink, aiohttp.ClientSession(sink.http_url) as http:
        sink.server.capture.mailbox.add(CapturedEnvelope("j@shop.test", ("u1@example.com",)), raw, "WIDE")
        async with LoopLag() as lag:
            for path in ("/api/v1/messages", "/api/v1/messages", "/api/v1/search?query=to:u9999@",
                         "/api/v1/message/WIDE"):
                found = await get_json(http, path)
            await asyncio.sleep(3 * LoopLag.TICK)
    assert lag.longest < 0.3, lag.longest
    assert (len(found["To"]), found["To"][-1]) == (10_000, {"Name": "User 9999", "Address": "u9999@example.com"})
    assert found["From"] == {"Name": "Jürgen", "Address": "j@shop.test"}


async def test_a_part_a_browser_would_run_scripts_in_is_served_as_a_download():
    # served inline as text/html (or image/svg+xml), a mailed script ran on the API's origin, where it may PUT
    # and DELETE; Mailpit serves such parts as application/octet-stream attachments
    msg = mail("scripted")
    msg.add_attachment(b"<script>fetch('/api/v1/messages', {method: 'DELETE'})</script>", maintype="text",
                       subtype="html", filename="invoice.html")
    msg.add_attachment(b"<svg xmlns='http://www.w3.org/2000/svg' onload='alert(1)'/>", maintype="image",
                       subtype="svg+xml", filename="logo.svg")
    msg.add_attachment(b"%PDF", maintype="application", subtype="pdf", filename="a.pdf")
    # (a denylist of HTML, SVG and XML served any other type inline, unsniffed: an allowlist now, and nosniff)
    msg.add_attachment(b"<x:script xmlns:x='http://www.w3.org/1999/xhtml'>alert(1)</x:script>",
                       maintype="application", subtype="xhtml+xml", filename="page.xht")
    msg.add_attachment(b"<script>alert(1)</script>", maintype="application", subtype="x-unknown", filename="a.bin")
    msg.add_attachment(b"\x89PNG", maintype="image", subtype="png", filename="a.png")
    async with Sink(http_api=True) as sink, aiohttp.ClientSession(sink.http_url) as http:
        sink.server.capture.mailbox.add(CapturedEnvelope("a@shop.test", ("b@example.com",)), msg.as_bytes(), "Q1")
        served = []
        for part in ("2", "3", "4", "5", "6", "7"):
            async with http.get(f"/api/v1/message/Q1/part/{part}") as response:
                served.append((response.content_type, response.headers["Content-Disposition"]))
                assert response.headers["X-Content-Type-Options"] == "nosniff"
                assert response.headers["Content-Security-Policy"] == "sandbox"
    assert served == [("application/octet-stream", 'attachment; filename="invoice.html"'),
                      ("application/octet-stream", 'attachment; filename="logo.svg"'),
                      ("application/pdf", 'inline; filename="a.pdf"'),
                      ("application/octet-stream", 'attachment; filename="page.xht"'),
                      ("application/octet-stream", 'attachment; filename="a.bin"'),
                      ("image/png", 'inline; filename="a.png"')]


async def test_a_wait_keeps_its_timeout_while_messages_are_parsed_and_a_subject_needs_no_parse(monkeypatch):
    # a wait parsed each new message before looking at its timeout: timeout=0.5 answered after the whole parse of
    # a message of 6000 parts (2.7 s); and a subject wait parsed every part where the header is enough
    parse = capture_mailbox._made
    monkeypatch.setattr(capture_mailbox, "_made", lambda raw: time.sleep(2) or parse(raw))  # (a parse that long)
    box = capture_mailbox.Mailbox(max_messages=10, max_bytes=10**8, clock=VirtualClock())
    big = box.add(CapturedEnvelope("a@shop.test", ("b@example.com",)), many_parts(10), "BIG")
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(capture_mailbox.WaitTimeout):
        await box.wait(capture_mailbox.Criteria(match=lambda m: m.text == "never"), 1, 0.3)
    assert loop.time() - began < 1.0
    other = box.add(CapturedEnvelope("a@shop.test", ("b@example.com",)), many_parts(10), "OTHER")
    found = await box.wait(capture_mailbox.Criteria(subject="parts"), 2, 0.3)
    assert loop.time() - began < 1.0
    assert [m.id for m in found] == ["BIG", "OTHER"] and "text" not in other.__dict__  # (its header was enough)
    await big.parse_off_loop()  # (the parse the first wait began, ended before the next test)


async def test_an_asker_cancelled_leaves_the_parse_to_the_others():
    box = capture_mailbox.Mailbox(max_messages=10, max_bytes=10**8, clock=VirtualClock())
    message = box.add(CapturedEnvelope("a@shop.test", ("b@example.com",)), many_parts(200), "Q1")
    first, second = (asyncio.ensure_future(message.parse_off_loop()) for _ in range(2))
    await asyncio.sleep(0.01)
    first.cancel()
    await asyncio.wait_for(second, 10)  # (without the shield the cancellation reached the shared parse: it raised)
    assert first.cancelled() and len(message.attachments) == 200 and "text" in message.__dict__
    alone = box.add(CapturedEnvelope("a@shop.test", ("b@example.com",)), many_parts(200), "Q2")
    only = asyncio.ensure_future(alone.parse_off_loop())
    await asyncio.sleep(0.01)
    only.cancel()  # its only asker gone, the parse still ends, and what it made is kept: no second parse
    await eventually(lambda: "text" in alone.__dict__, timeout=5)


async def test_parses_take_the_mailboxs_own_thread_not_the_servers_shared_pool(monkeypatch):
    # parsed in asyncio's default pool, 8 requests for messages of thousands of parts kept the queue's fsyncs,
    # DKIM signing and pickup waiting for a thread 5-11 s
    parse = capture_mailbox._made
    monkeypatch.setattr(capture_mailbox, "_made", lambda raw: time.sleep(0.3) or parse(raw))  # (a long parse)
    box = capture_mailbox.Mailbox(max_messages=20, max_bytes=10**8, clock=VirtualClock())
    messages = [box.add(CapturedEnvelope("a@shop.test", ("b@example.com",)), b"Subject: s\r\n\r\nx\r\n", f"Q{i}")
                for i in range(12)]
    parses = [asyncio.ensure_future(m.parse_off_loop()) for m in messages]
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.to_thread(lambda: None)  # what the queue's fsync needs: a thread of the default pool
    assert loop.time() - began < 0.2  # (12 parses fill the default pool of a machine of up to 8 CPUs)
    await asyncio.wait_for(asyncio.gather(*parses), 20)
    assert all(m.subject == "s" for m in messages)


async def test_a_parsed_message_keeps_what_a_request_reads_not_the_parsed_tree():
    # [sink] max_bytes bounds the raw bytes kept; the parsed tree kept beside them held 6 times as much for a
    # message of many parts (every part's header objects and payload)
    message = capture_mailbox.CapturedMessage("Q1", "Q1", CapturedEnvelope("a@shop.test", ("b@example.com",)),
                                              many_parts(300), 0.0)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        await message.parse_off_loop()
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(message.attachments) == 300 and kept < 2.5 * message.size, (kept, message.size)


async def test_a_wait_of_timeout_0_judges_the_messages_there_and_a_timed_out_wait_those_parsed(monkeypatch):
    # asyncio.timeout(0) cancelled the first parse and the wait dropped every verdict: Sink.wait_for(match=…,
    # timeout=0), "is it there now?", failed on a message that was there; a wait whose time ran out during a slow
    # parse dropped the verdicts on the messages parsed already
    box = capture_mailbox.Mailbox(max_messages=10, max_bytes=10**8, clock=VirtualClock())
    here = box.add(CapturedEnvelope("a@shop.test", ("b@example.com",)), b"Subject: s\r\n\r\nhello\r\n", "HERE")
    assert await box.wait(capture_mailbox.Criteria(match=lambda m: "hello" in m.text), 1, 0) == [here]
    parse = capture_mailbox._made
    monkeypatch.setattr(capture_mailbox, "_made", lambda raw: time.sleep(2) or parse(raw))  # (a parse that long)
    slow = box.add(CapturedEnvelope("a@shop.test", ("b@example.com",)), many_parts(10), "SLOW")
    loop = asyncio.get_running_loop()
    began = loop.time()
    found = await box.wait(capture_mailbox.Criteria(match=lambda m: m.text != "never"), 1, 0.3)
    assert found == [here] and loop.time() - began < 1.0
    await slow.parse_off_loop()  # (the parse the wait began, ended before the next test)


async def test_a_timed_out_http_wait_answers_on_time_and_raw_headers_history_wait_for_no_parse(monkeypatch):
    # after its wait timed out, /wait searched every message for its report, parsing those not parsed yet with
    # no deadline: timeout=1 answered after 1.96 s with a message of 3000 parts
    parse = capture_mailbox._made
    monkeypatch.setattr(capture_mailbox, "_made", lambda raw: time.sleep(2) or parse(raw))  # (a parse that long)
    async with Sink(http_api=True) as sink, aiohttp.ClientSession(sink.http_url) as http:
        slow = sink.server.capture.mailbox.add(CapturedEnvelope("a@shop.test", ("b@example.com",)), many_parts(10),
                                               "SLOW")
        loop = asyncio.get_running_loop()
        began = loop.time()
        timed_out = await get_json(http, "/api/v1/wait?query=never&timeout=1", status=408)
        assert loop.time() - began < 1.6 and "0 matched; 1 arrived" in timed_out["error"]
        for path in ("raw", "headers", "history"):  # (its bytes, its header, its envelope: no parse)
            began = loop.time()
            async with http.get(f"/api/v1/message/SLOW/{path}") as response:
                assert response.status == 200
            assert loop.time() - began < 0.5, path
        await slow.parse_off_loop()  # (the parse the wait began, ended before the next test)


async def test_an_http_wait_of_timeout_0_finds_a_message_there_not_parsed_yet():
    async with Sink(http_api=True) as sink, aiohttp.ClientSession(sink.http_url) as http:
        sink.server.capture.mailbox.add(CapturedEnvelope("a@shop.test", ("b@example.com",)),
                                        b"Subject: s\r\n\r\nhello there\r\n", "HERE")
        found = await get_json(http, "/api/v1/wait?query=hello&timeout=0")
    assert [m["ID"] for m in found["messages"]] == ["HERE"]


async def test_headers_reads_the_fields_the_message_keeps(monkeypatch):
    # /headers parsed the header again on the loop at each request, though the message keeps it (`fields`)
    read: list[bytes] = []
    header_only = capture_mailbox.mime.header_only
    monkeypatch.setattr(capture_mailbox.mime, "header_only", lambda raw: read.append(raw) or header_only(raw))
    async with Sink(http_api=True) as sink, aiohttp.ClientSession(sink.http_url) as http:
        sink.server.capture.mailbox.add(CapturedEnvelope("a@shop.test", ("b@example.com",)),
                                        b"Subject: =?utf-8?q?caf=C3=A9?=\r\n\r\nx\r\n", "Q1")
        for _ in range(3):
            assert (await get_json(http, "/api/v1/message/Q1/headers")) == {"Subject": ["=?utf-8?q?caf=C3=A9?="]}
    assert len(read) == 1


async def test_an_http_wait_takes_a_fraction_of_a_second(api):
    # `timeout=0.5` was a 400, "timeout: not a number: '0.5'", where Sink.wait_for(timeout=0.5) waits half a second
    sink, http = api
    loop = asyncio.get_running_loop()
    began = loop.time()
    timed_out = await get_json(http, "/api/v1/wait?query=never&timeout=0.3", status=408)
    assert 0.25 < loop.time() - began < 1.5 and "waited 0.3s for 1 message" in timed_out["error"]
