"""qmgr: takes due messages from the store, schedules them per destination, records what happened.

The loop
- A scan runs when cleanup queues new mail (`wake()`), when a message finishes while the last scan left due
  mail behind for want of room (`active_limit`), when an operator tool
  changed the queue (the store's generation counter, polled every second), when the earliest deferred
  message comes due (known from its own deferrals, and from an index lookup at each timed scan, so it
  survives restarts and operator changes), and at least every `queue_run_delay`. It takes up to
  `active_limit - active` due messages, new and deferred mail alternating (`Store.take`: read and claimed,
  incoming/deferred -> active, in one transaction: an operator's hold or delete comes before or after, never
  between) and resolves each pending recipient to `(transport, nexthop)` through trivial-rewrite (`resolve(address,
  sender, memo)`: the envelope sender, for sender-dependent routing, asked once per message in `memo`), handing the
  loop back every ADMIT_SLICE messages (a flush of 10 000 deferred messages held it for 0.4 s in one turn;
  the messages not yet admitted keep their places in the active queue meanwhile), and every ROUTE_SLICE
  recipients of a message that has more (virtual aliases may give one 1 000 000), then every ORDER_SLICE as it puts
  them in Postfix's order (sort keys made with each slice, runs sorted then merged); a message
  with an after-queue content filter (its `content_filter`, Postfix's) sends every recipient to that
  `transport:nexthop` instead. qmgr's `from=<s>, size=N, nrcpt=N (queue active)` line is written each time a
  message enters the active queue, as Postfix's qmgr writes it: cleanup writes it for new mail (not for a message
  put on hold as it arrived), the scan whenever the store marks it owed (`from_logged` false: held on arrival,
  deferred, released, recovered at a start), `nrcpt` counting every recipient, delivered ones too.
- New mail can skip the scan: cleanup `reserve()`s a place in the active queue, commits the message straight
  into it (queue 'active'), and `hand_over()`s it with its content still in memory (`release()` when the commit
  failed). A place is given only while there is room and the last scan left nothing due behind for want of it
  (a backlog goes through the scan, which alternates new and deferred mail), never while stopping, and never
  to a message of more than ROUTE_SLICE recipients (resolved by the scan, a slice at a time). At one
  session this saves a writer transaction, a content read and a loop turn per message; a crash before the hand
  over leaves the message active, and start-up recovery makes it due again. The contents kept this way are
  bounded (HANDOFF_CONTENT_BUDGET bytes in all, until their messages finish): past that, a message is handed over
  without its content, which its first job reads from the store.
- Each destination gets one job per message (one per `destination_recipient_limit` recipients, its transport's
  own `transport_destination_recipient_limit` first, taken in Postfix's qmgr order: by domain, then address;
  with a limit of 1 each recipient is a destination of its own, `user@nexthop`, as Postfix names its queues
  then; the jobs of one message take their turns with the other messages', so a big message holds back no later
  mail) and runs as many at once as its window allows
  (`destination.py`: slow start, throttle on site failure, dead-site memory). `delivery_concurrency_limit`
  caps all deliveries, `transport_concurrency_limit` each transport; under the caps the transports, and within
  each the messages (by their destinations' next jobs), take turns one job at a time (`_pump`), so a freed slot
  goes to the next in line. A dead destination's jobs are
  deferred without a connection attempt. A destination rate delay (`destination_rate_delay`, per transport
  `transport_destination_rate_delay`) makes its window 1 and pauses it after each delivery; the loop wakes when
  the pause ends, and that turn only starts deliveries (no scan: a writer transaction). These destination timers
  (a pause's end, a dead site's) are qmgr's own, not due times in the store: a driver of a virtual clock (the
  Sink) reads the next one (`next_timer`) and whether the mail in hand waits for nothing else
  (`waiting_for_timers`), to stop there and to count such mail as settled. A record the store refused (a store
  fault) is retried after a backoff on the same clock (`faults.Retrier`): its retry time is such a timer, and a
  record waiting for it is not `working`; so is a failed scan's (`scan_backing_off`: mail due or incoming meanwhile
  waits for the clock alone; `scan_failure`: the run of failures, for the driver to tell when it gives up;
  `record_failure`: the records'), and a
  damaged message a scan took counts in `taken_count` while it is set aside.
- An address verification probe (mailflow.stages.verify) is delivered through `deliver_probe`: a dead destination
  defers it without a connection, as Postfix's qmgr defers the probe (a queued message) of a dead queue; what the
  probe finds is not fed back (Postfix's probes never make a destination dead); it is not queued and waits for no
  window.
- When a job is back its recipients' results are recorded at once (`store.record_results`, group-committed
  with other writes) and logged: sent, bounced, or still pending with the reason. A recipient whose failure or
  success notice is owed keeps a flag in its row. So a stop or a crash repeats only deliveries that were
  themselves interrupted (Postfix's deliver_completed). An agent that delivers a job's recipients one after
  another (`delivers_each`: local, virtual, pipe with flag D or O) has each result but the job's last recorded as
  it comes, as local(8) and virtual(8) cross each recipient off: a stop in the middle of such a job repeats only
  the recipients whose results were not committed yet. A message has one record in flight at a time: results
  that come back while it is written go together in the next, and once every job is back those not recorded go
  with the end of the attempt. So a job costs a write per result that ends while none is being written (about
  one per recipient for an agent slower than a commit, as few as the job's end for a fast one) and a
  one-recipient job no more than its end.
- When every job of a message is back, one `store.finish()` records the results not recorded yet, queues the notices
  the flagged rows call for (`notices.py`; rows flagged before a stop come with the message from the scan) and
  clears the flags, and removes the message or defers it to
  `now + clamp(age, minimal_backoff_time, maximal_backoff_time)` plus up to 10 % jitter, all in one
  transaction. A message still pending after `maximal_queue_lifetime` (`bounce_queue_lifetime` for null-sender
  mail) is returned: its pending recipients count as bounced (the log, as Postfix's, has the attempt's
  `status=deferred` lines and one `status=expired, returned to sender`; past RECORD_SLICE of them, their results
  are made and told to the observers that many a loop turn). Each notice queued is logged as
  Postfix's are: its `message-id=`, the `sender non-delivery notification: QID` line, its `from=<>` line.
  After `delay_warning_time` the sender gets one
  "delayed" notice. A message whose recipients were all recorded before a crash has no pending recipient when it
  is scanned again after the start; its scan finishes it.
- `soft_bounce` (Postfix's, for testing a configuration): a recipient an agent bounces is kept deferred
  instead, as every job's results come in (`_soft_bounced`): its status made 4.X.X, its text kept, logged
  `status=SOFTBOUNCE` (a deferred recipient's parts that bounced too, a line each); so no failure notice goes
  out, and the row is recorded as any deferral. The message is
  still returned when it outlives its lifetime, as Postfix's qmgr returns it then (its defer_flush ignores
  soft_bounce). Address verification probes are not touched (Postfix's bounce_append records them first).
- A reload (`reconfigure`) hands qmgr a new resolver, transports, [queue] settings and soft_bounce: what is
  admitted or started from then on uses them (soft_bounce: the results that come in from then on, those of
  deliveries already under way too); deliveries under way finish with the transports they began with, which
  are closed after them. The jobs not started yet are taken back from their destinations and their recipients
  resolved again (`_reroute`), as Postfix's qmgr, restarted by `postfix reload`, reads its active queue again:
  mail waiting for a window goes where the new routing sends it (more than ROUTE_SLICE recipients in all: by a
  task, a slice a loop turn, small messages together, a big one by itself; a hold or delete seen while a message's
  jobs are in no destination ends them there as withdrawn, a later reload starts its resolution over). The messages
  stay in hand (no store write, the active queue's size and handed-over content unchanged) and a delivery in
  flight is not touched, so no recipient is lost or delivered twice; deferred mail keeps its next attempt (a reload
  is no flush).
  Every destination starts over under the new settings, as in Postfix's new qmgr: dead ones are alive again (the
  reload may have fixed what failed: a password, a TLS setting), windows start again at the initial concurrency;
  deliveries in flight still count against them.
- About once a second the destinations' state is written to the store for `mailflow queue destinations`: the rows
  of the destinations changed since (`_changed`: jobs queued, started, ended, withdrawn, a death or a revival, a
  destination forgotten), as with a recipient limit of 1 there may be a million; the tick's safety net under the
  ready marks looks at OVERLOOK_SLICE destinations in turn. And
  every `MAINTENANCE_INTERVAL` the store gives free space back (`store.maintain`).
- Each result carries the transport of its job (`RcptResult.transport`, in the mail log's events) and its times
  (`RcptResult.stats`, one MsgStats per job an agent had: the message's arrival, its entry into the active queue
  for this attempt, the hand-off to the agent and the agent's end; None for one qmgr answered itself, timed by
  the attempt's), from which its line's `delay=` and `delays=` are made; a bounced result whose failures are
  told apart (`RcptResult.owned`) has a line per failure, about its list or member, as local(8) logs them (a
  deferred one's parts that bounced too, after its own line, logged when recorded though their notice is queued
  with the end of the attempt: a stop in between leaves the lines without a notice until a retry bounces them
  again; accepted, not stored: the row of a pending recipient keeps no notice flag);
  `on_delivery(transport, seconds)`, when given, is told how long each delivery agent call took (the metrics).

Failure behaviour
- A resolver or transport that raises, a content read error, a recipient the agent does not report on: that recipient
  is deferred (4.3.0), never lost. An agent that raises is logged per kind of error (its type and where it was
  raised: faults.ErrorKindLog, one per transport): a kind not seen for a minute at once, with its traceback (none
  for an I/O or timeout error: faults.EXPECTED), the other failures once a minute with a count, bad messages
  interleaved with good ones too (told at the first tick after their minute, and at stop), and it is said to work
  again after a run of failures long enough to be counted (not after the two jobs of one bad message). Unknown
  transport: deferred 4.3.0 "mail transport unavailable" with a warning naming it, as Postfix. Missing content: the
  message goes to the corrupt queue; so does a message whose queue rows hold values of the wrong kind (edited by hand:
  `QueuedMessage.damage`, and, found at each timed scan, a deferred one whose next_attempt is no time or one in no
  known queue: `Store.never_due`; a recipient whose status is none the store writes, however its notice flag is set),
  with a warning naming it and what is wrong, as Postfix's qmgr saves a queue file it cannot read; the others go on.
- A message an operator holds or deletes while it is active (or requeues after a hold, or that is moved to the
  corrupt queue: as a hold, `TAKEN_BACK` naming it): its jobs not yet started are dropped at the next tick
  (SUSPEND_SLICE recipients a loop turn), unless released by then (held: its recipients stay pending; deleted:
  nothing is recorded or logged, as the queue tool logged postsuper's `removed`); one in flight finishes, and no
  notice is sent for a deleted one (its state is asked before any notice is queued, the tick or not). A held
  message is never expired nor warned about at the end
  of that attempt (when it would be, the store's state is checked first): it stays on hold until released. Released
  before that attempt ends (due now), it is not admitted again beside it, which would deliver it twice: the scan's
  claim is left to the attempt under way, whose end concludes it as if it had not been held (but due at once, as the
  release made it, when the hold had kept recipients from that attempt; so too when no scan claimed it, for want
  of room: `Store.finish` defers the released row as the active one); as that claim may land after the end's
  write, the message is then given back once let go of (`_give_back`: still active, it is deferred as the end
  meant). A scan's copy of a message let go of after its take began (the take, the decoding, the admission of the
  messages before it wait), or of one being given back, may predate that attempt's end: it is never admitted
  (which would deliver its recipients again), and its row is given back (`_claimed_stale`). So every row the store
  holds active is in qmgr's hands, being set aside or given back (`taken_count`), taken by the scan under way and
  not admitted yet (`_admitting`), reserved by cleanup (`reserve`), or a previous run's until the start-up
  recovery.
  `mailflow queue flush` also revives dead destinations, like `postqueue -f`.
- A deleted message's delivery in flight logs its result lines when it ends (as Postfix's delivery agent logs its
  status= line for a queue file postsuper removed under it; RECORD_SLICE lines a loop turn), nothing recorded once
  the poll saw the delete, and no `removed` of qmgr's (a delete the tick has not seen yet, made in the attempt's
  last second, is found by the end's removal or deferral, which finds no row left: a warning in Postfix's words,
  `qmgr_active_done: remove QID from active: No such file or directory` (or qmgr_active_defer's `rename QID from
  active to deferred: …`), not a second `removed`).
- A record that fails is retried while the server runs (`faults.Retrier`): the results wait in memory and the
  message stays in qmgr's hands, so nothing is forgotten and nothing is delivered again because a write failed.
  A store fault (locked, disk full, I/O) puts every record behind one probe per backoff interval.
- Each chore of the loop (the operator poll, the destination snapshot, the scan, maintenance) backs off on its
  own after a failure (`faults.Guard`, 0.5 s doubling to 10 s) and is logged once per minute with a count. Only
  `wake()` (new mail committed: the store takes writes again) ends that wait early; internal wake-ups do not.
- At stop, deliveries in flight get the grace period; those cut off stay pending (their messages stay active and
  are taken again after the next start); results already back are recorded before the store closes, and so are
  those a cut-off delivery's agent had said were final (`DeliveryRequest.settled`: the peer had taken the message,
  and the agent was still at its next peer, an LMTP peer's next reply or its report): a restart delivers them no
  second time (`_settled_in`). A mailbox write or a command that had exited is not cut (mailflow.uncut: for
  UNCUT_LIMIT seconds at most; past it the write is cut off, warned, and its recipient stays queued, unless its
  agent hands on its result to come and it ends while the results back are recorded: `_settled_late`).
- The wake-up event carries no state: a lost wake-up costs at most one tick.

One class on purpose. The loop, the scheduling and the end of an attempt share one table
(`_active`, the messages in qmgr's hands), one wake-up and one next-scan time, and every path that changes one
changes the others (a finish frees room and may move the next scan). What stands alone is already apart: the
destination windows (`destination.py`), the retry schedule (`backoff.py`) and the notices (`notices.py`).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import logging
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable, Collection, Iterable, Iterator

from mailflow.clock import Clock
from mailflow.content import Content
from mailflow.faults import FIRST_DELAY, MAX_DELAY, ErrorKindLog, FailureLog, Guard, Retrier, describe
from mailflow.logs import MailLog
from mailflow.message import header_value
from mailflow.slices import in_slices
from mailflow.model import (Delivered, DeliveryReport, DeliveryRequest, MsgStats, NewMessage, Outcome,
                            OwnedFailure, QueuedMessage, RcptResult, Recipient, Resolution, replaced)
from mailflow.stages.bounce import EXPIRED, wants_notice
from mailflow.stages.qmgr.backoff import next_attempt
from mailflow.stages.qmgr.destination import Destination, Job
from mailflow.stages.qmgr.notices import bounced_parts
from mailflow.store import SCAN_CONTENT_BUDGET, Store, store_fault
from mailflow.tables.search import split_extension
from mailflow.under_way import UnderWay

if TYPE_CHECKING:
    from mailflow.transports import Transport

log = logging.getLogger("mailflow.qmgr")

TICK = 1.0  # default seconds between polls of the tools' generation counter and destination snapshots
JITTER = 0.1  # retries spread over up to 10 % of their delay, so mail that arrived together does not retry in step
MIN_RESCAN = 0.1  # seconds: the soonest a timed scan follows the one before
MAINTENANCE_INTERVAL = 60.0  # seconds between checks whether the store has space to give back
RECORD_GRACE = 5.0  # at stop, seconds granted to results already back to be recorded after deliveries are cut off
LATE_RESULT_GRACE = 1.0  # at stop, seconds a write cut off past UNCUT_LIMIT is waited for, its result to come
HANDOFF_CONTENT_BUDGET = SCAN_CONTENT_BUDGET  # bytes of handed-over content kept in memory at once
UNDEFINED_TRANSPORT_PROGRAM = "error"  # what a result for a transport that is not defined is logged as
# a message's recipients by (transport, nexthop), and those whose resolution failed (deferred): what _routes returns
Routes = tuple[dict[tuple[str, str], list[Recipient]], list[RcptResult]]
ADMIT_SLICE = 100  # messages a scan admits (routes, schedules) before it hands the loop back
ROUTE_SLICE = 500  # recipients of one message a scan resolves before it hands the loop back
ORDER_SLICE = 20_000  # recipients of one message put in Postfix's order (`_put_in_order`) before the loop is let go
ROUTE_RESTARTS = 3  # reloads that start a message's sliced resolution over; past them the pass ends, to be redone
SUSPEND_SLICE = 1000  # recipients of jobs qmgr answers (dead destination, withdrawn) before the loop is let go
RECORD_SLICE = 1000  # results of one message a record (or the end of its attempt) takes, logged in one loop turn
REPORT_SLICE = 2000  # results of one job's report taken in before the loop is handed back (`_job_done_in_slices`)
RESULT_SLICE = 100  # results of one job taken from an agent that delivers each before the loop is handed back
STILL_QUEUED = ("active", "incoming", "deferred")  # an active message's queues that leave its jobs to run
# what became of a message whose jobs were withdrawn, as their deferral says it (`_job_withdrawn`)
TAKEN_BACK = {"hold": "put on hold", "maildrop": "requeued", "corrupt": "moved to the corrupt queue"}
OVERLOOK_SLICE = 1000  # destinations the tick's safety net (`_mark_the_overlooked`) looks at, round robin


@dataclass
class ActiveMessage:
    message: QueuedMessage
    jobs_left: int
    stats: MsgStats  # its arrival and this attempt's entry into the active queue (the log's delays a and b)
    deferred: list[RcptResult] = field(default_factory=list)  # this attempt's deferred results, recorded: what
    # its end expires or warns of (the sent and bounced ones are not kept: 1 000 000 sent held 250 MB to no use)
    owed: list[RcptResult] = field(default_factory=list)  # recorded results whose notice is not queued yet
    unrecorded: list[RcptResult] = field(default_factory=list)  # results back, waiting for the record in flight
    recording: bool = False  # a record of its results is being written (one at a time)
    finishing: bool = False
    content: asyncio.Future | None = None  # read once however many destinations (a Content: big ones stay in files)
    withdrawn: str = ""  # its queue (hold, maildrop, corrupt) or "deleted" when taken back while it was active
    reclaimed: bool = False  # a scan claimed its row again during the attempt (released meanwhile): `_give_back`
    suspended: bool = False  # jobs of it were withdrawn (held, requeued, set aside): recipients not tried
    handed_bytes: int = 0  # its content, handed over by cleanup, counted in qmgr's HANDOFF_CONTENT_BUDGET


class QueueManager:
    def __init__(self, store: Store, *, resolve: Callable[[str, str, dict], Resolution], transports: dict, config,
                 clock: Clock, rng, log: MailLog, notices=None, tick: float = TICK,
                 backoff: tuple[float, float] = (FIRST_DELAY, MAX_DELAY),
                 on_delivery: Callable[[str, float], None] | None = None, soft_bounce: bool = False,
                 recipient_delimiter: str = ""):
        """`backoff`: (first, cap) seconds between tries of a failing store write or chore; `on_delivery`,
        `soft_bounce`: see the module doc; `recipient_delimiter` (the main setting): what a recipient limit of 1
        leaves out of the destination it names."""
        self._store = store
        self._recipient_delimiter = recipient_delimiter
        self._soft_bounce = soft_bounce
        self._resolve = resolve
        self._routing = 0  # bumped by each reload (`reconfigure`): a message resolved across it starts over
        self._transports = transports
        self._config = config
        self._clock = clock
        self._rng = rng
        self._log = log
        self._notices = notices
        self._making_notices = UnderWay()  # the notices being made, by the reload whose notices they use
        self._tick_seconds = tick
        self._on_delivery = on_delivery
        self._active: dict[str, ActiveMessage] = {}
        self._destinations: dict[tuple[str, str], Destination] = {}
        # The destinations `_pump` looks at, by transport, in turn: jobs were queued, a delivery ended, a timer rang
        # (a dead-site timer, a rate delay's pause), an operator or a reload changed them. Not the others: with a
        # recipient limit of 1 there are as many destinations as recipients.
        # the destinations `_pump` is to look at: by transport, then by the message their next job is of (its queue
        # id, "" for none), so that messages take their turns, whatever their number of destinations
        self._ready: dict[str, Turns] = {}
        self._dead_marked: dict[tuple[str, str], None] = {}  # dead ones marked: their jobs deferred whatever the cap
        self._timers: list[tuple[float, tuple[str, str]]] = []  # (a heap) (when, destination): a pause or death ends
        self._sleeping_until = 0.0  # the clock time the loop's current sleep ends
        self._in_flight = 0
        self._in_flight_by_transport: dict[str, int] = {}  # transports with deliveries under way: how many
        self._tasks: set[asyncio.Task] = set()
        self._setting_aside: set[str] = set()  # damaged messages a scan took (active in the store), being set aside
        self._giving_back: dict[str, int] = {}  # messages let go of whose row a scan claimed again: give-backs
        # under way each (`_give_back`)
        self._let_go_in_take: dict[str, bool] | None = None  # during a scan's take and admission, the messages let
        # go of since the take began: whether their row stayed queued (`_claimed_stale`)
        self._deliveries: set[asyncio.Task] = set()
        self._rerouting: dict[str, list[Job]] = {}  # jobs a reload took back, by message, not resolved again yet
        self._rerouter: asyncio.Task | None = None  # the task resolving them again a slice at a time (`_reroute`)
        self._retired: list[tuple[str, Transport]] = []  # (name, transport) a reload replaced, closed once its
        # deliveries end
        self._retirements: set[asyncio.Task] = set()
        self._wakeup = asyncio.Event()
        self._scan_wanted = True  # the next turn scans; not after a wake-up that only a destination's timer rang
        self._scan_under_way = False  # the loop is in a scan (which may wait for a retry of a write: `_set_aside`)
        self._timer_only = False  # the loop's current sleep ends for a destination's timer, not for a scan
        self._next_scan = 0.0
        self._next_maintenance = 0.0
        self._room_was_short = False  # the last scan found as many due messages as it had room for
        self._reserved = 0  # places in the active queue promised to messages cleanup is committing (hand_over)
        self._admitting = 0  # messages the scan under way took and has not admitted yet
        self._handed_bytes = 0  # content kept in memory for handed-over messages not finished yet
        self._next_tick = 0.0  # the tools' counters are read, and the destinations written, once a tick
        self._generation = 0
        self._flushes = 0
        self._snapshot: dict[tuple[str, str], tuple] | None = None  # the rows last written, by destination
        self._changed: set[tuple[str, str]] = set()  # destinations whose row may differ from the one last written
        self._overlook_round: Iterator[tuple[str, str]] = iter(())  # the safety net's round over the destinations
        self._loop_task: asyncio.Task | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None  # the one start() ran on (None: not started)
        self._stopping = False
        first, cap = backoff
        logger = logging.getLogger("mailflow.qmgr")  # (`log` here is the mail log)
        self._writes = Retrier(clock, logger, "qmgr: recording delivery results", shared=store_fault,
                               first=first, cap=cap)
        self._poll = Guard("qmgr: reading operator changes", clock, logger, first=first, cap=cap)
        self._publish = Guard("qmgr: writing the destination snapshot", clock, logger, first=first, cap=cap)
        self._scanning = Guard("qmgr: queue scan", clock, logger, first=first, cap=cap)
        self._recovered = False  # the start-up recovery is done (`_recover`): scans and hand-overs wait for it
        self._maintenance = Guard("qmgr: store maintenance", clock, logger, first=first, cap=cap)
        self._agent_faults: dict[str, ErrorKindLog] = {}  # by transport: an agent that raises (`_agent_failed`)

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Recovery first (`_recover`); a store fault (the disk full) leaves it to the first scan that gets through,
        so that the server starts and recovers when space returns, with no one to start it again."""
        try:
            await self._recover()
        except Exception as e:
            if not store_fault(e):
                raise
            log.error("qmgr: cannot make the mail left active by the last stop due again yet: %s; no queue scan "
                      "before it is done (tried again with the scans)", describe(e))
        self._generation, self._flushes = await self._store.operator_counters()
        self._next_maintenance = self._clock.time() + MAINTENANCE_INTERVAL
        self._event_loop = asyncio.get_running_loop()
        self._loop_task = self._event_loop.create_task(self._run(), name="qmgr")

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking new work, let deliveries in flight finish within `grace` and cancel the rest (a mailbox write
        under way holds its cancel UNCUT_LIMIT s at most: mailflow.uncut); results already back get recorded
        (within min(grace, RECORD_GRACE) more when the store is slow), and those of writes cut off past UNCUT_LIMIT
        when they come within LATE_RESULT_GRACE (`_settled_late`). So `grace` + UNCUT_LIMIT + min(grace,
        RECORD_GRACE) at most."""
        self._stopping = True  # no job starts any more
        if self._loop_task:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        await self._drain(grace)
        for task in list(self._deliveries):
            task.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)
        for faults in self._agent_faults.values():
            faults.flush()  # (the failures counted and not told yet)
        await self._drain(min(grace, RECORD_GRACE))
        for task in list(self._tasks) + list(self._retirements):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._retirements, return_exceptions=True)
        self._giving_back.clear()  # (one cancelled before it began: its row stays active for the next recovery)
        await _close_together(_unique_named([*_named(self._transports), *self._retired]))

    async def _drain(self, seconds: float) -> None:
        """Wait up to `seconds` for every task, including those the finishing ones start (records, finishes)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self._tasks and loop.time() < deadline:
            await asyncio.wait(set(self._tasks), timeout=deadline - loop.time())

    def reconfigure(self, *, resolve: Callable[[str, str, dict], Resolution], transports: dict, config, notices,
                    soft_bounce: bool, recipient_delimiter: str = "") -> None:
        """A reload: the recipients of every job not started yet, and of messages admitted from now on, are
        resolved by `resolve` (`_reroute`); jobs started from now on go to `transports`; every destination starts
        over under `config` (dead ones are alive again), and attempts ending from now on follow it. Transports no
        longer in use are closed once the deliveries already under way end (they may hold cached connections)."""
        kept = {id(t) for t in transports.values()}
        retired = [(name, t) for name, t in _named(self._transports) if id(t) not in kept]
        self._resolve, self._transports, self._config, self._notices = resolve, transports, config, notices
        self._making_notices.reconfigured()
        self._routing += 1
        self._soft_bounce, self._recipient_delimiter = soft_bounce, recipient_delimiter
        for dest in self._destinations.values():
            dest.restart(config.initial_destination_concurrency, config.default_destination_concurrency_limit,
                         config.destination_concurrency_failed_cohort_limit, config.rate_delay(dest.transport))
            self._mark(dest)
        self._reroute()
        self._pump()
        if retired:
            self._retired += retired
            retiring = asyncio.create_task(self._retire(retired, set(self._deliveries)), name="qmgr-retire")
            self._retirements.add(retiring)
            retiring.add_done_callback(self._retirements.discard)

    async def _retire(self, transports: list[tuple[str, Transport]], deliveries: set[asyncio.Task]) -> None:
        """Close `transports` once `deliveries` ended. Each whose close ended (a failed one too, logged) leaves
        `_retired`; one whose close a stop cancelled stays there, and the stop closes it again within its grace."""
        if deliveries:
            await asyncio.wait(deliveries)
        ended: list[Transport] = []
        try:
            await _close_together(transports, ended)
        finally:
            gone = {id(t) for t in ended}
            self._retired = [(name, t) for name, t in self._retired if id(t) not in gone]

    def wake(self) -> None:
        """New mail is queued: scan soon. Carries no state, but says the store took a commit, so a chore backing
        off after a store fault is tried again now rather than at the end of its backoff."""
        self._store_took_a_commit()
        self._rouse()

    def _store_took_a_commit(self) -> None:
        """New mail was committed (through the store or handed over): the chores backing off after a store fault
        try again now, and a failed scan with them (the mail due meanwhile waits no longer)."""
        scan_waited = self.scan_backing_off
        for guard in (self._poll, self._publish, self._scanning):
            guard.retry_now()
        if scan_waited:
            self._rouse()

    # -- new mail handed over by cleanup ------------------------------------------------------------
    def reserve(self, recipients: int) -> bool:
        """A place in the active queue for a message of `recipients` cleanup is about to commit straight into it
        (see the module doc); True holds it until `hand_over` or `release`. Never for more than ROUTE_SLICE
        recipients: that message goes through the incoming queue, and the scan resolves it a slice at a time in
        qmgr's own loop task, whose operator poll comes before or after the scan, never in between."""
        if self._stopping or self._loop_task is None or self._room_was_short or not self._recovered:
            return False
        if recipients > ROUTE_SLICE:
            return False
        if self.taken_count + self._reserved + self._admitting >= self._config.active_limit:
            return False
        self._reserved += 1
        return True

    def release(self) -> None:
        """The reserved message was not committed: its place is free again."""
        self._reserved -= 1

    def hand_over(self, msg: NewMessage) -> None:
        """A message committed in the active queue on a place `reserve` gave: it is scheduled now, its content
        (when all in memory) used as it is. After a stop began it stays active for the next start."""
        self._reserved -= 1
        if self._stopping:
            return
        self._store_took_a_commit()
        queued = QueuedMessage(msg.queue_id, msg.sender, msg.arrival, msg.content.size, msg.smtputf8, msg.body_type,
                               0, msg.recipients, envid=msg.envid, ret=msg.ret, content_filter=msg.content_filter,
                               client_attributes=msg.client_attributes, created=msg.created)
        content, kept = None, 0
        if msg.content.in_memory and self._handed_bytes + msg.content.size <= HANDOFF_CONTENT_BUDGET:
            content = (self._event_loop or asyncio.get_running_loop()).create_future()
            content.set_result(msg.content)
            kept = msg.content.size
            self._handed_bytes += kept
        self._admit(queued, self._clock.time(), content, kept)
        self._pump()

    @property
    def active_count(self) -> int:
        return len(self._active)

    @property
    def taken_count(self) -> int:
        """The messages the store holds active on qmgr's behalf: those in hand, the damaged ones a scan took that
        are being set aside (their move to the corrupt queue may wait for a retry after a store fault), and those
        being given back (`_give_back`; once, however many give-backs of it are under way). Every row the store
        holds active is one of these, or taken by the scan under way and not admitted yet (`_admitting`; a stale
        one is given back, never admitted: `_claimed_stale`), reserved by cleanup (`reserve`), or a previous run's
        before the start-up recovery. None is counted twice: a message being given back is not admitted."""
        return len(self._active) + len(self._setting_aside) + len(self._giving_back)

    def in_hand(self, queue_id: str) -> bool:
        """Whether the message is in qmgr's hands (its attempt not concluded), whatever its queue in the store
        says: pickup copies no requeued message before its attempt is over."""
        return queue_id in self._active

    @property
    def retiring(self) -> bool:
        """Transports a reload replaced are not all closed yet (deliveries they began are still under way), or a
        notice begun with the notices it replaced is still being made."""
        return bool(self._retired) or self._making_notices.before_reload

    @property
    def busy(self) -> bool:
        """Deliveries or records are under way (those waiting to retry a write the store refused too)."""
        return bool(self._tasks)

    @property
    def working(self) -> bool:
        """Deliveries, records or a scan are under way, but for those that wait for the clock alone (the retry of a
        write the store refused): a driver of a virtual clock waits for this to clear, then moves the clock."""
        workers = self._tasks | ({self._loop_task} if self._scan_under_way else set())
        return bool(workers) and not (self._writes.resting() and workers <= self._writes.callers)

    def next_timer(self) -> float | None:
        """The earliest time still to come a destination's timer rings (a rate delay's pause or a dead site's
        memory ends), a refused record is retried or a failed scan is tried again (`scan_backing_off`), or None: a
        driver of a virtual clock stops there on its way, as at the store's due times. (It may be a timer whose
        destination has since moved on: stopping there changes nothing.)"""
        now = self._clock.time()
        retries = (self._writes.next_retry(), self._scanning.resume_at if self.scan_backing_off else None)
        moments = [when for when, _ in self._timers] + [when for when in retries if when is not None]
        return min((when for when in moments if when > now), default=None)

    @property
    def scan_backing_off(self) -> bool:
        """The last scan failed and the next waits for its backoff (a time on the clock, in `next_timer`): mail due
        now or incoming waits for the clock alone. A driver of a virtual clock counts it as settled and does not
        `wake()` qmgr for it (a wake-up, the sign of a commit, ends the backoff)."""
        return self._scanning.backing_off

    @property
    def scan_failure(self) -> FailureLog | None:
        """The run of failed queue scans (`since`, `describe_run()`) while the last scan failed, else None."""
        return self._scanning.log if self._scanning.log.failing else None

    @property
    def record_failure(self) -> FailureLog | None:
        """The run of store faults that records (delivery results, the ends of attempts) wait out for their retry,
        while any waits, else None: for a driver to tell when it gives up, as `scan_failure`."""
        return self._writes.failure

    def waiting_for_timers(self) -> bool:
        """Nothing is under way and nothing can start before the clock moves: no delivery, record (but one waiting
        for its retry), scan or hand-over in progress, no wake-up or timer pending, and every job in hand waits at a
        destination `held` by a timer still to come. A driver of a virtual clock counts the messages in hand then
        as settled."""
        now = self._clock.time()
        if self.working or self._admitting or self._reserved or self._wakeup.is_set():
            return False
        if self._timers and self._timers[0][0] <= now:
            return False
        return all(dest.held(now) for dest in self._destinations.values() if dest.jobs)

    def destinations(self) -> list[tuple]:
        """Each destination's `Destination.snapshot` now."""
        now = self._clock.time()
        return [d.snapshot(now) for d in self._destinations.values()]

    # -- address verification probes -------------------------------------------------------------------
    async def deliver_probe(self, transport: str, request: DeliveryRequest) -> tuple[DeliveryReport, str]:
        """An address verification probe (`request.verify`) to `(transport, request.nexthop)`, as Postfix's qmgr
        meets the probe verify(8) queues: a destination it holds for dead defers it at once, without a
        connection, as it defers its queued jobs (`delivery temporarily suspended: <why it died>`); otherwise the
        transport runs it. What the probe finds teaches qmgr nothing, as in Postfix (whose smtp client reports a
        probe's failure as recorded, not as the site's: a probe never makes a destination dead); it waits for no
        window nor limit (the verifier bounds its probes). Returns the report and the program that made it, as a
        message's result is logged (`_program`): the transport's, error for a transport that is not defined, or
        "qmgr" for a dead destination. What the transport raises propagates."""
        agent = self._transports.get(transport)
        if agent is None:
            return _undefined_transport(transport, request.recipients), UNDEFINED_TRANSPORT_PROGRAM
        queue = request.nexthop
        if self._config.recipient_limit(transport) == 1 and len(request.recipients) == 1:
            queue = self._recipient_queue(request.recipients[0].address, request.nexthop)
        dest = self._destinations.get((transport, queue))
        if dest is not None and dest.is_dead(self._clock.time()):
            return _suspended(dest.status, dest.reason, request.recipients), "qmgr"
        return await agent.deliver(request), agent.program

    # -- the loop ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        """Each turn runs the chores; one that fails backs off alone (logged once a minute), the loop sleeps."""
        while True:
            self._wakeup.clear()
            ticked = self._clock.time() >= self._next_tick  # once a tick, not at every wake-up (each is a hop)
            if ticked:
                self._next_tick = self._clock.time() + self._tick_seconds
                await self._poll.run(self._poll_operators)  # first: holds and flushes are seen before a scan acts
            self._pump()  # also revives destinations whose dead timer ran out, resumes paused ones
            if ticked:
                await self._publish.run(self._publish_destinations)
                for faults in self._agent_faults.values():
                    faults.tick()  # (a count is told when its minute is over, though no failure follows)
            if self._scan_wanted or ticked:
                self._scan_wanted = False
                await self._scan_guarded()
            if self._clock.time() >= self._next_maintenance:
                self._next_maintenance = self._clock.time() + MAINTENANCE_INTERVAL
                await self._maintenance.run(self._store.maintain)
            await self._idle(self._idle_until())

    async def _scan_guarded(self) -> None:
        """The scan, unless it backs off after a failure; `working` while under way."""
        self._scan_under_way = True
        try:
            await self._scanning.run(self._scan)
        finally:
            self._scan_under_way = False

    def _idle_until(self) -> float:
        """The clock time the loop sleeps until: the next scan (or the scan's backoff), at most a tick away, or
        sooner the end of a destination's rate delay."""
        next_scan = self._next_scan
        if self._scanning.backing_off:
            next_scan = max(next_scan, self._scanning.resume_at)
        deadline = min(self._clock.time() + self._tick_seconds, next_scan)
        self._timer_only = bool(self._timers) and self._timers[0][0] < deadline
        return self._timers[0][0] if self._timer_only else deadline

    async def _idle(self, deadline: float) -> None:
        """Wait for a wake-up or until `deadline` on the injected clock, whichever comes first: the clock's
        sleep (one task) rings the wake-up event, which the loop waits on directly. The timer measures from
        the deadline when it starts, not from when it was made: time that passes in between is not added."""
        if self._wakeup.is_set():
            return
        self._sleeping_until = deadline
        timer = asyncio.ensure_future(self._sleep_until(deadline))
        timer.add_done_callback(self._timer_rang)
        try:
            await self._wakeup.wait()
        finally:
            timer.cancel()

    async def _sleep_until(self, deadline: float) -> None:
        await self._clock.sleep(max(0.0, deadline - self._clock.time()))

    def _timer_rang(self, timer: asyncio.Future) -> None:
        if not timer.cancelled():
            if not self._timer_only:
                self._scan_wanted = True
            self._wakeup.set()

    def _rouse(self) -> None:
        """A turn of the loop, with a scan, soon (new mail, an operator's change, room in the active queue)."""
        self._scan_wanted = True
        self._wakeup.set()

    async def _poll_operators(self) -> None:
        """Notice operator changes: holds and deletes (the generation counter), flush requests."""
        generation, flushes = await self._store.operator_counters()
        if generation != self._generation:
            await self._withdraw_taken_back()
            self._generation = generation
            self._next_scan = self._clock.time()
            self._rouse()
        if flushes != self._flushes:  # `mailflow queue flush`: like postqueue -f, dead sites get another try
            self._flushes = flushes
            for dest in self._destinations.values():
                dest.revive()
                self._mark(dest)

    async def _publish_destinations(self) -> None:
        """The destinations' state for the tools: the rows of the destinations that changed since the last write
        (`_changed`: all of them the first time, replacing what an earlier run left), so the tick costs what
        changed, not the number of destinations (with a recipient limit of 1, one per recipient)."""
        if self._mark_the_overlooked():
            self._pump()
        if self._snapshot is None:
            self._changed = set()
            now = self._clock.time()
            rows = {dest.key: dest.snapshot(now) for dest in self._destinations.values()}
            await self._store.save_destinations(list(rows.values()), now)
            self._snapshot = rows
            return
        changed, self._changed = self._changed, set()
        try:
            await self._publish_changes(self._snapshot, changed)
        except BaseException:
            self._changed |= changed  # (written at a later tick)
            raise

    async def _publish_changes(self, last: dict[tuple[str, str], tuple], changed: set[tuple[str, str]]) -> None:
        """Write the rows of `changed` that differ from `last` and remove those of destinations forgotten."""
        rows: dict[tuple[str, str], tuple] = {}
        gone = []
        now = self._clock.time()
        for key in changed:
            dest = self._destinations.get(key)
            if dest is None:
                if key in last:
                    gone.append(key)
            elif last.get(key) != (row := dest.snapshot(now)):
                rows[key] = row
        if not rows and not gone:
            return
        await self._store.save_destinations(list(rows.values()), now, gone)
        last.update(rows)
        for key in gone:
            del last[key]

    def _mark_the_overlooked(self) -> bool:
        """A safety net under `_mark`, once a tick, over the next OVERLOOK_SLICE destinations (round robin: a tick
        costs the slice, not every destination): one that could start a job (or is dead with jobs queued) but is
        not marked ready would wait for ever; it is marked, with a warning (a bug to report)."""
        now = self._clock.time()
        unmarked = []
        for dest in self._next_to_look_at():
            dead = dest.dead_until
            if (dest.can_start(now) or (dest.jobs and dest.is_dead(now))) and not self._marked_for_next_job(dest):
                unmarked.append(dest)
            if dead != dest.dead_until:
                self._changed.add(dest.key)  # (its dead time ran out, looked at before its timer rang)
        if not unmarked:
            return False
        marked = {key for turns in self._ready.values() for group in turns.values() for key in group}
        overlooked = [dest for dest in unmarked if dest.key not in marked]
        for dest in overlooked:
            log.warning("destination %s:%s could start a job but was not marked ready", dest.transport, dest.nexthop)
            self._mark(dest)
        return bool(overlooked)

    def _next_to_look_at(self) -> list[Destination]:
        """The next OVERLOOK_SLICE destinations of the safety net's round (the keys of a round are listed as it
        starts; those forgotten since are passed over)."""
        keys = list(islice(self._overlook_round, OVERLOOK_SLICE))
        if not keys:
            self._overlook_round = iter(list(self._destinations))
            keys = list(islice(self._overlook_round, OVERLOOK_SLICE))
        return [dest for key in keys if (dest := self._destinations.get(key)) is not None]

    def _marked_for_next_job(self, dest: Destination) -> bool:
        """`dest` waits in the line of the message of its next job (where `_mark` puts it; the safety net looks
        at all the lines only for a destination not found there)."""
        turns = self._ready.get(dest.transport)
        head = dest.jobs[0].queue_id if dest.jobs else ""
        return turns is not None and dest.key in turns.get(head, ())

    async def _withdraw_taken_back(self) -> None:
        """Messages an operator held, requeued after a hold (maildrop: pickup copies it once its attempt is over) or
        deleted while active: their jobs not yet started are dropped. Not those queued for delivery again (held and
        released, deferred and due, or requeued owing notices, incoming, before the poll saw the hold): the scan
        claims them back, and their attempt goes on as if they had not been held. (Only those asked about: one
        handed over while the states were read is not taken for deleted.) One pass over the destinations for all of
        them: with a destination per message, one each would cost messages x destinations. The jobs are ended
        SUSPEND_SLICE recipients a loop turn (`_end_in_slices`; a hold of 100 000 recipients held it 0.35 s): the
        poll's own task, so no scan or other poll comes in between."""
        asked = list(self._active)
        states = await self._store.queue_states(asked)
        taken_back: dict[str, str] = {}
        for queue_id in asked:
            active = self._active.get(queue_id)
            state = states.get(queue_id, "deleted")
            if active is None or state in STILL_QUEUED or active.withdrawn:
                continue
            active.withdrawn = taken_back[queue_id] = state
        if not taken_back:
            return
        jobs: list[Job] = []
        for dest in list(self._destinations.values()):
            withdrawn = dest.withdraw_many(taken_back)
            if withdrawn:
                self._mark(dest)  # (idle now, maybe)
                jobs += withdrawn
        await self._end_in_slices(jobs, lambda job, part, last: self._job_withdrawn(
            job, part, last, taken_back[job.queue_id]))

    def _job_withdrawn(self, job: Job, part: tuple[Recipient, ...], last: bool, state: str) -> None:
        """`part` of a job of a message the operator held, requeued (maildrop) or moved to the corrupt queue:
        deferred, its recipients kept, the reason naming the state (`TAKEN_BACK`); or deleted: nothing to record
        (the job ends with its `last` part)."""
        if state == "deleted":
            if last:
                active = self._active[job.queue_id]
                active.jobs_left -= 1
                self._results_in(active, [])
            return
        text = f"delivery suspended: the message was {TAKEN_BACK.get(state, f'moved to the {state} queue')}"
        self._active[job.queue_id].suspended = True
        self._part_done(job, part, last, DeliveryReport.uniform(part, Outcome.DEFERRED, "4.0.0", text))

    async def _recover(self) -> None:
        """Start-up recovery (Store.recover): the mail a stop or a crash left active is due again. Until it is done
        nothing is taken and nothing handed over (every active message is then the last run's), so a recovery that
        waited for a store fault never takes back mail this run has in hand."""
        recovered = await self._store.recover()
        self._recovered = True
        if recovered:
            log.info("qmgr: %d messages were active when the server stopped; they are due again", recovered)

    async def _scan(self) -> None:
        """Take and admit what is due (after the start-up recovery, when a store fault kept it from the start). A
        timed scan (its time came) also sets the next one's time: a queue run away, or sooner the earliest deferred
        message's due time. That time is set before the scan's first wait
        and only brought forward after: an attempt that ends while the scan waits on the store defers its message
        to a time the index lookup may have been read too early to see, and moves the next scan to it
        (`_conclude`); overwritten, that retry would wait for the next queue run."""
        if not self._recovered:
            await self._recover()
        now = self._clock.time()
        timed, due_since = now >= self._next_scan, self._next_scan
        if timed:
            self._next_scan = now + self._config.queue_run_delay
        try:
            await self._take_due(now)
            if timed:
                next_due = await self._next_due(now)
                self._next_scan = min(self._next_scan, next_due)  # (read after the wait: it may have moved)
        except BaseException:
            if timed:
                self._next_scan = min(self._next_scan, due_since)  # not done: the timed scan is still due
            raise

    async def _take_due(self, now: float) -> None:
        """Take and admit what is due; the messages let go of meanwhile are noted (`_claimed_stale`)."""
        room = self._config.active_limit - self.taken_count - self._reserved  # (those being set aside too)
        self._let_go_in_take = {}
        try:
            taken = await self._store.take(now, room) if room > 0 else []
            self._room_was_short = room <= 0 or len(taken) >= room  # more may be due than there was room for
            await self._admit_all(taken, now)
        finally:
            self._let_go_in_take = None

    async def _next_due(self, now: float) -> float:
        """When the next timed scan is due by the store: the earliest deferred message's time (an index lookup),
        at most a queue run away; deferred mail with no time to be due (damaged: never seen otherwise) is set
        aside first."""
        await self._set_aside(await self._store.never_due())
        next_due = await self._store.next_due_time()
        later = now + self._config.queue_run_delay
        if next_due is not None and len(self._active) < self._config.active_limit:
            later = min(later, max(next_due, now + MIN_RESCAN))  # never 0: no spin on a due backlog
        return later

    async def _admit_all(self, taken: list[QueuedMessage], now: float) -> None:
        """The messages a scan took enter the active queue, ADMIT_SLICE at a time, deliveries starting after each
        slice; in between the loop runs the others (sessions, deliveries, a hand-over, which counts the messages
        still to come)."""
        self._admitting = len(taken)
        try:
            for start in range(0, len(taken), ADMIT_SLICE):
                if start:
                    await asyncio.sleep(0)
                for message in taken[start:start + ADMIT_SLICE]:
                    if message.damage:
                        self._set_aside_taken(message)
                    elif message.queue_id in self._active:
                        self._released_in_hand(message.queue_id)
                    elif not self._claimed_stale(message.queue_id, now):
                        self._log_opened(message)
                        await self._admit_taken(message, now)
                    self._admitting -= 1
                self._pump()
        finally:
            self._admitting = 0

    async def _admit_taken(self, message: QueuedMessage, now: float) -> None:
        """`_admit` a message the scan took (nothing else admits it meanwhile), one of many recipients resolved a
        slice at a time; when a reload storm outlasted ROUTE_RESTARTS, what its slices resolved the old way is
        resolved again as after any reload (`_reroute`: at once, or by its task a slice a turn)."""
        if len(message.recipients) <= ROUTE_SLICE:
            self._admit(message, now)
            return
        routes, routing = await self._routes_in_slices(message, message.recipients)
        self._admit(message, now, routes=routes)
        if routing != self._routing:
            self._reroute()

    def _released_in_hand(self, queue_id: str) -> None:
        """A scan took a message this run still has in hand: held during its attempt, then released (due now)
        before the attempt ended. It is not admitted a second time, which would deliver it again beside the
        delivery under way; that attempt concludes it, no longer held: it expires and warns as any other. The
        claim may land after the end's write (in the same commit, or before `_finish` lets go of the message),
        leaving the row active: marked `reclaimed`, the message is given back once let go of (`_give_back`)."""
        active = self._active[queue_id]
        active.withdrawn = ""
        active.reclaimed = True

    def _claimed_stale(self, queue_id: str, now: float) -> bool:
        """Whether the scan's copy of the message is stale: let go of since the take began (its attempt ended
        while the take or the admission of the messages before it waited), or being given back. What the take read
        may predate the end of that attempt (recipients since delivered): admitted, it would deliver them again. It
        is not admitted; a row that stayed queued is given back due at `now` (the claim shows it was due), as the
        claim may have landed after the end's write (or the give-back's): still active, nobody would hold it. (A row
        the end removed or set aside was not claimed.)"""
        let_go = self._let_go_in_take or {}
        if queue_id in let_go:
            queued = let_go[queue_id]
        elif queue_id in self._giving_back:
            queued = True
        else:
            return False
        if queued:
            self._start_give_back(queue_id, now)
        return True

    def _set_aside_taken(self, message: QueuedMessage) -> None:
        """A damaged message the scan took (the store holds it active) is set aside by a task of its own, counted in
        `taken_count`, and against `active_limit`, until its write is done (it may wait for a retry after a store
        fault); its place is free then."""
        queue_id = message.queue_id
        self._setting_aside.add(queue_id)
        task = self._spawn(self._set_aside([(queue_id, message.damage)]))
        task.add_done_callback(lambda _: self._set_aside_done(queue_id))

    def _set_aside_done(self, queue_id: str) -> None:
        self._setting_aside.discard(queue_id)
        if self._room_was_short:  # the last scan left due mail behind for want of room: there is some now
            self._rouse()

    async def _set_aside(self, damaged: list[tuple[str, str]]) -> None:
        """Messages with damaged queue rows, (queue id, what is wrong) each, are not delivered: their values are
        stand-ins. To the corrupt queue in one write, with one warning each naming it and what is wrong (Postfix's
        `saving corrupt file`): one by one those a scan takes, in a batch the timed scans' `Store.never_due`."""
        if not damaged:
            return
        ids = [qid for qid, _ in damaged]
        await self._writes.run(lambda: self._store.mark_corrupt(ids), f"{ids[0]}: moving to the corrupt queue")
        for qid, damage in damaged:
            self._log.corrupt(qid, f"damaged queue row: {damage}")

    def _log_opened(self, message: QueuedMessage) -> None:
        """qmgr's `from=` line each time a message enters the active queue, as Postfix's opened() (a retry, a
        release, a restart's recovery: the store marks it owed then), but for the first time of one
        cleanup logged it for as it was queued."""
        if message.from_logged:
            return
        self._log.opened(message.queue_id, message.sender, message.size, message.nrcpt or len(message.recipients))

    def _admit(self, message: QueuedMessage, now: float, content: asyncio.Future | None = None,
               handed_bytes: int = 0, routes: Routes | None = None) -> None:
        """`message` enters the active queue at `now`, its recipients resolved now unless `routes` has them."""
        groups, unresolved = routes if routes is not None else self._routes(message, message.recipients, {})
        active = ActiveMessage(message, jobs_left=0, stats=MsgStats(message.arrival, now),
                               owed=list(message.owed), content=content, handed_bytes=handed_bytes)
        self._active[message.queue_id] = active
        active.jobs_left = self._queue_jobs(message.queue_id, groups, ordered=routes is not None)
        # nothing to deliver (every recipient was done before a stop, or none resolved): the attempt ends now
        self._results_in(active, unresolved)

    async def _routes_in_slices(self, message: QueuedMessage,
                                recipients: tuple[Recipient, ...] | list[Recipient]) -> tuple[Routes, int]:
        """`_routes` of `recipients` of `message`, ROUTE_SLICE at a time, the loop handed back in between (one
        message of 100 000 recipients, which virtual aliases may make, held it 2.3 s); the same groups, in the
        same order, and the routing generation its last pass began under. A reload in between (`reconfigure`)
        starts it over: every recipient goes where the new routing sends it, as `_reroute` sends the jobs already
        queued; but ROUTE_RESTARTS times at most: the last pass goes on to its end, and the caller has what it
        resolved the old way resolved again (`_admit_taken` by `_reroute`, `_reroute_one` by putting the jobs back
        in line). So reloads that keep coming keep the message's jobs in no destination as long as they come, as
        Postfix's qmgr, restarted by each, delivers nothing meanwhile; each pass is bounded, not the wait."""
        for restart in range(ROUTE_RESTARTS + 1):
            routing = self._routing
            memo: dict = {}  # the sender's choices, for all the slices
            groups: dict[tuple[str, str], list[Recipient]] = {}
            keys: dict[tuple[str, str], list[bytes]] = {}  # each group's `_postfix_order`, made with its slice
            # (none for a recipient limit of 1: a destination per recipient, nothing to sort)
            unresolved: list[RcptResult] = []
            for start in range(0, len(recipients), ROUTE_SLICE):
                if start:
                    await asyncio.sleep(0)
                    if routing != self._routing and restart < ROUTE_RESTARTS:
                        break
                part, failed = self._routes(message, recipients[start:start + ROUTE_SLICE], memo)
                for key, members in part.items():
                    if key not in groups:
                        groups[key] = []
                        if not self._one_per_recipient(key[0]):
                            keys[key] = []
                    groups[key].extend(members)
                    if key in keys:
                        keys[key].extend(map(_postfix_order, members))
                unresolved += failed
            else:
                break
        await self._put_in_order(groups, keys)
        return (groups, unresolved), routing

    async def _put_in_order(self, groups: dict[tuple[str, str], list[Recipient]],
                            keys: dict[tuple[str, str], list[bytes]]) -> None:
        """The groups `_queue_jobs` sorts, sorted here by the keys their slices made (`_routes_in_slices`; a group
        without keys has a destination per recipient, with nothing to sort), the loop
        handed back every ORDER_SLICE recipients (`_order_in_slices`): sorting 100 000 recipients by
        `_postfix_order` held it 0.2-0.5 s in one turn."""
        ordered = 0
        for route, members in groups.items():
            group_keys = keys.get(route)
            if group_keys is None or len(members) < 2:
                continue
            if len(members) > ORDER_SLICE:
                order = await _order_in_slices(group_keys)
            else:
                order = sorted(range(len(members)), key=group_keys.__getitem__)
            groups[route] = [members[i] for i in order]
            ordered += len(members)
            if ordered >= ORDER_SLICE:
                await asyncio.sleep(0)
                ordered = 0

    def _routes(self, message: QueuedMessage, recipients, memo: dict) -> Routes:
        """The recipients by `(transport, nexthop)` through trivial-rewrite, each in the form it resolved to; those
        whose lookup failed, deferred. `memo` keeps the sender's choices (sender-dependent routing) for all of the
        message's recipients: one per message and routing, however many calls its slices take."""
        groups: dict[tuple[str, str], list[Recipient]] = {}
        unresolved: list[RcptResult] = []
        for rcpt in recipients:
            try:
                res = self._resolve(rcpt.address, message.sender, memo)
            except Exception as e:  # a table or DNS lookup failed: not "not found", so try again later
                log.warning("%s: cannot resolve <%s>: %s", message.queue_id, rcpt.address, e)
                unresolved.append(RcptResult(rcpt, Outcome.DEFERRED, "4.3.0", f"address resolver failure: {e}"))
                continue
            if res.address != rcpt.address:  # trivial-rewrite's form (the percent hack), as Postfix's qmgr uses it
                rcpt = dataclasses.replace(rcpt, address=res.address)
            groups.setdefault(_route(message.content_filter, res.transport, res.nexthop), []).append(rcpt)
        return groups, unresolved

    def _queue_jobs(self, queue_id: str, groups: dict[tuple[str, str], list[Recipient]], ordered: bool = False) -> int:
        """One job per destination, or more of at most its transport's recipient limit each, the recipients in
        Postfix's order (`_postfix_order`: it decides which recipients go together, whether an ASCII recipient's
        delivery needs SMTPUTF8 for a UTF-8 one beside it, and which RCPT a peer that hangs up cuts off); with a
        limit of 1, a destination per recipient (`_recipient_queue`), as Postfix's qmgr_message_resolve names its
        queues (but for the error and retry transports). `ordered`: the groups are in that order already
        (`_put_in_order`). Returns the number of jobs."""
        count = 0
        for (transport, nexthop), rcpts in groups.items():
            limit = self._config.recipient_limit(transport)
            if limit == 1 and transport not in ("error", "retry"):  # (`_one_per_recipient`, inline: every message)
                for rcpt in rcpts:
                    queue = self._recipient_queue(rcpt.address, nexthop)
                    self._enqueue(transport, queue, [Job(queue_id, transport, nexthop, (rcpt,))])
                count += len(rcpts)
                continue
            if len(rcpts) > 1 and not ordered:
                rcpts = sorted(rcpts, key=_postfix_order)
            if not limit or len(rcpts) <= limit:  # (the common case: one job)
                jobs = [Job(queue_id, transport, nexthop, tuple(rcpts))]
            else:
                jobs = [Job(queue_id, transport, nexthop, tuple(rcpts[start:start + limit]))
                        for start in range(0, len(rcpts), limit)]
            self._enqueue(transport, nexthop, jobs)
            count += len(jobs)
        return count

    def _one_per_recipient(self, transport: str) -> bool:
        """Whether each recipient of `transport` is a destination of its own (a recipient limit of 1)."""
        return self._config.recipient_limit(transport) == 1 and transport not in ("error", "retry")

    def _recipient_queue(self, address: str, nexthop: str) -> str:
        """The destination of one recipient (a recipient limit of 1): its local part without its extension, at the
        next hop, lower case (Postfix: so that one user in several equivalent domains, or with several extensions,
        gets no extra delivery slots)."""
        local = address.rpartition("@")[0] if "@" in address else address
        return f"{split_extension(local, self._recipient_delimiter)[0]}@{nexthop}".lower()

    def _reroute(self) -> None:
        """A reload: every job not started yet is taken back and its recipients resolved again by the new routing
        (from their queued form, not the one they resolved to), as Postfix's qmgr, restarted by `postfix reload`,
        reads its active queue again. Deliveries in flight are left alone; the messages stay in hand, in the order
        they were taken. Messages of up to ROUTE_SLICE recipients in all (waiting or not) are resolved now; more
        by a task, ROUTE_SLICE recipients a loop turn (`_reroute_in_slices`: 20 000 held the loop 0.22 s), which a
        later reload hands its jobs to as well."""
        drained: dict[str, list[Job]] = {}
        for dest in self._destinations.values():
            for job in dest.drain():
                drained.setdefault(job.queue_id, []).append(job)
        for queue_id in [queue_id for queue_id in self._active if queue_id in drained]:
            self._rerouting.setdefault(queue_id, []).extend(drained[queue_id])
        if self._rerouter is not None or not self._rerouting:
            return  # (the task under way takes them too)
        if _recipients_at_most((self._active[queue_id].message for queue_id in self._rerouting), ROUTE_SLICE):
            rerouting, self._rerouting = self._rerouting, {}
            for queue_id, jobs in rerouting.items():
                active = self._active[queue_id]
                self._rerouted(active, jobs, self._routes(active.message, _queued_forms(active.message, jobs), {}))
        else:
            self._rerouter = self._spawn(self._reroute_in_slices())

    async def _reroute_in_slices(self) -> None:
        """`_reroute`'s task: the messages' jobs a reload took back, ROUTE_SLICE recipients a loop turn: the
        messages whose recipients fit in what is left of a turn's slice together (10 000 waiting one-recipient
        messages took as many turns, their jobs in no destination meanwhile), a bigger one by itself
        (`_routes_in_slices`); a message counts all its recipients, not only its waiting jobs' (`_queued_forms`
        indexes them all: a message of 100 000 with one job waiting cost as much). While a message's recipients
        are resolved its jobs are in no destination: an operator's hold or delete seen meanwhile
        (`_withdraw_taken_back` marks the message) ends them as withdrawn here; a later reload starts its
        resolution over (`_routes_in_slices`); one that came after its last pass began (while they were put in
        order, or past ROUTE_RESTARTS) puts its jobs back in line, to be resolved again a slice a turn."""
        try:
            room = ROUTE_SLICE  # the recipients this turn may still resolve
            while self._rerouting and not self._stopping:
                queue_id = next(iter(self._rerouting))
                active = self._active[queue_id]
                if not active.withdrawn and len(active.message.recipients) <= room:
                    jobs = self._rerouting.pop(queue_id)
                    recipients = _queued_forms(active.message, jobs)
                    self._rerouted(active, jobs, self._routes(active.message, recipients, {}))
                    room -= len(active.message.recipients)
                    continue
                if room == ROUTE_SLICE:
                    await self._reroute_one(queue_id)
                self._pump()
                await asyncio.sleep(0)
                room = ROUTE_SLICE
            self._pump()  # (the last turn's batch)
        finally:
            self._rerouter = None

    async def _reroute_one(self, queue_id: str) -> None:
        """`_reroute_in_slices` of a message of more recipients than a turn's slice, or withdrawn: the jobs of one
        withdrawn before its turn are ended without resolving its recipients, as are those of one withdrawn while
        they were resolved."""
        jobs = self._rerouting.pop(queue_id)
        active = self._active[queue_id]
        routes: Routes = ({}, [])
        routing = self._routing
        if not active.withdrawn:
            routes, routing = await self._routes_in_slices(active.message, _queued_forms(active.message, jobs))
        if active.withdrawn:
            state = active.withdrawn
            await self._end_in_slices(jobs, lambda job, part, last: self._job_withdrawn(job, part, last, state))
        elif routing != self._routing:  # a reload while they were put in order, or a storm of them
            self._rerouting.setdefault(queue_id, []).extend(jobs)  # resolved again, in slices
        else:
            self._rerouted(active, jobs, routes, ordered=True)

    def _rerouted(self, active: ActiveMessage, jobs: list[Job], routes: Routes, ordered: bool = False) -> None:
        """The message's `jobs` taken back by a reload are replaced by jobs of their recipients' new `routes`."""
        groups, unresolved = routes
        active.jobs_left += self._queue_jobs(active.message.queue_id, groups, ordered) - len(jobs)
        if unresolved:
            self._results_in(active, unresolved)

    def _enqueue(self, transport: str, queue: str, jobs: list[Job]) -> None:
        """One message's jobs for the destination `(transport, queue)`, made when first needed."""
        key = (transport, queue)
        dest = self._destinations.get(key)
        if dest is None:
            q = self._config
            dest = Destination(transport, queue, initial=q.initial_destination_concurrency,
                               limit=q.default_destination_concurrency_limit,
                               cohort_limit=q.destination_concurrency_failed_cohort_limit,
                               rate_delay=q.rate_delay(transport))
            self._destinations[key] = dest
        dest.queue(jobs)
        self._mark(dest)

    def _mark(self, dest: Destination) -> None:
        """`_pump` is to look at `dest`: it may start a job, or be forgotten."""
        key = (dest.transport, dest.nexthop)
        self._changed.add(key)
        turns = self._ready.get(dest.transport)
        if turns is None:
            turns = self._ready[dest.transport] = {}
        _take_turn(turns, dest, key)
        if dest.dead_until:
            self._dead_marked[key] = None

    def _pump(self) -> None:
        """Start every job the windows and caps allow, one at a time in turn: the transports take turns (Postfix's
        qmgr_transport_select), and within one the messages do (the one a destination's next job is of), a
        destination that started a job going to the end of the line; so once `delivery_concurrency_limit`
        binds, a freed slot goes to the next in line, not back to the big message's destination (or transport).
        Defers the jobs of dead destinations unattempted and forgets idle ones. Looks only at the destinations
        marked ready (`_mark`)."""
        if self._stopping:
            return
        now = self._clock.time()
        while self._timers and self._timers[0][0] <= now:
            dest = self._destinations.get(heapq.heappop(self._timers)[1])
            if dest is not None:
                self._mark(dest)
        if self._dead_marked:
            self._defer_dead(now)
        capped: dict[str, Turns] | None = None  # transports at their own cap: wait their turn
        limit = self._config.delivery_concurrency_limit
        while self._ready and self._in_flight < limit:
            transport = next(iter(self._ready))
            ready = self._ready.pop(transport)
            if transport in self._config.transport_concurrency_limit and not self._room_for(transport):
                capped = capped or {}
                capped[transport] = ready
                continue
            self._start_next(ready, now)
            marked = self._ready.pop(transport, None)  # (a job deferred meanwhile may have marked another)
            if marked:
                _merge_turns(ready, marked)
            if ready:
                self._ready[transport] = ready  # its next turn after the other transports'
        for transport, ready in (capped or {}).items():
            _merge_turns(self._ready.setdefault(transport, {}), ready)

    def _defer_dead(self, now: float) -> None:
        """The jobs queued at dead destinations are deferred unattempted now, not when a delivery slot is free."""
        while self._dead_marked:
            key = next(iter(self._dead_marked))
            del self._dead_marked[key]
            dest = self._destinations.get(key)
            if dest is not None and dest.is_dead(now):
                self._suspend(dest, dest.drain())

    def _start_next(self, turns: Turns, now: float) -> None:
        """Start one job: of the first message in `turns` whose destinations can start one (the message's turn
        goes to the end of the line, and so does the destination, under the message of its next job, if it can
        start more); the destinations before it that can start none leave (dead ones' jobs deferred, idle ones
        forgotten)."""
        while turns:
            head = next(iter(turns))
            group = turns.pop(head)
            started = self._start_first(group, now)
            if group:
                _merge_turns(turns, {head: group})
            if started is not None:
                if started.jobs and started.can_start(now):
                    _take_turn(turns, started, started.key)
                return

    def _start_first(self, group: dict[tuple[str, str], None], now: float) -> Destination | None:
        """Start the job of the first destination in `group` that can start one, and return it; those before it
        that can start none leave `group`."""
        while group:
            key = next(iter(group))
            del group[key]
            dest = self._destinations.get(key)
            if dest is None:
                continue
            if dest.dead_until and dest.is_dead(now):
                self._suspend(dest, dest.drain())
            elif dest.can_start(now):
                self._start(dest)
                return dest
            if dest.idle(now):
                del self._destinations[key]
                self._changed.add(key)
        return None

    def _start(self, dest: Destination) -> None:
        self._changed.add(dest.key)
        self._in_flight += 1
        self._in_flight_by_transport[dest.transport] = self._in_flight_by_transport.get(dest.transport, 0) + 1
        delivery = self._spawn(self._run_job(dest, dest.take()))
        self._deliveries.add(delivery)
        delivery.add_done_callback(self._deliveries.discard)

    def _one_less_in_flight(self, transport: str) -> None:
        """A delivery through `transport` ended; a transport with none left loses its entry (names a reload
        removed or a table routed to once would otherwise stay)."""
        left = self._in_flight_by_transport[transport] - 1
        if left:
            self._in_flight_by_transport[transport] = left
        else:
            del self._in_flight_by_transport[transport]

    def _room_for(self, transport: str) -> bool:
        cap = self._config.transport_concurrency_limit.get(transport)
        if cap is not None and self._in_flight_by_transport.get(transport, 0) >= cap:
            return False
        return self._in_flight < self._config.delivery_concurrency_limit

    def _suspend(self, dest: Destination, jobs: list[Job]) -> None:
        """The jobs a dead destination will not attempt are deferred with the failure that killed it; more than
        SUSPEND_SLICE recipients by a task of their own, a slice at a time (`_end_in_slices`: a destination that
        died with 2 000 jobs queued held it 0.5 s; one job of 100 000 recipients, 1.2 s). Their messages are not
        finished until then, as with jobs in flight."""
        if not jobs:  # (every job's end: the destination is alive)
            return
        status, reason = dest.status, dest.reason  # (a task's slices tell the failure that killed it)
        if len(jobs) <= SUSPEND_SLICE and sum(len(job.recipients) for job in jobs) <= SUSPEND_SLICE:
            for job in jobs:
                self._job_done(job, _suspended(status, reason, job.recipients))
        else:
            self._spawn(self._end_in_slices(jobs, lambda job, part, last: self._part_done(
                job, part, last, _suspended(status, reason, part))))

    async def _end_in_slices(self, jobs: list[Job], end: Callable[[Job, tuple[Recipient, ...], bool], None]) -> None:
        """`end(job, recipients, last)` of jobs qmgr answers itself (a dead destination's, a withdrawn message's),
        SUSPEND_SLICE recipients a loop turn, the loop handed back in between: a job of more a part at a time,
        `last` with its last part, which alone ends the job (so its message cannot finish before)."""
        room = SUSPEND_SLICE
        for job in jobs:
            start, count = 0, len(job.recipients)
            while count - start > room:
                end(job, job.recipients[start:start + room], False)
                start += room
                await asyncio.sleep(0)
                room = SUSPEND_SLICE
            end(job, job.recipients[start:], True)
            room -= count - start
            if room <= 0:
                await asyncio.sleep(0)
                room = SUSPEND_SLICE

    def _part_done(self, job: Job, part: tuple[Recipient, ...], last: bool, report: DeliveryReport) -> None:
        """qmgr's `report` for `part` of `job`: its results in as those of a job under way, or the job done with its
        `last` part."""
        piece = job if len(part) == len(job.recipients) else replaced(job, recipients=part)
        if last:
            self._job_done(piece, report)
        else:
            self._results_in(self._active[job.queue_id], _complete(piece, report, None))

    def _spawn(self, coro) -> asyncio.Task:
        task = (self._event_loop or asyncio.get_running_loop()).create_task(coro)  # (one task or more a message)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- one job ----------------------------------------------------------------------------------
    async def _run_job(self, dest: Destination, job: Job) -> None:
        report = None
        started = self._clock.time()  # the hand-off to the delivery agent
        recorded: set[int] = set()  # the recipients whose results were recorded while the job ran
        settled: list[RcptResult] = []  # the results its agent said were final (`DeliveryRequest.settled`)
        active = self._active[job.queue_id]
        try:
            report = await self._deliver(active, job, started, recorded, settled)
        except asyncio.CancelledError:  # a stop cut it off: what the peer already took is recorded all the same
            self._settled_in(active, job, settled, started, recorded)
            raise
        finally:
            ended = self._clock.time()
            if self._on_delivery is not None:
                self._on_delivery(job.transport, ended - started)
            self._in_flight -= 1
            self._one_less_in_flight(job.transport)
            site_ok = report.site_ok if report is not None else True
            reason, status = (report.site_reason, report.site_status) if report is not None else ("", "")
            self._suspend(dest, dest.done(site_ok, reason, ended, self._config.minimal_backoff_time, status))
            self._changed.add(dest.key)
            if dest.idle(ended):  # (the common case: one message's job) forgotten now, with no turn in `_pump`
                self._forget(dest)
            else:
                self._mark(dest)
            if dest.dead_until:  # dead: looked at again when the timer runs out (revived, or forgotten)
                self._wake_for(dest, dest.dead_until)
            if dest.resume_at > ended:  # a rate delay: the loop wakes when it is over (a paused destination is kept)
                self._wake_for(dest, dest.resume_at)
        if len(report.results) <= REPORT_SLICE:
            self._job_done(job, report, started, ended, recorded)
        else:
            self._spawn(self._job_done_in_slices(job, report, started, ended, recorded))
        self._pump()

    def _forget(self, dest: Destination) -> None:
        """An idle destination is forgotten (a new one is made when mail for it comes)."""
        if self._destinations.get(dest.key) is dest:
            del self._destinations[dest.key]

    def _wake_for(self, dest: Destination, when: float) -> None:
        """`dest` is to be looked at again at `when` (its pause or its dead timer ends): the loop's sleep ends then."""
        heapq.heappush(self._timers, (when, dest.key))
        if when < self._sleeping_until:
            self._wakeup.set()  # (it sleeps longer: a new turn sleeps until `when`)

    def _program(self, result: RcptResult) -> str:
        """The program a result's line is logged as: its delivery agent's (Postfix's agents log their own results;
        the one it names, `RcptResult.program`, when its agent passed the recipient on to another), qmgr for one
        qmgr made itself (no agent had the job: a suspended destination), the one it names when qmgr made it
        for another (error, for a transport that is not defined)."""
        transport = self._transports.get(result.transport) if result.stats is not None else None
        if transport is None:
            return result.program or "qmgr"
        return result.program or transport.program

    def _job_done(self, job: Job, report: DeliveryReport, handoff: float = 0.0, done: float = 0.0,
                  taken: Collection[int] = ()) -> None:
        """A job's report: from its delivery agent, handed the job at `handoff`, back at `done`; or qmgr's own
        (0.0: no agent had it). `taken`: the recipients (indexes) whose results are in already: recorded as they
        came, or taken with an earlier slice (`_job_done_in_slices`)."""
        active = self._active[job.queue_id]
        active.jobs_left -= 1
        stats = active.stats._replace(handoff=handoff, done=done) if handoff else None
        results = _complete(job, report, stats, taken)
        self._results_in(active, results)

    async def _job_done_in_slices(self, job: Job, report: DeliveryReport, handoff: float, done: float,
                                  recorded: set[int]) -> None:
        """`_job_done` of a report of more than REPORT_SLICE results, that many a loop turn (a job of 50 000
        recipients' report held the loop 0.3 s): each slice's results in as those of a job under way, the job done
        with the last (and the recipients the agent did not mention), so its message cannot finish before. A task
        of its own, not the delivery's: a stop's cancel of deliveries does not cut it off after the delivery."""
        active = self._active[job.queue_id]
        stats = active.stats._replace(handoff=handoff, done=done)
        mine = {r.index: r for r in job.recipients}
        taken = set(recorded)  # recorded as they came, or taken in with a slice: not the last one's (`_complete`)
        results = report.results
        for start in range(0, len(results) - REPORT_SLICE, REPORT_SLICE):
            part = _first_of_each(job, mine, results[start:start + REPORT_SLICE], stats, taken)
            self._results_in(active, part)
            await asyncio.sleep(0)
        self._job_done(job, DeliveryReport(results[start + REPORT_SLICE:]), handoff, done, taken)

    def _settled_in(self, active: ActiveMessage, job: Job, settled: list[RcptResult], handoff: float,
                    recorded: set[int]) -> None:
        """A job a stop cut off: the results its agent said were final (`settled`) and not recorded yet go in as
        those of a job under way (recorded within the stop's RECORD_GRACE); the job is not done, so its message
        stays active and its other recipients pending, taken again after the next start."""
        stats = active.stats._replace(handoff=handoff, done=self._clock.time())
        results = _first_of_each(job, {r.index: r for r in job.recipients}, settled, stats, recorded)
        if results:
            self._results_in(active, results)

    def _settled_late(self, active: ActiveMessage, job: Job, late: Callable[[], Awaitable[list[RcptResult]]],
                      handoff: float, recorded: set[int]) -> None:
        """Results of work a stop cut off, to come (`DeliveryRequest.settled_late`): waited for in a task of the
        stop's records, LATE_RESULT_GRACE s at most (and no longer than they are: cancelled with them), then in as
        `_settled_in` takes them; past that the work is cut off (its recipients stay queued, as the warning says)."""
        async def settled() -> None:
            try:
                results = await asyncio.wait_for(late(), LATE_RESULT_GRACE)
            except TimeoutError:
                return
            self._settled_in(active, job, results, handoff, recorded)
        self._spawn(settled())

    async def _deliver(self, active: ActiveMessage, job: Job, handoff: float, recorded: set[int],
                       settled: list[RcptResult]) -> DeliveryReport:
        """The agent's report; an agent that delivers its recipients one after another (`delivers_each`) has each
        result but the job's last recorded as it comes (`_each_result`), its index added to `recorded`. What the
        agent says is final meanwhile (`DeliveryRequest.settled`, and the last of `_each_result`) goes in
        `settled`, for a stop that cuts the job off."""
        msg = active.message
        transport = self._transports.get(job.transport)
        if transport is None:
            return _undefined_transport(job.transport, job.recipients)
        try:
            content = await self._content(active)
        except Exception as e:
            log.error("%s: cannot read the queued content: %s", msg.queue_id, e)
            return DeliveryReport.uniform(job.recipients, Outcome.DEFERRED, "4.3.0", f"queue file read error: {e}")
        if content is None:
            return DeliveryReport.uniform(job.recipients, Outcome.DEFERRED, "4.3.0", "queue file content missing")
        request = DeliveryRequest(msg.queue_id, msg.sender, job.recipients, job.nexthop, content,
                                  msg.smtputf8, msg.body_type, msg.arrival, envid=msg.envid, ret=msg.ret,
                                  queued_for=max(0.0, self._clock.time() - msg.arrival),
                                  client_attributes=msg.client_attributes, on_settled=settled.extend,
                                  on_late=lambda late: self._settled_late(active, job, late, handoff, recorded))
        try:
            if not getattr(transport, "delivers_each", False) or len(job.recipients) == 1:
                report = await transport.deliver(request)
            else:
                async with contextlib.aclosing(transport.deliver_each(request)) as results:
                    report = await self._each_result(active, job, results, handoff, recorded, settled)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._agent_failed(job.transport, msg.queue_id, e)
            return DeliveryReport.uniform(job.recipients, Outcome.DEFERRED, "4.3.0",
                                          f"delivery agent {job.transport} failed: {e}")
        if job.transport in self._agent_faults:
            self._agent_faults[job.transport].succeeded()
        return report

    def _agent_failed(self, transport: str, queue_id: str, error: Exception) -> None:
        """A delivery agent that raised: each kind of error is logged with its traceback (a probable bug) when it was
        not seen for a minute, the other failures (every message it is given while it keeps failing, or each bad
        message among good ones) counted and told once a minute (faults.ErrorKindLog), as Postfix's master
        throttles a service whose processes keep dying, not a traceback per message; each recipient's deferred line
        names the error."""
        faults = self._agent_faults.get(transport)
        if faults is None:  # (kept while the server runs: one per transport that ever raised)
            faults = self._agent_faults[transport] = ErrorKindLog(
                log, f"qmgr: delivery agent {transport}", self._clock)
        faults.failed(error, queue_id)

    async def _each_result(self, active: ActiveMessage, job: Job, results: AsyncIterator[RcptResult],
                           handoff: float, recorded: set[int], settled: list[RcptResult]) -> DeliveryReport:
        """Each result of `job` as its agent gives it, handed to `_results_in` while others are still to come, as
        Postfix's local(8) and virtual(8) cross each recipient off the queue file as it is delivered
        (deliver_completed): a stop or a crash repeats only the recipients whose results were not committed yet.
        The last one comes back in the report, to go with the job's end (for a one-recipient job, or the message's
        last job, with the end of the attempt). The loop is handed back every RESULT_SLICE results: a local job
        has no recipient limit, and 100 000 unknown users, each answered at once, held it 6.6 s. The last result is
        also put in `settled`: a stop's cancel that lands while the agent ends (after that result, before the
        report) records it all the same (`_settled_in`), as it does what an agent reporting in one go (`deliver`:
        the SMTP and LMTP clients) said was final before the cancel."""
        expected = len(job.recipients)
        mine = {r.index: r for r in job.recipients}  # (once a job: an agent gives up to all of them)
        last: list[RcptResult] = []
        taken = 0
        async for given in results:
            if _is_for(mine, given) and given.recipient.index not in recorded:
                if len(recorded) + 1 == expected:
                    last.append(given)
                    settled.append(given)  # (a stop's cancel while the agent ends: recorded all the same)
                else:
                    recorded.add(given.recipient.index)
                    stats = active.stats._replace(handoff=handoff, done=self._clock.time())
                    self._results_in(active, [_stamp(job.transport, given, stats)])
            taken += 1
            if taken % RESULT_SLICE == 0:  # (an agent whose results need no wait would hold the loop for all)
                await asyncio.sleep(0)  # after the result is in: a stop's cancel here loses none
        return DeliveryReport(tuple(last))

    async def _content(self, active: ActiveMessage) -> Content | None:
        if active.content is None:
            active.content = asyncio.ensure_future(self._store.content(active.message.queue_id))
        return await active.content

    # -- recording results as jobs end ---------------------------------------------------------------
    def _results_in(self, active: ActiveMessage, results: list[RcptResult]) -> None:
        """Results back from an agent: recorded at once when no record of the message is being written, else
        together in the next one, after it (one record in flight a message). Once every job is back, those not
        recorded go with the end of the attempt, in one transaction (a single-destination message costs one
        write). Under soft_bounce a failure is made 4.X.X here, as each comes in (`_soft_bounced`). A record, or
        the end, takes RECORD_SLICE results at most (the rest go in the records after it): each result's line
        and notice check cost the loop about 30 us, and 100 000 of them came back together. Those of a message the
        poll saw deleted are not recorded: they wait for the end, which logs them all (`_finish`)."""
        active.unrecorded.extend(map(_soft_bounced, results) if self._soft_bounce else results)
        if active.recording or active.finishing:
            return
        deleted = active.withdrawn == "deleted"
        if active.jobs_left == 0 and (deleted or len(active.unrecorded) <= RECORD_SLICE):
            batch, active.unrecorded = active.unrecorded, []
            active.finishing = True
            self._spawn(self._finish(active, batch))
        elif active.unrecorded and not deleted:
            batch = active.unrecorded[:RECORD_SLICE]
            del active.unrecorded[:RECORD_SLICE]
            active.recording = True  # before the write starts, so the message cannot finish before it
            self._spawn(self._record(active, batch))

    async def _record(self, active: ActiveMessage, results: list[RcptResult]) -> None:
        msg = active.message
        rows = [(r, self._owes_notice(r)) for r in results]
        stored = [(r, owed and r.outcome is not Outcome.DEFERRED) for r, owed in rows]  # (`_owes_notice`)
        try:
            await self._writes.run(lambda: self._store.record_results(msg.queue_id, stored),
                                   f"{msg.queue_id}: recording delivery results")
        finally:
            active.recording = False
        self._log_results(active, results, self._clock.time())
        active.deferred.extend(r for r in results if r.outcome is Outcome.DEFERRED)
        active.owed.extend(r for r, owed in rows if owed)
        self._results_in(active, [])  # those that came meanwhile, or the end of a finished attempt

    # -- the end of an attempt ------------------------------------------------------------------------
    async def _finish(self, active: ActiveMessage, last: list[RcptResult]) -> None:
        """The end of the attempt; `last`: its results not recorded yet (the last job's, and those that waited)."""
        msg = active.message
        retry_at = None
        try:
            missing = _content_missing(active)  # (a settled future: the answer stays)
            if active.withdrawn == "deleted" or (missing and await self._queue_state(msg) is None):
                if not missing:  # what the agents did is logged, as Postfix's agent logs its status= line
                    await self._log_in_slices(active, last)
                return  # deleted by an operator: nothing to record; the queue tool logged postsuper's `removed`
            if missing:
                await self._writes.run(lambda: self._store.mark_corrupt([msg.queue_id]))
                self._log.corrupt(msg.queue_id, "content missing")
            else:
                retry_at = await self._conclude(active, last)
        finally:
            self._let_go(active, retry_at)

    async def _log_in_slices(self, active: ActiveMessage, results: list[RcptResult]) -> None:
        """The lines of a deleted message's results (none recorded: `_results_in` keeps them all for the end),
        RECORD_SLICE a loop turn."""
        await in_slices(results, lambda part: self._log_results(active, part, self._clock.time()), RECORD_SLICE)

    def _let_go(self, active: ActiveMessage, retry_at: float | None) -> None:
        """The message leaves qmgr's hands (the end of its attempt recorded, or a stop); one whose row a scan
        claimed again meanwhile and that stays queued is given back."""
        queue_id = active.message.queue_id
        self._active.pop(queue_id, None)
        self._handed_bytes -= active.handed_bytes
        if self._let_go_in_take is not None:  # (a take under way may have read it before this end: stale)
            self._let_go_in_take[queue_id] = retry_at is not None
        if active.reclaimed and retry_at is not None:
            self._start_give_back(queue_id, retry_at)
        if self._room_was_short:  # the last scan left due mail behind for want of room: there is some now
            self._rouse()

    def _start_give_back(self, queue_id: str, retry_at: float) -> None:
        """`_give_back` in a task of its own, the message counted in `taken_count` (once, however many give-backs
        of it are under way) until its write is done."""
        self._giving_back[queue_id] = self._giving_back.get(queue_id, 0) + 1
        self._spawn(self._give_back(queue_id, retry_at))

    def _gave_back(self, queue_id: str) -> None:
        left = self._giving_back.pop(queue_id) - 1
        if left:
            self._giving_back[queue_id] = left

    async def _give_back(self, queue_id: str, retry_at: float) -> None:
        """A message a scan claimed again during its attempt (`_released_in_hand`), let go of: if that claim came
        after the end's write, the row is still active and nothing holds it (nothing would take it before a
        restart); it is deferred until `retry_at` as the end meant to (a write that changes nothing otherwise),
        after `_finish` let go, so that no scan can take it while it is still in hand. It stops counting as the write
        returns, not in a done callback: a scan whose take the same commit answered would run first and find it
        still being given back (`_claimed_stale`), and give it back again."""
        try:
            await self._writes.run(lambda: self._store.give_back(queue_id, retry_at),
                                   f"{queue_id}: deferring a message released during its attempt")
        finally:
            self._gave_back(queue_id)
        self._next_scan = min(self._next_scan, retry_at)
        self._rouse()

    async def _conclude(self, active: ActiveMessage, last: list[RcptResult]) -> float | None:
        """Defer or remove the message, and queue the notices its results owe, in one transaction. Returns the time
        it is deferred to (None: removed, or deleted meanwhile). Then its lines: the results as the agents gave them
        (deferred ones too, as Postfix logs them); for a message past its lifetime Postfix's qmgr line,
        `from=<s>, status=expired, returned to sender`, which log tools count as returned, and the recipients it
        returns (bounced, "message expired: …": the metrics and the capture histories count them as final) told to
        the observers without a line of their own, as Postfix writes none, RECORD_SLICE a loop turn (100 000 told in
        one turn held the loop about 1 s; a stop's cancel between two slices loses what was not told or logged yet,
        the end being recorded already); then `_log_end`'s. A message that has not expired adds no await."""
        msg = active.message
        now = self._clock.time()
        q = self._config
        lifetime = q.bounce_queue_lifetime if not msg.sender else q.maximal_queue_lifetime
        pending = active.deferred + [r for r in last if r.outcome is Outcome.DEFERRED]
        held = active.withdrawn == "hold"  # the operator's hold wins: nothing expires, nobody is told
        age = now - msg.lifetime_base
        expired = [] if held or age < lifetime else await _expire_in_slices(pending)
        warn = bool(pending and not expired and not held and q.delay_warning_time and not msg.warned
                    and now - msg.arrival >= q.delay_warning_time)
        owed = active.owed + [r for r in last if self._owes_notice(r)]
        if expired or warn or owed:  # a notice to queue: the operator may have held or deleted it, unpolled yet
            state = await self._queue_state(msg)
            if state is None:  # deleted: nothing recorded, nobody told, the lines logged (as for a delete the
                self._log_results(active, last, now)  # poll saw: `_finish`)
                return None
            if state not in STILL_QUEUED:  # (held, requeued, set aside; a release during the attempt: as never held)
                held, expired, warn = True, [], False
        if expired:
            pending = []
        retry_at = None
        if pending and active.suspended:
            retry_at = now  # released (due now) after the hold kept recipients from this attempt: not tried yet
        elif pending:
            retry_at = next_attempt(now, msg.lifetime_base, q.minimal_backoff_time, q.maximal_backoff_time,
                                    jitter=JITTER, rng=self._rng)
        told = list({id(r): r for r in owed + expired + (pending if warn else [])}.values())  # (owed and pending)
        notices = await self._make_notices(active, told, now, warn, msg.lifetime_base + lifetime)
        done = Delivered(msg.queue_id, retry_at, warned=msg.warned or warn, expired=tuple(expired),
                         noticed=tuple(r.recipient.index for r in active.owed))
        there = await self._writes.run(lambda: self._store.finish(done, [n for _, n in notices], results=last),
                                       f"{msg.queue_id}: recording the end of the attempt")
        self._log_results(active, last, now)
        if expired:  # (Postfix's qmgr line, then the observers told of the recipients it returns, in slices)
            self._log.expired(msg.queue_id, msg.sender)
            await in_slices(expired, lambda part: self._tell_expired(active, part, now), RECORD_SLICE)
        self._log_end(active, [*last, *expired], notices, retry_at, gone=not there)
        if notices:  # new mail queued with the end of the attempt: the next scan takes it
            self._rouse()
        if retry_at is not None and retry_at < self._next_scan:
            self._next_scan = retry_at
            self._rouse()  # the loop sleeps until the scan it knew of: it must look again
        return retry_at

    def _owes_notice(self, result: RcptResult) -> bool:
        return _owes_notice(result, self._config.notify_classes)

    async def _queue_state(self, msg: QueuedMessage) -> str | None:
        """The message's queue now (an operator may have held or deleted it meanwhile); None: gone."""
        states = await self._writes.run(lambda: self._store.queue_states([msg.queue_id]))
        return states.get(msg.queue_id)

    async def _make_notices(self, active: ActiveMessage, results: list[RcptResult], now: float, warn: bool,
                            retry_until: float):
        if self._notices is None or not results:
            return []
        with self._making_notices.one():  # (the notices' templates in force now, held until it is made)
            try:
                original = await self._content(active) or Content()
            except Exception:
                original = Content()  # the notice still says what happened, without the original
            return await self._notices.for_attempt(active.message, results, original=original, now=now,
                                                   warn_delay=warn, retry_until=retry_until)

    def _log_end(self, active: ActiveMessage, results: list[RcptResult], notices, retry_at: float | None, *,
                 gone: bool = False) -> None:
        """The lines after an attempt's results and expiry (`_conclude`): a notice discarded for `results` (the
        expired ones too), the notices queued, `removed` (retry_at None), or, when the store had no message left
        to remove or defer (`gone`: an operator deleted it first, and the tool logged postsuper's `removed`), a
        warning as Postfix's qmgr_active_done and qmgr_active_defer give for a queue file that is gone, not a
        second `removed`."""
        msg = active.message
        if self._notices is not None and self._notices.discards(msg, results):
            self._log.notice_discarded(msg.queue_id)
        for notice, queued in notices:  # (cleanup's message-id line first, as Postfix's bounce(8) has it written)
            head = queued.content.parts[0]
            if self._log.active and isinstance(head, bytes):
                self._log.message_id(queued.queue_id, header_value(head, "message-id"))
            self._log.notice(msg.queue_id, notice.kind, queued.queue_id, postmaster=notice.postmaster_copy)
            self._log.queued(queued.queue_id, queued.sender, queued.content.size, len(queued.recipients))
        if gone:
            self._log.gone(msg.queue_id, deferred=retry_at is not None)
        elif retry_at is None:
            self._log.removed(msg.queue_id)

    def _tell_expired(self, active: ActiveMessage, expired: Iterable[RcptResult], now: float) -> None:
        """The observers told of `expired` results, with no line of their own (`_conclude`)."""
        for result in expired:
            self._log.result(active.message.queue_id, result, active.stats, now, logged=False)

    def _log_results(self, active: ActiveMessage, results: list[RcptResult], now: float) -> None:
        """Each result's line (a line per failure told to a list's owner, `_owned_lines`), timed by its job's
        stats (the attempt's when no agent had the job)."""
        for result in results:
            for line in _owned_lines(result):
                self._log.result(active.message.queue_id, line, result.stats or active.stats, now,
                                 program=self._program(result))


_NOTICE_KIND = {Outcome.SENT: "success", Outcome.BOUNCED: "failure"}


def _postfix_order(rcpt: Recipient) -> bytes:
    """Postfix 3.7's qmgr_message_sort_compare within one destination: addresses with an `@` first, by the domain
    (from the last `@`) as strcasecmp_utf8 compares it (ASCII letters folded; a UTF-8 domain case-folded, as
    Postfix with smtputf8_enable, which mailflow always is), then by the whole address byte for byte (strcmp: the
    local part's case counts, `C@x` before `a@x`); addresses without an `@` last, byte for byte. One bytes value,
    NUL-separated as C strings end (a tuple's comparisons made the sort of 100 000 recipients 4 times slower)."""
    address = rcpt.address.encode("utf-8", "surrogateescape")
    at = rcpt.address.rfind("@")
    if at < 0:
        return b"\x01" + address
    domain = rcpt.address[at:]
    folded = domain.lower() if domain.isascii() else domain.casefold()
    return b"\x00" + folded.encode("utf-8", "surrogateescape") + b"\x00" + address


async def _order_in_slices(keys: list[bytes]) -> list[int]:
    """The indexes of `keys` in the keys' order (as `sorted`: equal keys keep theirs), ORDER_SLICE a loop turn:
    runs of that many sorted one a turn, then merged that many a turn (one sort of 100 000 took 0.1 s loaded)."""
    runs = []
    for start in range(0, len(keys), ORDER_SLICE):
        runs.append(sorted(range(start, min(start + ORDER_SLICE, len(keys))), key=keys.__getitem__))
        await asyncio.sleep(0)
    merged = heapq.merge(*runs, key=keys.__getitem__)  # (stable: a tie goes to the earlier run)
    order: list[int] = []
    while len(order) < len(keys):
        order.extend(islice(merged, ORDER_SLICE))
        await asyncio.sleep(0)
    return order


async def _close_together(transports: list[tuple[str, Transport]], ended: list | None = None) -> None:
    """Every (name, transport)'s close at once: each bounds its own wait (local's for a /file append under way: the
    stop's grace), so N of them take one grace, not N. A close that fails (or is cancelled on its own) is logged
    once with the transport's name and raises nothing: the others close, and a stop goes on to the postmaster
    transcripts and the store. Each transport whose close ended, failed or not, is added to `ended`. When the
    caller is cancelled, the closes under way are cancelled too, are not in `ended`, and the CancelledError goes
    on to the caller."""
    closes = [asyncio.ensure_future(transport.close()) for _, transport in transports]
    cancelled = True  # (until the closes all ended with the caller still running)
    try:
        await asyncio.gather(*closes, return_exceptions=True)
        cancelled = False
    finally:
        for (name, transport), close in zip(transports, closes):
            if not close.done():
                close.cancel()
            elif not close.cancelled() or not cancelled:
                _log_close_failure(name, close)
                if ended is not None:
                    ended.append(transport)


def _log_close_failure(name: str, close: asyncio.Future) -> None:
    if close.cancelled():
        log.warning("transport %s: close cancelled", name)
    elif (failure := close.exception()) is not None:
        log.warning("transport %s: close failed: %s", name, describe(failure))


def _named(transports: dict) -> list[tuple[str, Transport]]:
    """Each transport once, named by every service it runs (`smtp/relay`: smtp and relay are one object)."""
    names: dict[int, list[str]] = {}
    objects: dict[int, Transport] = {}
    for name, transport in transports.items():
        names.setdefault(id(transport), []).append(name)
        objects[id(transport)] = transport
    return [("/".join(names[key]), transport) for key, transport in objects.items()]


def _unique_named(transports: list[tuple[str, Transport]]) -> list[tuple[str, Transport]]:
    """Each transport once, under the first name it has in `transports`."""
    first: dict[int, tuple[str, Transport]] = {}
    for name, t in transports:
        first.setdefault(id(t), (name, t))
    return list(first.values())


def _suspended(status: str, reason: str, recipients: tuple[Recipient, ...]) -> DeliveryReport:
    """What a dead destination answers for the recipients of a job (or a probe) it will not attempt: the status
    and reason of the failure that killed it, as Postfix's qmgr keeps them (queue->dsn: `4.7.1` after a refused
    greeting, `4.4.2` after a lost connection). A deferral is a 4.x.x: any other status becomes 4.0.0, with
    Postfix's warning when there was one (defer.c); no reason is Postfix's "unknown error" (qmgr_deliver.c)."""
    dsn = status
    if dsn[:1] != "4":
        if dsn:
            log.warning('defer_append: ignoring dsn code "%s"', dsn)
        dsn = "4.0.0"
    text = f"delivery temporarily suspended: {reason or 'unknown error'}"
    return DeliveryReport.uniform(recipients, Outcome.DEFERRED, dsn, text, site_ok=False)


def _undefined_transport(transport: str, recipients: tuple[Recipient, ...]) -> DeliveryReport:
    """What qmgr answers for the recipients of a job (or a probe) routed to a transport that is not defined: as
    Postfix's qmgr for a service master.cf lacks, 4.3.0 "mail transport unavailable", with a warning that names
    it (Postfix's "connect to transport private/NAME: No such file or directory"); each result logged as error's
    (Postfix's qmgr hands such mail to its retry service, error(8), whose line it is)."""
    log.warning("transport %r is not defined (no built-in transport nor [pipe.%s], [smtp.services.%s] or "
                "[lmtp.services.%s])", transport, transport, transport, transport)
    report = DeliveryReport.uniform(recipients, Outcome.DEFERRED, "4.3.0", "mail transport unavailable")
    return dataclasses.replace(report, results=tuple(dataclasses.replace(r, program=UNDEFINED_TRANSPORT_PROGRAM)
                                                     for r in report.results))


def _owned_lines(result: RcptResult) -> list[RcptResult]:
    """A bounced result's failures told to lists' owners (`RcptResult.owned`) as the results their log lines say:
    each about its list, with its own status and text and no orig_to (`to=<l1@…>, relay=local, …, dsn=5.3.0,
    status=bounced (Command died …)`), as local(8) logs each failure its bounce_workaround reports, and log
    tools count them, then the parts delivered (`RcptResult.delivered`) on a `status=sent` line, as local(8) logs
    each delivery; the result itself for the others. A deferred result's failures (parts that bounced while
    another waits for the retry) are logged after it (which names the parts delivered), each `status=bounced`, as
    local(8) logs them at once (under soft_bounce `dsn=4.X.X, status=SOFTBOUNCE`, as Postfix's bounce_append). None
    for a result `unlogged` (nothing delivered: local(8) logs no line)."""
    if result.unlogged:
        return []
    if result.outcome is Outcome.SENT or not result.owned:
        return [result]
    soft = result.outcome is Outcome.DEFERRED and result.soft_bounced  # (its parts' bounces kept by soft_bounce)
    failures = [dataclasses.replace(result, outcome=Outcome.DEFERRED if soft else Outcome.BOUNCED,
                                    recipient=_about(result.recipient, f), dsn=f.dsn, text=f.text,
                                    diagnostic=f.diagnostic, expanded="", owned=(), delivered="")
                for f in result.owned]
    if result.outcome is Outcome.DEFERRED:
        return [dataclasses.replace(result, owned=(), delivered="", soft_bounced=False), *failures]
    if result.delivered:
        failures.append(dataclasses.replace(result, outcome=Outcome.SENT, dsn="2.0.0", text=result.delivered,
                                            diagnostic="", expanded="", owned=(), delivered=""))
    return failures


def _about(rcpt: Recipient, failure: OwnedFailure) -> Recipient:
    """The recipient a failure's log line is about: its list, without orig_to; a failure of no list (told to the
    sender) the member it names, with the recipient as orig_to."""
    if failure.owner:
        return dataclasses.replace(rcpt, address=failure.address, original="", orcpt="")
    return dataclasses.replace(rcpt, address=failure.address, original=rcpt.original or rcpt.address)


def _owes_notice(result: RcptResult, notify_classes: tuple[str, ...]) -> bool:
    """A recipient sent or bounced now whose NOTIFY asks for a notice of that, or bounced with the class bounce in
    notify_classes (the postmaster's copy names every failure, as Postfix's bounce log holds them all): its row
    keeps a flag until the end of the attempt queues the notice. A deferred recipient whose parts bounced (`owned`)
    owes their failure notice at the end of this attempt (its row keeps no flag: the retry repeats them)."""
    kind = "failure" if bounced_parts(result) else _NOTICE_KIND.get(result.outcome)
    if kind == "failure" and "bounce" in notify_classes:
        return True
    return kind is not None and wants_notice(result.recipient, kind)


def _soft_bounced(result: RcptResult) -> RcptResult:
    """Under soft_bounce a recipient that would bounce stays queued: deferred, its status 4.X.X, its text kept
    (Postfix's bounce_append hands it to the defer service instead). Its list failures (`owned`) are dropped: no
    owner is told of a deferral, the next try works them out again, and they are not stored at every retry. A
    deferred recipient's parts that bounced keep their lines, 4.X.X, logged `status=SOFTBOUNCE` as Postfix's
    bounce_append logs each (`soft_bounced` on the deferred result says its `owned` are soft: no notice)."""
    if result.outcome is not Outcome.BOUNCED:
        if not result.owned:
            return result
        return dataclasses.replace(result, soft_bounced=True, owned=tuple(
            f._replace(dsn="4" + f.dsn[1:]) for f in result.owned))
    return dataclasses.replace(result, outcome=Outcome.DEFERRED, dsn="4" + result.dsn[1:], soft_bounced=True,
                               owned=())


def _expire(pending: list[RcptResult]) -> list[RcptResult]:
    """A message past its lifetime gives up: its pending recipients are returned, with their last reason."""
    return [RcptResult(r.recipient, Outcome.BOUNCED, r.dsn, f"{EXPIRED}{r.text}", r.relay,
                       transport=r.transport, diagnostic=r.diagnostic) for r in pending]


async def _expire_in_slices(pending: list[RcptResult]) -> list[RcptResult]:
    """`_expire`, RECORD_SLICE results a loop turn (the 100 000 pending recipients of a message past its lifetime
    took 0.5 s of one turn)."""
    expired: list[RcptResult] = []
    await in_slices(pending, lambda part: expired.extend(_expire(part)), RECORD_SLICE)
    return expired


def _complete(job: Job, report: DeliveryReport, stats: MsgStats | None,
              taken: Collection[int] = ()) -> list[RcptResult]:
    """The report's results for this job's recipients but the `taken` ones (indexes: recorded as they came, or
    taken with an earlier slice), each marked with the job's transport and `stats` (None: no agent had the job,
    they keep theirs), the first of a repeated one only (as `_job_done_in_slices` takes them); one the agent did
    not mention stays queued (4.3.0). (A job whose results were recorded as they came has one here: none is made
    for the others, which for 100 000 recipients held the loop 0.5 s.)"""
    told = set(taken)
    results = _first_of_each(job, {r.index: r for r in job.recipients}, report.results, stats, told)
    results += [RcptResult(r, Outcome.DEFERRED, "4.3.0", "delivery agent reported no result", transport=job.transport,
                           stats=stats) for r in job.recipients if r.index not in told]
    return results


def _first_of_each(job: Job, mine: dict[int, Recipient], results: Iterable[RcptResult], stats: MsgStats | None,
                   taken: set[int]) -> list[RcptResult]:
    """`results` for the job's recipients (`mine`, by index) but those `taken` (indexes), stamped (`_stamp`); a
    recipient's first result only (an agent that repeats one is not believed twice), its index added to `taken`."""
    first: list[RcptResult] = []
    for result in results:
        index = result.recipient.index
        if index not in taken and _is_for(mine, result):
            taken.add(index)
            first.append(_stamp(job.transport, result, stats))
    return first


def _is_for(mine: dict[int, Recipient], result: RcptResult) -> bool:
    """Whether `result` is for one of the job's recipients (`mine`, by index)."""
    return mine.get(result.recipient.index) == result.recipient


def _stamp(transport: str, result: RcptResult, stats: MsgStats | None) -> RcptResult:
    """`result` marked with `transport` and `stats` (None: it keeps its own)."""
    return replaced(result, transport=transport, stats=result.stats if stats is None else stats)


def _content_missing(active: ActiveMessage) -> bool:
    """True when the store had no content for the message (a corrupt entry), not when reading it failed."""
    f = active.content
    return f is not None and f.done() and not f.cancelled() and f.exception() is None and f.result() is None


def _route(content_filter: str, transport: str, nexthop: str) -> tuple[str, str]:
    """Where one recipient goes: its own route, or the message's after-queue filter (Postfix content_filter:
    `transport:nexthop`, the recipient's own next hop when the filter names none)."""
    if not content_filter:
        return transport, nexthop
    filter_transport, _, filter_nexthop = content_filter.partition(":")
    return filter_transport, filter_nexthop or nexthop


Turns = dict[str, dict[tuple[str, str], None]]  # a transport's ready destinations, by the message of their next job


def _take_turn(turns: Turns, dest: Destination, key: tuple[str, str]) -> None:
    """`dest` joins the line of the message its next job is of."""
    head = dest.jobs[0].queue_id if dest.jobs else ""
    group = turns.get(head)
    if group is None:
        group = turns[head] = {}
    group[key] = None


def _queued_forms(message: QueuedMessage, jobs: list[Job]) -> list[Recipient]:
    """The recipients of `jobs` as `message` queued them (a job has the form each resolved to)."""
    queued = {rcpt.index: rcpt for rcpt in message.recipients}
    return [queued[r.index] for job in jobs for r in job.recipients]


def _recipients_at_most(messages: Iterable[QueuedMessage], limit: int) -> bool:
    """Whether the messages have `limit` recipients or fewer in all (counted no further than that): what resolving
    their jobs again costs, `_queued_forms` indexing each one's whole list."""
    count = 0
    for message in messages:
        count += len(message.recipients)
        if count > limit:
            return False
    return True


def _merge_turns(turns: Turns, more: Turns) -> None:
    for head, group in more.items():
        mine = turns.get(head)
        if mine is None:
            turns[head] = group
        else:
            mine.update(group)
