"""Fake delivery agents for qmgr tests. Each implements the Transport contract of mailflow.transports
(`async deliver(request) -> DeliveryReport`, `async close()`), so qmgr cannot tell them from a real one.

- `RecordingTransport(name, relay=name, clock=None)`: records every request in `requests` (and, with `clock`,
  `(clock time, request)` in `calls`); answers each recipient from `outcomes[address]` (an (Outcome, dsn, text)
  triple; default sent, "2.0.0", "delivered"), or raises `error` when it is set. `closed` after close().
- `ScriptedTransport(clock, script, relay=…)`: answers every recipient of a request alike from
  `script(request, now) -> (outcome, dsn, text, site_ok)` (`always(...)` makes a constant one); `script` may be
  changed between deliveries.
- `BlockingTransport(name, clock=None, script=None, linger=0)`: records each delivery as it starts, then holds it
  until `release` is set; answers as a ScriptedTransport (with `script`) or a RecordingTransport. `in_flight` and
  `max_in_flight` count deliveries under way at once.
"""
from __future__ import annotations

import asyncio
from typing import Callable

from mailflow.model import DeliveryReport, DeliveryRequest, Outcome, RcptResult

Script = Callable[[DeliveryRequest, float], tuple[Outcome, str, str, bool]]
DELIVERED = (Outcome.SENT, "2.0.0", "delivered")


def always(outcome: Outcome, dsn: str, text: str, site_ok: bool = True) -> Script:
    """A script giving the same answer to every request."""
    return lambda request, now: (outcome, dsn, text, site_ok)


class RecordingTransport:
    """Records every request; answers each recipient from `outcomes` (default sent), or raises `error`."""

    def __init__(self, name: str = "smtp", *, relay: str | None = None, clock=None):
        self.name = name
        self.program = name  # (Transport.program: the agent its result lines are logged as)
        self.relay = relay or name
        self.clock = clock
        self.requests: list[DeliveryRequest] = []
        self.calls: list[tuple[float, DeliveryRequest]] = []
        self.outcomes: dict[str, tuple[Outcome, str, str]] = {}
        self.error: Exception | None = None
        self.closed = False

    async def deliver(self, request: DeliveryRequest) -> DeliveryReport:
        self.record(request)
        return self.respond(request)

    def record(self, request: DeliveryRequest) -> None:
        self.requests.append(request)
        self.calls.append((self.clock.time() if self.clock else 0.0, request))

    def respond(self, request: DeliveryRequest) -> DeliveryReport:
        if self.error is not None:
            raise self.error
        return DeliveryReport(tuple(RcptResult(r, *self.outcomes.get(r.address, DELIVERED), relay=self.relay)
                                    for r in request.recipients))

    async def close(self) -> None:
        self.closed = True


class ScriptedTransport(RecordingTransport):
    """Answers each request from `script(request, now)`: the same result for all its recipients, and the site
    verdict (a failed site reports its text as the reason)."""

    def __init__(self, clock, script: Script, *, name: str = "smtp", relay: str = "mx.remote.test[192.0.2.1]:25"):
        super().__init__(name, relay=relay, clock=clock)
        self.script: Script | None = script

    def respond(self, request: DeliveryRequest) -> DeliveryReport:
        if self.script is None:
            return super().respond(request)
        outcome, dsn, text, site_ok = self.script(request, self.clock.time())
        return DeliveryReport.uniform(request.recipients, outcome, dsn, text, relay=self.relay, site_ok=site_ok)


class BlockingTransport(ScriptedTransport):
    """Records each delivery as it starts, holds it until `release` is set (and `linger` seconds more, so that
    released deliveries overlap as real ones do), then answers from `script`, or as RecordingTransport does.
    Tracks how many deliveries are in flight at once."""

    def __init__(self, name: str = "smtp", *, clock=None, script: Script | None = None, relay: str | None = None,
                 linger: float = 0.0):
        RecordingTransport.__init__(self, name, relay=relay, clock=clock)
        self.script = script
        self.linger = linger
        self.release = asyncio.Event()
        self.in_flight = 0
        self.max_in_flight = 0

    async def deliver(self, request: DeliveryRequest) -> DeliveryReport:
        self.record(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self.release.wait()
            if self.linger:
                await asyncio.sleep(self.linger)
            return self.respond(request)
        finally:
            self.in_flight -= 1
