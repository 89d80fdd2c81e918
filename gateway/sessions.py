"""Sessions: one upstream avatar, one hub, any number of viewers, one event log.

Lifecycle: ``new → starting → live → closing → closed``. Every exit path goes through
:meth:`Session.close`, which closes the viewers, the hub and the upstream, in that order, so
no peer connection, task or upstream session outlives its session.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import av

from .config import QUALITY_TIERS, QualityTier, Settings
from .errors import (
    BadRequest,
    CapacityError,
    Conflict,
    GatewayError,
    NotFound,
    UpstreamAuthError,
    UpstreamError,
    UpstreamQuotaExceeded,
    UpstreamSessionGone,
    UpstreamUnavailable,
)
from .events import EventLog, Subscription
from .media.hub import HubConfig
from .media.naive import make_hub
from .metrics import Metrics
from .providers import Providers
from .upstream.base import (
    AvatarEvent,
    EventType,
    SpeakResult,
    TaskMode,
    TaskType,
    Upstream,
)
from .viewers.peer import Viewer, rtc_configuration
from .viewers.whep import browser_ice_servers, parse_offer

logger = logging.getLogger(__name__)

MAX_PENDING_TASKS = 256
"""Speak tasks remembered until their avatar_start_talking (for the latency histogram)."""

Answerer = Callable[[str, str], AsyncGenerator[str, None]]
"""``(question, conversation id) → the answer's sentences``: the gateway's chat service."""

@dataclass(frozen=True, slots=True)
class SpokenAnswer:
    """What :meth:`Session.speak_sentences` queued: the text, one task per sentence."""

    text: str
    task_ids: tuple[str, ...]
    duration_ms: float


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
        answerer: Answerer | None = None,
    ) -> None:
        self.id = secrets.token_hex(12)
        self.upstream = upstream
        self.quality = quality
        self.created_at = time.time()
        self._started = time.monotonic()
        self._settings = settings
        self._metrics = metrics
        self._on_closed = on_closed
        self._answerer = answerer
        self._replies: set[asyncio.Task[None]] = set()
        self._state = SessionState.NEW
        metrics.sessions.labels(upstream.kind, self._state).inc()
        self.hub = make_hub(
            HubConfig(
                bitrate=quality.bitrate,
                fps=settings.video_fps,
                keyframe_interval=settings.keyframe_interval,
                keyframe_min_gap=settings.keyframe_min_gap,
            ),
            metrics,
            naive=settings.media_design == "naive",
        )
        self.events = EventLog(on_overflow=metrics.events_dropped.labels("sse").inc)
        self._viewers: dict[str, Viewer] = {}
        self._rtc = rtc_configuration(
            settings.ice_servers, settings.ice_username, settings.ice_credential.reveal()
        )
        self._closing: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self.close_reason: str | None = None
        self._last_activity = time.monotonic()
        self._video_frames = metrics.upstream_frames.labels(upstream.kind, "video")
        self._audio_frames = metrics.upstream_frames.labels(upstream.kind, "audio")
        self._video_clock = metrics.upstream_last_frame.labels(upstream.kind, "video")
        self._audio_clock = metrics.upstream_last_frame.labels(upstream.kind, "audio")
        self._reconnecting = False
        self._answering = asyncio.Lock()
        self._speak_submitted: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._speak_latency = metrics.speak_latency.labels(upstream.kind)

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

    def to_dict(self) -> dict[str, Any]:
        width, height = self.upstream.video_size
        return {
            "id": self.id,
            "upstream": self.upstream.kind,
            "state": str(self._state),
            "quality": self.quality.name,
            "width": width,
            "height": height,
            "viewers": len(self._viewers),
            "created_at": self.created_at,
            "whep_url": f"/v1/sessions/{self.id}/whep",
            "events_url": f"/v1/sessions/{self.id}/events",
            # What a player's peer connection needs before it offers (TURN behind NAT).
            "ice_servers": browser_ice_servers(self._settings.ice_servers,
                                               self._settings.ice_username,
                                               self._settings.ice_credential.reveal()),
        }

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
        elif event.type is EventType.USER_END_MESSAGE:
            self._reply_to(str(event.data.get("message") or ""))
        elif event.type is EventType.AVATAR_START_TALKING and event.task_id is not None:
            submitted = self._speak_submitted.pop(event.task_id, None)
            if submitted is not None:
                self._speak_latency.observe(time.monotonic() - submitted)
        self.events.publish(event)
        payload = event.to_json()
        for viewer in tuple(self._viewers.values()):
            viewer.send_event(payload)

    def on_upstream_ended(self, reason: str) -> None:
        if self._reconnecting:
            self._metrics.upstream_reconnects.labels(self.upstream.kind, "failed").inc()
        self.on_event(AvatarEvent(EventType.STREAM_DISCONNECTED, data={"reason": reason}))
        self.close_soon("upstream_ended")

    # -- control -----------------------------------------------------------------------------

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
        self._set_state(SessionState.LIVE)
        self._supervisor = asyncio.get_running_loop().create_task(
            self._supervise(), name=f"session-{self.id[:8]}-supervisor")

    # -- lifecycle ---------------------------------------------------------------------------

    def touch(self) -> None:
        """A controller did something: the session is in use."""
        self._last_activity = time.monotonic()

    @property
    def in_use(self) -> bool:
        """Someone watches (a viewer, an event stream) or controlled it within the idle grace."""
        if self._viewers or self.events.subscribers:
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

    def _require_live(self) -> None:
        if self._state is not SessionState.LIVE:
            raise Conflict(f"session {self.id} is {self._state}, not live")

    async def speak(
        self, text: str, task_type: TaskType = TaskType.REPEAT, task_mode: TaskMode = TaskMode.ASYNC
    ) -> SpeakResult:
        self._require_live()
        self.touch()
        if len(text) > self._settings.max_text_chars:
            raise BadRequest(f"text is longer than {self._settings.max_text_chars} characters")
        self._metrics.speak_requests.labels(self.upstream.kind, task_type).inc()
        if task_mode is TaskMode.ASYNC:
            return self._submitted(await self.upstream.speak(text, task_type))
        # Subscribe first: a short utterance could end before a later subscription started.
        subscription = self.events.subscribe()
        try:
            result = self._submitted(await self.upstream.speak(text, task_type))
            await self._spoken(subscription, result.task_id, result.duration_ms)
            return result
        finally:
            subscription.close()

    def _submitted(self, result: SpeakResult) -> SpeakResult:
        """Remember when a task was accepted, for the speak-latency histogram (bounded)."""
        self._speak_submitted[result.task_id] = time.monotonic()
        while len(self._speak_submitted) > MAX_PENDING_TASKS:
            self._speak_submitted.popitem(last=False)
        return result

    async def speak_sentences(self, sentences: AsyncIterator[str],
                              task_mode: TaskMode = TaskMode.ASYNC) -> SpokenAnswer:
        """Speak each sentence as it arrives (an answer streamed by the language model, so speech
        starts after its first sentence). One answer at a time: two never interleave."""
        spoken: list[str] = []
        task_ids: list[str] = []
        duration_ms = 0.0
        subscription = self.events.subscribe() if task_mode is TaskMode.SYNC else None
        try:
            async with self._answering:
                async for sentence in sentences:
                    result = await self.speak(sentence)
                    spoken.append(sentence)
                    task_ids.append(result.task_id)
                    duration_ms += result.duration_ms
            if subscription is not None and task_ids:
                await self._spoken(subscription, task_ids[-1], duration_ms)
        finally:
            if subscription is not None:
                subscription.close()
        return SpokenAnswer(" ".join(spoken), tuple(task_ids), round(duration_ms, 1))

    def _reply_to(self, question: str) -> None:
        """Voice chat with an upstream that has ears but no language model (the local avatar):
        what the user said is answered by the gateway's chat and spoken. One reply speaks while
        at most one more waits; anything beyond is dropped (a user does not queue questions)."""
        if (not question.strip() or self._answerer is None or self.upstream.answers_itself
                or self._state is not SessionState.LIVE):
            return
        if len(self._replies) >= 2:
            logger.warning("session %s: a voice-chat question dropped, two replies pending", self.id)
            return
        answerer = self._answerer

        async def reply() -> None:
            try:
                async with contextlib.aclosing(answerer(question, self.id)) as sentences:
                    await self.speak_sentences(sentences)
            except GatewayError as exc:
                logger.warning("session %s: voice-chat reply failed: %s", self.id, exc.message)

        task = asyncio.get_running_loop().create_task(reply(), name="voice-chat-reply")
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    @staticmethod
    async def _spoken(subscription: Subscription, task_id: str, duration_ms: float) -> None:
        """Wait for the avatar to finish ``task_id`` (its ``avatar_stop_talking``)."""
        async with asyncio.timeout(duration_ms / 1000.0 + 10.0):
            async for item in subscription:
                event = item.event
                if event.type is EventType.AVATAR_STOP_TALKING and event.task_id == task_id:
                    return

    async def interrupt(self) -> None:
        self._require_live()
        self.touch()
        await self.upstream.interrupt()

    async def set_listening(self, listening: bool) -> None:
        self._require_live()
        self.touch()
        await self.upstream.set_listening(listening)

    async def keep_alive(self) -> None:
        self._require_live()
        self.touch()
        await self.upstream.keep_alive()

    # -- viewers -----------------------------------------------------------------------------

    @property
    def viewer_count(self) -> int:
        return len(self._viewers)

    def viewers(self) -> tuple[Viewer, ...]:
        return tuple(self._viewers.values())

    def _new_viewer(self, client: str) -> Viewer:
        """A place for one more viewer. Connected viewers count toward the session's maximum;
        unconnected ones only up to a bounded share, and a few per client, so that a client
        posting offers it never completes cannot keep everyone else out."""
        self._require_live()
        settings = self._settings
        pending = [v for v in self._viewers.values() if v.state == "connecting"]
        if sum(v.client == client for v in pending) >= settings.max_pending_viewers_per_client:
            raise CapacityError(
                f"this client already has {settings.max_pending_viewers_per_client} viewers of "
                f"session {self.id} that have not connected; finish or delete those first",
                retry_after=5)
        if len(pending) >= settings.max_pending_viewers_per_session:
            raise CapacityError(f"session {self.id} has {len(pending)} viewers still connecting; "
                                "try again in a few seconds", retry_after=5)
        if len(self._viewers) >= settings.max_viewers_per_session:
            raise CapacityError(
                f"session {self.id} has its maximum of "
                f"{settings.max_viewers_per_session} viewers", retry_after=10)
        viewer = Viewer(self.hub, self._rtc, self._metrics, self._viewer_closed, client=client)
        self._viewers[viewer.id] = viewer
        return viewer

    @property
    def _microphone(self) -> Callable[[av.AudioFrame], Awaitable[None]] | None:
        # Only an upstream that listens gets a microphone.
        return self._forward_microphone if self.upstream.listens else None

    async def add_viewer(self, offer_sdp: str, microphone: bool = True,
                         client: str = "") -> tuple[Viewer, str]:
        """WHEP: the viewer offers, the gateway answers. ``microphone``: a controller's offer
        of two-way audio carries its microphone to the avatar; a viewer's never does.
        ``client`` says who asks (address and token), for the per-client limit."""
        offer = parse_offer(offer_sdp)
        viewer = self._new_viewer(client)
        try:
            answer = await viewer.negotiate(offer, self._microphone if microphone else None)
        except BaseException:
            await viewer.close("negotiation_failed")
            raise
        viewer.expire_unless_connected(self._settings.viewer_connect_timeout)
        return viewer, answer

    async def add_offering_viewer(self, client: str = "") -> tuple[Viewer, str]:
        """The seed API (HeyGen v1 style): the gateway offers; the browser answers later
        through :meth:`Viewer.accept_answer`."""
        viewer = self._new_viewer(client)
        try:
            offer = await viewer.offer(self._microphone)
        except BaseException:
            await viewer.close("negotiation_failed")
            raise
        viewer.expire_unless_connected(self._settings.viewer_connect_timeout)
        return viewer, offer

    async def _forward_microphone(self, frame: av.AudioFrame) -> None:
        self._last_activity = time.monotonic()
        await self.upstream.push_microphone(frame)

    def viewer(self, viewer_id: str) -> Viewer:
        try:
            return self._viewers[viewer_id]
        except KeyError:
            raise NotFound(f"no viewer {viewer_id!r} in session {self.id}") from None

    def _viewer_closed(self, viewer: Viewer) -> None:
        self._viewers.pop(viewer.id, None)

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
        for task in tuple(self._replies):
            if task is not asyncio.current_task():
                task.cancel()
        try:
            await asyncio.gather(*(v.close("session_closed") for v in tuple(self._viewers.values())),
                                 return_exceptions=True)
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
    def __init__(self, settings: Settings, metrics: Metrics, providers: Providers) -> None:
        self._settings = settings
        self._metrics = metrics
        self.providers = providers
        self._sessions: dict[str, Session] = {}
        self._accepting = True
        self.on_closed: list[Callable[[str], None]] = []
        """Told the id of every session that ends (e.g. the chat forgets its conversation)."""
        self.answerer: Answerer | None = None
        """Answers voice-chat questions for upstreams without a language model of their own."""

    def __len__(self) -> int:
        return len(self._sessions)

    def list(self) -> list[Session]:
        return list(self._sessions.values())

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
        avatar_id: str | None = None,
    ) -> Session:
        if not self._accepting:
            raise Conflict("the gateway is shutting down")
        kind = upstream or self._settings.default_upstream
        tier_name = quality or self._settings.default_quality
        if tier_name not in QUALITY_TIERS:
            raise BadRequest(f"quality must be one of {', '.join(QUALITY_TIERS)}, not {tier_name!r}")
        tier = QUALITY_TIERS[tier_name]
        self._check_limits(kind)
        source = await self.providers.make(kind, tier, voice=voice, avatar_id=avatar_id)
        # Checked again with no await before the registration: concurrent creates can't overshoot.
        self._check_limits(kind)
        session = Session(source, tier, self._settings, self._metrics, self._forget, self.answerer)
        self._sessions[session.id] = session
        try:
            await session.start()
        except BaseException:
            await session.close("start_failed")
            raise
        logger.info("session %s started (%s, %s)", session.id, kind, tier.name)
        return session

    def _forget(self, session: Session) -> None:
        self._sessions.pop(session.id, None)
        for listener in self.on_closed:
            listener(session.id)

    async def close(self, session_id: str, reason: str = "deleted") -> None:
        await self.get(session_id).close(reason)

    async def close_all(self, reason: str = "shutdown") -> None:
        self._accepting = False
        await asyncio.gather(*(s.close(reason) for s in self.list()), return_exceptions=True)
