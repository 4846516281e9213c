"""A minimal trio JSON-RPC 2.0 server over a Unix socket: the floor for a trivial call and,
with ``--journal``, for a durable create.

Not statusd and not a test. One task per connection reads newline-framed requests, parses
them with the stdlib json module, answers ``daemon.info`` with a reply shaped like statusd's
(version, pid, caller, a task summary) and anything else with -32601. No limits, no
validation: what any trio daemon pays at least per call, so that ``bench/run.py`` can say
how close statusd's request path comes to it.

With ``--journal FILE`` it also answers ``notifications.create``: the notification, given an
id and a timestamp, is appended to FILE as statusd's journal writes it (the CRC and the
canonical JSON, one line) and answered only once an ``fdatasync`` covered it. The writes
and syncs run on one thread of their own; creates that arrive while a sync runs are
written and synced together by the next one (group commit), and the thread wakes every
waiter of a batch with one call into the loop. That is the least any socket daemon pays
for a durable create: the round trip, the hand-off to a thread, the write and the sync,
and the wake back; ``bench/run.py`` prints statusd's creates against it as a breakdown.

Usage::

    python bench/minirpc.py --socket PATH [--journal FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import socket
import threading
import time
import zlib
from datetime import UTC, datetime
from functools import partial
from typing import Any

import outcome
import trio

STARTED = time.time()
RECEIVE_BYTES = 64 * 1024
ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True)


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


def reply(request: dict[str, Any], result: Any) -> bytes:
    body = {"jsonrpc": "2.0", "id": request.get("id"), "result": result}
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


class Journal:
    """Append-only lines, each answered after an fdatasync that covered it."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._token = trio.lowlevel.current_trio_token()
        self._lines: queue.SimpleQueue[tuple[bytes, trio.lowlevel.Task]] = queue.SimpleQueue()
        self._last_id = 0
        threading.Thread(target=self._commit_loop, daemon=True).start()

    async def create(self, params: dict[str, Any]) -> int:
        self._last_id += 1
        now = datetime.now(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
        row = [self._last_id, params.get("username"), params["type"], params["title"],
               params["message"], params.get("link"), now]  # fmt: skip
        body = ENCODER.encode(row).encode()
        line = b'["%08x",%s]\n' % (zlib.crc32(body), body)
        self._lines.put((line, trio.lowlevel.current_task()))
        error = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        if error is not None:
            raise error
        return self._last_id

    def _commit_loop(self) -> None:
        while True:
            batch = [self._lines.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.append(self._lines.get_nowait())
            error: OSError | None = None
            try:
                self._write_and_sync(b"".join(line for line, _ in batch))
            except OSError as exc:
                error = exc
            self._token.run_sync_soon(_wake, [task for _, task in batch], error)

    def _write_and_sync(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fdatasync(self._fd)


def _wake(tasks: list[trio.lowlevel.Task], error: OSError | None) -> None:
    # The order does not matter here: a create's answer depends on nothing in memory.
    for task in tasks:
        trio.lowlevel.reschedule(task, outcome.Value(error))


async def handle(stream: trio.SocketStream, journal: Journal | None) -> None:
    buffer = b""
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await stream.receive_some(RECEIVE_BYTES):
                *lines, buffer = (buffer + data).split(b"\n")
                replies = []
                for line in lines:
                    if not line.strip():
                        continue
                    request = json.loads(line)
                    if journal is not None and request.get("method") == "notifications.create":
                        created = await journal.create(request["params"])
                        replies.append(reply(request, {"notification_id": created}))
                    else:
                        replies.append(
                            json.dumps(answer(request), separators=(",", ":")).encode() + b"\n"
                        )
                if replies:
                    await stream.send_all(b"".join(replies))


async def serve(path: str, journal_path: str | None) -> None:
    journal = None if journal_path is None else Journal(journal_path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a killed run leaves its socket file behind
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(1024)
    await trio.serve_listeners(partial(handle, journal=journal), [trio.SocketListener(sock)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--journal", help="answer notifications.create, durable in this file")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve, args.socket, args.journal)


if __name__ == "__main__":
    main()
