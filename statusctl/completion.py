"""Shell completion scripts for ``statusctl`` and ``statusd``, made by shtab from their
argparse parsers, so they list exactly the commands and flags the programs accept.

``statusctl completion SHELL`` prints one; ``tools/build_share.py`` writes the same text
into ``share/`` for the wheel, where pipx links it for the shells to find.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

SHELLS = ("bash", "zsh", "fish")

# Where each shell looks for a program's completion (under a data directory such as
# ~/.local/share or /usr/local/share), and the file name it expects there.
INSTALL_PATHS = {
    "bash": "bash-completion/completions/{program}",
    "zsh": "zsh/site-functions/_{program}",
    "fish": "fish/vendor_completions.d/{program}.fish",
}


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``parser``'s program in ``shell`` (one of ``SHELLS``)."""
    # Imported here: statusctl imports this module on every start, and only this needs it.
    import shtab

    if shell not in SHELLS:
        raise ValueError(f"shell must be one of {', '.join(SHELLS)}, not {shell!r}")
    # What a flag's value is, by the metavar it shows: the shell offers files or directories.
    _mark_paths(parser, {"PATH": shtab.FILE, "FILE": shtab.FILE, "DIR": shtab.DIRECTORY})
    script: str = shtab.complete(parser, shell=shell)
    # Last, not first: zsh reads its first line (#compdef) to know what the file completes.
    return script.rstrip("\n") + "\n" + made_by("shtab", shtab.__version__, parser.prog, "#")


def made_by(tool: str, version: str, program: str, comment: str) -> str:
    """The comment line ending a generated file: what made it, from which parser. Another
    tool version or Python (argparse) may word the same parser differently."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return f"{comment} made by {tool} {version} on Python {python} from {program}'s parser\n"


def _mark_paths(parser: argparse.ArgumentParser, kinds: dict[str, Any]) -> None:
    for action in parser._actions:
        if isinstance(action.metavar, str) and action.metavar in kinds:
            action.complete = kinds[action.metavar]  # type: ignore[attr-defined]
        if isinstance(action, argparse._SubParsersAction):
            for nested in action.choices.values():
                _mark_paths(nested, kinds)
