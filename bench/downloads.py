"""Download benchmark: statusd's engine against curl and aria2c (and httpx as-is), one run.

Not a test. Cases:

- (a) one large file (1 GiB by default): throughput, MB/s (10^6 bytes per second);
- (b) many small files (2,000 of 16 KiB by default), 16 at a time: files/s.

Every contender fetches the same files from the same local server: nginx when it is
installed (or can be: as root, ``apt-get install -y aria2 nginx-light``), else a small
asyncio ``sendfile`` server in this file. Files land in ``--dest`` (by default a fresh
directory on /dev/shm, so the numbers are about the clients and not about the disk; pass a
directory on a real disk to see what statusd's fsyncs cost there). Rounds are interleaved
(every contender once per round, in rotating order) because a shared machine drifts; the
report gives the median and the best of the rounds, and the ratios the goals are stated in:
(a) statusd / curl, (b) statusd / aria2c.

How each is timed:

- curl and aria2c: the wall time of the whole process (their start-up is a few ms);
- statusd and httpx: inside a fresh Python process, from before the first request to the
  last file done, so interpreter start-up and imports are not counted: statusd is a
  long-running daemon. statusd uses ``download_items`` with default ``DownloadSettings``
  (fsync of every file and of its directory, link-not-overwrite, ``.part`` files); the
  "statusd +sha256" row hashes every file (``sha256_always=True``);
- httpx: ``httpx.AsyncClient`` under trio, ``aiter_raw()``, plain ``write`` per chunk, no
  fsync: the "as-is" baseline that motivated statusd's own client;
- ``statusd.http`` and ``httpx.http`` (not run by default): the HTTP layers alone, bodies
  read and dropped, nothing written: what chose the HTTP layer.

Usage::

    python bench/downloads.py [--big-mib 1024] [--small-count 2000] [--small-kib 16]
                              [--parallel 16] [--repeats 3] [--dest DIR] [--case a|b]
                              [--contenders statusd,statusd+sha256,curl,aria2c,httpx,
                                            statusd.http,httpx.http]
                              [--no-install] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from email.utils import formatdate
from pathlib import Path
from typing import Any

import attrs
from _common import first_line
from _servers import free_port

REPO = Path(__file__).resolve().parent.parent
CONTENDERS = ("statusd", "statusd+sha256", "curl", "aria2c", "httpx")
# HTTP layers alone, for choosing one: bodies are read and dropped, no files are written.
HTTP_ONLY = ("statusd.http", "httpx.http")
READY_TIMEOUT = 20.0
WRITE_BLOCK = 8 << 20


# -- peers: find or install, and say which versions ran ------------------------------------


def find_tools(install: bool) -> dict[str, str | None]:
    """Paths of curl, aria2c and nginx, installing the missing ones with apt-get when
    allowed and running as root."""
    wanted = {"curl": "curl", "aria2c": "aria2", "nginx": "nginx-light"}
    found = {tool: _which(tool) for tool in wanted}
    missing = [package for tool, package in wanted.items() if found[tool] is None]
    if missing and install and os.geteuid() == 0 and shutil.which("apt-get"):
        _say(f"installing {' '.join(missing)} with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        command = ["apt-get", "install", "-y", "-q", *missing]
        if subprocess.run(command, env=env, capture_output=True, check=False).returncode:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
            subprocess.run(command, env=env, capture_output=True, check=False)
        found = {tool: _which(tool) for tool in wanted}
    return found


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/local/sbin")


def versions(tools: dict[str, str | None]) -> dict[str, str]:
    import statusd

    out = {"statusd": statusd.__version__, "python": platform.python_version()}
    for package in ("trio", "h11", "httpx"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[package] = importlib.metadata.version(package)
    if tools["curl"]:
        out["curl"] = first_line([tools["curl"], "--version"])
    if tools["aria2c"]:
        out["aria2c"] = first_line([tools["aria2c"], "--version"])
    if tools["nginx"]:
        out["nginx"] = first_line([tools["nginx"], "-v"]).removeprefix("nginx version: ")
    return out


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / (1 << 20):.1f} GiB"
    return {
        "cpu": f"{cpu}, {os.cpu_count()} logical CPUs",
        "memory": memory,
        "kernel": platform.release(),
        "os": first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
    }


# -- the files and the server --------------------------------------------------------------


@attrs.frozen
class Files:
    root: Path
    big: str  # path under root, as in the URL
    big_bytes: int
    small: tuple[str, ...]
    small_bytes: int


def make_files(root: Path, big_mib: int, small_count: int, small_kib: int) -> Files:
    """Random (incompressible) data; the server's documents, readable by its workers."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    big_bytes = big_mib << 20
    with (root / "big.bin").open("wb") as out:
        left = big_bytes
        while left:
            block = os.urandom(min(WRITE_BLOCK, left))
            out.write(block)
            left -= len(block)
    small_dir = root / "small"
    small_dir.mkdir(exist_ok=True)
    small_dir.chmod(0o755)
    names = []
    for index in range(small_count):
        name = f"small/f{index:05d}.bin"
        (root / name).write_bytes(os.urandom(small_kib << 10))
        names.append(name)
    for path in [root / "big.bin", *(root / name for name in names)]:
        path.chmod(0o644)
    return Files(root, "big.bin", big_bytes, tuple(names), small_kib << 10)


NGINX_CONF = """\
worker_processes {workers};
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    types {{ application/octet-stream bin; }}
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


@contextlib.contextmanager
def serve(files: Files, nginx: str | None, work: Path) -> Iterator[tuple[str, str]]:
    """Yield (base URL, description) of a running server for ``files``."""
    with serve_directory(files.root, nginx, work) as served:
        yield served


@contextlib.contextmanager
def serve_directory(
    root: Path, nginx: str | None, work: Path, *, workers: int | None = None
) -> Iterator[tuple[str, str]]:
    """Yield (base URL, description) of a running server for the files under ``root``:
    nginx with ``workers`` processes (default one a CPU), else a small asyncio server."""
    port = free_port()
    if nginx:
        workers = workers or os.cpu_count() or 1
        conf = work / "nginx.conf"
        conf.write_text(NGINX_CONF.format(workers=workers, work=work, port=port, root=root))
        command = [nginx, "-p", str(work), "-e", str(work / "error.log"), "-c", str(conf)]
        version = first_line([nginx, "-v"]).removeprefix("nginx version: ")
        description = f"{version}, {workers} workers, sendfile, keep-alive"
    else:
        command = [sys.executable, __file__, "--serve", str(root), "--port", str(port)]
        description = "asyncio sendfile server in bench/downloads.py (nginx not available)"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_port(port, process)
        yield f"http://127.0.0.1:{port}", description
    finally:
        process.send_signal(signal.SIGQUIT if nginx else signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _wait_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise SystemExit(f"server exited early: {stderr.strip()}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit("server did not start listening")


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, root: Path) -> None:
    """The fallback server: GET of a file under root, keep-alive, sendfile."""
    loop = asyncio.get_running_loop()
    sock = writer.get_extra_info("socket")
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1].decode()
            path = (root / target.lstrip("/")).resolve()
            if not path.is_relative_to(root) or not path.is_file():
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                continue
            size = path.stat().st_size
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                + f"Content-Length: {size}\r\nDate: {formatdate(usegmt=True)}\r\n\r\n".encode()
            )
            await writer.drain()
            with path.open("rb") as body:
                await loop.sock_sendfile(sock, body)
    except (asyncio.IncompleteReadError, ConnectionError, IndexError):
        pass
    finally:
        writer.close()


def serve_fallback(root: Path, port: int) -> None:
    async def main() -> None:
        server = await asyncio.start_server(
            lambda r, w: _handle(r, w, root.resolve()), "127.0.0.1", port, backlog=1024
        )
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


# -- the contenders ------------------------------------------------------------------------


@attrs.frozen
class Run:
    seconds: float
    cpu_seconds: float


def run_curl(curl: str, base: str, files: Files, case: str, dest: Path, parallel: int) -> Run:
    if case == "a":
        command = [curl, "-sS", "--fail", "-o", str(dest / "big.bin"), f"{base}/{files.big}"]
    else:
        config = dest.parent / "curl-urls.cfg"
        config.write_text("".join(f'url = "{base}/{name}"\n' for name in files.small))
        command = [
            curl, "-sS", "--fail", "--parallel", "--parallel-max", str(parallel),
            "--remote-name-all", "--output-dir", str(dest), "-K", str(config),
        ]  # fmt: skip
    return timed_process(command)


def run_aria2c(aria2c: str, base: str, files: Files, case: str, dest: Path, parallel: int) -> Run:
    common = [
        aria2c, "-q", "--file-allocation=none", "--allow-overwrite=true",
        "--auto-file-renaming=false", "-d", str(dest),
    ]  # fmt: skip
    if case == "a":
        command = [*common, "-o", "big.bin", f"{base}/{files.big}"]
    else:
        listing = dest.parent / "aria2c-urls.txt"
        listing.write_text("".join(f"{base}/{name}\n" for name in files.small))
        command = [*common, "-j", str(parallel), "-i", str(listing)]
    return timed_process(command)


def timed_process(command: list[str]) -> Run:
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
        raise SystemExit(f"{shlex.join(command[:3])} ... failed: {stderr.strip()[:500]}")
    if process.stderr:
        process.stderr.close()
    return Run(elapsed, usage.ru_utime + usage.ru_stime)


def run_in_python(
    contender: str, base: str, files: Files, case: str, dest: Path, parallel: int
) -> Run:
    """statusd or httpx in a fresh interpreter; it times itself (see the docstring)."""
    urls = [f"{base}/{files.big}"] if case == "a" else [f"{base}/{n}" for n in files.small]
    listing = dest.parent / "python-urls.json"
    listing.write_text(json.dumps(urls))
    command = [
        sys.executable, __file__, "--client", contender, "--urls", str(listing),
        "--into", str(dest), "--parallel", str(parallel),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{contender} failed: {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return Run(result["seconds"], result["cpu_seconds"])


def client_main(contender: str, urls_file: Path, dest: Path, parallel: int) -> None:
    """Runs in the child process: download, then print one JSON line with the timing."""
    import trio

    urls: list[str] = json.loads(urls_file.read_text())

    async def main() -> float:
        if contender in HTTP_ONLY:
            return await _http_only(contender, urls, parallel)
        if contender.startswith("statusd"):
            return await _statusd_client(urls, dest, parallel, contender == "statusd+sha256")
        return await _httpx_client(urls, dest, parallel)

    cpu_before = _cpu_self()
    seconds = trio.run(main)
    print(json.dumps({"seconds": seconds, "cpu_seconds": _cpu_self() - cpu_before}))


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _statusd_client(urls: list[str], dest: Path, parallel: int, sha256: bool) -> float:
    from statusd.downloads import DownloadItem, DownloadSettings, download_items, make_client

    settings = DownloadSettings(sha256_always=sha256)
    items = [DownloadItem(url) for url in urls]
    async with make_client(settings) as client:
        started = time.monotonic()
        results = await download_items(client, items, dest, settings, concurrency=parallel)
        elapsed = time.monotonic() - started
    failed = [result for result in results if result.error]
    if failed:
        raise SystemExit(f"{len(failed)} downloads failed, first: {failed[0].error}")
    return elapsed


async def _http_only(contender: str, urls: list[str], parallel: int) -> float:
    """The HTTP layer alone: every body read (in 1 MiB pieces where it can) and dropped."""
    import trio

    pending = iter(urls)

    async def statusd_worker(client: Any) -> None:
        buffer = memoryview(bytearray(1 << 20))
        for url in pending:
            async with client.stream("GET", url) as response:
                while await response.receive_into(buffer):
                    pass

    async def httpx_worker(client: Any) -> None:
        for url in pending:
            async with client.stream("GET", url) as response:
                async for _ in response.aiter_raw(1 << 20):
                    pass

    if contender == "statusd.http":
        from statusd.downloads.http import HTTPClient

        client: Any = HTTPClient()
        worker = statusd_worker
    else:
        import httpx

        limits = httpx.Limits(max_connections=parallel, max_keepalive_connections=parallel)
        client = httpx.AsyncClient(limits=limits)
        worker = httpx_worker
    async with client:
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            for _ in range(min(parallel, len(urls))):
                nursery.start_soon(worker, client)
        return time.monotonic() - started


async def _httpx_client(urls: list[str], dest: Path, parallel: int) -> float:
    import httpx
    import trio

    limits = httpx.Limits(max_connections=parallel, max_keepalive_connections=parallel)
    pending = iter(urls)

    async def worker(client: httpx.AsyncClient) -> None:
        for url in pending:
            async with client.stream("GET", url) as response:
                response.raise_for_status()
                with (dest / url.rsplit("/", 1)[1]).open("wb") as out:
                    async for chunk in response.aiter_raw():
                        out.write(chunk)

    async with httpx.AsyncClient(limits=limits) as client:
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            for _ in range(min(parallel, len(urls))):
                nursery.start_soon(worker, client)
        return time.monotonic() - started


# -- running and reporting -------------------------------------------------------------------


@attrs.frozen
class Options:
    big_mib: int
    small_count: int
    small_kib: int
    parallel: int
    repeats: int
    cases: tuple[str, ...]
    contenders: tuple[str, ...]
    dest: Path | None
    install: bool
    markdown: bool


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _clear(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)


def _check(case: str, files: Files, dest: Path) -> None:
    """Every contender must really have produced the files (right sizes)."""
    if case == "a":
        got = sorted(path.stat().st_size for path in dest.iterdir())
        if got != [files.big_bytes]:
            raise SystemExit(f"case a produced {got} bytes, not [{files.big_bytes}]")
        return
    sizes = [path.stat().st_size for path in dest.iterdir()]
    if len(sizes) != len(files.small) or set(sizes) != {files.small_bytes}:
        raise SystemExit(f"case b produced {len(sizes)} files of sizes {set(sizes)}")


def benchmark(
    opts: Options, tools: dict[str, str | None], base: str, files: Files, work: Path
) -> dict[str, dict[str, list[Run]]]:
    dest_root = opts.dest or _default_dest_root(files)
    dest_root.mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix="dl-bench-", dir=dest_root)) / "out"
    results: dict[str, dict[str, list[Run]]] = {}
    try:
        for case in opts.cases:
            results[case] = {name: [] for name in opts.contenders}
            for round_number in range(opts.repeats):
                shift = round_number % len(opts.contenders)
                order = opts.contenders[shift:] + opts.contenders[:shift]
                for name in order:
                    _clear(dest)
                    run = _run_one(name, tools, base, files, case, dest, opts.parallel)
                    if name not in HTTP_ONLY:
                        _check(case, files, dest)
                    results[case][name].append(run)
                    _say(f"case {case} round {round_number + 1}: {name:15} {run.seconds:7.3f} s")
            _clear(dest)
    finally:
        shutil.rmtree(dest.parent, ignore_errors=True)
    return results


def _default_dest_root(files: Files) -> Path:
    needed = files.big_bytes + len(files.small) * files.small_bytes
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 2 * needed:
        return shm
    return Path(tempfile.gettempdir())


def _run_one(
    name: str,
    tools: dict[str, str | None],
    base: str,
    files: Files,
    case: str,
    dest: Path,
    parallel: int,
) -> Run:
    if name == "curl":
        assert tools["curl"]
        return run_curl(tools["curl"], base, files, case, dest, parallel)
    if name == "aria2c":
        assert tools["aria2c"]
        return run_aria2c(tools["aria2c"], base, files, case, dest, parallel)
    return run_in_python(name, base, files, case, dest, parallel)


def report(
    opts: Options,
    results: dict[str, dict[str, list[Run]]],
    files: Files,
    header: dict[str, str],
) -> str:
    lines = [f"- {key}: {value}" for key, value in header.items()]
    titles = {
        "a": f"(a) one {files.big_bytes >> 20} MiB file",
        "b": f"(b) {len(files.small)} files of {files.small_bytes >> 10} KiB, "
        f"{opts.parallel} at a time",
    }
    for case, runs in results.items():
        unit = "MB/s" if case == "a" else "files/s"
        amount = files.big_bytes / 1e6 if case == "a" else len(files.small)
        reference = "curl" if case == "a" else "aria2c"
        rates = {
            name: (amount / statistics.median(r.seconds for r in rs), amount / _best(rs))
            for name, rs in runs.items()
        }
        lines += ["", f"### {titles[case]}", ""]
        lines += [
            f"| contender | median s | best s | {unit} (median) | {unit} (best) "
            f"| CPU s (median) | vs {reference} (median) | vs {reference} (best) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, rs in runs.items():
            median_rate, best_rate = rates[name]
            versus = rates.get(reference)
            lines.append(
                f"| {name} | {statistics.median(r.seconds for r in rs):.3f} "
                f"| {_best(rs):.3f} | {median_rate:,.0f} | {best_rate:,.0f} "
                f"| {statistics.median(r.cpu_seconds for r in rs):.2f} "
                f"| {_ratio(median_rate, versus[0] if versus else None)} "
                f"| {_ratio(best_rate, versus[1] if versus else None)} |"
            )
    text = "\n".join(lines)
    if not opts.markdown:
        text = text.replace("### ", "").replace("|---|---:|---:|---:|---:|---:|---:|---:|\n", "")
    return text


def _best(runs: Sequence[Run]) -> float:
    return min(run.seconds for run in runs)


def _ratio(value: float, reference: float | None) -> str:
    return "" if reference is None else f"{value / reference:.2f}x"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--small-count", type=int, default=2000)
    parser.add_argument("--small-kib", type=int, default=16)
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", choices=("a", "b"), action="append")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--dest", type=Path, help="where files land (default: /dev/shm)")
    parser.add_argument("--data-dir", type=Path, help="where the served files are made")
    parser.add_argument("--no-install", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    # internal modes: the fallback server, and a Python contender in its own process
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--urls", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--into", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.serve:
        serve_fallback(args.serve, args.port)
        return 0
    if args.client:
        client_main(args.client, args.urls, args.into, args.parallel)
        return 0
    tools = find_tools(install=not args.no_install)
    contenders = tuple(name for name in args.contenders.split(",") if name)
    unknown = set(contenders) - set(CONTENDERS) - set(HTTP_ONLY)
    if unknown:
        known = CONTENDERS + HTTP_ONLY
        raise SystemExit(f"--contenders: unknown {sorted(unknown)}; known: {known}")
    for tool in ("curl", "aria2c"):
        if tool in contenders and tools[tool] is None:
            _say(f"{tool} not found and not installable: left out")
            contenders = tuple(name for name in contenders if name != tool)
    if not _importable("httpx"):
        contenders = tuple(name for name in contenders if not name.startswith("httpx"))
    opts = Options(
        big_mib=args.big_mib,
        small_count=args.small_count,
        small_kib=args.small_kib,
        parallel=args.parallel,
        repeats=args.repeats,
        cases=tuple(args.case or ("a", "b")),
        contenders=contenders,
        dest=args.dest,
        install=not args.no_install,
        markdown=args.markdown,
    )
    work = Path(tempfile.mkdtemp(prefix="statusd-dl-bench-", dir=args.data_dir))
    work.chmod(0o755)
    try:
        _say("making the files")
        files = make_files(work / "www", opts.big_mib, opts.small_count, opts.small_kib)
        with serve(files, tools["nginx"], work) as (base, server):
            header = {
                **machine(),
                **{f"{name} version": text for name, text in versions(tools).items()},
                "server": server,
                "dest": str(opts.dest or _default_dest_root(files)),
                "rounds": f"{opts.repeats}, interleaved",
                "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            }
            results = benchmark(opts, tools, base, files, work)
        print(report(opts, results, files, header))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
