"""The download engine: one item, from an http(s) URL to a file inside ``dest``.

``download_item`` is the whole of it; the task's job (``job.py``) runs many of them
(batches, concurrency, journal) and knows nothing of HTTP. How an answer is judged lives
in ``rules.py`` (pure), every blocking file operation in ``files.py``. What one call
guarantees:

- **where**: ``dest`` is an open ``Directory`` and every file is named relative to its fd,
  so nothing is ever written outside it (the job opens it with ``files.open_dest``, which
  follows no symlink). The file name comes from the item's ``filename``, the server's
  ``Content-Disposition``, the final URL's path, the original URL's path, ``index.html``
  when the final URL names a directory (``/`` at its end), or ``download``, in that order,
  reduced to one safe component by ``statusd.downloads.names``.
- **whose**: data goes to the item's own part file, ``.NAME.<owner>.part`` (``owner``: the
  task id and the item's index; random when not given), created with ``O_EXCL``, so a
  caller finds the parts of its items by their owner after a crash (``files.own_parts``),
  whether or not it heard of them. The finished part is linked to a free
  final name with ``os.link``, which never replaces a file: a taken NAME becomes
  ``NAME.1.ext``, ``NAME.2.ext``, ... No call opens, truncates, resumes into or removes a
  file that is not its own part.
- **durability**: the data is fdatasynced before the link, and the directory after it,
  before the item is reported done.
- **resume**: ``ItemState`` (name, part, validator and length) is handed to ``on_state``
  before data that a resume could use is written under it: a large file's (one that does
  not fit its first buffer) before its first write if it has a validator or, without one,
  a length (with neither a resume starts from zero anyway), a new validator at once. A
  file that fits is created, written, synced and linked in one thread hop and reported
  only as ``done``:
  a crash in that hop leaves a part that is whole and linked, or holds nothing a resume
  could use, and the journal record per small file it saves was 10-16% of the daemon's
  CPU per file (docs/bench-daemon.md). ``done`` is reported
  while the part is still linked to the final name (when there is an ``on_state``): a crash
  before the caller has it finds the part linked to a visible name and finishes, rather
  than fetch the file again. With a part of N bytes and a validator, a retry (or a call
  after a restart) asks for ``Range: bytes=N-`` with ``If-Range``; without a validator
  but with the entity's length (``state.length``, ``rules.resume_length``) it asks for
  ``Range: bytes=N-`` alone, and a 206 is appended only if its ``Content-Range`` total is
  that length. ``rules.body_decision`` says whether the answer is appended, started from
  zero (in a new part inode) or asked for again without a range. A 416 saying the entity
  is N bytes means the part holds it all: it is completed once the item's sha256 agrees
  or, without one, when the answer carries the validator the part was fetched under (or,
  fetched without one, none and the same length: ``rules.range_not_satisfiable``).
  Invariant: the part always holds a prefix of the entity that ``state.validator`` (or,
  without one, ``state.length``) names (it is replaced *before* a new one is reported).
  A state journalled before parts were owned (a name, no part) is not resumed: the item
  starts again under a new part.
- **retries**: connection errors, timeouts, a body cut short, 5xx and 429 are retried.
  An attempt after which the part holds more than after any earlier one (bytes a next
  attempt can resume from) made progress: it does not count, and the next one follows
  after ``backoff_initial``. The others count, up to
  ``max_attempts``, waiting ``backoff_initial * 2**(k-1)`` seconds after the k-th (at most
  ``backoff_max``), or what ``Retry-After`` asks (at most ``max_retry_after``). What
  bounds a server that sends a little per connection forever is the stall rule, which
  spans the attempts (below). ``on_retry`` hears of each retry, with its reason and
  whether it counted, before the pause. Other 4xx, TLS errors, a host name that does not
  resolve (a resolver that cannot answer now is retried), a proxy refusing CONNECT with a
  4xx, a response head over the client's limit, a size over the cap, a digest mismatch,
  a full disk, a write that would eat into the ``reserve``, a transfer slower than
  ``lowest_speed`` for ``stall_timeout`` (``rules.StallWatch``: retrying a server that
  trickles would hold the slot as long again) and too many redirects fail the item at
  once. The stall rule's windows run from
  the first body byte on, over the attempts that continue those bytes (an answer from
  zero begins them again), counting the time bodies are received and the pauses after
  progress, not the waits after counted failures: a byte per connection is a trickle.
- **failures** are returned as ``ItemResult(error=...)``; only ``trio.Cancelled`` (and
  bugs) propagate. A caller that journals (an ``on_state``) keeps a failed item's part,
  and its state, for a later call to resume (``tasks.retry``), unless the part cannot be
  resumed (no validator nor length) or is what failed (a size over the cap, a sha256
  mismatch, a file system error): then the part is removed and the state cleared. Without
  ``on_state`` the part is always removed. On cancellation the part stays, for a resume
  after a daemon restart; a user's cancel removes it with ``remove_partial``.
- **progress**: ``on_bytes(delta, total)`` after every piece received; the sum of all
  deltas is always the amount of data the item holds (when ``on_state`` hears ``done``:
  the file's size), so a restart from zero reports a
  negative delta, a resume reports the bytes already on disk, and a failure takes back
  what it reported. ``total`` is the file's full size when the server said it.

Speed (figures in docs/bench-downloads.md, docs/bench-daemon.md): the body is received into
pooled buffers of ``chunk_size`` bytes, straight from the socket for large bodies
(``Response.receive_into``). Once the first buffer is full the body is large: the rest goes
into buffers ``LARGE_BUFFER_FACTOR`` times as large, through a bounded pipeline
(``_Writer``): a writer thread and, when a digest is wanted, a hasher thread take them from
queues while the loop fills the next ones, up to ``PIPELINE_DEPTH`` ahead. Disk, hash and
network overlap, and a busy event loop (a status stream to many subscribers) delays no
write, nor a write a receive. On plain HTTP with a Content-Length (``Response.blocking_body``)
and no speed limit, the receives themselves leave the loop: a thread of the download's own
(``_Receiver``) receives into those buffers and hands them to the writer, and the loop only
supervises (progress, the stall rule, cancellation). Under a speed limit and over TLS the
loop receives, as before; a limit set while the thread receives takes the rest of the body
back to the loop within ``http.WAIT_SLICE`` (0.1 s) or one buffer. A file that fits in one
buffer costs one hand-off to a worker in all (create the part, write, fsync, link, unlink),
and the workers share one directory fsync among the files they finish together. Blocking
file work never runs on the event loop.

Must not depend on the task manager, the journal or the RPC layer.
"""

from __future__ import annotations

import contextlib
import functools
import math
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import attrs
import trio

from statusd.downloads import auth, checksums, files, names, rules
from statusd.downloads.files import (
    BUFFERS,
    FILES,
    Directory,
    Part,
    Reserve,
    in_thread,
)
from statusd.downloads.http import (
    DEFAULT_MAX_HEADER_BYTES,
    BlockingBody,
    HeadTooLarge,
    HTTPClient,
    HTTPError,
    Interrupted,
    ProxyRefused,
    ResolveError,
    Response,
    TLSError,
)
from statusd.downloads.throttle import RateLimit, pace, pace_size
from statusd.redact import hide_credentials

NAME_BYTES = names.MAX_NAME_BYTES
FALLBACK_NAME = "download"
# A redirect's or an error answer's body up to this size is read (within the read timeout)
# so its keep-alive connection goes back to the pool; a bigger or slower one is closed.
_DRAIN_LIMIT = 64 * 1024
_T = TypeVar("_T")
DEFAULT_MAX_REDIRECTS = 20


def _sha256(value: str | None) -> str | None:
    return None if value is None else checksums.sha256(value).hex


def _checksum(value: str | None) -> str | None:
    return None if value is None else str(checksums.parse(value))


def _check_url(_instance: Any, _attribute: Any, value: str) -> None:
    names.validate_url(value)


def _header_pairs(
    value: Mapping[str, str] | Iterable[tuple[str, str]] | None,
) -> tuple[auth.Header, ...]:
    if value is None:
        return ()
    if isinstance(value, Mapping):
        return auth.check_headers(value)
    return auth.check_headers(dict(value))


@attrs.frozen
class DownloadItem:
    """One thing to download: ``url`` (``user:password@`` in it is sent as Basic
    credentials), and optionally the file name, the expected digest (``sha256``, or a
    ``checksum`` such as ``sha-512=HEX``; either is kept in lower case) and request
    headers. The headers and the credentials go to the URL's own origin only
    (``auth.py``)."""

    # Its repr hides the credentials and the header values: a repr may end up in a log.
    url: str = attrs.field(validator=_check_url, repr=hide_credentials)
    filename: str | None = None
    sha256: str | None = attrs.field(default=None, converter=_sha256)
    headers: tuple[auth.Header, ...] = attrs.field(default=(), converter=_header_pairs, repr=False)
    checksum: str | None = attrs.field(default=None, converter=_checksum)

    def __attrs_post_init__(self) -> None:
        if self.sha256 is not None and self.checksum is not None:
            raise ValueError("checksum and sha256 must not both be given: give one")

    @property
    def expected(self) -> checksums.Checksum | None:
        """The digest the file must have, if the item names one."""
        if self.checksum is not None:
            return checksums.parse(self.checksum)
        return None if self.sha256 is None else checksums.Checksum("sha-256", self.sha256)

    @property
    def expected_sha256(self) -> str | None:
        """The file's sha256 when the item names it (as ``sha256`` or a sha-256 checksum)."""
        expected = self.expected
        return expected.hex if expected is not None and expected.algorithm == "sha-256" else None

    @classmethod
    def accepted(
        cls, entry: Mapping[str, Any], task_headers: tuple[auth.Header, ...] = ()
    ) -> DownloadItem:
        """The item of a journalled spec entry, with ``task_headers`` under its own: what
        ``DownloadItem(**entry)`` makes, minus the checks (the url's, the pair of digests).
        ``tasks.download`` made them, in a thread, when it accepted the entry; making them
        again on the event loop at every start cost 7 us an item (3% of the loop's work for
        a 2,000-file task). The converters still run: they make the values (header pairs,
        digests in lower case), and cost nothing for what an entry leaves out."""
        if not entry.keys() <= _ITEM_DEFAULTS.keys():
            unknown = ", ".join(sorted(entry.keys() - _ITEM_DEFAULTS.keys()))
            raise TypeError(f"download item has unknown fields: {unknown}")
        if "url" not in entry:
            raise TypeError("download item has no url")
        item = object.__new__(cls)
        # What a frozen class's own __init__ does, minus the validators.
        for name, default in _ITEM_DEFAULTS.items():
            if name not in entry:
                object.__setattr__(item, name, default)
                continue
            value = entry[name]
            convert = _ITEM_CONVERTERS.get(name)
            object.__setattr__(item, name, value if convert is None else convert(value))
        if task_headers:
            object.__setattr__(item, "headers", auth.merged(task_headers, item.headers))
        return item


# Each field's default as the class's __init__ gives it (converted), and its converter.
_ITEM_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    field.name: cast("Callable[[Any], Any]", field.converter)
    for field in attrs.fields(DownloadItem)
    if field.converter is not None
}
_ITEM_DEFAULTS: dict[str, Any] = {
    field.name: _ITEM_CONVERTERS.get(field.name, lambda value: value)(field.default)
    for field in attrs.fields(DownloadItem)
}


def _at_least(minimum: float) -> Callable[[Any, Any, float], None]:
    def check(_instance: Any, attribute: Any, value: float) -> None:
        if value < minimum:
            raise ValueError(f"{attribute.name} must be >= {minimum:g}, not {value}")

    return check


def _positive(_instance: Any, attribute: Any, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, not {value}")


def _optional_cap(_instance: Any, attribute: Any, value: int | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{attribute.name} must be >= 0 or None, not {value}")


@attrs.frozen
class DownloadSettings:
    """How hard to try and how much to accept; one value shared by all items of a task."""

    # wget's and aria2c's (curl's is 50); the daemon's is downloads.max_redirects.
    max_redirects: int = attrs.field(default=DEFAULT_MAX_REDIRECTS, validator=_at_least(0))
    max_attempts: int = attrs.field(default=5, validator=_at_least(1))
    backoff_initial: float = attrs.field(default=0.5, validator=_at_least(0))
    backoff_max: float = attrs.field(default=30.0, validator=_at_least(0))
    connect_timeout: float = attrs.field(default=10.0, validator=_positive)
    read_timeout: float = attrs.field(default=30.0, validator=_positive)
    max_file_bytes: int | None = attrs.field(default=None, validator=_optional_cap)
    chunk_size: int = attrs.field(default=1 << 20, validator=_at_least(1))
    # A server asking for a longer pause than this gets this long.
    max_retry_after: float = attrs.field(default=300.0, validator=_at_least(0))
    # Hash every file (ItemResult.sha256), not only items that name an expected sha256.
    # Off by default: hashing runs beside the writes, but at about 1.8 GB/s per core it
    # cost a quarter of the large-file throughput on a 2-CPU machine (docs/bench-downloads.md).
    sha256_always: bool = False
    # The stall rule (rules.StallWatch): below lowest_speed bytes/s for stall_timeout
    # seconds, the item fails. 0: off, as it is for a caller that does not ask.
    lowest_speed: int = attrs.field(default=0, validator=_at_least(0))
    stall_timeout: float = attrs.field(default=60.0, validator=_positive)
    # Free space to leave on dest's file system; None: none.
    reserve: Reserve | None = None

    def backoff(self, failures: int) -> float:
        """The pause after the ``failures``-th failed attempt when the server gave none."""
        return rules.backoff(failures, self.backoff_initial, self.backoff_max)


@attrs.define
class ItemState:
    """What must survive a daemon restart for an item to resume; the caller journals it
    whenever ``on_state`` reports a change."""

    name: str | None = None  # the name asked for; once done, the final name inside dest
    validator: str | None = None  # ETag (strong) or Last-Modified of the part's data
    done: bool = False
    part: str | None = None  # the item's own part file (files.part_name); None: none yet
    # Without a validator: the entity's length as its server gave it (rules.resume_length),
    # which a resume's Content-Range must repeat; None: the part cannot be resumed.
    length: int | None = None

    @property
    def resumable(self) -> bool:
        """Whether a part under this state may be continued with a range request."""
        return self.validator is not None or self.length is not None


@attrs.frozen
class ItemResult:
    """How an item ended: ``path`` and ``sha256`` on success, ``error`` otherwise."""

    url: str
    path: str | None
    bytes: int
    sha256: str | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


@attrs.frozen
class Retrying:
    """An attempt failed and another follows after ``delay`` seconds (``on_retry``)."""

    attempt: int  # the one that follows, counting the first
    attempts: int  # max_attempts
    delay: float
    reason: str
    # False: the attempt that failed made progress, so it does not count against
    # max_attempts and the next one resumes where it stopped.
    counted: bool = True

    @property
    def message(self) -> str:
        """``retrying in 4 s (attempt 2 of 5): http 503 service unavailable``, or after an
        attempt that made progress ``resuming in 0.5 s (not counted as an attempt): ...``"""
        return retry_message(self.delay, self.attempt, self.attempts, self.counted, self.reason)


def retry_message(delay: float, attempt: int, attempts: int, counted: bool, reason: str) -> str:
    if not counted:
        return f"resuming in {round(delay, 1):g} s (not counted as an attempt): {reason}"
    return f"retrying in {round(delay, 1):g} s (attempt {attempt} of {attempts}): {reason}"


def _ignore_bytes(delta: int, total: int | None) -> None:
    pass


def _ignore_retry(retrying: Retrying) -> None:
    pass


async def _ignore_state(state: ItemState) -> None:
    pass


async def download_item(
    client: HTTPClient,
    item: DownloadItem,
    dest: Directory | Path,
    settings: DownloadSettings,
    state: ItemState,
    *,
    owner: str | None = None,
    on_bytes: Callable[[int, int | None], None] = _ignore_bytes,
    on_state: Callable[[ItemState], Awaitable[None]] = _ignore_state,
    on_retry: Callable[[Retrying], None] = _ignore_retry,
    limits: Sequence[RateLimit] = (),
) -> ItemResult:
    """Download ``item`` into the directory ``dest`` (a Path is opened, and created if
    missing, for this call; the caller trusts it). ``on_retry`` hears of each failed
    attempt that another follows, before the pause. Every piece received counts against
    each of ``limits`` (the task's, the daemon's), and the next receive waits until they
    all allow it; the stall rule does not see those waits.

    ``owner`` names the item's part file (no dots; unique among everything that writes
    into ``dest``); without one a random owner is made. ``on_state`` is awaited, and
    nothing is written under a name, part or validator before it returns: a caller that
    journals the state durably there can always resume. Never raises for a failed
    download (see ``ItemResult.error``); ``trio.Cancelled`` propagates at once, also while
    a server hangs.
    """
    owner = owner or secrets.token_hex(8)
    if not isinstance(dest, Directory):
        async with _directory(dest) as directory:
            return await download_item(
                client,
                item,
                directory,
                settings,
                state,
                owner=owner,
                on_bytes=on_bytes,
                on_state=on_state,
                on_retry=on_retry,
                limits=limits,
            )
    download = _Download(client, item, dest, settings, state, owner, on_bytes, on_state)
    download.on_retry = on_retry
    download.limits = limits
    try:
        return await download.run()
    except BaseExceptionGroup as group:
        raise _unwrap(group) from None


async def remove_partial(dest: Directory | Path, state: ItemState) -> bool:
    """Remove the item's own part (after a user's cancel); True if there was one. A
    finished item keeps its file; only its part still linked to it goes. An unfinished
    state without a part of its own (journalled before parts were owned) removes
    nothing."""
    if state.done and state.name is not None:
        async with _directory(dest) as directory:
            await in_thread(files.settle_done, directory, state.name, state.part)
        return False
    if state.part is None:
        return False
    async with _directory(dest) as directory:
        return await in_thread(files.unlink_quietly, directory, state.part)


@contextlib.asynccontextmanager
async def _directory(dest: Directory | Path) -> AsyncIterator[Directory]:
    if isinstance(dest, Directory):
        yield dest
        return
    directory = await in_thread(Directory.open, dest)
    try:
        yield directory
    finally:
        directory.close()


def make_client(
    settings: DownloadSettings | None = None, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> HTTPClient:
    """An HTTP client set up for downloads with ``settings`` (reads of chunk_size), taking
    response heads of up to ``max_header_bytes``."""
    settings = settings or DownloadSettings()
    return HTTPClient(
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        receive_size=settings.chunk_size,
        max_header_bytes=max_header_bytes,
    )


async def download_items(
    client: HTTPClient,
    items: Sequence[DownloadItem],
    dest: Path,
    settings: DownloadSettings,
    *,
    concurrency: int = 4,
    on_bytes: Callable[[int, int | None], None] = _ignore_bytes,
) -> list[ItemResult]:
    """Download ``items`` with at most ``concurrency`` at a time; results in item order.

    A convenience without journal or resume across restarts (the task's job does
    batching and persistence itself).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, not {concurrency}")
    results: list[ItemResult | None] = [None] * len(items)
    pending = iter(enumerate(items))
    run = secrets.token_hex(6)

    async def worker(directory: Directory) -> None:
        for index, item in pending:
            results[index] = await download_item(
                client,
                item,
                directory,
                settings,
                ItemState(),
                owner=f"{run}-{index}",
                on_bytes=on_bytes,
            )

    async with _directory(dest) as directory:
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(min(concurrency, len(items))):
                    nursery.start_soon(worker, directory)
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None
    return [result for result in results if result is not None]


# --- the engine -------------------------------------------------------------------------


class _Fail(Exception):
    """The item fails now, with this message; ``discard``: its part goes too (it is what
    failed, or can never complete), else a journalled item keeps it for ``tasks.retry``."""

    def __init__(self, message: str, *, discard: bool = False) -> None:
        super().__init__(message)
        self.discard = discard


class _Retry(Exception):
    """This attempt failed in a way worth another; ``delay`` is the server's Retry-After."""

    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class _Restart(Exception):
    """The server's partial answer cannot be appended: ask again, without a range."""


class _Download:
    def __init__(
        self,
        client: HTTPClient,
        item: DownloadItem,
        directory: Directory,
        settings: DownloadSettings,
        state: ItemState,
        owner: str,
        on_bytes: Callable[[int, int | None], None],
        on_state: Callable[[ItemState], Awaitable[None]],
    ) -> None:
        self.client = client
        self.item = item
        self.directory = directory
        self.settings = settings
        self.state = state
        self.owner = owner
        self.on_bytes = on_bytes
        self.on_state = on_state
        self.reported = 0  # the sum of the deltas given to on_bytes
        self.total: int | None = None
        self.allow_range = True
        # The algorithm the part is hashed with (checksums.ALGORITHMS), if any.
        self.hashing: str | None = "sha-256" if settings.sha256_always else None
        if item.expected is not None:
            self.hashing = item.expected.algorithm
        self.part: Part | None = None
        self.has_part = False  # whether the part is on disk, to remove on failure
        # A fresh item's name, part and validator, not yet given to on_state.
        self.unreported = False
        # A caller that journals the state hears of ``done`` while the part is still
        # linked to the final name: a crash before the journal has it then finds the pair
        # on the next run (``_finished_earlier``) instead of fetching the file again as
        # NAME.1. Without a journal the part goes in the same thread hop as the link.
        self.keep_part_until_done = on_state is not _ignore_state
        # The body being received: the buffer being filled, how full, the file position.
        self.buffer = bytearray()
        self.filled = 0
        self.position = 0
        # The stall rule, across the attempts of this call: begun at the first body byte,
        # it only sees the time bodies are received and the pauses after attempts that
        # made progress (``_resume_watch``), so a server cutting every connection is held
        # to lowest_speed as one that trickles on one connection is.
        self.stall: rules.StallWatch | None = None
        self.body_ended: float | None = None  # when the last body broke off
        self.counted_pause = 0.0  # of the time since then, what the stall rule sees
        # A failed attempt counts against max_attempts unless the part now holds more than
        # it ever did at the end of an attempt (``best``): resumable bytes are progress.
        self.kept = 0  # the bytes a next attempt may resume from
        self.best = 0
        # A journalled item keeps the part of a failure for ``tasks.retry``; without a
        # journal nobody could resume it.
        self.keep_failed_part = on_state is not _ignore_state
        self.on_retry: Callable[[Retrying], None] = _ignore_retry
        self.limits: Sequence[RateLimit] = ()

    async def run(self) -> ItemResult:
        if self.state.done and self.state.name is not None:
            size = await in_thread(
                files.settle_done, self.directory, self.state.name, self.state.part
            )
            if size is not None:
                self._report(size)
                return ItemResult(
                    self.item.url,
                    self.directory.join(self.state.name),
                    size,
                    self.item.expected_sha256,
                    None,
                )
            self.state.done = False  # the finished file is gone: its part may still hold it
        if self.state.part is None:
            # Nothing of its own on disk (or a state from before parts were owned, whose
            # NAME.part this item cannot prove is its own): start as a fresh item.
            self.state.name = self.state.validator = None
        failures = 0
        while True:
            try:
                return await self._attempt()
            except _Restart:
                self.allow_range = False
            except _Retry as exc:
                if self.kept > self.best:
                    # Progress: not counted, and retried after the shortest pause, which
                    # the stall rule counts (a server giving a byte per connection fails
                    # it as a trickle does).
                    self.best = self.kept
                    delay = self.counted_pause = self.settings.backoff_initial
                    counted = False
                else:
                    failures += 1
                    if failures >= self.settings.max_attempts:
                        return await self._failed(f"{exc} (gave up after {failures} attempts)")
                    delay = self.settings.backoff(failures) if exc.delay is None else exc.delay
                    self.counted_pause = 0.0
                    counted = True
                attempt = Retrying(failures + 1, self.settings.max_attempts, delay, str(exc))
                self.on_retry(attempt if counted else attrs.evolve(attempt, counted=False))
                await trio.sleep(delay)
            except _Fail as exc:
                return await self._failed(str(exc), discard=exc.discard)

    async def _failed(self, message: str, *, discard: bool = False) -> ItemResult:
        keep = self.keep_failed_part and self.has_part and not discard and self.state.resumable
        if self.state.part is not None and self.has_part and not keep:
            await in_thread(files.unlink_quietly, self.directory, self.state.part)
            self.has_part = False
        if not keep:
            # What the caller journals says there is nothing left to resume.
            self.state.name = self.state.validator = self.state.part = None
            self.state.length = None
        self._report(0)
        return ItemResult(self.item.url, None, 0, None, message)

    def _report(self, held: int) -> None:
        """Tell on_bytes that the item now holds ``held`` bytes."""
        if held != self.reported:
            delta, self.reported = held - self.reported, held
            self.on_bytes(delta, self.total)

    async def _attempt(self) -> ItemResult:
        offset = 0
        if self.allow_range and self.state.part is not None:
            found = await self._file_work(files.inspect_part, self.directory, self.state.part)
            if found.final is not None:
                return await self._finished_earlier(found.final)
            if found.size is not None:
                self.has_part = True
                # Neither a validator nor a length to check a resumed answer by: start again.
                offset = found.size if self.state.resumable else 0
        self.allow_range = True
        self.kept = offset
        self.best = max(self.best, offset)
        headers = []
        if offset > 0:
            headers = [("Range", f"bytes={offset}-")]
            if self.state.validator is not None:
                headers.append(("If-Range", self.state.validator))
        url = self.item.url
        for _ in range(self.settings.max_redirects + 1):
            try:
                async with self.client.stream(
                    "GET",
                    url,
                    [*headers, *self._credentials(url)],
                    connect_timeout=self.settings.connect_timeout,
                    read_timeout=self.settings.read_timeout,
                ) as response:
                    location = response.headers.get("location")
                    if rules.is_redirect(response.status, location):
                        assert location is not None
                        url = _redirect_target(url, rules.location_text(location))
                        await _drain(response, self.settings.read_timeout)
                        continue
                    if 200 <= response.status < 300:
                        return await self._receive(response, offset)
                    if response.status == rules.RANGE_NOT_SATISFIABLE and offset > 0:
                        return await self._unsatisfiable(response, offset)
                    failure = _status_error(response, self.settings.max_retry_after)
                    await _drain(response, self.settings.read_timeout)
                # Raised once out of the stream: an exception inside it closes the connection.
                raise failure
            except HeadTooLarge as exc:
                raise _Fail(f"{exc} (downloads.max_response_head_bytes)") from exc
            except TLSError as exc:
                raise _Fail(str(exc)) from exc
            except ProxyRefused as exc:
                if exc.final:
                    raise _Fail(str(exc)) from exc
                raise _Retry(str(exc)) from exc
            except ResolveError as exc:
                # A name that does not exist is the URL's fault, not the server's: asking
                # again only delays the answer.
                if not exc.temporary:
                    raise _Fail(str(exc)) from exc
                raise _Retry(str(exc)) from exc
            except HTTPError as exc:
                raise _Retry(str(exc)) from exc
        raise _Fail(
            f"too many redirects: more than {self.settings.max_redirects} (downloads.max_redirects)"
        )

    def _credentials(self, url: str) -> list[auth.Header]:
        """The item's headers and its URL's Basic credentials, for its own origin only:
        after a redirect to another scheme, host or port none of them goes along."""
        if not self.item.headers and "@" not in self.item.url:
            return []  # the common case, without a parse per request
        if url != self.item.url and not auth.same_origin(url, self.item.url):
            return []
        return auth.request_headers(self.item.url, self.item.headers)

    async def _finished_earlier(self, final: str) -> ItemResult:
        """A crash came between linking the part to ``final`` and journalling it: finish."""
        assert self.state.part is not None
        size = await in_thread(files.file_size, self.directory, final) or 0
        self._report(size)
        self.state.name = final
        self.state.done = True
        await self.on_state(self.state)
        await in_thread(files.unlink_quietly, self.directory, self.state.part)
        self.has_part = False
        path = self.directory.join(final)
        return ItemResult(self.item.url, path, size, self.item.expected_sha256, None)

    async def _unsatisfiable(self, response: Response, offset: int) -> ItemResult:
        """A 416 to our range: the part may hold the whole entity already."""
        decision = rules.range_not_satisfiable(
            response.headers,
            offset,
            self.state.validator,
            self.item.expected is not None,
            self.state.length,
        )
        await _drain(response, self.settings.read_timeout)
        if isinstance(decision, rules.Restart):
            raise _Restart()
        assert self.state.part is not None
        self.total = offset
        self.part = await self._file_work(
            files.open_part, self.directory, self.state.part, offset, self.hashing
        )
        try:
            self._report(offset)
            self.position = offset
            self.buffer, self.filled = bytearray(), 0
            # A part whose digest is not the item's was some other entity's prefix: it is
            # gone (``finish`` removed it), and the item starts again from zero.
            return await self._complete(on_mismatch=_Restart)
        finally:
            if self.part is not None:
                self.part.close()
                self.part = None

    async def _receive(self, response: Response, offset: int) -> ItemResult:
        decision = rules.body_decision(
            response.status, response.headers, offset, self.state.validator, self.state.length
        )
        if isinstance(decision, rules.Restart):
            raise _Restart()
        if isinstance(decision, rules.Reject):
            raise _Fail(decision.message)
        start, validator = decision.start, decision.validator
        self.total = decision.total
        cap = self.settings.max_file_bytes
        if cap is not None and self.total is not None and self.total > cap:
            raise _Fail(_cap_message(cap), discard=True)
        length = self.state.length
        if start == 0:
            length = rules.resume_length(response.headers, self.total) if not validator else None

        self.part = None
        try:
            if self.state.part is None:
                # A fresh item: claim a name and its own part. The part is created
                # (O_EXCL) with the first write, in the same thread hop as the whole of a
                # small file, which needs no report before it: a crash in that hop leaves
                # a part that is found by its owner (``files.own_parts``). A large file's
                # state is reported before its first write (``_ensure_part``).
                self.state.name = self._first_candidate(response)
                self.state.part = files.part_name(self.state.name, self.owner)
                self.state.validator, self.state.length = validator, length
                self.unreported = True
            else:
                # Resuming, or starting again: a new part inode *before* a new validator
                # is reported, so the part only ever holds that entity's prefix.
                self.part = await self._file_work(
                    files.open_part, self.directory, self.state.part, start, self.hashing
                )
                self.has_part = True
                if (validator, length) != (self.state.validator, self.state.length):
                    self.state.validator, self.state.length = validator, length
                    await self.on_state(self.state)
                    self.unreported = False
            self._report(start)
            return await self._stream(response, start)
        finally:
            if self.part is not None:
                self.part.close()
                self.part = None

    def _first_candidate(self, response: Response) -> str:
        sources: list[Callable[[], str | None]] = [
            lambda: self.item.filename,
            lambda: _maybe(
                names.filename_from_content_disposition, response, "content-disposition"
            ),
            lambda: names.filename_from_url(response.url),
            lambda: names.filename_from_url(self.item.url),
            lambda: names.directory_index(response.url),
        ]
        for source in sources:
            candidate = source()
            if candidate:
                fitted = names.safe_filename(candidate, max_bytes=NAME_BYTES)
                if fitted:
                    return fitted
        return FALLBACK_NAME

    async def _file_work(self, work: Callable[..., _T], *args: Any) -> _T:
        """Run blocking file work in a thread; a file system error fails the item."""
        try:
            return await in_thread(work, *args)
        except OSError as exc:
            raise self._part_failure(exc) from exc

    async def _stream(self, response: Response, start: int) -> ItemResult:
        """Receive the body into pooled buffers of ``chunk_size`` bytes. The first one is
        filled before any file work, so a file that fits costs one thread hop in all;
        after that each full buffer goes to the writer while the next one fills."""
        self.position = start
        self.buffer = BUFFERS.take(self.settings.chunk_size)
        self.filled = 0
        if self.settings.lowest_speed:
            self._resume_watch(start)
        try:
            try:
                await self._fill(response)
                if self.filled == len(self.buffer):
                    await self._stream_large(response)
            except HTTPError:
                self.body_ended = trio.current_time()
                await self._keep()
                self.kept = self.position if self.state.resumable else 0
                raise
            except trio.Cancelled:
                # Shutting down: keep what is in memory for the resume (milliseconds).
                with trio.CancelScope(shield=True), contextlib.suppress(_Fail):
                    await self._keep()
                raise
            return await self._complete(on_mismatch=_Fail)
        finally:
            BUFFERS.give(self.buffer)

    def _resume_watch(self, start: int) -> None:
        """Carry the stall rule over to this body, if it continues the last one's bytes;
        of the time in between, only a pause after progress counts."""
        now = trio.current_time()
        stall = self.stall
        if stall is None or self.body_ended is None or stall.held != start:
            self.stall = rules.StallWatch.begin(
                self.settings.lowest_speed, self.settings.stall_timeout, now, start
            )
            return
        stall.postpone(now - self.body_ended - self.counted_pause)

    async def _fill(self, response: Response) -> None:
        """Read into the buffer until it is full or the body ends. The wait for data ends
        at the stall watch's deadline, which only moves when bytes arrive: a receive is
        cut off only when the item fails anyway. Under speed limits, every ``pace_size``
        bytes received (and what is left at the end) wait for the limits before the next
        receive."""
        cap = self.settings.max_file_bytes
        view = memoryview(self.buffer)
        stall = self.stall
        limits = self.limits
        unpaced = 0  # received and not yet counted against the limits
        with trio.CancelScope(deadline=math.inf if stall is None else stall.deadline) as scope:
            while self.filled < len(view):
                end = len(view)
                if limits:
                    # Whole turns of pace_size bytes, however the network cuts them: the
                    # items sharing a limit take turns, so equal turns are equal shares.
                    quota = pace_size(limits, self.settings.chunk_size)
                    end = min(end, self.filled + max(1, quota - unpaced))
                count = await response.receive_into(view[self.filled : end])
                if count == 0:
                    break
                self.position += count
                if cap is not None and self.position > cap:
                    raise _Fail(_cap_message(cap), discard=True)
                self.filled += count
                self._report(self.position)
                if stall is not None:
                    if stall.sample(trio.current_time(), self.position):
                        raise _Fail(stall.message)
                    scope.deadline = stall.deadline
                if limits:
                    unpaced += count
                    if unpaced >= quota:
                        await self._pace(unpaced, scope)
                        unpaced = 0
            if unpaced:
                await self._pace(unpaced, scope)
        if scope.cancelled_caught:
            assert stall is not None
            raise _Fail(stall.message)

    async def _pace(self, count: int, scope: trio.CancelScope) -> None:
        """Wait until the limits allow ``count`` bytes more. The wait is ours, not the
        server's slowness: the stall rule must not see it."""
        scope.deadline = math.inf
        waited = await pace(self.limits, count)
        if self.stall is not None:
            self.stall.postpone(waited)
            scope.deadline = self.stall.deadline

    async def _stream_large(self, response: Response) -> None:
        part = await self._ensure_part()
        writer = _Writer(part, self.total, self.settings.reserve)
        size = self.settings.chunk_size * LARGE_BUFFER_FACTOR
        # Under speed limits the receives wait for the limits' turns on the loop, as
        # small bodies do: a limited download is slow by request, its loop turns cheap.
        body = None if self._limited() else response.blocking_body()
        try:
            writer.start()
            if body is not None:
                await writer.write(self.buffer)
                self.buffer = writer.take(size)
                self.filled = 0
                await self._receive_in_thread(body, writer, size)
                await self._fill(response)  # the rest, if a limit took it back to the loop
            while self.filled == len(self.buffer):
                await writer.write(self.buffer)  # the writer owns it from here
                self.buffer = writer.take(size)
                self.filled = 0
                await self._fill(response)
            await writer.wait()
        except OSError as exc:
            raise self._part_failure(exc) from exc
        finally:
            await writer.close()

    async def _receive_in_thread(self, body: BlockingBody, writer: _Writer, size: int) -> None:
        """Receive the rest of the body in a thread of its own (``_Receiver``), which hands
        full buffers to the writer; the loop only supervises: it reports the bytes when
        the thread says (or when the stall rule's deadline comes), applies the stall rule,
        and on a cancel or a failure interrupts the receive and waits for the thread,
        which returns within one receive. After it, ``buffer``/``filled``/``position``
        are the thread's: the bytes received and not handed over, for ``_keep`` or
        ``_complete``. A body whose bytes arrive on a busy loop's turns got a receive per
        turn (0.49x of the download alone under a status stream, docs/bench-daemon.md)."""
        receiver = _Receiver(
            body, writer, self.buffer, self.position, size, self.settings.max_file_bytes
        )
        stall = self.stall
        # A limit set while the server is silent stops the thread at once (within
        # WAIT_SLICE), not only at the thread's next report after data comes again.
        unwatch = [limit.watch(lambda: receiver.changed.set()) for limit in self.limits]
        receiver.start()
        try:
            while not receiver.finished:
                deadline = math.inf if stall is None else stall.deadline
                with trio.move_on_at(deadline):
                    await receiver.changed.wait()
                receiver.changed = trio.Event()
                position = receiver.position
                self._report(position)
                if stall is not None and stall.sample(trio.current_time(), position):
                    raise _Fail(stall.message)
                if self._limited():
                    # A limit set meanwhile (tasks.set_rate, a reload): the thread stops
                    # at its next receive, within WAIT_SLICE, and the loop paces the rest.
                    body.stop_soon()
        finally:
            for stop_watching in unwatch:
                stop_watching()
            if not receiver.finished:
                body.interrupt()
                writer.interrupt()
                with trio.CancelScope(shield=True):
                    await receiver.stopped.wait()
            self.buffer, self.filled = receiver.buffer, receiver.filled
            self.position = receiver.position
            self._report(self.position)
        if receiver.error is not None:
            raise receiver.error

    def _limited(self) -> bool:
        return any(limit.rate for limit in self.limits)

    async def _ensure_part(self) -> Part:
        """The open part file, created (O_EXCL) if there is none yet. Data that outlives
        this attempt in it is resumed only under its validator (or, without one, its
        length), so a state that could resume it and is not yet reported is reported
        first."""
        if self.unreported and self.state.resumable:
            await self.on_state(self.state)
        self.unreported = False
        if self.part is None:
            assert self.state.part is not None
            self.part = await self._file_work(
                files.create_part, self.directory, self.state.part, self.hashing
            )
            self.has_part = True
        return self.part

    async def _keep(self) -> None:
        """Write what arrived before a connection broke, for the retry to resume after."""
        if self.filled and self.state.resumable:
            part = await self._ensure_part()
            data = memoryview(self.buffer)[: self.filled]
            await self._file_work(files.write_data, part, data, self.settings.reserve)

    def _part_failure(self, exc: OSError) -> _Fail:
        part = self.directory.join(self.state.part or FALLBACK_NAME)
        return _Fail(files.file_error(exc, part), discard=True)

    async def _complete(self, on_mismatch: type[Exception]) -> ItemResult:
        expected = self.item.expected
        assert self.state.name is not None
        assert self.state.part is not None
        data = memoryview(self.buffer)[: self.filled]
        try:
            outcome = await FILES.run(
                files.finish,
                self.part,
                data,
                self.directory,
                self.state.part,
                self.state.name,
                None if expected is None else expected.hex,
                self.hashing,
                self.keep_part_until_done,
                self.settings.reserve,
                sync_directory=self.directory,
            )
        except OSError as exc:
            self.part = None
            self.has_part = False  # finish removed it, or never created one
            raise self._part_failure(exc) from exc
        self.part = None  # closed by finish
        if outcome.final is None:
            self.has_part = False  # finish removed it
            assert expected is not None
            raise on_mismatch(
                f"{expected.label} mismatch: expected {expected.hex}, got {outcome.digest}"
            )
        self.state.name = outcome.final
        self.state.done = True
        await self.on_state(self.state)
        if self.keep_part_until_done:
            await in_thread(files.unlink_quietly, self.directory, self.state.part)
        self.has_part = False
        path = self.directory.join(outcome.final)
        sha256 = outcome.digest if self.hashing == "sha-256" else None
        return ItemResult(self.item.url, path, self.position, sha256, None)


# Buffers a download may have received and not yet written (and hashed): the loop keeps
# receiving while the writer thread catches up, so a write that waits for the disk, or a
# wake-up that waits for a busy event loop, stalls neither side. At 1 MiB chunks, 4 MiB
# of memory per large download.
PIPELINE_DEPTH = 4
# A body that filled its first buffer is large: the rest is received into buffers this many
# times ``chunk_size``. With a status stream to 100 subscribers the loop gets to the socket
# far less often, and each time takes what the kernel holds, up to a buffer: 4 MiB buffers
# took 1.7x the MB/s of 1 MiB ones under that load (docs/bench-daemon.md). At most
# PIPELINE_DEPTH of them, 16 MiB, per large download, only while the disk lags.
LARGE_BUFFER_FACTOR = 4


class _Job:
    __slots__ = ("buffer", "rest", "users", "view")

    def __init__(self, buffer: bytearray, rest: int, users: int) -> None:
        self.buffer = buffer
        self.view = memoryview(buffer)
        self.rest = rest  # the bytes of the file still to come, this buffer's included
        self.users = users  # the threads (writer, hasher) not yet done with it


class _Writer:
    """Appends full buffers to the part in a thread of its own and feeds them, in another,
    to the hasher (file writes and hashlib both release the GIL), while the event loop
    receives the next ones: up to ``PIPELINE_DEPTH`` buffers in flight, handed over through
    queues, so a buffer costs the loop no wake-up unless it has to wait for room. The
    threads run until ``close``; a write error is kept and raised by the next ``write``
    or ``wait``, and the buffers after it are dropped unwritten. With a ``reserve``, each
    write first claims its room, and the rest of the file's (``total``, when known): a
    file that cannot fit fails before its first byte is written."""

    def __init__(self, part: Part, total: int | None, reserve: Reserve | None) -> None:
        self._part = part
        self._total = total
        self._reserve = reserve
        self._token = trio.lowlevel.current_trio_token()
        self._lock = threading.Lock()
        self._pending = 0  # buffers handed over that some thread still uses
        self._room = -1  # the loop waits until _pending <= _room
        self._wake: trio.Event | None = None
        self._error: Exception | None = None
        self._free: deque[bytearray] = deque()  # buffers every thread is done with
        self._queues: list[queue.SimpleQueue[_Job | None]] = [queue.SimpleQueue()]
        if part.hasher is not None:
            self._queues.append(queue.SimpleQueue())
        self._running = 0  # threads started and not yet finished
        self._stopped = trio.Event()
        # A receiving thread (``put``) waits on this for room; ``interrupt`` wakes it.
        self._room_made = threading.Condition(self._lock)
        self._interrupted = False

    def start(self) -> None:
        works: list[Callable[[_Job], None]] = [self._write, self._hash]
        for jobs, work in zip(self._queues, works, strict=False):
            with self._lock:
                self._running += 1
            try:
                trio.lowlevel.start_thread_soon(
                    functools.partial(self._consume, jobs, work), self._thread_done
                )
            except BaseException:
                with self._lock:
                    self._running -= 1
                raise

    async def close(self) -> None:
        """Let the threads finish what they were given and wait for them: a caller that
        writes after this (``_keep``, ``finish``) appends at the right offset."""
        with self._lock:
            running = self._running
        if running:
            for jobs in self._queues:
                jobs.put(None)
            with trio.CancelScope(shield=True):
                await self._stopped.wait()
        while self._free:
            BUFFERS.give(self._free.popleft())

    def take(self, size: int) -> bytearray:
        """A buffer for the next receive: one the threads are done with, if it fits."""
        while self._free:
            buffer = self._free.popleft()
            if len(buffer) == size:
                return buffer
            BUFFERS.give(buffer)
        return BUFFERS.take(size)

    async def write(self, buffer: bytearray) -> None:
        """Hand ``buffer`` (all of it) to the threads; waits only while the pipeline is
        full."""
        await self._until(PIPELINE_DEPTH - 1)
        size = len(buffer)
        rest = size if self._total is None else max(size, self._total - self._part.position)
        job = _Job(buffer, rest, len(self._queues))
        with self._lock:
            self._pending += 1
        for jobs in self._queues:
            jobs.put(job)
        self._part.position += size

    async def wait(self) -> None:
        """Wait until everything handed over is written (and hashed)."""
        await self._until(0)

    def put(self, buffer: bytearray) -> None:
        """``write`` for a receiving thread: blocks while the pipeline is full. Raises a
        write error, or ``_Interrupted`` once ``interrupt`` was called (``buffer`` is
        then still the caller's)."""
        with self._lock:
            while True:
                if self._error is not None:
                    raise self._error
                if self._interrupted:
                    raise _Interrupted()
                if self._pending <= PIPELINE_DEPTH - 1:
                    break
                self._room_made.wait()
            self._pending += 1
        size = len(buffer)
        total = self._total
        rest = size if total is None else max(size, total - self._part.position)
        job = _Job(buffer, rest, len(self._queues))
        for jobs in self._queues:
            jobs.put(job)
        self._part.position += size

    def take_free(self) -> bytearray | None:
        """For a receiving thread: a buffer the threads are done with, if any (the pool of
        ``take`` is the loop's)."""
        try:
            return self._free.popleft()
        except IndexError:
            return None

    def interrupt(self) -> None:
        """Make a ``put`` waiting for room, and every later one, raise ``_Interrupted``."""
        with self._lock:
            self._interrupted = True
            self._room_made.notify_all()

    async def _until(self, most: int) -> None:
        while True:
            with self._lock:
                if self._error is not None:
                    raise self._error
                if self._pending <= most:
                    return
                self._room = most
                wake = self._wake = trio.Event()
            await wake.wait()

    def _consume(self, jobs: queue.SimpleQueue[_Job | None], work: Callable[[_Job], None]) -> None:
        while (job := jobs.get()) is not None:
            error = None
            if self._error is None:
                try:
                    work(job)
                except Exception as exc:  # an OSError fails the item; anything else is a bug
                    error = exc
            self._release(job, error)

    def _write(self, job: _Job) -> None:
        if self._reserve is not None:
            self._reserve.claim(self._part.fd, len(job.view), job.rest)
        files.write_all(self._part.fd, job.view)

    def _hash(self, job: _Job) -> None:
        files.hash_data(self._part.hasher, job.view)

    def _release(self, job: _Job, error: Exception | None) -> None:
        with self._lock:
            if error is not None and self._error is None:
                self._error = error
            job.users -= 1
            if job.users == 0:
                self._pending -= 1
                self._free.append(job.buffer)
                self._room_made.notify()
            elif error is not None:
                self._room_made.notify()
            wake = self._wake
            if wake is None or (self._pending > self._room and self._error is None):
                return
            self._wake = None
        self._token.run_sync_soon(wake.set)

    def _thread_done(self, _outcome: object) -> None:
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._stopped.set)


class _Interrupted(Exception):
    """The loop stopped a receiving thread (a cancel, the stall rule)."""


# A receiving thread tells the loop of its bytes when it hands a buffer over and, between
# buffers, at most this often (the system's clock): progress for a slow download, and not
# a loop wake-up per receive for a fast one.
PROGRESS_EVERY = 0.1


class _Receiver:
    """Receives a body in a thread of its own into buffers of ``size`` bytes and hands
    each full one to the writer (``_Writer.put``: blocking while 4 are in flight). It
    counts ``position`` (read by the loop whenever it likes: an int swapped under the
    GIL) and sets ``changed`` through the loop's token, never with one wake-up pending
    already; ``stopped`` when the thread is gone. What it received and did not hand over
    stays in ``buffer[:filled]``. Its errors (the body's ``HTTPError``s, a write's
    ``OSError``, the size cap's ``_Fail``) are kept in ``error`` for the loop to raise;
    an interrupted thread just stops."""

    def __init__(
        self,
        body: BlockingBody,
        writer: _Writer,
        buffer: bytearray,
        position: int,
        size: int,
        cap: int | None,
    ) -> None:
        self._body = body
        self._writer = writer
        self._size = size
        self._cap = cap
        self._token = trio.lowlevel.current_trio_token()
        self.buffer = buffer
        self.filled = 0
        self.position = position
        self.error: Exception | None = None
        self.finished = False
        self.changed = trio.Event()
        self.stopped = trio.Event()
        self._posted = False
        self._posted_at = 0.0

    def start(self) -> None:
        trio.lowlevel.start_thread_soon(self._run, self._done, name="statusd-receive")

    def _run(self) -> None:
        try:
            while True:
                view = memoryview(self.buffer)
                while self.filled < len(view):
                    count = self._body.receive_into(view[self.filled :])
                    if count == 0:
                        return
                    self.filled += count
                    self.position += count
                    if self._cap is not None and self.position > self._cap:
                        raise _Fail(_cap_message(self._cap), discard=True)
                    if self._body.stopping:
                        return
                    if time.monotonic() - self._posted_at >= PROGRESS_EVERY:
                        self._post()
                if not self._body.remaining:
                    return  # the body fits this buffer exactly: ``_complete`` writes it
                self._writer.put(self.buffer)
                self._post()
                self.buffer = self._writer.take_free() or bytearray(self._size)
                self.filled = 0
        except (_Interrupted, Interrupted):
            pass
        except Exception as exc:  # HTTPError, OSError, _Fail: the loop raises it
            self.error = exc
        finally:
            self._body.close()

    def _post(self) -> None:
        self._posted_at = time.monotonic()
        if self._posted:
            return
        self._posted = True
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._wake)

    def _wake(self) -> None:
        self._posted = False
        self.changed.set()

    def _done(self, _outcome: object) -> None:
        def finish() -> None:
            self.finished = True
            self.changed.set()
            self.stopped.set()

        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(finish)


@contextlib.asynccontextmanager
async def _open_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery that lets its one error out as itself rather than in an exception group,
    so callers of download_item can ``except trio.Cancelled`` and ``except OSError``."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        raise _unwrap(group) from None


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    leaves = list(_leaves(group))
    errors = [leaf for leaf in leaves if not isinstance(leaf, trio.Cancelled)]
    if not errors:
        return leaves[0]
    if len(errors) == 1:
        return errors[0]
    return group


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


# --- what the server said ------------------------------------------------------------


def _status_error(response: Response, max_retry_after: float) -> Exception:
    failure = rules.status_failure(
        response.status, response.reason, response.headers, datetime.now(UTC)
    )
    if isinstance(failure, rules.Reject):
        return _Fail(failure.message)
    delay = None if failure.delay is None else min(failure.delay, max_retry_after)
    return _Retry(failure.message, delay)


def _redirect_target(url: str, location: str) -> str:
    try:
        return rules.redirect_target(url, location)
    except ValueError as exc:
        raise _Fail(str(exc)) from None


async def _drain(response: Response, within: float) -> None:
    """Read a body we do not want to its end, so its connection can be reused: one of a
    known length up to ``_DRAIN_LIMIT``, or a chunked one that ends by then, in ``within``
    seconds in all. Otherwise it is left unread, and the connection is closed (cheaper
    than reading a large page; a body that ends with the connection leaves none to keep)."""
    if response.headers.get("transfer-encoding") is None:
        length = rules.content_length(response.headers.get("content-length"))
        if length is None or length > _DRAIN_LIMIT:
            return
    with trio.move_on_after(within), contextlib.suppress(HTTPError):
        await response.read(_DRAIN_LIMIT)


def _cap_message(cap: int) -> str:
    return f"file exceeds the size cap of {cap} bytes (downloads.max_file_bytes)"


def _maybe(parse: Callable[[str], str | None], response: Response, header: str) -> str | None:
    value = response.headers.get(header)
    return None if value is None else parse(value)
