"""The task manager: the seed's background task manager as a trio nursery with a journal.

Operations keep the seed's names: ``create_task``, ``run_task``, ``get_task``,
``list_tasks``, ``cancel_task``, ``cleanup_old_tasks``, ``get_task_summary``. What the seed
lacked:

- at most ``max_running`` tasks run at once; the rest wait in the order they came;
- each task runs in its own cancel scope, so ``cancel_task`` takes effect at once; a
  task's ``discard()`` then removes what it left half-done (a download's ``.part`` files);
- every task and state change is journalled to ``tasks.jsonl`` before it is reported, and
  on start the journal is replayed: finished tasks are listed again, pending and running
  ones are queued again with their saved progress (``checkpoint`` records), so a restart,
  even after ``kill -9``, repeats no finished work.

A task body is a ``Job``: ``run(reporter)`` does the work and reports through the
``Reporter`` it is given; it knows nothing of the manager.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio

from statusd.channel import StatusChannel
from statusd.events import TaskFeed
from statusd.protocol.codec import converter, format_timestamp, unstructure
from statusd.state.status import Level
from statusd.state.tasks import TaskInfo, TaskStatus, job_update
from statusd.store import ChangeGate, JsonLinesStore, StoreError, open_store

log = logging.getLogger(__name__)

DEFAULT_MAX_RUNNING = 3
CLEANUP_INTERVAL = 3600.0
PROGRESS_INTERVAL = 0.25  # at most 4 progress pushes a second per task
COMPACT_MIN_RECORDS = 1000


class JobFailed(Exception):
    """Raised by a job whose work ended in failure; ``result`` is kept on the task."""

    def __init__(self, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.result = result


class Job(Protocol):
    """A task's body."""

    async def run(self, reporter: Reporter) -> dict[str, Any] | None: ...

    async def discard(self) -> None:
        """Remove what an unfinished run left behind (called after a user's cancel)."""


JobFactory = Callable[[TaskInfo, dict[str, Any]], Job]
# Called once a task's outcome is known, before it is journalled (see ``_finish``).
OnFinished = Callable[[TaskInfo, TaskStatus], Awaitable[None]]


def _now() -> datetime:
    return datetime.now(UTC)


class Reporter:
    """What a running job sees of its task: progress, status messages, checkpoints."""

    def __init__(self, manager: TaskManager, task: TaskInfo) -> None:
        self._manager = manager
        self._task = task
        self._last_push = -math.inf
        self._trailing_push = False

    @property
    def task_id(self) -> str:
        return self._task.id

    def update_progress(self, processed: int, current: str | None = None) -> None:
        """The seed's progress callback."""
        self._task.update_progress(processed, current)
        self._maybe_push()

    def add_bytes(self, delta: int, total: int | None = None) -> None:
        self._task.bytes_done += delta
        if total is not None:
            self._task.bytes_total = total
        self._maybe_push()

    def set_bytes_done(self, done: int) -> None:
        self._task.bytes_done = done

    def set_bytes_total(self, total: int | None) -> None:
        self._task.bytes_total = total

    def _maybe_push(self) -> None:
        # Progress is throttled per task; state changes and batches are always pushed.
        # What a throttled call reported goes out at the end of the interval, so a
        # transfer that stalls is not shown where it was a moment before.
        now = trio.current_time()
        if now - self._last_push >= PROGRESS_INTERVAL:
            self._push_progress(now)
        elif not self._trailing_push:
            self._trailing_push = True
            self._manager.start_soon(self._push_later, self._last_push + PROGRESS_INTERVAL)

    def _push_progress(self, now: float) -> None:
        self._last_push = now
        self._manager.push(self._task, "progress", self.progress_message())

    async def _push_later(self, deadline: float) -> None:
        await trio.sleep_until(deadline)
        self._trailing_push = False
        now = trio.current_time()
        if self._task.status is TaskStatus.RUNNING and now - self._last_push >= PROGRESS_INTERVAL:
            self._push_progress(now)

    def progress_message(self) -> str:
        task = self._task
        return f"Processed {task.processed_items} of {task.total_items}"

    def batch_update(self, batch: int, batches: int, **extra: Any) -> None:
        """Push the seed's ``batch_update`` when a batch is done (the job itself says
        "Processing batch i of n" when one starts)."""
        self._manager.push(
            self._task,
            "batch_update",
            f"Completed batch {batch}/{batches}",
            batch_completed=batch,
            total_batches=batches,
            **extra,
        )

    def status(self, level: Level | str, message: str) -> None:
        self._manager.publish_status(level, message, self._task)

    async def checkpoint(self, data: dict[str, Any]) -> None:
        """Journal job-specific progress (what a restart must not redo)."""
        await self._manager.journal_checkpoint(self._task, data)


@attrs.define
class _Entry:
    task: TaskInfo
    job: Job | None = None
    scope: trio.CancelScope | None = None
    spec: dict[str, Any] | None = None
    cancel_requested: bool = False
    checkpoints: list[dict[str, Any]] = attrs.Factory(list)
    done: trio.Event = attrs.Factory(trio.Event)


class TaskManager:
    def __init__(
        self,
        channel: StatusChannel,
        feed: TaskFeed,
        *,
        journal_path: Path | None,
        factories: dict[str, JobFactory] | None = None,
        max_running: int = DEFAULT_MAX_RUNNING,
        now: Callable[[], datetime] = _now,
        on_finished: OnFinished | None = None,
    ) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, not {max_running}")
        self._channel = channel
        self._feed = feed
        self._journal_path = journal_path
        self._journal: JsonLinesStore | None = None
        self._gate = ChangeGate()
        self._factories = dict(factories or {})
        self._max_running = max_running
        self._now = now
        self.on_finished = on_finished
        self._entries: dict[str, _Entry] = {}
        self._queue: deque[str] = deque()
        self._running = 0
        self._nursery: trio.Nursery | None = None
        self._journal_records = 0
        self._ids = itertools.count(1)

    # -- lifecycle -------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[TaskManager] = trio.TASK_STATUS_IGNORED
    ) -> None:
        if self._journal_path is not None:
            self._journal, report = await open_store(self._journal_path)
            self._replay(report.records)
            self._journal_records = len(report.records)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._cleanup_loop)
                self._dispatch()
                task_status.started(self)
        finally:
            if self._journal is not None:
                with trio.CancelScope(shield=True):
                    await self._journal.aclose()

    @property
    def max_running(self) -> int:
        return self._max_running

    @max_running.setter
    def max_running(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"max_running must be >= 1, not {value}")
        self._max_running = value
        self._dispatch()

    # -- the seed's operations -------------------------------------------------------------

    async def create_task(
        self,
        name: str,
        total_items: int = 0,
        metadata: dict[str, Any] | None = None,
        *,
        kind: str = "generic",
        owner: str,
        topic: str | None = None,
        spec: dict[str, Any] | None = None,
    ) -> str:
        """Record a new pending task; returns its id once the journal has it."""
        task = TaskInfo(
            id=self._new_id(),
            name=name,
            kind=kind,
            owner=owner,
            status=TaskStatus.PENDING,
            created_at=self._now(),
            topic=topic,
            total_items=total_items,
            metadata=dict(metadata or {}),
        )
        record = {"op": "create", "task": unstructure(task), "spec": spec}
        async with self._gate.change():
            await self._append_many([record])
            self._entries[task.id] = _Entry(task, spec=spec)
        return task.id

    def run_task(self, task_id: str, job: Job) -> None:
        """Queue ``job`` as the body of pending task ``task_id``; it starts when a slot is free."""
        entry = self._entries[task_id]
        if entry.task.status is not TaskStatus.PENDING:
            raise ValueError(f"task {task_id} is {entry.task.status.value}, not pending")
        entry.job = job
        self._queue.append(task_id)
        self._dispatch()

    def get_task(self, task_id: str) -> TaskInfo | None:
        entry = self._entries.get(task_id)
        return None if entry is None else entry.task

    def list_tasks(self, status: TaskStatus | None = None) -> list[TaskInfo]:
        tasks = [
            e.task for e in self._entries.values() if status is None or e.task.status is status
        ]
        tasks.sort(key=lambda t: (t.created_at, t.id), reverse=True)
        return tasks

    async def cancel_task(self, task_id: str) -> bool:
        """Cancel a pending or running task; False if it already finished."""
        entry = self._entries[task_id]
        if entry.task.status.finished:
            return False
        entry.cancel_requested = True
        if entry.task.status is TaskStatus.PENDING:
            if task_id in self._queue:
                self._queue.remove(task_id)
            if entry.scope is not None:
                entry.scope.cancel()  # dispatched, but its run has not begun
            await self._finish(entry, TaskStatus.CANCELLED, "cancelled before it started")
            return True
        assert entry.scope is not None
        entry.scope.cancel()
        await entry.done.wait()
        return True

    async def wait_finished(self, task_id: str) -> TaskInfo:
        entry = self._entries[task_id]
        await entry.done.wait()
        return entry.task

    async def cleanup_old_tasks(self, max_age_hours: float = 24, owner: str | None = None) -> int:
        """Forget finished tasks (of ``owner``, or everyone's) that ended more than
        ``max_age_hours`` ago; returns how many."""
        cutoff = self._now() - timedelta(hours=max_age_hours)
        old = [
            task_id
            for task_id, entry in self._entries.items()
            if entry.task.status.finished
            and entry.task.completed_at is not None
            and entry.task.completed_at <= cutoff
            and (owner is None or entry.task.owner == owner)
        ]
        if old:
            await self._journal_append_many([{"op": "remove", "id": task_id} for task_id in old])
            for task_id in old:
                del self._entries[task_id]
            log.info("cleaned up %d finished tasks older than %s hours", len(old), max_age_hours)
        await self._maybe_compact()
        return len(old)

    def get_task_summary(self, tasks: list[TaskInfo] | None = None) -> dict[str, int]:
        tasks = [e.task for e in self._entries.values()] if tasks is None else tasks
        summary = {"total": len(tasks)} | {status.value: 0 for status in TaskStatus}
        for task in tasks:
            summary[task.status.value] += 1
        return summary

    # -- running ---------------------------------------------------------------------------

    def _dispatch(self) -> None:
        if self._nursery is None:
            return
        while self._running < self._max_running and self._queue:
            task_id = self._queue.popleft()
            entry = self._entries.get(task_id)
            if entry is None or entry.task.status is not TaskStatus.PENDING:
                continue
            self._running += 1
            # The slot is taken now, synchronously, so the queue order is the start order.
            entry.scope = trio.CancelScope()
            self._nursery.start_soon(self._run, entry)

    async def _run(self, entry: _Entry) -> None:
        task = entry.task
        assert entry.job is not None
        assert entry.scope is not None
        reporter = Reporter(self, task)
        outcome: tuple[TaskStatus, str | None, dict[str, Any] | None] | None = None
        try:
            if task.status is not TaskStatus.PENDING:
                return  # cancelled between dispatch and start
            await self._transition(entry, TaskStatus.RUNNING)
            self.push(task, "progress", "Task started")
            with entry.scope:
                try:
                    result = await entry.job.run(reporter)
                except JobFailed as failure:
                    outcome = (TaskStatus.FAILED, str(failure), failure.result)
                except Exception as exc:
                    log.exception("task %s failed", task.id)
                    outcome = (TaskStatus.FAILED, f"internal error: {exc}", None)
                else:
                    outcome = (TaskStatus.COMPLETED, None, result)
            if outcome is None and entry.cancel_requested:
                with trio.CancelScope(shield=True):
                    await entry.job.discard()
                    await self._finish(entry, TaskStatus.CANCELLED, "cancelled")
            elif outcome is not None:
                status, error, result = outcome
                with trio.CancelScope(shield=True):
                    await self._finish(entry, status, error, result)
        finally:
            # On daemon shutdown the task stays "running" in the journal and resumes.
            self._running -= 1
            if task.status.finished:
                entry.done.set()
            self._dispatch()

    async def _finish(
        self,
        entry: _Entry,
        status: TaskStatus,
        error: str | None,
        result: dict[str, Any] | None = None,
    ) -> None:
        task = entry.task
        task.result = result
        task.error = error if status is not TaskStatus.COMPLETED else None
        if self.on_finished is not None:
            # Before the end is journalled: a crash in between re-runs the task and calls
            # the hook again (it must be idempotent); after it, the hook's work could be lost.
            try:
                await self.on_finished(task, status)
            except Exception:
                log.exception("task %s: the on_finished hook failed", task.id)
        await self._transition(entry, status)
        if status is TaskStatus.COMPLETED:
            self.push(task, "completed", "Task completed", results=result)
        elif status is TaskStatus.FAILED:
            self.push(task, "error", error or "failed", error=error, results=result)
        else:
            self.push(task, "cancelled", "Task cancelled")
        entry.done.set()

    async def _transition(self, entry: _Entry, status: TaskStatus) -> None:
        task = entry.task
        at = self._now()
        task.move_to(status, at)
        changes: dict[str, Any] = {
            "status": status.value,
            "started_at": task.started_at,
            "completed_at": task.completed_at,
        }
        if status.finished:
            changes |= {
                "result": task.result,
                "error": task.error,
                "progress": task.progress,
                "processed_items": task.processed_items,
                "bytes_done": task.bytes_done,
                "bytes_total": task.bytes_total,
            }
        try:
            await self._journal_append({"op": "update", "id": task.id, "set": unstructure(changes)})
        except StoreError:
            # The task goes on; a restart may then redo work the journal did not record.
            log.exception("task %s: could not journal the change to %s", task.id, status.value)

    # -- events ----------------------------------------------------------------------------

    def start_soon(self, function: Callable[..., Awaitable[object]], *args: Any) -> None:
        """Run a small background job (a delayed progress push) beside the tasks."""
        if self._nursery is not None:
            self._nursery.start_soon(function, *args)

    def push(self, task: TaskInfo, status: str, message: str, **extra: Any) -> None:
        timestamp = format_timestamp(self._now())
        self._feed.publish(task, unstructure(job_update(task, status, timestamp, message, **extra)))

    def publish_status(self, level: Level | str, message: str, task: TaskInfo) -> None:
        self._channel.publish_status(level, message, operation_id=task.id)

    # -- the journal -----------------------------------------------------------------------

    def _new_id(self) -> str:
        # Sortable by creation, unguessable enough that ids are not a way to probe.
        stamp = self._now().strftime("%Y%m%d%H%M%S")
        return f"t{stamp}-{secrets.token_hex(4)}"

    async def _journal_append(self, record: dict[str, Any]) -> None:
        await self._journal_append_many([record])

    async def _journal_append_many(self, records: list[dict[str, Any]]) -> None:
        # A record whose change is already in memory: a compaction meanwhile may have
        # written it too, and replaying it twice is harmless (updates set fields).
        async with self._gate.change():
            await self._append_many(records)

    async def _append_many(self, records: list[dict[str, Any]]) -> None:
        if self._journal is not None:
            await self._journal.append_many(records)
            self._journal_records += len(records)

    async def journal_checkpoint(self, task: TaskInfo, data: dict[str, Any]) -> None:
        entry = self._entries[task.id]
        progress = {
            "processed_items": task.processed_items,
            "bytes_done": task.bytes_done,
            "bytes_total": task.bytes_total,
        }
        record = {"op": "checkpoint", "id": task.id, "data": data, "set": progress}
        try:
            # Added to memory inside the change: a checkpoint replays as an event, so a
            # compaction must see it either in the snapshot or in the journal, not both.
            async with self._gate.change():
                entry.checkpoints.append(data)
                await self._append_many([record])
        except StoreError:
            log.exception("task %s: could not journal a checkpoint", task.id)

    def _replay(self, records: list[Any]) -> None:
        for record in records:
            op = record.get("op")
            if op == "create":
                task = converter.structure(record["task"], TaskInfo)
                self._entries[task.id] = _Entry(
                    task, spec=record.get("spec"), checkpoints=list(record.get("checkpoints", []))
                )
            elif op in ("update", "checkpoint"):
                entry = self._entries.get(record["id"])
                if entry is None:
                    continue
                for name, value in record.get("set", {}).items():
                    setattr(entry.task, name, _structure_field(name, value))
                if op == "checkpoint":
                    entry.checkpoints.append(record["data"])
            elif op == "remove":
                self._entries.pop(record["id"], None)
        resumed = 0
        for task_id, entry in sorted(
            self._entries.items(), key=lambda item: item[1].task.created_at
        ):
            task = entry.task
            if task.status.finished:
                entry.done.set()
                continue
            if task.status is TaskStatus.RUNNING:
                task.move_to(TaskStatus.PENDING, self._now())
            factory = self._factories.get(task.kind)
            if factory is None:
                task.move_to(TaskStatus.FAILED, self._now())
                task.error = f"cannot resume a task of kind {task.kind!r}"
                entry.done.set()
                continue
            entry.job = factory(task, {"spec": entry.spec or {}, "checkpoints": entry.checkpoints})
            self._queue.append(task_id)
            resumed += 1
        if resumed:
            log.info("resuming %d unfinished tasks from %s", resumed, self._journal_path)

    async def _maybe_compact(self) -> None:
        live = len(self._entries)
        if self._journal is None or self._journal_records < max(COMPACT_MIN_RECORDS, 2 * live):
            return
        async with self._gate.compaction():
            snapshot = [
                {
                    "op": "create",
                    "task": unstructure(entry.task),
                    "spec": entry.spec,
                    "checkpoints": list(entry.checkpoints),
                }
                for entry in self._entries.values()
            ]
            await self._journal.compact(snapshot)
            self._journal_records = len(snapshot)

    async def _cleanup_loop(self) -> None:
        while True:
            await trio.sleep(CLEANUP_INTERVAL)
            try:
                await self.cleanup_old_tasks()
            except Exception:
                log.exception("hourly task cleanup failed")

    def statistics(self) -> dict[str, int]:
        return {"running": self._running, "queued": len(self._queue), "known": len(self._entries)}


_DATETIME_FIELDS = {"created_at", "started_at", "completed_at"}


def _structure_field(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _DATETIME_FIELDS:
        return converter.structure(value, datetime)
    if name == "status":
        return TaskStatus(value)
    return value
