"""The unit files in contrib/systemd: resource limits, the link-local deny list, and the
exposure ``systemd-analyze security`` rates them at (skipped, saying why, without it).

tests/test_systemd.py checks that the units verify and agree with the daemon's defaults;
this file holds them to the hardening docs/systemd.md promises.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "systemd"
SYSTEM_UNIT = CONTRIB / "statusd.service"
USER_UNIT = CONTRIB / "user" / "statusd.service"

SYSTEM_EXPOSURE = 1.5
USER_EXPOSURE = 2.1  # 6.4 before PrivateUsers=yes and the mount namespace settings

# systemd.exec(5), systemd 252: these do nothing in a user manager (RemoveIPC= needs
# User=; IPAddressDeny= and DevicePolicy= need BPF, that is root; the others are for
# system services only). systemd-analyze would still count them, so the user unit's
# score would flatter it.
IGNORED_BY_A_USER_MANAGER = (
    "User",
    "Group",
    "RemoveIPC",
    "IPAddressDeny",
    "DevicePolicy",
    "ProtectControlGroups",
    "ProtectProc",
    "ProcSubset",
)


def _directives(unit: Path) -> dict[str, list[str]]:
    """Every ``Key=value`` line, comments left out; a key may appear more than once."""
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def _exposure(unit: Path) -> float:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (Debian: apt-get install systemd)")
    result = subprocess.run(
        [tool, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, SYSTEMD_COLORS="0"),
        check=False,
    )
    last = result.stdout.strip().splitlines()[-1]
    assert f"Overall exposure level for {unit.name}:" in last, result.stdout + result.stderr
    return float(last.split(":")[1].split()[0])


def test_system_unit_limits_resources() -> None:
    directives = _directives(SYSTEM_UNIT)
    assert directives["LimitNOFILE"] == ["65536"]
    assert directives["MemoryMax"] == ["1G"]
    assert directives["TasksMax"] == ["256"]
    text = SYSTEM_UNIT.read_text()
    # The comment shows an admin how to change them without editing the shipped file.
    assert "systemctl edit statusd.service" in text


def test_system_unit_denies_link_local_addresses() -> None:
    [deny] = _directives(SYSTEM_UNIT)["IPAddressDeny"]
    assert {"169.254.0.0/16", "fe80::/10"} <= set(deny.split())
    assert "IPAddressAllow" not in _directives(SYSTEM_UNIT)
    # ... and says how to open them.
    assert "empty `IPAddressDeny=`" in SYSTEM_UNIT.read_text()


def test_system_unit_exposure() -> None:
    assert _exposure(SYSTEM_UNIT) <= SYSTEM_EXPOSURE


def test_user_unit_exposure() -> None:
    assert _exposure(USER_UNIT) <= USER_EXPOSURE


def test_user_unit_has_a_user_namespace_and_nothing_a_user_manager_ignores() -> None:
    directives = _directives(USER_UNIT)
    assert directives["PrivateUsers"] == ["yes"]  # what makes the mount settings work
    assert directives["ProtectSystem"] == ["strict"]
    # Read-only, not hidden: ExecStart is under ~/.local/bin.
    assert directives["ProtectHome"] == ["read-only"]
    assert directives["ExecStart"][0].startswith("%h/")
    assert directives["CapabilityBoundingSet"] == [""]
    ignored = [key for key in IGNORED_BY_A_USER_MANAGER if key in directives]
    assert ignored == []
    # A user manager cannot raise a limit above its own; too high a value stops the start.
    assert "LimitNOFILE" not in directives
    assert (directives["MemoryMax"], directives["TasksMax"]) == (["1G"], ["256"])


@pytest.mark.parametrize("unit", [SYSTEM_UNIT, USER_UNIT], ids=["system", "user"])
def test_every_directive_appears_once(unit: Path) -> None:
    """A second line of a key silently adds to or overrides the first."""
    repeated = [key for key, values in _directives(unit).items() if len(values) > 1]
    assert repeated == []
