"""Notifications that must not be lost: a real daemon process killed with SIGKILL while
clients write, restarted again and again; and a state directory whose disk is full."""

from __future__ import annotations

import errno
import json
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from statusd.daemon import Daemon, run
from statusd.protocol import jsonrpc
from statusd.store import load
from tests.conftest import RawClient, make_config

ROUNDS = 6
CLIENTS = 3
WRITES_PER_ROUND = 40  # acknowledged creates before the kill


class LineClient:
    """A blocking JSON-RPC client on its own connection (one per thread)."""

    def __init__(self, path: Path) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(20)
        self._sock.connect(str(path))
        self._reader = self._sock.makefile("rb")
        self._ids = 0

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        self._ids += 1
        self._sock.sendall(jsonrpc.encode_line(jsonrpc.request(method, params, self._ids)))
        line = self._reader.readline()
        if not line:
            raise ConnectionError("daemon went away")
        response = json.loads(line)
        if "error" in response:
            raise AssertionError(response["error"])
        return response["result"]

    def close(self) -> None:
        self._reader.close()
        self._sock.close()

    def __enter__(self) -> LineClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@attrs.define
class Written:
    """What the writer threads were told, shared between them and the test."""

    target: int = 0
    acknowledged: dict[int, dict[str, Any]] = attrs.Factory(dict)  # id -> {"title", "read"}
    reused: list[int] = attrs.Factory(list)
    lock: threading.Lock = attrs.Factory(threading.Lock)
    enough: threading.Event = attrs.Factory(threading.Event)


def write(path: Path, written: Written, user: str, label: str, highest_before: int) -> None:
    """Create (and mark every other one read) until the daemon goes away."""
    try:
        client = LineClient(path)
    except OSError:
        return
    n = 0
    try:
        while True:
            title = f"{label} #{n}"
            result = client.call(
                "notifications.create",
                {"username": user, "type": "test", "title": title, "message": ""},
            )
            notification_id = result["notification_id"]
            with written.lock:
                if notification_id in written.acknowledged or notification_id <= highest_before:
                    written.reused.append(notification_id)
                written.acknowledged[notification_id] = {"title": title, "read": False}
                if len(written.acknowledged) >= written.target:
                    written.enough.set()
            if n % 2:
                client.call("notifications.mark_read", {"id": notification_id})
                with written.lock:
                    written.acknowledged[notification_id]["read"] = True
            n += 1
    except (OSError, ConnectionError):
        return  # killed under us: what was not answered may or may not be there
    finally:
        client.close()


def test_acknowledged_notifications_survive_sigkill(daemon_process: Any) -> None:
    process = daemon_process()
    written = Written()

    def check_everything_is_there() -> int:
        with LineClient(process.socket) as client:
            stored = client.call("notifications.list", {"limit": 1000})["notifications"]
        by_id = {n["id"]: n for n in stored}
        for notification_id, expected in written.acknowledged.items():
            assert notification_id in by_id, f"acknowledged notification {notification_id} lost"
            assert by_id[notification_id]["title"] == expected["title"]
            if expected["read"]:
                assert by_id[notification_id]["read"], f"read mark on {notification_id} lost"
        return max(by_id, default=0)

    for round_number in range(ROUNDS):
        process.start()
        highest_before = check_everything_is_there()
        with LineClient(process.socket) as client:
            me = client.call("daemon.info")["user"]
        written.target = WRITES_PER_ROUND * (round_number + 1)
        written.enough = threading.Event()
        threads = [
            threading.Thread(
                target=write,
                args=(
                    process.socket,
                    written,
                    me,
                    f"round {round_number} client {n}",
                    highest_before,
                ),
            )
            for n in range(CLIENTS)
        ]
        for thread in threads:
            thread.start()
        assert written.enough.wait(timeout=30), process.stderr()
        process.signal(signal.SIGKILL)
        process.wait()
        for thread in threads:
            thread.join(timeout=30)
        assert written.reused == []
    process.start()
    check_everything_is_there()
    assert len(written.acknowledged) >= WRITES_PER_ROUND * ROUNDS


# -- a full disk -----------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(mount_tmpfs: Any) -> Path:
    """A 1 MiB tmpfs (``mount_tmpfs``: unmounted after the test, skipped with the reason)."""
    path: Path = mount_tmpfs("1m")
    return path


def fill(path: Path) -> None:
    """Write ``path`` until the file system has no byte left."""
    with path.open("wb", buffering=0) as filler:
        for chunk in (64 * 1024, 4096, 1):
            try:
                while True:
                    filler.write(b"\0" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise


async def test_a_full_disk_refuses_changes_and_then_recovers(
    short_tmp: Path, small_tmpfs: Path
) -> None:
    config = make_config(short_tmp, state_dir=small_tmpfs / "state")
    journal = config.state_dir / "notifications.jsonl"

    async def create(client: RawClient, title: str) -> Any:
        return await client.request(
            "notifications.create",
            {"username": "alice", "type": "test", "title": title, "message": "x" * 200},
        )

    acknowledged: list[int] = []
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(run, config)
        client = await RawClient.connect(config.socket)
        for n in range(3):
            acknowledged.append((await create(client, f"before {n}"))["result"]["notification_id"])
        await client.call("notifications.mark_read", {"id": acknowledged[0], "username": "alice"})
        await trio.to_thread.run_sync(fill, small_tmpfs / "filler")
        # The journal's last page may still have room for a record or two.
        for n in range(100):
            response = await create(client, f"full {n}")
            if "error" in response:
                break
            acknowledged.append(response["result"]["notification_id"])
        else:
            pytest.fail("creates went on succeeding on a full disk")
        error = response["error"]
        assert error["code"] == -32603
        assert error["message"] == (
            "could not store the change: no space left on device; nothing was changed"
        )
        # Nothing half-written: memory and the journal hold exactly the acknowledged ones.
        listed = await client.call("notifications.list", {"username": "alice", "limit": 1000})
        assert [n["id"] for n in listed["notifications"]] == acknowledged[::-1]
        stored = [r[0] for r in load(journal).records if isinstance(r, list)]
        assert stored == acknowledged
        # The failed write was cut back, so the next one fails the same way; the daemon
        # goes on answering.
        assert (await create(client, "again"))["error"] == error
        count = await client.call("notifications.unread_count", {"username": "alice"})
        assert count == {"count": len(acknowledged) - 1}
        assert "seq" in await client.call("status.publish", {"level": "info", "message": "alive"})

        (small_tmpfs / "filler").unlink()
        after = await create(client, "after")
        acknowledged.append(after["result"]["notification_id"])
        assert acknowledged[-1] > acknowledged[-2]
        await client.aclose()
        daemon.request_stop()
        await daemon.wait_stopped()

    async with trio.open_nursery() as nursery:
        daemon = await nursery.start(run, config)
        client = await RawClient.connect(config.socket)
        listed = await client.call("notifications.list", {"username": "alice", "limit": 1000})
        assert [n["id"] for n in listed["notifications"]] == acknowledged[::-1]
        assert [n["read"] for n in listed["notifications"]][-1] is True
        await client.aclose()
        daemon.request_stop()
        await daemon.wait_stopped()
