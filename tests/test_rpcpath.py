"""The request path's short cuts keep what the long way did.

``encode_line`` reuses one C encoder instead of building one per message, and a request
that is not a batch is answered without the batch's bookkeeping: the bytes, the errors and
the ``limits.max_reply_bytes`` decision must be the ones the long way gave.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest

from statusd.daemon import Daemon
from statusd.errors import BUSY, INTERNAL_ERROR
from statusd.identity import Caller
from statusd.protocol import jsonrpc
from statusd.session import Session

VALUES: list[Any] = [
    {"jsonrpc": "2.0", "id": 7, "result": {"a": [1, 2.5, -0.0, True, False, None]}},
    {"text": "ü ✓ 漢字 \U0001f600", "ctl": '\x00\x1f\n\t"\\/', "empty": "", "list": []},
    {1: "int key", 2.5: "float key", False: "bool key", None: "null key"},
    ("a", ("tuple", "inside"), {"nested": {"deeper": [{"x": 10**30}]}}),
    "just a string",
    12345678901234567890,
    1e300,
    [],
    {},
]


@pytest.mark.parametrize("value", VALUES)
def test_encode_line_writes_what_the_json_module_writes(value: Any) -> None:
    expected = json.dumps(value, separators=(",", ":"), ensure_ascii=False) + "\n"
    assert jsonrpc.encode_line(value) == expected.encode()


def test_the_encoder_keeps_nothing_from_a_message_that_failed() -> None:
    nan = jsonrpc.result_response(1, {"ratio": float("nan"), "s": "\ud800"})
    assert (
        jsonrpc.encode_line(nan)
        == b'{"jsonrpc":"2.0","id":1,"result":{"ratio":null,"s":"\xef\xbf\xbd"}}\n'
    )
    cycle: dict[str, Any] = {}
    cycle["self"] = cycle
    answer = json.loads(jsonrpc.encode_line(jsonrpc.result_response("c", cycle)))
    assert answer["id"] == "c"
    assert answer["error"]["code"] == INTERNAL_ERROR
    assert answer["error"]["message"] == "the reply could not be encoded (RecursionError)"
    with pytest.raises(TypeError):
        jsonrpc.encode_line({"not": "a response", "value": object()})
    # The same encoder, right after each failure.
    for value in VALUES:
        expected = json.dumps(value, separators=(",", ":"), ensure_ascii=False) + "\n"
        assert jsonrpc.encode_line(value) == expected.encode()


async def answer(daemon: Daemon, message: Any, max_reply_bytes: int | None = None) -> Any:
    if max_reply_bytes is not None:
        limits = attrs.evolve(daemon.api.config.limits, max_reply_bytes=max_reply_bytes)
        daemon.api.config = attrs.evolve(daemon.api.config, limits=limits)
    session = Session(Caller(0, "root", admin=True), daemon.streams)
    line = await daemon.api.handle_message(session, json.dumps(message))
    return None if line is None else json.loads(line)


async def test_one_request_and_a_batch_of_it_meet_max_reply_bytes_alike(daemon: Daemon) -> None:
    # An answer past the config's smallest max_reply_bytes (1,024 bytes), the same each time.
    request = {"jsonrpc": "2.0", "method": "tasks.summary", "id": "s" * 1500}
    size = len(json.dumps(await answer(daemon, request), separators=(",", ":"))) + 1
    # The limit counts a batch's brackets, whether or not the reply is a batch: a request
    # is answered the same alone as in a batch of one.
    fits = size + 2
    assert "result" in await answer(daemon, request, fits)
    assert "result" in (await answer(daemon, [request], fits))[0]
    alone = await answer(daemon, request, fits - 1)
    in_a_batch = (await answer(daemon, [request]))[0]
    assert alone == in_a_batch
    assert alone["id"] == "s" * 1500
    assert alone["error"]["code"] == BUSY
    assert alone["error"]["data"] == {"limit": fits - 1}
    assert alone["error"]["message"] == (
        f"the reply to this request would be over {fits - 1} bytes "
        "(limits.max_reply_bytes); its result was left out"
    )


async def test_one_request_is_answered_as_before(daemon: Daemon) -> None:
    notification = {"jsonrpc": "2.0", "method": "daemon.info"}
    assert await answer(daemon, notification) is None
    unknown = await answer(daemon, {"jsonrpc": "2.0", "method": "no.such", "id": 3})
    assert unknown["id"] == 3
    assert unknown["error"]["data"] == {"method": "no.such"}
    bad = await answer(daemon, {"jsonrpc": "2.0", "method": "tasks.get", "id": 4, "params": {}})
    assert bad["id"] == 4
    assert bad["error"]["data"]["field"] == "task_id"
    info = await answer(daemon, {"jsonrpc": "2.0", "method": "daemon.info", "id": 5})
    assert info["id"] == 5
    assert info["result"]["user"] == "root"
    assert await answer(daemon, "not an object") == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32600, "message": "request must be an object, not a string"},
    }
