"""Caller look-ups off the event loop (issue 11, item 11).

``getpwuid``, ``getgrnam`` and ``getgrouplist`` block for seconds under LDAP or SSSD. The
``CallerLookups`` runs them in threads of its own and caches each answer for ``LOOKUP_TTL``;
these tests put a fake slow look-up (blocked on a ``threading.Event``) in their place.
"""

from __future__ import annotations

import grp
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from statusd import identity
from statusd.daemon import Daemon, run
from statusd.identity import LOOKUP_TTL, Caller, CallerLookups
from tests.conftest import (
    NOBODY_UID,
    RUNNER,
    RawClient,
    blocking_call,
    make_config,
    needs_root,
    run_as_nobody,
)
from tests.websocket_clients import RpcClient, make_token, nobody_ws_daemon, open_ws

__all__ = ["nobody_ws_daemon"]

NOBODY_GROUP = grp.getgrgid(65534).gr_name
STRANGER = 4242  # a uid nobody is: not root, not the daemon's


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every uid the lookups ask the system about (answered at once, as a stranger)."""
    asked: list[int] = []

    def fake(uid: int, admin_group: str | None, **_options: Any) -> Caller:
        asked.append(uid)
        return Caller(uid, f"user{uid}", False)

    monkeypatch.setattr(identity, "caller_for_uid", fake)
    return asked


async def test_cache_hits_within_the_ttl_and_misses_after(
    mock_clock: trio.testing.MockClock, lookups: list[int]
) -> None:
    callers = CallerLookups()
    first = await callers.caller_for_uid(STRANGER, None, pid=10)
    assert first == Caller(STRANGER, f"user{STRANGER}", False, 10)
    mock_clock.jump(LOOKUP_TTL - 1)
    again = await callers.caller_for_uid(STRANGER, None, pid=11)
    assert again.pid == 11  # the pid is the connection's, never a cached one
    assert lookups == [STRANGER]
    mock_clock.jump(1)
    await callers.caller_for_uid(STRANGER, None)
    assert lookups == [STRANGER, STRANGER]


async def test_admin_group_is_part_of_the_key(lookups: list[int]) -> None:
    callers = CallerLookups()
    await callers.caller_for_uid(STRANGER, None)
    await callers.caller_for_uid(STRANGER, "wheel")  # a reload changed admin_group
    assert lookups == [STRANGER, STRANGER]


async def test_the_cache_forgets_the_oldest_past_its_size(lookups: list[int]) -> None:
    callers = CallerLookups(max_entries=2)
    for uid in (5001, 5002, 5003, 5002):
        await callers.caller_for_uid(uid, None)
    assert callers.cached == 2
    await callers.caller_for_uid(5001, None)  # forgotten: asked again
    assert lookups == [5001, 5002, 5003, 5001]


async def test_root_and_the_daemon_user_need_no_lookup(lookups: list[int]) -> None:
    callers = CallerLookups(daemon_uid=STRANGER + 1)
    root = await callers.caller_for_uid(0, None, pid=3)
    assert (root.uid, root.admin, root.pid) == (0, True, 3)
    assert (await callers.caller_for_uid(STRANGER + 1, None)).admin
    assert await callers.caller_for_username(root.username, None) == Caller(0, root.username, True)
    assert lookups == []


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="max_entries must be >= 1, not 0"):
        CallerLookups(max_entries=0)
    with pytest.raises(ValueError, match="ttl must be >= 0, not -1"):
        CallerLookups(ttl=-1)
    with pytest.raises(ValueError, match="max_threads must be >= 1, not 0"):
        CallerLookups(max_threads=0)


@pytest.fixture
def stuck(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A directory service that hangs for the uids in ``stuck.uids`` until released."""

    class Stuck:
        uids: set[int] = set()
        entered = threading.Semaphore(0)
        release = threading.Event()
        finished = threading.Event()
        calls = 0

    real = identity.username_for

    def slow(uid: int) -> str:
        if uid not in Stuck.uids:
            return real(uid)
        Stuck.calls += 1
        Stuck.entered.release()
        # Bounded, so that code which looks up on the event loop fails the test (the
        # answer below comes only after this returns) instead of hanging it.
        Stuck.release.wait(10)
        Stuck.finished.set()
        return real(uid)

    monkeypatch.setattr(identity, "username_for", slow)
    yield Stuck
    Stuck.release.set()


async def test_stuck_lookups_take_only_their_own_threads(stuck: Any) -> None:
    stuck.uids = set(range(6000, 6050))
    callers = CallerLookups(max_threads=3)
    async with trio.open_nursery() as nursery:
        for uid in stuck.uids:
            nursery.start_soon(callers.caller_for_uid, uid, None)
        for _ in range(3):
            await trio.to_thread.run_sync(stuck.entered.acquire)
        # Fifty callers wait, three threads are stuck, and trio's own threads still run.
        assert await trio.to_thread.run_sync(lambda: "free") == "free"
        assert stuck.calls == 3
        stuck.release.set()
    assert stuck.calls == 50


async def test_one_lookup_per_user_at_a_time(stuck: Any) -> None:
    stuck.uids = {STRANGER}
    lookups = CallerLookups()
    callers: list[Caller] = []

    async def connect() -> None:
        callers.append(await lookups.caller_for_uid(STRANGER, None))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(connect)
        await trio.to_thread.run_sync(stuck.entered.acquire)
        await trio.testing.wait_all_tasks_blocked()
        stuck.release.set()
    assert stuck.calls == 1
    assert len(callers) == 5


@needs_root
async def test_slow_lookup_does_not_stall_connected_clients(
    nursery: trio.Nursery, short_tmp: Path, stuck: Any
) -> None:
    stuck.uids = {NOBODY_UID}
    config = make_config(short_tmp, socket_group=NOBODY_GROUP)
    daemon = await nursery.start(run, config)
    neighbour = await RawClient.connect(config.socket)
    assert (await neighbour.call("daemon.info"))["uid"] == 0

    def as_nobody() -> Any:
        return run_as_nobody(lambda: blocking_call(config.socket, "daemon.info")["result"])

    answers: list[Any] = []

    async def nobody_connects() -> None:
        answers.append(await trio.to_thread.run_sync(as_nobody))

    async with trio.open_nursery() as connecting:
        connecting.start_soon(nobody_connects)
        await trio.to_thread.run_sync(stuck.entered.acquire, True, 10)
        # nobody's lookup hangs; the neighbour, connected before, is answered meanwhile.
        with trio.fail_after(10):
            info = await neighbour.call("daemon.info")
        assert info["uid"] == 0
        assert not stuck.finished.is_set()
        stuck.release.set()
    assert (answers[0]["uid"], answers[0]["user"]) == (NOBODY_UID, "nobody")
    await neighbour.aclose()
    daemon.request_stop()
    await daemon.wait_stopped()


async def test_slow_token_user_lookup_does_not_stall_websocket_clients(
    nobody_ws_daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    root_token = (await make_token(nobody_ws_daemon))["token"]
    nobody_token = (await make_token(nobody_ws_daemon, username="nobody"))["token"]
    entered, release, finished = threading.Event(), threading.Event(), threading.Event()
    real = identity.uid_for

    def slow(username: str) -> int | None:
        if username == "nobody":
            entered.set()
            release.wait(10)  # bounded: a look-up on the event loop fails, not hangs
            finished.set()
        return real(username)

    monkeypatch.setattr(identity, "uid_for", slow)
    root_connected = threading.Event()

    def root_session() -> tuple[Any, bool]:
        with open_ws(nobody_ws_daemon, root_token) as ws:
            root_connected.set()
            assert entered.wait(10)
            # nobody's handshake waits for its user; root, connected before, is answered.
            info = RpcClient(ws).call("daemon.info")
            return info, finished.is_set()

    def nobody_session() -> Any:
        assert root_connected.wait(10)
        with open_ws(nobody_ws_daemon, nobody_token) as ws:
            return RpcClient(ws).call("daemon.info")

    nobody_answer: list[Any] = []

    async def nobody_connects() -> None:
        nobody_answer.append(await trio.to_thread.run_sync(nobody_session))

    try:
        async with trio.open_nursery() as sessions:
            sessions.start_soon(nobody_connects)
            with trio.fail_after(30):
                info, lookup_finished = await trio.to_thread.run_sync(root_session)
            release.set()
    finally:
        release.set()
    assert info["user"] == RUNNER
    assert not lookup_finished
    assert nobody_answer[0]["user"] == "nobody"
