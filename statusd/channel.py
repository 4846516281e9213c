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

The history is shared, so one user must not be able to wipe it: once it is full, a user
whose messages (their tasks' and what they publish) already hold ``user_share`` of it
pushes out their own oldest, not everyone's oldest; and a user holding more than their
share (a flood begun while the history had room) gives up theirs first when someone else's
message needs room. A flood from one user costs the others at most that share; a lone
user still has the whole history.
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
from statusd.state.ring import MAX_CAPACITY, RingStatistics
from statusd.state.status import MAX_MESSAGE_CHARS, Audience, Level, Reader, StatusMessage

log = logging.getLogger(__name__)

Watcher = Callable[[], None]
# None: a message for everyone; else the one user who reads it besides admins ("" for a
# message for one user that names none: admins alone, since no user name is empty).
Key = str | None


def user_share(capacity: int, percent: int = 25) -> int:
    """How many of a full history's ``capacity`` messages one user's may hold
    (``limits.status_user_share`` percent of it, at least one)."""
    return max(1, capacity * percent // 100)


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
    def __init__(
        self,
        capacity: int = 100,
        *,
        user_share_percent: int = 25,
        now: Callable[[], datetime] = _utc_now,
    ) -> None:
        if not 1 <= capacity <= MAX_CAPACITY:
            raise ValueError(f"capacity must be between 1 and {MAX_CAPACITY}, not {capacity}")
        self._capacity = capacity
        self._share = user_share(capacity, user_share_percent)
        self._size = 0
        self._last_seq = 0
        self._dropped_total = 0
        # Each key's messages held, oldest first: together, the history.
        self._held: dict[Key, deque[_Entry]] = {}
        self._dropped: dict[Key, _Dropped] = {}
        self._last: dict[Key, int] = {}
        # Admins' watchers wake for every message, a user's for theirs and everyone's.
        self._watchers: set[Watcher] = set()
        self._user_watchers: dict[str, set[Watcher]] = {}
        self._now = now
        self._published = 0
        self._refused = 0
        # ``lines_after``'s answers since the history last changed, per (seq, view):
        # the subscribers one publish wakes sit at the same seq and mostly share a view,
        # so the first one's answer serves the rest (a dict lookup instead of a merge).
        self._answers: dict[tuple[int, Key | bool], tuple[list[bytes], int]] = {}

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def set_user_share(self, percent: int) -> None:
        """Change ``limits.status_user_share`` (on reload); applies from the next message."""
        self._share = user_share(self._capacity, percent)

    def last_seq_for(self, reader: Reader | None) -> int:
        """The seq of the newest message ``reader`` may read (0 before any)."""
        if reader is None or reader.admin:
            return self._last_seq
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
                seq=self._last_seq + 1,
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
        self._answers.clear()
        if self._size >= self._capacity:
            own = self._held.get(entry.key)
            if entry.key and own is not None and len(own) >= self._share:
                self._drop_oldest_of(entry.key)
            else:
                self._drop_oldest_of(self._key_to_drop())
        self._held.setdefault(entry.key, deque()).append(entry)
        self._size += 1
        self._last_seq = entry.message.seq
        self._last[entry.key] = entry.message.seq

    def _key_to_drop(self) -> Key:
        """Whose oldest message makes room for one of a user within their share: the user
        holding the most past their share (a flood that began while the history had
        room), else whoever holds the oldest message. A scan of the keys (the users
        with messages held), not of the messages."""
        largest = max(
            (key for key in self._held if key), key=lambda key: len(self._held[key]), default=None
        )
        if largest is not None and len(self._held[largest]) > self._share:
            return largest
        return min(self._held, key=lambda key: self._held[key][0].message.seq)

    def _drop_oldest_of(self, key: Key) -> None:
        held = self._held[key]
        gone = held.popleft()
        if not held:
            del self._held[key]
        self._size -= 1
        self._dropped_total += 1
        dropped = self._dropped.get(key)
        if dropped is None:
            dropped = self._dropped[key] = _Dropped(deque(maxlen=self._capacity))
        dropped.add(gone.message.seq)

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
        if seq > self._last_seq:
            # A seq we never handed out: the client counted with an earlier daemon (seqs
            # start again at 1 after a restart). Everything we hold is new to it.
            seq = 0
        keys: list[Key]
        if reader is None or reader.admin:
            keys = list(self._held)
            dropped = list(self._dropped.values())
        else:
            keys = [None, reader.username]
            dropped = [self._dropped[key] for key in keys if key in self._dropped]
        tails = [tail for key in keys if (tail := _tail_after(self._held.get(key, deque()), seq))]
        if len(tails) > 1:
            entries = list(heapq.merge(*tails, key=_seq))
        else:
            entries = tails[0] if tails else []
        missed = sum(gone.after(seq) for gone in dropped)
        # Past what a key's record keeps, ``after`` is an upper bound: no more can be
        # missing than the seqs after ``seq`` not handed over.
        return entries, min(missed, self._last_seq - seq - len(entries))

    def recent(
        self, since: int = 0, reader: Reader | None = None
    ) -> tuple[list[StatusMessage], int]:
        """Messages with ``seq > since`` still held that ``reader`` (None: anyone) may read,
        oldest first, and how many of those it could have read are gone."""
        entries, missed = self._after(since, reader)
        return [entry.message for entry in entries], missed

    def lines_after(self, seq: int, reader: Reader | None = None) -> tuple[list[bytes], int]:
        """The encoded push lines after ``seq`` that ``reader`` may read, and how many of
        those it could have read were already dropped. Readers with the same view (every
        admin, or one user) at the same ``seq`` get the same list: read it, never change
        it."""
        view: Key | bool = True if reader is None or reader.admin else reader.username
        key = (seq, view)
        answer = self._answers.get(key)
        if answer is None:
            entries, missed = self._after(seq, reader)
            answer = self._answers[key] = ([entry.line for entry in entries], missed)
        return answer

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
        first = min((held[0].message.seq for held in self._held.values()), default=None)
        ring = RingStatistics(
            capacity=self._capacity,
            size=self._size,
            first_seq=self._last_seq + 1 if first is None else first,
            last_seq=self._last_seq,
            dropped=self._dropped_total,
        )
        return ChannelStatistics(
            ring=ring,
            watchers=len(self._watchers) + users,
            published=self._published,
            refused=self._refused,
        )
