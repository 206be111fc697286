"""Work under way, told apart by the configuration it began under: a stage's short jobs (a maildrop file picked up,
a notice built, an address probe) hold the parts of the configuration in force when they began (cleanup's
settings, the router, the notices' templates) until they end. After a reload, what it replaced is in use while
such a job begun before it runs (`Mailflow.replaced_in_use`): `serve` collects it once the last one ends, not at
the next reload.

    UnderWay()
      with .one(): ...      a job, counted under the configuration in force when it began
      .reconfigured()       a reload: jobs begun from now on are the new configuration's
      .before_reload        bool: a job begun before the last reload is still under way
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator


class UnderWay:
    """See the module docstring."""

    def __init__(self) -> None:
        self._generation = 0  # reloads so far
        self._jobs: Counter[int] = Counter()  # jobs under way, by the generation they began under

    @contextlib.contextmanager
    def one(self) -> Iterator[None]:
        generation = self._generation
        self._jobs[generation] += 1
        try:
            yield
        finally:
            self._jobs[generation] -= 1
            if not self._jobs[generation]:
                del self._jobs[generation]

    def reconfigured(self) -> None:
        self._generation += 1

    @property
    def before_reload(self) -> bool:
        return any(generation < self._generation for generation in self._jobs)
