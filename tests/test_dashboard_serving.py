"""The dashboard's files served on the WebSocket port: a real daemon, a real HTTP client
(http.client, in a thread) on 127.0.0.1, and the WebSocket's own origin rule."""

from __future__ import annotations

import http.client
import re
import socket
from typing import Any

import attrs
import h11
import pytest
import trio
from websockets.exceptions import InvalidStatus

from statusd.daemon import Daemon
from statusd.protocol import web
from tests.websocket_clients import (
    TIMEOUT,
    RpcClient,
    make_token,
    open_ws,
    port,
    ws_daemon,
)

__all__ = ["ws_daemon"]


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def fetch(daemon: Daemon, path: str, method: str = "GET", host: str | None = None) -> Answer:
    connection = http.client.HTTPConnection("127.0.0.1", port(daemon), timeout=TIMEOUT)
    try:
        headers = {"Host": host if host is not None else f"127.0.0.1:{port(daemon)}"}
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        body = response.read()
        return Answer(
            response.status, {name.lower(): value for name, value in response.getheaders()}, body
        )
    finally:
        connection.close()


async def get(daemon: Daemon, path: str, method: str = "GET", host: str | None = None) -> Answer:
    with trio.fail_after(30):
        return await trio.to_thread.run_sync(fetch, daemon, path, method, host)


async def test_the_page_comes_with_its_security_headers(ws_daemon: Daemon) -> None:
    answer = await get(ws_daemon, "/")
    assert answer.status == 200
    origin = f"127.0.0.1:{port(ws_daemon)}"
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    assert answer.headers["content-security-policy"] == (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        f"connect-src 'self' ws://{origin}; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["referrer-policy"] == "no-referrer"
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["connection"] == "close"
    assert b'<script src="/dashboard.js"' in answer.body
    # No inline script or style for the policy to allow: everything comes from the files.
    assert b"<script>" not in answer.body
    assert b"<style" not in answer.body
    assert re.search(rb"\son[a-z]+\s*=", answer.body) is None


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/dashboard.js", "text/javascript; charset=utf-8"),
        ("/dashboard.css", "text/css; charset=utf-8"),
    ],
)
async def test_the_assets_are_served_with_their_type(
    ws_daemon: Daemon, path: str, content_type: str
) -> None:
    answer = await get(ws_daemon, path)
    assert answer.status == 200
    assert answer.headers["content-type"] == content_type
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert int(answer.headers["content-length"]) == len(answer.body) > 0


async def test_head_has_the_length_and_no_body(ws_daemon: Daemon) -> None:
    whole = await get(ws_daemon, "/")
    head = await get(ws_daemon, "/", method="HEAD")
    assert head.status == 200
    assert head.body == b""
    assert head.headers["content-length"] == str(len(whole.body))


@pytest.mark.parametrize(
    "path",
    [
        "/index.html",
        "/nope",
        "/../pyproject.toml",
        "/%2e%2e/pyproject.toml",
        "/statusd/web/index.html",
        "/__init__.py",
        "/dashboard.js/",
        "//dashboard.js",
    ],
)
async def test_any_other_path_is_404(ws_daemon: Daemon, path: str) -> None:
    answer = await get(ws_daemon, path)
    assert answer.status == 404
    assert answer.headers["content-type"] == "text/plain; charset=utf-8"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert b"no such path" in answer.body


async def test_a_query_or_fragment_free_target_still_finds_the_page(ws_daemon: Daemon) -> None:
    assert (await get(ws_daemon, "/?x=1")).status == 200


async def test_other_methods_are_405(ws_daemon: Daemon) -> None:
    answer = await get(ws_daemon, "/", method="POST")
    assert answer.status == 405
    assert answer.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:1234", "127.0.0.2"])
async def test_a_foreign_host_is_refused_for_the_page_too(ws_daemon: Daemon, host: str) -> None:
    """DNS rebinding: a page on attacker.example re-pointed at 127.0.0.1 would read the
    dashboard as its own origin."""
    answer = await get(ws_daemon, "/", host=host)
    assert answer.status == 403
    assert b"is not allowed" in answer.body
    assert "content-security-policy" not in answer.headers


async def test_localhost_by_name_gets_the_page(ws_daemon: Daemon) -> None:
    answer = await get(ws_daemon, "/", host=f"localhost:{port(ws_daemon)}")
    assert answer.status == 200
    assert f"ws://localhost:{port(ws_daemon)};" in answer.headers["content-security-policy"]


async def test_a_page_request_leaves_no_handshake_or_connection_behind(ws_daemon: Daemon) -> None:
    assert ws_daemon.websocket is not None
    for _ in range(3):
        assert (await get(ws_daemon, "/")).status == 200
    assert ws_daemon.websocket.handshakes == 0
    assert ws_daemon.websocket.connections == 0


async def test_a_request_h11_cannot_read_still_gets_the_websocket_refusal(
    ws_daemon: Daemon,
) -> None:
    def garbage() -> bytes:
        with socket.create_connection(("127.0.0.1", port(ws_daemon)), timeout=TIMEOUT) as sock:
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            return sock.recv(4096)

    answer = await trio.to_thread.run_sync(garbage)
    assert answer.startswith(b"HTTP/1.1 400")


# -- the page's own origin on the WebSocket ----------------------------------------------------


def connect_from(daemon: Daemon, token: str, origin: str) -> Any:
    """The result of daemon.info over /ws from a page of ``origin``, or the refusal."""
    try:
        ws = open_ws(daemon, token, additional_headers={"Origin": origin})
    except InvalidStatus as refused:
        return refused.response.status_code, refused.response.body.decode()
    with ws:
        return RpcClient(ws).call("daemon.info")


async def test_the_pages_own_origin_may_open_the_socket(ws_daemon: Daemon) -> None:
    assert ws_daemon.config.websocket.allowed_origins == ()
    token = (await make_token(ws_daemon, "read"))["token"]
    own = f"http://127.0.0.1:{port(ws_daemon)}"
    info = await trio.to_thread.run_sync(connect_from, ws_daemon, token, own)
    assert info["pid"] > 0


@pytest.mark.parametrize(
    "origin",
    [
        "http://127.0.0.1:1",  # another local server: another origin
        "https://127.0.0.1:{port}",
        "http://localhost:{port}",  # another name for this host, but not the Host it asked
        "http://attacker.example",
        "null",
    ],
)
async def test_every_other_origin_is_still_refused(ws_daemon: Daemon, origin: str) -> None:
    token = (await make_token(ws_daemon, "read"))["token"]
    result = await trio.to_thread.run_sync(
        connect_from, ws_daemon, token, origin.format(port=port(ws_daemon))
    )
    assert result[0] == 403
    assert "allowed_origins" in result[1]


def test_page_origin_is_the_host_as_a_browser_names_it() -> None:
    assert web.page_origin("127.0.0.1:8765") == "http://127.0.0.1:8765"
    assert web.page_origin("LOCALHOST:80") == "http://localhost"
    assert web.page_origin("[::1]:8765") == "http://[::1]:8765"
    assert web.page_origin("127.0.0.1:x") is None
    assert web.page_origin(None) is None


def test_only_an_upgrade_to_websocket_is_handed_on() -> None:
    def request(*headers: tuple[bytes, bytes]) -> h11.Request:
        return h11.Request(method="GET", target="/", headers=[(b"host", b"x"), *headers])

    assert web.is_upgrade(request((b"upgrade", b"websocket"), (b"connection", b"Upgrade")))
    assert web.is_upgrade(request((b"upgrade", b"WebSocket")))
    assert not web.is_upgrade(request())
    assert not web.is_upgrade(request((b"upgrade", b"h2c")))


async def test_an_upgrade_sent_in_pieces_still_reaches_the_websocket(ws_daemon: Daemon) -> None:
    """The front reads the head first and hands trio-websocket every byte it read."""
    token = (await make_token(ws_daemon, "read"))["token"]
    request = (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port(ws_daemon)}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()

    def handshake() -> bytes:
        with socket.create_connection(("127.0.0.1", port(ws_daemon)), timeout=TIMEOUT) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for start in range(0, len(request), 7):
                sock.sendall(request[start : start + 7])
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
            return head

    head = await trio.to_thread.run_sync(handshake)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head  # RFC 6455 section 1.3's example
