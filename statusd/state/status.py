"""Status messages: the seed contract's message shape, levels and length rule.

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


@attrs.frozen
class StatusMessage:
    seq: int
    timestamp: datetime
    level: Level
    message: str
    operation_id: str | None = None


def truncate_message(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Cut ``text`` to ``limit`` characters: the first ``limit - 3`` and ``"..."``."""
    if len(text) <= limit:
        return text
    return text[: limit - len(_ELLIPSIS)] + _ELLIPSIS
