"""Pure rules for the dashboard's plain HTTP on the WebSocket port: which requests are
upgrades to hand on, which files may be served, and the headers every answer carries.

The WebSocket listener reads each request's head with h11 (``statusd.transports.front``);
a request that asks for a WebSocket goes on to trio-websocket and its checks untouched,
any other is answered here: ``GET``/``HEAD`` of a file in ``ASSETS`` (from the package's
``statusd/web``), 404 for any other path, 405 for any other method, 403 for a Host that is
not ours. Every answer closes the connection.

No trio, no sockets: h11 events and bytes in, bytes out.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

import attrs
import h11

from statusd.protocol.websocket import Refusal, host_name, normalize_origin


@attrs.frozen
class Asset:
    """One file the dashboard is made of."""

    resource: str  # its name in the package statusd.web
    content_type: str
    cache_control: bytes


# The only paths answered with a file: a fixed list, never a path joined from the request.
ASSETS: Mapping[str, Asset] = {
    # no-store: the page is the entry point a fresh link opens; it must never be a stale copy.
    "/": Asset("index.html", "text/html; charset=utf-8", b"no-store"),
    # no-cache: the browser may keep them, but asks (the daemon answers 200 each time).
    "/dashboard.js": Asset("dashboard.js", "text/javascript; charset=utf-8", b"no-cache"),
    "/dashboard.css": Asset("dashboard.css", "text/css; charset=utf-8", b"no-cache"),
}


def is_upgrade(request: h11.Request) -> bool:
    """Whether a request asks for a WebSocket (``Upgrade: websocket``): those go on to the
    WebSocket handshake and its checks, whatever their path."""
    for name, value in request.headers:
        if name == b"upgrade" and b"websocket" in value.lower():
            return True
    return False


def content_security_policy(host: str) -> bytes:
    """The page may run its own script and style and talk to its own socket, nothing else.
    ``connect-src 'self'`` covers ``ws://`` to the same host and port in CSP Level 3, but
    older browsers matched only the page's own scheme: the socket is also named.
    ``host`` is a Host header that ``check_host`` accepted (a name we know, digits for the
    port), so it cannot break out of the header."""
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        f"connect-src 'self' ws://{host}; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ).encode("ascii")


def security_headers(host: str | None) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        # Another site may neither frame the page (clickjacking its buttons) nor load its
        # files into its own pages.
        (b"x-frame-options", b"DENY"),
        (b"cross-origin-resource-policy", b"same-origin"),
    ]
    if host is not None:
        headers.insert(0, (b"content-security-policy", content_security_policy(host)))
    return headers


def page_origin(host: str | None) -> str | None:
    """The origin of a page served to this Host header (``http://127.0.0.1:8765``): a
    WebSocket from it is the dashboard's own, allowed without an ``allowed_origins``
    entry. None for a header ``host_name`` cannot read."""
    if host is None or host_name(host) is None:
        return None
    return normalize_origin(f"http://{host.strip()}")


def answer(
    request: h11.Request,
    host_refusal: Refusal | None,
    files: Mapping[str, bytes],
) -> bytes:
    """The whole response (head and body) to a request that is not an upgrade.
    ``files`` maps each asset's resource name to its bytes."""
    method = request.method.upper()
    host = _header(request, b"host")
    if host_refusal is not None:
        return _text(host_refusal.status, host_refusal.message, None)
    path = urlsplit(request.target.decode("latin-1")).path
    asset = ASSETS.get(path)
    if asset is None:
        return _text(404, f"no such path {path!r}: / is the dashboard, /ws the WebSocket", host)
    if method not in (b"GET", b"HEAD"):
        return _text(405, f"method {method.decode('latin-1')!r} is not allowed: GET or HEAD", host)
    body = files[asset.resource]
    headers = [
        (b"content-type", asset.content_type.encode("ascii")),
        (b"cache-control", asset.cache_control),
        *security_headers(host),
    ]
    return _response(200, headers, body, send_body=method == b"GET")


def _header(request: h11.Request, name: bytes) -> str | None:
    for header, value in request.headers:
        if header == name:
            return value.decode("latin-1").strip()
    return None


def _text(status: int, message: str, host: str | None) -> bytes:
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"cache-control", b"no-store"),
        *security_headers(host),
    ]
    if status == 405:
        headers.append((b"allow", b"GET, HEAD"))
    return _response(status, headers, f"{status} {message}\n".encode())


def _response(
    status: int, headers: list[tuple[bytes, bytes]], body: bytes, send_body: bool = True
) -> bytes:
    server = h11.Connection(h11.SERVER)
    head = h11.Response(
        status_code=status,
        headers=[
            *headers,
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ],
    )
    parts = [server.send(head), server.send(h11.Data(data=body)) if send_body else b""]
    return b"".join(part or b"" for part in parts)
