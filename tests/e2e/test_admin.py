"""The admin listener of a running server: /metrics after known traffic, the health probes, the admin API's queue
actions (the same selections as `mailflow queue`), and who may use it (tokens, loopback names, JSON writes).

Mail is kept queued with a dead relayhost (every attempt to relay.test defers, retried every 1-2 s) or an
hour's backoff; local mail goes to Maildirs; `error:` in transport_maps bounces.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sqlite3

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailflow.config import ConfigError, config_from_dict
from tests.support import base_settings, eventually, free_port, merged, queue_becomes, send

TOKEN = "0123456789abcdef0123456789abcdef"
ADMIN = {"enable": True, "listen": ["127.0.0.1:0"]}
HOUR = {"queue_run_delay": "1h", "minimal_backoff_time": "1h", "maximal_backoff_time": "1h"}


def message(subject: str) -> bytes:
    return f"Subject: {subject}\r\nX-Test: admin\r\n\r\nhello from the admin test\r\n".encode()


async def submit(mf, sender: str, rcpts: list[str], subject: str = "test") -> str:
    refused, reply = await send(mf.smtp_addresses[0][1], sender, rcpts, message(subject))
    assert refused == {} and reply.startswith("2.0.0 Ok: queued as "), reply
    return reply.rsplit(" ", 1)[1]


def base(mf) -> str:
    host, port = mf.admin.addresses[0]
    return f"http://{host}:{port}"


async def get(mf, path: str, **kwargs) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(base(mf) + path, **kwargs) as response:
            return response.status, await response.text()


async def post(mf, path: str, body: dict, **kwargs) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(base(mf) + path, json=body, **kwargs) as response:
            return response.status, await response.json()


async def scrape(mf) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    status, text = await get(mf, "/metrics")
    assert status == 200, text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape_once(mf, *reached: tuple[float, str, dict]) -> dict[tuple[str, tuple], float]:
    """/metrics once every (value, name, labels) of `reached` is there: results are counted as they are logged, just
    after the commit that the queue's counts show (a loaded machine scraped between the two)."""
    async def scraped() -> dict | None:
        samples = await scrape(mf)
        return samples if all(sample(samples, name, **labels) >= value for value, name, labels in reached) else None
    return await eventually(scraped, timeout=10, what=f"the metrics reaching {reached}")


# ---------------------------------------------------------------------------------------------- metrics


async def test_a_message_held_on_arrival_is_counted_queued_once(mailflow_server):
    """A message put on hold as it arrives is committed to the queue then (counted), though qmgr's `from=` line
    waits for its release, as Postfix logs it; its release does not count it a second time."""
    mf = await mailflow_server(admin=ADMIN, smtpd={
        "sender_restrictions": ["check_sender_access inline:{held@remote.test=HOLD}"]})
    held = await submit(mf, "held@remote.test", ["bob@local.test"], "held")
    await queue_becomes(mf.store, {"hold": 1})
    assert sample(await scrape(mf), "mailflow_messages_queued_total") == 1
    status, answer = await post(mf, "/api/queue/release", {"ids": [held]})
    assert status == 200 and answer["messages"] == 1
    await queue_becomes(mf.store, {})
    m = await scrape_once(mf, (1, "mailflow_messages_removed_total", {}))
    assert sample(m, "mailflow_messages_queued_total") == 1
    assert sample(m, "mailflow_messages_removed_total") == 1
    assert sample(m, "mailflow_deliveries_total", transport="local", status="sent", dsn_class="2.0") == 1


async def test_metrics_count_known_traffic(mailflow_server, smtp_peer):
    peer = await smtp_peer()
    peer.handler.rcpt_replies.update({"gone@relay.test": "550 5.1.1 No such user",
                                      "busy@relay.test": "450 4.2.1 Mailbox busy, try later"})
    mf = await mailflow_server(admin=ADMIN, queue=HOUR, relayhost=f"[127.0.0.1]:{peer.port}")
    await submit(mf, "alice@local.test", ["bob@local.test"], "one")
    await submit(mf, "alice@local.test", ["bob@local.test", "alice@local.test"], "two")
    await submit(mf, "alice@local.test", ["gone@relay.test"], "bounced")  # the failure notice goes to alice
    held = await submit(mf, "alice@local.test", ["busy@relay.test"], "deferred")  # for an hour
    await submit(mf, "alice@local.test", ["carol@relay.test"], "relayed")
    # all but the deferred one done and removed, the notice delivered too
    await queue_becomes(mf.store, {"deferred": 1})
    status, answer = await post(mf, "/api/queue/hold", {"ids": [held]})
    assert status == 200 and answer["messages"] == 1

    m = await scrape_once(mf, (5, "mailflow_messages_removed_total", {}), (1, "mailflow_deliveries_total",
                                                                          {"transport": "relay", "status": "deferred",
                                                                           "dsn_class": "4.2"}))
    assert sample(m, "mailflow_messages_received_total", source="smtpd") == 5
    assert sample(m, "mailflow_messages_queued_total") == 6  # and the failure notice
    assert sample(m, "mailflow_messages_removed_total") == 5
    assert sample(m, "mailflow_notices_total", kind="failure") == 1
    assert sample(m, "mailflow_deliveries_total", transport="local", status="sent", dsn_class="2.0") == 4
    # relay-domain mail goes over relay_transport, `relay` (Postfix's default), labelled so
    assert sample(m, "mailflow_deliveries_total", transport="relay", status="sent", dsn_class="2.0") == 1
    assert sample(m, "mailflow_deliveries_total", transport="relay", status="bounced", dsn_class="5.1") == 1
    assert sample(m, "mailflow_deliveries_total", transport="relay", status="deferred", dsn_class="4.2") == 1
    # a final result each: 5 sent, 1 bounced; the deferral is not final
    assert sample(m, "mailflow_queue_residence_seconds_count") == 6
    assert sample(m, "mailflow_queue_residence_seconds_bucket", le="+Inf") == 6
    # one delivery job per (message, destination): 3 local (the notice's included), 3 relay
    assert sample(m, "mailflow_delivery_duration_seconds_count", transport="local") == 3
    assert sample(m, "mailflow_delivery_duration_seconds_count", transport="relay") == 3
    # 5 sessions (aiosmtplib: EHLO, MAIL, RCPT..., DATA, QUIT), 6 recipients: 5 x (EHLO, MAIL, end) + 6 RCPT
    assert sample(m, "mailflow_smtpd_sessions_total") == 5
    assert sample(m, "mailflow_smtpd_replies_total", code="220") == 5
    assert sample(m, "mailflow_smtpd_replies_total", code="250") == 5 * 3 + 6
    assert sample(m, "mailflow_smtpd_replies_total", code="354") == 5
    assert sample(m, "mailflow_smtpd_replies_total", code="221") == 5
    # read at scrape time
    assert sample(m, "mailflow_queue_messages", queue="hold") == 1
    assert sample(m, "mailflow_queue_messages", queue="deferred") == 0
    assert sample(m, "mailflow_smtpd_sessions_open") == 0
    commits = sample(m, "mailflow_store_commit_seconds_count")
    assert commits >= 6 and sample(m, "mailflow_store_commit_batch_requests_count") == commits
    assert sample(m, "mailflow_store_commit_batch_requests_sum") >= commits
    assert sample(m, "process_resident_memory_bytes") > 10_000_000


async def test_two_servers_count_apart(mailflow_server, tmp_path):
    first = await mailflow_server(admin=ADMIN)
    config = config_from_dict(merged(base_settings(tmp_path / "second"), {"admin": ADMIN}))
    from mailflow.app import Mailflow

    async with Mailflow(config, shutdown_grace=1) as second:
        await submit(first, "alice@local.test", ["bob@local.test"])
        assert sample(await scrape(first), "mailflow_messages_received_total", source="smtpd") == 1
        assert sample(await scrape(second), "mailflow_messages_received_total", source="smtpd") == 0


async def test_destination_windows_and_dead_sites(mailflow_server):
    mf = await mailflow_server(admin=ADMIN, relayhost=f"[127.0.0.1]:{free_port()}",
                               queue={"destination_concurrency_failed_cohort_limit": 1,
                                      "initial_destination_concurrency": 1,
                                      "minimal_backoff_time": "1h", "maximal_backoff_time": "1h",
                                      "queue_run_delay": "1h"})
    await submit(mf, "alice@local.test", ["carol@relay.test"])

    async def dead() -> dict:
        m = await scrape(mf)
        return m if sample(m, "mailflow_destinations", state="dead") == 1 else {}

    m = await eventually(dead, timeout=10, what="the dead relay counted as a dead site")
    [(_, labels)] = [key for key in m if key[0] == "mailflow_destination_dead"]
    assert dict(labels)["transport"] == "relay" and "127.0.0.1" in dict(labels)["nexthop"]  # (relay-domain mail)
    assert m[("mailflow_destination_dead", labels)] == 1
    assert ("mailflow_destination_window", labels) in m


# ---------------------------------------------------------------------------------------------- health


async def test_health_probes(mailflow_server):
    mf = await mailflow_server(admin=ADMIN)
    assert await get(mf, "/healthz") == (200, "ok\n")
    assert await get(mf, "/readyz") == (200, "ready\n")
    smtpd, mf.smtpd = mf.smtpd, None  # as while starting or stopping
    try:
        status, text = await get(mf, "/readyz")
    finally:
        mf.smtpd = smtpd
    assert status == 503 and "smtpd" in text
    assert (await get(mf, "/healthz"))[0] == 200


# ---------------------------------------------------------------------------------------------- the queue API


async def test_actions_change_the_queue_and_are_logged(mailflow_server, caplog):
    mf = await mailflow_server(admin=ADMIN, queue=HOUR, relayhost=f"[127.0.0.1]:{free_port()}")
    first = await submit(mf, "alice@local.test", ["carol@relay.test"], "first")
    second = await submit(mf, "dave@remote.test", ["erin@relay.test"], "second")
    await queue_becomes(mf.store, {"deferred": 2})

    async def state(qid: str) -> str | None:
        detail = await mf.store.message_detail(qid)
        return detail.queue if detail else None

    caplog.set_level(logging.INFO, logger="mailflow.admin")
    status, answer = await post(mf, "/api/queue/hold", {"from": "dave@remote.test"})
    assert (status, answer) == (200, {"action": "hold", "messages": 1, "missed": []})
    assert await state(second) == "hold" and await state(first) == "deferred"
    assert any(r.getMessage() == "admin: 127.0.0.1: hold from=<dave@remote.test>: 1 message" for r in caplog.records)

    status, answer = await post(mf, "/api/queue/release", {"ids": [second, first]})
    assert answer == {"action": "release", "messages": 1, "missed": [first]}
    assert any(r.getMessage().endswith(f"(not in the hold queue: {first})") for r in caplog.records)
    unknown = [f"{i:08X}" for i in range(500)]  # the log names 20 and counts them (the answer, every one)
    assert (await post(mf, "/api/queue/release", {"ids": unknown}))[1]["missed"] == unknown
    [line] = [r.getMessage() for r in caplog.records if "0000000A" in r.getMessage()]
    assert line.endswith("00000013,…(500))") and line.count("00000013") == 2  # the selection's ids, the missed
    assert await state(second) == "deferred"

    before = (await mf.store.message_detail(first)).next_attempt
    status, answer = await post(mf, "/api/queue/flush", {"ids": [first]})
    assert status == 200 and answer["messages"] == 1
    detail = await mf.store.message_detail(first)
    assert detail is None or detail.next_attempt < before or detail.attempts > 1  # due now, maybe tried again

    status, answer = await post(mf, "/api/queue/delete", {"ids": [first], "older_than": "0s"})
    assert status == 200 and answer["messages"] == 1
    assert await state(first) is None
    assert any("admin: 127.0.0.1: delete ids=" + first in r.getMessage() for r in caplog.records)

    (mf.config.queue_path / "public" / "pickup").unlink()  # (the API wakes the pickup of its own process directly)
    status, answer = await post(mf, "/api/queue/requeue", {"ids": ["ALL"]})
    assert (status, answer) == (200, {"action": "requeue", "messages": 1, "missed": []})
    copied = await eventually(lambda: mf.store.message_ids(queues=["incoming", "active", "deferred"]), timeout=5,
                              what="the copy of the requeued message under a new queue id")
    assert copied != [second] and await state(second) is None  # pickup woken by the API: no `pickup_interval` wait


async def test_queue_list_show_shape_and_refusals(mailflow_server):
    mf = await mailflow_server(admin=ADMIN, queue=HOUR, relayhost=f"[127.0.0.1]:{free_port()}")
    qid = await submit(mf, "alice@local.test", ["carol@relay.test"], "look at me")
    await queue_becomes(mf.store, {"deferred": 1})

    async with aiohttp.ClientSession() as session:
        async with session.get(base(mf) + "/api/queue", params={"to_domain": "relay.test"}) as r:
            listing = await r.json()
        [entry] = listing["messages"]
        assert entry["id"] == qid and entry["recipients"][0]["address"] == "carol@relay.test"
        async with session.get(base(mf) + "/api/queue", params={"from": "nobody@x.test"}) as r:
            assert (await r.json())["messages"] == []

        async def shown_with_its_history() -> dict | None:  # (the deferral is logged just after its commit)
            async with session.get(base(mf) + f"/api/queue/{qid}") as r:
                shown = await r.json()
            return shown if shown["history"] else None
        shown = await eventually(shown_with_its_history, timeout=10, what="the deferral in the message's history")
        assert shown["queue"] == "deferred" and "Subject: look at me" in shown["headers"]
        assert [h["status"] for h in shown["history"]] == ["deferred"]
        async with session.get(base(mf) + f"/api/queue/{qid}/raw") as r:
            raw = await r.read()
        assert r.headers["Content-Type"] == "message/rfc822" and b"hello from the admin test" in raw
        async with session.get(base(mf) + "/api/queue/shape") as r:
            shape = await r.json()
        assert shape["domains"][0]["domain"] == "relay.test" and shape["total"]["total"] == 1

    assert (await get(mf, "/api/queue/NOSUCHID"))[0] == 404
    assert (await get(mf, "/api/queue?older_than=soon"))[0] == 400
    status, answer = await post(mf, "/api/queue/delete", {})  # a bare delete does not mean everything
    assert status == 400 and "say which messages" in answer["error"]
    # a misspelt selector is refused, not dropped (dropped, this would delete every message)
    status, answer = await post(mf, "/api/queue/delete", {"ids": ["ALL"], "form": "nobody@x.test"})
    assert status == 400 and "unknown field 'form'" in answer["error"]
    assert (await post(mf, "/api/queue/hold", {"to_domian": "relay.test"}))[0] == 400
    for query in ("to_domian=x.test", "from=a@x.test&from=b@x.test", "limit=5&limit=6", "queue=hold&queue=nosuch"):
        status, text = await get(mf, "/api/queue?" + query)
        assert status == 400 and json.loads(text)["error"], query
    assert (await get(mf, "/api/queue/shape?tops=5"))[0] == 400
    assert (await get(mf, "/api/deliveries?limit=1&limit=2"))[0] == 400
    for value in ("1_0", "%D9%A3", "%201", "9223372036854775808"):  # what int() reads as 10, 3 and 1 is not a
        # number here, nor what is past a 64-bit int
        status, text = await get(mf, "/api/queue?limit=" + value)
        assert (status, json.loads(text)["error"]) == (400, "limit: not a number"), value
    # a sign is read as the capture API reads one (Go's Atoi, Mailpit's): "+5" is 5, "-5" a number out of range
    assert (await get(mf, "/api/queue?limit=%2B5"))[0] == 200
    status, text = await get(mf, "/api/queue?limit=-5")
    assert (status, json.loads(text)["error"]) == (400, "limit: from 1 to 1000"), text
    assert (await mf.store.message_detail(qid)).queue == "deferred"
    assert (await post(mf, "/api/queue/explode", {"ids": [qid]}))[0] == 404


async def test_a_damaged_queue_row_is_listed_and_shown_marked_among_the_others(mailflow_server):
    """A row edited by hand (`arrival = 'x'`, a recipient status no code writes) neither fails /api/queue, the
    message's page nor the shape (a 500 would blank the queue page): the message comes marked "damaged"."""
    mf = await mailflow_server(admin=ADMIN, queue=HOUR, relayhost=f"[127.0.0.1]:{free_port()}")
    sound = await submit(mf, "alice@local.test", ["carol@relay.test"], "fine")
    bad = await submit(mf, "alice@local.test", ["dave@relay.test"], "damaged")
    await queue_becomes(mf.store, {"deferred": 2})
    with sqlite3.connect(mf.config.queue_path / "queue.db") as db:  # deferred for an hour: qmgr leaves it be
        db.execute("PRAGMA ignore_check_constraints = 1")
        db.execute("UPDATE message SET arrival = 'x' WHERE id = ?", (bad,))
        db.execute("UPDATE recipient SET status = 'odd' WHERE message_id = ?", (bad,))
    said = "arrival is 'x', not a time; recipient dave@relay.test: status is 'odd', not pending, sent or bounced"

    status, text = await get(mf, "/api/queue")
    assert status == 200, text
    listed = {m["id"]: m for m in json.loads(text)["messages"]}
    assert listed.keys() == {sound, bad} and "damaged" not in listed[sound]
    assert listed[bad]["damaged"] == said and listed[bad]["recipients"][0]["status"] == "odd"
    status, text = await get(mf, f"/api/queue/{bad}")
    assert status == 200 and json.loads(text)["damaged"] == said, text
    assert (await get(mf, "/api/queue/shape?queue=deferred"))[0] == 200


async def test_a_message_that_leaves_the_queue_while_it_is_read(mailflow_server, monkeypatch, caplog):
    """Delivered or deleted between the lookup and the read of its file (a message over 256 KB lives in one):
    /api/queue/ID is a 404, and /raw, its answer begun, is cut off rather than ended as if complete."""
    mf = await mailflow_server(admin=ADMIN, queue=HOUR, relayhost=f"[127.0.0.1]:{free_port()}")
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 400
    ids = []
    for _ in range(2):
        refused, reply = await send(mf.smtp_addresses[0][1], "alice@local.test", ["carol@relay.test"], big)
        ids.append(reply.rsplit(" ", 1)[1])
    await queue_becomes(mf.store, {"deferred": 2})
    looked_up = mf.store.content

    async def then_deleted(qid: str):
        content = await looked_up(qid)
        assert (await post(mf, "/api/queue/delete", {"ids": [qid]}))[1]["messages"] == 1  # another operator
        return content

    monkeypatch.setattr(mf.store, "content", then_deleted)
    caplog.set_level(logging.INFO)
    status, text = await get(mf, f"/api/queue/{ids[0]}")
    assert status == 404 and "no longer queued" in json.loads(text)["error"]
    with pytest.raises(aiohttp.ClientPayloadError):
        await get(mf, f"/api/queue/{ids[1]}/raw")
    assert await mf.store.counts() == {}
    assert any(r.getMessage().startswith(f"{ids[1]}: the message left the queue while /raw sent it")
               for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_config_show_redacts_secrets(mailflow_server):
    mf = await mailflow_server(admin=ADMIN, smtp={"sasl_password_maps": ["inline:{relay.test=user:hunter2}"]})
    status, text = await get(mf, "/api/config")
    assert status == 200 and "hunter2" not in text
    settings = json.loads(text)["settings"]
    assert settings["smtp.sasl_password_maps"] == ["inline:<redacted>"]
    assert settings["myhostname"] == "mx.mailflow.test"


# ---------------------------------------------------------------------------------------------- access


async def test_tokens_are_required_when_configured(mailflow_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# the operators\nops:{TOKEN}\n")
    mf = await mailflow_server(admin={**ADMIN, "token_file": str(tokens)})
    assert (await get(mf, "/api/summary"))[0] == 401
    status, _ = await get(mf, "/metrics", headers={"Authorization": "Bearer " + "x" * 32})
    assert status == 401
    status, _ = await get(mf, "/metrics", headers={"Authorization": f"Basic {TOKEN}"})
    assert status == 401
    assert (await get(mf, "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}))[0] == 200
    status, answer = await post(mf, "/api/queue/flush", {})
    assert status == 401
    # the probes and the page's own files need none
    assert (await get(mf, "/healthz"))[0] == 200 and (await get(mf, "/readyz"))[0] == 200
    assert (await get(mf, "/"))[0] == 200 and (await get(mf, "/queue.js"))[0] == 200


async def test_token_names_who_acted(mailflow_server, tmp_path, caplog):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ops:{TOKEN}\n")
    mf = await mailflow_server(admin={**ADMIN, "token_file": str(tokens)})
    caplog.set_level(logging.INFO, logger="mailflow.admin")
    status, answer = await post(mf, "/api/queue/flush", {}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert (status, answer["messages"]) == (200, 0)
    assert any(r.getMessage() == "admin: ops@127.0.0.1: flush ALL: 0 messages" for r in caplog.records)


def test_beyond_loopback_needs_a_token_file(tmp_path):
    for address in ("0.0.0.0:8026", "[::]:8026", "192.0.2.1:8026", "mx.example:8026"):
        with pytest.raises(ConfigError, match="beyond loopback: set admin.token_file"):
            config_from_dict({"admin": {"enable": True, "listen": [address]}})
    for address in ("127.0.0.2:8026", "[::1]:8026", "localhost:8026"):
        config_from_dict({"admin": {"enable": True, "listen": [address]}})
    config_from_dict({"admin": {"enable": False, "listen": ["0.0.0.0:8026"]}})  # not opened: nothing to guard


async def test_a_server_with_an_unusable_token_file_does_not_start(mailflow_server, tmp_path):
    short = tmp_path / "short"
    short.write_text("ops:abc\n")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        await mailflow_server(admin={**ADMIN, "token_file": str(short)})
    with pytest.raises(ConfigError, match="cannot read"):
        await mailflow_server(admin={**ADMIN, "token_file": str(tmp_path / "missing")})


async def test_every_refusal_is_json_and_hostile_bodies_change_nothing(mailflow_server, caplog):
    mf = await mailflow_server(admin=ADMIN, queue=HOUR, relayhost=f"[127.0.0.1]:{free_port()}")
    qid = await submit(mf, "alice@local.test", ["carol@relay.test"])
    await queue_becomes(mf.store, {"deferred": 1})
    json_type = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        # bodies Python's JSON parser cannot take: nested past its recursion limit, in a charset it does not know,
        # with a lone surrogate (which no store query, log line or password hash can encode)
        for path, body, content_type in [
                ("/api/queue/delete", b"[" * 100_000, "application/json"),
                ("/api/accounts", b'{"address": ' * 50_000, "application/json"),
                ("/api/queue/delete", b'{"ids": ["ALL"]}', "application/json; charset=no-such-charset"),
                ("/api/queue/delete", b'{"ids": ["ALL"], "from": "\\ud800"}', "application/json"),
                ("/api/accounts", b'{"address": "a@example.com", "password": "\\udc80 long enough"}',
                 "application/json")]:
            async with session.post(base(mf) + path, data=body, headers={"Content-Type": content_type}) as r:
                assert (r.status, r.content_type) == (400, "application/json"), (path, await r.text())
                assert (await r.json())["error"].startswith("the body ")
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        for method, path, body, status in [
                ("GET", "/api/nothing", None, 404), ("GET", "/api/queue/../../etc/passwd", None, 404),
                ("GET", "/api/queue/..%2F..%2Fetc%2Fpasswd", None, 400), ("PUT", "/api/queue/delete", b"{}", 405),
                ("POST", "/api/queue/delete", b"{\"ids\": [", 400), ("POST", "/api/queue/delete", b"[]", 400),
                ("POST", "/api/queue/delete", b'{"ids": [1]}', 400), ("POST", "/api/queue/delete", b'{"ids": {}}', 400),
                ("POST", "/api/queue/delete", b"{" + b" " * (1024 * 1024) + b"}", 413)]:
            async with session.request(method, base(mf) + path, data=body, headers=json_type,
                                       skip_auto_headers=["Content-Type"] if body is None else ()) as r:
                assert (r.status, r.content_type) == (status, "application/json"), (method, path, await r.text())
                assert (await r.json())["error"]
                if status == 405:
                    assert r.headers["Allow"] == "GET,HEAD,POST"
    assert (await mf.store.message_detail(qid)) is not None


async def test_loopback_without_tokens_refuses_other_names_and_cross_site_writes(mailflow_server):
    mf = await mailflow_server(admin=ADMIN, queue=HOUR, relayhost=f"[127.0.0.1]:{free_port()}")
    qid = await submit(mf, "alice@local.test", ["carol@relay.test"])
    await queue_becomes(mf.store, {"deferred": 1})
    # DNS rebinding: a name that resolved to 127.0.0.1 for a web page
    assert (await get(mf, "/api/summary", headers={"Host": "evil.example:8026"}))[0] == 403
    assert (await get(mf, "/api/summary", headers={"Host": "localhost:8026"}))[0] == 200
    # a cross-site form cannot send JSON without a preflight; one that says where it comes from is refused
    async with aiohttp.ClientSession() as session:
        async with session.post(base(mf) + "/api/queue/delete", data={"ids": qid}) as r:
            assert r.status == 415
    status, _ = await post(mf, "/api/queue/delete", {"ids": [qid]}, headers={"Origin": "http://evil.example"})
    assert status == 403
    assert (await mf.store.message_detail(qid)) is not None
    status, _ = await post(mf, "/api/queue/delete", {"ids": [qid]}, headers={"Origin": base(mf)})
    assert status == 200 and await mf.store.message_detail(qid) is None


async def test_admin_is_off_by_default(mailflow_server):
    mf = await mailflow_server()
    assert mf.admin is None and mf.metrics is None
    await asyncio.sleep(0)


# ---------------------------------------------------------------------------------------------- accounts


async def test_account_endpoints_change_the_account_database(mailflow_server, tmp_path, caplog):
    import sqlite3

    from mailflow.accounts.database import AccountDatabase
    from mailflow.passwords import verify_password

    path = tmp_path / "accounts.db"
    db = AccountDatabase.open(path, create=True)
    db.add_domain("example.com")
    db.close()
    mf = await mailflow_server(admin=ADMIN, accounts={"database_file": str(path)})
    caplog.set_level(logging.INFO, logger="mailflow.admin")

    def stored_hash(address: str) -> str:
        with sqlite3.connect(path) as con:
            return con.execute("SELECT password FROM mailbox WHERE address = ?", (address,)).fetchone()[0]

    status, user = await post(mf, "/api/accounts", {"address": "Ann@Example.com", "password": "correct horse",
                                                    "quota": "1M"})
    assert status == 201, user
    assert (user["address"], user["quota"], user["enabled"]) == ("ann@example.com", 1 << 20, True)
    assert verify_password(b"correct horse", stored_hash("ann@example.com"))
    assert (await post(mf, "/api/accounts", {"address": "ann@example.com", "password": "another one"}))[0] == 409
    status, answer = await post(mf, "/api/accounts", {"address": "bob@example.com", "password": "bob"})
    assert status == 400 and "refused" in answer["error"]
    assert (await post(mf, "/api/accounts", {"address": "x@elsewhere.test", "password": "long enough"}))[0] == 409
    assert (await post(mf, "/api/accounts", {"address": "x@example.com"}))[0] == 400
    status, answer = await post(mf, "/api/accounts", {"address": "big@example.com", "password": "long enough",
                                                      "quota": "99999999999T"})  # it was a 500 (OverflowError)
    assert status == 400 and "too big" in answer["error"]
    status, answer = await post(mf, "/api/accounts", {"address": "typo@example.com", "password": "long enough",
                                                      "qouta": "1G"})  # it made a mailbox without its quota
    assert (status, answer) == (400, {"error": "unknown field 'qouta' (use address, password, quota)"})

    status, text = await get(mf, "/api/accounts?domain=example.com")
    assert status == 200 and [u["address"] for u in json.loads(text)["users"]] == ["ann@example.com"]

    async with aiohttp.ClientSession() as session:
        async with session.put(base(mf) + "/api/accounts/ann@example.com/password",
                               json={"password": "battery staple"}) as r:
            assert r.status == 200 and (await r.json())["password_changed"]
        assert verify_password(b"battery staple", stored_hash("ann@example.com"))
        async with session.delete(base(mf) + "/api/accounts/ann@example.com") as r:
            assert r.status == 200 and (await r.json())["removed"]
        async with session.delete(base(mf) + "/api/accounts/ann@example.com") as r:
            assert r.status == 404
    said = [r.getMessage() for r in caplog.records if r.name == "mailflow.admin"]
    assert "admin: 127.0.0.1: account add ann@example.com (quota 1048576)" in said
    assert "admin: 127.0.0.1: account passwd ann@example.com" in said
    assert "admin: 127.0.0.1: account delete ann@example.com" in said
    assert not any("horse" in line or "staple" in line for line in said)
