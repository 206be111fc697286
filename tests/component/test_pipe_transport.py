"""The pipe transport (mailflow.transports.pipe) and its runner, with real /bin/sh scripts.

Covered: exit 0 (stdin is the message with LF line ends, SENT naming the service) / 75 (deferred 4.3.0 with the
output) / 67 (bounced 5.1.1) / 1 (bounced 5.3.0) / output starting with an enhanced status code; the time
limit (bounced, the whole process group killed, partial output kept), also for a command writing without end
and one whose daemon keeps its pipes (the delivery ends at the limit, no descriptor kept); a huge output (kept up to
output_limit, the rest drained, no deadlock); a command that reads only part of a large message; a signal; a
missing command; argv macros, ${recipient} with 3 recipients in one run; flags D R F O (one run per
recipient), > . B, the D loop check, X (without it a success is relayed); control characters in an address; the
environment is exactly PATH (and what run_command is given); the identity (as root: `nobody`; not root: a
refusal to switch), its spawn (nothing that rules out vfork) and its exec with the user's rights only, setpriv's
failures told from the command's own lines, a setpriv that does not work as needed left unused, setpriv's own exec
failing; a script without `#!` run by /bin/sh on every path; size_limit; config errors naming the key.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import gc
import inspect
import os
import pwd
import shutil
import signal
import subprocess
import threading
import time
import weakref

import pytest

from mailflow.clock import VirtualClock
from mailflow.config import Config, PipeService, config_from_dict
from mailflow.errors import ConfigError
from mailflow.config.queue import leaves_too_little
from mailflow.content import Content
from mailflow.model import DeliveryRequest, Outcome, Recipient
from mailflow.routing.router import Router
from mailflow.stages.smtpd.handler import short_of_space
from mailflow.transports import build_transports
from mailflow.transports import pipe as pipe_module
from mailflow.transports.pipe import CommandNotRun, CommandSpool, PipeTransport, command_spool, run_command
from tests.support import big_message, eventually, script_dir, spooled

SENDER = "sender@remote.test"
CONTENT = b"From: sender@remote.test\r\nSubject: hello\r\n\r\nline one\r\nFrom here\r\n.dot\r\n"
LF_CONTENT = CONTENT.replace(b"\r\n", b"\n")


@pytest.fixture
def scripts():
    with script_dir() as d:
        yield d


def pipe(argv: list[str], **settings) -> PipeTransport:
    return PipeTransport(PipeService(argv=tuple(argv), **settings), name="filt", now=lambda: 1_700_000_000.0)


def request(*rcpts: str, content: bytes = CONTENT, sender: str = SENDER, originals: dict | None = None):
    originals = originals or {}
    return DeliveryRequest("Q1ABC", sender, tuple(Recipient(i, r, originals.get(r, r)) for i, r in enumerate(rcpts)),
                           "pipe.test", Content.of(content))


def request_of(content: Content) -> DeliveryRequest:
    """request("a@pipe.test") of a content as the store keeps it (tests.support.spooled)."""
    return DeliveryRequest("Q1ABC", SENDER, (Recipient(0, "a@pipe.test", "a@pipe.test"),), "pipe.test", content)


def outcome(result) -> tuple[Outcome, str]:
    return result.outcome, result.dsn


# ------------------------------------------------------------------------------------------- exit statuses


async def test_exit_0_delivers_the_message_on_stdin_with_lf_line_ends(scripts):
    s = scripts.script("ok.sh", f'cat > {scripts.out}/stdin\necho "queued fine"\n')
    [result] = (await pipe([str(s)]).deliver(request("a@pipe.test"))).results
    assert outcome(result) == (Outcome.SENT, "2.0.0")
    assert result.text == "delivered via filt service (queued fine)" and result.relay == "filt"
    assert scripts.read("stdin") == LF_CONTENT.decode()


async def test_a_success_is_relayed_unless_the_service_has_flag_x(scripts):
    """Postfix's pipe(8) takes its command for a gateway (its success notice says `relayed`) unless flag X says
    the command does final delivery (`delivered`)."""
    s = scripts.script("ok.sh", "exit 0\n")
    [gateway] = (await pipe([str(s)]).deliver(request("a@pipe.test"))).results
    [final] = (await pipe([str(s)], flags="X").deliver(request("a@pipe.test"))).results
    assert (outcome(gateway), gateway.relayed) == ((Outcome.SENT, "2.0.0"), True)
    assert (outcome(final), final.relayed) == ((Outcome.SENT, "2.0.0"), False)


async def test_exit_75_defers_with_the_command_output(scripts):
    s = scripts.script("later.sh", 'echo "database\tlocked"\necho again >&2\nexit 75\n')
    [result] = (await pipe([str(s)]).deliver(request("a@pipe.test"))).results
    assert outcome(result) == (Outcome.DEFERRED, "4.3.0")
    assert result.text == "temporary failure. Command output: database locked again "  # as Postfix cleans it


async def test_exit_67_bounces_user_unknown(scripts):
    s = scripts.script("nouser.sh", "exit 67\n")
    [result] = (await pipe([str(s)]).deliver(request("a@pipe.test"))).results
    assert outcome(result) == (Outcome.BOUNCED, "5.1.1") and result.text == "user unknown"


async def test_an_exit_status_outside_sysexits_bounces_5_3_0(scripts):
    s = scripts.script("one.sh", "echo oops\nexit 1\n")
    [result] = (await pipe([str(s)]).deliver(request("a@pipe.test"))).results
    assert outcome(result) == (Outcome.BOUNCED, "5.3.0")
    assert result.text == f'Command died with status 1: "{s}". Command output: oops '


async def test_an_enhanced_status_code_in_the_output_takes_precedence(scripts):
    s = scripts.script("full.sh", "echo '4.2.2 mailbox full'\nexit 1\n")
    [result] = (await pipe([str(s)]).deliver(request("a@pipe.test"))).results
    assert (outcome(result), result.text) == ((Outcome.DEFERRED, "4.2.2"), "mailbox full ")


async def test_a_2xx_status_in_a_failed_commands_output_bounces_5_0_0_with_postfixs_warning(scripts, caplog):
    """Postfix's pipe_command takes any valid code first, 2.X.X too, and bounce_append makes a non-5 status
    5.0.0 with a warning: exit 75 with "2.0.0 …" was deferred 4.3.0 "temporary failure. Command output: …"."""
    s = scripts.script("odd.sh", "echo '2.0.0 handed on elsewhere'\nexit 75\n")
    [result] = (await pipe([str(s)]).deliver(request("a@pipe.test"))).results
    assert (outcome(result), result.text) == ((Outcome.BOUNCED, "5.0.0"), "handed on elsewhere ")
    assert 'bounce_append: ignoring dsn code "2.0.0"' in caplog.messages


async def test_a_signal_defers(scripts):
    s = scripts.script("killed.sh", "kill -9 $$\n")
    [result] = (await pipe([str(s)]).deliver(request("a@pipe.test"))).results
    assert outcome(result) == (Outcome.DEFERRED, "4.3.0") and result.text.startswith("Command died with signal 9")


async def test_a_missing_command_defers(scripts):
    [result] = (await pipe([str(scripts.path / "nothing-here")]).deliver(request("a@pipe.test"))).results
    assert outcome(result) == (Outcome.DEFERRED, "4.3.0") and "No such file or directory" in result.text


# ------------------------------------------------------------------------------------- limits and stdin


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_the_time_limit_kills_the_whole_process_group_and_bounces(scripts):
    s = scripts.script("slow.sh", f"sleep 30 &\necho $! > {scripts.out}/child\necho started\nsleep 30\n")
    [result] = (await asyncio.wait_for(pipe([str(s)], time_limit=0.5).deliver(request("a@pipe.test")), 10)).results
    assert outcome(result) == (Outcome.BOUNCED, "5.3.0")
    assert result.text == f'Command time limit exceeded: "{s}". Command output: started '
    child = int(scripts.read("child"))
    # SIGKILL is sent; the kernel may take a moment to reap
    await eventually(lambda: not alive(child), timeout=2, what="the background child is gone")



def runner_fds(monkeypatch) -> list[tuple[int, int]]:
    """The pipe descriptors opened from now on (run_command's output pipe, the command's input pipe that asyncio's
    subprocess makes, its exec-error pipe), each with its pipe's inode: none of this process's other descriptors."""
    fds: list[tuple[int, int]] = []
    real_pipe = os.pipe

    def recorded_pipe():
        ends = real_pipe()
        fds.extend((fd, os.fstat(fd).st_ino) for fd in ends)
        return ends

    monkeypatch.setattr(os, "pipe", recorded_pipe)
    return fds


def closed(opened: tuple[int, int]) -> bool:
    """The descriptor (number, its pipe's inode) is closed: the number names nothing now, or something else (a
    number reused by a later open is not the pipe still open)."""
    fd, inode = opened
    try:
        return os.fstat(fd).st_ino != inode
    except OSError:
        return True


async def test_a_command_writing_endlessly_is_ended_at_the_time_limit(scripts):
    """Killed with a full output pipe (no longer read), a command's delivery must still end: asyncio's wait()
    waits for every pipe to close as well, and a paused pipe never reads its end."""
    [result] = (await asyncio.wait_for(pipe(["/usr/bin/yes"], time_limit=0.5).deliver(request("a@pipe.test")), 5)
                ).results  # (before: never ended)
    assert outcome(result) == (Outcome.BOUNCED, "5.3.0") and result.text.startswith("Command time limit exceeded")


@pytest.mark.parametrize("then", ["exit 0", "sleep 30"])
async def test_a_daemon_the_command_left_holding_its_pipes_neither_holds_the_delivery_nor_a_descriptor(scripts, then,
                                                                                                      monkeypatch):
    """A command that starts a program of its own session (out of reach of the group kill) which keeps stdin and
    stdout open without reading: the delivery ends at the time limit, whether the command exited before it or is
    killed there, and each such delivery costs no file descriptor of ours."""
    s = scripts.script("daemon.sh", f"setsid sleep 30 &\necho $! >> {scripts.out}/daemons\n{then}\n")
    big = big_message(300_000)  # more than the input pipe holds: some of it is never read
    fds = runner_fds(monkeypatch)
    try:
        for _ in range(3):
            fds.clear()
            [result] = (await asyncio.wait_for(  # (before: until the daemon ended)
                pipe([str(s)], time_limit=0.3).deliver(request("a@pipe.test", content=big)), 5)).results
            assert outcome(result) == (Outcome.BOUNCED, "5.3.0")
            assert len(fds) >= 4  # (run_command's and the input's, at least)
            await eventually(lambda: all(closed(fd) for fd in fds), timeout=2, what="the command's pipes are closed")
    finally:
        for daemon in scripts.read("daemons").split():
            os.kill(int(daemon), signal.SIGKILL)

async def test_a_cancel_while_the_output_pipe_is_connected_leaves_no_command_and_no_descriptor(monkeypatch):
    """The window between the spawn and the output pipe's connection (one loop iteration, e.g. at shutdown): the
    command was left running and the read end open. Here the connection is made to wait for the cancel."""
    loop = asyncio.get_running_loop()
    spawned: list = []
    connecting = asyncio.Event()
    real_exec = asyncio.create_subprocess_exec

    async def recorded_exec(*args, **kw):
        spawned.append(await real_exec(*args, **kw))
        return spawned[-1]

    async def stalled_connect(factory, file):
        connecting.set()
        await asyncio.Future()  # (until cancelled)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", recorded_exec)
    pipes = runner_fds(monkeypatch)
    monkeypatch.setattr(loop, "connect_read_pipe", stalled_connect)
    run = asyncio.ensure_future(run_command(["/bin/sleep", "30"], stdin=b"", env={}, time_limit=60,
                                            output_limit=100))
    await asyncio.wait_for(connecting.wait(), 10)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(run, 10)
    [proc] = spawned
    assert proc.returncode == -signal.SIGKILL  # killed and waited for
    assert pipes and all(closed(fd) for fd in pipes)


async def test_a_message_that_cannot_be_read_whole_never_reaches_the_commands_end_of_input(scripts):
    """Reading the message fails half-way (EIO from the queue file): the command was given the end of its input and
    delivered the first half as the whole message, then the retry delivered it again. It never starts now."""
    s = scripts.script("whole.sh", f"cat > {scripts.out}/got && echo whole > {scripts.out}/ended\n")

    async def failing():
        yield b"From: a\n\npart one\n"
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError):
        await run_command([str(s)], stdin=failing(), env={}, time_limit=30, output_limit=100)
    assert not (scripts.out / "ended").exists()


async def test_a_command_starts_only_once_its_whole_input_is_in_a_file_that_has_no_name(scripts, tmp_path):
    """The command's stdin was a pipe fed while it ran: a server killed half-way left it (or any program it started
    without exec, which PR_SET_PDEATHSIG never reached) to read EOF and deliver the cut message. Now it is an
    unlinked file in the spool directory, complete (its size is the message's) before the command starts; read
    errors raise before anything runs, and no file is left behind."""
    spool = tmp_path / "spool"
    spool.mkdir()
    s = scripts.script("look.sh", f"stat -L -c '%F %s' /dev/stdin > {scripts.out}/stdin\n"
                                  f"ls -A {spool} > {scripts.out}/spool\ncat > {scripts.out}/got\n")
    data = b"Subject: x\n\n" + b"line\n" * 100_000

    async def slowly():
        for i in range(0, len(data), 65536):
            yield data[i:i + 65536]
            await asyncio.sleep(0)
            assert not (scripts.out / "stdin").exists(), "the command started before its input was whole"

    result = await run_command([str(s)], stdin=slowly(), env={}, time_limit=30, output_limit=100,
                               spool=CommandSpool(spool))
    assert result.exit_code == 0
    assert scripts.read("stdin") == f"regular file {len(data)}\n"
    assert scripts.read("spool") == "" and list(spool.iterdir()) == []
    assert (scripts.out / "got").read_bytes() == data

    async def failing():
        yield b"From: a\n\npart one\n"
        raise OSError(errno.EIO, "Input/output error")

    (scripts.out / "stdin").unlink()
    with pytest.raises(OSError) as failed:
        await run_command([str(s)], stdin=failing(), env={}, time_limit=20, output_limit=100,
                          spool=CommandSpool(spool))
    assert failed.value.errno == errno.EIO
    assert not (scripts.out / "stdin").exists() and list(spool.iterdir()) == []


async def test_a_spool_directory_that_cannot_be_written_defers_without_running(scripts, tmp_path):
    s = scripts.script("ran.sh", f"touch {scripts.out}/ran\n")
    with pytest.raises(CommandNotRun) as failed:
        await run_command([str(s)], stdin=b"x\n", env={}, time_limit=5, output_limit=100,
                          spool=CommandSpool(tmp_path / "not-there"))
    assert "cannot spool the command's input" in failed.value.text and "No such file" in failed.value.text
    assert not (scripts.out / "ran").exists()


async def test_the_time_limit_kills_a_job_the_command_left_behind_after_it_exited(scripts):
    """`job & exit 0`: the command is reaped at once, its job keeps the output open until the time limit. A guard
    that skipped the kill once the command was waited for left the job running after every such delivery."""
    s = scripts.script("left.sh", f"sleep 30 &\necho $! > {scripts.out}/job\nexit 0\n")
    [result] = (await asyncio.wait_for(pipe([str(s)], time_limit=0.5).deliver(request("a@pipe.test")), 10)).results
    assert outcome(result) == (Outcome.BOUNCED, "5.3.0")
    job = int(scripts.read("job"))
    try:
        await eventually(lambda: not alive(job), timeout=2, what="the job left behind is killed")
    finally:
        if alive(job):
            os.kill(job, signal.SIGKILL)


async def test_a_group_number_reused_after_the_command_ended_is_never_signalled(monkeypatch):
    """A job that left the group (`setsid job & exit 0`) holds the output until the time limit while the group is
    empty: its number is free once the command was reaped, and another session may have it by then; root's
    killpg killed that session. Simulated: the command's end is seen, later a process leads a session of its own
    with the group's number (the reuse); the kill leaves it alone, and kills it as a group that was ours."""
    signalled: list = []
    real_killpg = os.killpg
    monkeypatch.setattr(pipe_module.os, "killpg", lambda *args: (signalled.append(args), real_killpg(*args)))
    ended = time.clock_gettime(time.CLOCK_BOOTTIME)
    await eventually(lambda: time.clock_gettime(time.CLOCK_BOOTTIME) > ended + 0.03, timeout=2,
                     what="a clock tick after the command's end")
    later = await asyncio.create_subprocess_exec("sleep", "30", start_new_session=True)
    try:
        reused = pipe_module._Group(later.pid)
        reused._ended = ended
        reused.kill()
        assert signalled == [] and later.returncode is None and alive(later.pid)
        ours = pipe_module._Group(later.pid)  # (its member started before the end: the group is ours)
        ours.leader_ended()
        ours.kill()
        assert signalled == [(later.pid, signal.SIGKILL)]
        assert await asyncio.wait_for(later.wait(), 5) == -signal.SIGKILL
    finally:
        if later.returncode is None:
            later.kill()
            await later.wait()


async def test_a_command_not_seen_ended_is_killed_without_asking_proc(tmp_path):
    """Until the command's end is seen its own pid holds the group's number: the time limit kills the group without
    looking in /proc, which may not show it (another pid namespace's /proc, or none: the delivery then hung for
    good, the command never killed)."""
    running = await asyncio.create_subprocess_exec("sleep", "30", start_new_session=True)
    try:
        pipe_module._Group(running.pid, proc_dir=str(tmp_path / "no-proc")).kill()
        assert await asyncio.wait_for(running.wait(), 5) == -signal.SIGKILL
    finally:
        if running.returncode is None:
            running.kill()
            await running.wait()


async def test_a_huge_output_is_cut_at_output_limit_and_drained(scripts):
    s = scripts.script("loud.sh", "head -c 3000000 /dev/zero | tr '\\0' x\nexit 69\n")
    [result] = (await pipe([str(s)], output_limit=300, time_limit=20).deliver(request("a@pipe.test"))).results
    assert outcome(result) == (Outcome.BOUNCED, "5.3.0")
    assert result.text == "service unavailable. Command output: " + "x" * 300


async def test_a_command_that_reads_part_of_stdin_still_succeeds(scripts):
    s = scripts.script("head.sh", f"head -c 10 > {scripts.out}/head\n")
    big = b"Subject: big\r\n\r\n" + b"y" * 4_000_000 + b"\r\n"
    [result] = (await pipe([str(s)], time_limit=20).deliver(request("a@pipe.test", content=big))).results
    assert outcome(result) == (Outcome.SENT, "2.0.0")
    assert scripts.read("head") == "Subject: b"


async def test_size_limit_bounces_without_running(scripts):
    s = scripts.script("ran.sh", f"touch {scripts.out}/ran\n")
    [result] = (await pipe([str(s)], size_limit=10).deliver(request("a@pipe.test"))).results
    assert (outcome(result), result.text) == ((Outcome.BOUNCED, "5.2.3"), "message too large")
    assert not (scripts.out / "ran").exists()


# ------------------------------------------------------------------------------------ macros and flags

ARGS = 'for a in "$@"; do printf "%s\\n" "$a"; done >> {out}/args\necho run >> {out}/runs\n'


async def test_argv_macros_expand_one_element_per_recipient_in_one_run(scripts):
    s = scripts.script("args.sh", ARGS.format(out=scripts.out))
    argv = [str(s), "-f", "${sender}", "$nexthop", "$(queue_id)", "${size}", "--", "${recipient}",
            "u=${user} e=${extension}", "${mailbox}@${domain}", "$$HOME", "${original_recipient}"]
    rcpts = ("a+x@pipe.test", "B@Pipe.Test", "c@pipe.test")
    report = await pipe(argv).deliver(request(*rcpts, originals={"a+x@pipe.test": '"orig"@Elsewhere.test.'}))
    assert [outcome(r) for r in report.results] == [(Outcome.SENT, "2.0.0")] * 3
    assert scripts.read("runs") == "run\n"
    assert scripts.read("args").splitlines() == [
        "-f", SENDER, "pipe.test", "Q1ABC", str(len(CONTENT)), "--",
        "a+x@pipe.test", "B@Pipe.Test", "c@pipe.test",
        "u=a e=x", "u=B e=", "u=c e=",
        "a+x@pipe.test", "B@Pipe.Test", "c@pipe.test",
        "$HOME",
        "orig@Elsewhere.test.", "B@Pipe.Test", "c@pipe.test"]  # the original as Postfix's pipe(8) gives it


async def test_macro_values_are_single_arguments_and_the_null_sender_is_mailer_daemon(scripts):
    s = scripts.script("args.sh", ARGS.format(out=scripts.out))
    rcpt = '"two words;rm -rf x"@pipe.test'
    report = await pipe([str(s), "${sender}", "${recipient}", "${user}"], flags="hu").deliver(
        request(rcpt.replace("pipe.test", "PIPE.test"), sender=""))
    assert outcome(report.results[0]) == (Outcome.SENT, "2.0.0")
    # a quoted local part in its internal form, as Postfix's pipe(8) passes it (flag q would quote it)
    assert scripts.read("args").splitlines() == ["MAILER-DAEMON", "two words;rm -rf x@pipe.test",
                                                 "two words;rm -rf x"]


async def test_flags_d_r_f_o_prepend_headers_and_run_once_per_recipient(scripts):
    s = scripts.script("each.sh", f'cat > "{scripts.out}/$1"\n')
    report = await pipe([str(s), "${recipient}"], flags="DRFO").deliver(
        request("a@pipe.test", "b@pipe.test", originals={"a@pipe.test": '"first"@Else.Test.'}))
    assert [outcome(r) for r in report.results] == [(Outcome.SENT, "2.0.0")] * 2
    from_line = f"From {SENDER}  {time.asctime(time.localtime(1_700_000_000.0))}\n"
    # the original as Postfix's pipe(8) writes it: needless quotes dropped, case and trailing dot kept
    assert scripts.read("a@pipe.test") == (from_line + f"Return-Path: <{SENDER}>\nX-Original-To: first@Else.Test.\n"
                                           "Delivered-To: a@pipe.test\n" + LF_CONTENT.decode())
    assert scripts.read("b@pipe.test").startswith(from_line + f"Return-Path: <{SENDER}>\n"
                                                  "X-Original-To: b@pipe.test\nDelivered-To: b@pipe.test\n")


async def test_quoting_flags_and_a_blank_line(scripts):
    s = scripts.script("cat.sh", f"cat > {scripts.out}/stdin\n")
    await pipe([str(s)], flags=">.B").deliver(request("a@pipe.test", content=CONTENT.rstrip(b"\r\n")))
    assert scripts.read("stdin") == ("From: sender@remote.test\nSubject: hello\n\nline one\n>From here\n..dot\n\n")


async def test_flag_d_bounces_a_delivered_to_loop_without_running(scripts):
    s = scripts.script("ran.sh", f"touch {scripts.out}/ran\n")
    looped = b"Delivered-To: A@pipe.test\r\n" + CONTENT
    report = await pipe([str(s)], flags="D").deliver(request("a@pipe.test", "b@pipe.test", content=looped))
    assert [outcome(r) for r in report.results] == [(Outcome.BOUNCED, "5.4.6"), (Outcome.SENT, "2.0.0")]
    assert report.results[0].text == "mail forwarding loop for a@pipe.test"


async def test_control_characters_in_an_address_bounce_that_recipient_before_anything_runs(scripts):
    s = scripts.script("args.sh", ARGS.format(out=scripts.out))
    report = await pipe([str(s), "${recipient}"]).deliver(request("bad\nX-Evil: 1@pipe.test", "good@pipe.test"))
    assert [outcome(r) for r in report.results] == [(Outcome.BOUNCED, "5.1.3"), (Outcome.SENT, "2.0.0")]
    assert scripts.read("args") == "good@pipe.test\n"

    [result] = (await pipe([str(s)]).deliver(request("c@pipe.test", sender="x\x7f@remote.test"))).results
    assert outcome(result) == (Outcome.BOUNCED, "5.1.7")
    assert scripts.read("runs") == "run\n"


# -------------------------------------------------------------------------------- environment, identity


async def test_the_environment_is_exactly_path_and_what_is_given():
    result = await run_command(["/usr/bin/env"], stdin=b"", env={"ONLY": "this"}, time_limit=5, output_limit=4096)
    assert result.exit_code == 0
    assert sorted(result.output.splitlines()) == ["ONLY=this", "PATH=/usr/bin:/bin"]
    [sent] = (await pipe(["/usr/bin/env"]).deliver(request("a@pipe.test"))).results
    assert sent.text == "delivered via filt service (PATH=/usr/bin:/bin)"


async def test_the_identity_is_nobody_as_root_and_switching_needs_root(scripts):
    s = scripts.script("id.sh", f"id -u > {scripts.out}/uid\nid -g > {scripts.out}/gid\n")
    nobody = pwd.getpwnam("nobody")
    [result] = (await pipe([str(s)], user="nobody").deliver(request("a@pipe.test"))).results
    if os.geteuid() == 0:
        assert outcome(result) == (Outcome.SENT, "2.0.0")
        assert (scripts.read("uid"), scripts.read("gid")) == (f"{nobody.pw_uid}\n", f"{nobody.pw_gid}\n")
        [default] = (await pipe([str(s)]).deliver(request("a@pipe.test"))).results  # user "" as root: nobody
        assert outcome(default) == (Outcome.SENT, "2.0.0") and scripts.read("uid") == f"{nobody.pw_uid}\n"
    else:
        assert (outcome(result), result.text) == ((Outcome.DEFERRED, "4.3.0"),
                                                  "cannot switch to user nobody: not running as root")
        assert scripts.read("uid") == ""
    with pytest.raises(CommandNotRun, match="no such user"):
        await run_command(["/bin/true"], stdin=b"", env={}, time_limit=5, output_limit=10, user="no-such-user-x")


async def test_a_script_without_an_interpreter_line_is_run_by_the_shell_as_execvp_runs_it(scripts, monkeypatch):
    """A file the kernel cannot run (ENOEXEC: no `#!`) is run as `/bin/sh FILE args`, as glibc's execvp runs it for
    Postfix's pipe(8): FILE as found on PATH for a bare name. So on every path: as ourselves (not root: the only
    one), and as root as a user, through setpriv (whose execvp does it) or without it (the keywords)."""
    plain = scripts.path / "plain"
    plain.write_text('echo "$0 $1 $(id -u)"\n')
    plain.chmod(0o755)
    path = f"/nonexistent:{scripts.path}:/usr/bin:/bin"
    ways = [(None, None, os.geteuid())]
    if os.geteuid() == 0:
        ways += [("nobody", works, pwd.getpwnam("nobody").pw_uid) for works in (True, False)]
    for user, setpriv_works, uid in ways:
        if setpriv_works is not None:
            check = pipe_module._SetprivCheck({pipe_module.SETPRIV: setpriv_works})
            monkeypatch.setattr(pipe_module, "_SETPRIV_CHECK", check)
        for argv0 in (str(plain), "plain"):
            result = await run_command([argv0, "one"], stdin=b"", env={"PATH": path}, time_limit=5,
                                       output_limit=1000, user=user)
            assert result == pipe_module.CommandResult(0, None, False, f"{plain} one {uid}\n"), (user, setpriv_works)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches users")
async def test_a_command_run_as_a_user_is_spawned_without_what_rules_out_vfork(monkeypatch):
    """As root with a user, the spawn is given no uid, gid, groups or preexec_fn: with any of them CPython's
    _posixsubprocess fork()s the whole server on the event loop's thread (page tables copied, then copy-on-write
    faults until the child's exec: 30 ms at 10 MB, 120 ms at 1 GB of RSS per command), without them it vfork()s.
    The command still runs as the user (setpriv switches in the child's program)."""
    spawns = []
    execute_child = subprocess.Popen._execute_child
    parameters = inspect.signature(execute_child)

    def recorded(self, *args, **kwargs):
        given = parameters.bind(self, *args, **kwargs).arguments
        spawns.append({name: given[name] for name in ("uid", "gid", "gids", "preexec_fn")})
        return execute_child(self, *args, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "_execute_child", recorded)
    ran = await run_command(["/usr/bin/id", "-u"], stdin=b"", env={}, time_limit=10, output_limit=100, user="nobody")
    assert ran.output == f"{pwd.getpwnam('nobody').pw_uid}\n"
    assert spawns and all(spawn == dict.fromkeys(spawn) for spawn in spawns), spawns


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches users")
async def test_a_program_the_user_cannot_reach_is_not_run_as_root_could_reach_it(tmp_path):
    """The exec as a user is made with the user's rights only: a program in a directory only root may search is
    EACCES, `execvp PROG: Permission denied`, as for a switch made before the exec (setpriv keeps root's
    capabilities until its own exec: its execvp would find the program, or say ENOENT for one that is not there).
    setpriv's words are read whole past a small output limit."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    program = private / "prog"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    for argv0 in (str(program), str(private / "not-there")):
        with pytest.raises(CommandNotRun) as refused:
            await run_command([argv0], stdin=b"", env={}, time_limit=5, output_limit=10, user="nobody")
        assert (refused.value.text, refused.value.exec_errno, refused.value.exec_failure) == (
            f"cannot run {argv0} as nobody: Permission denied", errno.EACCES, f"execvp {argv0}: Permission denied")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches users")
async def test_a_commands_own_line_like_setprivs_is_its_result(scripts):
    """Run as a user (through setpriv), a command that ends 126 or 127 after one line `setpriv: what: why` of its own
    is the command's result, as it was without setpriv: only the lines setpriv writes about this command's exec,
    its second exec or the switch, each with the status setpriv gives it, read as a command not run."""
    mimic = scripts.path / "mimic"
    for line, status in (("setpriv: cannot open /etc/x: No such file or directory", 127),
                         ("setpriv: failed to execute /bin/other: Permission denied", 126),
                         (f"setpriv: failed to execute {mimic}: No such file or directory", 126),
                         ("setpriv: setgroups failed: Operation not permitted", 126)):
        mimic.write_text(f"#!/bin/sh\nprintf '%s\\n' '{line}'\nexit {status}\n")
        mimic.chmod(0o755)
        result = await run_command([str(mimic)], stdin=b"", env={}, time_limit=5, output_limit=1000, user="nobody")
        assert result == pipe_module.CommandResult(status, None, False, f"{line}\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches users")
async def test_a_setpriv_that_cannot_be_run_is_not_the_commands_exec_failing(tmp_path, monkeypatch):
    """setpriv gone since it was checked: a command not run, in setpriv's name, with no exec errno (not `execvp
    true: No such file or directory`, whose ENOENT would send a local `|true` on to /bin/sh for nothing)."""
    gone = str(tmp_path / "setpriv")
    monkeypatch.setattr(pipe_module, "SETPRIV", gone)
    monkeypatch.setattr(pipe_module, "_SETPRIV_CHECK", pipe_module._SetprivCheck({gone: True}))
    with pytest.raises(CommandNotRun) as refused:
        await run_command(["true"], stdin=b"", env={}, time_limit=5, output_limit=10, user="nobody")
    assert (refused.value.text, refused.value.exec_errno, refused.value.exec_failure) == (
        f"cannot run true as nobody: {gone}: No such file or directory", None, "")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches users")
async def test_arguments_too_long_for_any_exec_are_the_commands_exec_failing_through_setpriv_too():
    """One argument over the kernel's 128 KiB: setpriv's exec is refused E2BIG before the command's could be, but
    the arguments are the command's: its exec failing (the errno kept, so that a local `|command` run by /bin/sh
    gives Postfix's `execl /bin/sh: Argument list too long`), as without setpriv."""
    with pytest.raises(CommandNotRun) as refused:
        await run_command(["true", "x" * 140_000], stdin=b"", env={}, time_limit=5, output_limit=10, user="nobody")
    assert (refused.value.text, refused.value.exec_errno) == (
        "cannot run true as nobody: Argument list too long", errno.E2BIG)


FAKE_SETPRIVS = {  # what is at SETPRIV on some systems
    "busybox": """case "$1" in --version) echo 'BusyBox v1.36.1 multi-call binary.'; exit 0;; esac
echo "setpriv: unrecognized option '$1'"; exit 1
""",
    # util-linux before errexec(): a failed exec is `cannot execute: PROG: why`, status 1. (This one switches nothing.)
    "util-linux 2.28": """case "$1" in --version) echo 'setpriv from util-linux 2.28'; exit 0;; esac
while [ "$1" != -- ]; do shift; done; shift
[ -x "$1" ] || { echo "setpriv: cannot execute: $1: No such file or directory"; exit 1; }
exec "$@"
"""}


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches users")
@pytest.mark.parametrize("kind", FAKE_SETPRIVS)
async def test_a_setpriv_that_does_not_work_as_needed_is_not_used(scripts, monkeypatch, caplog, kind):
    """What is at SETPRIV is checked once per process before it is used: busybox's (no --reuid) would make every
    command run as a user fail, an older util-linux's failed exec would be the command's result, a setpriv that does
    not switch would run it as root. The command runs as the user all the same (the keywords: a fork), with one
    warning naming the setpriv."""
    fake = scripts.script("setpriv", FAKE_SETPRIVS[kind])
    monkeypatch.setattr(pipe_module, "SETPRIV", str(fake))
    monkeypatch.setattr(pipe_module, "_SETPRIV_CHECK", pipe_module._SetprivCheck())
    for _ in range(2):
        ran = await run_command(["/usr/bin/id", "-u"], stdin=b"", env={}, time_limit=10, output_limit=100,
                                user="nobody")
        assert ran == pipe_module.CommandResult(0, None, False, f"{pwd.getpwnam('nobody').pw_uid}\n")
    [warning] = [r.getMessage() for r in caplog.records if r.name == "mailflow.pipe"]
    assert warning.startswith(f"{fake} is not used to run commands as a user"), warning


def recorded_spawns(monkeypatch) -> list[dict]:
    """Each spawn's program and the identity keywords _posixsubprocess was given (uid None: no switch of its own)."""
    spawns = []
    execute_child = subprocess.Popen._execute_child
    parameters = inspect.signature(execute_child)

    def recorded(self, *args, **kwargs):
        given = parameters.bind(self, *args, **kwargs).arguments
        spawns.append({"program": given["args"][0], "uid": given["uid"]})
        return execute_child(self, *args, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "_execute_child", recorded)
    return spawns


def checks_of_setpriv(monkeypatch, *outcomes, taking: float = 0.3) -> list[str]:
    """_setpriv_unfit made to give `outcomes` in turn (an exception: raised), each `taking` s; the paths it checked."""
    checked: list[str] = []

    def unfit(setpriv: str) -> str:
        checked.append(setpriv)
        time.sleep(taking)
        outcome = outcomes[len(checked) - 1]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(pipe_module, "_setpriv_unfit", unfit)
    return checked


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches users")
async def test_commands_waiting_for_setprivs_check_share_one_run_and_hold_no_executor_thread(monkeypatch):
    """Ten commands as a user start while setpriv has no verdict: one check runs (in a thread of its own), all ten
    await it, and the loop's default executor (table lookups, a reload's check) stays free meanwhile: each waiting
    command held one of its threads, so an unrelated job waited out the check."""
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(pipe_module, "_SETPRIV_CHECK", pipe_module._SetprivCheck())
    checked = checks_of_setpriv(monkeypatch, "", taking=1.0)
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    commands = [asyncio.ensure_future(run_command(["/usr/bin/id", "-u"], stdin=b"", env={}, time_limit=10,
                                                  output_limit=100, user="nobody")) for _ in range(10)]
    await asyncio.sleep(0.05)
    began = time.monotonic()
    await asyncio.to_thread(lambda: None)
    waited = time.monotonic() - began
    results = await asyncio.gather(*commands)
    assert {result.output for result in results} == {f"{pwd.getpwnam('nobody').pw_uid}\n"}
    assert checked == [pipe_module.SETPRIV]
    assert waited < 0.5, waited


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches users")
async def test_a_check_of_setpriv_that_could_not_finish_is_made_again_after_its_interval(monkeypatch, caplog):
    """A check that timed out (or could not spawn: EAGAIN) gives no verdict: that command and those of the next
    CHECK_AGAIN_AFTER seconds run forked with the keywords, with one warning, and the next command after that checks
    again; setpriv found fit, commands go through it from then on, with no further check. (A timeout turned setpriv
    off for the process's life.)"""
    now = [1000.0]
    monkeypatch.setattr(pipe_module, "_SETPRIV_CHECK", pipe_module._SetprivCheck(again_after=600,
                                                                                  clock=lambda: now[0]))
    checked = checks_of_setpriv(monkeypatch, subprocess.TimeoutExpired(pipe_module.SETPRIV, 10), "")
    spawns = recorded_spawns(monkeypatch)
    nobody = pwd.getpwnam("nobody").pw_uid
    for later in (0, 599, 2, 0):
        now[0] += later
        ran = await run_command(["/usr/bin/id", "-u"], stdin=b"", env={}, time_limit=10, output_limit=100,
                                user="nobody")
        assert ran.output == f"{nobody}\n"
    assert len(checked) == 2
    assert spawns == [{"program": "/usr/bin/id", "uid": nobody}] * 2 + [
        {"program": pipe_module.SETPRIV, "uid": None}] * 2
    [warning] = [r.getMessage() for r in caplog.records if r.name == "mailflow.pipe"]
    assert warning.startswith(f"{pipe_module.SETPRIV} could not be checked"), warning


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches users")
async def test_the_transports_built_as_root_begin_setprivs_check(monkeypatch):
    """The check of setpriv begins when the transports are built, before any command waits for it."""
    monkeypatch.setattr(pipe_module, "_SETPRIV_CHECK", pipe_module._SetprivCheck())
    checked = checks_of_setpriv(monkeypatch, "")
    config = Config()
    build_transports(config, None, VirtualClock(), Router(config))
    await eventually(lambda: checked == [pipe_module.SETPRIV])


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("service, key, reason", [
    ({"argv": ["bin/filter"]}, "pipe.filt.argv", "absolute path"),
    ({"argv": ["/bin/filter", "${client_name}"]}, "pipe.filt.argv", "unknown macro ${client_name}"),
    ({"argv": ["/bin/filter", "5$"]}, "pipe.filt.argv", "starts no macro"),
    ({"argv": ["/bin/filter"], "flags": "DZ"}, "pipe.filt.flags", "unknown flag 'Z'"),
    ({"argv": ["/bin/filter"], "user": "root"}, "pipe.filt.user", "never run as root"),
    ({}, "pipe.filt.argv", "Field required"),
])
def test_config_errors_name_the_key(service, key, reason):
    with pytest.raises(ConfigError) as error:
        config_from_dict({"pipe": {"filt": service}})
    assert error.value.key == key and reason in error.value.reason


def test_a_pipe_service_cannot_take_a_built_in_transport_name():
    with pytest.raises(ConfigError) as error:
        config_from_dict({"pipe": {"smtp": {"argv": ["/bin/cat"]}}})
    assert error.value.key == "pipe" and "'smtp' is the name of a built-in transport" in error.value.reason


async def test_a_spooled_message_is_streamed_to_the_command_with_its_lines_quoted(scripts, tmp_path):
    data = big_message()
    s = scripts.script("cat.sh", f'cat > {scripts.out}/stdin\n')
    req = DeliveryRequest("Q1ABC", SENDER, (Recipient(0, "a@pipe.test", "a@pipe.test"),), "pipe.test",
                          spooled(tmp_path, data))
    [result] = (await pipe([str(s)], flags="R.>").deliver(req)).results
    assert outcome(result) == (Outcome.SENT, "2.0.0")
    lines = data.replace(b"\r\n", b"\n").split(b"\n")
    lines = [b">" + line if line.startswith(b"From ") else line for line in lines]
    lines = [b"." + line if line.startswith(b".") else line for line in lines]
    expected = f"Return-Path: <{SENDER}>\n".encode() + b"\n".join(lines)
    assert (scripts.out / "stdin").read_bytes() == expected


async def test_spooling_a_command_s_input_is_bounded_by_its_time_limit(tmp_path):
    """The command's input is spooled before it starts, and that took as long as the queue file took to read (a
    hung disk: for ever; 1 byte a second: 3 s past a 0.5 s limit) where feeding a pipe had been inside the
    command's time limit. Past the limit the delivery is not run: CommandNotRun (deferred 4.3.0)."""
    async def slowly():
        for _ in range(20):
            await asyncio.sleep(0.5)
            yield b"y"

    started = time.monotonic()
    with pytest.raises(CommandNotRun, match=r"cannot spool the command's input within 0.5s"):
        await run_command(["/bin/cat"], stdin=slowly(), env={}, time_limit=0.5, output_limit=100,
                          spool=CommandSpool(tmp_path))
    assert time.monotonic() - started < 5
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------- the spooled input's file


def spooling(scripts, spool, keep_free: int, free: int) -> PipeTransport:
    """A service whose command records that it ran, spooling in `spool`, where `free` bytes are free."""
    s = scripts.script("ran.sh", f"touch {scripts.out}/ran\ncat > {scripts.out}/got\n")
    return PipeTransport(PipeService(argv=(str(s),)), name="filt", now=lambda: 1_700_000_000.0,
                         spool=CommandSpool(spool, keep_free, lambda: free))


@pytest.mark.parametrize("room, delivered", [(len(CONTENT), False), (len(CONTENT) + 1, True)])
async def test_a_copy_that_would_take_the_queue_below_its_floor_defers_4_3_1_without_running(scripts, tmp_path, caplog,
                                                                                             room, delivered):
    """Every delivery to a command held its own copy of the message on the queue's file system, with no check of
    free space: 20 parallel deliveries of a 50 MB message took 1 GB, and could fill the disk the queue needs. A copy
    that would leave no more than the floor smtpd keeps (queue_minfree, 1.5 x message_size_limit; smtpd refuses
    mail at exactly the floor, as Postfix's smtpd_check_queue) is not made: the delivery is deferred 4.3.1 with
    Postfix's words, "insufficient system storage" (was: the queue path and byte counts, which differ at each
    try: pflogsumm could not group them; they are in the warning line now, keyed by the queue id), the command not
    run, nothing left in the spool. The copy's size is taken up front (the stored message's size plus the lines
    the flags put first), not only as each 256 KB piece is written."""
    floor = 10_000_000
    [result] = (await spooling(scripts, tmp_path, floor, floor + room).deliver(request("a@pipe.test"))).results
    if delivered:
        assert outcome(result) == (Outcome.SENT, "2.0.0")
        assert (scripts.out / "got").read_bytes() == LF_CONTENT
    else:
        assert outcome(result) == (Outcome.DEFERRED, "4.3.1")
        assert result.text == "insufficient system storage"
        assert f"Q1ABC: insufficient system storage to spool a command's input in {tmp_path}: {floor + room} bytes " \
               f"free, {len(CONTENT)} to write, {floor} kept free" in caplog.messages
        assert not (scripts.out / "ran").exists()
    assert list(tmp_path.iterdir()) == []


async def test_a_copy_bigger_than_the_room_is_refused_before_a_byte_is_written(scripts, tmp_path, monkeypatch):
    """The room was checked piece by piece only: a 2 MB copy with 1.5 MB free above the floor wrote 1.25 MB first,
    taking the disk to just above the floor (where smtpd answers 452 to all mail) until it was deferred. The whole
    copy's size is checked before the first write."""
    written: list[int] = []
    real_write = os.write

    def counted_write(fd: int, data) -> int:
        written.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(pipe_module.os, "write", counted_write)
    (tmp_path / "store").mkdir()
    (tmp_path / "spool").mkdir()
    content = spooled(tmp_path / "store", big_message(2_000_000))  # (read in 64 KB chunks, as the store's)
    floor = 10_000_000
    service = spooling(scripts, tmp_path / "spool", floor, floor + 1_500_000)
    [result] = (await service.deliver(request_of(content))).results
    assert outcome(result) == (Outcome.DEFERRED, "4.3.1")
    assert written == []
    assert not (scripts.out / "ran").exists()


async def test_a_full_disk_while_spooling_defers_4_3_1(scripts, tmp_path, monkeypatch):
    """A write that fails for want of space (the floor cannot see other writers, or quotas) is the storage
    deferral too, 4.3.1 (was 4.3.0), with the system's words; the command does not run."""
    def full(fd: int, data: bytes, spool: CommandSpool) -> None:
        os.close(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pipe_module, "_write_and_close", full)  # (the room is checked there too)
    [result] = (await spooling(scripts, tmp_path, 0, 10**12).deliver(request("a@pipe.test"))).results
    assert outcome(result) == (Outcome.DEFERRED, "4.3.1")
    assert result.text == f"cannot spool the command's input in {tmp_path}: No space left on device"
    assert not (scripts.out / "ran").exists()


def test_the_spool_of_commands_keeps_free_what_smtpd_keeps_free(tmp_path):
    """The floor is smtpd's: max(queue_minfree, 1.5 x message_size_limit), with the smallest message_size_limit a
    listener takes (its own, or [smtpd]'s): command deliveries go on while any listener takes mail. It was the
    largest: a 200 MB submission listener beside port 25's 10 MB made every copy wait for 300 MB free, and with
    100 MB free port 25 took mail that no command could be given until the disk freed or the mail bounced."""
    def spool_of(queue_minfree: int, message_size_limit: int, *listeners: int, listen=("127.0.0.1:2525",)):
        return command_spool(config_from_dict({"queue": {"queue_minfree": queue_minfree},
                                               "smtpd": {"message_size_limit": message_size_limit,
                                                         "listen": list(listen), "listeners": [
                                                   {"address": f"127.0.0.1:{2526 + i}",
                                                    "overrides": {"message_size_limit": limit}}
                                                   for i, limit in enumerate(listeners)]}},
                                              base=tmp_path))

    assert spool_of(0, 10_000_000).keep_free == 15_000_000
    assert spool_of(40_000_000, 10_000_000).keep_free == 40_000_000
    assert spool_of(0, 10_000_000, 30_000_000, 1_000).keep_free == 1_500
    assert spool_of(0, 10_000_000, 30_000_000, listen=()).keep_free == 45_000_000
    assert spool_of(0, 10_000_000, 200_000_000, 0, listen=()).keep_free == 0  # 0: no limit, queue_minfree's floor
    port25_and_587 = spool_of(0, 10_000_000, 200_000_000)
    free = 100_000_000
    assert not short_of_space(free, 0, 10_000_000, 0)  # port 25 takes mail ...
    assert not leaves_too_little(free, port25_and_587.keep_free, 50_000)  # ... and a command gets its copy
    spool = spool_of(0, 1000)
    assert os.path.commonpath([spool.directory, tmp_path]) == str(tmp_path)
    os.makedirs(spool.directory)
    assert spool.free_space is not None and 0 < spool.free_space() <= shutil.disk_usage(tmp_path).total


async def test_a_command_cannot_write_to_its_own_input(scripts, tmp_path):
    """The command's stdin was the descriptor the spool wrote through, read-write: a command could overwrite the
    message it was given (and, through its offset, what a retried exec of the shell would read). It is a read-only
    descriptor of the same unnamed file now."""
    s = scripts.script("write.sh", f"if {{ printf EVIL >&0; }} 2>/dev/null; then echo writable; else echo read-only;"
                                   f" fi > {scripts.out}/mode\ncat > {scripts.out}/got\n")
    result = await run_command([str(s)], stdin=LF_CONTENT, env={}, time_limit=10, output_limit=100,
                               spool=CommandSpool(tmp_path))
    assert result.exit_code == 0
    assert scripts.read("mode") == "read-only\n"
    assert (scripts.out / "got").read_bytes() == LF_CONTENT


async def test_a_spool_file_made_for_a_delivery_cancelled_meanwhile_is_closed(tmp_path, monkeypatch):
    """The spool file is opened by a worker thread: a delivery cancelled (a stop, the time limit) while the thread
    ran never saw its descriptor, and nothing closed it: one descriptor and one unnamed file lost each time. Here
    the thread is held until the cancel is done."""
    entered, release = threading.Event(), threading.Event()
    made: list[tuple[int, int]] = []
    real_unnamed_file = pipe_module._unnamed_file

    def held_unnamed_file(directory):
        entered.set()
        assert release.wait(5)
        fd = real_unnamed_file(directory)
        made.append((fd, os.fstat(fd).st_ino))
        return fd

    monkeypatch.setattr(pipe_module, "_unnamed_file", held_unnamed_file)
    delivery = asyncio.ensure_future(run_command(["/bin/cat"], stdin=b"x\n", env={}, time_limit=10,
                                                 output_limit=100, spool=CommandSpool(tmp_path)))
    assert await asyncio.to_thread(entered.wait, 5)
    delivery.cancel()
    with pytest.raises(asyncio.CancelledError):
        await delivery
    release.set()
    await eventually(lambda: made, timeout=5, what="the thread made the file")
    await eventually(lambda: closed(made[0]), timeout=2, what="the abandoned spool file is closed")


async def test_a_spool_file_made_before_its_delivery_is_cancelled_is_closed_by_the_cancel(tmp_path, monkeypatch):
    """The other order of the handoff: the thread has made the file (both descriptors) and handed it over, but the
    delivery is cancelled before it resumes: the cancel closes them (it never returns them to anyone)."""
    made: list[tuple[int, int]] = []
    real_made_by = pipe_module._Handoff.made_by
    loop = asyncio.get_running_loop()
    delivery: asyncio.Future | None = None

    def made_then_cancelled(handoff, make, directory):
        fds = real_made_by(handoff, make, directory)
        made.extend((fd, os.fstat(fd).st_ino) for fd in fds)
        assert delivery is not None
        loop.call_soon_threadsafe(delivery.cancel)  # (queued before the thread's result reaches the loop)
        return fds

    monkeypatch.setattr(pipe_module._Handoff, "made_by", made_then_cancelled)
    delivery = asyncio.ensure_future(run_command(["/bin/cat"], stdin=b"x\n", env={}, time_limit=10,
                                                 output_limit=100, spool=CommandSpool(tmp_path)))
    with pytest.raises(asyncio.CancelledError):
        await delivery
    assert len(made) == 2 and all(closed(fd) for fd in made)


async def test_a_piece_s_failure_after_its_delivery_was_cancelled_is_not_an_unretrieved_error(tmp_path, monkeypatch):
    """A piece's thread that ends in an error (low space, a full disk) after its delivery was cancelled (the time
    limit while a statvfs or write hung, a stop) left that error in a future nobody read: asyncio logged "Future
    exception was never retrieved" at ERROR with a traceback. The error is nobody's now, and retrieved."""
    entered, release = threading.Event(), threading.Event()
    real_write_and_close = pipe_module._write_and_close

    def held_write_and_close(fd, data, room):
        entered.set()
        if not release.wait(5):
            os.close(fd)
            return
        real_write_and_close(fd, data, room)  # (no room: raises CommandNotRun)

    writes: list[weakref.ref] = []
    loop = asyncio.get_running_loop()
    real_run_in_executor = loop.run_in_executor

    def run_in_executor(executor, call, *args):
        future = real_run_in_executor(executor, call, *args)
        if call is held_write_and_close:
            writes.append(weakref.ref(future))
        return future

    monkeypatch.setattr(pipe_module, "_write_and_close", held_write_and_close)
    monkeypatch.setattr(loop, "run_in_executor", run_in_executor)
    unhandled: list[str] = []  # (their messages only: keeping the context would keep the future)
    loop.set_exception_handler(lambda _, context: unhandled.append(context.get("message", "")))
    try:
        delivery = asyncio.ensure_future(run_command(["/bin/cat"], stdin=b"x\n", env={}, time_limit=10,
                                                     output_limit=100, spool=CommandSpool(tmp_path, 10, lambda: 10)))
        assert await asyncio.to_thread(entered.wait, 5)
        delivery.cancel()
        with pytest.raises(asyncio.CancelledError):
            await delivery
        del delivery
        release.set()
        await eventually(lambda: gc.collect() >= 0 and writes and writes[0]() is None, timeout=5,
                         what="the piece's future is done and gone")
    finally:
        loop.set_exception_handler(None)
    assert unhandled == []


async def test_a_free_space_that_cannot_be_read_is_one_warning_per_copy_and_no_refusal(scripts, tmp_path, caplog):
    """A statvfs that fails (the disk does not answer it) is no refusal: the write says whether the disk works. It
    was warned of at each 256 KB piece (20 lines for a 5 MB copy, times each parallel delivery, at each retry) with
    no queue id; one warning per copy now, keyed by the queue id, and no more checks for that copy."""
    def unreadable() -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    s = scripts.script("ran.sh", f"cat > {scripts.out}/got\n")
    (tmp_path / "store").mkdir()
    (tmp_path / "spool").mkdir()
    data = big_message(1_500_000)  # (read from its file in 64 KB chunks, written in 6 pieces)
    service = PipeTransport(PipeService(argv=(str(s),)), name="filt",
                            spool=CommandSpool(tmp_path / "spool", 10, unreadable))
    [result] = (await service.deliver(request_of(spooled(tmp_path / "store", data)))).results
    assert outcome(result) == (Outcome.SENT, "2.0.0")
    assert (scripts.out / "got").read_bytes() == data.replace(b"\r\n", b"\n")
    assert [m for m in caplog.messages if "free space" in m] == [
        f"Q1ABC: cannot read the free space of {tmp_path / 'spool'}: [Errno 5] Input/output error (the command's "
        f"input is spooled unchecked)"]


async def test_without_proc_a_command_still_gets_its_input_read_only(scripts, tmp_path, monkeypatch):
    """The read-only descriptor was opened only through /proc/self/fd: with no /proc (a chroot, a sandbox) every
    command delivery was deferred 4.3.0 "cannot reopen the command's input read-only", to its bounce at the end
    of the queue lifetime. Without /proc the file is made with a name, opened read-only by it, then unlinked:
    the command reads its whole input, cannot write to it, and nothing is left in the spool."""
    real_open = os.open

    def no_proc(path, *args, **kwargs):
        if os.fspath(path).startswith("/proc/"):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(pipe_module.os, "open", no_proc)
    s = scripts.script("write.sh", f"if {{ printf EVIL >&0; }} 2>/dev/null; then echo writable; else echo read-only;"
                                   f" fi > {scripts.out}/mode\ncat > {scripts.out}/got\n")
    result = await run_command([str(s)], stdin=LF_CONTENT, env={}, time_limit=10, output_limit=100,
                               spool=CommandSpool(tmp_path))
    assert result.exit_code == 0, result
    assert scripts.read("mode") == "read-only\n"
    assert (scripts.out / "got").read_bytes() == LF_CONTENT
    assert list(tmp_path.iterdir()) == []


def spool_descriptors(spool) -> list[str]:
    """What this process holds open in `spool` (its files, named or unlinked)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{spool}/"):
            held.append(target)
    return held


def without_proc(monkeypatch, then=None) -> list[str]:
    """os.open as with no /proc mounted; `then(path)` before each other open that creates nothing; the /proc paths
    tried, returned."""
    real_open, tried = os.open, []

    def no_proc(path, *args, **kwargs):
        if os.fspath(path).startswith("/proc/"):
            tried.append(os.fspath(path))
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if then is not None and not args[0] & os.O_CREAT:
            then(os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(pipe_module.os, "open", no_proc)
    return tried


async def test_without_proc_a_spool_file_whose_unlink_fails_leaves_no_descriptor(scripts, tmp_path, monkeypatch):
    """Without /proc the spool file is opened again by its name, then unlinked: an unlink that failed left both
    descriptors open (the function's result was lost with the exception), two a delivery for as long as the
    process ran. Every descriptor is closed; the delivery is deferred and the command does not run."""
    without_proc(monkeypatch)

    def refused(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(pipe_module.os, "unlink", refused)
    s = scripts.script("ran.sh", f"touch {scripts.out}/ran\n")
    with pytest.raises(CommandNotRun) as failed:
        await run_command([str(s)], stdin=b"x\n", env={}, time_limit=10, output_limit=100,
                          spool=CommandSpool(tmp_path))
    assert (failed.value.dsn, failed.value.text) == ("4.3.0", f"cannot spool the command's input in {tmp_path}: "
                                                              f"Permission denied")
    assert spool_descriptors(tmp_path) == []
    assert not (scripts.out / "ran").exists()


async def test_without_proc_a_spool_file_replaced_before_it_is_opened_again_is_refused(scripts, tmp_path,
                                                                                       monkeypatch):
    """The read-only descriptor opened by name was taken on trust: a file put in place of the one written (between
    the two opens) would have been the command's input, the message's bytes going nowhere. The two are compared
    (st_dev, st_ino): another file is refused, the delivery deferred, nothing left open or run."""
    def replaced(path: str) -> None:
        if os.path.dirname(path) == str(tmp_path):
            (tmp_path / "other").write_bytes(b"not the message\n")
            os.replace(tmp_path / "other", path)

    without_proc(monkeypatch, then=replaced)
    s = scripts.script("ran.sh", f"cat > {scripts.out}/got\n")
    with pytest.raises(CommandNotRun, match=r"was not the file made when it was opened again") as failed:
        await run_command([str(s)], stdin=b"the message\n", env={}, time_limit=10, output_limit=100,
                          spool=CommandSpool(tmp_path))
    assert failed.value.dsn == "4.3.0"
    assert spool_descriptors(tmp_path) == [] and list(tmp_path.iterdir()) == []
    assert not (scripts.out / "got").exists()


async def test_a_missing_proc_is_tried_once_per_spool(scripts, tmp_path, monkeypatch):
    """Each spool file tried /proc/self/fd first, failed, and fell back: an unnamed file made and thrown away per
    delivery. A /proc found missing is remembered by the spool (the copies of one CommandSpool share it)."""
    tried = without_proc(monkeypatch)
    spool = CommandSpool(tmp_path)
    for n in range(3):
        result = await run_command(["/bin/sh", "-c", f"cat > {scripts.out}/got{n}"], stdin=b"x\n", env={},
                                   time_limit=10, output_limit=100, spool=spool.for_copy(f"Q{n}", 2))
        assert result.exit_code == 0 and (scripts.out / f"got{n}").read_bytes() == b"x\n"
    assert len(tried) == 1


def test_a_missing_proc_found_by_one_thread_is_not_forgotten_for_another_threads_other_error(tmp_path, monkeypatch):
    """Each failed open through /proc wrote whether /proc was missing: a thread that failed for another reason
    (out of descriptors) just after one that found no /proc wrote False over its True, and every later file tried
    /proc again. One SpoolFiles, two threads: the first finds no /proc, the second then fails otherwise."""
    real_open, tries = os.open, []
    first_done = threading.Event()

    def failing(path, *args, **kwargs):
        if not os.fspath(path).startswith("/proc/"):
            return real_open(path, *args, **kwargs)
        tries.append(threading.current_thread().name)
        if threading.current_thread().name == "first":
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        assert first_done.wait(10)
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), path)

    monkeypatch.setattr(pipe_module.os, "open", failing)
    files = pipe_module.SpoolFiles()
    made: list[int] = []

    def make():
        made.extend(files.make(tmp_path))
        if threading.current_thread().name == "first":
            first_done.set()

    second = threading.Thread(target=make, name="second")
    second.start()
    deadline = time.monotonic() + 10
    while not tries and time.monotonic() < deadline:  # the second thread waits inside its /proc open
        time.sleep(0.001)
    first = threading.Thread(target=make, name="first")
    first.start()
    first.join(10)
    second.join(10)
    made.extend(files.make(tmp_path))  # (this thread: after a missing /proc, by name at once)
    for fd in made:
        os.close(fd)
    assert sorted(tries) == ["first", "second"]


async def test_a_spool_file_that_cannot_be_made_for_a_full_disk_defers_4_3_1(scripts, tmp_path, monkeypatch):
    """A spool file that could not be made for a full disk was deferred 4.3.0 while one that could not be written
    was 4.3.1: one mapping for both (`_not_spooled`), with the same words."""
    def full(directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pipe_module, "_unnamed_file", full)
    with pytest.raises(CommandNotRun) as failed:
        await run_command(["/bin/cat"], stdin=b"x\n", env={}, time_limit=10, output_limit=100,
                          spool=CommandSpool(tmp_path))
    assert (failed.value.dsn, failed.value.text) == (
        "4.3.1", f"cannot spool the command's input in {tmp_path}: No space left on device")
