"""Status fan-out built once for every subscriber: WebSocket frames shared by every client
that takes the same lines, and the channel's answer shared by every reader at the same
seq with the same view.

The frames are read by a decoder written here from RFC 6455 (FIN, opcode, the 7, 16 and
64-bit lengths, no mask from a server) and by the ``websockets`` client; the sharing must
never cross users: each subscriber, on the Unix socket or the WebSocket, gets exactly what
its user may read.
"""

from __future__ import annotations

import grp
import json
import os
import socket
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.lowlevel

from statusd.channel import StatusChannel
from statusd.daemon import Daemon, run
from statusd.protocol import websocket as rules
from statusd.state.status import Audience, Level, Reader
from tests.conftest import NOBODY_GID, needs_root, run_as_nobody
from tests.websocket_clients import (
    TIMEOUT,
    make_token,
    open_ws,
    port,
    raw_handshake,
    ws_config,
)
from tests.websocket_clients import values as frame_values

B = "nobody"
ROOT = Reader("root", admin=True)

# -- a decoder from the RFC ------------------------------------------------------------------


@attrs.frozen
class Frame:
    fin: bool
    opcode: int
    length_code: int  # the 7-bit length field: the size, or 126 / 127 for 16 / 64 bits
    payload: bytes


def decode(data: bytes) -> tuple[list[Frame], bytes]:
    """The whole frames at the start of ``data`` and what is left; fails on a masked
    frame or a set reserved bit (a server sends neither)."""
    frames: list[Frame] = []
    at = 0
    while len(data) - at >= 2:
        first, second = data[at], data[at + 1]
        assert first & 0x70 == 0, "reserved bits set"
        assert second & 0x80 == 0, "a server's frame is masked"
        code = second & 0x7F
        head = 2
        size = code
        if code == 126:
            if len(data) - at < 4:
                break
            (size,) = struct.unpack_from("!H", data, at + 2)
            assert size >= 126, "a 16-bit length for a size that fits 7 bits"
            head = 4
        elif code == 127:
            if len(data) - at < 10:
                break
            (size,) = struct.unpack_from("!Q", data, at + 2)
            assert 65536 <= size < 1 << 63, "a 64-bit length for a size that fits 16 bits"
            head = 10
        if len(data) - at < head + size:
            break
        payload = data[at + head : at + head + size]
        frames.append(Frame(bool(first & 0x80), first & 0x0F, code, payload))
        at += head + size
    return frames, data[at:]


def line_of(size: int, tag: str = "x") -> bytes:
    """A push line whose JSON (its newline not counted) is ``size`` bytes."""
    bare = len(json.dumps({"p": ""}, separators=(",", ":")))
    line = json.dumps({"p": (tag * size)[: size - bare]}, separators=(",", ":")).encode()
    assert len(line) == size
    return line + b"\n"


EDGES = [(125, 125), (126, 126), (65535, 126), (65536, 127), (70000, 127)]


@pytest.mark.parametrize(("size", "code"), EDGES)
def test_one_message_frame_at_each_length_edge(size: int, code: int) -> None:
    line = line_of(size)
    frames, rest = decode(rules.encode_frames([line], True, rules.FrameCache()))
    assert rest == b""
    assert frames == [Frame(True, 0x1, code, line[:-1])]


@pytest.mark.parametrize(("size", "code"), EDGES)
def test_coalesced_array_at_each_length_edge(size: int, code: int) -> None:
    # "[" + a + "," + b + "]", each line keeping its newline.
    first = line_of(40)
    second = line_of(size - len(first) - 4, "y")
    frames, rest = decode(rules.encode_frames([first, second], True, rules.FrameCache()))
    assert rest == b""
    assert [(f.fin, f.opcode, f.length_code, len(f.payload)) for f in frames] == [
        (True, 0x1, code, size)
    ]
    assert json.loads(frames[0].payload) == [json.loads(first), json.loads(second)]


@pytest.mark.parametrize("coalesce", [False, True])
def test_every_subscriber_taking_the_same_lines_gets_the_same_bytes(coalesce: bool) -> None:
    cache = rules.FrameCache()
    lines = [line_of(300 + n) for n in range(20)]
    first = rules.encode_frames(list(lines), coalesce, cache)
    # Another subscriber's list: a new list of the same line objects.
    assert rules.encode_frames(list(lines), coalesce, cache) is first
    other = rules.encode_frames(list(lines), not coalesce, cache)
    assert other != first
    frames, rest = decode(first)
    assert rest == b""
    got = [value for frame in frames for value in frame_values(frame.payload)]
    assert got == [json.loads(line) for line in lines]
    assert len(frames) == (1 if coalesce else 20)


def test_the_batch_cache_starts_afresh_at_its_bounds_and_stays_right() -> None:
    cache = rules.FrameCache(batches=2, max_bytes=10_000)
    a, b, c = ([line_of(100, tag), line_of(120, tag)] for tag in "abc")
    kept = rules.encode_frames(a, True, cache)
    assert rules.encode_frames(a, True, cache) is kept
    rules.encode_frames(b, True, cache)
    rules.encode_frames(c, True, cache)  # a third batch: the cache starts afresh
    again = rules.encode_frames(a, True, cache)
    assert again == kept
    assert again is not kept
    big = [line_of(6_000, "d"), line_of(6_000, "e")]  # over max_bytes: built, not kept
    frame = rules.encode_frames(big, True, cache)
    assert rules.encode_frames(big, True, cache) == frame
    assert rules.encode_frames(big, True, cache) is not frame
    # A batch that splits into several arrays at the frame limit is cached as a whole.
    split = rules.encode_frames([line_of(200, t) for t in "fghij"], True, cache, limit=500)
    frames, rest = decode(split)
    assert rest == b""
    assert [len(frame_values(f.payload)) for f in frames] == [2, 2, 1]
    with pytest.raises(ValueError, match="batches must be >= 1"):
        rules.FrameCache(batches=0)


def test_big_answers_are_not_kept_past_the_byte_bound() -> None:
    """Answers are each one client's own: however many, the cache holds at most its
    bytes, and one bigger than that is built every time and never kept."""
    cache = rules.FrameCache(max_bytes=50_000)
    for n in range(200):
        answer = line_of(20_000, f"{n:04d}")
        frames, rest = decode(rules.encode_frames([answer], False, cache))
        assert rest == b""
        assert frames == [Frame(True, 0x1, 126, answer[:-1])]
        assert cache.size_bytes <= 50_000
    huge = line_of(60_000)
    assert rules.encode_frames([huge], False, cache) is not rules.encode_frames(
        [huge], False, cache
    )
    assert cache.size_bytes <= 50_000


# -- one answer per view in the channel ------------------------------------------------------


def _channel(capacity: int = 100) -> StatusChannel:
    return StatusChannel(capacity, now=lambda: datetime(2026, 12, 7, 14, 0, tzinfo=UTC))


def _texts(lines: list[bytes]) -> list[str]:
    return [json.loads(line)["params"]["message"] for line in lines]


def test_readers_of_one_view_share_an_answer_and_views_never_mix() -> None:
    channel = _channel()
    channel.publish_status(Level.INFO, "to all")
    channel.publish_status(Level.INFO, "alice's", user="alice", audience=Audience.USER)
    channel.publish_status(Level.INFO, "bob's", user="bob", audience=Audience.USER)
    alice = channel.lines_after(0, Reader("alice"))
    # Bob asks right after alice, at the same seq: his own answer, not hers.
    assert _texts(channel.lines_after(0, Reader("bob"))[0]) == ["to all", "bob's"]
    assert _texts(alice[0]) == ["to all", "alice's"]
    assert channel.lines_after(0, Reader("alice")) is alice  # another of alice's sessions
    admin = channel.lines_after(0, ROOT)
    assert _texts(admin[0]) == ["to all", "alice's", "bob's"]
    assert channel.lines_after(0, Reader("carol", admin=True)) is admin
    assert _texts(channel.lines_after(0, Reader("carol"))[0]) == ["to all"]
    assert _texts(channel.lines_after(1, Reader("alice"))[0]) == ["alice's"]
    # A publish changes what comes after every seq: nothing is served from before it.
    channel.publish_status(Level.INFO, "alice again", user="alice", audience=Audience.USER)
    assert _texts(channel.lines_after(0, Reader("alice"))[0]) == [
        "to all",
        "alice's",
        "alice again",
    ]
    assert _texts(channel.lines_after(0, Reader("bob"))[0]) == ["to all", "bob's"]


def test_shared_answers_count_drops_per_view() -> None:
    channel = _channel(capacity=4)
    for n in range(3):
        channel.publish_status(Level.INFO, f"a{n}", user="alice", audience=Audience.USER)
        channel.publish_status(Level.INFO, f"b{n}", user="bob", audience=Audience.USER)
    # Six messages in a history of four: a0 and b0 are gone.
    for _ in range(2):
        assert channel.lines_after(0, Reader("alice"))[1] == 1
        assert channel.lines_after(0, Reader("bob"))[1] == 1
        assert channel.lines_after(0, ROOT)[1] == 2


# -- through a real daemon: WebSocket and Unix subscribers of two users ----------------------


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    assert len(payload) < 126
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked


def subscribe_line(since: int) -> bytes:
    params = {"status": True, "since": since}
    return json.dumps({"jsonrpc": "2.0", "method": "subscribe", "params": params, "id": 1}).encode()


def _raw_ws_reader(
    daemon_port: int, token: str, since: int, until: str, codes: list[int]
) -> list[Any]:
    """A hand-made client on /ws?coalesce=1: every frame through ``decode``; the length
    codes it saw go into ``codes``."""
    extra = f"Authorization: Bearer {token}\r\n"
    sock, head = raw_handshake(daemon_port, "/ws?coalesce=1", extra=extra)
    with sock:
        assert head.startswith(b"HTTP/1.1 101"), head
        rest = head.partition(b"\r\n\r\n")[2]
        sock.sendall(client_frame(subscribe_line(since)))
        got: list[Any] = []
        while not any(v.get("params", {}).get("message") == until for v in got[-3:]):
            frames, rest = decode(rest)
            for frame in frames:
                assert frame.fin
                assert frame.opcode == 0x1, frame.opcode
                codes.append(frame.length_code)
                got.extend(frame_values(frame.payload))
            if not frames:
                chunk = sock.recv(1 << 20)
                assert chunk, "the daemon closed the connection"
                rest += chunk
        return got


def unix_reader(path: str, since: int, until: str) -> list[Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
        sock.sendall(subscribe_line(since) + b"\n")
        got: list[Any] = []
        data = b""
        while not any(v.get("params", {}).get("message") == until for v in got[-3:]):
            chunk = sock.recv(1 << 20)
            assert chunk, "the daemon closed the connection"
            data += chunk
            *lines, data = data.split(b"\n")
            got.extend(json.loads(line) for line in lines)
        return got


def _ws_reader(daemon: Daemon, token: str, query: str, since: int, until: str) -> list[Any]:
    with open_ws(daemon, token, "/ws" + query, max_size=None) as ws:
        ws.send(subscribe_line(since).decode())
        got: list[Any] = []
        while not any(v.get("params", {}).get("message") == until for v in got[-3:]):
            got.extend(frame_values(ws.recv(TIMEOUT)))
        return got


def _statuses(got: list[Any]) -> list[tuple[int, str]]:
    return [
        (v["params"]["seq"], v["params"]["message"]) for v in got if v.get("method") == "status"
    ]


@needs_root
async def test_subscribers_of_two_users_on_both_transports_get_their_view_in_order(
    nursery: trio.Nursery, short_tmp: Path
) -> None:
    config = ws_config(
        short_tmp, socket_group=grp.getgrgid(NOBODY_GID).gr_name, status_history=2000
    )
    daemon: Daemon = await nursery.start(run, config)
    admin_token = (await make_token(daemon, scope="read"))["token"]
    b_token = (await make_token(daemon, scope="read", username=B))["token"]
    channel = daemon.channel
    since = channel.last_seq
    expected: dict[str, list[tuple[int, str]]] = {"admin": [], "b": []}

    def publish(count: int, tag: str) -> None:
        # No checkpoint in between: every subscriber takes the burst as one batch.
        for n in range(count):
            for user, audience in ((None, None), (B, Audience.USER), ("root", Audience.USER)):
                text = f"{tag} {n} {user} " + "z" * 150
                message = channel.publish_status(Level.INFO, text, user=user, audience=audience)
                assert message is not None
                expected["admin"].append((message.seq, text))
                if user in (None, B):
                    expected["b"].append((message.seq, text))
        end = channel.publish_status(Level.INFO, f"END {tag}")
        assert end is not None
        for view in expected.values():
            view.append((end.seq, f"END {tag}"))

    # A backlog past 64 KiB (one array frame with a 64-bit length), then live bursts.
    publish(150, "backlog")
    ws_port, path = port(daemon), str(daemon.config.socket)
    codes: list[int] = []
    readers = {
        "admin raw ws": lambda: _raw_ws_reader(ws_port, admin_token, since, "END live", codes),
        "admin ws, a frame each": lambda: _ws_reader(daemon, admin_token, "", since, "END live"),
        "admin unix": lambda: unix_reader(path, since, "END live"),
        "b ws 1": lambda: _ws_reader(daemon, b_token, "?coalesce=1", since, "END live"),
        "b ws 2": lambda: _ws_reader(daemon, b_token, "?coalesce=1", since, "END live"),
        "b unix": lambda: run_as_nobody(lambda: unix_reader(path, since, "END live")),
    }
    results: dict[str, list[Any]] = {}

    async def read(name: str) -> None:
        results[name] = await trio.to_thread.run_sync(readers[name])

    async with trio.open_nursery() as clients:
        for name in readers:
            clients.start_soon(read, name)
        with trio.fail_after(30):
            # Live from here on for whoever has subscribed; the rest read the backlog.
            # The daemon has no event for a count of connections: look now and then.
            while daemon.websocket is None or daemon.websocket.connections < 4:  # noqa: ASYNC110
                await trio.sleep(0.01)
        for burst in range(5):
            publish(20, f"burst {burst}")
            await trio.lowlevel.checkpoint()
        publish(1, "live")
    for name, got in results.items():
        view = "b" if name.startswith("b ") else "admin"
        statuses = _statuses(got)
        assert statuses == expected[view], name
        assert not any(v.get("method") == "dropped" for v in got), name
    assert 127 in codes  # the backlog's array
    assert 126 in codes  # a live burst's array
    assert not any(" root " in text for _, text in _statuses(results["b unix"]))
    daemon.request_stop()
    await daemon.wait_stopped()


async def test_a_closed_connection_is_sent_nothing_while_others_are_served(
    nursery: trio.Nursery, short_tmp: Path
) -> None:
    daemon: Daemon = await nursery.start(run, ws_config(short_tmp, status_history=1000))
    token = (await make_token(daemon, scope="read"))["token"]
    channel = daemon.channel
    since = channel.last_seq
    extra = f"Authorization: Bearer {token}\r\n"
    sock, head = await trio.to_thread.run_sync(
        lambda: raw_handshake(port(daemon), "/ws?coalesce=1", extra=extra)
    )
    with sock:
        assert head.startswith(b"HTTP/1.1 101"), head
        rest = head.partition(b"\r\n\r\n")[2]
        sock.sendall(client_frame(subscribe_line(since)))

        def read_until_close() -> tuple[list[Frame], bytes]:
            nonlocal rest
            seen: list[Frame] = []
            while True:
                frames, rest = decode(rest)
                seen.extend(frames)
                if any(frame.opcode == 0x8 for frame in frames):
                    return seen, rest
                chunk = sock.recv(1 << 16)
                assert chunk, "the connection ended without a close frame"
                rest += chunk

        # The subscription's answer, then the client closes.
        first = await trio.to_thread.run_sync(sock.recv, 1 << 16)
        rest += first
        sock.sendall(client_frame(struct.pack("!H", 1000), opcode=0x8))
        seen, rest = await trio.to_thread.run_sync(read_until_close)
        closes = [frame for frame in seen if frame.opcode == 0x8]
        assert seen[-1] is closes[0]
        for n in range(300):
            channel.publish_status(Level.INFO, f"after the close {n}")
        channel.publish_status(Level.INFO, "END")
        # Another subscriber is served meanwhile, from the history.
        other = await trio.to_thread.run_sync(
            lambda: _ws_reader(daemon, token, "?coalesce=1", since, "END")
        )
        assert [text for _, text in _statuses(other)][-1] == "END"

        def rest_of_stream() -> bytes:
            sock.settimeout(TIMEOUT)
            data = b""
            while chunk := sock.recv(1 << 16):
                data += chunk
            return data

        assert rest + await trio.to_thread.run_sync(rest_of_stream) == b""
    daemon.request_stop()
    await daemon.wait_stopped()
