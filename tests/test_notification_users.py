"""Notifications with a real second uid: a real daemon process, and a forked child that
dropped to nobody talks to it. Without root these are skipped, saying why."""

from __future__ import annotations

import grp
import json
import socket
from pathlib import Path
from typing import Any

from statusd.protocol import jsonrpc
from tests.conftest import blocking_call, needs_root, run_as_nobody

NOBODY_GROUP = grp.getgrgid(65534).gr_name


def _start(daemon_process: Any, short_tmp: Path) -> Any:
    config = short_tmp / "statusd.toml"
    config.write_text(f'socket_group = "{NOBODY_GROUP}"\n')
    process = daemon_process()
    process.start("--config", str(config))
    return process


@needs_root
def test_each_user_sees_and_changes_only_their_own_inbox(
    daemon_process: Any, short_tmp: Path
) -> None:
    process = _start(daemon_process, short_tmp)

    def call(method: str, params: dict[str, Any] | None = None) -> Any:
        return blocking_call(process.socket, method, params)

    def create(**params: Any) -> int:
        response = call("notifications.create", {"type": "test", "message": "", **params})
        return int(response["result"]["notification_id"])

    def listed(**params: Any) -> list[int]:
        return [n["id"] for n in call("notifications.list", params)["result"]["notifications"]]

    for_nobody = create(username="nobody", title="for nobody")
    for_root = create(username="root", title="for root")
    system = create(title="for everyone")

    def as_nobody() -> dict[str, Any]:
        seen: dict[str, Any] = {"list": listed()}
        seen["count"] = call("notifications.unread_count")["result"]["count"]
        seen["read other"] = call("notifications.mark_read", {"id": for_root})["error"]
        seen["delete other"] = call("notifications.delete", {"id": for_root})["error"]["code"]
        seen["create"] = call("notifications.create", {"type": "t", "title": "x", "message": ""})[
            "error"
        ]
        seen["peek"] = call("notifications.list", {"username": "root"})["error"]
        seen["own name"] = call("notifications.unread_count", {"username": "nobody"})["result"]
        seen["read system"] = call("notifications.mark_read", {"id": system})["result"]
        seen["count after"] = call("notifications.unread_count")["result"]["count"]
        seen["delete system"] = call("notifications.delete", {"id": system})["result"]
        seen["list after"] = listed()
        seen["read all"] = call("notifications.mark_all_read")["result"]["count"]
        seen["delete read"] = call("notifications.delete_read")["result"]["count"]
        seen["left"] = listed()
        return seen

    seen = run_as_nobody(as_nobody)
    assert seen["list"] == [system, for_nobody]
    assert seen["count"] == 2
    # Someone else's notification is "not found", exactly like one that does not exist.
    assert seen["read other"] == {
        "code": -32001,
        "message": f"notification {for_root} not found",
        "data": {"field": "id", "id": for_root},
    }
    assert seen["delete other"] == -32001
    assert seen["create"]["code"] == -32002
    assert seen["create"]["message"] == "notifications.create is for admins only"
    assert seen["peek"]["code"] == -32002
    assert seen["peek"]["data"] == {"field": "username"}
    assert seen["own name"] == {"count": 2}
    assert seen["read system"] == {"success": True}
    assert seen["count after"] == 1
    assert seen["delete system"] == {"success": True}
    assert seen["list after"] == [for_nobody]
    assert seen["read all"] == 1
    assert seen["delete read"] == 1
    assert seen["left"] == []
    # Root's inbox is untouched: the system-wide one is still there and unread for root.
    mine = call("notifications.list")["result"]["notifications"]
    assert [(n["id"], n["read"]) for n in mine] == [(system, False), (for_root, False)]
    assert listed(username="nobody") == []


@needs_root
def test_a_users_pushes_come_to_that_users_sessions(daemon_process: Any, short_tmp: Path) -> None:
    process = _start(daemon_process, short_tmp)
    own = blocking_call(
        process.socket,
        "notifications.create",
        {"username": "nobody", "type": "t", "title": "yours", "message": ""},
    )["result"]["notification_id"]

    def as_nobody() -> list[Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as watcher:
            watcher.settimeout(10)
            watcher.connect(str(process.socket))
            reader = watcher.makefile("rb")
            watcher.sendall(
                jsonrpc.encode_line(jsonrpc.request("subscribe", {"notifications": True}, 1))
            )
            answers = [json.loads(reader.readline())]
            # Another session of the same user reads the notification: the badge follows.
            blocking_call(process.socket, "notifications.mark_read", {"id": own})
            answers.append(json.loads(reader.readline()))
            return answers

    subscribed, pushed = run_as_nobody(as_nobody)
    assert "subscription" in subscribed["result"]
    assert pushed == {"jsonrpc": "2.0", "method": "unread_count", "params": {"count": 0}}
