"""cleanup: turns an accepted Submission into a queued message, durably.

What it does, in order (Postfix cleanup(8)):
1. assigns the queue id, and logs smtpd's `QID: client=` at once (Postfix logs it when the queue file is made,
   so a message the checks below refuse or drop is still counted as received, as pflogsumm counts Postfix's);
   a message from smtpd comes with its id (`Submission.queue_id`): smtpd took it, and logged `client=`, at the
   first accepted recipient (`begin`: Postfix's smtpd opens its queue file there), so cleanup takes none;
2. refuses a message that has looped (`hopcount_limit` Received headers, the one this host adds counted, as
   Postfix counts): 554 5.4.0 (Postfix's reply),
   and one whose header section is larger than `header_size_limit` bytes: 552 5.3.4 (a header flood never
   reaches the queue);
3. inspects the content of mail from outside (`ContentChecks`: header_checks, mime/nested_header_checks,
   body_checks, unless `Submission.overrides` (receive_override_options: the listener's for smtpd's mail,
   [smtpd]'s for pickup's) say no_header_body_checks; never a forwarded copy
   nor a notice made here, as Postfix's local and bounce submit those without CLEANUP_FLAG_FILTER and its default
   internal_mail_filter_classes is empty, so a header_checks BCC copies a message once, not each forwarded copy
   again): REJECT refuses it (550 5.7.1), DISCARD
   drops it (the client is told it was queued), HOLD queues it on hold, FILTER, REDIRECT, BCC, IGNORE, PREPEND
   and REPLACE change what is queued (a BCC is added as the automatic ones are, after them: `Bcc`; a REDIRECT
   leaves no BCC recipient of either kind, as Postfix's queue manager redirects them all); the checks run first
   (`_built`), before step 2's limits (a header section over the limit is not inspected, step 2 refuses it) and
   the envelope rewriting below, which works on the envelope they leave;
4. rewrites the envelope (`AddressMapper.for_message`, its warnings under the queue id): the sender through
   sender_canonical/canonical maps and
   masquerading; each recipient through recipient_canonical/canonical maps and virtual alias expansion,
   duplicates removed, each keeping the address first given as its original (ORCPT); for mail from outside
   (smtpd, sendmail: `_from_outside`) the automatic BCC recipients too (sender_bcc_maps, recipient_bcc_maps,
   always_bcc; NOTIFY=NEVER), never for forwarded copies and notices (so a BCC copy cannot loop); looked up on
   the envelope as received when milters edited it (`Submission.received`), as Postfix's cleanup looks them up
   before its milters run: a milter-added recipient gets no recipient_bcc_maps copy, a deleted one keeps its copy,
   a CHGFROM adds the new sender's copy to the first's; an envelope of more than MAP_INLINE recipients
   (MAP_INLINE_PLAIN when no virtual alias map may expand one into many) is rewritten in a worker thread (as one
   whose tables may block), the others on the event loop;
4a. removes the header fields of `message_drop_headers` (Postfix's default: Bcc, Resent-Bcc, Return-Path,
   Content-Length), so a blind copy's recipients are never shown to the others (not those a milter added,
   `Submission.milter_fields`: kept after the fields cleanup adds, as Postfix keeps a milter's Bcc; they make no
   message a resent one); rewrites the addresses of the address fields (`Submission.header_rewrite_domain`;
   mailflow.header_addresses): an unqualified one gets @myorigin (or the remote_header_rewrite_domain), then
   canonical maps and masquerading by the field's class, as Postfix does for mail from this host (smtpd:
   local_header_rewrite_clients) and local submissions;
4b. prepends a Received header (naming the client's AUTH login when smtpd was told to, `ClientInfo.received_login`:
   `(Authenticated sender: LOGIN)` on its second line, as Postfix's smtpd_sasl_authenticated_header; for a local
   submission "by HOST (mailflow, from userid UID)", for a notice "by
   HOST (mailflow)", both without smtpd's `for <recipient>`, as Postfix's pickup and bounce write them) and
   under it the
   header fields smtpd gave (`Submission.headers`: Authentication-Results, spam and virus tags, access PREPEND);
   appends Message-ID, Date and From (Resent-Message-ID, Resent-Date, Resent-From for a message with Resent-
   fields) when the message has none and `Submission.add_missing_headers` says so
   (smtpd: local_header_rewrite_clients; a local user's From carries their full name);
   a field written with blanks before its colon (`Subject : x`) is written `Subject: x`, as Postfix's cleanup
   writes it (the content checks see it so too);
   only the header section is read (at most `header_size_limit` bytes, mailflow.message.read_header): the
   queued content is the new header section followed by the original's body, never copied (a spooled
   body stays in its file, see mailflow.content);
4c. marks the message 8BITMIME when a header section in it (its own, a MIME part's, an attached message's) says
   `Content-Transfer-Encoding: 8bit` or `binary`, whatever BODY the client gave (Postfix's auto_8bit_enc_hdr;
   mailflow.transports.downgrade.labelled_8bit: the content is read for it only when it has those words);
4d. marks the message SMTPUTF8 when smtputf8_autodetect_classes names its origin (`sendmail`: a local
   submission, `smtpd`: a client's, `forward`: a forwarded copy; `all`; default sendmail, verify) and a header
   section in it (its own as queued but for the fields 4b added: the From made from a full name does not count,
   as Postfix's writes them past cleanup_out_header; a MIME part's, an attached message's) has a byte that is not
   ASCII, as Postfix's cleanup (cleanup_out_header: SMTPUTF8_FLAG_HEADER, then SMTPUTF8 requested with
   CLEANUP_FLAG_AUTOUTF8);
   so a peer without SMTPUTF8 gets no such message (5.6.7). Streamed as in 4c, the part headers read only when
   the message has parts (mailflow.transports.downgrade.utf8_header_section);
5. when configured (mailflow.signing.outbound): rewrites a forwarded message's sender (SRS), seals
   it (ARC) and signs this host's mail (DKIM, over the header section as queued, 8-bit bytes too: the SMTP client
   sends them as they are), the body hash streamed; off, none of it costs anything;
6. commits message, recipients and content in one group-committed transaction, with the message's after-queue
   content filter (`Submission.content_filter`, else [smtpd] content_filter; a FILTER action wins) and the
   client attributes the delivery agents get (`Submission.client_attributes`, as given);
6a. a requeued message (`resubmit`, for pickup) goes through steps 2 to 4c again under a new queue id and replaces
   the old message in one transaction (Store.replace_requeued); not 4d: it keeps the SMTPUTF8 it was stored with
   (Postfix's pickup skips the autodetect for requeued mail, MAIL_IS_REQUEUED; else pickup's requeue, a local
   submission, would mark a client's message with an 8-bit Subject SMTPUTF8);
7. logs pickup's `uid=`, `message-id=` and `queued` (qmgr's `from=` line: not for a message put on hold, which
   gets it from qmgr when released, as in Postfix), and wakes qmgr; or, when a queue manager is attached
   (`attach_queue_manager`) and has room, commits the message straight into the active queue and hands it over
   (qmgr `reserve`, `hand_over`, `release`: no scan, no read of what was just written).
Address mapping (canonical, masquerading, virtual, automatic BCC) is skipped when `Submission.overrides` say
no_address_mappings (receive_override_options: the listener's for smtpd's mail, [smtpd]'s for pickup's, as
Postfix's main.cf value serves its pickup); header addresses are still qualified there, as Postfix does.
`submit()` returns the queue id only after the commit is on disk: that is when smtpd may say 250.
Failures (mailflow.errors; the caller logs the error's `reason` and answers by `status.error_reply`):
`PermanentError` 5.4.0 for a loop (too many hops), `MessageTooBig` 5.3.4 for a header section over the limit,
`TemporaryError` when rewriting cannot finish (`LookupRetry` 4.3.0 for a table that cannot answer, 4.6.0 for an
alias loop), `Overloaded` when the store's backlog is full; any other exception means "not queued" (smtpd answers
451). Nothing here logs a refusal: the caller does, once. `prepare_notice` never fails on rewriting: a bounce is
queued with its recipient as it is (logged) rather than lost.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from typing import Callable, Protocol, Sequence

from mailflow.clock import Clock
from mailflow.config import DEFAULTS
from mailflow.content import CHUNK, Content, Spool, crlf_only
from mailflow.errors import MessageTooBig, PermanentError, TemporaryError
from mailflow.filters.content_checks import ContentChecks, Inspection
from mailflow.header_addresses import rewrite_address_fields
from mailflow.address import shown_original
from mailflow.logs import MailLog
from mailflow.message import (RESENT_FIELDS, comment_sanitized, drop_header_names, header_fields, header_names,
                              normalized_field_names, read_header, rfc5322_date, without_fields)
from mailflow.model import ClientInfo, QueueId, Recipient, Submission, replaced, rfc_addr
from mailflow.routing.addressmap import BCC_NOTIFY, NO_MILTER_EDITS, AddressMapper, MilterEdits
from mailflow.signing.outbound import OutboundSigning
from mailflow.store import NewMessage, RequeuedMessage, RequeueGone, Store
from mailflow.transports.downgrade import labelled_8bit, utf8_header_section

logger = logging.getLogger("mailflow.cleanup")
# a full name holding one of these is quoted whole in the From added (Postfix: "%!" and LEX_822_SPECIALS)
_QUOTED_NAME = frozenset('%!()<>@,;:\\".[]')
_NAME_TOKEN = re.compile(r"\||[^ \t\r\n|]+")  # tok822_scan's tokens of such a name: `|` (an operator) and words
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclasses.dataclass(frozen=True)
class Bcc:
    """What the content checks asked of the recipients: `checks`, their BCC addresses (Postfix's hbc_rcpt), and
    whether a REDIRECT (theirs or an access table's) replaced the recipients (Postfix's qmgr sends every recipient,
    BCC copies too, to the redirect address: none is added then)."""

    redirected: bool = False
    checks: tuple[str, ...] = ()

    def wanted(self) -> tuple[str, ...]:
        return () if self.redirected else self.checks


NO_BCC = Bcc()  # a message that asks for no BCC copy of the content checks (the common case: nothing allocated)
REDIRECTED = Bcc(redirected=True)
# recipients whose mapping (step 4) runs on the event loop; more are mapped in a worker thread. Through virtual
# alias maps each may expand to virtual_alias_expansion_limit (1 000) addresses, some 20 ms (100 such recipients
# held the loop 1.9 s): MAP_INLINE. Without them each costs some 10 us, and the thread's hop 100-250 us a message:
# MAP_INLINE_PLAIN keeps a message of a few recipients off the hop, and the loop held 1-2 ms at most
MAP_INLINE = 4
MAP_INLINE_PLAIN = 100


class DirectQueue(Protocol):
    """The queue manager as cleanup hands new mail to it (mailflow.stages.qmgr)."""

    def reserve(self, recipients: int) -> bool: ...
    def release(self) -> None: ...
    def hand_over(self, msg: NewMessage) -> None: ...


class QueueIdGenerator:
    """Queue ids like Postfix's: upper-case hex, time-ordered, unique within this process."""

    def __init__(self, clock: Clock, rng):
        self._clock = clock
        self._rng = rng
        self._last_us = 0

    def next(self) -> QueueId:
        us = max(int(self._clock.time() * 1_000_000), self._last_us + 1)
        self._last_us = us
        return f"{us:013X}{self._rng.getrandbits(12):03X}"  # 13 hex digits of microseconds last until 2112


class Cleanup:
    def __init__(self, store: Store, *, myhostname: str, clock: Clock, rng, log: MailLog,
                 on_queued: Callable[[], None], mapper: AddressMapper | None = None,
                 hopcount_limit: int = DEFAULTS.hopcount_limit,
                 header_size_limit: int = DEFAULTS.header_size_limit,
                 drop_headers: Sequence[str] = DEFAULTS.message_drop_headers, outbound: OutboundSigning | None = None,
                 checks: ContentChecks | None = None, content_filter: str = DEFAULTS.smtpd.content_filter,
                 smtputf8_autodetect: Sequence[str] = DEFAULTS.smtputf8_autodetect_classes):
        """`outbound`: SRS, ARC and DKIM signing (None: off); `checks`: the content inspection (None: off);
        `content_filter`: the after-queue filter of mail whose submission names none ("" none);
        `smtputf8_autodetect`: smtputf8_autodetect_classes (step 4d)."""
        self._store = store
        self._mapper = mapper
        self._myhostname = myhostname
        self._clock = clock
        self._ids = QueueIdGenerator(clock, rng)
        self._log = log
        self._on_queued = on_queued
        self._hopcount_limit = hopcount_limit
        self._header_size_limit = header_size_limit
        self._drop_headers = drop_header_names(drop_headers)
        self._outbound = outbound
        self._checks = checks if checks is not None and checks.enabled else None
        self._content_filter = content_filter
        self._autodetect = frozenset(smtputf8_autodetect)
        self._direct: DirectQueue | None = None
        self._adoptions: set[asyncio.Task] = set()  # interrupted commits being followed (_adopt)

    def attach_queue_manager(self, direct: DirectQueue | None) -> None:
        """Hand committed mail straight to `direct` when it has room (None: always through the store's scan)."""
        self._direct = direct

    def reconfigure(self, *, myhostname: str, mapper: AddressMapper, hopcount_limit: int, header_size_limit: int,
                    drop_headers: Sequence[str], outbound: OutboundSigning | None, checks: ContentChecks | None,
                    content_filter: str, smtputf8_autodetect: Sequence[str]) -> None:
        """A reload: messages prepared from now on are checked, rewritten and signed with these (the queue ids
        go on)."""
        self._autodetect = frozenset(smtputf8_autodetect)
        self._myhostname, self._mapper = myhostname, mapper
        self._hopcount_limit, self._header_size_limit = hopcount_limit, header_size_limit
        self._drop_headers = drop_header_names(drop_headers)
        self._outbound = outbound
        self._checks = checks if checks is not None and checks.enabled else None
        self._content_filter = content_filter

    def begin(self, client: ClientInfo, sasl_sender: str | None = None) -> QueueId:
        """The queue id of a message smtpd is receiving, taken at its first accepted recipient (Postfix's smtpd
        opens its queue file there), and smtpd's `QID: client=` line. Nothing is written: a transaction that ends
        without a message simply never uses its id. The message comes back with it (`Submission.queue_id`)."""
        queue_id = self._ids.next()
        self._log.received(queue_id, client.named, sasl_method=client.sasl_method,
                           sasl_username=client.sasl_username, sasl_sender=sasl_sender)
        return queue_id

    def new_spool(self, max_size: int | None = None) -> Spool:
        """Where smtpd and pickup write a message as it arrives (the store's spool directory)."""
        return self._store.new_spool(max_size)

    async def submit(self, sub: Submission, *, hold: bool = False) -> QueueId:
        """`hold`: commit it in the hold queue (an smtpd HOLD restriction), where qmgr leaves it alone. Raises
        ContentRejected when a content check refuses it; a discarded message gets its queue id, uncommitted."""
        queue_id = self._queue_id(sub)
        msg = await self._built(sub, queue_id, hold=hold, arriving=True)
        if msg is None:
            return queue_id
        await self._commit(msg, sub)
        return msg.queue_id

    async def resubmit(self, requeued: RequeuedMessage, sub: Submission) -> QueueId | None:
        """pickup's copy of a message an operator requeued (`sub`: its pending recipients and stored content, as
        pickup builds it), as Postfix's cleanup copies a queue file that postsuper -r moved to maildrop/: a new
        queue id, the address rewriting, the content checks and the after-queue filter of now, the first arrival
        time (its queue lifetime counts from now), client, client attributes and whether the "delayed" notice went
        out kept; no SRS, ARC or DKIM signing (the message got them, if any, when it first came, as Postfix runs
        no milter on requeued mail).
        The copy replaces the old message in one transaction (Store.replace_requeued). Returns the new id; None
        when a content check discarded it (the old message is removed). Raises as `submit` (RequeueGone: deleted
        meanwhile; nothing committed)."""
        msg = await self._built(sub, self._ids.next(), hold=False, arriving=False)
        if msg is None:
            await self._store.delete_messages([requeued.queue_id])
            return None
        # the first arrival kept (delay=, the listings), its queue lifetime and backoff counted from now: Postfix's
        # cleanup keeps the time record and writes a new create_time, so that a requeue resets the expiration
        msg = dataclasses.replace(msg, arrival=requeued.arrival, created=msg.arrival, client=requeued.client,
                                  client_attributes=requeued.client_attributes)
        if not await self._store.replace_requeued(requeued.queue_id, msg, warned=requeued.warned):
            raise RequeueGone(f"{requeued.queue_id}: no longer in the maildrop queue")
        self.log_queued(msg, sub, orig_id=requeued.queue_id)
        self._on_queued()
        return msg.queue_id

    async def _built(self, sub: Submission, queue_id: QueueId, *, hold: bool, arriving: bool) -> NewMessage | None:
        """The message cleanup commits for `sub` (steps 2 to 5 of the module doc; not `arriving`, a requeued copy:
        without steps 4d and 5), or None when a content check discarded it."""
        content_filter = self._content_filter if sub.content_filter is None else sub.content_filter
        bcc = REDIRECTED if sub.redirected else NO_BCC
        if self._checks is not None and "no_header_body_checks" not in sub.overrides and _from_outside(sub):
            found = await self._inspect(self._checks, queue_id, sub)
            if found.discard is not None:
                return None
            hold = hold or found.hold is not None
            content_filter = found.content_filter or content_filter
            sub = dataclasses.replace(sub, content=Content((found.head, *found.body.parts)),
                                      envelope=sub.envelope.redirected(found.redirect))
            if found.bcc or found.redirect is not None:
                bcc = Bcc(redirected=sub.redirected or found.redirect is not None, checks=tuple(found.bcc))
        if self._mapper is not None and "no_address_mappings" not in sub.overrides:
            msg, counted = await self._mapper.tables.run(self._prepare, sub, queue_id, True, bcc,
                                                         off_loop=_maps_off_loop(self._mapper, sub))
        else:
            msg, counted = self._prepare(sub, queue_id, False, bcc)
        if msg.body_type != "8BITMIME" and await labelled_8bit(msg.content, header=_header_block(msg)):
            msg = dataclasses.replace(msg, body_type="8BITMIME")
        if arriving and not msg.smtputf8 and self._autodetects(sub):
            head = _header_block(msg) if counted is None else counted
            if await utf8_header_section(Content((head, *msg.content.parts[1:])), head):
                msg = dataclasses.replace(msg, smtputf8=True)
        if arriving and self._outbound is not None:
            msg = await self._outbound.apply(msg, sub)
        if hold or content_filter:
            msg = dataclasses.replace(msg, queue="hold" if hold else msg.queue, content_filter=content_filter)
        return msg

    def _autodetects(self, sub: Submission) -> bool:
        """Whether smtputf8_autodetect_classes names `sub`'s origin (step 4d)."""
        if not self._autodetect:
            return False
        origin = "forward" if sub.forwarded else "sendmail" if sub.submitter is not None else (
            "smtpd" if _from_client(sub) else "")
        return "all" in self._autodetect or origin in self._autodetect

    async def _commit(self, msg: NewMessage, sub: Submission) -> None:
        """Insert durably, log, then hand the message to qmgr (committed active) or wake it. The hand-over runs
        at the loop's next turn, once the caller has answered the client: a delivery never starts before smtpd
        has said 250, and qmgr's routing of the message is not between the commit and the 250."""
        direct = self._reserve_place(msg)
        if direct is not None:
            msg = replaced(msg, queue="active")
        try:
            await self._store.insert(msg)
        except asyncio.CancelledError:  # the session went (its client hung up): the write may still commit
            if direct is not None:
                self._adopt_later(msg, direct)
            raise
        except BaseException:
            if direct is not None:
                direct.release()
            raise
        try:
            self.log_queued(msg, sub)
        finally:
            if direct is not None:
                asyncio.get_running_loop().call_soon(direct.hand_over, msg)
            else:
                self._on_queued()

    def _reserve_place(self, msg: NewMessage) -> DirectQueue | None:
        """The attached queue manager, holding a place for `msg`, when it can take new mail straight; else None."""
        direct = self._direct
        if msg.queue != "incoming" or direct is None or not direct.reserve(len(msg.recipients)):
            return None
        return direct

    def _adopt_later(self, msg: NewMessage, direct: DirectQueue) -> None:
        task = asyncio.ensure_future(self._adopt(msg, direct))
        self._adoptions.add(task)
        task.add_done_callback(self._adoptions.discard)

    async def _adopt(self, msg: NewMessage, direct: DirectQueue) -> None:
        """A commit whose caller was cancelled: once every write submitted before now is settled, the message is
        handed over if it was committed (and is still active), else its place is given back."""
        try:
            state = (await self._store.queue_states_settled([msg.queue_id])).get(msg.queue_id)
        except Exception as e:  # the store is failing: the message, if committed, is taken at the next start
            logger.error("%s: cannot tell whether an interrupted commit was made: %s", msg.queue_id, e)
            state = None
        if state == "active":
            direct.hand_over(msg)
        else:
            direct.release()

    async def _inspect(self, checks: ContentChecks, queue_id: QueueId, sub: Submission) -> Inspection:
        """The content checks on the header section and body as received (a header section over the limit is
        left to `prepare`, which refuses it)."""
        head, complete = read_header(sub.content, self._header_size_limit)
        if not complete:
            head = b""
        env, c = sub.envelope, sub.client
        describe = (f"from {c.named}; from=<{env.sender}> to=<{env.recipients[0] if env.recipients else ''}>"
                    f" proto={c.protocol} helo=<{c.helo}>")
        return await checks.inspect(queue_id, normalized_field_names(head), sub.content.after(len(head)), describe)

    def prepare(self, sub: Submission, *, rewrite: bool = True) -> NewMessage:
        """Everything but the commit: the queue id, the checks, the envelope rewriting and the headers.
        Raises PermanentError (MessageTooBig) or TemporaryError (LookupRetry)."""
        return self._prepare(sub, self._queue_id(sub), rewrite)[0]

    def _queue_id(self, sub: Submission) -> QueueId:
        """The id smtpd took for the message (`begin`), else a new one, with smtpd's `QID: client=` for a client's
        message at once, before any check can refuse or drop it: Postfix logs it when the queue file is made, so
        pflogsumm counts a message rejected or discarded by the content checks as received too. None for
        pickup's and mail made here."""
        if sub.queue_id:
            return sub.queue_id
        if _from_client(sub):
            return self.begin(sub.client, sub.client_attributes.sasl_sender or None)
        return self._ids.next()

    def _prepare(self, sub: Submission, queue_id: QueueId, rewrite: bool,
                 bcc: Bcc = NO_BCC) -> tuple[NewMessage, bytes | None]:
        """The message and its header section as the SMTPUTF8 autodetect (step 4d) reads it: without the fields
        cleanup added (Message-ID, Date, the From made from a full name), which Postfix's cleanup writes past
        cleanup_out_header (CLEANUP_OUT_BUF, no SMTPUTF8_FLAG_HEADER); None when that is the message's own (the
        added fields are ASCII)."""
        now = self._clock.time()
        head, complete = read_header(sub.content, self._header_size_limit)
        names = header_names(head)
        hops = names.count("received")
        if hops + 1 >= self._hopcount_limit:  # with the one this host adds, as Postfix counts
            raise PermanentError("5.4.0", "Error: too many hops",  # (Postfix smtpd says 5.4.0)
                                 f"{hops} Received headers (with this host's {hops + 1}, hopcount_limit "
                                 f"{self._hopcount_limit})")
        if not complete:
            raise MessageTooBig("5.3.4", "Error: message header size exceeds limit",
                                f"header section larger than header_size_limit {self._header_size_limit}")
        rest = sub.content.after(len(head))  # (a header section given its missing final CRLF: nothing follows)
        head = normalized_field_names(head)
        env = sub.envelope
        originals = env.originals or env.recipients
        notify = env.notify or ("",) * len(env.recipients)
        orcpts = env.orcpts or ("",) * len(env.recipients)
        recipients = tuple(Recipient(i, r, originals[i], notify[i], orcpts[i]) for i, r in enumerate(env.recipients))
        sender = env.sender
        mapper = self._mapper.for_message(queue_id) if self._mapper is not None else None
        if rewrite and mapper is not None:
            sender = mapper.sender(sender)
            if mapper.auto_bcc and not bcc.redirected and _from_outside(sub):
                auto_sender, milter = _milter_bcc(mapper, sub, sender)
                recipients = mapper.recipients(recipients, auto_bcc_sender=auto_sender, bcc=bcc.wanted(),
                                               milter=milter, smtputf8=env.smtputf8)
            else:
                recipients = mapper.recipients(recipients, bcc=bcc.wanted(), smtputf8=env.smtputf8)
        elif bcc.wanted():
            recipients = _unmapped_bcc(recipients, bcc.wanted())
        fullname = sub.submitter.fullname if sub.submitter else ""
        missing = self._missing_headers(names, queue_id, sender, now, fullname) if sub.add_missing_headers else b""
        if self._drop_headers.intersection(names):
            head = without_fields(head, self._drop_headers)
        if sub.header_rewrite_domain is not None and mapper is not None:
            head = _rewrite_header_addresses(mapper, head, sub.header_rewrite_domain, mapped=rewrite)
        own = self._received(sub, queue_id, now) + _header_lines(sub.headers) + head
        after = sub.milter_fields
        if rest.size and not rest.read_prefix(2).startswith((b"\r\n", b"\n")):
            after += b"\r\n"  # the header section ended at a line that is no header field: the body starts there
        block = own + missing + after
        return NewMessage(
            queue_id=queue_id,
            sender=sender,
            arrival=now,
            content=Content((block, *rest.parts), crlf=sub.content.crlf and crlf_only(block)),
            recipients=recipients,
            smtputf8=sub.envelope.smtputf8,
            body_type=sub.envelope.body_type,
            client=sub.client.named,
            envid=env.envid,
            ret=env.ret,
            client_attributes=sub.client_attributes,
        ), None if missing.isascii() else own + after

    def prepare_notice(self, sub: Submission) -> NewMessage:
        """`prepare` for a notice this host writes: if its recipient cannot be rewritten now, it is queued
        unrewritten (and logged) rather than lost. Signed (DKIM) when the signing table has a key for its From."""
        try:
            msg = self.prepare(sub)
        except TemporaryError as e:
            logger.warning("cleanup: notice to %s queued without address rewriting: %s",
                           ", ".join(sub.envelope.recipients), e.reason)
            msg = self.prepare(sub, rewrite=False)
        return msg if self._outbound is None else self._outbound.sign_notice(msg)

    def without_dropped_fields(self, content: Content) -> Content:
        """`content` less the header fields of message_drop_headers (Bcc, Resent-Bcc, ...): what a notice returns of
        a message refused before it was queued, as Postfix's cleanup_bounce returns its queue file, whose header
        section had them removed. A header section cut at the limit (the 5.3.4 refusal pickup returns) has a
        dropped field cut there dropped whole: the rest of its line and its continuation lines past the cut too, cut
        inside its name too (`Bc|c:`)."""
        head, complete = read_header(content, self._header_size_limit)
        if not complete:
            head += _cut_name_rest(head, content.after(len(head)))
        kept = without_fields(head, self._drop_headers)
        if len(kept) == len(head):
            return content
        rest = content.after(len(head))
        fields = header_fields(head)
        if not complete and fields and fields[-1][0] in self._drop_headers:
            rest = rest.after(_field_rest_length(rest, head.endswith(b"\n")))
        return Content((kept, *rest.parts), crlf=content.crlf)

    def log_queued(self, msg: NewMessage, sub: Submission | None = None, *, orig_id: QueueId = "") -> None:
        """The log lines of a committed message, in Postfix's order: pickup's `uid=` (smtpd's `client=` came with
        the queue id), its Message-ID, then qmgr's `from=` line; not for a message put on hold, which Postfix's qmgr
        never opened: qmgr logs that line when it first takes the message (released), and the observer
        alone hears of it now. `orig_id`: a requeued message's old id, which pickup's line names (with the sender as
        stored, before this rewriting), as Postfix's pickup does for mail postsuper -r requeued."""
        if not self._log.active:
            return
        head = _header_block(msg)
        if sub is not None and sub.submitter is not None:
            sender = sub.envelope.sender if orig_id else msg.sender
            self._log.picked_up(msg.queue_id, sub.submitter.uid, sender, orig_id=orig_id)
        for name, value in message_ids(head):
            self._log.message_id(msg.queue_id, value, resent=name == "resent-message-id")
        self._log.queued(msg.queue_id, msg.sender, msg.content.size, len(msg.recipients), logged=msg.queue != "hold")

    def _received(self, sub: Submission, queue_id: QueueId, now: float) -> bytes:
        c = sub.client
        env = sub.envelope  # one recipient: named as the client wrote it, as Postfix's smtpd names it (a forwarded
        # copy's originals are the recipient before the forward: it names its target)
        named = env.recipients if sub.forwarded or not env.originals else env.originals
        for_clause = f"\r\n\tfor <{shown_original(named[0])}>" if len(env.recipients) == 1 else ""
        if sub.submitter is not None:  # mailflow sendmail, via pickup: name the user like Postfix does, and (as
            # Postfix's pickup) no recipient: a sendmail -t recipient may be a Bcc
            return (f"Received: by {self._myhostname} (mailflow, from userid {sub.submitter.uid})\r\n"
                    f"\tid {queue_id}; {rfc5322_date(now)}\r\n").encode("utf-8")
        if c.protocol == "local" and not sub.forwarded:  # a notice made here: no client to name, and no recipient
            # (Postfix's bounce(8) names none)
            return (f"Received: by {self._myhostname} (mailflow)\r\n"
                    f"\tid {queue_id}; {rfc5322_date(now)}\r\n").encode("utf-8")
        if c.protocol == "local":  # a forwarded copy: no client to name
            return (f"Received: by {self._myhostname} (mailflow) id {queue_id}{for_clause};\r\n"
                    f"\t{rfc5322_date(now)}\r\n").encode("utf-8")
        login = f"\t(Authenticated sender: {comment_sanitized(c.received_login)})\r\n" if c.received_login else ""
        text = (
            f"Received: from {c.helo or c.hostname} ({c.hostname} [{rfc_addr(c.addr)}])\r\n{login}"
            f"\tby {self._myhostname} (mailflow) with {c.protocol} id {queue_id}{for_clause};\r\n"
            f"\t{rfc5322_date(now)}\r\n"
        )
        return text.encode("utf-8")

    def _missing_headers(self, names: list[str], queue_id: QueueId, sender: str, now: float,
                         fullname: str = "") -> bytes:
        """Message-ID, Date and From when the message lacks them; for a resent message (a Resent- field of
        RESENT_FIELDS, as Postfix's: `Resent-Comment` is none),
        Resent-Message-ID, Resent-Date and Resent-From instead, as Postfix's cleanup adds them (From: the sender
        as it is, `MAILER-DAEMON` for the null sender)."""
        resent = "Resent-" if RESENT_FIELDS.intersection(names) else ""
        added = []
        if f"{resent}message-id".lower() not in names:
            stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
            added.append(f"{resent}Message-ID: <{stamp}.{queue_id}@{self._myhostname}>")
        if f"{resent}date".lower() not in names:
            added.append(f"{resent}Date: {rfc5322_date(now)}")
        if f"{resent}from".lower() not in names:
            added.append(resent + (_from_header(sender, fullname) if sender else "From: MAILER-DAEMON"))
        return "".join(line + "\r\n" for line in added).encode("utf-8", "surrogateescape")  # (a full name's bytes)


def message_ids(head: bytes) -> list[tuple[str, str]]:
    """What Postfix's cleanup logs of a header section's message ids, in order: each Message-ID and
    Resent-Message-ID field (`message-id=<…>`, `resent-message-id=<…>`; the one cleanup added last, as it added
    it), then `message-id=<>` when there is no Message-ID (a resent message's, whose Resent-Message-ID was
    added instead; pflogsumm reads message-id)."""
    found = []
    for name, lines in header_fields(head):
        if name in ("message-id", "resent-message-id"):
            found.append((name, b" ".join(line.strip() for line in lines).split(b":", 1)[1].strip()
                          .decode("utf-8", "replace")))
    if not any(name == "message-id" for name, _ in found):
        found.append(("message-id", "<>"))
    return found


def _cut_name_rest(head: bytes, rest: Content) -> bytes:
    """The bytes of `rest` that complete the field name of the line `head` was cut in (through its colon), when
    the cut falls before that colon: b"" otherwise, or when no colon comes within CHUNK bytes (no name that long
    is dropped)."""
    last = head[head.rfind(b"\n") + 1:]
    if not last or b":" in last or last[:1] in (b" ", b"\t"):
        return b""
    more = rest.read_prefix(CHUNK)
    line = more[:more.find(b"\n")] if b"\n" in more else more
    colon = line.find(b":")
    return line[:colon + 1] if colon >= 0 else b""


def _field_rest_length(rest: Content, at_line_start: bool) -> int:
    """How many bytes at the start of `rest` belong to a header field cut before it: the rest of the cut line
    (unless `at_line_start`) and the continuation lines (starting with a blank) after it; read a chunk at a time,
    as far as the content goes."""
    pos = 0
    while chunk := rest.after(pos).read_prefix(CHUNK):
        at = 0
        while at < len(chunk):
            if at_line_start and chunk[at:at + 1] not in (b" ", b"\t"):
                return pos + at
            end = chunk.find(b"\n", at)
            at, at_line_start = (len(chunk), False) if end < 0 else (end + 1, True)
        pos += at
    return pos


def _milter_bcc(mapper: AddressMapper, sub: Submission, sender: str) -> tuple[str, MilterEdits]:
    """The sender the automatic BCC lookups are made with and the milters' envelope edits (Postfix's cleanup
    looks up each envelope record before its milters run): the sender as received, rewritten; the recipients
    a milter added and deleted; a CHGFROM's sender (`sender`, rewritten already)."""
    received = sub.received
    if received is None:
        return sender, NO_MILTER_EDITS
    now = set(sub.envelope.recipients)
    before = set(received.recipients)
    first_sender = mapper.sender(received.sender)
    return first_sender, MilterEdits(
        added=frozenset(now - before), deleted=tuple(r for r in received.recipients if r not in now),
        sender=sender if sender != first_sender else None)


def _rewrite_header_addresses(mapper: AddressMapper, head: bytes, origin: str, *, mapped: bool) -> bytes:
    """Postfix's header address rewriting: unqualified addresses get @`origin` ("": myorigin), and (`mapped`)
    canonical maps and masquerading apply, by the field's class (sender: From, Sender, Reply-To...;
    recipient: To, Cc...)."""
    return rewrite_address_fields(head, lambda a: mapper.header_sender(a, origin, mapped=mapped),
                                  lambda a: mapper.header_recipient(a, origin, mapped=mapped))


def _unmapped_bcc(recipients: tuple[Recipient, ...], bcc: Sequence[str]) -> tuple[Recipient, ...]:
    """The content checks' BCC recipients of a message whose addresses are not mapped (no_address_mappings):
    appended with NOTIFY=NEVER, once each."""
    added = [a for a in dict.fromkeys(bcc) if a]
    return recipients + tuple(Recipient(len(recipients) + i, a, a, BCC_NOTIFY) for i, a in enumerate(added))


def _from_outside(sub: Submission) -> bool:
    """Mail that gets the automatic BCC recipients and the content checks: a client's (smtpd) or a local user's
    (sendmail, pickup; a requeued message too, as Postfix's pickup takes it). Not a copy local delivery forwards, nor
    a notice made here: Postfix submits those with CLEANUP_FLAG_MASK_INTERNAL, without CLEANUP_FLAG_BCC_OK (so no
    BCC copy loops) and without CLEANUP_FLAG_FILTER (int_filt.c: internal_mail_filter_classes, empty by default)."""
    return not sub.forwarded and (sub.submitter is not None or _from_client(sub))


def _from_client(sub: Submission) -> bool:
    """Mail an SMTP client sent (smtpd): neither a local user's (sendmail, pickup: `submitter`) nor mail made
    here (protocol `local`: forwarded copies, notices)."""
    return sub.submitter is None and sub.client.protocol != "local"


def _from_header(sender: str, fullname: str) -> str:
    """`From: sender`, or `From: Full Name <sender>` for a local user, as Postfix's cleanup writes them
    (cleanup_message.c, header_from_format = standard): the name's bytes as given (8-bit too, UTF-8 or not: the
    sendmail command carries them as surrogate escapes; nothing RFC 2047 encoded), CR and LF made spaces, cut at a
    NUL (a C string's end); quoted whole, `"` and `\\` escaped, when it holds `%`, `!` or an RFC 822 special, else
    its words joined by one space (tok822_scan: a word with a control character quoted, `|` written without
    spaces); a name of blanks only gives `From: <sender>`."""
    name = fullname.split("\0", 1)[0].replace("\r", " ").replace("\n", " ")
    if not name:
        return f"From: {sender}"
    if any(c in _QUOTED_NAME for c in name):
        phrase = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    else:
        phrase = ""
        for token in _NAME_TOKEN.findall(name):
            word = f'"{token}"' if _CONTROL.search(token) else token
            phrase += (" " if phrase and token != "|" and not phrase.endswith("|") else "") + word
    return f"From: {phrase} <{sender}>" if phrase else f"From: <{sender}>"


def _header_lines(fields: tuple[str, ...]) -> bytes:
    """Header fields given by smtpd's filters, each already `Name: value` (folded or not), CRLF-ended."""
    return "".join(f.rstrip("\r\n") + "\r\n" for f in fields).encode("utf-8") if fields else b""


def _header_block(msg: NewMessage) -> bytes:
    """The header section of a message `_prepare` made: the first part of its content (the body follows)."""
    head = msg.content.parts[0]
    assert isinstance(head, bytes)
    return head


def _maps_off_loop(mapper: AddressMapper, sub: Submission) -> bool:
    """Whether `sub`'s envelope is too long to map on the event loop (step 4: MAP_INLINE, MAP_INLINE_PLAIN)."""
    return len(sub.envelope.recipients) > (MAP_INLINE if mapper.expands else MAP_INLINE_PLAIN)
