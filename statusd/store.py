"""Durable JSON-lines files: append with group commit, torn-tail recovery, compaction.

One record per line, each carrying a CRC32 of its own bytes::

    {"crc":"1c291ca3","rec":{"id":"...","title":"..."}}

The CRC covers exactly the bytes between ``"rec":`` and the closing brace, so a line is
checked without re-encoding it. Rules (they are what makes an acknowledged write safe):

- a batch of lines is written with one ``write`` and made durable with one ``fdatasync``
  before any of its appenders is answered; appenders that arrive while a sync runs share
  the next one (group commit);
- a failed write or sync is never acknowledged: the file is cut back to its last good
  length and the error goes to every appender of that batch;
- on open, bad lines after the last good record are a torn tail (a crash mid-append) and
  are cut off, with the byte count logged; a bad line *before* a good record is corruption,
  and opening refuses with the line and byte offset rather than skip it silently;
- compaction writes a temporary file in the same directory, fsyncs it, renames it over the
  store and fsyncs the directory; temporary files left by a crash are removed on open.

Blocking file work runs in ``trio.to_thread.run_sync``, one call per batch.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import trio

from statusd.errors import StartupError

log = logging.getLogger(__name__)

_PREFIX = b'{"crc":"'
_MIDDLE = b'","rec":'
_HEAD = len(_PREFIX) + 8 + len(_MIDDLE)
TEMP_SUFFIX = ".compact-tmp"


class StoreError(Exception):
    """A write or sync failed; the records of that batch were not stored."""


class CorruptStore(StartupError):
    """A bad record is followed by good ones: not a torn tail, so not ours to cut."""


def encode_record(record: Any) -> bytes:
    body = json.dumps(record, separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode()
    return b"%s%08x%s%s}\n" % (_PREFIX, zlib.crc32(body), _MIDDLE, body)


def decode_record(line: bytes) -> Any:
    """The record of one line (without its newline), or raise ValueError."""
    if len(line) < _HEAD + 1 or not line.startswith(_PREFIX) or not line.endswith(b"}"):
        raise ValueError("not a record line")
    if line[len(_PREFIX) + 8 : _HEAD] != _MIDDLE:
        raise ValueError("not a record line")
    body = line[_HEAD:-1]
    try:
        expected = int(line[len(_PREFIX) : len(_PREFIX) + 8], 16)
    except ValueError:
        raise ValueError("bad checksum field") from None
    if zlib.crc32(body) != expected:
        raise ValueError("checksum mismatch")
    return json.loads(body)


@attrs.frozen
class LoadReport:
    records: list[Any]
    cut_bytes: int  # torn tail removed
    removed_temp_files: int


@attrs.frozen
class StoreStatistics:
    path: Path
    size: int
    appends: int
    syncs: int
    compactions: int


def load(path: Path) -> LoadReport:
    """Read every record, cutting a torn tail; raise ``CorruptStore`` on mid-file damage.

    Blocking: call it from a thread (``open_store`` does).
    """
    removed = 0
    for leftover in path.parent.glob(path.name + "*" + TEMP_SUFFIX):
        leftover.unlink(missing_ok=True)
        removed += 1
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return LoadReport([], 0, removed)
    records: list[Any] = []
    good_end = 0
    first_bad: tuple[int, int] | None = None  # (line number, byte offset)
    offset = 0
    number = 0
    while offset < len(data):
        number += 1
        end = data.find(b"\n", offset)
        complete = end >= 0
        line_end = end if complete else len(data)
        try:
            if not complete:
                raise ValueError("no newline")
            record = decode_record(data[offset:line_end])
        except ValueError:
            if first_bad is None:
                first_bad = (number, offset)
        else:
            if first_bad is not None:
                bad_line, bad_offset = first_bad
                raise CorruptStore(
                    f"{path}: record {bad_line} at byte {bad_offset} is damaged and good records "
                    "follow it; this is not a torn write. Move the file aside to start empty, "
                    "or repair it."
                )
            records.append(record)
            good_end = line_end + 1
        offset = line_end + 1
    cut = len(data) - good_end
    if cut:
        with path.open("r+b") as handle:
            handle.truncate(good_end)
            os.fsync(handle.fileno())
        log.warning("%s: cut a torn tail of %d bytes left by an interrupted write", path, cut)
    return LoadReport(records, cut, removed)


@attrs.define
class _Batch:
    lines: list[bytes] = attrs.Factory(list)
    done: bool = False
    error: BaseException | None = None


class JsonLinesStore:
    """An append-only file of checksummed JSON records. Open with ``open_store``."""

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self._fd = fd
        self._size = size
        self._lock = trio.Lock()  # FIFO: batches commit in arrival order
        self._batch = _Batch()
        self._appends = 0
        self._syncs = 0
        self._compactions = 0
        self._closed = False

    async def append(self, record: Any) -> None:
        """Return once ``record`` is on disk (fdatasync'd); raise ``StoreError`` if not."""
        await self.append_many([record])

    async def append_many(self, records: Iterable[Any]) -> None:
        lines = [encode_record(record) for record in records]
        if not lines:
            return
        if self._closed:
            raise StoreError(f"{self.path}: store is closed")
        batch = self._batch
        batch.lines.extend(lines)
        async with self._lock:
            if not batch.done:
                # First of this batch to get the lock: commit everything queued so far.
                # Later arrivals go to the next batch and share its sync.
                self._batch = _Batch()
                with trio.CancelScope(shield=True):
                    await self._commit(batch)
        if batch.error is not None:
            raise StoreError(f"{self.path}: {batch.error}") from batch.error

    async def _commit(self, batch: _Batch) -> None:
        data = b"".join(batch.lines)
        try:
            await trio.to_thread.run_sync(self._write_and_sync, data)
        except OSError as exc:
            batch.error = exc
        else:
            self._appends += len(batch.lines)
            self._syncs += 1
        batch.done = True

    def _write_and_sync(self, data: bytes) -> None:
        start = self._size
        try:
            _write_all(self._fd, data)
            os.fdatasync(self._fd)
        except OSError:
            # Never leave an unacknowledged record behind for the next open to find.
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                log.exception("%s: could not cut back a failed write", self.path)
            raise
        self._size = start + len(data)

    async def compact(self, records: Iterable[Any]) -> None:
        """Replace the file's contents with ``records`` atomically."""
        data = b"".join(encode_record(record) for record in records)
        async with self._lock:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._rewrite, data)
        self._compactions += 1

    def _rewrite(self, data: bytes) -> None:
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
        # The rename is durable only once the directory entry is.
        _fsync_directory(self.path.parent)
        new_fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        os.close(self._fd)
        self._fd = new_fd
        self._size = len(data)

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(self.path, self._size, self._appends, self._syncs, self._compactions)

    async def aclose(self) -> None:
        async with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)


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


def _open_sync(path: Path) -> tuple[JsonLinesStore, LoadReport]:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    report = load(path)
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if created:
        _fsync_directory(path.parent)
    size = os.fstat(fd).st_size
    return JsonLinesStore(path, fd, size), report


async def open_store(path: Path) -> tuple[JsonLinesStore, LoadReport]:
    """Open (creating if needed) the store at ``path`` and read its records."""
    return await trio.to_thread.run_sync(_open_sync, path)
