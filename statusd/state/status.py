"""Status messages: the seed contract's message shape, levels, length rule and who may read
each one.

Pure. ``StatusMessage`` is what the ring holds and what subscribers receive.
"""

from __future__ import annotations

import enum
from datetime import datetime

import attrs

MAX_MESSAGE_CHARS = 200
_ELLIPSIS = "..."


class Level(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    SUCCESS = "success"


class Audience(enum.StrEnum):
    """Who reads a message besides admins: its ``user`` alone, or everyone."""

    USER = "user"
    ALL = "all"


@attrs.frozen
class Reader:
    """Who reads the status stream: a user, who may be an admin."""

    username: str
    admin: bool = False


@attrs.frozen
class StatusMessage:
    seq: int
    timestamp: datetime
    level: Level
    message: str
    operation_id: str | None = None
    # Who published it: a task's owner, a status.publish caller; None is the daemon itself.
    user: str | None = None
    audience: Audience = Audience.ALL

    def visible_to(self, username: str, admin: bool) -> bool:
        """Admins read everything; a message for all reaches everyone; any other only its
        ``user`` (a message for one user with no user reaches admins alone)."""
        if admin or self.audience is Audience.ALL:
            return True
        return self.user is not None and self.user == username

    def visible_to_reader(self, reader: Reader) -> bool:
        return self.visible_to(reader.username, reader.admin)


def truncate_message(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Cut ``text`` to ``limit`` characters: the first ``limit - 3`` and ``"..."``."""
    if len(text) <= limit:
        return text
    return text[: limit - len(_ELLIPSIS)] + _ELLIPSIS
