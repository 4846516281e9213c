"""A worker's connection is free while its last small file is written; two items per slot.

A small file's whole body is in memory when its connection goes back to the pool; its file
work (a file thread's hop, the journal's record, the part's removal) is then done while
another worker sends the next request: a task runs two workers per ``parallel_items``
slot, and a worker holds its slot only while it receives. The file hop is held here by a
``files.finish`` that waits for the test, so what runs meanwhile can be seen; nothing is
timed.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from statusd.channel import StatusChannel
from statusd.downloads import Downloads, files
from statusd.downloads.engine import (
    DownloadItem,
    DownloadSettings,
    ItemState,
    download_item,
    make_client,
)
from statusd.events import Streams
from statusd.tasks import TaskManager
from tests.conftest import make_config
from tests.http_servers import (
    Handler,
    HTTPTestServer,
    Request,
    Responder,
    hang_before_head,
    http_server,
    serve_data,
)

__all__ = ["http_server"]

DATA = {n: f"file {n}\n".encode() * (50 * (n + 1)) for n in range(4)}


class HeldFinish:
    """``files.finish`` that, for a file named in ``held``, waits in its file thread until
    the test releases it; ``entered(name)`` is set when a file's finish starts,
    ``finished(name)`` when it has run."""

    def __init__(self, *held: str) -> None:
        self._gates = {name: threading.Event() for name in held}
        self.token = trio.lowlevel.current_trio_token()
        self._events: dict[tuple[str, str], trio.Event] = {}
        self._real = files.finish

    def _event(self, what: str, name: str) -> trio.Event:
        return self._events.setdefault((what, name), trio.Event())

    def entered(self, name: str) -> trio.Event:
        return self._event("entered", name)

    def finished(self, name: str) -> trio.Event:
        return self._event("finished", name)

    def release(self, name: str | None = None) -> None:
        for held, gate in self._gates.items():
            if name in (None, held):
                gate.set()

    def __call__(self, *args: Any) -> files.Finished:
        name = args[4]
        self.token.run_sync_soon(self.entered(name).set)
        gate = self._gates.get(name)
        if gate is not None:
            gate.wait()
        try:
            return self._real(*args)
        finally:
            self.token.run_sync_soon(self.finished(name).set)


@pytest.fixture
async def held_finish(monkeypatch: pytest.MonkeyPatch) -> HeldFinish:
    held = HeldFinish("f0.bin", "f1.bin")
    monkeypatch.setattr(files, "finish", held)
    return held


@contextlib.contextmanager
def releasing(held: HeldFinish) -> Iterator[None]:
    """Whatever the test does, no file thread is left waiting (the task's workers wait
    for it uncancellably, and so would the test's teardown)."""
    try:
        yield
    finally:
        held.release()


def asked(handler: Handler, event: trio.Event) -> Handler:
    """``handler``, setting ``event`` when a request arrives."""

    async def wrapper(request: Request, responder: Responder) -> None:
        event.set()
        await handler(request, responder)

    return wrapper


async def start_task(
    nursery: trio.Nursery, tmp_path: Path, urls: list[str], **downloads: Any
) -> tuple[TaskManager, str, Path]:
    dest = tmp_path / "dest"
    dest.mkdir()
    config = make_config(tmp_path)
    config = attrs.evolve(config, downloads=attrs.evolve(config.downloads, **downloads))
    streams = Streams(StatusChannel())
    manager = TaskManager(streams.status, streams.tasks, journal_path=None)
    await nursery.start(manager.serve)
    spec = {"items": [{"url": url} for url in urls], "dest": str(dest), "batch_size": 10}
    job = Downloads(config).job("t1", spec, [])
    task_id = await manager.create_task("t", len(urls), kind="download", owner="alice")
    manager.run_task(task_id, job)
    return manager, task_id, dest


def names_in(dest: Path) -> list[str]:
    return sorted(os.listdir(dest))


async def test_the_next_request_goes_out_while_a_file_is_finished_two_items_at_most(
    nursery: trio.Nursery,
    tmp_path: Path,
    http_server: HTTPTestServer,
    held_finish: HeldFinish,
) -> None:
    """parallel_items 1 and one connection to the host: while f0's file hop is held, f1
    is requested (the connection went back before f0's file work) and received; with f0
    and f1 both held, f2 waits (two items at most per receiving slot); f0 released, f2 is
    fetched and finished while f1 is still held. Every file lands once, under its own
    name, with no part."""
    with releasing(held_finish):
        f2_asked = trio.Event()
        urls = [
            http_server.route("/f0.bin", serve_data(DATA[0])),
            http_server.route("/f1.bin", serve_data(DATA[1])),
            http_server.route("/f2.bin", asked(serve_data(DATA[2]), f2_asked)),
            http_server.route("/f3.bin", serve_data(DATA[3])),
        ]
        manager, task_id, dest = await start_task(
            nursery, tmp_path, urls, parallel_items=1, max_per_host=1
        )
        with trio.fail_after(10):
            await held_finish.entered("f0.bin").wait()
            await held_finish.entered("f1.bin").wait()
        await trio.testing.wait_all_tasks_blocked()
        assert not f2_asked.is_set()
        held_finish.release("f0.bin")
        with trio.fail_after(10):
            await held_finish.finished("f2.bin").wait()
        assert not held_finish.finished("f1.bin").is_set()
        held_finish.release("f1.bin")
        with trio.fail_after(10):
            task = await manager.wait_finished(task_id)
        assert task.status.value == "completed"
        assert names_in(dest) == [f"f{n}.bin" for n in range(4)]
        for n in range(4):
            assert (dest / f"f{n}.bin").read_bytes() == DATA[n]
        connections = {http_server.requests_for(f"/f{n}.bin")[0].connection for n in range(4)}
        assert len(connections) == 1  # one kept-alive connection did all four


async def test_a_cancel_while_one_item_is_finished_and_the_next_fetched(
    nursery: trio.Nursery,
    tmp_path: Path,
    http_server: HTTPTestServer,
    held_finish: HeldFinish,
) -> None:
    """A cancel while f0 is in its file hop and f1 waits for its server: f1 stops at once,
    f0's hop ends (file work is never abandoned), and the task ends cancelled with no part
    left; f0, finished, stays whole."""
    with releasing(held_finish):
        f1_asked = trio.Event()
        urls = [
            http_server.route("/f0.bin", serve_data(DATA[0])),
            http_server.route("/f1.bin", asked(hang_before_head(), f1_asked)),
            http_server.route("/f2.bin", serve_data(DATA[2])),
        ]
        manager, task_id, dest = await start_task(nursery, tmp_path, urls, parallel_items=1)
        with trio.fail_after(10):
            await f1_asked.wait()
        cancelled: list[bool] = []

        async def cancel() -> None:
            cancelled.append(await manager.cancel_task(task_id))

        nursery.start_soon(cancel)
        await trio.testing.wait_all_tasks_blocked()
        assert not cancelled  # waiting for f0's hop, which is never abandoned
        held_finish.release("f0.bin")
        with trio.fail_after(10):
            task = await manager.wait_finished(task_id)
        await trio.testing.wait_all_tasks_blocked()
        assert cancelled == [True]
        assert task.status.value == "cancelled"
        assert names_in(dest) == ["f0.bin"]
        assert (dest / "f0.bin").read_bytes() == DATA[0]
        assert not http_server.requests_for("/f2.bin")


async def test_on_received_is_called_with_the_connection_back_in_the_pool(
    nursery: trio.Nursery, tmp_path: Path, http_server: HTTPTestServer
) -> None:
    """The engine tells its caller when a small file's body is in memory and its
    connection idle, before the file exists; a file larger than the first buffer is
    written as it arrives, and its caller hears nothing of the kind."""
    small = http_server.route("/small.bin", serve_data(DATA[0]))
    large_data = os.urandom(3 << 20)
    large = http_server.route("/large.bin", serve_data(large_data))
    dest = tmp_path / "dest"
    dest.mkdir()
    client = make_client()
    seen: list[tuple[int, bool]] = []

    def on_received() -> Callable[[], None]:
        def called() -> None:
            seen.append((client.statistics().idle_connections, (dest / "small.bin").exists()))

        return called

    try:
        result = await download_item(
            client,
            DownloadItem(small),
            dest,
            DownloadSettings(),
            ItemState(),
            on_received=on_received(),
        )
        assert result.error is None
        assert seen == [(1, False)]
        result = await download_item(
            client,
            DownloadItem(large),
            dest,
            DownloadSettings(),
            ItemState(),
            on_received=on_received(),
        )
        assert result.error is None
        assert seen == [(1, False)]
        assert (dest / "large.bin").read_bytes() == large_data
    finally:
        await client.aclose()
