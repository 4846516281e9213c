"""A task's checkpoints made while its earlier ones are being written go to the journal
together (``TaskManager.journal_checkpoint``): in the order they were made, each caller
answered only once its record is durable, and a cancel that ends the one writing them
while the journal refuses takes back that caller's record alone."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio
import trio.testing

from statusd.store import StoreError, load
from statusd.tasks import Reporter, TaskManager
from tests.test_task_controls import serve
from tests.test_tasks import make_manager


class RefusedCheckpoints:
    """Makes the manager's journal refuse appends of checkpoints (ENOSPC) while ``full``;
    the rest (a task's start, a pause) it takes."""

    def __init__(self, manager: TaskManager) -> None:
        store = manager._journal  # the test's way to a full disk without a tmpfs
        assert store is not None
        self.full = False
        self.refused = 0
        real = store.append_many

        async def append_many(records: Any, then: Callable[[], None] | None = None) -> None:
            records = list(records)
            if self.full and any(record["op"] == "checkpoint" for record in records):
                self.refused += 1
                cause = OSError(errno.ENOSPC, "No space left on device")
                raise StoreError(f"{store.path}: {cause}") from cause
            await real(records, then)

        store.append_many = append_many  # type: ignore[method-assign]


async def refused(disk: RefusedCheckpoints, more_than: int) -> None:
    """Wait until the journal refused checkpoints more than ``more_than`` times. The task's
    start is written in a thread, which the autojump clock does not wait for."""
    while disk.refused <= more_than:  # noqa: ASYNC110 - the journal writes in a thread
        await trio.sleep(0.001)


def journalled(path: Path) -> list[Any]:
    return [record["data"] for record in load(path).records if record["op"] == "checkpoint"]


@attrs.define
class ManyAtOnce:
    """A job whose ``count`` workers each make one checkpoint, all at once."""

    journal: Path
    count: int
    called: list[int] = attrs.Factory(list)
    durable_at_return: list[bool] = attrs.Factory(list)

    async def run(self, reporter: Reporter) -> dict[str, Any] | None:
        async def one(n: int) -> None:
            self.called.append(n)
            await reporter.checkpoint({"item": n})
            self.durable_at_return.append({"item": n} in journalled(self.journal))

        async with trio.open_nursery() as nursery:
            for n in range(self.count):
                nursery.start_soon(one, n)
        return {"items": self.count}

    async def discard(self) -> None:
        pass

    def checkpoints_to_keep(self) -> list[dict[str, Any]]:
        return []


async def test_checkpoints_made_together_are_journalled_in_order_in_fewer_writes(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    path = tmp_path / "tasks.jsonl"
    manager, _ = make_manager(path)
    await serve(nursery, manager)
    store = manager._journal
    assert store is not None
    appends: list[int] = []
    real = store.append_many

    async def append_many(records: Any, then: Callable[[], None] | None = None) -> None:
        records = list(records)
        appends.append(len(records))
        await real(records, then)

    store.append_many = append_many  # type: ignore[method-assign]
    job = ManyAtOnce(path, 20)
    task_id = await manager.create_task("t", 20, kind="fake", owner="alice")
    manager.run_task(task_id, job)
    # Read before the end: a completed task keeps no checkpoints in memory.
    entry = manager._entries[task_id]
    while len(entry.checkpoints) < 20:  # noqa: ASYNC110 - the journal writes in a thread
        await trio.sleep(0.001)
    assert entry.checkpoints == [{"item": n} for n in job.called]
    await manager.wait_finished(task_id)
    assert journalled(path) == [{"item": n} for n in job.called]
    assert job.durable_at_return == [True] * 20
    # The task's creation, its start, the 20 checkpoints made in one turn together, the
    # task's end.
    assert appends == [1, 1, 20, 2]


@attrs.define
class CancelTheWriter:
    """Three items checkpoint in one turn, each in a scope of its own; the test cancels
    the first one's, which writes the three."""

    scopes: dict[str, trio.CancelScope] = attrs.Factory(dict)
    called: list[str] = attrs.Factory(list)
    returned: list[str] = attrs.Factory(list)

    async def run(self, reporter: Reporter) -> dict[str, Any] | None:
        async def checkpoint(name: str) -> None:
            with self.scopes.setdefault(name, trio.CancelScope()):
                self.called.append(name)
                await reporter.checkpoint({"item": name})
                self.returned.append(name)

        async with trio.open_nursery() as nursery:
            for name in "abc":
                nursery.start_soon(checkpoint, name)
        return {"returned": self.returned}

    async def discard(self) -> None:
        pass

    def checkpoints_to_keep(self) -> list[dict[str, Any]]:
        return []


async def test_a_cancel_of_the_writer_while_the_journal_refuses_takes_back_its_record_alone(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    path = tmp_path / "tasks.jsonl"
    manager, _ = make_manager(path)
    await serve(nursery, manager)
    disk = RefusedCheckpoints(manager)
    disk.full = True
    job = CancelTheWriter()
    task_id = await manager.create_task("t", 3, kind="fake", owner="alice")
    manager.run_task(task_id, job)
    await refused(disk, 2)  # the first tries again and again; the others wait for it
    entry = manager._entries[task_id]
    assert (job.returned, entry.checkpoints) == ([], [])
    refused_before = disk.refused
    writer, *others = job.called
    job.scopes[writer].cancel()
    await refused(disk, refused_before + 1)  # now one of the others writes both
    assert job.scopes[writer].cancelled_caught
    assert (job.returned, entry.checkpoints) == ([], [])
    disk.full = False
    task = await manager.wait_finished(task_id)
    assert task.result is not None
    assert sorted(task.result["returned"]) == sorted(others)
    assert journalled(path) == [{"item": name} for name in others]


async def test_a_cancel_of_every_caller_while_the_journal_refuses_journals_none(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """A pause (the task's scope) while the journal refuses: every caller leaves at once,
    nothing of theirs is journalled then or later."""
    path = tmp_path / "tasks.jsonl"
    manager, _ = make_manager(path)
    await serve(nursery, manager)
    disk = RefusedCheckpoints(manager)
    disk.full = True
    job = CancelTheWriter()
    task_id = await manager.create_task("t", 3, kind="fake", owner="alice")
    manager.run_task(task_id, job)
    await refused(disk, 2)
    await manager.pause_task(task_id)
    disk.full = False
    await trio.sleep(10)
    assert job.returned == []
    assert manager._entries[task_id].checkpoints == []
    assert journalled(path) == []
