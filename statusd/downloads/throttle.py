"""Speed limits as trio waits: a ``RateLimit`` per task and one for the daemon.

Each item counts what it has just received against every limit over it
(``pace``) before its next receive, and sleeps until they all allow more; while it sleeps
it reads nothing, so the server is held back by TCP flow control, as with curl's
``--limit-rate``. No item polls: a wait ends at the moment the bucket has granted its
bytes, or when the rate changes (``configure``), whichever comes first. The fairness
between the readers of one limit is ``ByteBucket``'s (``statusd.state.bandwidth``).

Must not depend on the engine, the task manager or the RPC layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import trio

from statusd.state.bandwidth import ByteBucket, read_size


class RateLimit:
    """Bytes a second shared by every item that reads under it; 0: no limit. The rate
    may change at any time, also for items waiting on it."""

    def __init__(self, rate: int = 0) -> None:
        self._bucket = ByteBucket(rate)
        self._changed = trio.Event()
        self._watchers: set[Callable[[], None]] = set()

    @property
    def rate(self) -> int:
        return self._bucket.rate

    def configure(self, rate: int) -> None:
        """Apply ``rate`` now; items waiting under the old one wait anew under it."""
        if rate == self._bucket.rate:
            return
        self._bucket.configure(rate, trio.current_time())
        self._changed.set()
        self._changed = trio.Event()
        for watcher in list(self._watchers):
            watcher()

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (on the loop, from ``configure``) at each change of the rate
        until the function returned is called: for a reader that does not wait on the
        limit itself (a body received in a thread) to hear of a limit set meanwhile."""
        self._watchers.add(callback)
        return lambda: self._watchers.discard(callback)

    def take(self, count: int) -> float:
        """Count ``count`` received bytes; the mark to ``wait`` for."""
        return self._bucket.take(count, trio.current_time())

    async def wait(self, mark: float) -> None:
        """Return once the limit has granted every byte up to ``mark``."""
        while True:
            now = trio.current_time()
            ready = self._bucket.ready(mark, now)
            if ready <= now:
                return
            changed = self._changed
            with trio.move_on_at(ready):
                await changed.wait()


def pace_size(limits: Sequence[RateLimit], most: int) -> int:
    """How many bytes an item takes per turn under ``limits`` (the narrowest first: the
    task's, then the daemon's). It is the widest limit's turn: every reader sharing a
    limit must take turns of one size for their shares to be equal, and the task's items
    all read under the daemon's too."""
    rates = [limit.rate for limit in limits if limit.rate]
    return read_size(rates[-1], most) if rates else most


async def pace(limits: Sequence[RateLimit], count: int) -> float:
    """Count ``count`` bytes against each of ``limits`` and wait until every one allows
    more; the seconds waited (0.0 without a checkpoint when none is over its rate)."""
    marks = [(limit, limit.take(count)) for limit in limits if limit.rate]
    if not marks:
        return 0.0
    start = trio.current_time()
    for limit, mark in marks:
        await limit.wait(mark)
    return trio.current_time() - start
