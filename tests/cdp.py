"""A small Chrome DevTools Protocol client over trio-websocket, for the dashboard's browser
tests: Debian's ``chromium`` started headless once per test module (``chromium`` fixture),
and per test a fresh page (``Page``) to navigate, evaluate script in and screenshot.

Skipped, saying why, where there is no chromium (``.ci/run`` installs it as root).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

START_TIMEOUT = 30.0
WAIT_TIMEOUT = 20.0
POLL = 0.05  # seconds between looks at the page while waiting for a condition


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@attrs.frozen
class Chromium:
    process: subprocess.Popen[bytes]
    endpoint: str  # the browser's DevTools WebSocket URL
    log: Path


@pytest.fixture(scope="module")
def chromium() -> Iterator[Chromium]:
    """One headless Chromium for the module (each test opens its own page in it)."""
    path = chromium_path()
    if path is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium; .ci/run does)")
    with launch(path) as browser:
        yield browser


@contextlib.contextmanager
def launch(path: str) -> Iterator[Chromium]:
    """Headless Chromium with a throw-away profile, stopped on the way out."""
    profile = tempfile.mkdtemp(prefix="statusd-chromium-")
    try:
        with _running(path, profile) as browser:
            yield browser
    finally:
        _remove(profile)


@contextlib.contextmanager
def _running(path: str, profile: str) -> Iterator[Chromium]:
    log = Path(profile) / "chromium.log"
    args = [
        path,
        "--headless=new",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-gpu",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        # Chromium refuses to run as root with its sandbox, and a container often lacks
        # the namespaces it needs; the tests load only their own pages.
        "--no-sandbox",
        "about:blank",
    ]
    with log.open("wb") as output:
        # A session of its own: Chromium's helpers (renderers, zygote, crashpad) are
        # stopped with it, and none is left writing into the profile or running on.
        process = subprocess.Popen(
            args, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        endpoint = _endpoint(Path(profile), process, log)
        yield Chromium(process, endpoint, log)
    finally:
        _signal_group(process, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        _signal_group(process, signal.SIGKILL)  # whatever of the group is left
        process.wait(10)


def _signal_group(process: subprocess.Popen[bytes], number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, number)


def _remove(profile: str) -> None:
    # A helper killed a moment ago may still have a file open or a write in flight.
    for _ in range(50):
        try:
            shutil.rmtree(profile)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    shutil.rmtree(profile, ignore_errors=True)


def _endpoint(profile: Path, process: subprocess.Popen[bytes], log: Path) -> str:
    """The DevTools URL, from the DevToolsActivePort file Chromium writes when ready."""
    active = profile / "DevToolsActivePort"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"chromium exited: {log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(FileNotFoundError):
            lines = active.read_text().splitlines()
            if len(lines) >= 2:
                return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
        time.sleep(0.05)
    raise AssertionError("chromium did not open its DevTools port")


class CdpError(Exception):
    pass


class Page:
    """One browser tab, attached with a flat session."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self.session: str | None = None
        self.target: str | None = None
        self.events: list[dict[str, Any]] = []

    async def _read(self) -> None:
        while True:
            message = json.loads(await self._ws.get_message())
            if "id" in message:
                channel = self._waiting.pop(message["id"], None)
                if channel is not None:
                    channel.send_nowait(message)
            else:
                self.events.append(message)

    async def send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        ident = next(self._ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if self.session is not None and not method.startswith("Target."):
            message["sessionId"] = self.session
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[ident] = send
        await self._ws.send_message(json.dumps(message))
        with trio.fail_after(WAIT_TIMEOUT):
            answer = await receive.receive()
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
        )
        if "exceptionDetails" in result:
            raise CdpError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, within: float = WAIT_TIMEOUT) -> Any:
        """Evaluate ``expression`` until it is truthy (for at most ``within`` seconds); its
        value."""
        with trio.move_on_after(within):
            while True:
                value = await self.evaluate(expression)
                if value:
                    return value
                await trio.sleep(POLL)
        last = await self.evaluate(expression)
        if last:
            return last
        body = await self.evaluate("document.body && document.body.innerText")
        raise AssertionError(f"still false after {within} s: {expression}\npage:\n{body}")

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})
        await self.wait_for("document.readyState === 'complete'")

    async def screenshot(self, path: Path) -> None:
        result = await self.send("Page.captureScreenshot", {"format": "png"})
        path.write_bytes(base64.b64decode(result["data"]))

    def console(self) -> list[str]:
        """What the page logged, and the browser's own messages about it (CSP refusals)."""
        lines = []
        for event in self.events:
            if event.get("method") == "Log.entryAdded":
                lines.append(event["params"]["entry"]["text"])
            elif event.get("method") == "Runtime.consoleAPICalled":
                args = event["params"]["args"]
                lines.append(" ".join(str(arg.get("value", "")) for arg in args))
        return lines

    def dialogs(self) -> list[str]:
        return [
            event["params"]["message"]
            for event in self.events
            if event.get("method") == "Page.javascriptDialogOpening"
        ]


@contextlib.asynccontextmanager
async def open_page(browser: Chromium) -> AsyncIterator[Page]:
    """A new tab in ``browser``, with the Page, Runtime and Log events recorded; closed
    after."""
    async with open_websocket_url(browser.endpoint, max_message_size=64 * 1024 * 1024) as ws:
        page = Page(ws)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(page._read)
            created = await page.send("Target.createTarget", {"url": "about:blank"})
            page.target = created["targetId"]
            attached = await page.send(
                "Target.attachToTarget", {"targetId": page.target, "flatten": True}
            )
            page.session = attached["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                await page.send(f"{domain}.enable")
            try:
                yield page
            finally:
                with trio.move_on_after(5):
                    await page.send("Target.closeTarget", {"targetId": page.target})
                nursery.cancel_scope.cancel()
