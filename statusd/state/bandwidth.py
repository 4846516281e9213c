"""Byte rates: a token bucket that readers may overdraw, and rates written as ``2M``.

Pure: the caller passes the time (``trio.current_time()`` in the daemon), so tests drive
the clock. ``statusd.downloads.throttle`` does the waiting.

The bucket counts in two running totals rather than a balance: ``allowed`` (what the rate
has granted so far, at most ``burst`` ahead of what was taken) and ``taken``. A reader
takes what it has just received, which may overdraw the bucket, and is told the total it
must wait for; it waits until ``allowed`` reaches it. Each taker thus waits behind every
byte taken before its own, in order, which shares the rate fairly between the readers of
one bucket without a queue: k readers taking chunks of c bytes each get one chunk per
k * c / rate seconds. A new rate (``configure``) applies from that moment on, also to
those already waiting.
"""

from __future__ import annotations

import math
import re

# How far ahead of what was taken the bucket may grant: this many seconds at the rate.
# Small, so that a transfer idle for a while cannot burst far past the limit; large enough
# to absorb the jitter of one wake-up.
BURST_SECONDS = 0.1
MIN_BURST = 16 * 1024
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_RATE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kmg]?)(?:i?b)?(?:/s)?", re.IGNORECASE)
# 1 TiB/s: beyond any link, and small enough for the totals to stay exact in floats.
MAX_RATE = 1 << 40


def parse_rate(text: str) -> int:
    """Bytes a second from ``500K``, ``2M``, ``1.5G`` or ``1048576`` (K = 1024, as curl's
    ``--limit-rate`` and aria2c's ``--max-download-limit`` take them); 0 means none."""
    match = _RATE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"rate must be bytes a second like 500K, 2M or 1G, not {text!r}")
    rate = int(float(match[1]) * _UNITS[match[2].lower()])
    if rate > MAX_RATE:
        raise ValueError(f"rate must be at most {format_rate(MAX_RATE)} a second, not {text!r}")
    return rate


def format_rate(rate: float) -> str:
    """``2M`` for 2 MiB; the largest unit that keeps it exact to a tenth."""
    for suffix, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if rate >= size:
            return f"{rate / size:.4g}{suffix}"
    return f"{rate:g}"


def check_rate(rate: object) -> int:
    """A rate as the API and the journal hold it: whole bytes a second, 0 for none."""
    if isinstance(rate, bool) or not isinstance(rate, int) or not 0 <= rate <= MAX_RATE:
        raise ValueError(f"must be whole bytes a second from 0 (none) to {MAX_RATE}, not {rate!r}")
    return rate


class ByteBucket:
    """Bytes a second for any number of readers; ``rate`` 0 lets everything through."""

    def __init__(self, rate: int, now: float = -math.inf) -> None:
        # From -inf the first refill grants a full burst: the bucket starts full.
        self.rate = 0
        self._allowed = 0.0
        self._taken = 0.0
        self._updated = now
        self.configure(rate, now)

    @property
    def burst(self) -> float:
        return max(MIN_BURST, self.rate * BURST_SECONDS)

    def configure(self, rate: int, now: float) -> None:
        """A new rate from ``now`` on; what was granted at the old one is kept. Turning
        the limit off forgives what waiting readers owe."""
        check_rate(rate)
        self._refill(now)
        old, self.rate = self.rate, rate
        if rate == 0:
            self._allowed = self._taken
        elif old == 0:
            self._allowed = self._taken + self.burst

    def take(self, count: int, now: float) -> float:
        """Count ``count`` bytes as received at ``now``; the total to wait for (``ready``)."""
        self._refill(now)
        self._taken += count
        return self._taken

    def ready(self, mark: float, now: float) -> float:
        """When a reader whose take returned ``mark`` may read again: ``now`` or later,
        at the current rate."""
        self._refill(now)
        # Half a byte of slack: float rounding must not leave a reader a wake-up short.
        if self.rate == 0 or mark - self._allowed <= 0.5:
            return now
        return now + (mark - self._allowed) / self.rate

    def _refill(self, now: float) -> None:
        if self.rate == 0:
            self._allowed = self._taken
        else:
            elapsed = max(0.0, now - self._updated)
            # The cap is what was taken plus the burst: idle time buys no more than that.
            self._allowed = max(
                self._allowed, min(self._allowed + elapsed * self.rate, self._taken + self.burst)
            )
        self._updated = now


def read_size(rate: int, most: int) -> int:
    """How much one read may take under ``rate`` (0: ``most``): about a twentieth of a
    second's worth, so that readers sharing a bucket take turns often and a wait is short."""
    if rate == 0:
        return most
    return max(1024, min(most, math.ceil(rate / 20)))
