"""What the quality ladder costs: the same N browser-like viewers of one session, on 1, 2 or 3
rungs (full size, half, a quarter), in one run.

A rung in use is one more encoder (a scaled copy of each frame, encoded smaller); what a
viewer costs the fan-out does not change, and viewers on smaller rungs are sent fewer bytes.
Each data point is a fresh gateway pinned to ``--server-cpu`` (in-process fan-out, the
avatar speaking) and N Pion viewers (``bench/whepload``: receiver reports, NACK, REMB, PLI,
Chromium-sized offers) pinned to ``--viewer-cpu``, spread evenly over the rungs by the
``max_height`` of their WHEP requests. Run it inside the test namespace::

    tests/netns.sh .venv/bin/python bench/ladder.py --viewers 60 --quality high
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
from collections.abc import Sequence

import fanout
from fanout_report import Row

HEIGHTS = {"high": 720, "medium": 480, "low": 360}


def heights_for(rungs: int, height: int) -> tuple[int, ...]:
    """``max_height`` per viewer in turn: rung 0 (no cap), then half, then a quarter."""
    return (0, height // 2, height // 4)[:rungs] if rungs > 1 else ()


def median_cpu(rows: Sequence[tuple[int, Row]], rungs: int) -> float | None:
    cpus = [r.server_cpu_pct for n, r in rows
            if n == rungs and r.status == "ok" and r.server_cpu_pct is not None]
    return statistics.median(cpus) if cpus else None


def table(rows: Sequence[tuple[int, Row]]) -> str:
    """One line per run; "CPU vs 1 rung" against the median of the 1-rung runs."""
    base = median_cpu(rows, 1)
    lines = ["| rungs in use | viewers | video fps per viewer min / median | gateway CPU % "
             "(1 core = 100) | CPU vs 1 rung | keyframe sizes received | status |",
             "|---|---|---|---|---|---|---|"]
    for rungs, row in rows:
        cpu = row.server_cpu_pct
        ratio = f"{cpu / base:.2f}x" if cpu is not None and base else "-"
        fps = "-" if row.fps_min is None else f"{row.fps_min} / {row.fps_median}"
        status = row.status if row.status == "ok" else f"{row.status}: {row.error or ''}"
        sizes = ", ".join(sorted(row.probe_sizes, key=lambda s: -int(s.split("x")[0])))
        lines.append(f"| {rungs} | {row.connected}/{row.n} | {fps} | "
                     f"{'-' if cpu is None else round(cpu, 1)} | {ratio} | {sizes} | {status} |")
    return "\n".join(lines)


async def measure(opts: fanout.Options, rungs_list: Sequence[int], n: int,
                  height: int, repeat: int) -> list[tuple[int, Row]]:
    rows: list[tuple[int, Row]] = []
    for _ in range(repeat):  # interleaved, so a slow spell of the machine hits every design
        for rungs in rungs_list:
            point = dataclasses.replace(opts, heights=heights_for(rungs, height))
            row = await fanout.run_point(point, "encode-once", n, "pion")
            rows.append((rungs, row))
            print(f"  {rungs} rung(s), N={n}: fps {row.fps_min}/{row.fps_median}, CPU "
                  f"{row.server_cpu_pct}%, {row.status} {row.error or ''}",
                  file=sys.stderr, flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--viewers", type=int, default=60)
    parser.add_argument("--rungs", default="1,2,3", help="rung counts to compare (default 1,2,3)")
    parser.add_argument("--quality", choices=sorted(HEIGHTS), default="high")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each (default 2)")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--measure", type=float, default=10.0)
    parser.add_argument("--server-cpu", default="0")
    parser.add_argument("--viewer-cpu", default="1")
    args = parser.parse_args(argv)
    if os.environ.get("AVATAR_GATEWAY_TEST_NETNS") != "1":
        sys.exit("ladder: WebRTC traffic must stay in a private network namespace; run:\n"
                 "  tests/netns.sh .venv/bin/python bench/ladder.py [options]")
    rungs_list = [int(r) for r in args.rungs.split(",")]
    if not all(1 <= r <= 3 for r in rungs_list):
        parser.error("--rungs: each between 1 and 3")
    opts = fanout.parse_args([
        "--client", "pion", "--designs", "encode-once", "--workers", "0",
        "--viewers", str(args.viewers), "--quality", args.quality, "--warmup", str(args.warmup),
        "--measure", str(args.measure), "--server-cpu", args.server_cpu,
        "--viewer-cpu", args.viewer_cpu, "--out", str(fanout.BENCH / "out" / "ladder.jsonl")])
    opts = fanout.choose_clients(opts)
    rows = asyncio.run(measure(opts, rungs_list, args.viewers, HEIGHTS[args.quality],
                               args.repeat))
    print(f"\n## Quality ladder: {args.viewers} Pion viewers, {args.quality} "
          f"({HEIGHTS[args.quality]}p), gateway on CPU {args.server_cpu}, client on CPU "
          f"{args.viewer_cpu}, warm-up {args.warmup:g} s, window {args.measure:g} s\n")
    print(table(rows))
    medians = {rungs: median_cpu(rows, rungs) for rungs in dict.fromkeys(rungs_list)}
    base = medians.get(1)
    print("\nmedian gateway CPU: " + ", ".join(
        f"{rungs} rung(s) {cpu:.1f}%" + (f" ({cpu / base:.2f}x)" if base else "")
        for rungs, cpu in medians.items() if cpu is not None))
    return 0 if all(row.status == "ok" for _, row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
