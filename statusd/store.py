"""Durable JSON-lines files: append with group commit, torn-tail recovery, compaction.

One record per line, each carrying the CRC32 of its own bytes::

    ["1c291ca3",{"id":"...","title":"..."}]

The CRC covers exactly the bytes between the first comma and the closing bracket (the
record's canonical JSON as written), so a line is checked without re-encoding it. The line
is a two-element array rather than ``{"crc":...,"rec":...}`` because of start-up time: the
decoder makes a list much faster than an object, and a million of them is a quarter of a
second. Now and then the store also writes a *seal* line,
``["...","seal",{"bytes":N,"crc":"..."}]`` (three elements, so never a record): a claim
that the file's first N bytes (everything before the seal) have that CRC32. A seal is
written after every ``SEAL_EVERY`` bytes of appends, at the end of a compacted file and on a
clean close, so that opening a large file checks its sealed part with one ``zlib.crc32``
over the whole prefix and decodes it with one ``json.loads``, and only the lines after the
last seal are checked one by one. A seal that does not hold is ignored (every line is then
checked), so a seal can make opening faster but never lets damage through.

Rules (they are what makes an acknowledged write safe):

- a batch of lines is written with one ``write`` and made durable with one ``fdatasync``
  before any of its appenders is answered; appenders that arrive while a sync runs share
  the next one (group commit), and batches commit in arrival order;
- a failed write or sync is never acknowledged: the file is cut back to its last good
  length and the error goes to every appender of that batch; if even the cut fails, the
  store refuses further appends (a restart then finds what a crash before the
  acknowledgement would have left);
- an append, once called, is not interrupted by cancellation: it returns only after its
  batch has been committed or has failed, so "cancelled" never means "maybe written later";
- on open, bad lines after the last good one are a torn tail (a crash mid-append) and are
  cut off before anything is appended, with the byte count logged; a bad line *before* a
  good one is corruption, and opening refuses with the line and byte offset rather than
  skip it silently;
- compaction writes a temporary file in the same directory, fsyncs it, renames it over the
  store, reopens it and fsyncs the directory; temporary files left by a crash are removed
  on open. Whatever step a crash interrupts, the store is the old file or the new one;
- appends extend the file (``O_APPEND``) rather than overwrite space reserved ahead, though
  a sync that need not commit a new size is a quarter cheaper: the filesystem commits the
  new size only after the data (ext4 ``data=ordered``, XFS), so a crash leaves a prefix of
  the last batch, a torn tail. Pages overwritten in place may reach the disk in any order,
  and a crash could then leave good lines after a hole, which is indistinguishable from
  damage.

Each batch's write and sync, and the rarer compaction and close, run on the store's own
thread (``_Worker``), started with the first of them and stopped on close, in the order
they were asked for: threads stuck elsewhere (DNS lookups on trio's default limiter) must
never hold back a journal write, a store never needs more than one thread, and handing a
job to a thread that waits for it is about a third cheaper than ``trio.to_thread.run_sync``
(docs/bench-daemon.md). The loop hands over what one pass of its scheduler appended at
once. The thread starts the next batch as soon as a sync ends, and wakes the waiters of
the batch it synced with one call into the event loop, where their changes are applied
in the order they appended (docs/bench-daemon.md, "Change: the journal's thread commits
back to back" and "Change: a journal batch per pass of the loop, its changes applied in
one pass"). Opening uses ``trio.to_thread.run_sync`` on the store's limiter. This
module knows nothing of what the records mean (tasks, notifications): it depends on trio
(and its ``outcome``), attrs, the stdlib and ``statusd.errors`` only.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import json
import logging
import os
import queue
import threading
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs
import outcome
import trio

from statusd.errors import StartupError

log = logging.getLogger(__name__)

_PREFIX = b'["'
_REC = b'",'
_SEAL = b'","seal",'
_CLOSE = b"]"
_OLD_PREFIX = b'{"crc":"'  # the format before arrays: refused, never cut as a torn tail
_CRC_AT = len(_PREFIX)
_REC_AT = _CRC_AT + 8
_HEAD = _REC_AT + len(_REC)
_SEAL_HEAD = _REC_AT + len(_SEAL)
TEMP_SUFFIX = ".compact-tmp"
# Bytes of appends after which the next batch also writes a seal: what a crash leaves to
# be checked line by line on the next open.
SEAL_EVERY = 1 << 20

# Records loaded at once from which the collector is told to leave them alone (gc.freeze).
FREEZE_AT = 100_000

# One encoder for every record: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True)

Loads = Callable[[bytes], Any]


class StoreError(Exception):
    """A write or sync failed; the records of that batch were not stored."""


class CorruptStore(StartupError):
    """A bad record is followed by good ones: not a torn tail, so not ours to cut."""


def _line(kind: bytes, body: bytes) -> bytes:
    return b"%s%08x%s%s]\n" % (_PREFIX, zlib.crc32(body), kind, body)


def encode_record(record: Any) -> bytes:
    return _line(_REC, _ENCODER.encode(record).encode())


@attrs.define
class KeptRecord:
    """A record that every compaction writes the same until its owner drops it (a finished
    task): encoded by the first compaction that writes it, its line reused by the next
    ones. A many-file task's record is a 2,000-item result, and each compaction walked and
    encoded every finished task's again (docs/bench-daemon.md)."""

    record: Any  # None once encoded
    _line: bytes | None = None

    def line(self) -> bytes:
        # The record goes once its line is made: it is a copy of the task (unstructure
        # copies a result's every item: about 200 bytes an item, besides the line's 125).
        # Read before the line, as it is cleared after it: an encoding racing another (one
        # on the loop, one in a compaction's thread) then finds either or both.
        record, line = self.record, self._line
        if line is None:
            line = self._line = encode_record(record)
            self.record = None
        return line


def _seal_line(size: int, crc: int) -> bytes:
    return _line(_SEAL, b'{"bytes":%d,"crc":"%08x"}' % (size, crc))


def _check_line(line: bytes) -> tuple[bytes, bytes]:
    """``(kind, body)`` of one line (without its newline) whose checksum holds."""
    if len(line) < _HEAD + 1 or not line.startswith(_PREFIX) or not line.endswith(_CLOSE):
        raise ValueError("not a record line")
    # The seal's marker first: a record's separator is a prefix of it.
    if line.startswith(_SEAL, _REC_AT):
        kind, body = _SEAL, line[_SEAL_HEAD:-1]
    elif line.startswith(_REC, _REC_AT):
        kind, body = _REC, line[_HEAD:-1]
    else:
        raise ValueError("not a record line")
    try:
        expected = int(line[_CRC_AT:_REC_AT], 16)
    except ValueError:
        raise ValueError("bad checksum field") from None
    if zlib.crc32(body) != expected:
        raise ValueError("checksum mismatch")
    return kind, body


def decode_record(line: bytes) -> Any:
    """The record of one line (without its newline), or raise ValueError."""
    kind, body = _check_line(line)
    if kind != _REC:
        raise ValueError("a seal line, not a record")
    return json.loads(body)


@attrs.frozen
class LoadReport:
    records: list[Any]
    cut_bytes: int  # torn tail removed
    removed_temp_files: int
    sealed_bytes: int = 0  # the prefix checked with one CRC (0: every line was checked)


@attrs.frozen
class StoreStatistics:
    path: Path
    size: int
    appends: int
    syncs: int
    compactions: int


@attrs.frozen
class _Loaded:
    report: LoadReport
    size: int
    crc: int  # of the file's first ``size`` bytes
    sealed: int  # end of the last seal


def load(path: Path, *, loads: Loads = json.loads) -> LoadReport:
    """Read every record, cutting a torn tail; raise ``CorruptStore`` on mid-file damage.

    ``loads`` decodes a JSON array given as UTF-8 bytes (``json.loads`` or a faster
    drop-in). Blocking: call it from a thread (``open_store`` does).
    """
    return _load(path, loads).report


def _remove_temp_files(path: Path) -> int:
    removed = 0
    with os.scandir(path.parent) as entries:
        for entry in entries:
            if entry.name.startswith(path.name + ".") and entry.name.endswith(TEMP_SUFFIX):
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
    return removed


def _load(path: Path, loads: Loads) -> _Loaded:
    removed = _remove_temp_files(path) if path.parent.is_dir() else 0
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _Loaded(LoadReport([], 0, removed), 0, 0, 0)
    if data.startswith(_OLD_PREFIX):
        # Every line would look bad, and a file of nothing but bad lines reads as one long
        # torn tail: refuse rather than cut a whole journal away.
        raise CorruptStore(
            f"{path}: written by an earlier development build of statusd (lines "
            '{"crc":...,"rec":...}), which this one does not read: move the file aside'
        )
    sealed, crc = _sealed_prefix(data)
    records: list[Any] = []
    with _collector_paused():
        if sealed:
            try:
                records = _decode_sealed(data, sealed, loads)
            except ValueError:  # cannot happen to a file we wrote; check it line by line
                sealed, crc = 0, 0
        good_end = _check_lines(path, data, sealed, records)
        if len(records) >= FREEZE_AT:
            # A million records live as long as the daemon; left in the young generation,
            # the collector's next passes walk them all (0.8 s for 1M, on whichever thread
            # allocates next). Freezing moves every live object out of its sight; they are
            # still freed by reference counting.
            gc.freeze()
    crc = zlib.crc32(memoryview(data)[sealed:good_end], crc)
    cut = len(data) - good_end
    if cut:
        with path.open("r+b") as handle:
            handle.truncate(good_end)
            os.fsync(handle.fileno())
        log.warning("%s: cut a torn tail of %d bytes left by an interrupted write", path, cut)
    return _Loaded(LoadReport(records, cut, removed, sealed), good_end, crc, sealed)


def _sealed_prefix(data: bytes) -> tuple[int, int]:
    """``(end, crc)``: the end of the last seal line whose claim holds, and the CRC32 of
    the bytes before that end; ``(0, 0)`` when there is none."""
    at = len(data)
    while (at := data.rfind(_SEAL, 0, at)) >= 0:
        start = at - _REC_AT
        end = data.find(b"\n", at)
        if start < 0 or (start > 0 and data[start - 1] != 0x0A) or end < 0:
            continue  # inside a record, or torn: an earlier seal may hold
        try:
            _, body = _check_line(data[start:end])
            claim = json.loads(body)
            size, claimed = claim["bytes"], int(claim["crc"], 16)
        except (ValueError, KeyError, TypeError):
            continue  # a damaged seal line: checking the lines will say what it is
        if size != start or zlib.crc32(memoryview(data)[:start]) != claimed:
            return 0, 0  # damage before the seal: checking every line will find it
        return end + 1, zlib.crc32(memoryview(data)[start : end + 1], claimed)
    return 0, 0


def _decode_sealed(data: bytes, end: int, loads: Loads) -> list[Any]:
    """Every record before ``end``, where every line is known good: one decode of the
    lines as a JSON array (many times faster than a ``loads`` per line)."""
    text = b"".join((b"[", memoryview(data)[: end - 1], b"]")).replace(b"\n", b",")
    lines: list[list[Any]] = loads(text)
    del text
    # [crc, record] or [crc, "seal", claim]
    return [line[1] for line in lines if len(line) == 2]


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a million records are made: none of them
    is garbage, but each full collection would walk them all (6 s of 9 for 1.3M lines).
    The collector is process-wide: of two pauses at once (two stores opened together),
    the first to end enables it again, so one may end early; none leaves it off."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _check_lines(path: Path, data: bytes, offset: int, records: list[Any]) -> int:
    """Check the lines from ``offset`` one by one, adding their records to ``records``;
    return where the good lines end. Raise ``CorruptStore`` if a bad line has good ones
    after it."""
    good_end = offset
    first_bad: int | None = None
    while offset < len(data):
        end = data.find(b"\n", offset)
        line_end = end if end >= 0 else len(data)
        try:
            if end < 0:
                raise ValueError("no newline")
            kind, body = _check_line(data[offset:line_end])
            record = json.loads(body) if kind == _REC else None
        except ValueError:
            if first_bad is None:
                first_bad = offset
        else:
            if first_bad is not None:
                number = data.count(b"\n", 0, first_bad) + 1
                raise CorruptStore(
                    f"{path}: line {number} (byte {first_bad}) is damaged and good lines "
                    "follow it, so it is not a torn write: move the file aside to start "
                    "empty, or repair it"
                )
            if kind == _REC:
                records.append(record)
            good_end = line_end + 1
        offset = line_end + 1
    return good_end


class ChangeGate:
    """Keeps a compaction's snapshot exact: changes and compactions exclude each other.

    A *change* is a journal append together with the in-memory update it stands for; a
    compaction rewrites the file from a snapshot of memory. If a snapshot were taken while
    a change is half done (appended, not yet applied, or the other way round), the rewrite
    could drop an acknowledged record or write one that was never acknowledged. So a
    compaction waits until no change is in progress, and changes that start meanwhile wait
    until it is over. Changes never wait for each other. A change must not start another
    change (it would wait for a compaction that waits for it).
    """

    def __init__(self) -> None:
        self._changes = 0
        self._compacting = False
        self._idle = trio.Event()
        self._resumed = trio.Event()

    @property
    def compacting(self) -> bool:
        return self._compacting

    def change(self, after: Callable[[], None] | None = None) -> Change:
        """``async with gate.change():`` around a change; no checkpoint unless a
        compaction is in progress. ``after`` is called once a change has ended without
        an exception."""
        return Change(self, after)

    @contextlib.asynccontextmanager
    async def compaction(self) -> AsyncIterator[None]:
        """Entered once no change is in progress; no change starts until it is left."""
        if self._compacting:
            raise RuntimeError("a compaction is already in progress")
        self._compacting = True
        self._resumed = trio.Event()
        try:
            while self._changes:
                self._idle = trio.Event()
                await self._idle.wait()
            yield
        finally:
            self._compacting = False
            self._resumed.set()


class Change:
    """A class rather than a generator: entered and left on every journalled change, and a
    generator-based context manager costs several times as much."""

    __slots__ = ("_after", "_gate")

    def __init__(self, gate: ChangeGate, after: Callable[[], None] | None) -> None:
        self._gate = gate
        self._after = after

    async def __aenter__(self) -> None:
        gate = self._gate
        while gate._compacting:
            await gate._resumed.wait()
        gate._changes += 1

    async def __aexit__(self, error_type: type[BaseException] | None, *_: object) -> None:
        gate = self._gate
        gate._changes -= 1
        if not gate._changes:
            gate._idle.set()
        if error_type is None and self._after is not None:
            self._after()


# An append (its lines' bytes and how many lines) or a job (a callable and 0), the task
# that waits for it, and what to apply once it is durable (see ``_Worker``).
_Item = tuple[bytes | Callable[[], Any], int, trio.lowlevel.Task, Callable[[], None] | None]
# What the loop hands the thread at once: the items of one pass of its scheduler, and the
# run to wake their tasks in.
_HandOver = tuple[trio.lowlevel.TrioToken, list[_Item]]
_Result = tuple[trio.lowlevel.Task, outcome.Outcome[Any], Callable[[], None] | None]
_Results = list[_Result]


class _Worker:
    """One thread that writes a store's appends, and runs its rarer jobs (compaction,
    close), one at a time in the order they were handed over, while the callers wait.

    Group commit happens here: whatever the thread finds queued when it is free, it takes at
    once, and the appends among it are committed together (``commit``: one write, one sync),
    so a batch starts as soon as the one before it is synced, without waiting for the event
    loop. The loop hands over what its tasks appended in one pass of its scheduler together,
    just before it next waits for I/O (``_PassEnd``): a thread that is idle would otherwise
    wake at the first append of a pass, sync it alone, and leave the rest of the pass to
    wait for that sync. The thread hands each batch's results to the loop with one call, and
    the callers resume in the order they were queued, across batches: a caller that applies
    its change to memory before its next checkpoint applies it in journal order. A caller
    that gave ``then`` (its change to memory) has it applied on the loop as soon as every
    earlier caller's change is, and is woken without waiting for anyone to resume; a caller
    without one is woken alone, and the next are woken once it has resumed (trio runs tasks
    woken together in either order), those with a change once it has run to its next
    checkpoint. So a batch whose callers all gave ``then`` is applied in order and answered
    in one pass of the scheduler, instead of one pass per caller. Callers wait without a
    cancellation point: whoever handed something over waits for it, so nobody leaves while
    their batch is written.
    """

    def __init__(self, name: str, commit: Callable[[bytes, int], None]) -> None:
        self._name = name
        self._commit = commit
        self._items: queue.SimpleQueue[_HandOver | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # The loop's side: what this pass of the scheduler handed over, the run whose
        # passes hand it to the thread, callers whose work is done, to resume in order, and
        # whether a resumed caller is yet to wake the next one.
        self._passing: list[_Item] = []
        self._pass_end: _PassEnd | None = None
        self._done: collections.deque[_Result] = collections.deque()
        self._waking = False

    async def append(
        self, data: bytes, lines: int, then: Callable[[], None] | None = None
    ) -> Exception | None:
        """Commit ``data`` (``lines`` lines) with whatever else is queued; the error that
        failed the batch, or None once it is durable (and ``then`` has been called, in
        journal order: an exception from it is raised here)."""
        error: Exception | None = await self._wait(data, lines, then)
        return error

    async def run(self, job: Callable[[], Any]) -> Any:
        """Run ``job`` in the thread after everything handed over before it."""
        return await self._wait(job, 0, None)

    async def _wait(
        self, work: bytes | Callable[[], Any], lines: int, then: Callable[[], None] | None
    ) -> Any:
        if self._thread is None:
            # A daemon thread: a store nobody closed must not keep the process alive.
            self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
            self._thread.start()
        token = trio.lowlevel.current_trio_token()
        if self._pass_end is None or self._pass_end.token is not token:
            self._pass_end = _PassEnd(self, token)
            trio.lowlevel.add_instrument(self._pass_end)
        self._passing.append((work, lines, trio.lowlevel.current_task(), then))
        try:
            return await trio.lowlevel.wait_task_rescheduled(_cannot_abort)
        finally:
            if then is None:  # this caller was woken alone: the next are this one's to wake
                done = self._done
                if done and done[0][2] is not None:
                    # Their changes may be applied only after this caller's own, which it
                    # applies before its next checkpoint: from another task, so later.
                    token.run_sync_soon(self._wake_next)
                else:
                    self._wake_next()

    def hand_over(self, token: trio.lowlevel.TrioToken) -> None:
        """On the loop, between two passes of its scheduler: give the thread what this
        pass appended."""
        if self._passing:
            self._items.put((token, self._passing))
            self._passing = []

    def _finished(self, results: _Results) -> None:
        """On the loop: ``results`` are done, in order."""
        self._done.extend(results)
        if not self._waking:
            self._wake_next()

    def _wake_next(self) -> None:
        """Wake callers in order, up to and including the next one woken alone; only
        while none woken alone is yet to run to its next checkpoint."""
        done = self._done
        while done:
            task, result, then = done.popleft()
            if then is None:
                self._waking = True
                trio.lowlevel.reschedule(task, result)
                return
            if type(result) is outcome.Value and result.value is None:
                try:
                    then()
                except Exception as exc:  # the caller's own failure: it goes to the caller
                    result = outcome.Error(exc)
            trio.lowlevel.reschedule(task, result)
        self._waking = False

    def _serve(self) -> None:
        items = self._items
        while True:
            taken = [items.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    taken.append(items.get_nowait())
            results: _Results = []
            batch: list[_Item] = []
            token: trio.lowlevel.TrioToken | None = None
            stop = False
            for handed in taken:
                if handed is None:
                    stop = True
                    break
                token, handed_items = handed
                for item in handed_items:
                    if type(item[0]) is bytes:
                        batch.append(item)
                        continue
                    self._commit_batch(batch, results)
                    batch = []
                    job, _, task, _ = item
                    assert callable(job)
                    results.append((task, outcome.capture(job), None))
            self._commit_batch(batch, results)
            if token is not None and results:
                # A run cannot end under a waiting caller; should it, nobody is left to tell.
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(self._finished, results)
            if stop:
                return

    def _commit_batch(self, batch: list[_Item], results: _Results) -> None:
        if not batch:
            return
        data = b"".join(item[0] for item in batch)  # type: ignore[misc]
        error: Exception | None = None
        try:
            self._commit(data, sum(item[1] for item in batch))
        except Exception as exc:  # whatever it is, it goes to the batch's callers
            error = exc
        results.extend((item[2], outcome.Value(error), item[3]) for item in batch)

    def stop(self) -> None:
        """Let the thread end once it has run what it was given (no wait)."""
        pass_end, self._pass_end = self._pass_end, None
        if pass_end is not None and pass_end.token is not None:
            self.hand_over(pass_end.token)  # nothing is left unsaid before the thread ends
            pass_end.token = None
            with contextlib.suppress(KeyError, RuntimeError):  # another run, or none
                trio.lowlevel.remove_instrument(pass_end)
        if self._thread is not None:
            self._items.put(None)
            self._thread = None


class _PassEnd(trio.abc.Instrument):
    """Calls ``hand_over`` of a store's worker before each wait of the loop for I/O (so
    after each pass of its scheduler), in the run it was added to."""

    def __init__(self, worker: _Worker, token: trio.lowlevel.TrioToken) -> None:
        self._worker = worker
        self.token: trio.lowlevel.TrioToken | None = token

    def before_io_wait(self, timeout: float) -> None:
        if self.token is not None:
            self._worker.hand_over(self.token)


def _cannot_abort(_: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


class JsonLinesStore:
    """An append-only file of checksummed JSON records. Open with ``open_store``."""

    def __init__(self, path: Path, fd: int, loaded: _Loaded, limiter: trio.CapacityLimiter) -> None:
        self.path = path
        self._fd = fd
        self._limiter = limiter
        self._size = loaded.size
        self._crc = loaded.crc
        self._sealed = loaded.sealed
        self._appends = 0
        self._syncs = 0
        self._compactions = 0
        self._closed = False  # no more appends are taken
        self._closing: trio.Event | None = None
        self._fd_closed = False
        self._broken: str | None = None
        self._worker = _Worker(f"statusd-store-{path.name}", self._write_and_sync)

    async def append(self, record: Any, then: Callable[[], None] | None = None) -> None:
        """Return once ``record`` is on disk (fdatasync'd); raise ``StoreError`` if not.
        ``then`` as for ``append_many``."""
        await self.append_many([record], then)

    async def append_many(
        self, records: Iterable[Any], then: Callable[[], None] | None = None
    ) -> None:
        """Return once every record is on disk, written together; raise ``StoreError`` if
        none is. Not interrupted by cancellation once called.

        ``then`` (the change the records stand for, applied to memory) is called on the
        event loop once they are durable and every earlier append's change has been
        applied, before this returns; so changes given this way are applied in journal
        order, with no checkpoint between the durable write and the change. What it
        raises, this raises. Not called if the write failed."""
        lines = [encode_record(record) for record in records]
        if not lines:
            return
        if self._closed:
            raise StoreError(f"{self.path}: store is closed")
        data = lines[0] if len(lines) == 1 else b"".join(lines)
        error = await self._worker.append(data, len(lines), then)
        if error is not None:
            raise StoreError(f"{self.path}: {error}") from error

    def _write_and_sync(self, data: bytes, lines: int) -> None:
        if self._fd_closed:
            raise StoreError("store is closed")
        if self._broken is not None:
            raise StoreError(self._broken)
        start = self._size
        size = start + len(data)
        crc = zlib.crc32(data, self._crc)
        seal = b""
        if size - self._sealed >= SEAL_EVERY:
            seal = _seal_line(size, crc)
            crc = zlib.crc32(seal, crc)
        try:
            _write_all(self._fd, data + seal if seal else data)
            os.fdatasync(self._fd)
        except OSError:
            self._cut_back(start)
            raise
        if seal:
            self._sealed = size + len(seal)
        self._size = size + len(seal)
        self._crc = crc
        self._appends += lines
        self._syncs += 1

    def _cut_back(self, size: int) -> None:
        """Never leave an unacknowledged record behind for the next open to find."""
        try:
            os.ftruncate(self._fd, size)
            os.fdatasync(self._fd)
        except OSError as exc:
            # The file may now hold bytes we did not acknowledge; appending after them would
            # bury them mid-file. The next open treats them as a crash before the
            # acknowledgement would: a partial line is cut, a complete one kept.
            self._broken = f"a failed write could not be cut back ({exc}); restart to recover"
            log.exception("%s: could not cut back a failed write", self.path)

    async def compact(self, records: Iterable[Any], *, encode_in_thread: bool = False) -> None:
        """Replace the file's contents with ``records`` atomically.

        Appends made before this call are written before the rewrite, later ones after it.
        ``records`` are encoded now, on the event loop (~6 us each: a million records hold
        it for seconds), unless ``encode_in_thread``: then they are encoded in the worker
        thread, and must not change until this returns (make them for the snapshot). A
        ``KeptRecord`` is encoded once, by the first compaction given it.
        """
        items = list(records)
        data = b"" if encode_in_thread else _encode_all(items)
        if self._closed:
            raise StoreError(f"{self.path}: store is closed")
        # Appends handed over before this call are committed before the rewrite, later
        # ones after it: the worker takes everything in order.
        try:
            if encode_in_thread:
                await self._worker.run(lambda: self._encode_and_rewrite(items))
            else:
                await self._worker.run(lambda: self._rewrite(data))
        except OSError as exc:
            raise StoreError(f"{self.path}: compaction failed: {exc}") from exc
        except StoreError as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        self._compactions += 1

    def _encode_and_rewrite(self, records: list[Any]) -> None:
        self._rewrite(_encode_all(records))

    def _rewrite(self, data: bytes) -> None:
        if self._fd_closed:
            raise StoreError("store is closed")
        crc = zlib.crc32(data)
        data += _seal_line(len(data), crc)
        temp = self.path.with_name(f"{self.path.name}.{os.getpid()}{TEMP_SUFFIX}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, self.path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        try:
            new_fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError as exc:
            # Our descriptor is the old, now unlinked file: appends there would be lost.
            self._broken = f"cannot reopen after compaction ({exc}); restart to recover"
            raise
        os.close(self._fd)
        self._fd = new_fd
        self._size = self._sealed = len(data)
        self._crc = zlib.crc32(data)
        self._broken = None  # whatever went wrong before, the file is now exactly ``data``
        # The rename is durable only once the directory entry is.
        _fsync_directory(self.path.parent)

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(self.path, self._size, self._appends, self._syncs, self._compactions)

    async def aclose(self) -> None:
        """Seal what was appended (so the next open is fast) and close the file, once
        every append handed over before has been committed."""
        if self._closing is not None:
            await self._closing.wait()
            return
        self._closed = True
        self._closing = trio.Event()
        try:
            await self._worker.run(self._seal_and_close)
        finally:
            self._worker.stop()
            self._closing.set()

    def _seal_and_close(self) -> None:
        self._fd_closed = True
        try:
            if self._broken is None and self._size > self._sealed:
                try:
                    _write_all(self._fd, _seal_line(self._size, self._crc))
                    os.fdatasync(self._fd)
                except OSError:
                    # Every record is already durable; only the seal is missing.
                    log.warning("%s: could not seal on close", self.path, exc_info=True)
                    self._cut_back(self._size)
        finally:
            os.close(self._fd)


def _encode_all(records: list[Any]) -> bytes:
    return b"".join(
        record.line() if isinstance(record, KeptRecord) else encode_record(record)
        for record in records
    )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_sync(
    path: Path, loads: Loads, limiter: trio.CapacityLimiter
) -> tuple[JsonLinesStore, LoadReport]:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    loaded = _load(path, loads)
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if created:
        _fsync_directory(path.parent)
    return JsonLinesStore(path, fd, loaded, limiter), loaded.report


async def open_store(path: Path, *, loads: Loads = json.loads) -> tuple[JsonLinesStore, LoadReport]:
    """Open (creating if needed) the store at ``path`` and read its records.

    ``loads`` is as for ``load``.
    """
    # One thread at a time is all a store uses: its writes are serialized by its lock.
    limiter = trio.CapacityLimiter(1)
    return await trio.to_thread.run_sync(_open_sync, path, loads, limiter, limiter=limiter)
