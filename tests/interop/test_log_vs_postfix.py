"""Differential test of the mail log as pflogsumm and fail2ban read it: the same traffic through a private Postfix
3.7 and through mailflow (its `[log] format = "text"` log in a file, as test_log_tools.py sets it up), then the
lines each writes compared (queue ids, pids, dates and host names masked) and what the tools make of each log:
pflogsumm's totals and tables, and the bans fail2ban-regex finds with the stock `postfix` filter in each mode.

Traffic: a message relayed to a capture peer with a relay refusal and an unknown user beside it; one deferred
(peer 4xx) that expires at once (queue lifetime 0) and one bounced (peer 5xx), each returning a notice; a HELO
name and a sender refused; header_checks REJECT, HOLD and DISCARD; an access HOLD (the message has two
recipients: Postfix logs it once) and DISCARD; too many errors, improper pipelining after
HELO, a timeout and a lost connection; failed and aborted logins (one private Dovecot answers both servers' AUTH).
A second test compares, word for word, smtpd's lines that name a transaction (`client=`, refusals, an access
WARN): NOQUEUE until its first accepted recipient, its queue id from there on, as Postfix's smtpd names it.

A third test puts two messages on hold as they arrive (header_checks HOLD) and has the tools release one
(postsuper -H, `mailflow queue release`: it is then delivered) and delete the other (postsuper -d, `mailflow
queue delete`): each message's lines in order (postsuper's, and qmgr's `from=` only once the message enters the
active queue), postsuper's summaries and pflogsumm's counts (received, held, delivered, senders, recipients) are
the same for both logs.

A fourth test compares, word for word, smtpd's lines for the access actions HOLD, DISCARD, REDIRECT, BCC and FILTER
(access tables, a restriction class, a policy service; at RCPT and in end_of_data_restrictions): logged at the
command that met them, HOLD once per message, NOQUEUE until the transaction has its queue id. A fifth compares
the delivery lines (`to=`, `orig_to=`, `relay=`, `conn_use=`, `delay=`, `delays=`, `dsn=`, `status=`) field for
field, each time's value masked but its form kept (Postfix's format_tv).

A sixth test has a scripted milter discard or quarantine at MAIL, RCPT and the end of the message: smtpd's and
cleanup's `milter-discard` / `milter-hold` lines word for word, and pflogsumm's held and discarded counts.

Another refuses MAIL's SIZE past message_size_limit (a sender, then the null sender): the replies and smtpd's
`NOQUEUE: reject: MAIL` lines word for word.

Two more requeue mail (postsuper -r, `mailflow queue requeue`): the old id's and the copy's lines, and a message
older than its queue lifetime is tried again and deferred, not returned (the copy's lifetime starts anew).

Another deletes a message while its delivery waits on a slow smtp-sink (postsuper -d, `mailflow queue delete`): the
delivery's `status=sent` lines still follow postsuper's `removed`, with no qmgr `removed`, and pflogsumm counts
them delivered.

Compared by the first: pflogsumm's totals (received, delivered, deferred, bounced, rejected, held, discarded) and its
deferral, bounce, reject, hold, discard, warning, fatal and panic sections; fail2ban's matched lines in every mode
of the stock `postfix` filter; the lines of smtp and cleanup. Not compared:
- pflogsumm's bytes and per-sender/recipient tables here: each server's own header fields make the sizes differ
  (the third test compares the per-sender and per-recipient counts);
- `improper command pipelining after CONNECT`: whether input sent with the connection is seen before the greeting
  is a race for both servers.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import shutil
import socket
import ssl
import sys
import tempfile
from pathlib import Path

import pytest
import trustme

from tests.interop.test_policy_vs_postfix import ScriptedPolicy
from tests.interop.test_smtp_faults_vs_postfix import ScriptedPeer
from tests.support import (SmtpClient, dovecot_instance, eventually, free_port, postfix_instance, require_tool,
                           run_tool, script_dir)
from tests.support.maillog import SYSLOG_NAME
from tests.support.postfix import postqueue_listed, smtp_sink
from tests.support.milters import optneg, reply, scripted_milter

pytestmark = pytest.mark.interop

PF_HOST, MF_HOST = "pf.test", "mx.mailflow.test"
HEADER_CHECKS = "/^Subject: hc-reject/ REJECT\n/^Subject: hc-hold/ HOLD\n/^Subject: hc-discard/ DISCARD\n"
NODATA = 0x200  # SMFIP_NODATA: the milter is not sent DATA
F2B_MODES = ("normal", "more", "aggressive", "auth", "ddos", "rbl", "errors")


def peer_rcpt(address: str) -> bytes:
    """The relay peer: def@ deferred, bnc@ refused, anyone else accepted."""
    replies = {"def": b"450 4.2.0 mailbox busy", "bnc": b"550 5.1.1 no such user here"}
    return replies.get(address.strip("<>").partition("@")[0], b"250 2.1.5 Ok") + b"\r\n"


async def message(port: int, rcpts: list[str], subject: str, *, helo: str = "client.test",
                  sender: str = "s@sender.test") -> list[int | None]:
    """One session: the codes of MAIL, each RCPT, and DATA's end (when a recipient was accepted)."""
    c = await SmtpClient.connect(port)
    codes = [(await c.cmd(f"EHLO {helo}")).code, (await c.cmd(f"MAIL FROM:<{sender}>")).code]
    codes += [(await c.cmd(f"RCPT TO:<{rcpt}>")).code for rcpt in rcpts]
    if 250 in codes[2:]:
        assert (await c.cmd("DATA")).code == 354
        body = f"From: {sender}\r\nTo: {rcpts[0]}\r\nSubject: {subject}\r\n\r\n" + "x" * 500 + "\r\n."
        codes.append((await c.cmd(body)).code)
    assert (await c.cmd("QUIT")).code == 221
    await c.close()
    return codes


async def errors(port: int) -> None:
    """Unknown commands until the server hangs up (smtpd_hard_error_limit 3)."""
    c = await SmtpClient.connect(port)
    for _ in range(5):
        try:
            if (await c.cmd("FOO")).code is None:
                break
        except ConnectionError:
            break
    await c.close()


async def pipelining(port: int) -> None:
    """MAIL sent with HELO, before its reply (smtpd_forbid_unauth_pipelining: after HELO nothing may be)."""
    c = await SmtpClient.connect(port)
    await c.send(b"HELO client.test\r\nMAIL FROM:<s@sender.test>\r\n")
    assert await c.closed()
    await c.close()


async def timeout(port: int) -> None:
    c = await SmtpClient.connect(port)
    assert (await c.cmd("EHLO client.test")).code == 250
    assert await c.closed(timeout=10)
    await c.close()


async def lost(port: int) -> None:
    c = await SmtpClient.connect(port)
    assert (await c.cmd("EHLO client.test")).code == 250
    assert (await c.cmd("MAIL FROM:<s@sender.test>")).code == 250
    await c.close()


async def auth_failures(port: int) -> list[int | None]:
    """Two failed logins (PLAIN, then LOGIN) and an aborted one, in one session; the codes."""
    c = await SmtpClient.connect(port)
    codes = [(await c.cmd("EHLO client.test")).code]
    plain = base64.b64encode(b"\0alice@example.test\0wrong").decode()
    codes.append((await c.cmd(f"AUTH PLAIN {plain}")).code)
    codes.append((await c.cmd("AUTH LOGIN " + base64.b64encode(b"bob@example.test").decode())).code)
    codes.append((await c.cmd(base64.b64encode(b"wrong").decode())).code)
    codes.append((await c.cmd("AUTH LOGIN")).code)
    codes.append((await c.cmd("*")).code)
    codes.append((await c.cmd("QUIT")).code)
    await c.close()
    return codes



async def traffic(port: int) -> list:
    """Every session, one after the other; what the server answered."""
    got = [await message(port, ["ok@relay.test", "x@elsewhere.test", "nobody@relay.test"], "delivered"),
           await message(port, ["def@relay.test"], "deferred"),
           await message(port, ["bnc@relay.test"], "bounced"),
           await message(port, ["ok@relay.test"], "bad helo", helo="bad_host!"),
           await message(port, ["ok@relay.test"], "bad sender", sender="bad@sender.test"),
           await message(port, ["ok@relay.test"], "hc-reject"),
           await message(port, ["ok@relay.test"], "hc-hold"),
           await message(port, ["ok@relay.test"], "hc-discard"),
           await message(port, ["ok@relay.test", "def@relay.test"], "access hold", sender="hold@sender.test"),
           await message(port, ["ok@relay.test"], "access discard", sender="discard@sender.test")]
    await errors(port)
    await pipelining(port)
    got.append(await auth_failures(port))
    await lost(port)
    await timeout(port)
    return got


async def test_the_tools_read_both_logs_alike(mailflow_server, mail_log, tmp_path):
    pflogsumm, fail2ban_regex = require_tool("pflogsumm"), require_tool("fail2ban-regex")
    peer, sink = await ScriptedPeer({"RCPT": peer_rcpt}).start(), await ScriptedPeer({}).start()
    folder = Path(tempfile.mkdtemp(prefix="mailflow-log-"))
    os.chmod(folder, 0o755)
    (folder / "header").write_text(HEADER_CHECKS)
    transports = f"inline:{{relay.test=smtp:[127.0.0.1]:{peer.port}, sender.test=smtp:[127.0.0.1]:{sink.port}}}"
    known = "inline:{ok@relay.test=ok, def@relay.test=ok, bnc@relay.test=ok}"
    access = "inline:{bad@sender.test=REJECT, hold@sender.test=HOLD, discard@sender.test=DISCARD}"
    dovecot = contextlib.ExitStack()  # one Dovecot answers both servers' AUTH (plaintext on loopback)
    try:
        auth_socket = str(dovecot.enter_context(dovecot_instance()).auth_socket)
        async with postfix_instance({
            "myhostname": PF_HOST, "syslog_name": SYSLOG_NAME, "mydestination": "", "relay_domains": "relay.test",
            "relay_recipient_maps": known, "transport_maps": transports, "header_checks": f"regexp:{folder}/header",
            "maximal_queue_lifetime": "0", "bounce_queue_lifetime": "0", "queue_run_delay": "1s",
            "smtpd_helo_restrictions": "reject_invalid_helo_hostname",
            "smtpd_sender_restrictions": f"check_sender_access {access}",
            "smtpd_relay_restrictions": "reject_unauth_destination", "mynetworks": "192.0.2.0/24",
            "smtpd_hard_error_limit": "3", "smtpd_error_sleep_time": "0", "smtpd_timeout": "2s",
            "notify_classes": "", "smtpd_forbid_unauth_pipelining": "yes",
            "smtpd_sasl_auth_enable": "yes", "smtpd_sasl_type": "dovecot", "smtpd_sasl_path": auth_socket,
        }) as pf:
            mf = await mailflow_server(  # (no connection cache: Postfix's caches on demand, for a backlog, none here)
                myhostname=MF_HOST, mydestination=[], relay_domains=["relay.test"], relay_recipient_maps=[known],
                transport_maps=[transports], mynetworks=["192.0.2.0/24"],
                smtp={"tls_security_level": "none", "connection_cache_time_limit": "0s"},
                checks={"header_checks": [f"regexp:{folder}/header"]},
                queue={"maximal_queue_lifetime": "0s", "bounce_queue_lifetime": "0s"},
                smtpd={"helo_restrictions": ["reject_invalid_helo_hostname"],
                       "sender_restrictions": [f"check_sender_access {access}"],
                       "hard_error_limit": 3, "error_sleep_time": 0, "timeout": "2s", "sasl_auth_enable": True,
                       "sasl_type": "dovecot", "sasl_path": auth_socket, "allow_plaintext_auth_on_loopback": True,
                       "auth_failure_delay": 0})

            async def postfix_side() -> tuple[list, str]:
                started = await pf.sessions_ended()
                replies = await traffic(pf.port)
                await eventually(lambda: pf.maillog.count(": removed") >= 5, timeout=20)
                ended = await pf.sessions_ended()  # (the last session's disconnect line)
                return replies, pf.maillog[started:ended]

            async def mailflow_side() -> tuple[list, str]:
                replies = await traffic(mf.smtp_addresses[0][1])
                await eventually(lambda: mail_log.read_text().count(": removed") >= 5, timeout=20)
                await mf.stop()
                return replies, mail_log.read_text()

            # the servers share only the peers (which answer each session alike) and Dovecot: they run at once
            (pf_replies, pf_log), (mf_replies, mf_log) = await asyncio.gather(postfix_side(), mailflow_side())
    finally:
        await peer.stop()
        await sink.stop()
        shutil.rmtree(folder, ignore_errors=True)
        dovecot.close()
    assert mf_replies == pf_replies
    pf_file, mf_file = tmp_path / "pf.log", tmp_path / "mf.log"
    pf_file.write_text(pf_log)
    mf_file.write_text(mf_log)
    (pf_sum, pf_sections), (mf_sum, mf_sections) = await summary(pflogsumm, pf_file), await summary(pflogsumm, mf_file)
    assert {k: mf_sum[k] for k in COMPARED} == {k: pf_sum[k] for k in COMPARED}, (pf_log, mf_log)
    assert pf_sum["received"] == 8 and pf_sum["rejected"] == 5  # (the traffic did what it is meant to)
    assert (pf_sum["held"], pf_sum["discarded"]) == (2, 2)  # header_checks' and access tables', each once
    assert {k: mf_sections[k] for k in SECTIONS} == {k: pf_sections[k] for k in SECTIONS}, (pf_log, mf_log)
    assert agent_lines(mf_log, "smtp") == agent_lines(pf_log, "smtp")
    assert agent_lines(mf_log, "cleanup") == agent_lines(pf_log, "cleanup")
    assert [line for line in agent_lines(mf_log, "smtpd") if "pipelining" in line] == [
        line for line in agent_lines(pf_log, "smtpd") if "pipelining" in line]
    assert agent_lines(mf_log, "qmgr").count("QID: from=<s@sender.test>, status=expired, returned to sender") == 1
    found = {mode: await bans(fail2ban_regex, pf_file, mode) for mode in F2B_MODES}
    assert {mode: await bans(fail2ban_regex, mf_file, mode) for mode in F2B_MODES} == found
    assert {mode: len(found[mode]) for mode in ("normal", "aggressive", "auth")} == {
        "normal": 5, "aggressive": 9, "auth": 2}  # (what Postfix's log gives)


COMPARED = ("received", "delivered", "deferred", "bounced", "rejected", "held", "discarded")
SECTIONS = ("message deferral detail", "message bounce detail (by relay)", "message reject detail",
            "message reject warning detail", "message hold detail", "message discard detail",
            "Warnings", "Fatal Errors", "Panics")


def agent_lines(log: str, service: str) -> list[str]:
    """A service's lines, without their prefix, queue ids, delays and connection reuse (whether Postfix's smtp
    finds a cached connection is a matter of timing)."""
    lines = re.findall(rf"{SYSLOG_NAME}/{service}\[\d+\]: (.*)$", log, re.M)
    lines = [re.sub(r"\b[0-9A-F]{10,16}\b", "QID", re.sub(r"message-id=<.*>$", "message-id=<ID>", line))
             for line in lines]
    return sorted(re.sub(r"(, conn_use=\d+)?, delay=.*?dsn=", ", dsn=", line) for line in lines)


async def summary(pflogsumm: str, log: Path) -> tuple[dict[str, int], dict[str, str]]:
    """pflogsumm's grand totals (name -> count) and its sections (title -> "none", or the lines under the title's
    underline, sorted: pflogsumm lists equal counts in any order)."""
    rc, out = await run_tool(pflogsumm, f"--syslog-name={SYSLOG_NAME}", str(log))
    assert rc == 0, out
    totals = {name: int(count) for count, name in re.findall(r"^\s+(\d+)\s+(\w+)", out.split("Per-Hour")[0], re.M)}
    sections = dict(re.findall(r"^(\S[^\n:]*?)(?:: (none)|\n-+\n)", out, re.M))
    for title in sections:
        if not sections[title]:
            text = re.search(rf"^{re.escape(title)}\n-+\n(.*?)(?:\n\n|\Z)", out, re.M | re.S).group(1)
            sections[title] = "\n".join(sorted(text.splitlines()))
    return totals, sections


async def bans(fail2ban_regex: str, log: Path, mode: str) -> list[str]:
    """What fail2ban's stock postfix filter in `mode` matches: the lines, their prefix and queue ids masked."""
    rc, out = await run_tool(fail2ban_regex, "--print-all-matched", str(log), f"postfix[mode={mode}]")
    assert rc == 0, out
    section = out.partition("|- Matched line(s):\n")[2].partition("\n`-")[0]  # (not the missed lines after it)
    matched = [re.sub(r"^.*?postfix-mailflow/\w+\[\d+\]: ", "", line[4:]) for line in section.splitlines()]
    return sorted(re.sub(r"^([0-9A-F]+|NOQUEUE): ", "QID: ", line) for line in matched)



# ---------------------------------------------------------------------------------------- held mail, postsuper

HOLD_CHECKS = "/^Subject: hc-hold/ HOLD\n"


async def held_pair(port: int) -> list[list[int | None]]:
    """Two messages header_checks put on hold: the first is to be released, the second deleted."""
    return [await message(port, ["ok@relay.test"], "hc-hold release", sender="kept@sender.test"),
            await message(port, ["ok@relay.test"], "hc-hold delete", sender="dropped@other.test")]


def message_lines(log: str, qid: str) -> list[str]:
    """What the log says of one message, in order: `service: line`, its queue id, Message-ID, size, delays masked."""
    lines = re.findall(rf"{SYSLOG_NAME}/([\w/]+)\[\d+\]: {qid}: (.*)$", log, re.M)
    return [f"{service}: " + re.sub(r"size=\d+", "size=N", re.sub(r", delay=.*?dsn=", ", dsn=", re.sub(
        r"message-id=<.*>$", "message-id=<ID>", line))) for service, line in lines]


def test_the_line_readers_keep_a_relay_service_s_lines():
    """A line of master.cf's relay (`relay/smtp`, syslog_name=postfix/$service_name) is one of the message's, a
    result, a milter's: none is dropped on either side of a comparison."""
    log = (f"Dec  6 06:30:00 host {SYSLOG_NAME}/relay/smtp[7]: 0123456789AB: to=<u@relay.test>, relay=none, "
           "delay=1, delays=0/0/1/0, dsn=4.4.1, status=deferred (connect to x: Connection refused)\n"
           f"Dec  6 06:30:00 host {SYSLOG_NAME}/relay/smtp[7]: 0123456789AB: milter-discard: END-OF-MESSAGE\n")
    assert message_lines(log, "0123456789AB") == [
        "relay/smtp: to=<u@relay.test>, relay=none, dsn=4.4.1, status=deferred (connect to x: Connection refused)",
        "relay/smtp: milter-discard: END-OF-MESSAGE"]
    assert [line.split(":")[0] for line in delivery_lines(log)["u@relay.test"]] == ["relay/smtp"]
    assert milter_lines(log) == ["relay/smtp: QID: milter-discard: END-OF-MESSAGE"]


def held_ids(log: str) -> list[str]:
    return re.findall(r"\b([0-9A-F]{10,16}): hold: header Subject: hc-hold", log)


async def test_held_mail_released_or_deleted_is_logged_as_postfix_logs_it(mailflow_server, mail_log, write_config,
                                                                          tmp_path):
    """Held on arrival (header_checks HOLD), then released and delivered, or deleted: the same lines in the same
    order for each message (postsuper's, and qmgr's `from=` only once the message enters the active queue), the
    same postsuper summaries, and pflogsumm counts the same: received, held, delivered, and senders (the one
    deleted is no sender it counts)."""
    pflogsumm = require_tool("pflogsumm")
    peer = await ScriptedPeer({}).start()
    folder = Path(tempfile.mkdtemp(prefix="mailflow-log-"))
    os.chmod(folder, 0o755)
    (folder / "header").write_text(HOLD_CHECKS)
    transports = f"inline:{{relay.test=smtp:[127.0.0.1]:{peer.port}}}"
    try:
        async with postfix_instance({
            "myhostname": PF_HOST, "syslog_name": SYSLOG_NAME, "mydestination": "", "relay_domains": "relay.test",
            "transport_maps": transports, "header_checks": f"regexp:{folder}/header", "queue_run_delay": "1s",
            "notify_classes": "",
        }) as pf:
            started = await pf.sessions_ended()
            pf_replies = await held_pair(pf.port)
            await eventually(lambda: len(held_ids(pf.maillog)) == 2, timeout=10)
            released, deleted = held_ids(pf.maillog[started:])
            for flag, qid in (("-H", released), ("-d", deleted)):
                assert pf.run("postsuper", flag, qid).returncode == 0
            await eventually(lambda: f"{released}: removed" in pf.maillog, timeout=10)
            pf_log = pf.maillog[started:]
            pf_ids = released, deleted
        settings = dict(myhostname=MF_HOST, mydestination=[], relay_domains=["relay.test"],
                        transport_maps=[transports], smtp={"tls_security_level": "none"},
                        checks={"header_checks": [f"regexp:{folder}/header"]})
        mf = await mailflow_server(**settings)
        config = write_config(tmp_path / "mailflow.toml", log={"file": str(mail_log)}, **settings)
        mf_replies = await held_pair(mf.smtp_addresses[0][1])
        released, deleted = held_ids(mail_log.read_text())
        for action, qid in (("release", released), ("delete", deleted)):
            rc, out = await run_tool(sys.executable, "-m", "mailflow", "queue", action, qid, "-c", str(config))
            assert rc == 0, out
        await eventually(lambda: f"qmgr[{os.getpid()}]: {released}: removed" in mail_log.read_text(), timeout=10)
        await mf.stop()
        mf_log = mail_log.read_text()
        mf_ids = released, deleted
    finally:
        await peer.stop()
        shutil.rmtree(folder, ignore_errors=True)
    assert mf_replies == pf_replies
    for pf_id, mf_id in zip(pf_ids, mf_ids):
        assert message_lines(mf_log, mf_id) == message_lines(pf_log, pf_id), (pf_log, mf_log)
    assert message_lines(pf_log, pf_ids[0])[3:5] == [
        "postsuper: released from hold", "qmgr: from=<kept@sender.test>, size=N, nrcpt=1 (queue active)"]
    assert agent_lines(mf_log, "postsuper") == agent_lines(pf_log, "postsuper")
    pf_file, mf_file = tmp_path / "pf.log", tmp_path / "mf.log"
    pf_file.write_text(pf_log)
    mf_file.write_text(mf_log)
    (pf_sum, pf_sections), (mf_sum, mf_sections) = await summary(pflogsumm, pf_file), await summary(pflogsumm, mf_file)
    assert {k: mf_sum[k] for k in HELD_COMPARED} == {k: pf_sum[k] for k in HELD_COMPARED}, (pf_log, mf_log)
    assert (pf_sum["received"], pf_sum["held"], pf_sum["delivered"], pf_sum["senders"]) == (2, 2, 1, 1)
    assert {k: mf_sections[k] for k in HELD_SECTIONS} == {k: pf_sections[k] for k in HELD_SECTIONS}


HELD_COMPARED = ("received", "delivered", "held", "discarded", "senders", "sending", "recipients", "recipient")
HELD_SECTIONS = ("message hold detail", "Senders by message count", "Recipients by message count")


async def kick_pickup(pf) -> None:
    """`postkick public pickup W`, as Postfix's postsuper leaves pickup to its next poll. The kick can die of
    SIGPIPE when pickup closes its FIFO between postkick's open and write (pickup's own turn); it is sent again."""
    async def kicked() -> bool:
        return (await asyncio.to_thread(pf.run, "postkick", "public", "pickup", "W")).returncode == 0
    await eventually(kicked, timeout=10, step=0.1, what="postkick public pickup W succeeded")


def requeued_lines(log: str, old: str) -> tuple[list[str], list[str]]:
    """The lines of a requeued message and of its copy: pickup's uid (Postfix's mail owner, mailflow's user), the
    old id it names and a cached connection's use count (the connection cache is not what is compared here)
    masked. The old message's lines are sorted: the order of one SMTP transaction's `to=` lines is no requeue's."""
    new = re.search(rf": ([0-9A-Za-z]+): uid=\d+ from=<[^>]*> orig_id={old}$", log, re.M)
    assert new, log
    copy = [re.sub(r"uid=\d+", "uid=N", line.replace(", conn_use=2", "").replace(old, "OLD"))
            for line in message_lines(log, new[1])]
    return sorted(message_lines(log, old)), copy


async def test_requeued_mail_is_logged_under_a_new_queue_id_as_postfix_logs_it(mailflow_server, mail_log,
                                                                               write_config, tmp_path):
    """postsuper -r, `mailflow queue requeue`: a message with one recipient delivered and one deferred is requeued;
    the old id ends with postsuper's `requeued` (no `removed`), the copy's lines begin with pickup's `uid=N
    from=<s> orig_id=OLD`, then cleanup's `message-id=` and qmgr's `from=` counting only the recipient still
    pending, which is tried again; the same lines for both servers. (Postfix's pickup is kicked here, as its
    postsuper leaves it to pickup's next poll; mailflow's tools wake pickup.)"""
    peer = await ScriptedPeer({"RCPT": peer_rcpt}).start()
    transports = f"inline:{{relay.test=smtp:[127.0.0.1]:{peer.port}}}"
    rcpts = ["ok@relay.test", "def@relay.test"]
    deferred = "to=<def@relay.test>"
    try:
        async with postfix_instance({
            "myhostname": PF_HOST, "syslog_name": SYSLOG_NAME, "mydestination": "", "relay_domains": "relay.test",
            "transport_maps": transports, "notify_classes": "", "delay_warning_time": "0",
        }) as pf:
            started = await pf.sessions_ended()
            pf_replies = await message(pf.port, rcpts, "requeued")
            # the attempt over (in the deferred queue): Postfix's postsuper -r would move the file of an active
            # message at once, and a recipient delivered after that is delivered again from the copy
            await eventually(lambda: any(m["queue_name"] == "deferred" for m in pf.listed()), timeout=10)
            [old] = re.findall(r": ([0-9A-F]+): client=", await pf.logged(": client=", since=started))
            assert pf.run("postsuper", "-r", old).returncode == 0
            await kick_pickup(pf)
            await eventually(lambda: pf.maillog[started:].count(deferred) == 2, timeout=10)
            pf_lines = requeued_lines(pf.maillog[started:], old)
        # no retry of its own before the requeue, whatever the tool's start-up takes (Postfix's first is 300 s away)
        no_retry = {"queue_run_delay": "1h", "minimal_backoff_time": "1h", "maximal_backoff_time": "1h"}
        settings = dict(myhostname=MF_HOST, mydestination=[], relay_domains=["relay.test"],
                        transport_maps=[transports], smtp={"tls_security_level": "none"}, queue=no_retry)
        mf = await mailflow_server(**settings)
        config = write_config(tmp_path / "mailflow.toml", log={"file": str(mail_log)}, **settings)
        mf_replies = await message(mf.smtp_addresses[0][1], rcpts, "requeued")
        await eventually(lambda: deferred in mail_log.read_text(), timeout=10)
        [old] = re.findall(r": ([0-9A-F]+): client=", mail_log.read_text())
        rc, out = await run_tool(sys.executable, "-m", "mailflow", "queue", "requeue", old, "-c", str(config))
        assert rc == 0, out
        await eventually(lambda: mail_log.read_text().count(deferred) == 2, timeout=10)
        await mf.stop()
        mf_lines = requeued_lines(mail_log.read_text(), old)
    finally:
        await peer.stop()
    assert mf_replies == pf_replies
    assert mf_lines == pf_lines
    assert "postsuper: requeued" in pf_lines[0] and not [line for line in pf_lines[0] if "removed" in line]
    assert pf_lines[1][:3] == ["pickup: uid=N from=<s@sender.test> orig_id=OLD", "cleanup: message-id=<ID>",
                               "qmgr: from=<s@sender.test>, size=N, nrcpt=1 (queue active)"]


async def test_old_mail_requeued_is_deferred_again_not_returned_as_postfix_resets_its_lifetime(
        mailflow_server, mail_log, write_config, tmp_path):
    """postsuper -r resets the expiration schedule (Postfix HISTORY 20060313: cleanup writes the copy a new
    create_time, which qmgr's queue lifetime counts from): a deferred message older than maximal_queue_lifetime
    (3 s here), requeued, is tried again and deferred, not returned (`status=expired, returned to sender`); the
    copy's lines are the same for both servers."""
    peer = await ScriptedPeer({"RCPT": peer_rcpt}).start()
    transports = f"inline:{{relay.test=smtp:[127.0.0.1]:{peer.port}}}"
    slow = {"maximal_queue_lifetime": "3s", "bounce_queue_lifetime": "3s", "queue_run_delay": "1h",
            "minimal_backoff_time": "1h", "maximal_backoff_time": "1h"}
    deferred = "to=<def@relay.test>"

    async def postfix_side() -> tuple[str, list[list[str]]]:
        async with postfix_instance({
            "myhostname": PF_HOST, "syslog_name": SYSLOG_NAME, "mydestination": "", "relay_domains": "relay.test",
            "transport_maps": transports, "notify_classes": "", "delay_warning_time": "0", **slow,
        }) as pf:
            async def tool(*argv: str):  # in a thread: mailflow's side shares this loop
                return await asyncio.to_thread(pf.run, *argv)

            started = await pf.sessions_ended()
            await message(pf.port, ["def@relay.test"], "old")

            async def deferred_listed() -> bool:
                listed = postqueue_listed((await tool("postqueue", "-j")).stdout)
                return any(message["queue_name"] == "deferred" for message in listed)
            await eventually(deferred_listed, timeout=10, step=0.1)
            [old] = re.findall(r": ([0-9A-F]+): client=", await pf.logged(": client=", since=started))
            await asyncio.sleep(4)  # older than its lifetime now (Postfix counts whole seconds: 4 > 3 whatever)
            assert (await tool("postsuper", "-r", old)).returncode == 0
            assert (await tool("postkick", "public", "pickup", "W")).returncode == 0
            await eventually(lambda: pf.maillog[started:].count(deferred) == 2, timeout=10)
            await asyncio.sleep(0.5)  # (an expiry would be logged right after the attempt's line)
            flushed = await pf.flushed()  # (every line sent meanwhile is in, postlogd late or not)
            pf_log = pf.maillog[started:flushed]
            return pf_log, requeued_lines(pf_log, old)

    async def mailflow_side() -> tuple[str, list[list[str]]]:
        settings = dict(myhostname=MF_HOST, mydestination=[], relay_domains=["relay.test"],
                        transport_maps=[transports], smtp={"tls_security_level": "none"}, queue=slow)
        mf = await mailflow_server(**settings)
        config = write_config(tmp_path / "mailflow.toml", log={"file": str(mail_log)}, **settings)
        await message(mf.smtp_addresses[0][1], ["def@relay.test"], "old")
        await eventually(lambda: deferred in mail_log.read_text(), timeout=10)
        [old] = re.findall(r": ([0-9A-F]+): client=", mail_log.read_text())
        await asyncio.sleep(4)
        rc, out = await run_tool(sys.executable, "-m", "mailflow", "queue", "requeue", old, "-c", str(config))
        assert rc == 0, out
        await eventually(lambda: mail_log.read_text().count(deferred) == 2, timeout=10)
        await asyncio.sleep(0.5)
        await mf.stop()
        mf_log = mail_log.read_text()
        return mf_log, requeued_lines(mf_log, old)

    try:  # the two sides share only the peer, which answers each session alike: they run at once
        (pf_log, pf_lines), (mf_log, mf_lines) = await asyncio.gather(postfix_side(), mailflow_side())
    finally:
        await peer.stop()
    assert "status=expired" not in pf_log and "status=expired" not in mf_log, (pf_log, mf_log)
    assert mf_lines[1] == pf_lines[1]
    [result] = [line for line in pf_lines[1] if "status=" in line]  # the copy: tried once, deferred, kept
    assert "status=deferred" in result, pf_lines[1]


# ---------------------------------------------------------------------------------------------- the queue id


async def refusals_around_an_accepted_recipient(port: int) -> tuple[list[str], str]:
    """A MAIL whose SIZE is past message_size_limit, refusals before, after and without an accepted recipient, an
    access WARN after one, a refusal at the end of the message and a queued message: the replies from MAIL on,
    queue ids masked; the queued message's id. (RSET after the SIZE refusal: Postfix 3.7 keeps a refused SIZE
    until then, so a MAIL without SIZE would be refused too; mailflow judges each MAIL by its own parameters.)"""
    c = await SmtpClient.connect(port)
    replies = [await c.cmd(command) for command in (
        "EHLO client.test", "MAIL FROM:<big@sender.test> SIZE=20000000", "RSET",
        "MAIL FROM:<s@sender.test>", "RCPT TO:<x@elsewhere.test>", "RCPT TO:<ok@relay.test>",
        "RCPT TO:<x@elsewhere.test>", "RCPT TO:<nobody@relay.test>", "RCPT TO:<warn@relay.test>", "RSET",
        "MAIL FROM:<s@sender.test>", "RCPT TO:<nobody@relay.test>", "RSET",
        "MAIL FROM:<eod@sender.test>", "RCPT TO:<ok@relay.test>", "DATA", "Subject: refused\r\n\r\nx\r\n.", "RSET",
        "MAIL FROM:<s@sender.test>", "RCPT TO:<ok@relay.test>", "DATA", "Subject: queued\r\n\r\nx\r\n.", "QUIT")]
    await c.close()
    queued_as = replies[-2].text.rpartition(" ")[2]
    return [re.sub(r"\b[0-9A-F]{10,16}\b", "QID", r.text) for r in replies[1:]], queued_as


def transaction_lines(log: str) -> list[str]:
    """smtpd's lines that name a transaction (`client=`, `reject:`, `warn:`, the access actions' `hold:`, `discard:`,
    `redirect:`, `bcc:`, `filter:`), in order, a queue id masked as QID (NOQUEUE stays); each QID checked to be the
    one the transaction's `client=` line named."""
    lines = [line for line in re.findall(rf"{SYSLOG_NAME}/smtpd\[\d+\]: (.*)$", log, re.M)
             if re.match(r"\S+: (client=|reject:|warn:|hold:|discard:|redirect:|bcc:|filter:)", line)]
    current = None
    for line in lines:
        queue_id = line.partition(":")[0]
        if line.startswith(f"{queue_id}: client="):
            current = queue_id
        elif queue_id != "NOQUEUE":
            assert queue_id == current, lines
    return [re.sub(r"^[0-9A-F]{10,16}:", "QID:", line) for line in lines]


async def test_a_transaction_is_named_by_its_queue_id_from_its_first_accepted_recipient(mailflow_server, mail_log):
    """Postfix's smtpd opens its queue file at the first accepted RCPT: from there on the transaction's log lines
    (refusals, access WARN, the end of the message) carry its queue id, `QID: client=` comes there, and a
    transaction reset before taking a recipient is NOQUEUE again."""
    sink = await ScriptedPeer({}).start()
    known = "inline:{ok@relay.test=ok, warn@relay.test=ok}"
    warn = "inline:{ {warn@relay.test=WARN careful} }"
    eod = "inline:{ {eod@sender.test=REJECT no end} }"
    transports = f"inline:{{relay.test=smtp:[127.0.0.1]:{sink.port}}}"
    try:
        async with postfix_instance({
            "myhostname": PF_HOST, "syslog_name": SYSLOG_NAME, "mydestination": "", "relay_domains": "relay.test",
            "relay_recipient_maps": known, "transport_maps": transports, "mynetworks": "192.0.2.0/24",
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_recipient_restrictions": f"check_recipient_access {warn}",
            "smtpd_end_of_data_restrictions": f"check_sender_access {eod}", "smtpd_error_sleep_time": "0",
        }) as pf:
            started = await pf.sessions_ended()
            pf_replies = await refusals_around_an_accepted_recipient(pf.port)
            ended = await pf.sessions_ended()
            pf_log = pf.maillog[started:ended]
        mf = await mailflow_server(
            myhostname=MF_HOST, mydestination=[], relay_domains=["relay.test"], relay_recipient_maps=[known],
            transport_maps=[transports], mynetworks=["192.0.2.0/24"], smtp={"tls_security_level": "none"},
            smtpd={"recipient_restrictions": [f"check_recipient_access {warn}"],
                   "end_of_data_restrictions": [f"check_sender_access {eod}"], "error_sleep_time": 0})
        mf_replies = await refusals_around_an_accepted_recipient(mf.smtp_addresses[0][1])
        await eventually(lambda: "disconnect from" in mail_log.read_text(), timeout=10)
        mf_log = mail_log.read_text()
    finally:
        await sink.stop()
    assert mf_replies[0] == pf_replies[0]
    assert transaction_lines(mf_log) == transaction_lines(pf_log), (pf_log, mf_log)
    assert [line.partition(":")[0] for line in transaction_lines(pf_log)] == [
        "NOQUEUE", "NOQUEUE", "QID", "QID", "QID", "QID", "NOQUEUE", "QID", "QID", "QID"]  # (the traffic did that)
    assert f"{mf_replies[1]}: client=localhost[127.0.0.1]" in mf_log  # the id the 250 named, as Postfix's does
    assert f"{pf_replies[1]}: client=localhost[127.0.0.1]" in pf_log


SIZE_LIMIT = 2000


async def too_big_then_queued(port: int) -> list[str]:
    """A message past message_size_limit (DATA: its size is known only as it is read), then one within it; the
    replies from MAIL on."""
    c = await SmtpClient.connect(port)
    replies = []
    for subject, lines in (("big", 30), ("small", 1)):
        for command in ("HELO client.test", "MAIL FROM:<s@sender.test>", "RCPT TO:<ok@relay.test>", "DATA",
                        f"Subject: {subject}\r\n\r\n" + "\r\n".join(["x" * 100] * lines) + "\r\n."):
            replies.append((await c.cmd(command)).text)
    await c.cmd("QUIT")
    await c.close()
    return [re.sub(r"\b[0-9A-F]{10,16}\b", "QID", reply) for reply in replies]


def size_lines(log: str) -> list[str]:
    """smtpd's `client=` and `queue file size limit exceeded` lines, the queue id masked (the warning's checked to
    be the one the client= line before it named)."""
    lines = re.findall(rf"{SYSLOG_NAME}/smtpd\[\d+\]: (.*(?:client=|queue file size limit).*)$", log, re.M)
    for before, line in zip(lines, lines[1:]):
        if "size limit" in line:
            assert line.split()[1] == before.split()[0], lines
    return [re.sub(r"\b[0-9A-F]{10,16}:", "QID:", line) for line in lines]


async def test_a_message_past_the_size_limit_is_logged_as_postfix_logs_it(mailflow_server, mail_log):
    """Postfix's smtpd writes `warning: QID: queue file size limit exceeded` (the queue id its client= line named)
    for content past message_size_limit; mailflow's wrote nothing."""
    known = "inline:{ok@relay.test=ok}"
    async with postfix_instance({"myhostname": PF_HOST, "syslog_name": SYSLOG_NAME, "mydestination": "",
                                 "relay_domains": "relay.test", "relay_recipient_maps": known,
                                 "relayhost": "[127.0.0.1]:9", "message_size_limit": str(SIZE_LIMIT)}) as pf:
        started = await pf.sessions_ended()
        pf_replies = await too_big_then_queued(pf.port)
        ended = await pf.sessions_ended()
        pf_lines = size_lines(pf.maillog[started:ended])
    mf = await mailflow_server(myhostname=MF_HOST, mydestination=[], relay_domains=["relay.test"],
                               relay_recipient_maps=[known], smtpd={"message_size_limit": SIZE_LIMIT})
    mf_replies = await too_big_then_queued(mf.smtp_addresses[0][1])
    await eventually(lambda: "disconnect from" in mail_log.read_text(), timeout=10)
    assert [r.replace(MF_HOST, "HOST") for r in mf_replies] == [r.replace(PF_HOST, "HOST") for r in pf_replies]
    assert size_lines(mail_log.read_text()) == pf_lines == [
        "QID: client=localhost[127.0.0.1]", "warning: QID: queue file size limit exceeded",
        "QID: client=localhost[127.0.0.1]"]


# ---------------------------------------------------------------------------------------------- access actions

SENDER_ACTIONS = "inline:{ {hold@sender.test=HOLD}, {bcc@sender.test=BCC copy@relay.test}, " \
    "{redirect@sender.test=REDIRECT other@relay.test}, {filter@sender.test=FILTER smtp:[127.0.0.1]:{port}}, " \
    "{cls@sender.test=held_class} }"
RECIPIENT_ACTIONS = "inline:{ {hold@relay.test=HOLD held text}, {bcc@relay.test=BCC copy@relay.test}, " \
    "{discard@relay.test=DISCARD} }"
END_OF_DATA_ACTIONS = "inline:{ {eodhold@sender.test=HOLD held at the end}, {eoddiscard@sender.test=DISCARD} }"
BCC_QUEUED = re.compile(r"from=<bcc@sender\.test>, size=\d+, nrcpt=(\d+) \(queue active\)")
POLICY_ANSWERS = {"phold": "HOLD held by policy", "pbcc": "BCC pcopy@relay.test"}  # by the recipient's local part
TRANSACTIONS = (  # (sender, recipients) of each transaction of one session, each ended with DATA when one is taken
    ("hold@sender.test", ["x@elsewhere.test", "a@relay.test", "b@relay.test"]),  # held at a refused RCPT, once
    ("bcc@sender.test", ["a@relay.test", "b@relay.test"]),  # at every RCPT: NOQUEUE, then the queue id
    ("redirect@sender.test", ["a@relay.test", "b@relay.test"]),
    ("filter@sender.test", ["a@relay.test"]),
    ("cls@sender.test", ["a@relay.test"]),  # a restriction class's HOLD
    ("s@sender.test", ["a@relay.test", "hold@relay.test", "bcc@relay.test", "discard@relay.test", "b@relay.test"]),
    ("s@sender.test", ["phold@relay.test", "pbcc@relay.test"]),  # a policy service's answers
    ("eodhold@sender.test", ["a@relay.test"]),  # end_of_data_restrictions: END-OF-MESSAGE
    ("eoddiscard@sender.test", ["a@relay.test", "b@relay.test"]),
)


async def access_actions(port: int) -> list[int | None]:
    """TRANSACTIONS in one session, RSET between them; the reply codes."""
    c = await SmtpClient.connect(port)
    codes = [(await c.cmd("EHLO client.test")).code]
    for sender, rcpts in TRANSACTIONS:
        codes.append((await c.cmd(f"MAIL FROM:<{sender}>")).code)
        codes += [(await c.cmd(f"RCPT TO:<{rcpt}>")).code for rcpt in rcpts]
        if 250 in codes[-len(rcpts):]:
            assert (await c.cmd("DATA")).code == 354
            codes.append((await c.cmd("Subject: access action\r\n\r\nx\r\n.")).code)
        codes.append((await c.cmd("RSET")).code)
    assert (await c.cmd("QUIT")).code == 221
    await c.close()
    return codes


async def test_access_actions_are_logged_where_postfix_logs_them(mailflow_server, mail_log):
    """Postfix's smtpd logs an access table's (a restriction class's, a policy service's) HOLD, DISCARD, REDIRECT,
    BCC and FILTER when it meets the action, at the command (check_table_result): `NOQUEUE: hold: RCPT from …:
    <hold@sender.test>: Sender address triggers HOLD action; from=<…> to=<…> …`, the queue id once the transaction
    has one; HOLD once per message and DISCARD once (the checks stop), the others each time they are met; in
    end_of_data_restrictions at END-OF-MESSAGE. Nothing more at the end of the message."""
    sink = await ScriptedPeer({}).start()
    transports = f"inline:{{relay.test=smtp:[127.0.0.1]:{sink.port}}}"
    senders = SENDER_ACTIONS.replace("{port}", str(sink.port))
    classes = {"held_class": ["check_sender_access inline:{ {cls@sender.test=HOLD class held} }"]}
    try:
        async with ScriptedPolicy(POLICY_ANSWERS) as policy:
            lists = {"sender": [f"check_sender_access {senders}"],
                     "recipient": [f"check_recipient_access {RECIPIENT_ACTIONS}",
                                   f"check_policy_service {policy.spec}"],
                     "end_of_data": [f"check_sender_access {END_OF_DATA_ACTIONS}"]}
            async with postfix_instance({
                "myhostname": PF_HOST, "syslog_name": SYSLOG_NAME, "mydestination": "", "relay_domains": "relay.test",
                "transport_maps": transports, "mynetworks": "192.0.2.0/24",
                "smtpd_relay_restrictions": "reject_unauth_destination", "smtpd_error_sleep_time": "0",
                "smtpd_restriction_classes": "held_class", **{k: ", ".join(v) for k, v in classes.items()},
                **{f"smtpd_{stage}_restrictions": ", ".join(items) for stage, items in lists.items()},
            }) as pf:
                started = await pf.sessions_ended()
                pf_replies = await access_actions(pf.port)
                await eventually(lambda: BCC_QUEUED.search(pf.maillog), timeout=10)
                ended = await pf.sessions_ended()
                pf_log = pf.maillog[started:ended]
            mf = await mailflow_server(
                myhostname=MF_HOST, mydestination=[], relay_domains=["relay.test"], transport_maps=[transports],
                mynetworks=["192.0.2.0/24"], smtp={"tls_security_level": "none"},
                smtpd={"error_sleep_time": 0, "restriction_classes": classes,
                       **{f"{stage}_restrictions": items for stage, items in lists.items()}})
            mf_replies = await access_actions(mf.smtp_addresses[0][1])
            await eventually(lambda: "disconnect from" in (text := mail_log.read_text()) and BCC_QUEUED.search(text),
                             timeout=10)
            mf_log = mail_log.read_text()
    finally:
        await sink.stop()
    assert mf_replies == pf_replies
    assert transaction_lines(mf_log) == transaction_lines(pf_log), (pf_log, mf_log)
    # what Postfix logged, so that the same mistake on both sides cannot pass unnoticed
    pf_lines = transaction_lines(pf_log)
    assert pf_lines[0] == "NOQUEUE: hold: RCPT from localhost[127.0.0.1]: <hold@sender.test>: Sender address " \
        "triggers HOLD action; from=<hold@sender.test> to=<x@elsewhere.test> proto=ESMTP helo=<client.test>"
    assert [line.partition(" from ")[0] for line in pf_lines if " client=" not in line] == [
        "NOQUEUE: hold: RCPT", "NOQUEUE: reject: RCPT", "NOQUEUE: bcc: RCPT", "QID: bcc: RCPT",
        "NOQUEUE: redirect: RCPT", "QID: redirect: RCPT", "NOQUEUE: filter: RCPT", "NOQUEUE: hold: RCPT",
        "QID: hold: RCPT", "QID: bcc: RCPT", "QID: discard: RCPT", "NOQUEUE: hold: RCPT", "QID: bcc: RCPT",
        "QID: hold: END-OF-MESSAGE", "QID: discard: END-OF-MESSAGE"]
    # deliberate (docs/security.md): the sender's BCC met at two RCPTs is one copy; Postfix lists it twice
    assert (BCC_QUEUED.search(pf_log).group(1), BCC_QUEUED.search(mf_log).group(1)) == ("4", "3")


# ---------------------------------------------------------------------------------------------- a delivery line

DELIVERIES = [["alice@local.test"], ["fwd@local.test"], ["mixed@local.test"], ["ok@relay.test", "ok2@relay.test"],
              ["ok3@relay.test"], ["def@def.test"], ["bnc@bnc.test"], ["p@pipe.test"], ["ref@refused.test"],
              ["dis@dis.test"], ["later@later.test", "alice@local.test"]]
LINES = {"later@later.test": 2}  # deferred, then sent on the retry; one line each for the others (alice's first)
# Postfix's smtp(8) puts its session in the connection cache after it has logged the results: the next message to
# the same place waits a moment, or it would race for it (mailflow's cache holds it 0.8 s here)
PAUSE = {"ok3@relay.test": 0.2}
# What Postfix's format_tv writes for `delay=` and each of `delays=` (two significant digits, 10 ms resolution):
# 0, 0.01…0.99 without a trailing zero, 1…9.9 with one decimal at most, whole seconds from 10
TIME = re.compile(r"0|0\.\d?[1-9]|[1-9](?:\.[1-9])?|[1-9]\d+")


def delivery_lines(log: str) -> dict[str, list[str]]:
    """Each recipient's result lines in order, `service: to=<r>, …` (no prefix, no queue id), by the address
    the client gave (orig_to when there is one), in lower case."""
    found: dict[str, list[str]] = {}
    for service, line in re.findall(rf"{SYSLOG_NAME}/([\w/]+)\[\d+\]: [0-9A-F]+: (to=<.*)$", log, re.M):
        given = re.match(r"to=<([^>]*)>(?:, orig_to=<([^>]*)>)?", line)
        found.setdefault((given[2] or given[1]).lower(), []).append(f"{service}: {line}")
    return found


def timed(line: str) -> str:
    """The line with each time of `delay=` and `delays=` masked as T when it is written as format_tv writes it
    (left as it is, in <…?>, when not)."""
    def mask(m: re.Match) -> str:
        return m[1] + "/".join("T" if TIME.fullmatch(v) else f"<{v}?>" for v in m[2].split("/"))
    return re.sub(r"\b(delays?=)([^,]*)", mask, line)


async def deliveries(port: int, read_log) -> dict[str, list[str]]:
    """DELIVERIES one message after the other, each once the one before has its lines (so that what runs at once
    or reuses a connection is the same for both servers); the lines LINES asks of each recipient."""
    for rcpts in DELIVERIES:
        await asyncio.sleep(PAUSE.get(rcpts[0], 0))
        await message(port, rcpts, "timed")
        await eventually(lambda: set(rcpts) <= set(delivery_lines(read_log())), timeout=10)
    await eventually(lambda: len(delivery_lines(read_log())["later@later.test"]) >= 2, timeout=20)
    return {rcpt: lines[:LINES.get(rcpt, 1)] for rcpt, lines in delivery_lines(read_log()).items()}


async def test_a_delivery_line_has_postfix_fields_and_time_formats(mailflow_server, mail_log):
    """Postfix's log_adhoc line, `to=<r>[, orig_to=<o>], relay=…[, conn_use=N], delay=T, delays=a/b/c/d, dsn=…,
    status=… (text)`, compared word for word, the times masked only as to their value (each must be written as
    format_tv writes it): local delivery (an alias to a file, and through virtual aliases: orig_to, none where the
    alias only changes the case), a relayed message with two recipients and the next one over the same
    connection (conn_use), a deferral (450), a bounce (550), a pipe service, and a message deferred then sent on
    its retry, whose delay and `a` count the time it waited; and the program each line is written as: the
    delivery agent's, also where it reached no peer (a refused connection: smtp; discard:), as pflogsumm
    groups deferrals by it. Postfix caches the relay's connection
    (smtp_connection_cache_destinations names its address, 127.0.0.2, which no other peer has); mailflow caches
    every session, for 0.8 s here, so that the retry, a second later, takes a new one in both."""
    attempts = {"later": 0}

    def later(address: str) -> bytes:
        attempts["later"] += 1
        return b"450 4.2.0 try later\r\n" if attempts["later"] == 1 else b"250 2.1.5 Ok\r\n"

    hosts = {"relay": "127.0.0.2"}
    peers = {name: await ScriptedPeer(script).start(hosts.get(name, "127.0.0.1")) for name, script in (
        ("relay", {}), ("def", {"RCPT": b"450 4.2.0 mailbox busy\r\n"}),
        ("bnc", {"RCPT": b"550 5.1.1 no such user here\r\n"}), ("later", {"RCPT": later}))}
    routes = ", ".join(f"{{{name}.test=smtp:[{hosts.get(name, '127.0.0.1')}]:{peer.port}}}"
                       for name, peer in peers.items())
    transports = (f"inline:{{ {routes}, {{pipe.test=pdel:}}, {{sender.test=discard:}}, {{dis.test=discard:dropped}}, "
                  f"{{refused.test=smtp:[127.0.0.1]:{free_port()}}} }}")
    aliases = "inline:{ {alice=/dev/null}, {mixed=/dev/null} }"
    virtual = "inline:{ {fwd@local.test=alice@local.test}, {mixed@local.test=Mixed@local.test} }"
    relayed = [f"{name}.test" for name in peers] + ["pipe.test", "refused.test", "dis.test"]
    try:
        with script_dir() as d:
            command = d.script("deliver.sh", "cat > /dev/null\n")
            async with postfix_instance({
                "myhostname": PF_HOST, "syslog_name": SYSLOG_NAME, "mydestination": "local.test",
                "relay_domains": ", ".join(relayed), "transport_maps": transports, "alias_maps": aliases,
                "virtual_alias_maps": virtual, "queue_run_delay": "1s", "minimal_backoff_time": "1s",
                "maximal_backoff_time": "2s", "smtp_connection_cache_destinations": "127.0.0.2",
            }, master_cf=f"pdel unix - n n - - pipe user=nobody argv={command}\n") as pf:
                started = await pf.sessions_ended()
                pf_lines = await deliveries(pf.port, lambda: pf.maillog[started:])
                pf_log = pf.maillog[started:]
            attempts["later"] = 0
            mf = await mailflow_server(
                myhostname=MF_HOST, mydestination=["local.test"], relay_domains=relayed, transport_maps=[transports],
                alias_maps=[aliases], virtual_alias_maps=[virtual], local_recipient_maps=[],
                smtp={"tls_security_level": "none", "connection_cache_time_limit": "0.8s"},
                pipe={"pdel": {"argv": [str(command)], "user": "nobody"}})
            mf_lines = await deliveries(mf.smtp_addresses[0][1], mail_log.read_text)
    finally:
        for peer in peers.values():
            await peer.stop()
    assert {r: [timed(line) for line in lines] for r, lines in mf_lines.items()} == {
        r: [timed(line) for line in lines] for r, lines in pf_lines.items()}, (pf_lines, mf_lines)
    assert pf_lines["p@pipe.test"][0].startswith("pipe: to=<p@pipe.test>, relay=pdel, delay=")
    assert ", conn_use=2, delay=" in pf_lines["ok3@relay.test"][0]
    assert [pf_lines[r][0].partition(":")[0] for r in ("ref@refused.test", "dis@dis.test")] == [
        "smtp", "discard"]  # (relay=none, each under its agent's name)
    assert pf_lines["mixed@local.test"][0].startswith("local: to=<Mixed@local.test>, relay=local, delay=")
    assert all("delays=T/T/T/T" in timed(line) for lines in pf_lines.values() for line in lines)
    for lines in (pf_lines, mf_lines):  # the retry: its delay and `a` are the time it waited in the queue
        waited = re.search(r", delay=([\d.]+), delays=([\d.]+)/", lines["later@later.test"][1])
        assert waited and float(waited[1]) >= 1 and float(waited[2]) >= 1, lines["later@later.test"]
    # qmgr's `from=` line each time the message enters the active queue, the retry too, `nrcpt=` counting the
    # recipient already delivered
    assert activations(mail_log.read_text(), "later@later.test") == activations(pf_log, "later@later.test") == [
        "nrcpt=2 (queue active)"] * 2


def activations(log: str, rcpt: str) -> list[str]:
    """The `nrcpt=…` end of each of qmgr's `from=` lines for the message to `rcpt`."""
    queue_id = re.search(rf"([0-9A-F]+): to=<{re.escape(rcpt)}>", log)[1]
    return re.findall(rf"qmgr\[\d+\]: {queue_id}: from=<[^>]*>, size=\d+, (nrcpt=\d+ \(queue active\))", log)


# ---------------------------------------------------------------------------------------------- milter actions

MILTER_TRANSACTIONS = (  # (sender, recipients, subject): one session each (one milter connection each, as Postfix)
    ("mdiscard@sender.test", ["a@relay.test"], "plain"),  # DISCARD at MAIL
    ("s@sender.test", ["a@relay.test", "rhold@relay.test"], "plain"),  # quarantine at RCPT: QID
    ("s@sender.test", ["rdiscard@relay.test", "b@relay.test"], "plain"),  # DISCARD at the first RCPT: NOQUEUE
    ("s@sender.test", ["a@relay.test", "b@relay.test"], "ehold"),  # quarantine at the end of the message
    ("s@sender.test", ["a@relay.test"], "ediscard"),  # DISCARD at the end of the message
)


def milter_script(milter_of: list) -> dict:
    """The scripted milter's answers: by the MAIL or RCPT address's local part, and at the end of the message by
    the Subject it was shown (`milter_of[0]`: the milter, whose sessions hold what it was shown)."""
    def quarantine() -> bytes:
        return reply(b"q", b"held by the milter\0") + reply(b"c")  # (a quarantine is not final: the reply follows)

    def by_address(actions: dict):
        return lambda _, payload: actions.get(payload.split(b"\0")[0].strip(b"<>").partition(b"@")[0], reply(b"c"))

    def end(number: int, _: bytes) -> bytes:
        seen = b"".join(payload for command, payload in milter_of[0].sessions[number] if command == b"L")
        return quarantine() if b"ehold" in seen else reply(b"d") if b"ediscard" in seen else reply(b"c")

    return {b"M": by_address({b"mdiscard": reply(b"d")}),
            b"R": by_address({b"rhold": quarantine(), b"rdiscard": reply(b"d")}), b"E": end}


async def milter_traffic(port: int) -> list[int | None]:
    codes: list[int | None] = []
    for sender, rcpts, subject in MILTER_TRANSACTIONS:
        c = await SmtpClient.connect(port)
        codes += [(await c.cmd("EHLO client.test")).code, (await c.cmd(f"MAIL FROM:<{sender}>")).code]
        codes += [(await c.cmd(f"RCPT TO:<{rcpt}>")).code for rcpt in rcpts]
        assert (await c.cmd("DATA")).code == 354
        codes.append((await c.cmd(f"Subject: {subject}\r\n\r\nx\r\n.")).code)
        assert (await c.cmd("QUIT")).code == 221
        await c.close()
    return codes


def milter_lines(log: str) -> list[str]:
    """The milter-hold and milter-discard lines, as `service: line` with queue ids masked as QID; of a message's
    milter-hold lines only the first (Postfix 3.7 logs one more at each later command: docs/filtering.md)."""
    found, held = [], set()
    for service, qid, action, rest in re.findall(
            rf"{SYSLOG_NAME}/([\w/]+)\[\d+\]: (\w+): (milter-hold|milter-discard): (.*)$", log, re.M):
        if action == "milter-hold" and qid in held:
            continue
        held.add(qid)
        found.append(f"{service}: {'NOQUEUE' if qid == 'NOQUEUE' else 'QID'}: {action}: {rest}")
    return found


async def test_milter_hold_and_discard_are_logged_as_postfix_logs_them(mailflow_server, mail_log, tmp_path):
    """A milter's DISCARD or quarantine: Postfix's smtpd logs it at MAIL or RCPT (check_milter_reply:
    `NOQUEUE: milter-discard: MAIL from …: milter triggers DISCARD action; from=<…> proto=ESMTP helo=<…>`), its
    cleanup at the end of the message (cleanup_milter_apply: `QID: milter-hold: END-OF-MESSAGE from …: milter
    triggers HOLD action; from=<…> to=<the last recipient> …`), the milter's reason not said (3.7); pflogsumm
    counts cleanup's as held and discarded, smtpd's not."""
    pflogsumm = require_tool("pflogsumm")
    sink = await ScriptedPeer({}).start()
    transports = f"inline:{{relay.test=smtp:[127.0.0.1]:{sink.port}}}"
    milter_of: list = []
    try:
        async with scripted_milter(milter_script(milter_of), optneg(protocol=NODATA)) as milter:
            milter_of.append(milter)
            async with postfix_instance({
                "myhostname": PF_HOST, "syslog_name": SYSLOG_NAME, "mydestination": "", "relay_domains": "relay.test",
                "transport_maps": transports, "smtpd_milters": milter.spec,
            }) as pf:
                started = await pf.sessions_ended()
                pf_replies = await milter_traffic(pf.port)
                ended = await pf.sessions_ended()
                pf_log = pf.maillog[started:ended]
            mf = await mailflow_server(
                myhostname=MF_HOST, mydestination=[], relay_domains=["relay.test"], transport_maps=[transports],
                smtp={"tls_security_level": "none"}, smtpd={"milters": [milter.spec]})
            mf_replies = await milter_traffic(mf.smtp_addresses[0][1])
            await eventually(lambda: mail_log.read_text().count("disconnect from") == len(MILTER_TRANSACTIONS),
                             timeout=10)
            mf_log = mail_log.read_text()
    finally:
        await sink.stop()
    assert mf_replies == pf_replies
    assert milter_lines(mf_log) == milter_lines(pf_log), (pf_log, mf_log)
    # what Postfix logged, so that the same mistake on both sides cannot pass unnoticed
    assert [line.partition(" from ")[0] for line in milter_lines(pf_log)] == [
        "smtpd: NOQUEUE: milter-discard: MAIL", "smtpd: QID: milter-hold: RCPT", "smtpd: NOQUEUE: milter-discard: RCPT",
        "cleanup: QID: milter-hold: END-OF-MESSAGE", "cleanup: QID: milter-discard: END-OF-MESSAGE"]
    assert "milter triggers HOLD action; from=<s@sender.test> to=<b@relay.test> proto=ESMTP helo=<client.test>" in \
        milter_lines(pf_log)[3]
    assert re.search(r"milter-hold: DATA from .*to=<a@relay\.test>", pf_log)  # 3.7's repeat (docs/filtering.md)
    pf_file, mf_file = tmp_path / "pf.log", tmp_path / "mf.log"
    pf_file.write_text(pf_log)
    mf_file.write_text(mf_log)
    (pf_sum, pf_sections), (mf_sum, mf_sections) = await summary(pflogsumm, pf_file), await summary(pflogsumm, mf_file)
    counted = ("received", "delivered", "held", "discarded")
    assert {k: mf_sum[k] for k in counted} == {k: pf_sum[k] for k in counted}, (pf_log, mf_log)
    assert (pf_sum["held"], pf_sum["discarded"]) == (1, 1)  # cleanup's lines only
    details = ("message hold detail", "message discard detail")
    assert {k: mf_sections[k] for k in details} == {k: pf_sections[k] for k in details}


# ---------------------------------------------------------------------------------------------- relay's program

def programs(log: str) -> dict[str, str]:
    """The program each recipient's result line is written as, without the syslog name before it (Postfix's stock
    master.cf names relay's `postfix/$service_name`, whatever main.cf's syslog_name): `relay/smtp`, `smtp`."""
    return {rcpt: tag.partition("/")[2]
            for tag, rcpt in re.findall(r" (\S+)\[\d+\]: [0-9A-F]+: to=<([^>]*)>", log)}


async def test_relay_domain_mail_is_logged_by_the_relay_service_as_postfix_logs_it(mailflow_server, mail_log,
                                                                                  smtp_peer):
    """relay_transport's default, `relay` (Postfix's DEF_RELAY_TRANSPORT; master.cf's `relay unix … smtp -o
    syslog_name=postfix/$service_name`): a relay_domains recipient's line is written as `relay/smtp`, another
    one's (default_transport, smtp) as `smtp`, the same relayhost taking both."""
    peer = await smtp_peer()
    rcpts = ["u@relay.test", "u@other.test"]
    settings = {"myhostname": PF_HOST, "mydestination": "", "relay_domains": "relay.test",
                "relayhost": f"[127.0.0.1]:{peer.port}", "mynetworks": "127.0.0.0/8"}
    async with postfix_instance(settings) as pf:
        for rcpt in rcpts:
            await message(pf.port, [rcpt], "relayed")
        await eventually(lambda: set(rcpts) <= set(programs(pf.maillog)), timeout=10)
        pf_programs = programs(pf.maillog)
    mf = await mailflow_server(myhostname=MF_HOST, mydestination=[], relay_domains=["relay.test"],
                               relayhost=f"[127.0.0.1]:{peer.port}", mynetworks=["127.0.0.0/8"],
                               smtp={"tls_security_level": "none"})
    for rcpt in rcpts:
        await message(mf.smtp_addresses[0][1], [rcpt], "relayed")
    await eventually(lambda: set(rcpts) <= set(programs(mail_log.read_text())), timeout=10)
    assert programs(mail_log.read_text()) == pf_programs == {"u@relay.test": "relay/smtp", "u@other.test": "smtp"}


def client_lines(log: str) -> list[tuple[str, str]]:
    """(program, text) of each line of an SMTP client process (smtp, relay/smtp), in order: queue ids as QID,
    ports as PORT, a TLS summary cut after its bits (Postfix goes on with the key exchange)."""
    lines = []
    for tag, text in re.findall(r" (\S+)\[\d+\]: (.*)", log):
        program = tag.partition("/")[2]
        if program.rpartition("/")[2] != "smtp":
            continue
        text = re.sub(r"\b[0-9A-F]{6,}: ", "QID: ", text)
        text = re.sub(r"\](:\d+)", "]:PORT", text)
        text = re.sub(r"(bits\)).*", r"\1", text)
        lines.append((program, text))
    return lines


async def test_every_line_of_the_relay_client_is_logged_as_relay_smtp_as_postfix_logs_it(mailflow_server, mail_log,
                                                                                         smtp_peer, tmp_path):
    """master.cf's `relay … smtp -o syslog_name=postfix/$service_name` names every line of that process, not only
    its results: a relay-domain message whose relayhost refuses the connection, whose first fallback relay defers
    it (451, its reply rewritten by smtp_reply_filter) and whose second takes it over STARTTLS (smtp_tls_loglevel 1),
    its Subject replaced by smtp_header_checks: the connection's, reply filter's, `QID: host … said`, TLS and header
    check lines are all relay/smtp's, in Postfix and in mailflow alike."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    greylisting, tls_peer = await smtp_peer(), await smtp_peer(tls_context=context)
    greylisting.handler.rcpt_replies["u@relay.test"] = "451 4.7.1 greylisted"
    (tmp_path / "reply_filter").write_text("/^451 4\\.7\\.1 greylisted$/ 451 4.7.1 greylisted (filtered)\n")
    (tmp_path / "header_checks").write_text("/^Subject: (.*)$/ REPLACE Subject: checked $1\n")
    closed = free_port()
    fallbacks = [f"[127.0.0.1]:{greylisting.port}", f"[127.0.0.1]:{tls_peer.port}"]
    async with postfix_instance({
        "myhostname": PF_HOST, "mydestination": "", "relay_domains": "relay.test", "mynetworks": "127.0.0.0/8",
        "relayhost": f"[127.0.0.1]:{closed}", "smtp_fallback_relay": ", ".join(fallbacks),
        "smtp_tls_security_level": "may", "smtp_tls_loglevel": "1",
        "smtp_reply_filter": f"regexp:{tmp_path}/reply_filter",
        "smtp_header_checks": f"regexp:{tmp_path}/header_checks",
    }) as pf:
        await message(pf.port, ["u@relay.test"], "relayed")
        await eventually(lambda: "status=sent" in pf.maillog, timeout=15, what="Postfix delivered")
        theirs = client_lines(pf.maillog)
    mf = await mailflow_server(myhostname=MF_HOST, mydestination=[], relay_domains=["relay.test"],
                               mynetworks=["127.0.0.0/8"], relayhost=f"[127.0.0.1]:{closed}",
                               smtp={"fallback_relay": fallbacks, "tls_security_level": "may", "tls_loglevel": 1,
                                     "reply_filter": [f"regexp:{tmp_path}/reply_filter"],
                                     "header_checks": [f"regexp:{tmp_path}/header_checks"]})
    await message(mf.smtp_addresses[0][1], ["u@relay.test"], "relayed")
    await eventually(lambda: "status=sent" in mail_log.read_text(), timeout=15, what="mailflow delivered")
    ours = client_lines(mail_log.read_text())
    assert {program for program, _ in theirs} == {program for program, _ in ours} == {"relay/smtp"}
    # (in order but for the header check's line: mailflow checks the header before it connects, Postfix as it sends)
    assert sorted(text for _, text in ours if "to=<" not in text) == sorted(
        text for _, text in theirs if "to=<" not in text)
    assert len(theirs) == 6  # connect, replacing, said, TLS, replace, the result


def service_refused(path) -> bool:
    """Whether connecting to a master service's UNIX socket at `path` fails (the service is gone)."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return True
        return False


@pytest.mark.parametrize("routing, rcpt", [
    ({"relay_domains": "relay.test"}, "u@relay.test"),
    ({"default_transport": "relay"}, "u@other.test"),
    ({"transport_maps": "inline:{relay.test=relay:[127.0.0.1]:1}"}, "u@relay.test"),
], ids=["relay_domains", "default_transport", "transport_maps"])
async def test_relay_domain_mail_without_a_relay_service_is_deferred_as_postfix_defers_it(mailflow_server, mail_log,
                                                                                          tmp_path, routing, rcpt):
    """master.cf without `relay` (relay_transport's default; or named by default_transport, a transport_maps
    entry): Postfix's qmgr cannot reach the service and error(8) defers the mail, 4.3.0 "mail transport
    unavailable"; `config import` of that master.cf makes mailflow write the same result line (it sent the mail
    out over its SMTP relay)."""
    from mailflow.config.postfix_import import import_postfix

    settings = {"myhostname": PF_HOST, "mydestination": "", "mynetworks": "127.0.0.0/8", **routing}
    async with postfix_instance({**settings, "syslog_name": SYSLOG_NAME}) as pf:
        master = pf.etc / "master.cf"
        relay = pf.root / "queue" / "private" / "relay"
        assert not service_refused(relay)
        master.write_text(re.sub(r"^relay\s.*\n(?:[ \t]+.*\n)*", "", master.read_text(), flags=re.M))
        assert pf.run("postfix", "reload").returncode == 0
        # (`postfix reload` only signals the master, which logs `reload -- version` before it reads master.cf
        # again: the message goes in once connecting to the old service is refused)
        await pf.logged("reload -- version")
        await eventually(lambda: service_refused(relay), step=0.05,
                         what="the master closed the relay service master.cf no longer has")
        await message(pf.port, [rcpt], "no relay")
        await eventually(lambda: rcpt in delivery_lines(pf.maillog), timeout=15, what="Postfix's result")
        theirs = delivery_lines(pf.maillog)[rcpt]
        (tmp_path / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        (tmp_path / "master.cf").write_text(master.read_text())
    imported = import_postfix(str(tmp_path / "main.cf"), str(tmp_path / "master.cf"))
    routes = {key: imported.settings[key] for key in ("relay_domains", "relay_transport", "default_transport",
                                                      "transport_maps") if key in imported.settings}
    mf = await mailflow_server(myhostname=MF_HOST, mydestination=[], mynetworks=["127.0.0.0/8"], **routes)
    await message(mf.smtp_addresses[0][1], [rcpt], "no relay")
    await eventually(lambda: rcpt in delivery_lines(mail_log.read_text()), timeout=15, what="mailflow's result")
    ours = delivery_lines(mail_log.read_text())[rcpt]

    def compared(lines: list[str]) -> list[str]:
        return [re.sub(r", delay=.*?, dsn=", ", dsn=", line) for line in lines]
    assert compared(ours) == compared(theirs) == [
        f"error: to=<{rcpt}>, relay=none, dsn=4.3.0, status=deferred (mail transport unavailable)"]


async def size_at_mail(port: int) -> list[str]:
    """MAIL with a SIZE past message_size_limit (ESMTP, then a null sender), then one within it; the replies."""
    c = await SmtpClient.connect(port)
    replies = [(await c.cmd("EHLO client.test")).text.splitlines()[0]]
    for command in (f"MAIL FROM:<s@sender.test> SIZE={SIZE_LIMIT * 10}", f"MAIL FROM:<> SIZE={SIZE_LIMIT + 1}",
                    f"MAIL FROM:<s@sender.test> SIZE={SIZE_LIMIT}"):
        replies.append((await c.cmd(command)).text)
    await c.cmd("QUIT")
    await c.close()
    return replies


def size_refusals(log: str) -> list[str]:
    return re.findall(rf"{SYSLOG_NAME}/smtpd\[\d+\]: (NOQUEUE: reject: MAIL .*)$", log, re.M)


async def test_a_size_past_the_limit_at_mail_is_logged_as_postfix_logs_it(mailflow_server, mail_log):
    """`MAIL FROM:<…> SIZE=N` past message_size_limit: Postfix's smtpd_check_size logs its refusal (pflogsumm counts
    it, fail2ban's filter reads it) with the sender it refused (`from=<>` for the null one), as mailflow does: a
    guard, checked against Postfix 3.7.11, for the line a reviewer doubted."""
    async with postfix_instance({"myhostname": PF_HOST, "syslog_name": SYSLOG_NAME, "mydestination": "",
                                 "message_size_limit": str(SIZE_LIMIT)}) as pf:
        started = await pf.sessions_ended()
        pf_replies = await size_at_mail(pf.port)
        ended = await pf.sessions_ended()
        pf_lines = size_refusals(pf.maillog[started:ended])
    mf = await mailflow_server(myhostname=MF_HOST, mydestination=[], smtpd={"message_size_limit": SIZE_LIMIT})
    mf_replies = await size_at_mail(mf.smtp_addresses[0][1])
    await eventually(lambda: "disconnect from" in mail_log.read_text(), timeout=10)
    assert [r.replace(MF_HOST, "HOST") for r in mf_replies] == [r.replace(PF_HOST, "HOST") for r in pf_replies]
    assert size_refusals(mail_log.read_text()) == pf_lines == [
        f"NOQUEUE: reject: MAIL from localhost[127.0.0.1]: 552 5.3.4 Message size exceeds fixed limit; {sender} "
        "proto=ESMTP helo=<client.test>" for sender in ("from=<s@sender.test>", "from=<>")]


async def test_time_lost_before_the_greeting_is_counted_as_connection_set_up(mailflow_server, mail_log):
    """A next hop that takes the connection and closes it 0.6 s later without a greeting: the delivery fails while
    its session is being set up. Postfix's smtp_bulk_fail then dates the end of the set-up (conn_setup_done) at
    the failure, so its `delays=` counts the wait as c, connection set-up, and d as 0; mailflow's line counts it
    the same way (it was counted as d, transmission, where log analysers would have read a slow transfer)."""
    async def mute(_, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.6)
        writer.close()

    peer = await asyncio.start_server(mute, "127.0.0.1", 0)
    transports = f"inline:{{mute.test=smtp:[127.0.0.1]:{peer.sockets[0].getsockname()[1]}}}"

    def first_line(log: str) -> str | None:
        return delivery_lines(log).get("r@mute.test", [None])[0]

    try:
        async with postfix_instance({"myhostname": PF_HOST, "syslog_name": SYSLOG_NAME, "relay_domains": "mute.test",
                                     "transport_maps": transports}) as pf:
            started = await pf.sessions_ended()
            await message(pf.port, ["r@mute.test"], "mute")
            pf_line = await eventually(lambda: first_line(pf.maillog[started:]), timeout=20)
        mf = await mailflow_server(myhostname=MF_HOST, relay_domains=["mute.test"], transport_maps=[transports],
                                   smtp={"tls_security_level": "none"})
        await message(mf.smtp_addresses[0][1], ["r@mute.test"], "mute")
        mf_line = await eventually(lambda: first_line(mail_log.read_text()), timeout=20)
    finally:
        peer.close()
    assert timed(mf_line) == timed(pf_line)
    for line in (pf_line, mf_line):
        set_up, transmission = re.search(r", delays=[\d.]+/[\d.]+/([\d.]+)/([\d.]+),", line).groups()
        assert float(set_up) >= 0.5 and transmission == "0", line


DATA_WAIT = 4  # seconds the slow smtp-sink waits before it answers DATA: the delivery is under way that long


def activated(log: str) -> list[str]:
    """Queue ids of the messages from deleted@sender.test that qmgr has taken (its `from=` line)."""
    return re.findall(r"\b([0-9A-Za-z]{10,16}): from=<deleted@sender\.test>, size=\d+, nrcpt=2 \(queue active\)", log)


async def test_mail_deleted_during_its_delivery_is_logged_as_postfix_logs_it(mailflow_server, mail_log,
                                                                             write_config, tmp_path):
    """`postsuper -d` of a message whose delivery is under way (an smtp-sink slow to answer DATA): Postfix's
    smtp(8) finishes it and logs a `status=sent` line per recipient after postsuper's `removed`, and its qmgr logs
    no `removed` of its own; pflogsumm counts both as delivered. mailflow's lines for `mailflow queue delete`
    are the same, in the same order (it logged no result line when qmgr's poll had seen the delete first)."""
    pflogsumm = require_tool("pflogsumm")
    rcpts = ["one@relay.test", "two@relay.test"]
    async with smtp_sink("-w", str(DATA_WAIT)) as (sink, _):
        transports = f"inline:{{relay.test=smtp:[127.0.0.1]:{sink}}}"  # (smtp: Postfix's relay logs as postfix/relay)
        async with postfix_instance({"myhostname": PF_HOST, "syslog_name": SYSLOG_NAME, "mydestination": "",
                                     "relay_domains": "relay.test", "transport_maps": transports,
                                     "notify_classes": ""}) as pf:
            started = await pf.sessions_ended()
            await message(pf.port, rcpts, "deleted in flight", sender="deleted@sender.test")
            await eventually(lambda: activated(pf.maillog[started:]), timeout=10)
            await asyncio.sleep(1)  # (the delivery has begun: it waits for DATA's answer)
            [pf_id] = activated(pf.maillog[started:])
            assert pf.run("postsuper", "-d", pf_id).returncode == 0
            await pf.logged("status=sent", count=2, since=started, timeout=DATA_WAIT + 10)
            pf_log = (await asyncio.sleep(0.5)) or pf.maillog[started:]
        settings = dict(myhostname=MF_HOST, mydestination=[], relay_domains=["relay.test"],
                        transport_maps=[transports], smtp={"tls_security_level": "none"})
        mf = await mailflow_server(**settings)
        config = write_config(tmp_path / "mailflow.toml", log={"file": str(mail_log)}, **settings)
        await message(mf.smtp_addresses[0][1], rcpts, "deleted in flight", sender="deleted@sender.test")
        await eventually(lambda: activated(mail_log.read_text()), timeout=10)
        await asyncio.sleep(1)  # (past qmgr's next poll of the tools' changes too, once deleted)
        [mf_id] = activated(mail_log.read_text())
        rc, out = await run_tool(sys.executable, "-m", "mailflow", "queue", "delete", mf_id, "-c", str(config))
        assert rc == 0, out
        await eventually(lambda: mail_log.read_text().count("status=sent") == 2, timeout=DATA_WAIT + 10)
        await asyncio.sleep(0.5)  # (nothing more comes: a `removed` would follow at once)
        mf_log = mail_log.read_text()
    expected = message_lines(pf_log, pf_id)
    assert expected[3:] == ["postsuper: removed", *(f"smtp: to=<{r}>, relay=127.0.0.1[127.0.0.1]:{sink}, "
                                                    "dsn=2.0.0, status=sent (250 2.0.0 Ok)" for r in rcpts)], pf_log
    assert message_lines(mf_log, mf_id) == expected, mf_log
    pf_file, mf_file = tmp_path / "pf.log", tmp_path / "mf.log"
    pf_file.write_text(pf_log)
    mf_file.write_text(mf_log)
    (pf_sum, _), (mf_sum, _) = await summary(pflogsumm, pf_file), await summary(pflogsumm, mf_file)
    assert (mf_sum["received"], mf_sum["delivered"]) == (pf_sum["received"], pf_sum["delivered"]) == (1, 2)
