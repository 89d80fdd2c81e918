"""Encode-once fan-out: one hub per session, one encoder per lane in use, N viewer tracks.

Frames arrive from the upstream on the event loop. Video goes to one :class:`VideoLane` per
negotiated codec (VP8 for most browsers, H.264 for those that prefer it) and rung of the
quality ladder (:mod:`.ladder`: the session's size, half, a quarter); a lane exists only once
a viewer of it reads, so a session watched only in VP8 at full size encodes once, and one with
every kind of viewer a few times, never N times. Each lane encodes in its own worker thread
(libvpx and libx264 release the GIL) from a one-slot mailbox: when the encoder is busy the
newest frame replaces the waiting one, so a slow encoder costs frame rate, never latency or
memory. Audio is cheap (~0.1 ms per 20 ms frame) and is encoded inline to keep its cadence
exact. Each encoded packet is packetized once (:class:`~.rtp.Packetizer`) and the resulting
:class:`~.rtp.RtpFrame` handed to every subscribed :class:`Subscriber` (a viewer's
:class:`~.rtp.RtpStream`), which writes only its own headers and sends at once.

Keyframe policy, per lane (a viewer's PLI costs only its own rung, and a viewer asks at most
once a second, :data:`~.rtp.KEYFRAME_REQUEST_INTERVAL`): a join, a move to another rung,
PLI/FIR or a viewer's overflow asks for a keyframe;
requests are coalesced to one per ``keyframe_min_gap`` seconds (``keyframe_join_gap`` for
joins: a new viewer sees nothing until its keyframe, while a repair keyframe only shortens a
glitch, and a PLI storm must not turn into a keyframe storm for everyone), and a periodic
keyframe every ``keyframe_interval`` seconds bounds recovery for a viewer whose request got
lost. A viewer that joins within ``fast_start_frames`` of a keyframe asks for none: it starts
at once on a replay of that keyframe and the frames since (:class:`FastStart`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass
from typing import Protocol

import av
from prometheus_client import Counter

from ..metrics import Metrics
from .codecs import VIDEO_ENCODERS, AudioEncoder, Packet, VideoEncoder
from .ladder import LADDER, split_lane
from .rtp import Feedback, Packetizer, RtpFrame

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HubConfig:
    bitrate: int
    fps: int = 30
    keyframe_interval: float = 4.0
    keyframe_min_gap: float = 0.5
    keyframe_join_gap: float = 0.2
    fast_start_frames: int = 8
    audio_packet_ms: int = 40


@dataclass(slots=True)
class HubStats:
    video_frames_in: int = 0
    video_frames_encoded: int = 0
    video_frames_skipped: int = 0
    audio_frames_encoded: int = 0
    keyframes: int = 0
    keyframe_requests: int = 0
    packets_dropped: int = 0


class Subscriber(Protocol):
    """A viewer's sender of one kind, as the hub sees it (an :class:`~.rtp.RtpStream`)."""

    @property
    def kind(self) -> str: ...

    @property
    def codec(self) -> str: ...

    @property
    def lane(self) -> str:
        """The hub lane it reads: its codec at a rung of the ladder (``"vp8"``, ``"vp8@2"``)."""

    def deliver(self, frame: RtpFrame) -> None: ...


class Tap(Protocol):
    """Whole encoded video frames and the raw audio, as they pass through the hub: what a
    republisher needs (the LiveKit distribution, :mod:`gateway.livekit_out`), which carries
    its own packetizing and its own Opus encoder. Called on the loop; must not block."""

    def video_packet(self, packet: Packet) -> None: ...

    def audio_frame(self, frame: av.AudioFrame) -> None: ...


class Fanout(Feedback, Protocol):
    """What a viewer's streams need from the fan-out (besides their :class:`~.rtp.Feedback`):
    the session's :class:`Hub` in-process, or a fan-out worker's stand-in for it
    (``gateway.workers.process.SessionFeed``)."""

    @property
    def closed(self) -> bool: ...

    def check_codec(self, codec: str) -> None: ...

    def attach(self, subscriber: Subscriber) -> bool: ...

    def detach(self, subscriber: Subscriber) -> None: ...


def deliver_all(frame: RtpFrame, subscribers: set[Subscriber]) -> None:
    """Every subscriber sends ``frame`` now; one that fails is detached, not fatal."""
    for subscriber in tuple(subscribers):
        try:
            subscriber.deliver(frame)
        except (OSError, ValueError) as exc:  # a socket gone under us, an SRTP error
            logger.debug("%s subscriber failed, detached: %s", subscriber.kind, exc)
            subscribers.discard(subscriber)


class FastStart:
    """A lane's frames since its last keyframe, while they are few (at most ``limit``).

    A joining viewer waited for a keyframe of its own: up to ``keyframe_join_gap`` for the
    request, then the encode, and every viewer paid for that keyframe's bytes. Within ``limit``
    frames of a keyframe it now gets the keyframe and the frames since at once, as they were
    sent to the others (same RTP timestamps: its player starts at most ``limit`` frames behind
    and catches up), and nobody else gets anything."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._frames: list[RtpFrame] = []

    def add(self, frame: RtpFrame) -> None:
        if frame.keyframe:
            self._frames = [frame] if self._limit else []
        elif self._frames:
            if len(self._frames) < self._limit:
                self._frames.append(frame)
            else:
                self._frames = []  # too far behind to replay: the next joiner asks for one

    def replay(self, subscriber: Subscriber) -> bool:
        """Start ``subscriber`` on the recent frames; False if there are none to start on."""
        for frame in self._frames:
            subscriber.deliver(frame)
        return bool(self._frames)


class VideoLane:
    """One video codec's encoder, its viewers and its keyframe policy.

    Lanes encode the same frame objects in parallel threads, and an encoder marks the frame it
    is given (``pict_type`` asks for a keyframe): only the first lane may touch the upstream's
    frame; any other lane encodes a private copy (``owns_frames`` False), made in its thread.
    """

    def __init__(self, hub: Hub, name: str, encoder: VideoEncoder, owns_frames: bool) -> None:
        self.name = name
        self.codec = encoder.codec
        self.scales = encoder.scales
        self._owns_frames = owns_frames or encoder.scales  # a scaled copy is its own
        self.subscribers: set[Subscriber] = set()
        self.taps: set[Tap] = set()
        self.fast_start = FastStart(hub.config.fast_start_frames)
        self._packetizer = Packetizer(encoder.codec, name)
        self._hub = hub
        self._config = hub.config
        self._stats = hub.stats
        self._metrics = hub.metrics
        self._encoder = encoder
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"hub-{name}")
        self._pending_frame: av.VideoFrame | None = None
        self._frame_ready = asyncio.Event()
        self._keyframe_reason: str | None = "start"
        self._last_keyframe = -float("inf")
        self.keyframes = 0
        """Encoded by this lane: its viewers each received them all."""
        # Label lookups take a lock and a dict probe: resolve the per-frame ones once.
        self._encoded = self._metrics.frames_encoded.labels("video", self.codec)
        self._encode_time = self._metrics.encode_duration.labels(self.codec)
        self._sent_bytes = self._metrics.sent_bytes.labels("video")
        self._task = asyncio.get_running_loop().create_task(
            self._encode_forever(), name=f"hub-{name}")

    def request_keyframe(self, reason: str) -> None:
        # A join's shorter gap is kept when a repair asks too: the joiner still waits for it.
        if self._keyframe_reason is None or reason in _STARTS:
            self._keyframe_reason = reason

    @property
    def wanted(self) -> bool:
        return bool(self.subscribers or self.taps)

    def push(self, frame: av.VideoFrame) -> None:
        if not self.wanted:
            return
        if self._pending_frame is not None:
            self._hub.skip("video", "encoder_busy")
        self._pending_frame = frame
        self._frame_ready.set()

    def _take_keyframe_decision(self) -> str | None:
        now = time.monotonic()
        if now - self._last_keyframe >= self._config.keyframe_interval:
            return self._keyframe_reason or "periodic"
        reason = self._keyframe_reason
        if reason is not None:
            config = self._config
            gap = config.keyframe_join_gap if reason in _STARTS else config.keyframe_min_gap
            if now - self._last_keyframe >= gap:
                return reason
        return None

    def _encode_timed(self, frame: av.VideoFrame, keyframe: bool) -> tuple[list[Packet], float]:
        started = time.perf_counter()
        if not self._owns_frames:
            frame = _private_copy(frame)
        packets = self._encoder.encode(frame, keyframe)
        return packets, time.perf_counter() - started

    async def _encode_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._frame_ready.wait()
            self._frame_ready.clear()
            frame, self._pending_frame = self._pending_frame, None
            if frame is None:
                continue
            reason = self._take_keyframe_decision()
            try:
                packets, took = await loop.run_in_executor(
                    self._executor, self._encode_timed, frame, reason is not None
                )
            except (av.FFmpegError, ValueError) as exc:
                # One bad frame (odd size, codec hiccup) must not end the stream for everyone.
                logger.warning("%s encode failed, frame dropped: %s", self.name, exc)
                self._hub.skip("video", "encode_error")
                continue
            self._stats.video_frames_encoded += 1
            self._encoded.inc()
            self._encode_time.observe(took)
            for packet in packets:
                keyframe = packet.is_keyframe
                if keyframe:
                    self._last_keyframe = time.monotonic()
                    self._keyframe_reason = None
                    self.keyframes += 1
                    self._stats.keyframes += 1
                    self._metrics.keyframes.labels(reason or "encoder").inc()
                for tap in tuple(self.taps):
                    tap.video_packet(packet)
                rtp = self._packetizer.frame(packet)
                self.fast_start.add(rtp)
                self._hub.fan_out(rtp, self.subscribers, self._sent_bytes, packet.size)

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.wait([self._task])
        self.subscribers.clear()
        self.taps.clear()
        self._pending_frame = None
        # The worker may still be inside the encoder for this one frame; don't block the loop.
        self._executor.shutdown(wait=False)


_STARTS = ("join", "switch")
"""Keyframe reasons a viewer waits on to see anything (of that lane): the shorter gap."""


def _private_copy(frame: av.VideoFrame) -> av.VideoFrame:
    copy = av.VideoFrame.from_numpy_buffer(frame.to_ndarray(format="yuv420p"), format="yuv420p")
    copy.pts, copy.time_base = frame.pts, frame.time_base
    return copy


class Hub:
    """One session's encoders and the viewers' streams they feed. Implements the stream's
    :class:`~.rtp.Feedback` (keyframe requests, drop and RTCP counts)."""

    def __init__(self, config: HubConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.stats = HubStats()
        self._lanes: dict[str, VideoLane] = {}
        self._audio_encoder = AudioEncoder(packet_ms=config.audio_packet_ms)
        self._audio_packetizer = Packetizer(AudioEncoder.codec)
        self._audio: set[Subscriber] = set()
        self._taps: set[Tap] = set()
        self._closed = False
        self._audio_encoded = metrics.frames_encoded.labels("audio", AudioEncoder.codec)
        self._audio_bytes = metrics.sent_bytes.labels("audio")

    # -- viewer side -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def subscribers(self) -> int:
        return sum(len(lane.subscribers) for lane in self._lanes.values()) + len(self._audio)

    @property
    def video_codecs(self) -> list[str]:
        """Lanes (codec and rung: ``"vp8"``, ``"vp8@1"``) with an encoder, in the order they
        were first needed."""
        return list(self._lanes)

    @staticmethod
    def check_codec(codec: str) -> None:
        if codec not in VIDEO_ENCODERS:
            raise ValueError(f"unknown video codec {codec!r}")

    def attach(self, subscriber: Subscriber) -> bool:
        """Join the fan-out: called once the viewer's DTLS is up, so nothing is encoded or sent
        for a handshake in progress. Video starts on a recent keyframe's replay, or at a
        keyframe requested here. False once the hub is closed."""
        if self._closed:
            return False
        if subscriber.kind == "video":
            lane = self._lane(subscriber.lane)
            lane.subscribers.add(subscriber)
            if lane.fast_start.replay(subscriber):
                self.metrics.fast_starts.inc()
            else:
                self.request_keyframe("join", lane.name)
        else:
            self._audio.add(subscriber)
        return True

    def add_tap(self, tap: Tap, codec: str) -> None:
        """Feed ``tap`` the ``codec`` lane's encoded frames (the lane runs from now on, for it
        alone if need be, starting at a keyframe) and the audio."""
        self.check_codec(codec)
        if self._closed:
            return
        lane = self._lane(codec)
        lane.taps.add(tap)
        self._taps.add(tap)
        self.request_keyframe("join", codec)

    def remove_tap(self, tap: Tap) -> None:
        self._taps.discard(tap)
        for lane in self._lanes.values():
            lane.taps.discard(tap)

    def detach(self, subscriber: Subscriber) -> None:
        if subscriber.kind == "video":  # from its lane, and the one it was moving to
            for lane in self._lanes.values():
                lane.subscribers.discard(subscriber)
        else:
            self._audio.discard(subscriber)

    def join_lane(self, subscriber: Subscriber, lane: str, urgent: bool) -> None:
        if self._closed:
            return
        found = self._lane(lane)
        watched = bool(found.subscribers or found.taps)
        found.subscribers.add(subscriber)
        if urgent or not watched:  # a keyframe nobody else receives costs nobody
            self.request_keyframe("switch", lane)

    def leave_lane(self, subscriber: Subscriber, lane: str) -> None:
        found = self._lanes.get(lane)
        if found is not None:
            found.subscribers.discard(subscriber)

    def _lane(self, name: str) -> VideoLane:
        lane = self._lanes.get(name)
        if lane is None:
            codec, rung = split_lane(name)
            self.check_codec(codec)
            encoder = VIDEO_ENCODERS[codec](round(self.config.bitrate * LADDER[rung].bitrate_share),
                                            self.config.fps, LADDER[rung].divisor)
            # The first full-size lane marks the upstream's frames; the others copy them.
            owner = all(other.scales for other in self._lanes.values())
            lane = self._lanes[name] = VideoLane(self, name, encoder, owner)
        return lane

    def request_keyframe(self, reason: str, lane: str = "vp8") -> None:
        self.stats.keyframe_requests += 1
        self.metrics.keyframe_requests.labels(reason).inc()
        found = self._lanes.get(lane)
        if found is not None:
            found.request_keyframe(reason)

    def count_dropped(self, kind: str, count: int) -> None:
        self.stats.packets_dropped += count
        self.metrics.packets_dropped.labels(kind).inc(count)

    def count_feedback(self, kind: str) -> None:
        self.metrics.rtcp_feedback.labels(kind).inc()

    def fan_out(self, frame: RtpFrame, subscribers: set[Subscriber], sent_bytes: Counter,
                size: int) -> None:
        sent_bytes.inc(size * len(subscribers))
        deliver_all(frame, subscribers)

    # -- upstream side -----------------------------------------------------------------------

    @property
    def video_wanted(self) -> bool:
        return any(lane.wanted for lane in self._lanes.values())

    def push_video(self, frame: av.VideoFrame) -> None:
        if self._closed:
            return
        self.stats.video_frames_in += 1
        if not self.video_wanted:
            self.skip("video", "no_viewers")
            return
        for lane in self._lanes.values():
            lane.push(frame)

    def push_audio(self, frame: av.AudioFrame) -> None:
        if self._closed:
            return
        for tap in tuple(self._taps):
            tap.audio_frame(frame)
        if not self._audio:
            self.skip("audio", "no_viewers")
            return
        packets = self._audio_encoder.encode(frame)
        self.stats.audio_frames_encoded += 1
        self._audio_encoded.inc()
        for packet in packets:
            self.fan_out(self._audio_packetizer.frame(packet), self._audio, self._audio_bytes,
                         packet.size)

    def skip(self, kind: str, reason: str) -> None:
        if kind == "video":
            self.stats.video_frames_skipped += 1
        self.metrics.frames_skipped.labels(kind, reason).inc()

    async def close(self) -> None:
        """Stop the encoders and forget every subscriber (their viewers close them). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for lane in self._lanes.values():
            await lane.close()
        self._audio.clear()
        self._taps.clear()
