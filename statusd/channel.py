"""The status channel: the seed contract's ``publish_status`` over a drop-oldest ring.

``publish_status`` never awaits and never raises: it stamps the message, cuts it to 200
characters, appends it to the ring (which drops the oldest past its capacity) and wakes
whoever watches the channel. Each message is encoded once, as the ready-to-send push line,
so fan-out to many subscribers is a copy of bytes, not a JSON encode per subscriber.
Readers hold a sequence number and ask for what came after it; the ring tells them what
they missed. Nobody polls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

import attrs

from statusd.protocol import jsonrpc
from statusd.protocol.codec import unstructure
from statusd.state.ring import DropOldestRing, RingStatistics
from statusd.state.status import Level, StatusMessage, truncate_message

log = logging.getLogger(__name__)

Watcher = Callable[[], None]


@attrs.frozen
class ChannelStatistics:
    ring: RingStatistics
    watchers: int
    published: int
    refused: int  # publish_status calls that could not be turned into a message


@attrs.frozen
class _Entry:
    message: StatusMessage
    line: bytes  # {"jsonrpc":"2.0","method":"status","params":{...}}\n


def _utc_now() -> datetime:
    return datetime.now(UTC)


class StatusChannel:
    def __init__(self, capacity: int = 100, *, now: Callable[[], datetime] = _utc_now) -> None:
        self._ring: DropOldestRing[_Entry] = DropOldestRing(capacity)
        self._watchers: set[Watcher] = set()
        self._now = now
        self._published = 0
        self._refused = 0

    @property
    def last_seq(self) -> int:
        return self._ring.last_seq

    def publish_status(
        self, level: Level | str, message: str, operation_id: str | None = None
    ) -> StatusMessage | None:
        """Publish a status message; returns it, or None if it could not be made.

        Never blocks and never raises, so the core can call it anywhere (seed contract:
        "UI shouldn't block core operations").
        """
        try:
            status = StatusMessage(
                seq=self._ring.last_seq + 1,
                timestamp=self._now(),
                level=Level(level),
                message=truncate_message(str(message)),
                operation_id=operation_id,
            )
            line = jsonrpc.encode_line(jsonrpc.notification("status", unstructure(status)))
        except Exception:
            self._refused += 1
            log.warning("status message refused: level=%r message=%r", level, message)
            return None
        self._ring.append(_Entry(status, line))
        self._published += 1
        log.debug("status %s: %s", status.level.value, status.message)
        if self._watchers:
            # One-shot: a watcher is a session parked with nothing to send; one that is
            # busy sending re-checks before it parks, so it costs nothing per publish.
            watchers, self._watchers = self._watchers, set()
            for wake in watchers:
                wake()
        return status

    def _after(self, seq: int) -> tuple[list[_Entry], int]:
        if seq > self._ring.last_seq:
            # A seq we never handed out: the client counted with an earlier daemon (seqs
            # start again at 1 after a restart). Everything we hold is new to it.
            seq = 0
        return self._ring.after(seq)

    def recent(self, since: int = 0) -> tuple[list[StatusMessage], int]:
        """Messages with ``seq > since`` still held, oldest first, and how many are gone."""
        entries, missed = self._after(since)
        return [entry.message for entry in entries], missed

    def lines_after(self, seq: int) -> tuple[list[bytes], int]:
        """The encoded push lines after ``seq`` and how many were already dropped."""
        entries, missed = self._after(seq)
        return [entry.line for entry in entries], missed

    def watch(self, wake: Watcher) -> None:
        """Call ``wake()`` (synchronously, must not raise) after every publish."""
        self._watchers.add(wake)

    def unwatch(self, wake: Watcher) -> None:
        self._watchers.discard(wake)

    def statistics(self) -> ChannelStatistics:
        return ChannelStatistics(
            ring=self._ring.statistics(),
            watchers=len(self._watchers),
            published=self._published,
            refused=self._refused,
        )
