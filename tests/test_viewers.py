"""End to end: the local avatar through the hub to real aiortc viewers over the network
namespace (or loopback), decoding what they receive."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import av
import numpy as np
import pytest
from aiohttp.test_utils import TestClient
from aiortc import RTCPeerConnection

from gateway.api.common import METRICS, SESSIONS
from gateway.app import create_app
from gateway.errors import Unprocessable
from gateway.sessions import Session
from gateway.upstream.local import LocalUpstream

from .conftest import ClientFactory, make_settings
from .leaks import media_tasks, open_sockets, peer_connections, webrtc_tasks
from .rtc_client import VideoSample, WhepViewer

Client = TestClient[Any, Any]
DARK = 70  # luma below this inside the mouth box is the open mouth's interior


def local_session(client: Client, session_id: str) -> tuple[Session, LocalUpstream]:
    session = client.app[SESSIONS].get(session_id)
    assert isinstance(session.upstream, LocalUpstream)
    return session, session.upstream


def dark_fraction(sample: VideoSample) -> float:
    assert sample.mouth is not None
    return float((sample.mouth < DARK).mean())


async def read_sse(client: Client, session_id: str, out: list[dict[str, Any]]) -> None:
    async with client.get(f"/v1/sessions/{session_id}/events") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        async for line in response.content:
            if line.startswith(b"data: "):
                out.append(json.loads(line[6:]))


def task_events(events: list[dict[str, Any]], task_id: str) -> list[str]:
    return [e["type"] for e in events if e.get("task_id") == task_id]


async def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


async def test_three_viewers_see_and_hear_the_avatar_speak(client: Client, session_id: str) -> None:
    session, upstream = local_session(client, session_id)
    assert upstream.renderer is not None
    box = upstream.renderer.mouth_box
    viewers = [WhepViewer(client, session_id, mouth_box=box) for _ in range(3)]
    sse: list[dict[str, Any]] = []
    sse_task = asyncio.create_task(read_sse(client, session_id, sse))
    try:
        await asyncio.gather(*(v.connect() for v in viewers))
        async with asyncio.timeout(20):
            await asyncio.gather(*(v.first_frame.wait() for v in viewers))
        await asyncio.sleep(1.5)  # silence
        silent_end = asyncio.get_running_loop().time()

        text = "Hello there! My mouth moves with every word I say to all of you."
        response = await client.post(f"/v1/sessions/{session_id}/speak", json={"text": text})
        assert response.status == 200
        task = await response.json()
        task_id = task["task_id"]
        await wait_for(lambda: all("avatar_stop_talking" in task_events(v.received.events, task_id)
                                   for v in viewers), timeout=task["duration_ms"] / 1000 + 15)
        await wait_for(lambda: "avatar_stop_talking" in task_events(sse, task_id))
        spoken_end = asyncio.get_running_loop().time()

        for viewer in viewers:
            got = viewer.received
            assert len(got.video) > 30
            assert {(s.width, s.height) for s in got.video} == {(640, 360)}
            silent = [s for s in got.video[5:] if s.arrival < silent_end - 0.1]
            speaking = [s for s in got.video if silent_end + 0.3 < s.arrival < spoken_end]
            assert len(silent) > 10 and len(speaking) > 30
            # The mouth opens (dark interior) while speaking, and rests while silent.
            silent_dark = max(dark_fraction(s) for s in silent)
            speaking_dark = [dark_fraction(s) for s in speaking]
            assert max(speaking_dark) > 4 * silent_dark + 0.005, (silent_dark, max(speaking_dark))
            assert sum(d > 2 * silent_dark + 0.003 for d in speaking_dark) > 10
            # Audio: silence before, speech after.
            quiet = [rms for t, rms in got.audio_rms if t < silent_end - 0.1]
            loud = [rms for t, rms in got.audio_rms if silent_end < t < spoken_end]
            assert quiet and max(quiet) < 50
            assert loud and np.percentile(loud, 90) > 500
            # Events on the data channel: in order, with the REST task id.
            kinds = task_events(got.events, task_id)
            assert kinds[0] == "avatar_start_talking"
            assert kinds[-2:] == ["avatar_end_message", "avatar_stop_talking"]
            assert set(kinds[1:-2]) == {"avatar_talking_message"}
            words = "".join(e["message"] for e in got.events
                            if e.get("task_id") == task_id and e["type"] == "avatar_talking_message")
            assert words == text

        # The same sequence on the SSE stream.
        assert task_events(sse, task_id) == task_events(viewers[0].received.events, task_id)
        # Three viewers, one encoder.
        assert session.hub.stats.video_frames_encoded <= session.hub.stats.video_frames_in
        metrics = await (await client.get("/metrics")).text()
        assert 'avatargw_viewers{state="connected"} 3.0' in metrics
    finally:
        sse_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sse_task
        await asyncio.gather(*(v.close() for v in viewers))


async def test_late_joiner_gets_a_keyframe_and_a_leaver_disturbs_nobody(
    aiohttp_client: ClientFactory,
) -> None:
    # No periodic keyframe within the test: only the join request can start the late viewer.
    client = await aiohttp_client(create_app(make_settings(keyframe_interval=600.0)))
    created = await (await client.post("/v1/sessions")).json()
    session = client.app[SESSIONS].get(created["id"])
    first, second = WhepViewer(client, created["id"]), WhepViewer(client, created["id"])
    late = WhepViewer(client, created["id"])
    try:
        await asyncio.gather(first.connect(), second.connect())
        async with asyncio.timeout(20):
            await asyncio.gather(first.first_frame.wait(), second.first_frame.wait())
        await asyncio.sleep(1.0)
        keyframes_before = session.hub.stats.keyframes
        await late.connect()
        async with asyncio.timeout(20):
            await late.first_frame.wait()
        assert session.hub.stats.keyframes > keyframes_before
        join_keyframes = client.app[METRICS].keyframes.labels("join")._value.get()
        assert join_keyframes >= 1

        # One viewer leaves; the others keep receiving.
        assert await second.delete() == 200
        await second.close()
        counts = (len(first.received.video), len(late.received.video))
        await wait_for(lambda: len(first.received.video) > counts[0] + 15
                       and len(late.received.video) > counts[1] + 15)
        assert session.viewer_count == 2
    finally:
        await asyncio.gather(first.close(), second.close(), late.close())


async def test_vp8_and_h264_viewers_share_one_encoder_per_codec(client: Client,
                                                                session_id: str) -> None:
    session, _ = local_session(client, session_id)
    vp8 = [WhepViewer(client, session_id) for _ in range(2)]
    h264 = [WhepViewer(client, session_id, prefer="H264") for _ in range(2)]
    viewers = vp8 + h264
    try:
        await asyncio.gather(*(v.connect() for v in viewers))
        for viewer, codec in zip(viewers, ("VP8", "VP8", "H264", "H264"), strict=True):
            video = viewer.answer_sdp[viewer.answer_sdp.index("m=video"):]
            assert f"{codec}/90000" in video.split("m=audio")[0]
        async with asyncio.timeout(20):
            await asyncio.gather(*(v.first_frame.wait() for v in viewers))
        await wait_for(lambda: all(len(v.received.video) > 15 for v in viewers))
        # Every viewer decodes full-size frames in its own codec...
        for viewer in viewers:
            sample = viewer.received.video[-1]
            assert (sample.width, sample.height) == (640, 360)
        # ...and each codec is encoded once for its viewers, not once per viewer.
        assert sorted(session.hub.video_codecs) == ["h264", "vp8"]
        encoded = client.app[METRICS].frames_encoded
        frames_in = session.hub.stats.video_frames_in
        for codec in ("vp8", "h264"):
            assert 0 < encoded.labels("video", codec)._value.get() <= frames_in
        assert {session.viewer(v.location.rsplit("/", 1)[1]).video_codec  # type: ignore[union-attr]
                for v in h264} == {"h264"}
    finally:
        await asyncio.gather(*(v.close() for v in viewers))


async def join_and_leave(client: Client, session: Session, count: int, vanish: bool) -> None:
    viewers = [WhepViewer(client, session.id) for _ in range(count)]
    try:
        await asyncio.gather(*(v.connect() for v in viewers))
        assert session.viewer_count == count
        async with asyncio.timeout(20):
            await asyncio.gather(*(v.first_frame.wait() for v in viewers))
        # Half leave politely (WHEP DELETE); the rest vanish and the server closes them.
        half = count // 2
        assert await asyncio.gather(*(v.delete() for v in viewers[:half])) == [200] * half
        for viewer in viewers[half:]:
            assert viewer.location is not None
            server_side = session.viewer(viewer.location.rsplit("/", 1)[1])
            await server_side.close("test_vanished" if vanish else "delete")
    finally:
        # Whatever failed: an open peer connection would outlive the test's loop.
        await asyncio.gather(*(v.close() for v in viewers))


async def test_hundred_viewers_join_and_leave_without_leaks(client: Client, session_id: str) -> None:
    session, _ = local_session(client, session_id)
    # Warm up once so lazily created, long-lived things (executors, codecs) exist already.
    await join_and_leave(client, session, 2, vanish=False)
    # aiortc's transport tasks and sockets end some loop turns after a close returns.
    await wait_for(lambda: peer_connections() == 0 and not webrtc_tasks())
    udp, tasks = open_sockets("udp"), media_tasks()

    for batch in range(10):
        await join_and_leave(client, session, 10, vanish=batch % 2 == 1)

    await wait_for(lambda: session.viewer_count == 0 and session.hub.subscribers == 0)
    # What leaks stays for good: a generous deadline costs nothing when nothing does.
    with contextlib.suppress(TimeoutError):
        await wait_for(lambda: peer_connections() == 0 and open_sockets("udp") == udp
                       and media_tasks() == tasks)
    assert peer_connections() == 0  # neither the gateway's nor the test's
    assert open_sockets("udp") == udp, "ICE/DTLS sockets left open"
    # TCP: only the HTTP server's listener and keep-alive connections of the test client.
    assert open_sockets("tcp") <= 1 + 2 * 10
    assert media_tasks() == tasks
    metrics = client.app[METRICS]
    assert metrics.viewers.labels("connected")._value.get() == 0
    assert metrics.viewers.labels("connecting")._value.get() == 0
    assert metrics.viewer_disconnects.labels("delete")._value.get() == 2 + 50 + 25
    assert metrics.viewer_disconnects.labels("test_vanished")._value.get() == 25


async def test_deleting_a_session_ends_viewers_upstream_and_events(client: Client,
                                                                   session_id: str) -> None:
    session, upstream = local_session(client, session_id)
    viewer = WhepViewer(client, session_id)
    sse: list[dict[str, Any]] = []
    sse_task = asyncio.create_task(read_sse(client, session_id, sse))
    try:
        await viewer.connect()
        await viewer.first_frame.wait()
        clock_tasks = list(upstream._tasks)
        assert clock_tasks and not any(t.done() for t in clock_tasks)
        assert (await client.delete(f"/v1/sessions/{session_id}")).status == 200
        await asyncio.wait_for(sse_task, 10)  # the SSE stream ends by itself
        assert all(t.done() for t in clock_tasks)
        assert session.viewer_count == 0 and session.hub.subscribers == 0
        await wait_for(lambda: viewer.pc.connectionState in ("closed", "failed")
                       or len(viewer.received.video) > 0)
        assert [e["state"] for e in sse if e["type"] == "session_state"][-2:] == ["closing", "closed"]
    finally:
        sse_task.cancel()
        await viewer.close()


async def test_sync_speak_returns_after_the_avatar_finished(client: Client, session_id: str) -> None:
    session, _ = local_session(client, session_id)
    sse: list[dict[str, Any]] = []
    sse_task = asyncio.create_task(read_sse(client, session_id, sse))
    try:
        await wait_for(lambda: session.events.subscribers > 0)
        response = await client.post(f"/v1/sessions/{session_id}/speak",
                                     json={"text": "Short.", "task_mode": "sync"})
        assert response.status == 200
        task_id = (await response.json())["task_id"]
        await wait_for(lambda: "avatar_stop_talking" in task_events(sse, task_id))
    finally:
        sse_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sse_task


async def test_interrupt_cuts_speech_short(client: Client, session_id: str) -> None:
    session, _ = local_session(client, session_id)
    sse: list[dict[str, Any]] = []
    sse_task = asyncio.create_task(read_sse(client, session_id, sse))
    try:
        await wait_for(lambda: session.events.subscribers > 0)  # live events from then on
        long_text = "This is a long sentence that will certainly be interrupted. " * 6
        response = await client.post(f"/v1/sessions/{session_id}/speak", json={"text": long_text})
        task = await response.json()
        await wait_for(lambda: "avatar_start_talking" in task_events(sse, task["task_id"]))
        await asyncio.sleep(0.5)
        assert (await client.post(f"/v1/sessions/{session_id}/interrupt")).status == 200
        await wait_for(lambda: "avatar_stop_talking" in task_events(sse, task["task_id"]))
        stop = next(e for e in sse if e["type"] == "avatar_stop_talking")
        assert stop["duration_ms"] < task["duration_ms"] / 2
    finally:
        sse_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sse_task


async def test_server_offer_flow_for_the_seed_api(client: Client, session_id: str) -> None:
    """HeyGen v1 style: the gateway offers, the browser answers, media and events flow."""
    from aiortc import RTCConfiguration, RTCSessionDescription

    session, _ = local_session(client, session_id)
    viewer, offer = await session.add_offering_viewer()
    assert "VP8/90000" in offer and "H264" not in offer and "webrtc-datachannel" in offer
    browser = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    frames: list[int] = []
    events: list[str] = []
    got_frame = asyncio.Event()
    readers: list[asyncio.Task[None]] = []

    def on_track(track: Any) -> None:
        async def read() -> None:
            while True:
                frame = await track.recv()
                if isinstance(frame, av.VideoFrame):
                    frames.append(frame.width)
                    got_frame.set()
        if track.kind == "video":
            readers.append(asyncio.get_running_loop().create_task(read()))

    browser.on("track", on_track)
    browser.on("datachannel", lambda channel: channel.on("message", events.append))
    await browser.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
    await browser.setLocalDescription(await browser.createAnswer())
    await viewer.accept_answer(browser.localDescription.sdp)
    try:
        async with asyncio.timeout(20):
            await got_frame.wait()
        assert frames[0] == 640
        response = await client.post(f"/v1/sessions/{session_id}/speak", json={"text": "Hi."})
        assert response.status == 200
        await wait_for(lambda: any("avatar_stop_talking" in e for e in events))
        with pytest.raises(Unprocessable):  # a second answer is refused
            await viewer.accept_answer(browser.localDescription.sdp)
    finally:
        await browser.close()
        await viewer.close("delete")
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    assert session.viewer_count == 0


async def test_rtp_counters_rtt_and_speak_latency_reach_the_metrics(
        aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app(make_settings(stats_interval=0.3)))
    created = await (await client.post("/v1/sessions")).json()
    viewers = [WhepViewer(client, created["id"]) for _ in range(2)]
    metrics = client.app[METRICS]
    try:
        await asyncio.gather(*(v.connect() for v in viewers))
        async with asyncio.timeout(20):
            await asyncio.gather(*(v.first_frame.wait() for v in viewers))
        spoke = await client.post(f"/v1/sessions/{created['id']}/speak",
                                  json={"text": "Counting packets.", "task_mode": "sync"})
        assert spoke.status == 200
        # aiortc viewers send a receiver report every ~1 s: wait for RTTs from both.
        await wait_for(lambda: metrics.viewer_rtt._sum.get() > 0
                       and sum(b.get() for b in metrics.viewer_rtt._buckets) >= 2)
        received = sum(len(v.received.video) for v in viewers)
        sent_video = metrics.sent_packets.labels("video")._value.get()
        assert sent_video >= received > 0  # every decoded frame took at least one RTP packet
        assert metrics.sent_packets.labels("audio")._value.get() > 0
        assert metrics.packets_lost.labels("video")._value.get() == 0  # a clean link
        assert 0 < metrics.viewer_rtt._sum.get() < 1.0 * sum(b.get() for b in metrics.viewer_rtt._buckets)
        latency = metrics.speak_latency.labels("local")
        assert sum(b.get() for b in latency._buckets) == 1 and 0 < latency._sum.get() < 5.0
    finally:
        await asyncio.gather(*(v.close() for v in viewers))
