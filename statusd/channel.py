"""The status channel: the seed contract's ``publish_status`` over a drop-oldest ring.

``publish_status`` never awaits and never raises: it stamps the message, redacts the URLs
in it and cuts it to 200 characters, appends it to the ring (which drops the oldest past
its capacity) and wakes whoever watches the channel and may read it. Each message is
encoded once, as the ready-to-send push line, so fan-out to many subscribers is a copy of
bytes, not a JSON encode per subscriber. Readers hold a sequence number and ask for what
came after it; the ring tells them what they missed. Nobody polls.

Who reads what (``StatusMessage.visible_to``): admins everything, everyone the messages for
all, a user also their own. ``seq`` is global, so a user's messages have gaps between them;
``dropped`` counts only the messages the reader could have read. Both come from a small
index beside the ring, the messages held and dropped per key (everyone's, or one user's),
so a reader costs what it reads, not a scan of the ring.
"""

from __future__ import annotations

import bisect
import heapq
import logging
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from itertools import islice

import attrs

from statusd.protocol import jsonrpc
from statusd.protocol.codec import unstructure
from statusd.redact import redact_urls_in
from statusd.state.ring import DropOldestRing, RingStatistics
from statusd.state.status import MAX_MESSAGE_CHARS, Audience, Level, Reader, StatusMessage

log = logging.getLogger(__name__)

Watcher = Callable[[], None]
# None: a message for everyone; else the one user who reads it besides admins ("" for a
# message for one user that names none: admins alone, since no user name is empty).
Key = str | None


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
    key: Key


def _seq(entry: _Entry) -> int:
    return entry.message.seq


def _key(message: StatusMessage) -> Key:
    if message.audience is Audience.ALL:
        return None
    return message.user or ""


@attrs.define
class _Dropped:
    """The seqs of one key's messages that fell off the ring: the newest ``maxlen`` of
    them, and how many fell before those."""

    seqs: deque[int]
    older: int = 0

    def add(self, seq: int) -> None:
        if len(self.seqs) == self.seqs.maxlen:
            self.older += 1
        self.seqs.append(seq)

    def after(self, seq: int) -> int:
        index = bisect.bisect_right(self.seqs, seq)
        count = len(self.seqs) - index
        if index == 0:
            # Older than every seq kept: those before them count too, an upper bound
            # (the caller caps it by the gap in seqs).
            count += self.older
        return count


def _tail_after(entries: deque[_Entry], seq: int) -> list[_Entry]:
    if not entries or entries[-1].message.seq <= seq:
        return []
    start = bisect.bisect_right(entries, seq, key=_seq)
    count = len(entries) - start
    if count <= start:
        # islice walks from the left: near the head, take the newest from the right.
        tail = list(islice(reversed(entries), count))
        tail.reverse()
        return tail
    return list(islice(entries, start, None))


def _utc_now() -> datetime:
    return datetime.now(UTC)


class StatusChannel:
    def __init__(self, capacity: int = 100, *, now: Callable[[], datetime] = _utc_now) -> None:
        self._ring: DropOldestRing[_Entry] = DropOldestRing(capacity)
        self._held: dict[Key, deque[_Entry]] = {}
        self._dropped: dict[Key, _Dropped] = {}
        self._last: dict[Key, int] = {}
        # Admins' watchers wake for every message, a user's for theirs and everyone's.
        self._watchers: set[Watcher] = set()
        self._user_watchers: dict[str, set[Watcher]] = {}
        self._now = now
        self._published = 0
        self._refused = 0

    @property
    def last_seq(self) -> int:
        return self._ring.last_seq

    def last_seq_for(self, reader: Reader | None) -> int:
        """The seq of the newest message ``reader`` may read (0 before any)."""
        if reader is None or reader.admin:
            return self._ring.last_seq
        return max(self._last.get(None, 0), self._last.get(reader.username, 0))

    def publish_status(
        self,
        level: Level | str,
        message: str,
        operation_id: str | None = None,
        *,
        user: str | None = None,
        audience: Audience | str | None = None,
    ) -> StatusMessage | None:
        """Publish a status message; returns it, or None if it could not be made.

        ``user`` is who publishes it (None: the daemon); ``audience`` who reads it besides
        admins: ``"user"`` that user alone, ``"all"`` everyone (the default when ``user``
        is None, and only then). Never blocks and never raises, so the core can call it
        anywhere (seed contract: "UI shouldn't block core operations").
        """
        try:
            if audience is None:
                audience = Audience.ALL if user is None else Audience.USER
            status = StatusMessage(
                seq=self._ring.last_seq + 1,
                timestamp=self._now(),
                level=Level(level),
                message=redact_urls_in(str(message), limit=MAX_MESSAGE_CHARS),
                operation_id=operation_id,
                user=user,
                audience=Audience(audience),
            )
            line = jsonrpc.encode_line(jsonrpc.notification("status", unstructure(status)))
        except Exception:
            self._refused += 1
            log.warning("status message refused: level=%r message=%r", level, message)
            return None
        self._append(_Entry(status, line, _key(status)))
        self._published += 1
        log.debug("status %s: %s", status.level.value, status.message)
        self._wake(_key(status))
        return status

    def _append(self, entry: _Entry) -> None:
        gone = self._ring.next_dropped()
        if gone is not None:
            held = self._held[gone.key]
            held.popleft()  # a key's oldest held message is the ring's oldest of that key
            if not held:
                del self._held[gone.key]
            dropped = self._dropped.get(gone.key)
            if dropped is None:
                dropped = self._dropped[gone.key] = _Dropped(deque(maxlen=self._ring.capacity))
            dropped.add(gone.message.seq)
        self._ring.append(entry)
        self._held.setdefault(entry.key, deque()).append(entry)
        self._last[entry.key] = entry.message.seq

    def _wake(self, key: Key) -> None:
        # One-shot: a watcher is a session parked with nothing to send; one that is
        # busy sending re-checks before it parks, so it costs nothing per publish.
        woken: list[set[Watcher]] = []
        if self._watchers:
            woken.append(self._watchers)
            self._watchers = set()
        if key is None:
            woken.extend(self._user_watchers.values())
            self._user_watchers = {}
        elif key in self._user_watchers:
            woken.append(self._user_watchers.pop(key))
        for watchers in woken:
            for wake in watchers:
                wake()

    def _after(self, seq: int, reader: Reader | None) -> tuple[list[_Entry], int]:
        if seq > self._ring.last_seq:
            # A seq we never handed out: the client counted with an earlier daemon (seqs
            # start again at 1 after a restart). Everything we hold is new to it.
            seq = 0
        if reader is None or reader.admin:
            return self._ring.after(seq)
        keys: tuple[Key, Key] = (None, reader.username)
        everyones, mine = (_tail_after(self._held.get(key, deque()), seq) for key in keys)
        if everyones and mine:
            entries = list(heapq.merge(everyones, mine, key=_seq))
        else:
            entries = everyones or mine
        missed = sum(self._dropped[key].after(seq) for key in keys if key in self._dropped)
        gap = max(0, self._ring.first_seq - seq - 1)
        return entries, min(missed, gap)

    def recent(
        self, since: int = 0, reader: Reader | None = None
    ) -> tuple[list[StatusMessage], int]:
        """Messages with ``seq > since`` still held that ``reader`` (None: anyone) may read,
        oldest first, and how many of those it could have read are gone."""
        entries, missed = self._after(since, reader)
        return [entry.message for entry in entries], missed

    def lines_after(self, seq: int, reader: Reader | None = None) -> tuple[list[bytes], int]:
        """The encoded push lines after ``seq`` that ``reader`` may read, and how many of
        those it could have read were already dropped."""
        entries, missed = self._after(seq, reader)
        return [entry.line for entry in entries], missed

    def watch(self, wake: Watcher, reader: Reader | None = None) -> None:
        """Call ``wake()`` (synchronously, must not raise) after the next publish that
        ``reader`` (None: anyone) may read."""
        if reader is None or reader.admin:
            self._watchers.add(wake)
        else:
            self._user_watchers.setdefault(reader.username, set()).add(wake)

    def unwatch(self, wake: Watcher, reader: Reader | None = None) -> None:
        if reader is None or reader.admin:
            self._watchers.discard(wake)
            return
        watchers = self._user_watchers.get(reader.username)
        if watchers is not None:
            watchers.discard(wake)
            if not watchers:
                del self._user_watchers[reader.username]

    def statistics(self) -> ChannelStatistics:
        users = sum(len(watchers) for watchers in self._user_watchers.values())
        return ChannelStatistics(
            ring=self._ring.statistics(),
            watchers=len(self._watchers) + users,
            published=self._published,
            refused=self._refused,
        )
