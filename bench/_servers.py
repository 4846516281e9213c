"""The servers a benchmark starts as processes of their own: statusd with a per-run config,
aria2c's RPC daemon, the minimal trio JSON-RPC server; and what they share (a process that
dies with the benchmark, its CPU time, a wait until it listens).

Imported by the scripts in this directory (``python bench/NAME.py`` puts it on the path).
The HTTP server the downloads come from (nginx, or a fallback) lives in downloads.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 20.0

# A benchmark's daemon must measure the work, not a per-user limit that a real user would
# never meet with one job: these keys are raised when this statusd has them (keys other
# branches add are set only where ``--check-config`` lists them, so the bench runs on both).
GENEROUS_LIMITS: dict[str, Any] = {
    "max_connections": 4096,
    "limits.max_connections_per_user": 2048,
    "limits.max_pending_handshakes": 1024,
    "limits.max_subscriptions_per_connection": 1024,
    "limits.max_items_per_task": 100_000,
    "limits.max_tasks_per_user": 10_000,
    "downloads.min_free_bytes": 0,
    "downloads.max_file_bytes": 0,
}


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies, so nothing outlives a
    benchmark that was killed."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


def cpu_seconds_of(pid: int) -> float:
    """User + system CPU time process ``pid`` used so far, from /proc/<pid>/stat."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat.rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return float("nan")


@attrs.define
class ServerProcess:
    name: str
    socket: str
    process: subprocess.Popen[bytes]
    log: Path
    websocket: str | None = None  # "127.0.0.1:PORT" when subscribers use the WebSocket
    token: str | None = None
    ws_query: str = "&coalesce=1"  # pending messages as one JSON array; "": one per frame

    @property
    def subscriber_endpoint(self) -> str:
        """Where subscribers connect: the Unix socket, or the WebSocket URL with a token."""
        if self.websocket is None:
            return self.socket
        return f"ws://{self.websocket}/ws?token={self.token}{self.ws_query}"

    def mint_token(self) -> None:
        """A read token for the WebSocket subscribers, asked for over the Unix socket."""
        request = b'{"jsonrpc":"2.0","method":"tokens.create","params":{"scope":"read"},"id":1}\n'
        with connect(self.socket) as sock:
            sock.sendall(request)
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError("statusd closed the connection before minting a token")
                data += chunk
        self.token = json.loads(data)["result"]["token"]

    def cpu_seconds(self) -> float:
        return cpu_seconds_of(self.process.pid)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            log = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {log}")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            self.check_alive()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(self.socket)
                except OSError:
                    time.sleep(0.05)
                    continue
                return
        raise RuntimeError(f"{self.name} did not accept connections within {READY_TIMEOUT} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_process(
    name: str,
    argv: list[str],
    env: Mapping[str, str],
    directory: Path,
    *,
    cwd: Path = REPO,
    socket_path: str | None = None,
) -> ServerProcess:
    log = directory / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Safe here: the benchmarks start no threads before their servers.
            preexec_fn=die_with_parent,
        )
    path = socket_path or argv[argv.index("--socket") + 1]
    return ServerProcess(name, path, process, log)


# -- statusd with a config file of the run's settings -----------------------------------------


def statusd_env(directory: Path, source: Path = REPO) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATUSD_")}
    for inherited in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(inherited, None)  # this daemon is ours, not systemd's
    env.update(
        HOME=str(directory),
        XDG_CONFIG_HOME=str(directory / "config"),
        PYTHONPATH=str(source),
    )
    return env


def known_keys(directory: Path, source: Path = REPO) -> set[str]:
    """The config keys this statusd knows, as ``table.key``, from ``--check-config``."""
    probe = directory / "probe"
    probe.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "statusd", "--check-config", "--socket", str(probe / "s.sock"),
         "--state-dir", str(probe / "state")],
        cwd=source, env=statusd_env(probe, source), capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"statusd --check-config failed: {done.stderr.strip()}")
    keys: set[str] = set()
    for name, value in tomllib.loads(done.stdout).items():
        if isinstance(value, dict):
            keys.update(f"{name}.{key}" for key in value)
        else:
            keys.add(name)
    # Keys left unset are printed as comments ("# listen is unset: ..."), so they count too.
    table = ""
    for line in done.stdout.splitlines():
        if line.startswith("[") and line.endswith("]"):
            table = line[1:-1] + "."
        elif line.startswith("# ") and " is unset" in line:
            keys.add(table + line[2:].split()[0])
    return keys


def config_toml(settings: Mapping[str, Any], known: set[str] | None = None) -> str:
    """A TOML file of ``settings`` (``table.key`` names); with ``known``, keys this statusd
    does not have are left out (a limit another branch adds, or has not added yet)."""
    top: list[str] = []
    tables: dict[str, list[str]] = {}
    for wanted, value in settings.items():
        name = wanted if known is None else _resolve_key(wanted, known)
        if name is None:
            continue
        table, _, key = name.rpartition(".")
        line = f"{key} = {json.dumps(value)}"
        (tables.setdefault(table, []) if table else top).append(line)
    parts = ["\n".join(top)] + [f"[{t}]\n" + "\n".join(lines) for t, lines in tables.items()]
    return "\n\n".join(part for part in parts if part) + "\n"


def _resolve_key(wanted: str, known: set[str]) -> str | None:
    """``wanted`` as this statusd spells it: the same key may sit in another table."""
    if wanted in known:
        return wanted
    leaf = wanted.rpartition(".")[2]
    return next((name for name in sorted(known) if name.rpartition(".")[2] == leaf), None)


def start_statusd(
    directory: Path,
    settings: Mapping[str, Any],
    *,
    state_dir: Path | None = None,
    websocket: bool = False,
    known: set[str] | None = None,
    source: Path = REPO,
    name: str = "statusd",
) -> ServerProcess:
    """A statusd process with its own socket, state directory and config file."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "statusd.toml"
    config.write_text(config_toml({**GENEROUS_LIMITS, **settings}, known))
    argv = [
        sys.executable, "-m", "statusd", "--config", str(config),
        "--socket", str(directory / "statusd.sock"),
        "--state-dir", str(state_dir or directory / "state"),
        "--log-level", "warning",
    ]  # fmt: skip
    if websocket:
        address = f"127.0.0.1:{free_port()}"
        argv += ["--websocket", address]
    server = start_process(name, argv, statusd_env(directory, source), directory, cwd=source)
    if websocket:
        server.websocket = address
    return server


# -- peers as servers --------------------------------------------------------------------------


def start_minirpc(directory: Path, *, journal: bool = False) -> ServerProcess:
    """bench/minirpc.py: the floor for a trivial call through a trio JSON-RPC server; with
    ``journal``, also for a durable ``notifications.create`` (its file in ``directory``)."""
    path = directory / "minirpc.sock"
    argv = [sys.executable, str(REPO / "bench" / "minirpc.py"), "--socket", str(path)]
    if journal:
        argv += ["--journal", str(directory / "notifications.jsonl")]
    return start_process("minirpc", argv, os.environ, directory)


@attrs.define
class Aria2Daemon:
    """``aria2c --enable-rpc``: the daemon a user would otherwise pick."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jsonrpc"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"aria2c --enable-rpc exited: {self.log.read_text()[-500:]}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("aria2c --enable-rpc did not listen")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_aria2_rpc(aria2c: str, directory: Path, dest: Path, options: list[str]) -> Aria2Daemon:
    port = free_port()
    log = directory / "aria2c-rpc.log"
    argv = [
        aria2c, "--enable-rpc", f"--rpc-listen-port={port}", "--rpc-listen-all=false",
        "-q", "-d", str(dest), *options,
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )  # fmt: skip
    daemon = Aria2Daemon(process, port, log)
    daemon.wait_ready()
    return daemon
