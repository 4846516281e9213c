"""Real HTTP/1.1 servers on 127.0.0.1 for tests, with misbehaviour programmed per path.

The server runs in the test's own trio run (so MockClock covers it too) on an ephemeral
port, speaks HTTP/1.1 with keep-alive, and writes its answers as raw bytes, so a handler can
send exactly what a broken server would: a body cut off, a 206 from the wrong byte, a head
and then silence.

Use::

    from tests.http_servers import http_server  # in conftest.py, or import the fixture

    async def test_x(http_server):
        url = http_server.route("/f.bin", serve_data(b"..."))
        url = http_server.route("/flaky", sequence(status(503), serve_data(b"...")))
        ...
        assert http_server.requests_for("/flaky")[1].headers["range"] == "bytes=10-"

A handler is ``async def handler(request, responder)``; the helpers below build the usual
ones (``serve_data``, ``status``, ``redirect``, ``cut_off``, ``hang_before_head``,
``hang_after_head``, ``held``, ``sequence``).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Awaitable, Callable, Sequence
from email.utils import formatdate

import attrs
import pytest
import trio

MAX_REQUEST_HEAD = 64 * 1024
SEND_BLOCK = 256 * 1024
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@attrs.frozen
class Request:
    method: str
    target: str
    headers: dict[str, str]  # names lowercased
    connection: int  # which connection it came on (1, 2, ...), to check keep-alive
    number: int  # the n-th request to this path (1-based)

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


class Responder:
    """Writes one answer on one connection; handlers use it to behave well or badly."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self.closed = False

    async def send(
        self,
        status: int,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        *,
        reason: str | None = None,
    ) -> None:
        """A complete answer with Content-Length."""
        await self.send_head(status, [*headers, ("Content-Length", str(len(body)))], reason)
        await self.send_raw(body)

    async def send_head(
        self, status: int, headers: Sequence[tuple[str, str]], reason: str | None = None
    ) -> None:
        lines = [f"HTTP/1.1 {status} {reason or _REASONS.get(status, 'Whatever')}"]
        lines.append(f"Date: {formatdate(usegmt=True)}")
        lines += [f"{name}: {value}" for name, value in headers]
        await self.send_raw(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    async def send_raw(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), SEND_BLOCK):
            await self._stream.send_all(view[start : start + SEND_BLOCK])

    async def close(self) -> None:
        """Drop the connection now (mid-body, this is a body cut off)."""
        self.closed = True
        await trio.aclose_forcefully(self._stream)

    async def hang(self) -> None:
        """Say nothing more, ever (until the test ends)."""
        await trio.sleep_forever()


Handler = Callable[[Request, Responder], Awaitable[None]]


class HTTPTestServer:
    """Routes, a request log and the serving loop. ``base_url`` is set once started."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.requests: list[Request] = []
        self.base_url = ""
        self.port = 0
        self._counts: dict[str, itertools.count[int]] = {}
        self._connections = itertools.count(1)

    def route(self, path: str, handler: Handler) -> str:
        """Serve ``path`` with ``handler``; returns its full URL."""
        self.routes[path] = handler
        self._counts[path] = itertools.count(1)
        return self.url(path)

    def url(self, path: str) -> str:
        return self.base_url + path

    def requests_for(self, path: str) -> list[Request]:
        return [request for request in self.requests if request.path == path]

    @property
    def connections(self) -> int:
        """How many connections were accepted so far."""
        return len({request.connection for request in self.requests})

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled, on an ephemeral port the first time and on the same one
        after: cancelled and started again, it is a server that went away and came back."""
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        number = next(self._connections)
        responder = Responder(stream)
        buffer = b""
        try:
            while not responder.closed:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                    if len(buffer) > MAX_REQUEST_HEAD:
                        return
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, target, _version = request_line.split(" ", 2)
                headers = {}
                for line in header_lines:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                path = target.split("?", 1)[0]
                counter = self._counts.setdefault(path, itertools.count(1))
                request = Request(method, target, headers, number, next(counter))
                self.requests.append(request)
                handler = self.routes.get(path, _not_found)
                await handler(request, responder)
                if headers.get("connection", "").lower() == "close":
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await trio.aclose_forcefully(stream)


_REASONS = {
    200: "OK",
    206: "Partial Content",
    301: "Moved Permanently",
    302: "Found",
    404: "Not Found",
    416: "Range Not Satisfiable",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


async def _not_found(request: Request, responder: Responder) -> None:
    await responder.send(404, [("Content-Type", "text/plain")], b"no such path\n")


# -- handlers -----------------------------------------------------------------------------


def serve_data(
    data: bytes,
    *,
    etag: str | Callable[[Request], str] | None = '"v1"',
    last_modified: str | None = None,
    ranges: str = "honour",
    wrong_offset: int = 0,
    content_disposition: str | None = None,
    chunked: bool = False,
) -> Handler:
    """Serve ``data``, as a good server would unless told otherwise.

    ``etag`` may be a function of the request (an ETag that changes); ``ranges`` is
    ``"honour"`` (``Range`` with ``If-Range``, RFC 9110), ``"ignore"`` (always 200), or
    ``"ignore-if-range"`` (206 whatever the validator). ``wrong_offset`` shifts where a
    206 starts. ``chunked`` sends the body chunked, with no Content-Length.
    """

    async def handler(request: Request, responder: Responder) -> None:
        tag = etag(request) if callable(etag) else etag
        headers = [("Content-Type", "application/octet-stream"), ("Accept-Ranges", "bytes")]
        if tag is not None:
            headers.append(("ETag", tag))
        if last_modified is not None:
            headers.append(("Last-Modified", last_modified))
        if content_disposition is not None:
            headers.append(("Content-Disposition", content_disposition))
        match = _RANGE.fullmatch(request.headers.get("range", ""))
        if_range = request.headers.get("if-range")
        partial = match is not None and ranges != "ignore"
        if partial and ranges == "honour" and if_range is not None:
            partial = if_range in (tag, last_modified)
        if match is not None and partial:
            first = int(match[1]) + wrong_offset
            if first >= len(data):
                await responder.send(416, [("Content-Range", f"bytes */{len(data)}")])
                return
            body = data[first:]
            headers.append(("Content-Range", f"bytes {first}-{len(data) - 1}/{len(data)}"))
            await responder.send(206, headers, body)
        elif chunked:
            await responder.send_head(200, [*headers, ("Transfer-Encoding", "chunked")])
            for start in range(0, len(data), SEND_BLOCK):
                piece = data[start : start + SEND_BLOCK]
                await responder.send_raw(b"%x\r\n%s\r\n" % (len(piece), piece))
            await responder.send_raw(b"0\r\n\r\n")
        else:
            await responder.send(200, headers, data)

    return handler


def status(code: int, *, retry_after: str | None = None, body: bytes = b"oops\n") -> Handler:
    """An error answer (or any bodied status), optionally with Retry-After."""

    async def handler(request: Request, responder: Responder) -> None:
        headers = [("Content-Type", "text/plain")]
        if retry_after is not None:
            headers.append(("Retry-After", retry_after))
        await responder.send(code, headers, body)

    return handler


def redirect(location: str, code: int = 302) -> Handler:
    async def handler(request: Request, responder: Responder) -> None:
        await responder.send(code, [("Location", location)], b"moved\n")

    return handler


def cut_off(data: bytes, at: int, *, etag: str | None = '"v1"') -> Handler:
    """Announce all of ``data`` (honouring Range like ``serve_data``), send ``at`` bytes of
    the body, then drop the connection."""

    async def handler(request: Request, responder: Responder) -> None:
        headers = [("Accept-Ranges", "bytes")]
        if etag is not None:
            headers.append(("ETag", etag))
        first = 0
        match = _RANGE.fullmatch(request.headers.get("range", ""))
        if match is not None and request.headers.get("if-range") == etag:
            first = int(match[1])
            headers.append(("Content-Range", f"bytes {first}-{len(data) - 1}/{len(data)}"))
        body = data[first:]
        await responder.send_head(
            206 if first else 200, [*headers, ("Content-Length", str(len(body)))]
        )
        await responder.send_raw(body[:at])
        await responder.close()

    return handler


def hang_before_head() -> Handler:
    async def handler(request: Request, responder: Responder) -> None:
        await responder.hang()

    return handler


def hang_after_head(data: bytes, sent: int = 0, *, etag: str | None = '"v1"') -> Handler:
    """Announce ``data``, send its first ``sent`` bytes, then go silent."""

    async def handler(request: Request, responder: Responder) -> None:
        headers = [("Content-Length", str(len(data)))]
        if etag is not None:
            headers.append(("ETag", etag))
        await responder.send_head(200, headers)
        await responder.send_raw(data[:sent])
        await responder.hang()

    return handler


def held(data: bytes, at: int, release: trio.Event, *, etag: str | None = '"v1"') -> Handler:
    """Announce ``data``, send its first ``at`` bytes, then the rest once ``release`` is
    set: a transfer the test lets finish when it has seen what it wants mid-way."""

    async def handler(request: Request, responder: Responder) -> None:
        headers = [("Content-Length", str(len(data)))]
        if etag is not None:
            headers.append(("ETag", etag))
        await responder.send_head(200, headers)
        await responder.send_raw(data[:at])
        await release.wait()
        await responder.send_raw(data[at:])

    return handler


def sequence(*handlers: Handler) -> Handler:
    """The n-th request gets the n-th handler; the last one answers all the rest."""

    async def handler(request: Request, responder: Responder) -> None:
        await handlers[min(request.number, len(handlers)) - 1](request, responder)

    return handler


@pytest.fixture
async def http_server(nursery: trio.Nursery) -> HTTPTestServer:
    """A started ``HTTPTestServer``; it stops (with every hanging handler) when the test's
    nursery is cancelled at teardown."""
    server = HTTPTestServer()
    await nursery.start(server.serve)
    return server


class MultiPortHTTPServer(HTTPTestServer):
    """An ``HTTPTestServer`` on ``ports`` ports of 127.0.0.1 at once: each port is an origin
    of its own to a client (a pool's caps can be tried on hundreds of origins without
    hundreds of servers). The same routes answer on every port; ``base_urls`` has one URL
    per port, and ``open_connections`` counts the connections not yet closed."""

    def __init__(self, ports: int) -> None:
        super().__init__()
        self.base_urls: list[str] = []
        self.open_connections = 0
        self._ports = ports

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = []
        for _ in range(self._ports):
            listeners += await trio.open_tcp_listeners(0, host="127.0.0.1")
        ports = [listener.socket.getsockname()[1] for listener in listeners]
        self.base_urls = [f"http://127.0.0.1:{port}" for port in ports]
        self.port, self.base_url = ports[0], self.base_urls[0]
        task_status.started()
        await trio.serve_listeners(self._counted_connection, listeners)

    async def _counted_connection(self, stream: trio.SocketStream) -> None:
        self.open_connections += 1
        try:
            await self._connection(stream)
        finally:
            self.open_connections -= 1


def chunked_cut_before_last_chunk(
    data: bytes, *, etag: str | None = '"v1"', etag_on_416: bool = True, size_416: int = -1
) -> Handler:
    """Send all of ``data`` chunked and drop the connection before the last (empty) chunk;
    a request with ``Range: bytes=N-`` then gets 416 with ``Content-Range: bytes */SIZE``
    (``size_416``, by default the real size) and, with ``etag_on_416``, the ETag."""
    size = len(data) if size_416 < 0 else size_416

    async def handler(request: Request, responder: Responder) -> None:
        headers = [] if etag is None else [("ETag", etag)]
        if _RANGE.fullmatch(request.headers.get("range", "")):
            extra = headers if etag_on_416 else []
            await responder.send(416, [*extra, ("Content-Range", f"bytes */{size}")])
            return
        await responder.send_head(200, [*headers, ("Transfer-Encoding", "chunked")])
        for start in range(0, len(data), SEND_BLOCK):
            piece = data[start : start + SEND_BLOCK]
            await responder.send_raw(b"%x\r\n%s\r\n" % (len(piece), piece))
        await responder.close()

    return handler


def trickle(
    data: bytes,
    *,
    every: float,
    size: int = 1,
    sent: int = 0,
    chunked: bool = False,
    etag: str | None = '"v1"',
) -> Handler:
    """Announce ``data`` (its Content-Length, or chunked), send its first ``sent`` bytes at
    once, then ``size`` bytes every ``every`` seconds until the end: a server too slow to
    be worth a slot that is never quiet long enough for a read timeout."""

    async def handler(request: Request, responder: Responder) -> None:
        headers = [] if etag is None else [("ETag", etag)]
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        else:
            headers.append(("Content-Length", str(len(data))))
        await responder.send_head(200, headers)

        async def send(piece: bytes) -> None:
            if chunked:
                piece = b"%x\r\n%s\r\n" % (len(piece), piece) if piece else b"0\r\n\r\n"
            await responder.send_raw(piece)

        if sent:
            await send(data[:sent])
        for start in range(sent, len(data), size):
            await trio.sleep(every)
            await send(data[start : start + size])
        if chunked:
            await send(b"")

    return handler
