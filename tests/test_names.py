"""File names and URL checks: safe names, Content-Disposition, URL names, numbering."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from statusd.downloads.names import (
    MAX_NAME_BYTES,
    filename_from_content_disposition,
    filename_from_url,
    numbered,
    safe_filename,
    validate_url,
)

DEST = Path("/srv/downloads")


def _is_safe(name: str, max_bytes: int = MAX_NAME_BYTES) -> bool:
    joined = os.path.normpath(DEST / name)
    return (
        "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and name not in (".", "..")
        and not name.startswith(".")
        and name == name.strip()
        and 0 < len(name.encode()) <= max_bytes
        and not any(ord(char) < 0x20 or ord(char) == 0x7F for char in name)
        and os.path.dirname(joined) == str(DEST)
    )


# Text biased towards what attacks are made of.
_PIECES = ["/", "\\", ".", "..", "../", " ", "\x00", "\n", "\u202e", "a", "é", "😀", ".tar.gz"]
nasty = st.lists(st.sampled_from(_PIECES) | st.text(max_size=4), max_size=80).map("".join)


@given(nasty)
@example("../../.bashrc")
@example("..\\..\\windows\\system32")
@example(". . .x")
@example("a" * 300 + ".tar.gz")
@example("\u202egnp.exe")
def test_safe_filename_is_one_component_inside_dest(candidate: str) -> None:
    name = safe_filename(candidate)
    assert name is None or _is_safe(name)


@given(nasty, st.integers(min_value=1, max_value=300))
def test_safe_filename_respects_any_byte_limit(candidate: str, max_bytes: int) -> None:
    name = safe_filename(candidate, max_bytes=max_bytes)
    assert name is None or _is_safe(name, max_bytes)


@given(st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9_. -]{0,40}[A-Za-z0-9_-]", fullmatch=True))
def test_ordinary_names_pass_unchanged(candidate: str) -> None:
    assert safe_filename(candidate) == candidate


@pytest.mark.parametrize(
    ("candidate", "expected"),
    [
        ("../../.bashrc", "bashrc"),
        ("/etc/passwd", "passwd"),
        ("C:\\Users\\me\\evil.exe", "evil.exe"),
        ("dir/", "dir"),
        ("..", None),
        (".", None),
        ("...", None),
        ("", None),
        ("/", None),
        ("   ", None),
        (".hidden", "hidden"),
        ("a\x00b\nc", "a_b_c"),
        ("\u202egnp.exe", "_gnp.exe"),
        ("  spaced name.txt  ", "spaced name.txt"),
        ("naïve résumé.pdf", "naïve résumé.pdf"),
    ],
)
def test_safe_filename_examples(candidate: str, expected: str | None) -> None:
    assert safe_filename(candidate) == expected


def test_long_names_keep_their_extension() -> None:
    name = safe_filename("é" * 200 + ".tar.gz")
    assert name is not None
    assert name.endswith(".gz")
    assert len(name.encode()) <= MAX_NAME_BYTES
    name.encode().decode()  # never cut inside a character


def test_safe_filename_rejects_a_zero_limit() -> None:
    with pytest.raises(ValueError, match="max_bytes must be >= 1, not 0"):
        safe_filename("x", max_bytes=0)


@pytest.mark.parametrize(
    ("name", "n", "expected"),
    [
        ("report.pdf", 1, "report.1.pdf"),
        ("file.tar.gz", 2, "file.tar.2.gz"),
        ("README", 3, "README.3"),
        ("notes.draft for review", 1, "notes.draft for review.1"),
    ],
)
def test_numbered(name: str, n: int, expected: str) -> None:
    assert numbered(name, n) == expected


@given(nasty, st.integers(min_value=1, max_value=10_000))
def test_numbered_names_stay_safe_and_within_the_limit(candidate: str, n: int) -> None:
    name = safe_filename(candidate, max_bytes=250)
    if name is not None:
        assert _is_safe(numbered(name, n, max_bytes=250), 250)


def test_numbered_rejects_n_below_one() -> None:
    with pytest.raises(ValueError, match="n must be >= 1, not 0"):
        numbered("x", 0)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('attachment; filename="report.pdf"', "report.pdf"),
        ("attachment; filename=plain.txt", "plain.txt"),
        ("attachment; filename*=UTF-8''na%C3%AFve%20file.txt", "naïve file.txt"),
        # RFC 6266: filename* wins over filename, in whichever order they come.
        ("attachment; filename=\"fallback.txt\"; filename*=UTF-8''%E2%82%AC.txt", "€.txt"),
        ("attachment; filename*=UTF-8''%E2%82%AC.txt; filename=\"fallback.txt\"", "€.txt"),
        ("attachment; filename*=iso-8859-1'en'%A3%20rates.txt", "£ rates.txt"),
        ('attachment; filename="../../.bashrc"', "bashrc"),
        ('attachment; filename="..\\\\..\\\\boot.ini"', "boot.ini"),
        ('inline; filename="shown.png"', "shown.png"),
        ("attachment", None),
        ("", None),
        ('attachment; filename=""', None),
        ('attachment; filename="x"; filename*=bogus', "x"),  # no charset: ignored
        ('attachment; filename="caf\xc3\xa9.txt"', "café.txt"),  # raw UTF-8, read as Latin-1
        (';;;=;"', None),
    ],
)
def test_content_disposition(header: str, expected: str | None) -> None:
    assert filename_from_content_disposition(header) == expected


@given(st.text(max_size=200))
def test_content_disposition_never_raises_and_stays_safe(header: str) -> None:
    name = filename_from_content_disposition(header)
    assert name is None or _is_safe(name)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://host/dir/file.tar.gz", "file.tar.gz"),
        ("http://host/a%20b.txt?x=1#frag", "a b.txt"),
        ("http://host/dir/", None),
        ("http://host", None),
        ("http://host/%2e%2e", None),
        ("http://host/a%2F..%2F.bashrc", "bashrc"),
        ("http://host/%00evil", "_evil"),
    ],
)
def test_filename_from_url(url: str, expected: str | None) -> None:
    assert filename_from_url(url) == expected


@given(st.text(max_size=100))
def test_filename_from_url_stays_safe(path: str) -> None:
    name = filename_from_url("http://host/" + path)
    assert name is None or _is_safe(name)


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/x",
        "https://example.com:8443/a?b=c",
        "HTTP://h/",
        "http://[::1]:80/",
        "http://user:pw@host/",  # Basic credentials: sent to that origin only
    ],
)
def test_validate_url_accepts_http_and_https(url: str) -> None:
    assert validate_url(url) == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "url must not be empty"),
        ("ftp://example.com/x", "url scheme must be http or https, not 'ftp'"),
        ("file:///etc/passwd", "url scheme must be http or https, not 'file'"),
        ("example.com/x", "url scheme must be http or https, not none"),
        ("http:///x", "url must have a host"),
        ("http://host:0/", "url port must be between 1 and 65535, not 0"),
        ("http://host:99999/", "url is malformed"),
        ("http://host/a b", "url must not contain whitespace or control characters"),
        ("http://host/\x00", "url must not contain whitespace or control characters"),
        ("http://" + "a" * 9000, "url must be at most 8192 characters, not 9007"),
    ],
)
def test_validate_url_refuses_with_a_clear_message(url: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("?", "\\?")):
        validate_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://faß.de/x",  # IDNA 2008 keeps ß (xn--fa-hia.de)
        "https://ÖBB.at/",  # UTS 46 maps the capitals first
        "http://xn--fa-hia.de/",
        "http://example.com/",
        "http://my_host.lan/",  # DNS allows what IDNA does not, and ASCII is DNS's
        "http://127.0.0.1:8080/",
        "http://[::1]:8080/",
    ],
)
def test_validate_url_accepts_these_hosts(url: str) -> None:
    assert validate_url(url) == url


@pytest.mark.parametrize(
    "host",
    [
        "☃.com",  # IDNA 2003 allowed symbols (xn--n3h.com); IDNA 2008 does not
        "😀.example",
        "ex\u200dample.com",  # a joiner where no script needs one
        "ä" * 64 + ".de",  # a label over 63 bytes once encoded
        "a" * 64 + ".com",
    ],
)
def test_validate_url_refuses_hosts_idna_2008_refuses(host: str) -> None:
    with pytest.raises(ValueError, match="url host is not a valid host name"):
        validate_url(f"http://{host}/")
