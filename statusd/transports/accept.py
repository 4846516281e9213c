"""What both transports share before a connection is served: the accept loop and the
connection limits.

``serve_listeners`` is ``trio.serve_listeners`` with one difference: when accept() fails
because the process (EMFILE) or the system (ENFILE) is out of file descriptors, trio's
logs a traceback for every failure, ten a second, for as long as it lasts. Here the
failure is logged once per ``ACCEPT_LOG_INTERVAL`` with the count it stands for, the
loop backs off ``ACCEPT_BACKOFF`` seconds and tries again (the connection waits in the
listen backlog meanwhile), and recovery is logged once.

``raise_open_files_limit`` lifts the soft RLIMIT_NOFILE to the hard one at start: 1,024,
the usual soft limit, is less than the two transports' ``max_connections`` alone.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
from collections.abc import Awaitable, Callable, Sequence

import trio

from statusd.config import Config
from statusd.logs import EveryInterval
from statusd.state.connections import ConnectionLimits

log = logging.getLogger(__name__)

# accept(2)'s errors that say the process or the system is out of something, not that
# anything is wrong with the listener: the same set trio's serve_listeners retries.
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF = 0.1
ACCEPT_LOG_INTERVAL = 60.0


def connection_limits(config: Config) -> ConnectionLimits:
    return ConnectionLimits(
        max_connections=config.max_connections,
        per_user=config.limits.max_connections_per_user,
        admin_connections=config.limits.admin_connections,
    )


async def serve_listeners(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    listeners: Sequence[trio.abc.Listener[trio.SocketStream]],
    handler_nursery: trio.Nursery,
    name: str,
) -> None:
    """Accept on every listener until cancelled, each connection's ``handler`` run in
    ``handler_nursery``; ``name`` ("unix socket", "WebSocket") is for the log."""
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_serve_one, handler, listener, handler_nursery, name)


async def _serve_one(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    listener: trio.abc.Listener[trio.SocketStream],
    handler_nursery: trio.Nursery,
    name: str,
) -> None:
    report = EveryInterval(ACCEPT_LOG_INTERVAL)
    failures = 0
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in CAPACITY_ERRNOS:
                    raise
                failures += 1
                quiet = report.ready()
                if quiet is not None:
                    log.error(
                        "%s: cannot accept a connection: %s (%s); retrying every %s s, "
                        "%d more failures since the last report, next report in %s s",
                        name,
                        errno.errorcode[exc.errno],
                        os.strerror(exc.errno),
                        ACCEPT_BACKOFF,
                        quiet,
                        ACCEPT_LOG_INTERVAL,
                    )
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            if failures:
                log.warning("%s: accepting connections again after %d failures", name, failures)
                failures = 0
            handler_nursery.start_soon(_run_handler, handler, stream)


async def _run_handler(
    handler: Callable[[trio.SocketStream], Awaitable[None]], stream: trio.SocketStream
) -> None:
    try:
        await handler(stream)
    finally:
        await trio.aclose_forcefully(stream)


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the (soft, hard) now in force.

    Only the soft limit moves, which needs no privilege. Nothing here uses select(),
    whose FD_SETSIZE of 1,024 is why the soft limit is usually left low.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, exc)
            return soft, hard
    return resource.getrlimit(resource.RLIMIT_NOFILE)
