"""Differential test of the outbound side: a private Postfix and mailflow, configured alike, each relay one message
per scenario to the same scripted peer on 127.0.0.1 (a peer that refuses, hangs up or answers oddly), and must end
each recipient the same way: the status and enhanced code they log (`to=<r>, relay=…, dsn=…, status=… (text)`,
the text word for word), and the RFC 3464 fields of the notice the sender gets (Action, Status, Remote-MTA,
Diagnostic-Code, Original-Recipient).

Each scenario is a domain of its own (`transport_maps`: `<scenario>.test` -> `smtp:[127.0.0.1]:<its peer>`, or the
lmtp transport of each to an LMTP peer); the sender's domain goes to a capturing peer, one per server, which
receives the notices. Compared alike since: refusals at every stage, with and without enhanced codes, multi-line
and mixed-code replies, 421s, lost connections, 452 for some recipients, 3xx/2xx where they are protocol errors,
garbage lines before a reply and codes outside 2xx-5xx (1xx, 3xx, 6xx) in the handshake and the transaction,
STARTTLS refused or broken, a TLS handshake that stalls (smtp_starttls_timeout), a peer without DSN given
NOTIFY=SUCCESS, LMTP's per-recipient replies; with maximal_queue_lifetime = 0, the notice of a recipient
returned for its age; reply lines past 2048 bytes, and ones that never end. For a TLS handshake that fails, the
client's own lines too (`SSL_connect error to …`, `warning: TLS library problem: …`, and `QID: Cannot start TLS:
handshake failure` before a plaintext retry).
"""
from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import re
from dataclasses import dataclass, field
from typing import Callable

import aiosmtplib
import pytest

from tests.support import as_prompt_as, eventually, postfix_instance
from tests.support.maillog import library_reason

pytestmark = pytest.mark.interop

CLOSE = b""  # a script's answer that hangs up instead of replying
THEN_CLOSE = b"<then close>"  # at the end of an answer: hang up after sending it
THEN_STALL = b"<then stall>"  # at the end of an answer: answer nothing more (a TLS handshake neither) until the
# client leaves; alone: no answer at all
THEN_NOT_TLS = b"<then not tls>"  # at the end of an answer: answer the client's next bytes (its TLS ClientHello)
# with a line of plaintext, then hang up
EHLO = b"250-peer.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 10240000\r\n250 ENHANCEDSTATUSCODES\r\n"
SENDER = "alice@sender.test"
END_OF_DATA = b"<end of data>"  # in a ScriptedPeer's sessions: the client ended the content
Answer = bytes | Callable[[str], bytes]


@dataclass
class ScriptedPeer:
    """An SMTP peer that answers each command as its script says (the default: accept everything). A script maps
    "greeting", "EHLO", "HELO", "MAIL", "RCPT" (bytes, or a function of the recipient address), "DATA" and "DOT"
    (the reply after the content) and "QUIT" to the reply to send; CLOSE hangs up instead, THEN_CLOSE after it;
    THEN_STALL stalls after it; THEN_NOT_TLS answers the client's next bytes with plaintext after it, then hangs up.
    `sessions` holds the lines each session heard, the end of the content as END_OF_DATA."""

    script: dict[str, Answer]
    port: int = 0
    server: asyncio.AbstractServer | None = None
    sessions: list[list[bytes]] = field(default_factory=list)

    async def start(self, host: str = "127.0.0.1") -> "ScriptedPeer":
        self.server = await asyncio.start_server(self._session, host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    def _answer(self, what: str, default: bytes, argument: str = "") -> bytes:
        answer = self.script.get(what, default)
        return answer(argument) if callable(answer) else answer

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard: list[bytes] = []
        self.sessions.append(heard)

        async def say(reply: bytes) -> bool:
            writer.write(reply.removesuffix(THEN_CLOSE).removesuffix(THEN_STALL).removesuffix(THEN_NOT_TLS))
            await writer.drain()
            if reply.endswith(THEN_NOT_TLS):
                await reader.read(4096)
                writer.write(b"this is not TLS\r\n")
                await writer.drain()
                return False
            if reply.endswith(THEN_STALL):
                while await reader.read(4096):  # (the client's handshake, say, unanswered)
                    pass
                return False
            return reply != CLOSE and not reply.endswith(THEN_CLOSE)

        try:
            if not await say(self._answer("greeting", b"220 peer.test ESMTP\r\n")):
                return
            while line := await reader.readline():
                heard.append(line)
                verb = line.split()[0].upper().decode("ascii", "replace") if line.split() else ""
                if verb == "QUIT":
                    await say(self._answer("QUIT", b"221 2.0.0 Bye\r\n"))
                    return
                if verb == "DATA":
                    reply = self._answer("DATA", b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    if not await say(reply):
                        return
                    if reply.startswith(b"354"):
                        while (content := await reader.readline()) not in (b".\r\n", b""):
                            pass
                        if content:
                            heard.append(END_OF_DATA)
                        if not await say(self._answer("DOT", b"250 2.0.0 Ok: queued as X1\r\n")):
                            return
                    continue
                address = line.decode("utf-8", "replace").partition("<")[2].partition(">")[0]
                defaults = {"EHLO": EHLO, "LHLO": EHLO, "HELO": b"250 peer.test\r\n", "MAIL": b"250 2.1.0 Ok\r\n",
                            "RCPT": b"250 2.1.5 Ok\r\n", "RSET": b"250 2.0.0 Ok\r\n"}
                if not await say(self._answer(verb, defaults.get(verb, b"502 5.5.2 Error\r\n"), address)):
                    return
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


@dataclass
class Scenario:
    script: dict[str, Answer]
    recipients: tuple[str, ...] = ("a",)
    tls: str = ""  # the TLS level for this peer (else none)
    lmtp: bool = False  # the peer is an LMTP server: Postfix's lmtp(8) and mailflow's lmtp transport
    notify: str = ""  # the RCPTs' NOTIFY parameter
    mail_options: tuple[str, ...] = ()  # MAIL FROM's parameters (BODY=8BITMIME, SMTPUTF8)
    body: str = "hello\r\n"


# ------------------------------------------------------------------------------------------------ the run


LOG_LINE = re.compile(r"to=<([^>]*)>, (?:orig_to=<[^>]*>, )?relay=([^,]*), .*?dsn=([0-9.]+), status=(\w+) \((.*?)\)?$")
# (Postfix's log cuts a line at 2048 characters, closing parenthesis and all)


def outcomes(log: str) -> dict[str, tuple[str, str, str, str]]:
    """(relay, dsn, status, text) by recipient, from mail log lines in Postfix's format (the last line wins)."""
    out = {}
    for line in log.splitlines():
        m = LOG_LINE.search(line)
        if m and not m.group(1).endswith("@sender.test"):
            out[m.group(1)] = m.group(2, 3, 4, 5)
    return out


DELAYS = re.compile(r", delays=[\d.]+/[\d.]+/([\d.]+)/([\d.]+), ")


def conversation_times(log: str) -> dict[str, float]:
    """Seconds of the conversation (delays= c + d: connection setup, greeting, EHLO, TLS; then transmission) of each
    recipient's last attempt, from mail log lines in Postfix's format."""
    out = {}
    for line in log.splitlines():
        m, delays = LOG_LINE.search(line), DELAYS.search(line)
        if m and delays and not m.group(1).endswith("@sender.test"):
            out[m.group(1)] = float(delays[1]) + float(delays[2])
    return out


def as_prompt_as_postfix(pf_log: str, mf_log: str, timer: float) -> None:
    """Each recipient's conversation, which ends at the client's own timer (`timer` s), took mailflow no longer than
    Postfix's in the same run allows (tests.support.waiting.as_prompt_as; a timer 3x too long fails)."""
    pf_times, mf_times = conversation_times(pf_log), conversation_times(mf_log)
    assert set(mf_times) == set(pf_times), (mf_times, pf_times)
    for rcpt, pf_time in pf_times.items():
        assert pf_time >= timer * 0.9, (rcpt, pf_time)  # (Postfix's delays are rounded)
        as_prompt_as(mf_times[rcpt], pf_time, f"the conversation for {rcpt}")


DSN_FIELDS = ("Action", "Status", "Remote-MTA", "Diagnostic-Code", "Original-Recipient")


def report_groups(part) -> list:
    """The per-recipient field groups of a message/delivery-status part, or of a message/global-delivery-status
    one (RFC 6533, for SMTPUTF8 mail: the stdlib does not take it apart)."""
    if part.get_content_type() == "message/delivery-status":
        return part.get_payload()[1:]
    # (parsed as one message: the per-message fields its header, the per-recipient groups its body)
    text = part.get_payload()[0].get_payload(decode=True).decode("utf-8")
    return [email.message_from_string(block, policy=email.policy.default)
            for block in re.split(r"\r?\n\r?\n", text.strip())]


def notice_fields(messages) -> dict[str, dict[str, str]]:
    """The per-recipient RFC 3464 fields of the notices received, by Final-Recipient address (its type, rfc822 or
    utf-8, set aside); white space removed from the values (line folding is each server's own)."""
    out = {}
    for captured in messages:
        notice = email.message_from_bytes(captured.content, policy=email.policy.default)
        for part in notice.walk():
            if part.get_content_type() not in ("message/delivery-status", "message/global-delivery-status"):
                continue
            for group in report_groups(part):
                final = "".join(str(group["Final-Recipient"]).split()).partition(";")[2]
                out[final] = {name: "".join(str(group[name]).split()) if group[name] else None
                              for name in DSN_FIELDS}
    return out


class MailLogLines(logging.Handler):
    """mailflow.mail's lines (INFO and up) from start() to stop(), which puts the logger's level back."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self._logger = logging.getLogger("mailflow.mail")
        self._level = self._logger.level

    def start(self) -> "MailLogLines":
        self._level = self._logger.level
        self._logger.addHandler(self)
        self._logger.setLevel(logging.INFO)
        return self

    def stop(self) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def relay_one_each(port: int, scenarios: dict[str, Scenario]) -> None:
    for name, scenario in scenarios.items():
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10) as client:
            await client.ehlo()
            encoding = "utf-8" if "SMTPUTF8" in scenario.mail_options else "ascii"
            await client.mail(SENDER, options=list(scenario.mail_options), encoding=encoding)
            for r in scenario.recipients:
                await client.rcpt(f"{r}@{name}.test", options=[f"NOTIFY={scenario.notify}"] if scenario.notify else [],
                                  encoding=encoding)
            await client.data(f"From: {SENDER}\r\nSubject: {name}\r\n\r\n{scenario.body}".encode())


async def run_both(mailflow_server, smtp_peer, scenarios: dict[str, Scenario], *, postfix: dict | None = None,
                   queue: dict | None = None, smtp: dict | None = None, notice_for_all: bool = False,
                   unsettled: tuple[str, ...] = (), pf_log: list[str] | None = None, mailflow: dict | None = None,
                   mf_log: list[str] | None = None, peers: list[ScriptedPeer] | None = None):
    """Both servers relay one message per scenario. Returns ((postfix outcomes, postfix notices), (mailflow's…))
    once every recipient has an outcome on both sides (one whose status is not one of `unsettled`: "deferred" to
    wait for a retry) and every failure its notice (`notice_for_all`: every recipient that was not sent).
    `pf_log`: gets Postfix's mail log, before its instance goes (`mf_log`: mailflow's lines); `mailflow`: more of
    mailflow's settings (as `postfix` for Postfix's); `peers`: gets the scripted peers (their sessions)."""
    by_name = {name: await ScriptedPeer(s.script).start() for name, s in scenarios.items()}
    if peers is not None:
        peers.extend(by_name.values())
    pf_notices, mf_notices = await smtp_peer(), await smtp_peer()
    pf_routes = [f"{name}.test=lmtp:inet:127.0.0.1:{peer.port}" if scenarios[name].lmtp
                 else f"{name}.test=smtp:[127.0.0.1]:{peer.port}" for name, peer in by_name.items()]
    mf_routes = [f"{name}.test={'lmtp' if scenarios[name].lmtp else 'smtp'}:[127.0.0.1]:{peer.port}"
                 for name, peer in by_name.items()]
    tls = ", ".join(f"[127.0.0.1]:{by_name[name].port}={s.tls}" for name, s in scenarios.items() if s.tls)
    tls_maps = {"smtp_tls_policy_maps": f"inline:{{{tls}}}"} if tls else {}
    everyone = {f"{r}@{name}.test" for name, s in scenarios.items() for r in s.recipients}
    want_success = {f"{r}@{name}.test" for name, s in scenarios.items() if "SUCCESS" in s.notify
                    for r in s.recipients}
    heard_by = [*by_name.values(), *(peers or [])]

    def passed_on(server: bytes) -> set[str]:
        """The recipients whose NOTIFY a server's sessions passed on to a peer (one announcing DSN): for the
        others a NOTIFY=SUCCESS recipient that is sent gets a `relayed` notice, from Postfix's smtp(8) as from
        mailflow (none is owed when any session passed it on: a wait for a notice that never comes would fail)."""
        return {line.decode("utf-8", "replace").partition("<")[2].partition(">")[0]
                for peer in heard_by for heard in peer.sessions if heard and heard[0].split()[1:2] == [server]
                for line in heard if line[:4].upper() == b"RCPT" and b"NOTIFY=" in line.upper()}

    log = MailLogLines().start()
    try:
        async with postfix_instance({
            "myhostname": "pf.test", "mydestination": "", "delay_warning_time": "0", **tls_maps,
            **(postfix or {}),
            "transport_maps": "inline:{" + ", ".join([f"sender.test=smtp:[127.0.0.1]:{pf_notices.port}", *pf_routes])
                              + "}",
        }) as pf:
            mf = await mailflow_server(
                mynetworks=["127.0.0.0/8"], smtp={"tls_security_level": "none",
                                                        "tls_policy_maps": list(tls_maps.values()), **(smtp or {})},
                transport_maps=["inline:{" + ", ".join([f"sender.test=smtp:[127.0.0.1]:{mf_notices.port}", *mf_routes])
                                + "}"],
                queue={"queue_run_delay": "300s", "minimal_backoff_time": "300s", "maximal_backoff_time": "300s",
                       **(queue or {})}, **(mailflow or {}))
            mf_name = mf.config.myhostname.encode()
            await asyncio.gather(relay_one_each(pf.port, scenarios),
                                 relay_one_each(mf.smtp_addresses[0][1], scenarios))

            def done(log_text: str, notices, server: bytes) -> bool:
                ended = {r: got for r, got in outcomes(log_text).items() if got[2] not in unsettled}
                owed = {r for r, (_, _, status, _) in ended.items()
                        if status == "bounced" or (notice_for_all and status != "sent")
                        or (status == "sent" and r in want_success and r not in passed_on(server))}
                return set(ended) >= everyone and set(notice_fields(notices.messages)) >= owed

            await eventually(lambda: done(pf.maillog, pf_notices, b"pf.test") or None, timeout=15,
                             what="Postfix ended every recipient, its notices in")
            await eventually(lambda: done("\n".join(log.lines), mf_notices, mf_name) or None, timeout=15,
                             what="mailflow ended every recipient, its notices in")
            await pf.flushed()  # (and every line Postfix sent meanwhile is in its log, postlogd late or not)
            if pf_log is not None:
                pf_log.append(pf.maillog)
            if mf_log is not None:
                mf_log.append("\n".join(log.lines))
            return ((outcomes(pf.maillog), notice_fields(pf_notices.messages)),
                    (outcomes("\n".join(log.lines)), notice_fields(mf_notices.messages)))
    finally:
        log.stop()
        for peer in by_name.values():
            await peer.stop()


# ------------------------------------------------------------------------------------------------ scenarios


def some_full(address: str) -> bytes:
    return b"452 4.5.3 Too many recipients\r\n" if address.startswith("b@") else b"250 2.1.5 Ok\r\n"


REFUSALS = {
    "greeting-554": Scenario({"greeting": b"554 5.7.1 go away\r\n"}),  # smtp_skip_5xx_greeting: deferred
    "greeting-421": Scenario({"greeting": b"421 4.3.2 busy\r\n"}),
    "greeting-lost": Scenario({"greeting": CLOSE}),
    "ehlo-refused": Scenario({"EHLO": b"502 5.5.2 Error: command not recognized\r\n"}),  # HELO then
    "helo-refused": Scenario({"EHLO": b"500 5.5.1 no\r\n", "HELO": b"501 5.5.4 not you\r\n"}),
    "ehlo-421": Scenario({"EHLO": b"421 4.7.0 go away\r\n"}),
    "ehlo-451": Scenario({"EHLO": b"451 4.3.0 later\r\n"}),  # any refusal but 421: HELO then
    "ehlo-550-helo-451": Scenario({"EHLO": b"550 no\r\n", "HELO": b"451 4.3.0 later\r\n"}),
    "mail-421": Scenario({"MAIL": b"421 4.3.2 shutting down\r\n"}),
    "mail-553": Scenario({"MAIL": b"553 5.1.8 sender rejected\r\n"}),
    "rcpt-some-452": Scenario({"RCPT": some_full}, ("a", "b", "c")),
    "rcpt-552": Scenario({"RCPT": b"552 5.2.2 Mailbox full\r\n"}),
    "rcpt-no-code": Scenario({"RCPT": b"550 no such user here\r\n"}),
    "rcpt-lost": Scenario({"RCPT": CLOSE}),
    "data-554": Scenario({"DATA": b"554 5.5.1 no valid recipients\r\n"}, ("a", "b")),
    "dot-554": Scenario({"DOT": b"554 5.7.1 rejected as spam\r\n"}, ("a", "b")),
    "dot-lost": Scenario({"DOT": CLOSE}),
    "rcpt-multi-line": Scenario({"RCPT": b"550-5.1.1 The email account that you tried to reach does not exist.\r\n"
                                         b"550-5.1.1 Please try double-checking the address.\r\n"
                                         b"550 5.1.1 https://support.example/?p=NoSuchUser x\r\n"}),
    "rcpt-codes-change": Scenario({"RCPT": b"250-first\r\n550 5.1.1 second\r\n"}),  # the last line's code
    "rcpt-354": Scenario({"RCPT": b"354 what\r\n"}),  # a protocol error: 5.5.0
    "data-250": Scenario({"DATA": b"250 2.0.0 done already\r\n"}),  # "Protocol error: host ... said: 250 ..."
    # a peer without DSN: a NOTIFY=SUCCESS recipient gets a "relayed" notice from here
    "no-dsn-notify": Scenario({}, ("a", "b"), notify="SUCCESS,FAILURE"),
    # LMTP: one reply per accepted recipient after the content; a lost connection defers those unanswered
    "lmtp-each": Scenario({"RCPT": lambda a: b"550 5.1.1 unknown\r\n" if a.startswith("d@") else b"250 2.1.5 Ok\r\n",
                           "DOT": b"250 2.0.0 a saved\r\n452 4.2.2 b over quota\r\n550 5.7.1 c refused\r\n"},
                          ("a", "b", "c", "d"), lmtp=True),
    "lmtp-lost": Scenario({"DOT": b"250 2.0.0 a saved\r\n" + THEN_CLOSE}, ("a", "b"), lmtp=True),
    # at level may, new mail is not sent in plaintext when the TLS handshake fails (only once it has waited)
    "starttls-broken": Scenario({"EHLO": b"250-peer.test\r\n250 STARTTLS\r\n",
                                 "STARTTLS": b"220 2.0.0 Go\r\n" + THEN_CLOSE}, tls="may"),
    "starttls-refused": Scenario({"EHLO": b"250-peer.test\r\n250 STARTTLS\r\n",
                                  "STARTTLS": b"454 4.7.0 TLS not available\r\n"}, tls="may"),
    "starttls-required-502": Scenario({"EHLO": b"250-peer.test\r\n250 STARTTLS\r\n",
                                       "STARTTLS": b"502 5.5.1 not now\r\n"}, tls="encrypt"),  # a hard error
    "starttls-required-454": Scenario({"EHLO": b"250-peer.test\r\n250 STARTTLS\r\n",
                                       "STARTTLS": b"454 4.7.0 TLS not available\r\n"}, tls="encrypt"),
    "starttls-required-missing": Scenario({}, tls="encrypt"),  # 4.7.4
}


async def test_refusals_and_lost_sessions_end_as_with_postfix(mailflow_server, smtp_peer):
    (pf_ended, pf_notices), (mf_ended, mf_notices) = await run_both(mailflow_server, smtp_peer, REFUSALS)
    assert {r: got for r, got in mf_ended.items() if got != pf_ended.get(r)} == {}, pf_ended
    assert {r: got for r, got in mf_notices.items() if got != pf_notices.get(r)} == {}, pf_notices
    assert set(mf_notices) == set(pf_notices)
    # the edges themselves, so that a change on both sides cannot pass unnoticed
    port = re.escape(pf_ended["a@helo-refused.test"][0].rpartition(":")[2])
    assert pf_ended["a@helo-refused.test"][1:] == (
        "5.5.4", "bounced", "host 127.0.0.1[127.0.0.1] refused to talk to me: 501 5.5.4 not you")
    assert re.fullmatch(rf"127\.0\.0\.1\[127\.0\.0\.1\]:{port}", pf_ended["a@helo-refused.test"][0])
    assert pf_ended["a@greeting-554.test"][1:3] == ("4.7.1", "deferred")
    assert pf_notices["a@helo-refused.test"] == {
        "Action": "failed", "Status": "5.5.4", "Remote-MTA": "dns;127.0.0.1", "Diagnostic-Code": "smtp;5015.5.4notyou",
        "Original-Recipient": "rfc822;a@helo-refused.test"}
    assert [status for _, _, status, _ in (pf_ended[f"{r}@rcpt-some-452.test"] for r in "abc")] == [
        "sent", "deferred", "sent"]
    assert pf_ended["a@starttls-broken.test"][1:] == ("4.7.5", "deferred", "Cannot start TLS: handshake failure")
    assert pf_ended["a@data-250.test"][1:3] == ("5.5.0", "bounced")
    assert pf_notices["a@no-dsn-notify.test"]["Action"] == "relayed"
    assert [pf_ended[f"{r}@lmtp-each.test"][2] for r in "abcd"] == ["sent", "deferred", "bounced", "bounced"]
    assert [pf_ended[f"{r}@lmtp-lost.test"][2] for r in "ab"] == ["sent", "deferred"]


STALLED_TLS = {
    # the peer answers STARTTLS, then neither answers the handshake nor closes
    "handshake-stalled": Scenario({"EHLO": b"250-peer.test\r\n250 STARTTLS\r\n",
                                   "STARTTLS": b"220 2.0.0 Go\r\n" + THEN_STALL}, tls="may"),
    "handshake-stalled-encrypt": Scenario({"EHLO": b"250-peer.test\r\n250 STARTTLS\r\n",
                                           "STARTTLS": b"220 2.0.0 Go\r\n" + THEN_STALL}, tls="encrypt"),
    # nor does it answer STARTTLS, or it hangs up: a failure of the conversation, not of TLS
    "starttls-unanswered": Scenario({"EHLO": b"250-peer.test\r\n250 STARTTLS\r\n", "STARTTLS": THEN_STALL},
                                    tls="may"),
    "starttls-lost": Scenario({"EHLO": b"250-peer.test\r\n250 STARTTLS\r\n", "STARTTLS": CLOSE}, tls="may"),
}


async def test_a_stalled_tls_handshake_defers_as_with_postfix(mailflow_server, smtp_peer):
    """smtp_starttls_timeout (1 s here; mailflow's [smtp] starttls_timeout) bounds the reply to STARTTLS and the
    handshake: the mail is deferred with Postfix's reason, new mail not sent in plaintext at level may (only once
    it has waited the minimal backoff time)."""
    pf_log: list[str] = []
    mf_log: list[str] = []
    (pf_ended, _), (mf_ended, _) = await run_both(mailflow_server, smtp_peer, STALLED_TLS,
                                                  postfix={"smtp_starttls_timeout": "1s"},
                                                  smtp={"starttls_timeout": "1s"}, pf_log=pf_log, mf_log=mf_log)
    assert mf_ended == pf_ended
    stalled = [f"a@{name}.test" for name in ("handshake-stalled", "handshake-stalled-encrypt", "starttls-unanswered")]
    as_prompt_as_postfix(*("\n".join(line for line in log[0].splitlines() if any(r in line for r in stalled))
                           for log in (pf_log, mf_log)), timer=1)
    # Postfix's own, so that a change on both sides cannot pass unnoticed
    assert {r: ended[1:] for r, ended in pf_ended.items()} == {
        "a@handshake-stalled.test": ("4.7.5", "deferred", "Cannot start TLS: handshake failure"),
        "a@handshake-stalled-encrypt.test": ("4.7.5", "deferred", "Cannot start TLS: handshake failure"),
        "a@starttls-unanswered.test": ("4.4.2", "deferred", "conversation with 127.0.0.1[127.0.0.1] timed out "
                                                            "while receiving the STARTTLS response"),
        "a@starttls-lost.test": ("4.4.2", "deferred", "lost connection with 127.0.0.1[127.0.0.1] while receiving "
                                                      "the STARTTLS response")}


GARBLED = {
    # lines that are no reply lines are read past: the reply is the next one's, their text before it
    "greeting-garbage": Scenario({"greeting": b"Welcome to peer\r\n220 peer.test ESMTP\r\n"}),
    "ehlo-garbage": Scenario({"EHLO": b"250-peer.test\r\nX-FOO\r\n250 8BITMIME\r\n"}),
    # an EHLO reply's garbage line offers nothing: no SIZE limit, no STARTTLS (TLS required: 4.7.4, not offered)
    "ehlo-garbage-size": Scenario({"EHLO": b"250-peer.test\r\nSIZE 10\r\n250 8BITMIME\r\n"}),
    "ehlo-garbage-starttls": Scenario({"EHLO": b"250-peer.test\r\nSTARTTLS\r\n250 8BITMIME\r\n"}, tls="encrypt"),
    "rcpt-garbage-550": Scenario({"RCPT": b"oops\r\n550 5.1.1 no such user\r\n"}),
    "rcpt-four-digits": Scenario({"RCPT": b"2500 ok\r\n550 5.1.1 no\r\n"}),
    "mail-garbage-lost": Scenario({"MAIL": b"oops\r\n" + THEN_CLOSE}),
    "dot-garbage-250": Scenario({"DOT": b"oops\r\n250 2.0.0 Ok\r\n"}),  # accepted: not to be sent again
    "lmtp-garbage": Scenario({"DOT": b"oops\r\n250 2.0.0 a saved\r\n\r\n452 4.2.2 b over quota\r\n"}, ("a", "b"),
                             lmtp=True),
    # codes that are neither 2xx, 4xx nor 5xx: a protocol error (5.5.0), hard in the handshake too
    "greeting-354": Scenario({"greeting": b"354 hi\r\n"}),
    "greeting-199": Scenario({"greeting": b"199 hi\r\n"}),
    "ehlo-354": Scenario({"EHLO": b"354 what\r\n", "HELO": b"354 what\r\n"}),
    "helo-600": Scenario({"EHLO": b"500 5.5.1 no\r\n", "HELO": b"600 6.0.0 what\r\n"}),
    "helo-lost": Scenario({"EHLO": b"500 5.5.1 no\r\n", "HELO": CLOSE}),
    "rcpt-600": Scenario({"RCPT": b"600 6.1.1 weird\r\n"}),
    "dot-199": Scenario({"DOT": b"199 what\r\n"}),
    # any 2xx to STARTTLS starts the handshake; a refusal with an odd code is hard where TLS is required
    "starttls-250": Scenario({"EHLO": b"250-peer.test\r\n250 STARTTLS\r\n",
                              "STARTTLS": b"250 2.0.0 Go\r\n" + THEN_CLOSE}, tls="may"),
    "starttls-required-600": Scenario({"EHLO": b"250-peer.test\r\n250 STARTTLS\r\n",
                                       "STARTTLS": b"600 what\r\n"}, tls="encrypt"),
    # an enhanced code of another class than its reply's is not taken: x.0.0
    "rcpt-550-class-4": Scenario({"RCPT": b"550 4.2.2 mailbox full\r\n"}),
    "dot-250-class-5": Scenario({"DOT": b"250 5.1.1 odd\r\n"}),
    "greeting-421-class-5": Scenario({"greeting": b"421 5.3.2 odd\r\n"}),
}


async def test_garbled_replies_and_odd_codes_end_as_with_postfix(mailflow_server, smtp_peer):
    """Postfix's smtp_chat_resp reads past a line that is no reply line (it only warns): the reply after it
    stands, with the garbage as the first words of its text. A code that SMTP does not know is a protocol error:
    5.5.0, and in the greeting, EHLO or HELO a hard one (the mail bounces)."""
    (pf_ended, pf_notices), (mf_ended, mf_notices) = await run_both(mailflow_server, smtp_peer, GARBLED)
    assert {r: got for r, got in mf_ended.items() if got != pf_ended.get(r)} == {}, pf_ended
    assert {r: got for r, got in mf_notices.items() if got != pf_notices.get(r)} == {}, pf_notices
    assert set(mf_notices) == set(pf_notices)
    # Postfix's own, so that a change on both sides cannot pass unnoticed
    assert {r: pf_ended[r][1:3] for r in ("a@rcpt-550-class-4.test", "a@dot-250-class-5.test",
                                          "a@greeting-421-class-5.test")} == {
        "a@rcpt-550-class-4.test": ("5.0.0", "bounced"), "a@dot-250-class-5.test": ("2.0.0", "sent"),
        "a@greeting-421-class-5.test": ("4.0.0", "deferred")}
    assert {r: pf_ended[r][1:] for r in ("a@rcpt-garbage-550.test", "a@greeting-354.test", "a@helo-lost.test")} == {
        "a@rcpt-garbage-550.test": ("5.1.1", "bounced", "host 127.0.0.1[127.0.0.1] said: oops 550 5.1.1 no such user "
                                                        "(in reply to RCPT TO command)"),
        "a@greeting-354.test": ("5.5.0", "bounced", "host 127.0.0.1[127.0.0.1] refused to talk to me: 354 hi"),
        "a@helo-lost.test": ("4.4.2", "deferred", "lost connection with 127.0.0.1[127.0.0.1] while performing the "
                                                  "HELO handshake")}
    assert [pf_ended[f"a@{name}.test"][2] for name in ("greeting-garbage", "ehlo-garbage", "dot-garbage-250",
                                                        "ehlo-garbage-size")] == ["sent"] * 4
    assert pf_ended["a@ehlo-garbage-starttls.test"][1:3] == ("4.7.4", "deferred")
    assert pf_notices["a@rcpt-600.test"]["Diagnostic-Code"] == "smtp;6006.1.1weird"


STARTTLS_OFFERED = b"250-peer.test\r\n250 STARTTLS\r\n"
HANDSHAKE_FAILURES = {
    # after its 220 to STARTTLS the peer hangs up, answers the ClientHello in plaintext, or stalls
    "handshake-lost": Scenario({"EHLO": STARTTLS_OFFERED, "STARTTLS": b"220 2.0.0 Go\r\n" + THEN_CLOSE},
                               tls="encrypt"),
    "handshake-not-tls": Scenario({"EHLO": STARTTLS_OFFERED, "STARTTLS": b"220 2.0.0 Go\r\n" + THEN_NOT_TLS},
                                  tls="encrypt"),
    "handshake-stalled": Scenario({"EHLO": STARTTLS_OFFERED, "STARTTLS": b"220 2.0.0 Go\r\n" + THEN_STALL},
                                  tls="may"),
}
CLIENT_TLS_LINE = re.compile(r"(SSL_connect error to |TLS library problem: |\w+: Cannot start TLS: )")
QUEUE_ID = re.compile(r"^[0-9A-Za-z]+: ")


def pf_client_tls_lines(maillog: str) -> list[str]:
    """Postfix smtp(8)'s lines about its TLS handshakes (the library's reason alone; queue ids as QID), sorted."""
    lines = [line.split("]: ", 1)[1].removeprefix("warning: ") for line in maillog.splitlines() if "/smtp[" in line]
    return sorted(comparable(line) for line in lines if CLIENT_TLS_LINE.match(line))


def mf_client_tls_lines(caplog) -> list[str]:
    return sorted(comparable(r.getMessage()) for r in caplog.records
                  if r.name == "mailflow.smtp" and CLIENT_TLS_LINE.match(r.getMessage()))


def comparable(line: str) -> str:
    """A client TLS line with its queue id as QID and the library's reason alone. A peer that hangs up after its
    220 is seen by either client as `lost connection` or, when the ClientHello reached a closed socket first, as
    `Connection reset by peer` (a race on loopback, seen with Postfix too): both are the one event here."""
    return QUEUE_ID.sub("QID: ", library_reason(line)).replace(": Connection reset by peer", ": lost connection")


async def test_a_failed_client_handshake_is_logged_as_postfix_logs_it(mailflow_server, smtp_peer, caplog):
    """tls_client.c's `SSL_connect error to host[ip]:port: reason` (at info), with Postfix's reasons: `lost
    connection` (the peer hung up), `-1` and `warning: TLS library problem: …` (it does not speak TLS),
    `Connection timed out` (smtp_starttls_timeout); the mail deferred `Cannot start TLS: handshake failure`."""
    caplog.set_level(logging.INFO, logger="mailflow.smtp")
    pf_log: list[str] = []
    (pf_ended, _), (mf_ended, _) = await run_both(mailflow_server, smtp_peer, HANDSHAKE_FAILURES,
                                                  postfix={"smtp_starttls_timeout": "1s"},
                                                  smtp={"starttls_timeout": "1s"}, pf_log=pf_log)
    assert mf_ended == pf_ended
    assert mf_client_tls_lines(caplog) == pf_client_tls_lines(pf_log[0])
    # Postfix's own, so that a change on both sides cannot pass unnoticed
    relay = {name: pf_ended[f"a@{name}.test"][0] for name in HANDSHAKE_FAILURES}
    assert {ended[1:] for ended in pf_ended.values()} == {("4.7.5", "deferred", "Cannot start TLS: handshake failure")}
    assert [line for line in pf_client_tls_lines(pf_log[0]) if not line.startswith("TLS library problem")] == sorted(
        f"SSL_connect error to {relay[name]}: {why}" for name, why in [
            ("handshake-lost", "lost connection"), ("handshake-not-tls", "-1"),
            ("handshake-stalled", "Connection timed out")])


async def test_the_plaintext_retry_after_a_failed_handshake_is_logged_as_postfix_logs_it(mailflow_server, smtp_peer,
                                                                                       caplog):
    """At level may, mail queued for the minimal backoff time (1 s here) goes on in plaintext when the handshake
    fails: Postfix logs the failure, then `QID: Cannot start TLS: handshake failure` (the reason it leaves the TLS
    session for), and sends. New mail was deferred with it at the first attempt."""
    caplog.set_level(logging.INFO, logger="mailflow.smtp")
    pf_log: list[str] = []
    backoff = {"queue_run_delay": "1s", "minimal_backoff_time": "1s", "maximal_backoff_time": "1s"}
    scenarios = {"handshake-lost-may": Scenario({"EHLO": STARTTLS_OFFERED,
                                                 "STARTTLS": b"220 2.0.0 Go\r\n" + THEN_CLOSE}, tls="may")}
    (pf_ended, _), (mf_ended, _) = await run_both(mailflow_server, smtp_peer, scenarios, postfix=backoff,
                                                  queue=backoff, unsettled=("deferred",), pf_log=pf_log)
    assert mf_ended == pf_ended
    # the lines each kind of event gets (how many attempts come before the fallback is a matter of timing)
    assert set(mf_client_tls_lines(caplog)) == set(pf_client_tls_lines(pf_log[0]))
    # Postfix's own, so that a change on both sides cannot pass unnoticed
    relay, _, status, _ = pf_ended["a@handshake-lost-may.test"]
    assert status == "sent"
    assert set(pf_client_tls_lines(pf_log[0])) == {"QID: Cannot start TLS: handshake failure",
                                                   f"SSL_connect error to {relay}: lost connection"}


EXPIRING = {
    "greeting-554": Scenario({"greeting": b"554 5.7.1 go away\r\n"}),
    "rcpt-450": Scenario({"RCPT": b"450 4.2.0 greylisted, come back later\r\n"}),
    "rcpt-some-452": Scenario({"RCPT": some_full}, ("a", "b")),
    "dot-451": Scenario({"DOT": b"451 4.3.0 try again\r\n"}),
    "dot-lost": Scenario({"DOT": CLOSE}),
    "small-size": Scenario({"EHLO": b"250-peer.test\r\n250 SIZE 100\r\n"}),  # our own reason: no Remote-MTA
}


async def test_returned_for_its_age_the_notice_quotes_the_last_reply_as_postfix_does(mailflow_server, smtp_peer):
    """maximal_queue_lifetime = 0: the first deferral returns the message. Postfix's notice gives each recipient
    the reply it last got (Diagnostic-Code smtp; …, with Remote-MTA), and its own reasons (a lost connection, a
    size limit) without a Remote-MTA."""
    (_, pf_notices), (_, mf_notices) = await run_both(
        mailflow_server, smtp_peer, EXPIRING, notice_for_all=True,
        postfix={"maximal_queue_lifetime": "0", "bounce_queue_lifetime": "0"},
        queue={"maximal_queue_lifetime": "0s", "bounce_queue_lifetime": "0s"})
    size = re.compile(r"messagesize\d+exceeds")  # (the two servers' messages differ in size)
    for fields in (*pf_notices.values(), *mf_notices.values()):
        ours = (fields["Diagnostic-Code"] or "").replace("X-Postfix;", "X-Mailflow;")  # each names itself
        fields["Diagnostic-Code"] = size.sub("messagesizeNexceeds", ours)
    assert set(mf_notices) == set(pf_notices) == {"a@rcpt-some-452.test"} ^ {
        f"{r}@{name}.test" for name, s in EXPIRING.items() for r in s.recipients}
    assert {r: got for r, got in mf_notices.items() if got != pf_notices[r]} == {}, pf_notices
    assert pf_notices["a@dot-451.test"]["Diagnostic-Code"] == "smtp;4514.3.0tryagain"
    assert pf_notices["a@dot-lost.test"]["Remote-MTA"] is None


LONG_LINES = {
    "rcpt-3000": Scenario({"RCPT": b"550 5.1.1 " + b"y" * 3000 + b"\r\n"}),
    "rcpt-20000": Scenario({"RCPT": b"550 5.1.1 " + b"z" * 20000 + b"\r\n"}),
    "dot-multi-long": Scenario({"DOT": b"554-5.7.1 " + b"w" * 3000 + b"\r\n554 5.7.1 rejected\r\n"}),
}


async def test_a_reply_line_past_the_line_limit_is_cut_not_refused_as_postfix_does(mailflow_server, smtp_peer):
    """Postfix keeps the first line_length_limit (2048) bytes of a reply line and reads past the rest: a long
    refusal bounces with its own code, its beginning the diagnostic. (Postfix's log cuts the text itself.)"""
    (pf_ended, pf_notices), (mf_ended, mf_notices) = await run_both(mailflow_server, smtp_peer, LONG_LINES)
    assert {r: got[:3] for r, got in mf_ended.items()} == {r: got[:3] for r, got in pf_ended.items()}
    assert mf_notices == pf_notices
    assert pf_ended["a@rcpt-20000.test"][1:3] == ("5.1.1", "bounced")
    assert pf_notices["a@rcpt-20000.test"]["Diagnostic-Code"] == "smtp;5505.1.1" + "z" * (2048 - 10)


UNENDING_LINES = {  # a reply line that never ends: the rest of it read and dropped until the timeout
    "greeting-unending": Scenario({"greeting": b"220 " + b"g" * 5000 + THEN_STALL}),
    "ehlo-unending": Scenario({"EHLO": b"250 " + b"e" * 5000 + THEN_STALL}),
    "rcpt-unending": Scenario({"RCPT": b"550 5.1.1 " + b"r" * 5000 + THEN_STALL}),
}


async def test_a_reply_line_that_never_ends_times_out_at_its_own_command_as_with_postfix(mailflow_server, smtp_peer):
    """Postfix's smtp_get reads past the rest of an overlong line before it returns the line, within the same time
    limit: a line that never ends is a reply that never comes, and the deferral names the stage it answers (not
    the command that would have followed a reply taken as complete)."""
    pf_log: list[str] = []
    mf_log: list[str] = []
    (pf_ended, _), (mf_ended, _) = await run_both(
        mailflow_server, smtp_peer, UNENDING_LINES,
        postfix={"smtp_helo_timeout": "1s", "smtp_rcpt_timeout": "1s", "smtp_mail_timeout": "1s"},
        smtp={"helo_timeout": "1s", "command_timeout": "1s"}, pf_log=pf_log, mf_log=mf_log)
    assert mf_ended == pf_ended
    as_prompt_as_postfix(pf_log[0], mf_log[0], timer=1)
    assert {r: ended[1:] for r, ended in pf_ended.items()} == {
        "a@greeting-unending.test": ("4.4.2", "deferred", "conversation with 127.0.0.1[127.0.0.1] timed out while "
                                                          "receiving the initial server greeting"),
        "a@ehlo-unending.test": ("4.4.2", "deferred", "conversation with 127.0.0.1[127.0.0.1] timed out while "
                                                      "performing the EHLO handshake"),
        "a@rcpt-unending.test": ("4.4.2", "deferred", "conversation with 127.0.0.1[127.0.0.1] timed out while "
                                                      "sending RCPT TO")}
