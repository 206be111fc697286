"""Call counts of one function from a cProfile run, for a test that a change made one function cheaper: the
assertion is about that function (how often it ran, what it called itself), so that a call added elsewhere under
it (another module's, a dependency's, a later Python's) does not fail it."""
from __future__ import annotations

import cProfile
import pstats


def _stats(profile: cProfile.Profile) -> dict:
    return pstats.Stats(profile).stats  # type: ignore[attr-defined]


def times_called(profile: cProfile.Profile, function: str, file_suffix: str = "") -> int:
    """How many times `function` (of a file whose path ends with `file_suffix`) ran."""
    return sum(calls for (file, _, name), (_, calls, *_rest) in _stats(profile).items()
               if name == function and file.endswith(file_suffix))


def callees(profile: cProfile.Profile, function: str, file_suffix: str = "") -> dict[str, int]:
    """What `function` (of a file whose path ends with `file_suffix`) called itself: each callee's name (as pstats
    gives it: `<built-in method builtins.len>` for a built-in) with the number of calls."""
    made: dict[str, int] = {}
    for (_, _, name), (*_, callers) in _stats(profile).items():
        for (caller_file, _, caller), (calls, *_rest) in callers.items():
            if caller == function and caller_file.endswith(file_suffix):
                made[name] = made.get(name, 0) + calls
    return made
