"""The naive design, kept only so ``bench/fanout.py`` can measure what encode-once saves.

Every viewer gets raw frames and aiortc's own sender encodes them (its default: one encoder
per viewer). Selected by ``MEDIA_DESIGN=naive``; the production :class:`~.hub.Hub` knows
nothing of it.
"""

from __future__ import annotations

import av
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from ..metrics import Metrics
from .hub import Hub, HubConfig, HubStats
from .mailbox import Mailbox, MailboxClosed


class FrameTrack(MediaStreamTrack):
    """Raw frames for one viewer's sender. Bounded; the oldest frame goes when the sender's
    encoder falls behind."""

    def __init__(self, hub: NaiveHub, kind: str, capacity: int) -> None:
        super().__init__()
        self.kind = kind
        self._hub = hub
        self._queue: Mailbox[av.VideoFrame | av.AudioFrame] = Mailbox(maxlen=capacity)

    def push(self, frame: av.VideoFrame | av.AudioFrame) -> None:
        if self._queue.full:
            self._hub.count_dropped(self.kind, 1)
        self._queue.put(frame)

    async def recv(self) -> av.VideoFrame | av.AudioFrame:
        try:
            return await self._queue.get()
        except MailboxClosed:
            raise MediaStreamError from None

    def stop(self) -> None:
        super().stop()
        self._queue.close()
        self._hub.unsubscribe(self)


class NaiveHub:
    """Same upstream side as :class:`~.hub.Hub`; the viewer side hands out :class:`FrameTrack`."""

    def __init__(self, config: HubConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.stats = HubStats()
        self.video_codecs = ["vp8"]
        self._tracks: set[FrameTrack] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def subscribers(self) -> int:
        return len(self._tracks)

    @property
    def video_wanted(self) -> bool:
        return bool(self._tracks)

    def subscribe_frames(self, kind: str) -> FrameTrack:
        if self._closed:
            raise RuntimeError("hub is closed")
        track = FrameTrack(self, kind, 2 if kind == "video" else 10)
        self._tracks.add(track)
        return track

    def unsubscribe(self, track: FrameTrack) -> None:
        self._tracks.discard(track)

    def count_dropped(self, kind: str, count: int) -> None:
        self.stats.packets_dropped += count
        self.metrics.packets_dropped.labels(kind).inc(count)

    def request_keyframe(self, reason: str, codec: str = "vp8") -> None:
        """aiortc's own senders answer PLI themselves here."""

    def push_video(self, frame: av.VideoFrame) -> None:
        self.stats.video_frames_in += 1
        self._push("video", frame)

    def push_audio(self, frame: av.AudioFrame) -> None:
        self._push("audio", frame)

    def _push(self, kind: str, frame: av.VideoFrame | av.AudioFrame) -> None:
        for track in tuple(self._tracks):
            if track.kind == kind:
                track.push(frame)

    async def close(self) -> None:
        self._closed = True
        for track in tuple(self._tracks):
            track.stop()


def make_hub(config: HubConfig, metrics: Metrics, naive: bool = False) -> Hub | NaiveHub:
    """The session's hub: encode-once, or the benchmark's naive baseline."""
    return NaiveHub(config, metrics) if naive else Hub(config, metrics)
