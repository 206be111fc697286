"""A few worker threads of a stage's own (local delivery's expansions and /file writes, cleanup's content checks), for
work too long for the event loop, with a bounded wait for a free one.

    BoundedWorkers(size, wait, doing, daemon=False)
                                         at most `size` threads, made when first needed
    await workers.run(call) -> T         call() in one of them, once one is free (see below)
    async with workers.slot() as submit  a free thread reserved first; `await submit(call)` then runs call() in it
                                         without waiting again (a caller's own deadline can start after the wait)
    workers.moved()                      from a call in one of the threads: it is slow but working (a long walk
                                         calls it per line), which counts as progress, as a call that ends;
                                         ignored from any other thread (a short walk run on the event loop says
                                         nothing about the pool's threads, hung or not)
    workers.close()                      no new work; idle threads end (running ones end with their work)
    await workers.close_within(seconds)  close(), then wait at most `seconds` for the work under way to end
                                         (True: every thread ended; False: one is still in its call, left)

The threads are joined at the interpreter's exit, as a ThreadPoolExecutor's: a call that writes (local's /file
append) ends whole, or is rolled back by its own code, never cut between two writes by the exit; and, as a
ThreadPoolExecutor's, a pool never closed is told to end at the exit (its calls under way and queued run first):
its idle threads, waiting for work that cannot come, would otherwise keep the process from ever exiting (one hook for
every such pool, registered with the first, the pools held weakly). A pool whose
calls only read (the content checks' walks) asks for daemon threads (`daemon=True`): one left in a call that never
returns (a walk in a hung sqlite read) then does not keep the process from exiting after the stop.

A thread counts as busy until its work ends, not until its caller stops waiting: a caller cancelled (a delivery
stopped at shutdown) or timed out (a sqlite table's deadline) leaves the thread running its call, and no other call
starts in its place until it returns. So there are never more than `size` threads, whatever the callers do, and
the threads the queue's fsyncs, the mailbox writes and smtpd share (the default executor) are never taken.
A table lookup in such a thread takes a slot first and then TableCache.run(…, workers=submit): its deadline covers
the call, and the wait for the thread is bounded here.

A caller waits for a free thread as long as the threads make progress: it gives up only when no thread finished
any work, nor said it moved (moved()), for `wait` seconds (they look hung). A burst of slow but working calls is
queued, never deferred; calls longer than `wait` are too, when they call moved() more often than every `wait` s.

Failure behaviour: `TemporaryError` 4.3.0 when no thread is free and none finished a call for `wait` seconds
(`no worker free for DOING within Ns: N busy`); the same when no thread could be started (the process's thread
limit), none of the pool's threads is idle, and none ended a call for `wait` seconds (`no worker free for DOING: no
thread could be started (…)`); the same at once when the pool is closed (close(), or told to end at the
interpreter's exit: `no worker free for DOING: the pool is closed…`; a pool whose first thread would start after that
hook ran is closed then, the thread never started: the exit's join would wait on it for ever). A call no thread could
take is never queued behind calls that may never end: it waits, holding nothing but its caller, for a thread to end
a call, and runs then; what `call` raises propagates.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import queue
import threading
import time
import weakref
from functools import partial
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from mailflow.errors import TemporaryError

T = TypeVar("T")


class BoundedWorkers:
    """See the module docstring."""

    def __init__(self, size: int, wait: float, doing: str, *, daemon: bool = False):
        self._size = size
        self._wait = wait
        self._doing = doing
        self._pool = _Threads(size, doing.replace(" ", "-"), daemon)
        self._free = asyncio.Semaphore(size)
        self._last_done = -math.inf  # (time.monotonic) when a call last ended in a thread, or said it moved
        self._ended: asyncio.Event | None = None  # set when a call ends: what a call no thread could take waits for

    async def run(self, call: Callable[[], T]) -> T:
        """See the module docstring."""
        async with self.slot() as submit:
            return await submit(call)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[Callable[[Callable[[], T]], Awaitable[T]]]:
        """See the module docstring. The reservation is given back at the block's end when nothing was submitted,
        else when the submitted call ends in its thread."""
        await self._acquire()
        submitted = False

        async def submit(call: Callable[[], T]) -> T:
            nonlocal submitted
            if submitted:
                raise RuntimeError("one call per slot")
            loop = asyncio.get_running_loop()
            work = await self._submitted(call)
            submitted = True
            work.add_done_callback(lambda _: _call_soon(loop, self._done))  # (when the thread is done)
            try:
                return await asyncio.wrap_future(work)
            finally:
                del work  # (a failure's traceback holds this frame: not the future holding the failure too)

        try:
            yield submit
        finally:
            if not submitted:
                self._free.release()

    async def _acquire(self) -> None:
        while True:  # (each turn: a call ended within the last `wait` s, so the threads are not hung)
            try:
                async with asyncio.timeout(self._wait):
                    await self._free.acquire()
                return
            except TimeoutError:
                if time.monotonic() - self._last_done >= self._wait:
                    raise TemporaryError("4.3.0", f"no worker free for {self._doing} within {self._wait:g}s: "
                                                  f"{self._size} busy") from None

    async def _submitted(self, call: Callable[[], T]) -> concurrent.futures.Future[T]:
        """`call` handed to a thread; at the thread limit with none idle, once a thread ends its call (nothing is
        queued meanwhile), or TemporaryError when none did for `wait` seconds."""
        while True:
            try:
                return self._pool.submit(call)
            except NoThread as e:  # (the slot is given back at the block's end: nothing submitted)
                if not (e.busy and await self._a_call_ended()):  # (no call under way: none will free a thread)
                    raise TemporaryError("4.3.0", f"no worker free for {self._doing}: no thread could be "
                                                  f"started ({e})") from None
            except PoolClosed as e:
                raise TemporaryError("4.3.0", f"no worker free for {self._doing}: {e}") from None

    async def _a_call_ended(self) -> bool:
        """Whether a thread ended a call within `wait` seconds."""
        self._ended = self._ended or asyncio.Event()
        try:
            async with asyncio.timeout(self._wait):
                await self._ended.wait()
        except TimeoutError:
            return False
        return True

    def _done(self) -> None:
        self._last_done = time.monotonic()
        self._free.release()
        if self._ended is not None:  # (wakes the calls no thread could take; a new event for the next waiters)
            self._ended.set()
            self._ended = None

    def moved(self) -> None:
        """See the module docstring (one assignment: safe from any thread)."""
        if self._pool.runs_here():
            self._last_done = time.monotonic()

    def close(self) -> None:
        """See the module docstring."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def close_within(self, seconds: float) -> bool:
        """See the module docstring. The join runs in a daemon thread of its own (not the default executor's, which
        the loop's end waits for): a call that never returns holds that thread, never the caller."""
        self.close()
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()

        def join() -> None:
            self._pool.join()
            _call_soon(loop, partial(_settle, ended))

        threading.Thread(target=join, name=f"{self._doing.replace(' ', '-')}-join", daemon=True).start()
        try:
            await asyncio.wait_for(ended, seconds)
        except TimeoutError:
            return False
        return True


class _Threads:
    """At most `size` threads (daemon ones or not) running submitted calls, made as calls come (BoundedWorkers
    never has more than `size` calls submitted and not ended)."""

    def __init__(self, size: int, name: str, daemon: bool):
        self._size, self._name, self._daemon = size, name, daemon
        self._jobs: queue.SimpleQueue[tuple[concurrent.futures.Future, Callable[[], object]] | None] = \
            queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._running: set[int] = set()  # the idents of those threads while they run (`runs_here`)
        self._calls = 0  # calls submitted and not ended (queued or in a thread)
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, call: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Raises NoThread, queueing nothing, when every thread there is has a call and no new one could be
        started: the call would wait behind calls that may never end (threads hung in them)."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise PoolClosed("the pool is closed")
            if self._calls >= len(self._threads):  # (none idle: a thread of its own, if one can start)
                self._start_thread()
            self._jobs.put((future, call))
            self._calls += 1
        return future

    def _start_thread(self) -> None:
        """Under the lock. A thread started waits for a job; counted only once it runs (one that never started
        would never take a job)."""
        if not (self._daemon or _UNCLOSED_AT_EXIT.adopt(self)):
            self._closed = True  # (a thread the exit's join would wait on for ever: nobody is left to end it)
            raise PoolClosed("the pool is closed: the interpreter is exiting")
        thread = threading.Thread(target=self._work, name=f"{self._name}_{len(self._threads)}", daemon=self._daemon)
        try:
            thread.start()
        except RuntimeError as e:  # (can't start new thread: the process's limit)
            raise NoThread(f"{e}, {self._calls} busy", self._calls) from e
        self._threads.append(thread)

    def _ended(self) -> None:
        with self._lock:
            self._calls -= 1

    def runs_here(self) -> bool:
        """The caller is one of these threads (a set lookup: cheap enough per line of a walk)."""
        return threading.get_ident() in self._running

    def _work(self) -> None:
        me = threading.get_ident()
        self._running.add(me)
        try:
            while (job := self._jobs.get()) is not None:
                _run(*job, self._ended)
                del job  # (nothing of the last call held while idle)
        finally:
            self._running.discard(me)

    def shutdown(self, wait: bool, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._threads)
            if cancel_futures:
                while True:
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if job is not None:
                        job[0].cancel()
                        self._calls -= 1  # (never to meet a thread)
            for _ in threads:
                self._jobs.put(None)
        if wait:
            self.join()

    def join(self) -> None:
        """Wait for every thread started, once `shutdown` has told them to end (it queues no second end)."""
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join()


class _PoolsAtExit:
    """The pools with threads the interpreter's exit joins, told to end (shutdown, not waiting) just before that join,
    as ThreadPoolExecutor's are: one hook for them all (threading's own for that: atexit's run after the join),
    registered with the first such pool, the pools held weakly (a WeakSet, as concurrent.futures keeps its threads).
    Once it has run (or the exit had begun before any pool), no pool is adopted: its thread would never be ended."""

    def __init__(self) -> None:
        self._pools: weakref.WeakSet[_Threads] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._registered = False
        self._exiting = False

    def adopt(self, pool: _Threads) -> bool:
        """`pool` ended at the exit; False when the exit's hook has run already (the interpreter is exiting)."""
        with self._lock:
            if not (self._exiting or self._registered):
                try:
                    threading._register_atexit(self._end_all)  # type: ignore[attr-defined]
                    self._registered = True
                except RuntimeError:  # (the interpreter is exiting already: its join is under way)
                    self._exiting = True
            if not self._exiting:
                self._pools.add(pool)
            return not self._exiting

    def _end_all(self) -> None:
        with self._lock:
            self._exiting = True
            pools = list(self._pools)
        for pool in pools:
            pool.shutdown(wait=False)


_UNCLOSED_AT_EXIT = _PoolsAtExit()  # (the process's one: the interpreter's exit is the process's)


class PoolClosed(RuntimeError):
    """_Threads.submit: the pool was closed (close(), or the interpreter's exit)."""


class NoThread(RuntimeError):
    """_Threads.submit: no thread could be started and none is idle (`busy`: the calls under way)."""

    def __init__(self, text: str, busy: int):
        super().__init__(text)
        self.busy = busy


def _run(future: concurrent.futures.Future, call: Callable[[], object], ended: Callable[[], None]) -> None:
    """The thread counts as idle (`ended`) before the caller hears of the end: a call submitted once its slot is
    given back finds this thread idle."""
    if not future.set_running_or_notify_cancel():
        ended()
        return
    try:
        result = call()
    except BaseException as e:  # noqa: BLE001 - handed to the caller, as ThreadPoolExecutor does
        ended()
        future.set_exception(e)
        del future  # (`e`'s traceback holds this frame: no cycle back to `e` through the future)
    else:
        ended()
        future.set_result(result)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():  # (not when the wait for it timed out)
        future.set_result(None)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], object]) -> None:
    try:
        loop.call_soon_threadsafe(fn)
    except RuntimeError:  # the loop is closed: nobody is left to wait for a worker
        pass
