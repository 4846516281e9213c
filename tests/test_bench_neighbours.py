"""bench/neighbours.py keeps working: a tiny run of two items against a real daemon, attacked
as uid nobody while root and uid 65533 are served, prints the table and the command.

Nothing here is timed: only that the attacks still run and their outcome is read right.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import needs_root

REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 60


def run_bench(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(REPO / "bench" / "neighbours.py"), "--work-dir",
               str(directory), *args]  # fmt: skip
    return subprocess.run(
        command, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False, cwd=REPO
    )


@needs_root
def test_a_tiny_run_prints_each_items_outcome_and_the_command(short_tmp: Path) -> None:
    done = run_bench(short_tmp, "--items", "4,10", "--scale", "0.001", "--markdown")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "command: `python bench/neighbours.py --work-dir" in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "256 granted, 744 refused with -32004" in rows["4"]
    # The burst (50) and what the rate (20/s) refilled while the 300 calls ran.
    published = re.search(r"(\d+) accepted, (\d+) refused -32004", rows["10"])
    assert published, rows["10"]
    accepted, refused = int(published[1]), int(published[2])
    assert accepted + refused == 300
    assert 50 <= accepted < 100, rows["10"]
    assert "earlier messages still held: root's 10 of 10" in rows["10"]
    for item in ("4", "10"):
        assert "root " in rows[item]
        assert "65533 " in rows[item]
        assert "failed" not in rows[item].split("|")[4], rows[item]  # every victim call answered
        assert " MiB (peak " in rows[item]
    # Every process the run started has ended, and the scratch directory is gone.
    assert list(short_tmp.iterdir()) == []


def test_it_says_it_needs_root_or_an_unknown_item(short_tmp: Path) -> None:
    done = run_bench(short_tmp, "--items", "4,12")
    assert done.returncode == 2
    assert "unknown items ['12']; known: 4, 5, 6, 7, 8, 9, 10, 1" in done.stderr
    if os.geteuid() != 0:
        done = run_bench(short_tmp, "--items", "4")
        assert done.returncode == 2
        assert "must run as root" in done.stderr
