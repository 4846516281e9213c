"""One client's session, whatever the transport: identity, subscriptions, outgoing buffer.

A transport runs two loops per connection: a reader that parses requests and queues the
replies here, and a writer that takes everything pending in one go and sends it in one
write (on the Unix socket the reader takes and sends its own replies once it has answered
what it read, with ``replies_wake_writer`` off, and the writer sends the rest). The
outgoing buffer is bounded two ways:

- replies are never dropped; when ``max_pending_replies`` are waiting, the reader stops
  reading (``wait_reply_room``), so a client that does not read its replies only slows
  itself;
- pushed messages are dropped oldest-first and the client is told with a ``dropped``
  notice: status messages come straight from the channel's ring (a cursor per session,
  no copies; only those the session's user may read), other streams through a
  per-session deque of ``max_pushes``.

Status messages to idle sessions go out through their transport's ``Fanout``, not their
writers: a publish queues every idle session that may read it on the one fan-out task,
which, once the publisher's turn is over, writes to each of them what it has pending
without blocking (the session's ``send_directly``), so a message to 100 idle subscribers
costs 100 writes in one task and no wake-up of 100 writer tasks. A session whose socket
takes only part of it, or that is not idle (its writer is sending a backlog, or about
to), is left to its writer, with the rules above.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
import trio

from statusd.events import Streams
from statusd.identity import Caller
from statusd.protocol import jsonrpc
from statusd.state.status import Reader
from statusd.state.tasks import TaskInfo
from statusd.tokens import Scope

log = logging.getLogger(__name__)

DEFAULT_MAX_PUSHES = 1000
DEFAULT_MAX_PENDING_REPLIES = 256

_subscription_ids = itertools.count(1)


@attrs.frozen
class Subscription:
    id: str
    status: bool = False
    # "all", a set of task ids, or None for no task stream (a topic may still match).
    tasks: str | frozenset[str] | None = None
    topic: str | None = None
    notifications: bool = False

    @property
    def wants_tasks(self) -> bool:
        return self.tasks is not None or self.topic is not None

    def matches(self, task: TaskInfo) -> bool:
        if self.tasks == "all":
            return True
        if isinstance(self.tasks, frozenset) and task.id in self.tasks:
            return True
        return self.topic is not None and task.topic == self.topic


@attrs.frozen
class SessionStatistics:
    pending_replies: int
    pending_pushes: int
    dropped: dict[str, int]
    subscriptions: int


class Fanout:
    """One task that sends status messages to a transport's idle sessions.

    ``add`` is what a session's channel watcher calls when the session is idle: it queues
    the session and wakes the task (once for every session a publish, or a whole batch of
    publishes in one turn, queues). The task then asks each queued session to
    ``deliver``: whatever the session has pending goes out in one non-blocking write,
    so the messages of one turn still go out together, as a writer would send them.
    """

    def __init__(self) -> None:
        self._queued: list[Session] = []
        self._ready = trio.Event()

    def add(self, session: Session) -> None:
        if not self._queued:
            self._ready.set()
        self._queued.append(session)

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready = trio.Event()
            queued, self._queued = self._queued, []
            for session in queued:
                session.deliver()


class Session:
    def __init__(
        self,
        caller: Caller,
        streams: Streams,
        *,
        transport: str = "unix",
        scope: Scope | None = None,
        seed: bool = False,
        max_pushes: int = DEFAULT_MAX_PUSHES,
        max_pending_replies: int = DEFAULT_MAX_PENDING_REPLIES,
    ) -> None:
        if max_pushes < 1:
            raise ValueError(f"max_pushes must be >= 1, not {max_pushes}")
        if max_pending_replies < 1:
            raise ValueError(f"max_pending_replies must be >= 1, not {max_pending_replies}")
        self.caller = caller
        self.transport = transport
        # A WebSocket token's scope limits the methods (statusd.tokens); None: no limit.
        self.scope = scope
        # The seed's endpoints (/ws/bulk-process, /ws/progress) get bare job_update
        # messages and seed-shaped drop notices instead of JSON-RPC notifications.
        self.seed = seed
        self._streams = streams
        self._channel = streams.status
        # Status pushes are the ones this caller may read (StatusMessage.visible_to).
        self.reader = Reader(caller.username, caller.admin)
        self._max_pending_replies = max_pending_replies
        self._replies: deque[bytes] = deque()
        self._pushes: deque[tuple[str, bytes]] = deque(maxlen=max_pushes)
        self._unreported: dict[str, int] = {}
        self._dropped_total: dict[str, int] = {}
        self._subscriptions: dict[str, Subscription] = {}
        # None while no subscription asks for status; else the last seq already taken.
        self._status_cursor: int | None = None
        self._work = trio.Event()
        self._room = trio.Event()
        # The wire bytes of a write the socket took only part of: sent before anything
        # else, by the writer.
        self._unsent: bytes | memoryview | None = None
        # True while the writer waits for work with nothing to send: the one time the
        # fan-out may send for it.
        self._parked = False
        # The transport's fan-out and its non-blocking send of everything pending (which
        # hands what the socket did not take to ``put_back``); None: the writer sends all.
        self.fanout: Fanout | None = None
        self.send_directly: Callable[[], None] | None = None
        self.closing = False
        # False when the transport's reader sends its own replies once it has answered
        # what it read (the Unix socket): a reply then costs no wake-up of the writer.
        self.replies_wake_writer = True

    # -- the reader side -------------------------------------------------------------------

    def add_reply(self, line: bytes) -> None:
        self._replies.append(line)
        if self.replies_wake_writer:
            self._work.set()

    def put_back(self, data: bytes | memoryview) -> None:
        """Hold the unsent rest of a write (bytes as they go on the wire), to be sent
        before anything else, and wake the writer to send it (``take_unsent``)."""
        assert self._unsent is None, "a write started while an earlier one was unsent"
        self._unsent = data
        self._work.set()

    def take_unsent(self) -> bytes | memoryview | None:
        data, self._unsent = self._unsent, None
        return data

    def wake_writer(self) -> None:
        self._work.set()

    def reply_room(self) -> bool:
        return len(self._replies) < self._max_pending_replies

    async def wait_reply_room(self) -> None:
        while not self.reply_room():
            self._room = trio.Event()
            await self._room.wait()

    # -- subscriptions ---------------------------------------------------------------------

    def subscribe(
        self,
        *,
        status: bool = False,
        since: int | None = None,
        tasks: str | frozenset[str] | None = None,
        topic: str | None = None,
        notifications: bool = False,
    ) -> Subscription:
        subscription = Subscription(
            f"sub-{next(_subscription_ids)}",
            status=status,
            tasks=tasks,
            topic=topic,
            notifications=notifications,
        )
        self._subscriptions[subscription.id] = subscription
        if subscription.wants_tasks:
            self._streams.tasks.add(self)
        if notifications:
            self._streams.notifications.add(self)
        if status:
            start = self._channel.last_seq if since is None else since
            # Already streaming: keep the cursor, so no message is ever sent twice.
            if self._status_cursor is None:
                self._status_cursor = start
                self._channel.watch(self._wake, self.reader)
            self._work.set()
        return subscription

    @property
    def subscription_count(self) -> int:
        return len(self._subscriptions)

    def unsubscribe(self, subscription_id: str) -> bool:
        subscription = self._subscriptions.pop(subscription_id, None)
        if subscription is None:
            return False
        if subscription.status and not any(s.status for s in self._subscriptions.values()):
            self._stop_status()
        if not any(s.wants_tasks for s in self._subscriptions.values()):
            self._streams.tasks.discard(self)
        if not any(s.notifications for s in self._subscriptions.values()):
            self._streams.notifications.discard(self)
        return True

    def wants_task(self, task: TaskInfo) -> bool:
        if not task.visible_to(self.caller.username, self.caller.admin):
            return False
        return any(s.matches(task) for s in self._subscriptions.values())

    def demote(self, caller: Caller) -> None:
        """Serve the connection as ``caller`` from now on: the same user, no longer an
        admin (a reload changed ``admin_group``). Its subscriptions stay but, like its
        calls, see only what a user sees: status not yet sent is filtered afresh, and task
        updates of other users' tasks stop."""
        if self._status_cursor is not None and not self.closing:
            # The channel files an admin's wake-up apart from a user's.
            self._channel.unwatch(self._wake, self.reader)
            self.reader = Reader(caller.username, caller.admin)
            self._channel.watch(self._wake, self.reader)
        else:
            self.reader = Reader(caller.username, caller.admin)
        self.caller = caller

    def _stop_status(self) -> None:
        if self._status_cursor is not None:
            self._channel.unwatch(self._wake, self.reader)
            self._status_cursor = None

    def push(self, stream: str, line: bytes) -> None:
        """Queue a pushed message; past ``max_pushes`` the oldest goes and is counted."""
        if len(self._pushes) == self._pushes.maxlen:
            lost_stream, _ = self._pushes[0]
            self._count_drop(lost_stream, 1)
        self._pushes.append((stream, line))
        self._work.set()

    def _count_drop(self, stream: str, count: int) -> None:
        self._unreported[stream] = self._unreported.get(stream, 0) + count
        self._dropped_total[stream] = self._dropped_total.get(stream, 0) + count

    # -- the writer side -------------------------------------------------------------------

    def take_pending(self) -> list[bytes]:
        """Everything to send now, in order: replies, drop notices, then pushes."""
        out: list[bytes] = []
        if self._replies:
            out.extend(self._replies)
            self._replies.clear()
            self._room.set()
        status_lines: list[bytes] = []
        if self._status_cursor is not None:
            status_lines, missed = self._channel.lines_after(self._status_cursor, self.reader)
            self._status_cursor = None if self.closing else self._channel.last_seq
            if missed:
                self._count_drop("status", missed)
        if self._unreported:
            for stream, count in self._unreported.items():
                notice: dict[str, Any] = {"stream": stream, "count": count}
                if self.seed:
                    out.append(jsonrpc.encode_line({"type": "dropped", **notice}))
                else:
                    out.append(jsonrpc.encode_line(jsonrpc.notification("dropped", notice)))
            self._unreported.clear()
        out.extend(status_lines)
        if self._pushes:
            out.extend(line for _, line in self._pushes)
            self._pushes.clear()
        return out

    def has_pending(self) -> bool:
        return bool(
            self._replies
            or self._unsent is not None
            or self._pushes
            or self._unreported
            or (
                self._status_cursor is not None
                and self._status_cursor < self._channel.last_seq_for(self.reader)
            )
        )

    async def wait_pending(self) -> None:
        """Return once ``take_pending()`` has something (or the session is closing)."""
        while not self.has_pending() and not self.closing:
            self._work = trio.Event()
            if self._status_cursor is not None:
                self._channel.watch(self._wake, self.reader)
            self._parked = True
            try:
                await self._work.wait()
            finally:
                self._parked = False

    def _wake(self) -> None:
        if self.fanout is not None and self._idle():
            self.fanout.add(self)
        else:
            self._work.set()

    def _idle(self) -> bool:
        # Parked and not yet woken: nothing of this session's is on its way to the socket
        # (a writer that was woken may already hold the rest of a write).
        return self._parked and not self._work.is_set() and not self.closing

    def deliver(self) -> None:
        """The fan-out's turn: send what is pending now if the session is still idle
        (else its writer, awake, sends it), and watch the channel again."""
        if not self._idle():
            return
        assert self.send_directly is not None
        try:
            self.send_directly()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.close()  # the client went away; its reader finds out too
            return
        except Exception:
            # As a failing writer would: the connection ends, the fan-out goes on.
            log.exception("sending to a %s client failed; closing its connection", self.transport)
            self.close()
            return
        if self._idle() and self._status_cursor is not None:
            self._channel.watch(self._wake, self.reader)

    def close(self) -> None:
        """Stop receiving pushes and wake the writer so it can finish."""
        self.closing = True
        # Keep the status cursor: what was published before the close (the daemon's own
        # "Stopping operations...") is still sent; nothing published later wakes us.
        if self._status_cursor is not None:
            self._channel.unwatch(self._wake, self.reader)
        self._subscriptions.clear()
        self._streams.tasks.discard(self)
        self._streams.notifications.discard(self)
        self._work.set()
        self._room.set()

    def statistics(self) -> SessionStatistics:
        return SessionStatistics(
            pending_replies=len(self._replies),
            pending_pushes=len(self._pushes),
            dropped=dict(self._dropped_total),
            subscriptions=len(self._subscriptions),
        )
