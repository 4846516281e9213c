"""WebSocket access tokens: minted over the Unix socket, checked at each WebSocket handshake.

A token reads ``sdt_<token_id>_<secret>``: the id says which record to look at, the secret
is 256 random bits. Only ``sha256(secret)`` is kept, in ``tokens.json`` in the state
directory (mode 0600, replaced atomically: temporary file, fsync, rename, directory fsync),
so the file leaks nothing that opens a connection. A plain, fast hash is the right one here:
slow password hashes (bcrypt, scrypt) exist to make guessing low-entropy passwords
expensive, and nobody guesses 256 random bits; a slow hash would only cost CPU at every
handshake. Secrets are compared in constant time (``hmac.compare_digest``).

A token may expire (``expires_in`` seconds, 60 s to a year, at creation). ``expires_at`` is
wall-clock time, since ``tokens.json`` outlives the process; an expired token is refused at
the handshake, and ``serve_expiry`` removes it when it expires and tells the listeners, so
that connections using it close. That task sleeps on trio's clock until the next expiry,
at most ``MAX_EXPIRY_SLEEP`` at a time, so a wall clock set forward is noticed soon.

A token carries a scope, which limits the methods a WebSocket client may call:
``read`` (look, subscribe, mark notifications read) or ``control`` (everything its user may
do). The token methods themselves are never available over the WebSocket: a token cannot
mint tokens.

Depends on the standard library, attrs and trio (one thread per file write); nothing of the
daemon's transports.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import attrs
import trio

from statusd.errors import StartupError

log = logging.getLogger(__name__)

Scope = Literal["read", "control"]
SCOPES: tuple[Scope, ...] = ("read", "control")
TOKEN_PREFIX = "sdt"
TOKEN_FILE = "tokens.json"
MAX_TOKENS_PER_USER = 100
MIN_EXPIRES_IN = 60  # seconds; anything shorter would expire before a front-end used it
MAX_EXPIRES_IN = 365 * 24 * 3600  # a year
MAX_EXPIRY_SLEEP = 60.0  # seconds between looks at the wall clock while tokens wait to expire
FILE_VERSION = 1

# What a ``read`` token may call. Everything else needs ``control``.
READ_METHODS = frozenset(
    {
        "daemon.info",
        "tasks.get",
        "tasks.list",
        "tasks.summary",
        "status.recent",
        "subscribe",
        "unsubscribe",
        "notifications.list",
        "notifications.unread_count",
        "notifications.mark_read",
        "notifications.mark_all_read",
    }
)
# Never over the WebSocket, whatever the scope.
TOKEN_METHODS = frozenset({"tokens.create", "tokens.list", "tokens.revoke"})


def refusal(scope: Scope | None, method: str) -> str | None:
    """Why a session of ``scope`` may not call ``method``, or None if it may.

    ``scope`` is None on the Unix socket, where the socket's permissions decide who
    connects and every method is open (each still checks the caller).
    """
    if scope is None:
        return None
    if method in TOKEN_METHODS:
        return f"{method} is only available on the Unix socket"
    if scope == "read" and method not in READ_METHODS:
        return f"{method} needs a token with scope control, not read"
    return None


@attrs.frozen
class TokenRecord:
    """One token as stored: everything but the secret."""

    id: str
    username: str
    scope: Scope
    created_at: str
    secret_sha256: str
    # Wall-clock time, like created_at; None: the token lasts until it is revoked.
    expires_at: str | None = None

    def describe(self) -> dict[str, Any]:
        """What ``tokens.list`` shows: never the hash."""
        return {
            "token_id": self.id,
            "username": self.username,
            "scope": self.scope,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
        }

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= parse_time(self.expires_at)


@attrs.frozen
class NewToken:
    record: TokenRecord
    token: str  # shown once, to whoever created it


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text)  # 3.11 reads the "Z"


def system_wall_clock() -> datetime:
    return datetime.now(UTC)


def split_token(token: str) -> tuple[str, str] | None:
    """(token_id, secret), or None if ``token`` is not shaped like one of ours."""
    prefix, _, rest = token.partition("_")
    token_id, _, secret = rest.partition("_")
    if prefix != TOKEN_PREFIX or not token_id or not secret:
        return None
    return token_id, secret


Revoked = Callable[[str], None]
Expired = Callable[[str], None]


class TokenStore:
    """The tokens in memory and in ``tokens.json``; every change is written before it is
    reported, one write at a time."""

    def __init__(
        self,
        path: Path,
        records: list[TokenRecord] | None = None,
        *,
        wall_clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.path = path
        self._records: dict[str, TokenRecord] = {r.id: r for r in records or ()}
        self._lock = trio.Lock()
        self._revoked_listeners: list[Revoked] = []
        self._expired_listeners: list[Expired] = []
        # Looked up here, not bound as a default, so a test can replace the daemon's.
        self._wall_clock = wall_clock or system_wall_clock
        self._expiry_changed = trio.Event()

    @classmethod
    async def open(
        cls, path: Path, *, wall_clock: Callable[[], datetime] | None = None
    ) -> TokenStore:
        return cls(path, await trio.to_thread.run_sync(_load, path), wall_clock=wall_clock)

    def __len__(self) -> int:
        return len(self._records)

    def on_revoked(self, listener: Revoked) -> None:
        """Call ``listener(token_id)`` (synchronously, must not raise) after a revoke."""
        self._revoked_listeners.append(listener)

    def on_expired(self, listener: Expired) -> None:
        """Call ``listener(token_id)`` (synchronously, must not raise) when a token expires."""
        self._expired_listeners.append(listener)

    def verify(self, token: str) -> TokenRecord | None:
        """The record of a valid, unexpired token, or None; takes the same time for any
        wrong secret."""
        parts = split_token(token)
        if parts is None:
            return None
        token_id, secret = parts
        record = self._records.get(token_id)
        # Hash even for an unknown id, so timing says nothing about which ids exist.
        digest = _digest(secret)
        expected = record.secret_sha256 if record is not None else "0" * 64
        if not hmac.compare_digest(digest, expected) or record is None:
            return None
        # Checked here, not only by serve_expiry: its sleep may end a little late.
        if record.expired(self._wall_clock()):
            return None
        return record

    def get(self, token_id: str) -> TokenRecord | None:
        return self._records.get(token_id)

    def records(self, username: str | None = None) -> list[TokenRecord]:
        """Oldest first; only ``username``'s when given."""
        return [r for r in self._records.values() if username is None or r.username == username]

    def count_for(self, username: str) -> int:
        return sum(1 for r in self._records.values() if r.username == username)

    async def create(self, username: str, scope: Scope, expires_in: int | None = None) -> NewToken:
        """A new token; ``expires_in`` seconds from now it stops working (None: never)."""
        if expires_in is not None and not MIN_EXPIRES_IN <= expires_in <= MAX_EXPIRES_IN:
            raise ValueError(
                f"expires_in must be from {MIN_EXPIRES_IN} to {MAX_EXPIRES_IN} seconds, "
                f"not {expires_in}"
            )
        token_id = secrets.token_hex(8)
        while token_id in self._records:
            token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)  # 256 bits; URL-safe for ?token=
        now = self._wall_clock()
        expires_at = None
        if expires_in is not None:
            expires_at = format_time(now + timedelta(seconds=expires_in))
        record = TokenRecord(
            token_id, username, scope, format_time(now), _digest(secret), expires_at
        )
        async with self._lock:
            records = {**self._records, token_id: record}
            await self._save(records)
            self._records = records
        if expires_at is not None:
            self._expiry_changed.set()
        log.info(
            "token %s created for %s (scope %s, expires %s)",
            token_id,
            username,
            scope,
            expires_at or "never",
        )
        return NewToken(record, f"{TOKEN_PREFIX}_{token_id}_{secret}")

    async def revoke(self, token_id: str) -> bool:
        async with self._lock:
            if token_id not in self._records:
                return False
            records = {k: v for k, v in self._records.items() if k != token_id}
            await self._save(records)
            self._records = records
        log.info("token %s revoked", token_id)
        for listener in self._revoked_listeners:
            listener(token_id)
        return True

    async def serve_expiry(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Remove each token when it expires (those expired while the daemon was down at
        once) and tell the ``on_expired`` listeners; runs until cancelled."""
        task_status.started()
        while True:
            await self._expire_due()
            self._expiry_changed = trio.Event()
            # A token created meanwhile may expire sooner: its creation wakes this.
            with trio.move_on_after(self._seconds_to_next_expiry()):
                await self._expiry_changed.wait()

    def _seconds_to_next_expiry(self) -> float:
        pending = [parse_time(r.expires_at) for r in self._records.values() if r.expires_at]
        if not pending:
            return math.inf
        delay = (min(pending) - self._wall_clock()).total_seconds()
        return min(max(delay, 0.0), MAX_EXPIRY_SLEEP)

    async def _expire_due(self) -> None:
        now = self._wall_clock()
        due = [r.id for r in self._records.values() if r.expired(now)]
        # Connections close first, on time; verify() refuses the token meanwhile anyway.
        for token_id in due:
            log.info("token %s expired", token_id)
            for listener in self._expired_listeners:
                listener(token_id)
        if not due:
            return
        async with self._lock:
            # A revoke may have taken one while this waited for the lock.
            records = {k: v for k, v in self._records.items() if k not in due}
            await self._save(records)
            self._records = records

    async def _save(self, records: dict[str, TokenRecord]) -> None:
        document = {
            "version": FILE_VERSION,
            "tokens": [attrs.asdict(record) for record in records.values()],
        }
        data = (json.dumps(document, indent=1) + "\n").encode()
        # A cancelled caller must not leave memory and file disagreeing.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_write_atomically, self.path, data)


def _load(path: Path) -> list[TokenRecord]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StartupError(f"tokens: cannot read {path}: {exc.strerror}") from None
    try:
        document = json.loads(text)
        if document.get("version") != FILE_VERSION:
            raise ValueError(f"version must be {FILE_VERSION}, not {document.get('version')!r}")
        records = []
        for entry in document["tokens"]:
            record = TokenRecord(**entry)
            if record.scope not in SCOPES:
                raise ValueError(f"scope must be read or control, not {record.scope!r}")
            if record.expires_at is not None:
                parse_time(record.expires_at)
            records.append(record)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        # Refuse to start rather than overwrite the file at the next token.
        raise StartupError(f"tokens: {path} is damaged ({exc}); fix or remove it") from None
    return records


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    # The rename is durable only once the directory entry is.
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
