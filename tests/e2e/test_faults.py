"""Faults of the world against a real `mailflow serve`: a second server on the same queue, the queue database
locked by another process past the store's busy timeout, the queue's file system full, no file descriptor left,
and `mailflow sendmail` run from another directory with a relative queue_directory.

The tmpfs test mounts a small file system (it needs root: it skips otherwise, and fails when
MAILFLOW_REQUIRE_TOOLS=1). Times are bounded; the CPU and log volume of a server facing a fault are measured.
"""
from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiosmtplib
import pytest

from mailflow import status
from mailflow.stages.smtpd import queuespace
from tests.support import (ServerProcess, base_settings, eventually, free_port, maildir_messages, merged,
                           queue_counts, send, stall_mail, to_toml)


def message(token: str) -> bytes:
    return f"Subject: {token}\r\n\r\nbody {token}\r\n".encode()


@pytest.fixture
def servers(tmp_path):
    made: list[ServerProcess] = []

    def make(config: Path, port: int, **kw) -> ServerProcess:
        proc = ServerProcess(config, tmp_path / f"server{len(made)}.log", port, **kw)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.kill()


def config(path: Path, tmp_path: Path, port: int, **overrides) -> Path:
    path.write_text(to_toml(merged(base_settings(tmp_path), {"smtpd": {"listen": [f"127.0.0.1:{port}"]},
                                                              **overrides})))
    return path


# ---------------------------------------------------------------------------------------------- one server per queue


async def test_a_second_server_on_the_same_queue_exits_naming_the_first_and_touches_nothing(servers, smtp_peer,
                                                                                           tmp_path):
    peer = await smtp_peer()
    gate = stall_mail(peer)
    port = free_port()
    first = servers(config(tmp_path / "first.toml", tmp_path, port, relayhost=f"[127.0.0.1]:{peer.port}"), port)
    await first.start()
    await send(first.port, "s@remote.test", ["far@relay.test"], message("in-flight"))
    await eventually(lambda: peer.handler.stalled, timeout=10)
    db = tmp_path / "queue" / "queue.db"
    assert queue_counts(db) == {"active": 1}

    other_port = free_port()  # another port: binding would succeed, only the queue is shared
    second = subprocess.run([sys.executable, "-m", "mailflow", "serve", "-c",
                             str(config(tmp_path / "second.toml", tmp_path, other_port,
                                        relayhost=f"[127.0.0.1]:{peer.port}"))],
                            capture_output=True, text=True, timeout=30)
    assert second.returncode in (1, 2)
    assert f"pid {first.proc.pid}" in second.stderr and "queue" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    assert queue_counts(db) == {"active": 1}, "the second server ran recovery on the first one's mail"
    assert peer.handler.stalled == 1, "the second server delivered mail it does not own"

    gate.set()
    await eventually(lambda: queue_counts(db) == {}, timeout=10)
    assert len(peer.messages) == 1


# ---------------------------------------------------------------------------------------------- descriptors


async def test_out_of_file_descriptors_the_server_pauses_accepting_warns_once_and_recovers(servers, tmp_path):
    """More clients than descriptors (a limit of 48, 90 connections held): accepting pauses while none is left,
    with one warning and no busy loop (asyncio's own accept loop logged a traceback per try and multiplied its
    retries: tens of thousands of lines a second), and the server serves again once clients leave."""
    port = free_port()
    server = servers(config(tmp_path / "c.toml", tmp_path, port), port, nofile=48)
    await server.start()
    held = []
    try:
        for _ in range(90):  # (the listen queue holds 100: each connect succeeds)
            held.append((await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5))[1])
        await eventually(lambda: server.log_lines("cannot accept connections"), timeout=10)
        cpu = server.cpu_seconds()
        await asyncio.sleep(2)
        assert server.cpu_seconds() - cpu < 0.5, "the server spun while out of descriptors"
    finally:
        for writer in held:
            writer.close()
    assert len(server.log_lines("cannot accept connections")) == 1, server.log_lines("cannot accept")
    await eventually(lambda: server.log_lines("accepting connections again"), timeout=10)
    await send(port, "s@remote.test", ["alice@local.test"], message("after"))
    await eventually(lambda: len(maildir_messages(tmp_path / "mail" / "alice" / "Maildir")) == 1, timeout=10)
    assert len(server.log_path.read_text().splitlines()) < 600, "the log grew with the failed accepts"
    assert "Traceback" not in server.log_path.read_text()


# ---------------------------------------------------------------------------------------------- sendmail


async def test_sendmail_from_another_directory_with_a_relative_queue_directory_reaches_the_server(servers, tmp_path):
    """The default-style relative queue_directory: the server runs in the configuration's directory, sendmail
    from elsewhere (cron, PHP); both take the path from the configuration file's directory."""
    etc, elsewhere = tmp_path / "etc", tmp_path / "elsewhere"
    etc.mkdir()
    elsewhere.mkdir()
    port = free_port()
    cfg = config(etc / "mailflow.toml", tmp_path, port, queue_directory="var", local={"maildir_base": "mail"})
    srv = servers(cfg, port, cwd=etc)
    await srv.start()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailflow", "sendmail", "-C", str(cfg), "alice@local.test", cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(b"Subject: from cron\n\nnightly report\n"), 20)
    assert proc.returncode == 0, err
    assert b"warning" not in err, err  # a server owns that queue
    inbox = etc / "mail" / "alice" / "Maildir"
    await eventually(lambda: maildir_messages(inbox), timeout=10, what="the message reached the server")
    assert b"nightly report" in maildir_messages(inbox)[0]
    assert not (elsewhere / "var").exists()


# ---------------------------------------------------------------------------------------------- the store locked

# Long enough for a failed write and a failed probe (mailflow/store/engine.py BUSY_TIMEOUT, 5 s: a write waits that
# long for the lock, then fails): the results' first write fails about 5 s in, qmgr's first probe of the store
# (faults.Retrier: one per backoff, from 0.5 s doubling, each waiting out a busy timeout) fails about 10.5 s in, and
# the probe waiting when the lock goes (from about 11.5 s) takes it. A longer lock only adds failed probes (20 s
# had two, the 45 s this test once held it four, with backoffs of 0.5 to 8 s, never the 10 s cap, which
# tests/unit/test_faults.py tests; tests/component/test_qmgr_faults.py fails many probes of a real lock with
# injected timeouts).
LOCK_SECONDS = 12.0


@pytest.mark.timeout(LOCK_SECONDS + 25)  # a deliberately long test: the lock, then at most a backoff cap
async def test_the_queue_locked_by_another_process_past_the_busy_timeout_loses_and_repeats_nothing(servers, smtp_peer,
                                                                                                  tmp_path):
    """A deliberate long fault (about 14 s): results wait in memory while another process holds the database
    lock, the server keeps answering, and they are recorded once the lock goes; nothing is delivered twice.
    (tests/component/test_qmgr_faults.py has the short variant, with injected timeouts.)"""
    peer = await smtp_peer()
    gate = stall_mail(peer)
    port = free_port()
    srv = servers(config(tmp_path / "mailflow.toml", tmp_path, port, relayhost=f"[127.0.0.1]:{peer.port}"), port)
    await srv.start()
    for n in range(3):
        await send(srv.port, "s@remote.test", [f"r{n}@relay.test", "alice@local.test"], message(f"locked{n}"))
    await eventually(lambda: peer.handler.stalled == 3, timeout=10)  # every message in delivery

    db = tmp_path / "queue" / "queue.db"
    holder = sqlite3.connect(db, timeout=30, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process's long write transaction
    locked_at = time.monotonic()
    try:
        gate.set()  # the deliveries finish while the store cannot be written
        await eventually(lambda: len(peer.messages) == 3, timeout=15)
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=srv.port, timeout=20) as client:
            started = time.monotonic()
            code, _ = await client.noop()
            assert code == 250 and time.monotonic() - started < 2, "the server stopped answering"
            await client.mail("s@remote.test")
            await client.rcpt("bob@local.test")
            code, _ = await client.data(message("while-locked"))  # cannot be committed: a temporary refusal
            pytest.fail(f"DATA answered {code} while the store could not commit")
    except aiosmtplib.SMTPDataError as e:
        assert 400 <= e.code < 500
    finally:
        await asyncio.sleep(max(0.0, LOCK_SECONDS - (time.monotonic() - locked_at)))
        holder.execute("COMMIT")
        holder.close()
    unlocked_at = time.monotonic()

    await eventually(lambda: queue_counts(db) == {}, timeout=15, what="the results recorded")
    assert time.monotonic() - unlocked_at < 12  # within a retry interval (10 s cap) of the lock going
    # (the 451 session's transcript goes to the postmaster too: notify_classes' default has `resource`)
    relayed = sorted(m.rcpt_tos[0] for m in peer.messages if m.rcpt_tos[0].endswith("@relay.test"))
    assert relayed == ["r0@relay.test", "r1@relay.test", "r2@relay.test"]
    assert len(maildir_messages(tmp_path / "mail" / "alice" / "Maildir")) == 3
    # each result is logged just after its commit: the last lines may follow the empty queue by a moment
    await eventually(lambda: all(srv.log_lines(f"to=<r{n}@relay.test>", "status=sent") for n in range(3))
                     and len(srv.log_lines("to=<alice@local.test>", "status=sent")) >= 3, timeout=5)
    for n in range(3):
        assert len(srv.log_lines(f"to=<r{n}@relay.test>", "status=sent")) == 1
    assert len(srv.log_lines("to=<alice@local.test>", "status=sent")) == 3
    assert srv.log_lines("qmgr: recording delivery results failed: database is locked")
    # qmgr tells the fault in a few lines; smtpd one line, without a traceback, for the message it could not queue
    assert not srv.log_lines("Traceback") and len(srv.log_lines("not queued")) <= 1


async def test_a_queue_database_locked_at_start_delays_the_start_and_nothing_is_lost(servers, smtp_peer, tmp_path):
    """Another process keeps the database locked past the busy timeout (5 s) while the server starts: the
    server waits for it (logged, no traceback), then recovers and delivers what was queued before."""
    peer_port = free_port()  # nothing listens at first: the message stays queued
    port = free_port()
    srv = servers(config(tmp_path / "mailflow.toml", tmp_path, port, relayhost=f"[127.0.0.1]:{peer_port}"), port)
    await srv.start()
    await send(srv.port, "s@remote.test", ["r@relay.test"], message("before-the-lock"))
    srv.kill()

    db = tmp_path / "queue" / "queue.db"
    holder = sqlite3.connect(db, timeout=30, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        starting = asyncio.ensure_future(srv.start())
        # held until the start has waited out the busy timeout and said so (however long the start takes)
        await eventually(lambda: srv.proc is not None and srv.log_lines("database is locked"), timeout=30,
                         what="the start's wait logged")
        assert srv.proc.poll() is None, srv.log_path.read_text()[-2000:]
    finally:
        holder.execute("COMMIT")
        holder.close()
    await starting
    peer = await smtp_peer(port=peer_port)
    await eventually(lambda: len(peer.messages) == 1, timeout=10)
    assert srv.log_lines("database is locked") and not srv.log_lines("Traceback")


async def test_a_queue_database_that_is_not_a_database_stops_the_start_with_one_line(tmp_path):
    port = free_port()
    (tmp_path / "queue").mkdir()
    (tmp_path / "queue" / "queue.db").write_bytes(b"this is not an SQLite file\n" * 100)
    done = subprocess.run([sys.executable, "-m", "mailflow", "serve", "-c",
                           str(config(tmp_path / "mailflow.toml", tmp_path, port))],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "│" not in done.stderr, done.stderr
    assert "queue.db" in done.stderr and "not a database" in done.stderr, done.stderr


# ---------------------------------------------------------------------------------------------- the disk full


@pytest.fixture
def small_filesystem(tmp_path):
    """An 8 MB tmpfs mounted in tmp_path, unmounted afterwards (it needs root)."""
    reason = ""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        reason = "mounting a tmpfs needs root"
    else:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(mount)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            reason = f"cannot mount a tmpfs: {done.stderr.strip()}"
    if reason:
        if os.environ.get("MAILFLOW_REQUIRE_TOOLS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    yield mount
    if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full, to the last byte; returns it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


async def mail_reply(port: int) -> tuple[int, str]:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10) as client:
        try:
            reply = await client.mail("s@remote.test")
            return reply.code, reply.message
        except aiosmtplib.SMTPSenderRefused as e:
            return e.code, e.message


async def three_messages_in_delivery(small_filesystem, servers, smtp_peer, tmp_path, tag: str):
    """A server whose queue is on the small file system, relaying to a peer that holds every message it is given:
    three messages sent, all three in delivery (active). Returns (peer, its gate, server, queue directory)."""
    peer = await smtp_peer()
    gate = stall_mail(peer)
    port = free_port()
    queue = small_filesystem / "queue"
    srv = servers(config(tmp_path / "mailflow.toml", tmp_path, port, queue_directory=str(queue),
                         relayhost=f"[127.0.0.1]:{peer.port}", smtpd={"listen": [f"127.0.0.1:{port}"],
                                                                         "message_size_limit": 100_000}), port)
    await srv.start()
    for n in range(3):
        await send(srv.port, "s@remote.test", [f"r{n}@relay.test"], message(f"{tag}{n}"))
    await eventually(lambda: peer.handler.stalled == 3, timeout=10)  # every message in delivery
    return peer, gate, srv, queue


FAULT_SECONDS = 2


async def mail_reply_once_read(port: int, code: int) -> tuple[int, str]:
    """MAIL's reply once it is `code`, or the last one after QueueSpace's MAX_AGE and a margin: smtpd keeps the
    queue's free space it read for that long, so a MAIL right after the disk filled (or emptied) may still pass."""
    for _ in range(int((queuespace.MAX_AGE + 2) / 0.1)):
        reply = await mail_reply(port)
        if reply[0] == code:
            break
        await asyncio.sleep(0.1)
    return reply


async def test_a_full_queue_file_system_slows_down_refuses_mail_and_recovers(small_filesystem, servers, smtp_peer,
                                                                           tmp_path):
    peer, gate, srv, queue = await three_messages_in_delivery(small_filesystem, servers, smtp_peer, tmp_path, "full")

    filler = fill(small_filesystem)
    cpu, log_size = srv.cpu_seconds(), srv.log_path.stat().st_size
    code, text = await mail_reply_once_read(srv.port, status.INSUFFICIENT_STORAGE.code)
    assert f"{code} {text}" == str(status.INSUFFICIENT_STORAGE)
    gate.set()  # deliveries finish; their results cannot be written
    await eventually(lambda: len(peer.messages) == 3, timeout=10)
    # The fault lasts: the server must wait, not spin (a quarter of a core at most; it used 0.02 s of CPU and wrote
    # 436 bytes of log in 4 s). The longer the fault, the longer qmgr's backoff when it ends: a 4 s one took 4 more.
    await asyncio.sleep(FAULT_SECONDS)
    cpu_used, logged = srv.cpu_seconds() - cpu, srv.log_path.stat().st_size - log_size
    print(f"\nfull disk: {cpu_used:.2f} s CPU and {logged} bytes of log in {FAULT_SECONDS} s")
    assert cpu_used < FAULT_SECONDS / 4, f"{cpu_used:.2f} s of CPU in {FAULT_SECONDS} s of a full disk"
    assert logged < 4000 * FAULT_SECONDS, f"{logged} bytes of log in {FAULT_SECONDS} s of a full disk"
    assert "database or disk is full" in srv.log_path.read_text()
    assert "cannot rollback" not in srv.log_path.read_text()

    filler.unlink()
    db = queue / "queue.db"
    await eventually(lambda: queue_counts(db) == {}, timeout=20, what="the deliveries recorded once there is space")
    assert (await mail_reply_once_read(srv.port, 250))[0] == 250, "MAIL is not accepted again once there is space"
    await send(srv.port, "s@remote.test", ["later@relay.test"], message("after"))
    await eventually(lambda: len(peer.messages) == 4, timeout=10)
    assert sorted(m.rcpt_tos[0] for m in peer.messages) == ["later@relay.test", "r0@relay.test", "r1@relay.test",
                                                             "r2@relay.test"]


async def test_a_server_started_on_a_full_queue_file_system_recovers_the_mail_left_active_once_space_returns(
        small_filesystem, servers, smtp_peer, tmp_path):
    """A crash left mail active, and the queue's file system is full when the server starts again: the start-up
    recovery (active -> incoming) could not be written, and the server exited ("cannot start: ... database or disk
    is full"), to be started again by someone once there was space. Now it starts, says so in one line, and
    recovers and delivers the mail on its own once space returns."""
    peer, gate, srv, queue = await three_messages_in_delivery(small_filesystem, servers, smtp_peer, tmp_path, "left")
    srv.kill()
    db = queue / "queue.db"
    assert queue_counts(db) == {"active": 3}
    gate.set()

    filler = fill(small_filesystem)
    await srv.start()  # listening: it did start
    await eventually(lambda: srv.log_lines("cannot make the mail left active by the last stop due again yet",
                                           "database or disk is full"), timeout=10)
    assert queue_counts(db) == {"active": 3} and srv.proc.poll() is None
    filler.unlink()
    await eventually(lambda: queue_counts(db) == {}, timeout=20, what="recovered and delivered once there is space")
    assert sorted(m.rcpt_tos[0] for m in peer.messages) == ["r0@relay.test", "r1@relay.test", "r2@relay.test"]


async def test_a_full_log_file_system_stops_no_mail_and_says_so_in_one_line(small_filesystem, servers, tmp_path):
    """`[log] file` on a file system that is full: mail is accepted and delivered, and stderr says the log cannot
    be written in one line, not with logging's traceback for each line (about 4 KB a line: 485 KB for 21
    messages); once there is space the file is written again, and stderr says that too."""
    port = free_port()
    log_file = small_filesystem / "mail.log"
    srv = servers(config(tmp_path / "mailflow.toml", tmp_path, port, log={"file": str(log_file)}), port)
    await srv.start()
    inbox = tmp_path / "mail" / "alice" / "Maildir"
    filler = fill(small_filesystem)
    for n in range(10):
        _, reply = await send(port, "s@remote.test", ["alice@local.test"], message(f"full{n}"))
        assert reply.startswith("2.0.0 Ok: queued as")
    await eventually(lambda: len(maildir_messages(inbox)) == 10, timeout=10)
    stderr = srv.log_path.read_text()
    assert "Traceback" not in stderr and "Logging error" not in stderr
    assert srv.log_lines("cannot write the log file", str(log_file), "No space left on device"), stderr[-500:]
    assert len(stderr.splitlines()) == 1, stderr[-1000:]

    filler.unlink()
    await send(port, "s@remote.test", ["alice@local.test"], message("after"))
    await eventually(lambda: srv.log_lines("is written again after"), timeout=10)
    await eventually(lambda: len(maildir_messages(inbox)) == 11, timeout=10)
    await eventually(lambda: "to=<alice@local.test>" in log_file.read_text(), timeout=10)
