"""What a failed download says, against real listeners on 127.0.0.1: a host that does not
resolve, https to a plain HTTP port, a TLS alert, an empty reply. Each message names what
happened in words a user can act on (never an errno of another kind passed to strerror),
and a failure that asking again cannot fix ends the item after one attempt.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from statusd.downloads import DownloadItem, DownloadSettings, ItemResult, ItemState, download_item
from statusd.downloads.http import HTTPClient, ProtocolError, ResolveError

FAST = DownloadSettings(backoff_initial=0.01, backoff_max=0.05, read_timeout=5.0, max_attempts=3)
UNRESOLVABLE = "nonexistent.invalid"  # RFC 2606: .invalid never resolves
# A fatal TLS alert record: protocol_version (70), what a server that wants another TLS
# version answers to our ClientHello.
PROTOCOL_VERSION_ALERT = b"\x15\x03\x03\x00\x02\x02\x46"


class CountingResolver(trio.abc.HostnameResolver):
    """The system's resolver, counting the names asked for; or, with ``error``, a resolver
    that cannot answer (what a real one does only when its servers are down)."""

    def __init__(self, error: int | None = None) -> None:
        self.asked: list[bytes | None] = []
        self.error = error

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[Any]:
        self.asked.append(host)
        if self.error is not None:
            raise socket.gaierror(self.error, "Temporary failure in name resolution")
        return await trio.to_thread.run_sync(
            socket.getaddrinfo, host, port, family, type, proto, flags
        )

    async def getnameinfo(
        self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int
    ) -> tuple[str, str]:
        raise NotImplementedError


@pytest.fixture
async def resolver() -> AsyncIterator[CountingResolver]:
    resolver = CountingResolver()
    previous = trio.socket.set_custom_hostname_resolver(resolver)
    try:
        yield resolver
    finally:
        trio.socket.set_custom_hostname_resolver(previous)


async def fetch(url: str, tmp_path: Path) -> ItemResult:
    async with HTTPClient() as client:
        return await download_item(client, DownloadItem(url), tmp_path, FAST, ItemState())


async def listen(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> int:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def read_then_close(stream: trio.SocketStream) -> None:
    """Reads what the client sends first (so closing sends a FIN, not a reset), answers
    nothing."""
    with trio.move_on_after(5):
        await stream.receive_some(65536)
    await stream.aclose()


# -- a host that does not resolve -------------------------------------------------------------


async def test_a_host_that_does_not_resolve_fails_after_one_attempt(
    resolver: CountingResolver, tmp_path: Path
) -> None:
    try:
        socket.getaddrinfo(UNRESOLVABLE, 80)
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:
            pytest.skip(f"the resolver here cannot answer at all ({exc.strerror})")
    result = await fetch(f"http://{UNRESOLVABLE}/file.iso", tmp_path)
    assert result.error == f"could not resolve host {UNRESOLVABLE}"
    assert resolver.asked == [UNRESOLVABLE.encode()]  # once: no retry, no backoff


async def test_a_resolver_that_cannot_answer_now_is_retried(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    resolver = CountingResolver(error=socket.EAI_AGAIN)
    previous = trio.socket.set_custom_hostname_resolver(resolver)
    try:
        result = await fetch("http://files.example.test/a.iso", tmp_path)
    finally:
        trio.socket.set_custom_hostname_resolver(previous)
    assert result.error == (
        "could not resolve host files.example.test: temporary failure in name resolution"
        " (gave up after 3 attempts)"
    )
    assert len(resolver.asked) == 3


async def test_the_client_raises_a_resolve_error(resolver: CountingResolver) -> None:
    async with HTTPClient() as client:
        with pytest.raises(ResolveError) as caught:
            async with client.stream("GET", f"http://{UNRESOLVABLE}:8080/"):
                pass
    assert str(caught.value).startswith(f"could not resolve host {UNRESOLVABLE}")
    assert "unknown error" not in str(caught.value)


# -- TLS ----------------------------------------------------------------------------------


async def test_https_to_a_plain_http_port_says_so(nursery: trio.Nursery, tmp_path: Path) -> None:
    async def plain_http(stream: trio.SocketStream) -> None:
        # What nginx or python -m http.server answer to a ClientHello read as a request.
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()

    port = await listen(nursery, plain_http)
    result = await fetch(f"https://127.0.0.1:{port}/x.bin", tmp_path)
    assert result.error == (
        f"tls handshake with 127.0.0.1:{port} failed: wrong version number: is this an https port?"
    )  # once, not "(gave up after ...)"; and never "operation not permitted"


async def test_a_tls_alert_is_named_by_its_reason(nursery: trio.Nursery, tmp_path: Path) -> None:
    async def refuse_version(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)  # the ClientHello
        await stream.send_all(PROTOCOL_VERSION_ALERT)
        await stream.aclose()

    port = await listen(nursery, refuse_version)
    result = await fetch(f"https://127.0.0.1:{port}/x.bin", tmp_path)
    assert result.error == (
        f"tls handshake with 127.0.0.1:{port} failed: tlsv1 alert protocol version"
    )


async def test_a_server_that_hangs_up_in_the_handshake(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    port = await listen(nursery, read_then_close)
    result = await fetch(f"https://127.0.0.1:{port}/x.bin", tmp_path)
    assert result.error == (
        f"tls handshake with 127.0.0.1:{port} failed: "
        "the server closed the connection during the tls handshake"
    )


# -- an empty reply -----------------------------------------------------------------------


async def test_an_empty_reply_says_the_server_closed_without_answering(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    port = await listen(nursery, read_then_close)
    result = await fetch(f"http://127.0.0.1:{port}/x.bin", tmp_path)
    # A server failure, so it is worth another attempt, unlike the ones above.
    assert result.error == (
        f"127.0.0.1:{port}: the server closed the connection without answering"
        " (gave up after 3 attempts)"
    )


async def test_a_head_cut_off_says_where(nursery: trio.Nursery) -> None:
    async def half_a_head(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Le")
        await stream.aclose()

    port = await listen(nursery, half_a_head)
    async with HTTPClient() as client:
        with pytest.raises(ProtocolError) as caught:
            async with client.stream("GET", f"http://127.0.0.1:{port}/"):
                pass
    assert str(caught.value) == (
        f"127.0.0.1:{port} closed the connection in the middle of the response head"
    )
