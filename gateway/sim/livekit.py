"""A LiveKit-compatible server, small enough for tests: tokens, rooms, signaling routes.

The real SDKs (``livekit.rtc`` in Python, livekit-client in the browser) join its rooms with
ordinary LiveKit tokens. Routes, added to any aiohttp application by :meth:`add_routes`:

``GET /rtc``
    The signaling WebSocket (dual peer connection protocol). The token comes as
    ``Authorization: Bearer`` (Python/Rust SDK) or ``?access_token=`` (browsers).
``GET /rtc/validate``
    What the SDKs call after a failed upgrade, to learn why: 401 ``invalid token`` or 200.
``GET /rtc/v1``, ``GET /rtc/v1/validate``
    Single peer connection signaling, not implemented: an explicit 404, the one answer on
    which both SDKs fall back to ``/rtc`` (any other status is a hard error for them).

A client joining a room that does not exist creates it, as LiveKit does.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import jwt
from aiohttp import web
from livekit import api

from .room import AVATAR_IDENTITY, Room
from .signaling import ClientConnection, Grant

logger = logging.getLogger(__name__)

WS_CLOSE_TIMEOUT = 2.0
MAX_SIGNAL_MESSAGE = 1 << 20


class LiveKitServer:
    def __init__(self, api_key: str = "sim-key",
                 api_secret: str = "sim-secret-at-least-32-characters-long") -> None:
        if not api_key or not api_secret:
            raise ValueError("api_key and api_secret must be non-empty")
        self._api_key = api_key
        self._api_secret = api_secret
        self._verifier = api.TokenVerifier(api_key, api_secret)
        self._rooms: dict[str, Room] = {}
        self._connections: set[ClientConnection] = set()
        self.v1_requests = 0
        """``/rtc/v1`` attempts answered 404 (the SDK's fallback to ``/rtc`` follows)."""
        self.rejected = 0
        """Signaling attempts refused (bad or expired token, resume attempts)."""

    @property
    def api_key(self) -> str:
        return self._api_key

    @property
    def connections(self) -> int:
        """Signaling connections currently open, in all rooms."""
        return len(self._connections)

    def add_routes(self, app: web.Application) -> None:
        """Serve the signaling routes on ``app`` and close every room when it shuts down."""
        app.router.add_get("/rtc", self._signal)
        app.router.add_get("/rtc/validate", self._validate)
        app.router.add_get("/rtc/v1", self._single_pc)
        app.router.add_get("/rtc/v1/validate", self._single_pc)
        # on_shutdown, not on_cleanup: open WebSockets keep aiohttp's shutdown waiting.
        app.on_shutdown.append(self._on_shutdown)

    # -- rooms -------------------------------------------------------------------------------------

    def create_room(self, name: str) -> Room:
        """The room called ``name``, created if needed (idempotent)."""
        room = self._rooms.get(name)
        if room is None:
            room = self._rooms[name] = Room(name, on_closed=self._forget)
            logger.info("room %s created (%s)", name, room.sid)
        return room

    def room(self, name: str) -> Room | None:
        return self._rooms.get(name)

    @property
    def rooms(self) -> list[Room]:
        return list(self._rooms.values())

    async def close_room(self, name: str, reason: str = "room_deleted") -> None:
        room = self._rooms.get(name)
        if room is not None:
            await room.close(reason)

    def _forget(self, room: Room) -> None:
        if self._rooms.get(room.name) is room:
            del self._rooms[room.name]

    async def close(self) -> None:
        """Close every room (its clients get a LeaveRequest), then any straggling client."""
        await asyncio.gather(*(room.close("server_shutdown") for room in self.rooms))
        await asyncio.gather(*(c.close() for c in list(self._connections)))

    async def _on_shutdown(self, app: web.Application) -> None:
        await self.close()

    # -- tokens ------------------------------------------------------------------------------------

    def token(self, identity: str, room: str, *, name: str | None = None,
              ttl: timedelta = timedelta(hours=24), can_publish: bool = True,
              can_subscribe: bool = True, can_publish_data: bool = True,
              hidden: bool = False) -> str:
        """A LiveKit access token for ``room`` (a negative ``ttl`` makes an expired one)."""
        grants = api.VideoGrants(room_join=True, room=room, can_publish=can_publish,
                                 can_subscribe=can_subscribe, can_publish_data=can_publish_data,
                                 hidden=hidden)
        return (api.AccessToken(self._api_key, self._api_secret)
                .with_identity(identity).with_name(name or identity)
                .with_ttl(ttl).with_grants(grants).to_jwt())

    def verify(self, token: str) -> Grant | None:
        """The grant in a valid room-join token, or None (bad signature, expired, no join)."""
        try:
            claims = self._verifier.verify(token)
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            logger.info("token refused: %s", exc)
            return None
        video = claims.video
        if video is None or not video.room_join or not video.room or not claims.identity:
            logger.info("token refused: no room join grant")
            return None
        return Grant(identity=claims.identity, room=video.room, name=claims.name or claims.identity,
                     can_publish=video.can_publish, can_subscribe=video.can_subscribe,
                     can_publish_data=video.can_publish_data, hidden=bool(video.hidden),
                     can_publish_sources=tuple(video.can_publish_sources or ()))

    # -- handlers ----------------------------------------------------------------------------------

    async def _validate(self, request: web.Request) -> web.Response:
        # Browsers read this answer cross-origin (the body becomes their error message).
        headers = {"Access-Control-Allow-Origin": "*"}
        if self.verify(_token_of(request)) is None:
            return web.Response(status=401, text="invalid token", headers=headers)
        return web.Response(text="success", headers=headers)

    async def _single_pc(self, request: web.Request) -> web.Response:
        self.v1_requests += 1
        return web.Response(status=404, text="single peer connection signaling is not supported",
                            headers={"Access-Control-Allow-Origin": "*"})

    async def _signal(self, request: web.Request) -> web.StreamResponse:
        grant = self.verify(_token_of(request))
        if grant is None:
            self.rejected += 1
            return web.Response(status=401, text="invalid token")
        if request.query.get("reconnect") == "1":
            # Resuming a session (ICE restart on the same participant) is not simulated; a
            # failed resume makes the SDKs fall back to a full reconnect, which is a new join.
            self.rejected += 1
            logger.info("%s asked to resume; refused so it rejoins", grant.identity)
            return web.Response(status=409, text="resume is not supported, join again")
        if grant.identity == AVATAR_IDENTITY:
            self.rejected += 1
            return web.Response(status=403, text=f"identity {AVATAR_IDENTITY!r} is the avatar's")
        room = self.create_room(grant.room)
        ws = web.WebSocketResponse(timeout=WS_CLOSE_TIMEOUT, max_msg_size=MAX_SIGNAL_MESSAGE)
        await ws.prepare(request)
        connection = ClientConnection(room, ws, grant, request.transport,
                                      on_closed=self._connections.discard)
        logger.info("%s joins (sdk=%s %s, protocol %s)", repr(connection), request.query.get("sdk", "?"),
                    request.query.get("version", "?"), request.query.get("protocol", "?"))
        # Counted until its close has finished, which may outlive this handler.
        self._connections.add(connection)
        await connection.run()
        return ws


def _token_of(request: web.Request) -> str:
    authorization = request.headers.get("Authorization", "")
    if authorization.startswith("Bearer "):
        return authorization.removeprefix("Bearer ").strip()
    return request.query.get("access_token", "")
