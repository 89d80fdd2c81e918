"""LiveAvatar API emulation: ``/v1/sessions/*`` and FULL-mode room events.

Follows ../shared/specs/heygen-api.md §11 and LiveAvatar's public docs (FULL-mode events).
INFERRED where the docs are silent:

* Envelope ``{"code", "data", "message"}``; success code 100. Errors carry
  ``code = 4000 + (HTTP status - 400)``, generalised from the one observed error
  (403 ``{"code": 4003, "data": null, "message": "Not authenticated"}`` for a request
  without credentials): 401 bad credentials, 404 unknown session, 409 wrong state,
  422 invalid body, 429 concurrency limit reached.
* ``/sessions/token`` needs ``X-API-KEY`` (a HeyGen key is refused); ``/sessions/start``
  needs ``Authorization: Bearer <session_token>`` (an API key there is a 401 — the classic
  mistake the docs warn about); ``/sessions/stop`` and ``/sessions/keep-alive`` take either
  (with the API key the body names ``session_id``).
* A token creates the session (ledger row, state ``new``); only started sessions count toward
  the concurrency limit. ``video_settings.quality`` ``very_high`` renders like ``high`` (720p).
  ``livekit_config`` (your own LiveKit) is refused with 422: not emulated.
* The room is created at start; the client token is for identity ``client``, the agent token
  for ``agent``. ``ws_url`` is null: LITE mode's audio websocket is not emulated (a LITE
  session still gets its room and idle avatar).
* FULL mode: commands are JSON data packets on topic ``agent-control`` (``avatar.speak_text``,
  ``avatar.speak_response`` — answered by :func:`~gateway.sim.sessions.answer` — ,
  ``avatar.interrupt``, ``avatar.start_listening``/``stop_listening``,
  ``user.start_push_to_talk``/``stop_push_to_talk``), executed in order. Events go out on
  ``agent-response`` as ``{event_id, event_type, session_id, source_event_id, …}``:
  ``avatar.transcription {text}`` as soon as a speak command is taken, ``avatar.speak_started``
  / ``avatar.speak_ended`` from the avatar, ``user.speak_started`` / ``user.speak_ended`` from
  voice activity (FULL sessions start listening), ``session.stopped {end_reason}`` last.
  There is no speech recognition, so no ``user.transcription``.
* A session closes after ``liveavatar_idle_timeout`` (5 min) without keep-alive or command.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import uuid
from collections import OrderedDict
from typing import Any

from aiohttp import web

from ..config import QUALITY_TIERS
from ..errors import Conflict, GatewayError
from ..upstream.base import AvatarEvent, EventType
from .config import SimSettings
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
CONTROL_TOPIC = "agent-control"
RESPONSE_TOPIC = "agent-response"
_TOKENS_KEPT = 4096
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


def ok(data: Any = None) -> web.Response:
    return web.json_response({"code": 100, "data": data, "message": "success"})


class LiveAvatarSession(SimSession):
    provider = Provider.LIVEAVATAR
    event_topic = RESPONSE_TOPIC

    def __init__(self, *, full: bool, max_text_chars: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.full = full
        self.max_text_chars = max_text_chars
        self.end_reason: str | None = None
        """What ``session.stopped`` reports; set by a client's stop request."""
        self._sources: OrderedDict[str, str] = OrderedDict()
        """task id -> event id of the command that asked for it."""

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
        event_type = _WIRE_EVENTS.get(event.type)
        if event_type is None:
            return None
        source = self._sources.get(event.task_id) if event.task_id is not None else None
        return self.event(event_type, source)

    async def _emit(self, event_type: str, source: str | None = None, **data: Any) -> None:
        if self.room is not None:
            await self.room.send_data(self.event(event_type, source, **data),
                                      topic=RESPONSE_TOPIC)

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

    async def before_close(self, reason: str) -> None:
        await self._emit("session.stopped", end_reason=self.end_reason or reason.upper())
        # The event rides SCTP, the LeaveRequest that follows rides the signaling WebSocket
        # and would overtake it: the client would hang up before the event arrives.
        await asyncio.sleep(_LAST_WORDS_GRACE)


class LiveAvatarApi:
    """The ``/v1/sessions/*`` routes over a :class:`SessionBook`."""

    def __init__(self, settings: SimSettings, book: SessionBook) -> None:
        self._settings = settings
        self._book = book
        self._tokens: OrderedDict[str, str] = OrderedDict()
        """session token -> session id"""

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(PREFIX + "token", self.token)
        app.router.add_post(PREFIX + "start", self.start)
        app.router.add_post(PREFIX + "stop", self.stop)
        app.router.add_post(PREFIX + "keep-alive", self.keep_alive)

    def session_for_token(self, token: str) -> str | None:
        return self._tokens.get(token)

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
        """The session id a Bearer session token names; None when absent; 401 when unknown."""
        header = request.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        session_id = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
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
            raise LiveAvatarError(422, f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise LiveAvatarError(422, "the body must be a JSON object")
        return body

    async def _session(self, request: web.Request, *,
                       api_key_allowed: bool) -> tuple[LiveAvatarSession, dict[str, Any]]:
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
            raise LiveAvatarError(422, "session_id must be a string")
        if token_session is not None and named and named != token_session:
            raise LiveAvatarError(403, "the session token does not belong to this session")
        session_id = token_session or named
        if not session_id:
            raise LiveAvatarError(422, "session_id is required with an API key")
        session = self._book.get(session_id, Provider.LIVEAVATAR)
        if not isinstance(session, LiveAvatarSession):
            raise LiveAvatarError(404, "Session not found")
        return session, body

    # -- endpoints -------------------------------------------------------------------------

    async def token(self, request: web.Request) -> web.Response:
        if not self._api_key(request):
            raise LiveAvatarError(403, "Not authenticated")
        body = await self._body(request)
        params = self._token_params(body)
        session = LiveAvatarSession(session_id=new_session_id(),
                                    max_text_chars=self._settings.max_text_chars, **params)
        token = secrets.token_urlsafe(32)
        self._tokens[token] = session.id
        while len(self._tokens) > _TOKENS_KEPT:
            self._tokens.popitem(last=False)
        self._book.add(session)
        return ok({"session_id": session.id, "session_token": token})

    def _token_params(self, body: dict[str, Any]) -> dict[str, Any]:
        settings = self._settings
        mode = body.get("mode")
        if mode not in ("FULL", "LITE"):
            raise LiveAvatarError(422, f"mode must be FULL or LITE; got {mode!r}")
        avatar = body.get("avatar_id")
        if not isinstance(avatar, str) or not avatar:
            raise LiveAvatarError(422, "avatar_id is required")
        if body.get("livekit_config") is not None:
            raise LiveAvatarError(422, "livekit_config (your own LiveKit room) is not emulated; "
                                       "omit it to use the simulator's room")
        video = _get(body, "video_settings", {})
        if not isinstance(video, dict):
            raise LiveAvatarError(422, "video_settings must be an object")
        encoding = video.get("encoding", "VP8")
        if encoding not in ("VP8", "H264"):
            raise LiveAvatarError(422, f"video_settings.encoding must be VP8 or H264; "
                                       f"got {encoding!r}")
        quality = video.get("quality", body.get("video_quality", "high"))
        if quality not in _QUALITIES:
            raise LiveAvatarError(422, f"video_settings.quality must be one of "
                                       f"{', '.join(_QUALITIES)}; got {quality!r}")
        limit = body.get("max_session_duration")
        if limit is None:
            limit = settings.session_duration_limit
        elif (isinstance(limit, bool) or not isinstance(limit, int | float)
              or not 0 < limit <= settings.session_duration_limit):
            raise LiveAvatarError(422, f"max_session_duration must be a number of seconds up to "
                                       f"{settings.session_duration_limit:g}")
        persona = _get(body, "avatar_persona", {})
        if not isinstance(persona, dict):
            raise LiveAvatarError(422, "avatar_persona must be an object")
        return {
            "avatar_id": avatar, "quality": QUALITY_TIERS[_QUALITIES[quality]],
            "video_codec": encoding, "voice": "en-us", "knowledge_base": "", "mode": mode,
            "idle_timeout": settings.liveavatar_idle_timeout, "duration_limit": float(limit),
            "full": mode == "FULL",
        }

    async def start(self, request: web.Request) -> web.Response:
        session, _ = await self._session(request, api_key_allowed=False)
        if session.state is not State.NEW:
            raise LiveAvatarError(409, "Session already started" if session.is_open
                                  else "Session already stopped")
        if self._book.at_capacity(Provider.LIVEAVATAR):
            raise LiveAvatarError(429, "Concurrent session limit reached")
        try:
            await self._book.start(session)
        except (TimeoutError, GatewayError) as exc:
            raise LiveAvatarError(500, f"the avatar could not join the room: {exc}") from None
        if not session.is_open:  # stopped (expired, shut down) while the avatar joined
            raise LiveAvatarError(409, "Session already stopped")
        room = self._book.create_room(session)
        if session.full:
            room.listening = True
        livekit = self._book.livekit
        limit = session.duration_limit
        return ok({
            "session_id": session.id,
            "livekit_url": livekit_url(request, self._settings),
            "livekit_client_token": livekit.token("client", room.name, name="client"),
            "livekit_agent_token": livekit.token("agent", room.name, name="agent"),
            "max_session_duration": int(limit) if float(limit).is_integer() else limit,
            "ws_url": None,
        })

    async def stop(self, request: web.Request) -> web.Response:
        session, body = await self._session(request, api_key_allowed=True)
        reason = body.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise LiveAvatarError(422, "reason must be a string")
        if not session.is_open:
            raise LiveAvatarError(409, "Session already stopped")
        session.end_reason = reason
        await self._book.stop(session, "stopped")
        return ok()

    async def keep_alive(self, request: web.Request) -> web.Response:
        session, _ = await self._session(request, api_key_allowed=True)
        if session.state is State.NEW:
            raise LiveAvatarError(409, "Session not started")
        if not session.is_open:
            raise LiveAvatarError(409, "Session already stopped")
        session.touch()
        return ok()


def _get(body: dict[str, Any], name: str, default: Any) -> Any:
    value = body.get(name)
    return default if value is None else value
