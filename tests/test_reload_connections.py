"""An admin demoted by a reload (SIGHUP) keeps what a user may hold: of its connections,
let in past ``limits.max_connections_per_user`` as an admin, the oldest up to the cap stay
(told by ``access_changed``) and the newest beyond it get a -32002 error with
``data.reason: "connections"`` and are closed; its next connection is refused by the cap.

A real daemon process run as root; nobody holds the connections from a forked child that
dropped to uid nobody (tests/conftest.py), while root's connection is served meanwhile.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import needs_root
from tests.test_reload_access import ANSWER_BOUND, ME, Child, LineClient, _start
from tests.test_token_access import NOBODY_GROUP

CAP = 2
HELD = 4  # nobody's connections, as an admin


@needs_root
def test_an_ex_admin_keeps_the_oldest_connections_up_to_the_cap(
    daemon_process: Any, short_tmp: Path
) -> None:
    limits = f"[limits]\nmax_connections_per_user = {CAP}\n"
    process, config = _start(
        daemon_process,
        short_tmp,
        f'socket_group = "{NOBODY_GROUP}"\nadmin_group = "{NOBODY_GROUP}"\n{limits}',
    )
    socket_path = process.socket

    def hold(say: Callable[[str], None], hear: Callable[[], str]) -> Any:
        clients = []
        for _ in range(HELD):  # one after another: admitted in this order
            client = LineClient(socket_path)
            assert client.call("daemon.info")["admin"] is True
            clients.append(client)
        say("ready")
        seen: dict[str, Any] = {"kept": [], "closed": []}
        for client in clients[:CAP]:
            notice = client.until(lambda m: m.get("method") == "access_changed")
            seen["kept"].append([notice["params"]["admin"], client.call("daemon.info")["admin"]])
        for client in clients[CAP:]:
            seen["closed"].append([m for m in client.messages() if "error" in m])
        with LineClient(socket_path) as another:
            seen["another"] = [json.loads(line) for line in another.sock.makefile("rb")]
        return seen

    child = Child(hold)
    with LineClient(socket_path) as ours:
        assert child.heard() == "ready"
        config.write_text(f'socket_group = "{NOBODY_GROUP}"\n{limits}')  # admin_group gone
        process.signal(signal.SIGHUP)
        seen = child.join()
        started = time.monotonic()
        assert ours.call("daemon.info")["user"] == ME
        assert time.monotonic() - started < ANSWER_BOUND
    assert seen["kept"] == [[False, False]] * CAP
    message = (
        f"uid 65534 (nobody) is no longer an admin after a configuration reload and held "
        f"{HELD} connections, more than a user may (limits.max_connections_per_user = {CAP}); "
        f"its newest {HELD - CAP} are closed, this one among them"
    )
    error = {
        "code": -32002,
        "message": message,
        "data": {"reason": "connections", "limit": CAP, "key": "limits.max_connections_per_user"},
    }
    assert seen["closed"] == [[{"jsonrpc": "2.0", "id": None, "error": error}]] * (HELD - CAP)
    # As a user now, the cap holds nobody's next connection too.
    [refused] = seen["another"]
    assert refused["error"]["code"] == -32004
    assert refused["error"]["data"] == {"limit": CAP, "key": "limits.max_connections_per_user"}
    assert process.stderr().count("closing the connection of nobody") == HELD - CAP
