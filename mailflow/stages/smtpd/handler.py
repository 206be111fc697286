"""smtpd's policy: the aiosmtpd hooks that decide what a client may do, and the hand-over to cleanup.

The hooks get the session's typed state (state.SessionState, state.Transaction) and read its fields directly.
`address_refusal` (which every session asks: not an optional hook) checks the syntax of MAIL's and RCPT's
address (and allow_min_user; a UTF-8 domain without SMTPUTF8) before the session looks at their parameters, as
Postfix's extract_addr.
MAIL checks SMTPUTF8, then the queue's free space (Postfix smtpd_check_size):
`452 4.3.1 Insufficient system storage` below max(queue_minfree, 1.5 x message_size_limit), or when a SIZE=
parameter would not leave that much or is more than half of what is free; it is asked at every MAIL, so mail is
accepted again as soon as space returns. RCPT checks SMTPUTF8 (the session has
checked the path and the recipient limit), then runs the restriction lists of this handler's `config.smtpd`
(`restrictions.py`: client, helo, sender, relay,
recipient, then the implied reject_unlisted_recipient), then asks the routing tables (451 4.3.0 when one
cannot answer). With the defaults this is today's rule set: relaying only for mynetworks and authenticated
clients (554 5.7.1), unknown users of this host's domains refused (550 5.1.1, naming the table).
This server's address verification probe sender (`probe_sender`; with address_verify_sender_ttl, its stamp of the
last, this or the next period) skips those checks at RCPT and is kept without its stamp at MAIL and RCPT, as
Postfix's smtpd does (valid_verify_sender_addr), so that a site verifying our probes' sender is never refused.
At DATA, or a transaction's first BDAT, before any content (`handle_DATA_COMMAND`, Postfix's smtpd_check_data)
it runs the data list; at the end of the message (`handle_DATA`) the end_of_data list, then hands a
`Submission` to cleanup and answers 250 only once cleanup has committed it. The session writes the content
into `new_spool()` as it arrives; the handler sees it whole, as a mailflow.content.Content
(`Transaction.content`), never as one bytes object. ETRN runs the client and helo lists (delay_reject true) and
etrn_restrictions, as Postfix's smtpd_check_etrn, before it asks for the site's flush; VRFY (when enabled)
checks its address as RCPT does, without the policy hook and the filters (`handle_VRFY`).
A message marked DISCARD is answered 250 and dropped (its line was logged where the DISCARD was met: an access
action, a policy answer, a milter); HOLD is queued on hold (an access action's or a milter's line was logged
where it was met; DMARC's or a scanner's is logged here: `QID: hold: END-OF-MESSAGE from …`); PREPEND's
fields, REDIRECT and BCC change what is handed to cleanup (its headers, its recipients). Cleanup adds the
Message-ID, Date and From a message lacks, and qualifies its header addresses, only for
local_header_rewrite_clients (`_header_rewriting`; remote_header_rewrite_domain for other clients' addresses).
Every policy refusal is logged through the session as Postfix logs it (`NOQUEUE: reject: RCPT from …`, the
transaction's queue id for NOQUEUE once it has one). At the first accepted recipient the transaction takes its
queue id from cleanup (`Cleanup.begin`, which logs `QID: client=`), as Postfix's smtpd opens its queue file
there; the message is committed under it (`Submission.queue_id`), and a discarded one is answered with it. The
client handed to cleanup names the protocol as the Received header says it (`state.received_protocol`:
ESMTPSA, UTF8SMTPS, … per RFC 3848 / 6531) and the SASL login for the `client=` log line; the client attributes
kept with the message for the delivery agents (`state.SessionState.client_attributes`) name it SMTP or ESMTP, as
Postfix's protocol_name does.

With delay_reject false (Postfix's smtpd_delay_reject = no) the client list runs at connect and after XCLIENT
(`handle_CLIENT`: its refusal, logged, takes the greeting's place), the helo list at HELO/EHLO (`handle_HELLO`,
before the command changes the session) and the sender list at MAIL, before the policy hook and the milters;
each one's DEFER_IF_PERMIT is kept in the session or transaction and carried to the RCPT lists (the client and
helo lists' to ETRN too).

An in-process policy hook (`policy`, an `SmtpdPolicy`: Postfix's policy delegation without the socket, for
an application that embeds mailflow) is asked first at MAIL (stage "mail"), at each RCPT ("rcpt") and at the
end of the message ("data": despite its name, after the content, so after the data list, which ran at DATA, and
before the end_of_data list); it answers with an access(5) action. A refusal (REJECT, DEFER, `NNN [X.Y.Z]
text`) is the reply (logged like a restriction's); anything else (OK, DUNNO, None) lets the usual checks run.
A committed message's queue id is left in `Transaction.queued_as` for the session (its transcript).

Failure behaviour: every refusal is an SMTP reply from `mailflow.status`. A message cleanup could not commit
is not queued; its reply comes from the one table `status.error_reply` (a cleanup refusal its own code and
text, 451 4.3.1 for a full backlog or disk, 451 4.3.0 for a store fault or anything else) and one line is
logged with the error's reason (mailflow.errors: the reason may name a table or a file, the reply never
does; a content check's REJECT is the line cleanup logs), with a traceback only for an error that is not a
store, I/O or delivery error (a probable bug). An
unexpected exception in another hook gets 451 4.3.0 and is logged; the session stays usable.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Awaitable, Callable, Protocol, TypeGuard

from mailflow import address, status
from mailflow.config import Config
from mailflow.config.queue import leaves_too_little, queue_floor
from mailflow.content import Spool
from mailflow.errors import ContentRejected, DeliveryError, LookupRetry, Overloaded
from mailflow.faults import EXPECTED, describe
from mailflow.filters.milter import Verdict
from mailflow.logs import printable
from mailflow.model import Submission
from mailflow.routing.addressmap import AddressMapper
from mailflow.routing.rewrite import Rewriter
from mailflow.stages.smtpd.dns_checks import UNAVAILABLE
from mailflow.stages.smtpd.filtering import MILTER_TRIGGERS, FilterServices, ListenerFilters
from mailflow.stages.smtpd.peername import PeerNames
from mailflow.stages.smtpd.protocol import OnlyKeywords
from mailflow.stages.smtpd.queuespace import QueueSpace
from mailflow.stages.smtpd.restrictions import Facts, Marks, Restrictions
from mailflow.stages.smtpd.state import NULL_SENDER, SessionState, Transaction, helo_name
from mailflow.stages.verify import ProbeSender, Verifier
from mailflow.tables import TableCache

log = logging.getLogger("mailflow.smtpd")
_FLUSH_NAME_MAX = 253  # octets: the longest name Postfix's midna_domain_to_ascii (and so its flush service) takes


class SmtpdPolicy(Protocol):
    """The in-process policy hook (see the module docstring)."""

    async def check(self, stage: str, facts: Facts, recipients: tuple[str, ...]) -> str | None: ...


class SmtpdHandler:
    """aiosmtpd hooks: the restrictions and the hand-over to cleanup. `resolver` (mailflow.dns) serves
    reject_unknown_recipient_domain and reject_rbl_client; without one those restrictions have no opinion."""

    def __init__(self, config: Config, rewriter: Rewriter, mapper: AddressMapper, cleanup, *,
                 resolver=None, tables: TableCache | None = None, queue_space: QueueSpace | None = None,
                 policy: SmtpdPolicy | None = None, filters: FilterServices | None = None,
                 flush_site: Callable[[str], Awaitable[None]] | None = None, verifier: Verifier | None = None,
                 probe_sender: ProbeSender | None = None):
        """`queue_space`: the queue's free space, shared by the listeners (None: no space check); `policy`: the
        in-process hook; `filters`: the inbound filters (filtering.py), None when none is configured;
        `flush_site(domain)`: retry now the deferred mail for a domain (ETRN; None: ETRN is refused for every site);
        `verifier`: the
        address verification service (mailflow.stages.verify; None: reject_unverified_* have no opinion);
        `probe_sender`: the sender of its probes, taken unrefused (None: none is)."""
        self._config = config
        self._probe_sender = probe_sender
        self._policy = policy
        self._queue_space = queue_space
        self._flush_site = flush_site
        self._rewriter = rewriter
        self._mapper = mapper
        self._cleanup = cleanup
        self.restrictions = Restrictions(config, config.smtpd, rewriter, mapper, resolver, tables,
                                         greylist=filters.greylist if filters else None,
                                         sender_auth=filters.sender_auth if filters else None,
                                         verifier=verifier)
        self.filter_services = filters  # the server's shared filters this handler uses (a reload retires them)
        self._filters = filters.for_listener(config) if filters is not None else None
        self._no_recipient_checks = "no_unknown_recipient_checks" in config.smtpd.receive_override_options
        self._peer_names = PeerNames(resolver) if config.smtpd.peername_lookup else None
        self.submitting = 0  # DATA hand-overs waiting for their commit
        self._instances = itertools.count(1)  # the policy protocol's `instance` attribute: one per message

    def resolved_address(self, addr: str) -> str:
        """`addr` as Postfix's smtpd_resolve_addr makes it before a table is asked it (qualified with myorigin,
        the percent hack applied): what the [smtpd] reject_sender_login_mismatch setting asks sender_login_maps.
        Raises LookupRetry."""
        return self._rewriter.resolved_address(addr)

    async def _header_rewriting(self, server, session: SessionState) -> dict:
        """What cleanup does to the headers of this client's message (Postfix 2.6+): for a client of
        local_header_rewrite_clients it adds the Message-ID, Date and From the
        message lacks and qualifies its header addresses with myorigin; for another client it adds nothing
        (unless always_add_missing_headers) and rewrites header addresses only when remote_header_rewrite_domain
        names a domain to qualify them with."""
        config = self._config
        local = await self._is_local_rewrite_client(server, session)
        return {"add_missing_headers": local or config.always_add_missing_headers,
                "header_rewrite_domain": "" if local else config.remote_header_rewrite_domain or None}

    async def _is_local_rewrite_client(self, server, session: SessionState) -> bool:
        """permit_inet_interfaces asks the connection's client (after PROXY, not XCLIENT's ADDR), as Postfix's
        smtpd_check_rewrite asks state->sockaddr; the other rules ask the client as PROXY or XCLIENT named it."""
        ip = session.peer_ip
        for rule in self._config.local_header_rewrite_clients:
            if rule == "permit_inet_interfaces" and session.on_this_host:
                return True
            if rule == "permit_mynetworks" and self.restrictions.trusted(ip, session.client_name):
                return True
            if rule == "permit_sasl_authenticated" and session.authenticated:
                return True
            if rule in ("permit_tls_clientcerts", "permit_tls_all_clientcerts") and await self._certificate_permits(
                    rule, session):
                return True
        return False

    async def _certificate_permits(self, rule: str, session: SessionState) -> bool:
        """The certificate rules of local_header_rewrite_clients, as Postfix's smtpd_check_rewrite asks them. A
        relay_clientcerts that cannot answer counts as no match here (logged; Postfix answers MAIL with 451 4.3.0:
        mailflow decides at the end of DATA)."""
        cipher = session.ssl.get("cipher") if isinstance(session.ssl, dict) else None
        protocol = str(cipher[1]) if cipher and len(cipher) > 1 else ""
        try:
            return await self.restrictions.certificate_permits(rule, session.client_cert, protocol)
        except LookupRetry as e:
            log.warning("local_header_rewrite_clients: %s: relay_clientcerts lookup error: %s", rule, e.reason)
            return False

    async def handle_CLIENT(self, server, session: SessionState, envelope: Transaction,
                            command: str) -> status.Reply | None:
        """Before the greeting, at connect or after XCLIENT (`command`), as Postfix's smtpd_proto: the reply that
        takes the greeting's place, or None (220). With delay_reject false, the client list first (Postfix's
        smtpd_check_client): its refusal, logged, denies every later command but QUIT (`session.access_denied`),
        and the milters are not told of the client; its DEFER_IF_PERMIT is kept for the RCPT lists. Then the
        milters' connect event (`_milters_connect`)."""
        if not self._config.smtpd.delay_reject:
            facts = self._facts(session, envelope, "", stage="client", command=command)
            refusal = await self.restrictions.check_early("client", facts)
            session.defer_if_permit_client = facts.defer_if_permit
            if refusal is not None:
                server.log_reject(command, refusal)
                session.access_denied = refusal
                return refusal
        if self._filters is None or not self._filters.has_milters:  # (nothing more per connection without milters)
            return None
        with server.untimed():  # (the milters' wait: smtpd_timeout is the client's)
            return await self._milters_connect(self._filters, server, session, command)

    @staticmethod
    async def _milters_connect(filters: ListenerFilters, server, session: SessionState,
                               command: str) -> status.Reply | None:
        """The milters told of the client, as Postfix's smtpd_proto and check_milter_reply: a refusal is logged
        (`NOQUEUE: milter-reject: CONNECT from host[ip]: 550 5.7.1 Command rejected; proto=SMTP`) and answers every
        MAIL of the session; a 5xx puts `554 host ESMTP not accepting connections` in the greeting's place, a 421
        `421 host Service unavailable - try again later` (the session ends), a 4xx leaves the 220. A quarantine (a
        milter_default_action) is logged `milter-hold: CONNECT from …: milter triggers HOLD action`."""
        verdict = await filters.connect(session)
        if not _log_milter_verdict(server, command, verdict) or verdict.reply is None:
            return None
        code = verdict.reply.code
        return status.milter_connect_refused(server.hostname, code) if code == 421 or code >= 500 else None

    async def handle_HELLO(self, server, session: SessionState, envelope: Transaction, command: str,
                           hostname: str) -> status.Reply | None:
        """delay_reject false: the helo list at HELO or EHLO (`command`), before the command changes the session, as
        Postfix's smtpd_check_helo: its refusal (logged with the name refused) or None. Its DEFER_IF_PERMIT, the
        client list's included, is kept for the RCPT lists, whatever the verdict (Postfix's defer_if_permit_helo).
        Inside a transaction the lists and the log see its sender and its last accepted recipient, as Postfix's."""
        if self._config.smtpd.delay_reject:
            return None
        last = envelope.rcpt_tos[-1] if envelope.rcpt_tos else ""
        facts = self._facts(session, envelope, last, stage="helo", command=command)
        facts.helo = helo_name(hostname)
        facts.defer_if_permit = session.defer_if_permit_client
        refusal = await self.restrictions.check_early("helo", facts)
        session.defer_if_permit_helo = facts.defer_if_permit
        if refusal is not None:
            server.log_reject(command, refusal, last, helo=facts.helo)
        return refusal

    async def handle_HELO(self, server, session: SessionState, envelope: Transaction,
                          hostname: str) -> str | status.Reply:
        """Milters are told of HELO (`_greeted`): their 421 answers it; without milters aiosmtpd's default
        stands."""
        refusal = await self._greeted(server, session, "HELO", hostname)
        return refusal if _closes(refusal) else f"250 {server.hostname}"

    async def handle_EHLO(self, server, session: SessionState, envelope: Transaction, hostname: str,
                          responses: list[str]) -> list[str] | status.Reply:
        """Milters are told of EHLO (`_greeted`): their 421 answers it; their 5xx (at connect or HELO) leaves
        ENHANCEDSTATUSCODES the only keyword offered, as Postfix's ehlo_cmd (Sendmail's way); else smtpd's list
        with PIPELINING and ENHANCEDSTATUSCODES added."""
        refusal = await self._greeted(server, session, "EHLO", hostname)
        if _closes(refusal):
            return refusal
        if refusal is not None and refusal.code >= 500:
            return OnlyKeywords([responses[0], "250 ENHANCEDSTATUSCODES"])
        keywords = [r[4:] for r in responses[1:]]
        keywords[1:1] = ["PIPELINING"]
        keywords.append("ENHANCEDSTATUSCODES")
        lines = [responses[0]] + [f"250-{k}" for k in keywords]
        lines[-1] = "250 " + lines[-1][4:]
        return lines

    def handle_OTHER(self, server, session: SessionState, envelope: Transaction) -> status.Reply | None:
        """Before VRFY, ETRN, STARTTLS and AUTH (protocol.py): the milters' refusal that holds for the session (at
        connect or HELO), as Postfix's milter_other_event; None without one."""
        return self._filters.standing_refusal(session) if self._filters is not None else None

    async def _greeted(self, server, session: SessionState, command: str, hostname: str) -> status.Reply | None:
        """HELO or EHLO (`command`) `hostname`: the milters told of it (`_milters_helo`), and their refusal returned
        (None: none, or no milters); the session takes the name unless the refusal `_closes` it, and answers the
        command."""
        refusal = None
        if self._filters is not None:
            refusal = await self._milters_helo(self._filters, server, session, command, hostname)
        if not _closes(refusal):
            session.host_name = helo_name(hostname)
        return refusal

    @staticmethod
    async def _milters_helo(filters: ListenerFilters, server, session: SessionState, command: str,
                            hostname: str) -> status.Reply | None:
        """The milters told of HELO or EHLO (`command`), as Postfix's helo_cmd and check_milter_reply: a refusal,
        theirs or one standing from connect, is logged (`NOQUEUE: milter-reject: EHLO from host[ip]: 550 5.7.1
        Command rejected; proto=SMTP helo=<name>`) and answers every MAIL; the command's reply stays 250 unless
        it is a 421, which answers it (and ends the session). A quarantine is logged `milter-hold`. The refusal, or
        None."""
        with server.untimed():
            verdict = await filters.helo(session, hostname)
        if not _log_milter_verdict(server, command, verdict, helo=helo_name(hostname)):
            return None
        return verdict.reply

    async def handle_ETRN(self, server, session: SessionState, envelope: Transaction, site: str) -> str | status.Reply:
        """RFC 1985: the mail deferred for `site` is retried now, when the lists let the client ask (its refusal
        logged as Postfix logs it) and the site is one of relay_domains or below one (Postfix's default
        fast_flush_domains); any other site gets 459, logged as Postfix logs it."""
        refusal = await self._etrn_refusal(session, envelope, site)
        if refusal is not None:
            server.log_reject("ETRN", refusal)
            return refusal
        domain = address.normalise_domain(site)
        # Postfix's flush matches fast_flush_domains with midna_domain_to_ascii's name, which refuses one past 253
        # octets: a 254-255 octet site, though valid_hostname takes it, is never a flush domain
        if (self._flush_site is None or len(domain) > _FLUSH_NAME_MAX
                or domain not in self._rewriter.relay_domains):
            log.warning("reject: ETRN %s... from %s", printable(site[:100]), session.client)
            return status.etrn_refused(site)
        try:
            await self._flush_site(domain)
        except Exception as e:  # the store is failing: the client may ask again later
            log.error("ETRN %s from %s: cannot flush the queue: %s", domain, session.client, e)
            return status.ETRN_FAILED
        return status.ETRN_STARTED

    async def _etrn_refusal(self, session: SessionState, envelope: Transaction, site: str) -> status.Reply | None:
        """Postfix's smtpd_check_etrn: the client and helo lists (delay_reject true; false: their DEFER_IF_PERMIT,
        kept in the session), then etrn_restrictions."""
        facts = self._facts(session, envelope, "", stage="etrn", command="ETRN")
        facts.etrn_domain = site
        if not self._config.smtpd.delay_reject:
            facts.defer_if_permit = session.defer_if_permit_before_mail
        return await self.restrictions.check_etrn(facts)

    async def handle_MAIL(self, server, session: SessionState, envelope: Transaction, addr: str,
                          options: list[str]) -> str | status.Reply:
        sender = "" if addr == NULL_SENDER else addr
        if address.is_utf8(sender) and "SMTPUTF8" not in options:  # (its syntax: address_refusal)
            return status.SMTPUTF8_REQUIRED
        if await self._short_of_space(_declared_size(options)):
            server.log_reject("MAIL", status.INSUFFICIENT_STORAGE, sender=addr)
            return status.INSUFFICIENT_STORAGE
        own = self._own_probe_sender(sender)  # a stamped probe sender of this server is checked and kept unstamped
        written, sender = sender, own or sender
        refusal = await self._sender_list_refusal(session, envelope, sender, options) or \
            await self._policy_sender_refusal(session, envelope, sender)
        action = "reject"
        if refusal is None and self._filters is not None:  # (`written`: the sender as the command gave it)
            with server.untimed():
                refusal = await self._filters.mail(session, envelope, sender, options, written)
            action = "milter-reject"
        if refusal is not None:
            envelope.marks = Marks()  # what the sender list marked goes with the refused MAIL (Postfix's mail_reset)
            if action == "reject":  # (a milter's reply text is its own: Postfix passes it on unchanged)
                refusal = status.naming_internal_form(refusal, sender)
            server.log_reject("MAIL", refusal, sender=addr, action=action)
            return refusal
        envelope.mail_from = own or addr
        envelope.mail_options.extend(options)
        return str(status.SENDER_OK)

    def _own_probe_sender(self, addr: str) -> str | None:
        """Postfix's valid_verify_sender_addr: `addr` is this server's probe sender (its stamp, if any, within one
        sender_ttl of now): that address without the stamp; else None."""
        return self._probe_sender.own(addr) if self._probe_sender is not None and addr else None

    async def _short_of_space(self, declared: int) -> bool:
        """Postfix's smtpd_check_queue (its warning, at most once a minute, says how much is free) and the declared
        SIZE's check."""
        if self._queue_space is None:
            return False
        free = await self._queue_space.free()
        if free is None:  # cannot tell: the commit will say whether the disk works
            return False
        short = short_of_space(free, self._config.queue.queue_minfree, self._config.smtpd.message_size_limit,
                               declared)
        if short and short_of_space(free, self._config.queue.queue_minfree, self._config.smtpd.message_size_limit, 0):
            self._queue_space.warn_short(free)  # (not when only the declared SIZE does not fit)
        return short

    async def handle_RCPT(self, server, session: SessionState, envelope: Transaction, addr: str,
                          options: list[str]) -> str | status.Reply:
        """The session has checked the path syntax and the recipient limit. A policy refusal is logged as Postfix
        logs it (`NOQUEUE: reject: RCPT from …`). The first recipient accepted gives the transaction its queue
        id."""
        refusal = status.SMTPUTF8_REQUIRED if address.is_utf8(addr) and not envelope.smtp_utf8 else None
        own = self._own_probe_sender(addr)
        if refusal is None:  # (its syntax: address_refusal)
            # RFC 5321 4.5.1: the bare `postmaster` must be taken, whoever asks; Postfix's smtpd_check_rcpt says
            # OK to it before any restriction (cleanup qualifies it with @myorigin). So is this server's probe
            # sender, as Postfix's smtpd takes it (a site verifying our probes' sender must not be refused)
            if addr.lower() != "postmaster" and own is None:
                refusal = await self.check_recipient(session, envelope, addr)
            action = "reject"
            if refusal is None and self._filters is not None:  # (as Postfix: the milters' macro unstamped)
                with server.untimed():
                    refusal = await self._filters.rcpt(session, envelope, own or addr, addr)
                action = "milter-reject"
            if refusal is not None:
                if action == "reject":  # (as at MAIL: a milter's text is not rewritten)
                    refusal = status.naming_internal_form(refusal, addr)
                server.log_reject("RCPT", refusal, addr, action=action)
        if refusal is not None:
            return refusal
        if not envelope.queue_id:  # Postfix's smtpd opens its queue file here: `QID: client=` is logged
            envelope.queue_id = self._cleanup.begin(session.client_info(envelope), envelope.auth_sender)
        envelope.rcpt_tos.append(own or addr)
        envelope.rcpt_options.extend(options)
        return str(status.RCPT_OK)

    def address_refusal(self, server, session: SessionState, envelope: Transaction, command: str, addr: str,
                        smtputf8: bool) -> status.Reply | None:
        """MAIL's or RCPT's address as Postfix's extract_addr judges it, before the command's parameters: a
        malformed one (`_malformed`) is logged as Postfix's "Illegal address syntax", with the path as sent, and
        refused with 501 5.1.7 / 5.1.3, no address named; else None."""
        if not self._malformed(addr, smtputf8):
            return None
        server.record.lines.illegal_address(session.client, command, server.path_as_sent)
        return status.SENDER_SYNTAX if command == "MAIL" else status.RECIPIENT_SYNTAX

    async def check_recipient(self, session: SessionState, envelope: Transaction, addr: str) -> status.Reply | None:
        """The policy hook, the restriction lists, then whether the routing tables can answer for `addr`: a
        refusal, or None."""
        facts = self._recipient_facts(session, envelope, addr)
        if self._policy is not None:
            refusal = await self._policy_refusal("rcpt", facts, (*envelope.rcpt_tos, addr))
            if refusal is not None:
                return refusal
        return await self._recipient_lists(session, facts)

    def _recipient_facts(self, session: SessionState, envelope: Transaction, addr: str, command: str = "") -> Facts:
        facts = self._facts(session, envelope, addr, command=command)
        if not self._config.smtpd.delay_reject:  # the DEFER_IF_PERMIT of the lists run at connect, HELO and MAIL
            facts.defer_if_permit = envelope.defer_if_permit_sender
        return facts

    async def _recipient_lists(self, session: SessionState, facts: Facts) -> status.Reply | None:
        """The restriction lists, then whether the routing tables can answer for the recipient. The sender list's
        DEFER_IF_PERMIT, when it ran, is the session's from then on."""
        facts.defer_if_permit_sender = session.defer_if_permit_sender
        refusal = await self.restrictions.check_rcpt(facts)
        session.defer_if_permit_sender = facts.defer_if_permit_sender
        if refusal is not None or self._no_recipient_checks:
            return refusal
        return await self._unroutable(facts.recipient)

    async def handle_VRFY(self, server, session: SessionState, envelope: Transaction, addr: str,
                          written: str, smtputf8: bool) -> status.Reply | None:
        """VRFY (`written` the argument as the client wrote it, `smtputf8` whether its last word was SMTPUTF8), as
        Postfix's vrfy_cmd and smtpd_check_rcpt: a malformed address is refused (501 5.1.3, logged as Postfix's
        "Illegal address syntax"); a UTF-8 one without the SMTPUTF8 word too (553 5.6.7, as MAIL and RCPT refuse
        it undeclared: Postfix's vrfy_cmd under strict_smtputf8, without its mail_reset: the transaction goes on);
        then, but for `postmaster`, the restriction lists and the recipient tables, as at RCPT (not the policy
        hook nor the milters): their refusal, logged `NOQUEUE: reject: VRFY from …`, or None (252)."""
        if self._malformed(addr, smtputf8):
            server.record.lines.illegal_address(session.client, "VRFY", written)
            return status.RECIPIENT_SYNTAX
        if address.is_utf8(addr) and not smtputf8:
            return status.SMTPUTF8_REQUIRED
        if addr.lower() == "postmaster":  # RFC 5321 4.5.1, as at RCPT
            return None
        refusal = await self._recipient_lists(session, self._recipient_facts(session, envelope, addr, command="VRFY"))
        if refusal is not None:
            refusal = status.naming_internal_form(refusal, addr)
            server.log_reject("VRFY", refusal, addr)
        return refusal

    async def _sender_list_refusal(self, session: SessionState, envelope: Transaction, sender: str,
                                   options: list[str]) -> status.Reply | None:
        """delay_reject false: the sender list at MAIL, as Postfix's smtpd_check_mail (MAIL's SIZE= is the
        message's size by then). Its DEFER_IF_PERMIT, the client and helo lists' included, is kept with the
        transaction for its RCPT lists."""
        if self._config.smtpd.delay_reject:
            return None
        facts = self._facts(session, envelope, "", stage="sender", command="MAIL")
        facts.sender, facts.size = sender, _declared_size(options)
        facts.defer_if_permit = session.defer_if_permit_before_mail
        refusal = await self.restrictions.check_early("sender", facts)
        envelope.defer_if_permit_sender = session.defer_if_permit_sender = facts.defer_if_permit
        return refusal

    async def _policy_sender_refusal(self, session: SessionState, envelope: Transaction,
                                     sender: str) -> status.Reply | None:
        """The policy hook at MAIL FROM (before the milters)."""
        if self._policy is None:
            return None
        facts = self._facts(session, envelope, "", stage="mail", command="MAIL")
        facts.sender = sender
        return await self._policy_refusal("mail", facts, ())

    async def _unroutable(self, addr: str) -> status.Reply | None:
        try:
            await self._rewriter.tables.run(self._rewriter.resolve, addr)  # a table that cannot answer now: retry
        except LookupRetry as e:
            log.warning("RCPT <%s>: %s", printable(addr), e.reason)
            return status.error_reply(e, addr)
        return None

    def _malformed(self, addr: str, smtputf8: bool) -> bool:
        """Whether MAIL, RCPT or VRFY refuses `addr` as a syntax error: its syntax once qualified and resolved (an
        unqualified address is taken, and qualified by cleanup: Postfix's @$myorigin; the percent hack of a local
        domain applied, so that `user%y..test@here` is refused as Postfix's smtpd_check_addr refuses it); without
        `smtputf8` (the transaction did not declare SMTPUTF8; VRFY without it as its last word), a domain that is
        not ASCII (Postfix's smtpd_check_addr: before the 553 that a UTF-8 local part gets); or, with Postfix's
        allow_min_user = no, a leading '-' (it could reach a command's argv as an option); or a local part that is
        empty or begins with `@`, before an IPv6 address literal (`""@[IPv6:::1]`, `"@x"@[IPv6:::1]`): its internal
        form `@[IPv6:::1]` (`@x@[IPv6:::1]`) Postfix's trivial-rewrite reads as a source route ending at the
        literal's first `:`, so that its smtpd_check_addr refuses it. A `:` in the local part is no such thing
        (`"@x:y"@remote.test` is taken)."""
        qualified = self._rewriter.resolved_address(addr)
        if address.mailbox_syntax_error(qualified):
            return True
        domain = address.split(qualified)[1]
        if not (smtputf8 or domain.isascii()):
            return True
        if ":" in domain and address.internal_form(qualified).startswith("@"):  # (the cheap test first)
            return True
        return not self._config.allow_min_user and address.is_min_user(addr)

    async def handle_DATA(self, server, session: SessionState, envelope: Transaction) -> str | status.Reply:
        """The end of the message: the policy hook's "data" stage and the end_of_data list (the data list ran at
        DATA: `handle_DATA_COMMAND`), the filters (milters, scanners; with sender authentication before the
        end_of_data list), then cleanup (or DISCARD / HOLD)."""
        verdicts = await self._filters.auth_verdicts(session, envelope) if self._filters is not None else None
        refusal = await self._content_refusal(session, envelope, verdicts)
        if refusal is not None:
            server.log_reject("END-OF-MESSAGE", refusal, envelope.single_recipient)
            return refusal
        assert envelope.content is not None
        marks = envelope.marks
        submission = Submission(envelope=envelope.model_envelope().with_bcc(marks.bcc).redirected(marks.redirect),
                                content=envelope.content, client=session.client_info(
                                    envelope, login_in_received=self._config.smtpd.sasl_authenticated_header),
                                client_attributes=session.client_attributes(envelope), headers=tuple(marks.prepend),
                                queue_id=envelope.queue_id, redirected=marks.redirect is not None,
                                **await self._header_rewriting(server, session))
        if self._filters is not None and marks.discard is None:
            with server.untimed():  # (Postfix's cleanup talks to them: smtpd's client timeout does not run)
                outcome = await self._filters.end_of_message(session, submission, verdicts, marks)
            if outcome.refusal is not None:
                if not outcome.logged:
                    server.log_reject("END-OF-MESSAGE", outcome.refusal, envelope.single_recipient)
                return outcome.refusal
            marks.discard = marks.discard or outcome.discard
            marks.hold = marks.hold or outcome.hold
            submission = outcome.submission or submission
        elif marks.filter is not None:
            submission = dataclasses.replace(submission, content_filter=marks.filter)
        if marks.discard is not None:
            return str(self._discard(submission, envelope.bdat_octets))
        self.submitting += 1
        try:
            if marks.hold is not None:
                queue_id = await self._cleanup.submit(submission, hold=True)
            else:
                queue_id = await self._cleanup.submit(submission)
            envelope.queued_as = queue_id
        except Exception as error:  # not queued: the table says what the client is told
            reply = status.error_reply(error)
            _log_not_queued(session.client, error, reply)
            return reply
        finally:
            self.submitting -= 1
        if marks.hold is not None and not marks.hold_logged:  # (an access HOLD's line is logged where met)
            server.log_reject("END-OF-MESSAGE", marks.hold, envelope.single_recipient, action="hold")
        return str(status.queued(queue_id, envelope.bdat_octets))

    async def handle_DATA_COMMAND(self, server, session: SessionState, envelope: Transaction,
                                  command: str) -> status.Reply | None:
        """DATA, or a transaction's first BDAT (`command`), before any content: data_restrictions, where Postfix's
        smtpd_check_data runs them. Their refusal (logged `NOQUEUE: reject: DATA from …`, the recipient named
        only when there is one) is the command's reply; None: go on."""
        if not self.restrictions.check_data_command:
            return None
        rcpt = envelope.single_recipient
        facts = self._facts(session, envelope, rcpt, stage="data", command=command)
        refusal = await self.restrictions.check_data(facts)
        if refusal is not None:
            server.log_reject(command, refusal, rcpt)
        return refusal

    async def _content_refusal(self, session: SessionState, envelope: Transaction,
                               verdicts=None) -> status.Reply | None:
        """The policy hook, then end_of_data_restrictions (which see the sender authentication `verdicts`)."""
        if not self.restrictions.check_content and self._policy is None:
            return None
        rcpt = envelope.single_recipient
        if self._policy is not None:
            facts = self._facts(session, envelope, rcpt, stage="data")
            refusal = await self._policy_refusal("data", facts, tuple(envelope.rcpt_tos))
            if refusal is not None:
                return refusal
        facts = self._facts(session, envelope, rcpt, stage="end_of_data")
        facts.size = envelope.content.size if envelope.content is not None else 0
        facts.auth = verdicts
        return await self.restrictions.check_end_of_data(facts)

    async def _policy_refusal(self, stage: str, facts: Facts, recipients: tuple[str, ...]) -> status.Reply | None:
        """The hook's answer as a refusal, or None when it refuses nothing."""
        if self._policy is None:
            return None
        answer = await self._policy.check(stage, facts, recipients)
        if not answer:
            return None
        name, what = HOOK_SUBJECT[stage](facts)
        verdict = await self.restrictions.action(answer, name, what, facts, source="policy hook", stage=stage)
        return verdict if isinstance(verdict, status.Reply) else None

    @staticmethod
    def _discard(submission: Submission, octets: int | None) -> status.Reply:
        """Accepted and dropped (Postfix DISCARD): the client is told it was queued, under the queue id the
        transaction took at its first recipient (the DISCARD's line was logged where it was met); `octets`: a
        BDAT message's size."""
        return status.queued(submission.queue_id, octets)

    def new_spool(self, max_size: int | None) -> Spool:
        """Where the session writes DATA/BDAT content as it arrives (cleanup's, i.e. the queue's)."""
        return self._cleanup.new_spool(max_size)

    async def handle_CONNECT(self, server, session: SessionState, envelope: Transaction) -> None:
        """A new client (after the PROXY header, if any): its name, as Postfix's smtpd looks it up at connect
        (peername.py), unless peername_lookup is off; whether it is this host (permit_inet_interfaces)."""
        session.on_this_host = _on_this_host(session.peer_ip, server.transport)
        if self._peer_names is not None:
            session.client_name = await self._peer_names.name(session.peer_ip)

    async def handle_XCLIENT(self, server, session: SessionState, envelope: Transaction) -> None:
        """XCLIENT named another client: the milters start again for it (filtering.client_changed)."""
        if self._filters is not None:
            await self._filters.client_changed(session)

    def handle_CLOSE(self, server, session: SessionState, envelope: Transaction) -> None:
        """The session ended (protocol.py calls this once): its milter connections are closed."""
        if self._filters is not None:
            self._filters.closed(session)

    async def handle_exception(self, error: Exception) -> status.Reply:
        """A handler's bug: logged, and a 451 filed as software (a notice under the default notify_classes)."""
        log.exception("unexpected error in a session", exc_info=error)
        return status.INTERNAL_ERROR

    # -------------------------------------------------------------------------------- facts

    def _given(self, xclient_value: str | None) -> str | None:
        """A client name as the restrictions take it without asking the DNS: XCLIENT's (`xclient_value`);
        UNAVAILABLE (no name) when peername_lookup is off (Postfix's smtpd_peer.c: name and reverse name "unknown",
        a permanent status); None: the name checks ask the DNS."""
        if xclient_value is not None or self._peer_names is not None:
            return xclient_value
        return UNAVAILABLE

    def _facts(self, session: SessionState, envelope: Transaction, rcpt: str, stage: str = "rcpt",
               command: str = "") -> Facts:
        if not envelope.policy_instance:  # one per message, unique across listeners
            envelope.policy_instance = f"{id(self):x}.{next(self._instances):x}"
        login = session.login
        cipher = session.ssl.get("cipher") if isinstance(session.ssl, dict) else None
        return Facts(
            client_addr=session.peer_ip,
            client_port=session.port_text,
            server_addr=session.server_ip,
            server_port=session.server_port,
            client_name=session.client_name,
            given_name=self._given(session.xclient_name),
            given_reverse_name=self._given(session.xclient_reverse_name),
            names_addr=session.names_addr,
            helo=session.host_name or "",
            sender=envelope.sender,
            recipient=rcpt,
            # at RCPT the count holds the recipient asked about (Postfix counts it there), not at VRFY
            recipient_count=len(envelope.rcpt_tos) + (1 if stage == "rcpt" and not command else 0),
            authenticated=bool(session.authenticated),
            sasl_method=session.auth_mechanism if login else "",
            sasl_username=login,
            protocol=session.protocol,
            size=_declared_size(envelope.mail_options),
            instance=envelope.policy_instance,
            queue_id=envelope.queue_id,
            encryption_protocol=cipher[1] if cipher and len(cipher) > 1 else "",
            encryption_cipher=cipher[0] if cipher else "",
            client_cert=session.client_cert,
            encrypted=session.ssl is not None,
            ill_pipelining=session.ill_pipelining,
            on_this_host=session.on_this_host,
            marks=envelope.marks,
            memo=session.memo.trimmed(),
            command=command,
        )


HOOK_SUBJECT = {  # what a refusal by the policy hook names, per stage (as restrictions name theirs)
    "mail": lambda facts: (facts.sender or "", "Sender address"),
    "rcpt": lambda facts: (facts.recipient, "Recipient address"),
    "data": lambda facts: ("END-OF-MESSAGE", "End-of-data"),
}


def _log_not_queued(client: str, error: BaseException, reply: status.Reply) -> None:
    """One line for a message from `client` (host[ip]) that was not queued: the error's reason (never shown to
    the client) and the reply; a traceback only for what is not a refusal, a full backlog nor a store or I/O
    fault (a probable bug). None for a content check's REJECT: cleanup logged it (`QID: reject: header …`), the one
    line Postfix writes for it (a second one, a warning, would be counted in pflogsumm's warnings)."""
    if isinstance(error, ContentRejected):
        return
    if isinstance(error, (DeliveryError, Overloaded)):
        log.warning("message from %s not queued: %s (%s)", client, _reason(error), reply)
    elif isinstance(error, EXPECTED):
        log.error("message from %s not queued: %s (%s)", client, describe(error), reply)
    else:
        log.exception("message from %s not queued (%s)", client, reply, exc_info=error)


def _reason(error: BaseException) -> str:
    if isinstance(error, DeliveryError):
        return error.reason
    return "too many writes waiting for the queue"  # Overloaded


def short_of_space(free: int, minfree: int, size_limit: int, declared: int) -> bool:
    """At least max(queue_minfree, 1.5 x message_size_limit) must stay free (Postfix's smtpd_check_queue), after
    a declared SIZE too, and a declared SIZE may take at most half of what is free (mailflow's addition, as
    older Postfix did: Postfix 3.7 compares SIZE only with message_size_limit; RFC 1870 allows the 452)."""
    return leaves_too_little(free, queue_floor(minfree, size_limit), declared) or declared >= free / 2


def _declared_size(options: list[str]) -> int:
    for option in options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return 0


def _on_this_host(ip: str, transport) -> bool:
    """Postfix's permit_inet_interfaces (own_inet_addr under inet_interfaces = all): the client's address is one of
    this host's interface addresses. Read from the connection: the client is the address it connected to (only a
    process on this host connects from it) and that address is an interface's: any non-loopback address a
    connection can reach is, and of the loopback range only 127.0.0.1 and ::1 are (lo's own addresses), so a
    process bound to 127.0.0.2 that reaches a wildcard listener on 127.0.0.2 is not this host, as in Postfix. An
    address added to lo by hand (127.0.0.2/8 as a second lo address) is refused where Postfix would permit it:
    the safe side, without reading the interfaces."""
    client = address.client_ip(ip)
    if client is None:
        return False
    local = transport.get_extra_info("sockname") if transport is not None else None
    if not isinstance(local, tuple) or address.client_ip(str(local[0])) != client:
        return False
    return not client.is_loopback or str(client) in ("127.0.0.1", "::1")


def _closes(refusal: status.Reply | None) -> TypeGuard[status.Reply]:
    """A milters' refusal of HELO or EHLO that answers the command and ends the session (421), as Postfix's
    helo_cmd and ehlo_cmd take check_milter_reply's 421; any other leaves the command's own reply."""
    return refusal is not None and refusal.code == 421


def _log_milter_verdict(server, command: str, verdict: Verdict, **where) -> bool:
    """A milters' answer to connect or HELO (one of theirs, or one that holds for the session), logged where it
    answers as Postfix's check_milter_reply logs it: a refusal `milter-reject: COMMAND from …: reply;`, a
    quarantine `milter-hold: COMMAND from …: milter triggers HOLD action;` (`where`: log_reject's helo=).
    Whether it is a refusal."""
    if verdict.action == "quarantine":
        action, text = MILTER_TRIGGERS["quarantine"]
        server.log_reject(command, text, action=action, **where)
        return False
    if verdict.reply is None or verdict.action not in ("reject", "tempfail"):
        return False
    server.log_reject(command, verdict.reply, action="milter-reject", **where)
    return True
