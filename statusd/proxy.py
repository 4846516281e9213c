"""Which proxy a download goes through: the daemon's ``http_proxy``, ``https_proxy`` and
``no_proxy`` (upper-case too), overridden by ``[downloads] proxy`` and ``no_proxy``.

Pure: no trio, no I/O, no import of the download engine, so the configuration can check a
proxy URL when it is read. ``ProxyRules.for_url`` is all the HTTP client asks.

A proxy is an ``http://`` URL (curl's rules: no scheme means ``http://``, no port means
1080); ``user:password@`` in it becomes a ``Proxy-Authorization: Basic`` header, which
``Proxy`` keeps out of its repr and ``str`` so that no log line, status message or error
can carry it. ``no_proxy`` (``NoProxy``) is comma-separated entries, as curl and the
stdlib's ``urllib`` read them: host names, each covering the names below it (a leading dot
is optional), ``host:port`` for that port only, IP addresses (``10.1.2.3``, ``::1``,
``[::1]:8080``) and CIDR blocks (``10.0.0.0/8``, ``fd00::/8``) matched against a URL whose
host is an IP address (no name is resolved to match one), and ``*`` for every host.
"""

from __future__ import annotations

import base64
import ipaddress
import urllib.parse
from collections.abc import Mapping

import attrs

DEFAULT_PROXY_PORT = 1080  # curl's; wget and aria2c make the port mandatory


@attrs.frozen
class ProxyEnvironment:
    """The proxy variables of the daemon's environment; None where unset or empty."""

    http: str | None = None
    https: str | None = None
    no: str | None = None

    @classmethod
    def read(cls, environ: Mapping[str, str]) -> ProxyEnvironment:
        # The stdlib's getproxies_environment() rule (the lower-case name wins, also when
        # it is set empty to turn the upper-case one off), which reads only os.environ.
        found: dict[str, str | None] = {}
        for upper_first in (True, False):
            for name, value in environ.items():
                key = name.lower()
                if key not in ("http_proxy", "https_proxy", "no_proxy"):
                    continue
                if upper_first == (name != key):
                    found[key] = value or None
        return cls(found.get("http_proxy"), found.get("https_proxy"), found.get("no_proxy"))


@attrs.frozen
class Proxy:
    """An HTTP proxy: where it is and the header that logs in to it (never shown)."""

    host: str
    port: int
    authorization: str | None = attrs.field(default=None, repr=False)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"proxy {host}:{self.port}"

    def headers(self) -> list[tuple[str, str]]:
        """What goes with every request to the proxy (and with CONNECT)."""
        if self.authorization is None:
            return []
        return [("Proxy-Authorization", self.authorization)]


def parse_proxy(url: str) -> Proxy:
    """The proxy ``url`` names, or ValueError saying what is wrong (never quoting it: it
    may hold a password)."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"proxy url is malformed: {_without_secrets(exc)}") from None
    if parts.scheme.lower() != "http":
        raise ValueError(f"proxy url scheme must be http, not '{parts.scheme}'")
    if not parts.hostname:
        raise ValueError("proxy url must have a host")
    if port == 0:
        raise ValueError("proxy url port must be between 1 and 65535, not 0")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("proxy url must be http://[user:password@]host[:port], with no path")
    authorization = None
    if parts.username is not None:
        # Percent-encoded in the URL, as curl reads it: a password may hold "@" or ":".
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        authorization = f"Basic {token}"
    return Proxy(parts.hostname, port or DEFAULT_PROXY_PORT, authorization)


def _without_secrets(exc: ValueError) -> str:
    # urlsplit's messages name the problem ("Port out of range 0-65535"), never the URL.
    text = str(exc)
    return text[:1].lower() + text[1:]


def hide_password(url: str) -> str:
    """``url`` (with or without a scheme) with the password of its userinfo as ``***``:
    how a proxy URL is shown (``statusd --check-config``, the log of a reload)."""
    scheme, separator, rest = url.rpartition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}{separator}{user}:***@{host}"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@attrs.frozen
class NoProxy:
    """``no_proxy`` read once (a request asks it for every connection): its host names
    and its IP networks (an address is a network of one), each with the port it is
    limited to (None: every port)."""

    everything: bool = False
    names: tuple[tuple[str, int | None], ...] = ()
    networks: tuple[tuple[Network, int | None], ...] = ()

    @classmethod
    def parse(cls, text: str) -> NoProxy:
        """Raises ValueError naming an entry with a ``/`` that is not an IP network
        (``10.0.0.0/33``): a block meant to bypass the proxy must not silently not."""
        everything = False
        names: list[tuple[str, int | None]] = []
        networks: list[tuple[Network, int | None]] = []
        for raw in text.split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            if entry == "*":
                everything = True
            elif "/" in entry:
                networks.append((_network(entry), None))
            else:
                host, port = _split_port(entry)
                address = _address(host)
                if address is not None:
                    networks.append((ipaddress.ip_network(address), port))
                else:
                    names.append((host.lstrip("."), port))
        return cls(everything, tuple(names), tuple(networks))

    def bypasses(self, host: str, port: int) -> bool:
        """Whether a connection to ``host`` (a name, or an IP address, IPv6 without
        brackets) on ``port`` goes without the proxy."""
        if self.everything:
            return True
        if not self.names and not self.networks:
            return False
        host = host.lower()
        address = _address(host)
        if address is None:
            return any(
                (host == name or host.endswith("." + name)) and wanted in (None, port)
                for name, wanted in self.names
            )
        # An IPv4 peer written as IPv6 (::ffff:10.1.2.3) is in the IPv4 blocks too.
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        return any(
            (address in network or (mapped is not None and mapped in network))
            and wanted in (None, port)
            for network, wanted in self.networks
        )


def _network(entry: str) -> Network:
    try:
        # Host bits set (10.1.2.3/8) mean the block they are in, as curl reads them.
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        raise ValueError(
            f"entry '{entry}' must be an IP network such as 10.0.0.0/8 or fd00::/8"
        ) from None


def _split_port(entry: str) -> tuple[str, int | None]:
    """``host:port`` (``[v6]:port``) into its parts; a bare IPv6 address has no port."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return host, int(port) if port.isdigit() else None
    host, colon, port = entry.rpartition(":")
    if colon and port.isdigit() and ":" not in host:
        return host, int(port)
    return entry, None


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@attrs.frozen
class ProxyRules:
    """Which proxy each URL goes through, and which hosts bypass it (``no_proxy``)."""

    http: Proxy | None = None
    https: Proxy | None = None
    no_proxy: str | None = None
    _bypass: NoProxy = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_bypass", NoProxy.parse(self.no_proxy or ""))

    def for_url(self, scheme: str, host: str, port: int) -> Proxy | None:
        proxy = self.https if scheme == "https" else self.http
        if proxy is None or self._bypass.bypasses(host, port):
            return None
        return proxy


def proxy_rules(
    proxy: str | None, no_proxy: str | None, environment: ProxyEnvironment
) -> ProxyRules:
    """The rules from ``[downloads] proxy`` and ``no_proxy`` (each wins when set; an
    empty ``proxy`` means none, whatever the environment says) and the environment.
    Raises ValueError naming the variable or key whose proxy URL is bad."""
    if proxy is not None:
        chosen = _parsed(proxy, "downloads.proxy") if proxy else None
        http = https = chosen
    else:
        http = _parsed(environment.http, "http_proxy")
        https = _parsed(environment.https, "https_proxy")
    where = "no_proxy" if no_proxy is None else "downloads.no_proxy"
    try:
        return ProxyRules(http, https, environment.no if no_proxy is None else no_proxy)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _parsed(url: str | None, where: str) -> Proxy | None:
    if url is None:
        return None
    try:
        return parse_proxy(url)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
