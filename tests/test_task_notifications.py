"""A task's end notifies its owner: a real daemon, a real HTTP server on 127.0.0.1."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from statusd.daemon import Daemon
from tests.http_servers import HTTPTestServer, hang_after_head, http_server, serve_data, status

__all__ = ["http_server"]


async def notification_for(client: Any, task_id: str) -> dict[str, Any]:
    """Wait for the ``notification`` push about ``task_id``, then for the task's own end."""
    found: dict[str, Any] | None = None
    ended = False
    with trio.fail_after(20):
        while found is None or not ended:
            message = await client.receive()
            params = message.get("params", {})
            if message.get("method") == "notification" and params["link"].endswith(task_id):
                found = params
            elif message.get("method") == "task_update" and params.get("job_id") == task_id:
                ended = params["status"] in ("completed", "error", "cancelled")
    return found


async def subscribed(connect: Any) -> Any:
    client = await connect()
    await client.call("subscribe", {"notifications": True, "tasks": "all"})
    return client


async def test_a_completed_download_notifies_its_owner(
    daemon: Daemon, connect: Any, http_server: HTTPTestServer
) -> None:
    urls = [http_server.route(f"/f{n}.bin", serve_data(b"x" * 1000)) for n in range(2)]
    client = await subscribed(connect)
    task_id = (await client.call("tasks.download", {"urls": urls}))["task_id"]
    pushed = await notification_for(client, task_id)
    me = (await client.call("daemon.info"))["user"]
    task = await client.call("tasks.get", {"task_id": task_id})
    assert task["status"] == "completed"
    assert pushed["username"] == me
    assert pushed["type"] == "task_completed"
    assert pushed["title"] == f"Task completed: {task['name']}"
    assert pushed["message"] == "2 of 2 items done."
    assert pushed["link"] == f"statusd://tasks/{task_id}"
    assert pushed["read"] is False
    [stored] = (await client.call("notifications.list"))["notifications"]
    assert stored == pushed


async def test_a_failed_download_says_how_many_items_failed(
    daemon: Daemon, connect: Any, http_server: HTTPTestServer
) -> None:
    ok = http_server.route("/ok.txt", serve_data(b"fine"))
    missing = http_server.route("/missing.txt", status(404))
    gone = http_server.route("/gone.txt", status(410))
    client = await subscribed(connect)
    task_id = (await client.call("tasks.download", {"urls": [ok, missing, gone]}))["task_id"]
    pushed = await notification_for(client, task_id)
    assert (await client.call("tasks.get", {"task_id": task_id}))["status"] == "failed"
    assert pushed["type"] == "task_failed"
    assert pushed["title"].startswith("Task failed: ")
    assert pushed["message"] == "2 of 3 items failed."


async def test_a_cancelled_download_notifies_too(
    daemon: Daemon, connect: Any, http_server: HTTPTestServer
) -> None:
    url = http_server.route("/slow.bin", hang_after_head(b"x" * 1_000_000, sent=100_000))
    client = await subscribed(connect)
    task_id = (await client.call("tasks.download", {"urls": [url]}))["task_id"]
    with trio.fail_after(10):
        while not http_server.requests_for("/slow.bin"):
            await trio.testing.wait_all_tasks_blocked()
    # From another connection: a call's answer is read past any pushes before it.
    await (await connect()).call("tasks.cancel", {"task_id": task_id})
    pushed = await notification_for(client, task_id)
    assert pushed["type"] == "task_cancelled"
    assert pushed["message"] == "Cancelled after 0 of 1 items."
    assert (await client.call("notifications.unread_count")) == {"count": 1}
