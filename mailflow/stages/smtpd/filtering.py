"""smtpd's inbound filters: the policy steps the handler awaits when filters are configured (docs/filtering.md).

    FilterServices(config, resolver, clock, rng=None)
                                                what all listeners share, each built only when configured:
                                                the greylist, sender authentication (`rng`: the server's
                                                random.Random, which seeds the generator of its own that draws
                                                DMARC's pct= samples, so that other draws of the server, at times
                                                a run does not fix, do not change them), spamd, clamd, milter
                                                settings (each listener's with its own message_size_limit)
        .for_listener(config) -> ListenerFilters | None     None: no filter applies to that listener
        .close()
    ListenerFilters: one listener's steps
        has_milters                           whether this listener has any (else nothing is asked at connect)
        await connect(session) -> Verdict     the milters' connect event, at the greeting (as Postfix's
                                              smtpd_proto: before the 220, after the admission and the client list
                                              of delay_reject false; again after XCLIENT); CONTINUE without milters
        await helo(session, name) -> Verdict  milters told of HELO (a refusal answers the next MAIL)
        standing_refusal(session) -> Reply | None    the refusal that holds for the session (before VRFY, ETRN,
                                              STARTTLS and AUTH: Postfix's milter_other_event)
        await mail(session, envelope, sender, options, written=None) / rcpt(session, envelope, address,
            written=None) -> Reply | None     `written`: the address as the command gave it, when smtpd took it
            otherwise (a stamped probe sender of this server's: the milters' argument, the address their macro)
        await auth_verdicts(session, envelope) -> Verdicts | None     (before the end_of_data restrictions)
        await end_of_message(session, submission, verdicts, marks) -> Outcome   milters, clamd, spamd, in order
        await client_changed(session)           XCLIENT named another client: its milter connections are closed
                                                (QUIT); the new greeting connects again naming the new client
        closed(session)                         the SMTP session ended: its milter connections are closed

A milter's DISCARD or quarantine (HOLD) is logged where it is met, in Postfix's words: at MAIL or RCPT as its
smtpd logs it (`NOQUEUE: milter-discard: RCPT from host[ip]: milter triggers DISCARD action; from=<s> to=<r>
proto=ESMTP helo=<h>`, the queue id once the transaction has one), at the end of the message as its cleanup logs
it (`QID: milter-hold: END-OF-MESSAGE from host[ip]: milter triggers HOLD action; from=<s> to=<the last
recipient> proto=ESMTP helo=<h>`, service cleanup); once per message (a message held already is not held again:
Postfix 3.10's rule, docs/filtering.md). After a DISCARD no milter is asked anything more about the message.

With no filter configured the handler holds None and asks nothing: the hot path is unchanged.

Failure behaviour: a milter follows milter_default_action (client.py); a scanner that cannot scan follows its
section's on_failure (accept: logged, the message goes on unscanned; tempfail: 451 4.7.1). Nothing here raises
for a client's message.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from dataclasses import dataclass

from mailflow import status
from mailflow.config import Config
from mailflow.filters.greylist import Greylist
from mailflow.filters.milter import CONTINUE, ClientMacros, MilterSession, MilterSettings, Verdict, end_of_message
from mailflow.filters.scanners import Clamd, ScanResult, Spamd
from mailflow.filters.senderauth import SenderAuth, Verdicts
from mailflow.logs import SmtpdLog
from mailflow.model import Submission
from mailflow.restriction_vocabulary import STAGES, split_item

log = logging.getLogger("mailflow.smtpd")
cleanup_log = logging.getLogger("mailflow.cleanup")  # a milter's verdict on the message: Postfix's cleanup says it

# a milter verdict that marks the message -> (Postfix's log action, its text)
MILTER_TRIGGERS = {"discard": ("milter-discard", "milter triggers DISCARD action"),
                   "quarantine": ("milter-hold", "milter triggers HOLD action")}

SPAM_STATUS_WIDTH = 76  # X-Spam-Status lines are folded before this column (as SpamAssassin folds them)


@dataclass
class Outcome:
    """What the end-of-message filters decided: a refusal, or the submission to queue (edited, tagged) and
    whether it is discarded or held (the logged reason)."""

    refusal: status.Reply | None = None
    logged: bool = False  # the refusal was logged here (a milter's, as Postfix's cleanup logs it)
    submission: Submission | None = None
    discard: str | None = None
    hold: str | None = None


def _uses(config: Config, name: str) -> bool:
    listeners = [config.smtpd] + [config.smtpd.for_listener(li) for li in config.smtpd.listeners]
    return any(split_item(item)[0] == name for smtpd in listeners
               for items in (*(getattr(smtpd, f"{stage}_restrictions") for stage in STAGES),
                             *smtpd.restriction_classes.values())
               for item in items)


class FilterServices:
    """See the module doc."""

    def __init__(self, config: Config, resolver, clock, rng: random.Random | None = None):
        self._config = config
        self.greylist: Greylist | None = None
        if _uses(config, "check_greylist"):
            path = config.greylist.database_file or str(config.queue_path / "greylist.db")
            self.greylist = Greylist(config.greylist, path, clock)
        self.sender_auth: SenderAuth | None = None
        self.dmarc_policy = _uses(config, "reject_dmarc_policy")  # the verdicts are needed without the header
        if config.sender_auth.verify or _uses(config, "reject_spf_fail") or self.dmarc_policy:
            self.sender_auth = SenderAuth(config.sender_auth, resolver, authserv_id=config.myhostname,
                                          also=("dmarc",) if self.dmarc_policy else (),
                                          rng=random.Random(rng.getrandbits(64)) if rng is not None else None,
                                          header_limit=config.header_size_limit)
        self.spamd = Spamd(config.spamd) if config.spamd.address else None
        self.clamd = Clamd(config.clamd) if config.clamd.address else None
        self.milter = MilterSettings.from_config(config)  # (the size limit is each listener's)

    def for_listener(self, config: Config) -> ListenerFilters | None:
        milters = () if "no_milters" in config.smtpd.receive_override_options else config.smtpd.milters
        own_filter = config.smtpd.content_filter != self._config.smtpd.content_filter  # (else cleanup's default)
        if not (milters or self.spamd or self.clamd or self.sender_auth or own_filter
                or config.smtpd.receive_override_options):
            return None
        return ListenerFilters(self, config, milters)

    def close(self) -> None:
        if self.greylist is not None:
            self.greylist.close()
        if self.sender_auth is not None:
            self.sender_auth.close()


class ListenerFilters:
    """One listener's filter steps; see the module doc."""

    def __init__(self, services: FilterServices, config: Config, milters: tuple[str, ...]):
        self._services = services
        self._config = config
        self._milters = milters
        # a milter's edits stop at this listener's message_size_limit (an override too), as its queue file would
        self._milter_settings = dataclasses.replace(services.milter, size_limit=config.smtpd.message_size_limit)
        self._header = bool(config.sender_auth.verify)  # (else the verdicts serve reject_dmarc_policy only)
        self._verify = services.sender_auth is not None and (self._header or services.dmarc_policy)
        self._overrides = frozenset(config.smtpd.receive_override_options)
        self._content_filter = config.smtpd.content_filter
        self._lines = SmtpdLog()
        self._cleanup_lines = SmtpdLog(cleanup_log, service="cleanup")

    # -------------------------------------------------------------------------------- milters by stage

    @property
    def has_milters(self) -> bool:
        return bool(self._milters)

    def _milter_session(self, session) -> MilterSession | None:
        if not self._milters:
            return None
        if session.milters is None:
            client = ClientMacros(myhostname=self._config.myhostname, daemon_name=self._config.myhostname,
                                  daemon_addr=session.server_ip, daemon_port=str(session.server_port or ""),
                                  client_addr=session.peer_ip if session.peer_ip != "unknown" else "",
                                  client_name=session.client_name,
                                  client_port="0" if session.port_text == "unknown" else session.port_text)
            session.milters = MilterSession(self._milters, self._milter_settings, client)
        return session.milters

    async def connect(self, session) -> Verdict:
        """The milters' connect event (their connections opened): what answers for them for the session, a refusal
        (reject, tempfail: every MAIL gets it; smtpd puts 554 or 421 in the greeting's place, handler.py), a
        quarantine (a default action) or CONTINUE. A milter slow to answer holds this session only, bounded by
        milter connect_timeout and command_timeout (client.py)."""
        milters = self._milter_session(session)
        if milters is None:
            return CONTINUE
        return await milters.connect()

    @staticmethod
    def standing_refusal(session) -> status.Reply | None:
        return session.milters.standing_refusal() if session.milters is not None else None

    async def helo(self, session, name: str) -> Verdict:
        """Milters are told of HELO: what answers for them (client.py): a refusal at connect or HELO answers every
        later MAIL of the session (HELO's reply is smtpd's: handler.py)."""
        milters = self._milter_session(session)
        if milters is None:
            return CONTINUE
        tls = {}
        cipher = session.ssl.get("cipher") if isinstance(session.ssl, dict) else None
        if cipher:
            tls = {"{cipher}": str(cipher[0]), "{tls_version}": str(cipher[1]), "{cipher_bits}": str(cipher[2])}
        cert = session.client_cert
        if cert is not None and cert.trusted:  # (Postfix's smtpd_milter.c: the names of a trusted certificate)
            tls.update({"{cert_subject}": cert.subject_cn, "{cert_issuer}": cert.issuer_cn})
        return await milters.helo(name, tls)

    async def mail(self, session, envelope, sender: str, options: list[str],
                   written: str | None = None) -> status.Reply | None:
        milters = self._milter_session(session)
        if milters is None or envelope.marks.discard is not None:  # (a policy hook's DISCARD at MAIL came first)
            return None
        verdict = await milters.mail(sender, options, (session.auth_mechanism, session.login), written)
        self._mark(session, envelope, verdict, "MAIL", sender)
        return _refusal(verdict)

    async def rcpt(self, session, envelope, address: str, written: str | None = None) -> status.Reply | None:
        milters = self._milter_session(session)
        if milters is None or envelope.marks.discard is not None:  # (Postfix: no milter event after a DISCARD)
            return None
        verdict = await milters.rcpt(address, envelope.queue_id, written)
        self._mark(session, envelope, verdict, "RCPT", envelope.sender, address)
        return _refusal(verdict)

    def _mark(self, session, envelope, verdict: Verdict, stage: str, sender: str, recipient: str = "") -> None:
        """A milter's DISCARD or quarantine at MAIL or RCPT: the message is marked, and it is logged there as
        Postfix's smtpd logs it, once."""
        marks = envelope.marks
        if verdict.action == "discard" and marks.discard is None:
            marks.discard = verdict.reason or "milter discard"
        elif verdict.action == "quarantine" and marks.hold is None:
            marks.hold = verdict.reason or "milter quarantine"
            marks.hold_logged = True
        else:
            return
        action, text = MILTER_TRIGGERS[verdict.action]
        self._lines.reject(stage, session.client, text, sender=sender, recipient=recipient,
                           protocol=session.protocol, helo=session.host_name or "", action=action,
                           queue_id=envelope.queue_id)

    def _cleanup_line(self, session, submission: Submission, verdict: str, marks) -> None:
        """Postfix's cleanup_milter_apply line for a milter's DISCARD or HOLD at the end of the message: the
        sender, the last recipient (cleanup's last recipient record), the protocol and HELO name."""
        marks.hold_logged = marks.hold_logged or verdict == "quarantine"
        action, text = MILTER_TRIGGERS[verdict]
        self._end_of_message_line(session, submission, action, text)

    def _cleanup_reject(self, session, submission: Submission, reply: status.Reply) -> None:
        """Postfix's cleanup_milter_apply line for a milters' refusal of the message (theirs, or their default
        action's): `QID: milter-reject: END-OF-MESSAGE from host[ip]: 5.7.1 Command rejected; from=<s> to=<the last
        recipient> proto=ESMTP helo=<h>`, the reply without its code, as the milter gave it (soft_bounce: client.py)."""
        self._end_of_message_line(session, submission, "milter-reject", str(reply)[4:])

    def _end_of_message_line(self, session, submission: Submission, action: str, text: str) -> None:
        envelope = submission.envelope
        self._cleanup_lines.reject("END-OF-MESSAGE", session.client, text, sender=envelope.sender,
                                   recipient=envelope.recipients[-1] if envelope.recipients else "",
                                   protocol=session.protocol, helo=session.host_name or "", action=action,
                                   queue_id=submission.queue_id)

    async def client_changed(self, session) -> None:
        """XCLIENT named another client (and server): as Postfix's xclient_cmd (milter_disc_event, teardown_milters,
        setup_milters), the milters are told the session ended and the new greeting connects again, its connect
        packet and macros ({client_addr}, {daemon_addr}, ...) naming the new client."""
        if session.milters is not None:
            milters, session.milters = session.milters, None
            await milters.close()

    def closed(self, session) -> None:
        if session.milters is not None:
            milters, session.milters = session.milters, None
            asyncio.get_running_loop().create_task(milters.close())

    # -------------------------------------------------------------------------------- the message

    async def auth_verdicts(self, session, envelope) -> Verdicts | None:
        """SPF, DKIM and DMARC of the message (for reject_dmarc_policy and the Authentication-Results header)."""
        sender_auth = self._services.sender_auth
        if not self._verify or sender_auth is None or envelope.content is None:
            return None
        return await sender_auth.verdicts(session.peer_ip, session.host_name or "", envelope.sender or "",
                                          envelope.content)

    async def end_of_message(self, session, submission: Submission, verdicts: Verdicts | None, marks) -> Outcome:
        """`marks`: the transaction's (restrictions.Marks): its FILTER, whether it is held already, and what was
        logged of it (a milter's DISCARD or HOLD here is, as Postfix's cleanup logs it)."""
        outcome = Outcome()
        headers = [verdicts.header()] if verdicts is not None and self._header else []
        milters = self._milter_session(session)
        if milters is not None:
            filtered = await end_of_message(milters, submission)
            if filtered.action == "discard":
                outcome.discard = filtered.reason
                self._cleanup_line(session, submission, "discard", marks)
                return outcome
            if filtered.action != "continue":
                outcome.refusal = filtered.reply
                # by identity, not value: the size check's own reply (the milters' edits too big: its warning is
                # logged there) is not logged as theirs, but a milter's replycode of the same text is (Postfix logs
                # it milter-reject)
                if filtered.reply is not None and filtered.reply is not status.MESSAGE_TOO_BIG:
                    self._cleanup_reject(session, submission, filtered.reply)
                    outcome.logged = True
                return outcome
            submission, outcome.hold = filtered.submission, filtered.hold
            if filtered.hold is not None and marks.hold is None:
                self._cleanup_line(session, submission, "quarantine", marks)
        for scan in (self._clamd, self._spamd):
            await scan(submission, outcome, headers)
            if outcome.refusal is not None:
                return outcome
        content_filter = marks.filter if marks.filter is not None else self._content_filter
        outcome.submission = dataclasses.replace(submission, headers=submission.headers + tuple(headers),
                                                 content_filter=content_filter, overrides=self._overrides)
        return outcome

    async def _scan(self, scanner, on_failure: str, submission: Submission, outcome: Outcome):
        """The scanner's result; None when it is off, did not scan, or failed (logged under the message's queue
        id; with on_failure "tempfail" the message is then refused for now: 451 4.7.1)."""
        if scanner is None:
            return None
        result = await scanner.check(submission.content)
        if result.failed:
            log.warning("%s: %s (on_failure %s)", submission.queue_id, result.failed, on_failure)
            if on_failure == "tempfail":
                outcome.refusal = status.FILTER_UNAVAILABLE
            return None
        return result if result.scanned else None

    async def _clamd(self, submission: Submission, outcome: Outcome, headers: list[str]) -> None:
        c = self._config.clamd
        result = await self._scan(self._services.clamd, c.on_failure, submission, outcome)
        if result is None or not result.found:
            return
        if c.action == "reject":
            outcome.refusal = status.virus_found(result.name)
        elif c.action == "hold":
            outcome.hold = f"virus found: {result.name}"
        headers.append(f"X-Virus-Status: Infected ({result.name})")

    async def _spamd(self, submission: Submission, outcome: Outcome, headers: list[str]) -> None:
        c = self._config.spamd
        result = await self._scan(self._services.spamd, c.on_failure, submission, outcome)
        if result is None:
            return
        headers.append(_spam_status(result))
        if not result.found:
            return
        headers.append("X-Spam-Flag: YES")
        if c.action == "reject" or (c.reject_score and result.score >= c.reject_score):
            outcome.refusal = status.SPAM_REJECTED
        elif c.action == "hold":
            outcome.hold = f"spam, score {result.score:.1f}"


def _spam_status(result: ScanResult) -> str:
    """SpamAssassin's X-Spam-Status: the verdict, the score, the threshold and the rules that hit, folded."""
    lines = [f"X-Spam-Status: {'Yes' if result.found else 'No'}, score={result.score:.1f} "
             f"required={result.threshold:.1f}"]
    if result.name:
        lines[-1] += " tests="
        for rule in result.name.split(","):
            if len(lines[-1]) + len(rule) > SPAM_STATUS_WIDTH and not lines[-1].endswith("="):
                lines.append("")
            lines[-1] += rule + ","
        lines[-1] = lines[-1][:-1]
    return "\r\n\t".join(lines)


def _refusal(verdict: Verdict) -> status.Reply | None:
    return verdict.reply if verdict.action in ("reject", "tempfail") else None
