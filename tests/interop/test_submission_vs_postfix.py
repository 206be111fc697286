"""Differential test of submission: the same STARTTLS and AUTH dialogues, byte for byte, to a private Postfix with
Dovecot SASL and to mailflow asking the same Dovecot, must get the same replies (code, enhanced code and text),
command by command.

Postfix runs as a submission service is set up (smtpd_tls_security_level = encrypt, smtpd_tls_auth_only = yes,
smtpd_sasl_auth_enable = yes, smtpd_sasl_type = dovecot), mailflow with a `submission` listener whose
sasl_type is "dovecot", and again with its own sasl_user_maps holding the same users (sasl_auth_required off, as
Postfix's MAIL needs no login: relaying does). One private Dovecot (its auth socket, mode 0666, for both) and one
private Postfix per module; Dovecot's auth penalty is off, so a failure costs only Dovecot's 0.5 s tick. The log
lines and the Received header are compared too, and the deliberate differences are checked to be what
docs/security.md says.

Compared after leaving out what differs on purpose (docs/security.md): the server's name, queue ids, the EHLO
keywords' order, VRFY (off in mailflow) and SMTPUTF8 (the private Postfix runs with smtputf8_enable = no), and
the reason Postfix adds to a 535 (`Error: authentication failed: (reason unavailable)`: mailflow tells the
client none).
"""
from __future__ import annotations

import asyncio
import base64
import logging
import re
import ssl
from pathlib import Path

import pytest

from mailflow.passwords import hash_password
from tests.support import Reply, SmtpClient, dovecot_instance, eventually, postfix_instance
from tests.support.dovecot import USERS
from tests.support.postfix import readable_pki

pytestmark = pytest.mark.interop


def b64(data: str) -> str:
    return base64.b64encode(data.encode()).decode()


ALICE = "alice@example.test"  # tests/support/dovecot.py's users
ALICE_PLAIN = "AUTH PLAIN " + b64(f"\0{ALICE}\0alicepw")
ELSEWHERE = "RCPT TO:<x@elsewhere.test>"
NOT_COMPARED_KEYWORDS = {"VRFY", "SMTPUTF8"}

SESSIONS: dict[str, list[str | bytes]] = {
    "before STARTTLS": ["EHLO c.test", ALICE_PLAIN, "MAIL FROM:<s@remote.test>", "RCPT TO:<alice@local.test>",
                        "RSET", "NOOP", "STARTTLS now", "FOO", "HELP"],
    "EHLO before and after STARTTLS, then STARTTLS again": ["EHLO c.test", "STARTTLS", "EHLO c.test", "STARTTLS",
                                                            "STARTTLS now"],
    "HELO, then STARTTLS": ["HELO c.test", "STARTTLS", "HELO c.test", "NOOP"],
    "XCLIENT from a client not authorized for it, before STARTTLS": ["EHLO c.test", "XCLIENT NAME=spoofed.test"],
    "a command pipelined after STARTTLS (RFC 3207 command injection)": [
        "EHLO c.test", b"STARTTLS\r\nMAIL FROM:<inj@evil.test>", "RCPT TO:<alice@local.test>"],
    "commands that need TLS, pipelined where they must not be: 530 before the pipelining check": [
        "EHLO c.test", b"DATA\r\nNOOP", "NOOP"],
    "MAIL pipelined before EHLO: 530 before the pipelining check": [b"MAIL FROM:<s@remote.test>\r\nNOOP", "NOOP"],
    "AUTH pipelined after STARTTLS": ["EHLO c.test", b"STARTTLS\r\n" + ALICE_PLAIN.encode(), "EHLO c.test",
                                      ALICE_PLAIN],
}
TLS = ["EHLO c.test", "STARTTLS", "EHLO c.test"]
AUTH_SESSIONS: dict[str, list[str | bytes]] = {
    "AUTH PLAIN with an initial response, twice, then relaying": [
        *TLS, ALICE_PLAIN, ALICE_PLAIN, "MAIL FROM:<alice@example.test>", "AUTH LOGIN", ELSEWHERE, "RSET"],
    "AUTH PLAIN without one": [*TLS, "AUTH PLAIN", b64(f"\0{ALICE}\0alicepw"), "MAIL FROM:<alice@example.test>"],
    "AUTH LOGIN with and without an initial response": [
        *TLS, "AUTH LOGIN", b64(ALICE), b64("nope"), "AUTH LOGIN " + b64(ALICE), b64("alicepw"), ELSEWHERE],
    "wrong passwords, an unknown user, an empty answer": [
        *TLS, "AUTH PLAIN " + b64(f"\0{ALICE}\0nope"), "AUTH PLAIN " + b64("\0nobody@example.test\0x"),
        "AUTH PLAIN", "", "AUTH PLAIN " + b64(f"\0{ALICE}\0"), "AUTH PLAIN " + b64("\0\0alicepw"), "AUTH PLAIN =",
        "AUTH LOGIN " + b64(ALICE), "", ELSEWHERE, "NOOP"],
    "an authorization identity": [*TLS, "AUTH PLAIN " + b64(f"bob@example.test\0{ALICE}\0alicepw"),
                                  "AUTH PLAIN " + b64(f"{ALICE}\0{ALICE}\0alicepw")],
    "* cancels": [*TLS, "AUTH PLAIN", "*", "AUTH LOGIN", "*", "AUTH LOGIN", b64(ALICE), "*", "NOOP"],
    # (found by test_tls_dialogue_vs_postfix.py: Dovecot refuses such a name before it asks for the password)
    "a LOGIN name that cannot be one: 535 at once": [
        *TLS, "AUTH LOGIN", b64(f"\0{ALICE}\0alicepw"), "NOOP", "AUTH LOGIN " + b64("a b"), "NOOP", "AUTH LOGIN",
        "", "NOOP", "AUTH LOGIN " + b64(ALICE + "\tx"), "NOOP", "AUTH LOGIN " + b64("nobody@example.test"),
        b64("nope")],
    "the mechanism's name in lower case, no mechanism, too many words": [
        *TLS, "AUTH", "AUTH PLAIN a b", "AUTH plain " + b64(f"\0{ALICE}\0alicepw")],
    "AUTH inside a transaction": [*TLS, "MAIL FROM:<s@remote.test>", ALICE_PLAIN, "RSET", ALICE_PLAIN],
    "an answer past smtpd_sasl_response_limit": [*TLS, "AUTH PLAIN", "A" * 13000, "NOOP", ALICE_PLAIN],
    "relaying without AUTH": [*TLS, "MAIL FROM:<s@remote.test>", ELSEWHERE, "RCPT TO:<alice@local.test>"],
    "MAIL's AUTH= parameter": [
        *TLS, "MAIL FROM:<s@remote.test> AUTH=<s@remote.test>", "RSET", ALICE_PLAIN,
        "MAIL FROM:<alice@example.test> AUTH=<alice@example.test>", "RSET", "MAIL FROM:<alice@example.test> AUTH=<>",
        "RSET", "MAIL FROM:<alice@example.test> AUTH=alice+40example.test", "RSET",
        "MAIL FROM:<alice@example.test> AUTH=<> AUTH=<alice@example.test>", "RSET",
        "MAIL FROM:<alice@example.test> AUTH=<a@example.test> AUTH=<>"],
}


def compared(reply: str) -> str:
    """A reply as compared: the server's name and queue ids out; EHLO's keywords sorted, less the ones that
    differ on purpose; a 535's reason out."""
    lines = reply.split("\n")
    if len(lines) > 1 and lines[0].startswith("250-"):
        keywords = sorted({line[4:] for line in lines[1:]} - NOT_COMPARED_KEYWORDS)
        return "250 EHLO " + " | ".join(keywords)
    reply = re.sub(r"^(250 |221 2\.0\.0 |554 5\.5\.0 )\S+\.test\b", r"\1HOST", reply)
    reply = re.sub(r"queued as [0-9A-F]+", "queued as QID", reply)
    return re.sub(r"^(535 5\.7\.8 Error: authentication failed): .*", r"\1", reply)


async def dialogue(port: int, tls: ssl.SSLContext, commands: list[str | bytes], *, as_is: bool = False) -> list[str]:
    """Each command's reply as compared (`as_is`: as sent; a STARTTLS answered 220 is followed by the handshake,
    also when more was pipelined after it); "closed" when the server hung up."""
    client = await SmtpClient.connect(port)
    got = []
    try:
        for command in commands:
            try:
                reply = await client.cmd(command)
            except (ConnectionResetError, BrokenPipeError):
                reply = Reply(None, "")
            got.append("closed" if reply.code is None else reply.text if as_is else compared(reply.text))
            if reply.code is None or reply.code == 221:
                break
            line = command.encode() if isinstance(command, str) else command
            if line.split(b"\r\n")[0] == b"STARTTLS" and reply.code == 220:  # (what was pipelined: never answered)
                await client.writer.start_tls(tls, server_hostname="localhost")
    finally:
        await client.close()
    return got


async def replay(port: int, tls: ssl.SSLContext, sessions: dict[str, list[str | bytes]]) -> dict[str, list[str]]:
    """Each session's replies. The sessions run at once, each on its own connection: Dovecot 2.3 answers a failed
    login at its next 0.5 s tick (auth_failure_delay = 0 included), so one after the other they waited 4 s."""
    replies = await asyncio.gather(*(dialogue(port, tls, commands) for commands in sessions.values()))
    return dict(zip(sessions, replies))


def sasl_lines(lines: list[str]) -> list[str]:
    """smtpd's log lines about SASL as compared: the failures and aborts, the client= line, the disconnect line
    (queue ids out)."""
    wanted = [line for line in lines if " SASL " in line or ": client=" in line or line.startswith("disconnect ")]
    return [re.sub(r"^[0-9A-F]+: client=", "QID: client=", line) for line in wanted]


def received(header_section: str) -> str:
    """The first Received header field, unfolded, without the server's name, queue id and date."""
    found = re.search(r"^Received: (.*?)\n(?=\S)", header_section.replace("\r\n", "\n"), re.S | re.M)
    assert found, header_section
    field = " ".join(found.group(1).split())
    field = re.sub(r" by \S+ \(\w+\) ", " by HOST ", field)
    return re.sub(r" id [0-9A-F]+ (.*); .*", r" id QID \1", field)


def differences(sessions: dict[str, list[str | bytes]], postfix: dict[str, list[str]],
                mailflow: dict[str, list[str]]) -> dict[str, list[str]]:
    """Per session, the first reply that differs: `command: Postfix's reply != mailflow's`."""
    found = {}
    for name, commands in sessions.items():
        padding = ["-"] * len(commands)
        for command, theirs, ours in zip(commands, postfix[name] + padding, mailflow[name] + padding):
            if theirs != ours:
                found[name] = [f"{command!r}: {theirs!r} != {ours!r}"]
                break
    return found


# ---------------------------------------------------------------------------------------------- the peers


@pytest.fixture(scope="module")
def pki():
    """A certificate for localhost in a folder Postfix can read, and a client context that trusts it."""
    with readable_pki() as pair:
        yield pair


@pytest.fixture(scope="module")
def sasl_dovecot():
    with dovecot_instance() as dovecot:
        yield dovecot


@pytest.fixture(scope="module")
def postfix(pki, sasl_dovecot):
    """The private Postfix, started and stopped outside the tests' event loops (it is a process of its own)."""
    root, _ = pki
    instance = postfix_instance({
        "myhostname": "pf.test", "mydestination": "local.test", "mynetworks": "192.0.2.0/24",
        "local_recipient_maps": "inline:{alice=ok}", "relayhost": "[127.0.0.1]:9",
        "smtpd_tls_cert_file": str(root / "cert.pem"), "smtpd_tls_key_file": str(root / "key.pem"),
        "smtpd_tls_security_level": "encrypt", "smtpd_tls_auth_only": "yes", "smtpd_forbid_unauth_pipelining": "yes",
        "smtpd_sasl_auth_enable": "yes", "smtpd_sasl_type": "dovecot", "smtpd_sasl_path": str(sasl_dovecot.auth_socket),
        "smtpd_relay_restrictions": "permit_sasl_authenticated, reject_unauth_destination",
    })
    loop = asyncio.new_event_loop()  # one loop for the start and the stop (the instance is an async generator's)
    try:
        yield loop.run_until_complete(instance.__aenter__())
    finally:
        loop.run_until_complete(instance.__aexit__(None, None, None))
        loop.close()


async def start_submission(mailflow_server, pki_root: Path, dovecot, relayhost: str = "[127.0.0.1]:9",
                           sasl: dict | None = None) -> int:
    """mailflow with a submission listener asking `dovecot` (or with the `sasl` settings given); its port."""
    sasl = sasl or {"sasl_type": "dovecot", "sasl_path": str(dovecot.auth_socket)}
    mf = await mailflow_server(mydestination=["local.test"], local_recipient_maps=["inline:{alice=ok}"],
                               relayhost=relayhost, smtpd={
                                   "tls_cert_file": str(pki_root / "cert.pem"),
                                   "tls_key_file": str(pki_root / "key.pem"), "auth_failure_delay": 0,
                                   "listeners": [{"address": "127.0.0.1:0", "role": "submission",
                                                  "overrides": {**sasl, "sasl_auth_required": False}}]})
    return mf.smtpd.address_of("submission")[1]


@pytest.fixture(params=["dovecot", "sasl_user_maps"])
async def submission(request, mailflow_server, pki, sasl_dovecot, tmp_path):
    """mailflow asking the same Dovecot, or checking the same users itself (sasl_user_maps)."""
    sasl = None
    if request.param == "sasl_user_maps":
        (tmp_path / "users").write_text("".join(f"{user} {hash_password(password, n=1024)}\n"
                                                for user, password in USERS.items()))
        sasl = {"sasl_user_maps": [f"texthash:{tmp_path / 'users'}"]}
    return await start_submission(mailflow_server, pki[0], sasl_dovecot, sasl=sasl)


# ---------------------------------------------------------------------------------------------- the tests


async def test_starttls_on_a_submission_listener_matches_postfix(postfix, submission, pki):
    _, tls = pki
    expected, got = await asyncio.gather(replay(postfix.port, tls, SESSIONS), replay(submission, tls, SESSIONS))
    assert differences(SESSIONS, expected, got) == {}
    # the edges themselves, so that a change on both sides cannot pass unnoticed
    assert expected["before STARTTLS"][1:] == ["530 5.7.0 Must issue a STARTTLS command first"] * 4 + [
        "250 2.0.0 Ok", "501 5.5.4 Syntax: STARTTLS"] + ["500 5.5.2 Error: command not recognized"] * 2
    pipelined = expected["commands that need TLS, pipelined where they must not be: 530 before the pipelining check"]
    assert pipelined[1:] == ["530 5.7.0 Must issue a STARTTLS command first", "250 2.0.0 Ok"]
    assert expected["MAIL pipelined before EHLO: 530 before the pipelining check"] == [
        "530 5.7.0 Must issue a STARTTLS command first", "250 2.0.0 Ok"]
    assert expected["HELO, then STARTTLS"] == ["250 HOST", "220 2.0.0 Ready to start TLS", "250 HOST",
                                               "250 2.0.0 Ok"]
    assert expected["XCLIENT from a client not authorized for it, before STARTTLS"][1] == \
        "550 5.7.0 Error: insufficient authorization"
    assert expected["a command pipelined after STARTTLS (RFC 3207 command injection)"][1:] == [
        "220 2.0.0 Ready to start TLS", "503 5.5.1 Error: need MAIL command"]  # the MAIL never ran
    before, after = expected["EHLO before and after STARTTLS, then STARTTLS again"][0:3:2]
    assert "STARTTLS" in before and "AUTH" not in before and "STARTTLS" not in after and "AUTH PLAIN LOGIN" in after


async def test_auth_matches_postfix_with_dovecot_sasl(postfix, submission, pki):
    _, tls = pki
    # the two servers share only Dovecot: they run at once
    expected, got = await asyncio.gather(replay(postfix.port, tls, AUTH_SESSIONS),
                                         replay(submission, tls, AUTH_SESSIONS))
    assert differences(AUTH_SESSIONS, expected, got) == {}
    # the edges themselves
    assert expected["AUTH PLAIN with an initial response, twice, then relaying"][3:] == [
        "235 2.7.0 Authentication successful", "503 5.5.1 Error: already authenticated", "250 2.1.0 Ok",
        "503 5.5.1 Error: MAIL transaction in progress", "250 2.1.5 Ok", "250 2.0.0 Ok"]
    assert expected["* cancels"][3:] == ["334 ", "501 5.7.0 Authentication aborted", "334 VXNlcm5hbWU6",
                                         "501 5.7.0 Authentication aborted", "334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6",
                                         "501 5.7.0 Authentication aborted", "250 2.0.0 Ok"]
    assert expected["an answer past smtpd_sasl_response_limit"][4:] == [
        "500 5.5.6 SASL response limit exceeded", "250 2.0.0 Ok", "235 2.7.0 Authentication successful"]
    assert expected["an authorization identity"][3:] == ["535 5.7.8 Error: authentication failed",
                                                         "235 2.7.0 Authentication successful"]
    assert expected["relaying without AUTH"][4] == "554 5.7.1 <x@elsewhere.test>: Relay access denied"
    assert expected["MAIL's AUTH= parameter"][-1] == "503 5.5.4 Error: multiple AUTH= options"



SUBMITTED = [*TLS, "AUTH PLAIN " + b64(f"\0{ALICE}\0nope"), "AUTH LOGIN", "*", ALICE_PLAIN,
             "MAIL FROM:<alice@example.test> AUTH=<alice@example.test>", ELSEWHERE, "DATA",
             "Subject: submitted\r\n\r\nhi\r\n.", "QUIT"]


async def test_the_log_lines_and_the_received_header_match_postfix(postfix, pki, sasl_dovecot, mailflow_server,
                                                                    smtp_peer, caplog):
    """What fail2ban, pflogsumm and people read: the failure and abort warnings, `client=… sasl_method=PLAIN,
    sasl_username=…, sasl_sender=…`, the disconnect line's counts; and `with ESMTPSA` in the Received header,
    without `(Authenticated sender: …)` (Postfix's smtpd_sasl_authenticated_header = no)."""
    caplog.set_level(logging.INFO, logger="mailflow")
    root, tls = pki
    start = await postfix.sessions_ended()  # (the module's Postfix: an earlier test's lines may still be coming)
    assert (await dialogue(postfix.port, tls, SUBMITTED))[-2:] == ["250 2.0.0 Ok: queued as QID", "221 2.0.0 Bye"]
    text = await postfix.logged("disconnect from", since=start)
    theirs = [line.split("]: ", 1)[1] for line in text.splitlines() if "/smtpd[" in line]
    [queue_id] = re.findall(r"([0-9A-F]+): client=", text)
    their_header = postfix.run("postcat", "-hq", queue_id).stdout.decode()

    peer = await smtp_peer()
    port = await start_submission(mailflow_server, root, sasl_dovecot, relayhost=f"[127.0.0.1]:{peer.port}")
    assert (await dialogue(port, tls, SUBMITTED))[-2:] == ["250 2.0.0 Ok: queued as QID", "221 2.0.0 Bye"]
    [message] = await eventually(lambda: peer.messages)
    await eventually(lambda: any(r.getMessage().startswith("disconnect from") for r in caplog.records))
    ours = [("warning: " if r.levelno == logging.WARNING else "") + r.getMessage() for r in caplog.records]

    assert sasl_lines(ours) == sasl_lines(theirs)
    assert sasl_lines(theirs) == [
        f"warning: localhost[127.0.0.1]: SASL PLAIN authentication failed: (reason unavailable), sasl_username={ALICE}",
        "warning: localhost[127.0.0.1]: SASL LOGIN authentication aborted",
        f"QID: client=localhost[127.0.0.1], sasl_method=PLAIN, sasl_username={ALICE}, sasl_sender=<{ALICE}>",
        "disconnect from localhost[127.0.0.1] ehlo=2 starttls=1 auth=1/3 mail=1 rcpt=1 data=1 quit=1 commands=8/10"]
    assert received(message.content.decode()) == received(their_header) == (
        "from c.test (localhost [127.0.0.1]) by HOST with ESMTPSA id QID for <x@elsewhere.test>")


# docs/security.md's deliberate differences from Postfix with Dovecot SASL: the last command's reply from each
DELIBERATE = {
    "a mechanism other than PLAIN and LOGIN": (
        [*TLS, "AUTH CRAM-MD5"], "535 5.7.8 Error: authentication failed: Invalid authentication mechanism",
        "504 5.5.4 Unrecognized authentication type"),
    "a response that is not base64": (
        [*TLS, "AUTH PLAIN %%%"], "535 5.7.8 Error: authentication failed: Invalid base64 data in initial response",
        "501 5.5.2 Can't decode base64"),
    "wrong credentials": ([*TLS, "AUTH PLAIN " + b64(f"\0{ALICE}\0nope")],
                          "535 5.7.8 Error: authentication failed: (reason unavailable)",
                          "535 5.7.8 Error: authentication failed"),
    "AUTH after STARTTLS without a new EHLO": (["EHLO c.test", "STARTTLS", ALICE_PLAIN],
                                               "235 2.7.0 Authentication successful",
                                               "503 5.5.1 Error: send EHLO first"),
    "a LOGIN name Dovecot's auth_username_chars leaves out": (
        [*TLS, "AUTH LOGIN " + b64("a+b@example.test")], "535 5.7.8 Error: authentication failed: (reason "
        "unavailable)", "334 UGFzc3dvcmQ6"),  # (then 535: Dovecot is asked the name with the password)
    "a LOGIN name longer than 256 characters": ([*TLS, "AUTH LOGIN " + b64("a" * 300)], "334 UGFzc3dvcmQ6",
                                                "535 5.7.8 Error: authentication failed"),
    "AUTH after a HELO inside TLS that follows a plaintext EHLO": (
        ["EHLO c.test", "STARTTLS", "HELO c.test", ALICE_PLAIN], "235 2.7.0 Authentication successful",
        "503 5.5.1 Error: send EHLO first"),
}


async def test_the_documented_differences_are_as_documented(postfix, submission, pki):
    _, tls = pki
    for name, (commands, theirs, ours) in DELIBERATE.items():
        assert [(await dialogue(port, tls, commands, as_is=True))[-1] for port in (postfix.port, submission)] == [
            theirs, ours], name


LOST = {"a command refused for want of STARTTLS": ["EHLO c.test", "MAIL FROM:<s@remote.test>"],
        "an unknown command": ["EHLO c.test", "FOO"]}


async def test_the_lost_connection_line_names_the_command_postfix_names(postfix, submission, pki, caplog):
    """`lost connection after CMD` (and `too many errors after CMD`) names the last command Postfix got past its
    checks: not one refused for want of STARTTLS; UNKNOWN after one it does not know."""
    caplog.set_level(logging.INFO, logger="mailflow")
    _, tls = pki
    start = await postfix.sessions_ended()  # (the module's Postfix: an earlier test's lines may still be coming)
    for commands in LOST.values():
        await dialogue(postfix.port, tls, commands)
        await dialogue(submission, tls, commands)

    def lost(lines: list[str]) -> list[str]:  # (not the line of the probe that saw Postfix listen)
        return [line.split("lost connection ", 1)[1] for line in lines
                if "lost connection " in line and "after CONNECT" not in line]

    theirs = await eventually(lambda: len(found := lost(postfix.maillog[start:].splitlines())) == len(LOST) and found)
    ours = await eventually(lambda: len(found := lost([r.getMessage() for r in caplog.records])) == len(LOST) and found)
    # (sorted: a session's line may come after the next session's, both servers log them as the connection ends)
    assert sorted(ours) == sorted(theirs) == ["after EHLO from localhost[127.0.0.1]",
                                              "after UNKNOWN from localhost[127.0.0.1]"]
