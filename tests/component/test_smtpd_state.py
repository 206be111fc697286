"""smtpd's typed state and its error replies, over real sockets: what a session keeps per connection and per
transaction (RSET, STARTTLS and a new message start exactly the transaction again), that a session is built
without aiosmtpd's per-connection introspection, and what a client is told and the log says when a message
cannot be queued (the one table `status.error_reply`).
"""
from __future__ import annotations

import asyncio
import cProfile
import inspect
import logging
import pstats
import sqlite3

import pytest
from aiosmtpd.smtp import SMTP

from mailflow import status
from mailflow.content import SPOOL_PREFIX, Spool
from mailflow.stages.smtpd.protocol import AIOSMTPD_STATE, hook_table
from mailflow.stages.smtpd.restrictions import Marks
from mailflow.stages.smtpd.session import SmtpSession
from mailflow.stages.smtpd.state import SessionState, Transaction
from tests.support import LOOPBACK_CLIENT, Reply, SmtpClient
from tests.support.calls import callees, times_called

MSG = b"Subject: t\r\n\r\nbody\r\n"


def transaction_fields(transaction: Transaction) -> dict:
    return dict(vars(transaction))


def the_session(mf) -> SmtpSession:
    assert len(mf.smtpd.sessions) == 1
    return next(iter(mf.smtpd.sessions))


async def test_rset_clears_exactly_the_transaction_and_keeps_the_client(mailflow_server):
    mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "authorized_xclient_hosts": ["127.0.0.0/8"],
                                      "recipient_restrictions": [
                                          "check_recipient_access inline:{alice@local.test=HOLD}",
                                          "reject_unauth_destination"]})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("XCLIENT NAME=front.test ADDR=192.0.2.7"))[0] == 220
    await c.envelope(mail_params=" RET=HDRS ENVID=e+2B1", rcpt_params=" NOTIFY=SUCCESS ORCPT=rfc822;a@b.test")
    server = the_session(mf)
    client, transaction = server.session, server.envelope
    assert type(client) is SessionState and type(transaction) is Transaction
    assert (transaction.sender, transaction.rcpt_tos) == ("s@remote.test", ["alice@local.test"])
    assert (transaction.dsn_ret, transaction.dsn_envid) == ("HDRS", "e+1")
    assert transaction.rcpt_dsn == [("SUCCESS", "rfc822;a@b.test")]
    assert transaction.marks.hold and transaction.policy_instance  # the restriction lists ran for this message
    kept = {name: getattr(client, name) for name in ("peer", "client_name", "host_name", "extended_smtp")}

    assert (await c.cmd("RSET"))[0] == 250
    assert server.session is client and {name: getattr(client, name) for name in kept} == kept
    assert kept["client_name"] == "front.test" and kept["peer"][0] == "192.0.2.7"
    assert server.envelope is not transaction
    assert transaction_fields(server.envelope) == transaction_fields(Transaction())
    assert server.envelope.marks == Marks()
    await c.close()


async def test_a_new_message_starts_a_new_transaction_with_its_own_policy_instance(mailflow_server):
    mf = await mailflow_server()
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await c.envelope()
    first = the_session(mf).envelope.policy_instance
    assert (await c.cmd("DATA"))[0] == 354
    assert (await c.cmd(MSG + b"."))[0] == 250
    assert transaction_fields(the_session(mf).envelope) == transaction_fields(Transaction())
    assert (await c.cmd("MAIL FROM:<s@remote.test>"))[0] == 250
    assert (await c.cmd("RCPT TO:<alice@local.test>"))[0] == 250
    assert the_session(mf).envelope.policy_instance not in ("", first)
    await c.close()


async def test_bdat_content_of_a_transaction_that_ends_is_freed(mailflow_server, tmp_path):
    mf = await mailflow_server()
    content = tmp_path / "queue" / "content"
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await c.envelope()
    chunk = b"x" * (300 * 1024)  # past the in-memory limit: the spool is a file
    await c.send(f"BDAT {len(chunk)}\r\n".encode() + chunk)
    assert await c.reply() == status.bdat_chunk(len(chunk))
    assert the_session(mf).envelope.bdat is not None
    assert [p.name for p in content.iterdir() if p.name.startswith(SPOOL_PREFIX)]
    assert (await c.cmd("RSET"))[0] == 250
    assert not [p.name for p in content.iterdir() if p.name.startswith(SPOOL_PREFIX)]
    await c.close()


async def test_starttls_keeps_who_the_client_is_and_forgets_its_helo_and_login(mailflow_server, pki):
    _, cert_file, client_ctx = pki
    mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "tls_cert_file": cert_file,
                                      "authorized_xclient_hosts": ["127.0.0.0/8"]})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("XCLIENT NAME=front.test ADDR=192.0.2.7 LOGIN=bob HELO=lb.test PROTO=ESMTP"))[0] == 220
    before = the_session(mf).session
    assert (before.authenticated, before.auth_data, before.auth_mechanism) == (True, "bob", "XCLIENT")
    await c.starttls(client_ctx)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    after = the_session(mf).session
    assert after is not before and after.ssl is not None
    assert (after.client_name, after.peer, after.proxied_by) == ("front.test", before.peer, before.proxied_by)
    assert (after.authenticated, after.auth_data, after.host_name) == (False, None, "client.test")
    await c.close()


async def test_a_client_that_said_ehlo_may_pipeline_after_starttls_before_its_new_ehlo(mailflow_server, pki):
    """As Postfix, whose STARTTLS keeps the session's protocol name (ESMTP): not a pipelining violation (554 and
    a hang-up), found by tests/interop/test_tls_dialogue_vs_postfix.py."""
    _, cert_file, client_ctx = pki
    mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "tls_cert_file": cert_file})
    async with await SmtpClient.connect(mf.smtp_addresses[0][1]) as c:
        assert (await c.cmd("EHLO client.test"))[0] == 250
        await c.starttls(client_ctx)
        await c.send(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@local.test>\r\n")
        assert [(await c.reply()).code for _ in range(2)] == [250, 250]
        assert (await c.cmd("HELO client.test"))[0] == 250
        assert the_session(mf).session.protocol == "ESMTP"


async def test_sessions_are_built_without_aiosmtpds_per_connection_introspection(mailflow_server, tmp_path,
                                                                                monkeypatch):
    mf = await mailflow_server()

    def refuse(*args, **kwargs):
        raise AssertionError("per-connection introspection")

    monkeypatch.setattr(inspect, "getmembers", refuse)
    monkeypatch.setattr(inspect, "signature", refuse)
    for _ in range(2):
        c = await SmtpClient.connect(mf.smtp_addresses[0][1])
        await c.envelope()
        assert (await c.cmd("DATA"))[0] == 354
        assert (await c.cmd(MSG + b"."))[0] == 250
        assert (await c.cmd("QUIT"))[0] == 221
        await c.close()


async def test_aiosmtpd_still_has_every_private_name_the_session_sets_for_it(mailflow_server):
    mf = await mailflow_server()
    handler = mf.smtpd.listeners[0].handler
    theirs = SMTP(handler, hostname="mx.mailflow.test")
    ours = SmtpSession(handler, sessions=set(), hostname="mx.mailflow.test")
    assert set(AIOSMTPD_STATE) <= set(vars(theirs)), "aiosmtpd renamed what its inherited methods read"
    assert set(AIOSMTPD_STATE) <= set(vars(ours))
    assert set(ours._smtp_methods) >= {"HELO", "EHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "ETRN",
                                        "VRFY", "STARTTLS", "AUTH", "XCLIENT"}
    assert not {"EXPN", "HELP"} & set(ours._smtp_methods)  # aiosmtpd's are left out: Postfix has neither


async def test_a_sessions_hooks_are_those_aiosmtpd_finds_fetched_at_once(mailflow_server, monkeypatch):
    """The hook table (aiosmtpd's `_handle_hooks`) is the one aiosmtpd's own constructor builds for the same
    handler, an instance's own hook included, for a handler with many hooks, one or none; the methods are fetched
    together (one attrgetter), not by a getattr call each."""
    mf = await mailflow_server()
    handler = mf.smtpd.listeners[0].handler

    async def own_rcpt(*args):
        return "250 OK"

    monkeypatch.setattr(handler, "handle_RCPT", own_rcpt)

    class One:
        async def handle_DATA(self, server, session, envelope):
            return "250 OK"

    class Nothing:
        pass

    for h in (handler, One(), Nothing()):
        assert hook_table(h) == SMTP(h, hostname="mx.mailflow.test")._handle_hooks
    assert hook_table(handler)["RCPT"] is own_rcpt
    assert len(hook_table(handler)) > 10
    profile = cProfile.Profile()
    profile.runcall(hook_table, handler)
    assert not [f for f in pstats.Stats(profile).stats if f[2] == "<built-in method builtins.getattr>"]


async def test_a_session_cannot_be_made_with_a_handler_that_does_not_judge_addresses(mailflow_server):
    """Address syntax is the handler's (allow_min_user, qualification): not an optional hook that a handler could
    lack and so take every malformed address."""
    mf = await mailflow_server()
    handler = mf.smtpd.listeners[0].handler

    class WithoutAddressCheck:
        def __getattr__(self, name):
            if name == "address_refusal":
                raise AttributeError(name)
            return getattr(handler, name)

    with pytest.raises(AttributeError, match="address_refusal"):
        SmtpSession(WithoutAddressCheck(), sessions=set(), hostname="mx.mailflow.test")


# ---------------------------------------------------------------------------------------------- not queued


async def send_message(port: int, message: bytes = MSG) -> Reply:
    c = await SmtpClient.connect(port)
    reply = await c.send_message(message)
    await c.close()
    return reply


def not_queued(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "not queued" in r.getMessage()]


@pytest.mark.parametrize("fault, reply", [
    (sqlite3.OperationalError("database is locked"), status.QUEUE_ERROR),
    (OSError(28, "No space left on device"), status.QUEUE_FULL),
])
async def test_a_store_fault_at_commit_is_answered_451_and_logged_once_without_a_traceback(
        mailflow_server, monkeypatch, caplog, fault, reply):
    mf = await mailflow_server()

    async def failing_insert(message):
        raise fault

    monkeypatch.setattr(mf.store, "insert", failing_insert)
    caplog.set_level(logging.INFO)
    assert await send_message(mf.smtp_addresses[0][1]) == reply
    lines = not_queued(caplog)
    assert len(lines) == 1 and lines[0].exc_info is None and "Traceback" not in caplog.text
    assert str(fault.args[-1]) in lines[0].getMessage() and LOOPBACK_CLIENT in lines[0].getMessage()


async def test_a_cleanup_refusal_answers_its_text_and_logs_its_reason(mailflow_server, caplog):
    mf = await mailflow_server(sender_canonical_maps=["fail:canonical"])
    caplog.set_level(logging.INFO)
    assert await send_message(mf.smtp_addresses[0][1]) == status.TEMPORARY_LOOKUP_FAILURE
    lines = not_queued(caplog)
    assert len(lines) == 1 and "canonical is a fail: table" in lines[0].getMessage() and lines[0].exc_info is None

    looped = b"".join(b"Received: from hop%d\r\n" % n for n in range(60)) + MSG
    assert await send_message(mf.smtp_addresses[0][1], looped) == (554, "554 5.4.0 Error: too many hops")
    assert "60 Received headers" in not_queued(caplog)[-1].getMessage()


async def test_a_spool_that_cannot_be_written_refuses_the_message_and_says_so_once(mailflow_server, tmp_path,
                                                                                   monkeypatch, caplog):
    mf = await mailflow_server()
    handler = mf.smtpd.listeners[0].handler
    monkeypatch.setattr(handler, "new_spool", lambda max_size: Spool(tmp_path / "missing", max_size=max_size))
    caplog.set_level(logging.INFO)
    big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 400  # past the in-memory limit
    assert await send_message(mf.smtp_addresses[0][1], big) == status.QUEUE_ERROR
    lines = [r for r in caplog.records if "cannot write its spool file" in r.getMessage()]
    assert len(lines) == 1 and "Traceback" not in caplog.text
    assert (await send_message(mf.smtp_addresses[0][1]))[0] == 250  # a small one stays in memory: queued


async def test_the_clients_address_follows_its_peer_and_costs_no_call_to_read():
    """`peer_ip` is the peer's address as text ("unknown" without one), whatever set the peer (the connection, a
    PROXY header, XCLIENT, STARTTLS's carried identity), and is read as a plain field (a dozen times a message)."""
    session = SessionState(asyncio.get_running_loop())
    assert session.peer is None and session.peer_ip == "unknown"
    for peer, ip in [(("192.0.2.1", 25), "192.0.2.1"), (("2001:db8::1", None), "2001:db8::1"), ((), "unknown"),
                     (None, "unknown"), (("198.51.100.7", "0123"), "198.51.100.7")]:
        session.peer = peer
        assert (session.peer, session.peer_ip) == (peer, ip)
    after = SessionState(asyncio.get_running_loop())
    after.carry_identity(session)
    assert after.peer_ip == "198.51.100.7"
    profile = cProfile.Profile()
    profile.runcall(lambda: [session.peer_ip for _ in range(20)])
    assert times_called(profile, "peer_ip") == 0  # (a field: no function runs to read it)


async def test_the_clients_log_name_follows_its_name_and_address_and_is_made_once_for_them():
    """`client` is `host[ip]` as known now (the connection's name, XCLIENT's NAME and ADDR, PROXY's address), made
    again only when one of them changed: read again, it costs no formatting."""
    session = SessionState(asyncio.get_running_loop())
    assert session.client == "unknown[unknown]"
    session.peer = ("192.0.2.1", 25)
    assert session.client == "unknown[192.0.2.1]"
    session.client_name = "mx.example.test"
    assert session.client == "mx.example.test[192.0.2.1]"
    session.peer = ("198.51.100.7", 25)
    assert session.client == "mx.example.test[198.51.100.7]"
    session.client_name = "bad\nname"
    assert session.client == "bad?name[198.51.100.7]"
    profile = cProfile.Profile()
    profile.runcall(lambda: [session.client for _ in range(10)])
    assert times_called(profile, "client_name") == 0


async def test_the_login_is_the_authenticated_sessions_text_login_and_costs_one_call():
    session = SessionState(asyncio.get_running_loop())
    assert session.login == ""
    session.auth_data = "alice"
    assert session.login == ""  # (not authenticated)
    session.authenticated = True
    assert session.login == "alice"
    session.auth_data = b"alice"  # (aiosmtpd's own login data: not a login of mailflow's Authenticator)
    assert session.login == ""
    session.auth_data = "alice"
    profile = cProfile.Profile()
    profile.runcall(lambda: session.login)
    assert times_called(profile, "login", "state.py") == 1
    assert set(callees(profile, "login", "state.py")) <= {"<built-in method builtins.isinstance>"}  # (no helper)
