"""`Sink`: mailflow's whole pipeline inside a test suite, on the caller's running loop (no thread).

    async with Sink(config=None, **settings) as sink:   smtpd -> cleanup -> store -> qmgr -> transports, real,
        sink.host, sink.port, sink.smtp_url              listening on 127.0.0.1 port 0; the queue in a temporary
                                                         directory, removed at the end
        await sink.wait_for(to=, sender=, subject=, match=, count=1, timeout=5) -> [CapturedMessage]
        sink.messages, sink.clear(), sink.search(query)
        sink.reject(...), sink.defer(...), sink.slow(s), sink.drop(times), sink.clear_faults()   (inbound)
        sink.destination(domain) -> FakeDestination                                              (outbound)
        await sink.advance(seconds=0, minutes=0, hours=0, days=0)       (virtual_time=True)
        await sink.settle(timeout=30, scan_failure_timeout=30)
                                          until nothing is due now: no message waiting, no delivery running
                                          (mail held only by a destination's timer, a rate delay, or, under
                                          virtual time, by the retry of a record or a queue scan after a store
                                          fault counts as settled)
    Sink.threaded(...) -> ThreadedSink    the same on a loop of its own, in a thread, with blocking methods

Configuration: by default every recipient is accepted and delivered to the `capture` transport (the settings
of mailflow.capture.settings.CAPTURE_EVERYTHING); `config` (a Config, a config.toml path or a dict) replaces
those defaults with the application's own (its routing, aliases, restrictions, limits), and keyword arguments
are settings laid over either (`relay_domains=[...]`, `queue={"delay_warning_time": "1h"}`). Whatever is given,
the Sink sets: `queue_directory` (its temporary directory), the listeners' addresses (127.0.0.1 port 0),
`[smtp] port` (where its fake destinations listen; an [smtp.services.NAME]'s own port too), `[http] listen`
(127.0.0.1 port 0) and `[sink] enable` (with `http_api`). Its own options:
    virtual_time   the server's clock is a mailflow.clock.VirtualClock that moves only in `advance()` (the queue's
                   waits; a client's waits stay real time: slow(), error_sleep_time, auth_failure_delay)
    seed           the server's RNG seed (queue ids, retry jitter, MX order, DMARC pct= samples)
    tls            "may": STARTTLS offered, "encrypt": required before MAIL, with a certificate of a trustme CA
                   made for the Sink (`ca_pem`, `ca_file`); None: no TLS
    users          {login: password}: AUTH required (PLAIN, LOGIN; over plaintext on loopback unless `tls`)
    http_api       serve the capture API (Mailpit's API v1 subset, docs/testing.md) at `http_url`
    shutdown_grace seconds deliveries in flight, and sessions in a transaction, get at stop (then they are cut)
    temporary_root where the temporary directory (queue, certificate, users) is made: by default /dev/shm when
                   there is one (tmpfs: a test's queue needs no durability and its fsyncs cost nothing there),
                   else the system's temporary directory

After `stop` what was captured stays readable (`messages`, `search`, `transcript`, `history`). A Sink never stopped
(a threaded one left to the end of the process, a fixture without teardown) has its directory removed at the
process's exit (a threaded one is stopped first), by the process that started it only, not by a child forked from
it (mailflow.testing.process_exit): in /dev/shm, what a suite leaves behind is memory until the machine restarts.

Failure behaviour: a bad setting raises mailflow.config.ConfigError at start; `wait_for` raises
mailflow.capture.mailbox.WaitTimeout (an AssertionError that lists what did arrive), and RuntimeError at once
when the Sink stops (or has stopped) before enough messages match; `wait_for`, `reject` and `defer` raise
ValueError at once for an address written as a report or a header writes it (`<bob@x.test>`, `Bob <bob@x.test>`:
it would match nothing), naming the address to write; `advance` without
virtual_time raises RuntimeError, by a negative or infinite span ValueError (the clock never goes back);
`settle` raises TimeoutError after `timeout` real seconds (under virtual time also once mail has waited
`scan_failure_timeout` seconds of its clock for a queue scan that keeps failing, or delivery results for a store
that keeps refusing them), naming such a failure, as
`wait_for`'s WaitTimeout does; `advance` rides through such a failure (its retries go on, on the clock); `start`
on a running Sink raises RuntimeError (a stopped one may be started again: a new queue and mailbox, the same
faults).
"""
from __future__ import annotations

import asyncio
import atexit
import math
import os
import random
import re
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable

from mailflow.app import Mailflow
from mailflow.capture.mailbox import CapturedMessage, Criteria, WaitTimeout
from mailflow.capture import search as capture_search
from mailflow.capture.recorders import Capture
from mailflow.capture.settings import CAPTURE_EVERYTHING, merged
from mailflow.clock import Clock, SystemClock, VirtualClock
from mailflow.config import Config, config_from_dict, load_config
from mailflow.faults import FailureLog
from mailflow.model import SessionTranscript
from mailflow.stages.qmgr import QueueManager
from mailflow.store import Store
from mailflow.passwords import hash_password
from mailflow.testing.destinations import Destinations, FakeDestination
from mailflow.testing.faults import InboundFaults, Rule, SinkObserver
from mailflow.testing.process_exit import at_exit_here
from mailflow.testing.threaded import ThreadedSink

# What a Sink adds to the capture-everything settings: no delay after a failed AUTH (tests want the answer).
SINK_DEFAULTS = merged(CAPTURE_EVERYTHING, {"smtpd": {"auth_failure_delay": 0}})
# The clients with a connection cache (its limits in real seconds): under virtual time a next try hours later comes
# moments later in real time, and would reuse a session Postfix's would have closed long before; none is kept.
CACHING_CLIENTS = ("smtp", "lmtp")
FAST_HASH_N = 1024  # scrypt cost of the Sink's users: a test's passwords need no protection
SETTLE_TIMEOUT = 30.0  # real seconds
SCAN_FAILURE_TIMEOUT = 30.0  # seconds of a virtual clock that mail may wait for a failing queue scan in settle()


class Sink:
    """See the module docstring."""

    def __init__(self, config: Config | str | Path | dict | None = None, *, virtual_time: bool = False,
                 seed: int | None = None, tls: str | None = None, users: dict[str, str] | None = None,
                 http_api: bool = False, shutdown_grace: float = 1.0, temporary_root: str | Path | None = None,
                 **settings):
        if tls not in (None, "may", "encrypt"):
            raise ValueError(f"tls={tls!r}: None, 'may' or 'encrypt'")
        self._given = config
        self._settings = settings
        self._tls = tls
        self._users = dict(users or {})
        self._http_api = http_api
        self._grace = shutdown_grace
        self._temporary_root = temporary_root
        self.clock: Clock = VirtualClock(start=time.time()) if virtual_time else SystemClock()
        self._rng = random.Random(seed)
        self.faults = InboundFaults()
        self.server: Mailflow | None = None
        self._told: dict[int, float] = {}  # (virtual time) the runs of failures settle raised for: since, by log
        self.directory: Path | None = None
        self._removal: Callable[[], None] | None = None  # the directory's removal: at stop(), else at the exit
        self.config: Config | None = None
        self.ca_pem: bytes | None = None
        self.ca_file: str | None = None
        self._destinations: Destinations | None = None
        self.host = ""
        self.port = 0

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> "Sink":
        if self.directory is not None:  # a second server would be left running, unreachable, at stop()
            raise RuntimeError("the Sink is running already: stop() it before starting it again")
        root = self._temporary_root or _fast_temporary_directory()
        self.directory = Path(tempfile.mkdtemp(prefix="mailflow-sink-", dir=root))
        self._removal = at_exit_here(partial(shutil.rmtree, str(self.directory), ignore_errors=True))
        try:
            try:
                self._destinations = Destinations()
            except OSError:  # not Linux (127.0.0.2 is not ours): no fake destinations
                self._destinations = None
            self.config = config_from_dict(self._settings_data(), "Sink")
            capture = Capture(self.config.sink, self.clock, session_observer=SinkObserver(
                self.faults, limit=self.config.sink.history_limit, line_limit=self.config.sink.transcript_line_limit,
                byte_limit=self.config.sink.transcript_byte_limit))
            self._told = {}
            server = self.server = Mailflow(self.config, clock=self.clock, rng=self._rng, capture=capture,
                                            resolver=self._destinations.resolver if self._destinations else None,
                                            smtpd_policy=self.faults, shutdown_grace=self._grace)
            await server.start()
        except BaseException:
            await self.stop()
            raise
        self.host, self.port = server.smtp_addresses[0][:2]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            if self.server.capture is not None:  # what it holds stays readable; waits end at once
                self.server.capture.mailbox.close()
        if self._destinations is not None:
            await self._destinations.stop()
            self._destinations = None
        if self._removal is not None:
            atexit.unregister(self._removal)
            self._removal()
            self._removal = self.directory = None

    async def __aenter__(self) -> "Sink":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @classmethod
    def threaded(cls, *args, **kwargs) -> ThreadedSink:
        """The same Sink on its own loop in a thread, behind blocking methods (mailflow.testing.threaded)."""
        return ThreadedSink(cls, *args, **kwargs)

    # -- configuration --------------------------------------------------------------------------------------

    @property
    def _folder(self) -> Path:
        """The temporary directory (made by start())."""
        if self.directory is None:
            raise RuntimeError("the Sink is not running")
        return self.directory

    def _settings_data(self) -> dict:
        given = self._given
        if given is None:
            base = SINK_DEFAULTS
        elif isinstance(given, Config):
            base = given.model_dump()
        elif isinstance(given, dict):
            base = config_from_dict(given, "Sink(config=...)", base=Path.cwd()).model_dump()
        else:
            base = load_config(given).model_dump()
        if isinstance(self.clock, VirtualClock):  # hours pass between tries: no session is kept for the next
            base = merged(base, _for_every_client(merged(base, self._settings), {"connection_cache_time_limit": 0},
                                                  CACHING_CLIENTS))
        data = merged(base, self._settings)
        smtpd = data.get("smtpd", {})
        listeners = [{**listener, "address": "127.0.0.1:0"} for listener in smtpd.get("listeners", [])]
        forced = {
            "queue_directory": str(self._folder / "queue"),
            "smtpd": {"listen": ["127.0.0.1:0"] if smtpd.get("listen", True) or not listeners else [],
                      "listeners": listeners},
            "http": {"listen": ["127.0.0.1:0"]},
            "sink": {"enable": self._http_api},
        }
        if self._destinations is not None:
            forced.update(_for_every_client(data, {"port": self._destinations.port}))
        return merged(data, forced, self._tls_settings(), self._auth_settings())

    def _tls_settings(self) -> dict:
        if self._tls is None:
            return {}
        import trustme  # mailflow[testing]: only a Sink with TLS needs it

        ca = trustme.CA()
        pem = self._folder / "smtpd.pem"
        ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
        self.ca_pem = ca.cert_pem.bytes()
        self.ca_file = str(self._folder / "ca.pem")
        ca.cert_pem.write_to_path(self.ca_file)
        return {"smtpd": {"tls_cert_file": str(pem), "tls_key_file": "", "tls_security_level": self._tls}}

    def _auth_settings(self) -> dict:
        if not self._users:
            return {}
        table = self._folder / "users"
        table.write_text("".join(f"{user} {hash_password(password, n=FAST_HASH_N)}\n"
                                 for user, password in self._users.items()))
        return {"smtpd": {"sasl_auth_enable": True, "sasl_auth_required": True,
                          "sasl_user_maps": [f"texthash:{table}"],
                          "allow_plaintext_auth_on_loopback": self._tls is None}}

    # -- where ----------------------------------------------------------------------------------------------

    @property
    def smtp_url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    @property
    def http_url(self) -> str | None:
        """The capture API's base URL (`http_api=True`), else None."""
        if self.server is None or self.server.http is None or not self.server.http.addresses:
            return None
        host, port = self.server.http.addresses[0]
        return f"http://{host}:{port}"

    # -- captured messages ----------------------------------------------------------------------------------

    @property
    def _server(self) -> Mailflow:
        if self.server is None:
            raise RuntimeError("the Sink is not running")
        return self.server

    @property
    def _queue(self) -> tuple[Store, QueueManager]:
        store, qmgr = self._server.store, self._server.qmgr
        if store is None or qmgr is None:
            raise RuntimeError("the Sink is not running")
        return store, qmgr

    @property
    def _capture(self) -> Capture:
        if self._server.capture is None:
            raise RuntimeError("the Sink is not running")
        return self._server.capture

    @property
    def messages(self) -> list[CapturedMessage]:
        return self._capture.mailbox.messages

    def clear(self) -> None:
        self._capture.mailbox.clear()

    def search(self, query: str) -> list[CapturedMessage]:
        """The messages matching a Mailpit search (mailflow.capture.search)."""
        terms = capture_search.parse(query)
        return [m for m in self.messages if capture_search.matches(terms, m)]

    async def wait_for(self, *, to: str | None = None, sender: str | None = None,
                       subject: str | re.Pattern | None = None, match: Callable[[CapturedMessage], bool] | None = None,
                       count: int = 1, timeout: float = 5.0) -> list[CapturedMessage]:
        """The matching messages once at least `count` are here (mailbox.Criteria says how each criterion
        matches); WaitTimeout, listing what did arrive, after `timeout` seconds, naming the queue scan's failure
        when the last scan failed (the mail it would take waits for it)."""
        criteria = Criteria(to=to, sender=sender, subject=subject, match=match)
        try:
            return await self._capture.mailbox.wait(criteria, count, timeout)
        except WaitTimeout as e:
            qmgr = self.server.qmgr if self.server is not None else None
            failure = qmgr.scan_failure if qmgr is not None else None
            if failure is None:
                raise
            raise WaitTimeout(f"{e}\n  the queue's mail waits for it: {failure.describe_run()}") from None

    def transcript(self, queue_id: str) -> SessionTranscript | None:
        """The SMTP session that submitted `queue_id` (also for mail that was not captured)."""
        return self._capture.session_observer.get(queue_id)

    def history(self, queue_id: str) -> list:
        """The queue's events for `queue_id` (also for mail that was not captured)."""
        return self._capture.history.events(queue_id)

    # -- inbound faults -------------------------------------------------------------------------------------

    def reject(self, **rule) -> Rule:
        """A 5xx at "mail", "rcpt" (default) or "data": rcpt=, sender= (patterns), code=550, text=, at=, times=."""
        return self.faults.reject(**rule)

    def defer(self, **rule) -> Rule:
        """A 4xx (451 by default), like `reject`; with times=N the N+1st try is accepted."""
        return self.faults.defer(**rule)

    def slow(self, seconds: float) -> None:
        """Every MAIL, RCPT and end-of-DATA reply comes `seconds` later (0: on time again)."""
        self.faults.slow(seconds)

    def drop(self, times: int = 1) -> None:
        """The next `times` messages: the server hangs up after its 354 to DATA, while the content comes."""
        self.faults.drop(times)

    def clear_faults(self) -> None:
        self.faults.clear()

    # -- outbound: fake destinations ------------------------------------------------------------------------

    def destination(self, domain: str) -> FakeDestination:
        """A fake remote destination for `domain` (see mailflow.testing.destinations); mail the server routes
        to the smtp transport for it reaches this peer."""
        if self._destinations is None:
            raise RuntimeError("fake destinations need a running Sink on Linux (every 127.0.0.0/8 address local)")
        return self._destinations.add(domain)

    # -- time -----------------------------------------------------------------------------------------------

    async def settle(self, timeout: float = SETTLE_TIMEOUT, *,
                     scan_failure_timeout: float = SCAN_FAILURE_TIMEOUT) -> None:
        """Until nothing is due now: no message incoming, none deferred and due, no delivery or record under way
        (but, under virtual time, records waiting to retry a write the store refused: in real time they are waited
        for, as their retries come by themselves), and the active messages (if any) waiting only for
        a destination's timer (its rate delay's pause), so that nothing happens before the clock moves. Mail incoming
        or due while a failed queue scan waits for its retry time waits for the clock too under virtual time (only
        advance() moves it); in real time it is waited for (qmgr woken), as the clock ends the wait by itself.
        Raises TimeoutError after `timeout` real seconds, naming the queue scan's failure when mail waits for a scan
        that keeps failing; under virtual time, where settle counts that mail as settled (advance() steps to the
        scan's retries), also once the scans have failed for `scan_failure_timeout` seconds of its clock (once for a
        run of failures: the next settle goes on, so a test that ends the fault sees its mail go); the same for
        records the store keeps refusing (named too when `timeout` ends a real-time settle)."""
        await self._settle(timeout, scan_failure_timeout)

    async def _settle(self, timeout: float, scan_failure_timeout: float | None) -> None:
        """settle(); `scan_failure_timeout` None: mail may wait for a failing scan as long as it lasts (advance)."""
        store, qmgr = self._queue
        clock = self._server.clock
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        quiet = 0
        while True:
            await asyncio.sleep(0)
            counts = await store.counts()
            due = await store.next_due_time()
            # (mail incoming or due waits for the scan's retry time, if only advance() brings it)
            scan_waits = qmgr.scan_backing_off and isinstance(clock, VirtualClock)
            failure = qmgr.scan_failure
            held = bool(counts.get("incoming", 0) or (due is not None and due <= clock.time()))
            if (scan_waits and held and failure is not None and scan_failure_timeout is not None
                    and self._lasted(failure, scan_failure_timeout)):
                raise TimeoutError(f"the queue did not settle within {scan_failure_timeout:g}s of its clock: mail "
                                   f"waits for the queue scan: {failure.describe_run()}; {_nonzero(counts)}")
            # delivery results the store refused wait for their retry: under virtual time for the clock alone
            records = qmgr.record_failure
            virtual = isinstance(clock, VirtualClock)
            if (virtual and records is not None and scan_failure_timeout is not None
                    and self._lasted(records, scan_failure_timeout)):
                raise TimeoutError(f"the queue did not settle within {scan_failure_timeout:g}s of its clock: delivery "
                                   f"results wait to be recorded: {records.describe_run()}; {_nonzero(counts)}")
            incoming = counts.get("incoming", 0) and not scan_waits
            busy = (qmgr.working or incoming or not _waits_for_time(qmgr, counts.get("active", 0))
                    or (records is not None and not virtual))  # in real time the retry comes by itself
            due_now = due is not None and due <= clock.time() and not scan_waits
            if not busy and not due_now:
                quiet += 1
                if quiet >= 2:  # twice in a row: a wake-up in flight has had its turn
                    return
                continue
            quiet = 0
            if due_now and not qmgr.working:
                qmgr.wake()
            if loop.time() > deadline:
                why = "".join(f"; {run.describe_run()}" for run in (failure, records) if run is not None)
                raise TimeoutError(f"the queue did not settle within {timeout:g}s: {_nonzero(counts)}{why}")
            await asyncio.sleep(0.002)

    def _lasted(self, failure: FailureLog, timeout: float) -> bool:
        """Whether the run of failures (the scans', the records') has lasted `timeout` seconds of the clock and was
        not told yet (then it is told: the next settle() goes on)."""
        since = failure.since
        if since is None or self.clock.time() - since < timeout or self._told.get(id(failure)) == since:
            return False
        self._told[id(failure)] = since
        return True

    async def advance(self, seconds: float = 0, *, minutes: float = 0, hours: float = 0, days: float = 0) -> None:
        """Move the virtual clock on by the sum, stopping at each moment something is to happen on the way (deferred
        mail comes due; a destination's rate-delay pause or dead-site memory ends; a refused record or a failed queue
        scan is retried) and settling there, in order,
        so that every retry, rate-delayed delivery, delay notice and expiry in the span happens when it would
        have (without waiting for it). The clock ends at the span's end. A queue scan that keeps failing (a store
        fault: the disk full) is retried on its backoff through the span, as the server would: advance raises
        for it no error, a settle() the test calls afterwards does (`scan_failure_timeout`)."""
        if not isinstance(self.clock, VirtualClock):
            raise RuntimeError("advance() needs Sink(virtual_time=True)")
        span = seconds + 60 * minutes + 3600 * hours + 86400 * days
        if not math.isfinite(span) or span < 0:
            raise ValueError(f"advance() takes a finite span, not {span:g} seconds: the clock never goes back")
        target = self.clock.now + span
        await self._settle(SETTLE_TIMEOUT, None)
        while self.clock.now < target:
            self.clock.advance(await self._next_stop(target) - self.clock.now)
            await self._settle(SETTLE_TIMEOUT, None)

    async def _next_stop(self, target: float) -> float:
        """The first moment before `target` something is to happen: deferred mail comes due (the store), or a
        qmgr timer rings (a rate delay's pause or a dead site's memory ends, a refused record's or a failed scan's
        retry); else
        `target`."""
        store, qmgr = self._queue
        now = self.clock.time()
        moments = (await store.next_due_time(), qmgr.next_timer())
        return min([target, *(moment for moment in moments if moment is not None and moment > now)])


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
    """The queues holding mail, with their counts."""
    return {queue: n for queue, n in counts.items() if n}


def _waits_for_time(qmgr: QueueManager, active: int) -> bool:
    """The `active` messages can do nothing before the clock moves: none (or all) in qmgr's hands, every job of
    them waiting for a destination's timer (its rate delay's pause)."""
    return active == 0 or (active == qmgr.taken_count and qmgr.waiting_for_timers())


def _fast_temporary_directory() -> str | None:
    """/dev/shm when it is there and writable (tmpfs: a test's queue needs no durability, and fsync costs nothing
    there), else the system's temporary directory."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else None


def _for_every_client(data: dict, keys: dict, sections: tuple[str, ...] = ("smtp",)) -> dict:
    """`keys` for each of `sections` ([smtp] by default), and for each of their services ([smtp.services.NAME]) in
    `data` that sets one of them (its own value would win over the section's): what the Sink forces reaches every
    client of those sections."""
    return {section: _for_section(data.get(section, {}), keys) for section in sections}


def _for_section(section: dict, keys: dict) -> dict:
    services = section.get("services", {})
    own = {name: {k: v for k, v in keys.items() if k in service} for name, service in services.items()}
    own = {name: values for name, values in own.items() if values}
    return {**keys, **({"services": own} if own else {})}
