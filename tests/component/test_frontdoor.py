"""The front door: listeners with roles and overrides, STARTTLS and implicit TLS, AUTH PLAIN/LOGIN against a
scrypt user table, failure slow-down, sender-login ownership, connection limits, TLS reload.

Real sockets on 127.0.0.1 with a trustme certificate; the client is a small raw SMTP speaker so each reply is
seen exactly as sent.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import socket
import ssl

import pytest

from mailflow import status
from mailflow.clock import VirtualClock
from mailflow.config import config_from_dict
from mailflow.errors import ConfigError
from mailflow.stages.smtpd import anvil as anvil_module
from mailflow.stages.smtpd import server as server_module
from mailflow.stages.smtpd.anvil import Anvil, SessionSlots
from mailflow.stages.smtpd.auth import (Authenticator, FailureCounter, PasswordHasher, SenderLogins, failure_delay,
                                        hash_password, parse_hash, verify_password)
from mailflow.stages.smtpd.tls import TlsError
from mailflow.tables import InlineTable
from tests.support import LOOPBACK_CLIENT, SmtpClient, eventually, merged, sessions_over

FAST = {"n": 1024, "r": 8, "p": 1}  # a cheap hash for tests; the format is the same


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def door(cert_file: str, users: str, *listeners, **smtpd) -> dict:
    return {"smtpd": {"tls_cert_file": cert_file, "sasl_user_maps": [users], "auth_failure_delay": 0,
                      "listeners": list(listeners), **smtpd}}


async def ehlo(c: SmtpClient) -> str:
    code, text = await c.cmd("EHLO client.test")
    assert code == 250
    return text


# ---------------------------------------------------------------------------------------------- hashes


def test_hash_format_round_trip():
    encoded = hash_password("pässword", **FAST)
    assert encoded.startswith("$scrypt$n=1024,r=8,p=1$")
    parsed = parse_hash(encoded)
    assert parsed is not None and len(parsed.salt) == 16 and len(parsed.digest) == 32
    assert verify_password("pässword".encode(), encoded)
    assert not verify_password(b"password", encoded)
    assert hash_password("x", **FAST) != hash_password("x", **FAST)  # salted


def test_hash_refuses_malformed_and_hostile_costs():
    good = hash_password("x", **FAST)
    assert not verify_password(b"x", good.replace("n=1024", "n=1000"))  # not a power of two
    assert parse_hash(good.replace("n=1024", f"n={1 << 24}")) is None  # would pin the CPU
    assert not verify_password(b"x", "plaintext-x")
    assert not verify_password(b"x", None)


# ---------------------------------------------------------------------------------------------- roles


async def test_submission_requires_starttls_then_auth_then_accepts(mailflow_server, pki, users):
    _, cert, ctx = pki
    mf = await mailflow_server(**door(cert, users, {"address": "127.0.0.1:0", "role": "submission"}))
    c = await SmtpClient.connect(mf.smtpd.address_of("submission")[1])
    text = await ehlo(c)
    assert "STARTTLS" in text and "AUTH" not in text
    assert (await c.cmd("MAIL FROM:<alice@local.test>"))[0] == 530
    assert (await c.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret")))[0] == 530
    await c.starttls(ctx)
    text = await ehlo(c)
    assert "AUTH PLAIN LOGIN" in text and "STARTTLS" not in text
    assert await c.cmd("MAIL FROM:<alice@local.test>") == status.AUTH_REQUIRED
    assert await c.cmd("AUTH PLAIN " + b64(b"\0alice\0wrong")) == status.AUTH_FAILED
    assert (await c.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret")))[0] == 235
    assert (await c.cmd("MAIL FROM:<alice@local.test>"))[0] == 250
    assert (await c.cmd("RCPT TO:<bob@local.test>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    code, text = await c.cmd("Subject: hi\r\n\r\nhello\r\n.")
    assert code == 250 and "queued as" in text
    await c.close()


async def test_auth_login_and_unknown_user(mailflow_server, pki, users):
    _, cert, ctx = pki
    mf = await mailflow_server(**door(cert, users, {"address": "127.0.0.1:0", "role": "submissions"}))
    c = await SmtpClient.connect(mf.smtpd.address_of("submissions")[1], tls=ctx)  # implicit TLS
    assert "AUTH" in await ehlo(c)
    assert (await c.cmd("AUTH LOGIN"))[0] == 334
    assert (await c.cmd(b64(b"nobody")))[0] == 334
    assert (await c.cmd(b64(b"s3cret")))[0] == 535
    assert (await c.cmd("AUTH LOGIN " + b64(b"bob")))[0] == 334
    assert await c.cmd(b64(b"hunter2")) == status.AUTH_OK
    await c.close()


async def test_mta_listener_offers_starttls_but_no_auth_unless_enabled(mailflow_server, pki, users):
    _, cert, ctx = pki
    mf = await mailflow_server(smtpd={"tls_cert_file": cert})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert "STARTTLS" in await ehlo(c)
    assert (await c.cmd("MAIL FROM:<x@remote.test>"))[0] == 250  # tls_security_level may: TLS optional
    await c.cmd("RSET")
    await c.starttls(ctx)
    assert "AUTH" not in await ehlo(c)
    assert (await c.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret")))[0] == 503
    await c.close()


async def test_auth_waits_for_an_ehlo_inside_tls_not_a_helo(mailflow_server, pki, users):
    """docs/security.md: AUTH is an EHLO extension, so an EHLO said before STARTTLS, or a HELO since, does not open
    it (503 send EHLO first; Postfix takes it); the session stays ESMTP for pipelining all the same."""
    _, cert, ctx = pki
    mf = await mailflow_server(**door(cert, users, sasl_auth_enable=True))
    plain = "AUTH PLAIN " + b64(b"\0alice\0s3cret")
    async with await SmtpClient.connect(mf.smtp_addresses[0][1]) as c:
        await ehlo(c)
        await c.starttls(ctx)
        assert await c.cmd(plain) == status.NEED_EHLO
        assert (await c.cmd("HELO client.test"))[0] == 250
        assert await c.cmd(plain) == status.NEED_EHLO
        await ehlo(c)
        assert (await c.cmd("HELO client.test"))[0] == 250  # a HELO after the EHLO inside TLS too
        assert await c.cmd(plain) == status.NEED_EHLO
        await ehlo(c)
        assert await c.cmd(plain) == status.AUTH_OK


async def test_plaintext_auth_only_on_loopback_when_allowed(mailflow_server, pki, users):
    _, cert, _ = pki
    mf = await mailflow_server(**door(cert, users, sasl_auth_enable=True, allow_plaintext_auth_on_loopback=True))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert "AUTH" in await ehlo(c)
    assert (await c.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret")))[0] == 235
    await c.close()


async def test_auth_rate_limit_counts_every_auth_command(mailflow_server, pki, users, caplog):
    """Failed logins and refused AUTH commands count; past the limit even the right password gets 450 4.7.1, and
    the session goes on (Postfix's smtpd_client_auth_rate_limit)."""
    caplog.set_level(logging.INFO)
    _, cert, _ = pki
    mf = await mailflow_server(**door(cert, users, sasl_auth_enable=True, allow_plaintext_auth_on_loopback=True,
                                      client_auth_rate_limit=2))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await ehlo(c)
    replies = [await c.cmd(line) for line in ("AUTH PLAIN " + b64(b"\0alice\0wrong"), "AUTH CRAM-MD5",
                                                "AUTH PLAIN " + b64(b"\0alice\0s3cret"), "NOOP")]
    assert [r.code for r in replies] == [535, 504, 450, 250]
    assert replies[2].text == "450 4.7.1 Error: too many AUTH commands from 127.0.0.1"
    assert [r.getMessage() for r in caplog.records if "limit exceeded" in r.getMessage()] == [
        f"AUTH command rate limit exceeded: 3 from {LOOPBACK_CLIENT} for service smtp"]
    await c.close()


async def test_listener_overrides_apply_to_that_listener_only(mailflow_server):
    mf = await mailflow_server(smtpd={"listeners": [
        {"address": "127.0.0.1:0", "overrides": {"recipient_limit": 1, "banner": "ESMTP other"}}]})
    plain, other = (port for _, port in mf.smtp_addresses)
    for port, limit in ((plain, None), (other, 1)):
        c = await SmtpClient.connect(port)
        assert ("ESMTP other" in c.greeting.text) == (limit == 1)
        await ehlo(c)
        await c.cmd("MAIL FROM:<s@remote.test>")
        assert (await c.cmd("RCPT TO:<alice@local.test>"))[0] == 250
        assert (await c.cmd("RCPT TO:<bob@local.test>"))[0] == (452 if limit else 250)
        await c.close()


async def test_starttls_is_required_before_the_pipelining_check(mailflow_server, pki, users):
    """Postfix's smtpd_proto answers 530 before it looks for input pipelined where it must not be: a command that
    needs TLS is refused for that, and the session goes on."""
    _, cert, ctx = pki
    mf = await mailflow_server(**door(cert, users, {"address": "127.0.0.1:0", "role": "submission"}))
    c = await SmtpClient.connect(mf.smtpd.address_of("submission")[1])
    await c.send(b"MAIL FROM:<alice@local.test>\r\nNOOP\r\n")  # before EHLO: every command is checked
    assert await c.reply() == status.STARTTLS_FIRST
    assert await c.reply() == status.OK  # NOOP needs no TLS, and nothing was pending after it
    await ehlo(c)
    await c.send(b"DATA\r\nNOOP\r\n")  # DATA ends a group
    assert await c.reply() == status.STARTTLS_FIRST
    assert (await c.reply())[0] == 250
    await c.starttls(ctx)
    assert "AUTH PLAIN LOGIN" in await ehlo(c)
    await c.close()


async def test_sender_login_mismatch_refused_on_submission(mailflow_server, pki, users):
    _, cert, ctx = pki
    listener = {"address": "127.0.0.1:0", "role": "submission",
                "overrides": {"reject_sender_login_mismatch": True,
                              "sender_login_maps": ["inline:{alice@local.test=alice, { @shared.test = alice bob }}"]}}
    mf = await mailflow_server(**door(cert, users, listener))
    c = await SmtpClient.connect(mf.smtpd.address_of("submission")[1])
    await ehlo(c)
    await c.starttls(ctx)
    await ehlo(c)
    assert (await c.cmd("AUTH PLAIN " + b64(b"\0bob\0hunter2")))[0] == 235
    assert await c.cmd("MAIL FROM:<alice@local.test>") == status.sender_login_mismatch("alice@local.test", "bob")
    assert (await c.cmd("MAIL FROM:<team@shared.test>"))[0] == 250
    await c.close()


def test_sender_login_rules_without_and_with_maps():
    alice = "alice@local.test"
    # the [smtpd] reject_sender_login_mismatch setting's
    bare = SenderLogins([], resolve=str, own_address_without_maps=True)
    assert bare.refusal("Alice@local.test", alice) is None
    assert bare.refusal("bob@local.test", alice) == status.sender_login_mismatch("bob@local.test", alice)
    assert bare.refusal("bob@local.test", None) is None
    # the list items': Postfix's
    assert SenderLogins([], resolve=str).refusal("bob@local.test", alice) is None
    maps = SenderLogins([InlineTable("inline:t", {"bob@local.test": "bob"})], resolve=str)
    assert maps.refusal("bob@local.test", None) is not None  # owned, client not logged in
    assert maps.refusal("carol@local.test", alice) is not None  # logged in, owns nothing listed
    assert maps.refusal("", alice) is None  # the null sender


def test_sender_login_maps_are_asked_quoted_then_internal():
    """smtpd_sender_login_maps: Postfix's check_mail_addr_find, mail_addr_find's legacy form (docs/config.md)."""
    maps = SenderLogins([InlineTable("inline:t", {"s.1.@x.test": "sam", '"s 2"@x.test': "sue"})], resolve=str,
                        delimiter="+")
    assert maps.owners('"s.1."@x.test') == maps.owners('"s.1.+e"@x.test') == {"sam"}
    assert maps.owners('"s 2+e"@x.test') == {"sue"}


# ---------------------------------------------------------------------------------------------- slow-down


class RecordingClock(VirtualClock):
    def __init__(self):
        super().__init__()
        self.slept: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


async def test_failures_slow_down_the_next_attempt_before_its_hash():
    clock = RecordingClock()
    table = InlineTable("inline:u", {"alice": hash_password("pw", **FAST)})
    hasher = PasswordHasher(1)
    auth = Authenticator([table], clock=clock, failures=FailureCounter(clock, 60), hasher=hasher, delay=1.0,
                         delay_limit=3.0)
    for _ in range(5):
        assert (await auth.check("192.0.2.1", "PLAIN", b"alice", b"bad")).reply == status.AUTH_FAILED
    assert clock.slept == [1.0, 2.0, 3.0, 3.0]  # the first attempt waits for nothing; each next one longer
    assert (await auth.check("192.0.2.2", "PLAIN", b"alice", b"bad")).reply == status.AUTH_FAILED
    assert len(clock.slept) == 4  # another client starts from the beginning
    clock.advance(61)
    ok = await auth.check("192.0.2.1", "PLAIN", b"alice", b"pw")
    assert ok.login == "alice" and ok.reply == status.AUTH_OK
    assert len(clock.slept) == 4  # old failures left the window
    assert failure_delay(40, 1.0, 16.0) == 16.0
    hasher.close()


async def test_the_delay_comes_before_the_hash():
    clock = RecordingClock()

    class CountingHasher:
        """Records how many delays were served before each hash."""
        def __init__(self):
            self.sleeps_before: list[int] = []

        async def verify(self, password, stored):
            self.sleeps_before.append(len(clock.slept))
            return False

    hasher = CountingHasher()
    auth = Authenticator([InlineTable("inline:u", {})], clock=clock, failures=FailureCounter(clock, 60),
                         hasher=hasher, delay=1.0, delay_limit=8.0)
    for _ in range(3):
        await auth.check("192.0.2.1", "LOGIN", b"x", b"y")
    assert hasher.sleeps_before == [0, 1, 2] and clock.slept == [1.0, 2.0]


async def test_auth_plain_authorization_identity_must_be_the_login():
    clock = RecordingClock()
    table = InlineTable("inline:u", {"alice": hash_password("pw", **FAST)})
    hasher = PasswordHasher(1)
    auth = Authenticator([table], clock=clock, failures=FailureCounter(clock, 60), hasher=hasher, delay=0,
                         delay_limit=0)
    assert (await auth.check("192.0.2.1", "PLAIN", b"alice", b"pw", authzid=b"bob")).reply == status.AUTH_FAILED
    assert auth.failures.recent("192.0.2.1") == 1
    assert (await auth.check("192.0.2.1", "PLAIN", b"alice", b"pw", authzid=b"alice")).login == "alice"
    hasher.close()


def test_failure_table_is_bounded_and_forgets_old_failures():
    clock = VirtualClock()
    failures = FailureCounter(clock, 60, max_clients=100, per_client=8)
    for i in range(1000):
        failures.record(f"192.0.2.{i % 250}" if i < 250 else f"198.51.{i // 256}.{i % 256}")
    assert len(failures) == 100
    for _ in range(50):
        failures.record("203.0.113.9")
    assert failures.recent("203.0.113.9") == 8
    clock.advance(61)
    failures.record("203.0.113.10")
    assert len(failures) == 1  # past the bound, the stale ones went first


# ---------------------------------------------------------------------------------------------- limits


def test_anvil_count_and_rate_limits():
    clock = VirtualClock()
    anvil = Anvil(count_limit=2, rate_limit=0, time_unit=60, clock=clock)
    assert anvil.admit("192.0.2.1") is None and anvil.admit("192.0.2.1") is None
    assert anvil.admit("192.0.2.1") == ("Connection concurrency", 3)
    assert anvil.admit("192.0.2.9") is None
    anvil.release("192.0.2.1")
    assert anvil.admit("192.0.2.1") is None
    rate = Anvil(count_limit=0, rate_limit=3, time_unit=60, clock=clock,
                 exempt=lambda ip: ip == "127.0.0.1")
    assert [rate.admit("192.0.2.1") for _ in range(4)] == [None, None, None, ("Connection rate", 4)]
    assert all(rate.admit("127.0.0.1") is None for _ in range(10))
    clock.advance(61)
    assert rate.admit("192.0.2.1") is None


def test_anvil_rate_starts_again_a_time_unit_after_the_first_connection():
    """As Postfix's anvil counts: per time unit from the client's first connection, refused attempts included;
    a client that keeps retrying is admitted again once its time unit is over (a sliding window kept it out)."""
    clock = VirtualClock()
    anvil = Anvil(count_limit=0, rate_limit=2, time_unit=60, clock=clock)
    admitted = []
    for _ in range(8):
        admitted.append(anvil.admit("192.0.2.1") is None)
        clock.advance(10)
    assert admitted == [True, True, False, False, False, False, False, True]
    assert anvil.rate("192.0.2.1") == 1


def test_anvil_counts_mail_per_time_unit_refused_ones_too():
    """Postfix's smtpd_client_message_rate_limit: MAIL commands per time unit, those refused counted too; 0 is no
    limit and counts nothing; exempt clients are not counted."""
    clock = VirtualClock()
    anvil = Anvil(count_limit=0, rate_limit=0, time_unit=60, clock=clock, count_events=True,
                  exempt=lambda ip: ip == "127.0.0.1")
    assert anvil.admit("192.0.2.1") is None
    assert [anvil.event("mail", "192.0.2.1", 2) for _ in range(4)] == [
        None, None, ("Message delivery request rate", 3), ("Message delivery request rate", 4)]
    clock.advance(59)
    assert anvil.event("mail", "192.0.2.1", 2) == ("Message delivery request rate", 5)
    clock.advance(2)  # the unit that began with the connection is over: every count starts again
    assert anvil.event("mail", "192.0.2.1", 2) is None
    assert anvil.event("mail", "192.0.2.2", 0) is None and anvil.rate("192.0.2.2") == 0  # no limit: not counted
    assert all(anvil.event("mail", "127.0.0.1", 1) is None for _ in range(5))


def test_anvil_events_share_the_time_unit_of_the_connection():
    """One time unit per client for all its counts, begun by its connection when that came first (anvil.c): a
    MAIL 50 s into the unit and one 11 s later are in two units, where a unit begun at the first MAIL would hold
    both."""
    clock = VirtualClock()
    anvil = Anvil(count_limit=50, rate_limit=0, time_unit=60, clock=clock, count_events=True)
    assert anvil.admit("192.0.2.1") is None
    clock.advance(50)
    assert anvil.event("mail", "192.0.2.1", 1) is None
    clock.advance(11)
    assert anvil.event("mail", "192.0.2.1", 1) is None
    assert anvil.event("mail", "192.0.2.1", 1) == ("Message delivery request rate", 2)


def test_anvil_counts_each_event_apart():
    clock = VirtualClock()
    anvil = Anvil(count_limit=0, rate_limit=0, time_unit=60, clock=clock, count_events=True)
    assert [anvil.event("rcpt", "192.0.2.1", 2) for _ in range(3)] == [None, None, ("Recipient address rate", 3)]
    assert anvil.event("mail", "192.0.2.1", 1) is None  # its own count


def test_anvil_memory_stays_bounded_under_many_clients(monkeypatch):
    """One record per client, dropped once its time unit is over when the table is full (about 60 live here: the
    table never holds more than twice those, nor fewer than STALE_SWEEP_SIZE before a sweep)."""
    monkeypatch.setattr(anvil_module, "STALE_SWEEP_SIZE", 100)
    clock = VirtualClock()
    anvil = Anvil(count_limit=0, rate_limit=0, time_unit=60, clock=clock, count_events=True)
    for i in range(1000):
        anvil.event("mail", f"10.0.{i // 250}.{i % 250}", 5)
        clock.advance(1)
    assert len(anvil._windows) <= 2 * 61


def test_many_live_clients_cost_one_sweep_per_doubling_not_one_per_connection(monkeypatch):
    """Clients all inside their time unit cannot be swept: the next sweep waits until the table has doubled."""
    monkeypatch.setattr(anvil_module, "STALE_SWEEP_SIZE", 100)
    anvil = Anvil(count_limit=0, rate_limit=0, time_unit=60, clock=VirtualClock(), count_events=True)
    sweeps = []
    forget = anvil._forget_stale
    monkeypatch.setattr(anvil, "_forget_stale", lambda now: (sweeps.append(now), forget(now)))
    for i in range(1000):
        anvil.event("mail", f"10.0.{i // 250}.{i % 250}", 5)
    assert len(anvil._windows) == 1000 and len(sweeps) == 4  # at 100, 200, 400 and 800 clients


async def test_session_slots_wait_then_refuse():
    slots = SessionSlots(1)
    assert await slots.acquire()
    waiter = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    assert not waiter.done() and slots.waiting == 1
    assert await slots.acquire() is False  # one waits already
    slots.release()
    assert await asyncio.wait_for(waiter, 1)


async def test_per_client_connection_limit_answers_421(mailflow_server):
    mf = await mailflow_server(smtpd={"client_connection_count_limit": 2})
    port = mf.smtp_addresses[0][1]
    first, second, third = [await SmtpClient.connect(port, greet=False) for _ in range(3)]
    assert (await first.reply())[0] == 220 and (await second.reply())[0] == 220
    assert await third.reply() == status.too_many_connections("mx.mailflow.test", "127.0.0.1")
    assert (await third.reply())[0] is None  # closed
    await first.cmd("QUIT")
    fourth = await SmtpClient.connect(port)  # greeted: 220
    for c in (first, second, third, fourth):
        await c.close()


async def test_mynetworks_clients_are_exempt_from_per_client_limits(mailflow_server):
    mf = await mailflow_server(mynetworks=["127.0.0.0/8"], smtpd={"client_connection_count_limit": 1})
    port = mf.smtp_addresses[0][1]
    clients = [await SmtpClient.connect(port, greet=False) for _ in range(3)]
    assert [(await c.reply())[0] for c in clients] == [220, 220, 220]
    for c in clients:
        await c.close()


async def test_connection_rate_limit(mailflow_server):
    mf = await mailflow_server(smtpd={"client_connection_rate_limit": 2})
    port = mf.smtp_addresses[0][1]
    codes = []
    for _ in range(3):
        c = await SmtpClient.connect(port, greet=False)
        codes.append((await c.reply())[0])
        await c.close()
    assert codes == [220, 220, 421]


async def test_message_rate_limit_refuses_mail_and_the_session_goes_on(mailflow_server, caplog):
    caplog.set_level(logging.INFO)
    mf = await mailflow_server(smtpd={"client_message_rate_limit": 2})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await ehlo(c)
    replies = [await c.cmd(line) for line in ("MAIL FROM:<a@remote.test>", "RSET", "MAIL FROM:<bad",
                                                "MAIL FROM:<a@remote.test>", "MAIL FROM:")]
    assert [r.code for r in replies] == [250, 250, 501, 450, 501]  # the malformed one counted, not the usage
    assert replies[3] == status.event_rate_exceeded("mail", "127.0.0.1")
    assert replies[3].text == "450 4.7.1 Error: too much mail from 127.0.0.1"
    assert (await c.cmd("NOOP")).code == 250
    assert [r.getMessage() for r in caplog.records if "limit exceeded" in r.getMessage()] == [
        f"Message delivery request rate limit exceeded: 3 from {LOOPBACK_CLIENT} for service smtp"]
    await c.close()


async def test_recipient_rate_limit_counts_refused_recipients_and_vrfy(mailflow_server, caplog):
    caplog.set_level(logging.INFO)
    mf = await mailflow_server(smtpd={"client_recipient_rate_limit": 3, "recipient_limit": 1,
                                      "disable_vrfy_command": False})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await ehlo(c)
    replies = [await c.cmd(line) for line in ("MAIL FROM:<a@remote.test>", "RCPT TO:<alice@local.test>",
                                                "RCPT TO:<bob@local.test>", "VRFY bob@local.test",
                                                "RCPT TO:<alice@local.test>", "NOOP")]
    assert [r.code for r in replies] == [250, 250, 452, 252, 450, 250]  # past recipient_limit: counted all the same
    assert replies[4].text == "450 4.7.1 Error: too many recipients from 127.0.0.1"
    assert [r.getMessage() for r in caplog.records if "limit exceeded" in r.getMessage()] == [
        f"Recipient address rate limit exceeded: 4 from {LOOPBACK_CLIENT} for service smtp"]
    await c.close()


async def test_max_sessions_holds_the_greeting_until_a_slot_frees(mailflow_server):
    mf = await mailflow_server(mynetworks=["127.0.0.0/8"], smtpd={"max_sessions": 1})
    port = mf.smtp_addresses[0][1]
    first = await SmtpClient.connect(port)  # greeted: 220
    second = await SmtpClient.connect(port, greet=False)
    await eventually(lambda: mf.smtpd.listeners[0].slots.waiting == 1)  # its session waits for a slot
    greeting = asyncio.ensure_future(second.reply())
    third = await SmtpClient.connect(port, greet=False)
    assert (await third.reply())[0] == 421  # one already waits
    assert not greeting.done()  # answered after it: no greeting while waiting for a slot
    await first.cmd("QUIT")
    assert (await greeting)[0] == 220
    for c in (first, second, third):
        await c.close()


async def test_implicit_tls_clients_that_never_start_the_handshake_hold_session_slots(mailflow_server, pki, users):
    """On 465 the handshake comes after the admission: silent connections take the listener's slots and its
    waiting places like any session, and the next one is refused at once (asyncio would keep each open for its
    60 s handshake timeout, beyond every limit), its 421 over TLS after its handshake. A TLS client is served once
    a slot frees."""
    _, cert, ctx = pki
    mf = await mailflow_server(**door(cert, users, {"address": "127.0.0.1:0", "role": "submissions",
                                                    "overrides": {"max_sessions": 2}}))
    port = mf.smtpd.address_of("submissions")[1]
    silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]  # 2 sessions, 2 waiting
    listener = mf.smtpd.listeners[-1]
    await eventually(lambda: listener.slots.waiting == 2)
    refused = await SmtpClient.connect(port, tls=ctx, greet=False)
    assert await refused.reply() == status.SERVER_BUSY
    assert await refused.closed()
    await refused.close()
    for _, writer in silent[:3]:
        writer.close()
    c = await SmtpClient.connect(port, tls=ctx)
    assert "AUTH" in await ehlo(c)
    await c.close()
    silent[3][1].close()


async def refusing_door(mailflow_server, pki, users, **overrides):
    """A server with a submissions (implicit TLS) listener with these overrides: its port, its Listener and the
    clients' TLS context."""
    _, cert, ctx = pki
    mf = await mailflow_server(**door(cert, users, {"address": "127.0.0.1:0", "role": "submissions",
                                                    "overrides": overrides}))
    return mf.smtpd.address_of("submissions")[1], mf.smtpd.listeners[-1], ctx


async def test_refusals_on_an_implicit_tls_port_hold_few_handshakes(mailflow_server, pki, users, caplog,
                                                                     monkeypatch):
    """A client past its connection count on 465 gets its 421 over TLS, after a handshake (Postfix's wrapper mode
    refuses so). Those handshakes are bounded apart from the sessions: REFUSAL_HANDSHAKES at once per listener
    (starttls_timeout or REFUSAL_HANDSHAKE_TIMEOUT each); beyond them a refused connection is closed at once
    without a word, its refusal logged all the same. The places come back as those connections end."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(server_module, "REFUSAL_HANDSHAKES", 2)
    port, listener, ctx = await refusing_door(mailflow_server, pki, users, client_connection_count_limit=1)
    admitted = await SmtpClient.connect(port, tls=ctx)
    refused = await SmtpClient.connect(port, tls=ctx, greet=False)
    assert await refused.reply() == status.too_many_connections("mx.mailflow.test", "127.0.0.1")
    assert await refused.closed()
    await refused.close()
    silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]  # refused, in their handshakes
    await eventually(lambda: listener.refusing.taken == 2)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # no place for its handshake: closed at once
    writer.close()
    for _, silent_writer in silent:
        silent_writer.close()
    await eventually(lambda: listener.refusing.taken == 0)
    refused = await SmtpClient.connect(port, tls=ctx, greet=False)
    assert await refused.reply() == status.too_many_connections("mx.mailflow.test", "127.0.0.1")
    await refused.close()
    await admitted.close()
    assert limit_warnings(caplog) == [
        f"Connection concurrency limit exceeded: 2 from {LOOPBACK_CLIENT} for service submissions"] * 3


async def test_a_refusal_handshake_is_cut_short_whatever_starttls_timeout_is(mailflow_server, pki, users,
                                                                                monkeypatch):
    """A refused client that never starts its handshake holds one of the few refusal places for at most
    REFUSAL_HANDSHAKE_TIMEOUT (starttls_timeout, 300 s here, would let a handful of them hold every place)."""
    monkeypatch.setattr(server_module, "REFUSAL_HANDSHAKE_TIMEOUT", 0.3)
    port, listener, ctx = await refusing_door(mailflow_server, pki, users, client_connection_count_limit=1)
    admitted = await SmtpClient.connect(port, tls=ctx)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)  # refused; silent in its handshake
    await eventually(lambda: listener.refusing.taken == 1)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed once its handshake took too long
    assert listener.refusing.taken == 0
    writer.close()
    await admitted.close()


async def test_a_client_refused_for_want_of_a_slot_holds_no_connection_count_in_its_handshake(mailflow_server, pki,
                                                                                             users):
    """On 465 a connection refused because every session and waiting place is taken waits for its handshake to
    get its 421 over TLS; meanwhile its client's connection count does not count it, so the client's next
    connection is refused for the same reason, not as one too many of its own."""
    port, listener, ctx = await refusing_door(mailflow_server, pki, users, max_sessions=1,
                                              client_connection_count_limit=3)
    silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]  # a session, a waiting one
    await eventually(lambda: listener.slots.waiting == 1)
    silent.append(await asyncio.open_connection("127.0.0.1", port))  # refused: no slot; silent in its handshake
    await eventually(lambda: listener.refusing.taken == 1)
    refused = await SmtpClient.connect(port, tls=ctx, greet=False)
    assert await refused.reply() == status.SERVER_BUSY
    await refused.close()
    for _, writer in silent:
        writer.close()

async def test_the_tls_summary_line_follows_the_listener_s_tls_loglevel(mailflow_server, pki, users, caplog):
    """Postfix's smtpd_tls_loglevel, which a master.cf service may override: 0 (the default) writes no line for a
    handshake that went well, 1 tls_misc.c's summary; a failed handshake is logged at either."""
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    _, cert, ctx = pki
    mf = await mailflow_server(**door(cert, users, {"address": "127.0.0.1:0", "overrides": {"tls_loglevel": 1}}))
    tls_lines = []
    for _, port in mf.smtp_addresses:
        start = len(caplog.records)
        good = await SmtpClient.connect(port)
        await ehlo(good)
        await good.starttls(ctx)
        await ehlo(good)
        await good.close()
        failed = await SmtpClient.connect(port)
        await ehlo(failed)
        assert (await failed.cmd("STARTTLS")).code == 220
        await failed.send(b"not a TLS ClientHello" * 10)
        assert await failed.closed()
        await failed.close()
        await sessions_over(mf)
        tls_lines.append([r.getMessage().partition(": TLSv1")[0] for r in caplog.records[start:]
                          if "TLS connection established" in r.getMessage() or "SSL_accept" in r.getMessage()])
    assert tls_lines == [[f"SSL_accept error from {LOOPBACK_CLIENT}: -1"],
                         [f"Anonymous TLS connection established from {LOOPBACK_CLIENT}",
                          f"SSL_accept error from {LOOPBACK_CLIENT}: -1"]]


def limit_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if "limit exceeded" in r.getMessage() or r.getMessage().startswith("Refusing ")]


async def test_new_tls_session_rate_limit_with_starttls(mailflow_server, pki, users, caplog):
    """Postfix's smtpd_client_new_tls_session_rate_limit: the handshake past the limit is answered with 421 over the
    new TLS and the session ends; after it, STARTTLS gets 454 without a handshake and the session goes on."""
    caplog.set_level(logging.INFO)
    _, cert, ctx = pki
    mf = await mailflow_server(**door(cert, users, client_new_tls_session_rate_limit=1))
    port = mf.smtp_addresses[0][1]
    first = await SmtpClient.connect(port)
    await ehlo(first)
    await first.starttls(ctx)
    await ehlo(first)
    await first.close()
    second = await SmtpClient.connect(port)
    await ehlo(second)
    await second.starttls(ctx)
    assert await second.reply() == status.too_many_new_tls_sessions("mx.mailflow.test", LOOPBACK_CLIENT)
    assert await second.closed()
    await second.close()
    third = await SmtpClient.connect(port)
    await ehlo(third)
    assert await third.cmd("STARTTLS") == status.starttls_refused(LOOPBACK_CLIENT)
    assert (await third.cmd("NOOP")).code == 250
    await third.close()
    assert limit_warnings(caplog) == [f"New TLS session rate limit exceeded: 2 from {LOOPBACK_CLIENT} for service smtp",
                                      f"Refusing STARTTLS request from {LOOPBACK_CLIENT} for service smtp"]


async def test_a_failed_handshake_counts_as_a_new_tls_session(mailflow_server, pki, users):
    """As in Postfix (the CPU was spent all the same)."""
    _, cert, ctx = pki
    mf = await mailflow_server(**door(cert, users, client_new_tls_session_rate_limit=1))
    port = mf.smtp_addresses[0][1]
    failed = await SmtpClient.connect(port)
    await ehlo(failed)
    assert (await failed.cmd("STARTTLS")).code == 220
    await failed.send(b"not a TLS ClientHello" * 10)
    assert await failed.closed()
    await failed.close()
    await sessions_over(mf)
    second = await SmtpClient.connect(port)
    await ehlo(second)
    await second.starttls(ctx)
    assert (await second.reply()).code == 421
    await second.close()


async def test_new_tls_session_rate_limit_with_implicit_tls(mailflow_server, pki, users, caplog):
    """On a submissions listener the same 421 comes in place of the greeting; after it the connection is closed
    before any handshake, without a word, as Postfix refuses a wrapper-mode client."""
    caplog.set_level(logging.INFO)
    _, cert, ctx = pki
    mf = await mailflow_server(**door(cert, users, {"address": "127.0.0.1:0", "role": "submissions",
                                                    "overrides": {"client_new_tls_session_rate_limit": 1}}))
    port = mf.smtpd.address_of("submissions")[1]
    first = await SmtpClient.connect(port, tls=ctx)
    await first.close()
    second = await SmtpClient.connect(port, tls=ctx, greet=False)
    assert await second.reply() == status.too_many_new_tls_sessions("mx.mailflow.test", LOOPBACK_CLIENT)
    assert await second.closed()
    await second.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed before the handshake
    writer.close()
    assert limit_warnings(caplog) == [
        f"New TLS session rate limit exceeded: 2 from {LOOPBACK_CLIENT} for service submissions",
        f"Refusing TLS service request from {LOOPBACK_CLIENT} for service submissions"]


def starttls_session(port: int, ctx: ssl.SSLContext,
                     session: ssl.SSLSession | None) -> tuple[ssl.SSLSession, bool, str]:
    """A blocking STARTTLS session (asyncio's start_tls cannot resume a TLS session): (its TLS session, whether it
    was resumed, the first reply over TLS to EHLO). Bounded by socket timeouts."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        reader = raw.makefile("rb")
        reader.readline()
        raw.sendall(b"EHLO client.test\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        raw.sendall(b"STARTTLS\r\n")
        assert reader.readline().startswith(b"220 ")
        with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            tls.sendall(b"EHLO client.test\r\n")
            first = tls.makefile("rb").readline().decode()
            return tls.session, tls.session_reused, first


async def test_resumed_tls_sessions_are_not_new_ones(mailflow_server, pki, users):
    _, cert, ctx = pki
    mf = await mailflow_server(**door(cert, users, client_new_tls_session_rate_limit=1))
    port = mf.smtp_addresses[0][1]
    session, reused, first = await asyncio.to_thread(starttls_session, port, ctx, None)
    assert not reused and first.startswith("250")
    _, reused, first = await asyncio.to_thread(starttls_session, port, ctx, session)
    assert reused and first.startswith("250")  # not counted
    _, reused, first = await asyncio.to_thread(starttls_session, port, ctx, None)
    assert not reused and first.startswith("421 4.7.0")  # the second new one


# ---------------------------------------------------------------------------------------------- config, TLS


def test_config_errors_name_the_listener(pki, users):
    def load(**smtpd):
        return config_from_dict(merged({"smtpd": {"listen": []}}, {"smtpd": smtpd}))

    unknown = r"smtpd.listeners: listener 0 \(127.0.0.1:587\): overrides.tls_cert: unknown"
    with pytest.raises(ConfigError, match=unknown):
        load(listeners=[{"address": "127.0.0.1:587", "overrides": {"tls_cert": "x"}}])
    with pytest.raises(ConfigError, match=r"listener 1 \(127.0.0.1:465, submissions\): needs tls_cert_file"):
        load(sasl_user_maps=[users], listeners=[{"address": "127.0.0.1:25"}, {"address": "127.0.0.1:465",
                                                                               "role": "submissions"}])
    with pytest.raises(ConfigError, match="sasl_auth_enable needs sasl_user_maps"):
        load(tls_cert_file=pki[1], listeners=[{"address": "127.0.0.1:587", "role": "submission"}])
    with pytest.raises(ConfigError, match="role"):
        load(listeners=[{"address": "127.0.0.1:587", "role": "lmtp"}])
    with pytest.raises(ConfigError, match="overrides.recipient_limit"):
        load(listeners=[{"address": "127.0.0.1:25", "overrides": {"recipient_limit": 0}}])


async def test_missing_certificate_stops_the_start_naming_the_file(mailflow_server, tmp_path):
    missing = tmp_path / "nope.pem"
    with pytest.raises(TlsError, match=str(missing)):
        await mailflow_server(smtpd={"tls_cert_file": str(missing)})


async def test_reload_serves_the_rotated_certificate_to_new_sessions(mailflow_server, pki, users, tmp_path):
    ca, cert, ctx = pki
    mf = await mailflow_server(**door(cert, users, {"address": "127.0.0.1:0", "role": "submissions"},
                                      {"address": "127.0.0.1:0", "role": "submission"}))
    ports = [p for _, p in mf.smtp_addresses[1:]]
    old = await SmtpClient.connect(ports[0], tls=ctx)
    ca.issue_cert("localhost", "127.0.0.1", "rotated.test").private_key_and_cert_chain_pem.write_to_path(cert)
    await mf.reload(mf.config)
    new = await SmtpClient.connect(ports[0], tls=ctx)
    assert "rotated.test" in new.peer_names() and "rotated.test" not in old.peer_names()
    assert (await old.cmd("NOOP"))[0] == 250  # the running session was not dropped
    starttls = await SmtpClient.connect(ports[1])
    await ehlo(starttls)
    await starttls.starttls(ctx)
    assert "rotated.test" in starttls.peer_names()
    for c in (old, new, starttls):
        await c.close()
