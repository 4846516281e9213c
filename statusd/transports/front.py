"""The plain-HTTP front of the WebSocket listener: read a request's head, serve the
dashboard's files, and hand WebSocket upgrades on to trio-websocket with the bytes read.

trio-websocket (through wsproto) answers any request that is not an upgrade with 400, so
the head is read here first with h11; an upgrade goes on through ``Replayed``, a stream
that gives trio-websocket the bytes already read before the socket's own. The rules (which
paths, which headers) are in ``statusd.protocol.web``; this module is the I/O.
"""

from __future__ import annotations

import importlib.resources

import attrs
import h11
import trio

from statusd.protocol.web import ASSETS

# As h11's own default, and what wsproto allows a handshake's head.
MAX_HEAD_BYTES = 16 * 1024


def load_files() -> dict[str, bytes]:
    """The dashboard's files from the package (blocking: call it in a thread, once)."""
    package = importlib.resources.files("statusd.web")
    names = {asset.resource for asset in ASSETS.values()}
    return {name: package.joinpath(name).read_bytes() for name in names}


@attrs.frozen
class Head:
    request: h11.Request | None  # None: not a request h11 could read (trio-websocket says why)
    data: bytes  # everything read from the socket so far


async def read_head(stream: trio.abc.ReceiveStream) -> Head:
    """Read until a request's head is complete, the peer stops, or h11 refuses it."""
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    data = b""
    while True:
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError:
            return Head(None, data)
        if isinstance(event, h11.Request):
            return Head(event, data)
        if event is not h11.NEED_DATA or len(data) > MAX_HEAD_BYTES:
            return Head(None, data)
        chunk = bytes(await stream.receive_some(MAX_HEAD_BYTES))
        data += chunk
        parser.receive_data(chunk)
        if not chunk:
            return Head(None, data)


class Replayed(trio.abc.Stream):
    """``stream`` with ``data`` put back in front of what it has not yet received."""

    def __init__(self, stream: trio.SocketStream, data: bytes) -> None:
        self.stream = stream
        self._data = data

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._data:
            size = len(self._data) if max_bytes is None else max_bytes
            chunk, self._data = self._data[:size], self._data[size:]
            await trio.lowlevel.checkpoint()
            return chunk
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()
