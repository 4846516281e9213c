"""The durable JSON-lines store: checksums, torn tails, corruption, group commit, compaction."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from statusd.store import (
    TEMP_SUFFIX,
    CorruptStore,
    decode_record,
    encode_record,
    load,
    open_store,
)

RECORDS = [{"id": n, "title": f"record {n}", "text": "é" * n} for n in range(5)]


def write_records(path: Path, records: list[dict[str, object]]) -> bytes:
    data = b"".join(encode_record(r) for r in records)
    path.write_bytes(data)
    return data


def test_record_round_trip_and_checksum() -> None:
    line = encode_record({"b": 1, "a": "x"})
    assert line.endswith(b"\n")
    assert line.startswith(b'{"crc":"')
    assert decode_record(line[:-1]) == {"a": "x", "b": 1}
    damaged = line.replace(b'"x"', b'"y"')
    with pytest.raises(ValueError, match="checksum mismatch"):
        decode_record(damaged[:-1])


def test_tail_cut_at_every_byte_of_the_last_record(tmp_path: Path) -> None:
    path = tmp_path / "store.jsonl"
    full = write_records(path, RECORDS)
    last = encode_record(RECORDS[-1])
    keep = len(full) - len(last)
    for cut in range(keep, len(full)):
        path.write_bytes(full[:cut])
        report = load(path)
        assert report.records == RECORDS[:-1]
        assert report.cut_bytes == cut - keep
        assert path.read_bytes() == full[:keep]


@pytest.mark.parametrize("garbage", [b"\0" * 4096, os.urandom(4096), b"\n\n{}\n" * 100])
def test_garbage_tail_is_cut(tmp_path: Path, garbage: bytes) -> None:
    path = tmp_path / "store.jsonl"
    full = write_records(path, RECORDS)
    path.write_bytes(full + garbage)
    report = load(path)
    assert report.records == RECORDS
    assert report.cut_bytes == len(garbage)
    assert path.read_bytes() == full


def test_flipped_byte_in_the_middle_refuses_to_load(tmp_path: Path) -> None:
    path = tmp_path / "store.jsonl"
    full = bytearray(write_records(path, RECORDS))
    middle = len(full) // 2
    full[middle] ^= 0x01
    path.write_bytes(bytes(full))
    with pytest.raises(CorruptStore, match="is damaged and good records follow"):
        load(path)
    # Nothing was cut or changed.
    assert path.read_bytes() == bytes(full)


def test_leftover_compaction_temp_files_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "store.jsonl"
    write_records(path, RECORDS)
    leftover = tmp_path / f"store.jsonl.123{TEMP_SUFFIX}"
    leftover.write_bytes(b"half a compaction")
    report = load(path)
    assert report.removed_temp_files == 1
    assert not leftover.exists()
    assert report.records == RECORDS


async def test_append_is_durable_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "state" / "store.jsonl"
    store, report = await open_store(path)
    assert report.records == []
    for record in RECORDS:
        await store.append(record)
    await store.aclose()
    assert load(path).records == RECORDS
    assert (path.stat().st_mode & 0o777) == 0o600


async def test_concurrent_appends_share_syncs(tmp_path: Path) -> None:
    store, _ = await open_store(tmp_path / "store.jsonl")
    async with trio.open_nursery() as nursery:
        for n in range(64):
            nursery.start_soon(store.append, {"n": n})
    statistics = store.statistics()
    assert statistics.appends == 64
    assert statistics.syncs < 64
    await store.aclose()
    assert sorted(r["n"] for r in load(tmp_path / "store.jsonl").records) == list(range(64))


async def test_compaction_replaces_contents_and_appends_continue(tmp_path: Path) -> None:
    path = tmp_path / "store.jsonl"
    store, _ = await open_store(path)
    for record in RECORDS:
        await store.append(record)
    await store.compact(RECORDS[3:])
    await store.append({"id": "after"})
    await store.aclose()
    assert load(path).records == [*RECORDS[3:], {"id": "after"}]
    assert not list(tmp_path.glob("*" + TEMP_SUFFIX))
