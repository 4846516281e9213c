"""The HTTP client's pool of idle keep-alive connections: reuse, the idle timeout and its sweep,
the caps per origin and in total, and connections their server closed while idle.

Real servers on 127.0.0.1; "origins" are ports of one server (``MultiPortHTTPServer``).
Time is trio's MockClock wherever expiry matters, so nothing here waits for real.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from statusd.downloads.http import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_IDLE_TOTAL,
    LIVENESS_CHECK_AFTER,
    HTTPClient,
    HTTPClientStatistics,
)
from tests.http_servers import MultiPortHTTPServer, Request, Responder, serve_data

BODY = b"x" * 1000


async def start_server(nursery: trio.Nursery, ports: int = 1) -> MultiPortHTTPServer:
    server = MultiPortHTTPServer(ports)
    await nursery.start(server.serve)
    server.route("/f", serve_data(BODY))
    return server


async def get(client: HTTPClient, url: str) -> tuple[int, bytes]:
    async with client.stream("GET", url) as response:
        return response.status, await response.read()


@pytest.fixture
async def client() -> AsyncIterator[HTTPClient]:
    async with HTTPClient() as client:
        yield client


async def settle() -> None:
    """Let the server's tasks see what the client closed."""
    await trio.testing.wait_all_tasks_blocked()


async def test_a_connection_is_reused_while_fresh(
    nursery: trio.Nursery, client: HTTPClient
) -> None:
    server = await start_server(nursery)
    for _ in range(3):
        assert await get(client, server.url("/f")) == (200, BODY)
    assert server.connections == 1
    stats = client.statistics()
    assert (stats.connections_opened, stats.requests_reused, stats.idle_connections) == (1, 2, 1)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.idle_connections = 0  # type: ignore[misc]


async def test_idle_connections_close_after_the_timeout_with_no_more_requests(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, client: HTTPClient
) -> None:
    server = await start_server(nursery, ports=3)
    for base in server.base_urls:
        await get(client, base + "/f")
    await settle()
    assert server.open_connections == 3
    # Nothing else happens: the sockets must still go, and within the timeout.
    await trio.sleep(DEFAULT_IDLE_TIMEOUT)
    await settle()
    assert server.open_connections == 0
    assert client.idle_connections() == 0
    assert client.statistics().closed_expired == 3


async def test_an_expired_connection_is_not_reused(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    server = await start_server(nursery)
    async with HTTPClient(idle_timeout=10) as client:
        await get(client, server.url("/f"))
        await trio.sleep(9)
        await get(client, server.url("/f"))
        assert server.connections == 1
        await trio.sleep(10)
        await get(client, server.url("/f"))
        assert server.connections == 2
        assert server.requests[-1].connection == 2
        assert client.statistics().closed_expired == 1


async def test_the_sweep_stops_with_an_empty_pool_and_starts_again(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, client: HTTPClient
) -> None:
    server = await start_server(nursery)
    for round_ in range(1, 3):
        await get(client, server.url("/f"))
        await trio.sleep(DEFAULT_IDLE_TIMEOUT)
        await settle()
        assert (client.idle_connections(), server.open_connections) == (0, 0)
        assert client.statistics().closed_expired == round_


async def test_hundreds_of_origins_keep_at_most_the_cap_open_then_none(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, client: HTTPClient
) -> None:
    # Before the cap, 300 origins left 300 sockets open (CLOSE_WAIT once servers gave up).
    server = await start_server(nursery, ports=300)
    for base in server.base_urls:
        assert await get(client, base + "/f") == (200, BODY)
    await settle()
    stats = client.statistics()
    assert stats.connections_opened == 300
    assert stats.idle_connections <= DEFAULT_MAX_IDLE_TOTAL
    assert stats.idle_origins == stats.idle_connections
    assert stats.closed_over_limit + stats.closed_expired == 300 - stats.idle_connections
    assert server.open_connections == stats.idle_connections
    await trio.sleep(DEFAULT_IDLE_TIMEOUT)
    await settle()
    assert (client.idle_connections(), server.open_connections) == (0, 0)


async def test_the_least_recently_used_connection_goes_beyond_the_total_cap(
    nursery: trio.Nursery,
) -> None:
    server = await start_server(nursery, ports=3)
    a, b, c = (base + "/f" for base in server.base_urls)
    async with HTTPClient(max_idle_total=2) as client:
        for url in (a, b, c):
            await get(client, url)
        assert client.statistics().closed_over_limit == 1
        await get(client, b)  # still pooled: reused
        assert server.connections == 3
        await get(client, a)  # it was the least recently used: closed, so a new one
        assert server.connections == 4
        await settle()
        assert server.open_connections == 2


async def test_the_oldest_idle_connection_goes_beyond_the_per_origin_cap(
    nursery: trio.Nursery,
) -> None:
    server = await start_server(nursery)
    release = trio.Event()
    arrived = 0

    async def slow(request: Request, responder: Responder) -> None:
        nonlocal arrived
        arrived += 1
        await release.wait()
        await responder.send(200, [], BODY)

    server.route("/slow", slow)
    # Five in flight to one host: above the default per-host cap.
    async with HTTPClient(max_idle_per_origin=2, max_per_host=5) as client:
        async with trio.open_nursery() as requests:
            for _ in range(5):  # five at once: five connections
                requests.start_soon(get, client, server.url("/slow"))
            await settle()
            assert arrived == 5
            release.set()
        stats = client.statistics()
        assert (stats.connections_opened, stats.idle_connections) == (5, 2)
        assert stats.closed_over_limit == 3
        await settle()
        assert server.open_connections == 2


async def test_a_connection_the_server_answered_on_while_idle_is_not_reused(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, client: HTTPClient
) -> None:
    # Some servers say "408 Request Timeout" on an idle connection before they close it.
    # Reused, that stale answer was taken for the answer to the next request.
    server = await start_server(nursery)

    async def answer_then_time_out(request: Request, responder: Responder) -> None:
        await responder.send(200, [], BODY)
        if request.number == 1:
            await trio.sleep(LIVENESS_CHECK_AFTER / 2)
            await responder.send(408, [("Connection", "close")], b"timeout\n")
            await responder.close()

    url = server.route("/g", answer_then_time_out)
    assert await get(client, url) == (200, BODY)
    await trio.sleep(LIVENESS_CHECK_AFTER * 2)
    assert await get(client, url) == (200, BODY)
    assert [request.connection for request in server.requests] == [1, 2]
    assert client.statistics().closed_by_peer == 1


async def test_a_connection_the_server_closed_while_idle_is_not_reused(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, client: HTTPClient
) -> None:
    server = await start_server(nursery)

    async def answer_then_close(request: Request, responder: Responder) -> None:
        await responder.send(200, [], BODY)  # keep-alive, as far as the client knows
        await responder.close()

    url = server.route("/g", answer_then_close)
    await get(client, url)
    await trio.sleep(LIVENESS_CHECK_AFTER * 2)
    assert await get(client, url) == (200, BODY)
    stats = client.statistics()
    assert (stats.closed_by_peer, stats.requests_reused, stats.connections_opened) == (1, 0, 2)


async def test_the_sweep_closes_connections_their_server_closed(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, client: HTTPClient
) -> None:
    server = await start_server(nursery, ports=2)

    async def answer_then_close(request: Request, responder: Responder) -> None:
        await responder.send(200, [], BODY)
        await responder.close()

    server.route("/g", answer_then_close)
    await get(client, server.base_urls[0] + "/f")
    await trio.sleep(1)
    await get(client, server.base_urls[1] + "/g")
    # The first connection's expiry wakes the sweep; it finds the second one dead too.
    await trio.sleep(DEFAULT_IDLE_TIMEOUT - 0.5)
    stats = client.statistics()
    assert (stats.closed_expired, stats.closed_by_peer, stats.idle_connections) == (1, 1, 0)


async def test_aclose_closes_idle_connections(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, ports=2)
    client = HTTPClient()
    for base in server.base_urls:
        await get(client, base + "/f")
    await client.aclose()
    await settle()
    assert (client.idle_connections(), server.open_connections) == (0, 0)
    with pytest.raises(RuntimeError, match="closed"):
        await get(client, server.url("/f"))


async def test_a_zero_cap_keeps_nothing(nursery: trio.Nursery) -> None:
    server = await start_server(nursery)
    async with HTTPClient(max_idle_total=0) as client:
        await get(client, server.url("/f"))
        await get(client, server.url("/f"))
        assert server.connections == 2
        assert client.statistics() == HTTPClientStatistics(
            idle_connections=0,
            idle_origins=0,
            connections_opened=2,
            requests_reused=0,
            closed_expired=0,
            closed_over_limit=2,
            closed_by_peer=0,
        )


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("idle_timeout", 0, "idle_timeout must be > 0, not 0"),
        ("idle_timeout", -1.5, "idle_timeout must be > 0, not -1.5"),
        ("max_idle_per_origin", -1, "max_idle_per_origin must be >= 0, not -1"),
        ("max_idle_total", -1, "max_idle_total must be >= 0, not -1"),
    ],
)
def test_pool_limits_are_checked(name: str, value: float, message: str) -> None:
    limits: dict[str, Any] = {name: value}
    with pytest.raises(ValueError, match=message):
        HTTPClient(**limits)
