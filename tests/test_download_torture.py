"""A torture test: a real daemon with several tasks whose files all want one name, killed
with SIGKILL at random moments 20 times and started again.

After every kill and restart: every acknowledged task is listed, and no two visible files
share an inode. At the end: every task completed, every result holds exactly its own
bytes (sha256), no part file is left, and no item the journal had as done was requested
again (the server counts requests). Bounded: the kills come within a second of each
start, and the server sends slowly enough that they land mid-transfer.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from tests.conftest import DaemonProcess, RawClient
from tests.http_servers import HTTPTestServer, Request, Responder, http_server

__all__ = ["http_server"]

KILLS = 20
# Each task's item sizes; the tasks come in waves, so that new ones collide with old ones
# all through the run: after the start, after the 7th restart, after the 14th.
SIZES = [
    (40_000, 4_500_000),
    (2_500_000, 70_000),
    (5_000_000, 900_000),
    (3_000_000, 10_000),
    (1_200_000, 2_200_000),
]
WAVES = {0: [0, 1, 2], 7: [3], 14: [4]}
BLOCK = 64 * 1024
FINISHED = ("completed", "failed", "cancelled")
POLL_LIMIT = 30.0
_RANGE_PREFIX = "bytes="


def throttled(data: bytes, etag: str) -> Callable[[Request, Responder], Awaitable[None]]:
    """Serve ``data`` in small blocks with pauses, honouring Range with If-Range."""

    async def handler(request: Request, responder: Responder) -> None:
        headers = [("ETag", etag), ("Accept-Ranges", "bytes")]
        first = 0
        asked = request.headers.get("range", "")
        if asked.startswith(_RANGE_PREFIX) and request.headers.get("if-range") == etag:
            first = int(asked[len(_RANGE_PREFIX) :].rstrip("-"))
            if first >= len(data):
                await responder.send(416, [*headers, ("Content-Range", f"bytes */{len(data)}")])
                return
            headers.append(("Content-Range", f"bytes {first}-{len(data) - 1}/{len(data)}"))
        body = data[first:]
        await responder.send_head(
            206 if first else 200, [*headers, ("Content-Length", str(len(body)))]
        )
        for start in range(0, len(body), BLOCK):
            await responder.send_raw(body[start : start + BLOCK])
            await trio.sleep(0.03)  # about 2 MB/s: a 1 MiB buffer fills in half a second

    return handler


async def start(process: DaemonProcess) -> RawClient:
    await trio.to_thread.run_sync(process.start)
    return await RawClient.connect(process.socket)


async def kill(process: DaemonProcess, client: RawClient) -> None:
    await trio.aclose_forcefully(client.stream)
    process.signal(signal.SIGKILL)
    assert await trio.to_thread.run_sync(process.wait) == -signal.SIGKILL


def done_items(process: DaemonProcess) -> set[tuple[str, int]]:
    """(task id, item index) of every item the journal has as done; a torn last line (the
    kill came mid-write) is skipped, as the daemon skips it."""
    path = process.directory / "state" / "tasks.jsonl"
    if not path.exists():
        return set()
    done = set()
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)[1]
        except (ValueError, IndexError, TypeError):
            continue
        if record.get("op") == "checkpoint":
            pairs = [(record["id"], record["data"])]
        elif record.get("op") == "create":
            pairs = [(record["task"]["id"], data) for data in record.get("checkpoints", [])]
        else:
            continue
        for task_id, data in pairs:
            if data.get("state", {}).get("done"):
                done.add((task_id, data["item"]))
    return done


def visible_files(dest: Path) -> list[os.DirEntry[str]]:
    if not dest.exists():
        return []
    return [entry for entry in os.scandir(dest) if not entry.name.startswith(".")]


async def test_sigkill_at_random_moments_never_mixes_or_refetches_files(
    daemon_process: Any, http_server: HTTPTestServer
) -> None:
    chance = random.Random(2026)
    data: dict[str, bytes] = {}
    tasks: list[list[str]] = []  # the paths of each task's items
    for number, sizes in enumerate(SIZES):
        paths = []
        for index, size in enumerate(sizes):
            path = f"/t{number}/i{index}"
            data[path] = chance.randbytes(size)
            http_server.route(path, throttled(data[path], f'"{number}-{index}"'))
            paths.append(path)
        tasks.append(paths)

    process = daemon_process()
    client = await start(process)
    dest = process.directory / "state" / "downloads"
    task_ids: list[str] = []  # acknowledged, in the order of ``tasks``
    owner_of: dict[tuple[str, int], str] = {}
    requests_when_done: dict[str, int] = {}

    for run in range(KILLS):
        for number in WAVES.get(run, []):
            items = [
                {"url": http_server.url(path), "filename": "same.bin"} for path in tasks[number]
            ]
            task_id = (await client.call("tasks.download", {"items": items}))["task_id"]
            task_ids.append(task_id)
            owner_of.update({(task_id, index): path for index, path in enumerate(tasks[number])})
        await trio.sleep(chance.uniform(0.1, 1.0))
        await kill(process, client)
        for key in done_items(process):
            path = owner_of[key]
            requests_when_done.setdefault(path, len(http_server.requests_for(path)))
        inodes = [entry.inode() for entry in visible_files(dest)]
        assert len(set(inodes)) == len(inodes), sorted(os.listdir(dest))
        client = await start(process)
        listed = await client.call("tasks.list")
        assert sorted(task["id"] for task in listed["tasks"]) == sorted(task_ids)

    with trio.fail_after(POLL_LIMIT):
        while True:
            listed = (await client.call("tasks.list"))["tasks"]
            if all(task["status"] in FINISHED for task in listed):
                break
            await trio.sleep(0.02)
    await trio.aclose_forcefully(client.stream)

    results = []
    for task in listed:
        assert task["status"] == "completed", task
        paths = tasks[task_ids.index(task["id"])]
        for path, item in zip(paths, task["result"]["items"], strict=True):
            content = Path(item["path"]).read_bytes()
            assert hashlib.sha256(content).digest() == hashlib.sha256(data[path]).digest(), path
            results.append(item["path"])
    assert len({os.stat(path).st_ino for path in results}) == len(results) == len(data)
    assert len(task_ids) == len(tasks)
    assert sorted(os.listdir(dest)) == sorted(Path(path).name for path in results)  # no part
    for path, count in requests_when_done.items():
        assert len(http_server.requests_for(path)) == count, path  # not fetched again
