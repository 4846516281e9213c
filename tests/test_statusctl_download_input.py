"""``statusctl download -i FILE`` (a URL list, ``-`` for stdin) and where a relative
``--dest`` goes: from the caller's current directory when the daemon runs as the caller,
under the caller's own download directory on a shared daemon (checked as uid nobody).

statusctl runs as a real process (as nobody: forked, not exec'd, calling ``main``) against
a real daemon and a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import grp
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from statusctl.cli import UsageError, main, url_list
from statusd.daemon import Daemon, run
from tests.conftest import NOBODY_GID, RawClient, make_config, run_as_nobody
from tests.http_servers import HTTPTestServer, http_server, serve_data

__all__ = ["http_server"]

REPO = Path(__file__).resolve().parent.parent
WAIT = 15.0  # a fresh interpreter has to start; the work itself takes milliseconds


async def statusctl(
    *args: str, stdin: bytes = b"", cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("STATUSD_SOCKET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with trio.fail_after(WAIT):
        done = await trio.run_process(
            [sys.executable, "-m", "statusctl", *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
            cwd=cwd,
        )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


# -- the list itself (pure) ------------------------------------------------------------------


def test_url_list_skips_blank_lines_and_comments() -> None:
    text = "# nightly\n\nhttp://a/1\n  http://a/2  \r\n\t# indented comment\nhttp://a/3#frag\n"
    assert url_list(io.StringIO(text), "f") == ["http://a/1", "http://a/2", "http://a/3#frag"]
    assert url_list(io.StringIO(""), "f") == []


def test_url_list_refuses_two_urls_on_a_line_naming_the_line() -> None:
    with pytest.raises(UsageError) as raised:
        url_list(io.StringIO("http://a/1\n\nhttp://a/2\thttp://b/2\n"), "list.txt")
    assert str(raised.value) == "list.txt, line 3: one URL a line, not 'http://a/2\\thttp://b/2'"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["download"], "no URL: give one or more, or a file of them with -i FILE"),
        (
            ["download", "-i", "/nonexistent/urls.txt"],
            "cannot read the URL list /nonexistent/urls.txt: no such file or directory",
        ),
        (["download", "-i", "/"], "cannot read the URL list /: is a directory"),
        (
            ["download", "--name", "x", "http://a/1", "http://a/2"],
            "--name, --sha256 and --checksum take exactly one URL",
        ),
        (
            ["download", "--checksum", "md5=00", "http://a/1", "http://a/2"],
            "--name, --sha256 and --checksum take exactly one URL",
        ),
    ],
)
def test_usage_errors_say_what_is_wrong_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Found before any connection: the socket named here does not exist.
    assert main(["--socket", "/nonexistent/statusd.sock", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"statusctl: {message}")


def test_a_url_list_that_is_not_text_is_refused(tmp_path: Path) -> None:
    listed = tmp_path / "urls.bin"
    listed.write_bytes(b"http://a/\xff\n")
    err = io.StringIO()
    assert main(["--socket", "/nonexistent/s", "download", "-i", str(listed)], stderr=err) == 2
    assert err.getvalue() == f"statusctl: cannot read the URL list {listed}: it is not UTF-8 text\n"


# -- against a daemon ------------------------------------------------------------------------


def _serve(http_server: HTTPTestServer, *names: str) -> list[str]:
    return [http_server.route(f"/{name}", serve_data(name.encode() * 100)) for name in names]


async def test_urls_from_a_file_stdin_and_arguments_make_one_task(
    daemon: Daemon, http_server: HTTPTestServer, short_tmp: Path
) -> None:
    a, b, c, d = _serve(http_server, "a.txt", "b.txt", "c.txt", "d.txt")
    listed = short_tmp / "urls.txt"
    listed.write_text(f"# two files\n{b}\n\n   {c}\n")
    socket = str(daemon.config.socket)

    done = await statusctl("--socket", socket, "--json", "download", a, "-i", str(listed), "--wait")
    assert done.returncode == 0, done.stderr
    task = json.loads(done.stdout.splitlines()[-1])
    assert [item["url"] for item in task["result"]["items"]] == [a, b, c]

    piped = await statusctl(
        "--socket", socket, "--json", "download", "-i", "-", "--wait", stdin=f"{d}\n".encode()
    )
    assert piped.returncode == 0, piped.stderr
    task = json.loads(piped.stdout.splitlines()[-1])
    assert [item["url"] for item in task["result"]["items"]] == [d]
    downloads = daemon.config.download_dir
    assert sorted(path.name for path in downloads.iterdir()) == ["a.txt", "b.txt", "c.txt", "d.txt"]


async def test_a_list_over_max_items_per_task_gets_the_daemons_error(
    nursery: trio.Nursery, short_tmp: Path
) -> None:
    config = make_config(short_tmp)
    config = attrs.evolve(config, limits=attrs.evolve(config.limits, max_items_per_task=2))
    small: Daemon = await nursery.start(run, config)
    try:
        listed = short_tmp / "urls.txt"
        listed.write_text("".join(f"http://127.0.0.1:9/{n}\n" for n in range(3)))
        done = await statusctl("--socket", str(small.config.socket), "download", "-i", str(listed))
        assert done.returncode == 4
        assert done.stdout == ""
        assert done.stderr == (
            "statusctl: urls has 3 entries, more than a task may have "
            "(limits.max_items_per_task = 2); split it into several tasks\n"
        )
        client = await RawClient.connect(small.config.socket)
        assert (await client.call("tasks.summary"))["total"] == 0
        await client.aclose()
    finally:
        small.request_stop()
        await small.wait_stopped()


@pytest.mark.parametrize("dest", [".", "sub", "sub/../sub2"])
async def test_relative_dest_is_the_callers_directory_when_the_daemon_is_theirs(
    daemon: Daemon, http_server: HTTPTestServer, short_tmp: Path, dest: str
) -> None:
    [url] = _serve(http_server, "here.txt")
    cwd = short_tmp / "work"
    cwd.mkdir()
    done = await statusctl(
        "--socket", str(daemon.config.socket), "download", url, "--dest", dest, "--wait", cwd=cwd
    )
    assert done.returncode == 0, done.stderr
    where = (cwd / dest).resolve()
    assert (where / "here.txt").read_bytes() == b"here.txt" * 100
    assert not (daemon.config.download_dir / "here.txt").exists()


async def test_info_says_whom_the_daemon_runs_as(daemon: Daemon) -> None:
    done = await statusctl("--socket", str(daemon.config.socket), "info")
    assert done.returncode == 0, done.stderr
    assert f"runs as:    uid {os.getuid()}\n" in done.stdout


@pytest.fixture
async def shared_daemon(nursery: trio.Nursery, short_tmp: Path, root_only: None) -> Any:
    nobody_group = grp.getgrgid(NOBODY_GID).gr_name
    config = attrs.evolve(make_config(short_tmp), socket_group=nobody_group)
    handle: Daemon = await nursery.start(run, config)
    yield handle
    handle.request_stop()
    await handle.wait_stopped()


async def test_relative_dest_stays_in_the_callers_download_dir_on_a_shared_daemon(
    shared_daemon: Daemon, short_tmp: Path
) -> None:
    socket = str(shared_daemon.config.socket)
    cwd = short_tmp / "nobody-cwd"
    cwd.mkdir(mode=0o777)
    cwd.chmod(0o777)

    def as_nobody() -> list[Any]:
        os.chdir(cwd)
        out, err = io.StringIO(), io.StringIO()
        # Port 9 (discard) refuses: the task's fate does not matter, only where it points.
        argv = ["--socket", socket, "--json", "download", "http://127.0.0.1:9/x", "--dest", "."]
        status = main(argv, stdout=out, stderr=err)
        return [status, out.getvalue(), err.getvalue()]

    status, out, err = await trio.to_thread.run_sync(run_as_nobody, as_nobody)
    assert (status, err) == (0, "")
    client = await RawClient.connect(shared_daemon.config.socket)
    try:
        task = await client.call("tasks.get", {"task_id": json.loads(out)["task_id"]})
    finally:
        await client.aclose()
    assert task["owner"] == "nobody"
    assert task["metadata"]["dest"] == "nobody"
