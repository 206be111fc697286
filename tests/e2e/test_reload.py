"""Reload with a real process (`mailflow serve`): SIGHUP and `mailflow reload` put a changed table and a changed
restriction in force without dropping an open session; a bad configuration is refused naming FILE: KEY: REASON
and the one in force stays; what only a restart applies is named in the log and left running as it is; the SMTP
listeners change as `postfix reload` changes master.cf's services."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
import weakref

import pytest

from mailflow import status
from mailflow.config import config_from_dict
from mailflow.errors import ConfigError
from mailflow.maildrop import MaildropMessage, wake_pickup, write_maildrop
from mailflow.testing.destinations import Destinations
from tests.support import (ScanWatch, ServerProcess, SmtpClient, accepts, eventually, free_port, maildir_messages,
                           queue_becomes, rcpt_reply, run_tool, send, settled_in, stall_mail)

IN_FORCE = "reload: configuration, tables and certificates in force"
BLOCKED = {"sender_restrictions": ["check_sender_access inline:{blocked@remote.test=REJECT}"]}


@pytest.fixture
def world(tmp_path, write_config):
    """A server on a fixed port whose recipients are the texthash table `users-1` (alice, bob)."""
    (tmp_path / "users-1").write_text("alice ok\nbob ok\n")
    (tmp_path / "users-2").write_text("alice ok\ncarol ok\n")
    port = free_port()
    path = tmp_path / "mailflow.toml"

    def configure(users: str = "users-1", **overrides) -> None:
        smtpd = {"listen": [f"127.0.0.1:{port}"], **overrides.pop("smtpd", {})}
        write_config(path, local_recipient_maps=[f"texthash:{tmp_path / users}"], smtpd=smtpd, **overrides)

    configure()
    server = ServerProcess(path, tmp_path / "server.log", port)
    server.configure = configure
    yield server
    server.kill()


async def reloaded(server: ServerProcess, count: int, *words: str) -> list[str]:
    """Wait until the server has logged the outcome of its `count`-th reload; its lines holding `words`."""
    await eventually(lambda: len(server.log_lines(IN_FORCE)) + len(server.log_lines("reload refused")) >= count,
                     timeout=10, what=f"reload {count} done")
    return server.log_lines(*words)


async def mailflow_cli(*args: str) -> tuple[int, str]:
    return await run_tool(sys.executable, "-m", "mailflow", *args, timeout=30)


async def test_sighup_applies_a_changed_table_and_restriction_without_dropping_an_open_session(world):
    await world.start()
    client = await SmtpClient.connect(world.port)
    await client.cmd("EHLO client.test")
    assert (await client.cmd("MAIL FROM:<s@remote.test>")).code == 250
    assert (await client.cmd("RCPT TO:<bob@local.test>")).code == 250

    world.configure(users="users-2", smtpd=BLOCKED)  # bob leaves, carol comes, blocked@ is refused
    world.proc.send_signal(signal.SIGHUP)
    await reloaded(world, 1)

    # the open session keeps working, to its end under the rules it began with (as Postfix's smtpd)
    assert (await client.cmd("DATA")).code == 354
    await client.send(b"Subject: before\r\n\r\nbody\r\n.\r\n")
    assert (await client.reply()).text.startswith("250 2.0.0 Ok: queued as")
    await client.cmd("MAIL FROM:<blocked@remote.test>")
    assert (await client.cmd("RCPT TO:<bob@local.test>")).code == 250
    await client.cmd("QUIT")
    await client.close()
    # a new session's transaction follows the new rules: the new restriction and the new table
    client = await SmtpClient.connect(world.port)
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<blocked@remote.test>")
    refused = await client.cmd("RCPT TO:<alice@local.test>")
    assert refused.code == 554 and "Sender address rejected" in refused.text, refused
    await client.cmd("RSET")
    await client.cmd("MAIL FROM:<s@remote.test>")
    assert (await client.cmd("RCPT TO:<bob@local.test>")).code == 550
    assert (await client.cmd("RCPT TO:<carol@local.test>")).code == 250
    await client.close()
    assert not world.log_lines("restart to apply")


async def test_a_reload_reads_again_only_the_table_files_that_changed_and_says_which(world, tmp_path):
    """A reload keeps each table whose file is unchanged (the same device, inode, size, mtime and ctime) as it is,
    not read again; a changed file is read anew and its new contents answer from the reload on (the table in force
    would answer its old ones until its own check, a second later, had re-read it). The log says which files it
    read and how many it kept."""
    users = tmp_path / "users-1"
    await asyncio.sleep(settled_in(users))  # (read sooner, its stamp is not trusted: the first reload reads it)
    await world.start()
    world.proc.send_signal(signal.SIGHUP)
    [kept] = await reloaded(world, 1, "reload: table files read")
    assert "reload: table files read: 0; unchanged, kept: 1" in kept, kept
    users.write_text("alice ok\ncarol ok\n")
    world.proc.send_signal(signal.SIGHUP)
    [_, read] = await reloaded(world, 2, "reload: table files read")
    assert f"reload: table files read: 1 (texthash:{users}); unchanged, kept: 0" in read, read
    assert [(await rcpt_reply(world.port, f"{user}@local.test")).code for user in ("carol", "bob")] == [250, 550]


async def test_a_bad_configuration_is_refused_and_the_one_in_force_stays(world, tmp_path):
    await world.start()
    path = str(world.config_path)

    world.configure(smtpd={"recipient_limit": 0})
    code, out = await mailflow_cli("reload", "-c", path)  # the command checks first, and signals nothing
    assert code == 2 and f"{path}: smtpd.recipient_limit: " in out, out
    world.proc.send_signal(signal.SIGHUP)  # the server checks too
    [refusal] = await reloaded(world, 1, "reload refused")
    assert f"error: reload refused, the configuration in force stays: {path}: smtpd.recipient_limit: " in refusal

    world.configure(users="missing")
    world.proc.send_signal(signal.SIGHUP)
    [refusal] = await reloaded(world, 2, "missing")
    # FILE: KEY: REASON, as check-config and serve name a table that cannot be read
    assert f"stays: {path}: local_recipient_maps: table texthash:{tmp_path / 'missing'}: " in refusal, refusal

    assert (await rcpt_reply(world.port, "bob@local.test")).code == 250  # the first configuration, still
    assert not world.log_lines(IN_FORCE)


async def test_mailflow_reload_names_what_waits_for_a_restart_and_applies_the_rest(world, tmp_path):
    code, out = await mailflow_cli("reload", "-c", str(world.config_path))
    assert code == 1 and "no server is running on the queue" in out, out
    await world.start()

    moved = free_port()
    world.configure(smtpd={"listen": [f"127.0.0.1:{moved}"], **BLOCKED},
                    queue={"queue_run_delay": "2s", "incoming_backlog_limit": 10})
    code, out = await mailflow_cli("reload", "-c", str(world.config_path))
    assert code == 0 and f"(pid {world.proc.pid}) is reloading" in out, out
    await reloaded(world, 1)
    waiting = [line.split("warning: ", 1)[1] for line in world.log_lines("restart to apply")]
    assert waiting == ["reload: queue.incoming_backlog_limit changed; restart to apply"], waiting
    # the listener moved (as a master.cf service's address does at `postfix reload`); the restriction applies there
    assert not accepts(world.port)
    client = await SmtpClient.connect(moved)
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<blocked@remote.test>")
    assert (await client.cmd("RCPT TO:<alice@local.test>")).code == 554
    await client.close()
    assert await world.terminate() == 0


async def test_a_reload_keeps_a_certificate_that_cannot_be_read(mailflow_server, pki, tmp_path):
    ca, cert, ctx = pki
    mf = await mailflow_server(smtpd={"tls_cert_file": cert})
    broken = config_from_dict({**mf.config.model_dump(), "smtpd": {**mf.config.smtpd.model_dump(),
                                                                   "tls_cert_file": str(tmp_path / "gone.pem")}})
    with pytest.raises(ConfigError, match="gone.pem: no such certificate"):
        await mf.reload(broken)
    assert mf.config.smtpd.tls_cert_file == cert
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await client.cmd("EHLO client.test")
    await client.starttls(ctx)  # the certificate in force serves on
    assert (await client.cmd("NOOP")).code == 250
    await client.close()


async def test_sighup_while_the_server_starts_is_a_reload_once_it_runs(world, tmp_path):
    """The start can wait for the queue's database (another process holds it); `mailflow reload` meanwhile finds
    the server's pid in the lock file and signals it: the server must not die of it (SIGHUP's default action),
    as Postfix's master takes SIGHUP from its start."""
    queue = tmp_path / "queue"
    queue.mkdir()
    holder = sqlite3.connect(queue / "queue.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # the server's start waits for it
    try:
        world.launch()
        lock = queue / "mailflow.pid"
        await eventually(lambda: lock.exists() and lock.read_text().strip() == str(world.proc.pid), timeout=15,
                         what="the server holds the queue's lock (its start has begun)")
        code, out = await mailflow_cli("reload", "-c", str(world.config_path))
        assert code == 0, out
        await asyncio.sleep(0.3)  # the signal is delivered while the start still waits
        assert world.proc.poll() is None, world.log_path.read_text()
    finally:
        holder.rollback()
        holder.close()
    await eventually(lambda: accepts(world.port), timeout=15, what="the server listens")
    await reloaded(world, 1)
    assert (await rcpt_reply(world.port, "bob@local.test")).code == 250
    assert await world.terminate() == 0


def greylist_threads() -> int:
    return sum(thread.name.startswith("greylist") for thread in threading.enumerate())


async def test_reloads_close_the_filters_they_replaced_once_no_open_session_uses_them(mailflow_server):
    """Each reload builds the inbound filters anew (the greylist: a thread and a database connection). Those it
    replaced serve the sessions begun before it, then are closed: a server reloaded every few minutes for months
    (or a burst of SIGHUPs) must not keep one set per reload."""
    before = greylist_threads()
    mf = await mailflow_server(smtpd={"recipient_restrictions": ["check_greylist"]}, greylist={"delay": "1h"})
    port = mf.smtp_addresses[0][1]
    held = await SmtpClient.connect(port)  # open across every reload: it keeps the filters it began with
    await held.cmd("EHLO client.test")
    for _ in range(10):
        assert (await rcpt_reply(port, "alice@local.test")).code == 450  # the greylist in force answers
        await mf.reload(mf.config)
    await held.cmd("MAIL FROM:<s@remote.test>")
    assert (await held.cmd("RCPT TO:<alice@local.test>")).code == 450  # its own greylist still answers
    await held.close()
    assert greylist_threads() - before <= 2  # the held session's and the one in force (10 without the closing)


async def test_what_a_reload_replaced_is_in_use_while_an_old_session_or_a_lingering_socket_holds_it(mailflow_server):
    """serve collects a replaced generation once nothing holds it (`Mailflow.replaced_in_use`): a session begun
    before the reload holds its handler; a socket still sending after its session's end holds that session, so its
    handler, until the lingering ends."""
    mf = await mailflow_server()
    held = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await held.cmd("EHLO client.test")
    await eventually(lambda: not mf.replaced_in_use, what="nothing replaced yet")
    await mf.reload(mf.config)
    assert mf.replaced_in_use
    await held.cmd("QUIT")
    await held.close()
    await eventually(lambda: not mf.replaced_in_use, what="the old session ended, nothing else holds the old parts")
    still_sending = object()  # (stands for a Lingering: a socket still sending after its session's end)
    mf.smtpd.lingering.add(still_sending)
    assert mf.replaced_in_use
    mf.smtpd.lingering.discard(still_sending)
    assert not mf.replaced_in_use


@pytest.mark.parametrize("change", [
    lambda port: {"relayhost": f"[127.0.0.1]:{port}"},
    lambda port: {"transport_maps": [f"inline:{{relay.test=smtp:[127.0.0.1]:{port}}}"]},
], ids=["relayhost", "transport_maps"])
async def test_mail_waiting_behind_a_busy_relay_goes_to_the_new_next_hop_once(mailflow_server, smtp_peer, change):
    """`postfix reload` restarts qmgr, which resolves its active queue again with the new main.cf: mail waiting for
    the old relay's concurrency goes to the new next hop, once; the delivery in flight ends once where it began."""
    old, new = await smtp_peer(), await smtp_peer()
    gate = stall_mail(old)
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{old.port}", queue={"default_destination_concurrency_limit": 1})
    port = mf.smtp_addresses[0][1]
    for i in range(3):
        await send(port, "s@remote.test", [f"u{i}@relay.test"], f"Subject: m{i}\r\n\r\nbody\r\n".encode())
    await eventually(lambda: old.handler.stalled == 1 and mf.qmgr.active_count == 3,
                     what="the first message in flight to the old relay, two waiting for its window")

    await mf.reload(config_from_dict({**mf.config.model_dump(), **change(new.port)}))
    await eventually(lambda: len(new.messages) == 2, what="the waiting messages relayed to the new next hop")
    gate.set()
    await queue_becomes(mf.store, {})
    assert sorted(m.rcpt_tos for m in new.messages) == [["u1@relay.test"], ["u2@relay.test"]]
    assert [m.rcpt_tos for m in old.messages] == [["u0@relay.test"]] and old.handler.stalled == 1


async def test_mail_deferred_behind_a_dead_relay_keeps_its_retry_time_then_goes_to_the_new_relayhost(
        mailflow_server, smtp_peer):
    """`postfix reload` leaves the deferred queue alone: mail deferred behind a dead relay is not made due by a
    reload; when it is due (here by an operator's flush) it goes where the new configuration sends it, once."""
    new = await smtp_peer()
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{free_port()}",
                               queue={"minimal_backoff_time": "1h", "maximal_backoff_time": "1h"})
    _, reply = await send(mf.smtp_addresses[0][1], "s@remote.test", ["u@relay.test"], b"Subject: x\r\n\r\nx\r\n")
    qid = reply.rsplit(" ", 1)[1]

    async def deferred():
        detail = await mf.store.message_detail(qid)
        return detail if detail and detail.queue == "deferred" else None

    retry_at = (await eventually(deferred, what="the message deferred behind the dead relay")).next_attempt
    await mf.reload(config_from_dict({**mf.config.model_dump(), "relayhost": f"[127.0.0.1]:{new.port}"}))
    scans = ScanWatch(mf.store)
    await scans.scan_after(time.time())  # a queue run after the reload passed it over
    assert qid not in scans.found and new.messages == []
    assert (await mf.store.message_detail(qid)).next_attempt == retry_at

    await mf.store.flush_messages([qid], time.time())
    await queue_becomes(mf.store, {})
    assert [m.rcpt_tos for m in new.messages] == [["u@relay.test"]]


def inbox(tmp_path, user: str) -> list[bytes]:
    return maildir_messages(tmp_path / "mail" / user / "Maildir")


async def test_a_reload_listens_on_added_addresses_stops_on_removed_ones_and_changes_roles(world, pki, users,
                                                                                          tmp_path):
    """`postfix reload` re-reads master.cf: a service added listens, one removed stops listening while its smtpd
    processes finish their sessions, one changed (its -o settings: submission's TLS and AUTH requirements) serves
    new connections its new way on the same socket. Nothing acknowledged is lost."""
    _, cert, _ = pki
    removed, changed, added = free_port(), free_port(), free_port()
    door = {"tls_cert_file": cert, "sasl_user_maps": [users]}
    world.configure(smtpd={**door, "listeners": [{"address": f"127.0.0.1:{removed}"},
                                                 {"address": f"127.0.0.1:{changed}"}]})
    await world.start()
    leaving = await SmtpClient.connect(removed)
    await leaving.envelope("bob@local.test")
    staying = await SmtpClient.connect(changed)
    assert (await staying.cmd("EHLO client.test")).code == 250

    world.configure(smtpd={**door, "listeners": [{"address": f"127.0.0.1:{changed}", "role": "submission"},
                                                 {"address": f"127.0.0.1:{added}"}]})
    world.proc.send_signal(signal.SIGHUP)
    await reloaded(world, 1)

    assert (await rcpt_reply(added, "alice@local.test")).code == 250
    assert not accepts(removed)
    fresh = await SmtpClient.connect(changed)
    assert (await fresh.cmd("EHLO client.test")).code == 250
    assert await fresh.cmd("MAIL FROM:<s@remote.test>") == status.STARTTLS_FIRST  # a submission listener now
    await fresh.close()
    # the sessions open before go on as they began: the mta role, the removed listener
    assert (await staying.cmd("MAIL FROM:<s@remote.test>")).code == 250
    assert (await leaving.cmd("DATA")).code == 354
    await leaving.send(b"Subject: by the removed listener\r\n\r\nbody\r\n.\r\n")
    assert (await leaving.reply()).text.startswith("250 2.0.0 Ok: queued as")
    for client in (staying, leaving):
        await client.close()
    await eventually(lambda: len(inbox(tmp_path, "bob")) == 1, what="the message of the removed listener delivered")
    assert world.log_lines(f"reload: listening on 127.0.0.1:{added} (mta)")
    assert world.log_lines(f"reload: no longer listening on 127.0.0.1:{removed} (mta)")
    assert not world.log_lines("restart to apply")


async def test_an_address_that_cannot_be_listened_on_refuses_the_whole_reload(world):
    await world.start()
    free, taken = free_port(), free_port()
    new = {**BLOCKED, "listeners": [{"address": f"127.0.0.1:{free}"}, {"address": f"127.0.0.1:{taken}"}]}
    with socket.create_server(("127.0.0.1", taken)):  # another program listens there
        world.configure(smtpd=new)
        world.proc.send_signal(signal.SIGHUP)
        [refusal] = await reloaded(world, 1, "reload refused")
        assert refusal.endswith(f"error: reload refused, the configuration in force stays: {world.config_path}: "
                                f"smtpd.listeners[1].address: cannot listen on 127.0.0.1:{taken}: Address already in "
                                "use"), refusal
        assert not accepts(free)  # nothing of it applies: the address bound for it is let go again
        assert (await rcpt_reply(world.port, "alice@local.test", sender="blocked@remote.test")).code == 250
    world.proc.send_signal(signal.SIGHUP)  # once the address is free, the same file is put in force
    await reloaded(world, 2)
    for port in (world.port, free, taken):
        assert (await rcpt_reply(port, "alice@local.test", sender="blocked@remote.test")).code == 554


async def test_a_reload_applies_max_sessions_to_new_connections_and_cuts_no_session(world):
    """As Postfix's master applies a changed process limit at a reload: above a lowered limit the sessions go on
    and new connections wait for them to end; a raised one admits those waiting at once."""
    world.configure(smtpd={"max_sessions": 2})
    await world.start()
    first, second = await SmtpClient.connect(world.port), await SmtpClient.connect(world.port)
    world.configure(smtpd={"max_sessions": 1})
    world.proc.send_signal(signal.SIGHUP)
    await reloaded(world, 1)

    assert [(await c.cmd("NOOP")).code for c in (first, second)] == [250, 250]  # not cut
    third = await SmtpClient.connect(world.port, greet=False)
    third_greeted = asyncio.ensure_future(third.reply())
    await first.cmd("QUIT")
    await first.close()
    await eventually(lambda: world.log_lines("disconnect from"), what="the first session ended")
    assert (await second.cmd("NOOP")).code == 250
    assert not third_greeted.done()  # one session open: the new limit
    await second.cmd("QUIT")
    assert (await third_greeted).code == 220

    fourth = await SmtpClient.connect(world.port, greet=False)  # waits for the third
    fourth_greeted = asyncio.ensure_future(fourth.reply())
    world.configure(smtpd={"max_sessions": 3})
    world.proc.send_signal(signal.SIGHUP)
    assert (await fourth_greeted).code == 220  # admitted by the reload, the third still open
    for client in (second, third, fourth):
        await client.close()


async def test_a_reload_storm_drops_no_connection_loses_no_mail_and_leaks_no_socket(world, tmp_path):
    """SIGHUPs while clients connect and send: the address kept across every reload keeps its socket (connections
    waiting in the kernel's queue are served, none refused or reset), every 250 is delivered, and the sockets of
    a listener added and removed again are closed (the server's descriptors come back to their number)."""
    extra = free_port()
    configs = [{}, {"smtpd": {"max_sessions": 50, "listeners": [{"address": f"127.0.0.1:{extra}"}]}}]
    await world.start()

    def descriptors() -> int:
        return len(os.listdir(f"/proc/{world.proc.pid}/fd"))

    async def one_message(port: int) -> int:
        client = await SmtpClient.connect(port)
        reply = await client.send_message(rcpt="alice@local.test")
        await client.cmd("QUIT")
        await client.close()
        return reply.code

    assert await one_message(world.port) == 250  # what the server opens once (its first delivery) is open
    await eventually(lambda: len(inbox(tmp_path, "alice")) == 1)
    reloads = 0
    for config in configs:  # and what a reload opens once
        world.configure(**config)
        world.proc.send_signal(signal.SIGHUP)
        reloads += 1
        await reloaded(world, reloads)
    before = descriptors()
    storm_over = asyncio.Event()

    async def knocking() -> int:
        """Connections all along, each of which must be greeted (a refused or reset one raises)."""
        for greeted in range(5000):
            if storm_over.is_set():
                return greeted
            client = await SmtpClient.connect(world.port)
            await client.close()
        return 5000

    knockers = [asyncio.ensure_future(knocking()) for _ in range(4)]
    codes = []
    for i in range(10):
        world.configure(**configs[i % 2])
        world.proc.send_signal(signal.SIGHUP)
        reloads += 1
        codes += await asyncio.gather(*(one_message(world.port) for _ in range(5)))
        await reloaded(world, reloads)
    storm_over.set()
    assert all(await asyncio.gather(*knockers))
    assert codes == [250] * 50
    assert not world.log_lines("reload refused")
    await eventually(lambda: len(inbox(tmp_path, "alice")) == 51, what="every message acknowledged delivered")
    await eventually(lambda: descriptors() <= before, what=f"the server's descriptors back to {before}")


async def test_a_table_several_listeners_and_the_routing_name_is_read_once_at_the_start_and_at_a_reload_if_changed(
        mailflow_server, tmp_path, monkeypatch):
    """A server generation (the start, each reload) opens each `type:name` once, for the routing and every
    listener's restriction lists alike, each list keeping its own meaning: a 100 000-line table named by three
    listeners was read (and held in memory) four times over. A reload reads it again only when its file changed
    (the same-configuration reload re-read every table: 15-28 s of worker time for 100 000-rule regexp tables)."""
    from mailflow.tables import files

    table = tmp_path / "relay-recipients"
    table.write_text("alice@relay.test OK\n")
    await asyncio.sleep(settled_in(table))
    reads = []

    def counted(path, *args, **kwargs):
        reads.append(path)
        return read_regular_file_stat(path, *args, **kwargs)

    read_regular_file_stat = files.read_regular_file_stat
    monkeypatch.setattr(files, "read_regular_file_stat", counted)
    access = f"check_recipient_access texthash:{table}"
    mf = await mailflow_server(relay_recipient_maps=[f"texthash:{table}"], smtpd={
        "listen": ["127.0.0.1:0"], "recipient_restrictions": [access, "permit_auth_destination", "reject"],
        "listeners": [{"address": "127.0.0.1:0"},
                      {"address": "127.0.0.1:0", "overrides": {"recipient_restrictions": [access, "reject"]}}]})
    assert reads.count(table) == 1
    await mf.reload(mf.config)
    assert reads.count(table) == 1  # (unchanged: the table in force is taken over)
    table.write_text("alice@relay.test OK\ncarol@relay.test OK\n")
    await mf.reload(mf.config)
    assert reads.count(table) == 2
    ports = [listener.server.sockets[0].getsockname()[1] for listener in mf.smtpd.listeners]
    for port in ports:
        assert (await rcpt_reply(port, "alice@relay.test")).code == 250
        assert (await rcpt_reply(port, "carol@relay.test")).code == 250
    # each listener's own list: the third refuses what its table does not permit; relay_recipient_maps, the others
    assert [(await rcpt_reply(port, "bob@relay.test")).code for port in ports] == [550, 550, 554]
    assert reads.count(table) == 2


async def test_a_table_a_reload_took_over_keeps_answering_once_the_replaced_generation_is_collected(
        mailflow_server, tmp_path):
    """A reload takes the table of an unchanged file over from the generation it replaces: that generation's
    retirement (its last session ended, collected under `serve`) leaves the table, its parsed rules whole, to the new
    one, which goes on answering from it; nothing of it is kept to be taken apart later."""
    rules = 2_011
    access = tmp_path / "access.regexp"
    access.write_text("".join(f"/^spam{i}@/ REJECT\n" for i in range(rules)))
    await asyncio.sleep(settled_in(access))
    mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "recipient_restrictions": [
        f"check_recipient_access regexp:{access}", "permit_auth_destination", "reject"]})
    [table] = mf._tables.file_tables()
    parsed = weakref.ref(table.contents())
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await client.cmd("EHLO client.test")).code == 250  # (the replaced generation in use meanwhile)
    async with serve_reloaded(mf):
        assert mf._tables.file_tables() == [table]
        assert (await client.cmd("QUIT")).code == 221
        await client.close()
        await eventually(lambda: not mf.replaced_in_use, what="the replaced generation no longer in use")
        gc.collect()
        await eventually(lambda: not mf._retired_tables._dropping, what="the retired tables taken apart")
    assert parsed() is table.contents() and len(table.contents().rules) == rules
    assert not any(reading is table.reading for kept in mf._retired_tables._kept for reading in kept)
    port = mf.smtp_addresses[0][1]
    assert [(await rcpt_reply(port, f"{user}@relay.test")).code for user in ("spam7", "ham")] == [554, 250]


async def test_a_refused_reload_leaves_the_tables_in_force_as_they_are(mailflow_server, tmp_path):
    """A reload refused after its check took the tables in force over (an address that cannot be listened on: the
    last step) lets go only of what it read itself: the tables in force are not retired, and answer as before."""
    access = tmp_path / "access.regexp"
    access.write_text("/^spam@/ REJECT\n")
    await asyncio.sleep(settled_in(access))
    mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "recipient_restrictions": [
        f"check_recipient_access regexp:{access}", "permit_auth_destination", "reject"]})
    [table] = mf._tables.file_tables()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = {**mf.config.model_dump()["smtpd"], "listen": [f"127.0.0.1:{taken.getsockname()[1]}"]}
        with pytest.raises(ConfigError):
            await mf.reload(config_from_dict({**mf.config.model_dump(), "smtpd": busy}))
    assert mf._tables.file_tables() == [table] and table.contents() is not None
    assert not any(reading is table.reading for kept in mf._retired_tables._kept for reading in kept)
    assert (await rcpt_reply(mf.smtp_addresses[0][1], "spam@relay.test")).code == 554


def outlived_by_their_rules(kind: str, parsed: weakref.ref) -> list[bool]:
    """A list that gets, as each table of type `kind` alive now goes, whether `parsed` (its rules) was still there
    on the loop's turn after (retired contents are taken apart afterwards, not freed with the table). (Collected
    first: an earlier test's server left tables of its own in cycles, to be freed by whichever pass comes.)"""
    gc.collect()
    loop, outlived = asyncio.get_running_loop(), []
    for table in [o for o in gc.get_objects() if type(o).__name__ == kind]:
        weakref.finalize(table, lambda: loop.call_soon_threadsafe(lambda: outlived.append(parsed() is not None)))
    return outlived


@contextlib.asynccontextmanager
async def serve_reloaded(mf):
    """A reload as `serve` does it (`_reloads`, the heap frozen before as serve freezes it), done and its collection
    run (right after its reloaded hook) when the body begins; the reload task stopped and the heap unfrozen after."""
    from mailflow.app import _reloads, freeze_the_heap

    wanted, done = asyncio.Event(), asyncio.Event()
    freeze_the_heap()
    reloads = asyncio.create_task(_reloads(mf, wanted, lambda: mf.config, "", lambda config: done.set()))
    try:
        wanted.set()
        await asyncio.wait_for(done.wait(), 30)
        yield
    finally:
        reloads.cancel()
        await asyncio.gather(reloads, return_exceptions=True)
        gc.unfreeze()


async def test_the_rules_of_a_table_a_reload_dropped_are_freed_a_piece_at_a_time_not_in_one_collection(
        mailflow_server, tmp_path):
    """A replaced generation is a web of objects freed by the garbage collector's pass, in one call holding the
    GIL: with a big table in it, that pass freed every parsed rule (100 000-rule regexp and pcre, 100 000-line cidr
    and texthash files: the loop held 1.2-2.3 s). The tables' contents are kept apart from the table objects and
    taken apart afterwards on the loop, a piece at a time: the rules outlive their table by a turn at least."""
    rules = 20_011
    checks = tmp_path / "checks.regexp"
    checks.write_text("".join(f"/^X-Spam-{i}: yes/ REJECT\n" for i in range(rules)))
    mf = await mailflow_server(checks={"header_checks": [f"regexp:{checks}"]})
    [parsed] = [weakref.ref(o) for o in gc.get_objects() if type(o).__name__ == "_Rules" and len(o.rules) == rules]
    outlived = outlived_by_their_rules("RegexpTable", parsed)
    longest = 0.0

    async def beating() -> None:
        nonlocal longest
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.005)
            longest = max(longest, time.monotonic() - before)

    beat = asyncio.ensure_future(beating())
    try:
        await mf.reload(config_from_dict({**mf.config.model_dump(), "checks": {}}))
        await eventually(lambda: not mf.replaced_in_use, what="qmgr closed the replaced transports")
        gc.collect()
        await eventually(lambda: parsed() is None and outlived, what="the dropped table's rules freed")
    finally:
        beat.cancel()
    assert outlived == [True]  # (its rules were still there the turn after the table went)
    assert longest < 0.5  # (a piece at a time, a few ms each: generous for a loaded machine)


async def test_under_serve_a_replaced_table_is_freed_once_its_last_session_ends_a_piece_at_a_time(
        mailflow_server, tmp_path):
    """`serve` freezes the heap after each reload, the replaced generation with it while an open session still
    uses it: that session's end alone (no other reload) frees the replaced listener's table, and its 20 011 rules
    are let go a piece at a time on the loop after it, not with it in one go (0.07 s; 0.44 s for 100 000 rules)."""
    rules = 20_011
    access = tmp_path / "access.regexp"
    access.write_text("".join(f"/^spam{i}@/ REJECT\n" for i in range(rules)))
    mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "recipient_restrictions": [
        f"check_recipient_access regexp:{access}", "permit_auth_destination", "reject"]})
    [parsed] = [weakref.ref(o) for o in gc.get_objects() if type(o).__name__ == "_Rules" and len(o.rules) == rules]
    outlived = outlived_by_their_rules("RegexpTable", parsed)  # (the start's one)
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await client.cmd("EHLO client.test")).code == 250
    os.utime(access)  # (its file touched: the reload reads it anew, replacing the table)
    async with serve_reloaded(mf):
        assert parsed() is not None  # (the session still holds the table)
        assert (await client.cmd("QUIT")).code == 221
        await client.close()
        await eventually(lambda: parsed() is None, timeout=10, what="the replaced table's rules freed")
    assert outlived == [True]  # (its rules were still there the turn after the table went)


async def test_under_serve_a_replaced_routing_table_is_freed_once_the_delivery_it_began_ends(
        mailflow_server, smtp_peer, tmp_path):
    """A delivery under way keeps the transports (and the routing tables) it began with: `serve` froze them with
    the heap after the reload, and only a later reload's collection freed them. Once that delivery ends (the
    replaced transports closed) they are collected, with no other reload."""
    peer = await smtp_peer()
    gate = stall_mail(peer)
    routes = tmp_path / "transport"
    routes.write_text(f"relay.test smtp:[127.0.0.1]:{peer.port}\n")
    mf = await mailflow_server(transport_maps=[f"texthash:{routes}"])
    [table] = [weakref.ref(o) for o in gc.get_objects() if type(o).__name__ == "TexthashTable"]
    await send(mf.smtp_addresses[0][1], "s@remote.test", ["u@relay.test"], b"Subject: m\r\n\r\nbody\r\n")
    await eventually(lambda: peer.handler.stalled == 1, what="the delivery under way")
    os.utime(routes)  # (its file touched: the reload reads it anew, replacing the table)
    async with serve_reloaded(mf):
        assert table() is not None  # (the delivery still holds the transports)
        gate.set()
        await queue_becomes(mf.store, {})
        await eventually(lambda: table() is None, timeout=10, what="the replaced routing table freed")


async def test_the_tables_a_refused_reload_read_are_let_go_a_piece_at_a_time_too(mailflow_server, tmp_path,
                                                                                  monkeypatch):
    """A reload refused once its tables are read (an address that cannot be listened on: the last step) lets go
    of them as a replaced generation does: their rules outlive the table objects, taken apart on the loop, not
    freed with them in one go."""
    from mailflow.tables import cache

    rules = 5_011
    checks = tmp_path / "checks.regexp"
    checks.write_text("".join(f"/^X-Spam-{i}: yes/ REJECT\n" for i in range(rules)))
    mf = await mailflow_server(checks={"header_checks": [f"regexp:{checks}"]})
    opened = []

    def recorded(*args, **kwargs):
        table = open_table(*args, **kwargs)
        opened.append(weakref.ref(table))
        return table

    open_table = cache.open_table
    monkeypatch.setattr(cache, "open_table", recorded)
    loop, outlived = asyncio.get_running_loop(), []
    os.utime(checks)  # (its file touched: the reload reads it anew)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = {**mf.config.model_dump()["smtpd"], "listen": [f"127.0.0.1:{taken.getsockname()[1]}"]}
        try:
            await mf.reload(config_from_dict({**mf.config.model_dump(), "smtpd": busy}))
        except ConfigError:
            [table] = [table() for table in opened if type(table()).__name__ == "RegexpTable"]
            parsed = weakref.ref(table.contents())
            weakref.finalize(table, lambda: loop.call_soon_threadsafe(lambda: outlived.append(parsed() is not None)))
            del table
        else:
            raise AssertionError("the reload was not refused")
    gc.collect()
    await eventually(lambda: parsed() is None and outlived, timeout=10, what="the refused reload's rules freed")
    assert outlived == [True]  # (its rules were still there the turn after the table went)


async def test_a_table_only_the_reloads_check_reads_is_kept_for_the_next_reload_and_counted(mailflow_server, tmp_path,
                                                                                            caplog):
    """A reload checks every file table its settings name (postscreen's access list with postscreen off too), and
    no part of the generation opens that one: the generation keeps it, so that the next reload takes it over while
    its file is unchanged (it was read again at every reload, while the log said no file was read), and the log
    line counts it among the files read; once its file changes, the table read before goes with its generation."""
    networks = tmp_path / "access.cidr"
    networks.write_text("".join(f"10.0.{i // 256}.{i % 256} reject\n" for i in range(5000)))
    await asyncio.sleep(settled_in(networks))
    mf = await mailflow_server(smtpd={"postscreen": {"enable": False,
                                                     "access_list": ["permit_mynetworks", f"cidr:{networks}"]}})
    caplog.set_level(logging.INFO, logger="mailflow")
    await mf.reload(mf.config)
    [checked] = mf._tables.file_tables()
    await mf.reload(mf.config)
    assert mf._tables.file_tables() == [checked]
    os.utime(networks)  # (touched: read anew, the table read before retired)
    await mf.reload(mf.config)
    read = f"reload: table files read: 1 (cidr:{networks}); unchanged, kept: 0"
    assert [r.getMessage() for r in caplog.records if "table files read" in r.getMessage()] == [
        read, "reload: table files read: 0; unchanged, kept: 1", read]
    assert mf._tables.file_tables() != [checked]
    assert any(reading is checked.reading for kept in mf._retired_tables._kept for reading in kept)


async def test_a_probe_under_way_at_a_reload_holds_the_routes_it_replaced_until_it_ends_then_serve_collects_them(
        mailflow_server):
    """An address-verify probe begun before a reload holds the routes it replaced (the router) while it runs.
    serve's collection after the reload came while it ran and nothing counted it (`replaced_in_use`): once the
    probe ended, the old router stayed frozen until the next reload. It counts now, and serve collects the router
    once the probe ends."""
    destinations = Destinations()
    destinations.add("good.test")
    resolver, gate = destinations.resolver, asyncio.Event()
    mx = resolver.mx

    async def held_mx(domain: str):
        await gate.wait()
        return await mx(domain)

    resolver.mx = held_mx  # (the probe waits here, in the middle of its delivery)
    others = weakref.WeakSet(o for o in gc.get_objects() if type(o).__name__ == "Router")  # (other servers')
    try:
        mf = await mailflow_server(resolver=resolver, relay_domains=["good.test"],
                                   smtpd={"recipient_restrictions": ["reject_unverified_recipient"]},
                                   smtp={"port": destinations.port},
                                   address_verify={"poll_delay": "0.1s", "poll_count": 1})
        assert (await rcpt_reply(mf.smtp_addresses[0][1], "u@good.test")).code == 450  # (the probe goes on)
        await eventually(lambda: not mf.replaced_in_use, what="nothing replaced yet")
        routers = [weakref.ref(o) for o in gc.get_objects() if type(o).__name__ == "Router" and o not in others]
        assert routers
        async with serve_reloaded(mf):
            await eventually(lambda: not mf.qmgr.retiring, what="the replaced transports closed")
            assert mf.replaced_in_use, "the probe under way holds the replaced routes"
            gate.set()
            # (a collection of the test's own too: a router frozen again with the rest is out of its reach)
            await eventually(lambda: gc.collect() >= 0 and not any(router() for router in routers), timeout=5,
                             what="the replaced router collected once the probe ended")
    finally:
        gate.set()
        await destinations.stop()


async def test_a_maildrop_file_pickup_took_before_a_reload_counts_as_a_user_of_what_it_replaced_until_it_is_queued(
        mailflow_server, tmp_path, monkeypatch):
    """pickup hands a maildrop file to cleanup with the settings it took it under (its notices, milters, cleanup's
    own): nothing counted it (`replaced_in_use`), so serve's collection after the reload passed it by and what it
    held stayed frozen until the next reload. It counts until the message is queued."""
    mf = await mailflow_server()
    gate, handing = asyncio.Event(), asyncio.Event()
    submit = mf._cleanup.submit

    async def held_submit(submission, **kwargs):
        handing.set()
        await gate.wait()
        return await submit(submission, **kwargs)

    monkeypatch.setattr(mf._cleanup, "submit", held_submit)
    write_maildrop(mf.config.queue_path / "maildrop",
                   MaildropMessage(sender="alice@local.test", recipients=("bob@local.test",), uid=os.getuid(),
                                   user="alice", fullname="Alice"), [b"Subject: picked\r\n\r\nbody\r\n"])
    assert wake_pickup(mf.config.queue_path)
    await asyncio.wait_for(handing.wait(), 10)
    await mf.reload(mf.config)
    await eventually(lambda: not mf.qmgr.retiring, what="the replaced transports closed")
    assert mf.replaced_in_use, "the file taken before the reload holds what it replaced"
    gate.set()
    await eventually(lambda: not mf.replaced_in_use, what="the file queued, nothing holds the replaced parts")
    await eventually(lambda: maildir_messages(tmp_path / "mail" / "bob" / "Maildir"), what="the message delivered")


async def test_a_notice_begun_before_a_reload_counts_as_a_user_of_the_notices_it_replaced_until_it_is_made(
        mailflow_server):
    """qmgr makes a bounce with the notices (templates, settings) in force when the attempt ended: one begun before a
    reload holds the replaced ones until it is made, and counts (`replaced_in_use`) until then."""
    destinations = Destinations()
    destinations.add("bad.test").answers(550, "5.1.1 User unknown")
    mf = await mailflow_server(resolver=destinations.resolver, relay_domains=["bad.test"],
                               smtp={"port": destinations.port})
    gate, making = asyncio.Event(), asyncio.Event()
    notices = mf.qmgr._notices
    for_attempt = notices.for_attempt

    async def held(*args, **kwargs):
        making.set()
        await gate.wait()
        return await for_attempt(*args, **kwargs)

    notices.for_attempt = held
    try:
        await send(mf.smtp_addresses[0][1], "s@remote.test", ["u@bad.test"], b"Subject: gone\r\n\r\nbody\r\n")
        await asyncio.wait_for(making.wait(), 10)
        await mf.reload(mf.config)
        await eventually(lambda: not mf.qmgr._retired, what="the replaced transports closed")
        assert mf.replaced_in_use, "the notice under way holds the notices the reload replaced"
        gate.set()
        await eventually(lambda: not mf.replaced_in_use, what="the notice made, nothing holds the replaced notices")
    finally:
        gate.set()
        await destinations.stop()
