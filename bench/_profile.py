"""Where a daemon's time went, from py-spy's raw output (``--idle --threads``, folded stacks).

Imported by bench/run.py, or ``python bench/_profile.py FILE...`` for files recorded before
(several: one summary of their samples together, e.g. one daemon per round of a row).
The event loop is the thread named MainThread; it is idle while it waits in epoll. The
other threads are grouped by name with their numbers dropped (``Trio thread 3`` ->
``Trio thread``).
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

IDLE_FRAMES = ("get_events (trio/_core/_io_epoll.py", "_epoll_wait (trio/_core/_io_epoll.py")
# Frames every sample of the loop passes through: they say nothing about where time goes.
OUTER = ("statusd/__main__.py", "statusd/cli.py", "serve (statusd/daemon.py")
# A worker thread waiting for work is parked in its loop's blocking get or acquire, which
# py-spy shows as the loop itself (the C call has no frame of its own): trio's cache and
# statusd's file-thread pool both call that loop ``_work``.
PARKED_LEAVES = ("._work (", "Condition.wait (")
THREAD = re.compile(r"thread \(\w+\): (.*)")
TOP = 12


def _frames(line: str) -> tuple[str, list[str], int]:
    stack, _, count = line.rpartition(" ")
    first, *frames = stack.split(";")
    match = THREAD.match(first)
    name = re.sub(r"[-\s]\d+$", "", match.group(1) if match else first)
    return name, frames, int(count)


def _name(frame: str) -> str:
    """``function (path:line)`` without the line: one entry per function."""
    return re.sub(r":\d+\)$", ")", frame)


def summarize(*paths: Path) -> str:
    loop_total = loop_idle = 0
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    threads_busy: Counter[str] = Counter()
    text = "\n".join(path.read_text() for path in paths)
    for line in text.splitlines():
        if not line.strip():
            continue
        name, frames, count = _frames(line)
        threads[name] += count
        idle = any(mark in frame for frame in frames for mark in IDLE_FRAMES)
        if name != "MainThread":
            parked = bool(frames) and any(mark in frames[-1] for mark in PARKED_LEAVES)
            threads_busy[name] += 0 if parked or idle else count
            continue
        loop_total += count
        if idle:
            loop_idle += count
            continue
        if frames:
            own[_name(frames[-1])] += count
        ours = {_name(f) for f in frames if "statusd/" in f and not any(o in f for o in OUTER)}
        for frame in ours:
            inclusive[frame] += count
    if not loop_total:
        return f"{', '.join(map(str, paths))}: no samples of the event loop"
    busy = loop_total - loop_idle
    lines = [
        f"event loop (MainThread): {loop_total:,} samples, idle in epoll "
        f"{loop_idle / loop_total:.0%}, working {busy / loop_total:.0%}",
        "other threads (samples, busy = not parked waiting for work): "
        + "; ".join(
            f"{name} {threads[name]:,} ({threads_busy[name]:,} busy)"
            for name in sorted(threads, key=lambda n: -threads[n])
            if name != "MainThread"
        ),
        "",
        "the loop's own time (leaf frames), % of its working samples:",
        *(f"  {count / busy:6.1%}  {frame}" for frame, count in own.most_common(TOP)),
        "",
        "statusd functions on the loop's stack (inclusive), % of its working samples:",
        *(f"  {count / busy:6.1%}  {frame}" for frame, count in inclusive.most_common(TOP)),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(*map(Path, sys.argv[1:])))
