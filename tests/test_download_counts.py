"""A download task's counts kept as items change (not recounted per item), and its items
taken by ``parallel_items`` workers: a real daemon and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

from typing import Any

import attrs
import trio

from statusd.daemon import Daemon
from tests.http_servers import (
    HTTPTestServer,
    Request,
    Responder,
    http_server,
    sequence,
    serve_data,
    status,
)
from tests.test_download_tasks import wait_for_end

__all__ = ["http_server"]


async def test_counts_follow_a_failure_and_its_retry(
    daemon: Daemon, connect: Any, http_server: HTTPTestServer
) -> None:
    sizes = [1000, 2000, 3000]
    urls = [
        http_server.route("/a.bin", serve_data(b"a" * sizes[0])),
        http_server.route("/b.bin", sequence(status(404), serve_data(b"b" * sizes[1]))),
        http_server.route("/c.bin", serve_data(b"c" * sizes[2])),
    ]
    client = await connect()
    await client.call("subscribe", {"tasks": "all"})
    task_id = (await client.call("tasks.download", {"urls": urls, "batch_size": 2}))["task_id"]
    task = await wait_for_end(client, task_id)
    assert task["status"] == "failed"
    # A failed item is processed and holds nothing; the others' sizes are all known.
    assert (task["processed_items"], task["bytes_done"], task["bytes_total"]) == (3, 4000, 4000)
    # The retry rebuilds the job from the journal: two items completed, one to fetch again.
    await client.call("tasks.retry", {"task_id": task_id})
    task = await wait_for_end(client, task_id)
    assert task["status"] == "completed"
    assert (task["processed_items"], task["bytes_done"], task["bytes_total"]) == (3, 6000, 6000)
    assert task["progress"] == 100.0


async def test_items_are_fetched_parallel_items_at_a_time(
    daemon: Daemon, connect: Any, http_server: HTTPTestServer
) -> None:
    parallel, count = 3, 10
    new = attrs.evolve(
        daemon.config, downloads=attrs.evolve(daemon.config.downloads, parallel_items=parallel)
    )
    assert await daemon.reload(lambda: new)
    active, most = 0, 0
    all_in = trio.Event()  # the first ``parallel`` requests wait for each other

    async def counted(request: Request, responder: Responder) -> None:
        nonlocal active, most
        active += 1
        most = max(most, active)
        if active == parallel:
            all_in.set()
        try:
            await all_in.wait()
            await serve_data(b"x" * 500)(request, responder)
        finally:
            active -= 1

    urls = [http_server.route(f"/p{n}.bin", counted) for n in range(count)]
    client = await connect()
    await client.call("subscribe", {"tasks": "all"})
    answer = await client.call("tasks.download", {"urls": urls, "batch_size": 4})
    task = await wait_for_end(client, answer["task_id"])
    assert task["status"] == "completed"
    assert task["processed_items"] == count
    assert most == parallel
    assert sorted(path.name for path in daemon.config.download_dir.iterdir()) == sorted(
        f"p{n}.bin" for n in range(count)
    )
