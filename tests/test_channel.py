"""The status channel and the session's outgoing buffer, without sockets."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import trio
import trio.testing

from statusd.channel import StatusChannel
from statusd.events import Streams
from statusd.identity import Caller
from statusd.session import Session
from statusd.state.status import Level, truncate_message

CALLER = Caller(uid=1000, username="alice", admin=False)


def decode(lines: list[bytes]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines]


def test_truncation_rule() -> None:
    assert truncate_message("a" * 200) == "a" * 200
    cut = truncate_message("a" * 250)
    assert len(cut) == 200
    assert cut == "a" * 197 + "..."


def test_publish_stamps_cuts_and_numbers() -> None:
    fixed = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    channel = StatusChannel(now=lambda: fixed)
    first = channel.publish_status(Level.INFO, "System ready")
    second = channel.publish_status("warning", "x" * 250, operation_id="op-1")
    assert first is not None
    assert second is not None
    assert (first.seq, second.seq) == (1, 2)
    assert second.message == "x" * 197 + "..."
    assert second.timestamp == fixed
    assert second.operation_id == "op-1"


def test_publish_never_raises_on_a_bad_level() -> None:
    channel = StatusChannel()
    assert channel.publish_status("loud", "hello") is None
    assert channel.last_seq == 0
    assert channel.statistics().refused == 1


def test_ring_of_100_keeps_the_newest() -> None:
    channel = StatusChannel(100)
    for n in range(250):
        channel.publish_status(Level.INFO, f"m{n}")
    messages, dropped = channel.recent()
    assert len(messages) == 100
    assert dropped == 150
    assert messages[0].message == "m150"
    assert messages[-1].message == "m249"
    assert channel.statistics().ring.dropped == 150


def test_since_from_an_earlier_daemon_gets_everything_held() -> None:
    channel = StatusChannel()
    channel.publish_status(Level.INFO, "System ready")
    messages, dropped = channel.recent(since=5000)
    assert [m.message for m in messages] == ["System ready"]
    assert dropped == 0


def test_session_streams_status_in_order_with_drop_notice() -> None:
    channel = StatusChannel(10)
    session = Session(CALLER, Streams(channel))
    session.subscribe(status=True)
    for n in range(25):
        channel.publish_status(Level.INFO, f"m{n}")
    pushed = decode(session.take_pending())
    assert pushed[0] == {
        "jsonrpc": "2.0",
        "method": "dropped",
        "params": {"stream": "status", "count": 15},
    }
    assert [p["params"]["message"] for p in pushed[1:]] == [f"m{n}" for n in range(15, 25)]
    assert session.take_pending() == []
    assert session.statistics().dropped == {"status": 15}


def test_replies_come_before_pushes_and_are_never_dropped() -> None:
    channel = StatusChannel(2)
    session = Session(CALLER, Streams(channel), max_pushes=2)
    session.subscribe(status=True)
    for n in range(5):
        channel.publish_status(Level.INFO, f"m{n}")
        session.add_reply(f'{{"id":{n}}}\n'.encode())
    for n in range(3):
        session.push("tasks", f'{{"push":{n}}}\n'.encode())
    pushed = decode(session.take_pending())
    assert [p.get("id") for p in pushed[:5]] == [0, 1, 2, 3, 4]
    notices = {p["params"]["stream"]: p["params"]["count"] for p in pushed[5:7]}
    assert notices == {"status": 3, "tasks": 1}
    assert [p["params"]["message"] for p in pushed[7:9]] == ["m3", "m4"]
    assert pushed[9:] == [{"push": 1}, {"push": 2}]


def test_subscribe_since_replays_and_unsubscribe_stops() -> None:
    channel = StatusChannel()
    for n in range(3):
        channel.publish_status(Level.INFO, f"m{n}")
    session = Session(CALLER, Streams(channel))
    subscription = session.subscribe(status=True, since=1)
    assert [p["params"]["message"] for p in decode(session.take_pending())] == ["m1", "m2"]
    assert session.unsubscribe(subscription.id)
    assert not session.unsubscribe(subscription.id)
    channel.publish_status(Level.INFO, "after")
    assert session.take_pending() == []
    assert channel.statistics().watchers == 0


async def test_writer_wakes_on_publish_without_polling() -> None:
    channel = StatusChannel()
    session = Session(CALLER, Streams(channel))
    session.subscribe(status=True)
    received: list[bytes] = []

    async def writer() -> None:
        await session.wait_pending()
        received.extend(session.take_pending())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        assert received == []
        channel.publish_status(Level.SUCCESS, "done")
    assert [json.loads(line)["params"]["message"] for line in received] == ["done"]


async def test_reader_pauses_while_replies_are_unsent() -> None:
    session = Session(CALLER, Streams(StatusChannel()), max_pending_replies=2)
    session.add_reply(b"1\n")
    session.add_reply(b"2\n")
    resumed = False

    async def reader() -> None:
        nonlocal resumed
        await session.wait_reply_room()
        resumed = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert not resumed
        assert session.take_pending() == [b"1\n", b"2\n"]
    assert resumed
