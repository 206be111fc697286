"""`Sink.threaded(...)`: the Sink for suites without an event loop (Django, Flask, plain smtplib).

    with Sink.threaded(**same_arguments) as sink:     starts a loop of its own in a thread, and the Sink on it;
        smtplib.SMTP(sink.host, sink.port)           returns once the port accepts connections
        sink.wait_for(to=...)                        blocking; the rest of the Sink's API alike
        await sink.wait_for_async(to=...)            the same from any other event loop, without blocking it

Every call runs on the Sink's loop (so it never races the server); the blocking ones wait at most their own
timeout plus a margin. A FakeDestination or a Rule it returns may be scripted from the calling thread.

After `stop` what the Sink captured stays readable (`messages`, `search`, ...); the waiting calls (`wait_for`,
`settle`, `advance`) raise RuntimeError, as they do before `start`. One left running is stopped at the process's
exit, before the interpreter shuts down the executor threads its server uses and before its directory is removed.

Failure behaviour: what the Sink raises is raised in the caller (a failed start, WaitTimeout, ...; a WaitTimeout
of `wait_for` called on a thread whose event loop is running says that loop was blocked, and what to call instead:
an async test's application could send nothing while it waited); `stop`
(and leaving the `with`) stops the server, then the loop, and joins the thread; `start` on a running one
raises RuntimeError.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable

from mailflow.capture.mailbox import WaitTimeout
from mailflow.testing.process_exit import stop_before_executors_end

if TYPE_CHECKING:  # (sink.py imports this module)
    from mailflow.testing.sink import Sink

START_TIMEOUT = 60.0
MARGIN = 30.0  # seconds a blocking call may take beyond its own timeout (the server's loop is busy)
BLOCKED_LOOP = ("this thread's event loop was blocked while wait_for waited, so nothing it was to send could go: "
                "in an async test, `await sink.wait_for_async(...)`")


def _loop_running_here() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class ThreadedSink:
    """See the module docstring."""

    def __init__(self, sink_class: type[Sink], *args: Any, **kwargs: Any):
        self._make: Callable[[], Sink] = lambda: sink_class(*args, **kwargs)
        self.sink: Sink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> "ThreadedSink":
        if self._thread is not None:  # a second loop and server would be left running, unreachable, at stop()
            raise RuntimeError("the Sink is running already: stop() it before starting it again")
        started: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(started,), name="mailflow-sink", daemon=True)
        self._thread.start()
        try:
            started.result(START_TIMEOUT)  # re-raises a failed start
        except BaseException:
            self._thread.join(START_TIMEOUT)
            self._thread = None
            raise
        stop_before_executors_end(self)  # left running: stopped at exit, before its directory is removed
        return self

    def _run(self, started: Future) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            sink = self.sink = self._make()
            loop.run_until_complete(sink.start())
        except BaseException as e:
            started.set_exception(e)
            loop.close()
            return
        started.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(sink.stop())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(START_TIMEOUT)
        self._thread = None

    def __enter__(self) -> "ThreadedSink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- running things on the Sink's loop ------------------------------------------------------------------

    @property
    def _sink(self) -> Sink:
        if self.sink is None:
            raise RuntimeError("the Sink is not running (start() it, or use `with`)")
        return self.sink

    @property
    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or self._loop.is_closed():
            raise RuntimeError("the Sink is not running (start() it, or use `with`)")
        return self._loop

    def _call(self, function, *args, **kwargs):
        """`function(*args, **kwargs)` on the Sink's loop; its result here. Once the Sink has stopped, here
        (its loop is gone, nothing races it): what it captured stays readable, as the Sink's does."""
        if self.sink is not None and self._loop is not None and self._loop.is_closed():
            return function(*args, **kwargs)

        async def call():
            return function(*args, **kwargs)

        loop = self._running_loop
        return asyncio.run_coroutine_threadsafe(call(), loop).result(START_TIMEOUT)

    def _submit(self, make_coroutine: Callable[[], Any]) -> Future:
        """The coroutine made by `make_coroutine`, run on the Sink's loop (made only once that loop is there)."""
        loop = self._running_loop
        return asyncio.run_coroutine_threadsafe(make_coroutine(), loop)

    def _wait(self, make_coroutine: Callable[[], Any], timeout: float):
        return self._submit(make_coroutine).result(timeout + MARGIN)

    # -- the Sink's API -------------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._sink.host

    @property
    def port(self) -> int:
        return self._sink.port

    @property
    def smtp_url(self) -> str:
        return self._sink.smtp_url

    @property
    def http_url(self) -> str | None:
        return self._call(lambda: self._sink.http_url)

    @property
    def ca_pem(self) -> bytes | None:
        return self._sink.ca_pem

    @property
    def ca_file(self) -> str | None:
        return self._sink.ca_file

    @property
    def config(self):
        return self._sink.config

    @property
    def messages(self) -> list:
        return self._call(lambda: self._sink.messages)

    def clear(self) -> None:
        self._call(self._sink.clear)

    def search(self, query: str) -> list:
        return self._call(self._sink.search, query)

    def transcript(self, queue_id: str):
        return self._call(self._sink.transcript, queue_id)

    def history(self, queue_id: str) -> list:
        return self._call(self._sink.history, queue_id)

    def wait_for(self, *, timeout: float = 5.0, **criteria) -> list:
        try:
            return self._wait(lambda: self._sink.wait_for(timeout=timeout, **criteria), timeout)
        except WaitTimeout as e:
            if _loop_running_here():  # what the caller's loop was to send could not go while this blocked it
                raise WaitTimeout(f"{e}\n{BLOCKED_LOOP}") from None
            raise

    async def wait_for_async(self, *, timeout: float = 5.0, **criteria) -> list:
        return await asyncio.wrap_future(self._submit(lambda: self._sink.wait_for(timeout=timeout, **criteria)))

    def reject(self, **rule):
        return self._call(self._sink.reject, **rule)

    def defer(self, **rule):
        return self._call(self._sink.defer, **rule)

    def slow(self, seconds: float) -> None:
        self._call(self._sink.slow, seconds)

    def drop(self, times: int = 1) -> None:
        self._call(self._sink.drop, times)

    def clear_faults(self) -> None:
        self._call(self._sink.clear_faults)

    def reset(self) -> None:
        """No messages and no faults: what a Sink shared by several tests is given before each one."""
        sink = self._sink

        def reset() -> None:
            sink.clear()
            sink.clear_faults()

        self._call(reset)

    def destination(self, domain: str):
        return self._call(self._sink.destination, domain)

    def settle(self, timeout: float = 30.0, *, scan_failure_timeout: float = 30.0) -> None:
        self._wait(lambda: self._sink.settle(timeout, scan_failure_timeout=scan_failure_timeout), timeout)

    def advance(self, seconds: float = 0, **span) -> None:
        self._wait(lambda: self._sink.advance(seconds, **span), 300.0)
