"""A cloud avatar in the operator's own LiveKit room (the ``livekit`` distribution with
LiveAvatar's ``livekit_config`` or HeyGen's ``livekit_settings``): the provider publishes the
avatar there itself; the gateway
joins hidden, and still serves its WHEP viewers and events from the same media. The simulator
plays both providers and the operator's LiveKit."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.app import create_app
from gateway.livekit_out import EVENTS_TOPIC, GATEWAY_IDENTITY, PUBLISHER_IDENTITY
from gateway.sim.app import LIVEKIT, create_sim_app
from gateway.sim.config import SimSettings
from gateway.sim.ledger import Ledger
from gateway.upstream.heygen import HeyGenUpstream
from gateway.upstream.liveavatar import LiveAvatarUpstream

from .cloud_rig import Rig, gateway_settings
from .rtc_client import WhepViewer
from .sim.conftest import needs_netns
from .sim.sdk_client import TIMEOUT, SdkClient


@pytest.fixture
async def operator_rig(aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient,
                       tmp_path: Path) -> AsyncIterator[Rig]:
    ledger = Ledger(":memory:")
    sim_settings = SimSettings.from_env({})
    sim = await aiohttp_server(create_sim_app(sim_settings, ledger=ledger))
    settings = gateway_settings(
        sim, tmp_path, livekit_url=f"ws://127.0.0.1:{sim.port}",
        livekit_api_key=sim_settings.livekit_api_key,
        livekit_api_secret=sim_settings.livekit_api_secret.reveal())
    gateway = await aiohttp_client(create_app(settings))
    rig = Rig(gateway, sim, ledger)
    yield rig
    await gateway.close()
    assert rig.open_sessions() == 0, "the gateway left a paid session open"
    ledger.close()


@needs_netns
@pytest.mark.parametrize("provider", ["liveavatar", "heygen"])
async def test_the_provider_publishes_into_the_operators_room(operator_rig: Rig,
                                                              provider: str) -> None:
    rig = operator_rig
    response = await rig.gateway.post("/v1/sessions", json={
        "upstream": provider, "quality": "low", "distribution": "livekit"})
    created = await response.json()
    assert response.status == 201, created
    session = rig.session(created["id"])
    upstream = session.upstream
    assert isinstance(upstream, LiveAvatarUpstream | HeyGenUpstream)
    assert upstream.operator_room is not None
    assert session.livekit is None  # the provider publishes; the gateway does not republish
    room = rig.sim.app[LIVEKIT].room(created["livekit"]["room"])
    assert room is not None
    # The provider's avatar is in the operator's room under the identity the gateway gave it;
    # the gateway is there too, hidden.
    assert room.avatar is not None and room.avatar.identity == PUBLISHER_IDENTITY
    assert GATEWAY_IDENTITY in room.clients
    gateway_connection = room.connection(GATEWAY_IDENTITY)
    assert gateway_connection is not None and gateway_connection.hidden

    # A LiveKit viewer with the gateway's token sees the avatar, and not the gateway.
    grant = await (await rig.gateway.post(created["livekit"]["token_url"])).json()
    viewer = SdkClient(grant["url"], grant["token"])
    await viewer.connect()
    # And a WHEP viewer of the gateway sees the same avatar, through the hidden gateway.
    whep = WhepViewer(rig.gateway, created["id"])
    try:
        await whep.connect()
        await viewer.wait_for(lambda: viewer.video.frames >= 30)
        assert PUBLISHER_IDENTITY in viewer.room.remote_participants
        assert GATEWAY_IDENTITY not in viewer.room.remote_participants
        async with asyncio.timeout(TIMEOUT):
            await whep.first_frame.wait()
        # The gateway's own events reach the room too (the provider's are LiveAvatar's shape).
        spoken = await rig.gateway.post(f"/v1/sessions/{created['id']}/speak",
                                        json={"text": "Hello, room.", "task_type": "repeat"})
        task_id = (await spoken.json())["task_id"]

        def relayed() -> list[str]:
            return [event["type"] for event in map(json.loads, (
                d.payload for d in viewer.data if d.topic == EVENTS_TOPIC))
                if event.get("task_id") == task_id]

        await viewer.wait_for(lambda: "avatar_stop_talking" in relayed())
        assert relayed()[0] == "avatar_start_talking"
    finally:
        await whep.close()
        await viewer.close()

    provider_id = rig.provider_id(created["id"])
    assert (await rig.gateway.delete(f"/v1/sessions/{created['id']}")).status == 200
    async with asyncio.timeout(TIMEOUT):
        while rig.open_sessions():
            await asyncio.sleep(0.05)
    assert [e.open for e in rig.ledger.entries() if e.session_id == provider_id] == [False]
