"""Provider answers the gateway cannot use (an HTML error page, the wrong JSON shape, missing
fields, bad bytes, a huge body) are a clear 502/503 with a message to the gateway's client,
never a 500; a session the provider opened before answering badly is stopped. LiveAvatar and
HeyGen share the REST client (``gateway/upstream/rest.py``); a fake provider on loopback
plays the bad answers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.app import create_app

from .conftest import make_settings

Client = TestClient[Any, Any]

HTML = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
OK_TOKEN = {"code": 1000, "message": "success",
            "data": {"session_id": "la-1", "session_token": "la-token"}}
OK_START = {"code": 1000, "message": "success",
            "data": {"session_id": "la-1", "livekit_url": "ws://127.0.0.1:9/",
                     "livekit_client_token": "lk-client", "max_session_duration": 600}}


@dataclass
class FakeProvider:
    """Answers each path with what a test set, and records every request."""

    answers: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    requests: list[tuple[str, Any]] = field(default_factory=list)

    def set(self, path: str, status: int, body: Any) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.answers[path] = (status, raw)

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.requests.append((request.path, json.loads(raw) if raw else None))
        status, body = self.answers.get(request.path, (200, b'{"code": 1000, "data": null}'))
        content_type = "text/html" if body.startswith(b"<") else "application/json"
        return web.Response(status=status, body=body, content_type=content_type)

    def called(self, path: str) -> list[Any]:
        return [body for p, body in self.requests if p == path]


@pytest.fixture
async def provider(aiohttp_server: AiohttpServer) -> FakeProvider:
    fake = FakeProvider()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    server = await aiohttp_server(app)
    fake.base = str(server.make_url("")).rstrip("/")  # type: ignore[attr-defined]
    return fake


async def gateway(aiohttp_client: AiohttpClient, provider: FakeProvider,
                  **overrides: Any) -> Client:
    base: str = provider.base  # type: ignore[attr-defined]
    settings = make_settings(liveavatar_api_key="la-key", liveavatar_base_url=base,
                             heygen_api_key="hg-key", heygen_base_url=base,
                             upstream_timeout=3.0, reconnect_ready_within=2.0, **overrides)
    return await aiohttp_client(create_app(settings))


async def create(client: Client, upstream: str) -> tuple[int, str]:
    response = await client.post("/v1/sessions", json={"upstream": upstream})
    body = await response.json()
    assert set(body) == {"error"}, body
    message: str = body["error"]["message"]
    return response.status, message


@pytest.mark.parametrize(("status", "body", "expected", "words"), [
    (200, HTML, 502, "unreadable response (HTTP 200): '<html>"),
    (502, HTML, 503, "failed (HTTP 502"),
    (200, b"", 502, "no 'session_id'"),
    (200, b"\xff\xfe\x00{not json", 502, "unreadable response"),
    (200, [1, 2], 502, "unreadable response"),
    (200, {"code": 1000, "data": [1]}, 502, "no 'session_id'"),
    (200, {"code": 1000, "data": "la-1"}, 502, "no 'session_id'"),
    (200, {"code": 1000, "data": {"session_id": "la-1"}}, 502, "no 'session_token'"),
    (200, {"code": 1000, "data": {"session_id": 7, "session_token": None}}, 502, "no 'session_id'"),
    (200, {"code": 4001, "message": "Avatar not found"}, 502, "Avatar not found"),
    (422, {"detail": [{"type": "missing", "loc": ["body", "mode"], "msg": "Field required"}]},
     502, "Field required"),
    (200, b"{" + b" " * (2 << 20) + b"}", 502, "larger than"),
])
async def test_unusable_liveavatar_token_answers(aiohttp_client: AiohttpClient,
                                                 provider: FakeProvider, status: int, body: Any,
                                                 expected: int, words: str) -> None:
    provider.set("/v1/sessions/token", status, body)
    client = await gateway(aiohttp_client, provider)
    got, message = await create(client, "liveavatar")
    assert got == expected and words in message and "liveavatar" in message, (got, message)
    assert (await (await client.get("/v1/sessions")).json())["sessions"] == []


@pytest.mark.parametrize(("data", "words"), [
    ({"livekit_url": 5, "livekit_client_token": "lk"}, "no 'livekit_url'"),
    ({"livekit_url": "ws://x/", "livekit_agent_token": "lk-agent"}, "no 'livekit_client_token'"),
    (None, "no 'livekit_url'"),
])
async def test_an_unusable_start_answer_stops_the_session(aiohttp_client: AiohttpClient,
                                                          provider: FakeProvider,
                                                          data: Any, words: str) -> None:
    provider.set("/v1/sessions/token", 200, OK_TOKEN)
    provider.set("/v1/sessions/start", 201, {"code": 1000, "message": "success", "data": data})
    client = await gateway(aiohttp_client, provider)
    got, message = await create(client, "liveavatar")
    assert got == 502 and words in message, (got, message)
    # The token opened a session at the provider: the gateway closed it again.
    assert provider.called("/v1/sessions/stop") == [
        {"session_id": "la-1", "reason": "USER_DISCONNECTED"}]


async def test_a_lite_session_without_a_websocket_is_refused_and_stopped(
        aiohttp_client: AiohttpClient, provider: FakeProvider) -> None:
    provider.set("/v1/sessions/token", 200, OK_TOKEN)
    provider.set("/v1/sessions/start", 201, OK_START)  # no ws_url
    client = await gateway(aiohttp_client, provider, liveavatar_mode="lite")
    got, message = await create(client, "liveavatar")
    assert got == 503 and "without a ws_url" in message, (got, message)
    assert provider.called("/v1/sessions/token")[0]["mode"] == "LITE"
    assert len(provider.called("/v1/sessions/stop")) == 1


async def test_a_room_that_cannot_be_joined_is_a_503_and_the_session_is_stopped(
        aiohttp_client: AiohttpClient, provider: FakeProvider) -> None:
    provider.set("/v1/sessions/token", 200, OK_TOKEN)
    provider.set("/v1/sessions/start", 201, {**OK_START, "data": {
        **OK_START["data"], "livekit_url": "not a url"}})  # type: ignore[dict-item]
    client = await gateway(aiohttp_client, provider)
    got, message = await create(client, "liveavatar")
    assert got == 503 and "LiveKit room" in message, (got, message)
    assert len(provider.called("/v1/sessions/stop")) == 1


@pytest.mark.parametrize(("status", "body", "expected", "words"), [
    (200, HTML, 502, "unreadable response"),
    (500, HTML, 503, "failed (HTTP 500"),
    (200, {"code": 100, "data": {"url": "ws://x/"}}, 502, "no 'session_id'"),
    (200, {"code": 100, "data": None}, 502, "no 'session_id'"),
    (400, {"code": 400112, "message": "Unauthorized"}, 502, "Unauthorized"),
])
async def test_unusable_heygen_answers(aiohttp_client: AiohttpClient, provider: FakeProvider,
                                       status: int, body: Any, expected: int,
                                       words: str) -> None:
    provider.set("/v1/streaming.new", status, body)
    client = await gateway(aiohttp_client, provider)
    got, message = await create(client, "heygen")
    assert got == expected and words in message and "heygen" in message, (got, message)
    assert provider.called("/v1/streaming.stop") == []


async def test_a_heygen_session_without_room_credentials_is_stopped(
        aiohttp_client: AiohttpClient, provider: FakeProvider) -> None:
    provider.set("/v1/streaming.new", 200, {"code": 100, "data": {
        "session_id": "hg-1", "url": "wss://x/", "livekit_agent_token": "agent-only"}})
    client = await gateway(aiohttp_client, provider)
    got, message = await create(client, "heygen")
    assert got == 502 and "no 'access_token'" in message, (got, message)
    assert provider.called("/v1/streaming.stop") == [{"session_id": "hg-1"}]


async def test_a_lite_websocket_that_refuses_is_a_503_without_its_secret(
        aiohttp_client: AiohttpClient, provider: FakeProvider) -> None:
    base: str = provider.base  # type: ignore[attr-defined]
    ws_url = base.replace("http", "ws", 1) + "/v1/sessions/ws?token=ws-secret-123"
    provider.set("/v1/sessions/token", 200, OK_TOKEN)
    provider.set("/v1/sessions/start", 201, {**OK_START, "data": {
        **OK_START["data"], "ws_url": ws_url}})  # type: ignore[dict-item]
    provider.set("/v1/sessions/ws", 403, {"code": 4003, "message": "Not authenticated"})
    client = await gateway(aiohttp_client, provider, liveavatar_mode="lite")
    got, message = await create(client, "liveavatar")
    assert got == 503 and "refused the connection (HTTP 403)" in message, (got, message)
    assert "ws-secret-123" not in message
    assert len(provider.called("/v1/sessions/stop")) == 1
