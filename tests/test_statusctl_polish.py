"""statusctl's leftovers for people, against a real daemon and a real HTTP server: the
``saved`` line fits an 80-column terminal without losing its path; live lines are
coloured by level on a terminal (and not with ``NO_COLOR``, ``--color never`` or through a
pipe unless asked); ``cancel`` of a failed task that keeps a part says how to remove it;
``download --header`` sends its headers and never shows their values."""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from statusctl import cli, render
from statusd.daemon import Daemon
from tests.conftest import RawClient
from tests.http_servers import (
    HTTPTestServer,
    cut_off,
    held,
    http_server,
    sequence,
    serve_data,
    status,
)
from tests.processes import finished
from tests.test_statusctl import WAIT, _command, _env, _reap, statusctl
from tests.test_statusctl_progress import screen_lines
from tests.test_statusctl_watch import _open_pty, _read_terminal

__all__ = ["http_server"]

COLUMNS = 80
DATA = bytes(range(256)) * 1024  # 256 KiB
SGR_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
# Deep enough that ``saved PATH: SIZE in T (RATE)`` is over 80 columns; the directory
# alone fits (a directory wider than the terminal is wrapped: it is never cut).
DEEP = "nightly-builds/ubuntu-24.04"


class Terminal:
    """statusctl running on an 80-column pseudo-terminal; ``read`` collects its output."""

    def __init__(self, process: trio.Process, controller: int) -> None:
        self.process = process
        self.controller = controller
        self.output = ""

    async def read_until(self, pattern: str) -> None:
        with trio.move_on_after(WAIT):
            self.output += await _read_terminal(self.controller, until=re.compile(pattern))
            return
        raise AssertionError(f"no {pattern!r} in {self.output!r}")

    async def finish(self) -> int:
        with trio.fail_after(WAIT):
            self.output += await _read_terminal(self.controller)
            return await self.process.wait()


@asynccontextmanager
async def on_terminal(daemon: Daemon, *args: str, **env: str) -> AsyncIterator[Terminal]:
    controller, terminal = _open_pty(COLUMNS)
    environ = _env(**env)
    environ.pop("COLUMNS", None)  # the width must come from the terminal
    if "NO_COLOR" not in env:
        environ.pop("NO_COLOR", None)  # the test's own environment must not decide
    process = await trio.lowlevel.open_process(
        _command("--socket", str(daemon.config.socket), *args),
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=environ,
    )
    os.close(terminal)
    try:
        yield Terminal(process, controller)
    finally:
        os.close(controller)
        await _reap(process)


async def run_on_terminal(daemon: Daemon, *args: str, **env: str) -> tuple[int, str]:
    async with on_terminal(daemon, *args, **env) as screen:
        code = await screen.finish()
    return code, screen.output


async def ctl(daemon: Daemon, *args: str, env: dict[str, str] | None = None) -> Any:
    return await statusctl("--socket", str(daemon.config.socket), *args, env=env)


# -- the saved line ----------------------------------------------------------------------------


def test_a_saved_line_too_wide_gives_the_directory_a_line_of_its_own() -> None:
    path = f"/srv/{DEEP}/ubuntu-24.04-desktop-amd64.iso"
    what = "16.0 MiB in 4.1s (3.9 MiB/s)"
    assert render.saved_lines(path, what) == [f"saved {path}: {what}"]
    assert render.saved_lines(path, what, 200) == [f"saved {path}: {what}"]
    assert render.saved_lines(path, what, 79) == [
        f"saved ubuntu-24.04-desktop-amd64.iso: {what}",
        f"  in /srv/{DEEP}/",
    ]
    # Nothing of the path is lost, and what the daemon sent stays escaped.
    assert render.saved_lines("/d\x1b[2J/x.iso", "1 B", 10) == [
        "saved x.iso: 1 B",
        "  in /d\\x1b[2J/",
    ]
    assert render.saved_lines("no-slash-at-all.iso", "1 B", 5) == ["saved no-slash-at-all.iso: 1 B"]


async def test_download_wait_fits_80_columns_and_keeps_the_whole_path(
    daemon: Daemon, http_server: HTTPTestServer
) -> None:
    url = http_server.route("/ubuntu-24.04-desktop-amd64.iso", serve_data(DATA))
    dest = str(daemon.config.download_dir / DEEP)
    code, output = await run_on_terminal(daemon, "download", url, "--dest", dest, "--wait")
    assert code == 0, output
    lines = screen_lines(output)
    for line in lines:
        assert len(line) < COLUMNS, line
    saved, where = lines[-2:]
    assert re.fullmatch(
        r"saved ubuntu-24\.04-desktop-amd64\.iso: 256\.0 KiB in [0-9.]+m?s \(.+/s\)", saved
    ), saved
    directory = where.removeprefix("  in ")
    full = Path(directory) / "ubuntu-24.04-desktop-amd64.iso"
    assert directory == f"{dest}/"
    assert full.read_bytes() == DATA

    # Through a pipe and in --json: the full path, as before.
    piped = await ctl(daemon, "download", url, "--dest", dest, "--wait")
    assert piped.returncode == 0, piped.stderr
    last = piped.stdout.splitlines()[-1]
    assert last.startswith(f"saved {dest}/ubuntu-24.04-desktop-amd64"), last
    as_json = await ctl(daemon, "--json", "download", url, "--dest", dest, "--wait")
    path = json.loads(as_json.stdout)["result"]["items"][0]["path"]
    assert path.startswith(f"{dest}/ubuntu-24.04-desktop-amd64")


# -- colours on a live screen ------------------------------------------------------------------


async def _watch_with_messages(
    daemon: Daemon, http_server: HTTPTestServer, flags: Sequence[str], **env: str
) -> str:
    """``watch --task`` on a terminal while the task's owner publishes a warning and an
    error about it; the task then completes (the daemon's own success line)."""
    release = trio.Event()
    url = http_server.route(f"/held-{len(flags)}-{len(env)}.iso", held(DATA, 100_000, release))
    client = await RawClient.connect(daemon.config.socket)
    try:
        task_id = (await client.call("tasks.download", {"urls": [url]}))["task_id"]
        async with on_terminal(daemon, "watch", "--task", task_id, *flags, **env) as screen:
            await screen.read_until(r"97\.7/256\.0 KiB")
            for level in ("warning", "error"):
                await client.call(
                    "status.publish",
                    {"level": level, "message": f"a {level} line", "operation_id": task_id},
                )
            await screen.read_until("a error line")
            release.set()
            assert await screen.finish() == 0, screen.output
    finally:
        await client.aclose()
    return screen.output


async def test_watch_colours_status_lines_by_level_on_a_terminal(
    daemon: Daemon, http_server: HTTPTestServer
) -> None:
    output = await _watch_with_messages(daemon, http_server, ())
    assert "\x1b[33mwarning\x1b[0m" in output
    assert "\x1b[31merror\x1b[0m" in output
    assert "\x1b[32msuccess\x1b[0m" in output  # "All downloads completed successfully"
    assert "\x1b[32msaved\x1b[0m" in output
    assert "a warning line" in output


async def test_no_color_and_color_never_keep_a_live_screen_plain(
    daemon: Daemon, http_server: HTTPTestServer
) -> None:
    for flags, env in (((), {"NO_COLOR": "1"}), (("--color", "never"), {})):
        output = await _watch_with_messages(daemon, http_server, flags, **env)
        assert "a warning line" in output
        assert not SGR_COLOUR.search(output), (flags, env)


async def test_failures_and_retries_are_coloured_and_pipes_only_when_asked(
    daemon: Daemon, http_server: HTTPTestServer
) -> None:
    missing = http_server.route("/missing.iso", status(404))
    code, output = await run_on_terminal(daemon, "download", missing, "--wait")
    assert code == 1
    assert "missing.iso: \x1b[31mfailed\x1b[0m: http 404 not found" in output
    assert "\x1b[31mfailed\x1b[0m: 1 of 1 failed, nothing saved" in output

    piped = await ctl(daemon, "download", missing, "--wait")
    assert piped.returncode == 1
    assert "\x1b" not in piped.stdout
    assert piped.stdout.splitlines()[-1] == "failed: 1 of 1 failed, nothing saved"
    forced = await ctl(daemon, "--color", "always", "download", missing, "--wait")
    assert forced.stdout.splitlines()[-1] == ("\x1b[31mfailed\x1b[0m: 1 of 1 failed, nothing saved")


# -- cancelling a task that has ended ----------------------------------------------------------


async def test_cancel_of_a_failed_task_says_how_to_remove_its_kept_part(
    daemon: Daemon, http_server: HTTPTestServer
) -> None:
    # 8 KiB, then the connection drops; the resumed attempt gets a 404: the task fails
    # and keeps the 8 KiB part for a retry.
    partial = http_server.route("/big.iso", sequence(cut_off(DATA, 8 * 1024), status(404)))
    missing = http_server.route("/nothing.iso", status(404))
    small = http_server.route("/small.txt", serve_data(b"x"))
    client = await RawClient.connect(daemon.config.socket)
    try:
        kept = (await client.call("tasks.download", {"urls": [partial]}))["task_id"]
        plain = (await client.call("tasks.download", {"urls": [missing]}))["task_id"]
        ok = (await client.call("tasks.download", {"urls": [small]}))["task_id"]
        for task_id in (kept, plain):
            assert (await finished(client, task_id))["status"] == "failed"
        await finished(client, ok)
    finally:
        await client.aclose()
    parts = list(daemon.config.download_dir.glob(".big.iso.*.part"))
    assert [part.stat().st_size for part in parts] == [8 * 1024]

    refused = await ctl(daemon, "cancel", kept)
    assert refused.returncode == 4
    socket = daemon.config.socket
    assert refused.stderr.splitlines() == [
        f"statusctl: task {kept} has already failed; it keeps a partial file for a retry",
        f"  resume it: statusctl --socket {socket} retry {kept}",
        f"  remove it: statusctl --socket {socket} cleanup --all"
        " (this forgets every finished task you can see)",
    ]
    as_json = await ctl(daemon, "--json", "cancel", kept)
    answer = json.loads(as_json.stdout)
    assert answer["code"] == -32003
    assert answer["data"] == {"task_id": kept, "status": "failed", "kept_parts": True}
    assert answer["message"] == (
        f"task {kept} has already failed; it keeps a partial file for a retry, which"
        " tasks.retry resumes and tasks.cleanup removes"
    )
    # Every other "already": one line, the state as a person says it.
    for task_id, said in ((plain, "has already failed"), (ok, "is already completed")):
        other = await ctl(daemon, "cancel", task_id)
        assert (other.returncode, other.stderr) == (4, f"statusctl: task {task_id} {said}\n")
    await ctl(daemon, "cancel", "--all")  # nothing left to cancel: no error

    # The advice holds: the clean-up removes the part with the task.
    cleaned = await ctl(daemon, "cleanup", "--all")
    assert cleaned.stdout == "removed 3 tasks\n"
    assert not list(daemon.config.download_dir.glob(".big.iso.*.part"))


# -- download --header -------------------------------------------------------------------------

SECRET = "Bearer s3cret-t0ken"


def test_header_flags_parse_as_curl_takes_them() -> None:
    assert cli.header_argument(f"Authorization: {SECRET}") == ("Authorization", SECRET)
    assert cli.header_argument("X-Trace:42") == ("X-Trace", "42")
    assert cli.header_argument("X-Empty:") == ("X-Empty", "")
    assert cli.header_argument("  Accept :\t*/*  ") == ("Accept", "*/*")


def test_bad_headers_are_usage_errors_that_never_show_the_value(
    capsys: pytest.CaptureFixture[str],
) -> None:
    cases = {
        f"Authorization {SECRET}": "a header is 'NAME: VALUE', with a colon",
        f": {SECRET}": "a header needs a name before its colon",
        f"Bad Name: {SECRET}": "header name 'Bad Name' is not an HTTP token",
        f"Host: {SECRET}": "header 'Host' is set by statusd and cannot be given",
        f"Cookie: {SECRET}\x1b[2J": "header 'Cookie' value must be printable ASCII",
    }
    for given, said in cases.items():
        code = cli.main(["--socket", "/nonexistent", "download", "http://h/x", "-H", given])
        err = capsys.readouterr().err
        assert code == 2, given
        assert said in err, err
        assert "s3cret" not in err
    code = cli.main(
        ["--socket", "/nonexistent", "download", "http://h/x", "-H", "A: 1", "--header", "a: 2"]
    )
    assert code == 2
    assert capsys.readouterr().err == "statusctl: --header 'a' is given twice\n"


async def test_download_sends_the_headers_and_never_shows_them(
    daemon: Daemon, http_server: HTTPTestServer
) -> None:
    url = http_server.route("/private.bin", serve_data(b"for your eyes only"))
    auth, trace = f"Authorization: {SECRET}", "X-Trace: 42"
    done = await ctl(daemon, "download", url, "-H", auth, "--header", trace, "--wait")
    assert done.returncode == 0, done.stderr
    (request,) = http_server.requests_for("/private.bin")
    assert request.headers.get("authorization") == SECRET
    assert request.headers.get("x-trace") == "42"
    task_id = done.stdout.splitlines()[0]
    shown = [done.stdout + done.stderr]
    for args in (("task", task_id), ("--json", "task", task_id), ("tasks",), ("--json", "tasks")):
        listed = await ctl(daemon, *args)
        assert listed.returncode == 0, listed.stderr
        shown.append(listed.stdout + listed.stderr)
    assert "s3cret" not in "".join(shown)
    assert 'headers:    {"Authorization":"***","X-Trace":"***"}' in shown[1]
    as_json = await ctl(daemon, "--json", "download", url, "-H", auth, "--wait")
    assert "s3cret" not in as_json.stdout + as_json.stderr
    assert json.loads(as_json.stdout)["metadata"]["headers"] == {"Authorization": "***"}

    # The daemon's own limits, in its words: exit 4, nothing sent.
    many = [arg for number in range(33) for arg in ("-H", f"X-N{number}: {SECRET}")]
    refused = await ctl(daemon, "download", url, *many)
    assert refused.returncode == 4
    assert "limits.max_item_headers" in refused.stderr
    assert "s3cret" not in refused.stderr
    assert len(http_server.requests_for("/private.bin")) == 2
