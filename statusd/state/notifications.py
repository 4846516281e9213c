"""Notifications: the stored record, the rules for its fields, the journal's record shapes,
and the in-memory index of who sees what.

Pure: no trio, no I/O, no clock. The service (``statusd/notifications.py``) journals a
change and then applies it here; replaying the journal through the same methods rebuilds
the same state, so each rule lives in one place (docs/notifications.md has the record
shapes).

Who sees what (the seed's rules, CONTRACT.md): a user's *inbox* is their own notifications
plus the system-wide ones (``username`` null). Read and deleted state is per user: deleting
one's own notification removes it; a system-wide one is only hidden for that user, and
reading it marks it read for that user alone.

Counts are kept, not computed. Per user: own live and own read notifications, and how many
system-wide ones that user has read or hidden, so ::

    unread = (own live - own read) + (system-wide total - system-wide read or hidden)

is O(1), and every change adjusts the counters by what it touched. Bulk operations use
watermarks (``read_upto``: every id up to it is read), so marking a million read stores
one number, not a million.

A stored notification is kept as the JSON array of its journal record, a ``Row``
``[id, username, type, title, message, link, created_at]`` (plus the task-end key, if it has
one), and never mutated. Loading a million notifications is mostly the JSON decoder making
objects and the kernel handing it fresh pages: an array costs a third of what a
``{"op": "create", "notification": {...}}`` record did (0.7 s against 2.3 s for a million
on the reference machine), so start-up stays within its 2 s budget. The wire form, a dict
with ``read``, is built only for the few notifications a list returns.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypedDict

import attrs

from statusd.errors import InvalidParams

# Field limits: the seed's column sizes where it has them (type 50, title 255, link 500).
MAX_TYPE_CHARS = 50
MAX_TITLE_CHARS = 255
MAX_MESSAGE_CHARS = 4000
MAX_LINK_CHARS = 500
MAX_USERNAME_CHARS = 256
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000

_TYPE_CHARS = re.compile(r"[A-Za-z0-9_.-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f-\x9f]")
# A deleted id stays in its owner's list until the dead outnumber the live (and this many).
_PRUNE_AFTER = 32


class NotificationRecord(TypedDict):
    """A stored notification: the wire ``Notification`` without ``read`` (which is per user)."""

    id: int
    username: str | None
    type: str
    title: str
    message: str
    link: str | None
    created_at: str  # RFC 3339 UTC, as on the wire


# A stored notification: ``[id, username, type, title, message, link, created_at]`` and,
# for one created with a key, the key as an eighth element. It is also its create record.
Row = list[Any]
_ID, _USERNAME = 0, 1
_FIELDS = ("id", "username", "type", "title", "message", "link", "created_at")


def to_row(notification: NotificationRecord, key: str | None = None) -> Row:
    row: Row = [notification[field] for field in _FIELDS]  # type: ignore[literal-required]
    if key is not None:
        row.append(key)
    return row


def to_record(row: Row) -> NotificationRecord:
    id_, username, type_, title, message, link, created_at = row[:7]
    return {
        "id": id_,
        "username": username,
        "type": type_,
        "title": title,
        "message": message,
        "link": link,
        "created_at": created_at,
    }


class JournalError(ValueError):
    """A journal record this index cannot apply (unknown op, missing field)."""


# -- field rules ---------------------------------------------------------------------------


def check_field(field: str, value: str | None) -> None:
    """Raise ``InvalidParams`` naming ``field`` if ``value`` breaks its rule.

    ``type``: 1-50 letters, digits, ``_``, ``-``, ``.``; ``title``: 1-255 characters on one
    line; ``message``: up to 4000 characters (newlines allowed); ``link``: 1-500 characters
    without spaces or control characters; ``username``: 1-256 characters, no control
    characters. ``None`` (an absent optional field) is always fine.
    """
    if value is None:
        return
    limit, may_be_empty, forbidden, forbidden_text = _RULES[field]
    if not value and not may_be_empty:
        raise InvalidParams(field, "must not be empty")
    if len(value) > limit:
        raise InvalidParams(field, f"must be at most {limit} characters, not {len(value)}")
    if field == "type" and not _TYPE_CHARS.fullmatch(value):
        raise InvalidParams(field, "may contain only letters, digits, '_', '-' and '.'")
    if forbidden is not None and forbidden.search(value):
        raise InvalidParams(field, forbidden_text)


_RULES: dict[str, tuple[int, bool, re.Pattern[str] | None, str]] = {
    "type": (MAX_TYPE_CHARS, False, None, ""),
    "title": (MAX_TITLE_CHARS, False, _CONTROL, "must be one line without control characters"),
    "message": (MAX_MESSAGE_CHARS, True, None, ""),
    "link": (
        MAX_LINK_CHARS,
        False,
        _CONTROL_OR_SPACE,
        "must not contain spaces or control characters",
    ),
    "username": (MAX_USERNAME_CHARS, False, _CONTROL, "must not contain control characters"),
}


def check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidParams("limit", f"must be between 1 and {MAX_LIMIT}, not {limit}")


def one_line(text: str) -> str:
    """``text`` with each control character (newlines too) replaced by a space."""
    return _CONTROL.sub(" ", text)


def cut(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters with ``...`` (for text the daemon writes itself)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- journal records -----------------------------------------------------------------------


def create_record(notification: NotificationRecord, key: str | None = None) -> Row:
    """A create is the only record that is an array (every other one is an object)."""
    return to_row(notification, key)


def read_record(user: str, notification_id: int) -> dict[str, Any]:
    return {"op": "read", "user": user, "id": notification_id}


def delete_record(user: str, notification_id: int) -> dict[str, Any]:
    return {"op": "delete", "user": user, "id": notification_id}


def read_all_record(user: str, upto: int) -> dict[str, Any]:
    return {"op": "read_all", "user": user, "upto": upto}


def delete_read_record(user: str, upto: int) -> dict[str, Any]:
    return {"op": "delete_read", "user": user, "upto": upto}


# -- the index -----------------------------------------------------------------------------


@attrs.define
class _Inbox:
    """One user's view of their inbox: where their own notifications are, what they have
    read or hidden, and the counters derived from that."""

    own: list[int] = attrs.Factory(list)  # ascending; may hold deleted ids (own_dead of them)
    own_dead: int = 0
    own_live: int = 0
    own_read: int = 0
    read_upto: int = 0  # every id up to this one is read
    read: set[int] = attrs.Factory(set)  # ids above read_upto read one by one
    hidden_upto: int = 0  # every system-wide id up to this one is hidden (<= read_upto)
    hidden: set[int] = attrs.Factory(set)  # system-wide ids above hidden_upto hidden one by one
    system_gone: int = 0  # system-wide ids read or hidden
    system_hidden: int = 0  # system-wide ids hidden

    def is_read(self, notification_id: int) -> bool:
        return notification_id <= self.read_upto or notification_id in self.read

    def is_hidden(self, notification_id: int) -> bool:
        return notification_id <= self.hidden_upto or notification_id in self.hidden

    @property
    def default(self) -> bool:
        return not (self.read_upto or self.read or self.hidden_upto or self.hidden)


@attrs.frozen
class IndexStatistics:
    notifications: int
    system_wide: int
    users: int
    last_id: int


class NotificationIndex:
    """Every stored notification and every user's read/deleted state, with live counters.

    Operations take the acting user and return what changed, so the service can skip
    writing a change that would change nothing.
    """

    def __init__(self) -> None:
        self._items: dict[int, Row] = {}
        self._system: list[int] = []  # ascending; a system-wide notification is never removed
        self._inboxes: dict[str, _Inbox] = {}
        self._keys: dict[str, int] = {}
        self._key_of: dict[int, str] = {}
        self._newest = 0  # highest id added
        self._last_id = 0  # highest id ever handed out or seen in the journal
        self._in_order = True  # _items iterates in id order

    # -- ids and lookups -------------------------------------------------------------------

    def new_id(self) -> int:
        """The next id: above every id ever used, so ids are never reused."""
        self._last_id += 1
        return self._last_id

    @property
    def newest(self) -> int:
        return self._newest

    def __len__(self) -> int:
        return len(self._items)

    def by_key(self, key: str) -> int | None:
        return self._keys.get(key)

    def visible(self, username: str, notification_id: int) -> NotificationRecord | None:
        """The notification if it is in ``username``'s inbox, else None."""
        row = self._visible_row(username, notification_id)
        return None if row is None else to_record(row)

    def can_see(self, username: str, notification_id: int) -> bool:
        return self._visible_row(username, notification_id) is not None

    def _visible_row(self, username: str, notification_id: int) -> Row | None:
        record = self._items.get(notification_id)
        if record is None:
            return None
        owner = record[_USERNAME]
        if owner is None:
            inbox = self._inboxes.get(username)
            if inbox is not None and inbox.is_hidden(notification_id):
                return None
            return record
        return record if owner == username else None

    def is_read(self, username: str, notification_id: int) -> bool:
        inbox = self._inboxes.get(username)
        return inbox is not None and inbox.is_read(notification_id)

    def unread_count(self, username: str) -> int:
        inbox = self._inboxes.get(username)
        if inbox is None:
            return len(self._system)
        return inbox.own_live - inbox.own_read + len(self._system) - inbox.system_gone

    def read_count(self, username: str) -> int:
        """How many notifications in the inbox are read (what ``delete_read`` would remove)."""
        inbox = self._inboxes.get(username)
        if inbox is None:
            return 0
        return inbox.own_read + inbox.system_gone - inbox.system_hidden

    def newest_first(
        self,
        username: str,
        *,
        unread_only: bool = False,
        limit: int = DEFAULT_LIMIT,
        before_id: int | None = None,
    ) -> list[dict[str, Any]]:
        """The inbox newest first, as wire ``Notification`` dicts (with ``read``); with
        ``before_id``, only those older than it (the next page after that id).

        Walks the user's own ids and the system-wide ids from the newest down, merging; it
        stops at ``limit``, and for ``unread_only`` at the read watermark, below which
        everything is read.
        """
        inbox = self._inboxes.get(username)
        own = inbox.own if inbox is not None else []
        system = self._system
        items = self._items
        out: list[dict[str, Any]] = []
        i, j = len(own) - 1, len(system) - 1
        if before_id is not None:
            i, j = bisect_left(own, before_id) - 1, bisect_left(system, before_id) - 1
        while len(out) < limit and (i >= 0 or j >= 0):
            if j < 0 or (i >= 0 and own[i] > system[j]):
                notification_id = own[i]
                i -= 1
                record = items.get(notification_id)
                if record is None:
                    continue  # deleted, not yet pruned
            else:
                notification_id = system[j]
                j -= 1
                if inbox is not None and inbox.is_hidden(notification_id):
                    if notification_id <= inbox.hidden_upto:
                        j = -1  # every older system-wide one is hidden too
                    continue
                record = items[notification_id]
            read = inbox is not None and inbox.is_read(notification_id)
            if read and unread_only:
                if inbox is not None and notification_id <= inbox.read_upto:
                    break  # this is the newest left, and everything up to here is read
                continue
            view: dict[str, Any] = {**to_record(record), "read": read}
            out.append(view)
        return out

    # -- changes ---------------------------------------------------------------------------

    def add(self, record: NotificationRecord, key: str | None = None) -> Row:
        """Add a new notification; returns its row (what the journal stores)."""
        row = to_row(record, key)
        self.add_row(row)
        return row

    def add_row(self, record: Row) -> None:
        """Add a notification from its row (its journal record: see ``create_record``)."""
        if len(record) not in (7, 8) or type(record[_ID]) is not int:
            raise JournalError(f"malformed create record {record!r:.80}")
        notification_id = record[_ID]
        key = record[7] if len(record) == 8 else None
        if notification_id in self._items:
            raise JournalError(f"notification {notification_id} already exists")
        items = self._items
        items[notification_id] = record
        if key is not None:
            self._keys[key] = notification_id
            self._key_of[notification_id] = key
        late = notification_id < self._newest
        owner = record[_USERNAME]
        if owner is None:
            if late:
                insort(self._system, notification_id)
                # Born under some users' read watermark: read for them already.
                for other in self._inboxes.values():
                    if notification_id <= other.read_upto:
                        other.system_gone += 1
            else:
                self._system.append(notification_id)
        else:
            inbox = self._inboxes.get(owner)
            if inbox is None:
                inbox = self._inboxes[owner] = _Inbox()
            if late:
                insort(inbox.own, notification_id)
            else:
                inbox.own.append(notification_id)
            inbox.own_live += 1
            if notification_id <= inbox.read_upto:  # a late one, born under the watermark
                inbox.own_read += 1
        if late:
            self._in_order = False
        else:
            self._newest = notification_id
        if notification_id > self._last_id:
            self._last_id = notification_id

    def mark_read(self, username: str, notification_id: int) -> bool:
        """Mark one notification of the inbox read; False if unseen or already read."""
        record = self._visible_row(username, notification_id)
        if record is None:
            return False
        inbox = self._inbox(username)
        if inbox.is_read(notification_id):
            return False
        inbox.read.add(notification_id)
        if record[_USERNAME] is None:
            inbox.system_gone += 1
        else:
            inbox.own_read += 1
        return True

    def mark_all_read(self, username: str, upto: int) -> int:
        """Mark everything in the inbox up to id ``upto`` read; returns how many were unread."""
        upto = min(upto, self._newest)
        inbox = self._inbox(username)
        old = inbox.read_upto
        if upto <= old:
            return 0
        own = inbox.own
        own_newly = sum(
            1
            for notification_id in own[bisect_right(own, old) : bisect_right(own, upto)]
            if notification_id in self._items and notification_id not in inbox.read
        )
        system = self._system
        in_range = bisect_right(system, upto) - bisect_right(system, old)
        already = sum(
            1
            for notification_id in inbox.read | inbox.hidden
            if old < notification_id <= upto and self._is_system(notification_id)
        )
        system_newly = in_range - already
        inbox.own_read += own_newly
        inbox.system_gone += system_newly
        inbox.read_upto = upto
        inbox.read = {notification_id for notification_id in inbox.read if notification_id > upto}
        return own_newly + system_newly

    def delete(self, username: str, notification_id: int) -> bool:
        """Delete (own) or hide (system-wide) one notification; False if not in the inbox."""
        record = self._visible_row(username, notification_id)
        if record is None:
            return False
        inbox = self._inbox(username)
        if record[_USERNAME] is None:
            if not inbox.is_read(notification_id):
                inbox.system_gone += 1
            inbox.read.discard(notification_id)
            inbox.hidden.add(notification_id)
            inbox.system_hidden += 1
        else:
            self._remove_own(inbox, notification_id)
            if inbox.own_dead > max(_PRUNE_AFTER, inbox.own_live):
                inbox.own = [n for n in inbox.own if n in self._items]
                inbox.own_dead = 0
        return True

    def delete_read(self, username: str, upto: int) -> int:
        """Delete (own) or hide (system-wide) every read notification up to id ``upto``;
        returns how many."""
        upto = min(upto, self._newest)
        inbox = self._inboxes.get(username)
        if inbox is None:
            return 0
        count = 0
        if inbox.own_read:
            keep: list[int] = []
            for notification_id in inbox.own:
                if notification_id not in self._items:
                    continue
                if notification_id <= upto and inbox.is_read(notification_id):
                    self._remove_own(inbox, notification_id)
                    count += 1
                else:
                    keep.append(notification_id)
            inbox.own = keep
            inbox.own_dead = 0
        # System-wide ones up to the read watermark are all read: move the hidden watermark.
        limit = min(inbox.read_upto, upto)
        if limit > inbox.hidden_upto:
            system = self._system
            in_range = bisect_right(system, limit) - bisect_right(system, inbox.hidden_upto)
            already = sum(1 for n in inbox.hidden if inbox.hidden_upto < n <= limit)
            count += in_range - already
            inbox.system_hidden += in_range - already
            inbox.hidden_upto = limit
            inbox.hidden = {n for n in inbox.hidden if n > limit}
        for notification_id in [
            n for n in inbox.read if n <= upto and self._is_system(n) and n not in inbox.hidden
        ]:
            inbox.read.discard(notification_id)
            inbox.hidden.add(notification_id)
            inbox.system_hidden += 1
            count += 1
        return count

    def _remove_own(self, inbox: _Inbox, notification_id: int) -> None:
        if inbox.is_read(notification_id):
            inbox.own_read -= 1
        inbox.read.discard(notification_id)
        inbox.own_live -= 1
        inbox.own_dead += 1
        del self._items[notification_id]
        key = self._key_of.pop(notification_id, None)
        if key is not None:
            del self._keys[key]

    def _inbox(self, username: str) -> _Inbox:
        inbox = self._inboxes.get(username)
        if inbox is None:
            inbox = self._inboxes[username] = _Inbox()
        return inbox

    def _is_system(self, notification_id: int) -> bool:
        record = self._items.get(notification_id)
        return record is not None and record[_USERNAME] is None

    # -- the journal -----------------------------------------------------------------------

    def apply(self, record: Mapping[str, Any] | Row) -> None:
        """Apply one journal record (see the ``*_record`` functions and ``snapshot``)."""
        if type(record) is list:
            self.add_row(record)
            return
        if not isinstance(record, Mapping):
            raise JournalError(f"a journal record is an array or an object, not {record!r:.80}")
        try:
            op = record["op"]
            if op == "read":
                self.mark_read(record["user"], record["id"])
            elif op == "delete":
                self.delete(record["user"], record["id"])
            elif op == "read_all":
                self.mark_all_read(record["user"], record["upto"])
            elif op == "delete_read":
                self.delete_read(record["user"], record["upto"])
            elif op == "inbox":
                self._restore_inbox(record)
            elif op == "ids":
                self._last_id = max(self._last_id, record["last"])
            else:
                raise JournalError(f"unknown op {op!r}")
        except (KeyError, TypeError) as exc:
            raise JournalError(f"malformed {record.get('op')!r} record: {exc!r}") from None

    def replay(self, records: Iterable[Mapping[str, Any] | Row]) -> None:
        """Apply a whole journal; raises ``JournalError`` naming the record number."""
        add, apply = self.add_row, self.apply
        items, inboxes, system = self._items, self._inboxes, self._system
        for number, record in enumerate(records, 1):
            try:
                if type(record) is not list:
                    apply(record)
                    continue
                # Creates are nearly all of a journal, and nearly all come in id order
                # without a key: for those, ``add_row`` inlined, without what cannot
                # apply to an id above every id added (it is new, not late, not read:
                # a read watermark never passes the newest id).
                notification_id = record[0] if len(record) == 7 else None
                if type(notification_id) is not int or notification_id <= self._newest:
                    add(record)
                    continue
                items[notification_id] = record
                owner = record[_USERNAME]
                if owner is None:
                    system.append(notification_id)
                else:
                    inbox = inboxes.get(owner)
                    if inbox is None:
                        inbox = inboxes[owner] = _Inbox()
                    inbox.own.append(notification_id)
                    inbox.own_live += 1
                self._newest = notification_id
                if notification_id > self._last_id:
                    self._last_id = notification_id
            except JournalError as exc:
                raise JournalError(f"record {number}: {exc}") from None

    def _restore_inbox(self, record: Mapping[str, Any]) -> None:
        inbox = self._inbox(record["user"])
        inbox.read_upto = record["read_upto"]
        inbox.read = set(record["read"])
        inbox.hidden_upto = record["hidden_upto"]
        inbox.hidden = set(record["hidden"])
        # Recount from scratch: a bisection for the watermark (``own`` is ascending), then
        # the ones read individually above it.
        items, own = self._items, inbox.own
        upto = bisect_right(own, inbox.read_upto)
        below = sum(1 for n in own[:upto] if n in items) if inbox.own_dead else upto
        above = sum(
            1
            for n in inbox.read
            if n > inbox.read_upto and n in items and items[n][_USERNAME] == record["user"]
        )
        inbox.own_read = below + above
        system = self._system
        above_read = {n for n in inbox.read | inbox.hidden if n > inbox.read_upto}
        inbox.system_gone = bisect_right(system, inbox.read_upto) + sum(
            1 for n in above_read if self._is_system(n)
        )
        inbox.system_hidden = bisect_right(system, inbox.hidden_upto) + sum(
            1 for n in inbox.hidden if n > inbox.hidden_upto and self._is_system(n)
        )

    def snapshot(self) -> Iterator[dict[str, Any] | Row]:
        """The fewest records that replay to this state (what compaction writes).

        A generator: the store encodes it as it goes, so a million records are never all
        held twice. Nothing may change the index while it is being consumed.
        """
        yield {"op": "ids", "last": self._last_id}
        ids = self._items if self._in_order else sorted(self._items)
        items = self._items
        for notification_id in ids:
            yield items[notification_id]
        for user, inbox in self._inboxes.items():
            if not inbox.default:
                yield {
                    "op": "inbox",
                    "user": user,
                    "read_upto": inbox.read_upto,
                    "read": sorted(inbox.read),
                    "hidden_upto": inbox.hidden_upto,
                    "hidden": sorted(inbox.hidden),
                }

    @property
    def live_records(self) -> int:
        """How many records ``snapshot`` would write (without building it)."""
        return 1 + len(self._items) + len(self._inboxes)

    def statistics(self) -> IndexStatistics:
        return IndexStatistics(
            len(self._items), len(self._system), len(self._inboxes), self._last_id
        )
