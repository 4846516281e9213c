"""How fast a transfer goes: bytes a second, smoothed over a few seconds, and zero once
nothing arrives.

Pure: the caller passes the clock (``trio.current_time()`` in the daemon), so tests drive
time. Bytes are counted in slots of at least ``SLOT`` seconds; each slot's speed moves the
estimate by ``1 - exp(-slot / window)`` of the difference (an exponentially weighted
average whose weight follows the time a slot took, not how many pieces arrived in it, so
a thousand small reads and one large one count alike). The first slot is taken as it is,
so a fresh transfer shows its speed at once rather than climbing from zero for
``window`` seconds.

Nothing arriving for ``idle_after`` seconds is a stall: the speed is 0 from then on (a
frozen last figure was what users saw during minutes of hidden retries), and when data
comes again the estimate starts afresh, since the pause says nothing of the speed after it.
"""

from __future__ import annotations

import math

import attrs

WINDOW = 5.0  # seconds the average reaches back (its time constant)
SLOT = 0.5  # seconds of bytes gathered before the average moves
IDLE_AFTER = 2.0  # seconds without a byte after which the speed is 0


@attrs.define
class Throughput:
    """Bytes a second of one transfer. ``add`` what arrives; ``rate`` reads it."""

    window: float = WINDOW
    idle_after: float = IDLE_AFTER
    _smoothed: float | None = None  # None until a first slot was measured
    _slot_start: float | None = None
    _slot_bytes: int = 0
    _last_arrival: float = -math.inf

    def add(self, now: float, count: int) -> None:
        """``count`` bytes arrived at ``now`` (nothing is taken back: a restart from zero
        or a failure makes bytes go, not arrive)."""
        if count <= 0:
            return
        if self._slot_start is None or now - self._last_arrival >= self.idle_after:
            # The first bytes (of all, or after a stall) start the clock: the time before
            # them (connecting, a pause) says nothing of how fast data comes.
            self._smoothed = None
            self._slot_start = self._last_arrival = now
            self._slot_bytes = 0
            return
        elapsed = now - self._slot_start
        if elapsed <= 0 and self._smoothed is None:
            # Still the first instant: a burst of what had piled up before the clock
            # started, with no time to divide it by.
            return
        self._last_arrival = now
        self._slot_bytes += count
        if elapsed < SLOT:
            return
        measured = self._slot_bytes / elapsed
        if self._smoothed is None:
            self._smoothed = measured
        else:
            self._smoothed += (1 - math.exp(-elapsed / self.window)) * (measured - self._smoothed)
        self._slot_start = now
        self._slot_bytes = 0

    def rate(self, now: float) -> float:
        """Bytes a second at ``now``: 0 once nothing arrived for ``idle_after`` seconds."""
        if now >= self.idle_at:
            return 0.0
        if self._smoothed is not None:
            return self._smoothed
        assert self._slot_start is not None  # an arrival started it
        elapsed = now - self._slot_start
        return self._slot_bytes / elapsed if elapsed > 0 else 0.0

    @property
    def idle_at(self) -> float:
        """When the speed drops to 0 unless more bytes arrive first."""
        return self._last_arrival + self.idle_after


def eta(remaining: int, rate: float) -> float | None:
    """Seconds until ``remaining`` bytes are in at ``rate``; None while nothing moves."""
    if remaining < 0 or rate <= 0:
        return None
    return round(remaining / rate, 1)
