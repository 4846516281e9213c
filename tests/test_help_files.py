"""The help that ships: the man pages and shell completions under ``share/`` name every
command and flag of statusctl and statusd, are what tools/build_share.py makes from the
argparse parsers now (so a changed flag cannot ship with stale help), and ``statusctl
completion`` prints the same scripts. The scripts parse in their shells (bash always; zsh
and fish when installed) and the pages render with ``man`` when it is there.
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from statusctl.cli import build_parser as build_statusctl_parser
from statusctl.cli import main
from statusctl.completion import INSTALL_PATHS, SHELLS, completion_script
from statusd.cli import build_parser as build_statusd_parser
from tools.build_share import SHARE, generated

PARSERS = {"statusctl": build_statusctl_parser, "statusd": build_statusd_parser}
# A changed command, flag or help text needs the files made again.
REMAKE = "share/ is out of date: pip install -e '.[test]' && python tools/build_share.py"


def _commands_and_flags(parser: argparse.ArgumentParser) -> tuple[set[str], set[str]]:
    """Every (sub)command name and every option string a user can see, at any depth."""
    commands: set[str] = set()
    flags: set[str] = set()
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        flags.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for name, nested in action.choices.items():
                commands.add(name)
                more_commands, more_flags = _commands_and_flags(nested)
                commands |= more_commands
                flags |= more_flags
    return commands, flags


def test_the_walk_finds_nested_actions_and_their_flags() -> None:
    commands, flags = _commands_and_flags(build_statusctl_parser())
    assert {"download", "completion", "notifications", "read", "token", "revoke"} <= commands
    assert {"-i", "--input-file", "--dest", "--expires-in", "--read", "--program"} <= flags
    assert "-h" in flags


def _unnamed(names: set[str], text: str) -> list[str]:
    """The names that do not appear in ``text`` as a whole word (``-i``, not ``-if``)."""
    return sorted(
        name for name in names if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)
    )


def _man_text(page: str) -> str:
    """The page less roff's escapes: hyphens (``\\-``), fonts (``\\fB``) and spacing."""
    return re.sub(r"\\f[BIRP]|\\[,/]", "", page.replace("\\-", "-"))


@pytest.mark.parametrize("program", sorted(PARSERS))
def test_the_man_page_names_every_command_and_flag(program: str) -> None:
    page = _man_text((SHARE / "man" / "man1" / f"{program}.1").read_text())
    commands, flags = _commands_and_flags(PARSERS[program]())
    # --help is what the page is instead of.
    assert _unnamed(commands | flags - {"-h", "--help"}, page) == [], REMAKE
    assert page.startswith(f'.TH {program.upper()} "1"')


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("program", sorted(PARSERS))
def test_each_completion_names_every_command_and_flag(program: str, shell: str) -> None:
    script = (SHARE / INSTALL_PATHS[shell].format(program=program)).read_text()
    commands, flags = _commands_and_flags(PARSERS[program]())
    # fish names a long flag without its dashes (-l input-file), a short one as -s i.
    spelled = {flag.lstrip("-") for flag in flags} if shell == "fish" else flags
    assert _unnamed(commands | spelled, script) == [], REMAKE


def _last_line(text: str) -> str:
    return text.rstrip("\n").rsplit("\n", 1)[-1]


def _same_tools(shipped: str, made: str) -> None:
    """Skips, saying why, when the shipped file was made by another version of its tool
    or of Python: their wording may differ for the same parser, and that is no bug."""
    if _last_line(shipped) != _last_line(made):
        pytest.skip(
            f"share/ was {_last_line(shipped)[2:].strip()}; here it would be "
            f"{_last_line(made)[2:].strip()}: python tools/build_share.py brings it up to date"
        )


def test_share_holds_exactly_what_build_share_makes_now() -> None:
    expected = generated()
    for name, text in expected.items():
        _same_tools((SHARE / name).read_text(), text)
    stale = [name for name, text in expected.items() if (SHARE / name).read_text() != text]
    assert stale == [], REMAKE
    present = {str(path.relative_to(SHARE)) for path in SHARE.rglob("*") if path.is_file()}
    assert present == set(expected)


def test_the_wheel_installs_every_file_in_share() -> None:
    """pyproject.toml's data-files list them one by one: a new one must be added there."""
    import tomllib

    pyproject = tomllib.loads((SHARE.parent / "pyproject.toml").read_text())
    listed = pyproject["tool"]["setuptools"]["data-files"]
    installed = {
        Path(source).relative_to("share") for sources in listed.values() for source in sources
    }
    for target, sources in listed.items():
        assert all(str(Path(source).parent) == target for source in sources)
    assert {str(path) for path in installed} == set(generated())


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("program", sorted(PARSERS))
def test_statusctl_completion_prints_the_shipped_script(program: str, shell: str) -> None:
    out = io.StringIO()
    assert main(["completion", shell, "--program", program], stdout=out) == 0
    shipped = (SHARE / INSTALL_PATHS[shell].format(program=program)).read_text()
    _same_tools(shipped, out.getvalue())
    assert out.getvalue() == shipped, REMAKE


def test_completion_offers_files_and_directories_for_path_flags() -> None:
    bash = completion_script(build_statusctl_parser(), "bash")
    assert "_shtab_statusctl_download__i_COMPGEN=_shtab_compgen_files" in bash
    assert "_shtab_statusctl_download___dest_COMPGEN=_shtab_compgen_dirs" in bash


def test_completion_of_an_unknown_shell_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["completion", "tcsh"]) == 2
    assert "invalid choice: 'tcsh'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="shell must be one of bash, zsh, fish, not 'csh'"):
        completion_script(build_statusctl_parser(), "csh")


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("program", sorted(PARSERS))
def test_each_script_parses_in_its_shell(program: str, shell: str) -> None:
    binary = shutil.which(shell)
    if binary is None:
        pytest.skip(f"{shell} is not installed, so its script is not parsed here")
    path = SHARE / INSTALL_PATHS[shell].format(program=program)
    done = subprocess.run(
        [binary, "-n", str(path)], capture_output=True, text=True, timeout=30, check=False
    )
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize("program", sorted(PARSERS))
def test_each_page_renders_without_warnings(program: str) -> None:
    man = shutil.which("man")
    if man is None:
        pytest.skip("man is not installed, so the page is not rendered here")
    done = subprocess.run(
        [man, "--warnings", "-l", str(SHARE / "man" / "man1" / f"{program}.1")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"PATH": "/usr/bin:/bin", "MANWIDTH": "80", "LANG": "C.UTF-8"},
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert f"{program} - " in done.stdout
