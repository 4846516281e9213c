"""statusctl's text output: results in, lines out. Pure: no I/O, no trio, no client.

Human output is one line per item (supervisorctl style), so it greps and pipes well.
Lists have a header line and say so when they are empty. For a person at a terminal
(``Presentation``) times are local and states and levels are coloured; piped output keeps
the daemon's UTC timestamps and no colour, and ``--json`` is the daemon's values as they are.
Every piece of text that came from the daemon (task names, messages, URLs, topics,
errors: much of it written by other users) goes through ``one_line``, which shows
control and invisible format characters as escapes: a task name must not be able to
break the one-line rule, reorder what the reader sees, or send escape sequences to
an admin's terminal. ``to_json`` keeps ``--json`` exact JSON with none of them raw.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
import urllib.parse
from collections import deque
from collections.abc import Iterable, Mapping, Sequence, Set
from datetime import datetime
from typing import Any

import attrs

_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Controls (C0, DEL, C1: Cc), invisible format characters (bidi overrides such as U+202E,
# zero-width ones: Cf), line and paragraph separators (Zl, Zp) and lone surrogates (Cs,
# which a JSON string may carry and no terminal encoding can print) are shown escaped.
# Other characters print as themselves, other users' scripts and emoji included.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})

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
_INFO_LABELS = {"uptime_s": "uptime", "daemon_uid": "runs as"}
_SUMMARY_ORDER = ("total", "pending", "running", "completed", "failed", "cancelled")

# What one lost item of a stream is called, singular and plural.
_STREAM_NOUNS = {
    "status": ("status message", "status messages"),
    "tasks": ("task update", "task updates"),
    "notifications": ("notification", "notifications"),
}


def _escape(char: str) -> str:
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    if unicodedata.category(char) not in _ESCAPED_CATEGORIES:
        return char
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def one_line(text: str) -> str:
    """``text`` safe to print as (part of) one line of human output: newlines, other
    control characters and invisible format characters shown as ``\\n``, ``\\x1b``,
    ``\\u202e``. Escaping twice changes nothing: the escapes are printable ASCII.
    Backslashes are not doubled: this is for reading, not for parsing back."""
    if text.isprintable():
        # The common case, checked in C: str.isprintable() is false for every escaped
        # category (and for spaces other than " ", which the slow path keeps).
        return text
    return "".join(map(_escape, text))


# json.dumps escapes C0 controls but not DEL, nor anything beyond ASCII.
_MAYBE_UNSAFE = re.compile(r"[^\x00-\x7e]")


def _json_escape(match: re.Match[str]) -> str:
    char = match.group()
    if unicodedata.category(char) not in _ESCAPED_CATEGORIES:
        return char
    code = ord(char)
    if code > 0xFFFF:  # JSON spells a character beyond the BMP as a surrogate pair
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


def to_json(value: Any) -> str:
    """One JSON document on one line: for ``--json`` output and ``watch --json``.

    Non-ASCII text stays readable, except the characters ``one_line`` escapes: json.dumps
    escapes only C0 controls, so DEL, C1 controls, format characters, separators and lone
    surrogates are written as ``\\uXXXX`` here. They can only occur inside JSON strings,
    where that escape means the same character, so the document decodes to the same value.
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if text.isprintable():
        return text
    return _MAYBE_UNSAFE.sub(_json_escape, text)


# -- for people: times, colours, tables ----------------------------------------------------


@attrs.frozen
class Presentation:
    """How human output looks: colours and local times are for a person at a terminal."""

    colour: bool = False
    local_time: bool = False


PLAIN = Presentation()

# SGR parameters of each colour role: levels, task states, and the parts of a table.
_COLOURS = {
    "info": "36",
    "warning": "33",
    "error": "31",
    "success": "32",
    "pending": "2",
    "running": "36",
    "paused": "33",
    "completed": "32",
    "failed": "31",
    "cancelled": "33",
    "header": "1",
    "unread": "1",
}

Part = str | tuple[str, str]  # text, or (text, colour role)


class Styled(str):
    """A line of human output that knows which of its spans to colour.

    Its value is the plain text, so it compares, pads and prints as before; ``paint`` adds
    the colours. Built by ``styled``, which escapes every part: colour codes can only come
    from here, never from the daemon's text."""

    spans: tuple[tuple[int, int, str], ...]

    def __new__(cls, text: str, spans: Iterable[tuple[int, int, str]] = ()) -> Styled:
        line = super().__new__(cls, text)
        line.spans = tuple(spans)
        return line


def styled(*parts: Part) -> Styled:
    """``styled("#1 ", ("error", "error"), " disk full")``: a ``Styled`` line of the parts,
    each one escaped with ``one_line``, the tuples' text coloured as their role."""
    text: list[str] = []
    spans: list[tuple[int, int, str]] = []
    at = 0
    for part in parts:
        piece, role = (part, None) if isinstance(part, str) else part
        piece = one_line(piece)
        if role in _COLOURS and piece:
            spans.append((at, at + len(piece), role))
        text.append(piece)
        at += len(piece)
    return Styled("".join(text), spans)


def paint(line: str) -> str:
    """``line`` escaped as ``one_line`` does, in colour if it is a ``Styled`` line."""
    safe = one_line(line)
    if not isinstance(line, Styled) or safe != line:
        return safe  # escaping moved the text: its spans would colour the wrong columns
    out: list[str] = []
    at = 0
    for start, end, role in line.spans:
        out += [line[at:start], f"\x1b[{_COLOURS[role]}m", line[start:end], "\x1b[0m"]
        at = end
    out.append(line[at:])
    return "".join(out)


def format_time(value: Any, look: Presentation = PLAIN) -> str:
    """A timestamp from the daemon (``2026-11-23T10:30:00.123Z``) as given, or in local
    time to the second (``2026-11-23 11:30:00``) for a terminal; ``-`` for none."""
    if value is None:
        return "-"
    text = one_line(str(value))
    if not look.local_time:
        return text
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return text
    if moment.tzinfo is None:
        return text  # no zone given: converting it would be a guess
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def table(
    header: Sequence[str], rows: Iterable[Sequence[Part]], right: Iterable[int] = ()
) -> list[Styled]:
    """``rows`` under a ``header`` line (none if it is empty), two spaces between columns,
    each as wide as its widest cell, those in ``right`` aligned right. The last column is
    not padded, so a long name does not push the others."""
    cells = [[_cell(part) for part in row] for row in rows]
    if header:
        cells.insert(0, [(title, "header") for title in header])
    widths = [max(len(text) for text, _ in column) for column in zip(*cells, strict=True)]
    flush_right = frozenset(right)
    lines = []
    for row in cells:
        parts: list[Part] = []
        for index, (text, role) in enumerate(row):
            pad = " " * (widths[index] - len(text))
            cell: Part = (text, role) if role else text
            if index:
                parts.append("  ")
            if index in flush_right:
                parts += [pad, cell]
            elif index < len(row) - 1:
                parts += [cell, pad]
            else:
                parts.append(cell)
        lines.append(styled(*parts))
    return lines


def _cell(part: Part) -> tuple[str, str]:
    text, role = (part, "") if isinstance(part, str) else part
    return one_line(text), role


def format_status(
    message: Mapping[str, Any], reader: str | None = None, look: Presentation = PLAIN
) -> Styled:
    """``2026-11-23T10:30:00.123Z  #42 info     Disk full  (from alice)  [op-id]``: who
    published it when that is a user other than ``reader`` (an admin reads everyone's)."""
    level = one_line(str(message.get("level", "?")))
    parts: list[Part] = [
        format_time(message.get("timestamp"), look),
        f"  #{one_line(str(message.get('seq', '?')))} ",
        (level, level),
        " " * max(1, _LEVEL_WIDTH + 1 - len(level)),
        str(message.get("message", "")),
    ]
    user = message.get("user")
    if user is not None and user != reader:
        parts.append(f"  (from {one_line(str(user))})")
    operation_id = message.get("operation_id")
    if operation_id:
        parts.append(f"  [{one_line(str(operation_id))}]")
    return styled(*parts)


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


def format_notification(notification: Mapping[str, Any], look: Presentation = PLAIN) -> str:
    """``   12 * 2026-11-25T12:00:00.123Z  task_completed  Title: message  <link>``

    ``*`` marks an unread one; a system-wide one ends with ``(everyone)``.
    """
    mark = " " if notification.get("read") else "*"
    stamp = format_time(notification.get("created_at", "-"), look)
    kind = one_line(str(notification.get("type", "?")))
    line = f"{one_line(str(notification.get('id', '?'))):>5} {mark} {stamp}  {kind}  "
    return line + _notification_text(notification)


def _notification_text(notification: Mapping[str, Any]) -> str:
    text = one_line(str(notification.get("title", "")))
    message = notification.get("message")
    if message:
        text += f": {one_line(str(message))}"
    link = notification.get("link")
    if link:
        text += f"  <{one_line(str(link))}>"
    if notification.get("username", "") is None:
        text += "  (everyone)"
    return text


def format_notifications(
    notifications: Sequence[Mapping[str, Any]], unread_only: bool, look: Presentation = PLAIN
) -> list[Styled]:
    """The ``notifications`` list: a header, a line each (``*`` unread), or ``no ...``."""
    if not notifications:
        return [styled("no unread notifications" if unread_only else "no notifications")]
    rows: list[list[Part]] = [
        [
            str(notification.get("id", "?")),
            ("", "") if notification.get("read") else ("*", "unread"),
            format_time(notification.get("created_at"), look),
            str(notification.get("type", "?")),
            _notification_text(notification),
        ]
        for notification in notifications
    ]
    return table(("ID", "", "TIME", "TYPE", "NOTIFICATION"), rows, right=(0,))


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


def _info_value(key: str, value: Any, look: Presentation) -> str:
    if key == "started_at" and value is not None:
        return format_time(value, look)
    if key == "uptime_s" and isinstance(value, int | float) and not isinstance(value, bool):
        return format_duration(float(value))
    if key == "websocket" and value is None:
        return "off"
    if key == "daemon_uid":
        return f"uid {one_line(str(value))}"
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


def format_info(info: Mapping[str, Any], look: Presentation = PLAIN) -> list[str]:
    """``daemon.info`` as aligned ``key: value`` lines."""
    keys = [key for key in _INFO_ORDER if key in info]
    keys += sorted(key for key in info if key not in _INFO_ORDER)
    labels = {key: _INFO_LABELS.get(key, key) for key in keys}
    width = max((len(label) for label in labels.values()), default=0) + 1
    return [f"{labels[key] + ':':<{width}} {_info_value(key, info[key], look)}" for key in keys]


def format_error(message: str) -> str:
    """A daemon's error as statusctl says it: the message alone (``task t... is already
    cancelled``); its JSON-RPC code is for ``--json`` output."""
    return one_line(message)


# -- tasks and progress bars ----------------------------------------------------------------

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_FINAL_TASK_STATUSES = ("completed", "failed", "cancelled")
_MIN_BAR = 10  # a bar narrower than this says nothing; other fields go first
_MAX_BAR = 40
_MIN_NAME = 12  # a name is not cut shorter than this while fields can go instead
_RATE_WINDOW = 5.0  # seconds of samples a rate is measured over
_MAX_RATE_SAMPLES = 64


def format_bytes(count: int | float) -> str:
    """``1536`` -> ``1.5 KiB``; under 1 KiB, ``512 B``."""
    value = float(count)
    for unit in _BYTE_UNITS:
        if abs(value) < 1024 or unit == _BYTE_UNITS[-1]:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_rate(bytes_per_second: float) -> str:
    return f"{format_bytes(bytes_per_second)}/s"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(value: Any, default: float = 0) -> float:
    return float(value) if _is_number(value) else default


def task_fraction(task: Mapping[str, Any]) -> float:
    """How far a task (TaskInfo or job_update) is, 0.0 to 1.0: by bytes when the total
    is known (a single large file moves smoothly), else by items. A failed item is not
    progress, and its size (none, or a part kept for a retry) says nothing of what was
    saved: a task that failed or was cancelled counts the items its result (``results``
    in its last push) says completed, and one without a result holding no bytes got
    nowhere.

    The daemon's ``progress`` field follows the same rule (``progress_of`` in
    statusd/state/tasks.py); it is applied here too, so that a bar moves by the byte rather
    than by the field's hundredths and a daemon from before that rule (which gave a failed
    task 100) reads the same. The dashboard keeps it in ``taskFraction``
    (statusd/web/dashboard.js); tests/test_progress_rule.py holds all three to one table."""
    status = task.get("task_status", task.get("status"))
    if status == "completed":
        return 1.0
    done = _number(task.get("bytes_done"))
    if status in ("failed", "cancelled"):
        result = task.get("result", task.get("results"))
        completed = result.get("completed") if isinstance(result, Mapping) else None
        items = _number(task.get("total_items", task.get("total")))
        if _is_number(completed) and items > 0:
            return _clamp(_number(completed) / items)
        if done <= 0:
            return 0.0
    total = _number(task.get("bytes_total"))
    if total > 0:
        return _clamp(done / total)
    return _clamp(_number(task.get("progress")) / 100)


def _clamp(fraction: float) -> float:
    return min(1.0, max(0.0, fraction))


def _cut(text: str, width: int) -> str:
    if width <= 0:
        return ""
    if len(text) <= width:
        return text
    return text[: width - 3] + "..." if width > 3 else text[:width]


def _cut_middle(text: str, width: int) -> str:
    """A file name cut in the middle keeps its extension: ``ubuntu-24.0...amd64.iso``."""
    if len(text) <= width or width < 9:
        return _cut(text, width)
    tail = (width - 3) // 2
    return text[: width - 3 - tail] + "..." + text[len(text) - tail :]


def file_name(url: str) -> str:
    """The last part of a URL's path, decoded (``.../a%20b.iso?x=1`` -> ``a b.iso``); the
    URL itself (escaped) when it has none. For labels, not for saving files."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return one_line(url)
    name = urllib.parse.unquote(parts.path.rstrip("/").rpartition("/")[2])
    return one_line(name or parts.netloc or url)


def task_label(task: Mapping[str, Any]) -> str:
    """What a bar calls a task: its name, or the file name when the name is its URL (a
    single-URL task is named after it, and the whole URL took most of a bar's line)."""
    name = str(task.get("name") or task.get("job_id") or task.get("id") or "task")
    return file_name(name) if "://" in name else one_line(name)


def format_eta(seconds: float) -> str:
    """``4`` -> ``4s``; ``65`` -> ``1m05s``; ``7380`` -> ``2h03m``; ``90000`` -> ``1d01h``."""
    whole = max(0, math.ceil(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _size_field(done: float, total: float) -> str:
    """``6.9/16.0 MiB`` (one unit said once), ``512.0 KiB/2.0 GiB``, or ``6.9 MiB``."""
    if total <= 0:
        return format_bytes(done) if done > 0 else ""
    have, whole = format_bytes(done), format_bytes(total)
    have_number, _, have_unit = have.partition(" ")
    if whole.endswith(f" {have_unit}") and have_unit != "B":
        return f"{have_number}/{whole}"
    return f"{have}/{whole}"


def _speed_fields(task: Mapping[str, Any], rate: float | None) -> list[str]:
    """``3.9 MiB/s  eta 2s``: the daemon's smoothed rate and ETA (``bytes_per_second``,
    ``eta_s``); from an older daemon without them, ``rate`` as statusctl measured it."""
    eta: float | None = None
    if _is_number(task.get("bytes_per_second")):
        rate = _number(task.get("bytes_per_second"))
        eta = _number(task.get("eta_s")) if _is_number(task.get("eta_s")) else None
    else:
        total, done = _number(task.get("bytes_total")), _number(task.get("bytes_done"))
        if rate and total > 0:
            eta = max(0.0, total - done) / rate
    if rate is None:
        return []
    fields = [format_rate(rate)]
    if _number(task.get("bytes_total")) > 0:
        fields.append("eta --" if eta is None else f"eta {format_eta(eta)}")
    return fields


def progress_line(task: Mapping[str, Any], width: int, rate: float | None = None) -> str:
    """One terminal line for a task (TaskInfo or job_update), at most ``width`` columns:

    ``ubuntu.iso [=========>          ]   45.2%  7.2/16.0 MiB  4.1 MiB/s  eta 3s``

    and, for a task of several items, ``3/10`` and the file being fetched. The rate and
    ETA are the daemon's (``rate``: statusctl's own measure, for a daemon that sends none);
    a stalled transfer shows ``0 B/s  eta --``. A task that is not running says what it is
    instead (``completed``, ``failed``, ``paused``, ...). Fields leave from the right as
    the terminal narrows, then the name is cut in the middle; the bar keeps at least 10
    columns while there is room for it.
    """
    fraction = task_fraction(task)
    name = task_label(task)
    total_items = int(_number(task.get("total", task.get("total_items"))))
    status = str(task.get("task_status", task.get("status", "")))
    tail = [
        f"{fraction * 100:5.1f}%",
        _size_field(_number(task.get("bytes_done")), _number(task.get("bytes_total"))),
    ]
    if status == "running":
        tail += _speed_fields(task, rate)
    elif status:
        tail.append(one_line(status))
    if total_items != 1:
        processed = int(_number(task.get("processed", task.get("processed_items"))))
        tail.append(f"{processed}/{total_items}")
        current = task.get("current_item")
        if current and status == "running":
            tail.append(file_name(str(current)))
    fields = [field for field in tail if field]
    shortest_name = min(len(name), _MIN_NAME)
    # Optional fields leave from the right until a shortened name and a minimal bar fit.
    while len(fields) > 1 and shortest_name + 3 + _MIN_BAR + 2 + len("  ".join(fields)) > width:
        fields.pop()
    fixed = "  ".join(fields)
    room = width - len(fixed) - 2 - 3  # "  " before the fields, " [" and "]" around the bar
    if room - shortest_name < _MIN_BAR:
        # Too narrow for a bar: how far it is matters more than the whole name.
        short = _cut_middle(name, max(_MIN_NAME, width - len(fixed) - 2))
        return _cut(f"{short}  {fixed}", width)
    bar_width = min(_MAX_BAR, max(_MIN_BAR, room - len(name)))
    name = _cut_middle(name, room - bar_width)
    filled = int(fraction * bar_width)
    bar = ("=" * filled + ">").ljust(bar_width)[:bar_width]
    return f"{name} [{bar}]  {fixed}"


def format_task_update(update: Mapping[str, Any]) -> str:
    """A ``task_update`` push as one plain line, for logs and pipes:

    ``t2026...-ab12cd34  progress      45.2%  3/10  12.0 MiB  4.1 MiB/s  Processed 3 of 10``

    (the rate, and the ETA when the size is known, while the task runs).
    """
    fraction = task_fraction(update)
    items = f"{update.get('processed', 0)}/{update.get('total', 0)}"
    parts = [
        one_line(str(update.get("job_id", "?"))),
        f"{one_line(str(update.get('status', '?'))):<12} {fraction * 100:5.1f}%",
        items,
    ]
    done, total = _number(update.get("bytes_done")), _number(update.get("bytes_total"))
    if done > 0:
        parts.append(
            f"{format_bytes(done)}/{format_bytes(total)}" if total > 0 else format_bytes(done)
        )
    if update.get("task_status") == "running":
        parts += _speed_fields(update, None)
    parts.append(one_line(str(update.get("message", ""))))
    return "  ".join(parts)


def format_item_event(update: Mapping[str, Any]) -> Styled | None:
    """What a push says happened to one item, as a line of its own, or None:

    ``big.iso: retrying in 4 s (attempt 2 of 5): http 503 service unavailable``
    ``missing.iso: failed: http 404 not found``
    """
    retry = update.get("item_retry")
    if isinstance(retry, Mapping):
        delay = f"{round(_number(retry.get('delay_s')), 1):g}"
        if retry.get("counted") is False:
            # The attempt made progress: it is not counted, and the next one resumes.
            what = f"resuming in {delay} s"
            why = f" (not counted as an attempt): {retry.get('reason')}"
        else:
            what = f"retrying in {delay} s"
            why = (
                f" (attempt {retry.get('attempt')} of {retry.get('max_attempts')}):"
                f" {retry.get('reason')}"
            )
        return styled(f"{file_name(str(retry.get('url', '?')))}: ", (what, "warning"), why)
    failed = update.get("item_failed")
    if isinstance(failed, Mapping):
        return format_item_failure(str(failed.get("url", "?")), str(failed.get("error", "?")))
    return None


def format_item_failure(url: str, error: str) -> Styled:
    return styled(f"{file_name(url)}: ", ("failed", "error"), f": {error}")


def _elapsed(task: Mapping[str, Any]) -> float | None:
    try:
        started = datetime.fromisoformat(str(task.get("started_at")))
        ended = datetime.fromisoformat(str(task.get("completed_at")))
    except ValueError:
        return None
    seconds = (ended - started).total_seconds()
    return seconds if seconds > 0 else None


_LISTED_ITEMS = 20  # saved files (and failures) named one by one at a task's end


def format_task_end(
    task: Mapping[str, Any], failures_shown: Set[int] = frozenset(), width: int | None = None
) -> list[Styled]:
    """The lines that close ``download --wait`` and ``watch --task``, from the TaskInfo of
    the ended task: each failed item's reason (those not in ``failures_shown``, item
    indices already printed as they happened), where each file went and its size, and a
    last line with the average rate:

    ``saved /srv/dl/ubuntu.iso: 16.0 MiB in 4.1s (3.9 MiB/s)``

    On a terminal ``width`` columns wide, a line that would not fit names the file and
    gives its directory on a line of its own (see ``saved_lines``).
    """
    status = one_line(str(task.get("status", "?")))
    result = task.get("result")
    raw_items = result.get("items") if isinstance(result, Mapping) else None
    items = [item for item in raw_items or [] if isinstance(item, Mapping)]
    saved = [item for item in items if not item.get("error") and item.get("path")]
    failed = [(index, item) for index, item in enumerate(items) if item.get("error") is not None]
    lines = [
        format_item_failure(str(item.get("url", "?")), str(item["error"]))
        for index, item in failed
        if index not in failures_shown
    ][:_LISTED_ITEMS]
    size = sum(_number(item.get("bytes")) for item in saved)
    elapsed = _elapsed(task)
    speed = ""
    if elapsed is not None and size > 0:
        speed = f" in {format_duration(elapsed)} ({format_rate(size / elapsed)})"
    if len(saved) == 1 and not failed:
        return [*lines, *saved_lines(str(saved[0]["path"]), f"{format_bytes(size)}{speed}", width)]
    for item in saved[:_LISTED_ITEMS]:
        lines += saved_lines(str(item["path"]), format_bytes(_number(item.get("bytes"))), width)
    if len(saved) > _LISTED_ITEMS:
        lines.append(styled(f"... and {len(saved) - _LISTED_ITEMS} more saved"))
    files = f"{len(saved)} {'file' if len(saved) == 1 else 'files'}"
    said: Part = (status, status)  # coloured as the task's state
    if not items:
        error = task.get("error")
        lines.append(styled(said, f": {error}") if error and error != status else styled(said))
    elif failed:
        rest = f"; {files} saved{speed}" if saved else ", nothing saved"
        lines.append(styled(said, f": {len(failed)} of {len(items)} failed{rest}"))
    else:
        lines.append(styled(said, f": {files} saved, {format_bytes(size)}{speed}"))
    return lines


def saved_lines(path: str, what: str, width: int | None = None) -> list[Styled]:
    """``saved PATH: WHAT``, or, when that is wider than ``width`` (a terminal's, which
    would wrap it mid-path), the file's name and its directory on a line of its own:

    ``saved ubuntu-24.04-desktop-amd64.iso: 16.0 MiB in 4.1s (3.9 MiB/s)``
    ``  in /srv/downloads/alice/nightly/``

    Nothing of the path is cut: it is what a person copies to open the file."""
    line = styled(("saved", "success"), f" {path}: {what}")
    if width is None or len(line) <= width:
        return [line]
    directory, slash, name = path.rpartition("/")
    if not slash or not name:
        return [line]
    return [styled(("saved", "success"), f" {name}: {what}"), styled(f"  in {directory}/")]


class RateMeter:
    """Bytes per second of one task, over the last few seconds of its updates.

    Pure: the caller passes the clock reading (``time.monotonic()`` in statusctl).
    """

    def __init__(self, window: float = _RATE_WINDOW) -> None:
        self._window = window
        self._samples: deque[tuple[float, float]] = deque(maxlen=_MAX_RATE_SAMPLES)

    def sample(self, now: float, bytes_done: float) -> float | None:
        """Record ``bytes_done`` at ``now``; the rate, once two samples span some time."""
        if self._samples and bytes_done < self._samples[-1][1]:
            self._samples.clear()  # a restart from zero: earlier samples mean nothing now
        self._samples.append((now, bytes_done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self._window:
            self._samples.popleft()
        first_time, first_bytes = self._samples[0]
        span = now - first_time
        if span < 0.2:
            return None
        return max(0.0, (bytes_done - first_bytes) / span)


def format_changed(done: str, count: int) -> str:
    """What ``cancel --all`` and the like did: ``paused 3 tasks``."""
    return f"{done} {count} {'task' if count == 1 else 'tasks'}"


# -- tasks and tokens, for people --------------------------------------------------------------

_TASK_HEADER = ("ID", "STATUS", "PROGRESS", "ITEMS", "CREATED", "NAME")


def _task_row(task: Mapping[str, Any], look: Presentation) -> list[Part]:
    status = str(task.get("status", "?"))
    return [
        str(task.get("id", "?")),
        (status, status),
        f"{task_fraction(task) * 100:.1f}%",
        f"{task.get('processed_items', 0)}/{task.get('total_items', 0)}",
        format_time(task.get("created_at"), look),
        str(task.get("name", "")),
    ]


def format_tasks(
    tasks: Sequence[Mapping[str, Any]], status: str | None = None, look: Presentation = PLAIN
) -> list[Styled]:
    """The ``tasks`` list: a header and a line each, or ``no tasks`` (``no paused tasks``)."""
    if not tasks:
        return [styled(f"no {status} tasks" if status else "no tasks")]
    return table(_TASK_HEADER, [_task_row(task, look) for task in tasks], right=(2, 3))


def format_task_line(task: Mapping[str, Any], look: Presentation = PLAIN) -> Styled:
    """One task as a line of the ``tasks`` list, without the header."""
    return table((), [_task_row(task, look)])[0]


# TaskInfo fields shown by ``format_task`` in their own way, or folded into another line.
_TASK_SHOWN = frozenset(
    {
        "id",
        "name",
        "kind",
        "owner",
        "status",
        "topic",
        "created_at",
        "started_at",
        "completed_at",
        "progress",
        "total_items",
        "processed_items",
        "current_item",
        "bytes_done",
        "bytes_total",
        "bytes_per_second",
        "eta_s",
        "rate_limit",
        "error",
        "result",
        "metadata",
    }
)


def format_task(task: Mapping[str, Any], look: Presentation = PLAIN) -> list[Styled]:
    """``task ID``: a ``field: value`` line each, for people (sizes, local times, no empty
    fields), then one line per item of its result: ``ok``/``failed``, URL, file or reason."""
    status = str(task.get("status", "?"))
    fields: list[tuple[str, Part]] = [
        ("id", str(task.get("id", "?"))),
        ("name", str(task.get("name", ""))),
        ("status", (status, status)),
        ("kind", str(task.get("kind", "?"))),
        ("owner", str(task.get("owner", "?"))),
        ("topic", _text_or_none(task.get("topic"))),
        ("created", format_time(task.get("created_at"), look)),
        ("started", _time_or_none(task.get("started_at"), look)),
        ("ended", _ended(task, look)),
        ("progress", _task_progress(task)),
        ("rate", _rate(task)),
        ("eta", _eta(task)),
        ("rate limit", _rate_limit(task)),
        ("current", _text_or_none(task.get("current_item"))),
        ("error", _text_or_none(task.get("error"))),
    ]
    metadata = task.get("metadata")
    if isinstance(metadata, Mapping):
        fields += [(str(key), _value(value)) for key, value in metadata.items()]
    # Fields of a newer daemon still show, as plainly as they can.
    fields += [(str(key), _value(value)) for key, value in task.items() if key not in _TASK_SHOWN]
    shown = [(label, value) for label, value in fields if value]
    width = max(len(one_line(label)) for label, _ in shown) + 1
    lines = [styled(f"{one_line(label) + ':':<{width}} ", value) for label, value in shown]
    return lines + _task_items(task.get("result"))


def _text_or_none(value: Any) -> str:
    return "" if value is None or value == "" else str(value)


def _time_or_none(value: Any, look: Presentation) -> str:
    return "" if value is None else format_time(value, look)


def _ended(task: Mapping[str, Any], look: Presentation) -> str:
    ended = task.get("completed_at")
    if ended is None:
        return ""
    text = format_time(ended, look)
    try:
        took = datetime.fromisoformat(str(ended)) - datetime.fromisoformat(
            str(task.get("started_at"))
        )
    except (TypeError, ValueError):
        return text
    return f"{text} (took {format_duration(max(0.0, took.total_seconds()))})"


def _task_progress(task: Mapping[str, Any]) -> str:
    text = f"{task_fraction(task) * 100:.1f}%"
    total = task.get("total_items")
    if isinstance(total, int):
        noun = "item" if total == 1 else "items"
        text += f", {task.get('processed_items', 0)} of {total} {noun}"
    done, size = _number(task.get("bytes_done")), _number(task.get("bytes_total"))
    if size > 0:
        text += f", {format_bytes(done)} of {format_bytes(size)}"
    elif done > 0:
        text += f", {format_bytes(done)}"
    return text


def _rate(task: Mapping[str, Any]) -> str:
    rate = task.get("bytes_per_second")
    if task.get("status") != "running" or not isinstance(rate, int | float):
        return ""
    return format_rate(float(rate))


def _rate_limit(task: Mapping[str, Any]) -> str:
    limit = task.get("rate_limit")
    return format_rate(float(limit)) if _is_number(limit) and limit else ""


def _eta(task: Mapping[str, Any]) -> str:
    eta = task.get("eta_s")
    if task.get("status") != "running" or not isinstance(eta, int | float):
        return ""
    return format_duration(float(eta))


def _value(value: Any) -> str:
    """Any other value, for people: no Python reprs, nothing for none."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping | list):
        return to_json(value)
    return str(value)


def _task_items(result: Any) -> list[Styled]:
    items = result.get("items") if isinstance(result, Mapping) else None
    if not isinstance(items, list) or not items:
        return []
    failed = sum(1 for item in items if isinstance(item, Mapping) and item.get("error"))
    lines = [styled(f"items: {len(items) - failed} ok, {failed} failed")]
    for item in items:
        if not isinstance(item, Mapping):
            continue
        parts: list[Part] = ["  "]
        if item.get("error"):
            parts += [("failed", "failed"), f"  {item.get('url')}: {item.get('error')}"]
        else:
            parts += [("ok", "completed"), f"      {item.get('url')}"]
            if item.get("path") is not None:
                parts.append(f" -> {item.get('path')}")
            if isinstance(item.get("bytes"), int):
                parts.append(f" ({format_bytes(item['bytes'])})")
        lines.append(styled(*parts))
    return lines


def format_tokens(tokens: Sequence[Mapping[str, Any]], look: Presentation = PLAIN) -> list[Styled]:
    """``token list``: a header and a line each (never a secret), or ``no tokens``."""
    if not tokens:
        return [styled("no tokens")]
    rows = [
        [
            str(token.get("token_id", "?")),
            str(token.get("username", "?")),
            str(token.get("scope", "?")),
            format_time(token.get("created_at"), look),
            "never" if token.get("expires_at") is None else format_time(token["expires_at"], look),
        ]
        for token in tokens
    ]
    return table(("ID", "USER", "SCOPE", "CREATED", "EXPIRES"), rows)
