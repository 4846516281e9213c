"""What every benchmark reports about where it ran: the CPU model, a tool's version line.

Imported by the scripts in this directory (``python bench/NAME.py`` puts it on the path).
"""

from __future__ import annotations

import contextlib
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path


def first_line(command: Sequence[str]) -> str:
    """The first line ``command`` prints (stdout, else stderr), or ``"unknown"``."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"
