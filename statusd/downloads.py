"""The download engine: one item, from an http(s) URL to a file inside ``dest``.

``download_item`` is the whole of it; the task manager runs many of them (batches,
concurrency, journal) and knows nothing of HTTP. What one call guarantees:

- **where**: the file name comes from the item's ``filename``, the server's
  ``Content-Disposition``, the final URL's path, the original URL's path, or
  ``download``, in that order, reduced to one safe component by ``statusd.names``; data
  goes to ``NAME.part`` (opened with ``O_NOFOLLOW``, created with ``O_EXCL``, which also
  reserves NAME against other downloads into the same directory), and the finished file
  is linked to NAME with ``os.link``, which fails rather than overwrite: a taken NAME
  becomes ``NAME.1.ext``, ``NAME.2.ext``, ... Nothing is ever written outside ``dest``.
- **durability**: the data is fdatasynced before the link, and the directory after it, before
  the item is reported done.
- **resume**: ``ItemState`` (name and validator) is handed to ``on_state`` whenever it
  changes, and ``on_state`` is awaited before any data is written under it, so a caller
  that journals it there durably never loses a part file to a crash. ``done`` is reported
  while NAME.part is still linked to NAME (when there is an ``on_state``): a crash before
  the caller has it finds the pair and finishes, rather than fetch NAME.1. With a
  ``NAME.part`` of N bytes and a validator, a retry (or a call after a restart) asks for
  ``Range: bytes=N-`` with ``If-Range``. A 206 from byte N with the same validator is
  appended; a 200 means the server sent the whole entity, so the part is emptied and
  filled from zero; a 206 from elsewhere or with another validator is dropped and asked
  for again without a range. Invariant: ``NAME.part`` always holds a prefix of the entity
  that ``state.validator`` names (the part is emptied *before* a new validator is
  reported).
- **retries**: connection errors, timeouts, a body cut short, 5xx and 429 are retried up
  to ``max_attempts`` attempts in all, waiting ``backoff_initial * 2**(k-1)`` seconds after
  the k-th failure (at most ``backoff_max``), or what ``Retry-After`` asks (at most
  ``max_retry_after``). Other 4xx, TLS certificate errors, a size over the cap, a sha256
  mismatch, a full disk and too many redirects fail the item at once.
- **failures** are returned as ``ItemResult(error=...)`` and the item's ``NAME.part`` is
  removed; only ``trio.Cancelled`` (and bugs) propagate. On cancellation ``NAME.part``
  stays, for a resume after a daemon restart; a user's cancel removes it with
  ``remove_partial``.
- **progress**: ``on_bytes(delta, total)`` after every piece received; the sum of all
  deltas is always the amount of data the item holds (when ``on_state`` hears ``done``:
  the file's size), so a restart from zero reports a
  negative delta, a resume reports the bytes already on disk, and a failure takes back
  what it reported. ``total`` is the file's full size when the server said it.

Speed (figures in docs/bench-downloads.md): the body is received into pooled buffers of
``chunk_size`` bytes, straight from the socket for large bodies (``Response.receive_into``);
a full buffer is written, and hashed when a digest is wanted, by worker threads while the
next one fills, so disk and network overlap. A file that fits in one buffer costs one
hand-off to a worker in all (create the part, write, fsync, link, unlink), and the
workers share one directory fsync among the files they finish together. Blocking file
work never runs on the event loop.

Must not depend on the task manager, the journal or the RPC layer.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http
import os
import queue
import re
import threading
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio

from statusd import names
from statusd.http import HTTPClient, HTTPError, Response, TLSError

NAME_BYTES = names.MAX_NAME_BYTES - len(".part")  # so that NAME.part still fits
FALLBACK_NAME = "download"
MAX_NUMBERED = 10_000
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRY_STATUSES = frozenset({429})  # and every 5xx
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)
_DRAIN_LIMIT = 64 * 1024  # a redirect's body up to this size is read so the connection stays
_HASH_BLOCK = 1 << 20
_T = TypeVar("_T")


def _check_sha256(_instance: Any, _attribute: Any, value: str | None) -> None:
    if value is not None and not _SHA256.fullmatch(value):
        raise ValueError(f"sha256 must be 64 lowercase hex digits, not {value!r}")


def _check_url(_instance: Any, _attribute: Any, value: str) -> None:
    names.validate_url(value)


@attrs.frozen
class DownloadItem:
    """One thing to download: ``url``, and optionally the file name and expected sha256."""

    url: str = attrs.field(validator=_check_url)
    filename: str | None = None
    sha256: str | None = attrs.field(default=None, validator=_check_sha256)


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

    max_redirects: int = attrs.field(default=10, validator=_at_least(0))
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

    def backoff(self, failures: int) -> float:
        """The pause after the ``failures``-th failed attempt when the server gave none."""
        return float(min(self.backoff_max, self.backoff_initial * 2 ** (failures - 1)))


@attrs.define
class ItemState:
    """What must survive a daemon restart for an item to resume; the caller journals it
    whenever ``on_state`` reports a change."""

    name: str | None = None  # the file name inside dest; data goes to NAME.part
    validator: str | None = None  # ETag (strong) or Last-Modified of NAME.part's data
    done: bool = False


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


def _ignore_bytes(delta: int, total: int | None) -> None:
    pass


async def _ignore_state(state: ItemState) -> None:
    pass


async def download_item(
    client: HTTPClient,
    item: DownloadItem,
    dest: Path,
    settings: DownloadSettings,
    state: ItemState,
    *,
    on_bytes: Callable[[int, int | None], None] = _ignore_bytes,
    on_state: Callable[[ItemState], Awaitable[None]] = _ignore_state,
) -> ItemResult:
    """Download ``item`` into the directory ``dest`` (created if missing).

    ``on_state`` is awaited, and nothing is written under a name or validator before it
    returns: a caller that journals the state durably there can always resume.
    Never raises for a failed download (see ``ItemResult.error``); ``trio.Cancelled``
    propagates at once, also while a server hangs.
    """
    download = _Download(client, item, dest, settings, state, on_bytes, on_state)
    try:
        return await download.run()
    except BaseExceptionGroup as group:
        raise _unwrap(group) from None


async def remove_partial(dest: Path, state: ItemState) -> bool:
    """Remove the item's ``NAME.part`` (after a user's cancel); True if there was one.
    A finished item keeps its file; only a part still linked to it goes."""
    if state.name is None:
        return False
    if state.done:
        await _in_thread(_settle_done, os.fspath(dest), state.name)
        return False
    return await _in_thread(_unlink_quietly, _join(os.fspath(dest), _part_name(state.name)))


def make_client(settings: DownloadSettings | None = None) -> HTTPClient:
    """An HTTP client set up for downloads with ``settings`` (reads of chunk_size)."""
    settings = settings or DownloadSettings()
    return HTTPClient(
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        receive_size=settings.chunk_size,
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

    A convenience without journal or resume across restarts (the task manager does
    batching and persistence itself).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, not {concurrency}")
    results: list[ItemResult | None] = [None] * len(items)
    pending = iter(enumerate(items))

    async def worker() -> None:
        for index, item in pending:
            results[index] = await download_item(
                client, item, dest, settings, ItemState(), on_bytes=on_bytes
            )

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(min(concurrency, len(items))):
                nursery.start_soon(worker)
    except BaseExceptionGroup as group:
        raise _unwrap(group) from None
    return [result for result in results if result is not None]


# --- the engine -------------------------------------------------------------------------


class _Fail(Exception):
    """The item fails now, with this message."""


class _Retry(Exception):
    """This attempt failed in a way worth another; ``delay`` is the server's Retry-After."""

    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class _Restart(Exception):
    """The server's partial answer cannot be appended: ask again, without a range."""


@attrs.define
class _Part:
    """NAME.part, open for writing at ``position``; ``fd`` is -1 once closed."""

    fd: int
    hasher: Any  # hashlib.sha256(), or None when nobody asked for the digest
    position: int

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


@attrs.frozen
class _Taken:
    """The name asked for is in use; ``free`` was free a moment ago."""

    free: str


@attrs.frozen
class _Finished:
    final: str | None  # None: the sha256 did not match and the part is gone
    digest: str | None


class _Download:
    def __init__(
        self,
        client: HTTPClient,
        item: DownloadItem,
        dest: Path,
        settings: DownloadSettings,
        state: ItemState,
        on_bytes: Callable[[int, int | None], None],
        on_state: Callable[[ItemState], Awaitable[None]],
    ) -> None:
        self.client = client
        self.item = item
        self.dest = os.fspath(dest)
        self.settings = settings
        self.state = state
        self.on_bytes = on_bytes
        self.on_state = on_state
        self.reported = 0  # the sum of the deltas given to on_bytes
        self.total: int | None = None
        self.allow_range = True
        self.hashing = settings.sha256_always or item.sha256 is not None
        self.base = state.name or FALLBACK_NAME  # what numbered names are made from
        self.part: _Part | None = None
        self.has_part = False  # whether NAME.part is this download's, to remove on failure
        # A caller that journals the state hears of ``done`` while NAME.part is still
        # linked to NAME: a crash before the journal has it then finds the pair on the next
        # run (``_finished_earlier``) instead of fetching the file again as NAME.1. Without
        # a journal the part goes in the same thread hop as the link.
        self.keep_part_until_done = on_state is not _ignore_state
        # The body being received: the buffer being filled, how full, the file position.
        self.buffer = bytearray()
        self.filled = 0
        self.position = 0

    async def run(self) -> ItemResult:
        if self.state.done and self.state.name is not None:
            size = await _in_thread(_settle_done, self.dest, self.state.name)
            if size is not None:
                self._report(size)
                return ItemResult(
                    self.item.url, _join(self.dest, self.state.name), size, self.item.sha256, None
                )
            self.state.done = False
        failures = 0
        while True:
            try:
                return await self._attempt()
            except _Restart:
                self.allow_range = False
            except _Retry as exc:
                failures += 1
                if failures >= self.settings.max_attempts:
                    return await self._failed(f"{exc} (gave up after {failures} attempts)")
                delay = self.settings.backoff(failures) if exc.delay is None else exc.delay
                await trio.sleep(delay)
            except _Fail as exc:
                return await self._failed(str(exc))

    async def _failed(self, message: str) -> ItemResult:
        if self.state.name is not None and self.has_part:
            await _in_thread(_unlink_quietly, _join(self.dest, _part_name(self.state.name)))
            self.has_part = False
        self._report(0)
        return ItemResult(self.item.url, None, 0, None, message)

    def _report(self, held: int) -> None:
        """Tell on_bytes that the item now holds ``held`` bytes."""
        if held != self.reported:
            delta, self.reported = held - self.reported, held
            self.on_bytes(delta, self.total)

    async def _attempt(self) -> ItemResult:
        offset = 0
        if self.allow_range and self.state.name is not None:
            size, finished = await _in_thread(_inspect_part, self.dest, self.state.name)
            if finished:
                return await self._finished_earlier()
            if size is None:
                # Named (and journalled) but never created, or gone: claim a name afresh,
                # with O_EXCL, rather than write into a NAME.part someone else may hold.
                self.state.name = None
            else:
                self.has_part = True
                # Without a validator nothing can check a resumed answer: start again.
                offset = size if self.state.validator is not None else 0
        self.allow_range = True
        headers = []
        if offset > 0:
            assert self.state.validator is not None
            headers = [("Range", f"bytes={offset}-"), ("If-Range", self.state.validator)]
        url = self.item.url
        for _ in range(self.settings.max_redirects + 1):
            try:
                async with self.client.stream(
                    "GET",
                    url,
                    headers,
                    connect_timeout=self.settings.connect_timeout,
                    read_timeout=self.settings.read_timeout,
                ) as response:
                    location = response.headers.get("location")
                    if response.status in REDIRECT_STATUSES and location:
                        url = _redirect_target(url, location)
                        await _drain(response)
                        continue
                    if 200 <= response.status < 300:
                        return await self._receive(response, offset)
                    raise _status_error(response, self.settings.max_retry_after)
            except TLSError as exc:
                raise _Fail(str(exc)) from exc
            except HTTPError as exc:
                raise _Retry(str(exc)) from exc
        raise _Fail(f"too many redirects ({self.settings.max_redirects})")

    async def _finished_earlier(self) -> ItemResult:
        """A crash came between linking NAME and removing NAME.part: finish that."""
        assert self.state.name is not None
        path = _join(self.dest, self.state.name)
        size = await _in_thread(_file_size, path)
        self._report(size or 0)
        self.state.done = True
        await self.on_state(self.state)
        await _in_thread(_unlink_quietly, _join(self.dest, _part_name(self.state.name)))
        self.has_part = False
        return ItemResult(self.item.url, str(path), size or 0, self.item.sha256, None)

    async def _receive(self, response: Response, offset: int) -> ItemResult:
        headers = response.headers
        validator = _validator(response)
        length = _content_length(response)
        start = 0
        if response.status == 206:
            content_range = _content_range(headers.get("content-range"))
            if offset > 0:
                if (
                    content_range is None
                    or content_range[0] != offset
                    or (validator is not None and validator != self.state.validator)
                ):
                    raise _Restart()
                start = offset
                validator = self.state.validator
                self.total = content_range[2]
            elif content_range is not None and content_range[0] == 0:
                self.total = content_range[2]
            else:
                raise _Fail("server answered 206 partial content to a request without range")
        else:
            self.total = length
        if self.total is None and length is not None:
            self.total = start + length
        cap = self.settings.max_file_bytes
        if cap is not None and self.total is not None and self.total > cap:
            raise _Fail(_cap_message(cap))

        self.part = None
        try:
            if self.state.name is None:
                # A fresh item: claim a name and report it before anything is written; the
                # part file is created (O_EXCL) with the first write, in the same thread
                # hop as the whole of a small file.
                self.base = self._first_candidate(response)
                self.state.name = self.base
                self.state.validator = validator
                await self.on_state(self.state)
            else:
                # Resuming, or starting again: empty or hash the part *before* a new
                # validator is reported, so it only ever holds that entity's prefix.
                self.part = await self._file_work(
                    _open_part, self.dest, self.state.name, start, self.hashing
                )
                self.has_part = True
                if validator != self.state.validator:
                    self.state.validator = validator
                    await self.on_state(self.state)
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
            return await _in_thread(work, *args)
        except OSError as exc:
            raise self._part_failure(exc) from exc

    async def _stream(self, response: Response, start: int) -> ItemResult:
        """Receive the body into pooled buffers of ``chunk_size`` bytes. The first one is
        filled before any file work, so a file that fits costs one thread hop in all;
        after that each full buffer goes to the writer while the next one fills."""
        self.position = start
        self.buffer = _BUFFERS.take(self.settings.chunk_size)
        self.filled = 0
        try:
            try:
                await self._fill(response)
                if self.filled == len(self.buffer):
                    await self._stream_large(response)
            except HTTPError:
                await self._keep()
                raise
            except trio.Cancelled:
                # Shutting down: keep what is in memory for the resume (milliseconds).
                with trio.CancelScope(shield=True), contextlib.suppress(_Fail):
                    await self._keep()
                raise
            return await self._complete()
        finally:
            _BUFFERS.give(self.buffer)

    async def _fill(self, response: Response) -> None:
        """Read into the buffer until it is full or the body ends."""
        cap = self.settings.max_file_bytes
        view = memoryview(self.buffer)
        while self.filled < len(view):
            count = await response.receive_into(view[self.filled :])
            if count == 0:
                return
            self.position += count
            if cap is not None and self.position > cap:
                raise _Fail(_cap_message(cap))
            self.filled += count
            self._report(self.position)

    async def _stream_large(self, response: Response) -> None:
        part = await self._ensure_part()
        try:
            async with _open_nursery() as nursery:
                writer = _Writer(nursery, part)
                while self.filled == len(self.buffer):
                    await writer.write(self.buffer)  # the writer owns it from here
                    self.buffer = _BUFFERS.take(self.settings.chunk_size)
                    self.filled = 0
                    await self._fill(response)
                await writer.wait()
        except OSError as exc:
            raise self._part_failure(exc) from exc

    async def _ensure_part(self) -> _Part:
        """The open part file, created under a free name if there is none yet."""
        while self.part is None:
            assert self.state.name is not None
            created = await self._file_work(
                _create_part, self.dest, self.state.name, self.base, self.hashing
            )
            if isinstance(created, _Taken):
                await self._rename(created.free)
            else:
                self.part = created
                self.has_part = True
        return self.part

    async def _keep(self) -> None:
        """Write what arrived before a connection broke, for the retry to resume after."""
        if self.filled and self.state.validator is not None:
            part = await self._ensure_part()
            await self._file_work(_write_data, part, memoryview(self.buffer)[: self.filled])

    def _part_failure(self, exc: OSError) -> _Fail:
        part = _join(self.dest, _part_name(self.state.name or FALLBACK_NAME))
        return _Fail(_file_error(exc, part))

    async def _rename(self, free: str) -> None:
        self.state.name = free
        await self.on_state(self.state)

    async def _complete(self) -> ItemResult:
        data = memoryview(self.buffer)[: self.filled]
        while True:
            assert self.state.name is not None
            try:
                outcome = await _FILES.run(
                    _finish,
                    self.part,
                    data,
                    self.dest,
                    self.state.name,
                    self.base,
                    self.item.sha256,
                    self.hashing,
                    self.keep_part_until_done,
                    sync_directory=self.dest,
                )
            except OSError as exc:
                raise _Fail(
                    _file_error(exc, _join(self.dest, _part_name(self.state.name)))
                ) from exc
            if isinstance(outcome, _Taken):
                await self._rename(outcome.free)
                continue
            break
        self.part = None  # closed by _finish
        if outcome.final is None:
            self.has_part = False  # _finish removed it
            raise _Fail(f"sha256 mismatch: expected {self.item.sha256}, got {outcome.digest}")
        part_name = _part_name(self.state.name)
        self.state.name = outcome.final
        self.state.done = True
        await self.on_state(self.state)
        if self.keep_part_until_done:
            await _in_thread(_unlink_quietly, _join(self.dest, part_name))
        self.has_part = False
        path = _join(self.dest, outcome.final)
        return ItemResult(self.item.url, str(path), self.position, outcome.digest, None)


class _Writer:
    """Appends full buffers to NAME.part and feeds them to the hasher, each in its own
    worker thread (file writes and hashlib both release the GIL), one buffer in flight at a
    time, while the event loop fills the next. A buffer goes back to the pool when both
    are done with it. Never raises into its nursery: a write error is kept and raised by
    the next ``write`` or ``wait``."""

    def __init__(self, nursery: trio.Nursery, part: _Part) -> None:
        self._nursery = nursery
        self._part = part
        self._idle = trio.Event()
        self._idle.set()
        self._running = 0
        self._error: OSError | None = None

    async def write(self, buffer: bytearray) -> None:
        """Start writing ``buffer`` (all of it) once the previous one is written."""
        await self.wait()
        view = memoryview(buffer)
        self._idle = trio.Event()
        self._running = 2
        self._nursery.start_soon(self._run, _FILES, _write_all, self._part.fd, view, buffer)
        if self._part.hasher is None:
            self._running = 1
        else:
            self._nursery.start_soon(
                self._run, _HASHES, _hash_data, self._part.hasher, view, buffer
            )
        self._part.position += len(view)

    async def wait(self) -> None:
        await self._idle.wait()
        if self._error is not None:
            raise self._error

    async def _run(
        self,
        pool: _ThreadPool,
        work: Callable[[Any, memoryview], None],
        target: Any,
        view: memoryview,
        buffer: bytearray,
    ) -> None:
        try:
            await pool.run(work, target, view)
        except OSError as exc:
            self._error = exc
        finally:
            self._running -= 1
            if self._running == 0:
                _BUFFERS.give(buffer)
                self._idle.set()


class _BufferPool:
    """Receive buffers, reused: a fresh 1 MiB bytearray costs a zero-fill and 256 page
    faults, which at 16 small files at a time was a visible share of the time."""

    def __init__(self, max_idle_bytes: int) -> None:
        self._max_idle_bytes = max_idle_bytes
        self._idle_bytes = 0
        self._free: dict[int, list[bytearray]] = {}

    def take(self, size: int) -> bytearray:
        free = self._free.get(size)
        if free:
            self._idle_bytes -= size
            return free.pop()
        return bytearray(size)

    def give(self, buffer: bytearray) -> None:
        if self._idle_bytes + len(buffer) <= self._max_idle_bytes:
            self._free.setdefault(len(buffer), []).append(buffer)
            self._idle_bytes += len(buffer)


_BUFFERS = _BufferPool(max_idle_bytes=64 << 20)


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
    status = response.status
    try:
        phrase = http.HTTPStatus(status).phrase.lower()
    except ValueError:
        phrase = response.reason.lower() or "unknown status"
    message = f"http {status} {phrase}"
    if status in RETRY_STATUSES or 500 <= status <= 599:
        delay = _retry_after(response.headers.get("retry-after"))
        return _Retry(message, None if delay is None else min(delay, max_retry_after))
    return _Fail(message)


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP-date (RFC 9110)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _validator(response: Response) -> str | None:
    """What If-Range may carry: a strong ETag, else Last-Modified (RFC 9110 13.1.5)."""
    etag = response.headers.get("etag")
    if etag is not None and not etag.startswith("W/") and etag.strip():
        return etag.strip()
    modified = response.headers.get("last-modified")
    return modified.strip() if modified and modified.strip() else None


def _content_length(response: Response) -> int | None:
    value = response.headers.get("content-length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def _content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """(first, last, total) of ``Content-Range: bytes first-last/total``; total None for *."""
    if value is None:
        return None
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if match is None:
        return None
    first, last = int(match[1]), int(match[2])
    total = None if match[3] == "*" else int(match[3])
    if last < first or (total is not None and last >= total):
        return None
    return first, last, total


def _redirect_target(url: str, location: str) -> str:
    target = urllib.parse.urljoin(url, location.strip())
    try:
        return names.validate_url(target)
    except ValueError as exc:
        raise _Fail(f"redirect to an unusable url: {exc}") from None


async def _drain(response: Response) -> None:
    length = _content_length(response)
    if length is not None and length <= _DRAIN_LIMIT:
        with contextlib.suppress(HTTPError):
            await response.read(_DRAIN_LIMIT)


def _cap_message(cap: int) -> str:
    return f"file exceeds the size cap of {cap} bytes"


def _file_error(exc: OSError, path: str) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device writing {path}"
    reason = exc.strerror or str(exc)
    return f"cannot write {path}: {reason[:1].lower()}{reason[1:]}"


def _maybe(parse: Callable[[str], str | None], response: Response, header: str) -> str | None:
    value = response.headers.get(header)
    return None if value is None else parse(value)


def _part_name(name: str) -> str:
    return name + ".part"


# --- blocking file work, always in a worker thread ---------------------------------------


class _Job:
    __slots__ = ("args", "directory", "error", "result", "task", "token", "work")

    def __init__(
        self, work: Callable[..., Any], args: tuple[Any, ...], directory: str | None
    ) -> None:
        self.work = work
        self.args = args
        self.directory = directory
        self.task = trio.lowlevel.current_task()
        self.token = trio.lowlevel.current_trio_token()
        self.result: Any = None
        self.error: BaseException | None = None


class _ThreadPool:
    """Long-lived worker threads fed from one queue, for blocking file work.

    A worker takes every job waiting (up to ``max_batch``), runs them, fsyncs once each
    directory that the batch's jobs asked for (a group commit of their renames), and wakes
    the event loop once for the whole batch. With 16 small downloads at a time this ran
    2.3x the files/s of one ``trio.to_thread.run_sync`` per job on the benchmark machine
    (docs/bench-downloads.md): the per-call thread hand-off and wake-up cost as much as the
    HTTP exchange itself. Like ``to_thread.run_sync``, a job is never abandoned: a cancelled
    caller waits for its job to finish (milliseconds), so no file is left half-handled.
    """

    def __init__(self, name: str, threads: int, max_batch: int) -> None:
        self._name = name
        self._threads = threads
        self._max_batch = max_batch
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._started = False
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._after_fork)

    async def run(
        self, work: Callable[..., _T], *args: Any, sync_directory: str | None = None
    ) -> _T:
        """``work(*args)`` in a worker thread; with ``sync_directory``, the directory is
        fsynced after the job and before the result is returned."""
        self._start()
        job = _Job(work, args, sync_directory)
        self._jobs.put(job)
        await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        error, job.error = job.error, None
        if error is not None:
            raise error
        result: _T = job.result
        return result

    def _start(self) -> None:
        if self._started:
            return
        with self._lock:
            if not self._started:
                for n in range(self._threads):
                    thread = threading.Thread(
                        target=self._work, name=f"statusd-{self._name}-{n}", daemon=True
                    )
                    thread.start()
                self._started = True

    def _work(self) -> None:
        while True:
            jobs = [self._jobs.get()]
            with contextlib.suppress(queue.Empty):
                while len(jobs) < self._max_batch:
                    jobs.append(self._jobs.get_nowait())
            for job in jobs:
                try:
                    job.result = job.work(*job.args)
                except BaseException as exc:
                    job.error = exc
            self._sync_directories(jobs)
            by_token: dict[trio.lowlevel.TrioToken, list[_Job]] = {}
            for job in jobs:
                by_token.setdefault(job.token, []).append(job)
            for token, done in by_token.items():
                # A run that ended (a crash elsewhere) has nobody left to wake; the
                # worker must live on for the next one.
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(_wake, done)

    def _after_fork(self) -> None:
        """A forked child has none of the parent's threads: start afresh on first use."""
        self._jobs = queue.SimpleQueue()
        self._started = False
        self._lock = threading.Lock()

    @staticmethod
    def _sync_directories(jobs: list[_Job]) -> None:
        directories = {job.directory for job in jobs if job.directory and job.error is None}
        for directory in directories:
            try:
                _fsync_directory(directory)
            except OSError as exc:
                for job in jobs:
                    if job.directory == directory and job.error is None:
                        job.error = exc


def _wake(jobs: list[_Job]) -> None:
    for job in jobs:
        trio.lowlevel.reschedule(job.task)


# File creation, small files and renames; batched, with directory fsyncs shared.
_FILES = _ThreadPool("files", threads=4, max_batch=64)
# Hashing runs beside the writes of the same data, so it gets threads of its own.
_HASHES = _ThreadPool("hash", threads=2, max_batch=1)


async def _in_thread(work: Callable[..., _T], *args: Any) -> _T:
    return await _FILES.run(work, *args)


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def _inspect_part(dest: str, name: str) -> tuple[int | None, bool]:
    """(size of NAME.part or None if there is none, whether it is already linked as NAME)."""
    try:
        info = os.lstat(_join(dest, _part_name(name)))
    except FileNotFoundError:
        return None, False
    try:
        final = os.lstat(_join(dest, name))
    except FileNotFoundError:
        return info.st_size, False
    return info.st_size, (final.st_ino, final.st_dev) == (info.st_ino, info.st_dev)


def _open_part(dest: str, name: str, start: int, hashing: bool) -> _Part:
    """Open the existing (or a new) NAME.part for writing at ``start``: emptied when 0,
    else (when ``hashing``) hashed up to ``start``."""
    fd = _open_in(dest, _part_name(name), _CREATE)
    try:
        hasher = hashlib.sha256() if hashing else None
        if start == 0:
            os.ftruncate(fd, 0)
        else:
            if hasher is not None:
                _hash_prefix(_join(dest, _part_name(name)), start, hasher)
            os.ftruncate(fd, start)
            os.lseek(fd, start, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return _Part(fd, hasher, start)


def _create_part(dest: str, name: str, base: str, hashing: bool) -> _Part | _Taken:
    """Create NAME.part, unless NAME or NAME.part is taken: then say which name is free."""
    if not os.path.lexists(_join(dest, name)):
        try:
            fd = _open_in(dest, _part_name(name), _CREATE | os.O_EXCL)
        except FileExistsError:
            pass
        else:
            return _Part(fd, hashlib.sha256() if hashing else None, 0)
    return _Taken(_next_free(dest, base))


def _open_in(dest: str, name: str, flags: int) -> int:
    """Open ``dest/name``, creating ``dest`` first if it is missing."""
    try:
        return os.open(_join(dest, name), flags, 0o644)
    except FileNotFoundError:
        os.makedirs(dest, exist_ok=True)
        return os.open(_join(dest, name), flags, 0o644)


def _next_free(dest: str, base: str) -> str:
    for n in range(1, MAX_NUMBERED):
        name = names.numbered(base, n, max_bytes=NAME_BYTES)
        if not os.path.lexists(_join(dest, name)) and not os.path.lexists(
            _join(dest, _part_name(name))
        ):
            return name
    raise FileExistsError(errno.EEXIST, f"no free name for {base}", dest)


def _hash_prefix(path: str, length: int, hasher: Any) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        remaining = length
        while remaining > 0:
            block = os.read(fd, min(_HASH_BLOCK, remaining))
            if not block:
                raise OSError(errno.EIO, "partial file shorter than expected", path)
            hasher.update(block)
            remaining -= len(block)
    finally:
        os.close(fd)


def _write_data(part: _Part, data: memoryview) -> None:
    if part.hasher is not None:
        part.hasher.update(data)
    _write_all(part.fd, data)
    part.position += len(data)


def _hash_data(hasher: Any, data: memoryview) -> None:
    if hasher is not None:
        hasher.update(data)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _finish(
    part: _Part | None,
    data: memoryview,
    dest: str,
    name: str,
    base: str,
    sha256: str | None,
    hashing: bool,
    keep_part: bool,
) -> _Finished | _Taken:
    """Write the last batch (creating NAME.part first if there is none), fsync, check the
    digest, link NAME.part to a free final name and (unless ``keep_part``) remove
    NAME.part. The pool fsyncs the directory before anyone hears of it. A NAME.part
    created here is removed again on failure."""
    created = part is None
    if part is None:
        new = _create_part(dest, name, base, hashing)
        if isinstance(new, _Taken):
            return new
        part = new
    part_path = _join(dest, _part_name(name))
    try:
        try:
            _write_data(part, data)
            os.fdatasync(part.fd)  # the data and its size; mtime alone is not worth a flush
        finally:
            part.close()
        digest: str | None = None if part.hasher is None else part.hasher.hexdigest()
        if sha256 is not None and digest != sha256:
            _unlink_quietly(part_path)
            return _Finished(None, digest)
        final = _link_free(part_path, dest, name, base)
    except OSError:
        if created:
            _unlink_quietly(part_path)
        raise
    if not keep_part:
        os.unlink(part_path)
    return _Finished(final, digest)


def _link_free(part_path: str, dest: str, name: str, base: str) -> str:
    """Hard-link the part as NAME, or BASE.1.ext, ...: ``link`` never replaces a file."""
    for n in range(MAX_NUMBERED):
        final = name if n == 0 else names.numbered(base, n, max_bytes=NAME_BYTES)
        try:
            os.link(part_path, _join(dest, final), follow_symlinks=False)
        except FileExistsError:
            continue
        return final
    raise FileExistsError(errno.EEXIST, f"no free name for {name}", dest)


def _join(dest: str, name: str) -> str:
    # Plain strings, not pathlib: Path objects cost more than the syscalls they name.
    return f"{dest}/{name}"


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _settle_done(dest: str, name: str) -> int | None:
    """The size of finished NAME (None if it is gone), removing a NAME.part still linked
    to it (a crash after the journal had ``done`` and before the part was removed)."""
    try:
        final = os.lstat(_join(dest, name))
    except FileNotFoundError:
        return None
    part_path = _join(dest, _part_name(name))
    with contextlib.suppress(FileNotFoundError):
        part = os.lstat(part_path)
        if (part.st_ino, part.st_dev) == (final.st_ino, final.st_dev):
            os.unlink(part_path)
    return final.st_size


def _unlink_quietly(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _file_size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None
