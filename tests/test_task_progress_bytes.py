"""A task's progress by bytes, its speed and ETA, and why its items fail or are tried again
(issue 13, items 1 and 2): the pure meter, the task record, and a real daemon fetching
from a real HTTP server on trio's MockClock."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from statusd.daemon import Daemon, run
from statusd.state.tasks import TaskInfo, TaskStatus, job_update
from statusd.state.throughput import IDLE_AFTER, Throughput, eta
from tests.conftest import RawClient, make_config
from tests.http_servers import (
    Handler,
    HTTPTestServer,
    Request,
    Responder,
    http_server,
    sequence,
    serve_data,
    status,
    trickle,
)

__all__ = ["http_server"]

JUMP = 0.005  # MockClock's autojump threshold: file work runs in worker threads
HEARTBEAT = 0.05  # mock seconds: the most the clock jumps at once (small_jumps)
DATA = bytes(range(256)) * 4096  # 1 MiB
WAIT = 10.0  # real seconds for what takes milliseconds, on a busy machine


# -- the meter ---------------------------------------------------------------------------------


def feed(meter: Throughput, start: float, seconds: float, rate: float, step: float = 0.1) -> float:
    """``rate`` bytes a second in pieces every ``step`` seconds; returns the last time."""
    now = start
    for _ in range(round(seconds / step)):
        now = round(now + step, 6)
        meter.add(now, round(rate * step))
    return now


def test_a_steady_transfer_reads_as_its_speed() -> None:
    meter = Throughput()
    meter.add(0.0, 1)  # the first bytes start the clock
    now = feed(meter, 0.0, 10.0, 1_000_000)
    assert meter.rate(now) == pytest.approx(1_000_000)


def test_the_first_half_second_already_says_the_speed() -> None:
    meter = Throughput()
    meter.add(0.0, 1)  # the first bytes start the clock
    meter.add(0.25, 250_000)
    assert meter.rate(0.25) == pytest.approx(1_000_000)  # before a slot is complete
    meter.add(0.5, 250_000)
    assert meter.rate(0.5) == pytest.approx(1_000_000)


def test_the_speed_is_smoothed_over_seconds_not_pieces() -> None:
    meter = Throughput()
    meter.add(0.0, 1)  # the first bytes start the clock
    now = feed(meter, 0.0, 10.0, 1_000_000)
    now = feed(meter, now, 1.0, 2_000_000)
    # One second at twice the speed moves a 5 s average part of the way...
    assert 1_100_000 < meter.rate(now) < 1_400_000
    # ... and it gets there.
    now = feed(meter, now, 30.0, 2_000_000)
    assert meter.rate(now) == pytest.approx(2_000_000, rel=0.01)


def test_nothing_arriving_is_a_speed_of_0() -> None:
    meter = Throughput()
    meter.add(0.0, 1)  # the first bytes start the clock
    now = feed(meter, 0.0, 5.0, 1_000_000)
    assert meter.idle_at == now + IDLE_AFTER
    assert meter.rate(now + IDLE_AFTER - 0.01) > 0
    assert meter.rate(now + IDLE_AFTER) == 0.0
    # Bytes taken back (a restart, a failure) are not speed either way.
    meter.add(now + 0.1, -500)
    meter.add(now + 0.1, 0)
    assert meter.rate(now + IDLE_AFTER) == 0.0


def test_after_a_stall_the_speed_is_measured_afresh() -> None:
    meter = Throughput()
    meter.add(0.0, 1)  # the first bytes start the clock
    now = feed(meter, 0.0, 5.0, 10_000_000)
    # The first piece after 10 s of nothing only starts the clock again; then 100 KB/s.
    meter.add(now + 10, 5_000_000)
    now = feed(meter, now + 10, 1.0, 100_000)
    assert meter.rate(now) == pytest.approx(100_000)


def test_eta() -> None:
    assert eta(1000, 100.0) == 10.0
    assert eta(1000, 0.0) is None
    assert eta(0, 100.0) == 0.0


# -- the task record ---------------------------------------------------------------------------


def task(**fields: Any) -> TaskInfo:
    defaults: dict[str, Any] = {
        "id": "t1",
        "name": "big.iso",
        "kind": "download",
        "owner": "alice",
        "status": TaskStatus.RUNNING,
        "created_at": datetime(2026, 12, 7, tzinfo=UTC),
        "total_items": 1,
    }
    return TaskInfo(**(defaults | fields))


def test_progress_follows_bytes_once_their_total_is_known() -> None:
    info = task()
    info.set_bytes(100, None)
    assert info.progress == 0.0  # items: 0 of 1
    info.set_bytes(440, 1000)
    assert info.progress == 44.0
    info.update_progress(0, "http://h/big.iso")
    assert info.progress == 44.0  # the item count does not take it back to 0
    several = task(total_items=4)
    several.update_progress(1)
    assert several.progress == 25.0


def test_speed_is_only_for_a_running_task() -> None:
    info = task()
    info.set_speed(1234.56, 7.5)
    assert (info.bytes_per_second, info.eta_s) == (1234.6, 7.5)
    update = job_update(info, "progress", "2026-12-07T00:00:00.000Z", "m")
    assert (update["bytes_per_second"], update["eta_s"]) == (1234.6, 7.5)
    info.move_to(TaskStatus.PAUSED, datetime(2026, 12, 7, tzinfo=UTC))
    assert (info.bytes_per_second, info.eta_s) == (0.0, None)


# -- a real daemon -----------------------------------------------------------------------------


@pytest.fixture
async def daemon(nursery: trio.Nursery, short_tmp: Path) -> AsyncIterator[Daemon]:
    """A daemon whose reads time out after 3 s (30 s by default)."""
    config = make_config(short_tmp)
    downloads = attrs.evolve(config.downloads, read_timeout=3.0)
    handle: Daemon = await nursery.start(run, attrs.evolve(config, downloads=downloads))
    yield handle
    handle.request_stop()
    await handle.wait_stopped()


@pytest.fixture
async def small_jumps(autojump_clock: trio.testing.MockClock, nursery: trio.Nursery) -> None:
    """The test's MockClock (a test must name ``autojump_clock`` itself for pytest-trio
    to run on it) jumping by at most HEARTBEAT: while the daemon waits for a worker thread
    (a journal's fsync) nothing in trio is runnable, and autojump would move the clock to
    the next deadline, however far; a task waking every HEARTBEAT keeps that small."""
    autojump_clock.autojump_threshold = JUMP

    async def beat() -> None:
        while True:  # noqa: ASYNC110 (a clock, not a wait for something)
            await trio.sleep(HEARTBEAT)

    nursery.start_soon(beat)


async def updates_until(
    client: RawClient, task_id: str, done: Any, seen: list[dict[str, Any]]
) -> dict[str, Any]:
    """Task updates of ``task_id`` until ``done(update)``; every one goes to ``seen``."""
    while True:
        message = await client.receive()
        if message.get("method") != "task_update":
            continue
        update: dict[str, Any] = message["params"]
        if update["job_id"] != task_id:
            continue
        seen.append(update)
        if done(update):
            return update


def trickle_then_hang(data: bytes, sent: int, sends: list[float]) -> Handler:
    """Announce ``data``, send its first ``sent`` bytes at 256 KiB/s, then go silent;
    ``sends`` gets the time of each send."""

    async def handler(request: Request, responder: Responder) -> None:
        await responder.send_head(200, [("Content-Length", str(len(data))), ("ETag", '"v1"')])
        for start in range(0, sent, 64 * 1024):
            await trio.sleep(0.25)
            await responder.send_raw(data[start : min(sent, start + 64 * 1024)])
            sends.append(trio.current_time())
        await responder.hang()

    return handler


def ended(update: dict[str, Any]) -> bool:
    return update["status"] in ("completed", "error", "cancelled")


async def test_a_single_file_shows_bytes_speed_and_eta_as_it_comes(
    autojump_clock: trio.testing.MockClock,
    small_jumps: None,
    daemon: Daemon,
    connect: Any,
    http_server: HTTPTestServer,
) -> None:
    # 64 KiB every 0.25 s: 256 KiB/s, 4 s for the file.
    url = http_server.route("/big.iso", trickle(DATA, every=0.25, size=64 * 1024))
    client = await connect()
    await client.call("subscribe", {"tasks": "all"})
    task_id = (await client.call("tasks.download", {"urls": [url]}))["task_id"]
    seen: list[dict[str, Any]] = []
    with trio.fail_after(60):  # mock time
        half = await updates_until(
            client, task_id, lambda u: u["bytes_done"] >= len(DATA) // 2 or ended(u), seen
        )
        info = await client.call("tasks.get", {"task_id": task_id})
        if not ended(half):
            await updates_until(client, task_id, ended, seen)
    assert info["status"] == "running"
    assert info["processed_items"] == 0
    # By bytes: an item count would say 0% until the end.
    assert info["progress"] == pytest.approx(info["bytes_done"] / len(DATA) * 100, abs=0.01)
    assert 45 <= info["progress"] < 60
    assert info["bytes_per_second"] == pytest.approx(256 * 1024, rel=0.1)
    remaining = len(DATA) - info["bytes_done"]
    assert info["eta_s"] == pytest.approx(remaining / info["bytes_per_second"], abs=0.1)
    progress = [u for u in seen if u["status"] == "progress" and u["bytes_done"] > 0]
    assert all("bytes_per_second" in u and "eta_s" in u for u in seen)
    assert [u["progress"] for u in progress] == sorted(u["progress"] for u in progress)
    assert progress[0]["progress"] < 30  # it moved smoothly, not in one jump at the end
    assert seen[-1]["status"] == "completed"
    assert (seen[-1]["progress"], seen[-1]["bytes_per_second"], seen[-1]["eta_s"]) == (
        100.0,
        0.0,
        None,
    )


async def test_a_stalled_server_is_pushed_as_0_and_the_retry_is_announced(
    autojump_clock: trio.testing.MockClock,
    small_jumps: None,
    daemon: Daemon,
    connect: Any,
    http_server: HTTPTestServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="statusd")
    # A quarter of the file at 256 KiB/s, then silence until the read timeout (3 s); the
    # second attempt resumes (Range) and gets the rest.
    sends: list[float] = []
    quarter = len(DATA) // 4
    url = http_server.route(
        "/stall.iso", sequence(trickle_then_hang(DATA, quarter, sends), serve_data(DATA))
    )
    client = await connect()
    await client.call("subscribe", {"tasks": "all", "status": True})
    task_id = (await client.call("tasks.download", {"urls": [url + "?sig=secret"]}))["task_id"]
    seen: list[dict[str, Any]] = []

    def stalled(update: dict[str, Any]) -> bool:
        # No byte comes after the quarter to make the daemon push: its own timer does.
        quiet = sends and trio.current_time() >= sends[-1] + IDLE_AFTER
        return bool(quiet and update["bytes_done"] == quarter)

    with trio.fail_after(60):  # mock time
        pushed = await updates_until(client, task_id, stalled, seen)
        info = await client.call("tasks.get", {"task_id": task_id})
        retry = await updates_until(client, task_id, lambda u: "item_retry" in u, seen)
        last = await updates_until(client, task_id, ended, seen)
    assert (pushed["bytes_per_second"], pushed["eta_s"], pushed["progress"]) == (0.0, None, 25.0)
    assert pushed["status"] == "progress"
    assert (info["bytes_per_second"], info["eta_s"], info["status"]) == (0.0, None, "running")
    assert info["bytes_done"] == quarter
    port = http_server.port
    reason = f"timed out after 3 s waiting for data from 127.0.0.1:{port}"
    # The attempt brought a quarter of the file: progress, so it does not count against
    # max_attempts, and the next one resumes.
    assert retry["item_retry"] == {
        "index": 0,
        "url": f"http://127.0.0.1:{port}/stall.iso?…",
        "attempt": 1,
        "max_attempts": 5,
        "delay_s": 0.5,
        "reason": reason,
        "counted": False,
    }
    said = f"resuming in 0.5 s (not counted as an attempt): {reason}"
    assert retry["message"] == f"http://127.0.0.1:{port}/stall.iso?…: {said}"
    assert last["status"] == "completed"
    assert http_server.requests_for("/stall.iso")[1].headers["range"] == f"bytes={quarter}-"
    # Said in the status stream at warning, and in the log; neither shows the query.
    status_messages = (await client.call("status.recent"))["messages"]
    warnings = [m["message"] for m in status_messages if m["level"] == "warning"]
    assert warnings == [f"http://127.0.0.1:{port}/stall.iso?…: {said}"]
    logged = [r for r in caplog.records if said in r.getMessage()]
    assert len(logged) == 1
    assert "secret" not in caplog.text


async def test_a_failed_item_carries_its_reason_to_the_watcher_and_the_log(
    daemon: Daemon,
    connect: Any,
    http_server: HTTPTestServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="statusd")
    good = http_server.route("/good.txt", serve_data(b"fine"))
    missing = http_server.route("/missing.iso", status(404))
    client = await connect()
    await client.call("subscribe", {"tasks": "all"})
    params = {"items": [{"url": good}, {"url": missing}, {"url": good, "sha256": "0" * 64}]}
    task_id = (await client.call("tasks.download", params))["task_id"]
    seen: list[dict[str, Any]] = []
    with trio.fail_after(WAIT):
        last = await updates_until(client, task_id, ended, seen)
    failures = sorted(
        (u["item_failed"] for u in seen if "item_failed" in u), key=lambda f: f["index"]
    )
    assert [(f["index"], f["url"], f["error"].split(":")[0]) for f in failures] == [
        (1, missing, "http 404 not found"),
        (2, good, "sha256 mismatch"),
    ]
    assert failures[0]["error"] == "http 404 not found"
    assert last["status"] == "error"
    assert [item["error"] for item in last["results"]["items"]] == [
        None,
        "http 404 not found",
        failures[1]["error"],
    ]
    assert not [u for u in seen if "item_retry" in u]  # a 404 is not worth another attempt
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any(f"{missing} failed: http 404 not found" in line for line in logged)
    assert any(
        f"task {task_id} (" in line and "failed: 2 of 3 items failed" in line for line in logged
    )
