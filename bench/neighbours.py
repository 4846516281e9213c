"""Issue 11's attacks replayed against a real daemon: one local user (uid nobody) attacks its
neighbours while root and a third uid (65533) are served, and the table says what happened.

Not a test, and run as root: each attacker and each victim is a forked child that drops to
its uid with ``os.setgid``/``os.setuid`` and never execs. Every item starts its own
``statusd`` process (``python -m statusd``: its own state directory and socket, and a config
file with the shipped defaults except ``socket_group`` = nobody's group, so that nobody may
connect, and the few settings the item names), so the RSS figures are that item's alone.

While an attack runs, root and uid 65533 each call ``daemon.info`` in a loop, on a new
connection every time (admission is part of being served), 20 ms apart; for items 8 and 9
every tenth call is a ``tasks.download``. A victim's latency is one connect + call + answer;
a refused or failed call is counted and shown. RSS is /proc/PID/status's VmRSS before the
attack and after it (with VmHWM, the peak), in MiB.

Items (``--items`` picks some; ``--scale`` shrinks every count, for a quick look):

- 4: one connection asks for 1,000,000 subscriptions, in batches of ``max_batch_entries``;
- 5: the issue's 172 KiB line of 3,000 ``status.recent`` calls against a full history, sent 20
  times; then batches of 256 ``status.recent`` whose answers would pass ``max_reply_bytes``;
- 6: nobody opens 1,100 idle connections;
- 7: 1,024 slow WebSocket handshakes (the request head never finished);
- 8: 200 ``tasks.download`` of 10,000 URLs each against a server that never answers, then
  a restart of the daemon on the same state;
- 9: three tasks against a server that trickles a byte every 20 s, ``lowest_speed`` 1024,
  ``stall_timeout`` 2 s; then uid 65533's download, timed to its end;
- 10: 200,000 ``status.publish`` as fast as the daemon answers (batches of 256);
- 1: nobody subscribes to status and reads ``status.recent`` while root runs two tasks whose
  URLs carry a secret in their query.

Usage::

    sudo python bench/neighbours.py [--items 4,5,...] [--scale 1.0] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import encodings.idna  # noqa: F401  (a child as nobody may no longer reach the module)
import grp
import json
import os
import platform
import resource
import select
import shlex
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import attrs
from _servers import ServerProcess, config_toml, die_with_parent, free_port, start_process
from _servers import statusd_env as _statusd_env

REPO = Path(__file__).resolve().parent.parent
ITEMS = ("4", "5", "6", "7", "8", "9", "10", "1")
NOBODY = (65534, 65534)
# The third user needs the socket's group (nobody's) to connect at all, like any user of a
# shared daemon; it has no passwd entry.
THIRD = (65533, 65534)
ROOT = (0, 0)
BUSY = -32004
CALL_TIMEOUT = 30.0
VICTIM_PAUSE = 0.02
SECRET = "SECRET-d41d8cd98f"
MESSAGE = "m" * 200  # the longest status message text


@attrs.frozen
class Sizes:
    subscriptions: int = 1_000_000
    recent_calls: int = 3000
    recent_lines: int = 20
    full_history: int = 1000
    reply_batches: int = 5
    idle_connections: int = 1100
    handshakes: int = 1024
    tasks: int = 200
    urls: int = 10_000
    publishes: int = 200_000

    def scaled(self, factor: float) -> Sizes:
        # Some attacks mean nothing below the limit they attack: 300 subscriptions and
        # connections pass 256 and 64, a 300-entry batch passes 256.
        floors = {"subscriptions": 300, "recent_calls": 300, "idle_connections": 80,
                  "handshakes": 300, "tasks": 3, "urls": 10, "publishes": 300}  # fmt: skip
        return Sizes(
            **{
                name: max(floors.get(name, 1), round(value * factor))
                for name, value in attrs.asdict(self).items()
            }
        )


@attrs.frozen
class Row:
    item: str
    attack: str
    happened: str
    victims: str
    rss: str


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- JSON-RPC over a blocking Unix socket --------------------------------------------------------


def entry(method: str, ident: int, params: dict[str, Any] | None = None) -> dict[str, Any]:
    request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": ident}
    if params is not None:
        request["params"] = params
    return request


def line(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


class Connection:
    """One JSON-RPC connection; answers are read line by line, pushes set aside."""

    def __init__(self, path: str, timeout: float = CALL_TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb", buffering=1 << 20)
        self.pushes: list[dict[str, Any]] = []
        self.received = 0

    def send(self, value: Any) -> None:
        self.sock.sendall(line(value) if not isinstance(value, bytes) else value)

    def answer(self) -> Any:
        """The next line that is not a push."""
        while True:
            raw = self.reader.readline()
            if not raw:
                raise ConnectionError("statusd closed the connection")
            self.received += len(raw)
            value = json.loads(raw)
            if isinstance(value, dict) and "method" in value:
                self.pushes.append(value)
                continue
            return value

    def take_pushes(self, wait: float) -> None:
        """Set aside the pushes that arrive within ``wait`` seconds."""
        while select.select([self.sock], [], [], wait)[0]:
            self.pushes.append(json.loads(self.reader.readline()))

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        self.send(entry(method, 1, params))
        return self.answer()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def readable(sock: socket.socket) -> bool:
    """Whether ``sock`` has data or an end to read now (poll: select stops at fd 1023)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def call(path: str, method: str, params: dict[str, Any] | None = None) -> Any:
    connection = Connection(path)
    try:
        return connection.call(method, params)
    finally:
        connection.close()


def result(path: str, method: str, params: dict[str, Any] | None = None) -> Any:
    answer = call(path, method, params)
    if "error" in answer:
        raise RuntimeError(f"{method} failed: {answer['error']}")
    return answer["result"]


# -- forked children as other uids ----------------------------------------------------------------


class Child:
    """``action(stopped)`` in a forked child running as ``uid``/``gid`` (no exec: the
    interpreter may live where nobody cannot enter); ``stopped()`` turns true once the
    parent calls ``stop``. ``result`` is what the action returned, through a pipe."""

    # The parent's ends of every live child's pipes: a later child closes its copies, or a
    # victim would never see its stop pipe close while the next child holds it open.
    _open: set[int] = set()

    def __init__(
        self, who: tuple[int, int], action: Callable[[Callable[[], bool]], Any], files: int = 0
    ) -> None:
        stop_read, self._stop = os.pipe()
        self._read, write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child
            try:
                for fd in (self._read, self._stop, *Child._open):
                    os.close(fd)
                self._run(who, action, stop_read, write, files)
            finally:
                os._exit(1)  # never back into the parent's code
        os.close(write)
        os.close(stop_read)
        Child._open.update((self._read, self._stop))

    @staticmethod
    def _run(
        who: tuple[int, int],
        action: Callable[[Callable[[], bool]], Any],
        stop_read: int,
        write: int,
        files: int,
    ) -> None:
        try:
            die_with_parent()
            # Raised while still root: an unprivileged process may not pass its hard limit.
            if files:
                resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))
            uid, gid = who
            if uid:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)

            def stopped() -> bool:
                return bool(select.select([stop_read], [], [], 0)[0])

            outcome = {"result": action(stopped)}
        except BaseException as exc:
            outcome = {"error": f"{type(exc).__name__}: {exc}"}
        with contextlib.suppress(OSError), os.fdopen(write, "w") as out:
            json.dump(outcome, out)
        os._exit(0)

    def stop(self) -> None:
        if self._stop in Child._open:
            Child._open.discard(self._stop)
            os.close(self._stop)

    def result(self) -> Any:
        self.stop()
        Child._open.discard(self._read)
        with os.fdopen(self._read) as source:
            text = source.read()
        os.waitpid(self.pid, 0)
        outcome = json.loads(text) if text else {"error": "the child wrote nothing"}
        if "error" in outcome:
            raise RuntimeError(f"child {self.pid} failed: {outcome['error']}")
        return outcome["result"]


def victim(path: str, create_url: str | None = None) -> Callable[[Callable[[], bool]], Any]:
    """A neighbour calling ``daemon.info`` (every tenth call ``tasks.download`` of
    ``create_url``, when given) on a new connection each time, until stopped."""

    def run(stopped: Callable[[], bool]) -> dict[str, Any]:
        latencies: list[float] = []
        errors: list[str] = []
        number = 0
        while not stopped() or not latencies:
            create = create_url is not None and number % 10 == 9
            began = time.monotonic()
            try:
                if create:
                    answer = call(path, "tasks.download", {"urls": [f"{create_url}/{number}"]})
                else:
                    answer = call(path, "daemon.info")
                if "error" in answer:
                    errors.append(json.dumps(answer["error"])[:160])
            except (OSError, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:160])
            latencies.append(time.monotonic() - began)
            number += 1
            time.sleep(VICTIM_PAUSE)
        return {"latencies": latencies, "errors": errors}

    return run


@attrs.define
class Victims:
    root: Child
    third: Child

    @classmethod
    def start(cls, path: str, create_url: str | None = None) -> Victims:
        return cls(Child(ROOT, victim(path, create_url)), Child(THIRD, victim(path, create_url)))

    def report(self) -> str:
        parts = []
        for name, child in (("root", self.root), ("65533", self.third)):
            got = child.result()
            ms = [s * 1000 for s in got["latencies"]]
            text = f"{name} {statistics.median(ms):.1f} / {max(ms):.0f}"
            if got["errors"]:
                text += f" ({len(got['errors'])} of {len(ms)} failed: {got['errors'][0]})"
            parts.append(text)
        return "; ".join(parts)


# -- the daemon and a local HTTP server ---------------------------------------------------------


def rss_mib(pid: int) -> tuple[float, float]:
    """VmRSS and VmHWM of ``pid``, in MiB."""
    fields = dict(
        part.split(":", 1) for part in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@attrs.define
class Daemon:
    server: ServerProcess
    directory: Path
    settings: dict[str, Any]
    before: float = 0.0

    @property
    def path(self) -> str:
        return self.server.socket

    @property
    def pid(self) -> int:
        return self.server.process.pid

    def mark(self) -> None:
        self.before = rss_mib(self.pid)[0]

    def rss(self) -> str:
        after, peak = rss_mib(self.pid)
        return f"{self.before:.0f} -> {after:.0f} MiB (peak {peak:.0f})"

    def restart(self) -> float:
        """Stop, start again on the same state; seconds until it accepts connections."""
        self.server.stop()
        began = time.monotonic()
        self.server = start_daemon(self.directory, self.settings)
        return time.monotonic() - began

    def log(self) -> str:
        return self.server.log.read_text(errors="replace")


def start_daemon(
    directory: Path, settings: dict[str, Any], *, websocket: str | None = None
) -> ServerProcess:
    config = directory / "statusd.toml"
    config.write_text(config_toml(settings))
    argv = [
        sys.executable, "-m", "statusd", "--config", str(config),
        "--socket", str(directory / "statusd.sock"), "--state-dir", str(directory / "state"),
        "--log-level", str(settings.get("log_level", "warning")),
    ]  # fmt: skip
    if websocket:
        argv += ["--websocket", websocket]
    server = start_process("statusd", argv, _statusd_env(directory), directory)
    server.wait_ready()
    return server


@contextlib.contextmanager
def statusd(
    work: Path, name: str, settings: dict[str, Any], *, websocket: str | None = None
) -> Iterator[Daemon]:
    """A statusd with the shipped defaults, nobody allowed on its socket, and ``settings``."""
    directory = work / name
    directory.mkdir()
    directory.chmod(0o755)  # nobody must reach the socket inside
    group = grp.getgrgid(NOBODY[1]).gr_name
    settings = {"socket_group": group, **settings}
    server = start_daemon(directory, settings, websocket=websocket)
    daemon = Daemon(server, directory, settings)
    try:
        yield daemon
        daemon.server.check_alive()
    finally:
        daemon.server.stop()


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            if path.startswith("/hang"):
                await asyncio.sleep(3600)
            elif path.startswith("/trickle"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
                while True:
                    writer.write(b"x")
                    await writer.drain()
                    await asyncio.sleep(20)
            elif path.startswith("/file"):
                body = b"x" * 16384
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            else:
                body = b"not found\n"
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n" % len(body))
                writer.write(body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, IndexError):
        pass
    finally:
        writer.close()


def serve_http(port: int) -> None:  # pragma: no cover - the server child
    """``/hang/*`` never answers, ``/trickle/*`` sends a byte every 20 s, ``/file/*`` is
    16 KiB, anything else 404."""

    async def main() -> None:
        server = await asyncio.start_server(_handle, "127.0.0.1", port, backlog=4096)
        await server.serve_forever()

    die_with_parent()
    asyncio.run(main())


@contextlib.contextmanager
def http_server() -> Iterator[str]:
    port = free_port()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            serve_http(port)
        finally:
            os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# -- the items ---------------------------------------------------------------------------------


@attrs.define
class Bench:
    work: Path
    sizes: Sizes
    base: str  # the local HTTP server

    def item_4(self) -> Row:
        total = self.sizes.subscriptions
        with statusd(self.work, "item4", {}) as daemon:
            most = 256  # limits.max_batch_entries' default

            def attack(stopped: Callable[[], bool]) -> dict[str, Any]:
                connection = Connection(daemon.path)
                granted = refused = 0
                first: dict[str, Any] | None = None
                for start in range(0, total, most):
                    count = min(most, total - start)
                    connection.send(
                        [entry("subscribe", start + i, {"tasks": "all"}) for i in range(count)]
                    )
                    for answer in connection.answer():
                        if "result" in answer:
                            granted += 1
                        else:
                            refused += 1
                            first = first or answer["error"]
                return {"granted": granted, "refused": refused, "error": first}

            daemon.mark()
            victims = Victims.start(daemon.path)
            began = time.monotonic()
            got = Child(NOBODY, attack).result()
            seconds = time.monotonic() - began
            served = victims.report()
            error = got["error"] or {}
            happened = (
                f"{got['granted']:,} granted, {got['refused']:,} refused with "
                f'{error.get("code")} "{error.get("message")}"; the attack took {seconds:.1f} s'
            )
            return Row("4", f"one connection asks for {total:,} subscriptions, "
                       f"{most} a batch", happened, served, daemon.rss())  # fmt: skip

    def item_5(self) -> Row:
        sizes = self.sizes
        settings = {"status_history": sizes.full_history}
        with statusd(self.work, "item5", settings) as daemon:
            # A full history everyone may read: root's messages to all, 200 characters each.
            for _ in range(0, sizes.full_history, 250):
                publish = {"level": "info", "message": MESSAGE, "audience": "all"}
                connection = Connection(daemon.path)
                connection.send([entry("status.publish", i, publish) for i in range(250)])
                connection.answer()
                connection.close()
            calls = line([entry("status.recent", i) for i in range(sizes.recent_calls)])
            cut = [entry("status.recent", i) for i in range(256)]

            def attack(stopped: Callable[[], bool]) -> dict[str, Any]:
                connection = Connection(daemon.path)
                codes = []
                for _ in range(sizes.recent_lines):
                    connection.send(calls)
                    codes.append(connection.answer()["error"]["code"])
                replies = []
                for _ in range(sizes.reply_batches):
                    connection.received = 0
                    connection.send(cut)
                    answers = connection.answer()
                    replies.append(
                        {
                            "bytes": connection.received,
                            "answered": sum("result" in a for a in answers),
                            "refused": [a["error"]["code"] for a in answers if "error" in a],
                        }
                    )
                return {"codes": codes, "replies": replies}

            daemon.mark()
            victims = Victims.start(daemon.path)
            got = Child(NOBODY, attack).result()
            served = victims.report()
            codes = sorted(set(got["codes"]))
            reply = got["replies"][0]
            refused = sorted(set(reply["refused"]))
            happened = (
                f"each {len(calls) / 1024:.0f} KiB line answered {codes} (one error, nothing "
                f"run); each batch of 256: {reply['answered']} answered, "
                f"{len(reply['refused'])} refused {refused}, reply "
                f"{reply['bytes'] / (1 << 20):.1f} MiB (max_reply_bytes 16 MiB)"
            )
            attack_text = (
                f"{sizes.recent_lines} x a line of {sizes.recent_calls:,} status.recent "
                f"({sizes.full_history:,} messages of 200 characters held), then "
                f"{sizes.reply_batches} x 256 status.recent"
            )
            return Row("5", attack_text, happened, served, daemon.rss())

    def item_6(self) -> Row:
        count = self.sizes.idle_connections
        with statusd(self.work, "item6", {}) as daemon:

            def attack(stopped: Callable[[], bool]) -> dict[str, Any]:
                held = []
                for _ in range(count):
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.connect(daemon.path)
                    held.append(sock)
                time.sleep(1.0)  # refusals are sent as each connection is looked at
                keys: dict[str, int] = {}
                for sock in held:
                    if readable(sock):
                        data = sock.recv(65536)
                        key = json.loads(data)["error"]["data"]["key"] if data else "closed"
                        keys[key] = keys.get(key, 0) + 1
                while not stopped():
                    time.sleep(0.05)
                for sock in held:
                    sock.close()
                return {"refused": keys, "admitted": count - sum(keys.values())}

            daemon.mark()
            attacker = Child(NOBODY, attack, files=count + 64)
            time.sleep(1.5)  # the victims come while nobody holds its connections
            victims = Victims.start(daemon.path)
            time.sleep(2.0)
            served = victims.report()
            got = attacker.result()
            refused = ", ".join(f"{n:,} -32004 {key}" for key, n in got["refused"].items())
            happened = f"{got['admitted']} admitted and held; refused: {refused}"
            return Row("6", f"nobody opens {count:,} idle connections", happened, served,
                       daemon.rss())  # fmt: skip

    def item_7(self) -> Row:
        count = self.sizes.handshakes
        address = f"127.0.0.1:{free_port()}"
        with statusd(self.work, "item7", {}, websocket=address) as daemon:
            host, port = address.split(":")
            fds_before = open_files(daemon.pid)

            def attack(stopped: Callable[[], bool]) -> dict[str, Any]:
                held = []
                for _ in range(count):
                    sock = socket.create_connection((host, int(port)))
                    sock.sendall(b"GET /ws HTTP/1.1\r\nHost: " + address.encode() + b"\r\n")
                    held.append(sock)
                while not stopped():
                    time.sleep(0.05)
                answers: dict[str, int] = {}
                for sock in held:
                    status = "none yet"
                    if readable(sock):
                        try:
                            data = sock.recv(4096)
                            status = data.split(b"\r\n", 1)[0].decode() if data else "closed"
                        except ConnectionError:
                            status = "reset"
                    answers[status] = answers.get(status, 0) + 1
                    sock.close()
                return answers

            daemon.mark()
            attacker = Child(NOBODY, attack, files=count + 64)
            victims = Victims.start(daemon.path)
            most = 0
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                most = max(most, open_files(daemon.pid))
                time.sleep(0.05)
            served = victims.report()
            answers = attacker.result()
            shown = ", ".join(f"{n:,} {status!r}" for status, n in sorted(answers.items()))
            happened = (
                f"after 3 s: {shown}; daemon's open files {fds_before} -> at most {most} "
                f"(soft limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]} here, raised "
                "to the hard limit by the daemon)"
            )
            return Row("7", f"{count:,} slow WebSocket handshakes (request head never "
                       "finished), held 3 s", happened, served, daemon.rss())  # fmt: skip

    def item_8(self) -> Row:
        sizes = self.sizes
        with statusd(self.work, "item8", {}) as daemon:

            def attack(stopped: Callable[[], bool]) -> dict[str, Any]:
                connection = Connection(daemon.path, timeout=120)
                accepted = 0
                refusal: dict[str, Any] | None = None
                for task in range(sizes.tasks):
                    urls = [f"{self.base}/hang/{task}/{i}" for i in range(sizes.urls)]
                    answer = connection.call("tasks.download", {"urls": urls})
                    if "result" in answer:
                        accepted += 1
                    else:
                        refusal = refusal or answer["error"]
                return {"accepted": accepted, "refusal": refusal}

            daemon.mark()
            victims = Victims.start(daemon.path, f"{self.base}/hang/victim")
            began = time.monotonic()
            got = Child(NOBODY, attack).result()
            seconds = time.monotonic() - began
            served = victims.report()
            rss = daemon.rss()
            journal = (daemon.directory / "state" / "tasks.jsonl").stat().st_size
            restart = daemon.restart()
            refusal = got["refusal"] or {}
            happened = (
                f"{got['accepted']} accepted in {seconds:.1f} s, the rest refused: "
                f'{refusal.get("code")} "{refusal.get("message")}"; tasks.jsonl '
                f"{journal / 1e6:.1f} MB; restart to ready {restart:.1f} s"
            )
            return Row("8", f"{sizes.tasks} tasks.download of {sizes.urls:,} URLs against a "
                       "server that never answers", happened, served, rss)  # fmt: skip

    def item_9(self) -> Row:
        settings = {"downloads.lowest_speed": 1024, "downloads.stall_timeout": 2}
        with statusd(self.work, "item9", settings) as daemon:
            daemon.mark()
            victims = Victims.start(daemon.path, f"{self.base}/file/victim")

            def trickle(stopped: Callable[[], bool]) -> list[str]:
                return [
                    result(daemon.path, "tasks.download", {"urls": [f"{self.base}/trickle/{n}"]})[
                        "task_id"
                    ]
                    for n in range(3)
                ]

            ids = Child(NOBODY, trickle).result()
            _wait(lambda: all(_status(daemon.path, t) == "running" for t in ids), 20)

            def other(stopped: Callable[[], bool]) -> dict[str, Any]:
                began = time.monotonic()
                task = result(daemon.path, "tasks.download", {"urls": [f"{self.base}/file/x"]})
                status = ""
                while status not in ("completed", "failed", "cancelled"):
                    time.sleep(0.05)
                    status = result(daemon.path, "tasks.get", {"task_id": task["task_id"]})[
                        "status"
                    ]
                return {"status": status, "seconds": time.monotonic() - began}

            got = Child(THIRD, other).result()
            _wait(lambda: all(_status(daemon.path, t) == "failed" for t in ids), 30)
            tasks = [result(daemon.path, "tasks.get", {"task_id": t}) for t in ids]
            held = max(_seconds(t["started_at"], t["completed_at"]) for t in tasks)
            error = tasks[0]["result"]["items"][0]["error"]
            served = victims.report()
            happened = (
                f'the three ran, failed "{error}" and freed their slots at most '
                f"{held:.1f} s after they started; 65533's download, asked for once they ran: "
                f"{got['status']} {got['seconds']:.1f} s later"
            )
            return Row("9", "3 tasks against a server sending 1 byte / 20 s; lowest_speed "
                       "1024, stall_timeout 2 s", happened, served, daemon.rss())  # fmt: skip

    def item_10(self) -> Row:
        total = self.sizes.publishes
        with statusd(self.work, "item10", {}) as daemon:
            for n in range(10):
                result(daemon.path, "status.publish", {"level": "info", "message": f"root {n}"})

            def publish(stopped: Callable[[], bool]) -> None:
                for n in range(10):
                    params = {"level": "info", "message": f"third {n}"}
                    result(daemon.path, "status.publish", params)

            Child(THIRD, publish).result()

            def flood(stopped: Callable[[], bool]) -> dict[str, Any]:
                connection = Connection(daemon.path)
                accepted = refused = 0
                for start in range(0, total, 256):
                    count = min(256, total - start)
                    publish = {"level": "info", "message": "flood"}
                    connection.send([entry("status.publish", i, publish) for i in range(count)])
                    for answer in connection.answer():
                        if "result" in answer:
                            accepted += 1
                        elif answer["error"]["code"] == BUSY:
                            refused += 1
                return {"accepted": accepted, "refused": refused}

            daemon.mark()
            victims = Victims.start(daemon.path)
            began = time.monotonic()
            got = Child(NOBODY, flood).result()
            seconds = time.monotonic() - began
            served = victims.report()
            held = result(daemon.path, "status.recent")
            kept = sum(m["message"].startswith("root ") for m in held["messages"])

            def recent(stopped: Callable[[], bool]) -> Any:
                return result(daemon.path, "status.recent")

            third = Child(THIRD, recent).result()
            kept_third = sum(m["message"].startswith("third ") for m in third["messages"])
            happened = (
                f"{got['accepted']:,} accepted, {got['refused']:,} refused -32004 in "
                f"{seconds:.1f} s; earlier messages still held: root's {kept} of 10 "
                f"(root's status.recent: {len(held['messages'])} messages, dropped "
                f"{held['dropped']}), 65533's {kept_third} of 10 (dropped {third['dropped']})"
            )
            return Row("10", f"nobody publishes {total:,} status messages, 256 a batch",
                       happened, served, daemon.rss())  # fmt: skip

    def item_1(self) -> Row:
        # At debug the log says the most about a task: the secret must be in none of it.
        with statusd(self.work, "item1", {"log_level": "debug"}) as daemon:

            def spy(stopped: Callable[[], bool]) -> dict[str, Any]:
                connection = Connection(daemon.path)
                connection.call("subscribe", {"status": True, "since": 0})
                while not stopped():
                    connection.take_pushes(0.1)
                recent = connection.call("status.recent")["result"]["messages"]
                pushed = [p["params"] for p in connection.pushes if p["method"] == "status"]
                return {"pushed": pushed, "recent": recent}

            daemon.mark()
            attacker = Child(NOBODY, spy)
            time.sleep(0.5)
            urls = [
                f"{self.base}/missing/report-q3.pdf?signature={SECRET}",
                f"{self.base}/file/report-q4.pdf?signature={SECRET}",
            ]
            ids = [result(daemon.path, "tasks.download", {"urls": [u]})["task_id"] for u in urls]
            _wait(lambda: all(_status(daemon.path, t) in ("completed", "failed") for t in ids), 60)
            time.sleep(0.5)  # the last status pushes reach the spy
            got = attacker.result()
            seen = got["pushed"] + got["recent"]
            roots = [m for m in seen if m.get("user") == "root" or m.get("operation_id") in ids]
            leaked = sum(SECRET in json.dumps(m) for m in seen)
            own = result(daemon.path, "status.recent")["messages"]
            in_own = sum(SECRET in m["message"] for m in own)
            task_messages = sum(m.get("operation_id") in ids for m in own)
            kept = sum(SECRET in json.dumps(result(daemon.path, "tasks.get", {"task_id": t}))
                       for t in ids)  # fmt: skip
            log = daemon.log()
            in_log, named = log.count(SECRET), log.count("report-q3.pdf")
            happened = (
                f"nobody saw {len(seen)} messages, {len(roots)} of them root's, "
                f"{leaked} with the secret; root's own status.recent: {task_messages} task "
                f"messages, {in_own} with the secret; the log: {in_log} (the URL's path: "
                f"{named}); root's tasks.get keeps it in {kept} of 2"
            )
            return Row("1", "nobody subscribes to status and reads status.recent while root "
                       "runs 2 tasks with a secret in their URL query", happened,
                       "(no victim loop)", daemon.rss())  # fmt: skip


def _status(path: str, task_id: str) -> str:
    status: str = result(path, "tasks.get", {"task_id": task_id})["status"]
    return status


def _seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def _wait(condition: Callable[[], bool], timeout: float) -> float:
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > timeout:
            raise RuntimeError(f"gave up waiting after {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - began


# -- the table ---------------------------------------------------------------------------------

HEADER = ("item", "attack (as uid nobody)", "what happened", "victims: p50 / max ms", "RSS")


def render(rows: list[Row], markdown: bool) -> str:
    cells = [HEADER, *[(r.item, r.attack, r.happened, r.victims, r.rss) for r in rows]]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in cells]
        lines.insert(1, "|---|---|---|---|---|")
        return "\n".join(lines)
    return "\n\n".join("\n".join(f"{h}: {c}" for h, c in zip(HEADER, row, strict=True))
                       for row in cells[1:])  # fmt: skip


def machine() -> str:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}; load average {load}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", default=",".join(ITEMS), help="comma-separated: 4,5,...")
    parser.add_argument("--scale", type=float, default=1.0, help="every count times this")
    parser.add_argument("--markdown", action="store_true", help="the table for docs/")
    parser.add_argument("--work-dir", default=tempfile.gettempdir())
    args = parser.parse_args(argv)
    items = [item.strip() for item in args.items.split(",") if item.strip()]
    unknown = [item for item in items if item not in ITEMS]
    if unknown:
        parser.error(f"unknown items {unknown}; known: {', '.join(ITEMS)}")
    if os.geteuid() != 0:
        print(
            f"bench/neighbours.py must run as root (it forks attackers and victims that drop "
            f"to uids 65534 and 65533); running as uid {os.geteuid()}",
            file=sys.stderr,
        )
        return 2
    sizes = Sizes().scaled(args.scale)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="neighbours-", dir=args.work_dir) as work:
        Path(work).chmod(0o755)
        with http_server() as base:
            bench = Bench(Path(work), sizes, base)
            for item in items:
                _say(f"item {item}...")
                began = time.monotonic()
                rows.append(getattr(bench, f"item_{item}")())
                _say(f"item {item}: {time.monotonic() - began:.1f} s")
    command = "python bench/neighbours.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(f"machine: {machine()}")
    print(f"command: `{command.strip()}`\n")
    print(render(rows, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
