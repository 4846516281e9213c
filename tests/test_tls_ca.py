"""Which CAs statusd trusts: the system's store, found by OpenSSL, which also reads
``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` (``ssl.create_default_context()`` in
``statusd.downloads.http``). Against a real TLS server on 127.0.0.1 with a test CA
(tests/proxy_server.py), in process and in a real daemon process started with the variable.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from statusd.downloads import DownloadItem, DownloadSettings, ItemResult, ItemState, download_item
from statusd.downloads.http import HTTPClient
from tests.conftest import DaemonProcess
from tests.http_servers import serve_data
from tests.processes import finished, start
from tests.proxy_server import TLSFiles, TLSTestServer, tls_files

__all__ = ["tls_files"]

FAST = DownloadSettings(backoff_initial=0.01, backoff_max=0.05, read_timeout=5.0)
DATA = b"behind a private CA\n"


@pytest.fixture
async def tls_server(nursery: trio.Nursery, tls_files: TLSFiles) -> TLSTestServer:
    server = TLSTestServer(tls_files.server_context())
    await nursery.start(server.serve)
    return server


async def fetch(url: str, dest: Path) -> ItemResult:
    # A new client: its SSL context, and so the variables, are read at its first https request.
    async with HTTPClient() as client:
        return await download_item(client, DownloadItem(url), dest, FAST, ItemState())


async def test_without_the_variables_a_private_ca_is_not_trusted(
    tls_server: TLSTestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    result = await fetch(tls_server.route("/a.txt", serve_data(DATA)), tmp_path)
    assert result.error is not None
    assert result.error.startswith(f"tls certificate of 127.0.0.1:{tls_server.port} not accepted")


async def test_ssl_cert_file_adds_a_ca(
    tls_server: TLSTestServer, tls_files: TLSFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.ca))
    result = await fetch(tls_server.route("/a.txt", serve_data(DATA)), tmp_path)
    assert result.error is None
    assert Path(result.path or "").read_bytes() == DATA


@pytest.fixture
def cert_dir(tls_files: TLSFiles, tmp_path: Path) -> Path:
    """A directory holding the test CA under its subject hash, as `openssl rehash` names it."""
    openssl = shutil.which("openssl")
    assert openssl is not None  # tls_files needed it
    subject_hash = subprocess.run(
        [openssl, "x509", "-hash", "-noout", "-in", str(tls_files.ca)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(tls_files.ca, certs / f"{subject_hash}.0")
    return certs


async def test_ssl_cert_dir_adds_a_ca(
    tls_server: TLSTestServer, cert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", str(cert_dir))
    dest = tmp_path / "dest"
    dest.mkdir()
    result = await fetch(tls_server.route("/a.txt", serve_data(DATA)), dest)
    assert result.error is None


async def test_a_daemon_started_with_ssl_cert_file_trusts_the_ca(
    daemon_process: Any,
    tls_server: TLSTestServer,
    tls_files: TLSFiles,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.ca))  # the daemon's environment
    process: DaemonProcess = daemon_process()
    client = await start(process)
    try:
        url = tls_server.route("/d.txt", serve_data(DATA))
        task_id = (await client.call("tasks.download", {"urls": [url]}))["task_id"]
        task = await finished(client, task_id)
    finally:
        await trio.aclose_forcefully(client.stream)
    [item] = task["result"]["items"]
    assert item["error"] is None
    assert Path(item["path"]).read_bytes() == DATA
