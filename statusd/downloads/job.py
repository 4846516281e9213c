"""Download tasks: ``tasks.download`` params in, a task's spec and its job out.

``Downloads`` checks the params and plans a task (``prepare``: the spec only, so a queue of
large tasks holds no jobs), and builds the task's ``DownloadJob`` (``job``) when the task
manager starts it as the task's body. The job opens
``dest`` when it runs, not when the request arrived (``files.open_dest``: no component may
be a symlink, so a directory swapped for a symlink in between fails the task and nothing
is written outside), keeps that directory fd for its life, and fetches its items in
batches of ``batch_size`` ("Processing batch i of n"), a few items at a time, with the
engine (``engine.py``). Each item's part file is owned by the task and the item
(``<task_id>-<index>``). Every item's result, and a large item's state (its name, part
and validator) before its first write, is checkpointed in the task journal, so after a
restart finished items are not fetched again and partial files resume; the parts that no
checkpoint names (a small file's, when a crash came while it was finished) are found by
that owner in their names (``_claim_strays``).

The spec journals ``dest`` relative to the download directory (``"."`` for the directory
itself); an admin's dest outside it is journalled as an absolute path and opened from
``/`` the same way, one component at a time. A spec from an older journal with an
absolute dest inside the download directory is read as the relative one.

Whose files: a caller whose uid is neither the daemon's nor root's has a directory of
their own, ``<download_dir>/<user>`` (the spec's ``home``), where a relative ``dest`` goes
and out of which a non-admin's may not lead; the task's files are readable by that uid
(the spec's ``reader_uid``) and by no other non-admin (``files.open_home_dest``, ``acl.py``).
Both are journalled with the spec, so a task resumed after a restart writes into the same
directory with the same ACL.
"""

from __future__ import annotations

import functools
import logging
import math
import netrc
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from statusd.config import Config, DownloadsConfig, LimitsConfig
from statusd.downloads import auth, files
from statusd.downloads.engine import (
    DownloadItem,
    DownloadSettings,
    ItemResult,
    ItemState,
    Retrying,
    download_item,
    make_client,
    remove_partial,
)
from statusd.downloads.files import DestError, Directory, Reserve, in_thread
from statusd.downloads.http import HTTPClient
from statusd.downloads.names import safe_filename
from statusd.downloads.throttle import RateLimit
from statusd.errors import Busy, Forbidden, InvalidParams
from statusd.identity import Caller
from statusd.protocol.codec import converter, unstructure
from statusd.proxy import ProxyEnvironment, ProxyRules, proxy_rules
from statusd.redact import hide_credentials, redact_url
from statusd.state.status import Level
from statusd.tasks import JobFailed, Reporter

if TYPE_CHECKING:
    from statusd.api import DownloadParams

DEFAULT_LIMITS = LimitsConfig()
log = logging.getLogger(__name__)


class Downloads:
    """Plans download tasks and builds their jobs; owns the shared HTTP client."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self.settings = _settings(config.downloads)
        self._settings_elsewhere = _elsewhere(self.settings)
        self.proxies = _proxies(config)
        self._client: HTTPClient | None = None
        self._daemon_uid = os.getuid()
        # downloads.max_rate, over every item of every task.
        self.max_rate = RateLimit(config.downloads.max_rate)
        # Each job's own limit, while the job exists, for tasks.set_rate to change live.
        self._task_rates: weakref.WeakValueDictionary[str, RateLimit] = (
            weakref.WeakValueDictionary()
        )

    def configure(
        self, downloads: DownloadsConfig, proxy_environment: ProxyEnvironment | None = None
    ) -> None:
        """New ``[downloads]`` settings and proxy variables (SIGHUP): items that start from
        now on use them; ``parallel_items`` applies to tasks that start from now on,
        ``batch_size`` to tasks created from now on, ``max_response_head_bytes`` to
        connections opened from now on."""
        environment = proxy_environment or self._config.proxy_environment
        self._config = attrs.evolve(
            self._config, downloads=downloads, proxy_environment=environment
        )
        self.settings = _settings(downloads)
        self._settings_elsewhere = _elsewhere(self.settings)
        self.proxies = _proxies(self._config)
        self.max_rate.configure(downloads.max_rate)
        if self._client is not None:
            self._client.proxies = self.proxies
            # Read as each connection opens: a kept-alive one keeps the limit it had.
            self._client.max_header_bytes = downloads.max_response_head_bytes
            self._client.max_per_host = downloads.max_per_host

    def item_settings(self, beside_journals: bool) -> DownloadSettings:
        """The settings for an item whose dest is (``beside_journals``) or is not on the
        state directory's file system: the free-space reserve only guards the journals."""
        return self.settings if beside_journals else self._settings_elsewhere

    def beside_journals(self, directory: Directory) -> bool:
        """Whether ``directory`` is on the file system of the state directory (blocking);
        when that cannot be told, it is taken to be, so the reserve holds."""
        try:
            return os.fstat(directory.fd).st_dev == os.stat(self._config.state_dir).st_dev
        except OSError:
            return True

    @property
    def client(self) -> HTTPClient:
        if self._client is None:
            head = self._config.downloads.max_response_head_bytes
            self._client = make_client(self.settings, max_header_bytes=head)
            self._client.proxies = self.proxies
            self._client.max_per_host = self._config.downloads.max_per_host
        return self._client

    async def aclose(self) -> None:
        """Close idle keep-alive connections (daemon shutdown)."""
        if self._client is not None:
            client, self._client = self._client, None
            with trio.CancelScope(shield=True):
                await client.aclose()

    def prepare(
        self,
        params: DownloadParams,
        caller: Caller,
        *,
        max_items: int,
        max_headers: int = DEFAULT_LIMITS.max_item_headers,
        max_header_bytes: int = DEFAULT_LIMITS.max_item_header_bytes,
    ) -> tuple[str, int, dict[str, Any]]:
        """(task name, item count, spec) of a download task; raises ``InvalidParams``,
        ``Forbidden``, or ``Busy`` for more than ``max_items`` items or an item with more
        than ``max_headers`` headers or ``max_header_bytes`` of them (its own and the
        task's together). Builds no job."""
        if (params.urls is None) == (params.items is None):
            raise InvalidParams("urls", "give either urls or items, not both or neither")
        # Entries as journalled (see ``spec_entry``): a queued task holds its spec until
        # it starts, 100 tasks of 10,000 items of one user's included.
        raw: list[str | dict[str, Any]]
        field: str
        if params.urls is not None:
            raw = list(params.urls)
            field = "urls"
        else:
            assert params.items is not None
            raw = [spec_entry(unstructure(item)) for item in params.items]
            field = "items"
        if not raw:
            raise InvalidParams(field, "must not be empty")
        if len(raw) > max_items:
            raise Busy(
                f"{field} has {len(raw)} entries, more than a task may have "
                f"(limits.max_items_per_task = {max_items}); split it into several tasks",
                {"limit": max_items, "key": "limits.max_items_per_task", "field": field},
            )
        try:
            task_headers = auth.check_headers(params.headers or {})
        except ValueError as exc:
            raise InvalidParams("headers", str(exc)) from None
        for index, entry in enumerate(raw):
            where = f"urls[{index}]" if field == "urls" else f"items[{index}].url"
            try:
                # Checks the url (names.validate_url), the digest and the headers.
                item = DownloadItem(url=entry) if isinstance(entry, str) else DownloadItem(**entry)
            except ValueError as exc:
                # Each check's message starts with the name of the field it is about.
                first = str(exc).split(" ", 1)[0]
                if first in ("sha256", "checksum"):
                    path = f"items[{index}].{first}"
                elif first.startswith("header"):
                    path = f"items[{index}].headers"
                else:
                    path = where
                raise InvalidParams(path, str(exc)) from None
            if task_headers or item.headers:
                headers = auth.merged(task_headers, item.headers)
                at = "headers" if field == "urls" else f"items[{index}].headers"
                _check_header_limits(headers, at, max_headers, max_header_bytes)
        # 0 is a value to refuse, not "not given".
        batch_size = (
            self._config.downloads.batch_size if params.batch_size is None else params.batch_size
        )
        if not 1 <= batch_size <= 1000:
            raise InvalidParams("batch_size", f"must be from 1 to 1000, not {batch_size}")
        reader = self._reader(caller)
        home = "." if reader is None else home_name(caller)
        dest = self._dest(params.dest, caller, home)
        one = hide_credentials(entry_url(raw[0]))
        name = params.name or (one if len(raw) == 1 else f"Download {len(raw)} files")
        spec: dict[str, Any] = {"items": raw, "dest": dest, "batch_size": batch_size}
        if reader is not None:
            spec |= {"reader_uid": reader, "home": home}
        if params.headers:
            spec["headers"] = dict(params.headers)
        if caller.uid == self._daemon_uid:
            # The daemon's own netrc logs in for its own user's tasks, nobody else's.
            spec["netrc"] = True
        return name, len(raw), spec

    def _reader(self, caller: Caller) -> int | None:
        """The uid a task's files are made readable for: None for the daemon's own user
        and root, who read them anyway, and whose files stay in the download directory."""
        return None if caller.uid in (0, self._daemon_uid) else caller.uid

    def _dest(self, dest: str | None, caller: Caller, home: str) -> str:
        """``dest`` as journalled: relative to the download directory, or absolute when an
        admin names a directory outside it. A relative one is under the caller's ``home``;
        a non-admin's must stay inside it. Checked here against symlinks as they are now;
        the job opens it again without following any when it runs."""
        root = self.root
        own = root / home
        if dest is None:
            return home
        if "\0" in dest:
            raise InvalidParams("dest", "must not contain NUL")
        path = Path(os.path.realpath(own / dest))
        if path.is_relative_to(own) or (caller.admin and path.is_relative_to(root)):
            return str(path.relative_to(root))
        if not caller.admin:
            raise Forbidden(
                f"dest must be inside your download directory {own}",
                {"field": "dest", "download_dir": str(own)},
            )
        return str(path)

    @property
    def root(self) -> Path:
        """The download directory, resolved (it may be a symlink in the configuration)."""
        return Path(os.path.realpath(self._config.download_dir))

    @property
    def parallel_items(self) -> int:
        return self._config.downloads.parallel_items

    def job(
        self,
        task_id: str,
        spec: dict[str, Any],
        checkpoints: list[dict[str, Any]],
        rate_limit: int = 0,
    ) -> DownloadJob:
        """The task's job, its items held to ``rate_limit`` bytes a second together (0:
        none) beneath ``downloads.max_rate``; ``set_rate_limit`` changes it while the job
        lives."""
        limit = self._task_rates[task_id] = RateLimit(rate_limit)
        return DownloadJob(self, task_id, spec, checkpoints, limits=(limit, self.max_rate))

    def set_rate_limit(self, task_id: str, rate: int) -> None:
        """A task's new ``rate_limit``, for its job if one exists now (a job built later
        takes it from the task)."""
        limit = self._task_rates.get(task_id)
        if limit is not None:
            limit.configure(rate)


def spec_entry(entry: dict[str, Any]) -> str | dict[str, Any]:
    """An item as a spec keeps it: its url alone when it has nothing else (a string costs
    a third of a one-key dict: 200 bytes an item less), else the fields it gives (what it
    leaves None is the default). Journals written before keep dicts, read as ever."""
    given = {name: value for name, value in entry.items() if value is not None}
    return str(given["url"]) if given.keys() == {"url"} else given


def entry_url(entry: str | dict[str, Any]) -> str:
    return entry if isinstance(entry, str) else str(entry["url"])


def _check_header_limits(
    headers: tuple[auth.Header, ...], field: str, most: int, most_bytes: int
) -> None:
    if len(headers) > most:
        raise Busy(
            f"{field}: an item may have at most {most} request headers, its own and the "
            f"task's together (limits.max_item_headers), not {len(headers)}",
            {"limit": most, "key": "limits.max_item_headers", "field": field},
        )
    size = auth.header_bytes(headers)
    if size > most_bytes:
        raise Busy(
            f"{field}: an item's request headers may take at most {most_bytes} bytes, its "
            f"own and the task's together (limits.max_item_header_bytes), not {size}",
            {"limit": most_bytes, "key": "limits.max_item_header_bytes", "field": field},
        )


def home_name(caller: Caller) -> str:
    """The caller's directory below the download directory: their user name, or their
    uid where the name would not be one plain directory name."""
    name = caller.username
    if safe_filename(name) == name and not name.startswith("."):
        return name
    return str(caller.uid)


def _settings(downloads: DownloadsConfig) -> DownloadSettings:
    return DownloadSettings(
        max_attempts=downloads.max_attempts,
        max_redirects=downloads.max_redirects,
        connect_timeout=downloads.connect_timeout,
        read_timeout=downloads.read_timeout,
        max_file_bytes=downloads.max_file_bytes or None,
        lowest_speed=downloads.lowest_speed,
        stall_timeout=downloads.stall_timeout,
        # One for all tasks: they write to the same file system.
        reserve=Reserve(downloads.min_free_bytes) if downloads.min_free_bytes else None,
    )


def _proxies(config: Config) -> ProxyRules:
    downloads = config.downloads
    return proxy_rules(downloads.proxy, downloads.no_proxy, config.proxy_environment)


def _elsewhere(settings: DownloadSettings) -> DownloadSettings:
    return attrs.evolve(settings, reserve=None)


@attrs.define
class DownloadJob:
    """The body of one download task (the task manager's ``Job``)."""

    service: Downloads
    task_id: str
    spec: dict[str, Any]
    checkpoints: list[dict[str, Any]]
    # The task's own speed limit and the daemon's: every item reads under both.
    limits: tuple[RateLimit, ...] = ()
    items: list[DownloadItem] = attrs.field(init=False)
    states: list[ItemState] = attrs.field(init=False)
    results: list[ItemResult | None] = attrs.field(init=False)
    # Each item's size as its server announced it (or as it ended); None while unknown.
    sizes: list[int | None] = attrs.field(init=False)
    held: list[int] = attrs.field(init=False)  # bytes each item holds now (on_bytes)
    # Items journalled as done while their part was still linked to the finished file: the part
    # is removed right after, and a later record says so ("settled"); a restart removes
    # the parts of those the journal does not know as settled.
    unsettled: set[int] = attrs.field(init=False)
    _settled: list[int] = attrs.field(init=False)  # settled, not yet journalled as such
    _journalled: dict[int, ItemResult] = attrs.field(init=False)  # results sent with "done"
    # Items resumed from a part whose first byte report is still to come (_on_bytes).
    _resuming: set[int] = attrs.field(init=False, factory=set)
    # Whether dest shares the state directory's file system (its reserve applies).
    _beside_journals: bool = attrs.field(init=False, default=True)
    # Running tallies of ``results`` and ``sizes``: recounting them per finished item made
    # a 2,000-item task quadratic (6-11% of the loop's work in the many-file profile).
    _processed: int = attrs.field(init=False, default=0)
    _unknown_sizes: int = attrs.field(init=False, default=0)
    _known_bytes: int = attrs.field(init=False, default=0)
    # The daemon user's netrc, read when the task starts, for that user's own tasks only.
    _netrc: netrc.netrc | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        task_headers = auth.check_headers(self.spec.get("headers") or {})
        self.items = [
            DownloadItem.accepted({"url": entry} if isinstance(entry, str) else entry, task_headers)
            for entry in self.spec["items"]
        ]
        self.states = [ItemState() for _ in self.items]
        self.results = [None] * len(self.items)
        self.sizes = [None] * len(self.items)
        self._unknown_sizes = len(self.items)
        self.held = [0] * len(self.items)
        self.unsettled = set()
        self._settled = []
        self._journalled = {}
        for checkpoint in self.checkpoints:
            if checkpoint.get("retry"):
                self._forget_failures()
                continue
            if "completed" in checkpoint:
                self._restore_completed(checkpoint["completed"])
                continue
            if "kept" in checkpoint:
                for index, state in checkpoint["kept"]:
                    self.states[index] = converter.structure(state, ItemState)
                continue
            self.unsettled.difference_update(checkpoint.get("settled", ()))
            index = checkpoint["item"]
            if checkpoint.get("settle"):
                self.unsettled.add(index)
            if "state" in checkpoint:
                self.states[index] = converter.structure(checkpoint["state"], ItemState)
            if checkpoint.get("result") is not None:
                result = converter.structure(checkpoint["result"], ItemResult)
                self._set_result(index, result)
                self._record_size(index, result.bytes)

    @property
    def dest(self) -> str:
        """``dest`` relative to the download directory, or absolute (outside it)."""
        dest = str(self.spec["dest"])
        root = self.service.root
        if os.path.isabs(dest) and Path(dest).is_relative_to(root):
            return str(Path(dest).relative_to(root))  # a spec from an older journal
        return dest

    async def _open_dest(self, *, create: bool) -> Directory:
        reader: int | None = self.spec.get("reader_uid")
        home: str | None = self.spec.get("home")
        dest, root = self.dest, self.service.root
        if reader is not None and home is not None and (dest + "/").startswith(home + "/"):
            return await trio.to_thread.run_sync(
                lambda: files.open_home_dest(root, home, dest, reader, create=create)
            )
        return await trio.to_thread.run_sync(
            lambda: files.open_dest(root, dest, create=create, reader=reader)
        )

    async def run(self, reporter: Reporter) -> dict[str, Any] | None:
        try:
            directory = await self._open_dest(create=True)
        except (DestError, OSError) as exc:
            where = str(self.service.root / self.dest)
            message = str(exc) if isinstance(exc, DestError) else files.file_error(exc, where)
            reporter.status(Level.ERROR, f"Cannot open the destination: {message}")
            raise JobFailed(message) from None
        try:
            self._beside_journals = await in_thread(self.service.beside_journals, directory)
            if self.spec.get("netrc"):
                await self._read_netrc(reporter)
            return await self._run(reporter, directory)
        finally:
            directory.close()

    async def _run(self, reporter: Reporter, directory: Directory) -> dict[str, Any] | None:
        reporter.status(Level.INFO, "Starting download operations...")
        size = self.spec["batch_size"]
        count = len(self.items)
        batches = math.ceil(count / size)
        parallel = self.service.parallel_items
        for index in sorted(self.unsettled):
            await remove_partial(directory, self.states[index])
        await self._claim_strays(directory)
        # After a restart, count the finished items again; unfinished ones report what
        # they hold on disk as they resume.
        reporter.set_bytes_done(sum(result.bytes for result in self.results if result))
        reporter.update_progress(self._processed)
        for batch in range(batches):
            indices = [
                i
                for i in range(batch * size, min(count, (batch + 1) * size))
                if self.results[i] is None
            ]
            if not indices:
                continue
            reporter.status(Level.INFO, f"Processing batch {batch + 1} of {batches}")
            # ``parallel`` workers take the batch's items in order: a task per item, parked
            # on a limiter, cost a batch of 1,000 more in scheduling than it saved.
            pending = iter(indices)
            async with trio.open_nursery() as nursery:
                for _ in range(min(parallel, len(indices))):
                    nursery.start_soon(self._fetch_each, pending, directory, reporter)
            reporter.batch_update(batch + 1, batches)
        result = self._result()
        if result["failed"]:
            raise JobFailed(f"{result['failed']} of {count} items failed", result)
        reporter.status(Level.SUCCESS, "All downloads completed successfully")
        return result

    async def _claim_strays(self, directory: Directory) -> None:
        """Parts of items the journal knows nothing of (a crash while a small file was
        finished, before its "done" was journalled): one linked to a finished file makes
        its item a resume that finishes without fetching it again; the others hold
        nothing a resume could use and go."""
        unknown = {
            index
            for index, (state, result) in enumerate(zip(self.states, self.results, strict=True))
            if result is None and state.part is None
        }
        if unknown:
            linked = await in_thread(
                functools.partial(_sweep_strays, keep_linked=True),
                directory,
                self.task_id,
                unknown,
            )
            for index, (part, final) in linked.items():
                self.states[index] = ItemState(name=final, part=part)

    async def _read_netrc(self, reporter: Reporter) -> None:
        try:
            self._netrc = await in_thread(auth.read_netrc)
        except (netrc.NetrcParseError, OSError) as exc:
            # Not the parser's message: it may quote a token of the file, a password too.
            line = getattr(exc, "lineno", None)
            where = f" (line {line})" if line else ""
            reporter.status(
                Level.WARNING,
                f"Not using ~/.netrc{where}: it does not parse, cannot be read, or others "
                "may read it",
            )

    def _with_netrc(self, item: DownloadItem) -> DownloadItem:
        """``item`` with the netrc's credentials for its host, unless it logs in itself."""
        if self._netrc is None or auth.has_userinfo(item.url):
            return item
        if any(name.lower() == "authorization" for name, _ in item.headers):
            return item
        authorization = auth.netrc_authorization(self._netrc, item.url)
        if authorization is None:
            return item
        return attrs.evolve(item, headers=(*item.headers, ("Authorization", authorization)))

    def shown_url(self, index: int) -> str:
        """The item's URL as its owner sees it (``tasks.get``): credentials as ``***``."""
        return hide_credentials(self.items[index].url)

    def _set_result(self, index: int, result: ItemResult | None) -> None:
        self._processed += (result is not None) - (self.results[index] is not None)
        self.results[index] = result

    def _record_size(self, index: int, size: int | None) -> None:
        old = self.sizes[index]
        self._unknown_sizes += (size is None) - (old is None)
        self._known_bytes += (size or 0) - (old or 0)
        self.sizes[index] = size

    async def _fetch_each(
        self, pending: Iterator[int], directory: Directory, reporter: Reporter
    ) -> None:
        for index in pending:
            await self._fetch(index, directory, reporter)

    async def _fetch(self, index: int, directory: Directory, reporter: Reporter) -> None:
        item = self._with_netrc(self.items[index])
        shown = self.shown_url(index)
        reporter.update_progress(self._processed, shown)

        async def on_state(state: ItemState) -> None:
            # The engine writes nothing under a name, part or validator before this
            # returns, so the journal always knows every part file the task owns.
            record: dict[str, Any] = {"item": index, "state": unstructure(state)}
            if state.done:
                # The result goes with "done": one journal write fewer per item.
                result = self._journalled[index] = self._done_result(index, directory, state)
                record |= {"result": unstructure(result), "settle": True}
            await self._checkpoint(reporter, record)

        if self.states[index].part is not None or self.states[index].done:
            # Its first report is what its part (or file) held already, not news from the
            # network: it must not show as speed.
            self._resuming.add(index)
        result = await download_item(
            self.service.client,
            item,
            directory,
            self.service.item_settings(self._beside_journals),
            self.states[index],
            owner=f"{self.task_id}-{index}",
            on_bytes=lambda delta, total: self._on_bytes(reporter, index, delta, total),
            on_state=on_state,
            on_retry=lambda retrying: self._on_retry(reporter, index, retrying),
            limits=self.limits,
        )
        if result.url != shown:
            result = attrs.evolve(result, url=shown)
        self._resuming.discard(index)
        self._set_result(index, result)
        self._set_size(reporter, index, result.bytes)
        if self._journalled.pop(index, None) == result:
            self._settled.append(index)  # journalled with the next record
        else:
            state = unstructure(self.states[index])
            await self._checkpoint(
                reporter, {"item": index, "state": state, "result": unstructure(result)}
            )
        if result.error:
            self._on_failure(reporter, index, result.error)
        reporter.update_progress(self._processed)

    def _on_retry(self, reporter: Reporter, index: int, retrying: Retrying) -> None:
        url = redact_url(self.items[index].url)
        log.info("task %s: %s: %s", self.task_id, url, retrying.message)
        reporter.status(Level.WARNING, f"{url}: {retrying.message}")
        retry = {
            "index": index,
            "url": url,
            "attempt": retrying.attempt,
            "max_attempts": retrying.attempts,
            "delay_s": retrying.delay,
            "reason": retrying.reason,
            "counted": retrying.counted,
        }
        reporter.announce(f"{url}: {retrying.message}", item_retry=retry)

    def _on_failure(self, reporter: Reporter, index: int, error: str) -> None:
        url = redact_url(self.items[index].url)
        log.info("task %s: %s failed: %s", self.task_id, url, error)
        reporter.status(Level.ERROR, f"Failed to download file: {url}: {error}")
        failed = {"index": index, "url": url, "error": error}
        reporter.announce(f"{url}: failed: {error}", item_failed=failed)

    def _done_result(self, index: int, directory: Directory, state: ItemState) -> ItemResult:
        """What ``download_item`` returns for an item that reports ``done`` (the engine
        has checked the item's sha256, if any, before it does)."""
        item = self.items[index]
        path = directory.join(state.name or "")
        return ItemResult(self.shown_url(index), path, self.held[index], item.sha256, None)

    async def _checkpoint(self, reporter: Reporter, record: dict[str, Any]) -> None:
        if self._settled:
            record["settled"], self._settled = self._settled, []
        await reporter.checkpoint(record)

    def _on_bytes(self, reporter: Reporter, index: int, delta: int, total: int | None) -> None:
        if total is not None and self.sizes[index] != total:
            self._set_size(reporter, index, total)
        self.held[index] += delta
        received = index not in self._resuming
        self._resuming.discard(index)
        reporter.add_bytes(delta, received=received)

    def _set_size(self, reporter: Reporter, index: int, size: int) -> None:
        """bytes_total is known once every item's size is (a single file: at its head)."""
        self._record_size(index, size)
        if not self._unknown_sizes:
            reporter.set_bytes_total(self._known_bytes)

    def _result(self) -> dict[str, Any]:
        items = [
            unstructure(result)
            if result is not None
            else {"url": self.shown_url(index), "error": "not run"}
            for index, result in enumerate(self.results)
        ]
        failed = sum(1 for entry in items if entry.get("error"))
        return {"items": items, "completed": len(items) - failed, "failed": failed}

    async def discard(self) -> None:
        """Remove the part files of the items that did not finish, failed ones' kept parts
        included (a user's cancel; a failed task cleaned up). Only the task's own parts
        go; a dest that can no longer be opened safely is left as it is."""
        unfinished = [
            (index, state)
            for index, (state, result) in enumerate(zip(self.states, self.results, strict=True))
            if (result is None or result.error) and not state.done
        ]
        if not unfinished:
            return
        try:
            directory = await self._open_dest(create=False)
        except (DestError, OSError):
            return
        try:
            for index, state in unfinished:
                if state.part is not None:
                    await remove_partial(directory, state)
                    self.states[index] = ItemState()  # nothing left for a retry to resume
            # And those the journal never heard of (see ``_claim_strays``).
            unknown = {index for index, state in unfinished if state.part is None}
            await in_thread(
                functools.partial(_sweep_strays, keep_linked=False),
                directory,
                self.task_id,
                unknown,
            )
        finally:
            directory.close()

    def _forget_failures(self) -> None:
        """A retry: failed items are fetched again (their states are kept for the resume)."""
        for index, result in enumerate(self.results):
            if result is not None and result.error:
                self._set_result(index, None)
                self._record_size(index, None)

    def checkpoints_to_keep(self) -> list[dict[str, Any]]:
        """What a retry needs once the task has failed or was cancelled: which items
        completed, where and how big, as one checkpoint of ``[index, path, bytes, sha256]``
        rows (a 10,000-item task's per-item states and results took about 5 MB), and the
        state of each unfinished item that keeps a part to resume (a failed one's, or one
        whose part a cancel could not remove), as ``[index, state]`` rows; the others
        start afresh."""
        rows = [
            [index, result.path, result.bytes, result.sha256]
            for index, result in enumerate(self.results)
            if result is not None and not result.error
        ]
        kept = [
            [index, unstructure(state)]
            for index, (state, result) in enumerate(zip(self.states, self.results, strict=True))
            if (result is None or result.error) and state.part is not None and not state.done
        ]
        keep: list[dict[str, Any]] = []
        if rows:
            keep.append({"completed": rows})
        if kept:
            keep.append({"kept": kept})
        return keep

    def _restore_completed(self, rows: list[list[Any]]) -> None:
        for index, path, size, sha256 in rows:
            result = ItemResult(self.shown_url(index), path, size, sha256, None)
            self._set_result(index, result)
            self._record_size(index, size)
            name = None if path is None else os.path.basename(path)
            self.states[index] = ItemState(name=name, done=True)


def _sweep_strays(
    directory: Directory, task_id: str, unknown: set[int], *, keep_linked: bool
) -> dict[int, tuple[str, str]]:
    """Of the task's parts for items in ``unknown``: those linked to a finished file, as
    (part, final name) by index, kept if ``keep_linked``; the other regular files of
    ours are removed, anything else is left alone (blocking)."""
    linked: dict[int, tuple[str, str]] = {}
    for index, part in files.own_parts(directory, task_id).items():
        if index not in unknown:
            continue
        found = files.inspect_part(directory, part)
        if found.final is not None and keep_linked:
            linked[index] = (part, found.final)
        elif found.size is not None:
            files.unlink_quietly(directory, part)
    return linked
