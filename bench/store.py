"""Store benchmark: statusd's JsonLinesStore against sqlite3 (WAL, synchronous=FULL), one run.

Not a test. Two measurements, both on the disk of ``--dir`` (by default a fresh directory
under /var/tmp: a real disk, not tmpfs, since what is measured is the cost of durability):

- durable creates per second, with 1 client and with 16 concurrent clients. A create is one
  notification's journal record (``statusd.state.notifications.create_record``, ~200 bytes)
  that is on disk before the client is answered:
    * statusd: ``await store.append(record)`` from N trio tasks of one process (what the
      daemon does: one event loop, group commit, one ``fdatasync`` per batch);
    * sqlite3: one ``INSERT`` per transaction (autocommit) into a ``notifications`` table in
      WAL mode with ``synchronous=FULL`` and ``busy_timeout``; N threads, each with its own
      connection (the stdlib module releases the GIL while sqlite works);
    * sqlite-trio: the same, from N trio tasks that hand each INSERT to a worker thread
      (``trio.to_thread.run_sync``), as a trio daemon using sqlite would: statusd's appends
      pay that thread hop too, so this is the like-for-like figure.
  Rounds are interleaved (each contender once per round, order rotating) because a shared
  machine drifts; the report gives the median of the rounds and the ratio statusd / sqlite.
- start to ready with ``--stored`` (1,000,000) notifications: a fresh ``python`` process
  imports the daemon and runs it (``statusd.daemon.run``, exactly what ``statusd`` does:
  config, task journal, tokens, the notification store checked, decoded and indexed, the
  control socket listening) and says "ready" when ``run`` reports it is; the wall time from
  spawning it to that line is reported, with the child's own split. Two state directories:
  one whose ``notifications.jsonl`` was closed cleanly (it ends with a seal) and one left as
  a SIGKILL leaves it (the last records after the last seal). The page cache is warm (the
  files were just written). For reference, the sqlite side reads all rows of the same
  table into tuples.

Usage::

    python bench/store.py [--dir DIR] [--repeats 3] [--creates 3000] [--clients 1,16]
                          [--stored 1000000] [--skip-creates] [--skip-ready] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shlex
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio
from _common import cpu_model

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from statusd.state.notifications import create_record as notification_record  # noqa: E402
from statusd.store import open_store  # noqa: E402

WORDS = [
    "backup",
    "disk",
    "quota",
    "download",
    "finished",
    "failed",
    "restarted",
    "weekly",
    "report",
    "server",
    "job",
    "user",
    "update",
    "retry",
    "mirror",
    "archive",
]
USERS = ("alice", "bob", "carol", None)
UNSEALED_TAIL = 3000  # records appended after the last seal in the "after a crash" file
SCHEMA = (
    "CREATE TABLE notifications (id INTEGER PRIMARY KEY, username TEXT, type TEXT NOT NULL, "
    "title TEXT NOT NULL, message TEXT NOT NULL, link TEXT, created_at TEXT NOT NULL, "
    "read INTEGER NOT NULL DEFAULT 0)"
)
INSERT = (
    "INSERT INTO notifications (id, username, type, title, message, link, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def notification(n: int) -> dict[str, Any]:
    """The n-th notification: the shape statusd journals, ~100-character message."""
    words = [WORDS[(n * 7 + k * 3) % len(WORDS)] for k in range(18)]
    return {
        "id": n,
        "username": USERS[n % len(USERS)],
        "type": "info",
        "title": f"Backup {n} finished",
        "message": " ".join(words)[:100],
        "link": None,
        "created_at": "2026-11-23T10:30:00.123Z",
    }


def create_record(n: int) -> Any:
    return notification_record(notification(n))  # type: ignore[arg-type]


def row(n: int) -> tuple[Any, ...]:
    item = notification(n)
    return (
        n,
        item["username"],
        item["type"],
        item["title"],
        item["message"],
        None,
        item["created_at"],
    )


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- durable creates ------------------------------------------------------------------------


def statusd_creates(directory: Path, clients: int, total: int) -> float:
    """Creates per second through one JsonLinesStore, ``clients`` trio tasks at once."""
    path = directory / "notifications.jsonl"
    ids = itertools.count(1)

    async def client(store: Any, count: int) -> None:
        for _ in range(count):
            await store.append(create_record(next(ids)))

    async def main() -> float:
        store, _ = await open_store(path)
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for share in _shares(total, clients):
                nursery.start_soon(client, store, share)
        elapsed = time.perf_counter() - start
        await store.aclose()
        return elapsed

    elapsed = trio.run(main)
    return total / elapsed


def sqlite_connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("PRAGMA busy_timeout=30000")
    return connection


def sqlite_creates(directory: Path, clients: int, total: int) -> float:
    """Creates per second into sqlite, one transaction per row, ``clients`` threads each
    with its own connection."""
    path = directory / "notifications.db"
    with contextlib.closing(sqlite_connect(path)) as setup:
        setup.execute(SCHEMA)
    ids = itertools.count(1)
    lock = threading.Lock()
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients + 1)

    def client(count: int) -> None:
        try:
            with contextlib.closing(sqlite_connect(path)) as connection:
                barrier.wait()
                for _ in range(count):
                    with lock:
                        n = next(ids)
                    connection.execute(INSERT, row(n))  # autocommit: one transaction
        except BaseException as exc:
            errors.append(exc)
            raise

    threads = [threading.Thread(target=client, args=(share,)) for share in _shares(total, clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"sqlite client failed: {errors[0]!r}")
    return total / elapsed


def sqlite_trio_creates(directory: Path, clients: int, total: int) -> float:
    """As ``sqlite_creates``, but each client is a trio task that hands every INSERT to a
    worker thread (``trio.to_thread.run_sync``), each client with its own connection: what
    a trio daemon storing its notifications in sqlite would do."""
    path = directory / "notifications.db"
    with contextlib.closing(sqlite_connect(path)) as setup:
        setup.execute(SCHEMA)
    ids = itertools.count(1)

    async def client(connection: sqlite3.Connection, count: int) -> None:
        for _ in range(count):
            await trio.to_thread.run_sync(connection.execute, INSERT, row(next(ids)))

    async def main() -> float:
        connections = [sqlite_connect(path) for _ in range(clients)]
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for connection, share in zip(connections, _shares(total, clients), strict=True):
                nursery.start_soon(client, connection, share)
        elapsed = time.perf_counter() - start
        for connection in connections:
            connection.close()
        return elapsed

    return total / trio.run(main)


def _shares(total: int, clients: int) -> list[int]:
    return [total // clients + (1 if k < total % clients else 0) for k in range(clients)]


@attrs.frozen
class CreateResults:
    rates: dict[tuple[str, int], list[float]]


def run_creates(opts: Options, root: Path) -> CreateResults:
    contenders = {
        "statusd": statusd_creates,
        "sqlite": sqlite_creates,
        "sqlite-trio": sqlite_trio_creates,
    }
    rates: dict[tuple[str, int], list[float]] = {}
    runs = itertools.count()
    for round_number in range(opts.repeats):
        for clients in opts.clients:
            names = list(contenders)
            shift = round_number % len(names)
            order = names[shift:] + names[:shift]
            for name in order:
                directory = root / f"creates-{next(runs)}"
                directory.mkdir()
                rate = contenders[name](directory, clients, opts.creates)
                shutil.rmtree(directory)
                rates.setdefault((name, clients), []).append(rate)
                _say(f"  round {round_number + 1}: {name}, {clients} client(s): {rate:,.0f}/s")
    return CreateResults(rates)


# -- start to ready -------------------------------------------------------------------------

CHILD = """
import json, os, sys, time
started = time.perf_counter()
import trio
from pathlib import Path
from statusd import daemon
from statusd.config import load_config
imported = time.perf_counter()
state = Path(sys.argv[1]).parent
config = load_config({"state_dir": str(state), "socket": str(state / "statusd.sock")})
async def main():
    async with trio.open_nursery() as nursery:
        running = await nursery.start(daemon.run, config)
        ready = time.perf_counter()
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        records = running.api.notifications.statistics().index.notifications
        print(json.dumps({"import_s": imported - started, "open_s": ready - imported,
                          "records": records, "sealed": 0, "rss": rss}), flush=True)
        # Leave as a crash would: a clean close would seal the file for the next round.
        os._exit(0)
trio.run(main)
"""

CHILD_SQLITE = """
import json, sqlite3, sys, time
started = time.perf_counter()
connection = sqlite3.connect(sys.argv[1])
rows = connection.execute("SELECT * FROM notifications").fetchall()
ready = time.perf_counter()
import resource
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"import_s": 0.0, "open_s": ready - started, "records": len(rows),
                  "sealed": 0, "rss": rss}), flush=True)
"""


@attrs.frozen
class ReadyRun:
    wall_s: float  # spawn -> "ready" line
    import_s: float
    open_s: float
    records: int
    sealed: int
    rss: int


def spawn_ready(code: str, path: Path) -> ReadyRun:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, env=env, cwd=REPO
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    wall = time.perf_counter() - start
    if process.wait(60) != 0 or not line:
        raise RuntimeError(f"ready child failed with status {process.returncode}")
    fields = json.loads(line)
    return ReadyRun(wall_s=wall, **fields)


def write_stored(directory: Path, stored: int) -> tuple[Path, Path, Path]:
    """The clean file, the after-a-crash file and the sqlite database, each holding
    ``stored`` notifications."""
    (directory / "clean").mkdir()
    (directory / "crashed").mkdir()
    clean = directory / "clean" / "notifications.jsonl"
    crashed = directory / "crashed" / "notifications.jsonl"
    database = directory / "notifications.db"
    batch = 20_000
    body = max(0, stored - UNSEALED_TAIL)

    async def fill() -> None:
        store, _ = await open_store(clean)
        for first in range(1, body + 1, batch):
            last = min(first + batch, body + 1)
            await store.append_many(map(create_record, range(first, last)))
        # A last small batch stays under the seal interval: what a crash leaves unsealed.
        await store.append_many(map(create_record, range(body + 1, stored + 1)))
        shutil.copyfile(clean, crashed)
        await store.aclose()

    start = time.perf_counter()
    trio.run(fill)
    _say(f"  wrote {stored:,} records to {clean.name} in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    with contextlib.closing(sqlite_connect(database)) as connection:
        connection.execute(SCHEMA)
        connection.execute("BEGIN")
        connection.executemany(INSERT, map(row, range(1, stored + 1)))
        connection.execute("COMMIT")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    _say(f"  wrote {stored:,} rows to {database.name} in {time.perf_counter() - start:.1f} s")
    return clean, crashed, database


@attrs.frozen
class ReadyResults:
    runs: dict[str, list[ReadyRun]]
    sizes: dict[str, int]


def run_ready(opts: Options, root: Path) -> ReadyResults:
    directory = root / "stored"
    directory.mkdir()
    clean, crashed, database = write_stored(directory, opts.stored)
    cases = {
        "statusd, closed cleanly": (CHILD, clean),
        "statusd, after a crash": (CHILD, crashed),
        "sqlite, read all rows": (CHILD_SQLITE, database),
    }
    runs: dict[str, list[ReadyRun]] = {}
    for round_number in range(opts.repeats):
        for name, (code, path) in cases.items():
            result = spawn_ready(code, path)
            if result.records != opts.stored:
                raise RuntimeError(f"{name}: read {result.records:,} records, not {opts.stored:,}")
            runs.setdefault(name, []).append(result)
            _say(f"  round {round_number + 1}: {name}: ready in {result.wall_s:.2f} s")
    sizes = {"statusd": clean.stat().st_size, "sqlite": database.stat().st_size}
    return ReadyResults(runs, sizes)


# -- the report -----------------------------------------------------------------------------


def filesystem(directory: Path) -> str:
    """``device type mountpoint`` of the filesystem holding ``directory``."""
    done = subprocess.run(
        ["df", "--output=source,fstype,target", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    return " ".join(lines[-1].split()) if done.returncode == 0 and lines else "unknown"


def environment_lines(command: str, directory: Path) -> list[str]:
    import statusd

    memory = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory = f"{int(Path('/proc/meminfo').read_text().split()[1]) / (1 << 20):.1f} GiB"
    return [
        f"command: `{command}`",
        f"machine: {platform.machine()}, {cpu_model()}, nproc {os.cpu_count()}, {memory}, "
        f"Linux {platform.release()}",
        f"disk: {directory} on {filesystem(directory)}",
        f"versions: python {platform.python_version()}, sqlite {sqlite3.sqlite_version}, "
        f"trio {trio.__version__}, statusd {statusd.__version__}",
    ]


def _runs(rates: Sequence[float]) -> str:
    return ", ".join(f"{r:,.0f}" for r in rates)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def report(
    opts: Options,
    command: str,
    directory: Path,
    creates: CreateResults | None,
    ready: ReadyResults | None,
) -> str:
    lines = ["# store benchmark: statusd JsonLinesStore vs sqlite3 (WAL, synchronous=FULL)", ""]
    lines += [f"- {line}" for line in environment_lines(command, directory)]
    lines.append(f"- medians of {opts.repeats} interleaved round(s)")
    if creates is not None:
        lines += [
            "",
            f"## Durable creates per second ({opts.creates:,} per run)",
            "",
            "sqlite: N threads calling `execute` directly. sqlite-trio: N trio tasks, each "
            "INSERT handed to a worker thread with `trio.to_thread.run_sync`, as a trio "
            "daemon would have to (statusd's appends pay the same hop).",
            "",
            "| clients | statusd creates/s | sqlite creates/s | sqlite-trio creates/s "
            "| statusd / sqlite | statusd / sqlite-trio | statusd runs | sqlite runs "
            "| sqlite-trio runs |",
            "|---:|---:|---:|---:|---:|---:|---|---|---|",
        ]
        for clients in opts.clients:
            ours = creates.rates.get(("statusd", clients), [])
            theirs = creates.rates.get(("sqlite", clients), [])
            hopped = creates.rates.get(("sqlite-trio", clients), [])
            a, b, c = _median(ours), _median(theirs), _median(hopped)
            lines.append(
                f"| {clients} | {a:,.0f} | {b:,.0f} | {c:,.0f} | **{_ratio(a, b)}** "
                f"| {_ratio(a, c)} | {_runs(ours)} | {_runs(theirs)} | {_runs(hopped)} |"
            )
        met = all(
            _median(creates.rates.get(("statusd", c), []))
            >= _median(creates.rates.get(("sqlite", c), []))
            for c in opts.clients
        )
        lines += [
            "",
            f"Goal (at least sqlite's rate, direct, in every case): {'met' if met else 'NOT met'}",
        ]
    if ready is not None:
        lines += [
            "",
            f"## Start to ready with {opts.stored:,} stored notifications",
            "",
            'Spawn of a fresh `python` -> its "ready" line; statusd = import statusd.daemon, '
            "then `daemon.run` until it reports ready (every record checked, decoded and "
            "indexed; the control socket listening).",
            "",
            "| case | ready s (wall) | import s | run s | max RSS MiB | wall runs |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for name, runs in ready.runs.items():
            rss = _median([r.rss for r in runs]) / (1 << 20)
            lines.append(
                f"| {name} | {_median([r.wall_s for r in runs]):.2f} "
                f"| {_median([r.import_s for r in runs]):.2f} "
                f"| {_median([r.open_s for r in runs]):.2f} "
                f"| {rss:,.0f} "
                f"| {', '.join(f'{r.wall_s:.2f}' for r in runs)} |"
            )
        clean = _median([r.wall_s for r in ready.runs["statusd, closed cleanly"]])
        crashed = _median([r.wall_s for r in ready.runs["statusd, after a crash"]])
        worst = max(clean, crashed)
        lines += [
            "",
            f"File sizes: statusd {ready.sizes['statusd'] / 1e6:,.1f} MB, sqlite "
            f"{ready.sizes['sqlite'] / 1e6:,.1f} MB "
            f"({_ratio(ready.sizes['statusd'], ready.sizes['sqlite'])})",
            "",
            f"Goal (ready within 2 s with {opts.stored:,}): "
            f"{'met' if worst <= 2 else 'NOT met'} ({worst:.2f} s, the slower case)",
        ]
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------


@attrs.frozen
class Options:
    directory: Path | None
    repeats: int
    creates: int
    clients: tuple[int, ...]
    stored: int
    skip_creates: bool
    skip_ready: bool
    keep: bool


def _positive_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be integers >= 1, not {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be integers >= 1, not {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--dir", type=Path, help="where the files go (default: under /var/tmp)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (median reported)")
    parser.add_argument("--creates", type=int, default=3000, help="creates per run")
    parser.add_argument("--clients", type=_positive_list, default=(1, 16))
    parser.add_argument("--stored", type=int, default=1_000_000, help="for start to ready")
    parser.add_argument("--skip-creates", action="store_true")
    parser.add_argument("--skip-ready", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the files written")
    return parser


def options_from(args: argparse.Namespace) -> Options:
    for name in ("repeats", "creates", "stored"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, not {getattr(args, name)}")
    return Options(
        directory=args.dir,
        repeats=args.repeats,
        creates=args.creates,
        clients=args.clients,
        stored=args.stored,
        skip_creates=args.skip_creates,
        skip_ready=args.skip_ready,
        keep=args.keep,
    )


@contextlib.contextmanager
def _work_directory(opts: Options) -> Iterator[Path]:
    parent = opts.directory or Path("/var/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="statusd-bench-store-", dir=parent))
    try:
        yield directory
    finally:
        if opts.keep:
            _say(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    opts = options_from(build_parser().parse_args(argv))
    command = shlex.join(["python", "bench/store.py", *(sys.argv[1:] if argv is None else argv)])
    with _work_directory(opts) as directory:
        creates = ready = None
        if not opts.skip_creates:
            _say("durable creates:")
            creates = run_creates(opts, directory)
        if not opts.skip_ready:
            _say("start to ready:")
            ready = run_ready(opts, directory)
        print(report(opts, command, directory, creates, ready))
    return 0


if __name__ == "__main__":
    sys.exit(main())
