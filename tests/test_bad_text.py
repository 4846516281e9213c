"""Text no UTF-8 can carry: a lone surrogate (``"\\ud800"``) is valid JSON but not Unicode.

Such a request is refused naming where the bad string is (-32600 for the envelope, -32602
with the field's path for params); a reply or push that would hold one (a string from
elsewhere) carries U+FFFD instead. Whatever happens, the connection, the other clients and
the daemon go on: each case is followed by a second, healthy client's ``daemon.info``.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import trio

from statusd.daemon import Daemon
from statusd.protocol import jsonrpc
from statusd.session import Session
from statusd.state.status import Level
from tests.conftest import RawClient, blocking_call
from tests.http_servers import HTTPTestServer, http_server, serve_data
from tests.websocket_clients import TIMEOUT, RpcClient, make_token, open_ws, values, ws_daemon

__all__ = ["http_server", "ws_daemon"]

LONE = "\\ud800"  # as it is written in the JSON text


def envelope(method: str, params: str | None = None, request_id: str = "1") -> bytes:
    text = f'{{"jsonrpc":"2.0","id":{request_id},"method":"{method}"'
    if params is not None:
        text += f',"params":{params}'
    return (text + "}\n").encode()


# (the line, the error code, the id it is answered with, data.field or None)
CASES = [
    pytest.param(envelope("daemon.info", request_id=f'"{LONE}"'), -32600, None, None, id="id"),
    pytest.param(envelope(LONE), -32600, 1, None, id="method"),
    pytest.param(envelope(f"daemon.{LONE}info"), -32600, 1, None, id="method-middle"),
    pytest.param(envelope("tasks.get", f'{{"{LONE}":"x"}}'), -32602, 1, LONE, id="param-name"),
    pytest.param(envelope("tasks.get", f'{{"task_id":"{LONE}"}}'), -32602, 1, "task_id", id="task"),
    pytest.param(
        envelope("tasks.cancel", f'{{"task_id":"a{LONE}"}}'), -32602, 1, "task_id", id="cancel"
    ),
    pytest.param(
        envelope("notifications.create", f'{{"type":"info","title":"{LONE}","message":"m"}}'),
        -32602,
        1,
        "title",
        id="title",
    ),
    pytest.param(
        envelope("notifications.create", '{"type":"info","title":"t","message":"\\udfff"}'),
        -32602,
        1,
        "message",
        id="message",
    ),
    pytest.param(
        envelope("status.publish", f'{{"level":"info","message":"x{LONE}"}}'),
        -32602,
        1,
        "message",
        id="publish",
    ),
    pytest.param(
        envelope("tasks.download", f'{{"items":[{{"url":"http://a/"}},{{"url":"{LONE}"}}]}}'),
        -32602,
        1,
        "items[1].url",
        id="nested",
    ),
    pytest.param(
        envelope("tasks.download", f'{{"urls":["http://a/"],"headers":{{"X-{LONE}":"v"}}}}'),
        -32602,
        1,
        f"headers.X-{LONE}",
        id="nested-name",
    ),
    # A low surrogate first, then a high one: both lone, although side by side.
    pytest.param(
        envelope("status.publish", '{"level":"info","message":"\\udc00\\ud800"}'),
        -32602,
        1,
        "message",
        id="reversed-pair",
    ),
]


async def healthy(daemon: Daemon) -> None:
    """A second client, connected afresh, gets a correct answer."""
    with trio.fail_after(10):
        other = await RawClient.connect(daemon.config.socket)
        try:
            info = await other.call("daemon.info")
            assert info["pid"] > 0
        finally:
            await other.aclose()


@pytest.mark.parametrize(("line", "code", "request_id", "field"), CASES)
async def test_lone_surrogate_is_refused_on_the_unix_socket(
    daemon: Daemon, connect: Any, line: bytes, code: int, request_id: Any, field: str | None
) -> None:
    client = await connect()
    await client.send(line)
    with trio.fail_after(10):
        response = await client.receive()
    assert response["id"] == request_id
    assert response["error"]["code"] == code
    assert "lone surrogate" in response["error"]["message"]
    if field is not None:
        assert response["error"]["data"]["field"] == field
    # The same connection goes on, and so does everyone else's.
    assert (await client.call("daemon.info"))["pid"] > 0
    await healthy(daemon)


async def test_surrogate_in_a_notification_request_is_dropped_silently(
    daemon: Daemon, connect: Any
) -> None:
    client = await connect()
    await client.send(f'{{"jsonrpc":"2.0","method":"{LONE}"}}\n'.encode())
    assert (await client.call("daemon.info"))["pid"] > 0
    await healthy(daemon)


async def test_batch_answers_each_entry(daemon: Daemon, connect: Any) -> None:
    client = await connect()
    good = '{"jsonrpc":"2.0","id":2,"method":"daemon.info"}'
    bad = '{"jsonrpc":"2.0","id":"' + LONE + '","method":"daemon.info"}'
    await client.send(f"[{bad},{good}]\n".encode())
    with trio.fail_after(10):
        answers = await client.receive()
    assert [a.get("id") for a in answers] == [None, 2]
    assert answers[0]["error"]["code"] == -32600
    assert "result" in answers[1]
    await healthy(daemon)


async def test_surrogate_pair_escape_is_a_valid_character(daemon: Daemon, connect: Any) -> None:
    client = await connect()
    await client.send(envelope("status.publish", '{"level":"info","message":"\\ud83d\\ude00 ok"}'))
    with trio.fail_after(10):
        response = await client.receive()
    assert "result" in response, response
    recent = await client.call("status.recent", {"since": response["result"]["seq"] - 1})
    assert recent["messages"][0]["message"] == "\U0001f600 ok"


async def test_bad_string_from_elsewhere_goes_out_replaced(daemon: Daemon, connect: Any) -> None:
    """A string no UTF-8 can carry may come from inside (a file name that is not UTF-8,
    decoded with surrogateescape): the push and the reply carry U+FFFD, nothing fails."""
    client = await connect()
    await client.call("subscribe", {"status": True})
    daemon.channel.publish_status(Level.INFO, "file b\udcffd.iso")
    with trio.fail_after(10):
        push = await client.receive()
    assert push["params"]["message"] == "file b\ufffdd.iso"
    recent = await client.call("status.recent")
    assert recent["messages"][-1]["message"] == "file b\ufffdd.iso"
    await healthy(daemon)


async def test_a_failing_answer_costs_one_request(
    daemon: Daemon, connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: whatever escapes the API (a bug) is -32603 for that message."""
    api_class = type(daemon.api)
    handle = api_class.handle_message

    async def buggy(api: Any, session: Any, raw: bytes | str) -> Any:
        if b"explode" in (raw if isinstance(raw, bytes) else raw.encode()):
            raise RuntimeError("a bug")
        return await handle(api, session, raw)

    monkeypatch.setattr(api_class, "handle_message", buggy)
    client = await connect()
    await client.send(envelope("explode"))
    with trio.fail_after(10):
        response = await client.receive()
    assert response["error"] == {"code": -32603, "message": "internal error"}
    assert (await client.call("daemon.info"))["pid"] > 0
    await healthy(daemon)


def test_real_daemon_process_survives_a_lone_surrogate(daemon_process: Any) -> None:
    """The line from the report, against the real command."""
    process = daemon_process()
    process.start()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(process.socket))
        sock.sendall(b'{"jsonrpc":"2.0","id":"\\ud800","method":"daemon.info"}\n')
        reply = sock.makefile("rb").readline()
    assert json.loads(reply)["error"]["code"] == -32600
    assert process.process.poll() is None
    assert blocking_call(process.socket, "daemon.info")["result"]["pid"] == process.process.pid


# -- the WebSocket -----------------------------------------------------------------------------


async def in_thread(function: Any, *args: Any) -> Any:
    with trio.fail_after(60):
        return await trio.to_thread.run_sync(function, *args)


@pytest.mark.parametrize(("line", "code", "request_id", "field"), CASES)
async def test_lone_surrogate_is_refused_on_the_websocket(
    ws_daemon: Daemon, line: bytes, code: int, request_id: Any, field: str | None
) -> None:
    token = (await make_token(ws_daemon))["token"]

    def session() -> Any:
        with open_ws(ws_daemon, token) as ws:
            ws.send(line.decode().rstrip("\n"))
            (response,) = values(ws.recv(TIMEOUT))
            info = RpcClient(ws).call("daemon.info")
        with open_ws(ws_daemon, token) as other:
            other_info = RpcClient(other).call("daemon.info")
        return response, info, other_info

    response, info, other_info = await in_thread(session)
    assert response["id"] == request_id
    assert response["error"]["code"] == code
    if field is not None:
        assert response["error"]["data"]["field"] == field
    assert info["pid"] == other_info["pid"]
    await healthy(ws_daemon)


async def test_seed_endpoints_refuse_a_lone_surrogate_and_stay_open(
    ws_daemon: Daemon, http_server: HTTPTestServer
) -> None:
    url = http_server.route("/f.bin", serve_data(b"x" * 100))
    client = await RawClient.connect(ws_daemon.config.socket)
    task_id = (await client.call("tasks.download", {"urls": [url]}))["task_id"]
    await client.aclose()
    token = (await make_token(ws_daemon, scope="read"))["token"]

    def session(path: str, message: str) -> Any:
        with open_ws(ws_daemon, token, path) as ws:

            def answer() -> Any:
                # The task's own updates may come in between.
                while (value := json.loads(ws.recv(TIMEOUT)))["type"] == "job_update":
                    pass
                return value

            connected = answer()
            ws.send(message)
            error = answer()
            ws.send('{"type":"ping"}')
            pong = answer()
            return connected, error, pong

    for path, message in [
        (f"/ws/bulk-process/{task_id}", f'{{"type":"get_status","job_id":"{LONE}"}}'),
        ("/ws/progress/news", f'{{"type":"subscribe_job","job_id":"x{LONE}"}}'),
        ("/ws/progress/news", f'{{"type":"{LONE}"}}'),
        ("/ws/progress/news", "[" * 100_000 + "]" * 100_000),
        ("/ws/progress/news", '{"type":"ping","n":NaN}'),
    ]:
        connected, error, pong = await in_thread(session, path, message)
        assert connected["type"] == "connected"
        assert error["type"] == "error", (path, message[:40], error)
        assert pong["type"] == "pong"
    await healthy(ws_daemon)


def test_encode_line_never_fails_for_a_reply() -> None:
    bad = jsonrpc.result_response(
        3, {"name": "a\udc80b", "rate": float("nan"), "x": [float("inf")]}
    )
    assert json.loads(jsonrpc.encode_line(bad)) == {
        "jsonrpc": "2.0",
        "id": 3,
        "result": {"name": "a\ufffdb", "rate": None, "x": [None]},
    }
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    answer = json.loads(jsonrpc.encode_line(jsonrpc.result_response(4, deep)))
    assert answer["id"] == 4
    assert answer["error"]["code"] == -32603
    batch = [jsonrpc.result_response(5, 1), jsonrpc.result_response(6, object())]
    answers = json.loads(jsonrpc.encode_line(batch))
    assert answers[0] == jsonrpc.result_response(5, 1)
    assert answers[1]["error"]["code"] == -32603
    assert answers[1]["id"] == 6


async def test_a_failing_connection_costs_only_itself(
    daemon: Daemon, connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past one message: a bug in a connection's own loops ends that connection (logged),
    never the daemon or another client's connection."""
    bystander = await connect()
    await bystander.call("daemon.info")
    take_pending = Session.take_pending
    armed = [True]

    def failing_once(session: Session) -> list[bytes]:
        if armed and session.has_pending():
            armed.clear()
            raise RuntimeError("a bug in the writer")
        return take_pending(session)

    monkeypatch.setattr(Session, "take_pending", failing_once)
    victim = await connect()
    await victim.send(envelope("daemon.info"))

    # The reply may still leave (the reader sends it, the writer flushes what is queued
    # as the connection closes); the connection ends either way.
    async def read_to_the_end() -> None:
        while True:
            await victim.receive()

    with trio.fail_after(10), pytest.raises(EOFError):
        await read_to_the_end()
    assert not armed
    assert (await bystander.call("daemon.info"))["pid"] > 0
    await healthy(daemon)
