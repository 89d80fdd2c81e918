"""Fixtures for the simulator's REST emulations (HeyGen, LiveAvatar), ledger and faults.

Test modules import what they use (``tests/sim/conftest.py`` belongs to the LiveKit tests) and
declare ``pytestmark = pytest.mark.usefixtures("nothing_left_open")``: every test must end
with zero open sessions in the ledger, checked *before* the simulator shuts down (which would
close them and hide a leak).

Settings per test: ``@pytest.mark.parametrize("sim_settings", [{...}], indirect=True)``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp import ClientTimeout, web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from gateway.sim.app import create_sim_app
from gateway.sim.config import SimSettings
from gateway.sim.ledger import Ledger
from tests.conftest import IN_NETNS

from .sdk_client import SdkClient

HEYGEN_KEY = "sim-heygen-key"
LIVEAVATAR_KEY = "sim-liveavatar-key"

needs_netns = pytest.mark.skipif(
    not IN_NETNS, reason="WebRTC with the livekit SDK needs the private network namespace: "
                         "run tests/netns.sh .venv/bin/python -m pytest tests/sim")


def make_sim_settings(**overrides: Any) -> SimSettings:
    return SimSettings.from_env({}, **overrides)


@pytest.fixture
def sim_settings(request: pytest.FixtureRequest) -> SimSettings:
    return make_sim_settings(**getattr(request, "param", {}))


@pytest.fixture
def ledger() -> Iterator[Ledger]:
    """Owned by the test, so it can still be read after the simulator shut down."""
    ledger = Ledger(":memory:")
    yield ledger
    ledger.close()


@pytest.fixture
async def sim_app(sim_settings: SimSettings, ledger: Ledger) -> web.Application:
    return create_sim_app(sim_settings, ledger=ledger)


SimClient = TestClient[web.Request, web.Application]


@pytest.fixture
async def sim(sim_app: web.Application, aiohttp_client: AiohttpClient) -> SimClient:
    # sim_app (and the ledger) first: the client, torn down first, shuts the simulator down
    # while the ledger is still open to record it.
    return await aiohttp_client(sim_app)


@pytest.fixture
async def nothing_left_open(sim: SimClient, ledger: Ledger) -> AsyncIterator[None]:
    yield
    left = [(e.provider, e.session_id, e.started_at is not None) for e in ledger.entries(open_only=True)]
    assert not left, f"sessions left open at the end of the test: {left}"
    if not sim.server.closed:
        response = await sim.get("/sim/ledger")
        assert (await response.json())["open"] == 0


@pytest.fixture
async def sdk_clients() -> AsyncIterator[list[SdkClient]]:
    """Append every :class:`SdkClient` a test connects; they are disconnected at teardown,
    before the simulator shuts down."""
    clients: list[SdkClient] = []
    yield clients
    for client in clients:
        await client.close()


async def call(sim: SimClient, method: str, path: str, body: Any = None, *,
               key: str | None = None, lakey: str | None = None, bearer: str | None = None,
               timeout: float = 30.0) -> tuple[int, Any]:
    """One provider request: ``key`` -> ``x-api-key`` (HeyGen), ``lakey`` -> ``X-API-KEY``
    (LiveAvatar), ``bearer`` -> ``Authorization: Bearer``. Returns (status, JSON body)."""
    headers: dict[str, str] = {}
    if key is not None:
        headers["x-api-key"] = key
    if lakey is not None:
        headers["X-API-KEY"] = lakey
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    data = json.dumps(body) if body is not None else None
    if data is not None:
        headers["Content-Type"] = "application/json"
    response = await sim.request(method, path, data=data, headers=headers,
                                 timeout=ClientTimeout(total=timeout))
    text = await response.text()
    return response.status, json.loads(text) if text else None


async def heygen(sim: SimClient, action: str, body: Any = None, *, key: str | None = HEYGEN_KEY,
                 bearer: str | None = None, expect: int | None = 200,
                 timeout: float = 30.0) -> Any:
    """``POST /v1/streaming.<action>``; asserts ``expect`` (and code 100 on 200)."""
    status, payload = await call(sim, "POST", f"/v1/streaming.{action}", body,
                                 key=None if bearer is not None else key, bearer=bearer,
                                 timeout=timeout)
    if expect is not None:
        assert status == expect, (action, status, payload)
        if status == 200 and action != "create_token":
            assert payload["code"] == 100 and payload["message"] == "success", payload
    return payload


async def new_heygen_session(sim: SimClient, *, start: bool = False, **fields: Any) -> dict[str, Any]:
    body = {"version": "v2", "quality": "low", **fields}
    data: dict[str, Any] = (await heygen(sim, "new", body))["data"]
    if start:
        await heygen(sim, "start", {"session_id": data["session_id"]})
    return data


LIVEAVATAR_OK = 1000
"""LiveAvatar's success code: what its web SDK accepts (``SUCCESS_CODE``), not the docs' 100."""
SUCCESS = -1
"""``expect`` default of :func:`liveavatar`: the action's success status (201 for start)."""


async def liveavatar(sim: SimClient, action: str, body: Any = None, *,
                     lakey: str | None = None, bearer: str | None = None,
                     expect: int | None = SUCCESS, timeout: float = 30.0) -> Any:
    """``POST /v1/sessions/<action>``; asserts ``expect`` (default: success, 201 for start,
    200 otherwise) and, on success, the envelope ``{"code": 1000, "message": "success"}``."""
    status, payload = await call(sim, "POST", f"/v1/sessions/{action}", body, lakey=lakey,
                                 bearer=bearer, timeout=timeout)
    if expect == SUCCESS:
        expect = 201 if action == "start" else 200
    if expect is not None:
        assert status == expect, (action, status, payload)
        if status in (200, 201):
            assert payload["code"] == LIVEAVATAR_OK and payload["message"] == "success", payload
    return payload


async def liveavatar_token(sim: SimClient, *, mode: str = "FULL", **fields: Any) -> dict[str, Any]:
    body = {"mode": mode, "avatar_id": "sim-avatar",
            "video_settings": {"encoding": "VP8", "quality": "low"}, **fields}
    data: dict[str, Any] = (await liveavatar(sim, "token", body, lakey=LIVEAVATAR_KEY))["data"]
    return data


async def ledger_json(sim: SimClient, query: str = "") -> Any:
    response = await sim.get("/sim/ledger" + query)
    assert response.status == 200
    return await response.json()


async def admin(sim: SimClient, method: str, path: str, body: Any = None,
                expect: int = 200) -> Any:
    status, payload = await call(sim, method, path, body)
    assert status == expect, (path, status, payload)
    return payload
