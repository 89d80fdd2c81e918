"""HeyGen Interactive Avatar (streaming API v2, LiveKit transport): the REST client.

Follows specs/heygen-api.md. The gateway authenticates with its API key (``x-api-key``) on
every call, the server-side style pipecat uses; browsers never see the key or a session token.
Only requests that cannot cost money or speak twice are retried: ``streaming.new`` (a new paid
session) and ``streaming.task`` (an utterance) get exactly one attempt.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

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
from .base import SpeakResult, TaskMode, TaskType
from .billing import BillingGuard
from .cloud import ProviderSession, ReconnectPolicy, RoomCredentials, RoomUpstream
from .rest import JsonApi, RetryPolicy

HEYGEN_QUALITIES = ("high", "medium", "low")


@dataclass(frozen=True, slots=True)
class HeyGenSession:
    session_id: str
    url: str
    """LiveKit server URL."""
    access_token: str
    """LiveKit token for the client identity: the gateway joins with it."""
    agent_token: str | None
    """LiveKit token for a backend agent, when the provider issues one (unused: it may carry
    the provider agent's own identity)."""
    duration_limit: float | None
    """``session_duration_limit`` in seconds."""


def _classify(status: int, code: Any, message: str) -> GatewayError | None:
    """HeyGen's own codes (spec §4). Codes are documented as unstable, so messages count too."""
    text = message.lower()
    if code in (10007, 10014, 10015) or "concurrent limit" in text:
        return UpstreamQuotaExceeded("", retry_after=30)
    if code == 10006 or ("not found" in text and "session" in text):
        return UpstreamSessionGone("")
    if "state wrong" in text:
        # closing/closed: the session is over; new/connecting: asked too early.
        if code in (10004, 10005) or "clos" in text:
            return UpstreamSessionGone("")
        return Conflict("")
    return None


def _field(data: Any, key: str) -> str | None:
    """A string field of an answer's ``data``; ids may come as numbers."""
    value = data.get(key) if isinstance(data, dict) else None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return value if isinstance(value, str) and value else None


def _require(value: str | None, key: str, endpoint: str) -> str:
    if value is None:
        raise UpstreamError(f"heygen {endpoint}: unusable response (no {key!r})")
    return value


class HeyGenClient:
    provider = "heygen"

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
        self._headers = {"x-api-key": api_key.reveal(), "Content-Type": "application/json"}

    async def _post(self, action: str, body: dict[str, Any], *, safe: bool) -> Any:
        return await self._api.call("POST", f"/v1/streaming.{action}", endpoint=f"streaming.{action}",
                                    headers=self._headers, body=body, safe_to_retry=safe)

    async def new_session(
        self,
        *,
        avatar_id: str,
        quality: str = "high",
        voice_id: str | None = None,
        video_encoding: str = "VP8",
        knowledge_base: str | None = None,
        activity_idle_timeout: int | None = None,
        room: OperatorRoom | None = None,
    ) -> HeyGenSession:
        """``streaming.new``. With ``room`` the avatar joins that room of the operator's
        LiveKit (``livekit_settings``), and HeyGen's answer carries no room of its own."""
        body: dict[str, Any] = {
            "version": "v2",
            "avatar_id": avatar_id,
            "quality": quality,
            "video_encoding": video_encoding,
        }
        if room is not None:
            body["livekit_settings"] = {"url": room.url, "room": room.room,
                                        "token": room.provider_token}
        if voice_id:
            body["voice"] = {"voice_id": voice_id}
        if knowledge_base:
            body["knowledge_base"] = knowledge_base
        if activity_idle_timeout is not None:
            body["activity_idle_timeout"] = activity_idle_timeout
        data = await self._post("new", body, safe=False)
        session_id = _field(data, "session_id")
        try:
            fields: dict[str, Any] = data if isinstance(data, dict) else {}
            limit = fields.get("session_duration_limit")
            agent = fields.get("livekit_agent_token")
            return HeyGenSession(
                session_id=_require(session_id, "session_id", "streaming.new"),
                url=room.url if room else _require(_field(data, "url"), "url", "streaming.new"),
                access_token=room.gateway_token if room else _require(
                    _field(data, "access_token"), "access_token", "streaming.new"),
                agent_token=agent if isinstance(agent, str) and agent else None,
                duration_limit=float(limit) if isinstance(limit, int | float)
                and not isinstance(limit, bool) and limit > 0 else None,
            )
        except UpstreamError:
            # A session was opened (and bills) but cannot be joined: close it before failing.
            if session_id:
                with contextlib.suppress(UpstreamError):
                    await self.stop(session_id)
            raise

    async def start(self, session_id: str) -> None:
        # Safe: starting an already started session is a state error, never a second session.
        await self._post("start", {"session_id": session_id}, safe=True)

    async def task(
        self, session_id: str, text: str, task_type: TaskType = TaskType.REPEAT,
        task_mode: TaskMode = TaskMode.ASYNC,
    ) -> SpeakResult:
        data = await self._post("task", {"session_id": session_id, "text": text,
                                         "task_type": str(task_type), "task_mode": str(task_mode)},
                                safe=False)
        task_id = _require(_field(data, "task_id"), "task_id", "streaming.task")
        duration = data.get("duration_ms")  # data is a dict: it had a task_id
        if isinstance(duration, bool) or not isinstance(duration, int | float):
            raise UpstreamError("heygen streaming.task: unusable response (no 'duration_ms')")
        return SpeakResult(task_id=task_id, duration_ms=float(duration))

    async def interrupt(self, session_id: str) -> None:
        await self._post("interrupt", {"session_id": session_id}, safe=True)

    async def keep_alive(self, session_id: str) -> None:
        await self._post("keep_alive", {"session_id": session_id}, safe=True)

    async def start_listening(self, session_id: str) -> None:
        await self._post("start_listening", {"session_id": session_id}, safe=True)

    async def stop_listening(self, session_id: str) -> None:
        await self._post("stop_listening", {"session_id": session_id}, safe=True)

    async def stop(self, session_id: str) -> None:
        """Stop a session; a session the provider no longer knows counts as stopped."""
        with contextlib.suppress(UpstreamSessionGone):
            await self._post("stop", {"session_id": session_id}, safe=True)

    async def list_sessions(self) -> list[dict[str, Any]]:
        data = await self._api.call("GET", "/v1/streaming.list", endpoint="streaming.list",
                                    headers=self._headers, safe_to_retry=True)
        sessions = data.get("sessions", []) if isinstance(data, dict) else []
        return [s for s in sessions if isinstance(s, dict)]


class HeyGenUpstream(RoomUpstream):
    """A HeyGen streaming session (v2): REST for control, its LiveKit room for media/events."""

    kind = "heygen"
    answers_itself = True
    listens = True
    create_is_billed = True

    def __init__(
        self,
        client: HeyGenClient,
        quality: QualityTier,
        billing: BillingGuard,
        *,
        avatar_id: str,
        voice_id: str | None = None,
        video_encoding: str = "VP8",
        activity_idle_timeout: int | None = None,
        reconnect: ReconnectPolicy | None = None,
        room: OperatorRoom | None = None,
    ) -> None:
        super().__init__(quality, billing, reconnect, room)
        self._client = client
        self._avatar_id = avatar_id
        self._voice_id = voice_id
        self._video_encoding = video_encoding
        self._idle_timeout = activity_idle_timeout
        self._heygen: HeyGenSession | None = None

    async def _create_session(self) -> ProviderSession:
        session = await self._client.new_session(
            avatar_id=self._avatar_id, quality=self._quality.name, voice_id=self._voice_id,
            video_encoding=self._video_encoding, activity_idle_timeout=self._idle_timeout,
            room=self.operator_room)
        self._heygen = session
        return ProviderSession(session.session_id, {"session_id": session.session_id})

    async def _start_session(self, session: ProviderSession) -> RoomCredentials:
        await self._client.start(session.session_id)
        assert self._heygen is not None
        heygen = self._heygen
        # The client token, as HeyGen's own SDK joins: the agent token may carry the provider
        # agent's identity, and LiveKit kicks out the first of two equal identities.
        return RoomCredentials(heygen.url, heygen.access_token, heygen.duration_limit)

    async def _close_session(self, session: ProviderSession) -> None:
        await self._client.stop(session.session_id)

    def _id(self) -> str:
        if self._heygen is None:
            raise Conflict("the HeyGen session is not open")
        return self._heygen.session_id

    async def speak(self, text: str, task_type: TaskType = TaskType.REPEAT) -> SpeakResult:
        return await self._client.task(self._id(), text, task_type, TaskMode.ASYNC)

    async def interrupt(self) -> None:
        await self._client.interrupt(self._id())

    async def keep_alive(self) -> None:
        await self._client.keep_alive(self._id())

    async def set_listening(self, listening: bool) -> None:
        if listening:
            await self._client.start_listening(self._id())
        else:
            await self._client.stop_listening(self._id())
