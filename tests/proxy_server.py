"""A real forward HTTP proxy on 127.0.0.1 for tests, and a TLS origin with a test CA.

``ProxyTestServer`` speaks HTTP/1.1 with h11 on both sides: an absolute-form request is
sent on to its origin (origin-form, without ``Proxy-Authorization``) and the answer back,
keeping the client's connection alive; ``CONNECT host:port`` opens a tunnel. It can
demand credentials (407) and refuse CONNECT with any status. Every request it received
is in ``requests``, with the connection it came on.

``tls_files`` makes a CA and a certificate for ``localhost`` and ``127.0.0.1`` with the
``openssl`` command (skipping, saying why, when there is none); ``TLSTestServer`` is
``HTTPTestServer`` behind TLS with it.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import shutil
import ssl
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import attrs
import h11
import pytest
import trio

from tests.http_servers import HTTPTestServer


@attrs.frozen
class ProxyRequest:
    method: str
    target: str
    headers: dict[str, str]  # names lowercased
    connection: int


class ProxyTestServer:
    def __init__(self, *, credentials: str | None = None, connect_status: int = 200) -> None:
        self.credentials = credentials  # "user:password" the proxy demands
        self.connect_status = connect_status  # what CONNECT is answered with
        self.requests: list[ProxyRequest] = []
        self.port = 0
        self._connections = itertools.count(1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_with(self, credentials: str) -> str:
        return f"http://{credentials}@127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        return len({request.connection for request in self.requests})

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        number = next(self._connections)
        client = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await _next_event(client, stream)
                if not isinstance(request, h11.Request):
                    return
                headers = {
                    name.decode().lower(): value.decode("latin-1")
                    for name, value in request.headers
                }
                self.requests.append(
                    ProxyRequest(request.method.decode(), request.target.decode(), headers, number)
                )
                if not self._allowed(headers):
                    await _answer(client, stream, 407, [("Proxy-Authenticate", 'Basic realm="t"')])
                    return
                if request.method == b"CONNECT":
                    await self._tunnel(client, stream, request.target.decode())
                    return
                if not await self._forward(client, stream, request):
                    return
                client.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    def _allowed(self, headers: dict[str, str]) -> bool:
        if self.credentials is None:
            return True
        token = base64.b64encode(self.credentials.encode()).decode()
        return headers.get("proxy-authorization") == f"Basic {token}"

    async def _tunnel(self, client: h11.Connection, stream: trio.SocketStream, target: str) -> None:
        if self.connect_status != 200:
            await _answer(client, stream, self.connect_status, [])
            return
        host, _, port = target.rpartition(":")
        try:
            origin = await trio.open_tcp_stream(host.strip("[]"), int(port))
        except OSError:
            await _answer(client, stream, 502, [])
            return
        await stream.send_all(client.send(h11.Response(status_code=200, headers=[])) or b"")
        async with origin, trio.open_nursery() as nursery:

            async def pipe(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
                with contextlib.suppress(trio.BrokenResourceError):
                    while data := await source.receive_some(65536):
                        await sink.send_all(data)
                nursery.cancel_scope.cancel()

            nursery.start_soon(pipe, stream, origin)
            nursery.start_soon(pipe, origin, stream)

    async def _forward(
        self, client: h11.Connection, stream: trio.SocketStream, request: h11.Request
    ) -> bool:
        while not isinstance(await _next_event(client, stream), h11.EndOfMessage):
            pass
        url = urllib.parse.urlsplit(request.target.decode())
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        headers = [(n, v) for n, v in request.headers if n.lower() != b"proxy-authorization"]
        assert url.hostname is not None
        async with await trio.open_tcp_stream(url.hostname, url.port or 80) as origin:
            upstream = h11.Connection(h11.CLIENT)
            head = upstream.send(h11.Request(method=request.method, target=target, headers=headers))
            await origin.send_all((head or b"") + (upstream.send(h11.EndOfMessage()) or b""))
            while True:
                event = await _next_event(upstream, origin)
                if isinstance(event, h11.Response):
                    event = h11.Response(
                        status_code=event.status_code, headers=event.headers, reason=event.reason
                    )
                elif isinstance(event, h11.ConnectionClosed):
                    return False
                await stream.send_all(client.send(event) or b"")
                if isinstance(event, h11.EndOfMessage):
                    return client.our_state is h11.DONE and client.their_state is h11.DONE


async def _next_event(connection: h11.Connection, stream: trio.abc.Stream) -> Any:
    while True:
        event = connection.next_event()
        if event is not h11.NEED_DATA:
            return event
        connection.receive_data(bytes(await stream.receive_some(65536)))


async def _answer(
    connection: h11.Connection,
    stream: trio.abc.Stream,
    status: int,
    headers: list[tuple[str, str]],
) -> None:
    response = h11.Response(status_code=status, headers=[*headers, ("Content-Length", "0")])
    await stream.send_all(
        (connection.send(response) or b"") + (connection.send(h11.EndOfMessage()) or b"")
    )


@attrs.frozen
class TLSFiles:
    ca: Path
    certificate: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(self.certificate), str(self.key))
        return context


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command to make a test CA with")
    where = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=where, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=statusd test CA",
    )
    run("req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=localhost")
    (where / "leaf.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run(
        "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "leaf.pem", "-days", "2", "-extfile", "leaf.ext",
    )  # fmt: skip
    return TLSFiles(where / "ca.pem", where / "leaf.pem", where / "leaf.key")


class TLSTestServer(HTTPTestServer):
    """``HTTPTestServer`` behind TLS; ``base_url`` is ``https://127.0.0.1:PORT``."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__()
        self._context = context

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_ssl_over_tcp_listeners(
            0, self._context, host="127.0.0.1", https_compatible=True
        )
        transport = listeners[0].transport_listener
        assert isinstance(transport, trio.SocketListener)
        self.port = transport.socket.getsockname()[1]
        self.base_url = f"https://127.0.0.1:{self.port}"
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)
