"""``statusctl dashboard``: a real daemon with its WebSocket on, statusctl run as a process,
the link it prints opened with real HTTP and WebSocket clients, and a stand-in browser
(``$BROWSER``, a script that records what it was given)."""

from __future__ import annotations

import json
import os
import stat
import sys
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from websockets.typing import Origin

from statusctl.dashboard import dashboard_url, redirect_page
from statusd.daemon import Daemon
from tests.conftest import RawClient, daemon
from tests.websocket_clients import TIMEOUT, RpcClient, port, ws_daemon

__all__ = ["daemon", "ws_daemon"]

REPO = Path(__file__).resolve().parent.parent


async def statusctl(
    daemon: Daemon, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    environ = dict(os.environ, PYTHONPATH=str(REPO))
    environ.pop("STATUSD_SOCKET", None)
    environ.pop("BROWSER", None)
    environ.update(env or {})
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-m", "statusctl", "--socket", str(daemon.config.socket), *args],
            capture_stdout=True,
            capture_stderr=True,
            env=environ,
            check=False,
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def token_of(url: str) -> str:
    parts = urlsplit(url)
    assert parts.fragment.startswith("token=")
    return parts.fragment.removeprefix("token=")


def call_with(url: str, method: str, params: dict[str, Any] | None = None) -> Any:
    """``method`` over /ws with the link's token, as the page does (``?token=``)."""
    parts = urlsplit(url)
    ws_url = f"ws://{parts.netloc}/ws?token={token_of(url)}"
    with connect(
        ws_url,
        origin=Origin(f"http://{parts.netloc}"),
        open_timeout=TIMEOUT,
    ) as ws:
        return RpcClient(ws).request(method, params)


def page_of(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url.partition("#")[0], timeout=TIMEOUT) as response:
        return response.status, response.read()


async def test_the_link_opens_the_page_and_reads_as_the_user(ws_daemon: Daemon) -> None:
    code, out, err = await statusctl(ws_daemon, "dashboard", "--no-browser")
    assert code == 0, err
    url = out.strip()
    assert url.startswith(f"http://127.0.0.1:{port(ws_daemon)}/#token=sdt_")
    assert "\n" not in url
    assert "open it in a browser" in err
    assert "(read)" in err
    status, body = await trio.to_thread.run_sync(page_of, url)
    assert status == 200
    assert b"dashboard.js" in body
    info = await trio.to_thread.run_sync(call_with, url, "daemon.info")
    assert info["result"]["pid"] == os.getpid()
    refused = await trio.to_thread.run_sync(
        call_with, url, "tasks.download", {"urls": ["http://127.0.0.1:1/x"]}
    )
    assert refused["error"]["code"] == -32002


async def test_control_gives_a_link_that_may_change_things(ws_daemon: Daemon) -> None:
    code, out, _ = await statusctl(ws_daemon, "dashboard", "--no-browser", "--control")
    assert code == 0
    answer = await trio.to_thread.run_sync(
        call_with, out.strip(), "tasks.cancel", {"task_id": "t-none"}
    )
    assert answer["error"]["code"] == -32001  # looked for, so allowed: there is no such task


async def test_the_token_is_short_lived(ws_daemon: Daemon) -> None:
    before = datetime.now(UTC)
    code, out, _ = await statusctl(ws_daemon, "--json", "dashboard", "--no-browser")
    assert code == 0
    result = json.loads(out)
    expires = datetime.fromisoformat(result["expires_at"])
    assert (
        before + timedelta(hours=11, minutes=59) < expires < before + timedelta(hours=12, minutes=1)
    )
    assert result["scope"] == "read"
    assert result["opened"] is False
    assert result["url"].endswith(result["token"])
    code, out, _ = await statusctl(
        ws_daemon, "--json", "dashboard", "--no-browser", "--expires-in", "15m"
    )
    expires = datetime.fromisoformat(json.loads(out)["expires_at"])
    assert expires < before + timedelta(minutes=16)


async def test_a_revoked_link_opens_no_socket(ws_daemon: Daemon) -> None:
    code, out, _ = await statusctl(ws_daemon, "--json", "dashboard", "--no-browser")
    result = json.loads(out)
    code, _, _ = await statusctl(ws_daemon, "token", "revoke", result["token_id"])
    assert code == 0
    with pytest.raises(InvalidStatus) as caught:
        await trio.to_thread.run_sync(call_with, result["url"], "daemon.info")
    assert caught.value.response.status_code == 401


async def test_the_browser_gets_a_private_file_never_the_token(
    ws_daemon: Daemon, short_tmp: Path
) -> None:
    """A browser's command line is readable by every local user (/proc/PID/cmdline)."""
    runtime = short_tmp / "runtime"
    runtime.mkdir(mode=0o700)
    seen = short_tmp / "browser-args"
    browser = short_tmp / "browser"
    browser.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {seen}\n')
    browser.chmod(0o755)
    code, out, err = await statusctl(
        ws_daemon, "dashboard", env={"BROWSER": str(browser), "XDG_RUNTIME_DIR": str(runtime)}
    )
    assert code == 0, err
    assert "opened in your browser" in err
    url = out.strip()
    given = seen.read_text().strip()
    assert token_of(url) not in given
    redirect = runtime / "statusd-dashboard.html"
    assert given == redirect.as_uri()
    assert stat.S_IMODE(redirect.stat().st_mode) == 0o600
    assert f'content="0;url={url}"' in redirect.read_text()
    # Opened again: the same one file, with the new link.
    code, again, _ = await statusctl(
        ws_daemon, "dashboard", env={"BROWSER": str(browser), "XDG_RUNTIME_DIR": str(runtime)}
    )
    assert [path.name for path in runtime.iterdir()] == ["statusd-dashboard.html"]
    assert again.strip() in redirect.read_text()


async def test_no_websocket_no_dashboard(daemon: Daemon) -> None:
    code, out, err = await statusctl(daemon, "dashboard", "--no-browser")
    assert code == 4
    assert out == ""
    assert "--websocket 127.0.0.1:8765" in err


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:8765", "http://127.0.0.1:8765/#token=sdt_a_b"),
        ("0.0.0.0:8765", "http://127.0.0.1:8765/#token=sdt_a_b"),
        ("[::1]:8765", "http://[::1]:8765/#token=sdt_a_b"),
        ("[::]:8765", "http://[::1]:8765/#token=sdt_a_b"),
    ],
)
def test_dashboard_url(address: str, expected: str) -> None:
    assert dashboard_url(address, "sdt_a_b") == expected


def test_the_redirect_page_escapes_the_link() -> None:
    page = redirect_page('http://x/#token="><script>')
    assert "<script>" not in page
    assert "&quot;&gt;&lt;script&gt;" in page


async def test_daemon_info_names_the_tokens_scope(ws_daemon: Daemon) -> None:
    for flags, scope in (((), "read"), (("--control",), "control")):
        code, out, _ = await statusctl(ws_daemon, "dashboard", "--no-browser", *flags)
        assert code == 0
        info = await trio.to_thread.run_sync(call_with, out.strip(), "daemon.info")
        assert info["result"]["scope"] == scope


async def test_daemon_info_on_the_unix_socket_has_no_scope(daemon: Daemon) -> None:
    client = await RawClient.connect(daemon.config.socket)
    try:
        assert (await client.call("daemon.info"))["scope"] is None
    finally:
        await client.aclose()
