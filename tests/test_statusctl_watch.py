"""``statusctl watch`` and ``download --wait`` as processes against a real daemon and a real
HTTP server: plain lines through pipes, JSON lines, and live bars on a pseudo-terminal."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import signal
import struct
import subprocess
import termios
from typing import Any

import pytest
import trio

from statusctl.cli import main
from statusd.daemon import Daemon
from tests.conftest import RawClient
from tests.http_servers import HTTPTestServer, held, http_server, serve_data, status
from tests.test_statusctl import STATUS_LINE, WAIT, Lines, _command, _env, _reap, statusctl

__all__ = ["http_server"]

DATA = bytes(range(256)) * 4096  # 1 MiB
UPDATE_LINE = re.compile(r"^(t\S+)  (\w+) +(\d+\.\d)%  (\d+)/(\d+)  (.*)$")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


async def _wait_for_task_watchers(daemon: Daemon, count: int) -> None:
    # The watcher is another process: nothing here to wait on but the daemon's count.
    while daemon.streams.tasks.subscribers < count:  # noqa: ASYNC110
        await trio.sleep(0.01)


async def _finished(client: RawClient, task_id: str) -> dict[str, Any]:
    """Wait (subscribed) for the task to end; its TaskInfo."""
    await client.call("subscribe", {"tasks": [task_id]})
    while True:
        task: dict[str, Any] = await client.call("tasks.get", {"task_id": task_id})
        if task["status"] in ("completed", "failed", "cancelled"):
            return task
        await client.receive()  # the next update


async def _past_its_snapshot(client: RawClient, task_id: str, output: Lines) -> list[str]:
    """The lines watch printed up to a marker message about the task.

    Being subscribed is not enough to let the download go on: watch reads the task's state
    after subscribing, and a task that ended in between is printed as a finished task, not
    followed. A marker published about the task is printed only from the following loop,
    so once it shows, watch is following the task live."""
    marker = "watch is following"
    await client.call(
        "status.publish", {"level": "info", "message": marker, "operation_id": task_id}
    )
    seen: list[str] = []
    while not seen or marker not in seen[-1]:
        seen.append(await output.next())
    return seen


async def _start_watch(*args: str, daemon: Daemon) -> trio.Process:
    return await trio.lowlevel.open_process(
        _command("--socket", str(daemon.config.socket), *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )


async def test_watch_task_prints_lines_and_ends_with_the_task(
    daemon: Daemon, http_server: HTTPTestServer
) -> None:
    release = trio.Event()
    url = http_server.route("/w.bin", held(DATA, 300_000, release))
    client = await RawClient.connect(daemon.config.socket)
    task_id = (await client.call("tasks.download", {"urls": [url]}))["task_id"]
    process = await _start_watch("watch", "--task", task_id, daemon=daemon)
    try:
        assert process.stdout is not None
        output = Lines(process.stdout)
        with trio.fail_after(WAIT):
            await _wait_for_task_watchers(daemon, 1)
            lines = await _past_its_snapshot(client, task_id, output)
            release.set()
            assert await process.wait() == 0
            lines += (await output.rest()).splitlines()
        # The last line says where the file went, its size and the average rate.
        assert re.fullmatch(r"saved /\S+/w\.bin: 1\.0 MiB in [0-9.]+s \(.+/s\)", lines[-1])
        lines = lines[:-1]
        statuses = [STATUS_LINE.match(line) for line in lines if STATUS_LINE.match(line)]
        updates = [UPDATE_LINE.match(line) for line in lines if not STATUS_LINE.match(line)]
        assert all(updates), lines
        assert {match[1] for match in updates if match} == {task_id}
        last = updates[-1]
        assert last is not None
        assert last.group(2, 3, 4, 5) == ("completed", "100.0", "1", "1")
        assert lines[-1].endswith("1.0 MiB  Task completed")
        # The task's own status messages come too, and only those.
        assert {match[4] for match in statuses if match} == {task_id}
        assert any("All downloads completed successfully" in line for line in lines)
    finally:
        await _reap(process)
        await client.aclose()


async def test_watch_task_json_streams_updates(daemon: Daemon, http_server: HTTPTestServer) -> None:
    release = trio.Event()
    url = http_server.route("/j.bin", held(DATA, 300_000, release))
    client = await RawClient.connect(daemon.config.socket)
    task_id = (await client.call("tasks.download", {"urls": [url], "topic": "t"}))["task_id"]
    process = await _start_watch("--json", "watch", "--task", task_id, daemon=daemon)
    try:
        assert process.stdout is not None
        output = Lines(process.stdout)
        with trio.fail_after(WAIT):
            await _wait_for_task_watchers(daemon, 1)
            lines = await _past_its_snapshot(client, task_id, output)
            release.set()
            assert await process.wait() == 0
            lines += (await output.rest()).splitlines()
            pushes = [json.loads(line) for line in lines]
        methods = {push["method"] for push in pushes}
        assert methods <= {"task_update", "status"}
        updates = [push["params"] for push in pushes if push["method"] == "task_update"]
        assert {update["job_id"] for update in updates} == {task_id}
        assert updates[-1]["status"] == "completed"
        messages = [push["params"] for push in pushes if push["method"] == "status"]
        assert {message["operation_id"] for message in messages} <= {task_id}
        assert "All downloads completed successfully" in [m["message"] for m in messages]
    finally:
        await _reap(process)
        await client.aclose()


async def test_watch_task_of_a_finished_task_answers_at_once(
    daemon: Daemon, http_server: HTTPTestServer
) -> None:
    good = http_server.route("/good.txt", serve_data(b"fine"))
    bad = http_server.route("/bad.txt", status(404))
    client = await RawClient.connect(daemon.config.socket)
    ok_id = (await client.call("tasks.download", {"urls": [good]}))["task_id"]
    failed_id = (await client.call("tasks.download", {"urls": [bad]}))["task_id"]
    await _finished(client, ok_id)
    await _finished(client, failed_id)
    await client.aclose()
    socket = str(daemon.config.socket)

    done = await statusctl("--socket", socket, "watch", "--task", ok_id)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith(f"{ok_id}  completed")
    failed = await statusctl("--socket", socket, "watch", "--task", failed_id)
    assert failed.returncode == 1
    assert failed.stdout.startswith(f"{failed_id}  failed")
    as_json = await statusctl("--socket", socket, "--json", "watch", "--task", failed_id)
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["error"] == "1 of 1 items failed"
    missing = await statusctl("--socket", socket, "watch", "--task", "t-nope")
    assert missing.returncode == 4
    assert missing.stderr == "statusctl: task 't-nope' not found\n"


async def test_watch_topic_shows_only_that_topic(
    daemon: Daemon, http_server: HTTPTestServer
) -> None:
    url = http_server.route("/t.txt", serve_data(b"topic data"))
    client = await RawClient.connect(daemon.config.socket)
    process = await _start_watch("watch", "--topic", "mine", daemon=daemon)
    try:
        assert process.stdout is not None
        output = Lines(process.stdout)
        with trio.fail_after(WAIT):
            await _wait_for_task_watchers(daemon, 1)
            other = await client.call("tasks.download", {"urls": [url], "topic": "theirs"})
            await _finished(client, other["task_id"])
            mine = await client.call("tasks.download", {"urls": [url], "topic": "mine"})
            lines: list[str] = []
            while not lines or "Task completed" not in lines[-1]:
                lines.append(await output.next())
            process.send_signal(signal.SIGINT)
            assert await process.wait() == 0
        assert all(other["task_id"] not in line for line in lines), lines
        assert any(line.startswith(f"{mine['task_id']}  completed") for line in lines)
        # The topic's status messages come too (their operation id is the task's).
        assert any(f"[{mine['task_id']}]" in line for line in lines)
    finally:
        await _reap(process)
        await client.aclose()


def test_watch_task_and_topic_together_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["watch", "--task", "a", "--topic", "b"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


# -- on a terminal -----------------------------------------------------------------------------


def _open_pty(columns: int) -> tuple[int, int]:
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    return controller, terminal


async def _read_terminal(controller: int, until: re.Pattern[str] | None = None) -> str:
    """What the process wrote to its terminal: up to a match of ``until``, or to the end
    (Linux reports the end of a pty whose other side is closed as EIO)."""

    def read() -> str:
        chunks = b""
        while True:
            try:
                data = os.read(controller, 65536)
            except OSError as exc:
                if exc.errno == errno.EIO:
                    return chunks.decode()
                raise
            if not data:
                return chunks.decode()
            chunks += data
            if until is not None and until.search(chunks.decode(errors="replace")):
                return chunks.decode()

    return await trio.to_thread.run_sync(read, abandon_on_cancel=True)


async def test_download_wait_draws_live_bars_on_a_terminal(
    daemon: Daemon, http_server: HTTPTestServer
) -> None:
    release = trio.Event()
    url = http_server.route("/live.iso", held(DATA, 400_000, release))
    columns = 70
    controller, terminal = _open_pty(columns)
    env = _env()
    env.pop("COLUMNS", None)  # the width must come from the terminal
    process = await trio.lowlevel.open_process(
        _command("--socket", str(daemon.config.socket), "download", url, "--wait"),
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=env,
    )
    os.close(terminal)
    try:
        with trio.fail_after(WAIT):
            # A bar mid-way: some bytes in, not all, on a redrawn line.
            before = await _read_terminal(controller, until=re.compile(r"\[=*> *\].*390\.6 KiB"))
            release.set()
            after = await _read_terminal(controller)
            assert await process.wait() == 0
    finally:
        os.close(controller)
        await _reap(process)
    output = before + after
    task_id = output.splitlines()[0]
    assert re.fullmatch(r"t\d{14}-[0-9a-f]{8}", task_id)
    # Bars are redrawn in place: up over the old bar, back to column 0, erase, draw.
    assert "\x1b[1A\r\x1b[J" in output
    frames = [ANSI.sub("", frame) for frame in output.split("\r\x1b[J")[1:]]
    bars = [line for frame in frames for line in frame.split("\r\n") if line]
    # The task's name is its URL: the bar shows the file name.
    assert bars[0].startswith("live.iso [")
    assert any("390.6 KiB/1.0 MiB" in bar for bar in bars)
    # The saved line did not fit 70 columns: the directory has a line of its own.
    assert re.fullmatch(r"saved live\.iso: 1\.0 MiB in [0-9.]+s \(.+/s\)", bars[-2]), bars
    assert re.fullmatch(r"  in /\S+/", bars[-1]), bars
    assert bars[-3].endswith("100.0%  1.0/1.0 MiB  completed")
    assert all(len(bar) < columns for bar in bars), bars


async def test_json_output_never_draws_even_on_a_terminal(daemon: Daemon) -> None:
    client = await RawClient.connect(daemon.config.socket)
    outputs = []
    for json_flag in ((), ("--json",)):
        controller, terminal = _open_pty(100)
        process = await trio.lowlevel.open_process(
            _command("--socket", str(daemon.config.socket), *json_flag, "watch", "--status-only"),
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
            env={key: value for key, value in _env().items() if key != "NO_COLOR"},
        )
        os.close(terminal)
        try:
            with trio.fail_after(WAIT):
                while daemon.channel.statistics().watchers < 1:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                await client.call("status.publish", {"level": "info", "message": "hello"})
                outputs.append(await _read_terminal(controller, until=re.compile("hello")))
                process.send_signal(signal.SIGINT)
                assert await process.wait() == 0
        finally:
            os.close(controller)
            await _reap(process)
    drawn, as_json = outputs
    assert drawn.startswith("\r\x1b[J")
    assert " \x1b[36minfo\x1b[0m     hello" in drawn  # coloured by level
    assert "\x1b[" not in as_json
    assert json.loads(as_json.strip())["params"]["message"] == "hello"
    await client.aclose()
