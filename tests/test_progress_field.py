"""TaskInfo's ``progress`` of a task that ended: what it achieved, the value statusctl and
the dashboard show, the same in ``tasks.get``, ``tasks.list`` and the end's ``job_update``
(a 404 with nothing saved is 0, one of two files saved is 50, never 100 for a failed
task); a retry measures its new run; a journal from before the rule reads the same.
A real daemon in-process and a real HTTP server on 127.0.0.1; the journal test uses the
task manager with a fake job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from statusctl import render
from statusd.daemon import Daemon
from statusd.state.tasks import TaskStatus
from statusd.store import encode_record, load
from tests.http_servers import HTTPTestServer, http_server, sequence, serve_data, status
from tests.test_tasks import FakeJob, make_manager

__all__ = ["http_server"]


async def _end(client: Any, task_id: str) -> dict[str, Any]:
    """The task's last ``job_update`` (its end)."""
    with trio.fail_after(20):
        while True:
            message = await client.receive()
            update = message.get("params", {})
            if (
                message.get("method") == "task_update"
                and update.get("job_id") == task_id
                and update["status"] in ("completed", "error", "cancelled")
            ):
                return dict(update)


async def test_a_failed_tasks_progress_is_what_it_saved_everywhere(
    daemon: Daemon, connect: Any, http_server: HTTPTestServer
) -> None:
    missing = http_server.route("/missing.iso", sequence(status(404), serve_data(b"m" * 300)))
    ok = http_server.route("/ok.txt", serve_data(b"x" * 600))
    lost = http_server.route("/lost.txt", status(404))
    client = await connect()
    await client.call("subscribe", {"tasks": "all"})
    failed = (await client.call("tasks.download", {"urls": [missing]}))["task_id"]
    failed_end = await _end(client, failed)
    half = (await client.call("tasks.download", {"urls": [ok, lost]}))["task_id"]
    half_end = await _end(client, half)
    listed = {task["id"]: task for task in (await client.call("tasks.list"))["tasks"]}
    for task_id, end, expected in ((failed, failed_end, 0.0), (half, half_end, 50.0)):
        info = await client.call("tasks.get", {"task_id": task_id})
        assert info["status"] == "failed"
        # Every item was processed: the item count alone would have said 100.
        assert info["processed_items"] == info["total_items"]
        assert info["progress"] == expected
        assert listed[task_id]["progress"] == expected
        assert (end["status"], end["progress"]) == ("error", expected)
        # What statusctl (and, by tests/test_progress_rule.py, the dashboard) shows.
        assert render.task_fraction(info) * 100 == expected
        assert render.task_fraction(end) * 100 == expected
    summary = await client.call("tasks.summary")
    assert (summary["failed"], summary["completed"], summary["total"]) == (2, 0, 2)
    # A retry is a new run: the 404 is gone now, and the task completes.
    await client.call("tasks.retry", {"task_id": failed})
    end = await _end(client, failed)
    info = await client.call("tasks.get", {"task_id": failed})
    assert (end["status"], end["progress"], info["progress"]) == ("completed", 100.0, 100.0)
    summary = await client.call("tasks.summary")
    assert (summary["failed"], summary["completed"]) == (1, 1)


async def test_a_journal_from_before_the_rule_reads_the_same(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    async with trio.open_nursery() as nursery:
        manager, _ = make_manager(path)
        await nursery.start(manager.serve)
        job = FakeJob(fail_with="1 of 3 items failed")  # its result: {"failed": 1}
        task_id = await manager.create_task("bad", 3, owner="alice")
        manager.run_task(task_id, job)
        job.release.set()
        task = await manager.wait_finished(task_id)
        assert (task.processed_items, task.bytes_done, task.progress) == (3, 0, 0.0)
        nursery.cancel_scope.cancel()
    # As a daemon before the rule wrote the end: progress counted the processed items.
    records = load(path).records
    for record in records:
        if record.get("op") == "update" and record["set"]["status"] == "failed":
            record["set"]["progress"] = 100.0
    path.write_bytes(b"".join(encode_record(record) for record in records))
    async with trio.open_nursery() as nursery:
        manager, _ = make_manager(path)
        await nursery.start(manager.serve)
        replayed = manager.get_task(task_id)
        assert replayed is not None
        assert (replayed.status, replayed.progress) == (TaskStatus.FAILED, 0.0)
        nursery.cancel_scope.cancel()
