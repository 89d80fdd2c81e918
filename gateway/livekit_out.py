"""The ``livekit`` distribution: a session published into a room of the operator's LiveKit.

One machine, even with every core used, ends at a few thousand viewers; a LiveKit deployment
(self-hosted cluster or LiveKit Cloud) carries one room to many thousands across regions. The
gateway stays the keeper of keys, lifecycle and events, and publishes what its hub already
makes, once:

* video: the hub's VP8 frames as they leave the encoder, whole (``rtc.EncodedVideoSource``,
  no decode and no second encode); the room's keyframe requests reach the hub's encoder;
* audio: the hub's 48 kHz mono PCM (the SDK's ``AudioSource`` takes PCM only; Opus at
  ~0.1 ms per 20 ms is not worth a pass-through);
* events: each session event as one reliable data packet on topic :data:`EVENTS_TOPIC`, the
  same JSON object the WHEP data channel carries.

Viewers join with tokens from :func:`viewer_token` (``POST /v1/sessions/{id}/livekit-token``):
subscribe only, no data. The gateway's own WHEP viewers keep working alongside.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import av
from livekit import api, rtc
from livekit.rtc.participant import PublishTrackError

from .config import Settings
from .errors import UpstreamUnavailable
from .media.codecs import AUDIO_RATE, Packet
from .media.hub import Hub
from .media.mailbox import Mailbox, MailboxClosed
from .upstream.livekit_room import audio_to_av, capture_mono

logger = logging.getLogger(__name__)

PUBLISHER_IDENTITY = "avatar"
"""Who the avatar is in the operator's room (published by the gateway or by the provider)."""
GATEWAY_IDENTITY = "avatar-gateway"
"""The gateway, hidden, when the provider publishes the avatar itself."""
EVENTS_TOPIC = "avatar-events"
JOIN_TIMEOUT = 15.0
AUDIO_BACKLOG = 25
"""Frames (20-60 ms each) waiting for the SDK; more means the room link stalls: oldest go."""
EVENT_BACKLOG = 256


def room_name(settings: Settings, session_id: str) -> str:
    return settings.livekit_room_prefix + session_id


def _token(settings: Settings, room: str, identity: str, ttl: timedelta,
           grants: api.VideoGrants, name: str | None = None) -> str:
    return (api.AccessToken(settings.livekit_api_key, settings.livekit_api_secret.reveal())
            .with_identity(identity).with_name(name or identity).with_ttl(ttl)
            .with_grants(grants).to_jwt())


def viewer_token(settings: Settings, session_id: str, identity: str, ttl: timedelta, *,
                 microphone: bool = False) -> str:
    """A token to watch a session's room: subscribe only (no data); with ``microphone`` (a
    controller, voice chat on) it may publish a microphone track and nothing else."""
    room = room_name(settings, session_id)
    grants = api.VideoGrants(room_join=True, room=room, can_subscribe=True,
                             can_publish=microphone,
                             can_publish_sources=["microphone"] if microphone else None,
                             can_publish_data=False, can_update_own_metadata=False)
    return _token(settings, room, identity, ttl, grants)


@dataclass(frozen=True, slots=True)
class OperatorRoom:
    """A session's room in the operator's LiveKit when the provider publishes into it
    itself (LiveAvatar ``livekit_config``): the provider's token and the gateway's own."""

    url: str
    room: str
    provider_identity: str
    provider_token: str
    gateway_token: str
    """Hidden: the gateway subscribes to the avatar (for its WHEP viewers) and sends the
    provider's commands and its own events as data, unseen by the room's viewers."""


def operator_room(settings: Settings, session_id: str) -> OperatorRoom:
    room = room_name(settings, session_id)
    day = timedelta(hours=24)
    provider = _token(settings, room, PUBLISHER_IDENTITY, day, api.VideoGrants(
        room_join=True, room=room, can_publish=True, can_subscribe=True, can_publish_data=True))
    gateway = _token(settings, room, GATEWAY_IDENTITY, day, api.VideoGrants(
        room_join=True, room=room, can_publish=True, can_subscribe=True, can_publish_data=True,
        hidden=True))
    return OperatorRoom(settings.livekit_url, room, PUBLISHER_IDENTITY, provider, gateway)


class EventRelay:
    """A session's events into its LiveKit room, in order, on :data:`EVENTS_TOPIC`: bounded
    (the oldest go when the room link stalls), never blocking the caller."""

    def __init__(self, publish: Callable[[bytes, str], Awaitable[None]], room: str) -> None:
        self._publish = publish
        self._room = room
        self._events: Mailbox[str] = Mailbox(maxlen=EVENT_BACKLOG)
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                            name=f"livekit-events-{room}")

    def send(self, payload: str) -> None:
        self._events.put(payload)

    async def _run(self) -> None:
        with contextlib.suppress(MailboxClosed):
            while True:
                payload = await self._events.get()
                try:
                    await self._publish(payload.encode(), EVENTS_TOPIC)
                except Exception as exc:  # the SDK raises plain Exceptions
                    logger.warning("room %s: an event was not sent: %s", self._room, exc)

    async def close(self) -> None:
        self._events.close()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class RoomPublisher:
    """The gateway in the operator's room as participant :data:`PUBLISHER_IDENTITY`; a
    :class:`~gateway.media.hub.Tap` of the session's hub while it is there."""

    def __init__(self, settings: Settings, session_id: str, hub: Hub, width: int,
                 height: int,
                 microphone: Callable[[av.AudioFrame], Awaitable[None]] | None = None) -> None:
        """``microphone``: where the controllers' microphones go (the session's upstream,
        when it listens); None: they are not subscribed to."""
        self.room = room_name(settings, session_id)
        self._microphone = microphone
        self._settings = settings
        self._hub = hub
        self._size = (width, height)
        self._room = rtc.Room()
        self._video: rtc.EncodedVideoSource | None = None
        self._audio: rtc.AudioSource | None = None
        self._audio_frames: Mailbox[av.AudioFrame] = Mailbox(maxlen=AUDIO_BACKLOG)
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE)
        self._tasks: list[asyncio.Task[None]] = []
        self.frames_published = 0
        self.keyframe_requests = 0
        self._closed = False

    @property
    def audience(self) -> int:
        """Participants in the room besides the gateway (hidden ones are not counted)."""
        return len(self._room.remote_participants)

    async def start(self) -> None:
        """Join and publish; raises :class:`UpstreamUnavailable` when the room cannot be
        joined (the session does not start: its viewers could not see it)."""
        settings = self._settings
        grants = api.VideoGrants(room_join=True, room=self.room, can_publish=True,
                                 can_subscribe=self._microphone is not None,
                                 can_publish_data=True)
        if self._microphone is not None:
            self._room.on("track_subscribed", self._on_track_subscribed)
        token = _token(settings, self.room, PUBLISHER_IDENTITY, timedelta(hours=24), grants)
        try:
            async with asyncio.timeout(JOIN_TIMEOUT):
                await self._room.connect(settings.livekit_url, token,
                                         rtc.RoomOptions(auto_subscribe=False))
                width, height = self._size
                self._video = rtc.EncodedVideoSource(width, height)
                video = rtc.LocalVideoTrack.create_video_track("avatar_video", self._video)
                await self._room.local_participant.publish_track(video, rtc.TrackPublishOptions(
                    source=rtc.TrackSource.SOURCE_CAMERA, video_codec=rtc.VideoCodec.VP8,
                    video_encoder=rtc.VideoEncoderBackend.ENCODER_BACKEND_PRE_ENCODED,
                    simulcast=False))
                self._audio = rtc.AudioSource(AUDIO_RATE, 1, queue_size_ms=200)
                audio = rtc.LocalAudioTrack.create_audio_track("avatar_audio", self._audio)
                await self._room.local_participant.publish_track(audio, rtc.TrackPublishOptions(
                    source=rtc.TrackSource.SOURCE_MICROPHONE))
        except (TimeoutError, rtc.ConnectError, PublishTrackError) as exc:
            await self.close()
            raise UpstreamUnavailable(
                f"could not publish into room {self.room} of the operator's LiveKit "
                f"({settings.livekit_url}): {str(exc) or type(exc).__name__}") from None
        self._tasks = [asyncio.get_running_loop().create_task(
            self._send_audio(), name=f"livekit-audio-{self.room}")]
        self._hub.add_tap(self, "vp8")
        logger.info("publishing into room %s of %s", self.room, settings.livekit_url)

    # -- controllers' microphones ------------------------------------------------------------------

    def _on_track_subscribed(self, track: rtc.Track, publication: rtc.RemoteTrackPublication,
                             participant: rtc.RemoteParticipant) -> None:
        # Only tokens from mint_livekit_token with microphone=True may publish, and only this.
        if track.kind == rtc.TrackKind.KIND_AUDIO and not self._closed:
            self._tasks.append(asyncio.get_running_loop().create_task(
                self._listen(track), name=f"livekit-microphone-{self.room}"))

    async def _listen(self, track: rtc.Track) -> None:
        assert self._microphone is not None
        stream = rtc.AudioStream(track, sample_rate=AUDIO_RATE, num_channels=1)
        pts = 0
        try:
            async for event in stream:
                await self._microphone(audio_to_av(event.frame, pts))
                pts += event.frame.samples_per_channel
        finally:
            await stream.aclose()

    # -- Tap (on the loop, must not block) --------------------------------------------------------

    def video_packet(self, packet: Packet) -> None:
        source = self._video
        if source is None or self._closed:
            return
        width, height = self._size
        kind = (rtc.EncodedFrameType.ENCODED_FRAME_KEY if packet.is_keyframe
                else rtc.EncodedFrameType.ENCODED_FRAME_DELTA)
        if source.capture_frame(rtc.EncodedVideoFrame(
                bytes(packet), width, height, rtc.VideoCodec.VP8, kind,
                timestamp_us=time.monotonic_ns() // 1000)):
            self.frames_published += 1
        if source.take_feedback().keyframe_requested:  # a subscriber joined or lost packets
            self.keyframe_requests += 1
            self._hub.request_keyframe("livekit", "vp8")

    def audio_frame(self, frame: av.AudioFrame) -> None:
        if not self._closed:
            self._audio_frames.put(frame)

    # -- data -------------------------------------------------------------------------------------

    async def send_data(self, payload: bytes, topic: str) -> None:
        """One reliable data packet to everyone in the room (the session's events, through
        an :class:`EventRelay`)."""
        if not self._closed:
            await self._room.local_participant.publish_data(payload, reliable=True, topic=topic)

    async def _send_audio(self) -> None:
        source = self._audio
        assert source is not None
        with contextlib.suppress(MailboxClosed):
            while True:
                await capture_mono(source, self._resampler, await self._audio_frames.get())

    async def close(self) -> None:
        """Stop feeding, leave the room. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._hub.remove_tap(self)
        self._audio_frames.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._room.disconnect()
        sources: list[Any] = [self._video, self._audio]
        for source in sources:
            if source is not None:
                await source.aclose()
        logger.info("left room %s", self.room)
