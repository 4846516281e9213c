"""``statusctl token create|list|revoke`` against a real daemon process with its WebSocket on,
and the token it prints used by a real WebSocket client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.websocket_clients import TIMEOUT, RpcClient, close_of

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def statusctl(process: Any, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("STATUSD_SOCKET", None)
    return subprocess.run(
        [sys.executable, "-m", "statusctl", "--socket", str(process.socket), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


def test_token_commands_end_to_end(daemon_process: Any) -> None:
    port = _free_port()
    process = daemon_process()
    process.start("--websocket", f"127.0.0.1:{port}")
    created = statusctl(process, "token", "create", "--scope", "read")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("sdt_")
    assert "\n" not in token
    assert "not shown again" in created.stderr
    as_json = statusctl(process, "--json", "token", "create", "--user", "nobody")
    other = json.loads(as_json.stdout)
    assert (other["username"], other["scope"]) == ("nobody", "control")

    listed = statusctl(process, "token", "list")
    assert listed.returncode == 0
    header, *lines = listed.stdout.splitlines()
    assert header.split() == ["ID", "USER", "SCOPE", "CREATED", "EXPIRES"]
    assert len(lines) == 2
    assert token not in listed.stdout
    assert "read" in lines[0]
    assert "nobody" in lines[1]
    listed_json = json.loads(statusctl(process, "--json", "token", "list").stdout)
    token_id = listed_json["tokens"][0]["token_id"]
    assert token.startswith(f"sdt_{token_id}_")

    with connect(
        f"ws://127.0.0.1:{port}/ws",
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=TIMEOUT,
    ) as ws:
        client = RpcClient(ws)
        assert client.call("daemon.info")["websocket"] == f"127.0.0.1:{port}"
        revoked = statusctl(process, "token", "revoke", token_id)
        assert revoked.returncode == 0
        assert revoked.stdout.strip() == f"revoked {token_id}"
        assert close_of(ws) == (1008, "token revoked")

    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{port}/ws?token={token}", open_timeout=TIMEOUT)
    assert refused.value.response.status_code == 401

    again = statusctl(process, "token", "revoke", token_id)
    assert again.returncode == 4
    assert "not found" in again.stderr
    bad = statusctl(process, "token", "create", "--scope", "admin")
    assert bad.returncode == 2


def test_sigterm_closes_websocket_clients_with_going_away(daemon_process: Any) -> None:
    port = _free_port()
    process = daemon_process()
    process.start("--websocket", f"127.0.0.1:{port}")
    token = statusctl(process, "token", "create").stdout.strip()
    with connect(f"ws://127.0.0.1:{port}/ws?token={token}", open_timeout=TIMEOUT) as ws:
        RpcClient(ws).call("subscribe", {"status": True})
        process.signal(signal.SIGTERM)
        assert close_of(ws) == (1001, "statusd is stopping")
    assert process.wait() == 0


def test_websocket_address_in_use_stops_startup(daemon_process: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = daemon_process()
        process.start("--websocket", f"127.0.0.1:{port}", wait=False)
        assert process.wait() == 1
    assert f"websocket: cannot listen on 127.0.0.1:{port}: it is in use" in process.stderr()


def test_bad_websocket_flag_is_a_config_error(daemon_process: Any) -> None:
    process = daemon_process()
    process.start("--websocket", "127.0.0.1:http", wait=False)
    assert process.wait() == 2
    assert "websocket.listen: port must be from 1 to 65535" in process.stderr()
