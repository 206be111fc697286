"""One delivery destination, `(transport, nexthop)`: its queue of jobs, its concurrency window, and whether
it is dead. Pure: no I/O, time is passed in.

Postfix's feedback-driven concurrency (qmgr_queue.c, SCHEDULER_README), with its default feedback:
- The window starts at `initial` and never exceeds `limit`.
- A delivery whose *site* verdict is good earns 1/window of a slot; when the credit reaches a whole slot
  the window grows by one (so one window's worth of successes adds one slot: slow start). It also clears
  the failure count.
- A site failure shrinks the window by 1 (never below 1) and adds 1/window to the failed-cohort count;
  when that count reaches `cohort_limit` the destination is dead: window 0 until `dead_until`, and
  its queued jobs are handed back to be deferred without a connection attempt.
- Once `dead_until` has passed, the destination is alive again with its initial window (the first
  delivery then probes the site).
- A rate delay (Postfix's destination rate delay, `rate_delay` > 0) caps the window at 1 and pauses the
  destination for that long after each delivery ends (`resume_at`); as in Postfix's qmgr_entry_done, a
  rate-limited destination that just died hands its queued jobs back (deferred) but is alive again at once,
  paused: the next mail for it is tried after the delay, not after the dead time.
- A reload `restart`s it under the new settings: what it learned (window, failures, dead timer) is forgotten, as
  Postfix's qmgr, restarted by `postfix reload`, starts with no destination memory; its deliveries in flight
  still count against the new window.
Per-recipient outcomes never reach this object: only the site verdict moves the window.

The queue is served one message at a time in turn: a message split into several jobs (its recipient limit) has
only its next job in `jobs`, the FIFO; the others wait in `later` and the next one joins the end of the FIFO
when one is taken. So a message for thousands of recipients does not hold back the mail queued after it (each
waits about one job per message ahead of it), while alone it still fills the window. (Postfix gets there by
preempting a big message's job: qmgr_job.c.)
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
    initial: int
    limit: int
    cohort_limit: int = 1
    window: int = 0
    credit: float = 0.0  # fractions of a slot earned by successes
    in_flight: int = 0
    failed_cohorts: float = 0.0
    failures: int = 0  # site failures in a row, for the operator
    dead_until: float = 0.0
    reason: str = ""
    status: str = ""  # the last site failure's status code, with its reason: what the suspended are told
    jobs: deque = field(default_factory=deque)  # the next job of each message, in turn
    later: dict[str, deque] = field(default_factory=dict)  # a message's further jobs, by queue id
    rate_delay: float = 0.0  # seconds between two deliveries; > 0: the window is 1
    resume_at: float = 0.0  # paused by the rate delay until then

    def __post_init__(self) -> None:
        self._rate_limit()
        self.window = min(self.initial, self.limit)

    @property
    def key(self) -> tuple[str, str]:
        return (self.transport, self.nexthop)

    def is_dead(self, now: float) -> bool:
        if self.dead_until and now >= self.dead_until:
            self._revive()
        return bool(self.dead_until)

    def can_start(self, now: float) -> bool:
        return bool(self.jobs) and not self.is_dead(now) and self.in_flight < self.window and now >= self.resume_at

    def held(self, now: float) -> bool:
        """Paused by its rate delay, or remembered dead, until a time still to come: no job of it starts before the
        clock moves (a query: unlike `is_dead`, it revives nothing)."""
        return now < self.resume_at or now < self.dead_until

    def queue(self, jobs: list[Job]) -> None:
        """Queue one message's jobs: its first at the end of the FIFO, the others behind it (`later`)."""
        queue_id = jobs[0].queue_id
        if queue_id in self.later:
            self.later[queue_id].extend(jobs)
            return
        self.jobs.append(jobs[0])
        if len(jobs) > 1:
            self.later[queue_id] = deque(jobs[1:])

    def take(self) -> Job:
        """The next job to start; its message's next job, if any, joins the end of the FIFO."""
        self.in_flight += 1
        job = self.jobs.popleft()
        if self.later:
            more = self.later.get(job.queue_id)
            if more:
                self.jobs.append(more.popleft())
                if not more:
                    del self.later[job.queue_id]
        return job

    def done(self, site_ok: bool, reason: str, now: float, dead_time: float, status: str = "") -> list[Job]:
        """Feed back one finished delivery (a site failure's `reason` and `status`). Returns the queued jobs to
        defer if the site just died."""
        jobs = self._feedback(site_ok, reason, status, now, dead_time)
        if self.rate_delay:
            if self.dead_until:
                self._revive()
            self.resume_at = now + self.rate_delay
        return jobs

    def _feedback(self, site_ok: bool, reason: str, status: str, now: float, dead_time: float) -> list[Job]:
        self.in_flight -= 1
        if self.dead_until:  # a late report from before it died changes nothing
            return []
        if site_ok:
            self._grow()
            self.failed_cohorts = 0.0
            self.failures = 0
            self.reason = self.status = ""
            return []
        self.failures += 1
        self.reason, self.status = reason, status
        self.failed_cohorts += 1.0 / self.window
        self.window = max(1, self.window - 1)
        self.credit = 0.0
        if self.failed_cohorts >= self.cohort_limit:
            return self._die(now + dead_time)
        return []

    def revive(self) -> None:
        """Alive again now (an operator flushed the queue), whatever the dead timer said."""
        if self.dead_until:
            self._revive()

    def restart(self, initial: int, limit: int, cohort_limit: int, rate_delay: float = 0.0) -> None:
        """Start over under new settings (a reload), as the new qmgr process of a Postfix reload does: alive,
        at the initial window, not paused, nothing learned or counted; its queued jobs and deliveries in flight
        stay."""
        self.initial, self.limit, self.cohort_limit, self.rate_delay = initial, limit, cohort_limit, rate_delay
        self.resume_at = 0.0
        self._rate_limit()
        self._revive()
        self.failures = 0
        self.reason = self.status = ""

    def withdraw(self, queue_id: str) -> list[Job]:
        """Take out the queued jobs of one message (an operator held or deleted it)."""
        return self.withdraw_many({queue_id})

    def withdraw_many(self, queue_ids: set[str] | dict[str, str]) -> list[Job]:
        """Take out the queued jobs of several messages at once (an operator held or deleted them): one pass over
        the queue, whatever their number."""
        mine = [j for j in self.jobs if j.queue_id in queue_ids]
        if mine:
            self.jobs = deque(j for j in self.jobs if j.queue_id not in queue_ids)
        for queue_id in [queue_id for queue_id in self.later if queue_id in queue_ids]:
            mine.extend(self.later.pop(queue_id))
        return mine

    def drain(self) -> list[Job]:
        """Hand back every queued job (the destination is dead)."""
        jobs = list(self.jobs)
        for more in self.later.values():
            jobs.extend(more)
        self.jobs.clear()
        self.later.clear()
        return jobs

    def idle(self, now: float) -> bool:
        """Nothing queued, in flight, remembered dead or paused: the destination may be forgotten."""
        return not self.jobs and self.in_flight == 0 and not self.dead_until and now >= self.resume_at

    def snapshot(self, now: float) -> tuple:
        """(transport, nexthop, window, in_flight, queued, failures, dead_until, reason, paused_until) for the tools
        at `now`: `paused_until` is when its rate delay's pause ends, 0 when it is not paused."""
        window = 0 if self.dead_until else self.window
        queued = len(self.jobs) + sum(len(more) for more in self.later.values())
        paused_until = self.resume_at if self.resume_at > now else 0.0
        return (self.transport, self.nexthop, window, self.in_flight, queued, self.failures,
                self.dead_until, self.reason, paused_until)

    def _rate_limit(self) -> None:
        """Postfix's qmgr_transport: a rate delay makes the destination concurrency limit 1."""
        if self.rate_delay:
            self.limit = 1
            self.initial = min(self.initial, 1)

    def _grow(self) -> None:
        if self.window >= self.limit:
            return
        self.credit += 1.0 / self.window
        if self.credit >= 1.0 - 1e-9:
            self.window += 1
            self.credit = 0.0

    def _die(self, until: float) -> list[Job]:
        self.dead_until = until
        return self.drain()

    def _revive(self) -> None:
        self.dead_until = 0.0
        self.failed_cohorts = 0.0
        self.credit = 0.0
        self.window = min(self.initial, self.limit)
