"""No paid minute leaks: a provider that answers a create too late, and a stop that fails.

The gateway runs against the simulator, whose ledger is the provider's bill. Faults: ``late``
(the provider creates the session, then answers after the gateway's timeout) on HeyGen's
``streaming.new`` and LiveAvatar's ``sessions/start``; ``error`` on ``streaming.stop``. Every
wait is on a condition with a generous deadline; nothing here asserts a duration.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from gateway.api.common import METRICS, SESSIONS
from gateway.journal import SessionJournal
from gateway.sim.app import create_sim_app
from gateway.sim.config import SimSettings
from gateway.sim.ledger import Ledger
from gateway.upstream.billing import CLOCK_SLACK, BillingGuard

from .cloud_rig import GatewayProcess, Rig
from .conftest import IN_NETNS

pytestmark = pytest.mark.skipif(
    not IN_NETNS, reason="the livekit SDK needs the private network namespace (tests/netns.sh)")

FAST = {"upstream_timeout": 2.0, "upstream_reconcile_interval": 0.2,
        "upstream_stop_retry_max": 1.0}
"""A short provider timeout (the late faults answer after it) and quick retries."""

LATE = 8.0
"""Seconds a ``late`` fault holds the provider's answer: well past ``upstream_timeout``."""

DEADLINE = 60.0
"""Generous: the machine may be busy."""


async def until(check: Callable[[], bool | Awaitable[bool]], what: str,
                deadline: float = DEADLINE) -> None:
    try:
        async with asyncio.timeout(deadline):
            while True:
                result = check()
                if result if isinstance(result, bool) else await result:
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not within {deadline:g} s: {what}") from None


def billing(rig: Rig) -> BillingGuard:
    guard: BillingGuard = rig.gateway.app[SESSIONS].providers.billing
    return guard


def journal(rig: Rig) -> SessionJournal:
    rows: SessionJournal = rig.gateway.app[SESSIONS].providers.journal
    return rows


def metric(rig: Rig, name: str, upstream: str) -> float:
    value: float | None = rig.gateway.app[METRICS].registry.get_sample_value(
        name, {"upstream": upstream})
    assert value is not None, name
    return value


async def post_session(rig: Rig, upstream: str) -> tuple[int, dict[str, Any]]:
    response = await rig.gateway.post("/v1/sessions", json={"upstream": upstream,
                                                            "quality": "low"})
    return response.status, await response.json()


async def provider(rig: Rig, method: str, path: str, body: Any = None) -> dict[str, Any]:
    """A call with the same HeyGen key, as another application on the account would make."""
    async with rig.gateway.session.request(
            method, rig.sim.make_url(path), json=body,
            headers={"x-api-key": "sim-heygen-key"}) as response:
        payload: dict[str, Any] = await response.json()
        assert response.status == 200, payload
        return payload


async def journal_is_empty(rig: Rig) -> bool:
    return not await journal(rig).entries() and not await journal(rig).intents()


# -- a create answered after the gateway's timeout --------------------------------------------


@pytest.mark.parametrize("gateway_overrides", [FAST])
async def test_sessions_created_by_timed_out_creates_are_found_and_stopped(rig: Rig) -> None:
    """Issue 13 item 4: two ``streaming.new`` calls answered too late. The gateway never
    learns the ids, yet reconciles them from ``streaming.list`` and stops both."""
    await rig.fault(endpoint="/v1/streaming.new", kind="late", seconds=LATE, times=2)
    results = await asyncio.gather(post_session(rig, "heygen"), post_session(rig, "heygen"))
    assert [status for status, _ in results] == [503, 503], results
    assert all("timed out" in body["error"]["message"] for _, body in results), results
    assert len(rig.ledger.entries(provider="heygen")) == 2  # the provider billed both

    await until(lambda: rig.open_sessions() == 0, "the ledger shows 0 open sessions")
    assert [e.stop_reason for e in rig.ledger.entries()] == ["stopped", "stopped"]
    assert metric(rig, "avatargw_upstream_reconciled_sessions_total", "heygen") == 2
    await until(lambda: billing(rig).intents_pending == 0, "the intents are settled")
    await until(lambda: journal_is_empty(rig), "the journal is empty")
    # The provider's slots are free again: a normal session opens and closes.
    created = await rig.create("heygen")
    assert (await rig.gateway.delete(f"/v1/sessions/{created['id']}")).status == 200


@pytest.mark.parametrize("gateway_overrides", [FAST])
async def test_another_applications_sessions_on_the_same_key_are_left_alone(rig: Rig) -> None:
    """Reconciling stops only what this gateway created: not another application's session
    created before the call (outside its window), nor one created during the call and started
    at once (as any application that got its answer does)."""
    before = (await provider(rig, "POST", "/v1/streaming.new",
                             {"version": "v2", "quality": "low"}))["data"]["session_id"]
    # Let the clock leave the first session's second (and the slack) behind: it is then
    # outside the window of the gateway's call.
    leave_behind = time.time() + 2 * CLOCK_SLACK + 1.0
    await until(lambda: time.time() > leave_behind, "the clock moved on")

    await rig.fault(endpoint="/v1/streaming.new", kind="late", seconds=LATE, times=1)
    attempt = asyncio.ensure_future(post_session(rig, "heygen"))
    await until(lambda: len(rig.ledger.entries()) == 2, "the gateway's session was created")
    during = (await provider(rig, "POST", "/v1/streaming.new",
                             {"version": "v2", "quality": "low"}))["data"]["session_id"]
    await provider(rig, "POST", "/v1/streaming.start", {"session_id": during})
    status, _ = await attempt
    assert status == 503

    ours = next(e.session_id for e in rig.ledger.entries() if e.session_id not in
                (before, during))
    await until(lambda: ours not in {e.session_id for e in rig.ledger.entries(open_only=True)},
                "the gateway's own session is stopped")
    await until(lambda: billing(rig).intents_pending == 0, "the intent is settled")
    still_open = {e.session_id for e in rig.ledger.entries(open_only=True)}
    assert still_open == {before, during}
    assert metric(rig, "avatargw_upstream_reconciled_sessions_total", "heygen") == 1
    for session_id in (before, during):
        await provider(rig, "POST", "/v1/streaming.stop", {"session_id": session_id})


@pytest.mark.parametrize("gateway_overrides", [{**FAST, "upstream_timeout": 30.0}])
async def test_a_session_deleted_while_its_create_is_unanswered_is_stopped(rig: Rig) -> None:
    """DELETE does not wait for the provider's answer: the create call is abandoned, the
    create request answers 409, and reconciliation stops what the provider opened."""
    await rig.fault(endpoint="/v1/streaming.new", kind="late", seconds=LATE * 4, times=1)
    attempt = asyncio.ensure_future(post_session(rig, "heygen"))
    await until(lambda: len(rig.ledger.entries()) == 1, "the provider created the session")
    listed = (await (await rig.gateway.get("/v1/sessions")).json())["sessions"]
    assert [s["state"] for s in listed] == ["starting"]
    assert (await rig.gateway.delete(f"/v1/sessions/{listed[0]['id']}")).status == 200
    status, body = await asyncio.wait_for(attempt, DEADLINE)
    assert status == 409 and "closed while it started" in body["error"]["message"], body
    await until(lambda: rig.open_sessions() == 0, "the ledger shows 0 open sessions")
    await until(lambda: journal_is_empty(rig), "the journal is empty")


@pytest.mark.parametrize("gateway_overrides", [FAST])
async def test_a_liveavatar_start_answered_late_is_stopped(rig: Rig) -> None:
    """The session id comes from ``sessions/token`` and is journaled before the billed
    ``sessions/start``: when the start's answer never comes, that id is stopped."""
    await rig.fault(endpoint="/v1/sessions/start", kind="late", seconds=LATE, times=1)
    status, body = await post_session(rig, "liveavatar")
    assert status >= 500, body
    entries = rig.ledger.entries(provider="liveavatar")
    assert len(entries) == 1 and entries[0].started_at is not None  # it was billed
    await until(lambda: rig.open_sessions() == 0, "the ledger shows 0 open sessions")
    assert rig.ledger.entries()[0].stop_reason == "stopped"
    await until(lambda: journal_is_empty(rig), "the journal is empty")


# -- a stop that fails --------------------------------------------------------------------------


@pytest.mark.parametrize("gateway_overrides", [FAST])
async def test_a_failing_stop_is_retried_until_the_provider_confirms(rig: Rig) -> None:
    """Issue 13 item 5: ``streaming.stop`` fails again and again. DELETE still answers (the
    session is closed for its viewers), the journal keeps the row, the gauge counts the stop,
    and the background retries end the billing."""
    created = await rig.create("heygen")
    provider_id = rig.provider_id(created["id"])
    # More failures than one stop call's own retries (3 tries): only the background retries
    # can get past them.
    fault = await rig.fault(endpoint="/v1/streaming.stop", kind="error", status=503, times=7,
                            session_id=provider_id)
    assert (await rig.gateway.delete(f"/v1/sessions/{created['id']}")).status == 200
    assert (await rig.gateway.get(f"/v1/sessions/{created['id']}")).status == 404

    pending = [e.session_id for e in await journal(rig).entries()]
    if rig.open_sessions():  # normally so: the background retries need a moment
        assert pending == [provider_id]  # the row stays while the provider bills
    await until(lambda: rig.open_sessions() == 0, "the retried stop closed the ledger row")
    assert rig.ledger.entries()[0].stop_reason == "stopped"
    await until(lambda: billing(rig).stops_pending == 0, "nothing pending")
    assert metric(rig, "avatargw_upstream_stops_pending", "heygen") == 0
    await until(lambda: journal_is_empty(rig), "the journal row is gone")
    faults = (await rig.admin("GET", "/sim/faults"))["faults"]
    assert all(f["id"] != fault["id"] for f in faults)  # every failure was used up


@pytest.mark.parametrize("gateway_overrides", [FAST])
async def test_the_gauge_counts_stops_pending(rig: Rig) -> None:
    created = await rig.create("heygen")
    provider_id = rig.provider_id(created["id"])
    fault = await rig.fault(endpoint="/v1/streaming.stop", kind="error", status=503,
                            session_id=provider_id)  # until removed
    assert (await rig.gateway.delete(f"/v1/sessions/{created['id']}")).status == 200
    assert metric(rig, "avatargw_upstream_stops_pending", "heygen") == 1
    metrics = await (await rig.gateway.get("/metrics")).text()
    assert 'avatargw_upstream_stops_pending{upstream="heygen"} 1.0' in metrics
    assert [e.session_id for e in await journal(rig).entries()] == [provider_id]
    await until(lambda: billing(rig).stops_pending == 1 and rig.open_sessions() == 1,
                "still failing, still pending")
    await rig.admin("DELETE", f"/sim/faults/{fault['id']}")
    await until(lambda: rig.open_sessions() == 0, "stopped once the provider recovered")
    await until(lambda: metric(rig, "avatargw_upstream_stops_pending", "heygen") == 0,
                "the gauge back at 0")


# -- across SIGTERM, SIGKILL and a restart ------------------------------------------------------


@pytest.fixture
async def sim_and_ledger(aiohttp_server: AiohttpServer) -> Any:
    ledger = Ledger(":memory:")
    sim = await aiohttp_server(create_sim_app(SimSettings.from_env({}), ledger=ledger))
    yield sim, ledger
    ledger.close()


def journal_rows(state_dir: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(state_dir / "journal.sqlite3") as db:
        return [*db.execute("SELECT provider, session_id FROM upstream_sessions"),
                *db.execute("SELECT provider, nonce FROM upstream_intents")]


async def arm_late_create(sim: TestServer) -> None:
    async with aiohttp.ClientSession() as http, http.post(
            sim.make_url("/sim/faults"), json={"endpoint": "/v1/streaming.new", "kind": "late",
                                               "seconds": 90.0, "times": 1}) as response:
        assert response.status == 201, await response.text()


async def create_in_background(gateway: GatewayProcess) -> asyncio.Future[Any]:
    async def create() -> int:
        async with aiohttp.ClientSession() as http, http.post(
                gateway.url + "/v1/sessions", json={"upstream": "heygen"}) as response:
            return response.status

    return asyncio.ensure_future(create())


# The gateway's provider timeout is longer than its drain: SIGTERM finds the call in flight.
SLOW_CALL = {"upstream_timeout": "30", "upstream_reconcile_interval": "0.2",
             "upstream_stop_retry_max": "1"}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
async def test_an_unanswered_create_is_stopped_across_a_restart(
        sim_and_ledger: Any, tmp_path: Path, sig: signal.Signals) -> None:
    """The gateway is stopped (SIGTERM: drained; SIGKILL: killed) while ``streaming.new`` is
    in flight and the provider has already created the session. Whether the draining gateway
    reconciles before it exits or the next start does (from the journal's intent), the
    ledger ends with 0 open sessions and the journal empty."""
    sim, ledger = sim_and_ledger
    first = GatewayProcess(sim, tmp_path, **SLOW_CALL)
    await first.start()
    await arm_late_create(sim)
    attempt = await create_in_background(first)
    await until(lambda: len(ledger.entries()) == 1, "the provider created the session")
    assert [r[0] for r in journal_rows(tmp_path)] == ["heygen"]  # the intent, journaled
    code, stderr = await first.stop(sig)
    await asyncio.gather(attempt, return_exceptions=True)
    if sig is signal.SIGTERM:
        assert code == 0, stderr
    else:
        assert code == -signal.SIGKILL
        assert sum(e.open for e in ledger.entries()) == 1  # killed: nothing stopped it

    second = GatewayProcess(sim, tmp_path, **SLOW_CALL)
    await second.start()  # ready only after the journal's orphans and intents are handled
    try:
        await until(lambda: not any(e.open for e in ledger.entries()),
                    "the ledger shows 0 open sessions")
        assert [e.stop_reason for e in ledger.entries()] == ["stopped"]
    finally:
        code, stderr = await second.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert "sim-heygen-key" not in stderr
    # An intent whose window is still open when the gateway stops stays for the next start
    # (which finds nothing more); no session row remains.
    assert [r for r in journal_rows(tmp_path) if r[1] in {e.session_id for e in
                                                          ledger.entries()}] == []
