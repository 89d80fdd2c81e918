"""The operator's LiveKit (the simulator's LiveKit server) and a gateway configured to publish
into it: the ``livekit`` distribution's test stand."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.app import create_app
from gateway.sim.livekit import LiveKitServer

from .conftest import make_settings

Client = TestClient[Any, Any]
CONTROLLER = "ctl-token"
"""The gateway's API token in these tests: every request of the test client carries it."""
KEY = "operator-key"
SECRET = "operator-secret-at-least-32-characters"


@dataclass
class OperatorLiveKit:
    server: LiveKitServer
    http: TestServer

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.http.port}"


@pytest.fixture
async def operator_livekit(aiohttp_server: AiohttpServer) -> AsyncIterator[OperatorLiveKit]:
    server = LiveKitServer(api_key=KEY, api_secret=SECRET)
    app = web.Application()
    server.add_routes(app)
    yield OperatorLiveKit(server, await aiohttp_server(app))
    await server.close()


@pytest.fixture
async def livekit_gateway(aiohttp_client: AiohttpClient,
                          operator_livekit: OperatorLiveKit) -> Client:
    settings = make_settings(livekit_url=operator_livekit.url, livekit_api_key=KEY,
                             livekit_api_secret=SECRET, api_token=CONTROLLER)
    return await aiohttp_client(create_app(settings),
                                headers={"Authorization": f"Bearer {CONTROLLER}"})


async def livekit_session(gateway: Client) -> dict[str, Any]:
    response = await gateway.post("/v1/sessions", json={"upstream": "local", "quality": "low",
                                                         "distribution": "livekit"})
    body: dict[str, Any] = await response.json()
    assert response.status == 201, body
    return body
