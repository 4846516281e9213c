"""The task lifecycle against a real daemon process: concurrent cancels, shutdown with a
queue, concurrent cleanups, a full state directory, and pause, resume and retry.

The HTTP server runs in the test's trio run; a handler that announces a body and then
goes silent keeps a task running for as long as the test needs it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from statusd.protocol import jsonrpc
from statusd.store import load
from tests.conftest import DaemonProcess, RawClient, needs_root, nobody_may_connect
from tests.http_servers import (
    HTTPTestServer,
    hang_after_head,
    http_server,
    sequence,
    serve_data,
    status,
)
from tests.processes import FINISHED, kill, start, task_of, until

__all__ = ["http_server"]

DATA = random.Random(10).randbytes(300_000)


async def asked_once(server: HTTPTestServer, path: str) -> None:
    """Wait until the daemon's first request for ``path`` has reached the server (a task is
    running a moment before its request goes out)."""

    async def asked() -> bool:
        return len(server.requests_for(path)) == 1

    await until(asked)


def one_slot_config(directory: Path) -> Path:
    path = directory / "statusd.toml"
    # nobody may reach the socket, for the per-user test.
    path.write_text("max_running_tasks = 1\n" + nobody_may_connect())
    return path


async def download(client: RawClient, url: str, **params: Any) -> str:
    task_id: str = (await client.call("tasks.download", {"urls": [url], **params}))["task_id"]
    return task_id


async def wait_status(client: RawClient, task_id: str, *statuses: str) -> dict[str, Any]:
    async def reached() -> bool:
        return (await task_of(client, task_id))["status"] in statuses

    await until(reached)
    return await task_of(client, task_id)


async def batch(client: RawClient, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Send ``requests`` as one JSON-RPC batch (one line) and return the answers by id."""
    await client.send(json.dumps(requests).encode() + b"\n")
    answers: list[dict[str, Any]] = await client.receive()
    assert isinstance(answers, list), answers
    return sorted(answers, key=lambda answer: answer["id"])


def cancel_request(task_id: str, request_id: int) -> dict[str, Any]:
    return jsonrpc.request("tasks.cancel", {"task_id": task_id}, request_id)


def journal_statuses(process: DaemonProcess, state_dir: Path | None = None) -> dict[str, list[str]]:
    """Every status each task was journalled in, in order."""
    path = (state_dir or process.directory / "state") / "tasks.jsonl"
    seen: dict[str, list[str]] = {}
    for record in load(path).records:
        if record["op"] == "create":
            seen.setdefault(record["task"]["id"], []).append(record["task"]["status"])
        elif record["op"] == "update" and "status" in record["set"]:
            seen.setdefault(record["id"], []).append(record["set"]["status"])
    return seen


# -- defect 1: one finish path ------------------------------------------------------------------


async def test_a_batch_cancelling_the_running_and_the_queued_task_keeps_the_daemon_up(
    daemon_process: Any, http_server: HTTPTestServer
) -> None:
    """Cancelling the running task starts the queued one; cancelling that one next, in
    the same batch, used to finish it twice (IllegalTransition) and end the daemon."""
    url = http_server.route("/hang.bin", hang_after_head(DATA, 1000))
    process = daemon_process()
    client = await start(process, "--config", str(one_slot_config(process.directory)))
    for _ in range(5):  # it used to fail about half the time: five rounds make it sure
        running = await download(client, url)
        queued = await download(client, url)
        await wait_status(client, running, "running")
        answers = await batch(client, [cancel_request(running, 1), cancel_request(queued, 2)])
        assert [answer.get("result") for answer in answers] == [{"cancelled": True}] * 2, answers
        for task_id in (running, queued):
            assert (await task_of(client, task_id))["status"] == "cancelled"
    assert process.process is not None
    assert process.process.poll() is None
    info = await client.call("daemon.info")
    assert info["tasks"]["cancelled"] == 10
    assert info["tasks"]["running"] == info["tasks"]["pending"] == 0
    await trio.aclose_forcefully(client.stream)


async def test_two_concurrent_cancels_of_a_queued_task_end_it_once(
    daemon_process: Any, http_server: HTTPTestServer
) -> None:
    url = http_server.route("/hang.bin", hang_after_head(DATA, 1000))
    process = daemon_process()
    client = await start(process, "--config", str(one_slot_config(process.directory)))
    running = await download(client, url)
    queued = await download(client, url)
    await wait_status(client, running, "running")
    other = await RawClient.connect(process.socket)
    line = jsonrpc.encode_line(cancel_request(queued, 7))
    # Both requests are on the wire before either is answered.
    await client.send(line)
    await other.send(line)
    answers = [await client.receive(), await other.receive()]
    # Each either cancels it (the second waits for the same end) or finds it cancelled.
    for answer in answers:
        assert answer.get("result") == {"cancelled": True} or answer["error"]["code"] == -32003
    assert (await task_of(client, queued))["status"] == "cancelled"
    inbox = await client.call("notifications.list", {"limit": 100})
    ends = [n for n in inbox["notifications"] if n["link"].endswith(queued)]
    assert [n["title"].split(":")[0] for n in ends] == ["Task cancelled"]
    assert (await task_of(client, running))["status"] == "running"
    await trio.aclose_forcefully(other.stream)
    await trio.aclose_forcefully(client.stream)


# -- defect 8: shutdown and cleanup -------------------------------------------------------------


async def test_a_stop_starts_none_of_the_queued_tasks(
    daemon_process: Any, http_server: HTTPTestServer
) -> None:
    url = http_server.route("/hang.bin", hang_after_head(DATA, 1000))
    process = daemon_process()
    client = await start(process, "--config", str(one_slot_config(process.directory)))
    running = await download(client, url)
    await asked_once(http_server, "/hang.bin")  # it holds the one slot
    requests = [
        jsonrpc.request("tasks.download", {"urls": [url]}, n) for n in range(1, 61)
    ]  # one batch: the queue is full before the stop
    queued = [answer["result"]["task_id"] for answer in await batch(client, requests)]
    await trio.aclose_forcefully(client.stream)
    process.signal(signal.SIGTERM)
    assert await trio.to_thread.run_sync(process.wait) == 0
    journalled = journal_statuses(process)
    assert journalled[running] == ["pending", "running"]
    assert {task_id: journalled[task_id] for task_id in queued} == {
        task_id: ["pending"] for task_id in queued
    }
    assert len(http_server.requests_for("/hang.bin")) == 1


async def test_concurrent_cleanups_remove_each_task_once(
    daemon_process: Any, http_server: HTTPTestServer
) -> None:
    url = http_server.route("/small.txt", serve_data(b"small\n"))
    process = daemon_process()
    client = await start(process)
    ids = [await download(client, url) for _ in range(8)]
    for task_id in ids:
        await wait_status(client, task_id, *FINISHED)
    await trio.sleep(0.05)  # older than the cleanup's 0.00001 hours (36 ms)
    others = [await RawClient.connect(process.socket) for _ in range(3)]
    line = jsonrpc.encode_line(jsonrpc.request("tasks.cleanup", {"max_age_hours": 1e-5}, 1))
    for connection in (client, *others):
        await connection.send(line)
    answers = [await connection.receive() for connection in (client, *others)]
    assert all("result" in answer for answer in answers), answers
    assert sum(answer["result"]["removed"] for answer in answers) == 8
    assert (await client.call("tasks.list"))["tasks"] == []
    for connection in others:
        await trio.aclose_forcefully(connection.stream)
    await trio.aclose_forcefully(client.stream)


# -- defect 4: nothing acknowledged that is not durable -----------------------------------------


def fill(directory: Path) -> Path:
    """Write a filler file until the file system under ``directory`` is full."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return filler


async def test_a_cancel_that_cannot_be_journalled_is_refused_and_nothing_moves(
    daemon_process: Any, http_server: HTTPTestServer, mount_tmpfs: Any, short_tmp: Path
) -> None:
    state = mount_tmpfs("2m")
    downloads = short_tmp / "downloads"
    config = one_slot_config(short_tmp)  # the padding tasks below stay queued
    flags = ("--state-dir", str(state), "--download-dir", str(downloads), "--config", str(config))
    url = http_server.route("/hang.bin", hang_after_head(DATA, 1000))
    process = daemon_process()
    client = await start(process, *flags)
    task_id = await download(client, url)
    await wait_status(client, task_id, "running")

    async def stalled() -> bool:
        # Its 1,000 bytes fit one buffer: held in memory, the item writes no record until
        # the rest comes (never).
        return bool((await task_of(client, task_id))["bytes_done"] == 1000)

    await until(stalled)
    await align_journal(client, state / "tasks.jsonl", http_server.route("/pad", status(404)))
    filler = await trio.to_thread.run_sync(fill, state)

    for method in ("tasks.cancel", "tasks.pause"):
        answer = await client.request(method, {"task_id": task_id})
        assert answer["error"]["code"] == -32603, answer
        message = answer["error"]["message"]
        assert "could not record the change in" in message
        assert "no space left on device" in message
        assert (await task_of(client, task_id))["status"] == "running"

    filler.unlink()
    assert await client.call("tasks.cancel", {"task_id": task_id}) == {"cancelled": True}
    assert (await task_of(client, task_id))["status"] == "cancelled"
    await kill(process, client)
    client = await start(process, *flags)
    await trio.sleep(0.2)  # a resumed task would have asked the server again by now
    assert (await task_of(client, task_id))["status"] == "cancelled"
    assert len(http_server.requests_for("/hang.bin")) == 1
    assert journal_statuses(process, state)[task_id][-1] == "cancelled"
    await trio.aclose_forcefully(client.stream)


async def align_journal(client: RawClient, journal: Path, url: str) -> None:
    """Make the journal end on a block boundary, so that, once the disk is full, every
    append needs a new block and fails (a file's last block has room a filler cannot
    take). A queued task with a chosen name is a record of a chosen length."""
    block = os.statvfs(journal.parent).f_bsize
    before = journal.stat().st_size
    await download(client, url, name="x")
    overhead = journal.stat().st_size - before - 1
    size = journal.stat().st_size
    length = -(size + overhead) % block or block
    await download(client, url, name="x" * length)
    assert journal.stat().st_size % block == 0


async def test_an_acknowledged_cancel_survives_a_kill_before_the_task_ended(
    daemon_process: Any, http_server: HTTPTestServer
) -> None:
    """The cancel is journalled before it is answered; a kill right after the answer
    (before the run recorded the end) must not run the task again."""
    url = http_server.route("/hang.bin", hang_after_head(DATA, 1000))
    process = daemon_process()
    client = await start(process)
    task_id = await download(client, url)
    await asked_once(http_server, "/hang.bin")  # the one request a restart must not repeat
    await client.call("tasks.cancel", {"task_id": task_id})
    await kill(process, client)
    path = process.directory / "state" / "tasks.jsonl"
    records = load(path).records
    assert {"op": "cancel", "id": task_id} in records
    # Cut the journal back to just after the request, as if the kill had come then.
    cut = records[: records.index({"op": "cancel", "id": task_id}) + 1]
    path.unlink()
    await _write_journal(path, cut)
    client = await start(process)
    task = await wait_status(client, task_id, *FINISHED)
    assert task["status"] == "cancelled"
    assert len(http_server.requests_for("/hang.bin")) == 1
    await trio.aclose_forcefully(client.stream)


async def _write_journal(path: Path, records: list[Any]) -> None:
    from statusd.store import open_store

    store, _ = await open_store(path)
    await store.append_many(records)
    await store.aclose()


# -- pause, resume, retry -----------------------------------------------------------------------


def _stall_then_serve(data: bytes, sent: int) -> Any:
    """The first answer sends ``sent`` bytes and stalls; later ones honour Range."""
    return sequence(hang_after_head(data, sent, etag='"P1"'), serve_data(data, etag='"P1"'))


async def test_pause_keeps_the_part_and_resume_continues_with_a_range(
    daemon_process: Any, http_server: HTTPTestServer
) -> None:
    big = random.Random(11).randbytes(3 << 20)
    url = http_server.route("/big.bin", _stall_then_serve(big, 1_300_000))
    other_url = http_server.route("/other.txt", serve_data(b"other\n"))
    process = daemon_process()
    client = await start(process, "--config", str(one_slot_config(process.directory)))
    task_id = await download(client, url)
    dest = process.directory / "state" / "downloads"

    async def partly_on_disk() -> bool:
        parts = [p for p in dest.iterdir() if p.name.endswith(".part")] if dest.exists() else []
        return bool(parts) and parts[0].stat().st_size > 0

    await until(partly_on_disk)
    queued = await download(client, other_url)
    assert await client.call("tasks.pause", {"task_id": task_id}) == {"paused": True}
    # The slot was given up at once: the queued task runs (and here finishes).
    assert (await wait_status(client, queued, *FINISHED))["status"] == "completed"
    assert (await task_of(client, task_id))["status"] == "paused"
    listed = await client.call("tasks.list", {"status": "paused"})
    assert [task["id"] for task in listed["tasks"]] == [task_id]
    assert listed["summary"]["paused"] == 1
    assert [p.name for p in dest.iterdir() if p.name.endswith(".part")]  # kept

    # A paused task stays paused over a restart (even a kill).
    await kill(process, client)
    client = await start(process, "--config", str(one_slot_config(process.directory)))
    await trio.sleep(0.2)
    assert (await task_of(client, task_id))["status"] == "paused"
    assert len(http_server.requests_for("/big.bin")) == 1
    conflict = await client.request("tasks.pause", {"task_id": task_id})
    assert conflict["error"]["code"] == -32003

    assert await client.call("tasks.resume", {"task_id": task_id}) == {"resumed": True}
    task = await wait_status(client, task_id, *FINISHED)
    assert task["status"] == "completed", task
    _first, second = http_server.requests_for("/big.bin")
    assert second.headers["range"].startswith("bytes=")
    assert second.headers["range"] != "bytes=0-"
    assert second.headers["if-range"] == '"P1"'
    path = Path(task["result"]["items"][0]["path"])
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(big).digest()
    assert not [p for p in dest.iterdir() if p.name.endswith(".part")]
    await trio.aclose_forcefully(client.stream)


async def test_retry_fetches_only_the_items_that_did_not_complete(
    daemon_process: Any, http_server: HTTPTestServer
) -> None:
    good_url = http_server.route("/good.txt", serve_data(b"good\n"))
    flaky_url = http_server.route("/flaky.txt", sequence(status(404), serve_data(b"late\n")))
    process = daemon_process()
    client = await start(process)
    items = [{"url": good_url}, {"url": flaky_url}]
    task_id = (await client.call("tasks.download", {"items": items}))["task_id"]
    assert (await wait_status(client, task_id, *FINISHED))["status"] == "failed"
    conflict = await client.request("tasks.resume", {"task_id": task_id})
    assert conflict["error"]["code"] == -32003

    assert await client.call("tasks.retry", {"task_id": task_id}) == {"task_id": task_id}
    task = await wait_status(client, task_id, *FINISHED)
    assert task["status"] == "completed", task
    assert task["error"] is None
    assert [entry["error"] for entry in task["result"]["items"]] == [None, None]
    assert len(http_server.requests_for("/good.txt")) == 1  # not fetched again
    assert len(http_server.requests_for("/flaky.txt")) == 2
    dest = process.directory / "state" / "downloads"
    assert (dest / "good.txt").read_bytes() == b"good\n"
    assert (dest / "flaky.txt").read_bytes() == b"late\n"
    # A completed task is final.
    conflict = await client.request("tasks.retry", {"task_id": task_id})
    assert conflict["error"]["code"] == -32003
    # And after a restart it is listed once, completed, with nothing fetched again.
    await kill(process, client)
    client = await start(process)
    assert (await task_of(client, task_id))["status"] == "completed"
    assert Counter(r.path for r in http_server.requests) == {"/good.txt": 1, "/flaky.txt": 2}
    await trio.aclose_forcefully(client.stream)


@needs_root
async def test_someone_elses_task_cannot_be_paused_resumed_or_retried(
    daemon_process: Any, http_server: HTTPTestServer
) -> None:
    from tests.conftest import blocking_call, run_as_nobody

    url = http_server.route("/hang.bin", hang_after_head(DATA, 1000))
    process = daemon_process()
    client = await start(process, "--config", str(one_slot_config(process.directory)))
    task_id = await download(client, url)
    await wait_status(client, task_id, "running")
    socket = process.socket

    def try_all() -> list[Any]:
        return [
            blocking_call(socket, method, {"task_id": task_id})["error"]["code"]
            for method in ("tasks.pause", "tasks.resume", "tasks.retry", "tasks.cancel")
        ]

    assert await trio.to_thread.run_sync(run_as_nobody, try_all) == [-32001] * 4
    assert (await task_of(client, task_id))["status"] == "running"
    await trio.aclose_forcefully(client.stream)


async def test_a_batch_size_of_zero_is_refused_not_taken_for_the_default(connect: Any) -> None:
    client = await connect()
    for bad in (0, -1, 1001):
        params = {"urls": ["http://127.0.0.1:9/a"], "batch_size": bad}
        answer = await client.request("tasks.download", params)
        assert answer["error"]["code"] == -32602, answer
        assert f"must be from 1 to 1000, not {bad}" in answer["error"]["message"]
        assert answer["error"]["data"]["field"] == "batch_size"
    assert (await client.call("tasks.list"))["tasks"] == []
