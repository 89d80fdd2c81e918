"""Encode-once fan-out: one hub per session, one encoder per kind, N viewer tracks.

Frames arrive from the upstream on the event loop. Video is encoded in the hub's own worker
thread (libvpx releases the GIL) from a one-slot mailbox: when the encoder is busy the newest
frame replaces the waiting one, so a slow encoder costs frame rate, never latency or memory.
Audio is cheap (~0.1 ms per 20 ms frame) and is encoded inline to keep its cadence exact.
Every packet is handed to every subscribed :class:`PacketTrack`; aiortc then only packetizes.

Keyframe policy: a join, PLI/FIR or a viewer's overflow asks for a keyframe; requests are
coalesced to one per ``keyframe_min_gap`` seconds, and a periodic keyframe every
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
from .codecs import AudioEncoder, Packet, VideoEncoder
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


class Hub:
    def __init__(self, config: HubConfig, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self._video_encoder = VideoEncoder(config.bitrate, config.fps)
        self._audio_encoder = AudioEncoder()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hub-video")
        self._video_tracks: set[PacketTrack] = set()
        self._audio_tracks: set[PacketTrack] = set()
        self._naive_tracks: set[FrameTrack] = set()
        self._pending_frame: av.VideoFrame | None = None
        self._frame_ready = asyncio.Event()
        self._keyframe_reason: str | None = "start"
        self._last_keyframe = -float("inf")
        self._closed = False
        # Label lookups take a lock and a dict probe: resolve the per-frame ones once.
        video_codec, audio_codec = VideoEncoder.codec, AudioEncoder.codec
        self._video_encoded = metrics.frames_encoded.labels("video", video_codec)
        self._audio_encoded = metrics.frames_encoded.labels("audio", audio_codec)
        self._encode_time = metrics.encode_duration.labels(video_codec)
        self._video_bytes = metrics.sent_bytes.labels("video")
        self._audio_bytes = metrics.sent_bytes.labels("audio")
        self._task = asyncio.get_running_loop().create_task(self._encode_video_forever())
        self.stats = HubStats()

    # -- viewer side -------------------------------------------------------------------------

    @property
    def viewer_tracks(self) -> int:
        return len(self._video_tracks) + len(self._audio_tracks) + len(self._naive_tracks)

    @property
    def naive(self) -> bool:
        return self._config.naive

    def subscribe_frames(self, kind: str) -> FrameTrack:
        """Benchmark baseline: raw frames, for a sender that encodes them itself."""
        if self._closed:
            raise RuntimeError("hub is closed")
        track = FrameTrack(self, kind, 2 if kind == "video" else 10)
        self._naive_tracks.add(track)
        return track

    def subscribe(self, kind: str, on_first_packet: Callable[[], None] | None = None) -> PacketTrack:
        """A track for one viewer's sender. It joins the fan-out when the sender first reads
        (see :meth:`attach`), so nothing is encoded or queued for a handshake in progress."""
        if self._closed:
            raise RuntimeError("hub is closed")
        if kind not in ("video", "audio"):
            raise ValueError(f"unknown kind {kind!r}")
        capacity = self._config.video_queue if kind == "video" else self._config.audio_queue
        return PacketTrack(self, kind, capacity, on_first_packet)

    def attach(self, track: PacketTrack) -> None:
        if self._closed:
            track.stop()
        elif track.kind == "video":
            self._video_tracks.add(track)
            self.request_keyframe("join")
        else:
            self._audio_tracks.add(track)

    def unsubscribe(self, track: PacketTrack | FrameTrack) -> None:
        if isinstance(track, FrameTrack):
            self._naive_tracks.discard(track)
        else:
            self._video_tracks.discard(track)
            self._audio_tracks.discard(track)

    def request_keyframe(self, reason: str) -> None:
        self.stats.keyframe_requests += 1
        self._metrics.keyframe_requests.labels(reason).inc()
        if self._keyframe_reason is None:
            self._keyframe_reason = reason

    def count_dropped(self, kind: str, count: int) -> None:
        self.stats.packets_dropped += count
        self._metrics.packets_dropped.labels(kind).inc(count)

    def count_feedback(self, kind: str) -> None:
        self._metrics.rtcp_feedback.labels(kind).inc()

    # -- upstream side -----------------------------------------------------------------------

    @property
    def video_wanted(self) -> bool:
        return bool(self._video_tracks or self._naive_tracks)

    def push_video(self, frame: av.VideoFrame) -> None:
        if self._closed:
            return
        self.stats.video_frames_in += 1
        if self._config.naive:
            self._push_naive("video", frame)
            return
        if not self._video_tracks:
            self._skip("video", "no_viewers")
            return
        if self._pending_frame is not None:
            self._skip("video", "encoder_busy")
        self._pending_frame = frame
        self._frame_ready.set()

    def push_audio(self, frame: av.AudioFrame) -> None:
        if self._closed:
            return
        if self._config.naive:
            self._push_naive("audio", frame)
            return
        if not self._audio_tracks:
            self._skip("audio", "no_viewers")
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

    def _skip(self, kind: str, reason: str) -> None:
        if kind == "video":
            self.stats.video_frames_skipped += 1
        self._metrics.frames_skipped.labels(kind, reason).inc()

    # -- encoder -----------------------------------------------------------------------------

    def _take_keyframe_decision(self) -> str | None:
        now = time.monotonic()
        if now - self._last_keyframe >= self._config.keyframe_interval:
            return self._keyframe_reason or "periodic"
        if self._keyframe_reason and now - self._last_keyframe >= self._config.keyframe_min_gap:
            return self._keyframe_reason
        return None

    def _encode_timed(self, frame: av.VideoFrame, keyframe: bool) -> tuple[list[Packet], float]:
        started = time.perf_counter()
        packets = self._video_encoder.encode(frame, keyframe)
        return packets, time.perf_counter() - started

    async def _encode_video_forever(self) -> None:
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
                logger.warning("video encode failed, frame dropped: %s", exc)
                self._skip("video", "encode_error")
                continue
            self.stats.video_frames_encoded += 1
            self._video_encoded.inc()
            self._encode_time.observe(took)
            for packet in packets:
                keyframe = packet.is_keyframe
                if keyframe:
                    self._last_keyframe = time.monotonic()
                    self._keyframe_reason = None
                    self.stats.keyframes += 1
                    self._metrics.keyframes.labels(reason or "encoder").inc()
                self._video_bytes.inc(packet.size * len(self._video_tracks))
                for track in tuple(self._video_tracks):
                    track.push(packet, keyframe)

    async def close(self) -> None:
        """End every viewer track and stop the encoder. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._task.cancel()
        await asyncio.wait([self._task])
        for track in (*self._video_tracks, *self._audio_tracks, *self._naive_tracks):
            track.stop()
        self._pending_frame = None
        # The worker may still be inside libvpx for this one frame; don't block the loop on it.
        self._executor.shutdown(wait=False)
