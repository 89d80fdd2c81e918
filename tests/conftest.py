from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, web, web_app
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.config import Settings
from gateway.runtime import freeze_heap
from gateway.viewers.aiortc_hooks import configure_ice_host_addresses

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]

IN_NETNS = os.environ.get("AVATAR_GATEWAY_TEST_NETNS") == "1"


# -- secrets scan ---------------------------------------------------------------------------
# Every key and configured token the suite hands the gateway (or the simulator). Tests may SEND
# them; nothing the gateway EMITS may contain one: no response body or header a test client
# read, no log record of the whole run, no page it serves. pytest_sessionfinish (below) scans
# once every test has run, whatever their order, and fails the run if it finds one.
KNOWN_SECRETS = frozenset({
    "sim-heygen-key", "sim-liveavatar-key", "sim-secret-at-least-32-characters-long",
    "sk-test-NEVER-SHOW-THIS-0123456789abcdef",
    "adm-token", "ctl-token", "ctl-secret", "s3cret-token", "s3cr3t-token", "other-key",
})
EMITTED: list[str] = []
"""Everything recorded for the scan: formatted log records and response heads and bodies."""


WEB = Path(__file__).resolve().parent.parent / "web"


def find_secrets(texts: Iterable[str]) -> list[tuple[str, str]]:
    """Every (secret, first 200 characters of the text) where a known secret occurs."""
    return sorted({(secret, text[:200]) for text in texts
                   for secret in KNOWN_SECRETS if secret in text})


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    pages = [p.read_text(encoding="utf-8") for p in WEB.rglob("*") if p.is_file()]
    leaks = find_secrets([*EMITTED, *pages])
    if not leaks:
        return
    lines = [f"FAILED: {len(leaks)} key(s) or token(s) in what the gateway emitted (log records, "
             f"responses read by tests, web/ pages); the run fails whatever the tests said:",
             *(f"  {secret!r} in {text!r}" for secret, text in leaks)]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.section("secrets scan", sep="=", red=True, bold=True)
        for line in lines:
            reporter.line(line, red=True)
    else:
        print("\n".join(lines))
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


class _LogRecorder(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            EMITTED.append(self.format(record))
        except Exception:  # a record that cannot even format is not ours to fail on
            EMITTED.append(repr(record.msg))


@pytest.fixture(scope="session", autouse=True)
def _record_everything_emitted() -> Iterator[None]:
    root = logging.getLogger()
    # The gateway's own INFO records, and aiohttp's (its access log shows request lines, where a
    # token in a URL would leak), not the media libraries': pytest keeps each test's records,
    # and aiortc's arguments would keep peer connections alive for the leak checks.
    ours = [logging.getLogger("gateway"), logging.getLogger("aiohttp")]
    handler = _LogRecorder(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    levels = [logger.level for logger in ours]
    root.addHandler(handler)
    for logger in ours:
        logger.setLevel(logging.INFO)
    original = TestClient._request

    async def recording(self: TestClient[Any, Any], method: str, path: Any,
                        **kwargs: Any) -> ClientResponse:
        response = await original(self, method, path, **kwargs)
        EMITTED.append(f"{method} {path} -> {response.status} {dict(response.headers)}")
        if not response.content_type.startswith("text/event-stream"):
            EMITTED.append((await response.read()).decode("utf-8", "replace"))
        return response

    TestClient._request = recording  # type: ignore[method-assign]
    try:
        yield
    finally:
        TestClient._request = original  # type: ignore[method-assign]
        root.removeHandler(handler)
        for logger, level in zip(ours, levels, strict=True):
            logger.setLevel(level)


@pytest.fixture(scope="session", autouse=True)
def _quiet_collector() -> None:
    """What the suite imported never becomes garbage: out of the collector's full passes
    (``gateway serve`` does the same). Those passes stop every thread of this one process,
    which hosts gateways, simulators and viewers at once; a 0.5 s one mid-utterance was
    enough to blur a lip-sync measurement."""
    freeze_heap()


@pytest.fixture(autouse=True)
def _forget_test_apps() -> Iterator[None]:
    """aiohttp caches each request's middleware chain keyed by the apps it went through (up to
    1024 entries): harmless for a server's one app, but over a suite it kept ~150 of the tests'
    apps alive with all they hold (the heap grew from 0.2 to 0.65 million objects, and with
    it every full collection, to 0.55 s)."""
    yield
    cache = getattr(web_app, "_cached_build_middleware", None)
    if cache is not None:
        cache.cache_clear()


@pytest.fixture(autouse=True)
def _network_rule() -> None:
    """Outside the test namespace (``make test`` creates one), pin ICE to loopback so a
    bare ``pytest`` run never sends WebRTC traffic over the host's real interfaces."""
    if not IN_NETNS:
        configure_ice_host_addresses(["127.0.0.1"])


def make_settings(**overrides: Any) -> Settings:
    # No rate limit, no cap on unconnected viewers and no refusal of viewers by load unless a
    # test is about them: the suite's own bursts (one process, one address, one token, a busy
    # machine) are not what they guard against.
    # Viewers stay in the test's process (tests look at their streams) unless a test is about
    # the fan-out workers. Video stays on the rung a viewer joined at unless a test is about
    # the quality ladder (test_ladder*.py): on a busy machine a delay-based bandwidth estimate
    # may dip, and most tests check the size they decode.
    base: dict[str, Any] = {"default_quality": "low", "keyframe_interval": 2.0, "rate_limit": 0.0,
                            "workers": 0, "max_viewer_load": 1.0, "adaptive_quality": False,
                            "max_pending_viewers_per_client": 1000,
                            "max_pending_viewers_per_session": 1000,
                            "state_dir": tempfile.mkdtemp(prefix="avatar-gateway-test-")}
    base.update(overrides)
    return Settings.from_env({}, **base)


@pytest.fixture
def settings(request: pytest.FixtureRequest) -> Settings:
    """The default test settings; a test parametrized ``indirect`` with ``"two-workers"`` gets
    its viewers in two fan-out worker processes instead of the test's own process."""
    if getattr(request, "param", None) == "two-workers":
        return make_settings(workers=2)
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
