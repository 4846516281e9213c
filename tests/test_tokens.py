"""WebSocket tokens: minted, listed and revoked over the Unix socket; stored as hashes only;
per-user rules with a real second uid; kept across a restart."""

from __future__ import annotations

import grp
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
import trio

from statusd.daemon import Daemon
from statusd.errors import StartupError
from statusd.tokens import READ_METHODS, TokenStore, refusal, split_token
from tests.conftest import RUNNER, blocking_call, needs_root, run_as_nobody
from tests.websocket_clients import TIMEOUT, RpcClient, nobody_ws_daemon, open_ws

__all__ = ["nobody_ws_daemon"]

NOBODY_GROUP = grp.getgrgid(65534).gr_name


async def test_create_list_revoke(daemon: Daemon, connect: Any) -> None:
    client = await connect()
    made = await client.call("tokens.create", {"scope": "read"})
    assert set(made) == {"token_id", "token", "username", "scope", "created_at", "expires_at"}
    assert made["expires_at"] is None
    assert (made["username"], made["scope"]) == (RUNNER, "read")
    assert split_token(made["token"]) is not None
    assert made["token"].startswith(f"sdt_{made['token_id']}_")
    default = await client.call("tokens.create")
    assert default["scope"] == "control"
    listed = (await client.call("tokens.list"))["tokens"]
    assert [t["token_id"] for t in listed] == [made["token_id"], default["token_id"]]
    assert all(
        set(t) == {"token_id", "username", "scope", "created_at", "expires_at"} for t in listed
    )
    assert made["token"] not in json.dumps(listed)
    assert await client.call("tokens.revoke", {"token_id": made["token_id"]}) == {"success": True}
    again = await client.request("tokens.revoke", {"token_id": made["token_id"]})
    assert again["error"]["code"] == -32001
    assert [t["token_id"] for t in (await client.call("tokens.list"))["tokens"]] == [
        default["token_id"]
    ]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"scope": "admin"}, "scope"),
        ({"scope": 1}, "scope"),
        ({"username": 5}, "username"),
        ({"username": "no-such-user-here"}, "username"),
        ({"extra": True}, "extra"),
    ],
)
async def test_bad_create_params(daemon: Daemon, connect: Any, params: Any, field: str) -> None:
    client = await connect()
    answer = await client.request("tokens.create", params)
    assert answer["error"]["code"] == -32602
    assert answer["error"]["data"]["field"] == field
    assert (await client.call("tokens.list"))["tokens"] == []


async def test_revoke_needs_a_token_id(daemon: Daemon, connect: Any) -> None:
    client = await connect()
    answer = await client.request("tokens.revoke", {})
    assert answer["error"]["code"] == -32602
    assert answer["error"]["data"]["field"] == "token_id"


async def test_per_user_limit(
    daemon: Daemon, connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("statusd.api.MAX_TOKENS_PER_USER", 2)
    client = await connect()
    await client.call("tokens.create")
    await client.call("tokens.create")
    answer = await client.request("tokens.create")
    assert answer["error"]["code"] == -32004
    assert answer["error"]["data"] == {"limit": 2}
    # Another user's count is their own.
    assert (await client.call("tokens.create", {"username": "nobody"}))["username"] == "nobody"


async def test_file_holds_hashes_only_with_mode_0600(daemon: Daemon, connect: Any) -> None:
    client = await connect()
    made = await client.call("tokens.create")
    path = daemon.config.state_dir / "tokens.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    # The secret is base64url and may itself hold "_": split as the daemon does.
    _, secret = split_token(made["token"]) or ("", "")
    assert len(secret) >= 40
    assert secret not in text
    assert made["token"] not in text
    assert made["token_id"] in text
    assert not list(path.parent.glob("tokens.json.*"))  # no temporary file left


async def test_store_checks_secrets(tmp_path: Path) -> None:
    store = await TokenStore.open(tmp_path / "tokens.json")
    new = await store.create("alice", "read")
    assert store.verify(new.token) == new.record
    token_id, secret = split_token(new.token) or ("", "")
    for wrong in (
        f"sdt_{token_id}_{secret[:-1]}",
        f"sdt_{token_id}_",
        f"sdt_ffffffffffffffff_{secret}",
        f"xyz_{token_id}_{secret}",
        "",
        "sdt",
    ):
        assert store.verify(wrong) is None, wrong
    reopened = await TokenStore.open(tmp_path / "tokens.json")
    assert reopened.verify(new.token) == new.record
    revoked: list[str] = []
    reopened.on_revoked(revoked.append)
    assert await reopened.revoke(new.record.id)
    assert not await reopened.revoke(new.record.id)
    assert revoked == [new.record.id]
    assert (await TokenStore.open(tmp_path / "tokens.json")).verify(new.token) is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{", "damaged"),
        ('{"version": 2, "tokens": []}', "version must be 1"),
        ('{"version": 1, "tokens": [{"id": "a"}]}', "damaged"),
        (
            '{"version": 1, "tokens": [{"id": "a", "username": "u", "scope": "all", '
            '"created_at": "x", "secret_sha256": "00"}]}',
            "scope must be read or control",
        ),
    ],
)
async def test_damaged_file_stops_startup(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(text)
    with pytest.raises(StartupError, match=problem):
        await TokenStore.open(path)
    assert path.read_text() == text  # left alone for the user to look at


def test_scope_table() -> None:
    assert refusal(None, "tokens.create") is None
    assert refusal("control", "tasks.cancel") is None
    assert refusal("control", "tokens.create") is not None
    assert refusal("read", "tasks.download") is not None
    for method in READ_METHODS:
        assert refusal("read", method) is None
    for method in ("notifications.list", "notifications.mark_all_read", "subscribe"):
        assert method in READ_METHODS
    for method in ("notifications.delete", "notifications.create", "status.publish"):
        assert refusal("read", method) is not None


# -- a second uid (the tests run as root and fork a child that becomes nobody) ----------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@needs_root
def test_non_admin_makes_tokens_only_for_themself(daemon_process: Any, short_tmp: Path) -> None:
    config = short_tmp / "statusd.toml"
    config.write_text(f'socket_group = "{NOBODY_GROUP}"\n')
    process = daemon_process()
    process.start("--config", str(config))
    root_token = blocking_call(process.socket, "tokens.create")["result"]

    def as_nobody() -> Any:
        own = blocking_call(process.socket, "tokens.create", {"scope": "read"})
        other = blocking_call(process.socket, "tokens.create", {"username": "root"})
        listed = blocking_call(process.socket, "tokens.list")
        revoke = blocking_call(
            process.socket, "tokens.revoke", {"token_id": root_token["token_id"]}
        )
        return own, other, listed, revoke

    own, other, listed, revoke = run_as_nobody(as_nobody)
    assert own["result"]["username"] == "nobody"
    assert other["error"]["code"] == -32002
    assert "only an admin" in other["error"]["message"]
    assert [t["username"] for t in listed["result"]["tokens"]] == ["nobody"]
    assert revoke["error"]["code"] == -32001
    # The admin sees both.
    tokens = blocking_call(process.socket, "tokens.list")["result"]["tokens"]
    assert sorted(t["username"] for t in tokens) == ["nobody", "root"]


def test_tokens_survive_a_restart(daemon_process: Any) -> None:
    port = _free_port()
    process = daemon_process()
    process.start("--websocket", f"127.0.0.1:{port}")
    made = blocking_call(process.socket, "tokens.create", {"scope": "read"})["result"]
    info = blocking_call(process.socket, "daemon.info")["result"]
    assert info["websocket"] == f"127.0.0.1:{port}"
    process.stop()  # SIGKILL: no chance to write anything at exit
    process.start("--websocket", f"127.0.0.1:{port}")
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{port}/ws?token={made['token']}", open_timeout=TIMEOUT) as ws:
        summary = RpcClient(ws).call("tasks.summary")
    assert summary["total"] == 0
    state = process.directory / "state" / "tokens.json"
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o600


async def test_nobody_token_sees_only_nobodys_things(nobody_ws_daemon: Daemon) -> None:
    from tests.websocket_clients import make_token

    made = await make_token(nobody_ws_daemon, scope="control", username="nobody")

    def session() -> Any:
        with open_ws(nobody_ws_daemon, made["token"]) as ws:
            return RpcClient(ws).call("daemon.info")

    info = await trio.to_thread.run_sync(session)
    assert (info["user"], info["uid"], info["admin"]) == ("nobody", 65534, False)
