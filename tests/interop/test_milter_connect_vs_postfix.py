"""Differential test of the milters' connect event: one scripted milter (tests/support/milters.py) behind a private
Postfix 3.7 (smtpd_milters) and behind mailflow, the same sessions through each.

Postfix's smtpd_proto tells the milters of the client before its greeting (milter_conn_event), so a session that
never sends a command is seen by them too; their answer to it decides the greeting: a 5xx puts `554 host ESMTP not
accepting connections` in its place (the session goes on, and the milter's reply answers every MAIL), a 421 (a
SHUTDOWN, a 421 of its own) `421 host Service unavailable - try again later` and the end of the session, anything
else leaves the 220. check_milter_reply logs the refusal (`NOQUEUE: milter-reject: CONNECT from host[ip]: 550
5.7.1 Command rejected; proto=SMTP`). A milter that cannot be reached answers by milter_default_action from the
connect event on.
"""
from __future__ import annotations

import asyncio
import re
import struct

import pytest

from tests.support import SmtpClient, as_prompt_as, eventually, postfix_instance, timed
from tests.support.maillog import SYSLOG_NAME
from tests.support.milters import HANG, optneg, replycode, reply, scripted_milter
from tests.support.ports import free_port

pytestmark = pytest.mark.interop

PF_HOST, MF_HOST = "pf.test", "mx.mailflow.test"
CONNECT_ANSWERS = {  # what the milter answers the connect event, by scenario
    "continue": reply(b"c"), "reject": reply(b"r"), "tempfail": reply(b"t"), "accept": reply(b"a"),
    "discard": reply(b"d"), "shutdown": reply(b"4"), "own 554": replycode("554 5.7.1 not from you"),
    "own 421": replycode("421 4.7.0 go away now"), "own 450": replycode("450 4.7.1 later please"),
}
LATER_ANSWERS = {  # scenarios where it answers HELO or MAIL (the connect event: continue)
    "helo reject": {b"H": reply(b"r")}, "helo shutdown": {b"H": reply(b"4")}, "mail reject": {b"M": reply(b"r")},
    "rcpt reject": {b"R": reply(b"r")},
}
DEFAULT_ACTIONS = ("tempfail", "reject", "accept", "quarantine")


async def dialogue(port: int, host: str) -> list[str]:
    """The greeting, then (unless the server hung up) EHLO, VRFY, ETRN, STARTTLS (neither server offers it), MAIL,
    RCPT (relayed for mynetworks) and QUIT: each reply's first line (a 220's code only; EHLO's keyword names,
    sorted), `host` as HOST."""
    client = await SmtpClient.connect(port, greet=False)
    replies = [await client.reply()]
    for command in ("EHLO client.test", "VRFY postmaster", "ETRN remote.test", "STARTTLS", "MAIL FROM:<s@remote.test>",
                    "RCPT TO:<r@remote.test>", "QUIT"):
        if replies[-1].code is None or replies[-1].code == 421:
            break
        replies.append(await client.cmd(command))
    await client.close()
    shown = [(ehlo_keywords(r.text) if r.text.startswith("250-") else "220" if r.code == 220 else
              r.text.splitlines()[0]) if r.code else "closed" for r in replies]  # (the banner is each server's own)
    return [line.replace(host, "HOST") for line in shown]


def ehlo_keywords(text: str) -> str:
    """`250 KEYWORD ...`: an EHLO reply's keyword names, sorted (SIZE's value is each server's own)."""
    return " ".join(["250", *sorted(line[4:].split(" ", 1)[0] for line in text.splitlines()[1:])])


DSN = re.compile(r"(\d{3} )[245]\.\d{1,3}\.\d{1,3} ")


def as_postfix(postfix: list[str], mailflow: list[str]) -> list[str]:
    """mailflow's replies, each without its enhanced status code where Postfix's has none (every mailflow reply
    carries one: docs/filtering.md; ETRN's 459 here)."""
    return [line if n >= len(postfix) or DSN.match(postfix[n]) else DSN.sub(r"\1", line, count=1)
            for n, line in enumerate(mailflow)]


def milter_lines(log: str) -> list[str]:
    """smtpd's milter-reject and milter-hold lines, the client as CLIENT; of a transaction's milter-hold lines only
    the first (MAIL's: Postfix 3.7 logs one more at each later RCPT, mailflow a message's hold once, as Postfix 3.10:
    docs/filtering.md)."""
    found: list[str] = []
    for line in re.findall(rf"{SYSLOG_NAME}/smtpd\[\d+\]: (NOQUEUE: milter-\w+: .*)$", log, re.M):
        if not (line.startswith("NOQUEUE: milter-hold: RCPT") and found and " milter-hold: MAIL " in found[-1]):
            found.append(re.sub(r"from \S+\[127\.0\.0\.1\]", "from CLIENT", line))
    return found


def connects(milter) -> list[bytes]:
    """Each milter session's commands (negotiation, macros and the end left out)."""
    return [bytes(c[0] for c, _ in session if c not in (b"O", b"D", b"A", b"Q")) for session in milter.sessions]


async def through_postfix(scenarios: list[str], current: list[str], milter) -> tuple[list, list, str]:
    """Every scenario through one private Postfix (a dead milter's default actions on services of their own);
    (dialogues, milter sessions per scenario, log)."""
    dead = free_port()
    ports = {action: free_port() for action in DEFAULT_ACTIONS}
    master_cf = "".join(f"127.0.0.1:{port} inet n - n - - smtpd -o smtpd_milters=inet:127.0.0.1:{dead} "
                        f"-o milter_default_action={action}\n" for action, port in ports.items())
    async with postfix_instance({"myhostname": PF_HOST, "syslog_name": SYSLOG_NAME, "smtpd_milters": milter.spec,
                                 "disable_vrfy_command": "no", "smtputf8_enable": "yes",  # (mailflow's EHLO)
                                 "milter_connect_timeout": "2s", "milter_command_timeout": "2s"},
                                master_cf=master_cf) as pf:
        started, seen = await pf.sessions_ended(), len(milter.sessions)
        dialogues, sessions = [], []
        for scenario in scenarios:
            current[0] = scenario
            before = len(milter.sessions)
            dialogues.append(await dialogue(pf.port, PF_HOST))
            sessions.append(before)
        for action in DEFAULT_ACTIONS:
            dialogues.append(await dialogue(ports[action], PF_HOST))
        ended = await pf.sessions_ended()
        log = pf.maillog[started:ended]
    assert seen <= sessions[0]
    return dialogues, [connects(milter)[n] for n in sessions], log


async def through_mailflow(mailflow_server, mail_log, tmp_path, scenarios: list[str], current: list[str],
                           milter) -> tuple[list, list, str]:
    settings = {"connect_timeout": "2s", "command_timeout": "2s"}
    smtpd, relay = {"disable_vrfy_command": False}, ["127.0.0.0/8"]
    mf = await mailflow_server(myhostname=MF_HOST, mynetworks=relay, smtpd={**smtpd, "milters": [milter.spec]},
                               milter=settings)
    dialogues, sessions = [], []
    for scenario in scenarios:
        current[0] = scenario
        before = len(milter.sessions)
        dialogues.append(await dialogue(mf.smtp_addresses[0][1], MF_HOST))
        sessions.append(before)
    dead = f"inet:127.0.0.1:{free_port()}"
    for action in DEFAULT_ACTIONS:
        server = await mailflow_server(myhostname=MF_HOST, mynetworks=relay, smtpd={**smtpd, "milters": [dead]},
                                       milter={**settings, "default_action": action},
                                       queue_directory=str(tmp_path / action))
        dialogues.append(await dialogue(server.smtp_addresses[0][1], MF_HOST))
    count = len(scenarios) + len(DEFAULT_ACTIONS)
    await eventually(lambda: mail_log.read_text().count("disconnect from") >= count, timeout=10)
    return dialogues, [connects(milter)[n] for n in sessions], mail_log.read_text()


async def test_the_milters_hear_of_the_client_at_the_greeting_and_decide_it_as_in_postfix(mailflow_server,
                                                                                          mail_log, tmp_path):
    scenarios = list(CONNECT_ANSWERS) + list(LATER_ANSWERS)
    current = ["continue"]

    def answer(command: bytes):
        return lambda _, __: CONNECT_ANSWERS.get(current[0], reply(b"c")) if command == b"C" else \
            LATER_ANSWERS.get(current[0], {}).get(command, reply(b"c"))

    async with scripted_milter({command: answer(command) for command in (b"C", b"H", b"M", b"R")}) as milter:
        postfix = await through_postfix(scenarios, current, milter)
        mailflow = await through_mailflow(mailflow_server, mail_log, tmp_path, scenarios, current, milter)
    pf_dialogues, pf_sessions, pf_log = postfix
    mf_dialogues, mf_sessions, mf_log = mailflow
    names = scenarios + list(DEFAULT_ACTIONS)
    assert dict(zip(names, map(as_postfix, pf_dialogues, mf_dialogues))) == dict(zip(names, pf_dialogues))
    assert mf_sessions == pf_sessions
    assert milter_lines(mf_log) == milter_lines(pf_log)
    # the edges themselves, so that the same change on both sides cannot pass unnoticed
    rejected, later = "550 5.7.1 Command rejected", "451 4.7.1 Service unavailable - try again later"
    no_mail, bye = "503 5.5.1 Error: need MAIL command", "221 2.0.0 Bye"
    full, cut = "250 8BITMIME CHUNKING DSN ENHANCEDSTATUSCODES ETRN PIPELINING SIZE SMTPUTF8 VRFY", \
        "250 ENHANCEDSTATUSCODES"  # (after a milter's 5xx: ehlo_cmd's discard mask)
    assert pf_dialogues[scenarios.index("reject")] == [  # (VRFY, ETRN, STARTTLS: milter_other_event; MAIL)
        "554 HOST ESMTP not accepting connections", cut, rejected, rejected, rejected, rejected, no_mail, bye]
    assert [pf_dialogues[scenarios.index(s)][1] for s in ("own 554", "helo reject", "own 450")] == [cut, cut, full]
    assert pf_dialogues[scenarios.index("shutdown")] == ["421 HOST Service unavailable - try again later"]
    assert pf_dialogues[scenarios.index("tempfail")] == [
        "220", full, later, later, "454 4.3.0 Try again later", later, no_mail, bye]
    assert pf_dialogues[scenarios.index("rcpt reject")][-2:] == [rejected, bye]
    assert pf_dialogues[scenarios.index("helo shutdown")] == ["220", "421 4.7.0 Server closing connection"]
    assert milter_lines(pf_log)[:3] == [
        "NOQUEUE: milter-reject: CONNECT from CLIENT: 550 5.7.1 Command rejected; proto=SMTP",
        "NOQUEUE: milter-reject: EHLO from CLIENT: 550 5.7.1 Command rejected; proto=SMTP helo=<client.test>",
        "NOQUEUE: milter-reject: MAIL from CLIENT: 550 5.7.1 Command rejected; from=<s@remote.test> proto=ESMTP "
        "helo=<client.test>"]


async def test_a_milter_slower_than_smtpds_timeout_holds_the_greeting_as_in_postfix(mailflow_server):
    """smtpd_timeout (1 s) bounds the client's I/O only: a milter that never answers the connect event is waited
    for up to milter_command_timeout (2 s), then milter_default_action (accept) answers for it: a 220, and the
    session goes on. The two dialogues at once, and mailflow's no slower than Postfix's (its timer is the one
    configured, not a default)."""
    async with scripted_milter({b"C": HANG}) as milter:
        mf = await mailflow_server(myhostname=MF_HOST, mynetworks=["127.0.0.0/8"],
                                   smtpd={"milters": [milter.spec], "timeout": "1s", "disable_vrfy_command": False},
                                   milter={"command_timeout": "2s", "default_action": "accept"})
        async with postfix_instance({"myhostname": PF_HOST, "syslog_name": SYSLOG_NAME, "smtpd_milters": milter.spec,
                                     "smtpd_timeout": "1s", "milter_command_timeout": "2s",
                                     "milter_default_action": "accept", "disable_vrfy_command": "no",
                                     "smtputf8_enable": "yes"}) as pf:
            (postfix, pf_waited), (mailflow, mf_waited) = await asyncio.gather(
                timed(dialogue(pf.port, PF_HOST)), timed(dialogue(mf.smtp_addresses[0][1], MF_HOST)))
    assert as_postfix(postfix, mailflow) == postfix
    assert pf_waited >= 2
    as_prompt_as(mf_waited, pf_waited, "the greeting behind a hung milter")
    assert postfix[:2] == ["220", "250 8BITMIME CHUNKING DSN ENHANCEDSTATUSCODES ETRN PIPELINING SIZE SMTPUTF8 VRFY"]


async def test_discarded_keywords_are_logged_after_the_milters_line_and_not_after_their_5xx_as_in_postfix(
        mailflow_server, mail_log):
    """discard_ehlo_keywords (dsn) with a milter: Postfix's ehlo_cmd logs `discarding EHLO keywords: DSN` after the
    milters' line of that EHLO, and not at all after their 5xx (its mask is then everything but
    ENHANCEDSTATUSCODES, silently)."""
    answers = {"continue": reply(b"c"), "quarantine": reply(b"q", b"held\0") + reply(b"c"), "reject": reply(b"r")}
    current = ["continue"]

    async def sessions(port: int) -> list[str]:
        shown = []
        for name in answers:
            current[0] = name
            client = await SmtpClient.connect(port, greet=False)
            await client.reply()
            shown.append(ehlo_keywords((await client.cmd("EHLO client.test")).text))
            await client.cmd("QUIT")
            await client.close()
        return shown

    def lines(log: str) -> list[str]:
        return [re.sub(r"from \S+\[127\.0\.0\.1\]", "from CLIENT", line) for line in re.findall(
            rf"{SYSLOG_NAME}/smtpd\[\d+\]: ((?:NOQUEUE: milter-\w+: EHLO|discarding EHLO|disconnect).*)$", log, re.M)]

    async with scripted_milter({b"H": lambda _, __: answers[current[0]]}) as milter:
        async with postfix_instance({"myhostname": PF_HOST, "syslog_name": SYSLOG_NAME, "smtpd_milters": milter.spec,
                                     "smtpd_discard_ehlo_keywords": "dsn", "smtputf8_enable": "yes"}) as pf:
            started = await pf.sessions_ended()
            postfix = await sessions(pf.port)
            ended = await pf.sessions_ended()
            pf_log = pf.maillog[started:ended]
        mf = await mailflow_server(myhostname=MF_HOST, smtpd={"milters": [milter.spec], "disable_vrfy_command": False,
                                                               "discard_ehlo_keywords": ["dsn"]})
        mailflow = await sessions(mf.smtp_addresses[0][1])
        await eventually(lambda: mail_log.read_text().count("disconnect from") >= len(answers), timeout=10)
    assert mailflow == postfix
    assert lines(mail_log.read_text()) == lines(pf_log)
    assert [line for line in lines(pf_log) if not line.startswith("disconnect")] == [
        "discarding EHLO keywords: DSN",
        "NOQUEUE: milter-hold: EHLO from CLIENT: milter triggers HOLD action; proto=SMTP helo=<client.test>",
        "discarding EHLO keywords: DSN",
        "NOQUEUE: milter-reject: EHLO from CLIENT: 550 5.7.1 Command rejected; proto=SMTP helo=<client.test>"]


async def xclient_dialogue(port: int, host: str) -> list[str]:
    """A front end's session: EHLO, XCLIENT naming a client the milter refuses, EHLO and MAIL of that client."""
    client = await SmtpClient.connect(port)
    replies = [await client.cmd(command) for command in (
        "EHLO front.test", "XCLIENT NAME=client.example ADDR=192.0.2.10", "EHLO client.test",
        "MAIL FROM:<s@remote.test>", "QUIT")]
    await client.close()
    return [(ehlo_keywords(r.text) if r.text.startswith("250-") else r.text.splitlines()[0]).replace(host, "HOST")
            for r in replies]


async def test_after_xclient_the_milters_decide_the_new_greeting_as_in_postfix(mailflow_server, mail_log):
    """Postfix's xclient_cmd runs the connection's start again (smtpd_proto's case 0): the milters, set up again,
    hear of the client XCLIENT names before the new greeting, which their refusal replaces; logged at XCLIENT."""
    def connect(_, payload: bytes) -> bytes:
        return reply(b"r") if b"192.0.2.10" in payload else reply(b"c")

    async with scripted_milter({b"C": connect}) as milter:
        async with postfix_instance({"myhostname": PF_HOST, "syslog_name": SYSLOG_NAME, "smtpd_milters": milter.spec,
                                     "smtpd_authorized_xclient_hosts": "127.0.0.0/8", "smtputf8_enable": "yes"}) as pf:
            postfix = await xclient_dialogue(pf.port, PF_HOST)
            await eventually(lambda: "milter-reject: MAIL" in pf.maillog, timeout=10)
            pf_log = pf.maillog
        mf = await mailflow_server(myhostname=MF_HOST, smtpd={"milters": [milter.spec], "disable_vrfy_command": False,
                                                               "authorized_xclient_hosts": ["127.0.0.0/8"]})
        mailflow = await xclient_dialogue(mf.smtp_addresses[0][1], MF_HOST)
        await eventually(lambda: "milter-reject: MAIL" in mail_log.read_text(), timeout=10)
    assert mailflow == postfix == ["250 8BITMIME CHUNKING DSN ENHANCEDSTATUSCODES ETRN PIPELINING SIZE SMTPUTF8 VRFY "
                                   "XCLIENT",
                                   "554 HOST ESMTP not accepting connections", "250 ENHANCEDSTATUSCODES",
                                   "550 5.7.1 Command rejected", "221 2.0.0 Bye"]
    assert milter_lines(mail_log.read_text()) == milter_lines(pf_log)
    assert milter_lines(pf_log)[0] == ("NOQUEUE: milter-reject: XCLIENT from client.example[192.0.2.10]: 550 5.7.1 "
                                       "Command rejected; proto=SMTP")


@pytest.mark.parametrize("port", ["[UNAVAILABLE]", "99999", "00025"])
async def test_the_client_port_xclient_gives_reaches_the_milters_as_postfix_sends_it(mailflow_server, caplog, port):
    """Postfix's xclient_cmd takes PORT=[UNAVAILABLE] as an unknown port, which smtpd passes to the milters as 0
    (packet and {client_port}); five digits above 65535 are sent as 0 after `warning: milter M: bad client port
    number 99999` (milter8_conn_event); the macro keeps the digits as sent. (Postfix sends {client_port} to a
    milter that asks for it: its default milter_connect_macros has none.)"""
    asks = optneg(macros=struct.pack("!I", 0) + b"{client_addr} {client_port}\0")  # SETSYMLIST for connect
    async def session(server_port: int) -> tuple[bytes, str]:
        client = await SmtpClient.connect(server_port)
        assert (await client.cmd(f"XCLIENT NAME=client.example ADDR=192.0.2.10 PORT={port}")).code == 220
        await client.close()
        connect = await eventually(lambda: next((
            (payload, n) for n, session in enumerate(list(milter.sessions)) for command, payload in session
            if command == b"C" and payload.startswith(b"client.example")), None))
        macros = milter.macros(b"C")  # (every session's; the one sent with that connect)
        return connect[0], next(m for m in macros if m.get("{client_addr}") == "192.0.2.10")["{client_port}"]

    async with scripted_milter(negotiation=asks) as milter:
        async with postfix_instance({"myhostname": PF_HOST, "syslog_name": SYSLOG_NAME, "smtpd_milters": milter.spec,
                                     "smtpd_authorized_xclient_hosts": "127.0.0.0/8"}) as pf:
            postfix = await session(pf.port)
            # (the warning comes before the session's disconnect line; the readiness probe's is the first)
            await eventually(lambda: pf.maillog.count("disconnect from") >= 2, timeout=10)
            pf_warned = "bad client port number" in pf.maillog
    async with scripted_milter(negotiation=asks) as milter:
        mf = await mailflow_server(smtpd={"milters": [milter.spec], "authorized_xclient_hosts": ["127.0.0.0/8"]})
        mailflow = await session(mf.smtp_addresses[0][1])
    assert mailflow == postfix
    assert any("bad client port number" in m for m in caplog.messages) == pf_warned == (port == "99999")


async def macro_session(port: int) -> None:
    client = await SmtpClient.connect(port)
    for command in ("EHLO client.test", "MAIL FROM:<s@remote.test>", "RCPT TO:<r@remote.test>",
                    "RCPT TO:<q@remote.test>", "DATA"):
        await client.cmd(command)
    assert (await client.cmd(b"Subject: macros\r\n\r\nbody\r\n.")).code == 250
    await client.cmd("QUIT")
    await client.close()


def macro_names(session) -> dict[str, set[tuple[str, ...]]]:
    """The names of the macros sent before the events of one milter session, by the event's letter (Postfix's
    empty packets left out: its HELO's without TLS; mailflow sends none)."""
    found: dict[str, set[tuple[str, ...]]] = {}
    for command, payload in session:
        parts = payload[1:].split(b"\0")[:-1]
        if command == b"D" and parts:
            found.setdefault(payload[:1].decode(), set()).add(tuple(sorted(p.decode() for p in parts[0::2])))
    return found


async def macros_sent_alike(mailflow_server, negotiation: bytes | None = None) -> dict[str, set[tuple[str, ...]]]:
    """One macro_session through a private Postfix and one through mailflow, behind the same scripted milter (its
    OPTNEG reply `negotiation`, else the default one): the macro names mailflow sent must be Postfix's, but for
    {mail_host}, {mail_mailer}, {rcpt_host} and {rcpt_mailer}, which mailflow has not (Postfix's resolver's answer
    for the address). Returns Postfix's, for the test's own assertions."""
    unknown = {"{mail_host}", "{mail_mailer}", "{rcpt_host}", "{rcpt_mailer}"}
    async with scripted_milter(negotiation=negotiation) as milter:
        async with postfix_instance({"myhostname": PF_HOST, "syslog_name": SYSLOG_NAME, "smtpd_milters": milter.spec,
                                     "mynetworks": "127.0.0.0/8"}) as pf:
            await macro_session(pf.port)
            await eventually(lambda: any(c == b"Q" for c, _ in milter.sessions[-1]), timeout=10)
            postfix = macro_names(milter.sessions[-1])
        mf = await mailflow_server(myhostname=MF_HOST, mynetworks=["127.0.0.0/8"], smtpd={"milters": [milter.spec]})
        await macro_session(mf.smtp_addresses[0][1])
        await eventually(lambda: any(c == b"Q" for c, _ in milter.sessions[-1]), timeout=10)
        mailflow = macro_names(milter.sessions[-1])
    assert mailflow == {stage: {tuple(n for n in names if n not in unknown) for names in lists}
                        for stage, lists in postfix.items()}
    return postfix


async def test_a_milter_that_asks_for_no_macros_is_sent_postfix_s_default_lists(mailflow_server):
    """Postfix 3.7's milter_*_macros defaults (postconf -d): connect `j {daemon_name} {daemon_addr} v _`, HELO the
    TLS ones (none without TLS), MAIL `i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host}
    {mail_mailer}`, RCPT `i {rcpt_addr} {rcpt_host} {rcpt_mailer}`, `i` with DATA, the headers and the body: the
    same names each event, but {mail_host}, {mail_mailer}, {rcpt_host} and {rcpt_mailer}, which mailflow has not
    (Postfix's resolver's answer for the address)."""
    postfix = await macros_sent_alike(mailflow_server)
    assert postfix["C"] == {("_", "j", "v", "{daemon_addr}", "{daemon_name}")}
    assert postfix["M"] == {("{mail_addr}", "{mail_host}", "{mail_mailer}")}


async def test_an_empty_setsymlist_list_is_the_defaults_and_one_of_blanks_is_no_macros_as_postfix_has_it(
        mailflow_server):
    """Postfix 3.7's milter8 keeps each list the milter gives, and MILTER_MACRO_EVAL sends a stage whose list is
    the empty string (or that is not listed) the defaults (milter_*_macros): so connect and DATA here; a list of
    blanks is a list of no names: nothing at MAIL. mailflow took the blanks for an empty list (the defaults). Names
    are separated by commas as well as blanks (mystrtok's ", \\t\\r\\n"): RCPT's `{rcpt_addr},i` is two names, which
    mailflow took for one unknown name and sent nothing."""
    asks = optneg(macros=struct.pack("!I", 0) + b"\0" + struct.pack("!I", 2) + b" \0"  # connect "", MAIL " "
                  + struct.pack("!I", 3) + b"{rcpt_addr},i\0")  # RCPT "{rcpt_addr},i"
    postfix = await macros_sent_alike(mailflow_server, negotiation=asks)
    assert postfix["C"] == {("_", "j", "v", "{daemon_addr}", "{daemon_name}")} and "M" not in postfix
    assert ("i", "{rcpt_addr}") in postfix["R"]
