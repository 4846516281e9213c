"""The statusd client library: JSON-RPC 2.0 over the daemon's Unix socket.

Three ways in, one wire protocol (CONTRACT.md, "Wire protocol"):

- ``open_client(path)`` gives an ``AsyncClient`` for trio programs. Calls may be pipelined
  from many tasks: one reader task matches replies to calls by id and sets pushed messages
  aside for ``next_push`` and ``subscribe``; one writer task sends whole lines, so a
  cancelled call can never leave half a request on the wire.
- ``Client`` does the same over a plain blocking socket, for scripts and the statusctl
  command. ``StatusMonitor`` runs one in a thread and calls back for every status message,
  reconnecting when the daemon restarts: the UI side of the seed contract (STATUS-UI-001).
  ``Backoff`` and ``StatusCursor`` are how it reconnects and resumes; ``statusctl watch``
  uses them too.
- ``socket_candidates`` says where to look: the caller's own daemon's socket (found the
  way that daemon finds it), then the system daemon's; a connection takes the first that
  answers.

Pushed messages wait in a buffer of ``max_pushes``; past it the oldest is dropped and the
reader gets a ``dropped`` notice in its place, as the daemon does for a slow client. The
buffer never blocks the reader, so a task that is busy with a call while pushes pile up
still gets its reply.

Framing and message building are statusd's pure helpers (``statusd.protocol``); nothing
here depends on the daemon's runtime.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Any

import attrs
import trio

from statusd.config import MAX_REPLY_BYTES, SYSTEM_SOCKET_PATH, default_socket_path
from statusd.errors import CODE_NAMES, INTERNAL_ERROR, RpcError
from statusd.protocol import jsonrpc
from statusd.protocol.framing import LineDecoder, LineTooLong

__all__ = [
    "DEFAULT_MAX_PUSHES",
    "DEFAULT_TIMEOUT",
    "SOCKET_ENV",
    "SYSTEM_SOCKET",
    "AsyncClient",
    "Backoff",
    "Client",
    "ConnectionLost",
    "DaemonUnreachable",
    "Push",
    "RemoteError",
    "StatusCursor",
    "StatusMonitor",
    "Subscription",
    "open_client",
    "resolve_socket_path",
    "socket_candidates",
]

log = logging.getLogger(__name__)

SOCKET_ENV = "STATUSD_SOCKET"
# Looked at after the caller's own socket: a member of the socket group of a system daemon
# (contrib/systemd/statusd.socket) usually runs no daemon of their own. Read at each look-up,
# so a test can stand a daemon of its own in for the system one.
SYSTEM_SOCKET = SYSTEM_SOCKET_PATH
DEFAULT_MAX_PUSHES = 1000
# A local daemon answers in milliseconds; this only bounds a daemon that is wedged.
DEFAULT_TIMEOUT = 30.0
RECEIVE_CHUNK = 64 * 1024
# One answer line: results up to ``limits.max_reply_bytes`` (at most 16 MiB; a tasks.get of
# a 10,000-item download is about 2.4 MB), then, in a batch, a short refusal per entry past
# it, each echoing the entry's id (ids and entries are bounded by the request's own size and
# the batch limit, each at most 16 MiB of reply).
MAX_REPLY_LINE_BYTES = 3 * MAX_REPLY_BYTES
# Lines queued for the writer task before ``call`` waits for room.
MAX_QUEUED_REQUESTS = 64
# How long leaving a ``subscribe`` block may spend telling the daemon, even when cancelled.
UNSUBSCRIBE_GRACE = 1.0
# How long a failed write waits for the reader to find out why the daemon closed.
WRITE_FAILURE_GRACE = 1.0

StrPath = str | os.PathLike[str]

# Which stream a pushed method belongs to, for the ``dropped`` notices made here.
_STREAMS = {
    "status": "status",
    "task_update": "tasks",
    "notification": "notifications",
    "unread_count": "notifications",
}


# -- errors ----------------------------------------------------------------------------------


class RemoteError(Exception):
    """The daemon answered with a JSON-RPC error object: ``code``, ``message``, ``data``."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"error {code}: {message}")
        self.code = code
        self.message = message
        self.data = data

    @property
    def name(self) -> str:
        """What the code means (``"invalid params"``), from the daemon's code table."""
        return CODE_NAMES.get(self.code, "server error")

    @classmethod
    def from_wire(cls, error: Any) -> RemoteError:
        # A daemon from another version may send a sloppy error; it is still an error.
        if not isinstance(error, dict):
            return cls(INTERNAL_ERROR, f"malformed error object: {error!r}")
        code = error.get("code")
        if not isinstance(code, int) or isinstance(code, bool):
            code = INTERNAL_ERROR
        message = error.get("message")
        return cls(code, message if isinstance(message, str) else repr(message), error.get("data"))

    def to_wire(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error

    def copy(self) -> RemoteError:
        # Raising one stored instance from several calls would pile up tracebacks.
        return RemoteError(self.code, self.message, self.data)


class DaemonUnreachable(Exception):
    """No daemon answers at ``path``; ``reason`` says why (``"connection refused"``).

    ``tried`` is every ``(path, reason)`` looked at, in order; ``path`` and ``reason`` are
    the first of them, the caller's own socket when statusctl looked in several places.
    """

    def __init__(self, path: Path, reason: str, tried: Sequence[tuple[Path, str]] = ()) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason
        self.tried = tuple(tried) or ((path, reason),)

    @classmethod
    def after(cls, tried: Sequence[tuple[Path, str]]) -> DaemonUnreachable:
        path, reason = tried[0]
        return cls(path, reason, tried)

    def __str__(self) -> str:
        if len(self.tried) == 1:
            return f"cannot connect to statusd at {self.path}: {self.reason}"
        places = ", ".join(f"{path} ({reason})" for path, reason in self.tried)
        return f"cannot connect to statusd at any of {places}"


class ConnectionLost(DaemonUnreachable):
    """The connection ended: the daemon went away, or sent something that is not JSON-RPC."""

    def __str__(self) -> str:
        return f"lost connection to statusd at {self.path}: {self.reason}"


def _describe_os_error(exc: OSError) -> str:
    text = exc.strerror or str(exc) or type(exc).__name__
    # Our messages are lowercase; strerror() starts with a capital.
    return text[:1].lower() + text[1:]


# -- socket discovery ------------------------------------------------------------------------

# The fallback when there is no $XDG_RUNTIME_DIR lives in world-writable /tmp: another user
# can make /tmp/statusd-UID first and answer in our daemon's name.
SHARED_FALLBACK_PREFIX = "/tmp/statusd-"


def distrusted(path: Path, uid: int | None = None) -> str | None:
    """Why a socket in the shared /tmp fallback must not be used, or None.

    Its directory must be a directory of the caller's (``uid``, default ours) that nobody
    else may write to: the daemon refuses to start in any other, so a socket there is
    someone else's."""
    directory = path.parent
    if not str(directory).startswith(SHARED_FALLBACK_PREFIX):
        return None
    try:
        info = directory.lstat()
    except OSError:
        return None  # connecting fails and says why
    uid = os.getuid() if uid is None else uid
    if not stat.S_ISDIR(info.st_mode):
        return f"{directory} is not a directory; not trusting it"
    if info.st_uid != uid:
        return f"{directory} belongs to uid {info.st_uid}, not to you; not trusting it"
    if info.st_mode & 0o022:
        return f"{directory} is writable by others; not trusting it"
    return None


def socket_candidates(
    socket_path: StrPath | None = None,
    environ: Mapping[str, str] | None = None,
    uid: int | None = None,
) -> tuple[Path, ...]:
    """Where to look for the daemon, in order: ``socket_path`` or ``$STATUSD_SOCKET`` alone
    when given; else the caller's own daemon's default socket
    (``statusd.config.default_socket_path``), then the system daemon's (``SYSTEM_SOCKET``)."""
    if socket_path is not None and os.fspath(socket_path):
        return (Path(socket_path),)
    environ = os.environ if environ is None else environ
    configured = environ.get(SOCKET_ENV)
    if configured:
        return (Path(configured),)
    own = default_socket_path(environ, uid)
    # Root's own default is the system socket: looking twice would list it twice.
    return (own,) if own == SYSTEM_SOCKET else (own, SYSTEM_SOCKET)


def resolve_socket_path(
    socket_path: StrPath | None = None, environ: Mapping[str, str] | None = None
) -> Path:
    """The first place ``socket_candidates`` looks."""
    return socket_candidates(socket_path, environ)[0]


# -- messages (pure) -------------------------------------------------------------------------


@attrs.frozen
class Push:
    """A message the daemon sent without being asked: ``status``, ``dropped``, ..."""

    method: str
    params: Any

    def to_wire(self) -> dict[str, Any]:
        return {"method": self.method, "params": self.params}


@attrs.frozen
class _Reply:
    id: jsonrpc.RequestId
    result: Any = None
    error: RemoteError | None = None

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error.copy()
        return self.result


class _Garbled(Exception):
    """The daemon sent a line that is neither a reply nor a notification."""


def _decode(line: bytes) -> list[_Reply | Push]:
    try:
        value = jsonrpc.loads(line)
    except RpcError as exc:
        raise _Garbled(f"the daemon sent {exc.message}") from None
    # A batch's replies come back as one array; nothing else does.
    items = value if isinstance(value, list) else [value]
    return [_decode_item(item) for item in items]


def _decode_item(item: Any) -> _Reply | Push:
    if not isinstance(item, dict):
        raise _Garbled(f"the daemon sent a json {type(item).__name__}, not an object")
    if "id" not in item:
        method = item.get("method")
        if not isinstance(method, str):
            raise _Garbled("the daemon sent a notification without a method")
        return Push(method, item.get("params"))
    request_id = item["id"]
    if not (request_id is None or isinstance(request_id, str | int)):
        raise _Garbled(f"the daemon sent a reply with an invalid id: {request_id!r}")
    if "error" in item:
        return _Reply(request_id, error=RemoteError.from_wire(item["error"]))
    if "result" in item:
        return _Reply(request_id, result=item["result"])
    raise _Garbled("the daemon sent a reply with neither result nor error")


def _subscribe_params(
    status: bool, since: int | None, notifications: bool = False
) -> dict[str, Any]:
    params: dict[str, Any] = {"status": status}
    if since is not None:
        params["since"] = since
    if notifications:
        params["notifications"] = True
    return params


class _PushBuffer:
    """Pushed messages waiting for a reader: drop-oldest past ``limit``, and the loss is
    reported by a ``dropped`` notice that comes out before what is left."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"max_pushes must be >= 1, not {limit}")
        self._limit = limit
        self._items: deque[Push] = deque()
        self._unreported: dict[str, int] = {}
        self.dropped = 0

    def append(self, push: Push) -> None:
        if len(self._items) >= self._limit:
            self._count_lost(self._items.popleft())
        self._items.append(push)

    def _count_lost(self, lost: Push) -> None:
        stream, count = _STREAMS.get(lost.method, lost.method), 1
        if lost.method == "dropped" and isinstance(lost.params, dict):
            # Losing a notice loses the count it carried, not one message.
            stream = str(lost.params.get("stream", "status"))
            count = lost.params.get("count", 0) if isinstance(lost.params.get("count"), int) else 0
        self._unreported[stream] = self._unreported.get(stream, 0) + count
        self.dropped += count

    def pop(self) -> Push | None:
        if self._unreported:
            stream = next(iter(self._unreported))
            count = self._unreported.pop(stream)
            return Push("dropped", {"stream": stream, "count": count})
        return self._items.popleft() if self._items else None

    def clear(self) -> None:
        self._items.clear()
        self._unreported.clear()

    def __len__(self) -> int:
        return len(self._items) + len(self._unreported)


# -- the trio client -------------------------------------------------------------------------


@attrs.define
class _Waiter:
    event: trio.Event = attrs.Factory(trio.Event)
    reply: _Reply | None = None


@attrs.frozen
class Subscription:
    """What ``AsyncClient.subscribe`` yields: its id, and the client's pushes to iterate.

    Iteration ends only by ``ConnectionLost`` (the daemon went away) or by leaving the
    ``subscribe`` block.
    """

    id: str
    client: AsyncClient

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Push:
        return await self.client.next_push()


class AsyncClient:
    """A connection to statusd for trio programs; made by ``open_client``.

    ``call`` may be used from many tasks at once (requests are pipelined). Pushes of all
    this client's subscriptions arrive through one buffer, in the daemon's order; read
    them from one task with ``next_push`` or by iterating a ``Subscription``.
    """

    def __init__(
        self,
        path: Path,
        stream: trio.SocketStream,
        *,
        max_pushes: int = DEFAULT_MAX_PUSHES,
        max_line_bytes: int = MAX_REPLY_LINE_BYTES,
    ) -> None:
        self.path = path
        self._stream = stream
        self._decoder = LineDecoder(max_line_bytes)
        self._ids = itertools.count(1)
        self._waiters: dict[jsonrpc.RequestId, _Waiter] = {}
        self._outgoing_send, self._outgoing_receive = trio.open_memory_channel[bytes](
            MAX_QUEUED_REQUESTS
        )
        self._pushes = _PushBuffer(max_pushes)
        self._push_arrived = trio.Event()
        self._reader_done = trio.Event()
        self._subscriptions: set[str] = set()
        self._closed_reason: str | None = None
        # An error answered with "id": null (-32004, too many connections) is about the
        # connection, not one call: the calls waiting then get it, and so does every call
        # once the daemon has closed the connection after it.
        self._fatal: RemoteError | None = None

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    @property
    def dropped(self) -> int:
        """Pushes this client dropped because nobody read them in time."""
        return self._pushes.dropped

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """Send a request and return its result; raises ``RemoteError`` if the daemon
        answers with an error, ``ConnectionLost`` if the connection ends first."""
        if self._closed_reason is not None:
            raise self._failure()
        request_id = next(self._ids)
        waiter = _Waiter()
        self._waiters[request_id] = waiter
        try:
            line = jsonrpc.encode_line(jsonrpc.request(method, params, request_id))
            try:
                # A memory channel send is all or nothing, even when cancelled: the
                # writer task only ever puts whole lines on the wire.
                await self._outgoing_send.send(line)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise self._failure() from None
            await waiter.event.wait()
        finally:
            self._waiters.pop(request_id, None)
        if waiter.reply is None:
            raise self._failure()
        return waiter.reply.unwrap()

    @asynccontextmanager
    async def subscribe(
        self, *, status: bool = True, since: int | None = None, notifications: bool = False
    ) -> AsyncIterator[Subscription]:
        """Subscribe for the block's duration; iterate what it yields for the pushes.

        ``since`` asks for the status messages after that seq that the daemon still
        holds (a gap is reported as ``dropped``); without it, only new ones come.
        ``notifications`` adds the caller's ``notification`` and ``unread_count`` pushes.
        """
        result = await self.call("subscribe", _subscribe_params(status, since, notifications))
        subscription = Subscription(str(result["subscription"]), self)
        self._subscriptions.add(subscription.id)
        try:
            yield subscription
        finally:
            self._subscriptions.discard(subscription.id)
            if self._closed_reason is None:
                # Shielded: leaving because of a cancellation must still stop the daemon
                # sending to a reader that is gone.
                with trio.move_on_after(UNSUBSCRIBE_GRACE, shield=True):
                    with suppress(DaemonUnreachable, RemoteError):
                        await self.call("unsubscribe", {"subscription": subscription.id})
            if not self._subscriptions:
                # The daemon sends nothing after answering unsubscribe, so what is held
                # now is stale; a later subscription must not start with it.
                self._pushes.clear()

    async def next_push(self) -> Push:
        """The next pushed message, waiting for one; ``ConnectionLost`` once the
        connection has ended and everything received was read."""
        while True:
            push = self._pushes.pop()
            if push is not None:
                return push
            if self._closed_reason is not None:
                raise self._failure()
            await self._push_arrived.wait()

    # -- background tasks ------------------------------------------------------------------

    async def _read_loop(self) -> None:
        """Route every line the daemon sends; never raises, so the nursery only ever
        carries the caller's own exception."""
        reason = "the client was closed"
        try:
            while True:
                try:
                    data = await self._stream.receive_some(RECEIVE_CHUNK)
                except trio.ClosedResourceError:
                    return
                except trio.BrokenResourceError as exc:
                    reason = _describe_broken(exc)
                    return
                if not data:
                    reason = "the daemon closed the connection"
                    return
                try:
                    for line in self._decoder.feed(data):
                        for item in _decode(line):
                            self._dispatch(item)
                except LineTooLong as exc:
                    reason = f"the daemon sent a {exc}"
                    return
                except _Garbled as exc:
                    reason = str(exc)
                    return
        finally:
            self._reader_done.set()
            self._shut(reason)

    async def _write_loop(self) -> None:
        reason = "the client was closed"
        try:
            async for line in self._outgoing_receive:
                try:
                    await self._stream.send_all(line)
                except trio.ClosedResourceError:
                    return
                except trio.BrokenResourceError as exc:
                    reason = _describe_broken(exc)
                    # The daemon may have said why it closed on us (-32004) in a line
                    # still unread: let the reader get to it before the socket goes.
                    with trio.move_on_after(WRITE_FAILURE_GRACE):
                        await self._reader_done.wait()
                    return
        finally:
            self._outgoing_receive.close()
            self._shut(reason)

    def _dispatch(self, item: _Reply | Push) -> None:
        if isinstance(item, Push):
            self._pushes.append(item)
            self._wake_readers()
            return
        if item.id is None:
            if item.error is not None:
                self._fatal = item.error
                self._release_waiters()
            return
        waiter = self._waiters.pop(item.id, None)
        # No waiter: its call was cancelled; the reply has nobody to go to.
        if waiter is not None:
            waiter.reply = item
            waiter.event.set()

    def _wake_readers(self) -> None:
        # Waiters hold the event they saw; a fresh one is for the next wait.
        self._push_arrived.set()
        self._push_arrived = trio.Event()

    def _release_waiters(self) -> None:
        for waiter in self._waiters.values():
            waiter.event.set()
        self._waiters.clear()

    def _shut(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        # Only the sending side: the writer task owns the receiving side, and closing that
        # under its ``async for`` would make the writer raise.
        self._outgoing_send.close()
        # The other loop may be blocked on the socket; closing it wakes that loop.
        self._stream.socket.close()
        self._release_waiters()
        self._wake_readers()

    def _failure(self) -> Exception:
        if self._fatal is not None:
            return self._fatal.copy()
        return ConnectionLost(self.path, self._closed_reason or "the connection is closed")


def _describe_broken(exc: trio.BrokenResourceError) -> str:
    cause = exc.__cause__
    if isinstance(cause, OSError):
        return _describe_os_error(cause)
    return str(exc) or "the connection broke"


@asynccontextmanager
async def open_client(
    socket_path: StrPath | None = None,
    *,
    max_pushes: int = DEFAULT_MAX_PUSHES,
    max_line_bytes: int = MAX_REPLY_LINE_BYTES,
) -> AsyncIterator[AsyncClient]:
    """Connect to statusd (the first of ``socket_candidates`` that answers) for the block's
    duration.

    Raises ``DaemonUnreachable`` if nothing answers at any of them. Exceptions from the block
    come out as themselves, not wrapped in an exception group.
    """
    path, stream = await _open_first(socket_candidates(socket_path))
    client = AsyncClient(path, stream, max_pushes=max_pushes, max_line_bytes=max_line_bytes)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._read_loop)
            nursery.start_soon(client._write_loop)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The background loops never raise, so a group holds the block's exception
        # alone; unwrapped, ``except RemoteError`` works as it does around any call.
        if len(group.exceptions) == 1:
            error = group.exceptions[0]
            raise error from error.__cause__
        raise
    finally:
        stream.socket.close()


async def _open_first(candidates: Sequence[Path]) -> tuple[Path, trio.SocketStream]:
    tried: list[tuple[Path, str]] = []
    for path in candidates:
        if (reason := distrusted(path)) is not None:
            tried.append((path, reason))
            continue
        try:
            return path, await trio.open_unix_socket(os.fspath(path))
        except OSError as exc:
            tried.append((path, _describe_os_error(exc)))
    raise DaemonUnreachable.after(tried)


# -- the blocking client ---------------------------------------------------------------------


def _connect_first(candidates: Sequence[Path], timeout: float | None) -> tuple[Path, socket.socket]:
    tried: list[tuple[Path, str]] = []
    for path in candidates:
        if (reason := distrusted(path)) is not None:
            tried.append((path, reason))
            continue
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(os.fspath(path))
        except OSError as exc:
            sock.close()
            tried.append((path, _describe_os_error(exc)))
        else:
            return path, sock
    raise DaemonUnreachable.after(tried)


class Client:
    """A blocking connection to statusd, for scripts, statusctl and GUI threads.

    Connects on construction to the first of ``socket_candidates`` that answers
    (``DaemonUnreachable`` if none does), and ``path`` says which. A lock makes one
    call at a time, so threads may share a client, but a thread waiting in ``next_push``
    holds it; a GUI is better served by ``StatusMonitor``. ``timeout`` (seconds, None for
    none) bounds each call and raises ``TimeoutError``; the connection stays usable.
    """

    def __init__(
        self,
        socket_path: StrPath | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_pushes: int = DEFAULT_MAX_PUSHES,
        max_line_bytes: int = MAX_REPLY_LINE_BYTES,
    ) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 or None, not {timeout}")
        self.path, self._sock = _connect_first(socket_candidates(socket_path), timeout)
        self.timeout = timeout
        self._pushes = _PushBuffer(max_pushes)
        self._decoder = LineDecoder(max_line_bytes)
        self._items: deque[_Reply | Push] = deque()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._subscriptions: set[str] = set()
        self._closed_reason: str | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    @property
    def dropped(self) -> int:
        """Pushes this client dropped because nobody read them in time."""
        return self._pushes.dropped

    def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """Send a request and return its result; raises ``RemoteError``,
        ``ConnectionLost`` or ``TimeoutError``."""
        with self._lock:
            request_id = next(self._ids)
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            self._send(jsonrpc.encode_line(jsonrpc.request(method, params, request_id)))
            while True:
                item = self._receive(deadline, f"no answer to {method}")
                if isinstance(item, Push):
                    self._pushes.append(item)
                elif item.id == request_id:
                    return item.unwrap()
                elif item.id is None and item.error is not None:
                    raise item.error.copy()
                # Otherwise: the answer to a call that timed out earlier.

    def subscribe(
        self, *, status: bool = True, since: int | None = None, notifications: bool = False
    ) -> str:
        """Subscribe; returns the subscription id. Read the pushes with ``next_push``."""
        result = self.call("subscribe", _subscribe_params(status, since, notifications))
        subscription = str(result["subscription"])
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: str) -> None:
        self.call("unsubscribe", {"subscription": subscription})
        self._subscriptions.discard(subscription)
        if not self._subscriptions:
            # Nothing comes after the answer to unsubscribe: what is held is stale.
            self._pushes.clear()

    def next_push(self, timeout: float | None = None) -> Push:
        """The next pushed message, waiting up to ``timeout`` seconds (None: forever)."""
        with self._lock:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                push = self._pushes.pop()
                if push is not None:
                    return push
                item = self._receive(deadline, "no pushed message")
                if isinstance(item, Push):
                    return item
                if item.id is None and item.error is not None:
                    raise item.error.copy()

    def abort(self) -> None:
        """Break the connection now, from any thread: a thread blocked in ``call`` or
        ``next_push`` gets ``ConnectionLost``. ``close`` still has to be called."""
        if self._closed_reason is None:
            self._closed_reason = "the connection was aborted"
        with suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self._closed_reason is None:
            self._closed_reason = "the client was closed"
        self._sock.close()

    def _lost(self, reason: str) -> ConnectionLost:
        if self._closed_reason is None:
            self._closed_reason = reason
        self._sock.close()
        return ConnectionLost(self.path, self._closed_reason)

    def _send(self, line: bytes) -> None:
        if self._closed_reason is not None:
            raise ConnectionLost(self.path, self._closed_reason)
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(line)
        except OSError as exc:
            refusal = self._refusal()
            # Part of the line may be out (a timeout included): the stream is unusable.
            lost = self._lost(_describe_os_error(exc))
            if refusal is not None:
                raise refusal.copy() from None
            raise lost from None

    def _refusal(self) -> RemoteError | None:
        """The error the daemon sent before closing on us (-32004), if it is here yet."""
        with suppress(OSError, LineTooLong, _Garbled):
            self._sock.settimeout(0)
            while data := self._sock.recv(RECEIVE_CHUNK):
                for line in self._decoder.feed(data):
                    self._items.extend(_decode(line))
        for item in self._items:
            if isinstance(item, _Reply) and item.id is None and item.error is not None:
                return item.error
        return None

    def _receive(self, deadline: float | None, waiting_for: str) -> _Reply | Push:
        while not self._items:
            if self._closed_reason is not None:
                raise ConnectionLost(self.path, self._closed_reason)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"{waiting_for} from statusd at {self.path}")
            try:
                self._sock.settimeout(remaining)
                data = self._sock.recv(RECEIVE_CHUNK)
            except TimeoutError:
                raise TimeoutError(f"{waiting_for} from statusd at {self.path}") from None
            except OSError as exc:
                raise self._lost(_describe_os_error(exc)) from None
            if not data:
                raise self._lost("the daemon closed the connection")
            try:
                for line in self._decoder.feed(data):
                    self._items.extend(_decode(line))
            except LineTooLong as exc:
                raise self._lost(f"the daemon sent a {exc}") from None
            except _Garbled as exc:
                raise self._lost(str(exc)) from None
        return self._items.popleft()


# -- following across daemon restarts -------------------------------------------------------


@attrs.define
class Backoff:
    """How long to wait before each attempt to reconnect: ``minimum`` seconds, doubling
    up to ``maximum``; ``reset`` once connected again."""

    minimum: float
    maximum: float
    _next: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        if self.minimum <= 0:
            raise ValueError(f"min_backoff must be > 0, not {self.minimum}")
        if self.maximum < self.minimum:
            raise ValueError(f"max_backoff must be >= min_backoff, not {self.maximum}")
        self._next = self.minimum

    def next(self) -> float:
        wait = self._next
        self._next = min(self._next * 2, self.maximum)
        return wait

    def reset(self) -> None:
        self._next = self.minimum


@attrs.define
class StatusCursor:
    """Where a reader is in a daemon's status stream, so that subscribing again after a
    lost connection resumes with ``since`` and neither repeats nor skips a message.

    A restarted daemon numbers from 1 again; the cursor tells it apart by its pid and
    start time (``daemon.info``) and then asks for everything the new daemon holds.
    ``last_seq`` None: start with what comes next."""

    last_seq: int | None = None
    _daemon: tuple[Any, Any] | None = None

    def since(self, info: Mapping[str, Any]) -> int:
        """The ``since`` to subscribe with, given the ``daemon.info`` of the daemon now
        connected to."""
        identity = (info.get("pid"), info.get("started_at"))
        if self._daemon is not None and identity != self._daemon:
            self.last_seq = 0
        elif self.last_seq is None:
            self.last_seq = int(info.get("status_seq", 0))
        self._daemon = identity
        return self.last_seq

    def seen(self, message: Any) -> None:
        """A status message was delivered."""
        seq = message.get("seq") if isinstance(message, Mapping) else None
        if isinstance(seq, int):
            self.last_seq = seq


# -- the GUI side of the seed contract -------------------------------------------------------

StatusCallback = Callable[[dict[str, Any]], None]
DroppedCallback = Callable[[int], None]


class StatusMonitor:
    """Follow statusd's status messages from a background thread (seed STATUS-UI-001).

    ``start_monitoring()`` starts a daemon thread that connects, subscribes and calls
    ``status_callback(message)`` for every status message, oldest first; ``message`` is
    the StatusMessage dict (``seq``, ``timestamp``, ``level``, ``message``,
    ``operation_id``). A ``dropped`` notice calls ``dropped_callback(count)``.

    The callbacks run on the monitor thread. A Tk or Qt program must not touch widgets
    there: hand the message to the main thread (``root.after(0, ...)`` in Tk, a queued
    signal or ``QMetaObject.invokeMethod(..., Qt.QueuedConnection)`` in Qt), and return
    quickly, since the next message waits for the callback. An exception from a callback
    is logged and monitoring goes on.

    When the connection is lost (the daemon restarts, say) the monitor reconnects with
    backoff from ``min_backoff`` doubling to ``max_backoff`` seconds, and resubscribes
    from the last seq it delivered, so what was published meanwhile comes from the
    daemon's history. A restarted daemon numbers from 1 again; the monitor notices (by
    its pid and start time) and asks for everything the new daemon holds.

    ``since``: start after this seq; None (the default) starts with what comes next.
    ``socket_path`` None looks where ``socket_candidates`` says, at every reconnection.
    """

    def __init__(
        self,
        socket_path: StrPath | None,
        status_callback: StatusCallback,
        *,
        dropped_callback: DroppedCallback | None = None,
        since: int | None = None,
        min_backoff: float = 0.1,
        max_backoff: float = 5.0,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._backoff = Backoff(min_backoff, max_backoff)
        self.socket_path = socket_path
        self.status_callback = status_callback
        self.dropped_callback = dropped_callback
        self._timeout = timeout
        self._cursor = StatusCursor(since)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._client: Client | None = None
        self._thread: threading.Thread | None = None
        self._connected = threading.Event()

    @property
    def last_seq(self) -> int | None:
        """The seq of the last status message delivered (or the ``since`` given)."""
        return self._cursor.last_seq

    @property
    def monitoring(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def connected(self) -> bool:
        """True while subscribed to a daemon."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until subscribed; False if ``timeout`` passed first."""
        return self._connected.wait(timeout)

    def start_monitoring(self) -> None:
        if self.monitoring:
            raise RuntimeError("status monitor is already running")
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._monitor_loop, name="statusd-monitor", daemon=True
        )
        self._thread.start()

    def stop_monitoring(self, timeout: float | None = 5.0) -> None:
        """Stop and wait (up to ``timeout``) for the thread; no callback runs after this
        returns, unless it is called from a callback itself."""
        self._stopping.set()
        with self._lock:
            client = self._client
        if client is not None:
            # Unblocks the thread's recv() at once; no polling interval to wait out.
            client.abort()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _monitor_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client = Client(self.socket_path, timeout=self._timeout)
            except DaemonUnreachable as exc:
                log.debug("%s", exc)
            else:
                with self._lock:
                    if self._stopping.is_set():
                        client.close()
                        return
                    self._client = client
                try:
                    self._follow(client)
                except (DaemonUnreachable, RemoteError, TimeoutError) as exc:
                    if not self._stopping.is_set():
                        log.info("status monitor: %s", exc)
                except Exception:
                    log.exception("status monitor: unexpected error")
                finally:
                    with self._lock:
                        self._client = None
                    client.close()
                    if self._connected.is_set():
                        self._connected.clear()
                        self._backoff.reset()
            if self._stopping.wait(self._backoff.next()):
                return

    def _follow(self, client: Client) -> None:
        client.subscribe(status=True, since=self._cursor.since(client.call("daemon.info")))
        self._connected.set()
        while not self._stopping.is_set():
            push = client.next_push()
            if self._stopping.is_set():
                return
            if push.method == "status" and isinstance(push.params, dict):
                self._cursor.seen(push.params)
                self._run_callback(self.status_callback, push.params)
            elif push.method == "dropped" and self.dropped_callback is not None:
                count = push.params.get("count", 0) if isinstance(push.params, dict) else 0
                self._run_callback(self.dropped_callback, count)

    def _run_callback(self, callback: Callable[[Any], None], argument: Any) -> None:
        try:
            callback(argument)
        except Exception:
            # A bug in the UI's callback must not stop the monitoring.
            log.exception("status monitor: callback %r failed", callback)
