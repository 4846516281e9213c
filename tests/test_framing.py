"""Line framing: split points, the byte limit, and arbitrary chunking."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from statusd.protocol.framing import LineDecoder, LineTooLong


def test_splits_lines_and_keeps_partial() -> None:
    decoder = LineDecoder(100)
    assert decoder.feed(b'{"a":1}\n{"b"') == [b'{"a":1}']
    assert decoder.pending_bytes == 4
    assert decoder.feed(b":2}\r\n\n  \n") == [b'{"b":2}']
    assert decoder.pending_bytes == 0


def test_line_at_the_limit_is_accepted() -> None:
    decoder = LineDecoder(10)
    assert decoder.feed(b"x" * 10 + b"\n") == [b"x" * 10]


def test_complete_line_over_the_limit_is_refused() -> None:
    decoder = LineDecoder(10)
    with pytest.raises(LineTooLong, match="exceeds 10 bytes"):
        decoder.feed(b"x" * 11 + b"\n")


def test_partial_line_over_the_limit_is_refused_before_the_newline() -> None:
    decoder = LineDecoder(10)
    decoder.feed(b"x" * 6)
    with pytest.raises(LineTooLong):
        decoder.feed(b"x" * 6)


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_line_bytes must be >= 1, not 0"):
        LineDecoder(0)


@given(
    lines=st.lists(st.binary(max_size=50).map(lambda b: b.replace(b"\n", b"")), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
)
def test_any_chunking_gives_the_same_lines(lines: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    decoder = LineDecoder(100)
    got: list[bytes] = []
    previous = 0
    for cut in [*sorted(c % (len(stream) + 1) for c in cuts), len(stream)]:
        got.extend(decoder.feed(stream[previous:cut]))
        previous = cut
    expected = [line.removesuffix(b"\r") for line in lines if line.removesuffix(b"\r").strip()]
    assert got == expected
