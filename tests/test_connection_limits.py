"""Connections per user and before admission (issue 11, items 6 and 7, and two WebSocket
items): ``limits.max_connections_per_user``, ``limits.admin_connections``,
``limits.max_pending_handshakes``, accept() at the open-files limit, the soft
RLIMIT_NOFILE, two Origin headers, a WebSocket on a non-loopback address.

The per-user rules run against a real daemon process with real second and third uids
(``nobody``, and 65533, which has no passwd entry and needs none), in forked children that
drop privileges and hold their connections while the parent checks who is still served;
skipped, saying why, when not root. "Served meanwhile" means a ``daemon.info`` answered
within ``SERVED_WITHIN`` seconds (a socket timeout), a bound wide enough for a busy
two-core machine, never a timing assertion.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import logging
import os
import resource
import select
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import h11
import pytest
import trio
import trio.testing
from websockets.exceptions import ConnectionClosed, InvalidStatus

from statusd.config import LimitsConfig, WebSocketConfig
from statusd.daemon import Daemon, run
from statusd.identity import Caller, CallerLookups
from statusd.logs import EveryInterval
from statusd.protocol import jsonrpc
from statusd.protocol import websocket as rules
from statusd.state.connections import ConnectionLimits, Connections
from statusd.transports import accept
from statusd.transports import websocket as transport
from tests.conftest import NOBODY_GID, NOBODY_UID, DaemonProcess, RawClient, needs_root, run_as
from tests.websocket_clients import (
    TIMEOUT,
    RpcClient,
    make_token,
    open_ws,
    port,
    raw_handshake,
    ws_config,
)

SERVED_WITHIN = 5.0
BUSY = -32004
THIRD_UID = 65533


# --- the rules, pure ----------------------------------------------------------------------------


def test_a_user_gets_per_user_connections_and_admins_are_exempt() -> None:
    connections = Connections(
        ConnectionLimits(max_connections=100, per_user=3, admin_connections=10)
    )
    assert [connections.admit(1000, admin=False) for _ in range(3)] == [None] * 3
    refusal = connections.admit(1000, admin=False)
    assert refusal is not None
    assert refusal.key == "limits.max_connections_per_user"
    assert refusal.data == {"limit": 3, "key": "limits.max_connections_per_user"}
    assert refusal.message == (
        "too many connections from one user: 3 open, the most allowed "
        "(limits.max_connections_per_user = 3)"
    )
    assert connections.admit(1001, admin=False) is None  # another user's own allowance
    assert [connections.admit(0, admin=True) for _ in range(5)] == [None] * 5
    assert len(connections) == 9
    assert connections.held_by(1000) == 3
    connections.release(1000)
    assert connections.admit(1000, admin=False) is None


def test_the_last_slots_are_kept_for_admins() -> None:
    connections = Connections(ConnectionLimits(max_connections=6, per_user=10, admin_connections=2))
    assert [connections.admit(1000, admin=False) for _ in range(4)] == [None] * 4
    refusal = connections.admit(1001, admin=False)
    assert refusal is not None
    assert (refusal.key, refusal.limit) == ("limits.admin_connections", 4)
    assert "the last 2 of max_connections = 6 are kept for admins" in refusal.message
    assert connections.admit(0, admin=True) is None
    assert connections.admit(0, admin=True) is None
    refusal = connections.admit(0, admin=True)
    assert refusal is not None
    assert refusal.key == "max_connections"
    assert refusal.message == "too many connections (max_connections = 6)"
    # A refusal takes nothing.
    assert len(connections) == 6


@pytest.mark.parametrize(
    ("max_connections", "admin_connections", "reserve"),
    [(1024, 16, 16), (6, 2, 2), (10, 16, 5), (1, 16, 0), (100, 0, 0)],
)
def test_the_reserve_is_at_most_half(
    max_connections: int, admin_connections: int, reserve: int
) -> None:
    limits = ConnectionLimits(max_connections, per_user=1, admin_connections=admin_connections)
    assert limits.admin_reserve == reserve


def test_new_limits_leave_held_connections_alone() -> None:
    connections = Connections(ConnectionLimits(max_connections=10, per_user=5, admin_connections=0))
    for _ in range(4):
        connections.admit("token-a", admin=False)
    connections.configure(ConnectionLimits(max_connections=10, per_user=2, admin_connections=0))
    assert connections.held_by("token-a") == 4
    assert connections.admit("token-a", admin=False) is not None
    for _ in range(3):
        connections.release("token-a")
    assert connections.admit("token-a", admin=False) is None
    with pytest.raises(ValueError, match="release of 'token-b', which holds no connection"):
        connections.release("token-b")


def test_limits_check_their_figures() -> None:
    with pytest.raises(ValueError, match="per_user must be >= 1, not 0"):
        ConnectionLimits(max_connections=1, per_user=0, admin_connections=0)
    with pytest.raises(ValueError, match="admin_connections must be >= 0, not -1"):
        ConnectionLimits(max_connections=1, per_user=1, admin_connections=-1)


# --- once per interval, on trio's clock -----------------------------------------------------------


async def test_every_interval_lets_one_through_and_counts_the_rest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    report = EveryInterval(60.0)
    assert report.ready() == 0
    assert [report.ready() for _ in range(9)] == [None] * 9
    await trio.sleep(59.9)
    assert report.ready() is None
    await trio.sleep(0.1)
    assert report.ready() == 10
    with pytest.raises(ValueError, match="interval must be > 0, not 0"):
        EveryInterval(0)


class FullListener(trio.abc.Listener[trio.SocketStream]):
    """accept() fails with EMFILE ``failures`` times, then hands out one connection."""

    def __init__(self, failures: int, stream: trio.SocketStream) -> None:
        self.failures = failures
        self.attempts = 0
        self._stream: trio.SocketStream | None = stream

    async def accept(self) -> trio.SocketStream:
        await trio.lowlevel.checkpoint()
        self.attempts += 1
        if self.attempts <= self.failures:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        if self._stream is None:
            await trio.sleep_forever()
        stream, self._stream = self._stream, None
        assert stream is not None
        return stream

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_accept_at_the_open_files_limit_logs_once_per_interval_and_recovers(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=accept.__name__)
    one, other = trio.socket.socketpair()
    other.close()
    # 100 s of failures, one try every ACCEPT_BACKOFF: trio's own loop logs 1,000 tracebacks.
    listener = FullListener(1000, trio.SocketStream(one))
    handled = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        handled.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept.serve_listeners, handler, [listener], nursery, "test")
        await handled.wait()
        nursery.cancel_scope.cancel()
    assert trio.current_time() == pytest.approx(1000 * accept.ACCEPT_BACKOFF)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        f"test: cannot accept a connection: EMFILE ({os.strerror(errno.EMFILE)}); retrying "
        f"every 0.1 s, {quiet} more failures since the last report, next report in 60.0 s"
        for quiet in (0, 599)
    ]
    assert all(r.exc_info is None for r in caplog.records)
    assert "test: accepting connections again after 1000 failures" in caplog.messages


async def test_other_accept_errors_are_not_retried() -> None:
    class Broken(FullListener):
        async def accept(self) -> trio.SocketStream:
            await trio.lowlevel.checkpoint()
            raise OSError(errno.EBADF, "bad file descriptor")

    one, other = trio.socket.socketpair()
    other.close()

    async def handler(stream: trio.SocketStream) -> None:
        raise AssertionError("nothing was accepted")

    with pytest.raises(ExceptionGroup) as caught:
        async with trio.open_nursery() as nursery:
            await accept.serve_listeners(handler, [Broken(0, trio.SocketStream(one))], nursery, "x")
    assert caught.group_contains(OSError)
    one.close()


# --- WebSocket rules, pure ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("::ffff:10.0.0.1", False),
        ("fe80::1%eth0", False),
        ("example.org", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert rules.is_loopback(host) is loopback


def test_two_origin_headers_are_refused_and_one_is_not() -> None:
    one = [(b"origin", b"http://localhost:3000"), (b"upgrade", b"websocket")]
    assert rules.check_single(one, b"origin") is None
    two = [*one, (b"Origin", b"http://evil.example")]
    assert rules.check_single(two, b"origin") == rules.Refusal(
        400, "2 Origin headers: a request may carry at most one"
    )


def test_the_busy_response_is_a_whole_http_response() -> None:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/ws", headers=[("host", "localhost")]))
    client.send(h11.EndOfMessage())
    client.receive_data(rules.busy_response("too many (limits.max_pending_handshakes = 3)"))
    head = client.next_event()
    assert isinstance(head, h11.Response)
    assert head.status_code == 503
    assert (b"connection", b"close") in head.headers
    body = client.next_event()
    assert isinstance(body, h11.Data)
    assert body.data == b"too many (limits.max_pending_handshakes = 3)\n"
    assert isinstance(client.next_event(), h11.EndOfMessage)


# --- a real daemon process and real second and third uids -----------------------------------------


def _nogroup() -> str:
    return grp.getgrgid(NOBODY_GID).gr_name


def _needs_root() -> None:
    if os.getuid() != 0:
        pytest.skip(f"per-user rules need a second uid: running as uid {os.getuid()}, not root")


def _start(process: DaemonProcess, limits: str, top: str = "") -> None:
    config = process.directory / "statusd.toml"
    # The socket's group lets nobody and the third uid (both in it) connect.
    config.write_text(f'socket_group = "{_nogroup()}"\n{top}\n[limits]\n{limits}\n')
    process.start("--config", str(config))


def _info(sock: socket.socket) -> dict[str, Any]:
    """Send daemon.info and read one answer; ``closed`` says whether the daemon then hung up."""
    # A refused connection is answered and closed at once, maybe before this is sent.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(jsonrpc.encode_line(jsonrpc.request("daemon.info", None, 1)))
    reader = sock.makefile("rb")
    answer: dict[str, Any] = json.loads(reader.readline())
    return answer


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except OSError:
        return True


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(SERVED_WITHIN)
    sock.connect(str(path))
    return sock


@contextlib.contextmanager
def held_as(uid: int, path: Path, count: int) -> Iterator[list[dict[str, Any]]]:
    """A child that drops to ``uid`` (group nogroup) opens ``count`` connections one after
    the other, asks ``daemon.info`` on each, and holds them open until the block ends.
    Yields each connection's answer, with ``closed`` for a refused one the daemon hung up.
    """
    _needs_root()
    results_read, results_write = os.pipe()
    release_read, release_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(results_read)
        os.close(release_write)
        try:
            os.setgroups([])
            os.setgid(NOBODY_GID)
            os.setuid(uid)
            held = []
            outcome: Any = []
            for _ in range(count):
                held.append(_connect(path))
                answer = _info(held[-1])
                if "error" in answer:
                    answer["closed"] = _closed(held[-1])
                outcome.append(answer)
        except BaseException as exc:
            outcome = {"failed": f"{type(exc).__name__}: {exc}"}
        os.write(results_write, json.dumps(outcome).encode() + b"\n")
        os.read(release_read, 1)  # until the parent closes its end
        os._exit(0)
    os.close(results_write)
    os.close(release_read)
    try:
        ready, _, _ = select.select([results_read], [], [], 30)
        assert ready, f"the child as uid {uid} did not report"
        with os.fdopen(results_read) as source:
            results = json.loads(source.readline())
        assert not isinstance(results, dict), f"the child as uid {uid} failed: {results}"
        yield results
    finally:
        os.close(release_write)
        os.waitpid(pid, 0)


def served(path: Path) -> dict[str, Any]:
    """root's daemon.info, answered within SERVED_WITHIN seconds."""
    with _connect(path) as sock:
        answer = _info(sock)
    assert "result" in answer, answer
    result: dict[str, Any] = answer["result"]
    return result


def _one_call(path: Path) -> dict[str, Any]:
    with _connect(path) as sock:
        answer = _info(sock)
        if "error" in answer:
            answer["closed"] = _closed(sock)
    return answer


def one_call_as(uid: int, path: Path) -> dict[str, Any]:
    """``daemon.info`` as ``uid`` (group nogroup), answered within SERVED_WITHIN seconds."""
    answer: dict[str, Any] = run_as(uid, NOBODY_GID, lambda: _one_call(path))
    return answer


def served_again_as(uid: int, path: Path) -> None:
    """``uid`` is served once the daemon has seen the closed connections go (it reads
    their end of stream a moment after the child exits)."""
    deadline = time.monotonic() + SERVED_WITHIN
    while True:
        answer = one_call_as(uid, path)
        if "result" in answer:
            return
        assert time.monotonic() < deadline, answer
        time.sleep(0.01)


def refusal_of(answer: dict[str, Any], key: str, limit: int) -> str:
    assert answer["error"]["code"] == BUSY, answer
    assert answer["error"]["data"] == {"limit": limit, "key": key}
    assert answer["closed"] is True
    message: str = answer["error"]["message"]
    return message


def test_a_user_at_max_connections_per_user_leaves_others_served(daemon_process: Any) -> None:
    _needs_root()
    process = daemon_process()
    _start(process, "max_connections_per_user = 4")
    with held_as(NOBODY_UID, process.socket, 5) as nobody:
        assert [a["result"]["user"] for a in nobody[:4]] == ["nobody"] * 4
        message = refusal_of(nobody[4], "limits.max_connections_per_user", 4)
        assert message == (
            "too many connections from one user: 4 open, the most allowed "
            "(limits.max_connections_per_user = 4)"
        )
        # Meanwhile root and a third uid are answered within SERVED_WITHIN.
        assert served(process.socket)["admin"] is True
        assert one_call_as(THIRD_UID, process.socket)["result"]["user"] == str(THIRD_UID)
    # Once nobody's connections are gone, nobody is served again.
    served_again_as(NOBODY_UID, process.socket)


def test_admins_keep_their_reserve_when_users_fill_max_connections(daemon_process: Any) -> None:
    _needs_root()
    process = daemon_process()
    _start(
        process,
        "max_connections_per_user = 100\nadmin_connections = 2",
        top="max_connections = 6",
    )
    with held_as(NOBODY_UID, process.socket, 5) as nobody:
        assert all("result" in answer for answer in nobody[:4])
        message = refusal_of(nobody[4], "limits.admin_connections", 4)
        assert "the last 2 of max_connections = 6 are kept for admins" in message
        refusal_of(one_call_as(THIRD_UID, process.socket), "limits.admin_connections", 4)
        # root takes the two kept slots, and is served on them ...
        with _connect(process.socket) as one, _connect(process.socket) as two:
            assert _info(one)["result"]["admin"] is True
            assert _info(two)["result"]["admin"] is True
            # ... but not a seventh: max_connections holds for admins too.
            with _connect(process.socket) as seventh:
                answer = _info(seventh)
                answer["closed"] = _closed(seventh)
            refusal_of(answer, "max_connections", 6)
    served_again_as(THIRD_UID, process.socket)


def _limit_open_files(soft: int, hard: int) -> Any:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return limit


def _open_files_soft_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open files line in /proc/PID/limits")


def test_the_soft_open_files_limit_is_raised_to_the_hard_one(daemon_process: Any) -> None:
    process = daemon_process()
    hard = min(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    daemon = process.start(preexec_fn=_limit_open_files(64, hard))
    assert _open_files_soft_limit(daemon.pid) == hard
    assert f"open files limit: {hard} (hard limit {hard})" in process.stderr()


def _wait_for(condition: Any, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.01)


def test_accept_at_the_open_files_limit_logs_once_and_recovers(daemon_process: Any) -> None:
    process = daemon_process()
    limit = 64
    daemon = process.start(preexec_fn=_limit_open_files(limit, limit))
    in_use = len(os.listdir(f"/proc/{daemon.pid}/fd"))
    assert in_use < limit - 8
    clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(limit - in_use + 8)]
    try:
        for client in clients:
            client.connect(str(process.socket))  # waits in the backlog when not accepted
        _wait_for(lambda: "cannot accept a connection: EMFILE" in process.stderr())
        # Let the daemon's retries fail a few more times.
        time.sleep(0.5)
    finally:
        for client in clients:
            client.close()
    # Recovered: served again, within SERVED_WITHIN, once the descriptors are free.
    assert served(process.socket)["pid"] == daemon.pid
    _wait_for(lambda: "accepting connections again after" in process.stderr())
    log = process.stderr()
    assert log.count("cannot accept a connection") == 1
    assert "Traceback" not in log


# --- the WebSocket: per token, pending handshakes, headers, the address ------------------------


@attrs.define
class Started:
    daemon: Daemon
    streams: list[trio.SocketStream] = attrs.Factory(list)


@pytest.fixture
async def ws_start(nursery: trio.Nursery, short_tmp: Path) -> AsyncIterator[Any]:
    started: list[Started] = []

    async def _start(**overrides: Any) -> Started:
        config = attrs.evolve(ws_config(short_tmp), **overrides)
        started.append(Started(await nursery.start(run, config)))
        return started[-1]

    yield _start
    for handle in started:
        for stream in handle.streams:
            await trio.aclose_forcefully(stream)
        handle.daemon.request_stop()
        await handle.daemon.wait_stopped()


async def in_thread(function: Any, *args: Any) -> Any:
    with trio.fail_after(60):
        return await trio.to_thread.run_sync(function, *args)


async def unix_served(daemon: Daemon) -> None:
    client = await RawClient.connect(daemon.config.socket)
    try:
        with trio.fail_after(SERVED_WITHIN):
            assert (await client.call("daemon.info"))["pid"] == os.getpid()
    finally:
        await client.aclose()


@needs_root
async def test_websocket_connections_are_capped_per_token(ws_start: Any) -> None:
    _needs_root()
    started = await ws_start(
        limits=LimitsConfig(max_connections_per_user=2), socket_group=_nogroup()
    )
    daemon = started.daemon
    token = (await make_token(daemon, username="nobody"))["token"]
    second = (await make_token(daemon, username="nobody"))["token"]
    admin = (await make_token(daemon))["token"]

    def sessions() -> Any:
        with open_ws(daemon, token) as one, open_ws(daemon, token) as two:
            assert RpcClient(one).call("daemon.info")["user"] == "nobody"
            assert RpcClient(two).call("daemon.info")["admin"] is False
            with open_ws(daemon, token) as three:
                busy = json.loads(three.recv(TIMEOUT))
                with pytest.raises(ConnectionClosed) as caught:
                    three.recv(TIMEOUT)
                assert caught.value.rcvd is not None
                code = caught.value.rcvd.code
            # Another token has its own allowance; an admin's token is not capped.
            with open_ws(daemon, second) as other:
                started_at = time.monotonic()
                RpcClient(other).call("daemon.info")
                other_took = time.monotonic() - started_at
            with (
                open_ws(daemon, admin) as a,
                open_ws(daemon, admin) as b,
                open_ws(daemon, admin) as c,
            ):
                admins = [RpcClient(ws).call("daemon.info")["admin"] for ws in (a, b, c)]
            return busy, code, other_took, admins

    busy, code, other_took, admins = await in_thread(sessions)
    assert busy["error"] == {
        "code": BUSY,
        "message": "too many connections from one user: 2 open, the most allowed "
        "(limits.max_connections_per_user = 2)",
        "data": {"limit": 2, "key": "limits.max_connections_per_user"},
    }
    assert code == transport.TRY_AGAIN_LATER
    assert other_took < SERVED_WITHIN
    assert admins == [True] * 3


async def _silent(started: Started, daemon: Daemon) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port(daemon))
    started.streams.append(stream)
    return stream


_BUSY_BODY = (
    b"\r\n\r\ntoo many WebSocket handshakes in progress "
    b"(limits.max_pending_handshakes = %d); retry later\n"
)


async def _until_closed(stream: trio.SocketStream) -> bytes:
    received = b""
    while chunk := await stream.receive_some(4096):
        received += chunk
    return received


def _upgrade(token: str) -> bytes:
    return (
        f"GET /ws?token={token} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def _handshakes_at(daemon: Daemon, count: int) -> None:
    server = daemon.websocket
    assert server is not None
    with trio.fail_after(SERVED_WITHIN):
        while server.handshakes != count:  # noqa: ASYNC110 - the server's tasks, not ours
            await trio.sleep(0.001)


async def test_pending_handshakes_are_capped_and_the_unix_socket_is_served(
    ws_start: Any,
) -> None:
    started = await ws_start(limits=LimitsConfig(max_pending_handshakes=3))
    daemon = started.daemon
    token = (await make_token(daemon))["token"]
    silent = [await _silent(started, daemon) for _ in range(3)]
    await _handshakes_at(daemon, 3)
    # The next connection's request is answered 503 (its token is never looked at).
    refused = await _silent(started, daemon)
    await refused.send_all(_upgrade(token))
    with trio.fail_after(SERVED_WITHIN):
        response = await _until_closed(refused)
    assert response.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert response.endswith(_BUSY_BODY % 3)
    await unix_served(daemon)

    def complete_client() -> int:
        with pytest.raises(InvalidStatus) as caught:
            open_ws(daemon, token).close()
        status: int = caught.value.response.status_code
        return status

    assert await in_thread(complete_client) == 503
    # A handshake that completes frees its slot: then a client with a token gets in.
    await silent[0].send_all(_upgrade(token))
    assert (await silent[0].receive_some(4096)).startswith(b"HTTP/1.1 101 ")
    await _handshakes_at(daemon, 2)

    def session() -> Any:
        with open_ws(daemon, token) as ws:
            return RpcClient(ws).call("daemon.info")["admin"]

    assert await in_thread(session) is True
    assert daemon.websocket is not None
    assert daemon.websocket.handshakes == 2


async def test_slow_handshakes_time_out_and_free_their_slots(
    autojump_clock: trio.testing.MockClock, ws_start: Any
) -> None:
    started = await ws_start(limits=LimitsConfig(max_pending_handshakes=2))
    daemon = started.daemon
    token = (await make_token(daemon))["token"]
    slow = [await _silent(started, daemon) for _ in range(2)]
    # A slowloris: the request's first bytes, and then nothing.
    await slow[0].send_all(b"GET /ws HTTP/1.1\r\nHost: loc")
    await _handshakes_at(daemon, 2)
    start = trio.current_time()
    # The next one, as slow, is answered 503 when it has sent no request in time.
    refused = await _silent(started, daemon)
    assert (await _until_closed(refused)).endswith(_BUSY_BODY % 2)
    assert trio.current_time() - start == pytest.approx(transport.REFUSAL_WAIT, abs=0.1)
    for stream in slow:
        assert await stream.receive_some(4096) == b""
    assert trio.current_time() - start == pytest.approx(transport.HANDSHAKE_TIMEOUT, abs=0.1)
    await _handshakes_at(daemon, 0)
    stream = await _silent(started, daemon)
    await stream.send_all(_upgrade(token))
    assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 101 ")


async def test_two_origin_headers_are_refused(ws_start: Any) -> None:
    websocket = WebSocketConfig(listen=("127.0.0.1", 0), allowed_origins=("http://localhost:3000",))
    daemon = (await ws_start(websocket=websocket)).daemon
    token = (await make_token(daemon))["token"]
    one = "Origin: http://localhost:3000\r\n"
    two = one + "Origin: http://evil.example\r\n"
    two_hosts = "Host: evil.example\r\n"

    def attempt(extra: str) -> bytes:
        sock, head = raw_handshake(port(daemon), f"/ws?token={token}", "localhost", extra)
        with sock:
            if b" 101 " not in head:
                while chunk := sock.recv(4096):
                    head += chunk
        return head

    assert b" 101 " in await in_thread(attempt, one)
    head = await in_thread(attempt, two)
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"2 Origin headers: a request may carry at most one" in head
    # Both orders: the allowed origin last is no way around it.
    assert (await in_thread(attempt, "Origin: http://evil.example\r\n" + one)).startswith(
        b"HTTP/1.1 400 "
    )
    # Two Host headers never reach the checks: the HTTP parser refuses them.
    assert b" 101 " not in await in_thread(attempt, two_hosts)
    await unix_served(daemon)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_a_websocket_on_a_non_loopback_address_is_warned_about(
    nursery: trio.Nursery, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=transport.__name__)
    loopback = ws_config(short_tmp)
    daemon: Daemon = await nursery.start(run, loopback)
    assert not [r for r in caplog.records if "not a loopback address" in r.getMessage()]
    daemon.request_stop()
    await daemon.wait_stopped()
    # Every address: what a browser or a front-end on another machine would reach.
    anywhere = attrs.evolve(loopback, websocket=WebSocketConfig(listen=("0.0.0.0", _free_port())))
    daemon = await nursery.start(run, anywhere)
    try:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(
            "is not a loopback address: tokens travel in clear text" in message
            and "0.0.0.0:" in message
            for message in warnings
        ), warnings
    finally:
        daemon.request_stop()
        await daemon.wait_stopped()


# --- the unix socket: clients waiting for their identity ----------------------------------------


class SlowDirectory(CallerLookups):
    """A directory service that stalls while ``stalled`` is set (LDAP, SSSD at their worst)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.stalled = False
        self.waiting = 0
        self.answered = trio.Event()

    async def caller_for_uid(
        self, uid: int, admin_group: str | None, *, pid: int | None = None
    ) -> Caller:
        if self.stalled:
            self.waiting += 1
            await self.answered.wait()
        return await super().caller_for_uid(uid, admin_group, pid=pid)


async def test_unix_clients_waiting_for_their_identity_are_capped(
    nursery: trio.Nursery, short_tmp: Path
) -> None:
    config = ws_config(short_tmp, limits=LimitsConfig(max_pending_handshakes=2))
    daemon: Daemon = await nursery.start(run, attrs.evolve(config, websocket=WebSocketConfig()))
    directory = SlowDirectory()
    daemon.unix.lookups = directory
    clients: list[RawClient] = []
    try:
        first = await RawClient.connect(config.socket)
        clients.append(first)
        assert (await first.call("daemon.info"))["admin"] is True
        directory.stalled = True
        for _ in range(2):
            clients.append(await RawClient.connect(config.socket))
            await clients[-1].send(jsonrpc.encode_line(jsonrpc.request("daemon.info", None, 1)))
        with trio.fail_after(SERVED_WITHIN):
            while directory.waiting < 2:  # noqa: ASYNC110 - the daemon's tasks, not ours
                await trio.sleep(0.001)
        refused = await RawClient.connect(config.socket)
        clients.append(refused)
        with trio.fail_after(SERVED_WITHIN):
            answer = await refused.receive()
        assert answer["error"] == {
            "code": BUSY,
            "message": "too many connections waiting to be admitted "
            "(limits.max_pending_handshakes = 2)",
            "data": {"limit": 2, "key": "limits.max_pending_handshakes"},
        }
        with pytest.raises(EOFError):
            await refused.receive()
        # A client already admitted is served meanwhile.
        with trio.fail_after(SERVED_WITHIN):
            assert "pid" in await first.call("daemon.info")
        directory.answered.set()
        for waiting in clients[1:3]:
            with trio.fail_after(SERVED_WITHIN):
                assert (await waiting.receive())["result"]["admin"] is True
    finally:
        for client in clients:
            await trio.aclose_forcefully(client.stream)
        daemon.request_stop()
        await daemon.wait_stopped()


@needs_root
async def test_connection_limits_change_on_reload(ws_start: Any) -> None:
    _needs_root()
    started = await ws_start(socket_group=_nogroup())
    daemon = started.daemon
    token = (await make_token(daemon, username="nobody"))["token"]
    limits = LimitsConfig(max_connections_per_user=1, max_pending_handshakes=1)
    assert await daemon.reload(lambda: attrs.evolve(daemon.config, limits=limits))

    def two_connections() -> Any:
        with open_ws(daemon, token) as one:
            RpcClient(one).call("daemon.info")
            with open_ws(daemon, token) as two:
                return json.loads(two.recv(TIMEOUT))["error"]["data"]

    assert await in_thread(two_connections) == {
        "limit": 1,
        "key": "limits.max_connections_per_user",
    }
    await _handshakes_at(daemon, 0)
    await _silent(started, daemon)
    await _handshakes_at(daemon, 1)
    refused = await _silent(started, daemon)
    await refused.send_all(_upgrade(token))
    with trio.fail_after(SERVED_WITHIN):
        assert (await _until_closed(refused)).endswith(_BUSY_BODY % 1)
