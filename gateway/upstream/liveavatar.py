"""LiveAvatar (HeyGen's successor API): the REST client and FULL-mode command encoding.

Follows specs/heygen-api.md §11. The API key creates a session token; the session token
(``Authorization: Bearer``) starts, keeps alive and stops that one session. Speech is not a
REST call: in FULL mode commands travel on the LiveKit data topic ``agent-control`` and the
avatar answers on ``agent-response``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..config import QualityTier, Secret
from ..errors import Conflict, UpstreamError, UpstreamSessionGone
from ..journal import SessionJournal
from ..metrics import Metrics
from .base import AvatarEvent, EventType, SpeakResult, TaskType
from .cloud import ProviderSession, ReconnectPolicy, RoomCredentials, RoomUpstream
from .rest import JsonApi, RetryPolicy

logger = logging.getLogger(__name__)

CONTROL_TOPIC = "agent-control"
RESPONSE_TOPIC = "agent-response"
LIVEAVATAR_QUALITIES = ("very_high", "high", "medium", "low")


@dataclass(frozen=True, slots=True)
class LiveAvatarSession:
    session_id: str
    session_token: str
    livekit_url: str
    client_token: str
    agent_token: str | None
    max_duration: float | None


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
        self._api = JsonApi(self.provider, base_url, session, metrics, timeout=timeout, retry=retry)
        self._api_key = api_key

    def _bearer(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    async def create(self, *, avatar_id: str, quality: str = "high",
                     encoding: str = "VP8") -> tuple[str, str]:
        """``sessions/token``: a FULL-mode session id and the token that controls it."""
        data = await self._api.call(
            "POST", "/v1/sessions/token", endpoint="sessions.token",
            headers={"X-API-KEY": self._api_key.reveal(), "Content-Type": "application/json"},
            body={"mode": "FULL", "avatar_id": avatar_id,
                  "video_settings": {"encoding": encoding, "quality": quality}},
        )
        try:
            return str(data["session_id"]), str(data["session_token"])
        except (KeyError, TypeError) as exc:
            raise UpstreamError(f"liveavatar sessions/token: unusable response ({exc!r})") from None

    async def start(self, session_id: str, session_token: str) -> LiveAvatarSession:
        data = await self._api.call("POST", "/v1/sessions/start", endpoint="sessions.start",
                                    headers=self._bearer(session_token),
                                    body={"session_id": session_id}, safe_to_retry=True)
        try:
            return LiveAvatarSession(
                session_id=session_id,
                session_token=session_token,
                livekit_url=str(data["livekit_url"]),
                client_token=str(data["livekit_client_token"]),
                agent_token=data.get("livekit_agent_token") or None,
                max_duration=float(data["max_session_duration"])
                if data.get("max_session_duration") else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UpstreamError(f"liveavatar sessions/start: unusable response ({exc!r})") from None

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


def decode_response(payload: bytes, topic: str) -> list[AvatarEvent]:
    if topic != RESPONSE_TOPIC:
        return []
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return []
    if not isinstance(body, dict):
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
    answers_itself = True
    listens = True

    def __init__(
        self,
        client: LiveAvatarClient,
        quality: QualityTier,
        journal: SessionJournal,
        *,
        avatar_id: str,
        encoding: str = "VP8",
        reconnect: ReconnectPolicy | None = None,
        words_per_minute: int = 165,
    ) -> None:
        super().__init__(quality, journal, reconnect)
        self._client = client
        self._avatar_id = avatar_id
        self._encoding = encoding
        self._token = ""
        self._wpm = words_per_minute
        self._started: dict[str, asyncio.Future[AvatarEvent]] = {}

    async def _create_session(self) -> ProviderSession:
        # LiveAvatar names one rung more than HeyGen; our tiers map onto its lower three.
        session_id, token = await self._client.create(
            avatar_id=self._avatar_id, quality=self._quality.name, encoding=self._encoding)
        self._token = token
        return ProviderSession(session_id, {"session_token": token})

    async def _start_session(self, session: ProviderSession) -> RoomCredentials:
        started = await self._client.start(session.session_id, self._token)
        return RoomCredentials(started.livekit_url, started.agent_token or started.client_token,
                               started.max_duration)

    async def _close_session(self, session: ProviderSession) -> None:
        await self._client.stop(session.session_id, self._token)

    def _decode_event(self, payload: bytes, topic: str) -> list[AvatarEvent]:
        events = decode_response(payload, topic)
        for event in events:
            if event.type is EventType.AVATAR_START_TALKING and event.task_id is not None:
                waiter = self._started.get(event.task_id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(event)
        return events

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
