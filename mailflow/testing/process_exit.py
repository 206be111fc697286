"""What a Sink left running does at the process's exit, in the process that started it only.

    at_exit_here(function) -> registered     `function` at the interpreter's exit (atexit; unregister what it
                                             returns when the work is done another way)
    stop_before_executors_end(threaded_sink) its `stop()` before the threads' end: a threaded Sink's server runs
                                             work in executor threads, which refuse it once the interpreter has
                                             shut them down ("cannot schedule new futures after shutdown"), and
                                             that shutdown comes before atexit's functions

Both run in the registering process only: a child forked after the registration (a pre-fork server under test)
inherits the lists and runs them when it ends with sys.exit, and would take the parent's running Sink's queue
away. The threaded Sink is held weakly: a suite that starts many holds none of them (or what they captured) to
the end.
"""
from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401  (its executors' shutdown registered first, so it runs after ours)
import os
import threading
import weakref
from typing import Callable, Protocol


class Stoppable(Protocol):
    def stop(self) -> None: ...


def at_exit_here(function: Callable[[], object]) -> Callable[[], None]:
    owner = os.getpid()

    def in_owner() -> None:
        if os.getpid() == owner:
            function()

    atexit.register(in_owner)
    return in_owner


def stop_before_executors_end(sink: Stoppable) -> None:
    owner, held = os.getpid(), weakref.ref(sink)

    def stop_in_owner() -> None:
        running = held()
        if running is not None and os.getpid() == owner:
            running.stop()

    threading._register_atexit(stop_in_owner)  # type: ignore[attr-defined]  # (CPython's, as asyncio's own use)
