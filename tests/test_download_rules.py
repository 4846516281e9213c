"""The download rules as tables: a server's answer in, a decision out (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from statusd.downloads import rules
from statusd.downloads.rules import Append, Complete, Reject, Restart, Retry

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
TAG = '"v1"'


class Headers(dict[str, str]):
    """Header names in lowercase, as ``statusd.http.Headers.get`` takes them."""


def headers(**values: str) -> Headers:
    return Headers({name.replace("_", "-"): value for name, value in values.items()})


# status, headers, offset asked for (0: no range), stored validator -> decision
BODY = [
    # a whole answer, with or without a range asked for
    (200, headers(content_length="10", etag=TAG), 0, None, Append(0, 10, TAG)),
    (200, headers(etag=TAG), 0, None, Append(0, None, TAG)),
    (200, headers(content_length="10", etag='"v2"'), 5, TAG, Append(0, 10, '"v2"')),
    (200, headers(content_length="10", etag='W/"weak"'), 0, None, Append(0, 10, None)),
    (
        200,
        headers(content_length="10", last_modified="Tue, 01 Dec 2026 10:00:00 GMT"),
        0,
        None,
        Append(0, 10, "Tue, 01 Dec 2026 10:00:00 GMT"),
    ),
    # a resume that fits
    (
        206,
        headers(content_range="bytes 5-9/10", content_length="5", etag=TAG),
        5,
        TAG,
        Append(5, 10, TAG),
    ),
    (206, headers(content_range="bytes 5-9/*", content_length="5"), 5, TAG, Append(5, 10, TAG)),
    (206, headers(content_range="bytes 5-9/10"), 5, TAG, Append(5, 10, TAG)),
    # a resume that does not: another offset, another entity, no Content-Range
    (206, headers(content_range="bytes 4-9/10", etag=TAG), 5, TAG, Restart()),
    (206, headers(content_range="bytes 5-9/10", etag='"v2"'), 5, TAG, Restart()),
    (206, headers(etag=TAG), 5, TAG, Restart()),
    (206, headers(content_range="bytes 9-5/10"), 5, TAG, Restart()),
    # 206 without a range asked for: only a whole entity from byte 0 is usable
    (206, headers(content_range="bytes 0-9/10", etag=TAG), 0, None, Append(0, 10, TAG)),
    (
        206,
        headers(content_range="bytes 3-9/10"),
        0,
        None,
        Reject("server answered 206 partial content to a request without range"),
    ),
]


@pytest.mark.parametrize(("status", "head", "offset", "stored", "expected"), BODY)
def test_body_decision(
    status: int, head: Headers, offset: int, stored: str | None, expected: object
) -> None:
    assert rules.body_decision(status, head, offset, stored) == expected


# headers of the 416, offset asked for, stored validator, sha256 given -> decision
UNSATISFIABLE = [
    (headers(content_range="bytes */10"), 10, TAG, True, Complete(verify=True)),
    (headers(content_range="bytes */10", etag=TAG), 10, TAG, False, Complete(verify=False)),
    (headers(content_range="bytes */10", etag=TAG), 10, TAG, True, Complete(verify=True)),
    # the part is not the whole entity, or nothing says it is that entity
    (headers(content_range="bytes */12", etag=TAG), 10, TAG, False, Restart()),
    (headers(content_range="bytes */8", etag=TAG), 10, TAG, True, Restart()),
    (headers(content_range="bytes */10"), 10, TAG, False, Restart()),
    (headers(content_range="bytes */10", etag='"v2"'), 10, TAG, False, Restart()),
    (headers(content_range="bytes */10", etag=TAG), 10, None, False, Restart()),
    (headers(etag=TAG), 10, TAG, True, Restart()),
    (headers(content_range="bytes 0-9/10", etag=TAG), 10, TAG, True, Restart()),
    (headers(content_range="bytes */0"), 0, TAG, True, Restart()),
]


@pytest.mark.parametrize(("head", "offset", "stored", "has_sha256", "expected"), UNSATISFIABLE)
def test_range_not_satisfiable(
    head: Headers, offset: int, stored: str | None, has_sha256: bool, expected: object
) -> None:
    assert rules.range_not_satisfiable(head, offset, stored, has_sha256) == expected


STATUS = [
    (404, "", headers(), Reject("http 404 not found")),
    (403, "", headers(retry_after="5"), Reject("http 403 forbidden")),
    (429, "", headers(retry_after="7"), Retry("http 429 too many requests", 7.0)),
    (500, "", headers(), Retry("http 500 internal server error", None)),
    (
        503,
        "",
        headers(retry_after="Wed, 25 Nov 2026 12:01:00 GMT"),
        Retry("http 503 service unavailable", 60.0),
    ),
    (599, "Odd", headers(), Retry("http 599 odd", None)),
    (499, "", headers(), Reject("http 499 unknown status")),
]


@pytest.mark.parametrize(("status", "reason", "head", "expected"), STATUS)
def test_status_failure(status: int, reason: str, head: Headers, expected: object) -> None:
    assert rules.status_failure(status, reason, head, NOW) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("120", 120.0),
        (" 3 ", 3.0),
        ("Wed, 25 Nov 2026 12:00:30 GMT", 30.0),
        ("Wed, 25 Nov 2026 11:00:00 GMT", 0.0),  # in the past: now
        ("soon", None),
        ("-5", None),
    ],
)
def test_retry_after(value: str | None, expected: float | None) -> None:
    assert rules.retry_after(value, NOW) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes 0-9/10", (0, 9, 10)),
        ("bytes 5-9/*", (5, 9, None)),
        ("BYTES 5-9/10", (5, 9, 10)),
        ("bytes 5-10/10", None),  # last beyond the total
        ("bytes 9-5/10", None),
        ("bytes */10", None),
        ("items 0-9/10", None),
        (None, None),
    ],
)
def test_content_range(value: str | None, expected: object) -> None:
    assert rules.content_range(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes */10", 10),
        ("bytes */0", 0),
        ("bytes 0-9/10", None),
        ("bytes */*", None),
        (None, None),
    ],
)
def test_unsatisfied_range_total(value: str | None, expected: int | None) -> None:
    assert rules.unsatisfied_range_total(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"), [("10", 10), (" 0 ", 0), ("-1", None), ("ten", None), (None, None)]
)
def test_content_length(value: str | None, expected: int | None) -> None:
    assert rules.content_length(value) == expected


@pytest.mark.parametrize(
    ("url", "location", "expected"),
    [
        ("http://a.test/x/y", "/z", "http://a.test/z"),
        ("http://a.test/x/y", "z", "http://a.test/x/z"),
        ("http://a.test/x", " https://b.test/f.bin ", "https://b.test/f.bin"),
    ],
)
def test_redirect_target(url: str, location: str, expected: str) -> None:
    assert rules.redirect_target(url, location) == expected


@pytest.mark.parametrize("location", ["ftp://a.test/f", "file:///etc/passwd"])
def test_redirect_to_an_unusable_url_is_refused(location: str) -> None:
    with pytest.raises(ValueError, match="redirect to an unusable url"):
        rules.redirect_target("http://a.test/", location)


@pytest.mark.parametrize(
    ("status", "location", "expected"),
    [
        (301, "/x", True),
        (302, "/x", True),
        (307, "/x", True),
        (302, None, False),
        (200, "/x", False),
    ],
)
def test_is_redirect(status: int, location: str | None, expected: bool) -> None:
    assert rules.is_redirect(status, location) == expected


@pytest.mark.parametrize(
    ("failures", "expected"), [(1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0), (7, 30.0), (20, 30.0)]
)
def test_backoff_doubles_up_to_the_cap(failures: int, expected: float) -> None:
    assert rules.backoff(failures, 0.5, 30.0) == expected
