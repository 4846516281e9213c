"""One exception tree for everything a caller can get wrong, and the JSON-RPC code table.

Pure: no trio, no I/O. Transports turn an ``RpcError`` into an error response; the core
raises them and never builds wire dicts itself.
"""

from __future__ import annotations

from typing import Any, ClassVar

# The one table of error codes (CONTRACT.md, "Wire protocol"). statusctl maps these to
# exit status 4 and prints the message; front-ends can switch on the number.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
NOT_FOUND = -32001
FORBIDDEN = -32002
CONFLICT = -32003
BUSY = -32004

CODE_NAMES: dict[int, str] = {
    PARSE_ERROR: "parse error",
    INVALID_REQUEST: "invalid request",
    METHOD_NOT_FOUND: "method not found",
    INVALID_PARAMS: "invalid params",
    INTERNAL_ERROR: "internal error",
    NOT_FOUND: "not found",
    FORBIDDEN: "forbidden",
    CONFLICT: "conflict",
    BUSY: "busy",
}


class StatusdError(Exception):
    """Base of every error statusd raises on purpose."""


class ConfigError(StatusdError):
    """A configuration key has a bad value; start-up stops with exit status 2."""

    def __init__(self, key: str, problem: str, source: str | None = None) -> None:
        self.key = key
        self.problem = problem
        self.source = source
        where = f" (from {source})" if source else ""
        super().__init__(f"{key}: {problem}{where}")


class RpcError(StatusdError):
    """An error that is answered to the caller as a JSON-RPC error object."""

    code: ClassVar[int] = INTERNAL_ERROR

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    def to_wire(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


class ParseError(RpcError):
    code = PARSE_ERROR


class InvalidRequest(RpcError):
    code = INVALID_REQUEST


class MethodNotFound(RpcError):
    code = METHOD_NOT_FOUND


class InvalidParams(RpcError):
    """Bad or missing params; ``data.field`` names the offending field."""

    code = INVALID_PARAMS

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}", {"field": field, "reason": problem})
        self.field = field
        self.problem = problem


class InternalError(RpcError):
    code = INTERNAL_ERROR


class NotFound(RpcError):
    code = NOT_FOUND


class Forbidden(RpcError):
    code = FORBIDDEN


class Conflict(RpcError):
    code = CONFLICT


class Busy(RpcError):
    code = BUSY


class StartupError(StatusdError):
    """The daemon cannot start (socket in use, unusable path); exit status 1."""
