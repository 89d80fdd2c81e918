"""Media pieces of the simulator: per-subscriber avatar tracks and a small energy VAD."""

from __future__ import annotations

import enum
import math

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from ..media.mailbox import Mailbox, MailboxClosed

Frame = av.VideoFrame | av.AudioFrame


class FeedTrack(MediaStreamTrack):
    """One subscriber's copy of an avatar track, for one aiortc sender to encode.

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


class Voice(enum.StrEnum):
    START = "user_start"
    STOP = "user_stop"


class EnergyVad:
    """Voice activity from loudness alone, with hysteresis in level and in time.

    Speech starts after ``start_after`` seconds of audio at or above ``threshold`` (RMS of
    int16 samples), and stops after ``stop_after`` seconds without any frame at or above half
    the threshold. Time is counted in audio seconds fed to :meth:`update`; a caller that
    receives no packets (the sender's DTX stops sending during silence) feeds the gap as silence.
    """

    def __init__(self, threshold: float = 500.0, start_after: float = 0.1, stop_after: float = 0.6) -> None:
        self.threshold = threshold
        self.start_after = start_after
        self.stop_after = stop_after
        self.speaking = False
        self._loud = 0.0
        self._quiet = 0.0

    def update(self, rms: float, duration: float) -> Voice | None:
        """Feed ``duration`` seconds of audio with loudness ``rms``; returns a transition."""
        level = self.threshold / 2 if self.speaking else self.threshold
        # A small tolerance so 5 x 20 ms frames make 100 ms despite float rounding.
        if rms >= level:
            self._loud += duration
            self._quiet = 0.0
            if not self.speaking and self._loud >= self.start_after - 1e-6:
                self.speaking = True
                return Voice.START
        else:
            self._loud = 0.0
            self._quiet += duration
            if self.speaking and self._quiet >= self.stop_after - 1e-6:
                self.speaking = False
                return Voice.STOP
        return None


def pcm_level(frame: av.AudioFrame) -> tuple[float, int]:
    """(RMS, peak) of an s16 audio frame, in int16 units."""
    samples = frame.to_ndarray()
    if samples.size == 0:
        return 0.0, 0
    wide = samples.astype(np.int32)
    return math.sqrt(float(np.mean(wide * wide))), int(np.max(np.abs(wide)))
