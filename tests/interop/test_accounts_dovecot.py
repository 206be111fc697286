"""The account database end to end, against a private Dovecot started with exactly what `mailflow dovecot-config`
prints (plus this test's paths and ports): `mailflow account` makes the mailboxes; mail sent through mailflow
is read back byte-exact over IMAP and POP3 with the account's password, in both wirings (mailflow writes the
Maildir that Dovecot reads; mailflow delivers by LMTP to Dovecot); AUTH PLAIN on submission works with
mailflow's own check and with smtpd.sasl_type = "dovecot"; `passwd` ends the old password everywhere, `remove`
makes RCPT 550 5.1.1, over quota bounces 5.2.2, and a stopped Dovecot gives 454 4.7.0.

Dovecot runs as root with its own base_dir, state and log in a fresh 0755 folder under /tmp (its mail processes run
as uid 65534, who cannot enter pytest's private tmp_path), stopped by its process group at teardown; the system
instance is never touched."""
from __future__ import annotations

import asyncio
import email
import email.policy
import imaplib
import os
import poplib
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import pytest
import trustme

from mailflow.tables.accounts import CHECK_INTERVAL
from tests.support import require_tool
from tests.support import eventually, free_port, queue_becomes, rcpt_reply, send
from tests.interop.test_dovecot_lmtp import added_headers, stop, wait_for_listeners

pytestmark = pytest.mark.interop

MAIL_UID = 65534  # nobody: Dovecot refuses uid 0 for mail
# Where the logins meant to fail come from, each its own address: Dovecot's auth penalty (per client address: a
# login after a failure waits 2 s, doubling) held whichever of them began after another had failed, and the logins
# after them, some runs and not others (a test of 5 s took 9 s or 14 s).
SMTP_FAILING, IMAP_FAILING, POP3_FAILING = "127.0.0.2", "127.0.0.3", "127.0.0.4"
MESSAGE = (
    b"From: Sender <sender@remote.test>\r\n"
    b"To: alice@example.test\r\n"
    b"Subject: accounts interop\r\n"
    b"Date: Mon, 01 Jan 2024 12:00:00 +0000\r\n"
    b"Message-ID: <accounts-interop-1@remote.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"first line\r\n"
    b".a line starting with a dot\r\n"
    b"8-bit: \xc3\xa9t\xc3\xa9\r\n"
    b"last line\r\n"
)


def mailflow_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailflow", *args], input=stdin, capture_output=True, text=True,
                          timeout=60)


@dataclass
class World:
    root: Path
    config: Path
    ca: str
    imaps_port: int
    pop3_port: int
    proc: subprocess.Popen | None = None

    @property
    def db(self) -> Path:
        return self.root / "accounts.db"

    def account(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return mailflow_cli("account", *args, "--config", str(self.config), stdin=stdin)

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca)

    def imap_fetch(self, user: str, password: str) -> list[bytes]:
        with imaplib.IMAP4_SSL("127.0.0.1", self.imaps_port, ssl_context=self.tls(), timeout=10) as imap:
            imap.login(user, password)
            imap.select("INBOX", readonly=True)
            _, [numbers] = imap.search(None, "ALL")
            return [imap.fetch(n, "(RFC822)")[1][0][1] for n in numbers.split()]

    def pop3_fetch(self, user: str, password: str) -> list[bytes]:
        pop = poplib.POP3("127.0.0.1", self.pop3_port, timeout=10)
        try:
            pop.stls(context=self.tls())
            pop.user(user)
            pop.pass_(password)
            count = pop.stat()[0]
            return [b"\r\n".join(pop.retr(n)[1]) + b"\r\n" for n in range(1, count + 1)]
        finally:
            pop.quit()

    def imap_login_fails(self, user: str, password: str) -> bool:
        """From IMAP_FAILING."""
        try:
            with _ImapFrom(IMAP_FAILING, "127.0.0.1", self.imaps_port, ssl_context=self.tls(), timeout=10) as imap:
                imap.login(user, password)
        except imaplib.IMAP4.error as e:
            return "AUTHENTICATIONFAILED" in str(e)
        return False

    def pop3_login_fails(self, user: str, password: str) -> bool:
        """From POP3_FAILING."""
        pop = _Pop3From(POP3_FAILING, "127.0.0.1", self.pop3_port, timeout=10)
        try:
            pop.stls(context=self.tls())
            pop.user(user)
            pop.pass_(password)
        except poplib.error_proto as e:
            return b"Authentication failed" in e.args[0]
        finally:
            pop.close()
        return False

    def stop_dovecot(self) -> None:
        if self.proc is not None:
            stop(self.proc)


class _ImapFrom(imaplib.IMAP4_SSL):
    """IMAP4_SSL connecting from the loopback address `source`."""

    def __init__(self, source: str, *args, **kwargs):
        self.source = source
        super().__init__(*args, **kwargs)

    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


class _Pop3From(poplib.POP3):
    """POP3 connecting from the loopback address `source`."""

    def __init__(self, source: str, *args, **kwargs):
        self.source = source
        super().__init__(*args, **kwargs)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))


async def auth_reply(world: World, port: int, user: str, password: str, source: str = "127.0.0.1") -> int:
    """The code AUTH PLAIN gets on a submission listener, after STARTTLS, from the loopback address `source`."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True, tls_context=world.tls(),
                               timeout=15, source_address=(source, 0)) as client:
        await client.ehlo()  # the one after STARTTLS
        try:
            return (await client.auth_plain(user, password)).code
        except aiosmtplib.SMTPAuthenticationError as e:
            return e.code


@pytest.fixture
def world(tmp_path, write_config):
    dovecot = require_tool("dovecot")
    root = Path(tempfile.mkdtemp(prefix="mailflow-accounts-", dir="/tmp"))
    os.chmod(root, 0o755)
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(root / "ca.pem"))
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(root / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(root / "cert.pem"))
    world = World(root, tmp_path / "mailflow.toml", str(root / "ca.pem"), free_port(), free_port())
    accounts = str(world.db)
    write_config(world.config, **{
        "virtual_mailbox_domains": [f"accounts:{accounts}#domains"],
        "virtual_mailbox_maps": [f"accounts:{accounts}#mailboxes"],
        "virtual_alias_maps": [f"accounts:{accounts}#aliases"],
        "virtual_mailbox_limit_maps": [f"accounts:{accounts}#quotas"],
        "virtual_mailbox_base": str(root / "vmail"),
        "virtual_uid_maps": [f"static:{MAIL_UID}"],
        "virtual_gid_maps": [f"static:{MAIL_UID}"],
        "accounts": {"database_file": accounts},
    })
    init = mailflow_cli("account", "init", "--config", str(world.config))
    assert init.returncode == 0, init.stderr
    for name, args in (("dovecot.conf", []), ("mailflow-sql.conf.ext", ["--sql"])):
        out = mailflow_cli("dovecot-config", "--config", str(world.config), "--ssl-cert", str(root / "cert.pem"),
                           "--ssl-key", str(root / "key.pem"), "--sql-file", str(root / "mailflow-sql.conf.ext"),
                           "--listen", "127.0.0.1", "--imap-port", str(free_port()), "--imaps-port",
                           str(world.imaps_port), "--pop3-port", str(world.pop3_port), "--pop3s-port",
                           str(free_port()), "--base-dir", str(root / "run"), "--state-dir", str(root / "state"),
                           "--log-path", str(root / "dovecot.log"), *args)
        assert out.returncode == 0, out.stderr
        (root / name).write_text(out.stdout)
    with open(root / "stderr.log", "wb") as stderr:
        world.proc = subprocess.Popen([dovecot, "-F", "-c", str(root / "dovecot.conf")], start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for_listeners([world.imaps_port, world.pop3_port], world.proc, root)
        yield world
    finally:
        world.stop_dovecot()
        shutil.rmtree(root, ignore_errors=True)


async def start_mailflow(world: World, mailflow_server, **more) -> tuple:
    """mailflow with the account tables, a submission listener checking passwords itself and one asking Dovecot."""
    accounts = str(world.db)
    mf = await mailflow_server(**{
        "virtual_mailbox_domains": [f"accounts:{accounts}#domains"],
        "virtual_mailbox_maps": [f"accounts:{accounts}#mailboxes"],
        "virtual_alias_maps": [f"accounts:{accounts}#aliases"],
        "virtual_mailbox_limit_maps": [f"accounts:{accounts}#quotas"],
        "virtual_mailbox_base": str(world.root / "vmail"),
        "virtual_uid_maps": [f"static:{MAIL_UID}"],
        "virtual_gid_maps": [f"static:{MAIL_UID}"],
        "smtpd": {
            "tls_cert_file": str(world.root / "cert.pem"), "tls_key_file": str(world.root / "key.pem"),
            "sasl_user_maps": [f"accounts:{accounts}#passwords"], "auth_failure_delay": 0,
            "listeners": [
                {"address": "127.0.0.1:0", "role": "submission"},
                {"address": "127.0.0.1:0", "role": "submission",
                 "overrides": {"sasl_type": "dovecot", "sasl_path": str(world.root / "run" / "auth-mailflow"),
                               # past Dovecot's auth penalty for an address that keeps failing (at
                               # most 15 s): its answer is slow, not missing, and the test wants it
                               "sasl_timeout": "20s"}}]},
        **more})
    submission = [li.server.sockets[0].getsockname()[1] for li in mf.smtpd.listeners if li.role == "submission"]
    return mf, mf.smtp_addresses[0][1], submission[0], submission[1]


def add_user(world: World, address: str, password: str, *extra: str) -> None:
    result = world.account("user", "add", address, "--password-stdin", *extra, stdin=password + "\n")
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------------- tests


async def test_one_account_for_delivery_imap_pop3_and_submission(world, mailflow_server):
    assert world.account("domain", "add", "example.test").returncode == 0
    add_user(world, "alice@example.test", "first-password")
    add_user(world, "bob@example.test", "bobs-password")
    lmtp = f"lmtp:unix:{world.root / 'run' / 'lmtp-mailflow'}"
    mf, port, own_check, dovecot_check = await start_mailflow(
        world, mailflow_server, transport_maps=[f"inline:{{bob@example.test={lmtp}}}"])

    # Both wirings: alice's copy written by mailflow into the Maildir, bob's delivered by LMTP to Dovecot
    await send(port, "sender@remote.test", ["alice@example.test", "bob@example.test"], MESSAGE,
               mail_options=["BODY=8BITMIME"])
    assert await queue_becomes(mf.store, {}, timeout=15) == {}
    maildir = world.root / "vmail" / "example.test" / "alice" / "Maildir"
    [stored] = list((maildir / "new").iterdir())
    assert (stored.stat().st_uid, stored.stat().st_mode & 0o777) == (MAIL_UID, 0o600)
    assert (maildir.stat().st_uid, maildir.stat().st_mode & 0o777) == (MAIL_UID, 0o700)
    for fetch in (world.imap_fetch, world.pop3_fetch):
        [mail] = await asyncio.to_thread(fetch, "alice@example.test", "first-password")
        assert added_headers(mail, MESSAGE) == ["Return-Path", "X-Original-To", "Delivered-To", "Received"]
        [mail] = await asyncio.to_thread(fetch, "bob@example.test", "bobs-password")
        assert added_headers(mail, MESSAGE) == ["Return-Path", "Delivered-To", "Received", "Received"]

    # AUTH PLAIN with the same password: mailflow's own check and Dovecot's
    assert await auth_reply(world, own_check, "alice@example.test", "first-password") == 235
    assert await auth_reply(world, dovecot_check, "Alice@Example.test", "first-password") == 235
    assert await auth_reply(world, own_check, "alice@example.test", "wrong-password") == 535

    # passwd: the old password fails on SMTP (both checks), IMAP and POP3; the new one works
    assert world.account("user", "passwd", "alice@example.test", "--password-stdin",
                         stdin="second-password\n").returncode == 0
    await asyncio.sleep(CHECK_INTERVAL + 0.1)  # mailflow sees a change within CHECK_INTERVAL
    old = await asyncio.gather(
        auth_reply(world, own_check, "alice@example.test", "first-password", source=SMTP_FAILING),
        auth_reply(world, dovecot_check, "alice@example.test", "first-password", source=SMTP_FAILING),
        asyncio.to_thread(world.imap_login_fails, "alice@example.test", "first-password"),
        asyncio.to_thread(world.pop3_login_fails, "alice@example.test", "first-password"))
    assert old == [535, 535, True, True]
    assert await auth_reply(world, own_check, "alice@example.test", "second-password") == 235
    assert await auth_reply(world, dovecot_check, "alice@example.test", "second-password") == 235
    assert len(await asyncio.to_thread(world.imap_fetch, "alice@example.test", "second-password")) == 1

    # remove: RCPT refused as an unknown user
    assert await rcpt_reply(port, "alice@example.test") == (250, "250 2.1.5 Ok")
    assert world.account("user", "remove", "alice@example.test").returncode == 0
    await asyncio.sleep(CHECK_INTERVAL + 0.1)
    code, text = await rcpt_reply(port, "alice@example.test")
    assert (code, text.split()[1]) == (550, "5.1.1"), text


async def test_over_quota_bounces_with_5_2_2(world, mailflow_server, smtp_peer):
    sender_mx = await smtp_peer()
    assert world.account("domain", "add", "example.test").returncode == 0
    add_user(world, "carol@example.test", "carols-password", "--quota", "2K")
    _, port, _, _ = await start_mailflow(
        world, mailflow_server, transport_maps=[f"inline:{{remote.test=smtp:[127.0.0.1]:{sender_mx.port}}}"])
    await send(port, "sender@remote.test", ["carol@example.test"], MESSAGE + (b"x" * 70 + b"\r\n") * 50)

    bounces = await eventually(lambda: [m for m in sender_mx.messages if m.mail_from == "<>"], timeout=15)
    notice = email.message_from_bytes(bounces[0].content, policy=email.policy.default)
    status = next(p for p in notice.walk() if p.get_content_type() == "message/delivery-status").get_payload()
    assert (status[1]["Action"], status[1]["Status"]) == ("failed", "5.2.2")
    assert "is full" in status[1]["Diagnostic-Code"]
    # a small message still fits
    await send(port, "sender@remote.test", ["carol@example.test"], MESSAGE)
    mails = await eventually(lambda: list((world.root / "vmail/example.test/carol/Maildir/new").glob("*")) or None,
                             timeout=15)
    assert len(mails) == 1


async def test_a_stopped_dovecot_gives_454_and_mailflows_own_check_goes_on(world, mailflow_server):
    assert world.account("domain", "add", "example.test").returncode == 0
    add_user(world, "dave@example.test", "daves-password")
    _, _, own_check, dovecot_check = await start_mailflow(world, mailflow_server)
    assert await auth_reply(world, dovecot_check, "dave@example.test", "daves-password") == 235

    world.stop_dovecot()
    assert await auth_reply(world, dovecot_check, "dave@example.test", "daves-password") == 454
    assert await auth_reply(world, dovecot_check, "dave@example.test", "daves-password") == 454
    assert await auth_reply(world, own_check, "dave@example.test", "daves-password") == 235
