"""Start-up failures of the real ``statusd`` command: one line on stderr, never a traceback
unless ``--log-level debug``; exit status 2 for the configuration, as every config error.

The daemon has to run as a user without root's powers (root may give a socket to any group,
and root's default socket is not under XDG_RUNTIME_DIR). Run as root, the tests fork a child
that drops to nobody, as conftest's ``run_as`` does, and runs statusd's command there; the
child never execs, since the interpreter may live where nobody cannot enter. Run as anyone
else, the child keeps the test's own uid.
"""

from __future__ import annotations

import grp
import os
import re
import shutil
import sys
import tempfile
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path

import attrs
import pytest
import trio

from statusd.errors import StartupError
from statusd.transports.unix import bind_unix_socket
from tests.conftest import NOBODY_GID, NOBODY_UID, make_config

LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ +statusd[.\w]*: ")
# A group the daemon's user is not in: gid 0 is root's, and the user is not root.
ROOT_GROUP = grp.getgrgid(0).gr_name


@attrs.frozen
class Finished:
    status: int
    stdout: str
    stderr: str


@pytest.fixture
def home() -> Iterator[Path]:
    """A directory of the daemon's user: its HOME and XDG directories go here."""
    path = Path(tempfile.mkdtemp(prefix="sd-home-", dir="/tmp"))
    if os.getuid() == 0:
        os.chown(path, NOBODY_UID, NOBODY_GID)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _as_unprivileged_user() -> None:
    if os.getuid() == 0:
        os.setgroups([])
        os.setgid(NOBODY_GID)
        os.setuid(NOBODY_UID)


def _in_child(action: object, env: Mapping[str, str]) -> Finished:
    """Run ``action()`` (returning an exit status) in a forked child as an unprivileged
    user with ``env`` as its whole environment; its status and what it printed."""
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        status = 99
        try:
            os.close(out_read)
            os.close(err_read)
            os.dup2(out_write, 1)
            os.dup2(err_write, 2)
            # pytest replaced sys.stdout and sys.stderr with its capture: write to the fds.
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            _as_unprivileged_user()
            os.environ.clear()
            os.environ.update(env)
            status = action()  # type: ignore[operator]
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 2
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    os.close(out_write)
    os.close(err_write)
    with os.fdopen(out_read) as out, os.fdopen(err_read) as err:
        # The pipes are small and a traceback is long: read both to the end before waiting.
        stdout, stderr = out.read(), err.read()
    _, wait_status = os.waitpid(pid, 0)
    return Finished(os.waitstatus_to_exitcode(wait_status), stdout, stderr)


def statusd(env: Mapping[str, str], *argv: str) -> Finished:
    """The real ``statusd`` command in a child of an unprivileged user."""

    def command() -> int:
        from statusd.cli import main

        return main(list(argv))

    return _in_child(command, env)


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "XDG_STATE_HOME": str(home / "state")}
    return env | extra


def _runtime_dir(home: Path) -> Path:
    runtime = home / "run"
    runtime.mkdir(mode=0o700)
    if os.getuid() == 0:
        os.chown(runtime, NOBODY_UID, NOBODY_GID)
    return runtime


def test_a_socket_group_the_user_is_not_in_is_a_config_error(home: Path) -> None:
    runtime = _runtime_dir(home)
    env = _env(home, XDG_RUNTIME_DIR=str(runtime), STATUSD_SOCKET_GROUP=ROOT_GROUP)
    uid = NOBODY_UID if os.getuid() == 0 else os.getuid()
    expected = (
        f"statusd: config error: socket_group: the daemon's user (uid {uid}) is not in group"
        f' "{ROOT_GROUP}", so it cannot give the socket to it (from STATUSD_SOCKET_GROUP)\n'
    )
    checked = statusd(env, "--check-config")
    started = statusd(env)
    for finished in (checked, started):
        assert (finished.status, finished.stdout, finished.stderr) == (2, "", expected)
    assert list(runtime.iterdir()) == []  # no socket file, not even its directory


def test_a_missing_xdg_runtime_dir_is_a_config_error(home: Path) -> None:
    missing = home / "run-gone"
    env = _env(home, XDG_RUNTIME_DIR=str(missing))
    expected = (
        f"statusd: config error: XDG_RUNTIME_DIR: {missing} does not exist; the default"
        " socket goes there (set socket to put it elsewhere)\n"
    )
    for argv in (["--check-config"], []):
        finished = statusd(env, *argv)
        assert (finished.status, finished.stdout, finished.stderr) == (2, "", expected)
    assert not missing.exists()


def test_an_unexpected_start_up_failure_is_one_line_unless_debugging(home: Path) -> None:
    # A runtime directory the user cannot write in: the socket's own directory cannot be
    # made there, which no configuration check foresees.
    runtime = home / "run-read-only"
    runtime.mkdir(mode=0o555)
    env = _env(home, XDG_RUNTIME_DIR=str(runtime))
    quiet = statusd(env)
    assert quiet.status == 1
    lines = quiet.stderr.splitlines()
    # Every line is a log record (info ones may come first): no traceback's lines.
    assert all(LOG_RECORD.match(line) for line in lines), quiet.stderr
    assert [line.partition(" ERROR   ")[2] for line in lines if " ERROR " in line] == [
        f"statusd.daemon: cannot start: PermissionError: [Errno 13] Permission denied:"
        f" '{runtime / 'statusd'}'"
    ]
    debugging = statusd(env, "--log-level", "debug")
    assert debugging.status == 1
    assert "Traceback (most recent call last):" in debugging.stderr


def test_a_socket_refused_its_group_is_removed(home: Path) -> None:
    # The configuration check comes first; should chown still fail (the user left the
    # group since), the bound socket file must not stay behind.
    socket = home / "statusd.sock"
    config = attrs.evolve(make_config(home), socket_group=ROOT_GROUP)

    def bind() -> int:
        async def attempt() -> str:
            try:
                sock, _ = await bind_unix_socket(config)
            except StartupError as exc:
                return str(exc)
            sock.close()
            return "bound"

        print(trio.run(attempt))
        return 0

    finished = _in_child(bind, {"HOME": str(home)})
    assert finished.stderr == ""
    assert finished.stdout == (
        f"socket: cannot give {socket} mode 0660 and group {ROOT_GROUP}: Operation not permitted\n"
    )
    assert not socket.exists()
