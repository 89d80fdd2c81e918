"""The LiveAvatar API emulation: token / start / stop / keep-alive with their auth rules and
errors (code 1000, 201, FastAPI 422s, idempotent stop, JWT session tokens), the lifetime
rules, and a FULL-mode session (avatar + agent participant) driven over LiveKit data by the
real SDK."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jwt
import pytest

from tests.sim.fixtures import (
    HEYGEN_KEY,
    LIVEAVATAR_KEY,
    SimClient,
    call,
    heygen,
    ledger_json,
    liveavatar,
    liveavatar_token,
    needs_netns,
    new_heygen_session,
)
from tests.sim.sdk_client import SdkClient, feed

pytestmark = pytest.mark.usefixtures("nothing_left_open")


async def start(sim: SimClient, token: str) -> dict[str, Any]:
    data: dict[str, Any] = (await liveavatar(sim, "start", bearer=token))["data"]
    return data


async def stop(sim: SimClient, token: str) -> None:
    await liveavatar(sim, "stop", {"reason": "USER_DISCONNECTED"}, bearer=token)


def error(status: int, message: str) -> dict[str, Any]:
    return {"code": 4000 + status - 400, "data": None, "message": message}


# -- token ---------------------------------------------------------------------------------------


async def test_token_takes_the_liveavatar_api_key_only(sim: SimClient) -> None:
    body = {"mode": "FULL", "avatar_id": "a"}
    assert await liveavatar(sim, "token", body, expect=403) == error(403, "Not authenticated")
    assert await liveavatar(sim, "token", body, lakey="wrong", expect=401) == \
        error(401, "Invalid API key")
    assert await liveavatar(sim, "token", body, lakey=HEYGEN_KEY, expect=401) == \
        error(401, "Invalid API key")
    # ... and a LiveAvatar key does not work on HeyGen.
    assert (await heygen(sim, "new", {"version": "v2"}, key=LIVEAVATAR_KEY, expect=401))[
        "code"] == 400112
    data = await liveavatar_token(sim)
    assert set(data) == {"session_id", "session_token"}
    claims = jwt.decode(data["session_token"], options={"verify_signature": False})
    assert claims["sub"] == claims["session_id"] == data["session_id"]
    assert claims["start_session_data"]["mode"] == "FULL"
    assert claims["start_session_data"]["agent_type"] == "FULL"
    [row] = (await ledger_json(sim, "?open=1&provider=liveavatar"))["sessions"]
    assert row["session_id"] == data["session_id"] and row["mode"] == "FULL"
    assert row["quality"] == "low" and row["avatar"] == "sim-avatar" and row["started_at"] is None
    await stop(sim, data["session_token"])
    [row] = (await ledger_json(sim))["sessions"]
    assert row["stop_reason"] == "stopped" and row["billed_seconds"] == 0.0


@pytest.mark.parametrize(("body", "loc", "kind", "needle"), [
    ({"avatar_id": "a"}, ["body", "mode"], "missing", "Field required"),
    ({"mode": "CUSTOM", "avatar_id": "a"}, ["body", "mode"], "enum", "'FULL' or 'LITE'"),
    ({"mode": "FULL"}, ["body", "avatar_id"], "missing", "Field required"),
    ({"mode": "FULL", "avatar_id": "a", "video_settings": "hd"}, ["body", "video_settings"],
     "dict_type", "valid dictionary"),
    ({"mode": "FULL", "avatar_id": "a", "video_settings": {"encoding": "AV1"}},
     ["body", "video_settings", "encoding"], "enum", "'VP8' or 'H264'"),
    ({"mode": "FULL", "avatar_id": "a", "video_settings": {"quality": "ultra"}},
     ["body", "video_settings", "quality"], "enum", "'very_high', 'high', 'medium', 'low'"),
    ({"mode": "FULL", "avatar_id": "a", "video_quality": "4k"}, ["body", "video_quality"],
     "enum", "one of"),
    ({"mode": "LITE", "avatar_id": "a", "livekit_config": {"livekit_room": "r"}},
     ["body", "livekit_config", "livekit_url"], "missing", "Field required"),
    ({"mode": "FULL", "avatar_id": "a", "max_session_duration": 601},
     ["body", "max_session_duration"], "value_error", "up to 600"),
    ({"mode": "FULL", "avatar_id": "a", "avatar_persona": []}, ["body", "avatar_persona"],
     "dict_type", "valid dictionary"),
    ({"mode": "FULL", "avatar_id": "a", "is_sandbox": "yes"}, ["body", "is_sandbox"],
     "bool_type", "valid boolean"),
])
async def test_token_validates_its_body_like_fastapi(sim: SimClient, body: dict[str, Any],
                                                     loc: list[str], kind: str,
                                                     needle: str) -> None:
    payload = await liveavatar(sim, "token", body, lakey=LIVEAVATAR_KEY, expect=422)
    [detail] = payload["detail"]
    assert set(payload) == {"detail"} and set(detail) == {"type", "loc", "msg", "input"}
    assert detail["loc"] == loc and detail["type"] == kind and needle in detail["msg"], detail
    assert (await ledger_json(sim))["total"] == 0


async def test_a_body_that_is_not_json_is_a_fastapi_422(sim: SimClient) -> None:
    response = await sim.post("/v1/sessions/token", data=b"{nope",
                              headers={"X-API-KEY": LIVEAVATAR_KEY})
    assert response.status == 422
    [detail] = (await response.json())["detail"]
    assert detail["type"] == "json_invalid" and detail["loc"][0] == "body"
    response = await sim.post("/v1/sessions/token", json=[1], headers={"X-API-KEY": LIVEAVATAR_KEY})
    assert (await response.json())["detail"][0]["type"] == "model_attributes_type"


async def test_token_accepts_video_quality_and_very_high(sim: SimClient) -> None:
    # livekit-agents sends a top-level video_quality; very_high renders like high (720p).
    first = await liveavatar_token(sim, mode="LITE", video_settings=None, video_quality="medium",
                                   is_sandbox=False)
    claims = jwt.decode(first["session_token"], options={"verify_signature": False})
    assert claims["start_session_data"]["mode"] == "LITE"
    second = await liveavatar_token(sim, video_settings={"quality": "very_high",
                                                         "encoding": "H264"})
    rows = {r["session_id"]: r for r in (await ledger_json(sim))["sessions"]}
    assert rows[first["session_id"]]["quality"] == "medium"
    assert rows[first["session_id"]]["mode"] == "LITE"
    assert rows[second["session_id"]]["quality"] == "high"
    await stop(sim, first["session_token"])
    await stop(sim, second["session_token"])


# -- start / keep-alive / stop ---------------------------------------------------------------------


async def test_start_needs_the_session_token(sim: SimClient) -> None:
    data = await liveavatar_token(sim)
    assert await liveavatar(sim, "start", expect=403) == error(403, "Not authenticated")
    body = await liveavatar(sim, "start", lakey=LIVEAVATAR_KEY, expect=401)
    assert "Bearer <session_token>', not an API key" in body["message"]
    assert await liveavatar(sim, "start", bearer="forged", expect=401) == \
        error(401, "Invalid or expired session token")
    # A token is signed: the same claims signed with another key, or expired, are refused.
    claims = jwt.decode(data["session_token"], options={"verify_signature": False})
    forged = jwt.encode(claims, b"x" * 32, algorithm="HS256")
    assert await liveavatar(sim, "start", bearer=forged, expect=401) == \
        error(401, "Invalid or expired session token")
    other = await liveavatar_token(sim)
    body = await liveavatar(sim, "start", {"session_id": other["session_id"]},
                            bearer=data["session_token"], expect=403)
    assert body["message"] == "the session token does not belong to this session"
    assert (await ledger_json(sim, "?open=1"))["sessions"][0]["started_at"] is None
    await stop(sim, data["session_token"])
    await stop(sim, other["session_token"])


async def test_start_returns_the_room_and_the_lifecycle_works(sim: SimClient) -> None:
    data = await liveavatar_token(sim, max_session_duration=300)
    token = data["session_token"]
    body = await liveavatar(sim, "keep-alive", bearer=token, expect=409)
    assert body == error(409, "Session not started")
    started = await start(sim, token)
    assert started["session_id"] == data["session_id"]
    assert started["livekit_url"] == f"ws://127.0.0.1:{sim.port}"
    assert started["max_session_duration"] == 300 and started["ws_url"] is None  # FULL
    client = jwt.decode(started["livekit_client_token"], options={"verify_signature": False})
    agent = jwt.decode(started["livekit_agent_token"], options={"verify_signature": False})
    assert client["sub"] == "client" and client["video"]["room"] == data["session_id"]
    assert agent["sub"] == "agent" and agent["video"]["room"] == data["session_id"]
    assert await liveavatar(sim, "start", bearer=token, expect=409) == \
        error(409, "Session already started")
    [row] = (await ledger_json(sim))["sessions"]
    assert row["started_at"] is not None

    await liveavatar(sim, "keep-alive", bearer=token)
    await liveavatar(sim, "keep-alive", {"session_id": data["session_id"]}, lakey=LIVEAVATAR_KEY)
    body = await liveavatar(sim, "keep-alive", lakey=LIVEAVATAR_KEY, expect=422)
    assert body["detail"][0]["loc"] == ["body", "session_id"]
    assert await liveavatar(sim, "keep-alive", {"session_id": "nope"}, lakey=LIVEAVATAR_KEY,
                            expect=404) == error(404, "Session not found")
    body = await liveavatar(sim, "stop", {"reason": 5}, bearer=token, expect=422)
    assert body["detail"][0]["loc"] == ["body", "reason"]

    await liveavatar(sim, "stop", {"session_id": data["session_id"]}, lakey=LIVEAVATAR_KEY)
    # Stop is idempotent: the SDK's cleanup calls it again after the session ended.
    assert await liveavatar(sim, "stop", bearer=token) == {"code": 1000, "data": None,
                                                          "message": "success"}
    await liveavatar(sim, "stop", {"session_id": data["session_id"]}, lakey=LIVEAVATAR_KEY)
    assert await liveavatar(sim, "keep-alive", bearer=token, expect=409) == \
        error(409, "Session already stopped")
    assert await liveavatar(sim, "start", bearer=token, expect=409) == \
        error(409, "Session already stopped")
    [row] = (await ledger_json(sim))["sessions"]
    assert row["stop_reason"] == "stopped" and row["billed_seconds"] > 0


async def test_providers_do_not_see_each_others_sessions(sim: SimClient) -> None:
    la = await liveavatar_token(sim)
    hg = await new_heygen_session(sim)
    assert await liveavatar(sim, "keep-alive", {"session_id": hg["session_id"]},
                            lakey=LIVEAVATAR_KEY, expect=404) == error(404, "Session not found")
    body = await heygen(sim, "keep_alive", {"session_id": la["session_id"]}, expect=400)
    assert body["code"] == 10006
    await heygen(sim, "stop", {"session_id": hg["session_id"]})
    await stop(sim, la["session_token"])


@pytest.mark.parametrize("sim_settings", [{"concurrency_limit": 2}], indirect=True)
async def test_concurrency_limit_counts_started_sessions_per_provider(sim: SimClient) -> None:
    tokens = [(await liveavatar_token(sim))["session_token"] for _ in range(3)]
    heygen_ids = [(await new_heygen_session(sim))["session_id"] for _ in range(2)]
    await start(sim, tokens[0])
    await start(sim, tokens[1])
    assert await liveavatar(sim, "start", bearer=tokens[2], expect=429) == \
        error(429, "Concurrent session limit reached")
    await stop(sim, tokens[0])
    await start(sim, tokens[2])
    for token in tokens[1:]:
        await stop(sim, token)
    for session_id in heygen_ids:
        await heygen(sim, "stop", {"session_id": session_id})
    reasons = [row["stop_reason"] for row in (await ledger_json(sim))["sessions"]]
    assert reasons == ["stopped"] * 5


@pytest.mark.parametrize("sim_settings", [{"liveavatar_idle_timeout": 1.0}], indirect=True)
async def test_idle_timeout_and_max_session_duration(sim: SimClient) -> None:
    idle = await liveavatar_token(sim)
    short = await liveavatar_token(sim, max_session_duration=2)
    await start(sim, idle["session_token"])
    await start(sim, short["session_token"])
    # Keep-alive every 0.25 s holds the short one past its 1 s idle timeout, not to its 2 s
    # limit: a busy machine's stretched sleeps have 0.75 s of margin either way.
    for _ in range(5):
        await asyncio.sleep(0.25)
        await liveavatar(sim, "keep-alive", bearer=short["session_token"])
    async with asyncio.timeout(30):
        while (await ledger_json(sim))["open"]:
            await asyncio.sleep(0.05)
    rows = {r["session_id"]: r for r in (await ledger_json(sim))["sessions"]}
    assert rows[idle["session_id"]]["stop_reason"] == "idle_timeout"
    assert rows[short["session_id"]]["stop_reason"] == "duration_limit"
    assert rows[short["session_id"]]["billed_seconds"] >= 2.0
    # The SDK calls stop after the server ended the session: that is no error.
    await stop(sim, idle["session_token"])
    await stop(sim, short["session_token"])
    rows = {r["session_id"]: r for r in (await ledger_json(sim))["sessions"]}
    assert rows[idle["session_id"]]["stop_reason"] == "idle_timeout"


# -- FULL mode with the real SDK -------------------------------------------------------------------


def responses(client: SdkClient) -> list[dict[str, Any]]:
    """Every ``agent-response`` event, each checked to come from the session's agent
    participant ``liveavatar-agent-<session_id>`` (FULL) or the avatar (LITE)."""
    out = []
    for packet in client.data:
        assert packet.topic == "agent-response", packet
        event = json.loads(packet.payload)
        assert packet.sender in (f"liveavatar-agent-{event['session_id']}", "heygen"), packet
        out.append(event)
    return out


def of_type(client: SdkClient, event_type: str) -> list[dict[str, Any]]:
    return [e for e in responses(client) if e["event_type"] == event_type]


async def command(client: SdkClient, event_type: str, event_id: str, **data: Any) -> None:
    payload = json.dumps({"event_type": event_type, "event_id": event_id, **data})
    async with asyncio.timeout(5):
        await client.room.local_participant.publish_data(payload, topic="agent-control")


@needs_netns
async def test_full_mode_commands_and_events(sim: SimClient, sdk_clients: list[SdkClient]) -> None:
    data = await liveavatar_token(sim)
    session_id = data["session_id"]
    agent = f"liveavatar-agent-{session_id}"
    started = await start(sim, data["session_token"])
    client = SdkClient(started["livekit_url"], started["livekit_client_token"])
    sdk_clients.append(client)
    await client.connect()
    await client.wait_for(lambda: client.video.frames >= 10 and client.audio.frames >= 30)
    assert client.video.sizes == {(640, 360)}
    # Both participants the web SDK waits for: the avatar's media and the data-only agent.
    remote = {p.identity: p for p in client.room.remote_participants.values()}
    assert set(remote) == {"heygen", agent}
    assert not remote[agent].track_publications

    await command(client, "avatar.speak_text", "cmd-1", text="Good morning to you.")
    await client.wait_for(lambda: bool(of_type(client, "avatar.speak_ended")))
    events = responses(client)
    assert {p.sender for p in client.data} == {agent}
    assert [e["event_type"] for e in events] == [
        "avatar.transcription", "avatar.speak_started", "avatar.speak_ended"]
    assert events[0]["text"] == "Good morning to you."
    for event in events:
        assert event["session_id"] == session_id and event["source_event_id"] == "cmd-1"
        assert isinstance(event["event_id"], str)
    assert len({e["event_id"] for e in events}) == 3

    client.data.clear()
    await command(client, "avatar.speak_response", "cmd-2", text="Say something long enough "
                  "to be interrupted while it is still being spoken by the avatar")
    await client.wait_for(lambda: bool(of_type(client, "avatar.speak_started")))
    await command(client, "avatar.interrupt", "cmd-3")
    await client.wait_for(lambda: bool(of_type(client, "avatar.speak_ended")))
    [transcription] = of_type(client, "avatar.transcription")
    assert transcription["text"].startswith("You said: Say something long enough")
    assert [e["source_event_id"] for e in responses(client)] == ["cmd-2"] * 3

    # FULL sessions listen: the microphone's voice activity comes back as user.* events.
    client.data.clear()
    source = await client.publish_microphone()
    await feed(source, 0.3, 0.0)
    await feed(source, 0.8, 0.3)
    await feed(source, 1.2, 0.0)
    await client.wait_for(lambda: bool(of_type(client, "user.speak_ended")))
    assert [e["event_type"] for e in responses(client)] == ["user.speak_started",
                                                            "user.speak_ended"]
    await command(client, "avatar.stop_listening", "cmd-4")
    await command(client, "user.start_push_to_talk", "cmd-5")
    await client.wait_for(lambda: bool(of_type(client, "user.push_to_talk_started")))

    await stop(sim, data["session_token"])
    await client.wait_for(lambda: bool(client.seen("disconnected")))
    [stopped] = of_type(client, "session.stopped")
    assert stopped["stop_reason"] == "USER_DISCONNECTED" and stopped["session_id"] == session_id
    assert "end_reason" not in stopped
    assert {p.sender for p in client.data} == {agent}
    [row] = (await ledger_json(sim))["sessions"]
    assert row["stop_reason"] == "stopped" and row["billed_seconds"] > 1.0


@needs_netns
async def test_server_side_stop_reports_its_reason_and_a_late_stop_succeeds(
        sim: SimClient, sdk_clients: list[SdkClient]) -> None:
    data = await liveavatar_token(sim)
    started = await start(sim, data["session_token"])
    client = SdkClient(started["livekit_url"], started["livekit_client_token"])
    sdk_clients.append(client)
    await client.connect()
    await client.wait_for(lambda: len(client.room.remote_participants) == 2)
    status, _ = await call(sim, "POST", f"/sim/sessions/{data['session_id']}/expire")
    assert status == 200
    await client.wait_for(lambda: bool(client.seen("disconnected")))
    assert [e["stop_reason"] for e in of_type(client, "session.stopped")] == ["EXPIRED"]
    await stop(sim, data["session_token"])  # what the SDK's cleanup does next
    [row] = (await ledger_json(sim))["sessions"]
    assert row["stop_reason"] == "expired"


@needs_netns
async def test_lite_mode_ignores_full_commands(sim: SimClient, sdk_clients: list[SdkClient]) -> None:
    data = await liveavatar_token(sim, mode="LITE")
    started = await start(sim, data["session_token"])
    assert started["ws_url"].startswith(f"ws://127.0.0.1:{sim.port}/v1/sessions/ws?")
    client = SdkClient(started["livekit_url"], started["livekit_client_token"])
    sdk_clients.append(client)
    await client.connect()
    await command(client, "avatar.speak_text", "cmd-1", text="Hello")
    await client.wait_for(lambda: client.audio.frames >= 50)
    assert responses(client) == []
    assert [p.identity for p in client.room.remote_participants.values()] == ["heygen"]
    await stop(sim, data["session_token"])
    await client.wait_for(lambda: bool(client.seen("disconnected")))
    assert [e["stop_reason"] for e in of_type(client, "session.stopped")] == ["USER_DISCONNECTED"]
