"""Paging the listing methods (issue 14, item 8): ``tasks.list`` (``limit``, ``cursor``,
``items: false``), ``tasks.get`` (``items_limit``, ``items_offset``), ``notifications.list``
(``before_id``), and statusctl paging through them.

The page rules are pure (``statusd.state.task_pages``) and tested as such; the methods
against an in-process daemon; statusctl against a daemon process whose
``limits.max_reply_bytes`` is set low enough (100 KiB) that the unpaged answers for 8 tasks
of 1,000 items and one task of 10,000 are refused, so only paging can show them. Those tasks are
finished ones in the daemon's journal; the methods' own tests download for real (404s
from a real server, which fail at once).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio

from statusd.daemon import Daemon
from statusd.identity import username_for
from statusd.protocol.codec import unstructure
from statusd.state import task_pages
from statusd.state.tasks import TaskInfo, TaskStatus
from statusd.store import open_store
from tests.conftest import DaemonProcess, RawClient
from tests.http_servers import HTTPTestServer, http_server, status
from tests.processes import finished, start

__all__ = ["http_server"]

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
# A page of 1,000 of the items below is over it: statusctl halves its pages.
REPLY_LIMIT = 100 * 1024


def task(number: int, seconds: float, items: int = 0) -> TaskInfo:
    result = None
    if items:
        result = {"items": [{"url": f"u{n}"} for n in range(items)], "completed": items}
    return TaskInfo(
        id=f"t{number}",
        name="x",
        kind="download",
        owner="alice",
        status=TaskStatus.COMPLETED,
        created_at=T0 + timedelta(seconds=seconds),
        result=result,
    )


def newest_first(tasks: list[TaskInfo]) -> list[TaskInfo]:
    return sorted(tasks, key=lambda t: (t.created_at, t.id), reverse=True)


# --- the rules -------------------------------------------------------------------------------


def test_pages_follow_each_other_by_cursor() -> None:
    tasks = newest_first([task(n, n) for n in range(5)])
    first, cursor = task_pages.page(tasks, 2, None)
    assert [t.id for t in first] == ["t4", "t3"]
    assert cursor is not None
    second, cursor = task_pages.page(tasks, 2, cursor)
    assert [t.id for t in second] == ["t2", "t1"]
    last, cursor = task_pages.page(tasks, 2, cursor)
    assert [t.id for t in last] == ["t0"]
    assert cursor is None
    assert task_pages.page(tasks, None, None) == (tasks, None)


def test_a_task_created_or_removed_while_paging_moves_nothing() -> None:
    tasks = newest_first([task(n, n) for n in range(5)])
    _first, cursor = task_pages.page(tasks, 2, None)
    assert cursor is not None
    # A new task at the front (an offset would now show t3 twice), t3 itself cleaned up,
    # and two tasks created in the same microsecond, told apart by id.
    changed = newest_first([task(9, 99), *[t for t in tasks if t.id != "t3"], task(5, 1)])
    rest, _ = task_pages.page(changed, 10, cursor)
    assert [t.id for t in rest] == ["t2", "t5", "t1", "t0"]


@pytest.mark.parametrize("cursor", ["", "t3", "yesterday t3", "2026-12-07T12:00:00 t3"])
def test_a_cursor_not_made_by_tasks_list_is_refused(cursor: str) -> None:
    with pytest.raises(ValueError, match=r"must be a next_cursor from an earlier tasks\.list"):
        task_pages.parse_cursor(cursor)


def test_item_pages_and_the_summary_form_leave_the_task_alone() -> None:
    whole = task(1, 0, items=5)
    page = task_pages.items_page(whole, 1, 2)
    assert page.result == {"items": [{"url": "u1"}, {"url": "u2"}], "completed": 5}
    assert task_pages.items_page(whole, 4, None).result == {
        "items": [{"url": "u4"}],
        "completed": 5,
    }
    assert task_pages.without_items(whole).result == {"completed": 5}
    assert whole.result is not None
    assert len(whole.result["items"]) == 5
    unfinished = task(2, 0)
    assert task_pages.items_page(unfinished, 0, 1) is unfinished
    assert task_pages.without_items(unfinished) is unfinished


# --- the methods -----------------------------------------------------------------------------


async def download(client: RawClient, urls: list[str]) -> dict[str, Any]:
    task_id = (await client.call("tasks.download", {"urls": urls}))["task_id"]
    return await finished(client, task_id)


@pytest.fixture
async def client(daemon: Daemon) -> Any:
    client = await RawClient.connect(daemon.config.socket)
    try:
        yield client
    finally:
        await client.aclose()


async def test_tasks_list_pages_and_leaves_items_out_when_asked(
    client: RawClient, http_server: HTTPTestServer
) -> None:
    http_server.route("/gone", status(404))
    ids = [(await download(client, [http_server.url(f"/gone?{n}")] * 3))["id"] for n in range(3)]
    everything = await client.call("tasks.list")
    assert [t["id"] for t in everything["tasks"]] == ids[::-1]
    assert everything["next_cursor"] is None
    assert len(everything["tasks"][0]["result"]["items"]) == 3  # as before: all of it

    first = await client.call("tasks.list", {"limit": 2, "items": False})
    assert [t["id"] for t in first["tasks"]] == ids[:0:-1]
    assert first["tasks"][0]["result"] == {"completed": 0, "failed": 3}
    assert first["summary"]["failed"] == 3
    rest = await client.call("tasks.list", {"limit": 2, "cursor": first["next_cursor"]})
    assert [t["id"] for t in rest["tasks"]] == ids[:1]
    assert rest["next_cursor"] is None
    assert len(rest["tasks"][0]["result"]["items"]) == 3


async def test_tasks_get_pages_items(client: RawClient, http_server: HTTPTestServer) -> None:
    http_server.route("/gone", status(404))
    urls = [http_server.url(f"/gone?{n}") for n in range(7)]
    task_id = (await download(client, urls))["id"]
    page = await client.call("tasks.get", {"task_id": task_id, "items_offset": 2, "items_limit": 3})
    assert [item["url"] for item in page["result"]["items"]] == urls[2:5]
    assert page["result"]["failed"] == 7
    assert page["total_items"] == 7
    summary = await client.call("tasks.get", {"task_id": task_id, "items_limit": 0})
    assert summary["result"]["items"] == []
    whole = await client.call("tasks.get", {"task_id": task_id})
    assert [item["url"] for item in whole["result"]["items"]] == urls


@pytest.mark.parametrize(
    ("method", "params", "field", "problem"),
    [
        ("tasks.list", {"limit": 0}, "limit", "must be >= 1, not 0"),
        ("tasks.list", {"cursor": "t1"}, "cursor", "must be a next_cursor from an earlier"),
        ("tasks.get", {"task_id": "t1", "items_limit": -1}, "items_limit", "must be >= 0"),
        ("tasks.get", {"task_id": "t1", "items_offset": -5}, "items_offset", "must be >= 0"),
        ("notifications.list", {"before_id": 0}, "before_id", "must be >= 1, not 0"),
    ],
)
async def test_bad_page_params_name_the_field(
    client: RawClient, method: str, params: dict[str, Any], field: str, problem: str
) -> None:
    error = (await client.request(method, params))["error"]
    assert error["code"] == -32602
    assert error["data"]["field"] == field
    assert error["message"].startswith(f"{field}: {problem}")


async def test_notifications_page_by_id(client: RawClient) -> None:
    ids = [
        (await client.call("notifications.create", {"type": "t", "title": f"{n}", "message": "m"}))[
            "notification_id"
        ]
        for n in range(5)
    ]
    first = await client.call("notifications.list", {"limit": 2})
    assert [n["id"] for n in first["notifications"]] == ids[:2:-1]
    before = first["notifications"][-1]["id"]
    rest = await client.call("notifications.list", {"limit": 10, "before_id": before})
    assert [n["id"] for n in rest["notifications"]] == ids[2::-1]
    assert (await client.call("notifications.list", {"before_id": ids[0]}))["notifications"] == []


# --- statusctl, past the reply limit ---------------------------------------------------------


def statusctl(socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "statusctl", "--socket", str(socket), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def finished_task(number: int, items: int, owner: str) -> dict[str, Any]:
    """The journal record of a completed download task of ``items`` files, as the daemon
    writes it when it compacts its journal."""
    entries = [
        {
            "url": f"http://files.example.test/{number}/file-{n}.bin",
            "path": f"/srv/downloads/{owner}/file-{n}.bin",
            "bytes": 16384,
            "sha256": None,
            "error": None,
        }
        for n in range(items)
    ]
    info = TaskInfo(
        id=f"t20261207120000-{number:08x}",
        name=f"Download {items} files",
        kind="download",
        owner=owner,
        status=TaskStatus.COMPLETED,
        created_at=T0 + timedelta(seconds=number),
        started_at=T0 + timedelta(seconds=number),
        completed_at=T0 + timedelta(seconds=number + 1),
        progress=100.0,
        total_items=items,
        processed_items=items,
        bytes_done=16384 * items,
        bytes_total=16384 * items,
        result={"items": entries, "completed": items, "failed": 0},
        metadata={"dest": owner, "batch_size": 100},
    )
    return {"op": "create", "task": unstructure(info)}


async def test_statusctl_pages_through_many_tasks_and_a_10000_item_task(
    daemon_process: Any,
) -> None:
    # 18,000 real downloads take a minute on a busy machine; a journal of finished tasks
    # (what a daemon that did them leaves) gives the daemon the same answers to make.
    process: DaemonProcess = daemon_process()
    owner = username_for(os.getuid())
    records = [finished_task(0, 10_000, owner)]
    records += [finished_task(number, 1_000, owner) for number in range(1, 9)]
    (process.directory / "state").mkdir(mode=0o700, exist_ok=True)
    store, _ = await open_store(process.directory / "state" / "tasks.jsonl")
    await store.append_many(records)
    await store.aclose()
    ids = [record["task"]["id"] for record in records]
    big = [entry["url"] for entry in records[0]["task"]["result"]["items"]]
    config = process.directory / "statusd.toml"
    config.write_text(f"[limits]\nmax_reply_bytes = {REPLY_LIMIT}\n")
    client = await start(process, "--config", str(config))
    try:
        # Unpaged, neither fits in a reply; nor does statusctl's first page of items.
        for method, params in (
            ("tasks.list", {}),
            ("tasks.get", {"task_id": ids[0]}),
            ("tasks.get", {"task_id": ids[0], "items_limit": 1000}),
        ):
            error = (await client.request(method, params))["error"]
            assert error["code"] == -32004
            assert "(limits.max_reply_bytes)" in error["message"]
    finally:
        await trio.aclose_forcefully(client.stream)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        done = statusctl(process.socket, *args)
        assert done.returncode == 0, done.stderr
        return done

    listed = await trio.to_thread.run_sync(run, "tasks")
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == ids[::-1]
    as_json = json.loads((await trio.to_thread.run_sync(run, "--json", "tasks")).stdout)
    assert [t["id"] for t in as_json["tasks"]] == ids[::-1]
    assert as_json["tasks"][-1]["result"] == {"completed": 10_000, "failed": 0}
    assert as_json["summary"]["completed"] == 9

    shown = await trio.to_thread.run_sync(run, "task", ids[0])
    item_lines = [line for line in shown.stdout.splitlines() if line.startswith("  ok  ")]
    assert [line.split()[1] for line in item_lines] == big
    whole = json.loads((await trio.to_thread.run_sync(run, "--json", "task", ids[0])).stdout)
    assert whole["result"] == records[0]["task"]["result"]
    assert whole["total_items"] == 10_000
