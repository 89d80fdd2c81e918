"""Fault switches (REST 5xx, delay, hang with a cap, expire, drop room, avatar leaves), the
admin API and the ledger, seen over REST and from the real ``livekit`` SDK."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from livekit import rtc
from pytest_aiohttp import AiohttpClient

from gateway.sim.app import FAULTS, create_sim_app
from gateway.sim.ledger import Ledger
from tests.sim.fixtures import (
    HEYGEN_KEY,
    SimClient,
    admin,
    call,
    heygen,
    ledger_json,
    liveavatar,
    liveavatar_token,
    make_sim_settings,
    needs_netns,
    new_heygen_session,
)
from tests.sim.sdk_client import SdkClient

pytestmark = pytest.mark.usefixtures("nothing_left_open")


async def arm(sim: SimClient, **fault: Any) -> dict[str, Any]:
    armed: dict[str, Any] = await admin(sim, "POST", "/sim/faults", fault, expect=201)
    return armed


async def stop(sim: SimClient, session_id: str) -> None:
    await heygen(sim, "stop", {"session_id": session_id})


# -- endpoint faults --------------------------------------------------------------------------------


async def test_error_fault_hits_n_times_and_has_no_effect(sim: SimClient) -> None:
    fault = await arm(sim, endpoint="/v1/streaming.new", kind="error", status=502, times=2)
    assert fault["remaining"] == 2 and fault["id"].startswith("F")
    for _ in range(2):
        body = await heygen(sim, "new", {"version": "v2"}, expect=502)
        assert body == {"code": 502, "message": f"simulated fault {fault['id']}: HTTP 502"}
    assert (await ledger_json(sim))["total"] == 0  # failed requests created nothing
    session_id = (await new_heygen_session(sim))["session_id"]
    assert (await admin(sim, "GET", "/sim/faults"))["faults"] == []
    await stop(sim, session_id)


async def test_session_scoped_fault_until_removed(sim: SimClient) -> None:
    first = (await new_heygen_session(sim))["session_id"]
    second = (await new_heygen_session(sim))["session_id"]
    fault = await arm(sim, endpoint="/v1/streaming.keep_alive", kind="error",
                      session_id=first)
    assert fault["status"] == 503 and fault["remaining"] is None
    for _ in range(3):
        await heygen(sim, "keep_alive", {"session_id": first}, expect=503)
        await heygen(sim, "keep_alive", {"session_id": second})
    listed = (await admin(sim, "GET", "/sim/faults"))["faults"]
    assert [f["hits"] for f in listed] == [3]
    await admin(sim, "DELETE", f"/sim/faults/{fault['id']}", expect=204)
    await heygen(sim, "keep_alive", {"session_id": first})
    await admin(sim, "DELETE", f"/sim/faults/{fault['id']}", expect=404)
    await stop(sim, first)
    await stop(sim, second)


async def test_liveavatar_fault_matches_the_session_of_a_bearer_token(sim: SimClient) -> None:
    target, other = await liveavatar_token(sim), await liveavatar_token(sim)
    fault = await arm(sim, endpoint="/v1/sessions/start", kind="error", status=500,
                      session_id=target["session_id"])
    body = await liveavatar(sim, "start", bearer=target["session_token"], expect=500)
    assert body == {"code": 5000, "data": None,
                    "message": f"simulated fault {fault['id']}: HTTP 500"}
    await liveavatar(sim, "start", bearer=other["session_token"])
    await admin(sim, "DELETE", f"/sim/faults?session_id={target['session_id']}", expect=204)
    assert (await admin(sim, "GET", "/sim/faults"))["faults"] == []
    for data in (target, other):
        await liveavatar(sim, "stop", bearer=data["session_token"])


async def test_delay_fault(sim: SimClient) -> None:
    session_id = (await new_heygen_session(sim))["session_id"]
    await arm(sim, endpoint="/v1/streaming.keep_alive", kind="delay", seconds=0.4, times=1)
    started = time.monotonic()
    await heygen(sim, "keep_alive", {"session_id": session_id})
    assert time.monotonic() - started >= 0.4
    started = time.monotonic()
    await heygen(sim, "keep_alive", {"session_id": session_id})
    assert time.monotonic() - started < 0.3
    await stop(sim, session_id)


async def test_late_fault_processes_the_request_and_answers_after_the_client_gave_up(
        sim: SimClient) -> None:
    """The provider that answers after the client's timeout: the session exists and bills,
    the client never learned its id; ``streaming.list`` (spec §3.10) shows it."""
    await arm(sim, endpoint="/v1/streaming.new", kind="late", seconds=5, times=1)
    before = time.time()
    with pytest.raises(TimeoutError):
        await call(sim, "POST", "/v1/streaming.new", {"version": "v2", "quality": "low"},
                   key=HEYGEN_KEY, timeout=0.5)
    opened = (await ledger_json(sim, "?open=1"))["sessions"]
    assert len(opened) == 1 and opened[0]["provider"] == "heygen"
    listed = (await call(sim, "GET", "/v1/streaming.list", None, key=HEYGEN_KEY))[1]
    sessions = listed["data"]["sessions"]
    assert [s["session_id"] for s in sessions] == [opened[0]["session_id"]]
    assert sessions[0]["status"] == "new"
    assert isinstance(sessions[0]["created_at"], int)
    assert int(before) <= sessions[0]["created_at"] <= time.time()
    await stop(sim, opened[0]["session_id"])
    bad = await admin(sim, "POST", "/sim/faults", {"endpoint": "/v1/streaming.new",
                                                   "kind": "late"}, expect=400)
    assert "'late' fault needs seconds" in bad["error"]["message"]


@pytest.mark.parametrize("sim_settings", [{"fault_hang_cap": 0.8}], indirect=True)
async def test_hang_fault_times_clients_out_but_is_capped(sim: SimClient) -> None:
    session_id = (await new_heygen_session(sim))["session_id"]
    await arm(sim, endpoint="/v1/streaming.start", kind="hang")
    with pytest.raises(TimeoutError):
        await call(sim, "POST", "/v1/streaming.start", {"session_id": session_id},
                   key=HEYGEN_KEY, timeout=0.3)
    started = time.monotonic()
    body = await heygen(sim, "start", {"session_id": session_id}, expect=504)
    assert 0.7 < time.monotonic() - started < 2.0  # the cap, not forever
    assert "hung 0.8 s and timed out" in body["message"]
    info = await admin(sim, "GET", f"/sim/sessions/{session_id}")
    assert info["state"] == "new"  # a hung request was not processed
    bad = await admin(sim, "POST", "/sim/faults", {"endpoint": "/v1/streaming.start",
                                                   "kind": "hang", "seconds": 5}, expect=400)
    assert "seconds must be 0..0.8 (fault_hang_cap)" in bad["error"]["message"]
    await admin(sim, "DELETE", "/sim/faults", expect=204)
    await stop(sim, session_id)


async def test_hangs_are_released_at_shutdown(sim: SimClient, sim_app: web.Application) -> None:
    await arm(sim, endpoint="/v1/streaming.create_token", kind="hang")
    pending = asyncio.ensure_future(heygen(sim, "create_token", expect=None))
    await asyncio.sleep(0.2)
    assert not pending.done()
    started = time.monotonic()
    sim_app[FAULTS].release()  # what the app's on_shutdown does first
    async with asyncio.timeout(2):
        body = await pending
    assert time.monotonic() - started < 1.0
    assert "timed out" in body["message"]


async def test_admin_refuses_impossible_faults(sim: SimClient) -> None:
    endpoints = (await admin(sim, "GET", "/sim/faults"))["endpoints"]
    assert "/v1/streaming.task" in endpoints and "/v1/sessions/keep-alive" in endpoints
    cases: list[tuple[dict[str, Any], str]] = [
        ({"endpoint": "/v1/nope", "kind": "error"}, "unknown endpoint '/v1/nope'"),
        ({"endpoint": "/v1/streaming.task", "kind": "explode"}, "kind must be one of"),
        ({"endpoint": "/v1/streaming.task", "kind": "error", "status": 404}, "500..599"),
        ({"endpoint": "/v1/streaming.task", "kind": "delay"}, "needs seconds"),
        ({"endpoint": "/v1/streaming.task", "kind": "error", "seconds": 1}, "seconds applies"),
        ({"endpoint": "/v1/streaming.task", "kind": "error", "times": 0}, "at least 1"),
        ({"endpoint": "/v1/streaming.task", "kind": "error", "when": "now"}, "unknown fields: when"),
        ({"kind": "error"}, "'endpoint' is required"),
        ({"endpoint": "/v1/streaming.task", "kind": "error", "times": "2"}, "'times' must be int"),
    ]
    for body, needle in cases:
        error = (await admin(sim, "POST", "/sim/faults", body, expect=400))["error"]
        assert error["code"] == "bad_request" and needle in error["message"], (body, error)
    assert (await admin(sim, "GET", "/sim/faults"))["faults"] == []


# -- session actions (REST side) --------------------------------------------------------------------


async def test_expire_stops_the_session_now(sim: SimClient) -> None:
    session_id = (await new_heygen_session(sim, start=True))["session_id"]
    await asyncio.sleep(0.1)
    row = await admin(sim, "POST", f"/sim/sessions/{session_id}/expire")
    assert row["stop_reason"] == "expired" and row["billed_seconds"] > 0.05
    body = await heygen(sim, "task", {"session_id": session_id, "text": "hi"}, expect=400)
    assert body == {"code": 10005, "message": "session state wrong: closed"}
    error = (await admin(sim, "POST", f"/sim/sessions/{session_id}/expire", expect=409))["error"]
    assert error == {"code": "conflict", "message": f"session {session_id} is closed"}
    error = (await admin(sim, "POST", "/sim/sessions/nope/expire", expect=404))["error"]
    assert error == {"code": "not_found", "message": "no session nope"}
    assert (await admin(sim, "GET", f"/sim/sessions/{session_id}"))["state"] == "closed"


async def test_avatar_leave_and_drop_room_over_rest(sim: SimClient) -> None:
    session_id = (await new_heygen_session(sim))["session_id"]
    error = (await admin(sim, "POST", f"/sim/sessions/{session_id}/avatar_leave",
                         expect=409))["error"]
    assert "has no avatar" in error["message"]
    await heygen(sim, "start", {"session_id": session_id})
    assert await admin(sim, "POST", f"/sim/sessions/{session_id}/drop_room") == \
        {"session_id": session_id, "dropped": []}
    await admin(sim, "POST", f"/sim/sessions/{session_id}/avatar_leave")
    info = await admin(sim, "GET", f"/sim/sessions/{session_id}")
    assert info["state"] == "connected" and info["room"]["avatar"] is False
    body = await heygen(sim, "task", {"session_id": session_id, "text": "hi"}, expect=500)
    assert "the avatar has left the room" in body["message"]
    listed = (await admin(sim, "GET", "/sim/sessions"))["sessions"]
    assert [s["session_id"] for s in listed] == [session_id]
    await stop(sim, session_id)


async def test_a_sync_task_ends_when_the_avatar_leaves_mid_speech(sim: SimClient) -> None:
    session_id = (await new_heygen_session(sim, start=True))["session_id"]
    body = {"session_id": session_id, "task_mode": "sync",
            "text": "A long sentence that will not be finished, because the avatar leaves."}
    pending = asyncio.ensure_future(heygen(sim, "task", body, expect=500))
    await asyncio.sleep(0.5)
    assert not pending.done()
    started = time.monotonic()
    await admin(sim, "POST", f"/sim/sessions/{session_id}/avatar_leave")
    async with asyncio.timeout(2):
        payload = await pending
    assert time.monotonic() - started < 1.0
    assert "the avatar has left the room" in payload["message"]
    await stop(sim, session_id)


# -- ledger -------------------------------------------------------------------------------------------


async def test_ledger_filters(sim: SimClient) -> None:
    heygen_id = (await new_heygen_session(sim))["session_id"]
    la = await liveavatar_token(sim)
    await stop(sim, heygen_id)
    everything = await ledger_json(sim)
    assert everything["open"] == 1 and everything["total"] == 2
    only_open = await ledger_json(sim, "?open=1")
    assert [r["session_id"] for r in only_open["sessions"]] == [la["session_id"]]
    mine = await ledger_json(sim, "?provider=heygen")
    assert mine["open"] == 0 and [r["session_id"] for r in mine["sessions"]] == [heygen_id]
    error = (await admin(sim, "GET", "/sim/ledger?provider=x", expect=400))["error"]
    assert "provider must be heygen or liveavatar" in error["message"]
    await liveavatar(sim, "stop", bearer=la["session_token"])


async def test_shutdown_stops_every_open_session(aiohttp_client: AiohttpClient) -> None:
    ledger = Ledger()
    try:
        own = await aiohttp_client(create_sim_app(make_sim_settings(), ledger=ledger))
        started = (await new_heygen_session(own, start=True))["session_id"]
        fresh = (await new_heygen_session(own))["session_id"]
        la = await liveavatar_token(own)
        await liveavatar(own, "start", bearer=la["session_token"])
        await own.close()
        rows = {r.session_id: r for r in ledger.entries()}
        assert ledger.open_count() == 0 and len(rows) == 3
        assert {r.stop_reason for r in rows.values()} == {"shutdown"}
        assert (rows[started].billed_seconds or 0.0) > 0
        assert rows[fresh].billed_seconds == 0.0
    finally:
        ledger.close()


async def test_a_file_ledger_closes_what_a_crashed_run_left_open(tmp_path: Path,
                                                                 aiohttp_client: AiohttpClient
                                                                 ) -> None:
    path = str(tmp_path / "ledger.sqlite")
    crashed = Ledger(path)
    crashed.created("s-1", provider="heygen", avatar="a", quality="low", mode="v2")
    crashed.started("s-1")
    crashed.close()  # no stop: the process died
    own = await aiohttp_client(create_sim_app(make_sim_settings(ledger_path=path)))
    [row] = (await ledger_json(own))["sessions"]
    assert row["session_id"] == "s-1" and row["stop_reason"] == "sim_restart"
    assert row["billed_seconds"] >= 0


# -- seen from the real SDK -------------------------------------------------------------------------


async def connected(sim: SimClient, sdk_clients: list[SdkClient]) -> tuple[str, SdkClient]:
    data = await new_heygen_session(sim, start=True)
    client = SdkClient(data["url"], data["access_token"])
    sdk_clients.append(client)
    await client.connect()
    await client.wait_for(lambda: client.video.frames >= 5)
    return data["session_id"], client


@needs_netns
async def test_sdk_sees_the_avatar_leave(sim: SimClient, sdk_clients: list[SdkClient]) -> None:
    session_id, client = await connected(sim, sdk_clients)
    await admin(sim, "POST", f"/sim/sessions/{session_id}/avatar_leave")
    await client.wait_for(lambda: "heygen" in client.seen("participant_disconnected"), timeout=5)
    assert "heygen" not in client.room.remote_participants
    assert (await admin(sim, "GET", f"/sim/sessions/{session_id}"))["state"] == "connected"
    await stop(sim, session_id)


@needs_netns
async def test_sdk_is_disconnected_when_the_session_expires(
        sim: SimClient, sdk_clients: list[SdkClient]) -> None:
    session_id, client = await connected(sim, sdk_clients)
    await admin(sim, "POST", f"/sim/sessions/{session_id}/expire")
    await client.wait_for(lambda: bool(client.seen("disconnected")), timeout=5)
    assert client.seen("disconnected") == [str(rtc.DisconnectReason.ROOM_DELETED)]
    [row] = (await ledger_json(sim))["sessions"]
    assert row["stop_reason"] == "expired"


@needs_netns
async def test_sdk_rejoins_after_the_room_is_dropped(
        sim: SimClient, sdk_clients: list[SdkClient]) -> None:
    session_id, client = await connected(sim, sdk_clients)
    dropped = await admin(sim, "POST", f"/sim/sessions/{session_id}/drop_room")
    assert dropped["dropped"] == ["client"]
    await client.wait_for(lambda: bool(client.seen("reconnecting")), timeout=5)
    await client.wait_for(lambda: bool(client.seen("reconnected")
                                       or client.seen("disconnected")), timeout=15)
    assert client.seen("reconnected"), client.events
    frames = client.video.frames
    await client.wait_for(lambda: client.video.frames > frames + 10, timeout=10)
    info = await admin(sim, "GET", f"/sim/sessions/{session_id}")
    assert info["room"]["clients"] == ["client"]
    await stop(sim, session_id)


@needs_netns
async def test_sdk_sees_nothing_from_a_failed_task_and_the_retry_speaks(
        sim: SimClient, sdk_clients: list[SdkClient]) -> None:
    session_id, client = await connected(sim, sdk_clients)
    await arm(sim, endpoint="/v1/streaming.task", kind="error", status=503, times=1,
              session_id=session_id)
    await arm(sim, endpoint="/v1/streaming.task", kind="delay", seconds=0.3, times=1)
    body = {"session_id": session_id, "text": "Second time lucky.", "task_mode": "async"}
    await heygen(sim, "task", body, expect=503)
    await asyncio.sleep(0.5)
    assert client.data == []  # the failed request never reached the avatar
    started = time.monotonic()
    task = (await heygen(sim, "task", body))["data"]
    assert time.monotonic() - started >= 0.3  # the delay fault, then processed normally
    await client.wait_for(lambda: any(b"avatar_stop_talking" in d.payload for d in client.data))
    assert {json.loads(d.payload)["task_id"] for d in client.data} == {task["task_id"]}
    await stop(sim, session_id)
