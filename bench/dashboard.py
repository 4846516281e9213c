"""The dashboard's responsiveness with many tasks and a busy status stream, measured in
headless Chromium (docs/dashboard.md, "Responsiveness").

A daemon in this process with its WebSocket on gets ``--tasks`` finished download tasks
(one small file each, from a local HTTP server), then the dashboard is opened in Chromium
over the DevTools protocol (tests/cdp.py) and, for ``--seconds``, the status stream gets
``--rate`` messages a second. Measured in the page:

- load: from navigation to every task on the page;
- the main thread's lag: a 20 ms timer's lateness (what a click or a scroll would wait),
  p50, p99 and worst, while the messages flow;
- long tasks (over 50 ms, the browser's PerformanceObserver) while they flow;
- the page's own render per animation frame: frames, mean and worst time.

    python bench/dashboard.py [--tasks 1000] [--rate 100] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from statusctl.dashboard import dashboard_url
from statusd.config import LimitsConfig, WebSocketConfig
from statusd.daemon import Daemon, run
from tests.cdp import chromium_path, launch, open_page
from tests.conftest import RawClient, make_config
from tests.http_servers import HTTPTestServer, serve_data

PROBE = """
window.benchLags = [];
window.benchLongTasks = [];
new PerformanceObserver(list => {
  for (const entry of list.getEntries()) window.benchLongTasks.push(entry.duration);
}).observe({ type: "longtask" });
let expected = performance.now() + 20;
window.benchTimer = setInterval(() => {
  const now = performance.now();
  window.benchLags.push(Math.max(0, now - expected));
  expected = now + 20;
}, 20);
const stats = window.statusdDashboard.stats;
window.benchBefore = { frames: stats.frames, renderMs: stats.renderMs };
stats.longestRenderMs = 0;
true
"""

RESULT = """
clearInterval(window.benchTimer);
(() => {
  const lags = window.benchLags.slice().sort((a, b) => a - b);
  const at = q => lags[Math.min(lags.length - 1, Math.floor(q * lags.length))];
  const stats = window.statusdDashboard.stats;
  const frames = stats.frames - window.benchBefore.frames;
  return {
    lag_p50: at(0.5), lag_p99: at(0.99), lag_max: lags[lags.length - 1], samples: lags.length,
    long_tasks: window.benchLongTasks.length,
    long_task_max: Math.max(0, ...window.benchLongTasks),
    frames, render_mean: (stats.renderMs - window.benchBefore.renderMs) / Math.max(1, frames),
    render_max: stats.longestRenderMs,
    status_lines: document.querySelectorAll('#status > li').length,
    tasks_shown: document.querySelectorAll('#tasks > li').length,
  };
})()
"""


async def rpc(daemon: Daemon, method: str, params: dict[str, Any] | None = None) -> Any:
    client = await RawClient.connect(daemon.config.socket)
    try:
        return await client.call(method, params)
    finally:
        await client.aclose()


async def measure(args: argparse.Namespace, browser_path: str, directory: Path) -> dict[str, Any]:
    async with trio.open_nursery() as nursery:
        server = HTTPTestServer()
        await nursery.start(server.serve)
        url = server.route("/f.txt", serve_data(b"x" * 1024))
        config = make_config(
            directory,
            websocket=WebSocketConfig(listen=("127.0.0.1", 0)),
            limits=LimitsConfig(max_tasks_per_user=args.tasks + 10),
        )
        daemon: Daemon = await nursery.start(run, config)
        client = await RawClient.connect(daemon.config.socket)
        for _ in range(args.tasks):
            await client.call("tasks.download", {"urls": [url]})
        for _ in range(3000):  # ten minutes at most
            if (await client.call("tasks.summary"))["completed"] >= args.tasks:
                break
            await trio.sleep(0.2)
        token = (await client.call("tokens.create", {"scope": "read"}))["token"]
        assert daemon.websocket is not None
        assert daemon.websocket.address is not None
        link = dashboard_url(daemon.websocket.address, token)
        with launch(browser_path) as browser:
            async with open_page(browser) as page:
                started = time.perf_counter()
                await page.navigate(link)
                await page.wait_for(
                    f"document.querySelectorAll('#tasks > li').length >= {args.tasks}", 120
                )
                load_s = time.perf_counter() - started
                await page.evaluate(PROBE)
                interval = 1 / args.rate
                deadline = trio.current_time() + args.seconds
                next_at = trio.current_time()
                sent = 0
                while trio.current_time() < deadline:
                    await client.call(
                        "status.publish", {"level": "info", "message": f"message {sent}"}
                    )
                    sent += 1
                    next_at += interval
                    await trio.sleep_until(next_at)
                await page.wait_for(
                    "[...document.querySelectorAll('#status .text')]"
                    f".some(node => node.textContent === 'message {sent - 1}')",
                    30,
                )
                result: dict[str, Any] = await page.evaluate(RESULT)
        await client.aclose()
        daemon.request_stop()
        await daemon.wait_stopped()
        nursery.cancel_scope.cancel()
    result.update(load_s=load_s, sent=sent, seconds=args.seconds, rate=args.rate)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    browser_path = chromium_path()
    if browser_path is None:
        print("no chromium on PATH (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    directory = Path(tempfile.mkdtemp(prefix="statusd-bench-dashboard-", dir="/tmp"))
    try:
        result = trio.run(measure, args, browser_path, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.tasks} tasks on the page in {result['load_s']:.2f} s")
    print(
        f"{result['sent']} status messages in {args.seconds:.0f} s ({args.rate:.0f}/s): "
        f"main-thread lag p50 {result['lag_p50']:.1f} ms, p99 {result['lag_p99']:.1f} ms, "
        f"worst {result['lag_max']:.1f} ms ({result['samples']} samples); "
        f"{result['long_tasks']} long tasks (worst {result['long_task_max']:.0f} ms); "
        f"{result['frames']} renders, mean {result['render_mean']:.2f} ms, "
        f"worst {result['render_max']:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
