"""The real path, end to end: gateway → simulator REST → LiveKit room (real livekit SDK) →
encode-once hub → aiortc viewers. Everything inside the test run's network namespace."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.api.common import METRICS, SESSIONS
from gateway.upstream.cloud import RoomUpstream

from .cloud_rig import Rig
from .conftest import IN_NETNS
from .rtc_client import ToneTrack, WhepViewer

pytestmark = pytest.mark.skipif(
    not IN_NETNS, reason="the livekit SDK needs the private network namespace (tests/netns.sh)")

Client = TestClient[Any, Any]
TEXT = "Hello from the cloud avatar, relayed once to everyone."


async def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


def kinds(viewer: WhepViewer, task_id: str) -> list[str]:
    return [e["type"] for e in viewer.received.events if e.get("task_id") == task_id]


async def test_heygen_session_through_livekit_to_three_viewers(rig: Rig) -> None:
    created = await rig.create("heygen")
    assert (created["upstream"], created["width"], created["height"]) == ("heygen", 640, 360)
    assert rig.open_sessions() == 1
    viewers = [WhepViewer(rig.gateway, created["id"]) for _ in range(3)]
    try:
        await asyncio.gather(*(v.connect() for v in viewers))
        async with asyncio.timeout(20):
            await asyncio.gather(*(v.first_frame.wait() for v in viewers))
        response = await rig.gateway.post(f"/v1/sessions/{created['id']}/speak",
                                          json={"text": TEXT, "task_type": "repeat"})
        task = await response.json()
        assert response.status == 200, task
        await wait_for(lambda: all("avatar_stop_talking" in kinds(v, task["task_id"])
                                   for v in viewers))
        for viewer in viewers:
            got = viewer.received
            assert {(s.width, s.height) for s in got.video} == {(640, 360)}
            assert len(got.video) > 20
            events = kinds(viewer, task["task_id"])
            assert events[0] == "avatar_start_talking" and events[-1] == "avatar_stop_talking"
            assert "avatar_end_message" in events and "avatar_talking_message" in events
            assert max(rms for _, rms in got.audio_rms) > 500  # the avatar was heard

        talk = await rig.gateway.post(f"/v1/sessions/{created['id']}/speak",
                                      json={"text": "What can you do?", "task_type": "talk"})
        talk_task = await talk.json()
        assert talk.status == 200, talk_task
        await wait_for(lambda: "avatar_start_talking" in kinds(viewers[0], talk_task["task_id"]))
        assert (await rig.gateway.post(f"/v1/sessions/{created['id']}/interrupt")).status == 200
        await wait_for(lambda: "avatar_stop_talking" in kinds(viewers[0], talk_task["task_id"]),
                       timeout=5)
        metrics = rig.gateway.app[METRICS]
        assert metrics.upstream_starts.labels("heygen", "ok")._value.get() == 1
        assert metrics.upstream_frames.labels("heygen", "video")._value.get() > 20
    finally:
        await asyncio.gather(*(v.close() for v in viewers))
    assert (await rig.gateway.delete(f"/v1/sessions/{created['id']}")).status == 200
    assert rig.open_sessions() == 0
    entry = rig.ledger.get(rig_provider_id_after_close(rig, created["id"]))
    assert entry is not None and entry.stop_reason == "stopped"


def rig_provider_id_after_close(rig: Rig, gateway_session_id: str) -> str:
    # The gateway session is gone; the ledger holds exactly one HeyGen session.
    entries = [e for e in rig.ledger.entries() if e.provider == "heygen"]
    assert len(entries) == 1
    return entries[0].session_id


async def test_liveavatar_full_mode_session(rig: Rig) -> None:
    created = await rig.create("liveavatar")
    url = f"/v1/sessions/{created['id']}"
    viewers = [WhepViewer(rig.gateway, created["id"]) for _ in range(3)]
    try:
        await asyncio.gather(*(v.connect() for v in viewers))
        async with asyncio.timeout(20):
            await asyncio.gather(*(v.first_frame.wait() for v in viewers))
        response = await rig.gateway.post(f"{url}/speak", json={"text": "Hello from LiveAvatar."})
        task = await response.json()
        assert response.status == 200, task
        await wait_for(lambda: all("avatar_stop_talking" in kinds(v, task["task_id"])
                                   for v in viewers))
        for viewer in viewers:
            events = kinds(viewer, task["task_id"])
            assert events.index("avatar_start_talking") < events.index("avatar_end_message")
            assert events[-2:] == ["avatar_end_message", "avatar_stop_talking"]
            assert {(s.width, s.height) for s in viewer.received.video} == {(640, 360)}
        # talk (the provider's LLM answers), then barge in.
        talk = await rig.gateway.post(f"{url}/speak", json={"text": "Tell me a long story.",
                                                            "task_type": "talk"})
        talk_task = await talk.json()
        assert talk.status == 200, talk_task
        await wait_for(lambda: "avatar_start_talking" in kinds(viewers[0], talk_task["task_id"]))
        assert (await rig.gateway.post(f"{url}/interrupt")).status == 200
        await wait_for(lambda: "avatar_stop_talking" in kinds(viewers[0], talk_task["task_id"]),
                       timeout=5)
    finally:
        await asyncio.gather(*(v.close() for v in viewers))
    assert (await rig.gateway.delete(url)).status == 200
    assert rig.open_sessions() == 0


async def test_controller_microphone_reaches_the_avatar_room(rig: Rig) -> None:
    created = await rig.create("heygen")
    provider_id = rig.provider_id(created["id"])
    controller = WhepViewer(rig.gateway, created["id"], microphone=ToneTrack())
    try:
        await controller.connect()
        async with asyncio.timeout(20):
            await controller.first_frame.wait()
        listen = await rig.gateway.post(f"/v1/sessions/{created['id']}/listen",
                                        json={"listening": True})
        assert listen.status == 200, await listen.text()

        async def mic() -> dict[str, Any]:
            described: dict[str, Any] = await rig.admin("GET", f"/sim/sessions/{provider_id}")
            room: dict[str, Any] = described["room"]
            return room

        async with asyncio.timeout(20):
            while (await mic())["mic_frames"] < 50:
                await asyncio.sleep(0.2)
        room = await mic()
        assert room["mic_peak"] > 5000 and room["listening"] is True
        await wait_for(lambda: any(e["type"] == "user_start" for e in controller.received.events))
    finally:
        await controller.close()
    assert (await rig.gateway.delete(f"/v1/sessions/{created['id']}")).status == 200


async def test_upstream_limit_is_429_and_local_is_unaffected(rig: Rig) -> None:
    settings = rig.gateway.app[SESSIONS]._settings
    assert settings.max_upstream_sessions == 3
    ids = [(await rig.create("heygen"))["id"] for _ in range(3)]
    response = await rig.gateway.post("/v1/sessions", json={"upstream": "heygen"})
    assert response.status == 429 and int(response.headers["Retry-After"]) > 0
    assert (await rig.create("local"))["upstream"] == "local"
    for session_id in ids:
        assert (await rig.gateway.delete(f"/v1/sessions/{session_id}")).status == 200
    assert rig.open_sessions() == 0


async def test_no_key_or_provider_token_leaks(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """Scan every response, page, log line and metric of a full session for secrets."""
    caplog.set_level("DEBUG")
    seen: list[str] = []

    async def text(method: str, path: str, **kwargs: Any) -> str:
        async with rig.gateway.request(method, path, **kwargs) as response:
            body = await response.text()
            seen.append(body)
            seen.extend(f"{k}: {v}" for k, v in response.headers.items())
            return body

    created = await rig.create("heygen")
    seen.append(str(created))
    url = f"/v1/sessions/{created['id']}"
    upstream = rig.session(created["id"]).upstream
    assert isinstance(upstream, RoomUpstream)
    viewer = WhepViewer(rig.gateway, created["id"])
    try:
        await viewer.connect()
        await text("POST", f"{url}/speak", json={"text": "Nothing secret here."})
        await text("POST", f"{url}/speak", json={"text": "x", "task_type": "nonsense"})
        for path in ("/v1/sessions", url, "/metrics", "/readyz", "/livez", "/", "/web/demo.js",
                     "/web/sdk/index.js"):
            await text("GET", path)
        async with asyncio.timeout(10):
            while not viewer.received.events:
                await asyncio.sleep(0.05)
        seen.extend(str(e) for e in viewer.received.events)
    finally:
        await viewer.close()
    await text("DELETE", url)
    seen.extend(record.getMessage() for record in caplog.records)
    haystack = "\n".join(seen)
    assert "avatargw_upstream_api_requests_total" in haystack  # the metrics were scanned
    secrets = ["sim-heygen-key", "sim-liveavatar-key"]
    credentials = upstream._credentials
    assert credentials is not None
    secrets.append(credentials.token)  # the provider's LiveKit token
    for secret in secrets:
        assert secret not in haystack
