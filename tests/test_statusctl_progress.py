"""``statusctl download --wait`` as a person sees it (issue 13, items 1 and 2): on a real
pseudo-terminal 80 columns wide, against a real daemon and a real HTTP server. The bar
shows the file name, the rate and the ETA, and 0 B/s while nothing arrives; each failed
item's reason and each retry is a line of its own as it happens; the last line says where
the file went, its size and the average rate. And the same reasons without a terminal."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio

from statusctl import render
from statusd.daemon import Daemon, run
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
from tests.test_statusctl import WAIT, _command, _env, _reap, statusctl
from tests.test_statusctl_watch import ANSI, _open_pty, _read_terminal

__all__ = ["http_server"]

DATA = bytes(range(256)) * 4096  # 1 MiB
COLUMNS = 80
SAVED = re.compile(r"saved (/\S+): (\S+ \S+) in [0-9.]+s \((\S+ \S+/s)\)")


@pytest.fixture
async def daemon(nursery: trio.Nursery, short_tmp: Path) -> AsyncIterator[Daemon]:
    """A daemon whose stall rule fires after 1.5 s windows below 1 KiB/s (60 s by default)."""
    config = make_config(short_tmp)
    downloads = attrs.evolve(config.downloads, lowest_speed=1024, stall_timeout=1.5)
    handle: Daemon = await nursery.start(run, attrs.evolve(config, downloads=downloads))
    yield handle
    handle.request_stop()
    await handle.wait_stopped()


async def on_terminal(daemon: Daemon, *args: str) -> tuple[int, str]:
    """Run statusctl on an 80-column pseudo-terminal to its end: its exit status and
    everything it wrote there."""
    controller, terminal = _open_pty(COLUMNS)
    env = _env()
    env.pop("COLUMNS", None)  # the width must come from the terminal
    process = await trio.lowlevel.open_process(
        _command("--socket", str(daemon.config.socket), *args),
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=env,
    )
    os.close(terminal)
    try:
        with trio.fail_after(WAIT):
            output = await _read_terminal(controller)
            code = await process.wait()
    finally:
        os.close(controller)
        await _reap(process)
    return code, output


def screen_lines(output: str) -> list[str]:
    """Every line drawn, bars and lines that stay, in order, without escape sequences."""
    frames = [ANSI.sub("", frame) for frame in output.split("\r\x1b[J")]
    return [line for frame in frames for line in frame.split("\r\n") if line]


def saved_line(lines: list[str]) -> str:
    """The last ``saved PATH: ...`` line as it reads through a pipe: on a terminal too
    narrow for it, the directory came on a line of its own (``  in DIR/``)."""
    if not lines[-1].startswith("  in "):
        return lines[-1]
    return lines[-2].replace("saved ", f"saved {lines[-1].removeprefix('  in ')}", 1)


def bars(lines: list[str]) -> list[str]:
    return [line for line in lines if re.search(r" \[[=> ]+\]  ", line)]


def trickle_then_hang(data: bytes, sent: int) -> Handler:
    """Announce ``data``, send its first ``sent`` bytes 64 KiB every 0.1 s, then go silent."""

    async def handler(request: Request, responder: Responder) -> None:
        await responder.send_head(200, [("Content-Length", str(len(data))), ("ETag", '"v1"')])
        for start in range(0, sent, 64 * 1024):
            await trio.sleep(0.1)
            await responder.send_raw(data[start : min(sent, start + 64 * 1024)])
        await responder.hang()

    return handler


async def test_success_shows_name_rate_eta_and_where_the_file_went(
    daemon: Daemon, http_server: HTTPTestServer
) -> None:
    # 64 KiB every 0.05 s: about 1.3 MB/s, under a second in all.
    url = http_server.route(
        "/ubuntu-24.04-desktop-amd64.iso", trickle(DATA, every=0.05, size=1 << 16)
    )
    code, output = await on_terminal(daemon, "download", url, "--wait")
    assert code == 0, output
    lines = screen_lines(output)
    drawn = bars(lines)
    # The file name, never the URL; the whole bar within the terminal's width.
    assert all(line.startswith("ubuntu-") for line in drawn), "\n".join(drawn)
    assert not any("http://" in line for line in lines), lines
    assert all(len(line) < COLUMNS for line in drawn), drawn
    moving = [line for line in drawn if re.search(r"\d (KiB|MiB)/s  eta \d+s$", line)]
    assert moving, drawn
    assert drawn[-1].endswith("100.0%  1.0/1.0 MiB  completed")
    last = SAVED.fullmatch(saved_line(lines))
    assert last is not None, lines[-2:]
    assert last[1].endswith("/ubuntu-24.04-desktop-amd64.iso")
    assert Path(last[1]).read_bytes() == DATA
    assert last[2] == "1.0 MiB"


async def test_a_404_says_why_on_screen(daemon: Daemon, http_server: HTTPTestServer) -> None:
    url = http_server.route("/missing.iso", status(404))
    code, output = await on_terminal(daemon, "download", url, "--wait")
    assert code == 1
    lines = screen_lines(output)
    assert "missing.iso: failed: http 404 not found" in lines
    # Nothing was fetched: no full bar that says otherwise.
    assert bars(lines)[-1].endswith("  0.0%  failed")
    assert lines[-1] == "failed: 1 of 1 failed, nothing saved"
    assert lines.count("missing.iso: failed: http 404 not found") == 1  # not again at the end


async def test_a_stall_shows_0_then_the_reason(daemon: Daemon, http_server: HTTPTestServer) -> None:
    url = http_server.route("/stalls.iso", trickle_then_hang(DATA, 6 * 64 * 1024))
    code, output = await on_terminal(daemon, "download", url, "--wait")
    assert code == 1
    lines = screen_lines(output)
    drawn = bars(lines)
    rates = [match[1] for line in drawn if (match := re.search(r"  (\S+ \S+/s)  eta", line))]
    assert rates[-1] == "0 B/s", drawn  # the last word while nothing came: not a frozen rate
    assert any(rate != "0 B/s" for rate in rates), drawn
    assert any(line.endswith("  0 B/s  eta --") for line in drawn), drawn
    assert (
        "stalls.iso: failed: stalled: below lowest_speed 1024 B/s for stall_timeout 1.5 s" in lines
    )
    assert lines[-1] == "failed: 1 of 1 failed, nothing saved"


async def test_retries_are_lines_as_they_happen(
    daemon: Daemon, http_server: HTTPTestServer
) -> None:
    url = http_server.route("/flaky.bin", sequence(status(503), serve_data(b"at last")))
    code, output = await on_terminal(daemon, "download", url, "--wait")
    assert code == 0
    lines = screen_lines(output)
    retry = "flaky.bin: retrying in 0.5 s (attempt 2 of 5): http 503 service unavailable"
    assert retry in lines
    assert lines.index(retry) < len(lines) - 2
    assert re.fullmatch(r"saved /\S+/flaky\.bin: 7 B( in .*)?", saved_line(lines)), lines


async def test_a_checksum_mismatch_says_which_digests(
    daemon: Daemon, http_server: HTTPTestServer
) -> None:
    url = http_server.route("/sum.bin", serve_data(b"not what you think"))
    code, output = await on_terminal(daemon, "download", url, "--sha256", "0" * 64, "--wait")
    assert code == 1
    lines = screen_lines(output)
    # The line is longer than the terminal: the terminal wraps it, nothing is cut.
    assert f"sum.bin: failed: sha256 mismatch: expected {'0' * 64}, got " in ANSI.sub("", output)
    assert lines[-1] == "failed: 1 of 1 failed, nothing saved"


async def test_without_a_terminal_the_reasons_are_plain_lines(
    daemon: Daemon, http_server: HTTPTestServer
) -> None:
    url = http_server.route("/missing.iso", status(404))
    socket = str(daemon.config.socket)
    done = await statusctl("--socket", socket, "download", url, "--wait")
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    task_id = lines[0]
    assert any(line.endswith(f"{url}: failed: http 404 not found") for line in lines), lines
    assert lines[-1] == "failed: 1 of 1 failed, nothing saved"
    assert "\x1b" not in done.stdout
    # Following a task that has already ended says the same.
    watched = await statusctl("--socket", socket, "watch", "--task", task_id)
    assert watched.returncode == 1
    assert watched.stdout.splitlines()[1:] == [
        "missing.iso: failed: http 404 not found",
        "failed: 1 of 1 failed, nothing saved",
    ]
    client = await RawClient.connect(daemon.config.socket)
    task = await client.call("tasks.get", {"task_id": task_id})
    await client.aclose()
    assert task["result"]["items"][0]["error"] == "http 404 not found"


# -- the pure parts ----------------------------------------------------------------------


def test_retry_lines_say_whether_the_attempt_counted() -> None:
    retry = {
        "index": 0,
        "url": "https://example.org/dl/big%20file.iso?…",
        "attempt": 2,
        "max_attempts": 5,
        "delay_s": 4.0,
        "reason": "http 503 service unavailable",
        "counted": True,
    }
    assert render.format_item_event({"item_retry": retry}) == (
        "big file.iso: retrying in 4 s (attempt 2 of 5): http 503 service unavailable"
    )
    resumed = dict(retry, counted=False, attempt=1, delay_s=0.5, reason="connection reset")
    assert render.format_item_event({"item_retry": resumed}) == (
        "big file.iso: resuming in 0.5 s (not counted as an attempt): connection reset"
    )
    failed = {"index": 3, "url": "http://h/x.bin", "error": "http 404 not found\x1b[2J"}
    assert render.format_item_event({"item_failed": failed}) == (
        "x.bin: failed: http 404 not found\\x1b[2J"
    )
    assert render.format_item_event({"status": "progress"}) is None


def test_the_end_of_a_task_of_several_files() -> None:
    task = {
        "id": "t1",
        "status": "failed",
        "started_at": "2026-12-07T10:00:00.000Z",
        "completed_at": "2026-12-07T10:00:04.000Z",
        "result": {
            "items": [
                {"url": "http://h/a.iso", "path": "/dl/a.iso", "bytes": 4 << 20, "error": None},
                {"url": "http://h/b.iso", "path": None, "bytes": 0, "error": "http 404 not found"},
                {"url": "http://h/c.iso", "path": None, "bytes": 0, "error": "sha256 mismatch"},
            ]
        },
    }
    # The 404 was printed as it happened; the mismatch was not.
    assert render.format_task_end(task, {1}) == [
        "c.iso: failed: sha256 mismatch",
        "saved /dl/a.iso: 4.0 MiB",
        "failed: 2 of 3 failed; 1 file saved in 4.0s (1.0 MiB/s)",
    ]
    completed = dict(task, status="completed")
    completed["result"] = {"items": [task["result"]["items"][0]] * 2}  # type: ignore[index]
    assert render.format_task_end(completed)[-1] == (
        "completed: 2 files saved, 8.0 MiB in 4.0s (2.0 MiB/s)"
    )
    cancelled = {"id": "t2", "status": "cancelled", "error": "cancelled", "result": None}
    assert render.format_task_end(cancelled) == ["cancelled"]
    broken = {"id": "t3", "status": "failed", "error": "cannot open the destination"}
    assert render.format_task_end(broken) == ["failed: cannot open the destination"]


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (4.2, "5s"), (65, "1m05s"), (7380, "2h03m"), (90000, "1d01h")]
)
def test_format_eta(seconds: float, text: str) -> None:
    assert render.format_eta(seconds) == text
