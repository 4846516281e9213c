"""Write the man pages and shell completions under ``share/`` from the argparse parsers.

    python tools/build_share.py            # (re)write them
    python tools/build_share.py --check    # exit 1, naming them, if any is out of date

The wheel installs ``share/`` into its data scheme (``pyproject.toml``,
``[tool.setuptools.data-files]``), where pipx links the man pages into ``~/.local/share/man``
and the completions into ``~/.local/share`` (``/usr/local/share`` with ``--global``). The
pages come from argparse-manpage, the completions from shtab (``statusctl completion``
prints the same text); ``pip install '.[docs]'`` brings the first. tests/test_help_files.py
fails while a file here is out of date, so a changed flag cannot ship with stale help.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from argparse_manpage.manpage import Manpage

from statusctl import __version__
from statusctl.cli import build_parser as build_statusctl_parser
from statusctl.completion import INSTALL_PATHS, SHELLS, completion_script, made_by
from statusd.cli import build_parser as build_statusd_parser

SHARE = Path(__file__).resolve().parent.parent / "share"

PROGRAMS: dict[str, tuple[Callable[[], argparse.ArgumentParser], str, str]] = {
    "statusctl": (
        build_statusctl_parser,
        "control and watch statusd",
        ".BR statusd (1)",
    ),
    "statusd": (
        build_statusd_parser,
        "a download and status daemon with a JSON-RPC control socket",
        ".BR statusctl (1),\n.BR systemctl (1);\nthe unit files in contrib/systemd/",
    ),
}


def man_page(program: str) -> str:
    build, summary, see_also = PROGRAMS[program]
    page = Manpage(
        build(),
        {
            "description": summary,
            "project_name": "statusd",
            "version": __version__,
            "manual_title": "statusd manual",
        },
    )
    # No date: the page changes with the parser, not with the day it was built on.
    page.date = ""
    page.add_section("see also", ">", see_also)
    tool_version = metadata.version("argparse-manpage")
    return str(page) + made_by("argparse-manpage", tool_version, program, '.\\"')


def generated() -> dict[str, str]:
    """Each file's path under ``share/`` and its text."""
    files = {f"man/man1/{program}.1": man_page(program) for program in PROGRAMS}
    for program, (build, _summary, _see_also) in PROGRAMS.items():
        for shell in SHELLS:
            path = INSTALL_PATHS[shell].format(program=program)
            files[path] = completion_script(build(), shell)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say what is out of date")
    args = parser.parse_args(argv)
    stale = []
    for name, text in generated().items():
        path = SHARE / name
        if path.exists() and path.read_text() == text:
            continue
        stale.append(name)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check and stale:
        print(f"out of date in {SHARE}: {', '.join(stale)}", file=sys.stderr)
        print("run: python tools/build_share.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
