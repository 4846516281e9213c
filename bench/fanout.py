"""Fan-out benchmark: statusd against a naive plain-trio server, side by side, in one run.

Not a test. For S subscribers on the Unix socket, and on statusd's WebSocket
(``statusd-ws``: the same daemon with ``--websocket``, subscribers on ``/ws`` with a read
token), S = 1, 10, 100 by default, it measures

- throughput: N messages published as fast as the server takes them (pipelined from one
  publisher connection with a bounded window), counted at every subscriber; deliveries/s is
  (status messages received by all subscribers) / (first publish -> last receive);
- latency: a steady 1,000 messages/s for a few seconds; p50/p99/max of publish -> receive
  over all subscribers, using CLOCK_MONOTONIC (``time.monotonic_ns``), which is one clock
  for every process on Linux.

Every server runs as its own process, so its CPU is not shared with the clients' loops:
statusd as ``python -m statusd``, and the baseline as this file with ``--serve-baseline``.
The baseline is the lab's naive design: one plain trio server that, for each published
message, awaits ``send_all`` once per subscriber before it answers the publisher.
Subscribers are raw sockets spread over a few client processes (epoll, no trio);
they parse only what they need to count and timestamp.

Usage::

    python bench/fanout.py [--messages N] [--subscribers 1,10,100] [--rate 1000]
                           [--duration 5] [--repeats R] [--quick]
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import multiprocessing
import os
import platform
import re
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import attrs
import trio
from _common import cpu_model
from _servers import (
    ServerProcess,
    connect,
    die_with_parent,
    free_port,
    start_process,
    statusd_env,
)

REPO = Path(__file__).resolve().parent.parent
RECEIVE_BYTES = 256 * 1024
# statusd's ring must hold what the slowest subscriber has not read yet; the default (100)
# is overrun at once by a pipelined publisher, so the throughput phase raises it.
DEFAULT_HISTORY = 100_000
READY_TIMEOUT = 20.0

# What subscribers look for in the pushed lines; both servers write compact JSON with the
# keys in this order.
STATUS_MARK = b'"method":"status"'
DROPPED_MARK = b'"method":"dropped"'
DROPPED_COUNT = re.compile(rb'"method":"dropped","params":\{[^}]*"count":(\d+)')
END_MARK = b'"message":"END'
LATENCY_STAMP = re.compile(rb'"message":"L(\d+)')
PAD = "bench status message padding text"  # a realistic ~40-character status text

SUBSCRIBE = b'{"jsonrpc":"2.0","method":"subscribe","params":{"status":true},"id":1}\n'


def publish_request(message: str, request_id: int) -> bytes:
    params = {"level": "info", "message": message}
    body = {"jsonrpc": "2.0", "method": "status.publish", "params": params, "id": request_id}
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


# -- the baseline server -------------------------------------------------------------------


def _utc_timestamp() -> str:
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


@attrs.define
class _BaselineServer:
    """The naive design: the publisher's request handler awaits one ``send_all`` per
    subscriber for every message. The message is encoded once, like statusd does, so the
    comparison is about the fan-out alone.

    No send lock: once subscribed, a connection is written only by the publisher's handler
    (the subscribe reply goes out before the connection joins ``subscribers``), and a
    second concurrent writer would fail loudly with ``trio.BusyResourceError``."""

    subscribers: list[trio.SocketStream] = attrs.Factory(list)
    seq: int = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        buffer = b""
        try:
            while True:
                data = await stream.receive_some(64 * 1024)
                if not data:
                    return
                *lines, buffer = (buffer + data).split(b"\n")
                for line in lines:
                    if line.strip():
                        await self._answer(stream, json.loads(line))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            with contextlib.suppress(ValueError):
                self.subscribers.remove(stream)
            await trio.aclose_forcefully(stream)

    async def _answer(self, stream: trio.SocketStream, request: dict[str, Any]) -> None:
        result: dict[str, Any]
        subscribing = False
        if request["method"] == "status.publish":
            self.seq += 1
            params = request["params"]
            message = {
                "seq": self.seq,
                "timestamp": _utc_timestamp(),
                "level": params["level"],
                "message": params["message"],
                "operation_id": params.get("operation_id"),
            }
            notice = {"jsonrpc": "2.0", "method": "status", "params": message}
            line = json.dumps(notice, separators=(",", ":")).encode() + b"\n"
            for subscriber in list(self.subscribers):
                try:
                    await subscriber.send_all(line)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    with contextlib.suppress(ValueError):
                        self.subscribers.remove(subscriber)
            result = {"seq": self.seq}
        elif request["method"] == "subscribe":
            subscribing = True
            result = {"subscription": f"sub-{len(self.subscribers) + 1}"}
        else:
            result = {}
        reply = {"jsonrpc": "2.0", "id": request.get("id"), "result": result}
        await stream.send_all(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
        if subscribing:
            self.subscribers.append(stream)


async def _serve_baseline(path: str) -> None:
    # A run killed by SIGTERM leaves its socket file behind for the next run.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(1024)
    server = _BaselineServer()
    await trio.serve_listeners(server.handle, [trio.SocketListener(sock)])


def serve_baseline(path: str) -> None:
    die_with_parent()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_serve_baseline, path)


# -- servers as processes ------------------------------------------------------------------


def start_statusd(
    directory: Path, history: int, source: Path, *, websocket: bool = False
) -> ServerProcess:
    env = statusd_env(directory, source)
    env["STATUSD_STATUS_HISTORY"] = str(history)
    argv = [
        sys.executable,
        "-m",
        "statusd",
        "--socket",
        str(directory / "statusd.sock"),
        "--state-dir",
        str(directory / "state"),
        "--log-level",
        "warning",
    ]
    if not websocket:
        return start_process("statusd", argv, env, directory, cwd=source)
    address = f"127.0.0.1:{free_port()}"
    server = start_process(
        "statusd-ws", [*argv, "--websocket", address], env, directory, cwd=source
    )
    server.websocket = address
    return server


def start_baseline(directory: Path) -> ServerProcess:
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--serve-baseline",
        "--socket",
        str(directory / "baseline.sock"),
    ]
    return start_process("baseline", argv, dict(os.environ), directory)


# -- subscribers (client processes) --------------------------------------------------------


@attrs.define
class _Subscriber:
    sock: socket.socket
    websocket: bool = False
    tail: bytes = b""
    received: int = 0
    dropped: int = 0
    last_ns: int = 0


@attrs.frozen
class SubscriberReport:
    received: tuple[int, ...]
    dropped: tuple[int, ...]
    last_ns: tuple[int, ...]
    latencies: bytes  # array("q") of publish -> receive in ns
    cpu_seconds: float  # the client process's CPU time, setup included


def _connect_subscriber(path: str) -> _Subscriber:
    if path.startswith("ws://"):
        return _connect_websocket_subscriber(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(SUBSCRIBE)
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("server closed the connection before answering subscribe")
        data += chunk
    reply, _, rest = data.partition(b"\n")
    if b'"result"' not in reply:
        raise RuntimeError(f"subscribe failed: {reply!r}")
    return _Subscriber(sock, tail=rest)


# -- WebSocket subscribers: the same counting over frames read by hand (no library, like the
# raw Unix-socket subscribers, so the client's cost stays small next to the server's) -------


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A masked client frame; the zero mask leaves the payload as it is (RFC 6455 allows
    any key; this is a benchmark client, not a browser)."""
    size = len(payload)
    if size < 126:
        head = bytes([0x80 | opcode, 0x80 | size])
    elif size < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + size.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + size.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def frame_end(buffer: bytes | bytearray, start: int, end: int) -> tuple[int, int]:
    """(end of the frame at ``start``, its opcode), or (-1, 0) when it is not complete.
    Server frames are never masked."""
    if end - start < 2:
        return -1, 0
    opcode, size = buffer[start] & 0x0F, buffer[start + 1] & 0x7F
    at = start + 2
    if size == 126:
        if end - at < 2:
            return -1, 0
        size, at = int.from_bytes(buffer[at : at + 2], "big"), at + 2
    elif size == 127:
        if end - at < 8:
            return -1, 0
        size, at = int.from_bytes(buffer[at : at + 8], "big"), at + 8
    return (at + size, opcode) if at + size <= end else (-1, 0)


def _connect_websocket_subscriber(url: str) -> _Subscriber:
    rest = url.removeprefix("ws://")
    hostport, _, target = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(
        f"GET /{target} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("server closed the connection during the handshake")
        data += chunk
    head, _, data = data.partition(b"\r\n\r\n")
    if b" 101 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"WebSocket handshake refused: {head[:200]!r}")
    sock.sendall(client_frame(SUBSCRIBE.rstrip(b"\n")))
    while (found := frame_end(data, 0, len(data)))[0] < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("server closed the connection before answering subscribe")
        data += chunk
    end = found[0]
    if b'"result"' not in data[:end]:
        raise RuntimeError(f"subscribe failed: {data[:end]!r}")
    return _Subscriber(sock, websocket=True, tail=data[end:])


def _websocket_cut(subscriber: _Subscriber, buffer: bytearray, end: int) -> int:
    """Where the last complete frame in ``buffer[:end]`` ends; pings are answered."""
    at = 0
    while True:
        stop, opcode = frame_end(buffer, at, end)
        if stop < 0:
            return at
        if opcode == 0x9:  # ping: the daemon drops clients that never answer
            header = 2 + (2 if buffer[at + 1] & 0x7F == 126 else 0)
            subscriber.sock.sendall(client_frame(bytes(buffer[at + header : stop]), 0xA))
        at = stop


def _subscriber_process(
    path: str, count: int, index: int, progress: Any, pipe: Connection, latency: bool
) -> None:
    """Hold ``count`` subscriptions; count what arrives until each saw the END message
    (or the parent says stop), then send a ``SubscriberReport`` up the pipe."""
    die_with_parent()
    subscribers = [_connect_subscriber(path) for _ in range(count)]
    pipe.send("ready")
    by_fd = {s.sock.fileno(): s for s in subscribers}
    poller = select.epoll()
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    poller.register(pipe.fileno(), select.EPOLLIN)
    # One receive buffer for all: a tail (partial line) is copied to its front, and the
    # scans below work on buffer[:end] in place, so no receive allocates.
    buffer = bytearray(RECEIVE_BYTES)
    view = memoryview(buffer)
    latencies = array.array("q")
    active = count
    while active:
        for fd, _ in poller.poll():
            subscriber = by_fd.get(fd)
            if subscriber is None:  # the pipe: the parent gave up waiting
                active = 0
                break
            tail = subscriber.tail
            start = len(tail)
            if start:
                buffer[:start] = tail
            size = subscriber.sock.recv_into(view[start:])
            now = time.monotonic_ns()
            if not size:
                poller.unregister(fd)
                active -= 1
                continue
            end = start + size
            if subscriber.websocket:
                cut = _websocket_cut(subscriber, buffer, end)
            else:
                cut = buffer.rfind(b"\n", 0, end) + 1
            subscriber.tail = bytes(buffer[cut:end]) if cut < end else b""
            if not cut:
                continue
            subscriber.received += buffer.count(STATUS_MARK, 0, cut)
            subscriber.last_ns = now
            if buffer.find(DROPPED_MARK, 0, cut) >= 0:
                found = DROPPED_COUNT.findall(buffer, 0, cut)
                subscriber.dropped += sum(int(n) for n in found)
            if latency:
                stamps = LATENCY_STAMP.findall(buffer, 0, cut)
                latencies.extend([now - int(stamp) for stamp in stamps])
            if buffer.find(END_MARK, 0, cut) >= 0:
                poller.unregister(fd)
                active -= 1
        if not latency:
            progress[index] = min(s.received + s.dropped for s in subscribers)
    pipe.send(
        SubscriberReport(
            received=tuple(s.received for s in subscribers),
            dropped=tuple(s.dropped for s in subscribers),
            last_ns=tuple(s.last_ns for s in subscribers),
            latencies=latencies.tobytes(),
            cpu_seconds=time.process_time(),
        )
    )
    poller.close()
    for subscriber in subscribers:
        subscriber.sock.close()


class Subscribers:
    """S subscriptions spread over ``processes`` client processes."""

    def __init__(self, path: str, count: int, processes: int, *, latency: bool) -> None:
        context = multiprocessing.get_context("fork")
        processes = max(1, min(processes, count))
        shares = [count // processes + (i < count % processes) for i in range(processes)]
        self.progress: Any = context.RawArray("q", processes)
        self._pipes: list[Connection] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        for index, share in enumerate(shares):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_subscriber_process,
                args=(path, share, index, self.progress, theirs, latency),
                daemon=True,
            )
            process.start()
            theirs.close()
            self._pipes.append(ours)
            self._processes.append(process)

    def wait_ready(self) -> None:
        for pipe in self._pipes:
            if not pipe.poll(READY_TIMEOUT) or pipe.recv() != "ready":
                raise RuntimeError("a subscriber process did not get ready")

    def slowest(self) -> int:
        """Messages received (or reported dropped) by the slowest subscriber."""
        return int(min(self.progress))

    def collect(self, timeout: float) -> tuple[list[SubscriberReport], bool]:
        """Reports from every process; the flag says whether all finished in time."""
        deadline = time.monotonic() + timeout
        complete = True
        for pipe in self._pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                complete = False
                pipe.send("stop")
        reports = [pipe.recv() for pipe in self._pipes if pipe.poll(10)]
        return reports, complete and len(reports) == len(self._pipes)

    def close(self) -> None:
        # Processes that already reported have exited; the rest (an interrupted or
        # timed-out run) are told to stop, then killed if they do not.
        for pipe, process in zip(self._pipes, self._processes, strict=True):
            if process.is_alive():
                with contextlib.suppress(OSError):
                    pipe.send("stop")
        for process in self._processes:
            process.join(0.5)
            if process.is_alive():
                process.kill()
                process.join(2)
        for pipe in self._pipes:
            pipe.close()


# -- the publisher -------------------------------------------------------------------------


def _count_replies(data: bytes) -> int:
    if b'"error"' in data:
        raise RuntimeError(f"publish failed: {data[:300]!r}")
    return data.count(b"\n")


def publish_burst(
    path: str, messages: int, window: int, lag_limit: int, slowest: Callable[[], int]
) -> tuple[int, int]:
    """Publish as fast as the server answers, at most ``window`` requests unanswered and
    at most ``lag_limit`` messages ahead of the slowest subscriber. Returns the monotonic
    ns of the first send and of the last reply."""
    requests = [publish_request(f"{PAD} {i:08d}", i) for i in range(1, messages)]
    requests.append(publish_request("END", messages))
    chunk = max(1, window // 4)
    sent = replied = 0
    with connect(path) as sock:
        started = time.monotonic_ns()
        while replied < messages:
            if sent < messages:
                room = min(window - (sent - replied), messages - sent)
                room = min(room, lag_limit - (sent - slowest()))
                if room > 0 and (room >= min(chunk, messages - sent) or sent == replied):
                    sock.sendall(b"".join(requests[sent : sent + room]))
                    sent += room
                elif sent == replied:
                    time.sleep(0.0002)  # every reply is in: wait for the subscribers
                    continue
            data = sock.recv(65536)
            if not data:
                raise RuntimeError("server closed the publisher's connection")
            replied += _count_replies(data)
        return started, time.monotonic_ns()


def publish_steady(path: str, rate: float, duration: float) -> int:
    """Publish ``rate`` messages/s for ``duration`` s on an absolute schedule, each
    carrying its send time; returns how many were published."""
    messages = max(1, round(rate * duration))
    period = 1e9 / rate
    replied = 0
    with connect(path) as sock:
        sock.setblocking(False)
        start = time.monotonic_ns() + 1_000_000
        for i in range(messages):
            due = start + round(i * period)
            delay = due - time.monotonic_ns()
            if delay > 0:
                time.sleep(delay / 1e9)
            stamp = time.monotonic_ns()
            _send_all(sock, publish_request(f"L{stamp} {PAD}", i + 1))
            replied += _drain(sock)
        _send_all(sock, publish_request("END", messages + 1))
        sock.setblocking(True)
        while replied < messages + 1:
            data = sock.recv(65536)
            if not data:
                raise RuntimeError("server closed the publisher's connection")
            replied += _count_replies(data)
    return messages


def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            select.select([], [sock], [], 0.01)


def _drain(sock: socket.socket) -> int:
    replies = 0
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return replies
        if not data:
            raise RuntimeError("server closed the publisher's connection")
        replies += _count_replies(data)


# -- runs ----------------------------------------------------------------------------------


@attrs.frozen
class ThroughputRun:
    deliveries: int
    expected: int
    dropped: int
    seconds: float  # first publish -> last receive
    publish_seconds: float  # first publish -> last reply
    complete: bool
    server_cpu: float  # CPU seconds the server used during the run
    client_cpu: float  # CPU seconds of all subscriber processes (setup included)

    @property
    def rate(self) -> float:
        return self.deliveries / self.seconds if self.seconds > 0 else 0.0


@attrs.frozen
class LatencyRun:
    samples: int
    expected: int
    dropped: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    complete: bool
    server_cpu: float
    client_cpu: float
    seconds: float  # first publish -> last receive, near enough (for the CPU share)


@attrs.frozen
class Options:
    messages: int
    baseline_deliveries: int
    subscribers: tuple[int, ...]
    rate: float
    duration: float
    repeats: int
    window: int
    history: int
    latency_history: int
    lag_limit: int
    client_processes: int
    timeout: float
    statusd_source: Path
    servers: tuple[str, ...]
    phases: tuple[str, ...]
    ws_coalesce: bool = True

    def messages_for(self, server: str, subscribers: int) -> int:
        if server in ("statusd", "statusd-ws"):
            return self.messages
        return max(1, min(self.messages, self.baseline_deliveries // subscribers))


def run_throughput(
    server: ServerProcess, count: int, messages: int, opts: Options
) -> ThroughputRun:
    subscribers = Subscribers(
        server.subscriber_endpoint, count, opts.client_processes, latency=False
    )
    try:
        subscribers.wait_ready()
        cpu_before = server.cpu_seconds()
        started, last_reply = publish_burst(
            server.socket, messages, opts.window, opts.lag_limit, subscribers.slowest
        )
        reports, complete = subscribers.collect(opts.timeout)
        server_cpu = server.cpu_seconds() - cpu_before
    finally:
        subscribers.close()
    server.check_alive()
    received = [n for r in reports for n in r.received]
    last = max((t for r in reports for t in r.last_ns), default=started)
    return ThroughputRun(
        deliveries=sum(received),
        expected=messages * count,
        dropped=sum(n for r in reports for n in r.dropped),
        seconds=(last - started) / 1e9,
        publish_seconds=(last_reply - started) / 1e9,
        complete=complete,
        server_cpu=server_cpu,
        client_cpu=sum(r.cpu_seconds for r in reports),
    )


def _percentile(ordered: Sequence[int], fraction: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1e6


def run_latency(server: ServerProcess, count: int, opts: Options) -> LatencyRun:
    subscribers = Subscribers(
        server.subscriber_endpoint, count, opts.client_processes, latency=True
    )
    try:
        subscribers.wait_ready()
        cpu_before, wall_before = server.cpu_seconds(), time.monotonic()
        messages = publish_steady(server.socket, opts.rate, opts.duration)
        reports, complete = subscribers.collect(opts.timeout)
        server_cpu = server.cpu_seconds() - cpu_before
        wall = time.monotonic() - wall_before
    finally:
        subscribers.close()
    server.check_alive()
    samples = array.array("q")
    for report in reports:
        samples.frombytes(report.latencies)
    ordered = sorted(samples)
    return LatencyRun(
        samples=len(ordered),
        expected=messages * count,
        dropped=sum(n for r in reports for n in r.dropped),
        p50_ms=_percentile(ordered, 0.50),
        p99_ms=_percentile(ordered, 0.99),
        max_ms=ordered[-1] / 1e6 if ordered else float("nan"),
        complete=complete,
        server_cpu=server_cpu,
        client_cpu=sum(r.cpu_seconds for r in reports),
        seconds=wall,
    )


@attrs.define
class Results:
    throughput: dict[tuple[str, int], list[ThroughputRun]] = attrs.Factory(dict)
    latency: dict[tuple[str, int], list[LatencyRun]] = attrs.Factory(dict)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _say(text: str) -> None:
    print(text, flush=True)


def benchmark(opts: Options, directory: Path) -> Results:
    """Every run gets a fresh server process, so no run inherits a full ring, a warm heap
    or a stuck connection from the one before; the servers alternate run by run, so a
    noisy neighbour hurts both alike."""
    results = Results()
    for phase in ("throughput", "latency"):
        if phase not in opts.phases:
            continue
        for count in opts.subscribers:
            for repeat in range(opts.repeats):
                for name in opts.servers:
                    with _server(name, phase, opts, directory) as server:
                        if phase == "throughput":
                            _throughput(server, count, repeat, opts, results)
                        else:
                            _latency(server, count, repeat, opts, results)
    return results


@contextlib.contextmanager
def _server(name: str, phase: str, opts: Options, directory: Path) -> Iterator[ServerProcess]:
    if name in ("statusd", "statusd-ws"):
        history = opts.history if phase == "throughput" else opts.latency_history
        server = start_statusd(
            directory, history, opts.statusd_source, websocket=name == "statusd-ws"
        )
    else:
        server = start_baseline(directory)
    try:
        server.wait_ready()
        if server.websocket is not None:
            server.mint_token()
            if not opts.ws_coalesce:
                server.ws_query = ""
        yield server
    finally:
        server.stop()


def _throughput(
    server: ServerProcess, count: int, repeat: int, opts: Options, results: Results
) -> None:
    n = opts.messages_for(server.name, count)
    run = run_throughput(server, count, n, opts)
    results.throughput.setdefault((server.name, count), []).append(run)
    _say(
        f"  throughput S={count:<3} {server.name:8} #{repeat + 1}: "
        f"{run.rate:>12,.0f} deliveries/s  ({run.deliveries:,} in "
        f"{run.seconds:.2f} s, publish {n / run.publish_seconds:,.0f} msg/s, "
        f"dropped {run.dropped:,}{'' if run.complete else ', TIMED OUT'}; "
        f"server CPU {run.server_cpu / run.seconds:.0%} of a core, "
        f"{_per(run.server_cpu, run.deliveries)} us/delivery; "
        f"clients CPU {_per(run.client_cpu, run.deliveries)} us/delivery)"
    )


def _per(cpu_seconds: float, count: int) -> str:
    return f"{cpu_seconds * 1e6 / count:.2f}" if count else "n/a"


def _latency(
    server: ServerProcess, count: int, repeat: int, opts: Options, results: Results
) -> None:
    run = run_latency(server, count, opts)
    results.latency.setdefault((server.name, count), []).append(run)
    _say(
        f"  latency    S={count:<3} {server.name:8} #{repeat + 1}: "
        f"p50 {run.p50_ms:.2f} ms  p99 {run.p99_ms:.2f} ms  "
        f"max {run.max_ms:.2f} ms  ({run.samples:,} of {run.expected:,} "
        f"samples, dropped {run.dropped:,}{'' if run.complete else ', TIMED OUT'}; "
        f"server CPU {run.server_cpu / run.seconds:.0%} of a core, "
        f"clients {run.client_cpu / run.seconds:.0%})"
    )


# -- the report ----------------------------------------------------------------------------


def _statusd_version(source: Path) -> str:
    """What ``python -m statusd --version`` says, and where that statusd came from."""
    env = dict(os.environ, PYTHONPATH=str(source))
    done = subprocess.run(
        [sys.executable, "-m", "statusd", "--version"],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    version = done.stdout.strip() or f"unknown ({done.stderr.strip()[-200:]})"
    return f"{version} from {_describe_source(source)}"


def _describe_source(source: Path) -> str:
    git = ["git", "-C", str(source)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return str(source)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "statusd"], capture_output=True, text=True
    ).stdout.strip()
    return f"{source} at {head.stdout.strip()}{' with uncommitted changes' if dirty else ''}"


def environment_lines(command: str, source: Path) -> list[str]:
    return [
        f"command: `{command}`",
        f"machine: {platform.machine()}, {cpu_model()}, nproc {os.cpu_count()}, "
        f"Linux {platform.release()}",
        f"versions: python {platform.python_version()}, trio {trio.__version__}, "
        f"attrs {attrs.__version__}, {_statusd_version(source)}",
    ]


def report(results: Results, opts: Options, command: str) -> str:
    lines = ["# fan-out benchmark: statusd vs naive baseline", ""]
    lines += [f"- {line}" for line in environment_lines(command, opts.statusd_source)]
    lines += [
        "- every run starts a fresh server process and fresh subscriber processes",
        f"- statusd: `python -m statusd` in its own process; throughput phase with "
        f"STATUSD_STATUS_HISTORY={opts.history} (the ring raised from the default 100 so a "
        f"pipelined publisher does not overrun it), latency phase with status_history = "
        f"{opts.latency_history}; drops are counted from the `dropped` notices",
        "- baseline: plain trio in its own process; per message, awaits `send_all` once per "
        "subscriber (message encoded once), then answers the publisher",
        f"- throughput: {opts.messages:,} messages per statusd run; the baseline gets "
        f"min({opts.messages:,}, {opts.baseline_deliveries:,} / S); one publisher "
        f"pipelining at most {opts.window} requests and at most "
        f"{opts.lag_limit:,} messages ahead of the slowest subscriber; subscribers spread over "
        f"{opts.client_processes} client process(es); median of {opts.repeats} run(s)",
        f"- latency: {opts.rate:,.0f} msg/s for {opts.duration:g} s, publish -> receive over "
        f"all subscribers (CLOCK_MONOTONIC); median of {opts.repeats} run(s)",
    ]
    if "statusd-ws" in opts.servers:
        frames = "one message per frame" if not opts.ws_coalesce else "`/ws?coalesce=1`"
        lines.append(
            f"- statusd-ws: the same daemon with `--websocket 127.0.0.1:PORT`; subscribers on "
            f"`/ws` with a read token, {frames}, frames read by hand (no client library); "
            "the publisher stays on the Unix socket"
        )
    if not {"statusd", "baseline"} & set(opts.servers):
        return "\n".join(lines + websocket_report(results, opts))
    lines += [
        "",
        "## Throughput (deliveries/s = messages received by all subscribers / first publish "
        "-> last receive)",
        "",
        "| S | statusd deliveries/s | baseline deliveries/s | ratio | statusd dropped "
        "| server CPU us/delivery (statusd / baseline) | messages (statusd / baseline) "
        "| statusd runs | baseline runs |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for count in opts.subscribers:
        ours = results.throughput.get(("statusd", count), [])
        theirs = results.throughput.get(("baseline", count), [])
        a = _median([r.rate for r in ours])
        b = _median([r.rate for r in theirs])
        dropped = max((r.dropped for r in ours), default=0)
        lines.append(
            f"| {count} | {a:,.0f} | {b:,.0f} | {_ratio(a, b)} | {dropped:,} "
            f"| {_cpu_per_delivery(ours)} / {_cpu_per_delivery(theirs)} "
            f"| {opts.messages_for('statusd', count):,} / "
            f"{opts.messages_for('baseline', count):,} "
            f"| {_runs(ours)} | {_runs(theirs)} |"
        )
    lines += [
        "",
        f"## Latency at {opts.rate:,.0f} msg/s (publish -> receive, ms)",
        "",
        "| S | statusd p50 | statusd p99 | statusd max | baseline p50 | baseline p99 "
        "| baseline max | p99 ratio (baseline/statusd) | server CPU, % of a core "
        "(statusd / baseline) | statusd p99 runs |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for count in opts.subscribers:
        ours_l = results.latency.get(("statusd", count), [])
        theirs_l = results.latency.get(("baseline", count), [])
        a50, a99, amax = (_median([getattr(r, f) for r in ours_l]) for f in _LATENCY_FIELDS)
        b50, b99, bmax = (_median([getattr(r, f) for r in theirs_l]) for f in _LATENCY_FIELDS)
        lines.append(
            f"| {count} | {a50:.2f} | {a99:.2f} | {amax:.2f} | {b50:.2f} | {b99:.2f} "
            f"| {bmax:.2f} | {_ratio(b99, a99)} "
            f"| {_cpu_share(ours_l)} / {_cpu_share(theirs_l)} "
            f"| {', '.join(f'{r.p99_ms:.2f}' for r in ours_l)} |"
        )
    lines += ["", _goal_line("Goal", "statusd", 2_000_000, results, opts)]
    if "statusd-ws" in opts.servers:
        lines += websocket_report(results, opts)
    return "\n".join(lines)


def websocket_report(results: Results, opts: Options) -> list[str]:
    """statusd with WebSocket subscribers (same publisher on the Unix socket)."""
    lines = [
        "",
        "## WebSocket subscribers (statusd `--websocket`, `/ws`, publisher on the Unix socket)",
        "",
        "| S | deliveries/s | dropped | server CPU us/delivery | runs | p50 ms | p99 ms "
        "| max ms | server CPU, % of a core (latency) | p99 runs |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for count in opts.subscribers:
        runs = results.throughput.get(("statusd-ws", count), [])
        steady = results.latency.get(("statusd-ws", count), [])
        p50, p99, pmax = (_median([getattr(r, f) for r in steady]) for f in _LATENCY_FIELDS)
        lines.append(
            f"| {count} | {_median([r.rate for r in runs]):,.0f} "
            f"| {max((r.dropped for r in runs), default=0):,} | {_cpu_per_delivery(runs)} "
            f"| {_runs(runs)} | {p50:.2f} | {p99:.2f} | {pmax:.2f} | {_cpu_share(steady)} "
            f"| {', '.join(f'{r.p99_ms:.2f}' for r in steady)} |"
        )
    lines += ["", _goal_line("WebSocket goal", "statusd-ws", 1_000_000, results, opts)]
    return lines


def _goal_line(label: str, server: str, floor: int, results: Results, opts: Options) -> str:
    """Whether ``server`` at the largest S reaches ``floor`` deliveries/s and p99 < 5 ms."""
    top = max(opts.subscribers)
    rate = _median([r.rate for r in results.throughput.get((server, top), [])])
    p99 = _median([r.p99_ms for r in results.latency.get((server, top), [])])
    return (
        f"{label} at S = {top}: >= {floor:,} deliveries/s: "
        f"{'met' if rate >= floor else 'NOT met'} ({rate:,.0f}); p99 < 5 ms: "
        f"{'met' if p99 < 5 else 'NOT met'} ({p99:.2f} ms)"
    )


_LATENCY_FIELDS = ("p50_ms", "p99_ms", "max_ms")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b > 0 else "n/a"


def _cpu_share(runs: Sequence[LatencyRun]) -> str:
    values = [r.server_cpu / r.seconds for r in runs if r.seconds > 0]
    return f"{_median(values):.0%}" if values else "n/a"


def _cpu_per_delivery(runs: Sequence[ThroughputRun]) -> str:
    values = [r.server_cpu * 1e6 / r.deliveries for r in runs if r.deliveries]
    return f"{_median(values):.2f}" if values else "n/a"


def _runs(runs: Sequence[ThroughputRun]) -> str:
    return ", ".join(f"{r.rate / 1e6:.3f}M" for r in runs)


# -- command line --------------------------------------------------------------------------


def _positive_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be integers separated by commas, not {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be integers >= 1, not {text!r}")
    return values


def _choices(*allowed: str) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(part.strip() for part in text.split(",") if part.strip())
        wrong = [value for value in values if value not in allowed]
        if wrong or not values:
            raise argparse.ArgumentTypeError(
                f"must be some of {', '.join(allowed)}, separated by commas, not {text!r}"
            )
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Fan-out throughput and latency: statusd vs a naive trio server."
    )
    parser.add_argument("--messages", type=int, help="messages per throughput run (statusd)")
    parser.add_argument(
        "--baseline-deliveries",
        type=int,
        help="deliveries per baseline throughput run: it gets min(messages, this / S) "
        "messages, since it is an order of magnitude slower (default 200000, quick 50000)",
    )
    parser.add_argument("--subscribers", type=_positive_list, default=(1, 10, 100))
    parser.add_argument("--rate", type=float, default=1000.0, help="latency phase, msg/s")
    parser.add_argument("--duration", type=float, help="latency phase, seconds")
    parser.add_argument("--repeats", type=int, help="runs per configuration (median shown)")
    parser.add_argument("--window", type=int, default=128, help="unanswered publishes")
    parser.add_argument("--history", type=int, default=DEFAULT_HISTORY, help="statusd ring")
    parser.add_argument(
        "--latency-history",
        type=int,
        default=100,
        help="statusd ring in the latency phase (default: statusd's default, 100)",
    )
    parser.add_argument("--lag-limit", type=int, help="max messages ahead of slowest reader")
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120.0, help="per run, seconds")
    parser.add_argument(
        "--statusd-source",
        type=Path,
        default=REPO,
        help="directory holding the statusd package to run (default: this checkout)",
    )
    parser.add_argument(
        "--servers",
        type=_choices("statusd", "baseline", "statusd-ws"),
        default=("statusd", "baseline", "statusd-ws"),
        help="which servers to measure: statusd and the baseline with Unix-socket "
        "subscribers, statusd-ws with WebSocket subscribers (default: all three)",
    )
    parser.add_argument(
        "--phases",
        type=_choices("throughput", "latency"),
        default=("throughput", "latency"),
        help="which phases to run (default: throughput,latency)",
    )
    parser.add_argument(
        "--ws-one-message-per-frame",
        action="store_true",
        help="WebSocket subscribers take /ws's default, one message per frame, instead of "
        "asking for several pending messages as one JSON array (/ws?coalesce=1)",
    )
    parser.add_argument("--quick", action="store_true", help="a smaller run, under ~30 s")
    parser.add_argument("--serve-baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    return parser


def options_from(args: argparse.Namespace) -> Options:
    quick = args.quick
    messages = args.messages or (10_000 if quick else 50_000)
    history = args.history
    if not 1 <= history <= 100_000:
        raise SystemExit(f"--history must be from 1 to 100000, not {history}")
    lag_limit = args.lag_limit or max(1, history - args.window - 16)
    return Options(
        messages=messages,
        baseline_deliveries=args.baseline_deliveries or (50_000 if quick else 200_000),
        subscribers=args.subscribers,
        rate=args.rate,
        duration=args.duration or (2.0 if quick else 5.0),
        repeats=args.repeats or (1 if quick else 3),
        window=args.window,
        history=history,
        latency_history=args.latency_history,
        lag_limit=lag_limit,
        client_processes=args.client_processes,
        timeout=args.timeout,
        statusd_source=args.statusd_source.resolve(),
        servers=args.servers,
        phases=args.phases,
        ws_coalesce=not args.ws_one_message_per_frame,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.serve_baseline:
        serve_baseline(args.socket)
        return 0
    opts = options_from(args)
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "bench/fanout.py", *given])
    # SIGTERM unwinds like Ctrl-C, so every process started here is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    directory = Path(tempfile.mkdtemp(prefix="fanout-", dir="/tmp"))
    try:
        for line in environment_lines(command, opts.statusd_source):
            _say(line)
        results = benchmark(opts, directory)
    except KeyboardInterrupt:
        _say("interrupted: every process this benchmark started has been stopped")
        return 130
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    _say("")
    _say(report(results, opts, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
