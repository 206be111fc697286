"""mailflow between real programs: Postfix's smtp-source as the client, smtp-sink as the next hop, swaks."""
from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.support import eventually, free_port, maildir_messages, queue_becomes, require_tool, run_tool

pytestmark = pytest.mark.interop
COUNT = 40




async def test_smtp_source_load_relayed_to_smtp_sink(mailflow_server, tmp_path):
    source, sink = require_tool("smtp-source"), require_tool("smtp-sink")
    sink_port = free_port()
    # As root, smtp-sink runs as nobody, who cannot enter pytest's private tmp_path: use a folder of its own.
    dump_dir = Path(tempfile.mkdtemp(prefix="mailflow-sink-"))
    os.chmod(dump_dir, 0o777)
    dump = dump_dir / "dump.txt"
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    # -D appends every message it receives to the dump, each starting with its X-Client-Addr line
    sink_proc = await asyncio.create_subprocess_exec(
        sink, *user, "-D", str(dump), f"127.0.0.1:{sink_port}", "64",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        mf = await mailflow_server(relayhost=f"[127.0.0.1]:{sink_port}", mynetworks=["127.0.0.0/8"])
        port = mf.smtp_addresses[0][1]
        rc, out = await run_tool(source, "-m", str(COUNT), "-s", "5", "-l", "2048", "-f", "from@source.test",
                            "-t", "to@dest.test", f"127.0.0.1:{port}")
        assert rc == 0, out
        await queue_becomes(mf.store, {}, timeout=30)
        dumped = await eventually(lambda: dump.exists() and dump.read_bytes())
    finally:
        if sink_proc.returncode is None:
            sink_proc.kill()
        await sink_proc.wait()
        shutil.rmtree(dump_dir, ignore_errors=True)
    assert dumped.count(b"X-Client-Addr: 127.0.0.1") == COUNT
    assert dumped.count(b"X-Rcpt-Args: <to@dest.test>") == COUNT


async def test_swaks_delivers_to_a_local_maildir(mailflow_server, tmp_path):
    swaks = require_tool("swaks")
    mf = await mailflow_server()
    port = mf.smtp_addresses[0][1]
    rc, out = await run_tool(swaks, "--server", "127.0.0.1", "--port", str(port), "--ehlo", "client.test",
                        "--from", "someone@remote.test", "--to", "alice@local.test",
                        "--header", "Subject: from swaks", "--body", "hello from swaks", "--timeout", "10")
    assert rc == 0, out
    assert "<-  250 2.0.0 Ok: queued as" in out
    files = await eventually(lambda: maildir_messages(tmp_path / "mail" / "alice" / "Maildir"))
    assert b"Subject: from swaks" in files[0] and b"hello from swaks" in files[0]


async def test_swaks_sees_relay_refused(mailflow_server):
    swaks = require_tool("swaks")
    mf = await mailflow_server()
    rc, out = await run_tool(swaks, "--server", "127.0.0.1", "--port", str(mf.smtp_addresses[0][1]),
                        "--from", "someone@remote.test", "--to", "victim@foreign.example", "--timeout", "10")
    assert rc != 0
    assert "<** 554 5.7.1 <victim@foreign.example>: Relay access denied" in out
