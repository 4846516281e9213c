"""The store's commit thread: batches back to back without the event loop, appenders
answered in journal order across batches, a failed batch failing only its own appenders,
and a close that waits for what was handed over before it.

Real files; the kernel's ``fdatasync`` is wrapped to hold or fail one commit, and the
event loop is blocked on purpose (a synchronous wait in a task) to show what the thread
does without it.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from statusd.channel import StatusChannel
from statusd.events import Streams
from statusd.notifications import open_notifications
from statusd.state.notifications import NotificationIndex
from statusd.store import StoreError, load, open_store

WAIT = 10  # seconds a thread event may take before the test fails instead of hanging


class Syncs:
    """Wraps ``os.fdatasync``: holds the first call until released, optionally fails it,
    and counts the calls that completed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, fail_first: bool = False) -> None:
        self._real = os.fdatasync
        self._fail_first = fail_first
        self.first_started = threading.Event()
        self._release = threading.Event()
        self._lock = threading.Lock()
        self.completed = 0
        self.changed = threading.Condition(self._lock)
        monkeypatch.setattr(os, "fdatasync", self._sync)

    def _sync(self, fd: int) -> None:
        first = not self.first_started.is_set()
        if first:
            self.first_started.set()
            assert self._release.wait(WAIT), "the test never released the held sync"
            if self._fail_first:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        self._real(fd)
        with self.changed:
            self.completed += 1
            self.changed.notify_all()

    def release(self) -> None:
        self._release.set()

    def wait_completed(self, count: int) -> bool:
        """Block (the calling thread: the event loop, in these tests) until ``count``
        syncs have completed."""
        with self.changed:
            return self.changed.wait_for(lambda: self.completed >= count, WAIT)


async def test_the_next_batch_is_committed_while_the_event_loop_is_blocked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "store.jsonl"
    store, _ = await open_store(path)
    syncs = Syncs(monkeypatch)
    acknowledged: list[str] = []

    async def append(name: str) -> None:
        await store.append({"name": name})
        acknowledged.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(append, "first")
        assert await trio.to_thread.run_sync(syncs.first_started.wait, WAIT)
        for n in range(5):
            nursery.start_soon(append, f"queued {n}")
            await trio.testing.wait_all_tasks_blocked()
        syncs.release()
        # The loop does nothing from here until the second sync is done: the thread
        # starts the queued batch by itself as soon as the first one is synced.
        assert syncs.wait_completed(2), "the queued batch waited for the event loop"
        assert not acknowledged
    assert acknowledged == ["first", *(f"queued {n}" for n in range(5))]
    assert store.statistics().syncs == 2
    await store.aclose()
    assert [r["name"] for r in load(path).records] == acknowledged


@pytest.mark.parametrize("attempt", range(4))
async def test_appenders_resume_in_journal_order_across_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attempt: int
) -> None:
    # Two batches' results reach the loop together; trio runs the tasks it wakes at once
    # in either order, so waking a batch's appenders together would answer them (and let
    # them apply their changes) out of journal order about every other time.
    path = tmp_path / "store.jsonl"
    store, _ = await open_store(path)
    syncs = Syncs(monkeypatch)
    resumed: list[int] = []

    async def append(n: int) -> None:
        await store.append({"n": n})
        resumed.append(n)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(append, 0)
        assert await trio.to_thread.run_sync(syncs.first_started.wait, WAIT)
        for n in range(1, 12):
            nursery.start_soon(append, n)
            await trio.testing.wait_all_tasks_blocked()
        syncs.release()
        assert syncs.wait_completed(2)
    assert resumed == [r["n"] for r in load(path).records] == list(range(12))
    await store.aclose()


async def test_a_failed_batch_fails_only_its_appenders_and_the_next_batch_is_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "store.jsonl"
    store, _ = await open_store(path)
    await store.append({"n": "before"})
    syncs = Syncs(monkeypatch, fail_first=True)
    outcomes: list[tuple[str, bool | str]] = []

    async def append(name: str) -> None:
        try:
            await store.append({"n": name})
        except StoreError as exc:
            outcomes.append((name, "Input/output error" in str(exc)))
        else:
            outcomes.append((name, "stored"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(append, "failed")
        assert await trio.to_thread.run_sync(syncs.first_started.wait, WAIT)
        for n in range(3):
            nursery.start_soon(append, f"next {n}")
            await trio.testing.wait_all_tasks_blocked()
        syncs.release()
    assert outcomes == [("failed", True), *((f"next {n}", "stored") for n in range(3))]
    await store.aclose()
    assert [r["n"] for r in load(path).records] == ["before", "next 0", "next 1", "next 2"]


async def test_close_waits_for_appends_handed_over_before_it_and_refuses_later_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "store.jsonl"
    store, _ = await open_store(path)
    syncs = Syncs(monkeypatch)
    closed: list[str] = []

    async def close(name: str) -> None:
        await store.aclose()
        closed.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.append, {"n": 1})
        assert await trio.to_thread.run_sync(syncs.first_started.wait, WAIT)
        nursery.start_soon(store.append, {"n": 2})
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(close, "first")
        nursery.start_soon(close, "second")
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(StoreError, match="store is closed"):
            await store.append({"n": 3})
        assert not closed  # neither close returns while the file is still being written
        syncs.release()
    assert sorted(closed) == ["first", "second"]
    assert load(path).records == [{"n": 1}, {"n": 2}]


async def test_concurrent_creates_leave_memory_as_a_replay_of_the_journal(
    tmp_path: Path,
) -> None:
    path = tmp_path / "notifications.jsonl"
    users = [None, "alice", "bob"]
    async with open_notifications(path, Streams(StatusChannel()).notifications) as service:

        async def create(n: int) -> None:
            for k in range(4):
                await service.create_notification(users[n % 3], "info", f"t {n} {k}", "m")

        async with trio.open_nursery() as nursery:
            for n in range(24):
                nursery.start_soon(create, n)
        live = {user: service.get_user_notifications(user, limit=1000) for user in ("alice", "bob")}
        counts = {user: service.get_unread_count(user) for user in ("alice", "bob")}
    replayed = NotificationIndex()
    records: list[Any] = load(path).records
    replayed.replay(records)
    ids = [record[0] for record in records]
    assert len(ids) == 96
    assert ids == sorted(ids)  # journalled in the order the ids were given
    for user in ("alice", "bob"):
        assert replayed.newest_first(user, limit=1000) == live[user]
        assert replayed.unread_count(user) == counts[user]
