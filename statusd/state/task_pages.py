"""Pages of the task list and of one task's items, for ``tasks.list`` and ``tasks.get``.

A user with many tasks of thousands of items cannot have them in one answer (the reply is
bounded by ``limits.max_reply_bytes``), so both methods page. The task list pages with a
cursor rather than an offset: tasks are listed newest first and new ones arrive at the
front while a client pages, which would shift every offset; the cursor names the last task
seen by its (created_at, id), the list's own order, so the next page starts right after it
even when that task was cleaned up meanwhile. A task's items never move, so they page by
offset.

Pure: no trio, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import attrs

from statusd.state.tasks import TaskInfo


def cursor_of(task: TaskInfo) -> str:
    """The cursor that continues a list after ``task``."""
    return f"{task.created_at.isoformat()} {task.id}"


def parse_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) a cursor names; ValueError if it is not one of ours."""
    when, _, task_id = cursor.partition(" ")
    if not task_id:
        raise ValueError("must be a next_cursor from an earlier tasks.list")
    try:
        created_at = datetime.fromisoformat(when)
    except ValueError:
        raise ValueError("must be a next_cursor from an earlier tasks.list") from None
    if created_at.tzinfo is None:
        raise ValueError("must be a next_cursor from an earlier tasks.list")
    return created_at, task_id


def page(
    tasks: Sequence[TaskInfo], limit: int | None, cursor: str | None
) -> tuple[list[TaskInfo], str | None]:
    """The page of ``tasks`` (newest first, as ``TaskManager.list_tasks`` orders them) after
    ``cursor``, at most ``limit`` long, and the cursor of the next page (None: no more)."""
    rest = list(tasks)
    if cursor is not None:
        after = parse_cursor(cursor)
        rest = [task for task in rest if (task.created_at, task.id) < after]
    if limit is None or len(rest) <= limit:
        return rest, None
    chosen = rest[:limit]
    return chosen, cursor_of(chosen[-1])


def without_items(task: TaskInfo) -> TaskInfo:
    """``task`` with its result's per-item list left out (its counts stay)."""
    if task.result is None or "items" not in task.result:
        return task
    result = {key: value for key, value in task.result.items() if key != "items"}
    return attrs.evolve(task, result=result)


def items_page(task: TaskInfo, offset: int, limit: int | None) -> TaskInfo:
    """``task`` with only its result's items from ``offset``, at most ``limit`` of them."""
    if task.result is None or not isinstance(task.result.get("items"), list):
        return task
    items = task.result["items"]
    end = None if limit is None else offset + limit
    return attrs.evolve(task, result={**task.result, "items": items[offset:end]})
