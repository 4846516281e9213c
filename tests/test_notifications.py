"""The notification service and its RPC methods: durability (reopen, compaction, failed
writes), per-user pushes, task-end notifications, and every method over a real socket."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from statusd.channel import StatusChannel
from statusd.daemon import Daemon
from statusd.errors import InternalError, InvalidParams, StartupError
from statusd.events import Streams
from statusd.identity import Caller
from statusd.notifications import (
    TASK_LINK_PREFIX,
    NotificationService,
    open_notifications,
    task_end_text,
)
from statusd.session import Session
from statusd.state.tasks import TaskInfo, TaskStatus
from statusd.store import load, open_store
from statusd.tasks import TaskManager
from tests.test_tasks import FakeJob

ALICE = Caller(1001, "alice", False)
BOB = Caller(1002, "bob", False)
ROOT = Caller(0, "root", True)


def op(record: Any) -> str:
    """A journal record's op: a create is an array, every other record an object."""
    return "create" if isinstance(record, list) else str(record["op"])


def titles(service: NotificationService, user: str, **kw: Any) -> list[str]:
    return [n["title"] for n in service.get_user_notifications(user, limit=1000, **kw)]


def everything(service: NotificationService) -> dict[str, Any]:
    return {
        user: (
            service.get_unread_count(user),
            service.get_user_notifications(user, limit=1000),
        )
        for user in ("alice", "bob", "carol")
    }


def pushes(session: Session) -> list[tuple[str, Any]]:
    out = []
    for line in session.take_pending():
        message = json.loads(line)
        out.append((message["method"], message["params"]))
    return out


# -- durability ------------------------------------------------------------------------------


async def test_every_change_survives_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "notifications.jsonl"
    streams = Streams(StatusChannel())
    async with open_notifications(path, streams.notifications) as service:
        a1 = await service.create_notification("alice", "test", "a1", "first", "/a")
        s1 = await service.create_notification(None, "system", "s1", "for everyone")
        a2 = await service.create_notification("alice", "test", "a2", "")
        b1 = await service.create_notification("bob", "test", "b1", "")
        assert [a1, s1, a2, b1] == [1, 2, 3, 4]
        assert await service.mark_notification_as_read(s1, "alice")
        assert await service.delete_notification(s1, "bob")
        assert await service.mark_all_notifications_as_read("bob") == 1
        assert await service.delete_read_notifications("bob") == 1
        assert await service.delete_notification(a2, "alice")
        before = everything(service)
    async with open_notifications(path, streams.notifications) as service:
        assert everything(service) == before
        assert titles(service, "alice") == ["s1", "a1"]
        assert titles(service, "bob") == []
        assert titles(service, "carol") == ["s1"]
        # Ids go on from the highest ever used, deleted ones included.
        assert await service.create_notification("carol", "test", "c1", "") == 5


async def test_nothing_to_do_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "notifications.jsonl"
    async with open_notifications(path, Streams(StatusChannel()).notifications) as service:
        a1 = await service.create_notification("alice", "test", "a1", "")
        assert await service.mark_notification_as_read(a1, "alice")
        assert await service.mark_notification_as_read(a1, "alice")  # already read
        assert await service.mark_all_notifications_as_read("alice") == 0
        assert await service.delete_read_notifications("bob") == 0
        assert not await service.mark_notification_as_read(a1, "bob")
        assert not await service.delete_notification(99, "alice")
    assert [op(record) for record in load(path).records] == ["create", "read"]


async def test_compaction_when_dead_records_outweigh_live_ones(tmp_path: Path) -> None:
    path = tmp_path / "notifications.jsonl"
    feed = Streams(StatusChannel()).notifications
    async with open_notifications(path, feed, compact_min_records=10) as service:
        keep = await service.create_notification("alice", "test", "keep", "")
        for n in range(8):
            gone = await service.create_notification("alice", "test", f"gone {n}", "")
            await service.delete_notification(gone, "alice")
        await service.mark_notification_as_read(keep, "alice")
        await trio.testing.wait_all_tasks_blocked()
        # A change waits for a compaction in progress, so after it the rewrite is done.
        last = await service.create_notification(None, "test", "last", "")
        assert service.statistics().compactions >= 1
        before = everything(service)
    ops = [op(record) for record in load(path).records]
    assert ops[0] == "ids"
    assert ops.count("create") == 2
    assert len(ops) < 10
    async with open_notifications(path, feed) as service:
        assert everything(service) == before
        assert titles(service, "alice") == ["last", "keep"]
        assert await service.create_notification("bob", "test", "next", "") == last + 1


async def test_changes_made_during_a_compaction_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "notifications.jsonl"
    feed = Streams(StatusChannel()).notifications
    created: list[int] = []
    async with open_notifications(path, feed, compact_min_records=10) as service:
        for n in range(10):
            await service.delete_notification(
                await service.create_notification("bob", "test", f"gone {n}", ""), "bob"
            )

        async def create(n: int) -> None:
            created.append(await service.create_notification("alice", "test", f"n{n}", ""))

        async with trio.open_nursery() as nursery:
            for n in range(60):
                nursery.start_soon(create, n)
        await trio.testing.wait_all_tasks_blocked()
        await service.create_notification("alice", "test", "after", "")
        assert service.statistics().compactions >= 1
    async with open_notifications(path, feed) as service:
        listed = {n["id"] for n in service.get_user_notifications("alice", limit=1000)}
        assert set(created) <= listed
        assert len(listed) == 61


async def test_a_failed_write_is_not_acknowledged_and_changes_nothing(tmp_path: Path) -> None:
    streams = Streams(StatusChannel())
    session = Session(ALICE, streams)
    session.subscribe(notifications=True)
    store, _report = await open_store(tmp_path / "notifications.jsonl")
    service = NotificationService(streams.notifications, store)
    a1 = await service.create_notification("alice", "test", "a1", "")
    pushes(session)
    await store.aclose()  # every write now fails
    before = everything(service)
    with pytest.raises(InternalError, match="could not store the change: write failed"):
        await service.create_notification("alice", "test", "a2", "")
    with pytest.raises(InternalError):
        await service.mark_notification_as_read(a1, "alice")
    with pytest.raises(InternalError):
        await service.delete_notification(a1, "alice")
    with pytest.raises(InternalError):
        await service.mark_all_notifications_as_read("alice")
    assert everything(service) == before
    assert pushes(session) == []
    assert service.statistics().failed_writes == 4
    assert [op(r) for r in load(tmp_path / "notifications.jsonl").records] == ["create"]


async def test_bad_fields_are_refused_before_anything_is_written() -> None:
    service = NotificationService(Streams(StatusChannel()).notifications)
    with pytest.raises(InvalidParams, match="title: must not be empty"):
        await service.create_notification("alice", "test", "", "")
    with pytest.raises(InvalidParams, match="type: may contain only"):
        await service.create_notification("alice", "no spaces", "t", "")
    assert service.get_user_notifications("alice") == []


def test_compact_min_records_must_be_positive() -> None:
    with pytest.raises(ValueError, match="compact_min_records must be >= 1, not 0"):
        NotificationService(Streams(StatusChannel()).notifications, compact_min_records=0)


async def test_a_damaged_journal_stops_start_up(tmp_path: Path) -> None:
    path = tmp_path / "notifications.jsonl"
    store, _ = await open_store(path)
    await store.append({"op": "teleport"})
    await store.aclose()
    with pytest.raises(StartupError, match="record 1: unknown op 'teleport'") as caught:
        async with open_notifications(path, Streams(StatusChannel()).notifications):
            pass  # pragma: no cover
    assert "Move the file aside" in str(caught.value)


# -- pushes ----------------------------------------------------------------------------------


async def test_pushes_reach_only_the_inbox_owner() -> None:
    streams = Streams(StatusChannel())
    service = NotificationService(streams.notifications)
    alice, bob, root = Session(ALICE, streams), Session(BOB, streams), Session(ROOT, streams)
    alice_tasks_only = Session(ALICE, streams)
    for session in (alice, bob, root):
        session.subscribe(notifications=True)
    alice_tasks_only.subscribe(tasks="all")
    a1 = await service.create_notification("alice", "test", "a1", "hello", "/x")
    [(method, params), count] = pushes(alice)
    assert method == "notification"
    assert params == {
        "id": a1,
        "username": "alice",
        "type": "test",
        "title": "a1",
        "message": "hello",
        "link": "/x",
        "created_at": params["created_at"],
        "read": False,
    }
    assert count == ("unread_count", {"count": 1})
    assert pushes(bob) == pushes(root) == pushes(alice_tasks_only) == []

    s1 = await service.create_notification(None, "system", "s1", "")
    assert [m for m, _ in pushes(alice)] == ["notification", "unread_count"]
    assert pushes(bob)[1] == ("unread_count", {"count": 1})
    assert pushes(root)[0][1]["id"] == s1

    await service.mark_notification_as_read(s1, "bob")
    assert pushes(bob) == [("unread_count", {"count": 0})]
    await service.delete_notification(a1, "alice")
    assert pushes(alice) == [("unread_count", {"count": 1})]
    assert pushes(root) == []

    assert alice.statistics().subscriptions == 1
    alice.close()
    await service.create_notification("alice", "test", "a2", "")
    assert pushes(alice) == []
    assert streams.notifications.subscribers == 2


async def test_unsubscribe_stops_notification_pushes() -> None:
    streams = Streams(StatusChannel())
    service = NotificationService(streams.notifications)
    alice = Session(ALICE, streams)
    first = alice.subscribe(notifications=True)
    second = alice.subscribe(notifications=True, status=True)
    await service.create_notification("alice", "test", "a1", "")
    assert len([p for p in pushes(alice) if p[0] == "notification"]) == 1  # a union: once
    alice.unsubscribe(first.id)
    await service.create_notification("alice", "test", "a2", "")
    assert [m for m, _ in pushes(alice)] == ["notification", "unread_count"]
    alice.unsubscribe(second.id)
    await service.create_notification("alice", "test", "a3", "")
    assert pushes(alice) == []


async def test_a_slow_subscriber_is_told_what_it_lost() -> None:
    streams = Streams(StatusChannel())
    service = NotificationService(streams.notifications)
    alice = Session(ALICE, streams, max_pushes=3)
    alice.subscribe(notifications=True)
    for n in range(5):
        await service.create_notification("alice", "test", f"a{n}", "")
    received = pushes(alice)
    assert received[0] == ("dropped", {"stream": "notifications", "count": 7})
    assert received[1:] == [
        ("unread_count", {"count": 4}),
        ("notification", received[2][1]),
        ("unread_count", {"count": 5}),
    ]
    assert received[2][1]["title"] == "a4"


# -- task ends -------------------------------------------------------------------------------


def _task(**kw: Any) -> TaskInfo:
    values: dict[str, Any] = {
        "id": "t1",
        "name": "three files",
        "kind": "download",
        "owner": "alice",
        "status": TaskStatus.RUNNING,
        "created_at": datetime(2026, 11, 25, tzinfo=UTC),
        "total_items": 3,
        "processed_items": 3,
    }
    values.update(kw)
    return TaskInfo(**values)


def test_task_end_texts() -> None:
    assert task_end_text(_task(), TaskStatus.COMPLETED) == (
        "task_completed",
        "Task completed: three files",
        "3 of 3 items done.",
    )
    failed = _task(result={"failed": 2}, error="2 of 3 items failed")
    assert task_end_text(failed, TaskStatus.FAILED) == (
        "task_failed",
        "Task failed: three files",
        "2 of 3 items failed.",
    )
    crashed = _task(error="internal error: boom")
    assert task_end_text(crashed, TaskStatus.FAILED)[2] == "Failed: internal error: boom."
    cancelled = _task(processed_items=1)
    assert task_end_text(cancelled, TaskStatus.CANCELLED) == (
        "task_cancelled",
        "Task cancelled: three files",
        "Cancelled after 1 of 3 items.",
    )
    long = _task(name="x" * 300)
    assert len(task_end_text(long, TaskStatus.COMPLETED)[1]) == 255
    odd = _task(name="two\nlines\x1b[31m")
    assert task_end_text(odd, TaskStatus.COMPLETED)[1] == "Task completed: two lines [31m"


async def test_the_task_hook_notifies_once_per_outcome() -> None:
    service = NotificationService(Streams(StatusChannel()).notifications)
    await service.notify_task_finished(_task(), TaskStatus.COMPLETED)
    await service.notify_task_finished(_task(), TaskStatus.COMPLETED)
    [notification] = service.get_user_notifications("alice")
    assert notification["link"] == TASK_LINK_PREFIX + "t1"
    assert notification["type"] == "task_completed"
    await service.notify_task_finished(_task(error="x"), TaskStatus.FAILED)
    assert titles(service, "alice") == ["Task failed: three files", "Task completed: three files"]


async def test_a_crash_between_notifying_and_journalling_notifies_once(tmp_path: Path) -> None:
    """The hook runs before the task's end is journalled. If the daemon dies in between,
    the task runs again after the restart and the hook is called again: still one
    notification."""
    feed = Streams(StatusChannel()).notifications
    notifications_path = tmp_path / "notifications.jsonl"
    tasks_path = tmp_path / "tasks.jsonl"

    def factory(_task: TaskInfo, saved: dict[str, Any]) -> FakeJob:
        job = FakeJob(resumed_from=saved["checkpoints"])
        job.release.set()
        return job

    def manager(service: NotificationService) -> tuple[TaskManager, Streams]:
        streams = Streams(StatusChannel())
        tasks = TaskManager(
            streams.status,
            streams.tasks,
            journal_path=tasks_path,
            factories={"fake": factory},
            on_finished=service.notify_task_finished,
        )
        return tasks, streams

    async with (
        open_notifications(notifications_path, feed) as service,
        trio.open_nursery() as nursery,
    ):
        tasks, _ = manager(service)
        await nursery.start(tasks.serve)
        task_id = await tasks.create_task("job", 3, kind="fake", owner="alice")
        job = FakeJob()
        tasks.run_task(task_id, job)
        await job.started.wait()
        await trio.testing.wait_all_tasks_blocked()
        task = tasks.get_task(task_id)
        assert task is not None
        # What the hook does just before the daemon is killed: the notification is
        # written, the task's end is not.
        task.update_progress(3)
        await service.notify_task_finished(task, TaskStatus.COMPLETED)
        nursery.cancel_scope.cancel()

    async with open_notifications(notifications_path, feed) as service:
        async with trio.open_nursery() as nursery:
            tasks, _ = manager(service)
            await nursery.start(tasks.serve)
            finished = await tasks.wait_finished(task_id)
            assert finished.status is TaskStatus.COMPLETED
            nursery.cancel_scope.cancel()
        [notification] = service.get_user_notifications("alice")
        assert notification["title"] == "Task completed: job"


# -- over the socket -------------------------------------------------------------------------


async def test_every_method_over_the_socket(daemon: Daemon, connect: Any) -> None:
    client = await connect()
    me = (await client.call("daemon.info"))["user"]

    async def create(**params: Any) -> int:
        result = await client.call("notifications.create", {"type": "test", **params})
        return int(result["notification_id"])

    own = await create(username=me, title="own", message="m", link="/here")
    system = await create(title="system", message="")
    other = await create(username="alice", title="alice's", message="")
    listed = await client.call("notifications.list")
    assert [n["id"] for n in listed["notifications"]] == [system, own]
    assert (listed["count"], listed["unread"]) == (2, 2)
    assert listed["notifications"][1] == {
        "id": own,
        "username": me,
        "type": "test",
        "title": "own",
        "message": "m",
        "link": "/here",
        "read": False,
        "created_at": listed["notifications"][1]["created_at"],
    }
    assert listed["notifications"][1]["created_at"].endswith("Z")
    assert await client.call("notifications.unread_count") == {"count": 2}
    assert await client.call("notifications.mark_read", {"id": own}) == {"success": True}
    unread = await client.call("notifications.list", {"unread_only": True})
    assert [n["id"] for n in unread["notifications"]] == [system]
    limited = await client.call("notifications.list", {"limit": 1})
    assert limited["count"] == 1
    assert await client.call("notifications.mark_all_read") == {"count": 1}
    assert await client.call("notifications.unread_count") == {"count": 0}
    assert await client.call("notifications.delete", {"id": own}) == {"success": True}
    assert await client.call("notifications.delete_read") == {"count": 1}
    assert (await client.call("notifications.list"))["notifications"] == []
    # An admin reaches another user's inbox by naming it.
    theirs = await client.call("notifications.list", {"username": "alice"})
    assert [n["id"] for n in theirs["notifications"]] == [other, system]
    assert await client.call("notifications.unread_count", {"username": "alice"}) == {"count": 2}
    done = await client.call("notifications.mark_read", {"id": other, "username": "alice"})
    assert done == {"success": True}
    assert await client.call("notifications.delete_read", {"username": "alice"}) == {"count": 1}


async def test_a_notification_outside_the_inbox_is_not_found(connect: Any) -> None:
    client = await connect()
    other = (
        await client.call(
            "notifications.create", {"username": "alice", "type": "t", "title": "x", "message": ""}
        )
    )["notification_id"]
    for method in ("notifications.mark_read", "notifications.delete"):
        for notification_id in (other, 12345):
            error = (await client.request(method, {"id": notification_id}))["error"]
            assert error == {
                "code": -32001,
                "message": f"notification {notification_id} not found",
                "data": {"field": "id", "id": notification_id},
            }
    theirs = await client.call("notifications.list", {"username": "alice"})
    assert theirs["notifications"][0]["read"] is False


@pytest.mark.parametrize(
    ("method", "params", "field", "reason"),
    [
        ("notifications.create", {"title": "t", "message": ""}, "type", "is required"),
        ("notifications.create", {"type": "t", "message": ""}, "title", "is required"),
        ("notifications.create", {"type": "t", "title": "t"}, "message", "is required"),
        (
            "notifications.create",
            {"type": "t", "title": "x" * 256, "message": ""},
            "title",
            "must be at most 255 characters, not 256",
        ),
        (
            "notifications.create",
            {"type": "a b", "title": "t", "message": ""},
            "type",
            "may contain only letters, digits, '_', '-' and '.'",
        ),
        (
            "notifications.create",
            {"type": "t", "title": "t", "message": "m" * 4001},
            "message",
            "must be at most 4000 characters, not 4001",
        ),
        (
            "notifications.create",
            {"type": "t", "title": "t", "message": "", "link": "x" * 501},
            "link",
            "must be at most 500 characters, not 501",
        ),
        (
            "notifications.create",
            {"type": "t", "title": "t", "message": "", "username": ""},
            "username",
            "must not be empty",
        ),
        (
            "notifications.create",
            {"type": "t", "title": "t", "message": "", "colour": "red"},
            "colour",
            "unknown field",
        ),
        ("notifications.list", {"limit": 0}, "limit", "must be between 1 and 1000, not 0"),
        ("notifications.list", {"limit": 1001}, "limit", "must be between 1 and 1000, not 1001"),
        ("notifications.list", {"limit": "5"}, "limit", "must be an integer, not '5'"),
        (
            "notifications.list",
            {"unread_only": 1},
            "unread_only",
            "must be a boolean, not the number 1",
        ),
        ("notifications.mark_read", {}, "id", "is required"),
        ("notifications.mark_read", {"id": "3"}, "id", "must be an integer, not '3'"),
        ("notifications.delete", {"id": True}, "id", "must be an integer, not a boolean"),
        ("notifications.unread_count", {"since": 1}, "since", "unknown field"),
        ("subscribe", {"notifications": "yes"}, "notifications", "must be a boolean, not 'yes'"),
    ],
)
async def test_bad_params_name_the_field(
    connect: Any, method: str, params: dict[str, Any], field: str, reason: str
) -> None:
    client = await connect()
    error = (await client.request(method, params))["error"]
    assert error["code"] == -32602
    assert error["data"] == {"field": field, "reason": reason}
    assert (await client.call("notifications.list", {"username": "alice"}))["count"] == 0


async def test_notifications_stream_over_the_socket(connect: Any) -> None:
    watcher, other = await connect(), await connect()
    me = (await watcher.call("daemon.info"))["user"]
    subscription = await watcher.call("subscribe", {"notifications": True})
    assert subscription["subscription"].startswith("sub-")
    await other.call("status.publish", {"level": "info", "message": "not for this stream"})
    await other.call(
        "notifications.create",
        {"username": "alice", "type": "t", "title": "not mine", "message": ""},
    )
    created = await other.call(
        "notifications.create", {"username": me, "type": "t", "title": "mine", "message": "hi"}
    )
    pushed = await watcher.receive()
    assert pushed["method"] == "notification"
    assert pushed["params"]["id"] == created["notification_id"]
    assert pushed["params"]["title"] == "mine"
    assert pushed["params"]["read"] is False
    assert await watcher.receive() == {
        "jsonrpc": "2.0",
        "method": "unread_count",
        "params": {"count": 1},
    }
    await other.call("notifications.mark_read", {"id": created["notification_id"]})
    assert (await watcher.receive())["params"] == {"count": 0}
    await other.call("notifications.create", {"type": "t", "title": "everyone", "message": ""})
    assert (await watcher.receive())["params"]["username"] is None
    assert (await watcher.receive())["params"] == {"count": 1}
    await watcher.call("unsubscribe", subscription)
    await other.call("notifications.create", {"type": "t", "title": "after", "message": ""})
    # Nothing more is pushed: the next thing to arrive is this request's answer.
    assert (await watcher.request("notifications.unread_count"))["result"] == {"count": 2}
