"""A/B of the ``fanout`` row between two statusd sources, interleaved, with the daemon's CPU.

Not a test. For a change to the fan-out path, as bench/ab_files.py is for downloads:
``git archive OTHER | tar -x -C /tmp/other`` and

    python bench/ab_fanout.py --base /tmp/other --rounds 4

runs bench/run.py's ``fanout`` workload (S = 100 subscribers in 2 processes, a publisher
process) from ``--base`` and from this checkout (or ``--other``) in turn, the side going
first alternating per round, a fresh daemon per run: deliveries/s with the publisher as
fast as it is answered, and p99 publish -> receive at 1,000 msg/s, on the Unix socket and
the WebSocket (``/ws?coalesce=1``). It prints each round, the medians, their ratio, and the
daemon's CPU time per delivery (``/proc``), which is steadier than the rates and the p99
when other work shares the cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import fanout  # noqa: E402
import run  # noqa: E402
from _common import ABTally  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the other side's source")
    parser.add_argument("--other", type=Path, default=REPO, help="this side's (default: here)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--messages", type=int, default=run.FULL.fanout_messages)
    parser.add_argument("--subscribers", type=int, default=run.FULL.fanout_subscribers)
    args = parser.parse_args(argv)
    sides = {"base": args.base.resolve(), "other": args.other.resolve()}
    opts = run.fanout_options(
        args.messages, args.subscribers, run.FULL.rate, run.FULL.fanout_seconds, 1
    )
    count = args.subscribers
    transports = {"unix": False, "ws": True}
    rows = [f"{name}-{phase}" for name in transports for phase in ("burst", "1k")]
    tally = ABTally(rows, sides, "receipt")  # a message received by one subscriber
    p99s: dict[tuple[str, str], list[float]] = {}
    shm = Path(tempfile.mkdtemp(prefix="statusd-ab-fanout-", dir="/dev/shm"))
    try:
        for number in range(args.rounds):
            order = ("base", "other") if number % 2 == 0 else ("other", "base")
            for name, websocket in transports.items():
                for side in order:
                    for phase, history in (("burst", opts.history), ("1k", 100)):
                        directory = shm / f"{side}-{name}-{phase}-{number}"
                        directory.mkdir()
                        server = fanout.start_statusd(
                            directory, history, sides[side], websocket=websocket
                        )
                        try:
                            server.wait_ready()
                            if websocket:
                                server.mint_token()
                            if phase == "burst":
                                burst = fanout.run_throughput(server, count, opts.messages, opts)
                                tally.add(
                                    f"{name}-burst",
                                    side,
                                    burst.deliveries,
                                    burst.seconds,
                                    burst.server_cpu,
                                )
                            else:
                                steady = fanout.run_latency(server, count, opts)
                                tally.add(
                                    f"{name}-1k",
                                    side,
                                    steady.samples,
                                    steady.seconds,
                                    steady.server_cpu,
                                )
                                p99s.setdefault((name, side), []).append(steady.p99_ms)
                        finally:
                            server.stop()
                            shutil.rmtree(directory, ignore_errors=True)
            tally.print_round(number)
            shown = ", ".join(f"{n} {s} {v[-1]:.2f} ms" for (n, s), v in p99s.items())
            print(f"  p99 at {opts.rate:,.0f} msg/s: {shown}", flush=True)
        tally.print_medians(cpu_digits=3)
        for name in transports:
            base, other = (statistics.median(p99s[name, side]) for side in sides)
            print(f"{name} p99 at {opts.rate:,.0f} msg/s: base {base:.2f} ms, other {other:.2f} ms")
        print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
