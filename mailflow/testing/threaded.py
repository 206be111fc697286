"""`Sink.threaded(...)`: the Sink for suites without an event loop (Django, Flask, plain smtplib).

    with Sink.threaded(**same_arguments) as sink:     starts a loop of its own in a thread, and the Sink on it;
        smtplib.SMTP(sink.host, sink.port)           returns once the port accepts connections
        sink.wait_for(to=...)                        blocking; the rest of the Sink's API alike
        await sink.wait_for_async(to=...)            the same from any other event loop, without blocking it

Every call runs on the Sink's loop (so it never races the server); the blocking ones wait at most their own
timeout plus a margin. A FakeDestination or a Rule it returns may be scripted from the calling thread.

Failure behaviour: what the Sink raises is raised in the caller (a failed start, WaitTimeout, ...); `stop`
(and leaving the `with`) stops the server, then the loop, and joins the thread.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

START_TIMEOUT = 60.0
MARGIN = 30.0  # seconds a blocking call may take beyond its own timeout (the server's loop is busy)


class ThreadedSink:
    """See the module docstring."""

    def __init__(self, sink_class, *args, **kwargs):
        self._make = lambda: sink_class(*args, **kwargs)
        self.sink = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> "ThreadedSink":
        started: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(started,), name="mailflow-sink", daemon=True)
        self._thread.start()
        started.result(START_TIMEOUT)  # re-raises a failed start
        return self

    def _run(self, started: Future) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self.sink = self._make()
            loop.run_until_complete(self.sink.start())
        except BaseException as e:
            started.set_exception(e)
            loop.close()
            return
        started.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self.sink.stop())
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

    def _call(self, function, *args, **kwargs):
        """`function(*args, **kwargs)` on the Sink's loop; its result here."""
        async def call():
            return function(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(START_TIMEOUT)

    def _wait(self, coroutine, timeout: float):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout + MARGIN)

    # -- the Sink's API -------------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self.sink.host

    @property
    def port(self) -> int:
        return self.sink.port

    @property
    def smtp_url(self) -> str:
        return self.sink.smtp_url

    @property
    def http_url(self) -> str | None:
        return self._call(lambda: self.sink.http_url)

    @property
    def ca_pem(self) -> bytes | None:
        return self.sink.ca_pem

    @property
    def ca_file(self) -> str | None:
        return self.sink.ca_file

    @property
    def config(self):
        return self.sink.config

    @property
    def messages(self) -> list:
        return self._call(lambda: self.sink.messages)

    def clear(self) -> None:
        self._call(self.sink.clear)

    def search(self, query: str) -> list:
        return self._call(self.sink.search, query)

    def transcript(self, queue_id: str):
        return self._call(self.sink.transcript, queue_id)

    def history(self, queue_id: str) -> list:
        return self._call(self.sink.history, queue_id)

    def wait_for(self, *, timeout: float = 5.0, **criteria) -> list:
        return self._wait(self.sink.wait_for(timeout=timeout, **criteria), timeout)

    async def wait_for_async(self, *, timeout: float = 5.0, **criteria) -> list:
        future = asyncio.run_coroutine_threadsafe(self.sink.wait_for(timeout=timeout, **criteria), self._loop)
        return await asyncio.wrap_future(future)

    def reject(self, **rule):
        return self._call(self.sink.reject, **rule)

    def defer(self, **rule):
        return self._call(self.sink.defer, **rule)

    def slow(self, seconds: float) -> None:
        self._call(self.sink.slow, seconds)

    def drop(self, times: int = 1) -> None:
        self._call(self.sink.drop, times)

    def clear_faults(self) -> None:
        self._call(self.sink.clear_faults)

    def reset(self) -> None:
        """No messages and no faults: what a Sink shared by several tests is given before each one."""
        def reset():
            self.sink.clear()
            self.sink.clear_faults()

        self._call(reset)

    def destination(self, domain: str):
        return self._call(self.sink.destination, domain)

    def settle(self, timeout: float = 30.0) -> None:
        self._wait(self.sink.settle(timeout), timeout)

    def advance(self, seconds: float = 0, **span) -> None:
        self._wait(self.sink.advance(seconds, **span), 300.0)
