"""WebSocket access tokens: minted over the Unix socket, checked at each WebSocket handshake.

A token reads ``sdt_<token_id>_<secret>``: the id says which record to look at, the secret
is 256 random bits. Only ``sha256(secret)`` is kept, in ``tokens.json`` in the state
directory (mode 0600, replaced atomically: temporary file, fsync, rename, directory fsync),
so the file leaks nothing that opens a connection. A plain, fast hash is the right one here:
slow password hashes (bcrypt, scrypt) exist to make guessing low-entropy passwords
expensive, and nobody guesses 256 random bits; a slow hash would only cost CPU at every
handshake. Secrets are compared in constant time (``hmac.compare_digest``).

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
import os
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
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

    def describe(self) -> dict[str, Any]:
        """What ``tokens.list`` shows: never the hash."""
        return {
            "token_id": self.id,
            "username": self.username,
            "scope": self.scope,
            "created_at": self.created_at,
        }


@attrs.frozen
class NewToken:
    record: TokenRecord
    token: str  # shown once, to whoever created it


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _now() -> str:
    now = datetime.now(UTC)
    return now.isoformat(timespec="milliseconds")[:-6] + "Z"


def split_token(token: str) -> tuple[str, str] | None:
    """(token_id, secret), or None if ``token`` is not shaped like one of ours."""
    prefix, _, rest = token.partition("_")
    token_id, _, secret = rest.partition("_")
    if prefix != TOKEN_PREFIX or not token_id or not secret:
        return None
    return token_id, secret


Revoked = Callable[[str], None]


class TokenStore:
    """The tokens in memory and in ``tokens.json``; every change is written before it is
    reported, one write at a time."""

    def __init__(self, path: Path, records: list[TokenRecord] | None = None) -> None:
        self.path = path
        self._records: dict[str, TokenRecord] = {r.id: r for r in records or ()}
        self._lock = trio.Lock()
        self._revoked_listeners: list[Revoked] = []

    @classmethod
    async def open(cls, path: Path) -> TokenStore:
        return cls(path, await trio.to_thread.run_sync(_load, path))

    def __len__(self) -> int:
        return len(self._records)

    def on_revoked(self, listener: Revoked) -> None:
        """Call ``listener(token_id)`` (synchronously, must not raise) after a revoke."""
        self._revoked_listeners.append(listener)

    def verify(self, token: str) -> TokenRecord | None:
        """The record of a valid token, or None; takes the same time for any wrong secret."""
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
        return record

    def get(self, token_id: str) -> TokenRecord | None:
        return self._records.get(token_id)

    def records(self, username: str | None = None) -> list[TokenRecord]:
        """Oldest first; only ``username``'s when given."""
        return [r for r in self._records.values() if username is None or r.username == username]

    def count_for(self, username: str) -> int:
        return sum(1 for r in self._records.values() if r.username == username)

    async def create(self, username: str, scope: Scope) -> NewToken:
        token_id = secrets.token_hex(8)
        while token_id in self._records:
            token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)  # 256 bits; URL-safe for ?token=
        record = TokenRecord(token_id, username, scope, _now(), _digest(secret))
        async with self._lock:
            records = {**self._records, token_id: record}
            await self._save(records)
            self._records = records
        log.info("token %s created for %s (scope %s)", token_id, username, scope)
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
