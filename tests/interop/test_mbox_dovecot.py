"""mbox files written by mailflow.transports.local.mbox, read and written at the same time by Dovecot (doveadm).

Dovecot is what a user meets an mbox through (IMAP). doveadm runs with a private config (no daemon): as root it
drops to nobody, so the mailbox lives in a folder of its own that nobody may write (Dovecot needs to create
its dotlock and index files there).
"""
from __future__ import annotations

import asyncio
import mailbox
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from mailflow.transports.local.mbox import append_mbox, format_mbox_entry
from tests.support import require_tool

pytestmark = pytest.mark.interop


class Dovecot:
    def __init__(self, doveadm: str, root: Path):
        self.doveadm = doveadm
        self.home = root / "home"
        self.inbox = self.home / "inbox"
        self.config = root / "dovecot.conf"
        uid, gid = (65534, 65534) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
        self.config.write_text(
            f"base_dir = {root}/run\nstate_dir = {root}/state\nlog_path = /dev/stderr\nssl = no\nprotocols =\n"
            f"mail_uid = {uid}\nmail_gid = {gid}\nfirst_valid_uid = 0\nfirst_valid_gid = 0\n"
            f"mail_location = mbox:{self.home}/mail:INBOX={self.inbox}\n")
        self.home.mkdir()
        self.inbox.touch(mode=0o600)
        for path in (self.home, self.inbox):
            os.chown(path, uid, gid)

    async def run(self, *args: str, stdin: bytes | None = None) -> str:
        proc = await asyncio.create_subprocess_exec(
            self.doveadm, "-c", str(self.config), *args, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "USER": "alice", "HOME": str(self.home)})
        out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
        assert proc.returncode == 0, f"doveadm {args[0]}: {err.decode(errors='replace')}"
        return out.decode(errors="replace")

    async def subjects(self) -> list[str]:
        out = await self.run("fetch", "hdr.subject", "mailbox", "INBOX", "all")
        return [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("hdr.subject: ")]


@pytest.fixture
def dovecot():
    doveadm = require_tool("doveadm")
    root = Path(tempfile.mkdtemp(prefix="mailflow-mbox-"))
    os.chmod(root, 0o755)
    try:
        yield Dovecot(doveadm, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_dovecot_reads_what_we_deliver(dovecot):
    contents = [b"Subject: one\r\n\r\nFrom here\r\n>From there\r\n", b"Subject: two\r\n\r\nno final newline",
                b"Subject: three\r\n\r\n"]
    for i, content in enumerate(contents):
        entry = format_mbox_entry(content, sender="" if i == 1 else "s@remote.test", arrival=1.7e9,
                                  prepend=b"Return-Path: <s@remote.test>\nDelivered-To: alice@local.test\n")
        await append_mbox(dovecot.inbox, entry)
    assert await dovecot.subjects() == ["one", "two", "three"]
    body = await dovecot.run("fetch", "body", "mailbox", "INBOX", "1")
    assert ">From here\n>>From there\n" in body  # Dovecot does not un-quote; what it shows is what is stored


async def test_deliveries_racing_dovecot_writes_all_land_intact(dovecot):
    """Ten `doveadm save` runs (Dovecot's own locks: fcntl to read, dotlock + fcntl to write, and it rewrites the
    file to add its headers) and ten of our deliveries with the default locks (fcntl, dotlock), all at once."""
    ours = [format_mbox_entry(f"Subject: ours{i}\r\n\r\nFrom ours {i}\r\n".encode() + b"y" * 50_000,
                              sender="s@remote.test", arrival=1.7e9) for i in range(10)]
    theirs = [f"Subject: dove{i}\n\nbody {i}\n".encode() + b"x" * 50_000 + b"\n" for i in range(10)]
    await asyncio.wait_for(asyncio.gather(
        *(dovecot.run("save", "-m", "INBOX", stdin=message) for message in theirs),
        *(append_mbox(dovecot.inbox, entry, lock_timeout=10) for entry in ours)), 30)
    expected = sorted([f"ours{i}" for i in range(10)] + [f"dove{i}" for i in range(10)])
    assert sorted(await dovecot.subjects()) == expected
    box = mailbox.mbox(str(dovecot.inbox), create=False)
    try:
        assert sorted(message["subject"] for message in box) == expected
        for message in box:
            tag = message["subject"]
            payload = message.get_payload(decode=True)
            assert payload.endswith(b"y" * 50_000 + b"\n" if tag.startswith("ours") else b"x" * 50_000 + b"\n")
    finally:
        box.close()
