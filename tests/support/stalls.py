"""A watchdog on an event loop: every time the loop is held longer than `threshold`, how long and what ran.

    watch = LoopWatch(loop, threshold=0.05)   a heartbeat on `loop` (call_later every `tick` s) and a sampling
                                              thread; the loop may run in another thread (ServerThread's)
    watch.stalls                              [(seconds, where)]: each gap between two beats longer than `threshold`;
                                              where = the two places the threads were seen at most often in the
                                              gap (sampled every threshold/5 once it is late), with their counts
    watch.longest                             the longest gap seen (seconds, 0.0 when none was over `threshold`)
    watch.close()                             stops the beat and the thread

    async with LoopTurns() as turns:          counts the turns of the running loop (a task yielding at each);
        ... turns.at_each(resolve) ...        wraps `resolve` to record the count at each call in `turns.seen`

A gap counts the time the loop spent away from its timers: one callback that ran that long, several with no timer
between them, or another thread holding the GIL (a worker's pure-Python walk with the loop waiting its turn).
The samples are sys._current_frames(), taken by a thread that needs the GIL: a gap spent in one C call
that holds it (a regular expression over megabytes, json.loads) shows "(not sampled)", or only what ran after it.
"""
from __future__ import annotations

import asyncio
import collections
import sys
import threading
import time
import traceback


class LoopWatch:
    """See the module docstring."""

    def __init__(self, loop: asyncio.AbstractEventLoop, threshold: float = 0.05, tick: float = 0.01):
        self._loop, self._threshold, self._tick = loop, threshold, tick
        self._last = time.monotonic()
        self._loop_thread = 0
        self._samples: collections.Counter[str] = collections.Counter()  # the sampler's, swapped under `_lock`
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._handle: asyncio.TimerHandle | None = None
        self.stalls: list[tuple[float, str]] = []
        started = threading.Event()
        loop.call_soon_threadsafe(self._first_beat, started)
        if not started.wait(10):
            raise RuntimeError("the loop never ran the watch's first beat")
        self._sampler = threading.Thread(target=self._sample, daemon=True, name="loop-watch")
        self._sampler.start()

    @property
    def longest(self) -> float:
        return max((seconds for seconds, _ in self.stalls), default=0.0)

    def close(self) -> None:
        """From any thread: the beat is cancelled on the loop's own thread (the handle is the loop's to touch), and
        stops by itself if the loop runs no more callbacks."""
        self._closed.set()
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop_beating)
        self._sampler.join(5)

    def _stop_beating(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def _first_beat(self, started: threading.Event) -> None:
        self._loop_thread = threading.get_ident()
        self._last = time.monotonic()
        self._handle = self._loop.call_later(self._tick, self._beat)
        started.set()

    def _beat(self) -> None:
        now = time.monotonic()
        gap = now - self._last - self._tick
        with self._lock:  # (the sampler thread adds to them meanwhile)
            samples, self._samples = self._samples, collections.Counter()
        if gap > self._threshold:
            self.stalls.append((gap, "; ".join(f"{n}x {where}" for where, n in samples.most_common(2))
                                or "(not sampled)"))
        self._last = now
        if not self._closed.is_set():
            self._handle = self._loop.call_later(self._tick, self._beat)

    def _sample(self) -> None:
        while not self._closed.wait(self._threshold / 5):
            late = time.monotonic() - self._last - self._tick
            if late > self._threshold:
                where = summary(sys._current_frames(), self._loop_thread)
                with self._lock:
                    self._samples[where] += 1


def summary(frames: dict, loop_thread: int, depth: int = 10) -> str:
    """The loop thread's innermost frame and mailflow frames, and those of each other thread running mailflow's
    code (not waiting in threading, queue or selectors)."""
    parts = []
    for ident, frame in frames.items():
        stack = traceback.extract_stack(frame)[::-1]
        named = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in stack]
        ours = [n for n, f in zip(named, stack) if "/mailflow/" in f.filename]
        if ident == loop_thread:
            parts.insert(0, "loop: " + " <- ".join(named[:1] + ours[:depth]))
        elif ours and not any(w in stack[0].filename for w in ("threading", "queue", "selectors", "stalls")):
            parts.append("thread: " + " <- ".join(named[:1] + ours[:3]))
    return " | ".join(parts)


class LoopTurns:
    """Counts the event loop's turns (a task that yields at each); `at_each(resolve)` records the count at each
    call of `resolve`: how many turns the loop had while a message's recipients were resolved."""

    def __init__(self):
        self.count, self.seen = 0, []

    async def __aenter__(self) -> "LoopTurns":
        self._task = asyncio.create_task(self._turn())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()

    async def _turn(self) -> None:
        while True:
            self.count += 1
            await asyncio.sleep(0)

    def at_each(self, resolve):
        def recording(*args):
            self.seen.append(self.count)
            return resolve(*args)
        return recording
