"""The statusctl command, run as a process against a real daemon; and its pure rendering."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from statusctl import render
from statusctl.cli import main
from statusctl.client import SOCKET_ENV, open_client
from statusd.daemon import Daemon, run
from statusd.state.status import Level
from tests.conftest import make_config

REPO = Path(__file__).resolve().parent.parent
WAIT = 15.0  # a fresh interpreter has to start; the work itself takes milliseconds
STATUS_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z  #(\d+) (\w+) +(.*?)(?:  \[(.+)\])?$"
)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(SOCKET_ENV, None)
    # The child imports statusctl from this checkout, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "statusctl", *args]


async def statusctl(*args: str, env: dict[str, str] | None = None) -> Any:
    """Run statusctl to completion; returns the CompletedProcess (text decoded)."""
    with trio.fail_after(WAIT):
        done = await trio.run_process(
            _command(*args),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=_env() if env is None else env,
        )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


class Lines:
    """Read a process's output line by line."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> str:
        while b"\n" not in self._buffer:
            data = await self._stream.receive_some(65536)
            if not data:
                raise EOFError(f"output ended; unfinished line: {self._buffer!r}")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    async def rest(self) -> str:
        chunks = [self._buffer]
        while data := await self._stream.receive_some(65536):
            chunks.append(bytes(data))
        self._buffer = b""
        return b"".join(chunks).decode()


async def _wait_for_watchers(daemon: Daemon, count: int) -> None:
    # A subscription registers a watcher on the channel: that is when watch is ready. The
    # subscriber is another process, so there is no event here to wait on; poll.
    while daemon.channel.statistics().watchers < count:  # noqa: ASYNC110
        await trio.sleep(0.01)


async def _reap(process: trio.Process) -> None:
    """Leave no process and no open pipe behind, whatever the test did."""
    if process.returncode is None:
        process.kill()
    with trio.fail_after(WAIT):
        await process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            await stream.aclose()


# -- one-shot commands -----------------------------------------------------------------------


async def test_info(daemon: Daemon) -> None:
    socket = str(daemon.config.socket)
    human = await statusctl("--socket", socket, "info")
    assert human.returncode == 0, human.stderr
    assert f"pid:        {os.getpid()}\n" in human.stdout
    assert f"socket:     {socket}\n" in human.stdout
    assert "websocket:  off\n" in human.stdout
    assert human.stderr == ""

    machine = await statusctl("--socket", socket, "--json", "info")
    assert machine.returncode == 0
    assert machine.stdout.count("\n") == 1
    info = json.loads(machine.stdout)
    assert info["pid"] == os.getpid()
    assert info["status_seq"] == 1


async def test_publish_prints_the_seq_and_status_lists_it(daemon: Daemon) -> None:
    socket = str(daemon.config.socket)
    published = await statusctl(
        "--socket", socket, "publish", "warning", "Disk nearly full", "--operation-id", "op-7"
    )
    assert (published.returncode, published.stdout, published.stderr) == (0, "2\n", "")
    await statusctl("--socket", socket, "publish", "success", "two\nlines")

    listed = await statusctl("--socket", socket, "status")
    assert listed.returncode == 0
    lines = listed.stdout.splitlines()
    assert [STATUS_LINE.match(line) is not None for line in lines] == [True] * 3
    matches = [STATUS_LINE.match(line) for line in lines]
    assert [m.groups() for m in matches if m] == [
        ("1", "info", "System ready", None),
        ("2", "warning", "Disk nearly full", "op-7"),
        ("3", "success", "two\\nlines", None),
    ]

    since = await statusctl("--socket", socket, "--json", "status", "--since", "2")
    assert since.returncode == 0
    result = json.loads(since.stdout)
    assert [m["message"] for m in result["messages"]] == ["two\nlines"]
    assert result["dropped"] == 0


async def test_status_says_how_much_history_was_lost(
    nursery: trio.Nursery, short_tmp: Path
) -> None:
    small: Daemon = await nursery.start(run, make_config(short_tmp, status_history=2))
    try:
        for index in range(4):
            small.channel.publish_status(Level.INFO, f"m{index}")
        listed = await statusctl("--socket", str(small.config.socket), "status")
        assert listed.returncode == 0
        lines = listed.stdout.splitlines()
        assert lines[0] == "(3 status messages before these are no longer held)"
        assert [line.split()[-1] for line in lines[1:]] == ["m2", "m3"]
    finally:
        small.request_stop()
        await small.wait_stopped()


async def test_socket_comes_from_the_environment(daemon: Daemon) -> None:
    done = await statusctl(
        "--json", "publish", "info", "via env", env=_env(STATUSD_SOCKET=str(daemon.config.socket))
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"seq": 2}


async def test_unreachable_daemon_is_exit_3(short_tmp: Path) -> None:
    missing = short_tmp / "nobody-home.sock"
    for args in (["info"], ["--json", "status"], ["watch"]):
        done = await statusctl("--socket", str(missing), *args)
        assert done.returncode == 3
        assert done.stdout == ""
        assert done.stderr == (
            f"statusctl: cannot connect to statusd at {missing}: no such file or directory\n"
        )


async def test_daemon_error_is_exit_4(daemon: Daemon) -> None:
    socket = str(daemon.config.socket)
    human = await statusctl("--socket", socket, "publish", "loud", "hello")
    assert human.returncode == 4
    assert human.stdout == ""
    assert human.stderr.startswith("statusctl: level: must be one of info, ")

    machine = await statusctl("--socket", socket, "--json", "status", "--since", "-1")
    assert machine.returncode == 4
    error = json.loads(machine.stdout)
    assert error["code"] == -32602
    assert error["data"]["field"] == "since"
    assert machine.stderr == "statusctl: since: must be >= 0, not -1\n"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["publish", "info"],
        ["status", "--since", "soon"],
        ["watch", "--task", "1", "--topic", "x"],
    ],
)
def test_usage_errors_are_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--socket", "/nonexistent/statusd.sock", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "usage: statusctl" in captured.err


def test_version_and_help_are_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("statusctl ")
    assert main(["--help"]) == 0
    help_text = capsys.readouterr().out
    for name in ("info", "publish", "status", "watch"):
        assert name in help_text


# -- watch -----------------------------------------------------------------------------------


async def test_watch_json_prints_messages_in_order_until_ctrl_c(daemon: Daemon) -> None:
    socket = str(daemon.config.socket)
    process = await trio.lowlevel.open_process(
        _command("--socket", socket, "--json", "watch", "--status-only"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    try:
        assert process.stdout is not None
        assert process.stderr is not None
        output = Lines(process.stdout)
        with trio.fail_after(WAIT):
            await _wait_for_watchers(daemon, 1)
            async with open_client(socket) as publisher:
                for index in range(10):
                    params = {"level": "info", "message": f"step {index}"}
                    await publisher.call("status.publish", params)
            pushes = [json.loads(await output.next()) for _ in range(10)]
        assert [push["method"] for push in pushes] == ["status"] * 10
        assert [push["params"]["seq"] for push in pushes] == list(range(2, 12))
        assert [push["params"]["message"] for push in pushes] == [f"step {i}" for i in range(10)]

        process.send_signal(signal.SIGINT)
        with trio.fail_after(WAIT):
            assert await process.wait() == 0
            assert await output.rest() == ""
            assert await Lines(process.stderr).rest() == ""
    finally:
        await _reap(process)


async def test_watch_waits_for_the_daemon_when_it_stops(daemon: Daemon) -> None:
    # Giving up after a minute without one: tests/test_statusctl_people.py.
    socket = str(daemon.config.socket)
    process = await trio.lowlevel.open_process(
        _command("--socket", socket, "watch"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    try:
        assert process.stdout is not None
        assert process.stderr is not None
        output = Lines(process.stdout)
        with trio.fail_after(WAIT):
            await _wait_for_watchers(daemon, 1)
            daemon.channel.publish_status(Level.ERROR, "Failed to download file", "op-1")
            first = STATUS_LINE.match(await output.next())
            assert first is not None
            assert first.groups() == ("2", "error", "Failed to download file", "op-1")

            daemon.request_stop()
            last = STATUS_LINE.match(await output.next())
            assert last is not None
            assert last.groups() == ("3", "warning", "Stopping operations...", None)
            errors = Lines(process.stderr)
            assert await errors.next() == "statusctl: daemon went away; reconnecting..."
            process.send_signal(signal.SIGINT)
            assert await process.wait() == 0
            assert await errors.rest() == ""
    finally:
        await _reap(process)


# -- rendering (pure) ------------------------------------------------------------------------


def test_status_line_format() -> None:
    message = {
        "seq": 42,
        "timestamp": "2026-11-23T10:30:00.123Z",
        "level": "info",
        "message": "System ready",
        "operation_id": "op-id",
    }
    assert render.format_status(message) == (
        "2026-11-23T10:30:00.123Z  #42 info     System ready  [op-id]"
    )
    message.update(level="success", operation_id=None)
    assert render.format_status(message) == "2026-11-23T10:30:00.123Z  #42 success  System ready"


def test_status_line_escapes_control_characters() -> None:
    message = {"seq": 1, "timestamp": "t", "level": "info", "message": "a\nb\x1b[31mc\x9b"}
    assert render.format_status(message) == "t  #1 info     a\\nb\\x1b[31mc\\x9b"


def test_info_block() -> None:
    lines = render.format_info(
        {
            "websocket": None,
            "version": "0.1.0",
            "uptime_s": 3723.4,
            "admin": True,
            "tasks": {"total": 3, "running": 1},
            "zeta": [1],
        }
    )
    assert lines == [
        "version:   0.1.0",
        "uptime:    1h 02m 03s",
        "admin:     yes",
        "websocket: off",
        "tasks:     3 total, 1 running",
        "zeta:      [1]",
    ]


def test_dropped_and_unknown_pushes() -> None:
    assert render.format_push("dropped", {"stream": "status", "count": 1}) == (
        "warning: 1 status message was dropped: this reader fell behind"
    )
    assert render.format_push("dropped", {"stream": "tasks", "count": 5}) == (
        "warning: 5 task updates were dropped: this reader fell behind"
    )
    assert render.format_push("brand_new", {"x": 1}) == 'brand_new: {"x":1}'
    assert render.format_history_gap(1) == "(1 status message before these is no longer held)"


def test_durations() -> None:
    assert render.format_duration(4.25) == "4.2s"
    assert render.format_duration(65) == "1m 05s"
    assert render.format_duration(90061) == "1d 1h 01m 01s"
