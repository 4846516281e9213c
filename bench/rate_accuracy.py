"""How close a statusd process keeps to its speed limits, over 10 s of wall-clock time.

Starts a statusd process (in a temporary directory, writing to /dev/shm when there is one)
and a local HTTP server that sends large files as fast as it can, then for each case reads
the task's ``bytes_done`` (``tasks.get``) at 2 s and at 12 s after the start and prints
the rate in between against the limit:

    python bench/rate_accuracy.py
    PYTHONPATH=/path/to/other/checkout python bench/rate_accuracy.py   # another checkout

Cases: one item under a task's ``rate_limit``; four items of one task sharing it (each
item's share too); two unlimited tasks under the daemon's ``[downloads] max_rate``. The
goal is within 5% of the limit. Only loopback traffic; everything it starts is stopped
before it returns.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CHUNK = 256 * 1024
SIZE = 1 << 30  # more than any case reads in 12 s
WARM_UP = 2.0
WINDOW = 10.0
MiB = 1 << 20
MAX_RATE = 8 * MiB


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(SIZE))
        self.send_header("ETag", '"v1"')
        self.end_headers()
        block = b"x" * CHUNK
        try:
            for _ in range(SIZE // CHUNK):
                self.wfile.write(block)
        except OSError:
            pass  # the task was cancelled


def _call(path: Path, method: str, params: dict[str, Any] | None = None) -> Any:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            data += sock.recv(1 << 20)
    answer = json.loads(data)
    if "error" in answer:
        raise RuntimeError(f"{method}: {answer['error']['message']}")
    return answer["result"]


def _done(path: Path, task_id: str) -> int:
    done: int = _call(path, "tasks.get", {"task_id": task_id})["bytes_done"]
    return done


def _measure(path: Path, task_ids: list[str]) -> list[float]:
    time.sleep(WARM_UP)
    start = time.monotonic()
    first = [_done(path, task_id) for task_id in task_ids]
    time.sleep(WINDOW)
    second = [_done(path, task_id) for task_id in task_ids]
    took = time.monotonic() - start
    for task_id in task_ids:
        _call(path, "tasks.cancel", {"task_id": task_id})
    return [(b - a) / took for a, b in zip(first, second, strict=True)]


def _line(case: str, limit: float, measured: float) -> str:
    error = (measured - limit) / limit * 100
    return f"| {case} | {limit / MiB:.2f} MiB/s | {measured / MiB:.3f} MiB/s | {error:+.2f}% |"


def main() -> int:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    scratch = "/dev/shm" if os.path.isdir("/dev/shm") else None
    directory = Path(tempfile.mkdtemp(prefix="sd-rate-", dir=scratch))
    config = directory / "statusd.toml"
    # The per-host cap would hold four items of one host to four requests: no matter here.
    config.write_text(f"[downloads]\nmax_rate = {MAX_RATE}\nmin_free_bytes = 0\n")
    sock = directory / "statusd.sock"
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "statusd",
            "--config",
            str(config),
            "--socket",
            str(sock),
            "--state-dir",
            str(directory / "state"),
        ],
        stderr=subprocess.DEVNULL,
        cwd=directory,
    )
    print(f"statusd speed limits, {WINDOW:g} s windows after {WARM_UP:g} s, loopback\n")
    print("| case | limit | measured | error |\n|---|---:|---:|---:|")
    try:
        while not sock.exists():
            time.sleep(0.05)
        one = _call(sock, "tasks.download", {"urls": [f"{base}/a.bin"], "rate_limit": 2 * MiB})
        [rate] = _measure(sock, [one["task_id"]])
        print(_line("one item, task rate_limit 2M", 2 * MiB, rate))
        urls = [f"{base}/{n}.bin" for n in range(4)]
        four = _call(sock, "tasks.download", {"urls": urls, "rate_limit": 4 * MiB})
        [rate] = _measure(sock, [four["task_id"]])
        print(_line("4 items of one task, rate_limit 4M", 4 * MiB, rate))
        tasks = [
            _call(sock, "tasks.download", {"urls": [f"{base}/t{n}.bin"]})["task_id"]
            for n in range(2)
        ]
        rates = _measure(sock, tasks)
        print(_line("2 tasks under max_rate 8M", MAX_RATE, sum(rates)))
        for n, rate in enumerate(rates):
            print(_line(f"... task {n + 1}'s share", MAX_RATE / 2, rate))
    finally:
        daemon.terminate()
        daemon.wait()
        server.shutdown()
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
