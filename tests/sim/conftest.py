"""Fixtures for the simulator: a running LiveKit-compatible server and real SDK clients.

WebRTC needs a non-loopback interface (see ``tests/netns.sh``): run these tests as
``tests/netns.sh .venv/bin/python -m pytest tests/sim``. Signaling itself uses 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from gateway.sim.livekit import LiveKitServer
from tests.conftest import IN_NETNS

from .sdk_client import SdkClient

needs_netns = pytest.mark.skipif(
    not IN_NETNS, reason="the livekit SDK never uses loopback for media: WebRTC tests need the "
                         "private network namespace (tests/netns.sh)")
"""For tests where media flows; signaling alone (127.0.0.1 TCP) works anywhere."""


@dataclass
class LiveKitRig:
    """A :class:`LiveKitServer` served by an aiohttp ``TestServer`` on 127.0.0.1."""

    server: LiveKitServer
    http: TestServer

    @property
    def url(self) -> str:
        """What an SDK connects to: ``ws://127.0.0.1:<port>``."""
        return f"ws://127.0.0.1:{self.http.port}"

    def http_url(self, path: str) -> str:
        return str(self.http.make_url(path))


@pytest.fixture
async def livekit(aiohttp_server: AiohttpServer) -> AsyncIterator[LiveKitRig]:
    """A fresh LiveKit-compatible server. Teardown (app shutdown) closes every room."""
    server = LiveKitServer()
    app = web.Application()
    server.add_routes(app)
    yield LiveKitRig(server, await aiohttp_server(app))
    await server.close()


SdkFactory = Callable[..., Awaitable[SdkClient]]


@pytest.fixture
async def sdk_client(livekit: LiveKitRig) -> AsyncIterator[SdkFactory]:
    """``await sdk_client(identity, room, single_peer_connection=False, can_publish=True, ...)``:
    a connected real ``livekit.rtc`` client; disconnected at teardown."""
    clients: list[SdkClient] = []

    async def connect(identity: str = "gateway", room: str = "room-1", *,
                      single_peer_connection: bool | None = False, can_publish: bool = True,
                      can_subscribe: bool = True, can_publish_data: bool = True,
                      hidden: bool = False) -> SdkClient:
        token = livekit.server.token(identity, room, can_publish=can_publish, can_subscribe=can_subscribe,
                                     can_publish_data=can_publish_data, hidden=hidden)
        client = SdkClient(livekit.url, token, single_peer_connection=single_peer_connection)
        clients.append(client)
        await client.connect()
        return client

    yield connect
    for client in clients:
        await client.close()


# The REST emulation's fixtures (simulator app, ledger, the zero-open-sessions check).
from .fixtures import (  # noqa: E402, F401
    ledger,
    nothing_left_open,
    sdk_clients,
    sim,
    sim_app,
    sim_settings,
)
