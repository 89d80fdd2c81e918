"""Session lifecycle: nothing runs unwatched, nothing outlives its limits."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestClient

from gateway.api.common import METRICS, SESSIONS
from gateway.app import create_app

from .conftest import ClientFactory, make_settings

Client = TestClient[Any, Any]


async def wait_closed(client: Client, session_id: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while (await client.get(f"/v1/sessions/{session_id}")).status != 404:
            await asyncio.sleep(0.05)


async def test_unwatched_session_is_stopped_after_the_idle_grace(
    aiohttp_client: ClientFactory,
) -> None:
    client = await aiohttp_client(create_app(make_settings(idle_grace=0.4)))
    created = await (await client.post("/v1/sessions")).json()
    session = client.app[SESSIONS].get(created["id"])
    await wait_closed(client, created["id"])
    assert session.close_reason == "idle"
    ends = client.app[METRICS].session_ends.labels("local", "idle")._value.get()
    assert ends == 1


async def test_control_activity_and_event_readers_keep_a_session(
    aiohttp_client: ClientFactory,
) -> None:
    client = await aiohttp_client(create_app(make_settings(idle_grace=0.6)))
    created = await (await client.post("/v1/sessions")).json()
    url = f"/v1/sessions/{created['id']}"
    for _ in range(4):  # 1.2 s of keep-alives, each well inside the grace
        await asyncio.sleep(0.3)
        assert (await client.post(f"{url}/keep-alive")).status == 200
    async with client.get(f"{url}/events") as events:  # an SSE reader counts as watching
        await asyncio.sleep(1.0)
        assert (await client.get(url)).status == 200
        assert events.status == 200
    await wait_closed(client, created["id"])


async def test_max_duration_ends_even_a_watched_session(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app(make_settings(max_session_duration=0.5)))
    created = await (await client.post("/v1/sessions")).json()
    session = client.app[SESSIONS].get(created["id"])
    async with client.get(f"/v1/sessions/{created['id']}/events") as events:
        body = await asyncio.wait_for(events.text(), 10)  # the stream ends with the session
    assert session.close_reason == "max_duration"
    assert '"state":"closed"' in body


async def test_listening_turns_the_local_avatars_ears_on_and_off(client: Client,
                                                                 session_id: str) -> None:
    url = f"/v1/sessions/{session_id}/listen"
    for listening in (True, False):
        response = await client.post(url, json={"listening": listening})
        assert response.status == 200
        assert (await response.json())["listening"] is listening
    bad = await client.post(url, json={"listening": "yes"})
    assert bad.status == 400
