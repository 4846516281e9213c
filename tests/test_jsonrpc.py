"""JSON-RPC 2.0 parsing: every way a request can be malformed, answered by the spec."""

from __future__ import annotations

import json

import pytest

from statusd import errors
from statusd.protocol import jsonrpc


def only(raw: bytes | str) -> jsonrpc.Entry:
    incoming = jsonrpc.parse_message(raw)
    assert not incoming.batch
    (entry,) = incoming.entries
    return entry


def error_code(entry: jsonrpc.Entry) -> int:
    assert isinstance(entry, jsonrpc.Invalid)
    return entry.error.code


def test_request_with_params() -> None:
    entry = only(b'{"jsonrpc":"2.0","id":7,"method":"status.recent","params":{"since":3}}')
    assert entry == jsonrpc.Request("status.recent", {"since": 3}, 7)


def test_notification_has_no_id() -> None:
    entry = only('{"jsonrpc":"2.0","method":"daemon.info"}')
    assert isinstance(entry, jsonrpc.Request)
    assert entry.notification
    assert entry.params == {}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "invalid json"),
        (b"\xff\xfe{}", "invalid utf-8"),
        (b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"n":NaN}}', "NaN is not valid"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid json"),
    ],
)
def test_parse_errors(raw: bytes, message: str) -> None:
    with pytest.raises(errors.ParseError, match=message):
        jsonrpc.parse_message(raw)


@pytest.mark.parametrize(
    ("raw", "code", "request_id"),
    [
        ('{"jsonrpc":"2.0","id":1}', errors.INVALID_REQUEST, 1),
        ('{"jsonrpc":"2.0","id":1,"method":5}', errors.INVALID_REQUEST, 1),
        ('{"id":1,"method":"daemon.info"}', errors.INVALID_REQUEST, 1),
        ('{"jsonrpc":"1.0","id":1,"method":"daemon.info"}', errors.INVALID_REQUEST, 1),
        ('{"jsonrpc":"2.0","id":true,"method":"daemon.info"}', errors.INVALID_REQUEST, None),
        ('{"jsonrpc":"2.0","id":[1],"method":"daemon.info"}', errors.INVALID_REQUEST, None),
        ('{"jsonrpc":"2.0","id":1,"method":"a","extra":1}', errors.INVALID_REQUEST, 1),
        ('{"jsonrpc":"2.0","id":"x","method":"a","params":[1]}', errors.INVALID_PARAMS, "x"),
        ('{"jsonrpc":"2.0","id":"x","method":"a","params":"s"}', errors.INVALID_PARAMS, "x"),
        ("5", errors.INVALID_REQUEST, None),
        ('"text"', errors.INVALID_REQUEST, None),
    ],
)
def test_invalid_requests(raw: str, code: int, request_id: jsonrpc.RequestId) -> None:
    entry = only(raw)
    assert error_code(entry) == code
    assert entry.id == request_id


def test_empty_batch_is_one_invalid_request() -> None:
    incoming = jsonrpc.parse_message("[]")
    assert not incoming.batch
    assert [error_code(e) for e in incoming.entries] == [errors.INVALID_REQUEST]


def test_batch_mixes_good_and_bad_entries() -> None:
    incoming = jsonrpc.parse_message(
        '[{"jsonrpc":"2.0","id":1,"method":"a"}, 1, {"jsonrpc":"2.0","method":"b"}]'
    )
    assert incoming.batch
    first, second, third = incoming.entries
    assert isinstance(first, jsonrpc.Request)
    assert error_code(second) == errors.INVALID_REQUEST
    assert isinstance(third, jsonrpc.Request)
    assert third.notification


def test_encode_line_is_compact_utf8_with_newline() -> None:
    line = jsonrpc.encode_line(jsonrpc.result_response(1, {"m": "été"}))
    assert line == '{"jsonrpc":"2.0","id":1,"result":{"m":"été"}}\n'.encode()


def test_error_response_carries_data() -> None:
    response = jsonrpc.error_response(3, errors.InvalidParams("level", "must be one of x"))
    assert response["error"] == {
        "code": -32602,
        "message": "level: must be one of x",
        "data": {"field": "level", "reason": "must be one of x"},
    }


# -- text no UTF-8 can carry -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "code", "request_id", "field"),
    [
        (rb'{"jsonrpc":"2.0","id":"\ud800","method":"a"}', errors.INVALID_REQUEST, None, None),
        (rb'{"jsonrpc":"2.0","id":"x\uDBFF","method":"a"}', errors.INVALID_REQUEST, None, None),
        (rb'{"jsonrpc":"2.0","id":2,"method":"a\udc00"}', errors.INVALID_REQUEST, 2, None),
        (rb'{"jsonrpc":"2.0","id":2,"method":"a","\ud800":1}', errors.INVALID_REQUEST, 2, None),
        (rb'{"jsonrpc":"2.0","id":3,"method":"a","params":{"t":"\ud800"}}', -32602, 3, "t"),
        (rb'{"jsonrpc":"2.0","id":3,"method":"a","params":{"\udfff":1}}', -32602, 3, r"\udfff"),
        (
            rb'{"jsonrpc":"2.0","id":3,"method":"a","params":{"i":[{"u":"ok"},{"u":"\ud800"}]}}',
            errors.INVALID_PARAMS,
            3,
            "i[1].u",
        ),
        (
            rb'{"jsonrpc":"2.0","id":3,"method":"a","params":{"h":{"k\ud800":"v"}}}',
            errors.INVALID_PARAMS,
            3,
            r"h.k\ud800",
        ),
    ],
)
def test_lone_surrogates_are_refused_naming_where(
    raw: bytes, code: int, request_id: jsonrpc.RequestId, field: str | None
) -> None:
    for message in (raw, raw.decode()):  # bytes from the socket, text from a WebSocket
        entry = only(message)
        assert isinstance(entry, jsonrpc.Invalid)
        assert entry.error.code == code
        assert entry.id == request_id
        assert "lone surrogate" in entry.error.message
        if field is not None:
            assert entry.error.data["field"] == field
        # The answer itself is plain UTF-8.
        jsonrpc.encode_line(jsonrpc.error_response(entry.id, entry.error)).decode()


@pytest.mark.parametrize(
    "text",
    [
        r"\ud83d\ude00",  # a pair: one character
        r"\\ud800",  # an escaped backslash, then the letters u, d, 8, 0, 0
        "plain",
    ],
)
def test_text_that_is_unicode_is_accepted(text: str) -> None:
    raw = '{"jsonrpc":"2.0","id":"' + text + '","method":"a","params":{"m":"' + text + '"}}'
    entry = only(raw.encode())
    assert isinstance(entry, jsonrpc.Request)
    assert entry.id == entry.params["m"] == json.loads(f'"{text}"')


def test_surrogate_scan_only_fires_on_escapes() -> None:
    assert not jsonrpc.may_hold_surrogate(b'{"a":"\xf0\x9f\x98\x80 \\u00e9"}')
    assert jsonrpc.may_hold_surrogate(b'{"a":"\\uDc00"}')
    assert jsonrpc.may_hold_surrogate('{"a":"\ud800"}')  # a raw one in text from elsewhere


@pytest.mark.parametrize("raw", [b"1e999", b"[-1e400]", b'{"a":1E+999}'])
def test_numbers_past_a_double_are_parse_errors(raw: bytes) -> None:
    with pytest.raises(errors.ParseError, match="out of range"):
        jsonrpc.parse_message(raw)
