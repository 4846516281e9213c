"""One rule for how far a task is: the daemon's TaskInfo ``progress`` (``progress_of`` in
statusd/state/tasks.py), and the same rule in its displays, ``render.task_fraction`` in
statusctl and ``taskFraction`` in the dashboard (for what they are sent, rounded values
and older daemons included). All three are held to the same table here (the JavaScript
one in headless Chromium), and a task that failed with nothing saved shows 0% in both
``statusctl tasks`` and the dashboard's bar, never a full red one."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from statusctl import render
from statusd.daemon import Daemon
from statusd.state.tasks import TaskInfo, TaskStatus, progress_of
from tests.cdp import Chromium, chromium, open_page
from tests.http_servers import HTTPTestServer, http_server, serve_data, status
from tests.test_dashboard_browser import open_dashboard, rpc, wait_task
from tests.test_statusctl import statusctl
from tests.websocket_clients import ws_daemon

__all__ = ["chromium", "http_server", "ws_daemon"]

MiB = 1 << 20
T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)

# (what the case is, TaskInfo fields, the fraction both sides must give)
CASES: list[tuple[str, dict[str, Any], float]] = [
    ("completed", {"status": "completed", "progress": 40.0}, 1.0),
    (
        "bytes when the total is known",
        {"status": "running", "progress": 0.0, "bytes_done": MiB, "bytes_total": 4 * MiB},
        0.25,
    ),
    (
        "items when it is not",
        {"status": "running", "progress": 30.0, "total_items": 10, "processed_items": 3},
        0.3,
    ),
    (
        "a 404 with nothing saved",
        {"status": "failed", "progress": 100.0, "total_items": 1, "processed_items": 1},
        0.0,
    ),
    (
        "a 404's result says none completed",
        {
            "status": "failed",
            "progress": 100.0,
            "total_items": 1,
            "result": {"completed": 0, "failed": 1},
        },
        0.0,
    ),
    (
        "one of two saved, one failed, sizes unknown",
        {
            "status": "failed",
            "progress": 100.0,
            "bytes_done": 600,
            "total_items": 2,
            "result": {"completed": 1, "failed": 1},
        },
        0.5,
    ),
    (
        "failed with a part kept, total known",
        {"status": "failed", "progress": 6.25, "bytes_done": MiB, "bytes_total": 16 * MiB},
        0.0625,
    ),
    (
        "failed with a part kept, its result says none completed",
        {
            "status": "failed",
            "progress": 6.25,
            "bytes_done": MiB,
            "bytes_total": 16 * MiB,
            "total_items": 1,
            "result": {"completed": 0, "failed": 1},
        },
        0.0,
    ),
    ("cancelled before a byte", {"status": "cancelled", "progress": 50.0}, 0.0),
    (
        "failed, bytes but no result yet",
        {
            "status": "failed",
            "progress": 50.0,
            "bytes_done": 10,
            "total_items": 2,
            "processed_items": 1,
        },
        0.5,
    ),
    ("no numbers at all", {"status": "pending"}, 0.0),
    ("over the top", {"status": "running", "bytes_done": 9, "bytes_total": 4}, 1.0),
    ("paused by items", {"status": "paused", "progress": 75.0}, 0.75),
]


@pytest.mark.parametrize(
    ("info", "expected"), [case[1:] for case in CASES], ids=[c[0] for c in CASES]
)
def test_statusctl_rule(info: dict[str, Any], expected: float) -> None:
    assert render.task_fraction(info) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("info", "expected"), [case[1:] for case in CASES], ids=[c[0] for c in CASES]
)
def test_the_daemons_field_follows_the_same_rule(info: dict[str, Any], expected: float) -> None:
    fields = {name: value for name, value in info.items() if name != "status"}
    task = TaskInfo("t1", "n", "download", "alice", TaskStatus(info["status"]), T0, **fields)
    assert progress_of(task) / 100 == pytest.approx(expected)


async def test_dashboard_rule_matches_the_same_table(chromium: Chromium, ws_daemon: Daemon) -> None:
    async with open_page(chromium) as page:
        await open_dashboard(page, ws_daemon, "read")
        infos = json.dumps([info for _, info, _ in CASES])
        got = await page.evaluate(f"JSON.stringify({infos}.map(taskFraction))")
    for (name, _, expected), fraction in zip(CASES, json.loads(got), strict=True):
        assert fraction == pytest.approx(expected), name


async def test_a_failed_download_is_an_empty_bar_on_both_sides(
    chromium: Chromium, ws_daemon: Daemon, http_server: HTTPTestServer
) -> None:
    missing = http_server.route("/missing.iso", status(404))
    ok = http_server.route("/ok.txt", serve_data(b"x" * 600))
    lost = http_server.route("/lost.txt", status(404))
    failed = (await rpc(ws_daemon, "tasks.download", {"urls": [missing]}))["task_id"]
    half = (await rpc(ws_daemon, "tasks.download", {"urls": [ok, lost], "name": "half"}))["task_id"]
    async with open_page(chromium) as page:
        await open_dashboard(page, ws_daemon, "read")
        await wait_task(page, missing, "t.dataset.status === 'failed'")
        await wait_task(page, "half", "t.dataset.status === 'failed'")
        shown = await page.evaluate(
            "Object.fromEntries([...document.querySelectorAll('#tasks > li')].map(t => "
            "[t.querySelector('.name').textContent, [t.querySelector('.fill').style.width, "
            "t.querySelector('.numbers').textContent.split('  ')[0]]]))"
        )
    assert shown[missing] == ["0%", "0.0%"]
    assert shown["half"] == ["50%", "50.0%"]
    listed = await statusctl("--socket", str(ws_daemon.config.socket), "tasks")
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
    assert rows[failed][1:3] == ["failed", "0.0%"], listed.stdout
    assert rows[half][1:3] == ["failed", "50.0%"], listed.stdout
