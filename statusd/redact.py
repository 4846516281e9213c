"""URL redaction for text that other people read: status messages and the log.

Pure. A URL keeps its scheme, host, port and path, so a reader still sees what was
fetched; its userinfo (credentials) goes, and its query string and fragment become ``?…``
and ``#…``, since signed links carry their secrets there
(``http://host/report-q3.pdf?signature=...``). The full URL stays where only its owner
reads it: the task itself (``tasks.get``).

Only text with a scheme (``https://``) is taken for a URL; ``user:pass@host`` alone is not.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from statusd.state.status import truncate_message

# A scheme is at most 32 characters here (RFC 3986 sets no bound, real ones are short): an
# unbounded one would make a long run of letters without "://" quadratic to scan. Closing
# punctuation at the end is the sentence's, not the URL's ("failed: http://h/a?x=1: 403").
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,31}://(?:[^\s<>\"'`]*[^\s<>\"'`.,:;!?)\]}])?")
# A URL longer than this that runs past what is read is cut, and redacted as a cut one.
MAX_URL_CHARS = 8192
HIDDEN = "…"


def redact_url(url: str) -> str:
    """``url`` without userinfo, with its query and fragment replaced by ``?…``, ``#…``.

    Never longer than ``url``. What does not parse keeps only its scheme (``http://…``).
    """
    scheme, separator, _rest = url.partition("://")
    if not separator:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # "http://[::1": a host that does not parse may hide anything
        return f"{scheme}://{HIDDEN}"
    host = parts.netloc.rpartition("@")[2]
    redacted = f"{scheme}://{host}{parts.path}"
    if parts.query:
        redacted += f"?{HIDDEN}"
    if parts.fragment:
        redacted += f"#{HIDDEN}"
    return redacted


def hide_credentials(url: str) -> str:
    """``url`` with its userinfo, if any, as ``***`` (``http://***@host/path?q``): how a
    download's URL is shown to its owner (``tasks.get``, ``tasks.list``); the query stays,
    as it does there. Without userinfo, ``url`` itself."""
    scheme, separator, rest = url.partition("://")
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    _userinfo, at, host = rest[:end].rpartition("@")
    if not (separator and at):
        return url
    return f"{scheme}://***@{host}{rest[end:]}"


def redact_urls_in(text: str, *, limit: int) -> str:
    """``text`` with every URL in it redacted (``redact_url``), cut to ``limit`` characters
    as ``truncate_message`` cuts (the first ``limit - 3`` and ``"..."``).

    URLs are redacted before the cut, so a long query string costs no words after it; only
    the first ``limit + MAX_URL_CHARS`` characters are read, so a huge text costs no more
    than that.
    """
    if limit < 4:
        raise ValueError(f"limit must be >= 4, not {limit}")
    read = limit + MAX_URL_CHARS
    if len(text) <= read:
        return truncate_message(_URL.sub(_redacted, text), limit)
    window = text[:read]
    return truncate_message(_URL.sub(lambda match: _cut_at(match, read), window), limit)


def _redacted(match: re.Match[str]) -> str:
    return redact_url(match.group())


def _cut_at(match: re.Match[str], end: int) -> str:
    url = match.group()
    scheme, _, rest = url.partition("://")
    if match.end() == end and not any(mark in rest for mark in "/?#"):
        # Cut inside its host part: a password without its "@" would pass for a host.
        return f"{scheme}://{HIDDEN}"
    return redact_url(url)
