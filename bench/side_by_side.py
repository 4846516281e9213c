"""Two statusd source trees through their sockets at once: an A/B of one change.

Not a test. On a shared, noisy machine two runs of ``bench/run.py`` minutes apart differ by
more than most changes; here both daemons (``--before``, e.g. a ``git archive`` of main,
and ``--after``) run at the same time and are called alternately, in many short rounds
whose order flips every round, so drift hits both sides alike. ``bench/minirpc.py`` takes
its turn too, the floor: for ``create`` with its journal on the same disk. Prints each
side's median and rounds, the ratio of the medians and in how many rounds ``after`` beat
``before``, and each daemon's CPU time per call (``/proc``), which is steadier than the
rates when other work shares the cores; for ``create``, also how many records each side's
journal thread committed per ``write`` + ``fdatasync`` (the write system calls of the
threads other than the event loop's, from ``/proc/PID/task/*/io``). Clients as in
``bench/run.py``: processes of their own, each call awaited before the next.

Usage::

    git archive main | tar -x -C /tmp/before
    python bench/side_by_side.py --before /tmp/before --after . info --clients 16
    python bench/side_by_side.py --before /tmp/before --after . create --dir /var/tmp
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import _clients
from _servers import ServerProcess, cpu_seconds_of, known_keys, start_minirpc, start_statusd

PARAMS = {"type": "info", "title": "bench title", "message": "bench message " * 8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=["info", "create"])
    parser.add_argument("--before", type=Path, required=True, help="a statusd source tree")
    parser.add_argument("--after", type=Path, required=True, help="another one")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--calls", type=int, default=3000, help="calls per round, all clients")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm"), help="state goes here")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="statusd-ab-"))
    servers: dict[str, ServerProcess] = {}
    try:
        for name in ("before", "after"):
            source = getattr(args, name).resolve()
            known = known_keys(root / name, source)
            servers[name] = start_statusd(root / name, {}, known=known, source=source, name=name)
        # minirpc is the floor of either workload: a trivial call, or (with its journal,
        # on the same disk) a durable create.
        (root / "minirpc").mkdir()
        servers["minirpc"] = start_minirpc(root / "minirpc", journal=args.workload == "create")
        for server in servers.values():
            server.wait_ready()
        results, cpu, batches = _rounds(servers, args)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    for name, values in results.items():
        rounds = ", ".join(f"{v:,.0f}" for v in values)
        print(f"{name:8} median {statistics.median(values):9,.0f}/s  rounds: {rounds}")
        print(f"{name:8} CPU per call, median {statistics.median(cpu[name]):6.1f} us")
        if batches[name]:
            per_sync = ", ".join(f"{v:.1f}" for v in batches[name])
            median = statistics.median(batches[name])
            print(f"{name:8} records per sync, median {median:.1f}: {per_sync}")
    before, after = (statistics.median(results[name]) for name in ("before", "after"))
    line = f"after/before {after / before:.2f}x"
    if "minirpc" in results:
        floor = statistics.median(results["minirpc"])
        line += f"; before/minirpc {before / floor:.2f}x, after/minirpc {after / floor:.2f}x"
    print(line)
    wins = sum(a > b for a, b in zip(results["after"], results["before"], strict=True))
    print(f"rounds where after > before: {wins}/{args.rounds}")


def _rounds(
    servers: dict[str, ServerProcess], args: argparse.Namespace
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]]]:
    results: dict[str, list[float]] = {name: [] for name in servers}
    cpu: dict[str, list[float]] = {name: [] for name in servers}
    batches: dict[str, list[float]] = {name: [] for name in servers}
    extra = []
    if args.workload == "create":
        extra = ["--method", "notifications.create", "--params", json.dumps(PARAMS)]
    share = args.calls // args.clients
    for number in range(args.rounds):
        order = list(servers) if number % 2 == 0 else list(reversed(servers))
        for name in order:
            command = ["--socket", servers[name].socket, "--count", str(share), *extra]
            argvs = [_clients.command("calls", *command) for _ in range(args.clients)]
            pid = servers[name].process.pid
            used, writes = cpu_seconds_of(pid), _writes_off_the_loop(pid)
            seconds, _ = _clients.run_gang(argvs)
            used = cpu_seconds_of(pid) - used
            writes = _writes_off_the_loop(pid) - writes
            results[name].append(share * args.clients / seconds)
            cpu[name].append(used / (share * args.clients) * 1e6)
            if args.workload == "create" and writes > 0:
                batches[name].append(share * args.clients / writes)
    return results, cpu, batches


def _writes_off_the_loop(pid: int) -> int:
    """Write system calls so far by ``pid``'s threads other than its first (the event
    loop's): in a create workload, the journal thread's one ``write`` per commit."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        if task.name == str(pid):
            continue
        with contextlib.suppress(OSError, ValueError):
            for line in (task / "io").read_text().splitlines():
                if line.startswith("syscw:"):
                    total += int(line.split()[1])
    return total


if __name__ == "__main__":
    main()
