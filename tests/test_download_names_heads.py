"""File names from directory URLs and from loose ``Content-Disposition`` headers, and
response heads up to ``[downloads] max_response_head_bytes`` (256 KiB), against real HTTP
servers on 127.0.0.1.

curl, wget and aria2c were the yardstick: wget saves a directory URL as ``index.html``;
browsers and curl take ``filename="x"`` without a disposition type; curl and aria2c take a
100 KB response head. An in-process daemon shows the default, a daemon process the key
read from its TOML file while another uid is served. "Served meanwhile" means that uid's
call is answered within ``SERVED_WITHIN`` seconds, a bound wide enough for a busy two-core
machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from statusd.config import load_config
from statusd.daemon import Daemon
from statusd.downloads import DownloadItem, DownloadSettings, ItemResult, ItemState, download_item
from statusd.downloads.http import DEFAULT_MAX_HEADER_BYTES, HTTPClient
from statusd.downloads.job import Downloads
from statusd.downloads.names import directory_index, filename_from_content_disposition
from statusd.errors import ConfigError
from tests.conftest import DaemonProcess, RawClient, needs_root, nobody_may_connect
from tests.http_servers import (
    HTTPTestServer,
    Request,
    Responder,
    http_server,
    redirect,
    serve_data,
)
from tests.processes import finished, start
from tests.test_redirects import as_nobody

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


def too_large(limit: int) -> str:
    return f"exceeds {limit} bytes (downloads.max_response_head_bytes)"


def test_the_key_is_read_range_checked_and_reloaded(tmp_path: Path) -> None:
    environ = {"HOME": str(tmp_path)}
    config = load_config({}, environ, 1000)
    assert config.downloads.max_response_head_bytes == DEFAULT_MAX_HEADER_BYTES == 256 * 1024
    assert Downloads(config).client.max_header_bytes == 256 * 1024
    file = tmp_path / "statusd.toml"
    file.write_text("[downloads]\nmax_response_head_bytes = 1024\n")
    small = load_config({"config": str(file)}, environ, 1000)
    assert small.downloads.max_response_head_bytes == 1024
    environ["STATUSD_DOWNLOADS_MAX_RESPONSE_HEAD_BYTES"] = "1048576"
    tuned = load_config({"config": str(file)}, environ, 1000)
    assert tuned.downloads.max_response_head_bytes == 1 << 20  # the environment over the file
    downloads = Downloads(config)
    client = downloads.client
    downloads.configure(tuned.downloads)  # SIGHUP
    assert client.max_header_bytes == 1 << 20
    for bad in ("1023", str((16 << 20) + 1), '"big"'):
        file.write_text(f"[downloads]\nmax_response_head_bytes = {bad}\n")
        with pytest.raises(ConfigError) as caught:
            load_config({"config": str(file)}, {"HOME": str(tmp_path)}, 1000)
        assert str(caught.value).startswith(
            "downloads.max_response_head_bytes: must be an integer from 1024 to 16777216,"
            f" not {bad}"
        )


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
    assert result.error.startswith("response head from 127.0.0.1:")
    assert result.error.endswith(too_large(256 * 1024))
    assert names(tmp_path) == []
    # The same request gets the same head: it is not asked again.
    assert len(http_server.requests_for("/huge-head.txt")) == 1


async def test_a_daemon_takes_a_100_kb_head_and_names_the_key_past_256_kib(
    daemon: Daemon, http_server: HTTPTestServer
) -> None:
    urls = [
        http_server.route("/fine.txt", bloated(100_000)),
        http_server.route("/over.txt", bloated(300_000)),
    ]
    client = await RawClient.connect(daemon.config.socket)
    try:
        task_id = (await client.call("tasks.download", {"urls": urls}))["task_id"]
        task = await finished(client, task_id)
    finally:
        await client.aclose()
    fine, over = task["result"]["items"]
    assert fine["error"] is None
    assert over["error"].endswith(too_large(256 * 1024))


@pytest.fixture
async def daemon_with_small_heads(daemon_process: Any) -> Any:
    process: DaemonProcess = daemon_process()
    config = process.directory / "statusd.toml"
    config.write_text(f"{nobody_may_connect()}[downloads]\nmax_response_head_bytes = 4096\n")
    client = await start(process, "--config", str(config))
    try:
        yield process, client
    finally:
        await trio.aclose_forcefully(client.stream)


async def test_a_daemon_honours_the_key_from_its_file(
    daemon_with_small_heads: Any, http_server: HTTPTestServer
) -> None:
    _process, client = daemon_with_small_heads
    urls = [http_server.route("/small", bloated(3000)), http_server.route("/big", bloated(5000))]
    task_id = (await client.call("tasks.download", {"urls": urls}))["task_id"]
    task = await finished(client, task_id)
    small, big = task["result"]["items"]
    assert small["error"] is None
    assert big["error"].endswith(too_large(4096))


@needs_root
async def test_another_user_is_served_while_heads_are_refused(
    daemon_with_small_heads: Any, http_server: HTTPTestServer
) -> None:
    process, client = daemon_with_small_heads
    urls = [http_server.route("/bloated", bloated(200_000))] * 200
    task_id = (await client.call("tasks.download", {"urls": urls}))["task_id"]
    answer = await trio.to_thread.run_sync(as_nobody, process.socket)
    assert answer["user"] == "nobody"
    task = await finished(client, task_id)
    assert all(item["error"].endswith(too_large(4096)) for item in task["result"]["items"])
    assert len(http_server.requests_for("/bloated")) == 200  # none asked again
