"""sd_notify(3) through the sdnotify package: readiness and stopping.

Without ``NOTIFY_SOCKET`` every call is a no-op, so the daemon behaves the same under a
terminal, a test and systemd.
"""

from __future__ import annotations

import logging
import os

import sdnotify

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self) -> None:
        self._notifier = sdnotify.SystemdNotifier() if os.environ.get("NOTIFY_SOCKET") else None

    @property
    def enabled(self) -> bool:
        return self._notifier is not None

    def notify(self, *states: str) -> None:
        if self._notifier is None:
            return
        self._notifier.notify("\n".join(states))

    def ready(self, status: str = "") -> None:
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self) -> None:
        self.notify("STOPPING=1")
