"""statusctl's text output: results in, lines out. Pure: no I/O, no trio, no client.

Human output is one line per item (supervisorctl style), so it greps and pipes well.
Text that came from other users (status messages, operation ids) has its control
characters escaped: a message must not be able to break the one-line rule or send
escape sequences to the reader's terminal.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

# C0 controls, DEL and C1 controls; everything else prints as itself.
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_CONTROL_ESCAPES = {
    code: _NAMED_ESCAPES.get(chr(code), f"\\x{code:02x}")
    for code in (*range(0x20), *range(0x7F, 0xA0))
}

_LEVEL_WIDTH = 8  # "success" and "warning" are 7; one space more lines messages up

# daemon.info keys in the order a person wants them; unknown (newer) keys follow.
_INFO_ORDER = (
    "version",
    "pid",
    "started_at",
    "uptime_s",
    "user",
    "uid",
    "admin",
    "socket",
    "websocket",
    "status_seq",
    "tasks",
)
_INFO_LABELS = {"uptime_s": "uptime"}
_SUMMARY_ORDER = ("total", "pending", "running", "completed", "failed", "cancelled")

# What one lost item of a stream is called, singular and plural.
_STREAM_NOUNS = {
    "status": ("status message", "status messages"),
    "tasks": ("task update", "task updates"),
    "notifications": ("notification", "notifications"),
}


def one_line(text: str) -> str:
    """``text`` with newlines and other control characters escaped."""
    return text.translate(_CONTROL_ESCAPES)


def to_json(value: Any) -> str:
    """One JSON document on one line: for ``--json`` output and ``watch --json``."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def format_status(message: Mapping[str, Any]) -> str:
    """``2026-11-23T10:30:00.123Z  #42 info     System ready  [op-id]``"""
    level = str(message.get("level", "?"))
    text = one_line(str(message.get("message", "")))
    stamp, seq = message.get("timestamp", "-"), message.get("seq", "?")
    line = f"{stamp}  #{seq} {level:<{_LEVEL_WIDTH}} {text}"
    operation_id = message.get("operation_id")
    if operation_id:
        line += f"  [{one_line(str(operation_id))}]"
    return line


def _count_of(count: int, stream: str) -> str:
    singular, plural = _STREAM_NOUNS.get(stream, (f"{stream} message", f"{stream} messages"))
    return f"{count} {singular if count == 1 else plural}"


def format_dropped(params: Any) -> str:
    """A ``dropped`` push: this reader fell behind and lost messages."""
    stream = "status"
    count: Any = "?"
    if isinstance(params, Mapping):
        stream = str(params.get("stream", stream))
        count = params.get("count", count)
    lost = _count_of(count, stream) if isinstance(count, int) else f"{count} {stream} messages"
    verb = "was" if count == 1 else "were"
    return f"warning: {lost} {verb} dropped: this reader fell behind"


def format_history_gap(count: int) -> str:
    """The first line of ``status`` when the daemon no longer holds older messages."""
    verb = "is" if count == 1 else "are"
    return f"({_count_of(count, 'status')} before these {verb} no longer held)"


def format_notification(notification: Mapping[str, Any]) -> str:
    """``   12 * 2026-11-25T12:00:00.123Z  task_completed  Title: message  <link>``

    ``*`` marks an unread one; a system-wide one ends with ``(everyone)``.
    """
    mark = " " if notification.get("read") else "*"
    stamp = notification.get("created_at", "-")
    kind = one_line(str(notification.get("type", "?")))
    line = f"{notification.get('id', '?')!s:>5} {mark} {stamp}  {kind}  "
    line += one_line(str(notification.get("title", "")))
    message = notification.get("message")
    if message:
        line += f": {one_line(str(message))}"
    link = notification.get("link")
    if link:
        line += f"  <{one_line(str(link))}>"
    if notification.get("username", "") is None:
        line += "  (everyone)"
    return line


def format_push(method: str, params: Any) -> str:
    """One line for anything ``watch`` receives."""
    if method == "status" and isinstance(params, Mapping):
        return format_status(params)
    if method == "dropped":
        return format_dropped(params)
    if method == "notification" and isinstance(params, Mapping):
        return f"notification: {format_notification(params)}"
    if method == "unread_count" and isinstance(params, Mapping):
        return f"unread notifications: {params.get('count', '?')}"
    # A stream this statusctl does not know yet still shows up, raw.
    return f"{one_line(method)}: {to_json(params)}"


def format_duration(seconds: float) -> str:
    """``3723.4`` -> ``1h 02m 03s``; under a minute, ``42.1s``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours}h {minutes:02d}m {secs:02d}s" if hours or days else f"{minutes}m {secs:02d}s"
    return f"{days}d {text}" if days else text


def _info_value(key: str, value: Any) -> str:
    if key == "uptime_s" and isinstance(value, int | float) and not isinstance(value, bool):
        return format_duration(float(value))
    if key == "websocket" and value is None:
        return "off"
    if key == "tasks" and isinstance(value, Mapping):
        known = [name for name in _SUMMARY_ORDER if name in value]
        known += sorted(name for name in value if name not in _SUMMARY_ORDER)
        return ", ".join(f"{value[name]} {name}" for name in known)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "-"
    if isinstance(value, Mapping | list):
        return to_json(value)
    return one_line(str(value))


def format_info(info: Mapping[str, Any]) -> list[str]:
    """``daemon.info`` as aligned ``key: value`` lines."""
    keys = [key for key in _INFO_ORDER if key in info]
    keys += sorted(key for key in info if key not in _INFO_ORDER)
    labels = {key: _INFO_LABELS.get(key, key) for key in keys}
    width = max((len(label) for label in labels.values()), default=0) + 1
    return [f"{labels[key] + ':':<{width}} {_info_value(key, info[key])}" for key in keys]


def format_error(code: int, message: str) -> str:
    """``error -32602: level: must be one of ...``"""
    return f"error {code}: {one_line(message)}"
