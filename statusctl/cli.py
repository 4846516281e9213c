"""The ``statusctl`` command: argv -> requests to statusd -> lines on stdout and an exit status.

Every command is one row of ``COMMANDS``: a name, a help line, a function that adds its
arguments and a function that runs it against a ``Context`` (supervisorctl's ``do_*``
methods, as a table). Running a command is a few calls and a ``render`` function; errors
are turned into exit statuses in one place, ``main``:

  0 success; 1 the thing waited on failed, or stdout went away; 2 usage (argparse);
  3 the daemon is not reachable, or went away (and, for ``watch`` and ``download --wait``,
  did not come back within ``RECONNECT_FOR``); 4 the daemon answered with an error;
  130 Ctrl-C (after saying how to find the task again, when one was being waited for).

``--json`` prints exactly one JSON document on stdout (the method's result, or the error
object when the daemon answered with one); ``watch --json`` prints one per line.

Whatever is printed, on stdout or stderr, goes through ``render.one_line`` on its way out
(``Context.line``, ``Context.complain``, ``TaskDisplay``): text from the daemon, much of it
written by other users, never reaches the terminal with a raw control or format character.
Colours (``Context.look``: on a terminal, unless ``NO_COLOR``) come only from
``render.paint``, which escapes the same way.

``watch`` and ``download --wait`` show task progress as bars redrawn in place when stdout
is a terminal (``TaskDisplay``; the bar lines themselves are ``render.progress_line``), and
as one plain line per update otherwise.

The blocking ``Client`` is used rather than trio: a command is a request or two, and a
blocked ``recv`` turns Ctrl-C into ``KeyboardInterrupt`` with no extra machinery.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import attrs

from statusctl import __version__, dashboard, render
from statusctl.client import (
    SOCKET_ENV,
    SYSTEM_SOCKET,
    Backoff,
    Client,
    ConnectionLost,
    DaemonUnreachable,
    Push,
    RemoteError,
    StatusCursor,
)
from statusctl.completion import SHELLS, completion_script
from statusd.cli import build_parser as build_daemon_parser
from statusd.errors import BUSY, CONFLICT, NOT_FOUND
from statusd.identity import username_for
from statusd.protocol.headers import check_headers
from statusd.state.bandwidth import parse_rate
from statusd.tokens import split_token

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_REMOTE_ERROR = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C

COLOR_CHOICES = ("auto", "always", "never")


@attrs.define
class Context:
    """What a command runs with: where the daemon is, how to print, and the connection
    (made on first use, so a command that needs none never connects)."""

    socket_path: Path | None  # None: the first of socket_candidates() that answers
    json: bool
    stdout: TextIO
    stderr: TextIO
    look: render.Presentation = render.PLAIN
    _client: Client | None = None

    @functools.cached_property
    def username(self) -> str:
        """Who the daemon takes us for on its socket: our uid's name, as it looks it up."""
        return username_for(os.getuid())

    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.socket_path)
        return self._client

    def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        return self.client().call(method, params)

    def emit(self, result: Any, lines: Iterable[str]) -> None:
        """The result as one JSON document with ``--json``, else as text lines."""
        if self.json:
            self.line(render.to_json(result))
        else:
            for line in lines:
                self.line(line)

    def line(self, text: str) -> None:
        # Flushed per line: ``watch`` output is read live through pipes.
        safe = render.paint(text) if self.look.colour else render.one_line(text)
        self.stdout.write(safe + "\n")
        self.stdout.flush()

    def complain(self, text: str) -> None:
        """``statusctl: text`` on stderr; daemon errors are other users' text too."""
        self.stderr.write(f"statusctl: {render.one_line(text)}\n")
        self.stderr.flush()

    def reconnect(self) -> None:
        """A new connection in place of a lost one (``DaemonUnreachable`` if none answers)."""
        self.close()
        self._client = None
        self._client = Client(self.socket_path)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


Runner = Callable[[Context, argparse.Namespace], int]
Configure = Callable[[argparse.ArgumentParser], None]


def _no_arguments(_parser: argparse.ArgumentParser) -> None:
    pass


@attrs.frozen
class Command:
    name: str
    help: str
    run: Runner
    arguments: Configure = _no_arguments


# -- commands --------------------------------------------------------------------------------


def run_info(context: Context, _args: argparse.Namespace) -> int:
    info = context.call("daemon.info")
    context.emit(info, render.format_info(info, context.look))
    return EXIT_OK


def publish_arguments(parser: argparse.ArgumentParser) -> None:
    # LEVEL is not limited to choices here: the daemon is the authority on levels, and
    # its -32602 names the ones it accepts.
    parser.add_argument("level", metavar="LEVEL", help="info, warning, error or success")
    parser.add_argument("message", metavar="MESSAGE", help="the text (cut to 200 characters)")
    parser.add_argument("--operation-id", metavar="ID", help="groups related messages")
    parser.add_argument(
        "--all",
        action="store_true",
        help="for every user (admins only); without it, for you and the admins",
    )


def run_publish(context: Context, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"level": args.level, "message": args.message}
    if args.operation_id is not None:
        params["operation_id"] = args.operation_id
    if args.all:
        params["audience"] = "all"
    result = context.call("status.publish", params)
    context.emit(result, [str(result["seq"])])
    return EXIT_OK


def status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", metavar="SEQ", type=int, help="only messages with a greater seq")


def run_status(context: Context, args: argparse.Namespace) -> int:
    params = {} if args.since is None else {"since": args.since}
    result = context.call("status.recent", params)
    lines: list[str] = []
    dropped = result.get("dropped", 0)
    if isinstance(dropped, int) and dropped > 0:
        lines.append(render.format_history_gap(dropped))
    lines.extend(
        render.format_status(message, context.username, context.look)
        for message in result.get("messages", [])
    )
    context.emit(result, lines)
    return EXIT_OK


def watch_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--task",
        metavar="ID",
        help="follow one task and end with it: exit 0 completed, 1 failed or cancelled",
    )
    which.add_argument("--topic", metavar="TOPIC", help="the tasks of this topic only")
    parser.add_argument(
        "--status-only", action="store_true", help="status messages only, no task updates"
    )


def run_watch(context: Context, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"status": True}
    if args.task is not None:
        params["tasks"] = [args.task]
    elif args.topic is not None:
        params["topic"] = args.topic
    elif not args.status_only:
        params["tasks"] = "all"
    display = TaskDisplay(context)
    follow = _Follow(context, display, args.task, args.topic, args.status_only)
    cursor = StatusCursor()
    try:
        _subscribe(context, params, cursor)
        ended = follow.begin()
        if ended is not None:
            return ended
        ended = _keep_following(context, follow, params, cursor)
        if args.task is not None and not context.json:
            display.summary(context.call("tasks.get", {"task_id": args.task}))
        return ended
    except KeyboardInterrupt:
        if args.task is None:
            return EXIT_OK  # Ctrl-C is how a watch of everything (or of a topic) ends
        _say_it_goes_on(context, args.task)
        return EXIT_INTERRUPTED
    finally:
        display.close()


FINAL_STATUSES = ("completed", "failed", "cancelled")
_FINAL_UPDATES = ("completed", "error", "cancelled")
# How long ``watch`` and ``download --wait`` try to reconnect after the daemon went away
# (a restart takes a second or two; a daemon that is being upgraded, a little more).
RECONNECT_FOR = 60.0
RECONNECT_BACKOFF = (0.1, 5.0)  # the first wait between attempts, and the longest


def _exit_status(task_status: Any) -> int:
    return EXIT_OK if task_status == "completed" else EXIT_FAILED


def _subscribe(context: Context, params: Mapping[str, Any], cursor: StatusCursor) -> None:
    subscription = dict(params)
    if params.get("status"):
        subscription["since"] = cursor.since(context.call("daemon.info"))
    context.call("subscribe", subscription)


def _keep_following(
    context: Context, follow: _Follow, params: Mapping[str, Any], cursor: StatusCursor
) -> int:
    """Hand every push to ``follow`` until the followed task ends (or forever).

    When the daemon goes away (a restart), reconnect and subscribe again: status messages
    resume with ``since``; the tasks being followed are looked at afresh, since their
    updates meanwhile are lost. A task the restart interrupted goes on as the daemon's
    rules say (queued again), and the wait still ends with its final state."""
    while True:
        try:
            while True:
                push = context.client().next_push()
                if push.method == "status":
                    cursor.seen(push.params)
                if (ended := follow.push(push)) is not None:
                    return ended
        except ConnectionLost:
            if (ended := _resume(context, follow, params, cursor)) is not None:
                return ended


def _resume(
    context: Context, follow: _Follow, params: Mapping[str, Any], cursor: StatusCursor
) -> int | None:
    """Connect and subscribe again, with back-off, for up to ``RECONNECT_FOR`` seconds
    (then the last ``DaemonUnreachable`` goes up: exit 3); the followed task's exit
    status if it ended meanwhile."""
    follow.notice("daemon went away; reconnecting...")
    backoff = Backoff(*RECONNECT_BACKOFF)
    deadline = time.monotonic() + RECONNECT_FOR
    while True:
        try:
            context.reconnect()
            _subscribe(context, params, cursor)
            return follow.catch_up()
        except DaemonUnreachable:
            left = deadline - time.monotonic()
            if left <= 0:
                follow.notice(f"no daemon for {RECONNECT_FOR:g} s; giving up")
                raise
            time.sleep(min(backoff.next(), left))


def _command_name(context: Context) -> str:
    """How to call statusctl for this daemon again, in a line of advice."""
    command = "statusctl"
    if context.socket_path is not None:
        command += f" --socket {shlex.quote(str(context.socket_path))}"
    return command


def _say_it_goes_on(context: Context, task_id: str) -> None:
    """After Ctrl-C: the daemon carries on with the task; how to find it again."""
    command = _command_name(context)
    if _is_terminal(context.stderr):
        context.stderr.write("\n")  # past the ^C the terminal echoed
    context.complain(f"stopped following {task_id}; the task goes on")
    for line in (
        f"follow it: {command} watch --task {task_id}",
        f"cancel it: {command} cancel {task_id}",
    ):
        context.stderr.write(f"  {render.one_line(line)}\n")
    context.stderr.flush()


@attrs.define
class _Follow:
    """What ``watch`` (and ``download --wait``) does with each push: filter, print, and
    say when the task followed has ended."""

    context: Context
    display: TaskDisplay
    task_id: str | None
    topic: str | None
    status_only: bool
    pushes_as_json: bool = True
    topic_tasks: set[str] = attrs.Factory(set)  # ids of the topic's tasks seen so far
    unfinished: set[str] = attrs.Factory(set)  # ids of followed tasks last seen unfinished

    def begin(self) -> int | None:
        """Just subscribed: the followed tasks as they are; the exit status if the task
        followed has ended already."""
        if self.task_id is not None:
            # Subscribed first, so nothing between this answer and the next push is lost.
            task = self.context.call("tasks.get", {"task_id": self.task_id})
            if task["status"] in FINAL_STATUSES:
                lines = [render.format_task_line(task, self.context.look)]
                end = render.format_task_end(task, width=self.display.line_width())
                self.context.emit(task, [*lines, *end])
                return _exit_status(task["status"])
            self.display.show(task)
            self.unfinished.add(self.task_id)
        elif self.topic is not None:
            self.topic_tasks.update(
                task["id"]
                for task in all_tasks(self.context.call)["tasks"]
                if task.get("topic") == self.topic
            )
        return None

    def catch_up(self) -> int | None:
        """Subscribed again after the daemon went away: each followed task as it is now,
        shown as an update; the exit status if the task followed ended meanwhile."""
        for task_id in sorted(self.unfinished):
            try:
                task = self.context.call("tasks.get", {"task_id": task_id})
            except RemoteError as error:
                if error.code != NOT_FOUND:
                    raise
                self.unfinished.discard(task_id)  # cleaned up meanwhile
                continue
            if (ended := self.push(Push("task_update", _as_update(task)))) is not None:
                return ended
        return None

    def notice(self, text: str) -> None:
        """Something about statusctl itself: on stderr, unless bars are being drawn
        (writing to the terminal behind their back would break the redraw)."""
        if self.display.live:
            self.display.message(f"statusctl: {text}")
        else:
            self.context.complain(text)

    def push(self, push: Push) -> int | None:
        """Handle one push; the exit status once the followed task has ended."""
        params = push.params if isinstance(push.params, dict) else {}
        if push.method == "task_update":
            job_id = params.get("job_id")
            if self.topic is not None and params.get("topic") == self.topic:
                self.topic_tasks.add(str(job_id))
            if self.task_id is not None and job_id != self.task_id:
                return None
            if params.get("status") in _FINAL_UPDATES:
                self.unfinished.discard(str(job_id))
            else:
                self.unfinished.add(str(job_id))
            if not self.status_only:
                self._print(push, lambda: self.display.update(params))
            if self.task_id is not None and params.get("status") in _FINAL_UPDATES:
                return EXIT_OK if params.get("status") == "completed" else EXIT_FAILED
        elif push.method == "status":
            if self._wanted_status(params):
                line: str = render.format_status(params, self.context.username, self.context.look)
                self._print(push, lambda: self.display.message(line))
        else:
            line = render.format_push(push.method, push.params)
            self._print(push, lambda: self.display.message(line))
        return None

    def _wanted_status(self, message: Mapping[str, Any]) -> bool:
        if self.task_id is not None:
            return bool(message.get("operation_id") == self.task_id)
        if self.topic is not None:
            return message.get("operation_id") in self.topic_tasks
        return True

    def _print(self, push: Push, show: Callable[[], None]) -> None:
        if self.context.json:
            if self.pushes_as_json:
                self.context.line(render.to_json(push.to_wire()))
        else:
            show()


# What a task's status is called in a job_update.
_UPDATE_STATUS = {"completed": "completed", "failed": "error", "cancelled": "cancelled"}


def _as_update(task: Mapping[str, Any]) -> dict[str, Any]:
    """A TaskInfo in the shape of the ``task_update`` it would have been pushed as: what
    ``watch`` shows after a reconnection, for the updates it missed."""
    status = str(task.get("status"))
    update = {
        "type": "job_update",
        "job_id": task.get("id"),
        "timestamp": task.get("completed_at") or _utc_now(),
        "status": _UPDATE_STATUS.get(status, "progress"),
        "task_status": status,
        "progress": task.get("progress", 0.0),
        "processed": task.get("processed_items", 0),
        "total": task.get("total_items", 0),
        "message": task.get("error") or f"Task {status}",
        "topic": task.get("topic"),
    }
    # The byte counters and whatever else a newer daemon shows in both, under one name.
    update.update((key, task[key]) for key in task.keys() - _TASK_INFO_ONLY - update.keys())
    return update


def _utc_now() -> str:
    """Now, written as the daemon writes its timestamps."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_TASK_INFO_ONLY = frozenset(
    {"id", "name", "kind", "owner", "status", "created_at", "started_at", "completed_at"}
    | {"processed_items", "total_items", "result", "error", "metadata"}
)


class TaskDisplay:
    """Task progress on stdout: on a terminal, one bar per active task, redrawn in place
    below the lines printed so far; elsewhere one plain line per update."""

    def __init__(self, context: Context) -> None:
        self._context = context
        self._live = not context.json and _is_terminal(context.stdout)
        self._tasks: dict[str, dict[str, Any]] = {}  # active ones, in order of arrival
        self._rates: dict[str, render.RateMeter] = {}
        self._drawn = 0  # bar lines now on the screen below the cursor's line
        # Per task, the items whose failure was printed as it happened (not again at the end).
        self._failures_shown: dict[str, set[int]] = {}

    @property
    def live(self) -> bool:
        return self._live

    def show(self, task: Mapping[str, Any]) -> None:
        """Start a bar from a TaskInfo (``tasks.get``); nothing when not live."""
        if self._live:
            self._tasks[str(task["id"])] = dict(task)
            self._redraw([])

    def update(self, update: Mapping[str, Any]) -> None:
        job_id = str(update.get("job_id"))
        failed = update.get("item_failed")
        if isinstance(failed, Mapping) and isinstance(failed.get("index"), int):
            self._failures_shown.setdefault(job_id, set()).add(failed["index"])
        if not self._live:
            self._context.line(render.format_task_update(update))
            return
        state = self._tasks.get(job_id)
        if state is None:
            state = self._tasks[job_id] = self._task_info(job_id)
        state.update(update)
        # A retry or a failure stays on the screen, above the bars, as it happens.
        event = render.format_item_event(update)
        permanent: list[str] = [] if event is None else [event]
        if update.get("status") in _FINAL_UPDATES:
            # The last bar stays on the screen as an ordinary line.
            del self._tasks[job_id]
            self._rates.pop(job_id, None)
            permanent.append(render.progress_line(state, self._width()))
        self._redraw(permanent)

    def message(self, line: str) -> None:
        if self._live:
            self._redraw([line])
        else:
            self._context.line(line)

    def summary(self, task: Mapping[str, Any]) -> None:
        """The ended task's last word: failures not shown yet, where each file went."""
        shown = self._failures_shown.get(str(task.get("id")), set())
        for line in render.format_task_end(task, shown, self.line_width()):
            self.message(line)

    def close(self) -> None:
        self._drawn = 0  # bars left on the screen stay, as the last word

    def line_width(self) -> int | None:
        """How wide a line may be before the terminal wraps it; None when not live."""
        return self._width() if self._live else None

    def _task_info(self, job_id: str) -> dict[str, Any]:
        # A job_update carries no task name; one lookup per task gets it for the bar.
        try:
            task: dict[str, Any] = self._context.call("tasks.get", {"task_id": job_id})
        except RemoteError:
            return {"id": job_id}
        return task

    def _width(self) -> int:
        # One column short: writing the last column makes some terminals wrap.
        return max(20, shutil.get_terminal_size().columns - 1)

    def _redraw(self, permanent: list[str]) -> None:
        width = self._width()
        now = time.monotonic()
        out = [f"\x1b[{self._drawn}A" if self._drawn else "", "\r\x1b[J"]
        # Status lines are Styled: coloured by level, as ``statusctl status`` shows them.
        show = render.paint if self._context.look.colour else render.one_line
        out += [show(line) + "\n" for line in permanent]
        for job_id, state in self._tasks.items():
            # Only for a daemon that sends no bytes_per_second of its own.
            meter = self._rates.setdefault(job_id, render.RateMeter())
            rate = meter.sample(now, float(state.get("bytes_done") or 0))
            out.append(render.one_line(render.progress_line(state, width, rate)) + "\n")
        self._drawn = len(self._tasks)
        self._context.stdout.write("".join(out))
        self._context.stdout.flush()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def download_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("urls", metavar="URL", nargs="*", help="what to download")
    parser.add_argument(
        "-i",
        "--input-file",
        metavar="FILE",
        help="also the URLs in FILE, one a line (blank lines and # comments skipped); "
        "- reads them from stdin",
    )
    parser.add_argument(
        "--dest",
        metavar="DIR",
        help="where the files go. A relative DIR (. too) is taken from your current "
        "directory when the daemon runs as you (your own daemon), and from your download "
        "directory on a shared daemon; on a shared daemon it must lie inside that",
    )
    parser.add_argument("--name", metavar="NAME", help="file name (one URL only)")
    parser.add_argument("--topic", metavar="TOPIC")
    parser.add_argument("--sha256", metavar="HEX", help="expected digest (one URL only)")
    parser.add_argument(
        "--checksum",
        metavar="TYPE=HEX",
        help="expected digest as aria2c's --checksum takes it: sha-256, sha-512, sha-1 or "
        "md5, then = and the hex digest (one URL only)",
    )
    parser.add_argument("--wait", action="store_true", help="follow the task until it ends")
    parser.add_argument(
        "-H",
        "--header",
        metavar="'NAME: VALUE'",
        action="append",
        type=header_argument,
        help="an HTTP header for the task's requests (repeat for more), as curl's -H takes "
        "it: sent only to each URL's own scheme, host and port, never after a redirect "
        "elsewhere; its value is never shown back (the daemon keeps it in its journal only)",
    )
    parser.add_argument(
        "--limit-rate",
        metavar="RATE",
        type=rate_argument,
        help="at most RATE bytes a second for the task's files together, like 500K or 2M "
        "(K = 1024); 0 for none. Change it later with statusctl limit",
    )


def rate_argument(text: str) -> int:
    try:
        return parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def header_argument(text: str) -> tuple[str, str]:
    """``'Name: value'`` as (name, value), checked as the daemon checks a task's headers.
    Errors name the header, never its value: it may be a password or a cookie."""
    name, colon, value = text.partition(":")
    if not colon:
        raise argparse.ArgumentTypeError("a header is 'NAME: VALUE', with a colon")
    if not name.strip():
        raise argparse.ArgumentTypeError("a header needs a name before its colon")
    pair = {name.strip(): value.strip(" \t")}
    try:
        check_headers(pair)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return next(iter(pair.items()))


def _headers(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in pairs:
        if any(name.lower() == given.lower() for given in headers):
            raise UsageError(f"--header {name!r} is given twice")
        headers[name] = value
    return headers


class UsageError(Exception):
    """A command's arguments make no sense together; exit status 2, like argparse's."""


def url_list(lines: Iterable[str], source: str) -> list[str]:
    """The URLs of an ``-i`` file (aria2c's format less its per-URL option lines): one a
    line, blank lines and ``#`` comments skipped."""
    urls = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if any(char.isspace() for char in text):
            # aria2c reads tab-separated mirrors of one file here; sending the line as one
            # URL would fail in the daemon with an index that is not this line's number.
            raise UsageError(f"{source}, line {number}: one URL a line, not {text!r}")
        urls.append(text)
    return urls


def _read_url_list(name: str) -> list[str]:
    if name == "-":
        return url_list(sys.stdin, "stdin")
    try:
        with open(name, encoding="utf-8") as file:
            return url_list(file, name)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise UsageError(f"cannot read the URL list {name}: {reason}") from None
    except UnicodeDecodeError:
        raise UsageError(f"cannot read the URL list {name}: it is not UTF-8 text") from None


def _download_dest(context: Context, dest: str) -> str:
    """``dest`` as sent: a relative one made absolute from the current directory when the
    daemon runs as the caller (it could write anywhere the caller can, and nothing else
    would be meant); else as given, for the daemon to take from the caller's download
    directory."""
    if os.path.isabs(dest):
        return dest
    # Not the socket's peer credentials: under socket activation they are systemd's.
    if context.call("daemon.info").get("daemon_uid") == os.getuid():
        return os.path.abspath(dest)
    return dest


def run_download(context: Context, args: argparse.Namespace) -> int:
    urls = list(args.urls)
    if args.input_file is not None:
        urls += _read_url_list(args.input_file)
    if not urls:
        raise UsageError("no URL: give one or more, or a file of them with -i FILE")
    params: dict[str, Any] = {}
    one_url = {"filename": args.name, "sha256": args.sha256, "checksum": args.checksum}
    if any(value is not None for value in one_url.values()):
        if len(urls) != 1:
            raise UsageError("--name, --sha256 and --checksum take exactly one URL")
        item: dict[str, Any] = {"url": urls[0]}
        item |= {key: value for key, value in one_url.items() if value is not None}
        params["items"] = [item]
    else:
        params["urls"] = urls
    if args.dest is not None:
        params["dest"] = _download_dest(context, args.dest)
    if args.topic is not None:
        params["topic"] = args.topic
    if args.limit_rate:
        params["rate_limit"] = args.limit_rate
    if args.header:
        params["headers"] = _headers(args.header)
    if not args.wait:
        result = context.call("tasks.download", params)
        context.emit(result, [result["task_id"]])
        return EXIT_OK
    subscription = {"tasks": "all", "status": False}
    cursor = StatusCursor()
    _subscribe(context, subscription, cursor)
    task_id = context.call("tasks.download", params)["task_id"]
    if not context.json:
        context.line(task_id)
    display = TaskDisplay(context)
    follow = _Follow(context, display, task_id, None, False, pushes_as_json=False)
    try:
        # Subscribed before it was created: every update of the task comes as a push.
        display.show(context.call("tasks.get", {"task_id": task_id}))
        follow.unfinished.add(task_id)
        ended = _keep_following(context, follow, subscription, cursor)
        task = context.call("tasks.get", {"task_id": task_id})
        if not context.json:
            display.summary(task)
    except KeyboardInterrupt:
        _say_it_goes_on(context, task_id)
        return EXIT_INTERRUPTED
    finally:
        display.close()
    if context.json:
        context.line(render.to_json(task))
    return ended


def tasks_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--status", choices=("pending", "running", "paused", "completed", "failed", "cancelled")
    )


def run_tasks(context: Context, args: argparse.Namespace) -> int:
    result = all_tasks(context.call, args.status)
    context.emit(result, render.format_tasks(result["tasks"], args.status, context.look))
    return EXIT_OK


# How much statusctl asks for at once. A page the daemon finds over its reply limit
# (limits.max_reply_bytes) is asked for again at half the size, down to one.
TASKS_PAGE = 100
ITEMS_PAGE = 1000

Call = Callable[[str, Mapping[str, Any] | None], Any]


def _over_reply_limit(error: RemoteError) -> bool:
    return error.code == BUSY and "limits.max_reply_bytes" in error.message


def all_tasks(call: Call, status: str | None = None) -> dict[str, Any]:
    """``{tasks, summary}`` of every task (newest first), in pages of the summary form:
    a task's per-item list is what made one answer too large for many tasks."""
    params: dict[str, Any] = {"items": False}
    if status is not None:
        params["status"] = status
    tasks: list[Any] = []
    size = TASKS_PAGE
    while True:
        try:
            page = call("tasks.list", {**params, "limit": size})
        except RemoteError as error:
            if size == 1 or not _over_reply_limit(error):
                raise
            size //= 2
            continue
        tasks += page["tasks"]
        if page.get("next_cursor") is None:
            return {"tasks": tasks, "summary": page["summary"]}
        params["cursor"] = page["next_cursor"]


def task_with_items(call: Call, task_id: str) -> dict[str, Any]:
    """``tasks.get`` with every item of its result, fetched a page at a time."""
    task: dict[str, Any] | None = None
    items: list[Any] = []
    size = ITEMS_PAGE
    while True:
        params = {"task_id": task_id, "items_offset": len(items), "items_limit": size}
        try:
            page: dict[str, Any] = call("tasks.get", params)
        except RemoteError as error:
            if size == 1 or not _over_reply_limit(error):
                raise
            size //= 2
            continue
        got = (page.get("result") or {}).get("items")
        if not isinstance(got, list):
            return page  # no items (yet): nothing to page
        task = task or page
        items += got
        if len(got) < size:
            task["result"] = {**task["result"], "items": items}
            return task


def task_id_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task_id", metavar="ID")


def run_task(context: Context, args: argparse.Namespace) -> int:
    task = task_with_items(context.call, args.task_id)
    context.emit(task, render.format_task(task, context.look))
    return EXIT_OK


def task_or_all_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("task_id", metavar="ID", nargs="?")
    which.add_argument(
        "--all", action="store_true", help="every task of yours (an admin's: everyone's)"
    )


@attrs.frozen
class _Control:
    """A task control: its method, the states it applies to (for --all), its past tense."""

    method: str
    states: tuple[str, ...]
    done: str


_CANCEL = _Control("tasks.cancel", ("pending", "running", "paused"), "cancelled")
_PAUSE = _Control("tasks.pause", ("pending", "running"), "paused")
_RESUME = _Control("tasks.resume", ("paused",), "resumed")


def _control(context: Context, args: argparse.Namespace, control: _Control) -> int:
    if args.task_id is not None:
        try:
            result = context.call(control.method, {"task_id": args.task_id})
        except RemoteError as error:
            if _keeps_parts(error):
                return _say_what_is_kept(context, error, args.task_id)
            raise
        context.emit(result, [f"{control.done} {args.task_id}"])
        return EXIT_OK
    listed = all_tasks(context.call)
    changed = []
    for task in listed["tasks"]:
        if task["status"] not in control.states:
            continue
        try:
            context.call(control.method, {"task_id": task["id"]})
        except RemoteError as error:
            # Moved on (finished, or changed by someone else) since it was listed.
            if error.code not in (NOT_FOUND, CONFLICT):
                raise
            continue
        changed.append(task["id"])
    context.emit(
        {control.done: len(changed), "task_ids": changed},
        [render.format_changed(control.done, len(changed))],
    )
    return EXIT_OK


def _keeps_parts(error: RemoteError) -> bool:
    return (
        error.code == CONFLICT
        and isinstance(error.data, dict)
        and error.data.get("kept_parts") is True
    )


def _say_what_is_kept(context: Context, error: RemoteError, task_id: str) -> int:
    """A failed task refused a cancel and keeps a part for a retry: say it in
    statusctl's words, with the commands that resume or remove it."""
    if context.json:
        context.line(render.to_json(error.to_wire()))
    command = _command_name(context)
    context.complain(f"task {task_id} has already failed; it keeps a partial file for a retry")
    for line in (
        f"resume it: {command} retry {task_id}",
        f"remove it: {command} cleanup --all (this forgets every finished task you can see)",
    ):
        context.stderr.write(f"  {render.one_line(line)}\n")
    context.stderr.flush()
    return EXIT_REMOTE_ERROR


def run_cancel(context: Context, args: argparse.Namespace) -> int:
    return _control(context, args, _CANCEL)


def run_pause(context: Context, args: argparse.Namespace) -> int:
    return _control(context, args, _PAUSE)


def run_resume(context: Context, args: argparse.Namespace) -> int:
    return _control(context, args, _RESUME)


def run_retry(context: Context, args: argparse.Namespace) -> int:
    result = context.call("tasks.retry", {"task_id": args.task_id})
    context.emit(result, [f"retrying {result['task_id']}"])
    return EXIT_OK


def limit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task_id", metavar="ID")
    parser.add_argument(
        "rate",
        metavar="RATE",
        type=rate_argument,
        help="bytes a second, like 500K, 2M or 1G (K = 1024); 0 for none",
    )


def run_limit(context: Context, args: argparse.Namespace) -> int:
    result = context.call("tasks.set_rate", {"task_id": args.task_id, "rate_limit": args.rate})
    if args.rate:
        said = f"{args.task_id} limited to {render.format_rate(args.rate)}"
    else:
        said = f"{args.task_id} has no rate limit"
    context.emit(result, [said])
    return EXIT_OK


def run_summary(context: Context, _args: argparse.Namespace) -> int:
    result = context.call("tasks.summary")
    context.emit(result, [f"{key}: {value}" for key, value in result.items()])
    return EXIT_OK


def cleanup_arguments(parser: argparse.ArgumentParser) -> None:
    age = parser.add_mutually_exclusive_group()
    age.add_argument(
        "--max-age-hours",
        metavar="N",
        type=float,
        default=24.0,
        help="forget finished tasks that ended more than N hours ago (default 24)",
    )
    age.add_argument("--all", action="store_true", help="forget every finished task")


def run_cleanup(context: Context, args: argparse.Namespace) -> int:
    hours = 0.0 if args.all else args.max_age_hours
    result = context.call("tasks.cleanup", {"max_age_hours": hours})
    context.emit(result, [f"removed {result['removed']} tasks"])
    return EXIT_OK


def notifications_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = (
        "%(prog)s [--unread] [--limit N]\n"
        "       %(prog)s read (ID | --all)\n"
        "       %(prog)s delete (ID | --read)"
    )
    parser.add_argument("--unread", action="store_true", help="only unread notifications")
    parser.add_argument("--limit", metavar="N", type=int, help="at most N (default 50)")
    actions = parser.add_subparsers(
        metavar="{read,delete}", dest="action", help="without one: list them", prog=parser.prog
    )
    read = actions.add_parser("read", help="mark one notification (or all) read")
    which = read.add_mutually_exclusive_group(required=True)
    which.add_argument("id", metavar="ID", type=int, nargs="?", help="the notification's id")
    which.add_argument("--all", action="store_true", help="every notification")
    delete = actions.add_parser("delete", help="delete one notification (or all read ones)")
    which = delete.add_mutually_exclusive_group(required=True)
    which.add_argument("id", metavar="ID", type=int, nargs="?", help="the notification's id")
    which.add_argument("--read", action="store_true", help="every read notification")


def run_notifications(context: Context, args: argparse.Namespace) -> int:
    if args.action is None:
        params: dict[str, Any] = {}
        if args.unread:
            params["unread_only"] = True
        if args.limit is not None:
            params["limit"] = args.limit
        result = context.call("notifications.list", params)
        lines = render.format_notifications(result["notifications"], args.unread, context.look)
        context.emit(result, lines)
        return EXIT_OK
    if args.unread or args.limit is not None:
        context.complain(f"--unread and --limit list; they do not {args.action}")
        return EXIT_USAGE
    if args.action == "read":
        if args.all:
            result = context.call("notifications.mark_all_read")
            context.emit(result, [f"marked {result['count']} read"])
        else:
            result = context.call("notifications.mark_read", {"id": args.id})
            context.emit(result, [f"marked {args.id} read"])
    elif args.read:
        result = context.call("notifications.delete_read")
        context.emit(result, [f"deleted {result['count']} read notifications"])
    else:
        result = context.call("notifications.delete", {"id": args.id})
        context.emit(result, [f"deleted {args.id}"])
    return EXIT_OK


def notify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--title", metavar="T", required=True)
    parser.add_argument("--message", metavar="M", required=True)
    parser.add_argument("--type", metavar="TYPE", default="system", help="default: system")
    parser.add_argument("--user", metavar="USER", help="the recipient (default: everyone)")
    parser.add_argument("--link", metavar="URL", help="what the notification points to")


def run_notify(context: Context, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"type": args.type, "title": args.title, "message": args.message}
    if args.user is not None:
        params["username"] = args.user
    if args.link is not None:
        params["link"] = args.link
    result = context.call("notifications.create", params)
    context.emit(result, [str(result["notification_id"])])
    return EXIT_OK


_DURATION = re.compile(r"([0-9]+)([smhd]?)")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> int:
    """Seconds in ``90``, ``90s``, ``15m``, ``1h`` or ``30d`` (for argparse: exit 2 if bad)."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"a duration is a whole number with s, m, h or d after it (1h, 30d), not {text!r}"
        )
    return int(match[1]) * _DURATION_UNITS[match[2]]


def token_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(metavar="ACTION", dest="token_action", required=True)
    create = actions.add_parser("create", help="mint a token; it is shown only this once")
    create.add_argument("--user", metavar="USER", help="for another user (admin only)")
    create.add_argument(
        "--scope",
        choices=("read", "control"),
        default="control",
        help="read: look and subscribe; control: everything the user may do (default)",
    )
    create.add_argument(
        "--expires-in",
        metavar="DURATION",
        type=duration,
        help="the token stops working after this long: 90s, 15m, 1h, 30d (from 1m to 365d; "
        "default: never)",
    )
    actions.add_parser("list", help="your tokens (an admin sees all); never their secrets")
    revoke = actions.add_parser("revoke", help="revoke a token; connections using it close")
    revoke.add_argument(
        "token_id", metavar="TOKEN", help="the token's id, or the token itself (sdt_...)"
    )


def run_token(context: Context, args: argparse.Namespace) -> int:
    if args.token_action == "create":
        params: dict[str, Any] = {"scope": args.scope}
        if args.user is not None:
            params["username"] = args.user
        if args.expires_in is not None:
            params["expires_in"] = args.expires_in
        result = context.call("tokens.create", params)
        # The token alone on stdout, so `T=$(statusctl token create)` works.
        context.emit(result, [result["token"]])
        if not context.json:
            context.stderr.write(
                render.one_line(
                    f"token {result['token_id']} for {result['username']}, scope "
                    f"{result['scope']}, expires {result.get('expires_at') or 'never'}: "
                    "keep it secret, it is not shown again"
                )
                + "\n"
            )
        return EXIT_OK
    if args.token_action == "list":
        result = context.call("tokens.list")
        context.emit(result, render.format_tokens(result["tokens"], context.look))
        return EXIT_OK
    # The token itself names its id; only the id goes to the daemon, never the secret.
    parts = split_token(args.token_id)
    token_id = parts[0] if parts is not None else args.token_id
    result = context.call("tokens.revoke", {"token_id": token_id})
    context.emit(result, [f"revoked {render.one_line(token_id)}"])
    return EXIT_OK


DASHBOARD_EXPIRES_IN = 12 * 3600  # a working day: the open page reconnects with the token


def dashboard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--control",
        action="store_true",
        help="a link that may also add, pause, resume, retry and cancel downloads "
        "(default: look only)",
    )
    parser.add_argument(
        "--no-browser", action="store_true", help="only print the link, do not open it"
    )
    parser.add_argument(
        "--expires-in",
        metavar="DURATION",
        type=duration,
        default=DASHBOARD_EXPIRES_IN,
        help="the link stops working after this long: 15m, 1h, 12h (from 1m to 365d; default: 12h)",
    )


def run_dashboard(context: Context, args: argparse.Namespace) -> int:
    address = context.call("daemon.info").get("websocket")
    if address is None:
        context.complain(
            "the daemon serves no dashboard: its WebSocket is off (start it with "
            "--websocket 127.0.0.1:8765, or [websocket] listen in its configuration)"
        )
        return EXIT_REMOTE_ERROR
    scope = "control" if args.control else "read"
    result = context.call("tokens.create", {"scope": scope, "expires_in": args.expires_in})
    url = dashboard.dashboard_url(address, result["token"])
    opened = not args.no_browser and dashboard.open_in_browser(url)
    context.emit({**result, "url": url, "opened": opened}, [url])
    if not context.json:
        where = "opened in your browser" if opened else "open it in a browser on this machine"
        context.stderr.write(
            render.one_line(
                f"{where}; the link ({scope}) works until {result.get('expires_at')}, and "
                "whoever has it acts as you: keep it to yourself (statusctl token revoke "
                f"{result['token_id']} ends it)"
            )
            + "\n"
        )
    return EXIT_OK


def completion_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shell", metavar="SHELL", choices=SHELLS, help="bash, zsh or fish")
    parser.add_argument(
        "--program",
        choices=("statusctl", "statusd"),
        default="statusctl",
        help="whose completion (default: statusctl)",
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "Where each shell looks for it (a recent pipx links them there on install):\n"
        "  statusctl completion bash > ~/.local/share/bash-completion/completions/statusctl\n"
        "  statusctl completion zsh > ~/.local/share/zsh/site-functions/_statusctl\n"
        "      (with fpath+=(~/.local/share/zsh/site-functions) before compinit in ~/.zshrc)\n"
        "  statusctl completion fish > ~/.config/fish/completions/statusctl.fish\n"
        "The same with --program statusd for the daemon's flags."
    )


def run_completion(context: Context, args: argparse.Namespace) -> int:
    parser = build_daemon_parser() if args.program == "statusd" else build_parser()
    # Written as it is: a script is many lines, tabs and quotes, none from the daemon.
    context.stdout.write(completion_script(parser, args.shell))
    context.stdout.flush()
    return EXIT_OK


COMMANDS: tuple[Command, ...] = (
    Command("info", "show the daemon's version, uptime, socket and who you are to it", run_info),
    Command("publish", "publish a status message; prints its seq", run_publish, publish_arguments),
    Command("status", "show recent status messages, oldest first", run_status, status_arguments),
    Command(
        "watch",
        "print status messages and task progress as they come, until Ctrl-C",
        run_watch,
        watch_arguments,
    ),
    Command("download", "download URLs as one task", run_download, download_arguments),
    Command("tasks", "list your tasks, newest first", run_tasks, tasks_arguments),
    Command("task", "show one task", run_task, task_id_argument),
    Command(
        "cancel",
        "cancel a pending, running or paused task (or --all)",
        run_cancel,
        task_or_all_arguments,
    ),
    Command(
        "pause",
        "pause a pending or running task, keeping what it has (or --all)",
        run_pause,
        task_or_all_arguments,
    ),
    Command(
        "resume",
        "queue a paused task again; it continues where it stopped (or --all)",
        run_resume,
        task_or_all_arguments,
    ),
    Command(
        "retry",
        "run a failed or cancelled task again (only what did not finish)",
        run_retry,
        task_id_argument,
    ),
    Command(
        "limit",
        "set a task's speed limit, also while it runs (0: none)",
        run_limit,
        limit_arguments,
    ),
    Command("summary", "count tasks by status", run_summary),
    Command("cleanup", "forget finished tasks older than N hours", run_cleanup, cleanup_arguments),
    Command(
        "notifications",
        "list your notifications, newest first; read or delete them",
        run_notifications,
        notifications_arguments,
    ),
    Command(
        "notify",
        "send a notification to a user or everyone (admins)",
        run_notify,
        notify_arguments,
    ),
    Command("token", "create, list or revoke WebSocket tokens", run_token, token_arguments),
    Command(
        "dashboard",
        "open the web dashboard with a link that carries a short-lived token",
        run_dashboard,
        dashboard_arguments,
    ),
    Command(
        "completion",
        "print the shell completion script for bash, zsh or fish",
        run_completion,
        completion_arguments,
    ),
)


# -- entry point -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="statusctl",
        description="Control and watch statusd.",
        epilog=f"The socket is --socket, else ${SOCKET_ENV}, else the first that answers of "
        f"your own daemon's default socket and the system daemon's ({SYSTEM_SOCKET}). "
        "Exit status: 0 ok, 1 failed, 2 usage, 3 daemon not reachable, 4 daemon error.",
    )
    parser.add_argument("--socket", metavar="PATH", help="the daemon's Unix socket")
    parser.add_argument(
        "--json", action="store_true", help="machine output: one JSON document (lines for watch)"
    )
    parser.add_argument(
        "--color",
        choices=COLOR_CHOICES,
        default="auto",
        help="colour task states and levels: auto (the default) on a terminal unless "
        "NO_COLOR is set, always, or never",
    )
    parser.add_argument("--version", action="version", version=f"statusctl {__version__}")
    commands = parser.add_subparsers(
        title="commands", metavar="COMMAND", dest="command_name", required=True
    )
    for command in COMMANDS:
        subparser = commands.add_parser(command.name, help=command.help, description=command.help)
        command.arguments(subparser)
        subparser.set_defaults(command=command)
        _options_after_the_command(subparser)
    return parser


def _options_after_the_command(parser: argparse.ArgumentParser) -> None:
    """``statusctl summary --json`` as well as ``statusctl --json summary`` (and after a
    nested action: ``token list --json``); ``--color`` too. SUPPRESS keeps a parser that
    did not see one from resetting what an outer one did."""
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--color", choices=COLOR_CHOICES, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for nested in action.choices.values():
                _options_after_the_command(nested)


def presentation(
    color: str, json: bool, stdout: TextIO, environ: Mapping[str, str]
) -> render.Presentation:
    """Colours and local times for a person at a terminal; ``NO_COLOR`` (any value but
    empty, https://no-color.org) turns colours off unless ``--color always`` asks."""
    person = not json and _is_terminal(stdout)
    if color == "auto":
        colour = person and not environ.get("NO_COLOR")
    else:
        colour = color == "always" and not json
    return render.Presentation(colour=colour, local_time=person)


def main(
    argv: list[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        # argparse exits 2 on a usage error and 0 for --help/--version; callers of main()
        # get the status back instead of an exception.
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    look = presentation(args.color, args.json, out, os.environ)
    context = Context(Path(args.socket) if args.socket else None, args.json, out, err, look)
    command: Command = args.command
    try:
        return command.run(context, args)
    except UsageError as exc:
        context.complain(str(exc))
        return EXIT_USAGE
    except RemoteError as error:
        if context.json:
            context.line(render.to_json(error.to_wire()))
        context.complain(render.format_error(error.message))
        return EXIT_REMOTE_ERROR
    except DaemonUnreachable as exc:
        context.complain(str(exc))
        return EXIT_UNREACHABLE
    except TimeoutError as exc:
        # A daemon that accepts but never answers is as unreachable as one that is gone.
        context.complain(str(exc))
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our stdout left (``statusctl watch | head``). Point stdout at
        # /dev/null so the interpreter's final flush does not complain a second time.
        _silence_stdout(out)
        return EXIT_FAILED
    finally:
        context.close()


def _silence_stdout(out: TextIO) -> None:
    try:
        fileno = out.fileno()
    except (OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fileno)
    finally:
        os.close(devnull)
