"""smtpd's policy: the aiosmtpd hooks that decide what a client may do, and the hand-over to cleanup.

MAIL checks sender syntax; RCPT checks syntax, resolves the address class (trivial-rewrite), refuses relaying
for clients outside `mynetworks` (554 5.7.1), refuses recipients that neither a rewriting table (canonical,
virtual alias) nor their class's recipient table lists (550 5.1.1, naming the table), a table that cannot
answer (451 4.3.0) and recipients beyond `recipient_limit` (452 4.5.3); DATA hands a `Submission` to cleanup
and answers 250 only once cleanup has committed it.

Failure behaviour: every refusal is an SMTP reply from `mailflow.status`. A message cleanup could not commit
gets 451 and is not queued; an unexpected exception in a hook gets 451 4.3.0 and is logged; the session stays
usable. No reply text names a config detail.
"""
from __future__ import annotations

import ipaddress
import logging

from aiosmtpd.smtp import Envelope as SmtpEnvelope, Session

from mailflow import address, status
from mailflow.config import Config
from mailflow.errors import DeliveryError, LookupRetry
from mailflow.model import AddressClass, ClientInfo, Envelope, Submission
from mailflow.stages.addressmap import AddressMapper
from mailflow.stages.rewrite import UNKNOWN_IN, Rewriter
from mailflow.store import Overloaded

log = logging.getLogger("mailflow.smtpd")

NULL_SENDER = "<>"  # how aiosmtpd spells MAIL FROM:<>


class SmtpdHandler:
    """aiosmtpd hooks: the restrictions and the hand-over to cleanup."""

    def __init__(self, config: Config, rewriter: Rewriter, mapper: AddressMapper, cleanup):
        self._config = config
        self._rewriter = rewriter
        self._mapper = mapper
        self._cleanup = cleanup
        self._mynetworks = [ipaddress.ip_network(n, strict=False) for n in config.mynetworks]
        self.submitting = 0  # DATA hand-overs waiting for their commit

    async def handle_EHLO(self, server, session: Session, envelope, hostname: str, responses: list[str]):
        session.host_name = hostname
        keywords = [r[4:] for r in responses[1:] if r[4:] != "HELP"]
        keywords[1:1] = ["PIPELINING"]
        keywords.append("ENHANCEDSTATUSCODES")
        lines = [responses[0]] + [f"250-{k}" for k in keywords]
        lines[-1] = "250 " + lines[-1][4:]
        return lines

    async def handle_MAIL(self, server, session: Session, envelope: SmtpEnvelope, addr: str, options: list[str]):
        sender = "" if addr == NULL_SENDER else addr
        if sender:
            if address.mailbox_syntax_error(sender):
                return str(status.bad_sender_syntax(sender))
            if address.is_utf8(sender) and "SMTPUTF8" not in options:
                return str(status.SMTPUTF8_REQUIRED)
        envelope.mail_from = addr
        envelope.mail_options.extend(options)
        return str(status.SENDER_OK)

    async def handle_RCPT(self, server, session: Session, envelope: SmtpEnvelope, addr: str, options: list[str]):
        reply = self.check_recipient(session, envelope, addr)
        if reply.is_ok:
            envelope.rcpt_tos.append(addr)
            envelope.rcpt_options.extend(options)
        return str(reply)

    def check_recipient(self, session: Session, envelope: SmtpEnvelope, addr: str) -> status.Reply:
        if len(envelope.rcpt_tos) >= self._config.smtpd.recipient_limit:
            return status.TOO_MANY_RECIPIENTS
        if address.mailbox_syntax_error(self._rewriter.qualify(addr)):
            return status.bad_address_syntax(addr)
        if address.is_utf8(addr) and not envelope.smtp_utf8:
            return status.SMTPUTF8_REQUIRED
        klass = self._rewriter.classify(addr)
        if klass is AddressClass.DEFAULT and not self._trusted(session):
            return status.relay_denied(addr)
        try:
            if klass is not AddressClass.DEFAULT and not self._known(addr, klass):
                return status.user_unknown(addr, UNKNOWN_IN[klass])
            self._rewriter.resolve(addr)  # a routing table that cannot answer now: the client retries later
        except LookupRetry as e:
            log.warning("smtpd: RCPT <%s>: %s", addr, e.text)
            return status.lookup_failed(addr)
        return status.RCPT_OK

    def _known(self, addr: str, klass: AddressClass) -> bool:
        """Listed by a rewriting table (cleanup maps it) or by its class's recipient table (Postfix
        smtpd_reject_unlisted_recipient)."""
        return self._mapper.is_mapped(addr) or self._rewriter.recipient_known(addr, klass)

    async def handle_DATA(self, server, session: Session, envelope: SmtpEnvelope):
        submission = Submission(
            envelope=self._envelope(envelope),
            content=envelope.original_content or b"",
            client=self._client(session),
        )
        self.submitting += 1
        try:
            queue_id = await self._cleanup.submit(submission)
        except DeliveryError as e:
            return str(status.refused_message(e.dsn, e.text, e.permanent))
        except Overloaded:
            return str(status.QUEUE_FULL)
        except Exception:
            log.exception("smtpd: message from %s not queued", session.peer)
            return str(status.QUEUE_ERROR)
        finally:
            self.submitting -= 1
        return str(status.queued(queue_id))

    async def handle_exception(self, error: Exception) -> str:
        log.exception("smtpd: unexpected error in a session", exc_info=error)
        return str(status.INTERNAL_ERROR)

    def _trusted(self, session: Session) -> bool:
        try:
            ip = ipaddress.ip_address(session.peer[0])
        except (ValueError, TypeError, IndexError):
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._mynetworks)

    @staticmethod
    def _envelope(envelope: SmtpEnvelope) -> Envelope:
        sender = "" if envelope.mail_from == NULL_SENDER else envelope.mail_from
        body = "8BITMIME" if "BODY=8BITMIME" in envelope.mail_options else "7BIT"
        return Envelope(sender, tuple(envelope.rcpt_tos), smtputf8=envelope.smtp_utf8, body_type=body)

    @staticmethod
    def _client(session: Session) -> ClientInfo:
        host, port = (session.peer or ("unknown", 0))[:2]
        return ClientInfo(addr=host, port=port, helo=session.host_name or "",
                          protocol="ESMTP" if session.extended_smtp else "SMTP")
