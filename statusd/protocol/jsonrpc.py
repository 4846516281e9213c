"""JSON-RPC 2.0 messages: parse one line into requests, build and encode responses.

Pure. The rules follow the JSON-RPC 2.0 specification: a batch is a non-empty array; an
entry without ``id`` is a notification and gets no response; an error found before the
``id`` could be read is answered with ``"id": null``. Params must be an object (by-name),
since every statusd method takes named fields.

Text on the wire is Unicode in both directions. A request holding a lone surrogate (a
``\\ud800`` escape without its pair: valid JSON, but no UTF-8 can carry it) is refused
naming where it is; a reply that would hold one (a string from elsewhere, such as a file
name that is not UTF-8) carries U+FFFD in its place, and a number JSON cannot write (NaN,
infinity) goes out as null. ``encode_line`` never raises for a response.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from statusd.errors import InternalError, InvalidParams, InvalidRequest, ParseError, RpcError

JSONRPC_VERSION = "2.0"

RequestId = str | int | None


@attrs.frozen
class Request:
    method: str
    params: Mapping[str, Any]
    id: RequestId
    # True when the request had no "id" member: it is run, but never answered.
    notification: bool = False


@attrs.frozen
class Invalid:
    """An entry that could not become a ``Request``; answered with its error."""

    error: RpcError
    id: RequestId = None


Entry = Request | Invalid


@attrs.frozen
class Incoming:
    entries: tuple[Entry, ...]
    batch: bool


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_float(text: str) -> float:
    # float("1e999") is infinity, which JSON cannot write back: refuse it here rather
    # than carry a value every later encode would have to work around.
    value = float(text)
    if math.isinf(value):
        shown = text if len(text) <= 24 else text[:21] + "..."
        raise ValueError(f"number {shown} is out of range")
    return value


# json.loads/json.dumps with any non-default argument build a new decoder/encoder on
# every call; these are built once.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_parse_float)
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _make_encode() -> Callable[[Any], str]:
    """``_ENCODER.encode``, less the C encoder it builds again for every message (2-3 us of
    a ``daemon.info`` answer's ~13 us in process). The C encoder keeps no state between
    calls when it tracks no markers: a reference cycle, which no statusd message has,
    then ends in RecursionError instead of ValueError, and ``encode_line`` handles both."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # a Python built without the _json accelerator
        return _ENCODER.encode
    chunks = make(
        None,
        _ENCODER.default,
        json.encoder.encode_basestring,
        None,
        _ENCODER.key_separator,
        _ENCODER.item_separator,
        False,
        False,
        False,
    )

    def encode(message: Any) -> str:
        return "".join(chunks(message, 0))

    return encode


_encode = _make_encode()

# Strict UTF-8 decoding refuses a raw surrogate, so in bytes a lone one can only arrive
# as a \uD800-\uDFFF escape. Only a message holding such an escape (a valid pair, or an
# escaped backslash followed by "ud8", also matches) has its strings walked; every other
# message costs one C-speed scan.
_SURROGATE_ESCAPE_BYTES = re.compile(rb"\\u[dD][89abcdefABCDEF]")
_SURROGATE_ESCAPE_TEXT = re.compile(r"\\u[dD][89abcdefABCDEF]")
# json.loads joins an escaped pair into one code point, so any surrogate left is lone.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def loads(raw: bytes | str) -> Any:
    """Strict JSON: UTF-8 only, and no NaN/Infinity (which JSON does not have)."""
    if isinstance(raw, bytes | bytearray):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParseError(f"invalid utf-8 at byte {exc.start}") from None
    else:
        text = raw
    try:
        return _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise ParseError(f"invalid json: {exc}") from None


def may_hold_surrogate(raw: bytes | str) -> bool:
    """False when no string parsed from ``raw`` can hold a lone surrogate."""
    if isinstance(raw, str):
        # Text from a WebSocket frame was strictly decoded too; text from elsewhere may
        # hold a raw surrogate, which the second scan finds.
        return bool(_SURROGATE_ESCAPE_TEXT.search(raw) or _LONE_SURROGATE.search(raw))
    return _SURROGATE_ESCAPE_BYTES.search(raw) is not None


def parse_message(raw: bytes | str) -> Incoming:
    """Parse one framed message. Raises ``ParseError`` if it is not JSON at all."""
    value = loads(raw)
    suspect = may_hold_surrogate(raw)
    if isinstance(value, list):
        if not value:
            return Incoming((Invalid(InvalidRequest("empty batch")),), batch=False)
        return Incoming(tuple(_parse_entry(item, suspect) for item in value), batch=True)
    return Incoming((_parse_entry(value, suspect),), batch=False)


def _valid_id(value: Any) -> bool:
    # Numbers should not have fractional parts (spec, section 4); bools are not numbers.
    return value is None or (isinstance(value, str | int) and not isinstance(value, bool))


def _parse_entry(value: Any, suspect: bool = False) -> Entry:
    """One request object; ``suspect``: its strings may hold a lone surrogate."""
    if not isinstance(value, dict):
        return Invalid(InvalidRequest(f"request must be an object, not {_json_type(value)}"))
    has_id = "id" in value
    request_id = value.get("id")
    if not _valid_id(request_id):
        return Invalid(InvalidRequest("id must be a string, an integer or null"))
    if suspect and isinstance(request_id, str) and _LONE_SURROGATE.search(request_id):
        # The id cannot be echoed: no UTF-8 can carry it.
        return Invalid(InvalidRequest(f"id {_SURROGATE_PROBLEM} ({_first_surrogate(request_id)})"))
    if value.get("jsonrpc") != JSONRPC_VERSION:
        return Invalid(InvalidRequest('jsonrpc must be "2.0"'), request_id)
    method = value.get("method")
    if method is None:
        return Invalid(InvalidRequest("method is missing"), request_id)
    if not isinstance(method, str):
        return Invalid(InvalidRequest("method must be a string"), request_id)
    if suspect and _LONE_SURROGATE.search(method):
        problem = f"method {_SURROGATE_PROBLEM} ({_first_surrogate(method)})"
        return Invalid(InvalidRequest(problem), request_id)
    extra = set(value) - {"jsonrpc", "method", "params", "id"}
    if extra:
        names = ", ".join(sorted(escape_surrogates(name) for name in extra))
        if suspect and any(_LONE_SURROGATE.search(name) for name in extra):
            problem = f"member names {_SURROGATE_PROBLEM} (unknown members: {names})"
            return Invalid(InvalidRequest(problem), request_id)
        return Invalid(InvalidRequest(f"unknown members: {names}"), request_id)
    params = value.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        # Positional params are legal JSON-RPC, but we cannot name a field in an error
        # about them; every statusd method takes an object.
        return Invalid(InvalidParams("params", "must be an object"), request_id)
    if suspect:
        found = _surrogate_in(params)
        if found is not None:
            return Invalid(InvalidParams(*found), request_id)
    return Request(method, params, request_id, notification=not has_id)


_SURROGATE_PROBLEM = "must not hold a lone surrogate"


def has_lone_surrogate(text: str) -> bool:
    return _LONE_SURROGATE.search(text) is not None


def escape_surrogates(text: str) -> str:
    """``text`` with each lone surrogate written as its ``\\udXXX`` escape: printable,
    and encodable as UTF-8."""
    return _LONE_SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def _first_surrogate(text: str) -> str:
    match = _LONE_SURROGATE.search(text)
    assert match is not None
    return escape_surrogates(match.group())


def _surrogate_in(params: dict[str, Any]) -> tuple[str, str] | None:
    """(field path, problem) for the first string or member name under ``params`` that
    holds a lone surrogate, in document order; None if there is none.

    Iterative: a value nested as deep as the decoder allows must not cost a RecursionError.
    """
    stack: list[tuple[str, Any]] = [("", params)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if _LONE_SURROGATE.search(value):
                return path, f"{_SURROGATE_PROBLEM} ({_first_surrogate(value)})"
        elif isinstance(value, dict):
            children: list[tuple[str, Any]] = []
            for name, child in value.items():
                field = f"{path}.{name}" if path else name
                if _LONE_SURROGATE.search(name):
                    problem = f"field name {_SURROGATE_PROBLEM} ({_first_surrogate(name)})"
                    return escape_surrogates(field), problem
                children.append((field, child))
            stack.extend(reversed(children))
        elif isinstance(value, list):
            stack.extend(reversed([(f"{path}[{i}]", child) for i, child in enumerate(value)]))
    return None


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    return "an array" if isinstance(value, list) else "an object"


def result_response(request_id: RequestId, result: Any) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC_VERSION, "id": request_id, "result": result}


def error_response(request_id: RequestId, error: RpcError) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC_VERSION, "id": request_id, "error": error.to_wire()}


def notification(method: str, params: Any) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC_VERSION, "method": method, "params": params}


def request(method: str, params: Mapping[str, Any] | None, request_id: RequestId) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": JSONRPC_VERSION, "method": method, "id": request_id}
    if params:
        message["params"] = dict(params)
    return message


def encode_line(message: Any) -> bytes:
    """One compact JSON value and a ``\\n``: the Unix socket's frame.

    Lone surrogates become U+FFFD and NaN or infinity null (see the module's docstring).
    A response (or a batch of them) that still cannot be encoded, such as a value nested
    past the encoder's recursion limit, becomes a -32603 answer to its id; any other
    message raises ``ValueError``, ``TypeError`` or ``RecursionError``.
    """
    try:
        text = _encode(message)
    except ValueError:
        # Only a non-finite float makes this encoder raise ValueError.
        try:
            text = _encode(_finite(message))
        except (ValueError, TypeError, RecursionError) as exc:
            return _unencodable(message, exc)
    except (TypeError, RecursionError) as exc:
        return _unencodable(message, exc)
    try:
        return text.encode() + b"\n"
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text).encode() + b"\n"


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (recursive: only
    called on a message that already failed, and a RecursionError here is handled)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {name: _finite(child) for name, child in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(child) for child in value]
    return value


def _is_response(message: Any) -> bool:
    return (
        isinstance(message, dict)
        and message.get("jsonrpc") == JSONRPC_VERSION
        and "id" in message
        and ("result" in message or "error" in message)
    )


def _unencodable(message: Any, exc: Exception) -> bytes:
    if isinstance(message, list) and message and all(_is_response(m) for m in message):
        # One bad answer in a batch costs that answer, not its neighbours.
        return b"[" + b",".join(encode_line(m)[:-1] for m in message) + b"]\n"
    if not _is_response(message):
        raise exc
    request_id = message["id"]
    if not _valid_id(request_id) or (
        isinstance(request_id, str) and _LONE_SURROGATE.search(request_id)
    ):
        request_id = None
    reason = type(exc).__name__
    error = InternalError(f"the reply could not be encoded ({reason})")
    return _encode(error_response(request_id, error)).encode() + b"\n"
