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
    assert "\nstatus:     completed\n" in shown.stdout
    summary = json.loads(statusctl(process.socket, "--json", "summary").stdout)
    assert (summary["completed"], summary["failed"]) == (1, 1)
    cancel = statusctl(process.socket, "cancel", task_id)
    assert cancel.returncode == 4
    assert cancel.stderr == f"statusctl: task {task_id} is already completed\n"
    cleanup = statusctl(process.socket, "cleanup", "--max-age-hours", "0.0001")
    assert cleanup.returncode == 0


def test_bad_url_is_a_daemon_error(daemon_process: Any) -> None:
    process = daemon_process()
    process.start()
    result = statusctl(process.socket, "download", "file:///etc/passwd")
    assert result.returncode == 4
    assert "urls[0]" in result.stderr


@pytest.fixture
def silent_url() -> Any:
    """A server that accepts connections (the kernel does, from the backlog) and never
    answers: a download from it stays running until it is paused or cancelled."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_pause_resume_retry_and_cancel_all(
    daemon_process: Any, silent_url: str, files_url: str, short_tmp: Path
) -> None:
    config = short_tmp / "statusd.toml"
    config.write_text("max_running_tasks = 1\n")
    process = daemon_process()
    process.start("--config", str(config))
    socket = process.socket

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return statusctl(socket, *args)

    done = run("download", f"{files_url}/done.txt", "--wait")
    assert done.returncode == 0, done.stderr  # finished: never touched by --all below
    done_id = done.stdout.splitlines()[0]
    ids = [run("download", f"{silent_url}/{n}.bin").stdout.strip() for n in range(3)]

    paused = run("pause", "--all")
    assert (paused.returncode, paused.stdout) == (0, "paused 3 tasks\n"), paused.stderr
    listed = json.loads(run("--json", "tasks", "--status", "paused").stdout)
    assert sorted(task["id"] for task in listed["tasks"]) == sorted(ids)
    again = run("pause", ids[0])
    assert again.returncode == 4
    assert again.stderr == f"statusctl: task {ids[0]} is paused and cannot be paused\n"

    resumed = json.loads(run("--json", "resume", "--all").stdout)
    assert resumed["resumed"] == 3
    assert sorted(resumed["task_ids"]) == sorted(ids)
    assert run("pause", ids[2]).stdout == f"paused {ids[2]}\n"
    assert run("resume", ids[2]).stdout == f"resumed {ids[2]}\n"

    cancelled = run("cancel", "--all")
    assert cancelled.stdout == "cancelled 3 tasks\n"
    assert run("cancel", "--all").stdout == "cancelled 0 tasks\n"

    retried = run("--json", "retry", ids[1])
    assert retried.returncode == 0
    assert json.loads(retried.stdout) == {"task_id": ids[1]}
    task = json.loads(run("--json", "task", ids[1]).stdout)
    assert task["status"] in ("pending", "running")
    assert run("cancel", ids[1]).stdout == f"cancelled {ids[1]}\n"
    final = run("retry", done_id)
    assert final.returncode == 4
    assert final.stderr == f"statusctl: task {done_id} is completed and cannot be retried\n"
    usage = run("pause")
    assert usage.returncode == 2
    summary = json.loads(run("--json", "summary").stdout)
    assert (summary["cancelled"], summary["completed"], summary["paused"]) == (3, 1, 0)


def test_everyday_flags_cleanup_all_json_after_the_command_and_revoke_by_token(
    daemon_process: Any, files_url: str
) -> None:
    """Issue 13 item 5 (part): `cleanup --all` forgets every finished task (the seconds
    old included), `--json` works after the command and after a nested action, and
    `token revoke` takes the token itself without sending its secret."""
    process = daemon_process()
    process.start()
    for name in ("a", "b"):
        assert (
            statusctl(process.socket, "download", f"{files_url}/{name}.txt", "--wait").returncode
            == 0
        )
    kept = json.loads(statusctl(process.socket, "cleanup", "--json").stdout)
    assert kept == {"removed": 0}  # both ended seconds ago, under the default 24 hours
    summary = json.loads(statusctl(process.socket, "summary", "--json").stdout)
    assert summary["completed"] == 2
    cleaned = statusctl(process.socket, "cleanup", "--all")
    assert (cleaned.returncode, cleaned.stdout) == (0, "removed 2 tasks\n")
    assert json.loads(statusctl(process.socket, "tasks", "--json").stdout)["tasks"] == []
    both = statusctl(process.socket, "cleanup", "--all", "--max-age-hours", "1")
    assert both.returncode == 2
    assert "not allowed with argument" in both.stderr

    token = statusctl(process.socket, "token", "create").stdout.strip()
    assert token.startswith("sdt_")
    listed = json.loads(statusctl(process.socket, "token", "list", "--json").stdout)
    [record] = listed["tokens"]
    revoked = statusctl(process.socket, "token", "revoke", token)
    assert (revoked.returncode, revoked.stdout) == (0, f"revoked {record['token_id']}\n")
    assert json.loads(statusctl(process.socket, "--json", "token", "list").stdout)["tokens"] == []
    # A revoke of an id that is gone is the daemon's error, as before.
    again = statusctl(process.socket, "token", "revoke", record["token_id"])
    assert again.returncode == 4
