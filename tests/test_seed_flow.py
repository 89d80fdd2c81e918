"""The seed API's SDP flow end to end, an aiortc peer playing the browser (HeyGen v1 style):
create (the gateway offers) → start (the browser answers) → trickle ICE → frames → text spoken,
its events on the gateway's data channel → stop → the session and its upstream are gone."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import av
import pytest
from aiohttp.test_utils import TestClient
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from gateway.api.common import SESSIONS
from gateway.api.persona import SEED_SESSIONS
from gateway.upstream.local import LocalUpstream
from gateway.viewers.peer import Viewer
from gateway.workers.pool import RemoteViewer

Client = TestClient[Any, Any]


async def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


def without_candidates(sdp: str) -> tuple[str, list[dict[str, Any]]]:
    """The answer as a trickling browser sends it (no candidates), and the candidates it trickles,
    as ``RTCIceCandidateInit`` objects."""
    kept: list[str] = []
    candidates: list[dict[str, Any]] = []
    mline, mid = -1, None
    for line in sdp.splitlines():
        if line.startswith("m="):
            mline += 1
            mid = None
        elif line.startswith("a=mid:"):
            mid = line[6:]
        if line.startswith("a=candidate:"):
            candidates.append({"candidate": line[2:], "sdpMLineIndex": mline, "sdpMid": mid})
        elif line != "a=end-of-candidates":
            kept.append(line)
    for candidate in candidates:
        # a=mid may follow the candidates in its m-section: fill it in from the section index.
        if candidate["sdpMid"] is None:
            candidate["sdpMid"] = str(candidate["sdpMLineIndex"])
    return "\r\n".join(kept) + "\r\n", candidates


async def post_ok(client: Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(path, json=body)
    data: dict[str, Any] = await response.json()
    assert response.status == 200 and data["success"] is True, data
    return data


@pytest.mark.parametrize("settings", ["in-process", "two-workers"], indirect=True)
async def test_seed_sdp_flow_end_to_end(client: Client) -> None:
    created = await post_ok(client, "/persona/heygen/session/create",
                            {"avatar_name": "default", "voice_id": "default"})
    session_id = created["data"]["session_id"]
    offer = created["data"]["sdp"]
    assert offer["type"] == "offer"
    session = client.app[SESSIONS].get(session_id)
    upstream = session.upstream
    assert isinstance(upstream, LocalUpstream)
    clocks = [t for t in asyncio.all_tasks()
              if t.get_name() in ("local-avatar-audio", "local-avatar-video")]
    assert len(clocks) == 2

    browser = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    frames: list[tuple[int, int]] = []
    events: list[dict[str, Any]] = []
    ended: list[str] = []
    readers: list[asyncio.Task[None]] = []
    channel_open = asyncio.Event()

    def on_track(track: MediaStreamTrack) -> None:
        async def read() -> None:
            with contextlib.suppress(MediaStreamError):
                while True:
                    frame = await track.recv()
                    if isinstance(frame, av.VideoFrame):
                        frames.append((frame.width, frame.height))
            ended.append(track.kind)

        readers.append(asyncio.get_running_loop().create_task(read()))

    def on_datachannel(channel: Any) -> None:
        assert channel.label == "events"
        channel.on("message", lambda message: events.append(json.loads(message)))
        channel_open.set()

    browser.on("track", on_track)
    browser.on("datachannel", on_datachannel)
    try:
        await browser.setRemoteDescription(RTCSessionDescription(sdp=offer["sdp"], type="offer"))
        await browser.setLocalDescription(await browser.createAnswer())
        answer, candidates = without_candidates(browser.localDescription.sdp)
        assert candidates and "a=candidate" not in answer

        await post_ok(client, "/persona/heygen/session/start",
                      {"session_id": session_id, "sdp": {"type": "answer", "sdp": answer}})
        for candidate in candidates:
            await post_ok(client, "/persona/heygen/ice",
                          {"session_id": session_id, "candidate": candidate})
        await post_ok(client, "/persona/heygen/ice", {"session_id": session_id, "candidate": {
            "candidate": "", "sdpMid": candidates[0]["sdpMid"], "sdpMLineIndex": 0}})

        await wait_for(lambda: len(frames) >= 10 and channel_open.is_set())
        # The trickled candidates reached the gateway's ICE agent as signalled (host), not only
        # as peer-reflexive addresses learned from the browser's checks.
        viewer = client.app[SEED_SESSIONS].get(session_id).viewer
        if isinstance(viewer, Viewer):
            ice = viewer._pc.getTransceivers()[0].receiver.transport.transport
            known = {(c.ip, c.port, c.type) for c in ice.getRemoteCandidates()}
            trickled = {(c["candidate"].split()[4], int(c["candidate"].split()[5]), "host")
                        for c in candidates}
            assert trickled <= known
        else:  # the peer connection, and its ICE agent, is in a fan-out worker
            assert isinstance(viewer, RemoteViewer)
        assert frames[0] == (640, 360)
        spoken = await post_ok(client, "/persona/heygen/text",
                               {"session_id": session_id, "text": "Hello from the seed flow."})
        task_id = spoken["data"]["task_ids"][0]
        assert spoken["speaking_duration"] > 0.5

        def told(kind: str) -> bool:
            return any(e["type"] == kind and e.get("task_id") == task_id for e in events)

        await wait_for(lambda: told("avatar_stop_talking"))
        assert told("avatar_start_talking")
        said = next(e for e in events if e["type"] == "avatar_end_message")
        assert said["message"] == "Hello from the seed flow."

        received = len(frames)
        await post_ok(client, "/persona/heygen/session/stop", {"session_id": session_id})
        assert session_id not in {s.id for s in client.app[SESSIONS].list()}
        assert session_id not in client.app[SEED_SESSIONS]
        assert session.close_reason == "deleted" and session.viewer_count == 0
        assert all(clock.done() for clock in clocks)
        # The gateway's side of the peer connection closed: the browser's tracks end.
        await wait_for(lambda: sorted(ended) == ["audio", "video"], timeout=15)
        assert len(frames) >= received
    finally:
        await browser.close()
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
