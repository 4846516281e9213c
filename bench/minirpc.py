"""A minimal trio JSON-RPC 2.0 server over a Unix socket: the floor for a trivial call.

Not statusd and not a test. One task per connection reads newline-framed requests, parses
them with the stdlib json module, answers ``daemon.info`` with a reply shaped like statusd's
(version, pid, caller, a task summary) and anything else with -32601. No limits, no
validation, no journal: what any trio daemon pays at least per call, so that
``bench/run.py`` can say how close statusd's request path comes to it.

Usage::

    python bench/minirpc.py --socket PATH
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import time
from typing import Any

import trio

STARTED = time.time()
RECEIVE_BYTES = 64 * 1024


def answer(request: dict[str, Any]) -> dict[str, Any]:
    if request.get("method") != "daemon.info":
        error = {"code": -32601, "message": "method not found"}
        return {"jsonrpc": "2.0", "id": request.get("id"), "error": error}
    result = {
        "version": "minirpc",
        "pid": os.getpid(),
        "uptime_seconds": round(time.time() - STARTED, 3),
        "user": {"uid": 0, "username": "root", "admin": True},
        "tasks": {"pending": 0, "running": 0, "paused": 0, "completed": 0, "failed": 0},
    }
    return {"jsonrpc": "2.0", "id": request.get("id"), "result": result}


async def handle(stream: trio.SocketStream) -> None:
    buffer = b""
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await stream.receive_some(RECEIVE_BYTES):
                *lines, buffer = (buffer + data).split(b"\n")
                replies = [
                    json.dumps(answer(json.loads(line)), separators=(",", ":")).encode() + b"\n"
                    for line in lines
                    if line.strip()
                ]
                if replies:
                    await stream.send_all(b"".join(replies))


async def serve(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a killed run leaves its socket file behind
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(1024)
    await trio.serve_listeners(handle, [trio.SocketListener(sock)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve, args.socket)


if __name__ == "__main__":
    main()
