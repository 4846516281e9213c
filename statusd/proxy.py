"""Which proxy a download goes through: the daemon's ``http_proxy``, ``https_proxy`` and
``no_proxy`` (upper-case too), overridden by ``[downloads] proxy`` and ``no_proxy``.

Pure: no trio, no I/O, no import of the download engine, so the configuration can check a
proxy URL when it is read. ``ProxyRules.for_url`` is all the HTTP client asks.

A proxy is an ``http://`` URL (curl's rules: no scheme means ``http://``, no port means
1080); ``user:password@`` in it becomes a ``Proxy-Authorization: Basic`` header, which
``Proxy`` keeps out of its repr and ``str`` so that no log line, status message or error
can carry it. ``no_proxy`` is what the stdlib's ``proxy_bypass_environment`` understands:
comma-separated host names or domain suffixes (a leading dot is optional), ``host:port``,
or ``*`` for every host.
"""

from __future__ import annotations

import base64
import urllib.parse
import urllib.request
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


@attrs.frozen
class ProxyRules:
    """Which proxy each URL goes through; ``no_proxy`` as the stdlib reads it."""

    http: Proxy | None = None
    https: Proxy | None = None
    no_proxy: str | None = None

    def for_url(self, scheme: str, host: str, port: int) -> Proxy | None:
        proxy = self.https if scheme == "https" else self.http
        if proxy is None or not self.no_proxy:
            return proxy
        # "host:port" so that an entry with a port matches that port only; an IPv6 host
        # without brackets, as the stdlib splits the port off at the last colon.
        bypass = urllib.request.proxy_bypass_environment(  # type: ignore[attr-defined]
            f"{host}:{port}", {"no": self.no_proxy}
        )  # typeshed leaves it out; it is the rule urllib's own openers apply
        return None if bypass else proxy


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
    return ProxyRules(http, https, environment.no if no_proxy is None else no_proxy)


def _parsed(url: str | None, where: str) -> Proxy | None:
    if url is None:
        return None
    try:
        return parse_proxy(url)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
