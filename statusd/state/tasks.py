"""Tasks: the one state machine, the task record, and the seed's ``job_update`` shape.

Pure. ``pending -> running -> completed | failed | cancelled``; a pending task may also be
cancelled (or fail before it starts), and a running task goes back to pending only when the
daemon stopped under it and it is queued again on the next start. A pending or running task
may be paused; a paused one is resumed (back to pending) or cancelled. A failed or cancelled
task may be retried (back to pending); a completed one is final. Everything else is refused
with ``IllegalTransition``, so no caller can, say, revive a completed task.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

import attrs


class TaskStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})

TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.PENDING: frozenset(
        {TaskStatus.RUNNING, TaskStatus.PAUSED, TaskStatus.CANCELLED, TaskStatus.FAILED}
    ),
    TaskStatus.RUNNING: frozenset(
        {
            TaskStatus.COMPLETED,
            TaskStatus.FAILED,
            TaskStatus.CANCELLED,
            TaskStatus.PENDING,
            TaskStatus.PAUSED,
        }
    ),
    # resume, or cancel
    TaskStatus.PAUSED: frozenset({TaskStatus.PENDING, TaskStatus.CANCELLED}),
    TaskStatus.COMPLETED: frozenset(),
    # retry
    TaskStatus.FAILED: frozenset({TaskStatus.PENDING}),
    TaskStatus.CANCELLED: frozenset({TaskStatus.PENDING}),
}


class IllegalTransition(Exception):
    def __init__(self, current: TaskStatus, new: TaskStatus) -> None:
        super().__init__(f"a {current.value} task cannot become {new.value}")
        self.current = current
        self.new = new


def check_transition(current: TaskStatus, new: TaskStatus) -> None:
    if new not in TRANSITIONS[current]:
        raise IllegalTransition(current, new)


@attrs.define
class TaskInfo:
    """A task as clients see it (CONTRACT.md, TaskInfo)."""

    id: str
    name: str
    kind: str
    owner: str
    status: TaskStatus
    created_at: datetime
    topic: str | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    progress: float = 0.0
    total_items: int = 0
    processed_items: int = 0
    current_item: str | None = None
    bytes_done: int = 0
    bytes_total: int | None = None
    # While running: bytes a second, smoothed (0 when nothing arrives), and the seconds
    # left at that speed (None when unknown). Nothing of a past run's speed is kept.
    bytes_per_second: float = 0.0
    eta_s: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    metadata: dict[str, Any] = attrs.Factory(dict)
    # Bytes a second for the task's items together (``tasks.set_rate``); 0: none.
    rate_limit: int = 0

    def move_to(self, new: TaskStatus, at: datetime) -> None:
        check_transition(self.status, new)
        retried = self.status.finished
        self.status = new
        if new is not TaskStatus.RUNNING:
            self.bytes_per_second, self.eta_s = 0.0, None
        if new is TaskStatus.RUNNING:
            self.started_at = at
        elif new is TaskStatus.PENDING:
            self.started_at = None
            if retried:
                # A retry starts a new run: the old end no longer describes the task.
                self.completed_at = None
                self.result = None
                self.error = None
        elif new.finished:
            self.completed_at = at
            self.current_item = None
        # A finished task's progress says what it achieved; a retried one's, how far its
        # new run is (its failed items are to be fetched again).
        self.measure()

    def update_progress(self, processed: int, current: str | None = None) -> None:
        """The seed's progress callback: items done so far and the one being worked on."""
        self.processed_items = processed
        self.current_item = current
        self.measure()

    def set_bytes(self, done: int, total: int | None) -> None:
        """What the task's items hold now, and their total size once every one is known."""
        self.bytes_done = done
        self.bytes_total = total
        self.measure()

    def set_speed(self, bytes_per_second: float, eta_s: float | None) -> None:
        self.bytes_per_second = round(bytes_per_second, 1)
        self.eta_s = eta_s

    def measure(self) -> None:
        """``progress`` again from the task's counts (``progress_of``): after every change
        to them, and after a journal written before the rule was replayed."""
        self.progress = progress_of(self)

    def visible_to(self, username: str, admin: bool) -> bool:
        return admin or self.owner == username


def progress_of(task: TaskInfo) -> float:
    """How far ``task`` is, 0 to 100 (CONTRACT.md, TaskInfo ``progress``; docs/protocol.md,
    "Tasks"). While it runs: by bytes once their total is known (a single 500 MB file
    showed 0% until it ended when progress counted whole items), else by items processed,
    a failed item counting as processed. Once it ended: 100 when completed; when it failed
    or was cancelled, the share of its items its result says completed, since a failed
    item's size (none, or a part kept for a retry) says nothing of what was saved; without
    such a result, nothing held is 0 and otherwise the running rule stands.

    statusctl (``render.task_fraction``) and the dashboard (``taskFraction``) apply the
    same rule to what they are sent; tests/test_progress_rule.py holds all three to one
    table."""
    status = task.status
    if status is TaskStatus.COMPLETED:
        return 100.0
    if status in (TaskStatus.FAILED, TaskStatus.CANCELLED):
        completed = _count((task.result or {}).get("completed"))
        if completed is not None and task.total_items > 0:
            return _percent(completed, task.total_items)
        if task.bytes_done <= 0:
            return 0.0
    if task.bytes_total:
        return _percent(task.bytes_done, task.bytes_total)
    if task.total_items > 0:
        return _percent(task.processed_items, task.total_items)
    return task.progress


def _count(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return None


def _percent(done: float, total: float) -> float:
    return round(min(max(done, 0), total) / total * 100, 2)


JOB_UPDATE_STATUSES = ("progress", "batch_update", "completed", "error", "cancelled")


def job_update(
    task: TaskInfo, status: str, timestamp: str, message: str, **extra: Any
) -> dict[str, Any]:
    """The seed's WebSocket ``job_update`` message for ``task``."""
    update: dict[str, Any] = {
        "type": "job_update",
        "job_id": task.id,
        "timestamp": timestamp,
        "status": status,
        "task_status": task.status.value,
        "progress": task.progress,
        "processed": task.processed_items,
        "total": task.total_items,
        "message": message,
        "current_item": task.current_item,
        "bytes_done": task.bytes_done,
        "bytes_total": task.bytes_total,
        "bytes_per_second": task.bytes_per_second,
        "eta_s": task.eta_s,
        "topic": task.topic,
    }
    update.update(extra)
    return update
