"""A file that fits one receive buffer is journalled once, when done; what a crash leaves.

Such a file's part is created, written, synced and linked to its final name in one thread
hop with no journal record before it, so a SIGKILL inside that hop leaves a part the
journal never heard of: unlinked (killed before the link) or linked to the finished file
(killed after it). The next run finds both by their owner (task id and item index): the
first goes and its item is fetched again, the second finishes its item without fetching
it again, under its name (no ``NAME.1``). The hop lasts microseconds, too short for a kill
to be aimed at it, so the tests kill the daemon mid-batch and then put on disk exactly
what a kill inside the hop leaves, for items the kill caught in flight.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import trio

from statusd.channel import StatusChannel
from statusd.downloads import Downloads, part_name
from statusd.events import Streams
from statusd.store import load
from statusd.tasks import TaskManager
from tests.conftest import make_config
from tests.http_servers import (
    HTTPTestServer,
    hang_after_head,
    hang_before_head,
    http_server,
    sequence,
    serve_data,
)
from tests.processes import download_dir, finished, kill, start, task_of, until

__all__ = ["http_server"]

DATA = {n: f"file {n}\n".encode() * (100 * (n + 1)) for n in range(9)}


def parts(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".part"))


def plant(dest: Path, task_id: str, index: int, *, linked: bool, data: bytes) -> Path:
    """What a kill inside item ``index``'s one hop leaves: its part, with ``data``, and
    (``linked``) the finished file ``f<index>.bin`` linked to it."""
    part = dest / part_name(f"f{index}.bin", f"{task_id}-{index}")
    part.write_bytes(data)
    if linked:
        os.link(part, dest / f"f{index}.bin")
    return part


async def test_a_sigkill_mid_batch_leaves_no_orphan_part_and_loses_no_finished_file(
    daemon_process: Any, http_server: HTTPTestServer
) -> None:
    """Items 0-5 finish; 6 holds part of its body in memory; 7 and 8 wait for an answer
    when the daemon is killed, and the kill is taken to have come inside their hops: 7
    before its link, 8 after it. After the restart every item completes, each file once
    under its own name, and no part file is left."""
    urls = [http_server.route(f"/f{n}.bin", serve_data(DATA[n])) for n in range(6)]
    urls.append(
        http_server.route("/f6.bin", sequence(hang_after_head(DATA[6], 100), serve_data(DATA[6])))
    )
    urls += [
        http_server.route(f"/f{n}.bin", sequence(hang_before_head(), serve_data(DATA[n])))
        for n in (7, 8)
    ]
    process = daemon_process()
    client = await start(process)
    dest = download_dir(process)
    task_id = (await client.call("tasks.download", {"urls": urls}))["task_id"]

    async def mid_batch() -> bool:
        task = await task_of(client, task_id)
        held = sum(len(DATA[n]) for n in range(6)) + 100
        asked = all(http_server.requests_for(f"/f{n}.bin") for n in (7, 8))
        return task["processed_items"] == 6 and task["bytes_done"] == held and asked

    await until(mid_batch)
    await kill(process, client)
    journal = load(process.directory / "state" / "tasks.jsonl").records
    checkpoints = [r["data"] for r in journal if r["op"] == "checkpoint" and r["id"] == task_id]
    # One record per finished small file; none for 6, 7, 8 (in flight, not large).
    assert sorted(c["item"] for c in checkpoints) == list(range(6))
    assert all(c["state"]["done"] for c in checkpoints)
    assert parts(dest) == []  # 6's 100 bytes were in memory only

    plant(dest, task_id, 7, linked=False, data=DATA[7][:500])
    plant(dest, task_id, 8, linked=True, data=DATA[8])

    client = await start(process)
    task = await finished(client, task_id)
    assert task["status"] == "completed", task
    assert [item["path"] for item in task["result"]["items"]] == [
        str(dest / f"f{n}.bin") for n in range(9)
    ]
    assert sorted(os.listdir(dest)) == [f"f{n}.bin" for n in range(9)]  # no part, no f8.1.bin
    for n in range(9):
        assert (dest / f"f{n}.bin").read_bytes() == DATA[n], n
    assert len(http_server.requests_for("/f7.bin")) == 2  # fetched again from zero
    assert "range" not in http_server.requests_for("/f7.bin")[1].headers
    assert len(http_server.requests_for("/f8.bin")) == 1  # finished, not fetched again
    await trio.aclose_forcefully(client.stream)


async def test_a_restart_leaves_parts_that_are_not_the_tasks_alone(
    nursery: trio.Nursery, tmp_path: Path, http_server: HTTPTestServer
) -> None:
    """Only ``.NAME.<task>-<index>.part`` of an item with no state is the task's: another
    task's part, a name with a leading zero and a part that is a directory stay."""
    dest = tmp_path / "dest"
    dest.mkdir()
    url = http_server.route("/f0.bin", serve_data(DATA[0]))
    others = [
        dest / part_name("f0.bin", "t2-0"),
        dest / part_name("f0.bin", "t1-00"),
        dest / part_name("f0.bin", "t1-0x"),
    ]
    for other in others:
        other.write_bytes(b"not ours")
    folder = dest / part_name("f1.bin", "t1-1")
    folder.mkdir()
    stray = plant(dest, "t1", 0, linked=False, data=b"half")
    streams = Streams(StatusChannel())
    manager = TaskManager(streams.status, streams.tasks, journal_path=None)
    await nursery.start(manager.serve)
    spec = {"items": [{"url": url}], "dest": str(dest), "batch_size": 10}
    job = Downloads(make_config(tmp_path)).job("t1", spec, [])
    task_id = await manager.create_task("t", 1, kind="download", owner="alice")
    manager.run_task(task_id, job)
    assert (await manager.wait_finished(task_id)).status.value == "completed"
    assert not stray.exists()
    assert all(other.read_bytes() == b"not ours" for other in others)
    assert folder.is_dir()
    assert (dest / "f0.bin").read_bytes() == DATA[0]


async def test_a_cancel_after_a_restart_removes_the_parts_the_journal_never_knew(
    tmp_path: Path,
) -> None:
    """A task killed mid-batch and cancelled before it ran again: its unknown parts go,
    a finished file linked to one stays (only the part name goes)."""
    dest = tmp_path / "dest"
    dest.mkdir()
    spec = {
        "items": [{"url": f"http://127.0.0.1:9/f{n}.bin"} for n in range(2)],
        "dest": str(dest),
        "batch_size": 10,
    }
    unlinked = plant(dest, "t1", 0, linked=False, data=b"half")
    linked = plant(dest, "t1", 1, linked=True, data=DATA[1])
    job = Downloads(make_config(tmp_path)).job("t1", spec, [])
    await job.discard()
    assert not unlinked.exists()
    assert not linked.exists()
    assert sorted(os.listdir(dest)) == ["f1.bin"]
    assert (dest / "f1.bin").read_bytes() == DATA[1]
