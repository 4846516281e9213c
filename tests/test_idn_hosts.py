"""Internationalized host names (issue 14, item 7): what goes on the wire is IDNA 2008 after
UTS 46 mapping, as browsers and curl send it. ``straße.test`` is ``xn--strae-oqa.test``;
IDNA 2003 (Python's own codec) would send ``strasse.test``, somebody else's host.

No resolver answers for ``.test`` here, so a resolver of the test's own sends every name to
127.0.0.1 and records what it was asked; the request reaches a real server there, through
an in-process daemon's URL check, task and engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from statusd.daemon import Daemon
from statusd.downloads import DownloadItem
from statusd.downloads.http import _ascii_host, split_url
from statusd.downloads.names import validate_url
from tests.conftest import RawClient
from tests.http_servers import HTTPTestServer, http_server, serve_data
from tests.processes import finished
from tests.test_http_names import LoopbackResolver

__all__ = ["http_server"]

HOST = "straße.test"
A_LABEL = "xn--strae-oqa.test"


@pytest.fixture
async def resolver() -> AsyncIterator[LoopbackResolver]:
    resolver = LoopbackResolver()
    previous = trio.socket.set_custom_hostname_resolver(resolver)
    try:
        yield resolver
    finally:
        trio.socket.set_custom_hostname_resolver(previous)


def test_the_encoding_is_idna_2008() -> None:
    assert HOST.encode("idna") == b"strasse.test"  # IDNA 2003: the wrong host
    assert _ascii_host(HOST) == A_LABEL
    assert _ascii_host("STRASSE.test") == "STRASSE.test"  # ASCII is left alone
    assert _ascii_host("Straße.Test") == A_LABEL  # UTS 46 maps case first
    assert split_url(f"https://{HOST}/ä.iso")[1] == "/%C3%A4.iso"


def test_the_url_check_accepts_what_is_sent() -> None:
    assert validate_url(f"http://{HOST}/file") == f"http://{HOST}/file"
    assert DownloadItem(f"http://{HOST}:8080/file").url == f"http://{HOST}:8080/file"
    with pytest.raises(ValueError, match="url host is not a valid host name"):
        validate_url("http://☃.test/")  # IDNA 2008 refuses symbols IDNA 2003 took


async def test_a_task_asks_dns_and_the_server_for_the_a_label(
    daemon: Daemon, http_server: HTTPTestServer, resolver: LoopbackResolver
) -> None:
    http_server.route("/file.bin", serve_data(b"behind an IDN"))
    client = await RawClient.connect(daemon.config.socket)
    try:
        url = f"http://{HOST}:{http_server.port}/file.bin"
        task_id = (await client.call("tasks.download", {"urls": [url]}))["task_id"]
        task = await finished(client, task_id)
    finally:
        await client.aclose()
    assert task["status"] == "completed", task
    assert resolver.asked == [A_LABEL.encode()]
    (request,) = http_server.requests
    assert request.headers["host"] == f"{A_LABEL}:{http_server.port}"
    assert request.target == "/file.bin"
