"""The encode-once hub and its aiortc hooks, without a network."""

from __future__ import annotations

import asyncio
import fractions

import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.rtp import RTCP_PSFB_FIR, RTCP_PSFB_PLI, RtcpPsfbPacket

from gateway.media.codecs import Packet
from gateway.media.hub import Hub, HubConfig
from gateway.media.tracks import PacketTrack, attach_sender
from gateway.metrics import Metrics

TB = fractions.Fraction(1, 90_000)


def video_frame(index: int, width: int = 320, height: int = 180) -> av.VideoFrame:
    rng = np.random.default_rng(index)
    yuv = rng.integers(0, 255, size=(height * 3 // 2, width), dtype=np.uint8)
    frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
    frame.pts = index * 3000
    frame.time_base = TB
    return frame


def audio_frame(index: int) -> av.AudioFrame:
    t = (np.arange(960) + index * 960) / 48_000
    pcm = (np.sin(2 * np.pi * 220 * t) * 8000).astype(np.int16).reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
    frame.sample_rate = 48_000
    frame.pts = index * 960
    frame.time_base = fractions.Fraction(1, 48_000)
    return frame


def make_hub(**overrides: float) -> Hub:
    config = HubConfig(bitrate=300_000, **overrides)  # type: ignore[arg-type]
    return Hub(config, Metrics())


async def encode(hub: Hub, first: int, count: int, codecs: int = 1) -> None:
    """Push frames one at a time and wait for each to be encoded by every codec (no skipping)."""
    for index in range(first, first + count):
        before = hub.stats.video_frames_encoded
        hub.push_video(video_frame(index))
        async with asyncio.timeout(5):
            while hub.stats.video_frames_encoded < before + codecs:
                await asyncio.sleep(0.002)


def subscribe(hub: Hub, kind: str = "video", codec: str | None = None) -> PacketTrack:
    """A track whose (imaginary) sender has started reading."""
    track = hub.subscribe(kind, codec=codec)
    track.activate()
    return track


def drain(track: PacketTrack) -> list[Packet]:
    out = []
    while len(track._queue):
        out.append(track._queue.popleft())
    return out


async def test_one_encode_serves_every_viewer() -> None:
    hub = make_hub()
    tracks = [subscribe(hub) for _ in range(3)]
    await encode(hub, 0, 10)
    received = [drain(t) for t in tracks]
    assert hub.stats.video_frames_encoded == 10
    assert [len(r) for r in received] == [10, 10, 10]
    # The very same packet objects: encoded once, fanned out three times.
    for a, b, c in zip(*received, strict=True):
        assert a is b is c
    assert received[0][0].is_keyframe
    await hub.close()


def nal_types(packet: Packet) -> list[int]:
    """NAL unit types in an Annex B H.264 packet (7 SPS, 8 PPS, 5 IDR slice, 1 other slice)."""
    data = bytes(packet)
    return [data[i + 3] & 0x1F for i in range(len(data) - 3) if data[i:i + 3] == b"\x00\x00\x01"]


async def test_each_codec_is_encoded_once_with_its_own_keyframes() -> None:
    hub = make_hub(keyframe_interval=60.0, keyframe_min_gap=0.0)
    vp8 = [subscribe(hub, codec="vp8") for _ in range(2)]
    h264 = [subscribe(hub, codec="h264") for _ in range(2)]
    assert hub.video_codecs == ["vp8", "h264"]
    await encode(hub, 0, 6, codecs=2)
    assert hub.stats.video_frames_encoded == 12  # 6 frames x 2 codecs, whatever the viewer count
    got_vp8, got_h264 = [drain(t) for t in vp8], [drain(t) for t in h264]
    assert got_vp8[0] and all(a is b for a, b in zip(*got_vp8, strict=True))
    assert got_h264[0] and all(a is b for a, b in zip(*got_h264, strict=True))
    # H.264 starts on an IDR that carries its parameter sets, so a viewer can join there.
    assert got_h264[0][0].is_keyframe and {7, 8, 5} <= set(nal_types(got_h264[0][0]))
    assert not any(p.is_keyframe for p in got_h264[0][1:])
    # A keyframe request (PLI) on one codec costs only that codec a keyframe.
    hub.request_keyframe("pli", "h264")
    await encode(hub, 6, 2, codecs=2)
    assert drain(h264[0])[0].is_keyframe
    assert not any(p.is_keyframe for p in drain(vp8[0]))
    await hub.close()
    assert all(t.readyState == "ended" for t in vp8 + h264)


async def test_late_viewer_starts_on_a_keyframe_it_asked_for() -> None:
    hub = make_hub(keyframe_interval=60.0, keyframe_min_gap=0.0)
    early = subscribe(hub)
    await encode(hub, 0, 5)
    assert sum(p.is_keyframe for p in drain(early)) == 1
    late = subscribe(hub)
    await encode(hub, 5, 5)
    packets = drain(late)
    assert packets and packets[0].is_keyframe  # nothing before its keyframe
    assert hub.stats.keyframes == 2  # the start, and the one the join requested
    await hub.close()


async def test_keyframe_requests_are_coalesced() -> None:
    hub = make_hub(keyframe_interval=60.0, keyframe_min_gap=30.0)
    subscribe(hub)
    for index in range(20):
        hub.request_keyframe("pli")
        await encode(hub, index, 1)
    assert hub.stats.keyframe_requests >= 21
    assert hub.stats.keyframes == 1  # start only: the storm is within one min_gap
    await hub.close()


async def test_periodic_keyframe_bounds_recovery() -> None:
    hub = make_hub(keyframe_interval=0.05, keyframe_min_gap=0.01)
    subscribe(hub)
    for index in range(4):
        await encode(hub, index, 1)
        await asyncio.sleep(0.06)
    assert hub.stats.keyframes == 4
    await hub.close()


async def test_slow_viewer_skips_to_next_keyframe_without_disturbing_others() -> None:
    hub = make_hub(video_queue=4, keyframe_interval=60.0, keyframe_min_gap=0.0)
    slow = subscribe(hub)
    fast = subscribe(hub)
    got_fast: list[Packet] = []
    for index in range(12):
        await encode(hub, index, 1)
        got_fast += drain(fast)
    assert len(got_fast) == 12
    assert slow.dropped >= 4 and hub.stats.packets_dropped == slow.dropped
    assert len(slow._queue) <= 4
    # It asked for a keyframe and resumes on one.
    assert slow.awaiting_keyframe or next(iter(slow._queue)).is_keyframe
    await hub.close()


async def test_nobody_watching_costs_no_encode() -> None:
    hub = make_hub()
    for index in range(5):
        hub.push_video(video_frame(index))
        hub.push_audio(audio_frame(index))
    await asyncio.sleep(0.05)
    assert hub.stats.video_frames_encoded == 0
    assert hub.stats.audio_frames_encoded == 0
    assert not hub.video_wanted
    await hub.close()


async def test_audio_is_encoded_once_to_opus() -> None:
    hub = make_hub()
    tracks = [subscribe(hub, "audio") for _ in range(2)]
    for index in range(10):
        hub.push_audio(audio_frame(index))
    a, b = (drain(t) for t in tracks)
    assert len(a) >= 9 and [p is q for p, q in zip(a, b, strict=True)] == [True] * len(a)
    assert all(p.time_base == fractions.Fraction(1, 48_000) for p in a)
    await hub.close()


async def test_nothing_queues_before_the_sender_reads() -> None:
    """A viewer still in its ICE/DTLS handshake must not collect a backlog to burst later."""
    hub = make_hub(keyframe_interval=60.0, keyframe_min_gap=0.0)
    watching = subscribe(hub)
    connecting = hub.subscribe("video")
    assert hub.viewer_tracks == 1  # the one still connecting costs nothing yet
    await encode(hub, 0, 5)
    assert len(drain(watching)) == 5 and len(connecting._queue) == 0
    requests = hub.stats.keyframe_requests
    first = asyncio.ensure_future(connecting.recv())  # the sender starts: DTLS is up
    await asyncio.sleep(0)
    assert hub.stats.keyframe_requests == requests + 1
    await encode(hub, 5, 1)
    packet = await asyncio.wait_for(first, 5)
    assert packet.is_keyframe and packet.pts == 5 * 3000  # fresh, not the backlog
    await hub.close()


async def test_closing_the_hub_ends_viewer_tracks() -> None:
    hub = make_hub()
    track = hub.subscribe("video")
    waiter = asyncio.ensure_future(track.recv())
    await asyncio.sleep(0)
    await hub.close()
    try:
        await waiter
    except Exception as exc:
        assert type(exc).__name__ == "MediaStreamError"
    else:
        raise AssertionError("recv() should fail once the hub is closed")
    assert track.readyState == "ended" and hub.viewer_tracks == 0


async def test_pli_and_fir_reach_the_shared_encoder() -> None:
    """Guards the private aiortc hook the hub relies on (pinned aiortc version)."""
    hub = make_hub()
    track = hub.subscribe("video")
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    sender = pc.addTransceiver(track, direction="sendonly").sender
    attach_sender(sender, hub, "vp8")
    before = hub.stats.keyframe_requests
    for fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
        await sender._handle_rtcp_packet(
            RtcpPsfbPacket(fmt=fmt, ssrc=1234, media_ssrc=sender._ssrc))
    assert hub.stats.keyframe_requests == before + 2
    await pc.close()
    await hub.close()
