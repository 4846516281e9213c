"""Expected digests: an item's ``sha256`` in either case, and ``checksum: "TYPE=HEX"`` as
aria2's ``--checksum`` takes it (sha-256, sha-512, sha-1, md5), verified while the body
streams (in one buffer, and through the writer and hasher threads of a large body), across
a resume, and refused with -32602 naming the field when malformed.

Against real HTTP servers on 127.0.0.1, an in-process daemon, and statusctl as a process.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import attrs
import pytest

from statusd.daemon import Daemon
from statusd.downloads import (
    DownloadItem,
    DownloadSettings,
    ItemResult,
    ItemState,
    checksums,
    download_item,
)
from statusd.downloads.checksums import Checksum
from statusd.downloads.http import HTTPClient
from tests.http_servers import HTTPTestServer, cut_off, http_server, serve_data
from tests.test_download_tasks import wait_for_end
from tests.test_statusctl_download_input import statusctl

__all__ = ["http_server"]

DATA = random.Random(14).randbytes(200_000)
FAST = DownloadSettings(backoff_initial=0.01, backoff_max=0.05, read_timeout=5.0)
# 200 kB in 16 KiB buffers: the body goes through the writer and hasher threads.
PIPELINE = attrs.evolve(FAST, chunk_size=16 * 1024)
HASHLIB = {"sha-256": "sha256", "sha-512": "sha512", "sha-1": "sha1", "md5": "md5"}


def digest(algorithm: str, data: bytes = DATA) -> str:
    return hashlib.new(HASHLIB[algorithm], data).hexdigest()


async def fetch(url: str, dest: Path, settings: DownloadSettings = FAST, **item: Any) -> ItemResult:
    async with HTTPClient() as client:
        return await download_item(
            client, DownloadItem(url, **item), dest, settings, ItemState(), owner="t1-0"
        )


# -- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", sorted(HASHLIB))
def test_each_type_parses_in_either_case(algorithm: str) -> None:
    hex_digits = digest(algorithm)
    assert checksums.parse(f"{algorithm}={hex_digits.upper()}") == Checksum(algorithm, hex_digits)
    assert checksums.parse(f"{algorithm.upper()}={hex_digits}") == Checksum(algorithm, hex_digits)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sha-384=" + "0" * 96, "checksum type must be one of sha-1, sha-256, sha-512, md5, not"),
        ("sha256=" + "0" * 64, "checksum type must be one of"),  # aria2 spells it sha-256
        ("sha-512=" + "0" * 64, "checksum must be 128 hex digits for sha-512, not"),
        ("md5=" + "g" * 32, "checksum must be 32 hex digits for md5, not"),
        ("0" * 64, "checksum must be TYPE=HEX, such as sha-256=..., not"),
        ("sha-1= " + "0" * 40, "checksum must be 40 hex digits for sha-1"),
    ],
)
def test_a_malformed_checksum_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        checksums.parse(text)


def test_items_keep_digests_in_lower_case() -> None:
    item = DownloadItem("http://host/x", sha256="AB" * 32)
    assert item.sha256 == "ab" * 32
    assert item.expected == Checksum("sha-256", "ab" * 32)
    item = DownloadItem("http://host/x", checksum="MD5=" + "CD" * 16)
    assert item.checksum == "md5=" + "cd" * 16
    assert item.expected_sha256 is None
    with pytest.raises(ValueError, match="checksum and sha256 must not both be given"):
        DownloadItem("http://host/x", sha256="ab" * 32, checksum="md5=" + "cd" * 16)


# -- verified while streaming ---------------------------------------------------------------


@pytest.mark.parametrize("settings", [FAST, PIPELINE], ids=["one-buffer", "pipeline"])
@pytest.mark.parametrize("algorithm", sorted(HASHLIB))
async def test_a_checksum_of_each_type_is_verified(
    http_server: HTTPTestServer, tmp_path: Path, algorithm: str, settings: DownloadSettings
) -> None:
    url = http_server.route("/f.bin", serve_data(DATA))
    good = await fetch(url, tmp_path, settings, checksum=f"{algorithm}={digest(algorithm)}")
    assert good.error is None
    assert (tmp_path / "f.bin").read_bytes() == DATA
    # The result's sha256 is the file's when that is what was computed.
    assert good.sha256 == (digest("sha-256") if algorithm == "sha-256" else None)

    wrong = digest(algorithm, b"something else")
    bad = await fetch(url, tmp_path, settings, checksum=f"{algorithm}={wrong.upper()}")
    label = "sha256" if algorithm == "sha-256" else algorithm
    assert bad.error == f"{label} mismatch: expected {wrong}, got {digest(algorithm)}"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["f.bin"]


async def test_an_upper_case_sha256_is_accepted(
    http_server: HTTPTestServer, tmp_path: Path
) -> None:
    url = http_server.route("/u.bin", serve_data(DATA))
    result = await fetch(url, tmp_path, PIPELINE, sha256=digest("sha-256").upper())
    assert result.error is None
    assert result.sha256 == digest("sha-256")


async def test_a_resumed_part_is_hashed_from_its_first_byte(
    http_server: HTTPTestServer, tmp_path: Path
) -> None:
    """The part kept from a cut connection is read back into the hasher before the rest is
    appended: a sha-512 over the whole file holds."""
    url = http_server.route("/cut.bin", cut_off(DATA, at=70_000))
    result = await fetch(url, tmp_path, PIPELINE, checksum=f"sha-512={digest('sha-512')}")
    assert result.error is None
    assert http_server.requests_for("/cut.bin")[1].headers["range"].startswith("bytes=")
    assert (tmp_path / "cut.bin").read_bytes() == DATA


# -- over RPC ---------------------------------------------------------------------------------


async def test_tasks_download_takes_a_checksum_and_an_upper_case_sha256(
    daemon: Daemon, connect: Any, http_server: HTTPTestServer
) -> None:
    url = http_server.route("/t.bin", serve_data(DATA))
    client = await connect()
    await client.call("subscribe", {"tasks": "all"})
    items = [
        {"url": url, "checksum": f"sha-512={digest('sha-512').upper()}"},
        {"url": url, "sha256": digest("sha-256").upper()},
        {"url": url, "checksum": f"md5={digest('md5', b'not it')}"},
    ]
    task_id = (await client.call("tasks.download", {"items": items}))["task_id"]
    task = await wait_for_end(client, task_id)
    results = task["result"]["items"]
    assert [item["error"] for item in results[:2]] == [None, None]
    assert results[1]["sha256"] == digest("sha-256")
    assert results[2]["error"].startswith(f"md5 mismatch: expected {digest('md5', b'not it')}")


@pytest.mark.parametrize(
    ("item", "field", "message"),
    [
        ({"checksum": "sha-3=" + "0" * 64}, "items[0].checksum", "checksum type must be one of"),
        ({"checksum": "sha-1=" + "0" * 41}, "items[0].checksum", "must be 40 hex digits"),
        ({"sha256": "0" * 63}, "items[0].sha256", "sha256 must be 64 hex digits"),
        (
            {"sha256": "0" * 64, "checksum": "md5=" + "0" * 32},
            "items[0].checksum",
            "checksum and sha256 must not both be given",
        ),
    ],
)
async def test_a_bad_digest_is_refused_naming_the_field(
    daemon: Daemon, connect: Any, item: dict[str, str], field: str, message: str
) -> None:
    client = await connect()
    request = {"items": [{"url": "http://127.0.0.1:9/x", **item}]}
    response = await client.request("tasks.download", request)
    assert response["error"]["code"] == -32602
    assert response["error"]["data"]["field"] == field
    assert message in response["error"]["message"]
    assert (await client.call("tasks.summary"))["total"] == 0


# -- statusctl ------------------------------------------------------------------------------


async def test_statusctl_download_checksum(daemon: Daemon, http_server: HTTPTestServer) -> None:
    url = http_server.route("/c.bin", serve_data(DATA))
    socket = str(daemon.config.socket)
    good = f"sha-512={digest('sha-512').upper()}"
    done = await statusctl(
        "--socket", socket, "--json", "download", url, "--checksum", good, "--wait"
    )
    assert done.returncode == 0, done.stderr
    [item] = json.loads(done.stdout.splitlines()[-1])["result"]["items"]
    assert item["error"] is None

    wrong = f"md5={digest('md5', b'other')}"
    failed = await statusctl("--socket", socket, "download", url, "--checksum", wrong, "--wait")
    assert failed.returncode == 1
    assert f"md5 mismatch: expected {digest('md5', b'other')}, got {digest('md5')}" in failed.stdout

    refused = await statusctl("--socket", socket, "download", url, "--checksum", "crc32=0")
    assert refused.returncode != 0
    assert "items[0].checksum" in refused.stderr
    assert (
        "checksum type must be one of sha-1, sha-256, sha-512, md5, not 'crc32'" in refused.stderr
    )
