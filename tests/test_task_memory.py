"""What a large task costs in memory.

Queued: its spec. An item with a url and nothing else is kept (and journalled) as the url
string, not a one-key dict, which was two thirds of the 310 bytes an item of
docs/bench-neighbours.md's row 8. Journals written before, with a dict per item, run as
ever (tests/test_download_tasks.py makes such specs).

Finished: its result, and for compaction the task's record encoded once
(``store.KeptRecord``), which keeps the line and lets the record (a copy) go.
"""

from __future__ import annotations

import gc
import hashlib
import json
import tracemalloc
from pathlib import Path
from typing import Any

from statusd.api import DownloadParams
from statusd.daemon import Daemon
from statusd.downloads import Downloads
from statusd.downloads.job import entry_url, spec_entry
from statusd.identity import Caller
from statusd.protocol.codec import converter, unstructure
from statusd.store import KeptRecord, encode_record, load
from tests.conftest import make_config
from tests.http_servers import HTTPTestServer, http_server, serve_data
from tests.test_download_tasks import wait_for_end

__all__ = ["http_server"]

ITEMS = 2_000
# A url of 45 characters is a 94-byte string; with the list's pointer about 104 bytes an
# item. A one-key dict per item added 200 more.
MOST_PER_ITEM = 130


def test_an_entry_with_a_url_alone_is_the_url() -> None:
    assert spec_entry({"url": "http://a/x"}) == "http://a/x"
    assert spec_entry({"url": "http://a/x", "filename": None, "headers": None}) == "http://a/x"
    full = {"url": "http://a/x", "sha256": "0" * 64}
    assert spec_entry({**full, "checksum": None}) == full
    assert entry_url("http://a/x") == entry_url(full) == "http://a/x"


async def test_the_journal_keeps_plain_urls_as_strings(
    daemon: Daemon, connect: Any, http_server: HTTPTestServer
) -> None:
    body = b"x" * 3000
    plain = http_server.route("/plain.bin", serve_data(body))
    checked = http_server.route("/checked.bin", serve_data(body))
    digest = hashlib.sha256(body).hexdigest()
    client = await connect()
    await client.call("subscribe", {"tasks": "all"})
    items = [{"url": plain}, {"url": checked, "sha256": digest}]
    task_id = (await client.call("tasks.download", {"items": items}))["task_id"]
    assert (await wait_for_end(client, task_id))["status"] == "completed"
    other = http_server.route("/other.bin", serve_data(body))
    second = (await client.call("tasks.download", {"urls": [other]}))["task_id"]
    assert (await wait_for_end(client, second))["status"] == "completed"
    records = load(daemon.config.state_dir / "tasks.jsonl").records
    specs = [record["spec"] for record in records if record["op"] == "create"]
    assert [spec["items"] for spec in specs] == [
        [plain, {"url": checked, "sha256": digest}],
        [other],
    ]
    downloaded = daemon.config.download_dir
    assert [(downloaded / name).read_bytes() for name in ("plain.bin", "checked.bin")] == [
        body,
        body,
    ]


def _held_per_item(make: Any) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = make()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept
    return held / ITEMS


def test_a_queued_task_holds_about_a_hundred_bytes_an_item(short_tmp: Path) -> None:
    downloads = Downloads(make_config(short_tmp))
    request = json.dumps({"urls": [f"http://127.0.0.1:45678/files/{n:015d}" for n in range(ITEMS)]})
    caller = Caller(65534, "nobody", False)

    def planned() -> dict[str, Any]:
        # The request's own strings and lists go once planned, as in the daemon.
        params = converter.structure(json.loads(request), DownloadParams)
        return downloads.prepare(params, caller, max_items=ITEMS)[2]

    # urllib's cache of split urls (128 of them) filled once, as in a running daemon.
    planned()
    assert _held_per_item(planned) < MOST_PER_ITEM
    # And as a restart reads it back from the journal.
    journalled = json.dumps(planned())
    assert _held_per_item(lambda: json.loads(journalled)) < MOST_PER_ITEM


def _finished_task() -> dict[str, Any]:
    items = [
        {
            "url": f"http://127.0.0.1:45678/files/{n:06d}",
            "path": f"/var/lib/statusd/downloads/f{n:06d}",
            "bytes": 1000 + n,
            "sha256": None,
            "error": None,
        }
        for n in range(ITEMS)
    ]
    return {"id": "t1", "status": "completed", "result": {"items": items, "failed": 0}}


def test_a_finished_tasks_compaction_record_keeps_its_line_alone() -> None:
    task = _finished_task()
    record = {"op": "create", "task": unstructure(task)}
    kept = KeptRecord(record)
    line = kept.line()
    assert line == encode_record({"op": "create", "task": task})
    assert kept.record is None
    assert kept.line() is line

    def compacted() -> KeptRecord:
        # As tasks._snapshot makes it: unstructure copies every item of the result.
        kept = KeptRecord({"op": "create", "task": unstructure(task)})
        kept.line()
        return kept

    # The line's 125 bytes an item; with the copy kept beside it, 320.
    assert _held_per_item(compacted) < 160
