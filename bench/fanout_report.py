"""Results of bench/fanout.py: one Row per data point, and the Markdown tables made of them.

Rows are grouped by load client (``aiortc``: bench/fanout_viewers.py; ``pion``: the
browser-like bench/whepload) and design; every comparison is between rows of one client
except :func:`clients_table`, which puts the two clients side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

CODEC_DESIGNS = ("encode-once-h264", "encode-once-mixed")
CPU_NOISE_PCT = 2.0  # run-to-run spread of the gateway's CPU % at the same N, seen on 2 cores

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
    client: str = "aiortc"
    workers: int = 0
    worker_throttled_s: list[float] = field(default_factory=list)
    """Per worker, seconds its CPU budget held it back (``--worker-cpu-share``)."""
    """Fan-out worker processes the gateway ran (0: viewers in its one process)."""
    """The load client: ``aiortc`` (fanout_viewers.py) or ``pion`` (whepload)."""
    ttff_p95_ms: float | None = None
    """Only the Pion client reports it."""
    client_rtcp_pps: float | None = None
    """RTCP packets per second one viewer sent (Pion client: it counts what it sends)."""
    feedback_per_s: float | None = None
    """RTCP feedback packets (NACK, PLI, FIR, REMB) per second the gateway counted, all viewers."""
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        return self.status != "error" and self.fps_median is not None


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
    for client, design, workers in {(r.client, r.design, r.workers) for r in rows}:
        measured = sorted((r for r in rows if r.design == design and r.client == client
                           and r.workers == workers
                           and r.measured
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


def throttled_text(row: Row) -> str:
    if not row.worker_throttled_s:
        return ""
    return f"  workers held back by their CPU budget {'/'.join(map(str, row.worker_throttled_s))} s"


def progress_line(row: Row) -> str:
    if not row.measured:
        return (f"{row.design:>17} {row.client:>6} N={row.n:<3} {status_text(row)}  "
                f"[{row.elapsed_s:.0f} s]")
    encode = "".join(f"  {codec} encode {fmt(e.get('mean_ms'), 2)} ms/frame"
                     for codec, e in sorted(row.encode.items()))
    return (f"{row.design:>17} {row.client:>6} N={row.n:<3} fps {pair(row.fps_min, row.fps_median)}  "
            f"audio {pair(row.audio_pps_min, row.audio_pps_median)}  "
            f"server CPU {fmt(row.server_cpu_pct)}%  viewers CPU {fmt(row.viewer_cpu_pct)}%  "
            f"TTFF {pair(row.ttff_median_ms, row.ttff_max_ms, 0)} ms  "
            f"join backlog max {fmt(row.join_backlog_max_ms, 0)} ms  "
            f"RSS {rss_text(row)} MB  {fmt(row.video_kbps_median, 0)} kbps  "
            f"kf {fmt(row.keyframes)}  dropped {fmt(row.packets_dropped)}  "
            f"probes {','.join(row.probe_sizes)}{encode}{throttled_text(row)}  {status_text(row)}  "
            f"[{row.elapsed_s:.0f} s]")


RESULT_HEADER = (
    "| design | client | workers | N | video fps/viewer min / med | "
    "audio pkt/s/viewer min / med | "
    "server CPU % (1 core) | CPU % per extra viewer | TTFF ms med / max | "
    "server RSS MB (growth in window) | "
    "video kbps/viewer | keyframes in window | packets dropped | viewer-proc CPU % | "
    "probe decoded size (pion: keyframe header) | status |"
)


FULL_RATE = 29.0
"""fps every viewer must get for a point to count toward a configuration's capacity."""


def capacity_table(rows: Sequence[Row]) -> str:
    """Per design, client and worker count: the most viewers measured with every viewer at
    FULL_RATE fps or more, and that against the fewest workers measured (same run)."""
    lines = [f"| design | client | workers | viewers at >= {FULL_RATE:g} fps (largest N measured) "
             "| server CPU % there | ratio to the fewest workers |", "|---|---|---|---|---|---|"]
    for design, client in sorted({(r.design, r.client) for r in rows}):
        best: dict[int, Row | None] = {}
        for workers in sorted({r.workers for r in rows if r.design == design
                               and r.client == client}):
            full = [r for r in rows if r.design == design and r.client == client
                    and r.workers == workers and r.status == "ok"
                    and r.fps_min is not None and r.fps_min >= FULL_RATE]
            best[workers] = max(full, key=lambda r: r.n) if full else None
        base = best[min(best)]
        for workers, row in best.items():
            n = row.n if row else 0
            ratio = f"{n / base.n:.2f}" if base and row else "-"
            cpu = fmt(row.server_cpu_pct) if row else "-"
            lines.append(f"| {design} | {client} | {workers} | {n} | {cpu} | {ratio} |")
    return "\n".join(lines)


def results_table(rows: Sequence[Row]) -> str:
    lines = [RESULT_HEADER, "|" + "---|" * RESULT_HEADER.count(" | ") + "---|"]
    for r in rows:
        slope = fmt(r.cpu_per_viewer_pct, 2) if r.cpu_per_viewer_pct is not None else "-"
        probe = ", ".join(sorted(set(r.probe_sizes))) or "-"
        lines.append(
            f"| {r.design} | {r.client} | {r.workers} | {r.n} | {pair(r.fps_min, r.fps_median)} | "
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


def report(rows: Sequence[Row], env: dict[str, Any], stream: TextIO) -> None:
    size = next((f"{r.width}x{r.height}" for r in rows if r.width), "?")
    codecs = "VP8" if all(r.codec == "vp8" for r in rows) else "VP8 / H.264"
    print(f"\n## Fan-out benchmark: {env['quality']} ({size}@30), {codecs} + Opus, "
          "speaking avatar\n", file=stream)
    print(f"{env['date']}, {env['cpus']} x {env['cpu']}, Python {env['python']}, "
          f"aiortc {env.get('aiortc', '?')}, PyAV {env.get('av', '?')}"
          + (f", Pion {env['pion']}" if env.get("pion") else "")
          + f". Gateway pinned to CPU {env['server_cpu']}, the load client to CPU "
          f"{env['viewer_cpu']}: `aiortc` (N aiortc peers, 2 decoding probes) or `pion` (N "
          "browser-like Pion peers, none decoding)"
          + ("; every viewer POSTs at once" if env.get("all_at_once") else "")
          + f"; warm-up {env['warmup_s']:g} s, window {env['measure_s']:g} s"
          + f"; fan-out workers: {', '.join(map(str, env.get('workers', ['?'])))}"
          + (f", each limited to {env['worker_cpu_share']:g} of a core (cgroup CPU budget)"
             if env.get("worker_cpu_share") else "") + ". "
          "CPU % is utime+stime of the gateway process and its workers over the window "
          "(100 = one core). "
          "TTFF: WHEP POST to first decodable frame at the viewer. Keyframes: encoded by the "
          "shared encoder (encode-once) or received from per-viewer encoders (naive). "
          "CPU per extra viewer: slope against the design's smallest N.\n",
          file=stream)
    print(results_table(rows), file=stream)
    if len({r.workers for r in rows}) > 1:
        print("\n### capacity by fan-out workers\n", file=stream)
        print(capacity_table(rows), file=stream)
    clients = sorted({r.client for r in rows})
    if len(clients) > 1:
        print("\n### load clients: pion (browser-like) / aiortc\n", file=stream)
        print(CLIENTS_NOTE, file=stream)
        print(clients_table(rows), file=stream)
    designs = {r.design for r in rows}
    for client in clients:
        mine = [r for r in rows if r.client == client]
        if "naive" in designs or not designs & set(CODEC_DESIGNS):
            print(f"\n### naive / encode-once ({client} client)\n", file=stream)
            print(comparison_table(mine), file=stream)
    if designs & set(CODEC_DESIGNS):
        print("\n### codecs: H.264 and mixed viewers / encode-once (VP8)\n", file=stream)
        print("Ratios and differences (in % of a core) are against `encode-once` (every "
              "viewer VP8) at the same N and with the same client. Mixed: even viewers VP8, "
              "odd viewers H.264, so at N=1 it is VP8 only. fps min: the worst viewer's "
              "delivered fps; fps and kbps per codec for mixed. CPU per extra viewer: slope "
              "against the design's own smallest N (mixed: smallest N >= 2). Encode ms/frame: "
              "mean of the gateway's `avatargw_video_encode_duration_seconds` per codec over "
              "the window; that is wall time in the encoder thread, so with two encoders "
              "sharing the gateway's one core each one's time includes waiting for the other.",
              file=stream)
        for client in clients:
            print(f"\n{client} client:\n", file=stream)
            print(codec_table([r for r in rows if r.client == client]), file=stream)
    stream.flush()


CLIENTS_NOTE = (
    "Same design and N, one client after the other. Server CPU and CPU per extra viewer are "
    "the gateway's; the ratio says how much more a browser-like viewer costs it than an aiortc "
    "one. Gateway feedback/s: RTCP feedback packets (NACK, PLI, FIR, REMB) the gateway counted "
    "from all viewers; RTCP/s/viewer: every RTCP packet one Pion viewer sent (receiver "
    "reports, REMB, NACK, PLI). TTFF p95 is reported by the Pion client only.\n"
)


def clients_table(rows: Sequence[Row]) -> str:
    """The Pion client against the aiortc client at the same design and N."""
    pion = {(r.design, r.n): r for r in rows if r.client == "pion" and r.measured}
    aiortc = {(r.design, r.n): r for r in rows if r.client == "aiortc" and r.measured}
    common = sorted(set(pion) & set(aiortc), key=lambda k: (k[0], k[1]))
    if not common:
        return "(no design and N was measured with both clients)"
    lines = [
        "| design | N | server CPU % aiortc / pion | CPU ratio pion / aiortc | "
        "CPU % per extra viewer aiortc / pion | per-viewer ratio | fps min aiortc / pion | "
        "TTFF ms med aiortc / pion | TTFF p95 pion | gateway feedback/s aiortc / pion | "
        "RTCP/s/viewer pion | client-proc CPU % aiortc / pion |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in common:
        a, p = aiortc[key], pion[key]
        slope_ratio = ratio(p.cpu_per_viewer_pct, a.cpu_per_viewer_pct, 2)
        growth = (a.cpu_per_viewer_pct or 0.0) * (a.n - (a.slope_base_n or a.n))
        if a.cpu_per_viewer_pct is not None and growth < CPU_NOISE_PCT:
            slope_ratio = f"- (aiortc grew < {CPU_NOISE_PCT:g}% of a core: noise)"
        lines.append(
            f"| {key[0]} | {key[1]} | {pair(a.server_cpu_pct, p.server_cpu_pct)} | "
            f"{ratio(p.server_cpu_pct, a.server_cpu_pct, 2)} | "
            f"{pair(a.cpu_per_viewer_pct, p.cpu_per_viewer_pct, 2)} | {slope_ratio} | "
            f"{pair(a.fps_min, p.fps_min)} | {pair(a.ttff_median_ms, p.ttff_median_ms, 0)} | "
            f"{fmt(p.ttff_p95_ms, 0)} | {pair(a.feedback_per_s, p.feedback_per_s)} | "
            f"{fmt(p.client_rtcp_pps, 1)} | {pair(a.viewer_cpu_pct, p.viewer_cpu_pct)} |")
    return "\n".join(lines)
