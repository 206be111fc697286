"""Debian's headless Chromium for tests of a web page (the admin listener's queue page).

- `Chromium(profile_dir)`: `await dump_dom(url)` (the DOM after the page's scripts ran: `--dump-dom` with a
  virtual-time budget, so the page's fetches complete first), and `async with chromium.page(url) as page`: a
  DevTools session on one tab, the page loaded, to act as a user does: `await page.evaluate(js)`, `await page.until(js)`
  (polls an expression until it is truthy), `await page.click(selector)`, `await page.screenshot(path)`.
- `keep_artifact(path)`: copies a file (a screenshot) to $MAILFLOW_ARTIFACTS, else to artifacts/ in the
  repository, and returns where it went.

Chromium runs as root only with --no-sandbox; XDG and HOME point into the profile directory so it writes
nothing elsewhere (../shared/docs/RECIPES.md, 7 and 8i). Every wait is bounded.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from tests.support.tools import require_tool

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--window-size=1200,1400")
START_TIMEOUT = 20.0


def keep_artifact(path: Path) -> Path:
    where = Path(os.environ.get("MAILFLOW_ARTIFACTS") or ROOT / "artifacts")
    where.mkdir(parents=True, exist_ok=True)
    kept = where / path.name
    shutil.copyfile(path, kept)
    return kept


class Chromium:
    def __init__(self, profile_dir: Path):
        self._binary = require_tool("chromium")
        self._dir = Path(profile_dir)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._env = {**os.environ, "HOME": str(self._dir), "XDG_CONFIG_HOME": str(self._dir / "xdg"),
                     "XDG_CACHE_HOME": str(self._dir / "xdg")}

    def _argv(self, profile: str, *more: str) -> list[str]:
        return [self._binary, *FLAGS, f"--user-data-dir={self._dir / profile}", *more]

    async def dump_dom(self, url: str, budget_ms: int = 5000, timeout: float = 60) -> str:
        proc = await asyncio.create_subprocess_exec(
            *self._argv("dump", f"--virtual-time-budget={budget_ms}", "--dump-dom", url), env=self._env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            pytest.fail(f"chromium --dump-dom {url} did not finish within {timeout}s")
        assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
        return out.decode()

    @contextlib.asynccontextmanager
    async def page(self, url: str) -> AsyncIterator["Page"]:
        proc = await asyncio.create_subprocess_exec(
            *self._argv("devtools", "--remote-debugging-port=0", "about:blank"), env=self._env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            endpoint = await asyncio.wait_for(_devtools_endpoint(proc), START_TIMEOUT)
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://{endpoint}/json/list") as response:
                    targets = await response.json(content_type=None)
                [target] = [t for t in targets if t.get("type") == "page"][:1]
                async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=64 << 20) as ws:
                    page = Page(ws)
                    await page.call("Page.enable")
                    await page.call("Page.navigate", url=url)  # answers when the navigation starts
                    await page.until(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")
                    yield page
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def _devtools_endpoint(proc: asyncio.subprocess.Process) -> str:
    """host:port from Chromium's "DevTools listening on ws://HOST:PORT/devtools/browser/ID" line."""
    assert proc.stderr is not None
    while line := await proc.stderr.readline():
        found = re.search(rb"DevTools listening on ws://([^/\s]+)/", line)
        if found:
            return found.group(1).decode()
    raise AssertionError("chromium exited without opening its DevTools port")


class Page:
    """One tab over the DevTools protocol (Runtime.evaluate, Page.captureScreenshot)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self._ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, timeout: float = 20, **params: Any) -> dict:
        number = next(self._ids)
        await self._ws.send_json({"id": number, "method": method, "params": params})
        async with asyncio.timeout(timeout):
            while True:
                message = await self._ws.receive()
                assert message.type == aiohttp.WSMsgType.TEXT, f"DevTools closed: {message}"
                answer = json.loads(message.data)
                if answer.get("id") == number:
                    assert "error" not in answer, f"{method}: {answer['error']}"
                    return answer.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, f"{expression}: {result['exceptionDetails']}"
        return result["result"].get("value")

    async def until(self, expression: str, timeout: float = 10) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if loop.time() >= deadline:
                raise AssertionError(f"not within {timeout}s in the page: {expression} (last value {value!r})")
            await asyncio.sleep(0.05)

    async def click(self, selector: str) -> None:
        found = await self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                                    " if (!e) return false; e.click(); return true; })()")
        assert found, f"nothing in the page matches {selector}"

    async def screenshot(self, path: Path) -> Path:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
