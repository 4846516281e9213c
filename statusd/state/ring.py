"""A drop-oldest ring with sequence numbers.

Pure. Every appended item gets the next sequence number (1, 2, ...). When the ring is
full the oldest item goes and is counted, so a reader holding a sequence number can always
tell how many items it missed: ``after(seq)`` returns what is still there and the gap.
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from typing import Generic, TypeVar

import attrs

T = TypeVar("T")

MAX_CAPACITY = 100_000


@attrs.frozen
class RingStatistics:
    capacity: int
    size: int
    first_seq: int  # seq of the oldest item held (last_seq + 1 when empty)
    last_seq: int  # seq of the newest item ever appended (0 before the first)
    dropped: int  # items pushed out by newer ones since the ring was made


@attrs.define
class DropOldestRing(Generic[T]):
    capacity: int = attrs.field()
    _items: deque[T] = attrs.field(init=False)
    _last_seq: int = attrs.field(default=0, init=False)
    _dropped: int = attrs.field(default=0, init=False)

    @capacity.validator
    def _check_capacity(self, _attribute: object, value: int) -> None:
        if not 1 <= value <= MAX_CAPACITY:
            raise ValueError(f"capacity must be between 1 and {MAX_CAPACITY}, not {value}")

    def __attrs_post_init__(self) -> None:
        self._items = deque(maxlen=self.capacity)

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def first_seq(self) -> int:
        return self._last_seq - len(self._items) + 1

    def next_dropped(self) -> T | None:
        """The item the next ``append`` pushes out, if the ring is full."""
        return self._items[0] if len(self._items) == self.capacity else None

    def append(self, item: T) -> int:
        """Add ``item``; returns its sequence number. Never blocks, never fails."""
        if len(self._items) == self.capacity:
            self._dropped += 1
        self._items.append(item)
        self._last_seq += 1
        return self._last_seq

    def after(self, seq: int) -> tuple[list[T], int]:
        """Items with a sequence number greater than ``seq``, oldest first, and how many of
        those are already gone."""
        if seq >= self._last_seq:
            return [], 0
        first = self.first_seq
        wanted_from = max(seq + 1, 1)
        missed = max(0, first - wanted_from)
        start = max(wanted_from, first) - first
        count = len(self._items) - start
        if count <= start:
            # islice walks the deque from the left: for a reader near the head of a large
            # ring, take the newest items from the right instead, O(count) not O(len).
            items = list(islice(reversed(self._items), count))
            items.reverse()
            return items, missed
        return list(islice(self._items, start, None)), missed

    def __len__(self) -> int:
        return len(self._items)

    def statistics(self) -> RingStatistics:
        return RingStatistics(
            capacity=self.capacity,
            size=len(self._items),
            first_seq=self.first_seq,
            last_seq=self._last_seq,
            dropped=self._dropped,
        )
