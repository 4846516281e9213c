"""Credentials for downloads: Basic credentials in the URL, per-item and task-level
``headers``, the daemon user's netrc; where they go (their own origin only) and where they
never show (logs, status, notifications, ``tasks.list``, another user's view).

Against real HTTP servers on 127.0.0.1 that record every request's headers, an in-process
daemon, and, for the per-user rules, a real daemon process called by forked children that
drop to ``nobody`` and to uid 65533 (skipped, saying why, when not root). "Served
meanwhile" means another user's call is answered within ``SERVED_WITHIN`` seconds, a bound
wide enough for a busy two-core machine, never a timing assertion.
"""

from __future__ import annotations

import base64
import grp
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import trio

from statusd.daemon import Daemon
from statusd.downloads import DownloadItem, ItemState, auth, download_item
from statusd.downloads.http import HTTPClient
from statusd.redact import hide_credentials
from tests.conftest import NOBODY_GID, needs_root
from tests.http_servers import (
    HTTPTestServer,
    Request,
    Responder,
    http_server,
    redirect,
    sequence,
    serve_data,
    status,
)
from tests.test_download_proxy import FAST
from tests.test_download_tasks import wait_for_end
from tests.test_task_limits import SERVED_WITHIN, THIRD_UID, call_as, codes

__all__ = ["http_server"]

SECRETS = ("url-PASSWORD-1", "header-TOKEN-2", "task-COOKIE-3")
BUSY = -32004


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def shows_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text
        assert base64.b64encode(f"u:{secret}".encode()).decode() not in text


# --- the rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"X Y": "1"}, "header name 'X Y' is not an HTTP token"),
        ({"": "1"}, "header name '' is not an HTTP token"),
        ({"Host": "evil"}, "header 'Host' is set by statusd and cannot be given"),
        ({"range": "bytes=0-"}, "header 'range' is set by statusd and cannot be given"),
        ({"Proxy-Authorization": "x"}, "header 'Proxy-Authorization' is set by statusd"),
        ({"X-A": "v\r\nX-Injected: 1"}, "header 'X-A' value must be printable ASCII"),
        ({"X-A": "v\n"}, "header 'X-A' value must be printable ASCII"),
        ({"X-A": "v\x00"}, "header 'X-A' value must be printable ASCII"),
        ({"X-A": " padded"}, "header 'X-A' value must be printable ASCII"),
        ({"X-A": "naïve"}, "header 'X-A' value must be printable ASCII"),
    ],
)
def test_bad_headers_are_refused_without_their_value(headers: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match="header") as caught:
        auth.check_headers(headers)
    assert str(caught.value).startswith(message)
    for value in headers.values():
        if len(value) > 2:
            assert value not in str(caught.value)


def test_good_headers_pass_and_an_items_own_win() -> None:
    assert auth.check_headers({"Authorization": "Bearer t", "X-Empty": ""}) == (
        ("Authorization", "Bearer t"),
        ("X-Empty", ""),
    )
    task = (("Cookie", "a=1"), ("X-Team", "t"))
    assert auth.merged(task, (("x-team", "mine"),)) == (("Cookie", "a=1"), ("x-team", "mine"))
    assert auth.header_bytes((("A", "bc"),)) == len("A: bc\r\n")


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("http://h/a", "http://h/b?c", True),
        ("http://h/a", "http://h:80/b", True),
        ("https://h/a", "https://H:443/b", True),
        ("http://u:p@h/a", "http://h/b", True),
        ("http://h/a", "https://h/a", False),
        ("http://h:8080/a", "http://h:8081/a", False),
        ("http://h/a", "http://h.evil/a", False),
    ],
)
def test_same_origin_is_scheme_host_and_port(a: str, b: str, same: bool) -> None:
    assert auth.same_origin(a, b) is same


def test_url_credentials_become_basic_unless_the_headers_log_in() -> None:
    assert auth.url_authorization("http://u:p%40ss@h/") == basic("u", "p@ss")
    assert auth.url_authorization("http://h/") is None
    assert auth.request_headers("http://u:p@h/", ()) == [("Authorization", basic("u", "p"))]
    mine = [("authorization", "Bearer t")]
    assert auth.request_headers("http://u:p@h/", mine) == mine


def test_hide_credentials() -> None:
    assert hide_credentials("http://u:p@h:8/a/b?q=1") == "http://***@h:8/a/b?q=1"
    assert hide_credentials("http://h/a@b?x=@") == "http://h/a@b?x=@"
    assert hide_credentials("https://p@ss:x@h/") == "https://***@h/"


def test_netrc_names_the_hosts_credentials(tmp_path: Path) -> None:
    path = tmp_path / "netrc"
    path.write_text("machine files.test login nu password npw\ndefault login d password dpw\n")
    path.chmod(0o600)
    entries = auth.read_netrc(str(path))
    assert entries is not None
    assert auth.netrc_authorization(entries, "https://files.test/x") == basic("nu", "npw")
    assert auth.netrc_authorization(entries, "https://other.test/x") == basic("d", "dpw")
    assert auth.read_netrc(str(tmp_path / "none")) is None


# --- the engine: what reaches which server ----------------------------------------------------


def authorization(server: HTTPTestServer, path: str) -> list[str | None]:
    return [request.headers.get("authorization") for request in server.requests_for(path)]


async def test_url_credentials_and_headers_reach_their_origin(
    http_server: HTTPTestServer, tmp_path: Path
) -> None:
    url = http_server.route("/private.bin", serve_data(b"p" * 1000))
    item = DownloadItem(
        url.replace("http://", f"http://u:{SECRETS[0]}@"), headers={"X-Token": SECRETS[1]}
    )
    async with HTTPClient() as client:
        result = await download_item(client, item, tmp_path, FAST, ItemState())
    assert result.error is None
    [request] = http_server.requests_for("/private.bin")
    assert request.headers["authorization"] == basic("u", SECRETS[0])
    assert request.headers["x-token"] == SECRETS[1]
    assert request.headers["host"] == f"127.0.0.1:{http_server.port}"  # no userinfo in Host
    shows_no_secret(repr(item))  # a repr may end up in a log


async def test_a_redirect_to_another_port_drops_credentials_and_headers(
    nursery: trio.Nursery, http_server: HTTPTestServer, tmp_path: Path
) -> None:
    elsewhere = HTTPTestServer()
    await nursery.start(elsewhere.serve)
    target = elsewhere.route("/moved.bin", serve_data(b"m" * 100))
    same = http_server.route("/same.bin", redirect("/hop"))
    http_server.route("/hop", redirect(target))
    item = DownloadItem(
        same.replace("http://", f"http://u:{SECRETS[0]}@"), headers={"X-Token": SECRETS[1]}
    )
    async with HTTPClient() as client:
        result = await download_item(client, item, tmp_path, FAST, ItemState())
    assert result.error is None
    # Same scheme, host and port: the redirect keeps them (curl's rule) ...
    assert authorization(http_server, "/hop") == [basic("u", SECRETS[0])]
    assert http_server.requests_for("/hop")[0].headers["x-token"] == SECRETS[1]
    # ... another port does not get them.
    [moved] = elsewhere.requests_for("/moved.bin")
    assert "authorization" not in moved.headers
    assert "x-token" not in moved.headers


# --- the daemon: the owner's view, the journal, the log ---------------------------------------


async def test_the_owner_sees_credentials_only_as_stars(
    daemon: Daemon,
    connect: Any,
    http_server: HTTPTestServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    http_server.route("/good.bin", serve_data(b"g" * 1000))
    http_server.route("/bad.bin", status(403))
    with_password = f"http://u:{SECRETS[0]}@127.0.0.1:{http_server.port}"
    client = await connect()
    await client.call("subscribe", {"tasks": "all", "status": True})
    params = {
        "items": [
            {"url": f"{with_password}/good.bin", "headers": {"X-Token": SECRETS[1]}},
            {"url": f"{with_password}/bad.bin"},
        ],
        "headers": {"Cookie": SECRETS[2]},
        "batch_size": 1,
    }
    task_id = (await client.call("tasks.download", params))["task_id"]
    task = await wait_for_end(client, task_id)
    assert task["status"] == "failed"
    [request] = http_server.requests_for("/good.bin")
    assert request.headers["authorization"] == basic("u", SECRETS[0])
    assert (request.headers["x-token"], request.headers["cookie"]) == (SECRETS[1], SECRETS[2])
    assert http_server.requests_for("/bad.bin")[0].headers["cookie"] == SECRETS[2]
    shown = f"http://***@127.0.0.1:{http_server.port}"
    assert [item["url"] for item in task["result"]["items"]] == [
        f"{shown}/good.bin",
        f"{shown}/bad.bin",
    ]
    assert task["metadata"]["headers"] == {"Cookie": "***"}
    listed = await client.call("tasks.list")
    recent = await client.call("status.recent")
    notifications = await client.call("notifications.list")
    assert any("Failed to download file" in m["message"] for m in recent["messages"])
    for text in (json.dumps(task), json.dumps(listed), json.dumps(recent)):
        shows_no_secret(text)
    shows_no_secret(json.dumps(notifications))
    shows_no_secret(caplog.text)
    # Only the journal keeps them, for a retry or a restart, and only its owner reads it.
    journal = daemon.config.state_dir / "tasks.jsonl"
    assert all(secret in journal.read_text() for secret in SECRETS)
    assert stat.S_IMODE(journal.stat().st_mode) == 0o600


async def test_a_retry_sends_the_credentials_again(
    daemon: Daemon, connect: Any, http_server: HTTPTestServer
) -> None:
    url = http_server.route("/later.bin", sequence(status(404), serve_data(b"l" * 10)))
    client = await connect()
    await client.call("subscribe", {"tasks": "all"})
    params = {"urls": [url.replace("http://", "http://u:pw@")], "headers": {"X-Token": "t"}}
    task_id = (await client.call("tasks.download", params))["task_id"]
    assert (await wait_for_end(client, task_id))["status"] == "failed"
    await client.call("tasks.retry", {"task_id": task_id})
    assert (await wait_for_end(client, task_id))["status"] == "completed"
    assert authorization(http_server, "/later.bin") == [basic("u", "pw")] * 2
    assert [r.headers["x-token"] for r in http_server.requests_for("/later.bin")] == ["t"] * 2


async def test_they_survive_a_restart_in_the_journal(
    nursery: trio.Nursery, short_tmp: Path, http_server: HTTPTestServer
) -> None:
    """A task cut off by a daemon stop sends them again when the next daemon resumes it."""
    from statusd.daemon import run
    from tests.conftest import RawClient, make_config

    first_request = trio.Event()
    serve = serve_data(b"s" * 100)

    async def hang_first(request: Request, responder: Responder) -> None:
        if request.number == 1:
            first_request.set()
            await responder.hang()
        await serve(request, responder)

    url = http_server.route("/resumed.bin", hang_first)
    config = make_config(short_tmp)
    params = {"urls": [url.replace("http://", "http://u:pw@")], "headers": {"X-Token": "t"}}
    first: Daemon = await nursery.start(run, config)
    client = await RawClient.connect(config.socket)
    task_id = (await client.call("tasks.download", params))["task_id"]
    with trio.fail_after(20):
        await first_request.wait()
    await trio.aclose_forcefully(client.stream)
    first.request_stop()
    await first.wait_stopped()
    second: Daemon = await nursery.start(run, config)
    client = await RawClient.connect(config.socket)
    await client.call("subscribe", {"tasks": "all"})
    task = await client.call("tasks.get", {"task_id": task_id})
    if task["status"] not in ("completed", "failed"):
        task = await wait_for_end(client, task_id)
    assert task["status"] == "completed"
    assert authorization(http_server, "/resumed.bin") == [basic("u", "pw")] * 2
    assert [r.headers["x-token"] for r in http_server.requests_for("/resumed.bin")] == ["t"] * 2
    await trio.aclose_forcefully(client.stream)
    second.request_stop()
    await second.wait_stopped()


@pytest.mark.parametrize(
    ("params", "path", "message"),
    [
        ({"headers": {"Host": "x"}}, "headers", "header 'Host' is set by statusd"),
        (
            {"items": [{"url": "URL", "headers": {"X": "a\r\nb"}}], "urls": None},
            "items[0].headers",
            "header 'X' value must be printable ASCII",
        ),
    ],
)
async def test_bad_headers_are_refused_naming_the_field(
    daemon: Daemon, connect: Any, params: dict[str, Any], path: str, message: str
) -> None:
    client = await connect()
    request = {"urls": ["http://127.0.0.1:9/x"], **params}
    if "items" in params:
        request.pop("urls")
        request["items"] = [{**params["items"][0], "url": "http://127.0.0.1:9/x"}]
    response = await client.request("tasks.download", request)
    assert response["error"]["code"] == -32602
    assert path in json.dumps(response["error"])
    assert message in response["error"]["message"]
    assert "a\\r\\nb" not in json.dumps(response)


async def test_netrc_logs_in_for_the_daemons_own_user(
    daemon: Daemon,
    connect: Any,
    http_server: HTTPTestServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text("machine 127.0.0.1 login nu password netrc-pw\n")
    (home / ".netrc").chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    url = http_server.route("/n.bin", serve_data(b"n"))
    own = http_server.route("/own.bin", serve_data(b"o"))
    client = await connect()
    await client.call("subscribe", {"tasks": "all"})
    for params in ({"urls": [url]}, {"urls": [own], "headers": {"Authorization": "Bearer t"}}):
        task_id = (await client.call("tasks.download", params))["task_id"]
        assert (await wait_for_end(client, task_id))["status"] == "completed"
    assert authorization(http_server, "/n.bin") == [basic("nu", "netrc-pw")]
    assert authorization(http_server, "/own.bin") == ["Bearer t"]  # its own wins


# --- other users: a real daemon process, nobody and uid 65533 ---------------------------------


@needs_root
async def test_other_users_never_see_them_and_get_no_netrc(
    http_server: HTTPTestServer, daemon_process: Any, short_tmp: Path
) -> None:
    group = grp.getgrgid(NOBODY_GID).gr_name
    config = short_tmp / "statusd.toml"
    config.write_text(
        f'socket_group = "{group}"\ndownload_dir = "{short_tmp / "dl"}"\n'
        "[limits]\nmax_item_headers = 2\nmax_item_header_bytes = 100\n"
    )
    (short_tmp / ".netrc").write_text("machine 127.0.0.1 login root-nu password netrc-pw\n")
    (short_tmp / ".netrc").chmod(0o600)
    process = daemon_process()
    await trio.to_thread.run_sync(process.start, "--config", str(config))
    arrived = [trio.Event(), trio.Event()]
    serve = serve_data(b"r" * 100)

    async def counted(request: Request, responder: Responder) -> None:
        arrived[request.number - 1].set()
        await serve(request, responder)

    url = http_server.route("/r.bin", counted)
    with_password = url.replace("http://", f"http://u:{SECRETS[0]}@")

    async def as_user(uid: int, *calls: tuple[str, dict[str, Any] | None]) -> Any:
        return await trio.to_thread.run_sync(call_as, uid, list(calls), process.socket)

    from tests.conftest import blocking_call

    def root_call(method: str, params: dict[str, Any] | None = None) -> Any:
        return blocking_call(process.socket, method, params)

    root = await trio.to_thread.run_sync(
        root_call,
        "tasks.download",
        {"urls": [with_password], "headers": {"X-Token": SECRETS[1]}},
    )
    task_id = root["result"]["task_id"]
    with trio.fail_after(20):
        await arrived[0].wait()
    # nobody: root's task is not theirs to see; their own gets no netrc; past the header
    # limits they are refused, while uid 65533 is served meanwhile.
    too_many = {"urls": [url], "headers": {"A": "1", "B": "2", "C": "3"}}
    too_big = {"urls": [url], "headers": {"A": "x" * 200}}
    seen = await as_user(
        65534,
        ("tasks.list", None),
        ("tasks.get", {"task_id": task_id}),
        ("status.recent", None),
        ("tasks.download", {"urls": [url]}),
        ("tasks.download", too_many),
        ("tasks.download", too_big),
    )
    assert codes(seen) == [0, -32001, 0, 0, BUSY, BUSY]
    assert seen[4]["answer"]["error"]["data"] == {
        "limit": 2,
        "key": "limits.max_item_headers",
        "field": "headers",
    }
    assert seen[5]["answer"]["error"]["data"]["key"] == "limits.max_item_header_bytes"
    assert "an item may have at most 2 request headers" in seen[4]["answer"]["error"]["message"]
    shows_no_secret(json.dumps(seen))
    third = await as_user(THIRD_UID, ("daemon.info", None), ("tasks.list", None))
    assert codes(third) == [0, 0]
    assert max(answer["seconds"] for answer in third) < SERVED_WITHIN
    shows_no_secret(json.dumps(third))
    with trio.fail_after(20):
        await arrived[1].wait()
    root_request, nobody_request = http_server.requests_for("/r.bin")
    assert root_request.headers["authorization"] == basic("u", SECRETS[0])  # the URL's wins
    assert "authorization" not in nobody_request.headers  # root's netrc is not nobody's
    shows_no_secret(process.stderr())
    admin_view = await trio.to_thread.run_sync(root_call, "tasks.get", {"task_id": task_id})
    shows_no_secret(json.dumps(admin_view))
    assert os.stat(short_tmp / "state" / "tasks.jsonl").st_mode & 0o077 == 0


# --- the limits' keys -----------------------------------------------------------------------


def load_limits(tmp_path: Path, toml: str, **environ: str) -> Any:
    from statusd.config import load_config

    path = tmp_path / "statusd.toml"
    path.write_text(toml)
    base = {"HOME": str(tmp_path), "STATUSD_CONFIG": str(path)}
    return load_config({"socket": str(tmp_path / "s.sock")}, base | environ, 1000).limits


def test_header_limits_come_from_the_file_and_the_environment(tmp_path: Path) -> None:
    defaults = load_limits(tmp_path, "")
    assert (defaults.max_item_headers, defaults.max_item_header_bytes) == (32, 16384)
    limits = load_limits(
        tmp_path,
        "[limits]\nmax_item_headers = 4\nmax_item_header_bytes = 100\n",
        STATUSD_LIMITS_MAX_ITEM_HEADER_BYTES="200",
    )
    assert (limits.max_item_headers, limits.max_item_header_bytes) == (4, 200)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "max_item_headers = -1",
            "limits.max_item_headers: must be an integer from 0 to 1000, not -1",
        ),
        ("max_item_headers = 1001", "limits.max_item_headers: must be an integer from 0 to 1000"),
        (
            "max_item_header_bytes = 1048577",
            "limits.max_item_header_bytes: must be an integer from 0 to 1048576, not 1048577",
        ),
        ('max_item_header_bytes = "8k"', "limits.max_item_header_bytes: must be an integer"),
    ],
)
def test_bad_header_limits_are_refused(tmp_path: Path, text: str, expected: str) -> None:
    from statusd.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_limits(tmp_path, f"[limits]\n{text}\n")
    assert str(caught.value).startswith(expected)


async def test_header_limits_in_process_name_the_item(daemon: Daemon, connect: Any) -> None:
    client = await connect()
    items = [
        {"url": "http://127.0.0.1:9/a"},
        {"url": "http://127.0.0.1:9/b", "headers": {f"X-{n}": "v" for n in range(40)}},
    ]
    response = await client.request("tasks.download", {"items": items})
    assert response["error"] == {
        "code": BUSY,
        "message": "items[1].headers: an item may have at most 32 request headers, its own and "
        "the task's together (limits.max_item_headers), not 40",
        "data": {"limit": 32, "key": "limits.max_item_headers", "field": "items[1].headers"},
    }
    assert (await client.call("tasks.list"))["tasks"] == []
