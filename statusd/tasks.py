"""The task manager: the seed's background task manager as a trio nursery with a journal.

Operations keep the seed's names: ``create_task``, ``run_task``, ``get_task``,
``list_tasks``, ``cancel_task``, ``cleanup_old_tasks``, ``get_task_summary``; and the
controls every download manager has: ``pause_task``, ``resume_task``, ``retry_task``.
What the seed lacked:

- at most ``max_running`` tasks run at once; the rest wait in the order they came;
- each task runs in its own cancel scope, so a cancel or a pause takes effect at once; on a
  cancel the task's ``discard()`` removes what it left half-done (a download's part files),
  on a pause they are kept for the resume;
- one finish path: only the coroutine that runs a task (``_run``) moves it to a final
  state. ``cancel_task`` records the user's request and waits for that path; a task that
  is not running (queued or paused) is handed to a run that only finishes it. Every change
  to one task happens under that task's lock, so no two paths can finish it twice;
- a running task is shown paused by its run too, once its job has stopped: ``pause_task``
  journals the pause and cancels the scope, and ``_run`` moves the task (``_settle_pause``)
  after ``Job.run`` has returned, so ``paused``, like ``cancelled``, is never said while the
  job's threads may still write (a download's part is then what a resume continues from);
- nothing is acknowledged that is not durable: every task and state change is journalled
  to ``tasks.jsonl`` before memory changes and before it is answered or published. A change
  that a caller asks for and that cannot be journalled is refused (``InternalError``) and
  the task does not move; a change a running task makes itself (a checkpoint, its end) is
  retried with a backoff until the journal takes it or the daemon stops;
- on start the journal is replayed: finished and paused tasks are listed again, pending and
  running ones are queued again with their saved progress (``checkpoint`` records), so a
  restart, even after ``kill -9``, repeats no finished work; a task whose cancel was
  acknowledged is finished as cancelled, never run again;
- a task's job is built from its spec and checkpoints when the task starts, and dropped when
  it ends: a queue of large tasks holds their specs, not their jobs. A finished task keeps
  only what a retry needs (a completed one nothing: no spec, no checkpoints), in memory and,
  once compacted, in the journal;
- a user may have at most ``max_unfinished`` pending, running or paused tasks (the caller
  passes it; None for admins). Creates and retries claim their place before they wait for
  the journal, so concurrent ones cannot pass the limit together.

A task body is a ``Job``: ``run(reporter)`` does the work and reports through the
``Reporter`` it is given; it knows nothing of the manager.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio

from statusd.channel import StatusChannel
from statusd.errors import Busy, Conflict, InternalError
from statusd.events import TaskFeed
from statusd.protocol.codec import converter, format_timestamp, unstructure
from statusd.state.status import Audience, Level
from statusd.state.tasks import TaskInfo, TaskStatus, job_update
from statusd.state.throughput import Throughput, eta
from statusd.store import ChangeGate, JsonLinesStore, KeptRecord, StoreError, open_store

log = logging.getLogger(__name__)

DEFAULT_MAX_RUNNING = 3
CLEANUP_INTERVAL = 3600.0
PROGRESS_INTERVAL = 0.25  # at most 4 progress pushes a second per task
COMPACT_MIN_RECORDS = 1000
_NONE: Any = object()  # no ``results`` in a push


class JobFailed(Exception):
    """Raised by a job whose work ended in failure; ``result`` is kept on the task."""

    def __init__(self, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.result = result


class Job(Protocol):
    """A task's body. Its ``run`` is cancelled (through the task's scope) by a cancel or a
    pause; after a pause nothing is discarded, and the resume builds a new job from the
    task's factory, spec and checkpoints, exactly as a restart does."""

    async def run(self, reporter: Reporter) -> dict[str, Any] | None:
        """The task's result, in plain JSON values (dicts, lists, strings, numbers, booleans,
        None), as is ``JobFailed.result``: it is journalled and pushed as it is."""
        ...

    async def discard(self) -> None:
        """Remove what an unfinished run left behind (called after a user's cancel), and
        what a failed one kept for a retry (called before the task is cleaned up)."""

    def checkpoints_to_keep(self) -> list[dict[str, Any]]:
        """Called when the task has failed or was cancelled: the checkpoints a retry needs
        (the rest are dropped from memory and, at the next compaction, from the journal;
        a completed task keeps none)."""
        ...


JobFactory = Callable[[TaskInfo, dict[str, Any]], Job]
# Called once a task's outcome is known, before it is journalled (see ``_finish``).
OnFinished = Callable[[TaskInfo, TaskStatus], Awaitable[None]]


def _now() -> datetime:
    return datetime.now(UTC)


class Reporter:
    """What a running job sees of its task: progress, status messages, checkpoints.

    It also measures the task's speed (``Throughput``) from the bytes the job reports as
    received, and pushes a progress update when nothing has arrived for a while, so a
    stalled transfer shows 0 B/s instead of the speed it had before it stalled."""

    def __init__(self, manager: TaskManager, task: TaskInfo) -> None:
        self._manager = manager
        self._task = task
        self._last_push = -math.inf
        self._trailing_push = False
        self._speed = Throughput()
        self._watching_idle = False
        self._running = True

    @property
    def task_id(self) -> str:
        return self._task.id

    def close(self) -> None:
        """The run is over: what is still scheduled (an idle check) does nothing."""
        self._running = False

    def update_progress(self, processed: int, current: str | None = None) -> None:
        """The seed's progress callback."""
        self._task.update_progress(processed, current)
        self._maybe_push()

    def add_bytes(self, delta: int, total: int | None = None, *, received: bool = True) -> None:
        """``delta`` more (or, negative, fewer) bytes held; ``received``: they came off the
        network now, rather than being found on disk (a resumed part), so they count
        towards the speed."""
        task = self._task
        task.set_bytes(task.bytes_done + delta, task.bytes_total if total is None else total)
        now = trio.current_time()
        if received and delta > 0:
            self._speed.add(now, delta)
            self._watch_idle()
        self._measure_speed(now)
        self._maybe_push()

    def set_bytes_done(self, done: int) -> None:
        self._task.set_bytes(done, self._task.bytes_total)

    def set_bytes_total(self, total: int | None) -> None:
        self._task.set_bytes(self._task.bytes_done, total)

    def _measure_speed(self, now: float) -> None:
        task = self._task
        rate = self._speed.rate(now)
        remaining = None if task.bytes_total is None else task.bytes_total - task.bytes_done
        task.set_speed(rate, None if remaining is None else eta(remaining, rate))

    def _watch_idle(self) -> None:
        if not self._watching_idle:
            self._watching_idle = True
            self._manager.start_soon(self._when_idle)

    async def _when_idle(self) -> None:
        """Once nothing has arrived for ``idle_after`` seconds, push the speed of 0."""
        try:
            # Bytes that arrive meanwhile move the moment on: sleep until the latest one.
            while True:
                idle_at = self._speed.idle_at
                if idle_at <= trio.current_time():
                    break
                await trio.sleep_until(idle_at)
            if self._running and self._task.status is TaskStatus.RUNNING:
                now = trio.current_time()
                self._measure_speed(now)
                self._push_progress(now)
        finally:
            self._watching_idle = False

    def announce(self, message: str, **extra: Any) -> None:
        """Push ``message`` about one of the task's items at once, unthrottled (a retry, a
        failure): these are what a user follows a task to see."""
        self._manager.push(self._task, "progress", message, **extra)

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
        self._measure_speed(now)
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
    # The scope of the run that owns the task now (set at dispatch, cleared when it exits).
    scope: trio.CancelScope | None = None
    spec: dict[str, Any] | None = None
    # The user's cancel is journalled ("cancel" record) before it is acknowledged; the run
    # path, or the next start, then finishes the task as cancelled.
    cancel_requested: bool = False
    # The job has ended and its run is recording the outcome: too late to cancel or pause.
    finishing: bool = False
    # A pause journalled (at this time) that its run has not made yet: the job is stopping,
    # and the task is shown paused once it has (``_settle_pause``).
    pausing: datetime | None = None
    checkpoints: list[dict[str, Any]] = attrs.Factory(list)
    done: trio.Event = attrs.Factory(trio.Event)
    # Set when the task's latest run has exited and given its slot back.
    run_exited: trio.Event | None = None
    lock: trio.Lock = attrs.Factory(trio.Lock)
    # A finished task's snapshot record, made by the first compaction after its end and
    # kept until a retry changes it (see ``_snapshot``).
    kept: KeptRecord | None = None
    # The task's checkpoints of this turn of the scheduler, journalled together once it
    # is over (``journal_checkpoint``).
    checkpoints_next: _Checkpoints | None = None


@attrs.define(eq=False)
class _Checkpoints:
    """A task's checkpoints journalled in one append: those made in one turn of the
    scheduler (the file threads wake the items they finished together). With 16 small
    files at a time, a hand-off to the journal's thread and a wake-up from it per
    checkpoint cost the loop more than the checkpoints' own work (docs/bench-daemon.md)."""

    records: list[dict[str, Any]] = attrs.Factory(list)
    data: list[dict[str, Any]] = attrs.Factory(list)
    # Their callers but the one writing them, parked until the write ends.
    waiting: list[trio.lowlevel.Task] = attrs.Factory(list)
    writing: bool = False
    written: bool = False

    def add(self, record: dict[str, Any], data: dict[str, Any]) -> None:
        self.records.append(record)
        self.data.append(data)

    def withdraw(self, record: dict[str, Any]) -> None:
        at = next(i for i, mine in enumerate(self.records) if mine is record)
        del self.records[at], self.data[at]

    async def park(self) -> None:
        """Wait, not as a cancellation point (the record may be in the journal's hands),
        until the write ends (``wake``) or its writer gave up (``wake_first``)."""
        self.waiting.append(trio.lowlevel.current_task())
        await trio.lowlevel.wait_task_rescheduled(_cannot_abort)

    def wake(self) -> None:
        waiting, self.waiting = self.waiting, []
        for task in waiting:
            trio.lowlevel.reschedule(task)

    def wake_first(self) -> None:
        if self.waiting:
            trio.lowlevel.reschedule(self.waiting.pop(0))


def _cannot_abort(_: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


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
        self._stopping = False
        self._journal_records = 0
        self._cleanup_lock = trio.Lock()
        self._compact_lock = trio.Lock()
        self._ids = itertools.count(1)
        # Per owner: creates and retries that passed the limit and wait for the journal.
        self._claims: dict[str, int] = {}

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
                for entry in self._entries.values():
                    if entry.cancel_requested and not entry.task.status.finished:
                        self._start_run(entry)  # acknowledged before a crash: finish it
                self._dispatch()
                task_status.started(self)
        finally:
            self._stopping = True
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
        max_unfinished: int | None = None,
        rate_limit: int = 0,
    ) -> str:
        """Record a new pending task; returns its id once the journal has it
        (``InternalError`` if the journal cannot take it: then there is no task; ``Busy`` if
        ``owner`` already has ``max_unfinished`` unfinished tasks)."""
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
            rate_limit=rate_limit,
        )
        record = {"op": "create", "task": unstructure(task), "spec": spec}
        with self._claim(owner, max_unfinished) as claim:
            async with self._gate.change():
                await self._append_or_refuse([record])
                self._entries[task.id] = _Entry(task, spec=spec)
                claim.settle()
        return task.id

    def run_task(self, task_id: str, job: Job | None = None) -> None:
        """Queue pending task ``task_id``; it starts when a slot is free, with ``job`` as its
        body, or (None) the job its kind's factory builds then from its spec."""
        entry = self._entries[task_id]
        if entry.task.status is not TaskStatus.PENDING:
            raise ValueError(f"task {task_id} is {entry.task.status.value}, not pending")
        entry.job = job
        self._queue.append(task_id)
        self._dispatch()

    def unfinished_count(self, owner: str) -> int:
        """``owner``'s pending, running and paused tasks, and creates and retries of theirs
        waiting for the journal."""
        tasks = sum(
            1
            for entry in self._entries.values()
            if entry.task.owner == owner and not entry.task.status.finished
        )
        return tasks + self._claims.get(owner, 0)

    @contextlib.contextmanager
    def _claim(self, owner: str, most: int | None) -> Iterator[_Claim]:
        """Hold a place among ``owner``'s unfinished tasks while one is journalled. Taken
        without a checkpoint after the count, so two concurrent creates cannot both take
        the last place; ``settle()`` gives it back in the step that makes the task count."""
        if most is not None and (count := self.unfinished_count(owner)) >= most:
            raise Busy(
                f"{owner} has {count} unfinished tasks, the most a user may have "
                f"(limits.max_tasks_per_user = {most}); wait for some to end, or cancel some",
                {"limit": most, "key": "limits.max_tasks_per_user"},
            )
        claim = _Claim(self._claims, owner)
        self._claims[owner] = self._claims.get(owner, 0) + 1
        try:
            yield claim
        finally:
            claim.settle()

    def get_task(self, task_id: str) -> TaskInfo | None:
        entry = self._entries.get(task_id)
        return None if entry is None else entry.task

    def all_tasks(self) -> Iterator[TaskInfo]:
        """Every task, in no particular order (``list_tasks`` sorts them)."""
        return (entry.task for entry in self._entries.values())

    def list_tasks(self, status: TaskStatus | None = None) -> list[TaskInfo]:
        tasks = [
            e.task for e in self._entries.values() if status is None or e.task.status is status
        ]
        tasks.sort(key=lambda t: (t.created_at, t.id), reverse=True)
        return tasks

    async def cancel_task(self, task_id: str) -> bool:
        """Cancel a pending, running or paused task and return once it is cancelled; False
        if it already finished (or its job ended and it is being recorded as such).

        Raises ``InternalError`` (and nothing changes) if the request cannot be journalled.
        """
        entry = self._entries[task_id]
        async with entry.lock:
            if entry.task.status.finished:
                return False
            if not entry.finishing:
                if not entry.cancel_requested:
                    await self._record_change([{"op": "cancel", "id": task_id}])
                    entry.cancel_requested = True
                if entry.scope is not None:
                    entry.scope.cancel()
                else:
                    # Queued or paused: a run that only finishes it, outside the limit, so
                    # the cancel does not wait for a free slot.
                    self._unqueue(task_id)
                    self._start_run(entry)
        await entry.done.wait()
        return entry.task.status is TaskStatus.CANCELLED and entry.cancel_requested

    async def pause_task(self, task_id: str) -> None:
        """Pause a pending or running task: it leaves the queue, or its job is stopped at
        once, keeping its part files. Returns once the task is paused: a running one when
        its job has stopped and its slot is free. Raises ``Conflict`` in any other state."""
        entry = self._entries[task_id]
        async with entry.lock:
            task = entry.task
            exited = entry.run_exited
            if entry.pausing is None:
                if task.status not in (TaskStatus.PENDING, TaskStatus.RUNNING) or (
                    entry.cancel_requested or entry.finishing
                ):
                    raise _conflict(entry, "paused")
                # Journalled now: a restart finds the task paused, even one whose job is
                # still stopping.
                at = self._now()
                async with self._gate.change():
                    await self._append_or_refuse([_update_record(task, TaskStatus.PAUSED, at)])
                    entry.pausing = at
                self._unqueue(task_id)
                if task.status is TaskStatus.RUNNING and entry.scope is not None:
                    entry.scope.cancel()  # its run pauses it once the job's writes stopped
                else:
                    # No job runs: queued, or dispatched and not yet started (that run
                    # ends at once, seeing it paused).
                    self._settle_pause(entry)
                    if entry.scope is None:
                        exited = None
            # else a pause under way: this call waits for it too.
        if exited is not None:
            await exited.wait()  # the slot is free (and the next task started) on return
            if task.status.finished:
                raise _conflict(entry, "paused")  # a cancel overtook the pause

    async def resume_task(self, task_id: str) -> None:
        """Queue a paused task again (at the end); it continues where it stopped."""
        entry = self._entries[task_id]
        await self._run_exited(entry, TaskStatus.PAUSED)
        async with entry.lock:
            if entry.task.status is not TaskStatus.PAUSED:
                raise _conflict(entry, "resumed")
            self._check_kind(entry)
            await self._record_status(entry, TaskStatus.PENDING)
            self._requeue(entry)
        self.push(entry.task, "progress", "Task resumed")

    async def retry_task(self, task_id: str, *, max_unfinished: int | None = None) -> None:
        """Run a failed or cancelled task again; its job fetches only what did not finish.
        It counts among its owner's unfinished tasks again (``Busy`` past
        ``max_unfinished``)."""
        entry = self._entries[task_id]
        await self._run_exited(entry, TaskStatus.FAILED, TaskStatus.CANCELLED)
        async with entry.lock:
            task = entry.task
            if task.status not in (TaskStatus.FAILED, TaskStatus.CANCELLED):
                raise _conflict(entry, "retried")
            self._check_kind(entry)
            records = [
                {"op": "retry", "id": task_id},
                _update_record(task, TaskStatus.PENDING, self._now()),
            ]
            with self._claim(task.owner, max_unfinished) as claim:
                async with self._gate.change():
                    await self._append_or_refuse(records)
                    entry.checkpoints = [*entry.checkpoints, RETRY_CHECKPOINT]
                    entry.cancel_requested = False
                    entry.kept = None
                    entry.done = trio.Event()
                    task.move_to(TaskStatus.PENDING, self._now())
                    claim.settle()
            self._requeue(entry)
        self.push(task, "progress", "Task queued again")

    async def set_rate_limit(self, task_id: str, rate: int) -> None:
        """Journal ``rate`` (bytes a second, 0: none) as the task's ``rate_limit``, then
        make it so (``InternalError``: no change; ``Conflict`` for a completed task). A
        running job hears of it from whoever built it (``Downloads.set_rate_limit``)."""
        entry = self._entries[task_id]
        async with entry.lock:
            if entry.task.status is TaskStatus.COMPLETED:
                raise _conflict(entry, "given a rate limit")
            async with self._gate.change():
                record = {"op": "update", "id": task_id, "set": {"rate_limit": rate}}
                await self._append_or_refuse([record])
                entry.task.rate_limit = rate
                entry.kept = None  # a failed or cancelled task's snapshot changed

    def keeps_parts(self, task_id: str) -> bool:
        """Whether the failed task ``task_id`` keeps a part file for a retry to resume
        (until ``tasks.retry``, or its clean-up, removes it)."""
        entry = self._entries.get(task_id)  # None: cleaned up meanwhile, nothing kept
        return (
            entry is not None
            and entry.task.status is TaskStatus.FAILED
            and any("kept" in checkpoint for checkpoint in entry.checkpoints)
        )

    async def wait_finished(self, task_id: str) -> TaskInfo:
        entry = self._entries[task_id]
        await entry.done.wait()
        return entry.task

    async def cleanup_old_tasks(self, max_age_hours: float = 24, owner: str | None = None) -> int:
        """Forget finished tasks (of ``owner``, or everyone's) that ended more than
        ``max_age_hours`` ago; returns how many. Concurrent calls each remove what is
        left; a task being changed (a retry) at the moment is left for the next one."""
        cutoff = self._now() - timedelta(hours=max_age_hours)
        async with self._cleanup_lock, contextlib.AsyncExitStack() as held:
            old = []
            for task_id, entry in list(self._entries.items()):
                task = entry.task
                if not (
                    task.status.finished
                    and task.completed_at is not None
                    and task.completed_at <= cutoff
                    and (owner is None or task.owner == owner)
                ):
                    continue
                try:
                    entry.lock.acquire_nowait()
                except trio.WouldBlock:
                    continue
                held.callback(entry.lock.release)
                old.append(task_id)
            if old:
                for task_id in old:
                    await self._discard_kept(self._entries[task_id])
                async with self._gate.change():
                    await self._append_or_refuse([{"op": "remove", "id": i} for i in old])
                    for task_id in old:
                        del self._entries[task_id]
                log.info(
                    "cleaned up %d finished tasks older than %s hours", len(old), max_age_hours
                )
        await self._maybe_compact()
        return len(old)

    async def _discard_kept(self, entry: _Entry) -> None:
        """Remove what a failed task kept for a retry (a download's parts) before the task
        is forgotten; a crash in between leaves the task, with nothing left to resume."""
        if entry.task.status is not TaskStatus.FAILED or not entry.checkpoints:
            return
        try:
            # In a thread: a 10,000-item download's job is built from all its checkpoints.
            job = await trio.to_thread.run_sync(self._job_or_none, entry)
        except Exception:
            log.exception("task %s: cannot build its job to remove its files", entry.task.id)
            return
        if job is not None:
            with trio.CancelScope(shield=True):
                await job.discard()

    def get_task_summary(self, tasks: Iterable[TaskInfo] | None = None) -> dict[str, int]:
        counts = dict.fromkeys(_STATUS_KEYS, 0)
        for task in self.all_tasks() if tasks is None else tasks:
            counts[task.status] += 1
        summary = {"total": sum(counts.values())}
        # Keys made once: the enum's value property, read for each, was a third of the call.
        for status, key in _STATUS_KEYS.items():
            summary[key] = counts[status]
        return summary

    # -- running ---------------------------------------------------------------------------

    def _dispatch(self) -> None:
        # Once the daemon stops, nothing starts: a queued task stays pending in the journal.
        if self._nursery is None or self._stopping:
            return
        while self._running < self._max_running and self._queue:
            task_id = self._queue.popleft()
            entry = self._entries.get(task_id)
            if entry is None or entry.task.status is not TaskStatus.PENDING:
                continue
            # The slot is taken now, synchronously, so the queue order is the start order.
            self._start_run(entry)

    def _start_run(self, entry: _Entry) -> None:
        if self._nursery is None or self._stopping:
            return
        self._running += 1
        entry.scope = scope = trio.CancelScope()
        entry.run_exited = exited = trio.Event()
        self._nursery.start_soon(self._run, entry, scope, exited)

    async def _run(self, entry: _Entry, scope: trio.CancelScope, exited: trio.Event) -> None:
        task = entry.task
        try:
            async with entry.lock:
                if entry.cancel_requested:
                    await self._finish_cancelled(entry)
                    return
                if task.status is not TaskStatus.PENDING:
                    return  # paused or finished between dispatch and start
                if not await self._build_job(entry):
                    return
                await self._start(entry)
            outcome = await self._work(entry, scope)
            entry.finishing = (
                outcome is not None and not entry.cancel_requested and entry.pausing is None
            )
            async with entry.lock:
                if entry.cancel_requested:
                    await self._finish_cancelled(entry)
                elif entry.pausing is not None:
                    # The job has stopped (an outcome that raced the pause is dropped: a
                    # resume's job finds what it did); the part files stay for the resume.
                    self._settle_pause(entry)
                elif outcome is not None and entry.task.status is TaskStatus.RUNNING:
                    await self._finish(entry, *outcome)
        except trio.Cancelled:
            # Only the daemon's stop cancels a run from outside its own scope. The task
            # stays "running" (or "pending") in the journal and resumes on the next start.
            self._stopping = True
            raise
        finally:
            entry.finishing = False
            entry.pausing = None  # made, overtaken by a cancel, or (a stop) left to the journal
            if entry.scope is scope:
                entry.scope = None
            if entry.task.status is not TaskStatus.RUNNING:
                # Paused or ended: a resume or retry builds the job afresh from the journal's
                # view, so a queue of finished or paused tasks holds no jobs.
                entry.job = None
            self._running -= 1
            exited.set()
            self._dispatch()

    async def _build_job(self, entry: _Entry) -> bool:
        """Build the job of a task about to start, if it has none yet; a task whose job
        cannot be built fails (and False is returned)."""
        if entry.job is not None:
            return True
        try:
            entry.job = self._rebuild_job(entry)
        except Exception as exc:
            log.exception("task %s: cannot build its job", entry.task.id)
            reason = exc.message if isinstance(exc, InternalError) else f"internal error: {exc}"
            await self._finish(entry, TaskStatus.FAILED, reason)
            return False
        return True

    async def _start(self, entry: _Entry) -> None:
        task = entry.task
        try:
            await self._record_status(entry, TaskStatus.RUNNING)
        except InternalError as error:
            # Pending and running replay alike (both are queued again), so the run need not
            # wait for this record; only started_at is lost if the daemon stops now.
            log.warning("task %s: %s", task.id, error)
            task.move_to(TaskStatus.RUNNING, self._now())
        self.push(task, "progress", "Task started")

    async def _work(self, entry: _Entry, scope: trio.CancelScope) -> _Outcome | None:
        """Run the job in ``scope``; its outcome, or None when the scope was cancelled."""
        assert entry.job is not None
        outcome: _Outcome | None = None
        reporter = Reporter(self, entry.task)
        with scope:
            try:
                result = await entry.job.run(reporter)
            except JobFailed as failure:
                outcome = (TaskStatus.FAILED, str(failure), failure.result)
            except Exception as exc:
                log.exception("task %s failed", entry.task.id)
                outcome = (TaskStatus.FAILED, f"internal error: {exc}", None)
            else:
                outcome = (TaskStatus.COMPLETED, None, result)
            finally:
                reporter.close()
        return outcome

    def _settle_pause(self, entry: _Entry) -> None:
        """Show the task paused: its pause is journalled and no job of it runs any more.
        The one place a task becomes paused."""
        assert entry.pausing is not None
        entry.task.move_to(TaskStatus.PAUSED, entry.pausing)
        entry.pausing = None
        self.push(entry.task, "progress", "Task paused")

    async def _finish_cancelled(self, entry: _Entry) -> None:
        job = entry.job if entry.job is not None else self._job_or_none(entry)
        if job is not None:
            entry.job = job
            with trio.CancelScope(shield=True):
                await job.discard()
        await self._finish(entry, TaskStatus.CANCELLED, "cancelled")

    async def _finish(
        self,
        entry: _Entry,
        status: TaskStatus,
        error: str | None,
        result: dict[str, Any] | None = None,
    ) -> None:
        """Record the task's end (retrying until the journal takes it), then show it.
        Called with the task's lock held, by its run only."""
        task = entry.task
        at = self._now()
        ended = attrs.evolve(task, metadata=dict(task.metadata))
        ended.result = result
        ended.error = error if status is not TaskStatus.COMPLETED else None
        ended.move_to(status, at)
        if self.on_finished is not None:
            # Before the end is journalled: a crash in between re-runs the task and calls
            # the hook again (it must be idempotent); after it, the hook's work could be lost.
            try:
                await self.on_finished(ended, status)
            except Exception:
                log.exception("task %s: the on_finished hook failed", task.id)
        # What a retry needs replaces the checkpoints, in the same write as the end; a
        # completed task is final and keeps neither checkpoints nor its spec.
        spec = entry.spec
        if status is TaskStatus.COMPLETED:
            keep: list[dict[str, Any]] = []
            spec = None
        elif entry.job is not None:
            keep = entry.job.checkpoints_to_keep()
        else:
            keep = entry.checkpoints
        settled: dict[str, Any] = {"op": "checkpoints", "id": task.id, "data": keep}
        if spec is None:
            settled["spec"] = None
        records = [settled, _update_record(ended, status, at)]

        def apply() -> None:
            entry.kept = None
            entry.checkpoints = list(keep)
            entry.spec = spec
            for field in attrs.fields(TaskInfo):
                setattr(task, field.name, getattr(ended, field.name))

        await self._record_retrying(task, records, apply, "its end")
        if status is TaskStatus.FAILED:
            log.warning("task %s (%s) failed: %s", task.id, task.owner, error)
        else:
            log.info("task %s (%s) %s", task.id, task.owner, status.value)
        if status is TaskStatus.COMPLETED:
            self.push(task, "completed", "Task completed", results=result)
        elif status is TaskStatus.FAILED:
            self.push(task, "error", error or "failed", error=error, results=result)
        else:
            self.push(task, "cancelled", "Task cancelled")
        entry.done.set()
        self.start_soon(self._maybe_compact)

    def _unqueue(self, task_id: str) -> None:
        if task_id in self._queue:
            self._queue.remove(task_id)

    def _requeue(self, entry: _Entry) -> None:
        entry.job = None  # built when it starts, from the spec and checkpoints as they are then
        self._queue.append(entry.task.id)
        self._dispatch()

    async def _run_exited(self, entry: _Entry, *states: TaskStatus) -> None:
        """Wait until the last run of a task in one of ``states`` has exited: a paused or
        cancelled run may still be unwinding, and its successor must not share the job's
        files with it; so may a running one being paused. (In any other state the caller
        refuses, without waiting.)"""
        pausing = entry.pausing is not None
        if (entry.task.status in states or pausing) and entry.run_exited is not None:
            await entry.run_exited.wait()

    def _job_or_none(self, entry: _Entry) -> Job | None:
        factory = self._factories.get(entry.task.kind)
        if factory is None:
            return None
        return factory(entry.task, {"spec": entry.spec or {}, "checkpoints": entry.checkpoints})

    def _check_kind(self, entry: _Entry) -> None:
        if entry.task.kind not in self._factories:
            raise InternalError(f"cannot run a task of kind {entry.task.kind!r} again")

    def _rebuild_job(self, entry: _Entry) -> Job:
        """The task's job as a restart builds it: from its spec and checkpoints."""
        self._check_kind(entry)
        factory = self._factories[entry.task.kind]
        return factory(
            entry.task, {"spec": entry.spec or {}, "checkpoints": list(entry.checkpoints)}
        )

    # -- events ----------------------------------------------------------------------------

    def start_soon(self, function: Callable[..., Awaitable[object]], *args: Any) -> None:
        """Run a small background job (a delayed progress push) beside the tasks."""
        if self._nursery is not None and not self._stopping:
            self._nursery.start_soon(function, *args)

    def push(
        self, task: TaskInfo, status: str, message: str, *, results: Any = _NONE, **extra: Any
    ) -> None:
        """A ``job_update`` for ``task``; ``results``, a task's end result, is plain JSON
        already (``Job.run``) and is sent as it is: walking a 2,000-item download's result
        again cost 3 ms of the loop at its end."""
        timestamp = format_timestamp(self._now())
        update = job_update(task, status, timestamp, message, **unstructure(extra))
        if results is not _NONE:
            update["results"] = results
        self._feed.publish(task, update)

    def publish_status(self, level: Level | str, message: str, task: TaskInfo) -> None:
        """A message about ``task``: it and its id reach the task's owner and admins only
        (the channel redacts the URLs in it; ``tasks.get`` keeps them whole)."""
        self._channel.publish_status(
            level, message, operation_id=task.id, user=task.owner, audience=Audience.USER
        )

    # -- the journal -----------------------------------------------------------------------

    def _new_id(self) -> str:
        # Sortable by creation, unguessable enough that ids are not a way to probe.
        stamp = self._now().strftime("%Y%m%d%H%M%S")
        return f"t{stamp}-{secrets.token_hex(4)}"

    async def _append_many(self, records: list[dict[str, Any]]) -> None:
        if self._journal is not None:
            await self._journal.append_many(records)
            self._journal_records += len(records)

    async def _append_or_refuse(self, records: list[dict[str, Any]]) -> None:
        """Journal a change a caller asked for; ``InternalError`` if it cannot be."""
        try:
            await self._append_many(records)
        except StoreError as exc:
            log.error("task change not recorded: %s", exc)
            raise InternalError(
                f"could not record the change in {self._journal_path}: {_reason(exc)}; "
                "nothing was changed"
            ) from exc

    async def _record_change(self, records: list[dict[str, Any]]) -> None:
        async with self._gate.change():
            await self._append_or_refuse(records)

    async def _record_status(self, entry: _Entry, status: TaskStatus) -> None:
        """Journal a move to ``status``, then make it (``InternalError``: no move)."""
        at = self._now()
        async with self._gate.change():
            await self._append_or_refuse([_update_record(entry.task, status, at)])
            entry.task.move_to(status, at)

    async def _record_retrying(
        self,
        task: TaskInfo,
        records: list[dict[str, Any]],
        apply: Callable[[], None],
        what: str,
    ) -> None:
        """Journal a change a running task makes itself, then ``apply()`` it; while the
        journal refuses, keep trying with a backoff (the daemon's stop ends the wait, and
        the journal then still holds the task as it was)."""
        delay = RECORD_RETRY_FIRST
        while True:
            try:
                # Applied inside the change: a compaction sees it in the snapshot or in the
                # journal after it, not both and not neither.
                async with self._gate.change():
                    await self._append_many(records)
                    apply()
                return
            except StoreError as exc:
                log.error("task %s: could not record %s: %s", task.id, what, exc)
                # The status line is short (200 characters): the reason, not the path.
                self.publish_status(
                    Level.ERROR,
                    f"Task {task.id}: could not record {what} ({_reason(exc)}); "
                    f"trying again in {delay:g} s",
                    task,
                )
            await trio.sleep(delay)
            delay = min(delay * 2, RECORD_RETRY_MAX)

    async def journal_checkpoint(self, task: TaskInfo, data: dict[str, Any]) -> None:
        """Journal job-specific progress; returns once it is durable (see
        ``_record_retrying``: a full disk holds the job here, it does not lose the record).

        A task's checkpoints made in one turn of the scheduler go to the journal in one
        append, in the order they were made, written by the first of them. As with an
        append of its own, no caller is answered before its record is durable, and none
        leaves while it may be in the journal's hands; a cancel takes effect while the
        journal refuses, for the caller writing them (its record is taken back, and one
        of the others writes theirs) as for the others."""
        entry = self._entries[task.id]
        progress = {
            "processed_items": task.processed_items,
            "bytes_done": task.bytes_done,
            "bytes_total": task.bytes_total,
        }
        record = {"op": "checkpoint", "id": task.id, "data": data, "set": progress}
        mine = entry.checkpoints_next
        if mine is None:
            mine = entry.checkpoints_next = _Checkpoints()
            mine.add(record, data)
            # The others of this turn join, up to the moment this caller runs again.
            await trio.lowlevel.cancel_shielded_checkpoint()
            if entry.checkpoints_next is mine:
                entry.checkpoints_next = None
            await self._write_checkpoints(entry, mine, record)
            return
        mine.add(record, data)
        await mine.park()
        while not mine.written:
            if not mine.writing:
                # Its writer was cancelled while the journal refused: this caller writes
                # them now, unless it was cancelled too.
                try:
                    await trio.lowlevel.checkpoint_if_cancelled()
                except BaseException:
                    mine.withdraw(record)
                    mine.wake_first()
                    raise
                await self._write_checkpoints(entry, mine, record)
                return
            await mine.park()

    async def _write_checkpoints(
        self, entry: _Entry, checkpoints: _Checkpoints, record: dict[str, Any]
    ) -> None:
        """Write ``checkpoints``, ``record`` among them, and wake their callers; if this
        caller is cancelled before they are durable, take ``record`` back and hand the
        others to one of their callers."""
        checkpoints.writing = True
        try:
            await self._record_retrying(
                entry.task,
                checkpoints.records,
                lambda: entry.checkpoints.extend(checkpoints.data),
                "a checkpoint",
            )
            checkpoints.written = True
            checkpoints.wake()
        except BaseException:
            checkpoints.withdraw(record)
            raise
        finally:
            checkpoints.writing = False
            if not checkpoints.written:
                checkpoints.wake_first()

    def _replay(self, records: list[Any]) -> None:
        for record in records:
            op = record.get("op")
            if op == "create":
                task = converter.structure(record["task"], TaskInfo)
                self._entries[task.id] = _Entry(
                    task,
                    spec=record.get("spec"),
                    checkpoints=list(record.get("checkpoints", [])),
                    cancel_requested=bool(record.get("cancel_requested")),
                )
                continue
            entry = self._entries.get(record.get("id", ""))
            if entry is None:
                continue
            if op in ("update", "checkpoint"):
                for name, value in record.get("set", {}).items():
                    setattr(entry.task, name, _structure_field(name, value))
                if op == "checkpoint":
                    entry.checkpoints.append(record["data"])
            elif op == "checkpoints":
                entry.checkpoints = list(record["data"])
                if "spec" in record:
                    entry.spec = record["spec"]  # a completed task's: none
            elif op == "cancel":
                entry.cancel_requested = True
            elif op == "retry":
                entry.cancel_requested = False
                entry.checkpoints.append(RETRY_CHECKPOINT)
            elif op == "remove":
                del self._entries[record["id"]]
        resumed = 0
        for task_id, entry in sorted(
            self._entries.items(), key=lambda item: item[1].task.created_at
        ):
            task = entry.task
            if task.status.finished:
                # A journal from before progress_of's rule holds 100 for a failed task.
                task.measure()
                entry.done.set()
                continue
            if task.status is TaskStatus.RUNNING:
                task.move_to(TaskStatus.PENDING, self._now())
            if task.status is TaskStatus.PAUSED and not entry.cancel_requested:
                continue  # until a resume
            # Its job is built when it starts (a cancelled one's, to discard its files).
            if task.kind not in self._factories and not entry.cancel_requested:
                task.move_to(TaskStatus.FAILED, self._now())
                task.error = f"cannot resume a task of kind {task.kind!r}"
                entry.done.set()
                continue
            if not entry.cancel_requested:
                self._queue.append(task_id)  # (a cancelled one is finished by serve)
                resumed += 1
        if resumed:
            log.info("resuming %d unfinished tasks from %s", resumed, self._journal_path)

    async def _maybe_compact(self) -> None:
        live = len(self._entries)
        if (
            self._journal is None
            or self._compact_lock.locked()
            or self._journal_records < max(COMPACT_MIN_RECORDS, 2 * live)
        ):
            return
        async with self._compact_lock, self._gate.compaction():
            snapshot = [_snapshot(entry) for entry in self._entries.values()]
            try:
                # Nothing changes the snapshot while the gate is closed, so it can be
                # encoded off the event loop (1,000 tasks of 200 checkpoints: ~1 s).
                await self._journal.compact(snapshot, encode_in_thread=True)
            except StoreError as exc:
                # The journal stays as it was; the next finish or cleanup tries again.
                log.error("could not compact %s: %s", self._journal_path, exc)
                return
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


_Outcome = tuple[TaskStatus, str | None, dict[str, Any] | None]
_STATUS_KEYS = {status: status.value for status in TaskStatus}


class _Claim:
    """One place among an owner's unfinished tasks, held until ``settle()``."""

    def __init__(self, claims: dict[str, int], owner: str) -> None:
        self._claims = claims
        self._owner = owner
        self._held = True

    def settle(self) -> None:
        if not self._held:
            return
        self._held = False
        left = self._claims[self._owner] - 1
        if left:
            self._claims[self._owner] = left
        else:
            del self._claims[self._owner]


def _snapshot(entry: _Entry) -> Any:
    """A task's record for a compaction. A finished one's is the same at every compaction
    until a retry: made and encoded once, not again each time for every finished task."""
    if not entry.task.status.finished:
        return _snapshot_record(entry)
    if entry.kept is None:
        entry.kept = KeptRecord(_snapshot_record(entry))
    return entry.kept


def _snapshot_record(entry: _Entry) -> dict[str, Any]:
    """A task as compaction writes it: what a finished task no longer has is left out."""
    info = entry.task
    if info.result is None:
        task = unstructure(info)
    else:
        # A result is plain JSON already (``Job.run``): a 2,000-item download's, walked by
        # the converter, cost the loop 11 ms at the compaction after its end.
        task = unstructure(attrs.evolve(info, result=None))
        task["result"] = info.result
    if entry.pausing is not None:
        # The pause is journalled and the job still stopping: the task as a replay of the
        # records it replaces would have it.
        task |= _update_record(info, TaskStatus.PAUSED, entry.pausing)["set"]
    record: dict[str, Any] = {"op": "create", "task": task}
    if entry.spec is not None:
        record["spec"] = entry.spec
    if entry.checkpoints:
        record["checkpoints"] = list(entry.checkpoints)
    if entry.cancel_requested:
        record["cancel_requested"] = True
    return record


# A checkpoint that tells a job rebuilt for a retry to forget its failed items' results.
RETRY_CHECKPOINT: dict[str, Any] = {"retry": True}
RECORD_RETRY_FIRST = 1.0
RECORD_RETRY_MAX = 60.0


def _update_record(task: TaskInfo, status: TaskStatus, at: datetime) -> dict[str, Any]:
    """The journal record of ``task`` moving to ``status`` (as ``move_to`` would make it)."""
    moved = attrs.evolve(task, metadata=dict(task.metadata))
    if moved.status is not status:
        moved.move_to(status, at)
    changes: dict[str, Any] = {
        "status": status.value,
        "started_at": moved.started_at,
        "completed_at": moved.completed_at,
    }
    if status.finished or task.status.finished:
        changes |= {
            "error": moved.error,
            "progress": moved.progress,
            "processed_items": moved.processed_items,
            "bytes_done": moved.bytes_done,
            "bytes_total": moved.bytes_total,
            "current_item": moved.current_item,
        }
    changed = unstructure(changes)
    if status.finished or task.status.finished:
        changed["result"] = moved.result  # plain JSON already (``Job.run``): not walked again
    return {"op": "update", "id": task.id, "set": changed}


def _conflict(entry: _Entry, verb: str) -> Conflict:
    task = entry.task
    state = "being cancelled" if entry.cancel_requested else task.status.value
    if entry.finishing:
        state = "finishing"
    return Conflict(
        f"task {task.id} is {state} and cannot be {verb}",
        {"task_id": task.id, "status": task.status.value},
    )


def _reason(exc: StoreError) -> str:
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror[0].lower() + cause.strerror[1:]
    return str(exc)


_DATETIME_FIELDS = {"created_at", "started_at", "completed_at"}


def _structure_field(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _DATETIME_FIELDS:
        return converter.structure(value, datetime)
    if name == "status":
        return TaskStatus(value)
    return value
