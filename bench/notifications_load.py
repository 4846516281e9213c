"""How long statusd takes to load a large ``notifications.jsonl`` at start-up.

Not a test. Writes N create records (90% for 50 users, 10% system-wide; a few hundred bytes
each, like task-end notifications) plus a tail of read/delete records into a temporary
file, then times, R times each:

- ``load``: the store reading and checking every record (``statusd.store.load``);
- ``replay``: the notification index built from the records (``NotificationIndex.replay``);
- ``open``: both, as the daemon does them (``open_notifications``), end to end.

Usage::

    python bench/notifications_load.py [--notifications N] [--repeats R] [--dir DIR]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from statusd.events import NotificationFeed
from statusd.notifications import open_notifications
from statusd.state.notifications import (
    NotificationIndex,
    NotificationRecord,
    create_record,
    delete_record,
    read_all_record,
    read_record,
)
from statusd.store import encode_record, load


def records(count: int) -> list[dict[str, Any]]:
    out: list[Any] = []
    for n in range(1, count + 1):
        notification: NotificationRecord = {
            "id": n,
            "username": None if n % 10 == 0 else f"user{n % 50}",
            "type": "task_completed",
            "title": f"Task completed: download of {n % 7 + 1} files",
            "message": f"{n % 7 + 1} of {n % 7 + 1} items done.",
            "link": f"statusd://tasks/t20261125120000-{n:08x}",
            "created_at": "2026-11-25T12:00:00.123Z",
        }
        out.append(create_record(notification))
    # Some users read and delete: the tail a journal has between compactions.
    for n in range(1, count // 100):
        out.append(read_record(f"user{n % 50}", n))
        out.append(delete_record(f"user{n % 50}", n + 1))
    out.extend(read_all_record(f"user{u}", count // 2) for u in range(10))
    return out


def write(path: Path, items: list[dict[str, Any]]) -> int:
    with path.open("wb") as out:
        for start in range(0, len(items), 10_000):
            out.write(b"".join(encode_record(r) for r in items[start : start + 10_000]))
    return path.stat().st_size


def timed(action: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return times


async def open_once(path: Path) -> None:
    async with open_notifications(path, NotificationFeed()) as service:
        assert service.statistics().index.notifications > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notifications", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        path = Path(directory) / "notifications.jsonl"
        items = records(args.notifications)
        size = write(path, items)
        print(
            f"{args.notifications:,} notifications, {len(items):,} records, "
            f"{size / 1e6:.0f} MB; Python {platform.python_version()} on {platform.machine()}"
        )
        loaded = load(path).records

        def replay() -> None:
            NotificationIndex().replay(loaded)

        results = {
            "load": timed(lambda: load(path), args.repeats),
            "replay": timed(replay, args.repeats),
            "open": timed(lambda: trio.run(open_once, path), args.repeats),
        }
        for name, times in results.items():
            print(
                f"{name:>7}: median {statistics.median(times):.2f} s "
                f"(min {min(times):.2f}, max {max(times):.2f}, n={len(times)})"
            )


if __name__ == "__main__":
    main()
