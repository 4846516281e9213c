"""Who is calling: a uid (from SO_PEERCRED, or a token's user) becomes a ``Caller``.

Admins are uid 0, the daemon's own uid, and members of ``admin_group`` (CONTRACT.md).
Pure apart from the passwd/group lookups of the standard library.
"""

from __future__ import annotations

import grp
import os
import pwd

import attrs


@attrs.frozen
class Caller:
    uid: int
    username: str
    admin: bool
    pid: int | None = None


def username_for(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        # A uid with no passwd entry (a container's, say) still owns its things.
        return str(uid)


def is_admin(uid: int, username: str, admin_group: str | None, *, daemon_uid: int) -> bool:
    if uid in (0, daemon_uid):
        return True
    if admin_group is None:
        return False
    try:
        group = grp.getgrnam(admin_group)
    except KeyError:
        return False
    if username in group.gr_mem:
        return True
    try:
        primary = pwd.getpwuid(uid).pw_gid
    except KeyError:
        return False
    return group.gr_gid in os.getgrouplist(username, primary)


def caller_for_uid(
    uid: int, admin_group: str | None, *, pid: int | None = None, daemon_uid: int | None = None
) -> Caller:
    username = username_for(uid)
    own = os.getuid() if daemon_uid is None else daemon_uid
    return Caller(uid, username, is_admin(uid, username, admin_group, daemon_uid=own), pid)


def uid_for(username: str) -> int | None:
    """The uid of ``username``; a name that is all digits and has no passwd entry is the
    uid itself (as ``username_for`` names such uids). None if there is no such user."""
    try:
        return pwd.getpwnam(username).pw_uid
    except KeyError:
        return int(username) if username.isdigit() else None


def caller_for_username(
    username: str, admin_group: str | None, *, daemon_uid: int | None = None
) -> Caller | None:
    """The caller a WebSocket token's user is; None if the user no longer exists."""
    uid = uid_for(username)
    if uid is None:
        return None
    own = os.getuid() if daemon_uid is None else daemon_uid
    return Caller(uid, username, is_admin(uid, username, admin_group, daemon_uid=own))
