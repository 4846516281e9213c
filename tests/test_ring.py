"""The drop-oldest ring: sequence numbers, gaps, statistics."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from statusd.state.ring import DropOldestRing, RingStatistics


def test_sequence_numbers_start_at_one() -> None:
    ring: DropOldestRing[str] = DropOldestRing(3)
    assert [ring.append(x) for x in "abc"] == [1, 2, 3]
    assert ring.after(0) == (["a", "b", "c"], 0)
    assert ring.after(2) == (["c"], 0)
    assert ring.after(3) == ([], 0)


def test_full_ring_drops_oldest_and_reports_the_gap() -> None:
    ring: DropOldestRing[str] = DropOldestRing(3)
    for x in "abcde":
        ring.append(x)
    assert ring.after(0) == (["c", "d", "e"], 2)
    assert ring.after(1) == (["c", "d", "e"], 1)
    assert ring.after(3) == (["d", "e"], 0)
    assert ring.statistics() == RingStatistics(
        capacity=3, size=3, first_seq=3, last_seq=5, dropped=2
    )


def test_empty_ring_statistics() -> None:
    assert DropOldestRing[int](5).statistics() == RingStatistics(5, 0, 1, 0, 0)


@pytest.mark.parametrize("capacity", [0, -1, 100_001])
def test_capacity_is_bounded(capacity: int) -> None:
    with pytest.raises(ValueError, match="capacity must be between 1 and 100000"):
        DropOldestRing[int](capacity)


@given(
    capacity=st.integers(min_value=1, max_value=20),
    count=st.integers(min_value=0, max_value=100),
    since=st.integers(min_value=0, max_value=120),
)
def test_after_matches_a_model(capacity: int, count: int, since: int) -> None:
    ring: DropOldestRing[int] = DropOldestRing(capacity)
    for seq in range(1, count + 1):
        assert ring.append(seq) == seq
    items, missed = ring.after(since)
    wanted = list(range(since + 1, count + 1))
    kept = wanted[-capacity:] if capacity < len(wanted) else wanted
    kept = [seq for seq in kept if seq > count - capacity]
    assert items == kept
    assert missed + len(items) == len(wanted)
    assert len(ring) == min(capacity, count)
