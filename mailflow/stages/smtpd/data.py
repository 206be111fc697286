"""DATA and BDAT: the session layer above transaction.TransactionCommands that takes the message in.

What it owns
- `smtp_DATA`: the handler's `handle_DATA_COMMAND` (data_restrictions, before any content, as Postfix's
  smtpd_check_data), 354, then the content through CRLF.CRLF, unstuffed by `wire.Wire.read_data`. A
  transaction's first BDAT asks `handle_DATA_COMMAND` too; its refusal is the chunk's.
- `smtp_BDAT`: RFC 3030 CHUNKING, which aiosmtpd lacks: `BDAT <size> [LAST]`, each chunk read as exactly that
  many bytes (`wire.Wire.read_chunk`) into the transaction's spool (`Transaction.bdat`), checked across chunks
  for NUL and bare line ends (`wire.ContentCheck`). The CHUNKING keyword of EHLO is offered for it
  (protocol.LAYER_KEYWORDS).
- Either way the content is written as it arrives into a spool from the handler's `new_spool(message_size_limit)`
  (mailflow.content.Spool: memory for a small message, a file for a big one), under the DATA rate deadline.
  DATA's content has the mbox `From ` lines it starts with labelled `X-Mailbox-Line: ` (found in the lines as sent
  by `wire.Wire.mailbox_lines`, labelled within header_size_limit bytes; `labelled_mailbox_lines`), as Postfix's
  smtpd; not BDAT's, as in Postfix.
  At its end the handler's `handle_DATA` finds it as a mailflow.content.Content (`Transaction.content`) and
  answers; the transaction ends however the message ends, and its spool is discarded (what was queued has the
  queue's own name for its file by then). A message queued (250) resets the error counts; BDAT LAST's 250 names
  the message's size as Postfix counts it (`ContentCheck.octets`): `250 2.0.0 Ok: N bytes queued as ID`.

Failure behaviour (each refusal a `mailflow.status` reply): before HELO 503 5.5.1; before the login a submission
needs 530 5.7.0; no recipient 503 5.5.1; DATA with an argument 501 5.5.4; DATA after BDAT 503 5.5.1; a malformed
BDAT 521 5.5.4 and the session closes, as in Postfix
(and any BDAT where CHUNKING is discarded, 521 5.5.1) (the size of the chunk that follows is unknown, so it could
only be read as commands); a refused BDAT's chunk is read and dropped, never taken as commands, and, as in Postfix,
BDAT 0 without LAST is refused first (551 5.7.1), and a refused chunk other than the last leaves the transaction
failed: later chunks 551 5.0.0 (LAST ends it), MAIL, RCPT and DATA 503 5.5.1 "after BDAT"; a chunk that would
take the message past message_size_limit 552 5.3.4 before it is read, after the first chunk's data_restrictions
(Postfix's "Chunk exceeds message size limit"); too big 552 5.3.4 (logged as Postfix's smtpd logs it, `warning:
QID: queue file size limit exceeded`, NOQUEUE without a queue id), a NUL 554 5.6.0, a spool that cannot be
written 451 4.3.1 / 4.3.0 (`status.error_reply`; logged once), all after the end of the content; a bare LF or
CR in the content 521 5.5.2 and the session closes (logged as Postfix logs it, `QID: reject: END-OF-MESSAGE from
host[ip]: bare <LF> received; from=<s> to=<r> ...`; `bare <CR> received` is mailflow's own line in that shape:
Postfix takes a bare CR, and logs nothing of it); the message is not queued in any of these cases. Where a
bare LF is taken (forbid_bare_newline false, or a client in its exclusions) nothing is refused for its line ends:
a stray CR is stored as a space, or dropped before a LF (mailflow.stray_cr, `ContentCheck(mend=True)`), as in
DATA and as Postfix 3.7.11 stores it (cleanup_replace_stray_cr_lf).
"""
from __future__ import annotations

import logging

from mailflow import status
from mailflow.content import Content, Spool
from mailflow.message import CRLF, mailbox_labels_kept, mailbox_lines, read_header
from mailflow.stages.smtpd.transaction import TransactionCommands
from mailflow.stages.smtpd.wire import END_OF_MESSAGE, ContentCheck, bare_refusal, refusal
from mailflow.syntax import ascii_upper, command_words, parse_octet_count

log = logging.getLogger("mailflow.smtpd")


def labelled_mailbox_lines(content: Content, found: tuple[int, int, bool], limit: int) -> Content:
    """DATA content with the mbox `From ` lines (`>From ` too) it starts with labelled `X-Mailbox-Line: `, as
    Postfix's smtpd (receive_data_message) keeps them for DATA, not for BDAT: header fields, where cleanup would
    take such a line for the first line of the body. `found`: the wire's (mailbox_lines: how many lines, how many
    bytes as sent, whether the line after starts with a blank, where the empty line is put, ending the header
    section as Postfix's smtpd ends it). Whether the labels stay: mailflow.message.mailbox_labels_kept, the rule
    sendmail -bs shares, with `limit` (header_size_limit)."""
    count, sent, blank_after = found
    if not count:
        return content
    length, labelled = mailbox_lines(content.read_prefix(sent + count), count)  # (a bare LF may have become CRLF)
    result = Content((labelled + (CRLF if blank_after else b""), *content.after(length).parts), crlf=content.crlf)
    return mailbox_labels_kept(result, lambda: content, lambda labels: read_header(labels, limit)[1])


def bdat_arguments(arg: str | None) -> tuple[int, bool] | None:
    """(size, last) of `BDAT <size> [LAST]`, or None when malformed: a size that is not digits, or past
    OFF_T_MAX (leading zeros are taken, as Postfix takes them)."""
    words = command_words(arg)
    if not words or len(words) > 2 or (len(words) == 2 and ascii_upper(words[1]) != "LAST"):
        return None
    try:
        size = parse_octet_count(words[0])
    except ValueError:
        return None
    return None if size is None else (size, len(words) == 2)


class DataCommands(TransactionCommands):
    """DATA and BDAT: see the module doc."""

    async def smtp_DATA(self, arg: str | None) -> None:
        if self.envelope.processing_bdat:  # Postfix's first answers (no recipient exists without HELO and a login)
            await self.push(status.BDAT_MIXED)
            return
        if not self.envelope.rcpt_tos:
            await self.push(status.no_recipients(bool(self.envelope.mail_from)))
            return
        # (no HELO or login check: a recipient needs an accepted MAIL, and MAIL checks both)
        if arg:
            await self.push(status.syntax("DATA"))
            return
        refused = await self._call_handler_hook("DATA_COMMAND", "DATA")
        if isinstance(refused, status.Reply):
            await self.push(refused)
            return
        await self.push(status.START_DATA)
        spool = self._new_spool()
        try:
            self._content_begins()
            self.record.content("DATA", lambda: spool.size)
            try:
                found = await self._wire.mailbox_lines(self._limits.header_size_limit)
                why_not = await self._wire.read_data(spool)
            finally:
                self._content_ends()
            self.record.message_ended()
            # (read_data let no bare CR or LF through)
            await self._finish_message(spool, why_not, crlf=True, mailbox_lines=found)
        finally:
            spool.discard()

    async def smtp_BDAT(self, arg: str | None) -> None:
        """RFC 3030: `BDAT <size> [LAST]`; the chunk follows at once, without dot-stuffing or terminator."""
        if "chunking" in self.discarded:  # (Postfix's first check: the chunk cannot be skipped, so 521)
            self._reset_transaction()
            await self._refuse_and_close(status.BDAT_NOT_IMPLEMENTED)
            return
        parsed = bdat_arguments(arg)
        if parsed is None:  # how many bytes follow is unknown: they must not be read as commands (Postfix: 521)
            self.record.lines.malformed_bdat(self.envelope.queue_id, self.session.client,
                                             self.command_line.decode("utf-8"))
            self._reset_transaction()
            await self._refuse_and_close(status.BDAT_SYNTAX)
            return
        size, last = parsed
        if size == 0 and not last:  # (Postfix's first checks)
            self.record.lines.null_bdat(self.envelope.queue_id, self.session.client)
            await self._refused_chunk(size, last, status.NULL_BDAT)
            return
        if self.envelope.bdat_failed:
            await self._refused_chunk(size, last, status.bdat_discarded(size))
            return
        refused = self._bdat_refusal()
        if refused is None and self.envelope.bdat is None:  # the transaction's first chunk: as at DATA (Postfix's
            answer = await self._call_handler_hook("DATA_COMMAND", "BDAT")  # bdat_cmd: before the chunk's size)
            refused = answer if isinstance(answer, status.Reply) else None
        if refused is None and self._chunk_too_big(size):
            self.record.lines.bdat_too_big(self.envelope.queue_id, self.session.client)
            refused = status.CHUNK_TOO_BIG
        if refused is not None:
            await self._refused_chunk(size, last, refused)
            return
        if self.envelope.bdat is None:  # (a client whose bare LF is taken: its stray CRs mended, as in DATA)
            self.envelope.bdat = (self._new_spool(), ContentCheck(self._limits.max_line_length,
                                                                  mend=not self._forbid_bare_newline))
        spool, check = self.envelope.bdat
        self._content_begins()
        self.record.content("BDAT", lambda: spool.size)
        try:
            await self.wire.read_chunk(size, spool, check)
        finally:
            self._content_ends()
        if not last:
            await self.push(status.bdat_chunk(size))
            return
        self.record.message_ended()
        self.envelope.bdat = None  # the spool is this method's now
        try:
            tail = check.end()
            if tail:
                spool.append(tail)
                await spool.drain()
            why_not = refusal(spool, check.nul)
            bare = check.finish()
            if why_not is None and bare and self._forbid_bare_newline:
                raise bare_refusal(self.hostname, bare, END_OF_MESSAGE)  # (logged and closed as DATA's)
            self.envelope.bdat_octets = check.octets
            await self._finish_message(spool, why_not, crlf=self._forbid_bare_newline)
        finally:
            spool.discard()

    def _bdat_refusal(self) -> status.Reply | None:
        """As smtp_DATA: recipients only (Postfix's bdat_cmd asks only for them; none exist without HELO and a
        login where those are required, since MAIL checks both, so a BDAT before HELO gets
        `503 5.5.1 Error: need RCPT command`)."""
        if not self.envelope.rcpt_tos:
            return status.no_recipients(bool(self.envelope.mail_from))
        return None

    def _chunk_too_big(self, size: int) -> bool:
        """Whether a chunk would take the message past message_size_limit: it is refused before it is read, as
        Postfix refuses it (counting the message as it stores it: `ContentCheck.stored`)."""
        limit = self.data_size_limit
        if not limit:
            return False
        stored = self.envelope.bdat[1].stored if self.envelope.bdat is not None else 0
        return stored > limit - size

    async def _refused_chunk(self, size: int, last: bool, refusal: status.Reply) -> None:
        """A refused chunk is read and dropped (it is on its way regardless and must not be read as commands).
        Refused with LAST, it ends the transaction; without, it leaves the transaction failed (its later chunks
        discarded with 551 5.0.0, MAIL, RCPT and DATA out of order) until BDAT LAST, RSET or HELO/EHLO: Postfix's
        skip_bdat (3.7.22's: 3.7.11 and earlier leave the recipients of a transaction a refused LAST ended)."""
        await self._skip_chunk(size)
        self.envelope.discard_bdat()
        if last:
            self._reset_transaction()
        else:
            self.envelope.bdat_failed = True
        await self.push(refusal)

    async def _skip_chunk(self, size: int) -> None:
        self._content_begins()
        try:
            await self.wire.read_chunk(size, None)
        finally:
            self._content_ends()

    def _new_spool(self) -> Spool:
        """Where this transaction's content goes (the handler's, i.e. the queue's spool directory)."""
        return self.event_handler.new_spool(self.data_size_limit)

    async def _finish_message(self, spool: Spool, why_not: status.Reply | None, *, crlf: bool,
                              mailbox_lines: tuple[int, int, bool] = (0, 0, False)) -> None:
        """Hand complete content to the handler (or refuse it); either way the transaction ends. `crlf`: its
        line ends were checked (mailflow.content.Content.crlf); `mailbox_lines`: DATA's leading mbox `From `
        lines, as the wire found them, to be labelled (`labelled_mailbox_lines`)."""
        if why_not is not None:
            if spool.exceeded:  # (why_not is then the size refusal: wire.refusal)
                self.record.lines.queue_file_too_big(self.envelope.queue_id)
            if spool.failure is not None:
                log.error("%s: message not queued: cannot write its spool file: %s", self.session.client,
                          spool.failure)
            self._reset_transaction()
            await self.push(why_not)
            self._checkpoint()  # (after the reply, as Postfix's chat_reset at the end of a message)
            return
        content = await spool.finish(crlf=crlf)
        content = labelled_mailbox_lines(content, mailbox_lines, self._limits.header_size_limit)
        self.envelope.content = self.envelope.original_content = content
        reply = await self._call_handler_hook("DATA")
        queued_as = self.envelope.queued_as
        spool.discard()  # what was queued has the queue's own name for its file by now
        self._reset_transaction()
        if isinstance(reply, str) and reply.startswith("250"):
            self._message_accepted()
        await self.push(reply if isinstance(reply, (str, status.Reply)) else status.OK)
        if queued_as:
            self._observe_queued(queued_as)
        self._checkpoint()
