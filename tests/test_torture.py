"""The crash torture test: a real daemon killed with SIGKILL at random moments, twenty
times, while several tasks download files whose names collide, and started again each time.

The HTTP server runs in the test's own trio run, so it outlives every daemon process and
counts every request any of them made. Each URL serves its own random bytes (so a file's
content says which item it came from), slowly, in 64 KiB pieces, with a strong ETag: a kill
usually lands in the middle of a body, and the next daemon resumes with Range and If-Range.
The names collide on purpose. Tasks come in four waves (four tasks, then three pairs,
submitted while the earlier ones still stream, see ``WAVES``); the tasks of a wave are
submitted together, and each wants a fresh name for its first item from its own directory
(``/a/big.iso``, ``/b/big.iso``, ...) and for its second by explicit filename
(``same.bin``); its other items want those names too, or the first wave's ``big.iso``, or a
name their URLs share (``/a/extra0.bin``, ``/b/extra0.bin``).

What must hold after every restart, and at the end once every task has completed:

- every acknowledged task (``tasks.download`` answered with its id) is listed, once;
- every completed item (of a completed task, or one that completed in a failed task)
  names a file holding exactly its URL's bytes, and no two items name one path or inode;
- a finished item is never requested again. Seen from outside, while the daemon is dead,
  an item is finished when a file that is not a part file holds exactly its bytes and has
  no other link: the daemon journals "done" while the part is still linked to the final
  name, and removes the part only after that;
- at the end: every task completed, no part file anywhere under the download directory,
  and no file there that is not some item's result (a stray ``big.2.iso`` is a finished
  item fetched again).

The plan (sizes, bytes, names) and the kill moments come from one seeded
``random.Random``. The seed is printed (``pytest -s`` shows it; a failure always does), and
``TORTURE_SEED=N`` replays the same plan and delays; the daemon's own timing varies.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import random
import re
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import attrs
import trio
import trio.testing

from tests.conftest import DaemonProcess, RawClient
from tests.http_servers import Handler, HTTPTestServer, Request, Responder, http_server

__all__ = ["http_server"]

KiB = 1024
MiB = 1024 * KiB
KILLS = 20
# (task letters, the name of their big item, the filename of their second one, the round
# they are submitted in): a wave races for names while the earlier ones still stream.
WAVES = (
    ("abcd", "big.iso", "same.bin", 0),
    ("ef", "late.iso", "late.bin", 4),
    ("gh", "later.iso", "later.bin", 8),
    ("ij", "last.iso", "last.bin", 12),
)
FINISHED = ("completed", "failed", "cancelled")
EMPTY_NAME = "empty.dat"
PIECE = 64 * KiB
# Seconds between two pieces, per URL: about 3, 1.3 and 0.5 MiB/s a connection. A slow
# item holds its name's part file while faster ones of other tasks claim the same name.
PAUSES = (0.02, 0.05, 0.1)
CALL_LIMIT = 20.0  # seconds for one answer from the daemon
SETTLE_LIMIT = 10.0  # seconds for the dead daemon's connections to drain at the server
FINAL_LIMIT = 45.0  # seconds for every task to complete after the last restart
RANGE = re.compile(r"bytes=(\d+)-(\d*)")
# Every task runs at once, so a wave races for its names as soon as it is submitted; two
# items of a task at a time, so its later items start (and claim names) while others stream.
CONFIG = """\
max_running_tasks = 8
[downloads]
parallel_items = 2
"""


@attrs.frozen
class Source:
    """One item: the URL path serving ``data``, and the filename it asks for, if any."""

    path: str
    data: bytes
    filename: str | None = None
    pause: float = PAUSES[0]

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def item(self, base_url: str) -> dict[str, Any]:
        item: dict[str, Any] = {"url": base_url + self.path}
        if self.filename is not None:
            item["filename"] = self.filename
        return item


def make_plan(rng: random.Random) -> list[list[Source]]:
    """Four waves of tasks (see ``WAVES``) of 3 to 6 items, 0 bytes to 2.5 MiB. The tasks
    of a wave are submitted together and their first two items want the same two names,
    so every wave races for fresh names; other items want those names, or the same name
    from their URL (``extra0.bin``), or the first wave's."""
    tasks = []
    for letters, iso, bin_name, _round in WAVES:
        for letter in letters:
            items = [
                Source(f"/{letter}/{iso}", rng.randbytes(rng.randint(5 * MiB // 4, 5 * MiB // 2))),
                Source(
                    f"/{letter}/bin", rng.randbytes(rng.randint(MiB // 2, 3 * MiB // 2)), bin_name
                ),
            ]
            extras = []
            for extra in range(rng.randint(1, 3)):
                size = rng.choice([rng.randint(16, 64 * KiB), rng.randint(64 * KiB, 2 * MiB)])
                filename = rng.choice([None, iso, bin_name, "big.iso"])
                extras.append(Source(f"/{letter}/extra{extra}.bin", rng.randbytes(size), filename))
            if letter == "a":
                # The only empty item: its bytes cannot say which item it is, its name can.
                extras.append(Source("/a/empty", b"", EMPTY_NAME))
            rng.shuffle(extras)
            tasks.append([attrs.evolve(item, pause=rng.choice(PAUSES)) for item in items + extras])
    return tasks


def kill_delay(rng: random.Random) -> float:
    """Seconds from a restart to the next kill: now and then at once (right after an
    acknowledgement, or while the daemon replays its journal), mostly within a second,
    and sometimes long enough for a full receive buffer (1 MiB) to reach a part file."""
    kind = rng.random()
    if kind < 0.1:
        return 0.0
    if kind < 0.6:
        return rng.uniform(0.05, 1.0)
    return rng.uniform(1.0, 2.5)


@attrs.define
class Answering:
    """How many answers the handlers that share it are giving right now: a kill of the
    client while ``count`` > 0 landed mid-transfer."""

    count: int = 0


def serve_slowly(
    data: bytes,
    *,
    etag: str,
    answering: Answering,
    piece: int = PIECE,
    pause: float = 0.02,
) -> Handler:
    """Serve ``data`` with a strong ``etag``, honouring ``Range`` with ``If-Range`` as
    ``serve_data`` does (416 ``bytes */N`` from the end on), but send the body in pieces
    of ``piece`` bytes with ``pause`` seconds between them, so that a client killed at a
    random moment is likely to be killed in the middle of a body."""

    async def handler(request: Request, responder: Responder) -> None:
        answering.count += 1
        try:
            await _send_slowly(request, responder, data, etag, piece, pause)
        finally:
            answering.count -= 1

    return handler


async def _send_slowly(
    request: Request, responder: Responder, data: bytes, etag: str, piece: int, pause: float
) -> None:
    headers = [
        ("Content-Type", "application/octet-stream"),
        ("Accept-Ranges", "bytes"),
        ("ETag", etag),
    ]
    first = 0
    match = RANGE.fullmatch(request.headers.get("range", ""))
    partial = match is not None and request.headers.get("if-range") == etag
    if match is not None and partial:
        first = int(match[1])
        if first >= len(data):
            await responder.send(416, [("Content-Range", f"bytes */{len(data)}")])
            return
        headers.append(("Content-Range", f"bytes {first}-{len(data) - 1}/{len(data)}"))
    body = memoryview(data)[first:]
    headers.append(("Content-Length", str(len(body))))
    await responder.send_head(206 if partial else 200, headers)
    for start in range(0, len(body), piece):
        await responder.send_raw(bytes(body[start : start + piece]))
        if start + piece < len(body):
            await trio.sleep(pause)


@attrs.frozen
class OnDisk:
    """A regular file under the download directory, seen while the daemon is dead."""

    path: Path
    inode: tuple[int, int]
    links: int
    size: int

    @property
    def is_part(self) -> bool:
        return self.path.name.endswith(".part")


def scan(root: Path) -> list[OnDisk]:
    found = []
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                found.append(OnDisk(path, (info.st_dev, info.st_ino), info.st_nlink, info.st_size))
    return found


def sha256_of(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


@attrs.define
class Torture:
    """The daemon under test, the server it fetches from, and what was promised so far."""

    seed: int
    process: DaemonProcess
    server: HTTPTestServer
    answering: Answering
    plan: list[list[Source]]
    by_url: dict[str, Source] = attrs.field(factory=dict)
    acknowledged: list[str] = attrs.field(factory=list)
    # URL -> (its request count when it was first seen finished, the file that showed it)
    finished: dict[str, tuple[int, Path]] = attrs.field(factory=dict)
    problems: list[str] = attrs.field(factory=list)
    client: RawClient | None = None
    kills: int = 0
    mid_transfer: int = 0  # kills that came while the server was sending
    with_parts: int = 0  # kills after which a part file was on disk

    @property
    def download_dir(self) -> Path:
        return self.process.directory / "state" / "downloads"

    # -- the daemon's life ------------------------------------------------------------------

    async def start(self) -> RawClient:
        try:
            await trio.to_thread.run_sync(self.process.start, "--config", str(self.config_file()))
        except AssertionError as exc:
            self.fail(f"the daemon did not start again after kill {self.kills}: {exc}")
        self.client = await RawClient.connect(self.process.socket)
        return self.client

    def config_file(self) -> Path:
        path = self.process.directory / "torture.toml"
        path.write_text(CONFIG)
        return path

    async def kill(self) -> bool:
        """SIGKILL the daemon; returns whether the server was sending to it just then."""
        assert self.process.process is not None
        assert self.client is not None
        mid_transfer = self.answering.count > 0
        self.kills += 1
        self.mid_transfer += mid_transfer
        await trio.aclose_forcefully(self.client.stream)
        self.client = None
        code = self.process.process.poll()
        if code is not None:
            self.problems.append(f"the daemon exited by itself with status {code}")
            return mid_transfer
        self.process.signal(signal.SIGKILL)
        await trio.to_thread.run_sync(self.process.wait)
        await self.settle()
        return mid_transfer

    async def settle(self) -> None:
        """Wait until the server has logged every request the dead daemon sent: one still
        in a socket buffer or the accept backlog must not count as the next daemon's."""
        with trio.move_on_after(SETTLE_LIMIT):
            while True:
                before = len(self.server.requests)
                while self.answering.count:  # noqa: ASYNC110 - ends when sends fail
                    await trio.sleep(0.01)
                await trio.testing.wait_all_tasks_blocked(0.05)
                if len(self.server.requests) == before and not self.answering.count:
                    return
        self.fail(f"the test server still answered a dead daemon after {SETTLE_LIMIT:g} s")

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        assert self.client is not None
        with trio.move_on_after(CALL_LIMIT) as scope:
            try:
                response = await self.client.request(method, params)
            except (EOFError, OSError, trio.BrokenResourceError) as exc:
                code = self.process.process.poll() if self.process.process else None
                self.fail(f"the daemon dropped the connection ({exc!r}) during {method}: {code}")
        if scope.cancelled_caught:
            self.fail(f"no answer to {method} within {CALL_LIMIT:g} s")
        if "result" not in response:
            self.fail(f"{method} {params} answered {response}")
        return response["result"]

    # -- the rules ----------------------------------------------------------------------------

    async def submit(self, sources: list[Source]) -> None:
        items = [source.item(self.server.base_url) for source in sources]
        result = await self.call("tasks.download", {"items": items})
        self.acknowledged.append(result["task_id"])

    async def check_listed(self) -> list[dict[str, Any]]:
        """Every acknowledged task is listed, once; returns the list."""
        tasks: list[dict[str, Any]] = (await self.call("tasks.list"))["tasks"]
        counts = collections.Counter(task["id"] for task in tasks)
        for task_id in self.acknowledged:
            if counts[task_id] != 1:
                self.problems.append(
                    f"acknowledged task {task_id} is listed {counts[task_id]} times"
                )
        return tasks

    def check_results(self, tasks: list[dict[str, Any]]) -> set[Path]:
        """Every completed item's file (of a finished task: a failed task's items that
        completed too) holds its own bytes, alone; returns their paths."""
        owners: dict[Any, str] = {}
        paths = set()
        for task in tasks:
            if task["status"] not in FINISHED:
                continue
            for entry in (task["result"] or {}).get("items", []):
                if entry.get("error") is not None and task["status"] != "completed":
                    continue
                where = f"{task['status']} task {task['id']} item {entry.get('url')}"
                path = entry.get("path")
                if path is None:
                    self.problems.append(f"{where}: completed, but without a path: {entry}")
                    continue
                paths.add(Path(path))
                self.check_result_file(where, Path(path), entry["url"], owners)
        return paths

    def check_result_file(self, where: str, path: Path, url: str, owners: dict[Any, str]) -> None:
        source = self.by_url.get(url)
        if source is None:
            self.problems.append(f"{where}: {url} is not a URL of this test")
            return
        try:
            info = path.lstat()
        except FileNotFoundError:
            self.problems.append(f"{where}: its file {path} does not exist")
            return
        for key in (str(path), (info.st_dev, info.st_ino)):
            if key in owners:
                self.problems.append(f"{where}: {path} is also the file of {owners[key]}")
            owners[key] = where
        if not stat.S_ISREG(info.st_mode):
            self.problems.append(f"{where}: {path} is not a regular file")
        elif (digest := sha256_of(path)) != source.digest:
            self.problems.append(
                f"{where}: {path} does not hold the {len(source.data)} bytes that "
                f"{source.path} serves, but {self.describe(digest, info.st_size)}"
            )

    def describe(self, digest: str, size: int) -> str:
        """What a file holds, in words: which URL's bytes, or how many of nobody's."""
        for source in self.by_url.values():
            if source.digest == digest:
                return f"the {size} bytes of {source.path}"
        return f"{size} bytes that no URL serves"

    def note_finished(self, files: list[OnDisk]) -> None:
        """Record which items are finished on disk now (the daemon is dead)."""
        by_digest = {source.digest: source for source in self.by_url.values() if source.data}
        sizes = {len(source.data) for source in by_digest.values()}
        for file in files:
            if file.is_part or file.links != 1:
                continue  # a final name still linked to its part may not be journalled yet
            if file.size == 0:
                source = self.empty_source(file.path.name)
            else:
                source = by_digest.get(sha256_of(file.path)) if file.size in sizes else None
            if source is not None:
                url = self.server.url(source.path)
                count = len(self.server.requests_for(source.path))
                self.finished.setdefault(url, (count, file.path))

    def empty_source(self, name: str) -> Source | None:
        for source in self.by_url.values():
            if not source.data and source.filename == name:
                return source
        return None

    def check_not_fetched_again(self) -> None:
        for url, (count, path) in self.finished.items():
            requests = self.server.requests_for(self.by_url[url].path)
            if len(requests) > count:
                ranges = [request.headers.get("range") for request in requests[count:]]
                self.problems.append(
                    f"{url} was finished on disk ({path}) after {count} requests, and was "
                    f"requested again {len(requests) - count} times (ranges {ranges})"
                )

    def check_round(self, delay: float, mid_transfer: bool) -> None:
        """After a kill: what is on disk now, and what the last daemon asked for."""
        files = scan(self.download_dir) if self.download_dir.exists() else []
        parts = [f"{file.path.name} ({file.size})" for file in files if file.is_part]
        self.with_parts += bool(parts)
        self.check_not_fetched_again()
        self.note_finished(files)
        print(
            f"kill {self.kills} {delay:.2f} s after the start"
            f"{', mid-transfer' if mid_transfer else ''}: part files {parts}, "
            f"{len(self.finished)} items finished, {len(self.server.requests)} requests"
        )
        self.fail_if_problems(f"after kill {self.kills} of {KILLS}")

    async def wait_all_finished(self) -> list[dict[str, Any]]:
        """Poll until every task is finished (the daemon is in another process: there is
        nothing of ours to wait on); returns the listed tasks."""
        tasks: list[dict[str, Any]] = []
        with trio.move_on_after(FINAL_LIMIT):
            while True:
                tasks = (await self.call("tasks.list"))["tasks"]
                if all(task["status"] in FINISHED for task in tasks):
                    return await self.check_listed()
                await trio.sleep(0.05)
        unfinished = [f"{task['id']}: {task['status']}" for task in tasks]
        self.fail(f"not every task finished within {FINAL_LIMIT:g} s: {unfinished}")

    def check_end(self, tasks: list[dict[str, Any]], results: set[Path]) -> None:
        for task in tasks:
            if task["status"] != "completed":
                errors = [
                    f"{entry.get('url')}: {entry.get('error')}"
                    for entry in (task["result"] or {}).get("items", [])
                    if entry.get("error")
                ]
                self.problems.append(
                    f"task {task['id']} ended {task['status']}: {task['error']} {errors}"
                )
        for file in scan(self.download_dir):
            if file.is_part:
                self.problems.append(f"part file {file.path} left after every task completed")
            elif file.path not in results:
                self.problems.append(f"{file.path} ({file.size} bytes) is no item's result")
        self.check_not_fetched_again()

    def fail_if_problems(self, when: str) -> None:
        if self.problems:
            self.fail("\n  ".join(["the daemon broke these rules:", *self.problems]), when)

    def fail(self, message: str, when: str = "") -> NoReturn:
        log = self.process.stderr().splitlines()[-40:] if self.process.log else []
        raise AssertionError(
            f"torture seed {self.seed} {when}: {message}\n"
            f"last daemon's log (tail):\n" + "\n".join(log)
        )


@contextlib.contextmanager
def reported(torture: Torture) -> Iterator[None]:
    try:
        yield
    finally:
        requests = torture.server.requests
        ranged = sum("range" in request.headers for request in requests)
        print(
            f"torture seed {torture.seed}: {torture.kills} kills, "
            f"{torture.mid_transfer} mid-transfer, "
            f"{torture.with_parts} with part files on disk; {len(requests)} requests, "
            f"{ranged} of them ranged; {len(torture.finished)} items seen finished on disk"
        )


def torture_seed() -> int:
    text = os.environ.get("TORTURE_SEED")
    return int(text) if text else random.SystemRandom().randrange(1 << 32)


async def test_twenty_sigkills_while_names_collide(
    daemon_process: Any, http_server: HTTPTestServer
) -> None:
    seed = torture_seed()
    print(f"torture seed {seed}")
    rng = random.Random(seed)
    answering = Answering()
    torture = Torture(seed, daemon_process(), http_server, answering, make_plan(rng))
    for source in (source for task in torture.plan for source in task):
        etag = f'"{source.digest[:16]}"'
        handler = serve_slowly(source.data, etag=etag, answering=answering, pause=source.pause)
        torture.by_url[http_server.route(source.path, handler)] = source

    submit_rounds = [wave[3] for wave in WAVES for _letter in wave[0]]
    with reported(torture):
        for round_number in range(KILLS):
            await torture.start()
            torture.check_results(await torture.check_listed())
            torture.fail_if_problems(f"after restart {round_number}")
            for sources, first_round in zip(torture.plan, submit_rounds, strict=True):
                if first_round == round_number:
                    await torture.submit(sources)
            delay = kill_delay(rng)
            await trio.sleep(delay)
            torture.check_round(delay, await torture.kill())

        await torture.start()
        tasks = await torture.wait_all_finished()
        results = torture.check_results(tasks)
        torture.check_end(tasks, results)
        torture.fail_if_problems("at the end")
        assert torture.client is not None
        await trio.aclose_forcefully(torture.client.stream)
