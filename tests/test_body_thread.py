"""A large plain-HTTP body received in a thread of its own (engine._Receiver), the event
loop only supervising it: the bytes and the digest are exact at every buffer boundary; a
cancel (a pause, a shutdown) interrupts the receive at once, also while the thread waits
for the writer, and leaves the part an exact prefix that a resume continues with a Range;
the stall rule, a server that closes early or lies about the length, the size cap and a
SIGKILL mid-body are handled as on the loop; a download under a speed limit keeps the
loop's receives. Servers are the tests' own, on 127.0.0.1; bodies are past
``http.DIRECT_MIN_BYTES`` (4 MiB), which is what sends a body to the thread."""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from statusd.downloads import (
    DownloadItem,
    DownloadSettings,
    ItemResult,
    ItemState,
    engine,
    files,
    part_name,
)
from statusd.downloads import download_item as engine_download_item
from statusd.downloads.http import DIRECT_MIN_BYTES, HTTPClient
from statusd.downloads.throttle import RateLimit
from statusd.state.bandwidth import BURST_SECONDS
from tests import http_servers
from tests.http_servers import (
    HTTPTestServer,
    Request,
    Responder,
    cut_off,
    hang_after_head,
    held,
    sequence,
    serve_data,
)
from tests.processes import FINISHED, download_dir, kill, start, task_of, until

http_server = http_servers.http_server

CHUNK = 64 * 1024  # the first buffer; the thread's are LARGE_BUFFER_FACTOR times this
BIG = CHUNK * engine.LARGE_BUFFER_FACTOR
DATA = random.Random(20).randbytes(DIRECT_MIN_BYTES + 3 * BIG + 7)
SETTINGS = DownloadSettings(
    backoff_initial=0.01, backoff_max=0.05, read_timeout=60.0, chunk_size=CHUNK
)
OWNER = "t1-0"
# MockClock's autojump threshold where a thread's stop must not look like a quiet loop.
STOP_JUMP = 0.5


@pytest.fixture
async def client() -> AsyncIterator[HTTPClient]:
    async with HTTPClient() as client:
        yield client


@pytest.fixture
def receivers(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every receiving thread started during the test (its ``_Receiver``)."""
    started: list[Any] = []
    original = engine._Receiver.start

    def start(receiver: Any) -> None:
        started.append(receiver)
        original(receiver)

    monkeypatch.setattr(engine._Receiver, "start", start)
    return started


async def fetch(
    client: HTTPClient,
    url: str,
    dest: Path,
    settings: DownloadSettings = SETTINGS,
    state: ItemState | None = None,
    **item: Any,
) -> ItemResult:
    return await engine_download_item(
        client, DownloadItem(url, **item), dest, settings, state or ItemState(), owner=OWNER
    )


@pytest.mark.parametrize(
    "size",
    [
        DIRECT_MIN_BYTES,  # whole buffers: the last one is full as the body ends
        DIRECT_MIN_BYTES + 1,
        DIRECT_MIN_BYTES + CHUNK,
        DIRECT_MIN_BYTES + BIG - 1,
        DIRECT_MIN_BYTES + BIG,
        DIRECT_MIN_BYTES + BIG + 1,
        len(DATA),
    ],
)
async def test_exact_bytes_and_sha256_around_buffer_boundaries(
    http_server: HTTPTestServer,
    client: HTTPClient,
    tmp_path: Path,
    receivers: list[Any],
    size: int,
) -> None:
    body = DATA[:size]
    url = http_server.route("/b.bin", serve_data(body))
    digest = hashlib.sha256(body).hexdigest()
    result = await fetch(client, url, tmp_path, sha256=digest)
    assert (result.error, result.sha256, result.bytes) == (None, digest, size)
    assert (tmp_path / "b.bin").read_bytes() == body
    assert len(receivers) == 1  # the thread took it
    assert receivers[0].stopped.is_set()
    assert client.statistics().idle_connections == 0  # never pooled after the thread


async def test_progress_reports_add_up_to_the_file(
    http_server: HTTPTestServer, client: HTTPClient, tmp_path: Path, receivers: list[Any]
) -> None:
    reports: list[int] = []
    url = http_server.route("/p.bin", serve_data(DATA))
    result = await engine_download_item(
        client,
        DownloadItem(url),
        tmp_path,
        SETTINGS,
        ItemState(),
        owner=OWNER,
        on_bytes=lambda delta, _total: reports.append(delta),
    )
    assert result.error is None
    assert sum(reports) == len(DATA)
    assert all(delta > 0 for delta in reports)
    assert len(receivers) == 1


async def test_a_cancel_interrupts_the_receive_and_leaves_an_exact_prefix(
    http_server: HTTPTestServer, client: HTTPClient, tmp_path: Path, receivers: list[Any]
) -> None:
    """The server goes silent mid-body: the thread waits in poll (for up to read_timeout,
    60 s). The cancel interrupts it, the thread is gone before the cancel returns, and the
    part holds the body's first bytes, all of them; a resume asks for the rest."""
    sent = DIRECT_MIN_BYTES // 2 + 12_345
    url = http_server.route("/c.bin", sequence(hang_after_head(DATA, sent), serve_data(DATA)))
    state = ItemState()
    with trio.CancelScope() as scope:

        async def cancel_once_received() -> None:
            while not receivers or receivers[0].position < sent:  # noqa: ASYNC110 - a thread's counter
                await trio.sleep(0.005)
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_once_received)
            await fetch(client, url, tmp_path, state=state)
    assert scope.cancelled_caught
    assert receivers[0].stopped.is_set()
    assert (tmp_path / part_name("c.bin", OWNER)).read_bytes() == DATA[:sent]
    result = await fetch(client, url, tmp_path, state=state)
    assert result.error is None
    assert (tmp_path / "c.bin").read_bytes() == DATA
    assert http_server.requests_for("/c.bin")[1].headers["range"] == f"bytes={sent}-"


async def test_a_cancel_while_the_thread_waits_for_the_writer(
    http_server: HTTPTestServer,
    client: HTTPClient,
    tmp_path: Path,
    receivers: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The disk stalls: PIPELINE_DEPTH buffers wait for the writer and the thread holds a
    full one it cannot hand over. A cancel frees the thread; every buffer received is
    written, in order, before the download returns."""
    gate = threading.Event()
    write_all = files.write_all

    def slow_write(fd: int, data: memoryview) -> None:
        gate.wait()
        write_all(fd, data)

    monkeypatch.setattr(files, "write_all", slow_write)
    url = http_server.route("/w.bin", serve_data(DATA))
    # The first buffer and three more in the pipeline, one full in the thread's hands.
    full = CHUNK + engine.PIPELINE_DEPTH * BIG
    with trio.fail_after(60), trio.CancelScope() as scope:

        async def cancel_when_full() -> None:
            while not receivers or receivers[0].position < full:  # noqa: ASYNC110 - a thread's counter
                await trio.sleep(0.005)
            scope.cancel()
            gate.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_when_full)
            await fetch(client, url, tmp_path)
    assert scope.cancelled_caught
    assert receivers[0].stopped.is_set()
    # The writes resume as the cancel arrives, so the thread may get a little further:
    # what counts is that all it received is on disk, in order.
    kept = (tmp_path / part_name("w.bin", OWNER)).read_bytes()
    assert len(kept) == receivers[0].position >= full
    assert kept == DATA[: len(kept)]


async def test_a_stalled_server_fails_by_the_stall_rule(
    mock_clock: trio.testing.MockClock,
    http_server: HTTPTestServer,
    client: HTTPClient,
    tmp_path: Path,
    receivers: list[Any],
) -> None:
    """The thread waits for data on the system's clock (read_timeout 1,000 s); the stall
    rule runs on the loop's: 10 s windows after the burst, stalled two windows later."""
    # Once stalled, the loop waits (shielded) for the interrupted thread to stop, and the
    # test's own fail_after is then the only deadline: a stop that outlasted a 5 ms
    # threshold on a loaded machine let the clock jump to it, a TooSlowError after a correct stall.
    mock_clock.autojump_threshold = STOP_JUMP
    url = http_server.route("/s.bin", hang_after_head(DATA, DIRECT_MIN_BYTES + 99))
    settings = attrs.evolve(SETTINGS, lowest_speed=1024, stall_timeout=10, read_timeout=1000)
    with trio.fail_after(60):  # mock time
        result = await fetch(client, url, tmp_path, settings)
    assert result.error == "stalled: below lowest_speed 1024 B/s for stall_timeout 10 s"
    assert len(receivers) == 1
    assert receivers[0].stopped.is_set()
    assert list(tmp_path.iterdir()) == []  # no journal: nobody could resume the part


async def test_a_read_timeout_in_the_thread_is_named_as_on_the_loop(
    http_server: HTTPTestServer, client: HTTPClient, tmp_path: Path, receivers: list[Any]
) -> None:
    url = http_server.route("/t.bin", hang_after_head(DATA, DIRECT_MIN_BYTES))
    settings = attrs.evolve(SETTINGS, read_timeout=0.2, max_attempts=1)
    result = await fetch(client, url, tmp_path, settings)
    assert result.error == (
        f"timed out after 0.2 s waiting for data from {url.split('/')[2]} "
        "(gave up after 1 attempts)"
    )
    assert receivers  # (an attempt that made progress is not counted: one more)


async def test_a_server_closing_early_is_resumed_from_the_exact_byte(
    http_server: HTTPTestServer, client: HTTPClient, tmp_path: Path, receivers: list[Any]
) -> None:
    """Whatever the thread received before the close, written or in its buffer, is kept:
    the retry's Range starts at the byte after it."""
    at = DIRECT_MIN_BYTES + 5 * CHUNK + 3
    url = http_server.route("/e.bin", sequence(cut_off(DATA, at), serve_data(DATA)))
    digest = hashlib.sha256(DATA).hexdigest()
    state = ItemState()

    async def on_state(_: ItemState) -> None:
        await trio.lowlevel.checkpoint()

    result = await engine_download_item(
        client,
        DownloadItem(url, sha256=digest),
        tmp_path,
        SETTINGS,
        state,
        owner=OWNER,
        on_state=on_state,
    )
    assert (result.error, result.sha256) == (None, digest)
    assert (tmp_path / "e.bin").read_bytes() == DATA
    assert http_server.requests_for("/e.bin")[1].headers["range"] == f"bytes={at}-"
    assert len(receivers) == 1  # the rest is below DIRECT_MIN_BYTES: the loop's


def lying(announced: int, sent: bytes) -> Any:
    async def handler(request: Request, responder: Responder) -> None:
        await responder.send_head(200, [("Content-Length", str(announced))])
        await responder.send_raw(sent)
        await responder.close()

    return handler


async def test_a_content_length_larger_than_the_body_fails_naming_the_bytes(
    http_server: HTTPTestServer, client: HTTPClient, tmp_path: Path, receivers: list[Any]
) -> None:
    short = DATA[: DIRECT_MIN_BYTES + 1000]
    url = http_server.route("/l.bin", lying(len(DATA), short))
    result = await fetch(client, url, tmp_path, attrs.evolve(SETTINGS, max_attempts=1))
    origin = url.split("/")[2]
    assert result.error == (
        f"{origin} closed the connection after {len(short)} of {len(DATA)} body bytes "
        "(gave up after 1 attempts)"
    )
    assert receivers
    assert list(tmp_path.iterdir()) == []


async def test_bytes_past_the_content_length_are_not_part_of_the_file(
    http_server: HTTPTestServer, client: HTTPClient, tmp_path: Path, receivers: list[Any]
) -> None:
    size = DIRECT_MIN_BYTES + BIG + 5
    url = http_server.route("/m.bin", lying(size, DATA))
    result = await fetch(client, url, tmp_path)
    assert (result.error, result.bytes) == (None, size)
    assert (tmp_path / "m.bin").read_bytes() == DATA[:size]
    assert len(receivers) == 1


async def test_the_size_cap_refuses_a_large_body_before_receiving_it(
    http_server: HTTPTestServer, client: HTTPClient, tmp_path: Path, receivers: list[Any]
) -> None:
    url = http_server.route("/cap.bin", serve_data(DATA))
    cap = len(DATA) - 1
    result = await fetch(client, url, tmp_path, attrs.evolve(SETTINGS, max_file_bytes=cap))
    assert result.error == f"file exceeds the size cap of {cap} bytes (downloads.max_file_bytes)"
    assert receivers == []
    assert list(tmp_path.iterdir()) == []


async def test_a_limited_download_keeps_the_loops_receives_and_its_rate(
    mock_clock: trio.testing.MockClock,
    http_server: HTTPTestServer,
    client: HTTPClient,
    tmp_path: Path,
    receivers: list[Any],
) -> None:
    # A jump while loopback data is still on its way through the kernel (deferred on a busy
    # machine) is a second of mock time with no byte: 50 ms of real time per jump.
    mock_clock.autojump_threshold = 0.05
    rate = 1 << 20
    url = http_server.route("/r.bin", serve_data(DATA))
    points: list[tuple[float, int]] = []
    held_now = 0

    def on_bytes(delta: int, _total: int | None) -> None:
        nonlocal held_now
        held_now += delta
        points.append((trio.current_time(), held_now))

    directory = files.Directory.open(tmp_path)  # opened here: no thread before the first byte
    try:
        started = trio.current_time()
        result = await engine_download_item(
            client,
            DownloadItem(url),
            directory,
            attrs.evolve(SETTINGS, max_attempts=1),
            ItemState(),
            owner=OWNER,
            on_bytes=on_bytes,
            limits=(RateLimit(rate),),
        )
    finally:
        directory.close()
    assert (result.error, result.bytes) == (None, len(DATA))
    assert receivers == []

    def at(moment: float) -> int:
        return max([value for when, value in points if when - started <= moment], default=0)

    for second in range(1, 4):
        assert at(second + 1) - at(second) == pytest.approx(rate, rel=0.05)


# --- a real daemon: pause and resume, SIGKILL and restart ------------------------------------


async def test_pause_mid_body_keeps_a_prefix_and_resume_continues_it(
    daemon_process: Any, http_server: HTTPTestServer
) -> None:
    at = DIRECT_MIN_BYTES + 2 * BIG
    release = trio.Event()
    url = http_server.route(
        "/big.bin", sequence(held(DATA, at, release, etag='"B1"'), serve_data(DATA, etag='"B1"'))
    )
    process = daemon_process()
    client = await start(process)
    task_id = (await client.call("tasks.download", {"urls": [url]}))["task_id"]
    part = download_dir(process) / part_name("big.bin", f"{task_id}-0")

    async def all_sent_received() -> bool:
        return part.exists() and (await task_of(client, task_id))["bytes_done"] >= at

    await until(all_sent_received)
    assert await client.call("tasks.pause", {"task_id": task_id}) == {"paused": True}

    async def paused() -> bool:
        return bool((await task_of(client, task_id))["status"] == "paused")

    await until(paused)
    kept = part.read_bytes()
    assert kept == DATA[:at]  # the thread's last buffer too, not only the full ones
    assert await client.call("tasks.resume", {"task_id": task_id}) == {"resumed": True}

    async def finished() -> bool:
        return (await task_of(client, task_id))["status"] in FINISHED

    await until(finished)
    task = await task_of(client, task_id)
    assert task["status"] == "completed", task
    second = http_server.requests_for("/big.bin")[1]
    assert (second.headers["range"], second.headers["if-range"]) == (f"bytes={len(kept)}-", '"B1"')
    path = Path(task["result"]["items"][0]["path"])
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(DATA).digest()
    assert not part.exists()
    await trio.aclose_forcefully(client.stream)


async def test_sigkill_mid_body_then_restart_resumes_from_what_is_on_disk(
    daemon_process: Any, http_server: HTTPTestServer
) -> None:
    at = DIRECT_MIN_BYTES + 2 * BIG
    url = http_server.route(
        "/k.bin", sequence(hang_after_head(DATA, at, etag='"K1"'), serve_data(DATA, etag='"K1"'))
    )
    process = daemon_process()
    client = await start(process)
    task_id = (await client.call("tasks.download", {"urls": [url]}))["task_id"]
    dest = download_dir(process)
    part = dest / part_name("k.bin", f"{task_id}-0")

    async def all_sent_received() -> bool:
        return part.exists() and (await task_of(client, task_id))["bytes_done"] >= at

    await until(all_sent_received)
    await kill(process, client)
    on_disk = part.read_bytes()
    assert 0 < len(on_disk) < at  # what was in memory is lost
    assert on_disk == DATA[: len(on_disk)]

    client = await start(process)

    async def finished() -> bool:
        return (await task_of(client, task_id))["status"] in FINISHED

    await until(finished)
    task = await task_of(client, task_id)
    assert task["status"] == "completed", task
    assert (task["bytes_done"], task["bytes_total"]) == (len(DATA), len(DATA))
    second = http_server.requests_for("/k.bin")[1]
    assert second.headers["range"] == f"bytes={len(on_disk)}-"
    assert hashlib.sha256((dest / "k.bin").read_bytes()).digest() == hashlib.sha256(DATA).digest()
    assert sorted(path.name for path in dest.iterdir()) == ["k.bin"]
    await trio.aclose_forcefully(client.stream)


async def test_limits_of_0_are_no_limit_and_keep_the_thread(
    http_server: HTTPTestServer, client: HTTPClient, tmp_path: Path, receivers: list[Any]
) -> None:
    """A task's limit and the daemon's are always passed; 0 is none (the defaults)."""
    url = http_server.route("/z.bin", serve_data(DATA))
    result = await engine_download_item(
        client,
        DownloadItem(url),
        tmp_path,
        SETTINGS,
        ItemState(),
        owner=OWNER,
        limits=(RateLimit(0), RateLimit(0)),
    )
    assert (result.error, result.bytes) == (None, len(DATA))
    assert (tmp_path / "z.bin").read_bytes() == DATA
    assert len(receivers) == 1


async def test_a_limit_set_mid_body_takes_the_rest_back_to_the_loop(
    mock_clock: trio.testing.MockClock,
    http_server: HTTPTestServer,
    client: HTTPClient,
    tmp_path: Path,
    receivers: list[Any],
) -> None:
    """tasks.set_rate while the thread receives and the server is silent: the limit wakes
    the loop, the thread stops within one receive slice (keeping the connection), and the
    loop receives the rest under the limit. (With bytes flowing, the thread stops at its
    next report, after at most a buffer.)"""
    mock_clock.autojump_threshold = 0.05
    at = DIRECT_MIN_BYTES // 2
    release = trio.Event()
    url = http_server.route("/h.bin", held(DATA, at, release))
    limit = RateLimit(0)
    rate = 1 << 20
    done: list[ItemResult] = []

    async def download() -> None:
        done.append(
            await engine_download_item(
                client,
                DownloadItem(url),
                tmp_path,
                SETTINGS,
                ItemState(),
                owner=OWNER,
                limits=(limit,),
            )
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(download)
        while not receivers or receivers[0].position < at:  # noqa: ASYNC110 - a thread's counter
            await trio.sleep(0.001)
        limit.configure(rate)
        # Before another byte comes: the thread has handed the body back.
        await receivers[0].stopped.wait()
        released = trio.current_time()
        release.set()
    result = done[0]
    assert (result.error, result.bytes) == (None, len(DATA))
    assert (tmp_path / "h.bin").read_bytes() == DATA
    assert receivers[0].error is None
    assert receivers[0].position == at  # the thread handed the body back at once
    assert len(http_server.requests_for("/h.bin")) == 1  # on the same connection
    # Everything after the release was paced, less the bucket's starting burst.
    paced = len(DATA) - receivers[0].position
    assert trio.current_time() - released >= 0.95 * (paced / rate - BURST_SECONDS)
