"""systemd integration: sd_notify messages to a fake NOTIFY_SOCKET, the watchdog (and a
blocked loop stopping it), reload on SIGHUP, socket activation through the real
``systemd-socket-activate``, and ``systemd-analyze`` on the unit files in contrib/systemd.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest
import trio

import statusd.systemd
from statusd.config import Config, default_config_path, default_socket_path, default_state_dir
from statusd.daemon import Daemon, run
from statusd.errors import ConfigError
from statusd.systemd import Notifier, listen_sockets, watchdog_timeout
from tests.conftest import RawClient, accepts_connections, blocking_call, make_config

CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "systemd"


# --- a fake NOTIFY_SOCKET --------------------------------------------------------------------


@attrs.frozen
class Message:
    at: float  # time.monotonic() on arrival
    fields: dict[str, str]


class NotifyListener:
    """What systemd's notify socket would receive: a datagram socket bound in the test,
    read by a thread that stamps each message with its arrival time (so a blocked trio
    loop in the same process cannot delay the stamps)."""

    def __init__(self, address: str) -> None:
        self.address = address  # a path, or "@name" for the abstract namespace
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self._sock.settimeout(0.05)
        self._messages: list[Message] = []
        self._lock = threading.Lock()
        self._closing = False
        self.on_message: Callable[[Message], None] | None = None
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closing:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            message = Message(time.monotonic(), fields)
            if self.on_message is not None:
                self.on_message(message)
            with self._lock:
                self._messages.append(message)

    def close(self) -> None:
        self._closing = True
        self._thread.join(5)
        self._sock.close()

    @property
    def messages(self) -> list[Message]:
        with self._lock:
            return list(self._messages)

    def having(self, key: str, value: str | None = None) -> list[Message]:
        return [
            m
            for m in self.messages
            if key in m.fields and (value is None or m.fields[key] == value)
        ]

    def wait_for(
        self, key: str, value: str | None = None, *, count: int = 1, timeout: float = 10
    ) -> list[Message]:
        deadline = time.monotonic() + timeout
        while len(found := self.having(key, value)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {key}={value} after {timeout}s: {self.messages}")
            time.sleep(0.01)
        return found

    async def await_for(
        self, key: str, value: str | None = None, *, count: int = 1
    ) -> list[Message]:
        await eventually(lambda: len(self.having(key, value)) >= count)
        return self.having(key, value)


async def eventually(condition: Callable[[], bool], within: float = 10) -> None:
    """Wait until ``condition()``; what it looks at is filled in by another thread, which
    cannot set a trio.Event, so this polls."""
    with trio.fail_after(within):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.01)


@pytest.fixture
def notify_socket(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    """A fake notify socket, named in this process's NOTIFY_SOCKET."""
    listener = NotifyListener(str(short_tmp / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield listener
    finally:
        listener.close()


@pytest.fixture
def fast_status(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statusd.systemd, "STATUS_INTERVAL", 0.02)


# --- readiness, status, stopping (in process) ------------------------------------------------


async def test_ready_with_status_then_stopping(
    short_tmp: Path, notify_socket: NotifyListener
) -> None:
    config = make_config(short_tmp)
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(run, config)
        [ready] = await notify_socket.await_for("READY", "1")
        assert ready.fields["STATUS"] == (
            "tasks: 0 running, 0 pending; clients: 0; subscribers: 0 status, 0 tasks"
        )
        assert not notify_socket.having("STOPPING")
        daemon.request_stop()
        await daemon.wait_stopped()
    [stopping] = await notify_socket.await_for("STOPPING", "1")
    assert stopping.fields["STATUS"] == "stopping"
    assert not notify_socket.having("WATCHDOG")  # no WATCHDOG_USEC, no pings


async def test_status_is_kept_current(
    short_tmp: Path, notify_socket: NotifyListener, fast_status: None
) -> None:
    config = make_config(short_tmp)
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(run, config)
        client = await RawClient.connect(config.socket)
        await client.call("subscribe", {"status": True})
        await eventually(
            lambda: any(
                "clients: 1; subscribers: 1 status" in m.fields["STATUS"]
                for m in notify_socket.having("STATUS")
            )
        )
        await client.aclose()
        await eventually(
            lambda: "clients: 0;" in notify_socket.having("STATUS")[-1].fields["STATUS"]
        )
        # Only changes are sent, not the same text every interval.
        texts = [m.fields["STATUS"] for m in notify_socket.having("STATUS")]
        assert all(a != b for a, b in itertools.pairwise(texts))
        daemon.request_stop()
        await daemon.wait_stopped()


async def test_abstract_notify_socket(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    listener = NotifyListener(f"@statusd-test-{uuid.uuid4().hex}")
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    try:
        async with trio.open_nursery() as nursery:
            daemon: Daemon = await nursery.start(run, make_config(short_tmp))
            await listener.await_for("READY", "1")
            daemon.request_stop()
            await daemon.wait_stopped()
        await listener.await_for("STOPPING", "1")
    finally:
        listener.close()


async def test_without_notify_socket_nothing_is_sent(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener = NotifyListener(str(short_tmp / "notify"))
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "20000")
    try:
        assert not Notifier().enabled
        async with trio.open_nursery() as nursery:
            daemon: Daemon = await nursery.start(run, make_config(short_tmp))
            await trio.sleep(0.1)
            daemon.request_stop()
            await daemon.wait_stopped()
        assert listener.messages == []
    finally:
        listener.close()


def test_notifier_survives_a_vanished_notify_socket(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_tmp / "nobody-here"))
    notifier = Notifier()
    assert notifier.enabled
    for _ in range(3):  # sd_notify failures are not the daemon's problem...
        notifier.ready("x")
        notifier.watchdog()
    # ...but worth one line, not one per ping.
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot notify systemd at {short_tmp / 'nobody-here'}: No such file or directory"
    ]


@pytest.mark.parametrize("address", ["", "relative/notify"])
def test_notify_socket_that_is_no_address_is_ignored(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert not Notifier().enabled


# --- the watchdog ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "4242"}, 0.2),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, None),  # another process's
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_timeout(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_timeout(environ, pid=4242) == expected


async def test_watchdog_pings_at_half_the_interval(
    short_tmp: Path, notify_socket: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(run, make_config(short_tmp))
        pings = await notify_socket.await_for("WATCHDOG", "1", count=8)
        daemon.request_stop()
        await daemon.wait_stopped()
    gaps = sorted(b.at - a.at for a, b in itertools.pairwise(pings))
    median = gaps[len(gaps) // 2]
    assert 0.08 <= median <= 0.13, gaps
    assert gaps[-1] < 0.2, gaps  # never as long as the whole timeout


async def test_watchdog_of_another_process_is_not_ours(
    short_tmp: Path, notify_socket: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(run, make_config(short_tmp))
        await trio.sleep(0.1)
        daemon.request_stop()
        await daemon.wait_stopped()
    assert notify_socket.having("READY")
    assert not notify_socket.having("WATCHDOG")


async def test_a_blocked_loop_stops_the_pings(
    short_tmp: Path, notify_socket: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(run, make_config(short_tmp))
        await notify_socket.await_for("WATCHDOG", "1", count=3)
        blocked_at = time.monotonic()
        time.sleep(0.6)  # what a blocking call in daemon code does to the loop
        unblocked_at = time.monotonic()
        await notify_socket.await_for("WATCHDOG", "1", count=6)
        daemon.request_stop()
        await daemon.wait_stopped()
    pings = [m.at for m in notify_socket.having("WATCHDOG", "1")]
    # A ping already in flight may land just after the block began; none after that.
    during = [at for at in pings if blocked_at + 0.02 < at < unblocked_at]
    assert during == [], (blocked_at, unblocked_at, pings)
    after = [at for at in pings if at >= unblocked_at]
    assert after
    assert after[0] - unblocked_at < 0.1  # the loop is back: so are the pings
    assert 0.08 <= after[1] - after[0] <= 0.15


# --- reload (in process) ---------------------------------------------------------------------


@pytest.fixture
def root_level() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    try:
        yield
    finally:
        root.setLevel(level)


async def test_reload_applies_live_settings_and_logs_the_rest(
    short_tmp: Path,
    notify_socket: NotifyListener,
    root_level: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config(short_tmp)
    new = attrs.evolve(
        config,
        log_level="debug",
        max_connections=7,
        max_running_tasks=9,
        websocket=attrs.evolve(config.websocket, allowed_origins=("http://localhost:3000",)),
        download_dir=short_tmp / "elsewhere",
        status_history=5,
    )
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(run, config)
        await notify_socket.await_for("READY", "1")
        caplog.set_level(logging.INFO, "statusd.daemon")
        assert await daemon.reload(lambda: new)
        assert logging.getLogger().level == logging.DEBUG
        assert daemon.unix.max_connections == 7
        assert daemon.tasks.max_running == 9
        assert daemon.config.websocket.allowed_origins == ("http://localhost:3000",)
        # What takes a restart keeps its running value, so daemon.config stays true.
        assert daemon.config.download_dir == config.download_dir
        assert daemon.config.status_history == config.status_history
        assert daemon.config == attrs.evolve(
            new, download_dir=config.download_dir, status_history=100
        )
        daemon.request_stop()
        await daemon.wait_stopped()
    warnings = {r.getMessage() for r in caplog.records if r.levelno == logging.WARNING}
    assert warnings == {
        "download_dir changed: needs a restart",
        "status_history changed: needs a restart",
    }
    assert "max_connections changed: 1024 -> 7" in caplog.messages
    await notify_socket.await_for("READY", "1", count=2)
    _ready, reloading, ready_again = [
        m for m in notify_socket.messages if "READY" in m.fields or "RELOADING" in m.fields
    ]
    assert reloading.fields["RELOADING"] == "1"
    assert int(reloading.fields["MONOTONIC_USEC"]) > 0
    assert ready_again.fields["READY"] == "1"


async def test_reload_with_a_bad_config_keeps_the_old_one(
    short_tmp: Path, notify_socket: NotifyListener, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(short_tmp)

    def bad() -> Config:
        raise ConfigError("max_connections", "must be an integer >= 1, not 0", "/etc/x.toml")

    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(run, config)
        assert not await daemon.reload(bad)
        assert daemon.config == config
        client = await RawClient.connect(config.socket)
        recent = await client.call("status.recent")
        assert recent["messages"][-1]["level"] == "error"
        assert recent["messages"][-1]["message"].startswith("Configuration reload failed: ")
        await client.aclose()
        daemon.request_stop()
        await daemon.wait_stopped()
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "keeping the current configuration" in error.getMessage()
    assert "max_connections" in error.getMessage()
    await notify_socket.await_for("READY", "1", count=2)  # ready again after the attempt


# --- the real command: signals ---------------------------------------------------------------


@attrs.define
class Statusd:
    """``python -m statusd`` with a fake NOTIFY_SOCKET, stderr to a file."""

    directory: Path
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def socket(self) -> Path:
        return self.directory / "statusd.sock"

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def _environment(directory: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STATUSD_", "LISTEN_"))}
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"):
        env.pop(name, None)
    return env | {"HOME": str(directory), "XDG_CONFIG_HOME": str(directory / "config")} | extra


@pytest.fixture
def start_statusd(short_tmp: Path) -> Iterator[Callable[..., Statusd]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(*argv: str, prefix: tuple[str, ...] = (), **env: str) -> Statusd:
        log = short_tmp / f"statusd-{len(started)}.log"
        command = [
            *prefix,
            sys.executable,
            "-m",
            "statusd",
            "--socket",
            str(short_tmp / "statusd.sock"),
            "--state-dir",
            str(short_tmp / "state"),
            *argv,
        ]
        with log.open("wb") as stderr:
            process = subprocess.Popen(
                command,
                env=_environment(short_tmp, **env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        started.append(process)
        return Statusd(short_tmp, process, log)

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_ready_reload_and_stopping_from_the_command(
    short_tmp: Path, notify_socket: NotifyListener, start_statusd: Callable[..., Statusd]
) -> None:
    config_file = short_tmp / "statusd.toml"
    config_file.write_text('log_level = "info"\n')
    accepts_at_ready: list[bool] = []

    def check_socket(message: Message) -> None:
        if message.fields.get("READY") == "1" and not accepts_at_ready:
            accepts_at_ready.append(accepts_connections(short_tmp / "statusd.sock"))

    notify_socket.on_message = check_socket
    statusd = start_statusd("--config", str(config_file), NOTIFY_SOCKET=notify_socket.address)
    notify_socket.wait_for("READY", "1")
    assert accepts_at_ready == [True]  # READY=1 only once the socket accepts

    config_file.write_text('log_level = "debug"\nmax_connections = 1\nstatus_history = 5\n')
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    statusd.process.send_signal(signal.SIGHUP)
    [reloading] = notify_socket.wait_for("RELOADING", "1")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert before <= int(reloading.fields["MONOTONIC_USEC"]) <= after
    ready_again = notify_socket.wait_for("READY", "1", count=2)[-1]
    assert ready_again.at >= reloading.at

    # max_connections = 1 is live: with one client connected the next is refused.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as first:
        first.connect(str(statusd.socket))
        first.sendall(b'{"jsonrpc":"2.0","id":1,"method":"daemon.info"}\n')
        first.settimeout(10)
        assert b'"result"' in first.recv(65536)
        # The next is told why and closed at once, before it can even send a request.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as second:
            second.settimeout(10)
            second.connect(str(statusd.socket))
            refused = json.loads(second.recv(65536))
        assert refused["error"]["code"] == -32004
    log = statusd.stderr()
    assert "status_history changed: needs a restart" in log
    assert "DEBUG" in log  # the new log level took effect

    statusd.process.send_signal(signal.SIGTERM)
    assert statusd.process.wait(10) == 0
    [stopping] = notify_socket.wait_for("STOPPING", "1")
    assert stopping.at >= ready_again.at


def test_bad_config_on_sighup_keeps_the_daemon_up(
    short_tmp: Path, notify_socket: NotifyListener, start_statusd: Callable[..., Statusd]
) -> None:
    config_file = short_tmp / "statusd.toml"
    config_file.write_text("max_connections = 10\n")
    statusd = start_statusd("--config", str(config_file), NOTIFY_SOCKET=notify_socket.address)
    notify_socket.wait_for("READY", "1")
    config_file.write_text("max_connections = 0\n")
    statusd.process.send_signal(signal.SIGHUP)
    notify_socket.wait_for("READY", "1", count=2)
    assert statusd.process.poll() is None
    assert "result" in blocking_call(statusd.socket, "daemon.info")
    assert "reload failed, keeping the current configuration: max_connections" in (statusd.stderr())
    statusd.process.send_signal(signal.SIGTERM)
    assert statusd.process.wait(10) == 0
    notify_socket.wait_for("STOPPING", "1")


# --- socket activation -----------------------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (Debian: apt-get install systemd; .ci/run does)")
    return path


def _first_connection(path: Path, process: subprocess.Popen[bytes]) -> socket.socket:
    """Connect once the activator listens (the file appears at bind(), a moment before
    listen()); the connection waits in the queue until the daemon, started by it, accepts."""
    deadline = time.monotonic() + 10
    while True:
        assert process.poll() is None, "the activator exited early"
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            client.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            client.close()
            assert time.monotonic() < deadline, f"nothing listens on {path}"
            time.sleep(0.01)
        else:
            client.settimeout(10)
            return client


def test_socket_activation_serves_through_the_passed_socket(
    short_tmp: Path, notify_socket: NotifyListener, start_statusd: Callable[..., Statusd]
) -> None:
    activate = _tool("systemd-socket-activate")
    sock_path = short_tmp / "statusd.sock"
    # The activator passes its environment on, less NOTIFY_SOCKET unless given with -E.
    statusd = start_statusd(
        prefix=(
            activate,
            f"--listen={sock_path}",
            "--fdname=control",
            f"--setenv=NOTIFY_SOCKET={notify_socket.address}",
        )
    )
    # The first connection starts the daemon, which then answers it on the passed socket.
    with _first_connection(sock_path, statusd.process) as first:
        made_by_systemd = sock_path.stat()
        first.sendall(b'{"jsonrpc":"2.0","id":1,"method":"daemon.info"}\n')
        with first.makefile("rb") as replies:
            info = json.loads(replies.readline())["result"]
    assert info["pid"] == statusd.process.pid  # the activator execs the daemon
    assert "result" in blocking_call(sock_path, "daemon.info")  # and goes on serving
    notify_socket.wait_for("READY", "1")
    assert "using the control socket passed by systemd: " + str(sock_path) in statusd.stderr()
    assert "listening on" not in statusd.stderr()  # it did not bind a socket of its own

    statusd.process.send_signal(signal.SIGTERM)
    assert statusd.process.wait(10) == 0
    # The file is systemd's: still there, same inode, mode not changed to socket_mode.
    left = sock_path.stat()
    assert (left.st_ino, left.st_mode) == (made_by_systemd.st_ino, made_by_systemd.st_mode)


_PROBE = """
import json, os, socket
from statusd.systemd import listen_sockets
passed = listen_sockets()
def name(fd):
    if fd is None:
        return None
    with socket.socket(fileno=os.dup(fd)) as sock:
        return [sock.family.name, sock.getsockname(), os.get_inheritable(fd)]
print(json.dumps({
    "unix": [passed.unix, name(passed.unix)],
    "websocket": [passed.websocket, name(passed.websocket)],
    "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}))
"""


def test_socket_activation_finds_the_websocket_socket_by_name(short_tmp: Path) -> None:
    activate = _tool("systemd-socket-activate")
    sock_path = short_tmp / "statusd.sock"
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    # The TCP socket comes first, to show the choice is by kind and name, not by position.
    process = subprocess.Popen(
        [
            activate,
            f"--listen=127.0.0.1:{port}",
            f"--listen={sock_path}",
            "--fdname=websocket:control",
            sys.executable,
            "-c",
            _PROBE,
        ],
        env=_environment(short_tmp),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        _first_connection(sock_path, process).close()
        out, _ = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    result = json.loads(out)
    assert result["unix"] == [4, ["AF_UNIX", str(sock_path), False]]
    assert result["websocket"] == [3, ["AF_INET", ["127.0.0.1", port], False]]
    assert result["env"] == []  # LISTEN_* removed, as sd_listen_fds(1) does


def test_listen_fds_for_another_process_are_ignored() -> None:
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "control", "X": "y"}
    assert listen_sockets(environ, pid=4242) == statusd.systemd.ListenSockets()
    assert environ == {"X": "y"}


def test_no_listen_fds_means_no_sockets() -> None:
    environ: dict[str, str] = {}
    assert listen_sockets(environ, pid=4242) == statusd.systemd.ListenSockets()


# --- the unit files --------------------------------------------------------------------------


def _units_with_our_statusd(source: Path, target: Path, exec_start: str) -> list[Path]:
    """The units as shipped, except that ExecStart names this venv's statusd:
    ``verify`` insists the binary exists."""
    target.mkdir()
    statusd_bin = str(Path(sys.executable).parent / "statusd")
    units = []
    for name in ("statusd.service", "statusd.socket"):
        text = (source / name).read_text()
        if name.endswith(".service"):
            assert f"ExecStart={exec_start}\n" in text
            text = text.replace(f"ExecStart={exec_start}\n", f"ExecStart={statusd_bin}\n")
        (target / name).write_text(text)
        units.append(target / name)
    return units


def _analyze(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("systemd-analyze"), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_system_units_verify(short_tmp: Path) -> None:
    units = _units_with_our_statusd(CONTRIB, short_tmp / "units", "/usr/local/bin/statusd")
    result = _analyze("verify", "--man=no", *map(str, units))
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


def test_user_units_verify(short_tmp: Path) -> None:
    units = _units_with_our_statusd(CONTRIB / "user", short_tmp / "units", "%h/.local/bin/statusd")
    runtime = short_tmp / "runtime"
    runtime.mkdir(mode=0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime))
    result = _analyze("--user", "verify", "--man=no", *map(str, units), env=env)
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


def test_service_exposure_is_at_most_2() -> None:
    result = _analyze(
        "security", "--offline=yes", "--threshold=20", str(CONTRIB / "statusd.service")
    )
    last = result.stdout.strip().splitlines()[-1]
    assert "Overall exposure level for statusd.service:" in last, result.stdout
    score = float(last.split(":")[1].split()[0])
    assert score <= 2.0, result.stdout
    assert result.returncode == 0, result.stdout  # --threshold=20 means 2.0


def test_sysusers_entry_matches_the_service() -> None:
    service = (CONTRIB / "statusd.service").read_text()
    socket_unit = (CONTRIB / "statusd.socket").read_text()
    entries = [
        line.split()
        for line in (CONTRIB / "statusd.sysusers").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert [entry[:2] for entry in entries] == [["u", "statusd"]]
    assert "User=statusd\n" in service
    assert "Group=statusd\n" in service
    assert "SocketGroup=statusd\n" in socket_unit


def _settings(unit: Path) -> dict[str, str]:
    settings: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


def test_system_units_agree_with_statusd_defaults() -> None:
    """The daemon, run as the unprivileged user in the environment systemd gives the
    service, finds its config in the ConfigurationDirectory and picks the socket path the
    socket unit listens on (also where statusctl looks)."""
    service = _settings(CONTRIB / "statusd.service")
    socket_unit = _settings(CONTRIB / "statusd.socket")
    assert service["Environment"] == "XDG_CONFIG_HOME=%E"  # %E: /etc for the system manager
    environ = {
        "XDG_CONFIG_HOME": "/etc",
        "RUNTIME_DIRECTORY": f"/run/{service['RuntimeDirectory']}",
        "STATE_DIRECTORY": f"/var/lib/{service['StateDirectory']}",
        "HOME": "/var/lib/statusd",
    }
    uid = 999  # not root: defaults differ for root
    config_dir = service["ConfigurationDirectory"]
    assert default_config_path(environ, uid) == Path(f"/etc/{config_dir}/statusd.toml")
    assert default_socket_path(environ, uid) == Path(socket_unit["ListenStream"])
    assert default_state_dir(environ, uid) == Path("/var/lib/statusd")


def test_user_units_agree_with_statusd_defaults(tmp_path: Path) -> None:
    service = _settings(CONTRIB / "user" / "statusd.service")
    socket_unit = _settings(CONTRIB / "user" / "statusd.socket")
    runtime = tmp_path / "run"  # stands for $XDG_RUNTIME_DIR, systemd's %t
    environ = {"RUNTIME_DIRECTORY": f"{runtime}/{service['RuntimeDirectory']}"}
    listen = socket_unit["ListenStream"].replace("%t", str(runtime))
    assert default_socket_path(environ, 1000) == Path(listen)
    # statusctl, run by the user outside the service, looks in the same place.
    assert default_socket_path({"XDG_RUNTIME_DIR": str(runtime)}, 1000) == Path(listen)
