"""The content checks' threads (mailflow.filters.content_checks, Cost): one pool of CHECK_WORKERS for the server's
life, shared by every reload's checks, and ended at the stop."""
from __future__ import annotations

import asyncio
import threading
import time

from mailflow.config import config_from_dict
from mailflow.filters.content_checks import CHECK_WORKERS, LONG_KEY
from tests.support import send

LONG = b"From: s@remote.test\r\nSubject: long\r\n\r\n" + (b"y" * 70 + b"\r\n") * (LONG_KEY // 70 + 10)


def check_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("content-checks")]


async def test_reloads_share_the_checks_threads_and_the_stop_ends_them(mailflow_server, tmp_path):
    """Each reload's checks made a pool of their own, which nothing ended: a replaced one's threads went when the
    checks were dropped, but the last one's outlived the stop (the stopped server holds its cleanup)."""
    (tmp_path / "body_checks").write_text("/^never-seen/ REJECT no\n")
    mf = await mailflow_server(checks={"body_checks": [f"regexp:{tmp_path / 'body_checks'}"]})
    port = mf.smtp_addresses[0][1]
    for _ in range(3):
        await mf.reload(config_from_dict(mf.config.model_dump()))
        refused, reply = await send(port, "s@remote.test", ["alice@local.test"], LONG)
        assert not refused and "queued as" in reply, reply
    assert 1 <= len(check_threads()) <= CHECK_WORKERS
    await mf.stop()
    assert check_threads() == []


async def test_the_stop_does_not_wait_for_ever_for_a_stuck_walk(mailflow_server, tmp_path, monkeypatch, caplog):
    """The stop joined the checks' threads without a bound: a walk stuck in a table that never answers (a sqlite read
    on a hung NFS) held up the store's close and the queue lock's release. It waits the grace period (2 s here) at
    most, logs the walk it leaves, and goes on."""
    import mailflow.filters.content_checks as module

    looking, release = threading.Event(), threading.Event()
    lookup = module.lookup_action

    def stuck(tables, key):
        if key.startswith("y"):
            looking.set()
            release.wait(30)
        return lookup(tables, key)

    monkeypatch.setattr(module, "lookup_action", stuck)
    (tmp_path / "body_checks").write_text("/^never-seen/ REJECT no\n")
    mf = await mailflow_server(checks={"body_checks": [f"regexp:{tmp_path / 'body_checks'}"]})
    sending = asyncio.create_task(send(mf.smtp_addresses[0][1], "s@remote.test", ["alice@local.test"], LONG))
    try:
        assert await asyncio.to_thread(looking.wait, 10)
        started = time.monotonic()
        await asyncio.wait_for(mf.stop(), 15)
        assert time.monotonic() - started < 8  # (the sessions' grace, then the threads' grace: 2 s each)
        assert "content checks: a walk still runs 2s after the stop" in caplog.text
    finally:
        release.set()
        await asyncio.gather(sending, return_exceptions=True)
