"""WebSocket handshakes a second, one after another, for one or more checkouts of statusd
(the cost of the plain-HTTP front before trio-websocket: docs/dashboard.md, "Serving").

For each tree a daemon is started from it (``PYTHONPATH``) with its WebSocket on, a token
is minted with its statusctl, and ``--count`` connections to ``/ws`` are opened and closed
in turn with the ``websockets`` client; trees alternate for ``--rounds`` rounds.

    git archive BASE | tar -x -C /tmp/base
    python bench/handshakes.py /tmp/base . --rounds 3
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from websockets.sync.client import connect


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def handshakes_per_second(tree: Path, count: int) -> float:
    with tempfile.TemporaryDirectory(prefix="statusd-hs-", dir="/tmp") as directory:
        port = free_port()
        env = dict(os.environ, PYTHONPATH=str(tree.resolve()), HOME=directory)
        sock = f"{directory}/statusd.sock"
        daemon = subprocess.Popen(
            [sys.executable, "-m", "statusd", "--socket", sock, "--state-dir",
             f"{directory}/state", "--websocket", f"127.0.0.1:{port}"],
            env=env,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            token = ""
            for _ in range(200):
                made = subprocess.run(
                    [sys.executable, "-m", "statusctl", "--socket", sock, "token", "create"],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if made.returncode == 0:
                    token = made.stdout.strip()
                    break
                time.sleep(0.05)
            headers = {"Authorization": f"Bearer {token}"}
            started = time.perf_counter()
            for _ in range(count):
                with connect(f"ws://127.0.0.1:{port}/ws", additional_headers=headers):
                    pass
            return count / (time.perf_counter() - started)
        finally:
            daemon.terminate()
            daemon.wait(15)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", type=Path, help="statusd checkouts to compare")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for round_number in range(1, args.rounds + 1):
        for tree in args.trees:
            rate = handshakes_per_second(tree, args.count)
            print(f"round {round_number}: {tree}: {rate:,.0f} handshakes/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
