"""Pure WebSocket rules: handshake checks, routes, frames, and the seed's message types.

- ``check_single``, ``check_host``, ``check_origin``, ``bearer_token`` and ``route`` look
  at a handshake's parts and say what to refuse and why, before anything is accepted;
  ``busy_response`` is the 503 for a connection refused before its request is read;
  ``is_loopback`` says whether a listen address is reachable from this machine only;
- ``frames`` turns a session's pending lines into text frames (one message each, or
  several as one JSON array);
- the rest builds and parses the seed's messages for ``/ws/bulk-process/{job_id}`` and
  ``/ws/progress/{topic_id}`` (``connected``, ``ping``/``pong``, ``get_status``/
  ``status_request``, ``subscribe_job``, ``error``).

No trio, no sockets, no trio-websocket: strings and bytes in, values out.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Sequence
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import h11

from statusd.errors import ParseError
from statusd.protocol import jsonrpc

# A coalesced frame grows to at most this many bytes of JSON (one bigger message is sent
# alone). Clients' default limits are 1 MiB (the websockets package, browsers more).
MAX_FRAME_BYTES = 256 * 1024
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


@attrs.frozen
class Refusal:
    """An HTTP answer instead of the upgrade: 401, 403, 404."""

    status: int
    message: str


def host_name(header: str) -> str | None:
    """The host part of a Host header (``[::1]:8765`` -> ``::1``), lower-case without a
    trailing dot; None if the header is malformed (a bad port, an open bracket)."""
    value = header.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
    else:
        name, colon, port = value.partition(":")
        if colon and not port.isdigit():
            return None
    name = name.removesuffix(".")
    return name or None


def check_host(header: str | None, allowed: Iterable[str]) -> Refusal | None:
    """Refuse a Host that is not ours (DNS rebinding: a page on attacker.example whose
    name now resolves to 127.0.0.1 sends ``Host: attacker.example``). Only the name is
    compared: a port forwarded elsewhere still names this host."""
    name = host_name(header) if header is not None else None
    if name is None or name not in {*LOCAL_HOSTS, *(host.lower() for host in allowed)}:
        return Refusal(403, f"host {header!r} is not allowed (use localhost or the listen address)")
    return None


def check_single(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> Refusal | None:
    """Refuse a request that carries header ``name`` more than once: which of two Origins
    a check reads, and which one a proxy in front read, is a guess an attacker can win.
    (Two Hosts never get this far: h11 refuses them.)"""
    count = sum(1 for header, _ in headers if header.lower() == name)
    if count > 1:
        shown = name.decode("latin-1").title()
        return Refusal(400, f"{count} {shown} headers: a request may carry at most one")
    return None


def is_loopback(host: str) -> bool:
    """Whether a listen address only this machine can reach: 127.0.0.0/8, ::1, an
    IPv4-mapped loopback, or ``localhost``. ``0.0.0.0``, ``::`` and names are not."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def busy_response(message: str) -> bytes:
    """A whole ``503 Service Unavailable`` response that closes the connection, to send
    before the request is read."""
    body = (message + "\n").encode()
    server = h11.Connection(h11.SERVER)
    head = h11.Response(
        status_code=503,
        reason=b"Service Unavailable",
        headers=[
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            (b"retry-after", b"1"),
        ],
    )
    return b"".join(
        server.send(event) or b"" for event in (head, h11.Data(data=body), h11.EndOfMessage())
    )


def check_origin(origin: str | None, allowed: Sequence[str]) -> Refusal | None:
    """Refuse a browser page from an origin not in ``allowed_origins``; a client that is
    not a browser sends no Origin and is let through to the token check."""
    if origin is None:
        return None
    if normalize_origin(origin) not in allowed:
        return Refusal(403, f"origin {origin!r} is not in websocket.allowed_origins")
    return None


def normalize_origin(origin: str) -> str:
    """As config.py keeps ``allowed_origins``: lower-case, no default port, no slash."""
    value = origin.strip().lower().removesuffix("/")
    scheme, _, rest = value.partition("://")
    default = {"http": ":80", "https": ":443"}.get(scheme)
    if default and rest.endswith(default):
        value = value[: -len(default)]
    return value


def bearer_token(headers: Sequence[tuple[bytes, bytes]], query: dict[str, list[str]]) -> str | None:
    """The token from ``Authorization: Bearer T``, else from ``?token=T`` (browsers cannot
    set headers on a WebSocket)."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    tokens = query.get("token")
    return tokens[0] if tokens else None


@attrs.frozen
class Route:
    kind: Literal["rpc", "job", "topic"]
    ident: str | None  # the job id or the topic id
    query: dict[str, list[str]]

    @property
    def coalesce(self) -> bool:
        """Several pending messages in one frame, as a JSON array: ``/ws?coalesce=1``."""
        return self.kind == "rpc" and self.query.get("coalesce", ["0"])[0] in ("1", "true")


def query_of(target: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(target).query)


def route(target: str) -> Route | Refusal:
    parts = urlsplit(target)
    query = parse_qs(parts.query)
    path = parts.path.rstrip("/")
    if path == "/ws":
        return Route("rpc", None, query)
    for prefix, kind in (("/ws/bulk-process/", "job"), ("/ws/progress/", "topic")):
        if path.startswith(prefix):
            ident = unquote(path[len(prefix) :])
            if ident and "/" not in ident:
                return Route(kind, ident, query)  # type: ignore[arg-type]
    return Refusal(
        404, f"no such path {parts.path!r}: /ws, /ws/bulk-process/ID, /ws/progress/TOPIC"
    )


# -- frames ----------------------------------------------------------------------------------

_TEXT = 0x81  # FIN + text opcode
_SHORT_HEADERS = [bytes((_TEXT, size)) for size in range(126)]


def text_frame_header(size: int) -> bytes:
    """The header of an unmasked, unfragmented text frame of ``size`` payload bytes
    (RFC 6455 section 5.2). Server frames carry no mask, so a message's frame is the same
    bytes for every client. wsproto would build the same header, but only from a ``str``
    it encodes and copies again; the daemon's messages are UTF-8 bytes already."""
    if size < 126:
        return _SHORT_HEADERS[size]
    if size < 65536:
        return bytes((_TEXT, 126)) + size.to_bytes(2, "big")
    return bytes((_TEXT, 127)) + size.to_bytes(8, "big")


def payloads(lines: Sequence[bytes], coalesce: bool, limit: int = MAX_FRAME_BYTES) -> list[bytes]:
    """The text payloads for a session's pending lines (each ends with ``\\n``), in order.

    Without ``coalesce``, or with one line, one payload per line, its newline cut. With it,
    the lines go out as JSON arrays of up to ``limit`` bytes. Inside an array each element
    keeps its newline (whitespace, which JSON allows between values), so the array is one
    C-speed join of the shared lines; a batch answer (itself an array) is spliced in flat,
    so an array frame is always a flat list of JSON-RPC objects.
    """
    if not coalesce or len(lines) == 1:
        return [line[:-1] for line in lines]
    joined = b",".join(lines)
    # Every line ends with a newline and JSON strings cannot hold a raw one, so a batch
    # answer starts the text or follows "\\n,".
    if len(joined) + 2 <= limit and not (joined.startswith(b"[") or b"\n,[" in joined):
        return [b"[" + joined + b"]"]
    out: list[bytes] = []
    start = 0
    size = 0
    for index, line in enumerate(lines):
        if index > start and size + len(line) > limit:
            out.append(_array(lines[start:index]))
            start, size = index, 0
        size += len(line)
    out.append(_array(lines[start:]))
    return out


def _array(group: Sequence[bytes]) -> bytes:
    if len(group) == 1:
        return group[0][:-1]
    parts = [line[1:-2] if line.startswith(b"[") else line for line in group]
    return b"[" + b",".join(parts) + b"]"


class FrameCache:
    """Frames built once for every client they go to: each single message's frame, and
    the frames of a whole batch of pending lines.

    A message's frame is keyed by the line itself: the daemon hands every subscriber the
    same ``bytes`` object, whose hash Python computes once, so a hit costs a dict lookup.
    A batch is keyed by the tuple of its lines: subscribers that the same publish woke
    take the same lines from the channel, so the first builds the frames (the array's
    join, the scan for batch answers, the header) and the other 99 get the same bytes for
    a tuple's hash and an identity compare per line. Past ``capacity`` messages or
    ``batches`` batches, or ``max_bytes`` bytes of either, that part of the cache starts
    afresh: what is current is rebuilt once; what is old is never asked for again. The
    bytes bound it for answers too (each one's own, never shared, and as big as
    ``limits.max_reply_bytes``); one bigger than ``max_bytes`` is built and not kept.
    """

    def __init__(
        self, capacity: int = 4096, *, batches: int = 16, max_bytes: int = 4 * 1024 * 1024
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, not {capacity}")
        if batches < 1:
            raise ValueError(f"batches must be >= 1, not {batches}")
        self._capacity = capacity
        self._max_batches = batches
        self._max_bytes = max_bytes
        self._frames: dict[bytes, bytes] = {}
        self._frame_bytes = 0
        # Keyed by (coalesce, limit) too: one client's arrays are another's single frames.
        self._batches: dict[tuple[bool, int, tuple[bytes, ...]], bytes] = {}
        self._batch_bytes = 0

    def frame(self, line: bytes) -> bytes:
        frame = self._frames.get(line)
        if frame is None:
            frame = text_frame_header(len(line) - 1) + line[:-1]
            if (
                len(self._frames) >= self._capacity
                or self._frame_bytes + len(frame) > self._max_bytes
            ):
                self._frames.clear()
                self._frame_bytes = 0
            if len(frame) <= self._max_bytes:
                self._frames[line] = frame
                self._frame_bytes += len(frame)
        return frame

    def batch(self, lines: Sequence[bytes], coalesce: bool, limit: int) -> bytes:
        """The frames of several lines, as ``encode_frames`` says."""
        key = (coalesce, limit, tuple(lines))
        data = self._batches.get(key)
        if data is None:
            data = _encode_batch(lines, coalesce, self, limit)
            if (
                len(self._batches) >= self._max_batches
                or self._batch_bytes + len(data) > self._max_bytes
            ):
                self._batches.clear()
                self._batch_bytes = 0
            if len(data) <= self._max_bytes:
                self._batches[key] = data
                self._batch_bytes += len(data)
        return data

    @property
    def size_bytes(self) -> int:
        """The bytes of frames held."""
        return self._frame_bytes + self._batch_bytes

    def __len__(self) -> int:
        return len(self._frames)


def encode_frames(
    lines: Sequence[bytes], coalesce: bool, cache: FrameCache, limit: int = MAX_FRAME_BYTES
) -> bytes:
    """Everything pending, as the bytes of consecutive text frames, for one write. The
    same lines give the same bytes (server frames carry no mask), built once in
    ``cache``."""
    if not lines:
        return b""
    if len(lines) == 1:
        return cache.frame(lines[0])
    return cache.batch(lines, coalesce, limit)


def _encode_batch(lines: Sequence[bytes], coalesce: bool, cache: FrameCache, limit: int) -> bytes:
    if not coalesce:
        frame = cache.frame
        return b"".join([frame(line) for line in lines])
    framed: list[bytes] = []
    for payload in payloads(lines, True, limit):
        framed.append(text_frame_header(len(payload)))
        framed.append(payload)
    return b"".join(framed)


# -- the seed's messages ---------------------------------------------------------------------


@attrs.frozen
class Ping:
    pass


@attrs.frozen
class GetStatus:
    job_id: str | None


@attrs.frozen
class SubscribeJob:
    job_id: str


@attrs.frozen
class BadMessage:
    message: str


SeedRequest = Ping | GetStatus | SubscribeJob | BadMessage
SEED_TYPES = {"job": ("ping", "get_status"), "topic": ("ping", "get_status", "subscribe_job")}


def parse_seed(raw: str | bytes, kind: Literal["job", "topic"]) -> SeedRequest:
    """One client message on a seed endpoint; what is wrong with it is a ``BadMessage``,
    answered with an ``error`` message (the connection stays)."""
    try:
        value = jsonrpc.loads(raw)
    except ParseError as exc:
        return BadMessage(f"message is not valid JSON: {exc.message}")
    if not isinstance(value, dict):
        return BadMessage("message must be a JSON object with a type")
    kind_of = value.get("type")
    allowed = SEED_TYPES[kind]
    if kind_of not in allowed:
        return BadMessage(f"unknown message type {kind_of!r}: expected {', '.join(allowed)}")
    job_id = value.get("job_id")
    if job_id is not None and not isinstance(job_id, str):
        return BadMessage(f"job_id must be a string, not {json.dumps(job_id)[:40]}")
    if job_id is not None and jsonrpc.has_lone_surrogate(job_id):
        return BadMessage(
            f"job_id must not hold a lone surrogate: {jsonrpc.escape_surrogates(job_id)!r}"
        )
    if kind_of == "ping":
        return Ping()
    if kind_of == "get_status":
        return GetStatus(job_id)
    if job_id is None:
        return BadMessage("subscribe_job needs a job_id")
    return SubscribeJob(job_id)


def seed_message(kind: str, timestamp: str, **fields: Any) -> dict[str, Any]:
    """The seed's envelope: ``{type, timestamp, ...}``."""
    return {"type": kind, "timestamp": timestamp, **fields}
