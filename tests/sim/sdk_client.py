"""A real LiveKit SDK client (``livekit.rtc``, the Rust core) for simulator tests.

It joins a room, consumes every subscribed track the way an application would (``VideoStream``,
``AudioStream`` at 48 kHz mono) and records what it sees, with arrival times.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from livekit import rtc

TIMEOUT = 20.0


@dataclass
class VideoSeen:
    frames: int = 0
    sizes: set[tuple[int, int]] = field(default_factory=set)
    first_at: float | None = None
    timestamps_us: list[int] = field(default_factory=list)
    """Each frame's capture time as the publisher stamped it (the stream's own clock)."""


@dataclass
class AudioSeen:
    frames: int = 0
    sample_rates: set[int] = field(default_factory=set)
    channels: set[int] = field(default_factory=set)
    rms: list[tuple[float, float]] = field(default_factory=list)
    """(arrival time, RMS of the frame in int16 units)."""


@dataclass
class DataSeen:
    at: float
    sender: str | None
    topic: str | None
    payload: bytes


class SdkClient:
    def __init__(self, url: str, token: str, *, single_peer_connection: bool | None = False) -> None:
        self.url = url
        self.token = token
        self.options = rtc.RoomOptions(auto_subscribe=True, single_peer_connection=single_peer_connection)
        self.room = rtc.Room()
        self.events: list[tuple[str, str]] = []
        self.data: list[DataSeen] = []
        self.video = VideoSeen()
        self.audio = AudioSeen()
        self.tracks: dict[str, rtc.Track] = {}
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._streams: list[rtc.VideoStream | rtc.AudioStream] = []
        room = self.room
        room.on("participant_connected", lambda p: self._event("participant_connected", p.identity))
        room.on("participant_disconnected", lambda p: self._event("participant_disconnected", p.identity))
        room.on("disconnected", lambda reason: self._event("disconnected", str(reason)))
        room.on("reconnecting", lambda: self._event("reconnecting", ""))
        room.on("reconnected", lambda: self._event("reconnected", ""))
        room.on("track_subscribed", self._on_track_subscribed)
        room.on("track_unsubscribed", lambda t, pub, p: self._event("track_unsubscribed", p.identity))
        room.on("data_received", self._on_data)

    async def connect(self) -> None:
        async with asyncio.timeout(TIMEOUT):
            await self.room.connect(self.url, self.token, self.options)

    def _event(self, name: str, detail: str) -> None:
        self.events.append((name, detail))
        self._changed.set()

    def seen(self, name: str) -> list[str]:
        return [detail for event, detail in self.events if event == name]

    async def wait_for(self, condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        """Until ``condition()`` holds (checked on every event, and every 50 ms for media)."""
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await self._changed.wait()

    def _on_track_subscribed(self, track: rtc.Track, publication: rtc.RemoteTrackPublication,
                             participant: rtc.RemoteParticipant) -> None:
        kind = "video" if track.kind == rtc.TrackKind.KIND_VIDEO else "audio"
        self.tracks[kind] = track
        self._event("track_subscribed", f"{participant.identity}:{kind}:{publication.sid}")
        loop = asyncio.get_running_loop()
        consume = self._consume_video if kind == "video" else self._consume_audio
        self._tasks.append(loop.create_task(consume(track)))

    async def _consume_video(self, track: rtc.Track) -> None:
        loop = asyncio.get_running_loop()
        stream = rtc.VideoStream(track, capacity=4)
        self._streams.append(stream)
        async for event in stream:
            self.video.frames += 1
            self.video.timestamps_us.append(event.timestamp_us)
            self.video.sizes.add((event.frame.width, event.frame.height))
            if self.video.first_at is None:
                self.video.first_at = loop.time()

    async def _consume_audio(self, track: rtc.Track) -> None:
        loop = asyncio.get_running_loop()
        stream = rtc.AudioStream(track, sample_rate=48_000, num_channels=1, capacity=50)
        self._streams.append(stream)
        async for event in stream:
            frame = event.frame
            self.audio.frames += 1
            self.audio.sample_rates.add(frame.sample_rate)
            self.audio.channels.add(frame.num_channels)
            samples = np.frombuffer(frame.data, dtype=np.int16).astype(np.float64)
            rms = math.sqrt(float(np.mean(samples**2))) if samples.size else 0.0
            self.audio.rms.append((loop.time(), rms))

    def _on_data(self, packet: rtc.DataPacket) -> None:
        sender = packet.participant.identity if packet.participant is not None else None
        self.data.append(DataSeen(asyncio.get_running_loop().time(), sender, packet.topic, packet.data))
        self._changed.set()

    def frame_rate(self, last: int = 60) -> float:
        """Frames per second of the stream over its ``last`` frames, by the publisher's
        timestamps: what the publisher sent, however busy this machine is."""
        stamps = self.video.timestamps_us[-last:]
        span = (stamps[-1] - stamps[0]) / 1e6 if len(stamps) > 1 else 0.0
        return (len(stamps) - 1) / span if span > 0 else 0.0

    def peak_rms(self, since: float = 0.0) -> float:
        return max((rms for at, rms in self.audio.rms if at >= since), default=0.0)

    async def publish_microphone(self, queue_ms: int = 100) -> rtc.AudioSource:
        """Publish a microphone track; the caller feeds it with :func:`feed`. A short queue
        makes ``capture_frame`` keep real time, so feeding ends when the audio is sent."""
        source = rtc.AudioSource(48_000, 1, queue_size_ms=queue_ms)
        track = rtc.LocalAudioTrack.create_audio_track("microphone", source)
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        async with asyncio.timeout(TIMEOUT):
            await self.room.local_participant.publish_track(track, options)
        return source

    async def close(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await self.room.disconnect()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for stream in self._streams:
            await stream.aclose()


async def feed(source: rtc.AudioSource, seconds: float, amplitude: float, frequency: float = 220.0) -> None:
    """Capture ``seconds`` of a sine (or silence, amplitude 0) in 10 ms frames, in real time."""
    rate, step = 48_000, 480
    t0 = 0
    for _ in range(round(seconds * 100)):
        n = np.arange(t0, t0 + step)
        t0 += step
        pcm = (amplitude * 32767 * np.sin(2 * np.pi * frequency * n / rate)).astype(np.int16)
        await source.capture_frame(rtc.AudioFrame(pcm.tobytes(), rate, 1, step))
