"""The ``statusctl`` command: argv -> requests to statusd -> lines on stdout and an exit status.

Every command is one row of ``COMMANDS``: a name, a help line, a function that adds its
arguments and a function that runs it against a ``Context`` (supervisorctl's ``do_*``
methods, as a table). Running a command is a few calls and a ``render`` function; errors
are turned into exit statuses in one place, ``main``:

  0 success; 1 the thing waited on failed, or stdout went away; 2 usage (argparse);
  3 the daemon is not reachable, or went away; 4 the daemon answered with an error.

``--json`` prints exactly one JSON document on stdout (the method's result, or the error
object when the daemon answered with one); ``watch --json`` prints one per line.

The blocking ``Client`` is used rather than trio: a command is a request or two, and a
blocked ``recv`` turns Ctrl-C into ``KeyboardInterrupt`` with no extra machinery.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

import attrs

from statusctl import __version__, render
from statusctl.client import SOCKET_ENV, Client, DaemonUnreachable, RemoteError, resolve_socket_path

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_REMOTE_ERROR = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


@attrs.define
class Context:
    """What a command runs with: where the daemon is, how to print, and the connection
    (made on first use, so a command that needs none never connects)."""

    socket_path: Path
    json: bool
    stdout: TextIO
    stderr: TextIO
    _client: Client | None = None

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
        self.stdout.write(text + "\n")
        self.stdout.flush()

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
    context.emit(info, render.format_info(info))
    return EXIT_OK


def publish_arguments(parser: argparse.ArgumentParser) -> None:
    # LEVEL is not limited to choices here: the daemon is the authority on levels, and
    # its -32602 names the ones it accepts.
    parser.add_argument("level", metavar="LEVEL", help="info, warning, error or success")
    parser.add_argument("message", metavar="MESSAGE", help="the text (cut to 200 characters)")
    parser.add_argument("--operation-id", metavar="ID", help="groups related messages")


def run_publish(context: Context, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"level": args.level, "message": args.message}
    if args.operation_id is not None:
        params["operation_id"] = args.operation_id
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
    lines.extend(render.format_status(message) for message in result.get("messages", []))
    context.emit(result, lines)
    return EXIT_OK


def watch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--status-only",
        action="store_true",
        help="status messages only (today the only stream there is)",
    )


def run_watch(context: Context, _args: argparse.Namespace) -> int:
    client = context.client()
    client.subscribe(status=True)
    try:
        while True:
            push = client.next_push()
            if context.json:
                context.line(render.to_json(push.to_wire()))
            else:
                context.line(render.format_push(push.method, push.params))
    except KeyboardInterrupt:
        # Ctrl-C is how a watch is meant to end.
        return EXIT_OK


def _task_line(task: Mapping[str, Any]) -> str:
    progress = f"{task.get('progress', 0):5.1f}%"
    items = f"{task.get('processed_items', 0)}/{task.get('total_items', 0)}"
    return f"{task['id']}  {task['status']:<9} {progress} {items:>9}  {task.get('name', '')}"


def download_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("urls", metavar="URL", nargs="+")
    parser.add_argument("--dest", metavar="DIR", help="inside the download directory")
    parser.add_argument("--name", metavar="NAME", help="file name (one URL only)")
    parser.add_argument("--topic", metavar="TOPIC")
    parser.add_argument("--sha256", metavar="HEX", help="expected digest (one URL only)")
    parser.add_argument("--wait", action="store_true", help="follow the task until it ends")


def run_download(context: Context, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    if args.name is not None or args.sha256 is not None:
        if len(args.urls) != 1:
            context.stderr.write("statusctl: --name and --sha256 take exactly one URL\n")
            return EXIT_USAGE
        item: dict[str, Any] = {"url": args.urls[0]}
        if args.name is not None:
            item["filename"] = args.name
        if args.sha256 is not None:
            item["sha256"] = args.sha256
        params["items"] = [item]
    else:
        params["urls"] = list(args.urls)
    for key in ("dest", "topic"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    if not args.wait:
        result = context.call("tasks.download", params)
        context.emit(result, [result["task_id"]])
        return EXIT_OK
    client = context.client()
    client.call("subscribe", {"tasks": "all", "status": False})
    task_id = client.call("tasks.download", params)["task_id"]
    if not context.json:
        context.line(task_id)
    while True:
        push = client.next_push()
        update = push.params if isinstance(push.params, dict) else {}
        if push.method != "task_update" or update.get("job_id") != task_id:
            continue
        if not context.json:
            context.line(f"{update.get('status')}: {update.get('message')}")
        if update.get("status") in ("completed", "error", "cancelled"):
            task = client.call("tasks.get", {"task_id": task_id})
            if context.json:
                context.line(render.to_json(task))
            return EXIT_OK if task["status"] == "completed" else EXIT_FAILED


def tasks_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--status", choices=("pending", "running", "completed", "failed", "cancelled")
    )


def run_tasks(context: Context, args: argparse.Namespace) -> int:
    result = context.call("tasks.list", {} if args.status is None else {"status": args.status})
    context.emit(result, [_task_line(task) for task in result["tasks"]])
    return EXIT_OK


def task_id_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task_id", metavar="ID")


def run_task(context: Context, args: argparse.Namespace) -> int:
    task = context.call("tasks.get", {"task_id": args.task_id})
    lines = [f"{key}: {value}" for key, value in task.items() if key != "result"]
    for item in (task.get("result") or {}).get("items", []):
        lines.append(f"item: {item.get('url')} -> {item.get('path')} {item.get('error') or 'ok'}")
    context.emit(task, lines)
    return EXIT_OK


def run_cancel(context: Context, args: argparse.Namespace) -> int:
    result = context.call("tasks.cancel", {"task_id": args.task_id})
    context.emit(result, [f"cancelled {args.task_id}"])
    return EXIT_OK


def run_summary(context: Context, _args: argparse.Namespace) -> int:
    result = context.call("tasks.summary")
    context.emit(result, [f"{key}: {value}" for key, value in result.items()])
    return EXIT_OK


def cleanup_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-age-hours", metavar="N", type=float, default=24.0)


def run_cleanup(context: Context, args: argparse.Namespace) -> int:
    result = context.call("tasks.cleanup", {"max_age_hours": args.max_age_hours})
    context.emit(result, [f"removed {result['removed']} tasks"])
    return EXIT_OK


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
    actions.add_parser("list", help="your tokens (an admin sees all); never their secrets")
    revoke = actions.add_parser("revoke", help="revoke a token; connections using it close")
    revoke.add_argument("token_id", metavar="TOKEN_ID")


def run_token(context: Context, args: argparse.Namespace) -> int:
    if args.token_action == "create":
        params: dict[str, Any] = {"scope": args.scope}
        if args.user is not None:
            params["username"] = args.user
        result = context.call("tokens.create", params)
        # The token alone on stdout, so `T=$(statusctl token create)` works.
        context.emit(result, [result["token"]])
        if not context.json:
            context.stderr.write(
                f"token {result['token_id']} for {result['username']}, scope "
                f"{result['scope']}: keep it secret, it is not shown again\n"
            )
        return EXIT_OK
    if args.token_action == "list":
        result = context.call("tokens.list")
        lines = [
            f"{token['token_id']}  {token['username']:<16} {token['scope']:<8} "
            f"{token['created_at']}"
            for token in result["tokens"]
        ]
        context.emit(result, lines)
        return EXIT_OK
    result = context.call("tokens.revoke", {"token_id": args.token_id})
    context.emit(result, [f"revoked {args.token_id}"])
    return EXIT_OK


COMMANDS: tuple[Command, ...] = (
    Command("info", "show the daemon's version, uptime, socket and who you are to it", run_info),
    Command("publish", "publish a status message; prints its seq", run_publish, publish_arguments),
    Command("status", "show recent status messages, oldest first", run_status, status_arguments),
    Command(
        "watch", "print status messages as they come, until Ctrl-C", run_watch, watch_arguments
    ),
    Command("download", "download URLs as one task", run_download, download_arguments),
    Command("tasks", "list your tasks, newest first", run_tasks, tasks_arguments),
    Command("task", "show one task", run_task, task_id_argument),
    Command("cancel", "cancel a pending or running task", run_cancel, task_id_argument),
    Command("summary", "count tasks by status", run_summary),
    Command("cleanup", "forget finished tasks older than N hours", run_cleanup, cleanup_arguments),
    Command("token", "create, list or revoke WebSocket tokens", run_token, token_arguments),
)


# -- entry point -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="statusctl",
        description="Control and watch statusd.",
        epilog=f"The socket is --socket, else ${SOCKET_ENV}, else the daemon's default. "
        "Exit status: 0 ok, 1 failed, 2 usage, 3 daemon not reachable, 4 daemon error.",
    )
    parser.add_argument("--socket", metavar="PATH", help="the daemon's Unix socket")
    parser.add_argument(
        "--json", action="store_true", help="machine output: one JSON document (lines for watch)"
    )
    parser.add_argument("--version", action="version", version=f"statusctl {__version__}")
    commands = parser.add_subparsers(metavar="COMMAND", dest="command_name", required=True)
    for command in COMMANDS:
        subparser = commands.add_parser(command.name, help=command.help, description=command.help)
        command.arguments(subparser)
        subparser.set_defaults(command=command)
    return parser


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
    context = Context(resolve_socket_path(args.socket), args.json, out, err)
    command: Command = args.command
    try:
        return command.run(context, args)
    except RemoteError as error:
        if context.json:
            context.line(render.to_json(error.to_wire()))
        print(f"statusctl: {render.format_error(error.code, error.message)}", file=err)
        return EXIT_REMOTE_ERROR
    except DaemonUnreachable as exc:
        print(f"statusctl: {exc}", file=err)
        return EXIT_UNREACHABLE
    except TimeoutError as exc:
        # A daemon that accepts but never answers is as unreachable as one that is gone.
        print(f"statusctl: {exc}", file=err)
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
