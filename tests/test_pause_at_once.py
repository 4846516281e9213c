"""A pause or a cancel takes effect at once: the daemon says ``paused`` or ``cancelled`` (a
``job_update`` push, ``tasks.get``) only once the item's writes have stopped. At that moment
no receiving thread is left, nothing holds the part open, and the part is what stays: an
exact prefix of the file for a pause (which a resume continues with a ``Range``), nothing at
all for a cancel. Both body paths: a large plain-HTTP body (>= ``http.DIRECT_MIN_BYTES``,
received in a thread) and a smaller one (received on the loop, written by the writer
thread). The server holds the body mid-way, off a buffer boundary, so that bytes are still
in memory when the pause comes; it sends the rest the moment the daemon announces the end.

The announcement is watched by a hook on the manager's push, which runs in the same loop
turn as the change: what it sees is what a client is told, with no scheduling in between.
A real daemon in-process, on a real Unix socket; a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from statusd.daemon import Daemon
from statusd.downloads import engine, part_name
from statusd.downloads.http import DIRECT_MIN_BYTES
from statusd.state.tasks import TaskInfo, TaskStatus
from tests.conftest import RawClient
from tests.http_servers import HTTPTestServer, Request, Responder, held, http_server, serve_data
from tests.processes import FINISHED, until

__all__ = ["http_server"]

CHUNK = 1 << 20  # DownloadSettings.chunk_size's default: the first buffer
# Off every buffer boundary: the thread (or the loop) holds the last bytes in memory.
CUT = CHUNK + 12_345
PATHS = {
    "thread": DIRECT_MIN_BYTES + 3 * CHUNK + 7,
    "loop": DIRECT_MIN_BYTES - CHUNK,
}


@attrs.define
class Seen:
    """What was true when the daemon announced the task's new state."""

    status: str
    part_size: int | None
    part_open: bool
    receiving: bool


def part_is_open(part: Path) -> bool:
    """Whether a descriptor of this process refers to ``part`` (the daemon is in-process)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == str(part):
                return True
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor)
    return False


def size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


class Watch:
    """Hooks the manager's pushes: at the first one that shows the task paused or
    cancelled, records what is true then, and opens the server's gate, so that a receive
    still under way would get the rest of the body."""

    def __init__(self, daemon: Daemon, monkeypatch: pytest.MonkeyPatch, gate: trio.Event) -> None:
        self.seen: Seen | None = None
        self.part: Path | None = None
        self.receivers: list[Any] = []
        start = engine._Receiver.start

        def start_receiver(receiver: Any) -> None:
            self.receivers.append(receiver)
            start(receiver)

        monkeypatch.setattr(engine._Receiver, "start", start_receiver)
        push = daemon.tasks.push

        def watched(task: TaskInfo, status: str, message: str, **extra: Any) -> None:
            ended = task.status in (TaskStatus.PAUSED, TaskStatus.CANCELLED)
            if self.seen is None and ended and self.part is not None:
                self.seen = Seen(
                    task.status.value,
                    size_of(self.part),
                    part_is_open(self.part),
                    any(not receiver.stopped.is_set() for receiver in self.receivers),
                )
                gate.set()
            push(task, status, message, **extra)

        monkeypatch.setattr(daemon.tasks, "push", watched)


class Served:
    """``held`` for the first request, then the whole file (honouring Range); ``done`` is
    set when the held answer has ended, sent in full or cut off by the daemon."""

    def __init__(self, data: bytes, gate: trio.Event) -> None:
        self.first = held(data, CUT, gate, etag='"P1"')
        self.rest = serve_data(data, etag='"P1"')
        self.done = trio.Event()

    async def __call__(self, request: Request, responder: Responder) -> None:
        if request.number > 1:
            await self.rest(request, responder)
            return
        try:
            await self.first(request, responder)
        finally:
            self.done.set()


async def start_download(
    daemon: Daemon, client: RawClient, server: HTTPTestServer, watch: Watch, served: Served
) -> tuple[str, Path]:
    url = server.route("/held.bin", served)
    task_id = (await client.call("tasks.download", {"urls": [url]}))["task_id"]
    part = daemon.config.state_dir / "downloads" / part_name("held.bin", f"{task_id}-0")
    watch.part = part

    async def all_sent_received() -> bool:
        task = await client.call("tasks.get", {"task_id": task_id})
        return bool(task["bytes_done"] >= CUT)

    await until(all_sent_received)
    return task_id, part


@pytest.mark.parametrize("path", sorted(PATHS))
async def test_paused_is_announced_once_the_part_stopped_growing(
    daemon: Daemon,
    connect: Any,
    http_server: HTTPTestServer,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    data = os.urandom(PATHS[path])
    gate = trio.Event()
    watch = Watch(daemon, monkeypatch, gate)
    served = Served(data, gate)
    client = await connect()
    task_id, part = await start_download(daemon, client, http_server, watch, served)
    assert await client.call("tasks.pause", {"task_id": task_id}) == {"paused": True}
    assert watch.seen is not None
    assert (await client.call("tasks.get", {"task_id": task_id}))["status"] == "paused"
    with trio.fail_after(30):
        await served.done.wait()  # the rest of the body went out, or was refused
    assert watch.seen == Seen("paused", CUT, part_open=False, receiving=False)
    assert part.read_bytes() == data[:CUT]
    assert (await client.call("tasks.get", {"task_id": task_id}))["bytes_done"] == CUT
    if path == "thread":
        assert len(watch.receivers) == 1
    else:
        assert watch.receivers == []

    assert await client.call("tasks.resume", {"task_id": task_id}) == {"resumed": True}

    async def finished() -> bool:
        task = await client.call("tasks.get", {"task_id": task_id})
        return task["status"] in FINISHED

    await until(finished)
    task = await client.call("tasks.get", {"task_id": task_id})
    assert task["status"] == "completed", task
    ranges = [request.headers.get("range") for request in http_server.requests_for("/held.bin")]
    assert ranges == [None, f"bytes={CUT}-"]
    assert Path(task["result"]["items"][0]["path"]).read_bytes() == data


@pytest.mark.parametrize("path", sorted(PATHS))
async def test_cancelled_is_announced_once_the_part_is_gone(
    daemon: Daemon,
    connect: Any,
    http_server: HTTPTestServer,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    data = os.urandom(PATHS[path])
    gate = trio.Event()
    watch = Watch(daemon, monkeypatch, gate)
    served = Served(data, gate)
    client = await connect()
    task_id, part = await start_download(daemon, client, http_server, watch, served)
    assert await client.call("tasks.cancel", {"task_id": task_id}) == {"cancelled": True}
    assert watch.seen == Seen("cancelled", None, part_open=False, receiving=False)
    with trio.fail_after(30):
        await served.done.wait()
    assert not part.exists()
    assert list(part.parent.iterdir()) == []
    assert (await client.call("tasks.get", {"task_id": task_id}))["status"] == "cancelled"
    assert len(http_server.requests_for("/held.bin")) == 1
