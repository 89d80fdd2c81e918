"""Admission control: a new viewer is refused (503, Retry-After) while the process that would
carry it is saturated, instead of joining and stalling everyone (gateway/loop_load.py).

No assertion here depends on how fast the machine is: the loop is made busy by blocking it
for a known time, and the bounds checked follow from the moving average's formula.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.api.common import METRICS, SESSIONS
from gateway.app import create_app
from gateway.errors import Saturated
from gateway.loop_load import SMOOTHING, LoopLoad
from gateway.metrics import Metrics
from gateway.workers.pool import WorkerPool

from .conftest import ClientFactory, make_settings
from .rtc_client import WhepViewer

Client = TestClient[Any, Any]


def block_loop(seconds: float) -> float:
    """Hold the running loop (as one long callback would), and say how busy that makes it
    at least: the share of the blocked time in the moving average."""
    time.sleep(seconds)
    return 1.0 - math.exp(-seconds / SMOOTHING)


async def test_the_load_rises_while_the_loop_is_held_and_falls_while_it_waits() -> None:
    loop = asyncio.get_running_loop()
    load = LoopLoad.install(loop)
    assert load is not None
    assert LoopLoad.install(loop) is load  # one measurement per loop
    at_least = block_loop(0.6)
    held = load.busy()
    assert held >= at_least
    await asyncio.sleep(0.01)  # one select(): the blocked time is now in the average (with
    assert load.busy() > at_least / 2  # that select's own short wait)
    await asyncio.sleep(1.0)  # waiting in select() is idle time
    assert load.busy() < held


async def test_a_saturated_gateway_refuses_a_viewer_with_503_and_takes_one_later(
        aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app(make_settings(max_viewer_load=0.5)))
    created = await (await client.post("/v1/sessions")).json()
    session = client.app[SESSIONS].get(created["id"])
    metrics = client.app[METRICS]
    refused = WhepViewer(client, created["id"])
    offer = await refused.offer_sdp()
    assert block_loop(3.0) > 0.5
    try:
        response = await client.post(f"/v1/sessions/{created['id']}/whep", data=offer,
                                     headers={"Content-Type": "application/sdp"})
        body = await response.json()
        assert response.status == 503, body
        assert body["error"]["code"] == "saturated"
        assert "saturated" in body["error"]["message"]
        assert int(response.headers["Retry-After"]) >= 1
        assert metrics.viewer_sessions.labels("saturated")._value.get() == 1
        assert len(session.audience) == 0  # nothing was built for the refused offer
    finally:
        await refused.pc.close()
    # Once the loop has had time to breathe, the same client gets in.
    async with asyncio.timeout(60):
        while True:
            await asyncio.sleep(0.5)
            viewer = WhepViewer(client, created["id"])
            offer = await viewer.offer_sdp()
            await viewer.pc.close()
            response = await client.post(f"/v1/sessions/{created['id']}/whep", data=offer,
                                         headers={"Content-Type": "application/sdp"})
            if response.status != 503:
                break
    assert response.status == 201, await response.text()
    await client.delete(response.headers["Location"])


def test_a_worker_is_picked_only_while_it_has_room() -> None:
    """The least loaded worker by viewers, among those below ``max_viewer_load``."""
    pool = WorkerPool(make_settings(max_viewer_load=0.9), Metrics(), 2, lambda _: None)
    first, second = pool.workers
    for worker in pool.workers:
        worker.alive = True
    second.viewers = {"a": Any}  # type: ignore[dict-item]  # only counted
    assert pool.pick() is first
    first.load = 0.95
    assert pool.pick() is second  # more viewers, but room
    second.load = 0.9
    with pytest.raises(Saturated) as refused:
        pool.pick()
    assert "95%" in refused.value.message and refused.value.retry_after
    off = WorkerPool(make_settings(max_viewer_load=1.0), Metrics(), 1, lambda _: None)
    off.workers[0].alive, off.workers[0].load = True, 1.0
    assert off.pick() is off.workers[0]


async def test_workers_report_how_busy_they_are(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app(make_settings(workers=2)))
    metrics = client.app[METRICS]

    def reported() -> set[str]:
        return {sample.labels["process"] for family in metrics.loop_busy.collect()
                for sample in family.samples}

    async with asyncio.timeout(30):
        while reported() != {"main", "worker-0", "worker-1"}:
            await asyncio.sleep(0.1)
