"""statusctl for people (issue 13, items 3 and 4): what a person at a terminal sees.

Interruptions against real daemons: Ctrl-C during ``download --wait`` and ``watch --task``
(on a pseudo-terminal), and a daemon process killed (SIGKILL, SIGTERM) mid-wait and started
again on the same state directory and socket, which statusctl rides out. Output for people:
``task`` without Python reprs, headed lists that say when they are empty, local times and
colours on a terminal (off through a pipe, with ``NO_COLOR`` or ``--color never``), and
errors without the JSON-RPC code, which stays in ``--json`` output.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import trio

from statusctl import cli, render
from statusctl.cli import main
from statusctl.client import Backoff, StatusCursor
from statusd.daemon import Daemon
from tests.conftest import RawClient
from tests.http_servers import (
    HTTPTestServer,
    hang_after_head,
    hang_before_head,
    http_server,
    sequence,
    serve_data,
    status,
)
from tests.processes import download_dir, finished, kill, start, task_of, until
from tests.test_statusctl import WAIT, Lines, _command, _env, _reap
from tests.test_statusctl_watch import _open_pty, _read_terminal

__all__ = ["http_server"]

DATA = bytes(range(256)) * 2048  # 512 KiB
SENT_BEFORE_STALL = 100_000
# A zone with a half-hour offset and no tzdata needed: local times are plainly converted.
ZONE = "XYZ-5:30"
ZONE_OFFSET = timedelta(hours=5, minutes=30)
SGR = re.compile(r"\x1b\[[0-9;]*m")
HOSTILE = "evil\x1b]0;owned\x07\x1b[2J"


async def ctl(daemon: Daemon, *args: str) -> tuple[int, str, str]:
    """statusctl's ``main`` in a thread (its client blocks) against an in-process daemon."""
    out, err = io.StringIO(), io.StringIO()
    argv = ["--socket", str(daemon.config.socket), *args]
    code = await trio.to_thread.run_sync(lambda: main(argv, stdout=out, stderr=err))
    return code, out.getvalue(), err.getvalue()


async def on_terminal(*args: str, **env: str) -> tuple[int, str]:
    """statusctl run to its end on a pseudo-terminal: its exit status and the screen's text
    (with ``\\n`` line ends)."""
    controller, terminal = _open_pty(120)
    process = await trio.lowlevel.open_process(
        _command(*args), stdin=terminal, stdout=terminal, stderr=terminal, env=_env(**env)
    )
    os.close(terminal)
    try:
        with trio.fail_after(WAIT):
            text = await _read_terminal(controller)
            code = await process.wait()
    finally:
        os.close(controller)
        await _reap(process)
    return code, text.replace("\r\n", "\n")


async def _ended(daemon: Daemon, task_id: str) -> dict[str, Any]:
    client = await RawClient.connect(daemon.config.socket)
    try:
        return await finished(client, task_id)
    finally:
        await client.aclose()


@pytest.fixture
def local_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", ZONE)
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


# -- pure: the pieces ----------------------------------------------------------------------


def test_styled_lines_colour_only_their_spans_and_escape_every_part() -> None:
    line = render.styled("#1 ", ("error", "error"), " disk\x1b[2J full")
    assert line == "#1 error disk\\x1b[2J full"  # a str: compares and pads as plain text
    assert render.paint(line) == "#1 \x1b[31merror\x1b[0m disk\\x1b[2J full"
    assert render.paint("plain \x1b[31m") == "plain \\x1b[31m"  # no spans: escaped only
    # A Styled line changed behind its spans' back is printed escaped and uncoloured.
    forged = render.Styled("a\x1b[2Jb", [(0, 1, "error")])
    assert render.paint(forged) == "a\\x1b[2Jb"
    assert render.styled(("x", "no such role")).spans == ()


def test_tables_align_columns_under_a_header() -> None:
    lines = render.table(
        ("ID", "STATUS", "SIZE", "NAME"),
        [["t1", ("failed", "failed"), "3", "a\nb"], ["t22", "completed", "100", "c"]],
        right=(2,),
    )
    assert lines == [
        "ID   STATUS     SIZE  NAME",
        "t1   failed        3  a\\nb",
        "t22  completed   100  c",
    ]
    assert render.paint(lines[1]) == "t1   \x1b[31mfailed\x1b[0m        3  a\\nb"
    assert render.paint(lines[0]).startswith("\x1b[1mID\x1b[0m   \x1b[1mSTATUS\x1b[0m")


def test_times_are_local_on_a_terminal_and_as_given_elsewhere(local_zone: None) -> None:
    terminal = render.Presentation(colour=False, local_time=True)
    assert render.format_time("2026-11-23T10:30:00.123Z", terminal) == "2026-11-23 16:00:00"
    assert render.format_time("2026-11-23T10:30:00.123Z") == "2026-11-23T10:30:00.123Z"
    assert render.format_time(None, terminal) == "-"
    assert render.format_time("not a time\n", terminal) == "not a time\\n"
    assert render.format_time("2026-11-23T10:30:00", terminal) == "2026-11-23T10:30:00"


def test_presentation_follows_the_terminal_no_color_and_the_flag() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Terminal(), io.StringIO()
    person = render.Presentation(colour=True, local_time=True)
    assert cli.presentation("auto", False, tty, {}) == person
    assert cli.presentation("auto", False, tty, {"NO_COLOR": "1"}).colour is False
    assert cli.presentation("auto", False, tty, {"NO_COLOR": ""}).colour is True  # unset
    assert cli.presentation("always", False, tty, {"NO_COLOR": "1"}) == person
    assert cli.presentation("never", False, tty, {}).colour is False
    assert cli.presentation("auto", False, pipe, {}) == render.PLAIN
    assert cli.presentation("always", False, pipe, {}) == render.Presentation(colour=True)
    assert cli.presentation("always", True, tty, {}) == render.PLAIN  # --json: values as sent


def test_color_is_accepted_before_and_after_the_command() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["--color", "never", "tasks"]).color == "never"
    assert parser.parse_args(["tasks", "--color", "always"]).color == "always"
    assert parser.parse_args(["token", "list", "--color", "always"]).color == "always"
    assert parser.parse_args(["tasks"]).color == "auto"


def test_a_task_reads_as_fields_for_people() -> None:
    task = {
        "id": "t1",
        "name": "nightly",
        "kind": "download",
        "owner": "alice",
        "status": "failed",
        "created_at": "2026-11-23T10:30:00.000Z",
        "topic": None,
        "started_at": "2026-11-23T10:30:01.000Z",
        "completed_at": "2026-11-23T10:31:06.000Z",
        "progress": 50.0,
        "total_items": 2,
        "processed_items": 2,
        "current_item": None,
        "bytes_done": 1536,
        "bytes_total": 3072,
        "result": {
            "items": [
                {"url": "http://h/a", "path": "/d/a", "bytes": 1536, "error": None},
                {"url": "http://h/b", "path": None, "bytes": 0, "error": "http 404 not found"},
            ]
        },
        "error": "1 of 2 items failed",
        "metadata": {"dest": "nightly", "batch_size": 100, "tags": {"a": None}},
        "brand_new": None,
        "newer": True,
    }
    lines = render.format_task(task)
    assert lines == [
        "id:         t1",
        "name:       nightly",
        "status:     failed",
        "kind:       download",
        "owner:      alice",
        "created:    2026-11-23T10:30:00.000Z",
        "started:    2026-11-23T10:30:01.000Z",
        "ended:      2026-11-23T10:31:06.000Z (took 1m 05s)",
        "progress:   50.0%, 2 of 2 items, 1.5 KiB of 3.0 KiB",
        "error:      1 of 2 items failed",
        "dest:       nightly",
        "batch_size: 100",
        'tags:       {"a":null}',
        "newer:      yes",
        "items: 1 ok, 1 failed",
        "  ok      http://h/a -> /d/a (1.5 KiB)",
        "  failed  http://h/b: http 404 not found",
    ]
    text = "\n".join(lines)
    for repr_ in ("None", "{'", "True"):
        assert repr_ not in text
    assert "\x1b[31mfailed\x1b[0m" in render.paint(lines[2])
    running = dict(task, status="running", bytes_per_second=2048.0, eta_s=90, result=None)
    shown = render.format_task(running)
    assert "rate:       2.0 KiB/s" in shown
    assert "eta:        1m 30s" in shown


def test_empty_lists_say_so() -> None:
    assert render.format_tasks([]) == ["no tasks"]
    assert render.format_tasks([], "paused") == ["no paused tasks"]
    assert render.format_tokens([]) == ["no tokens"]
    assert render.format_notifications([], unread_only=False) == ["no notifications"]
    assert render.format_notifications([], unread_only=True) == ["no unread notifications"]


def test_backoff_doubles_to_its_maximum_and_starts_over() -> None:
    backoff = Backoff(0.1, 0.5)
    assert [backoff.next() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    backoff.reset()
    assert backoff.next() == 0.1
    with pytest.raises(ValueError, match="min_backoff must be > 0, not 0"):
        Backoff(0, 1)
    with pytest.raises(ValueError, match=r"max_backoff must be >= min_backoff, not 0\.5"):
        Backoff(1, 0.5)


def test_status_cursor_resumes_after_its_last_message_and_from_0_on_a_new_daemon() -> None:
    cursor = StatusCursor()
    first = {"pid": 10, "started_at": "a", "status_seq": 7}
    assert cursor.since(first) == 7  # what comes next
    cursor.seen({"seq": 9})
    assert cursor.since(first) == 9  # the same daemon: nothing repeated, nothing skipped
    assert cursor.since({"pid": 11, "started_at": "b", "status_seq": 3}) == 0
    assert StatusCursor(4).since(first) == 4


# -- output for people, against a real daemon --------------------------------------------------


async def _two_tasks(daemon: Daemon, http_server: HTTPTestServer) -> tuple[str, str]:
    """A completed task and a failed one (a 404), both ended; their ids."""
    good = http_server.route("/good.bin", serve_data(b"fine data"))
    bad = http_server.route("/bad.bin", status(404))
    client = await RawClient.connect(daemon.config.socket)
    try:
        ok = (await client.call("tasks.download", {"urls": [good], "topic": "t"}))["task_id"]
        await finished(client, ok)
        failed = (await client.call("tasks.download", {"urls": [bad]}))["task_id"]
        await finished(client, failed)
    finally:
        await client.aclose()
    return ok, failed


async def test_task_lists_and_errors_read_like_the_rest(
    daemon: Daemon, http_server: HTTPTestServer
) -> None:
    assert await ctl(daemon, "tasks") == (0, "no tasks\n", "")
    assert await ctl(daemon, "token", "list") == (0, "no tokens\n", "")
    assert await ctl(daemon, "notifications", "--unread") == (0, "no unread notifications\n", "")
    ok, failed = await _two_tasks(daemon, http_server)

    code, out, _ = await ctl(daemon, "task", failed)
    assert code == 0
    assert "None" not in out
    assert "{'" not in out
    assert "\nstatus:     failed\n" in out
    assert "\nerror:      1 of 1 items failed\n" in out
    assert out.endswith(f"failed  {http_server.url('/bad.bin')}: http 404 not found\n")
    code, out, _ = await ctl(daemon, "task", ok)
    assert "\ntopic:      t\n" in out
    assert re.search(r"\n  ok      \S+/good\.bin -> /\S+/good\.bin \(9 B\)\n$", out), out

    code, out, _ = await ctl(daemon, "tasks")
    header, first, second = out.splitlines()
    assert header.split() == ["ID", "STATUS", "PROGRESS", "ITEMS", "CREATED", "NAME"]
    assert first.startswith(f"{failed}  failed     ")
    assert second.startswith(f"{ok}  completed  ")
    assert await ctl(daemon, "tasks", "--status", "paused") == (0, "no paused tasks\n", "")

    assert (await ctl(daemon, "cancel", ok))[::2] == (
        4,
        f"statusctl: task {ok} is already completed\n",
    )
    code, out, err = await ctl(daemon, "--json", "cancel", ok)
    assert (code, json.loads(out)["code"], err) == (
        4,
        -32003,
        f"statusctl: task {ok} is already completed\n",
    )


async def test_colours_and_local_times_on_a_terminal_only(
    daemon: Daemon, http_server: HTTPTestServer
) -> None:
    ok, failed = await _two_tasks(daemon, http_server)
    client = await RawClient.connect(daemon.config.socket)
    named = await client.call("tasks.download", {"urls": [http_server.url("/x")], "name": HOSTILE})
    await finished(client, named["task_id"])
    created = (await client.call("tasks.get", {"task_id": ok}))["created_at"]
    await client.aclose()
    socket = ("--socket", str(daemon.config.socket))
    local = (datetime.fromisoformat(created).astimezone(timezone(ZONE_OFFSET))).strftime(
        "%Y-%m-%d %H:%M:%S"
    )

    code, screen = await on_terminal(*socket, "tasks", TZ=ZONE)
    assert code == 0
    assert f"{ok}  \x1b[32mcompleted\x1b[0m  " in screen
    assert f"{failed}  \x1b[31mfailed\x1b[0m     " in screen
    assert local in screen
    assert created not in screen
    # The daemon's text stays escaped, colours or not: the only escapes are our colours.
    assert "evil\\x1b]0;owned\\x07\\x1b[2J" in screen
    assert "\x1b" not in SGR.sub("", screen)
    code, screen = await on_terminal(*socket, "status", TZ=ZONE)
    assert "\x1b[32msuccess\x1b[0m" in screen
    assert "\x1b[31merror\x1b[0m" in screen

    for quiet in ({"NO_COLOR": "1"}, {}):
        flags = () if quiet else ("--color", "never")
        code, screen = await on_terminal(*socket, "tasks", *flags, TZ=ZONE, **quiet)
        assert code == 0
        assert "\x1b" not in screen
        assert local in screen  # still a person's times

    piped = await ctl(daemon, "tasks")
    assert "\x1b" not in piped[1]
    assert created in piped[1]  # pipes keep the daemon's UTC timestamps
    forced = await ctl(daemon, "--color", "always", "tasks")
    assert f"{ok}  \x1b[32mcompleted\x1b[0m" in forced[1]


# -- Ctrl-C ------------------------------------------------------------------------------------


async def test_ctrl_c_during_download_wait_says_the_task_goes_on(
    daemon: Daemon, http_server: HTTPTestServer
) -> None:
    url = http_server.route("/slow.bin", hang_before_head())
    socket = str(daemon.config.socket)
    controller, terminal = _open_pty(100)
    process = await trio.lowlevel.open_process(
        _command("--socket", socket, "download", url, "--wait"),
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=_env(),
    )
    os.close(terminal)
    try:
        with trio.fail_after(WAIT):
            first = await _read_terminal(controller, until=re.compile(r"t\d{14}-[0-9a-f]{8}\r\n"))
            task_id = first.split("\r\n")[0]
            while not http_server.requests_for("/slow.bin"):  # noqa: ASYNC110 - another process
                await trio.sleep(0.01)
            process.send_signal(signal.SIGINT)
            rest = (await _read_terminal(controller)).replace("\r\n", "\n")
            assert await process.wait() == cli.EXIT_INTERRUPTED
    finally:
        os.close(controller)
        await _reap(process)
    assert f"statusctl: stopped following {task_id}; the task goes on\n" in rest
    assert f"  follow it: statusctl --socket {socket} watch --task {task_id}\n" in rest
    assert f"  cancel it: statusctl --socket {socket} cancel {task_id}\n" in rest
    assert "Traceback" not in rest
    assert "KeyboardInterrupt" not in rest
    client = await RawClient.connect(daemon.config.socket)
    assert (await task_of(client, task_id))["status"] == "running"  # it goes on indeed
    await client.call("tasks.cancel", {"task_id": task_id})
    await client.aclose()


async def test_ctrl_c_during_watch_task_is_130_and_a_plain_watch_0(
    daemon: Daemon, http_server: HTTPTestServer
) -> None:
    url = http_server.route("/slow.bin", hang_before_head())
    client = await RawClient.connect(daemon.config.socket)
    task_id = (await client.call("tasks.download", {"urls": [url]}))["task_id"]
    for args, expected in ((("watch", "--task", task_id), 130), (("watch",), 0)):
        process = await trio.lowlevel.open_process(
            _command("--socket", str(daemon.config.socket), *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(),
        )
        try:
            with trio.fail_after(WAIT):
                while daemon.streams.tasks.subscribers < 1:  # noqa: ASYNC110 - another process
                    await trio.sleep(0.01)
                process.send_signal(signal.SIGINT)
                assert await process.wait() == expected
                assert process.stderr is not None
                err = await Lines(process.stderr).rest()
        finally:
            await _reap(process)
        if expected:
            assert err.startswith(f"statusctl: stopped following {task_id}; the task goes on\n")
            assert (
                f"  cancel it: statusctl --socket {daemon.config.socket} cancel {task_id}\n" in err
            )
        else:
            assert err == ""
    await client.call("tasks.cancel", {"task_id": task_id})
    await client.aclose()


# -- a daemon restart mid-wait -----------------------------------------------------------------


def _stalls_then_serves(http_server: HTTPTestServer, path: str) -> str:
    """The first answer sends part of the body and then nothing (the daemon is killed
    there); the next, after the restart, serves the rest with Range."""
    return http_server.route(
        path,
        sequence(
            hang_after_head(DATA, SENT_BEFORE_STALL, etag='"D"'), serve_data(DATA, etag='"D"')
        ),
    )


async def test_download_wait_rides_out_a_sigkilled_daemon(
    daemon_process: Any, http_server: HTTPTestServer
) -> None:
    url = _stalls_then_serves(http_server, "/restart.bin")
    daemon = daemon_process()
    client = await start(daemon)
    process = await trio.lowlevel.open_process(
        _command("--socket", str(daemon.socket), "download", url, "--wait"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    try:
        assert process.stdout is not None
        assert process.stderr is not None
        output, errors = Lines(process.stdout), Lines(process.stderr)
        with trio.fail_after(WAIT):
            task_id = await output.next()

            async def stalled() -> bool:
                task = await task_of(client, task_id)
                return bool(task["bytes_done"] >= SENT_BEFORE_STALL)

            await until(stalled)
            await kill(daemon, client)
            assert await errors.next() == "statusctl: daemon went away; reconnecting..."
            client = await start(daemon)  # the same state directory and socket
            assert await process.wait() == 0
            lines = (await output.rest()).splitlines()
            assert await errors.rest() == ""  # said once
    finally:
        await _reap(process)
        await trio.aclose_forcefully(client.stream)
    assert lines[-2].startswith(f"{task_id}  completed    100.0%  1/1")
    assert lines[-1].startswith(f"saved {download_dir(daemon) / 'restart.bin'}: ")  # the end
    assert (download_dir(daemon) / "restart.bin").read_bytes() == DATA
    assert len(http_server.requests_for("/restart.bin")) == 2  # asked again after the restart


async def test_watch_task_on_a_terminal_rides_out_a_sigterm_restart(
    daemon_process: Any, http_server: HTTPTestServer
) -> None:
    url = _stalls_then_serves(http_server, "/term.bin")
    daemon = daemon_process()
    client = await start(daemon)
    task_id = (await client.call("tasks.download", {"urls": [url]}))["task_id"]

    async def stalled() -> bool:
        return bool((await task_of(client, task_id))["bytes_done"] >= SENT_BEFORE_STALL)

    await until(stalled)
    controller, terminal = _open_pty(100)
    process = await trio.lowlevel.open_process(
        _command("--socket", str(daemon.socket), "watch", "--task", task_id),
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=_env(),
    )
    os.close(terminal)
    try:
        with trio.fail_after(WAIT):
            await _read_terminal(controller, until=re.compile(r"\]  "))  # a bar is drawn
            await trio.aclose_forcefully(client.stream)
            daemon.signal(signal.SIGTERM)
            assert await trio.to_thread.run_sync(daemon.wait) == 0
            said = await _read_terminal(controller, until=re.compile("reconnecting"))
            client = await start(daemon)
            rest = await _read_terminal(controller)
            assert await process.wait() == 0
    finally:
        os.close(controller)
        await _reap(process)
        await trio.aclose_forcefully(client.stream)
    screen = SGR.sub("", said + rest)
    assert screen.count("statusctl: daemon went away; reconnecting...") == 1
    assert "Traceback" not in screen
    assert "completed" in SGR.sub("", rest)  # the bar's end: the task's
    assert (download_dir(daemon) / "term.bin").read_bytes() == DATA


async def test_gives_up_when_no_daemon_comes_back(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "RECONNECT_FOR", 0.3)
    argv = ["--socket", str(daemon.config.socket), "watch", "--status-only"]
    out, err = io.StringIO(), io.StringIO()
    async with trio.open_nursery() as nursery:
        results: list[int] = []

        async def watch() -> None:
            results.append(
                await trio.to_thread.run_sync(lambda: main(argv, stdout=out, stderr=err))
            )

        nursery.start_soon(watch)
        with trio.fail_after(WAIT):
            while daemon.channel.statistics().watchers < 1:  # noqa: ASYNC110 - a thread's
                await trio.sleep(0.01)
            daemon.request_stop()
            await daemon.wait_stopped()
    assert results == [cli.EXIT_UNREACHABLE]
    lines = err.getvalue().splitlines()
    assert lines[:2] == [
        "statusctl: daemon went away; reconnecting...",
        "statusctl: no daemon for 0.3 s; giving up",
    ]
    assert lines[2].startswith(f"statusctl: cannot connect to statusd at {daemon.config.socket}")
    assert len(lines) == 3
