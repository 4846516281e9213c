"""The daemon as a whole: readiness, status messages, shutdown, signals, stale sockets."""

from __future__ import annotations

import os
import signal
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
import trio

from statusd.daemon import Daemon, run
from statusd.errors import StartupError
from tests.conftest import RawClient, make_config


async def test_ready_means_the_socket_accepts(daemon: Daemon) -> None:
    client = await RawClient.connect(daemon.config.socket)
    info = await client.call("daemon.info")
    assert info["pid"] == os.getpid()
    assert info["socket"] == str(daemon.config.socket)
    assert info["admin"] is True  # the daemon's own uid
    assert info["status_seq"] == 1
    assert info["tasks"]["total"] == 0
    mode = stat.S_IMODE(daemon.config.socket.stat().st_mode)
    assert mode == 0o660
    await client.aclose()


async def test_system_ready_is_published(daemon: Daemon) -> None:
    client = await RawClient.connect(daemon.config.socket)
    recent = await client.call("status.recent")
    assert [(m["level"], m["message"]) for m in recent["messages"]] == [("info", "System ready")]
    await client.aclose()


async def test_config_file_message_and_orderly_stop(short_tmp: Path) -> None:
    config_file = short_tmp / "statusd.toml"
    config_file.write_text("max_connections = 10\n")
    config = make_config(short_tmp, config_file=config_file)
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(run, config)
        subscriber = await RawClient.connect(config.socket)
        await subscriber.call("subscribe", {"since": 0})
        seen = [(await subscriber.receive())["params"]["message"] for _ in range(2)]
        assert seen == ["Configuration loaded from file", "System ready"]
        daemon.request_stop()
        stopping = await subscriber.receive()
        assert stopping["params"]["level"] == "warning"
        assert stopping["params"]["message"] == "Stopping operations..."
        with pytest.raises(EOFError):
            await subscriber.receive()
        await subscriber.aclose()
        await daemon.wait_stopped()
    assert not config.socket.exists()


async def test_idle_client_does_not_hold_up_shutdown(short_tmp: Path) -> None:
    config = make_config(short_tmp)
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(run, config)
        idle = await trio.open_unix_socket(str(config.socket))
        half_line = await trio.open_unix_socket(str(config.socket))
        await half_line.send_all(b'{"jsonrpc":"2.0","id":1,"me')
        with trio.fail_after(5):
            daemon.request_stop()
            await daemon.wait_stopped()
        assert await idle.receive_some(100) == b""
        await idle.aclose()
        await half_line.aclose()


async def test_stale_socket_file_is_replaced(short_tmp: Path) -> None:
    config = make_config(short_tmp)
    # A socket file nobody listens on: what a SIGKILLed daemon leaves.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(config.socket))
    dead.close()
    assert config.socket.exists()
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(run, config)
        client = await RawClient.connect(config.socket)
        assert (await client.call("daemon.info"))["pid"] == os.getpid()
        await client.aclose()
        daemon.request_stop()


async def test_regular_file_at_socket_path_is_left_alone(short_tmp: Path) -> None:
    config = make_config(short_tmp)
    config.socket.write_text("precious")
    with pytest.RaisesGroup(
        pytest.RaisesExc(StartupError, match="exists and is not a socket"), flatten_subgroups=True
    ):
        async with trio.open_nursery() as nursery:
            await nursery.start(run, config)
    assert config.socket.read_text() == "precious"


def test_sigterm_stops_cleanly_and_removes_the_socket(daemon_process: Any) -> None:
    process = daemon_process()
    process.start()
    process.signal(signal.SIGTERM)
    assert process.wait() == 0
    assert not process.socket.exists()
    assert "stopped" in process.stderr()


def test_sigint_stops_cleanly(daemon_process: Any) -> None:
    process = daemon_process()
    process.start()
    process.signal(signal.SIGINT)
    assert process.wait() == 0
    assert not process.socket.exists()


def test_second_daemon_refuses_and_first_is_untouched(daemon_process: Any) -> None:
    first = daemon_process()
    first.start()
    second = daemon_process()
    # Its own state directory, so the socket is what stops it (tests/test_state_lock.py
    # has two daemons on one state directory).
    second.start("--state-dir", str(first.directory / "other-state"), wait=False)
    assert second.wait() == 1
    assert "already listening" in second.stderr()
    assert first.process.poll() is None
    assert first.socket.exists()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.connect(str(first.socket))
        probe.sendall(b'{"jsonrpc":"2.0","id":1,"method":"daemon.info"}\n')
        assert b'"result"' in probe.recv(65536)


def test_restart_after_sigkill_replaces_the_stale_socket(daemon_process: Any) -> None:
    first = daemon_process()
    first.start()
    first.signal(signal.SIGKILL)
    first.wait()
    assert first.socket.exists()  # nobody cleaned up after a SIGKILL
    second = daemon_process()
    second.start()
    assert "stale socket" in _stderr_after_stop(second)


def _stderr_after_stop(process: Any) -> str:
    process.signal(signal.SIGTERM)
    assert process.wait() == 0
    text: str = process.stderr()
    return text


def test_socket_in_missing_directory_is_a_config_error(short_tmp: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "statusd", "--socket", str(short_tmp / "nope" / "s.sock")],
        env=dict(os.environ, HOME=str(short_tmp)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "socket" in result.stderr
    assert "does not exist" in result.stderr
