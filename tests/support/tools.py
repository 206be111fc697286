"""External programs a test needs (Postfix's tools, swaks, Dovecot, pflogsumm, fail2ban).

- `require_tool(name)`: the program's path; when it is missing the test skips, or fails when
  MAILFLOW_REQUIRE_TOOLS=1 (CI sets it, so an interop test can never pass by skipping there).
- `run_tool(*argv, timeout=60) -> (exit status, stdout and stderr as text)`: one run, killed (and the test
  failed) when it takes longer than `timeout`.
"""
from __future__ import annotations

import asyncio
import os
import shutil

import pytest


def require_tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path:
        return path
    message = f"{name} is not installed (Debian: see .ci/run)"
    if os.environ.get("MAILFLOW_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


async def run_tool(*argv: str, timeout: float = 60) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"{argv[0]} did not finish within {timeout}s")
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")
