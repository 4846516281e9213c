"""Redirects (issue 14, item 6): a ``Location`` with a raw space or raw UTF-8 is
percent-encoded and followed, as curl, wget and aria2c do; how many are followed is
``[downloads] max_redirects`` (20, like wget and aria2c).

The rule is a table (``rules.redirect_target``, pure); real servers on 127.0.0.1 send the
raw bytes; an in-process daemon shows the default, a daemon process the key read from its
TOML file while another uid is served. "Served meanwhile" means that uid's calls are
answered within ``SERVED_WITHIN`` seconds, a bound wide enough for a busy two-core machine.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio

from statusd.config import load_config
from statusd.daemon import Daemon
from statusd.downloads import DownloadItem, DownloadSettings, ItemState, download_item, rules
from statusd.downloads.http import HTTPClient
from statusd.downloads.job import Downloads
from statusd.errors import ConfigError
from tests.conftest import (
    DaemonProcess,
    RawClient,
    blocking_call,
    needs_root,
    nobody_may_connect,
    run_as_nobody,
)
from tests.http_servers import HTTPTestServer, http_server, redirect, serve_data
from tests.processes import finished, start

__all__ = ["http_server"]

DATA = b"the file behind the redirects\n"
SERVED_WITHIN = 5.0


def raw(text: str) -> str:
    """``text`` as the test server must be given it to send its UTF-8 bytes raw (it writes
    header values as latin-1, a byte per character)."""
    return text.encode().decode("latin-1")


def too_many(limit: int) -> str:
    return f"too many redirects: more than {limit} (downloads.max_redirects)"


def chain(server: HTTPTestServer, hops: int) -> str:
    """A URL ``hops`` redirects away from the file; each hop its own path."""
    server.route("/file.bin", serve_data(DATA))
    target = "/file.bin"
    for hop in range(hops, 0, -1):
        server.route(f"/{hops}/hop{hop}", redirect(target))
        target = f"/{hops}/hop{hop}"
    return server.url(target)


# --- the rule --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("/files/a b.txt", "http://a.test/files/a%20b.txt"),
        ("/files/straße ä.iso", "http://a.test/files/stra%C3%9Fe%20%C3%A4.iso"),
        ("/f?q=a b&r=ü#x y", "http://a.test/f?q=a%20b&r=%C3%BC#x%20y"),
        ("/already%20encoded", "http://a.test/already%20encoded"),
        ("//b.test/ä", "http://b.test/%C3%A4"),
        ("http://b.test/a b", "http://b.test/a%20b"),
        ("rel ative", "http://a.test/dir/rel%20ative"),
    ],
)
def test_a_raw_location_is_percent_encoded(location: str, expected: str) -> None:
    assert rules.redirect_target("http://a.test/dir/page", location) == expected


def test_a_location_header_is_read_as_utf8_bytes() -> None:
    # Header values arrive as latin-1 text, a character per byte.
    assert rules.location_text(raw("/ä b")) == "/ä b"
    assert rules.location_text("/plain") == "/plain"
    # Not UTF-8 (a latin-1 server): the very bytes it sent go out, percent-encoded.
    assert rules.redirect_target("http://a.test/", rules.location_text("/\xe4.txt")) == (
        "http://a.test/%E4.txt"
    )


def test_whitespace_in_a_redirect_host_is_still_refused() -> None:
    with pytest.raises(ValueError, match="redirect to an unusable url: url must not contain"):
        rules.redirect_target("http://a.test/", "http://b .test/f")


# --- against a real server -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "served_at", "saved_as"),
    [
        ("/files/a b.txt", "/files/a%20b.txt", "a b.txt"),
        ("/files/straße ä.txt", "/files/stra%C3%9Fe%20%C3%A4.txt", "straße ä.txt"),
    ],
)
async def test_a_raw_location_is_followed(
    http_server: HTTPTestServer, tmp_path: Path, location: str, served_at: str, saved_as: str
) -> None:
    http_server.route(served_at, serve_data(DATA))
    url = http_server.route("/moved", redirect(raw(location)))
    async with HTTPClient() as client:
        result = await download_item(
            client, DownloadItem(url), tmp_path, DownloadSettings(), ItemState()
        )
    assert result.error is None
    assert [request.target for request in http_server.requests] == ["/moved", served_at]
    assert (tmp_path / saved_as).read_bytes() == DATA


async def test_the_engine_follows_20_redirects_by_default(
    http_server: HTTPTestServer, tmp_path: Path
) -> None:
    async with HTTPClient() as client:
        twenty = await download_item(
            client, DownloadItem(chain(http_server, 20)), tmp_path, DownloadSettings(), ItemState()
        )
        assert twenty.error is None
        http_server.routes.clear()
        over = await download_item(
            client, DownloadItem(chain(http_server, 21)), tmp_path, DownloadSettings(), ItemState()
        )
    assert over.error == too_many(20)


# --- the config key --------------------------------------------------------------------------


def test_the_key_is_read_range_checked_and_reloaded(tmp_path: Path) -> None:
    environ = {"HOME": str(tmp_path)}
    config = load_config({}, environ, 1000)
    assert config.downloads.max_redirects == 20
    assert Downloads(config).settings.max_redirects == 20
    file = tmp_path / "statusd.toml"
    file.write_text("[downloads]\nmax_redirects = 0\n")
    assert load_config({"config": str(file)}, environ, 1000).downloads.max_redirects == 0
    environ["STATUSD_DOWNLOADS_MAX_REDIRECTS"] = "7"
    tuned = load_config({"config": str(file)}, environ, 1000)
    assert tuned.downloads.max_redirects == 7  # the environment over the file
    downloads = Downloads(config)
    downloads.configure(tuned.downloads)  # SIGHUP
    assert downloads.settings.max_redirects == 7
    for bad in ("-1", "101", '"many"'):
        file.write_text(f"[downloads]\nmax_redirects = {bad}\n")
        with pytest.raises(ConfigError) as caught:
            load_config({"config": str(file)}, {"HOME": str(tmp_path)}, 1000)
        assert str(caught.value).startswith(
            f"downloads.max_redirects: must be an integer from 0 to 100, not {bad}"
        )


async def test_a_daemon_with_the_default_fails_an_item_past_20(
    daemon: Daemon, http_server: HTTPTestServer
) -> None:
    client = await RawClient.connect(daemon.config.socket)
    try:
        urls = [chain(http_server, 20)]
        http_server.route("/over", redirect("/20/hop1"))  # 21 from here
        urls.append(http_server.url("/over"))
        task_id = (await client.call("tasks.download", {"urls": urls}))["task_id"]
        task = await finished(client, task_id)
    finally:
        await client.aclose()
    assert [item["error"] for item in task["result"]["items"]] == [None, too_many(20)]


@pytest.fixture
async def daemon_with_two(daemon_process: Any) -> Any:
    process: DaemonProcess = daemon_process()
    config = process.directory / "statusd.toml"
    config.write_text(f"{nobody_may_connect()}[downloads]\nmax_redirects = 2\n")
    client = await start(process, "--config", str(config))
    try:
        yield process, client
    finally:
        await trio.aclose_forcefully(client.stream)


async def test_a_daemon_honours_max_redirects_from_its_file(
    daemon_with_two: Any, http_server: HTTPTestServer
) -> None:
    _process, client = daemon_with_two
    urls = [chain(http_server, 2), chain(http_server, 3)]
    task_id = (await client.call("tasks.download", {"urls": urls}))["task_id"]
    task = await finished(client, task_id)
    assert [item["error"] for item in task["result"]["items"]] == [None, too_many(2)]


@needs_root
async def test_another_user_is_served_while_items_loop(
    daemon_with_two: Any, http_server: HTTPTestServer
) -> None:
    process, client = daemon_with_two
    http_server.route("/loop", redirect("/loop"))
    urls = [http_server.url("/loop")] * 200  # each follows 2, then fails
    task_id = (await client.call("tasks.download", {"urls": urls}))["task_id"]
    answer = await trio.to_thread.run_sync(as_nobody, process.socket)
    assert answer["user"] == "nobody"
    task = await finished(client, task_id)
    assert {item["error"] for item in task["result"]["items"]} == {too_many(2)}
    assert len(http_server.requests_for("/loop")) == 200 * 3


def as_nobody(socket: Path) -> Any:
    """daemon.info as uid nobody; its answer, which came within SERVED_WITHIN."""

    def action() -> dict[str, Any]:
        started = time.monotonic()
        answer = blocking_call(socket, "daemon.info")
        return {"answer": answer, "took": time.monotonic() - started}

    outcome = run_as_nobody(action)
    assert outcome["took"] < SERVED_WITHIN, outcome
    return outcome["answer"]["result"]
