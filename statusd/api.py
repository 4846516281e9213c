"""The JSON-RPC methods: a caller's session and typed params in, wire-ready results out.

Transport-agnostic: the Unix socket and the WebSocket both hand ``Api.handle_line`` a
message and a ``Session`` and send back what it returns. Every method's params are an
attrs class structured by the one strict converter, so a bad field is a -32602 naming it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import attrs
import trio

import statusd
from statusd.channel import StatusChannel
from statusd.config import Config
from statusd.errors import InternalError, InvalidParams, MethodNotFound, NotFound, RpcError
from statusd.protocol import jsonrpc
from statusd.protocol.codec import format_timestamp, structure_params, unstructure
from statusd.session import Session
from statusd.state.status import Level

log = logging.getLogger(__name__)


def _non_negative(_instance: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value < 0:
        raise InvalidParams(attribute.name, f"must be >= 0, not {value}")


@attrs.frozen
class NoParams:
    pass


@attrs.frozen
class PublishParams:
    level: Level
    message: str
    operation_id: str | None = None


@attrs.frozen
class RecentParams:
    since: int = attrs.field(default=0, validator=_non_negative)


@attrs.frozen
class SubscribeParams:
    # With no stream named, a subscription is to the status stream.
    status: bool = True
    since: int | None = attrs.field(default=None, validator=_non_negative)


@attrs.frozen
class UnsubscribeParams:
    subscription: str


Handler = Callable[[Session, Any], Awaitable[Any]]


@attrs.frozen
class Method:
    params: type[Any]
    handler: Handler


@attrs.define
class Api:
    config: Config
    channel: StatusChannel
    started_at: datetime = attrs.Factory(lambda: datetime.now(UTC))
    _started_clock: float = attrs.Factory(trio.current_time)
    _methods: dict[str, Method] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._methods = {
            "daemon.info": Method(NoParams, self.daemon_info),
            "status.publish": Method(PublishParams, self.status_publish),
            "status.recent": Method(RecentParams, self.status_recent),
            "subscribe": Method(SubscribeParams, self.subscribe),
            "unsubscribe": Method(UnsubscribeParams, self.unsubscribe),
        }

    @property
    def method_names(self) -> list[str]:
        return sorted(self._methods)

    # -- dispatch --------------------------------------------------------------------------

    async def call(self, session: Session, method: str, params: Mapping[str, Any]) -> Any:
        entry = self._methods.get(method)
        if entry is None:
            raise MethodNotFound(f"method not found: {method}", {"method": method})
        return await entry.handler(session, structure_params(params, entry.params))

    async def handle_message(self, session: Session, raw: bytes | str) -> Any | None:
        """Answer one framed message: a response, a list of them (batch), or None when
        nothing is to be sent (notifications only)."""
        try:
            incoming = jsonrpc.parse_message(raw)
        except RpcError as error:
            return jsonrpc.error_response(None, error)
        responses = []
        for entry in incoming.entries:
            response = await self._answer(session, entry)
            if response is not None:
                responses.append(response)
        if incoming.batch:
            return responses or None
        return responses[0] if responses else None

    async def _answer(self, session: Session, entry: jsonrpc.Entry) -> dict[str, Any] | None:
        if isinstance(entry, jsonrpc.Invalid):
            return jsonrpc.error_response(entry.id, entry.error)
        try:
            result = await self.call(session, entry.method, entry.params)
        except RpcError as error:
            if entry.notification:
                return None
            return jsonrpc.error_response(entry.id, error)
        except Exception:
            # A bug must cost one request, never the connection or the daemon.
            log.exception("internal error in %s", entry.method)
            if entry.notification:
                return None
            return jsonrpc.error_response(entry.id, InternalError("internal error"))
        return None if entry.notification else jsonrpc.result_response(entry.id, result)

    # -- methods ---------------------------------------------------------------------------

    async def daemon_info(self, session: Session, _params: NoParams) -> dict[str, Any]:
        caller = session.caller
        websocket = self.config.websocket.listen
        return {
            "version": statusd.__version__,
            "pid": os.getpid(),
            "started_at": format_timestamp(self.started_at),
            "uptime_s": round(trio.current_time() - self._started_clock, 3),
            "user": caller.username,
            "uid": caller.uid,
            "admin": caller.admin,
            "socket": str(self.config.socket),
            "websocket": f"{websocket[0]}:{websocket[1]}" if websocket else None,
            "tasks": _empty_summary(),
            "status_seq": self.channel.last_seq,
        }

    async def status_publish(self, _session: Session, params: PublishParams) -> dict[str, Any]:
        message = self.channel.publish_status(params.level, params.message, params.operation_id)
        if message is None:
            raise InternalError("status message could not be published")
        return {"seq": message.seq}

    async def status_recent(self, _session: Session, params: RecentParams) -> dict[str, Any]:
        messages, dropped = self.channel.recent(params.since)
        return {"messages": unstructure(messages), "dropped": dropped}

    async def subscribe(self, session: Session, params: SubscribeParams) -> dict[str, Any]:
        if not params.status:
            raise InvalidParams("status", "a subscription needs at least one stream")
        subscription = session.subscribe(status=params.status, since=params.since)
        return {"subscription": subscription.id}

    async def unsubscribe(self, session: Session, params: UnsubscribeParams) -> dict[str, Any]:
        if not session.unsubscribe(params.subscription):
            raise NotFound(f"subscription {params.subscription!r} not found")
        return {"success": True}


def _empty_summary() -> dict[str, int]:
    # Task tracking arrives with its own issue; the shape is already the contract's.
    return dict.fromkeys(("total", "pending", "running", "completed", "failed", "cancelled"), 0)
