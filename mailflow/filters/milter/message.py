"""A message through the milters: the end-of-message step and what the milters asked applied to the Submission,
for smtpd's milters (smtpd_milters) and for mail that does not come through smtpd (non_smtpd_milters).

    await end_of_message(session, submission) -> Filtered     the header section and the body to every milter of
                                                  the session; their edits (headers, body, sender, recipients)
                                                  applied to a new Submission; nothing of the original copied;
                                                  the header section as Postfix's milters see it (cleanup's
                                                  view): without the fields of message_drop_headers (Bcc,
                                                  Resent-Bcc, ...) and with field names normalized (`Subject :`
                                                  is `Subject:`), a header edit's index counting those fields;
                                                  a recipient no edit touched keeps its original address, NOTIFY
                                                  and ORCPT (as Postfix's cleanup edits its queue file in place);
                                                  an added one takes its ADDRCPT_PAR's NOTIFY and ORCPT
    milters_view(head, drop) -> (shown, dropped)  the header section as a milter is shown it, and the fields left
                                                  out of it (message_drop_headers)
    NonSmtpdMilters(specs, settings, myhostname)  Postfix's non_smtpd_milters (pickup: `mailflow sendmail`)
        await .filter(submission) -> Filtered     one milter session per message, the SMTP events emulated as
                                                  Postfix's cleanup does: connect from localhost [127.0.0.1], HELO
                                                  localhost, MAIL, one RCPT per recipient, then the message
    Filtered(action, submission, reply, reason, hold)   action: continue, reject, tempfail or discard; `hold`:
                                                  the quarantine reason when the message is to be held

A message that the edits make bigger than the session's size limit (its listener's smtpd.message_size_limit) is
refused as Postfix's cleanup refuses it when its queue file reaches that size: 552 5.3.4 Error: message file too
big, and the warning "QID: queue file size limit exceeded"; the client keeps no more of the edits than the limit.

As in Postfix, a milter may refuse emulated connect, HELO, MAIL and end-of-message events (reject: the caller
returns the message to its sender; tempfail: it tries again later), but refusing an emulated recipient is a
configuration error: it is logged and the message waits (451 4.3.5 Server configuration error).

Failure behaviour: nothing raises; a milter that cannot be talked to answers with milter_default_action
(client.py), which shows here as the Filtered action. The session is closed before `filter` returns.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass

from mailflow import status
from mailflow.content import Content
from mailflow.filters.edits import edit_header
from mailflow.filters.milter.client import ClientMacros, Edits, MilterSession, MilterSettings, Verdict
from mailflow.message import header_fields, normalized_field_names, read_header
from mailflow.model import Envelope, Submission

log = logging.getLogger("mailflow.cleanup")

HEADER_LIMIT = 1_000_000  # the most of a header section given to milters (cleanup refuses bigger ones anyway)
# the most work of header edits applied on the event loop, counted as (the header's lines + edits) x (edits + 20):
# each field is parsed once (as long as 20 looks at it) and a change looks for its field among all of them (as
# Postfix's cleanup does; one of a field the message lacks adds it). 100 changes over 17 000 fields: 0.12 s, one
# change 20 ms; 10 000 changes over a small header: 7 s, and the size limit lets a milter send 70 000. More work
# goes to a worker thread; 50 000 is about 2 ms (100 changes over 300 fields, one over 2 000)
EDIT_WORK_INLINE = 50_000
EMULATED_CLIENT = ("localhost", "127.0.0.1")  # who non-smtpd mail comes from, to a milter (as Postfix says)


@dataclass(frozen=True)
class Filtered:
    action: str  # continue, reject, tempfail, discard
    submission: Submission
    reply: status.Reply | None = None  # reject, tempfail
    reason: str = ""  # for the log: which milter, what it said
    hold: str | None = None  # continue: queue it on hold (a milter's quarantine), with this reason


async def end_of_message(session: MilterSession, submission: Submission) -> Filtered:
    """See the module doc."""
    content = submission.content
    head, _ = read_header(content, HEADER_LIMIT)
    shown, dropped = milters_view(head, session.drop_headers)
    body = content.after(len(head))
    blank = 2 if body.read_prefix(2) == b"\r\n" else (1 if body.read_prefix(1) == b"\n" else 0)
    body_only = body.after(blank)
    verdict = await session.end_of_message(shown, lambda: body_only.stream(), submission.queue_id)
    if verdict.action in ("reject", "tempfail"):
        return Filtered(verdict.action, submission, verdict.reply, verdict.reason)
    if verdict.action == "discard":
        return Filtered("discard", submission, reason=verdict.reason or "milter discard")
    edits = verdict.edits
    hold = edits.quarantine or None
    if not edits:
        return Filtered("continue", submission)
    # (the fields dropped are put back after the edited ones: cleanup removes them, after it has seen a
    # Resent-Bcc make the message a resent one; those of these names a milter added are kept apart, for cleanup
    # to keep: Submission.milter_fields)
    new_head, added = head, b""
    if edits.headers:
        work = (shown.count(b"\n") + len(edits.headers)) * (len(edits.headers) + 20)
        fields, added = _edited(shown, edits.headers, session.drop_headers) if work <= EDIT_WORK_INLINE else \
            await asyncio.to_thread(_edited, shown, edits.headers, session.drop_headers)
        new_head = fields + dropped
    if edits.body is not None:
        content = Content((new_head, b"\r\n", *edits.body))
    else:
        content = Content((new_head, *body.parts)) if new_head is not head else content
    if edits.too_big or 0 < session.size_limit < content.size + len(added):
        log.warning("%s: queue file size limit exceeded", submission.queue_id)
        return Filtered("reject", submission, status.MESSAGE_TOO_BIG, "milter edits: message file too big")
    envelope = submission.envelope
    received = submission.received
    edited = _edited_envelope(envelope, edits)
    if edited != envelope or edits.sender:
        received = received or envelope  # (the automatic BCC lookups are made on it: cleanup)
        envelope = dataclasses.replace(edited, sender=(edits.sender[0].strip("<>") if edits.sender
                                                       else envelope.sender))
    return Filtered("continue", dataclasses.replace(submission, content=content, envelope=envelope,
                                                    received=received,
                                                    milter_fields=submission.milter_fields + added), hold=hold)


def _edited(shown: bytes, edits: list[tuple[str, int, str, str]], drop: frozenset[str]) -> tuple[bytes, bytes]:
    """The header section a milter was shown with its edits applied, as milters_view splits it."""
    return milters_view(edit_header(shown, edits), drop)


def milters_view(head: bytes, drop: frozenset[str]) -> tuple[bytes, bytes]:
    """(`head` as the milters are shown it: field names normalized, without the fields named in `drop`; those
    fields), as Postfix's cleanup removes message_drop_headers "after header_checks and before invoking Milter
    applications" and writes every field it keeps normalized."""
    normalized = normalized_field_names(head)
    fields = header_fields(normalized)
    if not any(name in drop for name, _ in fields):
        return normalized, b""
    shown = b"".join(line for name, lines in fields if name not in drop for line in lines)
    return shown, b"".join(line for name, lines in fields if name in drop for line in lines)


def _edited_envelope(envelope: Envelope, edits: Edits) -> Envelope:
    """The envelope with the milters' DELRCPT and ADDRCPT applied, as Postfix's cleanup edits its queue file: a
    recipient left alone keeps its original address, NOTIFY and ORCPT; an added one (at the end) has its own
    address as its original and the NOTIFY and ORCPT of its ADDRCPT_PAR, if any."""
    dsn = edits.add_recipient_dsn + [("", "")] * (len(edits.add_recipients) - len(edits.add_recipient_dsn))
    added = [(a.strip("<>"), given) for a, given in zip(edits.add_recipients, dsn) if a.strip("<>")]
    deleted = edits.delete_recipients
    kept = [i for i, r in enumerate(envelope.recipients) if f"<{r}>" not in deleted and r not in deleted]
    if not added and len(kept) == len(envelope.recipients):
        return envelope

    def column(values: tuple[str, ...], for_added: list[str]) -> tuple[str, ...]:
        if not values and not any(for_added):
            return ()  # (none given: the default for each)
        values = values or ("",) * len(envelope.recipients)
        return tuple(values[i] for i in kept) + tuple(for_added)

    new = [address for address, _ in added]
    return dataclasses.replace(envelope, recipients=column(envelope.recipients, new),
                               originals=column(envelope.originals, new) if envelope.originals else (),
                               notify=column(envelope.notify, [notify for _, (notify, _) in added]),
                               orcpts=column(envelope.orcpts, [orcpt for _, (_, orcpt) in added]))


class NonSmtpdMilters:
    """Postfix's non_smtpd_milters; see the module doc."""

    def __init__(self, specs: tuple[str, ...], settings: MilterSettings, myhostname: str):
        self._specs = specs
        self._settings = settings
        name, addr = EMULATED_CLIENT
        self._client = ClientMacros(myhostname=myhostname, daemon_name=myhostname, daemon_addr="",
                                    daemon_port="", client_addr=addr, client_name=name, client_port="0")

    async def filter(self, submission: Submission) -> Filtered:
        session = MilterSession(self._specs, self._settings, self._client)
        try:
            return await self._events(session, submission)
        finally:
            await session.close()

    async def _events(self, session: MilterSession, submission: Submission) -> Filtered:
        envelope = submission.envelope
        hold: str | None = None
        for event in (lambda: session.helo(EMULATED_CLIENT[0]), lambda: session.mail(envelope.sender, [])):
            verdict = await event()  # (helo connects first)
            if verdict.action == "quarantine":
                hold = verdict.reason or "milter quarantine"
            elif verdict.action not in ("continue", "accept"):
                return _stopped(verdict, submission)
        for recipient in envelope.recipients:
            verdict = await session.rcpt(recipient)
            if verdict.action in ("reject", "tempfail"):
                log.warning("%s: can't reject recipient <%s> in non-smtpd mail: milter configuration error",
                            verdict.reason or "milter", recipient)
                return Filtered("tempfail", submission, status.SERVER_CONFIGURATION_ERROR, verdict.reason)
            if verdict.action == "quarantine":
                hold = verdict.reason or "milter quarantine"
            elif verdict.action == "discard":
                return _stopped(verdict, submission)
        filtered = await end_of_message(session, submission)
        if filtered.action == "continue" and hold is not None and filtered.hold is None:
            return dataclasses.replace(filtered, hold=hold)
        return filtered


def _stopped(verdict: Verdict, submission: Submission) -> Filtered:
    if verdict.action == "discard":
        return Filtered("discard", submission, reason=verdict.reason or "milter discard")
    return Filtered(verdict.action, submission, verdict.reply, verdict.reason)
