"""Logging to stderr: readable lines in a terminal, syslog-prefixed lines for journald.

When stderr is the journal (``JOURNAL_STREAM`` names our stderr), each line starts with
its syslog priority (``<3>`` error ... ``<7>`` debug) and carries no timestamp, since
journald adds its own (sd-daemon(3)).

Every line goes through ``redact_urls_in``: the log is read by admins and support, and a
URL's credentials and query string (a signed link's secret) are its owner's alone.
``EveryInterval`` keeps a failure that repeats many times a second down to one line per
interval.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping
from typing import TextIO

import trio

from statusd.redact import redact_urls_in

_PRIORITIES = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


# A record longer than this (a megabyte of traceback) is cut, like a status message.
MAX_RECORD_CHARS = 1_000_000


class RedactingFormatter(logging.Formatter):
    """A formatter whose lines show URLs redacted (``statusd.redact``), tracebacks too."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_urls_in(super().format(record), limit=MAX_RECORD_CHARS)


class JournalFormatter(RedactingFormatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITIES.get(record.levelno, 6)
        text = super().format(record)
        # Continuation lines (tracebacks) keep the priority, or journald files them as info;
        # an empty message still gets its prefix.
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines() or [""])


def stderr_is_journal(stream: TextIO = sys.stderr, environ: Mapping[str, str] = os.environ) -> bool:
    """True when ``stream`` is the journal stream systemd connected (``JOURNAL_STREAM`` is
    its ``device:inode``); a redirected stderr under systemd is not."""
    value = environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


def setup_logging(level: str, stream: TextIO | None = None) -> None:
    """One handler on the root logger: journald's format when ``stream`` (stderr by
    default) is the journal, else timestamped lines for a terminal or a file."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    if stderr_is_journal(stream):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(
            RedactingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class EveryInterval:
    """Lets a repeated event be logged at most once per ``interval`` seconds of trio's clock.

    ``ready()`` is asked at each occurrence: it returns how many occurrences were kept quiet
    since the last one let through, or None to stay quiet. A failure that repeats ten times
    a second (accept() at the open-files limit) then costs one line per interval, saying
    how many it stands for, instead of filling the journal.
    """

    def __init__(self, interval: float) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0, not {interval}")
        self.interval = interval
        self._next = -math.inf
        self._quiet = 0

    def ready(self) -> int | None:
        now = trio.current_time()
        if now < self._next:
            self._quiet += 1
            return None
        self._next = now + self.interval
        quiet, self._quiet = self._quiet, 0
        return quiet
