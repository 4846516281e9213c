"""The task manager's lifecycle with fake jobs: pause, resume, retry, one finish path,
journal failures (nothing moves that is not journalled), shutdown and compaction."""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from statusd.channel import StatusChannel
from statusd.errors import Conflict, InternalError
from statusd.events import Streams
from statusd.notifications import open_notifications
from statusd.state.tasks import TaskInfo, TaskStatus
from statusd.store import JsonLinesStore, StoreError, load
from statusd.tasks import TaskManager
from tests.test_notifications import _task
from tests.test_tasks import FakeJob, make_manager


class Jobs:
    """A factory that records the checkpoints each rebuilt job got."""

    def __init__(self) -> None:
        self.built: list[FakeJob] = []

    def __call__(self, _task: TaskInfo, saved: dict[str, Any]) -> FakeJob:
        job = FakeJob(total=1, resumed_from=list(saved["checkpoints"]))
        self.built.append(job)
        return job


class FullDisk:
    """Makes the manager's journal refuse appends (ENOSPC) while ``full``."""

    def __init__(self, store: JsonLinesStore) -> None:
        self.full = False
        self.refused = 0
        real = store.append_many

        async def append_many(
            records: Iterable[Any], then: Callable[[], None] | None = None
        ) -> None:
            if self.full:
                self.refused += 1
                cause = OSError(errno.ENOSPC, "No space left on device")
                raise StoreError(f"{store.path}: {cause}") from cause
            await real(records, then)

        store.append_many = append_many  # type: ignore[method-assign]


async def serve(nursery: trio.Nursery, manager: TaskManager) -> None:
    await nursery.start(manager.serve)


def disk_of(manager: TaskManager) -> FullDisk:
    store = manager._journal  # the test's way to a full disk without a tmpfs
    assert store is not None
    return FullDisk(store)


async def started(manager: TaskManager, job: FakeJob, name: str = "t") -> str:
    task_id = await manager.create_task(name, 1, kind="fake", owner="alice")
    manager.run_task(task_id, job)
    return task_id


async def checkpointed(manager: TaskManager, task_id: str, count: int) -> None:
    """Wait until the task's first ``count`` checkpoints are written. They are written in a
    worker thread, which the autojump clock does not wait for: it sees every task blocked
    and moves time on."""
    entry = manager._entries[task_id]
    while len(entry.checkpoints) < count:  # noqa: ASYNC110 - the write is in a thread
        await trio.sleep(0.001)


def status_of(manager: TaskManager, task_id: str) -> TaskStatus:
    task = manager.get_task(task_id)
    assert task is not None
    return task.status


async def test_pause_frees_the_slot_keeps_the_files_and_resume_rebuilds_the_job(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    jobs = Jobs()
    manager, _ = make_manager(tmp_path / "tasks.jsonl", max_running=1, factories={"fake": jobs})
    await serve(nursery, manager)
    first, second = FakeJob(total=1), FakeJob(total=1)
    first_id = await started(manager, first)
    second_id = await started(manager, second)
    await first.started.wait()
    await manager.pause_task(first_id)
    assert status_of(manager, first_id) is TaskStatus.PAUSED
    assert not first.discarded  # its part files stay
    await second.started.wait()  # the slot was free on return
    with pytest.raises(Conflict, match="is paused and cannot be paused"):
        await manager.pause_task(first_id)
    with pytest.raises(Conflict, match="is running and cannot be resumed"):
        await manager.resume_task(second_id)

    await manager.resume_task(first_id)
    assert status_of(manager, first_id) is TaskStatus.PENDING  # queued behind the second
    assert jobs.built == []  # its job is built when it starts, not while it waits
    second.release.set()
    while not jobs.built:  # noqa: ASYNC110 - the second's end is written in a thread
        await trio.sleep(0.001)
    [rebuilt] = jobs.built
    assert rebuilt.resumed_from == [{"item": 0}]  # the checkpoint the first run made
    rebuilt.release.set()
    assert (await manager.wait_finished(first_id)).status is TaskStatus.COMPLETED


async def test_a_paused_queued_task_is_cancelled_without_running(nursery: trio.Nursery) -> None:
    manager, _ = make_manager(None, max_running=1, factories={"fake": Jobs()})
    await serve(nursery, manager)
    first, second = FakeJob(), FakeJob()
    await started(manager, first)
    second_id = await started(manager, second)
    await manager.pause_task(second_id)
    assert await manager.cancel_task(second_id)
    assert status_of(manager, second_id) is TaskStatus.CANCELLED
    assert not second.started.is_set()
    assert not await manager.cancel_task(second_id)


async def test_retry_runs_a_failed_task_again_with_a_retry_checkpoint(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    jobs = Jobs()
    manager, _ = make_manager(tmp_path / "tasks.jsonl", factories={"fake": jobs})
    await serve(nursery, manager)
    job = FakeJob(total=1, fail_with="1 of 1 items failed")
    task_id = await started(manager, job)
    job.release.set()
    failed = await manager.wait_finished(task_id)
    assert (failed.status, failed.error) == (TaskStatus.FAILED, "1 of 1 items failed")
    await manager.retry_task(task_id)
    task = manager.get_task(task_id)
    assert task is not None
    assert (task.error, task.result, task.completed_at) == (None, None, None)
    await trio.testing.wait_all_tasks_blocked()
    [again] = jobs.built
    # FakeJob keeps no checkpoints at its end; the retry adds its own marker.
    assert again.resumed_from == [{"retry": True}]
    again.release.set()
    assert (await manager.wait_finished(task_id)).status is TaskStatus.COMPLETED
    with pytest.raises(Conflict, match="is completed and cannot be retried"):
        await manager.retry_task(task_id)


async def test_racing_cancels_and_a_start_finish_a_task_once(nursery: trio.Nursery) -> None:
    ended: list[TaskStatus] = []

    async def on_finished(_task: TaskInfo, status: TaskStatus) -> None:
        await trio.lowlevel.checkpoint()  # a hook that waits (a journal write) lets others run
        ended.append(status)

    manager, _ = make_manager(None, max_running=1, on_finished=on_finished)
    await serve(nursery, manager)
    first, second = FakeJob(), FakeJob()
    first_id = await started(manager, first)
    second_id = await started(manager, second)
    await first.started.wait()
    async with trio.open_nursery() as racing:
        racing.start_soon(manager.cancel_task, first_id)  # starts the second
        racing.start_soon(manager.cancel_task, second_id)
        racing.start_soon(manager.cancel_task, second_id)
    assert ended == [TaskStatus.CANCELLED, TaskStatus.CANCELLED]
    assert status_of(manager, second_id) is TaskStatus.CANCELLED


async def test_a_change_asked_for_on_a_full_disk_is_refused_and_nothing_moves(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    jobs = Jobs()
    manager, _ = make_manager(tmp_path / "tasks.jsonl", max_running=1, factories={"fake": jobs})
    await serve(nursery, manager)
    disk = disk_of(manager)
    running, queued = FakeJob(), FakeJob()
    running_id = await started(manager, running)
    queued_id = await started(manager, queued)
    await running.started.wait()
    await trio.testing.wait_all_tasks_blocked()
    disk.full = True
    for change in (manager.cancel_task, manager.pause_task):
        for task_id in (running_id, queued_id):
            with pytest.raises(InternalError, match="no space left on device; nothing was"):
                await change(task_id)
    with pytest.raises(InternalError, match=r"could not record the change in .*tasks\.jsonl"):
        await manager.create_task("new", owner="alice")
    assert status_of(manager, running_id) is TaskStatus.RUNNING
    assert status_of(manager, queued_id) is TaskStatus.PENDING
    assert not running.discarded
    assert len(manager.list_tasks()) == 2
    disk.full = False
    assert await manager.cancel_task(running_id)
    await queued.started.wait()


async def test_an_end_that_cannot_be_journalled_keeps_the_task_and_its_slot(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    manager, streams = make_manager(tmp_path / "tasks.jsonl", max_running=1)
    await serve(nursery, manager)
    disk = disk_of(manager)
    job, waiting = FakeJob(total=1), FakeJob(total=1)
    task_id = await started(manager, job)
    await started(manager, waiting)
    await checkpointed(manager, task_id, 1)
    disk.full = True
    job.release.set()
    await trio.sleep(30)  # retried after 1, 2, 4, 8 and 16 s
    assert disk.refused == 5
    assert status_of(manager, task_id) is TaskStatus.RUNNING
    assert not waiting.started.is_set()
    messages = [m.message for m in streams.status.recent()[0] if m.operation_id == task_id]
    assert messages[-1] == (
        f"Task {task_id}: could not record its end (no space left on device); trying again in 16 s"
    )
    disk.full = False
    assert (await manager.wait_finished(task_id)).status is TaskStatus.COMPLETED
    await waiting.started.wait()
    records = load(tmp_path / "tasks.jsonl").records
    statuses = [r["set"]["status"] for r in records if r["op"] == "update"]
    assert statuses.count("completed") == 1


async def test_a_checkpoint_waits_for_the_journal_instead_of_being_lost(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    manager, _ = make_manager(tmp_path / "tasks.jsonl")
    await serve(nursery, manager)
    disk = disk_of(manager)
    job = FakeJob(total=2)
    task_id = await manager.create_task("t", 2, kind="fake", owner="alice")
    disk.full = True
    manager.run_task(task_id, job)
    await trio.sleep(10)
    assert job.started.is_set()
    assert manager.get_task(task_id).processed_items == 0  # type: ignore[union-attr]
    disk.full = False
    job.release.set()
    await manager.wait_finished(task_id)
    checkpoints = [
        r["data"] for r in load(tmp_path / "tasks.jsonl").records if r["op"] == "checkpoint"
    ]
    assert checkpoints == [{"item": 0}, {"item": 1}]


async def test_a_stop_starts_no_queued_task(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    async with trio.open_nursery() as nursery:
        manager, _ = make_manager(path, max_running=1)
        await serve(nursery, manager)
        jobs = [FakeJob() for _ in range(20)]
        ids = [await started(manager, job, f"t{n}") for n, job in enumerate(jobs)]
        await jobs[0].started.wait()
        nursery.cancel_scope.cancel()
    assert not any(job.started.is_set() for job in jobs[1:])
    running = {r["id"] for r in load(path).records if r.get("set", {}).get("status") == "running"}
    assert running == {ids[0]}


async def test_a_finished_task_keeps_only_what_a_retry_needs(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tasks.jsonl"
    manager, _ = make_manager(path, factories={"fake": Jobs()})
    await serve(nursery, manager)
    job = FakeJob(total=50)
    task_id = await started(manager, job)
    job.release.set()
    await manager.wait_finished(task_id)
    await trio.testing.wait_all_tasks_blocked()  # its end's compaction check is done
    records = load(path).records
    # A completed task is final: it keeps neither checkpoints nor its spec.
    assert records[-2] == {"op": "checkpoints", "id": task_id, "data": [], "spec": None}
    assert records[-1]["set"]["status"] == "completed"
    compactions: list[bool] = []
    store = manager._journal
    assert store is not None
    real = store.compact

    async def compact(records: Iterable[Any], *, encode_in_thread: bool = False) -> None:
        compactions.append(encode_in_thread)
        await real(records, encode_in_thread=encode_in_thread)

    store.compact = compact  # type: ignore[method-assign]
    monkeypatch.setattr("statusd.tasks.COMPACT_MIN_RECORDS", 10)
    await manager.cleanup_old_tasks(24)  # nothing old: compacts (the journal grew)
    assert compactions == [True]  # encoded off the event loop
    [snapshot] = load(path).records
    assert snapshot.keys() == {"op", "task"}


async def test_concurrent_ends_of_one_task_notify_once(tmp_path: Path) -> None:
    feed = Streams(StatusChannel()).notifications
    async with open_notifications(tmp_path / "notifications.jsonl", feed) as service:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(service.notify_task_finished, _task(), TaskStatus.CANCELLED)
        assert len(service.get_user_notifications("alice")) == 1


def test_a_download_job_keeps_its_successes_and_a_retry_forgets_its_failures(
    tmp_path: Path,
) -> None:
    from statusd.downloads import Downloads
    from tests.conftest import make_config

    urls = [f"http://127.0.0.1:9/{n}.bin" for n in range(3)]
    spec = {"items": [{"url": url} for url in urls], "dest": ".", "batch_size": 10}

    def result(n: int, error: str | None) -> dict[str, Any]:
        path = str(tmp_path / f"{n}.bin")
        return {"url": urls[n], "path": path, "bytes": 5, "sha256": None, "error": error}

    state = {"name": "0.bin", "validator": '"v1"', "done": True, "part": ".0.bin.t1-0.part"}
    checkpoints = [
        {"item": 0, "state": state},
        {"item": 0, "state": state, "result": result(0, None), "settle": True},
        {"item": 1, "state": {"name": "1.bin", "validator": None, "done": False}},
        {"item": 1, "state": {"name": "1.bin"}, "result": result(1, "HTTP 404")},
    ]
    service = Downloads(make_config(tmp_path))
    job = service.job("t1", spec, checkpoints)
    # Only the success, as one compact row; the failure and the unrun item go.
    assert job.checkpoints_to_keep() == [{"completed": [[0, str(tmp_path / "0.bin"), 5, None]]}]
    assert [r is not None for r in job.results] == [True, True, False]
    retried = service.job("t1", spec, [*checkpoints, {"retry": True}])
    assert [r is not None for r in retried.results] == [True, False, False]
    assert retried.states[1].name == "1.bin"  # kept: a partial file resumes
    again = service.job("t1", spec, [*job.checkpoints_to_keep(), {"retry": True}])
    assert [r is not None for r in again.results] == [True, False, False]
    assert again.results[0] == job.results[0]  # the row restores the whole result
