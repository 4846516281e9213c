"""What a notification create costs besides its record: no log line at the default level
(a line per call cost the event loop 11-17 us of a create's ~70), one at debug."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from statusd.channel import StatusChannel
from statusd.events import Streams
from statusd.notifications import open_notifications


async def test_a_create_is_logged_at_debug_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    feed = Streams(StatusChannel()).notifications
    async with open_notifications(tmp_path / "notifications.jsonl", feed) as service:
        with caplog.at_level(logging.INFO, logger="statusd.notifications"):
            await service.create_notification(None, "info", "quiet", "m")
        assert not [r for r in caplog.records if r.name == "statusd.notifications"]
        with caplog.at_level(logging.DEBUG, logger="statusd.notifications"):
            created = await service.create_notification("alice", "info", "logged", "m")
        messages = [r.getMessage() for r in caplog.records if r.name == "statusd.notifications"]
        assert messages == [f"notification {created} created for alice"]
