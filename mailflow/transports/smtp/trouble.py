"""What went wrong, and what each recipient gets for it (Postfix smtp_trouble): the SMTP and LMTP clients' one set
of failures and the mapping of replies and failures to per-recipient results and the site verdict.

Failures are `mailflow.errors` delivery errors (`dsn`, `text`: the diagnostic a bounce and the log show):

    SiteFailure(dsn, text, relay="none", hard=False)
                                TemporaryError: this peer could not be talked to (connect, greeting, EHLO/LHLO,
                                STARTTLS, AUTH, a lost, timed-out or garbled dialogue). While opening a session
                                the next peer is tried; during a transaction the recipients still without an
                                answer are deferred and the site counts as failed. Always class 4; `relay` names
                                the peer once connected (Postfix logs relay=host[ip]:port then, "none" before).
                                `hard`: a 5xx refusal of EHLO, HELO, LHLO or STARTTLS (when TLS is required):
                                the mail bounces with it and no other peer is tried (`final`: Postfix's
                                smtp_bulk_fail bounces a hard error wherever it comes from; only a 5xx greeting
                                is skipped like a 4xx, smtp_skip_5xx_greeting)
    ConnectFailure(text, tcp)   SiteFailure 4.4.1: no connection was made ("connect to h[ip]:port: Connection
                                refused"). Postfix logs it at once on a line of its own, without a queue id
                                (smtp_connect_inet: `connect to h[ip]:port: reason`), for a TCP peer only (a
                                UNIX-domain socket's is said by the result line alone: smtp_connect_local);
                                `logged_alone` says whether that line is due
    BindFailure()               ConnectFailure 4.4.0 "server configuration error": the source address
                                (bind_address, with bind_address_enforce) could not be bound; logged alone as
                                Postfix's smtp_connect_inet logs it, after the bind warning (connect.open_session)
    LocalProblem(dsn, text)     TemporaryError: our side cannot go on (a table that cannot answer, an unusable TLS
                                policy, no TLS engine); another peer would not help, the site is not blamed.
    RetryPlaintext, StaleSession   control flow, not failures: connect again without TLS (level may); a cached
                                session died before MAIL FROM was answered (use a fresh one, count nothing)

    stream_failure(peer, activity, error) -> SiteFailure   "lost connection with h[ip] while sending RCPT TO",
                                "conversation with h[ip] timed out while ...", "host h[ip] sent a malformed reply
                                while ...: why" (4.4.2, 4.4.2, 4.5.0), as Postfix's smtp_stream_except words them
    refused_to_talk(peer, reply, greeting=False) -> SiteFailure   a refused greeting, EHLO, HELO or LHLO; a 5xx is
                                hard but for the greeting's (smtp_skip_5xx_greeting)
    is_hard(reply) -> bool      a refusal that bounces: 5xx, or a code that is neither 2xx, 4xx nor 5xx (a protocol
                                error, 5.5.0: Postfix's smtp_site_fail takes the reply's dsn class)

    Outcomes()                  results by recipient and the site verdict, filled as a delivery goes:
      .fail(recipients, error, relay)   BOUNCED for a permanent error, else DEFERRED, with its code and text
      .update(results) .pending(recipients) .site_failed(failure)
      await .update_in_slices(recipients, results)   `update` with results(part), SLICE recipients a loop turn
      .settle(results, request, conn), await .settle_in_slices(recipients, results, request, conn)
                                `update` with the peer's answers after DATA (SLICE recipients a loop turn, every
                                part done at once when a cancel comes between two), those the peer took (sent)
                                told to qmgr at once (`DeliveryRequest.settled`), stamped with `conn` as
                                `stamp` does: a stop that cuts the delivery off later (the next peer, an LMTP
                                peer's next reply, the report's slices) delivers none of them again (a refusal is
                                not told: under soft_bounce the next peer may take it)
      .stamp(recipients, conn)  their results carry `conn`, the ConnStats of the transaction that gave them
      await .fail_in_slices(...), .fail_pending_in_slices(...) (those `pending`), .stamp_in_slices(...)
                                the same, SLICE recipients a loop turn
      await .report(request, now) -> DeliveryReport   SLICE recipients a loop turn (a result no transaction
                                stamped: its set-up ended `now`, smtp_bulk_fail's)
                                The SMTP and LMTP agents fail, stamp and report a job's recipients by these
                                sliced forms on every path (a dead site's 50 000 recipients took 0.3 s to fail,
                                0.2 s to stamp, 0.4 s to report, each in one turn), and proto makes a job's
                                RCPT commands, takes its replies and makes one reply's results SLICE a turn
                                too, as transport.py logs the lines of a soft error
                                at a peer or site that is not the last and takes back their results; the
                                envelope's screening (commands.screen_envelope) and the choice of those that go
                                on (transport's _for_next_peer) still walk every recipient in one turn (50 000:
                                18 ms and 20 ms)
      await .take_back(recipients) -> Outcomes, .restore(taken)   a temporary failure at a peer that was not the
                                last: the recipients go to the next peer (taken back SLICE a loop turn); what
                                they got stands if none takes a session
    reply_results(recipients, reply, peer, command, next_hop_notifies=False) -> {recipient: RcptResult}
                                2xx SENT with the reply; 4xx DEFERRED, 5xx BOUNCED, with "host h[ip] said: 550
                                5.1.1 ... (in reply to RCPT TO command)"; the reply's enhanced code, else x.0.0.
                                Any other code (3xx to RCPT, 1xx, 6xx) is a protocol error: BOUNCED 5.5.0, as
                                Postfix's smtp_chat_resp and smtp_rcpt_fail make it
    unexpected_reply_results(recipients, reply, peer, command)   a 2xx to DATA: BOUNCED 5.5.0, "Protocol error:
                                host h[ip] said: 250 ... (in reply to DATA command)" (Postfix vsmtp_fill_dsn)
    await record_unreachable(outcomes, recipients, peer_failure, dns_failures)
                                no peer took a session: a peer failure or a DNS failure defers (site failed); DNS's
                                "no such host" for every host bounces, and so does a peer's 5xx refusal (a hard
                                SiteFailure, which ends the search; the site is not failed: it answered); the
                                last DNS failure's text, deferred 4.4.4 when a "no" came after a DNS failure
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from mailflow.errors import DeliveryError, PermanentError, TemporaryError
from mailflow.model import ConnStats, DeliveryReport, DeliveryRequest, Outcome, RcptResult, Recipient, replaced
from mailflow.slices import in_slices, in_slices_uncut
from mailflow.transports.smtp.addr import Peer
from mailflow.transports.smtp.reply import MalformedReply, Reply, ReplyFilterError

SLICE = 2000  # recipients whose results (`fail_in_slices`, `Outcomes._dated`) or RCPT commands (proto) a turn makes


class SiteFailure(TemporaryError):
    """See the module docstring."""

    def __init__(self, dsn: str, text: str, *, relay: str = "none", hard: bool = False):
        super().__init__("4" + dsn[1:], text)
        self.relay = relay  # the peer's host[ip]:port once a connection was made
        self.hard = hard  # a 5xx refusal: the mail bounces with it, no other peer is tried

    def at(self, relay: str) -> "SiteFailure":
        """The same failure, of a peer a connection was made to."""
        return SiteFailure(self.dsn, self.text, relay=relay, hard=self.hard)

    def final(self) -> DeliveryError:
        """What the recipients get: a 5xx refusal bounces with its own class, as Postfix's smtp_bulk_fail does
        (a hard error is not retried elsewhere); anything else defers."""
        return PermanentError("5" + self.dsn[1:], self.text) if self.hard else self


class ConnectFailure(SiteFailure):
    """See the module docstring."""

    def __init__(self, text: str, *, tcp: bool):
        super().__init__("4.4.1", text)
        self.logged_alone = tcp


class BindFailure(ConnectFailure):
    """See the module docstring."""

    def __init__(self) -> None:
        super().__init__("server configuration error", tcp=True)
        self.dsn = "4.4.0"


class LocalProblem(TemporaryError):
    """See the module docstring."""

    def __init__(self, dsn: str, text: str):
        super().__init__("4" + dsn[1:], text)


class RetryPlaintext(Exception):
    """At level may the TLS handshake failed: connect again to the same peer without TLS (Postfix does)."""


class StaleSession(Exception):
    """A cached session died before MAIL FROM was answered: nothing was delivered; use a fresh connection."""


def stream_failure(peer: Peer, activity: str, error: BaseException) -> SiteFailure:
    if isinstance(error, TimeoutError):
        return SiteFailure("4.4.2", f"conversation with {peer.name} timed out while {activity}", relay=peer.relay)
    if isinstance(error, ReplyFilterError):  # (Postfix's SMTP_ERR_DATA)
        return SiteFailure("4.3.0", f"local data error while talking to {peer.name}", relay=peer.relay)
    if isinstance(error, MalformedReply):
        return SiteFailure("4.5.0", f"host {peer.name} sent a malformed reply while {activity}: {error}",
                           relay=peer.relay)
    return SiteFailure("4.4.2", f"lost connection with {peer.name} while {activity}", relay=peer.relay)


def refused_to_talk(peer: Peer, reply: Reply, *, greeting: bool = False) -> SiteFailure:
    """A refused greeting, EHLO, HELO or LHLO. A 5xx one is hard, but for the greeting (Postfix's
    smtp_skip_5xx_greeting = yes: a server that greets with 5xx is skipped, as if it had said 4xx); a code SMTP
    does not know (1xx, 3xx, 6xx) is hard wherever it comes, the greeting too (5.5.0)."""
    hard = reply.protocol_error or (is_hard(reply) and not greeting)
    return SiteFailure(reply.dsn("4"), f"host {peer.name} refused to talk to me: {reply.one_line}",
                       relay=peer.relay, hard=hard)


def is_hard(reply: Reply) -> bool:
    return reply.code // 100 == 5 or reply.protocol_error


# ---------------------------------------------------------------------------------------------------- results


@dataclass
class Outcomes:
    """Results gathered while delivering, by recipient, plus the site verdict."""

    results: dict[Recipient, RcptResult] = field(default_factory=dict)
    site_ok: bool = True
    site_reason: str = ""
    site_status: str = ""

    def fail(self, recipients: Iterable[Recipient], error: DeliveryError, relay: str = "none") -> "Outcomes":
        outcome = Outcome.BOUNCED if error.permanent else Outcome.DEFERRED
        for r in recipients:
            self.results[r] = RcptResult(r, outcome, error.dsn, error.text, relay)
        return self

    async def fail_in_slices(self, recipients: Sequence[Recipient], error: DeliveryError,
                             relay: str = "none") -> "Outcomes":
        """`fail`, SLICE recipients a loop turn."""
        await in_slices(recipients, lambda part: self.fail(part, error, relay), SLICE)
        return self

    async def fail_pending_in_slices(self, recipients: Sequence[Recipient], error: DeliveryError,
                                     relay: str = "none") -> "Outcomes":
        """`fail` of those of `recipients` without a result yet (`pending`), SLICE recipients a loop turn."""
        await in_slices(recipients, lambda part: self.fail(self.pending(part), error, relay), SLICE)
        return self

    def update(self, results: dict[Recipient, RcptResult]) -> None:
        self.results.update(results)

    async def update_in_slices(self, recipients: Sequence[Recipient],
                               results: Callable[[Sequence[Recipient]], dict[Recipient, RcptResult]]) -> None:
        """`update` with `results(part)` of `recipients`, SLICE recipients a loop turn (one reply's results for
        all of a job's recipients: 50 000 accepted by one end of DATA took 0.57 s in one turn)."""
        if len(recipients) <= SLICE:  # (a refused MAIL or DATA of a few recipients: no slices to make)
            self.update(results(recipients))
        else:
            await in_slices(recipients, lambda part: self.update(results(part)), SLICE)

    def settle(self, results: dict[Recipient, RcptResult], request: DeliveryRequest, conn: ConnStats) -> None:
        """`update` with a peer's answers after DATA, stamped with `conn` (the transaction's), telling qmgr those it
        took at once (module docstring): a cut job's lines have the connection's part of `delays=` too."""
        stamped = {rcpt: replaced(result, conn=conn) for rcpt, result in results.items()}
        self.update(stamped)
        request.settled([result for result in stamped.values() if result.outcome is Outcome.SENT])

    async def settle_in_slices(self, recipients: Sequence[Recipient],
                               results: Callable[[Sequence[Recipient]], dict[Recipient, RcptResult]],
                               request: DeliveryRequest, conn: ConnStats) -> None:
        """`settle` with `results(part)` of `recipients`, SLICE recipients a loop turn, the parts left all done
        when a cancel comes between two (what the peer took is not left half told)."""
        await in_slices_uncut(recipients, lambda part: self.settle(results(part), request, conn), SLICE)

    def pending(self, recipients: Iterable[Recipient]) -> list[Recipient]:
        return [r for r in recipients if r not in self.results]

    def stamp(self, recipients: Iterable[Recipient], conn: ConnStats) -> None:
        for r in recipients:
            if r in self.results and self.results[r].conn is not conn:  # (`settle` stamped the answers after DATA)
                self.results[r] = replaced(self.results[r], conn=conn)

    async def stamp_in_slices(self, recipients: Sequence[Recipient], conn: ConnStats) -> None:
        """`stamp`, SLICE recipients a loop turn."""
        if len(recipients) <= SLICE:  # (the common case, a few recipients: no slices to make)
            self.stamp(recipients, conn)
        else:
            await in_slices(recipients, lambda part: self.stamp(part, conn), SLICE)

    def site_failed(self, failure: DeliveryError) -> "Outcomes":
        """The site failed (`failure`'s text and status code: what qmgr tells the recipients of a site it
        suspends, as Postfix's qmgr keeps the delivery agent's status and reason)."""
        self.site_ok, self.site_reason, self.site_status = False, failure.text, failure.dsn
        return self

    async def take_back(self, recipients: Sequence[Recipient]) -> "Outcomes":
        """Forget the results of `recipients` and the site verdict (their peer was not the last: the next one
        tries them), SLICE recipients a loop turn; returns what is forgotten, for `restore`."""
        taken = Outcomes({}, self.site_ok, self.site_reason, self.site_status)
        await in_slices(recipients, lambda part: taken.results.update({r: self.results.pop(r) for r in part}), SLICE)
        self.site_ok, self.site_reason, self.site_status = True, "", ""
        return taken

    def restore(self, taken: "Outcomes") -> None:
        """The results `take_back` forgot stand after all (no later peer took a session)."""
        self.results.update(taken.results)
        if not taken.site_ok:
            self.site_ok, self.site_reason, self.site_status = False, taken.site_reason, taken.site_status

    async def report(self, request: DeliveryRequest, now: Callable[[], float]) -> DeliveryReport:
        """The results, SLICE recipients a loop turn (the common report, of a few, takes none); those no transaction
        stamped (they failed before a session was ready for MAIL FROM: no connection, a greeting or EHLO that
        failed or never came, a lookup before the session) carry a set-up that ended now (`now()`, qmgr's clock),
        as Postfix's smtp_bulk_fail dates conn_setup_done at the failure when it is still unset: the log's
        `delays=` then count that time as connection set-up (c), not transmission (d). A cancel between the slices
        (a stop's, past its grace) loses the report, but not what the peer took: that was told as it came
        (`settle`)."""
        failed: list[ConnStats] = []  # (the set-up's end, made at the first result that needs it)
        if len(request.recipients) <= SLICE:  # (the common case, a few recipients: no slices to make)
            results = self._dated(request.recipients, failed, now)
        else:
            results = []
            await in_slices(request.recipients, lambda part: results.extend(self._dated(part, failed, now)), SLICE)
        return DeliveryReport(tuple(results), site_ok=self.site_ok, site_reason=self.site_reason,
                              site_status=self.site_status)

    def _dated(self, recipients: Sequence[Recipient], failed: list[ConnStats],
               now: Callable[[], float]) -> list[RcptResult]:
        """The results of `recipients`, one no transaction stamped carrying `failed`'s set-up end (`report`)."""
        results = []
        for r in recipients:
            result = self.results[r]
            if result.conn is None:
                if not failed:
                    failed.append(ConnStats(now()))
                result = replaced(result, conn=failed[0])
            results.append(result)
        return results


def reply_outcome(code: int) -> Outcome:
    if 200 <= code < 300:
        return Outcome.SENT
    if 400 <= code < 500:
        return Outcome.DEFERRED
    return Outcome.BOUNCED  # 5xx, and any other code where 2xx was due: a protocol error (5.5.0), as Postfix


def reply_results(
    recipients: Iterable[Recipient], reply: Reply, peer: Peer, command: str, *, next_hop_notifies: bool = False
) -> dict[Recipient, RcptResult]:
    """The same reply for each of `recipients`. `next_hop_notifies`: the peer offered DSN and got the DSN
    parameters (marks the SENT results)."""
    outcome = reply_outcome(reply.code)
    if outcome is Outcome.SENT:
        text = reply.one_line
    else:
        text = f"host {peer.name} said: {reply.one_line} (in reply to {command} command)"
    notifies = next_hop_notifies and outcome is Outcome.SENT
    dsn = reply.dsn()
    return {r: RcptResult(r, outcome, dsn, text, peer.relay, next_hop_notifies=notifies) for r in recipients}


def unexpected_reply_results(recipients: Iterable[Recipient], reply: Reply, peer: Peer,
                             command: str) -> dict[Recipient, RcptResult]:
    """A positive reply where another was due (2xx to DATA): Postfix's "Protocol error: host h[ip] said: 250 ...
    (in reply to DATA command)", bounced 5.5.0."""
    text = f"Protocol error: host {peer.name} said: {reply.one_line} (in reply to {command} command)"
    return {r: RcptResult(r, Outcome.BOUNCED, "5.5.0", text, peer.relay) for r in recipients}


async def record_unreachable(
    outcomes: Outcomes,
    recipients: list[Recipient],
    peer_failure: DeliveryError | None,
    dns_failures: list[DeliveryError],
    hard: Callable[[DeliveryError], DeliveryError] = lambda error: error,
) -> None:
    """No peer took a session. A peer we could not talk to or a DNS failure defers; DNS 'no' bounces, and so
    does a 5xx refusal (the recipients name the peer as their relay, as for any failure after a
    connection was made). Of the DNS failures the last one's text stands, deferred (4.4.4 for a "no") once one
    was temporary: Postfix's smtp_addr_one, where a soft error dominates past and future hard ones. `hard`
    may turn the DNS failures' bounce into something else (the relayhost's 4.3.5), deferred then."""
    if isinstance(peer_failure, SiteFailure):
        final = peer_failure.final()
        await outcomes.fail_in_slices(recipients, final, peer_failure.relay)
        if not final.permanent:
            outcomes.site_failed(final)
        return
    if peer_failure is not None:
        failure = peer_failure
    elif dns_failures:
        failure = dns_failures[-1]
        if failure.permanent and all(f.permanent for f in dns_failures):
            failure = hard(failure)
            await outcomes.fail_in_slices(recipients, failure)
            if not failure.permanent:
                outcomes.site_failed(failure)
            return
        if failure.permanent:
            failure = TemporaryError("4" + failure.dsn[1:], failure.text)
    else:
        failure = TemporaryError("4.4.3", "no SMTP server to try")
    await outcomes.fail_in_slices(recipients, failure)
    outcomes.site_failed(failure)
