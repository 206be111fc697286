"""`mailflow status` against `postfix status`, whose exit status monitors and scripts test (`postfix status ||
alert`): 0 while the mail system runs, 1 once it has stopped; mailflow's for a server on the configured queue, the
same, its line naming the server's pid (Postfix's says `the Postfix mail system is running: PID: N`)."""
from __future__ import annotations

import asyncio
import sys

import pytest

from tests.support import eventually, free_port, postfix_instance
from tests.support.servers import ServerProcess, base_settings, merged, to_toml

pytestmark = pytest.mark.interop


async def mailflow_status(config) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailflow", "status", "-c", str(config), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    return proc.returncode, out.decode(), err.decode()


async def test_status_exits_as_postfix_status_does(tmp_path):
    port = free_port()
    config = tmp_path / "mailflow.toml"
    config.write_text(to_toml(merged(base_settings(tmp_path), {"smtpd": {"listen": [f"127.0.0.1:{port}"]}})))
    queue = tmp_path / "queue"
    server = ServerProcess(config, tmp_path / "serve.log", port)
    async with postfix_instance() as pf:
        assert pf.run("postfix", "status").returncode == 0
        await server.start()
        try:
            assert await mailflow_status(config) == (
                0, f"mailflow status: a server is running on the queue {queue}: PID: {server.proc.pid}\n", "")
        finally:
            assert await server.terminate() == 0
        pf.run("postfix", "stop").check_returncode()
        await eventually(lambda: pf.run("postfix", "status").returncode != 0, timeout=15, step=0.2)
        assert pf.run("postfix", "status").returncode == 1
    assert await mailflow_status(config) == (1, "", f"mailflow status: no server is running on the queue {queue}\n")
