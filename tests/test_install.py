"""Install as the README says, then the README works: its "Install and run" commands, run
one by one from a clean clone into an empty home directory, put ``statusd`` and
``statusctl`` where the user unit and every later command expect them, start the daemon,
and ``statusctl info`` answers (exit 0). The units, the README, docs/systemd.md and pipx's
own defaults name the same directories.

The commands are read from README.md itself, so the test and the README cannot drift apart.
pipx comes with the test extra; pip's cache and index settings are the runner's, so the
install reuses what is already downloaded. As root the daemon would take the system's paths
(/run/statusd, /var/lib/statusd), so it is given a runtime and a state directory of its own
the way systemd gives a service one (``RUNTIME_DIRECTORY``, ``STATE_DIRECTORY``); as anyone
else it gets the per-user defaults under the temporary home and ``XDG_RUNTIME_DIR``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from statusd.config import default_socket_path
from tests.conftest import accepts_connections

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SYSTEM_UNIT = REPO / "contrib" / "systemd" / "statusd.service"
USER_UNIT = REPO / "contrib" / "systemd" / "user" / "statusd.service"
INSTALL_TIMEOUT = 300.0  # a cold pip cache downloads the dependencies; warm, about 5 s
READY_TIMEOUT = 30.0

# What a clean clone leaves out: what .gitignore lists, and .git itself.
_IGNORED = shutil.ignore_patterns(
    ".git",
    ".venv",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".hypothesis",
    "build",
    "dist",
    "*.whl",
)


def _not_in_a_clone(directory: str, names: list[str]) -> set[str]:
    """Besides those: sockets and such, and the runner's own home and runtime directory
    when they lie inside the checkout (.ci/run's copy for a normal user has both)."""
    ignored = set(_IGNORED(directory, names))
    runner = {os.environ.get(key) for key in ("HOME", "XDG_RUNTIME_DIR")}
    for name in names:
        path = os.path.join(directory, name)
        if path in runner or not (os.path.isfile(path) or os.path.isdir(path)):
            ignored.add(name)
    return ignored


def readme_commands(text: str, heading: str = "## Install and run") -> list[str]:
    """The lines of the first ``sh`` block after ``heading``, comments left out."""
    after = text[text.index(heading) :]
    block = re.search(r"```sh\n(.*?)```", after, re.DOTALL)
    assert block is not None, f"no sh block after {heading!r} in README.md"
    lines = (line.split("  #")[0].strip() for line in block[1].splitlines())
    return [line for line in lines if line]


def test_readme_commands_are_install_start_and_ask() -> None:
    commands = readme_commands(README.read_text())
    assert commands == ["pipx install .", "statusd", "statusctl info"]


def _exec_start(unit: Path) -> str:
    [line] = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    return line.removeprefix("ExecStart=")


def test_units_readme_docs_and_pipx_name_the_same_directories() -> None:
    paths = pytest.importorskip("pipx.paths", reason="pipx is not installed (the test extra)")
    system = Path(_exec_start(SYSTEM_UNIT))
    assert system == Path(paths.DEFAULT_PIPX_GLOBAL_BIN_DIR) / "statusd"
    user = _exec_start(USER_UNIT)
    assert user == "%h/.local/bin/statusd"
    assert Path(paths.DEFAULT_PIPX_BIN_DIR) == Path.home() / ".local" / "bin"
    readme, systemd_doc = README.read_text(), (REPO / "docs" / "systemd.md").read_text()
    assert "sudo pipx install --global ." in readme
    assert "pipx install --global ." in systemd_doc
    for text in (readme, systemd_doc):
        assert "/usr/bin/statusd" not in text.replace("/usr/local/bin/statusd", "")
        assert str(system) in text or "/usr/local/bin" in text


def _pipx() -> str:
    # The test extra installs it beside this interpreter; a system one will do as well.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("pipx", path=path)
    if found is None:
        pytest.skip("pipx is not installed: pip install '.[test]' brings it")
    return found


def _clean_clone(target: Path) -> None:
    if (REPO / ".git").exists() and shutil.which("git") is not None:
        subprocess.run(
            ["git", "clone", "--quiet", str(REPO), str(target)],
            check=True,
            capture_output=True,
            timeout=120,
        )
    else:  # a copy of a checkout without its .git (as .ci/run makes for a normal user)
        shutil.copytree(REPO, target, ignore=_not_in_a_clone, symlinks=True)


def _pip_cache() -> str:
    if "PIP_CACHE_DIR" in os.environ:
        return os.environ["PIP_CACHE_DIR"]
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(cache_home, "pip")


@pytest.fixture
def place() -> Iterator[Path]:
    # Short: the socket path below it must fit in 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="sd-inst-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _environment(place: Path, pipx: str) -> dict[str, str]:
    home, run = place / "home", place / "run"
    home.mkdir()
    run.mkdir(mode=0o700)
    env = {
        "HOME": str(home),
        "PATH": os.pathsep.join(
            [str(home / ".local" / "bin"), str(Path(pipx).parent), "/usr/local/bin:/usr/bin:/bin"]
        ),
        "LANG": "C.UTF-8",
        "XDG_RUNTIME_DIR": str(run),  # what a login session gives
        "PIP_CACHE_DIR": _pip_cache(),
    }
    # The runner's pip settings (an index, find-links, a certificate), nothing else of its.
    env |= {key: value for key, value in os.environ.items() if key.startswith("PIP_")}
    env.pop("PIP_USER", None)
    if os.getuid() == 0:
        env["RUNTIME_DIRECTORY"] = str(run / "statusd")
        env["STATE_DIRECTORY"] = str(place / "state")
    return env


def _run(command: str, clone: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        check=False,
    )


def test_install_as_the_readme_says_then_statusctl_info_works(place: Path) -> None:
    pipx = _pipx()
    install, start, ask = readme_commands(README.read_text())
    clone = place / "clone"
    _clean_clone(clone)
    env = _environment(place, pipx)
    home = Path(env["HOME"])

    installed = _run(install, clone, env)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    # Where the user unit runs statusd from, and where every later command finds statusctl.
    assert Path(_exec_start(USER_UNIT).replace("%h", str(home))).is_file()
    assert (home / ".local" / "bin" / "statusctl").is_file()
    share = home / ".local" / "share"
    assert (share / "man" / "man1" / "statusctl.1").is_file()
    assert (share / "man" / "man1" / "statusd.1").is_file()
    assert (share / "bash-completion" / "completions" / "statusctl").is_file()
    assert (share / "fish" / "vendor_completions.d" / "statusctl.fish").is_file()
    # The dashboard's files are package data: in the wheel, or the page is a 500 away.
    python = (home / ".local" / "bin" / "statusd").read_text().splitlines()[0].removeprefix("#!")
    files = _run(
        f"{python} -c 'import importlib.resources as r; "
        'print(sorted(p.name for p in r.files("statusd.web").iterdir()))\'',
        place,
        env,
    )
    assert files.returncode == 0, files.stderr
    for name in ("index.html", "dashboard.js", "dashboard.css"):
        assert f"'{name}'" in files.stdout

    with (place / "statusd.log").open("w") as log:
        daemon = subprocess.Popen(
            ["bash", "-c", f"exec {start}"],
            cwd=clone,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        socket = default_socket_path(env, os.getuid())
        deadline = time.monotonic() + READY_TIMEOUT
        while not (socket.exists() and accepts_connections(socket)):
            assert daemon.poll() is None, (place / "statusd.log").read_text()
            assert time.monotonic() < deadline, "statusd did not listen on " + str(socket)
            time.sleep(0.05)

        answered = _run(ask, clone, env)
        assert answered.returncode == 0, answered.stderr
        assert f"pid:        {daemon.pid}\n" in answered.stdout
        assert f"socket:     {socket}\n" in answered.stdout
        completion = _run("statusctl completion bash", clone, env)
        assert completion.returncode == 0, completion.stderr
        assert completion.stdout == (share / "bash-completion/completions/statusctl").read_text()
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait(15)
