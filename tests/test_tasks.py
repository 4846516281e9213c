"""The task manager with fake jobs: limits, order, cancel, cleanup, journal and resume."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from statusd.channel import StatusChannel
from statusd.events import Streams
from statusd.identity import Caller
from statusd.session import Session
from statusd.state.tasks import TaskInfo, TaskStatus
from statusd.store import load
from statusd.tasks import CLEANUP_INTERVAL, JobFailed, Reporter, TaskManager


@attrs.define
class FakeJob:
    """A job that runs until told how to end; records what happened to it."""

    total: int = 3
    release: trio.Event = attrs.Factory(trio.Event)
    started: trio.Event = attrs.Factory(trio.Event)
    fail_with: str | None = None
    discarded: bool = False
    resumed_from: list[dict[str, Any]] = attrs.Factory(list)

    async def run(self, reporter: Reporter) -> dict[str, Any] | None:
        self.started.set()
        done = len(self.resumed_from)
        for n in range(done, self.total):
            reporter.update_progress(n, current=f"item {n}")
            await reporter.checkpoint({"item": n})
        reporter.update_progress(self.total)
        await self.release.wait()
        if self.fail_with:
            raise JobFailed(self.fail_with, {"failed": 1})
        return {"items": self.total}

    async def discard(self) -> None:
        self.discarded = True

    def checkpoints_to_keep(self) -> list[dict[str, Any]]:
        return []


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def make_manager(
    path: Path | None, max_running: int = 3, clock: Clock | None = None, **kw: Any
) -> tuple[TaskManager, Streams]:
    streams = Streams(StatusChannel())
    manager = TaskManager(
        streams.status,
        streams.tasks,
        journal_path=path,
        max_running=max_running,
        now=clock or Clock(),
        **kw,
    )
    return manager, streams


async def test_at_most_three_run_and_the_rest_wait_in_order(nursery: trio.Nursery) -> None:
    manager, _ = make_manager(None)
    await nursery.start(manager.serve)
    jobs = [FakeJob() for _ in range(5)]
    ids = []
    for n, job in enumerate(jobs):
        task_id = await manager.create_task(f"job {n}", 3, owner="alice")
        manager.run_task(task_id, job)
        ids.append(task_id)
    await trio.testing.wait_all_tasks_blocked()
    statuses = [manager.get_task(i).status for i in ids]  # type: ignore[union-attr]
    assert statuses == [TaskStatus.RUNNING] * 3 + [TaskStatus.PENDING] * 2
    jobs[1].release.set()
    await manager.wait_finished(ids[1])
    await trio.testing.wait_all_tasks_blocked()
    # The first waiting task took the free slot, not the last.
    assert manager.get_task(ids[3]).status is TaskStatus.RUNNING  # type: ignore[union-attr]
    assert manager.get_task(ids[4]).status is TaskStatus.PENDING  # type: ignore[union-attr]
    for job in jobs:
        job.release.set()
    for task_id in ids:
        task = await manager.wait_finished(task_id)
        assert task.status is TaskStatus.COMPLETED
        assert task.result == {"items": 3}
        assert task.progress == 100.0


async def test_failed_job_keeps_its_result_and_error(nursery: trio.Nursery) -> None:
    manager, _ = make_manager(None)
    await nursery.start(manager.serve)
    job = FakeJob(fail_with="1 of 3 items failed")
    task_id = await manager.create_task("bad", 3, owner="alice")
    manager.run_task(task_id, job)
    job.release.set()
    task = await manager.wait_finished(task_id)
    assert (task.status, task.error, task.result) == (
        TaskStatus.FAILED,
        "1 of 3 items failed",
        {"failed": 1},
    )


async def test_cancel_running_is_immediate_and_discards(nursery: trio.Nursery) -> None:
    manager, _ = make_manager(None)
    await nursery.start(manager.serve)
    job = FakeJob()  # never released: like a server that hangs
    task_id = await manager.create_task("hang", 3, owner="alice")
    manager.run_task(task_id, job)
    await job.started.wait()
    with trio.fail_after(1):
        assert await manager.cancel_task(task_id)
    task = manager.get_task(task_id)
    assert task is not None
    assert task.status is TaskStatus.CANCELLED
    assert job.discarded
    assert not await manager.cancel_task(task_id)  # finished: nothing to cancel


async def test_cancel_pending_never_runs_it(nursery: trio.Nursery) -> None:
    manager, _ = make_manager(None, max_running=1)
    await nursery.start(manager.serve)
    first, second = FakeJob(), FakeJob()
    first_id = await manager.create_task("a", 1, owner="alice")
    second_id = await manager.create_task("b", 1, owner="alice")
    manager.run_task(first_id, first)
    manager.run_task(second_id, second)
    assert await manager.cancel_task(second_id)
    first.release.set()
    await manager.wait_finished(first_id)
    await trio.testing.wait_all_tasks_blocked()
    assert not second.started.is_set()
    assert manager.get_task(second_id).status is TaskStatus.CANCELLED  # type: ignore[union-attr]


async def test_list_newest_first_and_summary(nursery: trio.Nursery) -> None:
    clock = Clock()
    manager, _ = make_manager(None, clock=clock)
    await nursery.start(manager.serve)
    ids = []
    for n in range(3):
        clock.now += timedelta(seconds=1)
        ids.append(await manager.create_task(f"t{n}", owner="alice"))
    assert [t.id for t in manager.list_tasks()] == ids[::-1]
    assert manager.list_tasks(TaskStatus.RUNNING) == []
    assert manager.get_task_summary() == {
        "total": 3,
        "pending": 3,
        "running": 0,
        "paused": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
    }


async def test_cleanup_runs_hourly_and_keeps_recent_tasks(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    clock = Clock()
    manager, _ = make_manager(None, clock=clock)
    await nursery.start(manager.serve)
    old_job, new_job = FakeJob(), FakeJob()
    old_id = await manager.create_task("old", owner="alice")
    manager.run_task(old_id, old_job)
    old_job.release.set()
    await manager.wait_finished(old_id)
    clock.now += timedelta(hours=25)
    new_id = await manager.create_task("new", owner="alice")
    manager.run_task(new_id, new_job)
    new_job.release.set()
    await manager.wait_finished(new_id)
    assert manager.get_task(old_id) is not None
    await trio.sleep(CLEANUP_INTERVAL + 1)
    assert manager.get_task(old_id) is None
    assert manager.get_task(new_id) is not None


async def test_cleanup_by_owner(nursery: trio.Nursery) -> None:
    clock = Clock()
    manager, _ = make_manager(None, clock=clock)
    await nursery.start(manager.serve)
    for owner in ("alice", "bob"):
        job = FakeJob()
        task_id = await manager.create_task(owner, owner=owner)
        manager.run_task(task_id, job)
        job.release.set()
        await manager.wait_finished(task_id)
    clock.now += timedelta(hours=2)
    assert await manager.cleanup_old_tasks(1, owner="alice") == 1
    assert [t.owner for t in manager.list_tasks()] == ["bob"]


async def test_progress_pushes_are_throttled(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    manager, streams = make_manager(None)
    await nursery.start(manager.serve)
    session = Session(Caller(1, "alice", False), streams)
    session.subscribe(tasks="all")
    task_id = await manager.create_task("t", 1000, owner="alice")
    task = manager.get_task(task_id)
    assert task is not None
    reporter = Reporter(manager, task)
    for n in range(1000):
        reporter.update_progress(n)  # no time passes: one push
    await trio.sleep(1)
    reporter.update_progress(1000)
    pushed = session.take_pending()
    assert len(pushed) == 2


async def test_a_throttled_progress_goes_out_at_the_end_of_the_interval(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """A job that reports a burst and then stalls is shown where it stalled, not where
    the burst began."""
    manager, streams = make_manager(None)
    await nursery.start(manager.serve)
    session = Session(Caller(1, "alice", False), streams)
    session.subscribe(tasks="all")
    job = FakeJob(total=5)
    task_id = await manager.create_task("t", 5, owner="alice")
    manager.run_task(task_id, job)
    await job.started.wait()
    await trio.sleep(1)
    import json

    updates = [json.loads(line)["params"] for line in session.take_pending()]
    # "Task started", the first of the burst, and the rest of it at the interval's end.
    assert [update["processed"] for update in updates] == [0, 0, 5]
    job.release.set()
    await manager.wait_finished(task_id)


async def test_task_updates_reach_only_allowed_subscribers(nursery: trio.Nursery) -> None:
    manager, streams = make_manager(None)
    await nursery.start(manager.serve)
    alice = Session(Caller(1000, "alice", False), streams)
    bob = Session(Caller(1001, "bob", False), streams)
    admin = Session(Caller(0, "root", True), streams)
    topic = Session(Caller(1000, "alice", False), streams)
    for session in (alice, bob, admin):
        session.subscribe(tasks="all")
    topic.subscribe(topic="news")
    job = FakeJob(total=1)
    task_id = await manager.create_task("t", 1, owner="alice", topic="news")
    manager.run_task(task_id, job)
    job.release.set()
    await manager.wait_finished(task_id)
    import json

    def statuses(session: Session) -> list[str]:
        return [json.loads(line)["params"]["status"] for line in session.take_pending()]

    assert statuses(alice)[-1] == "completed"
    assert statuses(admin)[-1] == "completed"
    assert statuses(topic)[-1] == "completed"
    assert statuses(bob) == []


async def test_journal_survives_and_resumes(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    resumed: list[FakeJob] = []

    def factory(task: TaskInfo, saved: dict[str, Any]) -> FakeJob:
        job = FakeJob(resumed_from=saved["checkpoints"])
        job.release.set()
        resumed.append(job)
        return job

    async with trio.open_nursery() as nursery:
        manager, _ = make_manager(path, factories={"fake": factory})
        scope = trio.CancelScope()

        async def serve(task_status: trio.TaskStatus[TaskManager]) -> None:
            with scope:
                await manager.serve(task_status=task_status)

        await nursery.start(serve)
        finished_job, stuck_job = FakeJob(), FakeJob(total=3)
        done_id = await manager.create_task("done", 3, kind="fake", owner="alice")
        manager.run_task(done_id, finished_job)
        finished_job.release.set()
        await manager.wait_finished(done_id)
        stuck_id = await manager.create_task("stuck", 3, kind="fake", owner="alice")
        manager.run_task(stuck_id, stuck_job)
        await stuck_job.started.wait()
        await trio.testing.wait_all_tasks_blocked()
        # The daemon stops under the running task.
        scope.cancel()

    records = load(path).records
    assert [r["op"] for r in records].count("create") == 2

    async with trio.open_nursery() as nursery:
        manager, _ = make_manager(path, factories={"fake": factory})
        await nursery.start(manager.serve)
        done = manager.get_task(done_id)
        assert done is not None
        assert done.status is TaskStatus.COMPLETED
        assert done.result == {"items": 3}
        task = await manager.wait_finished(stuck_id)
        assert task.status is TaskStatus.COMPLETED
        # The three checkpoints were replayed: nothing was done again.
        assert [c["item"] for c in resumed[0].resumed_from] == [0, 1, 2]
        nursery.cancel_scope.cancel()


async def test_unknown_kind_in_journal_fails_instead_of_vanishing(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    async with trio.open_nursery() as nursery:
        manager, _ = make_manager(path)
        await nursery.start(manager.serve)
        task_id = await manager.create_task("mystery", kind="gone", owner="alice")
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        manager, _ = make_manager(path)
        await nursery.start(manager.serve)
        task = manager.get_task(task_id)
        assert task is not None
        assert task.status is TaskStatus.FAILED
        assert "cannot resume a task of kind 'gone'" in (task.error or "")
        nursery.cancel_scope.cancel()


def test_max_running_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_running must be >= 1, not 0"):
        make_manager(None, max_running=0)


async def test_tasks_created_during_a_compaction_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The compaction's snapshot is taken from memory: a create whose journal write is
    # still in flight must be in the snapshot or after it in the file, never lost between.
    monkeypatch.setattr("statusd.tasks.COMPACT_MIN_RECORDS", 4)
    path = tmp_path / "tasks.jsonl"
    clock = Clock()
    created: list[str] = []
    async with trio.open_nursery() as nursery:
        manager, _ = make_manager(path, clock=clock)
        await nursery.start(manager.serve)
        for n in range(3):
            job = FakeJob(total=1)
            job.release.set()
            task_id = await manager.create_task(f"old {n}", 1, owner="alice")
            manager.run_task(task_id, job)
            await manager.wait_finished(task_id)
        clock.now += timedelta(hours=25)

        async def create(n: int) -> None:
            created.append(await manager.create_task(f"new {n}", owner="alice"))

        async with trio.open_nursery() as creates:
            for n in range(8):
                creates.start_soon(create, n)
            # Removes the three old tasks, then compacts while the creates are being written.
            assert await manager.cleanup_old_tasks() == 3
        assert len(created) == 8
        nursery.cancel_scope.cancel()

    assert load(path).records[0]["op"] == "create"  # compacted
    async with trio.open_nursery() as nursery:
        manager, _ = make_manager(path, clock=clock)
        await nursery.start(manager.serve)
        assert sorted(t.id for t in manager.list_tasks()) == sorted(created)
        nursery.cancel_scope.cancel()
