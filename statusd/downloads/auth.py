"""Credentials for downloads: the headers a caller may give, Basic credentials from a URL's
``user:password@`` or from netrc, and the rule for where they may go.

Pure but for ``read_netrc`` (a blocking file read, for a thread). The rule (curl's since
7.83): an item's headers and credentials go only to the scheme, host and port of the URL
it was given; after a redirect anywhere else none of them is sent.
"""

from __future__ import annotations

import base64
import netrc
import urllib.parse
from collections.abc import Iterable

# The rules for what a caller may send live in statusd.protocol.headers, where statusctl
# checks them too without importing the download engine.
from statusd.protocol.headers import RESERVED as RESERVED
from statusd.protocol.headers import Header as Header
from statusd.protocol.headers import check_headers as check_headers


def header_bytes(headers: Iterable[Header]) -> int:
    """What ``headers`` take on the wire: ``Name: value`` and CRLF each."""
    return sum(len(name) + len(value) + 4 for name, value in headers)


def merged(task: Iterable[Header], item: Iterable[Header]) -> tuple[Header, ...]:
    """The task's headers and the item's, an item's winning over a task's of the same name."""
    own = tuple(item)
    names = {name.lower() for name, _ in own}
    return tuple(pair for pair in task if pair[0].lower() not in names) + own


def basic(user: str, password: str) -> str:
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


def has_userinfo(url: str) -> bool:
    return "@" in urllib.parse.urlsplit(url).netloc


def url_authorization(url: str) -> str | None:
    """``Authorization: Basic`` from ``url``'s ``user:password@`` (percent-decoded, as
    curl reads it), or None when it has none."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return None
    return basic(urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))


def request_headers(url: str, headers: Iterable[Header]) -> list[Header]:
    """What goes with a request to ``url``'s own origin: ``headers`` and, unless they
    already log in, the URL's Basic credentials."""
    pairs = list(headers)
    authorization = url_authorization(url)
    if authorization is not None and not any(n.lower() == "authorization" for n, _ in pairs):
        pairs.append(("Authorization", authorization))
    return pairs


def same_origin(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` have the same scheme, host and port (default ports filled)."""
    return _origin(a) == _origin(b)


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, parts.hostname, parts.port or {"http": 80, "https": 443}.get(scheme)


def read_netrc(path: str | None = None) -> netrc.netrc | None:
    """The daemon user's netrc (``~/.netrc``, or ``path``), or None when there is none.
    Raises ``netrc.NetrcParseError`` for a file that does not parse, or that others may
    read while it holds a password (the stdlib's check)."""
    try:
        return netrc.netrc(path)
    except FileNotFoundError:
        return None


def netrc_authorization(entries: netrc.netrc, url: str) -> str | None:
    """``Authorization: Basic`` for ``url``'s host from netrc (its ``default`` entry when
    no machine matches, as curl and the stdlib read it), or None."""
    host = urllib.parse.urlsplit(url).hostname
    found = entries.authenticators(host) if host else None
    if found is None:
        return None
    login, _account, password = found
    return basic(login, password or "")
