"""statusctl.client against a real daemon: the trio client, the blocking one, StatusMonitor."""

from __future__ import annotations

import functools
import os
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from statusctl.client import (
    SOCKET_ENV,
    Client,
    ConnectionLost,
    DaemonUnreachable,
    Push,
    RemoteError,
    StatusMonitor,
    _PushBuffer,
    open_client,
    resolve_socket_path,
)
from statusd.config import default_socket_path
from statusd.daemon import Daemon, run
from statusd.state.status import Level
from tests.conftest import make_config

WAIT = 10.0  # generous upper bound for anything that should take milliseconds


def _status(push: Push) -> tuple[int, str]:
    assert push.method == "status", push
    return push.params["seq"], push.params["message"]


# -- socket discovery ------------------------------------------------------------------------


def test_socket_flag_wins_over_environment() -> None:
    environ = {SOCKET_ENV: "/env/statusd.sock", "XDG_RUNTIME_DIR": "/run/user/7"}
    assert resolve_socket_path("/flag.sock", environ) == Path("/flag.sock")
    assert resolve_socket_path(None, environ) == Path("/env/statusd.sock")


def test_socket_default_is_the_daemons() -> None:
    environ = {"XDG_RUNTIME_DIR": "/run/user/7", "RUNTIME_DIRECTORY": "/run/unit"}
    assert resolve_socket_path(None, environ) == default_socket_path(environ)
    assert resolve_socket_path("", environ) == Path("/run/unit/statusd.sock")


# -- the push buffer (pure) ------------------------------------------------------------------


def test_push_buffer_drops_oldest_and_reports_first() -> None:
    buffer = _PushBuffer(2)
    for seq in range(1, 6):
        buffer.append(Push("status", {"seq": seq}))
    assert buffer.pop() == Push("dropped", {"stream": "status", "count": 3})
    assert buffer.pop() == Push("status", {"seq": 4})
    assert buffer.pop() == Push("status", {"seq": 5})
    assert buffer.pop() is None
    assert buffer.dropped == 3


def test_push_buffer_losing_a_notice_keeps_its_count() -> None:
    buffer = _PushBuffer(1)
    buffer.append(Push("dropped", {"stream": "status", "count": 7}))
    buffer.append(Push("status", {"seq": 9}))
    assert buffer.pop() == Push("dropped", {"stream": "status", "count": 7})
    assert buffer.pop() == Push("status", {"seq": 9})


def test_push_buffer_limit_is_checked() -> None:
    with pytest.raises(ValueError, match="max_pushes must be >= 1, not 0"):
        _PushBuffer(0)


# -- the trio client -------------------------------------------------------------------------


async def test_call_returns_the_result(daemon: Daemon) -> None:
    async with open_client(daemon.config.socket) as client:
        info = await client.call("daemon.info")
    assert info["pid"] == os.getpid()
    assert info["socket"] == str(daemon.config.socket)


async def test_pipelined_calls_each_get_their_own_answer(daemon: Daemon) -> None:
    seqs: dict[str, int] = {}
    async with open_client(daemon.config.socket) as client:

        async def publish(text: str) -> None:
            result = await client.call("status.publish", {"level": "info", "message": text})
            seqs[text] = result["seq"]

        async with trio.open_nursery() as nursery:
            for index in range(50):
                nursery.start_soon(publish, f"message {index}")
        recent = await client.call("status.recent", {"since": 1})
    assert sorted(seqs.values()) == list(range(2, 52))
    published = {message["message"]: message["seq"] for message in recent["messages"]}
    assert published == seqs


async def test_error_answer_is_remote_error_and_the_connection_stays(daemon: Daemon) -> None:
    async with open_client(daemon.config.socket) as client:
        with pytest.raises(RemoteError) as caught:
            await client.call("status.publish", {"level": "loud", "message": "x"})
        assert caught.value.code == -32602
        assert caught.value.name == "invalid params"
        assert caught.value.message.startswith("level: must be one of")
        assert caught.value.data["field"] == "level"
        with pytest.raises(RemoteError) as unknown:
            await client.call("no.such.method")
        assert unknown.value.code == -32601
        assert (await client.call("daemon.info"))["version"]


async def test_errors_from_the_block_are_not_wrapped_in_a_group(daemon: Daemon) -> None:
    with pytest.raises(RemoteError):
        async with open_client(daemon.config.socket) as client:
            await client.call("no.such.method")
    with pytest.raises(KeyError):
        async with open_client(daemon.config.socket):
            raise KeyError("mine")


async def test_an_outer_cancellation_leaves_quietly(daemon: Daemon) -> None:
    with trio.move_on_after(0.01) as scope:
        async with open_client(daemon.config.socket) as client, client.subscribe():
            await trio.sleep_forever()
    assert scope.cancelled_caught


async def test_leaving_subscribe_by_cancellation_still_unsubscribes(daemon: Daemon) -> None:
    async with open_client(daemon.config.socket) as client:
        with trio.move_on_after(0.01) as scope:
            async with client.subscribe():
                await trio.sleep_forever()
        assert scope.cancelled_caught
        # The unsubscribe ran shielded and was answered, so the daemon stopped streaming.
        assert daemon.channel.statistics().watchers == 0
        assert (await client.call("daemon.info"))["version"]


async def test_a_cancelled_call_leaves_the_connection_usable(daemon: Daemon) -> None:
    async with open_client(daemon.config.socket) as client:
        with trio.CancelScope() as scope:
            scope.cancel()
            await client.call("daemon.info")
        with trio.move_on_after(0.001):
            while True:
                await client.call("status.recent")
        assert (await client.call("daemon.info"))["version"]


async def test_unreachable_names_the_path(short_tmp: Path) -> None:
    missing = short_tmp / "nobody.sock"
    with pytest.raises(DaemonUnreachable) as caught:
        async with open_client(missing):
            pass  # pragma: no cover
    assert str(caught.value) == f"cannot connect to statusd at {missing}: no such file or directory"


async def test_subscribe_streams_status_in_order(daemon: Daemon) -> None:
    async with (
        open_client(daemon.config.socket) as watcher,
        open_client(daemon.config.socket) as publisher,
    ):
        async with watcher.subscribe(status=True) as events:
            assert events.id
            for index in range(5):
                await publisher.call("status.publish", {"level": "info", "message": f"m{index}"})
            received = []
            with trio.fail_after(WAIT):
                async for push in events:
                    received.append(_status(push))
                    if len(received) == 5:
                        break
        assert received == [(seq, f"m{seq - 2}") for seq in range(2, 7)]
        # Unsubscribed: nothing more comes, and the client still answers calls.
        await publisher.call("status.publish", {"level": "info", "message": "after"})
        assert (await watcher.call("daemon.info"))["status_seq"] == 7
        with trio.move_on_after(0.05):
            pytest.fail(f"pushed after unsubscribe: {await watcher.next_push()}")


async def test_subscribe_since_replays_the_history(daemon: Daemon) -> None:
    daemon.channel.publish_status(Level.SUCCESS, "earlier", "op-1")
    async with open_client(daemon.config.socket) as client, client.subscribe(since=0) as events:
        with trio.fail_after(WAIT):
            first = await events.__anext__()
            second = await events.__anext__()
    assert _status(first) == (1, "System ready")
    assert second.params["operation_id"] == "op-1"
    assert second.params["level"] == "success"


async def test_daemon_going_away_ends_the_stream(daemon: Daemon) -> None:
    received: list[tuple[int, str]] = []

    async def watch_while_the_daemon_stops() -> None:
        async with open_client(daemon.config.socket) as client, client.subscribe() as events:
            daemon.request_stop()
            with trio.fail_after(WAIT):
                async for push in events:
                    received.append(_status(push))

    with pytest.raises(ConnectionLost) as caught:
        await watch_while_the_daemon_stops()
    assert received == [(2, "Stopping operations...")]
    assert "the daemon closed the connection" in str(caught.value)
    assert str(daemon.config.socket) in str(caught.value)


async def test_too_many_connections_is_the_daemons_error(
    nursery: trio.Nursery, short_tmp: Path
) -> None:
    small: Daemon = await nursery.start(run, make_config(short_tmp, max_connections=1))
    try:
        async with open_client(small.config.socket) as first:
            assert (await first.call("daemon.info"))["version"]
            async with open_client(small.config.socket) as second:
                with pytest.raises(RemoteError) as caught:
                    await second.call("daemon.info")
            assert caught.value.code == -32004
            with pytest.raises(RemoteError) as blocking:
                await trio.to_thread.run_sync(_blocking_info, small.config.socket)
            assert blocking.value.code == -32004
    finally:
        small.request_stop()
        await small.wait_stopped()


def _blocking_info(path: Path) -> Any:
    with Client(path, timeout=WAIT) as client:
        return client.call("daemon.info")


# -- the blocking client ---------------------------------------------------------------------


async def test_blocking_client_calls_and_errors(daemon: Daemon) -> None:
    def work() -> tuple[Any, RemoteError]:
        with Client(daemon.config.socket, timeout=WAIT) as client:
            result = client.call("status.publish", {"level": "warning", "message": "hi"})
            try:
                client.call("status.publish", {"level": "nope", "message": "x"})
            except RemoteError as error:
                return result, error
        raise AssertionError("no error")  # pragma: no cover

    result, error = await trio.to_thread.run_sync(work)
    assert result == {"seq": 2}
    assert error.code == -32602
    assert error.to_wire()["data"]["field"] == "level"


async def test_blocking_client_unreachable(short_tmp: Path) -> None:
    missing = short_tmp / "gone.sock"
    with pytest.raises(DaemonUnreachable, match=f"cannot connect to statusd at {missing}: "):
        Client(missing)


async def test_blocking_client_pushes_and_timeouts(daemon: Daemon) -> None:
    def work() -> list[Push]:
        with Client(daemon.config.socket, timeout=WAIT) as client:
            client.subscribe(since=0)
            first = client.next_push(timeout=WAIT)
            with pytest.raises(TimeoutError, match="no pushed message"):
                client.next_push(timeout=0.05)
            # Pushes that arrive while a call waits for its answer are kept for later.
            client.call("status.publish", {"level": "info", "message": "two"})
            client.call("status.publish", {"level": "info", "message": "three"})
            return [first, client.next_push(timeout=WAIT), client.next_push(timeout=WAIT)]

    pushes = await trio.to_thread.run_sync(work)
    assert [_status(push) for push in pushes] == [(1, "System ready"), (2, "two"), (3, "three")]


async def test_blocking_client_abort_unblocks_a_waiting_thread(daemon: Daemon) -> None:
    client = Client(daemon.config.socket, timeout=WAIT)
    # Blocking calls go to a thread: the daemon runs on this one.
    await trio.to_thread.run_sync(functools.partial(client.subscribe))
    outcome: list[BaseException] = []

    def wait_for_push() -> None:
        try:
            client.next_push()
        except ConnectionLost as exc:
            outcome.append(exc)

    thread = threading.Thread(target=wait_for_push)
    thread.start()
    try:
        # Give the thread a moment to block in recv(); abort works either way.
        await trio.sleep(0.05)
        client.abort()
        await trio.to_thread.run_sync(thread.join, WAIT)
        assert not thread.is_alive()
        assert len(outcome) == 1
        assert "the connection was aborted" in str(outcome[0])
        with pytest.raises(ConnectionLost):
            client.call("daemon.info")  # fails at once: no wait for the daemon
    finally:
        client.close()


# -- StatusMonitor ---------------------------------------------------------------------------


class Collector:
    """Callbacks for a StatusMonitor: they run on its thread, so they only queue."""

    def __init__(self) -> None:
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self.dropped: queue.Queue[int] = queue.Queue()
        self.threads: set[str] = set()

    def status(self, message: dict[str, Any]) -> None:
        self.threads.add(threading.current_thread().name)
        self.messages.put(message)

    def take(self, count: int) -> list[tuple[int, str]]:
        taken = []
        for _ in range(count):
            message = self.messages.get(timeout=WAIT)
            taken.append((message["seq"], message["message"]))
        return taken

    async def receive(self, count: int) -> list[tuple[int, str]]:
        return await trio.to_thread.run_sync(self.take, count)


async def _wait_connected(monitor: StatusMonitor) -> None:
    assert await trio.to_thread.run_sync(monitor.wait_connected, WAIT)


async def _stop(monitor: StatusMonitor) -> float:
    started = time.monotonic()
    await trio.to_thread.run_sync(monitor.stop_monitoring)
    return time.monotonic() - started


async def test_monitor_delivers_in_fifo_order_on_its_thread(daemon: Daemon) -> None:
    collector = Collector()
    monitor = StatusMonitor(daemon.config.socket, collector.status)
    monitor.start_monitoring()
    try:
        await _wait_connected(monitor)
        for index in range(20):
            daemon.channel.publish_status(Level.INFO, f"step {index}")
        received = await collector.receive(20)
        assert received == [(index + 2, f"step {index}") for index in range(20)]
        assert collector.threads == {"statusd-monitor"}
        assert monitor.last_seq == 21
    finally:
        elapsed = await _stop(monitor)
    assert elapsed < 1.0
    assert not monitor.monitoring
    assert collector.messages.empty()


async def test_monitor_stops_promptly_while_reconnecting(short_tmp: Path) -> None:
    monitor = StatusMonitor(short_tmp / "absent.sock", Collector().status, min_backoff=5.0)
    monitor.start_monitoring()
    await trio.sleep(0.05)
    assert monitor.monitoring
    assert not monitor.connected
    assert await _stop(monitor) < 1.0
    assert not monitor.monitoring


async def test_monitor_survives_a_failing_callback(daemon: Daemon, caplog: Any) -> None:
    collector = Collector()

    def flaky(message: dict[str, Any]) -> None:
        if message["message"] == "boom":
            raise RuntimeError("ui bug")
        collector.status(message)

    monitor = StatusMonitor(daemon.config.socket, flaky)
    monitor.start_monitoring()
    try:
        await _wait_connected(monitor)
        daemon.channel.publish_status(Level.INFO, "boom")
        daemon.channel.publish_status(Level.INFO, "fine")
        assert await collector.receive(1) == [(3, "fine")]
    finally:
        await _stop(monitor)
    assert "ui bug" in caplog.text


async def test_monitor_reports_drops_from_the_history(
    nursery: trio.Nursery, short_tmp: Path
) -> None:
    small: Daemon = await nursery.start(run, make_config(short_tmp, status_history=3))
    for index in range(6):
        small.channel.publish_status(Level.INFO, f"old {index}")
    collector = Collector()
    monitor = StatusMonitor(
        small.config.socket, collector.status, dropped_callback=collector.dropped.put, since=0
    )
    monitor.start_monitoring()
    try:
        assert (
            await trio.to_thread.run_sync(functools.partial(collector.dropped.get, timeout=WAIT))
            == 4
        )
        assert await collector.receive(3) == [(5, "old 3"), (6, "old 4"), (7, "old 5")]
    finally:
        await _stop(monitor)
        small.request_stop()
        await small.wait_stopped()


async def test_monitor_reconnects_after_a_restart_and_catches_up(
    nursery: trio.Nursery, short_tmp: Path
) -> None:
    config = make_config(short_tmp)
    first: Daemon = await nursery.start(run, config)
    collector = Collector()
    monitor = StatusMonitor(config.socket, collector.status, min_backoff=0.05, max_backoff=0.2)
    monitor.start_monitoring()
    try:
        await _wait_connected(monitor)
        first.channel.publish_status(Level.INFO, "before restart")
        assert await collector.receive(1) == [(2, "before restart")]

        first.request_stop()
        await first.wait_stopped()
        assert await collector.receive(1) == [(3, "Stopping operations...")]

        # Published before the monitor is back: they must come from the new daemon's
        # history, numbered from 1 again.
        second: Daemon = await nursery.start(run, config)
        second.channel.publish_status(Level.INFO, "after restart 1")
        second.channel.publish_status(Level.INFO, "after restart 2")
        received = await collector.receive(3)
        assert received == [(1, "System ready"), (2, "after restart 1"), (3, "after restart 2")]
        await _wait_connected(monitor)
        second.channel.publish_status(Level.SUCCESS, "live again")
        assert await collector.receive(1) == [(4, "live again")]
        second.request_stop()
        await second.wait_stopped()
    finally:
        await _stop(monitor)
    assert not monitor.monitoring


def test_monitor_follows_a_daemon_process_across_restarts(daemon_process: Any) -> None:
    process = daemon_process()
    process.start()
    collector = Collector()
    monitor = StatusMonitor(process.socket, collector.status, min_backoff=0.05, max_backoff=0.5)
    monitor.start_monitoring()
    try:
        assert monitor.wait_connected(WAIT)
        with Client(process.socket, timeout=WAIT) as client:
            client.call("status.publish", {"level": "info", "message": "one"})
        assert collector.take(1) == [(2, "one")]

        process.signal(signal.SIGTERM)
        assert process.wait() == 0
        assert collector.take(1) == [(3, "Stopping operations...")]

        process.start()
        with Client(process.socket, timeout=WAIT) as client:
            client.call("status.publish", {"level": "info", "message": "two"})
        assert collector.take(2) == [(1, "System ready"), (2, "two")]
    finally:
        monitor.stop_monitoring()
    assert not monitor.monitoring


def test_monitor_refuses_a_second_start(short_tmp: Path) -> None:
    monitor = StatusMonitor(short_tmp / "x.sock", Collector().status)
    monitor.start_monitoring()
    try:
        with pytest.raises(RuntimeError, match="already running"):
            monitor.start_monitoring()
    finally:
        monitor.stop_monitoring()
