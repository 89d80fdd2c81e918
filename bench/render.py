"""Benchmark of the local avatar: face rendering cost per resolution and TTS speed.

Run ``python bench/render.py``. Prints a table, then one JSON line with the numbers, and
writes 720p screenshots for a few mouth poses to ``bench/out/`` (look at them: the avatar
should read as a friendly face, with the mouth clearly visible when open).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import av
import numpy as np
import numpy.typing as npt

from gateway.avatar import REST, FaceRenderer, LipSync, MouthPose, SpeechSynthesizer

SIZES = [(1280, 720), (854, 480), (640, 360)]
FRAMES = 300
FPS = 30
OUT = Path(__file__).resolve().parent / "out"
PARAGRAPH = (
    "Good morning, and welcome! I am the local avatar of this gateway. My voice comes from "
    "eSpeak NG, and my lips follow the sounds I make: my mouth closes for m, b and p, opens "
    "wide for ah, and rounds for oo. When I pause between sentences, it rests. Thank you for "
    "watching, and have a wonderful day."
)
SHOTS = {
    "rest": REST,
    "ah": MouthPose(0.95, 0.6),
    "ee": MouthPose(0.35, 1.0),
    "oo": MouthPose(0.55, 0.05),
    "mid": MouthPose(0.5, 0.5),
}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def bench_tts(synth: SpeechSynthesizer) -> dict[str, float]:
    synth.synthesize("Warm up.")  # first call pays for loading the voice
    runs = 5  # one paragraph takes only tens of ms: repeat for a stable figure
    cpu0, wall0 = time.process_time(), time.perf_counter()
    utterances = [synth.synthesize(PARAGRAPH) for _ in range(runs)]
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    audio = sum(u.duration for u in utterances)
    t0 = time.perf_counter()
    LipSync(utterances[0])
    lipsync_ms = (time.perf_counter() - t0) * 1000
    return {
        "audio_s": round(audio, 3),
        "cpu_s": round(cpu, 4),
        "wall_s": round(wall, 4),
        "rtf_cpu": round(audio / max(cpu, 1e-9), 1),
        "rtf_wall": round(audio / max(wall, 1e-9), 1),
        "lipsync_ms": round(lipsync_ms, 2),
    }


def bench_render(size: tuple[int, int], poses: list[MouthPose]) -> dict[str, float | str]:
    t0 = time.perf_counter()
    renderer = FaceRenderer(*size)
    init_ms = (time.perf_counter() - t0) * 1000
    for i in range(10):  # warm caches
        renderer.render(i / FPS, poses[i % len(poses)])
    times: list[float] = []
    cpu0 = time.process_time()
    for i in range(FRAMES):
        s = time.perf_counter()
        renderer.render(i / FPS, poses[i % len(poses)])
        times.append((time.perf_counter() - s) * 1000)
    cpu_ms = (time.process_time() - cpu0) * 1000 / FRAMES
    median = statistics.median(times)
    return {
        "resolution": f"{size[0]}x{size[1]}",
        "init_ms": round(init_ms, 1),
        "median_ms": round(median, 4),
        "p95_ms": round(percentile(times, 95), 4),
        "cpu_ms": round(cpu_ms, 4),
        "core_share_pct_30fps": round(median * FPS / 10, 3),
    }


def save_png(frame: av.VideoFrame, path: Path) -> None:
    rgb: npt.NDArray[np.uint8] = np.asarray(frame.to_ndarray(format="rgb24"), dtype=np.uint8)
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = frame.width, frame.height, "rgb24"
        for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def main() -> int:
    synth = SpeechSynthesizer()
    t0 = time.perf_counter()
    synth.synthesize("Hi.")
    tts_init_ms = (time.perf_counter() - t0) * 1000
    tts = bench_tts(synth)
    # A realistic mouth track: the paragraph's lip sync sampled at the frame rate.
    utterance = synth.synthesize(PARAGRAPH)
    lips = LipSync(utterance)
    poses = [lips.pose_at(i / FPS) for i in range(int(utterance.duration * FPS))] or [REST]

    rows = [bench_render(size, poses) for size in SIZES]
    print(f"{'resolution':>10} {'init ms':>8} {'median ms':>10} {'p95 ms':>8} {'cpu ms':>8} "
          f"{'core @30fps':>12}")
    for row in rows:
        print(f"{row['resolution']:>10} {row['init_ms']:>8} {row['median_ms']:>10} "
              f"{row['p95_ms']:>8} {row['cpu_ms']:>8} {row['core_share_pct_30fps']:>11}%")
    print(f"TTS: {tts['audio_s']} s of audio in {tts['cpu_s']} s CPU -> real-time factor "
          f"{tts['rtf_cpu']}x (wall {tts['rtf_wall']}x); first call {tts_init_ms:.0f} ms; "
          f"LipSync {tts['lipsync_ms']} ms")

    OUT.mkdir(parents=True, exist_ok=True)
    renderer = FaceRenderer(1280, 720)
    shots = []
    for name, pose in SHOTS.items():
        path = OUT / f"avatar_720p_{name}.png"
        save_png(renderer.render(0.0, pose), path)
        shots.append(str(path))
    print(f"screenshots: {', '.join(shots)}")
    print(json.dumps({"render": rows, "tts": tts, "tts_first_call_ms": round(tts_init_ms, 1),
                      "screenshots": shots}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
