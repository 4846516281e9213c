"""statusctl's notification commands against a real daemon process, and their rendering."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from statusctl import render
from statusctl.cli import main
from statusctl.client import Client
from tests.conftest import RUNNER, nobody_may_connect, run_as_nobody


def statusctl(socket: Path, *args: str) -> tuple[int, str, str]:
    """Run ``statusctl`` in this process (a fresh interpreter per command is slow)."""
    out, err = io.StringIO(), io.StringIO()
    code = main(["--socket", str(socket), *args], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def socket_path(daemon_process: Any, short_tmp: Path) -> Path:
    config = short_tmp / "statusd.toml"
    config.write_text(nobody_may_connect())
    process = daemon_process()
    process.start("--config", str(config))
    path: Path = process.socket
    return path


def test_notify_list_read_delete(socket_path: Path) -> None:
    code, out, _ = statusctl(
        socket_path, "notify", "--title", "Backup done", "--message", "all fine", "--user", RUNNER
    )
    assert (code, out) == (0, "1\n")
    code, out, _ = statusctl(
        socket_path,
        "notify",
        "--title",
        "Maintenance",
        "--message",
        "at noon\nsharp",
        "--type",
        "maintenance",
        "--link",
        "https://example.org/m",
    )
    assert (code, out) == (0, "2\n")
    code, out, _ = statusctl(socket_path, "notifications")
    assert code == 0
    header, *lines = out.splitlines()
    assert header.split() == ["ID", "TIME", "TYPE", "NOTIFICATION"]
    assert len(lines) == 2
    assert lines[0].startswith(" 2  *  20")
    assert lines[0].endswith(
        "maintenance  Maintenance: at noon\\nsharp  <https://example.org/m>  (everyone)"
    )
    assert lines[1].endswith("system       Backup done: all fine")

    assert statusctl(socket_path, "notifications", "read", "1")[:2] == (0, "marked 1 read\n")
    code, out, _ = statusctl(socket_path, "--json", "notifications", "--unread")
    listed = json.loads(out)
    assert [n["id"] for n in listed["notifications"]] == [2]
    assert (listed["count"], listed["unread"]) == (1, 1)
    code, out, _ = statusctl(socket_path, "--json", "notifications", "--limit", "1")
    assert json.loads(out)["count"] == 1
    assert statusctl(socket_path, "notifications", "read", "--all")[:2] == (0, "marked 1 read\n")
    code, out, _ = statusctl(socket_path, "--json", "notifications", "delete", "2")
    assert (code, json.loads(out)) == (0, {"success": True})
    code, out, _ = statusctl(socket_path, "notifications", "delete", "--read")
    assert (code, out) == (0, "deleted 1 read notifications\n")
    assert statusctl(socket_path, "notifications")[:2] == (0, "no notifications\n")


def test_exit_codes(socket_path: Path, short_tmp: Path) -> None:
    # 4: the daemon said no.
    code, out, err = statusctl(socket_path, "notifications", "read", "99")
    assert (code, out) == (4, "")
    assert err == "statusctl: notification 99 not found\n"
    code, out, err = statusctl(socket_path, "--json", "notifications", "delete", "99")
    assert code == 4
    assert json.loads(out)["code"] == -32001
    code, _, err = statusctl(socket_path, "notifications", "--limit", "0")
    assert code == 4
    assert "limit: must be between 1 and 1000, not 0" in err
    code, _, err = statusctl(socket_path, "notify", "--title", "", "--message", "m")
    assert code == 4
    assert "title: must not be empty" in err
    # 2: usage.
    assert statusctl(socket_path, "notifications", "read")[0] == 2
    assert statusctl(socket_path, "notifications", "read", "1", "--all")[0] == 2
    assert statusctl(socket_path, "notifications", "delete", "x")[0] == 2
    assert statusctl(socket_path, "notifications", "--limit", "many")[0] == 2
    assert statusctl(socket_path, "notify", "--title", "t")[0] == 2
    code, _, err = statusctl(socket_path, "notifications", "--unread", "read", "--all")
    assert code == 2
    assert "--unread and --limit list" in err
    # 3: nobody there.
    code, _, err = statusctl(short_tmp / "absent.sock", "notifications")
    assert code == 3
    assert str(short_tmp / "absent.sock") in err


def test_notify_is_for_admins(socket_path: Path) -> None:
    def as_nobody() -> Any:
        return statusctl(socket_path, "notify", "--title", "t", "--message", "m")

    code, out, err = run_as_nobody(as_nobody)
    assert (code, out) == (4, "")
    assert err == "statusctl: notifications.create is for admins only\n"
    assert statusctl(socket_path, "--json", "notifications", "--unread")[1].startswith(
        '{"notifications":[]'
    )


def test_as_a_command(socket_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["notifications", "-h"]) == 0
    assert "statusctl notifications read (ID | --all)" in capsys.readouterr().out
    done = subprocess.run(
        [sys.executable, "-m", "statusctl", "--socket", str(socket_path), "notifications"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, "no notifications\n")


def test_the_client_subscribes_to_notifications(socket_path: Path) -> None:
    with Client(socket_path) as watcher, Client(socket_path) as admin:
        watcher.subscribe(status=False, notifications=True)
        admin.call("notifications.create", {"type": "t", "title": "hello", "message": ""})
        push = watcher.next_push(timeout=10)
        assert (push.method, push.params["title"]) == ("notification", "hello")
        push = watcher.next_push(timeout=10)
        assert (push.method, push.params) == ("unread_count", {"count": 1})


def test_rendering() -> None:
    notification = {
        "id": 7,
        "username": "alice",
        "type": "task_failed",
        "title": "Task failed: x\x1b[31m",
        "message": "",
        "link": None,
        "read": True,
        "created_at": "2026-11-25T12:00:00.000Z",
    }
    assert render.format_notification(notification) == (
        "    7   2026-11-25T12:00:00.000Z  task_failed  Task failed: x\\x1b[31m"
    )
    assert render.format_push("notification", notification).startswith("notification:     7 ")
    assert render.format_push("unread_count", {"count": 3}) == "unread notifications: 3"
    assert render.format_dropped({"stream": "notifications", "count": 1}) == (
        "warning: 1 notification was dropped: this reader fell behind"
    )
