"""One delivery destination, `(transport, nexthop)`: its queue of jobs and its concurrency.

A job is one message's recipients for this destination. The destination hands out jobs while fewer than
`limit` are in flight. (Slow-start, throttling and dead-site memory come with the queue manager issue and
belong here.)
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mailflow.model import Recipient


@dataclass
class Job:
    queue_id: str
    transport: str
    nexthop: str
    recipients: tuple[Recipient, ...]


@dataclass
class Destination:
    transport: str
    nexthop: str
    limit: int
    in_flight: int = 0
    jobs: deque = field(default_factory=deque)

    @property
    def key(self) -> tuple[str, str]:
        return (self.transport, self.nexthop)

    def can_start(self) -> bool:
        return bool(self.jobs) and self.in_flight < self.limit

    def take(self) -> Job:
        self.in_flight += 1
        return self.jobs.popleft()

    def done(self) -> None:
        self.in_flight -= 1

    @property
    def idle(self) -> bool:
        return not self.jobs and self.in_flight == 0
