"""A WebSocket handshake checked before a reload (SIGHUP) and accepted after it is held to
the reload's rules once it joins the open connections: a page whose origin the reload took
out of ``allowed_origins`` is closed with 1008, as the reload closed those already open.

Driven deterministically: the handshake's look-up of the token's user is held (a hook on
the server's look-ups) until the reload has run, so the reload comes between the HTTP
upgrade request and its acceptance. A daemon in-process with its WebSocket on; real
clients (the ``websockets`` package) in threads.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import attrs
import pytest
import trio

from statusd.config import Config
from statusd.daemon import Daemon
from statusd.identity import Caller, CallerLookups
from tests.websocket_clients import (
    TIMEOUT,
    RpcClient,
    close_of,
    make_token,
    open_ws,
    ws_daemon,
)

__all__ = ["ws_daemon"]

PAGE = "http://app.test:3000"
ANSWER_BOUND = 5.0  # seconds: the other connection's call while the page is closed


def origins(daemon: Daemon, *allowed: str) -> Config:
    config = daemon.config
    websocket = attrs.evolve(config.websocket, allowed_origins=allowed)
    return attrs.evolve(config, websocket=websocket)


async def test_a_handshake_checked_before_a_reload_meets_it_once_accepted(
    ws_daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await ws_daemon.reload(lambda: origins(ws_daemon, PAGE))
    token = (await make_token(ws_daemon, "read"))["token"]
    server = ws_daemon.websocket
    assert server is not None
    script_open, looked_up, reloaded, page_closed = (trio.Event() for _ in range(4))
    ask = threading.Event()  # the script's call, once the page is closed
    seen: dict[str, Any] = {}

    def script() -> None:  # no Origin: not a browser
        with open_ws(ws_daemon, token) as ws:
            trio.from_thread.run_sync(script_open.set)
            ask.wait(TIMEOUT)
            started = time.monotonic()
            seen["info"] = RpcClient(ws).call("daemon.info")
            seen["took"] = time.monotonic() - started

    def page() -> None:
        with open_ws(ws_daemon, token, origin=PAGE) as ws:
            seen["close"] = close_of(ws)
        trio.from_thread.run_sync(page_closed.set)

    class Held(CallerLookups):
        """Holds the first look-up (the page's handshake) until the reload has run."""

        async def caller_for_username(
            self, username: str, admin_group: str | None
        ) -> Caller | None:
            if not looked_up.is_set():
                looked_up.set()
                await reloaded.wait()
            return await super().caller_for_username(username, admin_group)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, script)
        with trio.fail_after(TIMEOUT):
            await script_open.wait()
        monkeypatch.setattr(server, "lookups", Held())
        nursery.start_soon(trio.to_thread.run_sync, page)
        with trio.fail_after(TIMEOUT):
            await looked_up.wait()
        # Its Origin was allowed when checked; the reload takes it away before the 101.
        assert await ws_daemon.reload(lambda: origins(ws_daemon, "http://other.test"))
        reloaded.set()
        with trio.fail_after(TIMEOUT):
            await page_closed.wait()
        ask.set()
    assert seen["close"] == (1008, "the page's origin is no longer in websocket.allowed_origins")
    assert seen["info"]["scope"] == "read"
    assert seen["took"] < ANSWER_BOUND
