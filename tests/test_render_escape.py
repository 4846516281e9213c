"""statusctl never prints a raw control or format character (issue 11, item 3).

A task name, a status message or a notification is text another user wrote; printed raw,
``"\\x1b]0;owned\\x07\\x1b[2J"`` retitles and clears an admin's terminal. The escape
function is tested as a table; then statusctl runs against a real daemon process holding
such text, and its output, human and ``--json``, is checked byte by byte.
"""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from statusctl import render
from tests.conftest import blocking_call

HOSTILE = "\x1b]0;owned\x07\x1b[2J"
# Every kind that must not reach a terminal raw, in one string.
EVERY_KIND = HOSTILE + "\x7f\x85\x9b\u202e\u200b\u2028\u2029\ufeff\U000e0001\n\r\t"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain text", "plain text"),
        ("h\u00e9llo \u65e5\u672c \U0001f600", "h\u00e9llo \u65e5\u672c \U0001f600"),
        ("no\u00a0break", "no\u00a0break"),  # a visible space stays what it is
        (HOSTILE, "\\x1b]0;owned\\x07\\x1b[2J"),
        ("two\nlines\r\tx", "two\\nlines\\r\\tx"),
        ("\x00\x7f", "\\x00\\x7f"),
        ("\x80\x85\x9b\x9f", "\\x80\\x85\\x9b\\x9f"),  # C1: \x9b is a one-byte CSI
        ("abc\u202edef", "abc\\u202edef"),  # right-to-left override
        ("\u200b\u200d\u2066\ufeff\u00ad", "\\u200b\\u200d\\u2066\\ufeff\\xad"),
        ("a\u2028b\u2029c", "a\\u2028b\\u2029c"),
        ("\U000e0041tag", "\\U000e0041tag"),  # an invisible tag character
        ("\ud800", "\\ud800"),  # a lone surrogate, which JSON can carry
    ],
)
def test_one_line_escapes(text: str, shown: str) -> None:
    assert render.one_line(text) == shown
    assert render.one_line(shown) == shown  # escaping twice changes nothing


def test_plain_text_is_returned_as_is() -> None:
    text = "2026-11-23T10:30:00.123Z  #42 info     System ready"
    assert render.one_line(text) is text


def unsafe(text: str) -> list[str]:
    """The characters of ``text`` a terminal must not get raw (newline excepted)."""
    return [
        char
        for char in text
        if char != "\n"
        and (unicodedata.category(char) in {"Cc", "Cf", "Cs", "Zl", "Zp"} or char == "\x7f")
    ]


@pytest.mark.parametrize("text", [EVERY_KIND, "\ud800", "\U000e0001", "ok \u00e9"])
def test_to_json_is_exact_and_has_nothing_raw(text: str) -> None:
    value = {"name": text, "list": [text, 1, None]}
    document = render.to_json(value)
    assert json.loads(document) == value
    assert unsafe(document) == []
    assert "\n" not in document


def test_progress_line_and_task_update_escape_names() -> None:
    task = {"name": HOSTILE, "status": "running", "current_item": "http://x/\u202e", "total": 1}
    assert unsafe(render.progress_line(task, 100)) == []
    update = {"job_id": HOSTILE, "status": "\x9b2J", "message": "m\x1b[2J", "total": 1}
    assert unsafe(render.format_task_update(update)) == []


# -- against a real daemon ---------------------------------------------------------------


def statusctl(socket: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    # Bytes, not text: the check is on exactly what would reach the terminal.
    return subprocess.run(
        [sys.executable, "-m", "statusctl", "--socket", str(socket), *args],
        capture_output=True,
        timeout=60,
    )


def raw_bytes(output: bytes) -> list[str]:
    """What in ``output`` a terminal would act on: bytes below 0x20 other than newline,
    DEL, and (decoded) C1 controls and format characters."""
    found = [f"{byte:#04x}" for byte in output if (byte < 0x20 and byte != 0x0A) or byte == 0x7F]
    return found + [f"U+{ord(char):04X}" for char in unsafe(output.decode("utf-8"))]


@pytest.fixture
def hostile_daemon(daemon_process: Any) -> tuple[Path, str]:
    """A daemon holding a task, a status message and a notification full of hostile
    text; the task's id."""
    process = daemon_process()
    process.start()

    def call(method: str, params: dict[str, Any]) -> Any:
        response = blocking_call(process.socket, method, params)
        assert "result" in response, response
        return response["result"]

    # Port 9 on loopback: nothing listens, so the task fails at once, on loopback only.
    task = call(
        "tasks.download",
        {"urls": ["http://127.0.0.1:9/a\u202eb\u200bc"], "name": EVERY_KIND, "topic": HOSTILE},
    )
    call("status.publish", {"level": "info", "message": EVERY_KIND, "operation_id": HOSTILE})
    call(
        "notifications.create",
        {
            "type": "system",
            "title": "t\u202ex\u200b",
            "message": EVERY_KIND,
            "link": "http://x/\u202e",
        },
    )
    return process.socket, task["task_id"]


def test_statusctl_human_output_has_no_raw_controls(hostile_daemon: tuple[Path, str]) -> None:
    socket, task_id = hostile_daemon
    for args in (("tasks",), ("task", task_id), ("status",), ("notifications",)):
        done = statusctl(socket, *args)
        assert done.returncode == 0, done.stderr
        assert b"\\x1b]0;owned\\x07\\x1b[2J" in done.stdout, args  # shown, visibly
        assert raw_bytes(done.stdout) == [], args
        assert raw_bytes(done.stderr) == [], args


def test_statusctl_json_output_is_exact_and_has_no_raw_controls(
    hostile_daemon: tuple[Path, str],
) -> None:
    socket, task_id = hostile_daemon
    done = statusctl(socket, "--json", "task", task_id)
    assert done.returncode == 0, done.stderr
    assert raw_bytes(done.stdout.rstrip(b"\n")) == []
    assert json.loads(done.stdout)["name"] == EVERY_KIND
    for args in (("tasks",), ("status",), ("notifications",)):
        done = statusctl(socket, "--json", *args)
        assert done.returncode == 0, done.stderr
        assert raw_bytes(done.stdout) == [], args
        json.loads(done.stdout)


def test_statusctl_daemon_errors_are_escaped_on_stderr(hostile_daemon: tuple[Path, str]) -> None:
    socket, _task_id = hostile_daemon
    # The daemon's error names the id it was given: text the caller chose.
    done = statusctl(socket, "task", HOSTILE)
    assert done.returncode == 4
    assert done.stderr.startswith(b"statusctl: task '\\x1b]0;owned")
    assert raw_bytes(done.stderr) == []
    done = statusctl(socket, "publish", HOSTILE, "x")
    assert done.returncode == 4
    assert raw_bytes(done.stderr) == []
