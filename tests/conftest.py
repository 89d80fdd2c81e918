from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.config import Settings
from gateway.viewers.peer import configure_ice_host_addresses

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]

IN_NETNS = os.environ.get("AVATAR_GATEWAY_TEST_NETNS") == "1"


@pytest.fixture(autouse=True)
def _network_rule() -> None:
    """Outside the test namespace (``make test`` creates one), pin ICE to loopback so a
    bare ``pytest`` run never sends WebRTC traffic over the host's real interfaces."""
    if not IN_NETNS:
        configure_ice_host_addresses(["127.0.0.1"])


def make_settings(**overrides: Any) -> Settings:
    # No rate limit unless a test is about it: the suite's own bursts are not what it guards.
    base: dict[str, Any] = {"default_quality": "low", "keyframe_interval": 2.0, "rate_limit": 0.0,
                            "state_dir": tempfile.mkdtemp(prefix="avatar-gateway-test-")}
    base.update(overrides)
    return Settings.from_env({}, **base)


@pytest.fixture
def settings() -> Settings:
    return make_settings()


@pytest.fixture
async def app(settings: Settings) -> web.Application:
    return create_app(settings)


@pytest.fixture
async def client(aiohttp_client: ClientFactory, app: web.Application) -> TestClient[Any, Any]:
    return await aiohttp_client(app)


@pytest.fixture
async def session_id(client: TestClient[Any, Any]) -> AsyncIterator[str]:
    response = await client.post("/v1/sessions", json={"upstream": "local"})
    assert response.status == 201, await response.text()
    data = await response.json()
    yield str(data["id"])


# The gateway + simulator rig for the cloud-upstream tests.
from .cloud_rig import gateway_overrides, rig  # noqa: E402, F401
