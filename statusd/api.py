"""The JSON-RPC methods: a caller's session and typed params in, wire-ready results out.

Transport-agnostic: the Unix socket and the WebSocket both hand ``Api.handle_message`` a
message and a ``Session`` and send back the line it returns. The per-client limits of
``config.limits`` (batch entries, reply bytes, subscriptions, publish rate) are enforced here,
read at each request so a reload applies at once. Every method's params are an
attrs class structured by the one strict converter, so a bad field is a -32602 naming it.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import attrs
import trio

import statusd
from statusd.channel import StatusChannel
from statusd.config import Config, LimitsConfig
from statusd.errors import (
    Busy,
    Conflict,
    Forbidden,
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    NotFound,
    RpcError,
)
from statusd.events import Streams
from statusd.identity import Caller, uid_for
from statusd.notifications import NotificationService
from statusd.protocol import jsonrpc
from statusd.protocol.codec import format_timestamp, structure_params, unstructure
from statusd.session import Session
from statusd.state import task_pages
from statusd.state.bandwidth import check_rate
from statusd.state.notifications import DEFAULT_LIMIT, check_field, check_limit
from statusd.state.rate import RateLimiter, retry_after
from statusd.state.status import Audience, Level
from statusd.state.tasks import TaskInfo, TaskStatus
from statusd.tasks import TaskManager
from statusd.tokens import (
    MAX_EXPIRES_IN,
    MAX_TOKENS_PER_USER,
    MIN_EXPIRES_IN,
    Scope,
    TokenStore,
    refusal,
)

log = logging.getLogger(__name__)


def _non_negative(_instance: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value < 0:
        raise InvalidParams(attribute.name, f"must be >= 0, not {value}")


def _at_least_one(_instance: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value < 1:
        raise InvalidParams(attribute.name, f"must be >= 1, not {value}")


def _cursor(_instance: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None:
        try:
            task_pages.parse_cursor(value)
        except ValueError as exc:
            raise InvalidParams(attribute.name, str(exc)) from None


@attrs.frozen
class NoParams:
    pass


@attrs.frozen
class PublishParams:
    level: Level
    message: str
    operation_id: str | None = None
    # Who reads it besides admins: the publisher alone ("user", the default) or everyone
    # ("all", admins only).
    audience: Audience = Audience.USER


@attrs.frozen
class RecentParams:
    since: int = attrs.field(default=0, validator=_non_negative)


def _positive(_instance: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and value <= 0:
        raise InvalidParams(attribute.name, f"must be > 0, not {value}")


def _not_negative_hours(_instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise InvalidParams(attribute.name, f"must be >= 0, not {value}")


# A timedelta holds at most 999,999,999 days; a million hours (114 years) is "all" already.
MAX_AGE_HOURS = 1_000_000


def _at_most(limit: float) -> Any:
    def check(_instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
        if value > limit:
            raise InvalidParams(attribute.name, f"must be <= {limit}, not {value:.6g}")

    return check


def _byte_rate(_instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    try:
        check_rate(value)
    except ValueError as exc:
        raise InvalidParams(attribute.name, str(exc)) from None


@attrs.frozen
class SubscribeParams:
    # With no stream named at all, a subscription is to the status stream.
    status: bool | None = None
    tasks: Literal["all"] | list[str] | None = None
    topic: str | None = None
    notifications: bool | None = None
    since: int | None = attrs.field(default=None, validator=_non_negative)


@attrs.frozen
class DownloadItemParams:
    url: str
    filename: str | None = None
    sha256: str | None = None
    headers: dict[str, str] | None = None  # sent to the url's own origin only
    checksum: str | None = None  # TYPE=HEX, as aria2's --checksum; or sha256, not both


@attrs.frozen
class DownloadParams:
    urls: list[str] | None = None
    items: list[DownloadItemParams] | None = None
    dest: str | None = None
    name: str | None = None
    topic: str | None = None
    batch_size: int | None = None  # 1 to 1000, checked with the other download params
    headers: dict[str, str] | None = None  # for every item; an item's own win
    rate_limit: int = attrs.field(default=0, validator=_byte_rate)  # bytes a second; 0: none


@attrs.frozen
class TaskIdParams:
    task_id: str


@attrs.frozen
class SetRateParams:
    task_id: str
    rate_limit: int = attrs.field(validator=_byte_rate)  # bytes a second; 0: none


@attrs.frozen
class GetTaskParams:
    task_id: str
    # A page of the result's items (docs/protocol.md, "Paging"); none: all of them.
    items_limit: int | None = attrs.field(default=None, validator=_non_negative)
    items_offset: int = attrs.field(default=0, validator=_non_negative)


@attrs.frozen
class ListTasksParams:
    status: TaskStatus | None = None
    limit: int | None = attrs.field(default=None, validator=_at_least_one)
    cursor: str | None = attrs.field(default=None, validator=_cursor)
    # False: each task's result without its per-item list (the summary form).
    items: bool = True


@attrs.frozen
class CleanupParams:
    # 0: every finished task (``statusctl cleanup --all``).
    max_age_hours: float = attrs.field(
        default=24.0, validator=[_not_negative_hours, _at_most(MAX_AGE_HOURS)]
    )


@attrs.frozen
class UnsubscribeParams:
    subscription: str


def _notification_field(_instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    check_field(attribute.name, value)


def _limit(_instance: object, _attribute: attrs.Attribute[Any], value: int) -> None:
    check_limit(value)


# ``username`` on the notification methods: an admin's way to any user's inbox (CONTRACT:
# "an admin sees all"); for others it may only name themselves.
@attrs.frozen
class ListNotificationsParams:
    unread_only: bool = False
    limit: int = attrs.field(default=DEFAULT_LIMIT, validator=_limit)
    username: str | None = attrs.field(default=None, validator=_notification_field)
    # The next page: those older than this id (the last one of the previous page).
    before_id: int | None = attrs.field(default=None, validator=_at_least_one)


@attrs.frozen
class InboxParams:
    username: str | None = attrs.field(default=None, validator=_notification_field)


@attrs.frozen
class NotificationIdParams:
    id: int
    username: str | None = attrs.field(default=None, validator=_notification_field)


@attrs.frozen
class CreateNotificationParams:
    type: str = attrs.field(validator=_notification_field)
    title: str = attrs.field(validator=_notification_field)
    message: str = attrs.field(validator=_notification_field)
    username: str | None = attrs.field(default=None, validator=_notification_field)
    link: str | None = attrs.field(default=None, validator=_notification_field)


def _expires_in(_instance: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and not MIN_EXPIRES_IN <= value <= MAX_EXPIRES_IN:
        raise InvalidParams(
            attribute.name,
            f"must be from {MIN_EXPIRES_IN} to {MAX_EXPIRES_IN} seconds (a year), not {value}",
        )


@attrs.frozen
class TokenCreateParams:
    username: str | None = None
    scope: Scope = "control"
    expires_in: int | None = attrs.field(default=None, validator=_expires_in)


@attrs.frozen
class TokenIdParams:
    token_id: str


Handler = Callable[[Session, Any], Awaitable[Any]]


@attrs.frozen
class Method:
    params: type[Any]
    handler: Handler


class DownloadPlanner(Protocol):
    """Turns checked ``tasks.download`` params into a task's spec
    (``statusd.downloads.Downloads``); the task manager builds the job when the task starts."""

    def prepare(
        self,
        params: DownloadParams,
        caller: Caller,
        *,
        max_items: int,
        max_headers: int = ...,
        max_header_bytes: int = ...,
    ) -> tuple[str, int, dict[str, Any]]:
        """(task name, item count, spec); raises InvalidParams/Forbidden, Busy past
        ``max_items``, or past ``max_headers``/``max_header_bytes`` for an item."""
        ...

    def set_rate_limit(self, task_id: str, rate: int) -> None:
        """Apply a task's new ``rate_limit`` to its running job, if it has one."""
        ...


@attrs.define
class Api:
    config: Config
    streams: Streams
    tasks: TaskManager
    downloads: DownloadPlanner | None = None
    notifications: NotificationService | None = None
    tokens: TokenStore | None = None
    # The WebSocket listener's real address once it listens ("127.0.0.1:8765"), else None.
    websocket_address: str | None = None
    started_at: datetime = attrs.Factory(lambda: datetime.now(UTC))
    _started_clock: float = attrs.Factory(trio.current_time)
    _methods: dict[str, Method] = attrs.field(init=False)
    # What daemon.info says the same every time, made once (it was a tenth of the call).
    _fixed_info: dict[str, Any] = attrs.field(init=False)
    _publish_rate: RateLimiter = attrs.field(init=False)
    # Planning a download checks every URL: 59 ms for 10,000 on the loop stalled every
    # other client (issue 11, item 8). Plans run in threads, two at a time, so a user
    # sending many large ones queues here, not on the event loop or the shared threads.
    _planners: trio.CapacityLimiter = attrs.Factory(lambda: trio.CapacityLimiter(2))

    def __attrs_post_init__(self) -> None:
        self._fixed_info = {
            "version": statusd.__version__,
            "pid": os.getpid(),
            "started_at": format_timestamp(self.started_at),
            # statusctl takes a relative --dest from the caller's directory when this is
            # theirs; a socket's peer credentials would say systemd's under activation.
            "daemon_uid": os.getuid(),
        }
        limits = self.config.limits
        self._publish_rate = RateLimiter(limits.publish_rate, limits.publish_burst)
        self._methods = {
            "daemon.info": Method(NoParams, self.daemon_info),
            "status.publish": Method(PublishParams, self.status_publish),
            "status.recent": Method(RecentParams, self.status_recent),
            "subscribe": Method(SubscribeParams, self.subscribe),
            "unsubscribe": Method(UnsubscribeParams, self.unsubscribe),
            "tasks.download": Method(DownloadParams, self.tasks_download),
            "tasks.get": Method(GetTaskParams, self.tasks_get),
            "tasks.list": Method(ListTasksParams, self.tasks_list),
            "tasks.cancel": Method(TaskIdParams, self.tasks_cancel),
            "tasks.pause": Method(TaskIdParams, self.tasks_pause),
            "tasks.resume": Method(TaskIdParams, self.tasks_resume),
            "tasks.retry": Method(TaskIdParams, self.tasks_retry),
            "tasks.set_rate": Method(SetRateParams, self.tasks_set_rate),
            "tasks.summary": Method(NoParams, self.tasks_summary),
            "tasks.cleanup": Method(CleanupParams, self.tasks_cleanup),
            "notifications.list": Method(ListNotificationsParams, self.notifications_list),
            "notifications.unread_count": Method(InboxParams, self.notifications_unread_count),
            "notifications.mark_read": Method(NotificationIdParams, self.notifications_mark_read),
            "notifications.mark_all_read": Method(InboxParams, self.notifications_mark_all_read),
            "notifications.delete": Method(NotificationIdParams, self.notifications_delete),
            "notifications.delete_read": Method(InboxParams, self.notifications_delete_read),
            "notifications.create": Method(CreateNotificationParams, self.notifications_create),
            "tokens.create": Method(TokenCreateParams, self.tokens_create),
            "tokens.list": Method(NoParams, self.tokens_list),
            "tokens.revoke": Method(TokenIdParams, self.tokens_revoke),
        }

    @property
    def channel(self) -> StatusChannel:
        return self.streams.status

    @property
    def method_names(self) -> list[str]:
        return sorted(self._methods)

    # -- dispatch --------------------------------------------------------------------------

    async def call(self, session: Session, method: str, params: Mapping[str, Any]) -> Any:
        entry = self._methods.get(method)
        if entry is None:
            raise MethodNotFound(f"method not found: {method}", {"method": method})
        refused = refusal(session.scope, method)
        if refused is not None:
            raise Forbidden(refused, {"method": method, "scope": session.scope})
        return await entry.handler(session, structure_params(params, entry.params))

    async def handle_message(self, session: Session, raw: bytes | str) -> bytes | None:
        """Answer one framed message: the encoded reply line (one response, or a batch's
        array of them), or None when nothing is to be sent (notifications only).

        A batch longer than ``limits.max_batch_entries`` is answered with one -32600 and
        none of it runs. Each answer is encoded as soon as it is made, and once the answers
        would take the reply past ``limits.max_reply_bytes``, that entry and every later one
        get a short -32004 instead (the later ones are not run).
        """
        limits = self.config.limits
        try:
            incoming = jsonrpc.parse_message(raw)
        except RpcError as error:
            return jsonrpc.encode_line(jsonrpc.error_response(None, error))
        if incoming.batch and len(incoming.entries) > limits.max_batch_entries:
            return jsonrpc.encode_line(
                jsonrpc.error_response(None, _batch_too_long(len(incoming.entries), limits))
            )
        if not incoming.batch:
            # One request, as nearly every client sends: its answer is the line, with no
            # batch bookkeeping around it.
            entry = incoming.entries[0]
            response = await self._answer(session, entry)
            if response is None:
                return None
            line = jsonrpc.encode_line(response)
            if len(line) + _Reply.FRAME <= limits.max_reply_bytes:
                return line
            reply = _Reply(limits.max_reply_bytes)
            reply.refuse(entry, ran=True)
            return reply.line(batch=False)
        reply = _Reply(limits.max_reply_bytes)
        for index, entry in enumerate(incoming.entries):
            if index:
                # A batch's entries may each be cheap, but together long: let other clients in.
                await trio.lowlevel.checkpoint()
            if reply.full:
                reply.refuse(entry, ran=False)
                continue
            response = await self._answer(session, entry)
            if response is not None:
                reply.add(entry, response)
        return reply.line(batch=incoming.batch)

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
        fixed = self._fixed_info
        return {
            "version": fixed["version"],
            "pid": fixed["pid"],
            "started_at": fixed["started_at"],
            "uptime_s": round(trio.current_time() - self._started_clock, 3),
            "user": caller.username,
            "uid": caller.uid,
            "admin": caller.admin,
            "daemon_uid": fixed["daemon_uid"],
            "socket": str(self.config.socket),
            "websocket": self.websocket_address,
            # A WebSocket token's scope (a page shows controls only for "control"); null on
            # the Unix socket, where every method is open.
            "scope": session.scope,
            "tasks": self._summary(caller),
            "status_seq": self.channel.last_seq,
        }

    async def status_publish(self, session: Session, params: PublishParams) -> dict[str, Any]:
        caller = session.caller
        if params.audience is Audience.ALL and not caller.admin:
            raise Forbidden(
                "audience: only an admin may publish to all users; "
                "a message of yours reaches you and the admins",
                {"field": "audience"},
            )
        self._check_publish_rate(caller)
        message = self.channel.publish_status(
            params.level,
            params.message,
            params.operation_id,
            user=caller.username,
            audience=params.audience,
        )
        if message is None:
            raise InternalError("status message could not be published")
        return {"seq": message.seq}

    def _check_publish_rate(self, caller: Caller) -> None:
        # Admins are exempt: they may stop the daemon anyway, and scripts they run for
        # everyone (announcements) must not be throttled by a user's bucket.
        if caller.admin:
            return
        limits = self.config.limits
        self._publish_rate.configure(limits.publish_rate, limits.publish_burst)
        wait = self._publish_rate.take(caller.username, trio.current_time())
        if wait > 0:
            after = retry_after(wait)
            raise Busy(
                f"{caller.username} publishes too fast (limits.publish_rate = "
                f"{limits.publish_rate:g} a second, limits.publish_burst = "
                f"{limits.publish_burst}); retry after {after:g} s",
                {"limit": limits.publish_burst, "rate": limits.publish_rate, "retry_after": after},
            )

    async def status_recent(self, session: Session, params: RecentParams) -> dict[str, Any]:
        messages, dropped = self.channel.recent(params.since, session.reader)
        return {"messages": unstructure(messages), "dropped": dropped}

    async def subscribe(self, session: Session, params: SubscribeParams) -> dict[str, Any]:
        tasks: str | frozenset[str] | None = None
        if isinstance(params.tasks, list):
            for task_id in params.tasks:
                self._visible_task(session.caller, task_id, field="tasks")
            tasks = frozenset(params.tasks)
        elif params.tasks == "all":
            tasks = "all"
        notifications = bool(params.notifications)
        streams_named = tasks is not None or params.topic is not None or notifications
        status = params.status if params.status is not None else not streams_named
        if not (status or streams_named):
            raise InvalidParams("status", "a subscription needs at least one stream")
        most = self.config.limits.max_subscriptions_per_connection
        if session.subscription_count >= most:
            raise Busy(
                f"this connection has {most} subscriptions, the most it may have "
                "(limits.max_subscriptions_per_connection); unsubscribe first",
                {"limit": most},
            )
        subscription = session.subscribe(
            status=status,
            since=params.since,
            tasks=tasks,
            topic=params.topic,
            notifications=notifications,
        )
        return {"subscription": subscription.id}

    async def unsubscribe(self, session: Session, params: UnsubscribeParams) -> dict[str, Any]:
        if not session.unsubscribe(params.subscription):
            raise NotFound(f"subscription {params.subscription!r} not found")
        return {"success": True}

    # -- tasks -----------------------------------------------------------------------------

    def _visible_task(self, caller: Caller, task_id: str, field: str = "task_id") -> TaskInfo:
        task = self.tasks.get_task(task_id)
        # Someone else's task is "not found", not "forbidden": ids are not to be probed.
        if task is None or not task.visible_to(caller.username, caller.admin):
            raise NotFound(f"task {task_id!r} not found", {"field": field, "task_id": task_id})
        return task

    def _visible_tasks(self, caller: Caller, status: TaskStatus | None = None) -> list[TaskInfo]:
        return [
            task
            for task in self.tasks.list_tasks(status)
            if task.visible_to(caller.username, caller.admin)
        ]

    def _summary(self, caller: Caller) -> dict[str, int]:
        # Counted as they come: sorting them first (list_tasks) is for lists only.
        return self.tasks.get_task_summary(
            task
            for task in self.tasks.all_tasks()
            if task.visible_to(caller.username, caller.admin)
        )

    async def tasks_download(self, session: Session, params: DownloadParams) -> dict[str, Any]:
        if self.downloads is None:
            raise InternalError("downloads are not available")
        limits = self.config.limits
        caller = session.caller
        name, count, spec = await trio.to_thread.run_sync(
            functools.partial(
                self.downloads.prepare,
                params,
                caller,
                max_items=limits.max_items_per_task,
                max_headers=limits.max_item_headers,
                max_header_bytes=limits.max_item_header_bytes,
            ),
            limiter=self._planners,
        )
        metadata: dict[str, Any] = {"dest": spec["dest"], "batch_size": spec["batch_size"]}
        if params.headers:
            # The names, for the owner to see what was asked; the values may be secrets.
            metadata["headers"] = dict.fromkeys(params.headers, "***")
        task_id = await self.tasks.create_task(
            name,
            count,
            metadata,
            kind="download",
            owner=session.caller.username,
            topic=params.topic,
            spec=spec,
            max_unfinished=self._max_unfinished(caller),
            rate_limit=params.rate_limit,
        )
        self.tasks.run_task(task_id)
        return {"task_id": task_id}

    def _max_unfinished(self, caller: Caller) -> int | None:
        # Admins are exempt, as from the publish rate: their tasks are the system's own.
        return None if caller.admin else self.config.limits.max_tasks_per_user

    async def tasks_get(self, session: Session, params: GetTaskParams) -> Any:
        task = self._visible_task(session.caller, params.task_id)
        if params.items_limit is not None or params.items_offset:
            task = task_pages.items_page(task, params.items_offset, params.items_limit)
        return unstructure(task)

    async def tasks_list(self, session: Session, params: ListTasksParams) -> dict[str, Any]:
        tasks, next_cursor = task_pages.page(
            self._visible_tasks(session.caller, params.status), params.limit, params.cursor
        )
        if not params.items:
            tasks = [task_pages.without_items(task) for task in tasks]
        return {
            "tasks": unstructure(tasks),
            "summary": self._summary(session.caller),
            "next_cursor": next_cursor,
        }

    async def tasks_cancel(self, session: Session, params: TaskIdParams) -> dict[str, Any]:
        task = self._visible_task(session.caller, params.task_id)
        if not await self.tasks.cancel_task(task.id):
            raise self._not_cancelled(task)
        return {"cancelled": True}

    def _not_cancelled(self, task: TaskInfo) -> Conflict:
        """Why a task was not cancelled: it had ended. A failed one may keep the part of an
        item for ``tasks.retry``; cancelling would not remove it, so say what does."""
        data: dict[str, Any] = {"task_id": task.id, "status": task.status.value}
        if task.status is not TaskStatus.FAILED:
            return Conflict(f"task {task.id} is already {task.status.value}", data)
        message = f"task {task.id} has already failed"
        if self.tasks.keeps_parts(task.id):
            data["kept_parts"] = True
            message += (
                "; it keeps a partial file for a retry, which tasks.retry resumes and"
                " tasks.cleanup removes"
            )
        return Conflict(message, data)

    async def tasks_pause(self, session: Session, params: TaskIdParams) -> dict[str, Any]:
        task = self._visible_task(session.caller, params.task_id)
        await self.tasks.pause_task(task.id)
        return {"paused": True}

    async def tasks_resume(self, session: Session, params: TaskIdParams) -> dict[str, Any]:
        task = self._visible_task(session.caller, params.task_id)
        await self.tasks.resume_task(task.id)
        return {"resumed": True}

    async def tasks_retry(self, session: Session, params: TaskIdParams) -> dict[str, Any]:
        task = self._visible_task(session.caller, params.task_id)
        await self.tasks.retry_task(task.id, max_unfinished=self._max_unfinished(session.caller))
        return {"task_id": task.id}

    async def tasks_set_rate(self, session: Session, params: SetRateParams) -> dict[str, Any]:
        # The owner's or an admin's: someone else's task is not found (_visible_task).
        task = self._visible_task(session.caller, params.task_id)
        await self.tasks.set_rate_limit(task.id, params.rate_limit)
        if self.downloads is not None:
            self.downloads.set_rate_limit(task.id, task.rate_limit)
        return {"success": True}

    async def tasks_summary(self, session: Session, _params: NoParams) -> dict[str, int]:
        return self._summary(session.caller)

    async def tasks_cleanup(self, session: Session, params: CleanupParams) -> dict[str, Any]:
        # A user clears their own finished tasks; an admin everyone's.
        owner = None if session.caller.admin else session.caller.username
        removed = await self.tasks.cleanup_old_tasks(params.max_age_hours, owner=owner)
        return {"removed": removed}

    # -- notifications ---------------------------------------------------------------------

    def _notifications(self) -> NotificationService:
        if self.notifications is None:
            raise InternalError("notifications are not available")
        return self.notifications

    def _inbox(self, caller: Caller, username: str | None) -> str:
        """Whose inbox a call works on: the caller's own, or (admins only) the one named."""
        if username is None or username == caller.username:
            return caller.username
        if not caller.admin:
            raise Forbidden(
                "username: only an admin may use another user's notifications",
                {"field": "username"},
            )
        return username

    def _not_found(self, notification_id: int) -> NotFound:
        # Someone else's notification is "not found" too, so ids cannot be probed.
        return NotFound(
            f"notification {notification_id} not found",
            {"field": "id", "id": notification_id},
        )

    async def notifications_list(
        self, session: Session, params: ListNotificationsParams
    ) -> dict[str, Any]:
        service = self._notifications()
        user = self._inbox(session.caller, params.username)
        notifications = service.get_user_notifications(
            user, params.unread_only, params.limit, params.before_id
        )
        return {
            "notifications": notifications,
            "count": len(notifications),
            "unread": service.get_unread_count(user),
        }

    async def notifications_unread_count(
        self, session: Session, params: InboxParams
    ) -> dict[str, int]:
        user = self._inbox(session.caller, params.username)
        return {"count": self._notifications().get_unread_count(user)}

    async def notifications_mark_read(
        self, session: Session, params: NotificationIdParams
    ) -> dict[str, bool]:
        user = self._inbox(session.caller, params.username)
        if not await self._notifications().mark_notification_as_read(params.id, user):
            raise self._not_found(params.id)
        return {"success": True}

    async def notifications_mark_all_read(
        self, session: Session, params: InboxParams
    ) -> dict[str, int]:
        user = self._inbox(session.caller, params.username)
        return {"count": await self._notifications().mark_all_notifications_as_read(user)}

    async def notifications_delete(
        self, session: Session, params: NotificationIdParams
    ) -> dict[str, bool]:
        user = self._inbox(session.caller, params.username)
        if not await self._notifications().delete_notification(params.id, user):
            raise self._not_found(params.id)
        return {"success": True}

    async def notifications_delete_read(
        self, session: Session, params: InboxParams
    ) -> dict[str, int]:
        user = self._inbox(session.caller, params.username)
        return {"count": await self._notifications().delete_read_notifications(user)}

    async def notifications_create(
        self, session: Session, params: CreateNotificationParams
    ) -> dict[str, int]:
        if not session.caller.admin:
            raise Forbidden("notifications.create is for admins only")
        notification_id = await self._notifications().create_notification(
            params.username, params.type, params.title, params.message, params.link
        )
        return {"notification_id": notification_id}

    # -- WebSocket tokens ------------------------------------------------------------------

    def _token_store(self) -> TokenStore:
        if self.tokens is None:
            raise InternalError("tokens are not available")
        return self.tokens

    async def tokens_create(self, session: Session, params: TokenCreateParams) -> dict[str, Any]:
        store = self._token_store()
        caller = session.caller
        username = caller.username if params.username is None else params.username
        if username != caller.username:
            if not caller.admin:
                raise Forbidden(
                    f"only an admin may create a token for another user ({username!r})",
                    {"field": "username"},
                )
            # A passwd look-up may block for seconds under LDAP/SSSD: off the loop.
            if await trio.to_thread.run_sync(uid_for, username) is None:
                raise InvalidParams("username", f"no such user {username!r}")
        if store.count_for(username) >= MAX_TOKENS_PER_USER:
            raise Busy(
                f"{username} already has {MAX_TOKENS_PER_USER} tokens (the most a user may "
                "have); revoke some first",
                {"limit": MAX_TOKENS_PER_USER},
            )
        new = await store.create(username, params.scope, params.expires_in)
        return {**new.record.describe(), "token": new.token}

    async def tokens_list(self, session: Session, _params: NoParams) -> dict[str, Any]:
        store = self._token_store()
        owner = None if session.caller.admin else session.caller.username
        return {"tokens": [record.describe() for record in store.records(owner)]}

    async def tokens_revoke(self, session: Session, params: TokenIdParams) -> dict[str, Any]:
        store = self._token_store()
        record = store.get(params.token_id)
        caller = session.caller
        # Someone else's token is "not found", as with tasks: ids are not to be probed.
        if record is None or not (caller.admin or record.username == caller.username):
            raise NotFound(
                f"token {params.token_id!r} not found",
                {"field": "token_id", "token_id": params.token_id},
            )
        await store.revoke(record.id)
        return {"success": True}


def _batch_too_long(entries: int, limits: LimitsConfig) -> InvalidRequest:
    most = limits.max_batch_entries
    return InvalidRequest(
        f"batch has {entries} entries, more than {most} (limits.max_batch_entries); "
        "none of them ran",
        {"limit": most},
    )


class _Reply:
    """One request's answers, encoded as they come, never more than ``max_bytes`` of them.

    Only results and errors made by running an entry count; the -32004 answers for entries
    past the limit are short (about 150 bytes and the entry's id each), and how many there
    can be is bounded by the batch limit and the 1 MiB request line.
    """

    # What a reply's size is counted with besides its answers' lines (each with its "\n"
    # standing for the "," between them): the "[" and "]" of a batch.
    FRAME = 2

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.full = False
        self._parts: list[bytes] = []
        self._size = self.FRAME

    def add(self, entry: jsonrpc.Entry, response: dict[str, Any]) -> None:
        part = jsonrpc.encode_line(response)[:-1]
        if self._size + len(part) + 1 > self.max_bytes:
            self.full = True
            self.refuse(entry, ran=True)
            return
        self._append(part)

    def refuse(self, entry: jsonrpc.Entry, *, ran: bool) -> None:
        if isinstance(entry, jsonrpc.Request) and entry.notification:
            return
        what = "its result was left out" if ran else "it was not run"
        error = Busy(
            f"the reply to this request would be over {self.max_bytes} bytes "
            f"(limits.max_reply_bytes); {what}",
            {"limit": self.max_bytes},
        )
        self._append(jsonrpc.encode_line(jsonrpc.error_response(entry.id, error))[:-1])

    def _append(self, part: bytes) -> None:
        self._parts.append(part)
        self._size += len(part) + 1

    def line(self, *, batch: bool) -> bytes | None:
        if not self._parts:
            return None
        if batch:
            return b"[" + b",".join(self._parts) + b"]\n"
        return self._parts[0] + b"\n"
