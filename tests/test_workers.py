"""Fan-out worker processes (gateway/workers): real worker processes, real aiortc viewers.

The session's owner (this test's process) encodes once; two workers hold the viewers' peer
connections. Nothing here measures speed (bench/fanout.py does): these prove that viewers in
any worker get the same session, that the feedback and the microphone flow back to the owner,
and that a worker's death costs only its own viewers.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from aiortc import RTCRtpReceiver
from aiortc.sdp import SessionDescription

from gateway.api.common import METRICS, SESSIONS
from gateway.app import create_app
from gateway.media.hub import Hub
from gateway.media.rtp import RtpFrame
from gateway.sessions import SessionRegistry
from gateway.workers.pool import RemoteViewer, WorkerPool, default_worker_count
from gateway.workers.process import MetricsRelay, SessionFeed

from .conftest import ClientFactory, make_settings
from .rtc_client import ToneTrack, WhepViewer
from .test_media import Recorder

Client = TestClient[Any, Any]


async def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


def pool_of(client: Client) -> WorkerPool:
    registry: SessionRegistry = client.app[SESSIONS]
    assert registry.workers is not None
    return registry.workers


async def start(aiohttp_client: ClientFactory, **settings: Any) -> tuple[Client, str]:
    client = await aiohttp_client(create_app(make_settings(workers=2, **settings)))
    created = await (await client.post("/v1/sessions")).json()
    return client, created["id"]


async def watch(client: Client, session_id: str, count: int, **kwargs: Any) -> list[WhepViewer]:
    viewers = [WhepViewer(client, session_id, **kwargs) for _ in range(count)]
    try:
        for viewer in viewers:  # one by one: each goes to the worker with the fewest
            await viewer.connect()
        async with asyncio.timeout(30):
            await asyncio.gather(*(v.first_frame.wait() for v in viewers))
    except BaseException:
        await asyncio.gather(*(v.close() for v in viewers))
        raise
    return viewers


def video_ssrc(viewer: WhepViewer) -> int:
    video = next(m for m in SessionDescription.parse(viewer.answer_sdp).media if m.kind == "video")
    return video.ssrc[0].ssrc


def receiver_of(viewer: WhepViewer) -> RTCRtpReceiver:
    return next(t.receiver for t in viewer.pc.getTransceivers() if t.kind == "video")


async def worker_stats(pool: WorkerPool) -> list[dict[str, int]]:
    return [await w.call("stats") for w in pool.workers]


async def test_viewers_spread_over_workers_see_one_encode_and_the_events(
        aiohttp_client: ClientFactory) -> None:
    client, session_id = await start(aiohttp_client, stats_interval=0.5)
    pool = pool_of(client)
    session = client.app[SESSIONS].get(session_id)
    metrics = client.app[METRICS]
    viewers = await watch(client, session_id, 4)
    try:
        assert sorted(len(w.viewers) for w in pool.workers) == [2, 2]
        assert {w.process.pid for w in pool.workers if w.process} != {os.getpid()}
        # The owner's hub has one subscriber per worker and kind, whatever the viewer count.
        assert isinstance(session.hub, Hub) and session.hub.subscribers == 4
        assert session.hub.video_codecs == ["vp8"]
        spoke = await client.post(f"/v1/sessions/{session_id}/speak",
                                  json={"text": "Hello to every worker.", "task_mode": "sync"})
        assert spoke.status == 200
        task_id = (await spoke.json())["task_id"]
        for viewer in viewers:  # events reach every data channel, in whichever worker
            await wait_for(lambda v=viewer: any(
                e.get("task_id") == task_id and e["type"] == "avatar_stop_talking"
                for e in v.received.events))
            assert len(viewer.received.video) > 10 and viewer.received.audio_rms
            assert {(s.width, s.height) for s in viewer.received.video} == {(640, 360)}
        # The workers' viewer metrics reach the owner's registry.
        await wait_for(lambda: metrics.viewers.labels("connected")._value.get() == 4)
        await wait_for(lambda: metrics.sent_packets.labels("video")._value.get() > 0)
        await wait_for(lambda: metrics.viewer_rtt._sum.get() > 0)
    finally:
        await asyncio.gather(*(v.close() for v in viewers))


async def test_viewers_joining_mid_sentence_get_it_from_its_start(
        aiohttp_client: ClientFactory) -> None:
    # The first viewer's worker has followed the sentence; the second worker gets the owner's
    # record of it as the late viewer is placed there. Either way the late channels start at
    # the sentence's first word.
    client, session_id = await start(aiohttp_client)
    first = await watch(client, session_id, 1)
    late: list[WhepViewer] = []
    try:
        spoke = await client.post(f"/v1/sessions/{session_id}/speak", json={
            "text": "One two three four five six seven eight nine ten eleven twelve."})
        task_id = (await spoke.json())["task_id"]

        def words(viewer: WhepViewer) -> list[str]:
            return [e["message"] for e in viewer.received.events
                    if e.get("task_id") == task_id and e["type"] == "avatar_talking_message"]

        await wait_for(lambda: len(words(first[0])) >= 3)
        late = await watch(client, session_id, 2)
        assert sorted(len(w.viewers) for w in pool_of(client).workers) == [1, 2]

        def stopped(viewer: WhepViewer) -> bool:
            return any(e.get("task_id") == task_id and e["type"] == "avatar_stop_talking"
                       for e in viewer.received.events)

        await wait_for(lambda: all(stopped(v) for v in (*first, *late)))
        for viewer in late:
            mine = [e for e in viewer.received.events if e.get("task_id") == task_id]
            assert mine[0]["type"] == "avatar_start_talking", mine[:3]
            assert words(viewer) == words(first[0]) and words(viewer)[0].strip() == "One"
    finally:
        await asyncio.gather(*(v.close() for v in (*first, *late)))


async def test_pli_from_a_viewer_in_a_worker_makes_a_keyframe(
        aiohttp_client: ClientFactory) -> None:
    client, session_id = await start(aiohttp_client, keyframe_min_gap=0.01)
    metrics = client.app[METRICS]
    (viewer,) = await watch(client, session_id, 1)
    try:
        before = metrics.keyframes.labels("pli")._value.get()
        await receiver_of(viewer)._send_rtcp_pli(video_ssrc(viewer))
        await wait_for(lambda: metrics.keyframes.labels("pli")._value.get() > before)
        await wait_for(lambda: metrics.rtcp_feedback.labels("pli")._value.get() >= 1)
    finally:
        await viewer.close()


async def test_a_controllers_microphone_in_a_worker_reaches_the_upstream(
        aiohttp_client: ClientFactory) -> None:
    client, session_id = await start(aiohttp_client)
    (controller,) = await watch(client, session_id, 1, microphone=ToneTrack())
    try:
        listen = await client.post(f"/v1/sessions/{session_id}/listen", json={"listening": True})
        assert listen.status == 200, await listen.text()
        # The local avatar hears the tone (voice activity) and says so on the data channel.
        await wait_for(lambda: any(e["type"] == "user_start" for e in controller.received.events))
    finally:
        await controller.close()


async def test_a_killed_worker_loses_only_its_viewers_and_comes_back(
        aiohttp_client: ClientFactory) -> None:
    client, session_id = await start(aiohttp_client)
    pool = pool_of(client)
    session = client.app[SESSIONS].get(session_id)
    metrics = client.app[METRICS]
    viewers = await watch(client, session_id, 4)
    late: list[WhepViewer] = []
    try:
        victim = pool.workers[0]
        assert victim.process is not None and metrics.workers._value.get() == 2
        doomed_ids = set(victim.viewers)
        doomed = [v for v in viewers if v.location and v.location.rsplit("/", 1)[1] in doomed_ids]
        survivors = [v for v in viewers if v not in doomed]
        assert len(doomed) == 2 and len(survivors) == 2
        old_pid = victim.process.pid
        os.kill(old_pid, signal.SIGKILL)
        # Its viewers are closed at once on the owner's side, and the gauge is given back.
        await wait_for(lambda: session.viewer_count == 2)
        for viewer in doomed:
            assert viewer.location is not None
            assert (await client.delete(viewer.location)).status == 404
        await wait_for(lambda: metrics.viewers.labels("connected")._value.get() == 2)
        assert metrics.viewer_disconnects.labels("worker_died")._value.get() == 2
        # The others keep playing.
        counts = [len(v.received.video) for v in survivors]
        await wait_for(lambda: all(len(v.received.video) > c + 15
                                   for v, c in zip(survivors, counts, strict=True)))
        # The worker is started again and takes new viewers.
        await wait_for(lambda: victim.alive and victim.process is not None
                       and victim.process.pid != old_pid)
        assert pool.restarts == 1 and metrics.worker_restarts._value.get() == 1
        assert metrics.workers._value.get() == 2
        late = await watch(client, session_id, 2)
        assert len(victim.viewers) == 2
    finally:
        await asyncio.gather(*(v.close() for v in viewers + late))


async def test_churn_across_workers_leaves_nothing_behind(aiohttp_client: ClientFactory) -> None:
    client, session_id = await start(aiohttp_client)
    pool = pool_of(client)
    session = client.app[SESSIONS].get(session_id)
    (anchor,) = await watch(client, session_id, 1)  # keeps the session's lanes warm
    try:
        await asyncio.sleep(1.0)
        baseline = await worker_stats(pool)
        shm = set(os.listdir("/dev/shm"))
        for _ in range(3):
            batch = await watch(client, session_id, 6)
            for viewer in batch[::2]:
                assert await viewer.delete() == 200  # WHEP DELETE
            await asyncio.gather(*(v.close() for v in batch))  # the rest just hang up
        await wait_for(lambda: session.viewer_count == 1)
        await wait_for(lambda: sum(len(w.viewers) for w in pool.workers) == 1)

        async def settled() -> list[dict[str, int]]:
            async with asyncio.timeout(30):
                while True:
                    now = await worker_stats(pool)
                    if all(n["viewers"] == b["viewers"] and n["fds"] <= b["fds"]
                           and n["tasks"] <= b["tasks"] for n, b in zip(now, baseline, strict=True)):
                        return now
                    await asyncio.sleep(0.25)

        after = await settled()
        assert [a["pid"] for a in after] == [b["pid"] for b in baseline]  # nobody died
        assert set(os.listdir("/dev/shm")) == shm
        assert isinstance(session.hub, Hub) and session.hub.subscribers == 2  # the anchor's
        assert all(isinstance(v, RemoteViewer) for v in session.viewers())
    finally:
        await anchor.close()
    assert (await client.delete(f"/v1/sessions/{session_id}")).status == 200
    await wait_for(lambda: all(not w.viewers and not w.links for w in pool.workers))


async def test_a_closing_gateway_stops_its_workers(aiohttp_client: ClientFactory) -> None:
    client, session_id = await start(aiohttp_client)
    pool = pool_of(client)
    (viewer,) = await watch(client, session_id, 1)
    processes = [w.process for w in pool.workers if w.process is not None]
    assert len(processes) == 2
    await viewer.close()
    metrics = client.app[METRICS]
    assert metrics.workers._value.get() == 2
    await client.close()  # the app's cleanup: sessions, then the workers
    assert all(p.returncode is not None for p in processes)  # exited and reaped
    assert metrics.workers._value.get() == 0


def test_the_default_worker_count_follows_affinity_and_a_cgroup_quota(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    assert default_worker_count(tmp_path / "absent") == cores
    cpu_max.write_text("max 100000\n")
    assert default_worker_count(cpu_max) == cores
    cpu_max.write_text("50000 100000\n")  # half a CPU: still one worker
    assert default_worker_count(cpu_max) == 1
    cpu_max.write_text(f"{cores * 300000} 100000\n")  # more quota than cores: the cores
    assert default_worker_count(cpu_max) == cores


class _Recorded:
    """A worker's control socket and metrics, as a :class:`SessionFeed` uses them."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []
        self.control = self
        self.metrics = MetricsRelay()

    def send(self, *message: Any) -> None:
        self.sent.append(message)


def test_a_second_viewer_in_a_worker_starts_on_its_recent_frames() -> None:
    """Fast start in a worker: its feed keeps the frames since the last keyframe it relayed,
    so a viewer joining soon after needs no keyframe from the owner."""
    worker = _Recorded()
    feed = SessionFeed(worker, "s1", 8)  # type: ignore[arg-type]
    first, second, third = Recorder(), Recorder(), Recorder()
    assert feed.attach(first)
    assert worker.sent == [("subscribe", "s1", "video/vp8")]
    frames = [RtpFrame((bytes([i]),), i * 3000, i == 0, 0) for i in range(3)]
    for frame in frames:
        feed.deliver("video/vp8", frame)
    assert feed.attach(second)
    assert second.frames == frames and first.frames == frames
    assert worker.sent == [("subscribe", "s1", "video/vp8")]  # no keyframe asked for
    assert ("fast_starts", (), "inc", 1) in worker.metrics.pending
    for i in range(3, 12):  # past 8 frames since the keyframe
        feed.deliver("video/vp8", RtpFrame((bytes([i]),), i * 3000, False, 0))
    assert feed.attach(third)
    assert third.frames == [] and worker.sent[-1] == ("keyframe", "s1", "vp8", "join")
