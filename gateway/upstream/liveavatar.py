"""LiveAvatar (HeyGen's successor API): the REST client and FULL-mode command encoding.

Follows specs/heygen-api.md §11 and its corrections, taken from LiveAvatar's own clients
(``@heygen/liveavatar-web-sdk`` 0.0.18, ``livekit-plugins-liveavatar`` 1.8.9). The API key
creates a session token; the session token (``Authorization: Bearer``) starts, keeps alive and
stops that one session. Success is ``code`` 1000. The gateway joins the room with
``livekit_client_token``, as the web SDK does. Speech is not a REST call: in FULL mode commands
travel on the LiveKit data topic ``agent-control`` and the answers (``agent-response``) come
from the agent participant ``liveavatar-agent-<session_id>``; LITE mode
(:mod:`.liveavatar_lite`) speaks over the session's websocket instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

import aiohttp

from ..config import QualityTier, Secret
from ..errors import (
    Conflict,
    GatewayError,
    UpstreamError,
    UpstreamQuotaExceeded,
    UpstreamSessionGone,
)
from ..livekit_out import OperatorRoom
from ..metrics import Metrics
from .base import AvatarEvent, EventType, SpeakResult, TaskType
from .billing import BillingGuard
from .cloud import ProviderSession, ReconnectPolicy, RoomCredentials, RoomUpstream
from .rest import JsonApi, RetryPolicy

logger = logging.getLogger(__name__)

CONTROL_TOPIC = "agent-control"
RESPONSE_TOPIC = "agent-response"
LIVEAVATAR_QUALITIES = ("very_high", "high", "medium", "low")


AGENT_PREFIX = "liveavatar-agent-"
"""The agent participant that speaks for the avatar: ``liveavatar-agent-<session_id>``."""


@dataclass(frozen=True, slots=True)
class LiveAvatarSession:
    session_id: str
    session_token: str
    livekit_url: str
    client_token: str
    max_duration: float | None
    ws_url: str | None = None
    """LITE mode: the websocket that takes the audio to lip-sync."""


def _classify(status: int, code: Any, message: str) -> GatewayError | None:
    """LiveAvatar answers a request on a stopped session with 409 "Session already stopped":
    for the gateway that session is gone (stop succeeded, keep-alive must not rejoin)."""
    text = message.lower()
    if status == 409 and ("stopped" in text or "closed" in text or "ended" in text):
        return UpstreamSessionGone("")
    if status == 429 or "concurrent" in text:
        return UpstreamQuotaExceeded("", retry_after=30)
    return None


def _text(data: Any, key: str, endpoint: str) -> str:
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, str) or not value:
        raise UpstreamError(f"liveavatar {endpoint}: unusable response (no {key!r})")
    return value


class LiveAvatarClient:
    provider = "liveavatar"

    def __init__(
        self,
        base_url: str,
        api_key: Secret,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        *,
        timeout: float = 15.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._api = JsonApi(self.provider, base_url, session, metrics, timeout=timeout,
                            retry=retry, classify=_classify)
        self._api_key = api_key

    def _bearer(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    async def create(self, *, avatar_id: str, quality: str = "high", encoding: str = "VP8",
                     mode: str = "FULL", room: OperatorRoom | None = None) -> tuple[str, str]:
        """``sessions/token``: a session id and the token that controls it. With ``room``,
        the avatar joins that room of the operator's LiveKit (``livekit_config``)."""
        body: dict[str, Any] = {"mode": mode, "avatar_id": avatar_id,
                                "video_settings": {"encoding": encoding, "quality": quality}}
        if room is not None:
            body["livekit_config"] = {"livekit_url": room.url, "livekit_room": room.room,
                                      "livekit_client_token": room.provider_token}
        data = await self._api.call(
            "POST", "/v1/sessions/token", endpoint="sessions.token",
            headers={"X-API-KEY": self._api_key.reveal(), "Content-Type": "application/json"},
            body=body,
        )
        return (_text(data, "session_id", "sessions/token"),
                _text(data, "session_token", "sessions/token"))

    async def start(self, session_id: str, session_token: str,
                    room: OperatorRoom | None = None) -> LiveAvatarSession:
        """``sessions/start``; with ``room`` (the session's ``livekit_config``) LiveAvatar
        returns no room of its own, and the gateway joins the operator's with its token."""
        data = await self._api.call("POST", "/v1/sessions/start", endpoint="sessions.start",
                                    headers=self._bearer(session_token),
                                    body={"session_id": session_id}, safe_to_retry=True)
        if room is not None:
            url, token = room.url, room.gateway_token
        else:
            url = _text(data, "livekit_url", "sessions/start")
            token = _text(data, "livekit_client_token", "sessions/start")
        limit = data.get("max_session_duration")
        ws_url = data.get("ws_url")
        return LiveAvatarSession(
            session_id=session_id, session_token=session_token, livekit_url=url,
            client_token=token,
            max_duration=float(limit) if isinstance(limit, int | float)
            and not isinstance(limit, bool) and limit > 0 else None,
            ws_url=ws_url if isinstance(ws_url, str) and ws_url else None)

    async def keep_alive(self, session_id: str, session_token: str) -> None:
        await self._api.call("POST", "/v1/sessions/keep-alive", endpoint="sessions.keep_alive",
                             headers=self._bearer(session_token),
                             body={"session_id": session_id}, safe_to_retry=True)

    async def stop(self, session_id: str, session_token: str,
                   reason: str = "USER_DISCONNECTED") -> None:
        """Stop a session; a session the provider no longer knows counts as stopped."""
        with contextlib.suppress(UpstreamSessionGone):
            await self._api.call("POST", "/v1/sessions/stop", endpoint="sessions.stop",
                                 headers=self._bearer(session_token),
                                 body={"session_id": session_id, "reason": reason},
                                 safe_to_retry=True)


def command(event_type: str, session_id: str, event_id: str | None = None, **fields: Any) -> bytes:
    """One FULL-mode command for the ``agent-control`` topic."""
    body = {"event_id": event_id or uuid.uuid4().hex, "event_type": event_type,
            "session_id": session_id, **fields}
    return json.dumps(body, separators=(",", ":")).encode()


# FULL-mode responses (agent-response) as the gateway's events. speak_ended ends both the
# message and the talking, which HeyGen reports as two events.
_RESPONSES: dict[str, tuple[EventType, ...]] = {
    "avatar.speak_started": (EventType.AVATAR_START_TALKING,),
    "avatar.transcription": (EventType.AVATAR_TALKING_MESSAGE,),
    "avatar.speak_ended": (EventType.AVATAR_END_MESSAGE, EventType.AVATAR_STOP_TALKING),
    "user.speak_started": (EventType.USER_START,),
    "user.speak_ended": (EventType.USER_STOP,),
    "user.transcription": (EventType.USER_TALKING_MESSAGE,),
}


_ENDS = (EventType.AVATAR_END_MESSAGE, EventType.AVATAR_STOP_TALKING)
_TASKS_KEPT = 256


def _response(payload: bytes, topic: str) -> dict[str, Any] | None:
    if topic != RESPONSE_TOPIC:
        return None
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return body if isinstance(body, dict) else None


def stop_reason(payload: bytes, topic: str) -> str | None:
    """The reason of a ``session.stopped`` response (``stop_reason``; the docs say
    ``end_reason``), or None for any other packet."""
    body = _response(payload, topic)
    if body is None or body.get("event_type") != "session.stopped":
        return None
    reason = body.get("stop_reason") or body.get("end_reason")
    return str(reason)[:100] if reason else "unknown"


def decode_response(payload: bytes, topic: str) -> list[AvatarEvent]:
    body = _response(payload, topic)
    if body is None:
        return []
    kinds = _RESPONSES.get(str(body.get("event_type")), ())
    # Responses name the command they answer (``source_event_id``): that is the task id.
    task_id = body.get("task_id") or body.get("source_event_id")
    data = {k: v for k, v in body.items()
            if k not in ("event_type", "event_id", "session_id", "task_id", "source_event_id")}
    if "text" in data and "message" not in data:
        data["message"] = data.pop("text")
    return [AvatarEvent(kind, str(task_id) if task_id is not None else None, data) for kind in kinds]


class LiveAvatarUpstream(RoomUpstream):
    """A LiveAvatar FULL-mode session: REST to open/close it, LiveKit data to drive it."""

    kind = "liveavatar"
    mode: ClassVar[str] = "FULL"
    answers_itself = True
    listens = True

    def __init__(
        self,
        client: LiveAvatarClient,
        quality: QualityTier,
        billing: BillingGuard,
        *,
        avatar_id: str,
        encoding: str = "VP8",
        reconnect: ReconnectPolicy | None = None,
        words_per_minute: int = 165,
        room: OperatorRoom | None = None,
    ) -> None:
        super().__init__(quality, billing, reconnect, room)
        self._client = client
        self._avatar_id = avatar_id
        self._encoding = encoding
        self._token = ""
        self._wpm = words_per_minute
        self._started: dict[str, asyncio.Future[AvatarEvent]] = {}
        self._begun: OrderedDict[str, None] = OrderedDict()
        """Tasks the avatar started speaking (bounded)."""
        self._held: OrderedDict[str, list[AvatarEvent]] = OrderedDict()
        """Words of tasks not started yet (bounded)."""

    async def _create_session(self) -> ProviderSession:
        # LiveAvatar names one rung more than HeyGen; our tiers map onto its lower three.
        session_id, token = await self._client.create(
            avatar_id=self._avatar_id, quality=self._quality.name, encoding=self._encoding,
            mode=self.mode, room=self.operator_room)
        self._token = token
        return ProviderSession(session_id, {"session_token": token})

    async def _start_session(self, session: ProviderSession) -> RoomCredentials:
        started = await self._client.start(session.session_id, self._token, self.operator_room)
        # The client token, as LiveAvatar's web SDK joins: the agent token may carry the
        # provider agent's own identity, and LiveKit kicks out a duplicate identity.
        return RoomCredentials(started.livekit_url, started.client_token, started.max_duration,
                               ws_url=started.ws_url)

    async def _close_session(self, session: ProviderSession) -> None:
        await self._client.stop(session.session_id, self._token)

    def _event_identities(self) -> tuple[str, ...]:
        session_id = self.provider_session_id
        return (AGENT_PREFIX + session_id,) if session_id else ()

    def _decode_event(self, payload: bytes, topic: str) -> list[AvatarEvent]:
        reason = stop_reason(payload, topic)
        if reason is not None:
            # The provider ended it (its limit, its idle timer, a stop from elsewhere): end now
            # rather than rejoin a closing room.
            self._end(f"the provider stopped the session ({reason})")
            return []
        out: list[AvatarEvent] = []
        for event in decode_response(payload, topic):
            task_id = event.task_id
            if event.type is EventType.AVATAR_START_TALKING and task_id is not None:
                waiter = self._started.get(task_id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(event)
                self._begun[task_id] = None
                while len(self._begun) > _TASKS_KEPT:
                    self._begun.popitem(last=False)
                out += [event, *self._held.pop(task_id, ())]
            elif (event.type is EventType.AVATAR_TALKING_MESSAGE and task_id is not None
                  and task_id not in self._begun):
                # LiveAvatar sends the transcription when it takes the command, before the
                # avatar starts: hold it, so every upstream reports start, words, end.
                self._held.setdefault(task_id, []).append(event)
                while len(self._held) > _TASKS_KEPT:
                    self._held.popitem(last=False)
            elif event.type in _ENDS and task_id is not None:
                out += [*self._held.pop(task_id, ()), event]
            else:
                out.append(event)
        return out

    async def _command(self, event_type: str, event_id: str | None = None, **fields: Any) -> None:
        link, session_id = self.link, self.provider_session_id
        if link is None or session_id is None:
            raise Conflict("the LiveAvatar session is not connected")
        payload = command(event_type, session_id, event_id=event_id, **fields)
        await link.send_data(payload, topic=CONTROL_TOPIC)

    async def speak(self, text: str, task_type: TaskType = TaskType.REPEAT) -> SpeakResult:
        """FULL mode has no REST task: the command goes over LiveKit data, and the task id is
        the one the avatar reports when it starts speaking (or the command's id if it doesn't)."""
        kind = "avatar.speak_text" if task_type is TaskType.REPEAT else "avatar.speak_response"
        command_id = uuid.uuid4().hex
        waiter = self._started[command_id] = asyncio.get_running_loop().create_future()
        # LiveAvatar reports no duration: estimate from the words at a speaking rate.
        estimate = round(len(text.split()) / self._wpm * 60_000, 1)
        try:
            await self._command(kind, event_id=command_id, text=text)
            async with asyncio.timeout(10.0):
                started = await waiter
        except TimeoutError:
            return SpeakResult(task_id=command_id, duration_ms=estimate)
        finally:
            self._started.pop(command_id, None)
        duration = started.data.get("duration_ms")
        return SpeakResult(task_id=command_id,
                           duration_ms=float(duration) if isinstance(duration, (int, float))
                           else estimate)

    async def interrupt(self) -> None:
        await self._command("avatar.interrupt")

    async def keep_alive(self) -> None:
        if self.provider_session_id is not None:
            await self._client.keep_alive(self.provider_session_id, self._token)

    async def set_listening(self, listening: bool) -> None:
        await self._command("avatar.start_listening" if listening else "avatar.stop_listening")
