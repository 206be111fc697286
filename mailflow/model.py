"""Frozen values shared by every stage: what travels between smtpd, cleanup, qmgr and the transports.

Stages hand each other these values (and bytes), never their own objects. Nothing here does I/O. Message
content travels as a `mailflow.content.Content`: in memory when small, else a spool or queue file read as a
stream, so a value never holds a big message whole.
`replaced(value, **changes)`: dataclasses.replace for these values, in a few calls rather than one per field.
"""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable
from dataclasses import field
from typing import Any, AsyncIterator, Awaitable, Callable, NamedTuple, TypeVar

from mailflow.content import Content
from mailflow.records import record

QueueId = str
Value = TypeVar("Value")


def replaced(value: Value, **changes: Any) -> Value:
    """`value` with `changes`, as dataclasses.replace makes it (its class's __init__ runs with every field; a name
    that is no field raises TypeError) for the frozen dataclasses here, whose attributes are their fields, all
    __init__ arguments: ~4 calls where dataclasses.replace makes one a field (on the path of every message)."""
    fields = value.__dict__.copy()
    fields.update(changes)
    return type(value)(**fields)


class AddressClass(enum.Enum):
    """Postfix's address classes (ADDRESS_CLASS_README) as far as trivial-rewrite knows them."""

    LOCAL = "local"
    VIRTUAL_ALIAS = "virtual alias"
    VIRTUAL_MAILBOX = "virtual mailbox"
    RELAY = "relay"
    DEFAULT = "default"


@record
class Resolution:
    """Where trivial-rewrite sends one recipient: `transport:nexthop` for `address`."""

    address_class: AddressClass
    transport: str
    nexthop: str
    address: str


@record
class ClientInfo:
    """Who handed us the message: peer address, the name it gave in HELO, how it spoke."""

    addr: str
    port: int = 0
    helo: str = ""
    protocol: str = "ESMTP"  # as Received says it: SMTP, ESMTP, ESMTPS/A/SA, UTF8SMTP(S)(A) (RFC 3848, 6531), local
    hostname: str = "unknown"
    sasl_method: str = ""  # AUTH mechanism and login, when the client authenticated
    sasl_username: str = ""
    # the login the Received header names, `(Authenticated sender: LOGIN)` (smtpd's sasl_authenticated_header)
    received_login: str = ""

    @property
    def named(self) -> str:
        """`host[addr]`, as the queue records the client and the log names it."""
        return f"{self.hostname}[{self.addr}]"


def rfc_addr(ip: str) -> str:
    """An address as RFC 5321 writes it between brackets: an IPv6 one behind the `IPv6:` tag (Postfix's rfc_addr,
    `[IPv6:2001:db8::1]`), others as they are."""
    return f"IPv6:{ip}" if ":" in ip else ip


@record
class ClientAttributes:
    """The client attributes Postfix keeps with a queued message (its queue file's client_name, client_address,
    client_port, helo_name, protocol_name, sasl_method, sasl_username, sasl_sender) and hands its delivery agents
    (local(8)'s CLIENT_* and SASL_* environment, pipe(8)'s ${client_*} and ${sasl_*} macros). "" when not known:
    mail submitted with sendmail and mail made here (notices) have none; a copy local delivery forwards keeps
    all but the port (Postfix's local/forward.c)."""

    name: str = ""  # the client's host name, "unknown" without a verified one
    address: str = ""  # its IP address, an IPv6 one as "IPv6:..." (Postfix's rfc_addr)
    port: str = ""
    helo: str = ""  # the HELO/EHLO name as smtpd keeps it (printable, neutered)
    protocol: str = ""  # SMTP or ESMTP: RFC 3848's S and A suffixes are for the Received header only
    sasl_method: str = ""  # when the client authenticated
    sasl_username: str = ""
    sasl_sender: str = ""  # MAIL FROM's AUTH= value as given ("" for AUTH=<>), whoever sent it


@record
class SessionTranscript:
    """What one SMTP session said, as smtpd's transcript facility recorded it up to a moment (a message queued,
    the end of the session): the client, its HELO name, TLS (protocol and cipher, "" without), the AUTH login,
    and the lines in order, each (`"C"` client or `"S"` server, text; AUTH credentials never kept), at most the
    observer's limits: `omitted` counts the lines left out past them."""

    client: str
    helo: str = ""
    tls: str = ""
    login: str = ""
    lines: tuple[tuple[str, str], ...] = ()
    omitted: int = 0


@record
class Envelope:
    """The SMTP envelope as accepted: sender ("" is the null sender) and recipients in order."""

    sender: str
    recipients: tuple[str, ...]
    smtputf8: bool = False
    body_type: str = ""  # BODY as given (8BITMIME or 7BIT; "" none) or marked by cleanup
    originals: tuple[str, ...] = ()  # per recipient, the address first given (ORCPT); () means the same
    # RFC 3461 DSN parameters: per recipient NOTIFY and ORCPT (() means none given), per message ENVID and RET.
    notify: tuple[str, ...] = ()
    orcpts: tuple[str, ...] = ()
    envid: str = ""
    ret: str = ""

    def redirected(self, address: str | None) -> Envelope:
        """An access or header_checks REDIRECT: every recipient replaced by `address` (their DSN parameters go
        with them); None: unchanged."""
        if address is None:
            return self
        return dataclasses.replace(self, recipients=(address,), originals=(), notify=(), orcpts=())

    def with_bcc(self, addresses: Iterable[str]) -> Envelope:
        """An access table's BCC actions (smtpd; header/body checks' and the automatic BCC copies are cleanup's,
        mailflow.routing.addressmap): one more recipient for a copy each, without DSN parameters (so its NOTIFY is
        the default, as Postfix 3.7's smtpd writes it); one already there is not added again."""
        present = set(self.recipients)
        added = tuple(a for a in dict.fromkeys(addresses) if a not in present)
        if not added:
            return self
        return dataclasses.replace(
            self, recipients=self.recipients + added,
            originals=self.originals + added if self.originals else (),
            notify=self.notify + ("",) * len(added) if self.notify else (),
            orcpts=self.orcpts + ("",) * len(added) if self.orcpts else ())


@record
class LocalUser:
    """Who submitted a message with `mailflow sendmail` (pickup): the Received header names the uid, and a
    missing From header is made from `fullname` and the envelope sender."""

    uid: int
    login: str
    fullname: str = ""


@record
class Submission:
    """One accepted message on its way from smtpd (or pickup) into cleanup."""

    envelope: Envelope
    content: Content
    client: ClientInfo
    submitter: LocalUser | None = None  # set by pickup only
    client_attributes: ClientAttributes = ClientAttributes()  # kept with the message for the delivery agents
    forwarded: bool = False  # a copy local delivery forwards (aliases, .forward): SRS, ARC (mailflow.signing)
    # The inbound filters' verdicts for cleanup (docs/filtering.md): header fields it prepends below its
    # Received header (Authentication-Results, spam and virus tags); the after-queue filter for this message
    # (None: cleanup's, [smtpd] content_filter; "": none); receive_override_options of the listener.
    headers: tuple[str, ...] = ()
    content_filter: str | None = None
    overrides: frozenset[str] = frozenset()
    # cleanup adds the Message-ID, Date and From the message lacks (a local submission, a client in
    # local_header_rewrite_clients, or always_add_missing_headers); otherwise the headers stay as they came
    add_missing_headers: bool = True
    # cleanup rewrites the addresses of the address header fields (From, To, Cc...), an unqualified one getting
    # @this domain: "" is myorigin (a local submission, a client in local_header_rewrite_clients), another the
    # remote_header_rewrite_domain of other clients; None leaves them as they came
    header_rewrite_domain: str | None = ""
    # the queue id smtpd took at the first accepted recipient (Cleanup.begin), which cleanup gives the message;
    # "" for the others: cleanup takes one
    queue_id: QueueId = ""
    # an access table's REDIRECT replaced the recipients (smtpd): cleanup adds no BCC recipient then, as Postfix's
    # queue manager sends every recipient of a redirected message, BCC copies too, to the redirect address
    redirected: bool = False
    # the envelope before the milters changed it (None: they did not): cleanup makes the automatic BCC lookups on
    # it, as Postfix's cleanup makes them before its milters run
    received: Envelope | None = None
    # header fields the milters added that message_drop_headers names (a milter's Bcc): cleanup keeps them, after
    # the fields it adds, as Postfix's cleanup writes a milter's fields after it has removed those of the message
    milter_fields: bytes = b""


@record
class Recipient:
    """One recipient of a queued message. `index` is its position in the envelope; `original` the address as
    the client gave it; `notify` and `orcpt` its DSN parameters (RFC 3461), '' when not given."""

    index: int
    address: str
    original: str
    notify: str = ""
    orcpt: str = ""


@record
class NewMessage:
    """A message as cleanup (or qmgr, for a notice) commits it to the store. Recipient indexes are their positions
    in `recipients`."""

    queue_id: QueueId
    sender: str
    arrival: float  # the first arrival (delay=, the listings): a requeued copy keeps its message's
    content: Content
    recipients: tuple[Recipient, ...]
    smtputf8: bool = False
    body_type: str = ""  # BODY as given (8BITMIME or 7BIT; "" none) or marked by cleanup
    client: str = ""
    envid: str = ""
    ret: str = ""
    queue: str = "incoming"  # "hold": on hold (an smtpd HOLD restriction); "active": handed straight to qmgr
    content_filter: str = ""  # "transport:nexthop" of the after-queue filter every recipient goes to; "" none
    client_attributes: ClientAttributes = ClientAttributes()
    created: float | None = None  # the base of its queue lifetime and backoff (Postfix's create_time): a requeued
    #                               copy's making; None: the arrival


@record
class QueuedMessage:
    """A message as the queue manager sees it: envelope data and the recipients still to do; `owed`: results
    recorded before a stop whose failure/success notice is not queued yet (the end of this attempt queues it)."""

    queue_id: QueueId
    sender: str
    arrival: float
    size: int
    smtputf8: bool
    body_type: str
    attempts: int
    recipients: tuple[Recipient, ...]
    envid: str = ""
    ret: str = ""
    warned: bool = False
    owed: tuple["RcptResult", ...] = ()
    content_filter: str = ""  # "transport:nexthop": every recipient goes there (the after-queue filter)
    client_attributes: ClientAttributes = ClientAttributes()
    from_logged: bool = True  # False: qmgr's `from=` line is owed when it takes the message (held on arrival,
    #                           deferred, released, recovered at a start: it enters the active queue again)
    nrcpt: int = 0  # its recipients when it was queued, done ones included (qmgr's `nrcpt=`); 0: len(recipients)
    damage: str = ""  # what is wrong with its queue rows (edited by hand: mailflow/store/damage.py); "" when sound.
    #                   The values then are stand-ins: qmgr moves the message to the corrupt queue, delivers nothing
    created: float | None = None  # the base of its queue lifetime and backoff (see NewMessage); None: the arrival

    @property
    def lifetime_base(self) -> float:
        """When its queue lifetime and backoff started: a requeued copy's making, else its arrival (Postfix's
        qmgr counts both from the queue file's create_time, which cleanup sets anew for a postsuper -r copy)."""
        return self.arrival if self.created is None else self.created


@record
class DeliveryRequest:
    """What qmgr hands one transport: one message, the recipients for one `(transport, nexthop)`."""

    queue_id: QueueId
    sender: str
    recipients: tuple[Recipient, ...]
    nexthop: str
    content: Content
    smtputf8: bool = False
    body_type: str = ""  # BODY as given (8BITMIME or 7BIT; "" none) or marked by cleanup
    arrival: float = 0.0
    envid: str = ""  # RFC 3461 ENVID and RET of the message, passed on to a next hop that offers DSN
    ret: str = ""
    queued_for: float | None = None  # seconds since arrival when this attempt began (Postfix's "preactive
    # delay"); None when not known: an agent then takes the message as one that has been waiting
    client_attributes: ClientAttributes = ClientAttributes()  # who submitted the message (pipe and local use it)
    # an address probe (Postfix's DEL_REQ_FLAG_MTA_VRFY, mailflow.stages.verify): the SMTP and LMTP clients say
    # MAIL and RCPT only, no DATA; an accepted recipient is SENT with the RCPT reply, nothing is delivered
    verify: bool = False
    # qmgr's: told each result as soon as it is final (`settled`), so that a stop's cancel landing after that, before
    # the report is back, still records it (not part of the request's value: equal requests differ only here)
    on_settled: Callable[[Iterable[RcptResult]], None] | None = field(default=None, compare=False, repr=False)
    # qmgr's too: takes the results of work a stop cut off, to come (`settled_late`)
    on_late: Callable[[Callable[[], Awaitable[list[RcptResult]]]], None] | None = field(default=None, compare=False,
                                                                                      repr=False)

    def settled(self, results: Iterable[RcptResult]) -> None:
        """An agent's word that `results` are final: the peer took the message (the SMTP and LMTP clients, at a 2xx
        after DATA; the agents that write a mailbox or run a command hand theirs on through mailflow.uncut). Said
        before the agent's next await, so a stop that cancels the delivery after the peer's answer does not lose
        it (qmgr records them: a restart does not deliver them again, as Postfix's agents record each recipient in
        the queue file as soon as it is done). The report stays the whole answer; what is said here only counts
        when the delivery is cut off."""
        if self.on_settled is not None:
            self.on_settled(results)

    def settled_late(self, results: Callable[[], Awaitable[list[RcptResult]]]) -> bool:
        """An agent's word, as a stop cuts its work off (mailflow.uncut's limit passed), that `results()` waits for
        that work (left running: a write that ends on its own) and returns the results it makes final, about the
        request's recipients. qmgr waits for them while it records the results already back, LATE_RESULT_GRACE s at
        most, and records them, or cancels the wait (the work is cut off then: a restart delivers its recipients
        again). False when no one takes them (a
        request not from qmgr): the agent cuts the work off at once."""
        if self.on_late is None:
            return False
        self.on_late(results)
        return True


class Outcome(enum.Enum):
    SENT = "sent"
    DEFERRED = "deferred"
    BOUNCED = "bounced"


class MsgStats(NamedTuple):
    """When one recipient's delivery attempt passed each stage, on qmgr's clock (Postfix's MSG_STATS,
    src/global/msg_stats.h), for the `delay=` and `delays=` of its log line; 0.0 where a stage was not reached.
    qmgr stamps it once per job: one tuple shared by the job's results."""

    arrival: float  # the message arrived (Postfix: incoming queue entry)
    active: float = 0.0  # it entered the active queue for this attempt (qmgr took it)
    handoff: float = 0.0  # qmgr handed the job to its delivery agent; 0.0: no agent (qmgr deferred it itself)
    done: float = 0.0  # the agent gave its results; 0.0: the time of the log line


class ConnStats(NamedTuple):
    """An SMTP or LMTP client's part of MSG_STATS for one transaction: when its session was set up (greeting,
    EHLO, TLS, AUTH done: MAIL FROM goes next), on qmgr's clock, and which use of its connection the transaction
    was (1: a new connection; Postfix logs `conn_use=` from 2). One tuple per transaction."""

    setup_done: float
    use: int = 1


class OwnedFailure(NamedTuple):
    """A failure local delivery reports on its own (local(8)'s bounce_workaround): `owner` is told about `address`
    (the list whose command or file failed) with its status, text and Diagnostic-Code; with no owner ("") the
    sender is, about the member that failed (or the recipient itself)."""

    owner: str
    address: str
    dsn: str
    text: str
    diagnostic: str = ""


@record
class RcptResult:
    """The fate of one recipient after one delivery attempt.

    `dsn` is the enhanced status code (RFC 3463), `text` the diagnostic as a human or the remote said it,
    `relay` where it went (`host[addr]:port`, `local`, `none`), `transport` by which (qmgr stamps it: the
    agents do not know the name they run under). `next_hop_notifies`: accepted by a next hop that
    offered DSN and was given the recipient's NOTIFY (RFC 3461 4.1): it sends the notices asked for from now on,
    so no success notice comes from here (Postfix smtp_rcpt_done). `expanded`: the address the result is
    about when the agent expanded the recipient (an alias member that does not exist, the one mailbox an alias
    leads to), '' when it is the recipient itself; logs and notices then name it as Postfix does, "<member>
    (expanded from <recipient>)" (`named`).
    `relayed`: a success handed to a gateway that may send no notice of its own (RFC 3464 2.3.3), as a pipe(8)
    service without flag X: a success notice says `Action: relayed` (as for an MTA without DSN, which its relay
    shows).
    `expansion`: how local delivery expanded the recipient: "alias" (an alias or a .forward) or "list" (an
    alias with an owner- alias), '' not at all; its success notice then says "alias expanded" with `Action:
    expanded` ("delivered" for a list), as local(8) reports it (the addresses it expands to report no success).
    `owner`: where a failure notice about the recipient goes instead of the sender (a mailing list's owner, when
    its one command or file failed: local(8)'s bounce_workaround). `owned`: a recipient with several failures
    (an alias of failing commands or unknown members, of two lists, a list of two failing commands, a list beside
    an unknown member), a list's owner- alias among them or not, has no `owner`, but each failure here, told in a
    notice of its own, as local(8)'s bounce_workaround calls bounce_one for each: a list's to its owner about the
    list, the others to the sender (owner "") about the member they name; a deferred recipient's parts that
    bounced (one too) likewise, told and logged now while it waits for the retry (local(8) logs each bounce at
    once, bounce(8) sends it at the end of the attempt); () for the others. `diagnostic`: the
    Diagnostic-Code of the result's notice when the agent gives one of its own, `type; text` (a failed command's
    `x-unix; <its output>`, as Postfix's pipe_command); '' for the others, whose notice makes it from `text`.
    `relayed`, `expanded`, `expansion`, `owner`, `owned` and `diagnostic` are stored with the result: a notice
    owed across a restart says what it would have said.
    `conn`: the SMTP or LMTP session the result came from, when one was set up; `stats`: the stages of the
    attempt, stamped by qmgr when an agent had the job (None: none had it, qmgr's log line falls back to the
    attempt's own). `program`: the Postfix program the line is logged under when another agent than the job's
    made the result (local's mailbox_transport hands a mailbox to lmtp, whose result it is, as Postfix logs it
    under postfix/lmtp); "" the job's. `soft_bounced`: a bounce that soft_bounce turned into this deferral (its
    status 4.X.X), logged `status=SOFTBOUNCE` as Postfix's bounce_append logs it. `delivered`: what the parts
    delivered said, for a bounced result whose failures are logged apart (`owned`): its own `status=sent` line, as
    local(8) logs each delivery. `unlogged`: a recipient done with nothing delivered, forwarded nor refused (an
    alias whose expansion came to nothing, as an :include: file that includes only itself): recorded done with no
    line of its own, as local(8) returns success for it and logs nothing (so log tools count nothing either). None
    of the six is stored.
    """

    recipient: Recipient
    outcome: Outcome
    dsn: str
    text: str
    relay: str = "none"
    next_hop_notifies: bool = False
    transport: str = ""  # the transport whose job it was (set by qmgr; "" when none was chosen)
    expanded: str = ""
    relayed: bool = False
    expansion: str = ""
    owner: str = ""
    diagnostic: str = ""
    owned: tuple[OwnedFailure, ...] = ()
    conn: ConnStats | None = field(default=None, compare=False, repr=False)
    stats: MsgStats | None = field(default=None, compare=False, repr=False)
    program: str = field(default="", compare=False)  # the agent that made it, when not the job's (not stored)
    soft_bounced: bool = field(default=False, compare=False)  # a bounce soft_bounce kept deferred (not stored)
    delivered: str = field(default="", compare=False)  # the parts delivered of a result with `owned` (not stored)
    unlogged: bool = field(default=False, compare=False)  # done with nothing delivered: no line (not stored)

    @property
    def named(self) -> Recipient:
        """The recipient as logs and notices name it: the expanded address, with the one given as its original."""
        if not self.expanded:
            return self.recipient
        return dataclasses.replace(self.recipient, address=self.expanded,
                                   original=self.recipient.original or self.recipient.address)


@record
class DeliveryReport:
    """A transport's answer: one result per recipient, plus the site verdict.

    Per-recipient results decide each recipient's fate. Only `site_ok` speaks about the destination
    itself (could we talk to it at all?); qmgr feeds it to the destination's concurrency window.
    """

    results: tuple[RcptResult, ...]
    site_ok: bool = True
    site_reason: str = ""
    site_status: str = ""  # the site failure's enhanced status code (Postfix's dsb status), "" when none was given

    @classmethod
    def uniform(
        cls,
        recipients: tuple[Recipient, ...],
        outcome: Outcome,
        dsn: str,
        text: str,
        relay: str = "none",
        site_ok: bool = True,
    ) -> "DeliveryReport":
        """The same result for every recipient (a refused MAIL, a dead site, a discard, a missing agent)."""
        results = tuple(RcptResult(r, outcome, dsn, text, relay) for r in recipients)
        return cls(results, site_ok=site_ok, site_reason="" if site_ok else text, site_status="" if site_ok else dsn)

    @classmethod
    async def gathered(cls, recipients: tuple[Recipient, ...], each: AsyncIterator[RcptResult]) -> "DeliveryReport":
        """The whole of an agent's `deliver_each` (its `deliver`): every result it gives, in `recipients`' order."""
        given = {result.recipient.index: result async for result in each}
        return cls(tuple(given[r.index] for r in recipients if r.index in given))


@record
class Delivered:
    """The end of one delivery attempt of a message, as qmgr records it (each recipient's result was recorded
    when its job ended): when to try the rest again, recipients that expired unsent (now bounced), and the
    recipients whose owed notices are queued with this record."""

    queue_id: QueueId
    next_attempt: float | None = None  # None: nothing pending, remove the message
    warned: bool = False  # the "delayed" notice has been sent
    expired: tuple[RcptResult, ...] = ()
    noticed: tuple[int, ...] = ()  # recipient indexes whose notice is now queued
