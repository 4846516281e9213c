"""The store's worker threads do not queue behind anyone else's."""

from __future__ import annotations

import threading
from functools import partial
from pathlib import Path

import trio
import trio.testing

from statusd.store import load, open_store


async def test_an_append_completes_while_the_default_thread_limiter_is_exhausted(
    tmp_path: Path,
) -> None:
    # 40 DNS lookups stuck in getaddrinfo hold every token of trio's default limiter.
    store, _ = await open_store(tmp_path / "tasks.jsonl")
    release = threading.Event()
    default = trio.to_thread.current_default_thread_limiter()
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(int(default.total_tokens)):
                nursery.start_soon(
                    partial(trio.to_thread.run_sync, release.wait, abandon_on_cancel=True)
                )
            await trio.testing.wait_all_tasks_blocked()
            assert default.borrowed_tokens == default.total_tokens
            written = trio.Event()

            async def append_and_compact() -> None:
                await store.append({"op": "create", "n": 1})
                await store.compact([{"op": "create", "n": 2}], encode_in_thread=True)
                written.set()

            nursery.start_soon(append_and_compact)
            # The writes are shielded: wait beside them, so a failure is reported (and the
            # stuck threads released) instead of hanging the test.
            with trio.move_on_after(10):
                await written.wait()
            in_time = written.is_set()
            release.set()
        assert in_time, "the store's thread queued behind the default limiter"
    finally:
        release.set()
        await store.aclose()
    assert load(tmp_path / "tasks.jsonl").records == [{"op": "create", "n": 2}]
