"""An HTTP error answer's keep-alive connection is reused: its body, when small (up to the
engine's 64 KiB drain limit) and quick (within the read timeout), is read to its end and
the connection goes back to the pool. A big, endless or slow error body closes it.
Real servers on 127.0.0.1 that count connections; the engine in-process, with trio's
MockClock where the read timeout matters."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from statusd.downloads import DownloadItem, DownloadSettings, ItemState, download_item, make_client
from statusd.downloads.engine import _DRAIN_LIMIT
from statusd.downloads.http import HTTPClient
from tests.http_servers import (
    Handler,
    HTTPTestServer,
    Request,
    Responder,
    http_server,
    serve_data,
    status,
)

__all__ = ["http_server"]

BODY = b"hello\n" * 100
# One attempt each: what is counted is connections, not retries.
ONCE = DownloadSettings(max_attempts=1, read_timeout=2.0)


@pytest.fixture
async def client() -> AsyncIterator[HTTPClient]:
    async with make_client(ONCE) as client:
        yield client


async def fetch(client: HTTPClient, url: str, dest: Path) -> str | None:
    """The item's error, or None once it is saved."""

    async def journal(_state: ItemState) -> None:
        pass

    result = await download_item(
        client, DownloadItem(url), dest, ONCE, ItemState(), owner="t1-0", on_state=journal
    )
    return result.error


def chunked_error(size: int) -> Handler:
    """A 404 whose page comes chunked (no length said), ``size`` bytes of it."""

    async def handler(request: Request, responder: Responder) -> None:
        await responder.send_head(404, [("Transfer-Encoding", "chunked")])
        page = b"x" * size
        for start in range(0, size, 16 * 1024):
            piece = page[start : start + 16 * 1024]
            await responder.send_raw(b"%x\r\n%s\r\n" % (len(piece), piece))
        await responder.send_raw(b"0\r\n\r\n")

    return handler


async def half_said_error(request: Request, responder: Responder) -> None:
    """A 500 that announces 100 bytes of page, sends 10 and says no more."""
    await responder.send_head(500, [("Content-Length", "100")])
    await responder.send_raw(b"x" * 10)
    await responder.hang()


async def test_errors_then_a_file_over_one_connection(
    http_server: HTTPTestServer, client: HTTPClient, tmp_path: Path
) -> None:
    urls = [
        http_server.route("/missing", status(404, body=b"<h1>not found</h1>" * 100)),
        http_server.route("/secret", status(403)),
        http_server.route("/broken", status(500)),
        http_server.route("/gone", chunked_error(40 * 1024)),
        http_server.route("/file.txt", serve_data(BODY)),
    ]
    errors = [await fetch(client, url, tmp_path) for url in urls]
    assert [error is None for error in errors] == [False] * 4 + [True]
    assert "http 404 not found" in str(errors[0])
    assert (tmp_path / "file.txt").read_bytes() == BODY
    assert {request.connection for request in http_server.requests} == {1}
    stats = client.statistics()
    assert (stats.connections_opened, stats.requests_reused) == (1, 4)


@pytest.mark.parametrize(
    "handler",
    [
        status(404, body=b"x" * (_DRAIN_LIMIT + 1)),  # said to be over the limit
        chunked_error(_DRAIN_LIMIT + 16 * 1024),  # found to be over it
    ],
    ids=["content-length", "chunked"],
)
async def test_a_huge_error_page_closes_its_connection(
    http_server: HTTPTestServer, client: HTTPClient, tmp_path: Path, handler: Handler
) -> None:
    missing = http_server.route("/missing", handler)
    ok = http_server.route("/file.txt", serve_data(BODY))
    assert await fetch(client, missing, tmp_path) == "http 404 not found"
    assert await fetch(client, ok, tmp_path) is None
    assert [request.connection for request in http_server.requests] == [1, 2]
    assert client.statistics().requests_reused == 0


async def test_a_slow_error_page_closes_within_the_read_timeout(
    autojump_clock: trio.testing.MockClock,
    http_server: HTTPTestServer,
    client: HTTPClient,
    tmp_path: Path,
) -> None:
    broken = http_server.route("/broken", half_said_error)
    ok = http_server.route("/file.txt", serve_data(BODY))
    started = trio.current_time()
    error = await fetch(client, broken, tmp_path)
    # The answer's own reason, not the drain's timeout; and no longer than it to say so.
    assert error is not None
    assert error.startswith("http 500")
    assert trio.current_time() - started == pytest.approx(ONCE.read_timeout, abs=0.1)
    assert await fetch(client, ok, tmp_path) is None
    assert [request.connection for request in http_server.requests] == [1, 2]
