"""Token buckets keyed by user: how often each user may do a thing (``status.publish``).

Pure: the caller passes the time (``trio.current_time()`` in the daemon), so tests drive the
clock. A bucket holds at most ``burst`` tokens and gains ``rate`` a second; each action takes
one. A user whose bucket is full again is forgotten, so the table holds only users who acted
within the last ``burst / rate`` seconds.
"""

from __future__ import annotations

import math

import attrs


@attrs.define
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = 1.0
        self.burst = 1
        self.configure(rate, burst)
        self._buckets: dict[str, _Bucket] = {}

    def configure(self, rate: float, burst: int) -> None:
        """New figures (a reload); buckets keep their tokens, capped at the new burst."""
        if not rate > 0:
            raise ValueError(f"rate must be > 0, not {rate}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, not {burst}")
        self.rate = rate
        self.burst = burst

    def take(self, key: str, now: float) -> float:
        """Take one token for ``key``: 0.0 when allowed, else the seconds to wait for one."""
        self._forget_full(now)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        self._refill(bucket, now)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.rate

    def _refill(self, bucket: _Bucket, now: float) -> None:
        elapsed = max(0.0, now - bucket.updated)
        bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate)
        bucket.updated = now

    def _forget_full(self, now: float) -> None:
        # Sweeping on every take would cost O(users); sweeping only past a size keeps the
        # table bounded by the users active in one refill period.
        if len(self._buckets) < 1024:
            return
        refill = self.burst / self.rate
        self._buckets = {
            key: bucket for key, bucket in self._buckets.items() if now - bucket.updated < refill
        }

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after(seconds: float) -> float:
    """Seconds as told to a client: rounded up to the millisecond, so waiting that is enough."""
    return math.ceil(seconds * 1000) / 1000
