"""Where statusctl finds the daemon: the caller's own socket, then the system daemon's.

A real daemon stands in for the system one on a socket of the test's own: the system path
is ``statusctl.client.SYSTEM_SOCKET``, a module constant read at every look-up, which the
statusctl processes below set before running ``main`` (and ``monkeypatch`` sets for the
in-process calls and the forked children of other uids).
``RUNTIME_DIRECTORY`` puts the caller's "own" socket in the test's directory for root as for
anyone else (as systemd's ``RuntimeDirectory=`` does for the daemon).
"""

from __future__ import annotations

import grp
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from statusctl import client as client_module
from statusctl.cli import main
from statusctl.client import (
    SOCKET_ENV,
    SYSTEM_SOCKET,
    Client,
    DaemonUnreachable,
    StatusMonitor,
    _connect_first,
    distrusted,
    open_client,
    socket_candidates,
)
from statusd.daemon import Daemon, run
from tests.conftest import NOBODY_GID, NOBODY_UID, make_config, needs_root, run_as

REPO = Path(__file__).resolve().parent.parent
WAIT = 15.0  # a fresh interpreter has to start; the work itself takes milliseconds
NOBODY_GROUP = grp.getgrgid(NOBODY_GID).gr_name
THIRD_UID = 65533  # no passwd entry needed: the client only connects and reports

# statusctl with the system socket moved to argv[1]; the rest of argv is statusctl's.
_WITH_SYSTEM_SOCKET = (
    "import pathlib, sys\n"
    "import statusctl.client\n"
    "from statusctl.cli import main\n"
    "statusctl.client.SYSTEM_SOCKET = pathlib.Path(sys.argv[1])\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


@pytest.fixture
async def system_daemon(nursery: trio.Nursery) -> AsyncIterator[Daemon]:
    """A daemon whose socket stands in for /run/statusd/statusd.sock."""
    directory = _short_dir("sd-sys-")
    # Group nobody: the per-user tests let nobody in as a member of the socket group.
    overrides = {"socket_group": NOBODY_GROUP} if os.getuid() == 0 else {}
    handle: Daemon = await nursery.start(run, make_config(directory, **overrides))
    yield handle
    handle.request_stop()
    await handle.wait_stopped()
    _remove(directory)


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    """The caller's runtime directory, where their own daemon's socket would be."""
    directory = _short_dir("sd-run-")
    yield directory
    _remove(directory)


def _short_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _env(runtime: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(SOCKET_ENV, None)
    env["RUNTIME_DIRECTORY"] = str(runtime)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


async def statusctl(system: Path, env: dict[str, str], *args: str) -> Any:
    with trio.fail_after(WAIT):
        done = await trio.run_process(
            [sys.executable, "-c", _WITH_SYSTEM_SOCKET, str(system), *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


def _info_socket(done: Any) -> str:
    assert done.returncode == 0, done.stderr
    socket_path: str = json.loads(done.stdout)["socket"]
    return socket_path


# -- where to look (pure) --------------------------------------------------------------------


def test_own_socket_first_then_the_system_one() -> None:
    environ = {"XDG_RUNTIME_DIR": "/run/user/7"}
    own = Path("/run/user/7/statusd/statusd.sock")
    assert socket_candidates(None, environ, uid=7) == (own, Path("/run/statusd/statusd.sock"))
    assert socket_candidates(None, {}, uid=7) == (
        Path("/tmp/statusd-7/statusd.sock"),
        SYSTEM_SOCKET,
    )


def test_a_chosen_socket_is_the_only_place_looked_at() -> None:
    environ = {"XDG_RUNTIME_DIR": "/run/user/7", SOCKET_ENV: "/env/statusd.sock"}
    assert socket_candidates("/flag.sock", environ) == (Path("/flag.sock"),)
    assert socket_candidates(None, environ) == (Path("/env/statusd.sock"),)


def test_the_system_socket_is_looked_at_once() -> None:
    # Root's default, or the system daemon's own runtime directory: one place, not two.
    assert socket_candidates(None, {"XDG_RUNTIME_DIR": "/run/user/0"}, uid=0) == (SYSTEM_SOCKET,)
    assert socket_candidates(None, {"RUNTIME_DIRECTORY": "/run/statusd"}, uid=7) == (SYSTEM_SOCKET,)


# -- statusctl against real daemons ----------------------------------------------------------


async def test_the_system_daemon_answers_when_the_callers_own_does_not(
    system_daemon: Daemon, runtime_dir: Path
) -> None:
    system = system_daemon.config.socket
    done = await statusctl(system, _env(runtime_dir), "--json", "info")
    assert _info_socket(done) == str(system)


async def test_a_stale_own_socket_is_passed_over(system_daemon: Daemon, runtime_dir: Path) -> None:
    # A daemon that was killed leaves its socket file: connecting is refused, not missing.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(runtime_dir / "statusd.sock"))
    stale.close()
    system = system_daemon.config.socket
    done = await statusctl(system, _env(runtime_dir), "--json", "info")
    assert _info_socket(done) == str(system)


async def test_the_callers_own_daemon_wins(
    nursery: trio.Nursery, system_daemon: Daemon, runtime_dir: Path
) -> None:
    own_config = make_config(runtime_dir)
    own_socket = runtime_dir / "statusd.sock"
    assert own_config.socket == own_socket
    own: Daemon = await nursery.start(run, own_config)
    try:
        done = await statusctl(system_daemon.config.socket, _env(runtime_dir), "--json", "info")
        assert _info_socket(done) == str(own_socket)
    finally:
        own.request_stop()
        await own.wait_stopped()


async def test_nothing_answers_lists_every_path_tried_exit_3(runtime_dir: Path) -> None:
    system = runtime_dir / "system" / "statusd.sock"
    own = runtime_dir / "statusd.sock"
    for args in (["info"], ["--json", "status"], ["watch"]):
        done = await statusctl(system, _env(runtime_dir), *args)
        assert (done.returncode, done.stdout) == (3, "")
        assert done.stderr == (
            f"statusctl: cannot connect to statusd at any of {own} (no such file or directory),"
            f" {system} (no such file or directory)\n"
        )


async def test_socket_flag_and_environment_are_not_second_guessed(
    system_daemon: Daemon, runtime_dir: Path
) -> None:
    # A socket the user named is the one they mean: the system daemon answering must not
    # hide that theirs is down.
    missing = runtime_dir / "mine.sock"
    system = system_daemon.config.socket
    expected = f"statusctl: cannot connect to statusd at {missing}: no such file or directory\n"
    flag = await statusctl(system, _env(runtime_dir), "--socket", str(missing), "info")
    env = await statusctl(system, _env(runtime_dir, **{SOCKET_ENV: str(missing)}), "info")
    for done in (flag, env):
        assert (done.returncode, done.stderr) == (3, expected)


# -- the library -----------------------------------------------------------------------------


@pytest.fixture
def system_socket_at(monkeypatch: pytest.MonkeyPatch, runtime_dir: Path) -> Any:
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(runtime_dir))

    def move(path: Path) -> None:
        monkeypatch.setattr(client_module, "SYSTEM_SOCKET", path)

    return move


async def test_open_client_and_client_fall_back_to_the_system_daemon(
    system_daemon: Daemon, system_socket_at: Any
) -> None:
    system = system_daemon.config.socket
    system_socket_at(system)
    async with open_client() as client:
        assert client.path == system
        assert (await client.call("daemon.info"))["socket"] == str(system)

    def blocking() -> Any:
        with Client() as client:
            return client.path, client.call("daemon.info")["socket"]

    assert await trio.to_thread.run_sync(blocking) == (system, str(system))


async def test_open_client_lists_every_path_tried(runtime_dir: Path, system_socket_at: Any) -> None:
    system = runtime_dir / "system.sock"
    system_socket_at(system)
    with pytest.raises(DaemonUnreachable) as caught:
        async with open_client():
            pass
    own = runtime_dir / "statusd.sock"
    assert caught.value.tried == (
        (own, "no such file or directory"),
        (system, "no such file or directory"),
    )
    assert (caught.value.path, caught.value.reason) == (own, "no such file or directory")


async def test_status_monitor_finds_the_system_daemon(
    system_daemon: Daemon, system_socket_at: Any
) -> None:
    system_socket_at(system_daemon.config.socket)
    monitor = StatusMonitor(None, lambda message: None)
    monitor.start_monitoring()
    try:
        assert await trio.to_thread.run_sync(monitor.wait_connected, WAIT)
    finally:
        await trio.to_thread.run_sync(monitor.stop_monitoring)


# -- other users -----------------------------------------------------------------------------


def _statusctl_info_as_another_user(runtime: Path) -> Any:
    """In a child of another uid: ``statusctl --json info``, its status and output."""
    os.environ.pop(SOCKET_ENV, None)
    os.environ.pop("RUNTIME_DIRECTORY", None)
    # Where a user's session would put their own daemon's socket; none runs there.
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    out, err = io.StringIO(), io.StringIO()
    status = main(["--json", "info"], stdout=out, stderr=err)
    return [status, out.getvalue(), err.getvalue()]


@needs_root
async def test_a_member_of_the_socket_group_reaches_the_system_daemon(
    system_daemon: Daemon, runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = system_daemon.config.socket
    monkeypatch.setattr(client_module, "SYSTEM_SOCKET", system)

    def ask() -> Any:
        return _statusctl_info_as_another_user(runtime_dir)

    # The daemon runs on this very event loop: the forked child must wait for it in a
    # thread, not on the loop.
    status, out, err = await trio.to_thread.run_sync(run_as, NOBODY_UID, NOBODY_GID, ask)
    assert (status, err) == (0, "")
    info = json.loads(out)
    assert (info["user"], info["socket"]) == ("nobody", str(system))


@needs_root
async def test_a_user_outside_the_socket_group_is_told_why(
    system_daemon: Daemon, runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = system_daemon.config.socket
    monkeypatch.setattr(client_module, "SYSTEM_SOCKET", system)

    def ask() -> Any:
        return _statusctl_info_as_another_user(runtime_dir)

    status, out, err = await trio.to_thread.run_sync(run_as, THIRD_UID, THIRD_UID, ask)
    own = runtime_dir / "statusd" / "statusd.sock"
    assert (status, out) == (3, "")
    assert err == (
        f"statusctl: cannot connect to statusd at any of {own} (no such file or directory),"
        f" {system} (permission denied)\n"
    )


# -- the shared /tmp fallback ------------------------------------------------------------------


def test_a_fallback_directory_must_be_the_callers_alone() -> None:
    directory = Path(tempfile.mkdtemp(prefix="statusd-", dir="/tmp"))
    try:
        path = directory / "statusd.sock"
        directory.chmod(0o700)
        assert distrusted(path) is None
        me = os.getuid()
        assert distrusted(path, uid=me + 1) == (
            f"{directory} belongs to uid {me}, not to you; not trusting it"
        )
        directory.chmod(0o1777)
        assert distrusted(path) == f"{directory} is writable by others; not trusting it"
        # Only the shared fallback is judged: other places are the user's or the system's.
        assert distrusted(Path("/run/user/7/statusd/statusd.sock"), uid=8) is None
    finally:
        shutil.rmtree(directory)


@needs_root
def test_a_socket_another_user_planted_in_the_fallback_is_not_used() -> None:
    """nobody makes /tmp/statusd-65533 first and listens there; uid 65533, with no
    $XDG_RUNTIME_DIR, must not talk to it (it would answer in the daemon's name)."""
    victim = 65533
    directory = Path(f"/tmp/statusd-{victim}")
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o755)
    os.chown(directory, NOBODY_UID, NOBODY_GID)
    planted = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        planted.bind(str(directory / "statusd.sock"))
        (directory / "statusd.sock").chmod(0o777)  # anyone may connect, as its maker wants
        planted.listen()
        planted.setblocking(False)

        def look() -> list[list[str]]:
            try:
                _connect_first(socket_candidates(None, {}, uid=victim), 2.0)
            except DaemonUnreachable as unreachable:
                return [[str(path), reason] for path, reason in unreachable.tried]
            return []

        tried = run_as(victim, NOBODY_GID, look)
        assert tried[0] == [
            str(directory / "statusd.sock"),
            f"{directory} belongs to uid {NOBODY_UID}, not to you; not trusting it",
        ]
        with pytest.raises(BlockingIOError):
            planted.accept()  # nobody connected
    finally:
        planted.close()
        shutil.rmtree(directory, ignore_errors=True)
