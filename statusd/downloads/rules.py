"""What a download does with a server's answer: the rules, as pure functions.

Resume (RFC 9110 14 and 13.1.5), the 416 rule, redirect targets, which failures are worth
another attempt and how long to wait, when a transfer is too slow to keep its slot
(``StallWatch``), and the parsing of the headers these rules read.
Everything here takes values in and gives a decision out; the engine (``engine.py``) does
the I/O. Tested as tables in ``tests/test_download_rules.py``.

Pure: no trio, no I/O, no clock (callers pass ``now``). Must not depend on the engine.
"""

from __future__ import annotations

import http
import math
import re
import urllib.parse
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Protocol

import attrs

from statusd.downloads import names

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRY_STATUSES = frozenset({429})  # and every 5xx
RANGE_NOT_SATISFIABLE = 416
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)", re.IGNORECASE)


class HeaderSource(Protocol):
    def get(self, name: str) -> str | None: ...


# --- decisions ------------------------------------------------------------------------


@attrs.frozen
class Append:
    """Write the body at ``start`` (0: from the beginning) of an entity of ``total`` bytes
    (None: unknown), which ``validator`` names."""

    start: int
    total: int | None
    validator: str | None


@attrs.frozen
class Restart:
    """The answer cannot be appended to what the part holds: ask again without a range."""


@attrs.frozen
class Reject:
    """The item fails with ``message``."""

    message: str


@attrs.frozen
class Retry:
    """This attempt failed in a way worth another; ``delay`` is what the server asked."""

    message: str
    delay: float | None = None


@attrs.frozen
class Complete:
    """The part already holds the whole entity (a 416 for a range starting at its end);
    ``verify`` says the item's sha256 must be checked before the part is accepted."""

    verify: bool


def body_decision(
    status: int,
    headers: HeaderSource,
    offset: int,
    stored_validator: str | None,
    stored_length: int | None = None,
) -> Append | Restart | Reject:
    """What to do with a 2xx answer to a request that asked for bytes from ``offset`` on
    (0: no range) with ``stored_validator`` in If-Range, or, without a validator, for the
    rest of an entity of ``stored_length`` bytes (``resume_length``).

    A 206 from ``offset`` with the same validator (or none) is appended; without a
    validator only when its Content-Range total is ``stored_length``. A 200 is the whole
    entity from zero; a 206 from elsewhere, with another validator or another total is
    asked for again without a range; a 206 to a request without range is refused.
    """
    tag = validator(headers)
    length = content_length(headers.get("content-length"))
    if status != 206:
        return Append(0, length, tag)
    span = content_range(headers.get("content-range"))
    if offset > 0:
        if span is None or span[0] != offset or (tag is not None and tag != stored_validator):
            return Restart()
        if stored_validator is None and (span[2] is None or span[2] != stored_length):
            return Restart()
        total = span[2] if span[2] is not None else _add(offset, length)
        return Append(offset, total, stored_validator)
    if span is not None and span[0] == 0:
        return Append(0, span[2] if span[2] is not None else length, tag)
    return Reject("server answered 206 partial content to a request without range")


def range_not_satisfiable(
    headers: HeaderSource,
    offset: int,
    stored_validator: str | None,
    has_sha256: bool,
    stored_length: int | None = None,
) -> Complete | Restart:
    """A 416 to ``Range: bytes=OFFSET-``. ``Content-Range: bytes */N`` with N == offset
    says the part already holds all N bytes (a body that arrived whole on a connection
    that broke before its end): complete it, as curl and aria2 do, once the item's sha256
    agrees, or else when the answer's validator is the one the part was fetched under,
    or, for a part fetched without one, when N is the length its server gave then and
    the answer carries no validator either (``resume_length``'s trade-off).
    Any other 416 restarts without a range."""
    if offset <= 0 or unsatisfied_range_total(headers.get("content-range")) != offset:
        return Restart()
    if has_sha256:
        return Complete(verify=True)
    tag = validator(headers)
    if stored_validator is not None and tag == stored_validator:
        return Complete(verify=False)
    if stored_validator is None and tag is None and stored_length == offset:
        return Complete(verify=False)
    return Restart()


def resume_length(headers: HeaderSource, total: int | None) -> int | None:
    """For an answer from zero that carries no validator: the entity's length, which a
    resume's ``Content-Range`` total must repeat (wget's and aria2c's rule), or None when
    the part cannot be resumed (length unknown, or ``Accept-Ranges: none``). A file that
    changed and kept its length would be spliced: the item's sha256, when given, is what
    catches that (docs/http.md, "Resume")."""
    ranges = (headers.get("accept-ranges") or "").strip().lower()
    if not total or ranges == "none":
        return None
    return total


def status_failure(
    status: int, reason: str, headers: HeaderSource, now: datetime
) -> Retry | Reject:
    """A non-2xx, non-redirect answer: 429 and 5xx are worth another attempt (after the
    server's Retry-After, if it gave one), every other status fails the item."""
    try:
        phrase = http.HTTPStatus(status).phrase.lower()
    except ValueError:
        phrase = reason.lower() or "unknown status"
    message = f"http {status} {phrase}"
    if status in RETRY_STATUSES or 500 <= status <= 599:
        return Retry(message, retry_after(headers.get("retry-after"), now))
    return Reject(message)


def is_redirect(status: int, location: str | None) -> bool:
    return status in REDIRECT_STATUSES and bool(location)


# What a Location's path, query and fragment may hold as they are: RFC 3986's unreserved
# and reserved characters, and "%" (escapes already made stay as they are).
_LOCATION_SAFE = "!#$%&'()*+,/:;=?@[]~-._"


def redirect_target(url: str, location: str) -> str:
    """The absolute URL a redirect from ``url`` points at; ValueError if unusable.

    A raw space or raw UTF-8 in the path, query or fragment is percent-encoded first, as
    curl, wget, aria2c and browsers do: servers send them (a file name put in a Location
    as it is) and mean the encoded URL. The host is left to IDNA (``validate_url``).
    """
    target = urllib.parse.urljoin(url, _encode_location(location.strip()))
    try:
        return names.validate_url(target)
    except ValueError as exc:
        raise ValueError(f"redirect to an unusable url: {exc}") from None


def location_text(value: str) -> str:
    """A Location header's text: header values arrive as latin-1 (a character per byte),
    but a raw non-ASCII Location is UTF-8 as servers write it. Bytes that are not UTF-8
    become surrogates, which ``redirect_target`` percent-encodes back to those bytes."""
    if value.isascii():
        return value
    return value.encode("latin-1", "surrogateescape").decode("utf-8", "surrogateescape")


def _encode_location(location: str) -> str:
    parts = urllib.parse.urlsplit(location)

    def encode(text: str) -> str:
        return urllib.parse.quote(text, safe=_LOCATION_SAFE, errors="surrogateescape")

    encoded = parts._replace(
        path=encode(parts.path), query=encode(parts.query), fragment=encode(parts.fragment)
    )
    return location if encoded == parts else urllib.parse.urlunsplit(encoded)


def backoff(failures: int, initial: float, maximum: float) -> float:
    """The pause after the ``failures``-th failed attempt when the server gave none."""
    return float(min(maximum, initial * 2 ** (failures - 1)))


@attrs.define
class StallWatch:
    """aria2's ``--lowest-speed-limit`` as a rule: time is cut into windows of
    ``stall_timeout`` seconds from ``begin``, and a transfer that gets fewer than
    ``lowest_speed * stall_timeout`` bytes in one window is stalled. ``lowest_speed`` 0
    turns it off.

    Fed with ``sample(now, held)`` (``held``: the bytes the item holds, which only grow
    within one attempt). ``deadline`` is the moment the transfer is stalled unless more
    bytes arrive first, so a caller can wait for data until then instead of waking on a
    timer. Windows rather than a sliding average keep the state to three numbers whatever
    the speed, and a burst buys at most one window of credit: a 1 GB burst and then
    silence is stalled two windows later, never days later. Bytes a sample brings just
    after a window's end count for that window (a lag of one receive).
    """

    lowest_speed: int  # bytes a second; 0: off
    stall_timeout: float  # seconds
    _window_start: float
    _window_held: int  # what the item held when the window began
    _held: int

    @classmethod
    def begin(
        cls, lowest_speed: int, stall_timeout: float, now: float, held: int = 0
    ) -> StallWatch:
        if lowest_speed < 0:
            raise ValueError(f"lowest_speed must be >= 0, not {lowest_speed}")
        if not stall_timeout > 0:
            raise ValueError(f"stall_timeout must be > 0, not {stall_timeout}")
        return cls(lowest_speed, stall_timeout, now, held, held)

    @property
    def deadline(self) -> float:
        """When the transfer is stalled if no byte arrives before (inf when off)."""
        if self.lowest_speed == 0:
            return math.inf
        end = self._window_start + self.stall_timeout
        return end if self._held - self._window_held < self._quota else end + self.stall_timeout

    def sample(self, now: float, held: int) -> bool:
        """Whether the transfer, holding ``held`` bytes at ``now``, is stalled."""
        self._held = held
        if self.lowest_speed == 0:
            return False
        while now >= self._window_start + self.stall_timeout:
            if self._held - self._window_held < self._quota:
                return True
            self._window_start += self.stall_timeout
            self._window_held = held
        return False

    @property
    def held(self) -> int:
        """What the item held at the last sample."""
        return self._held

    def postpone(self, seconds: float) -> None:
        """Leave out ``seconds`` the rule must not see (an item's wait between two
        attempts): the current window ends that much later."""
        self._window_start += max(0.0, seconds)

    @property
    def message(self) -> str:
        return (
            f"stalled: below lowest_speed {self.lowest_speed} B/s"
            f" for stall_timeout {self.stall_timeout:g} s"
        )

    @property
    def _quota(self) -> float:
        return self.lowest_speed * self.stall_timeout


# --- header parsing -------------------------------------------------------------------


def retry_after(value: str | None, now: datetime) -> float | None:
    """Retry-After as seconds from ``now``: delta-seconds or an HTTP-date (RFC 9110)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def validator(headers: HeaderSource) -> str | None:
    """What If-Range may carry: a strong ETag, else Last-Modified (RFC 9110 13.1.5)."""
    etag = headers.get("etag")
    if etag is not None and not etag.startswith("W/") and etag.strip():
        return etag.strip()
    modified = headers.get("last-modified")
    return modified.strip() if modified and modified.strip() else None


def content_length(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """(first, last, total) of ``Content-Range: bytes first-last/total``; total None for *."""
    if value is None:
        return None
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if match is None:
        return None
    first, last = int(match[1]), int(match[2])
    total = None if match[3] == "*" else int(match[3])
    if last < first or (total is not None and last >= total):
        return None
    return first, last, total


def unsatisfied_range_total(value: str | None) -> int | None:
    """N of ``Content-Range: bytes */N`` (a 416's answer), else None."""
    if value is None:
        return None
    match = _UNSATISFIED_RANGE.fullmatch(value.strip())
    return None if match is None else int(match[1])


def _add(offset: int, length: int | None) -> int | None:
    return None if length is None else offset + length
