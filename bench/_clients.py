"""Benchmark clients, each run as a process of its own: ``python bench/_clients.py MODE ...``.

A client connects (or opens its database), prints ``ready``, waits for a line on stdin so
that a gang of them starts together, does its work, and prints one JSON line: its start and
end on CLOCK_MONOTONIC (one clock for every process on Linux) and what it did. ``run_gang``
is the parent's side. Clients use blocking sockets and the stdlib only: their own cost should
stay small next to the server's.

Modes:

- ``calls``: N JSON-RPC calls of one method, each awaited before the next;
- ``sqlite``: N rows into a sqlite table, one transaction per row (WAL, synchronous=FULL);
- ``download``: one ``tasks.download`` to statusd, timed to the task's end as pushed by a
  ``subscribe {tasks: "all"}`` on the same connection;
- ``aria2``: ``aria2.addUri`` per URL to ``aria2c --enable-rpc``, then ``aria2.getGlobalStat``
  polled until every download stopped;
- ``publish``: ``status.publish`` at a steady rate until told to stop, then an ``END`` message.
"""

from __future__ import annotations

import argparse
import http.client
import json
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

BENCH = Path(__file__).resolve().parent
TERMINAL = ("completed", "error", "cancelled")
PAD = "bench status message padding text"


class LineClient:
    """One JSON-RPC connection over a Unix socket, line by line."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb", buffering=1 << 20)
        self.next_id = 0

    def send(self, method: str, params: dict[str, Any] | None = None) -> int:
        self.next_id += 1
        request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": self.next_id}
        if params is not None:
            request["params"] = params
        self.sock.sendall(json.dumps(request, separators=(",", ":")).encode() + b"\n")
        return self.next_id

    def messages(self) -> Iterator[dict[str, Any]]:
        for line in self.reader:
            yield json.loads(line)
        raise RuntimeError("the server closed the connection")

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        request_id = self.send(method, params)
        for message in self.messages():
            if message.get("id") == request_id:
                if "error" in message:
                    raise RuntimeError(f"{method} failed: {message['error']}")
                return message["result"]
        raise AssertionError("unreachable")


def _ready_then_wait() -> None:
    print("ready", flush=True)
    if not sys.stdin.readline():
        raise SystemExit("the parent went away before saying go")


def _done(started: int, **fields: Any) -> None:
    print(json.dumps({"start_ns": started, "end_ns": time.monotonic_ns(), **fields}), flush=True)


def calls(path: str, method: str, params: dict[str, Any] | None, count: int) -> None:
    client = LineClient(path)
    client.call(method, params)  # the first call pays for look-ups the others find cached
    _ready_then_wait()
    started = time.monotonic_ns()
    for _ in range(count):
        client.call(method, params)
    _done(started, count=count)


def sqlite_rows(database: str, first: int, count: int) -> None:
    """bench/store.py's rows, as its sqlite contender writes them, from a process of its own."""
    import store

    connection = store.sqlite_connect(Path(database))
    _ready_then_wait()
    started = time.monotonic_ns()
    for n in range(first, first + count):
        connection.execute(store.INSERT, store.row(n))  # autocommit: a transaction per row
    _done(started, count=count)
    connection.close()


def download(path: str, params: dict[str, Any]) -> None:
    client = LineClient(path)
    client.call("subscribe", {"tasks": "all"})
    _ready_then_wait()
    started = time.monotonic_ns()
    request_id = client.send("tasks.download", params)
    task_id = None
    ended: dict[str, dict[str, Any]] = {}
    for message in client.messages():
        if message.get("id") == request_id:
            if "error" in message:
                raise SystemExit(f"tasks.download failed: {message['error']}")
            task_id = message["result"]["task_id"]
        elif message.get("method") == "task_update":
            update = message["params"]
            if update.get("status") in TERMINAL:
                ended[update["job_id"]] = update
        if task_id is not None and task_id in ended:
            break
    assert task_id is not None
    end = ended[task_id]
    if end["status"] != "completed":
        raise SystemExit(f"task {task_id} ended {end['status']}: {end.get('error')}")
    _done(started, task_id=task_id)


def aria2(url: str, urls: Sequence[str], poll: float) -> None:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port)

    def rpc(method: str, params: list[Any]) -> Any:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        connection.request("POST", parts.path, body, {"Content-Type": "application/json"})
        reply = json.loads(connection.getresponse().read())
        if "error" in reply:
            raise SystemExit(f"aria2 {method} failed: {reply['error']}")
        return reply["result"]

    rpc("aria2.getVersion", [])
    _ready_then_wait()
    started = time.monotonic_ns()
    for item in urls:
        rpc("aria2.addUri", [[item]])
    while True:
        stat = rpc("aria2.getGlobalStat", [])
        if int(stat["numActive"]) == 0 and int(stat["numWaiting"]) == 0:
            break
        time.sleep(poll)
    if int(stat["numStoppedTotal"]) < len(urls):
        raise SystemExit(f"aria2 stopped {stat['numStoppedTotal']} of {len(urls)} downloads")
    _done(started, stopped=int(stat["numStoppedTotal"]))


def publish(path: str, rate: float) -> None:
    """Steady ``status.publish`` on an absolute schedule until a second line (or EOF) on
    stdin, then ``END``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    _ready_then_wait()
    started = time.monotonic_ns()
    period = 1e9 / rate
    sent = replies = 0
    while True:
        due = started + round(sent * period)
        delay = max(0.0, (due - time.monotonic_ns()) / 1e9)
        if select.select([sys.stdin], [], [], delay)[0]:
            break  # the parent said stop (or went away)
        sent += 1
        params = {"level": "info", "message": f"{PAD} {sent:08d}"}
        sock.sendall(_request("status.publish", params, sent))
        replies += _replies(sock, block=False)
    sent += 1
    sock.sendall(_request("status.publish", {"level": "info", "message": "END"}, sent))
    while replies < sent:
        replies += _replies(sock, block=True)
    _done(started, count=sent)


def _request(method: str, params: dict[str, Any], request_id: int) -> bytes:
    body = {"jsonrpc": "2.0", "method": method, "params": params, "id": request_id}
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def _replies(sock: socket.socket, *, block: bool) -> int:
    """Replies read (their lines counted) without parsing them; errors stop the run."""
    count = 0
    sock.setblocking(block)
    try:
        while True:
            data = sock.recv(1 << 16)
            if not data:
                raise SystemExit("the server closed the publisher's connection")
            if b'"error"' in data:
                raise SystemExit(f"status.publish failed: {data[:300]!r}")
            count += data.count(b"\n")
            if block:
                break
    except BlockingIOError:
        pass
    finally:
        sock.setblocking(True)
    return count


# -- the parent's side ---------------------------------------------------------------------


def command(mode: str, *args: str) -> list[str]:
    return [sys.executable, str(BENCH / "_clients.py"), mode, *args]


def start(argv: Sequence[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_ready(process: subprocess.Popen[str], timeout: float = 60.0) -> None:
    assert process.stdout is not None
    if not select.select([process.stdout], [], [], timeout)[0]:
        raise RuntimeError("a client did not get ready in time")
    line = process.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"a client failed before it was ready: {_stderr(process)}")


def go(process: subprocess.Popen[str]) -> None:
    stdin: IO[str] | None = process.stdin
    assert stdin is not None
    stdin.write("go\n")
    stdin.flush()


def result(process: subprocess.Popen[str], timeout: float = 600.0) -> dict[str, Any]:
    assert process.stdout is not None
    out, err = process.communicate(timeout=timeout)
    if process.returncode:
        raise RuntimeError(f"a client failed ({process.returncode}): {err.strip()[-1500:]}")
    done: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return done


def _stderr(process: subprocess.Popen[str]) -> str:
    process.kill()
    _, err = process.communicate(timeout=10)
    return err.strip()[-1500:]


def run_gang(argvs: Sequence[Sequence[str]], timeout: float = 600.0) -> tuple[float, int]:
    """Start every client, let them all go at once; (first start -> last end in seconds,
    clients that ran)."""
    processes = [start(argv) for argv in argvs]
    try:
        for process in processes:
            wait_ready(process)
        for process in processes:
            go(process)
        results = [result(process, timeout) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    first = min(r["start_ns"] for r in results)
    last = max(r["end_ns"] for r in results)
    return (last - first) / 1e9, len(results)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one benchmark client (see the docstring)")
    parser.add_argument("mode", choices=("calls", "sqlite", "download", "aria2", "publish"))
    parser.add_argument("--socket", help="the server's Unix socket")
    parser.add_argument("--url", help="aria2c's RPC URL")
    parser.add_argument("--method", default="daemon.info")
    parser.add_argument("--params", type=json.loads, help="JSON params (calls, download)")
    parser.add_argument("--params-file", type=Path, help="JSON params from a file (download)")
    parser.add_argument("--urls", type=Path, help="a file of URLs, one a line (aria2)")
    parser.add_argument("--database", help="the sqlite file (sqlite)")
    parser.add_argument("--first", type=int, default=1, help="first row id (sqlite)")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=1000.0, help="messages/s (publish)")
    parser.add_argument("--poll", type=float, default=0.002, help="seconds (aria2)")
    args = parser.parse_args(argv)
    if args.mode == "calls":
        calls(args.socket, args.method, args.params, args.count)
    elif args.mode == "sqlite":
        sqlite_rows(args.database, args.first, args.count)
    elif args.mode == "download":
        params = json.loads(args.params_file.read_text()) if args.params_file else args.params
        download(args.socket, params)
    elif args.mode == "aria2":
        aria2(args.url, args.urls.read_text().split(), args.poll)
    else:
        publish(args.socket, args.rate)


if __name__ == "__main__":
    main()
