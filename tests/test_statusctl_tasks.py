"""statusctl's task commands against a real daemon process and a real HTTP server."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest


class _Files(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/missing":
            self.send_error(404)
            return
        body = b"hello " * 1000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def files_url() -> Any:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
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


def test_download_wait_tasks_task_summary(daemon_process: Any, files_url: str) -> None:
    process = daemon_process()
    process.start()
    done = statusctl(process.socket, "download", f"{files_url}/a.txt", "--wait")
    assert done.returncode == 0, done.stderr
    task_id = done.stdout.splitlines()[0]
    assert (process.directory / "state" / "downloads" / "a.txt").read_bytes() == b"hello " * 1000
    failed = statusctl(process.socket, "download", f"{files_url}/missing", "--wait")
    assert failed.returncode == 1
    listed = json.loads(statusctl(process.socket, "--json", "tasks").stdout)
    assert [t["status"] for t in listed["tasks"]] == ["failed", "completed"]
    shown = statusctl(process.socket, "task", task_id)
    assert "status: completed" in shown.stdout
    summary = json.loads(statusctl(process.socket, "--json", "summary").stdout)
    assert (summary["completed"], summary["failed"]) == (1, 1)
    cancel = statusctl(process.socket, "cancel", task_id)
    assert cancel.returncode == 4
    assert "-32003" in cancel.stderr
    cleanup = statusctl(process.socket, "cleanup", "--max-age-hours", "0.0001")
    assert cleanup.returncode == 0


def test_bad_url_is_a_daemon_error(daemon_process: Any) -> None:
    process = daemon_process()
    process.start()
    result = statusctl(process.socket, "download", "file:///etc/passwd")
    assert result.returncode == 4
    assert "urls[0]" in result.stderr
