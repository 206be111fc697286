"""Faults for the children of call_as (mailflow.transports.local.asuser), which a fresh interpreter forks: a
monkeypatch in the test's process does not reach them.

    monkeypatch.setattr(mbox, "_appended", patched_in_child(mbox, "_appended", (mbox, "_truncate", slow)))
        call_as gets a stand-in for mbox._appended that, in the child, sets each (module, name, value) and then
        calls the real mbox._appended. Each value is sent pickled: a function of a test module's top level (by
        name), a number, a string. A name may be dotted: (asuser, "Progress.ended", f) sets a class's attribute.
    SlowEntry(marker)
        an mbox entry of 2 MB written in pieces over 2 s (a /file append's, as the user) that says when it starts
"""
from __future__ import annotations

import functools
import importlib
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any


def patched_in_child(module: ModuleType, name: str, *patches: tuple[ModuleType, str, Any]) -> functools.partial:
    """See the module docstring."""
    return functools.partial(_call_patched, module.__name__, name,
                             tuple((patched.__name__, attribute, value) for patched, attribute, value in patches))


def _call_patched(module: str, name: str, patches: tuple[tuple[str, str, Any], ...], *args, **kwargs):
    for patched, attribute, value in patches:
        owner: Any = importlib.import_module(patched)
        *path, last = attribute.split(".")
        for step in path:
            owner = getattr(owner, step)
        setattr(owner, last, value)
    return getattr(importlib.import_module(module), name)(*args, **kwargs)


class SlowEntry:
    """An entry of 2 MB written in pieces over 2 s, consumed in call_as's child (sent pickled, by its class's
    name): its first piece writes `marker` (the child's pid, its parent's)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __iter__(self):
        yield b"From slow@x  Sun Dec  6 10:00:00 2026\nSubject: slow\n\n"
        Path(self.marker).write_text(f"{os.getpid()} {os.getppid()}")
        for piece in range(10):
            time.sleep(0.2)
            yield (b"%d" % piece) * 200_000 + b"\n"
        yield b"\n"
