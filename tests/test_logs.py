"""Log lines: syslog priority prefixes and no timestamp when stderr is the journal
(``JOURNAL_STREAM``), time and level otherwise; and the real daemon under both."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from statusd.logs import setup_logging, stderr_is_journal

TIMESTAMPED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR)\s")


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, given back as it was: setup_logging replaces its handlers."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield root
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _journal_id(stream: TextIO) -> str:
    info = os.fstat(stream.fileno())
    return f"{info.st_dev}:{info.st_ino}"


def _log_everything() -> None:
    log = logging.getLogger("statusd.test")
    log.debug("debug line")
    log.info("info line")
    log.warning("warning line")
    log.error("error line")
    log.critical("critical line")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")


def test_journal_lines_carry_the_priority_and_no_timestamp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, root_logger: logging.Logger
) -> None:
    with (tmp_path / "stderr").open("w") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", _journal_id(stream))
        setup_logging("debug", stream)
        _log_everything()
    lines = (tmp_path / "stderr").read_text().splitlines()
    assert lines[:5] == [
        "<7>statusd.test: debug line",
        "<6>statusd.test: info line",
        "<4>statusd.test: warning line",
        "<3>statusd.test: error line",
        "<2>statusd.test: critical line",
    ]
    traceback = lines[5:]
    assert traceback[0] == "<3>statusd.test: it failed"
    assert traceback[-1] == "<3>ValueError: boom"
    # Every line of the traceback keeps the error priority, or journald files it as info.
    assert all(line.startswith("<3>") for line in traceback)


def test_terminal_lines_have_time_and_level(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, root_logger: logging.Logger
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    with (tmp_path / "stderr").open("w") as stream:
        setup_logging("info", stream)
        _log_everything()
    lines = (tmp_path / "stderr").read_text().splitlines()
    assert "debug line" not in "\n".join(lines)  # below the level
    assert TIMESTAMPED.match(lines[0])
    assert lines[0].endswith(" INFO    statusd.test: info line")
    assert lines[1].endswith(" WARNING statusd.test: warning line")
    assert not any(line.startswith("<") for line in lines)


def test_empty_message_keeps_its_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, root_logger: logging.Logger
) -> None:
    with (tmp_path / "stderr").open("w") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", _journal_id(stream))
        setup_logging("info", stream)
        logging.getLogger("x").warning("line one\n\nline three")
    assert (tmp_path / "stderr").read_text().splitlines() == [
        "<4>x: line one",
        "<4>",
        "<4>line three",
    ]


def test_a_redirected_stderr_is_not_the_journal(tmp_path: Path) -> None:
    # Under systemd, `statusd 2>file` inherits JOURNAL_STREAM but writes to the file.
    with (tmp_path / "journal").open("w") as journal, (tmp_path / "file").open("w") as file:
        environ = {"JOURNAL_STREAM": _journal_id(journal)}
        assert stderr_is_journal(journal, environ)
        assert not stderr_is_journal(file, environ)


@pytest.mark.parametrize("value", ["", "12", "12:", ":34", "a:b", "1:2:3", "-1:2"])
def test_malformed_journal_stream_is_not_the_journal(tmp_path: Path, value: str) -> None:
    with (tmp_path / "stderr").open("w") as stream:
        assert not stderr_is_journal(stream, {"JOURNAL_STREAM": value})


def test_a_stream_without_a_file_is_not_the_journal() -> None:
    import io

    assert not stderr_is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


def _run_daemon(directory: Path, *, journal: bool) -> list[str]:
    """Start the real daemon with stderr to a file (named as the journal, or not), stop it
    with SIGTERM, and return what it wrote."""
    log_path = directory / "stderr"
    socket_path = directory / "statusd.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATUSD_")}
    env.pop("NOTIFY_SOCKET", None)
    env.pop("JOURNAL_STREAM", None)
    env["HOME"] = str(directory)
    with log_path.open("wb") as stderr:
        if journal:
            info = os.fstat(stderr.fileno())
            env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "statusd", "--socket", str(socket_path)),
                *("--state-dir", str(directory / "state"), "--log-level", "debug"),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 15
        while "statusd ready" not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "statusd did not become ready"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    return log_path.read_text().splitlines()


def test_daemon_under_journald(short_tmp: Path) -> None:
    lines = _run_daemon(short_tmp, journal=True)
    assert any(re.fullmatch(r"<6>statusd\.daemon: statusd ready \(pid \d+, .*\)", x) for x in lines)
    assert "<6>statusd.daemon: stopped" in lines
    assert all(re.match(r"<[2-7]>", line) for line in lines), lines
    assert not any(TIMESTAMPED.search(line[3:]) for line in lines)


def test_daemon_in_a_terminal(short_tmp: Path) -> None:
    lines = _run_daemon(short_tmp, journal=False)
    assert all(TIMESTAMPED.match(line) for line in lines), lines
    assert any(line.endswith("INFO    statusd.daemon: stopped") for line in lines)
