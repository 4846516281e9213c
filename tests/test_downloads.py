"""The download engine and its HTTP client, against real (misbehaving) servers on 127.0.0.1.

Timing (backoff, Retry-After) runs on trio's MockClock. Its autojump threshold is 50 ms
rather than 0 because file work and the body's receives happen in worker threads: while
one runs the loop looks idle, and the clock would jump to the next deadline (a backoff
that has not begun, a timeout) while a thread writes. A few milliseconds were outlasted
by threads on a loaded two-core machine (a 1.5 s retry measured 4 s).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import AsyncIterator
from email.utils import formatdate
from hashlib import sha256
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing

from statusd.downloads import (
    DownloadItem,
    DownloadSettings,
    ItemResult,
    ItemState,
    download_item,
    download_items,
    make_client,
    part_name,
    remove_partial,
)
from statusd.downloads.http import HTTPClient, ProtocolError
from tests import http_servers
from tests.http_servers import (
    HTTPTestServer,
    Request,
    Responder,
    chunked_cut_before_last_chunk,
    cut_off,
    hang_after_head,
    hang_before_head,
    redirect,
    sequence,
    serve_data,
    status,
)

DATA = random.Random(1).randbytes(300_000)
BIG = random.Random(2).randbytes(6 << 20)
FAST = DownloadSettings(backoff_initial=0.01, backoff_max=0.05, read_timeout=5.0)
# Small buffers, so a 300 kB body goes through the writer (several buffers in flight).
SMALL_CHUNKS = attrs.evolve(FAST, chunk_size=32 * 1024)
JUMP = 0.05
OWNER = "t1-0"  # the owner of every part file fetch() makes (a task id and item index)

http_server = http_servers.http_server  # the fixture (the lead's conftest may import it too)


@pytest.fixture
async def client() -> AsyncIterator[HTTPClient]:
    async with HTTPClient() as client:
        yield client


@pytest.fixture
async def still_client() -> AsyncIterator[HTTPClient]:
    """A client whose idle connections never expire, for MockClock's autojump: a small
    file's connection is idle while its file is written in a thread, and the clock would
    jump to the idle sweep's deadline meanwhile."""
    async with HTTPClient(idle_timeout=math.inf) as client:
        yield client


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    path = tmp_path / "downloads"
    path.mkdir()
    return path


@attrs.define
class Recorder:
    """What the engine told its caller."""

    states: list[ItemState] = attrs.Factory(list)
    deltas: list[int] = attrs.Factory(list)
    totals: set[int | None] = attrs.Factory(set)

    def on_bytes(self, delta: int, total: int | None) -> None:
        self.deltas.append(delta)
        self.totals.add(total)

    async def on_state(self, state: ItemState) -> None:
        self.states.append(attrs.evolve(state))

    @property
    def held(self) -> int:
        return sum(self.deltas)


async def fetch(
    client: HTTPClient,
    url: str,
    dest: Path,
    settings: DownloadSettings = FAST,
    state: ItemState | None = None,
    recorder: Recorder | None = None,
    **item: Any,
) -> ItemResult:
    recorder = recorder or Recorder()
    return await download_item(
        client,
        DownloadItem(url, **item),
        dest,
        settings,
        state if state is not None else ItemState(),
        owner=OWNER,
        on_bytes=recorder.on_bytes,
        on_state=recorder.on_state,
    )


def part(name: str) -> str:
    """The part file of ``fetch``'s item asking for ``name``."""
    return part_name(name, OWNER)


def listing(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


# -- the good path ---------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [FAST, SMALL_CHUNKS], ids=["one-buffer", "writer"])
async def test_download_writes_the_file_and_reports(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path, settings: DownloadSettings
) -> None:
    url = http_server.route("/files/data.bin", serve_data(DATA))
    recorder = Recorder()
    state = ItemState()
    result = await fetch(client, url, dest, settings, state, recorder)
    assert result == ItemResult(url, str(dest / "data.bin"), len(DATA), None, None)
    assert (dest / "data.bin").read_bytes() == DATA
    assert listing(dest) == ["data.bin"]
    assert state == ItemState("data.bin", '"v1"', True, part("data.bin"))
    # A large file's name, part and validator were reported before any data, then done;
    # a file that fits one buffer is reported once, done.
    started = [ItemState("data.bin", '"v1"', False, part("data.bin"))]
    assert recorder.states == (started if settings is SMALL_CHUNKS else []) + [state]
    assert recorder.held == len(DATA)
    assert recorder.totals == {len(DATA)}


async def test_sha256_is_checked_and_reported(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    url = http_server.route("/ok.bin", serve_data(DATA))
    digest = sha256(DATA).hexdigest()
    result = await fetch(client, url, dest, sha256=digest)
    assert result.error is None
    assert result.sha256 == digest


async def test_sha256_mismatch_removes_the_file_and_fails(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    url = http_server.route("/bad.bin", serve_data(DATA))
    wrong = "0" * 64
    recorder = Recorder()
    result = await fetch(client, url, dest, SMALL_CHUNKS, recorder=recorder, sha256=wrong)
    assert result.error == f"sha256 mismatch: expected {wrong}, got {sha256(DATA).hexdigest()}"
    assert result.path is None
    assert listing(dest) == []
    assert recorder.held == 0


async def test_sha256_always_hashes_every_file(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    url = http_server.route("/any.bin", serve_data(DATA))
    result = await fetch(client, url, dest, attrs.evolve(SMALL_CHUNKS, sha256_always=True))
    assert result.sha256 == sha256(DATA).hexdigest()


async def test_large_body_takes_the_copy_free_path(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    url = http_server.route("/big.bin", serve_data(BIG))
    result = await fetch(client, url, dest, sha256=sha256(BIG).hexdigest())
    assert result.error is None
    assert (dest / "big.bin").read_bytes() == BIG
    # A body read past h11 closes its connection rather than reuse it.
    assert client.idle_connections() == 0


async def test_chunked_body(http_server: HTTPTestServer, client: HTTPClient, dest: Path) -> None:
    url = http_server.route("/chunked.bin", serve_data(DATA, chunked=True))
    recorder = Recorder()
    result = await fetch(client, url, dest, SMALL_CHUNKS, recorder=recorder)
    assert result.error is None
    assert (dest / "chunked.bin").read_bytes() == DATA
    assert recorder.totals == {None}


async def test_connections_are_reused(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    urls = [http_server.route(f"/f{n}.bin", serve_data(DATA[: 1000 + n])) for n in range(5)]
    for url in urls:
        assert (await fetch(client, url, dest)).error is None
    assert http_server.connections == 1


async def test_a_kept_alive_connection_closed_by_the_server_is_retried_transparently(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    async def answer_then_close(request: Request, responder: Responder) -> None:
        await responder.send(200, [("ETag", '"x"')], b"hello")
        await responder.close()  # without saying so: the client's idle connection is dead

    first = http_server.route("/first.txt", answer_then_close)
    second = http_server.route("/second.txt", serve_data(b"world"))
    assert (await fetch(client, first, dest)).error is None
    await trio.sleep(0.05)
    assert (await fetch(client, second, dest)).error is None
    assert (dest / "second.txt").read_bytes() == b"world"


async def test_download_items_runs_a_list_concurrently(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    items = [
        DownloadItem(http_server.route(f"/many/{n}.bin", serve_data(bytes([n]) * (n + 1))))
        for n in range(20)
    ]
    results = await download_items(client, items, dest, FAST, concurrency=4)
    assert [result.error for result in results] == [None] * 20
    assert [result.url for result in results] == [item.url for item in items]
    assert all(result.error is None for result in results)
    assert len(listing(dest)) == 20
    assert http_server.connections <= 4


async def test_dest_is_created(http_server: HTTPTestServer, client: HTTPClient, dest: Path) -> None:
    url = http_server.route("/x.bin", serve_data(b"x"))
    result = await fetch(client, url, dest / "a" / "b")
    assert result.path == str(dest / "a" / "b" / "x.bin")


# -- names: never outside dest, never overwriting ------------------------------------------


async def test_content_disposition_cannot_escape_dest(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    url = http_server.route(
        "/innocent", serve_data(b"alias rm='rm -rf /'\n", content_disposition='attachment; '
        'filename="../../.bashrc"'),
    )  # fmt: skip
    result = await fetch(client, url, dest)
    assert result.path == str(dest / "bashrc")
    assert listing(dest) == ["bashrc"]
    assert not (dest.parent / ".bashrc").exists()
    assert not (dest.parent.parent / ".bashrc").exists()


async def test_name_sources_in_order(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    disposition = "attachment; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf"
    url = http_server.route("/get", serve_data(b"cv", content_disposition=disposition))
    assert (await fetch(client, url, dest)).path == str(dest / "résumé.pdf")
    assert (await fetch(client, url, dest, filename="mine.pdf")).path == str(dest / "mine.pdf")
    plain = http_server.route("/dir/a%20file.txt", serve_data(b"a"))
    assert (await fetch(client, plain, dest)).path == str(dest / "a file.txt")
    root = http_server.route("/", serve_data(b"index"))
    assert (await fetch(client, root, dest)).path == str(dest / "index.html")  # as wget
    nameless = http_server.route("/%2e%2e", serve_data(b"dots"))
    assert (await fetch(client, nameless, dest)).path == str(dest / "download")
    unsafe = await fetch(client, url, dest, filename="../..")
    assert unsafe.path == str(dest / "résumé.1.pdf")  # an unusable filename falls through


async def test_an_existing_file_is_never_overwritten(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    (dest / "report.pdf").write_bytes(b"precious")
    (dest / "report.1.pdf").write_bytes(b"also precious")
    # Another download's part, under the name this one's would have had before parts
    # were owned: none of its business.
    (dest / "report.pdf.part").write_bytes(b"someone else's download")
    url = http_server.route("/report.pdf", serve_data(DATA))
    result = await fetch(client, url, dest)
    assert result.path == str(dest / "report.2.pdf")
    assert (dest / "report.pdf").read_bytes() == b"precious"
    assert (dest / "report.1.pdf").read_bytes() == b"also precious"
    assert (dest / "report.pdf.part").read_bytes() == b"someone else's download"


async def test_same_name_at_once_gets_distinct_files(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    url = http_server.route("/same.bin", serve_data(DATA))
    results = await download_items(
        client, [DownloadItem(url)] * 5, dest, SMALL_CHUNKS, concurrency=5
    )
    assert sorted(Path(result.path or "").name for result in results) == [
        "same.1.bin", "same.2.bin", "same.3.bin", "same.4.bin", "same.bin",
    ]  # fmt: skip
    assert all((dest / name).read_bytes() == DATA for name in listing(dest))


async def test_a_name_taken_while_downloading_gets_the_next_number(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    async def slow(request: Request, responder: Responder) -> None:
        await responder.send_head(200, [("Content-Length", str(len(DATA))), ("ETag", '"v"')])
        await responder.send_raw(DATA[:1000])
        (dest / "late.bin").write_bytes(b"arrived meanwhile")  # the name is taken now
        await responder.send_raw(DATA[1000:])

    url = http_server.route("/late.bin", slow)
    recorder = Recorder()
    result = await fetch(client, url, dest, recorder=recorder)
    assert result.path == str(dest / "late.1.bin")
    assert (dest / "late.bin").read_bytes() == b"arrived meanwhile"
    assert recorder.states[-1] == ItemState("late.1.bin", '"v"', True, part("late.bin"))


async def test_a_symlink_in_place_of_the_part_is_replaced_not_followed(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"not yours")
    (dest / part("trap.bin")).symlink_to(outside)
    url = http_server.route("/trap.bin", serve_data(DATA))
    state = ItemState(name="trap.bin", validator='"v1"', part=part("trap.bin"))
    result = await fetch(client, url, dest, state=state)
    assert result.error is None
    assert (dest / "trap.bin").read_bytes() == DATA
    assert outside.read_bytes() == b"not yours"
    assert listing(dest) == ["trap.bin"]
    assert http_server.requests_for("/trap.bin")[0].headers.get("range") is None


# -- failures that are final ---------------------------------------------------------------


async def test_404_fails_at_once(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    result = await fetch(client, http_server.url("/missing.bin"), dest)
    assert result == ItemResult(
        http_server.url("/missing.bin"), None, 0, None, "http 404 not found"
    )
    assert len(http_server.requests_for("/missing.bin")) == 1
    assert listing(dest) == []


async def test_size_cap_by_content_length(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    url = http_server.route("/huge.bin", serve_data(DATA))
    result = await fetch(client, url, dest, attrs.evolve(FAST, max_file_bytes=100_000))
    assert result.error == "file exceeds the size cap of 100000 bytes (downloads.max_file_bytes)"
    assert listing(dest) == []


async def test_size_cap_while_streaming(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    url = http_server.route("/sneaky.bin", serve_data(DATA, chunked=True))
    settings = attrs.evolve(SMALL_CHUNKS, max_file_bytes=100_000)
    recorder = Recorder()
    result = await fetch(client, url, dest, settings, recorder=recorder)
    assert result.error == "file exceeds the size cap of 100000 bytes (downloads.max_file_bytes)"
    assert listing(dest) == []
    assert recorder.held == 0
    assert max(sum(recorder.deltas[:n]) for n in range(len(recorder.deltas))) <= 100_000 + 65536


async def test_redirects_are_followed(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    http_server.route("/real/file.txt", serve_data(b"content"))
    http_server.route("/step2", redirect("/real/file.txt", 301))
    url = http_server.route("/step1", redirect(http_server.url("/step2"), 307))
    result = await fetch(client, url, dest)
    assert result.path == str(dest / "file.txt")  # named after where it was found


async def test_redirect_loop(http_server: HTTPTestServer, client: HTTPClient, dest: Path) -> None:
    url = http_server.route("/loop", redirect("/loop"))
    result = await fetch(client, url, dest, attrs.evolve(FAST, max_redirects=10))
    assert result.error == "too many redirects: more than 10 (downloads.max_redirects)"
    assert len(http_server.requests_for("/loop")) == 11
    assert http_server.connections == 1  # small redirect bodies are read: the connection stays


async def test_redirect_to_another_scheme_fails(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    url = http_server.route("/ftp", redirect("ftp://example.com/file"))
    result = await fetch(client, url, dest)
    assert result.error == (
        "redirect to an unusable url: url scheme must be http or https, not 'ftp'"
    )


async def test_tls_failure_is_final(nursery: trio.Nursery, client: HTTPClient, dest: Path) -> None:
    async def plain_http(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()

    listeners = await nursery.start(trio.serve_tcp, plain_http, 0)
    port = listeners[0].socket.getsockname()[1]
    result = await fetch(client, f"https://127.0.0.1:{port}/x.bin", dest)
    assert result.error is not None
    assert result.error.startswith(f"tls handshake with 127.0.0.1:{port} failed: ")
    assert "gave up" not in result.error


async def test_item_validation() -> None:
    with pytest.raises(ValueError, match="url scheme must be http or https, not 'ftp'"):
        DownloadItem("ftp://host/x")
    with pytest.raises(ValueError, match="sha256 must be 64 hex digits for sha-256"):
        DownloadItem("http://host/x", sha256="ABC")
    with pytest.raises(ValueError, match="max_attempts must be >= 1, not 0"):
        DownloadSettings(max_attempts=0)
    with pytest.raises(ValueError, match="read_timeout must be > 0, not 0"):
        DownloadSettings(read_timeout=0)


# -- retries and their timing (MockClock) -----------------------------------------------------


async def test_5xx_then_success_backs_off(
    mock_clock: trio.testing.MockClock,
    http_server: HTTPTestServer,
    still_client: HTTPClient,
    dest: Path,
) -> None:
    mock_clock.autojump_threshold = JUMP
    url = http_server.route("/flaky.bin", sequence(status(503), status(500), serve_data(DATA)))
    settings = DownloadSettings(backoff_initial=0.5, backoff_max=30)
    started = trio.current_time()
    result = await fetch(still_client, url, dest, settings)
    assert result.error is None
    assert trio.current_time() - started == pytest.approx(0.5 + 1.0, abs=0.01)
    assert len(http_server.requests_for("/flaky.bin")) == 3


async def test_backoff_is_capped_and_attempts_are_limited(
    mock_clock: trio.testing.MockClock,
    http_server: HTTPTestServer,
    still_client: HTTPClient,
    dest: Path,
) -> None:
    mock_clock.autojump_threshold = JUMP
    url = http_server.route("/down", status(502))
    settings = DownloadSettings(backoff_initial=1, backoff_max=3, max_attempts=5)
    started = trio.current_time()
    result = await fetch(still_client, url, dest, settings)
    assert result.error == "http 502 bad gateway (gave up after 5 attempts)"
    assert trio.current_time() - started == pytest.approx(1 + 2 + 3 + 3, abs=0.01)


async def test_429_honours_retry_after_seconds(
    mock_clock: trio.testing.MockClock,
    http_server: HTTPTestServer,
    still_client: HTTPClient,
    dest: Path,
) -> None:
    mock_clock.autojump_threshold = JUMP
    url = http_server.route("/busy", sequence(status(429, retry_after="7"), serve_data(DATA)))
    started = trio.current_time()
    result = await fetch(still_client, url, dest, DownloadSettings(backoff_initial=0.5))
    assert result.error is None
    assert trio.current_time() - started == pytest.approx(7, abs=0.01)


async def test_503_honours_retry_after_date(
    mock_clock: trio.testing.MockClock,
    http_server: HTTPTestServer,
    still_client: HTTPClient,
    dest: Path,
) -> None:
    mock_clock.autojump_threshold = JUMP
    when = formatdate(time.time() + 20, usegmt=True)
    url = http_server.route("/later", sequence(status(503, retry_after=when), serve_data(DATA)))
    started = trio.current_time()
    result = await fetch(still_client, url, dest, DownloadSettings(backoff_initial=0.5))
    assert result.error is None
    assert 18 <= trio.current_time() - started <= 21


async def test_retry_after_is_capped(
    mock_clock: trio.testing.MockClock,
    http_server: HTTPTestServer,
    still_client: HTTPClient,
    dest: Path,
) -> None:
    mock_clock.autojump_threshold = JUMP
    url = http_server.route("/never", sequence(status(429, retry_after="86400"), serve_data(DATA)))
    started = trio.current_time()
    result = await fetch(still_client, url, dest, DownloadSettings(max_retry_after=60))
    assert result.error is None
    assert trio.current_time() - started == pytest.approx(60, abs=0.01)


async def test_connection_refused_is_retried_then_fails(client: HTTPClient, dest: Path) -> None:
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nobody listens here once it is closed
    result = await fetch(
        client, f"http://127.0.0.1:{port}/x", dest, attrs.evolve(FAST, max_attempts=2)
    )
    assert result.error == (
        f"cannot connect to 127.0.0.1:{port}: connection refused (gave up after 2 attempts)"
    )


# -- resuming ----------------------------------------------------------------------------


async def test_cut_off_body_resumes_with_range(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    url = http_server.route("/cut.bin", sequence(cut_off(DATA, 200_000), serve_data(DATA)))
    recorder = Recorder()
    result = await fetch(client, url, dest, SMALL_CHUNKS, recorder=recorder)
    assert result.error is None
    assert (dest / "cut.bin").read_bytes() == DATA
    first, second = http_server.requests_for("/cut.bin")
    assert "range" not in first.headers
    assert second.headers["range"] == "bytes=200000-"
    assert second.headers["if-range"] == '"v1"'
    assert all(delta > 0 for delta in recorder.deltas)  # nothing had to be thrown away


async def test_cut_off_large_body_resumes(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    url = http_server.route("/cut-big.bin", sequence(cut_off(BIG, 5_000_000), serve_data(BIG)))
    result = await fetch(client, url, dest, sha256=sha256(BIG).hexdigest())
    assert result.error is None
    second = http_server.requests_for("/cut-big.bin")[1]
    assert second.headers["range"] == "bytes=5000000-"


@pytest.mark.parametrize(
    ("sha256_given", "etag_on_416"), [(True, False), (False, True)], ids=["sha256", "validator"]
)
async def test_a_416_for_a_part_holding_the_whole_entity_completes_it(
    http_server: HTTPTestServer,
    client: HTTPClient,
    dest: Path,
    sha256_given: bool,
    etag_on_416: bool,
) -> None:
    """The body arrived whole but the connection broke before the last chunk: the resume
    asks for ``bytes=N-`` and the server rightly answers 416 ``bytes */N``. The part is
    the file (checked by its sha256, or by the validator the 416 carries)."""
    url = http_server.route(
        "/whole.bin", chunked_cut_before_last_chunk(DATA, etag_on_416=etag_on_416)
    )
    digest = sha256(DATA).hexdigest() if sha256_given else None
    recorder = Recorder()
    result = await fetch(client, url, dest, SMALL_CHUNKS, recorder=recorder, sha256=digest)
    assert result.error is None
    assert result.path == str(dest / "whole.bin")
    assert (dest / "whole.bin").read_bytes() == DATA
    assert listing(dest) == ["whole.bin"]
    assert recorder.held == len(DATA)
    first, second = http_server.requests_for("/whole.bin")
    assert "range" not in first.headers
    assert second.headers["range"] == f"bytes={len(DATA)}-"


@pytest.mark.parametrize(
    "unsatisfiable",
    [
        chunked_cut_before_last_chunk(DATA, size_416=len(DATA) + 1),
        chunked_cut_before_last_chunk(DATA, etag_on_416=False),
    ],
    ids=["another-size", "no-validator"],
)
async def test_a_416_that_does_not_prove_the_part_whole_restarts_without_range(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path, unsatisfiable: Any
) -> None:
    url = http_server.route(
        "/other.bin",
        sequence(chunked_cut_before_last_chunk(DATA), unsatisfiable, serve_data(DATA)),
    )
    result = await fetch(client, url, dest, SMALL_CHUNKS)
    assert result.error is None
    assert (dest / "other.bin").read_bytes() == DATA
    assert listing(dest) == ["other.bin"]
    ranges = [request.headers.get("range") for request in http_server.requests_for("/other.bin")]
    assert ranges == [None, f"bytes={len(DATA)}-", None]


async def test_a_416_for_a_part_whose_sha256_differs_restarts_without_range(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    other = bytes(reversed(DATA))  # as long as DATA: the 416's size matches the part
    url = http_server.route(
        "/changed.bin",
        sequence(
            chunked_cut_before_last_chunk(other),
            chunked_cut_before_last_chunk(other),
            serve_data(DATA),
        ),
    )
    result = await fetch(client, url, dest, SMALL_CHUNKS, sha256=sha256(DATA).hexdigest())
    assert result.error is None
    assert (dest / "changed.bin").read_bytes() == DATA
    assert listing(dest) == ["changed.bin"]
    ranges = [request.headers.get("range") for request in http_server.requests_for("/changed.bin")]
    assert ranges == [None, f"bytes={len(DATA)}-", None]


async def test_a_server_ignoring_range_restarts_from_zero(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    url = http_server.route(
        "/norange.bin", sequence(cut_off(DATA, 100_000), serve_data(DATA, ranges="ignore"))
    )
    recorder = Recorder()
    result = await fetch(
        client, url, dest, SMALL_CHUNKS, recorder=recorder, sha256=sha256(DATA).hexdigest()
    )
    assert result.error is None
    assert (dest / "norange.bin").read_bytes() == DATA
    assert http_server.requests_for("/norange.bin")[1].headers["range"] == "bytes=100000-"
    assert -100_000 in recorder.deltas  # the resumed bytes were taken back
    assert recorder.held == len(DATA)


async def test_a_206_from_the_wrong_offset_restarts_without_range(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    url = http_server.route(
        "/skew.bin", sequence(cut_off(DATA, 100_000), serve_data(DATA, wrong_offset=1000))
    )
    result = await fetch(client, url, dest, SMALL_CHUNKS)
    assert result.error is None
    assert (dest / "skew.bin").read_bytes() == DATA
    requests = http_server.requests_for("/skew.bin")
    assert [request.headers.get("range") for request in requests] == [
        None, "bytes=100000-", None,
    ]  # fmt: skip


async def test_a_changed_etag_restarts(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    def etag(request: Request) -> str:
        return f'"v{request.number}"'  # a new version at every request

    url = http_server.route(
        "/moving.bin",
        sequence(cut_off(DATA, 100_000, etag='"v1"'), serve_data(DATA, etag=etag)),
    )
    recorder = Recorder()
    state = ItemState()
    result = await fetch(client, url, dest, SMALL_CHUNKS, state, recorder)
    assert result.error is None
    assert (dest / "moving.bin").read_bytes() == DATA
    second = http_server.requests_for("/moving.bin")[1]
    assert second.headers["if-range"] == '"v1"'  # the server answered 200 with "v2"
    assert state.validator == '"v2"'


async def test_a_changed_etag_in_a_206_restarts(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    url = http_server.route(
        "/liar.bin",
        sequence(
            cut_off(DATA, 100_000, etag='"v1"'),
            serve_data(DATA, etag='"v2"', ranges="ignore-if-range"),
        ),
    )
    result = await fetch(client, url, dest, SMALL_CHUNKS)
    assert result.error is None
    assert (dest / "liar.bin").read_bytes() == DATA
    requests = http_server.requests_for("/liar.bin")
    assert [request.headers.get("range") for request in requests] == [
        None, "bytes=100000-", None,
    ]  # fmt: skip


async def test_without_a_validator_a_retry_resumes_with_a_plain_range(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    """No ETag, no Last-Modified: the retry asks for the rest without If-Range and takes
    it because the Content-Range total is the length the first answer gave
    (tests/test_flaky_links.py has the cases that start over)."""
    url = http_server.route(
        "/novalidator.bin",
        sequence(cut_off(DATA, 100_000, etag=None), serve_data(DATA, etag=None)),
    )
    result = await fetch(client, url, dest, SMALL_CHUNKS)
    assert result.error is None
    assert (dest / "novalidator.bin").read_bytes() == DATA
    second = http_server.requests_for("/novalidator.bin")[1]
    assert second.headers["range"] == "bytes=100000-"
    assert "if-range" not in second.headers


async def test_last_modified_serves_as_validator(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    modified = "Tue, 01 Jan 2030 00:00:00 GMT"
    url = http_server.route(
        "/dated.bin",
        sequence(
            cut_off(DATA, 100_000, etag=None),
            serve_data(DATA, etag=None, last_modified=modified),
        ),
    )
    state = ItemState()
    # The cut-off answer had no validator, the second has one; a third run resumes by date.
    result = await fetch(client, url, dest, SMALL_CHUNKS, state)
    assert result.error is None
    assert state.validator == modified


async def test_resume_after_a_restart(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    """The daemon stops mid-download (cancel), and a new one resumes with the journalled
    state: the data received before the stop is not fetched again."""
    url = http_server.route(
        "/restart.bin", sequence(hang_after_head(DATA, 150_000), serve_data(DATA))
    )
    recorder = Recorder()
    with trio.move_on_after(0.5):
        await fetch(client, url, dest, SMALL_CHUNKS, recorder=recorder)
    journalled = recorder.states[-1]
    assert journalled == ItemState("restart.bin", '"v1"', False, part("restart.bin"))
    assert (dest / part("restart.bin")).stat().st_size == 150_000  # in-memory data was kept

    state = attrs.evolve(journalled)
    async with make_client() as fresh:  # a new process: new connections
        result = await fetch(fresh, url, dest, SMALL_CHUNKS, state, sha256=sha256(DATA).hexdigest())
    assert result.error is None
    assert (dest / "restart.bin").read_bytes() == DATA
    assert http_server.requests_for("/restart.bin")[1].headers["range"] == "bytes=150000-"
    assert listing(dest) == ["restart.bin"]


async def test_a_finished_item_is_not_downloaded_again(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    url = http_server.route("/done.bin", serve_data(DATA))
    state = ItemState()
    await fetch(client, url, dest, state=state)
    again = await fetch(client, url, dest, state=state)
    assert again == ItemResult(url, str(dest / "done.bin"), len(DATA), None, None)
    assert len(http_server.requests_for("/done.bin")) == 1


async def test_a_finished_file_removed_by_the_user_is_fetched_again(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    url = http_server.route("/gone.bin", serve_data(DATA))
    state = ItemState()
    await fetch(client, url, dest, state=state)
    (dest / "gone.bin").unlink()
    again = await fetch(client, url, dest, state=state)
    assert again.error is None
    assert (dest / "gone.bin").read_bytes() == DATA
    assert listing(dest) == ["gone.bin"]


async def test_a_crash_between_link_and_unlink_is_finished(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    (dest / part("half.bin")).write_bytes(DATA)
    (dest / "half.bin").write_bytes(b"someone else's, which took the name first")
    os.link(dest / part("half.bin"), dest / "half.1.bin")
    url = http_server.route("/half.bin", serve_data(DATA))
    state = ItemState("half.bin", '"v1"', part=part("half.bin"))
    result = await fetch(client, url, dest, state=state)
    assert result.path == str(dest / "half.1.bin")
    assert state.name == "half.1.bin"
    assert listing(dest) == ["half.1.bin", "half.bin"]
    assert http_server.requests_for("/half.bin") == []


async def test_a_part_with_another_link_is_replaced_not_resumed_into(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    """Someone linked the part elsewhere (not a final name of ours): appending would
    change their file, so the item starts again in a new inode."""
    (dest / part("shared.bin")).write_bytes(DATA[:1000])
    os.link(dest / part("shared.bin"), dest / ".someone-elses")
    url = http_server.route("/shared.bin", serve_data(DATA))
    state = ItemState("shared.bin", '"v1"', part=part("shared.bin"))
    result = await fetch(client, url, dest, state=state)
    assert result.path == str(dest / "shared.bin")
    assert (dest / "shared.bin").read_bytes() == DATA
    assert (dest / ".someone-elses").read_bytes() == DATA[:1000]
    assert http_server.requests_for("/shared.bin")[0].headers.get("range") is None


async def test_a_state_from_before_owned_parts_starts_again_and_leaves_name_part_alone(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    """A journal written before parts were owned says ``NAME``; ``NAME.part`` may be
    another download's, so it is neither resumed into nor removed."""
    (dest / "old.bin.part").write_bytes(b"whose?")
    url = http_server.route("/old.bin", serve_data(DATA))
    result = await fetch(client, url, dest, state=ItemState("old.bin", '"v1"'))
    assert result.path == str(dest / "old.bin")
    assert (dest / "old.bin").read_bytes() == DATA
    assert (dest / "old.bin.part").read_bytes() == b"whose?"
    assert http_server.requests_for("/old.bin")[0].headers.get("range") is None


# -- hangs and cancellation --------------------------------------------------------------


@pytest.mark.parametrize(
    "handler",
    [hang_before_head(), hang_after_head(DATA, 0), hang_after_head(DATA, 100_000)],
    ids=["before-head", "after-head", "mid-body"],
)
async def test_cancel_is_prompt_while_the_server_hangs(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path, handler: Any
) -> None:
    url = http_server.route("/hang.bin", handler)
    started = time.monotonic()
    with trio.move_on_after(0.3) as scope:
        await fetch(client, url, dest)
    assert scope.cancelled_caught
    assert time.monotonic() - started < 1.0


async def test_cancel_keeps_the_part_and_remove_partial_removes_it(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    url = http_server.route("/stop.bin", hang_after_head(DATA, 100_000))
    state = ItemState()
    with trio.move_on_after(0.3):
        await fetch(client, url, dest, SMALL_CHUNKS, state)
    assert listing(dest) == [part("stop.bin")]
    assert await remove_partial(dest, state)
    assert listing(dest) == []
    assert not await remove_partial(dest, state)


async def test_a_silent_server_times_out(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    url = http_server.route("/silent", hang_before_head())
    settings = attrs.evolve(FAST, read_timeout=0.1, max_attempts=2)
    result = await fetch(client, url, dest, settings)
    assert result.error == (
        f"timed out after 0.1 s waiting for data from 127.0.0.1:{http_server.port}"
        " (gave up after 2 attempts)"
    )


async def test_a_server_stalling_mid_body_times_out_and_the_retry_resumes(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    url = http_server.route(
        "/stall.bin", sequence(hang_after_head(DATA, 120_000), serve_data(DATA))
    )
    result = await fetch(client, url, dest, attrs.evolve(SMALL_CHUNKS, read_timeout=0.1))
    assert result.error is None
    assert (dest / "stall.bin").read_bytes() == DATA
    assert http_server.requests_for("/stall.bin")[1].headers["range"] == "bytes=120000-"


# -- the HTTP client on its own ----------------------------------------------------------------


async def test_an_oversized_response_head_is_refused(
    http_server: HTTPTestServer, client: HTTPClient
) -> None:
    async def bloated(request: Request, responder: Responder) -> None:
        await responder.send(200, [("X-Junk", "j" * 100_000)], b"x")

    url = http_server.route("/bloated", bloated)
    small = HTTPClient(max_header_bytes=16 * 1024)
    with pytest.raises(ProtocolError, match=r"response head from 127\.0\.0\.1:\d+ exceeds 16384"):
        async with small.stream("GET", url):
            pass
    await small.aclose()


async def test_client_streams_and_reads(http_server: HTTPTestServer, client: HTTPClient) -> None:
    url = http_server.route("/r.bin", serve_data(DATA))
    async with client.stream("GET", url, [("X-Test", "1")]) as response:
        assert response.status == 200
        assert response.headers.get("ETag") == '"v1"'
        assert await response.read(len(DATA)) == DATA
    request = http_server.requests_for("/r.bin")[0]
    assert request.headers["x-test"] == "1"
    assert request.headers["accept-encoding"] == "identity"
    assert request.headers["user-agent"].startswith("statusd/")


# -- a full disk ----------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(mount_tmpfs: Any) -> Path:
    """A 1 MiB tmpfs, mounted for the test and always unmounted after it."""
    path: Path = mount_tmpfs("1m")
    return path


@pytest.mark.parametrize("size", [len(DATA) * 14, len(BIG)], ids=["4 MB", "6 MiB direct"])
async def test_a_full_disk_fails_the_item_and_nothing_else(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path, small_tmpfs: Path, size: int
) -> None:
    body = (DATA * 30)[:size]
    url = http_server.route("/fat.bin", serve_data(body))
    result = await fetch(client, url, small_tmpfs)
    assert result.error == f"no space left on device writing {small_tmpfs / part('fat.bin')}"
    assert listing(small_tmpfs) == []  # the part is gone: the space is free again
    # ... and the engine goes on: the next download elsewhere works.
    assert (
        await fetch(client, http_server.route("/thin.bin", serve_data(b"ok")), dest)
    ).error is None


# -- what a journal sees (on_state) ----------------------------------------------------------


@attrs.define
class DiskCheckingRecorder(Recorder):
    """Checks, at every ``on_state``, what is on disk under the state reported: nothing
    (or an emptied part) under a new name or validator, and the part still linked to the
    finished file under ``done``, so a journal written there is never behind the disk."""

    dest: Path = Path("/nonexistent")
    problems: list[str] = attrs.Factory(list)

    async def on_state(self, state: ItemState) -> None:
        await super().on_state(state)
        assert state.name is not None
        assert state.part is not None
        part = self.dest / state.part
        if state.done:
            final = self.dest / state.name
            if not (part.exists() and os.path.samefile(part, final)):
                self.problems.append(f"{state}: part not linked to the finished file")
        elif part.exists() and part.stat().st_size > 0:
            self.problems.append(f"{state}: {part.stat().st_size} bytes already written")
        await trio.lowlevel.checkpoint()  # a real journal waits for its fsync here


def _moving_etag(request: Request) -> str:
    return f'"v{request.number}"'


@pytest.mark.parametrize(
    ("handler", "settings", "taken"),
    [
        (serve_data(DATA), FAST, False),
        (serve_data(DATA), SMALL_CHUNKS, False),
        (serve_data(DATA), FAST, True),
        (serve_data(DATA), SMALL_CHUNKS, True),
        (
            sequence(cut_off(DATA, 100_000), serve_data(DATA, etag=_moving_etag)),
            SMALL_CHUNKS,
            False,
        ),
    ],
    ids=["one-buffer", "writer", "one-buffer-name-taken", "writer-name-taken", "new-validator"],
)
async def test_state_is_reported_before_anything_is_written_under_it(
    http_server: HTTPTestServer,
    client: HTTPClient,
    dest: Path,
    handler: Any,
    settings: DownloadSettings,
    taken: bool,
) -> None:
    if taken:
        (dest / "j.bin").write_bytes(b"someone else's")
    url = http_server.route("/j.bin", handler)
    recorder = DiskCheckingRecorder(dest=dest)
    result = await fetch(client, url, dest, settings, recorder=recorder)
    assert result.error is None
    assert recorder.problems == []
    assert [state.name for state in recorder.states][-1] == ("j.1.bin" if taken else "j.bin")
    assert recorder.states[-1].done
    assert sorted(listing(dest)) == (["j.1.bin", "j.bin"] if taken else ["j.bin"])


async def test_a_large_file_waits_for_on_state_before_its_first_write(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    url = http_server.route("/wait.bin", serve_data(DATA))
    reported = trio.Event()
    journalled = trio.Event()

    async def on_state(state: ItemState) -> None:
        if not state.done:
            reported.set()
            await journalled.wait()

    async def download() -> None:
        await download_item(
            client, DownloadItem(url), dest, SMALL_CHUNKS, ItemState(), on_state=on_state
        )

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(download)
            await reported.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert listing(dest) == []  # its first buffer is in memory, waiting for the journal
            journalled.set()
    assert (dest / "wait.bin").read_bytes() == DATA


async def test_a_file_that_fits_one_buffer_is_reported_once_done(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    """No report before its one thread hop (create, write, sync, link): a crash in it
    leaves a part its caller finds by the owner (``own_parts``), linked or not."""
    url = http_server.route("/once.bin", serve_data(DATA))
    recorder = DiskCheckingRecorder(dest=dest)
    result = await fetch(client, url, dest, recorder=recorder)
    assert result.error is None
    assert [state.done for state in recorder.states] == [True]
    assert recorder.problems == []


async def test_a_failure_leaves_another_downloads_part_alone(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    """A failure removes the item's own part only, never a NAME.part that belongs to
    another download."""
    (dest / "shared.bin.part").write_bytes(b"another download's data")
    url = http_server.route("/shared.bin", serve_data(DATA, chunked=True))
    settings = attrs.evolve(FAST, max_file_bytes=1000)
    result = await fetch(client, url, dest, settings)
    assert result.error == "file exceeds the size cap of 1000 bytes (downloads.max_file_bytes)"
    assert (dest / "shared.bin.part").read_bytes() == b"another download's data"


async def test_a_journalled_part_that_never_appeared_is_created_afresh(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    """A crash between journalling a part and creating it: meanwhile another download
    took the name, and another's part sits under the old NAME.part; both stay untouched."""
    (dest / "gap.bin").write_bytes(b"came later")
    (dest / "gap.bin.part").write_bytes(b"another download's part")
    url = http_server.route("/gap.bin", serve_data(DATA))
    state = ItemState("gap.bin", '"v1"', part=part("gap.bin"))
    result = await fetch(client, url, dest, state=state)
    assert result.path == str(dest / "gap.1.bin")
    assert (dest / "gap.1.bin").read_bytes() == DATA
    assert (dest / "gap.bin").read_bytes() == b"came later"
    assert (dest / "gap.bin.part").read_bytes() == b"another download's part"
    assert http_server.requests_for("/gap.bin")[0].headers.get("range") is None


async def test_done_journalled_but_part_left_is_tidied(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    """A crash after the journal had ``done`` and before the part was removed."""
    (dest / "tidy.bin").write_bytes(DATA)
    os.link(dest / "tidy.bin", dest / part("tidy.bin"))
    url = http_server.route("/tidy.bin", serve_data(DATA))
    recorder = Recorder()
    state = ItemState("tidy.bin", '"v1"', True, part("tidy.bin"))
    result = await fetch(client, url, dest, state=state, recorder=recorder)
    assert result.path == str(dest / "tidy.bin")
    assert listing(dest) == ["tidy.bin"]
    assert recorder.held == len(DATA)
    assert http_server.requests_for("/tidy.bin") == []


async def test_a_finished_state_from_before_owned_parts_tidies_only_its_own_link(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    """``done`` journalled before parts were owned: ``NAME.part`` goes only when it is a
    link to the finished NAME."""
    (dest / "old.bin").write_bytes(DATA)
    os.link(dest / "old.bin", dest / "old.bin.part")
    (dest / "other.bin").write_bytes(DATA)
    (dest / "other.bin.part").write_bytes(b"another download's part")
    url = http_server.route("/old.bin", serve_data(DATA))
    for name in ("old.bin", "other.bin"):
        result = await fetch(client, url, dest, state=ItemState(name, '"v1"', True))
        assert result.path == str(dest / name)
    assert listing(dest) == ["old.bin", "other.bin", "other.bin.part"]
    assert http_server.requests_for("/old.bin") == []


async def test_a_part_name_fits_255_bytes_and_keeps_its_owner(
    http_server: HTTPTestServer, client: HTTPClient, dest: Path
) -> None:
    long_name = "é" * 125 + ".tar.gz"  # 257 bytes of UTF-8: cut to 255 for the final name
    url = http_server.route("/long", serve_data(DATA))
    recorder = Recorder()
    result = await fetch(client, url, dest, recorder=recorder, filename=long_name)
    assert result.error is None
    part = recorder.states[0].part
    assert part is not None
    assert len(part.encode()) <= 255
    assert part.startswith(".é")
    assert part.endswith(".gz.t1-0.part")
    assert len(Path(result.path or "").name.encode()) <= 255
    assert listing(dest) == [Path(result.path or "").name]


async def test_remove_partial_keeps_a_finished_file(dest: Path) -> None:
    """A cancel that came while the journal was taking "done": the part is still linked."""
    (dest / "kept.bin").write_bytes(DATA)
    os.link(dest / "kept.bin", dest / part("kept.bin"))
    assert not await remove_partial(dest, ItemState("kept.bin", '"v1"', True, part("kept.bin")))
    assert listing(dest) == ["kept.bin"]
