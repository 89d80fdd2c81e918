"""No paid minute wasted: the simulator's ledger shows zero open sessions after an idle grace,
after SIGTERM, and after SIGKILL followed by a restart of the gateway."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pytest_aiohttp import AiohttpServer

from gateway.sim.app import create_sim_app
from gateway.sim.config import SimSettings
from gateway.sim.ledger import Ledger

from .cloud_rig import GatewayProcess, Rig
from .conftest import IN_NETNS

pytestmark = pytest.mark.skipif(
    not IN_NETNS, reason="the livekit SDK needs the private network namespace (tests/netns.sh)")


@pytest.mark.parametrize("gateway_overrides", [{"idle_grace": 1.0}])
async def test_idle_grace_stops_the_paid_session(rig: Rig) -> None:
    created = await rig.create("heygen")
    assert rig.open_sessions() == 1
    async with asyncio.timeout(20):
        while rig.open_sessions():
            await asyncio.sleep(0.1)
    entries = [e for e in rig.ledger.entries() if e.provider == "heygen"]
    assert len(entries) == 1
    billed = entries[0].billed_seconds
    assert billed is not None and billed < 10
    # The provider records the stop as it receives it; the gateway forgets the session once
    # the stop call has returned: eventually a 404.
    async with asyncio.timeout(10):
        while (await rig.gateway.get(f"/v1/sessions/{created['id']}")).status != 404:
            await asyncio.sleep(0.05)


@pytest.fixture
async def sim_and_ledger(aiohttp_server: AiohttpServer) -> Any:
    ledger = Ledger(":memory:")
    sim = await aiohttp_server(create_sim_app(SimSettings.from_env({}), ledger=ledger))
    yield sim, ledger
    ledger.close()


def open_count(ledger: Ledger) -> int:
    return sum(1 for e in ledger.entries() if e.open)


async def test_sigterm_drains_and_stops_the_paid_session(sim_and_ledger: Any,
                                                         tmp_path: Path) -> None:
    sim, ledger = sim_and_ledger
    gateway = GatewayProcess(sim, tmp_path)
    await gateway.start()
    await gateway.create_session()
    assert open_count(ledger) == 1
    code, stderr = await gateway.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert "sim-heygen-key" not in stderr  # no key in any log line
    assert open_count(ledger) == 0
    assert [e.stop_reason for e in ledger.entries()] == ["stopped"]


async def test_sigkill_then_restart_stops_the_orphan(sim_and_ledger: Any, tmp_path: Path) -> None:
    sim, ledger = sim_and_ledger
    first = GatewayProcess(sim, tmp_path)
    await first.start()
    created = await first.create_session()
    assert open_count(ledger) == 1
    code, _ = await first.stop(signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert open_count(ledger) == 1  # killed: nothing could stop it

    journal = tmp_path / "journal.sqlite3"
    assert journal.exists()
    second = GatewayProcess(sim, tmp_path)
    await second.start()  # ready only after the journal's orphans are stopped
    try:
        assert open_count(ledger) == 0
        entry = ledger.entries()[0]
        assert entry.stop_reason == "stopped" and (entry.billed_seconds or 0) > 0
        async with aiohttp.ClientSession() as http, http.get(second.url + "/metrics") as r:
            assert "avatargw_upstream_session_starts_total" in await r.text()
        assert json.dumps(created)  # the first run's session id was never reused
    finally:
        code, stderr = await second.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert "orphan" in stderr
