"""What a caller may send as an HTTP header with a download: a field name that is an
RFC 9110 token, a value of printable ASCII, and none of the headers statusd writes itself.

Pure, and kept apart from statusd.downloads so that statusctl checks ``--header`` with
the daemon's own rule (and words) without importing the download engine.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# RFC 9110 token characters: what a field name may be made of.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A field value: printable ASCII, inner spaces and tabs. No CR, LF or NUL, so a value
# cannot split the request; ASCII because that is what h11 writes.
_VALUE = re.compile(r"([\x21-\x7e]([\x20-\x7e\t]*[\x21-\x7e])?)?")
# Headers statusd writes itself: framing, the connection, resume, and the proxy's login.
RESERVED = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "range",
        "if-range",
        "proxy-authorization",
        "proxy-connection",
    }
)
Header = tuple[str, str]


def check_headers(headers: Mapping[str, str]) -> tuple[Header, ...]:
    """``headers`` as pairs, or ValueError saying which one is wrong and why (never
    quoting a value: it may be a secret)."""
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"header name {name!r} is not an HTTP token")
        if name.lower() in RESERVED:
            raise ValueError(f"header {name!r} is set by statusd and cannot be given")
        if not _VALUE.fullmatch(value):
            raise ValueError(
                f"header {name!r} value must be printable ASCII (no CR, LF or other control "
                "characters, no leading or trailing space)"
            )
    return tuple(headers.items())
