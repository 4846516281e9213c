"""A finished task's compaction record (``_snapshot_record``): the converter's record of the
task, with its result as the job gave it (plain JSON, ``Job.run``) rather than walked again
item by item; a compacted journal gives the result back whole."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from statusd.protocol.codec import unstructure
from statusd.state.tasks import TaskInfo, TaskStatus
from statusd.tasks import _Entry, _snapshot_record
from tests.test_task_controls import started
from tests.test_task_costs import compact_now
from tests.test_tasks import FakeJob, make_manager

RESULT: dict[str, Any] = {
    "items": [
        {"url": f"http://127.0.0.1/f{n}.bin", "path": f"/d/f{n}.bin", "bytes": n, "sha256": None}
        for n in range(3)
    ]
    + [{"url": "http://127.0.0.1/gone.bin", "error": "HTTP 404"}],
    "completed": 3,
    "failed": 1,
}


def task_with(status: TaskStatus, result: dict[str, Any] | None) -> TaskInfo:
    at = datetime(2026, 12, 7, 17, 0, tzinfo=UTC)
    return TaskInfo(
        id="t1",
        name="n",
        kind="download",
        owner="alice",
        status=status,
        created_at=at,
        completed_at=at if status.finished else None,
        total_items=4,
        processed_items=4,
        result=result,
        error="1 of 4 items failed" if status is TaskStatus.FAILED else None,
        metadata={"k": ["v"]},
    )


def test_the_record_is_the_converters_with_the_result_as_it_is() -> None:
    for status, result in [
        (TaskStatus.FAILED, RESULT),
        (TaskStatus.COMPLETED, {"items": 4}),
        (TaskStatus.RUNNING, None),
    ]:
        task = task_with(status, result)
        record = _snapshot_record(_Entry(task=task))
        assert record == {"op": "create", "task": unstructure(task)}, status
        assert record["task"]["result"] is result, status
        assert record["task"]["metadata"] is not task.metadata  # still a copy


class Ends(FakeJob):
    async def run(self, reporter: Any) -> dict[str, Any] | None:
        await super().run(reporter)
        return RESULT


async def test_a_compacted_journal_gives_the_result_back_whole(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    async with trio.open_nursery() as nursery:
        manager, _ = make_manager(path)
        await nursery.start(manager.serve)
        job = Ends(total=1)
        job.release.set()
        task_id = await started(manager, job)
        await manager.wait_finished(task_id)
        await compact_now(manager)
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        manager, _ = make_manager(path)
        await nursery.start(manager.serve)
        task = manager.get_task(task_id)
        assert task is not None
        assert (task.status, task.result) == (TaskStatus.COMPLETED, RESULT)
        nursery.cancel_scope.cancel()
