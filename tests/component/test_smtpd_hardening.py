"""The front door against a new user's mistakes and an attacker's tricks, over real sockets:

- failed, abandoned and repeated STARTTLS handshakes give back the session slot and the per-client count;
- addresses beginning with '-' never reach a pipe(8) command's argv (allow_min_user);
- invalid UTF-8 is a 500 syntax error, never a 451 or a traceback;
- client strings reach the log only through printable();
- AUTH: one failure table per server, hashing on its own threads, authzid, LOGIN prompts, no deprecated API;
- forbid_bare_newline = false normalises bare LF in DATA without letting `\\n.\\n` end it;
- MAIL/RCPT path syntax as Postfix takes it; recipients past the limit do not end the session;
- the Received header's protocol word (RFC 3848).
"""
from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import threading
import warnings

import pytest
import trustme

from mailflow.stages.smtpd.auth import hash_password
from tests.command_scripts import script_dir
from tests.component.test_smtpd_protocol import Raw
from tests.helpers import eventually, maildir_messages, queue_becomes

FAST = {"n": 1024, "r": 8, "p": 1}
MSG = b"Subject: t\r\n\r\nbody\r\n"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def pki(tmp_path):
    ca = trustme.CA()
    cert_file = tmp_path / "cert.pem"
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return str(cert_file), client_ctx


@pytest.fixture
def users(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"alice {hash_password('s3cret', **FAST)}\n")
    return f"texthash:{path}"


def alice_mail(tmp_path) -> list[bytes]:
    return maildir_messages(tmp_path / "mail" / "alice" / "Maildir")


async def send_message(c: Raw, rcpt: str = "alice@local.test", ehlo: bool = True) -> int:
    if ehlo:
        assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("MAIL FROM:<s@remote.test>"))[0] == 250
    assert (await c.cmd(f"RCPT TO:<{rcpt}>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(MSG + b".\r\n")
    return (await c.reply())[0]


# ---------------------------------------------------------------------------------------------- STARTTLS


async def _failed_handshake(port: int) -> None:
    c = await Raw.connect(port)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("STARTTLS"))[0] == 220
    await c.send(b"EHLO this is not a TLS record\r\n")
    assert await c.closed()


async def _abandoned_handshake(port: int) -> None:
    c = await Raw.connect(port)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("STARTTLS"))[0] == 220
    c.close()


async def _starttls_twice(port: int, ctx: ssl.SSLContext) -> None:
    c = await Raw.connect(port)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("STARTTLS"))[0] == 220
    await c.writer.start_tls(ctx, server_hostname="localhost")
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert await c.cmd("STARTTLS") == (554, "554 5.5.1 Error: TLS already active")
    c.close()


async def test_failed_and_abandoned_starttls_give_back_the_slot_and_the_client_count(mailflow_server, pki):
    cert, ctx = pki
    mf = await mailflow_server(smtpd={"tls_cert_file": cert, "max_sessions": 100,
                                      "client_connection_count_limit": 50})
    port = mf.smtp_addresses[0][1]
    kinds = [lambda: _failed_handshake(port), lambda: _abandoned_handshake(port), lambda: _starttls_twice(port, ctx)]
    for batch in range(8):  # 200 sessions, 25 at a time: far past both limits if any of them leaked
        await asyncio.gather(*(kinds[(batch * 25 + i) % 3]() for i in range(25)))
    listener = mf.smtpd.listeners[0]
    assert await eventually(lambda: listener.anvil.sessions("127.0.0.1") == 0 and not mf.smtpd.sessions)
    c = await Raw.connect(port)  # greeted: 220
    assert await send_message(c) == 250
    c.close()


async def test_starttls_inside_a_transaction_is_refused(mailflow_server, pki):
    cert, _ = pki
    mf = await mailflow_server(smtpd={"tls_cert_file": cert})
    c = await Raw.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("MAIL FROM:<s@remote.test>"))[0] == 250
    assert await c.cmd("STARTTLS") == (503, "503 5.5.1 Error: MAIL transaction in progress")
    assert (await c.cmd("RCPT TO:<alice@local.test>"))[0] == 250  # the transaction goes on in plaintext
    c.close()


# ---------------------------------------------------------------------------------------------- allow_min_user


RECORD_ARGV = 'printf "%s\\n" "$@" >> {out}/argv\n'


async def test_addresses_beginning_with_a_dash_never_reach_a_pipe_command(mailflow_server):
    with script_dir() as scripts:
        s = scripts.script("list.sh", RECORD_ARGV.format(out=scripts.out))
        mf = await mailflow_server(relay_domains=["lists.test"], transport_maps=["inline:{lists.test=lists:}"],
                                   pipe={"lists": {"argv": [str(s), "${extension}", "${recipient}"]}})
        c = await Raw.connect(mf.smtp_addresses[0][1])
        assert (await c.cmd("EHLO client.test"))[0] == 250
        assert await c.cmd("MAIL FROM:<-oQ/tmp/x@remote.test>") == (
            501, "501 5.1.7 <-oQ/tmp/x@remote.test>: Bad sender address syntax")
        assert (await c.cmd("MAIL FROM:<>"))[0] == 250
        assert await c.cmd("RCPT TO:<-oQ/some/dir@lists.test>") == (
            501, "501 5.1.3 <-oQ/some/dir@lists.test>: Bad recipient address syntax")
        assert (await c.cmd("RCPT TO:<list+-oQ/tmp@lists.test>"))[0] == 250  # a dash inside: smtpd lets it in
        assert (await c.cmd("RCPT TO:<list@lists.test>"))[0] == 250
        assert (await c.cmd("DATA"))[0] == 354
        assert (await c.cmd(MSG + b"."))[0] == 250
        c.close()
        # pipe bounced the recipient whose ${extension} begins with '-' (the null sender's notice goes to
        # postmaster, deferred here for want of DNS); the other one ran, with no option
        assert await queue_becomes(mf.store, {"deferred": 1}) == {"deferred": 1}
        assert scripts.read("argv").splitlines() == ["", "list@lists.test"]


async def test_allow_min_user_lets_such_addresses_through(mailflow_server):
    with script_dir() as scripts:
        s = scripts.script("list.sh", RECORD_ARGV.format(out=scripts.out))
        mf = await mailflow_server(relay_domains=["lists.test"], transport_maps=["inline:{lists.test=lists:}"],
                                   allow_min_user=True, pipe={"lists": {"argv": [str(s), "--", "${recipient}"]}})
        c = await Raw.connect(mf.smtp_addresses[0][1])
        assert (await c.cmd("EHLO client.test"))[0] == 250
        assert (await c.cmd("MAIL FROM:<>"))[0] == 250
        assert (await c.cmd("RCPT TO:<-dash@lists.test>"))[0] == 250
        assert (await c.cmd("DATA"))[0] == 354
        assert (await c.cmd(MSG + b"."))[0] == 250
        c.close()
        assert await queue_becomes(mf.store, {}) == {}
        assert scripts.read("argv").splitlines() == ["--", "-dash@lists.test"]


# ---------------------------------------------------------------------------------------------- UTF-8


@pytest.mark.parametrize("line", [b"HELO \xff\xfe.test", b"EHLO caf\xe9.test", b"MAIL FROM:<\xff@remote.test>",
                                  b"RCPT TO:<alice\xc3@local.test>", b"NOOP \xed\xa0\x80"])
async def test_invalid_utf8_is_a_syntax_error_and_the_session_goes_on(mailflow_server, tmp_path, caplog, line):
    mf = await mailflow_server()
    c = await Raw.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    if line.startswith(b"RCPT"):
        assert (await c.cmd("MAIL FROM:<s@remote.test>"))[0] == 250
    assert await c.cmd(line) == (500, "500 5.5.2 Error: bad UTF-8 syntax")
    if line.startswith(b"RCPT"):
        assert (await c.cmd("RSET"))[0] == 250
    assert await send_message(c, ehlo=False) == 250  # never 451: the session is whole
    c.close()
    assert await eventually(lambda: alice_mail(tmp_path))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_utf8_helo_is_kept_and_printed_in_received(mailflow_server, tmp_path):
    mf = await mailflow_server()
    c = await Raw.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO café.test".encode()))[0] == 250
    assert await send_message(c, ehlo=False) == 250
    c.close()
    messages = await eventually(lambda: alice_mail(tmp_path))
    assert "Received: from café.test (unknown [127.0.0.1])".encode() in messages[0]


# ---------------------------------------------------------------------------------------------- log injection

HOSTILE = "evil\x1b[2J\x08\u0085\u2028.test"


async def test_client_strings_reach_the_log_printable(mailflow_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mailflow")
    mf = await mailflow_server()
    c = await Raw.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd(f"EHLO {HOSTILE}".encode()))[0] == 250
    assert (await c.cmd("MAIL FROM:<s@remote.test>"))[0] == 250
    assert (await c.cmd("RCPT TO:<x@elsewhere.test>"))[0] == 554  # logged: NOQUEUE: reject ... helo=<…>
    assert (await c.cmd("RCPT TO:<alice@local.test>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(f"Message-ID: <{HOSTILE}>\r\n\r\nbody\r\n.\r\n".encode())
    assert (await c.reply())[0] == 250
    c.close()
    assert await eventually(lambda: alice_mail(tmp_path))
    lines = [r.getMessage() for r in caplog.records]
    assert any("helo=<evil?[2J???.test>" in line for line in lines), lines
    assert any("message-id=<evil?[2J???.test>" in line for line in lines), lines
    assert not [line for line in lines if any(ch in line for ch in "\x1b\x08\u0085\u2028")]


# ---------------------------------------------------------------------------------------------- AUTH


def auth_door(users: str, **smtpd) -> dict:
    return {"smtpd": {"sasl_auth_enable": True, "sasl_user_maps": [users], "allow_plaintext_auth_on_loopback": True,
                      **smtpd}}


async def test_auth_failures_are_one_table_shared_by_the_listeners(mailflow_server, users):
    mf = await mailflow_server(**auth_door(users, auth_failure_delay=0.3,
                                           listeners=[{"address": "127.0.0.1:0"}]))
    first, second = (port for _, port in mf.smtp_addresses)
    a = await Raw.connect(first)
    assert (await a.cmd("EHLO client.test"))[0] == 250
    assert (await a.cmd("AUTH PLAIN " + b64(b"\0alice\0wrong")))[0] == 535
    b = await Raw.connect(second)
    assert (await b.cmd("EHLO client.test"))[0] == 250
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await b.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret")))[0] == 235
    assert loop.time() - started >= 0.3  # the failure on the other listener slows this client down here too
    assert mf.smtpd.auth_failures.recent("127.0.0.1") == 1
    a.close()
    b.close()


async def test_auth_hashing_does_not_wait_for_the_default_executor(mailflow_server, users):
    mf = await mailflow_server(**auth_door(users))
    loop = asyncio.get_running_loop()
    release = threading.Event()
    blockers = [loop.run_in_executor(None, release.wait, 10) for _ in range(64)]  # every default worker busy
    try:
        c = await Raw.connect(mf.smtp_addresses[0][1])
        assert (await c.cmd("EHLO client.test"))[0] == 250
        assert (await asyncio.wait_for(c.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret")), 3))[0] == 235
        c.close()
    finally:
        release.set()
        await asyncio.gather(*blockers)


async def test_auth_plain_with_another_authorization_identity_is_refused(mailflow_server, users):
    mf = await mailflow_server(**auth_door(users))
    c = await Raw.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert await c.cmd("AUTH PLAIN " + b64(b"bob\0alice\0s3cret")) == (
        535, "535 5.7.8 Error: authentication failed")
    assert (await c.cmd("AUTH PLAIN " + b64(b"alice\0alice\0s3cret")))[0] == 235
    c.close()


async def test_auth_login_prompts_and_no_deprecated_api(mailflow_server, users):
    mf = await mailflow_server(**auth_door(users))
    c = await Raw.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert await c.cmd("AUTH LOGIN") == (334, "334 " + b64(b"Username:"))
        assert await c.cmd(b64(b"alice")) == (334, "334 " + b64(b"Password:"))
        assert await c.cmd(b64(b"s3cret")) == (235, "235 2.7.0 Authentication successful")
        assert (await c.cmd("MAIL FROM:<alice@local.test>"))[0] == 250
    assert not [w for w in caught if "deprecated" in str(w.message)]
    c.close()


# ---------------------------------------------------------------------------------------------- bare LF


async def test_forbid_bare_newline_off_normalises_bare_lf_in_data(mailflow_server, smtp_peer):
    peer = await smtp_peer()
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}", smtpd={"forbid_bare_newline": False})
    c = await Raw.connect(mf.smtp_addresses[0][1])
    await c.send(b"EHLO client.test\n")  # a command line may end in a bare LF too
    assert (await c.reply())[0] == 250
    assert (await c.cmd("MAIL FROM:<s@remote.test>"))[0] == 250
    assert (await c.cmd("RCPT TO:<r@relay.test>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    # "\n.\n" and "\r\n.\n" are content here: only CRLF "." CRLF ends DATA, so nothing is smuggled
    await c.send(b"Subject: lf\n\nline one\n.\nMAIL FROM:<evil@remote.test>\r\n..dot\n\r\n.\r\n")
    code, text = await c.reply()
    assert code == 250 and "queued as" in text
    assert (await c.cmd("NOOP"))[0] == 250
    c.close()
    assert await eventually(lambda: peer.messages)
    assert len(peer.messages) == 1
    content = peer.messages[0].content
    assert b"\r\nSubject: lf\r\n" in content
    assert content.endswith(b"\r\n\r\nline one\r\n\r\nMAIL FROM:<evil@remote.test>\r\n.dot\r\n\r\n")
    assert content.count(b"\n") == content.count(b"\r\n")


async def test_forbid_bare_newline_off_still_refuses_a_bare_cr(mailflow_server):
    mf = await mailflow_server(smtpd={"forbid_bare_newline": False})
    c = await Raw.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("MAIL FROM:<s@remote.test>"))[0] == 250
    assert (await c.cmd("RCPT TO:<alice@local.test>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(b"Subject: cr\r\n\r\nhi\r.\r\nRSET\r\n.\r\n")
    assert (await c.reply())[0] == 521
    assert await mf.store.counts() == {}


# ---------------------------------------------------------------------------------------------- MAIL/RCPT syntax


@pytest.mark.parametrize("command, reply", [
    ("MAIL FROM:<s@remote.test", "501 5.1.7 Bad sender address syntax"),
    ("MAIL FROM:<s@remote.test>junk", "501 5.1.7 Bad sender address syntax"),
    ("MAIL FROM:<s b@remote.test>", "501 5.1.7 Bad sender address syntax"),
    ("MAIL FROM:<s\\b@remote.test>", "501 5.1.7 Bad sender address syntax"),
    ("MAIL FROM:<s(x)@remote.test>", "501 5.1.7 Bad sender address syntax"),
    ("MAIL <s@remote.test>", "501 5.5.4 Syntax: MAIL FROM:<address>"),
    ("MAIL FROM:<s@remote.test> FOO=bar", "555 5.5.4 Unsupported option: FOO=bar"),
    ("MAIL FROM:<s@remote.test> SIZE=12x", "501 5.5.4 Bad message size syntax"),
    ("MAIL FROM:<s@remote.test> SIZE=99999999999", "552 5.3.4 Message size exceeds fixed limit"),
    ("MAIL FROM:<s@remote.test> BODY=BINARYMIME", "555 5.5.4 Unsupported option: BODY=BINARYMIME"),
    ("MAIL FROM:s@remote.test", "250 2.1.0 Ok"),  # Postfix (strict_rfc821_envelope = no) takes it
    ("MAIL FROM: <s@remote.test>", "250 2.1.0 Ok"),
    ("MAIL FROM:<s@remote.test.> SIZE=100 BODY=8BITMIME AUTH=<>", "250 2.1.0 Ok"),
])
async def test_mail_path_syntax(mailflow_server, command, reply):
    mf = await mailflow_server()
    c = await Raw.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd(command))[1] == reply
    c.close()


@pytest.mark.parametrize("command, reply", [
    ("RCPT TO:<alice@local.test", "501 5.1.3 Bad recipient address syntax"),
    ("RCPT TO:<a b@local.test>", "501 5.1.3 Bad recipient address syntax"),
    ("RCPT TO:<a\\b@local.test>", "501 5.1.3 Bad recipient address syntax"),
    ("RCPT TO:<alice@>", "501 5.1.3 Bad recipient address syntax"),
    ("RCPT TO:<>", "501 5.1.3 Bad recipient address syntax"),
    ("RCPT TO:<alice@local.test> NOTIFY=NEVER FOO", "555 5.5.4 Unsupported option: FOO"),
    ("RCPT <alice@local.test>", "501 5.5.4 Syntax: RCPT TO:<address>"),
    ("RCPT TO:<alice@local.test.>", "250 2.1.5 Ok"),
    ("RCPT TO:<@hop.test,@other.test:alice@local.test>", "250 2.1.5 Ok"),
    ("RCPT TO:alice@local.test", "250 2.1.5 Ok"),
    ('RCPT TO:<"a b"@local.test>',
     '550 5.1.1 <"a b"@local.test>: Recipient address rejected: User unknown in local recipient table'),
])
async def test_rcpt_path_syntax(mailflow_server, command, reply):
    mf = await mailflow_server()
    c = await Raw.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("MAIL FROM:<s@remote.test>"))[0] == 250
    assert (await c.cmd(command))[1] == reply
    c.close()


async def test_a_trailing_dot_is_dropped_from_the_domain(mailflow_server, tmp_path):
    mf = await mailflow_server()
    c = await Raw.connect(mf.smtp_addresses[0][1])
    assert await send_message(c, rcpt="alice@local.test.") == 250
    c.close()
    messages = await eventually(lambda: alice_mail(tmp_path))
    assert b"Delivered-To: alice@local.test\n" in messages[0]


# ---------------------------------------------------------------------------------------------- recipient limit


async def test_recipients_past_the_limit_do_not_end_the_session(mailflow_server, smtp_peer):
    peer = await smtp_peer()
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}", smtpd={"recipient_limit": 100})
    c = await Raw.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("MAIL FROM:<s@remote.test>"))[0] == 250
    codes = [(await c.cmd(f"RCPT TO:<r{i}@relay.test>"))[0] for i in range(150)]
    assert codes == [250] * 100 + [452] * 50
    assert (await c.cmd("DATA"))[0] == 354
    assert (await c.cmd(MSG + b"."))[0] == 250
    c.close()
    assert await eventually(lambda: peer.messages)
    assert sorted(peer.messages[0].rcpt_tos) == sorted(f"r{i}@relay.test" for i in range(100))


async def test_past_the_overshoot_limit_the_452s_count_as_errors(mailflow_server):
    mf = await mailflow_server(smtpd={"recipient_limit": 1, "recipient_overshoot_limit": 2, "hard_error_limit": 3})
    c = await Raw.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("MAIL FROM:<s@remote.test>"))[0] == 250
    codes = [(await c.cmd("RCPT TO:<alice@local.test>"))[0] for _ in range(7)]
    assert codes == [250, 452, 452, 452, 452, 452, 421]  # 2 free, then 3 errors reach the hard limit
    c.close()


# ---------------------------------------------------------------------------------------------- Received


async def test_received_names_the_protocol_as_rfc_3848_says(mailflow_server, tmp_path, pki, users, caplog):
    caplog.set_level(logging.INFO, logger="mailflow")
    cert, ctx = pki
    mf = await mailflow_server(**auth_door(users, tls_cert_file=cert))
    port = mf.smtp_addresses[0][1]
    plain = await Raw.connect(port)
    assert (await plain.cmd("HELO client.test"))[0] == 250
    assert await send_message(plain, ehlo=False) == 250
    plain.close()
    c = await Raw.connect(port)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("STARTTLS"))[0] == 220
    await c.writer.start_tls(ctx, server_hostname="localhost")
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert await send_message(c, ehlo=False) == 250
    assert (await c.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret")))[0] == 235
    assert (await c.cmd("MAIL FROM:<s@remote.test> SMTPUTF8"))[0] == 250
    assert (await c.cmd("RCPT TO:<alice@local.test>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    assert (await c.cmd(MSG + b"."))[0] == 250
    c.close()
    messages = await eventually(lambda: len(alice_mail(tmp_path)) == 3 and alice_mail(tmp_path))
    withs = sorted(m.split(b" with ", 1)[1].split(b" ", 1)[0] for m in messages)
    assert withs == [b"ESMTPS", b"SMTP", b"UTF8SMTPSA"]
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("Anonymous TLS connection established from unknown[127.0.0.1]: TLSv1.") and
               " with cipher " in line for line in lines), lines
    assert any(line.endswith(": client=unknown[127.0.0.1], sasl_method=PLAIN, sasl_username=alice")
               for line in lines), lines
