"""The task state machine: every legal move, every illegal one refused."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from statusd.state.tasks import (
    TRANSITIONS,
    IllegalTransition,
    TaskInfo,
    TaskStatus,
    check_transition,
    job_update,
)

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
T1 = datetime(2026, 11, 25, 12, 5, tzinfo=UTC)


def make_task(status: TaskStatus = TaskStatus.PENDING) -> TaskInfo:
    return TaskInfo("t1", "demo", "download", "alice", status, T0, total_items=4)


ALL_PAIRS = [(a, b) for a in TaskStatus for b in TaskStatus]


@pytest.mark.parametrize(("current", "new"), ALL_PAIRS)
def test_transition_table(current: TaskStatus, new: TaskStatus) -> None:
    legal = {
        (TaskStatus.PENDING, TaskStatus.RUNNING),
        (TaskStatus.PENDING, TaskStatus.CANCELLED),
        (TaskStatus.PENDING, TaskStatus.FAILED),
        (TaskStatus.RUNNING, TaskStatus.COMPLETED),
        (TaskStatus.RUNNING, TaskStatus.FAILED),
        (TaskStatus.RUNNING, TaskStatus.CANCELLED),
        (TaskStatus.RUNNING, TaskStatus.PENDING),
        (TaskStatus.PENDING, TaskStatus.PAUSED),
        (TaskStatus.RUNNING, TaskStatus.PAUSED),
        (TaskStatus.PAUSED, TaskStatus.PENDING),
        (TaskStatus.PAUSED, TaskStatus.CANCELLED),
        (TaskStatus.FAILED, TaskStatus.PENDING),
        (TaskStatus.CANCELLED, TaskStatus.PENDING),
    }
    if (current, new) in legal:
        check_transition(current, new)
    else:
        with pytest.raises(IllegalTransition, match=f"a {current.value} task cannot become"):
            check_transition(current, new)
    assert (new in TRANSITIONS[current]) == ((current, new) in legal)


def test_finished_states_lead_only_to_a_retry() -> None:
    for status in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED):
        assert status.finished
    assert not TRANSITIONS[TaskStatus.COMPLETED]
    assert TRANSITIONS[TaskStatus.FAILED] == TRANSITIONS[TaskStatus.CANCELLED]
    assert TRANSITIONS[TaskStatus.FAILED] == {TaskStatus.PENDING}
    assert not TaskStatus.PENDING.finished
    assert not TaskStatus.PAUSED.finished


def test_a_retry_forgets_the_old_end_and_a_pause_keeps_the_start() -> None:
    task = make_task()
    task.move_to(TaskStatus.RUNNING, T0)
    task.move_to(TaskStatus.PAUSED, T1)
    assert (task.started_at, task.completed_at) == (T0, None)
    task.move_to(TaskStatus.CANCELLED, T1)
    task.result, task.error = {"items": []}, "cancelled"
    task.move_to(TaskStatus.PENDING, T1)
    assert [task.completed_at, task.started_at] == [None, None]
    assert [task.result, task.error] == [None, None]


def test_move_to_stamps_times_and_completes_progress() -> None:
    task = make_task()
    task.move_to(TaskStatus.RUNNING, T0)
    assert task.started_at == T0
    task.update_progress(1, "http://x/a")
    assert (task.progress, task.current_item) == (25.0, "http://x/a")
    task.move_to(TaskStatus.COMPLETED, T1)
    assert (task.completed_at, task.progress, task.current_item) == (T1, 100.0, None)
    with pytest.raises(IllegalTransition):
        task.move_to(TaskStatus.RUNNING, T1)


def test_requeue_after_restart_clears_start() -> None:
    task = make_task()
    task.move_to(TaskStatus.RUNNING, T0)
    task.move_to(TaskStatus.PENDING, T1)
    assert task.started_at is None


def test_progress_with_no_items_stays_zero() -> None:
    task = TaskInfo("t", "n", "k", "o", TaskStatus.RUNNING, T0)
    task.update_progress(5)
    assert task.progress == 0.0


def test_visibility() -> None:
    task = make_task()
    assert task.visible_to("alice", admin=False)
    assert not task.visible_to("bob", admin=False)
    assert task.visible_to("bob", admin=True)


def test_job_update_has_the_seed_shape() -> None:
    task = make_task()
    update = job_update(task, "batch_update", "2026-11-25T12:00:00.000Z", "Completed batch 1/2")
    assert {"type", "job_id", "timestamp", "status", "progress", "processed", "total"} <= set(
        update
    )
    assert update["type"] == "job_update"
    assert update["job_id"] == "t1"
