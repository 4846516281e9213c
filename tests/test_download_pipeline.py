"""The large-download pipeline (engine._Writer): buffers received ahead of a writer thread
and a hasher thread. Whatever is in flight when the body ends, breaks, is cancelled or a
write fails, the part holds exactly a prefix of the body, in order, or is gone."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from hashlib import sha256
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from statusd.downloads import DownloadItem, DownloadSettings, ItemResult, ItemState, part_name
from statusd.downloads import download_item as engine_download_item
from statusd.downloads.http import HTTPClient
from tests import http_servers
from tests.http_servers import HTTPTestServer, hang_after_head, sequence, serve_data

BODY = random.Random(12).randbytes(1_000_000)
DIRECT = random.Random(13).randbytes(5 << 20)  # past http.DIRECT_MIN_BYTES: read past h11
# 4 KiB buffers: a megabyte is some 250 of them through a pipeline 4 deep.
TINY = DownloadSettings(backoff_initial=0.01, backoff_max=0.05, read_timeout=5.0, chunk_size=4096)
OWNER = "t1-0"

http_server = http_servers.http_server


@pytest.fixture
async def client() -> AsyncIterator[HTTPClient]:
    async with HTTPClient() as client:
        yield client


async def fetch(
    client: HTTPClient, url: str, dest: Path, settings: DownloadSettings, **item: Any
) -> tuple[ItemResult, ItemState]:
    state = ItemState()

    async def on_state(_: ItemState) -> None:
        await trio.lowlevel.checkpoint()

    result = await engine_download_item(
        client, DownloadItem(url, **item), dest, settings, state, owner=OWNER, on_state=on_state
    )
    return result, state


@pytest.mark.parametrize(
    ("body", "settings"),
    [(BODY, TINY), (DIRECT, attrs.evolve(TINY, chunk_size=64 * 1024))],
    ids=["through-h11", "direct"],
)
async def test_hundreds_of_buffers_are_written_and_hashed_in_order(
    http_server: HTTPTestServer,
    client: HTTPClient,
    tmp_path: Path,
    body: bytes,
    settings: DownloadSettings,
) -> None:
    url = http_server.route("/many.bin", serve_data(body))
    digest = sha256(body).hexdigest()
    result, _ = await fetch(client, url, tmp_path, settings, sha256=digest)
    assert result.error is None
    assert result.sha256 == digest
    assert (tmp_path / "many.bin").read_bytes() == body


async def test_a_cancel_with_buffers_in_flight_keeps_exactly_what_arrived(
    http_server: HTTPTestServer, client: HTTPClient, tmp_path: Path
) -> None:
    """Every buffer handed to the writer, and the one being filled, is on disk before the
    cancel returns, in order: the part is the body's first N bytes, and a resume asks for
    the rest."""
    sent = 300_000  # 73 full buffers and a partial one
    url = http_server.route("/stop.bin", sequence(hang_after_head(BODY, sent), serve_data(BODY)))
    state = ItemState()
    with trio.move_on_after(1.0) as scope:
        await engine_download_item(client, DownloadItem(url), tmp_path, TINY, state, owner=OWNER)
    assert scope.cancelled_caught
    assert (tmp_path / part_name("stop.bin", OWNER)).read_bytes() == BODY[:sent]
    result = await engine_download_item(
        client, DownloadItem(url), tmp_path, TINY, state, owner=OWNER
    )
    assert result.error is None
    assert (tmp_path / "stop.bin").read_bytes() == BODY
    assert http_server.requests_for("/stop.bin")[1].headers["range"] == f"bytes={sent}-"


async def test_a_full_disk_mid_pipeline_fails_the_item_and_removes_the_part(
    http_server: HTTPTestServer, client: HTTPClient, mount_tmpfs: Any
) -> None:
    """The disk fills after dozens of buffers were written, with more in flight: the item
    fails naming the part, the buffers after the error are dropped, the part goes."""
    small: Path = mount_tmpfs("1m")
    url = http_server.route("/fat.bin", serve_data(DIRECT))
    result, _ = await fetch(client, url, small, attrs.evolve(TINY, chunk_size=64 * 1024))
    assert result.error == f"no space left on device writing {small / part_name('fat.bin', OWNER)}"
    assert list(small.iterdir()) == []
