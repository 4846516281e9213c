"""Who is calling: a uid (from SO_PEERCRED, or a token's user) becomes a ``Caller``.

Admins are uid 0, the daemon's own uid, and members of ``admin_group`` (CONTRACT.md).
The functions here do the passwd/group lookups of the standard library, which block:
under LDAP or SSSD for seconds. The transports ask a ``CallerLookups`` instead, which runs
them in threads of its own and remembers each answer for ``LOOKUP_TTL`` seconds.
Imports trio and nothing of statusd.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar, cast

import attrs
import trio


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


def groups_of(uid: int, username: str) -> frozenset[int]:
    """The gids ``username`` is a member of (primary and supplementary); empty for a uid
    with no passwd entry, whose groups cannot be known."""
    try:
        primary = pwd.getpwuid(uid).pw_gid
    except KeyError:
        return frozenset()
    try:
        return frozenset(os.getgrouplist(username, primary))
    except OSError:
        return frozenset({primary})


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


T = TypeVar("T")

LOOKUP_TTL = 60.0  # seconds an answer is reused: a group change takes effect within this
MAX_CACHED_LOOKUPS = 1024  # answers remembered; the oldest is forgotten first
MAX_LOOKUP_THREADS = 4  # a stuck directory service holds at most this many threads


class _Missing:
    pass


_MISSING = _Missing()


@attrs.define
class CallerLookups:
    """``caller_for_uid`` and ``caller_for_username`` off the event loop, cached briefly.

    The lookups run in threads limited by a ``CapacityLimiter`` of their own: a directory
    service that never answers holds ``max_threads`` threads and makes later lookups wait,
    but cannot take the threads trio's other ``to_thread`` work (file writes, fsync)
    needs. A caller waiting for a lookup can be cancelled (its connection closes, the
    daemon stops); the thread then finishes, or not, on its own.

    Root and the daemon's own user are looked up once, when this is made (at
    start-up), and answered from then on without a thread: they are admins whatever the
    groups say, and a per-user daemon's every caller is its own user.
    """

    ttl: float = LOOKUP_TTL
    max_entries: int = MAX_CACHED_LOOKUPS
    max_threads: int = MAX_LOOKUP_THREADS
    daemon_uid: int = attrs.field(factory=os.getuid)
    _limiter: trio.CapacityLimiter = attrs.field(init=False)
    # key -> (when it expires, the answer); oldest first, as every entry lives ``ttl``.
    _cache: OrderedDict[Hashable, tuple[float, Any]] = attrs.field(init=False, factory=OrderedDict)
    _pending: dict[Hashable, trio.Event] = attrs.field(init=False, factory=dict)
    _admins: dict[int, str] = attrs.field(init=False, factory=dict)  # uid -> name
    _forgotten: int = attrs.field(init=False, default=0)  # how many times ``forget`` ran

    def __attrs_post_init__(self) -> None:
        if self.ttl < 0:
            raise ValueError(f"ttl must be >= 0, not {self.ttl}")
        if self.max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, not {self.max_entries}")
        if self.max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, not {self.max_threads}")
        self._limiter = trio.CapacityLimiter(self.max_threads)
        self._admins = {uid: username_for(uid) for uid in (0, self.daemon_uid)}

    async def caller_for_uid(
        self, uid: int, admin_group: str | None, *, pid: int | None = None
    ) -> Caller:
        """The caller a peer's uid is (``caller_for_uid``), from the cache when fresh."""
        if uid in self._admins:
            return Caller(uid, self._admins[uid], True, pid)

        def lookup() -> Caller:
            return caller_for_uid(uid, admin_group, daemon_uid=self.daemon_uid)

        caller = await self._resolve(("uid", uid, admin_group), lookup)
        assert caller is not None
        return attrs.evolve(caller, pid=pid)

    async def caller_for_username(self, username: str, admin_group: str | None) -> Caller | None:
        """The caller a token's user is (``caller_for_username``); None if no such user."""
        for uid, name in self._admins.items():
            if name == username:
                return Caller(uid, name, True)

        def lookup() -> Caller | None:
            return caller_for_username(username, admin_group, daemon_uid=self.daemon_uid)

        return await self._resolve(("user", username, admin_group), lookup)

    async def groups_for(self, uid: int, username: str) -> frozenset[int]:
        """The gids ``username`` belongs to (``groups_of``), from the cache when fresh."""
        return await self._resolve(("groups", uid, username), lambda: groups_of(uid, username))

    def forget(self) -> None:
        """Drop every answer (on SIGHUP: an admin who changed a group says so by reloading).
        Look-ups under way finish and answer their callers, but are not remembered: they
        may have read the groups from before the change."""
        self._cache.clear()
        self._forgotten += 1

    @property
    def cached(self) -> int:
        """How many answers are held (fresh or not yet found stale)."""
        return len(self._cache)

    async def _resolve(self, key: Hashable, lookup: Callable[[], T]) -> T:
        while True:
            found = self._fresh(key)
            if not isinstance(found, _Missing):
                return cast(T, found)
            pending = self._pending.get(key)
            if pending is None:
                break
            # One lookup per key at a time: a burst of connections from one user under a
            # slow directory waits for one answer instead of taking every thread.
            await pending.wait()
        done = self._pending[key] = trio.Event()
        forgotten = self._forgotten
        try:
            answer = await trio.to_thread.run_sync(
                lookup, limiter=self._limiter, abandon_on_cancel=True
            )
            if forgotten == self._forgotten:
                self._remember(key, answer)
            return answer
        finally:
            del self._pending[key]
            # Waiters look again: they find the answer, or (this one failed) look it up.
            done.set()

    def _fresh(self, key: Hashable) -> Any:
        entry = self._cache.get(key)
        if entry is None:
            return _MISSING
        expires, answer = entry
        if trio.current_time() >= expires:
            del self._cache[key]
            return _MISSING
        return answer

    def _remember(self, key: Hashable, answer: Any) -> None:
        self._cache.pop(key, None)
        self._cache[key] = (trio.current_time() + self.ttl, answer)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
