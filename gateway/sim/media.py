"""Media pieces of the simulator: per-subscriber copies of published tracks (the VAD is in
``gateway.media.vad``)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import av
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from livekit.protocol import models

from ..media.mailbox import Mailbox, MailboxClosed

Frame = av.VideoFrame | av.AudioFrame


class FeedTrack(MediaStreamTrack):
    """One subscriber's copy of a published track, for one aiortc sender to encode.

    A simulated room has one to three subscribers, so each gets its own encoder (aiortc's
    default) instead of the gateway's encode-once hub. The shared frames are already yuv420p /
    s16, so no encoder thread reformats them; the encoders only write a shared frame's
    ``pict_type`` (to force a keyframe), which at worst gives another subscriber an extra
    keyframe. Frames wait in a small queue that drops the
    oldest: a sender that has not started yet (DTLS still connecting) or falls behind sees
    recent media, never a backlog.
    """

    def __init__(self, kind: str, capacity: int) -> None:
        super().__init__()
        self.kind = kind
        self._frames: Mailbox[Frame] = Mailbox(maxlen=capacity)
        self.dropped = 0

    def push(self, frame: Frame) -> None:
        if self._frames.full:
            self.dropped += 1
        self._frames.put(frame)

    async def recv(self) -> Frame:
        try:
            return await self._frames.get()
        except MailboxClosed:
            raise MediaStreamError from None

    def stop(self) -> None:
        # Ending the track ends the sender's RTP loop (MediaStreamError), even while the
        # peer connection stays up: that is how a track is unpublished without closing it.
        super().stop()
        self._frames.close()


class TrackFanout:
    """One published track: each frame pushed to a :class:`FeedTrack` per subscriber."""

    def __init__(self, kind: str, capacity: int) -> None:
        self.kind = kind
        self._capacity = capacity
        self._feeds: list[FeedTrack] = []
        self._stopped = False

    @property
    def wanted(self) -> bool:
        return bool(self._feeds)

    def subscribe(self) -> FeedTrack:
        feed = FeedTrack(self.kind, self._capacity)
        if self._stopped:
            feed.stop()
        else:
            self._feeds.append(feed)
        return feed

    def unsubscribe(self, feed: FeedTrack) -> None:
        feed.stop()
        with contextlib.suppress(ValueError):
            self._feeds.remove(feed)

    def push(self, frame: Frame) -> None:
        for feed in self._feeds:
            feed.push(frame)

    def stop(self) -> None:
        """Unpublished: every subscriber's track ends, and later ones start ended."""
        self._stopped = True
        for feed in self._feeds:
            feed.stop()
        self._feeds.clear()


@dataclass(frozen=True, slots=True)
class Publication:
    """A track someone in the room publishes, as subscribers are offered it."""

    participant_sid: str
    info: models.TrackInfo
    codec: str
    """``VP8``, ``H264`` or ``opus``: what subscribers are offered."""
    frames: TrackFanout
