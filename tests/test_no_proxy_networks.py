"""``no_proxy`` with IP addresses and CIDR blocks (``10.0.0.0/8``, ``::1/128``), as curl and
the stdlib's ``urllib`` read them: the rule (pure), the configuration key and variable
(a block that is not one stops start-up naming it), and a real daemon whose downloads from
127.0.0.1 skip a real proxy on 127.0.0.1 once a block covers the origin (tests/proxy_server.py,
a real HTTP server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from statusd.daemon import Daemon
from statusd.errors import ConfigError
from statusd.proxy import NoProxy, Proxy, ProxyEnvironment, ProxyRules, proxy_rules
from tests.http_servers import HTTPTestServer, http_server, serve_data
from tests.proxy_server import ProxyTestServer
from tests.test_download_proxy import load
from tests.test_download_tasks import wait_for_end

__all__ = ["http_server"]


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "bypassed"),
    [
        ("10.0.0.0/8", "10.1.2.3", 80, True),
        ("10.0.0.0/8", "11.1.2.3", 80, False),
        ("10.1.2.3/8", "10.200.0.1", 80, True),  # host bits set: the block they are in
        ("192.168.1.0/24", "192.168.1.255", 443, True),
        ("192.168.1.0/24", "192.168.2.1", 443, False),
        ("::1/128", "::1", 8000, True),
        ("::1/128", "::2", 8000, False),
        ("fd00::/8", "fd12:3456::1", 80, True),
        ("fd00::/8", "fe80::1", 80, False),
        ("10.0.0.0/8", "::ffff:10.9.9.9", 80, True),  # an IPv4 peer written as IPv6
        ("::/0", "10.0.0.1", 80, False),  # an IPv6 block holds no IPv4 address
        ("0.0.0.0/0", "203.0.113.7", 80, True),
        # IP literals: the same address however written, a port when one is given.
        ("0:0::1", "::1", 80, True),
        ("[::1]", "::1", 80, True),
        ("[::1]:8080", "::1", 8080, True),
        ("[::1]:8080", "::1", 80, False),
        ("10.1.2.3:8080", "10.1.2.3", 8080, True),
        ("10.1.2.3:8080", "10.1.2.3", 80, False),
        ("127.0.0.1", "127.0.0.1", 8000, True),
        # An address matches as an address, never as a name's suffix (urllib's .0.0.1).
        ("0.0.1", "10.0.0.1", 80, False),
        # Blocks are for addresses: no name is resolved to match one.
        ("127.0.0.0/8", "localhost", 80, False),
        ("localhost", "127.0.0.1", 80, False),
        # Names as before, beside blocks.
        ("10.0.0.0/8, .example.org", "www.example.org", 80, True),
        ("10.0.0.0/8,example.org:8080", "example.org", 80, False),
        ("a.test, *", "10.0.0.1", 80, True),
        (" , ,", "10.0.0.1", 80, False),
    ],
)
def test_blocks_and_addresses(no_proxy: str, host: str, port: int, bypassed: bool) -> None:
    assert NoProxy.parse(no_proxy).bypasses(host, port) == bypassed
    proxy = Proxy("proxy.lan", 3128)
    assert (ProxyRules(proxy, proxy, no_proxy).for_url("http", host, port) is None) == bypassed


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "10.0.0/8", "::1/129", "example.org/24", "/8"])
def test_a_block_that_is_not_one_is_refused_naming_it(entry: str) -> None:
    expected = f"entry '{entry}' must be an IP network such as 10.0.0.0/8 or fd00::/8"
    with pytest.raises(ValueError, match=f"^{expected}$"):
        NoProxy.parse(f"a.test, {entry}")
    with pytest.raises(ValueError, match=f"^downloads.no_proxy: {expected}$"):
        proxy_rules(None, entry, environment())
    with pytest.raises(ValueError, match=f"^no_proxy: {expected}$"):
        proxy_rules(None, None, environment(no=entry))


def environment(no: str | None = None) -> ProxyEnvironment:
    return ProxyEnvironment("http://env:1", None, no)


def test_the_key_and_the_variable(tmp_path: Path) -> None:
    config = load(tmp_path, '[downloads]\nno_proxy = ["10.0.0.0/8", "::1/128", "a.test"]\n')
    assert config.downloads.no_proxy == "10.0.0.0/8,::1/128,a.test"
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, '[downloads]\nno_proxy = "10.0.0.0/8, 10.0.0.0/33"\n')
    assert str(caught.value).startswith(
        "downloads.no_proxy: entry '10.0.0.0/33' must be an IP network such as 10.0.0.0/8 "
        "or fd00::/8 (from "
    )
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, no_proxy="fd00::/7,fd00::/300")
    assert str(caught.value) == (
        "no_proxy: entry 'fd00::/300' must be an IP network such as 10.0.0.0/8 or fd00::/8 "
        "(from environment)"
    )
    # The key wins over the variable, which is then not read.
    config = load(tmp_path, '[downloads]\nno_proxy = "10.0.0.0/8"\n', no_proxy="bad/99")
    assert config.downloads.no_proxy == "10.0.0.0/8"


@pytest.fixture
async def proxy(nursery: trio.Nursery) -> ProxyTestServer:
    server = ProxyTestServer()
    await nursery.start(server.serve)
    return server


def proxied(daemon: Daemon, proxy: str, no_proxy: str) -> Any:
    config = daemon.config
    return attrs.evolve(
        config, downloads=attrs.evolve(config.downloads, proxy=proxy, no_proxy=no_proxy)
    )


async def test_the_daemon_skips_the_proxy_for_a_block_that_holds_the_origin(
    daemon: Daemon, connect: Any, proxy: ProxyTestServer, http_server: HTTPTestServer
) -> None:
    url = http_server.route("/b.bin", serve_data(b"b" * 100))
    client = await connect()
    await client.call("subscribe", {"tasks": "all"})

    async def fetched() -> None:
        task_id = (await client.call("tasks.download", {"urls": [url]}))["task_id"]
        assert (await wait_for_end(client, task_id))["status"] == "completed"

    # A block beside the origin's: through the proxy.
    assert await daemon.reload(lambda: proxied(daemon, proxy.url, "10.0.0.0/8,::1/128"))
    await fetched()
    assert [request.target for request in proxy.requests] == [url]
    # The origin's block (SIGHUP applies it to the next item): straight to the origin.
    assert await daemon.reload(lambda: proxied(daemon, proxy.url, "10.0.0.0/8,127.0.0.0/8"))
    await fetched()
    assert len(proxy.requests) == 1
    assert len(http_server.requests_for("/b.bin")) == 2
