"""A/B of the ``daemon.info`` rows between two statusd sources: statusd alone, interleaved.

Not a test. For a change to the call path, as bench/ab_files.py is for downloads:
``git archive OTHER | tar -x -C /tmp/other`` and

    python bench/ab_info.py --base /tmp/other --rounds 8

starts one statusd from ``--base`` and one from this checkout (or ``--other``), and calls
``daemon.info`` on each in turn from 1 and from 16 client processes (bench/_clients.py, as
bench/run.py's ``info-1`` and ``info-16`` rows do), the side that goes first alternating per
round. It prints each round, the medians and their ratio, and the daemon's CPU time per
call (``/proc``), which is steadier than calls/s when other work shares the cores.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import _clients  # noqa: E402
import run  # noqa: E402
from _common import ABTally  # noqa: E402
from _servers import ServerProcess, cpu_seconds_of, known_keys, start_statusd  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the other side's source")
    parser.add_argument("--other", type=Path, default=REPO, help="this side's (default: here)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=run.FULL.calls, help="per round and side")
    args = parser.parse_args(argv)
    sides = {"base": args.base.resolve(), "other": args.other.resolve()}
    rows = {"info-1": 1, "info-16": 16}
    shm = Path(tempfile.mkdtemp(prefix="statusd-ab-", dir="/dev/shm"))
    servers: dict[str, ServerProcess] = {}
    try:
        for side, source in sides.items():
            server = start_statusd(
                shm / side,
                {},
                known=known_keys(shm / f"keys-{side}", source),
                source=source,
                name=f"statusd-{side}",
            )
            server.wait_ready()
            servers[side] = server
        tally = ABTally(list(rows), sides, "call")
        for number in range(args.rounds):
            order = ("base", "other") if number % 2 == 0 else ("other", "base")
            for row, clients in rows.items():
                for side in order:
                    server = servers[side]
                    argvs = [
                        _clients.command("calls", "--socket", str(server.socket), "--count", str(n))
                        for n in run._shares(args.calls, clients)
                    ]
                    before = cpu_seconds_of(server.process.pid)
                    seconds, _ = _clients.run_gang(argvs)
                    used = cpu_seconds_of(server.process.pid) - before
                    tally.add(row, side, args.calls, seconds, used)
            tally.print_round(number)
        tally.print_medians(cpu_digits=1)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(shm, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
