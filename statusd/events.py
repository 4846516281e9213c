"""The pushed streams a session can subscribe to, besides status: task updates and
notifications.

Each event is encoded once and the same bytes are queued on every session that wants it
and may see it; a session's own bounded queue drops the oldest if its client falls behind.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from statusd.channel import StatusChannel
from statusd.protocol import jsonrpc

if TYPE_CHECKING:
    from statusd.session import Session
    from statusd.state.tasks import TaskInfo


class TaskFeed:
    """Fans ``task_update`` pushes out to the sessions subscribed to tasks."""

    def __init__(self) -> None:
        self._sessions: set[Session] = set()

    def add(self, session: Session) -> None:
        self._sessions.add(session)

    def discard(self, session: Session) -> None:
        self._sessions.discard(session)

    @property
    def subscribers(self) -> int:
        return len(self._sessions)

    def publish(self, task: TaskInfo, update: dict[str, Any]) -> None:
        line: bytes | None = None
        bare: bytes | None = None  # the seed's endpoints get the job_update alone
        for session in self._sessions:
            if session.wants_task(task):
                if session.seed:
                    if bare is None:
                        bare = jsonrpc.encode_line(update)
                    session.push("tasks", bare)
                    continue
                if line is None:
                    line = jsonrpc.encode_line(jsonrpc.notification("task_update", update))
                session.push("tasks", line)


class NotificationFeed:
    """Fans ``notification`` and ``unread_count`` pushes out to the sessions subscribed to
    notifications. A session sees its own user's inbox: that user's notifications and the
    system-wide ones (also for admins: an inbox is personal).

    A new notification is pushed as ``notification`` (with ``read: false``) and followed
    by that user's new ``unread_count``; any other change to an inbox (read, deleted)
    pushes ``unread_count`` to that user's sessions, so a badge stays right without polling.
    """

    def __init__(self) -> None:
        self._sessions: dict[str, set[Session]] = {}

    def add(self, session: Session) -> None:
        self._sessions.setdefault(session.caller.username, set()).add(session)

    def discard(self, session: Session) -> None:
        sessions = self._sessions.get(session.caller.username)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._sessions[session.caller.username]

    @property
    def subscribers(self) -> int:
        return sum(len(sessions) for sessions in self._sessions.values())

    def publish_new(
        self, notification: Mapping[str, Any], unread_count: Callable[[str], int]
    ) -> None:
        """``notification`` (a stored record, without ``read``) was just created."""
        owner = notification["username"]
        if owner is None:
            if not self._sessions:
                return  # nobody to tell: the push would be encoded for no one
            users = list(self._sessions.items())
        elif owner in self._sessions:
            users = [(owner, self._sessions[owner])]
        else:
            return
        line = jsonrpc.encode_line(
            jsonrpc.notification("notification", {**notification, "read": False})
        )
        for user, sessions in users:
            count = _count_line(unread_count(user))
            for session in sessions:
                session.push("notifications", line)
                session.push("notifications", count)

    def publish_count(self, username: str, count: int) -> None:
        """``username``'s inbox changed and now has ``count`` unread notifications."""
        sessions = self._sessions.get(username)
        if sessions:
            line = _count_line(count)
            for session in sessions:
                session.push("notifications", line)


def _count_line(count: int) -> bytes:
    return jsonrpc.encode_line(jsonrpc.notification("unread_count", {"count": count}))


@attrs.frozen
class Streams:
    """Everything a session can subscribe to."""

    status: StatusChannel
    tasks: TaskFeed = attrs.Factory(TaskFeed)
    notifications: NotificationFeed = attrs.Factory(NotificationFeed)
