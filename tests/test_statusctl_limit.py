"""``statusctl download --limit-rate`` and ``statusctl limit`` against a real daemon
process and a real HTTP server that sends a large file slowly enough to be caught running."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

SIZE = 4 << 20


class _Large(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(SIZE))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client went away
            self.wfile.write(b"x" * SIZE)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def large_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Large)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/large.bin"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def statusctl(socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "statusctl", "--socket", str(socket), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def task(socket: Path, task_id: str) -> dict[str, Any]:
    shown = statusctl(socket, "--json", "task", task_id)
    assert shown.returncode == 0, shown.stderr
    result: dict[str, Any] = json.loads(shown.stdout)
    return result


def test_download_limit_rate_and_limit_change_a_running_task(
    daemon_process: Any, large_url: str
) -> None:
    process = daemon_process()
    process.start()
    # 4 MiB at 64 KiB/s: a minute, so it is still running when limited again.
    started = statusctl(process.socket, "download", large_url, "--limit-rate", "64K")
    assert started.returncode == 0, started.stderr
    task_id = started.stdout.strip()
    assert task(process.socket, task_id)["rate_limit"] == 64 * 1024
    shown = statusctl(process.socket, "task", task_id)
    assert "\nrate limit: 64.0 KiB/s\n" in shown.stdout
    limited = statusctl(process.socket, "limit", task_id, "1M")
    assert (limited.returncode, limited.stdout) == (0, f"{task_id} limited to 1.0 MiB/s\n")
    assert task(process.socket, task_id)["rate_limit"] == 1 << 20
    lifted = statusctl(process.socket, "limit", task_id, "0")
    assert (lifted.returncode, lifted.stdout) == (0, f"{task_id} has no rate limit\n")
    # No limit: the rest comes at once (it would take a minute at 64K).
    deadline = time.monotonic() + 30
    while task(process.socket, task_id)["status"] in ("pending", "running") and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    ended = task(process.socket, task_id)
    assert (ended["status"], ended["rate_limit"]) == ("completed", 0)
    assert "rate limit" not in statusctl(process.socket, "task", task_id).stdout


def test_bad_rates_are_usage_errors_and_unknown_tasks_daemon_errors(daemon_process: Any) -> None:
    process = daemon_process()
    process.start()
    for args in (("limit", "t1", "fast"), ("download", "http://x/", "--limit-rate", "-1")):
        bad = statusctl(process.socket, *args)
        assert bad.returncode == 2
        assert "rate must be bytes a second like 500K, 2M or 1G" in bad.stderr
    unknown = statusctl(process.socket, "limit", "t1", "2M")
    assert unknown.returncode == 4
    assert unknown.stderr == "statusctl: task 't1' not found\n"
