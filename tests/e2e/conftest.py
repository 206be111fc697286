"""End-to-end fixtures: a real mailflow on 127.0.0.1 (in-process, port 0, or as a subprocess).

- `mailflow_server(**settings)` starts `Mailflow` on the test's loop with a config in tmp_path: local domain
  local.test with user alice, Maildirs under tmp_path/mail, fast retries. Settings override the TOML keys
  (dotted section keys as nested dicts). Returns the running `Mailflow`; stopped after the test.
- `write_config(path, **settings)` writes the same config as a TOML file, for subprocess tests.
- `send(port, sender, rcpts, content)` speaks SMTP with aiosmtplib and returns the final reply.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiosmtplib
import pytest

from mailflow.app import Mailflow
from mailflow.config import config_from_dict


def base_settings(tmp_path: Path) -> dict:
    return {
        "myhostname": "mx.mailflow.test",
        "mydestination": ["localhost", "local.test"],
        "relay_domains": ["relay.test"],
        "mynetworks": [],
        "queue_directory": str(tmp_path / "queue"),
        "smtpd": {"listen": ["127.0.0.1:0"]},
        "local": {"maildir_base": str(tmp_path / "mail"), "recipients": ["alice", "bob"]},
        "queue": {"queue_run_delay": "1s", "minimal_backoff_time": "1s", "maximal_backoff_time": "2s"},
        "dns": {"nameservers": ["127.0.0.1:9"], "timeout": "1s", "tries": 1},
    }


def merged(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def to_toml(settings: dict) -> str:
    """Enough TOML for these settings: scalars and lists of strings (json strings are TOML strings)."""
    top = [f"{k} = {json.dumps(v)}" for k, v in settings.items() if not isinstance(v, dict)]
    tables = [f"\n[{k}]\n" + "\n".join(f"{kk} = {json.dumps(vv)}" for kk, vv in v.items())
              for k, v in settings.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n" + "\n".join(tables) + "\n"


@pytest.fixture
async def mailflow_server(tmp_path):
    running: list[Mailflow] = []

    async def start(**overrides) -> Mailflow:
        config = config_from_dict(merged(base_settings(tmp_path), overrides))
        mf = Mailflow(config, shutdown_grace=2.0)
        await mf.start()
        running.append(mf)
        return mf

    yield start
    for mf in running:
        await mf.stop()


@pytest.fixture
def write_config(tmp_path):
    def write(path: Path, **overrides) -> Path:
        path.write_text(to_toml(merged(base_settings(tmp_path), overrides)))
        return path

    return write


async def send(port: int, sender: str, rcpts: list[str], content: bytes, **kwargs):
    """One message over a fresh session; returns (refused recipients, final reply text)."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10) as client:
        return await client.sendmail(sender, rcpts, content, **kwargs)


async def eventually(predicate, timeout: float = 10.0, step: float = 0.02):
    """Poll `predicate` until it is truthy or `timeout` passes; returns its last value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value or loop.time() >= deadline:
            return value
        await asyncio.sleep(step)


async def queue_becomes(store, expected: dict, timeout: float = 10.0) -> dict:
    """Poll the store's per-queue counts until they equal `expected`; returns the last counts."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        counts = await store.counts()
        if counts == expected or loop.time() >= deadline:
            return counts
        await asyncio.sleep(0.02)


def maildir_messages(maildir: Path) -> list[bytes]:
    new = maildir / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []
