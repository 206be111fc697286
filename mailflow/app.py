"""Mailflow: builds the store, resolver, stages and transports from a Config, and runs them.

    async with Mailflow(config) as mf:      # start(): lock the queue, open the store, recover, start qmgr, listen
        host, port = mf.smtp_addresses[0]   # port 0 in the config gives an ephemeral port
    # stop(): close the listeners and pickup, drain sessions, let deliveries finish (grace), flush the store,
    # unlock the queue

One server per queue: start() takes the queue's lock (queuelock.py) before anything touches the store, and
raises `QueueBusy` naming the running server's pid when another one holds it. A queue database that another
process keeps locked delays the start (logged) for up to START_LOCK_WAIT seconds; any other store error at the start
raises sqlite3.Error (`mailflow serve` says it in one line and exits 1).

With `[sink] enable` (or an injected `capture`, mailflow.capture.recorders.Capture) the server keeps what the
`capture` transport delivers, records each session's transcript (smtpd's session observer) and each message's
queue history (the mail log's observer); with `[sink] enable` it also serves the capture API on the one HTTP
listener (`[http]`, mailflow.http; `mf.http`). `smtpd_policy` is smtpd's in-process policy hook;
`session_observer` (default: the capture's) gets every SMTP session's transcript (stages.smtpd.transcript).

With `[admin] enable` the server counts (`mf.metrics`, mailflow.metrics: fed by the mail log's and smtpd's
observers, qmgr's delivery hook and the store's commit hook) and serves the admin listener (`mf.admin`,
mailflow.admin: /metrics, /healthz, /readyz, the admin API, the queue page), opened before the stages so that
/healthz answers while the queue is recovered and /readyz says when the server is ready.

The clock, RNG, resolver and transports can be injected (tests pass fakes or local peers); nothing is
global, so several instances can run in one process. Without an injected resolver, `build_resolver` makes one
from `[dns]` (transports and smtpd share it). `serve(config)` runs one until SIGTERM/SIGINT or
until an injected shutdown trigger fires; SIGHUP reloads (`reload()`; one during the start, once it runs); after
each burst of mail, once idle, it gives the memory the burst freed back to the system (`return_memory_when_idle`);
what the start and each reload built is frozen out of the garbage collector's walks (`freeze_the_heap`); the tables a
reload replaced are let go a piece at a time once nothing uses them (mailflow.tables.retire), not in that pass.

Reload (`await mf.reload(config)`; SIGHUP and `mailflow reload` in `serve`): like `postfix reload`, the new
configuration is checked whole (its tables must answer, its certificates load) and built whole (routing tables,
restrictions, transports, certificates) before any of it is used (each `type:name` it names read once, by the check:
the routing, content checks, transports and every listener's restrictions open it from that one TableCache; a table
file unchanged since the configuration in force read it is taken over from it, not read again); a
problem raises ConfigError and the configuration in force stays. Then cleanup, qmgr, pickup and smtpd take it: new
sessions follow the new rules (smtpd.Smtpd.reconfigure), open sessions are not dropped and end under the rules they
began with (as Postfix's smtpd processes do; the inbound filters a reload replaces are closed at a later reload once
no open session uses them), deliveries under way finish with the transports they began with. The SMTP listeners
change as `postfix reload` changes master.cf's services: a new address is bound (and listening) while the reload is
built, so one that cannot be bound refuses the reload (ConfigError naming its key); an address kept keeps its socket;
one removed stops listening, its open sessions going on. What only a restart applies (the queue, the HTTP listeners
[http] and [admin], [dns], where the log goes: mailflow.config.reload) keeps running as it is and is named in the log
(`warning: reload: queue.incoming_backlog_limit changed; restart to apply`).

Stop (`stop()`, SIGTERM in `serve`): the HTTP listener closes, then smtpd, pickup and qmgr drain together within
one `shutdown_grace` (the setting in force, a reload's too, or the constructor's): no new connection nor
delivery starts, sessions between transactions get 421 4.3.2, transactions and deliveries under way may finish;
what is left at the end of the grace is cut (nothing acknowledged is lost: a transaction cut before its 250 is
resent by its client, a delivery cut stays pending). Then the store flushes and closes; `serve` returns (exit status 0).
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import gc
import logging
import random
from functools import partial
import signal
import sqlite3
from typing import TYPE_CHECKING, Callable

from mailflow.bounce_templates import Templates, load_templates
from mailflow.capture.recorders import Capture
from mailflow.clock import Clock, SystemClock
from mailflow.config import Config, DnsConfig, flat_settings, in_force, restart_needed
from mailflow.config.queue import free_space as queue_free_space
from mailflow.content import Content
from mailflow.dns import AiodnsResolver
from mailflow.dsn_parameters import without_success
from mailflow.errors import ConfigError
from mailflow.logs import MailLog
from mailflow.filters.content_checks import ContentChecks, check_pool
from mailflow.filters.milter import MilterSettings, NonSmtpdMilters
from mailflow.stages.cleanup import Cleanup
from mailflow.stages.pickup import Pickup
from mailflow.stages.qmgr import QueueManager
from mailflow.stages.qmgr.notices import Notices
from mailflow.model import AddressClass, ClientInfo, DeliveryRequest, Envelope, Recipient, Submission
from mailflow.queuelock import QueueLock
from mailflow.routing.router import Router
from mailflow.signing.dkim import checkers as dkim_checkers
from mailflow.signing.keytables import arc_key_from_config, keys_from_config
from mailflow.signing.outbound import OutboundSigning
from mailflow.stages.smtpd import Smtpd, SmtpdHandler
from mailflow.stages.smtpd.filtering import FilterServices
from mailflow.stages.smtpd.postmaster import SessionNotices
from mailflow.stages.smtpd.queuespace import QueueSpace
from mailflow.stages.smtpd.transcript import SessionObservers
from mailflow.stages.verify import ProbeSender, Prober, Verifier
from mailflow.store import Store
from mailflow.tables import TableCache
from mailflow.tables.check import table_problems
from mailflow.tables.retire import RetiredTables
from mailflow.tables.networks import NetworkList
from mailflow.transports import build_transports
from mailflow.transports.local.asuser import open_helper, stop_helper
from mailflow.workers import BoundedWorkers

if TYPE_CHECKING:  # imported when a feature serves HTTP (start-up time)
    from mailflow.admin import Admin
    from mailflow.http import HttpServer
    from mailflow.metrics import Metrics

log = logging.getLogger("mailflow")

START_LOCK_WAIT = 60.0  # seconds a start waits for a queue database another process keeps locked


def _locked(error: sqlite3.OperationalError) -> bool:
    """Another connection holds the database (SQLITE_BUSY or SQLITE_LOCKED, extended codes included)."""
    code = getattr(error, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def non_smtpd_milters(config: Config) -> NonSmtpdMilters | None:
    """[milter] non_smtpd_milters, for pickup (None when there are none)."""
    specs = config.milter.non_smtpd_milters
    if not specs:
        return None
    return NonSmtpdMilters(specs, MilterSettings.from_config(config, config.smtpd.message_size_limit),
                           config.myhostname)


def forwarder(cleanup: Cleanup, myhostname: str):
    """How local delivery queues a forwarded copy: a new message through cleanup, from the same sender (each new
    recipient keeping the original recipient and its DSN parameters: ORCPT, NOTIFY without SUCCESS, the
    message's ENVID and RET) or from a mailing list's owner (NOTIFY only), with the original's client
    attributes but its port (what Postfix's local(8) passes on, forward.c and alias.c)."""

    async def forward(request: DeliveryRequest, rcpt: Recipient, addresses: tuple[str, ...], content: Content,
                      sender: str | None = None) -> str:
        envelope = Envelope(request.sender if sender is None else sender, addresses, smtputf8=request.smtputf8,
                            body_type=request.body_type, **_dsn_passed_on(request, rcpt, len(addresses), sender))
        client = ClientInfo(addr="127.0.0.1", helo=myhostname, protocol="local")
        attributes = dataclasses.replace(request.client_attributes, port="")
        return await cleanup.submit(Submission(envelope, content, client, forwarded=True,
                                               client_attributes=attributes))

    return forward


def _dsn_passed_on(request: DeliveryRequest, rcpt: Recipient, count: int, owner: str | None) -> dict:
    """The Envelope fields a forwarded copy's `count` recipients inherit from `rcpt`: its NOTIFY without SUCCESS
    (the expansion reports it); with the sender kept, also its original address, its ORCPT and the message's
    ENVID and RET, which must not follow a list's owner as the new sender (local(8)'s alias.c)."""
    notify = {"notify": (without_success(rcpt.notify),) * count}
    if owner is not None:
        return notify
    return {**notify, "originals": (rcpt.original,) * count, "orcpts": (rcpt.orcpt,) * count,
            "envid": request.envid, "ret": request.ret}


def build_outbound_signing(config: Config, router: Router, resolver, clock: Clock, log: MailLog,
                           checkers: BoundedWorkers) -> OutboundSigning | None:
    """cleanup's SRS, ARC and DKIM (mailflow.signing.outbound) from [dkim], [arc] and [srs]; None when all are off,
    so that cleanup does nothing more than before. `checkers`: the server's pool for the ARC seal's DKIM checks.
    Raises ConfigError (a table or key that cannot be read)."""
    keys = keys_from_config(config.dkim)
    srs = router.mapper.srs
    if keys is None and srs is None and not config.arc.enabled:
        return None
    arc_key = arc_key_from_config(config.arc, config.dkim, keys)
    remote = (AddressClass.RELAY, AddressClass.DEFAULT)
    return OutboundSigning(keys=keys if config.dkim.signing_table else None,
                           sign_forwarded=config.dkim.sign_forwarded, arc_key=arc_key,
                           authserv_id=config.arc.authserv_id or config.myhostname, srs=srs,
                           internal_networks=NetworkList.from_items(config.mynetworks, setting="mynetworks"),
                           is_remote=lambda addr: router.rewriter.classify(addr) in remote,
                           resolver=resolver, clock=clock, log=log, checkers=checkers)


def probe_sender(config: Config, router: Router, clock: Clock) -> ProbeSender:
    """Address verification's probe sender: address_verify_sender (qualified as trivial-rewrite qualifies an
    address, as Postfix's verify does; `<>` or "": the null sender) with address_verify_sender_ttl's stamp."""
    return ProbeSender(config.address_verify.sender, config.address_verify.sender_ttl, router.rewriter.qualify, clock)


def build_resolver(dns: DnsConfig) -> AiodnsResolver:
    """The resolver the `[dns]` section describes (the resolver itself knows nothing of the configuration)."""
    return AiodnsResolver(nameservers=dns.nameservers, timeout=dns.timeout, tries=dns.tries)


class Mailflow:
    def __init__(self, config: Config, *, clock: Clock | None = None, rng: random.Random | None = None,
                 resolver=None, transports: dict | None = None, shutdown_grace: float | None = None,
                 capture: Capture | None = None, smtpd_policy=None, session_observer=None):
        self.config = config
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self._resolver = resolver
        self._own_resolver: AiodnsResolver | None = None  # built here, so closed here
        self._transports = transports
        self._grace_given = shutdown_grace  # the constructor's (tests'), in place of the setting's, reloads too
        self._grace = self._grace_of(config)
        self.store: Store | None = None
        self._lock: QueueLock | None = None
        self._helper_opened = False  # (open_helper() called by start, stop_helper() not yet: asuser counts servers)
        self.qmgr: QueueManager | None = None
        self.smtpd: Smtpd | None = None
        self.pickup: Pickup | None = None
        self._cleanup: Cleanup | None = None
        self._check_workers: BoundedWorkers | None = None  # the content checks' threads, every reload's
        self._seal_checkers: BoundedWorkers | None = None  # the ARC seal's DKIM checks' threads, every reload's
        self._tables: TableCache | None = None  # the tables of the configuration in force (the start's, a reload's)
        self._retired_tables = RetiredTables()  # those a reload replaced, let go off the collector's pass
        self._verifier: Verifier | None = None  # address verification: one cache for the server's life
        self._reloading = asyncio.Lock()
        self._site_flushes: dict[str, asyncio.Future] = {}  # ETRN: the flush under way for each site
        if capture is None and config.sink.enable:
            capture = Capture(config.sink, self.clock)
        self.capture = capture
        self._smtpd_policy = smtpd_policy
        self._session_observer = session_observer or (capture.session_observer if capture else None)
        self.http: HttpServer | None = None  # when a feature serves HTTP
        self._maillog: MailLog | None = None
        self._filters: FilterServices | None = None
        # replaced by a reload: sessions begun before it may still use them; closed at a later reload once no
        # open session does, or at the stop
        self._retired_filters: list[FilterServices] = []
        self.metrics: Metrics | None = None  # with [admin] enable
        self.admin: Admin | None = None  # with [admin] enable
        self._postmaster: SessionNotices | None = None  # once the stages are built
        if config.admin.enable:
            from mailflow.metrics import Metrics

            self.metrics = Metrics(self.clock)
            self.metrics.watch(self)
            observers = [o for o in (self._session_observer, self.metrics.sessions) if o is not None]
            self._session_observer = observers[0] if len(observers) == 1 else SessionObservers(*observers)

    @property
    def mail_log(self) -> MailLog | None:
        """The server's mail log (its observers hear every event), once the stages are built; the admin API's
        queue actions write postsuper's lines to it."""
        return self._maillog

    async def start(self) -> None:
        c = self.config
        self._lock = QueueLock.acquire(c.queue_path)  # before the store: a second server touches nothing
        if not self._helper_opened:  # (local delivery's calls as users: one more server of this process uses them)
            open_helper()
            self._helper_opened = True
        try:
            self.store = await self._open_store(c)
            await self.store.sweep()  # spool files a crash left behind; nothing is being received yet
            await self._start_admin()
            await self._start_stages()
            await self._start_http()
        except BaseException:
            await self.stop()
            raise
        log.info("mailflow started: listening on %s, queue %s",
                 ", ".join(f"{h}:{p}" for h, p in self.smtp_addresses + (self.http.addresses if self.http else [])),
                 c.queue_path)

    async def _open_store(self, c: Config) -> Store:
        """The queue, opened (and migrated) as its owner. While another process keeps the database locked past
        the busy timeout (an operator's long change, a backup), the start waits, logged, up to START_LOCK_WAIT
        seconds; then, or on any other store error, it fails (sqlite3.Error)."""
        path = c.queue_path / "queue.db"
        loop = asyncio.get_running_loop()
        give_up = loop.time() + START_LOCK_WAIT
        while True:
            try:
                return await Store.open(path, batch_limit=c.queue.commit_batch_limit,
                                        backlog_limit=c.queue.incoming_backlog_limit, owner=True)
            except sqlite3.OperationalError as e:
                if not _locked(e) or loop.time() >= give_up:
                    raise
                log.warning("cannot open the queue %s yet: %s (another process holds it); waiting", path, e)
                await asyncio.sleep(1.0)

    async def _start_stages(self) -> None:
        assert self.store is not None  # start() opened it
        c = self.config
        tables = TableCache()  # this generation's: its parts open through views of it, each table read once
        router = await self._router(c, tables.view())
        maillog = MailLog(observer=self._mail_observer())
        self._maillog = maillog
        self._cleanup = Cleanup(self.store, clock=self.clock, rng=self.rng, log=maillog, on_queued=self._wake_qmgr,
                                **await self._cleanup_settings(c, router))
        transports = self._build_transports(c, router, self._grace)
        notices = self._notices(c, self._templates(c))  # qmgr's, and pickup's for the maildrop files it refuses
        self.qmgr = QueueManager(self.store, resolve=router.rewriter.resolve,
                                 transports=transports, config=c.queue, clock=self.clock,
                                 rng=self.rng, log=maillog, notices=notices,
                                 on_delivery=self.metrics.delivered if self.metrics else None,
                                 soft_bounce=c.soft_bounce, recipient_delimiter=c.recipient_delimiter)
        await self.qmgr.start()
        sender = probe_sender(c, router, self.clock)
        self._verifier = Verifier(c.address_verify, await self._prober(c, router, transports, sender), self.clock,
                                  maillog)
        self._cleanup.attach_queue_manager(self.qmgr)
        self.pickup = Pickup(c.queue_path, self._cleanup, myhostname=c.myhostname, clock=self.clock,
                             interval=c.sendmail.pickup_interval, notices=notices,
                             size_limit=c.smtpd.message_size_limit, milters=non_smtpd_milters(c), store=self.store,
                             in_hand=self.qmgr.in_hand, soft_bounce=c.soft_bounce,
                             receive_override_options=c.smtpd.receive_override_options, policy=c)
        await self.pickup.start()
        self._filters = FilterServices(c, self._dns_resolver(), self.clock, self.rng)
        self._postmaster = SessionNotices(c, self._cleanup.submit, self.clock)  # notify_classes' session transcripts
        observer = self._postmaster if self._session_observer is None else SessionObservers(
            self._session_observer, self._postmaster)
        self.smtpd = Smtpd(c, self._handler_for(router, self._filters, sender), clock=self.clock,
                           observer=observer, resolver=self._dns_resolver(), tables=router.tables.view())
        await self.smtpd.start()
        tables.built()  # (its parts hold their own tables from here on, not the generation's)
        self._tables = tables

    @staticmethod
    async def _router(config: Config, tables: TableCache | None = None) -> Router:
        router = Router(config, tables)
        await router.tables.preload()  # read the table files off the event loop, before anyone asks
        return router

    async def _prober(self, config: Config, router: Router, transports: dict, sender: ProbeSender) -> Prober:
        """Address verification's probes: along the routes of `router`, or of one built with [address_verify]'s
        routing overrides (`Config.for_probes`, its tables shared with `router`'s), with these transports,
        through qmgr."""
        assert self.qmgr is not None
        probes = config.for_probes()
        probe_router = router if probes is config else await self._router(probes, router.tables)
        return Prober(probe_router, transports, sender, self.qmgr.deliver_probe)

    def _notices(self, config: Config, templates: Templates) -> Notices:
        assert self._cleanup is not None
        return Notices(self._cleanup.prepare_notice, myhostname=config.myhostname, config=config.queue,
                       templates=templates, mydomain=config.domain)

    @staticmethod
    def _templates(config: Config) -> Templates:
        """bounce_template_file's templates; ConfigError naming the setting when they cannot be used."""
        path = config.queue.bounce_template_file
        try:
            return load_templates(path)
        except (OSError, ValueError) as e:
            raise ConfigError("", "queue.bounce_template_file", f"{path}: {e}") from None

    async def _cleanup_settings(self, config: Config, router: Router) -> dict:
        """What cleanup takes from a configuration (at the start and at a reload): rewriting, limits, the
        outbound signing, the content checks (their tables read) and the after-queue filter. Raises ConfigError."""
        assert self._maillog is not None
        if self._check_workers is None:
            self._check_workers = check_pool()
        if self._seal_checkers is None:
            self._seal_checkers = dkim_checkers()
        checks = ContentChecks(config.checks, router.tables.view(), workers=self._check_workers)
        await checks.tables.preload()
        return dict(myhostname=config.myhostname, mapper=router.mapper, hopcount_limit=config.hopcount_limit,
                    header_size_limit=config.header_size_limit, drop_headers=config.message_drop_headers,
                    checks=checks, smtputf8_autodetect=config.smtputf8_autodetect_classes,
                    content_filter=config.smtpd.content_filter,
                    outbound=build_outbound_signing(config, router, self._dns_resolver(), self.clock, self._maillog,
                                                    self._seal_checkers))

    def _handler_for(self, router: Router, filters: FilterServices, sender: ProbeSender):
        """How smtpd builds each listener's handler (its restrictions) from the listener's effective config and the
        cache it opens its tables through (a view of `router`'s); `sender`: address verification's, which smtpd
        takes unrefused."""
        assert self._cleanup is not None
        resolver, cleanup, queue, verifier = self._dns_resolver(), self._cleanup, self.config.queue_path, self._verifier
        space = QueueSpace(partial(queue_free_space, queue), self.clock)  # (asked at every MAIL, kept 1 s)
        return lambda listener_config, tables: SmtpdHandler(listener_config, router.rewriter, router.mapper, cleanup,
                                                            resolver=resolver, tables=tables, queue_space=space,
                                                            policy=self._smtpd_policy, filters=filters,
                                                            flush_site=self._flush_site, verifier=verifier,
                                                            probe_sender=sender)

    async def _flush_site(self, domain: str) -> None:
        """ETRN: every deferred message with a pending recipient in `domain` is due now (what `mailflow queue
        flush --to-domain` does); qmgr sees the flush at its next poll of the operator counters. An ETRN for a
        site whose flush is under way joins it, so clients repeating ETRN cost one pass over the queue, and a
        session that goes away does not stop it."""
        flush = self._site_flushes.get(domain)
        if flush is None:
            flush = self._site_flushes[domain] = asyncio.ensure_future(self._flush_deferred(domain))
            flush.add_done_callback(lambda done: self._site_flushed(domain, done))
        await asyncio.shield(flush)

    def _site_flushed(self, domain: str, flush: asyncio.Future) -> None:
        del self._site_flushes[domain]
        if not flush.cancelled():
            flush.exception()  # (each ETRN waiting for it has been told; nobody may be left to ask)

    async def _flush_deferred(self, domain: str) -> None:
        assert self.store is not None
        after = ""
        while ids := await self.store.message_ids(queues=["deferred"], rcpt_domain=domain, after=after, limit=500):
            await self.store.flush_messages(ids, self.clock.time())
            after = ids[-1]

    def _mail_observer(self):
        """Who hears the mail log's events: the capture's queue histories, the metrics, both or nobody."""
        observers = [o for o in (self.capture.mail_observer if self.capture else None,
                                 self.metrics.mail_event if self.metrics else None) if o is not None]
        if len(observers) < 2:
            return observers[0] if observers else None

        def both(queue_id: str, event: str, fields: dict) -> None:
            for observer in observers:
                observer(queue_id, event, fields)
        return both

    async def _start_admin(self) -> None:
        """The admin listener ([admin] enable), and the store's commits counted."""
        if self.metrics is None:
            return
        from mailflow.admin import Admin

        assert self.store is not None
        self.store.watch_commits(self.metrics.committed)
        self.admin = Admin(self.config.admin, self, self.metrics)
        await self.admin.start()

    async def _start_http(self) -> None:
        """The HTTP listener, when a feature has something to serve: the capture API with [sink] enable."""
        if not (self.config.sink.enable and self.capture is not None):
            return
        from mailflow.capture.mailpit import routes
        from mailflow.http import HttpServer

        sink = self.config.sink
        self.http = HttpServer(self.config.http.listen)
        self.http.add_routes("capture API", routes(self.capture, waiters_limit=sink.waiters_limit,
                                                   wait_time_limit=sink.wait_time_limit))
        await self.http.start()

    def _wake_qmgr(self) -> None:
        if self.qmgr:
            self.qmgr.wake()

    def _grace_of(self, config: Config) -> float:
        """The stop's grace period under `config`: the constructor's shutdown_grace, else the setting."""
        return config.shutdown_grace if self._grace_given is None else self._grace_given

    def _build_transports(self, config: Config, router: Router, grace: float) -> dict:
        if self._transports is not None:
            return self._transports
        assert self._cleanup is not None
        return build_transports(config, self._dns_resolver(), self.clock, router,
                                forwarder(self._cleanup, config.myhostname),
                                mailbox=self.capture.mailbox if self.capture else None, grace=grace, rng=self.rng)

    def _dns_resolver(self):
        """The injected resolver, else one built here (once) from [dns]: transports and smtpd share it."""
        if self._resolver is None and self._own_resolver is None:
            self._own_resolver = build_resolver(self.config.dns)
        return self._resolver or self._own_resolver

    async def stop(self) -> None:
        """The listeners (admin, HTTP), then address verification's probes (cancelled, awaited), then smtpd,
        pickup and qmgr drained together within the grace period, then local delivery's helper (told to end, which
        it does once the children it forked as users have; waited for in a thread, forker.STOP_WAIT s at most;
        a delivery's thread left past the grace is refused a new child), then the content checks' and ARC seal's
        threads, then ETRN's flushes, then the store. Safe to call twice. The helper and its children may outlive
        the stop (and the process): each child within its own limits (a write as a user ends or rolls back; one
        without a write limit is never cut; a read ends within its timeout), the helper once they all ended.
        A reload under way ends first (one that has bound new addresses must not put them in use, or leave them
        open, after the stop)."""
        async with self._reloading:
            await self._stop()

    async def _stop(self) -> None:
        if self.admin:
            await self.admin.stop()
            self.admin = None
        if self.http:
            await self.http.stop()
            self.http = None
        if self._verifier is not None:  # its probes use qmgr's transports, which qmgr.stop closes
            await self._verifier.close()
            self._verifier = None
        stages = [stage for stage in (self.smtpd, self.pickup, self.qmgr) if stage is not None]
        await asyncio.gather(*(stage.stop(self._grace) for stage in stages))
        self.smtpd = self.pickup = self.qmgr = None
        if self._helper_opened:  # (once: a second stop must not count this server out again)
            self._helper_opened = False
            await asyncio.to_thread(stop_helper)
        if self._check_workers is not None:  # no inspection is left: a cancelled one's walk ends at its next line
            if not await self._check_workers.close_within(self._grace):  # (a walk stuck in a hung sqlite read)
                log.warning("content checks: a walk still runs %gs after the stop; its thread is left", self._grace)
            self._check_workers = None
        if self._seal_checkers is not None:  # cleanup is done: idle threads end, a check under way ends with it
            self._seal_checkers.close()
            self._seal_checkers = None
        if self._postmaster is not None:  # the transcripts of the last sessions, queued before the store closes
            await self._postmaster.close()
            self._postmaster = None
        for filters in (self._filters, *self._retired_filters):
            if filters is not None:
                filters.close()
        self._filters, self._retired_filters = None, []
        await self._retired_tables.close()
        self._tables = None
        if self._own_resolver:
            await self._own_resolver.close()
            self._own_resolver = None
        flushes = list(self._site_flushes.values())  # ETRN's: what they made due so far stays due
        for flush in flushes:
            flush.cancel()
        await asyncio.gather(*flushes, return_exceptions=True)
        if self.store:
            await self.store.close()
            self.store = None
        if self._lock:
            self._lock.release()
            self._lock = None

    async def reload(self, config: Config) -> list[str]:
        """Put `config` in force, as far as a running server can (see the module doc); returns the settings
        that differ but wait for a restart (each also logged). Raises ConfigError, the configuration in force
        unchanged. One reload at a time."""
        async with self._reloading:
            if not (self.smtpd and self.qmgr and self.pickup and self._cleanup):
                raise RuntimeError("reload: the server is not running")
            waiting = restart_needed(self.config, config)
            # (validated again, a domain list's /file read again, when settings kept as running differ: off the loop)
            config = await asyncio.to_thread(in_force, self.config, config, "")
            # this generation's: each table it names is read once, by the check, or taken over from the generation
            # in force when its file is unchanged (not read again)
            tables = TableCache(previous=self._tables)
            try:
                check = tables.view()  # (what only it opens, the generation keeps only if a file's: built(check))
                problems = await asyncio.to_thread(table_problems, flat_settings(config, effective=True), "", check)
                if problems:
                    raise _all_of(problems)
                router = await self._router(config, tables.view())
                templates = self._templates(config)
                cleanup_settings = await self._cleanup_settings(config, router)
                transports = self._build_transports(config, router, self._grace_of(config))
                filters = FilterServices(config, self._dns_resolver(), self.clock, self.rng)
                sender = probe_sender(config, router, self.clock)
                prober = await self._prober(config, router, transports, sender)
                handler_for = self._handler_for(router, filters, sender)
                # (binds new addresses)
                use_smtpd = await self.smtpd.reconfigure(config, handler_for, router.tables.view())
            except BaseException:  # refused (or cancelled): what it read is let go a piece at a time too
                self._retired_tables.retire(tables.abandoned())  # (not what it took over: still in force)
                raise
            # everything is built: from here on nothing can fail
            self._cleanup.reconfigure(**cleanup_settings)
            self._grace = self._grace_of(config)
            if self._filters is not None:
                self._retired_filters.append(self._filters)
            self._filters = filters
            # (its parts hold their own tables from here on, not the generation's): what the replaced generation
            # held that this one did not take over is let go
            self._retired_tables.retire(tables.built(check))
            self._tables = tables
            notices = self._notices(config, templates)
            self.qmgr.reconfigure(resolve=router.rewriter.resolve, transports=transports, config=config.queue,
                                  notices=notices, soft_bounce=config.soft_bounce,
                                  recipient_delimiter=config.recipient_delimiter)
            if self._verifier is not None:
                self._verifier.reconfigure(config.address_verify, prober)
            if self._postmaster is not None:
                self._postmaster.reconfigure(config)
            self.pickup.reconfigure(myhostname=config.myhostname, interval=config.sendmail.pickup_interval,
                                    notices=notices,
                                    size_limit=config.smtpd.message_size_limit, milters=non_smtpd_milters(config),
                                    soft_bounce=config.soft_bounce,
                                    receive_override_options=config.smtpd.receive_override_options,
                                    policy=config)
            await use_smtpd()
            self._close_unused_filters()
            self.config = config
            for key in waiting:
                log.warning("reload: %s changed; restart to apply", key)
            log.info("reload: %s", _tables_read(tables))
            log.info("reload: configuration, tables and certificates in force")
            return waiting

    def _close_unused_filters(self) -> None:
        """Close the filters earlier reloads replaced that no open session uses any more: each holds threads
        and, with greylisting, a database connection; kept until the stop, every reload would add its own."""
        assert self.smtpd is not None
        in_use = {id(handler.filter_services) for handler in self.smtpd.handlers_in_use()}
        unused = [filters for filters in self._retired_filters if id(filters) not in in_use]
        self._retired_filters = [filters for filters in self._retired_filters if id(filters) in in_use]
        for filters in unused:
            filters.close()

    @property
    def replaced_in_use(self) -> bool:
        """What a reload replaced is still in use: a session that began under an earlier listener's handler, a
        socket still sending after a session's end (its session, and so its handler, held until then: within
        the lingering timeout; any such socket counts), a transport qmgr closes once the deliveries it began end,
        and the short jobs begun before the reload that hold its parts until they end (mailflow.under_way): a
        maildrop file or requeued message pickup hands to cleanup, a notice qmgr makes, an address-verify probe."""
        if not (self.smtpd and self.qmgr):
            return False
        current = {id(listener.handler) for listener in self.smtpd.listeners}
        return (any(id(handler) not in current for handler in self.smtpd.handlers_in_use())
                or bool(self.smtpd.lingering) or self.qmgr.retiring or bool(self.pickup and self.pickup.retiring)
                or bool(self._verifier and self._verifier.retiring))

    @property
    def idle(self) -> bool:
        """No SMTP session is open and no delivery or record is under way."""
        return not (self.smtpd and self.smtpd.sessions) and not (self.qmgr and self.qmgr.busy)

    @property
    def smtp_addresses(self) -> list[tuple[str, int]]:
        return self.smtpd.addresses if self.smtpd else []

    async def __aenter__(self) -> "Mailflow":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


TABLES_NAMED = 5  # table files a reload's log line names among those it read (then: "and N more")
IDLE_TRIM_INTERVAL = 1.0  # seconds between looks at whether the server went idle after moving mail
RELEASE_POLL = 0.5  # seconds between looks at whether what a reload replaced is still in use (serve: _reloads)


def _tables_read(tables: TableCache) -> str:
    """What a reload did with the table files: those it read (named, the first few) and how many it kept as they
    were, their files unchanged."""
    read = [table.name for table in tables.read_itself()]
    named = ", ".join(read[:TABLES_NAMED]) + (f" and {len(read) - TABLES_NAMED} more" if len(read) > TABLES_NAMED
                                              else "")
    return f"table files read: {len(read)}{f' ({named})' if read else ''}; unchanged, kept: {len(tables.taken_over())}"


def _all_of(problems: list[ConfigError]) -> ConfigError:
    """The first problem, saying how many more there are."""
    first, more = problems[0], len(problems) - 1
    if not more:
        return first
    return ConfigError(first.file, first.key, f"{first.reason} (and {more} more problem{'s' if more > 1 else ''})")


def _malloc_trim():
    """glibc's malloc_trim, or None where the C library is not glibc."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


async def return_memory_when_idle(mf: "Mailflow", interval: float = IDLE_TRIM_INTERVAL, trim=None) -> None:
    """Once the server is idle after moving mail, give the heap memory the load freed back to the system.

    During a load of big messages asyncio reads each socket into a 256 KB buffer, and the content is handled
    in 64-256 KB chunks. glibc serves such blocks from its heap once its dynamic mmap threshold has risen, and
    freed between long-lived objects they stay resident: measured, 200 sessions x 2 MB left RSS 45 MB above
    idle. malloc_trim(0) releases those free pages (a few ms, once per burst). Fixing the mmap threshold
    instead keeps them out of the heap but makes every socket read an mmap: twice the system time per small
    message. Does nothing where the C library is not glibc. (`trim`: instead of malloc_trim, for tests.)"""
    trim = trim or _malloc_trim()
    if trim is None:
        return
    store = mf.store
    assert store is not None  # the server has started
    trimmed_at = store.commits
    while True:
        await asyncio.sleep(interval)
        if store.commits != trimmed_at and mf.idle:
            trimmed_at = store.commits
            trim(0)


async def serve(config: Config, shutdown_trigger: asyncio.Event | None = None,
                reread: Callable[[], Config] | None = None, where: str = "",
                started: Callable[[], object] | None = None,
                reloaded: Callable[[Config], object] | None = None) -> None:
    """Run until SIGTERM/SIGINT (or `shutdown_trigger` is set), then drain and stop. SIGHUP reloads: `reread()`
    (run in a worker thread; default: `config` as it is, which re-reads the tables and certificates) gives the
    configuration to put in force; a refused one is logged and the one in force stays. `where`: the
    configuration's file, named in a refusal whose problem lies in a file it names (a table, a certificate).
    `started()`: run in a worker thread once the server has started (the queue directory is made);
    `reloaded(config)`: run after each reload put `config` in force."""
    stop = shutdown_trigger or asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUPs arriving during a reload make one more reload, not one each. Caught from before the start (which
    # can wait for the queue's database): SIGHUP's default action would end the server; one that comes during
    # the start is a reload once it runs, as Postfix's master takes SIGHUP from its start.
    wanted = asyncio.Event()
    if shutdown_trigger is None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, wanted.set)
    async with Mailflow(config) as mf:
        if started is not None:
            await asyncio.to_thread(started)
        freeze_the_heap()
        helpers = [asyncio.create_task(return_memory_when_idle(mf), name="memory-trim"),
                   asyncio.create_task(_reloads(mf, wanted, reread or (lambda: config), where, reloaded),
                                       name="reload")]
        try:
            await stop.wait()
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
        log.info("mailflow stopping")


async def _reloads(mf: Mailflow, wanted: asyncio.Event, reread: Callable[[], Config], where: str,
                   reloaded: Callable[[Config], object] | None = None) -> None:
    while True:
        await wanted.wait()
        wanted.clear()
        # built with the heap still frozen: the collector's full passes the new tables' objects set off (in the
        # worker threads reading them, holding the GIL and so the loop) walk what the reload made, not the whole
        # heap too (100 000-line tables: passes of 0.19-0.27 s, then 0.03-0.15 s)
        try:
            if await reload_logged(mf, reread, where) and reloaded is not None:
                reloaded(mf.config)
        finally:  # (whatever `reloaded` raises: the heap is not left frozen with what the reload replaced in it)
            gc.unfreeze()  # what the configuration replaced may now be collected (a cycle of it, once unused)
            freeze_the_heap()
        # what is still in use (an open session, a delivery) was frozen with the rest: collected once its last user
        # ends (else it would stay until the next reload's unfreeze), unless a reload comes first (which does it)
        if await _replaced_released(mf, wanted):
            gc.unfreeze()
            freeze_the_heap()


async def _replaced_released(mf: Mailflow, wanted: asyncio.Event) -> bool:
    """Whether what the last reload replaced was in use and no longer is, waited for until a reload is wanted."""
    if not mf.replaced_in_use:
        return False
    while mf.replaced_in_use and not wanted.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wanted.wait(), RELEASE_POLL)
    return not wanted.is_set()


def freeze_the_heap() -> None:
    """Take what the server keeps for its life (modules, classes, the configuration, its tables: about 60 000
    objects after a start) out of the garbage collector's view, so that a full collection walks only what moving
    mail made since: 7-11 ms a full collection at start, under 1 ms frozen. In `serve` only, after the start and
    after each reload (which unfreezes then, so a replaced configuration is freed in a collection later; once more
    when what the reload replaced but was still in use is no longer: `Mailflow.replaced_in_use`): the
    process is the server's; an embedding process's heap is its own."""
    gc.collect()
    gc.freeze()


async def reload_logged(mf: Mailflow, reread: Callable[[], Config], where: str = "") -> bool:
    """One reload as SIGHUP asks it: re-read, put in force, log the outcome (the log level at once) and the
    configuration's warnings it did not have before (Config.warnings, as serve logs them at its start). False when
    refused (logged as `error: reload refused … FILE: KEY: REASON`, FILE being `where` when the problem does not
    name the configuration's file itself, as check-config and serve say it)."""
    log.info("reload: re-reading the configuration")
    before = set(mf.config.warnings())
    try:
        await mf.reload(await asyncio.to_thread(reread))
    except ConfigError as e:
        log.error("reload refused, the configuration in force stays: %s",
                  ": ".join(part for part in (e.file or where, e.key, e.reason) if part))
        return False
    except Exception:  # a bug must not end the server: the configuration in force stays
        log.exception("reload failed, the configuration in force stays")
        return False
    logging.getLogger().setLevel(mf.config.log.level.upper())
    for warning in mf.config.warnings():  # the new ones, as serve's start logs them (cli/server.py warn_at_start)
        if warning not in before:
            log.warning("%s: %s", where, warning)
    return True
