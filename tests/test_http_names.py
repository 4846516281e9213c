"""The HTTP client: the host a URL names, as it goes to DNS, TLS (SNI) and the Host header."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from statusd.downloads.http import HTTPClient, HTTPError, Origin, _ascii_host, split_url
from tests import http_servers
from tests.http_servers import HTTPTestServer, serve_data

http_server = http_servers.http_server  # the fixture


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        # IDNA 2003 (Python's codec) maps ß to ss: fass.de, somebody else's host.
        ("http://faß.de/x", Origin("http", "xn--fa-hia.de", 80)),
        ("https://ÖBB.at/", Origin("https", "xn--bb-eka.at", 443)),
        ("http://xn--fa-hia.de/", Origin("http", "xn--fa-hia.de", 80)),
        ("http://Example.COM:8080/", Origin("http", "example.com", 8080)),
        ("http://my_host.lan/", Origin("http", "my_host.lan", 80)),
        ("http://127.0.0.1:8080/", Origin("http", "127.0.0.1", 8080)),
        ("http://[::1]:8080/", Origin("http", "::1", 8080)),
    ],
)
def test_split_url_gives_the_ascii_host(url: str, origin: Origin) -> None:
    assert split_url(url)[0] == origin


@pytest.mark.parametrize("host", ["☃.com", "😀.example", "ä" * 64 + ".de"])
def test_split_url_refuses_a_host_idna_2008_refuses(host: str) -> None:
    with pytest.raises(ValueError, match="url host is not a valid host name"):
        split_url(f"http://{host}/")


def test_ascii_host_is_idna_2008() -> None:
    assert _ascii_host("faß.de") == "xn--fa-hia.de"
    assert _ascii_host("[::1]") == "[::1]"


class LoopbackResolver(trio.abc.HostnameResolver):
    """Every name resolves to 127.0.0.1; the names asked for are kept."""

    def __init__(self) -> None:
        self.asked: list[bytes | str | None] = []

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
        return await trio.socket.getaddrinfo("127.0.0.1", port, family, type, proto, flags)

    async def getnameinfo(
        self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int
    ) -> tuple[str, str]:
        raise NotImplementedError


@pytest.fixture
async def resolver() -> AsyncIterator[LoopbackResolver]:
    resolver = LoopbackResolver()
    previous = trio.socket.set_custom_hostname_resolver(resolver)
    try:
        yield resolver
    finally:
        trio.socket.set_custom_hostname_resolver(previous)


async def test_dns_and_host_header_get_the_idna_2008_name(
    http_server: HTTPTestServer, resolver: LoopbackResolver
) -> None:
    http_server.route("/f", serve_data(b"data"))
    async with (
        HTTPClient() as client,
        client.stream("GET", f"http://faß.de:{http_server.port}/f") as response,
    ):
        assert await response.read() == b"data"
    assert resolver.asked == [b"xn--fa-hia.de"]
    assert http_server.requests[0].headers["host"] == f"xn--fa-hia.de:{http_server.port}"


async def test_tls_asks_for_the_idna_2008_name(
    nursery: trio.Nursery, resolver: LoopbackResolver
) -> None:
    # The server name (SNI) in the ClientHello is also what the certificate is checked
    # against. The ssl module alone would encode a str name as IDNA 2003 (fass.de);
    # trio's SSLStream already did better, and the A-label it now gets must stay so.
    hello = bytearray()

    async def read_hello(stream: trio.SocketStream) -> None:
        with trio.move_on_after(5):
            while b"xn--" not in hello and b"fass" not in hello and len(hello) < 4096:
                data = await stream.receive_some(4096)
                if not data:
                    break
                hello.extend(data)
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, read_hello, listeners)
    async with HTTPClient() as client:
        with pytest.raises(HTTPError):
            async with client.stream("GET", f"https://faß.de:{port}/"):
                pass
    assert b"xn--fa-hia.de" in hello
    assert b"fass.de" not in hello
