"""File names from directory URLs and from loose ``Content-Disposition`` headers, and
response heads up to 256 KiB, against real HTTP servers on 127.0.0.1.

curl, wget and aria2c were the yardstick: wget saves a directory URL as ``index.html``;
browsers and curl take ``filename="x"`` without a disposition type; curl and aria2c take a
100 KB response head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from statusd.downloads import DownloadItem, DownloadSettings, ItemResult, ItemState, download_item
from statusd.downloads.http import DEFAULT_MAX_HEADER_BYTES, HTTPClient
from statusd.downloads.names import directory_index, filename_from_content_disposition
from tests.http_servers import (
    HTTPTestServer,
    Request,
    Responder,
    http_server,
    redirect,
    serve_data,
)

__all__ = ["http_server"]

FAST = DownloadSettings(backoff_initial=0.01, backoff_max=0.05, read_timeout=5.0)


async def fetch(url: str, dest: Path, **item: Any) -> ItemResult:
    async with HTTPClient() as client:
        return await download_item(
            client, DownloadItem(url, **item), dest, FAST, ItemState(), owner="t1-0"
        )


def names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('filename="report.pdf"', "report.pdf"),
        ("filename=plain.txt", "plain.txt"),
        ("filename*=UTF-8''na%C3%AFve.txt", "naïve.txt"),
        ('filename="a.txt"; size=3', "a.txt"),
        ('attachment; filename="say \\"hi\\".txt"', 'say "hi".txt'),  # closed, escaped
        ('attachment; filename="evil.txt', None),
        ('attachment; filename="evil.txt; size=3', None),
        ('attachment; filename=evil".txt', None),
        ('filename="evil.txt', None),
    ],
)
def test_content_disposition_loose_forms(header: str, expected: str | None) -> None:
    assert filename_from_content_disposition(header) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://host/", "index.html"),
        ("http://host", "index.html"),
        ("http://host/dir/?page=2", "index.html"),
        ("http://host/dir/file", None),
    ],
)
def test_directory_index(url: str, expected: str | None) -> None:
    assert directory_index(url) == expected


@pytest.mark.parametrize("path", ["/", "/docs/"])
async def test_a_url_ending_in_a_slash_is_saved_as_index_html(
    http_server: HTTPTestServer, tmp_path: Path, path: str
) -> None:
    url = http_server.route(path, serve_data(b"<html></html>"))
    result = await fetch(url, tmp_path)
    assert result.path == str(tmp_path / "index.html")
    again = await fetch(url, tmp_path)
    assert again.path == str(tmp_path / "index.1.html")


async def test_a_redirect_to_a_directory_keeps_the_name_asked_for(
    http_server: HTTPTestServer, tmp_path: Path
) -> None:
    """The original URL's name comes before ``index.html``, as wget's does."""
    http_server.route("/landing/", serve_data(b"page"))
    url = http_server.route("/setup.exe", redirect("/landing/"))
    assert (await fetch(url, tmp_path)).path == str(tmp_path / "setup.exe")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('filename="typeless.txt"', "typeless.txt"),
        ("filename=bare.txt", "bare.txt"),
        ('attachment; filename="unterminated.txt', "get"),
        ('inline; filename=half"quoted.txt', "get"),
    ],
)
async def test_content_disposition_from_a_real_server(
    http_server: HTTPTestServer, tmp_path: Path, header: str, expected: str
) -> None:
    url = http_server.route("/get", serve_data(b"x", content_disposition=header))
    result = await fetch(url, tmp_path)
    assert result.path == str(tmp_path / expected)
    assert not any('"' in name for name in names(tmp_path))


# -- response heads -----------------------------------------------------------------------


def bloated(size: int) -> Any:
    async def handler(request: Request, responder: Responder) -> None:
        headers = [(f"X-Junk-{n}", "j" * 1000) for n in range(size // 1000)]
        await responder.send(200, headers, b"body")

    return handler


def test_the_head_limit_is_256_kib() -> None:
    assert DEFAULT_MAX_HEADER_BYTES == 256 * 1024


async def test_a_100_kb_response_head_is_taken(http_server: HTTPTestServer, tmp_path: Path) -> None:
    url = http_server.route("/big-head.txt", bloated(100_000))
    result = await fetch(url, tmp_path)
    assert result.error is None
    assert (tmp_path / "big-head.txt").read_bytes() == b"body"


async def test_a_head_over_256_kib_fails_clearly_and_at_once(
    http_server: HTTPTestServer, tmp_path: Path
) -> None:
    url = http_server.route("/huge-head.txt", bloated(300_000))
    result = await fetch(url, tmp_path)
    assert result.error is not None
    assert "response head from 127.0.0.1:" in result.error
    assert f"exceeds {256 * 1024} bytes" in result.error
    assert names(tmp_path) == []
    # The same request gets the same head: it is not asked again.
    assert len(http_server.requests_for("/huge-head.txt")) == 1
