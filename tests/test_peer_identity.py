"""Who is calling: SO_PEERCRED, the socket's mode and group, the admin rule.

These use a real second uid: the test (as root) forks a child that drops to nobody and
talks to a real daemon process. Without root they are skipped, saying why.
"""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from statusd.identity import caller_for_uid, is_admin
from tests.conftest import NOBODY_UID, blocking_call, needs_root, run_as_nobody

NOBODY_GROUP = grp.getgrgid(65534).gr_name


def _write_config(directory: Path, text: str) -> Path:
    path = directory / "statusd.toml"
    path.write_text(text)
    return path


@needs_root
def test_nobody_in_the_socket_group_is_identified(daemon_process: Any, short_tmp: Path) -> None:
    config = _write_config(short_tmp, f'socket_group = "{NOBODY_GROUP}"\n')
    process = daemon_process()
    process.start("--config", str(config))
    info = stat.S_IMODE(process.socket.stat().st_mode)
    assert info == 0o660
    assert process.socket.stat().st_gid == 65534

    def ask() -> Any:
        return blocking_call(process.socket, "daemon.info")["result"]

    result = run_as_nobody(ask)
    assert (result["user"], result["uid"], result["admin"]) == ("nobody", NOBODY_UID, False)


def test_socket_mode_keeps_other_users_out(daemon_process: Any) -> None:
    process = daemon_process()
    process.start()  # default 0660, the daemon's (root's) group

    def ask() -> Any:
        try:
            blocking_call(process.socket, "daemon.info")
        except PermissionError:
            return "denied"
        return "connected"

    assert run_as_nobody(ask) == "denied"


@needs_root
def test_admin_group_makes_its_members_admins(daemon_process: Any, short_tmp: Path) -> None:
    config = _write_config(
        short_tmp, f'socket_group = "{NOBODY_GROUP}"\nadmin_group = "{NOBODY_GROUP}"\n'
    )
    process = daemon_process()
    process.start("--config", str(config))

    def ask() -> Any:
        return blocking_call(process.socket, "daemon.info")["result"]["admin"]

    assert run_as_nobody(ask) is True


def test_admin_rule_without_admin_group() -> None:
    own = os.getuid()
    assert is_admin(0, "root", None, daemon_uid=own)
    assert is_admin(own, "me", None, daemon_uid=own)
    assert not is_admin(NOBODY_UID, "nobody", None, daemon_uid=0)
    assert not is_admin(NOBODY_UID, "nobody", "no-such-group-here", daemon_uid=0)


def test_uid_without_passwd_entry_is_named_by_number() -> None:
    caller = caller_for_uid(4_000_123, None, daemon_uid=0)
    assert (caller.username, caller.admin) == ("4000123", False)


@pytest.mark.parametrize("uid", [NOBODY_UID])
def test_primary_group_counts_for_admin(uid: int) -> None:
    assert is_admin(uid, "nobody", NOBODY_GROUP, daemon_uid=0)
