"""Tasks, items and request size per user (issue 11, item 8): ``limits.max_tasks_per_user``,
``limits.max_items_per_task``, ``limits.max_request_bytes``, and a finished task's small state.

The per-user rules run against a real daemon process with real second and third uids (forked
children that drop to ``nobody`` and to uid 65533, which has no passwd entry and reaches the
socket through nobody's group; skipped, saying why, when not root), downloading from a real
HTTP server on 127.0.0.1 that never answers, so their tasks stay unfinished. "Served
meanwhile" means another user's call is answered within ``SERVED_WITHIN`` seconds, a bound
wide enough for a busy two-core machine, never a timing assertion.
"""

from __future__ import annotations

import grp
import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from websockets.exceptions import ConnectionClosed

from statusctl.client import Client, open_client
from statusd.config import LimitsConfig, WebSocketConfig
from statusd.daemon import Daemon, run
from statusd.identity import Caller
from statusd.protocol import jsonrpc
from statusd.session import Session
from statusd.store import load
from tests.conftest import NOBODY_GID, RawClient, blocking_call, make_config, needs_root, run_as
from tests.http_servers import HTTPTestServer, hang_before_head, http_server, serve_data, status
from tests.test_tasks import FakeJob, make_manager
from tests.websocket_clients import TIMEOUT, make_token, open_ws

__all__ = ["http_server"]

SERVED_WITHIN = 5.0
BUSY = -32004
THIRD_UID = 65533  # no passwd entry needed: the daemon names it "65533"


def call_as(uid: int, calls: list[tuple[str, dict[str, Any] | None]], path: Path) -> Any:
    """Run ``calls`` one by one as ``uid`` (in nobody's group, which may use the socket);
    each answer with the seconds it took."""

    def act() -> list[dict[str, Any]]:
        answers = []
        for method, params in calls:
            began = time.monotonic()
            answer = blocking_call(path, method, params)
            answers.append({"answer": answer, "seconds": time.monotonic() - began})
        return answers

    return run_as(uid, NOBODY_GID, act)


def codes(answers: list[dict[str, Any]]) -> list[int]:
    return [a["answer"].get("error", {}).get("code", 0) for a in answers]


# --- max_tasks_per_user, with real users ---------------------------------------------------------


@needs_root
async def test_a_user_past_max_tasks_per_user_is_refused_and_others_are_served(
    http_server: HTTPTestServer, daemon_process: Any, short_tmp: Path
) -> None:
    hanging = http_server.route("/hang.bin", hang_before_head())
    group = grp.getgrgid(NOBODY_GID).gr_name
    config = short_tmp / "statusd.toml"
    config.write_text(f'socket_group = "{group}"\n[limits]\nmax_tasks_per_user = 3\n')
    process = daemon_process()
    await trio.to_thread.run_sync(process.start, "--config", str(config))
    download = ("tasks.download", {"urls": [hanging]})

    async def as_user(uid: int, *calls: tuple[str, dict[str, Any] | None]) -> Any:
        return await trio.to_thread.run_sync(call_as, uid, list(calls), process.socket)

    # nobody takes every place: three unfinished tasks (running and queued, none ends).
    first = await as_user(65534, download, download, download, download)
    assert codes(first) == [0, 0, 0, BUSY]
    assert first[3]["answer"]["error"] == {
        "code": BUSY,
        "message": "nobody has 3 unfinished tasks, the most a user may have "
        "(limits.max_tasks_per_user = 3); wait for some to end, or cancel some",
        "data": {"limit": 3, "key": "limits.max_tasks_per_user"},
    }
    # Meanwhile a third user has an allowance of their own, and root (an admin) none at all.
    third = await as_user(THIRD_UID, ("daemon.info", None), download)
    assert codes(third) == [0, 0]
    assert third[0]["answer"]["result"]["user"] == str(THIRD_UID)
    assert max(a["seconds"] for a in third) < SERVED_WITHIN
    for _ in range(4):
        with trio.fail_after(SERVED_WITHIN):
            answer = await trio.to_thread.run_sync(blocking_call, process.socket, *download)
        assert "task_id" in answer["result"]
    # A cancel frees a place; a retry takes one again, so it counts against the limit too.
    cancelled = first[0]["answer"]["result"]["task_id"]
    freed = await as_user(
        65534,
        ("tasks.cancel", {"task_id": cancelled}),
        download,
        ("tasks.retry", {"task_id": cancelled}),
        ("tasks.summary", None),
    )
    assert codes(freed) == [0, 0, BUSY, 0]
    assert "limits.max_tasks_per_user" in freed[2]["answer"]["error"]["message"]
    summary = freed[3]["answer"]["result"]
    assert summary["running"] + summary["pending"] == 3
    assert summary["cancelled"] == 1


# --- the same rules in process: concurrent creates, retries, items -------------------------------


@attrs.define
class Limited:
    daemon: Daemon
    user: Session
    admin: Session

    async def call(self, session: Session, method: str, params: dict[str, Any]) -> Any:
        line = await self.daemon.api.handle_message(
            session, json.dumps(jsonrpc.request(method, params, 1))
        )
        assert line is not None
        return json.loads(line)


@pytest.fixture
async def start_daemon(nursery: trio.Nursery, short_tmp: Path) -> AsyncIterator[Any]:
    started: list[Daemon] = []

    async def _start(**overrides: Any) -> Limited:
        limits = LimitsConfig(**overrides.pop("limits", {}))
        daemon = await nursery.start(run, make_config(short_tmp, limits=limits, **overrides))
        started.append(daemon)
        user = Session(Caller(65534, "nobody", admin=False), daemon.streams)
        admin = Session(Caller(0, "root", admin=True), daemon.streams)
        return Limited(daemon, user, admin)

    yield _start
    for daemon in started:
        daemon.request_stop()
        await daemon.wait_stopped()


async def test_concurrent_creates_do_not_pass_the_limit(
    http_server: HTTPTestServer, start_daemon: Any
) -> None:
    hanging = http_server.route("/hang.bin", hang_before_head())
    limited = await start_daemon(limits={"max_tasks_per_user": 5})
    answers: list[Any] = []

    async def create() -> None:
        answers.append(await limited.call(limited.user, "tasks.download", {"urls": [hanging]}))

    # Each create waits for its journal write in a thread: all 20 are in flight at once.
    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(create)
    created = [a for a in answers if "result" in a]
    assert len(created) == 5
    assert {a["error"]["code"] for a in answers if "error" in a} == {BUSY}
    assert limited.daemon.tasks.unfinished_count("nobody") == 5
    # The admin is not counted against anyone, and not limited.
    for _ in range(8):
        assert "result" in await limited.call(limited.admin, "tasks.download", {"urls": [hanging]})


async def test_concurrent_retries_do_not_pass_the_limit(
    http_server: HTTPTestServer, start_daemon: Any
) -> None:
    hanging = http_server.route("/hang.bin", hang_before_head())
    limited = await start_daemon(limits={"max_tasks_per_user": 2})
    ids = []
    for _ in range(2):
        answer = await limited.call(limited.user, "tasks.download", {"urls": [hanging]})
        ids.append(answer["result"]["task_id"])
    for task_id in ids:
        assert "result" in await limited.call(limited.user, "tasks.cancel", {"task_id": task_id})
    assert "result" in await limited.call(limited.user, "tasks.download", {"urls": [hanging]})
    answers: list[Any] = []

    async def retry(task_id: str) -> None:
        answers.append(await limited.call(limited.user, "tasks.retry", {"task_id": task_id}))

    async with trio.open_nursery() as nursery:
        for task_id in ids:
            nursery.start_soon(retry, task_id)
    assert sorted("result" in a for a in answers) == [False, True]
    assert limited.daemon.tasks.unfinished_count("nobody") == 2


async def test_items_over_max_items_per_task_are_refused(start_daemon: Any) -> None:
    limited = await start_daemon(limits={"max_items_per_task": 5})
    urls = [f"http://127.0.0.1:9/{n}.bin" for n in range(6)]
    refused = await limited.call(limited.user, "tasks.download", {"urls": urls})
    assert refused["error"] == {
        "code": BUSY,
        "message": "urls has 6 entries, more than a task may have "
        "(limits.max_items_per_task = 5); split it into several tasks",
        "data": {"limit": 5, "key": "limits.max_items_per_task", "field": "urls"},
    }
    items = [{"url": url} for url in urls]
    refused = await limited.call(limited.admin, "tasks.download", {"items": items})
    assert refused["error"]["data"]["field"] == "items"
    assert limited.daemon.tasks.list_tasks() == []  # nothing was created
    paused = await limited.call(limited.user, "tasks.download", {"urls": urls[:5]})
    assert "task_id" in paused["result"]


async def test_a_queued_task_has_no_job_until_it_starts(nursery: trio.Nursery) -> None:
    built: list[FakeJob] = []

    def factory(_task: Any, saved: dict[str, Any]) -> FakeJob:
        built.append(FakeJob(total=1, resumed_from=list(saved["checkpoints"])))
        return built[-1]

    manager, _ = make_manager(None, max_running=1, factories={"fake": factory})
    await nursery.start(manager.serve)
    ids = [await manager.create_task(f"t{n}", 1, kind="fake", owner="alice") for n in range(3)]
    for task_id in ids:
        manager.run_task(task_id)
    await trio.testing.wait_all_tasks_blocked()
    assert len(built) == 1  # the running one's; the two queued ones hold their spec only
    built[0].release.set()
    await manager.wait_finished(ids[0])
    await trio.testing.wait_all_tasks_blocked()
    assert len(built) == 2


# --- max_request_bytes, on both transports -------------------------------------------------------


def publish_line(size: int) -> bytes:
    """A status.publish request line of exactly ``size`` bytes, without its newline."""
    head = b'{"jsonrpc":"2.0","id":1,"method":"status.publish","params":{"level":"info","message":"'
    tail = b'"}}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


async def test_a_line_over_max_request_bytes_is_refused_and_closes_its_connection(
    start_daemon: Any,
) -> None:
    limited = await start_daemon(limits={"max_request_bytes": 4096})
    socket_path = limited.daemon.config.socket
    client, other = await RawClient.connect(socket_path), await RawClient.connect(socket_path)
    try:
        seq_before = limited.daemon.channel.last_seq
        await client.send(publish_line(4096) + b"\n")  # at the limit: fine
        assert "result" in await client.receive()
        await client.send(publish_line(4097) + b"\n")
        refused = await client.receive()
        assert refused == {
            "jsonrpc": "2.0",
            "id": None,
            "error": {
                "code": -32600,
                "message": "request line exceeds 4096 bytes (limits.max_request_bytes); "
                "nothing in it ran and the connection is closed",
                "data": {"limit": 4096},
            },
        }
        with pytest.raises(EOFError):
            await client.receive()
        # Nothing in the refused line ran, and another client is served meanwhile.
        with trio.fail_after(SERVED_WITHIN):
            info = await other.call("daemon.info")
        assert info["status_seq"] == seq_before + 1
        # A reload's limit reaches connections made after it.
        config = limited.daemon.config
        bigger = attrs.evolve(config, limits=LimitsConfig(max_request_bytes=8192))
        assert await limited.daemon.reload(lambda: bigger)
        later = await RawClient.connect(socket_path)
        try:
            await later.send(publish_line(5000) + b"\n")
            assert "result" in await later.receive()
        finally:
            await later.aclose()
    finally:
        await trio.aclose_forcefully(client.stream)
        await trio.aclose_forcefully(other.stream)


async def test_a_websocket_message_over_max_request_bytes_closes_with_1009(
    start_daemon: Any,
) -> None:
    websocket = WebSocketConfig(listen=("127.0.0.1", 0), allowed_origins=())
    limited = await start_daemon(limits={"max_request_bytes": 4096}, websocket=websocket)
    daemon = limited.daemon
    token = (await make_token(daemon))["token"]

    def session() -> tuple[int, str, Any]:
        with open_ws(daemon, token, max_size=None) as ws:
            ws.send(publish_line(4096).decode())  # at the limit: fine
            assert "result" in json.loads(ws.recv(TIMEOUT))
            ws.send(publish_line(4097).decode())
            with pytest.raises(ConnectionClosed) as caught:
                ws.recv(TIMEOUT)
            assert caught.value.rcvd is not None
            closed = caught.value.rcvd.code, caught.value.rcvd.reason
        # The protocol closes that connection only: a new one is served.
        with open_ws(daemon, token) as ws:
            ws.send(json.dumps(jsonrpc.request("daemon.info", None, 2)))
            info = json.loads(ws.recv(TIMEOUT))
        return (*closed, info)

    code, reason, info = await trio.to_thread.run_sync(session)
    assert (code, reason) == (1009, "Exceeded maximum message size: 4096 bytes")
    assert info["result"]["pid"] > 0


# --- statusctl's client reads answers as long as the daemon may send --------------------------


async def test_the_client_reads_an_answer_of_several_mebibytes(start_daemon: Any) -> None:
    limited = await start_daemon(status_history=20_000)
    channel = limited.daemon.channel
    for n in range(15_000):
        channel.publish_status("info", f"{n:05d} " + "y" * 190)
    socket_path = limited.daemon.config.socket

    def blocking() -> int:
        with Client(socket_path) as client:
            return len(client.call("status.recent")["messages"])

    assert await trio.to_thread.run_sync(blocking) == 15_001  # and "System ready"
    async with open_client(socket_path) as client:
        answer = await client.call("status.recent")
    assert len(json.dumps(answer)) > 3 * 1024 * 1024  # past the old 1 MiB line limit
    assert len(answer["messages"]) == 15_001


# --- a finished task's state is small; a retry after a restart fetches only what failed ----------


def journal_of(directory: Path) -> list[Any]:
    return load(directory / "state" / "tasks.jsonl").records


async def test_a_settled_task_keeps_only_what_a_retry_needs_across_a_restart(
    http_server: HTTPTestServer, daemon_process: Any, short_tmp: Path
) -> None:
    urls = [http_server.route(f"/f{n}.bin", serve_data(b"%03d" % n * 100)) for n in range(40)]
    broken = http_server.route("/broken.bin", status(404))
    process = daemon_process()
    await trio.to_thread.run_sync(process.start)

    async def call(method: str, params: dict[str, Any] | None = None) -> Any:
        answer = await trio.to_thread.run_sync(blocking_call, process.socket, method, params)
        assert "result" in answer, answer
        return answer["result"]

    async def finished(task_id: str) -> dict[str, Any]:
        with trio.fail_after(30):
            while True:
                task = await call("tasks.get", {"task_id": task_id})
                if task["status"] in ("completed", "failed", "cancelled"):
                    return dict(task)
                await trio.sleep(0.05)

    done_id = (await call("tasks.download", {"urls": urls[:10]}))["task_id"]
    failed_id = (await call("tasks.download", {"urls": [*urls, broken], "dest": "again"}))[
        "task_id"
    ]
    assert (await finished(done_id))["status"] == "completed"
    assert (await finished(failed_id))["status"] == "failed"

    settled = {
        r["id"]: r for r in journal_of(short_tmp) if r.get("op") == "checkpoints"
    }  # the record written with each end
    # The completed task keeps no spec and no checkpoints; the failed one the items that
    # completed, one row each, and its spec (a retry rebuilds its items from it).
    assert settled[done_id] == {"op": "checkpoints", "id": done_id, "data": [], "spec": None}
    [rows] = [checkpoint["completed"] for checkpoint in settled[failed_id]["data"]]
    assert [row[0] for row in rows] == list(range(40))
    assert all(row[2] == 300 and row[1].endswith(f"/again/f{row[0]}.bin") for row in rows)
    assert len(json.dumps(settled[failed_id])) < 40 * 120

    process.signal(15)
    assert await trio.to_thread.run_sync(process.wait) == 0
    await trio.to_thread.run_sync(process.start)
    http_server.route("/broken.bin", serve_data(b"fixed"))
    assert (await call("tasks.retry", {"task_id": failed_id}))["task_id"] == failed_id
    retried = await finished(failed_id)
    assert retried["status"] == "completed"
    # Once for each task (the completed one fetched the first ten), none for the retry.
    fetched = [len(http_server.requests_for(f"/f{n}.bin")) for n in range(40)]
    assert fetched == [2] * 10 + [1] * 30
    assert len(http_server.requests_for("/broken.bin")) == 2
    assert retried["result"]["completed"] == 41
    paths = [item["path"] for item in retried["result"]["items"]]
    assert Path(paths[-1]).read_bytes() == b"fixed"
    assert Path(paths[0]).read_bytes() == b"000" * 100


async def test_compaction_writes_finished_tasks_in_their_small_form(
    http_server: HTTPTestServer, start_daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = [http_server.route(f"/c{n}.bin", serve_data(b"c" * 50)) for n in range(3)]
    broken = http_server.route("/gone.bin", status(404))
    limited = await start_daemon()
    tasks = limited.daemon.tasks
    answers = [
        await limited.call(limited.user, "tasks.download", {"urls": urls, "dest": "a"}),
        await limited.call(limited.user, "tasks.download", {"urls": [*urls, broken], "dest": "b"}),
    ]
    done_id, failed_id = (answer["result"]["task_id"] for answer in answers)
    assert (await tasks.wait_finished(done_id)).status.value == "completed"
    assert (await tasks.wait_finished(failed_id)).status.value == "failed"
    monkeypatch.setattr("statusd.tasks.COMPACT_MIN_RECORDS", 1)
    journal = limited.daemon.config.state_dir.parent
    # A compaction an end started may hold the journal a moment longer: until one is done.
    with trio.fail_after(SERVED_WITHIN):
        while any(record["op"] != "create" for record in journal_of(journal)):
            await tasks.cleanup_old_tasks(24)  # nothing is old enough: it only compacts
            await trio.sleep(0.01)
    snapshot = {record["task"]["id"]: record for record in journal_of(journal)}
    assert snapshot[done_id].keys() == {"op", "task"}
    assert snapshot[done_id]["task"]["result"]["completed"] == 3  # what tasks.get shows stays
    failed = snapshot[failed_id]
    assert failed.keys() == {"op", "task", "spec", "checkpoints"}
    assert [[row[0] for row in c["completed"]] for c in failed["checkpoints"]] == [[0, 1, 2]]


async def test_a_task_whose_job_cannot_be_built_fails_when_it_starts(
    nursery: trio.Nursery,
) -> None:
    def factory(_task: Any, saved: dict[str, Any]) -> FakeJob:
        raise ValueError(f"spec {saved['spec']} is unusable")

    manager, _ = make_manager(None, factories={"fake": factory})
    await nursery.start(manager.serve)
    task_id = await manager.create_task("t", 1, kind="fake", owner="alice", spec={"x": 1})
    manager.run_task(task_id)
    task = await manager.wait_finished(task_id)
    assert task.status.value == "failed"
    assert task.error == "internal error: spec {'x': 1} is unusable"
    assert manager.unfinished_count("alice") == 0


async def test_planning_a_large_download_leaves_the_loop_to_other_clients(
    daemon: Daemon, connect: Any
) -> None:
    """Checking 10,000 URLs took 59 ms on the event loop, a stall for every other client
    per create (item 8). Planning runs in a thread: while one plan is held there, another
    client's call is answered."""
    real = daemon.api.downloads
    assert real is not None
    release = threading.Event()
    planning = threading.Event()

    class Held:
        def prepare(self, *args: Any, **kwargs: Any) -> Any:
            planning.set()
            assert release.wait(TIMEOUT)
            assert real is not None
            return real.prepare(*args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    daemon.api.downloads = Held()
    planner, other = await connect(), await connect()
    urls = [f"http://127.0.0.1:9/{n}.bin" for n in range(10_000)]
    with trio.fail_after(TIMEOUT):
        await planner.send(
            jsonrpc.encode_line(jsonrpc.request("tasks.download", {"urls": urls}, 1))
        )
        await trio.to_thread.run_sync(planning.wait)
        assert (await other.call("daemon.info"))["pid"] > 0  # answered while it plans
        release.set()
        created = await planner.receive()
    assert "task_id" in created["result"]
    daemon.api.downloads = real
