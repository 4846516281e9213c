"""What ``statusctl download URL --wait`` puts on an 80-column terminal, as text.

Starts a statusd process (short timeouts, in a temporary directory), a local HTTP server
with three files (one that arrives at about 4 MiB/s, one that is missing, one whose server
sends 1 MiB and then goes quiet), runs statusctl in a real terminal (a private tmux server,
80x24) for each, and prints the screen mid-way and at the end:

    python bench/screens.py            # this checkout
    PYTHONPATH=/path/to/other/checkout python bench/screens.py   # another one (before/after)

Only loopback traffic; everything it starts is stopped before it returns.
"""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CHUNK = 64 * 1024
SIZE = 16 * 1024 * 1024
RATE = 4 * 1024 * 1024  # bytes a second the good file is sent at
CONFIG = """
[downloads]
read_timeout = 3
max_attempts = 3
lowest_speed = 1024
stall_timeout = 20
"""


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/ubuntu-24.04-desktop-amd64.iso":
            self._send_head(SIZE)
            for _ in range(SIZE // CHUNK):
                self.wfile.write(b"x" * CHUNK)
                time.sleep(CHUNK / RATE)
        elif self.path == "/stalls.iso":
            self._send_head(SIZE)
            self.wfile.write(b"x" * (1024 * 1024))
            self.wfile.flush()
            time.sleep(30)  # quiet: the daemon's read timeout ends the attempt first
        else:
            body = b"not found\n"
            self.send_response(404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def _send_head(self, size: int) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.send_header("ETag", '"v1"')
        self.end_headers()


def _screen(tmux: list[str]) -> str:
    done = subprocess.run([*tmux, "capture-pane", "-p", "-t", "cap"], capture_output=True)
    return "\n".join(line.rstrip() for line in done.stdout.decode().splitlines()).strip("\n")


def _run(socket: Path, url: str, middle: float) -> tuple[str, str]:
    # Run from the socket's directory: ``python -m`` puts the current directory first on
    # sys.path, and a checkout there would win over PYTHONPATH.
    # A private tmux server per run: nothing of the user's tmux is touched.
    tmux = ["tmux", "-L", f"statusd-screens-{os.getpid()}-{time.monotonic_ns()}"]
    env_python = f"PYTHONPATH={os.environ.get('PYTHONPATH', '')} {sys.executable}"
    command = f"{env_python} -m statusctl --socket {socket} download {url} --wait"
    command += '; echo "[exit $?]"'
    session = ["new-session", "-d", "-x", "80", "-y", "24", "-s", "cap", "-c", str(socket.parent)]
    subprocess.run([*tmux, *session, command + "; sleep 600"], check=True)
    try:
        time.sleep(middle)
        mid = _screen(tmux)
        deadline = time.monotonic() + 60
        while "[exit " not in (end := _screen(tmux)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return mid, end
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


def main() -> int:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    directory = Path(tempfile.mkdtemp(prefix="sd-screens-", dir="/tmp"))
    (directory / "statusd.toml").write_text(CONFIG)
    socket = directory / "statusd.sock"
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "statusd",
            "--config",
            str(directory / "statusd.toml"),
            "--socket",
            str(socket),
            "--state-dir",
            str(directory / "state"),
        ],
        stderr=subprocess.DEVNULL,
        cwd=directory,
    )
    try:
        while not socket.exists():
            time.sleep(0.05)
        for title, path, middle in (
            ("success", "/ubuntu-24.04-desktop-amd64.iso", 2.0),
            ("404", "/missing.iso", 1.0),
            ("stall", "/stalls.iso", 2.6),
        ):
            mid, end = _run(socket, base + path, middle)
            print(f"## {title}\n\nafter {middle:g} s:\n```\n{mid}\n```")
            print(f"at the end:\n```\n{end}\n```\n")
    finally:
        daemon.terminate()
        daemon.wait()
        server.shutdown()
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
