"""The daemon's nursery tree, readiness and shutdown order.

``run(config, task_status=...)`` locks the state directory (one daemon each), builds the
core (status channel, API), starts the Unix socket server and reports readiness only once
the socket accepts connections. It returns after an orderly stop: publish "Stopping
operations...", stop accepting and remove the socket file, give clients
``SHUTDOWN_GRACE`` seconds to receive what is queued, cancel.
``serve(config, reload)`` is the command's entry: signals in, exit status out; SIGHUP
re-reads the configuration through ``reload`` and applies what can change live.
Under systemd the daemon reports readiness, status, reloads and stopping (sd_notify),
pings the watchdog from its own event loop, and serves on a socket systemd passed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import trio

from statusd.access import SocketAccess
from statusd.api import Api
from statusd.channel import StatusChannel
from statusd.config import Config
from statusd.downloads import Downloads
from statusd.errors import ConfigError, StartupError
from statusd.events import Streams
from statusd.lockfile import lock_state_dir
from statusd.notifications import open_notifications
from statusd.proxy import hide_password
from statusd.state.status import Level
from statusd.systemd import (
    Notifier,
    listen_sockets,
    report_status,
    send_watchdog_pings,
    watchdog_timeout,
)
from statusd.tasks import TaskManager
from statusd.tokens import TOKEN_FILE, TokenStore
from statusd.transports.accept import raise_open_files_limit
from statusd.transports.unix import UnixServer
from statusd.transports.websocket import WebSocketServer

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 1.0


@attrs.define
class Daemon:
    """What ``run`` hands to whoever started it: the running parts and a stop button."""

    config: Config
    streams: Streams
    tasks: TaskManager
    api: Api
    unix: UnixServer
    _stop: trio.Event = attrs.Factory(trio.Event)
    _stopped: trio.Event = attrs.Factory(trio.Event)
    notifier: Notifier = attrs.Factory(Notifier)
    downloads: Downloads | None = None
    websocket: WebSocketServer | None = None

    @property
    def channel(self) -> StatusChannel:
        return self.streams.status

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_stop_requested(self) -> None:
        await self._stop.wait()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # -- systemd: status line and reload (issue 6) -----------------------------------------

    def status_line(self) -> str:
        """The short live summary systemd shows as the service's status."""
        if self.stop_requested:
            return "stopping"
        tasks = self.tasks.statistics()
        watchers = self.channel.statistics().watchers
        websocket = self.websocket.connections if self.websocket is not None else 0
        return (
            f"tasks: {tasks['running']} running, {tasks['queued']} pending; "
            f"clients: {self.unix.connections + websocket}; "
            f"subscribers: {watchers} status, {self.streams.tasks.subscribers} tasks"
        )

    async def reload(self, load: Callable[[], Config]) -> bool:
        """Re-read the configuration with ``load`` and apply what can change while running.

        A configuration that does not load changes nothing and is logged; settings that
        only take effect at start-up are logged as needing a restart. Either way systemd
        hears RELOADING=1 first and READY=1 at the end.
        """
        self.notifier.reloading()
        log.info("reloading the configuration")
        try:
            new = await trio.to_thread.run_sync(load)
        except ConfigError as exc:
            problem = " ".join(str(exc).splitlines())
            log.error("reload failed, keeping the current configuration: %s", problem)
            self.channel.publish_status(Level.ERROR, f"Configuration reload failed: {problem}")
            self.notifier.ready(self.status_line())
            return False
        except Exception:
            log.exception("reload failed, keeping the current configuration")
            self.channel.publish_status(Level.ERROR, "Configuration reload failed")
            self.notifier.ready(self.status_line())
            return False
        effective, restart = _reloaded(self.config, new)
        for name, (before, after) in _changes(self.config, effective).items():
            log.info("%s changed: %s -> %s", name, _shown(name, before), _shown(name, after))
        for name in restart:
            log.warning("%s changed: needs a restart", name)
        logging.getLogger().setLevel(effective.log_level.upper())
        self.unix.configure(effective)
        if self.websocket is not None:
            self.websocket.configure(effective)
        self.tasks.max_running = effective.max_running_tasks
        self.channel.set_user_share(effective.limits.status_user_share)
        if self.downloads is not None:
            self.downloads.configure(effective.downloads, effective.proxy_environment)
        # The API reads its limits from its config at each request.
        self.api.config = effective
        # The WebSocket server reads allowed_origins from here at each handshake.
        self.config = effective
        await self._recheck_access()
        self.channel.publish_status(Level.INFO, "Configuration reloaded")
        self.notifier.ready(self.status_line())
        return True

    async def _recheck_access(self) -> None:
        """Who may connect, again: group look-ups afresh (an admin who changed a group
        reloads to say so), the socket file's mode and group as configured, and every open
        connection held to the new rules (``UnixServer.recheck``, ``WebSocketServer.recheck``)."""
        self.unix.lookups.forget()
        try:
            self.unix.set_permissions(self.config.socket_mode, self.config.socket_group)
        except OSError as exc:
            log.error("cannot change the socket's mode or group: %s", exc)
        access: SocketAccess | None = None
        try:
            access = await self.unix.access()
        except OSError as exc:
            # Nobody new can connect to a file that is gone; those connected keep the
            # socket's last rule, and lose what admin_group takes away all the same.
            log.error("cannot read the socket's owner, group and mode: %s", exc)
        await self.unix.recheck(access)
        if self.websocket is not None:
            self.websocket.lookups.forget()
            await self.websocket.recheck(access)


def _reloaded(old: Config, new: Config) -> tuple[Config, list[str]]:
    """What the daemon runs with after a reload: ``new``'s live settings on top of ``old``,
    and the names of the settings that changed but take a restart."""
    effective = attrs.evolve(
        old,
        log_level=new.log_level,
        max_connections=new.max_connections,
        max_running_tasks=new.max_running_tasks,
        downloads=new.downloads,
        limits=new.limits,
        socket_mode=new.socket_mode,
        socket_group=new.socket_group,
        admin_group=new.admin_group,
        websocket=attrs.evolve(old.websocket, allowed_origins=new.websocket.allowed_origins),
        config_file=new.config_file,
        proxy_environment=new.proxy_environment,
    )
    return effective, list(_changes(effective, new))


def _changes(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """``{"websocket.listen": (before, after), ...}`` for every setting that differs."""
    before, after = _flatten(attrs.asdict(old)), _flatten(attrs.asdict(new))
    return {name: (before[name], after[name]) for name in before if before[name] != after[name]}


def _shown(name: str, value: Any) -> Any:
    # A proxy url (downloads.proxy, the proxy variables) may hold a password.
    return hide_password(value) if "proxy" in name and isinstance(value, str) else value


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[prefix + name] = value
    return flat


async def run(
    config: Config, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED
) -> None:
    # First of all, before any journal is opened or the socket touched: a second daemon
    # on this state directory stops here (statusd.lockfile).
    state_lock = lock_state_dir(config.state_dir)
    try:
        soft, hard = raise_open_files_limit()
        log.info("open files limit: %d (hard limit %d)", soft, hard)
        await _run_locked(config, task_status)
    finally:
        state_lock.release()


async def _run_locked(config: Config, task_status: trio.TaskStatus[Daemon]) -> None:
    streams = Streams(
        StatusChannel(config.status_history, user_share_percent=config.limits.status_user_share)
    )
    channel = streams.status
    if config.config_file is not None:
        channel.publish_status(Level.INFO, "Configuration loaded from file")
    downloads = Downloads(config)
    tasks = TaskManager(
        channel,
        streams.tasks,
        journal_path=config.state_dir / "tasks.jsonl",
        factories={
            "download": lambda task, saved: downloads.job(
                task.id, saved["spec"], saved["checkpoints"], task.rate_limit
            )
        },
        max_running=config.max_running_tasks,
    )
    token_store = await TokenStore.open(config.state_dir / TOKEN_FILE)
    api = Api(config, streams, tasks, downloads, tokens=token_store)
    notifier = Notifier()
    # Socket activation: the control socket and, if systemd passed one, the WebSocket's.
    passed = listen_sockets()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(downloads.aclose)
        # Entered before the nursery, so it is closed after every task in there has ended.
        notifications = await stack.enter_async_context(
            open_notifications(config.state_dir / "notifications.jsonl", streams.notifications)
        )
        api.notifications = notifications
        tasks.on_finished = notifications.notify_task_finished
        nursery = await stack.enter_async_context(trio.open_nursery())
        await nursery.start(tasks.serve)
        await nursery.start(token_store.serve_expiry)
        unix = UnixServer(config, api, streams)
        daemon = Daemon(config, streams, tasks, api, unix, notifier=notifier, downloads=downloads)
        # The WebSocket first: once the control socket answers, everything does (clients
        # and tests take a connectable control socket to mean "ready").
        if config.websocket.listen is not None or passed.websocket is not None:
            websocket = WebSocketServer(api, streams, token_store, lambda: daemon.config)
            daemon.websocket = await nursery.start(websocket.serve, passed.websocket)
            api.websocket_address = websocket.address
        await nursery.start(unix.serve, passed.unix)
        if daemon.websocket is not None:
            daemon.websocket.socket_access = await unix.access()
        channel.publish_status(Level.INFO, "System ready")
        notifier.ready(daemon.status_line())
        if notifier.enabled:
            nursery.start_soon(report_status, notifier, daemon.status_line)
            watchdog = watchdog_timeout()
            if watchdog is not None:
                nursery.start_soon(send_watchdog_pings, notifier, watchdog)
        log.info("statusd ready (pid %d, socket %s)", os.getpid(), config.socket)
        task_status.started(daemon)

        await daemon.wait_stop_requested()
        log.info("stopping")
        notifier.stopping(daemon.status_line())
        channel.publish_status(Level.WARNING, "Stopping operations...")
        async with trio.open_nursery() as closing:
            closing.start_soon(unix.shutdown, SHUTDOWN_GRACE)
            if daemon.websocket is not None:
                closing.start_soon(daemon.websocket.shutdown, SHUTDOWN_GRACE)
        nursery.cancel_scope.cancel()
    daemon._stopped.set()
    log.info("stopped")


async def _watch_signals(
    signals: AsyncIterator[int],
    daemon: Daemon,
    scope: trio.CancelScope,
    reload: Callable[[], Config],
) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            if not daemon.stop_requested:
                log.info("%s received", name)
                await daemon.reload(reload)
            continue
        if daemon.stop_requested:
            log.warning("%s again: stopping at once", name)
            scope.cancel()
            return
        log.info("%s received", name)
        daemon.request_stop()


async def _main(config: Config, reload: Callable[[], Config], ready: Callable[[], None]) -> None:
    # The receiver is installed before anything starts, so an early SIGTERM is not lost
    # (and an early SIGHUP does not kill the daemon, its default action).
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            daemon: Daemon = await nursery.start(run, config)
            ready()
            nursery.start_soon(_watch_signals, signals, daemon, nursery.cancel_scope, reload)
            await daemon.wait_stopped()
            nursery.cancel_scope.cancel()


def _leaves(group: BaseExceptionGroup[Exception]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for error in group.exceptions:
        leaves.extend(_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    return leaves


def serve(config: Config, reload: Callable[[], Config] | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the process exit status, 1 when it
    could not start (logged in one line per error; with a traceback only at debug level).

    On SIGHUP ``reload()`` builds the configuration afresh (the command passes one that
    reads the same flags, environment and file again); without it SIGHUP re-applies
    ``config``.
    """
    failed = started = False

    def ready() -> None:
        nonlocal started
        started = True

    try:
        trio.run(_main, config, reload or (lambda: config), ready)
    except* StartupError as group:
        for error in _leaves(group):
            log.error("%s", error)
        failed = True
    except* Exception as group:
        if started:
            raise
        # Someone starting a daemon needs what went wrong, in the journal's one line; where
        # in the code is for a developer, who asks with --log-level debug.
        trace = log.isEnabledFor(logging.DEBUG)
        for error in _leaves(group):
            name = type(error).__name__
            log.error("cannot start: %s: %s", name, error, exc_info=error if trace else None)
        failed = True
    return 1 if failed else 0
