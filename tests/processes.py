"""Helpers for tests that drive a real daemon process (``DaemonProcess``) from trio: start
it and connect, SIGKILL it, poll its answers and files, read a task.

A daemon process has no event of ours to wait on, so its state is polled, with a deadline.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from tests.conftest import DaemonProcess, RawClient

FINISHED = ("completed", "failed", "cancelled")
POLL_LIMIT = 15.0


async def start(process: DaemonProcess, *extra: str) -> RawClient:
    """Start ``process`` (with extra ``statusd`` flags) and connect once it is ready."""
    await trio.to_thread.run_sync(lambda: process.start(*extra))
    return await RawClient.connect(process.socket)


async def kill(process: DaemonProcess, client: RawClient) -> None:
    """SIGKILL the daemon (after dropping our connection) and reap it."""
    await trio.aclose_forcefully(client.stream)
    process.signal(signal.SIGKILL)
    assert await trio.to_thread.run_sync(process.wait) == -signal.SIGKILL


async def until(condition: Callable[[], Awaitable[bool]], limit: float = POLL_LIMIT) -> None:
    """Poll another process's files and answers until ``condition()`` holds."""
    with trio.fail_after(limit):
        while not await condition():  # noqa: ASYNC110 - the state is in another process
            await trio.sleep(0.005)


async def task_of(client: RawClient, task_id: str) -> dict[str, Any]:
    task: dict[str, Any] = await client.call("tasks.get", {"task_id": task_id})
    return task


async def finished(client: RawClient, task_id: str) -> dict[str, Any]:
    """The task, once it has ended."""

    async def done() -> bool:
        return (await task_of(client, task_id))["status"] in FINISHED

    await until(done)
    return await task_of(client, task_id)


def download_dir(process: DaemonProcess) -> Path:
    return process.directory / "state" / "downloads"
