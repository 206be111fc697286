"""SessionCache's bound on idle sessions (MAX_IDLE, here 2), across destinations, as sessions are cached, taken
for reuse, expire and are closed: the count it keeps as they come and go must match what it holds, or the cache
would refuse sessions for ever (counted too high) or keep more than its bound (too low). Sessions are stand-ins
that have what the cache reads; no socket is involved."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from mailflow.transports.smtp.reuse import SessionCache
from tests.support import eventually

_names = itertools.count()


@dataclass
class StandIn:
    """What SessionCache reads of a Session, and whether it was ended."""

    name: int = 0
    alive: bool = True
    garbled: bool = False
    aborted: bool = False
    transaction_open: bool = False
    idle_clean: bool = True
    opened: float = 0.0
    uses: int = 1
    ended: str = ""

    def quit(self) -> None:
        self.ended = self.ended or "QUIT"

    def abort(self) -> None:
        self.ended = self.ended or "aborted"


def cache(time_limit: float = 60.0) -> SessionCache:
    return SessionCache(time_limit, reuse_count_limit=0, reuse_time_limit=300.0, rset_timeout=1.0,
                        clock=lambda: 0.0, max_idle=2)


async def cached(c: SessionCache, key: str) -> StandIn:
    session = StandIn(next(_names))
    await c.release(key, session)  # type: ignore[arg-type]
    return session


async def nothing(_session) -> None:
    return None


async def test_the_bound_counts_every_destination_and_frees_a_place_when_a_session_is_taken():
    c = cache()
    a, b, over = await cached(c, "a"), await cached(c, "b"), await cached(c, "c")
    assert (a.ended, b.ended, over.ended) == ("", "", "QUIT") and c.idle_count == 2
    assert await c.reuse("a", nothing) is a and c.idle_count == 1
    assert (await cached(c, "c")).ended == "" and c.idle_count == 2
    assert await c.reuse("a", nothing) is None and c.idle_count == 2  # (none idle for a)
    c.close()
    assert c.idle_count == 0 and b.ended == "QUIT"


async def test_a_stale_session_taken_and_dropped_frees_its_place():
    c = cache()
    stale = await cached(c, "a")
    await cached(c, "a")
    stale.idle_clean = False  # (the peer said something meanwhile)
    assert await c.reuse("a", nothing) is not stale  # the newest first
    assert await c.reuse("a", nothing) is None and stale.ended == "aborted"
    assert c.idle_count == 0
    assert [(await cached(c, key)).ended for key in "xyz"] == ["", "", "QUIT"]


async def test_sessions_that_expire_free_their_places():
    c = cache(time_limit=0.05)
    first = [await cached(c, key) for key in "ab"]
    await eventually(lambda: [s.ended for s in first] == ["QUIT", "QUIT"], what="each QUIT by its own timer")
    assert c.idle_count == 0
    assert [(await cached(c, key)).ended for key in "abc"] == ["", "", "QUIT"]
    c.close()
