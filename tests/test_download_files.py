"""A task's files are its own, against a real daemon process: two tasks whose files share
a name (across a SIGKILL, and across a cancel), a 416 for a part that holds the whole
file, a ``dest`` swapped for a symlink while its task waits in the queue, and the
``batch_size`` range.

The HTTP servers run in the test's trio run, so they outlive the daemon processes and
count every request.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import pytest
import trio

from statusd.downloads import DestError, open_dest
from tests.http_servers import (
    HTTPTestServer,
    chunked_cut_before_last_chunk,
    hang_after_head,
    held,
    http_server,
    sequence,
    serve_data,
)
from tests.processes import download_dir, finished, kill, start, task_of, until

__all__ = ["http_server"]

A_DATA = random.Random(10).randbytes(3 << 20)
B_DATA = random.Random(11).randbytes(3 << 20)
B_SENT = 1_300_000  # more than one receive buffer (1 MiB): B's part is on disk
A_SENT = 100_000  # less than one buffer: A has a name (in memory only), no part file yet


def parts_with_data(dest: Path) -> list[str]:
    return [
        entry.name
        for entry in os.scandir(dest)
        if entry.name.endswith(".part") and entry.stat().st_size > 0
    ]


async def a_held_and_b_on_disk(
    client: Any, server: HTTPTestServer, a_id: str, a_held: int, dest: Path
) -> None:
    """Wait until A's request is answered and A holds ``a_held`` bytes (in memory: less
    than a buffer, so no part file and no journal record), and B's part holds data."""

    async def ready() -> bool:
        if not server.requests_for("/a/big.iso"):
            return False
        held = (await task_of(client, a_id))["bytes_done"] == a_held
        return held and dest.exists() and bool(parts_with_data(dest))

    await until(ready)


def sha(path: str) -> bytes:
    return hashlib.sha256(Path(path).read_bytes()).digest()


def check_results(tasks: list[dict[str, Any]], data: list[bytes], dest: Path) -> None:
    """Every task completed with exactly its own bytes, in a file of its own, and no part
    file is left."""
    paths = []
    for task, expected in zip(tasks, data, strict=True):
        assert task["status"] == "completed", task
        (item,) = task["result"]["items"]
        assert sha(item["path"]) == hashlib.sha256(expected).digest(), item
        paths.append(item["path"])
    inodes = {os.stat(path).st_ino for path in paths}
    assert len(inodes) == len(paths), paths  # no two results share an inode
    assert sorted(os.listdir(dest)) == sorted(Path(path).name for path in paths)


async def test_a_task_never_resumes_into_another_tasks_part_after_sigkill(
    daemon_process: Any, http_server: HTTPTestServer
) -> None:
    """B streams to its part; A has the same name (in memory) but no part yet. After
    kill -9 and a restart, A must not take B's part for its own."""
    a_url = http_server.route(
        "/a/big.iso", sequence(hang_after_head(A_DATA, A_SENT), serve_data(A_DATA))
    )
    b_url = http_server.route(
        "/b/big.iso", sequence(hang_after_head(B_DATA, B_SENT), serve_data(B_DATA))
    )
    process = daemon_process()
    client = await start(process)
    dest = download_dir(process)
    b_id = (await client.call("tasks.download", {"urls": [b_url]}))["task_id"]
    a_id = (await client.call("tasks.download", {"urls": [a_url]}))["task_id"]

    await a_held_and_b_on_disk(client, http_server, a_id, A_SENT, dest)
    await kill(process, client)

    client = await start(process)
    a_task = await finished(client, a_id)
    b_task = await finished(client, b_id)
    check_results([a_task, b_task], [A_DATA, B_DATA], dest)
    # B resumed where it stopped; A never asked for a range (it had nothing on disk).
    b_ranges = [request.headers.get("range") for request in http_server.requests_for("/b/big.iso")]
    assert b_ranges[0] is None
    assert b_ranges[1] is not None
    assert [request.headers.get("range") for request in http_server.requests_for("/a/big.iso")] == [
        None,
        None,
    ]
    await trio.aclose_forcefully(client.stream)


async def test_cancelling_a_task_leaves_another_tasks_part_alone(
    daemon_process: Any, http_server: HTTPTestServer
) -> None:
    """A (named, no part yet, no data in memory) is cancelled while B streams under the
    same name: B's part stays and B completes."""
    release = trio.Event()
    a_url = http_server.route("/a/big.iso", hang_after_head(A_DATA, 0))
    b_url = http_server.route("/b/big.iso", held(B_DATA, B_SENT, release))
    process = daemon_process()
    client = await start(process)
    dest = download_dir(process)
    b_id = (await client.call("tasks.download", {"urls": [b_url]}))["task_id"]
    a_id = (await client.call("tasks.download", {"urls": [a_url]}))["task_id"]

    await a_held_and_b_on_disk(client, http_server, a_id, 0, dest)
    assert await client.call("tasks.cancel", {"task_id": a_id}) == {"cancelled": True}
    assert (await finished(client, a_id))["status"] == "cancelled"
    release.set()
    b_task = await finished(client, b_id)
    check_results([b_task], [B_DATA], dest)
    await trio.aclose_forcefully(client.stream)


async def test_a_416_for_a_whole_part_completes_the_task(
    daemon_process: Any, http_server: HTTPTestServer
) -> None:
    """The chunked body arrived whole but the connection broke before the last chunk; the
    resume gets 416 ``bytes */N``: the task completes with the file (its sha256 checked),
    rather than fail and remove it."""
    url = http_server.route("/whole.bin", chunked_cut_before_last_chunk(A_DATA))
    process = daemon_process()
    client = await start(process)
    item = {"url": url, "sha256": hashlib.sha256(A_DATA).hexdigest()}
    task_id = (await client.call("tasks.download", {"items": [item]}))["task_id"]
    task = await finished(client, task_id)
    check_results([task], [A_DATA], download_dir(process))
    ranges = [request.headers.get("range") for request in http_server.requests_for("/whole.bin")]
    assert ranges == [None, f"bytes={len(A_DATA)}-"]
    await trio.aclose_forcefully(client.stream)


async def test_a_dest_swapped_for_a_symlink_before_the_task_runs_writes_nothing_outside(
    daemon_process: Any, http_server: HTTPTestServer
) -> None:
    """The task is queued into ``mydir`` (one task runs at a time, and the first one is
    held); ``mydir`` becomes a symlink to a directory outside; then the task runs."""
    release = trio.Event()
    first_url = http_server.route("/first.bin", held(B_DATA, 1000, release))
    url = http_server.route("/payload.sh", serve_data(b"#!/bin/sh\necho owned\n"))
    process = daemon_process()
    config = process.directory / "statusd.toml"
    config.write_text("max_running_tasks = 1\n")
    client = await start(process, "--config", str(config))
    dest = download_dir(process)
    (dest / "mydir").mkdir(parents=True)
    outside = process.directory / "outside"
    outside.mkdir()
    first_id = (await client.call("tasks.download", {"urls": [first_url]}))["task_id"]
    task_id = (await client.call("tasks.download", {"urls": [url], "dest": "mydir"}))["task_id"]
    assert (await task_of(client, task_id))["status"] == "pending"

    (dest / "mydir").rename(dest / "elsewhere")
    (dest / "mydir").symlink_to(outside)
    release.set()
    assert (await finished(client, first_id))["status"] == "completed"
    task = await finished(client, task_id)
    assert task["status"] == "failed", task
    assert "symlink" in task["error"], task["error"]
    assert "mydir" in task["error"], task["error"]
    assert list(outside.iterdir()) == []
    assert list((dest / "elsewhere").iterdir()) == []
    assert http_server.requests_for("/payload.sh") == []
    await trio.aclose_forcefully(client.stream)


async def test_batch_size_zero_is_refused(daemon_process: Any, http_server: HTTPTestServer) -> None:
    url = http_server.route("/x.bin", serve_data(b"x"))
    process = daemon_process()
    client = await start(process)
    for size in (0, 1001):
        response = await client.request("tasks.download", {"urls": [url], "batch_size": size})
        assert response["error"]["code"] == -32602, response
        assert response["error"]["data"]["field"] == "batch_size"
        assert "1 to 1000" in response["error"]["message"], response
    assert (await client.call("tasks.list"))["tasks"] == []
    await trio.aclose_forcefully(client.stream)


def test_open_dest_creates_missing_directories_and_follows_no_symlink(tmp_path: Path) -> None:
    root = tmp_path / "downloads"
    outside = tmp_path / "outside"
    outside.mkdir()
    directory = open_dest(root, "a/b")
    try:
        assert directory.path == f"{root}/a/b"
        os.mkdir("c", dir_fd=directory.fd)
    finally:
        directory.close()
    assert (root / "a" / "b" / "c").is_dir()
    (root / "a" / "link").symlink_to(outside)
    (root / "a" / "file").write_bytes(b"")
    for dest in ("a/link", "a/link/deeper", "a/file"):
        with pytest.raises(DestError, match="is a symlink or not a directory"):
            open_dest(root, dest)
    with pytest.raises(DestError, match=r"must not contain '\.\.'"):
        open_dest(root, "a/../..")
    with pytest.raises(DestError, match="does not exist"):
        open_dest(root, "missing", create=False)
    assert list(outside.iterdir()) == []


def test_open_dest_walks_an_absolute_dest_from_the_root(tmp_path: Path) -> None:
    """An admin's dest outside the download directory, journalled as an absolute path."""
    directory = open_dest(tmp_path / "downloads", str(tmp_path / "elsewhere"))
    try:
        assert directory.path == str(tmp_path / "elsewhere")
    finally:
        directory.close()
    assert (tmp_path / "elsewhere").is_dir()
