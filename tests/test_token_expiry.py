"""Tokens that expire: ``tokens.create {expires_in}``, ``expires_at`` in the record and the
list, a handshake with an expired token refused (401), a live connection closed (1008) when
its token expires, ``statusctl token create --expires-in``.

Time is trio's MockClock; the wall clock the store stamps ``expires_at`` with is derived
from it (``BASE`` plus the mock clock's seconds). The WebSocket tests move the clock by hand
(no autojump): their clients run in threads, and an autojumping clock would run to the
expiry while a client is still connecting.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from websockets.exceptions import InvalidStatus

import statusd.tokens
from statusctl.cli import duration
from statusd.daemon import Daemon, run
from statusd.tokens import MAX_EXPIRES_IN, MIN_EXPIRES_IN, TokenStore, format_time
from tests.conftest import RawClient
from tests.test_statusctl_tokens import _free_port, statusctl
from tests.websocket_clients import RpcClient, close_of, open_ws, ws_config

BASE = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)
# Real seconds the event loop must idle before the mock clock jumps: tokens.json is written
# in a worker thread, and with no threshold the clock would jump while the write is on.
JUMP = 0.05


def mock_wall_clock() -> datetime:
    return BASE + timedelta(seconds=trio.current_time())


async def until(condition: Callable[[], bool]) -> None:
    """Wait for what a worker thread does (tokens.json written): no event says when."""
    while not condition():
        await trio.lowlevel.checkpoint()


@pytest.fixture
def wall_clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[], datetime]:
    """The daemon's token store reads the wall clock from the mock clock."""
    monkeypatch.setattr(statusd.tokens, "system_wall_clock", mock_wall_clock)
    return mock_wall_clock


# -- the store ----------------------------------------------------------------------------


async def test_a_token_stops_verifying_at_its_expiry(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    mock_clock.autojump_threshold = JUMP
    store = await TokenStore.open(tmp_path / "tokens.json", wall_clock=mock_wall_clock)
    new = await store.create("alice", "read", expires_in=60)
    forever = await store.create("alice", "read")
    assert new.record.expires_at == format_time(BASE + timedelta(seconds=60))
    assert forever.record.expires_at is None
    await trio.sleep(59.9)
    assert store.verify(new.token) == new.record
    await trio.sleep(0.1)
    # At 60 s exactly, whether or not serve_expiry has run yet.
    assert store.verify(new.token) is None
    assert store.verify(forever.token) == forever.record


async def test_serve_expiry_removes_each_token_when_due(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    mock_clock.autojump_threshold = JUMP
    store = await TokenStore.open(tmp_path / "tokens.json", wall_clock=mock_wall_clock)
    expired: list[tuple[str, float]] = []
    both = trio.Event()

    def note(token_id: str) -> None:
        expired.append((token_id, trio.current_time()))
        if len(expired) == 2:
            both.set()

    store.on_expired(note)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.serve_expiry)
        late = await store.create("alice", "control", expires_in=600)
        # Created after serve_expiry went to sleep until the later one: it wakes for this.
        early = await store.create("bob", "read", expires_in=120)
        await both.wait()
        await trio.testing.wait_all_tasks_blocked()  # the file written
        nursery.cancel_scope.cancel()
    assert expired == [(early.record.id, 120.0), (late.record.id, 600.0)]
    assert len(store) == 0
    assert json.loads((tmp_path / "tokens.json").read_text())["tokens"] == []


async def test_tokens_expired_while_the_daemon_was_down_go_at_once(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    mock_clock.autojump_threshold = JUMP
    path = tmp_path / "tokens.json"
    first = await TokenStore.open(path, wall_clock=mock_wall_clock)
    gone = await first.create("alice", "read", expires_in=60)
    kept = await first.create("alice", "read", expires_in=7200)
    await trio.sleep(600)  # "down" for ten minutes: nothing served expiry
    reopened = await TokenStore.open(path, wall_clock=mock_wall_clock)
    assert reopened.get(gone.record.id) == gone.record  # expires_at survived the restart
    assert reopened.verify(gone.token) is None
    expired: list[tuple[str, float]] = []
    reopened.on_expired(lambda token_id: expired.append((token_id, trio.current_time())))
    async with trio.open_nursery() as nursery:
        await nursery.start(reopened.serve_expiry)
        await until(lambda: len(reopened) == 1)
        nursery.cancel_scope.cancel()
    assert expired == [(gone.record.id, 600.0)]
    assert [r.id for r in reopened.records()] == [kept.record.id]
    assert [r.id for r in (await TokenStore.open(path)).records()] == [kept.record.id]


async def test_a_file_from_before_expiry_loads(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    entry = {
        "id": "0123456789abcdef",
        "username": "alice",
        "scope": "read",
        "created_at": "2026-11-01T00:00:00.000Z",
        "secret_sha256": "0" * 64,
    }
    path.write_text(json.dumps({"version": 1, "tokens": [entry]}))
    store = await TokenStore.open(path)
    [record] = store.records()
    assert record.expires_at is None
    assert record.describe()["expires_at"] is None


@pytest.mark.parametrize("seconds", [0, MIN_EXPIRES_IN - 1, MAX_EXPIRES_IN + 1])
async def test_store_refuses_an_expiry_out_of_range(tmp_path: Path, seconds: int) -> None:
    store = await TokenStore.open(tmp_path / "tokens.json")
    with pytest.raises(ValueError, match="expires_in must be from 60 to 31536000 seconds"):
        await store.create("alice", "read", expires_in=seconds)
    assert len(store) == 0


# -- over the Unix socket ---------------------------------------------------------------------


async def test_create_with_expires_in_and_list(
    autojump_clock: trio.testing.MockClock,
    wall_clock: Any,
    nursery: trio.Nursery,
    short_tmp: Path,
) -> None:
    daemon: Daemon = await nursery.start(run, ws_config(short_tmp))
    client = await RawClient.connect(daemon.config.socket)
    made = await client.call("tokens.create", {"scope": "read", "expires_in": MAX_EXPIRES_IN})
    created = datetime.fromisoformat(made["created_at"])
    expires = datetime.fromisoformat(made["expires_at"])
    assert expires - created == timedelta(days=365)
    [listed] = (await client.call("tokens.list"))["tokens"]
    assert listed["expires_at"] == made["expires_at"]
    await client.aclose()
    daemon.request_stop()
    await daemon.wait_stopped()


@pytest.mark.parametrize("value", [59, MAX_EXPIRES_IN + 1, -60, True, "1h", 90.5])
async def test_bad_expires_in_is_refused(daemon: Daemon, connect: Any, value: Any) -> None:
    client = await connect()
    answer = await client.request("tokens.create", {"expires_in": value})
    assert answer["error"]["code"] == -32602, answer
    assert answer["error"]["data"]["field"] == "expires_in"
    if isinstance(value, int) and not isinstance(value, bool):
        assert answer["error"]["message"] == (
            f"expires_in: must be from 60 to 31536000 seconds (a year), not {value}"
        )
    assert (await client.call("tokens.list"))["tokens"] == []


# -- on the WebSocket -------------------------------------------------------------------------


async def _in_thread(function: Callable[[], Any]) -> Any:
    # Not trio.fail_after: the mock clock moves only when the test moves it.
    return await trio.to_thread.run_sync(function)


async def test_a_live_connection_closes_when_its_token_expires(
    mock_clock: trio.testing.MockClock,
    wall_clock: Any,
    nursery: trio.Nursery,
    short_tmp: Path,
) -> None:
    daemon: Daemon = await nursery.start(run, ws_config(short_tmp))
    server = daemon.websocket
    assert server is not None
    client = await RawClient.connect(daemon.config.socket)
    expiring = await client.call("tokens.create", {"scope": "read", "expires_in": 60})
    lasting = await client.call("tokens.create", {"scope": "read"})
    await client.aclose()
    connected = trio.Event()
    trio_token = trio.lowlevel.current_trio_token()

    def session(token: str) -> tuple[int, str]:
        with open_ws(daemon, token) as ws:
            RpcClient(ws).call("daemon.info")
            trio.from_thread.run_sync(connected.set, trio_token=trio_token)
            return close_of(ws)

    closes: dict[str, tuple[int, str]] = {}
    closed = {"expiring": trio.Event(), "lasting": trio.Event()}

    async def run_session(name: str, token: str) -> None:
        closes[name] = await _in_thread(lambda: session(token))
        closed[name].set()

    async with trio.open_nursery() as sessions:
        for name, made in (("expiring", expiring), ("lasting", lasting)):
            connected = trio.Event()
            sessions.start_soon(run_session, name, made["token"])
            await connected.wait()
        mock_clock.jump(59.5)
        await trio.testing.wait_all_tasks_blocked()
        assert server.connections == 2
        mock_clock.jump(0.5)
        await closed["expiring"].wait()
        assert closes == {"expiring": (1008, "token expired")}
        # The expired token goes from the store (written by a worker thread, after the
        # close); the other connection stays until the daemon stops.
        store = daemon.api.tokens
        assert store is not None
        await until(lambda: store.get(expiring["token_id"]) is None)
        await server.wait_connections_at_most(1)
        daemon.request_stop()
    assert closes["lasting"][0] == 1001


async def test_an_expired_token_is_refused_at_the_handshake(
    mock_clock: trio.testing.MockClock,
    wall_clock: Any,
    nursery: trio.Nursery,
    short_tmp: Path,
) -> None:
    daemon: Daemon = await nursery.start(run, ws_config(short_tmp))
    client = await RawClient.connect(daemon.config.socket)
    made = await client.call("tokens.create", {"expires_in": 60})
    await client.aclose()

    def handshake() -> tuple[int, bytes]:
        try:
            with open_ws(daemon, made["token"]):
                return 101, b""
        except InvalidStatus as refused:
            return refused.response.status_code, bytes(refused.response.body or b"")

    assert (await _in_thread(handshake))[0] == 101
    mock_clock.jump(60)
    status, body = await _in_thread(handshake)
    assert status == 401
    assert b"expired" in body
    daemon.request_stop()
    await daemon.wait_stopped()


# -- statusctl --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("30d", 2_592_000), (" 2H ", 7200)],
)
def test_durations(text: str, seconds: int) -> None:
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1.5h", "-1h", "1w", "1h30m", "1 h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="a duration is a whole number"):
        duration(text)


def test_statusctl_token_create_expires_in(daemon_process: Any) -> None:
    process = daemon_process()
    process.start("--websocket", f"127.0.0.1:{_free_port()}")
    created = statusctl(process, "--json", "token", "create", "--expires-in", "1h")
    assert created.returncode == 0, created.stderr
    made = json.loads(created.stdout)
    lifetime = datetime.fromisoformat(made["expires_at"]) - datetime.fromisoformat(
        made["created_at"]
    )
    assert lifetime == timedelta(hours=1)
    listed = statusctl(process, "token", "list")
    assert made["expires_at"] in listed.stdout
    human = statusctl(process, "token", "create", "--expires-in", "2d")
    assert "expires 20" in human.stderr
    too_short = statusctl(process, "token", "create", "--expires-in", "30s")
    assert too_short.returncode == 4
    assert "expires_in: must be from 60 to 31536000 seconds" in too_short.stderr
    bad = statusctl(process, "token", "create", "--expires-in", "soon")
    assert bad.returncode == 2
    assert "a duration is a whole number" in bad.stderr
