"""The WebSocket gateway end to end: a real daemon, real TCP on 127.0.0.1, and clients from
the independent ``websockets`` package (run in threads beside the daemon's trio loop)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from typing import Any

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from statusd.config import WebSocketConfig
from statusd.daemon import Daemon, run
from statusd.protocol import websocket as rules
from statusd.state.status import Level
from statusd.transports import websocket as transport
from tests.conftest import RUNNER, RawClient
from tests.http_servers import HTTPTestServer, Request, Responder, http_server, serve_data, status
from tests.websocket_clients import (
    TIMEOUT,
    RpcClient,
    address,
    close_of,
    make_token,
    nobody_ws_daemon,
    open_ws,
    port,
    raw_handshake,
    values,
    ws_config,
    ws_daemon,
)

__all__ = ["http_server", "nobody_ws_daemon", "ws_daemon"]


async def in_thread(function: Any, *args: Any) -> Any:
    with trio.fail_after(60):
        return await trio.to_thread.run_sync(function, *args)


def refused(daemon: Daemon, token: str | None, path: str = "/ws", **options: Any) -> Any:
    """The HTTP status and body of a refused handshake."""
    with pytest.raises(InvalidStatus) as caught:
        open_ws(daemon, token, path, **options).close()
    response = caught.value.response
    return response.status_code, response.body.decode()


# -- /ws: the JSON-RPC protocol --------------------------------------------------------------


async def test_jsonrpc_over_websocket(ws_daemon: Daemon) -> None:
    token = (await make_token(ws_daemon))["token"]

    def session() -> Any:
        with open_ws(ws_daemon, token) as ws:
            client = RpcClient(ws)
            info = client.call("daemon.info")
            client.call("subscribe", {"status": True})
            seq = client.call("status.publish", {"level": "info", "message": "hello"})["seq"]
            push = client.next_push()
            return info, seq, push

    info, seq, push = await in_thread(session)
    assert info["user"] == RUNNER
    assert info["admin"] is True
    assert info["websocket"] == address(ws_daemon)
    assert push == {
        "jsonrpc": "2.0",
        "method": "status",
        "params": {**push["params"], "seq": seq, "message": "hello"},
    }


async def test_daemon_info_shows_no_websocket_when_off(daemon: Daemon, connect: Any) -> None:
    client = await connect()
    assert (await client.call("daemon.info"))["websocket"] is None
    assert daemon.websocket is None


async def test_malformed_json_gets_parse_error_and_the_connection_stays(ws_daemon: Daemon) -> None:
    token = (await make_token(ws_daemon))["token"]

    def session() -> Any:
        with open_ws(ws_daemon, token) as ws:
            ws.send("{not json")
            error = json.loads(ws.recv(TIMEOUT))
            ws.send(b'[{"jsonrpc":"2.0","method":"tasks.summary","id":7}]')
            batch = json.loads(ws.recv(TIMEOUT))
            return error, batch

    error, batch = await in_thread(session)
    assert error["error"]["code"] == -32700
    assert error["id"] is None
    assert batch[0]["id"] == 7
    assert batch[0]["result"]["total"] == 0


async def test_oversize_message_closes_with_1009(ws_daemon: Daemon) -> None:
    token = (await make_token(ws_daemon))["token"]

    def session() -> Any:
        with open_ws(ws_daemon, token, max_size=None) as ws:
            ws.send("x" * (ws_daemon.config.limits.max_request_bytes + 1))
            with pytest.raises(ConnectionClosed) as caught:
                ws.recv(TIMEOUT)
            assert caught.value.rcvd is not None
            return caught.value.rcvd.code

    assert await in_thread(session) == 1009
    assert ws_daemon.channel.last_seq == 1  # "System ready": nothing ran


# -- refusals before accept -------------------------------------------------------------------


async def test_refusals(ws_daemon: Daemon) -> None:
    token = (await make_token(ws_daemon))["token"]
    revoked = await make_token(ws_daemon)
    client = await RawClient.connect(ws_daemon.config.socket)
    await client.call("tokens.revoke", {"token_id": revoked["token_id"]})
    await client.aclose()
    wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    bad_host = socket.create_connection(("127.0.0.1", port(ws_daemon)))

    def attempts() -> dict[str, Any]:
        return {
            "missing": refused(ws_daemon, None),
            "wrong": refused(ws_daemon, wrong),
            "garbage": refused(ws_daemon, "not-a-token"),
            "revoked": refused(ws_daemon, revoked["token"]),
            "origin": refused(
                ws_daemon, token, additional_headers={"Origin": "https://evil.example"}
            ),
            "path": refused(ws_daemon, token, "/nope"),
            "path_query_token": refused(ws_daemon, None, f"/nope?token={token}"),
        }

    results = await in_thread(attempts)

    def wrong_host() -> Any:
        with pytest.raises(InvalidStatus) as caught:
            connect(
                f"ws://rebound.example:{port(ws_daemon)}/ws",
                sock=bad_host,
                additional_headers={"Authorization": f"Bearer {token}"},
                open_timeout=TIMEOUT,
            )
        return caught.value.response.status_code, caught.value.response.body.decode()

    results["host"] = await in_thread(wrong_host)
    assert results["missing"][0] == 401
    assert "token is required" in results["missing"][1]
    for name in ("wrong", "garbage", "revoked"):
        assert results[name][0] == 401, name
        assert "not valid" in results[name][1], name
    assert results["origin"][0] == 403
    assert "allowed_origins" in results["origin"][1]
    assert results["host"][0] == 403
    assert "rebound.example" in results["host"][1]
    assert results["path"][0] == 404
    assert results["path_query_token"][0] == 404
    # No refused handshake ran anything or counted as a connection.
    assert ws_daemon.channel.last_seq == 1
    assert ws_daemon.websocket is not None
    assert ws_daemon.websocket.connections == 0


async def test_host_forms_that_are_ours(ws_daemon: Daemon) -> None:
    token = (await make_token(ws_daemon))["token"]
    number = port(ws_daemon)
    accepted = []
    for host in ("localhost", f"localhost:{number}", "127.0.0.1", "[::1]:9", "LOCALHOST."):
        sock, head = await in_thread(raw_handshake, number, f"/ws?token={token}", host)
        sock.close()
        accepted.append(head.split(b"\r\n", 1)[0])
    assert all(line == b"HTTP/1.1 101 " or b" 101 " in line for line in accepted), accepted
    for host in ("127.0.0.1.nip.io", "localhost:http", "[::1"):
        sock, head = await in_thread(raw_handshake, number, f"/ws?token={token}", host)
        sock.close()
        assert b" 403 " in head.split(b"\r\n", 1)[0], host


async def test_allowed_origin_is_read_live(ws_daemon: Daemon) -> None:
    token = (await make_token(ws_daemon))["token"]
    origin = {"Origin": "http://localhost:3000"}
    assert (await in_thread(lambda: refused(ws_daemon, token, additional_headers=origin)))[0] == 403
    # What a SIGHUP reload does: the daemon's config changes, the server reads it next time.
    ws_daemon.config = attrs.evolve(
        ws_daemon.config,
        websocket=WebSocketConfig(
            ws_daemon.config.websocket.listen, allowed_origins=("http://localhost:3000",)
        ),
    )

    def accepted() -> Any:
        with open_ws(ws_daemon, token, additional_headers=origin) as ws:
            return RpcClient(ws).call("tasks.summary")["total"]

    assert await in_thread(accepted) == 0


async def test_garbled_host_costs_only_that_connection(ws_daemon: Daemon) -> None:
    sock = await in_thread(socket.create_connection, ("127.0.0.1", port(ws_daemon)))
    request = (
        b"GET /ws HTTP/1.1\r\nHost: \xff\xfe\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    sock.sendall(request)
    sock.settimeout(TIMEOUT)
    answer = await in_thread(sock.recv, 4096)
    assert answer == b""
    sock.close()
    token = (await make_token(ws_daemon))["token"]

    def still_serving() -> Any:
        with open_ws(ws_daemon, token) as ws:
            return RpcClient(ws).call("tasks.summary")["total"]

    assert await in_thread(still_serving) == 0


# -- scopes ------------------------------------------------------------------------------------


async def test_read_scope_cannot_control(ws_daemon: Daemon) -> None:
    token = (await make_token(ws_daemon, scope="read"))["token"]

    def session() -> Any:
        with open_ws(ws_daemon, token) as ws:
            client = RpcClient(ws)
            return (
                client.call("tasks.list"),
                client.call("subscribe", {"status": True}),
                client.request("status.publish", {"level": "info", "message": "x"}),
                client.request("tasks.cancel", {"task_id": "t1"}),
                client.request("no.such.method"),
            )

    listed, subscribed, publish, cancel, unknown = await in_thread(session)
    assert listed["tasks"] == []
    assert subscribed["subscription"]
    for answer in (publish, cancel):
        assert answer["error"]["code"] == -32002
        assert "scope control" in answer["error"]["message"]
    assert unknown["error"]["code"] == -32601
    assert ws_daemon.channel.last_seq == 1


async def test_token_methods_are_refused_over_websocket(ws_daemon: Daemon) -> None:
    token = (await make_token(ws_daemon, scope="control"))["token"]

    def session() -> Any:
        with open_ws(ws_daemon, token) as ws:
            client = RpcClient(ws)
            return [
                client.request("tokens.create", {}),
                client.request("tokens.list"),
                client.request("tokens.revoke", {"token_id": "x"}),
            ]

    for answer in await in_thread(session):
        assert answer["error"]["code"] == -32002
        assert "only available on the Unix socket" in answer["error"]["message"]
    assert len(ws_daemon.api.tokens or ()) == 1


async def test_revoking_a_token_closes_its_connections(ws_daemon: Daemon) -> None:
    made = await make_token(ws_daemon)
    other = (await make_token(ws_daemon))["token"]
    opened = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def session() -> Any:
        with open_ws(ws_daemon, made["token"]) as ws, open_ws(ws_daemon, other) as kept:
            RpcClient(ws).call("tasks.summary")
            trio.from_thread.run_sync(opened.set, trio_token=token)
            with pytest.raises(ConnectionClosed) as caught:
                ws.recv(TIMEOUT)
            assert caught.value.rcvd is not None
            # The other token's connection is untouched.
            return (
                caught.value.rcvd.code,
                caught.value.rcvd.reason,
                RpcClient(kept).call("tasks.summary")["total"],
            )

    async with trio.open_nursery() as nursery:
        result: list[Any] = []

        async def run_session() -> None:
            result.append(await in_thread(session))

        nursery.start_soon(run_session)
        await opened.wait()
        client = await RawClient.connect(ws_daemon.config.socket)
        await client.call("tokens.revoke", {"token_id": made["token_id"]})
        await client.aclose()
    assert result == [(1008, "token revoked", 0)]


# -- limits ------------------------------------------------------------------------------------


async def test_max_connections_refuses_the_next_with_busy(
    nursery: trio.Nursery, short_tmp: Any
) -> None:
    daemon: Daemon = await nursery.start(run, ws_config(short_tmp, max_connections=2))
    token = (await make_token(daemon))["token"]

    def session() -> Any:
        with open_ws(daemon, token) as one, open_ws(daemon, token) as two:
            RpcClient(one).call("tasks.summary")
            RpcClient(two).call("tasks.summary")
            with open_ws(daemon, token) as three:
                busy = json.loads(three.recv(TIMEOUT))
                with pytest.raises(ConnectionClosed) as caught:
                    three.recv(TIMEOUT)
                assert caught.value.rcvd is not None
                return busy, caught.value.rcvd.code

    busy, code = await in_thread(session)
    assert busy["error"]["code"] == -32004
    assert code == 1013
    daemon.request_stop()
    await daemon.wait_stopped()


async def test_client_that_vanishes_is_cleaned_up(ws_daemon: Daemon) -> None:
    token = (await make_token(ws_daemon))["token"]
    server = ws_daemon.websocket
    assert server is not None
    sock, head = await in_thread(raw_handshake, port(ws_daemon), f"/ws?token={token}")
    assert b" 101 " in head
    await trio.testing.wait_all_tasks_blocked()
    assert server.connections == 1
    sock.close()  # no close frame, just gone
    with trio.fail_after(TIMEOUT):
        await server.wait_connections_at_most(0)


async def test_silent_client_is_dropped_after_a_ping(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, short_tmp: Any
) -> None:
    daemon: Daemon = await nursery.start(run, ws_config(short_tmp))
    token = (await make_token(daemon))["token"]
    server = daemon.websocket
    assert server is not None
    stream = await trio.open_tcp_stream("127.0.0.1", port(daemon))
    request = (
        f"GET /ws?token={token} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    )
    await stream.send_all(request.encode())
    received = b""
    start = trio.current_time()
    # Read (so the ping can be written) but never answer it.
    while chunk := await stream.receive_some(4096):
        received += chunk
    assert b" 101 " in received
    assert b"\x89" in received  # a ping frame came
    waited = trio.current_time() - start
    assert transport.PING_INTERVAL + transport.PING_TIMEOUT <= waited < 60
    await server.wait_connections_at_most(0)
    await stream.aclose()
    daemon.request_stop()
    await daemon.wait_stopped()


async def test_handshake_must_come_in_time(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, short_tmp: Any
) -> None:
    daemon: Daemon = await nursery.start(run, ws_config(short_tmp))
    stream = await trio.open_tcp_stream("127.0.0.1", port(daemon))
    start = trio.current_time()
    assert await stream.receive_some(4096) == b""
    assert trio.current_time() - start == pytest.approx(transport.HANDSHAKE_TIMEOUT, abs=0.1)
    await stream.aclose()
    daemon.request_stop()
    await daemon.wait_stopped()


async def test_stopping_the_daemon_closes_with_going_away(ws_daemon: Daemon) -> None:
    token = (await make_token(ws_daemon))["token"]
    opened = trio.Event()
    trio_token = trio.lowlevel.current_trio_token()

    def session() -> Any:
        with open_ws(ws_daemon, token) as ws:
            client = RpcClient(ws)
            client.call("subscribe", {"status": True})
            trio.from_thread.run_sync(opened.set, trio_token=trio_token)
            pushes: list[Any] = []
            code, _reason = close_of(ws, pushes)
            return code, [p["params"]["message"] for p in client.pushes + pushes]

    async with trio.open_nursery() as nursery:
        result: list[Any] = []

        async def run_session() -> None:
            result.append(await in_thread(session))

        nursery.start_soon(run_session)
        await opened.wait()
        ws_daemon.request_stop()
    code, messages = result[0]
    assert code == 1001
    assert messages == ["Stopping operations..."]


# -- fan-out ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "frames"), [("", 6), ("&coalesce=1", 1)])
async def test_coalescing_is_asked_for(ws_daemon: Daemon, query: str, frames: int) -> None:
    token = (await make_token(ws_daemon))["token"]
    before = ws_daemon.channel.last_seq
    for n in range(5):
        ws_daemon.channel.publish_status(Level.INFO, f"burst {n}")

    def session() -> list[Any]:
        with connect(f"ws://{address(ws_daemon)}/ws?token={token}{query}") as ws:
            # The answer and the five held messages are pending at once.
            request = {"jsonrpc": "2.0", "method": "subscribe", "id": 1}
            ws.send(json.dumps({**request, "params": {"status": True, "since": before}}))
            received: list[str | bytes] = []
            while len([v for frame in received for v in values(frame)]) < 6:
                received.append(ws.recv(TIMEOUT))
            return received

    received = await in_thread(session)
    assert len(received) == frames
    messages = [v for frame in received for v in values(frame)]
    assert messages[0]["id"] == 1
    assert [v["params"]["message"] for v in messages[1:]] == [f"burst {n}" for n in range(5)]
    if frames == 1:
        assert isinstance(json.loads(received[0]), list)


async def test_hundred_subscribers_get_the_same_stream_in_order(
    nursery: trio.Nursery, short_tmp: Any
) -> None:
    daemon: Daemon = await nursery.start(run, ws_config(short_tmp, status_history=1000))
    token = (await make_token(daemon, scope="read"))["token"]
    subscribers, count = 100, 300
    ready = trio.Event()
    trio_token = trio.lowlevel.current_trio_token()
    url = f"ws://{address(daemon)}/ws"
    headers = {"Authorization": f"Bearer {token}"}

    joined: list[int] = []

    def join() -> None:
        joined.append(1)
        if len(joined) == subscribers:
            ready.set()

    async def subscriber() -> list[int]:
        async with websockets.connect(url, additional_headers=headers) as ws:
            await ws.send('{"jsonrpc":"2.0","method":"subscribe","params":{"status":true},"id":1}')
            # Nothing is published before everyone joined: the first frame is the answer.
            assert values(await asyncio.wait_for(ws.recv(), TIMEOUT))[0]["id"] == 1
            trio.from_thread.run_sync(join, trio_token=trio_token)
            seqs: list[int] = []
            while len(seqs) < count:
                for value in values(await asyncio.wait_for(ws.recv(), TIMEOUT)):
                    assert value.get("method") == "status", value
                    seqs.append(value["params"]["seq"])
            return seqs

    async def everyone() -> list[list[int]]:
        return await asyncio.gather(*(subscriber() for _ in range(subscribers)))

    result: list[Any] = []

    async def run_subscribers() -> None:
        result.append(await in_thread(asyncio.run, everyone()))

    async with trio.open_nursery() as inner:
        inner.start_soon(run_subscribers)
        with trio.fail_after(30):
            await ready.wait()
        first = daemon.channel.last_seq + 1
        for n in range(count):
            daemon.channel.publish_status(Level.INFO, f"message {n}")
            if n % 10 == 9:
                await trio.lowlevel.checkpoint()
    expected = list(range(first, first + count))
    assert len(result[0]) == subscribers
    assert all(seqs == expected for seqs in result[0])
    daemon.request_stop()
    await daemon.wait_stopped()


@attrs.define
class _Target:
    seq: int = 0
    reached: trio.Event = attrs.Factory(trio.Event)


async def test_stalled_subscriber_gets_dropped_notice_while_others_keep_up(
    nursery: trio.Nursery, short_tmp: Any
) -> None:
    daemon: Daemon = await nursery.start(run, ws_config(short_tmp, status_history=200))
    token = (await make_token(daemon, scope="read"))["token"]
    url = f"ws://{address(daemon)}/ws"
    headers = {"Authorization": f"Bearer {token}"}
    subscribe = '{"jsonrpc":"2.0","method":"subscribe","params":{"status":true},"id":1}'
    ready = trio.Event()
    trio_token = trio.lowlevel.current_trio_token()
    published = threading.Event()
    count = 3000
    joined: list[str] = []

    # The highest seq each healthy client has seen; the publisher waits for all of them
    # after each burst, so "healthy" means healthy even on a loaded machine.
    seen: dict[int, int] = {}
    caught_up = _Target()

    def joined_one(name: str) -> None:
        joined.append(name)
        if len(joined) == 4:
            ready.set()

    def saw(index: int, seq: int) -> None:
        seen[index] = seq
        if len(seen) == 3 and min(seen.values()) >= caught_up.seq:
            caught_up.reached.set()

    async def healthy(index: int) -> list[Any]:
        async with websockets.connect(url, additional_headers=headers) as ws:
            await ws.send(subscribe)
            got = values(await asyncio.wait_for(ws.recv(), TIMEOUT))
            trio.from_thread.run_sync(joined_one, "healthy", trio_token=trio_token)
            while not any(v.get("params", {}).get("message") == "END" for v in got[-5:]):
                got.extend(values(await asyncio.wait_for(ws.recv(), TIMEOUT)))
                trio.from_thread.run_sync(
                    saw, index, got[-1]["params"]["seq"], trio_token=trio_token
                )
            return got

    async def stalled() -> list[Any]:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", int(address(daemon).rpartition(":")[2])))
        async with websockets.connect(
            url, sock=sock, additional_headers=headers, max_queue=1, max_size=None
        ) as ws:
            await ws.send(subscribe)
            got = values(await asyncio.wait_for(ws.recv(), TIMEOUT))
            trio.from_thread.run_sync(joined_one, "stalled", trio_token=trio_token)
            # Read nothing until everything is published.
            await asyncio.get_running_loop().run_in_executor(None, published.wait, 60)
            while not any(v.get("params", {}).get("message") == "END" for v in got[-5:]):
                got.extend(values(await asyncio.wait_for(ws.recv(), TIMEOUT)))
            return got

    async def everyone() -> list[list[Any]]:
        return list(await asyncio.gather(healthy(0), healthy(1), healthy(2), stalled()))

    result: list[Any] = []

    async def run_clients() -> None:
        result.append(await in_thread(asyncio.run, everyone()))

    async with trio.open_nursery() as inner:
        inner.start_soon(run_clients)
        with trio.fail_after(30):
            await ready.wait()
        first = daemon.channel.last_seq + 1
        for n in range(count):
            message = daemon.channel.publish_status(Level.INFO, f"message {n} " + "x" * 150)
            if n % 20 == 19:
                assert message is not None
                caught_up.seq, caught_up.reached = message.seq, trio.Event()
                if len(seen) < 3 or min(seen.values()) < message.seq:
                    with trio.fail_after(TIMEOUT):
                        await caught_up.reached.wait()
        daemon.channel.publish_status(Level.INFO, "END")
        published.set()
    *good, slow = result[0]
    expected = list(range(first, first + count + 1))
    for got in good:
        assert [v["params"]["seq"] for v in got if v.get("method") == "status"] == expected
        assert not any(v.get("method") == "dropped" for v in got)
    notices = [v["params"] for v in slow if v.get("method") == "dropped"]
    seqs = [v["params"]["seq"] for v in slow if v.get("method") == "status"]
    assert notices
    assert all(n["stream"] == "status" for n in notices)
    assert len(seqs) + sum(n["count"] for n in notices) == count + 1
    assert seqs == sorted(seqs)
    assert seqs[-1] == expected[-1]
    daemon.request_stop()
    await daemon.wait_stopped()


# -- the seed's endpoints ----------------------------------------------------------------------


def gated(data: bytes, gate: trio.Event) -> Any:
    """Serve ``data`` once ``gate`` is set: the task stays running until the test says."""
    serve = serve_data(data)

    async def handler(request: Request, responder: Responder) -> None:
        await gate.wait()
        await serve(request, responder)

    return handler


async def test_bulk_process_endpoint_follows_a_real_download(
    ws_daemon: Daemon, http_server: HTTPTestServer
) -> None:
    gate = trio.Event()
    urls = [http_server.route(f"/f{n}.bin", gated(bytes([n]) * 50_000, gate)) for n in range(2)]
    client = await RawClient.connect(ws_daemon.config.socket)
    task_id = (await client.call("tasks.download", {"urls": urls, "batch_size": 1}))["task_id"]
    token = (await make_token(ws_daemon, scope="read"))["token"]
    trio_token = trio.lowlevel.current_trio_token()

    def session() -> Any:
        updates: list[Any] = []

        def answer(kind: str) -> Any:
            # The task may start (and say so) while the replies are asked for: its
            # job_updates can come before or between them.
            while True:
                message = json.loads(ws.recv(TIMEOUT))
                if message["type"] == kind:
                    return message
                updates.append(message)

        with open_ws(ws_daemon, token, f"/ws/bulk-process/{task_id}") as ws:
            connected = answer("connected")
            ws.send('{"type":"ping"}')
            pong = answer("pong")
            ws.send('{"type":"get_status"}')
            status_request = answer("status_request")
            ws.send('{"type":"dance"}')
            unknown = answer("error")
            trio.from_thread.run_sync(gate.set, trio_token=trio_token)
            while not updates or updates[-1]["status"] not in ("completed", "error"):
                updates.append(json.loads(ws.recv(TIMEOUT)))
            return connected, pong, status_request, unknown, updates

    try:
        connected, pong, status_request, unknown, updates = await in_thread(session)
    finally:
        await client.aclose()
    assert connected["type"] == "connected"
    assert connected["job_id"] == task_id
    assert connected["status"] == "connected"
    assert pong["type"] == "pong"
    assert pong["timestamp"].endswith("Z")
    assert status_request["type"] == "status_request"
    assert status_request["job_id"] == task_id
    assert status_request["task"]["id"] == task_id
    assert status_request["status"] in ("pending", "running")
    assert unknown["type"] == "error"
    assert "unknown message type 'dance'" in unknown["message"]
    assert {u["type"] for u in updates} == {"job_update"}
    assert {u["job_id"] for u in updates} == {task_id}
    kinds = [u["status"] for u in updates]
    assert "batch_update" in kinds
    assert kinds[-1] == "completed"
    assert updates[-1]["progress"] == 100.0
    assert updates[-1]["processed"] == 2


async def test_progress_endpoint_follows_a_topic_and_subscribed_jobs(
    ws_daemon: Daemon, http_server: HTTPTestServer
) -> None:
    gate = trio.Event()
    good = http_server.route("/good.bin", gated(b"g" * 10_000, gate))
    bad = http_server.route("/bad.bin", status(404))
    client = await RawClient.connect(ws_daemon.config.socket)
    in_topic = (await client.call("tasks.download", {"urls": [good], "topic": "news"}))["task_id"]
    other = (await client.call("tasks.download", {"urls": [good], "topic": "other"}))["task_id"]
    token = (await make_token(ws_daemon))["token"]
    trio_token = trio.lowlevel.current_trio_token()

    def answer(ws: Any) -> dict[str, Any]:
        # The topic's tasks are running (held at the gate), so their job_updates may come
        # before the answer to a request: skip those.
        while True:
            message: dict[str, Any] = json.loads(ws.recv(TIMEOUT))
            if message["type"] != "job_update":
                return message
            assert message["status"] not in ("completed", "error"), message

    def session() -> Any:
        with open_ws(ws_daemon, token, "/ws/progress/news") as ws:
            connected = answer(ws)
            ws.send(json.dumps({"type": "subscribe_job", "job_id": other}))
            subscribed = answer(ws)
            ws.send(json.dumps({"type": "get_status", "job_id": in_topic}))
            status_request = answer(ws)
            trio.from_thread.run_sync(gate.set, trio_token=trio_token)
            finished: dict[str, str] = {}
            while len(finished) < 2:
                update = json.loads(ws.recv(TIMEOUT))
                if update["status"] in ("completed", "error"):
                    finished[update["job_id"]] = update["status"]
            # A job of the topic created now is followed too.
            failing = trio.from_thread.run(
                client.call,
                "tasks.download",
                {"urls": [bad], "topic": "news"},
                trio_token=trio_token,
            )["task_id"]
            while True:
                update = json.loads(ws.recv(TIMEOUT))
                if update["job_id"] == failing and update["status"] == "error":
                    return connected, subscribed, status_request, finished, update

    connected, subscribed, status_request, finished, failed = await in_thread(session)
    assert connected["type"] == "connected"
    assert connected["topic_id"] == "news"
    assert subscribed["type"] == "subscribed"
    assert subscribed["job_id"] == other
    assert status_request["type"] == "status_request"
    assert status_request["job_id"] == in_topic
    assert finished == {in_topic: "completed", other: "completed"}
    assert failed["type"] == "job_update"
    assert failed["topic"] == "news"
    await client.aclose()


async def test_a_job_the_user_may_not_see_is_refused(
    nobody_ws_daemon: Daemon, http_server: HTTPTestServer
) -> None:
    url = http_server.route("/f.bin", serve_data(b"x"))
    client = await RawClient.connect(nobody_ws_daemon.config.socket)
    roots = (await client.call("tasks.download", {"urls": [url]}))["task_id"]
    await client.aclose()
    token = (await make_token(nobody_ws_daemon, username="nobody"))["token"]

    def attempts() -> Any:
        outcomes = []
        with open_ws(nobody_ws_daemon, token, f"/ws/bulk-process/{roots}") as ws:
            error = json.loads(ws.recv(TIMEOUT))
            with pytest.raises(ConnectionClosed) as caught:
                ws.recv(TIMEOUT)
            assert caught.value.rcvd is not None
            outcomes.append((error, caught.value.rcvd.code, caught.value.rcvd.reason))
        with open_ws(nobody_ws_daemon, token, "/ws/progress/any") as ws:
            assert json.loads(ws.recv(TIMEOUT))["type"] == "connected"
            ws.send(json.dumps({"type": "subscribe_job", "job_id": roots}))
            error = json.loads(ws.recv(TIMEOUT))
            with pytest.raises(ConnectionClosed) as caught:
                ws.recv(TIMEOUT)
            assert caught.value.rcvd is not None
            outcomes.append((error, caught.value.rcvd.code, caught.value.rcvd.reason))
        with open_ws(nobody_ws_daemon, token, "/ws/bulk-process/no-such-job") as ws:
            error = json.loads(ws.recv(TIMEOUT))
            with pytest.raises(ConnectionClosed) as caught:
                ws.recv(TIMEOUT)
            assert caught.value.rcvd is not None
            outcomes.append((error, caught.value.rcvd.code, caught.value.rcvd.reason))
        return outcomes

    for error, code, reason in await in_thread(attempts):
        assert error["type"] == "error"
        assert "not found" in error["message"]
        assert (code, reason) == (1008, "job not found")


# -- pure rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost:8765", "localhost"),
        ("[::1]:8765", "::1"),
        ("[::1]", "::1"),
        ("Example.ORG.", "example.org"),
        ("host:http", None),
        ("[::1", None),
        ("[::1]x", None),
        ("", None),
    ],
)
def test_host_name(header: str, name: str | None) -> None:
    assert rules.host_name(header) == name


def test_payloads_coalesce_in_order_and_splice_batches() -> None:
    lines = [b'{"a":1}\n', b'[{"id":1},{"id":2}]\n', b'{"b":2}\n']
    assert rules.payloads(lines, coalesce=False) == [b'{"a":1}', b'[{"id":1},{"id":2}]', b'{"b":2}']
    # Elements keep their newline inside an array: JSON whitespace, and no copy per line.
    assert rules.payloads(lines, coalesce=True) == [b'[{"a":1}\n,{"id":1},{"id":2},{"b":2}\n]']
    assert rules.payloads(lines[:1], coalesce=True) == [b'{"a":1}']
    big = [b'{"n":"' + b"x" * 100 + b'"}\n'] * 5
    decoded = [json.loads(p) for p in rules.payloads(big, coalesce=True, limit=250)]
    assert [len(v) for v in decoded[:2]] == [2, 2]
    assert decoded[2:] == [{"n": "x" * 100}]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
@pytest.mark.parametrize("coalesce", [False, True])
def test_frames_are_what_wsproto_reads(size: int, coalesce: bool) -> None:
    """Our frame bytes, parsed by wsproto as a client would: the same messages come out."""
    from wsproto.frame_protocol import FrameProtocol

    line = json.dumps({"text": "é" * (size // 2)}, ensure_ascii=False).encode() + b"\n"
    lines = [line, b'{"short":true}\n']
    reader = FrameProtocol(client=True, extensions=[])
    reader.receive_bytes(rules.encode_frames(lines, coalesce, rules.FrameCache()))
    got = []
    for frame in reader.received_frames():
        assert isinstance(frame.payload, str)
        got.extend(values(frame.payload))
    assert got == [json.loads(line), {"short": True}]


def test_parse_seed_messages() -> None:
    assert rules.parse_seed('{"type":"ping"}', "job") == rules.Ping()
    assert rules.parse_seed('{"type":"get_status"}', "job") == rules.GetStatus(None)
    assert rules.parse_seed('{"type":"subscribe_job","job_id":"t"}', "topic") == (
        rules.SubscribeJob("t")
    )
    for raw, problem in [
        ("{", "not valid JSON"),
        ("[]", "JSON object"),
        ('{"type":"subscribe_job","job_id":"t"}', "unknown message type 'subscribe_job'"),
        ('{"type":"get_status","job_id":5}', "job_id must be a string"),
    ]:
        bad = rules.parse_seed(raw, "job")
        assert isinstance(bad, rules.BadMessage)
        assert problem in bad.message
    missing = rules.parse_seed('{"type":"subscribe_job"}', "topic")
    assert isinstance(missing, rules.BadMessage)
    assert "needs a job_id" in missing.message


def test_bearer_token_and_routes() -> None:
    assert rules.bearer_token([(b"authorization", b"Bearer abc")], {}) == "abc"
    assert rules.bearer_token([(b"authorization", b"Basic abc")], {"token": ["q"]}) == "q"
    assert rules.bearer_token([], {}) is None
    assert rules.route("/ws?token=x") == rules.Route("rpc", None, {"token": ["x"]})
    assert rules.route("/ws/bulk-process/t%201") == rules.Route("job", "t 1", {})
    assert rules.route("/ws/progress/news/") == rules.Route("topic", "news", {})
    assert isinstance(rules.route("/ws/progress/"), rules.Refusal)
    assert rules.route("/ws?coalesce=1").coalesce  # type: ignore[union-attr]
    assert not rules.route("/ws").coalesce  # type: ignore[union-attr]
    assert rules.normalize_origin("HTTP://LocalHost:80/") == "http://localhost"


async def test_serves_on_a_socket_systemd_passed(ws_daemon: Daemon, nursery: trio.Nursery) -> None:
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    number = listening.getsockname()[1]
    assert ws_daemon.api.tokens is not None
    server = transport.WebSocketServer(
        ws_daemon.api, ws_daemon.streams, ws_daemon.api.tokens, lambda: ws_daemon.config
    )
    await nursery.start(server.serve, listening.detach())
    server.socket_access = await ws_daemon.unix.access()  # as the daemon does
    assert server.address == f"127.0.0.1:{number}"
    token = (await make_token(ws_daemon))["token"]

    def session() -> Any:
        with connect(f"ws://127.0.0.1:{number}/ws?token={token}", open_timeout=TIMEOUT) as ws:
            return RpcClient(ws).call("tasks.summary")["total"]

    assert await in_thread(session) == 0
    await server.shutdown(1.0)


async def test_reload_and_status_line_know_the_websocket(ws_daemon: Daemon) -> None:
    server = ws_daemon.websocket
    assert server is not None
    token = (await make_token(ws_daemon))["token"]
    sock, head = await in_thread(raw_handshake, port(ws_daemon), f"/ws?token={token}")
    assert b" 101 " in head
    await trio.testing.wait_all_tasks_blocked()
    assert "clients: 1;" in ws_daemon.status_line()
    sock.close()
    await server.wait_connections_at_most(0)
    changed = attrs.evolve(ws_daemon.config, max_connections=3)
    assert await ws_daemon.reload(lambda: changed)
    assert server.max_connections == 3


async def test_seed_sessions_get_bare_updates_and_seed_drop_notices() -> None:
    """The seed's endpoints share Session and TaskFeed with /ws; only the shapes differ."""
    from datetime import UTC, datetime

    from statusd.channel import StatusChannel
    from statusd.events import Streams
    from statusd.identity import Caller
    from statusd.session import Session
    from statusd.state.tasks import TaskInfo, TaskStatus, job_update

    streams = Streams(StatusChannel())
    caller = Caller(0, "root", True)
    seed = Session(caller, streams, transport="websocket", seed=True, max_pushes=2)
    rpc = Session(caller, streams, transport="websocket", max_pushes=2)
    for session in (seed, rpc):
        session.subscribe(tasks=frozenset({"t1"}))
    task = TaskInfo("t1", "n", "download", "root", TaskStatus.RUNNING, datetime.now(UTC))
    for n in range(3):
        streams.tasks.publish(task, job_update(task, "progress", "now", f"step {n}"))
    seed_out = [json.loads(line) for line in seed.take_pending()]
    rpc_out = [json.loads(line) for line in rpc.take_pending()]
    assert seed_out[0] == {"type": "dropped", "stream": "tasks", "count": 1}
    assert [m["message"] for m in seed_out[1:]] == ["step 1", "step 2"]
    assert all(m["type"] == "job_update" for m in seed_out[1:])
    assert rpc_out[0]["method"] == "dropped"
    assert [m["params"]["message"] for m in rpc_out[1:]] == ["step 1", "step 2"]


async def test_progress_endpoint_errors_keep_the_connection(ws_daemon: Daemon) -> None:
    token = (await make_token(ws_daemon))["token"]

    def session() -> list[Any]:
        with open_ws(ws_daemon, token, "/ws/progress/news") as ws:
            assert json.loads(ws.recv(TIMEOUT))["type"] == "connected"
            answers = []
            for message in ('{"type":"get_status"}', '{"type":"subscribe_job"}', "[1]", "{"):
                ws.send(message)
                answers.append(json.loads(ws.recv(TIMEOUT)))
            ws.send('{"type":"ping"}')
            answers.append(json.loads(ws.recv(TIMEOUT)))
            return answers

    *errors, pong = await in_thread(session)
    assert [e["type"] for e in errors] == ["error"] * 4
    assert "get_status needs a job_id" in errors[0]["message"]
    assert "subscribe_job needs a job_id" in errors[1]["message"]
    assert "JSON object" in errors[2]["message"]
    assert "not valid JSON" in errors[3]["message"]
    assert pong["type"] == "pong"
