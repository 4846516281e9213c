"""The pushed streams a session can subscribe to, besides status: task updates (and, with
their issue, notifications).

Each event is encoded once and the same bytes are queued on every session that wants it
and may see it; a session's own bounded queue drops the oldest if its client falls behind.
"""

from __future__ import annotations

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


@attrs.frozen
class Streams:
    """Everything a session can subscribe to."""

    status: StatusChannel
    tasks: TaskFeed = attrs.Factory(TaskFeed)
