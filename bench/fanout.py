"""Fan-out benchmark: what one more viewer costs, encode-once vs one encoder per viewer,
and VP8 vs H.264.

For every design and every viewer count N this starts a fresh
gateway pinned to one CPU, creates one local-avatar session, keeps the avatar speaking (so the
encoder sees a moving mouth, not a still picture), and starts ``bench/fanout_viewers.py``
pinned to another CPU with N aiortc viewers. After a warm-up the viewer process measures for a
fixed window: delivered video fps and audio packets/s per viewer, video bitrate, time to first
frame, and the gateway's CPU time (``/proc``: 100% = one core), RSS and Prometheus counters.
Then everything this script started is stopped, by PID.

Designs (gateway ``MEDIA_DESIGN`` + the codec the viewers ask for):

* ``encode-once``: encode-once, every viewer VP8 (one shared VP8 encoder).
* ``naive``: aiortc's default of one VP8 encoder per viewer.
* ``encode-once-h264``: encode-once, every viewer H.264 constrained baseline (one shared
  libx264 encoder).
* ``encode-once-mixed``: encode-once, even viewers VP8 and odd viewers H.264 (two shared
  encoders; at N=1 only the VP8 one).

The default run is ``encode-once,naive``; ``--designs encode-once,encode-once-h264,
encode-once-mixed`` compares codecs.

The naive design collapses quickly (every viewer runs its own VP8 encoder on the one core), so
a design stops growing N once its median fps falls below ``--collapse-fps``.

Output: one line per data point while running, then a Markdown results table, a
naive/encode-once comparison and a codec comparison (each against ``encode-once`` at the same
N, with the shared encoders' mean encode time per frame from the gateway's histogram), and
every row as a JSON line in ``bench/out/fanout.jsonl``.

All WebRTC traffic must stay in a private network namespace, so this runs under
``tests/netns.sh`` (and re-executes itself that way when started outside one)::

    tests/netns.sh .venv/bin/python bench/fanout.py            # full run, 2-3 min on 2 cores
    tests/netns.sh .venv/bin/python bench/fanout.py --quick    # smoke run, N=1,4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

import aiohttp

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
NETNS = ROOT / "tests" / "netns.sh"
VIEWERS_SCRIPT = BENCH / "fanout_viewers.py"
NETNS_ADDRESS = "10.203.0.1"  # the veth address tests/netns.sh creates
DESIGN_SETUP = {
    # design: (the gateway's AVATAR_GATEWAY_MEDIA_DESIGN, fanout_viewers.py --codec)
    "encode-once": ("encode-once", "vp8"),
    "naive": ("naive", "vp8"),
    "encode-once-h264": ("encode-once", "h264"),
    "encode-once-mixed": ("encode-once", "mixed"),
}
DESIGNS = tuple(DESIGN_SETUP)
DEFAULT_DESIGNS = ("encode-once", "naive")
CODEC_DESIGNS = ("encode-once-h264", "encode-once-mixed")
CPU_NOISE_PCT = 2.0  # run-to-run spread of the gateway's CPU % at the same N, seen on 2 cores

SPEECH = (
    "Welcome to the avatar gateway. One session is encoded once, and every viewer receives "
    "the same packets. Quick brown foxes jump over lazy dogs while we measure frame rates, "
    "processor time and memory. Peter Piper picked a peck of pickled peppers; she sells sea "
    "shells by the sea shore. Thank you for watching, and please stay for a few more words."
)


# -- options and results ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    designs: tuple[str, ...]
    viewers: tuple[int, ...]
    quality: str
    warmup: float
    measure: float
    collapse_fps: float
    keyframe_interval: float | None
    server_cpu: int
    viewer_cpu: int
    batch: int
    data_channel: bool
    answer_delay: float
    out: Path


@dataclass(slots=True)
class Row:
    design: str
    n: int
    status: str = "ok"
    """``ok``, ``collapsed`` (median fps below the threshold) or ``error``."""
    error: str | None = None
    connected: int = 0
    width: int = 0
    height: int = 0
    fps_min: float | None = None
    fps_median: float | None = None
    audio_pps_min: float | None = None
    audio_pps_median: float | None = None
    server_cpu_pct: float | None = None
    cpu_per_viewer_pct: float | None = None
    """Slope against the design's smallest-N row, in % of a core per extra viewer."""
    slope_base_n: int | None = None
    viewer_cpu_pct: float | None = None
    ttff_median_ms: float | None = None
    ttff_max_ms: float | None = None
    join_backlog_max_ms: float | None = None
    """Worst stale burst a viewer got when it joined (see fanout_viewers.TrackStats)."""
    server_rss_mb: float | None = None
    video_kbps_median: float | None = None
    keyframes: int | None = None
    """Keyframes encoded in the window: the shared encoder's (encode-once), or the sum over
    viewers of keyframes received (naive: each one came from a viewer's own encoder)."""
    keyframe_requests: int | None = None
    packets_dropped: int | None = None
    frames_skipped_busy: int | None = None
    codec: str = "vp8"
    """What the viewers asked for: ``vp8``, ``h264`` or ``mixed`` (see fanout_viewers)."""
    fps_min_by_codec: dict[str, float | None] = field(default_factory=dict)
    kbps_median_by_codec: dict[str, float | None] = field(default_factory=dict)
    encode: dict[str, dict[str, float | None]] = field(default_factory=dict)
    """Per shared encoder (codec): frames, fps, mean_ms per frame, busy_pct (% of a core)."""
    probe_sizes: list[str] = field(default_factory=list)
    probe_ok: bool | None = None
    server_rss_growth_mb: float | None = None
    """RSS at the end of the window minus at its start: unbounded queues show up here."""
    speak_posts: int = 0
    speak_errors: int = 0
    speech_s: float = 0.0
    speech_gaps: int = 0
    connect_s: float | None = None
    window_s: float | None = None
    elapsed_s: float = 0.0
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        return self.status != "error" and self.fps_median is not None


# -- processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])


async def stop_process(process: asyncio.subprocess.Process, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds: only this process, by its PID."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(grace):
            await process.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


@dataclass(slots=True)
class Gateway:
    process: asyncio.subprocess.Process
    base_url: str
    log: Path


@contextlib.asynccontextmanager
async def gateway(opts: Options, design: str, n: int, log: Path) -> AsyncIterator[Gateway]:
    """A fresh gateway, pinned to ``opts.server_cpu``, stopped on exit."""
    port = free_port()
    # Only the settings below: an AVATAR_GATEWAY_* variable in the caller's shell (a token, a
    # different quality ladder) must not change what is measured.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AVATAR_GATEWAY_") or k == "AVATAR_GATEWAY_TEST_NETNS"}
    env.update({
        "AVATAR_GATEWAY_MEDIA_DESIGN": DESIGN_SETUP[design][0],
        "AVATAR_GATEWAY_MAX_VIEWERS_PER_SESSION": str(max(200, n)),
        "AVATAR_GATEWAY_ICE_HOST_ADDRESSES": NETNS_ADDRESS,
        "PYTHONUNBUFFERED": "1",
    })
    if opts.keyframe_interval is not None:
        env["AVATAR_GATEWAY_KEYFRAME_INTERVAL"] = str(opts.keyframe_interval)
    with log.open("w", encoding="utf-8") as log_file:
        process = await asyncio.create_subprocess_exec(
            "taskset", "-c", str(opts.server_cpu), sys.executable, "-m", "gateway", "serve",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
            cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=log_file)
    try:
        assert process.stdout is not None
        try:
            async with asyncio.timeout(60):
                banner = await process.stdout.readline()
        except TimeoutError:
            banner = b""
        if not banner:
            await stop_process(process, 2)
            raise RuntimeError(f"gateway did not start (rc={process.returncode}): {tail(log)}")
        base_url = f"http://127.0.0.1:{port}"
        await wait_ready(base_url, process, log)
        yield Gateway(process, base_url, log)
    finally:
        await stop_process(process)


async def wait_ready(base_url: str, process: asyncio.subprocess.Process, log: Path) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.monotonic() < deadline:
            if process.returncode is not None:
                break
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(base_url + "/readyz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"gateway never became ready (rc={process.returncode}): {tail(log)}")


@dataclass(slots=True)
class Speaker:
    """Keeps the avatar talking: the next utterance is queued before the previous one ends."""

    http: aiohttp.ClientSession
    url: str
    posts: int = 0
    errors: int = 0
    gaps: int = 0
    """Times the queued speech ran out before more was queued (the avatar fell silent)."""
    speech_s: float = 0.0
    last_error: str | None = None
    _queued_until: float = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with self.http.post(self.url, json={"text": SPEECH}) as response:
                    body = await response.json()
                    if response.status != 200:
                        raise RuntimeError(f"{response.status}: {body}")
                now = loop.time()
                if self.posts and self._queued_until < now:
                    self.gaps += 1
                self.posts += 1
                duration = float(body["duration_ms"]) / 1000
                self.speech_s += duration
                self._queued_until = max(self._queued_until, now) + duration
                # Speech is queued behind what is scheduled; keep ~3 s of it ahead.
                await asyncio.sleep(max(0.5, self._queued_until - loop.time() - 3.0))
            except (aiohttp.ClientError, RuntimeError, KeyError, ValueError) as exc:
                self.errors += 1
                self.last_error = str(exc)
                await asyncio.sleep(1.0)

    def finish(self) -> None:
        """Call when measurement is over: counts a silence at the very end as a gap, too."""
        if self.posts and self._queued_until < asyncio.get_running_loop().time():
            self.gaps += 1


async def create_session(http: aiohttp.ClientSession, base_url: str, quality: str) -> dict[str, Any]:
    async with http.post(base_url + "/v1/sessions",
                         json={"upstream": "local", "quality": quality}) as response:
        body = await response.json()
        if response.status != 201:
            raise RuntimeError(f"POST /v1/sessions -> {response.status}: {body}")
        return dict(body)


async def run_viewers(opts: Options, gw: Gateway, session: dict[str, Any], n: int,
                      codec: str, log: Path) -> dict[str, Any]:
    args = [
        "taskset", "-c", str(opts.viewer_cpu), sys.executable, str(VIEWERS_SCRIPT),
        "--gateway", gw.base_url, "--whep", str(session["whep_url"]), "--n", str(n),
        "--codec", codec,
        "--batch", str(opts.batch), "--warmup", str(opts.warmup), "--measure", str(opts.measure),
        "--server-pid", str(gw.process.pid), "--metrics",
        "--expect-size", f"{session['width']}x{session['height']}",
        "--ice-address", NETNS_ADDRESS,
    ]
    if not opts.data_channel:
        args.append("--no-data-channel")
    if opts.answer_delay:
        args += ["--answer-delay", str(opts.answer_delay)]
    budget = 60 + opts.warmup + opts.measure + 2.0 * n
    with log.open("w", encoding="utf-8") as log_file:
        process = await asyncio.create_subprocess_exec(
            *args, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=log_file)
    try:
        async with asyncio.timeout(budget):
            stdout, _ = await process.communicate()
    except TimeoutError:
        raise RuntimeError(f"viewer process timed out after {budget:.0f} s: {tail(log)}") from None
    finally:
        await stop_process(process, 2)
    if process.returncode != 0 or not stdout.strip():
        raise RuntimeError(f"viewer process failed (rc={process.returncode}): {tail(log)}")
    result: dict[str, Any] = json.loads(stdout)
    return result


def counter_sum(counters: dict[str, float], name: str) -> int:
    return round(sum(v for k, v in counters.items() if k == name or k.startswith(name + "{")))


def fill_row(row: Row, result: dict[str, Any]) -> None:
    row.raw = result
    row.connected = int(result["connected"])
    row.connect_s = result.get("connect_s")
    row.window_s = result.get("window_s")
    row.fps_min = result["video_fps"]["min"]
    row.fps_median = result["video_fps"]["median"]
    row.audio_pps_min = result["audio_pps"]["min"]
    row.audio_pps_median = result["audio_pps"]["median"]
    row.video_kbps_median = result["video_kbps"]["median"]
    row.ttff_median_ms = result["ttff_ms"]["median"]
    row.ttff_max_ms = result["ttff_ms"]["max"]
    row.join_backlog_max_ms = result.get("join_backlog_ms", {}).get("max")
    row.viewer_cpu_pct = result.get("viewer_cpu_pct")
    row.server_cpu_pct = result.get("server_cpu_pct")
    row.server_rss_mb = result.get("server_rss_mb")
    if row.server_rss_mb is not None and result.get("server_rss_start_mb") is not None:
        row.server_rss_growth_mb = round(row.server_rss_mb - result["server_rss_start_mb"], 1)
    by_codec: dict[str, Any] = result.get("by_codec", {})
    row.fps_min_by_codec = {c: g["video_fps"]["min"] for c, g in by_codec.items()}
    row.kbps_median_by_codec = {c: g["video_kbps"]["median"] for c, g in by_codec.items()}
    row.encode = dict(result.get("encode", {}))
    counters: dict[str, float] = result.get("server_counters", {})
    if row.design == "naive":
        row.keyframes = int(result["keyframes_received"]["total"])
    else:
        row.keyframes = counter_sum(counters, "avatargw_keyframes_encoded_total")
    row.keyframe_requests = counter_sum(counters, "avatargw_keyframe_requests_total")
    row.packets_dropped = counter_sum(counters, "avatargw_viewer_packets_dropped_total")
    row.frames_skipped_busy = counter_sum(
        counters, 'avatargw_frames_skipped_total{kind="video",reason="encoder_busy"}')
    probes = result.get("probes", [])
    row.probe_sizes = [p["decoded_size"] or "none" for p in probes]
    row.probe_ok = bool(probes) and all(p["size_ok"] for p in probes)
    if row.connected < row.n:
        row.error = f"{row.n - row.connected} viewers failed: {'; '.join(result['errors'])}"


async def run_point(opts: Options, design: str, n: int) -> Row:
    row = Row(design, n, codec=DESIGN_SETUP[design][1])
    started = time.monotonic()
    logs = opts.out.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    name = f"{design}_n{n}"
    try:
        async with gateway(opts, design, n, logs / f"{name}.gateway.log") as gw, \
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            session = await create_session(http, gw.base_url, opts.quality)
            row.width, row.height = int(session["width"]), int(session["height"])
            speaker = Speaker(http, f"{gw.base_url}/v1/sessions/{session['id']}/speak")
            speaking = asyncio.get_running_loop().create_task(speaker.run())
            try:
                result = await run_viewers(opts, gw, session, n, row.codec,
                                           logs / f"{name}.viewers.log")
            finally:
                speaking.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await speaking
            speaker.finish()
            row.speak_posts, row.speak_errors = speaker.posts, speaker.errors
            row.speech_s, row.speech_gaps = round(speaker.speech_s, 1), speaker.gaps
            if speaker.errors or speaker.gaps or not speaker.posts:
                row.error = (f"avatar not speaking throughout: {speaker.posts} utterances, "
                             f"{speaker.gaps} silences, {speaker.errors} failed POSTs "
                             f"({speaker.last_error})")
            fill_row(row, result)
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.delete(f"{gw.base_url}/v1/sessions/{session['id']}"):
                    pass
    except (RuntimeError, OSError, aiohttp.ClientError, KeyError, ValueError) as exc:
        row.status, row.error = "error", str(exc)
    if row.status == "ok" and (row.fps_median is None or row.fps_median < opts.collapse_fps):
        row.status = "collapsed"
    row.elapsed_s = round(time.monotonic() - started, 1)
    return row


# -- reporting --------------------------------------------------------------------------------


def fmt(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def pair(a: float | None, b: float | None, digits: int = 1) -> str:
    return f"{fmt(a, digits)} / {fmt(b, digits)}"


def add_slopes(rows: Sequence[Row]) -> None:
    """CPU per extra viewer, against the smallest N measured for the same design (for mixed
    viewers the smallest N >= 2: with one viewer only the VP8 encoder runs)."""
    for design in {r.design for r in rows}:
        measured = sorted((r for r in rows if r.design == design and r.measured
                           and r.server_cpu_pct is not None
                           and (r.codec != "mixed" or r.n >= 2)), key=lambda r: r.n)
        if not measured:
            continue
        base = measured[0]
        assert base.server_cpu_pct is not None
        for r in measured[1:]:
            assert r.server_cpu_pct is not None
            r.cpu_per_viewer_pct = round((r.server_cpu_pct - base.server_cpu_pct)
                                         / (r.n - base.n), 2)
            r.slope_base_n = base.n


def rss_text(row: Row) -> str:
    growth = row.server_rss_growth_mb
    extra = f" ({growth:+.0f})" if growth is not None and abs(growth) >= 5 else ""
    return fmt(row.server_rss_mb, 0) + extra


def status_text(row: Row) -> str:
    text = row.status
    if row.status != "error" and row.server_cpu_pct is not None and row.server_cpu_pct >= 95:
        text += " (server core saturated)"
    if row.status != "error" and row.viewer_cpu_pct is not None and row.viewer_cpu_pct >= 95:
        text += " (viewer core saturated)"
    if row.error:
        text += f": {row.error}"
    return text


def progress_line(row: Row) -> str:
    if not row.measured:
        return f"{row.design:>17} N={row.n:<3} {status_text(row)}  [{row.elapsed_s:.0f} s]"
    encode = "".join(f"  {codec} encode {fmt(e.get('mean_ms'), 2)} ms/frame"
                     for codec, e in sorted(row.encode.items()))
    return (f"{row.design:>17} N={row.n:<3} fps {pair(row.fps_min, row.fps_median)}  "
            f"audio {pair(row.audio_pps_min, row.audio_pps_median)}  "
            f"server CPU {fmt(row.server_cpu_pct)}%  viewers CPU {fmt(row.viewer_cpu_pct)}%  "
            f"TTFF {pair(row.ttff_median_ms, row.ttff_max_ms, 0)} ms  "
            f"join backlog max {fmt(row.join_backlog_max_ms, 0)} ms  "
            f"RSS {rss_text(row)} MB  {fmt(row.video_kbps_median, 0)} kbps  "
            f"kf {fmt(row.keyframes)}  dropped {fmt(row.packets_dropped)}  "
            f"probes {','.join(row.probe_sizes)}{encode}  {status_text(row)}  "
            f"[{row.elapsed_s:.0f} s]")


RESULT_HEADER = (
    "| design | N | video fps/viewer min / med | audio pkt/s/viewer min / med | "
    "server CPU % (1 core) | CPU % per extra viewer | TTFF ms med / max | "
    "server RSS MB (growth in window) | "
    "video kbps/viewer | keyframes in window | packets dropped | viewer-proc CPU % | "
    "probe decoded size | status |"
)


def results_table(rows: Sequence[Row]) -> str:
    lines = [RESULT_HEADER, "|" + "---|" * RESULT_HEADER.count(" | ") + "---|"]
    for r in rows:
        slope = fmt(r.cpu_per_viewer_pct, 2) if r.cpu_per_viewer_pct is not None else "-"
        probe = ", ".join(sorted(set(r.probe_sizes))) or "-"
        lines.append(
            f"| {r.design} | {r.n} | {pair(r.fps_min, r.fps_median)} | "
            f"{pair(r.audio_pps_min, r.audio_pps_median)} | {fmt(r.server_cpu_pct)} | {slope} | "
            f"{pair(r.ttff_median_ms, r.ttff_max_ms, 0)} | {rss_text(r)} | "
            f"{fmt(r.video_kbps_median, 0)} | {fmt(r.keyframes)} | {fmt(r.packets_dropped)} | "
            f"{fmt(r.viewer_cpu_pct)} | {probe} | {status_text(r).replace('|', '/')} |")
    return "\n".join(lines)


def ratio(a: float | None, b: float | None, digits: int = 1) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.{digits}f}x"


def comparison_table(rows: Sequence[Row]) -> str:
    once = {r.n: r for r in rows if r.design == "encode-once" and r.measured}
    naive = {r.n: r for r in rows if r.design == "naive" and r.measured}
    lines = [
        "| N | server CPU % naive / encode-once | CPU ratio | CPU % per extra viewer "
        "naive / encode-once | CPU-per-viewer ratio | median fps naive / encode-once | "
        "fps ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    if not set(once) & set(naive):
        return "(no viewer count was measured for both designs)"
    base = min(once.values(), key=lambda r: r.n)
    for n in sorted(set(once) & set(naive)):
        a, b = naive[n], once[n]
        slope_ratio = ratio(a.cpu_per_viewer_pct, b.cpu_per_viewer_pct)
        if b.cpu_per_viewer_pct is not None and abs(
                (b.server_cpu_pct or 0) - (base.server_cpu_pct or 0)) < CPU_NOISE_PCT:
            slope_ratio = f"- (encode-once grew < {CPU_NOISE_PCT:g}% of a core: noise)"
        elif (a.server_cpu_pct or 0) >= 95 and slope_ratio != "-":
            slope_ratio += " (naive saturated: a lower bound)"
        lines.append(
            f"| {n} | {pair(a.server_cpu_pct, b.server_cpu_pct)} | "
            f"{ratio(a.server_cpu_pct, b.server_cpu_pct)} | "
            f"{pair(a.cpu_per_viewer_pct, b.cpu_per_viewer_pct, 2)} | {slope_ratio} | "
            f"{pair(a.fps_median, b.fps_median)} | {ratio(a.fps_median, b.fps_median, 2)} |")
    return "\n".join(lines)


CODEC_NAMES = {"vp8": "VP8", "h264": "H.264", "mixed": "VP8 + H.264"}


def by_codec_text(row: Row, overall: float | None, values: dict[str, float | None],
                  digits: int = 1) -> str:
    """``overall``, or per codec when the viewers were mixed."""
    if row.codec != "mixed" or len(values) < 2:
        return fmt(overall, digits)
    return " / ".join(f"{CODEC_NAMES.get(c, c)} {fmt(v, digits)}"
                      for c, v in sorted(values.items(), reverse=True))


def encode_text(row: Row, key: str, digits: int) -> str:
    if not row.encode:
        return "-"
    return " + ".join(f"{CODEC_NAMES.get(c, c)} {fmt(e.get(key), digits)}"
                      for c, e in sorted(row.encode.items(), reverse=True))


def codec_table(rows: Sequence[Row]) -> str:
    """Every encode-once design against ``encode-once`` (all VP8) at the same N."""
    vp8 = {r.n: r for r in rows if r.design == "encode-once" and r.measured}
    others = [r for r in rows if r.design in CODEC_DESIGNS and r.measured]
    if not others or not set(vp8) & {r.n for r in others}:
        return "(no viewer count was measured for both encode-once and a codec design)"
    base = min(vp8.values(), key=lambda r: r.n)
    lines = [
        "| N | design (viewer codec) | server CPU % (1 core) | CPU vs VP8: ratio / difference "
        "| video fps/viewer min | fps min ratio vs VP8 | CPU % per extra viewer | "
        "per-viewer slope ratio vs VP8 | video kbps/viewer med | "
        "encode ms/frame (mean) | encoder wall time % of window | encoded fps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {d: i for i, d in enumerate(("encode-once", *CODEC_DESIGNS))}
    for n in sorted(set(vp8) & {r.n for r in others}):
        b = vp8[n]
        group = sorted([b, *(r for r in others if r.n == n)], key=lambda r: order[r.design])
        for r in group:
            if r is b:
                cpu_ratio = fps_ratio = slope_ratio = "1 (baseline)"
            else:
                cpu_ratio = ratio(r.server_cpu_pct, b.server_cpu_pct, 2)
                if r.server_cpu_pct is not None and b.server_cpu_pct is not None:
                    cpu_ratio += f" / {r.server_cpu_pct - b.server_cpu_pct:+.1f}"
                fps_ratio = ratio(r.fps_min, b.fps_min, 2)
                slope_ratio = ratio(r.cpu_per_viewer_pct, b.cpu_per_viewer_pct)
                mine = next((x for x in rows if x.design == r.design and x.measured
                             and x.n == r.slope_base_n), None)
                if r.cpu_per_viewer_pct is not None and mine is not None and (
                        abs((b.server_cpu_pct or 0) - (base.server_cpu_pct or 0)) < CPU_NOISE_PCT
                        or abs((r.server_cpu_pct or 0) - (mine.server_cpu_pct or 0))
                        < CPU_NOISE_PCT):
                    slope_ratio = f"- (grew < {CPU_NOISE_PCT:g}% of a core: noise)"
            slope = fmt(r.cpu_per_viewer_pct, 2) if r.cpu_per_viewer_pct is not None else "-"
            if r.cpu_per_viewer_pct is not None and r.slope_base_n != base.n:
                slope += f" (from N={r.slope_base_n})"
            lines.append(
                f"| {n} | {r.design} ({CODEC_NAMES.get(r.codec, r.codec)}) | "
                f"{fmt(r.server_cpu_pct)} | {cpu_ratio} | "
                f"{by_codec_text(r, r.fps_min, r.fps_min_by_codec)} | {fps_ratio} | "
                f"{slope} | {slope_ratio} | "
                f"{by_codec_text(r, r.video_kbps_median, r.kbps_median_by_codec, 0)} | "
                f"{encode_text(r, 'mean_ms', 2)} | {encode_text(r, 'busy_pct', 1)} | "
                f"{encode_text(r, 'fps', 1)} |")
    return "\n".join(lines)


def environment(opts: Options) -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("aiortc", "av", "aiohttp"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        **versions,
        "quality": opts.quality,
        "warmup_s": opts.warmup,
        "measure_s": opts.measure,
        "server_cpu": opts.server_cpu,
        "viewer_cpu": opts.viewer_cpu,
        "keyframe_interval": opts.keyframe_interval,
        "data_channel": opts.data_channel,
        "answer_delay_s": opts.answer_delay,
    }


def report(rows: Sequence[Row], env: dict[str, Any], stream: TextIO) -> None:
    size = next((f"{r.width}x{r.height}" for r in rows if r.width), "?")
    codecs = "VP8" if all(r.codec == "vp8" for r in rows) else "VP8 / H.264"
    print(f"\n## Fan-out benchmark: {env['quality']} ({size}@30), {codecs} + Opus, "
          "speaking avatar\n", file=stream)
    print(f"{env['date']}, {env['cpus']} x {env['cpu']}, Python {env['python']}, "
          f"aiortc {env.get('aiortc', '?')}, PyAV {env.get('av', '?')}. Gateway pinned to CPU "
          f"{env['server_cpu']}, viewer process (N aiortc peers, 2 decoding probes) to CPU "
          f"{env['viewer_cpu']}; warm-up {env['warmup_s']:g} s, window {env['measure_s']:g} s. "
          "CPU % is utime+stime of the gateway process over the window (100 = one core). "
          "TTFF: WHEP POST to first decodable frame at the viewer. Keyframes: encoded by the "
          "shared encoder (encode-once) or received from per-viewer encoders (naive). "
          "CPU per extra viewer: slope against the design's smallest N.\n",
          file=stream)
    print(results_table(rows), file=stream)
    designs = {r.design for r in rows}
    if "naive" in designs or not designs & set(CODEC_DESIGNS):
        print("\n### naive / encode-once\n", file=stream)
        print(comparison_table(rows), file=stream)
    if designs & set(CODEC_DESIGNS):
        print("\n### codecs: H.264 and mixed viewers / encode-once (VP8)\n", file=stream)
        print("Ratios and differences (in % of a core) are against `encode-once` (every "
              "viewer VP8) at the same N. Mixed: even viewers VP8, odd viewers H.264, so at "
              "N=1 it is VP8 only. fps min: the worst viewer's delivered fps; fps and kbps per "
              "codec for mixed. CPU per extra viewer: slope against the design's own smallest "
              "N (mixed: smallest N >= 2). Encode ms/frame: mean of the gateway's "
              "`avatargw_video_encode_duration_seconds` per codec over the window; that is "
              "wall time in the encoder thread, so with two encoders sharing the gateway's one "
              "core each one's time includes waiting for the other.\n", file=stream)
        print(codec_table(rows), file=stream)
    stream.flush()


# -- main -------------------------------------------------------------------------------------


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("viewer counts must be positive")
    return values


def design_list(text: str) -> tuple[str, ...]:
    values = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [v for v in values if v not in DESIGNS]
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"designs are {', '.join(DESIGNS)}; got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description="Fan-out benchmark: encode-once vs one encoder per viewer, VP8 vs H.264.",
        epilog="Run inside the private network namespace: "
               "tests/netns.sh .venv/bin/python bench/fanout.py [options]")
    parser.add_argument("--designs", type=design_list, default=DEFAULT_DESIGNS,
                        help=f"comma-separated, of {', '.join(DESIGNS)} "
                             "(default encode-once,naive)")
    parser.add_argument("--viewers", type=int_list, default=(1, 8, 16, 32, 48),
                        help="comma-separated viewer counts (default 1,8,16,32,48)")
    parser.add_argument("--quality", choices=("high", "medium", "low"), default="high")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds (default 5)")
    parser.add_argument("--measure", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: N=1,4, warm-up 3 s, window 5 s")
    parser.add_argument("--collapse-fps", type=float, default=10.0,
                        help="stop growing N for a design once its median fps is below this")
    parser.add_argument("--keyframe-interval", type=float,
                        help="AVATAR_GATEWAY_KEYFRAME_INTERVAL for the gateway (default: its own)")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--viewer-cpu", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8, help="viewers connecting concurrently")
    parser.add_argument("--no-data-channel", dest="data_channel", action="store_false",
                        help="viewers offer no events data channel")
    parser.add_argument("--answer-delay", type=float, default=0.0,
                        help="viewers wait this long before applying the WHEP answer "
                             "(emulates slow ICE/DTLS; default 0)")
    parser.add_argument("--out", type=Path, default=BENCH / "out" / "fanout.jsonl")
    args = parser.parse_args(argv)
    viewers, warmup, measure = args.viewers, args.warmup, args.measure
    if args.quick:
        viewers, warmup, measure = (1, 4), 3.0, 5.0
    allowed = os.sched_getaffinity(0)
    for cpu in (args.server_cpu, args.viewer_cpu):
        if cpu not in allowed:
            parser.error(f"CPU {cpu} is not available (allowed: {sorted(allowed)})")
    if args.server_cpu == args.viewer_cpu:
        print("warning: gateway and viewers share one CPU; results will be pessimistic",
              file=sys.stderr)
    return Options(
        designs=args.designs, viewers=tuple(sorted(set(viewers))), quality=args.quality,
        warmup=warmup, measure=measure, collapse_fps=args.collapse_fps,
        keyframe_interval=args.keyframe_interval, server_cpu=args.server_cpu,
        viewer_cpu=args.viewer_cpu, batch=args.batch, data_channel=args.data_channel,
        answer_delay=args.answer_delay, out=args.out)


def ensure_namespace(argv: Sequence[str]) -> None:
    """Re-execute under tests/netns.sh unless already inside its private namespace."""
    if os.environ.get("AVATAR_GATEWAY_TEST_NETNS") == "1":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((NETNS_ADDRESS, 0))
            except OSError:
                sys.exit(f"fanout: {NETNS_ADDRESS} is not configured; run the benchmark via "
                         f"tests/netns.sh, which creates it")
        return
    command = [str(NETNS), sys.executable, str(Path(__file__).resolve()), *argv]
    if not NETNS.exists():
        sys.exit("fanout: WebRTC traffic must stay in a private network namespace; run:\n"
                 "  tests/netns.sh .venv/bin/python bench/fanout.py [options]")
    print("fanout: not in the private network namespace; re-running as:\n  "
          + " ".join(command), file=sys.stderr, flush=True)
    os.execv(command[0], command)


async def run(opts: Options) -> list[Row]:
    rows: list[Row] = []
    env = environment(opts)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    print(f"fanout: designs {', '.join(opts.designs)}; N = {', '.join(map(str, opts.viewers))}; "
          f"{opts.quality}; warm-up {opts.warmup:g} s, window {opts.measure:g} s", flush=True)
    with opts.out.open("w", encoding="utf-8") as jsonl:
        for design in opts.designs:
            for n in opts.viewers:
                row = await run_point(opts, design, n)
                rows.append(row)
                add_slopes(rows)
                print(progress_line(row), flush=True)
                jsonl.write(json.dumps({"env": env, **asdict(row)}) + "\n")
                jsonl.flush()
                if design == "naive" and row.status != "ok":
                    skipped = [m for m in opts.viewers if m > n]
                    if skipped:
                        print(f"{design:>17} stopping: {row.status} at N={n}; "
                              f"not measured: N={', '.join(map(str, skipped))}", flush=True)
                    break
    # Slopes are final only now; rewrite the file with them.
    with opts.out.open("w", encoding="utf-8") as jsonl:
        for row in rows:
            jsonl.write(json.dumps({"env": env, **asdict(row)}) + "\n")
    report(rows, env, sys.stdout)
    print(f"\nfanout: {len(rows)} data points in {time.monotonic() - began:.0f} s; "
          f"rows in {opts.out}", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    ensure_namespace(argv)
    rows = asyncio.run(run(opts))
    return 0 if all(r.status != "error" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

