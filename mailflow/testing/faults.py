"""Inbound faults of the Sink: what the server answers the application under test, through production
mechanisms only.

    InboundFaults        smtpd's in-process policy hook (stages.smtpd.handler.SmtpdPolicy): the rules below
                         become access(5) actions, answered like any restriction's refusal
        reject(...) / defer(...) -> Rule     a refusal at MAIL, RCPT or the end of DATA, `times` times or always
        slow(seconds)                        each MAIL, RCPT and end-of-DATA reply comes that much later
        drop(times)                          the next `times` sessions are hung up right after the 354 to DATA
                                             (a message sent with BDAT gets no 354: neither dropped nor counted)
        clear()
    SinkObserver         the Sink's session observer: the capture's transcripts, and the hang-up of `drop`
                         (a server ending a session, as at shutdown: transcript.Transcript.hang_up) once the
                         354 is written
    Rule                 one reject/defer rule: stage, code, text, sender and rcpt patterns, times, `used`

Patterns are addresses compared without case, or globs of `*` and `?` (`*@example.com`; `[` is itself, as in an
address literal). At "data" a rcpt pattern matches
when any recipient of the message does.

Failure behaviour: a bad rule (a 4xx code for reject, a recipient pattern at MAIL, an unknown stage) raises
ValueError when it is made.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from mailflow.capture.mailbox import address_matches, refuse_written_address
from mailflow.capture.recorders import TranscriptBook
from mailflow.stages.smtpd.restrictions import Facts
from mailflow.stages.smtpd.transcript import Transcript
from mailflow.syntax import split_leading_dsn

STAGES = ("mail", "rcpt", "data")


def _matches(pattern: str | None, address: str) -> bool:
    """No pattern matches everything; else as the capture's criteria match (the address, or a `*`/`?` glob)."""
    return pattern is None or address_matches(pattern, address)


@dataclass
class Rule:
    """See the module docstring. `times` None: every time."""

    stage: str
    code: int
    text: str
    sender: str | None = None
    rcpt: str | None = None
    times: int | None = None
    used: int = 0

    @property
    def spent(self) -> bool:
        return self.times is not None and self.used >= self.times

    def applies(self, stage: str, facts: Facts, recipients: tuple[str, ...]) -> bool:
        if self.spent or stage != self.stage or not _matches(self.sender, facts.sender or ""):
            return False
        if self.rcpt is None:
            return True
        candidates = (facts.recipient,) if stage == "rcpt" else recipients
        return any(_matches(self.rcpt, r) for r in candidates)

    def action(self) -> str:
        """`NNN X.Y.Z text`, an access(5) action (the enhanced code made from the reply code when not given)."""
        text = self.text if split_leading_dsn(self.text)[0] else f"{str(self.code)[0]}.7.1 {self.text}"
        return f"{self.code} {text}".strip()


class InboundFaults:
    """See the module docstring."""

    def __init__(self):
        self.rules: list[Rule] = []
        self.delay = 0.0
        self.drops = 0

    def reject(self, *, rcpt: str | None = None, sender: str | None = None, code: int = 550,
               text: str = "5.7.1 Rejected by the test", at: str = "rcpt", times: int | None = None) -> Rule:
        if not 500 <= code <= 599:
            raise ValueError(f"reject takes a 5xx code, not {code} (defer is for 4xx)")
        return self._add(Rule(at, code, text, sender, rcpt, times))

    def defer(self, *, rcpt: str | None = None, sender: str | None = None, code: int = 451,
              text: str = "4.7.1 Try again later", at: str = "rcpt", times: int | None = None) -> Rule:
        if not 400 <= code <= 499:
            raise ValueError(f"defer takes a 4xx code, not {code} (reject is for 5xx)")
        return self._add(Rule(at, code, text, sender, rcpt, times))

    def _add(self, rule: Rule) -> Rule:
        if rule.stage not in STAGES:
            raise ValueError(f"at={rule.stage!r}: one of {', '.join(STAGES)}")
        if rule.stage == "mail" and rule.rcpt is not None:
            raise ValueError("at='mail' knows no recipient yet: give rcpt= at 'rcpt' or 'data'")
        if rule.times is not None and rule.times < 1:
            raise ValueError("times must be at least 1 (None: every time)")
        refuse_written_address("rcpt", rule.rcpt)
        refuse_written_address("sender", rule.sender)
        self.rules.append(rule)
        return rule

    def slow(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a delay cannot be negative")
        self.delay = seconds

    def drop(self, times: int = 1) -> None:
        self.drops += times

    def clear(self) -> None:
        self.rules.clear()
        self.delay = 0.0
        self.drops = 0

    async def check(self, stage: str, facts: Facts, recipients: tuple[str, ...]) -> str | None:
        """smtpd's policy hook: the first live rule of this stage that matches, as an access(5) action."""
        if self.delay:
            await asyncio.sleep(self.delay)
        for rule in self.rules:
            if rule.applies(stage, facts, recipients):
                rule.used += 1
                return rule.action()
        return None

    def take_drop(self) -> bool:
        if self.drops <= 0:
            return False
        self.drops -= 1
        return True


class SinkObserver(TranscriptBook):
    """See the module docstring."""

    def __init__(self, faults: InboundFaults, **limits):
        super().__init__(**limits)
        self._faults = faults

    def replied(self, transcript: Transcript, line: str) -> None:
        if line.startswith("354") and self._faults.take_drop():
            # Observers hear of a reply just before it is written: hanging up now would lose the 354 itself.
            asyncio.get_running_loop().call_soon(transcript.hang_up)
