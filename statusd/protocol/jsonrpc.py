"""JSON-RPC 2.0 messages: parse one line into requests, build and encode responses.

Pure. The rules follow the JSON-RPC 2.0 specification: a batch is a non-empty array; an
entry without ``id`` is a notification and gets no response; an error found before the
``id`` could be read is answered with ``"id": null``. Params must be an object (by-name),
since every statusd method takes named fields.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

from statusd.errors import InvalidParams, InvalidRequest, ParseError, RpcError

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


# json.loads/json.dumps with any non-default argument build a new decoder/encoder on
# every call; these two are built once.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


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


def parse_message(raw: bytes | str) -> Incoming:
    """Parse one framed message. Raises ``ParseError`` if it is not JSON at all."""
    value = loads(raw)
    if isinstance(value, list):
        if not value:
            return Incoming((Invalid(InvalidRequest("empty batch")),), batch=False)
        return Incoming(tuple(_parse_entry(item) for item in value), batch=True)
    return Incoming((_parse_entry(value),), batch=False)


def _valid_id(value: Any) -> bool:
    # Numbers should not have fractional parts (spec, section 4); bools are not numbers.
    return value is None or (isinstance(value, str | int) and not isinstance(value, bool))


def _parse_entry(value: Any) -> Entry:
    if not isinstance(value, dict):
        return Invalid(InvalidRequest(f"request must be an object, not {_json_type(value)}"))
    has_id = "id" in value
    request_id = value.get("id")
    if not _valid_id(request_id):
        return Invalid(InvalidRequest("id must be a string, an integer or null"))
    if value.get("jsonrpc") != JSONRPC_VERSION:
        return Invalid(InvalidRequest('jsonrpc must be "2.0"'), request_id)
    method = value.get("method")
    if method is None:
        return Invalid(InvalidRequest("method is missing"), request_id)
    if not isinstance(method, str):
        return Invalid(InvalidRequest("method must be a string"), request_id)
    extra = set(value) - {"jsonrpc", "method", "params", "id"}
    if extra:
        return Invalid(InvalidRequest(f"unknown members: {', '.join(sorted(extra))}"), request_id)
    params = value.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        # Positional params are legal JSON-RPC, but we cannot name a field in an error
        # about them; every statusd method takes an object.
        return Invalid(InvalidParams("params", "must be an object"), request_id)
    return Request(method, params, request_id, notification=not has_id)


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
    """One compact JSON value and a ``\\n``: the Unix socket's frame."""
    return _ENCODER.encode(message).encode() + b"\n"
