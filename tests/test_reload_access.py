"""A reload (SIGHUP) holds connections already open to the new access rules at once.

On the Unix socket: a user the socket file no longer admits (``socket_group`` or
``socket_mode`` changed, or the user left the group) gets a -32002 error with ``"id": null``
saying why, and the connection closes; an admin who no longer is one keeps the connection
with a user's rights (``access_changed``). On the WebSocket: a page whose origin is no
longer in ``allowed_origins`` is closed with 1008; a revoked token closes its own
connections and no other.

A real daemon process run as root; nobody holds its connections from a forked child that
dropped to uid nobody (tests/conftest.py), while root's connection is served meanwhile.
"""

from __future__ import annotations

import json
import os
import pwd
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from websockets.sync.client import ClientConnection, connect

from statusd import identity
from statusd.identity import CallerLookups
from statusd.protocol import jsonrpc
from tests.conftest import NOBODY_GID, NOBODY_UID, blocking_call, needs_root, run_as, run_as_nobody
from tests.test_statusctl_tokens import _free_port
from tests.test_token_access import NOBODY_GROUP, ROOT_GROUP, _nobody_on_the_socket
from tests.websocket_clients import TIMEOUT, RpcClient, close_of

# The user running the suite: root, or the unprivileged user CI also runs it as.
ME = pwd.getpwuid(os.getuid()).pw_name

ANSWER_BOUND = 5.0  # seconds: root's call on its open connection while a reload closes others
THIRD_UID = 65533  # no passwd entry
WAIT = 10.0  # seconds a child waits for the daemon before it gives up
HISTORY = 10_000  # status messages held, for an answer larger than a socket's buffers
ANSWER_BYTES = 3_000_000  # about what status.recent's answer to all of them takes


class LineClient:
    """A blocking JSON-lines client, for forked children (no trio there)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT)
        self.sock.connect(str(path))
        self._buffer = b""
        self._ids = iter(range(1, 1_000_000))
        self.pushed: list[dict[str, Any]] = []

    def __enter__(self) -> LineClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()

    def messages(self) -> Iterator[dict[str, Any]]:
        """Every message from the daemon until it closes the connection."""
        while True:
            while b"\n" not in self._buffer:
                data = self.sock.recv(65536)
                if not data:
                    return
                self._buffer += data
            line, self._buffer = self._buffer.split(b"\n", 1)
            yield json.loads(line)

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        request_id = next(self._ids)
        self.sock.sendall(jsonrpc.encode_line(jsonrpc.request(method, params, request_id)))
        for message in self.messages():
            if message.get("id") == request_id:
                assert "result" in message, message
                return message["result"]
            self.pushed.append(message)
        raise EOFError(f"closed before answering {method}")

    def until(self, found: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first message ``found`` accepts, among those pushed so far or to come."""
        for message in self.pushed:
            if found(message):
                return message
        for message in self.messages():
            self.pushed.append(message)
            if found(message):
                return message
        raise EOFError("closed before the message came")


def _start(daemon_process: Any, short_tmp: Path, settings: str, *extra: str) -> tuple[Any, Path]:
    config = short_tmp / "statusd.toml"
    config.write_text(settings)
    process = daemon_process()
    process.start("--config", str(config), *extra)
    return process, config


class Child:
    """``action(say, hear)`` run as nobody in a thread's forked child: ``say(text)`` tells
    the parent (``heard()``), ``hear()`` waits for the parent's ``tell()``."""

    def __init__(
        self,
        action: Callable[[Callable[[str], None], Callable[[], str]], Any],
        uid: int = NOBODY_UID,
        gid: int = NOBODY_GID,
    ) -> None:
        up_read, up_write = os.pipe()
        down_read, down_write = os.pipe()
        self._up = os.fdopen(up_read, "r")
        self._down = os.fdopen(down_write, "w")
        self.result: Any = None
        self.error: BaseException | None = None

        def run() -> Any:
            os.close(up_read)
            os.close(down_write)
            told = os.fdopen(up_write, "w")
            asked = os.fdopen(down_read, "r")

            def say(text: str) -> None:
                told.write(text + "\n")
                told.flush()

            def hear() -> str:
                return asked.readline().strip()

            return action(say, hear)

        def thread() -> None:
            try:
                self.result = run_as(uid, gid, run)
            except BaseException as exc:
                self.error = exc
            finally:
                os.close(up_write)
                os.close(down_read)

        self._thread = threading.Thread(target=thread)
        self._thread.start()

    def heard(self) -> str:
        line = self._up.readline().strip()
        if not line:
            self.join()
            raise AssertionError("the child ended early")
        return line

    def tell(self, text: str) -> None:
        self._down.write(text + "\n")
        self._down.flush()

    def join(self) -> Any:
        self._thread.join(WAIT + 5)
        self._up.close()
        self._down.close()
        assert not self._thread.is_alive(), "the child did not finish"
        if self.error is not None:
            raise self.error
        return self.result


@needs_root
def test_a_user_the_socket_no_longer_admits_is_closed_at_once(
    daemon_process: Any, short_tmp: Path
) -> None:
    process, config = _start(daemon_process, short_tmp, f'socket_group = "{NOBODY_GROUP}"\n')
    socket_path = process.socket

    def hold(say: Callable[[str], None], hear: Callable[[], str]) -> Any:
        client = LineClient(socket_path)
        client.call("subscribe", {"status": True})
        user = client.call("daemon.info")["user"]
        say(user)
        return user, list(client.messages())  # until the daemon closes it

    child = Child(hold)
    assert child.heard() == "nobody"
    with LineClient(socket_path) as ours:
        assert ours.call("daemon.info")["user"] == ME
        config.write_text(f'socket_group = "{ROOT_GROUP}"\n')
        process.signal(signal.SIGHUP)
        user, messages = child.join()
        # Root's connection, open all along, stays and is answered.
        started = time.monotonic()
        assert ours.call("daemon.info")["user"] == ME
        assert time.monotonic() - started < ANSWER_BOUND
    assert user == "nobody"
    errors = [message for message in messages if "error" in message]
    assert errors == [
        {
            "jsonrpc": "2.0",
            "id": None,
            "error": {
                "code": -32002,
                "message": "uid 65534 (nobody) may no longer connect to the control socket "
                "(0660, owner 0, group 0) after a configuration reload; "
                "the connection is closed",
                "data": {"reason": "access"},
            },
        }
    ]
    # New connections follow the same rule: the kernel refuses nobody now.
    assert _nobody_on_the_socket(socket_path) == "refused"
    assert "closing the connection of nobody" in process.stderr()


@needs_root
def test_a_client_that_reads_nothing_is_cut_off_after_the_grace(
    daemon_process: Any, short_tmp: Path
) -> None:
    """Its answer does not fit in the socket: the daemon's writer waits for it to read,
    and the error queued behind cannot go. The connection ends anyway (CLOSE_GRACE)."""
    settings = f'socket_group = "{NOBODY_GROUP}"\nstatus_history = {HISTORY}\n'
    process, config = _start(daemon_process, short_tmp, settings)
    socket_path = process.socket
    with LineClient(socket_path) as ours:
        # A full history of long messages, for everyone: status.recent's answer is 3 MB.
        message = {"level": "info", "message": "x" * 200, "audience": "all"}
        batch = [jsonrpc.request("status.publish", message, n) for n in range(250)]
        for _ in range(HISTORY // len(batch)):
            ours.sock.sendall(jsonrpc.encode_line(batch))
            answers: Any = next(ours.messages())  # a batch's answers: one list
            assert all("result" in answer for answer in answers), answers[:1]

        def stall(say: Callable[[str], None], hear: Callable[[], str]) -> Any:
            client = LineClient(socket_path)
            client.sock.sendall(jsonrpc.encode_line(jsonrpc.request("status.recent", {}, 1)))
            waiting = select.poll()
            waiting.register(client.sock, select.POLLIN)
            assert waiting.poll(WAIT * 1000), "no answer began"
            say("answer under way")  # and stuck: nothing is read
            # Now only the daemon's hang-up (a changed mask for the same socket).
            waiting.register(client.sock, select.POLLRDHUP)
            events = waiting.poll(WAIT * 1000)
            assert events, "the daemon did not hang up"
            data = b"".join(iter(lambda: client.sock.recv(1 << 20), b""))
            return len(data), data.count(b"\n")

        child = Child(stall)
        assert child.heard() == "answer under way"
        config.write_text(f'socket_group = "{ROOT_GROUP}"\n')
        process.signal(signal.SIGHUP)
        received, lines = child.join()
        # Cut off inside its answer: the rest of it, and the error, never came.
        assert 0 < received < ANSWER_BYTES
        assert lines == 0
        started = time.monotonic()
        assert ours.call("daemon.info")["user"] == ME
        assert time.monotonic() - started < ANSWER_BOUND


@needs_root
def test_an_ex_admin_keeps_the_connection_with_a_users_rights(
    daemon_process: Any, short_tmp: Path
) -> None:
    process, config = _start(
        daemon_process,
        short_tmp,
        f'socket_group = "{NOBODY_GROUP}"\nadmin_group = "{NOBODY_GROUP}"\n',
    )
    socket_path = process.socket
    with LineClient(socket_path) as ours:
        ours.call("status.publish", {"level": "info", "message": "root before"})
        root_task = ours.call("tasks.download", {"urls": ["http://127.0.0.1:9/x"]})["task_id"]
        seen = _demoted(socket_path, config, process, ours)
        started = time.monotonic()
        assert ours.call("daemon.info")["admin"] is True
        assert time.monotonic() - started < ANSWER_BOUND
    assert seen["admin"] is True
    assert seen["tasks"] == [root_task]
    assert seen["notice"] == {
        "jsonrpc": "2.0",
        "method": "access_changed",
        "params": {
            "admin": False,
            "reason": "uid 65534 (nobody) is no longer an admin (no admin_group) "
            "after a configuration reload",
        },
    }
    assert seen["admin after"] is False
    assert seen["tasks after"] == []
    # As an admin it read root's message; as a user it no longer does.
    assert "root before" in seen["status"]
    assert "root after" not in seen["status"]
    assert "mine" in seen["status"]


def _demoted(socket_path: Path, config: Path, process: Any, ours: LineClient) -> Any:
    """What nobody, an admin holding a connection, sees there before and after a reload
    takes ``admin_group`` away."""

    def hold(say: Callable[[str], None], hear: Callable[[], str]) -> Any:
        client = LineClient(socket_path)
        client.call("subscribe", {"status": True, "since": 0})
        seen: dict[str, Any] = {"admin": client.call("daemon.info")["admin"]}
        seen["tasks"] = [task["id"] for task in client.call("tasks.list")["tasks"]]
        client.until(lambda m: m.get("params", {}).get("message") == "root before")
        say("ready")
        seen["notice"] = client.until(lambda m: m.get("method") == "access_changed")
        seen["admin after"] = client.call("daemon.info")["admin"]
        seen["tasks after"] = [task["id"] for task in client.call("tasks.list")["tasks"]]
        say("demoted")
        hear()  # root has published "root after"
        client.call("status.publish", {"level": "info", "message": "mine"})
        client.until(lambda m: m.get("params", {}).get("message") == "mine")
        seen["status"] = [
            m["params"]["message"] for m in client.pushed if m.get("method") == "status"
        ]
        return seen

    child = Child(hold)
    assert child.heard() == "ready"
    config.write_text(f'socket_group = "{NOBODY_GROUP}"\n')  # admin_group gone
    process.signal(signal.SIGHUP)
    assert child.heard() == "demoted"
    ours.call("status.publish", {"level": "info", "message": "root after"})
    child.tell("go")
    return child.join()


@needs_root
def test_a_reload_that_takes_nothing_away_keeps_every_connection(
    daemon_process: Any, short_tmp: Path
) -> None:
    settings = f'socket_group = "{NOBODY_GROUP}"\n'
    process, config = _start(daemon_process, short_tmp, settings)
    socket_path = process.socket

    def hold(say: Callable[[str], None], hear: Callable[[], str]) -> Any:
        client = LineClient(socket_path)
        client.call("subscribe", {"status": True})
        say(client.call("daemon.info")["user"])
        client.until(lambda m: m.get("params", {}).get("message") == "Configuration reloaded")
        return client.call("daemon.info")["user"]

    # A third uid with no passwd entry, let in by the group it connected with: the group
    # database knows nothing of it, the kernel let it in, and a reload keeps it.
    third = Child(hold, THIRD_UID, NOBODY_GID)
    nobody = Child(hold)
    assert third.heard() == str(THIRD_UID)
    assert nobody.heard() == "nobody"
    config.write_text(settings + 'log_level = "debug"\n')
    process.signal(signal.SIGHUP)
    assert third.join() == str(THIRD_UID)
    assert nobody.join() == "nobody"
    assert "closing the connection" not in process.stderr()


async def test_a_lookup_under_way_when_a_reload_forgets_is_not_remembered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It may have read the groups from before the change the reload is about: its caller
    gets it, the next one looks again."""
    release = threading.Event()
    answers = iter([frozenset({1}), frozenset({2})])

    def slow_groups(uid: int, username: str) -> frozenset[int]:
        release.wait(WAIT)
        return next(answers)

    monkeypatch.setattr(identity, "groups_of", slow_groups)
    lookups = CallerLookups(daemon_uid=4242)
    got: list[frozenset[int]] = []

    async def look() -> None:
        got.append(await lookups.groups_for(1000, "alice"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(look)
        await trio.testing.wait_all_tasks_blocked()
        lookups.forget()
        release.set()
    assert got == [{1}]
    assert lookups.cached == 0
    assert await lookups.groups_for(1000, "alice") == {2}


# -- the WebSocket -----------------------------------------------------------------------------


def _open(port: int, token: str, origin: str | None = None) -> ClientConnection:
    return connect(
        f"ws://127.0.0.1:{port}/ws?token={token}",
        open_timeout=TIMEOUT,
        origin=origin,  # type: ignore[arg-type]
    )


def test_a_page_whose_origin_is_no_longer_allowed_is_closed(
    daemon_process: Any, short_tmp: Path
) -> None:
    port = _free_port()
    process, config = _start(
        daemon_process,
        short_tmp,
        '[websocket]\nallowed_origins = ["http://app.test:3000", "http://other.test"]\n',
        "--websocket",
        f"127.0.0.1:{port}",
    )
    token = blocking_call(process.socket, "tokens.create")["result"]["token"]
    with (
        _open(port, token, "http://app.test:3000") as page,
        _open(port, token, "http://other.test") as other,
        _open(port, token) as script,  # not a browser: no Origin
        _open(port, token, f"http://127.0.0.1:{port}") as dashboard,  # the page's own
    ):
        assert RpcClient(page).call("daemon.info")["user"] == ME
        config.write_text('[websocket]\nallowed_origins = ["http://other.test"]\n')
        process.signal(signal.SIGHUP)
        assert close_of(page) == (
            1008,
            "the page's origin is no longer in websocket.allowed_origins",
        )
        for survivor in (other, script, dashboard):
            started = time.monotonic()
            assert RpcClient(survivor).call("daemon.info")["user"] == ME
            assert time.monotonic() - started < ANSWER_BOUND


@needs_root
def test_a_revoked_token_closes_its_connections_and_no_other(
    daemon_process: Any, short_tmp: Path
) -> None:
    port = _free_port()
    process, _config = _start(
        daemon_process,
        short_tmp,
        f'socket_group = "{NOBODY_GROUP}"\n',
        "--websocket",
        f"127.0.0.1:{port}",
    )
    theirs = blocking_call(process.socket, "tokens.create", {"username": "nobody"})["result"]
    ours = blocking_call(process.socket, "tokens.create")["result"]
    with (
        _open(port, theirs["token"]) as nobody_ws,
        _open(port, ours["token"]) as root_ws,
    ):
        assert RpcClient(nobody_ws).call("daemon.info")["user"] == "nobody"
        # Revoked by its own user, over the Unix socket, from another uid's process.
        revoked = run_as_nobody(
            lambda: blocking_call(
                process.socket, "tokens.revoke", {"token_id": theirs["token_id"]}
            )["result"]
        )
        assert revoked == {"success": True}
        assert close_of(nobody_ws) == (1008, "token revoked")
        started = time.monotonic()
        assert RpcClient(root_ws).call("daemon.info")["user"] == ME
        assert time.monotonic() - started < ANSWER_BOUND
