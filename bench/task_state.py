"""What many large tasks cost the daemon: journal size, restart time and memory.

Issue 11, item 8: 200 tasks of 10,000 URLs from one user took the daemon from 37 MB to
1.05 GB, ``tasks.jsonl`` to 192 MB and a restart to 18 s. This runs the same kind of load
through a real ``statusd`` process, for one or more source trees (``--before REV`` adds the
tree of a git revision, taken with ``git archive``; the tree this script is in is "after"):

1. ``--finished`` tasks of ``--items`` files each are downloaded from nginx on 127.0.0.1
   (half complete, half fail on one missing file), so the journal holds settled tasks;
2. ``--queued`` more tasks of ``--items`` URLs each are created against a server that
   accepts and never answers, so one runs (hanging) and the rest wait;
3. the daemon is stopped (SIGTERM) and started again ``--restarts`` times: the journal's
   size, the time from exec to a connectable socket (median), and the daemon's resident
   memory once it answers (VmRSS, and its peak VmHWM) are reported.

The state directory is on /dev/shm unless ``--state-root`` says otherwise, so the disk's
fsync time does not drown the rest. Prints the command, the machine and a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import downloads
from _common import cpu_model, first_line

HERE = Path(__file__).resolve().parent
AFTER_TREE = HERE.parent
READY_TIMEOUT = 600.0
FINISH_TIMEOUT = 3600.0


@attrs.frozen
class Figures:
    tree: str
    journal_bytes: int
    restart_seconds: float
    rss_bytes: int
    peak_bytes: int
    download_seconds: float


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- the servers ---------------------------------------------------------------------------


@contextlib.contextmanager
def nginx(root: Path, work: Path) -> Iterator[str]:
    """nginx (one worker) serving ``root``; yields its base URL."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise SystemExit("nginx is needed (apt-get install nginx-light)")
    with downloads.serve_directory(root, binary, work, workers=1) as (base, _):
        yield base


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """A socket that completes connections (the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def wait_for(check: Any, what: str, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


# -- the daemon ----------------------------------------------------------------------------


@attrs.define
class Daemon:
    tree: Path
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.directory / "statusd.sock"

    def start(self) -> float:
        """Start it from ``tree``; the seconds from exec to a connectable socket."""
        config = self.directory / "statusd.toml"
        config.write_text(
            "max_running_tasks = 1\n[downloads]\nparallel_items = 16\nbatch_size = 1000\n"
        )
        env = dict(os.environ, PYTHONPATH=str(self.tree), HOME=str(self.directory))
        env.pop("NOTIFY_SOCKET", None)
        command = [sys.executable, "-m", "statusd", "--config", str(config)]
        command += ["--socket", str(self.socket), "--state-dir", str(self.directory / "state")]
        log = (self.directory / "statusd.log").open("ab")
        began = time.monotonic()
        # Not from this directory: "-m" puts the working directory first on sys.path.
        self.process = subprocess.Popen(
            command, env=env, stdout=log, stderr=log, cwd=self.directory
        )
        wait_for(self._ready, "the daemon's socket")
        return time.monotonic() - began

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise SystemExit(f"statusd exited: see {self.directory / 'statusd.log'}")
        with socket.socket(socket.AF_UNIX) as probe:
            return probe.connect_ex(str(self.socket)) == 0

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(120)

    def memory(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in bytes."""
        assert self.process is not None
        fields = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) * 1024
        return fields["VmRSS"], fields["VmHWM"]

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(600)
            sock.connect(str(self.socket))
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
        answer = json.loads(data)
        if "error" in answer:
            raise SystemExit(f"{method}: {answer['error']}")
        return answer["result"]


def make_files(root: Path, count: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    names = [f"f{n:05d}.bin" for n in range(count)]
    for name in names:
        (root / name).write_bytes(name.encode() * 8)
    return names


def settled(daemon: Daemon) -> bool:
    summary = daemon.call("tasks.summary")
    return bool(summary["total"] == summary["completed"] + summary["failed"])


def run_tree(
    name: str, tree: Path, options: argparse.Namespace, servers: tuple[str, str, list[str]]
) -> Figures:
    base, silent, names = servers
    directory = Path(tempfile.mkdtemp(prefix=f"tl-{name}-", dir=options.state_root))
    daemon = Daemon(tree, directory)
    try:
        daemon.start()
        began = time.monotonic()
        for n in range(options.finished):
            urls = [f"{base}/{file}" for file in names]
            if n % 2:
                urls[-1] = f"{base}/missing.bin"  # this task fails on its last item
            daemon.call("tasks.download", {"urls": urls, "dest": f"t{n}"})
        wait_for(lambda: settled(daemon), "the downloads", FINISH_TIMEOUT)
        download_seconds = time.monotonic() - began
        say(f"{name}: {options.finished} tasks downloaded in {download_seconds:.1f} s")
        for n in range(options.queued):
            urls = [f"{silent}/q{n}/{file}" for file in names]
            daemon.call("tasks.download", {"urls": urls, "dest": f"q{n}"})
        daemon.stop()
        journal = (directory / "state" / "tasks.jsonl").stat().st_size
        times, memory = [], []
        for _ in range(options.restarts):
            times.append(daemon.start())
            daemon.call("daemon.info")
            memory.append(daemon.memory())
            daemon.stop()
        rss = int(statistics.median(m[0] for m in memory))
        peak = int(statistics.median(m[1] for m in memory))
        figures = Figures(name, journal, statistics.median(times), rss, peak, download_seconds)
        say(f"{name}: {figures}")
        return figures
    finally:
        daemon.stop()
        shutil.rmtree(directory, ignore_errors=True)


def export_tree(revision: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(AFTER_TREE), "archive", revision],
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def report(figures: Sequence[Figures], options: argparse.Namespace, command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}, {first_line(['nginx', '-v'])}; "
        f"state directory on {options.state_root}.",
        "",
        f"{options.finished} settled tasks (half completed, half failed on one item) and "
        f"{options.queued} queued tasks, {options.items:,} items each:",
        "",
        "| tree | tasks.jsonl | restart (exec to socket) | RSS after restart | peak RSS |"
        " downloads took |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for f in figures:
        lines.append(
            f"| {f.tree} | {f.journal_bytes / 1e6:.1f} MB | {f.restart_seconds:.2f} s | "
            f"{f.rss_bytes / 1e6:.0f} MB | {f.peak_bytes / 1e6:.0f} MB | "
            f"{f.download_seconds:.0f} s |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="a git revision to measure as well, first")
    parser.add_argument("--finished", type=int, default=10)
    parser.add_argument("--queued", type=int, default=50)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--state-root", type=Path, default=Path("/dev/shm"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    command = "python bench/task_state.py " + " ".join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="tl-bench-") as work_dir:
        options.work = Path(work_dir)
        (options.work / "nginx").mkdir()
        trees: list[tuple[str, Path]] = []
        if options.before:
            before = export_tree(options.before, options.work / "before")
            trees.append((f"before ({options.before})", before))
        trees.append(("after", AFTER_TREE))
        names = make_files(options.work / "files", options.items)
        # nginx's workers run as nobody when it is started by root.
        os.chmod(options.work, 0o755)
        with (
            nginx(options.work / "files", options.work / "nginx") as base,
            silent_server() as silent,
        ):
            figures = [run_tree(name, tree, options, (base, silent, names)) for name, tree in trees]
    print(report(figures, options, command.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
