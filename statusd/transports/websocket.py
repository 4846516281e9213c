"""The WebSocket server (trio-websocket): tokens, Host and Origin checks, ``/ws`` and the
seed's endpoints; and, on the same port, the web dashboard's files.

Each connection's request head is read first (``statusd.transports.front``): a request
that is not a WebSocket upgrade is answered as plain HTTP (``statusd.protocol.web``: the
dashboard's files, after the same Host check), an upgrade goes on to trio-websocket. The
page's own origin (``http://`` and the Host it asked for) may open a socket without an
``allowed_origins`` entry.

Every handshake is checked before it is accepted (``statusd.protocol.websocket`` says what
is refused): two Origin headers get 400, a foreign Host or Origin 403, a missing, unknown
or expired token 401, a token whose user could not connect to the control socket 403
(``statusd.access``; checked again for live connections on SIGHUP), an unknown path 404; a
refused handshake runs nothing. Past
``limits.max_pending_handshakes`` handshakes in progress a connection gets 503 without its
request being looked at. An accepted connection counts against ``max_connections``, its
token's ``limits.max_connections_per_user`` and the admins' reserve
(``statusd.state.connections``).

An accepted connection is a ``Session`` like a Unix socket client's, its caller the
token's user and its methods limited by the token's scope, served by the same two loops: a
reader that answers requests (pausing while 256 answers wait) and a writer that sends
whatever is pending. A client that reads slowly
blocks only its own writer; the pushes it misses are dropped oldest-first and reported.

``/ws`` speaks the JSON-RPC protocol; ``/ws/bulk-process/{job_id}`` and
``/ws/progress/{topic_id}`` the seed's message types. The server pings every
``PING_INTERVAL`` seconds and drops a client that has not answered within
``PING_TIMEOUT``. Close codes: 1000 normal, 1001 the daemon is stopping, 1008 the token was
revoked or expired or the job is not the user's, 1009 a message over
``limits.max_request_bytes`` (1 MiB by default), 1013 too many connections.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket as stdlib_socket
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import attrs
import h11
import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    wrap_server_stream,
)

from statusd.access import SocketAccess
from statusd.api import Api
from statusd.config import Config
from statusd.errors import Busy, StartupError
from statusd.events import Streams
from statusd.identity import Caller, CallerLookups
from statusd.logs import EveryInterval
from statusd.protocol import jsonrpc, web
from statusd.protocol import websocket as rules
from statusd.protocol.codec import format_timestamp, unstructure
from statusd.session import Fanout, Session
from statusd.state.connections import Connections, Refusal
from statusd.state.tasks import TaskInfo
from statusd.tokens import TokenRecord, TokenStore
from statusd.transports import front
from statusd.transports.accept import connection_limits, serve_listeners
from statusd.transports.answer import answer

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0  # seconds from TCP connect to a complete upgrade request
CLOSE_TIMEOUT = 5.0  # seconds to complete a closing handshake before the socket is closed
PING_INTERVAL = 20.0
PING_TIMEOUT = 20.0
LISTEN_BACKLOG = 128
REFUSAL_WAIT = 1.0  # seconds a refused connection may take to send its request
REFUSAL_HEAD_BYTES = 16 * 1024
REFUSAL_LOG_INTERVAL = 60.0

NORMAL = 1000
GOING_AWAY = 1001
POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 1013
ABNORMAL = 1006  # the TCP connection went away without a close frame


@attrs.define(eq=False)
class _Link:
    """One accepted connection, for shutdown, revocation and the limit."""

    session: Session
    token_id: str
    stream: trio.SocketStream
    ordered: _Ordered
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    close_code: int = NORMAL
    close_reason: str | None = None
    abort: bool = False  # the client is unresponsive: close the socket, no close frame
    # The page's Origin (None: not a browser) and the dashboard's own origin for the Host
    # it connected to: a reload's allowed_origins is checked against them again.
    origin: str | None = None
    own_origin: str | None = None
    # Reloads before its handshake was checked: one since, which could not see it (not
    # yet among the links), is applied when it joins them (``_serve``).
    checked_under: int = 0

    def close_with(self, code: int, reason: str) -> None:
        if self.close_code == NORMAL:
            self.close_code, self.close_reason = code, reason


def _now() -> str:
    return format_timestamp(datetime.now(UTC))


class _Ordered(trio.abc.Stream):
    """The connection as trio-websocket writes to it: its own frames (pongs, pings, the
    close) wait here while a frame of the daemon's is partly written.

    The daemon's frames go straight to the socket, under trio-websocket's send lock when
    the writer sends them; the fan-out cannot wait for that lock (nor hand it on), so it
    writes only while the lock is free, and when the socket takes part of its write it
    ``hold``s this gate until the writer has sent the rest (``release``).
    """

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self._sent: trio.Event | None = None

    @property
    def half_written(self) -> bool:
        return self._sent is not None

    def hold(self) -> None:
        self._sent = trio.Event()

    def release(self) -> None:
        if self._sent is not None:
            self._sent.set()
            self._sent = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        while self._sent is not None:
            await self._sent.wait()
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        self.release()
        await self.inner.aclose()


def _address(sockname: Any) -> str:
    host, port = sockname[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer(stream: trio.SocketStream) -> str:
    try:
        return _address(stream.socket.getpeername())
    except OSError:
        return "a closed connection"


def _warn_unless_loopback(listeners: list[trio.SocketListener]) -> None:
    for listener in listeners:
        host = listener.socket.getsockname()[0]
        if not rules.is_loopback(host):
            log.warning(
                "the WebSocket listens on %s, which is not a loopback address: tokens travel "
                "in clear text (ws://, no TLS) to anyone on the path; listen on 127.0.0.1, or "
                "put a TLS proxy in front and listen behind it",
                _address(listener.socket.getsockname()),
            )


async def _refuse_handshake(stream: trio.SocketStream, most: int, wait: bool) -> None:
    """Answer 503 without a handshake. When ``wait``, the request's head is read first
    (for at most ``REFUSAL_WAIT`` seconds): a client whose answer comes before it sent its
    request, or that is reset because its request was never read, may never see why."""
    response = rules.busy_response(
        f"too many WebSocket handshakes in progress "
        f"(limits.max_pending_handshakes = {most}); retry later"
    )
    with contextlib.suppress(trio.BrokenResourceError, OSError):
        if wait:
            with trio.move_on_after(REFUSAL_WAIT):
                head = b""
                while b"\r\n\r\n" not in head and len(head) < REFUSAL_HEAD_BYTES:
                    data = await stream.receive_some(REFUSAL_HEAD_BYTES)
                    if not data:
                        return
                    head += data
        with trio.move_on_after(REFUSAL_WAIT):
            await stream.send_all(response)


async def open_listeners(config: Config, passed: int | None) -> list[trio.SocketListener]:
    """The listening sockets: the one systemd passed, else ``[websocket] listen`` bound."""
    if passed is not None:
        sock = trio.socket.from_stdlib_socket(stdlib_socket.socket(fileno=passed))
        return [trio.SocketListener(sock)]
    assert config.websocket.listen is not None
    host, port = config.websocket.listen
    try:
        return await trio.open_tcp_listeners(port, host=host, backlog=LISTEN_BACKLOG)
    except OSError as exc:
        reason = "it is in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise StartupError(f"websocket: cannot listen on {host}:{port}: {reason}") from None


class WebSocketServer:
    def __init__(
        self,
        api: Api,
        streams: Streams,
        tokens: TokenStore,
        current_config: Callable[[], Config],
    ) -> None:
        self._api = api
        self._streams = streams
        self._tokens = tokens
        # allowed_origins and admin_group are read at each handshake: SIGHUP changes them.
        self._config = current_config
        self._admitted = Connections(connection_limits(current_config()))
        self._links: set[_Link] = set()
        # TCP connections whose handshake is not yet decided (limits.max_pending_handshakes).
        self._handshaking: set[trio.SocketStream] = set()
        self._refusing = 0  # refused connections whose request is being read
        self._refusals = EveryInterval(REFUSAL_LOG_INTERVAL)
        self._accept_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._connections_changed = trio.lowlevel.ParkingLot()
        self.addresses: list[str] = []
        self._frames = rules.FrameCache()
        self._fanout = Fanout()
        self._files: dict[str, bytes] = {}  # the dashboard's, read when serving starts
        self._reloads = 0  # ``recheck``s so far
        # A token's user is looked up in passwd and groups, which can block for seconds
        # (LDAP, SSSD): in threads, cached briefly, never on the event loop.
        self.lookups = CallerLookups()
        # The control socket's permissions: a token's user must be one who could connect
        # there. None until that socket is bound; handshakes are refused meanwhile.
        self.socket_access: SocketAccess | None = None
        tokens.on_revoked(self._revoked)
        tokens.on_expired(self._expired)

    @property
    def connections(self) -> int:
        return len(self._links)

    @property
    def max_connections(self) -> int:
        return self._admitted.limits.max_connections

    @property
    def handshakes(self) -> int:
        """Connections whose handshake is in progress."""
        return len(self._handshaking)

    def configure(self, config: Config) -> None:
        """The connection limits of a reloaded configuration; held connections stay.
        (``max_pending_handshakes`` is read at each connection.)"""
        self._admitted.configure(connection_limits(config))

    @property
    def address(self) -> str | None:
        return self.addresses[0] if self.addresses else None

    async def serve(
        self,
        passed: int | None = None,
        *,
        task_status: trio.TaskStatus[WebSocketServer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await open_listeners(self._config(), passed)
        self._files = await trio.to_thread.run_sync(front.load_files)
        self.addresses = [_address(listener.socket.getsockname()) for listener in listeners]
        log.info("WebSocket listening on %s", ", ".join(self.addresses))
        _warn_unless_loopback(listeners)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._fanout.run)
            nursery.start_soon(self._accept, listeners)
            task_status.started(self)

    async def _accept(self, listeners: list[trio.SocketListener]) -> None:
        assert self._nursery is not None
        with self._accept_scope:
            await serve_listeners(self._handle_stream, listeners, self._nursery, "WebSocket")

    async def wait_connections_at_most(self, count: int) -> None:
        while len(self._links) > count:
            await self._connections_changed.park()

    async def shutdown(self, grace: float) -> None:
        """Stop accepting; let each connection flush what is queued and close with 1001
        (going away) within ``grace`` seconds; then cancel what is left."""
        self._accept_scope.cancel()
        for link in list(self._links):
            link.close_with(GOING_AWAY, "statusd is stopping")
            link.session.close()
        with trio.move_on_after(grace):
            await self.wait_connections_at_most(0)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _socket_refusal(self, caller: Caller) -> str | None:
        """Why ``caller`` may not use the WebSocket by the control socket's rule, or None."""
        access = self.socket_access
        if access is None:
            return "the control socket is not ready yet"
        groups: frozenset[int] = frozenset()
        if access.needs_groups(caller.uid):
            groups = await self.lookups.groups_for(caller.uid, caller.username)
        if access.permits(caller.uid, groups):
            return None
        return (
            f"the token's user {caller.username!r} may not connect to the control socket "
            f"({access.describe()})"
        )

    async def recheck(self, access: SocketAccess | None) -> None:
        """After a reload: close (1008) each connection from a page whose origin is no
        longer allowed, whose token's user the control socket no longer admits, or who is
        no longer an admin; their next handshake follows the new rules. ``access`` None
        (the socket file could not be read) keeps the last one known. Look-ups are fresh
        only if ``lookups.forget()`` came first."""
        # Counted with the rule's change, before any wait: a handshake checked before
        # it and accepted after it is held to it when it joins the links.
        self._reloads += 1
        if access is not None:
            self.socket_access = access
        for link in list(self._links):
            await self._recheck_link(link)

    async def _recheck_link(self, link: _Link) -> None:
        config = self._config()
        before = link.session.caller
        now = await self.lookups.caller_for_username(before.username, config.admin_group)
        reason = None
        origins = [*config.websocket.allowed_origins, *filter(None, [link.own_origin])]
        if rules.check_origin(link.origin, origins) is not None:
            reason = "the page's origin is no longer in websocket.allowed_origins"
        elif now is None:
            reason = "the token's user no longer exists"
        elif await self._socket_refusal(now) is not None:
            reason = "the token's user may no longer connect to the control socket"
        elif before.admin and not now.admin:
            reason = "the token's user is no longer an admin"
        if reason is not None:
            log.info("closing WebSocket connection of %s: %s", before.username, reason)
            link.close_with(POLICY_VIOLATION, reason)
            link.scope.cancel()

    def _revoked(self, token_id: str) -> None:
        self._close_token(token_id, "token revoked")

    def _expired(self, token_id: str) -> None:
        self._close_token(token_id, "token expired")

    def _close_token(self, token_id: str, reason: str) -> None:
        for link in self._links:
            if link.token_id == token_id:
                link.close_with(POLICY_VIOLATION, reason)
                link.scope.cancel()

    # -- one TCP connection ----------------------------------------------------------------

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        most = self._config().limits.max_pending_handshakes
        if len(self._handshaking) >= most:
            # Refusals waiting for a request hold descriptors too: at most as many as
            # handshakes; past that the 503 goes out at once.
            wait = self._refusing < most
            self._refusing += wait
            quiet = self._refusals.ready()
            if quiet is not None:
                # Whoever fills the handshakes can make refusals as fast as it connects.
                log.warning(
                    "WebSocket connections refused: %d handshakes in progress "
                    "(limits.max_pending_handshakes); %d more refused since the last report",
                    most,
                    quiet,
                )
            try:
                await _refuse_handshake(stream, most, wait)
            finally:
                self._refusing -= wait
            return
        self._handshaking.add(stream)
        try:
            await self._handshake(stream)
        finally:
            self._handshaking.discard(stream)

    async def _handshake(self, stream: trio.SocketStream) -> None:
        try:
            async with trio.open_nursery() as nursery:
                request: WebSocketRequest | None = None
                # Read per connection, so a reload's limit reaches new connections.
                most = self._config().limits.max_request_bytes
                with trio.move_on_after(HANDSHAKE_TIMEOUT):
                    head = await front.read_head(stream)
                    if head.request is not None and not web.is_upgrade(head.request):
                        await self._answer_page(stream, head.request)
                        return
                    ordered = _Ordered(front.Replayed(stream, head.data))
                    request = await wrap_server_stream(nursery, ordered, max_message_size=most)
                if request is not None:
                    await self._handle_request(request, stream, ordered)
                nursery.cancel_scope.cancel()
        except Exception as exc:
            # trio-websocket's reader fails on some malformed handshakes (a Host that is
            # not ASCII): that costs this connection, never the server.
            log.warning("WebSocket connection failed: %r", exc)
            log.debug("WebSocket connection failure", exc_info=True)
        finally:
            await trio.aclose_forcefully(stream)

    def _allowed_hosts(self, stream: trio.SocketStream) -> list[str]:
        """The Host names besides localhost's: the listen host and the address the
        connection arrived on."""
        config = self._config()
        allowed = [config.websocket.listen[0]] if config.websocket.listen else []
        with contextlib.suppress(OSError):
            allowed.append(str(stream.socket.getsockname()[0]))
        return allowed

    async def _answer_page(self, stream: trio.SocketStream, request: h11.Request) -> None:
        """A plain HTTP request: the dashboard's files, or why not. Decided: it no longer
        counts as a handshake in progress."""
        self._handshaking.discard(stream)
        host = next((value for name, value in request.headers if name == b"host"), None)
        refusal = rules.check_host(
            host.decode("latin-1") if host is not None else None, self._allowed_hosts(stream)
        )
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(web.answer(request, refusal, self._files))

    async def _check(
        self, request: WebSocketRequest, stream: trio.SocketStream
    ) -> rules.Refusal | tuple[TokenRecord, Caller, rules.Route]:
        """Everything decided before accept(), in this order: Host, Origin, token, path."""
        config = self._config()
        # wsproto keeps Host out of request.headers; its Request event has it.
        host: str | None = request._event.host
        refusal = rules.check_single(request.headers, b"origin") or rules.check_host(
            host, self._allowed_hosts(stream)
        )
        if refusal is not None:
            return refusal
        headers = {name.lower(): value for name, value in request.headers}
        origin = headers.get(b"origin")
        # The dashboard's own page (served on this Host, so of this origin) needs no
        # allowed_origins entry; the Host was checked above, so a rebound name cannot pose
        # as it.
        own = web.page_origin(host)
        refusal = rules.check_origin(
            origin.decode("latin-1") if origin is not None else None,
            [*config.websocket.allowed_origins, *([own] if own is not None else [])],
        )
        if refusal is not None:
            return refusal
        target = rules.route(request.path)
        token = rules.bearer_token(request.headers, rules.query_of(request.path))
        if token is None:
            return rules.Refusal(401, "a token is required: Authorization: Bearer T, or ?token=T")
        record = self._tokens.verify(token)
        if record is None:
            return rules.Refusal(401, "the token is not valid (revoked, expired, or never issued)")
        caller = await self.lookups.caller_for_username(record.username, config.admin_group)
        if caller is None:
            return rules.Refusal(401, f"the token's user {record.username!r} does not exist")
        not_admitted = await self._socket_refusal(caller)
        if not_admitted is not None:
            return rules.Refusal(403, not_admitted)
        if isinstance(target, rules.Refusal):
            return target
        return record, caller, target

    async def _handle_request(
        self, request: WebSocketRequest, stream: trio.SocketStream, ordered: _Ordered
    ) -> None:
        checked_under = self._reloads
        checked = await self._check(request, stream)
        # Decided: from here the connection counts against max_connections, or is gone.
        self._handshaking.discard(stream)
        if isinstance(checked, rules.Refusal):
            log.info(
                "WebSocket handshake from %s refused: %d %s",
                _peer(stream),
                checked.status,
                checked.message,
            )
            headers = [(b"content-type", b"text/plain; charset=utf-8")]
            if checked.status == 401:
                headers.append((b"www-authenticate", b'Bearer realm="statusd"'))
            body = f"{checked.status} {checked.message}\n".encode()
            await request.reject(checked.status, extra_headers=headers, body=body)
            return
        record, caller, target = checked
        origin = dict((name.lower(), value) for name, value in request.headers).get(b"origin")
        connection = await request.accept()
        # Said over the WebSocket, not as an HTTP status: a browser's script sees only
        # that a refused handshake failed, never why.
        refusal = self._admitted.admit(record.id, caller.admin)
        if refusal is not None:
            await self._refuse_busy(connection, target, refusal)
            return
        link = _Link(
            Session(
                caller,
                self._streams,
                transport="websocket",
                scope=record.scope,
                seed=target.kind != "rpc",
            ),
            record.id,
            stream,
            ordered,
            origin=origin.decode("latin-1") if origin is not None else None,
            own_origin=web.page_origin(request._event.host),
            checked_under=checked_under,
        )
        try:
            await self._serve(connection, link, target)
        finally:
            self._admitted.release(record.id)

    async def _serve(
        self, connection: WebSocketConnection, link: _Link, target: rules.Route
    ) -> None:
        session = link.session
        self._links.add(link)
        try:
            if link.checked_under != self._reloads:
                await self._recheck_link(link)  # closes it (the scope) if the rules now do
            with link.scope:
                if target.kind == "rpc":
                    await self._run(connection, link, target, self._read_rpc)
                else:
                    await self._run_seed(connection, link, target)
        finally:
            session.close()
            try:
                if not link.abort:
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        await connection.aclose(link.close_code, link.close_reason)
            finally:
                # Counted until the close frame is out: shutdown waits for it.
                self._links.discard(link)
                self._connections_changed.unpark_all()

    async def _refuse_busy(
        self, connection: WebSocketConnection, target: rules.Route, refusal: Refusal
    ) -> None:
        log.info("WebSocket connection refused: %s", refusal.message)
        error = Busy(refusal.message, refusal.data)
        message: Any
        if target.kind == "rpc":
            message = jsonrpc.error_response(None, error)
        else:
            message = rules.seed_message("error", _now(), message=error.message, code=error.code)
        with trio.move_on_after(CLOSE_TIMEOUT), contextlib.suppress(ConnectionClosed):
            await connection.send_message(jsonrpc.encode_line(message)[:-1].decode())
            await connection.aclose(TRY_AGAIN_LATER, "too many connections")

    async def _run(
        self,
        connection: WebSocketConnection,
        link: _Link,
        target: rules.Route,
        reader: Callable[[WebSocketConnection, Session, rules.Route], Any],
    ) -> None:
        sender = _FrameSender(connection, link, target.coalesce, self._frames)
        link.session.fanout = self._fanout
        link.session.send_directly = sender.send_now
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader, connection, link.session, target)
                nursery.start_soon(self._keepalive, connection, link)
                with contextlib.suppress(ConnectionClosed):
                    await sender.write_loop()
                nursery.cancel_scope.cancel()
        finally:
            # A frame left half-written (the writer was cancelled) must not hold the
            # close frame back: it goes as it would have after a cancelled send.
            link.ordered.release()

    async def _keepalive(self, connection: WebSocketConnection, link: _Link) -> None:
        while True:
            await trio.sleep(PING_INTERVAL)
            with trio.move_on_after(PING_TIMEOUT) as waited:
                try:
                    await connection.ping()
                except ConnectionClosed:
                    return
            if waited.cancelled_caught:
                log.info("WebSocket client %s did not answer a ping; dropping it", connection)
                link.abort = True
                link.scope.cancel()
                return

    async def _read_rpc(
        self, connection: WebSocketConnection, session: Session, _target: rules.Route
    ) -> None:
        try:
            while not session.closing:
                await session.wait_reply_room()
                try:
                    message = await connection.get_message()
                except ConnectionClosed:
                    return
                await answer(self._api, session, message)
        finally:
            # The writer flushes what is queued, then the connection closes.
            session.close()

    # -- the seed's endpoints --------------------------------------------------------------

    def _visible(self, caller: Caller, job_id: str) -> TaskInfo | None:
        task = self._api.tasks.get_task(job_id)
        if task is None or not task.visible_to(caller.username, caller.admin):
            return None
        return task

    def _refuse_job(self, link: _Link, job_id: str) -> None:
        """Someone else's job is "not found", as on the Unix socket: ids are not probed.
        The client gets an ``error`` message, then the close (1008)."""
        message = rules.seed_message(
            "error", _now(), job_id=job_id, message=f"job {job_id!r} not found"
        )
        link.session.add_reply(jsonrpc.encode_line(message))
        link.close_with(POLICY_VIOLATION, "job not found")
        link.session.close()

    async def _run_seed(
        self, connection: WebSocketConnection, link: _Link, target: rules.Route
    ) -> None:
        session = link.session
        assert target.ident is not None
        if target.kind == "job":
            task = self._visible(session.caller, target.ident)
            if task is None:
                self._refuse_job(link, target.ident)
            else:
                session.subscribe(tasks=frozenset({task.id}))
                session.add_reply(
                    jsonrpc.encode_line(
                        rules.seed_message(
                            "connected",
                            _now(),
                            job_id=task.id,
                            status="connected",
                            task_status=task.status.value,
                            message=f"Connected to job {task.id}",
                        )
                    )
                )
        else:
            session.subscribe(topic=target.ident)
            session.add_reply(
                jsonrpc.encode_line(
                    rules.seed_message(
                        "connected",
                        _now(),
                        topic_id=target.ident,
                        status="connected",
                        message=f"Connected to topic {target.ident}",
                    )
                )
            )
        await self._run(connection, link, target, self._make_seed_reader(link))

    def _make_seed_reader(
        self, link: _Link
    ) -> Callable[[WebSocketConnection, Session, rules.Route], Any]:
        async def read(
            connection: WebSocketConnection, session: Session, target: rules.Route
        ) -> None:
            try:
                while not session.closing:
                    await session.wait_reply_room()
                    try:
                        raw = await connection.get_message()
                    except ConnectionClosed:
                        return
                    try:
                        self._answer_seed(link, target, raw)
                    except Exception:
                        # As on /ws (statusd.transports.answer): a bug costs one message.
                        log.exception("internal error answering a seed message")
                        error = rules.seed_message("error", _now(), message="internal error")
                        session.add_reply(jsonrpc.encode_line(error))
            finally:
                session.close()

        return read

    def _answer_seed(self, link: _Link, target: rules.Route, raw: str | bytes) -> None:
        session = link.session
        assert target.kind != "rpc"
        request = rules.parse_seed(raw, target.kind)
        now = _now()
        reply: dict[str, Any]
        if isinstance(request, rules.BadMessage):
            reply = rules.seed_message("error", now, message=request.message)
        elif isinstance(request, rules.Ping):
            reply = rules.seed_message("pong", now)
        else:
            job_id = request.job_id
            if job_id is None:
                job_id = target.ident if target.kind == "job" else None
            if job_id is None:
                reply = rules.seed_message("error", now, message="get_status needs a job_id")
            else:
                task = self._visible(session.caller, job_id)
                if task is None:
                    self._refuse_job(link, job_id)
                    return
                if isinstance(request, rules.SubscribeJob):
                    session.subscribe(tasks=frozenset({job_id}))
                    reply = rules.seed_message(
                        "subscribed", now, job_id=job_id, task_status=task.status.value
                    )
                else:
                    reply = rules.seed_message(
                        "status_request",
                        now,
                        job_id=job_id,
                        status=task.status.value,
                        progress=task.progress,
                        processed=task.processed_items,
                        total=task.total_items,
                        task=unstructure(task),
                    )
        session.add_reply(jsonrpc.encode_line(reply))


class _FrameSender:
    """Sends one connection's pending lines as text frames, in one write when the socket
    takes it, from the writer task or, while the writer is idle, the server's fan-out.

    Frames are built from the session's shared lines rather than one ``send_message`` per
    message: that costs a wsproto encode and three trips through the scheduler per
    message and per client, and at 100 clients the daemon spends its time there
    (docs/bench-fanout.md). trio-websocket's own frames (pongs, pings, the close) are
    serialized by its stream lock: the writer's writes take the same lock when they must
    wait, and nobody writes while it is held; a frame the fan-out could not finish holds
    trio-websocket's frames back at ``_Ordered`` instead. Only the writer ever waits on
    this client's socket: publish and the fan-out never do.
    """

    def __init__(
        self, connection: WebSocketConnection, link: _Link, coalesce: bool, frames: rules.FrameCache
    ) -> None:
        self._connection = connection
        self._lock = connection._stream_lock
        self._stream = link.stream
        self._ordered = link.ordered
        self._session = link.session
        self._coalesce = coalesce
        self._frames = frames

    def _free(self) -> bool:
        """Whether a frame may start now: none is being written, by trio-websocket or
        by the fan-out, and the connection is open."""
        return (
            not self._lock.locked()
            and not self._ordered.half_written
            and self._connection.closed is None
        )

    def _write(self, data: bytes) -> int:
        # The descriptor is asked for each time: once trio-websocket has closed the
        # socket it is -1, never a number another connection has since been given.
        fd = self._stream.socket.fileno()
        if fd < 0:
            raise ConnectionClosed(CloseReason(ABNORMAL, "the socket is closed"))
        try:
            return os.write(fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise ConnectionClosed(CloseReason(ABNORMAL, str(exc))) from None

    def send_now(self) -> None:
        """The fan-out's send: everything pending in one non-blocking write; what the
        socket does not take goes to the writer (``Session.put_back``)."""
        session = self._session
        if not self._free():
            session.wake_writer()
            return
        pending = session.take_pending()
        if not pending:
            return
        data = rules.encode_frames(pending, self._coalesce, self._frames)
        try:
            sent = self._write(data)
        except ConnectionClosed as exc:
            raise trio.BrokenResourceError(str(exc)) from None
        if sent < len(data):
            self._ordered.hold()
            session.put_back(memoryview(data)[sent:])

    async def write_loop(self) -> None:
        session = self._session
        lock = self._lock
        while True:
            await session.wait_pending()
            rest = session.take_unsent()
            if rest is not None:
                # The fan-out's half-written frame: trio-websocket's wait at the gate.
                try:
                    await self._send_rest(rest)
                finally:
                    self._ordered.release()
                continue
            pending = session.take_pending()
            if not pending:
                if session.closing:
                    return
                continue
            data = rules.encode_frames(pending, self._coalesce, self._frames)
            if self._free():
                # The lock is free and there is no checkpoint before the write, so no
                # other frame can get in between: one non-blocking write, which nearly
                # always takes everything, and the lock only if the rest must wait.
                sent = self._write(data)
                if sent < len(data):
                    lock.acquire_nowait()
                    try:
                        await self._send_rest(memoryview(data)[sent:])
                    finally:
                        lock.release()
                continue
            async with lock:
                if self._connection.closed is not None:
                    raise ConnectionClosed(self._connection.closed)
                await self._send_rest(memoryview(data))

    async def _send_rest(self, data: bytes | memoryview) -> None:
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionClosed(CloseReason(ABNORMAL, str(exc))) from None
