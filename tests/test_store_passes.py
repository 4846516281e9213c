"""How the store's thread gets its batches and how their callers are answered: what the
event loop appends in one pass of its scheduler is committed together, and a change given
with an append (``then``) is applied in journal order as soon as it is durable, never when
the write failed, and what it raises goes to its own caller only.

Real files; ``os.fdatasync`` is wrapped to hold, fail or count commits (as in
tests/test_store_commits.py).
"""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from statusd.channel import StatusChannel
from statusd.events import Streams
from statusd.identity import Caller
from statusd.notifications import open_notifications
from statusd.session import Session
from statusd.store import StoreError, load, open_store

WAIT = 10  # seconds a thread event may take before the test fails instead of hanging


class Syncs:
    """Wraps ``os.fdatasync``: counts the calls; with ``hold``, holds the first one until
    released (and fails it with ``fail_first``)."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, *, hold: bool = False, fail_first: bool = False
    ) -> None:
        self._real = os.fdatasync
        self._hold = hold
        self._fail_first = fail_first
        self.first_started = threading.Event()
        self._release = threading.Event()
        self.calls = 0
        monkeypatch.setattr(os, "fdatasync", self._sync)

    def _sync(self, fd: int) -> None:
        self.calls += 1
        if self.calls == 1 and self._hold:
            self.first_started.set()
            assert self._release.wait(WAIT), "the test never released the held sync"
            if self._fail_first:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        self._real(fd)

    def release(self) -> None:
        self._release.set()


async def test_what_one_pass_of_the_loop_appends_is_committed_by_one_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "store.jsonl"
    store, _ = await open_store(path)
    await store.append({"n": "first"})  # the thread is started, and idle
    syncs = Syncs(monkeypatch)
    async with trio.open_nursery() as nursery:
        # Started together, these run in one pass: an idle thread woken by the first of
        # them would sync it alone and leave the others to the next sync.
        for n in range(8):
            nursery.start_soon(store.append, {"n": n})
    assert syncs.calls == 1
    assert store.statistics().syncs == 2
    await store.aclose()
    records = [r["n"] for r in load(path).records]
    assert records[0] == "first"
    assert sorted(records[1:]) == list(range(8))


@pytest.mark.parametrize("attempt", range(4))
async def test_changes_given_with_appends_are_applied_in_journal_order_across_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attempt: int
) -> None:
    # Some appends give their change, some apply it themselves when they resume (every
    # third): either way memory follows the journal's order, and a change is applied only
    # once its record is durable.
    path = tmp_path / "store.jsonl"
    store, _ = await open_store(path)
    syncs = Syncs(monkeypatch, hold=True)
    applied: list[int] = []

    async def append(n: int) -> None:
        if n % 3:
            await store.append({"n": n}, lambda: applied.append(n))
        else:
            await store.append({"n": n})
            applied.append(n)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(append, 0)
        assert await trio.to_thread.run_sync(syncs.first_started.wait, WAIT)
        nursery.start_soon(append, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert not applied  # nothing is applied before its sync
        for n in range(2, 12):
            nursery.start_soon(append, n)
            await trio.testing.wait_all_tasks_blocked()
        syncs.release()
    assert applied == [r["n"] for r in load(path).records] == list(range(12))
    await store.aclose()


async def test_a_change_is_not_applied_when_its_write_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "store.jsonl"
    store, _ = await open_store(path)
    syncs = Syncs(monkeypatch, hold=True, fail_first=True)
    applied: list[str] = []
    outcomes: dict[str, str] = {}

    async def append(name: str) -> None:
        try:
            await store.append({"n": name}, lambda: applied.append(name))
        except StoreError as exc:
            outcomes[name] = str(exc)
        else:
            outcomes[name] = "stored"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(append, "failed")
        assert await trio.to_thread.run_sync(syncs.first_started.wait, WAIT)
        nursery.start_soon(append, "next")
        await trio.testing.wait_all_tasks_blocked()
        syncs.release()
    assert "Input/output error" in outcomes["failed"]
    assert outcomes["next"] == "stored"
    assert applied == ["next"]
    await store.aclose()
    assert [r["n"] for r in load(path).records] == ["next"]


async def test_what_a_change_raises_goes_to_its_own_caller_only(tmp_path: Path) -> None:
    path = tmp_path / "store.jsonl"
    store, _ = await open_store(path)
    applied: list[int] = []
    outcomes: dict[int, str] = {}

    def change(n: int) -> None:
        if n == 1:
            raise RuntimeError("change 1 does not apply")
        applied.append(n)

    async def append(n: int) -> None:
        try:
            await store.append({"n": n}, lambda: change(n))
        except RuntimeError as exc:
            outcomes[n] = str(exc)
        else:
            outcomes[n] = "applied"

    async with trio.open_nursery() as nursery:
        for n in range(3):
            nursery.start_soon(append, n)
    assert outcomes == {0: "applied", 1: "change 1 does not apply", 2: "applied"}
    await store.aclose()
    journal = [r["n"] for r in load(path).records]
    assert sorted(journal) == [0, 1, 2]  # durable all the same
    assert applied == [n for n in journal if n != 1]


async def test_a_batch_of_creates_is_pushed_to_a_subscriber_in_journal_order(
    tmp_path: Path,
) -> None:
    # A batch's creators resume together, in either order; their pushes still go out in
    # the order of their ids, each followed by the count as of that notification.
    path = tmp_path / "notifications.jsonl"
    streams = Streams(StatusChannel())
    session = Session(Caller(uid=1000, username="alice", admin=False, pid=1), streams)
    streams.notifications.add(session)
    async with open_notifications(path, streams.notifications) as service:
        for attempt in range(4):
            async with trio.open_nursery() as nursery:
                for n in range(6):
                    nursery.start_soon(
                        service.create_notification, "alice", "info", f"t {attempt} {n}", "m"
                    )
    pushes: list[Any] = [json.loads(line) for line in session.take_pending()]
    ids = [p["params"]["id"] for p in pushes if p["method"] == "notification"]
    counts = [p["params"]["count"] for p in pushes if p["method"] == "unread_count"]
    assert ids == list(range(1, 25))
    assert counts == list(range(1, 25))
    assert [r[0] for r in load(path).records] == ids
