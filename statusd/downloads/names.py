"""File names and URLs for downloads: turning what a request or a server says into one safe
path component, and checking a URL before any work starts.

Pure: no trio, no I/O. The download engine joins a name from here to its ``dest`` directory;
everything that could climb out of it (``/``, ``\\``, ``..``, a leading dot) or confuse a
terminal or a file manager (control and format characters) is taken out here, so the engine
never has to ask again.

Rules (property-tested in ``tests/test_names.py``):

- a safe name is one component: no ``/``, no ``\\``, no NUL, no control or invisible
  formatting character, never ``.`` or ``..``, never starting with a dot (a hidden file)
  or with whitespace, at most ``max_bytes`` bytes of UTF-8 (255 by default, the limit of
  Linux file systems), cut in the stem so that the extension survives;
- a numbered name puts the number before the last suffix: ``report.pdf`` ->
  ``report.1.pdf``, ``file.tar.gz`` -> ``file.tar.1.gz``, ``README`` -> ``README.1``
  (``curl``/``wget`` append ``.1`` at the very end, which hides the type from file
  managers; aria2 numbers the stem the same way we do).
"""

from __future__ import annotations

import email.message
import email.utils
import re
import unicodedata
import urllib.parse

import idna

MAX_NAME_BYTES = 255
# A suffix longer than this, or with spaces, is not an extension but part of the name
# ("notes.draft for review"); numbering and truncation then treat the name as one stem.
MAX_EXTENSION_BYTES = 16
MAX_URL_LENGTH = 8192
DIRECTORY_INDEX = "index.html"
SCHEMES = ("http", "https")

# Control (Cc), invisible formatting (Cf: bidi overrides that make "exe.txt" look like
# "txt.exe"), line/paragraph separators, lone surrogates (not encodable as UTF-8) and
# unassigned code points.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})
_REPLACEMENT = "_"
# Whitespace (str.isspace's set) and C0/C1 control characters.
_BAD_URL_CHARACTER = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")


def safe_filename(candidate: str, *, max_bytes: int = MAX_NAME_BYTES) -> str | None:
    """``candidate`` reduced to one safe path component, or None if nothing usable is left.

    Directories are dropped (the last non-empty component after splitting on ``/`` and
    ``\\`` is kept), unsafe characters become ``_``, leading dots and surrounding
    whitespace are stripped, and a name over ``max_bytes`` bytes of UTF-8 is shortened in
    its stem.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, not {max_bytes}")
    parts = [part for part in candidate.replace("\\", "/").split("/") if part]
    if not parts:
        return None
    name = parts[-1]
    if not (name.isascii() and name.isprintable()):  # the common case needs no lookups
        name = "".join(
            _REPLACEMENT if unicodedata.category(char) in _UNSAFE_CATEGORIES else char
            for char in name
        )
    start = 0
    while start < len(name) and (name[start] == "." or name[start].isspace()):
        start += 1
    name = name[start:].rstrip()
    if not name:
        return None
    return _fit(name, max_bytes)


def numbered(name: str, n: int, *, max_bytes: int = MAX_NAME_BYTES) -> str:
    """The ``n``-th alternative for ``name`` when it is taken: ``name.n.ext``.

    ``ext`` is the last suffix (see the module docstring); the stem is shortened if the
    result would exceed ``max_bytes``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, not {n}")
    stem, ext = _split_extension(name)
    tail = f".{n}{ext}"
    budget = max_bytes - len(tail.encode())
    stem = _cut_utf8(stem, budget)
    if not stem:
        raise ValueError(f"max_bytes must leave room for a name, not {max_bytes}")
    return stem + tail


def filename_from_content_disposition(header: str) -> str | None:
    """The safe file name a ``Content-Disposition`` header proposes (RFC 6266), or None.

    ``filename*`` (RFC 5987/2231, e.g. ``UTF-8''na%C3%AFve.txt``) wins over ``filename``;
    a ``filename*`` whose charset is missing is ignored, as RFC 6266 asks. Some servers
    send raw UTF-8 in ``filename=``; an HTTP stack hands that over decoded as Latin-1,
    and it is decoded again as UTF-8 when that is what it was.

    A header that starts with its parameters (``filename="x"``, no ``attachment``) is
    read as curl, wget and browsers read it. A header with an unterminated quote gives no
    name: where the name ends cannot be known, and the quote would end up in it. Quotes
    are counted as the email parser counts them when it splits the parameters.
    """
    if (header.count('"') - header.count('\\"')) % 2:
        return None
    if "=" in header.partition(";")[0]:
        header = f"attachment; {header}"
    message = email.message.Message()
    try:
        message["content-disposition"] = header
        params = message.get_params(header="content-disposition") or []
    except (ValueError, TypeError, IndexError):  # the email parser's reactions to junk
        return None
    plain: str | None = None
    extended: str | None = None
    for key, value in params[1:]:
        if key.lower() != "filename":
            continue
        if isinstance(value, tuple):
            charset = value[0]
            if charset and extended is None:
                extended = email.utils.collapse_rfc2231_value(value, errors="replace")
        elif plain is None:
            plain = email.utils.unquote(value)
    if extended is not None:
        return safe_filename(extended)
    if plain is not None:
        return safe_filename(_maybe_utf8(plain))
    return None


def filename_from_url(url: str) -> str | None:
    """The safe file name the last segment of ``url``'s path gives, percent-decoded, or None
    (no path, or a path ending in ``/``)."""
    try:
        path = urllib.parse.urlsplit(url).path
    except ValueError:
        return None
    segment = path.rsplit("/", 1)[-1]
    if not segment:
        return None
    return safe_filename(urllib.parse.unquote(segment, errors="replace"))


def directory_index(url: str) -> str | None:
    """``index.html`` when ``url`` names a directory (its path is empty or ends in ``/``),
    the name wget gives such a page; else None."""
    try:
        path = urllib.parse.urlsplit(url).path
    except ValueError:
        return None
    return DIRECTORY_INDEX if path.endswith("/") or not path else None


def validate_url(url: str) -> str:
    """``url`` if it is an absolute http or https URL with a host; else ValueError saying
    what is wrong, in words a caller can act on."""
    if not url:
        raise ValueError("url must not be empty")
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"url must be at most {MAX_URL_LENGTH} characters, not {len(url)}")
    if _BAD_URL_CHARACTER.search(url):
        raise ValueError("url must not contain whitespace or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"url is malformed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        shown = f"'{parts.scheme}'" if parts.scheme else "none"
        raise ValueError(f"url scheme must be http or https, not {shown}")
    if not parts.hostname:
        raise ValueError("url must have a host")
    if port == 0:
        raise ValueError("url port must be between 1 and 65535, not 0")
    try:
        if parts.hostname.isascii():
            parts.hostname.encode("idna")  # label lengths; DNS allows more than IDNA does
        else:
            idna.encode(parts.hostname, uts46=True)  # IDNA 2008, as statusd.downloads.http sends it
    except UnicodeError:
        raise ValueError(f"url host is not a valid host name: '{parts.hostname}'") from None
    return url


def _split_extension(name: str) -> tuple[str, str]:
    dot = name.rfind(".")
    if dot <= 0:
        return name, ""
    ext = name[dot:]
    if len(ext.encode()) > MAX_EXTENSION_BYTES or any(char.isspace() for char in ext):
        return name, ""
    return name[:dot], ext


def _fit(name: str, max_bytes: int) -> str | None:
    if len(name.encode()) <= max_bytes:
        return name
    stem, ext = _split_extension(name)
    stem = _cut_utf8(stem, max_bytes - len(ext.encode())).rstrip()
    if stem:
        return stem + ext
    # No room for the extension: keep the start of the name instead.
    return _cut_utf8(name, max_bytes).rstrip() or None


def _cut_utf8(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` bytes of UTF-8, never inside a character."""
    if max_bytes <= 0:
        return ""
    return text.encode()[:max_bytes].decode(errors="ignore")


def _maybe_utf8(value: str) -> str:
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value
