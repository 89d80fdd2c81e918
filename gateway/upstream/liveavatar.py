"""LiveAvatar (HeyGen's successor API): the REST client and FULL-mode command encoding.

Follows specs/heygen-api.md §11. The API key creates a session token; the session token
(``Authorization: Bearer``) starts, keeps alive and stops that one session. Speech is not a
REST call: in FULL mode commands travel on the LiveKit data topic ``agent-control`` and the
avatar answers on ``agent-response``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..config import Secret
from ..errors import UpstreamError, UpstreamSessionGone
from ..metrics import Metrics
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

    async def open_session(self, *, avatar_id: str, quality: str = "high",
                           encoding: str = "VP8") -> LiveAvatarSession:
        """``sessions/token`` then ``sessions/start``: a running FULL-mode session."""
        token_data = await self._api.call(
            "POST", "/v1/sessions/token", endpoint="sessions.token",
            headers={"X-API-KEY": self._api_key.reveal(), "Content-Type": "application/json"},
            body={"mode": "FULL", "avatar_id": avatar_id,
                  "video_settings": {"encoding": encoding, "quality": quality}},
        )
        try:
            session_id = str(token_data["session_id"])
            session_token = str(token_data["session_token"])
        except (KeyError, TypeError) as exc:
            raise UpstreamError(f"liveavatar sessions/token: unusable response ({exc!r})") from None
        try:
            data = await self._api.call("POST", "/v1/sessions/start", endpoint="sessions.start",
                                        headers=self._bearer(session_token),
                                        body={"session_id": session_id}, safe_to_retry=True)
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
            await self._stop_quietly(session_id, session_token)
            raise UpstreamError(f"liveavatar sessions/start: unusable response ({exc!r})") from None
        except BaseException:
            # A session was issued (and may be billed): make sure it does not linger.
            await self._stop_quietly(session_id, session_token)
            raise

    async def _stop_quietly(self, session_id: str, session_token: str) -> None:
        try:
            await self.stop(session_id, session_token, reason="GATEWAY_ERROR")
        except UpstreamError as exc:
            logger.warning("liveavatar: could not stop half-opened session %s: %s",
                           session_id, exc.message)

    async def keep_alive(self, session: LiveAvatarSession) -> None:
        await self._api.call("POST", "/v1/sessions/keep-alive", endpoint="sessions.keep_alive",
                             headers=self._bearer(session.session_token),
                             body={"session_id": session.session_id}, safe_to_retry=True)

    async def stop(self, session_id: str, session_token: str,
                   reason: str = "USER_DISCONNECTED") -> None:
        """Stop a session; a session the provider no longer knows counts as stopped."""
        with contextlib.suppress(UpstreamSessionGone):
            await self._api.call("POST", "/v1/sessions/stop", endpoint="sessions.stop",
                                 headers=self._bearer(session_token),
                                 body={"session_id": session_id, "reason": reason},
                                 safe_to_retry=True)


def command(event_type: str, session_id: str, **fields: Any) -> bytes:
    """One FULL-mode command for the ``agent-control`` topic."""
    body = {"event_id": uuid.uuid4().hex, "event_type": event_type, "session_id": session_id,
            **fields}
    return json.dumps(body, separators=(",", ":")).encode()
