"""Random and adversarial input through the real Unix socket of a running daemon.

After every example a second client, connected afresh, must get a correct ``daemon.info``,
and the fuzzing connection must have got a JSON-RPC answer to a request sent after the
junk (or have been closed with an error saying why): never silence, never a dead daemon.
The inputs: random JSON values, envelopes with the daemon's real method names and random
params, lone surrogates, numbers JSON cannot round-trip, deep nesting, bad UTF-8, NUL
bytes, empty lines and batches of junk. Bounded and derandomized, so CI sees the same run.

Random methods run for real, so what could reach the network or the file system is
tamed: ``tasks.download`` only gets URLs on a closed loopback port and never a ``dest``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statusd.daemon import Daemon
from tests.conftest import DaemonProcess, blocking_call
from tests.websocket_clients import make_token, open_ws, values, ws_daemon

__all__ = ["ws_daemon"]

TIMEOUT = 10.0
INTERNAL_ERROR = -32603
SENTINEL_ID = "fuzz-sentinel"
SENTINEL = (
    json.dumps({"jsonrpc": "2.0", "id": SENTINEL_ID, "method": "daemon.info"}).encode() + b"\n"
)
# Port 1 on loopback: nothing listens, so a download fails at once and stays local.
SAFE_URLS = ["http://127.0.0.1:1/a.bin", "http://127.0.0.1:1/\udcff", "ftp://127.0.0.1/", ""]
PARAM_NAMES = [
    "task_id",
    "status",
    "since",
    "level",
    "message",
    "operation_id",
    "name",
    "topic",
    "batch_size",
    "max_age_hours",
    "subscription",
    "id",
    "username",
    "type",
    "title",
    "link",
    "scope",
    "token_id",
    "unread_only",
    "limit",
    "tasks",
    "notifications",
    "rate_limit",
]

FUZZ_SETTINGS = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- what is sent ------------------------------------------------------------------------------

_text = st.text(
    st.one_of(st.characters(), st.characters(categories=["Cs"]), st.sampled_from('\x00\n"\\')),
    max_size=12,
)
_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**300, max_value=10**301),
    st.floats(allow_nan=False, allow_infinity=False),
    _text,
)
json_values = st.recursive(
    _leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=16,
)


def _download_params() -> st.SearchStrategy[dict[str, Any]]:
    urls = st.lists(st.sampled_from(SAFE_URLS), max_size=3)
    items = st.lists(
        st.fixed_dictionaries({"url": st.sampled_from(SAFE_URLS)}, optional={"filename": _text}),
        max_size=3,
    )
    return st.fixed_dictionaries(
        {},
        optional={
            "urls": urls,
            "items": items,
            "name": _text,
            "topic": _text,
            "batch_size": st.integers(),
            "rate_limit": json_values,
            "headers": st.dictionaries(_text, _text, max_size=2),
        },
    )


def envelopes(method_names: list[str]) -> st.SearchStrategy[Any]:
    def with_params(method: Any) -> st.SearchStrategy[Any]:
        if method == "tasks.download":
            params: st.SearchStrategy[Any] = _download_params()
        else:
            params = st.one_of(
                st.dictionaries(st.sampled_from(PARAM_NAMES) | _text, json_values, max_size=4),
                json_values,
            )
        return st.fixed_dictionaries(
            {"method": st.just(method)},
            optional={
                "jsonrpc": st.just("2.0") | json_values,
                "id": st.integers() | _text | st.none() | json_values,
                "params": params,
                "extra": json_values,
            },
        )

    methods = st.sampled_from(method_names) | _text | json_values
    # Mostly well-formed, so the random params reach the methods' own checks.
    complete = st.sampled_from(method_names).flatmap(
        lambda method: st.tuples(with_params(method), st.integers(-5, 10**6)).map(
            lambda pair: {**pair[0], "jsonrpc": "2.0", "id": pair[1]}
        )
    )
    return complete | methods.flatmap(with_params)


def _dump(value: Any) -> bytes:
    # ensure_ascii writes a lone surrogate as its \udXXX escape, as an attacker would.
    return json.dumps(value).encode()


def payloads(method_names: list[str]) -> st.SearchStrategy[bytes]:
    one = envelopes(method_names)
    return st.one_of(
        json_values.map(_dump),
        one.map(_dump),
        one.map(_dump),
        st.lists(one | json_values, min_size=1, max_size=6).map(_dump),
        st.sampled_from(ADVERSARIAL),
        st.binary(max_size=64),
        st.lists(st.sampled_from(ADVERSARIAL) | one.map(_dump), min_size=2, max_size=4).map(
            b"\n".join
        ),
    )


def _request(params: str, method: str = "status.recent") -> bytes:
    return f'{{"jsonrpc":"2.0","id":1,"method":"{method}","params":{params}}}'.encode()


DEEP = 100_000
ADVERSARIAL: list[bytes] = [
    b'{"jsonrpc":"2.0","id":"\\ud800","method":"daemon.info"}',
    b'{"jsonrpc":"2.0","id":1,"method":"\\udfff"}',
    b'{"jsonrpc":"2.0","id":1,"method":"tasks.get","params":{"\\ud800":1}}',
    b'{"jsonrpc":"2.0","id":1,"method":"tasks.cancel","params":{"task_id":"\\ud800"}}',
    b'{"jsonrpc":"2.0","id":1,"method":"status.publish",'
    b'"params":{"level":"info","message":"\\ud83d\\ude00\\ud83d"}}',
    b"1e999",
    b"-1e999",
    b"-0",
    b"-0.0",
    _request('{"since":1e999}'),
    _request('{"since":-0}'),
    _request('{"since":' + "9" * 10_000 + "}"),
    _request('{"since":' + "9" * 4_000 + "}"),
    _request('{"limit":' + "9" * 4_000 + "}", "notifications.list"),
    _request('{"max_age_hours":' + "9" * 400 + "}", "tasks.cleanup"),
    _request('{"max_age_hours":1e308}', "tasks.cleanup"),
    _request('{"task_id":"x","rate_limit":' + "9" * 400 + "}", "tasks.set_rate"),
    b'{"jsonrpc":"2.0","id":' + b"9" * 4_000 + b',"method":"daemon.info"}',
    b'{"jsonrpc":"2.0","id":1e400,"method":"daemon.info"}',
    b'{"jsonrpc":"2.0","id":1.5,"method":"daemon.info"}',
    b"NaN",
    b"[Infinity, -Infinity]",
    _request('{"since":NaN}'),
    b"[" * DEEP + b"]" * DEEP,
    b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    _request("[" * 900 + "]" * 900),
    _request('{"message":' + "[" * 900 + "]" * 900 + ',"level":"info"}', "status.publish"),
    _request('{"tasks":' + "[" * 900 + "]" * 900 + "}", "subscribe"),
    b"\xff\xfe\xfd",
    b"\xc0\x80",
    b"\xed\xa0\x80",  # a surrogate encoded as UTF-8 bytes: strict decoding refuses it
    b'{"jsonrpc":"2.0","id":1,"method":"daemon.info\xff"}',
    b"\xef\xbb\xbf" + b'{"jsonrpc":"2.0","id":1,"method":"daemon.info"}',
    b"\x00",
    b'{"jsonrpc":"2.0","id":1,"method":"daemon.info\x00"}',
    b'{"jsonrpc":"2.0","id":1,"method":"daemon.info\\u0000"}',
    b"",
    b"\n\n\n",
    b"\r\n\r\n",
    b" \t ",
    b"[]",
    b"[[]]",
    b"{}",
    b'[{}, 1, "x", null, [], true]',
    b"[" + b",".join([b"1"] * 5_000) + b"]",
    b"[" + b",".join([b'{"jsonrpc":"2.0","method":"daemon.info"}'] * 2_000) + b"]",
    b'"' + b"a" * 900_000 + b'"',
    b'{"jsonrpc":"2.0","id":1,"method":"daemon.info","params":null}',
    b'{"jsonrpc":"2.0","id":1,"method":"daemon.info","params":[]}',
    b'{"jsonrpc":"2.0","id":1,"method":"daemon.info","id":2}',
    b'{"jsonrpc":"2.0","id":{},"method":"daemon.info"}',
]

# -- how it is checked ---------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} in a reply")


def _strict_json(line: bytes) -> Any:
    """A reply must be UTF-8 JSON without NaN or Infinity, as any client parses it."""
    return json.loads(line.decode("utf-8"), parse_constant=_reject_constant)


def _is_jsonrpc(message: Any) -> bool:
    if isinstance(message, list):
        return bool(message) and all(_is_jsonrpc(entry) for entry in message)
    return isinstance(message, dict) and message.get("jsonrpc") == "2.0"


def exchange(path: Path, payload: bytes) -> None:
    """Send ``payload`` and then a request of our own on one connection; the daemon must
    answer ours, or close the connection after an error that says why."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(str(path))
        data = payload if payload.endswith(b"\n") else payload + b"\n"
        # If it closed on us, what it said before is still to be read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data + SENTINEL)
        received = b""
        messages: list[Any] = []
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except ConnectionResetError:
                chunk = b""
            except TimeoutError:
                raise AssertionError(f"no answer within {TIMEOUT} s to {payload[:80]!r}") from None
            if not chunk:
                break
            received += chunk
            *lines, received = received.split(b"\n")
            for line in lines:
                message = _strict_json(line)
                assert _is_jsonrpc(message), message
                # -32603 is a bug met on the way (logged by the daemon), not an answer.
                assert INTERNAL_ERROR not in _codes(message), (payload[:200], message)
                messages.append(message)
                if isinstance(message, dict) and message.get("id") == SENTINEL_ID:
                    assert "result" in message, message
                    return
        assert any("error" in m for m in messages if isinstance(m, dict)), (
            f"closed without a reason after {payload[:80]!r}"
        )


def _codes(message: Any) -> set[int]:
    entries = message if isinstance(message, list) else [message]
    return {entry["error"]["code"] for entry in entries if "error" in entry}


def assert_healthy(path: Path) -> None:
    answer = blocking_call(path, "daemon.info")
    assert answer["result"]["pid"] > 0, answer


def fuzz(path: Path, method_names: list[str]) -> None:
    @FUZZ_SETTINGS
    @given(payloads(method_names))
    def run(payload: bytes) -> None:
        exchange(path, payload)
        assert_healthy(path)

    run()


async def in_thread(function: Callable[..., Any], *args: Any) -> None:
    with trio.fail_after(300):
        await trio.to_thread.run_sync(function, *args)


# -- the tests ---------------------------------------------------------------------------------


async def test_fuzz_the_socket_of_a_daemon_in_process(daemon: Daemon) -> None:
    # The daemon runs in this test's trio loop: anything that escapes it fails the test
    # with its own traceback.
    await in_thread(fuzz, daemon.config.socket, daemon.api.method_names)


@pytest.mark.parametrize("payload", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
async def test_adversarial_input(daemon: Daemon, payload: bytes) -> None:
    await in_thread(exchange, daemon.config.socket, payload)
    await in_thread(assert_healthy, daemon.config.socket)


async def test_fuzz_a_real_daemon_process(daemon: Daemon) -> None:
    # The in-process daemon only lends its method names; the process has its own
    # directory, so the two never share a state directory.
    directory = Path(tempfile.mkdtemp(prefix="sd-", dir="/tmp"))
    process = DaemonProcess(directory, directory / "statusd.sock")
    try:
        await in_thread(process.start)
        await in_thread(fuzz, process.socket, daemon.api.method_names)
        assert process.process is not None
        assert process.process.poll() is None, process.stderr()
    finally:
        process.stop()
        shutil.rmtree(directory, ignore_errors=True)


# -- what the fuzzing found, kept as explicit cases ----------------------------------------------


async def test_huge_max_age_is_invalid_params_not_an_internal_error(connect: Any) -> None:
    client = await connect()
    for value in (1e308, 10**400, 2_000_000):
        response = await client.request("tasks.cleanup", {"max_age_hours": value})
        assert response["error"]["code"] == -32602, response
        assert response["error"]["data"]["field"] == "max_age_hours"
    assert (await client.call("tasks.cleanup", {"max_age_hours": 1_000_000}))["removed"] == 0


async def test_integers_past_64_bits_are_refused_with_a_short_message(connect: Any) -> None:
    client = await connect()
    response = await client.request("notifications.list", {"limit": 10**4000})
    error = response["error"]
    assert error["code"] == -32602
    assert error["data"]["field"] == "limit"
    assert "64 bits" in error["message"]
    assert len(error["message"]) < 120


# -- the WebSocket ---------------------------------------------------------------------------------


def _frame(payload: bytes) -> str | bytes:
    """A text frame when the payload is UTF-8 (as a browser sends), else a binary one."""
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        return payload


async def test_adversarial_input_over_the_websocket(ws_daemon: Daemon) -> None:
    token = (await make_token(ws_daemon))["token"]
    sentinel = SENTINEL.decode().rstrip("\n")

    def rpc() -> None:
        with open_ws(ws_daemon, token, max_size=None) as ws:
            for payload in ADVERSARIAL:
                ws.send(_frame(payload))
                ws.send(sentinel)
                while True:
                    received = values(ws.recv(TIMEOUT))
                    for message in received:
                        assert INTERNAL_ERROR not in _codes(message), (payload[:80], message)
                    if any(m.get("id") == SENTINEL_ID for m in received):
                        break

    def seed() -> None:
        with open_ws(ws_daemon, token, "/ws/progress/news", max_size=None) as ws:
            assert json.loads(ws.recv(TIMEOUT))["type"] == "connected"
            for payload in ADVERSARIAL:
                ws.send(_frame(payload))
                ws.send('{"type":"ping"}')
                kinds: list[str] = []
                while not kinds or kinds[-1] != "pong":
                    kinds.append(json.loads(ws.recv(TIMEOUT))["type"])
                assert kinds == ["error", "pong"], (payload[:80], kinds)

    await in_thread(rpc)
    await in_thread(seed)
    await in_thread(assert_healthy, ws_daemon.config.socket)
