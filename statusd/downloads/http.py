"""A small HTTP/1.1 client for downloads: h11 over trio streams, with keep-alive reuse.

What lives here: opening connections (TCP, TLS with the system's trust store), a pool of idle
keep-alive connections per (scheme, host, port) with an idle timeout and caps, timeouts
(connect; idle read), a limit on the size of a response head, and streaming a response body
in large pieces. Host names go on the wire as IDNA 2008 (UTS 46) A-labels.

Why h11 and not httpx (measured with ``bench/downloads.py``, see
``docs/bench-downloads.md``): as HTTP layers alone (bodies read and dropped) on a 2-CPU
machine, this client read a 1 GiB body at 2.7 GB/s and 16 KiB files at 5,500/s (1.0x
aria2c writing them), httpx under trio at 0.37 GB/s and 1,100/s; the time went to httpx's
layers of per-request and per-chunk work (httpcore's pool, anyio, the decoders), not to
HTTP. h11 keeps the protocol logic pure and correct (framing, chunked bodies, keep-alive
rules); around it this module reads into reused buffers, and reads a large
Content-Length body straight from the socket into the caller's buffer (no copies), which
is what lets a download match curl.

Must not depend on the daemon, the task manager or the download engine: it knows nothing
of files, retries or redirects (a 3xx answer is returned like any other).
"""

from __future__ import annotations

import contextlib
import http
import os
import select
import socket
import ssl
import struct
import urllib.parse
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, TypeVar

import attrs
import h11
import idna
import trio

from statusd import __version__
from statusd.proxy import Proxy, ProxyRules

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 30.0
DEFAULT_RECEIVE_SIZE = 1 << 20
DEFAULT_MAX_HEADER_BYTES = 256 * 1024  # curl and aria2c take a 100 KB head; real ones exist
DEFAULT_MAX_IDLE_PER_ORIGIN = 32
DEFAULT_MAX_IDLE_TOTAL = 100
# Requests in flight to one host at once, over every task: a task of 10,000 items from one
# site must not hammer it with parallel_items connections (aria2c's -x defaults to 1, per
# download; browsers allow 6 per host).
DEFAULT_MAX_PER_HOST = 6
# Below the keep-alive timeouts of common servers (Apache 5 s, lighttpd 5 s, nginx 75 s), so
# that we, not the server, close an idle connection: a request sent just as the server
# closes fails. Items of one task follow each other within milliseconds, so a short
# timeout costs almost no reuse.
DEFAULT_IDLE_TIMEOUT = 4.0
# A connection back in use sooner than this after its last answer is taken without asking
# the kernel whether the server closed it: on a busy origin that would be a syscall per
# request, and a server that closes within a second of answering is covered by the retry
# in HTTPClient._send.
LIVENESS_CHECK_AFTER = 1.0
# ssl reads allocate what they are asked for; TLS records are 16 KiB anyway.
TLS_READ_SIZE = 256 * 1024
# Each connection reads into a buffer of its own (not one shared by all: trio checkpoints
# after a successful recv_into, and another connection's read would land on top). Reusing
# it saves allocating, and at 1 MiB mmap-ing and page-faulting, a bytes object per read.
# Large bodies bypass it (receive_into), so it need not be big.
CONNECTION_BUFFER = 256 * 1024
SMALL_SEND = 16 * 1024  # at most a fresh socket's send buffer
# A Content-Length body at least this large is read past h11, with no copies (see
# _Connection.enter_direct_mode); smaller ones keep their connection alive.
DIRECT_MIN_BYTES = 4 << 20

_R = TypeVar("_R")
# Connections are pooled per origin and proxy: one to a proxy for one origin is never
# used for another (the proxy may route, and log in, per origin).
_Route = tuple["Origin", Proxy | None]
USER_AGENT = f"statusd/{__version__}"
# A request's headers as h11 made and checked them (``HTTPClient.request_headers``); h11
# takes them back as they are.
RequestHeaders = Any
# Sets of request headers kept made (a task's items share one; a resume's Range makes one
# of its own), the least recently used dropped beyond this.
REQUEST_HEADS_KEPT = 64


class HTTPError(Exception):
    """Something went wrong between us and the server (not an HTTP error status)."""


class ConnectError(HTTPError):
    """The connection could not be opened, or broke while the request was sent."""


class ResolveError(ConnectError):
    """The host name did not resolve. ``temporary``: the resolver could not answer now
    (EAI_AGAIN), as opposed to saying there is no such name."""

    def __init__(self, message: str, *, temporary: bool) -> None:
        super().__init__(message)
        self.temporary = temporary


class TLSError(ConnectError):
    """The TLS handshake failed (certificate not trusted, wrong host name, protocol)."""


class ConnectTimeout(ConnectError):
    """The connection (DNS, TCP and TLS) took longer than the connect timeout."""


class ReadTimeout(HTTPError):
    """The server sent nothing for longer than the read timeout."""


class ProxyRefused(ConnectError):
    """The proxy answered CONNECT with something other than 2xx (``status``)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status

    @property
    def final(self) -> bool:
        """A 4xx (407: credentials, 403: a forbidden host) will not change on a retry; a
        5xx (the proxy could not reach the origin) may."""
        return 400 <= self.status < 500


class ProtocolError(HTTPError):
    """The server broke HTTP: a malformed or oversized head, or a body cut off early."""


class HeadTooLarge(ProtocolError):
    """The response head is larger than the client takes: asking again gets the same."""


@attrs.frozen
class Origin:
    """Where a connection goes; idle connections are pooled per origin. ``host`` is ASCII
    (an IDNA A-label for an internationalized name), as DNS, TLS and Host want it."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@attrs.frozen
class Headers:
    """Response headers, names lowercased, in the order received."""

    items: tuple[tuple[str, str], ...]

    def get(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        name = name.lower()
        for key, value in self.items:
            if key == name:
                return value
        return None

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self.items if key == name]


def split_url(url: str) -> tuple[Origin, str]:
    """The origin and the request target (path and query) of an http(s) URL.

    Raises ValueError for other schemes, a URL without a host or a host name IDNA 2008
    refuses; an internationalized host becomes its A-label (``faß.de`` ->
    ``xn--fa-hia.de``), and non-ASCII characters in the target are percent-encoded, as
    they must be on the wire.
    """
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"url scheme must be http or https, not '{parts.scheme}'")
    if not parts.hostname:
        raise ValueError("url must have a host")
    host = _ascii_host(parts.hostname)
    port = parts.port or (443 if scheme == "https" else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    if not target.isascii() or " " in target:
        target = urllib.parse.quote(target, safe="/%:@!$&'()*+,;=-._~?")
    return Origin(scheme, host, port), target


class Response:
    """A response whose head has arrived; the body is read with ``iter_bytes()``."""

    def __init__(
        self, connection: _Connection, url: str, status: int, reason: str, headers: Headers
    ) -> None:
        self._connection = connection
        self.url = url
        self.status = status
        self.reason = reason
        self.headers = headers

    def iter_bytes(self) -> _BodyIterator:
        """The body, in pieces as large as the network delivers (up to the receive size).

        Raises ProtocolError when the server closes the connection before the body it
        announced is complete, and ReadTimeout when it goes quiet.
        """
        return _BodyIterator(self._connection)

    async def receive_into(self, buffer: memoryview) -> int:
        """Read body bytes into ``buffer``; how many, or 0 at the end of the body.

        For the copy-free path: a large body with a Content-Length on plain TCP goes
        straight from the socket into ``buffer``. Errors as for ``iter_bytes()``.
        """
        return await self._connection.receive_body_into(buffer)

    def blocking_body(self) -> BlockingBody | None:
        """The rest of the body for a thread to receive, when it is a large Content-Length
        body on plain TCP (read past h11, see ``_Connection.enter_direct_mode``); None
        otherwise (TLS, chunked, small). While a thread uses it nothing else may read the
        response; the connection is closed afterwards, never pooled."""
        return self._connection.blocking_body()

    async def read(self, limit: int = 1 << 20) -> bytes:
        """The whole body, for small answers (error pages, tests); at most ``limit`` bytes."""
        data = bytearray()
        async for chunk in self.iter_bytes():
            data += chunk
            if len(data) > limit:
                raise ProtocolError(f"response body exceeds {limit} bytes")
        return bytes(data)


class BlockingBody:
    """A direct-mode body received by a thread of the caller's own. The socket is made
    blocking for it (trio never reads it again: the connection is closed afterwards)
    and each receive asks the kernel for the whole buffer (``MSG_WAITALL``), returning
    at least every ``WAIT_SLICE`` seconds (``SO_RCVTIMEO``) with what came: a fast
    body costs the thread one system call, and one taking of the GIL, per buffer rather
    than per few hundred KB, and a slow one still shows its progress. A wait with no
    data longer than the read timeout (on the system's clock) raises ``ReadTimeout``,
    errors named as the event loop's receives name them. ``interrupt`` (from the event
    loop: a cancel) shuts the socket's receiving side down, so a receive under way
    returns at once; it then raises ``Interrupted``."""

    def __init__(self, connection: _Connection, sock: socket.socket) -> None:
        self._connection = connection
        self._socket = sock
        self._interrupted = False
        self._stopping = False
        self._ready = False

    @property
    def remaining(self) -> int:
        """Body bytes not yet received."""
        connection = self._connection
        return len(connection._leftover) + (connection._direct or 0)

    def receive_into(self, buffer: memoryview) -> int:
        """Blocking: body bytes into ``buffer``; how many, or 0 at the end of the body."""
        connection = self._connection
        if connection._leftover:
            count = min(len(buffer), len(connection._leftover))
            buffer[:count] = connection._leftover[:count]
            connection._leftover = connection._leftover[count:]
            return count
        left = connection._direct
        assert left is not None
        if left == 0 or not buffer:
            return 0
        if not self._ready:
            self._block()
        wanted = min(len(buffer), left)
        idle = 0.0
        while True:
            if self._interrupted:
                raise Interrupted()
            try:
                count = self._socket.recv_into(buffer, wanted, socket.MSG_WAITALL)
            except BlockingIOError:  # WAIT_SLICE without a byte
                if self._stopping:
                    raise Interrupted() from None
                idle += WAIT_SLICE
                if idle >= connection.read_timeout:
                    raise ReadTimeout(
                        f"timed out after {connection.read_timeout:g} s waiting for data "
                        f"from {connection.origin}"
                    ) from None
                continue
            except OSError as exc:
                if self._interrupted:
                    raise Interrupted() from None
                raise ProtocolError(
                    f"connection to {connection.origin} broke: {_reason(exc)}"
                ) from exc
            if count == 0:
                if self._interrupted:
                    raise Interrupted()
                done = connection._direct_total - left
                raise ProtocolError(
                    f"{connection.origin} closed the connection after {done} of "
                    f"{connection._direct_total} body bytes"
                )
            connection._direct = left - count
            connection.received_any = True
            return count

    def stop_soon(self) -> None:
        """Make a receive that waits raise ``Interrupted`` within ``WAIT_SLICE`` seconds,
        leaving the connection as it is: the loop may go on receiving the body once the
        thread has stopped (and ``close``d this)."""
        self._stopping = True

    @property
    def stopping(self) -> bool:
        return self._stopping or self._interrupted

    def interrupt(self) -> None:
        """Make the receive under way, and every later one, raise ``Interrupted``."""
        self._interrupted = True
        # trio's handle, which stays open until the loop closes the connection; ours may
        # be closed by the thread meanwhile.
        with contextlib.suppress(OSError):
            self._connection._tcp.socket.shutdown(socket.SHUT_RD)

    def close(self) -> None:
        """Give the socket back to trio as it was (non-blocking) and drop our handle."""
        with contextlib.suppress(OSError):
            self._socket.setblocking(False)
        self._socket.close()

    def _block(self) -> None:
        seconds = int(WAIT_SLICE)
        slice_ = struct.pack("@ll", seconds, int((WAIT_SLICE - seconds) * 1_000_000))
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, slice_)
        self._socket.setblocking(True)
        self._ready = True


# A blocking receive of a thread's body returns at least this often (seconds), with what
# arrived meanwhile: for its progress reports and the read timeout.
WAIT_SLICE = 0.1


class Interrupted(HTTPError):
    """A ``BlockingBody`` receive stopped by ``interrupt``."""


class _BodyIterator:
    """An async iterator (not an async generator, so nothing is left to finalize when the
    caller stops early) over the Data events of one response."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    def __aiter__(self) -> _BodyIterator:
        return self

    async def __anext__(self) -> bytes:
        data = await self._connection.next_body_chunk()
        if data is None:
            raise StopAsyncIteration
        return data


class _Connection:
    """One HTTP/1.1 connection: a trio stream and the h11 state machine that frames it."""

    def __init__(
        self,
        origin: Origin,
        stream: trio.abc.Stream,
        *,
        proxy: Proxy | None = None,
        tcp: trio.SocketStream,
        read_timeout: float,
        receive_buffer: memoryview,
        max_header_bytes: int,
    ) -> None:
        self.origin = origin
        self.proxy = proxy  # the connection goes through it (http) or tunnels through it (https)
        self.route = (origin, proxy)  # what the pool keys it by
        self.stream = stream
        self._tcp = tcp  # under TLS, the transport of ``stream``
        self.reused = False
        self.idle_since = 0.0  # trio.current_time() when it last went back to the pool
        self.read_timeout = read_timeout
        self._buffer = receive_buffer
        # Plain TCP reads straight into the shared buffer; TLS has to go through SSLStream.
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._leftover = memoryview(b"")  # body bytes h11 gave us that the caller has not
        self._direct: int | None = None  # body bytes still to read past h11, in direct mode
        self._direct_total = 0
        # One byte of slack: receive_head reads at most max + 1 bytes and reports the excess.
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes + 1)
        self._max_head = max_header_bytes
        self.received_any = False

    async def send_request(self, method: str, target: str, headers: RequestHeaders) -> None:
        """Send a request without a body. ``headers``: pairs, or the ``RequestHeaders`` of
        ``HTTPClient.request_headers`` (checked by h11 once, when they were made)."""
        data = self._h11.send(h11.Request(method=method, target=target, headers=headers))
        end = self._h11.send(h11.EndOfMessage())
        assert data is not None
        assert end is not None
        data += end
        try:
            if self._socket is not None and len(data) <= SMALL_SEND:
                # An idle connection's send buffer is empty, so one write takes it all:
                # no timeout's cancel scope, nor trio's send around it.
                try:
                    # The socket's descriptor as trio has it now (-1 once closed: EBADF),
                    # never a number kept from before, which a closed socket may have
                    # handed on to another file.
                    sent = os.write(self._socket.fileno(), data)
                except BlockingIOError:
                    sent = 0
                if sent == len(data):
                    # One scheduler turn, as trio's send would take: the other requests
                    # go out meanwhile, and the answer is more often there when this one
                    # looks (no wait to register with epoll).
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return
                data = data[sent:]
            with trio.fail_after(self.read_timeout):
                await self.stream.send_all(data)
        except trio.TooSlowError:
            raise ReadTimeout(
                f"timed out after {self.read_timeout:g} s sending the request to {self.origin}"
            ) from None
        except (trio.BrokenResourceError, OSError) as exc:
            raise ConnectError(f"connection to {self.origin} broke: {_reason(exc)}") from exc

    async def receive_head(self) -> h11.Response:
        # h11 checks its limit only while an event is incomplete, so a whole oversized head
        # arriving in one read would pass: reads are kept within the limit here instead.
        received = 0
        while True:
            event = self._h11_event()
            if event is h11.NEED_DATA:
                if received > self._max_head:
                    raise HeadTooLarge(
                        f"response head from {self.origin} exceeds {self._max_head} bytes"
                    )
                data = await self._receive(self._max_head + 1 - received, head=True)
                if not data:
                    # h11 would say "can't handle event type ConnectionClosed ...": its
                    # internals, not what happened.
                    raise ProtocolError(_closed_early(self.origin, received))
                received += len(data)
                self._h11.receive_data(data)  # type: ignore[arg-type]  # bytes-like will do
                continue
            if isinstance(event, h11.Response):
                return event
            if isinstance(event, h11.ConnectionClosed):
                raise ProtocolError(_closed_early(self.origin, received))
            # 1xx (100 Continue, 103 Early Hints) are informational: skip them.
            if not isinstance(event, h11.InformationalResponse):
                raise ProtocolError(f"unexpected {type(event).__name__} from {self.origin}")

    async def next_body_chunk(self) -> bytes | None:
        if self._leftover or self._direct is not None:
            count = await self.receive_body_into(self._buffer)
            return bytes(self._buffer[:count]) if count else None
        return await self._h11_body_chunk()

    async def _h11_body_chunk(self) -> bytes | None:
        event = await self._next_event()
        if isinstance(event, h11.Data):
            return event.data
        if isinstance(event, h11.EndOfMessage):
            return None
        if isinstance(event, h11.ConnectionClosed):
            raise ProtocolError(f"{self.origin} closed the connection in the middle of the body")
        raise ProtocolError(f"unexpected {type(event).__name__} from {self.origin}")

    def enter_direct_mode(self, status: int, headers: Headers, method: str) -> None:
        """Read a large Content-Length body past h11, straight into callers' buffers.

        h11 never sees that body, so the connection is closed afterwards instead of
        reused: for a body this large the cost of a new connection is noise.
        """
        if (
            self._socket is None
            or method == "HEAD"
            or status in (204, 304)
            or headers.get("transfer-encoding") is not None
        ):
            return
        lengths = headers.get_all("content-length")
        if len(lengths) != 1 or not lengths[0].isdigit():
            return
        length = int(lengths[0])
        if length < DIRECT_MIN_BYTES:
            return
        # Whatever part of the body came in with the head is still in h11's buffer.
        early = bytearray()
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise ProtocolError(f"bad response from {self.origin}: {exc}") from None
            if isinstance(event, h11.Data):
                early += event.data
            elif event is h11.NEED_DATA:
                break
            else:
                return  # the whole body is already here (EndOfMessage): nothing to skip
        self._leftover = memoryview(early)
        self._direct = length - len(early)
        self._direct_total = length

    async def receive_body_into(self, buffer: memoryview) -> int:
        if self._leftover:
            count = min(len(buffer), len(self._leftover))
            buffer[:count] = self._leftover[:count]
            self._leftover = self._leftover[count:]
            return count
        if self._direct is not None:
            if self._direct == 0 or not buffer:
                return 0
            assert self._socket is not None
            wanted = min(len(buffer), self._direct)
            count = await self._read_timeout(self._socket.recv_into(buffer[:wanted]))
            if count == 0:
                done = self._direct_total - self._direct
                raise ProtocolError(
                    f"{self.origin} closed the connection after {done} of "
                    f"{self._direct_total} body bytes"
                )
            self._direct -= count
            return count
        data = await self._h11_body_chunk()
        if data is None:
            return 0
        view = memoryview(data)
        count = min(len(buffer), len(view))
        buffer[:count] = view[:count]
        self._leftover = view[count:]
        return count

    def blocking_body(self) -> BlockingBody | None:
        if self._direct is None or self._socket is None:
            return None
        # A handle of our own on the same socket: the stdlib's blocking receive with
        # flags; closing it leaves trio's.
        fd = os.dup(self._tcp.socket.fileno())
        return BlockingBody(self, socket.socket(fileno=fd))

    @property
    def reusable(self) -> bool:
        return (
            self._direct is None
            and self._h11.our_state is h11.DONE
            and self._h11.their_state is h11.DONE
            # Bytes past the end of the answer, before we asked again: a server that lies
            # about its body's length. They are no answer to the next request.
            and not self._h11.trailing_data[0]
        )

    def fileno(self) -> int:
        return self._tcp.socket.fileno()

    def close_now(self) -> None:
        """Close without waiting (and under TLS without close_notify, as
        ``trio.aclose_forcefully`` would): for the pool, which drops idle connections
        from code that must not block."""
        self._tcp.socket.close()

    def start_next_cycle(self) -> None:
        self._h11.start_next_cycle()
        self.received_any = False
        self.reused = True

    def _h11_event(self) -> Any:
        try:
            return self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise ProtocolError(f"bad response from {self.origin}: {exc}") from None

    async def _next_event(self) -> Any:
        while True:
            event = self._h11_event()
            if event is not h11.NEED_DATA:
                return event
            # h11 copies the data at once, so the buffer is free for the next read.
            data = await self._receive(len(self._buffer))
            self._h11.receive_data(data)  # type: ignore[arg-type]  # any bytes-like will do

    async def _receive(self, limit: int, *, head: bool = False) -> bytes | bytearray | memoryview:
        size = min(len(self._buffer), limit)
        if self._socket is not None:
            view = self._buffer[:size]
            if head:
                return view[: await self._receive_head_bytes(view)]
            return view[: await self._read_timeout(self._socket.recv_into(view))]
        return await self._read_timeout(self.stream.receive_some(min(size, TLS_READ_SIZE)))

    async def _receive_head_bytes(self, view: memoryview) -> int:
        """Receive into ``view`` on plain TCP: at once if bytes are there (then one
        scheduler turn, as trio's receive takes), else after waiting for them, within
        the read timeout. Trio's receive does the same with more around it: a cancel
        scope per receive, and its socket wrapper's, were a visible part of a small
        file's cost."""
        assert self._socket is not None
        fd = self._socket.fileno()  # as trio has it now: see send_request
        try:
            try:
                count = os.readv(fd, (view,))
                await trio.lowlevel.cancel_shielded_checkpoint()
            except BlockingIOError:
                with trio.move_on_after(self.read_timeout) as scope:
                    while True:
                        await trio.lowlevel.wait_readable(self._socket)
                        try:
                            count = os.readv(fd, (view,))
                            break
                        except BlockingIOError:
                            continue
                if scope.cancelled_caught:
                    raise self._timed_out() from None
        except OSError as exc:
            raise ProtocolError(f"connection to {self.origin} broke: {_reason(exc)}") from exc
        if count:
            self.received_any = True
        return count

    async def _read_timeout(self, receive: Awaitable[_R]) -> _R:
        """``await receive``, bounded by the read timeout, with errors made ours."""
        try:
            with trio.move_on_after(self.read_timeout) as scope:
                data = await receive
        except (trio.BrokenResourceError, OSError) as exc:
            raise ProtocolError(f"connection to {self.origin} broke: {_reason(exc)}") from exc
        if scope.cancelled_caught:
            raise self._timed_out()
        if data:
            self.received_any = True
        return data

    def _timed_out(self) -> ReadTimeout:
        return ReadTimeout(
            f"timed out after {self.read_timeout:g} s waiting for data from {self.origin}"
        )


@attrs.frozen
class HTTPClientStatistics:
    """What ``HTTPClient.statistics()`` reports: the pool now, and counts since it was made."""

    idle_connections: int  # kept open for reuse now
    idle_origins: int  # origins with at least one idle connection now
    connections_opened: int
    requests_reused: int  # requests sent on a kept-alive connection
    closed_expired: int  # idle for the idle timeout
    closed_over_limit: int  # the least recently used beyond max_idle_per_origin or _total
    closed_by_peer: int  # found closed (or talking) by the server while idle


class _IdlePool:
    """Idle keep-alive connections, handed out newest first per origin (the least likely to
    have been given up by the server) and dropped least recently used first overall;
    every connection it drops is closed at once.

    It never waits: no I/O but the closes and non-blocking polls, and no clock of its own
    (callers pass ``now``, from ``trio.current_time()``).
    """

    def __init__(self, *, idle_timeout: float, max_per_origin: int, max_total: int) -> None:
        self.idle_timeout = idle_timeout
        self.max_per_origin = max_per_origin
        self.max_total = max_total
        self._by_origin: dict[_Route, list[_Connection]] = {}  # oldest first
        self._lru: dict[_Connection, None] = {}  # insertion order: least recently used first
        self.expired = 0
        self.over_limit = 0
        self.closed_by_peer = 0

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def origins(self) -> int:
        return len(self._by_origin)

    def checkout(self, route: _Route, now: float) -> _Connection | None:
        """The newest idle connection on ``route`` still fit for a request, or None."""
        idle = self._by_origin.get(route)
        while idle:
            connection = idle[-1]
            self._remove(connection)
            if self._expires_at(connection) <= now:
                # The newest has expired, so the older ones have too.
                expired = [connection, *idle]
                for stale in expired[1:]:
                    self._remove(stale)
                for stale in expired:
                    stale.close_now()
                self.expired += len(expired)
                return None
            if now - connection.idle_since < LIVENESS_CHECK_AFTER or not _peer_closed([connection]):
                return connection
            connection.close_now()
            self.closed_by_peer += 1
        return None

    def checkin(self, connection: _Connection, now: float) -> None:
        """Keep ``connection`` for reuse, closing the least recently used beyond the caps."""
        connection.idle_since = now
        self._by_origin.setdefault(connection.route, []).append(connection)
        self._lru[connection] = None
        idle = self._by_origin[connection.route]
        if len(idle) > self.max_per_origin:
            self._drop_over_limit(idle[0])
        if len(self._lru) > self.max_total:
            self._drop_over_limit(next(iter(self._lru)))

    def sweep(self, now: float) -> float | None:
        """Close the connections that have expired or that their server closed; the time
        the next one expires, or None when the pool is empty."""
        while self._lru:
            oldest = next(iter(self._lru))
            if self._expires_at(oldest) > now:
                break
            self._remove(oldest)
            oldest.close_now()
            self.expired += 1
        for connection in _peer_closed(list(self._lru)):
            self._remove(connection)
            connection.close_now()
            self.closed_by_peer += 1
        if not self._lru:
            return None
        return self._expires_at(next(iter(self._lru)))

    def close_all(self) -> None:
        connections = list(self._lru)
        self._lru.clear()
        self._by_origin.clear()
        for connection in connections:
            connection.close_now()

    def _expires_at(self, connection: _Connection) -> float:
        # One expression for the sweep's deadline and for the test against it: computed
        # twice in different ways, rounding could leave a due connection "not yet" expired.
        return connection.idle_since + self.idle_timeout

    def _drop_over_limit(self, connection: _Connection) -> None:
        self._remove(connection)
        connection.close_now()
        self.over_limit += 1

    def _remove(self, connection: _Connection) -> None:
        del self._lru[connection]
        idle = self._by_origin[connection.route]
        if idle[-1] is connection:  # a checkout: the common case, and no scan
            idle.pop()
        else:
            idle.remove(connection)  # at most max_idle_per_origin long
        if not idle:
            del self._by_origin[connection.route]


def _peer_closed(connections: Sequence[_Connection]) -> list[_Connection]:
    """Those of the idle ``connections`` the server has closed or written to, found with one
    non-blocking poll: an idle connection has nothing to read, so anything there (EOF, a
    408 answer, an error) means it cannot carry another request."""
    poller = select.poll()
    by_fd: dict[int, _Connection] = {}
    gone: list[_Connection] = []
    for connection in connections:
        fd = connection.fileno()
        if fd < 0:
            gone.append(connection)
            continue
        by_fd[fd] = connection
        poller.register(fd, select.POLLIN)  # POLLHUP and POLLERR are always reported
    if by_fd:
        gone += [by_fd[fd] for fd, _events in poller.poll(0)]
    return gone


class _HostSlots:
    """At most ``per_host`` requests in flight to each host, first come first served.
    A host's limiter exists only while someone holds or waits for one of its slots, so
    the table holds the hosts in use, not every host ever fetched from."""

    def __init__(self, per_host: int) -> None:
        self.per_host = per_host
        self._limiters: dict[str, tuple[trio.CapacityLimiter, int]] = {}

    def in_use(self, host: str) -> int:
        entry = self._limiters.get(host)
        return 0 if entry is None else entry[0].borrowed_tokens

    async def acquire(self, host: str) -> object:
        """Take one of ``host``'s slots (waiting behind those who wait already); the
        token to give back to ``release``."""
        limiter, users = self._limiters.get(host) or (trio.CapacityLimiter(self.per_host), 0)
        if limiter.total_tokens != self.per_host:
            limiter.total_tokens = self.per_host  # a reload: the next release admits by it
        self._limiters[host] = (limiter, users + 1)
        borrower = object()  # not the trio task: one task may hold slots of two requests
        try:
            await limiter.acquire_on_behalf_of(borrower)
        except BaseException:
            self._leave(host)
            raise
        return borrower

    def release(self, host: str, borrower: object) -> None:
        self._limiters[host][0].release_on_behalf_of(borrower)
        self._leave(host)

    def _leave(self, host: str) -> None:
        limiter, users = self._limiters[host]
        if users == 1:
            del self._limiters[host]
        else:
            self._limiters[host] = (limiter, users - 1)


class _Exchange:
    """One request and its response, as ``HTTPClient.stream`` hands it out: a host slot,
    a connection (pooled or new), the request sent and the response head received on
    entry; on exit the connection goes back to the pool (a body read to its end, both
    sides keeping it alive) or is closed (anything else, an exception included), then
    the slot is given back. A class rather than nested generator-based context managers:
    three of those per request were a visible part of a small file's cost."""

    __slots__ = (
        "_client",
        "_connect_timeout",
        "_connection",
        "_headers",
        "_method",
        "_read_timeout",
        "_route",
        "_slot",
        "_target",
        "_url",
    )

    def __init__(
        self,
        client: HTTPClient,
        route: _Route,
        url: str,
        method: str,
        target: str,
        headers: RequestHeaders,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self._client = client
        self._route = route
        self._url = url
        self._method = method
        self._target = target
        self._headers = headers
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._connection: _Connection | None = None
        self._slot: object | None = None

    async def __aenter__(self) -> Response:
        client, host = self._client, self._route[0].host
        self._slot = await client._hosts.acquire(host)
        try:
            connection, head = await client._send(
                self._route,
                self._method,
                self._target,
                self._headers,
                self._connect_timeout,
                self._read_timeout,
            )
            try:
                response_headers = Headers(
                    tuple(
                        (name.decode("latin-1"), value.decode("latin-1"))
                        for name, value in head.headers  # names in lower case
                    )
                )
                connection.enter_direct_mode(head.status_code, response_headers, self._method)
            except BaseException:
                await trio.aclose_forcefully(connection.stream)
                raise
        except BaseException:
            slot, self._slot = self._slot, None
            client._hosts.release(host, slot)
            raise
        self._connection = connection
        reason = head.reason.decode("latin-1")
        return Response(connection, self._url, head.status_code, reason, response_headers)

    async def __aexit__(self, exc_type: object, exc: object, traceback: object) -> None:
        connection, self._connection = self._connection, None
        slot, self._slot = self._slot, None
        try:
            if connection is not None:
                if exc_type is None:
                    await self._client._release(connection)
                else:
                    await trio.aclose_forcefully(connection.stream)
        finally:
            if slot is not None:
                self._client._hosts.release(self._route[0].host, slot)


class HTTPClient:
    """Opens and reuses connections; one instance is shared by every download.

    ``connect_timeout`` bounds DNS, TCP connect and the TLS handshake together;
    ``read_timeout`` is how long the server may stay silent while we wait for a response
    head or body data; ``receive_size`` is the largest single read; ``max_header_bytes``
    bounds a response head (status line and headers).

    Idle keep-alive connections are kept at most ``idle_timeout`` seconds, at most
    ``max_idle_per_origin`` for each (scheme, host, port) and ``max_idle_total`` in all
    (beyond a cap the least recently used is closed). A sweep closes them as they expire
    even when no request comes: a daemon that fetched from hundreds of hosts and then
    sits idle keeps no sockets. A connection idle for ``LIVENESS_CHECK_AFTER`` seconds or
    more is checked before reuse, and closed if its server closed it or wrote to it
    meanwhile; the sweep checks all of them. A fresher one is reused on trust, and a
    request that fails on it before any answer arrives is sent again on a new connection.

    At most ``max_per_host`` requests are in flight to one host (by name, whatever the
    port or scheme) at once; a request beyond it waits, before its connect timeout
    starts, for one of them to end. It may be changed at any time (a reload).
    """

    def __init__(
        self,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        receive_size: int = DEFAULT_RECEIVE_SIZE,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_idle_per_origin: int = DEFAULT_MAX_IDLE_PER_ORIGIN,
        max_idle_total: int = DEFAULT_MAX_IDLE_TOTAL,
        max_per_host: int = DEFAULT_MAX_PER_HOST,
        ssl_context: ssl.SSLContext | None = None,
        user_agent: str = USER_AGENT,
        proxies: ProxyRules | None = None,
    ) -> None:
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("read_timeout", read_timeout),
            ("idle_timeout", idle_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, not {value}")
        for name, number in (
            ("receive_size", receive_size),
            ("max_header_bytes", max_header_bytes),
            ("max_per_host", max_per_host),
        ):
            if number < 1:
                raise ValueError(f"{name} must be >= 1, not {number}")
        for name, number in (
            ("max_idle_per_origin", max_idle_per_origin),
            ("max_idle_total", max_idle_total),
        ):
            if number < 0:
                raise ValueError(f"{name} must be >= 0, not {number}")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.receive_size = receive_size
        self.max_header_bytes = max_header_bytes
        self.user_agent = user_agent
        # Which proxy each request goes through; may be replaced at any time (SIGHUP):
        # the pool keys connections by their proxy, so none is reused across a change.
        self.proxies = proxies or ProxyRules()
        self._ssl_context = ssl_context
        self._pool = _IdlePool(
            idle_timeout=idle_timeout,
            max_per_origin=max_idle_per_origin,
            max_total=max_idle_total,
        )
        self._hosts = _HostSlots(max_per_host)
        self._request_heads: dict[
            tuple[Origin, str, tuple[tuple[str, str], ...]], RequestHeaders
        ] = {}
        self._sweeper: trio.CancelScope | None = None
        self._opened = 0
        self._reused = 0
        self._closed = False

    @property
    def idle_timeout(self) -> float:
        return self._pool.idle_timeout

    @property
    def max_idle_per_origin(self) -> int:
        return self._pool.max_per_origin

    @property
    def max_idle_total(self) -> int:
        return self._pool.max_total

    @property
    def max_per_host(self) -> int:
        return self._hosts.per_host

    @max_per_host.setter
    def max_per_host(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"max_per_host must be >= 1, not {value}")
        self._hosts.per_host = value

    def requests_in_flight(self, host: str) -> int:
        """Requests to ``host`` (its ASCII name) holding one of its slots now."""
        return self._hosts.in_use(_ascii_host(host))

    async def __aenter__(self) -> HTTPClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every idle connection; connections in use close when their stream ends."""
        self._closed = True
        self._request_heads.clear()
        self._pool.close_all()
        if self._sweeper is not None:
            self._sweeper.cancel()
        await trio.lowlevel.checkpoint()

    def idle_connections(self) -> int:
        """How many connections are kept open for reuse now."""
        return len(self._pool)

    def statistics(self) -> HTTPClientStatistics:
        pool = self._pool
        return HTTPClientStatistics(
            idle_connections=len(pool),
            idle_origins=pool.origins,
            connections_opened=self._opened,
            requests_reused=self._reused,
            closed_expired=pool.expired,
            closed_over_limit=pool.over_limit,
            closed_by_peer=pool.closed_by_peer,
        )

    def stream(
        self,
        method: str,
        url: str,
        headers: Iterable[tuple[str, str]] = (),
        *,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
    ) -> contextlib.AbstractAsyncContextManager[Response]:
        """Send a request and yield the response once its head has arrived.

        ``connect_timeout`` and ``read_timeout`` override the client's for this request.

        The body is read inside the ``async with``; on leaving it, the connection goes back
        to the pool if the body was read to the end and both sides allow keep-alive, and is
        closed otherwise (also on any exception, cancellation included).
        """
        if self._closed:
            raise RuntimeError("the http client is closed")
        origin, target = split_url(url)
        proxy = self.proxies.for_url(origin.scheme, origin.host, origin.port)
        extra = tuple(headers)
        if proxy is not None and origin.scheme == "http":
            # A plain-http request goes to the proxy whole: absolute-form target, and the
            # proxy's credentials beside the origin's headers.
            target = f"http://{_authority(origin)}{target}"
            extra += tuple(proxy.headers())
        return _Exchange(
            self,
            (origin, proxy),
            url,
            method,
            target,
            self.request_headers(origin, extra),
            self.connect_timeout if connect_timeout is None else connect_timeout,
            self.read_timeout if read_timeout is None else read_timeout,
        )

    def request_headers(self, origin: Origin, extra: tuple[tuple[str, str], ...]) -> RequestHeaders:
        """The headers of a request to ``origin``: ours (Host, User-Agent, Accept,
        Accept-Encoding), each replaced by one of ``extra`` of the same name, then the rest
        of ``extra``, in order. Made and checked by h11 once per set, then reused: the
        items of a task ask with the same headers, and h11 checking every name and value
        again was a visible part of a small file's request."""
        key = (origin, self.user_agent, extra)
        found = self._request_heads.pop(key, None)
        if found is None:
            pairs = self._header_pairs(origin, extra)
            found = h11.Request(method="GET", target="/", headers=pairs).headers
            if len(self._request_heads) >= REQUEST_HEADS_KEPT:
                del self._request_heads[next(iter(self._request_heads))]
        self._request_heads[key] = found  # the most recently used last
        return found

    def _header_pairs(
        self, origin: Origin, extra: Iterable[tuple[str, str]]
    ) -> list[tuple[str, str]]:
        # identity: the bytes on the wire are the file; nothing here decodes gzip.
        headers = [
            ("Host", _authority(origin)),
            ("User-Agent", self.user_agent),
            ("Accept", "*/*"),
            ("Accept-Encoding", "identity"),
        ]
        given = {name.lower() for name, _ in headers}
        for name, value in extra:
            if name.lower() in given:
                headers = [(n, v) for n, v in headers if n.lower() != name.lower()]
            headers.append((name, value))
        return headers

    async def _send(
        self,
        route: _Route,
        method: str,
        target: str,
        headers: RequestHeaders,
        connect_timeout: float,
        read_timeout: float,
    ) -> tuple[_Connection, h11.Response]:
        origin, proxy = route
        while True:
            connection = self._pool.checkout(route, trio.current_time())
            fresh = connection is None
            if connection is None:
                try:
                    with trio.fail_after(connect_timeout):
                        connection = await self._connect(origin, proxy)
                except trio.TooSlowError:
                    via = "" if proxy is None else f" through {proxy}"
                    raise ConnectTimeout(
                        f"timed out after {connect_timeout:g} s connecting to {origin}{via}"
                    ) from None
                self._opened += 1
            else:
                self._reused += 1
            connection.read_timeout = read_timeout
            try:
                await connection.send_request(method, target, headers)
                head = await connection.receive_head()
            except (ConnectError, ProtocolError) as exc:
                await trio.aclose_forcefully(connection.stream)
                # A kept-alive connection the server closed meanwhile fails before any
                # byte of the answer arrives; that is no fault of the request: retry it
                # once on a new connection (GET is safe to repeat).
                if not fresh and not connection.received_any:
                    continue
                raise exc
            except BaseException:
                await trio.aclose_forcefully(connection.stream)
                raise
            return connection, head

    async def _release(self, connection: _Connection) -> None:
        if self._closed or not connection.reusable:
            await trio.aclose_forcefully(connection.stream)
            return
        connection.start_next_cycle()
        self._pool.checkin(connection, trio.current_time())
        if self._sweeper is None and len(self._pool):
            self._sweeper = trio.CancelScope()
            # A system task, not a task in a nursery of ours: the client is made on first
            # use by code that has no nursery to lend, and a system task cannot outlive
            # the trio run. One task for the whole pool, never one per connection; it
            # ends when the pool is empty and starts again with the next idle connection.
            trio.lowlevel.spawn_system_task(
                self._sweep, self._sweeper, name="statusd.http idle connection sweep"
            )

    async def _sweep(self, scope: trio.CancelScope) -> None:
        try:
            with scope:
                deadline = self._pool.sweep(trio.current_time())
                while deadline is not None:
                    await trio.sleep_until(deadline)
                    deadline = self._pool.sweep(trio.current_time())
        finally:
            self._sweeper = None
            if not scope.cancel_called:
                # The run is ending (or the pool is empty): nobody can use these sockets.
                self._pool.close_all()

    async def _connect(self, origin: Origin, proxy: Proxy | None = None) -> _Connection:
        """A new connection to ``origin``, through ``proxy`` if given (https: a CONNECT
        tunnel, and TLS with the origin inside it); the caller bounds the time it takes."""
        stream: trio.abc.Stream
        peer = origin if proxy is None else proxy
        try:
            if proxy is None:
                tcp = await trio.open_tcp_stream(origin.host, origin.port)
            else:
                tcp = await trio.open_tcp_stream(proxy.host, proxy.port)
            stream = tcp
            if proxy is not None and origin.scheme == "https":
                try:
                    await self._tunnel(tcp, origin, proxy)
                except BaseException:
                    await trio.aclose_forcefully(tcp)
                    raise
            if origin.scheme == "https":
                stream = trio.SSLStream(
                    tcp, self._ssl(), server_hostname=origin.host, https_compatible=True
                )
                try:
                    await stream.do_handshake()
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
        except socket.gaierror as exc:
            if proxy is None:
                message = _unresolved(origin.host, exc)
            else:  # the origin's name is the proxy's to resolve
                message = _unresolved(proxy.host, exc).replace("host", "proxy host", 1)
            raise ResolveError(message, temporary=exc.errno == socket.EAI_AGAIN) from exc
        except ssl.SSLCertVerificationError as exc:
            raise TLSError(
                f"tls certificate of {origin} not accepted: {exc.verify_message}"
            ) from exc
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, ssl.SSLError) else exc
            if isinstance(cause, ssl.SSLCertVerificationError):
                raise TLSError(
                    f"tls certificate of {origin} not accepted: {cause.verify_message}"
                ) from exc
            raise TLSError(f"tls handshake with {origin} failed: {_reason(cause)}") from exc
        except OSError as exc:
            raise ConnectError(f"cannot connect to {peer}: {_reason(exc)}") from exc
        return _Connection(
            origin,
            stream,
            proxy=proxy,
            tcp=tcp,
            read_timeout=self.read_timeout,
            receive_buffer=memoryview(bytearray(min(self.receive_size, CONNECTION_BUFFER))),
            max_header_bytes=self.max_header_bytes,
        )

    async def _tunnel(self, tcp: trio.SocketStream, origin: Origin, proxy: Proxy) -> None:
        """Ask ``proxy`` on ``tcp`` for a tunnel to ``origin`` (CONNECT); on a 2xx the
        stream carries the origin's bytes from here on."""
        authority = _authority(origin, always_port=True)
        h11_connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=self.max_header_bytes)
        request = h11.Request(
            method="CONNECT",
            target=authority,
            headers=[("Host", authority), ("User-Agent", self.user_agent), *proxy.headers()],
        )
        data = h11_connection.send(request)
        end = h11_connection.send(h11.EndOfMessage())
        assert data is not None
        assert end is not None
        try:
            await tcp.send_all(data + end)
            while True:
                try:
                    event = h11_connection.next_event()
                except h11.RemoteProtocolError as exc:
                    raise ProtocolError(f"bad answer to CONNECT from {proxy}: {exc}") from None
                if event is h11.NEED_DATA:
                    h11_connection.receive_data(await tcp.receive_some(TLS_READ_SIZE))
                elif isinstance(event, h11.Response):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectError(f"{proxy} closed the connection in answer to CONNECT")
        except (trio.BrokenResourceError, OSError) as exc:
            raise ConnectError(f"connection to {proxy} broke: {_reason(exc)}") from exc
        status = event.status_code
        if not 200 <= status < 300:
            phrase = _phrase(status, event.reason.decode("latin-1"))
            raise ProxyRefused(f"{proxy} refused CONNECT to {origin}: {status} {phrase}", status)
        if h11_connection.trailing_data[0]:
            # TLS speaks first, so a proxy that sends more before it is not a tunnel.
            raise ProtocolError(f"{proxy} sent data before the tunnel to {origin} was used")

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context


def _ascii_host(host: str) -> str:
    """``host`` as it goes on the wire: ASCII names and IP literals as they are, others as
    IDNA 2008 A-labels after UTS 46 mapping (what browsers and curl send).

    Python's own "idna" codec is IDNA 2003, which maps ``faß.de`` to ``fass.de``: another
    host. ASCII names are left alone, as DNS allows more than IDNA (``my_host.lan``).
    """
    if host.isascii():
        return host
    try:
        return idna.encode(host, uts46=True).decode("ascii")
    except UnicodeError:  # idna.IDNAError and the codecs' own
        raise ValueError(f"url host is not a valid host name: '{host}'") from None


def _closed_early(origin: Origin, received: int) -> str:
    if received:
        return f"{origin} closed the connection in the middle of the response head"
    return f"{origin}: the server closed the connection without answering"


# Name-not-found answers: the name is wrong, and asking again will not change that.
_NO_SUCH_NAME = {
    getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, name)
}


def _unresolved(host: str, exc: socket.gaierror) -> str:
    """What a failed lookup of ``host`` says: a gaierror's errno is no errno (-2 reads
    "unknown error -2" through os.strerror), its strerror is getaddrinfo's own text."""
    if exc.errno in _NO_SUCH_NAME or not exc.strerror:
        return f"could not resolve host {host}"
    return f"could not resolve host {host}: {_lower_first(str(exc.strerror))}"


# OpenSSL reasons a plain-HTTP answer to our ClientHello produces: its "HTTP/1.1 400"
# read as a TLS record header.
_PLAIN_HTTP_REASONS = {"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"}


def _ssl_reason(exc: ssl.SSLError) -> str:
    """An SSL error in words: its errno is an SSL_ERROR_* number, which os.strerror would
    turn into "operation not permitted"."""
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "the server closed the connection during the tls handshake"
    reason = exc.reason
    if reason in _PLAIN_HTTP_REASONS:
        return f"{reason.lower().replace('_', ' ')}: is this an https port?"
    if reason:
        return reason.lower().replace("_", " ")
    text = str(exc.strerror or exc)
    return _lower_first(text.rsplit(" (_ssl.c:", 1)[0])


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _authority(origin: Origin, *, always_port: bool = False) -> str:
    """``host[:port]`` as a Host header or a CONNECT target writes it."""
    host = f"[{origin.host}]" if ":" in origin.host else origin.host
    if always_port or origin.port != (443 if origin.scheme == "https" else 80):
        return f"{host}:{origin.port}"
    return host


def _phrase(status: int, reason: str) -> str:
    try:
        return http.HTTPStatus(status).phrase.lower()
    except ValueError:
        return reason.lower() or "unknown status"


def _reason(exc: BaseException) -> str:
    """A short, lowercase-first description of a network error."""
    if isinstance(exc, ssl.SSLError):
        return _ssl_reason(exc)
    if isinstance(exc, socket.gaierror):
        return _lower_first(str(exc.strerror or exc))
    if isinstance(exc, OSError) and (exc.errno or exc.strerror):
        text = os.strerror(exc.errno) if exc.errno else str(exc.strerror)
        return text[:1].lower() + text[1:]
    if isinstance(exc, BaseExceptionGroup):  # trio's happy eyeballs: one per address
        return _reason(exc.exceptions[0])
    if exc.__cause__ is not None and exc.__cause__ is not exc:
        return _reason(exc.__cause__)
    text = str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]


__all__: Sequence[str] = (
    "ConnectError",
    "ConnectTimeout",
    "HTTPClient",
    "HTTPClientStatistics",
    "HTTPError",
    "HeadTooLarge",
    "Headers",
    "Origin",
    "ProtocolError",
    "ProxyRefused",
    "ReadTimeout",
    "ResolveError",
    "Response",
    "TLSError",
    "split_url",
)
