"""Who may connect to the control socket, decided as the kernel decides it, so that the
WebSocket admits a token's user only while that user could connect to the Unix socket.

Connecting to a Unix socket takes write permission on its file: the owner's bits for its
owner, the group's for a member of its group, the others' for everyone else; root passes
(CAP_DAC_OVERRIDE). The directories on the way are not looked at: statusd's own are
0755 (system) or the user's 0700 runtime directory, whose owner is the socket's too.

The standard library only (``os.stat``, which may block: callers use a thread).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection
from pathlib import Path

import attrs


@attrs.frozen
class SocketAccess:
    """The socket file's owner, group and permission bits."""

    owner: int
    group: int
    mode: int

    @classmethod
    def of(cls, path: Path) -> SocketAccess:
        info = os.stat(path)
        return cls(info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode))

    def permits(self, uid: int, groups: Collection[int]) -> bool:
        """Whether ``uid``, a member of ``groups``, may connect."""
        if uid == 0:
            return True
        if uid == self.owner:
            return bool(self.mode & stat.S_IWUSR)
        if self.group in groups:
            return bool(self.mode & stat.S_IWGRP)
        return bool(self.mode & stat.S_IWOTH)

    def needs_groups(self, uid: int) -> bool:
        """Whether ``permits`` depends on the groups of ``uid`` (a look-up that may block)."""
        return uid not in (0, self.owner)

    def describe(self) -> str:
        """``"0660, owner 0, group 990"``, for refusals and the log."""
        return f"{self.mode:04o}, owner {self.owner}, group {self.group}"
