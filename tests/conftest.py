"""Shared fixtures: a real daemon on a real Unix socket, in-process or as a process.

Socket paths are limited to 107 bytes, so daemons live in short directories under /tmp
rather than in pytest's (long) tmp_path.
"""

from __future__ import annotations

import grp
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from statusd.config import Config, load_config
from statusd.daemon import Daemon, run
from statusd.identity import username_for
from statusd.protocol import jsonrpc
from statusd.protocol.framing import LineDecoder


def pytest_configure(config: pytest.Config) -> None:
    # A shell starts background jobs with SIGINT ignored, and an ignored signal stays
    # ignored in every child: the tests that stop `statusctl watch` with SIGINT (Ctrl-C)
    # would then wait for nothing. Restore it so the children get the default.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sd-", dir="/tmp"))
    # Other uids (the per-user tests) must be able to reach the socket inside.
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_config(directory: Path, **overrides: Any) -> Config:
    flags = {"socket": str(directory / "statusd.sock"), "state_dir": str(directory / "state")}
    environ = {"HOME": str(directory), "XDG_CONFIG_HOME": str(directory / "config")}
    config = load_config(flags, environ, os.getuid())
    return attrs.evolve(config, **overrides)


@pytest.fixture
async def daemon(nursery: trio.Nursery, short_tmp: Path) -> AsyncIterator[Daemon]:
    handle: Daemon = await nursery.start(run, make_config(short_tmp))
    yield handle
    handle.request_stop()
    await handle.wait_stopped()


class RawClient:
    """A deliberately dumb client: bytes out, JSON lines in. Tests use it to say exactly
    what goes on the wire."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._decoder = LineDecoder(64 * 1024 * 1024)
        self._lines: list[bytes] = []
        self._next_id = 0

    @classmethod
    async def connect(cls, path: Path) -> RawClient:
        return cls(await trio.open_unix_socket(str(path)))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self) -> Any:
        """The next JSON value from the daemon; raises EOFError when it closed."""
        while not self._lines:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("daemon closed the connection")
            self._lines.extend(self._decoder.feed(data))
        return json.loads(self._lines.pop(0))

    async def request(self, method: str, params: dict[str, Any] | None = None) -> Any:
        self._next_id += 1
        await self.send(jsonrpc.encode_line(jsonrpc.request(method, params, self._next_id)))
        while True:
            message = await self.receive()
            if message.get("id") == self._next_id:
                return message

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        response = await self.request(method, params)
        assert "result" in response, response
        return response["result"]

    async def aclose(self) -> None:
        await self.stream.aclose()


@pytest.fixture
async def connect(daemon: Daemon) -> AsyncIterator[Any]:
    clients: list[RawClient] = []

    async def _connect() -> RawClient:
        client = await RawClient.connect(daemon.config.socket)
        clients.append(client)
        return client

    yield _connect
    for client in clients:
        await trio.aclose_forcefully(client.stream)


@attrs.define
class DaemonProcess:
    """statusd run as a real process, for signals, crashes and second daemons."""

    directory: Path
    socket: Path
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    umask: int = -1  # the daemon's umask; -1: the test runner's

    def start(
        self, *extra: str, wait: bool = True, preexec_fn: Callable[[], None] | None = None
    ) -> subprocess.Popen[bytes]:
        env = dict(os.environ, HOME=str(self.directory))
        env.pop("NOTIFY_SOCKET", None)
        # stderr goes to a file: a pipe nobody reads would block a chatty daemon.
        self.log = self.directory / f"statusd-{next(_LOG_NUMBERS)}.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "statusd",
                    "--socket",
                    str(self.socket),
                    "--state-dir",
                    str(self.directory / "state"),
                    *extra,
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
                umask=self.umask,
                preexec_fn=preexec_fn,
            )
        if wait:
            self.wait_ready()
        return self.process

    def wait_ready(self, timeout: float = 15.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"statusd exited early: {self.stderr()}")
            if self.socket.exists() and accepts_connections(self.socket):
                return
            time.sleep(0.02)
        raise AssertionError("statusd did not become ready")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float = 15.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stderr(self) -> str:
        assert self.log is not None
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


def accepts_connections(path: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


@pytest.fixture
def daemon_process(short_tmp: Path) -> Iterator[Any]:
    started: list[DaemonProcess] = []

    def _make() -> DaemonProcess:
        process = DaemonProcess(short_tmp, short_tmp / "statusd.sock")
        started.append(process)
        return process

    yield _make
    for process in started:
        process.stop()


_LOG_NUMBERS = itertools.count(1)
NOBODY_UID = 65534
NOBODY_GID = 65534


# Who runs the tests, as the daemon names its callers: root in CI, anyone on a laptop.
RUNNER = username_for(os.getuid())


def nobody_may_connect() -> str:
    """The config line that lets nobody reach the socket: nobody's group for it, when
    root runs the tests. Anyone else may give a file only to a group of their own, and
    their tests that need nobody skip, so it is empty then."""
    if os.getuid() != 0:
        return ""
    return f'socket_group = "{grp.getgrgid(NOBODY_GID).gr_name}"\n'


@pytest.fixture
def root_only() -> None:
    """Skips, saying why, when not root: for async fixtures, whose own skip loses its
    reason under pytest-trio."""
    if os.getuid() != 0:
        pytest.skip(f"per-user rules need other uids: running as uid {os.getuid()}, not root")


# For a test that needs other uids before (or without) reaching run_as: one whose daemon
# gives its socket to nobody's group (only root may give a file to a group it is not in),
# or one that calls run_as from a thread, where a skip would lose its reason.
needs_root = pytest.mark.skipif(
    os.getuid() != 0,
    reason=f"per-user rules need other uids: running as uid {os.getuid()}, not root",
)


def run_as_nobody(action: Any) -> Any:
    """Run ``action()`` in a forked child that dropped to uid/gid nobody; return its
    JSON-able result (or raise what it raised, as text).

    The child never execs: the interpreter may live where nobody cannot enter.
    """
    return run_as(NOBODY_UID, NOBODY_GID, action)


def run_as(uid: int, gid: int, action: Any) -> Any:
    """``run_as_nobody`` for any uid and gid (a third user: one with no passwd entry,
    such as 65533, will do)."""
    if os.getuid() != 0:
        pytest.skip(f"per-user rules need other uids: running as uid {os.getuid()}, not root")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            outcome = {"result": action()}
        except BaseException as exc:
            outcome = {"error": f"{type(exc).__name__}: {exc}"}
        with os.fdopen(write_end, "w") as out:
            json.dump(outcome, out)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as source:
        text = source.read()
    os.waitpid(pid, 0)
    outcome = json.loads(text)
    if "error" in outcome:
        raise AssertionError(f"child as uid {uid} failed: {outcome['error']}")
    return outcome["result"]


def blocking_call(path: Path, method: str, params: dict[str, Any] | None = None) -> Any:
    """One JSON-RPC request over a plain blocking socket; returns the whole response."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(jsonrpc.encode_line(jsonrpc.request(method, params, 1)))
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[Any]:
    """``mount_tmpfs(size)`` mounts a tmpfs of ``size`` (``"1m"``, ``"256k"``) in a fresh
    directory and returns it; every mount is undone after the test. A full disk needs
    one: skips with the reason when not root or when mounting is not allowed here."""
    # Here rather than in _mount: a skip from inside an async test loses its reason.
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip(f"a full disk needs a small tmpfs: not root (uid {os.geteuid()})")
    mounted: list[Path] = []

    def _mount(size: str) -> Path:
        mountpoint = tmp_path / f"tmpfs-{len(mounted)}"
        mountpoint.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(mountpoint)
        return mountpoint

    yield _mount
    for mountpoint in mounted:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
