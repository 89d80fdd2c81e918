"""The HeyGen Streaming API emulation: every endpoint, both auth styles, every error, the
session lifetime rules, and the whole v2 flow with the real ``livekit`` SDK as the client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import jwt
import pytest

from gateway.sim.sessions import answer
from tests.sim.fixtures import (
    HEYGEN_KEY,
    LIVEAVATAR_KEY,
    SimClient,
    call,
    heygen,
    ledger_json,
    needs_netns,
    new_heygen_session,
)
from tests.sim.sdk_client import SdkClient, feed

pytestmark = pytest.mark.usefixtures("nothing_left_open")

ENDPOINTS = ("start", "task", "interrupt", "keep_alive", "start_listening", "stop_listening",
             "stop")


def claims(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return decoded


async def stop(sim: SimClient, session_id: str) -> None:
    await heygen(sim, "stop", {"session_id": session_id})


async def session_info(sim: SimClient, session_id: str) -> Any:
    response = await sim.get(f"/sim/sessions/{session_id}")
    assert response.status == 200
    return await response.json()


# -- auth ---------------------------------------------------------------------------------------


async def test_create_token_takes_the_api_key_only(sim: SimClient) -> None:
    for kwargs in ({"key": None}, {"key": "wrong"}, {"key": LIVEAVATAR_KEY}):
        status, body = await call(sim, "POST", "/v1/streaming.create_token", {}, **kwargs)
        assert status == 401
        assert body["code"] == 400112 and body["message"].startswith("Unauthorized")
    token = (await heygen(sim, "create_token"))["data"]["token"]
    status, body = await call(sim, "POST", "/v1/streaming.create_token", bearer=token)
    assert status == 401 and "x-api-key" in body["message"]
    payload = await heygen(sim, "create_token", None)  # an empty body is fine
    assert payload["error"] is None and isinstance(payload["data"]["token"], str)
    assert payload["data"]["token"] != token


async def test_new_returns_livekit_details_and_opens_a_ledger_row(sim: SimClient) -> None:
    data = await new_heygen_session(sim, avatar_name="Anna_public", activity_idle_timeout=60)
    session_id = data["session_id"]
    assert data["url"] == f"ws://127.0.0.1:{sim.port}"
    assert data["sdp"] is None and data["ice_servers"] is None and data["ice_servers2"] is None
    assert data["is_paid"] is True and data["session_duration_limit"] == 600
    assert data["realtime_endpoint"] is None
    client, agent = claims(data["access_token"]), claims(data["livekit_agent_token"])
    assert client["sub"] == "client" and client["name"] == "client"
    assert client["video"]["room"] == session_id and client["video"]["roomJoin"] is True
    assert client["video"]["canPublish"] and client["video"]["canSubscribe"]
    assert client["video"]["canPublishData"]
    assert client["exp"] - client["nbf"] == 24 * 3600
    assert client["iss"] == "sim-key"
    assert agent["sub"] == "agent" and agent["video"]["room"] == session_id
    ledger = await ledger_json(sim, "?open=1")
    assert ledger["open"] == 1
    [row] = ledger["sessions"]
    assert row["session_id"] == session_id and row["provider"] == "heygen"
    assert row["avatar"] == "Anna_public" and row["quality"] == "low" and row["mode"] == "v2"
    assert row["started_at"] is None and row["open"] is True
    await stop(sim, session_id)
    [row] = (await ledger_json(sim))["sessions"]
    assert row["stop_reason"] == "stopped" and row["billed_seconds"] == 0.0


async def test_session_token_is_single_use_and_scoped_to_its_session(sim: SimClient) -> None:
    token = (await heygen(sim, "create_token"))["data"]["token"]
    mine = (await heygen(sim, "new", {"version": "v2"}, bearer=token))["data"]["session_id"]
    body = await heygen(sim, "new", {"version": "v2"}, bearer=token, expect=401)
    assert body["code"] == 400112 and "already used" in body["message"]
    other = (await new_heygen_session(sim))["session_id"]
    body = await heygen(sim, "keep_alive", {"session_id": other}, bearer=token, expect=401)
    assert "does not belong" in body["message"]
    body = await heygen(sim, "keep_alive", {"session_id": mine}, bearer="forged", expect=401)
    assert "invalid or expired session token" in body["message"]
    await heygen(sim, "keep_alive", {"session_id": mine}, bearer=token)
    status, own = await call(sim, "GET", "/v1/streaming.list", bearer=token)
    assert status == 200 and [s["session_id"] for s in own["data"]["sessions"]] == [mine]
    status, everything = await call(sim, "GET", "/v1/streaming.list", key=HEYGEN_KEY)
    assert status == 200
    assert {s["session_id"] for s in everything["data"]["sessions"]} == {mine, other}
    assert all(s["status"] == "new" and isinstance(s["created_at"], int)
               for s in everything["data"]["sessions"])
    await heygen(sim, "stop", {"session_id": mine}, bearer=token)
    await stop(sim, other)


async def test_every_endpoint_refuses_bad_credentials(sim: SimClient) -> None:
    session_id = (await new_heygen_session(sim))["session_id"]
    for action in ("new", *ENDPOINTS):
        for kwargs in ({"key": None}, {"key": "nope"}, {"key": LIVEAVATAR_KEY}):
            status, body = await call(sim, "POST", f"/v1/streaming.{action}",
                                      {"session_id": session_id}, **kwargs)
            assert status == 401 and body["code"] == 400112, (action, kwargs, body)
    status, _ = await call(sim, "GET", "/v1/streaming.list")
    assert status == 401
    await stop(sim, session_id)


# -- validation and errors ------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "code", "needle"), [
    ({"version": None}, 400175, "version must be 'v2'"),
    ({"version": "v1"}, 400175, "version must be 'v2'"),
    ({"quality": "ultra"}, 400175, "quality must be one of low, medium, high"),
    ({"video_encoding": "AV1"}, 400175, "video_encoding must be one of H264, VP8"),
    ({"activity_idle_timeout": 29}, 400175, "activity_idle_timeout must be a number of "
                                            "seconds from 30 to 3600"),
    ({"activity_idle_timeout": 3601}, 400175, "from 30 to 3600"),
    ({"activity_idle_timeout": "60"}, 400175, "from 30 to 3600"),
    ({"disable_idle_timeout": "yes"}, 400175, "disable_idle_timeout must be a boolean"),
    ({"avatar_id": 7}, 400175, "avatar_id must be a string"),
    ({"voice": "Sara"}, 400175, "voice must be an object"),
    ({"knowledge_base": ["a"]}, 400175, "knowledge_base must be a string"),
    ({"livekit_settings": {"url": "wss://x"}}, 400175, "livekit_settings"),
])
async def test_new_validates_its_fields(sim: SimClient, fields: dict[str, Any], code: int,
                                        needle: str) -> None:
    body = {"version": "v2", **fields}
    payload = await heygen(sim, "new", {k: v for k, v in body.items() if v is not None},
                           expect=400)
    assert payload["code"] == code and needle in payload["message"], payload
    assert (await ledger_json(sim))["total"] == 0


async def test_malformed_bodies(sim: SimClient) -> None:
    for raw in (b"{not json", b"[1, 2]"):
        response = await sim.post("/v1/streaming.new", data=raw,
                                  headers={"x-api-key": HEYGEN_KEY,
                                           "Content-Type": "application/json"})
        assert response.status == 400
        assert (await response.json())["code"] == 400175


async def test_unknown_and_missing_sessions(sim: SimClient) -> None:
    for action in ENDPOINTS:
        body = await heygen(sim, action, {"session_id": "no-such-session"}, expect=400)
        assert body == {"code": 10006, "message": "Session not found"}
        body = await heygen(sim, action, {}, expect=400)
        assert body == {"code": 40001, "message": "Missing required parameter: session_id"}


async def test_wrong_state_errors(sim: SimClient) -> None:
    session_id = (await new_heygen_session(sim))["session_id"]
    for action in ("task", "interrupt", "start_listening", "stop_listening"):
        body = await heygen(sim, action, {"session_id": session_id, "text": "hi"}, expect=400)
        assert body == {"code": 10001, "message": "session state wrong: new"}
    await heygen(sim, "start", {"session_id": session_id})
    body = await heygen(sim, "start", {"session_id": session_id}, expect=400)
    assert body == {"code": 10003, "message": "session state wrong: connected"}
    await stop(sim, session_id)
    for action in ENDPOINTS:
        body = await heygen(sim, action, {"session_id": session_id, "text": "hi"}, expect=400)
        assert body == {"code": 10005, "message": "session state wrong: closed"}


@pytest.mark.parametrize("sim_settings", [{"max_text_chars": 40}], indirect=True)
async def test_task_validation(sim: SimClient) -> None:
    session_id = (await new_heygen_session(sim, start=True))["session_id"]
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({}, 40001, "Missing required parameter: text"),
        ({"text": "   "}, 400175, "text must be a non-empty string"),
        ({"text": 3}, 400175, "text must be a non-empty string"),
        ({"text": "x" * 41}, 400175, "longer than 40 characters"),
        ({"text": "hi", "task_type": "sing"}, 400175, "task_type must be one of repeat, talk"),
        ({"text": "hi", "task_mode": "later"}, 400175, "task_mode must be one of sync, async"),
    ]
    for fields, code, needle in cases:
        body = await heygen(sim, "task", {"session_id": session_id, **fields}, expect=400)
        assert body["code"] == code and needle in body["message"], (fields, body)
    await stop(sim, session_id)


async def test_concurrent_limit(sim: SimClient) -> None:
    ids = [(await new_heygen_session(sim))["session_id"] for _ in range(3)]
    body = await heygen(sim, "new", {"version": "v2"}, expect=400)
    assert body == {"code": 10007, "message": "Concurrent limit reached"}
    await stop(sim, ids.pop())
    ids.append((await new_heygen_session(sim))["session_id"])
    assert (await ledger_json(sim))["open"] == 3
    for session_id in ids:
        await stop(sim, session_id)


@pytest.mark.parametrize("sim_settings", [{"concurrency_limit": 1}], indirect=True)
async def test_concurrent_limit_is_configurable(sim: SimClient) -> None:
    session_id = (await new_heygen_session(sim))["session_id"]
    assert (await heygen(sim, "new", {"version": "v2"}, expect=400))["code"] == 10007
    await stop(sim, session_id)


# -- a started session (the avatar joins; no client needed) --------------------------------------


async def test_tasks_sync_async_interrupt_keep_alive_and_listening(sim: SimClient) -> None:
    session_id = (await new_heygen_session(sim, start=True))["session_id"]
    status, listed = await call(sim, "GET", "/v1/streaming.list", key=HEYGEN_KEY)
    assert status == 200
    assert [s["status"] for s in listed["data"]["sessions"]] == ["connected"]
    assert (await session_info(sim, session_id))["room"]["avatar"] is True

    started = time.monotonic()
    sync = (await heygen(sim, "task", {"session_id": session_id, "text": "One two three.",
                                       "task_mode": "sync"}))["data"]
    elapsed = time.monotonic() - started
    assert isinstance(sync["task_id"], str) and sync["duration_ms"] > 300
    assert elapsed >= sync["duration_ms"] / 1000  # sync returns after avatar_stop_talking

    started = time.monotonic()
    long_text = "This is a much longer sentence that the avatar will take a few seconds to say."
    queued = (await heygen(sim, "task", {"session_id": session_id, "text": long_text,
                                         "task_mode": "async"}))["data"]
    assert time.monotonic() - started < queued["duration_ms"] / 2000
    assert queued["task_id"] != sync["task_id"]
    assert (await session_info(sim, session_id))["room"]["speaking"] is True
    await heygen(sim, "interrupt", {"session_id": session_id})
    async with asyncio.timeout(20):
        while (await session_info(sim, session_id))["room"]["speaking"]:
            await asyncio.sleep(0.05)
    await heygen(sim, "interrupt", {"session_id": session_id})  # not speaking: a no-op

    talk = (await heygen(sim, "task", {"session_id": session_id, "text": "What is this?",
                                       "task_type": "talk", "task_mode": "async"}))["data"]
    assert talk["duration_ms"] > 0
    await heygen(sim, "interrupt", {"session_id": session_id})

    await heygen(sim, "keep_alive", {"session_id": session_id})
    await heygen(sim, "start_listening", {"session_id": session_id})
    assert (await session_info(sim, session_id))["room"]["listening"] is True
    await heygen(sim, "stop_listening", {"session_id": session_id})
    assert (await session_info(sim, session_id))["room"]["listening"] is False
    await stop(sim, session_id)
    [row] = (await ledger_json(sim))["sessions"]
    assert row["stop_reason"] == "stopped" and row["billed_seconds"] > 0


def test_the_sim_llm_answers_from_the_knowledge_base() -> None:
    knowledge = "The sky is blue. Grass is green! Our shop opens at nine."
    assert answer("What colour is the sky?", knowledge) == "The sky is blue."
    assert answer("When does the shop open?", knowledge) == "Our shop opens at nine."
    assert answer("Tell me a joke", knowledge) == "You said: Tell me a joke"
    assert answer("  Hello\n world ") == "You said: Hello world"
    assert len(answer("x" * 1000)) == 300


# -- lifetime ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sim_settings", [{"idle_timeout_min": 0.1}], indirect=True)
async def test_idle_timeout_closes_the_session_unless_kept_alive(sim: SimClient) -> None:
    # Bounds from clocks, not guesses: a busy machine only makes sleeps longer.
    began = time.monotonic()
    session_id = (await new_heygen_session(sim, start=True, activity_idle_timeout=1.5))["session_id"]
    for _ in range(7):  # activity every 0.3 s keeps it open past 1.5 s
        await asyncio.sleep(0.3)
        await heygen(sim, "keep_alive", {"session_id": session_id})
    info = await session_info(sim, session_id)
    assert info["state"] == "connected" and info["ends_by"] == "idle_timeout"
    async with asyncio.timeout(30):
        while (await ledger_json(sim))["open"]:
            await asyncio.sleep(0.05)
    [row] = (await ledger_json(sim))["sessions"]
    assert row["stop_reason"] == "idle_timeout"
    assert 7 * 0.3 + 1.5 - 0.1 < row["billed_seconds"] < time.monotonic() - began
    body = await heygen(sim, "task", {"session_id": session_id, "text": "hi"}, expect=400)
    assert body["message"] == "session state wrong: closed"


@pytest.mark.parametrize("sim_settings", [{"idle_timeout_min": 0.1,
                                           "session_duration_limit": 2.0}], indirect=True)
async def test_duration_limit_ends_even_a_session_without_idle_timeout(sim: SimClient) -> None:
    began = time.monotonic()
    data = await new_heygen_session(sim, start=True, disable_idle_timeout=True,
                                    activity_idle_timeout=0.2)
    assert data["session_duration_limit"] == 2
    await asyncio.sleep(0.5)  # past the idle timeout: disabled
    assert (await session_info(sim, data["session_id"]))["state"] == "connected"
    async with asyncio.timeout(30):
        while (await ledger_json(sim))["open"]:
            await asyncio.sleep(0.05)
    [row] = (await ledger_json(sim))["sessions"]
    assert row["stop_reason"] == "duration_limit"
    assert 1.9 < row["billed_seconds"] < time.monotonic() - began


@pytest.mark.parametrize("sim_settings", [{"start_timeout": 0.3}], indirect=True)
async def test_a_session_never_started_expires(sim: SimClient) -> None:
    await new_heygen_session(sim)
    async with asyncio.timeout(30):
        while (await ledger_json(sim))["open"]:
            await asyncio.sleep(0.05)
    [row] = (await ledger_json(sim))["sessions"]
    assert row["stop_reason"] == "never_started" and row["billed_seconds"] == 0.0


# -- the real SDK ----------------------------------------------------------------------------------


def heygen_events(client: SdkClient) -> list[dict[str, Any]]:
    out = []
    for packet in client.data:
        assert packet.sender == "heygen" and not packet.topic
        out.append(json.loads(packet.payload))
    return out


@needs_netns
async def test_v2_flow_with_the_livekit_sdk(sim: SimClient, sdk_clients: list[SdkClient]) -> None:
    token = (await heygen(sim, "create_token"))["data"]["token"]
    data = (await heygen(sim, "new", {"version": "v2", "quality": "low", "avatar_id": "a",
                                      "video_encoding": "VP8"}, bearer=token))["data"]
    session_id = data["session_id"]
    await heygen(sim, "start", {"session_id": session_id}, bearer=token)
    client = SdkClient(data["url"], data["access_token"])
    sdk_clients.append(client)
    await client.connect()
    assert set(client.room.remote_participants) == {"heygen"}
    assert client.room.name == session_id
    await client.wait_for(lambda: len(client.seen("track_subscribed")) == 2)
    await client.wait_for(lambda: client.video.frames >= 15 and client.audio.frames >= 50)
    assert client.video.sizes == {(640, 360)}
    assert client.audio.sample_rates == {48_000}
    quiet = client.peak_rms()

    text = "Hello from the simulator."
    spoke_at = asyncio.get_running_loop().time()
    task = (await heygen(sim, "task", {"session_id": session_id, "text": text,
                                       "task_type": "repeat", "task_mode": "async"},
                         bearer=token))["data"]
    await client.wait_for(lambda: any(e["type"] == "avatar_stop_talking"
                                      for e in heygen_events(client)))
    events = heygen_events(client)
    types = [e["type"] for e in events]
    assert types[0] == "avatar_start_talking"
    assert types[-2:] == ["avatar_end_message", "avatar_stop_talking"]
    assert {e["task_id"] for e in events} == {task["task_id"]}
    chunks = [e["message"] for e in events if e["type"] == "avatar_talking_message"]
    assert len(chunks) >= 3 and "".join(chunks) == text
    assert events[-1]["duration_ms"] == task["duration_ms"]
    assert client.peak_rms(since=spoke_at) > max(1000.0, 10 * quiet)  # audible speech

    # Interrupt cuts a long utterance short, with avatar_stop_talking.
    client.data.clear()
    long_text = "This sentence is long enough that it will still be playing when we interrupt it."
    task = (await heygen(sim, "task", {"session_id": session_id, "text": long_text,
                                       "task_mode": "async"}, bearer=token))["data"]
    await client.wait_for(lambda: any(e["type"] == "avatar_talking_message"
                                      for e in heygen_events(client)))
    await heygen(sim, "interrupt", {"session_id": session_id}, bearer=token)
    await client.wait_for(lambda: any(e["type"] == "avatar_stop_talking"
                                      for e in heygen_events(client)))
    stopped = heygen_events(client)[-1]
    assert stopped["task_id"] == task["task_id"]
    assert stopped["duration_ms"] < task["duration_ms"] / 2

    await heygen(sim, "stop", {"session_id": session_id}, bearer=token)
    await client.wait_for(lambda: bool(client.seen("disconnected")))
    [row] = (await ledger_json(sim))["sessions"]
    assert row["stop_reason"] == "stopped" and row["billed_seconds"] > 1.0


@needs_netns
async def test_talk_over_rest_and_over_livekit_data(sim: SimClient,
                                                   sdk_clients: list[SdkClient]) -> None:
    knowledge = "Our shop opens at nine. The sky is blue."
    data = await new_heygen_session(sim, start=True, knowledge_base=knowledge)
    session_id = data["session_id"]
    client = SdkClient(data["url"], data["access_token"])
    sdk_clients.append(client)
    await client.connect()

    def said() -> list[str]:
        return [e["message"] for e in heygen_events(client) if e["type"] == "avatar_end_message"]

    await heygen(sim, "task", {"session_id": session_id, "text": "When does the shop open?",
                               "task_type": "talk", "task_mode": "sync"})
    await client.wait_for(lambda: len(said()) == 1)
    assert said() == ["Our shop opens at nine."]
    # The SDK's LiveKit transport for talk: the text as a JSON string in a data packet.
    async with asyncio.timeout(20):
        await client.room.local_participant.publish_data(json.dumps("What colour is the sky?"))
    await client.wait_for(lambda: len(said()) == 2)
    assert said()[1] == "The sky is blue."
    await stop(sim, session_id)


@needs_netns
async def test_microphone_in_listening_mode_reports_user_start_and_stop(
        sim: SimClient, sdk_clients: list[SdkClient]) -> None:
    data = await new_heygen_session(sim, start=True)
    session_id = data["session_id"]
    client = SdkClient(data["url"], data["access_token"])
    sdk_clients.append(client)
    await client.connect()
    source = await client.publish_microphone()
    await heygen(sim, "start_listening", {"session_id": session_id})
    await feed(source, 0.3, 0.0)
    await feed(source, 0.8, 0.3)
    await feed(source, 1.2, 0.0)
    await client.wait_for(lambda: len(heygen_events(client)) >= 2)
    assert heygen_events(client)[:2] == [{"type": "user_start"}, {"type": "user_stop"}]
    room = (await session_info(sim, session_id))["room"]
    assert room["clients"] == ["client"] and room["mic_frames"] > 50 and room["mic_peak"] > 5000
    await stop(sim, session_id)


# -- the CLI ---------------------------------------------------------------------------------------


def test_cli_sim_prints_what_to_configure_and_stops_cleanly() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "sim", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "AVATAR_GATEWAY_SIM_CONCURRENCY_LIMIT": "2"})
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(5)]
        text = "".join(lines)
        base = f"http://127.0.0.1:{port}"
        assert base in lines[0]
        assert f"HeyGen API base:      {base}" in text and HEYGEN_KEY in text
        assert f"LiveAvatar API base:  {base}" in text and LIVEAVATAR_KEY in text
        assert f"ws://127.0.0.1:{port}" in text and f"{base}/sim/ledger" in text
        import urllib.request

        deadline = time.monotonic() + 20
        while True:
            request = urllib.request.Request(base + "/v1/streaming.create_token", data=b"{}",
                                             headers={"x-api-key": HEYGEN_KEY}, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    assert json.loads(response.read())["data"]["token"]
                break
            except OSError:
                assert time.monotonic() < deadline, "the simulator never answered"
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_sim_refuses_a_public_address() -> None:
    result = subprocess.run([sys.executable, "-m", "gateway", "sim", "--host", "0.0.0.0"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "ALLOW_PUBLIC" in result.stderr
