"""A WebSocket handshake checked before a reload (SIGHUP) and accepted after it is held to
the reload's rules once it joins the open connections, before its first message: a page
whose origin the reload took out of ``allowed_origins``, or a token's user it demoted from
``admin_group``, is closed with 1008 and the reason the reload gives open connections.

Driven deterministically: the handshake's look-up of the token's user is held (a hook on
the server's look-ups) until the reload has run, so the reload comes between the HTTP
upgrade request and its acceptance. A daemon in-process with its WebSocket on; real
clients (the ``websockets`` package) in threads. The admin case uses uid nobody's token
on a daemon whose control socket admits nobody's group (root only).
"""

from __future__ import annotations

import grp
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import trio

from statusd.config import Config
from statusd.daemon import Daemon
from statusd.identity import Caller, CallerLookups
from tests.conftest import NOBODY_GID
from tests.websocket_clients import (
    TIMEOUT,
    RpcClient,
    close_of,
    make_token,
    nobody_ws_daemon,
    open_ws,
    ws_daemon,
)

__all__ = ["nobody_ws_daemon", "ws_daemon"]

PAGE = "http://app.test:3000"
ANSWER_BOUND = 5.0  # seconds: the other connection's call while the page is closed


def origins(daemon: Daemon, *allowed: str) -> Config:
    config = daemon.config
    websocket = attrs.evolve(config.websocket, allowed_origins=allowed)
    return attrs.evolve(config, websocket=websocket)


async def _across_a_reload(
    daemon: Daemon,
    monkeypatch: pytest.MonkeyPatch,
    token: str,
    reloaded_config: Callable[[], Config],
    origin: str | None = None,
) -> tuple[int, str]:
    """Open a connection whose handshake is checked before a reload to
    ``reloaded_config`` and accepted after it; how the daemon closed it."""
    server = daemon.websocket
    assert server is not None
    looked_up, reloaded, closed = trio.Event(), trio.Event(), trio.Event()
    seen: list[tuple[int, str]] = []

    class Held(CallerLookups):
        """Holds the first look-up (this handshake's) until the reload has run."""

        async def caller_for_username(
            self, username: str, admin_group: str | None
        ) -> Caller | None:
            if not looked_up.is_set():
                looked_up.set()
                await reloaded.wait()
            return await super().caller_for_username(username, admin_group)

    def page() -> None:
        with open_ws(daemon, token, origin=origin) as ws:
            seen.append(close_of(ws))
        trio.from_thread.run_sync(closed.set)

    monkeypatch.setattr(server, "lookups", Held())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, page)
        with trio.fail_after(TIMEOUT):
            await looked_up.wait()
        assert await daemon.reload(reloaded_config)
        reloaded.set()
        with trio.fail_after(TIMEOUT):
            await closed.wait()
    return seen[0]


async def test_a_page_whose_origin_a_reload_took_out_is_closed_once_accepted(
    ws_daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await ws_daemon.reload(lambda: origins(ws_daemon, PAGE))
    token = (await make_token(ws_daemon, "read"))["token"]
    script_open = trio.Event()
    ask = threading.Event()  # the script's call, once the page is closed
    seen: dict[str, Any] = {}

    def script() -> None:  # no Origin: not a browser, and not closed by the reload
        with open_ws(ws_daemon, token) as ws:
            trio.from_thread.run_sync(script_open.set)
            ask.wait(TIMEOUT)
            started = time.monotonic()
            seen["info"] = RpcClient(ws).call("daemon.info")
            seen["took"] = time.monotonic() - started

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, script)
        with trio.fail_after(TIMEOUT):
            await script_open.wait()
        # Its Origin was allowed when checked; the reload takes it away before the 101.
        closed = await _across_a_reload(
            ws_daemon,
            monkeypatch,
            token,
            lambda: origins(ws_daemon, "http://other.test"),
            origin=PAGE,
        )
        ask.set()
    assert closed == (1008, "the page's origin is no longer in websocket.allowed_origins")
    assert seen["info"]["scope"] == "read"
    assert seen["took"] < ANSWER_BOUND


async def test_a_user_a_reload_demoted_is_closed_once_accepted(
    nobody_ws_daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = nobody_ws_daemon
    group = grp.getgrgid(NOBODY_GID).gr_name
    assert await daemon.reload(lambda: attrs.evolve(daemon.config, admin_group=group))
    token = (await make_token(daemon, "read", username="nobody"))["token"]
    # Checked as an admin (admin_group is nobody's group), accepted after the reload.
    closed = await _across_a_reload(
        daemon, monkeypatch, token, lambda: attrs.evolve(daemon.config, admin_group=None)
    )
    assert closed == (1008, "the token's user is no longer an admin")

    def reconnect() -> Any:  # in a thread, closing included: this loop answers the close
        with open_ws(daemon, token) as ws:
            return RpcClient(ws).call("daemon.info")

    # Its next connection is a user's.
    info = await trio.to_thread.run_sync(reconnect)
    assert (info["user"], info["admin"]) == ("nobody", False)
