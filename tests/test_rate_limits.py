"""Speed limits and the per-host cap (issue 14, item 10): ``[downloads] max_rate``, a task's
``rate_limit`` (``tasks.download``, ``tasks.set_rate``) and ``[downloads] max_per_host``.

The bucket is pure and tested as a table; the engine reads a real local server under a
limit on trio's MockClock, where the bytes over a window of mock seconds are exact
arithmetic (bounds of 5% leave room for a wake-up's worth of bytes). Real daemon processes
show another uid served while a task is held to its limit or a host's slots are all
taken: "served" means answered within ``SERVED_WITHIN`` seconds, a bound wide enough for a
busy two-core machine, never a timing assertion.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trio
import trio.testing

from statusd import store
from statusd.config import DownloadsConfig, load_config, render_config
from statusd.daemon import Daemon
from statusd.downloads import (
    DownloadItem,
    DownloadSettings,
    ItemResult,
    ItemState,
    download_item,
    files,
)
from statusd.downloads.files import Directory
from statusd.downloads.http import HTTPClient
from statusd.downloads.job import Downloads
from statusd.downloads.throttle import RateLimit
from statusd.errors import ConfigError
from statusd.state.bandwidth import MIN_BURST, ByteBucket, format_rate, parse_rate
from statusd.store import load as load_journal
from tests.conftest import RawClient, blocking_call, needs_root, nobody_may_connect, run_as_nobody
from tests.http_servers import (
    HTTPTestServer,
    Request,
    Responder,
    http_server,
    serve_data,
)
from tests.processes import finished, start, task_of, until
from tests.test_task_controls import Jobs, started
from tests.test_task_costs import compact_now, tasks_in
from tests.test_tasks import FakeJob, make_manager

__all__ = ["http_server"]

KiB = 1024
DATA = random.Random(14).randbytes(600 * KiB)
JUMP = 0.005  # MockClock's autojump threshold: file work runs in worker threads
SERVED_WITHIN = 5.0
# No stall rule and no retries here: what is measured is the limit alone.
SETTINGS = DownloadSettings(max_attempts=1)


# --- rates as people write them ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("0", 0),
        ("1048576", 1 << 20),
        ("500K", 500 * KiB),
        ("500k", 500 * KiB),
        ("2M", 2 << 20),
        ("2MB", 2 << 20),
        ("2MiB/s", 2 << 20),
        ("1.5G", 3 << 29),
        (" 64 K ", 64 * KiB),
    ],
)
def test_rates_are_written_like_curls(text: str, rate: int) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "-1", "2X", "1e3", "M", "2 M M", "2T", "9" * 20])
def test_bad_rates_say_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match="rate must be"):
        parse_rate(text)


def test_rates_are_shown_short() -> None:
    assert [format_rate(r) for r in (0, 1000, 500 * KiB, 2 << 20, 3 << 29)] == [
        "0",
        "1000",
        "500K",
        "2M",
        "1.5G",
    ]


# --- the bucket, pure ---------------------------------------------------------------------------


def test_a_reader_waits_for_what_it_overdrew() -> None:
    bucket = ByteBucket(1000, now=0.0)  # starts full: MIN_BURST bytes at once
    assert bucket.ready(bucket.take(MIN_BURST, 0.0), 0.0) == 0.0
    mark = bucket.take(500, 0.0)
    assert bucket.ready(mark, 0.0) == pytest.approx(0.5)
    assert bucket.ready(mark, 0.5) == 0.5


def test_readers_wait_in_turn_so_each_gets_its_share() -> None:
    bucket = ByteBucket(1000, now=0.0)
    bucket.take(MIN_BURST, 0.0)
    # Three readers each take 100 bytes: each waits behind the others' bytes.
    marks = [bucket.take(100, 0.0) for _ in range(3)]
    assert [bucket.ready(mark, 0.0) for mark in marks] == pytest.approx([0.1, 0.2, 0.3])


def test_idle_time_buys_no_more_than_the_burst() -> None:
    bucket = ByteBucket(100_000, now=0.0)
    burst = int(bucket.burst)
    assert burst == MIN_BURST  # a tenth of a second at 100,000 B/s is less
    bucket.take(burst, 0.0)  # empty it
    # An hour idle: a full burst, no more.
    assert bucket.ready(bucket.take(burst, 3600.0), 3600.0) == 3600.0
    assert bucket.ready(bucket.take(1000, 3600.0), 3600.0) == pytest.approx(3600.01)


def test_a_new_rate_applies_from_then_on_and_none_forgives_the_debt() -> None:
    bucket = ByteBucket(1000, now=0.0)
    bucket.take(MIN_BURST, 0.0)
    mark = bucket.take(10_000, 0.0)  # 10 s at 1000 B/s
    bucket.configure(2000, 1.0)  # 1000 granted by now; 9000 left at 2000 B/s
    assert bucket.ready(mark, 1.0) == pytest.approx(5.5)
    bucket.configure(0, 2.0)
    assert bucket.ready(mark, 2.0) == 2.0
    # Limited again: it starts with a full burst, not the old debt.
    bucket.configure(1000, 3.0)
    assert bucket.ready(bucket.take(MIN_BURST, 3.0), 3.0) == 3.0


def test_bucket_rates_are_checked() -> None:
    with pytest.raises(ValueError, match="must be whole bytes a second from 0"):
        ByteBucket(-1)
    with pytest.raises(ValueError, match="must be whole bytes a second from 0"):
        ByteBucket(True)


# --- the engine under limits, on MockClock against a real server ------------------------------


@pytest.fixture
async def client() -> AsyncIterator[HTTPClient]:
    async with HTTPClient() as client:
        yield client


@pytest.fixture
def dest(tmp_path: Path) -> Iterator[Directory]:
    # Opened here, not by each download in a thread: a thread that outlasts the autojump
    # threshold lets the clock jump to the test's next deadline with no byte read.
    directory = Directory.open(tmp_path / "downloads")
    yield directory
    directory.close()


@attrs.define
class Trace:
    """When each item held how many bytes (mock time)."""

    points: list[tuple[float, int]] = attrs.Factory(list)
    held: int = 0

    def on_bytes(self, delta: int, total: int | None) -> None:
        self.held += delta
        self.points.append((trio.current_time(), self.held))

    def at(self, moment: float) -> int:
        """What was held at ``moment``."""
        held = 0
        for when, value in self.points:
            if when > moment:
                break
            held = value
        return held


async def fetch(
    client: HTTPClient,
    url: str,
    dest: Directory,
    limits: tuple[RateLimit, ...],
    trace: Trace,
    settings: DownloadSettings = SETTINGS,
    owner: str = "t1-0",
) -> ItemResult:
    return await download_item(
        client,
        DownloadItem(url),
        dest,
        settings,
        ItemState(),
        owner=owner,
        on_bytes=trace.on_bytes,
        limits=limits,
    )


def window_rate(trace: Trace, start: float, end: float) -> float:
    return (trace.at(end) - trace.at(start)) / (end - start)


async def test_one_item_keeps_to_its_tasks_limit(
    mock_clock: trio.testing.MockClock,
    http_server: HTTPTestServer,
    client: HTTPClient,
    dest: Directory,
) -> None:
    mock_clock.autojump_threshold = JUMP
    url = http_server.route("/a.bin", serve_data(DATA))
    rate = 100 * KiB
    trace = Trace()
    started = trio.current_time()
    result = await fetch(client, url, dest, (RateLimit(rate), RateLimit(0)), trace)
    assert (result.error, result.bytes) == (None, len(DATA))
    rel = [(when - started, held) for when, held in trace.points]
    trace.points = rel
    # 600 KiB at 100 KiB/s: 6 s less the starting burst, and within 5% over any second.
    assert 5.5 <= rel[-1][0] <= 6.3
    for second in range(1, 5):
        assert window_rate(trace, second, second + 1) == pytest.approx(rate, rel=0.05)


async def test_parallel_items_share_their_tasks_limit_fairly(
    mock_clock: trio.testing.MockClock,
    http_server: HTTPTestServer,
    client: HTTPClient,
    dest: Directory,
) -> None:
    mock_clock.autojump_threshold = JUMP
    urls = [http_server.route(f"/{n}.bin", serve_data(DATA)) for n in range(3)]
    rate = 150 * KiB
    task = RateLimit(rate)
    traces = [Trace() for _ in urls]
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for n, (url, trace) in enumerate(zip(urls, traces, strict=True)):
            nursery.start_soon(fetch, client, url, dest, (task,), trace, SETTINGS, f"t1-{n}")
    for trace in traces:
        trace.points = [(when - started, held) for when, held in trace.points]
    # Together the task's rate; each a third of it, over the same windows.
    for second in (1, 3):
        shares = [window_rate(trace, second, second + 2) for trace in traces]
        assert sum(shares) == pytest.approx(rate, rel=0.05)
        for share in shares:
            assert share == pytest.approx(rate / 3, rel=0.1)


async def test_the_daemons_limit_holds_two_tasks_together_and_the_lower_limit_wins(
    mock_clock: trio.testing.MockClock,
    http_server: HTTPTestServer,
    client: HTTPClient,
    dest: Directory,
) -> None:
    mock_clock.autojump_threshold = JUMP
    urls = [http_server.route(f"/{n}.bin", serve_data(DATA)) for n in range(2)]
    daemon_wide = RateLimit(200 * KiB)
    # One task limited to 50 KiB/s, one not: the other takes the rest of the 200.
    tasks = [RateLimit(50 * KiB), RateLimit(0)]
    traces = [Trace(), Trace()]
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for n in range(2):
            limits = (tasks[n], daemon_wide)
            nursery.start_soon(fetch, client, urls[n], dest, limits, traces[n], SETTINGS, f"t{n}-0")
    for trace in traces:
        trace.points = [(when - started, held) for when, held in trace.points]
    slow, fast = (window_rate(trace, 1, 3) for trace in traces)
    assert slow == pytest.approx(50 * KiB, rel=0.05)
    assert slow + fast == pytest.approx(200 * KiB, rel=0.05)


async def test_a_new_rate_applies_at_once_also_to_a_waiting_item(
    mock_clock: trio.testing.MockClock,
    http_server: HTTPTestServer,
    client: HTTPClient,
    dest: Directory,
) -> None:
    mock_clock.autojump_threshold = JUMP
    url = http_server.route("/a.bin", serve_data(DATA))
    limit = RateLimit(20 * KiB)  # 30 s for the file
    trace = Trace()
    done = trio.Event()

    async def run() -> None:
        await fetch(client, url, dest, (limit,), trace)
        done.set()

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await trio.sleep(3)
        slow = window_rate(trace, started + 1, started + 3)
        limit.configure(200 * KiB)
        await trio.sleep(1.5)
        fast = window_rate(trace, started + 3.5, started + 4.5)
        assert fast == pytest.approx(200 * KiB, rel=0.05)
        changed = trio.current_time()
        limit.configure(0)  # none: the rest comes as fast as the server sends
        # Finishing the file runs in a thread (with an fsync): on a busy machine that can
        # outlast a short threshold and let the clock jump to fail_after's deadline.
        mock_clock.autojump_threshold = 0.5
        with trio.fail_after(60):
            await done.wait()
        # The last byte, not the end, for the same reason.
        assert trace.points[-1][0] - changed < 0.5
    assert slow == pytest.approx(20 * KiB, rel=0.05)


async def test_waits_for_the_limit_are_not_a_stall(
    mock_clock: trio.testing.MockClock,
    http_server: HTTPTestServer,
    client: HTTPClient,
    dest: Directory,
) -> None:
    """A limit below lowest_speed is the user's wish, not the server's slowness."""
    mock_clock.autojump_threshold = JUMP
    url = http_server.route("/a.bin", serve_data(DATA[: 40 * KiB]))
    stall = DownloadSettings(max_attempts=1, lowest_speed=1024, stall_timeout=5)
    trace = Trace()
    result = await fetch(client, url, dest, (RateLimit(512),), trace, stall)
    assert (result.error, result.bytes) == (None, 40 * KiB)
    assert trace.points[-1][0] > 40  # (40 KiB - the burst) at 512 B/s


# --- the per-host cap ---------------------------------------------------------------------------


@attrs.define
class Counting:
    """A handler that counts the requests in flight at once, each held until released."""

    data: bytes
    release: trio.Event = attrs.Factory(trio.Event)
    in_flight: int = 0
    peak: int = 0
    served: int = 0
    _changed: trio.Event = attrs.Factory(trio.Event)

    async def until_in_flight(self, count: int) -> None:
        while self.in_flight < count:
            await self._changed.wait()

    async def __call__(self, request: Request, responder: Responder) -> None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self._changed.set()
        self._changed = trio.Event()
        try:
            await self.release.wait()
            await responder.send(200, [], self.data)
            self.served += 1
        finally:
            self.in_flight -= 1


async def test_a_host_never_sees_more_than_max_per_host_requests_and_others_are_served(
    http_server: HTTPTestServer,
) -> None:
    counting = Counting(b"x" * 1000)
    url = http_server.route("/held", counting)
    other = http_server.route("/other", serve_data(b"y" * 1000))
    async with HTTPClient(max_per_host=3) as client:
        bodies: list[bytes] = []

        async def get(target: str) -> bytes:
            async with client.stream("GET", target) as response:
                body = await response.read()
            bodies.append(body)
            return body

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(get, url)
            with trio.fail_after(SERVED_WITHIN):
                await counting.until_in_flight(3)
                # Another host (the same server by another name) is served meanwhile.
                assert await get(other.replace("127.0.0.1", "localhost")) == b"y" * 1000
            assert client.requests_in_flight("127.0.0.1") == 3
            counting.release.set()
        assert counting.peak == 3
        assert bodies.count(b"x" * 1000) == 10
        assert client.requests_in_flight("127.0.0.1") == 0


def test_max_per_host_is_checked() -> None:
    with pytest.raises(ValueError, match="max_per_host must be >= 1, not 0"):
        HTTPClient(max_per_host=0)


# --- in the daemon ------------------------------------------------------------------------------


async def wait_end(client: RawClient, task_id: str) -> tuple[dict[str, Any], float]:
    """The task once its end is pushed (the caller subscribed), and the clock then."""
    while True:
        message = await client.receive()
        params = message.get("params", {})
        ended = params.get("status") in ("completed", "error", "cancelled")
        if message.get("method") == "task_update" and params["job_id"] == task_id and ended:
            at = trio.current_time()
            return await task_of(client, task_id), at


AFTER_CHANGE_JUMP = 1.0  # seconds of a quiet loop; a worker thread's hop stays well under it
THREAD_JUMP = 10.0  # the same while a thread works: a hop that long is a hang, not a slow one

_T = TypeVar("_T")


def hold_the_clock_while_threads_work(
    clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, threshold: float
) -> None:
    """Jump the clock after ``threshold`` seconds of a quiet loop, but not while the
    daemon's file, journal or other blocking work is in a thread: the loop is quiet then
    only because it waits for the thread, and a hop that outlasts a short threshold on a
    loaded machine jumped the clock to a far deadline (the hourly cleanup's, a
    ``fail_after``'s) or took whole throttle waits from the mock seconds measured."""
    working = 0

    def held(run: Callable[..., Awaitable[_T]]) -> Callable[..., Awaitable[_T]]:
        async def holding(*args: Any, **kwargs: Any) -> _T:
            nonlocal working
            working += 1
            clock.autojump_threshold = THREAD_JUMP
            try:
                return await run(*args, **kwargs)
            finally:
                working -= 1
                if not working:
                    clock.autojump_threshold = threshold

        return holding

    clock.autojump_threshold = threshold
    monkeypatch.setattr(files.ThreadPool, "run", held(files.ThreadPool.run))
    monkeypatch.setattr(store._Worker, "_wait", held(store._Worker._wait))
    monkeypatch.setattr(trio.to_thread, "run_sync", held(trio.to_thread.run_sync))


async def test_set_rate_changes_a_running_task_at_once_and_is_journalled(
    autojump_clock: trio.testing.MockClock,
    daemon: Daemon,
    connect: Any,
    http_server: HTTPTestServer,
) -> None:
    autojump_clock.autojump_threshold = 0.05
    url = http_server.route("/a.bin", serve_data(DATA))
    client = await connect()
    await client.call("subscribe", {"tasks": "all"})
    params = {"urls": [url], "rate_limit": 20 * KiB}  # 30 s for the file
    task_id = (await client.call("tasks.download", params))["task_id"]
    assert (await task_of(client, task_id))["rate_limit"] == 20 * KiB

    async def running() -> bool:
        status: str = (await task_of(client, task_id))["status"]
        return status == "running"

    # Its start is journalled in a worker thread: waited for here, not within a sleep
    # that a slow hop of that thread would let the clock jump past.
    await until(running)
    await trio.sleep(3)
    assert await running()  # held back by its limit
    # From here the rest needs no waits of its own, only the daemon's file and journal
    # work in worker threads: a hop of one that outlasts the threshold on a loaded machine
    # let the clock jump to the next deadline left, the hourly cleanup's (3,600 s).
    # Under the old limit the rest would still take 25 s of throttle waits, each one
    # jumped after this threshold, so the bound below still tells the two apart.
    autojump_clock.autojump_threshold = AFTER_CHANGE_JUMP
    changed = trio.current_time()
    assert await client.call("tasks.set_rate", {"task_id": task_id, "rate_limit": 0}) == {
        "success": True
    }
    task, ended = await wait_end(client, task_id)
    assert task["status"] == "completed"
    assert task["rate_limit"] == 0
    assert ended - changed < 20  # the old limit needed 25 s more
    records = load_journal(daemon.config.state_dir / "tasks.jsonl").records
    assert {"op": "update", "id": task_id, "set": {"rate_limit": 0}} in records


async def test_max_rate_and_max_per_host_change_on_reload(
    autojump_clock: trio.testing.MockClock,
    daemon: Daemon,
    connect: Any,
    http_server: HTTPTestServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Between throttle waits the daemon's file and journal work runs in threads; only the
    # waits may be jumped at once, or the window below measures a loaded machine.
    hold_the_clock_while_threads_work(autojump_clock, monkeypatch, 0.05)
    new = attrs.evolve(
        daemon.config,
        downloads=attrs.evolve(daemon.config.downloads, max_rate=100 * KiB, max_per_host=2),
    )
    assert await daemon.reload(lambda: new)
    counting = Counting(DATA[: 50 * KiB])
    urls = [http_server.route(f"/f{n}.bin", counting) for n in range(6)]
    client = await connect()
    await client.call("subscribe", {"tasks": "all"})
    task_id = (await client.call("tasks.download", {"urls": urls}))["task_id"]
    with trio.fail_after(60):
        await counting.until_in_flight(2)
    await trio.sleep(1)  # the others would have come by now
    assert counting.peak == 2
    started = trio.current_time()
    counting.release.set()
    task, ended = await wait_end(client, task_id)
    assert task["status"] == "completed"
    # 300 KiB at 100 KiB/s (max_rate), less the starting burst.
    assert 2.5 <= ended - started <= 3.6
    assert counting.peak == 2


async def test_the_default_cap_holds_a_task_of_many_items_to_6_requests(
    daemon: Daemon, connect: Any, http_server: HTTPTestServer
) -> None:
    assert daemon.config.downloads.parallel_items == 16
    assert daemon.config.downloads.max_per_host == 6
    counting = Counting(b"z" * 100)
    urls = [http_server.route(f"/m{n}.bin", counting) for n in range(12)]
    client = await connect()
    await client.call("subscribe", {"tasks": "all"})
    task_id = (await client.call("tasks.download", {"urls": urls}))["task_id"]
    with trio.fail_after(SERVED_WITHIN):
        await counting.until_in_flight(6)
    await trio.sleep(0.2)
    assert counting.peak == 6
    counting.release.set()
    task, _ = await wait_end(client, task_id)
    assert (task["status"], task["result"]["completed"], counting.peak) == ("completed", 12, 6)


@pytest.mark.parametrize(
    ("params", "field", "problem"),
    [
        ({"rate_limit": -1}, "rate_limit", "must be whole bytes a second from 0 (none)"),
        ({"rate_limit": 1 << 41}, "rate_limit", "must be whole bytes a second from 0 (none)"),
        ({"rate_limit": "2M"}, "rate_limit", ""),
        ({"rate_limit": True}, "rate_limit", ""),
        ({"rate_limit": 1.5}, "rate_limit", ""),
        ({}, "rate_limit", ""),
    ],
)
async def test_bad_rates_are_invalid_params_naming_the_field(
    daemon: Daemon,
    connect: Any,
    http_server: HTTPTestServer,
    params: dict[str, Any],
    field: str,
    problem: str,
) -> None:
    url = http_server.route("/a.bin", serve_data(b"a" * 10))
    client = await connect()
    for method, call in (
        ("tasks.download", {"urls": [url], **params}),
        ("tasks.set_rate", {"task_id": "t1", **params}),
    ):
        if method == "tasks.download" and not params:
            continue  # no rate_limit is none
        error = (await client.request(method, call))["error"]
        assert error["code"] == -32602, error
        assert field in str(error.get("data")) + error["message"]
        assert problem in error["message"]


async def test_set_rate_of_an_unknown_or_completed_task(
    daemon: Daemon, connect: Any, http_server: HTTPTestServer
) -> None:
    client = await connect()
    await client.call("subscribe", {"tasks": "all"})
    error = (await client.request("tasks.set_rate", {"task_id": "nope", "rate_limit": 0}))["error"]
    assert error["code"] == -32001
    url = http_server.route("/a.bin", serve_data(b"a" * 10))
    task_id = (await client.call("tasks.download", {"urls": [url]}))["task_id"]
    await wait_end(client, task_id)
    error = (await client.request("tasks.set_rate", {"task_id": task_id, "rate_limit": 1000}))[
        "error"
    ]
    assert error["code"] == -32003
    assert error["message"] == f"task {task_id} is completed and cannot be given a rate limit"


# --- config -------------------------------------------------------------------------------------


@pytest.fixture
def environ(tmp_path: Path) -> dict[str, str]:
    return {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "config")}


def load(environ: Mapping[str, str], text: str = "", **flags: Any) -> DownloadsConfig:
    path = Path(environ["XDG_CONFIG_HOME"]) / "statusd" / "statusd.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return load_config(flags, environ, 1000).downloads


def test_the_defaults(environ: dict[str, str]) -> None:
    downloads = load(environ)
    assert (downloads.max_rate, downloads.max_per_host) == (0, 6)
    service = Downloads(load_config({}, environ, 1000))
    assert service.max_rate.rate == 0
    assert service.client.max_per_host == 6


def test_the_keys_come_from_the_file_the_environment_and_flags(environ: dict[str, str]) -> None:
    text = '[downloads]\nmax_rate = "2M"\nmax_per_host = 8\n'
    assert (load(environ, text).max_rate, load(environ, text).max_per_host) == (2 << 20, 8)
    environ["STATUSD_DOWNLOADS_MAX_RATE"] = "500K"
    environ["STATUSD_DOWNLOADS_MAX_PER_HOST"] = "2"
    downloads = load(environ, text)
    assert (downloads.max_rate, downloads.max_per_host) == (500 * KiB, 2)
    downloads = load(environ, text, downloads_max_rate="1048576", downloads_max_per_host="1")
    assert (downloads.max_rate, downloads.max_per_host) == (1 << 20, 1)
    assert load({**environ, "STATUSD_DOWNLOADS_MAX_RATE": "0"}, text).max_rate == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("max_rate = -1", "downloads.max_rate: must be bytes a second from 0 (none) to "),
        ('max_rate = "fast"', "downloads.max_rate: must be bytes a second from 0 (none) to"),
        ("max_rate = 1.5", "downloads.max_rate: must be bytes a second"),
        ("max_rate = true", "downloads.max_rate: must be bytes a second"),
        ("max_per_host = 0", "downloads.max_per_host: must be an integer from 1 to 1024, not 0"),
        ("max_per_host = 2000", "downloads.max_per_host: must be an integer from 1 to 1024"),
    ],
)
def test_bad_values_are_refused(environ: dict[str, str], text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(environ, f"[downloads]\n{text}\n")
    assert str(caught.value).startswith(expected)


def test_the_keys_at_the_top_level_are_unknown(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"did you mean downloads.max_rate\?"):
        load(environ, "max_rate = 10\n")


def test_render_config_round_trips_the_keys(tmp_path: Path, environ: dict[str, str]) -> None:
    environ["XDG_RUNTIME_DIR"] = str(tmp_path)
    (tmp_path / "statusd").mkdir()
    config = load_config({}, environ, 1000)
    downloads = DownloadsConfig(max_rate=123_456, max_per_host=7)
    rendered = tmp_path / "rendered.toml"
    rendered.write_text(render_config(attrs.evolve(config, downloads=downloads)))
    assert load_config({"config": str(rendered)}, environ, 1000).downloads == downloads


# --- other users, with real daemon processes ----------------------------------------------------


@pytest.fixture
async def start_daemon(daemon_process: Any) -> AsyncIterator[Any]:
    clients: list[RawClient] = []

    async def _start(downloads: str) -> tuple[Any, RawClient]:
        process = daemon_process()
        config = process.directory / "statusd.toml"
        # nobody may reach the socket, for the other user's calls (made only as root).
        config.write_text(f"{nobody_may_connect()}[downloads]\n{downloads}\n")
        clients.append(await start(process, "--config", str(config)))
        return process, clients[-1]

    yield _start
    for client in clients:
        await trio.aclose_forcefully(client.stream)


def as_nobody(socket: Path, *calls: tuple[str, dict[str, Any] | None]) -> list[Any]:
    """Make ``calls`` as uid nobody; each answer, and that all came within SERVED_WITHIN."""

    def action() -> dict[str, Any]:
        started = time.monotonic()
        answers = [blocking_call(socket, method, params) for method, params in calls]
        return {"answers": answers, "took": time.monotonic() - started}

    outcome = run_as_nobody(action)
    assert outcome["took"] < SERVED_WITHIN, outcome
    answers: list[Any] = outcome["answers"]
    return answers


@needs_root
async def test_another_user_is_served_while_a_task_is_held_to_its_limit_and_a_host_is_full(
    start_daemon: Any, http_server: HTTPTestServer
) -> None:
    if os.getuid() != 0:
        pytest.skip(f"another user's task needs a second uid: running as uid {os.getuid()}")
    process, client = await start_daemon("max_per_host = 2")
    counting = Counting(b"h" * 1000)
    held = [http_server.route(f"/held{n}.bin", counting) for n in range(4)]
    # The limited task's host is "localhost", not the held one's: on 127.0.0.1 it could
    # take one of the two slots before the held items do, and the host would never be
    # full of held requests.
    slow = http_server.route("/slow.bin", serve_data(DATA)).replace("127.0.0.1", "localhost")
    mine = (await client.call("tasks.download", {"urls": held}))["task_id"]
    limited = (await client.call("tasks.download", {"urls": [slow], "rate_limit": 10 * KiB}))[
        "task_id"
    ]

    async def host_full() -> bool:
        return counting.in_flight == 2

    await until(host_full)
    # nobody's own task from another host completes while both hold theirs; nobody's
    # task from the full host waits; nobody can neither see nor limit root's task.
    theirs = http_server.route("/theirs.bin", serve_data(b"n" * 5000))
    answers = await trio.to_thread.run_sync(
        as_nobody,
        process.socket,
        ("tasks.download", {"urls": [theirs.replace("127.0.0.1", "localhost")]}),
        ("tasks.download", {"urls": [held[0]]}),
        ("daemon.info", None),
        ("tasks.set_rate", {"task_id": limited, "rate_limit": 0}),
    )
    their_task, their_held = (answer["result"]["task_id"] for answer in answers[:2])
    assert answers[2]["result"]["user"] == "nobody"
    assert answers[3]["error"]["code"] == -32001
    task = await finished(client, their_task)
    assert task["status"] == "completed"
    assert (await task_of(client, limited))["status"] == "running"
    assert counting.peak == 2
    # nobody may limit a task of their own, and the admin (root, here) anyone's.
    answers = await trio.to_thread.run_sync(
        as_nobody, process.socket, ("tasks.set_rate", {"task_id": their_held, "rate_limit": 1})
    )
    assert answers[0]["result"] == {"success": True}
    assert (await task_of(client, their_held))["rate_limit"] == 1
    await client.call("tasks.set_rate", {"task_id": their_held, "rate_limit": 0})
    await client.call("tasks.set_rate", {"task_id": limited, "rate_limit": 0})
    counting.release.set()
    for task_id in (limited, mine, their_held):
        assert (await finished(client, task_id))["status"] == "completed"
    assert counting.peak == 2


async def test_a_failed_tasks_new_rate_survives_a_compaction(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A finished task's compaction record is kept until it changes: a new rate changes it."""
    path = tmp_path / "tasks.jsonl"
    manager, _ = make_manager(path, factories={"fake": Jobs()})
    await nursery.start(manager.serve)
    job = FakeJob(total=1, fail_with="1 of 1 items failed")
    task_id = await started(manager, job)
    job.release.set()
    await manager.wait_finished(task_id)
    await compact_now(manager)
    await manager.set_rate_limit(task_id, 4096)
    await compact_now(manager)
    assert tasks_in(path)[task_id]["rate_limit"] == 4096
    nursery.cancel_scope.cancel()
