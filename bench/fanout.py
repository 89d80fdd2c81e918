"""Fan-out benchmark: what one more viewer costs, encode-once vs one encoder per viewer,
and VP8 vs H.264.

For every design, every viewer count N and every load client this starts a fresh
gateway pinned to one CPU, creates one local-avatar session, keeps the avatar speaking (so the
encoder sees a moving mouth, not a still picture), and starts the load client pinned to another
CPU with N viewers. After a warm-up the viewer process measures for a
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

Load clients (``--client``):

* ``aiortc``: ``bench/fanout_viewers.py``, N aiortc peers in one Python process that count
  frames (two of them decode). Their RTCP is aiortc's own, not a browser's: REMB whenever its
  estimate moves, which grows with the client's own load (from ~2 to ~60 per viewer per second
  measured), and the process saturates its core at about 50 viewers.
* ``pion``: ``bench/whepload`` (Go, Pion), N peers that behave like Chromium on the wire:
  receiver reports, NACK, REMB/TWCC feedback, PLI (see its package comment). Built here
  into ``bench/out/whepload`` when missing or older than its sources (needs Debian's
  ``golang-go golang-github-pion-webrtc.v3-dev``; no network).
* ``both`` (the default when the Pion client builds): every data point with each client in
  turn, and a table of the two side by side: what the aiortc client leaves out of a viewer's cost.

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
    tests/netns.sh .venv/bin/python bench/fanout.py --client pion --designs encode-once \
        --viewers 100 --all-at-once                            # TTFF p95, 100 joining at once
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import cpu_budget
from fanout_report import Row, add_slopes, progress_line, report

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
NETNS = ROOT / "tests" / "netns.sh"
VIEWERS_SCRIPT = BENCH / "fanout_viewers.py"
WHEPLOAD_SOURCE = BENCH / "whepload"
WHEPLOAD = BENCH / "out" / "whepload"
CLIENTS = ("aiortc", "pion")
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
    keyframe_min_gap: float | None
    fast_start_frames: int | None
    audio_packet_ms: int | None
    max_viewer_load: float | None
    server_cpu: str
    """CPU list for ``taskset -c`` (``0`` or ``0,1``); the gateway's workers inherit it."""
    viewer_cpu: str
    batch: int
    all_at_once: bool
    workers: tuple[int, ...]
    stop_below: bool
    clients: tuple[str, ...]
    client_named: bool
    """``--client`` was given: a Pion client that does not build is then an error."""
    data_channel: bool
    answer_delay: float
    profile: float | None
    """Seconds py-spy samples from the client's start (``--profile``); 0: the whole data point."""
    worker_share: float | None
    """Each fan-out worker limited to this share of a core (``--worker-cpu-share``)."""
    out: Path
    heights: tuple[int, ...] = ()
    """``max_height`` of each viewer's WHEP request in turn (0: none), spreading the viewers
    over rungs of the quality ladder (Pion client; ``bench/ladder.py``)."""



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
async def gateway(opts: Options, design: str, n: int, log: Path,
                  workers: int = 0) -> AsyncIterator[Gateway]:
    """A fresh gateway, pinned to ``opts.server_cpu``, stopped on exit."""
    port = free_port()
    # Only the settings below: an AVATAR_GATEWAY_* variable in the caller's shell (a token, a
    # different quality ladder) must not change what is measured.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AVATAR_GATEWAY_") or k == "AVATAR_GATEWAY_TEST_NETNS"}
    env.update({
        "AVATAR_GATEWAY_MEDIA_DESIGN": DESIGN_SETUP[design][0],
        "AVATAR_GATEWAY_MAX_VIEWERS_PER_SESSION": str(max(200, n)),
        # Every viewer comes from one address: the abuse limits on unconnected viewers would
        # turn a batch (or --all-at-once) into 429s and measure nothing.
        "AVATAR_GATEWAY_MAX_PENDING_VIEWERS_PER_SESSION": str(max(200, n)),
        "AVATAR_GATEWAY_MAX_PENDING_VIEWERS_PER_CLIENT": str(max(200, n)),
        "AVATAR_GATEWAY_ICE_HOST_ADDRESSES": NETNS_ADDRESS,
        "AVATAR_GATEWAY_WORKERS": str(workers),
        "PYTHONUNBUFFERED": "1",
    })
    for name, value in (("KEYFRAME_INTERVAL", opts.keyframe_interval),
                        ("KEYFRAME_MIN_GAP", opts.keyframe_min_gap),
                        ("FAST_START_FRAMES", opts.fast_start_frames),
                        ("AUDIO_PACKET_MS", opts.audio_packet_ms),
                        ("MAX_VIEWER_LOAD", opts.max_viewer_load)):
        if value is not None:
            env[f"AVATAR_GATEWAY_{name}"] = str(value)
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
                      codec: str, client: str, log: Path) -> dict[str, Any]:
    """The load client's process, pinned to ``opts.viewer_cpu``; its JSON result. Both clients
    take the same options (whepload spells them the same way)."""
    program = [str(WHEPLOAD)] if client == "pion" else [sys.executable, str(VIEWERS_SCRIPT)]
    batch = ["--all-at-once"] if client == "pion" and opts.all_at_once else [
        "--batch", str(n if opts.all_at_once else opts.batch)]
    args = [
        "taskset", "-c", str(opts.viewer_cpu), *program,
        "--gateway", gw.base_url, "--whep", str(session["whep_url"]), "--n", str(n),
        "--codec", codec, *batch, "--warmup", str(opts.warmup), "--measure", str(opts.measure),
        "--server-pid", str(gw.process.pid), "--metrics",
        "--ice-address", NETNS_ADDRESS,
    ]
    if opts.heights:  # viewers on several rungs: keyframes of several sizes
        args += ["--heights", ",".join(map(str, opts.heights))]
    else:
        args += ["--expect-size", f"{session['width']}x{session['height']}"]
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
    try:
        result: dict[str, Any] = json.loads(stdout)
    except ValueError as exc:
        raise RuntimeError(f"viewer process wrote no JSON ({exc}): {stdout[:300]!r}") from None
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
    if row.client == "pion":  # nothing decodes: the keyframe headers carry the size
        row.probe_sizes = list(result.get("keyframe_sizes", []))
        row.probe_ok = result.get("size_ok")
    p95 = result["ttff_ms"].get("p95")
    row.ttff_p95_ms = p95 if p95 is not None else None
    sent = result.get("rtcp_sent")
    if sent and row.window_s and row.connected:
        row.client_rtcp_pps = round(sent.get("packets", 0) / row.window_s / row.connected, 2)
    row.feedback_per_s = round(counter_sum(counters, "avatargw_rtcp_feedback_received_total")
                               / row.window_s, 1) if row.window_s else None
    if row.connected < row.n:
        row.error = f"{row.n - row.connected} viewers failed: {'; '.join(result['errors'])}"


@contextlib.asynccontextmanager
async def profiler(opts: Options, gw: Gateway, out: Path) -> AsyncIterator[None]:
    """With ``--profile``: py-spy samples the gateway and its workers while the load client
    runs (without pausing them); collapsed stacks, one file per data point."""
    if opts.profile is None:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    process = await asyncio.create_subprocess_exec(
        spy, "record", "--pid", str(gw.process.pid), "--subprocesses", "--nonblocking",
        "--rate", "200", "--format", "raw", "--output", str(out),
        *(["--duration", str(round(opts.profile))] if opts.profile else []),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            async with asyncio.timeout(30):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
        print(f"  profile: {out}", file=sys.stderr)


async def run_point(opts: Options, design: str, n: int, client: str, workers: int = 0) -> Row:
    row = Row(design, n, codec=DESIGN_SETUP[design][1], client=client, workers=workers)
    started = time.monotonic()
    logs = opts.out.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    name = f"{design}_n{n}_{client}_w{workers}"
    try:
        async with gateway(opts, design, n, logs / f"{name}.gateway.log", workers) as gw, \
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            session = await create_session(http, gw.base_url, opts.quality)
            row.width, row.height = int(session["width"]), int(session["height"])
            speaker = Speaker(http, f"{gw.base_url}/v1/sessions/{session['id']}/speak")
            speaking = asyncio.get_running_loop().create_task(speaker.run())
            try:
                with worker_budgets(opts, gw, workers, name) as groups:
                    async with profiler(opts, gw, opts.out.parent / f"{name}.profile.txt"):
                        result = await run_viewers(opts, gw, session, n, row.codec, client,
                                                   logs / f"{name}.viewers.log")
                    row.worker_throttled_s = [round(cpu_budget.throttled_s(g), 1) for g in groups]
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


@contextlib.contextmanager
def worker_budgets(opts: Options, gw: Gateway, workers: int,
                   name: str) -> Iterator[list[Path]]:
    """With ``--worker-cpu-share``: each of the gateway's fan-out workers in a CPU budget of
    its own for the data point (see ``cpu_budget.py``)."""
    if opts.worker_share is None or workers == 0:
        yield []
        return
    pids = [pid for pid in cpu_budget.children(gw.process.pid)
            if b"gateway.workers.process" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    if len(pids) != workers:
        raise RuntimeError(f"expected {workers} fan-out workers, found {len(pids)}: {pids}")
    with cpu_budget.per_process_budget(pids, opts.worker_share, name) as groups:
        yield groups


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
        "fast_start_frames": opts.fast_start_frames,
        "audio_packet_ms": opts.audio_packet_ms,
        "max_viewer_load": opts.max_viewer_load,
        "keyframe_min_gap": opts.keyframe_min_gap,
        "data_channel": opts.data_channel,
        "answer_delay_s": opts.answer_delay,
        "clients": list(opts.clients),
        "workers": opts.workers,
        "worker_cpu_share": opts.worker_share,
        "all_at_once": opts.all_at_once,
        **({"pion": pion_version()} if "pion" in opts.clients else {}),
    }


def pion_version() -> str:
    """The Debian package version of the Pion the client was built against."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["dpkg-query", "-W", "-f=${Version}",
                               "golang-github-pion-webrtc.v3-dev"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip() or "?"
    return "?"


PION_ICE = Path("/usr/share/gocode/src/github.com/pion/ice/v2")
CHROMIUM_PING_MS = 48
"""How often Chromium pings candidate pairs that are not yet writable (``WEAK_PING_INTERVAL``).

Pion's ICE agent checks every 200 ms (``defaultCheckInterval``, which Pion 3.1's SettingEngine
cannot set) and, as the controlling side, nominates a pair only at the tick after its check
succeeded: every Pion viewer spent ~200 ms more than a browser between the answer and
``connected``, which made the time-to-first-frame figures the client's, not the gateway's."""


def pion_ice_overlay() -> Path:
    """A GOPATH entry, searched before Debian's, with a copy of pion/ice whose check interval
    is Chromium's; everything else comes from Debian's packages unchanged."""
    root = WHEPLOAD.parent / "gopath"
    copy = root / "src" / "github.com" / "pion" / "ice" / "v2"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(PION_ICE, copy, ignore=shutil.ignore_patterns("*_test.go"))
    config = copy / "agent_config.go"
    text = config.read_text()
    patched = re.sub(r"(defaultCheckInterval\s*=\s*)200 \* time\.Millisecond",
                     rf"\g<1>{CHROMIUM_PING_MS} * time.Millisecond", text)
    if patched == text:
        raise RuntimeError(f"{config}: no 200 ms defaultCheckInterval to change (another Pion?)")
    config.write_text(patched)
    return root


def build_whepload() -> str | None:
    """Build the Pion load client into bench/out/whepload unless it is newer than every source
    file. Offline: GOPATH mode against Debian's packaged Pion (ICE checks paced like Chromium's,
    see :data:`CHROMIUM_PING_MS`). None when it is ready, else why it is not."""
    sources = [*WHEPLOAD_SOURCE.glob("*.go"), Path(__file__)]
    if WHEPLOAD.exists() and all(
            f.stat().st_mtime <= WHEPLOAD.stat().st_mtime for f in sources):
        return None
    go = shutil.which("go")
    if go is None:
        return "no Go toolchain (apt-get install golang-go golang-github-pion-webrtc.v3-dev)"
    try:
        overlay = pion_ice_overlay()
    except (OSError, RuntimeError) as exc:
        return f"cannot prepare Pion's ICE agent: {exc}"
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{overlay}:/usr/share/gocode"}
    if "HOME" not in env and "GOCACHE" not in env:
        env["GOCACHE"] = str(WHEPLOAD.parent / "go-cache")
    WHEPLOAD.parent.mkdir(parents=True, exist_ok=True)
    print("fanout: building bench/out/whepload (Pion load client)", file=sys.stderr, flush=True)
    try:
        built = subprocess.run([go, "build", "-o", str(WHEPLOAD), "./bench/whepload"], cwd=ROOT,
                               env=env, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"go build failed: {exc}"
    if built.returncode != 0:
        return f"go build failed: {built.stderr.strip()[-800:]}"
    return None



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


def worker_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of worker counts: "
                                         f"{text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError("worker counts are 0 (no workers) or more")
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
    parser.add_argument("--keyframe-min-gap", type=float,
                        help="AVATAR_GATEWAY_KEYFRAME_MIN_GAP for the gateway (default: its own): "
                             "how far apart repair keyframes (PLI/FIR, overflow) may be")
    parser.add_argument("--fast-start-frames", type=int,
                        help="AVATAR_GATEWAY_FAST_START_FRAMES for the gateway (default: its "
                             "own; 0: every join waits for a keyframe of its own)")
    parser.add_argument("--audio-packet-ms", type=int, choices=(20, 40, 60),
                        help="AVATAR_GATEWAY_AUDIO_PACKET_MS for the gateway (default: its own)")
    parser.add_argument("--max-viewer-load", type=float,
                        help="AVATAR_GATEWAY_MAX_VIEWER_LOAD for the gateway (default: its own; "
                             "1: admit every viewer)")
    parser.add_argument("--server-cpu", type=cpu_list, default="0",
                        help="CPUs of the gateway and its workers, e.g. 0 or 0,1 (default 0)")
    parser.add_argument("--viewer-cpu", type=cpu_list, default="1",
                        help="CPUs of the load client (default 1)")
    parser.add_argument("--batch", type=int, default=8, help="viewers connecting concurrently")
    parser.add_argument("--all-at-once", action="store_true",
                        help="every viewer POSTs at once (the time to first frame p95 when many "
                             "join together); overrides --batch")
    parser.add_argument("--workers", type=worker_list, default=(0,),
                        help="AVATAR_GATEWAY_WORKERS, comma-separated to compare: fan-out worker "
                             "processes (default 0: every viewer in the gateway's one process). "
                             "Workers inherit the gateway's CPU pinning; CPU and RSS are summed "
                             "over its process tree")
    parser.add_argument("--stop-below", action="store_true",
                        help="stop growing N for a series once a point is not ok (below "
                             "--collapse-fps): for capacity searches")
    parser.add_argument("--client", choices=("aiortc", "pion", "both"),
                        help="load client(s): aiortc (bench/fanout_viewers.py), pion (the "
                             "browser-like bench/whepload) or both side by side (default: both "
                             "if the Pion client builds, else aiortc)")
    parser.add_argument("--no-data-channel", dest="data_channel", action="store_false",
                        help="viewers offer no events data channel")
    parser.add_argument("--answer-delay", type=float, default=0.0,
                        help="viewers wait this long before applying the WHEP answer "
                             "(emulates slow ICE/DTLS; default 0)")
    parser.add_argument("--profile", type=float, nargs="?", const=0.0, metavar="SECONDS",
                        help="py-spy (pip install py-spy) samples the gateway and its workers "
                             "during each data point, or its first SECONDS (e.g. a join storm): "
                             "collapsed stacks next to --out")
    parser.add_argument("--worker-cpu-share", type=float, metavar="FRACTION",
                        help="limit each fan-out worker to this share of one core (a cgroup CPU "
                             "budget; needs root): compares 1 and 2 workers at the same budget "
                             "per worker on a machine too small to give each its own core")
    parser.add_argument("--out", type=Path, default=BENCH / "out" / "fanout.jsonl")
    args = parser.parse_args(argv)
    viewers, warmup, measure = args.viewers, args.warmup, args.measure
    if args.quick:
        viewers, warmup, measure = (1, 4), 3.0, 5.0
    allowed = os.sched_getaffinity(0)
    for cpus in (args.server_cpu, args.viewer_cpu):
        for cpu in map(int, cpus.split(",")):
            if cpu not in allowed:
                parser.error(f"CPU {cpu} is not available (allowed: {sorted(allowed)})")
    if args.worker_cpu_share is not None:
        if not 0.05 <= args.worker_cpu_share <= 8:
            parser.error("--worker-cpu-share: a fraction of one core, 0.05 to 8")
        try:
            cpu_budget.check_available()
        except RuntimeError as exc:
            parser.error(f"--worker-cpu-share: {exc}")
    if set(args.server_cpu.split(",")) & set(args.viewer_cpu.split(",")):
        print(f"note: the gateway (CPUs {args.server_cpu}) and the load client (CPUs "
              f"{args.viewer_cpu}) share CPUs: the client's work competes with the gateway's",
              file=sys.stderr)
    return Options(
        designs=args.designs, viewers=tuple(sorted(set(viewers))), quality=args.quality,
        warmup=warmup, measure=measure, collapse_fps=args.collapse_fps,
        keyframe_interval=args.keyframe_interval, keyframe_min_gap=args.keyframe_min_gap,
        fast_start_frames=args.fast_start_frames, audio_packet_ms=args.audio_packet_ms,
        max_viewer_load=args.max_viewer_load,
        server_cpu=args.server_cpu,
        viewer_cpu=args.viewer_cpu, batch=args.batch, all_at_once=args.all_at_once,
        workers=tuple(args.workers), stop_below=args.stop_below,
        clients=CLIENTS if args.client in (None, "both") else (args.client,),
        client_named=args.client is not None,
        data_channel=args.data_channel, answer_delay=args.answer_delay, profile=args.profile,
        worker_share=args.worker_cpu_share, out=args.out)


def cpu_list(text: str) -> str:
    """``0`` or ``0,1``, as ``taskset -c`` takes it."""
    try:
        cpus = sorted({int(c) for c in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a CPU list: {text!r}") from None
    return ",".join(map(str, cpus))


def choose_clients(opts: Options) -> Options:
    """Build the Pion client if it is wanted; without it, fall back to aiortc unless a client
    was asked for by name."""
    if "pion" not in opts.clients:
        return opts
    problem = build_whepload()
    if problem is None:
        return opts
    if opts.client_named:
        sys.exit(f"fanout: the Pion load client is not available: {problem}")
    print(f"fanout: the Pion load client is not available ({problem}); aiortc client only",
          file=sys.stderr, flush=True)
    return dataclasses.replace(opts, clients=("aiortc",))


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
          f"clients {', '.join(opts.clients)}; {opts.quality}; warm-up {opts.warmup:g} s, "
          f"window {opts.measure:g} s", flush=True)
    with opts.out.open("w", encoding="utf-8") as jsonl:
        for design, workers in itertools.product(opts.designs, opts.workers):
            stopped: set[str] = set()
            for n in opts.viewers:
                # The clients take turns at each N, so a load that comes and goes on a shared
                # machine falls on both rather than on one client's whole series.
                for client in opts.clients:
                    if client in stopped:
                        continue
                    row = await run_point(opts, design, n, client, workers)
                    rows.append(row)
                    add_slopes(rows)
                    print(progress_line(row), flush=True)
                    jsonl.write(json.dumps({"env": env, **asdict(row)}) + "\n")
                    jsonl.flush()
                    if row.status != "ok" and (design == "naive" or opts.stop_below):
                        stopped.add(client)
                        skipped = [m for m in opts.viewers if m > n]
                        if skipped:
                            print(f"{design:>17} ({client}) stopping: {row.status} at N={n}; "
                                  f"not measured: N={', '.join(map(str, skipped))}", flush=True)
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
    opts = choose_clients(opts)
    rows = asyncio.run(run(opts))
    return 0 if all(r.status != "error" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

