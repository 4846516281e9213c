"""Proxies: the rules (pure), the configuration keys, and downloads through a real proxy on
127.0.0.1 (tests/proxy_server.py) to real origins, plain and TLS via CONNECT."""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from statusd.config import load_config, render_config
from statusd.daemon import Daemon
from statusd.downloads import DownloadItem, DownloadSettings, ItemState, download_item
from statusd.downloads.http import HTTPClient, TLSError
from statusd.errors import ConfigError
from statusd.proxy import (
    Proxy,
    ProxyEnvironment,
    ProxyRules,
    hide_password,
    parse_proxy,
    proxy_rules,
)
from tests.http_servers import HTTPTestServer, http_server, serve_data
from tests.proxy_server import ProxyTestServer, TLSFiles, TLSTestServer, tls_files
from tests.test_download_tasks import wait_for_end

__all__ = ["http_server", "tls_files"]

SECRET = "s3cr3t-PW"
FAST = DownloadSettings(backoff_initial=0.01, backoff_max=0.05, read_timeout=5.0)


def basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


# --- the rules --------------------------------------------------------------------------


def test_environment_lower_case_wins_and_empty_turns_off() -> None:
    environ = {
        "HTTP_PROXY": "http://upper:1",
        "http_proxy": "http://lower:2",
        "HTTPS_PROXY": "http://upper:3",
        "https_proxy": "",
        "NO_PROXY": "a.test",
        "PATH": "/bin",
    }
    assert ProxyEnvironment.read(environ) == ProxyEnvironment("http://lower:2", None, "a.test")
    assert ProxyEnvironment.read({"HTTPS_PROXY": "http://p:3"}).https == "http://p:3"


@pytest.mark.parametrize(
    ("url", "proxy"),
    [
        ("proxy.lan:3128", Proxy("proxy.lan", 3128)),
        ("http://proxy.lan", Proxy("proxy.lan", 1080)),
        ("http://proxy.lan:8080/", Proxy("proxy.lan", 8080)),
        ("http://[::1]:3128", Proxy("::1", 3128)),
        ("http://u:p%40ss@proxy.lan:3128", Proxy("proxy.lan", 3128, basic("u:p@ss"))),
        ("http://u@proxy.lan:3128", Proxy("proxy.lan", 3128, basic("u:"))),
    ],
)
def test_parse_proxy(url: str, proxy: Proxy) -> None:
    assert parse_proxy(url) == proxy


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("socks5://u:SECRET@p:1080", "proxy url scheme must be http, not 'socks5'"),
        ("https://u:SECRET@p:3128", "proxy url scheme must be http, not 'https'"),
        ("http://u:SECRET@p:99999", "proxy url is malformed: port out of range 0-65535"),
        (
            "http://u:SECRET@p:3128/path",
            "proxy url must be http://[user:password@]host[:port], with no path",
        ),
        ("http://u:SECRET@:3128", "proxy url must have a host"),
    ],
)
def test_bad_proxy_urls_say_why_without_the_password(url: str, message: str) -> None:
    with pytest.raises(ValueError, match="proxy url") as caught:
        parse_proxy(url)
    assert str(caught.value) == message
    assert "SECRET" not in str(caught.value)


def test_a_proxy_never_shows_its_credentials() -> None:
    proxy = parse_proxy(f"http://user:{SECRET}@proxy.lan:3128")
    encoded = base64.b64encode(f"user:{SECRET}".encode()).decode()
    for shown in (str(proxy), repr(proxy)):
        assert SECRET not in shown
        assert encoded not in shown
    assert str(proxy) == "proxy proxy.lan:3128"
    assert hide_password(f"http://user:{SECRET}@proxy.lan:3128") == "http://user:***@proxy.lan:3128"
    assert hide_password(f"user:{SECRET}@proxy.lan") == "user:***@proxy.lan"
    assert hide_password("http://proxy.lan:3128") == "http://proxy.lan:3128"


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "bypassed"),
    [
        ("example.org", "example.org", 80, True),
        ("example.org", "www.example.org", 80, True),
        (".example.org", "www.example.org", 443, True),
        ("example.org", "badexample.org", 80, False),
        ("EXAMPLE.org", "example.org", 80, True),
        ("a.test, example.org:8080", "example.org", 8080, True),
        ("example.org:8080", "example.org", 80, False),
        ("127.0.0.1", "127.0.0.1", 8000, True),
        ("::1", "::1", 8000, True),
        ("*", "anything.test", 80, True),
        ("", "example.org", 80, False),
    ],
)
def test_no_proxy_is_the_stdlibs_rule(no_proxy: str, host: str, port: int, bypassed: bool) -> None:
    proxy = Proxy("proxy.lan", 3128)
    rules = ProxyRules(proxy, proxy, no_proxy)
    assert (rules.for_url("http", host, port) is None) == bypassed


def test_config_wins_over_the_environment() -> None:
    environment = ProxyEnvironment("http://env-http:1", "http://env-https:2", "env.test")
    from_env = proxy_rules(None, None, environment)
    assert from_env == ProxyRules(Proxy("env-http", 1), Proxy("env-https", 2), "env.test")
    both = proxy_rules("http://conf:3", "conf.test", environment)
    assert both == ProxyRules(Proxy("conf", 3), Proxy("conf", 3), "conf.test")
    assert proxy_rules("", None, environment) == ProxyRules(None, None, "env.test")
    assert proxy_rules(None, "", environment).no_proxy == ""


# --- the configuration ------------------------------------------------------------------


def load(tmp_path: Path, toml: str = "", **environ: str) -> Any:
    path = tmp_path / "statusd.toml"
    path.write_text(toml)
    base = {"HOME": str(tmp_path), "STATUSD_CONFIG": str(path)}
    return load_config({"socket": str(tmp_path / "s.sock")}, base | environ, 1000)


def test_config_keys_from_the_file_and_the_environment(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        '[downloads]\nproxy = "http://u:pw@proxy.lan:3128"\nno_proxy = ["a.test", " b.test"]\n',
    )
    assert config.downloads.proxy == "http://u:pw@proxy.lan:3128"
    assert config.downloads.no_proxy == "a.test,b.test"
    config = load(
        tmp_path,
        STATUSD_DOWNLOADS_PROXY="proxy.lan:1",
        STATUSD_DOWNLOADS_NO_PROXY="x.test",
        https_proxy="http://env:2",
    )
    assert (config.downloads.proxy, config.downloads.no_proxy) == ("proxy.lan:1", "x.test")
    assert config.proxy_environment == ProxyEnvironment(None, "http://env:2", None)
    assert load(tmp_path).downloads.proxy is None


@pytest.mark.parametrize(
    ("toml", "environ", "message"),
    [
        (
            f'[downloads]\nproxy = "socks5://u:{SECRET}@p"\n',
            {},
            "downloads.proxy: proxy url scheme must be http, not 'socks5' (from ",
        ),
        (
            "[downloads]\nproxy = 3128\n",
            {},
            'downloads.proxy: must be a proxy url string ("" for none), not 3128',
        ),
        (
            "[downloads]\nno_proxy = 1\n",
            {},
            "downloads.no_proxy: must be a string of comma-separated hosts, not 1",
        ),
        (
            "",
            {"HTTPS_PROXY": f"socks5h://u:{SECRET}@p:1080"},
            "https_proxy: proxy url scheme must be http, not 'socks5h' (from environment)",
        ),
    ],
)
def test_bad_proxy_config_stops_start_up_naming_the_key(
    tmp_path: Path, toml: str, environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, toml, **environ)
    assert str(caught.value).startswith(message)
    assert SECRET not in str(caught.value)


def test_an_env_proxy_is_not_checked_when_the_config_names_one(tmp_path: Path) -> None:
    config = load(tmp_path, '[downloads]\nproxy = ""\n', https_proxy="socks5://p:1080")
    assert config.downloads.proxy == ""


def test_check_config_hides_the_proxy_password(tmp_path: Path) -> None:
    config = load(tmp_path, f'[downloads]\nproxy = "http://u:{SECRET}@proxy.lan:3128"\n')
    rendered = render_config(config)
    assert SECRET not in rendered
    assert 'proxy = "http://u:***@proxy.lan:3128"' in rendered
    assert "# no_proxy is unset" in render_config(load(tmp_path))


# --- through a real proxy ---------------------------------------------------------------


@pytest.fixture
async def proxy(nursery: trio.Nursery) -> ProxyTestServer:
    server = ProxyTestServer()
    await nursery.start(server.serve)
    return server


@pytest.fixture
async def tls_server(nursery: trio.Nursery, tls_files: TLSFiles) -> TLSTestServer:
    server = TLSTestServer(tls_files.server_context())
    await nursery.start(server.serve)
    return server


def client_through(proxy: ProxyTestServer, tls: TLSFiles | None = None, **rules: Any) -> HTTPClient:
    chosen = parse_proxy(proxy.url_with(f"user:{SECRET}") if proxy.credentials else proxy.url)
    return HTTPClient(
        proxies=ProxyRules(chosen, chosen, **rules),
        ssl_context=None if tls is None else tls.client_context(),
    )


async def fetch(client: HTTPClient, url: str, dest: Path) -> Any:
    return await download_item(client, DownloadItem(url), dest, FAST, ItemState())


async def test_http_goes_through_the_proxy_in_absolute_form(
    proxy: ProxyTestServer, http_server: HTTPTestServer, tmp_path: Path
) -> None:
    proxy.credentials = f"user:{SECRET}"
    urls = [http_server.route(f"/p{n}.bin", serve_data(bytes([n]) * 5000)) for n in range(2)]
    async with client_through(proxy) as client:
        results = [await fetch(client, url, tmp_path) for url in urls]
    assert [result.error for result in results] == [None, None]
    assert [request.target for request in proxy.requests] == urls
    assert {request.headers["proxy-authorization"] for request in proxy.requests} == {
        basic(f"user:{SECRET}")
    }
    assert proxy.connections == 1  # kept alive: the second item reused the first's
    origin = http_server.requests_for("/p0.bin")[0]
    assert origin.target == "/p0.bin"
    assert origin.headers["host"] == f"127.0.0.1:{http_server.port}"
    assert "proxy-authorization" not in origin.headers


async def test_no_proxy_hosts_are_fetched_directly(
    proxy: ProxyTestServer, http_server: HTTPTestServer, tmp_path: Path
) -> None:
    url = http_server.route("/direct.bin", serve_data(b"d" * 100))
    async with client_through(proxy, no_proxy="localhost,127.0.0.1") as client:
        assert (await fetch(client, url, tmp_path)).error is None
    assert proxy.requests == []
    assert len(http_server.requests_for("/direct.bin")) == 1


async def test_connections_are_pooled_per_proxy_and_origin(
    nursery: trio.Nursery, proxy: ProxyTestServer, tmp_path: Path
) -> None:
    servers = [HTTPTestServer() for _ in range(2)]
    for server in servers:
        await nursery.start(server.serve)
    urls = [server.route("/same.bin", serve_data(b"s" * 100)) for server in servers]
    async with client_through(proxy) as client:
        for url in [*urls, *urls]:
            assert (await fetch(client, url, tmp_path)).error is None
        assert client.statistics().idle_origins == 2
    # One connection to the proxy per origin, each used twice.
    assert proxy.connections == 2
    assert [server.connections for server in servers] == [2, 2]  # the proxy's own, per request


async def test_https_goes_through_a_connect_tunnel_with_the_origins_certificate(
    proxy: ProxyTestServer, tls_server: TLSTestServer, tls_files: TLSFiles, tmp_path: Path
) -> None:
    proxy.credentials = f"user:{SECRET}"
    url = tls_server.route("/secure.bin", serve_data(b"t" * 50_000))
    async with client_through(proxy, tls_files) as client:
        result = await fetch(client, url, tmp_path)
    assert result.error is None
    assert Path(result.path).read_bytes() == b"t" * 50_000
    [connect] = proxy.requests
    assert (connect.method, connect.target) == ("CONNECT", f"127.0.0.1:{tls_server.port}")
    assert connect.headers["proxy-authorization"] == basic(f"user:{SECRET}")
    # Inside the tunnel the origin saw an ordinary request, and nothing of the proxy's.
    [request] = tls_server.requests_for("/secure.bin")
    assert request.target == "/secure.bin"
    assert "proxy-authorization" not in request.headers


async def test_the_origins_certificate_is_checked_through_the_tunnel(
    proxy: ProxyTestServer, tls_server: TLSTestServer, tmp_path: Path
) -> None:
    url = tls_server.route("/secure.bin", serve_data(b"t"))
    async with client_through(proxy) as client:  # the system's trust store: not our test CA
        with pytest.raises(TLSError, match=f"tls certificate of 127.0.0.1:{tls_server.port}"):
            async with client.stream("GET", url):
                pass
        result = await fetch(client, url, tmp_path)
    assert result.error is not None
    assert "gave up" not in result.error


@pytest.mark.parametrize(
    ("status", "phrase"), [(407, "proxy authentication required"), (403, "forbidden")]
)
async def test_a_refused_connect_fails_the_item_at_once(
    proxy: ProxyTestServer, tmp_path: Path, status: int, phrase: str
) -> None:
    proxy.connect_status = status
    url = "https://origin.test:8443/f.bin"
    async with client_through(proxy) as client:
        result = await fetch(client, url, tmp_path)
    assert result.error == (
        f"proxy 127.0.0.1:{proxy.port} refused CONNECT to origin.test:8443: {status} {phrase}"
    )
    assert len(proxy.requests) == 1  # not retried


async def test_wrong_proxy_credentials_fail_a_plain_http_item(
    proxy: ProxyTestServer, http_server: HTTPTestServer, tmp_path: Path
) -> None:
    proxy.credentials = "user:other"
    url = http_server.route("/f.bin", serve_data(b"x"))
    async with client_through(proxy) as client:
        result = await fetch(client, url, tmp_path)
    assert result.error == "http 407 proxy authentication required"
    assert http_server.requests_for("/f.bin") == []


async def test_an_unreachable_proxy_is_named(tmp_path: Path) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        client = HTTPClient(proxies=ProxyRules(Proxy("127.0.0.1", port), None))
        async with client:
            result = await download_item(
                client,
                DownloadItem("http://origin.test/f.bin"),
                tmp_path,
                attrs.evolve(FAST, max_attempts=1),
                ItemState(),
            )
    assert result.error is not None
    assert result.error.startswith(f"cannot connect to proxy 127.0.0.1:{port}: ")


# --- the daemon ---------------------------------------------------------------------------


def with_proxy(daemon: Daemon, proxy: str) -> Any:
    config = daemon.config
    return attrs.evolve(config, downloads=attrs.evolve(config.downloads, proxy=proxy))


async def test_the_daemon_downloads_through_its_proxy_and_never_shows_the_password(
    daemon: Daemon,
    connect: Any,
    proxy: ProxyTestServer,
    http_server: HTTPTestServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    proxy.credentials = f"user:{SECRET}"
    proxy.connect_status = 403
    assert await daemon.reload(lambda: with_proxy(daemon, proxy.url_with(f"user:{SECRET}")))
    good = http_server.route("/good.bin", serve_data(b"g" * 1000))
    client = await connect()
    await client.call("subscribe", {"tasks": "all", "status": True})
    task_id = (await client.call("tasks.download", {"urls": [good, "https://origin.test:1/x"]}))[
        "task_id"
    ]
    task = await wait_for_end(client, task_id)
    assert task["status"] == "failed"
    items = task["result"]["items"]
    assert items[0]["error"] is None
    assert items[1]["error"].startswith(f"proxy 127.0.0.1:{proxy.port} refused CONNECT")
    recent = await client.call("status.recent")
    encoded = base64.b64encode(f"user:{SECRET}".encode()).decode()
    for text in (repr(task), repr(recent), caplog.text):
        assert SECRET not in text
        assert encoded not in text


async def test_the_proxy_changes_on_reload(
    daemon: Daemon, connect: Any, proxy: ProxyTestServer, http_server: HTTPTestServer
) -> None:
    url = http_server.route("/r.bin", serve_data(b"r" * 100))
    client = await connect()
    await client.call("subscribe", {"tasks": "all"})
    task_id = (await client.call("tasks.download", {"urls": [url]}))["task_id"]
    assert (await wait_for_end(client, task_id))["status"] == "completed"
    assert proxy.requests == []
    environment = ProxyEnvironment(http=proxy.url)
    assert await daemon.reload(lambda: attrs.evolve(daemon.config, proxy_environment=environment))
    task_id = (await client.call("tasks.download", {"urls": [url]}))["task_id"]
    assert (await wait_for_end(client, task_id))["status"] == "completed"
    assert [request.target for request in proxy.requests] == [url]
