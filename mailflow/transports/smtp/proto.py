"""One mail transaction on an open session (Postfix smtp_proto's smtp_xfer), for SMTP and LMTP alike.

    await send_message(session, request, recipients, outcomes, timeouts, now, reused=False, lmtp=False, wire=None,
                       probe=None)
        every recipient ends with a result in `outcomes`; a lost, timed-out or garbled dialogue defers those still
        without an answer (relay: the peer) and fails the site. A `reused` (cached) session that dies before MAIL
        FROM is answered raises StaleSession instead and leaves `outcomes` untouched. `probe` (a reused session:
        the RSET timeout; the SMTP and LMTP clients'): Postfix's RSET probe first (smtp_reuse_common), see below. The
        results of the transaction carry its ConnStats: `now()` (qmgr's clock) as MAIL FROM is sent, and the
        session's use count (Postfix's conn_setup_done and reuse_count, for the log's `delays=` and `conn_use=`).
        `wire`: the addresses and header section smtp_generic_maps put on the wire (mailflow.transports.generic),
        None: as queued.
    await reset(session, timeout) -> bool      RSET, True when answered 2xx: before a session whose transaction is
                                               still open (an address probe's, a refused RCPT or DATA) is cached
                                               (reuse.release); the end of data's replies close the transaction
    smtp_data(content, encoders) / asmtp_data(content, encoders, off_loop=False)   the content as DATA: through
        `encoders`, dot-stuffed, then the terminator; from memory / a spool file read chunk by chunk (`off_loop`:
        each chunk through the encoders in a worker thread). A content longer than LONG_KEY with body checks
        (smtp_checks.body_off_loop) goes through them in a worker thread, as cleanup's body walk

The transaction: a message the peer cannot take (commands.cannot_take; SMTPUTF8 mail with a byte not ASCII in a MIME
part's header section at a peer without SMTPUTF8: those sections are read only then) bounces before MAIL. With
PIPELINING (RFC 2920) MAIL, every RCPT and DATA go out in one write and the replies are read in order (2 round trips
per message on a cached session), as Postfix does; without it each command waits for its reply. Replies still owed
after a refusal are read (a DATA accepted anyway gets an empty message, "." alone, as RFC 2920 says). The content is
streamed: a message in memory goes in one write, a spooled one CHUNK bytes at a time, each write waiting (within
data_timeout) until the peer has taken the last. After the content SMTP reads one reply for every accepted
recipient, LMTP (RFC 2033 4.2) one reply per accepted recipient, in RCPT order.

The RSET probe of a reused session: RSET before MAIL, its reply read first; anything but 2xx (a 4xx or 5xx, a 421,
the connection lost or silent) raises StaleSession (nothing logged but a debug line, as Postfix's smtp_rset fails
quietly): the caller drops the session and the message goes over another. With PIPELINING it goes in the same write
as MAIL, the RCPTs and DATA (RFC 2920: RSET may be anywhere in a group), so it costs no round trip; without it,
alone, waiting for its reply, as Postfix's smtp(8) sends it (always alone).

An address probe (`request.verify`, Postfix's smtp with the verify flag) ends after the RCPT replies: no DATA
(nor in the pipelined write), each accepted recipient SENT with its RCPT reply, the transaction left open (RSET
before the session is cached, else QUIT): nothing is delivered.

Limits: MAIL, each RCPT and DATA `command`; the content and the reply (each reply) after it `data`.

A job of many recipients hands the loop back every trouble.SLICE of them: as its RCPT commands are made, as the
RCPT replies are taken (or those of LMTP's end of data; replies read ahead come without a wait), and as one reply's
results are made for all of them (`Outcomes.update_in_slices`: a refused MAIL or DATA; `Outcomes.settle_in_slices`:
SMTP's end of data).

The answers after DATA (SMTP's one reply, LMTP's reply per recipient) are told to qmgr as each comes
(`Outcomes.settle`, `DeliveryRequest.settled`): a stop that cuts the delivery off after them (QUIT, the next
recipient's LMTP reply, the next peer for the recipients deferred) records what the peer already took.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

from mailflow.content import CHUNK, Content
from mailflow.errors import LookupRetry
from mailflow.message import HEADER_READ_LIMIT, read_header
from mailflow.model import ConnStats, DeliveryRequest, Recipient
from mailflow.slices import in_slices
from mailflow.transports.encode import Encoder, SmtpData, aencode, encode
from mailflow.transports.generic import WireForm
from mailflow.transports.smtp import trouble
from mailflow.transports.smtp.chat import CRLF, Session, Timeouts
from mailflow.transports.smtp_checks import body_off_loop
from mailflow.transports.downgrade import utf8_header_section
from mailflow.transports.smtp.commands import (Extensions, cannot_take, content_encoding, mail_command,
                                               part_headers_may_need_smtputf8, rcpt_command, smtputf8_refusal)
from mailflow.transports.smtp.trouble import (
    Outcomes,
    SiteFailure,
    StaleSession,
    reply_results,
    unexpected_reply_results,
)

# What Postfix says it was doing when the connection broke, by the command that was waiting.
MAIL = "sending MAIL FROM"
RCPT = "sending RCPT TO"
DATA = "sending DATA command"
BODY = "sending message body"
END_OF_DATA = "sending end of data -- message may be sent more than once"
RSET_PROBE = "sending RSET probe"
# The commands without arguments, made once, not per message.
DATA_LINE = b"DATA" + CRLF
RSET_LINE = b"RSET" + CRLF


async def send_message(
    session: Session,
    request: DeliveryRequest,
    recipients: list[Recipient],
    outcomes: Outcomes,
    timeouts: Timeouts,
    now: Callable[[], float],
    *,
    reused: bool = False,
    lmtp: bool = False,
    wire: WireForm | None = None,
    probe: float | None = None,
) -> None:
    """See the module docstring."""
    refusal = cannot_take(session.extensions, session.peer, request, wire)
    if refusal is None and part_headers_may_need_smtputf8(session.extensions, request, wire) and (
            await utf8_header_section(request.content, read_header(request.content, HEADER_READ_LIMIT)[0])):
        refusal = smtputf8_refusal(session.peer)
    if refusal is not None:
        await outcomes.fail_in_slices(recipients, refusal, session.peer.relay)
        return
    session.uses += 1
    session.queue_id = request.queue_id
    conn = ConnStats(now(), session.uses)
    todo = outcomes.pending(recipients)
    try:
        await _transaction(session, request, recipients, outcomes, timeouts, reused, lmtp, wire, probe, conn)
    except SiteFailure as e:
        (await outcomes.fail_pending_in_slices(recipients, e, session.peer.relay)).site_failed(e)
    await outcomes.stamp_in_slices(todo, conn)  # not reached on StaleSession: `outcomes` stays untouched


async def _transaction(
    session: Session,
    request: DeliveryRequest,
    recipients: list[Recipient],
    outcomes: Outcomes,
    timeouts: Timeouts,
    reused: bool,
    lmtp: bool,
    wire: WireForm | None,
    probe: float | None,
    conn: ConnStats,
) -> None:
    peer, extensions = session.peer, session.extensions
    encoders, body = content_encoding(extensions, request)
    converted = bool(encoders)
    if converted:
        session.log.debug("%s: %s lacks 8BITMIME: content converted to 7 bit", request.queue_id,
                          peer.relay)
    many = len(recipients) > trouble.SLICE
    if many:  # (50 000 RCPT commands with DSN's parameters took 0.24 s in one turn)
        rcpts = await _rcpt_commands_in_slices(recipients, extensions, request.smtputf8, wire)
    else:
        rcpts = _rcpt_commands(recipients, extensions, request.smtputf8, wire)
    if wire is None:
        mail = mail_command(request, extensions, body, converted=converted)
    else:  # (the header swapped first: what the peer is to see, then made 7 bit if it must be)
        encoders = (*wire.encoders(), *encoders)
        mail = mail_command(request, extensions, body, converted=converted, wire=wire)
    pipelining = extensions.supports("pipelining")
    data = [] if request.verify else [DATA_LINE]  # a probe stops after RCPT (Postfix's verify flag)
    rset = [] if probe is None else [RSET_LINE]
    if probe is not None and not pipelining:
        await _rset_probe(session, probe)
    try:
        session.send(b"".join([*rset, mail, *rcpts, *data]) if pipelining else mail, MAIL)
        if probe is not None and pipelining:
            await _rset_probe(session, probe, sent=True)
        reply = await session.reply(timeouts.command, MAIL)
    except SiteFailure:
        if reused:
            raise StaleSession() from None
        raise
    if reused and reply.code == 421:
        raise StaleSession()
    if not reply.positive:
        await outcomes.update_in_slices(recipients, lambda part: reply_results(part, reply, peer, "MAIL FROM"))
        if pipelining:
            await _abandon_pipelined(session, len(rcpts), timeouts.command, data=bool(data))
        return
    session.transaction_open = True
    accepted = []
    for n, (r, command) in enumerate(zip(recipients, rcpts)):
        if n and n % trouble.SLICE == 0:  # (replies read ahead come without a wait: a read of thousands, one turn)
            await asyncio.sleep(0)
        if not pipelining:
            session.send(command, RCPT)
        reply = await session.reply(timeouts.command, RCPT)
        if reply.positive:
            accepted.append(r)
        if request.verify or not reply.positive:  # (a probe's accepted recipient is done with its RCPT reply)
            outcomes.update(reply_results([r], reply, peer, "RCPT TO"))
    if request.verify:  # the transaction stays open: RSET before the session is cached, else QUIT
        return
    if not accepted:
        if pipelining:
            await _abandon_pipelined(session, 0, timeouts.command)
        return
    if not pipelining:
        session.send(DATA_LINE, DATA)
    reply = await session.reply(timeouts.command, DATA)
    if reply.positive:  # the server thinks the message is over before it began: Postfix's protocol error
        await outcomes.update_in_slices(accepted, lambda part: unexpected_reply_results(part, reply, peer, "DATA"))
        return
    if reply.code // 100 != 3:  # any 3xx lets the content go, as with Postfix
        await outcomes.update_in_slices(accepted, lambda part: reply_results(part, reply, peer, "DATA"))
        return
    await _send_body(session, request.content, encoders, timeouts.data, off_loop=body_off_loop(wire, request.content))
    notifies = extensions.supports("dsn")
    if lmtp or not many:
        for n, answered in enumerate([r] for r in accepted) if lmtp else [(0, accepted)]:
            if n and n % trouble.SLICE == 0:  # (LMTP's replies read ahead, as RCPT's)
                await asyncio.sleep(0)
            reply = await session.reply(timeouts.data, END_OF_DATA)
            outcomes.settle(reply_results(answered, reply, peer, "end of DATA", next_hop_notifies=notifies),
                            request, conn)
    else:
        reply = await session.reply(timeouts.data, END_OF_DATA)
        await outcomes.settle_in_slices(accepted, lambda part: reply_results(
            part, reply, peer, "end of DATA", next_hop_notifies=notifies), request, conn)
    # the end of data's replies end the transaction, refused or not: no RSET before the session is cached, as
    # Postfix's smtp_loop (SMTP_STATE_DOT: LAST, not ABORT's RSET); a peer that keeps a refused transaction anyway
    # (aiosmtpd when its handler fails) is cleared by the RSET probe before the session is reused
    session.transaction_open = False


async def _rcpt_commands_in_slices(recipients: list[Recipient], extensions: Extensions, smtputf8: bool,
                                   wire: WireForm | None) -> list[bytes]:
    """The RCPT commands of `recipients`, trouble.SLICE a loop turn (nothing is sent before they are all made)."""
    commands: list[bytes] = []
    await in_slices(recipients, lambda part: commands.extend(_rcpt_commands(part, extensions, smtputf8, wire)),
                    trouble.SLICE)
    return commands


def _rcpt_commands(recipients: Sequence[Recipient], extensions: Extensions, smtputf8: bool,
                   wire: WireForm | None) -> list[bytes]:
    """The RCPT commands of `recipients`, each address as `wire` says it (smtp_generic_maps), None: as queued."""
    if wire is None:
        return [rcpt_command(r, extensions, smtputf8=smtputf8) for r in recipients]
    return [rcpt_command(r, extensions, wire.recipient(r.address), smtputf8) for r in recipients]


async def _rset_probe(session: Session, timeout: float, *, sent: bool = False) -> None:
    """The RSET probe (see the module docstring): RSET, unless it was `sent` already, and its reply; StaleSession
    unless that is 2xx."""
    try:
        if not sent:
            session.send(RSET_LINE, RSET_PROBE)
        reply = await session.reply(timeout, RSET_PROBE)
    except SiteFailure as e:
        session.log.debug("%s: cached session with %s failed its RSET probe: %s", session.queue_id,
                          session.peer.relay, e.text)
        raise StaleSession() from None
    if not reply.positive:
        session.log.debug("%s: cached session with %s refused its RSET probe: %s", session.queue_id,
                          session.peer.relay, reply.one_line)
        raise StaleSession()


async def _abandon_pipelined(session: Session, rcpt_replies: int, timeout: float, data: bool = True) -> None:
    """The results are in, but replies to pipelined commands are still coming: read them (RCPTs, then DATA when
    it was sent). A DATA that was accepted anyway gets an empty message. Any trouble here only closes the
    session."""
    try:
        for n in range(rcpt_replies):
            if n and n % trouble.SLICE == 0:  # (read ahead: no wait, as in the transaction)
                await asyncio.sleep(0)
            await session.reply(timeout, RCPT)
        if data and (await session.reply(timeout, DATA)).code // 100 == 3:
            session.send(b"." + CRLF, END_OF_DATA)
            await session.reply(timeout, END_OF_DATA)
            session.transaction_open = False
    except SiteFailure:
        session.abort()


async def _send_body(session: Session, content: Content, encoders: tuple[Encoder, ...], timeout: float, *,
                     off_loop: bool = False) -> None:
    """The content after DATA's 354; `off_loop`: the encoders are fed in a worker thread (body checks on a long
    content: smtp_checks.body_off_loop). A table an encoder asks (smtp_body_checks) that cannot answer ends the
    session as Postfix's SMTP_ERR_DATA: 4.3.0 "local data error while talking to h[ip]", a site failure."""
    try:
        if content.in_memory:
            data = smtp_data(content, encoders)
            session.send_many(await asyncio.to_thread(list, data) if off_loop else list(data), BODY)
            return
        pieces: list[bytes] = []
        size = 0
        async for piece in asmtp_data(content, encoders, off_loop=off_loop):
            pieces.append(piece)
            size += len(piece)
            if size >= CHUNK:
                session.send_many(pieces, BODY)
                pieces, size = [], 0
                await session.drain(timeout, BODY)
        session.send_many(pieces, BODY)
    except LookupRetry:
        session.log.warning("%s: %s body checks lookup error", session.queue_id,
                            "lmtp" if session.dialect == "LMTP" else "smtp")
        session.abort()
        raise SiteFailure("4.3.0", f"local data error while talking to {session.peer.name}",
                          relay=session.peer.relay) from None


async def reset(session: Session, timeout: float) -> bool:
    """See the module docstring."""
    try:
        session.send(RSET_LINE, "sending RSET")
        reply = await session.reply(timeout, "sending RSET")
    except SiteFailure as e:
        session.log.debug("RSET to %s: %s", session.peer.relay, e.text)
        return False
    session.transaction_open = not reply.positive
    return reply.positive


def smtp_data(content: Content, encoders: tuple[Encoder, ...] = ()) -> Iterator[bytes]:
    """See the module docstring."""
    yield from encode(content.chunks(), *encoders, SmtpData(crlf=content.crlf and not encoders))
    yield b"." + CRLF


async def asmtp_data(content: Content, encoders: tuple[Encoder, ...] = (), *,
                     off_loop: bool = False) -> AsyncIterator[bytes]:
    """See the module docstring."""
    async for piece in aencode(content.stream(), *encoders, SmtpData(crlf=content.crlf and not encoders),
                               off_loop=off_loop):
        yield piece
    yield b"." + CRLF
