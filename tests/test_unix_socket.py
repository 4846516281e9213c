"""The Unix socket transport: JSON-RPC over lines, bad input, limits, slow readers."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import attrs
import trio
import trio.testing

from statusd.daemon import Daemon, run
from statusd.protocol import jsonrpc
from statusd.protocol.framing import LineDecoder
from statusd.session import DEFAULT_MAX_PENDING_REPLIES
from tests.conftest import RawClient, make_config

REQUEST = b'{"jsonrpc":"2.0","id":%d,"method":"daemon.info"}\n'


async def assert_still_usable(client: RawClient) -> None:
    assert (await client.call("daemon.info"))["version"]


async def test_malformed_json_is_a_parse_error_and_the_connection_stays(connect: Any) -> None:
    client = await connect()
    await client.send(b'{"jsonrpc": "2.0", "id": 1, "method": \n')
    response = await client.receive()
    assert response["id"] is None
    assert response["error"]["code"] == -32700
    assert "invalid json" in response["error"]["message"]
    await assert_still_usable(client)


async def test_invalid_utf8_is_a_parse_error(connect: Any) -> None:
    client = await connect()
    await client.send(b'{"jsonrpc":"2.0","id":1,"method":"status.publish","params":\xff\xfe}\n')
    response = await client.receive()
    assert response["error"]["code"] == -32700
    assert "utf-8" in response["error"]["message"]
    await assert_still_usable(client)


async def test_request_without_method(connect: Any) -> None:
    client = await connect()
    await client.send(b'{"jsonrpc":"2.0","id":5}\n')
    response = await client.receive()
    assert response == {
        "jsonrpc": "2.0",
        "id": 5,
        "error": {"code": -32600, "message": "method is missing"},
    }


async def test_unknown_method(connect: Any) -> None:
    client = await connect()
    response = await client.request("tasks.explode")
    assert response["error"]["code"] == -32601
    assert response["error"]["data"] == {"method": "tasks.explode"}


async def test_wrong_and_missing_params_name_the_field(connect: Any) -> None:
    client = await connect()
    missing = await client.request("status.publish", {"level": "info"})
    assert missing["error"]["code"] == -32602
    assert missing["error"]["data"]["field"] == "message"
    wrong = await client.request("status.recent", {"since": "yesterday"})
    assert wrong["error"]["data"] == {
        "field": "since",
        "reason": "must be an integer, not 'yesterday'",
    }
    negative = await client.request("status.recent", {"since": -1})
    assert negative["error"]["data"]["field"] == "since"
    extra = await client.request("daemon.info", {"verbose": True})
    assert extra["error"]["data"] == {"field": "verbose", "reason": "unknown field"}


async def test_bad_level_is_refused_and_nothing_is_published(connect: Any) -> None:
    client = await connect()
    before = (await client.call("daemon.info"))["status_seq"]
    response = await client.request("status.publish", {"level": "panic", "message": "x"})
    assert response["error"]["code"] == -32602
    assert response["error"]["data"]["field"] == "level"
    assert "info, warning, error, success" in response["error"]["data"]["reason"]
    assert (await client.call("daemon.info"))["status_seq"] == before


async def test_long_message_is_cut_to_200_characters(connect: Any) -> None:
    client = await connect()
    seq = (await client.call("status.publish", {"level": "info", "message": "é" * 250}))["seq"]
    recent = await client.call("status.recent", {"since": seq - 1})
    (message,) = recent["messages"]
    assert message["message"] == "é" * 197 + "..."
    assert message["seq"] == seq


async def test_empty_batch_and_mixed_batch(connect: Any) -> None:
    client = await connect()
    await client.send(b"[]\n")
    empty = await client.receive()
    assert empty["error"]["code"] == -32600
    await client.send(
        b'[{"jsonrpc":"2.0","id":1,"method":"daemon.info"},'
        b'{"jsonrpc":"2.0","method":"status.publish","params":{"level":"info","message":"n"}},'
        b'{"jsonrpc":"2.0","id":2,"method":"nope"}, 7]\n'
    )
    batch = await client.receive()
    assert [r.get("id") for r in batch] == [1, 2, None]
    assert "result" in batch[0]
    assert batch[1]["error"]["code"] == -32601
    assert batch[2]["error"]["code"] == -32600
    # The notification in the batch was run, though not answered.
    recent = await client.call("status.recent")
    assert recent["messages"][-1]["message"] == "n"


async def test_batch_of_only_notifications_gets_no_answer(connect: Any) -> None:
    client = await connect()
    await client.send(b'[{"jsonrpc":"2.0","method":"daemon.info"}]\n' + REQUEST % 9)
    assert (await client.receive())["id"] == 9


async def test_3_mib_line_is_refused_and_the_connection_closed(
    daemon: Daemon, connect: Any
) -> None:
    client = await connect()
    other = await connect()
    big = b'{"jsonrpc":"2.0","id":1,"method":"status.publish","params":{"message":"'
    big += b"x" * (3 * 1024 * 1024) + b'"}}\n'
    # The daemon may close before we finish sending: that is the point.
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            with contextlib.suppress(trio.BrokenResourceError):
                await client.send(big)

        nursery.start_soon(send)
        response = await client.receive()
        assert response["id"] is None
        assert response["error"]["code"] == -32600
        assert response["error"]["data"] == {"limit": 1024 * 1024}
        try:
            await client.receive()
            raise AssertionError("connection should be closed")
        except (EOFError, trio.BrokenResourceError):
            pass
    # Nothing was published and other clients are unaffected.
    assert (await other.call("daemon.info"))["status_seq"] == daemon.channel.last_seq == 1


async def test_client_that_sends_nothing_does_not_block_others(connect: Any) -> None:
    silent = await connect()
    busy = await connect()
    for _ in range(3):
        await assert_still_usable(busy)
    del silent


async def test_client_that_disconnects_mid_request(daemon: Daemon, connect: Any) -> None:
    quitter = await RawClient.connect(daemon.config.socket)
    await quitter.send(b'{"jsonrpc":"2.0","id":1,"method":"status.publish","params":{"lev')
    await quitter.aclose()
    # A complete request whose answer nobody will read.
    ghost = await RawClient.connect(daemon.config.socket)
    await ghost.send(REQUEST % 1)
    await ghost.aclose()
    observer = await connect()
    await assert_still_usable(observer)
    with trio.fail_after(5):
        await daemon.unix.wait_connections_at_most(1)
    assert daemon.channel.last_seq == 1


async def test_pipelined_requests_are_answered_in_order(connect: Any) -> None:
    client = await connect()
    await client.send(b"".join(REQUEST % n for n in range(1, 501)))
    ids = [(await client.receive())["id"] for _ in range(500)]
    assert ids == list(range(1, 501))


async def test_connection_limit(short_tmp: Path) -> None:
    config = attrs.evolve(make_config(short_tmp), max_connections=2)
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(run, config)
        first = await RawClient.connect(config.socket)
        second = await RawClient.connect(config.socket)
        await assert_still_usable(first)
        await assert_still_usable(second)
        third = await RawClient.connect(config.socket)
        refused = await third.receive()
        assert refused["error"]["code"] == -32004
        assert "max_connections = 2" in refused["error"]["message"]
        try:
            await third.receive()
            raise AssertionError("refused connection should be closed")
        except EOFError:
            pass
        await first.aclose()
        with trio.fail_after(5):
            await daemon.unix.wait_connections_at_most(1)
        fourth = await RawClient.connect(config.socket)
        await assert_still_usable(fourth)
        for client in (second, third, fourth):
            await client.aclose()
        daemon.request_stop()


async def test_subscribers_receive_in_fifo_order(connect: Any) -> None:
    subscribers = [await connect() for _ in range(5)]
    for subscriber in subscribers:
        await subscriber.call("subscribe", {"status": True})
    publisher = await connect()
    for n in range(50):
        await publisher.call("status.publish", {"level": "info", "message": f"m{n}"})
    for subscriber in subscribers:
        got = [(await subscriber.receive())["params"]["message"] for _ in range(50)]
        assert got == [f"m{n}" for n in range(50)]


async def test_unsubscribe(connect: Any) -> None:
    client = await connect()
    subscription = (await client.call("subscribe"))["subscription"]
    assert await client.call("unsubscribe", {"subscription": subscription}) == {"success": True}
    missing = await client.request("unsubscribe", {"subscription": subscription})
    assert missing["error"]["code"] == -32001
    await client.call("status.publish", {"level": "info", "message": "unseen"})
    # The next thing on the wire is the reply to this call, not a push.
    await client.send(REQUEST % 77)
    assert (await client.receive())["id"] == 77


async def test_subscribe_since_replays_and_reports_the_gap(daemon: Daemon, connect: Any) -> None:
    for n in range(150):
        daemon.channel.publish_status("info", f"m{n}")
    client = await connect()
    await client.call("subscribe", {"since": 1})
    dropped = await client.receive()
    assert dropped["method"] == "dropped"
    # seq 1 is "System ready"; m0..m49 (seq 2..51) fell out of the 100-message ring.
    assert dropped["params"] == {"stream": "status", "count": 50}
    first = await client.receive()
    assert (first["params"]["seq"], first["params"]["message"]) == (52, "m50")


async def test_stalled_subscriber_never_blocks_the_daemon(daemon: Daemon, connect: Any) -> None:
    stalled = await connect()
    await stalled.call("subscribe")
    healthy = await connect()
    await healthy.call("subscribe")
    publisher = await connect()
    received: list[str] = []

    async def read_healthy() -> None:
        while len(received) < 10_000:
            message = await healthy.receive()
            if message.get("method") == "status":
                received.append(message["params"]["message"])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_healthy)
        with trio.fail_after(60):
            for n in range(10_000):
                # A few in flight at a time, as a real publisher would send them.
                result = await publisher.call(
                    "status.publish", {"level": "info", "message": f"m{n:05d}"}
                )
                assert result["seq"] == n + 2
    assert received == [f"m{n:05d}" for n in range(10_000)]

    # Now read the stalled one: some messages, then a drop notice, then the newest.
    messages: list[dict[str, Any]] = []
    with trio.fail_after(30):
        while not messages or messages[-1].get("params", {}).get("message") != "m09999":
            messages.append(await stalled.receive())
    notices = [m for m in messages if m["method"] == "dropped"]
    statuses = [m["params"]["seq"] for m in messages if m["method"] == "status"]
    assert notices, "a stalled subscriber must be told it lost messages"
    assert statuses == sorted(statuses)
    lost = sum(n["params"]["count"] for n in notices)
    assert lost + len(statuses) == 10_000
    # The newest the history holds: the daemon's own first message stays in it (a user
    # past their share of a full history pushes out their own oldest), so 99 of the flood.
    assert statuses[-99:] == list(range(9_903, 10_002))
    assert [m.seq for m in daemon.channel.recent()[0]] == [1, *range(9_903, 10_002)]


async def test_reply_backlog_pauses_only_that_client(daemon: Daemon, connect: Any) -> None:
    # A client that sends many requests and never reads its replies.
    greedy = await trio.open_unix_socket(str(daemon.config.socket))
    flood = b"".join(REQUEST % n for n in range(200_000))
    sent = 0
    with trio.move_on_after(2):
        while sent < len(flood):
            await greedy.send_all(flood[sent : sent + 65536])
            sent += 65536
    assert sent < len(flood), "the daemon should have stopped reading the flood"
    # What it holds for the client stays within max_pending_replies: replies queued one
    # by one, and at most the rest of one write of as many that the socket had no room for.
    [session] = [s for s in daemon.unix._sessions if s.statistics().pending_replies]
    reply = len(jsonrpc.encode_line(await (await connect()).request("daemon.info")))
    held = sum(map(len, session._replies))
    assert held <= 2 * DEFAULT_MAX_PENDING_REPLIES * (reply + 10)
    other = await connect()
    await assert_still_usable(other)
    # Every reply is still there, none dropped, once the client reads.
    decoder_lines = 0
    buffer = b""
    with trio.fail_after(30):
        while decoder_lines < 1000:
            buffer += await greedy.receive_some(65536)
            *complete, buffer = buffer.split(b"\n")
            for line in complete:
                assert json.loads(line)["id"] == decoder_lines
                decoder_lines += 1
    await greedy.aclose()


async def test_replies_and_pushes_keep_their_order_when_the_socket_fills(
    daemon: Daemon, connect: Any
) -> None:
    # The reader sends replies itself, the writer sends pushes and the rest of any write
    # the socket had no room for. A client that reads slowly, in small pieces, keeps the
    # socket going from full to drained while both tasks have output: the bytes must still
    # leave whole and in order.
    client = await connect()
    await client.call("subscribe")
    publisher = await connect()
    requests = 20000
    flood = b"".join(REQUEST % n for n in range(requests))
    ids: list[int] = []
    statuses: list[str] = []
    lost = 0

    async def publish() -> None:
        for n in range(300):
            await publisher.call("status.publish", {"level": "info", "message": f"p{n:03d}"})

    async def read_slowly() -> None:
        nonlocal lost
        decoder = LineDecoder(1 << 20)
        while len(ids) < requests or not statuses or statuses[-1] != "p299":
            data = await client.stream.receive_some(997)
            assert data, "the daemon closed the connection"
            for line in decoder.feed(data):
                message = json.loads(line)
                if "id" in message:
                    ids.append(message["id"])
                elif message["method"] == "status":
                    statuses.append(message["params"]["message"])
                elif message["method"] == "dropped":
                    lost += message["params"]["count"]

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send, flood)
            nursery.start_soon(publish)
            nursery.start_soon(read_slowly)
    assert ids == list(range(requests))
    assert statuses == sorted(statuses)
    assert len(statuses) + lost == 300
