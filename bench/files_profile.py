"""Where a small file's CPU goes in the daemon: per thread, and on the loop by function family.

Not a test. Starts nginx and one statusd (the ``files`` row's settings of bench/ab_files.py,
or ``--row files-defaults``) from this checkout or ``--source``, downloads 2,000 x 16 KiB
through its socket once to warm up, then ``--rounds`` times while py-spy samples it
(``record --threads -f raw``, without ``--idle``: a thread waiting in a system call that
sleeps is not sampled), and prints:

- files/s per round;
- the CPU time per file of the event loop (the thread whose id is the process id; user and
  system time from /proc/PID/task/TID/stat) and of the other threads (file threads, the
  journal's thread, a receiving thread);
- the loop's samples by function family (``FAMILIES``: the first family whose frames one
  of a sample's frames matches), as a share of the samples not spent in epoll, and that
  share of the loop's CPU per file in microseconds. py-spy cuts some coroutine stacks
  short (the frames of the task that resumed them are missing): those samples are put in
  a family by the library their frames are in (trio's socket, h11).

    python bench/files_profile.py --rounds 6 [--source DIR] [--row files-defaults]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import ab_files  # noqa: E402
import downloads  # noqa: E402
import run  # noqa: E402
from _servers import known_keys, start_statusd  # noqa: E402

EPOLL = ("get_events (trio/_core/_io_epoll.py", "_epoll_wait (trio/_core/_io_epoll.py")
FAMILIES: list[tuple[str, tuple[str, ...]]] = [
    (
        "the journal record (on_state, Reporter.checkpoint, the store's append and wait)",
        (
            "on_state (statusd/downloads/job.py",
            "_checkpoint (statusd/downloads/job.py",
            "checkpoint (statusd/tasks.py",
            "statusd/store.py",
        ),
    ),
    (
        "the item's completion: file hops (write, fdatasync, link; the part's removal)",
        (
            "_complete (statusd/downloads/engine.py",
            "ThreadPool.run (statusd/downloads/files.py",
            "in_thread (statusd/downloads/files.py",
        ),
    ),
    ("HTTP: the request (h11) and its send", ("send_request (statusd/downloads/http.py",)),
    ("HTTP: the response head, received and parsed", ("receive_head (statusd/downloads/http.py",)),
    ("HTTP: the body (h11 Data, the stall watch)", ("_fill (statusd/downloads/engine.py",)),
    (
        "HTTP: host slot, pool, the exchange's context managers, headers",
        ("statusd/downloads/http.py",),
    ),
    (
        "HTTP, stack cut short: trio's socket send/recv",
        ("trio/_socket.py", "trio/_highlevel_socket.py"),
    ),
    ("HTTP, stack cut short: h11", ("h11/",)),
    ("the engine: the item's start, names, decisions", ("statusd/downloads/engine.py",)),
    ("the job: per-item bookkeeping, progress", ("statusd/downloads/job.py", "Reporter.")),
    ("per task: build, end, compaction", ("statusd/tasks.py",)),
]
REST = "trio's scheduler, thread wake-ups and the rest"


def threads_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far: the loop's user and system time, and the other threads'."""
    ticks = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # a thread that ended meanwhile
        who = "loop" if task.name == str(pid) else "other threads"
        for name, field in ((f"{who}, user", 11), (f"{who}, system", 12)):
            used[name] = used.get(name, 0.0) + int(fields[field]) / ticks
    return used


def families(path: Path) -> tuple[Counter[str], int, int]:
    """The loop's samples by family, how many of them, and how many were in epoll."""
    found: Counter[str] = Counter()
    working = waiting = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.strip().rpartition(" ")
        if not stack:
            continue
        first, *frames = stack.split(";")
        if "MainThread" not in first:
            continue
        if any(mark in frame for frame in frames for mark in EPOLL):
            waiting += int(count)
            continue
        working += int(count)
        for name, marks in FAMILIES:
            if any(mark in frame for frame in frames for mark in marks):
                found[name] += int(count)
                break
        else:
            found[REST] += int(count)
    return found, working, waiting


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=REPO, help="statusd's source tree")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--row", choices=tuple(ab_files.ROWS), default="files")
    parser.add_argument("--rate", type=int, default=400, help="py-spy samples per second")
    args = parser.parse_args(argv)
    spy_command = shutil.which("py-spy") or shutil.which("py-spy", path=Path(sys.executable).parent)
    if spy_command is None:
        print("py-spy not found (pip install '.[bench]')", file=sys.stderr)
        return 1
    shm = Path(tempfile.mkdtemp(prefix="statusd-files-profile-", dir="/dev/shm"))
    shm.chmod(0o755)
    out = Path(tempfile.gettempdir()) / "statusd-files-profile.txt"
    server = None
    try:
        files = downloads.make_files(shm / "www", 0, run.FULL.files, run.FULL.file_kib)
        nginx = downloads.find_tools(install=False)["nginx"]
        with downloads.serve(files, nginx, shm) as (base_url, _):
            urls = [f"{base_url}/{name}" for name in files.small]
            directory = shm / "statusd"
            settings = {"download_dir": str(directory / "downloads"), **ab_files.ROWS[args.row]}
            known = known_keys(shm / "keys", args.source.resolve())
            server = start_statusd(directory, settings, known=known, source=args.source.resolve())
            server.wait_ready()
            scratch: Any = ab_files._Scratch(shm)
            _, dest = run._statusd_download(scratch, server, urls)  # warm-up
            shutil.rmtree(dest)
            argv_spy = [spy_command, "record", "-p", str(server.process.pid), "-r",
                        str(args.rate), "-f", "raw", "--threads", "-o", str(out),
                        "--nonblocking"]  # fmt: skip
            spy = subprocess.Popen(argv_spy, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)  # py-spy attaches before the work starts
            before = threads_cpu(server.process.pid)
            rates = []
            for _ in range(args.rounds):
                seconds, dest = run._statusd_download(scratch, server, urls)
                run._check_files(dest, len(urls), run.FULL.file_kib << 10)
                shutil.rmtree(dest)
                rates.append(len(urls) / seconds)
            after = threads_cpu(server.process.pid)
            used = {name: after[name] - before.get(name, 0.0) for name in after}
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(shm, ignore_errors=True)
    count = len(urls) * args.rounds
    load = os.getloadavg()[0]
    print(f"row {args.row}, {args.rounds} rounds of {len(urls):,} files, load {load:.1f}")
    print("files/s: " + ", ".join(f"{rate:,.0f}" for rate in rates))
    print("CPU per file, us:")
    for name in sorted(used):
        print(f"  {name:22} {used[name] / count * 1e6:6.0f}")
    loop = (used["loop, user"] + used["loop, system"]) / count * 1e6
    found, working, waiting = families(out)
    if not working:
        print(f"no samples of the loop in {out}")
        return 1
    print(
        f"\nthe loop's {working:,} samples not in epoll ({waiting:,} in epoll left out), by family:"
    )
    print("| family | share | us per file |\n|---|---:|---:|")
    for name, samples in found.most_common():
        print(f"| {name} | {samples / working:.0%} | {samples / working * loop:.0f} |")
    print(f"\n(py-spy's raw output: {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
