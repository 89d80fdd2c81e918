"""The shared encoders: one PyAV codec context per session and codec.

The classes are plain and blocking; the hub calls each from its own worker thread. Video
encoders share one shape (:class:`VideoEncoder`) so the hub can run one per negotiated codec:
VP8 for most browsers, H.264 for those that prefer it (Safari, some mobile decoders).
"""

from __future__ import annotations

import abc
import fractions
import logging
from typing import Any, TypeAlias

import av
from av.video.frame import PictureType
from av.video.reformatter import VideoReformatter

from .ladder import scaled_size

logger = logging.getLogger(__name__)

Packet: TypeAlias = "av.Packet[Any]"
"""An encoded packet (no container stream behind it)."""

VIDEO_TIME_BASE = fractions.Fraction(1, 90_000)
AUDIO_RATE = 48_000
AUDIO_TIME_BASE = fractions.Fraction(1, AUDIO_RATE)


class VideoEncoder(abc.ABC):
    """One video codec: a context (re)built on the first frame and whenever the upstream
    changes resolution; keyframes only when asked for."""

    codec = ""

    def __init__(self, bitrate: int, fps: int, divisor: int = 1) -> None:
        """``divisor``: each side of the picture is divided by it (a smaller rung of the
        quality ladder, :mod:`.ladder`); the scaling happens here, in the encoder's thread."""
        self._bitrate = bitrate
        self._fps = fps
        self._divisor = divisor
        self._context: av.VideoCodecContext | None = None
        # Its own: ``VideoFrame.reformat`` keeps one scaler on the frame, and lanes convert
        # the same upstream frame at once in their threads (a shared scaler crashes).
        self._reformatter = VideoReformatter()

    @property
    def scales(self) -> bool:
        """Encodes a scaled copy, never the frame it is given."""
        return self._divisor != 1

    def encode(self, frame: av.VideoFrame, keyframe: bool) -> list[Packet]:
        if self._divisor != 1 or frame.format.name != "yuv420p":
            # (Upstreams give yuv420p: converting is for a smaller rung, or a safety net.)
            width, height = scaled_size(frame.width, frame.height, self._divisor)
            converted = self._reformatter.reformat(frame, width, height, "yuv420p")
            converted.pts, converted.time_base = frame.pts, frame.time_base
            frame = converted
        ctx = self._context
        if ctx is None or ctx.width != frame.width or ctx.height != frame.height:
            ctx = self._context = self._open(frame.width, frame.height)
            keyframe = True
        frame.pict_type = PictureType.I if keyframe else PictureType.NONE
        packets = ctx.encode(frame)
        for packet in packets:
            # Encoders leave it unset; aiortc needs it to compute RTP timestamps.
            packet.time_base = VIDEO_TIME_BASE
        return packets

    def _context_for(self, name: str, width: int, height: int) -> av.VideoCodecContext:
        ctx = av.CodecContext.create(name, "w")
        assert isinstance(ctx, av.VideoCodecContext)
        ctx.width = width
        ctx.height = height
        ctx.pix_fmt = "yuv420p"
        ctx.time_base = VIDEO_TIME_BASE
        ctx.framerate = fractions.Fraction(self._fps, 1)
        ctx.bit_rate = self._bitrate
        ctx.gop_size = 1 << 20  # keyframes come from the hub's policy, not the encoder
        ctx.thread_count = 1
        return ctx

    @abc.abstractmethod
    def _open(self, width: int, height: int) -> av.VideoCodecContext: ...


class Vp8Encoder(VideoEncoder):
    """VP8 (libvpx) in real-time mode.

    The rate control mirrors aiortc's own ``Vp8Encoder`` (CBR ceiling, 100% undershoot allowed),
    so a mostly static avatar costs far less than the ceiling.
    """

    codec = "vp8"

    def _open(self, width: int, height: int) -> av.VideoCodecContext:
        ctx = self._context_for("libvpx", width, height)
        ctx.qmin = 2
        ctx.qmax = 56
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


class H264Encoder(VideoEncoder):
    """H.264 (libx264) constrained baseline, level 3.1: what aiortc negotiates
    (``profile-level-id`` 42e01f / 42001f, packetization-mode 1) and every browser decodes.

    ``zerolatency`` drops B-frames and look-ahead; ``forced-idr`` makes a requested keyframe an
    IDR, and in-band SPS/PPS (x264's default without a global header) precede every IDR, so a
    viewer can join at any keyframe. The VBV ceiling plays the role of VP8's CBR ceiling.
    """

    codec = "h264"

    def _open(self, width: int, height: int) -> av.VideoCodecContext:
        ctx = self._context_for("libx264", width, height)
        kbit = str(self._bitrate // 1000)
        ctx.options = {
            "preset": "veryfast",
            "tune": "zerolatency",
            "profile": "baseline",
            "level": "3.1",
            "forced-idr": "1",
            "x264-params": f"scenecut=0:keyint=infinite:vbv-maxrate={kbit}:vbv-bufsize={kbit}",
        }
        ctx.open()
        logger.debug("opened H.264 encoder %dx%d at %d bit/s", width, height, self._bitrate)
        return ctx


VIDEO_ENCODERS: dict[str, type[VideoEncoder]] = {"vp8": Vp8Encoder, "h264": H264Encoder}
"""Video codecs the hub can encode, by the lower-case name used in SDP (``video/<name>``)."""


class AudioEncoder:
    """Opus (libopus), mono 48 kHz, ``packet_ms`` (20, 40 or 60) ms packets, tuned for speech."""

    codec = "opus"

    def __init__(self, bitrate: int = 64_000, packet_ms: int = 40) -> None:
        ctx = av.CodecContext.create("libopus", "w")
        assert isinstance(ctx, av.AudioCodecContext)
        ctx.bit_rate = bitrate
        ctx.sample_rate = AUDIO_RATE
        ctx.format = "s16"
        ctx.layout = "mono"
        ctx.time_base = AUDIO_TIME_BASE
        ctx.options = {"application": "voip", "frame_duration": str(packet_ms)}
        ctx.open()
        self._context = ctx
        # Upstreams deliver 10 ms (LiveKit) or 20 ms frames, mono or stereo; libopus wants
        # exactly one packet's worth.
        self._resampler = av.AudioResampler(
            format="s16", layout="mono", rate=AUDIO_RATE, frame_size=ctx.frame_size
        )

    def encode(self, frame: av.AudioFrame) -> list[Packet]:
        packets: list[Packet] = []
        for chunk in self._resampler.resample(frame):
            packets.extend(self._context.encode(chunk))
        for packet in packets:
            packet.time_base = AUDIO_TIME_BASE
        return packets
