"""Which delivery notices one finished delivery attempt calls for, and the messages that carry them.

Rules (Postfix bounce(8) and RFC 3461):
- failure: recipients that bounced (or expired) this attempt and whose NOTIFY allows FAILURE, and the parts that
  bounced of a deferred one (`RcptResult.owned`: local(8)'s bounces are sent at the end of the attempt);
- delay: pending recipients whose NOTIFY allows DELAY, once per message, when the caller says it is time;
- success: recipients delivered this attempt whose NOTIFY explicitly asks for SUCCESS, unless a next hop that
  offered DSN took the recipient with its NOTIFY (`RcptResult.next_hop_notifies`): that hop reports success
  (Postfix smtp_rcpt_done). The action is "relayed" when an MTA without DSN took it (RFC 3464 2.3.3: it may
  send no notice) or the agent says it handed the message on (`RcptResult.relayed`: a pipe service without flag
  X, as Postfix's pipe(8)), "expanded" when local delivery expanded an alias or a .forward (`RcptResult.expansion`,
  "alias expanded" as local(8) says; "delivered" for a list with an owner- alias), "delivered" when a local agent
  delivered it.
A notice goes to the envelope sender with the null sender; a failure whose agent names an owner
(`RcptResult.owner`: a mailing list's, local(8)'s bounce_workaround) goes to that owner instead, whatever the
sender (several failures, one at least of a list, `RcptResult.owned`: each of a list to its owner, about that
list; each of no list to the sender, about the member it names), in a notice of its own per failure, as
bounce_one sends it; a list owner's without the sender's ENVID, RET, ORCPT and original address (local(8)'s
alias.c gives a list none). A message with the null sender is itself a notice: its failures go to
`double_bounce_recipient` (postmaster by default) from `double-bounce@myhostname`, as a postmaster copy, with the
class 2bounce or bounce in notify_classes, or nowhere (the class not named, the setting empty); with the class
delay, its delays go to delay_notice_recipient. notify_classes' copies (Postfix's bounce(8)): with the class bounce
each failure notice to a sender has a copy to bounce_notice_recipient, with delay each delay notice one to
delay_notice_recipient, from the double-bounce sender, about every recipient whatever its NOTIFY, the original's
header section only (`Postmaster`, `_postmaster_copies`); a double bounce that fails is dropped (`discarded`,
which qmgr logs as Postfix's bounce(8) does). So a bounce never bounces, and no notice goes to the null sender;
nothing is sent about a notice from double-bounce@ (a postmaster's).
`NoticeWriter.submissions()` writes the planned notices (also pickup's, for a maildrop file it returns);
`await Notices.for_attempt()` returns ready-to-commit `NewMessage`s (made by cleanup's `prepare`), which qmgr
commits in the same transaction as the results, so a crash can lose neither. Of the original it reads at
most `bounce_size_limit` bytes, or only its header section (mailflow.message.quoted_original): a notice is
small, in memory. Its text (bounce.build_notice, pure: about 90 us a recipient, so 90 ms for a message whose
thousand recipients bounce) is made in a worker thread, so that the event loop never waits for it; so is the plan
of an attempt of more than PLAN_INLINE results (100 000 bounced recipients held the loop 0.9 s); cleanup's
`prepare` runs on the loop.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

from mailflow.bounce_templates import Templates, template_values
from mailflow.config import DEFAULTS
from mailflow.content import Content
from mailflow.message import quoted_original
from mailflow.model import ClientInfo, Envelope, Outcome, QueuedMessage, RcptResult, Recipient, Submission
from mailflow.stages.bounce import NoticeRecipient, build_notice, notice_is_8bit, notice_recipient, wants_notice
from mailflow.store import NewMessage

PLAN_INLINE = 1000  # results planned on the event loop (some 10 ms); more are planned in a worker thread
ACTION = {Outcome.BOUNCED: "failed", Outcome.DEFERRED: "delayed", Outcome.SENT: "delivered"}


@dataclass(frozen=True)
class Notice:
    """One notice to send: its kind, envelope, and the recipients it reports on."""

    kind: str  # failure | delay | success
    sender: str
    to: str
    recipients: tuple[NoticeRecipient, ...]
    list_owner: bool = False  # to a mailing list's owner: without the sender's ENVID and RET (local(8)'s alias.c)
    ret: str | None = None  # a postmaster's notice: "FULL" (a double bounce) or "HDRS" (a copy); else the sender's

    @property
    def postmaster_copy(self) -> bool:
        """A notice to the postmaster (from the double-bounce sender): Postfix's postmaster copy."""
        return bool(self.sender)


@dataclass(frozen=True)
class Postmaster:
    """What the postmaster hears of (Postfix's notify_classes and its *_notice_recipient): `classes` the words,
    `bounce_to` gets the copies of failure notices, `delay_to` the copies of delay notices."""

    classes: tuple[str, ...] = DEFAULTS.queue.notify_classes
    bounce_to: str = DEFAULTS.queue.bounce_notice_recipient
    delay_to: str = DEFAULTS.queue.delay_notice_recipient

    @classmethod
    def of(cls, config) -> "Postmaster":
        return cls(config.notify_classes, config.bounce_notice_recipient, config.delay_notice_recipient)


def plan(message: QueuedMessage, results: list[RcptResult], *, warn_delay: bool, myhostname: str,
         double_bounce_recipient: str, now: float, postmaster: Postmaster = Postmaster()) -> list[Notice]:
    if _is_double_bounce(message, myhostname):
        return []  # a failed double bounce is dropped
    wanted = [("failure", Outcome.BOUNCED), ("success", Outcome.SENT)]
    if warn_delay:
        wanted.append(("delay", Outcome.DEFERRED))
    notices: list[Notice] = []
    for kind, outcome in wanted:
        chosen = [r for r in results if (r.outcome is outcome or kind == "failure" and bounced_parts(r))
                  and wants_notice(r.recipient, kind) and not (kind == "success" and r.next_hop_notifies)]
        owned = [told for r in chosen if kind == "failure" for told in _owners_told(r, now)]
        notices.extend(Notice(kind, "", owner, (about,), list_owner=True) for owner, about in owned)
        told = tuple(told for r in chosen for told in (
            _senders_told(r, now) if kind == "failure" and (r.owner or r.owned) else [_notice_recipient(r, now)]
        )) if message.sender else ()  # (a null sender is told nothing: its recipients are not described for it)
        if told:
            notices.append(Notice(kind, "", message.sender, told))
        notices += _postmaster_copies(message, results, kind, outcome, postmaster, double_bounce_recipient,
                                      myhostname, now)
    return notices


def bounced_parts(result: RcptResult) -> bool:
    """Whether a deferred recipient has parts that bounced (`owned`), to be told: not when soft_bounce kept them
    deferred (`soft_bounced`)."""
    return result.outcome is Outcome.DEFERRED and bool(result.owned) and not result.soft_bounced


def _postmaster_copies(message: QueuedMessage, results: list[RcptResult], kind: str, outcome: Outcome,
                       postmaster: Postmaster, double_bounce_recipient: str, myhostname: str,
                       now: float) -> list[Notice]:
    """The postmaster's notices of this kind, as Postfix's bounce(8) sends them (bounce_notify_service.c,
    bounce_warn_service.c), from the double-bounce sender, about every recipient whatever its NOTIFY:
    - the failures of a notice (null sender): to double_bounce_recipient with the whole original, with the class
      2bounce or bounce; the delays of a notice: to delay_notice_recipient, whole too, with the class delay;
    - the failures of other mail: a copy to bounce_notice_recipient, the original's header section only, with the
      class bounce, whether or not a recipient's NOTIFY asked for the sender's notice (Postfix's bounce log holds
      every failure, a deferred recipient's parts that bounced too; qmgr flags each for the copy); its delays: a
      copy to delay_notice_recipient with the class delay, at the warning's time (whatever the NOTIFY of each)."""
    to, ret = _postmaster_address(message, kind, postmaster, double_bounce_recipient)
    if not to:  # (decided first: the recipients are described only for a copy that goes, 100 000 of them alike)
        return []
    about = tuple(_notice_recipient(r, now) for r in results if r.outcome is outcome)
    if kind == "failure":  # a deferred recipient's parts that bounced: in Postfix's bounce log too
        about += tuple(told for r in results if bounced_parts(r) for told in _failed_parts(r, now))
    if not about:
        return []
    return [Notice(kind, _double_bounce_sender(myhostname), notice_recipient(to, myhostname), about, ret=ret)]


def _postmaster_address(message: QueuedMessage, kind: str, postmaster: Postmaster,
                        double_bounce_recipient: str) -> tuple[str, str]:
    """Where the postmaster's copy of a notice of this kind goes, and its RET: ("", "") when none goes."""
    classes = postmaster.classes
    if kind == "success":
        return "", ""
    if not message.sender:
        if kind == "failure" and double_bounce_recipient and ("2bounce" in classes or "bounce" in classes):
            return double_bounce_recipient, "FULL"
        if kind == "delay" and "delay" in classes and postmaster.delay_to:
            return postmaster.delay_to, "FULL"
        return "", ""
    to = {"failure": postmaster.bounce_to if "bounce" in classes else "",
          "delay": postmaster.delay_to if "delay" in classes else ""}[kind]
    return to, "HDRS"


def discarded(message: QueuedMessage, results: list[RcptResult], *, myhostname: str) -> bool:
    """Whether these results bounce a double bounce, which is dropped (Postfix's bounce(8) logs "undeliverable
    postmaster notification discarded")."""
    return _is_double_bounce(message, myhostname) and any(r.outcome is Outcome.BOUNCED for r in results)


def _double_bounce_sender(myhostname: str) -> str:
    return f"double-bounce@{myhostname}"


def _is_double_bounce(message: QueuedMessage, myhostname: str) -> bool:
    return message.sender == _double_bounce_sender(myhostname)


def _owners_told(result: RcptResult, now: float) -> list[tuple[str, NoticeRecipient]]:
    """What a failed recipient's list owners are told, (owner, recipient as reported), each in a notice of its
    own: the whole result for its `owner` (one failure); each `owned` failure for its own owner, about its list
    (local(8)'s bounce_workaround calls bounce_one once per failed delivery: one notice per failure, to the
    owner of the list whose command or file failed, even when one owner has several)."""
    if result.owner:
        return [(result.owner, _owners_view(_notice_recipient(result, now)))]
    rcpt = result.recipient
    return [(f.owner, NoticeRecipient(Recipient(rcpt.index, f.address, "", rcpt.notify), "failed", f.dsn, f.text,
                                      last_attempt=now, relay=result.relay, diagnostic_code=f.diagnostic))
            for f in result.owned if f.owner]


def _senders_told(result: RcptResult, now: float) -> list[NoticeRecipient]:
    """What the sender is told of a failed recipient whose list failures go to the lists' owners: its failures of
    no list (`owned` with no owner), each about the member it names, "<member> (expanded from <recipient>)", or
    the recipient itself; nothing when every failure was a list's."""
    return _failed_parts(result, now, of_lists=False)


def _failed_parts(result: RcptResult, now: float, of_lists: bool = True) -> list[NoticeRecipient]:
    """A recipient's failures told apart (`owned`; with `of_lists` False only those of no list), each about the
    member it names, "<member> (expanded from <recipient>)"."""
    rcpt = result.recipient
    return [NoticeRecipient(replace(rcpt, address=f.address, original=rcpt.original or rcpt.address), "failed",
                            f.dsn, f.text, last_attempt=now, relay=result.relay, diagnostic_code=f.diagnostic)
            for f in result.owned if of_lists or not f.owner]


def _owners_view(told: NoticeRecipient) -> NoticeRecipient:
    """A recipient as a list owner's notice reports it: without the sender's ORCPT and original address, which
    local(8)'s alias.c drops for a list (no Original-Recipient, no "expanded from")."""
    return replace(told, recipient=replace(told.recipient, original="", orcpt=""))


def _notice_recipient(result: RcptResult, now: float) -> NoticeRecipient:
    # a remote MTA is named host[ip]:port; local agents (local, virtual, pipe services, discard) are not
    remote = result.relay.split("[", 1)[0] if "[" in result.relay else ""
    action, text, named = ACTION[result.outcome], result.text, result.named
    if result.outcome is Outcome.SENT and result.expansion:  # local(8)'s alias.c and dotforward.c
        action = "delivered" if result.expansion == "list" else "expanded"
        text, named = "alias expanded", result.recipient  # about the alias, not the member it led to
        remote = ""  # (whether a member went on to an MTA, as mailbox_transport's LMTP, or to a mailbox)
    elif result.outcome is Outcome.SENT and (remote or result.relayed):
        action = "relayed"  # handed to an MTA without DSN or a gateway, which may send no notice (RFC 3464 2.3.3)
    return NoticeRecipient(named, action, result.dsn, text, remote_mta=remote, last_attempt=now, relay=result.relay,
                           diagnostic_code="" if result.outcome is Outcome.SENT else result.diagnostic)


class NoticeWriter:
    """Writes the notices `plan` calls for, with bounce_template_file's texts (`templates`) and the [queue] settings
    (`config`: bounce_size_limit, notify_classes and the *_notice_recipient addresses): qmgr's, through `Notices`,
    and pickup's for a maildrop file it refuses, so that both are planned and worded one way."""

    def __init__(self, *, myhostname: str, config, templates: Templates = Templates(), mydomain: str = ""):
        self._myhostname = myhostname
        self._config = config
        self._templates = templates  # bounce_template_file's
        self._values = template_values(myhostname=myhostname, mydomain=mydomain or myhostname,
                                       delay_warning_time=config.delay_warning_time,
                                       maximal_queue_lifetime=config.maximal_queue_lifetime)

    @property
    def bounce_size_limit(self) -> int:
        """The bytes of the original a notice quotes at most."""
        return self._config.bounce_size_limit

    async def submissions(self, message: QueuedMessage, results: list[RcptResult], *, original: Content,
                          now: float, warn_delay: bool = False, retry_until: float = 0.0,
                          original_size: int | None = None) -> list[tuple[Notice, Submission]]:
        """The notices `plan` calls for, each as the Submission that queues it (for_attempt's, and pickup's for a
        maildrop file it refuses: Postfix's cleanup bounces it through bounce(8), its templates and notify_classes
        alike). `original_size`: the original's when `original` is only its start."""
        c = self._config
        out = []
        planning = partial(plan, message, results, warn_delay=warn_delay, myhostname=self._myhostname,
                           double_bounce_recipient=c.double_bounce_recipient, now=now, postmaster=Postmaster.of(c))
        planned = planning() if len(results) <= PLAN_INLINE else await asyncio.to_thread(planning)
        quoted = quoted_original(original, c.bounce_size_limit) if planned else b""
        for n, notice in enumerate(planned):
            apart = f".{n}" if n else ""  # (a copy's Message-ID is its own: a mailbox may keep one of two alike)
            content = await asyncio.to_thread(
                build_notice,
                kind=notice.kind, queue_id=message.queue_id, sender=message.sender, arrival=message.arrival,
                envid="" if notice.list_owner else message.envid,
                ret="" if notice.list_owner else message.ret if notice.ret is None else notice.ret,
                recipients=list(notice.recipients), original=quoted,
                original_size=original.size if original_size is None else original_size,
                reporting_mta=self._myhostname, now=now,
                will_retry_until=retry_until if notice.kind == "delay" else None,
                notice_id=f"{message.queue_id}.{notice.kind}{apart}.{int(now)}", size_limit=c.bounce_size_limit,
                to=notice.to, delay_warning_time=c.delay_warning_time, postmaster_copy=notice.postmaster_copy,
                smtputf8=message.smtputf8, template=self._templates.get(notice.kind), template_values=self._values,
            )
            addresses = [notice.sender, notice.to] + [r.recipient.address for r in notice.recipients]
            smtputf8 = message.smtputf8 or not all(a.isascii() for a in addresses)  # (Postfix: as the original)
            envelope = Envelope(notice.sender, (notice.to,), smtputf8=smtputf8,
                                body_type="8BITMIME" if notice_is_8bit(content) else "")
            client = ClientInfo(addr="127.0.0.1", helo=self._myhostname, protocol="local")
            out.append((notice, Submission(envelope, Content.of(content), client)))
        return out


class Notices(NoticeWriter):
    """qmgr's: turns planned notices into queued messages. `prepare` is cleanup's: Submission -> NewMessage."""

    def __init__(self, prepare: Callable[[Submission], NewMessage], *, myhostname: str, config,
                 templates: Templates = Templates(), mydomain: str = ""):
        super().__init__(myhostname=myhostname, config=config, templates=templates, mydomain=mydomain)
        self._prepare = prepare

    def discards(self, message: QueuedMessage, results: list[RcptResult]) -> bool:
        return discarded(message, results, myhostname=self._myhostname)

    async def for_attempt(self, message: QueuedMessage, results: list[RcptResult], *, original: Content,
                          now: float, warn_delay: bool, retry_until: float) -> list[tuple[Notice, NewMessage]]:
        built = await self.submissions(message, results, original=original, now=now, warn_delay=warn_delay,
                                       retry_until=retry_until)
        return [(notice, self._prepare(sub)) for notice, sub in built]
