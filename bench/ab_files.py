"""A/B of the many-file rows between two statusd sources: statusd alone, interleaved.

Not a test. For a change to the download path, where bench/run.py's peers only add noise
between the two sides: ``git archive OTHER | tar -x -C /tmp/other`` and

    python bench/ab_files.py --base /tmp/other --rounds 7

starts, on the same nginx and files, one statusd per side and row (the ``files`` row's
settings, and nothing tuned as in ``files-defaults``) from ``--base`` and from this checkout
(or ``--other``), and downloads 2,000 x 16 KiB through each in turn, the side that goes
first alternating per round, as bench/run.py does (``_statusd_download``). It prints each
round, the medians and their ratio, and the daemon's CPU time per file (``/proc``): CPU is
steadier than files/s when other work shares the cores.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import downloads  # noqa: E402
import run  # noqa: E402
from _common import ABTally  # noqa: E402
from _servers import ServerProcess, cpu_seconds_of, known_keys, start_statusd  # noqa: E402

# bench/run.py's rows: the tuned one raises max_per_host with parallel_items, else only 6
# (the default) of its 16 items would be in flight.
ROWS: dict[str, dict[str, Any]] = {
    "files": {
        "downloads.parallel_items": 16,
        "downloads.batch_size": 1000,
        "downloads.max_per_host": 16,
    },
    "files-defaults": {},
}


class _Scratch:
    """What ``run._statusd_download`` asks of bench/run.py's ``Bench``."""

    def __init__(self, shm: Path) -> None:
        self.shm = shm
        self._count = 0

    def scratch(self, root: Path, name: str) -> Path:
        self._count += 1
        path = root / f"{name}-{self._count}"
        path.mkdir(parents=True)
        return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the other side's source")
    parser.add_argument("--other", type=Path, default=REPO, help="this side's (default: here)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--files", type=int, default=run.FULL.files)
    args = parser.parse_args(argv)
    sides = {"base": args.base.resolve(), "other": args.other.resolve()}
    shm = Path(tempfile.mkdtemp(prefix="statusd-ab-", dir="/dev/shm"))
    shm.chmod(0o755)
    servers: dict[tuple[str, str], ServerProcess] = {}
    try:
        files = downloads.make_files(shm / "www", 0, args.files, run.FULL.file_kib)
        size = run.FULL.file_kib << 10
        nginx = downloads.find_tools(install=False)["nginx"]
        with downloads.serve(files, nginx, shm) as (base_url, _):
            urls = [f"{base_url}/{name}" for name in files.small]
            for row, settings in ROWS.items():
                for side, source in sides.items():
                    directory = shm / f"{side}-{row}"
                    server = start_statusd(
                        directory,
                        {"download_dir": str(directory / "downloads"), **settings},
                        known=known_keys(shm / f"keys-{side}", source),
                        source=source,
                        name=f"statusd-{side}-{row}",
                    )
                    server.wait_ready()
                    servers[row, side] = server
            tally = ABTally(ROWS, sides, "file")
            scratch: Any = _Scratch(shm)
            for number in range(args.rounds):
                order = ("base", "other") if number % 2 == 0 else ("other", "base")
                for row in ROWS:
                    for side in order:
                        server = servers[row, side]
                        before = cpu_seconds_of(server.process.pid)
                        seconds, dest = run._statusd_download(scratch, server, urls)
                        used = cpu_seconds_of(server.process.pid) - before
                        run._check_files(dest, len(urls), size)
                        shutil.rmtree(dest)
                        tally.add(row, side, len(urls), seconds, used)
                tally.print_round(number)
            tally.print_medians(cpu_digits=0)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(shm, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
