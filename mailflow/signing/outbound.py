"""Which message gets an SRS sender, an ARC seal and a DKIM signature, decided and done as cleanup queues it.

Why cleanup, at queue time (as Postfix runs OpenDKIM as a milter on cleanup): the signature is computed once and
is durable with the message, every delivery attempt and every transport sends the same bytes, and a message made
here (a notice, a forwarded copy) passes through the same door as one received.

    OutboundSigning(keys=, sign_forwarded=, arc_key=, authserv_id=, srs=, internal_networks=, is_remote=,
                    resolver=, clock=, log=, checkers=)
                                  `checkers`: the pool the seal's DKIM checks run in (dkim.checkers()): the
                                  caller's, which outlives this object (a reload replaces it while a seal may
                                  still use the pool) and closes it
      forwarded(submission, recipients) -> bool   local(8) forwarding (aliases, .forward: `Submission.forwarded`)
                                  to a remote recipient, or a recipient whose address is remote while the address it was
                                  given as is not (virtual alias expansion to a remote domain)
      own_mail(submission) -> bool     mail of this host's users: an authenticated client, a local submission
                                  (sendmail), a client in mynetworks (OpenDKIM's InternalHosts), a notice made here
      sign_notice(message) -> NewMessage   a notice made here (a bounce: in memory, small), signed at once
      await apply(message, submission) -> NewMessage   the message with its sender rewritten (SRS: forwarded mail
                                  whose sender is not of this host's domains) and with, on top of its header
                                  section, the DKIM-Signature and this host's Authentication-Results + ARC set

The header section is signed as it is queued, 8-bit bytes too: the SMTP client sends header fields as they are to
every peer (as Postfix's smtp(8)). Not so an entity labelled 8bit sent to a peer without 8BITMIME: its label and body
are converted (mailflow.transports.downgrade), which breaks a signature over them there, as with Postfix and
OpenDKIM (docs/deliverability.md). What is signed: own mail, with the key the
signing table gives the From address; forwarded mail only with `sign_forwarded`, with the key for the (rewritten)
envelope sender, else for the From address. ARC: forwarded mail held in memory (mailflow.signing.arc). The body of
a big message is streamed for its DKIM body hash, never held.
Failure behaviour: a signature or seal that cannot be made (dkimpy refuses the header section) is left off and
logged (`not_signed`); the message is queued all the same. OSError from reading a spooled body propagates (the
message is not queued: the client is told 451 and sends it again).
"""
from __future__ import annotations

import dataclasses
import email.utils
from typing import Callable

import dkim as dkimpy

from mailflow.clock import Clock
from mailflow.content import Content
from mailflow.dns import Resolver
from mailflow.logs import MailLog
from mailflow.message import header_value
from mailflow.model import NewMessage, Recipient, Submission
from mailflow.routing.srs import Srs
from mailflow.signing import arc, dkim
from mailflow.signing.keytables import Keys, SigningKey
from mailflow.tables.networks import NetworkList
from mailflow.workers import BoundedWorkers


def from_address(head: bytes) -> str:
    """The first address of the From field ('' when there is none)."""
    addresses = email.utils.getaddresses([header_value(head, "from")])
    return addresses[0][1] if addresses else ""


class OutboundSigning:
    def __init__(self, *, keys: Keys | None, sign_forwarded: bool, arc_key: SigningKey | None, authserv_id: str,
                 srs: Srs | None, internal_networks: NetworkList, is_remote: Callable[[str], bool],
                 resolver: Resolver, clock: Clock, log: MailLog, checkers: BoundedWorkers):
        self._keys = keys
        self._sign_forwarded = sign_forwarded
        self._arc_key = arc_key
        self._authserv_id = authserv_id
        self._srs = srs
        self._networks = internal_networks
        self._is_remote = is_remote
        self._resolver = resolver
        self._clock = clock
        self._log = log
        self._dkim_checkers = checkers  # (the seal's DKIM checks)

    def forwarded(self, sub: Submission, recipients: tuple[Recipient, ...]) -> bool:
        if sub.forwarded:
            return any(self._is_remote(r.address) for r in recipients)
        return any(r.address.lower() != r.original.lower() and self._is_remote(r.address)
                   and not self._is_remote(r.original) for r in recipients)

    def own_mail(self, sub: Submission) -> bool:
        client = sub.client
        if sub.submitter is not None or client.sasl_username or client.protocol == "local":
            return True
        return self._networks.contains(client.addr)

    async def apply(self, msg: NewMessage, sub: Submission) -> NewMessage:
        forwarded = self.forwarded(sub, msg.recipients)
        if forwarded:
            msg = self._rewrite_sender(msg)
        head, rest = _split(msg)
        key = self._signing_key(msg, sub, head, forwarded)
        arc_key = self._arc_key if forwarded else None
        sealed = await self._seal(msg, arc_key) if arc_key is not None else b""
        signature = await self._sign(msg, sealed + head, rest, key) if key is not None else b""
        if not (signature or sealed):
            return msg
        return dataclasses.replace(msg, content=Content((signature + sealed + head, *rest.parts)))

    def sign_notice(self, msg: NewMessage) -> NewMessage:
        """Notices are committed by qmgr with the results they report (no await in between): their content is
        small and in memory, so the signature is made here, synchronously."""
        head, rest = _split(msg)
        key = self._keys.for_address(from_address(head)) if self._keys is not None else None
        if key is None or not msg.content.in_memory:
            return msg
        try:
            signature = dkim.sign_now(head, rest, key, self._clock.time())
        except dkimpy.DKIMException as e:
            self._log.not_signed(msg.queue_id, "DKIM-Signature", str(e))
            return msg
        self._log.signed(msg.queue_id, "DKIM-Signature", key.domain, key.selector)
        return dataclasses.replace(msg, content=Content((signature + head, *rest.parts)))

    def _rewrite_sender(self, msg: NewMessage) -> NewMessage:
        if self._srs is None or not msg.sender or not self._is_remote(msg.sender):
            return msg
        rewritten = self._srs.forward(msg.sender)
        if rewritten == msg.sender:
            return msg
        self._log.sender_rewritten(msg.queue_id, msg.sender, rewritten)
        return dataclasses.replace(msg, sender=rewritten)

    def _signing_key(self, msg: NewMessage, sub: Submission, head: bytes, forwarded: bool) -> SigningKey | None:
        if self._keys is None:
            return None
        if forwarded:
            if not self._sign_forwarded:
                return None
            return self._keys.for_address(msg.sender) or self._keys.for_address(from_address(head))
        return self._keys.for_address(from_address(head)) if self.own_mail(sub) else None

    async def _sign(self, msg: NewMessage, head: bytes, rest: Content, key: SigningKey) -> bytes:
        try:
            signature = await dkim.sign(head, rest, key, self._clock.time())
        except dkimpy.DKIMException as e:
            self._log.not_signed(msg.queue_id, "DKIM-Signature", str(e))
            return b""
        self._log.signed(msg.queue_id, "DKIM-Signature", key.domain, key.selector)
        return signature

    async def _seal(self, msg: NewMessage, key: SigningKey) -> bytes:
        if not msg.content.in_memory:
            self._log.not_signed(msg.queue_id, "ARC set", "larger than the in-memory limit (256 KB)")
            return b""
        try:
            sealed = await arc.seal(msg.content.to_bytes(), key, self._authserv_id, self._resolver, self._clock.time(),
                                    self._dkim_checkers)
        except dkimpy.DKIMException as e:
            self._log.not_signed(msg.queue_id, "ARC set", str(e))
            return b""
        self._log.signed(msg.queue_id, "ARC-Seal", key.domain, key.selector)
        return sealed


def _split(msg: NewMessage) -> tuple[bytes, Content]:
    """The header section as cleanup wrote it (the content's first part, in memory) and the rest."""
    head, *rest = msg.content.parts
    if not isinstance(head, bytes):
        raise TypeError(f"{msg.queue_id}: the header section is not the content's first part")
    return head, Content(rest)
