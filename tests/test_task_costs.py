"""What a task costs the event loop once, besides its items (issue 12): a finished task's
compaction record made and encoded once and kept until a retry changes it; a download's
items rebuilt from the journal without checking their URLs again; ``daemon.info`` and the
task summaries counted without sorting, for the caller's own tasks only."""

from __future__ import annotations

import grp
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from statusd import store
from statusd.daemon import run
from statusd.downloads import auth, names
from statusd.downloads.engine import DownloadItem
from statusd.state.tasks import TaskStatus
from statusd.store import KeptRecord, encode_record, load
from statusd.tasks import TaskManager
from tests.conftest import (
    NOBODY_GID,
    RawClient,
    blocking_call,
    make_config,
    needs_root,
    run_as_nobody,
)
from tests.test_task_controls import Jobs, started
from tests.test_tasks import FakeJob, make_manager


class Encodes:
    """Counts the records ``statusd.store`` encodes, by the task id of a create record."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.creates: list[str] = []

        def counting(record: Any) -> bytes:
            if isinstance(record, dict) and record.get("op") == "create":
                self.creates.append(record["task"]["id"])
            return encode_record(record)

        monkeypatch.setattr(store, "encode_record", counting)


async def compact_now(manager: TaskManager) -> None:
    # The threshold (COMPACT_MIN_RECORDS, twice the live tasks) is not what is tested.
    manager._journal_records = 10**6
    await manager._maybe_compact()


def tasks_in(path: Path) -> dict[str, dict[str, Any]]:
    """Each task as a compacted journal holds it (its create record)."""
    return {r["task"]["id"]: r["task"] for r in load(path).records if r["op"] == "create"}


async def test_a_finished_task_is_encoded_once_for_every_compaction(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tasks.jsonl"
    manager, _ = make_manager(path, factories={"fake": Jobs()})
    await nursery.start(manager.serve)
    done = FakeJob(total=1)
    done_id = await started(manager, done, "done")
    done.release.set()
    await manager.wait_finished(done_id)
    running = FakeJob(total=1)
    running_id = await started(manager, running, "running")
    await running.started.wait()
    encodes = Encodes(monkeypatch)
    for _ in range(3):
        await compact_now(manager)
        held = tasks_in(path)
        assert held[done_id]["status"] == "completed"
        assert held[done_id]["result"] == {"items": 1}
        assert held[running_id]["status"] == "running"
    # The finished one once, by the first compaction; the running one each time.
    assert encodes.creates.count(done_id) == 1
    assert encodes.creates.count(running_id) == 3
    running.release.set()
    await manager.wait_finished(running_id)


async def test_a_retried_task_is_compacted_as_it_is_now(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    path = tmp_path / "tasks.jsonl"
    jobs = Jobs()
    manager, _ = make_manager(path, factories={"fake": jobs})
    await nursery.start(manager.serve)
    job = FakeJob(total=1, fail_with="1 of 1 items failed")
    task_id = await started(manager, job)
    job.release.set()
    await manager.wait_finished(task_id)
    await compact_now(manager)
    assert tasks_in(path)[task_id]["status"] == "failed"

    await manager.retry_task(task_id)
    while not jobs.built:  # noqa: ASYNC110 - the retry's records are written in a thread
        await trio.sleep(0.001)
    [again] = jobs.built
    await again.started.wait()
    await compact_now(manager)  # running again: not the failed record kept before
    held = tasks_in(path)[task_id]
    assert (held["status"], held["error"], held["result"]) == ("running", None, None)

    again.release.set()
    await manager.wait_finished(task_id)
    await compact_now(manager)
    held = tasks_in(path)[task_id]
    assert (held["status"], held["error"], held["result"]) == ("completed", None, {"items": 1})
    nursery.cancel_scope.cancel()


async def test_a_compacted_journal_reopens_with_every_finished_task(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tasks.jsonl"
    ids = []
    async with trio.open_nursery() as nursery:
        manager, _ = make_manager(path)
        await nursery.start(manager.serve)
        for n in range(3):
            job = FakeJob(total=1, fail_with="no" if n == 1 else None)
            job.release.set()
            ids.append(await started(manager, job, f"t{n}"))
            await manager.wait_finished(ids[-1])
            await compact_now(manager)
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        manager, _ = make_manager(path)
        await nursery.start(manager.serve)
        statuses = [manager.get_task(i).status for i in ids]  # type: ignore[union-attr]
        assert statuses == [TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.COMPLETED]
        nursery.cancel_scope.cancel()


def test_a_kept_record_is_encoded_as_any_record_once() -> None:
    record = {"op": "create", "task": {"id": "t1", "result": {"items": [1, 2]}}}
    kept = KeptRecord(record)
    line = kept.line()
    assert line == encode_record(record)
    assert kept.line() is line


ENTRIES: list[dict[str, Any]] = [
    {"url": "https://example.org/a.iso"},
    {"url": "http://user:secret@example.org:8080/b", "filename": "b.bin"},
    {"url": "https://example.org/c", "sha256": "AB" * 32, "headers": {"X-Token": "1"}},
    {"url": "https://bücher.example/d", "headers": [["Accept", "*/*"]]},
    {"url": "https://example.org/e", "checksum": "SHA-512=" + "Cd" * 64},
]


def test_the_entries_give_every_field_of_an_item() -> None:
    # A field added to DownloadItem must be shown here to be made as its __init__ makes it.
    given = {name for entry in ENTRIES for name in entry}
    assert given == {field.name for field in attrs.fields(DownloadItem)}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("task_headers", [(), (("X-Token", "task"), ("X-Other", "2"))])
def test_an_accepted_item_is_the_item_its_checks_would_make(
    entry: dict[str, Any], task_headers: tuple[tuple[str, str], ...]
) -> None:
    checked = DownloadItem(**entry)
    # As the job made its items before: checked, then evolved with the task's headers.
    expected = attrs.evolve(checked, headers=auth.merged(task_headers, checked.headers))
    assert DownloadItem.accepted(entry, task_headers) == expected


def test_an_accepted_item_does_not_check_its_url_again(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(url: str) -> str:
        raise AssertionError(f"{url} checked again")

    monkeypatch.setattr(names, "validate_url", refuse)
    assert DownloadItem.accepted({"url": "https://example.org/a"}).url == "https://example.org/a"
    with pytest.raises(AssertionError, match="checked again"):
        DownloadItem(url="https://example.org/a")


def test_an_accepted_item_with_unknown_or_missing_fields_is_refused() -> None:
    with pytest.raises(TypeError, match="unknown fields: size"):
        DownloadItem.accepted({"url": "https://example.org/a", "size": 1})
    with pytest.raises(TypeError, match="no url"):
        DownloadItem.accepted({"filename": "a"})
    # Headers are still checked: they are made into pairs here.
    with pytest.raises(ValueError, match="not an HTTP token"):
        DownloadItem.accepted({"url": "https://example.org/a", "headers": {"a b": "1"}})


@needs_root
async def test_daemon_info_counts_the_callers_own_tasks(
    nursery: trio.Nursery, short_tmp: Path
) -> None:
    config = make_config(short_tmp, socket_group=grp.getgrgid(NOBODY_GID).gr_name)
    daemon = await nursery.start(run, config)
    for n in range(2):
        await daemon.tasks.create_task(f"root's {n}", owner="root")
    await daemon.tasks.create_task("nobody's", owner="nobody")
    root = await RawClient.connect(config.socket)
    first = await root.call("daemon.info")
    assert first["tasks"] == {
        "total": 3,
        "pending": 3,
        "running": 0,
        "paused": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
    }
    assert await root.call("tasks.summary") == first["tasks"]

    def as_nobody() -> Any:
        return [blocking_call(config.socket, m)["result"] for m in ("daemon.info", "tasks.summary")]

    info, summary = await trio.to_thread.run_sync(run_as_nobody, as_nobody)
    assert info["tasks"] == summary
    assert (summary["total"], summary["pending"]) == (1, 1)
    assert (info["user"], info["pid"], info["started_at"]) == (
        "nobody",
        first["pid"],
        first["started_at"],
    )
    await root.aclose()
    daemon.request_stop()
    await daemon.wait_stopped()
