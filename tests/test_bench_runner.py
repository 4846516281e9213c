"""bench/run.py keeps working: a tiny run against a real daemon and a local HTTP server prints
the table (statusd's figure, the peer's, the ratio) and the command that made it.

Nothing here is timed: the figures of a tiny run on a busy machine mean nothing, only that
every part of the runner still runs.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from _clients import LineClient  # noqa: E402
from _servers import config_toml, known_keys, start_minirpc  # noqa: E402

from statusd.store import load  # noqa: E402

RUN_TIMEOUT = 60


def run_bench(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, str(REPO / "bench" / "run.py"), "--no-install",
        "--shm-dir", str(directory), "--disk-dir", str(directory), *args,
    ]  # fmt: skip
    return subprocess.run(
        command, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False, cwd=REPO
    )


def test_a_tiny_run_prints_statusd_the_peer_and_the_ratio(short_tmp: Path) -> None:
    done = run_bench(
        short_tmp, "--quick", "--rows", "info-1,files", "--files", "12", "--calls", "100",
        "--markdown",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "command: `python bench/run.py --no-install" in out
    info = next(line for line in out.splitlines() if line.startswith("| a trivial call"))
    cells = [cell.strip() for cell in info.strip("|").split("|")]
    statusd, peer, theirs, ratio = cells[1:5]
    assert re.fullmatch(r"[\d,]+ calls/s", statusd)
    assert peer == "bench/minirpc.py"
    assert re.fullmatch(r"[\d,]+ calls/s", theirs)
    assert re.fullmatch(r"\d+\.\d\dx", ratio)
    files = [line for line in out.splitlines() if line.startswith("| 12 x 16 KiB")]
    assert files, out
    for line in files:
        assert re.search(r"\| [\d,]+ files/s \| aria2c", line), line
    # Every process the run started has ended, and the scratch directories are gone.
    assert list(short_tmp.iterdir()) == []


def test_an_unknown_row_is_refused_naming_the_known_ones(short_tmp: Path) -> None:
    done = run_bench(short_tmp, "--rows", "info-1,fast")
    assert done.returncode == 2
    assert "unknown rows ['fast']" in done.stderr
    assert "files, files-defaults, big" in done.stderr


def test_the_config_holds_only_keys_this_statusd_knows_in_their_tables() -> None:
    known = {"max_connections", "status_history", "downloads.parallel_items", "limits.burst"}
    settings = {
        "max_connections": 4096,
        "downloads.parallel_items": 16,
        "limits.max_connections_per_user": 2048,  # not in this statusd: left out
        "downloads.burst": 5,  # this statusd has it under [limits]
    }
    written = tomllib.loads(config_toml(settings, known))
    assert written == {
        "max_connections": 4096,
        "downloads": {"parallel_items": 16},
        "limits": {"burst": 5},
    }


def test_the_keys_this_statusd_knows_come_from_check_config_set_or_not(short_tmp: Path) -> None:
    keys = known_keys(short_tmp)
    assert {"max_connections", "downloads.parallel_items", "limits.max_batch_entries"} <= keys
    # Printed as comments when unset, under their table.
    assert {"socket_group", "websocket.listen"} <= keys


def test_the_create_rows_print_sqlite_and_the_floor_beside_statusd(short_tmp: Path) -> None:
    done = run_bench(
        short_tmp, "--quick", "--rows", "creates-1", "--creates", "30", "--markdown"
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("| `notifications")]
    assert len(lines) == 2, done.stdout
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    (_, ours, sqlite, theirs, ratio, goal), (_, same, floor, floors, floor_ratio, what) = cells
    assert re.fullmatch(r"[\d,]+ creates/s", ours)
    assert same == ours
    assert sqlite.startswith("sqlite WAL FULL")
    assert (goal, what) == (">= 1.0x", "breakdown")
    assert floor == "floor: bench/minirpc.py --journal"
    for figure in (theirs, floors):
        assert re.fullmatch(r"[\d,]+ creates/s", figure)
    for figure in (ratio, floor_ratio):
        assert re.fullmatch(r"\d+\.\d\dx", figure)
    assert list(short_tmp.iterdir()) == []


def test_the_floor_writes_a_journal_statusd_reads_and_answers_each_create(short_tmp: Path) -> None:
    floor = start_minirpc(short_tmp, journal=True)
    try:
        floor.wait_ready()
        client = LineClient(floor.socket)
        ids = [
            client.call("notifications.create", {"type": "info", "title": f"t{n}", "message": "m"})
            for n in range(3)
        ]
        client.sock.close()
    finally:
        floor.stop()
    assert ids == [{"notification_id": n} for n in (1, 2, 3)]
    records = load(short_tmp / "notifications.jsonl").records
    assert [(record[0], record[3]) for record in records] == [(1, "t0"), (2, "t1"), (3, "t2")]
