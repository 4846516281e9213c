"""One daemon per state directory: an exclusive ``flock`` on ``state_dir/statusd.lock``.

Two daemons on one state directory would resume the same tasks and write the same
notification ids. The lock is taken before any journal is opened or the socket touched,
and held for the life of the process: the kernel drops a ``flock`` when its file is
closed, including when the process dies (SIGKILL too), so a stale lock cannot outlive
its daemon and there is nothing to clean up. The holder writes its pid into the file,
for the message the next daemon gives.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from statusd.errors import StartupError

LOCK_FILE = "statusd.lock"


class StateLock:
    """The held lock; ``release()`` (or the process's exit) gives it up."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def lock_state_dir(state_dir: Path) -> StateLock:
    """Lock ``state_dir`` (created 0700 if missing) for this process, or raise
    ``StartupError`` naming the pid that holds it."""
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(
            f"state directory {state_dir}: cannot create it: {exc.strerror}"
        ) from None
    path = state_dir / LOCK_FILE
    try:
        # O_NOFOLLOW: a symlink planted here must not make us truncate another file.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise StartupError(
            f"state directory {state_dir}: cannot open {path}: {exc.strerror}"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _read_pid(fd)
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            who = f"pid {holder}" if holder is not None else "another process"
            raise StartupError(f"state directory {state_dir} is in use by {who}") from None
        raise StartupError(
            f"state directory {state_dir}: cannot lock {path}: {exc.strerror}"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        # The pid is only for the message: a full disk must not stop the daemon here.
        pass
    return StateLock(path, fd)


def _read_pid(fd: int) -> int | None:
    """The pid the holder wrote; None while it has locked but not yet written it."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
