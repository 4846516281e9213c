"""A running task's pause, in the task manager: journalled at once, and made (the task shown
paused, the ``Task paused`` push) by the task's run once its job has stopped, never while
the job may still write. Jobs here take as long as the test says to stop; a compaction or a
restart meanwhile finds the task paused, a cancel meanwhile wins, a resume or a second
pause meanwhile waits for the pause."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from statusd import tasks as tasks_module
from statusd.errors import Conflict
from statusd.state.tasks import TaskInfo, TaskStatus
from statusd.tasks import Reporter, TaskManager
from tests.test_tasks import make_manager


@attrs.define
class SlowStop:
    """A job that runs until cancelled, then goes on (as a thread that still writes would)
    until ``let_stop`` is set; ``stopped`` once its ``run`` has returned."""

    started: trio.Event = attrs.Factory(trio.Event)
    stopping: trio.Event = attrs.Factory(trio.Event)
    let_stop: trio.Event = attrs.Factory(trio.Event)
    stopped: bool = False
    discarded: bool = False

    async def run(self, reporter: Reporter) -> dict[str, Any] | None:
        self.started.set()
        try:
            await trio.sleep_forever()
        finally:
            self.stopping.set()
            with trio.CancelScope(shield=True):
                await self.let_stop.wait()
            self.stopped = True
        return None

    async def discard(self) -> None:
        self.discarded = True

    def checkpoints_to_keep(self) -> list[dict[str, Any]]:
        return []


class Factory:
    def __init__(self, *, stop_at_once: bool = False) -> None:
        self.built: list[SlowStop] = []
        self._stop_at_once = stop_at_once

    def __call__(self, _task: TaskInfo, _saved: dict[str, Any]) -> SlowStop:
        job = SlowStop()
        if self._stop_at_once:
            job.let_stop.set()
        self.built.append(job)
        return job


@attrs.define
class Pushed:
    message: str
    status: TaskStatus
    job_stopped: bool


def record_pushes(
    manager: TaskManager, job: SlowStop, monkeypatch: pytest.MonkeyPatch
) -> list[Pushed]:
    pushed: list[Pushed] = []
    push = manager.push

    def recorded(task: TaskInfo, status: str, message: str, **extra: Any) -> None:
        pushed.append(Pushed(message, task.status, job.stopped))
        push(task, status, message, **extra)

    monkeypatch.setattr(manager, "push", recorded)
    return pushed


async def running(manager: TaskManager, job: SlowStop) -> str:
    task_id = await manager.create_task("slow", 1, kind="fake", owner="alice")
    manager.run_task(task_id, job)
    await job.started.wait()
    return task_id


def status_of(manager: TaskManager, task_id: str) -> TaskStatus:
    task = manager.get_task(task_id)
    assert task is not None
    return task.status


async def test_paused_is_shown_and_pushed_once_the_job_has_stopped(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager, _ = make_manager(tmp_path / "tasks.jsonl", factories={"fake": Factory()})
    await nursery.start(manager.serve)
    job = SlowStop()
    task_id = await running(manager, job)
    pushed = record_pushes(manager, job, monkeypatch)
    answered = trio.Event()

    async def pause() -> None:
        await manager.pause_task(task_id)
        answered.set()

    nursery.start_soon(pause)
    await job.stopping.wait()
    await trio.testing.wait_all_tasks_blocked()
    # The job still runs: the task is not said to be paused, anywhere but in the journal.
    assert status_of(manager, task_id) is TaskStatus.RUNNING
    assert [p.message for p in pushed if p.message == "Task paused"] == []
    assert not answered.is_set()
    job.let_stop.set()
    await answered.wait()
    assert status_of(manager, task_id) is TaskStatus.PAUSED
    assert [p for p in pushed if p.message == "Task paused"] == [
        Pushed("Task paused", TaskStatus.PAUSED, job_stopped=True)
    ]
    assert not job.discarded


@pytest.mark.parametrize("compact", [False, True])
async def test_a_restart_while_the_job_stops_finds_the_task_paused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compact: bool
) -> None:
    path = tmp_path / "tasks.jsonl"
    manager, _ = make_manager(path, factories={"fake": Factory()})
    job = SlowStop()
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        task_id = await running(manager, job)
        nursery.start_soon(manager.pause_task, task_id)
        await job.stopping.wait()
        if compact:
            # The snapshot replaces the pause's record: it must say paused itself.
            monkeypatch.setattr(tasks_module, "COMPACT_MIN_RECORDS", 1)
            await manager._maybe_compact()
            assert manager._journal_records == 1
        assert status_of(manager, task_id) is TaskStatus.RUNNING
        nursery.cancel_scope.cancel()  # the daemon stops before the job has
        job.let_stop.set()

    factory = Factory(stop_at_once=True)
    again, _ = make_manager(path, factories={"fake": factory})
    async with trio.open_nursery() as nursery:
        await nursery.start(again.serve)
        await trio.testing.wait_all_tasks_blocked()
        assert status_of(again, task_id) is TaskStatus.PAUSED
        assert factory.built == []  # not run again until a resume
        nursery.cancel_scope.cancel()


async def test_a_cancel_while_the_job_stops_wins_over_the_pause(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager, _ = make_manager(tmp_path / "tasks.jsonl", factories={"fake": Factory()})
    await nursery.start(manager.serve)
    job = SlowStop()
    task_id = await running(manager, job)
    pushed = record_pushes(manager, job, monkeypatch)
    refused: list[str] = []

    async def pause() -> None:
        with pytest.raises(Conflict) as caught:
            await manager.pause_task(task_id)
        refused.append(str(caught.value))

    nursery.start_soon(pause)
    await job.stopping.wait()
    cancelled = trio.Event()

    async def cancel() -> None:
        assert await manager.cancel_task(task_id)
        cancelled.set()

    nursery.start_soon(cancel)
    await trio.testing.wait_all_tasks_blocked()
    job.let_stop.set()
    await cancelled.wait()
    await trio.testing.wait_all_tasks_blocked()
    assert status_of(manager, task_id) is TaskStatus.CANCELLED
    assert job.discarded
    assert [p.message for p in pushed] == ["Task cancelled"]
    assert refused == [f"task {task_id} is being cancelled and cannot be paused"]


async def test_a_resume_or_a_second_pause_while_the_job_stops_waits_for_the_pause(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    factory = Factory()
    manager, _ = make_manager(tmp_path / "tasks.jsonl", factories={"fake": factory})
    await nursery.start(manager.serve)
    job = SlowStop()
    task_id = await running(manager, job)
    answers: list[str] = []

    async def call(name: str, method: Any) -> None:
        await method(task_id)
        answers.append(f"{name} {status_of(manager, task_id).value}")

    nursery.start_soon(call, "pause", manager.pause_task)
    await job.stopping.wait()
    nursery.start_soon(call, "pause again", manager.pause_task)
    await trio.testing.wait_all_tasks_blocked()
    assert answers == []
    job.let_stop.set()
    await trio.testing.wait_all_tasks_blocked()
    assert sorted(answers) == ["pause again paused", "pause paused"]
    await manager.resume_task(task_id)
    [resumed] = await wait_built(factory, 1)
    await resumed.started.wait()
    assert status_of(manager, task_id) is TaskStatus.RUNNING

    # A resume sent while the pause is under way waits for it, then queues the task.
    nursery.start_soon(call, "pause", manager.pause_task)
    await resumed.stopping.wait()
    nursery.start_soon(call, "resume", manager.resume_task)
    await trio.testing.wait_all_tasks_blocked()
    assert status_of(manager, task_id) is TaskStatus.RUNNING
    resumed.let_stop.set()
    _first, again = await wait_built(factory, 2)
    await again.started.wait()
    assert status_of(manager, task_id) is TaskStatus.RUNNING
    again.let_stop.set()
    assert await manager.cancel_task(task_id)


async def wait_built(factory: Factory, count: int) -> list[SlowStop]:
    while len(factory.built) < count:  # noqa: ASYNC110 - built by the run, after the journal
        await trio.sleep(0.001)
    return factory.built
