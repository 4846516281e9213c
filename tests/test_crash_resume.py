"""A real daemon process killed with SIGKILL mid-download and started again.

The HTTP server runs in the test's trio run, so it outlives both daemon processes and
sees every request either of them made. The large item's first answer sends part of the
body and then nothing more (a server throttled to a halt), so the kill always comes at
the same point: the small items are done and journalled, the large one has a partial
part file on disk and some more bytes in memory that the kill loses.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import trio

from statusd.downloads import part_name
from tests.http_servers import (
    HTTPTestServer,
    hang_after_head,
    hang_before_head,
    http_server,
    sequence,
    serve_data,
)
from tests.processes import FINISHED, download_dir, kill, start, task_of, until

__all__ = ["http_server"]

SMALL = {f"/small{n}.txt": f"small file {n}\n".encode() * (n + 1) for n in range(3)}
LARGE = random.Random(3).randbytes(3 << 20)
SENT_BEFORE_STALL = 1_300_000  # more than one receive buffer (1 MiB), so some reach disk


async def test_sigkill_mid_download_resumes_after_restart(
    daemon_process: Any, http_server: HTTPTestServer
) -> None:
    small_urls = [http_server.route(path, serve_data(data)) for path, data in SMALL.items()]
    large_url = http_server.route(
        "/large.bin",
        sequence(
            hang_after_head(LARGE, SENT_BEFORE_STALL, etag='"L1"'), serve_data(LARGE, etag='"L1"')
        ),
    )
    process = daemon_process()
    client = await start(process)
    dest = download_dir(process)
    items = [{"url": url} for url in [large_url, *small_urls]]
    task_id = (await client.call("tasks.download", {"items": items}))["task_id"]

    part = dest / part_name("large.bin", f"{task_id}-0")  # the large item's own part

    async def small_done_and_large_partly_on_disk() -> bool:
        task = await task_of(client, task_id)
        return task["processed_items"] == 3 and part.exists() and part.stat().st_size > 0

    await until(small_done_and_large_partly_on_disk)
    await kill(process, client)
    on_disk = part.stat().st_size
    assert 0 < on_disk < SENT_BEFORE_STALL  # the rest was in memory
    assert not (dest / "large.bin").exists()

    client = await start(process)  # the same state and download directories

    async def finished() -> bool:
        return (await task_of(client, task_id))["status"] in FINISHED

    await until(finished)
    task = await task_of(client, task_id)
    assert task["status"] == "completed", task
    assert task["processed_items"] == task["total_items"] == 4
    total = len(LARGE) + sum(map(len, SMALL.values()))
    assert (task["bytes_done"], task["bytes_total"]) == (total, total)
    assert [entry["error"] for entry in task["result"]["items"]] == [None] * 4

    for path, data in SMALL.items():
        assert len(http_server.requests_for(path)) == 1, path  # not fetched again
        assert (dest / path.lstrip("/")).read_bytes() == data
    first, second = http_server.requests_for("/large.bin")
    assert "range" not in first.headers
    assert second.headers["range"] == f"bytes={on_disk}-"
    assert second.headers["if-range"] == '"L1"'
    large = (dest / "large.bin").read_bytes()
    assert hashlib.sha256(large).digest() == hashlib.sha256(LARGE).digest()
    assert sorted(path.name for path in dest.iterdir()) == sorted(
        ["large.bin", *(path.lstrip("/") for path in SMALL)]
    )  # no part file, no numbered duplicates

    listed = await client.call("tasks.list")
    assert [entry["id"] for entry in listed["tasks"]] == [task_id]
    assert listed["summary"]["completed"] == 1
    await trio.aclose_forcefully(client.stream)


async def test_sigkill_right_after_the_task_was_created(
    daemon_process: Any, http_server: HTTPTestServer
) -> None:
    data = random.Random(4).randbytes(200_000)
    url = http_server.route("/later.bin", sequence(hang_before_head(), serve_data(data)))
    process = daemon_process()
    client = await start(process)
    task_id = (await client.call("tasks.download", {"urls": [url]}))["task_id"]

    async def asked() -> bool:
        return bool(http_server.requests_for("/later.bin"))

    await until(asked)  # the daemon is waiting for an answer: not a byte has come
    await kill(process, client)
    dest = download_dir(process)
    assert not dest.exists() or list(dest.iterdir()) == []

    client = await start(process)

    async def finished() -> bool:
        return (await task_of(client, task_id))["status"] in FINISHED

    await until(finished)
    task = await task_of(client, task_id)
    assert task["status"] == "completed", task
    assert (dest / "later.bin").read_bytes() == data
    assert list(dest.iterdir()) == [dest / "later.bin"]
    assert [request.headers.get("range") for request in http_server.requests_for("/later.bin")] == [
        None,
        None,
    ]
    await trio.aclose_forcefully(client.stream)
