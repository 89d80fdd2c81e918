"""The local upstream on its own: media clock, lip sync against the audio, events, stop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import av
import numpy as np

from gateway.avatar import SpeechSynthesizer
from gateway.config import QUALITY_TIERS
from gateway.upstream.base import AvatarEvent, EventType, TaskType
from gateway.upstream.local import LocalUpstream


@dataclass
class CaptureSink:
    """A real MediaSink that keeps everything it is given."""

    video: list[av.VideoFrame] = field(default_factory=list)
    audio: list[av.AudioFrame] = field(default_factory=list)
    events: list[AvatarEvent] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)
    video_wanted: bool = True

    def on_video_frame(self, frame: av.VideoFrame) -> None:
        self.video.append(frame)

    def on_audio_frame(self, frame: av.AudioFrame) -> None:
        self.audio.append(frame)

    def on_event(self, event: AvatarEvent) -> None:
        self.events.append(event)

    def on_upstream_ended(self, reason: str) -> None:
        self.ended.append(reason)


def pts(frame: av.VideoFrame | av.AudioFrame) -> int:
    assert frame.pts is not None
    return frame.pts


def make_upstream() -> LocalUpstream:
    return LocalUpstream(QUALITY_TIERS["low"], SpeechSynthesizer("en-us"), fps=30)


async def speak_and_capture(text: str) -> tuple[LocalUpstream, CaptureSink, str]:
    upstream, sink = make_upstream(), CaptureSink()
    await upstream.start(sink)
    try:
        await asyncio.sleep(0.3)
        result = await upstream.speak(text, TaskType.REPEAT)
        async with asyncio.timeout(result.duration_ms / 1000 + 20):
            while not any(e.type is EventType.AVATAR_STOP_TALKING for e in sink.events):
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
    finally:
        await upstream.stop()
    return upstream, sink, result.task_id


async def test_mouth_follows_the_audio_within_one_frame() -> None:
    upstream, sink, _ = await speak_and_capture(
        "Mama made a lovely apple pie, but papa ate it all before the party.")
    assert upstream.renderer is not None
    x, y, w, h = upstream.renderer.mouth_box
    # Mouth openness per video frame, on the media clock (pts in 1/90000 s).
    fps = 30
    video_t = np.array([pts(f) / 90_000 for f in sink.video])
    openness = np.array([(f.to_ndarray(format="gray")[y:y + h, x:x + w] < 70).mean()
                         for f in sink.video])
    # Audio loudness for the same 1/30 s windows.
    pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in sink.audio]).astype(np.float64)
    audio_start = pts(sink.audio[0]) / 48_000
    loudness = []
    for t in video_t:
        a = int((t - audio_start) * 48_000)
        window = pcm[max(a, 0):max(a, 0) + 1600]
        loudness.append(float(np.sqrt(np.mean(window**2))) if window.size else 0.0)
    loud = np.array(loudness)
    assert openness.max() > 0.01 and loud.max() > 1000

    def corr(lag: int) -> float:
        a = openness[max(lag, 0):len(openness) + min(lag, 0)]
        b = loud[max(-lag, 0):len(loud) - max(lag, 0)]
        return float(np.corrcoef(a, b)[0, 1])

    lags = {lag: corr(lag) for lag in range(-5, 6)}
    best = max(lags, key=lambda k: lags[k])
    assert abs(best) <= 1, lags
    assert lags[best] > 0.5, lags
    assert len(video_t) == len(set(video_t.tolist())) and np.all(np.diff(video_t) > 0)
    assert np.allclose(np.diff(video_t), 1 / fps, atol=1e-3)


async def test_events_in_order_and_chunks_rebuild_the_text() -> None:
    text = "Hi, I'm the local avatar. Nice to meet you!"
    _, sink, task_id = await speak_and_capture(text)
    events = [e for e in sink.events if e.task_id == task_id]
    kinds = [e.type for e in events]
    assert kinds[0] is EventType.AVATAR_START_TALKING
    assert kinds[-2:] == [EventType.AVATAR_END_MESSAGE, EventType.AVATAR_STOP_TALKING]
    chunks = [e.data["message"] for e in events if e.type is EventType.AVATAR_TALKING_MESSAGE]
    assert "".join(chunks) == text
    assert events[-2].data["message"] == text
    assert events[-1].data["duration_ms"] > 500


async def test_utterances_queue_back_to_back_and_audio_is_continuous() -> None:
    upstream, sink = make_upstream(), CaptureSink()
    await upstream.start(sink)
    try:
        first = await upstream.speak("One two three.")
        second = await upstream.speak("Four five six.")
        async with asyncio.timeout((first.duration_ms + second.duration_ms) / 1000 + 20):
            while sum(e.type is EventType.AVATAR_STOP_TALKING for e in sink.events) < 2:
                await asyncio.sleep(0.05)
    finally:
        await upstream.stop()
    order = [(e.type, e.task_id) for e in sink.events
             if e.type in (EventType.AVATAR_START_TALKING, EventType.AVATAR_STOP_TALKING)]
    assert order == [(EventType.AVATAR_START_TALKING, first.task_id),
                     (EventType.AVATAR_STOP_TALKING, first.task_id),
                     (EventType.AVATAR_START_TALKING, second.task_id),
                     (EventType.AVATAR_STOP_TALKING, second.task_id)]
    stamps = [pts(f) for f in sink.audio]
    assert stamps == list(range(stamps[0], stamps[0] + 960 * len(stamps), 960))  # no gap, no overlap


async def test_no_rendering_while_nobody_watches() -> None:
    upstream, sink = make_upstream(), CaptureSink(video_wanted=False)
    await upstream.start(sink)
    try:
        async with asyncio.timeout(20):  # the clocks run: 10 audio frames are 0.2 s
            while len(sink.audio) < 10:
                await asyncio.sleep(0.02)
    finally:
        await upstream.stop()
    assert sink.video == []


async def test_stop_is_idempotent_and_ends_the_clocks() -> None:
    upstream, sink = make_upstream(), CaptureSink()
    await upstream.start(sink)
    await asyncio.sleep(0.1)
    await upstream.stop()
    await upstream.stop()
    count = len(sink.audio)
    await asyncio.sleep(0.1)
    assert len(sink.audio) == count
