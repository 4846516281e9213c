"""One daemon per state directory: the second refuses to start, naming the holder's pid."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from statusd.errors import StartupError
from statusd.lockfile import LOCK_FILE, lock_state_dir
from tests.conftest import DaemonProcess, blocking_call


@pytest.fixture
def second_daemon(short_tmp: Path) -> Any:
    """A daemon on the same state directory as ``daemon_process()``'s, with its own socket."""
    started: list[DaemonProcess] = []

    def _make() -> DaemonProcess:
        process = DaemonProcess(short_tmp, short_tmp / "second.sock")
        started.append(process)
        return process

    yield _make
    for process in started:
        process.stop()


def test_second_daemon_on_one_state_dir_exits_naming_the_pid(
    daemon_process: Any, second_daemon: Any
) -> None:
    first = daemon_process()
    first.start()
    state = first.directory / "state"
    files_before = sorted(path.name for path in state.iterdir())
    second = second_daemon()
    second.start(wait=False)
    try:
        status = second.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("a second daemon on the same state directory kept running")
    assert status == 1
    lines = second.stderr().splitlines()
    assert len(lines) == 1, lines
    assert f"state directory {state} is in use by pid {first.process.pid}" in lines[0]
    # The second never got as far as its socket, and the first is as it was.
    assert not second.socket.exists()
    assert first.process.poll() is None
    assert sorted(path.name for path in state.iterdir()) == files_before
    assert (state / LOCK_FILE).read_text().strip() == str(first.process.pid)
    assert blocking_call(first.socket, "daemon.info")["result"]["pid"] == first.process.pid


def test_new_daemon_starts_after_the_holder_was_killed(
    daemon_process: Any, second_daemon: Any
) -> None:
    first = daemon_process()
    first.start()
    first.signal(signal.SIGKILL)
    first.wait()
    # The lock died with the process: no stale lock to remove by hand.
    second = second_daemon()
    second.start()
    assert blocking_call(second.socket, "daemon.info")["result"]["pid"] == second.process.pid
    lock = first.directory / "state" / LOCK_FILE
    assert lock.read_text().strip() == str(second.process.pid)


def test_lock_is_exclusive_until_released(tmp_path: Path) -> None:
    state = tmp_path / "state"
    held = lock_state_dir(state)
    with pytest.raises(
        StartupError, match=f"state directory {state} is in use by pid {os.getpid()}"
    ):
        lock_state_dir(state)
    held.release()
    lock_state_dir(state).release()


def test_lock_creates_a_private_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "a" / "state"
    lock_state_dir(state).release()
    assert state.stat().st_mode & 0o777 == 0o700


def test_holder_that_wrote_no_pid_yet_is_another_process(tmp_path: Path) -> None:
    state = tmp_path / "state"
    held = lock_state_dir(state)
    (state / LOCK_FILE).write_text("")  # locked, pid not yet written
    with pytest.raises(StartupError, match="is in use by another process"):
        lock_state_dir(state)
    held.release()


def test_symlinked_lock_file_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    target = tmp_path / "precious"
    target.write_text("keep me")
    (state / LOCK_FILE).symlink_to(target)
    with pytest.raises(StartupError, match="cannot open"):
        lock_state_dir(state)
    assert target.read_text() == "keep me"
