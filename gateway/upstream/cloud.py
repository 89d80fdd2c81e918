"""What HeyGen and LiveAvatar upstreams share: a paid provider session reached through a
LiveKit room, journaled while open, rejoined with backoff when the room link drops.

Subclasses say how to open, speak to and close a session at their provider; this class owns
the order of things so that no exit path forgets the stop call that ends the billing: the id is
journaled before anything else can fail (with an intent before the create call, where only its
answer carries the id), and a stop that fails is handed to the billing guard, which retries it
until the provider confirms (:mod:`.billing`).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import av

from ..config import QualityTier
from ..errors import Conflict, UpstreamError, UpstreamSessionGone
from ..livekit_out import OperatorRoom
from .base import AvatarEvent, EventType, MediaSink, Upstream
from .billing import BillingGuard
from .livekit_room import EventDecoder, RoomLink, decode_heygen_event

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProviderSession:
    session_id: str
    stop_info: dict[str, Any] = field(default_factory=dict)
    """Written to the journal: what is needed to stop this session from another process."""


@dataclass(frozen=True, slots=True)
class RoomCredentials:
    url: str
    token: str
    """A LiveKit token for the *client* identity, like the providers' own browser SDKs use:
    an agent token may carry the provider agent's identity, and a second participant with
    one identity makes LiveKit kick out the first."""
    duration_limit: float | None = None
    ws_url: str | None = None
    """LiveAvatar LITE: the websocket that takes the audio the avatar lip-syncs."""


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    attempts: int = 5
    first_delay: float = 0.5
    max_delay: float = 8.0
    ready_within: float = 20.0


class RoomUpstream(Upstream, abc.ABC):
    avatar_identity = "heygen"
    create_is_billed: ClassVar[bool] = False
    """True where :meth:`_create_session` may open a billed session whose id only its answer
    carries (HeyGen ``streaming.new``): an intent is journaled before it, and an unanswered
    call is reconciled with the provider's list. False where the id comes first (LiveAvatar's
    ``sessions/token``; the billed ``sessions/start`` comes after the id is journaled)."""

    def __init__(self, quality: QualityTier, billing: BillingGuard,
                 reconnect: ReconnectPolicy | None = None,
                 room: OperatorRoom | None = None) -> None:
        """``room``: the session's room in the operator's LiveKit, for a provider that
        publishes the avatar straight into it (the gateway then joins it hidden)."""
        self.operator_room = room
        if room is not None:
            self.avatar_identity = room.provider_identity
        self._quality = quality
        self._billing = billing
        self._policy = reconnect or ReconnectPolicy()
        self._sink: MediaSink | None = None
        self._link: RoomLink | None = None
        self._session: ProviderSession | None = None
        self._credentials: RoomCredentials | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._creating: asyncio.Future[ProviderSession] | None = None
        """The create call under way: :meth:`stop` cancels it (a DELETE or SIGTERM need not
        wait for the provider's answer; an unanswered billed create is reconciled)."""
        self._stopping = False
        self._released = False
        """The provider session was stopped, or handed to the billing guard to stop."""
        self._ended = False
        self.reconnects = 0

    # -- provider hooks ----------------------------------------------------------------------

    @abc.abstractmethod
    async def _create_session(self) -> ProviderSession:
        """Create the provider session (billing may start here)."""

    @abc.abstractmethod
    async def _start_session(self, session: ProviderSession) -> RoomCredentials:
        """Start it and say how to join its room."""

    @abc.abstractmethod
    async def _close_session(self, session: ProviderSession) -> None:
        """Stop the provider session; a session the provider no longer knows is stopped."""

    def _decode_event(self, payload: bytes, topic: str) -> list[AvatarEvent]:
        return decode_heygen_event(payload, topic)

    def _event_identities(self) -> tuple[str, ...]:
        """Room participants besides the avatar whose data packets carry the session's events."""
        return ()

    async def _connect(self, credentials: RoomCredentials) -> None:
        """Open everything the session is reached through: by default its LiveKit room."""
        self._link = await self._join(credentials)

    async def _disconnect(self) -> None:
        """Close what :meth:`_connect` opened. Idempotent."""
        old, self._link = self._link, None
        if old is not None:
            await old.close()

    # -- Upstream ----------------------------------------------------------------------------

    @property
    def video_size(self) -> tuple[int, int]:
        return self._quality.width, self._quality.height

    @property
    def provider_session_id(self) -> str | None:
        return self._session.session_id if self._session else None

    @property
    def provider_stop_info(self) -> dict[str, Any] | None:
        """What stops the provider session from another process (as journaled)."""
        return dict(self._session.stop_info) if self._session else None

    @property
    def duration_limit(self) -> float | None:
        return self._credentials.duration_limit if self._credentials else None

    @property
    def link(self) -> RoomLink | None:
        return self._link

    async def start(self, sink: MediaSink) -> None:
        self._sink = sink
        billing = self._billing
        intent = await billing.begin(self.kind) if self.create_is_billed else None
        creating = self._creating = asyncio.ensure_future(self._create_session())
        try:
            session = await creating
        except BaseException as exc:
            if intent is not None:
                billing.failed(intent, exc)  # unclear answers are reconciled in the background
            task = asyncio.current_task()
            if creating.cancelled() and self._stopping and task is not None \
                    and not task.cancelling():
                raise Conflict(f"the {self.kind} session was closed while it started") from None
            raise
        finally:
            self._creating = None
            if not creating.done():
                creating.cancel()  # this task was cancelled: the call goes with it
        self._session = session
        try:
            # Journal before anything else can fail: from here on a crash leaves a row to reap.
            if intent is not None:
                await billing.created(intent, session.session_id, session.stop_info)
            else:
                await billing.opened(self.kind, session.session_id, session.stop_info)
            self._check_not_stopped()
            self._credentials = await self._start_session(session)
            await self._connect(self._credentials)
            self._check_not_stopped()
        except BaseException:
            if intent is not None:
                billing.settled(intent)
            await self.stop()
            raise

    def _check_not_stopped(self) -> None:
        """:meth:`stop` ran while the session was starting (a DELETE, SIGTERM): the session it
        could not stop then is stopped now, by the caller's clean-up."""
        if self._stopping:
            raise Conflict(f"the {self.kind} session was closed while it started")

    async def _join(self, credentials: RoomCredentials) -> RoomLink:
        assert self._sink is not None
        decoder: EventDecoder = self._decode_event
        link = RoomLink(self._sink, avatar_identity=self.avatar_identity,
                        event_identities=self._event_identities(), decode_event=decoder,
                        on_lost=self._on_lost)
        await link.connect(credentials.url, credentials.token,
                           ready_within=self._policy.ready_within)
        return link

    def _on_lost(self, reason: str) -> None:
        if self._stopping or self._ended or self._reconnecting is not None:
            return
        self._reconnecting = asyncio.get_running_loop().create_task(
            self._reconnect(reason), name=f"{self.kind}-reconnect")

    async def _reconnect(self, reason: str) -> None:
        sink, credentials = self._sink, self._credentials
        assert sink is not None and credentials is not None
        sink.on_event(AvatarEvent(EventType.SESSION_STATE,
                                  data={"state": "reconnecting", "reason": reason}))
        await self._disconnect()
        delay = self._policy.first_delay
        for attempt in range(1, self._policy.attempts + 1):
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._policy.max_delay)
            try:
                # Ask the provider first: an expired or stopped session is not worth rejoining.
                await self.keep_alive()
            except UpstreamSessionGone as exc:
                self._reconnecting = None
                self._end(f"{reason}; the provider ended the session ({exc.message})")
                return
            except UpstreamError as exc:
                logger.warning("%s session %s: provider unreachable while rejoining: %s",
                               self.kind, self.provider_session_id, exc.message)
                continue
            try:
                await self._connect(credentials)
            except UpstreamError as exc:
                logger.warning("%s session %s: rejoin %d/%d failed: %s", self.kind,
                               self.provider_session_id, attempt, self._policy.attempts,
                               exc.message)
                continue
            self.reconnects += 1
            self._reconnecting = None
            sink.on_event(AvatarEvent(EventType.SESSION_STATE, data={"state": "live"}))
            return
        self._reconnecting = None
        self._end(f"{reason}; rejoin failed {self._policy.attempts} times")

    def _end(self, reason: str) -> None:
        """Tell the sink the session is over, once. The provider said so (e.g. LiveAvatar's
        ``session.stopped``), or rejoining failed; the sink then calls :meth:`stop`, which also
        ends a rejoin still under way."""
        if self._stopping or self._ended or self._sink is None:
            return
        self._ended = True
        self._sink.on_upstream_ended(reason)

    async def push_microphone(self, frame: av.AudioFrame) -> None:
        if self._link is not None and self._link.connected:
            await self._link.push_microphone(frame)

    async def stop(self) -> None:
        """Leave the room, stop the provider session, clear the journal row. Idempotent, and
        safe while :meth:`start` runs (the session is stopped once it has an id).

        A stop the provider does not confirm is not an error for the caller: the journal row
        stays and the billing guard retries until the provider confirms or says it is gone."""
        self._stopping = True
        if self._creating is not None:
            self._creating.cancel()
        reconnecting, self._reconnecting = self._reconnecting, None
        if reconnecting is not None:
            reconnecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reconnecting
        await self._disconnect()
        session = self._session
        if session is None or self._released:
            return
        self._released = True
        try:
            await self._close_session(session)
        except UpstreamError as exc:
            logger.warning("%s session %s: stop failed, retrying in the background: %s",
                           self.kind, session.session_id, exc.message)
            self._billing.stop_later(self.kind, session.session_id, session.stop_info)
            return
        except BaseException:
            # Cancelled mid-call (shutdown): the row stays; retry while this process lives.
            self._billing.stop_later(self.kind, session.session_id, session.stop_info)
            raise
        await self._billing.closed(self.kind, session.session_id)
