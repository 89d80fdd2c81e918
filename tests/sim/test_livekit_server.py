"""The LiveKit-compatible simulator against the real ``livekit`` Python SDK (Rust core).

Every test joins real SDK clients over WebRTC, so they run inside the private network
namespace of ``tests/netns.sh``. Most use the "low" tier (640x360) to keep CPU down.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import weakref
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from aiortc import RTCPeerConnection
from livekit import rtc

from gateway.config import QUALITY_TIERS
from gateway.sim.livekit import LiveKitServer
from gateway.sim.room import AvatarSpec, Room

from .conftest import LiveKitRig, SdkFactory, needs_netns
from .sdk_client import TIMEOUT, SdkClient, feed

LOW = QUALITY_TIERS["low"]
HIGH = QUALITY_TIERS["high"]
HELLO = "Hello there, nice to meet you."
LONG = ("This sentence is long on purpose, so that an interruption can cut it off well before "
        "the avatar would have reached its natural end, many seconds from now.")


def events_of(client: SdkClient) -> list[dict[str, Any]]:
    return [json.loads(d.payload) for d in client.data if d.sender == "heygen"]


def types_of(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


async def avatar_room(livekit: LiveKitRig, spec: AvatarSpec, name: str = "room-1") -> Room:
    room = livekit.server.create_room(name)
    await room.start_avatar(spec)
    return room


@needs_netns
async def test_default_join_falls_back_to_v0_and_receives_avatar_media_and_events(
        livekit: LiveKitRig, sdk_client: SdkFactory) -> None:
    room = await avatar_room(livekit, AvatarSpec(LOW))
    assert room.avatar is not None
    # single_peer_connection=None: the SDK's own default, which tries /rtc/v1 first.
    client = await sdk_client("gateway", "room-1", single_peer_connection=None)
    assert livekit.server.v1_requests >= 1
    assert list(client.room.remote_participants) == ["heygen"]
    assert room.clients == ["gateway"]
    await client.wait_for(lambda: client.video.frames >= 30 and client.audio.frames >= 100)
    assert sorted(s.split(":")[1] for s in client.seen("track_subscribed")) == ["audio", "video"]
    assert client.video.sizes == {(640, 360)}
    assert client.audio.sample_rates == {48_000} and client.audio.channels == {1}
    loop = asyncio.get_running_loop()
    idle_rms = client.peak_rms(since=loop.time() - 0.5)

    result = await room.avatar.speak(HELLO)
    assert room.avatar.speaking
    await client.wait_for(lambda: "avatar_stop_talking" in types_of(events_of(client)))
    events = events_of(client)
    kinds = types_of(events)
    assert kinds[0] == "avatar_start_talking"
    assert kinds[-2:] == ["avatar_end_message", "avatar_stop_talking"]
    assert set(kinds[1:-2]) == {"avatar_talking_message"} and len(kinds) >= 5
    assert {e["task_id"] for e in events} == {result.task_id}
    assert "".join(e["message"] for e in events[1:-2]) == HELLO
    assert all(d.topic in ("", None) for d in client.data)
    started = next(d.at for d in client.data if b"avatar_start_talking" in d.payload)
    stopped = next(d.at for d in client.data if b"avatar_stop_talking" in d.payload)
    speech_rms = max(rms for at, rms in client.audio.rms if started <= at <= stopped + 0.3)
    assert idle_rms < 50 < 1000 < speech_rms, (idle_rms, speech_rms)
    assert not room.avatar.speaking


@needs_netns
async def test_interrupt_cuts_speech_short(livekit: LiveKitRig, sdk_client: SdkFactory) -> None:
    room = await avatar_room(livekit, AvatarSpec(LOW))
    assert room.avatar is not None
    client = await sdk_client()
    result = await room.avatar.speak(LONG)
    queued = await room.avatar.speak(HELLO)
    await client.wait_for(lambda: "avatar_start_talking" in types_of(events_of(client)))
    await asyncio.sleep(0.5)
    await room.avatar.interrupt()
    await client.wait_for(lambda: "avatar_stop_talking" in types_of(events_of(client)))
    stop = next(e for e in events_of(client) if e["type"] == "avatar_stop_talking")
    assert stop["task_id"] == result.task_id
    assert stop["duration_ms"] < result.duration_ms / 3, (stop, result)
    await asyncio.sleep(0.3)
    assert queued.task_id not in {e["task_id"] for e in events_of(client)}
    assert not room.avatar.speaking


@needs_netns
async def test_high_quality_video_is_720p(livekit: LiveKitRig, sdk_client: SdkFactory) -> None:
    await avatar_room(livekit, AvatarSpec(HIGH))
    client = await sdk_client()
    await client.wait_for(lambda: client.video.frames >= 15)
    assert client.video.sizes == {(1280, 720)}


@needs_netns
async def test_h264_video_decodes(livekit: LiveKitRig, sdk_client: SdkFactory) -> None:
    room = await avatar_room(livekit, AvatarSpec(LOW, video_codec="H264"))
    client = await sdk_client()
    await client.wait_for(lambda: client.video.frames >= 15)
    assert client.video.sizes == {(640, 360)}
    connection = room.connection("gateway")
    assert connection is not None
    offer = connection.peer_connections[0].localDescription.sdp
    assert "H264/90000" in offer and "VP8/90000" not in offer


async def test_bad_tokens_are_refused(livekit: LiveKitRig) -> None:
    server = livekit.server
    good = server.token("gateway", "room-1")
    forged = LiveKitServer(api_secret="another-secret-of-at-least-32-characters").token("gateway", "room-1")
    expired = server.token("gateway", "room-1", ttl=timedelta(minutes=-5))
    tampered = good[:-6] + ("AAAAAA" if not good.endswith("AAAAAA") else "BBBBBB")
    for token in (forged, tampered, expired):
        client = SdkClient(livekit.url, token)
        with pytest.raises(rtc.ConnectError, match="401"):
            await client.connect()
        await client.close()
    assert server.rejected == 3
    assert server.room("room-1") is None

    async with aiohttp.ClientSession() as http:
        async def get(path: str) -> tuple[int, str]:
            async with http.get(livekit.http_url(path)) as response:
                return response.status, await response.text()

        assert await get(f"/rtc/validate?access_token={expired}") == (401, "invalid token")
        assert await get(f"/rtc/validate?access_token={forged}") == (401, "invalid token")
        assert await get(f"/rtc/validate?access_token={good}") == (200, "success")
        # The SDKs fall back to /rtc only on a 404 from the single-PC paths; others are 404 too.
        for path in ("/rtc/v1", "/rtc/v1/validate", "/no/such/path"):
            status, _ = await get(path)
            assert status == 404, path


@needs_netns
async def test_microphone_is_decoded_and_voice_is_detected(livekit: LiveKitRig,
                                                           sdk_client: SdkFactory) -> None:
    room = livekit.server.create_room("room-1")
    voice: list[tuple[str, str]] = []
    room.on_voice = lambda identity, change: voice.append((identity, change))
    client = await sdk_client()
    source = await client.publish_microphone()
    await feed(source, 0.6, 0.3)
    async with asyncio.timeout(TIMEOUT):
        while room.mic_frames < 10:
            await asyncio.sleep(0.05)
    assert voice == []  # not listening yet

    room.listening = True
    await feed(source, 0.8, 0.3)
    await feed(source, 1.2, 0.0)
    async with asyncio.timeout(TIMEOUT):
        while len(voice) < 2:
            await asyncio.sleep(0.05)
    assert voice == [("gateway", "user_start"), ("gateway", "user_stop")]
    assert room.mic_frames >= 80  # 20 ms frames: 2.6 s of audio minus start-up
    assert room.mic_peak > 5000  # a 0.3 full-scale tone, not silence


@needs_netns
async def test_data_packets_both_ways_and_between_clients(livekit: LiveKitRig,
                                                          sdk_client: SdkFactory) -> None:
    room = await avatar_room(livekit, AvatarSpec(LOW, event_topic="agent-response"))
    received: list[tuple[str, str, bytes]] = []
    room.on_data = lambda sender, topic, payload: received.append((sender, topic, payload))
    alice = await sdk_client("alice")
    bob = await sdk_client("bob")
    await alice.wait_for(lambda: "bob" in alice.room.remote_participants)

    await alice.room.local_participant.publish_data(b'"hello avatar"', reliable=True, topic="chat")
    await alice.room.local_participant.publish_data(b"lossy", reliable=False, topic="noise")
    await bob.room.local_participant.publish_data(b"to alice", destination_identities=["alice"])
    async with asyncio.timeout(TIMEOUT):
        while len(received) < 2:
            await asyncio.sleep(0.05)
    assert sorted(received) == [("alice", "chat", b'"hello avatar"'), ("alice", "noise", b"lossy")]
    # LiveKit forwards client data to the other clients, honouring destination identities.
    await bob.wait_for(lambda: len(bob.data) >= 2)
    assert sorted((d.sender, d.topic, d.payload) for d in bob.data) == [
        ("alice", "chat", b'"hello avatar"'), ("alice", "noise", b"lossy")]
    await alice.wait_for(lambda: any(d.payload == b"to alice" for d in alice.data))

    await room.send_data(b'{"type":"x"}', topic="agent-response", destination=["bob"])
    await bob.wait_for(lambda: any(d.topic == "agent-response" for d in bob.data))
    got = next(d for d in bob.data if d.topic == "agent-response")
    assert (got.sender, got.payload) == ("heygen", b'{"type":"x"}')
    await asyncio.sleep(0.2)
    assert not any(d.topic == "agent-response" for d in alice.data)


@needs_netns
async def test_avatar_joins_late_leaves_and_comes_back(livekit: LiveKitRig, sdk_client: SdkFactory) -> None:
    room = livekit.server.create_room("room-1")
    client = await sdk_client()
    assert client.room.remote_participants == {}

    avatar = await room.start_avatar(AvatarSpec(LOW))  # ParticipantUpdate + re-offer
    await client.wait_for(lambda: client.video.frames >= 10 and client.audio.frames >= 20)
    assert client.seen("participant_connected") == ["heygen"]

    await avatar.leave()
    await client.wait_for(lambda: client.seen("participant_disconnected") == ["heygen"])
    assert room.avatar is None and "heygen" not in client.room.remote_participants
    assert room.clients == ["gateway"] and client.seen("disconnected") == []

    frames = client.video.frames
    await room.start_avatar(AvatarSpec(LOW))  # new sids, new transceivers, old ones inactive
    await client.wait_for(lambda: client.video.frames >= frames + 10)
    assert client.seen("participant_connected") == ["heygen", "heygen"]


@needs_netns
async def test_room_close_disconnects_the_client(livekit: LiveKitRig, sdk_client: SdkFactory) -> None:
    room = await avatar_room(livekit, AvatarSpec(LOW))
    client = await sdk_client()
    await client.wait_for(lambda: client.video.frames >= 5)
    await livekit.server.close_room("room-1")
    await client.wait_for(lambda: bool(client.seen("disconnected")))
    assert client.seen("disconnected") == [str(rtc.DisconnectReason.ROOM_DELETED)]
    assert room.closed and room.clients == [] and room.avatar is None
    assert livekit.server.room("room-1") is None


@needs_netns
async def test_dropped_clients_reconnect_with_a_fresh_join(livekit: LiveKitRig,
                                                          sdk_client: SdkFactory) -> None:
    room = await avatar_room(livekit, AvatarSpec(LOW))
    joins: list[tuple[str, bool]] = []
    room.on_client = lambda identity, joined: joins.append((identity, joined))
    client = await sdk_client()
    await client.wait_for(lambda: client.video.frames >= 5)
    await room.drop_clients()
    # The SDK notices at once, tries to resume (refused: not simulated), then rejoins from
    # scratch: the avatar disconnects and reconnects in its eyes, and media flows again.
    await client.wait_for(lambda: bool(client.seen("reconnected")))
    assert client.seen("reconnecting") == [""]
    assert client.seen("participant_disconnected") == ["heygen"]
    assert client.seen("participant_connected") == ["heygen"]
    frames = client.video.frames
    await client.wait_for(lambda: client.video.frames >= frames + 10)
    assert joins == [("gateway", True), ("gateway", False), ("gateway", True)]
    assert livekit.server.rejected == 1  # the resume attempt


@needs_netns
async def test_duplicate_identity_replaces_the_older_client(livekit: LiveKitRig,
                                                            sdk_client: SdkFactory) -> None:
    room = livekit.server.create_room("room-1")
    first = await sdk_client("gateway")
    second = await sdk_client("gateway")
    await first.wait_for(lambda: bool(first.seen("disconnected")))
    assert first.seen("disconnected") == [str(rtc.DisconnectReason.DUPLICATE_IDENTITY)]
    assert room.clients == ["gateway"] and second.seen("disconnected") == []


def _live_peer_connections() -> list[RTCPeerConnection]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, RTCPeerConnection)]


def _sim_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("sim-")
            or "gateway.upstream.local" in repr(t.get_coro())]


@needs_netns
async def test_nothing_leaks(livekit: LiveKitRig) -> None:
    before = len(_live_peer_connections())
    room = await avatar_room(livekit, AvatarSpec(LOW))
    assert room.avatar is not None
    joins: list[tuple[str, bool]] = []
    room.on_client = lambda identity, joined: joins.append((identity, joined))
    client = SdkClient(livekit.url, livekit.server.token("gateway", "room-1"))
    await client.connect()
    source = await client.publish_microphone()
    await feed(source, 0.3, 0.2)
    await client.room.local_participant.publish_data(b"x", topic="t")
    await room.avatar.speak("Hi.")
    await client.wait_for(lambda: client.video.frames >= 10 and room.mic_frames > 0)
    connection = room.connection("gateway")
    assert connection is not None
    pcs = [weakref.ref(pc) for pc in connection.peer_connections]
    assert len(pcs) == 2 and livekit.server.connections == 1
    del connection

    await client.close()
    async with asyncio.timeout(TIMEOUT):
        while room.clients or livekit.server.connections:
            await asyncio.sleep(0.05)
    assert joins == [("gateway", True), ("gateway", False)]
    await room.close()

    def released() -> bool:
        return (not _sim_tasks() and len(_live_peer_connections()) == before
                and all(ref() is None for ref in pcs))

    # Cancelled aiortc/aioice internals unwind over a few loop turns (more on a busy machine);
    # what leaks stays for good, so a generous deadline costs nothing when all is well.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(TIMEOUT):
            while not released():
                await asyncio.sleep(0.1)
    assert _sim_tasks() == []
    assert len(_live_peer_connections()) == before
    assert all(ref() is None for ref in pcs)
    assert livekit.server.rooms == []
