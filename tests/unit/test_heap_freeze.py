"""`mailflow serve` freezes what its start built out of the garbage collector's walks (mailflow.app.freeze_the_heap),
and a reload builds with it frozen (the collector's passes during the build walk what the reload made, not the
whole heap), then unfreezes it, so that what the new configuration replaced can still be collected.

Each test gives the test process's heap back to the collector at its end."""
from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from types import SimpleNamespace

from mailflow.app import _reloads, serve
from mailflow.config import config_from_dict
from tests.support import base_settings, eventually

STARTUP_HEAP = 10_000  # objects: a started server keeps tens of thousands (modules, classes, its configuration)


async def test_serve_freezes_the_heap_it_started_with(tmp_path):
    stop = asyncio.Event()
    running = asyncio.create_task(serve(config_from_dict(base_settings(tmp_path)), shutdown_trigger=stop))
    try:
        await eventually(lambda: gc.get_freeze_count() > STARTUP_HEAP, timeout=10, what="the heap frozen")
    finally:
        stop.set()
        await running
        gc.unfreeze()


class Cycle:
    def __init__(self) -> None:
        self.me = self


async def test_a_reload_runs_frozen_and_then_unfreezes_collects_and_freezes_again():
    frozen_during: list[int] = []

    async def reload(config) -> None:
        frozen_during.append(gc.get_freeze_count())

    level = logging.getLevelName(logging.getLogger().level)  # what a reload puts in force: as it is
    mf = SimpleNamespace(reload=reload, config=SimpleNamespace(log=SimpleNamespace(level=level), warnings=list),
                         replaced_in_use=False)
    wanted = asyncio.Event()
    replaced = Cycle()  # what the configuration in force held, let go of by the reload
    gone = weakref.finalize(replaced, lambda: None)
    gc.freeze()
    frozen = gc.get_freeze_count()
    del replaced
    reloads = asyncio.create_task(_reloads(mf, wanted, lambda: None, ""))
    try:
        wanted.set()
        await eventually(lambda: frozen_during, timeout=5, what="the reload")
        [during] = frozen_during  # (unfrozen first: 0, and the reload's collections walked the whole heap)
        assert during > frozen // 2  # (still frozen: less what was freed meanwhile, as the task's frames)
        await eventually(lambda: gc.get_freeze_count() > 0, timeout=5, what="the heap frozen again")
        assert not gone.alive  # (unfrozen, then collected before the heap froze again)
    finally:
        reloads.cancel()
        await asyncio.gather(reloads, return_exceptions=True)
        gc.unfreeze()


async def test_what_a_reload_replaced_is_collected_even_when_its_reloaded_hook_fails():
    async def reload(config) -> None:
        pass

    def reloaded(config) -> None:
        raise OSError("the watcher cannot write")

    level = logging.getLevelName(logging.getLogger().level)
    mf = SimpleNamespace(reload=reload, config=SimpleNamespace(log=SimpleNamespace(level=level), warnings=list),
                         replaced_in_use=False)
    wanted = asyncio.Event()
    replaced = Cycle()
    gone = weakref.finalize(replaced, lambda: None)
    gc.freeze()
    del replaced
    reloads = asyncio.create_task(_reloads(mf, wanted, lambda: None, "", reloaded))
    try:
        wanted.set()
        await asyncio.wait_for(asyncio.gather(reloads, return_exceptions=True), 5)
        assert not gone.alive  # (unfrozen and collected all the same)
    finally:
        reloads.cancel()
        await asyncio.gather(reloads, return_exceptions=True)
        gc.unfreeze()
