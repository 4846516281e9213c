"""The dashboard in a real browser: headless Chromium (one per module) driven over the
DevTools protocol (tests/cdp.py), a real daemon with its WebSocket on, real downloads
from a real HTTP server on 127.0.0.1. Skipped, saying why, without chromium.

``STATUSD_SCREENSHOT=1`` makes the screenshot test write docs/dashboard.png (otherwise it
writes into the test's temporary directory, so a test run leaves the checkout as it was).
"""

from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path
from typing import Any

import trio

from statusctl.cli import main as statusctl_main
from statusctl.dashboard import dashboard_url
from statusd.config import WebSocketConfig
from statusd.daemon import Daemon, run
from tests.cdp import Chromium, Page, chromium, open_page
from tests.conftest import RUNNER, RawClient, blocking_call, make_config, run_as_nobody
from tests.http_servers import (
    HTTPTestServer,
    Request,
    Responder,
    http_server,
    serve_data,
    status,
)
from tests.websocket_clients import address, make_token, nobody_ws_daemon, port, ws_daemon

__all__ = ["chromium", "http_server", "nobody_ws_daemon", "ws_daemon"]

DOCS = Path(__file__).resolve().parent.parent / "docs"
NEW_LINK = "ask statusctl dashboard for a new link"
SIZE = 4 * 1024 * 1024


class Gated:
    """A file sent in three parts, each after the test opens a gate: the bar can be seen
    at 25%, then 60%, then done. Honours ``Range`` (a resumed item asks for the rest)."""

    def __init__(self, size: int = SIZE) -> None:
        self.data = bytes(range(256)) * (size // 256)
        self.cuts = [size // 4, size * 6 // 10, size]
        self.gates = [trio.Event(), trio.Event()]

    async def __call__(self, request: Request, responder: Responder) -> None:
        start = 0
        headers = [("ETag", '"v1"'), ("Accept-Ranges", "bytes")]
        wanted = request.headers.get("range", "")
        if wanted.startswith("bytes="):
            start = int(wanted[6:].split("-")[0])
            headers.append(
                ("Content-Range", f"bytes {start}-{len(self.data) - 1}/{len(self.data)}")
            )
            await responder.send_head(
                206, [*headers, ("Content-Length", str(len(self.data) - start))]
            )
        else:
            await responder.send_head(200, [*headers, ("Content-Length", str(len(self.data)))])
        sent = start
        for cut, gate in zip(self.cuts, [None, *self.gates], strict=True):
            if gate is not None:
                await gate.wait()
            if cut > sent:
                await responder.send_raw(self.data[sent:cut])
                sent = cut


async def rpc(daemon: Daemon, method: str, params: dict[str, Any] | None = None) -> Any:
    client = await RawClient.connect(daemon.config.socket)
    try:
        return await client.call(method, params)
    finally:
        await client.aclose()


async def open_dashboard(page: Page, daemon: Daemon, scope: str = "control") -> str:
    token = (await make_token(daemon, scope))["token"]
    await page.navigate(dashboard_url(address(daemon), token))
    await page.wait_for("document.getElementById('connection').dataset.state === 'live'")
    await page.wait_for("document.getElementById('who').textContent !== ''")
    return str(token)


def task_js(name: str) -> str:
    """A script expression: the task element whose name is ``name`` (or null)."""
    return (
        "[...document.querySelectorAll('#tasks > li')]"
        f".find(node => node.querySelector('.name').textContent === {json.dumps(name)})"
    )


async def task_field(page: Page, name: str, expression: str) -> Any:
    return await page.evaluate(
        f"(() => {{ const t = {task_js(name)}; return t && {expression}; }})()"
    )


async def wait_task(page: Page, name: str, condition: str) -> Any:
    return await page.wait_for(
        f"(() => {{ const t = {task_js(name)}; return t && ({condition}); }})()"
    )


async def click(page: Page, name: str, action: str) -> None:
    clicked = await page.evaluate(
        f"(() => {{ const t = {task_js(name)}; const b = t && "
        f"t.querySelector('button[data-action={action}]');"
        " if (!b || b.hidden) return false; b.click(); return true; })()"
    )
    assert clicked, f"no visible {action} button on {name}"


def csp_refusals(page: Page) -> list[str]:
    return [line for line in page.console() if "Content Security Policy" in line]


async def test_the_link_leaves_the_address_bar_and_the_page_goes_live(
    chromium: Chromium, ws_daemon: Daemon
) -> None:
    async with open_page(chromium) as page:
        token = await open_dashboard(page, ws_daemon, "read")
        assert await page.evaluate("location.href") == f"http://{address(ws_daemon)}/"
        assert await page.evaluate("sessionStorage.getItem('statusd-token')") == token
        assert await page.evaluate("history.length") == 2  # about:blank, then the page
        # Read scope: no form to add downloads, and the page says so.
        assert await page.evaluate("document.getElementById('add').hidden") is True
        assert "read" in await page.evaluate("document.getElementById('who').textContent")
        # The WebSocket to ws://HOST:PORT opened under the page's CSP in Chromium.
        assert csp_refusals(page) == []


async def test_downloads_live_with_bytes_failures_and_notifications(
    chromium: Chromium, ws_daemon: Daemon, http_server: HTTPTestServer, tmp_path: Path
) -> None:
    gated = Gated()
    big = http_server.route("/big.iso", gated)
    small = http_server.route("/small.txt", serve_data(b"hello\n" * 1000))
    missing = http_server.route("/missing.txt", status(404))
    async with open_page(chromium) as page:
        await open_dashboard(page, ws_daemon)
        assert await page.evaluate("document.getElementById('add').hidden") is False

        async def add(urls: list[str]) -> None:
            await page.evaluate(
                f"document.getElementById('add-urls').value = {json.dumps(chr(10).join(urls))};"
                "document.getElementById('add-submit').click()"
            )
            await page.wait_for(
                "document.getElementById('add-result').textContent.startsWith('added task')"
            )
            await page.evaluate("document.getElementById('add-result').textContent = ''")

        await add([small])
        await add([missing])
        await wait_task(page, small, "t.dataset.status === 'completed'")
        reason = await wait_task(
            page,
            missing,
            "t.dataset.status === 'failed' && t.querySelector('.failures').textContent",
        )
        assert "http 404 not found" in reason
        # The tasks' ends arrive as notifications, with the unread count.
        titles = await page.wait_for(
            "document.querySelectorAll('#notifications > li').length >= 2 && "
            "[...document.querySelectorAll('#notifications .title')].map(n => n.textContent)"
        )
        assert any(title.startswith("Task failed") for title in titles), titles
        assert await page.wait_for("document.getElementById('unread').dataset.count === '2'")

        await add([big])
        quarter = await wait_task(
            page, big, "Number(t.dataset.bytesDone) >= 1048576 && t.dataset.bytesDone"
        )
        assert int(quarter) == SIZE // 4
        assert await task_field(page, big, "t.querySelector('.fill').style.width") == "25%"
        assert "1.0 MiB of 4.0 MiB" in await task_field(
            page, big, "t.querySelector('.numbers').textContent"
        )
        assert (
            await task_field(page, big, "t.querySelector('.current').textContent") == f"now: {big}"
        )
        status_levels = await page.evaluate(
            "[...document.querySelectorAll('#status > li')].map(n => n.dataset.level)"
        )
        assert "error" in status_levels  # the 404's

        screenshot = (
            DOCS / "dashboard.png"
            if os.environ.get("STATUSD_SCREENSHOT")
            else tmp_path / "dashboard.png"
        )
        await page.screenshot(screenshot)
        assert screenshot.read_bytes().startswith(b"\x89PNG")

        gated.gates[0].set()
        await wait_task(page, big, f"Number(t.dataset.bytesDone) === {gated.cuts[1]}")
        assert await task_field(page, big, "t.querySelector('.fill').style.width") == "60%"
        gated.gates[1].set()
        await wait_task(page, big, "t.dataset.status === 'completed'")
        assert await task_field(page, big, "t.querySelector('.fill').style.width") == "100%"
        summary = await page.wait_for(
            "document.getElementById('summary').textContent.includes('2 completed') && "
            "document.getElementById('summary').textContent"
        )
        assert "1 failed" in summary

        # Mark one read, delete another: the count and the list follow.
        await page.evaluate(
            "document.querySelector('#notifications > li.unread button[data-action=read]').click()"
        )
        await page.wait_for("document.getElementById('unread').dataset.count === '2'")
        before = await page.evaluate("document.querySelectorAll('#notifications > li').length")
        await page.evaluate(
            "document.querySelector("
            "'#notifications > li:not(.unread) button[data-action=delete]').click()"
        )
        await page.wait_for(
            f"document.querySelectorAll('#notifications > li').length === {before - 1}"
        )
        assert csp_refusals(page) == []


async def test_pause_and_resume_through_the_buttons(
    chromium: Chromium, ws_daemon: Daemon, http_server: HTTPTestServer
) -> None:
    gated = Gated()
    url = http_server.route("/paused.iso", gated)
    await rpc(ws_daemon, "tasks.download", {"urls": [url]})
    async with open_page(chromium) as page:
        await open_dashboard(page, ws_daemon)
        await wait_task(page, url, f"Number(t.dataset.bytesDone) === {gated.cuts[0]}")
        await click(page, url, "pause")
        await wait_task(page, url, "t.dataset.status === 'paused'")
        assert await task_field(page, url, "t.querySelector('button[data-action=pause]').hidden")
        for gate in gated.gates:
            gate.set()
        await click(page, url, "resume")
        await wait_task(page, url, "t.dataset.status === 'completed'")
        ranges = [
            request.headers.get("range") for request in http_server.requests_for("/paused.iso")
        ]
        assert ranges == [None, f"bytes={gated.cuts[0]}-"]


async def test_daemon_text_is_shown_as_text(
    chromium: Chromium, ws_daemon: Daemon, http_server: HTTPTestServer
) -> None:
    name = "<img src=x onerror=alert(1)>"
    url = http_server.route("/x.txt", serve_data(b"x"))
    await rpc(ws_daemon, "tasks.download", {"urls": [url], "name": name})
    await rpc(
        ws_daemon,
        "status.publish",
        {"level": "warning", "message": "<b>bold</b> <script>alert(2)</script>"},
    )
    await rpc(
        ws_daemon,
        "notifications.create",
        {
            "username": RUNNER,
            "type": "info",
            "title": "<img src=y onerror=alert(3)>",
            "message": "<i>m</i>",
        },
    )
    async with open_page(chromium) as page:
        await open_dashboard(page, ws_daemon)
        await wait_task(page, name, "t.dataset.status === 'completed'")
        await page.wait_for("document.querySelectorAll('#notifications > li').length >= 1")
        texts = await page.wait_for(
            "[...document.querySelectorAll('#status .text')].map(n => n.textContent)"
            ".find(text => text.includes('<b>'))"
        )
        assert texts == "<b>bold</b> <script>alert(2)</script>"
        assert (
            await page.evaluate(
                "document.querySelectorAll('main img, main b, main i, main script').length"
            )
            == 0
        )
        assert "<img src=y onerror=alert(3)>" in await page.evaluate(
            "document.getElementById('notifications').textContent"
        )
        assert page.dialogs() == []


async def test_a_page_of_another_origin_cannot_open_the_socket(
    chromium: Chromium, ws_daemon: Daemon, http_server: HTTPTestServer
) -> None:
    token = (await make_token(ws_daemon, "control"))["token"]
    elsewhere = http_server.route("/", serve_data(b"<!doctype html><title>elsewhere</title>"))
    socket_url = f"ws://127.0.0.1:{port(ws_daemon)}/ws?token={token}"
    attempt = (
        "new Promise(done => { const ws = new WebSocket(" + json.dumps(socket_url) + ");"
        " ws.onopen = () => { ws.close(); done('open'); };"
        " ws.onclose = event => done('closed ' + event.code); })"
    )
    async with open_page(chromium) as page:
        await page.navigate(elsewhere)
        assert await page.evaluate(attempt) == "closed 1006"
        # The same socket from the dashboard's own origin opens.
        await page.navigate(f"http://{address(ws_daemon)}/")
        assert await page.evaluate(attempt) == "open"


async def test_a_revoked_or_unknown_token_asks_for_a_new_link(
    chromium: Chromium, ws_daemon: Daemon
) -> None:
    async with open_page(chromium) as page:
        token = await open_dashboard(page, ws_daemon, "read")
        token_id = token.split("_")[1]
        await rpc(ws_daemon, "tokens.revoke", {"token_id": token_id})
        banner = await page.wait_for(
            "!document.getElementById('banner').hidden && "
            "document.getElementById('banner').textContent"
        )
        assert NEW_LINK in banner
        assert "token revoked" in banner
        assert await page.evaluate("sessionStorage.getItem('statusd-token')") is None
        # A link whose token the daemon never issued: refused at the handshake.
        await page.navigate(dashboard_url(address(ws_daemon), token))
        banner = await page.wait_for(
            "document.getElementById('connection').dataset.state === 'refused' && "
            "document.getElementById('banner').textContent"
        )
        assert NEW_LINK in banner
        # No token at all.
        await page.navigate(f"http://{address(ws_daemon)}/")
        assert NEW_LINK in await page.wait_for("document.getElementById('banner').textContent")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        chosen: int = probe.getsockname()[1]
        return chosen


async def test_a_daemon_restart_is_ridden_out_and_the_gap_filled(
    chromium: Chromium, nursery: trio.Nursery, short_tmp: Path
) -> None:
    config = make_config(short_tmp, websocket=WebSocketConfig(listen=("127.0.0.1", free_port())))
    first: Daemon = await nursery.start(run, config)
    await rpc(first, "status.publish", {"level": "info", "message": "before the restart"})
    async with open_page(chromium) as page:
        await open_dashboard(page, first)
        await page.wait_for(status_shown("before the restart"))
        first.request_stop()
        await first.wait_stopped()
        await page.wait_for("document.getElementById('connection').dataset.state === 'down'")
        second: Daemon = await nursery.start(run, config)
        try:
            # Published while the page is away: it arrives through `since` on reconnect.
            await rpc(second, "status.publish", {"level": "success", "message": "while away"})
            await page.wait_for("document.getElementById('connection').dataset.state === 'live'")
            await page.wait_for(status_shown("while away"))
            await page.wait_for(status_shown("the daemon restarted"))
            assert await page.evaluate("document.getElementById('banner').hidden") is True
        finally:
            second.request_stop()
            await second.wait_stopped()


def status_shown(text: str) -> str:
    return (
        "[...document.querySelectorAll('#status .text')]"
        f".some(node => node.textContent === {json.dumps(text)})"
    )


async def test_each_user_sees_their_own_tasks_and_an_admin_everyones(
    chromium: Chromium, nobody_ws_daemon: Daemon, http_server: HTTPTestServer
) -> None:
    """``statusctl dashboard`` run as uid nobody (a forked child) gives nobody's link: its
    page shows nobody's task and not root's; root's page shows both, with the owner."""
    daemon = nobody_ws_daemon
    theirs = http_server.route("/nobodys.txt", serve_data(b"n" * 100))
    ours = http_server.route("/roots.txt", serve_data(b"r" * 100))
    await rpc(daemon, "tasks.download", {"urls": [ours]})
    socket_path = str(daemon.config.socket)

    def as_nobody() -> dict[str, Any]:
        out, err = io.StringIO(), io.StringIO()
        argv = ["--socket", socket_path, "dashboard", "--no-browser", "--control"]
        code = statusctl_main(argv, stdout=out, stderr=err)
        made = blocking_call(Path(socket_path), "tasks.download", {"urls": [theirs]})
        return {"code": code, "link": out.getvalue().strip(), "err": err.getvalue(), "made": made}

    outcome = await trio.to_thread.run_sync(run_as_nobody, as_nobody)
    assert outcome["code"] == 0, outcome["err"]
    assert "result" in outcome["made"], outcome["made"]
    async with open_page(chromium) as page:
        await page.navigate(outcome["link"])
        await page.wait_for("document.getElementById('connection').dataset.state === 'live'")
        who = await page.wait_for("document.getElementById('who').textContent")
        assert who == "nobody, control"
        await wait_task(page, theirs, "true")
        assert await task_field(page, theirs, "t.querySelector('.owner').textContent") == ""
        assert await page.evaluate(task_js(ours)) is None
        assert await page.evaluate("document.querySelectorAll('#tasks > li').length") == 1
    async with open_page(chromium) as page:
        await open_dashboard(page, daemon, "read")
        await wait_task(page, theirs, "true")
        await wait_task(page, ours, "true")
        assert await task_field(page, theirs, "t.querySelector('.owner').textContent") == "nobody"
        assert await task_field(page, ours, "t.querySelector('.owner').textContent") == RUNNER


async def test_a_dropped_notice_is_shown_in_the_stream(
    chromium: Chromium, ws_daemon: Daemon
) -> None:
    """What the page does with the daemon's ``dropped`` push (a slow page's lost messages),
    handed to its push handler directly: a browser cannot be made to read slowly here."""
    async with open_page(chromium) as page:
        await open_dashboard(page, ws_daemon, "read")
        await page.evaluate("pushed('dropped', {stream: 'status', count: 42})")
        await page.wait_for(
            status_shown("42 status messages were dropped (the page or the connection fell behind)")
        )
        assert await page.evaluate("document.querySelector('#status > li.dropped') !== null")


async def test_retry_and_cancel_through_the_buttons(
    chromium: Chromium, ws_daemon: Daemon, http_server: HTTPTestServer
) -> None:
    missing = http_server.route("/gone.txt", status(404))
    gated = Gated()
    held = http_server.route("/held.iso", gated)
    await rpc(ws_daemon, "tasks.download", {"urls": [missing]})
    async with open_page(chromium) as page:
        await open_dashboard(page, ws_daemon)
        await wait_task(page, missing, "t.dataset.status === 'failed'")
        await click(page, missing, "retry")
        # Each attempt's failure is an error line in the status stream: two after the retry.
        await page.wait_for(
            "[...document.querySelectorAll('#status .text')]"
            ".filter(node => node.textContent.includes('gone.txt: http 404')).length === 2"
        )
        await wait_task(page, missing, "t.dataset.status === 'failed'")
        assert len(http_server.requests_for("/gone.txt")) == 2
        await rpc(ws_daemon, "tasks.download", {"urls": [held]})
        await wait_task(page, held, f"Number(t.dataset.bytesDone) === {gated.cuts[0]}")
        await click(page, held, "cancel")
        await wait_task(page, held, "t.dataset.status === 'cancelled'")
        assert (
            await task_field(page, held, "t.querySelector('button[data-action=retry]').hidden")
            is False
        )
