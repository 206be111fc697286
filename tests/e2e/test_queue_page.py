"""The queue page in a real browser (Debian's headless Chromium): the queued message appears in the page's DOM,
its message view shows envelope, headers and history, and the Hold and Release buttons change the queue
(clicked over the DevTools protocol; the DOM of a reload shows the change). Markup in what senders and remote
servers write (envelope, headers, a remote reply as the defer reason) is shown as text and runs nothing. Every
answer of the listener carries the browser's security headers (nosniff, no framing, no Referer; no script at all
in the API's answers).
A screenshot of the page is kept as a test artefact (tests.support.browser.keep_artifact: $MAILFLOW_ARTIFACTS
or artifacts/).
"""
from __future__ import annotations

import json
import re

import aiohttp

from tests.support import Chromium, SmtpClient, free_port, keep_artifact, queue_becomes, send

ADMIN = {"enable": True, "listen": ["127.0.0.1:0"]}
HOUR = {"queue_run_delay": "1h", "minimal_backoff_time": "1h", "maximal_backoff_time": "1h"}


async def queued_message(mailflow_server):
    mf = await mailflow_server(admin=ADMIN, queue=HOUR, relayhost=f"[127.0.0.1]:{free_port()}")
    refused, reply = await send(mf.smtp_addresses[0][1], "someone@remote.test",
                                ["alice@local.test", "carol@relay.test"],
                                b"Subject: seen in a browser\r\n\r\nhello\r\n")
    assert refused == {}, refused
    qid = reply.rsplit(" ", 1)[1]
    await queue_becomes(mf.store, {"deferred": 1})  # alice's copy delivered; carol's waits (the relay is dead)
    host, port = mf.admin.addresses[0]
    return mf, qid, f"http://{host}:{port}/"


async def test_the_queued_message_appears_and_its_buttons_work(mailflow_server, tmp_path):
    mf, qid, url = await queued_message(mailflow_server)
    chromium = Chromium(tmp_path / "chromium")

    dom = await chromium.dump_dom(url)
    assert re.search(rf'<tr class="pick" data-queue-id="{qid}"><td>{qid}</td><td class="queue-deferred">deferred'
                     r'</td>', dom), dom
    assert "<td>carol@relay.test</td>" in dom  # its pending recipient
    assert re.search(r"<td>relay\.test</td><td class=\"number\">1</td>", dom)  # the queue shape
    assert "alice@local.test" in dom and 'class="status-sent">sent<' in dom  # the last deliveries

    async with chromium.page(url) as page:
        await page.until(f"!!document.querySelector('tr[data-queue-id=\"{qid}\"]')")
        await page.click(f"tr[data-queue-id=\"{qid}\"]")  # opens the message view
        await page.until("document.getElementById('message').dataset.queue === 'deferred'")
        headers = await page.evaluate("document.getElementById('headers').textContent")
        assert "Subject: seen in a browser" in headers and f"with ESMTP id {qid}" in headers
        assert await page.evaluate("document.querySelectorAll('#history tbody tr').length") == 2
        shot = await page.screenshot(tmp_path / "queue-page.png")
        await page.click("button[data-action=hold]")
        await page.until("document.getElementById('action-result').dataset.action === 'hold'")
        await page.until("document.getElementById('message').dataset.queue === 'hold'")
        assert (await mf.store.message_detail(qid)).queue == "hold"
        await page.click("button[data-action=release]")  # due now: qmgr may be trying it again (active)
        await page.until("['deferred', 'active'].includes(document.getElementById('message').dataset.queue)")
        assert (await mf.store.message_detail(qid)).queue in ("deferred", "active")
        await page.click("button[data-action=hold]")
        await page.until("document.getElementById('message').dataset.queue === 'hold'")
        await page.screenshot(tmp_path / "queue-page-held.png")
    assert (await mf.store.message_detail(qid)).queue == "hold"
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 10_000
    keep_artifact(shot)
    keep_artifact(tmp_path / "queue-page-held.png")

    # what a reload of the page shows now: the message on hold, its view deep-linked
    dom = await chromium.dump_dom(f"{url}#message={qid}")
    assert '<section id="message" data-queue="hold">' in dom
    assert re.search(rf'data-queue-id="{qid}"><td>{qid}</td><td class="queue-hold">hold</td>', dom), dom


async def test_every_answer_carries_the_security_headers(mailflow_server):
    mf, qid, url = await queued_message(mailflow_server)
    page_policy = "default-src 'self'; base-uri 'none'; frame-ancestors 'none'"
    data_policy = "default-src 'none'; frame-ancestors 'none'; sandbox"
    async with aiohttp.ClientSession() as session:
        for path, status, policy in [("", 200, page_policy), ("queue.js", 200, page_policy),
                                     ("api/summary", 200, data_policy), (f"api/queue/{qid}", 200, data_policy),
                                     (f"api/queue/{qid}/raw", 200, data_policy), ("metrics", 200, data_policy),
                                     ("api/queue/NOSUCHID", 404, data_policy), ("nothing", 404, data_policy)]:
            async with session.get(url + path) as r:
                await r.read()
                assert r.status == status, path
                assert r.headers.get("Content-Security-Policy") == policy, (path, r.headers)
                assert r.headers.get("X-Content-Type-Options") == "nosniff", path
                assert r.headers.get("X-Frame-Options") == "DENY", path
                assert r.headers.get("Referrer-Policy") == "no-referrer", path
        # the refusal of a cross-site write, raised before any handler, too
        cross_site = {"Origin": "http://x.test"}
        async with session.post(url + "api/queue/delete", json={"ids": [qid]}, headers=cross_site) as r:
            assert r.status == 403 and r.headers.get("X-Content-Type-Options") == "nosniff"


PWN = '"><img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'


async def test_hostile_mail_is_shown_as_text_and_runs_nothing(mailflow_server, smtp_peer, tmp_path):
    peer = await smtp_peer()
    peer.handler.rcpt_replies["carol@relay.test"] = f"450 4.2.1 {PWN} <a href=javascript:window.pwned=3>x</a>"
    mf = await mailflow_server(admin=ADMIN, queue=HOUR, relayhost=f"[127.0.0.1]:{peer.port}")
    content = (f"Subject: {PWN} =?utf-8?b?PHNjcmlwdD53aW5kb3cucHduZWQ9NDwvc2NyaXB0Pg==?=\r\n"
               f"X-Long: {'A' * 100_000}\r\nX-Bidi: \u202egnp.exe\r\n").encode() + b"X-Bytes: \xff\xfe\r\n\r\nhi\r\n"
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await c.envelope(rcpt="carol@relay.test", sender='"<script>window.pwned=5</script>"@remote.test')
    assert (await c.cmd("DATA")).code == 354
    await c.send(content + b".\r\n")
    reply = await c.reply()
    assert reply.code == 250, reply
    qid = reply.text.rsplit(" ", 1)[1]
    await queue_becomes(mf.store, {"deferred": 1})
    host, port = mf.admin.addresses[0]
    url = f"http://{host}:{port}/"
    async with aiohttp.ClientSession() as session:  # the API: JSON in strict UTF-8, the markup as it came
        async with session.get(f"{url}api/queue/{qid}") as r:
            shown = json.loads((await r.read()).decode("utf-8", "strict"))
    assert PWN in shown["recipients"][0]["reason"] and PWN in shown["headers"]
    assert shown["sender"] == '"<script>window.pwned=5</script>"@remote.test'

    async with Chromium(tmp_path / "chromium").page(f"{url}#message={qid}") as page:
        await page.until("document.getElementById('message').dataset.queue === 'deferred'")
        await page.until("document.querySelectorAll('#deliveries tbody tr td').length > 1")
        assert await page.evaluate("typeof window.pwned") == "undefined"
        assert await page.evaluate("document.querySelectorAll('body img, body a[href^=javascript], "
                                   "body script').length") == 0
        reasons = await page.evaluate("[...document.querySelectorAll('#recipients td, #history td, #deliveries td')]"
                                      ".map((td) => td.textContent).join('\\n')")
        assert reasons.count(PWN) == 3  # the recipient's last reason, its history, the last deliveries
        assert "<script>window.pwned=5</script>" in await page.evaluate("document.getElementById('envelope')"
                                                                        ".textContent")
        assert await page.evaluate("document.getElementById('headers').textContent.length") > 100_000
        # the buttons still work under all that
        await page.click("button[data-action=hold]")
        await page.until("document.getElementById('message').dataset.queue === 'hold'")
        assert await page.evaluate("typeof window.pwned") == "undefined"
