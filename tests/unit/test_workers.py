"""mailflow.workers.BoundedWorkers: its bounded join at a stop."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
from functools import partial

import pytest

from mailflow.errors import TemporaryError
from mailflow.workers import BoundedWorkers


def named(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


async def test_close_within_waits_for_the_work_under_way_at_most_its_bound():
    """The stop shut the content checks' pool with a join without bound: a walk stuck in a hung sqlite read held up
    the store's close and the queue lock's release. A call that does not end within the bound is left (False);
    queued calls are cancelled; a pool whose work ends is joined (True)."""
    workers = BoundedWorkers(1, 30, "stuck pool")
    loop, release, started = asyncio.get_running_loop(), threading.Event(), asyncio.Event()
    hung = asyncio.ensure_future(workers.run(lambda: (loop.call_soon_threadsafe(started.set), release.wait(30))[1]))
    await asyncio.wait_for(started.wait(), 10)  # (it has taken the one thread)
    started = time.monotonic()
    assert await workers.close_within(0.2) is False
    assert 0.2 <= time.monotonic() - started < 2
    release.set()
    assert await hung is True

    quick = BoundedWorkers(1, 30, "quick pool")
    assert await quick.run(lambda: "done") == "done"
    assert await quick.close_within(5) is True
    assert named("quick-pool_") == []


async def test_a_thread_that_cannot_start_fails_the_call_and_is_not_counted(monkeypatch):
    """The thread was recorded before its start(): when it could not start (the process's thread limit), the call
    stayed queued (run later by the next thread, though its caller was told it failed), and the pool counted a thread
    that never ran (its join at the stop failed). The call fails at once and is not run; once threads start again,
    the pool makes one and runs calls."""
    import mailflow.workers as module

    class NoThread(threading.Thread):
        def start(self):
            raise RuntimeError("can't start new thread")

    workers = BoundedWorkers(2, 30, "limited pool")
    monkeypatch.setattr(module.threading, "Thread", NoThread)
    ran: list[str] = []
    with pytest.raises(TemporaryError, match=r"no worker free for limited pool: no thread could be started "
                                             r"\(can't start new thread, 0 busy\)"):
        await asyncio.wait_for(workers.run(partial(ran.append, "refused call")), 5)
    monkeypatch.undo()
    assert await asyncio.wait_for(workers.run(lambda: "done"), 5) == "done"
    assert ran == []  # (its caller was told it failed: it is not run later, behind its back)
    assert len(named("limited-pool_")) == 1
    assert await workers.close_within(5) is True


async def test_a_call_no_new_thread_can_run_does_not_wait_behind_a_hung_one(monkeypatch):
    """At the thread limit, a call the pool had threads for was queued behind their calls: with the one thread hung
    in its call, the next call waited for it for ever (the pool's `wait` bounds only the wait for a slot, and a
    slot was free). It waits for a thread to end a call for at most the pool's `wait`, queued nowhere (a refused
    call's job stayed queued, its closure and message with it, and counted busy, so the next call found the idle
    thread busy), then fails with the pool's 4.3.0; a call that finds a thread idle still runs in it."""
    import mailflow.workers as module

    class NoThread(threading.Thread):
        def start(self):
            raise RuntimeError("can't start new thread")

    workers = BoundedWorkers(3, 0.3, "hung pool")
    assert await workers.run(lambda: "first") == "first"  # (one thread, idle now)
    monkeypatch.setattr(module.threading, "Thread", NoThread)
    assert await asyncio.wait_for(workers.run(lambda: "in the idle thread"), 5) == "in the idle thread"
    loop, release, started = asyncio.get_running_loop(), threading.Event(), asyncio.Event()
    hung = asyncio.ensure_future(workers.run(lambda: (loop.call_soon_threadsafe(started.set), release.wait(30))[1]))
    await asyncio.wait_for(started.wait(), 10)
    ran: list[str] = []
    for _ in range(2):  # (the second as the first: the first left nothing queued nor counted)
        waited = time.monotonic()
        with pytest.raises(TemporaryError, match=r"no worker free for hung pool: no thread could be started "
                                                 r"\(can't start new thread, 1 busy\)") as refused:
            await asyncio.wait_for(workers.run(partial(ran.append, "behind the hung call")), 5)
        assert refused.value.dsn == "4.3.0"
        assert time.monotonic() - waited >= 0.3
        assert workers._pool._jobs.empty()
    release.set()
    assert await hung is True
    assert await asyncio.wait_for(workers.run(lambda: "again"), 5) == "again"
    assert ran == []
    monkeypatch.undo()
    assert await workers.close_within(5) is True


async def test_at_the_thread_limit_calls_wait_for_threads_that_end_their_calls(monkeypatch):
    """At the thread limit with every thread busy, a call failed 4.3.0 at once though the threads ended their calls
    a few milliseconds later (a container's task limit would defer local deliveries and DATA's checks under
    ordinary load). It waits for a thread to end a call, as the pool's `wait` rule says, and runs then."""
    import mailflow.workers as module

    class NoThread(threading.Thread):
        def start(self):
            raise RuntimeError("can't start new thread")

    workers = BoundedWorkers(4, 30, "busy pool")
    gate = threading.Barrier(2, timeout=10)
    assert await asyncio.gather(*(workers.run(gate.wait) for _ in range(2))) in ([0, 1], [1, 0])  # (two threads)
    monkeypatch.setattr(module.threading, "Thread", NoThread)
    results = await asyncio.wait_for(asyncio.gather(*(workers.run(partial(time.sleep, 0.05)) for _ in range(4))), 10)
    assert results == [None] * 4
    assert len(named("busy-pool_")) == 2
    monkeypatch.undo()
    assert await workers.close_within(5) is True


def test_a_thread_left_in_its_call_at_the_stop_does_not_keep_the_process_alive():
    """close_within gave up on a stuck call ("its thread is left"), but the pool's threads were a ThreadPoolExecutor's,
    which the interpreter's exit joins: a walk stuck in a hung sqlite read kept the stopped server alive until
    systemd's SIGKILL (in the foreground, for ever)."""
    script = textwrap.dedent("""
        import asyncio, threading
        from mailflow.workers import BoundedWorkers

        async def main():
            workers = BoundedWorkers(2, 60, "content checks", daemon=True)
            started = threading.Event()
            asyncio.ensure_future(workers.run(lambda: (started.set(), threading.Event().wait())))
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
            print("left" if await workers.close_within(0.2) is False else "joined", flush=True)

        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert (done.returncode, done.stdout) == (0, "left\n"), done.stderr


def test_a_file_append_under_way_at_the_exit_ends_whole(tmp_path):
    """Every pool's threads were daemon ones: the server's exit after the stop (the delivery cancelled after the
    grace, local's pool closed) killed local's /file writer between two writes, the entry cut (no roll back) and the
    next one glued to it. A pool that writes keeps threads the interpreter's exit joins: the entry is whole."""
    mbox = tmp_path / "keep.mbox"
    script = textwrap.dedent("""
        import asyncio, sys, threading, time
        from pathlib import Path
        from mailflow.workers import BoundedWorkers
        from mailflow.transports.local.mbox import append_mbox

        written = threading.Event()
        def entry():
            yield b"From a@x Thu Jan  1 00:00:00 1970\\nSubject: first half\\n"
            written.set()
            time.sleep(0.5)  # (a slow spool read, a slow NFS write)
            yield b"\\nsecond half\\n\\n"

        async def main():
            pool = BoundedWorkers(2, 60, "local file write")
            task = asyncio.create_task(append_mbox(Path(sys.argv[1]), entry(), locks=("fcntl",), workers=pool.run))
            await asyncio.get_running_loop().run_in_executor(None, written.wait, 10)
            task.cancel()  # (the stop's grace passed: the delivery is cancelled; its thread goes on)
            pool.close()

        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", script, str(mbox)], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    assert mbox.read_bytes() == b"From a@x Thu Jan  1 00:00:00 1970\nSubject: first half\n\nsecond half\n\n"


@pytest.mark.parametrize("under_way", [False, True])
def test_a_pool_never_closed_does_not_keep_the_process_from_exiting(tmp_path, under_way):
    """A pool whose threads the exit joins (daemon=False) and that nobody closed (a LocalTransport a test, or a
    start that failed half-way, never closed) kept its idle threads waiting for work for ever: the interpreter's
    exit never ended (test_local_commands.py run alone hung once its tests had passed). As a ThreadPoolExecutor's,
    such a pool is told to end at the exit: idle threads end, a call under way ends whole first."""
    ended = tmp_path / "ended"
    script = textwrap.dedent("""
        import asyncio, sys, threading, time
        from mailflow.workers import BoundedWorkers

        def call(under_way):
            if under_way:
                started.set()
                time.sleep(0.3)  # (still running when the exit comes)
            open(sys.argv[1], "w").close()

        started = threading.Event()
        async def main():
            pool = BoundedWorkers(2, 60, "local file write")
            under_way = sys.argv[2] == "True"
            if under_way:
                asyncio.ensure_future(pool.run(lambda: call(True)))
                await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
            else:
                await pool.run(lambda: call(False))

        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", script, str(ended), str(under_way)], capture_output=True, text=True,
                          timeout=30, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    assert ended.exists()


async def test_one_exit_hook_for_every_pool_and_a_closed_pool_defers(monkeypatch):
    """Each pool whose threads the exit joins registered its own exit hook (a few per reload, for the process's
    life). One hook, registered with the first pool, ends them all; after it ran, a pool's run() is a 4.3.0 at
    once (it was a RuntimeError, which no caller maps to a reply), and a pool that had no thread yet starts none
    (nobody would end it: the exit's join would wait for ever)."""
    import mailflow.workers as module

    hooks: list = []
    monkeypatch.setattr(module, "_UNCLOSED_AT_EXIT", module._PoolsAtExit())
    monkeypatch.setattr(module.threading, "_register_atexit", hooks.append)
    pools = [BoundedWorkers(1, 30, f"exit pool {n}") for n in range(3)]
    for pool in pools:
        assert await asyncio.wait_for(pool.run(lambda: "done"), 5) == "done"
    assert len(hooks) == 1
    hooks[0]()
    for n, pool in enumerate(pools):
        with pytest.raises(TemporaryError, match=rf"no worker free for exit pool {n}: the pool is closed") as closed:
            await asyncio.wait_for(pool.run(lambda: "late"), 5)
        assert closed.value.dsn == "4.3.0"
        assert await pool.close_within(5) is True
    late = BoundedWorkers(1, 30, "late pool")
    with pytest.raises(TemporaryError, match=r"no worker free for late pool: the pool is closed: the interpreter is "
                                             r"exiting"):
        await asyncio.wait_for(late.run(lambda: "late"), 5)
    assert named("late-pool_") == [] and len(hooks) == 1
