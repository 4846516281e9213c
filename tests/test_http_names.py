"""statusd.http: the host a URL names, as it goes to DNS, TLS (SNI) and the Host header."""

from __future__ import annotations

import pytest

from statusd.http import Origin, _ascii_host, split_url


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        # IDNA 2003 (Python's codec) maps ß to ss: fass.de, somebody else's host.
        ("http://faß.de/x", Origin("http", "xn--fa-hia.de", 80)),
        ("https://ÖBB.at/", Origin("https", "xn--bb-eka.at", 443)),
        ("http://xn--fa-hia.de/", Origin("http", "xn--fa-hia.de", 80)),
        ("http://Example.COM:8080/", Origin("http", "example.com", 8080)),
        ("http://my_host.lan/", Origin("http", "my_host.lan", 80)),
        ("http://127.0.0.1:8080/", Origin("http", "127.0.0.1", 8080)),
        ("http://[::1]:8080/", Origin("http", "::1", 8080)),
    ],
)
def test_split_url_gives_the_ascii_host(url: str, origin: Origin) -> None:
    assert split_url(url)[0] == origin


@pytest.mark.parametrize("host", ["☃.com", "😀.example", "ä" * 64 + ".de"])
def test_split_url_refuses_a_host_idna_2008_refuses(host: str) -> None:
    with pytest.raises(ValueError, match="url host is not a valid host name"):
        split_url(f"http://{host}/")


def test_ascii_host_is_idna_2008() -> None:
    assert _ascii_host("faß.de") == "xn--fa-hia.de"
    assert _ascii_host("[::1]") == "[::1]"
