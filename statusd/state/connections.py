"""Who may hold how many connections: per transport, per user, and room kept for admins.

Pure: no trio, no sockets. A transport asks ``Connections.admit(key, admin)`` before it
serves a connection and calls ``release(key)`` when it ends. The key is whatever one user
holds connections as: the peer uid on the Unix socket, the token id on the WebSocket.

Three rules, in this order (the first that fails is the refusal):

1. at most ``max_connections`` in all, admins included;
2. the last ``admin_reserve`` of those only admins may take, so a user who holds every
   other slot still leaves root a way in;
3. at most ``per_user`` for one key. Admins are exempt, as from the publish rate: a
   single-user daemon's only user is its admin, and a fan-out of hundreds of watchers
   from one admin is legitimate.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable

import attrs


@attrs.frozen
class ConnectionLimits:
    max_connections: int
    per_user: int
    admin_connections: int

    def __attrs_post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, not {self.max_connections}")
        if self.per_user < 1:
            raise ValueError(f"per_user must be >= 1, not {self.per_user}")
        if self.admin_connections < 0:
            raise ValueError(f"admin_connections must be >= 0, not {self.admin_connections}")

    @property
    def admin_reserve(self) -> int:
        """Slots only admins may take. At most half of them, so a large
        ``admin_connections`` with a small ``max_connections`` never locks users out."""
        return min(self.admin_connections, self.max_connections // 2)


@attrs.frozen
class Refusal:
    """Why a connection was not admitted; ``key`` is the configuration key that says so."""

    message: str
    key: str
    limit: int

    @property
    def data(self) -> dict[str, object]:
        return {"limit": self.limit, "key": self.key}


class Connections:
    """The connections one transport holds, counted per key."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._held: Counter[Hashable] = Counter()
        self._total = 0

    def configure(self, limits: ConnectionLimits) -> None:
        """New limits (a reload). Connections already held stay; new ones obey the limits."""
        self.limits = limits

    def __len__(self) -> int:
        return self._total

    def held_by(self, key: Hashable) -> int:
        return self._held[key]

    def check(self, key: Hashable, admin: bool) -> Refusal | None:
        """Whether ``key`` may open one more connection now, without taking it."""
        limits = self.limits
        if self._total >= limits.max_connections:
            return Refusal(
                f"too many connections (max_connections = {limits.max_connections})",
                "max_connections",
                limits.max_connections,
            )
        open_to_users = limits.max_connections - limits.admin_reserve
        if not admin and self._total >= open_to_users:
            return Refusal(
                f"too many connections: the last {limits.admin_reserve} of max_connections = "
                f"{limits.max_connections} are kept for admins (limits.admin_connections)",
                "limits.admin_connections",
                open_to_users,
            )
        if not admin and self._held[key] >= limits.per_user:
            return Refusal(
                f"too many connections from one user: {self._held[key]} open, the most "
                f"allowed (limits.max_connections_per_user = {limits.per_user})",
                "limits.max_connections_per_user",
                limits.per_user,
            )
        return None

    def admit(self, key: Hashable, admin: bool) -> Refusal | None:
        """Take a slot for ``key``, or say why not (and take nothing)."""
        refusal = self.check(key, admin)
        if refusal is None:
            self._held[key] += 1
            self._total += 1
        return refusal

    def release(self, key: Hashable) -> None:
        if self._held[key] <= 0:
            raise ValueError(f"release of {key!r}, which holds no connection")
        self._held[key] -= 1
        if not self._held[key]:
            del self._held[key]
        self._total -= 1
