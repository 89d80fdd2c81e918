"""N WHEP viewers of one gateway session in one process: the viewer side of bench/fanout.py.

Decoding N 720p streams would saturate the viewer process long before the gateway, so
aiortc's ``rtcrtpreceiver.decoder_worker`` is replaced by a counting worker: every viewer
counts the complete encoded frames its jitter buffer hands on (frames, bytes, keyframes, and
the resolution written in each VP8 keyframe header or H.264 sequence parameter set) without
decoding them. Two probe viewers (the first and the last; with ``--codec mixed`` the last of
each codec) also decode every video frame (libvpx, or FFmpeg's H.264 decoder), which proves
the stream is decodable and gives the decoded resolution.

``--codec`` picks the video codec the viewers ask for, by ordering the video transceiver's
codec preferences the way a browser lists its favourite first: ``vp8`` (aiortc's own order),
``h264`` (constrained baseline 42e01f, packetization-mode 1, first) or ``mixed`` (even viewers
VP8, odd viewers H.264). The codec in the gateway's answer (the video m-line's first payload
type) and the codec of every received frame must be the one asked for: otherwise this process
exits with status 3 and says which viewer got what.

Time to first frame is measured from just before the WHEP POST to the first frame a viewer
can show: the first decoded frame for probes, the first complete keyframe (VP8 keyframe or
H.264 IDR: what the decoder would turn into a picture within a few ms) for counting viewers.

Timeline: connect all viewers in batches, wait ``--warmup`` seconds, snapshot, wait
``--measure`` seconds, snapshot. Rates are computed between the two snapshots. With
``--server-pid`` the gateway's CPU time (utime+stime from /proc, 100% = one core) and RSS are
sampled at the same two instants, and with ``--metrics`` the gateway's Prometheus counters.
One JSON object goes to stdout, or to ``--out``.

Run it only inside the private network namespace (see tests/netns.sh and bench/fanout.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import re
import resource
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import aioice.ice
import aiortc.rtcrtpreceiver as rtcrtpreceiver
import av
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
from aiortc.codecs import get_decoder
from aiortc.rtcrtpparameters import RTCRtpCodecCapability
from aiortc.sdp import SessionDescription

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BACKLOG_WINDOW = 5.0  # seconds after the first frame in which the join backlog is looked for
CODEC_CHOICES = ("vp8", "h264", "mixed")
H264_PROFILE = "42e01f"  # constrained baseline, level 3.1: what the gateway's encoder makes
CODEC_MISMATCH_EXIT = 3


# -- per-track counters, filled by the decoder threads ----------------------------------------


@dataclass(slots=True)
class TrackStats:
    """Counters of one receiving track. Written by its decoder thread, read by the loop;
    plain int/float updates are atomic under the GIL, which is all a snapshot needs."""

    probe: bool = False
    codec: str | None = None
    """Lower-case name (``vp8``, ``h264``) of the codec the received frames carried."""
    codecs_seen: set[str] = field(default_factory=set)
    frames: int = 0
    bytes: int = 0
    keyframes: int = 0
    width: int = 0
    height: int = 0
    first_frame_at: float | None = None
    first_keyframe_at: float | None = None
    decoded: int = 0
    decode_errors: int = 0
    first_decoded_at: float | None = None
    decoded_width: int = 0
    decoded_height: int = 0
    first_media_ts: int | None = None
    join_backlog: float = 0.0
    """How far the first frames ran behind live, in seconds: the largest excess of media time
    (RTP timestamps) over arrival time since the first frame. ~0 for a live start; k frames
    queued before the connection came up arrive as a burst and show as k/fps."""


class StatsRegistry:
    """Maps a receiver's output queue (the only per-track object the worker gets) to counters.

    Either the ``track`` event or the decoder thread may come first, so both go through
    :meth:`for_queue`, which creates the entry once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict[int, tuple[object, TrackStats]] = {}

    def for_queue(self, output_q: object) -> TrackStats:
        with self._lock:
            entry = self._stats.get(id(output_q))
            if entry is None:
                # Keep the queue referenced so its id() cannot be reused by another object.
                entry = self._stats[id(output_q)] = (output_q, TrackStats())
            return entry[1]


REGISTRY = StatsRegistry()


def vp8_keyframe_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a VP8 keyframe header (RFC 6386 9.1), or None for a delta frame."""
    if len(data) < 10 or data[0] & 1 or data[3:6] != b"\x9d\x01\x2a":
        return None
    width = int.from_bytes(data[6:8], "little") & 0x3FFF
    height = int.from_bytes(data[8:10], "little") & 0x3FFF
    return width, height


class _Bits:
    """Big-endian bit reader with Exp-Golomb codes (H.264 7.2 and 9.1)."""

    def __init__(self, data: bytes) -> None:
        self._value = int.from_bytes(data, "big")
        self._left = len(data) * 8

    def u(self, n: int) -> int:
        if n > self._left:
            raise ValueError("SPS truncated")
        self._left -= n
        return (self._value >> self._left) & ((1 << n) - 1)

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise ValueError("bad Exp-Golomb code")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)


def h264_sps_size(nal: bytes) -> tuple[int, int] | None:
    """Width and height from an H.264 sequence parameter set NAL unit (7.3.2.1.1), cropping
    applied; None when it uses scaling matrices (never in constrained baseline)."""
    rbsp = nal[1:].replace(b"\x00\x00\x03", b"\x00\x00")  # undo emulation prevention
    bits = _Bits(rbsp)
    profile_idc = bits.u(8)
    bits.u(16)  # constraint flags, reserved bits, level_idc
    bits.ue()  # seq_parameter_set_id
    chroma_format_idc = 1
    if profile_idc in (100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135):
        chroma_format_idc = bits.ue()
        if chroma_format_idc == 3:
            bits.u(1)  # separate_colour_plane_flag
        bits.ue()  # bit_depth_luma_minus8
        bits.ue()  # bit_depth_chroma_minus8
        bits.u(1)  # qpprime_y_zero_transform_bypass_flag
        if bits.u(1):  # seq_scaling_matrix_present_flag
            return None
    bits.ue()  # log2_max_frame_num_minus4
    poc_type = bits.ue()
    if poc_type == 0:
        bits.ue()  # log2_max_pic_order_cnt_lsb_minus4
    elif poc_type == 1:
        bits.u(1)  # delta_pic_order_always_zero_flag
        bits.se()  # offset_for_non_ref_pic
        bits.se()  # offset_for_top_to_bottom_field
        for _ in range(bits.ue()):  # num_ref_frames_in_pic_order_cnt_cycle
            bits.se()
    bits.ue()  # max_num_ref_frames
    bits.u(1)  # gaps_in_frame_num_value_allowed_flag
    width_mbs = bits.ue() + 1
    height_units = bits.ue() + 1
    frame_mbs_only = bits.u(1)
    if not frame_mbs_only:
        bits.u(1)  # mb_adaptive_frame_field_flag
    bits.u(1)  # direct_8x8_inference_flag
    width, height = width_mbs * 16, height_units * 16 * (2 - frame_mbs_only)
    if bits.u(1):  # frame_cropping_flag
        left, right, top, bottom = bits.ue(), bits.ue(), bits.ue(), bits.ue()
        sub_width = 2 if chroma_format_idc in (1, 2) else 1
        sub_height = 2 if chroma_format_idc == 1 else 1
        width -= sub_width * (left + right)
        height -= sub_height * (2 - frame_mbs_only) * (top + bottom)
    return width, height


def h264_keyframe_size(data: bytes) -> tuple[int, int] | None:
    """For an access unit in Annex B form (what aiortc's depayloader hands on): the SPS's
    width and height if it holds an IDR slice, (0, 0) for an IDR without an SPS, else None."""
    idr, size = False, (0, 0)
    for nal in data.split(b"\x00\x00\x01"):
        nal = nal.rstrip(b"\x00")
        if not nal:
            continue
        nal_type = nal[0] & 0x1F
        if nal_type == 5:
            idr = True
        elif nal_type == 7:
            with contextlib.suppress(ValueError):
                size = h264_sps_size(nal) or size
    return size if idr else None


def keyframe_size(codec_name: str, data: bytes) -> tuple[int, int] | None:
    if codec_name == "vp8":
        return vp8_keyframe_size(data)
    if codec_name == "h264":
        return h264_keyframe_size(data)
    return None


def counting_decoder_worker(
    loop: asyncio.AbstractEventLoop,
    input_q: queue.Queue[Any],
    output_q: asyncio.Queue[Any],
    decode_error: threading.Event,
) -> None:
    """Drop-in for ``aiortc.rtcrtpreceiver.decoder_worker`` (same signature and end-of-stream
    protocol). Decodes only for probe tracks and never hands frames on: nobody reads them."""
    stats = REGISTRY.for_queue(output_q)
    decoder: Any = None
    decoder_codec = None
    while True:
        task = input_q.get()
        if task is None:
            asyncio.run_coroutine_threadsafe(output_q.put(None), loop)
            return
        codec, encoded_frame = task
        now = time.monotonic()
        data: bytes = encoded_frame.data
        stats.frames += 1
        stats.bytes += len(data)
        if stats.first_frame_at is None or stats.first_media_ts is None:
            stats.first_frame_at, stats.first_media_ts = now, encoded_frame.timestamp
        elif codec.mimeType.startswith("video/") and now - stats.first_frame_at < BACKLOG_WINDOW:
            media = (encoded_frame.timestamp - stats.first_media_ts) / codec.clockRate
            stats.join_backlog = max(stats.join_backlog, media - (now - stats.first_frame_at))
        if not codec.mimeType.startswith("video/"):
            continue
        name = codec.name.lower()
        if name not in stats.codecs_seen:
            stats.codecs_seen.add(name)
            stats.codec = name
        size = keyframe_size(name, data)
        if size is not None:
            stats.keyframes += 1
            if size != (0, 0):
                stats.width, stats.height = size
            if stats.first_keyframe_at is None:
                stats.first_keyframe_at = now
        if not stats.probe:
            continue
        if decoder is None or codec.name != decoder_codec:
            decoder, decoder_codec = get_decoder(codec), codec.name
        try:
            frames = decoder.decode(encoded_frame)
        except av.FFmpegError:
            stats.decode_errors += 1
            decode_error.set()  # makes aiortc send a PLI, as the real worker would
            continue
        for frame in frames:
            stats.decoded += 1
            stats.decoded_width, stats.decoded_height = frame.width, frame.height
            if stats.first_decoded_at is None:
                stats.first_decoded_at = time.monotonic()


rtcrtpreceiver.decoder_worker = counting_decoder_worker


def pin_ice_addresses(addresses: Sequence[str]) -> None:
    """Gather ICE host candidates on these addresses only (the namespace's private address)."""
    pinned = list(addresses)

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in pinned if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = host_addresses


# -- viewers ----------------------------------------------------------------------------------


def viewer_codec(mode: str, index: int) -> str:
    """The codec viewer ``index`` asks for: ``mixed`` alternates, VP8 first."""
    if mode == "mixed":
        return "vp8" if index % 2 == 0 else "h264"
    return mode


def probe_indices(mode: str, n: int) -> set[int]:
    """The first and the last viewer; with ``mixed``, the last viewer of each codec."""
    if mode == "mixed" and n >= 2:
        return {n - 1, n - 2}
    return {0, n - 1}


def codec_preferences(codec: str) -> list[RTCRtpCodecCapability]:
    """aiortc's video receive codecs, ``codec`` first (for H.264: 42e01f with packetization
    mode 1 before any other H.264 entry), the rest in aiortc's order."""
    capabilities = RTCRtpReceiver.getCapabilities("video")
    assert capabilities is not None
    wanted = f"video/{codec}"

    def rank(c: RTCRtpCodecCapability) -> int:
        if c.mimeType.lower() != wanted:
            return 2
        if codec == "h264" and (c.parameters.get("packetization-mode") != "1"
                                or str(c.parameters.get("profile-level-id", "")).lower()
                                != H264_PROFILE):
            return 1
        return 0

    ordered = sorted(capabilities.codecs, key=rank)  # stable: aiortc's order within a rank
    first = ordered[0]
    if rank(first) != 0:
        raise RuntimeError(f"aiortc cannot receive {codec}: {capabilities.codecs}")
    return ordered


def answered_video_codec(sdp: str) -> str:
    """``name`` or ``name;fmtp`` of the first payload type of the answer's video m-line: the
    codec the gateway will send."""
    parsed = SessionDescription.parse(sdp)
    video = next((m for m in parsed.media if m.kind == "video"), None)
    if video is None or not video.rtp.codecs:
        return "none"
    codec = video.rtp.codecs[0]
    text = codec.name.lower()
    if text == "h264":
        text += (f";packetization-mode={codec.parameters.get('packetization-mode', '0')}"
                 f";profile-level-id={str(codec.parameters.get('profile-level-id', '')).lower()}")
    return text


def codec_ok(wanted: str, answered: str) -> bool:
    if wanted == "h264":
        return answered == f"h264;packetization-mode=1;profile-level-id={H264_PROFILE}"
    return answered == wanted


@dataclass(slots=True)
class Viewer:
    index: int
    probe: bool
    codec: str = "vp8"
    """The video codec this viewer asks for (``vp8`` or ``h264``)."""
    answered_codec: str | None = None
    """What the gateway's answer put first on the video m-line (see answered_video_codec)."""
    pc: Any = None
    video: TrackStats | None = None
    audio: TrackStats | None = None
    posted_at: float = 0.0
    answered_at: float | None = None
    connected_at: float | None = None
    location: str | None = None
    error: str | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    def on_track(self, track: Any) -> None:
        stats = REGISTRY.for_queue(track._queue)
        if track.kind == "video":
            stats.probe = self.probe
            self.video = stats
        else:
            self.audio = stats

    def on_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected" and self.connected_at is None:
            self.connected_at = time.monotonic()
            self.connected.set()
        elif state in ("failed", "closed"):
            self.error = self.error or f"connection {state}"
            self.connected.set()

    @property
    def first_frame_at(self) -> float | None:
        """When this viewer could first show a picture (see the module docstring)."""
        if self.video is None:
            return None
        return self.video.first_decoded_at if self.probe else self.video.first_keyframe_at


async def connect_viewer(
    http: aiohttp.ClientSession, whep_url: str, viewer: Viewer, data_channel: bool,
    connect_timeout: float, answer_delay: float = 0.0,
) -> None:
    """Offer recvonly video (``viewer.codec`` first) + audio (+ an ``events`` data channel,
    like the web page)."""
    pc = viewer.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.on("track", viewer.on_track)
    pc.on("connectionstatechange", viewer.on_state)
    video = pc.addTransceiver("video", direction="recvonly")
    video.setCodecPreferences(codec_preferences(viewer.codec))
    pc.addTransceiver("audio", direction="recvonly")
    if data_channel:
        pc.createDataChannel("events")
    try:
        await pc.setLocalDescription(await pc.createOffer())
        viewer.posted_at = time.monotonic()
        async with http.post(whep_url, data=pc.localDescription.sdp,
                             headers={"Content-Type": "application/sdp"}) as response:
            body = await response.text()
            if response.status != 201:
                raise RuntimeError(f"WHEP POST -> {response.status}: {body[:200]}")
            viewer.location = response.headers.get("Location")
        viewer.answered_at = time.monotonic()
        viewer.answered_codec = answered_video_codec(body)
        if not codec_ok(viewer.codec, viewer.answered_codec):
            raise RuntimeError(f"asked for {viewer.codec}, the answer sends "
                               f"{viewer.answered_codec}")
        if answer_delay > 0:
            await asyncio.sleep(answer_delay)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
        async with asyncio.timeout(connect_timeout):
            await viewer.connected.wait()
    except Exception as exc:
        viewer.error = viewer.error or f"{type(exc).__name__}: {exc}"


# -- measurement ------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants: the gateway's fan-out worker processes are its children."""
    pids, i = [pid], 0
    while i < len(pids):
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pids[i]}/task"):
                with open(f"/proc/{pids[i]}/task/{task}/children", encoding="ascii") as children:
                    pids += [int(c) for c in children.read().split()]
        i += 1
    return pids


def proc_cpu_seconds(pid: int) -> float:
    """utime+stime of the process and its live descendants."""
    total = 0
    for one in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{one}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def proc_rss_mb(pid: int) -> float:
    """VmRSS of the process and its live descendants (shared pages count once per process)."""
    total = 0
    for one in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{one}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total / 1024.0


def parse_prometheus(text: str) -> dict[str, float]:
    """``series -> value`` for every sample line (series = name plus its label set)."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            samples[series] = float(value)
    return samples


@dataclass(frozen=True, slots=True)
class Counts:
    video_frames: int
    video_bytes: int
    video_keyframes: int
    audio_frames: int
    decoded: int


def counts(viewer: Viewer) -> Counts:
    v, a = viewer.video, viewer.audio
    return Counts(
        video_frames=v.frames if v else 0,
        video_bytes=v.bytes if v else 0,
        video_keyframes=v.keyframes if v else 0,
        audio_frames=a.frames if a else 0,
        decoded=v.decoded if v else 0,
    )


@dataclass(frozen=True, slots=True)
class Snapshot:
    at: float
    viewers: list[Counts]
    own_cpu: float
    server_cpu: float | None
    server_rss_mb: float | None
    metrics: dict[str, float] | None


async def snapshot(
    viewers: Sequence[Viewer], server_pid: int | None, http: aiohttp.ClientSession,
    metrics_url: str | None,
) -> Snapshot:
    metrics = None
    if metrics_url:
        try:
            async with http.get(metrics_url) as response:
                metrics = parse_prometheus(await response.text())
        except aiohttp.ClientError:
            metrics = None
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return Snapshot(
        at=time.monotonic(),
        viewers=[counts(v) for v in viewers],
        own_cpu=usage.ru_utime + usage.ru_stime,
        server_cpu=proc_cpu_seconds(server_pid) if server_pid else None,
        server_rss_mb=proc_rss_mb(server_pid) if server_pid else None,
        metrics=metrics,
    )


def spread(values: Sequence[float], digits: int = 1) -> dict[str, float | None]:
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": round(min(values), digits), "median": round(statistics.median(values), digits),
            "max": round(max(values), digits)}


SERIES_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
ENCODE_HISTOGRAM = "avatargw_video_encode_duration_seconds"


def series_labels(series: str) -> dict[str, str]:
    """``{"codec": "vp8", ...}`` from ``name{codec="vp8",...}``."""
    _, _, labels = series.partition("{")
    return dict(SERIES_LABEL.findall(labels))


def encode_stats(start: dict[str, float], end: dict[str, float],
                 window: float) -> dict[str, dict[str, float | None]]:
    """Per video codec over the window: frames the shared encoder made (and per second), and
    its mean encode time per frame (from the encode-duration histogram's sum and count)."""
    result: dict[str, dict[str, float | None]] = {}
    for series, value in end.items():
        if not series.startswith(ENCODE_HISTOGRAM + "_count{"):
            continue
        codec = series_labels(series).get("codec", "?")
        frames = value - start.get(series, 0.0)
        sum_series = series.replace("_count{", "_sum{", 1)
        seconds = end.get(sum_series, 0.0) - start.get(sum_series, 0.0)
        result[codec] = {
            "frames": round(frames),
            "fps": round(frames / window, 1) if window > 0 else None,
            "mean_ms": round(seconds / frames * 1000, 3) if frames > 0 else None,
            "busy_pct": round(seconds / window * 100, 1) if window > 0 else None,
        }
    return result


def codec_errors(viewers: Sequence[Viewer]) -> list[str]:
    """Viewers that got another codec than they asked for, by the answer or by the frames."""
    errors = []
    for v in viewers:
        if v.answered_codec is not None and not codec_ok(v.codec, v.answered_codec):
            errors.append(f"viewer {v.index} asked for {v.codec}, the answer sends "
                          f"{v.answered_codec}")
        elif v.video is not None and v.video.codecs_seen - {v.codec}:
            errors.append(f"viewer {v.index} asked for {v.codec}, received "
                          f"{', '.join(sorted(v.video.codecs_seen))} frames")
    return errors


def counter_deltas(start: dict[str, float], end: dict[str, float]) -> dict[str, float]:
    """Window increments of every gateway counter (``avatargw_*_total`` series)."""
    return {series: round(value - start.get(series, 0.0), 3)
            for series, value in end.items()
            if series.startswith("avatargw_") and "_total" in series}


def summarize(
    args: argparse.Namespace, viewers: Sequence[Viewer], connect_s: float, start: Snapshot,
    end: Snapshot,
) -> dict[str, Any]:
    window = end.at - start.at
    live = [i for i, v in enumerate(viewers) if v.error is None]
    fps, pps, kbps, keyframes = [], [], [], []
    by_codec: dict[str, dict[str, list[float]]] = {}
    for i in live:
        a, b = start.viewers[i], end.viewers[i]
        fps.append((b.video_frames - a.video_frames) / window)
        pps.append((b.audio_frames - a.audio_frames) / window)
        kbps.append((b.video_bytes - a.video_bytes) * 8 / window / 1000)
        keyframes.append(b.video_keyframes - a.video_keyframes)
        group = by_codec.setdefault(viewers[i].codec, {"fps": [], "kbps": [], "ttff": []})
        group["fps"].append(fps[-1])
        group["kbps"].append(kbps[-1])
        first = viewers[i].first_frame_at
        if first is not None:
            group["ttff"].append((first - viewers[i].posted_at) * 1000)
    ttff = [(v.first_frame_at - v.posted_at) * 1000 for v in viewers
            if v.error is None and v.first_frame_at is not None]
    backlog = [v.video.join_backlog * 1000 for v in viewers
               if v.error is None and v.video is not None and v.video.frames]
    expected = args.expect_size
    probes = []
    for i, v in enumerate(viewers):
        if not v.probe or v.video is None:
            continue
        size = f"{v.video.decoded_width}x{v.video.decoded_height}" if v.video.decoded else None
        probes.append({
            "index": v.index,
            "decoded_frames": v.video.decoded,
            "decoded_fps": round((end.viewers[i].decoded - start.viewers[i].decoded) / window, 1),
            "decode_errors": v.video.decode_errors,
            "codec": v.video.codec,
            "decoded_size": size,
            "size_ok": None if expected is None else size == expected,
            "ttff_ms": None if v.first_frame_at is None
            else round((v.first_frame_at - v.posted_at) * 1000, 1),
        })
    result: dict[str, Any] = {
        "n": len(viewers),
        "codec": args.codec,
        "connected": len(live),
        "errors": sorted({v.error for v in viewers if v.error is not None}),
        "connect_s": round(connect_s, 2),
        "window_s": round(window, 2),
        "video_fps": spread(fps),
        "audio_pps": spread(pps),
        "video_kbps": spread(kbps, 0),
        "keyframes_received": {"total": sum(keyframes),
                               "median": statistics.median(keyframes) if keyframes else None},
        "ttff_ms": {"median": round(statistics.median(ttff), 1) if ttff else None,
                    "max": round(max(ttff), 1) if ttff else None,
                    "count": len(ttff)},
        "join_backlog_ms": spread(backlog, 0),
        "keyframe_sizes": sorted({f"{v.video.width}x{v.video.height}" for v in viewers
                                  if v.video is not None and v.video.keyframes}),
        "probes": probes,
        "viewer_cpu_pct": round((end.own_cpu - start.own_cpu) / window * 100, 1),
        "per_viewer_fps": [round(x, 1) for x in fps],
        "by_codec": {codec: {"viewers": len(group["fps"]), "video_fps": spread(group["fps"]),
                             "video_kbps": spread(group["kbps"], 0),
                             "ttff_ms": spread(group["ttff"], 0)}
                     for codec, group in sorted(by_codec.items())},
        "codec_errors": codec_errors(viewers),
    }
    if start.server_cpu is not None and end.server_cpu is not None:
        result["server_cpu_pct"] = round((end.server_cpu - start.server_cpu) / window * 100, 1)
        for key, rss in (("server_rss_start_mb", start.server_rss_mb),
                         ("server_rss_mb", end.server_rss_mb)):
            result[key] = None if rss is None else round(rss, 1)
    if start.metrics is not None and end.metrics is not None:
        result["server_counters"] = counter_deltas(start.metrics, end.metrics)
        result["encode"] = encode_stats(start.metrics, end.metrics, window)
        prefix = "avatargw_viewer_time_to_first_frame_seconds"
        result["server_ttff"] = {
            "count": end.metrics.get(f"{prefix}_count"),
            "sum_s": end.metrics.get(f"{prefix}_sum"),
        }
    return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.ice_address:
        pin_ice_addresses(args.ice_address)
    whep_url = args.whep if args.whep.startswith("http") else args.gateway.rstrip("/") + args.whep
    metrics_url = args.gateway.rstrip("/") + "/metrics" if args.metrics else None
    probes = probe_indices(args.codec, args.n) if args.probes else set()
    viewers = [Viewer(index=i, probe=i in probes, codec=viewer_codec(args.codec, i))
               for i in range(args.n)]
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        began = time.monotonic()
        for first in range(0, args.n, args.batch):
            await asyncio.gather(*(
                connect_viewer(http, whep_url, v, args.data_channel, args.connect_timeout,
                               args.answer_delay)
                for v in viewers[first:first + args.batch]))
        connect_s = time.monotonic() - began
        print(f"fanout_viewers: {sum(v.error is None for v in viewers)}/{args.n} connected "
              f"in {connect_s:.1f} s", file=sys.stderr, flush=True)
        wrong = codec_errors(viewers)
        if wrong:
            fail_codec(wrong)
        await asyncio.sleep(args.warmup)
        start = await snapshot(viewers, args.server_pid, http, metrics_url)
        await asyncio.sleep(args.measure)
        end = await snapshot(viewers, args.server_pid, http, metrics_url)
        result = summarize(args, viewers, connect_s, start, end)
        if args.delete:
            deletes = [http.delete(args.gateway.rstrip("/") + v.location)
                       for v in viewers if v.location is not None]
            statuses = []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    for request in deletes:
                        async with request as response:
                            statuses.append(response.status)
            result["deleted"] = sum(s == 200 for s in statuses)
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--gateway", required=True, help="gateway base URL, http://host:port")
    parser.add_argument("--whep", required=True, help="the session's whep_url (absolute or path)")
    parser.add_argument("--n", type=int, default=1, help="number of viewers")
    parser.add_argument("--codec", choices=CODEC_CHOICES, default="vp8",
                        help="video codec the viewers ask for; mixed: even viewers VP8, odd "
                             "H.264 (default vp8)")
    parser.add_argument("--batch", type=int, default=8, help="viewers connecting concurrently")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--measure", type=float, default=10.0)
    parser.add_argument("--connect-timeout", type=float, default=30.0,
                        help="seconds for one viewer to reach 'connected'")
    parser.add_argument("--answer-delay", type=float, default=0.0,
                        help="seconds between the WHEP answer and applying it: emulates a slow "
                             "ICE/DTLS setup (the gateway has subscribed the viewer already)")
    parser.add_argument("--server-pid", type=int, help="sample this process's CPU and RSS")
    parser.add_argument("--metrics", action="store_true",
                        help="also read the gateway's /metrics counters at both snapshots")
    parser.add_argument("--expect-size", help="WIDTHxHEIGHT the probes must decode")
    parser.add_argument("--no-probes", dest="probes", action="store_false",
                        help="no decoding viewers at all")
    parser.add_argument("--no-data-channel", dest="data_channel", action="store_false")
    parser.add_argument("--no-delete", dest="delete", action="store_false",
                        help="don't DELETE the WHEP resources at the end")
    parser.add_argument("--ice-address", action="append", default=[],
                        help="gather ICE candidates on this address only (repeatable)")
    parser.add_argument("--out", help="write the JSON result here instead of stdout")
    args = parser.parse_args(argv)
    if args.n < 1 or args.batch < 1:
        parser.error("--n and --batch must be at least 1")
    return args


def fail_codec(errors: Sequence[str]) -> None:
    """A viewer decoding another codec than asked would measure the wrong thing: stop now."""
    shown = "; ".join(errors[:5]) + (f"; and {len(errors) - 5} more" if len(errors) > 5 else "")
    print(f"fanout_viewers: CODEC MISMATCH in {len(errors)} viewers: {shown}",
          file=sys.stderr, flush=True)
    os._exit(CODEC_MISMATCH_EXIT)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if os.environ.get("AVATAR_GATEWAY_TEST_NETNS") != "1":
        print("fanout_viewers: run inside the private network namespace "
              "(tests/netns.sh), normally via bench/fanout.py", file=sys.stderr)
        sys.exit(2)
    result = asyncio.run(run(args))
    if result["codec_errors"]:
        fail_codec(result["codec_errors"])
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            out.write(text + "\n")
    else:
        print(text, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # N peer connections with non-daemon decoder threads take seconds to tear down and the
    # gateway is stopped right after this anyway: skip the teardown.
    os._exit(0)


if __name__ == "__main__":
    main()
