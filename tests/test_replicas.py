"""Gateway replicas sharing a real Redis (Debian ``redis-server``): ``python -m gateway serve``
processes, as an operator runs them, against the simulator's HeyGen."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import av
import pytest
import redis.asyncio as aioredis
from aiortc import RTCSessionDescription
from pytest_aiohttp import AiohttpServer
from yarl import URL

from gateway.sim.app import create_sim_app
from gateway.sim.config import SimSettings
from gateway.sim.ledger import Ledger

from .cloud_rig import GatewayProcess, free_port
from .rtc_client import Player, minimal_offer
from .sim.conftest import needs_netns

REDIS = shutil.which("redis-server")
# CI must run them (make test installs redis-server); a developer without root may skip them.
needs_redis = pytest.mark.skipif(REDIS is None and os.environ.get("CI") != "true",
                                 reason="apt-get install redis-server")
LEASE = "2"  # seconds: a dead replica is noticed quickly
TIMEOUT = 30.0


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        assert REDIS is not None
        self.proc = await asyncio.create_subprocess_exec(
            REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.workdir),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        client = aioredis.from_url(self.url)
        try:
            async with asyncio.timeout(TIMEOUT):
                while True:
                    with contextlib.suppress(OSError, aioredis.ConnectionError):
                        if await client.ping():
                            return
                    await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def sim(aiohttp_server: AiohttpServer) -> AsyncIterator[tuple[Any, Ledger]]:
    ledger = Ledger(":memory:")
    yield await aiohttp_server(create_sim_app(SimSettings.from_env({}), ledger=ledger)), ledger
    ledger.close()


@contextlib.asynccontextmanager
async def replicas(sim: Any, redis: RedisServer, tmp_path: Path, *names: str,
                   **settings: str) -> AsyncIterator[list[GatewayProcess]]:
    gateways = [GatewayProcess(sim, tmp_path / name, redis_url=redis.url, replica_id=name,
                               replica_lease_ttl=LEASE, workers="0", **settings)
                for name in names]
    try:
        await asyncio.gather(*(g.start() for g in gateways))
        yield gateways
    finally:
        for gateway in gateways:
            if gateway.proc is not None and gateway.proc.returncode is None:
                await gateway.stop(signal.SIGTERM)


async def call(method: str, url: str, **kwargs: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with aiohttp.ClientSession() as http, http.request(method, url, **kwargs) as response:
        text = await response.text()
        body: Any = text
        if response.content_type == "application/json":
            body = await response.json()
        return response.status, body, response


async def watch_through(whep_url: str, owner: str) -> None:
    """An aiortc player POSTs its offer to ``whep_url``, follows the redirect to ``owner`` and
    decodes a video frame."""
    player = Player.receiving("video", "audio")
    try:
        async with aiohttp.ClientSession() as http, http.post(
                whep_url, data=await player.offer(),
                headers={"Content-Type": "application/sdp"}) as response:
            answer = await response.text()
            assert response.status == 201, answer
            assert str(response.url).startswith(owner)  # answered by the owner
            location = response.headers["Location"]
        await player.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        frame = await player.first_frame("video", TIMEOUT)
        assert isinstance(frame, av.VideoFrame) and frame.width > 0
        async with aiohttp.ClientSession() as http, http.delete(
                str(response.url.join(URL(location)))) as deleted:
            assert deleted.status == 200
    finally:
        await player.pc.close()


async def wait_until(predicate: Any, timeout: float = TIMEOUT) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.1)


@needs_redis
@needs_netns
async def test_a_session_on_one_replica_is_served_by_the_other(
        sim: tuple[Any, Ledger], redis_server: RedisServer, tmp_path: Path) -> None:
    server, ledger = sim
    async with replicas(server, redis_server, tmp_path, "a", "b") as (a, b):
        created = await a.create_session()
        session_id = created["id"]
        # Listed and described by B.
        status, listing, _ = await call("GET", b.url + "/v1/sessions")
        assert status == 200 and [s["id"] for s in listing["sessions"]] == [session_id]
        status, described, _ = await call("GET", f"{b.url}/v1/sessions/{session_id}")
        assert status == 200 and described["id"] == session_id and described["state"] == "live"
        # Spoken to through B (forwarded to A, which holds the provider session), and its
        # events streamed through B.
        async with aiohttp.ClientSession() as http, http.get(
                f"{b.url}/v1/sessions/{session_id}/events") as stream:
            assert stream.status == 200
            assert stream.headers["Content-Type"].startswith("text/event-stream")
            status, spoken, _ = await call("POST", f"{b.url}/v1/sessions/{session_id}/speak",
                                           json={"text": "Hello from B.", "task_type": "repeat"})
            assert status == 200 and spoken["task_id"], spoken
            seen: list[dict[str, Any]] = []
            async with asyncio.timeout(TIMEOUT):
                async for line in stream.content:
                    if line.startswith(b"data: "):
                        seen.append(json.loads(line[6:]))
                    if any(e.get("type") == "avatar_stop_talking"
                           and e.get("task_id") == spoken["task_id"] for e in seen):
                        break
            kinds = [e["type"] for e in seen if e.get("task_id") == spoken["task_id"]]
            assert kinds[0] == "avatar_start_talking" and kinds[-1] == "avatar_stop_talking"
        # WHEP through B: redirected to A, which answers; a real peer following the redirect
        # (as a player's fetch does) plays the avatar.
        offer = minimal_offer()
        status, _, response = await call(
            "POST", f"{b.url}/v1/sessions/{session_id}/whep", data=offer,
            headers={"Content-Type": "application/sdp"}, allow_redirects=False)
        assert status == 307
        assert response.headers["Location"] == f"{a.url}/v1/sessions/{session_id}/whep"
        await watch_through(f"{b.url}/v1/sessions/{session_id}/whep", a.url)
        # Deleted through B: the provider session is stopped, and both forget it.
        status, _, _ = await call("DELETE", f"{b.url}/v1/sessions/{session_id}")
        assert status == 200
        assert ledger.open_count() == 0
        for gateway in (a, b):
            status, listing, _ = await call("GET", gateway.url + "/v1/sessions")
            assert listing["sessions"] == []
        status, _, _ = await call("GET", f"{b.url}/v1/sessions/{session_id}")
        assert status == 404


@needs_redis
@needs_netns
async def test_the_paid_limit_holds_across_replicas(
        sim: tuple[Any, Ledger], redis_server: RedisServer, tmp_path: Path) -> None:
    server, ledger = sim
    async with replicas(server, redis_server, tmp_path, "a", "b") as gateways:
        results = await asyncio.gather(*(
            call("POST", gateways[i % 2].url + "/v1/sessions", json={"upstream": "heygen"})
            for i in range(10)))
        statuses = sorted(status for status, _, _ in results)
        assert statuses == [201] * 3 + [429] * 7, statuses
        refused = next(body for status, body, _ in results if status == 429)
        assert "across the gateway's replicas" in refused["error"]["message"] \
            or "provider sessions are open" in refused["error"]["message"]
        assert ledger.open_count() == 3
        for created_status, body, _ in results:
            if created_status == 201:
                owner = gateways[0] if (await call(
                    "GET", f"{gateways[0].url}/v1/sessions/{body['id']}"))[0] == 200 else gateways[1]
                assert (await call("DELETE", f"{owner.url}/v1/sessions/{body['id']}"))[0] == 200
        assert ledger.open_count() == 0


@needs_redis
@needs_netns
async def test_a_killed_replicas_sessions_are_stopped_once_by_the_others(
        sim: tuple[Any, Ledger], redis_server: RedisServer, tmp_path: Path) -> None:
    server, ledger = sim
    async with replicas(server, redis_server, tmp_path, "a", "b", "c") as (a, b, c):
        first, second = await a.create_session(), await a.create_session()
        assert ledger.open_count() == 2
        client = aioredis.from_url(redis_server.url, decode_responses=True)
        try:
            # A paid place A took for a session it had not finished creating when it died.
            await client.hset("avatargw:paid", "half-made", "a")
            assert a.proc is not None
            a.proc.kill()  # SIGKILL: A stops nothing
            await a.proc.wait()

            async def reaped() -> bool:
                return ledger.open_count() == 0 and await client.hlen("avatargw:paid") == 0

            await wait_until(reaped)
            claims = {sid: await client.get(f"avatargw:reaped:{sid}")
                      for sid in (first["id"], second["id"])}
        finally:
            await client.aclose()
        # Each session was claimed by exactly one of the two survivors.
        assert set(claims.values()) <= {"b", "c"} and None not in claims.values(), claims
        for gateway in (b, c):
            _, listing, _ = await call("GET", gateway.url + "/v1/sessions")
            assert listing["sessions"] == []


@needs_redis
@needs_netns
async def test_replicas_recover_from_a_redis_restart(
        sim: tuple[Any, Ledger], redis_server: RedisServer, tmp_path: Path) -> None:
    server, ledger = sim
    async with replicas(server, redis_server, tmp_path, "a", "b") as (a, b):
        created = await a.create_session()
        await redis_server.stop()
        # While Redis is down: each replica still serves what it holds; nothing paid starts
        # (the cluster's count cannot be checked), and the answer says so.
        status, listing, _ = await call("GET", a.url + "/v1/sessions")
        assert status == 200 and [s["id"] for s in listing["sessions"]] == [created["id"]]
        status, body, _ = await call("POST", b.url + "/v1/sessions", json={"upstream": "heygen"})
        assert status == 503 and "try again" in body["error"]["message"], body
        assert ledger.open_count() == 1
        await redis_server.start()  # empty: no persistence

        async def listed_again() -> bool:
            status, listing, _ = await call("GET", b.url + "/v1/sessions")
            return status == 200 and [s["id"] for s in listing["sessions"]] == [created["id"]]

        await wait_until(listed_again)
        # The paid place came back too: two more fit, not three.
        results = [await call("POST", b.url + "/v1/sessions", json={"upstream": "heygen"})
                   for _ in range(3)]
        assert [status for status, _, _ in results] == [201, 201, 429]
        for _, body, _ in results[:2]:
            assert (await call("DELETE", f"{b.url}/v1/sessions/{body['id']}"))[0] == 200
        assert (await call("DELETE", f"{b.url}/v1/sessions/{created['id']}"))[0] == 200
        assert ledger.open_count() == 0


@needs_redis
async def test_a_client_has_one_request_budget_across_replicas(
        sim: tuple[Any, Ledger], redis_server: RedisServer, tmp_path: Path) -> None:
    server, _ = sim
    async with replicas(server, redis_server, tmp_path, "a", "b", rate_limit="0.2",
                        rate_limit_burst="4") as (a, b):
        # Alternating replicas: each alone would allow 4; together they allow 4.
        statuses = [(await call("GET", (a, b)[i % 2].url + "/v1/catalog"))[0] for i in range(8)]
        assert statuses[:4] == [200] * 4 and statuses[4:] == [429] * 4, statuses


@needs_redis
async def test_a_token_revoked_on_one_replica_is_refused_by_the_others(
        sim: tuple[Any, Ledger], redis_server: RedisServer, tmp_path: Path) -> None:
    server, _ = sim
    admin = {"Authorization": "Bearer adm-token"}
    async with replicas(server, redis_server, tmp_path, "a", "b", api_token="ctl-token",
                        admin_token="adm-token", token_secret="shared-secret") as (a, b):
        status, minted, _ = await call("POST", a.url + "/v1/tokens", headers=admin,
                                       json={"role": "controller"})
        assert status == 201, minted
        token = {"Authorization": f"Bearer {minted['token']}"}
        assert (await call("GET", b.url + "/v1/sessions", headers=token))[0] == 200
        status, _, _ = await call("POST", a.url + "/v1/tokens/revoke", headers=admin,
                                  json={"token": minted["token"]})
        assert status == 200
        for gateway in (a, b):
            status, body, _ = await call("GET", gateway.url + "/v1/sessions", headers=token)
            assert status == 401 and "revoked" in body["error"]["message"], gateway.url
