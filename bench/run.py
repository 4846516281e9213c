"""The product's benchmark: what a user runs, a real statusd process called over its socket,
side by side with the peers a user would otherwise pick, every row of issue 12 in one run.

Not a test. Each row starts its own ``statusd`` (``python -m statusd``: its own state
directory, socket and a config file with the row's settings) and drives it from client
processes of their own (bench/_clients.py) over the Unix socket, or the WebSocket for the
fan-out row. The peers run in the same rounds, in rotating order (a shared machine drifts);
every figure is the median of the rounds, every ratio is statusd's median over the peer's.

Rows (``--rows`` picks some, by key):

- ``files``: 2,000 x 16 KiB, ``[downloads] parallel_items = 16``, ``batch_size = 1000``,
  ``max_per_host = 16``,
  against ``aria2c -j16 -i LIST`` and ``aria2c --enable-rpc`` (``-j16``) fed one
  ``aria2.addUri`` per file and polled with ``aria2.getGlobalStat`` until all stopped;
- ``files-defaults``: the same files, every tool with its defaults;
- ``big``: one 256 MiB file, ``tasks.download``, against curl;
- ``creates-1``, ``creates-16``: ``notifications.create`` (answered = on disk) from 1 and 16
  client processes, against sqlite (WAL, ``synchronous=FULL``, a transaction per row) from
  as many processes; both on the disk under ``--disk-dir``; and, as a breakdown line, the
  same calls to bench/minirpc.py with its journal (the floor: a trio server that appends
  each create's line and answers after its ``fdatasync``, group commit in a thread);
- ``info-1``, ``info-16``: ``daemon.info`` from 1 and 16 client processes, each call awaited
  before the next, against bench/minirpc.py (a minimal trio JSON-RPC server);
- ``fanout``: status fan-out to S = 100 subscribers in other processes, over the Unix socket
  and the WebSocket: deliveries/s with the publisher as fast as it is answered, and p99
  publish -> receive at 1,000 messages/s (bench/fanout.py's subscribers and publisher);
- ``loaded``: one 512 MiB download while 100 subscribers take 1,000 status messages/s,
  against the same download alone.

Downloads come from nginx on 127.0.0.1 (installed with apt-get when missing, as root; else
the fallback server of bench/downloads.py) and land on /dev/shm, where the download rows'
daemons keep their state too; the create rows keep theirs on a real disk.

Usage::

    python bench/run.py [--quick] [--rows files,big,...] [--rounds 3] [--markdown]
                        [--profile ROW] [--no-install] [--disk-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import _clients
import _profile
import attrs
import downloads
import fanout
import store
from _servers import (
    ServerProcess,
    known_keys,
    start_aria2_rpc,
    start_minirpc,
    start_statusd,
)

REPO = Path(__file__).resolve().parent.parent
ROWS = (
    "files",
    "files-defaults",
    "big",
    "creates-1",
    "creates-16",
    "info-1",
    "info-16",
    "fanout",
    "loaded",
)
FLOOR = "floor: bench/minirpc.py --journal"
FANOUT_GOAL = 2_000_000
P99_GOAL_MS = 5.0


@attrs.frozen
class Sizes:
    files: int
    file_kib: int
    big_mib: int
    loaded_mib: int
    creates: int
    calls: int
    fanout_subscribers: int
    fanout_messages: int
    fanout_seconds: float
    rate: float


FULL = Sizes(2000, 16, 256, 512, 2000, 10_000, 100, 50_000, 5.0, 1000.0)
QUICK = Sizes(400, 16, 64, 128, 1000, 5000, 100, 10_000, 1.5, 1000.0)


@attrs.frozen
class Line:
    """One line of the table: statusd's figure, a peer's, and the ratio."""

    workload: str
    statusd: str
    peer: str
    peer_value: str
    ratio: str
    goal: str
    runs: str  # every round's figure, statusd then the peer


@attrs.define
class Bench:
    """What every row shares: the files and the server, the work directories, the tools."""

    sizes: Sizes
    rounds: int
    tools: dict[str, str | None]
    base: str
    files: downloads.Files
    big: str  # URL path of the big file
    loaded: str  # URL path of the file of the loaded row
    shm: Path  # fast scratch: destinations and the download rows' daemons
    disk: Path  # a real disk: the create rows' daemons and sqlite
    known: set[str]
    profile: str | None
    # Each profiled daemon's own file, under a label saying which daemons it shares a
    # summary with: the row, and in the fan-out row the transport and phase (one summary
    # mixing the Unix socket's daemons with the WebSocket's says nothing about either).
    profiles: dict[str, list[Path]] = attrs.Factory(dict)
    runs: int = 0

    def scratch(self, under: Path, name: str) -> Path:
        self.runs += 1
        directory = under / f"{name}-{self.runs}"
        directory.mkdir(parents=True)
        return directory

    @contextlib.contextmanager
    def statusd(
        self,
        row: str,
        settings: dict[str, Any],
        *,
        on_disk: bool = False,
        websocket: bool = False,
        part: str | None = None,
    ) -> Iterator[ServerProcess]:
        directory = self.scratch(self.disk if on_disk else self.shm, f"statusd-{row}")
        settings = {"download_dir": str(directory / "downloads"), **settings}
        server = start_statusd(directory, settings, websocket=websocket, known=self.known)
        spy: subprocess.Popen[bytes] | None = None
        try:
            server.wait_ready()
            if websocket:
                server.mint_token()
            if self.profile == row:
                spy = self._start_profile(row if part is None else f"{row} {part}", server)
            yield server
            server.check_alive()
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
            server.stop()

    def _start_profile(self, label: str, server: ServerProcess) -> subprocess.Popen[bytes] | None:
        here = str(Path(sys.executable).parent)
        spy = shutil.which("py-spy") or shutil.which("py-spy", path=here)
        if spy is None:
            _say("py-spy not found (pip install '.[bench]'): no profile")
            return None
        files = self.profiles.setdefault(label, [])
        stem = re.sub(r"\W+", "-", label)
        name = f"statusd-profile-{stem}-{len(files) + 1}.txt"
        out = Path(tempfile.gettempdir()) / name
        files.append(out)
        argv = [spy, "record", "-p", str(server.process.pid), "-r", "250", "-f", "raw",
                "--idle", "--threads", "-o", str(out), "--nonblocking"]  # fmt: skip
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # py-spy attaches before the work starts
        return process

    def contenders(self, row: str, names: list[str]) -> list[str]:
        """Under py-spy statusd's figures mean nothing against a peer's, and the peers' turns
        would count as the daemon's idle time: a profiled row runs statusd alone."""
        return ["statusd"] if self.profile == row else names

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _rotations(names: Sequence[str], rounds: int) -> Iterator[tuple[int, str]]:
    for number in range(rounds):
        shift = number % len(names)
        for name in [*names[shift:], *names[:shift]]:
            yield number, name


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _fmt(value: float, unit: str) -> str:
    if value != value:  # nan
        return "n/a"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "MB/s":
        return f"{value:,.0f} MB/s"
    return f"{value:,.0f} {unit}"


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs > 0 and ours == ours else "n/a"


def _lines(
    workload: str,
    unit: str,
    results: dict[str, list[float]],
    peers: Sequence[tuple[str, str]],
    goal: str,
) -> list[Line]:
    """Lines for statusd's figures in ``results['statusd']`` against each (key, label) peer."""
    ours = _median(results["statusd"])
    lines = []
    for key, label in peers:
        theirs = results.get(key, [])
        lines.append(
            Line(
                workload,
                _fmt(ours, unit),
                label,
                _fmt(_median(theirs), unit) if theirs else "not run",
                _ratio(ours, _median(theirs)) if theirs else "n/a",
                goal,
                "statusd "
                + ", ".join(f"{v:,.0f}" for v in results["statusd"])
                + (f"; {label} " + ", ".join(f"{v:,.0f}" for v in theirs) if theirs else ""),
            )
        )
    return lines


# -- the download rows ----------------------------------------------------------------------


def _check_files(dest: Path, count: int, size: int) -> None:
    sizes = [path.stat().st_size for path in dest.iterdir() if path.is_file()]
    if len(sizes) != count or set(sizes) != {size}:
        raise RuntimeError(f"{dest} holds {len(sizes)} files of sizes {sorted(set(sizes))}")


def _statusd_download(bench: Bench, server: ServerProcess, urls: list[str]) -> tuple[float, Path]:
    dest = bench.scratch(bench.shm, "dest")
    params = bench.scratch(bench.shm, "params") / "params.json"
    params.write_text(json.dumps({"urls": urls, "dest": str(dest)}))
    argv = _clients.command("download", "--socket", server.socket, "--params-file", str(params))
    seconds, _ = _clients.run_gang([argv])
    return seconds, dest


def _aria2_inputs(bench: Bench, name: str, urls: list[str]) -> tuple[str, Path, Path, Path]:
    """aria2c's path, a scratch directory, its empty ``out`` and the URL list in it."""
    aria2c = bench.tools["aria2c"]
    assert aria2c is not None
    directory = bench.scratch(bench.shm, name)
    dest = directory / "out"
    dest.mkdir()
    listing = directory / "urls.txt"
    listing.write_text("\n".join(urls) + "\n")
    return aria2c, directory, dest, listing


def _aria2_rpc_download(bench: Bench, urls: list[str], options: list[str]) -> tuple[float, Path]:
    aria2c, directory, dest, listing = _aria2_inputs(bench, "aria2-rpc", urls)
    daemon = start_aria2_rpc(aria2c, directory, dest, options)
    try:
        argv = _clients.command("aria2", "--url", daemon.url, "--urls", str(listing))
        seconds, _ = _clients.run_gang([argv])
    finally:
        daemon.stop()
    return seconds, dest


def _aria2_cli_download(bench: Bench, urls: list[str], options: list[str]) -> tuple[float, Path]:
    aria2c, _, dest, listing = _aria2_inputs(bench, "aria2c", urls)
    run = downloads.timed_process([aria2c, "-q", "-d", str(dest), *options, "-i", str(listing)])
    return run.seconds, dest


def row_files(bench: Bench, *, tuned: bool) -> list[Line]:
    count, size = len(bench.files.small), bench.files.small_bytes
    urls = [bench.url(name) for name in bench.files.small]
    # 16 at a time from the one server, as aria2c -j16 does: max_per_host (4 by default)
    # is raised with them, as for any server of one's own.
    settings: dict[str, Any] = (
        {
            "downloads.parallel_items": 16,
            "downloads.batch_size": 1000,
            "downloads.max_per_host": 16,
        }
        if tuned
        else {}
    )
    # aria2c's own defaults (-j5, preallocation) in the defaults row; -j16 and no
    # preallocation (statusd does none) in the tuned one.
    options = ["-j16", "--file-allocation=none"] if tuned else []
    results: dict[str, list[float]] = {"statusd": []}
    contenders = ["statusd"]
    if bench.tools["aria2c"]:
        contenders += ["aria2c", "aria2c-rpc"]
    row = "files" if tuned else "files-defaults"
    with bench.statusd(row, settings) as server:
        for number, name in _rotations(bench.contenders(row, contenders), bench.rounds):
            if name == "statusd":
                seconds, dest = _statusd_download(bench, server, urls)
            elif name == "aria2c":
                seconds, dest = _aria2_cli_download(bench, urls, options)
            else:
                seconds, dest = _aria2_rpc_download(bench, urls, options)
            _check_files(dest, count, size)
            shutil.rmtree(dest, ignore_errors=True)
            results.setdefault(name, []).append(count / seconds)
            _say(f"  {row} round {number + 1}: {name:11} {count / seconds:9,.0f} files/s")
    what = (
        f"{count:,} x {size >> 10} KiB, 16 at a time (parallel_items 16, batch_size 1000)"
        if tuned
        else f"{count:,} x {size >> 10} KiB, both tools' defaults"
    )
    cli = "aria2c -j16 -i" if tuned else "aria2c -i"
    rpc = "aria2c --enable-rpc -j16" if tuned else "aria2c --enable-rpc"
    return _lines(what, "files/s", results, [("aria2c", cli), ("aria2c-rpc", rpc)], ">= 1.0x")


def row_big(bench: Bench) -> list[Line]:
    size = bench.sizes.big_mib << 20
    url = bench.url(bench.big)
    contenders = ["statusd"] + (["curl"] if bench.tools["curl"] else [])
    results: dict[str, list[float]] = {"statusd": []}
    with bench.statusd("big", {}) as server:
        for number, name in _rotations(bench.contenders("big", contenders), bench.rounds):
            if name == "statusd":
                seconds, dest = _statusd_download(bench, server, [url])
            else:
                curl = bench.tools["curl"]
                assert curl is not None
                dest = bench.scratch(bench.shm, "curl")
                run = downloads.timed_process(
                    [curl, "-sS", "--fail", "-o", str(dest / "big.bin"), url]
                )
                seconds = run.seconds
            _check_files(dest, 1, size)
            shutil.rmtree(dest, ignore_errors=True)
            results.setdefault(name, []).append(size / 1e6 / seconds)
            _say(f"  big round {number + 1}: {name:8} {size / 1e6 / seconds:9,.0f} MB/s")
    what = f"one {bench.sizes.big_mib} MiB file, `tasks.download`"
    return _lines(what, "MB/s", results, [("curl", "curl")], ">= 1.0x")


# -- notifications.create against sqlite ----------------------------------------------------


def _shares(total: int, clients: int) -> list[int]:
    return [total // clients + (1 if k < total % clients else 0) for k in range(clients)]


def row_creates(bench: Bench, clients: int) -> list[Line]:
    total = bench.sizes.creates
    results: dict[str, list[float]] = {"statusd": []}
    row = f"creates-{clients}"
    floor = start_minirpc(bench.scratch(bench.disk, "floor"), journal=True)
    try:
        floor.wait_ready()
        with bench.statusd(row, {}, on_disk=True) as server:
            contenders = bench.contenders(row, ["statusd", "sqlite", "floor"])
            for number, name in _rotations(contenders, bench.rounds):
                if name == "sqlite":
                    argvs = _sqlite_clients(bench.scratch(bench.disk, "sqlite"), total, clients)
                else:
                    path = server.socket if name == "statusd" else floor.socket
                    argvs = _create_clients(path, total, clients)
                seconds, _ = _clients.run_gang(argvs)
                results.setdefault(name, []).append(total / seconds)
                _say(f"  {row} round {number + 1}: {name:8} {total / seconds:9,.0f}/s")
            floor.check_alive()
    finally:
        floor.stop()
    plural = "es" if clients > 1 else ""
    what = f"`notifications.create`, {clients} client process{plural}, answered = on disk"
    goal = ">= 1.0x" if clients == 1 else ">= 10x"
    peer = f"sqlite WAL FULL, txn per row, {clients} process{plural}"
    lines = _lines(what, "creates/s", results, [("sqlite", peer)], goal)
    # The floor is a breakdown, not a peer: what any socket daemon pays at least for a
    # durable create (the round trip, a thread, the append and its fdatasync).
    (floor_line,) = _lines(what, "creates/s", results, [("floor", FLOOR)], "breakdown")
    return [*lines, floor_line]


def _create_clients(path: str, total: int, clients: int) -> list[list[str]]:
    argvs = []
    for k, share in enumerate(_shares(total, clients)):
        params = json.dumps(_notification(k))
        argv = ["--socket", path, "--method", "notifications.create", "--params", params]
        argvs.append(_clients.command("calls", *argv, "--count", str(share)))
    return argvs


def _sqlite_clients(directory: Path, total: int, clients: int) -> list[list[str]]:
    """One process per client, each with its own connection to a fresh database."""
    database = directory / "notifications.db"
    with contextlib.closing(sqlite3.connect(database)) as setup:
        setup.execute("PRAGMA journal_mode=WAL")
        setup.execute(store.SCHEMA)
    argvs, first = [], 1
    for share in _shares(total, clients):
        argv = ["--database", str(database), "--first", str(first), "--count", str(share)]
        argvs.append(_clients.command("sqlite", *argv))
        first += share
    return argvs


def _notification(n: int) -> dict[str, Any]:
    """bench/store.py's n-th notification, as ``notifications.create`` takes it."""
    fields = store.notification(n)
    return {key: fields[key] for key in ("type", "title", "message")}


# -- a trivial call against a minimal trio JSON-RPC server -------------------------------------


def row_info(bench: Bench, clients: int) -> list[Line]:
    total = bench.sizes.calls
    results: dict[str, list[float]] = {"statusd": []}
    minirpc = start_minirpc(bench.scratch(bench.shm, "minirpc"))
    try:
        minirpc.wait_ready()
        row = f"info-{clients}"
        with bench.statusd(row, {}) as server:
            contenders = bench.contenders(row, ["statusd", "minirpc"])
            for number, name in _rotations(contenders, bench.rounds):
                path = server.socket if name == "statusd" else minirpc.socket
                argvs = [
                    _clients.command("calls", "--socket", path, "--count", str(share))
                    for share in _shares(total, clients)
                ]
                seconds, _ = _clients.run_gang(argvs)
                results.setdefault(name, []).append(total / seconds)
                _say(f"  info-{clients} round {number + 1}: {name:8} {total / seconds:9,.0f}/s")
    finally:
        minirpc.stop()
    what = f"a trivial call (`daemon.info`), {clients} client process{'es' if clients > 1 else ''}"
    return _lines(what, "calls/s", results, [("minirpc", "bench/minirpc.py")], ">= 0.8x")


# -- status fan-out, and a download under it -------------------------------------------------


def fanout_options(
    messages: int, subscribers: int, rate: float, duration: float, repeats: int
) -> fanout.Options:
    """The fan-out row's workload: S subscribers in 2 processes, both transports, the
    burst and the steady-rate phases (bench/ab_fanout.py runs the same)."""
    return fanout.Options(
        messages=messages,
        baseline_deliveries=0,
        subscribers=(subscribers,),
        rate=rate,
        duration=duration,
        repeats=repeats,
        window=128,
        history=fanout.DEFAULT_HISTORY,
        latency_history=100,
        lag_limit=fanout.DEFAULT_HISTORY - 128 - 16,
        client_processes=2,
        timeout=120.0,
        statusd_source=REPO,
        servers=("statusd", "statusd-ws"),
        phases=("throughput", "latency"),
    )


def _fanout_options(bench: Bench) -> fanout.Options:
    sizes = bench.sizes
    return fanout_options(
        sizes.fanout_messages,
        sizes.fanout_subscribers,
        sizes.rate,
        sizes.fanout_seconds,
        bench.rounds,
    )


def row_fanout(bench: Bench) -> list[Line]:
    opts = _fanout_options(bench)
    count = opts.subscribers[0]
    rates: dict[str, list[float]] = {}
    p99s: dict[str, list[float]] = {}
    for number, name in _rotations(["unix", "websocket"], bench.rounds):
        websocket = name == "websocket"
        settings = {"status_history": opts.history}
        with bench.statusd("fanout", settings, websocket=websocket, part=f"{name} burst") as server:
            burst = fanout.run_throughput(server, count, opts.messages, opts)
        steady_settings = {"status_history": 100}
        with bench.statusd(
            "fanout", steady_settings, websocket=websocket, part=f"{name} steady"
        ) as server:
            steady = fanout.run_latency(server, count, opts)
        if not (burst.complete and steady.complete):
            _say(f"  fanout {name}: a run timed out; its figures are what arrived in time")
        rates.setdefault(name, []).append(burst.rate)
        p99s.setdefault(name, []).append(steady.p99_ms)
        _say(
            f"  fanout round {number + 1}: {name:9} {burst.rate:12,.0f} deliveries/s, "
            f"p99 {steady.p99_ms:.2f} ms at {opts.rate:,.0f} msg/s"
        )
    lines = []
    for name, label in (("unix", "Unix socket"), ("websocket", "WebSocket")):
        rate, p99 = _median(rates[name]), _median(p99s[name])
        lines.append(
            Line(
                f"status fan-out, S = {count}, {label}, read by other processes",
                f"{rate:,.0f} deliveries/s; p99 {p99:.2f} ms at {opts.rate:,.0f} msg/s",
                "the goal",
                f"{FANOUT_GOAL:,} deliveries/s; p99 < {P99_GOAL_MS:g} ms",
                f"{rate / FANOUT_GOAL:.2f}x; p99 {'met' if p99 < P99_GOAL_MS else 'not met'}",
                f">= 1.0x, p99 < {P99_GOAL_MS:g} ms",
                "deliveries/s "
                + ", ".join(f"{v:,.0f}" for v in rates[name])
                + "; p99 ms "
                + ", ".join(f"{v:.2f}" for v in p99s[name]),
            )
        )
    return lines


def row_loaded(bench: Bench) -> list[Line]:
    size = bench.sizes.loaded_mib << 20
    url = bench.url(bench.loaded)
    count = bench.sizes.fanout_subscribers
    results: dict[str, list[float]] = {}
    delivered: list[float] = []
    settings = {"status_history": fanout.DEFAULT_HISTORY}
    with bench.statusd("loaded", settings) as server:
        for number, name in _rotations(["alone", "loaded"], bench.rounds):
            if name == "alone":
                seconds, dest = _statusd_download(bench, server, [url])
            else:
                seconds, dest, rate = _download_under_load(bench, server, url, count)
                delivered.append(rate)
            _check_files(dest, 1, size)
            shutil.rmtree(dest, ignore_errors=True)
            results.setdefault(name, []).append(size / 1e6 / seconds)
            _say(f"  loaded round {number + 1}: {name:7} {size / 1e6 / seconds:9,.0f} MB/s")
    alone, loaded = _median(results["alone"]), _median(results["loaded"])
    return [
        Line(
            f"one {bench.sizes.loaded_mib} MiB download while {count} subscribers take "
            f"{bench.sizes.rate:,.0f} status messages/s",
            f"{loaded:,.0f} MB/s ({_median(delivered):,.0f} deliveries/s meanwhile)",
            "the same download alone",
            f"{alone:,.0f} MB/s",
            _ratio(loaded, alone),
            ">= 0.95x",
            "loaded " + ", ".join(f"{v:,.0f}" for v in results["loaded"])
            + "; alone " + ", ".join(f"{v:,.0f}" for v in results["alone"]),
        )
    ]  # fmt: skip


def _download_under_load(
    bench: Bench, server: ServerProcess, url: str, count: int
) -> tuple[float, Path, float]:
    subscribers = fanout.Subscribers(server.socket, count, 2, latency=False)
    publisher = _clients.start(
        _clients.command("publish", "--socket", server.socket, "--rate", str(bench.sizes.rate))
    )
    try:
        subscribers.wait_ready()
        _clients.wait_ready(publisher)
        _clients.go(publisher)
        time.sleep(0.2)  # the stream is flowing before the download starts
        seconds, dest = _statusd_download(bench, server, [url])
        _clients.go(publisher)  # a second line on stdin tells it to stop
        published = _clients.result(publisher)
        reports, _ = subscribers.collect(60.0)
    finally:
        subscribers.close()
        if publisher.poll() is None:
            publisher.kill()
            publisher.wait(10)
    received = sum(n for report in reports for n in report.received)
    elapsed = (published["end_ns"] - published["start_ns"]) / 1e9
    return seconds, dest, received / elapsed if elapsed > 0 else 0.0


# -- the report -----------------------------------------------------------------------------

RUNNERS: dict[str, Callable[[Bench], list[Line]]] = {
    "files": lambda bench: row_files(bench, tuned=True),
    "files-defaults": lambda bench: row_files(bench, tuned=False),
    "big": row_big,
    "creates-1": lambda bench: row_creates(bench, 1),
    "creates-16": lambda bench: row_creates(bench, 16),
    "info-1": lambda bench: row_info(bench, 1),
    "info-16": lambda bench: row_info(bench, 16),
    "fanout": row_fanout,
    "loaded": row_loaded,
}


def table(lines: Sequence[Line], *, markdown: bool) -> str:
    head = ("workload, through the daemon's socket", "statusd", "peer", "peer's figure", "ratio",
            "goal")  # fmt: skip
    rows = [(x.workload, x.statusd, x.peer, x.peer_value, x.ratio, x.goal) for x in lines]
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|---|---:|---|---:|---:|---:|"]
        out += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(out)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [head, *rows]
    )


def runs_list(lines: Sequence[Line]) -> str:
    return "\n".join(f"- {line.workload} vs {line.peer}: {line.runs}" for line in lines)


def header(bench: Bench, command: str, server: str, load: tuple[float, ...]) -> list[str]:
    facts = {
        **downloads.machine(),
        **{f"{name} version": text for name, text in downloads.versions(bench.tools).items()},
        "HTTP server": server,
        "files and download rows' state": str(bench.shm),
        "create rows' state and sqlite": str(bench.disk),
        "rounds": f"{bench.rounds}, interleaved; medians",
        # Other work on a shared machine shows here before it shows as noise in the figures.
        "load average (1 min) at start / end": f"{load[0]:.2f} / {os.getloadavg()[0]:.2f}",
    }
    return [f"command: `{command}`", *(f"{key}: {value}" for key, value in facts.items())]


# -- command line ---------------------------------------------------------------------------


def _row_list(text: str) -> tuple[str, ...]:
    rows = tuple(part for part in text.split(",") if part)
    unknown = [row for row in rows if row not in ROWS]
    if unknown or not rows:
        raise argparse.ArgumentTypeError(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller workloads, one round")
    parser.add_argument("--rows", type=_row_list, default=ROWS, help="comma-separated row keys")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    parser.add_argument("--files", type=int, help="files in the many-file rows")
    parser.add_argument("--calls", type=int, help="calls (all clients) in the info rows")
    parser.add_argument("--creates", type=int, help="creates (all clients) in the create rows")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--profile", choices=ROWS, help="py-spy record statusd in this row")
    parser.add_argument("--no-install", action="store_true", help="never apt-get the peers")
    parser.add_argument("--shm-dir", type=Path, default=Path("/dev/shm"))
    parser.add_argument("--disk-dir", type=Path, default=Path("/var/tmp"))
    return parser


def _sizes(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else FULL
    changes = {
        name: value
        for name, value in (("files", args.files), ("calls", args.calls), ("creates", args.creates))
        if value is not None
    }
    for name, value in changes.items():
        if value < 1:
            raise SystemExit(f"--{name} must be >= 1, not {value}")
    return attrs.evolve(sizes, **changes)


def _make_files(root: Path, sizes: Sizes, rows: Sequence[str]) -> tuple[downloads.Files, str, str]:
    """The served files: only as big as the chosen rows need."""
    small = sizes.files if {"files", "files-defaults"} & set(rows) else 0
    big_mib = sizes.big_mib if "big" in rows else 0
    files = downloads.make_files(root, big_mib, small, sizes.file_kib)
    loaded = "big.bin"
    if "loaded" in rows and sizes.loaded_mib != big_mib:
        loaded = "loaded.bin"
        with (root / loaded).open("wb") as out:
            for _ in range(sizes.loaded_mib):
                out.write(os.urandom(1 << 20))
        (root / loaded).chmod(0o644)
    return files, "big.bin", loaded


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = _sizes(args)
    rounds = args.rounds or (1 if args.quick else 3)
    if rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, not {rounds}")
    given = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "bench/run.py", *given])
    # SIGTERM unwinds like Ctrl-C, so every process started here is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    tools = downloads.find_tools(install=not args.no_install)
    for tool in ("aria2c", "curl"):
        if tools[tool] is None:
            _say(f"{tool} not found and not installable: its rows have no peer")
    load = os.getloadavg()
    shm = Path(tempfile.mkdtemp(prefix="statusd-run-", dir=args.shm_dir))
    disk = Path(tempfile.mkdtemp(prefix="statusd-run-", dir=args.disk_dir))
    shm.chmod(0o755)
    try:
        _say("making the files")
        files, big, loaded = _make_files(shm / "www", sizes, args.rows)
        with downloads.serve(files, tools["nginx"], shm) as (base, server):
            bench = Bench(
                sizes, rounds, tools, base, files, big, loaded, shm, disk,
                known_keys(shm / "keys"), args.profile,
            )  # fmt: skip
            lines: list[Line] = []
            for row in args.rows:
                _say(f"{row}:")
                lines += RUNNERS[row](bench)
        print("\n".join(header(bench, command, server, load)))
        print()
        print(table(lines, markdown=args.markdown))
        print()
        print("every round (statusd first):")
        print(runs_list(lines))
        for label, paths in bench.profiles.items():
            shown = ", ".join(str(path) for path in paths)
            print(f"\nprofile of statusd in {label} (py-spy raw output, folded stacks: {shown}):")
            print(_profile.summarize(*paths))
    except KeyboardInterrupt:
        _say("interrupted: every process this benchmark started has been stopped")
        return 130
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
