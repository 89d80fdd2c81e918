"""The shared encoders: one PyAV codec context per session and codec.

Both classes are plain and blocking; the hub calls them from one worker thread at a time.
"""

from __future__ import annotations

import fractions
import logging
from typing import Any, TypeAlias

import av
from av.video.frame import PictureType

logger = logging.getLogger(__name__)

Packet: TypeAlias = "av.Packet[Any]"
"""An encoded packet (no container stream behind it)."""

VIDEO_TIME_BASE = fractions.Fraction(1, 90_000)
AUDIO_RATE = 48_000
AUDIO_TIME_BASE = fractions.Fraction(1, AUDIO_RATE)
OPUS_FRAME_SAMPLES = 960  # 20 ms, what browsers and aiortc use


class VideoEncoder:
    """VP8 (libvpx) in real-time mode; keyframes only when asked for.

    The rate control mirrors aiortc's own ``Vp8Encoder`` (CBR ceiling, 100% undershoot allowed),
    so a mostly static avatar costs far less than the ceiling. The context is (re)built on the
    first frame and whenever the upstream changes resolution.
    """

    codec = "vp8"

    def __init__(self, bitrate: int, fps: int) -> None:
        self._bitrate = bitrate
        self._fps = fps
        self._context: av.VideoCodecContext | None = None

    def encode(self, frame: av.VideoFrame, keyframe: bool) -> list[Packet]:
        if frame.format.name != "yuv420p":
            # Upstreams convert once at the source; this is a safety net for odd inputs.
            frame = frame.reformat(format="yuv420p")
        ctx = self._context
        if ctx is None or ctx.width != frame.width or ctx.height != frame.height:
            ctx = self._context = self._open(frame.width, frame.height)
            keyframe = True
        frame.pict_type = PictureType.I if keyframe else PictureType.NONE
        packets = ctx.encode(frame)
        for packet in packets:
            # libvpx leaves it unset; aiortc needs it to compute RTP timestamps.
            packet.time_base = VIDEO_TIME_BASE
        return packets

    def _open(self, width: int, height: int) -> av.VideoCodecContext:
        ctx = av.CodecContext.create("libvpx", "w")
        assert isinstance(ctx, av.VideoCodecContext)
        ctx.width = width
        ctx.height = height
        ctx.pix_fmt = "yuv420p"
        ctx.time_base = VIDEO_TIME_BASE
        ctx.framerate = fractions.Fraction(self._fps, 1)
        ctx.bit_rate = self._bitrate
        ctx.gop_size = 1 << 20  # keyframes come from the hub's policy, not the encoder
        ctx.qmin = 2
        ctx.qmax = 56
        ctx.thread_count = 1
        rate = str(self._bitrate)
        ctx.options = {
            "bufsize": rate,
            "minrate": rate,
            "maxrate": rate,
            "cpu-used": "8",
            "deadline": "realtime",
            "lag-in-frames": "0",
            "noise-sensitivity": "0",
            "overshoot-pct": "15",
            "undershoot-pct": "100",
            "partitions": "0",
            "static-thresh": "1",
            "error-resilient": "1",
        }
        ctx.open()
        logger.debug("opened VP8 encoder %dx%d at %d bit/s", width, height, self._bitrate)
        return ctx


class AudioEncoder:
    """Opus (libopus), mono 48 kHz, 20 ms packets, tuned for speech."""

    codec = "opus"

    def __init__(self, bitrate: int = 64_000) -> None:
        ctx = av.CodecContext.create("libopus", "w")
        assert isinstance(ctx, av.AudioCodecContext)
        ctx.bit_rate = bitrate
        ctx.sample_rate = AUDIO_RATE
        ctx.format = "s16"
        ctx.layout = "mono"
        ctx.time_base = AUDIO_TIME_BASE
        ctx.options = {"application": "voip"}
        ctx.open()
        self._context = ctx
        # Upstreams deliver 10 ms (LiveKit) or 20 ms frames, mono or stereo; libopus wants 20 ms.
        self._resampler = av.AudioResampler(
            format="s16", layout="mono", rate=AUDIO_RATE, frame_size=OPUS_FRAME_SAMPLES
        )

    def encode(self, frame: av.AudioFrame) -> list[Packet]:
        packets: list[Packet] = []
        for chunk in self._resampler.resample(frame):
            packets.extend(self._context.encode(chunk))
        for packet in packets:
            packet.time_base = AUDIO_TIME_BASE
        return packets
