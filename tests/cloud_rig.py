"""A gateway wired to a running simulator, for the cloud-upstream tests."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
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
            return None if r.status == 204 else await r.json()

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatewayProcess:
    """``python -m gateway serve`` against the simulator, as an operator would run it."""

    def __init__(self, sim: TestServer, state_dir: Path, **settings: str) -> None:
        """``settings``: more ``AVATAR_GATEWAY_<NAME>`` variables, by lower-case name."""
        self.port = free_port()
        base = str(sim.make_url("")).rstrip("/")
        self.env = {**os.environ, "AVATAR_GATEWAY_HEYGEN_API_KEY": "sim-heygen-key",
                    "AVATAR_GATEWAY_HEYGEN_BASE_URL": base,
                    "AVATAR_GATEWAY_STATE_DIR": str(state_dir),
                    "AVATAR_GATEWAY_DEFAULT_QUALITY": "low",
                    **{f"AVATAR_GATEWAY_{k.upper()}": v for k, v in settings.items()}}
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--port", str(self.port), env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(60), aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.get(self.url + "/readyz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)

    async def create_session(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.post(
                self.url + "/v1/sessions", json={"upstream": "heygen"}) as response:
            body: dict[str, Any] = await response.json()
            assert response.status == 201, body
            return body

    async def stop(self, sig: int) -> tuple[int, str]:
        assert self.proc is not None
        self.proc.send_signal(sig)
        _, stderr = await asyncio.wait_for(self.proc.communicate(), 60)
        assert self.proc.returncode is not None
        return self.proc.returncode, stderr.decode()
