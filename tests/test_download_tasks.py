"""tasks.download end to end: a real daemon, a real HTTP server on 127.0.0.1, real files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import attrs
import trio
import trio.testing

from statusd.channel import StatusChannel
from statusd.daemon import Daemon
from statusd.downloads import Downloads, part_name
from statusd.events import Streams
from statusd.store import load
from statusd.tasks import TaskManager
from tests.conftest import make_config
from tests.http_servers import (
    HTTPTestServer,
    hang_after_head,
    http_server,
    serve_data,
    status,
)

__all__ = ["http_server"]


async def wait_for_end(client: Any, task_id: str) -> dict[str, Any]:
    with trio.fail_after(20):
        while True:
            message = await client.receive()
            params = message.get("params", {})
            if (
                message.get("method") == "task_update"
                and params.get("job_id") == task_id
                and params["status"] in ("completed", "error", "cancelled")
            ):
                task: dict[str, Any] = await client.call("tasks.get", {"task_id": task_id})
                return task


async def test_download_completes_with_status_messages(
    daemon: Daemon, connect: Any, http_server: HTTPTestServer
) -> None:
    payloads = {f"/f{n}.bin": bytes([n]) * (100_000 + n) for n in range(3)}
    urls = [http_server.route(path, serve_data(data)) for path, data in payloads.items()]
    client = await connect()
    await client.call("subscribe", {"tasks": "all", "status": True})
    good_sum = hashlib.sha256(payloads["/f0.bin"]).hexdigest()
    items = [{"url": urls[0], "sha256": good_sum}, {"url": urls[1]}, {"url": urls[2]}]
    task_id = (await client.call("tasks.download", {"items": items, "batch_size": 2}))["task_id"]
    messages: list[str] = []
    with trio.fail_after(20):
        while True:
            message = await client.receive()
            if message.get("method") == "status":
                messages.append(message["params"]["message"])
            elif message.get("method") == "task_update" and message["params"]["status"] in (
                "completed",
                "error",
            ):
                break
    task = await client.call("tasks.get", {"task_id": task_id})
    assert task["status"] == "completed"
    assert task["result"]["completed"] == 3
    dest = daemon.config.download_dir
    for path, data in payloads.items():
        assert (dest / path.lstrip("/")).read_bytes() == data
    assert "Starting download operations..." in messages
    assert "Processing batch 1 of 2" in messages
    assert "Processing batch 2 of 2" in messages
    assert messages[-1] == "All downloads completed successfully"
    assert not list(dest.glob("*.part"))


async def test_failed_item_fails_the_task(
    daemon: Daemon, connect: Any, http_server: HTTPTestServer
) -> None:
    ok = http_server.route("/ok.txt", serve_data(b"fine"))
    missing = http_server.route("/missing.txt", status(404))
    client = await connect()
    await client.call("subscribe", {"tasks": "all"})
    task_id = (await client.call("tasks.download", {"urls": [ok, missing]}))["task_id"]
    task = await wait_for_end(client, task_id)
    assert task["status"] == "failed"
    assert task["error"] == "1 of 2 items failed"
    errors = [item["error"] for item in task["result"]["items"]]
    assert errors[0] is None
    assert "404" in errors[1]


async def test_bad_url_refuses_the_whole_request(daemon: Daemon, connect: Any) -> None:
    client = await connect()
    response = await client.request(
        "tasks.download", {"urls": ["http://127.0.0.1:1/a", "ftp://example.org/x"]}
    )
    assert response["error"]["code"] == -32602
    assert response["error"]["data"]["field"] == "urls[1]"
    assert (await client.call("tasks.summary"))["total"] == 0


async def test_cancel_while_the_server_hangs(
    daemon: Daemon, connect: Any, http_server: HTTPTestServer
) -> None:
    url = http_server.route("/slow.bin", hang_after_head(b"x" * 1_000_000, sent=100_000))
    client = await connect()
    task_id = (await client.call("tasks.download", {"urls": [url]}))["task_id"]
    # Daemon and server share this trio run: once everything is blocked, the download is
    # stuck in the middle of the body, waiting for bytes that never come.
    with trio.fail_after(10):
        while not http_server.requests_for("/slow.bin"):
            await trio.testing.wait_all_tasks_blocked()
        await trio.testing.wait_all_tasks_blocked()
    with trio.fail_after(1):
        assert await client.call("tasks.cancel", {"task_id": task_id}) == {"cancelled": True}
    task = await client.call("tasks.get", {"task_id": task_id})
    assert task["status"] == "cancelled"
    assert not list(daemon.config.download_dir.glob("*.part"))
    again = await client.request("tasks.cancel", {"task_id": task_id})
    assert again["error"]["code"] == -32003


async def test_unknown_task_is_not_found(daemon: Daemon, connect: Any) -> None:
    client = await connect()
    response = await client.request("tasks.get", {"task_id": "nope"})
    assert response["error"]["code"] == -32001


async def test_download_settings_change_on_reload(
    daemon: Daemon, connect: Any, http_server: HTTPTestServer
) -> None:
    """``[downloads]`` applies live on SIGHUP: here the size cap and the batch size."""
    url = http_server.route("/five-k.bin", serve_data(b"x" * 5000))
    new = attrs.evolve(
        daemon.config,
        downloads=attrs.evolve(daemon.config.downloads, max_file_bytes=1000, batch_size=1),
    )
    assert await daemon.reload(lambda: new)
    assert daemon.config.downloads == new.downloads
    client = await connect()
    await client.call("subscribe", {"tasks": "all", "status": True})
    task_id = (await client.call("tasks.download", {"urls": [url, url]}))["task_id"]
    task = await wait_for_end(client, task_id)
    assert task["status"] == "failed"
    assert [item["error"] for item in task["result"]["items"]] == [
        "file exceeds the size cap of 1000 bytes (downloads.max_file_bytes)"
    ] * 2
    # batch_size 1: two batches; the status messages went by before the end.
    recent = await client.call("status.recent")
    messages = [message["message"] for message in recent["messages"]]
    assert "Processing batch 2 of 2" in messages


async def test_the_journal_has_one_record_per_small_item(
    daemon: Daemon, connect: Any, http_server: HTTPTestServer
) -> None:
    """A file that fits one buffer has one record, with "done" and the result (a large
    one has another before its first write, tests/test_downloads.py); that the part is
    gone rides on a later record ("settled")."""
    urls = [http_server.route(f"/j{n}.bin", serve_data(bytes([n]) * 5000)) for n in range(3)]
    client = await connect()
    await client.call("subscribe", {"tasks": "all"})
    task_id = (await client.call("tasks.download", {"urls": urls, "batch_size": 1}))["task_id"]
    assert (await wait_for_end(client, task_id))["status"] == "completed"
    records = load(daemon.config.state_dir / "tasks.jsonl").records
    checkpoints = [record["data"] for record in records if record["op"] == "checkpoint"]
    assert [(c["item"], c["state"]["done"], "result" in c) for c in checkpoints] == [
        (0, True, True),
        (1, True, True),
        (2, True, True),
    ]
    assert [c.get("settled") for c in checkpoints] == [None, [0], [1]]
    assert checkpoints[0]["result"] == {
        "url": urls[0],
        "path": str(daemon.config.download_dir / "j0.bin"),
        "bytes": 5000,
        "sha256": None,
        "error": None,
    }


async def test_a_restart_removes_parts_of_items_done_but_not_settled(
    nursery: trio.Nursery, tmp_path: Path, http_server: HTTPTestServer
) -> None:
    """A crash between journalling "done" and removing the item's part: the next run
    removes the part (still linked to the file) and fetches nothing."""
    dest = tmp_path / "dest"
    dest.mkdir()
    part = part_name("a.bin", "t1-0")
    (dest / "a.bin").write_bytes(b"a" * 100)
    os.link(dest / "a.bin", dest / part)
    url = http_server.route("/a.bin", serve_data(b"a" * 100))
    state = {"name": "a.bin", "validator": '"v1"', "done": True, "part": part}
    result = {"url": url, "path": str(dest / "a.bin"), "bytes": 100, "sha256": None, "error": None}
    spec = {"items": [{"url": url}], "dest": str(dest), "batch_size": 10}
    streams = Streams(StatusChannel())
    manager = TaskManager(streams.status, streams.tasks, journal_path=None)
    await nursery.start(manager.serve)
    service = Downloads(make_config(tmp_path))
    job = service.job("t1", spec, [{"item": 0, "state": state, "result": result, "settle": True}])
    task_id = await manager.create_task("t", 1, kind="download", owner="alice")
    manager.run_task(task_id, job)
    task = await manager.wait_finished(task_id)
    assert task.status.value == "completed"
    assert task.bytes_done == 100
    assert sorted(path.name for path in dest.iterdir()) == ["a.bin"]
    assert http_server.requests_for("/a.bin") == []
