"""A gateway wired to a running simulator, for the cloud-upstream tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.api.common import SESSIONS
from gateway.app import create_app
from gateway.sessions import Session
from gateway.sim.app import create_sim_app
from gateway.sim.config import SimSettings
from gateway.sim.ledger import Ledger
from gateway.upstream.cloud import RoomUpstream

from .conftest import make_settings

Client = TestClient[Any, Any]


@dataclass
class Rig:
    gateway: Client
    sim: TestServer
    ledger: Ledger

    async def admin(self, method: str, path: str, body: Any = None) -> Any:
        async with self.gateway.session.request(method, self.sim.make_url(path), json=body) as r:
            assert r.status < 400, await r.text()
            return await r.json()

    def open_sessions(self) -> int:
        return sum(1 for e in self.ledger.entries() if e.open)

    async def create(self, upstream: str = "heygen", status: int = 201) -> dict[str, Any]:
        response = await self.gateway.post("/v1/sessions",
                                           json={"upstream": upstream, "quality": "low"})
        body: dict[str, Any] = await response.json()
        assert response.status == status, body
        return body

    async def fault(self, **body: Any) -> Any:
        return await self.admin("POST", "/sim/faults", body)

    def session(self, session_id: str) -> Session:
        registry = self.gateway.app[SESSIONS]
        session: Session = registry.get(session_id)
        return session

    def provider_id(self, session_id: str) -> str:
        upstream = self.session(session_id).upstream
        assert isinstance(upstream, RoomUpstream) and upstream.provider_session_id
        return upstream.provider_session_id


def gateway_settings(sim: TestServer, state_dir: Path, **overrides: Any) -> Any:
    base = str(sim.make_url("")).rstrip("/")
    fields: dict[str, Any] = dict(
        heygen_api_key="sim-heygen-key", heygen_base_url=base,
        liveavatar_api_key="sim-liveavatar-key", liveavatar_base_url=base,
        upstream_timeout=3.0, state_dir=str(state_dir),
        reconnect_attempts=3, reconnect_ready_within=3.0,
    )
    fields.update(overrides)
    return make_settings(**fields)


@pytest.fixture
def gateway_overrides() -> dict[str, Any]:
    """Override in a test module (or parametrize indirectly) to change gateway settings."""
    return {}


@pytest.fixture
async def rig(aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, tmp_path: Path,
              gateway_overrides: dict[str, Any]) -> AsyncIterator[Rig]:
    ledger = Ledger(":memory:")
    sim = await aiohttp_server(create_sim_app(SimSettings.from_env({}), ledger=ledger))
    gateway = await aiohttp_client(
        create_app(gateway_settings(sim, tmp_path, **gateway_overrides)))
    rig = Rig(gateway, sim, ledger)
    yield rig
    await gateway.close()
    assert rig.open_sessions() == 0, "the gateway left a paid session open"
    ledger.close()
