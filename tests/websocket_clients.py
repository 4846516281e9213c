"""WebSocket test helpers: a daemon with its WebSocket on, tokens, and clients built on the
independent ``websockets`` package (never trio-websocket's own client, so the tests show
that another implementation interoperates).

The sync client blocks, so tests run it in a thread (``trio.to_thread.run_sync``) while
the daemon runs in the test's trio loop; many clients at once use the asyncio client in
one thread.
"""

from __future__ import annotations

import grp
import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from statusd.config import Config, WebSocketConfig
from statusd.daemon import Daemon, run
from tests.conftest import NOBODY_GID, RawClient, make_config

TIMEOUT = 10.0


def ws_config(directory: Path, **overrides: Any) -> Config:
    websocket = WebSocketConfig(listen=("127.0.0.1", 0), allowed_origins=())
    return make_config(directory, websocket=websocket, **overrides)


@pytest.fixture
async def ws_daemon(nursery: trio.Nursery, short_tmp: Path) -> AsyncIterator[Daemon]:
    handle: Daemon = await nursery.start(run, ws_config(short_tmp))
    yield handle
    handle.request_stop()
    await handle.wait_stopped()


@pytest.fixture
async def nobody_ws_daemon(
    nursery: trio.Nursery, short_tmp: Path, root_only: None
) -> AsyncIterator[Daemon]:
    """A WebSocket daemon whose control socket's group is nobody's: a token for nobody
    works only while nobody could connect to that socket (statusd.access). Only root can
    give the socket nobody's group: ``root_only`` skips, saying so, for anyone else."""
    config = ws_config(short_tmp, socket_group=grp.getgrgid(NOBODY_GID).gr_name)
    handle: Daemon = await nursery.start(run, config)
    yield handle
    handle.request_stop()
    await handle.wait_stopped()


def address(daemon: Daemon) -> str:
    assert daemon.websocket is not None
    assert daemon.websocket.address is not None
    return daemon.websocket.address


def port(daemon: Daemon) -> int:
    return int(address(daemon).rpartition(":")[2])


async def make_token(daemon: Daemon, scope: str = "control", username: str | None = None) -> Any:
    """A token minted over the Unix socket (the tests run as root: an admin)."""
    client = await RawClient.connect(daemon.config.socket)
    try:
        params: dict[str, Any] = {"scope": scope}
        if username is not None:
            params["username"] = username
        return await client.call("tokens.create", params)
    finally:
        await client.aclose()


def open_ws(
    daemon: Daemon, token: str | None, path: str = "/ws", **options: Any
) -> ClientConnection:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    headers.update(options.pop("additional_headers", {}))
    connection: ClientConnection = connect(
        f"ws://{address(daemon)}{path}",
        additional_headers=headers,
        open_timeout=TIMEOUT,
        close_timeout=TIMEOUT,
        **options,
    )
    return connection


def values(frame: str | bytes) -> list[Any]:
    """The JSON-RPC objects in one frame: one, or several when the daemon coalesced."""
    value = json.loads(frame)
    return value if isinstance(value, list) and value and isinstance(value[0], dict) else [value]


@attrs.define
class RpcClient:
    """JSON-RPC over a sync websockets connection; pushes are kept for ``next_push``."""

    ws: ClientConnection
    pushes: list[Any] = attrs.Factory(list)
    _next_id: int = 0

    def request(self, method: str, params: dict[str, Any] | None = None) -> Any:
        self._next_id += 1
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": self._next_id}
        if params is not None:
            message["params"] = params
        self.ws.send(json.dumps(message))
        answer = None
        while answer is None:
            for value in values(self.ws.recv(TIMEOUT)):
                if value.get("id") == self._next_id:
                    answer = value
                else:
                    self.pushes.append(value)
        return answer

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        answer = self.request(method, params)
        assert "result" in answer, answer
        return answer["result"]

    def next_push(self) -> Any:
        while not self.pushes:
            self.pushes.extend(values(self.ws.recv(TIMEOUT)))
        return self.pushes.pop(0)


def raw_handshake(
    port: int, path: str, host: str = "127.0.0.1", extra: str = ""
) -> tuple[socket.socket, bytes]:
    """A bare TCP client that sends an upgrade request by hand; returns the socket and
    the response head (for clients that misbehave below what websockets allows)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    sock.sendall(request.encode("latin-1"))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return sock, head


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def close_of(ws: ClientConnection, seen: list[Any] | None = None) -> tuple[int, str]:
    """Read until the daemon closes; the close frame's code and reason (what was read
    before it goes into ``seen``)."""
    try:
        while True:
            frame = ws.recv(TIMEOUT)
            if seen is not None:
                seen.extend(values(frame))
    except ConnectionClosed as closed:
        if closed.rcvd is None:
            raise AssertionError("the connection ended without a close frame") from None
        return closed.rcvd.code, closed.rcvd.reason
