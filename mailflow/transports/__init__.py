"""Delivery agents behind one interface, and the registry that builds them from the config.

Contract of a transport (postfix's delivery agents; chasquid's Courier; maddy's delivery target):

    async deliver(request: DeliveryRequest) -> DeliveryReport
    async close() -> None

- `deliver` never raises for a delivery problem: it returns one `RcptResult` per recipient of the request
  (sent / deferred / bounced, each with an enhanced status code and a diagnostic) and a site verdict
  (`site_ok=False` when the destination itself could not be reached or refused the session).
  An unexpected exception is caught by qmgr and counts as a temporary failure for every recipient.
- A transport reports success only once the message is durable at the other end (a 250 after DATA,
  a Maildir file fsynced and renamed into new/).
- `request.content` is a mailflow.content.Content: a transport reads it as a stream (`stream()`, or `chunks()`
  in a worker thread) and transforms it chunk by chunk (`encode.py`), never holding a big message whole; its
  size is `request.content.size`.
- `deliver_each(request) -> AsyncIterator[RcptResult]` with `delivers_each = True` (optional; local, virtual, a
  pipe service with flag D or O): an agent that delivers the recipients one after another yields each result as
  that delivery ends; qmgr records them as they come (one record in flight a message, those that end meanwhile
  in the next), so a crash repeats only the recipients not recorded yet (Postfix's deliver_completed).
  `deliver` stays the whole (`DeliveryReport.gathered`).
- `close` releases cached connections; qmgr calls it once at shutdown.
- `program`: the Postfix program the agent stands for (smtp, lmtp, local, virtual, pipe, error, discard): the
  mail log writes its result lines under that name, as Postfix's agents log their own (`postfix/smtp[pid]: …
  relay=none … (connect to …)`), and pflogsumm groups deferrals by it. The relay transport's is `relay/smtp`
  (SERVICE/AGENT): Postfix's stock master.cf runs `relay` with `-o syslog_name=postfix/$service_name`, so its lines
  read `postfix/relay/smtp[pid]`.

The registry:

    build_transports(config, resolver, clock, router, forward=None, mailbox=None, grace=None, rng=None)
                             -> {name: Transport}
                             the built-in transports, each [pipe.NAME] and each client service, by transport name;
                             `relay` (RELAY) is [smtp]'s settings in a client of its own, logged as RELAY_PROGRAM,
                             unless an [smtp.services.relay] takes its place; `grace`: local's close wait (default
                             shutdown_grace); `rng`: the server's random.Random, which orders the SMTP clients'
                             equal MX preferences and a host's addresses (None: each client its own, unseeded)
    agent_of(program) -> str the delivery agent of a Transport.program (`relay/smtp` -> `smtp`)
    client_services(config, resolver, clock, router, tables, mta_sts, rng=None) -> {name: Transport}
                             every SMTP client (Config.smtp_clients: smtp, relay, each [smtp.services.NAME]) and
                             each [lmtp.services.NAME] client, each with its merged settings
    build_smtp_client(config, client, *, resolver, clock, router, tables, mta_sts, level_source=…, program=…,
                      rng=None) -> SmtpTransport
    build_lmtp_client(config, client, *, clock, router, tables) -> LmtpTransport
                             one client from a section's settings ([smtp], [lmtp] or a service's merged ones): its
                             own connection cache, TLS contexts and tables
    build_mta_sts(config, resolver), build_generic_maps(config, client, router, tables, program="smtp", log=None),
    build_outbound_checks(client, tables, program="smtp", log=None), sasl_sender_keys(client, router)
                             a client's parts from its settings (None where the setting is off)
"""
from __future__ import annotations

import logging
import random
from functools import partial
from typing import Callable, Protocol

from mailflow.config import RELAY
from mailflow.model import DeliveryReport, DeliveryRequest
from mailflow.tables import TableCache
from mailflow.tables.search import EXTERNAL_FIRST
from mailflow.transports.capture import CaptureTransport
from mailflow.transports.discard import DiscardTransport
from mailflow.transports.error import ErrorTransport
from mailflow.transports.generic import GenericMaps
from mailflow.transports.lmtp import LmtpTransport
from mailflow.transports.local.agent import CommandSettings, LocalTransport
from mailflow.transports.maildir import MaildirTransport, MaildirWriter, virtual_maildirs
from mailflow.transports.pipe import PipeTransport, command_spool, start_setpriv_check
from mailflow.transports.smtp import SmtpTransport
from mailflow.transports.smtp_checks import OutboundChecks
from mailflow.transports.smtp.chat import client_log
from mailflow.transports.smtp.mtasts import HttpsPolicyFetcher, MtaSts


# What the relay transport's lines are logged under (Postfix's stock master.cf runs it with
# `-o syslog_name=postfix/$service_name`).
RELAY_PROGRAM = f"{RELAY}/smtp"


def agent_of(program: str) -> str:
    """The delivery agent of a `Transport.program` (`relay/smtp` -> `smtp`)."""
    return program.rpartition("/")[2]


class Transport(Protocol):
    program: str  # the Postfix delivery agent whose name its result lines are logged under (smtp, local, pipe…)

    async def deliver(self, request: DeliveryRequest) -> DeliveryReport: ...

    async def close(self) -> None: ...


def build_mta_sts(config, resolver) -> MtaSts | None:
    """The SMTP client's MTA-STS policy source from [mta_sts] (None when off); the policy fetch trusts what the
    SMTP client trusts (smtp.tls_ca_file, else the system's CAs)."""
    if not config.mta_sts.enabled:
        return None
    fetcher = HttpsPolicyFetcher(resolver, ca_file=config.smtp.tls_ca_file, timeout=config.mta_sts.fetch_timeout)
    return MtaSts(resolver, fetcher, cache_size=config.mta_sts.cache_size)


def build_generic_maps(config, client, router, tables: TableCache, program: str = "smtp",
                       log: logging.Logger | None = None) -> GenericMaps | None:
    """The `client`'s ([smtp], [lmtp] or one of their services) generic_maps as that client asks them (None when
    unset: nothing is looked up); `program` names the client in log lines and deferrals (smtp_generic_maps), `log`
    the logger of its lines when it is not `program`'s (the relay transport's, relay/smtp)."""
    if not client.generic_maps:
        return None
    return GenericMaps(tables.open(client.generic_maps), delimiter=config.recipient_delimiter,
                       qualify=router.rewriter.qualify, find_address=router.rewriter.find_address, program=program,
                       log=log)


def build_outbound_checks(client, tables: TableCache, program: str = "smtp",
                          log: logging.Logger | None = None) -> OutboundChecks | None:
    """The `client`'s ([smtp], [lmtp] or one of their services) header_checks, mime_header_checks,
    nested_header_checks and body_checks (None when none is set: no per-message work); `program` and `log` as
    build_generic_maps'."""
    specs = (client.header_checks, client.mime_header_checks, client.nested_header_checks, client.body_checks)
    if not any(specs):
        return None
    return OutboundChecks(*(tables.open(spec) if spec else [] for spec in specs), program=program, log=log)


def sasl_sender_keys(client, router) -> Callable[[str], tuple[list[str], tuple[int, ...]]] | None:
    """The sasl_password_maps keys of an envelope sender and the indices of those a pattern table is asked
    (mail_addr_find's, as Postfix's sender-dependent authentication asks them: the whole address, quoted and
    internal); None when the client's sender_dependent_authentication is off or it has no maps."""
    if not (client.sender_dependent_authentication and client.sasl_password_maps):
        return None
    return partial(router.rewriter.address_search, form=EXTERNAL_FIRST)


def build_smtp_client(config, client, *, resolver, clock, router, tables: TableCache, mta_sts,
                      level_source: str = "smtp.tls_security_level", program: str = "smtp",
                      rng: random.Random | None = None) -> SmtpTransport:
    """One SMTP client ([smtp], or the merged settings of an [smtp.services.NAME], `level_source` naming the key its
    TLS level is set by; `program` what every line of it is logged under, its generic maps' and content checks'
    too): its own connection cache, TLS contexts and tables, so that services never share a session."""
    log = client_log(program)
    return SmtpTransport(client, resolver=resolver, helo_name=client.helo_name or config.myhostname, mta_sts=mta_sts,
                         level_source=level_source, program=program, rng=rng,
                         plaintext_after=config.queue.minimal_backoff_time,
                         own_addresses=router.rewriter.own_addresses, own_ports=config.smtpd.ports,
                         relayhost=config.relayhost, now=clock.time, tables=tables,
                         generic=build_generic_maps(config, client, router, tables, log=log),
                         checks=build_outbound_checks(client, tables, log=log),
                         sender_keys=sasl_sender_keys(client, router), soft_bounce=config.soft_bounce)


def build_lmtp_client(config, client, *, clock, router, tables: TableCache) -> LmtpTransport:
    """One LMTP client ([lmtp], or the merged settings of an [lmtp.services.NAME])."""
    return LmtpTransport(client, helo_name=config.myhostname, now=clock.time,
                         checks=build_outbound_checks(client, tables, "lmtp"),
                         generic=build_generic_maps(config, client, router, tables, "lmtp"))


def client_services(config, resolver, clock, router, tables: TableCache, mta_sts,
                    rng: random.Random | None = None) -> dict[str, Transport]:
    """Every SMTP client (Config.smtp_clients: smtp, relay, each [smtp.services.NAME]) and each
    [lmtp.services.NAME] client by name (config validation keeps their names off the built-in transports' but
    `relay`'s, which an [smtp.services.relay] replaces, and off each other's)."""
    smtp: dict[str, Transport] = {
        name: build_smtp_client(config, settings, resolver=resolver, clock=clock, router=router, tables=tables,
                                mta_sts=mta_sts, level_source=config.smtp.key_source(name, "tls_security_level"),
                                program=RELAY_PROGRAM if name == RELAY else "smtp", rng=rng)
        for name, _, settings in config.smtp_clients()}
    lmtp: dict[str, Transport] = {
        name: build_lmtp_client(config, config.lmtp.for_service(name), clock=clock, router=router, tables=tables)
        for name in config.lmtp.services}
    return {**smtp, **lmtp}


def build_transports(config, resolver, clock, router, forward=None, mailbox=None,
                     grace: float | None = None, rng: random.Random | None = None) -> dict[str, Transport]:
    """The transports named in `transport:nexthop` values, by name. `router` gives the local and virtual
    agents their tables; `forward` lets local delivery queue forwarded copies (see transports.local); with a
    capture `mailbox` (mailflow.capture), the `capture` transport keeps messages in it. `grace` (default
    shutdown_grace): how long local's close waits for a /file append under way; `rng` orders the SMTP clients' equal
    MX preferences and a host's addresses (the server's, so that a seeded server delivers the same way each run)."""
    tables = router.tables.view()  # (a table the routing names too is read once)
    start_setpriv_check()  # (local's |commands and the pipe services run as users through it)
    mta_sts = build_mta_sts(config, resolver)
    registry: dict[str, Transport] = {}  # local hands mailboxes to the others (mailbox_transport, fallback_transport)
    registry.update({
        **({"capture": CaptureTransport(mailbox)} if mailbox is not None else {}),
        "local": LocalTransport(router.local, local=config.local, writer=MaildirWriter(clock), clock=clock,
                                forward=forward, commands=CommandSettings.from_config(config),
                                allow_min_user=config.allow_min_user, peers=registry,
                                close_wait=config.shutdown_grace if grace is None else grace),
        "virtual": MaildirTransport(virtual_maildirs(config.virtual_mailbox_base, router.rewriter), clock=clock,
                                    relay="virtual", quota=router.rewriter.virtual_mailbox_limit,
                                    overquota_bounce=config.virtual_overquota_bounce,
                                    owner=router.rewriter.virtual_owner, base=config.virtual_mailbox_base),
        "lmtp": build_lmtp_client(config, config.lmtp, clock=clock, router=router, tables=tables),
        "discard": DiscardTransport(),
        "error": ErrorTransport(),
        # [pipe.NAME] services; config validation keeps their names off the built-in ones above.
        **{name: PipeTransport(service, name=name, recipient_delimiter=config.recipient_delimiter, now=clock.time,
                               allow_min_user=config.allow_min_user, spool=command_spool(config))
           for name, service in config.pipe.items()},
        **client_services(config, resolver, clock, router, tables, mta_sts, rng),
    })
    return registry
