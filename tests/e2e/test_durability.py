"""Durability with a real process: what got 250 survives SIGKILL; what was recorded delivered is not resent; a stop
or a crash while one destination is slow repeats no delivery that had finished, and each is in the log once."""
from __future__ import annotations

import contextlib
import os
import signal
import uuid

import pytest

from tests.support import (ServerProcess, SmtpClient, big_message, eventually, free_port, maildir_messages,
                           queue_counts, script_dir, send, stall_mail)
from tests.support.dovecot import lmtp_route

MESSAGES = 5


@pytest.fixture
def server(tmp_path, write_config):
    made: list[ServerProcess] = []

    def make(**overrides) -> ServerProcess:
        port = free_port()
        cfg = write_config(tmp_path / "mailflow.toml", smtpd={"listen": [f"127.0.0.1:{port}"]}, **overrides)
        proc = ServerProcess(cfg, tmp_path / "server.log", port)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.kill()


def message(token: str) -> bytes:
    return f"Subject: {token}\r\nX-Token: {token}\r\n\r\nbody {token}\r\n".encode()


async def cut_off_in_data(port: int, partial: bytes) -> SmtpClient:
    """A session that has sent `partial` content after DATA and goes no further."""
    client = await SmtpClient.connect(port, timeout=10)
    for command in ("EHLO x", "MAIL FROM:<s@remote.test>", "RCPT TO:<cut@relay.test>", "DATA"):
        reply = await client.cmd(command, timeout=10)
        assert 200 <= (reply.code or 0) < 400, reply
    await client.send(partial)
    return client


async def test_acknowledged_mail_survives_sigkill(server, smtp_peer, tmp_path):
    sink_port = free_port()  # nothing listens yet: every delivery attempt fails and the mail stays queued
    srv = server(relayhost=f"[127.0.0.1]:{sink_port}")
    await srv.start()
    tokens = [uuid.uuid4().hex for _ in range(MESSAGES)]
    for token in tokens:
        refused, reply = await send(srv.port, "s@remote.test", [f"{token}@relay.test"], message(token))
        assert reply.startswith("2.0.0 Ok: queued as")
    srv.kill()

    peer = await smtp_peer(port=sink_port)
    await srv.start()
    await eventually(lambda: len(peer.messages) >= MESSAGES, timeout=20)
    delivered = [m.rcpt_tos[0].split("@")[0] for m in peer.messages]
    assert sorted(delivered) == sorted(tokens), "each acknowledged message exactly once"


async def test_mail_recorded_as_delivered_is_not_sent_again_after_sigkill(server, smtp_peer, tmp_path):
    peer = await smtp_peer()
    srv = server(relayhost=f"[127.0.0.1]:{peer.port}")
    await srv.start()
    await send(srv.port, "s@remote.test", ["once@relay.test"], message("once"))
    await eventually(lambda: peer.messages, timeout=10)
    db = tmp_path / "queue" / "queue.db"
    await eventually(lambda: queue_counts(db) == {}, timeout=10, what="the delivery recorded")
    srv.kill()

    await srv.start()  # its first queue run is at the start: anything still queued would be taken then
    await send(srv.port, "s@remote.test", ["later@relay.test"], message("later"))
    await eventually(lambda: any(m.rcpt_tos == ["later@relay.test"] for m in peer.messages) and queue_counts(db) == {},
                     timeout=10)
    assert sorted(m.rcpt_tos[0] for m in peer.messages) == ["later@relay.test", "once@relay.test"]


async def test_big_mail_acknowledged_survives_sigkill_and_spool_files_of_the_rest_are_removed(server, smtp_peer,
                                                                                             tmp_path):
    """Two big messages got 250, two more were cut off mid-DATA, then SIGKILL: after the restart the two are
    delivered byte exact from their content files, and nothing of the other two is left."""
    sink_port = free_port()  # nothing listens yet: the mail stays queued
    srv = server(relayhost=f"[127.0.0.1]:{sink_port}")
    await srv.start()
    bodies = [big_message(seed=n, long_line=False) for n in range(2)]
    for n, data in enumerate(bodies):
        refused, reply = await send(srv.port, "s@remote.test", [f"big{n}@relay.test"], data)
        assert reply.startswith("2.0.0 Ok: queued as")
    partial = b"Subject: cut\r\n\r\n" + b"y" * 78 * 10_000  # 780 KB, never ended
    cut_off = [await cut_off_in_data(srv.port, partial) for _ in range(2)]
    content = tmp_path / "queue" / "content"
    await eventually(lambda: len(list(content.iterdir())) == 4, timeout=10)  # 2 queued, 2 being spooled
    srv.kill()
    for client in cut_off:
        await client.close()

    peer = await smtp_peer(port=sink_port)
    await srv.start()
    await eventually(lambda: len(peer.messages) >= 2, timeout=20)
    assert sorted(m.content.split(b"\r\n\r\n", 1)[1] for m in peer.messages) == \
        sorted(b.split(b"\r\n\r\n", 1)[1] for b in bodies)
    await eventually(lambda: queue_counts(tmp_path / "queue" / "queue.db") == {}, timeout=10)
    assert list(content.iterdir()) == []


# ---------------------------------------------------------------------------------------------- a slow destination


async def split_message_half_delivered(server, smtp_peer, tmp_path, **overrides):
    """One message to a local user and to a relay destination that stalls at MAIL: the local copy is delivered,
    the relayed one hangs. Returns (server, peer, gate, inbox)."""
    peer = await smtp_peer()
    gate = stall_mail(peer)
    srv = server(relayhost=f"[127.0.0.1]:{peer.port}", **overrides)
    await srv.start()
    _, reply = await send(srv.port, "s@remote.test", ["alice@local.test", "far@relay.test"], message("split"))
    assert reply.startswith("2.0.0 Ok: queued as")
    inbox = tmp_path / "mail" / "alice" / "Maildir"
    await eventually(lambda: maildir_messages(inbox) and peer.handler.stalled, timeout=10)
    # the local delivery is recorded (and logged) when its job ends, not when the slow one does
    await eventually(lambda: srv.log_lines("to=<alice@local.test>", "status=sent"), timeout=5)
    return srv, peer, gate, inbox


async def after_restart_each_recipient_once(srv, peer, gate, inbox, tmp_path) -> None:
    gate.set()  # the destination answers again
    await srv.start()
    await eventually(lambda: peer.messages, timeout=15)
    db = tmp_path / "queue" / "queue.db"
    await eventually(lambda: queue_counts(db) == {}, timeout=15)
    assert len(maildir_messages(inbox)) == 1, "the local copy was delivered again after the restart"
    assert [m.rcpt_tos for m in peer.messages] == [["far@relay.test"]]
    # each result is logged just after its commit
    await eventually(lambda: srv.log_lines("to=<far@relay.test>", "status=sent"), timeout=5)
    assert len(srv.log_lines("to=<alice@local.test>", "status=sent")) == 1, "the first delivery is in the log, once"
    assert len(srv.log_lines("to=<far@relay.test>", "status=sent")) == 1


async def test_sigterm_while_a_destination_is_slow_repeats_no_finished_delivery(server, smtp_peer, tmp_path):
    # a grace period of 1 s, not the default 8: the stalled delivery outlasts either (the stop waited 8 s for it)
    srv, peer, gate, inbox = await split_message_half_delivered(server, smtp_peer, tmp_path, shutdown_grace="1s")
    assert await srv.terminate() == 0  # the slow delivery is cut off after the grace period
    await after_restart_each_recipient_once(srv, peer, gate, inbox, tmp_path)


async def test_sigkill_while_a_destination_is_slow_repeats_no_finished_delivery(server, smtp_peer, tmp_path):
    srv, peer, gate, inbox = await split_message_half_delivered(server, smtp_peer, tmp_path)
    srv.kill()
    await after_restart_each_recipient_once(srv, peer, gate, inbox, tmp_path)


async def test_a_bounce_soft_bounce_kept_deferred_survives_sigkill_and_is_delivered_once_fixed(server, smtp_peer,
                                                                                              tmp_path):
    """soft_bounce: the refused recipient's deferral is recorded as any other, so a crash neither loses the mail nor
    turns it into a bounce; once the next hop takes it, it is delivered once and nobody got a notice."""
    peer = await smtp_peer()
    peer.handler.rcpt_replies["gone@relay.test"] = "550 5.1.1 no such user"
    srv = server(relayhost=f"[127.0.0.1]:{peer.port}", soft_bounce=True,
                 queue={"minimal_backoff_time": "1s", "maximal_backoff_time": "1s", "queue_run_delay": "1s"})
    await srv.start()
    await send(srv.port, "s@remote.test", ["gone@relay.test"], message("soft"))
    db = tmp_path / "queue" / "queue.db"
    # qmgr records the attempt's end, then logs its lines: the line is awaited too, not to kill the server between
    await eventually(lambda: srv.log_lines("to=<gone@relay.test>", "status=SOFTBOUNCE")
                     and queue_counts(db) == {"deferred": 1}, timeout=20, what="the soft bounce recorded and logged")
    srv.kill()

    del peer.handler.rcpt_replies["gone@relay.test"]  # the next hop fixed
    await srv.start()
    await eventually(lambda: peer.messages and queue_counts(db) == {}
                     and srv.log_lines("to=<gone@relay.test>", "status=sent"), timeout=20, what="delivered and logged")
    assert [(m.mail_from, m.rcpt_tos) for m in peer.messages] == [("s@remote.test", ["gone@relay.test"])]
    assert not srv.log_lines("status=bounced")  # kept deferred, never turned into a bounce


# ------------------------------------------------------------------------------------ one job, several recipients


async def test_sigkill_during_a_local_job_repeats_only_the_recipient_in_flight(server, tmp_path):
    """One message to alice, bob (Maildirs) and an alias whose command is still running when the server is
    SIGKILLed: the two mailboxes were written and their results recorded as each was delivered (Postfix's local(8)
    crosses each recipient off as it goes, deliver_completed), so after the restart only the command runs again."""
    with script_dir() as scripts:
        quick = scripts.out / "quick"
        script = scripts.script("slow.sh", f"echo $$ >> {scripts.out / 'pids'}\necho run >> {scripts.out / 'runs'}\n"
                                           f"[ -e {quick} ] || exec sleep 30\n")
        aliases = tmp_path / "aliases"
        aliases.write_text(f"slow: |{script}\n")
        srv = server(alias_maps=[f"texthash:{aliases}"], local_recipient_maps=["inline:{alice=ok, bob=ok, slow=ok}"])
        await srv.start()
        try:
            _, reply = await send(srv.port, "s@remote.test", ["alice@local.test", "bob@local.test", "slow@local.test"],
                                  message("job"))
            assert reply.startswith("2.0.0 Ok: queued as")
            boxes = [tmp_path / "mail" / user / "Maildir" for user in ("alice", "bob")]
            await eventually(lambda: scripts.read("runs") and all(maildir_messages(box) for box in boxes), timeout=10)
            # the results of alice and bob are on disk before the command ends (the log line follows the commit)
            await eventually(lambda: len(srv.log_lines("status=sent")) == 2, timeout=5, what="two results recorded")
            srv.kill()
            quick.touch()  # the command ends at once from now on

            await srv.start()
            db = tmp_path / "queue" / "queue.db"
            await eventually(lambda: queue_counts(db) == {}, timeout=15, what="the message delivered")
            assert [len(maildir_messages(box)) for box in boxes] == [1, 1], "a recorded delivery was repeated"
            assert scripts.read("runs") == "run\nrun\n", "the command in flight ran again, once"
        finally:
            for pid in scripts.read("pids").split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)


async def test_sigkill_during_a_message_split_across_five_transports_repeats_only_the_delivery_in_flight(
        server, smtp_peer, dovecot, tmp_path):
    """One message to a relay sink (smtp), two Dovecot users (lmtp), two local Maildirs, and three recipients of a
    pipe service with flag D (a run per recipient, one after another), the last run still going when the server is
    SIGKILLed: after the restart every recipient got its copy once, but the run that was cut off (at least once,
    as Postfix): the pipe's first two runs were recorded as each ended."""
    peer = await smtp_peer()
    with script_dir() as scripts:
        quick = scripts.out / "quick"
        script = scripts.script("deliver.sh", f'echo $$ >> {scripts.out / "pids"}\n'
                                              f'echo "$1" >> {scripts.out / "runs"}\n'
                                              f'[ "$1" != slow@pipe.test ] || [ -e {quick} ] || exec sleep 30\n')
        routes = lmtp_route(dovecot, **{"pipe.test": "deliver:"})
        srv = server(relayhost=f"[127.0.0.1]:{peer.port}", relay_domains=["relay.test", "example.test", "pipe.test"],
                     transport_maps=routes, pipe={"deliver": {"argv": [str(script), "${recipient}"], "flags": "D"}})
        await srv.start()
        pipe_rcpts = ["p1@pipe.test", "p2@pipe.test", "slow@pipe.test"]
        rcpts = ["far@relay.test", "alice@example.test", "bob@example.test", "alice@local.test", "bob@local.test",
                 *pipe_rcpts]
        boxes = [dovecot.root / "mail" / "example.test" / user / "Maildir" for user in ("alice", "bob")] + \
            [tmp_path / "mail" / user / "Maildir" for user in ("alice", "bob")]
        try:
            _, reply = await send(srv.port, "s@remote.test", rcpts, message("split"))
            assert reply.startswith("2.0.0 Ok: queued as")
            await eventually(lambda: "slow@pipe.test" in scripts.read("runs"), timeout=10)
            # everything but the run in flight is recorded (each log line follows its commit)
            await eventually(lambda: len(srv.log_lines("status=sent")) == len(rcpts) - 1, timeout=10,
                             what="the finished deliveries recorded")
            srv.kill()
            quick.touch()

            await srv.start()
            db = tmp_path / "queue" / "queue.db"
            await eventually(lambda: queue_counts(db) == {}, timeout=15, what="the message delivered")
            assert [m.rcpt_tos for m in peer.messages] == [["far@relay.test"]]
            assert [len(maildir_messages(box)) for box in boxes] == [1, 1, 1, 1], "a recorded delivery was repeated"
            assert scripts.read("runs").split() == pipe_rcpts + ["slow@pipe.test"]
            assert not srv.log_lines("status=bounced")
        finally:
            for pid in scripts.read("pids").split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)


# ------------------------------------------------------------------------------------------------ a command's input


async def test_sigkill_while_a_message_is_piped_to_a_command_never_hands_it_a_cut_message(server, tmp_path):
    """The server is SIGKILLed while a pipe service's command reads a 1 MB message slowly, in a grandchild: the
    script runs its reader without `exec`, as `sh -c 'cat > out'` or a wrapper of dovecot-lda would. With stdin
    a pipe fed as the command read, the reader outlived the server (PR_SET_PDEATHSIG reaches the direct child
    only), read EOF and took the cut input as the whole message. The command now starts only once its whole input
    is in a file: the run the crash interrupted finishes with the whole message, and so does the one after the
    restart (a duplicate, never a cut copy)."""
    with script_dir() as scripts:
        go_on = scripts.out / "go-on"
        reader = (f'echo $$ >> {scripts.out / "pids"}; '
                  f'head -c 1000 > /dev/null; '
                  f'echo started >> {scripts.out / "starts"}; '
                  f'i=0; while [ ! -e {go_on} ] && [ $i -lt 300 ]; do sleep 0.05; i=$((i+1)); done; '
                  f'if cat | grep -q "^END-OF-MESSAGE$"; then r=whole; else r=cut; fi; '
                  f'echo $r >> {scripts.out / "reads"}')
        script = scripts.script("deliver.sh", f"echo $$ >> {scripts.out / 'pids'}\nsh -c '{reader}'\n")
        srv = server(relay_domains=["relay.test", "pipe.test"], transport_maps=["inline:{pipe.test=deliver:}"],
                     pipe={"deliver": {"argv": [str(script)], "flags": "D"}})
        await srv.start()
        data = b"Subject: big\r\n\r\n" + b"y" * 76 * 14_000 + b"\r\nEND-OF-MESSAGE\r\n"
        try:
            _, reply = await send(srv.port, "s@remote.test", ["p@pipe.test"], data)
            assert reply.startswith("2.0.0 Ok: queued as")
            await eventually(lambda: scripts.read("starts"), timeout=10, what="the command reading")
            srv.kill()
            go_on.touch()  # the reader reads on: the rest of what the server had written, then EOF
            await srv.start()
            db = tmp_path / "queue" / "queue.db"
            await eventually(lambda: queue_counts(db) == {} and len(scripts.read("reads").split()) == 2, timeout=20,
                             what="the message delivered, and the interrupted run ended")
            assert len(scripts.read("starts").split()) == 2
            assert scripts.read("reads").split() == ["whole", "whole"], "a command took a message cut off by the crash"
            assert list((tmp_path / "queue" / "content").glob(".*")) == []
        finally:
            for pid in scripts.read("pids").split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
