"""HeyGen Streaming API v2 (LiveKit) emulation: ``/v1/streaming.*``.

Follows ../shared/specs/heygen-api.md (§2 envelopes, §3 endpoints, §4 errors, §5 lifetime,
§6 LiveKit conventions, §13 fake design). Where the spec is INFERRED, so is this module:

* Auth: ``x-api-key`` everywhere; ``Authorization: Bearer <session token>`` everywhere except
  ``create_token``. A session token is single-use for ``streaming.new`` and from then on
  authorises calls about that one session only (the SDK keeps sending it).
* Errors: HTTP 400 ``{"code": 100xx, "message"}`` for session errors (10001-10005 "session
  state wrong: <state>", 10006 "Session not found", 10007 "Concurrent limit reached"),
  40001 for a missing parameter, 400175 for an invalid one, HTTP 401 + 400112 for bad
  credentials.
* Only ``version: "v2"`` is emulated; v1 (raw WebRTC) was retired on 2025-02-28.
* The room is named after the session id and created at ``streaming.new``; the avatar
  (identity ``heygen``) joins at ``streaming.start``, which returns once it publishes.
  ``access_token`` is for identity ``client`` (name ``client``, 24 h), ``livekit_agent_token``
  for identity ``agent``. ``realtime_endpoint`` is null: bring-your-own-audio is not emulated.
* ``streaming.task``: ``repeat`` speaks the text; ``talk`` (and v1's ``chat``) speaks
  :func:`~gateway.sim.sessions.answer` of the text and the session's knowledge base.
  ``sync`` (the documented default) answers after ``avatar_stop_talking``; ``async`` at once.
  ``task_id`` and ``duration_ms`` are the ones the avatar's events carry.
* Activity that resets the idle timer: task, interrupt, keep_alive, start/stop_listening,
  text sent over LiveKit or the chat socket, voice activity.
* The chat socket ``/v1/ws/streaming.chat`` (:mod:`gateway.sim.heygen_chat`): the SDK's
  default ``speak()`` arrives there as a protobuf text frame and is answered like ``talk``;
  its websocket voice chat sends the microphone there.
* Voice chat (:mod:`gateway.sim.heygen_listen`): like the real service, the simulator hears
  every microphone of a session, over the chat socket or published into the room, with no
  ``start_listening`` needed (INFERRED: after ``stop_listening`` it hears nothing until
  ``start_listening``). Each utterance gives ``user_start`` / ``user_stop`` (on the chat
  sockets as ``event_type``; as LiveKit data ``{"type": ...}`` when no socket is open), then,
  transcribed offline by PocketSphinx, ``user_talking_message`` and ``user_end_message``
  (LiveKit data, ``task_id`` + ``message``), and the avatar answers the words like ``talk``.
  The avatar does not hear while it speaks (its voice through the user's speakers).
* Text sent by a client as a LiveKit data packet holding a JSON string (the SDK's LiveKit
  transport for ``talk``) is answered like a ``talk`` task.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..avatar.stt import RecognizerProcess
from ..config import QUALITY_TIERS
from ..errors import Conflict, GatewayError
from ..upstream.base import AvatarEvent
from .config import SimSettings
from .heygen_chat import ChatHub
from .room import heygen_event_json
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

PREFIX = "/v1/streaming."
CHAT_PATH = "/v1/ws/streaming.chat"
_TOKENS_KEPT = 4096
_STATE_CODES = {State.NEW: 10001, State.CONNECTING: 10002, State.CONNECTED: 10003,
                State.CLOSING: 10004, State.CLOSED: 10005}


class HeyGenError(SimApiError):
    @classmethod
    def unauthorized(cls, why: str) -> HeyGenError:
        return cls(401, 400112, f"Unauthorized: {why}")

    @classmethod
    def missing(cls, name: str) -> HeyGenError:
        return cls(400, 40001, f"Missing required parameter: {name}")

    @classmethod
    def invalid(cls, message: str) -> HeyGenError:
        return cls(400, 400175, f"Invalid parameter: {message}")

    @classmethod
    def state(cls, state: State) -> HeyGenError:
        return cls(400, _STATE_CODES[state], f"session state wrong: {state}")


def ok(data: Any = None) -> web.Response:
    return web.json_response({"code": 100, "message": "success", "data": data})


class HeyGenSession(SimSession):
    provider = Provider.HEYGEN

    def __init__(self, *, settings: SimSettings, recognizer: RecognizerProcess,
                 **fields: Any) -> None:
        super().__init__(**fields)
        self._sends: set[asyncio.Task[None]] = set()
        self.chat = ChatHub(recognizer, max_frame_bytes=settings.chat_max_frame_bytes,
                            max_text_chars=settings.max_text_chars, send_data=self._publish,
                            talk=self.talk, touch=self.touch, deaf=self._avatar_speaking)

    def wire(self, event: AvatarEvent) -> bytes | None:
        return heygen_event_json(event)

    def on_data(self, sender: str, topic: str, payload: bytes) -> None:
        try:
            message = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return
        if not isinstance(message, str) or message.startswith("push_to_talk:"):
            return
        self.talk(message)

    def talk(self, text: str) -> str | None:
        """Answer what the user said (a ``talk`` without a task id in return); returns why
        not, or None once the answer is queued."""
        if self.state is not State.CONNECTED:
            return f"session state wrong: {self.state}"
        self.touch()
        reply = answer(text, self.knowledge_base)

        async def talk() -> None:
            await self.speak(reply)

        return None if self.submit(talk) else "too many commands are pending"

    def _avatar_speaking(self) -> bool:
        avatar = self.room.avatar if self.room is not None else None
        return avatar is not None and avatar.speaking

    def _publish(self, payload: bytes) -> None:
        # Straight into the room, not behind the session's command queue: user events must
        # not wait for the avatar to finish synthesising an answer. Tasks run in FIFO order.
        room = self.room
        if room is None or room.closed:
            return
        task = asyncio.get_running_loop().create_task(room.send_data(payload),
                                                      name="sim-heygen-user-event")
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _shutdown(self) -> None:
        # The session is ending (``stop_reason`` is set): its sockets and ears go first.
        await self.chat.close(self.stop_reason or "stopped")
        for task in self._sends:
            task.cancel()
        await asyncio.gather(*self._sends, return_exceptions=True)
        await super()._shutdown()


@dataclass(slots=True)
class _SessionToken:
    session_id: str | None = None
    """Bound at ``streaming.new``; None while unused."""


@dataclass(frozen=True, slots=True)
class _Caller:
    api_key: bool
    token: str | None = None


class HeyGenApi:
    """The ``/v1/streaming.*`` routes over a :class:`SessionBook`."""

    def __init__(self, settings: SimSettings, book: SessionBook) -> None:
        self._settings = settings
        self._book = book
        self._tokens: OrderedDict[str, _SessionToken] = OrderedDict()
        self._recognizer = RecognizerProcess()
        """One offline recognizer (a child process) for every session's voice chat."""

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(CHAT_PATH, self.chat)
        app.on_cleanup.append(self._close)
        app.router.add_post(PREFIX + "create_token", self.create_token)
        app.router.add_post(PREFIX + "new", self.new)
        app.router.add_post(PREFIX + "start", self.start)
        app.router.add_post(PREFIX + "task", self.task)
        app.router.add_post(PREFIX + "interrupt", self.interrupt)
        app.router.add_post(PREFIX + "keep_alive", self.keep_alive)
        app.router.add_post(PREFIX + "start_listening", self.start_listening)
        app.router.add_post(PREFIX + "stop_listening", self.stop_listening)
        app.router.add_post(PREFIX + "stop", self.stop)
        app.router.add_get(PREFIX + "list", self.list)

    async def _close(self, app: web.Application) -> None:
        await self._recognizer.close()

    def session_for_token(self, token: str) -> str | None:
        entry = self._tokens.get(token)
        return entry.session_id if entry is not None else None

    # -- auth and parsing ------------------------------------------------------------------

    def _caller(self, request: web.Request, *, token_allowed: bool = True) -> _Caller:
        key = request.headers.get("x-api-key")
        if key is not None:
            if hmac.compare_digest(key.encode(), self._settings.heygen_api_key.reveal().encode()):
                return _Caller(api_key=True)
            raise HeyGenError.unauthorized("invalid API key")
        header = request.headers.get("Authorization", "")
        if token_allowed and header.startswith("Bearer "):
            token = header[7:].strip()
            if token in self._tokens:
                return _Caller(api_key=False, token=token)
            raise HeyGenError.unauthorized("invalid or expired session token")
        raise HeyGenError.unauthorized(
            "send your API key as 'x-api-key'" if not token_allowed else
            "send 'x-api-key: <API key>' or 'Authorization: Bearer <session token>'")

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise HeyGenError.invalid(
                f"the body is larger than {self._settings.max_body_bytes} bytes") from None
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HeyGenError.invalid(f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise HeyGenError.invalid("the body must be a JSON object")
        return body

    async def _session(self, request: web.Request) -> tuple[HeyGenSession, dict[str, Any]]:
        caller = self._caller(request)
        body = await self._body(request)
        session_id = body.get("session_id")
        if session_id is None or session_id == "":
            raise HeyGenError.missing("session_id")
        if not isinstance(session_id, str):
            raise HeyGenError.invalid("session_id must be a string")
        if caller.token is not None and self.session_for_token(caller.token) != session_id:
            raise HeyGenError.unauthorized("this session token does not belong to the session")
        session = self._book.get(session_id, Provider.HEYGEN)
        if not isinstance(session, HeyGenSession):
            raise HeyGenError(400, 10006, "Session not found")
        return session, body

    @staticmethod
    def _require(session: HeyGenSession, *states: State) -> None:
        if session.state not in states:
            raise HeyGenError.state(session.state)

    # -- endpoints -------------------------------------------------------------------------

    async def create_token(self, request: web.Request) -> web.Response:
        self._caller(request, token_allowed=False)
        token = secrets.token_urlsafe(32)
        self._tokens[token] = _SessionToken()
        while len(self._tokens) > _TOKENS_KEPT:
            self._tokens.popitem(last=False)
        return web.json_response({"error": None, "data": {"token": token}})

    async def new(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        if caller.token is not None and self._tokens[caller.token].session_id is not None:
            raise HeyGenError.unauthorized("this session token was already used for "
                                           "streaming.new; create a new token per session")
        body = await self._body(request)
        params = self._new_params(body)
        if self._book.at_capacity(Provider.HEYGEN):
            raise HeyGenError(400, 10007, "Concurrent limit reached")
        session = HeyGenSession(settings=self._settings, recognizer=self._recognizer,
                                session_id=new_session_id(), **params)
        if caller.token is not None:
            self._tokens[caller.token].session_id = session.id
        self._book.add(session)
        room = self._book.create_room(session)
        room.on_microphone = session.chat.on_microphone
        livekit = self._book.livekit
        limit = session.duration_limit
        own = session.own_room  # else the client has its own tokens for its own room
        return ok({
            "session_id": session.id,
            "url": livekit_url(request, self._settings) if own else None,
            "access_token": livekit.token("client", room.name, name="client") if own else None,
            "livekit_agent_token": livekit.token("agent", room.name, name="agent")
            if own else None,
            "realtime_endpoint": None,
            "is_paid": True,
            "session_duration_limit": int(limit) if float(limit).is_integer() else limit,
            "sdp": None,
            "ice_servers": None,
            "ice_servers2": None,
        })

    def _new_params(self, body: dict[str, Any]) -> dict[str, Any]:
        settings = self._settings
        if body.get("version") != "v2":
            raise HeyGenError.invalid(
                "version must be 'v2': the simulator emulates the LiveKit flow only "
                "(raw-WebRTC v1 sessions were retired on 2025-02-28)")
        room, identity = self._livekit_settings(body.get("livekit_settings"))
        quality = _choice(body, "quality", ("low", "medium", "high"), "low")
        codec = _choice(body, "video_encoding", ("H264", "VP8"), "VP8")
        avatar = _get(body, "avatar_id", _get(body, "avatar_name", "default"))
        if not isinstance(avatar, str):
            raise HeyGenError.invalid("avatar_id must be a string")
        if not isinstance(_get(body, "voice", {}), dict):
            raise HeyGenError.invalid("voice must be an object")
        knowledge = _get(body, "knowledge_base", "")
        if not isinstance(knowledge, str):
            raise HeyGenError.invalid("knowledge_base must be a string")
        disable_idle = _get(body, "disable_idle_timeout", False)
        if not isinstance(disable_idle, bool):
            raise HeyGenError.invalid("disable_idle_timeout must be a boolean")
        idle = body.get("activity_idle_timeout")
        if idle is None:
            idle = settings.idle_timeout_default
        elif (isinstance(idle, bool) or not isinstance(idle, int | float)
              or not settings.idle_timeout_min <= idle <= settings.idle_timeout_max):
            raise HeyGenError.invalid(
                f"activity_idle_timeout must be a number of seconds from "
                f"{settings.idle_timeout_min:g} to {settings.idle_timeout_max:g}")
        return {
            "avatar_id": avatar, "quality": QUALITY_TIERS[quality], "video_codec": codec,
            "voice": "en-us", "knowledge_base": knowledge, "mode": "v2",
            "idle_timeout": None if disable_idle else float(idle),
            "duration_limit": settings.session_duration_limit,
            "livekit_room": room, "avatar_identity": identity,
        }

    def _livekit_settings(self, value: Any) -> tuple[str | None, str | None]:
        """(room, avatar identity) of ``livekit_settings`` (the client's own LiveKit:
        ``{url, room, token}``, the field names of HeyGen's prototype LiveKit plugin; the
        token is the avatar's); (None, None) without it."""
        if value is None:
            return None, None
        if not isinstance(value, dict):
            raise HeyGenError.invalid("livekit_settings must be an object {url, room, token}")
        for field in ("url", "room", "token"):
            if not isinstance(value.get(field), str) or not value[field]:
                raise HeyGenError.invalid(f"livekit_settings.{field} must be a non-empty string")
        grant = self._book.livekit.verify(value["token"])
        if grant is None:
            raise HeyGenError.invalid(
                "livekit_settings.token: only this simulator's own LiveKit server is emulated; "
                "the token must be a room-join token signed with its LiveKit key and secret")
        if grant.room != value["room"]:
            raise HeyGenError.invalid(f"livekit_settings.token joins room {grant.room!r}, "
                                      f"not {value['room']!r}")
        return grant.room, grant.identity

    async def start(self, request: web.Request) -> web.Response:
        session, _ = await self._session(request)
        self._require(session, State.NEW)
        try:
            await self._book.start(session)
        except (TimeoutError, GatewayError) as exc:
            if session.stop_reason not in (None, "start_failed"):  # expired, shut down, …
                raise HeyGenError.state(session.state) from None
            raise HeyGenError(500, 500, f"the avatar could not join the room: {exc}") from None
        if session.state is not State.CONNECTED:
            raise HeyGenError.state(session.state)
        return ok()

    async def task(self, request: web.Request) -> web.Response:
        session, body = await self._session(request)
        self._require(session, State.CONNECTED)
        text = body.get("text")
        if text is None:
            raise HeyGenError.missing("text")
        if not isinstance(text, str) or not text.strip():
            raise HeyGenError.invalid("text must be a non-empty string")
        if len(text) > self._settings.max_text_chars:
            raise HeyGenError.invalid(f"text is longer than {self._settings.max_text_chars} "
                                      f"characters")
        task_type = _choice(body, "task_type", ("repeat", "talk", "chat"), "repeat")
        task_mode = _choice(body, "task_mode", ("sync", "async"), "sync")
        session.touch()
        spoken = text if task_type == "repeat" else answer(text, session.knowledge_base)
        try:
            result = await session.speak(spoken, wait=task_mode == "sync")
        except (AvatarGone, Conflict):
            raise _avatar_gone() from None
        except GatewayError as exc:  # the avatar refused the text (too long, empty, …)
            raise HeyGenError.invalid(exc.message) from None
        except TimeoutError:
            raise HeyGenError(500, 500, "the avatar never reported the end of the task") from None
        if session.state is not State.CONNECTED:
            raise HeyGenError.state(session.state)
        return ok({"task_id": result.task_id, "duration_ms": result.duration_ms})

    async def interrupt(self, request: web.Request) -> web.Response:
        session, _ = await self._session(request)
        self._require(session, State.CONNECTED)
        session.touch()
        try:
            await session.avatar().interrupt()
        except AvatarGone:
            raise _avatar_gone() from None
        return ok()

    async def keep_alive(self, request: web.Request) -> web.Response:
        session, _ = await self._session(request)
        self._require(session, State.NEW, State.CONNECTING, State.CONNECTED)
        session.touch()
        return ok()

    async def start_listening(self, request: web.Request) -> web.Response:
        return await self._listen(request, True)

    async def stop_listening(self, request: web.Request) -> web.Response:
        return await self._listen(request, False)

    async def _listen(self, request: web.Request, listening: bool) -> web.Response:
        session, _ = await self._session(request)
        self._require(session, State.CONNECTED)
        session.touch()
        assert session.room is not None  # connected sessions have a room
        session.room.listening = listening
        session.chat.listener.set_enabled(listening)
        return ok()

    async def stop(self, request: web.Request) -> web.Response:
        session, _ = await self._session(request)
        self._require(session, State.NEW, State.CONNECTING, State.CONNECTED)
        await self._book.stop(session, "stopped")
        return ok()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/ws/streaming.chat?session_id=..&session_token=..``: the chat socket
        (:mod:`gateway.sim.heygen_chat`). The SDK authenticates with the token it was built
        with (the session's ``create_token`` token); a server may send its API key."""
        session_id = request.query.get("session_id", "")
        if not session_id:
            raise HeyGenError.missing("session_id")
        key = request.headers.get("x-api-key")
        token = request.query.get("session_token", "")
        if key is not None:
            self._caller(request)  # raises unless it is the API key
        elif not token:
            raise HeyGenError.unauthorized("send session_token=<the session's create_token "
                                           "token> in the query")
        elif self.session_for_token(token) != session_id:
            raise HeyGenError.unauthorized("invalid session token for this session")
        session = self._book.get(session_id, Provider.HEYGEN)
        if not isinstance(session, HeyGenSession):
            raise HeyGenError(400, 10006, "Session not found")
        self._require(session, State.NEW, State.CONNECTING, State.CONNECTED)
        if session.chat.full:
            raise HeyGenError(400, 10014, "Session full: this session has as many chat "
                                          "sockets open as it may")
        return await session.chat.serve(request)

    async def list(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        own = self.session_for_token(caller.token) if caller.token is not None else None
        sessions = [
            {"session_id": s.id, "status": str(s.state),
             "created_at": int(s.created_at)}
            for s in self._book.open_sessions(Provider.HEYGEN)
            if caller.api_key or s.id == own
        ]
        return ok({"sessions": sessions})


def _get(body: dict[str, Any], name: str, default: Any) -> Any:
    """A field, with JSON ``null`` meaning "not given" (pipecat sends nulls)."""
    value = body.get(name)
    return default if value is None else value


def _choice(body: dict[str, Any], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = body.get(name)
    if value is None:
        return default
    if value not in allowed:
        raise HeyGenError.invalid(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return str(value)


def _avatar_gone() -> HeyGenError:
    return HeyGenError(500, 500, "the avatar has left the room; stop this session and "
                                 "create a new one")
