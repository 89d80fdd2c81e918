"""Sessions: one upstream avatar, one hub, an audience of viewers, one event log.

Lifecycle: ``new → starting → live → closing → closed``. Every exit path goes through
:meth:`Session.close`, which closes the viewers, the hub and the upstream, in that order, so
no peer connection, task or upstream session outlives its session.

A session is the wiring between its parts: the upstream pushes media and events into it (it is
the upstream's :class:`~gateway.upstream.base.MediaSink`), the hub encodes the media for the
:class:`~gateway.audience.Audience`, and the :class:`~gateway.conversation.Conversation` says
what the avatar speaks. The session itself keeps the state, the limits and the teardown.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections.abc import Callable

import av

from .audience import AnyViewer, Audience
from .cluster import Cluster
from .config import QUALITY_TIERS, QualityTier, Settings
from .conversation import Answerer, Conversation
from .errors import (
    BadRequest,
    CapacityError,
    Conflict,
    NotFound,
    UpstreamAuthError,
    UpstreamError,
    UpstreamQuotaExceeded,
    UpstreamSessionGone,
    UpstreamUnavailable,
)
from .events import EventLog
from .livekit_out import EventRelay, OperatorRoom, RoomPublisher, operator_room, room_name
from .media.hub import Hub, HubConfig
from .media.naive import make_hub
from .metrics import Metrics
from .providers import Providers
from .upstream.base import AvatarEvent, EventType, Upstream
from .upstream.cloud import RoomUpstream
from .workers.pool import WorkerPool

logger = logging.getLogger(__name__)


def new_session_id() -> str:
    return secrets.token_hex(12)


class SessionState(enum.StrEnum):
    NEW = "new"
    STARTING = "starting"
    LIVE = "live"
    CLOSING = "closing"
    CLOSED = "closed"


class Session:
    def __init__(
        self,
        upstream: Upstream,
        quality: QualityTier,
        settings: Settings,
        metrics: Metrics,
        on_closed: Callable[[Session], None],
        answerer: Answerer,
        workers: WorkerPool | None = None,
        distribution: str = "whep",
        session_id: str | None = None,
    ) -> None:
        self.id = session_id or new_session_id()
        self.distribution = distribution
        """``whep`` or ``livekit`` (also in a room of the operator's LiveKit)."""
        self.livekit_room: str | None = None
        """That room's name, once the avatar is in it."""
        self.livekit: RoomPublisher | None = None
        """The gateway's publisher in that room, unless the provider publishes there itself."""
        self._relay: EventRelay | None = None
        """The session's events into that room (the publisher's or the hidden gateway's)."""
        self.upstream = upstream
        self.quality = quality
        self.created_at = time.time()
        self._started = time.monotonic()
        self._settings = settings
        self._metrics = metrics
        self._on_closed = on_closed
        self._state = SessionState.NEW
        metrics.sessions.labels(upstream.kind, self._state).inc()
        self.hub = make_hub(
            HubConfig(
                bitrate=quality.bitrate,
                fps=settings.video_fps,
                keyframe_interval=settings.keyframe_interval,
                keyframe_min_gap=settings.keyframe_min_gap,
                keyframe_join_gap=settings.keyframe_join_gap,
                fast_start_frames=settings.fast_start_frames,
                audio_packet_ms=settings.audio_packet_ms,
            ),
            metrics,
            naive=settings.media_design == "naive",
        )
        self.events = EventLog(on_overflow=metrics.events_dropped.labels("sse").inc)
        self.audience = Audience(
            self.id, self.hub, settings, metrics, require_live=self._require_live,
            # Only an upstream that listens gets a microphone.
            microphone=self._forward_microphone if upstream.listens else None, workers=workers)
        self.conversation = Conversation(
            self.id, upstream, self.events, settings, metrics, answerer=answerer,
            require_live=self._require_live, touch=self.touch)
        self._closing: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self.close_reason: str | None = None
        self._last_activity = time.monotonic()
        self._video_frames = metrics.upstream_frames.labels(upstream.kind, "video")
        self._audio_frames = metrics.upstream_frames.labels(upstream.kind, "audio")
        self._video_clock = metrics.upstream_last_frame.labels(upstream.kind, "video")
        self._audio_clock = metrics.upstream_last_frame.labels(upstream.kind, "audio")
        self._reconnecting = False

    # -- state -------------------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        return self._state

    def _set_state(self, state: SessionState) -> None:
        kind = self.upstream.kind
        self._metrics.sessions.labels(kind, self._state).dec()
        self._state = state
        if state is not SessionState.CLOSED:
            self._metrics.sessions.labels(kind, state).inc()
        self.events.publish(AvatarEvent(EventType.SESSION_STATE, data={"state": str(state)}))

    def _require_live(self) -> None:
        if self._state is not SessionState.LIVE:
            raise Conflict(f"session {self.id} is {self._state}, not live")

    # -- MediaSink (called by the upstream) --------------------------------------------------

    @property
    def video_wanted(self) -> bool:
        return self.hub.video_wanted

    def on_video_frame(self, frame: av.VideoFrame) -> None:
        self._video_frames.inc()
        self._video_clock.set_to_current_time()
        self.hub.push_video(frame)

    def on_audio_frame(self, frame: av.AudioFrame) -> None:
        self._audio_frames.inc()
        self._audio_clock.set_to_current_time()
        self.hub.push_audio(frame)

    def on_event(self, event: AvatarEvent) -> None:
        if event.type is EventType.SESSION_STATE:
            state = event.data.get("state")
            if state == "reconnecting":
                self._reconnecting = True
            elif state == "live" and self._reconnecting:
                self._reconnecting = False
                self._metrics.upstream_reconnects.labels(self.upstream.kind, "ok").inc()
        self.conversation.on_event(event)
        self.events.publish(event)
        payload = event.to_json()
        self.audience.broadcast(event.type, payload)
        if self._relay is not None:
            self._relay.send(payload)

    async def _send_to_room(self, payload: bytes, topic: str) -> None:
        """The hidden gateway's data in the operator's room (the provider published there)."""
        link = self.upstream.link if isinstance(self.upstream, RoomUpstream) else None
        if link is not None and link.connected:
            await link.send_data(payload, topic=topic)

    def on_upstream_ended(self, reason: str) -> None:
        if self._reconnecting:
            self._metrics.upstream_reconnects.labels(self.upstream.kind, "failed").inc()
        self.on_event(AvatarEvent(EventType.STREAM_DISCONNECTED, data={"reason": reason}))
        self.close_soon("upstream_ended")

    async def _forward_microphone(self, frame: av.AudioFrame) -> None:
        self._last_activity = time.monotonic()
        await self.upstream.push_microphone(frame)

    # -- shorthands for the audience (tests and tools read them; handlers use .audience) ----

    @property
    def viewer_count(self) -> int:
        return len(self.audience)

    def viewers(self) -> tuple[AnyViewer, ...]:
        return self.audience.viewers()

    def viewer(self, viewer_id: str) -> AnyViewer:
        return self.audience.viewer(viewer_id)

    async def add_offering_viewer(self, client: str = "") -> tuple[AnyViewer, str]:
        return await self.audience.add_offering_viewer(client)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._set_state(SessionState.STARTING)
        kind = self.upstream.kind
        began = time.monotonic()
        try:
            await self.upstream.start(self)
        except BaseException as exc:
            outcomes: dict[type[BaseException], str] = {
                UpstreamQuotaExceeded: "quota", UpstreamAuthError: "auth",
                UpstreamUnavailable: "unavailable"}
            result = outcomes.get(type(exc), "error")
            self._metrics.upstream_starts.labels(kind, result).inc()
            raise
        self._metrics.upstream_starts.labels(kind, "ok").inc()
        self._metrics.upstream_start_duration.labels(kind).observe(time.monotonic() - began)
        if self.distribution == "livekit":
            upstream = self.upstream
            room = room_name(self._settings, self.id)
            if isinstance(upstream, RoomUpstream) and upstream.operator_room is not None:
                self._relay = EventRelay(self._send_to_room, room)
            else:
                assert isinstance(self.hub, Hub)
                publisher = RoomPublisher(
                    self._settings, self.id, self.hub, self.quality.width, self.quality.height,
                    self._forward_microphone if upstream.listens else None)
                await publisher.start()
                self.livekit = publisher
                self._relay = EventRelay(publisher.send_data, room)
            self.livekit_room = room
        self._set_state(SessionState.LIVE)
        self._supervisor = asyncio.get_running_loop().create_task(
            self._supervise(), name=f"session-{self.id[:8]}-supervisor")

    def touch(self) -> None:
        """A controller did something: the session is in use."""
        self._last_activity = time.monotonic()

    @property
    def in_use(self) -> bool:
        """Someone watches (a viewer, an event stream, someone in its LiveKit room) or
        controlled it within the idle grace."""
        watchers = len(self.audience) + (self.livekit.audience if self.livekit else 0)
        if watchers or self.events.subscribers:
            self._last_activity = time.monotonic()
            return True
        return time.monotonic() - self._last_activity < self._settings.idle_grace

    @property
    def lifetime_limit(self) -> float:
        limit = self._settings.max_session_duration
        provider_limit = getattr(self.upstream, "duration_limit", None)
        if isinstance(provider_limit, (int, float)) and provider_limit > 0:
            limit = min(limit, float(provider_limit))
        return limit

    async def _supervise(self) -> None:
        """Keep the provider session alive while it is used; end it when it is not.

        Idle sessions (no viewer, no event stream, no control for ``idle_grace``) and sessions
        past their lifetime are stopped: a paid minute nobody watches is a wasted minute.
        """
        s = self._settings
        tick = min(1.0, s.idle_grace / 4, s.keep_alive_interval / 2)
        last_keep_alive = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - self._started >= self.lifetime_limit:
                self.close_soon("max_duration")
                return
            if not self.in_use:
                self.close_soon("idle")
                return
            if now - last_keep_alive >= s.keep_alive_interval:
                last_keep_alive = now
                try:
                    await self.upstream.keep_alive()
                except UpstreamSessionGone:
                    self.on_upstream_ended("provider session gone")
                    return
                except UpstreamError as exc:
                    logger.warning("session %s: keep-alive failed: %s", self.id, exc.message)

    # -- teardown ----------------------------------------------------------------------------

    def close_soon(self, reason: str) -> None:
        if self._closing is None and self.close_reason is None:
            self._closing = asyncio.get_running_loop().create_task(self.close(reason))

    async def close(self, reason: str) -> None:
        """Close viewers, hub and upstream. Idempotent; safe to call from any state."""
        if self.close_reason is not None:
            return
        self.close_reason = reason
        self._set_state(SessionState.CLOSING)
        if self._supervisor is not None and self._supervisor is not asyncio.current_task():
            self._supervisor.cancel()
        self.conversation.close()
        try:
            await self.audience.close("session_closed")
            if self._relay is not None:
                await self._relay.close()
            if self.livekit is not None:
                await self.livekit.close()
            await self.hub.close()
            try:
                await self.upstream.stop()
            except UpstreamError as exc:
                # Cloud upstreams hand a failed stop to the billing guard (it retries until the
                # provider confirms; the journal keeps the row meanwhile) and do not raise.
                logger.error("session %s: upstream stop failed: %s", self.id, exc.message)
        finally:
            self._set_state(SessionState.CLOSED)
            self.events.close()
            self._metrics.session_ends.labels(self.upstream.kind, reason).inc()
            self._metrics.session_duration.labels(self.upstream.kind).observe(
                time.monotonic() - self._started)
            self._on_closed(self)
            logger.info("session %s closed (%s)", self.id, reason)


class SessionRegistry:
    def __init__(self, settings: Settings, metrics: Metrics, providers: Providers,
                 answerer: Answerer) -> None:
        """``answerer``: the gateway's chat, for the sessions whose upstream has no language
        model of its own (see :mod:`gateway.conversation`)."""
        self._settings = settings
        self._metrics = metrics
        self.providers = providers
        self._answerer = answerer
        self._sessions: dict[str, Session] = {}
        self._accepting = True
        self.on_closed: list[Callable[[str], None]] = []
        """Told the id of every session that ends (e.g. the chat forgets its conversation)."""
        self.workers: WorkerPool | None = None
        """The fan-out worker processes that hold the viewers, if there are any."""
        self.cluster: Cluster | None = None
        """The other replicas, through Redis, if there are any."""
        self._withdrawals: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._sessions)

    def list(self) -> list[Session]:
        return list(self._sessions.values())

    def find(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def get(self, session_id: str) -> Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise NotFound(f"no session {session_id!r}") from None

    def _check_limits(self, upstream: str) -> None:
        s = self._settings
        if len(self._sessions) >= s.max_sessions:
            raise CapacityError(f"the gateway runs its maximum of {s.max_sessions} sessions",
                                retry_after=30)
        if upstream != "local":
            paid = sum(1 for x in self._sessions.values() if x.upstream.kind != "local")
            if paid >= s.max_upstream_sessions:
                raise CapacityError(
                    f"{paid} provider sessions are open, the configured maximum "
                    f"(AVATAR_GATEWAY_MAX_UPSTREAM_SESSIONS={s.max_upstream_sessions})",
                    retry_after=30)

    async def create(
        self, upstream: str | None = None, quality: str | None = None, voice: str | None = None,
        avatar_id: str | None = None, distribution: str | None = None,
    ) -> Session:
        if not self._accepting:
            raise Conflict("the gateway is shutting down")
        distribution = distribution or self._settings.distribution
        if distribution not in ("whep", "livekit"):
            raise BadRequest(f"distribution must be 'whep' or 'livekit', not {distribution!r}")
        if distribution == "livekit" and not self._settings.livekit_url:
            raise BadRequest("distribution 'livekit' needs the operator's LiveKit: the gateway "
                             "has no AVATAR_GATEWAY_LIVEKIT_URL, _API_KEY and _API_SECRET")
        if distribution == "livekit" and self._settings.media_design == "naive":
            raise BadRequest("distribution 'livekit' publishes the encode-once hub's packets; "
                             "the naive benchmark design has none")
        kind = upstream or self._settings.default_upstream
        session_id = new_session_id()
        room = operator_room(self._settings, session_id) if distribution == "livekit" else None
        tier_name = quality or self._settings.default_quality
        if tier_name not in QUALITY_TIERS:
            raise BadRequest(f"quality must be one of {', '.join(QUALITY_TIERS)}, not {tier_name!r}")
        tier = QUALITY_TIERS[tier_name]
        self._check_limits(kind)
        cluster = self.cluster
        if cluster is not None and kind != "local":
            await cluster.take_paid_place(session_id, self._settings.max_upstream_sessions)
        try:
            return await self._create(session_id, kind, tier, voice, avatar_id, distribution,
                                      room)
        except BaseException:
            if cluster is not None and session_id not in self._sessions:
                await cluster.withdraw(session_id)
            raise

    async def _create(self, session_id: str, kind: str, tier: QualityTier, voice: str | None,
                      avatar_id: str | None, distribution: str,
                      room: OperatorRoom | None) -> Session:
        source = await self.providers.make(kind, tier, voice=voice, avatar_id=avatar_id,
                                           room=room)
        # Checked again with no await before the registration: concurrent creates can't overshoot.
        self._check_limits(kind)
        session = Session(source, tier, self._settings, self._metrics, self._forget, self._answerer,
                          self.workers, distribution, session_id)
        self._sessions[session.id] = session
        try:
            await session.start()
        except BaseException:
            await session.close("start_failed")
            raise
        logger.info("session %s started (%s, %s)", session.id, kind, tier.name)
        if self.cluster is not None:
            await self.cluster.publish()
        return session

    def hub_of(self, session_id: str) -> Hub | None:
        """The hub a fan-out worker subscribes to (None for the naive baseline's)."""
        session = self._sessions.get(session_id)
        return session.hub if session is not None and isinstance(session.hub, Hub) else None

    def _forget(self, session: Session) -> None:
        self._sessions.pop(session.id, None)
        if self.cluster is not None:
            task = asyncio.get_running_loop().create_task(self.cluster.withdraw(session.id))
            self._withdrawals.add(task)
            task.add_done_callback(self._withdrawals.discard)
        for listener in self.on_closed:
            listener(session.id)

    async def close(self, session_id: str, reason: str = "deleted") -> None:
        await self.get(session_id).close(reason)

    async def close_all(self, reason: str = "shutdown") -> None:
        self._accepting = False
        await asyncio.gather(*(s.close(reason) for s in self.list()), return_exceptions=True)
