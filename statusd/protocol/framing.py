"""Newline-delimited framing with a hard per-line byte limit.

Pure and incremental: ``feed()`` takes whatever ``receive_some()`` returned and hands back
the complete lines. A line that grows past the limit raises ``LineTooLong`` as soon as the
limit is crossed, so a peer can never make us buffer more than ``max_line_bytes``.
"""

from __future__ import annotations

import attrs

MAX_LINE_BYTES = 1024 * 1024


class LineTooLong(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"line exceeds {limit} bytes")
        self.limit = limit


@attrs.define
class LineDecoder:
    """Split a byte stream at ``\\n``; lines keep no terminator and a trailing ``\\r`` goes."""

    max_line_bytes: int = MAX_LINE_BYTES
    _buffer: bytearray = attrs.field(factory=bytearray, init=False)
    # Where the next search for b"\n" starts: scanning the same partial line again for every
    # chunk would make a slowly sent 1 MiB line quadratic.
    _scanned: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        if self.max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be >= 1, not {self.max_line_bytes}")

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        lines: list[bytes] = []
        start = 0
        buffer = self._buffer
        search_from = self._scanned
        while True:
            end = buffer.find(b"\n", search_from)
            if end < 0:
                break
            if end - start > self.max_line_bytes:
                raise LineTooLong(self.max_line_bytes)
            line = bytes(buffer[start:end])
            if line.endswith(b"\r"):
                line = line[:-1]
            if line.strip():
                lines.append(line)
            start = search_from = end + 1
        if start:
            del buffer[:start]
        self._scanned = len(buffer)
        if len(buffer) > self.max_line_bytes:
            raise LineTooLong(self.max_line_bytes)
        return lines

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete line held so far."""
        return len(self._buffer)
