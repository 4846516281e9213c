"""The daemon's nursery tree, readiness and shutdown order.

``run(config, task_status=...)`` builds the core (status channel, API), starts the Unix
socket server and reports readiness only once the socket accepts connections. It returns
after an orderly stop: publish "Stopping operations...", stop accepting and remove the
socket file, give clients ``SHUTDOWN_GRACE`` seconds to receive what is queued, cancel.
``serve(config)`` is the command's entry: signals in, exit status out.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import AsyncIterator

import attrs
import trio

from statusd.api import Api
from statusd.channel import StatusChannel
from statusd.config import Config
from statusd.errors import StartupError
from statusd.events import Streams
from statusd.state.status import Level
from statusd.systemd import Notifier
from statusd.tasks import TaskManager
from statusd.transports.unix import UnixServer

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


async def run(
    config: Config, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED
) -> None:
    streams = Streams(StatusChannel(config.status_history))
    channel = streams.status
    if config.config_file is not None:
        channel.publish_status(Level.INFO, "Configuration loaded from file")
    downloads = None
    tasks = TaskManager(
        channel,
        streams.tasks,
        journal_path=config.state_dir / "tasks.jsonl",
        factories={},
        max_running=config.max_running_tasks,
    )
    api = Api(config, streams, tasks, downloads)
    notifier = Notifier()
    async with trio.open_nursery() as nursery:
        await nursery.start(tasks.serve)
        unix = UnixServer(config, api, streams)
        await nursery.start(unix.serve)
        daemon = Daemon(config, streams, tasks, api, unix)
        channel.publish_status(Level.INFO, "System ready")
        notifier.ready("ready")
        log.info("statusd ready (pid %d, socket %s)", os.getpid(), config.socket)
        task_status.started(daemon)

        await daemon.wait_stop_requested()
        log.info("stopping")
        notifier.stopping()
        channel.publish_status(Level.WARNING, "Stopping operations...")
        await unix.shutdown(grace=SHUTDOWN_GRACE)
        nursery.cancel_scope.cancel()
    daemon._stopped.set()
    log.info("stopped")


async def _watch_signals(
    signals: AsyncIterator[int], daemon: Daemon, scope: trio.CancelScope
) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if daemon.stop_requested:
            log.warning("%s again: stopping at once", name)
            scope.cancel()
            return
        log.info("%s received", name)
        daemon.request_stop()


async def _main(config: Config) -> None:
    # The receiver is installed before anything starts, so an early SIGTERM is not lost.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            daemon: Daemon = await nursery.start(run, config)
            nursery.start_soon(_watch_signals, signals, daemon, nursery.cancel_scope)
            await daemon.wait_stopped()
            nursery.cancel_scope.cancel()


def _leaves(group: BaseExceptionGroup[StartupError]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for error in group.exceptions:
        leaves.extend(_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    return leaves


def serve(config: Config) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the process exit status."""
    failed = False
    try:
        trio.run(_main, config)
    except* StartupError as group:
        for error in _leaves(group):
            log.error("%s", error)
        failed = True
    return 1 if failed else 0
