"""The Unix socket server: newline-delimited JSON-RPC with peer credentials and limits.

Per connection a reader parses lines (``limits.max_request_bytes``, read when the client
connects), answers them and sends the replies to everything it read in one write; a writer
sends pushes, and the rest of any write the socket had no room for. A client that stops
reading blocks only its own writer: pushed messages it misses are dropped oldest-first and
reported, and its reader pauses while its replies are unsent (see ``statusd.session``).

Open connections follow a reload's access rules (``recheck``): one whose user the socket
file no longer admits is told why and closed; one whose user is no longer an admin is
served as a user from then on, and at most ``limits.max_connections_per_user`` of its
connections stay.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import socket as stdlib_socket
import stat
import struct
from pathlib import Path
from typing import Any

import attrs
import trio

from statusd.access import SocketAccess
from statusd.api import Api
from statusd.config import Config
from statusd.errors import Busy, Forbidden, InvalidRequest, StartupError
from statusd.events import Streams
from statusd.identity import Caller, CallerLookups
from statusd.protocol import jsonrpc
from statusd.protocol.framing import LineDecoder, LineTooLong
from statusd.session import Fanout, Session
from statusd.state.connections import Connections, Refusal
from statusd.transports.accept import connection_limits, serve_listeners
from statusd.transports.answer import answer

log = logging.getLogger(__name__)

RECEIVE_CHUNK = 64 * 1024
LISTEN_BACKLOG = 128
# Seconds a connection closed by a reload has to take its last words; a client that does
# not read them is cut off then, as at shutdown.
CLOSE_GRACE = 1.0
_PEERCRED = struct.Struct("iII")
_GONE = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)  # struct ucred: pid_t pid; uid_t uid; gid_t gid


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from SO_PEERCRED."""
    raw = sock.getsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


@attrs.define(eq=False)
class _Held:
    """What a reload needs of an open connection besides its session."""

    # The group the process connected with: it still has it, whatever the group database
    # says now (and a uid without a passwd entry has no other).
    gid: int
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)


def _check_private_directory(directory: Path) -> None:
    # The /tmp fallback lives in a world-writable directory: another user could have
    # made ours first and would then control who connects, so insist it is ours alone.
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise StartupError(f"socket: {directory} is not a directory")
    if info.st_uid != os.getuid():
        raise StartupError(f"socket: {directory} belongs to uid {info.st_uid}, not to us")
    if info.st_mode & 0o022:
        raise StartupError(f"socket: {directory} is writable by others")


async def _remove_stale_socket(path: Path) -> None:
    """Remove ``path`` if it is a socket nobody listens on; refuse if someone does."""
    try:
        info = await trio.Path(path).lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise StartupError(f"socket: {path} exists and is not a socket; not touching it")
    probe = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        with trio.move_on_after(2):
            await probe.connect(str(path))
            raise StartupError(f"socket: another statusd is already listening on {path}")
    except (ConnectionRefusedError, FileNotFoundError):
        pass
    except OSError as exc:
        if exc.errno != errno.ECONNREFUSED:
            raise StartupError(f"socket: cannot probe {path}: {exc.strerror}") from None
    finally:
        probe.close()
    log.warning("removing stale socket %s left by a daemon that did not stop", path)
    await trio.Path(path).unlink(missing_ok=True)


async def bind_unix_socket(
    config: Config, passed: int | None = None
) -> tuple[trio.socket.SocketType, os.stat_result | None]:
    """The listening socket and the identity of the file we bound (to remove it at exit).

    A socket ``passed`` by systemd (its file descriptor) is used as it is: its unit set its
    mode and group, and systemd owns the file, so the identity is None and the file is
    never removed.
    """
    if passed is not None:
        return trio.socket.from_stdlib_socket(stdlib_socket.socket(fileno=passed)), None
    path = config.socket
    if config.socket_is_default:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        if str(path.parent).startswith("/tmp/"):
            _check_private_directory(path.parent)
    elif not path.parent.is_dir():
        raise StartupError(f"socket: directory {path.parent} does not exist")
    await _remove_stale_socket(path)
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        try:
            await sock.bind(str(path))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(f"socket: {path} is in use by another process") from None
            raise StartupError(f"socket: cannot bind {path}: {exc.strerror}") from None
        try:
            # Nobody can connect before listen(), so setting mode and group here leaves no
            # window in which the umask's permissions apply.
            _set_permissions_at_start(path, config)
            identity = path.stat()
            sock.listen(LISTEN_BACKLOG)
        except BaseException:
            # Ours, and nobody listens on it: left behind it would only be probed and
            # removed as stale by the next start.
            path.unlink(missing_ok=True)
            raise
    except BaseException:
        sock.close()
        raise
    return sock, identity


def _set_permissions(path: Path, mode: int, group: str | None) -> None:
    os.chmod(path, mode)
    if group is not None:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)


def _set_permissions_at_start(path: Path, config: Config) -> None:
    try:
        _set_permissions(path, config.socket_mode, config.socket_group)
    except OSError as exc:
        what = f"mode {config.socket_mode:04o}"
        if config.socket_group is not None:
            what += f" and group {config.socket_group}"
        raise StartupError(f"socket: cannot give {path} {what}: {exc.strerror}") from None


class UnixServer:
    def __init__(self, config: Config, api: Api, streams: Streams) -> None:
        self._config = config
        self._api = api
        self._streams = streams
        self._sessions: dict[Session, _Held] = {}
        self._admitted = Connections(connection_limits(config))
        # Connections whose caller is still being looked up, not yet admitted or refused.
        self._pending = 0
        self._max_pending = config.limits.max_pending_handshakes
        self._accept_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._identity: os.stat_result | None = None
        self.path = config.socket
        self._connections_changed = trio.lowlevel.ParkingLot()
        # Passwd and group lookups can block for seconds (LDAP, SSSD): never on the loop.
        self.lookups = CallerLookups()
        # Reloads so far, and the socket file's rule as the last one read it: a connection
        # still being admitted when a reload comes is held to it (``_admission``).
        self._reloads = 0
        self._access: SocketAccess | None = None
        self._fanout = Fanout()

    @property
    def connections(self) -> int:
        return len(self._sessions)

    @property
    def max_connections(self) -> int:
        return self._admitted.limits.max_connections

    def configure(self, config: Config) -> None:
        """The connection limits and ``admin_group`` of a reloaded configuration; held
        connections stay."""
        self._config = config
        self._admitted.configure(connection_limits(config))
        self._max_pending = config.limits.max_pending_handshakes

    async def serve(
        self,
        passed: int | None = None,
        *,
        task_status: trio.TaskStatus[UnixServer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``config.socket``, or on the listening socket whose file descriptor
        systemd ``passed`` (socket activation)."""
        sock, self._identity = await bind_unix_socket(self._config, passed)
        # Where the file is, also for a socket systemd passed (its unit chose the path).
        self.path = Path(sock.getsockname())
        listener = trio.SocketListener(sock)
        if passed is None:
            log.info("listening on %s", self._config.socket)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._fanout.run)
                nursery.start_soon(self._accept, listener)
                task_status.started(self)
        finally:
            self._unlink()

    async def _accept(self, listener: trio.SocketListener) -> None:
        assert self._nursery is not None
        with self._accept_scope:
            await serve_listeners(self._handle, [listener], self._nursery, "unix socket")

    async def access(self) -> SocketAccess:
        """Who may connect, read from the socket file as it is now."""
        return await trio.to_thread.run_sync(SocketAccess.of, self.path)

    def set_permissions(self, mode: int, group: str | None) -> None:
        """Apply ``socket_mode`` and ``socket_group`` again (SIGHUP), to a socket file this
        daemon made; one systemd passed keeps what its unit says."""
        if self._identity is not None:
            _set_permissions(self.path, mode, group)

    async def wait_connections_at_most(self, count: int) -> None:
        while len(self._sessions) > count:
            await self._connections_changed.park()

    async def _admission(
        self, uid: int, pid: int, held: _Held, accepted_under: int
    ) -> tuple[Caller, str | None]:
        """Who a new connection's peer is, and why it may not stay (None: it may). The
        kernel admitted it under the rules of reload ``accepted_under``; a reload since,
        which ``recheck`` could not apply to it (not yet served), is applied here."""
        while True:
            reloads = self._reloads
            caller = await self.lookups.caller_for_uid(uid, self._config.admin_group, pid=pid)
            refused = None
            access = self._access
            if (
                reloads != accepted_under
                and access is not None
                and not await self._admits(access, caller, held)
            ):
                refused = self._not_admitted(caller, access)
            if reloads == self._reloads:
                return caller, refused

    @staticmethod
    def _not_admitted(caller: Caller, access: SocketAccess) -> str:
        return (
            f"uid {caller.uid} ({caller.username}) may no longer connect to the control "
            f"socket ({access.describe()}) after a configuration reload; the connection "
            "is closed"
        )

    async def recheck(self, access: SocketAccess | None) -> None:
        """After a reload: hold every open connection to the rules new ones meet. A user
        the socket file (``access``, as it is now; None: unreadable, not judged) no longer
        admits gets a -32002 error with ``"id": null`` saying why, and the connection
        closes; an admin who no longer is one keeps the connection with a user's rights
        and is told by an ``access_changed`` notification, and of an ex-admin's
        connections the newest beyond ``limits.max_connections_per_user`` (from which
        admins are exempt) are closed too (``_trim``). Rights given are not added to open
        connections: they come with the next one. Look-ups are fresh only if
        ``lookups.forget()`` came first."""
        self._reloads += 1
        if access is not None:
            self._access = access
        admin_group = self._config.admin_group
        demoted: set[int] = set()
        for session, held in list(self._sessions.items()):
            before = session.caller
            now = await self.lookups.caller_for_uid(before.uid, admin_group, pid=before.pid)
            refused = access is not None and not await self._admits(access, before, held)
            if session.closing or session not in self._sessions:
                continue  # gone, or going, while we looked
            if refused:
                assert access is not None
                self._drop(session, held, self._not_admitted(before, access))
            elif before.admin and not now.admin:
                self._demote(session, admin_group)
                demoted.add(before.uid)
        for uid in demoted:
            self._trim(uid)

    def _trim(self, uid: int) -> None:
        """An ex-admin keeps what a user may hold: it was let in past the per-user cap as
        an admin, and a user's connections beyond it would outlast the rule until they
        end. The newest go, as the next one would have been refused."""
        most = self._admitted.limits.per_user
        # In the order they were admitted (a dict keeps it).
        held = [
            (session, kept)
            for session, kept in self._sessions.items()
            if session.caller.uid == uid and not session.closing
        ]
        for session, kept in held[most:]:
            caller = session.caller
            message = (
                f"uid {uid} ({caller.username}) is no longer an admin after a configuration "
                f"reload and held {len(held)} connections, more than a user may "
                f"(limits.max_connections_per_user = {most}); its newest "
                f"{len(held) - most} are closed, this one among them"
            )
            data = {
                "reason": "connections",
                "limit": most,
                "key": "limits.max_connections_per_user",
            }
            self._drop(session, kept, message, data)

    async def _admits(self, access: SocketAccess, caller: Caller, held: _Held) -> bool:
        groups: frozenset[int] = frozenset()
        if access.needs_groups(caller.uid):
            groups = await self.lookups.groups_for(caller.uid, caller.username)
        return access.permits(caller.uid, groups | {held.gid})

    def _drop(
        self, session: Session, held: _Held, message: str, data: dict[str, Any] | None = None
    ) -> None:
        log.info("closing the connection of %s: %s", session.caller.username, message)
        error = Forbidden(message, data or {"reason": "access"})
        session.add_reply(jsonrpc.encode_line(jsonrpc.error_response(None, error)))
        # The writer sends what is queued, then the connection ends; one that cannot send
        # (its client reads nothing) is cut off after the grace.
        session.close()
        held.scope.deadline = min(held.scope.deadline, trio.current_time() + CLOSE_GRACE)

    def _demote(self, session: Session, admin_group: str | None) -> None:
        caller = session.caller
        group = "no admin_group" if admin_group is None else f"admin_group = {admin_group!r}"
        reason = (
            f"uid {caller.uid} ({caller.username}) is no longer an admin ({group}) "
            "after a configuration reload"
        )
        log.info("connection of %s: %s", caller.username, reason)
        session.demote(attrs.evolve(caller, admin=False))
        notice = jsonrpc.notification("access_changed", {"admin": False, "reason": reason})
        session.add_reply(jsonrpc.encode_line(notice))
        session.wake_writer()

    def _unlink(self) -> None:
        """Remove the socket file, but only if it is still the one we bound: never one
        that systemd passed (no identity), nor one another process put there since."""
        if self._identity is None:
            return
        path = self._config.socket
        try:
            current = path.lstat()
        except FileNotFoundError:
            return
        if (current.st_dev, current.st_ino) == (self._identity.st_dev, self._identity.st_ino):
            path.unlink(missing_ok=True)
        self._identity = None

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, remove the socket file, let connections flush for up to
        ``grace`` seconds, then close them."""
        self._accept_scope.cancel()
        self._unlink()
        for session in list(self._sessions):
            session.close()
        with trio.move_on_after(grace):
            await self.wait_connections_at_most(0)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            pid, uid, gid = peer_credentials(stream.socket)
            # Nobody, admins included, gets past max_connections: say so before a lookup.
            refusal = self._admitted.check(uid, admin=True) or self._pending_refusal()
            if refusal is not None:
                await self._refuse(stream, Busy(refusal.message, refusal.data))
                return
            held = _Held(gid)
            self._pending += 1
            try:
                caller, refused = await self._admission(uid, pid, held, self._reloads)
            finally:
                self._pending -= 1
            if refused is not None:
                await self._refuse(stream, Forbidden(refused, {"reason": "access"}))
                return
            refusal = self._admitted.admit(uid, caller.admin)
            if refusal is not None:
                await self._refuse(stream, Busy(refusal.message, refusal.data))
                return
            try:
                await self._serve(stream, Session(caller, self._streams), held)
            finally:
                self._admitted.release(uid)
        except Exception:
            # serve_listeners runs every handler in one nursery: an exception let out of
            # here would end every client's connection and the daemon with them.
            log.exception("connection failed")
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.SocketStream, session: Session, held: _Held) -> None:
        self._sessions[session] = held
        try:
            with held.scope:
                await self._run_session(stream, session)
        finally:
            session.close()
            del self._sessions[session]
            self._connections_changed.unpark_all()

    def _pending_refusal(self) -> Refusal | None:
        if self._pending < self._max_pending:
            return None
        return Refusal(
            f"too many connections waiting to be admitted "
            f"(limits.max_pending_handshakes = {self._max_pending})",
            "limits.max_pending_handshakes",
            self._max_pending,
        )

    async def _refuse(self, stream: trio.SocketStream, error: Busy | Forbidden) -> None:
        log.debug("connection refused: %s", error.message)
        line = jsonrpc.encode_line(jsonrpc.error_response(None, error))
        with trio.move_on_after(1), contextlib.suppress(*_GONE):
            await stream.send_all(line)

    async def _run_session(self, stream: trio.SocketStream, session: Session) -> None:
        sender = _Sender(stream, session)
        session.fanout = self._fanout
        session.send_directly = sender.send_now
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_loop, stream, session, sender)
            # A client that went away has nothing left to be told.
            with contextlib.suppress(*_GONE):
                await sender.write_loop()
            nursery.cancel_scope.cancel()

    async def _read_loop(
        self, stream: trio.SocketStream, session: Session, sender: _Sender
    ) -> None:
        # The API's config is the live one (SIGHUP), so a new limit reaches new connections.
        decoder = LineDecoder(self._api.config.limits.max_request_bytes)
        session.replies_wake_writer = False
        fd = stream.socket.fileno()
        try:
            while not session.closing:
                await session.wait_reply_room()
                try:
                    data = await _receive(fd)
                except _GONE:
                    return
                if not data:
                    return  # end of stream; a partial line is discarded
                try:
                    lines = decoder.feed(data)
                except LineTooLong as exc:
                    error = InvalidRequest(
                        f"request line exceeds {exc.limit} bytes (limits.max_request_bytes); "
                        "nothing in it ran and the connection is closed",
                        {"limit": exc.limit},
                    )
                    session.add_reply(jsonrpc.encode_line(jsonrpc.error_response(None, error)))
                    return
                for line in lines:
                    if not session.reply_room():
                        sender.send_now()
                        await session.wait_reply_room()
                    await answer(self._api, session, line)
                # The answers to everything read in one go leave in one write.
                sender.send_now()
        except _GONE:
            return
        finally:
            # The writer flushes what is queued, then the connection closes.
            session.close()


async def _receive(fd: int) -> bytes:
    """The next bytes from the client, b"" at its end.

    A client nearly always waits for its answer before it sends again, so wait for
    something to read first: trying first (``receive_some``) costs a failed ``recv`` and
    its exception per call.
    """
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            return os.read(fd, RECEIVE_CHUNK)
        except BlockingIOError:
            continue
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc


class _Sender:
    """Sends one connection's output, in order, from whichever task has it.

    The reader sends its replies itself as soon as it has answered what it read: a reply
    then costs one write and no wake-up of the writer task, which a trivial call would
    otherwise pay in scheduling as much as in answering. The server's fan-out sends
    status messages the same way while the writer is idle. The writer sends the other
    pushes, and whatever did not fit into the socket; while it waits for room, the others
    leave everything to it, so the bytes on the wire keep their order.
    """

    def __init__(self, stream: trio.SocketStream, session: Session) -> None:
        self._stream = stream
        self._fd = stream.socket.fileno()
        self._session = session
        # The writer holds the head of the output (the rest of a write the socket had no
        # room for): until it has sent it, the reader leaves all sending to it, so the
        # order stays, and replies queue one by one against ``max_pending_replies``.
        self._blocked = False

    def send_now(self) -> None:
        session = self._session
        if self._blocked:
            session.wake_writer()
            return
        pending = session.take_pending()
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        sent = self._write(data)
        if sent < len(data):
            self._blocked = True
            session.put_back(data[sent:])

    def _write(self, data: bytes) -> int:
        # One non-blocking write: when the socket has room (nearly always) this costs no
        # trip through the scheduler, where send_all costs two.
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def write_loop(self) -> None:
        session = self._session
        while True:
            await session.wait_pending()
            rest = session.take_unsent()
            if rest is not None:
                # ``_blocked`` is set: nobody else sends until this is out.
                await self._stream.send_all(rest)
            pending = session.take_pending()
            if pending:
                data = pending[0] if len(pending) == 1 else b"".join(pending)
                sent = self._write(data)
                if sent < len(data):
                    self._blocked = True
                    await self._stream.send_all(memoryview(data)[sent:])
                # Sent whole: the reader may send again. Whatever it queued meanwhile is
                # taken next, with no checkpoint in between for it to get ahead.
                self._blocked = False
            elif rest is not None:
                self._blocked = False
            elif session.closing:
                return
