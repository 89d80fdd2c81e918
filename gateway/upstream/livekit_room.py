"""The gateway inside a provider's LiveKit room, with the real ``livekit`` SDK.

It subscribes to the avatar participant, turns its decoded frames into PyAV frames for the
hub (converted to yuv420p once, here), turns the provider's data packets into
:class:`AvatarEvent`s, and reports when the avatar leaves or the room goes away. Media is taken
from the avatar participant only; events from any provider participant (LiveAvatar's agent
``liveavatar-agent-<session_id>`` speaks for the avatar), never from other clients. It can
also publish a microphone: PCM handed to :meth:`RoomLink.push_microphone` becomes a local
audio track in the room.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import logging
from collections import deque
from collections.abc import Callable, Collection

import av
import numpy as np
from livekit import rtc

from ..errors import UpstreamUnavailable
from .base import AvatarEvent, EventType, MediaSink

logger = logging.getLogger(__name__)

VIDEO_TIME_BASE = fractions.Fraction(1, 90_000)
AUDIO_RATE = 48_000
AUDIO_TIME_BASE = fractions.Fraction(1, AUDIO_RATE)
_KNOWN_EVENTS = {e.value for e in EventType}
SYNC_INTERVAL = 0.5
"""How often the jitter buffers' delays are read (the SDK's stats)."""
MAX_VIDEO_HOLD = 1.0
"""Most the video is held back to wait for the sound; beyond that the audio is broken anyway."""
HOLD_STEP = 0.01
"""Most the hold changes per video frame (~0.3 s per second at 30 fps): no jumps in the motion."""

EventDecoder = Callable[[bytes, str], list[AvatarEvent]]
"""(payload, topic) -> the events it carries (none for a packet to ignore)."""


def decode_heygen_event(payload: bytes, topic: str) -> list[AvatarEvent]:
    """HeyGen v2 data packets: JSON ``{"type": ..., "task_id": ..., ...}`` (spec §6.5)."""
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return []
    if not isinstance(body, dict) or body.get("type") not in _KNOWN_EVENTS:
        return []
    kind = EventType(body.pop("type"))
    task_id = body.pop("task_id", None)
    return [AvatarEvent(kind, str(task_id) if task_id is not None else None, body)]


class PlayoutDelay:
    """How long an inbound track's media waited in its jitter buffer, over the last interval:
    the growth of the WebRTC stats ``jitterBufferDelay`` / ``jitterBufferEmittedCount``."""

    def __init__(self) -> None:
        self._total = 0.0
        self._emitted = 0
        self.seconds: float | None = None

    def update(self, stats: list[rtc.stats.RtcStats]) -> None:
        for report in stats:
            if report.WhichOneof("stats") != "inbound_rtp":
                continue
            inbound = report.inbound_rtp.inbound
            total, emitted = inbound.jitter_buffer_delay, inbound.jitter_buffer_emitted_count
            if emitted > self._emitted:
                self.seconds = (total - self._total) / (emitted - self._emitted)
            self._total, self._emitted = total, emitted


def video_to_av(frame: rtc.VideoFrame, pts: int) -> av.VideoFrame:
    if frame.type != rtc.VideoBufferType.I420:
        frame = frame.convert(rtc.VideoBufferType.I420)
    width, height = frame.width, frame.height
    data = np.frombuffer(frame.data, dtype=np.uint8)
    if width % 2 == 0 and height % 2 == 0:
        out = av.VideoFrame.from_ndarray(data.reshape(height * 3 // 2, width), format="yuv420p")
    else:
        # Odd sizes have rounded-up chroma planes that don't fit the packed-array shortcut.
        out = av.VideoFrame(width, height, "yuv420p")
        offset = 0
        for index, (w, h) in enumerate(((width, height), ((width + 1) // 2, (height + 1) // 2),
                                        ((width + 1) // 2, (height + 1) // 2))):
            plane = out.planes[index]
            rows = data[offset:offset + w * h].reshape(h, w)
            padded = np.zeros((h, plane.line_size), dtype=np.uint8)
            padded[:, :w] = rows
            plane.update(padded.tobytes())
            offset += w * h
    out.pts = pts
    out.time_base = VIDEO_TIME_BASE
    return out


def audio_to_av(frame: rtc.AudioFrame, pts: int) -> av.AudioFrame:
    samples = np.frombuffer(frame.data, dtype=np.int16)
    layout = "mono" if frame.num_channels == 1 else "stereo"
    out = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout=layout)
    out.sample_rate = frame.sample_rate
    out.pts = pts
    out.time_base = fractions.Fraction(1, frame.sample_rate)
    return out


async def capture_mono(source: rtc.AudioSource, resampler: av.AudioResampler,
                       frame: av.AudioFrame) -> None:
    """One PyAV frame (any rate, layout or format; ``resampler`` makes it s16 mono 48 kHz)
    into a LiveKit audio source."""
    for chunk in resampler.resample(frame):
        samples = chunk.to_ndarray().reshape(-1)
        if samples.size:
            await source.capture_frame(
                rtc.AudioFrame(samples.tobytes(), AUDIO_RATE, 1, samples.size))


class RoomLink:
    """One connection to one LiveKit room, feeding one :class:`MediaSink`."""

    def __init__(
        self,
        sink: MediaSink,
        *,
        avatar_identity: str = "heygen",
        event_identities: Collection[str] = (),
        decode_event: EventDecoder = decode_heygen_event,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self._sink = sink
        self._avatar = avatar_identity
        self._event_senders = frozenset((avatar_identity, *event_identities))
        self._decode = decode_event
        self._on_lost = on_lost
        self._room = rtc.Room()
        self._streams: list[asyncio.Task[None]] = []
        self._tracks: dict[str, rtc.Track] = {}
        self._subscribed: set[str] = set()
        self._hold = 0.0
        self._hold_target = 0.0
        self._held: deque[tuple[float, av.VideoFrame]] = deque(
            maxlen=int(MAX_VIDEO_HOLD * 60) + 2)
        self._held_ready = asyncio.Event()
        self._ready = asyncio.Event()
        self._mic_source: rtc.AudioSource | None = None
        self._mic_track: rtc.LocalAudioTrack | None = None
        self._mic_resampler = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE)
        self._closed = False
        self.frames = {"video": 0, "audio": 0}
        room = self._room
        room.on("track_subscribed", self._on_track_subscribed)
        room.on("participant_disconnected", self._on_participant_disconnected)
        room.on("disconnected", self._on_disconnected)
        room.on("data_received", self._on_data)

    @property
    def identity(self) -> str:
        """Who the gateway is in the room (the provider's token decides)."""
        return self._room.local_participant.identity if self._room.isconnected() else ""

    @property
    def connected(self) -> bool:
        return self._room.isconnected() and not self._closed

    async def connect(self, url: str, token: str, *, ready_within: float = 20.0) -> None:
        """Join, and return once the avatar's video and audio are both flowing."""
        try:
            async with asyncio.timeout(ready_within):
                await self._room.connect(url, token, rtc.RoomOptions(auto_subscribe=True))
                await self._ready.wait()
        except TimeoutError:
            await self.close()
            raise UpstreamUnavailable(
                f"the avatar did not publish video and audio within {ready_within:.0f} s") from None
        except rtc.ConnectError as exc:
            await self.close()
            raise UpstreamUnavailable(f"cannot join the LiveKit room: {exc}") from None
        except BaseException:
            # Cancelled (the session stopped while joining): never leave a half-joined room.
            await asyncio.shield(self.close())
            raise

    # -- media in ----------------------------------------------------------------------------

    def _on_track_subscribed(self, track: rtc.Track, publication: rtc.RemoteTrackPublication,
                             participant: rtc.RemoteParticipant) -> None:
        if participant.identity != self._avatar:
            return
        if track.kind == rtc.TrackKind.KIND_VIDEO:
            self._tracks["video"] = track
            self._streams.append(asyncio.create_task(self._pump_video(track), name="lk-video"))
            if not any(t.get_name() == "lk-av-sync" for t in self._streams):
                self._streams += [
                    asyncio.create_task(self._release_video(), name="lk-video-hold"),
                    asyncio.create_task(self._watch_sync(), name="lk-av-sync")]
        elif track.kind == rtc.TrackKind.KIND_AUDIO:
            self._tracks["audio"] = track
            self._streams.append(asyncio.create_task(self._pump_audio(track), name="lk-audio"))

    def _mark(self, kind: str) -> None:
        self._subscribed.add(kind)
        if len(self._subscribed) == 2:
            self._ready.set()

    async def _watch_sync(self) -> None:
        """Keep the video as late as the sound.

        The SDK plays each track as soon as its own jitter buffer allows and syncs audio with
        video only for tracks of one media stream, which a LiveKit publisher need not ask for
        (the simulator's avatar does not). The audio's buffer (NetEq) grows its delay when
        packets come in bursts, and shrinks it only slowly; video's barely grows. Under load
        the sound reached the gateway 0.3-0.5 s behind the mouth, and every viewer heard it
        so. So the video waits here for what the audio waits there, as libwebrtc would for
        one stream. Never the other way: the sound is not delayed."""
        audio, video = PlayoutDelay(), PlayoutDelay()
        while True:
            await asyncio.sleep(SYNC_INTERVAL)
            for kind, delay in (("audio", audio), ("video", video)):
                track = self._tracks.get(kind)
                if track is not None:
                    try:
                        delay.update(await track.get_stats())
                    except Exception as exc:  # a track going away mid-request: next round
                        logger.debug("no %s stats: %s", kind, exc)
            if audio.seconds is not None and video.seconds is not None:
                self._hold_target = min(max(audio.seconds - video.seconds, 0.0), MAX_VIDEO_HOLD)

    async def _pump_video(self, track: rtc.Track) -> None:
        # capacity: the SDK's ring buffer drops the oldest frame rather than growing.
        stream = rtc.VideoStream(track, capacity=2, format=rtc.VideoBufferType.I420)
        last_pts = -1
        try:
            async for event in stream:
                pts = max(event.timestamp_us * 90 // 1000, last_pts + 1)
                last_pts = pts
                self.frames["video"] += 1
                self._mark("video")
                step = min(max(self._hold_target - self._hold, -HOLD_STEP), HOLD_STEP)
                self._hold += step
                if not self._sink.video_wanted:
                    continue
                frame = video_to_av(event.frame, pts)
                if self._hold < 0.001 and not self._held:
                    self._sink.on_video_frame(frame)
                else:
                    self._held.append((asyncio.get_running_loop().time() + self._hold, frame))
                    self._held_ready.set()
        finally:
            await stream.aclose()

    async def _release_video(self) -> None:
        """Hand held video frames on when they are due (see :meth:`_watch_sync`)."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._held:
                self._held_ready.clear()
                await self._held_ready.wait()
                continue
            wait = self._held[0][0] - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            # Several due at once (the loop was stalled): the newest, like the SDK's ring.
            due: av.VideoFrame | None = None
            while self._held and self._held[0][0] <= loop.time():
                due = self._held.popleft()[1]
            if due is not None and self._sink.video_wanted:
                self._sink.on_video_frame(due)

    async def _pump_audio(self, track: rtc.Track) -> None:
        stream = rtc.AudioStream(track, capacity=50, sample_rate=AUDIO_RATE, num_channels=1)
        pts = 0
        try:
            async for event in stream:
                self.frames["audio"] += 1
                self._mark("audio")
                self._sink.on_audio_frame(audio_to_av(event.frame, pts))
                pts += event.frame.samples_per_channel
        finally:
            await stream.aclose()

    def _on_data(self, packet: rtc.DataPacket) -> None:
        sender = packet.participant.identity if packet.participant else None
        # No participant: sent by the server itself (provider backends may use its API).
        # Another client's packet must never pass for the avatar's word.
        if sender is not None and sender not in self._event_senders:
            return
        for event in self._decode(packet.data, packet.topic or ""):
            self._sink.on_event(event)

    # -- loss --------------------------------------------------------------------------------

    def _on_participant_disconnected(self, participant: rtc.RemoteParticipant) -> None:
        if participant.identity == self._avatar:
            self._lost("avatar_left")

    def _on_disconnected(self, reason: object = None) -> None:
        self._lost(f"room_disconnected:{reason}" if reason is not None else "room_disconnected")

    def _lost(self, reason: str) -> None:
        if self._closed:
            return
        logger.info("LiveKit room lost: %s", reason)
        if self._on_lost is not None:
            self._on_lost(reason)

    # -- out ---------------------------------------------------------------------------------

    async def send_data(self, payload: bytes, *, topic: str = "") -> None:
        await self._room.local_participant.publish_data(payload, reliable=True, topic=topic)

    async def push_microphone(self, frame: av.AudioFrame) -> None:
        """Publish a controller's microphone into the room (the track is created on first use)."""
        if self._mic_source is None:
            self._mic_source = rtc.AudioSource(AUDIO_RATE, 1, queue_size_ms=200)
            self._mic_track = rtc.LocalAudioTrack.create_audio_track("microphone", self._mic_source)
            options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
            await self._room.local_participant.publish_track(self._mic_track, options)
        # Browsers send 48 kHz stereo Opus; aiortc decodes to s16 stereo. The room wants mono.
        await capture_mono(self._mic_source, self._mic_resampler, frame)

    async def close(self) -> None:
        """Leave the room and stop every stream task. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in self._streams:
            task.cancel()
        for task in self._streams:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._mic_source is not None:
            await self._mic_source.aclose()
        await self._room.disconnect()
