"""Encode-once fan-out: one hub per session, one encoder per codec in use, N viewer tracks.

Frames arrive from the upstream on the event loop. Video goes to one :class:`VideoLane` per
negotiated codec (VP8 for most browsers, H.264 for those that prefer it); a lane exists only
once a viewer of its codec reads, so a session watched only in VP8 encodes once, and one with
both kinds of viewer encodes twice, never N times. Each lane encodes in its own worker thread
(libvpx and libx264 release the GIL) from a one-slot mailbox: when the encoder is busy the
newest frame replaces the waiting one, so a slow encoder costs frame rate, never latency or
memory. Audio is cheap (~0.1 ms per 20 ms frame) and is encoded inline to keep its cadence
exact. Every packet is handed to every subscribed :class:`PacketTrack`; aiortc only packetizes.

Keyframe policy, per lane: a join, PLI/FIR or a viewer's overflow asks for a keyframe;
requests are coalesced to one per ``keyframe_min_gap`` seconds, and a periodic keyframe every
``keyframe_interval`` seconds bounds recovery for a viewer whose request got lost.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import av

from ..metrics import Metrics
from .codecs import VIDEO_ENCODERS, AudioEncoder, Packet, VideoEncoder
from .tracks import FrameTrack, PacketTrack

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HubConfig:
    bitrate: int
    fps: int = 30
    keyframe_interval: float = 4.0
    keyframe_min_gap: float = 0.5
    video_queue: int = 30
    audio_queue: int = 50
    naive: bool = False
    """Benchmark baseline only: hand raw frames to every viewer (one encoder per viewer)."""


@dataclass(slots=True)
class HubStats:
    video_frames_in: int = 0
    video_frames_encoded: int = 0
    video_frames_skipped: int = 0
    audio_frames_encoded: int = 0
    keyframes: int = 0
    keyframe_requests: int = 0
    packets_dropped: int = 0


class VideoLane:
    """One video codec's encoder, its viewers and its keyframe policy.

    Lanes encode the same frame objects in parallel threads, and an encoder marks the frame it
    is given (``pict_type`` asks for a keyframe): only the first lane may touch the upstream's
    frame; any other lane encodes a private copy (``owns_frames`` False), made in its thread.
    """

    def __init__(self, hub: Hub, encoder: VideoEncoder, owns_frames: bool) -> None:
        self.codec = encoder.codec
        self._owns_frames = owns_frames
        self.tracks: set[PacketTrack] = set()
        self._hub = hub
        self._config = hub.config
        self._stats = hub.stats
        self._metrics = hub.metrics
        self._encoder = encoder
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"hub-{self.codec}")
        self._pending_frame: av.VideoFrame | None = None
        self._frame_ready = asyncio.Event()
        self._keyframe_reason: str | None = "start"
        self._last_keyframe = -float("inf")
        # Label lookups take a lock and a dict probe: resolve the per-frame ones once.
        self._encoded = self._metrics.frames_encoded.labels("video", self.codec)
        self._encode_time = self._metrics.encode_duration.labels(self.codec)
        self._sent_bytes = self._metrics.sent_bytes.labels("video")
        self._task = asyncio.get_running_loop().create_task(
            self._encode_forever(), name=f"hub-{self.codec}")

    def request_keyframe(self, reason: str) -> None:
        if self._keyframe_reason is None:
            self._keyframe_reason = reason

    def push(self, frame: av.VideoFrame) -> None:
        if not self.tracks:
            return
        if self._pending_frame is not None:
            self._hub.skip("video", "encoder_busy")
        self._pending_frame = frame
        self._frame_ready.set()

    def _take_keyframe_decision(self) -> str | None:
        now = time.monotonic()
        if now - self._last_keyframe >= self._config.keyframe_interval:
            return self._keyframe_reason or "periodic"
        if self._keyframe_reason and now - self._last_keyframe >= self._config.keyframe_min_gap:
            return self._keyframe_reason
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
                logger.warning("%s encode failed, frame dropped: %s", self.codec, exc)
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
                    self._stats.keyframes += 1
                    self._metrics.keyframes.labels(reason or "encoder").inc()
                self._sent_bytes.inc(packet.size * len(self.tracks))
                for track in tuple(self.tracks):
                    track.push(packet, keyframe)

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.wait([self._task])
        for track in tuple(self.tracks):
            track.stop()
        self._pending_frame = None
        # The worker may still be inside the encoder for this one frame; don't block the loop.
        self._executor.shutdown(wait=False)


def _private_copy(frame: av.VideoFrame) -> av.VideoFrame:
    copy = av.VideoFrame.from_numpy_buffer(frame.to_ndarray(format="yuv420p"), format="yuv420p")
    copy.pts, copy.time_base = frame.pts, frame.time_base
    return copy


class Hub:
    def __init__(self, config: HubConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.stats = HubStats()
        self._lanes: dict[str, VideoLane] = {}
        self._audio_encoder = AudioEncoder()
        self._audio_tracks: set[PacketTrack] = set()
        self._naive_tracks: set[FrameTrack] = set()
        self._closed = False
        self._audio_encoded = metrics.frames_encoded.labels("audio", AudioEncoder.codec)
        self._audio_bytes = metrics.sent_bytes.labels("audio")

    # -- viewer side -------------------------------------------------------------------------

    @property
    def viewer_tracks(self) -> int:
        video = sum(len(lane.tracks) for lane in self._lanes.values())
        return video + len(self._audio_tracks) + len(self._naive_tracks)

    @property
    def naive(self) -> bool:
        return self.config.naive

    @property
    def video_codecs(self) -> list[str]:
        """Codecs with a running encoder (a lane), in the order they were first needed."""
        return list(self._lanes)

    def subscribe_frames(self, kind: str) -> FrameTrack:
        """Benchmark baseline: raw frames, for a sender that encodes them itself."""
        if self._closed:
            raise RuntimeError("hub is closed")
        track = FrameTrack(self, kind, 2 if kind == "video" else 10)
        self._naive_tracks.add(track)
        return track

    def subscribe(self, kind: str, on_first_packet: Callable[[], None] | None = None,
                  codec: str | None = None) -> PacketTrack:
        """A track for one viewer's sender. It joins the fan-out when the sender first reads
        (see :meth:`attach`), so nothing is encoded or queued for a handshake in progress."""
        if self._closed:
            raise RuntimeError("hub is closed")
        if kind not in ("video", "audio"):
            raise ValueError(f"unknown kind {kind!r}")
        if kind == "video":
            codec = codec or "vp8"
            if codec not in VIDEO_ENCODERS:
                raise ValueError(f"unknown video codec {codec!r}")
            return PacketTrack(self, kind, self.config.video_queue, on_first_packet, codec)
        return PacketTrack(self, kind, self.config.audio_queue, on_first_packet, AudioEncoder.codec)

    def attach(self, track: PacketTrack) -> None:
        if self._closed:
            track.stop()
        elif track.kind == "video":
            lane = self._lanes.get(track.codec)
            if lane is None:
                encoder = VIDEO_ENCODERS[track.codec](self.config.bitrate, self.config.fps)
                lane = self._lanes[track.codec] = VideoLane(self, encoder, not self._lanes)
            lane.tracks.add(track)
            self.request_keyframe("join", track.codec)
        else:
            self._audio_tracks.add(track)

    def unsubscribe(self, track: PacketTrack | FrameTrack) -> None:
        if isinstance(track, FrameTrack):
            self._naive_tracks.discard(track)
        elif track.kind == "video":
            lane = self._lanes.get(track.codec)
            if lane is not None:
                lane.tracks.discard(track)
        else:
            self._audio_tracks.discard(track)

    def request_keyframe(self, reason: str, codec: str = "vp8") -> None:
        self.stats.keyframe_requests += 1
        self.metrics.keyframe_requests.labels(reason).inc()
        lane = self._lanes.get(codec)
        if lane is not None:
            lane.request_keyframe(reason)

    def count_dropped(self, kind: str, count: int) -> None:
        self.stats.packets_dropped += count
        self.metrics.packets_dropped.labels(kind).inc(count)

    def count_feedback(self, kind: str) -> None:
        self.metrics.rtcp_feedback.labels(kind).inc()

    # -- upstream side -----------------------------------------------------------------------

    @property
    def video_wanted(self) -> bool:
        return bool(self._naive_tracks) or any(lane.tracks for lane in self._lanes.values())

    def push_video(self, frame: av.VideoFrame) -> None:
        if self._closed:
            return
        self.stats.video_frames_in += 1
        if self.config.naive:
            self._push_naive("video", frame)
            return
        if not self.video_wanted:
            self.skip("video", "no_viewers")
            return
        for lane in self._lanes.values():
            lane.push(frame)

    def push_audio(self, frame: av.AudioFrame) -> None:
        if self._closed:
            return
        if self.config.naive:
            self._push_naive("audio", frame)
            return
        if not self._audio_tracks:
            self.skip("audio", "no_viewers")
            return
        packets = self._audio_encoder.encode(frame)
        self.stats.audio_frames_encoded += 1
        self._audio_encoded.inc()
        for packet in packets:
            self._audio_bytes.inc(packet.size * len(self._audio_tracks))
            for track in tuple(self._audio_tracks):
                track.push(packet, True)

    def _push_naive(self, kind: str, frame: av.VideoFrame | av.AudioFrame) -> None:
        for track in tuple(self._naive_tracks):
            if track.kind == kind:
                track.push(frame)

    def skip(self, kind: str, reason: str) -> None:
        if kind == "video":
            self.stats.video_frames_skipped += 1
        self.metrics.frames_skipped.labels(kind, reason).inc()

    async def close(self) -> None:
        """End every viewer track and stop the encoders. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for lane in self._lanes.values():
            await lane.close()
        for track in (*self._audio_tracks, *self._naive_tracks):
            track.stop()
