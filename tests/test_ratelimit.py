"""Requests per client: bursts, then a steady rate, then 429 + Retry-After; bounded memory."""

from __future__ import annotations

import asyncio

from gateway.app import create_app
from gateway.ratelimit import RateLimiter, retry_after

from .conftest import ClientFactory, make_settings


def test_a_bucket_allows_a_burst_then_the_rate() -> None:
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.take("a", now=10.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a", now=10.0) == 0.5  # empty: one token per 0.5 s
    assert limiter.take("b", now=10.0) == 0.0  # another client has its own bucket
    assert limiter.take("a", now=10.6) == 0.0  # refilled by 0.6 s x 2/s
    assert limiter.take("a", now=10.6) > 0
    assert limiter.take("a", now=100.0) == 0.0  # a long pause refills to the burst, not beyond
    assert retry_after(0.01) == 1 and retry_after(1.2) == 2


def test_many_clients_cannot_grow_memory() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_clients=100)
    for client in range(10_000):
        limiter.take(f"10.0.{client // 256}.{client % 256}", now=1.0)
    assert len(limiter) == 100


async def test_a_flooding_client_gets_429_with_retry_after(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app(make_settings(rate_limit=2.0, rate_limit_burst=3)))
    for _ in range(3):
        assert (await client.get("/v1/sessions")).status == 200
    refused = await client.get("/v1/sessions")
    body = await refused.json()
    assert refused.status == 429 and body["error"]["code"] == "rate_limited"
    assert "2 per second" in body["error"]["message"]
    assert refused.headers["Retry-After"] == "1"
    # Probes, metrics and the pages are never limited (a load balancer must see the truth).
    for path in ("/livez", "/readyz", "/metrics", "/"):
        assert (await client.get(path)).status == 200, path
    # The seed API's envelope carries the same answer.
    seed = await client.get("/persona")
    assert seed.status == 429 and (await seed.json())["error"].startswith("rate_limited: ")
    await asyncio.sleep(0.6)
    assert (await client.get("/v1/sessions")).status == 200


async def test_off_when_zero(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app(make_settings(rate_limit=0.0, rate_limit_burst=1)))
    for _ in range(20):
        assert (await client.get("/v1/sessions")).status == 200
