"""Churn: a thousand real viewers join and leave one session in batches, and the process
(gateway and viewers alike) ends up holding what it held before they came."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import av
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from gateway.api.common import METRICS, SESSIONS
from gateway.app import create_app
from gateway.sessions import Session

from .conftest import ClientFactory, make_settings
from .leaks import (
    media_tasks,
    open_fds,
    open_sockets,
    peer_connections,
    pin_malloc_thresholds,
    trimmed_rss,
    webrtc_tasks,
)

Client = TestClient[Any, Any]

VIEWERS = 1000
BATCH = 25  # viewers connected at once (50 is slower and fragments the heaps more)
WARM_UP_BATCHES = 8
FLOOR_SAMPLES = 6
RSS_GROWTH_LIMIT = 20 * 2**20
WAIT = 60.0
"""Deadline for a batch to connect, decode, leave: generous, for a busy machine."""
SETTLE = 30.0


class ChurnViewer:
    """A WHEP viewer like :class:`~tests.rtc_client.WhepViewer` (recvonly video and audio, an
    ``events`` data channel) that keeps nothing of what it decodes.

    Requests go through the test client's ``session``: ``TestClient``'s own request methods
    keep every response until the test ends (and the secrets scan every body until the run
    ends), a thousand viewers' worth of RSS growth that would be the harness's.
    """

    def __init__(self, client: Client, session_id: str) -> None:
        self._client = client
        self._session_id = session_id
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.location = ""
        self.first_frame = asyncio.Event()
        self._connected = asyncio.Event()
        self._drains: list[asyncio.Task[None]] = []

    async def connect(self) -> None:
        pc = self.pc
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        pc.createDataChannel("events")
        pc.on("track", self._on_track)
        pc.on("connectionstatechange", self._on_state)
        await pc.setLocalDescription(await pc.createOffer())
        async with self._client.session.post(
                self._client.make_url(f"/v1/sessions/{self._session_id}/whep"),
                data=pc.localDescription.sdp, headers={"Content-Type": "application/sdp"}) as response:
            answer = await response.text()
            assert response.status == 201, answer
            self.location = response.headers["Location"]
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        async with asyncio.timeout(WAIT):
            await self._connected.wait()

    def _on_state(self) -> None:
        if self.pc.connectionState == "connected":
            self._connected.set()

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._drains.append(asyncio.get_running_loop().create_task(self._drain(track)))

    async def _drain(self, track: MediaStreamTrack) -> None:
        # aiortc decodes in a thread whether or not anyone reads; unread frames would queue.
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                if isinstance(frame, av.VideoFrame):
                    self.first_frame.set()

    async def delete(self) -> int:
        async with self._client.session.delete(self._client.make_url(self.location)) as response:
            return response.status

    async def close(self) -> None:
        await asyncio.shield(self.pc.close())
        for task in self._drains:
            task.cancel()
        for task in self._drains:
            with contextlib.suppress(asyncio.CancelledError):
                await task


@dataclass(frozen=True)
class Holdings:
    """What the process holds while no viewer is connected."""

    rss: int
    fds: int
    udp: int
    tcp: int
    threads: int
    tasks: list[str]
    peer_connections: int

    @classmethod
    def now(cls) -> Holdings:
        pcs = peer_connections()
        return cls(trimmed_rss(), open_fds(), open_sockets("udp"), open_sockets("tcp"),
                   threading.active_count(), media_tasks(), pcs)

    def same(self, other: Holdings) -> bool:
        """Equal in everything but RSS (compared by floors, see the test)."""
        return dataclasses.replace(self, rss=0) == dataclasses.replace(other, rss=0)

    @classmethod
    async def take(cls, session: Session, like: Holdings | None = None) -> Holdings:
        """What the process holds once every viewer is gone and the rest has settled.

        aiortc's transport tasks, sockets and decoder threads end some loop turns after a
        close returns, more of them on a busy machine. So wait (with a generous deadline: what
        leaks stays for good) until nothing changes any more and no peer connection is left,
        or, given ``like``, until the process holds just that again.
        """
        async with asyncio.timeout(SETTLE):
            while session.viewer_count or session.hub.subscribers:
                await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE
        held = cls.now()
        while loop.time() < deadline:
            await asyncio.sleep(0.5)
            previous, held = held, cls.now()
            if like is not None and held.same(like):
                break
            if (like is None and held.peer_connections == 0 and not webrtc_tasks()
                    and held.same(previous)):
                break
        return held

    def __str__(self) -> str:
        return (f"RSS {self.rss / 2**20:.1f} MiB, {self.fds} fds ({self.udp} udp, {self.tcp} tcp), "
                f"{self.threads} threads, {len(self.tasks)} tasks, "
                f"{self.peer_connections} peer connections")


async def churn(client: Client, session: Session, count: int) -> None:
    """``count`` viewers connect and decode a frame; half leave with a WHEP DELETE, the
    other half vanish: their peer connection closes with no word to the WHEP resource."""
    viewers = [ChurnViewer(client, session.id) for _ in range(count)]
    try:
        await asyncio.gather(*(v.connect() for v in viewers))
        assert session.viewer_count == count
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*(v.first_frame.wait() for v in viewers))
        polite, vanishing = viewers[:count // 2], viewers[count // 2:]
        assert await asyncio.gather(*(v.delete() for v in polite)) == [200] * len(polite)
        # No DELETE: the gateway learns it only from the peer connection closing (SCTP ABORT,
        # DTLS close_notify) and must close the viewer itself.
        await asyncio.gather(*(v.close() for v in vanishing))
        async with asyncio.timeout(WAIT):
            while session.viewer_count:
                await asyncio.sleep(0.02)
    finally:
        await asyncio.gather(*(v.close() for v in viewers))


async def churn_batches(client: Client, session: Session, batches: int) -> list[int]:
    """Run ``batches`` batches of :data:`BATCH` viewers; the trimmed RSS after each."""
    rss = []
    for _ in range(batches):
        await churn(client, session, BATCH)
        rss.append(trimmed_rss())
    return rss


def disconnects(client: Client) -> dict[str, float]:
    """``avatargw_viewer_disconnects_total`` by reason."""
    [family] = client.app[METRICS].viewer_disconnects.collect()
    return {s.labels["reason"]: s.value for s in family.samples if s.name.endswith("_total")}


def mib(rss: list[int]) -> str:
    return " ".join(f"{r / 2**20:.0f}" for r in rss)


# ~1 min on an idle two-core machine, ~2 with another process busy on one core: the default
# per-test timeout (a hang detector) is too tight for this much real work.
@pytest.mark.timeout(900)
async def test_thousand_viewers_churn_without_leaks(aiohttp_client: ClientFactory) -> None:
    pin_malloc_thresholds()  # else freed video frames stay resident: RSS swings by ~100 MB
    # No access log, as the gateway runs (__main__): pytest and the secrets scan keep every
    # record, a thousand viewers' requests' worth (~5 MB) that would count as the gateway's.
    server = TestServer(create_app(make_settings()))
    await server.start_server(access_log=None)
    # No HTTP keep-alive: every request's connection closes with it, so the file descriptors
    # can be compared exactly instead of within the size of the client's connection pool.
    client = await aiohttp_client(server, connector=aiohttp.TCPConnector(force_close=True))
    created = await client.post("/v1/sessions", json={"upstream": "local"})
    assert created.status == 201, await created.text()
    session = client.app[SESSIONS].get((await created.json())["id"])

    # Full batches first: decoder threads' malloc arenas, codec contexts, the hub's lanes,
    # executor threads are created once, before the baseline.
    warm_rss = await churn_batches(client, session, WARM_UP_BATCHES)
    before = await Holdings.take(session)
    assert before.peer_connections == 0

    started = time.monotonic()
    churn_rss = await churn_batches(client, session, VIEWERS // BATCH)
    after = await Holdings.take(session, like=before)
    took = time.monotonic() - started
    # Even trimmed, RSS keeps 10-15 MB of heap fragmentation that comes and goes from batch
    # to batch, always on top of what is in use: compare the floors (least of the last few
    # samples and the one at rest) of the two phases.
    growth = (min(after.rss, *churn_rss[-FLOOR_SAMPLES:])
              - min(before.rss, *warm_rss[-FLOOR_SAMPLES:]))
    report = (f"{VIEWERS} viewers in {took:.1f} s; RSS floor grew {growth / 2**20:.1f} MiB\n"
              f"RSS (MiB) after each warm-up batch: {mib(warm_rss)}; each batch: {mib(churn_rss)}\n"
              f"before: {before}\nafter:  {after}")
    print("\n" + report)

    assert after.peer_connections == 0, "RTCPeerConnection objects alive (gateway's or viewers')"
    assert after.udp == before.udp, "ICE/DTLS sockets left open"
    assert after.tcp == before.tcp, "HTTP connections left open"
    assert after.fds == before.fds, report
    assert after.threads == before.threads, "decoder threads left running"
    assert after.tasks == before.tasks
    assert growth < RSS_GROWTH_LIMIT, report

    metrics = client.app[METRICS]
    assert metrics.viewers.labels("connected")._value.get() == 0
    assert metrics.viewers.labels("connecting")._value.get() == 0
    batches = WARM_UP_BATCHES + VIEWERS // BATCH
    # Vanished viewers end as "closed": the gateway saw their DTLS transport close, long
    # before its connect watchdog or ICE consent expiry (~30 s) would have.
    assert disconnects(client) == {"delete": batches * (BATCH // 2),
                                   "closed": batches * (BATCH - BATCH // 2)}
