"""The ``livekit`` distribution: a local-avatar session published into the operator's LiveKit
(the simulator's LiveKit server stands in for it), watched with the real ``livekit`` SDK and a
token from ``POST /v1/sessions/{id}/livekit-token``."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from livekit import rtc

from gateway.api.common import SESSIONS
from gateway.app import create_app
from gateway.livekit_out import EVENTS_TOPIC, PUBLISHER_IDENTITY

from .conftest import ClientFactory, make_settings
from .livekit_rig import OperatorLiveKit, livekit_gateway, livekit_session, operator_livekit
from .sim.conftest import needs_netns
from .sim.sdk_client import TIMEOUT, SdkClient, feed

Client = TestClient[Any, Any]
__all__ = ["livekit_gateway", "operator_livekit"]  # fixtures


def avatar_events(client: SdkClient) -> list[dict[str, Any]]:
    return [json.loads(d.payload) for d in client.data
            if d.sender == PUBLISHER_IDENTITY and d.topic == EVENTS_TOPIC]


@needs_netns
async def test_a_livekit_viewer_sees_hears_and_gets_the_events(
        livekit_gateway: Client, operator_livekit: OperatorLiveKit) -> None:
    gateway, server = livekit_gateway, operator_livekit.server
    session = await livekit_session(gateway)
    assert session["distribution"] == "livekit"
    room_name = session["livekit"]["room"]
    room = server.room(room_name)
    assert room is not None and room.clients == [PUBLISHER_IDENTITY]
    async with asyncio.timeout(TIMEOUT):  # the room lists a track once its media arrives
        while len(room.publications()) < 2:
            await asyncio.sleep(0.05)
    assert sorted(p.info.name for p in room.publications()) == ["avatar_audio", "avatar_video"]
    assert [p.codec for p in room.publications() if p.frames.kind == "video"] == ["VP8"]

    # A viewer's token of the session (what a share link carries) gets the LiveKit grant.
    minted = await gateway.post("/v1/tokens", json={"role": "viewer", "session_id": session["id"]})
    viewer_token = (await minted.json())["token"]
    response = await gateway.post(session["livekit"]["token_url"],
                                  headers={"Authorization": f"Bearer {viewer_token}"})
    grant = await response.json()
    assert response.status == 201, grant
    assert grant["room"] == room_name and grant["url"] == session["livekit"]["url"]
    assert grant["microphone"] is False
    viewer = SdkClient(grant["url"], grant["token"])
    await viewer.connect()
    try:
        assert list(viewer.room.remote_participants) == [PUBLISHER_IDENTITY]
        await viewer.wait_for(lambda: viewer.video.frames >= 90 and viewer.audio.frames >= 50)
        assert viewer.video.sizes == {(640, 360)}
        assert viewer.frame_rate() >= 25, viewer.frame_rate()

        spoken = await gateway.post(f"/v1/sessions/{session['id']}/speak",
                                    json={"text": "Hello from the gateway.", "task_type": "repeat"})
        task_id = (await spoken.json())["task_id"]
        await viewer.wait_for(lambda: ("avatar_stop_talking", task_id) in {
            (e["type"], e.get("task_id")) for e in avatar_events(viewer)})
        kinds = [e["type"] for e in avatar_events(viewer) if e.get("task_id") == task_id]
        assert kinds[0] == "avatar_start_talking" and kinds[-1] == "avatar_stop_talking"
        assert viewer.peak_rms() > 500  # the avatar's voice, not silence

        # A viewer's token neither publishes tracks nor data.
        source = rtc.AudioSource(48_000, 1)
        track = rtc.LocalAudioTrack.create_audio_track("microphone", source)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(5):
                await viewer.room.local_participant.publish_track(track,
                                                                  rtc.TrackPublishOptions())
        publisher = room.connection(PUBLISHER_IDENTITY)
        assert publisher is not None
        assert [p.info.name for p in room.publications()
                if p.participant_sid != publisher.sid] == []

        # The session ends: the avatar leaves the room.
        assert (await gateway.delete(f"/v1/sessions/{session['id']}")).status == 200
        await viewer.wait_for(
            lambda: PUBLISHER_IDENTITY in viewer.seen("participant_disconnected"))
        assert room.publications() == []
    finally:
        await viewer.close()
    async with asyncio.timeout(TIMEOUT):
        while server.rooms and server.rooms[0].clients:
            await asyncio.sleep(0.05)
    # Nothing of the publisher is left running in the gateway.
    assert [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("livekit-")] == []


async def test_livekit_distribution_needs_the_operators_livekit(client: Client,
                                                                session_id: str) -> None:
    response = await client.post("/v1/sessions", json={"distribution": "livekit"})
    assert response.status == 400
    assert "LIVEKIT_URL" in (await response.json())["error"]["message"]
    response = await client.post("/v1/sessions", json={"distribution": "carrier-pigeon"})
    assert response.status == 400
    response = await client.post(f"/v1/sessions/{session_id}/livekit-token")
    assert response.status == 409
    assert "WHEP" in (await response.json())["error"]["message"]
    assert client.app[SESSIONS].get(session_id).distribution == "whep"


@needs_netns
async def test_a_controllers_microphone_reaches_the_local_avatar_through_the_room(
        livekit_gateway: Client) -> None:
    gateway = livekit_gateway
    session = await livekit_session(gateway)
    grant = await (await gateway.post(session["livekit"]["token_url"])).json()
    assert grant["microphone"] is True  # a controller's, and the local avatar listens
    assert (await gateway.post(f"/v1/sessions/{session['id']}/listen",
                               json={"listening": True})).status == 200
    controller = SdkClient(grant["url"], grant["token"])
    await controller.connect()
    try:
        source = await controller.publish_microphone()

        def heard() -> list[str]:
            return [e["type"] for e in avatar_events(controller)
                    if e["type"] in ("user_start", "user_stop")]

        # A loud tone, then silence: the avatar's ears (VAD) hear it start and stop, and the
        # events come back through the room.
        for _ in range(3):
            await feed(source, 1.0, 0.3)
            await feed(source, 1.5, 0.0)
            if "user_stop" in heard():
                break
        await controller.wait_for(lambda: "user_stop" in heard())
        assert heard()[0] == "user_start"
    finally:
        await controller.close()


@needs_netns
async def test_the_publisher_comes_back_after_the_operators_room_drops(
        livekit_gateway: Client, operator_livekit: OperatorLiveKit) -> None:
    gateway = livekit_gateway
    session = await livekit_session(gateway)
    room = operator_livekit.server.room(session["livekit"]["room"])
    assert room is not None
    grant = await (await gateway.post(session["livekit"]["token_url"])).json()
    viewer = SdkClient(grant["url"], grant["token"])
    await viewer.connect()
    try:
        await viewer.wait_for(lambda: viewer.video.frames >= 30)
        # Every signaling socket and peer connection of the room cut at once (no goodbye):
        # the SDKs rejoin, the gateway republishes, the viewer sees the avatar again.
        await room.drop_clients()
        before = viewer.video.frames
        await viewer.wait_for(lambda: viewer.video.frames >= before + 60, timeout=60)
        assert PUBLISHER_IDENTITY in room.clients
        assert len(room.publications()) == 2
    finally:
        await viewer.close()


async def test_an_unreachable_operator_livekit_fails_the_start_cleanly(
        aiohttp_client: ClientFactory) -> None:
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    settings = make_settings(livekit_url=f"ws://127.0.0.1:{port}", livekit_api_key="k",
                             livekit_api_secret="secret-at-least-32-characters-long-xx")
    client = await aiohttp_client(create_app(settings))
    response = await client.post("/v1/sessions", json={"distribution": "livekit",
                                                       "quality": "low"})
    body = await response.json()
    assert response.status == 503, body
    assert "operator's LiveKit" in body["error"]["message"] and str(port) in body["error"]["message"]
    assert client.app[SESSIONS].list() == []
    assert [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("livekit-")] == []
