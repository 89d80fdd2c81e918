"""The seed server's JSON API on the gateway: every endpoint's status codes, JSON and errors."""

from __future__ import annotations

import asyncio
import collections
import copy
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from gateway.api.common import CHAT, PERSONAS, SESSIONS
from gateway.api.persona import SEED_SESSIONS, ice_servers
from gateway.app import create_app
from gateway.chat.persona import DEFAULT_PERSONA, Persona, PersonaStore

from .conftest import ClientFactory, make_settings

Client = TestClient[Any, Any]
PERSONA_KEYS = {"name", "title", "education", "technical", "personality", "traits"}


async def ok(response: Any, message: str | None = None) -> dict[str, Any]:
    assert response.status == 200, await response.text()
    assert response.content_type == "application/json"
    body: dict[str, Any] = await response.json()
    assert body["success"] is True
    if message is not None:
        assert body["message"] == message
    return body


async def seed_error(response: Any, status: int, code: str | None = None) -> str:
    """The seed's error envelope, exactly: ``{success: false, message, error}``."""
    assert response.status == status, await response.text()
    body = await response.json()
    assert set(body) == {"success", "message", "error"}, body
    assert body["success"] is False
    assert isinstance(body["message"], str) and body["message"]
    # "Detailed error information": our error code, then the message.
    assert body["error"] == f"{code or body['error'].split(':')[0]}: {body['message']}", body
    return str(body["message"])


def another_persona() -> dict[str, Any]:
    return {
        "name": "Sam Okafor",
        "title": "Frontend Developer",
        "education": {"degree": "M.Sc. Human-Computer Interaction", "year": "expected 2026",
                      "institution": "TU Delft"},
        "technical": {"languages": ["TypeScript", "Rust"], "webStack": ["Svelte", "Deno"],
                      "projects": ["An accessible color picker"]},
        "personality": {"style": "Calm and precise", "interests": ["typography"],
                        "goals": ["ship a design system"]},
        "traits": ["thoughtful"],
    }


# -- persona ---------------------------------------------------------------------------------------

async def test_get_persona_and_config_return_the_default(client: Client) -> None:
    for path in ("/persona", "/persona/config"):
        response = await client.get(path)
        assert response.status == 200
        body = await response.json()
        assert set(body) == PERSONA_KEYS
        assert body == DEFAULT_PERSONA.to_dict()
        assert set(body["education"]) == {"degree", "year", "institution"}
        assert set(body["technical"]) == {"languages", "webStack", "projects"}
        assert set(body["personality"]) == {"style", "interests", "goals"}
        assert all(isinstance(t, str) for t in body["traits"])


async def test_post_persona_updates_name_title_and_part_of_education(client: Client) -> None:
    response = await client.post("/persona", json={"name": "  Jordan Lee ", "title": "Staff Engineer",
                                                   "education": {"year": "2012"}})
    body = await ok(response, "Persona details updated successfully")
    assert set(body) == {"success", "message", "persona"}
    persona = body["persona"]
    assert (persona["name"], persona["title"]) == ("Jordan Lee", "Staff Engineer")
    assert persona["education"] == {**DEFAULT_PERSONA.to_dict()["education"], "year": "2012"}
    assert persona["technical"] == DEFAULT_PERSONA.to_dict()["technical"]
    assert await (await client.get("/persona")).json() == persona


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, "nothing to update"),
        ({"name": 5}, "'name' must be a string"),
        ({"name": "   "}, "'name' must not be empty"),
        ({"name": "x" * 201}, "'name' is longer than 200"),
        ({"traits": ["x"]}, "unknown field(s) 'traits'"),
        ({"education": "MIT"}, "'education' must be an object"),
        ({"education": {"year": True}}, "'education.year' must be a string"),
        ({"education": {"year": 2016}}, "'education.year' must be a string (e.g. \"2016\")"),
        ({"education": {"year": "x" * 41}}, "'education.year' is longer than 40"),
        ({"education": {"school": "MIT"}}, "'education.school'"),
    ],
)
async def test_post_persona_rejects_bad_details(client: Client, body: dict[str, Any],
                                               needle: str) -> None:
    message = await seed_error(await client.post("/persona", json=body), 400, "bad_request")
    assert needle in message
    assert await (await client.get("/persona")).json() == DEFAULT_PERSONA.to_dict()


async def test_bodies_that_are_not_json_objects(client: Client) -> None:
    for path in ("/persona", "/persona/update", "/persona/heygen/text", "/openai/complete"):
        not_json = await client.post(path, data=b"{nope", headers={"Content-Type": "application/json"})
        assert "not valid JSON" in await seed_error(not_json, 400, "bad_request")
        array = await client.post(path, json=[1, 2])
        assert "must be a JSON object" in await seed_error(array, 400)
        empty = await client.post(path)
        assert "must be a JSON object" in await seed_error(empty, 400)
    wrong_type = await client.post("/persona", data=b"name=x",
                                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    await seed_error(wrong_type, 415, "unsupported_media_type")


async def test_post_persona_update_replaces_the_configuration(client: Client) -> None:
    new = another_persona()
    body = await ok(await client.post("/persona/update", json=new),
                    "Persona configuration updated successfully")
    assert set(body) == {"success", "message", "data"}
    assert body["data"] == new
    assert await (await client.get("/persona/config")).json() == new
    # The same configuration wrapped, as some clients send it.
    new["name"] = "Sam O."
    wrapped = await ok(await client.post("/persona/update", json={"persona": new}))
    assert wrapped["data"]["name"] == "Sam O."


def _without(data: dict[str, Any], dotted: str) -> dict[str, Any]:
    out = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    target = out
    for key in parents:
        target = target[key]
    del target[last]
    return out


def _with(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    target = out
    for key in parents:
        target = target[key]
    target[last] = value
    return out


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda p: _without(p, "technical"), "'technical' must be an object"),
        (lambda p: _without(p, "traits"), "'traits' is required"),
        (lambda p: _without(p, "education.institution"), "'education.institution' is required"),
        (lambda p: _with(p, "technical.languages", "Python"),
         "'technical.languages' must be a list of strings"),
        (lambda p: _with(p, "technical.webStack", ["React", 3]),
         "'technical.webStack[1]' must be a string"),
        (lambda p: _with(p, "technical.frameworks", []), "'technical.frameworks'"),
        (lambda p: _with(p, "personality.goals", ["g"] * 51), "more than 50 items"),
        (lambda p: _with(p, "avatar", "x"), "unknown field(s) 'avatar'"),
    ],
)
async def test_post_persona_update_rejects_bad_configurations(client: Client, mutate: Any,
                                                              needle: str) -> None:
    response = await client.post("/persona/update", json=mutate(another_persona()))
    assert needle in await seed_error(response, 400, "bad_request")
    assert await (await client.get("/persona")).json() == DEFAULT_PERSONA.to_dict()


async def test_persona_survives_a_restart(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    settings = make_settings(persona_db=str(tmp_path / "personas" / "p.sqlite3"))
    first = await aiohttp_client(create_app(settings))
    await ok(await first.post("/persona/update", json=another_persona()))
    await first.close()
    second = await aiohttp_client(create_app(settings))
    assert await (await second.get("/persona")).json() == another_persona()
    assert (tmp_path / "personas" / "p.sqlite3").exists()


async def test_concurrent_updates_never_lose_a_change(client: Client) -> None:
    """Partial updates merge inside one write transaction: none overwrites another's field."""
    bodies: list[dict[str, Any]] = []
    for i in range(4):
        bodies += [{"name": f"N{i}"}, {"title": f"T{i}"}, {"education": {"degree": f"D{i}"}},
                   {"education": {"year": str(2001 + i)}},
                   {"education": {"institution": f"I{i}"}}]
    responses = await asyncio.gather(*(client.post("/persona", json=b) for b in bodies))
    assert [r.status for r in responses] == [200] * len(bodies)
    final = await (await client.get("/persona")).json()
    assert final["name"].startswith("N") and final["title"].startswith("T")
    education = final["education"]
    assert education["degree"].startswith("D") and education["institution"].startswith("I")
    assert education["year"] in {"2001", "2002", "2003", "2004"}
    assert await client.app[PERSONAS].revision() == 1 + len(bodies)


async def test_two_stores_on_one_file_serialize_their_writes(tmp_path: Path) -> None:
    """Two stores (as two gateway processes would) updating one file: every change lands."""
    path = tmp_path / "shared.sqlite3"
    stores = [PersonaStore(path), PersonaStore(path)]
    await asyncio.gather(*(store.open() for store in stores))
    try:
        updates = [stores[i % 2].update_details({"name": f"name {i}"} if i % 3 == 0 else
                                                {"title": f"title {i}"} if i % 3 == 1 else
                                                {"education": {"year": str(1990 + i)}})
                   for i in range(30)]
        await asyncio.gather(*updates)
        final = await stores[0].get()
        assert await stores[1].get() == final
        assert await stores[0].revision() == 31
        assert final.name.startswith("name ") and final.title.startswith("title ")
        assert isinstance(final.education.year, str) and int(final.education.year) >= 1990
    finally:
        for store in stores:
            await store.close()


async def test_a_stored_numeric_year_reads_back_as_a_string(tmp_path: Path) -> None:
    """A persona written while ``education.year`` could be a number still loads, as the seed's
    string type."""
    path = tmp_path / "old.sqlite3"
    store = PersonaStore(path)
    await store.open()
    await store.close()
    old = DEFAULT_PERSONA.to_dict()
    old["education"]["year"] = 2014
    with sqlite3.connect(path) as db:
        db.execute("UPDATE persona SET body = ? WHERE id = 1", (json.dumps(old),))
    db.close()
    store = PersonaStore(path)
    try:
        assert (await store.get()).to_dict()["education"]["year"] == "2014"
        updated = await store.update_details({"name": "Kim"})
        assert updated.education.year == "2014"
    finally:
        await store.close()


def test_persona_round_trips_through_json() -> None:
    data = another_persona()
    assert Persona.from_dict(json.loads(json.dumps(data))).to_dict() == data


# -- HeyGen v1 style sessions ------------------------------------------------------------------

async def test_init_gives_a_welcome_line_in_the_personas_voice(client: Client) -> None:
    body = await ok(await client.post("/persona/heygen/init"), "Bot initialized successfully")
    assert set(body) == {"success", "message", "data"}
    assert DEFAULT_PERSONA.name in body["data"]["text"]
    await ok(await client.post("/persona", json={"name": "Robin"}))
    body = await ok(await client.post("/persona/heygen/init", json={}))
    assert "Robin" in body["data"]["text"]


async def test_seed_session_create_text_stop_contract(client: Client) -> None:
    created = await ok(await client.post("/persona/heygen/session/create",
                                         json={"avatar_name": "Wayne_20240711",
                                               "voice_id": "1bd001e7e50f421d891986aad5158bc8"}),
                       "Session created successfully")
    data = created["data"]
    session_id = data["session_id"]
    assert data["sdp"]["type"] == "offer" and data["sdp"]["sdp"].startswith("v=0")
    assert "webrtc-datachannel" in data["sdp"]["sdp"]
    assert data["ice_servers2"] == [] and data["ice_servers"] == []
    assert data["upstream"] == "local"
    assert client.app[SESSIONS].get(session_id).viewer_count == 1
    assert session_id in client.app[SEED_SESSIONS]

    spoken = await ok(await client.post("/persona/heygen/text", json={
        "session_id": session_id, "text": "Hello there."}), "Text sent successfully")
    # The seed types ai_response as a string: empty when no answer was asked for.
    assert spoken["ai_response"] == "" and spoken["data"]["ai_response"] == ""
    assert spoken["speaking_duration"] > 0.3
    assert spoken["data"]["speaking_duration"] == spoken["speaking_duration"]
    assert len(spoken["data"]["task_ids"]) == 1

    answered = await ok(await client.post("/persona/heygen/text", json={
        "session_id": session_id, "text": "Where did you study?", "generate_ai_response": True}))
    # Spoken, so without the "[offline]" label: data.offline says it instead.
    assert "[offline]" not in answered["ai_response"]
    assert "University of Washington" in answered["ai_response"]
    assert answered["data"]["offline"] is True
    assert answered["speaking_duration"] > 1.0
    assert client.app[CHAT].history(session_id)[-1]["content"] == answered["ai_response"]

    stopped = await ok(await client.post("/persona/heygen/session/stop",
                                         json={"session_id": session_id}),
                       "Session stopped successfully")
    assert stopped["data"] == {"session_id": session_id}
    assert len(client.app[SESSIONS]) == 0 and session_id not in client.app[SEED_SESSIONS]
    assert client.app[CHAT].history(session_id) == []
    gone_bodies: list[tuple[str, dict[str, Any]]] = [
        ("/persona/heygen/session/stop", {}), ("/persona/heygen/text", {"text": "hi"}),
        ("/persona/heygen/session/start", {"sdp": "v=0"}),
        ("/persona/heygen/ice", {"candidate": {"candidate": ""}})]
    for path, body in gone_bodies:
        gone = await client.post(path, json={"session_id": session_id, **body})
        assert "no session" in await seed_error(gone, 404, "not_found")


async def test_seed_session_parameter_errors(client: Client) -> None:
    created = await ok(await client.post("/persona/heygen/session/create"))
    sid = created["data"]["session_id"]
    bad: list[tuple[str, dict[str, Any], str]] = [
        ("/persona/heygen/session/create", {"avatar_name": 7}, "'avatar_name' must be a string"),
        ("/persona/heygen/session/create", {"quality": "8k"}, "quality must be one of"),
        ("/persona/heygen/session/start", {"sdp": "v=0"}, "'session_id' is required"),
        ("/persona/heygen/session/start", {"session_id": sid}, "'sdp' is required"),
        ("/persona/heygen/session/start", {"session_id": sid, "sdp": {"type": "offer", "sdp": "v=0"}},
         "'sdp.type' must be 'answer'"),
        ("/persona/heygen/session/start", {"session_id": sid, "sdp": {"type": "answer"}},
         "'sdp.sdp' is required"),
        ("/persona/heygen/session/start", {"session_id": sid, "sdp": 5}, "'sdp' must be a string"),
        ("/persona/heygen/session/start", {"session_id": sid, "sdp": "hello"}, "must start with 'v=0'"),
        ("/persona/heygen/ice", {"session_id": sid}, "'candidate' is required"),
        ("/persona/heygen/ice", {"session_id": sid, "candidate": {"sdpMid": "0"}},
         "'candidate.candidate' must be a string"),
        ("/persona/heygen/ice", {"session_id": sid, "candidate": {"candidate": "candidate:1 2"}},
         "malformed candidate"),
        ("/persona/heygen/ice", {"session_id": sid, "candidate": {
            "candidate": "candidate:1 1 udp 2122260223 10.0.0.1 70000 typ host"}}, "not a usable"),
        ("/persona/heygen/ice", {"session_id": sid, "candidate": {
            "candidate": "candidate:1 1 udp 1 10.0.0.1 5000 typ host", "sdpMLineIndex": -1}},
         "'candidate.sdpMLineIndex'"),
        ("/persona/heygen/ice", {"session_id": sid, "candidate": {
            "candidate": "candidate:1 1 udp 1 10.0.0.1 5000 typ host\r\na=ice-ufrag:x"}},
         "single candidate line"),
        ("/persona/heygen/text", {"session_id": sid}, "'text' is required"),
        ("/persona/heygen/text", {"session_id": sid, "text": "  "}, "'text' is empty"),
        ("/persona/heygen/text", {"session_id": sid, "text": "x" * 5001}, "longer than 5000"),
        ("/persona/heygen/text", {"session_id": sid, "text": "hi", "generate_ai_response": "yes"},
         "'generate_ai_response' must be true or false"),
        ("/persona/heygen/session/stop", {}, "'session_id' is required"),
        ("/persona/heygen/session/stop", {"session_id": 12}, "'session_id' must be a string"),
    ]
    for path, body, needle in bad:
        message = await seed_error(await client.post(path, json=body), 400, None)
        assert needle in message, (path, body, message)
    # A well-formed candidate for a live session is accepted (trickle before the answer is fine).
    await ok(await client.post("/persona/heygen/ice", json={"session_id": sid, "candidate": {
        "candidate": "candidate:1 1 udp 2122260223 10.203.0.9 50000 typ host", "sdpMid": "0",
        "sdpMLineIndex": 0}}), "ICE candidate handled successfully")
    for path in ("/persona/heygen/session/start", "/persona/heygen/ice", "/persona/heygen/text",
                 "/persona/heygen/session/stop"):
        unknown = await client.post(path, json={"session_id": "nope", "text": "hi", "sdp": "v=0",
                                                "candidate": {"candidate": ""}})
        await seed_error(unknown, 404, "not_found")
    await ok(await client.post("/persona/heygen/session/stop", json={"session_id": sid}))
    assert len(client.app[SESSIONS]) == 0


async def test_broken_answers_and_candidates_are_4xx_never_5xx(client: Client) -> None:
    """A real browser answer cut short at every line, or missing any one line: never a 5xx."""
    browsers: list[RTCPeerConnection] = []

    async def fresh() -> tuple[str, str]:
        created = await ok(await client.post("/persona/heygen/session/create"))
        browser = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        browsers.append(browser)
        await browser.setRemoteDescription(RTCSessionDescription(
            sdp=created["data"]["sdp"]["sdp"], type="offer"))
        await browser.setLocalDescription(await browser.createAnswer())
        return created["data"]["session_id"], browser.localDescription.sdp

    try:
        session_id, answer = await fresh()
        lines = answer.splitlines()
        variants = ["\r\n".join(lines[:n]) + "\r\n" for n in range(1, len(lines))]
        variants += ["\r\n".join(lines[:i] + lines[i + 1:]) + "\r\n" for i in range(len(lines))]
        statuses: collections.Counter[int] = collections.Counter()
        for variant in variants:
            response = await client.post("/persona/heygen/session/start",
                                         json={"session_id": session_id, "sdp": variant})
            statuses[response.status] += 1
            assert response.status < 500, (variant, await response.text())
            if response.status == 200:
                await client.post("/persona/heygen/session/stop", json={"session_id": session_id})
                session_id, answer = await fresh()
        assert statuses[400] > len(variants) // 2
        for bad in ("candidate:1 1 udp 1 10.0.0.1 5000 typ weird",
                    "candidate:1 1 udp 0 10.0.0.1 5000 typ host",
                    "candidate:1 3 udp 1 10.0.0.1 5000 typ host",
                    "candidate:1 1 sctp 1 10.0.0.1 5000 typ host"):
            response = await client.post("/persona/heygen/ice", json={
                "session_id": session_id, "candidate": {"candidate": bad, "sdpMid": "0"}})
            assert "not a usable candidate" in await seed_error(response, 400, "bad_request")
    finally:
        for browser in browsers:
            await browser.close()
        for seed in client.app[SESSIONS].list():
            await seed.close("test_done")


def test_ice_servers_come_from_the_settings() -> None:
    settings = make_settings(ice_servers=("stun:stun.example.org:3478", "turn:turn.example.org"),
                             ice_username="user", ice_credential="pass")
    assert ice_servers(settings) == [
        {"urls": ["stun:stun.example.org:3478"]},
        {"urls": ["turn:turn.example.org"], "username": "user", "credential": "pass",
         "credentialType": "password"},
    ]
    assert ice_servers(make_settings()) == []


# -- chat ------------------------------------------------------------------------------------------

async def test_openai_init_and_complete_offline(client: Client) -> None:
    init = await client.post("/openai")
    body = await ok(init, "AI service initialized successfully")
    assert set(body) == {"success", "message", "text"}
    assert DEFAULT_PERSONA.name in body["text"]
    complete = await ok(await client.post("/openai/complete", json={
        "prompt": "What languages do you write?", "session_id": "chat-1"}),
        "AI response generated successfully")
    assert set(complete) == {"success", "message", "text"}
    assert complete["text"].startswith("[offline] ")
    assert "Python" in complete["text"]
    assert len(client.app[CHAT].history("chat-1")) == 2


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, "'prompt' is required"),
        ({"prompt": 3}, "'prompt' must be a string"),
        ({"prompt": " "}, "'prompt' is empty"),
        ({"prompt": "x" * 5001}, "longer than 5000"),
        ({"prompt": "hi", "session_id": "x" * 129}, "'session_id' must be 1 to 128"),
    ],
)
async def test_openai_complete_rejects_bad_prompts(client: Client, body: dict[str, Any],
                                                   needle: str) -> None:
    assert needle in await seed_error(await client.post("/openai/complete", json=body), 400)


# -- the envelope, CORS, auth ------------------------------------------------------------------

async def test_unknown_paths_and_methods_use_the_seed_envelope(client: Client) -> None:
    await seed_error(await client.get("/persona/nope"), 404)
    await seed_error(await client.get("/openai/complete"), 405)
    await seed_error(await client.put("/persona", json={}), 405)


async def test_cors_on_the_seed_api(aiohttp_client: ClientFactory) -> None:
    open_client = await aiohttp_client(create_app(make_settings()))
    preflight = await open_client.options("/persona/heygen/text", headers={
        "Origin": "https://demo.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    response = await open_client.get("/persona", headers={"Origin": "https://demo.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "*"

    restricted = await aiohttp_client(create_app(make_settings(
        cors_origins=("https://app.example",))))
    allowed = await restricted.get("/persona", headers={"Origin": "https://app.example"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
    refused = await restricted.get("/persona", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in refused.headers


async def test_token_protects_the_seed_api(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app(make_settings(api_token="s3cret-token")))
    await seed_error(await client.get("/persona"), 401, "unauthorized")
    await seed_error(await client.post("/openai/complete", json={"prompt": "hi"}), 401)
    authorized = await client.get("/persona", headers={"Authorization": "Bearer s3cret-token"})
    assert authorized.status == 200
