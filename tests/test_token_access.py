"""A token works only while its user could connect to the control socket (statusd.access):
checked at each handshake (403) and, on SIGHUP, for live connections (closed with 1008),
with group look-ups made afresh. An admin who loses admin rights has their connections
closed too, and reconnects without them.

The end-to-end tests run a real daemon process as root; nobody (a real second uid, in a
forked child) shows that the Unix socket's rule and the WebSocket's agree.
"""

from __future__ import annotations

import grp
import os
import signal
import socket
import stat
import time
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from statusd import identity
from statusd.access import SocketAccess
from statusd.daemon import Daemon, run
from statusd.identity import CallerLookups
from tests.conftest import NOBODY_GID, NOBODY_UID, blocking_call, make_config, run_as_nobody
from tests.test_statusctl_tokens import _free_port
from tests.websocket_clients import TIMEOUT, RpcClient, close_of

OWNER, GROUP = 990, 991
ANSWER_BOUND = 5.0  # seconds: another user's call while a reload closes connections


@pytest.mark.parametrize(
    ("mode", "uid", "groups", "permitted"),
    [
        (0o660, OWNER, [], True),
        (0o660, 1000, [GROUP], True),
        (0o660, 1000, [5, GROUP], True),
        (0o660, 1000, [5], False),
        (0o600, 1000, [GROUP], False),
        (0o600, OWNER, [], True),
        (0o060, OWNER, [GROUP], False),  # the owner's bits decide for the owner
        (0o606, 1000, [GROUP], False),  # a member gets the group's bits, not the others'
        (0o606, 1000, [5], True),
        (0o400, OWNER, [], False),  # connecting takes write permission
        (0o000, 0, [], True),  # root passes whatever the bits
    ],
)
def test_permits_as_the_kernel_would(
    mode: int, uid: int, groups: list[int], permitted: bool
) -> None:
    assert SocketAccess(OWNER, GROUP, mode).permits(uid, groups) is permitted


def test_groups_matter_only_for_other_users() -> None:
    access = SocketAccess(OWNER, GROUP, 0o660)
    assert not access.needs_groups(0)
    assert not access.needs_groups(OWNER)
    assert access.needs_groups(1000)


def test_access_of_a_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        os.chmod(path, 0o640)
        info = path.stat()
        assert SocketAccess.of(path) == SocketAccess(info.st_uid, info.st_gid, 0o640)
        assert stat.S_ISSOCK(info.st_mode)
    assert SocketAccess(0, 990, 0o660).describe() == "0660, owner 0, group 990"


def test_groups_of_a_user_and_of_a_uid_without_passwd_entry() -> None:
    assert NOBODY_GID in identity.groups_of(NOBODY_UID, "nobody")
    assert identity.groups_of(65533, "65533") == frozenset()  # no passwd entry here


async def test_forget_makes_the_next_group_lookup_fresh(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = iter([frozenset({1}), frozenset({2})])
    monkeypatch.setattr(identity, "groups_of", lambda uid, username: next(answers))
    lookups = CallerLookups(daemon_uid=4242)
    assert await lookups.groups_for(1000, "alice") == {1}
    assert await lookups.groups_for(1000, "alice") == {1}  # cached
    lookups.forget()
    assert lookups.cached == 0
    assert await lookups.groups_for(1000, "alice") == {2}


# -- a real daemon, root and nobody -----------------------------------------------------------


NOBODY_GROUP = grp.getgrgid(NOBODY_GID).gr_name
ROOT_GROUP = grp.getgrgid(0).gr_name


def _start(daemon_process: Any, short_tmp: Path, settings: str) -> tuple[Any, Path, int]:
    if os.getuid() != 0:
        pytest.skip(f"nobody's access needs a second uid: running as uid {os.getuid()}")
    config = short_tmp / "statusd.toml"
    config.write_text(settings)
    port = _free_port()
    process = daemon_process()
    process.start("--config", str(config), "--websocket", f"127.0.0.1:{port}")
    return process, config, port


def _open(port: int, token: str) -> ClientConnection:
    return connect(f"ws://127.0.0.1:{port}/ws?token={token}", open_timeout=TIMEOUT)


def _refusal(port: int, token: str) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as caught:
        _open(port, token).close()
    response = caught.value.response
    return response.status_code, bytes(response.body or b"").decode()


def _nobody_on_the_socket(path: Path) -> Any:
    def attempt() -> Any:
        try:
            return blocking_call(path, "daemon.info")["result"]["user"]
        except PermissionError:
            return "refused"

    return run_as_nobody(attempt)


def test_a_user_dropped_from_the_socket_group_loses_the_websocket(
    daemon_process: Any, short_tmp: Path
) -> None:
    process, config, port = _start(daemon_process, short_tmp, f'socket_group = "{NOBODY_GROUP}"\n')
    nobody = blocking_call(process.socket, "tokens.create", {"username": "nobody"})["result"]
    root = blocking_call(process.socket, "tokens.create")["result"]
    assert _nobody_on_the_socket(process.socket) == "nobody"
    with _open(port, nobody["token"]) as theirs, _open(port, root["token"]) as ours:
        assert RpcClient(theirs).call("daemon.info")["user"] == "nobody"
        config.write_text(f'socket_group = "{ROOT_GROUP}"\n')
        process.signal(signal.SIGHUP)
        assert close_of(theirs) == (
            1008,
            "the token's user may no longer connect to the control socket",
        )
        # Another user's connection stays and is answered meanwhile.
        started = time.monotonic()
        assert RpcClient(ours).call("daemon.info")["user"] == "root"
        assert time.monotonic() - started < ANSWER_BOUND
    # The Unix socket and the WebSocket now agree: nobody is out of both.
    assert _nobody_on_the_socket(process.socket) == "refused"
    status, body = _refusal(port, nobody["token"])
    assert status == 403
    assert "the token's user 'nobody' may not connect to the control socket (0660" in body
    # The token itself was not revoked: back in the group, nobody is back.
    config.write_text(f'socket_group = "{NOBODY_GROUP}"\n')
    process.signal(signal.SIGHUP)
    deadline = time.monotonic() + TIMEOUT
    while _nobody_on_the_socket(process.socket) != "nobody":
        assert time.monotonic() < deadline, "the socket's group did not change back"
        time.sleep(0.05)
    with _open(port, nobody["token"]) as again:
        assert RpcClient(again).call("daemon.info")["user"] == "nobody"


def test_an_ex_admin_loses_admin_rights_on_the_websocket(
    daemon_process: Any, short_tmp: Path
) -> None:
    process, config, port = _start(
        daemon_process,
        short_tmp,
        f'socket_group = "{NOBODY_GROUP}"\nadmin_group = "{NOBODY_GROUP}"\n',
    )
    nobody = blocking_call(process.socket, "tokens.create", {"username": "nobody"})["result"]
    with _open(port, nobody["token"]) as ws:
        assert RpcClient(ws).call("daemon.info")["admin"] is True
        config.write_text(f'socket_group = "{NOBODY_GROUP}"\n')  # admin_group gone
        process.signal(signal.SIGHUP)
        assert close_of(ws) == (1008, "the token's user is no longer an admin")
    with _open(port, nobody["token"]) as ws:
        client = RpcClient(ws)
        assert client.call("daemon.info")["admin"] is False
        answer = client.request("notifications.create", {"type": "t", "title": "t", "message": ""})
        assert answer["error"]["code"] == -32002
    # Over the Unix socket too, from the next connection on.
    assert (
        run_as_nobody(lambda: blocking_call(process.socket, "daemon.info")["result"]["admin"])
        is False
    )


async def test_reload_applies_socket_mode_and_group(nursery: trio.Nursery, short_tmp: Path) -> None:
    config = make_config(short_tmp)
    daemon: Daemon = await nursery.start(run, config)
    path = daemon.config.socket
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    group = NOBODY_GROUP if os.getuid() == 0 else None  # only root gives a file any group
    assert await daemon.reload(lambda: attrs.evolve(config, socket_mode=0o600, socket_group=group))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    if group is not None:
        assert path.stat().st_gid == NOBODY_GID
    assert (daemon.config.socket_mode, daemon.config.socket_group) == (0o600, group)
    assert await daemon.unix.access() == SocketAccess.of(path)
    daemon.request_stop()
    await daemon.wait_stopped()
