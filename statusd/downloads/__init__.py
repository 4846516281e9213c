"""Downloads: where a byte goes, from a URL to a finished file.

- ``job.py``: ``Downloads`` turns ``tasks.download`` params into a task and builds the
  task's ``DownloadJob`` (batches, journal checkpoints, the task's ``dest`` directory);
- ``engine.py``: ``download_item``, one item's attempts, from the request to the link;
- ``rules.py``: pure decisions on a server's answer (resume, 416, redirects, retries);
- ``files.py``: every blocking file operation (owned part files, links, the dest
  directory fd) and the worker threads that run them;
- ``http.py``: the HTTP/1.1 client (h11) and its pool of idle keep-alive connections;
- ``names.py``: pure: safe file names and URL checks.
"""

from __future__ import annotations

from statusd.downloads.engine import (
    DownloadItem,
    DownloadSettings,
    ItemResult,
    ItemState,
    download_item,
    download_items,
    make_client,
    remove_partial,
)
from statusd.downloads.files import DestError, Directory, open_dest, part_name
from statusd.downloads.job import DownloadJob, Downloads

__all__ = [
    "DestError",
    "Directory",
    "DownloadItem",
    "DownloadJob",
    "DownloadSettings",
    "Downloads",
    "ItemResult",
    "ItemState",
    "download_item",
    "download_items",
    "make_client",
    "open_dest",
    "part_name",
    "remove_partial",
]
