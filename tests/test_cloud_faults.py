"""Faults from the simulator's switches: each one recovers, or ends the session cleanly with an
event. Never a hung session, never a paid session left open (the rig checks the ledger)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.api.common import METRICS

from .cloud_rig import Rig
from .conftest import IN_NETNS
from .rtc_client import WhepViewer

pytestmark = pytest.mark.skipif(
    not IN_NETNS, reason="the livekit SDK needs the private network namespace (tests/netns.sh)")


async def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


def states(viewer: WhepViewer) -> list[str]:
    return [e["state"] for e in viewer.received.events if e["type"] == "session_state"]


async def watched_session(rig: Rig) -> tuple[str, str, WhepViewer]:
    created = await rig.create("heygen")
    viewer = WhepViewer(rig.gateway, created["id"])
    await viewer.connect()
    async with asyncio.timeout(20):
        await viewer.first_frame.wait()
    return created["id"], rig.provider_id(created["id"]), viewer


async def test_dropped_room_is_rejoined_and_viewers_resume(rig: Rig) -> None:
    session_id, provider_id, viewer = await watched_session(rig)
    try:
        await rig.admin("POST", f"/sim/sessions/{provider_id}/drop_room")
        await wait_for(lambda: "reconnecting" in states(viewer))
        await wait_for(lambda: states(viewer)[-1:] == ["live"])
        frames = len(viewer.received.video)
        await wait_for(lambda: len(viewer.received.video) > frames + 15)  # same peer connection
        assert viewer.pc.connectionState == "connected"
        assert rig.gateway.app[METRICS].upstream_reconnects.labels("heygen", "ok")._value.get() == 1
        assert rig.open_sessions() == 1
    finally:
        await viewer.close()
    assert (await rig.gateway.delete(f"/v1/sessions/{session_id}")).status == 200


async def test_avatar_leaving_ends_the_session_with_an_event(rig: Rig) -> None:
    session_id, provider_id, viewer = await watched_session(rig)
    session = rig.session(session_id)
    try:
        await rig.admin("POST", f"/sim/sessions/{provider_id}/avatar_leave")
        # Rejoining finds no avatar; after the configured attempts the session is given up.
        await wait_for(lambda: any(e["type"] == "stream_disconnected"
                                   for e in viewer.received.events), timeout=40)
        await wait_for(lambda: session.state == "closed")
        assert session.close_reason == "upstream_ended"
        assert rig.open_sessions() == 0  # and the provider session was stopped
        assert rig.gateway.app[METRICS].upstream_reconnects.labels("heygen", "failed")._value.get() == 1
    finally:
        await viewer.close()


async def test_expired_session_ends_at_once(rig: Rig) -> None:
    session_id, provider_id, viewer = await watched_session(rig)
    session = rig.session(session_id)
    try:
        await rig.admin("POST", f"/sim/sessions/{provider_id}/expire")
        await wait_for(lambda: session.state == "closed", timeout=15)
        disconnected = [e for e in viewer.received.events if e["type"] == "stream_disconnected"]
        assert disconnected and "ended the session" in disconnected[0]["reason"]
        assert (await rig.gateway.get(f"/v1/sessions/{session_id}")).status == 404
    finally:
        await viewer.close()


async def test_rest_errors_and_timeouts_surface_as_clear_5xx(rig: Rig) -> None:
    # streaming.new failing: a clear 503, and nothing is left open at the provider.
    await rig.fault(endpoint="/v1/streaming.new", kind="error", status=500, times=1)
    failed = await rig.gateway.post("/v1/sessions", json={"upstream": "heygen"})
    body = await failed.json()
    assert failed.status == 503 and "streaming.new" in body["error"]["message"]
    assert rig.open_sessions() == 0

    session_id, _, viewer = await watched_session(rig)
    url = f"/v1/sessions/{session_id}"
    try:
        # A task is never retried (it would speak twice): the error reaches the controller.
        await rig.fault(endpoint="/v1/streaming.task", kind="error", status=502, times=1)
        response = await rig.gateway.post(f"{url}/speak", json={"text": "Hello?"})
        assert response.status == 503, await response.text()
        # A keep-alive is safe to retry: one 5xx is absorbed.
        await rig.fault(endpoint="/v1/streaming.keep_alive", kind="error", status=500, times=1)
        assert (await rig.gateway.post(f"{url}/keep-alive")).status == 200
        # A hung provider: the gateway's own timeout (3 s here) answers, the session lives on.
        await rig.fault(endpoint="/v1/streaming.task", kind="hang", seconds=10, times=1)
        hung = await rig.gateway.post(f"{url}/speak", json={"text": "Anyone there?"})
        assert hung.status == 503 and "timed out" in (await hung.json())["error"]["message"]
        ok = await rig.gateway.post(f"{url}/speak", json={"text": "Back again."})
        assert ok.status == 200
        assert rig.session(session_id).state == "live"
    finally:
        await viewer.close()
    assert (await rig.gateway.delete(url)).status == 200
