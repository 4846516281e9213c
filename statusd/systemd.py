"""systemd integration: sd_notify(3) messages, the watchdog, and socket activation.

- ``Notifier`` sends READY/STATUS/RELOADING/STOPPING/WATCHDOG to ``NOTIFY_SOCKET``.
- ``send_watchdog_pings`` and ``report_status`` are loops for the daemon's nursery.
- ``listen_sockets`` takes the sockets systemd passed (sd_listen_fds(3)).

Outside systemd all of it is inert: without ``NOTIFY_SOCKET`` nothing is sent, without
``WATCHDOG_USEC`` nothing pings, without ``LISTEN_FDS`` the daemon binds its own socket.
Nothing here imports the rest of statusd; the daemon hands in what a loop needs.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import NoReturn

import attrs
import trio

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): passed descriptors start here, in order
WEBSOCKET_FD_NAME = "websocket"  # FileDescriptorName= of a socket meant for the WebSocket
STATUS_INTERVAL = 1.0  # seconds between checks whether STATUS= needs an update


class Notifier:
    """sd_notify(3) for the daemon; a no-op when ``NOTIFY_SOCKET`` is unset.

    This is the protocol's few lines rather than the sdnotify package, which keeps one
    socket open for the process's life and leaks it when ``connect`` fails. Like libsystemd,
    each message goes out on its own socket: nothing to close, and a notify socket that
    systemd re-created (daemon-reexec) is reached all the same.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
        self._shown = address  # for messages; the abstract form starts with a NUL
        # "@name" is in the abstract namespace; only absolute paths are valid otherwise.
        if address.startswith("@"):
            self._address: str | None = "\0" + address[1:]
        elif address.startswith("/"):
            self._address = address
        else:
            if address:
                log.warning("ignoring NOTIFY_SOCKET=%r: not a path or @name", address)
            self._address = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *states: str) -> None:
        if self._address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # A full notify queue must cost a lost message, never a stalled event loop.
                sock.setblocking(False)
                sock.sendto("\n".join(states).encode(), self._address)
        except OSError as exc:
            # systemd being unreachable must not stop the daemon; say so once, not per ping.
            if not self._failed:
                log.warning("cannot notify systemd at %s: %s", self._shown, exc.strerror)
                self._failed = True
        else:
            self._failed = False

    def ready(self, status: str = "") -> None:
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def reloading(self) -> None:
        # systemd compares MONOTONIC_USEC with its own CLOCK_MONOTONIC reading, so this is
        # the one place where the OS clock is wanted rather than trio's.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading configuration")

    def stopping(self, status: str = "") -> None:
        self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")


def watchdog_timeout(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """systemd's watchdog timeout in seconds (``WATCHDOG_USEC``), or None when there is
    none for this process (unset, or ``WATCHDOG_PID`` names another process)."""
    environ = os.environ if environ is None else environ
    pid = os.getpid() if pid is None else pid
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    if not usec.isdigit() or int(usec) == 0:
        log.warning("ignoring WATCHDOG_USEC=%r: not a positive number of microseconds", usec)
        return None
    return int(usec) / 1_000_000


async def send_watchdog_pings(notifier: Notifier, watchdog_sec: float) -> NoReturn:
    """Send WATCHDOG=1 every ``watchdog_sec / 2`` seconds, forever.

    This runs as a task on the daemon's own event loop on purpose: if something blocks
    the loop, the pings stop and systemd restarts the service.
    """
    while True:
        notifier.watchdog()
        await trio.sleep(watchdog_sec / 2)


async def report_status(notifier: Notifier, summary: Callable[[], str]) -> NoReturn:
    """Keep systemd's STATUS= (shown by ``systemctl status``) at ``summary()``, sending
    only when the text changed; the current one went out with READY=1."""
    last = summary()
    while True:
        await trio.sleep(STATUS_INTERVAL)
        text = summary()
        if text != last:
            notifier.status(text)
            last = text


# --- socket activation ------------------------------------------------------------------------


@attrs.frozen
class ListenSockets:
    """The listening sockets systemd passed, as file descriptors: the control socket (a Unix
    stream socket) and, if one is named ``websocket``, a TCP socket for the WebSocket.

    Descriptors rather than socket objects, so one nobody takes up stays open quietly as
    sd_listen_fds(3) leaves it. The daemon owns no socket file: systemd made it and removes it.
    """

    unix: int | None = None
    websocket: int | None = None


def listen_sockets(
    environ: MutableMapping[str, str] | None = None, pid: int | None = None
) -> ListenSockets:
    """Take the listening sockets passed with ``LISTEN_FDS`` (sd_listen_fds_with_names(3)).

    The ``LISTEN_*`` variables are removed either way, as ``sd_listen_fds(1)`` does, so
    nothing started later mistakes the descriptors for its own. Passed descriptors that
    are not what the daemon can use are logged and closed; the others become close-on-exec.
    """
    environ = os.environ if environ is None else environ
    pid = os.getpid() if pid is None else pid
    listen_pid = environ.pop("LISTEN_PID", "")
    count = environ.pop("LISTEN_FDS", "")
    names = environ.pop("LISTEN_FDNAMES", "")
    if not count or listen_pid != str(pid):
        return ListenSockets()
    if not count.isdigit():
        log.warning("ignoring LISTEN_FDS=%r: not a number of descriptors", count)
        return ListenSockets()
    fd_names = names.split(":") if names else []
    unix: int | None = None
    websocket: int | None = None
    for index in range(int(count)):
        fd = SD_LISTEN_FDS_START + index
        name = fd_names[index] if index < len(fd_names) else "unknown"
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            log.warning("systemd passed fd %d (%s), not a usable socket: %s", fd, name, exc)
            continue
        sock.set_inheritable(False)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 0
        stream = sock.type == socket.SOCK_STREAM and listening
        inet = sock.family in (socket.AF_INET, socket.AF_INET6)
        if stream and inet and name == WEBSOCKET_FD_NAME and websocket is None:
            log.info("systemd passed the WebSocket socket: %s", _address(sock))
            websocket = sock.detach()
        elif (
            stream and sock.family == socket.AF_UNIX and name != WEBSOCKET_FD_NAME and unix is None
        ):
            log.info("using the control socket passed by systemd: %s", _address(sock))
            unix = sock.detach()
        else:
            log.warning(
                "systemd passed fd %d (%s, %s), which statusd does not use; closing it",
                fd,
                name,
                _address(sock),
            )
            sock.close()
    return ListenSockets(unix, websocket)


def _address(sock: socket.socket) -> str:
    try:
        address = sock.getsockname()
    except OSError:
        return "unknown address"
    if isinstance(address, bytes):  # an abstract Unix name
        return "@" + address[1:].decode(errors="replace")
    if isinstance(address, tuple):
        host, port = address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address) or "unnamed"
