"""A small file's HTTP exchange, made cheaper (docs/bench-daemon.md, "Change: less CPU per
small file"): request headers made and checked by h11 once per set and reused
(``HTTPClient.request_headers``), the request sent in one write and the response head
received with less around them, one object per exchange for its host slot and connection.
What each must still guarantee: every request carries exactly the headers its item asked
for (credentials, a resume's Range, Host with its port, a proxy's absolute form), nothing
of one item's leaks into another's, the read timeout still bounds a silent server, a
cancel still takes effect at once, and the host slots stay first come first served.

Real servers on 127.0.0.1; a raw one here records each request head byte for byte.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
import trio
import trio.testing

from statusd.downloads import files
from statusd.downloads.engine import DownloadItem, DownloadSettings, ItemState, download_item
from statusd.downloads.http import (
    REQUEST_HEADS_KEPT,
    USER_AGENT,
    HTTPClient,
    Origin,
    ReadTimeout,
)
from statusd.proxy import ProxyRules, parse_proxy
from tests import http_servers
from tests.http_servers import (
    HTTPTestServer,
    Request,
    Responder,
    hang_before_head,
    held,
    serve_data,
)
from tests.proxy_server import ProxyTestServer

BODY = bytes(range(256)) * 64  # 16 KiB, as the benchmark's files
FAST = DownloadSettings(max_attempts=1, backoff_initial=0, read_timeout=5)
_RANGE = re.compile(r"bytes=(\d+)-$")
http_server = http_servers.http_server


class RawServer:
    """Answers every GET with ``BODY`` (a 206 for ``Range: bytes=N-``), keeping the
    connection alive, and keeps each request head as it came: its lines in order."""

    def __init__(self) -> None:
        self.heads: list[list[str]] = []
        self.port = 0
        self.connections = 0
        # path -> the bytes to answer with instead (then the connection closes if
        # ``close`` names the path): a server that lies.
        self.answers: dict[str, bytes] = {}
        self.close: set[str] = set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                self.heads.append(lines)
                path = lines[0].split(" ")[1]
                if path in self.answers:
                    await stream.send_all(self.answers[path])
                    if path in self.close:
                        return
                    continue
                wanted = [line for line in lines if line.lower().startswith("range:")]
                match = _RANGE.match(wanted[0].partition(":")[2].strip()) if wanted else None
                start = int(match.group(1)) if match else 0
                status = "206 Partial Content" if match else "200 OK"
                extra = f"Content-Range: bytes {start}-{len(BODY) - 1}/{len(BODY)}\r\n"
                answer = (
                    f"HTTP/1.1 {status}\r\nContent-Length: {len(BODY) - start}\r\n"
                    f'ETag: "v1"\r\n{extra if match else ""}\r\n'
                ).encode("latin-1")
                await stream.send_all(answer + BODY[start:])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await trio.aclose_forcefully(stream)


@pytest.fixture
async def raw(nursery: trio.Nursery) -> RawServer:
    server = RawServer()
    await nursery.start(server.serve)
    return server


def ours(port: int) -> list[str]:
    return [
        f"Host: 127.0.0.1:{port}",
        f"User-Agent: {USER_AGENT}",
        "Accept: */*",
        "Accept-Encoding: identity",
    ]


def basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


async def fetch(
    client: HTTPClient, item: DownloadItem, dest: Path, state: ItemState | None = None
) -> None:
    result = await download_item(client, item, dest, FAST, state or ItemState())
    assert result.error is None


async def test_each_request_carries_exactly_its_items_headers(
    raw: RawServer, tmp_path: Path
) -> None:
    token = DownloadItem(raw.url("/a"), headers={"Authorization": "Bearer t1"})
    login = DownloadItem(raw.url("/b").replace("//", "//u:p@", 1))
    agent = DownloadItem(raw.url("/c"), headers={"User-Agent": "mine/1", "X-Extra": "1"})
    async with HTTPClient() as client:
        for item in (token, token, DownloadItem(raw.url("/d")), login, agent, token):
            await fetch(client, item, tmp_path)
    base = ours(raw.port)
    assert raw.heads == [
        ["GET /a HTTP/1.1", *base, "Authorization: Bearer t1"],
        ["GET /a HTTP/1.1", *base, "Authorization: Bearer t1"],
        ["GET /d HTTP/1.1", *base],
        ["GET /b HTTP/1.1", *base, f"Authorization: {basic('u:p')}"],
        [
            "GET /c HTTP/1.1",
            f"Host: 127.0.0.1:{raw.port}",
            "Accept: */*",
            "Accept-Encoding: identity",
            "User-Agent: mine/1",
            "X-Extra: 1",
        ],
        ["GET /a HTTP/1.1", *base, "Authorization: Bearer t1"],
    ]
    assert raw.connections == 1  # every request on the one kept-alive connection


async def test_a_resume_asks_for_its_own_range_and_the_next_item_for_none(
    raw: RawServer, tmp_path: Path
) -> None:
    part = files.part_name("r.bin", "t-0")
    (tmp_path / part).write_bytes(BODY[:1000])
    resumed = ItemState(name="r.bin", part=part, validator='"v1"')
    async with HTTPClient() as client:
        await fetch(client, DownloadItem(raw.url("/r.bin")), tmp_path, resumed)
        await fetch(client, DownloadItem(raw.url("/s.bin")), tmp_path)
    assert raw.heads == [
        ["GET /r.bin HTTP/1.1", *ours(raw.port), "Range: bytes=1000-", 'If-Range: "v1"'],
        ["GET /s.bin HTTP/1.1", *ours(raw.port)],
    ]
    assert (tmp_path / "r.bin").read_bytes() == BODY
    assert (tmp_path / "s.bin").read_bytes() == BODY


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        (Origin("http", "example.org", 80), "example.org"),
        (Origin("http", "example.org", 8080), "example.org:8080"),
        (Origin("https", "example.org", 443), "example.org"),
        (Origin("https", "example.org", 80), "example.org:80"),
        (Origin("http", "::1", 8080), "[::1]:8080"),
    ],
)
async def test_host_names_its_port_unless_the_schemes_own(origin: Origin, host: str) -> None:
    async with HTTPClient() as client:
        made = client.request_headers(origin, ())
        assert made is client.request_headers(origin, ())  # made once, then reused
    assert [(name, value) for name, value in made] == [
        (b"host", host.encode()),
        (b"user-agent", USER_AGENT.encode()),
        (b"accept", b"*/*"),
        (b"accept-encoding", b"identity"),
    ]


async def test_the_kept_header_sets_are_bounded() -> None:
    async with HTTPClient() as client:
        origin = Origin("http", "example.org", 80)
        first = client.request_headers(origin, (("Range", "bytes=0-"),))
        for n in range(1, REQUEST_HEADS_KEPT * 3):
            client.request_headers(origin, (("Range", f"bytes={n}-"),))
        assert len(client._request_heads) == REQUEST_HEADS_KEPT
        again = client.request_headers(origin, (("Range", "bytes=0-"),))
        assert again is not first  # dropped, made again, and equal
        assert list(again) == list(first)


async def test_a_proxied_request_and_a_direct_one_to_the_same_origin_differ(
    nursery: trio.Nursery, http_server: HTTPTestServer, tmp_path: Path
) -> None:
    proxy = ProxyTestServer(credentials="user:pw")
    await nursery.start(proxy.serve)
    url = http_server.route("/p.bin", serve_data(BODY))
    chosen = parse_proxy(proxy.url_with("user:pw"))
    async with HTTPClient(proxies=ProxyRules(chosen, chosen)) as client:
        await fetch(client, DownloadItem(url), tmp_path)
        client.proxies = ProxyRules()  # a reload that turns the proxy off
        await fetch(client, DownloadItem(url), tmp_path)
    assert [request.target for request in proxy.requests] == [url]
    assert proxy.requests[0].headers["proxy-authorization"] == basic("user:pw")
    direct = http_server.requests_for("/p.bin")
    assert [request.target for request in direct] == ["/p.bin", "/p.bin"]
    assert "proxy-authorization" not in direct[1].headers


class SlowHead:
    """Answers with its head a few bytes at a time, ``pause`` seconds apart."""

    def __init__(self, pause: float, pieces: int = 6) -> None:
        self.pause = pause
        self.pieces = pieces

    async def __call__(self, request: Request, responder: Responder) -> None:
        head = f'HTTP/1.1 200 OK\r\nContent-Length: {len(BODY)}\r\nETag: "v1"\r\n\r\n'.encode()
        step = -(-len(head) // self.pieces)
        for start in range(0, len(head), step):
            await responder.send_raw(head[start : start + step])
            await trio.sleep(self.pause)
        await responder.send_raw(BODY)


async def test_the_read_timeout_bounds_each_wait_for_the_head_not_the_whole_head(
    autojump_clock: trio.testing.MockClock, http_server: HTTPTestServer
) -> None:
    # Each piece within the timeout, all of them past it: the wait restarts on progress.
    url = http_server.route("/slow", SlowHead(pause=0.8))
    async with HTTPClient(read_timeout=1.0) as client:
        async with client.stream("GET", url) as response:
            assert (response.status, await response.read()) == (200, BODY)
        start = trio.current_time()
        with pytest.raises(ReadTimeout, match=r"timed out after 1 s waiting for data from"):
            async with client.stream("GET", http_server.route("/slower", SlowHead(pause=1.5))):
                pass
        assert trio.current_time() - start == pytest.approx(1.0, abs=0.1)


async def test_a_head_in_many_pieces_is_one_answer(http_server: HTTPTestServer) -> None:
    url = http_server.route("/bits", SlowHead(pause=0, pieces=40))
    async with HTTPClient() as client:
        for _ in range(2):
            async with client.stream("GET", url) as response:
                assert response.headers.get("etag") == '"v1"'
                assert await response.read() == BODY
        assert client.statistics().connections_opened == 1


async def test_a_cancel_asked_for_before_the_request_sends_nothing(raw: RawServer) -> None:
    async with HTTPClient() as client:
        with trio.CancelScope() as scope:
            scope.cancel()
            async with client.stream("GET", raw.url("/x")):
                pytest.fail("the exchange began under a cancel")
        assert scope.cancelled_caught
        assert client.requests_in_flight("127.0.0.1") == 0
    assert raw.heads == []


async def test_a_cancel_while_waiting_for_the_head_returns_at_once_and_frees_the_slot(
    autojump_clock: trio.testing.MockClock, http_server: HTTPTestServer
) -> None:
    url = http_server.route("/hang", hang_before_head())
    async with HTTPClient(read_timeout=60) as client:
        with trio.move_on_after(5) as scope:
            async with client.stream("GET", url):
                pytest.fail("a head came from a server that sends none")
        assert scope.cancelled_caught
        assert trio.current_time() == pytest.approx(5)  # the cancel, not the read timeout
        assert client.requests_in_flight("127.0.0.1") == 0
        assert client.idle_connections() == 0  # a connection cut mid-answer is not kept


async def test_host_slots_are_taken_first_come_first_served(
    http_server: HTTPTestServer,
) -> None:
    release = trio.Event()
    first = http_server.route("/first", held(BODY, 100, release))
    order: list[str] = []
    async with HTTPClient(max_per_host=1) as client:

        async def get(name: str) -> None:
            url = first if name == "first" else http_server.route(f"/{name}", serve_data(BODY))
            async with client.stream("GET", url) as response:
                order.append(name)
                await response.read()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(get, "first")
            await trio.testing.wait_all_tasks_blocked()
            for name in ("second", "third"):
                nursery.start_soon(get, name)
                await trio.testing.wait_all_tasks_blocked()
            assert order == ["first"]
            assert client.requests_in_flight("127.0.0.1") == 1
            release.set()
        assert order == ["first", "second", "third"]
        assert client.requests_in_flight("127.0.0.1") == 0


def answer(body: bytes, *, length: int | None = None) -> bytes:
    length = len(body) if length is None else length
    return f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n\r\n".encode() + body


async def test_a_body_shorter_than_its_content_length_is_not_a_file(
    raw: RawServer, tmp_path: Path
) -> None:
    # Head and the short body in one write, then the connection closes: all of it
    # arrives with the head's receive.
    raw.answers["/short"] = answer(BODY[:10_000], length=len(BODY))
    raw.close.add("/short")
    async with HTTPClient() as client:
        result = await download_item(
            client, DownloadItem(raw.url("/short")), tmp_path, FAST, ItemState()
        )
        assert result.error is not None
        assert "without sending complete message body" in result.error
        await fetch(client, DownloadItem(raw.url("/next")), tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["next"]
    assert (tmp_path / "next").read_bytes() == BODY


async def test_bytes_past_the_content_length_are_neither_the_file_nor_the_next_answer(
    raw: RawServer, tmp_path: Path
) -> None:
    # What follows the body looks like an answer to the next request: it must not be
    # taken as one.
    forged = answer(b"forged" * 100)
    raw.answers["/long"] = answer(BODY) + forged
    async with HTTPClient() as client:
        await fetch(client, DownloadItem(raw.url("/long")), tmp_path)
        await fetch(client, DownloadItem(raw.url("/next")), tmp_path)
    assert (tmp_path / "long").read_bytes() == BODY
    assert (tmp_path / "next").read_bytes() == BODY
    assert [head[0] for head in raw.heads] == ["GET /long HTTP/1.1", "GET /next HTTP/1.1"]
    assert raw.connections == 2  # the liar's connection was not kept


async def test_a_small_chunked_body_is_whole_and_its_connection_kept(
    raw: RawServer, tmp_path: Path
) -> None:
    chunks = b"".join(
        f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        for piece in (BODY[:5000], BODY[5000:5001], BODY[5001:])
    )
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    raw.answers["/chunked"] = head + chunks + b"0\r\n\r\n"
    async with HTTPClient() as client:
        await fetch(client, DownloadItem(raw.url("/chunked")), tmp_path)
        await fetch(client, DownloadItem(raw.url("/next")), tmp_path)
        assert client.statistics().connections_opened == 1
    assert (tmp_path / "chunked").read_bytes() == BODY
