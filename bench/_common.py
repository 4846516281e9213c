"""What every benchmark reports about where it ran (the CPU model, a tool's version line),
and the tally of an interleaved A/B run.

Imported by the scripts in this directory (``python bench/NAME.py`` puts it on the path).
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
from collections.abc import Iterable, Sequence
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


class ABTally:
    """Rates and daemon CPU per unit of work, for each row and side of an A/B run; prints
    each round as it ends and the medians at the end (bench/ab_files.py, bench/ab_info.py)."""

    def __init__(self, rows: Iterable[str], sides: Iterable[str], unit: str) -> None:
        self.sides = tuple(sides)
        self.unit = unit
        self.rates: dict[tuple[str, str], list[float]] = {
            (row, side): [] for row in rows for side in sides
        }
        self.cpu: dict[tuple[str, str], list[float]] = {key: [] for key in self.rates}

    def add(self, row: str, side: str, count: int, seconds: float, cpu_seconds: float) -> None:
        self.rates[row, side].append(count / seconds)
        self.cpu[row, side].append(cpu_seconds / count * 1e6)

    def print_round(self, number: int) -> None:
        shown = ", ".join(f"{r} {s} {self.rates[r, s][-1]:,.0f}" for r, s in self.rates)
        print(f"round {number + 1} (load {os.getloadavg()[0]:.1f}): {shown}", flush=True)

    def print_medians(self, cpu_digits: int) -> None:
        rows = dict.fromkeys(row for row, _ in self.rates)
        for row in rows:
            base, other = (statistics.median(self.rates[row, side]) for side in self.sides)
            cpu_base, cpu_other = (statistics.median(self.cpu[row, side]) for side in self.sides)
            print(
                f"{row}: base {base:,.0f} {self.unit}s/s, other {other:,.0f} {self.unit}s/s, "
                f"other/base {other / base:.2f}x; daemon CPU per {self.unit} "
                f"{cpu_base:.{cpu_digits}f} -> {cpu_other:.{cpu_digits}f} us"
            )
