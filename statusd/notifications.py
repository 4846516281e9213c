"""The notification service: the seed's ``create_notification`` and friends over a journal.

Owns ``notifications.jsonl`` (a ``JsonLinesStore``) and the pure ``NotificationIndex``
(``statusd/state/notifications.py``, which holds the rules). Every change is appended and
fsynced first and applied to memory right after, with no checkpoint in between; the store
returns appends in journal order, so memory always equals what a replay of the journal
gives, and what a client was told is what a restart finds. A write that fails is never
acknowledged: the caller gets -32603, memory is unchanged, and the daemon goes on. Reads
(lists, counts) never touch the disk.

The journal is compacted in the background when dead records outweigh live ones (as the
task journal is); while a snapshot is written, new changes wait, so none can fall between
the snapshot and the rewrite.

Task ends become notifications through ``notify_task_finished``, the hook the task
manager calls *before* it journals the end: a crash in between re-runs the task (its
checkpoints make that quick) and the hook is called again, and the notification's key
(``task:<id>:<status>``) makes the second call a no-op. Calls for task ends are taken one
at a time, so the key check and the create are one step even when two ends of one task
arrive together. So a task-end notification is never lost, and never doubled for the same
outcome.

Depends on the store, the pure index and the event feed; knows nothing of sockets or
sessions.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import trio

from statusd.errors import InternalError, StartupError
from statusd.events import NotificationFeed
from statusd.protocol.codec import format_timestamp
from statusd.redact import redact_urls_in
from statusd.state.notifications import (
    DEFAULT_LIMIT,
    MAX_MESSAGE_CHARS,
    MAX_TITLE_CHARS,
    IndexStatistics,
    JournalError,
    NotificationIndex,
    NotificationRecord,
    Row,
    check_field,
    create_record,
    delete_read_record,
    delete_record,
    one_line,
    read_all_record,
    read_record,
)
from statusd.state.tasks import TaskInfo, TaskStatus
from statusd.store import Change, ChangeGate, JsonLinesStore, StoreError, open_store

log = logging.getLogger(__name__)

COMPACT_MIN_RECORDS = 1000
TASK_LINK_PREFIX = "statusd://tasks/"


def _now() -> datetime:
    return datetime.now(UTC)


@attrs.frozen
class NotificationStatistics:
    index: IndexStatistics
    journal_records: int
    compactions: int
    failed_writes: int


class NotificationService:
    """Notifications for every user, durable in a journal. Open with ``open_notifications``."""

    def __init__(
        self,
        feed: NotificationFeed,
        store: JsonLinesStore | None = None,
        *,
        index: NotificationIndex | None = None,
        journal_records: int = 0,
        compact_min_records: int = COMPACT_MIN_RECORDS,
        now: Callable[[], datetime] = _now,
    ) -> None:
        if compact_min_records < 1:
            raise ValueError(f"compact_min_records must be >= 1, not {compact_min_records}")
        self._feed = feed
        self._store = store
        self._index = NotificationIndex() if index is None else index
        self._now = now
        self._journal_records = journal_records
        self._compact_min_records = compact_min_records
        self._compact_at = compact_min_records
        # Task ends one at a time: see notify_task_finished.
        self._task_ends = trio.Lock()
        self._compact_wanted = trio.Event()
        self._gate = ChangeGate()
        self._compactions = 0
        self._failed_writes = 0

    # -- the seed's operations -------------------------------------------------------------

    async def create_notification(
        self,
        username: str | None,
        type: str,
        title: str,
        message: str,
        link: str | None = None,
        *,
        key: str | None = None,
    ) -> int:
        """Store a notification for ``username`` (None: everyone); returns its id.

        With ``key``, a second create with the same key (while the first exists) returns
        the first's id and stores nothing.
        """
        for field, value in (
            ("username", username),
            ("type", type),
            ("title", title),
            ("message", message),
            ("link", link),
        ):
            check_field(field, value)
        async with self._writing():
            if key is not None:
                existing = self._index.by_key(key)
                if existing is not None:
                    return existing
            record: NotificationRecord = {
                "id": self._index.new_id(),
                "username": username,
                "type": type,
                "title": title,
                "message": message,
                "link": link,
                "created_at": format_timestamp(self._now()),
            }
            row = create_record(record, key)

            def stored() -> None:
                self._index.add_row(row)
                # Here rather than after the append returns: a batch's creators resume in
                # any order, and subscribers see new notifications in journal order.
                self._feed.publish_new(record, self._index.unread_count)

            await self._append(row, stored)
        log.debug("notification %d created for %s", record["id"], username or "everyone")
        return record["id"]

    def get_user_notifications(
        self,
        username: str,
        unread_only: bool = False,
        limit: int = DEFAULT_LIMIT,
        before_id: int | None = None,
    ) -> list[dict[str, Any]]:
        """The user's inbox (own and system-wide), newest first, as wire dicts; with
        ``before_id``, the page after that id."""
        return self._index.newest_first(
            username, unread_only=unread_only, limit=limit, before_id=before_id
        )

    def get_unread_count(self, username: str) -> int:
        return self._index.unread_count(username)

    def can_see(self, username: str, notification_id: int) -> bool:
        return self._index.can_see(username, notification_id)

    async def mark_notification_as_read(self, notification_id: int, username: str) -> bool:
        """Mark one notification of the user's inbox read; False if it is not in it."""
        async with self._writing():
            if not self.can_see(username, notification_id):
                return False
            if self._index.is_read(username, notification_id):
                return True
            await self._append(read_record(username, notification_id))
            self._index.mark_read(username, notification_id)
        self._feed.publish_count(username, self._index.unread_count(username))
        return True

    async def mark_all_notifications_as_read(self, username: str) -> int:
        """Mark the whole inbox read; returns how many were unread."""
        async with self._writing():
            if not self._index.unread_count(username):
                return 0
            upto = self._index.newest
            await self._append(read_all_record(username, upto))
            count = self._index.mark_all_read(username, upto)
        self._feed.publish_count(username, self._index.unread_count(username))
        return count

    async def delete_notification(self, notification_id: int, username: str) -> bool:
        """Delete one notification of the user's inbox (a system-wide one only for that
        user); False if it is not in it."""
        async with self._writing():
            if not self.can_see(username, notification_id):
                return False
            await self._append(delete_record(username, notification_id))
            self._index.delete(username, notification_id)
        self._feed.publish_count(username, self._index.unread_count(username))
        return True

    async def delete_read_notifications(self, username: str) -> int:
        """Delete every read notification of the inbox; returns how many."""
        async with self._writing():
            if not self._index.read_count(username):
                return 0
            upto = self._index.newest
            await self._append(delete_read_record(username, upto))
            count = self._index.delete_read(username, upto)
        self._feed.publish_count(username, self._index.unread_count(username))
        return count

    # -- task ends -------------------------------------------------------------------------

    async def notify_task_finished(self, task: TaskInfo, status: TaskStatus) -> None:
        """The task manager's ``on_finished`` hook: tell the task's owner how it ended."""
        type_, title, message = task_end_text(task, status)
        # The key is checked before the create's write and recorded after it: two calls
        # for one end that overlapped there would both find no key and both create.
        async with self._task_ends:
            await self.create_notification(
                task.owner,
                type_,
                title,
                message,
                TASK_LINK_PREFIX + task.id,
                key=f"task:{task.id}:{status.value}",
            )

    # -- writing ---------------------------------------------------------------------------

    def _writing(self) -> Change:
        """Hold off compaction while a change is checked, journalled and applied."""
        return self._gate.change(self._changed)

    def _changed(self) -> None:
        if self._store is not None and self._journal_records >= max(
            self._compact_at, 2 * self._index.live_records
        ):
            self._compact_wanted.set()

    async def _append(
        self, record: dict[str, Any] | Row, then: Callable[[], None] | None = None
    ) -> None:
        """Journal ``record``; ``then``, the change it stands for, is applied to memory
        once the record is durable, in journal order (the store calls it), or right away
        with no journal."""
        if self._store is None:
            if then is not None:
                then()
            return
        try:
            # Once the record may be on disk, memory must follow it: the store's append is
            # not interrupted by cancellation once called, so no shield is needed here.
            await self._store.append(record, then)
        except StoreError as exc:
            self._failed_writes += 1
            log.error("notification change not stored: %s", exc)
            raise InternalError(
                f"could not store the change: {_reason(exc)}; nothing was changed"
            ) from exc
        self._journal_records += 1

    async def _compact(self) -> None:
        assert self._store is not None
        async with self._gate.compaction():
            live = self._index.live_records
            try:
                # Nothing changes the snapshot's records while the gate is closed, so they
                # can be encoded off the event loop.
                await self._store.compact(self._index.snapshot(), encode_in_thread=True)
            except (OSError, StoreError) as exc:
                # Keep the journal as it is and try again once it has grown some more.
                log.error("could not compact %s: %s", self._store.path, exc)
                self._compact_at = self._journal_records + max(self._compact_min_records, live)
            else:
                log.info(
                    "compacted %s: %d records -> %d",
                    self._store.path,
                    self._journal_records,
                    live,
                )
                self._journal_records = live
                self._compact_at = self._compact_min_records
                self._compactions += 1

    async def _compaction_loop(self) -> None:
        while True:
            await self._compact_wanted.wait()
            self._compact_wanted = trio.Event()
            await self._compact()

    def statistics(self) -> NotificationStatistics:
        return NotificationStatistics(
            self._index.statistics(),
            self._journal_records,
            self._compactions,
            self._failed_writes,
        )


def _reason(exc: StoreError) -> str:
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror[0].lower() + cause.strerror[1:]
    return "write failed"


def task_end_text(task: TaskInfo, status: TaskStatus) -> tuple[str, str, str]:
    """(type, title, message) of the notification for a task that ended with ``status``."""
    name = one_line(task.name)  # a title is one line; a task's name may be anything
    total = task.total_items
    if status is TaskStatus.COMPLETED:
        type_, title = "task_completed", f"Task completed: {name}"
        message = f"{task.processed_items} of {total} items done."
    elif status is TaskStatus.FAILED:
        type_, title = "task_failed", f"Task failed: {name}"
        failed = (task.result or {}).get("failed")
        if isinstance(failed, int) and not isinstance(failed, bool):
            message = f"{failed} of {total} items failed."
        else:
            message = f"Failed: {task.error or 'unknown error'}."
    else:
        type_, title = "task_cancelled", f"Task cancelled: {name}"
        message = f"Cancelled after {task.processed_items} of {total} items."
    # An admin may read any inbox: a failed URL's credentials and query stay in the task.
    title = redact_urls_in(title, limit=MAX_TITLE_CHARS)
    return type_, title, redact_urls_in(message, limit=MAX_MESSAGE_CHARS)


@asynccontextmanager
async def open_notifications(
    path: Path | None,
    feed: NotificationFeed,
    *,
    compact_min_records: int = COMPACT_MIN_RECORDS,
    now: Callable[[], datetime] = _now,
) -> AsyncIterator[NotificationService]:
    """Load the journal at ``path`` (None: keep nothing on disk) and run the service until
    the block ends; the journal is closed after everything inside has finished."""
    store: JsonLinesStore | None = None
    index = NotificationIndex()
    journal_records = 0
    if path is not None:
        store, report = await open_store(path)
    try:
        if store is not None:
            journal_records = len(report.records)
            try:
                await trio.to_thread.run_sync(index.replay, report.records)
            except JournalError as exc:
                raise StartupError(
                    f"{path}: {exc}. Move the file aside to start with no notifications."
                ) from None
            # The index holds what it needs; the records' wrappers are garbage now.
            del report
        service = NotificationService(
            feed,
            store,
            index=index,
            journal_records=journal_records,
            compact_min_records=compact_min_records,
            now=now,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service._compaction_loop)
            try:
                yield service
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if store is not None:
            with trio.CancelScope(shield=True):
                await store.aclose()
