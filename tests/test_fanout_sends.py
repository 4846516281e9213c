"""Status messages to idle subscribers sent by one fan-out task per transport.

A publish queues every idle subscriber that may read the message on its transport's
``Fanout``; once the publisher's turn is over that one task writes to each of them,
without blocking, what it has pending. A subscriber whose socket takes only part of it,
or that is busy with a backlog, is its writer's again, under the usual rules (order,
drop-oldest with a ``dropped`` notice). What these tests hold the mechanism to: each
subscriber's messages in order whichever task sent them; a subscriber that reads nothing
costs the others nothing; a connection that closes is sent nothing more; a frame the
fan-out left half-written is never cut by trio-websocket's own frames (a pong); each user
gets their own view. Which task sent what is seen by wrapping ``Session.take_pending``.
"""

from __future__ import annotations

import grp
import json
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from statusd.channel import StatusChannel
from statusd.daemon import Daemon, run
from statusd.events import Streams
from statusd.identity import Caller
from statusd.session import Fanout, Session
from statusd.state.status import Audience, Level
from tests.conftest import NOBODY_GID, make_config, needs_root, run_as_nobody
from tests.test_fanout_frames import Frame, client_frame, decode, subscribe_line, unix_reader
from tests.websocket_clients import TIMEOUT, make_token, port, ws_config

B = "nobody"
TEXT = "y" * 180  # near the 200-character cut: few messages fill a socket
FANOUT_TASK = "Fanout.run"


@pytest.fixture
def senders(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Session, str]]:
    """(session, name of the task that took its pending lines), for every non-empty take."""
    taken: list[tuple[Session, str]] = []
    take = Session.take_pending

    def spy(session: Session) -> list[bytes]:
        out = take(session)
        if out:
            taken.append((session, trio.lowlevel.current_task().name))
        return out

    monkeypatch.setattr(Session, "take_pending", spy)
    return taken


@pytest.fixture
async def opened() -> AsyncIterator[list[trio.socket.SocketType]]:
    """The test's client sockets, closed at its end whatever happened."""
    sockets: list[trio.socket.SocketType] = []
    yield sockets
    for sock in sockets:
        sock.close()


def by_fanout(taken: list[tuple[Session, str]], session: Session) -> bool:
    return any(s is session and name.endswith(FANOUT_TASK) for s, name in taken)


def by_others(taken: list[tuple[Session, str]], session: Session) -> bool:
    return any(s is session and not name.endswith(FANOUT_TASK) for s, name in taken)


def publish(channel: StatusChannel, count: int, tag: str) -> list[int]:
    """``count`` messages in one go (no checkpoint): their seqs."""
    seqs = []
    for n in range(count):
        message = channel.publish_status(Level.INFO, f"{tag} {n} {TEXT}")
        assert message is not None
        seqs.append(message.seq)
    return seqs


class UnixSubscriber:
    """A status subscriber on the Unix socket that reads only when told to."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.values: list[Any] = []
        self._data = b""

    @classmethod
    async def open(
        cls, daemon: Daemon, since: int, opened: list[trio.socket.SocketType]
    ) -> tuple[UnixSubscriber, Session]:
        before = set(daemon.unix._sessions)
        stream = await trio.open_unix_socket(str(daemon.config.socket))
        opened.append(stream.socket)
        subscriber = cls(stream)
        await stream.send_all(subscribe_line(since) + b"\n")
        await subscriber.read_until(lambda v: v.get("id") == 1)
        (session,) = set(daemon.unix._sessions) - before
        return subscriber, session

    async def read_until(self, done: Callable[[Any], bool]) -> None:
        with trio.fail_after(TIMEOUT):
            while not any(done(v) for v in self.values[-3:]):
                chunk = await self.stream.receive_some(1 << 20)
                assert chunk, "the daemon closed the connection"
                self._data += chunk
                *lines, self._data = self._data.split(b"\n")
                self.values.extend(json.loads(line) for line in lines)

    async def read_seq(self, seq: int) -> None:
        await self.read_until(lambda v: v.get("params", {}).get("seq") == seq)

    def seqs(self) -> list[int]:
        return [v["params"]["seq"] for v in self.values if v.get("method") == "status"]

    def dropped(self) -> int:
        notices = [v["params"] for v in self.values if v.get("method") == "dropped"]
        assert all(notice["stream"] == "status" for notice in notices)
        return sum(notice["count"] for notice in notices)


async def test_idle_and_backlogged_subscribers_each_get_every_message_in_order(
    nursery: trio.Nursery,
    short_tmp: Path,
    senders: list[tuple[Session, str]],
    opened: list[trio.socket.SocketType],
) -> None:
    """One subscriber reads along, one reads nothing until the end: the reader's messages
    leave from the fan-out, the other's from the fan-out until its socket is full and then
    from its writer; both get every seq once, in order, with nothing dropped."""
    daemon: Daemon = await nursery.start(run, make_config(short_tmp, status_history=10_000))
    channel = daemon.channel
    since = channel.last_seq
    idle, idle_session = await UnixSubscriber.open(daemon, since, opened)
    stalled, stalled_session = await UnixSubscriber.open(daemon, since, opened)
    published: list[int] = []
    for burst in range(12):
        # 12 x 300 messages of ~300 bytes: far past what a Unix socket buffers.
        published += publish(channel, 300, f"burst {burst}")
        await idle.read_seq(published[-1])
    await trio.testing.wait_all_tasks_blocked()
    assert stalled_session.has_pending()  # its writer holds the rest, waiting for room
    published += publish(channel, 1, "END")
    await idle.read_seq(published[-1])
    await stalled.read_seq(published[-1])
    assert idle.seqs() == published
    assert stalled.seqs() == published
    assert idle.dropped() == stalled.dropped() == 0
    assert by_fanout(senders, idle_session)
    assert by_fanout(senders, stalled_session)
    assert by_others(senders, stalled_session)
    daemon.request_stop()
    await daemon.wait_stopped()


async def test_a_subscriber_that_stops_reading_is_told_what_it_lost_and_costs_others_nothing(
    nursery: trio.Nursery,
    short_tmp: Path,
    senders: list[tuple[Session, str]],
    opened: list[trio.socket.SocketType],
) -> None:
    """With a history of 100, a subscriber that reads nothing while 3,000 messages go
    by gets a ``dropped`` notice and then the newest, each seq once and in order, and
    what it got plus what it was told it lost is everything. The other subscriber has
    each burst before the next is published (within the 10 s bound of ``read_seq``)."""
    daemon: Daemon = await nursery.start(run, make_config(short_tmp, status_history=100))
    channel = daemon.channel
    since = channel.last_seq
    reader, reader_session = await UnixSubscriber.open(daemon, since, opened)
    stalled, _ = await UnixSubscriber.open(daemon, since, opened)
    published: list[int] = []
    for burst in range(30):
        published += publish(channel, 100, f"burst {burst}")
        await reader.read_seq(published[-1])
    published += publish(channel, 1, "END")
    await reader.read_seq(published[-1])
    await stalled.read_seq(published[-1])
    assert reader.seqs() == published
    assert reader.dropped() == 0
    got = stalled.seqs()
    assert got == sorted(set(got))
    assert set(got) <= set(published)
    assert stalled.dropped() > 0
    assert len(got) + stalled.dropped() == len(published)
    assert by_fanout(senders, reader_session)
    daemon.request_stop()
    await daemon.wait_stopped()


# -- the WebSocket: a frame half-written by the fan-out ---------------------------------------


class WsSubscriber:
    """A hand-made /ws?coalesce=1 client on a trio socket with a small receive buffer, so
    the daemon's writes to it stop short soon; frames read through the RFC decoder."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.frames: list[Frame] = []
        self.values: list[Any] = []
        self._data = b""

    @classmethod
    async def open(
        cls, daemon: Daemon, token: str, since: int, opened: list[trio.socket.SocketType]
    ) -> tuple[WsSubscriber, Session]:
        assert daemon.websocket is not None
        before = {link.session for link in daemon.websocket._links}
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        opened.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", port(daemon)))
        request = (
            "GET /ws?coalesce=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        await sock.send(request.encode())
        subscriber = cls(sock)
        with trio.fail_after(TIMEOUT):
            while b"\r\n\r\n" not in subscriber._data:
                subscriber._data += await sock.recv(4096)
        head, _, subscriber._data = subscriber._data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        await sock.send(client_frame(subscribe_line(since), 0x1))
        await subscriber.read_until(lambda v: v.get("id") == 1)
        (session,) = {link.session for link in daemon.websocket._links} - before
        return subscriber, session

    async def read_until(self, done: Callable[[Any], bool]) -> None:
        with trio.fail_after(TIMEOUT):
            while not any(done(v) for v in self.values[-3:]):
                frames, self._data = decode(self._data)
                for frame in frames:
                    assert frame.fin
                    self.frames.append(frame)
                    if frame.opcode == 0x1:
                        value = json.loads(frame.payload)
                        self.values.extend(value if isinstance(value, list) else [value])
                if not frames:
                    chunk = await self.sock.recv(1 << 20)
                    assert chunk, "the daemon closed the connection"
                    self._data += chunk

    def seqs(self) -> list[int]:
        return [v["params"]["seq"] for v in self.values if v.get("method") == "status"]


def link_of(daemon: Daemon, session: Session) -> Any:
    assert daemon.websocket is not None
    (link,) = [link for link in daemon.websocket._links if link.session is session]
    return link


async def test_a_pong_waits_for_the_rest_of_a_frame_the_fanout_left_half_written(
    nursery: trio.Nursery,
    short_tmp: Path,
    senders: list[tuple[Session, str]],
    opened: list[trio.socket.SocketType],
) -> None:
    """The fan-out writes without trio-websocket's send lock; when the socket takes only
    part of a batch, the pong to a ping that arrives meanwhile must come after the whole
    frame, never inside it: every frame decodes, the pong carries the ping's payload, and
    the statuses arrive in order."""
    daemon: Daemon = await nursery.start(run, ws_config(short_tmp, status_history=10_000))
    token = (await make_token(daemon, scope="read"))["token"]
    channel = daemon.channel
    client, session = await WsSubscriber.open(daemon, token, channel.last_seq, opened)
    link = link_of(daemon, session)
    # One batch of ~1 MB in one turn: the fan-out's single write stops short.
    published = publish(channel, 3000, "batch")
    await trio.testing.wait_all_tasks_blocked()
    assert by_fanout(senders, session)
    assert link.ordered.half_written  # the writer is sending the rest
    await client.sock.send(client_frame(b"p1", 0x9))
    await trio.testing.wait_all_tasks_blocked()
    published += publish(channel, 1, "END")
    await client.read_until(lambda v: v.get("params", {}).get("seq") == published[-1])
    assert client.seqs() == published
    pongs = [frame for frame in client.frames if frame.opcode == 0xA]
    assert [pong.payload for pong in pongs] == [b"p1"]
    assert not link.ordered.half_written
    daemon.request_stop()
    await daemon.wait_stopped()


@pytest.mark.parametrize("transport", ["unix", "websocket"])
async def test_a_client_gone_while_its_send_is_unfinished_costs_only_itself(
    nursery: trio.Nursery, short_tmp: Path, transport: str, opened: list[trio.socket.SocketType]
) -> None:
    """A subscriber whose batch the socket took only part of goes away: its connection
    ends, and the other subscriber gets every message before and after."""
    config = ws_config(short_tmp, status_history=10_000)
    daemon: Daemon = await nursery.start(run, config)
    channel = daemon.channel
    since = channel.last_seq
    other, _ = await UnixSubscriber.open(daemon, since, opened)
    if transport == "unix":
        gone_unix, session = await UnixSubscriber.open(daemon, since, opened)
        close: Callable[[], Any] = gone_unix.stream.socket.close
        count: Callable[[], int] = lambda: daemon.unix.connections  # noqa: E731
    else:
        token = (await make_token(daemon, scope="read"))["token"]
        gone_ws, session = await WsSubscriber.open(daemon, token, since, opened)
        close = gone_ws.sock.close
        assert daemon.websocket is not None
        websocket = daemon.websocket
        count = lambda: websocket.connections  # noqa: E731
    published = publish(channel, 3000, "before")
    await trio.testing.wait_all_tasks_blocked()
    published += publish(channel, 10, "queued")
    await other.read_seq(published[-1])
    await trio.testing.wait_all_tasks_blocked()
    # Its writer is still sending the batch the socket took only part of; more is queued.
    assert session.has_pending()
    before = count()
    close()
    with trio.fail_after(TIMEOUT):
        while count() == before:  # noqa: ASYNC110 - no event for a count of connections
            await trio.sleep(0.01)
    assert session.closing
    published += publish(channel, 500, "after")
    await other.read_seq(published[-1])
    assert other.seqs() == published
    daemon.request_stop()
    await daemon.wait_stopped()


# -- the fan-out's own rules, with a stand-in transport ---------------------------------------


class StandIn:
    """A transport for one session: a writer task that only waits and records what it
    took, and a direct send that records what it took (or fails)."""

    def __init__(self, session: Session, fanout: Fanout, fail: BaseException | None = None):
        self.session = session
        self.direct: list[str] = []
        self.written: list[str] = []
        self.fail = fail
        session.fanout = fanout
        session.send_directly = self.send_now

    @staticmethod
    def _texts(lines: list[bytes]) -> list[str]:
        values = [json.loads(line) for line in lines]
        return [v["params"]["message"] if "params" in v else json.dumps(v) for v in values]

    def send_now(self) -> None:
        if self.fail is not None:
            raise self.fail
        self.direct += self._texts(self.session.take_pending())

    async def writer(self) -> None:
        while not self.session.closing:
            await self.session.wait_pending()
            self.written += self._texts(self.session.take_pending())


def caller(name: str, admin: bool = False) -> Caller:
    return Caller(uid=1000, username=name, admin=admin)


async def test_the_fanout_skips_closed_sessions_and_survives_a_failing_one(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A session closed while queued on the fan-out is not sent to by it (its writer
    flushes what came before the close, as ever); a send that fails closes that session
    alone (logged, unless the client just went away) and the fan-out goes on."""
    channel = StatusChannel(capacity=100)
    streams = Streams(channel)
    fanout = Fanout()
    nursery.start_soon(fanout.run)
    sessions = [Session(caller(f"user{n}"), streams) for n in range(4)]
    fine = StandIn(sessions[0], fanout)
    closing = StandIn(sessions[1], fanout)
    failing = StandIn(sessions[2], fanout, fail=RuntimeError("a bug in a send"))
    gone = StandIn(sessions[3], fanout, fail=trio.BrokenResourceError("gone"))
    for stand_in in (fine, closing, failing, gone):
        stand_in.session.subscribe(status=True)
        nursery.start_soon(stand_in.writer)
    await trio.testing.wait_all_tasks_blocked()
    channel.publish_status(Level.INFO, "one")
    closing.session.close()  # queued on the fan-out, closed before its turn
    await trio.testing.wait_all_tasks_blocked()
    assert fine.direct == ["one"]
    assert fine.written == []
    assert closing.direct == []
    assert failing.session.closing
    assert gone.session.closing
    assert "a bug in a send" in caplog.text
    assert "gone" not in caplog.text  # a client that went away is no error
    channel.publish_status(Level.INFO, "two")
    await trio.testing.wait_all_tasks_blocked()
    assert fine.direct == ["one", "two"]
    for closed in (closing, failing, gone):
        assert "two" not in closed.direct + closed.written


async def test_a_woken_writer_keeps_the_session_from_the_fanout(nursery: trio.Nursery) -> None:
    """A session whose writer is already awake (a reply queued) is its writer's: the
    fan-out does not send for it, so nothing can pass the writer's bytes."""
    channel = StatusChannel(capacity=100)
    fanout = Fanout()
    nursery.start_soon(fanout.run)
    session = Session(caller("alice"), Streams(channel))
    stand_in = StandIn(session, fanout)
    session.subscribe(status=True)
    nursery.start_soon(stand_in.writer)
    await trio.testing.wait_all_tasks_blocked()
    stand_in.written.clear()  # the subscription's wake-up found nothing
    channel.publish_status(Level.INFO, "by the fan-out")
    await trio.testing.wait_all_tasks_blocked()
    assert stand_in.direct == ["by the fan-out"]
    session.add_reply(b'{"reply":1}\n')
    channel.publish_status(Level.INFO, "by the writer")
    await trio.testing.wait_all_tasks_blocked()
    assert stand_in.direct == ["by the fan-out"]
    assert stand_in.written == ['{"reply": 1}', "by the writer"]


# -- two users ------------------------------------------------------------------------------


@needs_root
async def test_two_users_each_get_their_own_view_from_the_fanout(
    nursery: trio.Nursery,
    short_tmp: Path,
    senders: list[tuple[Session, str]],
    opened: list[trio.socket.SocketType],
) -> None:
    """Root (an admin) and nobody subscribe on both transports, idle; messages for all,
    for nobody and for root alone are published in bursts. Everyone gets exactly their
    view in seq order, sent by the fan-out; nobody never gets root's."""
    config = ws_config(
        short_tmp, socket_group=grp.getgrgid(NOBODY_GID).gr_name, status_history=5000
    )
    daemon: Daemon = await nursery.start(run, config)
    channel = daemon.channel
    since = channel.last_seq
    b_token = (await make_token(daemon, scope="read", username=B))["token"]
    admin_token = (await make_token(daemon, scope="read"))["token"]
    admin_unix, _ = await UnixSubscriber.open(daemon, since, opened)
    admin_ws, _ = await WsSubscriber.open(daemon, admin_token, since, opened)
    b_ws, b_ws_session = await WsSubscriber.open(daemon, b_token, since, opened)
    expected: dict[str, list[int]] = {"admin": [], "b": []}
    path = str(daemon.config.socket)
    b_unix: list[Any] = []

    async def read_as_nobody() -> None:
        got = await trio.to_thread.run_sync(
            lambda: run_as_nobody(lambda: unix_reader(path, since, "END"))
        )
        b_unix.extend(got)

    async with trio.open_nursery() as clients:
        clients.start_soon(read_as_nobody)
        with trio.fail_after(TIMEOUT):
            while daemon.unix.connections < 2:  # noqa: ASYNC110 - no event for a count
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        for burst in range(5):
            for n in range(20):
                for user, audience in ((None, None), (B, Audience.USER), ("root", Audience.USER)):
                    text = f"{burst} {n} {user}"
                    message = channel.publish_status(Level.INFO, text, user=user, audience=audience)
                    assert message is not None
                    expected["admin"].append(message.seq)
                    if user in (None, B):
                        expected["b"].append(message.seq)
            await trio.testing.wait_all_tasks_blocked()
        end = channel.publish_status(Level.INFO, "END")
        assert end is not None
        for view in expected.values():
            view.append(end.seq)
    for client in (admin_unix, admin_ws, b_ws):
        await client.read_until(lambda v: v.get("params", {}).get("message") == "END")
    assert admin_unix.seqs() == expected["admin"]
    assert admin_ws.seqs() == expected["admin"]
    assert b_ws.seqs() == expected["b"]
    b_unix_seqs = [v["params"]["seq"] for v in b_unix if v.get("method") == "status"]
    assert b_unix_seqs == expected["b"]
    assert not any(
        v["params"]["message"].endswith(" root")
        for v in [*b_unix, *b_ws.values]
        if v.get("method") == "status"
    )
    assert by_fanout(senders, b_ws_session)
    assert sum(1 for _, name in senders if name.endswith(FANOUT_TASK)) >= 4
    daemon.request_stop()
    await daemon.wait_stopped()
