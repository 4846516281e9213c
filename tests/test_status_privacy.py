"""Who reads which status message, and URLs redacted (issue 11, item 1).

Pure tests first: the rule (``StatusMessage.visible_to``), the channel's per-reader history,
``dropped`` and wake-ups, a session's filtered pushes, ``statusd.redact`` and the log
formatter. Then real daemon processes with three users: root (an admin); A, uid 65533 (no
passwd entry, so the daemon names it "65533"), whose download URL carries a secret; and
B, nobody, who reads over the Unix socket, the WebSocket and the seed's progress endpoint.
Those are skipped, saying why, when not run as root.
"""

from __future__ import annotations

import grp
import io
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio
from websockets.sync.client import connect as ws_connect

from statusctl import cli, render
from statusd.channel import StatusChannel, user_share
from statusd.events import Streams
from statusd.identity import Caller
from statusd.logs import setup_logging
from statusd.notifications import task_end_text
from statusd.protocol import jsonrpc
from statusd.redact import HIDDEN, MAX_URL_CHARS, redact_url, redact_urls_in
from statusd.session import Session
from statusd.state.status import (
    MAX_MESSAGE_CHARS,
    Audience,
    Level,
    Reader,
    StatusMessage,
    truncate_message,
)
from statusd.state.tasks import TaskInfo, TaskStatus
from tests.conftest import (
    NOBODY_GID,
    DaemonProcess,
    blocking_call,
    needs_root,
    run_as,
    run_as_nobody,
)
from tests.http_servers import HTTPTestServer, http_server, status

__all__ = ["http_server"]

TIMEOUT = 10.0
A_UID = 65533
A = str(A_UID)  # no passwd entry: the daemon names the uid by its number
B = "nobody"
ALICE, BOB, ROOT = Reader("alice"), Reader("bob"), Reader("root", admin=True)
FORBIDDEN = -32002
NOT_FOUND = -32001


def _now() -> datetime:
    return datetime(2026, 12, 7, 9, 0, tzinfo=UTC)


# -- the rule ----------------------------------------------------------------------------------

VISIBILITY = [
    # audience, publisher, reader, reader is admin, visible
    (Audience.ALL, None, "bob", False, True),  # the daemon's own: everyone
    (Audience.ALL, "root", "bob", False, True),  # an admin's announcement
    (Audience.USER, "alice", "alice", False, True),  # your own
    (Audience.USER, "alice", "bob", False, False),  # someone else's
    (Audience.USER, "alice", "root", True, True),  # admins read everything
    (Audience.USER, None, "bob", False, False),  # for one user but none named: admins only
    (Audience.USER, None, "", False, False),  # ... even for an empty name
    (Audience.USER, None, "root", True, True),
]


@pytest.mark.parametrize(("audience", "user", "reader", "admin", "visible"), VISIBILITY)
def test_who_reads_a_message(
    audience: Audience, user: str | None, reader: str, admin: bool, visible: bool
) -> None:
    message = StatusMessage(1, _now(), Level.INFO, "m", user=user, audience=audience)
    assert message.visible_to(reader, admin) is visible
    assert message.visible_to_reader(Reader(reader, admin)) is visible


# -- the channel -------------------------------------------------------------------------------


def _texts(messages: list[StatusMessage]) -> list[str]:
    return [message.message for message in messages]


def _mixed() -> StatusChannel:
    channel = StatusChannel(100, now=_now)
    channel.publish_status("info", "daemon")
    channel.publish_status("info", "alice 1", user="alice")
    channel.publish_status("info", "bob 1", "op-b", user="bob")
    channel.publish_status("warning", "alice to all", user="alice", audience="all")
    channel.publish_status("error", "alice 2", user="alice", audience=Audience.USER)
    return channel


def test_a_message_says_who_published_it_and_for_whom_on_the_wire() -> None:
    channel = StatusChannel(10, now=_now)
    daemon = channel.publish_status("info", "System ready")
    mine = channel.publish_status("info", "mine", "op", user="alice")
    assert daemon is not None
    assert mine is not None
    assert (daemon.user, daemon.audience) == (None, Audience.ALL)
    assert (mine.user, mine.audience) == ("alice", Audience.USER)
    lines, _ = channel.lines_after(0)
    assert [json.loads(line)["params"] for line in lines] == [
        {
            "seq": 1,
            "timestamp": "2026-12-07T09:00:00.000Z",
            "level": "info",
            "message": "System ready",
            "operation_id": None,
            "user": None,
            "audience": "all",
        },
        {
            "seq": 2,
            "timestamp": "2026-12-07T09:00:00.000Z",
            "level": "info",
            "message": "mine",
            "operation_id": "op",
            "user": "alice",
            "audience": "user",
        },
    ]


def test_each_reader_gets_its_own_and_everyones_in_seq_order() -> None:
    channel = _mixed()
    assert channel.recent(0, ALICE)[1] == 0
    assert _texts(channel.recent(0, ALICE)[0]) == ["daemon", "alice 1", "alice to all", "alice 2"]
    assert _texts(channel.recent(0, BOB)[0]) == ["daemon", "bob 1", "alice to all"]
    everything = ["daemon", "alice 1", "bob 1", "alice to all", "alice 2"]
    assert _texts(channel.recent(0, ROOT)[0]) == everything
    assert _texts(channel.recent(0)[0]) == everything  # None: the daemon itself
    assert _texts(channel.recent(2, ALICE)[0]) == ["alice to all", "alice 2"]
    assert [m.seq for m in channel.recent(0, BOB)[0]] == [1, 3, 4]  # seq stays global
    lines, _ = channel.lines_after(1, BOB)
    assert [json.loads(line)["params"]["message"] for line in lines] == ["bob 1", "alice to all"]
    assert channel.last_seq_for(BOB) == 4
    assert channel.last_seq_for(ALICE) == channel.last_seq_for(ROOT) == 5
    assert channel.last_seq_for(Reader("carol")) == 4


def test_dropped_counts_only_what_the_reader_could_have_read() -> None:
    channel = StatusChannel(3, now=_now)  # a user's share of a full history: 1
    channel.publish_status("info", "d1")  # seq 1, everyone's
    channel.publish_status("info", "a1", user="alice")  # 2
    channel.publish_status("info", "b1", user="bob")  # 3; full
    channel.publish_status("info", "a2", user="alice")  # 4 pushes out alice's own a1
    channel.publish_status("info", "b2", user="bob")  # 5 pushes out b1
    channel.publish_status("info", "b3", user="bob")  # 6 pushes out b2; held: 1, 4, 6
    recent = {
        name: (_texts(messages), dropped)
        for name, (messages, dropped) in [
            ("alice", channel.recent(0, ALICE)),
            ("bob", channel.recent(0, BOB)),
            ("carol", channel.recent(0, Reader("carol"))),
            ("root", channel.recent(0, ROOT)),
        ]
    }
    assert recent == {
        "alice": (["d1", "a2"], 1),  # a1
        "bob": (["d1", "b3"], 2),  # b1, b2
        "carol": (["d1"], 0),
        "root": (["d1", "a2", "b3"], 3),
    }
    # Since a seq: only what came after it, and only what this reader could have read.
    assert channel.recent(2, ALICE)[1] == 0  # b1 is bob's
    assert channel.recent(1, BOB)[1] == 2  # b1, b2
    assert channel.recent(3, BOB)[1] == 1  # b2
    assert _texts(channel.recent(5, BOB)[0]) == ["b3"]
    lines, missed = channel.lines_after(0, BOB)
    assert (len(lines), missed) == (2, 2)


def test_one_users_flood_pushes_out_only_their_own_past_their_share() -> None:
    """The issue's flood (item 10): one user publishing as fast as they may wipes neither
    the daemon's messages nor other users'; past a quarter of the history they push out
    their own oldest."""
    channel = StatusChannel(100, now=_now)
    assert user_share(100) == 25
    channel.publish_status("info", "System ready")
    for n in range(10):
        channel.publish_status("info", f"root {n}", user="root")
        channel.publish_status("info", f"alice {n}", user="alice")
    for n in range(1000):
        channel.publish_status("info", f"flood {n}", user="mallory")
    everything, dropped = channel.recent(0, ROOT)
    texts = _texts(everything)
    assert texts[:21] == ["System ready"] + [
        f"{who} {n}" for n in range(10) for who in ("root", "alice")
    ]
    # The flood filled the rest of the history, then recycled only its own messages.
    assert texts[21:] == [f"flood {n}" for n in range(1000 - 79, 1000)]
    assert dropped == 1000 - 79
    assert channel.recent(0, ALICE) == (channel.recent(0, ALICE)[0], 0)
    assert _texts(channel.recent(0, ALICE)[0]) == ["System ready"] + [
        f"alice {n}" for n in range(10)
    ]
    assert channel.statistics().ring.size == 100
    # The flood holds more than its share (it began while the history had room): the next
    # message of someone else's takes the room from it, not from the oldest.
    channel.publish_status("info", "root late", user="root")
    texts = _texts(channel.recent(0, ROOT)[0])
    assert texts[:21] == ["System ready"] + [
        f"{who} {n}" for n in range(10) for who in ("root", "alice")
    ]
    assert texts[21] == f"flood {1000 - 78}"
    assert texts[-1] == "root late"


def test_a_lone_user_keeps_the_whole_history() -> None:
    channel = StatusChannel(100, now=_now)
    for n in range(250):
        channel.publish_status("info", f"mine {n}", user="alice")
    messages, dropped = channel.recent(0, ALICE)
    assert _texts(messages) == [f"mine {n}" for n in range(150, 250)]
    assert dropped == 150


def test_far_behind_the_dropped_count_is_capped_by_the_gap() -> None:
    channel = StatusChannel(2, now=_now)
    for n in range(6):
        channel.publish_status("info", f"a{n}", user="alice")  # seqs 1-6; 5 and 6 held
    # The seqs of alice's dropped messages are kept for as many as the ring holds (3, 4);
    # before those only their number, so from seq 1 the count is bounded by the gap.
    assert channel.recent(1, ALICE)[1] == 3
    assert channel.recent(0, ALICE)[1] == 4
    assert channel.recent(3, ALICE)[1] == 1


def test_a_seq_from_an_earlier_daemon_reads_from_the_start() -> None:
    channel = _mixed()
    assert _texts(channel.recent(99, BOB)[0]) == ["daemon", "bob 1", "alice to all"]


def test_watchers_wake_only_for_what_they_may_read() -> None:
    channel = StatusChannel(10, now=_now)
    woken: list[str] = []
    for name, reader in [("alice", ALICE), ("bob", BOB), ("root", ROOT)]:
        channel.watch(lambda name=name: woken.append(name), reader)  # type: ignore[misc]
    assert channel.statistics().watchers == 3
    channel.publish_status("info", "bob's", user="bob")
    assert sorted(woken) == ["bob", "root"]
    assert channel.statistics().watchers == 1  # one-shot; alice still waits
    woken.clear()
    channel.publish_status("info", "for all")
    assert woken == ["alice"]
    assert channel.statistics().watchers == 0


def test_unwatch_forgets_a_users_watcher() -> None:
    channel = StatusChannel(10, now=_now)
    woken: list[str] = []

    def wake() -> None:
        woken.append("alice")

    channel.watch(wake, ALICE)
    channel.unwatch(wake, ALICE)
    channel.unwatch(wake, ALICE)  # twice is harmless
    channel.publish_status("info", "for all")
    assert woken == []
    assert channel.statistics().watchers == 0


def test_a_session_is_sent_only_what_its_user_may_read() -> None:
    """Both transports send what ``Session.take_pending`` gives them, seed endpoints too."""
    channel = StatusChannel(3, user_share_percent=100, now=_now)  # plain drop-oldest
    streams = Streams(channel)
    bob = Session(Caller(1001, "bob", admin=False), streams)
    channel.publish_status("info", "d1")
    channel.publish_status("info", "b1", user="bob")
    bob.subscribe(status=True, since=0)
    for n in range(3):
        channel.publish_status("info", f"a{n}", user="alice")  # d1 and b1 fall off
    pending = [json.loads(line) for line in bob.take_pending()]
    assert pending == [
        {"jsonrpc": "2.0", "method": "dropped", "params": {"stream": "status", "count": 2}}
    ]
    channel.publish_status("info", "alice again", user="alice")
    assert not bob.has_pending()  # nothing bob may read, so nothing wakes or is sent
    channel.publish_status("info", "b2", user="bob")
    assert bob.has_pending()
    pending = [json.loads(line) for line in bob.take_pending()]
    assert [push["params"]["message"] for push in pending] == ["b2"]


# -- redaction ---------------------------------------------------------------------------------

REDACTED_URLS = [
    ("http://host/report-q3.pdf?signature=SECRET", f"http://host/report-q3.pdf?{HIDDEN}"),
    ("https://user:SECRET@host:8443/a/b", "https://host:8443/a/b"),
    ("https://SECRET@host/", "https://host/"),
    ("http://host/p#access_token=SECRET", f"http://host/p#{HIDDEN}"),
    ("http://u:SECRET@host/p?q=SECRET#SECRET", f"http://host/p?{HIDDEN}#{HIDDEN}"),
    ("http://[::1]:8080/x?k=SECRET", f"http://[::1]:8080/x?{HIDDEN}"),
    ("http://u:SECRET@[2001:db8::1]/x", "http://[2001:db8::1]/x"),
    ("http://[::1/x?k=SECRET", f"http://{HIDDEN}"),  # a host that does not parse
    ("ftp://u:SECRET@files.example/pub", "ftp://files.example/pub"),
    ("HTTP://Host/A?x=SECRET", f"HTTP://Host/A?{HIDDEN}"),
    ("http://host/a@b/c", "http://host/a@b/c"),  # an @ in the path is no userinfo
    ("http://host/p?", "http://host/p"),
    ("http://host", "http://host"),
    ("https://example.org/plain/path.iso", "https://example.org/plain/path.iso"),
    ("not a url", "not a url"),
]


@pytest.mark.parametrize(("url", "redacted"), REDACTED_URLS)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted
    assert len(redacted) <= len(url)
    assert redact_url(redacted) == redacted  # redacting twice changes nothing


UNTOUCHED = [
    "System ready",
    "Processed 3 of 10",
    "user:password@host is not a URL without a scheme",
    "mailto:someone@example.org",
    "ratio 3:1, path /srv/x?y=1",
    "",
]


@pytest.mark.parametrize("text", UNTOUCHED)
def test_text_without_urls_is_untouched(text: str) -> None:
    assert redact_urls_in(text, limit=MAX_MESSAGE_CHARS) == text


def test_every_url_in_a_text_is_redacted_and_the_words_around_stay() -> None:
    text = (
        "Failed to download file: http://h/report-q3.pdf?signature=SECRET: HTTP 403 "
        "(mirror https://u:SECRET@m.example:8080/r#SECRET)"
    )
    assert redact_urls_in(text, limit=MAX_MESSAGE_CHARS) == (
        f"Failed to download file: http://h/report-q3.pdf?{HIDDEN}: HTTP 403 "
        f"(mirror https://m.example:8080/r#{HIDDEN})"
    )


def test_a_long_query_is_redacted_before_the_cut_so_the_words_after_it_stay() -> None:
    text = f"Failed: http://h/f.iso?sig={'S' * 500} : HTTP 403"
    assert (
        redact_urls_in(text, limit=MAX_MESSAGE_CHARS)
        == f"Failed: http://h/f.iso?{HIDDEN} : HTTP 403"
    )


def test_a_long_text_is_cut_like_any_status_message() -> None:
    text = "word " * 100
    assert redact_urls_in(text, limit=MAX_MESSAGE_CHARS) == truncate_message(text)
    assert len(redact_urls_in("a" * 1_000_000, limit=MAX_MESSAGE_CHARS)) == MAX_MESSAGE_CHARS


def test_a_url_cut_at_the_end_of_what_is_read_keeps_no_part_of_its_secret() -> None:
    # Cut inside the password: without its "@" it would pass for a host and a port.
    text = "see http://user:" + "S" * (MAX_URL_CHARS + 500) + "@host/"
    assert redact_urls_in(text, limit=MAX_MESSAGE_CHARS) == f"see http://{HIDDEN}"
    # Cut inside the path: the host is whole, the path is cut like any text.
    text = "see http://u:SECRET@host/" + "p" * (MAX_URL_CHARS + 500) + "?q=SECRET"
    redacted = redact_urls_in(text, limit=MAX_MESSAGE_CHARS)
    assert redacted.startswith("see http://host/ppp")
    assert "SECRET" not in redacted
    assert len(redacted) == MAX_MESSAGE_CHARS


def test_long_runs_of_letters_and_schemes() -> None:
    # A scheme longer than 32 letters is matched by its last 32: the secret still goes.
    text = "x" * 50 + "://u:SECRET@host/p"
    assert redact_urls_in(text, limit=1000) == "x" * 50 + "://host/p"
    # A megabyte of letters and colons without "://": read once, returned cut.
    assert redact_urls_in("ab:" * 400_000, limit=10) == "ab:ab:a..."


def test_the_limit_must_leave_room_for_the_cut() -> None:
    with pytest.raises(ValueError, match=r"^limit must be >= 4, not 3$"):
        redact_urls_in("text", limit=3)


def test_the_channel_redacts_every_message_it_is_given() -> None:
    channel = StatusChannel(10, now=_now)
    message = channel.publish_status("info", "fetch https://u:SECRET@h/x?token=SECRET", user="bob")
    assert message is not None
    assert message.message == f"fetch https://h/x?{HIDDEN}"
    lines, _ = channel.lines_after(0)
    assert b"SECRET" not in b"".join(lines)


def test_task_end_notices_show_urls_redacted() -> None:
    """An admin may read any inbox; the task keeps its URLs for its owner."""
    task = TaskInfo(
        id="t1",
        name="https://u:SECRET@h/report-q3.pdf?signature=SECRET",
        kind="download",
        owner="alice",
        status=TaskStatus.FAILED,
        created_at=_now(),
        total_items=1,
        error="internal error: GET http://h/x?token=SECRET failed",
    )
    assert task_end_text(task, TaskStatus.FAILED) == (
        "task_failed",
        f"Task failed: https://h/report-q3.pdf?{HIDDEN}",
        f"Failed: internal error: GET http://h/x?{HIDDEN} failed.",
    )


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield root
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.parametrize("journal", [False, True])
def test_log_lines_show_urls_redacted(
    journal: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    root_logger: logging.Logger,
) -> None:
    with (tmp_path / "stderr").open("w") as stream:
        if journal:
            info = os.fstat(stream.fileno())
            monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        else:
            monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        setup_logging("info", stream)
        log = logging.getLogger("statusd.test")
        log.warning("fetching %s", "http://u:SECRET@h/report-q3.pdf?signature=SECRET")
        try:
            raise OSError("cannot reach https://h/x#SECRET")
        except OSError:
            log.exception("download failed")
    text = (tmp_path / "stderr").read_text()
    assert "SECRET" not in text
    assert f"fetching http://h/report-q3.pdf?{HIDDEN}" in text
    assert f"OSError: cannot reach https://h/x#{HIDDEN}" in text


# -- statusctl ---------------------------------------------------------------------------------


def test_statusctl_names_the_publisher_when_it_is_someone_else() -> None:
    message = {"seq": 7, "timestamp": "t", "level": "info", "message": "hi", "user": "alice"}
    assert render.format_status(message, "root") == "t  #7 info     hi  (from alice)"
    assert render.format_status(message, "alice") == "t  #7 info     hi"
    daemon = {**message, "user": None, "operation_id": "op"}
    assert render.format_status(daemon, "root") == "t  #7 info     hi  [op]"
    hostile = {**message, "user": "\x1b[2Jevil"}
    assert render.format_status(hostile, "root") == "t  #7 info     hi  (from \\x1b[2Jevil)"


# -- a real daemon with three users ------------------------------------------------------------


def _require_root() -> None:
    if os.getuid() != 0:
        pytest.skip(f"per-user rules need a second uid: running as uid {os.getuid()}, not root")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _start(daemon_process: Any, short_tmp: Path, *lines: str) -> DaemonProcess:
    config = short_tmp / "statusd.toml"
    group = grp.getgrgid(NOBODY_GID).gr_name
    config.write_text("\n".join([f'socket_group = "{group}"', *lines]) + "\n")
    process: DaemonProcess = daemon_process()
    process.start("--config", str(config), "--log-level", "debug")
    return process


class LineClient:
    """A blocking JSON-RPC client (for forked children and threads); pushes that arrive
    before an answer are kept in ``pushes``."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(path))
        self.reader = self.sock.makefile("rb")
        self.pushes: list[Any] = []
        self._ids = 0

    def request(self, method: str, params: dict[str, Any] | None = None) -> Any:
        self._ids += 1
        self.sock.sendall(jsonrpc.encode_line(jsonrpc.request(method, params, self._ids)))
        while True:
            value = json.loads(self.reader.readline())
            if value.get("id") == self._ids:
                return value
            self.pushes.append(value)

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        answer = self.request(method, params)
        assert "result" in answer, answer
        return answer["result"]

    def pushes_until(self, done: Callable[[Any], bool]) -> list[Any]:
        """Every push read so far and more, up to the first one that is ``done``."""
        while not any(done(push) for push in self.pushes):
            self.pushes.append(json.loads(self.reader.readline()))
        return self.pushes

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def _status_text(text: str) -> Callable[[Any], bool]:
    return lambda push: push.get("method") == "status" and push["params"]["message"] == text


def _messages(pushes: list[Any]) -> list[dict[str, Any]]:
    return [push["params"] for push in pushes if push.get("method") == "status"]


async def _in_thread(function: Callable[[], Any]) -> Any:
    with trio.fail_after(60):
        return await trio.to_thread.run_sync(function)


@needs_root
async def test_b_reads_none_of_as_task_messages_nor_its_url_secret_anywhere(
    daemon_process: Any, short_tmp: Path, http_server: HTTPTestServer
) -> None:
    _require_root()
    http_server.route("/report-q3.pdf", status(403))
    http_server.route("/b.iso", status(404))
    secret_url = http_server.url("/report-q3.pdf") + "?signature=SECRET#SECRET"
    listen = f'listen = "127.0.0.1:{_free_port()}"'
    process = await _in_thread(lambda: _start(daemon_process, short_tmp, "[websocket]", listen))
    admin = LineClient(process.socket)
    try:
        ws_address = admin.call("daemon.info")["websocket"]
        token = admin.call("tokens.create", {"username": B})["token"]
        admin.call("subscribe", {"status": True, "tasks": "all"})
        seen = await _watch_while_a_downloads(
            process, admin, ws_address, token, (secret_url, http_server.url("/b.iso"))
        )
        end = admin.pushes_until(_status_text("the end"))
    finally:
        admin.close()
    task_a, task_b = seen["task_a"], seen["task_b"]

    # B, live on the Unix socket and on the WebSocket: its own, the admin's for all.
    for transport in ("unix", "ws"):
        pushed = json.dumps(seen[transport])
        assert task_a not in pushed
        assert "SECRET" not in pushed
        assert "report-q3" not in pushed
        # B's own task's messages are B's.
        own = [m for m in _messages(seen[transport]) if m["operation_id"] == task_b]
        assert {m["user"] for m in own} == {B}
        failed = f"Failed to download file: {http_server.url('/b.iso')}: http 404 not found"
        assert [m["message"] for m in own if m["level"] == "error"] == [failed]
    others = {
        transport: [
            (m["message"], m["user"])
            for m in _messages(seen[transport])
            if m["operation_id"] != task_b
        ]
        for transport in ("unix", "ws")
    }
    assert others == {
        "unix": [("B here (unix)", B), ("B here (ws)", B), ("the end", "root")],
        "ws": [("B here (ws)", B), ("the end", "root")],
    }
    # The seed's progress endpoint, same topic: B's task's updates, none of A's.
    updates = [m for m in seen["seed"] if m.get("type") == "job_update"]
    assert {m["job_id"] for m in updates} == {task_b}

    # The admin read A's messages live, with the URL redacted, and who published each.
    failure = [m for m in _messages(end) if m["operation_id"] == task_a and m["level"] == "error"]
    redacted = http_server.url("/report-q3.pdf") + f"?{HIDDEN}#{HIDDEN}"
    assert [m["message"] for m in failure] == [
        f"Failed to download file: {redacted}: http 403 forbidden"
    ]
    assert failure[0]["user"] == A
    assert failure[0]["audience"] == "user"

    def as_b() -> dict[str, Any]:
        b = LineClient(process.socket)
        try:
            return {
                "recent": b.call("status.recent"),
                "task": b.request("tasks.get", {"task_id": task_a}),
                "to all": b.request(
                    "status.publish", {"level": "info", "message": "x", "audience": "all"}
                ),
            }
        finally:
            b.close()

    def as_a() -> dict[str, Any]:
        a = LineClient(process.socket)
        try:
            return {
                "recent": a.call("status.recent"),
                "task": a.call("tasks.get", {"task_id": task_a}),
            }
        finally:
            a.close()

    b_view, a_view = run_as_nobody(as_b), run_as(A_UID, NOBODY_GID, as_a)
    b_recent = b_view["recent"]
    assert b_recent["dropped"] == 0
    assert task_a not in json.dumps(b_recent)
    assert "SECRET" not in json.dumps(b_recent)
    assert [m["message"] for m in b_recent["messages"] if m["user"] is None][-1] == "System ready"
    assert {m["user"] for m in b_recent["messages"]} <= {None, B, "root"}
    assert not [m for m in b_recent["messages"] if m["operation_id"] == task_a]
    assert b_view["task"]["error"]["code"] == NOT_FOUND
    assert b_view["to all"]["error"] == {
        "code": FORBIDDEN,
        "message": "audience: only an admin may publish to all users; "
        "a message of yours reaches you and the admins",
        "data": {"field": "audience"},
    }
    # A reads its own task's messages (redacted) and none of B's; its tasks.get keeps the URL.
    a_messages = a_view["recent"]["messages"]
    assert [m["message"] for m in a_messages if m["level"] == "error"] == [
        f"Failed to download file: {redacted}: http 403 forbidden"
    ]
    assert {m["user"] for m in a_messages} <= {None, A, "root"}
    assert "SECRET" not in json.dumps(a_view["recent"])
    assert a_view["task"]["result"]["items"][0]["url"] == secret_url

    # The log saw the redacted message (debug level) and never the secret.
    process.stop()
    log = process.stderr()
    assert f"report-q3.pdf?{HIDDEN}" in log
    assert "SECRET" not in log


async def _watch_while_a_downloads(
    process: DaemonProcess,
    admin: LineClient,
    ws_address: str,
    token: str,
    urls: tuple[str, str],
) -> dict[str, Any]:
    """B watches on three connections while A's download with a secret fails and B's own
    fails too, both in one topic; returns what each connection got, and both task ids."""
    seen: dict[str, Any] = {}
    headers = {"Authorization": f"Bearer {token}"}
    seed_ready, the_end = threading.Event(), threading.Event()

    def b_unix() -> list[Any]:
        b = LineClient(process.socket)
        b.call("subscribe", {"status": True})
        b.call("status.publish", {"level": "info", "message": "B here (unix)"})
        return b.pushes_until(_status_text("the end"))

    def b_ws() -> list[Any]:
        with ws_connect(f"ws://{ws_address}/ws", additional_headers=headers) as ws:
            pushes: list[Any] = []
            calls: list[tuple[str, dict[str, Any]]] = [
                ("subscribe", {"status": True}),
                ("status.publish", {"level": "info", "message": "B here (ws)"}),
            ]
            for n, (method, params) in enumerate(calls):
                ws.send(json.dumps(jsonrpc.request(method, params, n)))
                while (value := json.loads(ws.recv(TIMEOUT))).get("id") != n:
                    pushes.append(value)
                assert "result" in value, value
            while not any(_status_text("the end")(push) for push in pushes):
                pushes.append(json.loads(ws.recv(TIMEOUT)))
            return pushes

    def b_seed() -> list[Any]:
        with ws_connect(f"ws://{ws_address}/ws/progress/reports", additional_headers=headers) as ws:
            messages = [json.loads(ws.recv(TIMEOUT))]
            seed_ready.set()
            assert the_end.wait(TIMEOUT)
            # Two pings: the second pong comes after everything queued before the first.
            for _ in range(2):
                ws.send(json.dumps({"type": "ping"}))
                while (message := json.loads(ws.recv(TIMEOUT)))["type"] != "pong":
                    messages.append(message)
            return messages

    async def keep(name: str, function: Callable[[], Any]) -> None:
        seen[name] = await _in_thread(function)

    def download(urls: list[str]) -> str:
        client = LineClient(process.socket)
        try:
            return str(client.call("tasks.download", {"urls": urls, "topic": "reports"})["task_id"])
        finally:
            client.close()

    def task_ended(task_id: str) -> Callable[[Any], bool]:
        return lambda push: (
            push.get("method") == "task_update"
            and (push["params"]["job_id"] == task_id and push["params"]["status"] == "error")
        )

    async with trio.open_nursery() as nursery:
        # One after the other, so each knows what the one before it published.
        nursery.start_soon(keep, "unix", lambda: run_as_nobody(b_unix))
        await _in_thread(lambda: admin.pushes_until(_status_text("B here (unix)")))
        nursery.start_soon(keep, "ws", b_ws)
        await _in_thread(lambda: admin.pushes_until(_status_text("B here (ws)")))
        nursery.start_soon(keep, "seed", b_seed)
        assert await _in_thread(lambda: seed_ready.wait(TIMEOUT))
        seen["task_a"] = await _in_thread(
            lambda: run_as(A_UID, NOBODY_GID, lambda: download([urls[0]]))
        )
        seen["task_b"] = await _in_thread(lambda: run_as_nobody(lambda: download([urls[1]])))
        await _in_thread(lambda: admin.pushes_until(task_ended(seen["task_a"])))
        await _in_thread(lambda: admin.pushes_until(task_ended(seen["task_b"])))
        admin.call("status.publish", {"level": "info", "message": "the end", "audience": "all"})
        the_end.set()
    return seen


def test_dropped_and_since_per_reader_on_a_small_ring(daemon_process: Any, short_tmp: Path) -> None:
    _require_root()
    # Plain drop-oldest (a user may hold all of it): this is about the counts, not shares.
    process = _start(
        daemon_process, short_tmp, "status_history = 6", "[limits]", "status_user_share = 100"
    )
    admin = LineClient(process.socket)
    try:
        start = admin.call("daemon.info")["status_seq"]  # the daemon's own, for everyone

        def b_publishes() -> list[int]:
            b = LineClient(process.socket)
            try:
                return [
                    b.call("status.publish", {"level": "info", "message": f"b{n}"})["seq"]
                    for n in range(2)
                ]
            finally:
                b.close()

        b1, b2 = run_as_nobody(b_publishes)
        for n in range(6):  # the admin's own: for admins only; B's and the daemon's fall off
            admin.call("status.publish", {"level": "info", "message": f"r{n}"})

        def recent(since: int) -> Callable[[], Any]:
            return lambda: blocking_call(process.socket, "status.recent", {"since": since})

        def b_reads() -> dict[str, Any]:
            return {str(since): recent(since)()["result"] for since in (0, start, b1, b2)}

        b_view = run_as_nobody(b_reads)
        a_view = run_as(A_UID, NOBODY_GID, recent(0))["result"]
        everything = admin.call("status.recent")
        assert {since: (view["messages"], view["dropped"]) for since, view in b_view.items()} == {
            "0": ([], start + 2),
            str(start): ([], 2),
            str(b1): ([], 1),
            str(b2): ([], 0),
        }
        assert (a_view["messages"], a_view["dropped"]) == ([], start)
        assert [m["message"] for m in everything["messages"]] == [f"r{n}" for n in range(6)]
        assert everything["dropped"] == start + 2

        # A subscription from the start: the same count as one dropped notice, then what
        # B may read as it comes; the admin's private messages never reach it.
        def b_subscribes() -> list[Any]:
            b = LineClient(process.socket)
            try:
                b.call("subscribe", {"status": True, "since": 0})
                blocking_call(
                    process.socket, "status.publish", {"level": "info", "message": "mine"}
                )
                return b.pushes_until(_status_text("mine"))
            finally:
                b.close()

        admin.call("status.publish", {"level": "info", "message": "r7"})
        pushes = run_as_nobody(b_subscribes)
        assert pushes[0] == {
            "jsonrpc": "2.0",
            "method": "dropped",
            "params": {"stream": "status", "count": start + 2},
        }
        assert [(m["message"], m["user"]) for m in _messages(pushes[1:])] == [("mine", B)]
    finally:
        admin.close()


def test_statusctl_shows_the_publisher_and_publishes_to_all(
    daemon_process: Any, short_tmp: Path
) -> None:
    _require_root()
    process = _start(daemon_process, short_tmp)
    socket_arg = ["--socket", str(process.socket)]

    def statusctl(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = cli.main([*socket_arg, *argv], stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    def b_publishes() -> Any:
        return [
            statusctl("publish", "warning", "from B"),
            statusctl("publish", "--all", "info", "x"),
        ]

    (code, _, _), (refused, _, complaint) = run_as_nobody(b_publishes)
    assert code == 0
    assert refused == 4
    assert "only an admin may publish to all users" in complaint
    assert statusctl("publish", "--all", "info", "maintenance at 10:00")[0] == 0
    code, out, _ = statusctl("status")
    lines = out.splitlines()
    assert next(line for line in lines if "from B" in line).endswith("from B  (from nobody)")
    assert next(line for line in lines if "maintenance" in line).endswith("maintenance at 10:00")

    def b_reads() -> Any:
        return statusctl("status")

    code, out, _ = run_as_nobody(b_reads)
    assert code == 0
    assert "maintenance at 10:00  (from root)" in out
    assert "from B" in out
    assert "(from nobody)" not in out
