"""Draining at stop (SIGTERM): no new connection, idle sessions told 421 4.3.2, a transaction under way may end
with its 250 within the grace period, what outlasts it is cut without losing anything acknowledged."""
from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from mailflow import status
from mailflow.app import Mailflow, reload_logged
from mailflow.stages import qmgr as qmgr_module
from mailflow.config import config_from_dict
from mailflow.errors import ConfigError
from mailflow.logs import MAIL_LOGGER
from mailflow import uncut as uncut_module
from mailflow.transports import maildir
from mailflow.transports.local import mbox
from tests.component.test_smtpd_hardening import _connect_unread, _pipeline_until
from tests.support.inchild import patched_in_child
from tests.support import (SmtpClient, accepts, base_settings, eventually, half_client_hello, maildir_messages,
                           queue_becomes, queue_counts, script_dir, send)

HOST = "mx.mailflow.test"


async def test_stop_lets_a_transaction_end_and_tells_idle_sessions_to_go(mailflow_server, tmp_path):
    mf = await mailflow_server()
    port = mf.smtp_addresses[0][1]
    idle = await SmtpClient.connect(port)
    await idle.cmd("EHLO client.test")
    busy = await SmtpClient.connect(port)
    await busy.envelope()
    assert (await busy.cmd("DATA")).code == 354

    stopping = asyncio.create_task(mf.stop())
    assert await idle.reply() == status.shutting_down(HOST)
    assert await idle.closed()
    assert not accepts(port)  # no new connection meanwhile
    await busy.send(b"Subject: late\r\n\r\nbody\r\n.\r\n")
    queued = await busy.reply()
    assert queued.text.startswith("250 2.0.0 Ok: queued as"), queued
    assert await busy.reply() == status.shutting_down(HOST)  # its transaction over, it goes too
    await asyncio.wait_for(stopping, 1.5)  # well within the grace (2 s): nothing was left to wait for
    assert queue_counts(tmp_path / "queue" / "queue.db") == {"incoming": 1}


async def test_a_transaction_ended_during_the_stop_is_the_sessions_last(mailflow_server, tmp_path):
    """A client whose message ends during the drain gets its 250, then 421: the next MAIL it sends at once (it
    need not wait for the server's next look) starts no transaction, so busy clients cannot hold the stop to the
    end of its grace period and be cut there in the middle of a message."""
    mf = await mailflow_server()
    port = mf.smtp_addresses[0][1]
    busy = await SmtpClient.connect(port)
    await busy.envelope()
    assert (await busy.cmd("DATA")).code == 354

    stopping = asyncio.create_task(mf.stop())
    await eventually(lambda: not accepts(port), what="the stop has begun")
    await busy.send(b"Subject: late\r\n\r\nbody\r\n.\r\nMAIL FROM:<s@remote.test>\r\n")
    queued = await busy.reply()
    assert queued.text.startswith("250 2.0.0 Ok: queued as"), queued
    assert await busy.reply() == status.shutting_down(HOST)  # not 250 to the MAIL
    assert await busy.closed()
    await asyncio.wait_for(stopping, 1.5)  # well within the grace (2 s)
    assert queue_counts(tmp_path / "queue" / "queue.db") == {"incoming": 1}


async def test_stop_cuts_a_transaction_that_outlasts_the_grace_period(tmp_path):
    mf = Mailflow(config_from_dict({**base_settings(tmp_path), "shutdown_grace": 0.3}))
    await mf.start()
    slow = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await slow.envelope()  # and nothing more
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(mf.stop(), 2)
    assert 0.3 <= loop.time() - started < 1.5
    assert await slow.closed()  # cut: its client got no 250 and sends the message again later
    assert queue_counts(tmp_path / "queue" / "queue.db") == {}


async def test_a_reload_puts_a_new_shutdown_grace_in_force(tmp_path):
    """shutdown_grace is not one of the settings a reload keeps for a restart: the stop after a reload waits the
    new one (it waited the one the server started with, without a word)."""
    mf = Mailflow(config_from_dict({**base_settings(tmp_path), "shutdown_grace": 30}))
    await mf.start()
    try:
        assert await mf.reload(config_from_dict({**base_settings(tmp_path), "shutdown_grace": 0.3})) == []
        slow = await SmtpClient.connect(mf.smtp_addresses[0][1])
        await slow.envelope()  # and nothing more
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(mf.stop(), 20)
        assert 0.3 <= loop.time() - started < 10  # the new 0.3 s, far from the 30 s it started with
        assert await slow.closed()
    finally:
        await mf.stop()


async def test_a_refused_reload_leaves_grace_cache_limit_and_auth_window_as_they_were(tmp_path, users):
    """A reload refused at its last fallible step (a listen address taken) changes none of the three settings a
    reload applies to what the server keeps across reloads: shutdown_grace, postscreen's cache_limit and the AUTH
    failures' window (anvil_rate_time_unit)."""
    def settings(grace: float, cache_limit: int, window: float, *listen: str) -> dict:
        base = base_settings(tmp_path)
        return {**base, "shutdown_grace": grace, "smtpd": {
            **base["smtpd"], "listen": ["127.0.0.1:0", *listen], "anvil_rate_time_unit": window,
            "sasl_auth_enable": True, "sasl_user_maps": [users], "allow_plaintext_auth_on_loopback": True,
            "auth_failure_delay": 0.01,
            "postscreen": {"enable": True, "access_list": [], "greet_wait": 0.01, "cache_limit": cache_limit}}}
    mf = Mailflow(config_from_dict(settings(0.3, 100, 0.5)))
    await mf.start()
    try:
        for n in range(3):
            mf.smtpd.screened.record(f"192.0.2.{n}", {"pregreet": 1e12}, 0.0)
        with socket.create_server(("127.0.0.1", 0)) as taken:
            with pytest.raises(ConfigError, match="Address already in use"):
                await mf.reload(config_from_dict(settings(30, 1, 3600, f"127.0.0.1:{taken.getsockname()[1]}")))
        assert mf.smtpd.screened.limit == 100
        assert all(mf.smtpd.screened.passed(f"192.0.2.{n}", ("pregreet",), 1.0) for n in range(3))
        mf.smtpd.auth_failures.record("127.0.0.1")
        assert mf.smtpd.auth_failures.recent("127.0.0.1") == 1
        await eventually(lambda: mf.smtpd.auth_failures.recent("127.0.0.1") == 0, timeout=5)  # (0.5 s, not 3600)
        slow = await SmtpClient.connect(mf.smtp_addresses[0][1])
        await slow.envelope()  # and nothing more
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(mf.stop(), 20)
        assert 0.3 <= loop.time() - started < 10  # the 0.3 s in force, not the refused 30 s
    finally:
        await mf.stop()


async def test_a_reload_logs_the_warnings_the_new_configuration_brings_as_the_start_does(mailflow_server, caplog):
    """A listener's overrides.postscreen.cache_limit (ignored: one cache for the server) brought by a reload is
    logged as serve's start logs it (it was taken silently); a warning already in force is not repeated."""
    mf = await mailflow_server()
    settings = mf.config.model_dump()
    listener = {"address": "127.0.0.1:0", "role": "mta", "overrides": {"postscreen": {"cache_limit": 5}}}
    changed = config_from_dict({**settings, "smtpd": {**settings["smtpd"], "listeners": [listener]}})
    caplog.set_level(logging.WARNING, logger="mailflow")
    for _ in range(2):
        assert await reload_logged(mf, lambda: changed, "m.toml")
    warnings = [m for m in (r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
                if "cache_limit" in m]
    assert len(warnings) == 1 and warnings[0].startswith("m.toml: smtpd.listeners: listener 0 (127.0.0.1:0, mta): ")


async def test_a_stop_writes_nothing_into_a_tls_handshake(mailflow_server, pki, users):
    """A session in its TLS handshake (after STARTTLS, or first on a submissions listener) is closed at a stop
    without the 421: it would reach the client in plaintext, in the middle of its handshake."""
    _, cert, _ = pki
    mf = await mailflow_server(smtpd={"tls_cert_file": cert, "sasl_user_maps": [users],
                                      "listeners": [{"address": "127.0.0.1:0", "role": "submissions"}]})
    after_starttls = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await after_starttls.cmd("EHLO client.test")).code == 250
    assert (await after_starttls.cmd("STARTTLS")).code == 220
    implicit = await SmtpClient.connect(mf.smtpd.address_of("submissions")[1], greet=False)
    for c in (after_starttls, implicit):
        await c.send(half_client_hello())
    await eventually(lambda: len(mf.smtpd.sessions) == 2, what="both sessions under way")
    await asyncio.wait_for(mf.stop(), 1.5)  # nothing to wait for: well within the grace (2 s)
    assert [await c.rest() for c in (after_starttls, implicit)] == [b"", b""]


async def test_the_stops_421_carries_the_reject_footer_as_every_other_refusal(mailflow_server):
    """The idle session's 421 at a stop goes out as any reply does: with the footer (and the session's records)."""
    mf = await mailflow_server(smtpd={"reject_footer": "more: $client_address"})
    idle = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await idle.cmd("EHLO client.test")
    stopping = asyncio.create_task(mf.stop())
    reply = await idle.reply()
    assert reply.text == "421-4.3.2 mx.mailflow.test Service shutting down, closing transmission channel\n" \
                         "421 4.3.2 more: 127.0.0.1"  # (Postfix's smtp_reply_footer: the reply's codes on each line)
    assert await idle.closed()
    await asyncio.wait_for(stopping, 1.5)


async def test_a_session_waiting_for_its_client_to_read_is_gone_when_the_stop_returns(mailflow_server):
    """A session in a transaction whose client reads none of its replies waits in drain: hung up at the end of the
    grace, asyncio's close() kept its socket, and the session, until the client read them, or the session's own
    timeout (here 60 s) after the stop. Now the stop drops what is unsent: the session and its fd are gone."""
    mf = await mailflow_server(smtpd={"timeout": "60s", "forbid_unauth_pipelining": False,
                                      "junk_command_limit": 10**9})
    writes_paused = asyncio.Event()
    client = await _connect_unread(mf.smtp_addresses[0][1])
    try:
        await asyncio.get_running_loop().sock_sendall(client, b"EHLO client.test\r\nMAIL FROM:<s@remote.test>\r\n")
        await eventually(lambda: len(mf.smtpd.sessions) == 1, timeout=5)
        session = next(iter(mf.smtpd.sessions))
        pause_writing = session.pause_writing
        session.pause_writing = lambda: (writes_paused.set(), pause_writing())
        raw = session.transport
        raw.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        await _pipeline_until(client, b"NOOP\r\n" * 2000, writes_paused)
        assert session.in_transaction
        await asyncio.wait_for(mf.smtpd.stop(grace=0.3), 3)
        assert not mf.smtpd.sessions
        assert raw.get_extra_info("socket").fileno() == -1  # (closed: its fd given back)
    finally:
        client.close()


async def test_a_connection_accepted_in_the_turn_the_stop_begins_is_drained_by_it(mailflow_server, tmp_path):
    """The stop is woken in the very turn the listener accepts a connection: its session (whose start is still
    queued on the loop) is drained with the others, not begun after the stop returned, when it answered a whole
    transaction with 250 (or hung at its end of data, the queue closed)."""
    mf = await mailflow_server()
    loop = asyncio.get_running_loop()
    woken = loop.create_future()

    async def stop_once_woken() -> None:
        await woken
        await mf.smtpd.stop(grace=1.0)

    stopping = asyncio.create_task(stop_once_woken())
    await asyncio.sleep(0)  # (it waits for woken now)
    client = socket.create_connection(mf.smtp_addresses[0])  # in the kernel's queue: accepted in the next turn,
    loop.call_soon(woken.set_result, None)  # after this, which was queued first: the stop resumes in that turn
    try:
        await asyncio.wait_for(stopping, 3)
        assert not mf.smtpd.sessions
        reader, writer = await asyncio.open_connection(sock=client)
        first = await asyncio.wait_for(reader.readline(), 3)
        writer.write(b"EHLO client.test\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@local.test>\r\nDATA\r\n"
                     b"Subject: late\r\n\r\nbody\r\n.\r\n")
        try:
            rest = await asyncio.wait_for(reader.read(), 3)
        except ConnectionResetError:  # (its writes reached a closed socket)
            rest = b""
        writer.close()
    finally:
        client.close()
    assert first in (b"", f"{status.shutting_down(HOST)}\r\n".encode()), first  # told to go, or closed at once
    assert rest == b""
    assert queue_counts(tmp_path / "queue" / "queue.db") == {}


class LmtpSlowAfterTheFirst:
    """An LMTP peer on 127.0.0.1 that takes every message; after its end of data it answers the first recipient at
    once and the others only once `answer_all` is set (a peer slow with its later replies). `deliveries`: the RCPT
    addresses of each message it took."""

    def __init__(self):
        self.deliveries: list[list[bytes]] = []
        self.answer_all = asyncio.Event()

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 lmtp.test LMTP\r\n")
        rcpts: list[bytes] = []
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"LHLO":
                writer.write(b"250-lmtp.test\r\n250 8BITMIME\r\n")
            elif verb in (b"MAIL", b"RSET"):
                rcpts = []
                writer.write(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                rcpts.append(line.split(b":", 1)[1].strip())
                writer.write(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                while (await reader.readline()) not in (b".\r\n", b""):
                    pass
                self.deliveries.append(rcpts)
                writer.write(b"250 2.0.0 Saved\r\n")  # the first recipient's: in its mailbox now
                await writer.drain()
                await self.answer_all.wait()
                writer.write(b"250 2.0.0 Saved\r\n" * (len(rcpts) - 1))
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                break
            await writer.drain()
        writer.close()


async def test_a_stop_records_what_an_lmtp_peer_took_before_the_cut_so_a_restart_delivers_it_once(tmp_path):
    """The stop cuts off a delivery whose LMTP peer has saved the first recipient's copy (its 250 read) and is slow
    with the second's reply. The first recipient's result was lost with the cut (qmgr had no report): after the
    restart the peer got the message for both again. It is recorded: the restart delivers the second alone."""
    peer = LmtpSlowAfterTheFirst()
    server = await asyncio.start_server(peer.session, "127.0.0.1", 0)
    hop = f"[127.0.0.1]:{server.sockets[0].getsockname()[1]}"
    config = config_from_dict({**base_settings(tmp_path), "transport_maps": [f"inline:{{ relay.test=lmtp:{hop} }}"]})
    try:
        mf = Mailflow(config, shutdown_grace=0.3)
        await mf.start()
        try:
            await send(mf.smtp_addresses[0][1], "s@remote.test", ["a@relay.test", "b@relay.test"],
                       b"Subject: once\r\n\r\nbody\r\n")
            await eventually(lambda: peer.deliveries, what="the peer took the message")
        finally:
            await asyncio.wait_for(mf.stop(), 5)  # (the grace: the first reply is read, the second never comes)
        assert queue_counts(tmp_path / "queue" / "queue.db") == {"active": 1}

        peer.answer_all.set()
        mf = Mailflow(config, shutdown_grace=0.3)
        await mf.start()
        try:
            await queue_becomes(mf.store, {})
        finally:
            await mf.stop()
        assert peer.deliveries == [[b"<a@relay.test>", b"<b@relay.test>"], [b"<b@relay.test>"]]
    finally:
        peer.answer_all.set()
        server.close()
        await server.wait_closed()


class LmtpHoldingBob(LmtpSlowAfterTheFirst):
    """An LMTP peer that saves a message at once but one for bob@local.test, whose reply it holds until `answer_all`
    is set (and which it does not save when the client left meanwhile); `deliveries`: the RCPT addresses of each
    message it saved."""

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 lmtp.test LMTP\r\n")
        rcpts: list[bytes] = []
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"LHLO":
                writer.write(b"250-lmtp.test\r\n250 8BITMIME\r\n")
            elif verb in (b"MAIL", b"RSET"):
                rcpts = []
                writer.write(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                rcpts.append(line.split(b":", 1)[1].strip())
                writer.write(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                while (await reader.readline()) not in (b".\r\n", b""):
                    pass
                if b"<bob@local.test>" in rcpts:
                    await self.answer_all.wait()
                    if reader.at_eof():  # (the client gone meanwhile: nothing saved)
                        break
                self.deliveries.append(rcpts)
                writer.write(b"250 2.0.0 Saved\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                break
            await writer.drain()
        writer.close()


async def test_a_stop_while_an_alias_s_second_pass_is_under_way_leaves_the_alias_queued_for_both(tmp_path,
                                                                                                 monkeypatch):
    """`alice: \\alice, bob` with mailboxes passed to LMTP (local.mailbox_transport, as for Dovecot): the peer saved
    alice's copy and holds bob's reply when a stop cuts the walk off. The LMTP client said alice's copy was final,
    about the address passed, alice's own: qmgr recorded the recipient alice sent, and bob's copy was never
    delivered, after the restart neither. The pass is one of two destinations: its word is not the recipient's
    (local(8) passes it with offset -1), alice stays queued and the restart delivers both copies."""
    monkeypatch.setattr(uncut_module, "UNCUT_LIMIT", 0.3)
    peer = LmtpHoldingBob()
    server = await asyncio.start_server(peer.session, "127.0.0.1", 0)
    hop = f"[127.0.0.1]:{server.sockets[0].getsockname()[1]}"
    (tmp_path / "aliases").write_text("alice: \\alice, bob\n")
    settings = base_settings(tmp_path)
    config = config_from_dict({**settings, "myorigin": "local.test", "alias_maps": [f"texthash:{tmp_path / 'aliases'}"],
                               "local": {**settings["local"], "mailbox_transport": f"lmtp:{hop}"}})
    try:
        mf = Mailflow(config, shutdown_grace=0.3)
        await mf.start()
        try:
            await send(mf.smtp_addresses[0][1], "s@remote.test", ["alice@local.test"], b"Subject: once\r\n\r\nbody\r\n")
            await eventually(lambda: peer.deliveries, what="the peer saved alice's copy")
            await asyncio.sleep(0.2)  # (bob's copy under way: its reply held)
        finally:
            await asyncio.wait_for(mf.stop(), 5)
        assert peer.deliveries == [[b"<alice@local.test>"]]
        assert queue_counts(tmp_path / "queue" / "queue.db") == {"active": 1}

        peer.answer_all.set()
        mf = Mailflow(config, shutdown_grace=0.3)
        await mf.start()
        try:
            await queue_becomes(mf.store, {})
        finally:
            await mf.stop()
        assert sorted(map(tuple, peer.deliveries)) == [(b"<alice@local.test>",), (b"<alice@local.test>",),
                                                       (b"<bob@local.test>",)]
    finally:
        peer.answer_all.set()
        server.close()
        await server.wait_closed()


class HeldMaildirWrite:
    """A server whose virtual mailbox carol@virtual.test (`local`: local delivery's alice@local.test) gets its Maildir
    file from a worker thread that, once it began (`writing`), waits for `release` (20 s at most) before it writes;
    `let_go()`: the writes as they were (a restart's)."""

    def __init__(self, tmp_path, monkeypatch, local: bool = False) -> None:
        self.release, self.writing = threading.Event(), threading.Event()
        if local:
            self.recipient, self.maildir = "alice@local.test", tmp_path / "mail" / "alice" / "Maildir"
            self.config = config_from_dict(base_settings(tmp_path))
        else:
            self.recipient, self.maildir = "carol@virtual.test", tmp_path / "vmail" / "virtual.test" / "carol"
            self.config = config_from_dict({**base_settings(tmp_path), "virtual_mailbox_domains": ["virtual.test"],
                                            "virtual_mailbox_maps": ["inline:{carol@virtual.test=virtual.test/carol/}"],
                                            "virtual_mailbox_base": str(tmp_path / "vmail")})
        self._write, self._monkeypatch = maildir.write_maildir_file, monkeypatch
        monkeypatch.setattr(maildir, "write_maildir_file", self._held)

    def _held(self, *args, **kwargs):
        self.writing.set()
        self.release.wait(20)
        return self._write(*args, **kwargs)

    async def sent(self, mf: Mailflow) -> None:
        """A message for the recipient sent to `mf`, returned once its write began."""
        await send(mf.smtp_addresses[0][1], "s@remote.test", [self.recipient], b"Subject: once\r\n\r\nbody\r\n")
        await eventually(self.writing.is_set, what="the write began")

    def let_go(self) -> None:
        self._monkeypatch.setattr(maildir, "write_maildir_file", self._write)


@pytest.fixture
def held_maildir_write(tmp_path, monkeypatch) -> Iterator[HeldMaildirWrite]:
    held = HeldMaildirWrite(tmp_path, monkeypatch)
    yield held
    held.release.set()  # (a thread a failed test left waiting)


async def test_a_stop_waits_for_a_maildir_write_under_way_and_records_it_so_a_restart_delivers_it_once(
        tmp_path, held_maildir_write):
    """The stop's cancel came while virtual's worker thread wrote carol's file: the thread went on and put it in
    new/, but the result was lost with the cancel, and the restart wrote a second copy. The cancel now waits for
    the write (a local file: it ends on its own) and the result is recorded."""
    held = held_maildir_write
    mf = Mailflow(held.config, shutdown_grace=0.1)
    await mf.start()
    try:
        await held.sent(mf)
        asyncio.get_running_loop().call_later(0.6, held.release.set)  # well after the grace's cancel
    finally:
        await asyncio.wait_for(mf.stop(), 5)
    assert held.release.is_set(), "the stop did not wait for the write"
    assert queue_counts(tmp_path / "queue" / "queue.db") == {}

    held.let_go()
    mf = Mailflow(held.config, shutdown_grace=0.1)
    await mf.start()
    try:
        await queue_becomes(mf.store, {})
    finally:
        await mf.stop()
    assert len(maildir_messages(held.maildir)) == 1


async def test_a_stop_waits_for_a_stuck_maildir_write_no_longer_than_the_uncut_limit(tmp_path, monkeypatch, caplog,
                                                                                     held_maildir_write):
    """A write that never ends (a mailbox on a dead NFS server) held the stop for ever once the stop's cancel
    waited for mailbox writes. It waits UNCUT_LIMIT seconds, then the cancel goes through with one warning: the
    recipient stays queued (active, taken again after the next start), as when Postfix's agent is killed."""
    monkeypatch.setattr(uncut_module, "UNCUT_LIMIT", 0.5)
    held = held_maildir_write
    mf = Mailflow(held.config, shutdown_grace=0.1)
    await mf.start()
    try:
        await held.sent(mf)
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(mf.stop(), 5)
        assert asyncio.get_running_loop().time() - started < 3
    finally:
        held.release.set()
    assert queue_counts(tmp_path / "queue" / "queue.db") == {"active": 1}
    cut = [r.getMessage() for r in caplog.records if "still under way" in r.getMessage()]
    assert len(cut) == 1 and re.match(rf"\w+: the write of {held.maildir}/new/\S+ still under way 0.5s "
                                      r"after a stop's cancel", cut[0]), cut


@pytest.mark.parametrize("ends", ["while the stop records", "after the stop"])
@pytest.mark.parametrize("agent", ["local", "virtual"])
async def test_a_mailbox_write_past_the_uncut_limit_is_recorded_when_it_ends_while_the_stop_records_results(
        tmp_path, monkeypatch, caplog, agent, ends):
    """Local delivery's (or virtual's) write of a Maildir file held past UNCUT_LIMIT at a stop: the cancel went
    through (the stop bounded), the thread finished the write, but the recipient stayed queued and the restart wrote
    a second copy. A write that ends while the stop records the results back is recorded (one copy); one that ends
    later leaves the recipient queued, as the warning says (the restart writes it again)."""
    monkeypatch.setattr(uncut_module, "UNCUT_LIMIT", 0.3)
    caplog.set_level(logging.INFO, MAIL_LOGGER)
    held = HeldMaildirWrite(tmp_path, monkeypatch, local=agent == "local")
    try:
        mf = Mailflow(held.config, shutdown_grace=1.0)
        await mf.start()
        try:
            await held.sent(mf)
            if ends == "while the stop records":  # (at the cut-off's warning)
                asyncio.get_running_loop().create_task(eventually(lambda: "still under way" in caplog.text and (
                    held.release.set() or True), what="the cut-off"))
            started = asyncio.get_running_loop().time()
        finally:
            await asyncio.wait_for(mf.stop(), 10)
        assert asyncio.get_running_loop().time() - started < 5
    finally:
        held.release.set()
    cut = [r.getMessage() for r in caplog.records if "still under way" in r.getMessage()]
    assert len(cut) == 1 and re.match(rf"\w+: the write of {held.maildir}/new/\S+ still under way 0.3s after a "
                                      r"stop's cancel: its result is recorded if it ends", cut[0]), cut
    await eventually(lambda: len(maildir_messages(held.maildir)) == 1, what="the write ended")
    assert queue_counts(tmp_path / "queue" / "queue.db") == {"active": 1}  # (the job cut: the message taken again)
    sent = [r.getMessage() for r in caplog.records if f"to=<{held.recipient}>" in r.getMessage()]
    assert [" status=sent " in line for line in sent] == ([True] if ends == "while the stop records" else []), sent

    held.let_go()
    mf = Mailflow(held.config, shutdown_grace=0.1)
    await mf.start()
    try:
        await queue_becomes(mf.store, {})
    finally:
        await mf.stop()
    assert len(maildir_messages(held.maildir)) == (1 if ends == "while the stop records" else 2)


async def test_a_write_cut_off_past_the_uncut_limit_holds_the_stop_no_longer_than_its_late_window(
        tmp_path, monkeypatch, caplog, held_maildir_write):
    """carol's Maildir write never ends (held past the stop): cut off at UNCUT_LIMIT, its result to come was waited
    for as long as the stop records the results back, min(grace, RECORD_GRACE): grace + UNCUT_LIMIT + grace in
    all. It is waited for LATE_RESULT_GRACE at most, then cut off: carol stays queued, nothing recorded."""
    monkeypatch.setattr(uncut_module, "UNCUT_LIMIT", 0.3)
    monkeypatch.setattr(qmgr_module, "LATE_RESULT_GRACE", 0.2)
    caplog.set_level(logging.INFO, MAIL_LOGGER)
    held = held_maildir_write
    mf = Mailflow(held.config, shutdown_grace=1.5)
    await mf.start()
    try:
        await held.sent(mf)
        started = asyncio.get_running_loop().time()
    finally:
        try:
            await asyncio.wait_for(mf.stop(), 10)
        finally:
            held.release.set()
    assert asyncio.get_running_loop().time() - started < 1.5 + 0.3 + 0.2 + 0.8  # (grace + 0.3 + 1.5 before)
    assert "its result is recorded if it ends" in caplog.text
    assert queue_counts(tmp_path / "queue" / "queue.db") == {"active": 1}
    assert "to=<carol@virtual.test>" not in caplog.text


@pytest.mark.parametrize("recipient", ["alice@local.test", "team@local.test"])
async def test_a_mailbox_write_passed_to_virtual_and_cut_off_is_recorded_for_the_local_recipient(
        tmp_path, monkeypatch, caplog, recipient):
    """local's mailbox_transport passes alice's mailbox to virtual, whose write is held past UNCUT_LIMIT at a stop
    and let go at the cut-off. virtual handed on its late result about the address it was given (alice, for team's
    expansion too), which qmgr dropped as no recipient of the job: the warning said it would be recorded, the
    restart wrote a second copy. It is made the local recipient's, as the pass's result is: one copy."""
    monkeypatch.setattr(uncut_module, "UNCUT_LIMIT", 0.3)
    caplog.set_level(logging.INFO, MAIL_LOGGER)
    held = HeldMaildirWrite(tmp_path, monkeypatch)
    (tmp_path / "aliases").write_text("team: alice@local.test\n")
    settings = base_settings(tmp_path)
    config = config_from_dict({**settings, "alias_maps": [f"texthash:{tmp_path / 'aliases'}"],
                               "local": {**settings["local"], "mailbox_transport": "virtual"},
                               "virtual_mailbox_maps": ["inline:{alice@local.test=local.test/alice/}"],
                               "virtual_mailbox_base": str(tmp_path / "vmail")})
    mailbox = tmp_path / "vmail" / "local.test" / "alice"
    try:
        mf = Mailflow(config, shutdown_grace=0.5)
        await mf.start()
        try:
            await send(mf.smtp_addresses[0][1], "s@remote.test", [recipient], b"Subject: once\r\n\r\nbody\r\n")
            await eventually(held.writing.is_set, what="the write began")
            asyncio.get_running_loop().create_task(eventually(lambda: "still under way" in caplog.text and (
                held.release.set() or True), what="the cut-off"))
        finally:
            await asyncio.wait_for(mf.stop(), 10)
    finally:
        held.release.set()
    assert "its result is recorded if it ends" in caplog.text
    sent = [r.getMessage() for r in caplog.records if "to=<alice@local.test>" in r.getMessage()]
    assert len(sent) == 1 and " relay=virtual, " in sent[0] and " status=sent (delivered to maildir)" in sent[0], sent
    assert ("orig_to=<team@local.test>" in sent[0]) == (recipient == "team@local.test"), sent

    held.let_go()
    mf = Mailflow(config, shutdown_grace=0.1)
    await mf.start()
    try:
        await queue_becomes(mf.store, {})
    finally:
        await mf.stop()
    assert len(maildir_messages(mailbox)) == 1


_real_open_mailbox = mbox._open_mailbox  # (in call_as's child too: its import of this module comes before the patch)
HOLD = ""  # (set in call_as's child: the directory where its append says it began and waits to be let go)


def _opens_once_let_go(*args, **kwargs):  # (in call_as's child, sent by name)
    """The /file's open held until HOLD/go exists (20 s at most), HOLD/began made first."""
    hold = Path(HOLD)
    (hold / "began").touch()
    for _ in range(1000):
        if (hold / "go").exists():
            break
        time.sleep(0.02)
    return _real_open_mailbox(*args, **kwargs)


@pytest.mark.skipif(os.geteuid() != 0, reason="a /file is written by a child as the user only as root")
async def test_a_file_append_s_child_past_the_uncut_limit_is_recorded_when_it_ends_while_the_stop_records(
        tmp_path, monkeypatch, caplog):
    """An alias's /file, appended by call_as's child as default_privs, held past UNCUT_LIMIT at a stop: the child
    went on and appended the entry whole, the recipient stayed queued, and the restart appended a second one. It
    ends while the stop records the results back: recorded, one entry."""
    monkeypatch.setattr(uncut_module, "UNCUT_LIMIT", 0.3)
    public = Path(tempfile.mkdtemp(dir="/tmp", prefix="mailflow-files-"))
    try:
        public.chmod(0o1777)
        archive = public / "archive"
        archive.touch()
        archive.chmod(0o666)
        monkeypatch.setattr(mbox, "_appended", patched_in_child(mbox, "_appended",
                                                                (mbox, "_open_mailbox", _opens_once_let_go),
                                                                (sys.modules[__name__], "HOLD", str(public))))
        (tmp_path / "aliases").write_text(f"keep: {archive}\n")
        config = config_from_dict({**base_settings(tmp_path), "myorigin": "local.test",
                                   "alias_maps": [f"texthash:{tmp_path / 'aliases'}"]})
        mf = Mailflow(config, shutdown_grace=1.0)
        await mf.start()
        stopping = None  # (a failure before the stop: the finally stops the server, the failure told)
        try:
            await send(mf.smtp_addresses[0][1], "s@remote.test", ["keep@local.test"], b"Subject: once\r\n\r\nbody\r\n")
            await eventually((public / "began").exists, what="the child's append began")
            stopping = asyncio.ensure_future(mf.stop())
            await eventually(lambda: "still under way" in caplog.text, what="the cut-off")
            (public / "go").touch()
        finally:
            (public / "go").touch()
            await asyncio.wait_for(mf.stop() if stopping is None else stopping, 10)
        assert archive.read_text().count("Subject: once") == 1

        monkeypatch.undo()
        mf = Mailflow(config, shutdown_grace=0.1)
        await mf.start()
        try:
            await queue_becomes(mf.store, {})
        finally:
            await mf.stop()
        assert archive.read_text().count("Subject: once") == 1
    finally:
        shutil.rmtree(public, ignore_errors=True)


async def test_a_stop_during_an_alias_s_first_mailbox_write_delivers_each_member_once(tmp_path, monkeypatch):
    """`team: alice, bob`, the stop's cancel while alice's file is written: the cancel landed at bob's write, the
    recipient's one result was lost, and the restart wrote alice's copy a second time. The cancel waits for the
    alias's destinations (mailflow.uncut): the result is recorded, each member has one copy."""
    release, writing = threading.Event(), threading.Event()
    write = maildir.write_maildir_file
    writes: list[str] = []

    def first_write_slow(*args, **kwargs):
        writes.append(str(args[0]))
        if len(writes) == 1:
            writing.set()
            release.wait(10)
        return write(*args, **kwargs)

    monkeypatch.setattr(maildir, "write_maildir_file", first_write_slow)
    aliases = tmp_path / "aliases"
    aliases.write_text("team: alice, bob\n")
    config = config_from_dict({**base_settings(tmp_path), "alias_maps": [f"texthash:{aliases}"],
                               "myorigin": "local.test"})
    mf = Mailflow(config, shutdown_grace=0.1)
    await mf.start()
    try:
        await send(mf.smtp_addresses[0][1], "s@remote.test", ["team@local.test"], b"Subject: once\r\n\r\nbody\r\n")
        await eventually(writing.is_set, what="alice's write began")
        asyncio.get_running_loop().call_later(0.6, release.set)  # well after the grace's cancel
    finally:
        await asyncio.wait_for(mf.stop(), 5)
    assert queue_counts(tmp_path / "queue" / "queue.db") == {}

    monkeypatch.setattr(maildir, "write_maildir_file", write)
    mf = Mailflow(config, shutdown_grace=0.1)
    await mf.start()
    try:
        await queue_becomes(mf.store, {})
    finally:
        await mf.stop()
    assert [len(maildir_messages(tmp_path / "mail" / user / "Maildir")) for user in ("alice", "bob")] == [1, 1]


async def _stop_cutting_off_a_held_write(tmp_path, monkeypatch, aliases: str, held_user: str | None):
    """A stop whose cancel finds a Maildir write (`held_user`'s; None: any) held past UNCUT_LIMIT (0.3 s here)
    for team@local.test, expanded by `aliases`; the write is let go at the cut-off. Returns the configuration (for
    a restart, the write no longer held) and the cut-off's warnings."""
    monkeypatch.setattr(uncut_module, "UNCUT_LIMIT", 0.3)
    release, writing = threading.Event(), threading.Event()
    write = maildir.write_maildir_file

    def held_write(path, *args, **kwargs):
        if held_user is None or path.parent.name == held_user:
            writing.set()
            release.wait(10)
        return write(path, *args, **kwargs)

    monkeypatch.setattr(maildir, "write_maildir_file", held_write)
    (tmp_path / "aliases").write_text(aliases)
    config = config_from_dict({**base_settings(tmp_path), "alias_maps": [f"texthash:{tmp_path / 'aliases'}"],
                               "myorigin": "local.test"})
    warnings: list[str] = []

    class CutOffs(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "still under way" in record.getMessage():
                warnings.append(record.getMessage())
                release.set()

    cut_offs = CutOffs()
    logging.getLogger().addHandler(cut_offs)
    mf = Mailflow(config, shutdown_grace=0.5)
    await mf.start()
    try:
        await send(mf.smtp_addresses[0][1], "s@remote.test", ["team@local.test"], b"Subject: once\r\n\r\nbody\r\n")
        await eventually(writing.is_set, what="the held write began")
    finally:
        try:
            await asyncio.wait_for(mf.stop(), 10)
        finally:
            release.set()
            logging.getLogger().removeHandler(cut_offs)
            monkeypatch.setattr(maildir, "write_maildir_file", write)
    return config, warnings


@pytest.mark.parametrize("held_user", ["alice", "bob"])
async def test_an_alias_s_write_cut_off_is_handed_on_only_when_it_is_the_last_destination(tmp_path, monkeypatch,
                                                                                            caplog, held_user):
    """`team: alice, bob`, one member's Maildir write held past UNCUT_LIMIT at a stop and let go at the cut-off.
    alice's, with bob's still to come: the warning said team's result would be recorded if the write ended in
    time, but bob was never started and nothing was recorded. The cut-off now says team stays queued (the retry
    writes alice's copy again, as when local(8) is killed). bob's, the last: team's result is recorded."""
    caplog.set_level(logging.INFO, MAIL_LOGGER)
    config, cut = await _stop_cutting_off_a_held_write(tmp_path, monkeypatch, "team: alice, bob\n", held_user)
    last = held_user == "bob"
    assert len(cut) == 1 and re.match(r"\w+: the delivery of <team@local.test> to its 2 destinations still under way "
                                      r"0.3s after a stop's cancel: " + ("its result is recorded if it ends" if last
                                      else "cut off, the recipient stays queued"), cut[0]), cut
    sent = [r.getMessage() for r in caplog.records if "to=<team@local.test>" in r.getMessage()]
    assert [" status=sent " in line for line in sent] == ([True] if last else []), sent
    mailboxes = [tmp_path / "mail" / user / "Maildir" for user in ("alice", "bob")]
    await eventually(lambda: len(maildir_messages(mailboxes[0])) == 1, what="alice's write ended")
    assert len(maildir_messages(mailboxes[1])) == (1 if last else 0)

    mf = Mailflow(config, shutdown_grace=0.1)
    await mf.start()
    try:
        await queue_becomes(mf.store, {})
    finally:
        await mf.stop()
    assert [len(maildir_messages(mailbox)) for mailbox in mailboxes] == ([1, 1] if last else [2, 1])


async def test_a_mailbox_write_cut_off_with_a_forward_to_follow_cuts_the_delivery_there(tmp_path, monkeypatch,
                                                                                          caplog):
    """`team: bob@remote.test, alice`: the forward is sent after every other destination, so alice's Maildir write,
    held past UNCUT_LIMIT at a stop, is not team's last though it is the last place read. The cut-off says team
    stays queued and no forward is queued after it (handed on as the last, the forward was made after the stop's
    cut-off and team recorded sent)."""
    caplog.set_level(logging.INFO)
    _, cut = await _stop_cutting_off_a_held_write(tmp_path, monkeypatch, "team: bob@remote.test, alice\n", None)
    assert len(cut) == 1 and "cut off, the recipient stays queued" in cut[0], cut
    await eventually(lambda: len(maildir_messages(tmp_path / "mail" / "alice" / "Maildir")) == 1,
                     what="alice's write ended")
    await asyncio.sleep(0.1)
    assert not [r.getMessage() for r in caplog.records if "forward" in r.getMessage().lower()
                or "to=<team@local.test>" in r.getMessage()]
    assert queue_counts(tmp_path / "queue" / "queue.db") == {"active": 1}


async def test_a_stop_keeps_the_status_of_a_command_whose_output_ended_so_a_restart_runs_it_once(tmp_path):
    """A pipe service's command has read the message and closed its output; it exits a moment later. The stop's
    cancel came in that moment: the command was killed and its status lost, and the restart ran it again (the
    message twice in its file). The cancel waits for the exit (CANCEL_REAP_WAIT at most): the status is recorded."""
    with script_dir() as scripts:
        command = scripts.script("filter.sh", f"cat >> {scripts.out}/copies\nexec >&- 2>&-\n"
                                              f"touch {scripts.out}/closed\nsleep 0.4\n")
        config = config_from_dict({**base_settings(tmp_path), "relay_domains": ["pipe.test"],
                                   "transport_maps": ["inline:{pipe.test=filt:}"],
                                   "pipe": {"filt": {"argv": [str(command)]}}})
        mf = Mailflow(config, shutdown_grace=0.1)
        await mf.start()
        try:
            await send(mf.smtp_addresses[0][1], "s@remote.test", ["one@pipe.test"], b"Subject: once\r\n\r\nbody\r\n")
            await eventually(lambda: (scripts.out / "closed").exists(), what="the command closed its output")
        finally:
            await asyncio.wait_for(mf.stop(), 5)
        assert queue_counts(tmp_path / "queue" / "queue.db") == {}

        mf = Mailflow(config, shutdown_grace=0.1)
        await mf.start()
        try:
            await queue_becomes(mf.store, {})
        finally:
            await mf.stop()
        assert scripts.read("copies").count("Subject: once") == 1


async def test_a_stop_during_a_job_s_last_mbox_append_records_it_so_a_restart_delivers_each_once(tmp_path,
                                                                                                monkeypatch):
    """A local job for alice and bob (mbox mailboxes), the stop's cancel while bob's entry is appended: the append
    ends (mbox's attempts are not cut) and bob's result, the job's last, is recorded though the cancel comes before
    the job's report (qmgr keeps it as told: `DeliveryRequest.settled`; RESULT_SLICE 2: qmgr hands the loop back
    after the last result, and the cancel lands there). Each has one copy after the restart."""
    monkeypatch.setattr(qmgr_module, "RESULT_SLICE", 2)
    release, appending, appended = threading.Event(), threading.Event(), threading.Event()
    append_once = mbox._append_once

    def bob_slow(path, *args, **kwargs):
        if path.name != "Mailbox" or path.parent.name != "bob" or appending.is_set():
            return append_once(path, *args, **kwargs)
        appending.set()
        release.wait(10)
        try:
            return append_once(path, *args, **kwargs)
        finally:
            appended.set()

    monkeypatch.setattr(mbox, "_append_once", bob_slow)
    config = config_from_dict({**base_settings(tmp_path), "myorigin": "local.test",
                               "local": {"maildir_base": str(tmp_path / "mail"), "home_mailbox": "Mailbox"}})
    mf = Mailflow(config, shutdown_grace=0.1)
    await mf.start()
    try:
        await send(mf.smtp_addresses[0][1], "s@remote.test", ["alice@local.test", "bob@local.test"],
                   b"Subject: once\r\n\r\nbody\r\n")
        await eventually(appending.is_set, what="bob's append began")
        asyncio.get_running_loop().call_later(0.6, release.set)  # well after the grace's cancel
    finally:
        await asyncio.wait_for(mf.stop(), 5)
    assert queue_counts(tmp_path / "queue" / "queue.db") == {"active": 1}  # (the job cut: its results recorded)
    await eventually(appended.is_set, what="bob's first append ended")  # (cut or not, the thread writes it)

    mf = Mailflow(config, shutdown_grace=0.1)
    await mf.start()
    try:
        await queue_becomes(mf.store, {})
    finally:
        await mf.stop()
    assert [(tmp_path / "mail" / user / "Mailbox").read_text().count("Subject: once") for user in ("alice", "bob")
            ] == [1, 1]


async def test_an_alias_s_last_destination_in_a_lock_wait_at_the_cut_off_is_cut_off_not_handed_on(tmp_path,
                                                                                                  monkeypatch, caplog):
    """`team: bob, alice` (mbox files), alice's dotlock held by another program at the stop: the walk's last
    destination waits between attempts, nothing written, at the cut-off. It was taken as a write under way: the
    warning said team's result would be recorded, the lock wait went on through the records' window, and with the
    lock freed meanwhile alice's append began after the stop's cut-off. It is cut off there: team stays queued."""
    monkeypatch.setattr(uncut_module, "UNCUT_LIMIT", 0.3)
    caplog.set_level(logging.INFO)
    (tmp_path / "aliases").write_text("team: bob, alice\n")
    settings = base_settings(tmp_path)
    config = config_from_dict({**settings, "myorigin": "local.test", "alias_maps": [f"texthash:{tmp_path / 'aliases'}"],
                               "local": {**settings["local"], "home_mailbox": "Mailbox"}})
    mailboxes = {user: tmp_path / "mail" / user / "Mailbox" for user in ("alice", "bob")}
    for mailbox in mailboxes.values():
        mailbox.parent.mkdir(parents=True)
    lock = mailboxes["alice"].with_name("Mailbox.lock")
    lock.write_text("another program's\n")
    mf = Mailflow(config, shutdown_grace=1.0)
    await mf.start()
    try:
        await send(mf.smtp_addresses[0][1], "s@remote.test", ["team@local.test"], b"Subject: once\r\n\r\nbody\r\n")
        await eventually(mailboxes["bob"].exists, what="bob's copy")
        await asyncio.sleep(0.2)  # (alice's attempts meet the lock busy)
        asyncio.get_running_loop().create_task(eventually(lambda: "still under way" in caplog.text and (
            lock.unlink() or True), what="the cut-off"))
    finally:
        await asyncio.wait_for(mf.stop(), 15)
    cut = [r.getMessage() for r in caplog.records if "still under way" in r.getMessage()]
    assert len(cut) == 1 and "cut off, the recipient stays queued" in cut[0], cut
    await asyncio.sleep(0.5)  # (past the next attempt, had the wait gone on)
    assert not mailboxes["alice"].exists() or "Subject: once" not in mailboxes["alice"].read_text()
    assert queue_counts(tmp_path / "queue" / "queue.db") == {"active": 1}


async def test_a_stop_cuts_a_mailbox_lock_wait_at_once_and_warns_of_no_write(tmp_path, caplog):
    """alice's mbox dotlock is held by another program at the stop: her delivery waits between attempts, no entry
    written. The stop's cancel held that wait as if a write were under way (UNCUT_LIMIT, then the records' window
    for a result to come: 5 s for a grace of 1 s), and warned of a delivery "still under way". A wait for a lock is
    cut at once, as before: the stop takes its grace, no warning, alice stays queued and is delivered once later."""
    config = config_from_dict({**base_settings(tmp_path), "myorigin": "local.test",
                               "local": {"maildir_base": str(tmp_path / "mail"), "home_mailbox": "Mailbox"}})
    home = tmp_path / "mail" / "alice"
    home.mkdir(parents=True)
    lock = home / "Mailbox.lock"
    lock.write_text("another program's\n")
    mf = Mailflow(config, shutdown_grace=1.0)
    await mf.start()
    try:
        await send(mf.smtp_addresses[0][1], "s@remote.test", ["alice@local.test"], b"Subject: once\r\n\r\nbody\r\n")
        await eventually(lambda: queue_counts(tmp_path / "queue" / "queue.db") == {"active": 1}, what="the delivery")
        await asyncio.sleep(0.3)  # (its attempts meet the lock busy)
        started = asyncio.get_running_loop().time()
    finally:
        await asyncio.wait_for(mf.stop(), 15)
    assert asyncio.get_running_loop().time() - started < 1.0 + 1.5
    assert "still under way" not in caplog.text
    assert queue_counts(tmp_path / "queue" / "queue.db") == {"active": 1}
    assert not (home / "Mailbox").exists() or "Subject: once" not in (home / "Mailbox").read_text()

    lock.unlink()
    mf = Mailflow(config, shutdown_grace=0.1)
    await mf.start()
    try:
        await queue_becomes(mf.store, {})
    finally:
        await mf.stop()
    assert (home / "Mailbox").read_text().count("Subject: once") == 1
