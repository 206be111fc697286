"""100 000 queued messages: the active set stays within active_limit and serve's memory stays flat."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from mailflow.content import Content
from mailflow.model import Recipient
from mailflow.store import NewMessage, Store
from tests.support import queue_counts

MESSAGES = 100_000
ACTIVE_LIMIT = 1000
RSS_LIMIT_MB = 200


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0




async def fill(db, n: int) -> None:
    store = await Store.open(db)
    body = Content.of(b"Subject: scale\r\n\r\n" + b"x" * 200 + b"\r\n")
    for start in range(0, n, 5000):
        await store.insert_many([
            NewMessage(f"S{i:07d}", "sender@remote.test", 1_700_000_000.0 + i, body,
                       (Recipient(0, f"r{i}@dest{i % 100}.test", f"r{i}@dest{i % 100}.test"),))
            for i in range(start, min(n, start + 5000))])
    await store.close()


async def test_a_hundred_thousand_queued_messages_keep_active_bounded_and_memory_flat(tmp_path, write_config):
    db = tmp_path / "queue" / "queue.db"
    await fill(db, MESSAGES)
    cfg = write_config(tmp_path / "scale.toml", default_transport="discard:", log={"level": "warning"},
                       queue={"active_limit": ACTIVE_LIMIT, "queue_run_delay": "1s"})
    proc = subprocess.Popen([sys.executable, "-m", "mailflow", "serve", "-c", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_active = peak_rss = 0.0
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            counts = queue_counts(db)
            peak_active = max(peak_active, counts.get("active", 0))
            peak_rss = max(peak_rss, rss_mb(proc.pid))
            if not counts:
                break
        assert not queue_counts(db), "not every message was delivered in time"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    print(f"\n100k: peak active {peak_active:.0f}, peak RSS {peak_rss:.0f} MB")
    assert 0 < peak_active <= ACTIVE_LIMIT
    assert peak_rss < RSS_LIMIT_MB, f"RSS peaked at {peak_rss:.0f} MB"
