"""LiveAvatar API emulation: ``/v1/sessions/*``, FULL-mode room events, LITE's websocket.

What LiveAvatar's own published clients expect wins over the docs (../shared/specs/
heygen-api.md, "Corrections"): the web SDK ``@heygen/liveavatar-web-sdk`` 0.0.18 and LiveKit's
``livekit-plugins-liveavatar`` 1.8.9. From them:

* Envelope ``{"code": 1000, "data", "message": "success"}`` (the SDK's ``SUCCESS_CODE``; the
  docs' examples show 100). ``/sessions/start`` answers 201. Errors carry
  ``code = 4000 + (HTTP status - 400)`` (401 bad credentials, 403 none, 404 unknown session,
  409 wrong state, 429 concurrency limit); a 422 is FastAPI's
  ``{"detail": [{"type", "loc", "msg", "input"}]}``.
* The session token is a JWT (HS256, signed with a key this simulator draws at start) whose
  payload the SDK decodes: ``{"sub": session_id, "session_id", "iat", "exp",
  "start_session_data": {"mode": "FULL"|"LITE", "agent_type": "FULL" (FULL mode only),
  "avatar_id", "is_sandbox"}}``. It expires an hour after the session's latest possible end.
* FULL mode: the room holds the avatar ``heygen`` (media) and the data-only agent
  ``liveavatar-agent-<session_id>``; the SDK waits for both. Every ``agent-response`` packet
  comes from the agent. ``session.stopped`` carries ``stop_reason``.
* A stop after the session already ended (a second stop, or the server's own expiry, after
  which the SDK still calls stop) answers success: the SDK must not choke on its cleanup.
* LITE mode: ``ws_url`` is this simulator's websocket (:mod:`gateway.sim.liveavatar_lite`),
  authenticated by a per-session secret in its query (the plugin's ``ws_connect`` sends no
  headers).
* ``livekit_config {livekit_url, livekit_room, livekit_client_token}`` (the plugin always
  sends it): when the token verifies with this simulator's LiveKit key, the avatar joins THAT
  room with the token's identity (the plugin's ``liveavatar-avatar-agent``) and leaves it at
  stop, without closing a room others are in. Any other LiveKit: 422 (not emulated).

INFERRED where neither clients nor docs say:

* ``/sessions/token`` needs ``X-API-KEY`` (a HeyGen key is refused); ``/sessions/start``
  needs ``Authorization: Bearer <session_token>`` (an API key there is a 401 — the classic
  mistake the docs warn about); ``/sessions/stop`` and ``/sessions/keep-alive`` take either
  (with the API key the body names ``session_id``).
* A token creates the session (ledger row, state ``new``); only started sessions count toward
  the concurrency limit. ``video_settings.quality`` (or top-level ``video_quality``)
  ``very_high`` renders like ``high`` (720p). ``is_sandbox`` sessions last at most 60 s
  (the plugin warns of the sandbox's "1 minute limit").
* The session's own room: the client token is for identity ``client``, the agent token for
  ``agent``. With ``livekit_config`` both are null (the client has its own tokens).
* FULL mode commands are JSON data packets on topic ``agent-control`` (``avatar.speak_text``,
  ``avatar.speak_response`` — answered by :func:`~gateway.sim.sessions.answer` — ,
  ``avatar.interrupt``, ``avatar.start_listening``/``stop_listening``,
  ``user.start_push_to_talk``/``stop_push_to_talk``), executed in order. Events go out on
  ``agent-response`` as ``{event_id, event_type, session_id, source_event_id, …}``:
  ``avatar.transcription {text}`` as soon as a speak command is taken, ``avatar.speak_started``
  / ``avatar.speak_ended`` from the avatar, ``user.speak_started`` / ``user.speak_ended`` from
  voice activity (FULL sessions start listening), ``session.stopped {stop_reason}`` last
  (the client's stop ``reason``, else the simulator's, upper-cased: ``IDLE_TIMEOUT``, …).
  There is no speech recognition, so no ``user.transcription``.
* A session closes after ``liveavatar_idle_timeout`` (5 min) without keep-alive or command.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import secrets
import time
import uuid
from collections import OrderedDict
from typing import Any

import jwt
from aiohttp import web

from ..config import QUALITY_TIERS
from ..errors import Conflict, GatewayError
from ..upstream.base import AvatarEvent, EventType
from .config import SimSettings
from .liveavatar_lite import LiteLink
from .room import AvatarParticipant, AvatarSpec
from .sessions import (
    AvatarGone,
    Provider,
    SessionBook,
    SimApiError,
    SimSession,
    State,
    answer,
    livekit_url,
    new_session_id,
)

logger = logging.getLogger(__name__)

PREFIX = "/v1/sessions/"
WS_PATH = PREFIX + "ws"
CONTROL_TOPIC = "agent-control"
RESPONSE_TOPIC = "agent-response"
SUCCESS_CODE = 1000
AGENT_PREFIX = "liveavatar-agent-"
SANDBOX_LIMIT = 60.0
_TOKEN_GRACE = 3600.0
_SOURCES_KEPT = 256
_LAST_WORDS_GRACE = 0.2
_QUALITIES = {"very_high": "high", "high": "high", "medium": "medium", "low": "low"}
_WIRE_EVENTS = {EventType.AVATAR_START_TALKING: "avatar.speak_started",
                EventType.AVATAR_STOP_TALKING: "avatar.speak_ended"}
_VOICE_EVENTS = {"user_start": "user.speak_started", "user_stop": "user.speak_ended"}


class LiveAvatarError(SimApiError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, 4000 + status - 400 if status < 500 else 5000, message)

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "data": None, "message": self.message}


class Invalid(LiveAvatarError):
    """A 422 in FastAPI's shape: ``{"detail": [{"type", "loc", "msg", "input"}]}``."""

    def __init__(self, loc: tuple[str | int, ...], msg: str, kind: str = "value_error",
                 value: Any = None) -> None:
        super().__init__(422, msg)
        self.loc = ["body", *loc]
        self.kind = kind
        self.value = value

    def body(self) -> dict[str, Any]:
        return {"detail": [{"type": self.kind, "loc": self.loc, "msg": self.message,
                            "input": self.value}]}


def ok(data: Any = None, status: int = 200) -> web.Response:
    return web.json_response({"code": SUCCESS_CODE, "data": data, "message": "success"},
                             status=status)


class SessionTokens:
    """Session tokens: JWTs signed with a key drawn per simulator (see the module docs)."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    def mint(self, session: LiveAvatarSession, lifetime: float) -> str:
        now = int(time.time())
        data: dict[str, Any] = {"mode": session.mode, "avatar_id": session.avatar_id,
                                "is_sandbox": session.is_sandbox}
        if session.full:
            data["agent_type"] = "FULL"
        claims = {"sub": session.id, "session_id": session.id, "iat": now,
                  "exp": now + int(lifetime), "start_session_data": data}
        return jwt.encode(claims, self._key, algorithm="HS256")

    def session_id(self, token: str) -> str | None:
        """The session a valid, unexpired token names; None otherwise."""
        try:
            claims = jwt.decode(token, self._key, algorithms=["HS256"],
                                options={"require": ["exp", "sub"]})
        except jwt.PyJWTError:
            return None
        session_id = claims.get("sub")
        return session_id if isinstance(session_id, str) else None


class LiveAvatarSession(SimSession):
    provider = Provider.LIVEAVATAR
    event_topic = RESPONSE_TOPIC

    def __init__(self, *, full: bool, max_text_chars: int, is_sandbox: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.full = full
        self.max_text_chars = max_text_chars
        self.is_sandbox = is_sandbox
        self.client_reason: str | None = None
        """What ``session.stopped`` reports; set by a client's stop request."""
        self.ws_secret = secrets.token_urlsafe(24)
        """Authenticates the LITE websocket (it travels in ``ws_url``)."""
        self.lite: LiteLink | None = None if full else LiteLink(
            self.id, avatar=self._avatar_or_none, touch=self.touch)
        self._sources: OrderedDict[str, str] = OrderedDict()
        """task id -> event id of the command that asked for it."""

    @property
    def agent_identity(self) -> str:
        return AGENT_PREFIX + self.id

    def _avatar_or_none(self) -> AvatarParticipant | None:
        return self.room.avatar if self.room is not None and self.is_open else None

    def avatar_spec(self) -> AvatarSpec:
        return dataclasses.replace(
            super().avatar_spec(), event_sender=self.agent_identity if self.full else None)

    @property
    def counts_toward_limit(self) -> bool:
        # A token only configures a session; the limit is about running avatars.
        return self.state in (State.CONNECTING, State.CONNECTED)

    def event(self, event_type: str, source_event_id: str | None = None,
              **data: Any) -> bytes:
        return json.dumps({"event_id": str(uuid.uuid4()), "event_type": event_type,
                           "session_id": self.id, "source_event_id": source_event_id,
                           **data}).encode()

    def wire(self, event: AvatarEvent) -> bytes | None:
        if self.lite is not None:  # LITE: events go to the websocket, none into the room
            self.lite.on_avatar_event(event)
            return None
        event_type = _WIRE_EVENTS.get(event.type)
        if event_type is None:
            return None
        source = self._sources.get(event.task_id) if event.task_id is not None else None
        return self.event(event_type, source)

    async def _emit(self, event_type: str, source: str | None = None, **data: Any) -> None:
        if self.room is not None:
            sender = self.agent_identity if self.full else self.avatar_identity
            await self.room.send_data(self.event(event_type, source, **data),
                                      topic=RESPONSE_TOPIC, sender=sender)

    def on_voice(self, identity: str, kind: str) -> None:
        self.touch()
        event_type = _VOICE_EVENTS.get(kind)
        if event_type is not None:
            self.submit(lambda: self._emit(event_type))

    def on_data(self, sender: str, topic: str, payload: bytes) -> None:
        if topic != CONTROL_TOPIC or not self.full:
            return
        try:
            command = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            logger.info("session %s: ignoring a non-JSON command from %s", self.id, sender)
            return
        if not isinstance(command, dict) or not isinstance(command.get("event_type"), str):
            logger.info("session %s: ignoring a command without event_type", self.id)
            return
        self.touch()
        self.submit(lambda: self._run(command))

    async def _run(self, command: dict[str, Any]) -> None:
        kind: str = command["event_type"]
        source = command.get("event_id")
        source = source if isinstance(source, str) else None
        match kind:
            case "avatar.speak_text" | "avatar.speak_response":
                text = command.get("text")
                if not isinstance(text, str) or not text.strip() or len(text) > self.max_text_chars:
                    logger.info("session %s: %s needs text of 1..%d characters", self.id, kind,
                                self.max_text_chars)
                    return
                if kind == "avatar.speak_response":
                    text = answer(text, self.knowledge_base)
                await self._emit("avatar.transcription", source, text=text)
                try:
                    result = await self.speak(text)
                except (Conflict, AvatarGone) as exc:
                    logger.info("session %s: cannot speak: %s", self.id, exc)
                    return
                if source is not None:
                    self._sources[result.task_id] = source
                    while len(self._sources) > _SOURCES_KEPT:
                        self._sources.popitem(last=False)
            case "avatar.interrupt":
                if self.room is not None and self.room.avatar is not None:
                    await self.room.avatar.interrupt()
            case "avatar.start_listening" | "avatar.stop_listening":
                if self.room is not None:
                    self.room.listening = kind == "avatar.start_listening"
            case "user.start_push_to_talk":
                await self._emit("user.push_to_talk_started", source)
            case "user.stop_push_to_talk":
                await self._emit("user.push_to_talk_stopped", source)
            case _:
                logger.info("session %s: unknown command %r", self.id, kind)

    async def _shutdown(self) -> None:
        if self.lite is not None:
            self.lite.closing()
        await super()._shutdown()

    async def before_close(self, reason: str) -> None:
        await self._emit("session.stopped", stop_reason=self.client_reason or reason.upper())
        # The event rides SCTP, the LeaveRequest that follows rides the signaling WebSocket
        # and would overtake it: the client would hang up before the event arrives.
        await asyncio.sleep(_LAST_WORDS_GRACE)

    async def after_close(self) -> None:
        if self.lite is not None:
            try:
                await self.lite.close()
            except (ConnectionError, RuntimeError) as exc:
                logger.info("session %s: closing the LITE websocket: %s", self.id, exc)


class LiveAvatarApi:
    """The ``/v1/sessions/*`` routes over a :class:`SessionBook`."""

    def __init__(self, settings: SimSettings, book: SessionBook) -> None:
        self._settings = settings
        self._book = book
        self._tokens = SessionTokens()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(PREFIX + "token", self.token)
        app.router.add_post(PREFIX + "start", self.start)
        app.router.add_post(PREFIX + "stop", self.stop)
        app.router.add_post(PREFIX + "keep-alive", self.keep_alive)
        app.router.add_get(WS_PATH, self.websocket)

    def session_for_token(self, token: str) -> str | None:
        return self._tokens.session_id(token)

    # -- auth and parsing ------------------------------------------------------------------

    def _api_key(self, request: web.Request) -> bool:
        """True for the right ``X-API-KEY``, False when absent; 401 when wrong."""
        key = request.headers.get("X-API-KEY")
        if key is None:
            return False
        if hmac.compare_digest(key.encode(), self._settings.liveavatar_api_key.reveal().encode()):
            return True
        raise LiveAvatarError(401, "Invalid API key")

    def _bearer(self, request: web.Request) -> str | None:
        """The session id a Bearer session token names; None when absent; 401 when invalid."""
        header = request.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        session_id = self._tokens.session_id(token.strip()) if scheme.lower() == "bearer" else None
        if session_id is None:
            raise LiveAvatarError(401, "Invalid or expired session token")
        return session_id

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise LiveAvatarError(
                413, f"the body is larger than {self._settings.max_body_bytes} bytes") from None
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise Invalid((0,), f"JSON decode error: {exc}", "json_invalid", {}) from None
        if not isinstance(body, dict):
            raise Invalid((), "Input should be a valid dictionary or object to extract fields "
                              "from", "model_attributes_type", body)
        return body

    async def _session(self, request: web.Request, *,
                       api_key_allowed: bool) -> tuple[LiveAvatarSession | None, dict[str, Any]]:
        """The session a request is about; None for a valid token whose session the
        simulator has forgotten (it ended long ago)."""
        token_session = self._bearer(request)
        has_key = api_key_allowed and self._api_key(request)
        if token_session is None and not has_key:
            if not api_key_allowed and "X-API-KEY" in request.headers:
                raise LiveAvatarError(401, "this endpoint takes 'Authorization: Bearer "
                                           "<session_token>', not an API key")
            raise LiveAvatarError(403, "Not authenticated")
        body = await self._body(request)
        named = body.get("session_id")
        if named is not None and not isinstance(named, str):
            raise Invalid(("session_id",), "Input should be a valid string", "string_type", named)
        if token_session is not None and named and named != token_session:
            raise LiveAvatarError(403, "the session token does not belong to this session")
        session_id = token_session or named
        if not session_id:
            raise Invalid(("session_id",), "Field required: session_id is required with an "
                                           "API key", "missing", body)
        session = self._book.get(session_id, Provider.LIVEAVATAR)
        if isinstance(session, LiveAvatarSession):
            return session, body
        if token_session is not None:
            return None, body
        raise LiveAvatarError(404, "Session not found")

    # -- endpoints -------------------------------------------------------------------------

    async def token(self, request: web.Request) -> web.Response:
        if not self._api_key(request):
            raise LiveAvatarError(403, "Not authenticated")
        body = await self._body(request)
        params = self._token_params(body)
        session = LiveAvatarSession(session_id=new_session_id(),
                                    max_text_chars=self._settings.max_text_chars, **params)
        settings = self._settings
        lifetime = settings.start_timeout + session.duration_limit + _TOKEN_GRACE
        token = self._tokens.mint(session, lifetime)
        self._book.add(session)
        return ok({"session_id": session.id, "session_token": token})

    def _token_params(self, body: dict[str, Any]) -> dict[str, Any]:
        settings = self._settings
        mode = body.get("mode")
        if mode is None:
            raise Invalid(("mode",), "Field required", "missing", body)
        if mode not in ("FULL", "LITE"):
            raise Invalid(("mode",), "Input should be 'FULL' or 'LITE'", "enum", mode)
        avatar = body.get("avatar_id")
        if avatar is None:
            raise Invalid(("avatar_id",), "Field required", "missing", body)
        if not isinstance(avatar, str) or not avatar:
            raise Invalid(("avatar_id",), "avatar_id must be a non-empty string", "string_type",
                          avatar)
        sandbox = body.get("is_sandbox", False)
        if not isinstance(sandbox, bool):
            raise Invalid(("is_sandbox",), "Input should be a valid boolean", "bool_type", sandbox)
        room, identity = self._livekit_config(body.get("livekit_config"))
        video = _get(body, "video_settings", {})
        if not isinstance(video, dict):
            raise Invalid(("video_settings",), "Input should be a valid dictionary",
                          "dict_type", video)
        encoding = video.get("encoding", "VP8")
        if encoding not in ("VP8", "H264"):
            raise Invalid(("video_settings", "encoding"), "Input should be 'VP8' or 'H264'",
                          "enum", encoding)
        quality = video.get("quality", body.get("video_quality", "high"))
        if quality not in _QUALITIES:
            where = ("video_settings", "quality") if "quality" in video else ("video_quality",)
            raise Invalid(where, f"Input should be one of {', '.join(map(repr, _QUALITIES))}",
                          "enum", quality)
        limit = body.get("max_session_duration")
        if limit is None:
            limit = settings.session_duration_limit
        elif (isinstance(limit, bool) or not isinstance(limit, int | float)
              or not 0 < limit <= settings.session_duration_limit):
            raise Invalid(("max_session_duration",),
                          f"max_session_duration must be a number of seconds up to "
                          f"{settings.session_duration_limit:g}", "value_error", limit)
        if sandbox:
            limit = min(limit, SANDBOX_LIMIT)
        persona = _get(body, "avatar_persona", {})
        if not isinstance(persona, dict):
            raise Invalid(("avatar_persona",), "Input should be a valid dictionary",
                          "dict_type", persona)
        return {
            "avatar_id": avatar, "quality": QUALITY_TIERS[_QUALITIES[quality]],
            "video_codec": encoding, "voice": "en-us", "knowledge_base": "", "mode": mode,
            "idle_timeout": settings.liveavatar_idle_timeout, "duration_limit": float(limit),
            "full": mode == "FULL", "is_sandbox": sandbox, "livekit_room": room,
            "avatar_identity": identity,
        }

    def _livekit_config(self, config: Any) -> tuple[str | None, str | None]:
        """(room, avatar identity) of a ``livekit_config``; (None, None) without one."""
        if config is None:
            return None, None
        if not isinstance(config, dict):
            raise Invalid(("livekit_config",), "Input should be a valid dictionary",
                          "dict_type", config)
        for field in ("livekit_url", "livekit_room", "livekit_client_token"):
            value = config.get(field)
            if not isinstance(value, str) or not value:
                raise Invalid(("livekit_config", field), "Field required (a non-empty string)",
                              "missing" if value is None else "string_type", value)
        grant = self._book.livekit.verify(config["livekit_client_token"])
        if grant is None:
            raise Invalid(("livekit_config", "livekit_client_token"),
                          "only this simulator's own LiveKit server is emulated: the token "
                          "must be a valid room-join token signed with the simulator's LiveKit "
                          "API key and secret", "value_error", None)
        if grant.room != config["livekit_room"]:
            raise Invalid(("livekit_config", "livekit_room"),
                          f"the token joins room {grant.room!r}, not {config['livekit_room']!r}",
                          "value_error", config["livekit_room"])
        return grant.room, grant.identity

    async def start(self, request: web.Request) -> web.Response:
        session, _ = await self._session(request, api_key_allowed=False)
        if session is None or session.state is not State.NEW:
            raise LiveAvatarError(409, "Session already started"
                                  if session is not None and session.is_open
                                  else "Session already stopped")
        if self._book.at_capacity(Provider.LIVEAVATAR):
            raise LiveAvatarError(429, "Concurrent session limit reached")
        if not session.own_room:
            existing = self._book.livekit.room(session.room_name)
            if existing is not None and existing.avatar is not None:
                raise LiveAvatarError(409, f"room {session.room_name!r} already has an avatar")
        try:
            await self._book.start(session)
        except (TimeoutError, GatewayError) as exc:
            raise LiveAvatarError(500, f"the avatar could not join the room: {exc}") from None
        if not session.is_open:  # stopped (expired, shut down) while the avatar joined
            raise LiveAvatarError(409, "Session already stopped")
        room = self._book.create_room(session)
        if session.full:
            room.listening = True
            # The agent that carries FULL mode's conversation; the web SDK waits for it.
            room.add_agent(session.agent_identity)
        livekit = self._book.livekit
        limit = session.duration_limit
        base = livekit_url(request, self._settings)
        ws_url = None
        if session.lite is not None:
            ws_url = f"{base}{WS_PATH}?session_id={session.id}&token={session.ws_secret}"
        own = session.own_room
        return ok({
            "session_id": session.id,
            "livekit_url": base if own else None,
            "livekit_client_token": livekit.token("client", room.name, name="client")
            if own else None,
            "livekit_agent_token": livekit.token("agent", room.name, name="agent")
            if own else None,
            "max_session_duration": int(limit) if float(limit).is_integer() else limit,
            "ws_url": ws_url,
        }, status=201)

    async def stop(self, request: web.Request) -> web.Response:
        session, body = await self._session(request, api_key_allowed=True)
        reason = body.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise Invalid(("reason",), "Input should be a valid string", "string_type", reason)
        if session is None or not session.is_open:
            # Already over (a second stop, or the server ended it): the SDK's cleanup calls
            # stop anyway and must not fail on it.
            return ok()
        session.client_reason = reason
        await self._book.stop(session, "stopped")
        return ok()

    async def keep_alive(self, request: web.Request) -> web.Response:
        session, _ = await self._session(request, api_key_allowed=True)
        if session is not None and session.state is State.NEW:
            raise LiveAvatarError(409, "Session not started")
        if session is None or not session.is_open:
            raise LiveAvatarError(409, "Session already stopped")
        session.touch()
        return ok()

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        """LITE mode's ``ws_url`` (see :mod:`gateway.sim.liveavatar_lite`)."""
        session_id = request.query.get("session_id", "")
        session = self._book.get(session_id, Provider.LIVEAVATAR)
        if not isinstance(session, LiveAvatarSession):
            raise LiveAvatarError(404, "Session not found")
        secret = request.query.get("token", "")
        if not hmac.compare_digest(secret.encode(), session.ws_secret.encode()):
            raise LiveAvatarError(401, "Invalid or missing websocket token")
        if session.lite is None:
            raise LiveAvatarError(409, "a FULL mode session has no websocket; its commands "
                                       "travel in the LiveKit room")
        if session.state is State.NEW:
            raise LiveAvatarError(409, "Session not started")
        if not session.is_open:
            raise LiveAvatarError(409, "Session already stopped")
        session.touch()
        return await session.lite.serve(request)


def _get(body: dict[str, Any], name: str, default: Any) -> Any:
    value = body.get(name)
    return default if value is None else value
