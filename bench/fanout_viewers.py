"""N WHEP viewers of one gateway session in one process: the viewer side of bench/fanout.py.

Decoding N 720p VP8 streams would saturate the viewer process long before the gateway, so
aiortc's ``rtcrtpreceiver.decoder_worker`` is replaced by a counting worker: every viewer
counts the complete encoded frames its jitter buffer hands on (frames, bytes, VP8 keyframes,
and the resolution written in each VP8 keyframe header) without decoding them. Two probe
viewers (the first and the last) also decode every video frame with libvpx, which proves
the stream is decodable and gives the decoded resolution.

Time to first frame is measured from just before the WHEP POST to the first frame a viewer
can show: the first decoded frame for probes, the first complete VP8 keyframe (what the
decoder would turn into a picture within a few ms) for counting viewers.

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
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.codecs import get_decoder

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BACKLOG_WINDOW = 5.0  # seconds after the first frame in which the join backlog is looked for


# -- per-track counters, filled by the decoder threads ----------------------------------------


@dataclass(slots=True)
class TrackStats:
    """Counters of one receiving track. Written by its decoder thread, read by the loop;
    plain int/float updates are atomic under the GIL, which is all a snapshot needs."""

    probe: bool = False
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
        if codec.name == "VP8":
            size = vp8_keyframe_size(data)
            if size is not None:
                stats.keyframes += 1
                stats.width, stats.height = size
                if stats.first_keyframe_at is None:
                    stats.first_keyframe_at = now
        if not stats.probe or not codec.mimeType.startswith("video/"):
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


@dataclass(slots=True)
class Viewer:
    index: int
    probe: bool
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
    """Offer recvonly video + audio (+ an ``events`` data channel, like the web page)."""
    pc = viewer.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.on("track", viewer.on_track)
    pc.on("connectionstatechange", viewer.on_state)
    pc.addTransceiver("video", direction="recvonly")
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
        if answer_delay > 0:
            await asyncio.sleep(answer_delay)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
        async with asyncio.timeout(connect_timeout):
            await viewer.connected.wait()
    except Exception as exc:
        viewer.error = viewer.error or f"{type(exc).__name__}: {exc}"


# -- measurement ------------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


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
    for i in live:
        a, b = start.viewers[i], end.viewers[i]
        fps.append((b.video_frames - a.video_frames) / window)
        pps.append((b.audio_frames - a.audio_frames) / window)
        kbps.append((b.video_bytes - a.video_bytes) * 8 / window / 1000)
        keyframes.append(b.video_keyframes - a.video_keyframes)
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
            "decoded_size": size,
            "size_ok": None if expected is None else size == expected,
            "ttff_ms": None if v.first_frame_at is None
            else round((v.first_frame_at - v.posted_at) * 1000, 1),
        })
    result: dict[str, Any] = {
        "n": len(viewers),
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
    }
    if start.server_cpu is not None and end.server_cpu is not None:
        result["server_cpu_pct"] = round((end.server_cpu - start.server_cpu) / window * 100, 1)
        for key, rss in (("server_rss_start_mb", start.server_rss_mb),
                         ("server_rss_mb", end.server_rss_mb)):
            result[key] = None if rss is None else round(rss, 1)
    if start.metrics is not None and end.metrics is not None:
        result["server_counters"] = counter_deltas(start.metrics, end.metrics)
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
    probes = {0, args.n - 1} if args.probes else set()
    viewers = [Viewer(index=i, probe=i in probes) for i in range(args.n)]
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


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if os.environ.get("AVATAR_GATEWAY_TEST_NETNS") != "1":
        print("fanout_viewers: run inside the private network namespace "
              "(tests/netns.sh), normally via bench/fanout.py", file=sys.stderr)
        sys.exit(2)
    result = asyncio.run(run(args))
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
