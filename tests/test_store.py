"""The durable JSON-lines store: checksums, torn tails, corruption, group commit, seals,
compaction, and what a failed write, a failed sync, a full disk or a crash leaves behind.

Real files throughout; failures of the kernel (EIO from fdatasync, a failing rename) are
injected by wrapping the ``os`` function, a full disk is a real small tmpfs (root only).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

import statusd.store
from statusd.store import (
    TEMP_SUFFIX,
    ChangeGate,
    CorruptStore,
    StoreError,
    decode_record,
    encode_record,
    load,
    open_store,
)

RECORDS: list[Any] = [{"id": n, "title": f"record {n}", "text": "é" * n} for n in range(6)]


def write_records(path: Path, records: list[Any]) -> bytes:
    """A file of records as the store writes them, without a seal."""
    data = b"".join(encode_record(r) for r in records)
    path.write_bytes(data)
    return data


async def store_records(path: Path, records: list[Any]) -> bytes:
    """A file written through the store and closed cleanly: it ends with a seal."""
    store, _ = await open_store(path)
    await store.append_many(records)
    await store.aclose()
    return path.read_bytes()


def line_starts(data: bytes) -> list[int]:
    return [0, *(m.end() for m in re.finditer(b"\n", data))][:-1]


def seal_line(size: int, claimed_crc: int) -> bytes:
    """A seal written by hand, to pin the format down."""
    body = b'{"bytes":%d,"crc":"%08x"}' % (size, claimed_crc)
    return b'["%08x","seal",%s]\n' % (zlib.crc32(body), body)


def fail_once(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    error: int,
    *,
    when: Callable[..., bool] = lambda *args: True,
    after: int = 0,
) -> list[int]:
    """Make ``os.<name>`` raise ``OSError(error)`` once, on its ``after``+1-th matching
    call; returns a list counting every call."""
    real = getattr(os, name)
    calls: list[int] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if when(*args):
            calls.append(1)
            if len(calls) == after + 1:
                raise OSError(error, os.strerror(error))
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, wrapper)
    return calls


def count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    real = getattr(os, name)
    calls: list[int] = []

    def wrapper(*args: Any) -> Any:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(os, name, wrapper)
    return calls


class HeldSync:
    """Holds the first ``os.fdatasync`` in its worker thread until released, so a test can
    line appenders (and a compaction) up behind a commit in progress."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._gate = threading.Event()
        self._real = os.fdatasync
        self._first = True
        monkeypatch.setattr(os, "fdatasync", self._sync)

    def _sync(self, fd: int) -> None:
        if self._first:
            self._first = False
            assert self._gate.wait(10), "the test never released the held sync"
        self._real(fd)

    def release(self) -> None:
        self._gate.set()


# -- the line format ------------------------------------------------------------------------


def test_record_round_trip_and_checksum() -> None:
    line = encode_record({"b": 1, "a": "x"})
    assert line == b'["%08x",{"a":"x","b":1}]\n' % zlib.crc32(b'{"a":"x","b":1}')
    assert decode_record(line[:-1]) == {"a": "x", "b": 1}
    damaged = line.replace(b'"x"', b'"y"')
    with pytest.raises(ValueError, match="checksum mismatch"):
        decode_record(damaged[:-1])
    with pytest.raises(ValueError, match="a seal line, not a record"):
        decode_record(seal_line(0, 0)[:-1])


# -- torn and garbage tails -------------------------------------------------------------------


@pytest.mark.parametrize("sealed", [False, True], ids=["unsealed", "sealed"])
async def test_a_tail_cut_at_every_byte_loses_and_doubles_nothing(
    tmp_path: Path, sealed: bool
) -> None:
    """A crash mid-append, at every byte of the last record (and of the seal after it):
    open, append, reopen: exactly the complete records, then the new one."""
    path = tmp_path / "store.jsonl"
    full = await store_records(path, RECORDS) if sealed else write_records(path, RECORDS)
    starts = line_starts(full)
    last_record = starts[len(RECORDS) - 1]
    last_record_end = starts[len(RECORDS)] if sealed else len(full)
    for cut in range(last_record, len(full)):
        path.write_bytes(full[:cut])
        complete = RECORDS if cut >= last_record_end else RECORDS[:-1]
        good_end = last_record_end if cut >= last_record_end else last_record
        store, report = await open_store(path)
        assert report.records == complete
        assert report.cut_bytes == cut - good_end
        assert path.read_bytes() == full[:good_end]  # cut before any append
        await store.append({"after": cut})
        await store.aclose()
        assert load(path).records == [*complete, {"after": cut}]


GARBAGE = {
    "4 KiB of zeros": b"\0" * 4096,
    "4 KiB of random bytes": random.Random(4).randbytes(4096),
    "empty lines and objects": b"\n\n{}\n" * 100,
    "a whole line with a bad checksum": encode_record({"id": 99}).replace(b"99", b"98"),
}


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
@pytest.mark.parametrize("sealed", [False, True], ids=["unsealed", "sealed"])
async def test_a_garbage_tail_is_cut_before_the_next_append(
    tmp_path: Path, garbage: bytes, sealed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "store.jsonl"
    full = await store_records(path, RECORDS) if sealed else write_records(path, RECORDS)
    path.write_bytes(full + garbage)
    store, report = await open_store(path)
    assert report.records == RECORDS
    assert report.cut_bytes == len(garbage)
    assert path.read_bytes() == full
    assert f"cut a torn tail of {len(garbage)} bytes" in caplog.text
    await store.append({"after": True})
    await store.aclose()
    assert load(path).records == [*RECORDS, {"after": True}]


# -- damage before good records -------------------------------------------------------------


@pytest.mark.parametrize("sealed", [False, True], ids=["unsealed", "sealed"])
async def test_a_flipped_byte_before_good_records_refuses_to_open(
    tmp_path: Path, sealed: bool
) -> None:
    path = tmp_path / "store.jsonl"
    full = await store_records(path, RECORDS) if sealed else write_records(path, RECORDS)
    starts = [*line_starts(full), len(full)]
    # Every record that has a good line after it (in a sealed file: every record).
    damageable = len(RECORDS) if sealed else len(RECORDS) - 1
    for index in range(damageable):
        damaged = bytearray(full)
        damaged[(starts[index] + starts[index + 1]) // 2] ^= 0x01
        path.write_bytes(damaged)
        expected = (
            f"{path}: line {index + 1} (byte {starts[index]}) is damaged and good lines "
            "follow it, so it is not a torn write: move the file aside to start empty, "
            "or repair it"
        )
        with pytest.raises(CorruptStore, match=f"^{re.escape(expected)}$"):
            await open_store(path)
        assert path.read_bytes() == damaged  # nothing cut, nothing appended


async def test_a_damaged_seal_at_the_end_is_cut_like_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "store.jsonl"
    full = await store_records(path, RECORDS)
    seal_start = line_starts(full)[-1]
    damaged = bytearray(full)
    damaged[-5] ^= 0x01
    path.write_bytes(damaged)
    report = load(path)
    assert report.records == RECORDS
    assert report.cut_bytes == len(full) - seal_start


# -- seals ----------------------------------------------------------------------------------


async def test_a_large_store_is_sealed_and_decoded_in_one_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(statusd.store, "SEAL_EVERY", 300)
    path = tmp_path / "store.jsonl"
    records = [{"n": n, "pad": "x" * 50} for n in range(40)]
    store, _ = await open_store(path)
    for record in records:
        await store.append(record)
    full = path.read_bytes()
    assert full.count(b'","seal",') >= 5  # written along the way, not only on close
    await store.aclose()

    decoded: list[bytes] = []

    def counting_loads(text: bytes) -> Any:
        decoded.append(text)
        return json.loads(text)

    report = load(path, loads=counting_loads)
    assert report.records == records
    assert report.sealed_bytes == path.stat().st_size
    assert len(decoded) == 1  # the whole file at once, not a loads per line
    # The same lines without their seals: every line checked, the same records.
    unsealed = b"".join(
        line for line in path.read_bytes().splitlines(keepends=True) if b'","seal",' not in line
    )
    path.write_bytes(unsealed)
    assert load(path) == statusd.store.LoadReport(records, 0, 0, 0)


async def test_a_seal_that_does_not_hold_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "store.jsonl"
    data = write_records(path, RECORDS)
    path.write_bytes(data + seal_line(len(data), zlib.crc32(data) ^ 1))
    report = load(path)
    assert (report.records, report.sealed_bytes, report.cut_bytes) == (RECORDS, 0, 0)
    path.write_bytes(data + seal_line(len(data) - 1, zlib.crc32(data[:-1])))
    assert load(path).sealed_bytes == 0
    path.write_bytes(data + seal_line(len(data), zlib.crc32(data)))
    assert load(path).sealed_bytes == path.stat().st_size


async def test_a_record_that_looks_like_a_seal_is_a_record(tmp_path: Path) -> None:
    path = tmp_path / "store.jsonl"
    tricky = [
        "seal",
        ["seal", {"bytes": 0, "crc": "00000000"}],
        {"b": '","seal",{'},
        {"a": "", "seal": {"bytes": 0, "crc": "00000000"}},
    ]
    await store_records(path, [*RECORDS, *tricky])
    report = load(path)
    assert report.records == [*RECORDS, *tricky]
    assert report.sealed_bytes == path.stat().st_size


# -- appends --------------------------------------------------------------------------------


async def test_append_is_durable_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "state" / "store.jsonl"
    store, report = await open_store(path)
    assert report.records == []
    for record in RECORDS:
        await store.append(record)
    assert store.statistics().size == path.stat().st_size
    await store.aclose()
    assert load(path).records == RECORDS
    assert (path.stat().st_mode & 0o777) == 0o600
    with pytest.raises(StoreError, match="store is closed"):
        await store.append({"late": True})


async def test_concurrent_appenders_share_syncs_and_are_acknowledged_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "store.jsonl"
    store, _ = await open_store(path)
    syncs = count_calls(monkeypatch, "fdatasync")
    called: list[int] = []
    acknowledged: list[int] = []

    async def appender(n: int) -> None:
        called.append(n)
        await store.append({"n": n})
        acknowledged.append(n)

    async with trio.open_nursery() as nursery:
        for n in range(64):
            nursery.start_soon(appender, n)
    assert len(syncs) <= 4  # the first appender alone, then the rest together
    assert store.statistics().syncs == len(syncs)
    assert store.statistics().appends == 64
    assert acknowledged == called
    await store.aclose()
    assert [r["n"] for r in load(path).records] == called


async def test_every_appender_is_answered_only_after_a_sync_covered_its_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Appends arriving while a sync runs are written and synced together by the next
    # commit: each must be answered after a sync that covered its own line, never before.
    path = tmp_path / "store.jsonl"
    store, _ = await open_store(path)
    synced: list[int] = []  # the file's size at the end of each sync
    real_sync = os.fdatasync

    def sync(fd: int) -> None:
        real_sync(fd)
        synced.append(os.fstat(fd).st_size)

    monkeypatch.setattr(os, "fdatasync", sync)

    async def appender(n: int) -> None:
        for k in range(5):
            if k:  # all together first (they share syncs), then at random moments
                await trio.sleep(random.random() / 1000)
            await store.append({"n": n, "k": k})
            durable = path.read_bytes()[: max(synced)]
            assert f'"k":{k},"n":{n}}}'.encode() in durable

    async with trio.open_nursery() as nursery:
        for n in range(32):
            nursery.start_soon(appender, n)
    assert store.statistics().appends == 160
    assert store.statistics().syncs < 160  # some batches held more than one append
    await store.aclose()
    assert len(load(path).records) == 160


async def test_a_closed_store_leaves_no_thread_behind(tmp_path: Path) -> None:
    def store_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "statusd-store-store.jsonl"]

    before = store_threads()
    store, _ = await open_store(tmp_path / "store.jsonl")
    await store.append({"n": 1})
    [thread] = set(store_threads()) - set(before)
    await store.aclose()
    await trio.to_thread.run_sync(thread.join, 10)
    assert not thread.is_alive()


async def test_a_failed_sync_is_not_acknowledged_and_leaves_the_file_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "store.jsonl"
    store, _ = await open_store(path)
    await store.append(RECORDS[0])
    before = path.read_bytes()
    fail_once(monkeypatch, "fdatasync", errno.EIO)
    with pytest.raises(StoreError, match="Input/output error"):
        await store.append(RECORDS[1])
    assert path.read_bytes() == before
    assert store.statistics().size == len(before)
    await store.append(RECORDS[2])
    await store.aclose()
    assert load(path).records == [RECORDS[0], RECORDS[2]]


async def test_a_failed_sync_fails_its_whole_batch_and_only_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "store.jsonl"
    store, _ = await open_store(path)
    fail_once(monkeypatch, "fdatasync", errno.EIO)
    outcomes: dict[int, bool] = {}

    async def appender(n: int) -> None:
        try:
            await store.append({"n": n})
        except StoreError:
            outcomes[n] = False
        else:
            outcomes[n] = True

    async with trio.open_nursery() as nursery:
        for n in range(10):
            nursery.start_soon(appender, n)
    failed = [n for n, ok in outcomes.items() if not ok]
    stored = [n for n, ok in outcomes.items() if ok]
    assert failed  # the first batch: every appender that shared the failed sync
    async with trio.open_nursery() as nursery:
        for n in range(10, 20):
            nursery.start_soon(appender, n)
    stored = [n for n, ok in outcomes.items() if ok]
    assert set(stored) >= set(range(10, 20))
    await store.aclose()
    assert load(path).records == [{"n": n} for n in stored]


async def test_a_failed_write_is_cut_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A short write and then ENOSPC, as a full disk gives: the half line is removed."""
    path = tmp_path / "store.jsonl"
    store, _ = await open_store(path)
    await store.append(RECORDS[0])
    before = path.read_bytes()
    real_write = os.write
    writes: list[int] = []

    def short_write(fd: int, data: Any) -> int:
        writes.append(1)
        if len(writes) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", short_write)
    with pytest.raises(StoreError, match="No space left on device"):
        await store.append(RECORDS[1])
    monkeypatch.setattr(os, "write", real_write)
    assert path.read_bytes() == before
    await store.append(RECORDS[2])
    await store.aclose()
    assert load(path).records == [RECORDS[0], RECORDS[2]]


async def test_a_failed_write_that_cannot_be_cut_back_stops_appends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "store.jsonl"
    store, _ = await open_store(path)
    await store.append(RECORDS[0])
    fail_once(monkeypatch, "fdatasync", errno.EIO)
    fail_once(monkeypatch, "ftruncate", errno.EIO)
    with pytest.raises(StoreError, match="Input/output error"):
        await store.append(RECORDS[1])
    # Appending after bytes we did not acknowledge would bury them mid-file.
    with pytest.raises(StoreError, match=r"could not be cut back .* restart to recover"):
        await store.append(RECORDS[2])
    await store.aclose()
    # What a restart finds is what a crash before the acknowledgement would leave: the
    # acknowledged record, and the unacknowledged one maybe.
    assert load(path).records[:1] == [RECORDS[0]]
    assert RECORDS[2] not in load(path).records


async def test_a_cancelled_appender_still_finishes_its_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "store.jsonl"
    store, _ = await open_store(path)
    held = HeldSync(monkeypatch)
    returned: list[str] = []

    async def cancelled_appender(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await store.append({"id": "cancelled"})
            returned.append("cancelled")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.append, {"id": "first"})
        await trio.testing.wait_all_tasks_blocked()
        scope: trio.CancelScope = await nursery.start(cancelled_appender)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        held.release()
    assert returned == ["cancelled"]
    await store.aclose()
    assert load(path).records == [{"id": "first"}, {"id": "cancelled"}]


async def test_a_full_disk_fails_the_append_and_nothing_else(mount_tmpfs: Any) -> None:
    disk: Path = mount_tmpfs("256k")
    filler = disk / "filler"
    filler.write_bytes(b"\0" * 200 * 1024)
    path = disk / "store.jsonl"
    store, _ = await open_store(path)
    acknowledged: list[Any] = []
    with pytest.raises(StoreError, match="No space left on device"):  # noqa: PT012
        for n in range(1000):
            record = {"n": n, "pad": "x" * 1000}
            await store.append(record)
            acknowledged.append(record)
    assert acknowledged
    # The file ends with the last acknowledged record: nothing half written.
    assert path.stat().st_size == store.statistics().size
    assert statusd.store.load(path).records == acknowledged
    with pytest.raises(StoreError, match="No space left on device"):
        await store.append_many([{"batch": n, "pad": "x" * 1000} for n in range(20)])
    filler.unlink()
    await store.append({"after": "freeing space"})
    await store.aclose()
    assert load(path).records == [*acknowledged, {"after": "freeing space"}]


# -- compaction -----------------------------------------------------------------------------


@pytest.mark.parametrize("in_thread", [False, True], ids=["encode now", "encode in thread"])
async def test_compaction_replaces_contents_and_appends_continue(
    tmp_path: Path, in_thread: bool
) -> None:
    path = tmp_path / "store.jsonl"
    store, _ = await open_store(path)
    for record in RECORDS:
        await store.append(record)
    await store.compact(iter(RECORDS[3:]), encode_in_thread=in_thread)
    await store.append({"id": "after"})
    assert store.statistics().compactions == 1
    await store.aclose()
    report = load(path)
    assert report.records == [*RECORDS[3:], {"id": "after"}]
    assert not list(tmp_path.glob("*" + TEMP_SUFFIX))


@pytest.mark.parametrize("in_thread", [False, True], ids=["encode now", "encode in thread"])
async def test_appends_around_a_compaction_are_neither_lost_nor_doubled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_thread: bool
) -> None:
    """An append queued before ``compact`` is called lands before the rewrite (and is in
    the snapshot); one made after it lands after the rewrite, even though both waited
    behind the same commit."""
    path = tmp_path / "store.jsonl"
    store, _ = await open_store(path)
    await store.append_many(RECORDS)
    held = HeldSync(monkeypatch)
    snapshot = [*RECORDS[3:], {"id": "first"}, {"id": "before"}]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.append, {"id": "first"})  # commits, held in its sync
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(store.append, {"id": "before"})
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(partial(store.compact, snapshot, encode_in_thread=in_thread))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(store.append, {"id": "after"})
        await trio.testing.wait_all_tasks_blocked()
        held.release()
    await store.aclose()
    assert load(path).records == [*snapshot, {"id": "after"}]


def _steps_of_a_compaction(path: Path, new: bytes, steps: int) -> None:
    """The compaction's file work by hand, stopped (as by a crash) after ``steps``."""
    temp = path.with_name(f"{path.name}.4242{TEMP_SUFFIX}")
    actions: list[Callable[[], object]] = [
        lambda: temp.write_bytes(b""),  # 1: temp created
        lambda: temp.write_bytes(new[: len(new) // 2]),  # 2: half written
        lambda: temp.write_bytes(new),  # 3: written (and fsynced)
        lambda: os.replace(temp, path),  # 4: renamed over the store
    ]
    for action in actions[:steps]:
        action()


@pytest.mark.parametrize("steps", [0, 1, 2, 3, 4])
async def test_a_crash_at_any_step_of_a_compaction_leaves_old_or_new(
    tmp_path: Path, steps: int
) -> None:
    path = tmp_path / "store.jsonl"
    old = await store_records(path, RECORDS)
    other = tmp_path / "other" / "store.jsonl"
    new = await store_records(other, RECORDS[4:])  # what a compaction would write
    path.write_bytes(old)
    _steps_of_a_compaction(path, new, steps)

    store, report = await open_store(path)
    assert report.records == (RECORDS[4:] if steps == 4 else RECORDS)
    assert report.cut_bytes == 0
    assert report.removed_temp_files == (1 if 1 <= steps <= 3 else 0)
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["store.jsonl"]
    await store.append({"id": "after"})
    await store.aclose()
    assert load(path).records == [*report.records, {"id": "after"}]


FAILURES: dict[str, tuple[str, int, bool]] = {
    # name: (the os function, how many calls of it succeed first, new contents in place?)
    "temp write": ("write", 0, False),
    "temp fsync": ("fsync", 0, False),
    "rename": ("replace", 0, False),
    "directory fsync": ("fsync", 1, True),  # after the temp file's fsync
}


@pytest.mark.parametrize("failure", FAILURES.keys())
async def test_a_failed_compaction_leaves_old_or_new_and_appends_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    path = tmp_path / "store.jsonl"
    store, _ = await open_store(path)
    await store.append_many(RECORDS)
    name, after, replaced = FAILURES[failure]
    fail_once(monkeypatch, name, errno.EIO, after=after)
    with pytest.raises(StoreError, match=r"compaction failed: .*Input/output error"):
        await store.compact(RECORDS[4:])
    monkeypatch.undo()
    assert not list(tmp_path.glob("*" + TEMP_SUFFIX))
    expected = RECORDS[4:] if replaced else RECORDS
    assert load(path).records == expected
    await store.append({"id": "after"})
    await store.aclose()
    assert load(path).records == [*expected, {"id": "after"}]


async def test_a_store_that_cannot_reopen_after_compaction_stops_appends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "store.jsonl"
    store, _ = await open_store(path)
    await store.append_many(RECORDS)
    fail_once(monkeypatch, "open", errno.EMFILE, when=lambda p, *a: Path(p) == path)
    with pytest.raises(StoreError, match="Too many open files"):
        await store.compact(RECORDS[4:])
    monkeypatch.undo()
    with pytest.raises(StoreError, match="cannot reopen after compaction"):
        await store.append({"id": "lost?"})
    assert load(path).records == RECORDS[4:]
    # A compaction that works rewrites the whole file: appends are safe again.
    await store.compact(RECORDS[5:])
    await store.append({"id": "after"})
    await store.aclose()
    assert load(path).records == [*RECORDS[5:], {"id": "after"}]


def test_leftover_compaction_temp_files_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "store.jsonl"
    write_records(path, RECORDS)
    leftover = tmp_path / f"store.jsonl.123{TEMP_SUFFIX}"
    leftover.write_bytes(b"half a compaction")
    unrelated = tmp_path / f"other.jsonl.123{TEMP_SUFFIX}"
    unrelated.write_bytes(b"another store's")
    report = load(path)
    assert report.removed_temp_files == 1
    assert not leftover.exists()
    assert unrelated.exists()
    assert report.records == RECORDS


APPENDER = """
import sys, trio
from pathlib import Path
import statusd.store

statusd.store.SEAL_EVERY = int(sys.argv[2])

async def main(path):
    store, report = await statusd.store.open_store(Path(path))
    n = len(report.records)

    async def appender():
        nonlocal n
        while True:
            n += 1
            number = n
            await store.append({"n": number, "pad": "x" * 200})
            print(number, flush=True)

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(appender)

trio.run(main, sys.argv[1])
"""


@pytest.mark.parametrize("seal_every", [1 << 20, 2048], ids=["default seals", "many seals"])
def test_a_killed_writer_loses_no_acknowledged_record(tmp_path: Path, seal_every: int) -> None:
    """A real process appending from four tasks, SIGKILLed twice: every record it
    acknowledged is there after each restart, and none twice."""
    path = tmp_path / "store.jsonl"
    command = [sys.executable, "-c", APPENDER, str(path), str(seal_every)]
    acknowledged: set[int] = set()
    for _ in range(2):
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as child:
            assert child.stdout is not None
            for _ in range(300):
                acknowledged.add(int(child.stdout.readline()))
            child.kill()
            acknowledged.update(int(line) for line in child.stdout.read().split())
        numbers = [record["n"] for record in load(path).records]
        assert len(numbers) == len(set(numbers))
        assert acknowledged <= set(numbers)


def test_the_daemon_refuses_to_start_on_a_damaged_journal(daemon_process: Any) -> None:
    """End to end: a real ``python -m statusd`` with a damaged tasks.jsonl exits with the
    store's message instead of starting without the damaged record."""
    process = daemon_process()
    state = process.directory / "state"
    state.mkdir(mode=0o700)
    journal = state / "tasks.jsonl"
    damaged = bytearray(write_records(journal, RECORDS))
    damaged[10] ^= 0x01  # inside the first line's checksum
    journal.write_bytes(damaged)
    process.start(wait=False)
    assert process.wait() == 1
    assert f"{journal}: line 1 (byte 0) is damaged and good lines follow it" in process.stderr()
    assert journal.read_bytes() == damaged


async def test_change_gate_keeps_changes_and_compactions_apart() -> None:
    gate = ChangeGate()
    log: list[str] = []
    in_change = trio.Event()
    finish_change = trio.Event()

    async def change(name: str, hold: trio.Event | None = None) -> None:
        async with gate.change():
            log.append(f"{name} start")
            if hold is not None:
                in_change.set()
                await hold.wait()
            log.append(f"{name} end")

    async def compaction() -> None:
        async with gate.compaction():
            log.append("compaction start")
            await trio.lowlevel.checkpoint()
            log.append("compaction end")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(change, "a", finish_change)
        await in_change.wait()
        nursery.start_soon(compaction)
        await trio.testing.wait_all_tasks_blocked()
        assert gate.compacting
        nursery.start_soon(change, "b")  # arrives while the compaction waits: waits too
        await trio.testing.wait_all_tasks_blocked()
        assert log == ["a start"]
        finish_change.set()
    assert log == ["a start", "a end", "compaction start", "compaction end", "b start", "b end"]
    assert not gate.compacting


def test_a_file_in_the_old_object_format_is_refused_not_cut(tmp_path: Path) -> None:
    path = tmp_path / "store.jsonl"
    body = b'{"id":1}'
    old = b'{"crc":"%08x","rec":%s}\n' % (zlib.crc32(body), body)
    path.write_bytes(old * 3)
    with pytest.raises(CorruptStore, match="earlier development build"):
        load(path)
    assert path.read_bytes() == old * 3
