"""LiveAvatar LITE mode over the session's ``ws_url``: a real aiohttp websocket client speaks
the protocol of LiveAvatar's own clients (24 kHz PCM of real eSpeak speech in ``agent.speak``
chunks), and a real ``livekit`` SDK client in the room hears the avatar and sees its mouth
move. Bad input gets an ``error`` event and the session keeps working."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
import pytest
from aiohttp import ClientWebSocketResponse, WSMsgType
from livekit import rtc

from gateway.avatar import SpeechSynthesizer
from gateway.sim.app import BOOK
from gateway.sim.liveavatar import LiveAvatarSession
from tests.sim.fixtures import (
    SimClient,
    admin,
    call,
    ledger_json,
    liveavatar,
    liveavatar_token,
    needs_netns,
)
from tests.sim.sdk_client import SdkClient

pytestmark = pytest.mark.usefixtures("nothing_left_open")

RATE = 24_000
TIMEOUT = 30.0
SENTENCE = "Hello there, this is the simulator speaking with its own voice."


def speech_pcm(text: str = SENTENCE) -> bytes:
    """eSpeak NG speech as LiveAvatar wants it: 16-bit mono PCM at 24 kHz."""
    utterance = SpeechSynthesizer("en-us").synthesize(text)
    frame = av.AudioFrame.from_ndarray(utterance.pcm.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = utterance.sample_rate
    resampler = av.AudioResampler("s16", "mono", RATE)
    frames = [*resampler.resample(frame), *resampler.resample(None)]
    return b"".join(f.to_ndarray().astype("<i2").tobytes() for f in frames)


def chunks(pcm: bytes, first: float = 0.6, rest: float = 1.0) -> list[bytes]:
    """The plugin's chunking: ~0.6 s first, then 1 s."""
    out, position, size = [], 0, int(first * RATE) * 2
    while position < len(pcm):
        out.append(pcm[position:position + size])
        position += size
        size = int(rest * RATE) * 2
    return out


@dataclass
class Lite:
    """One LITE websocket client: sends commands, records every event."""

    ws: ClientWebSocketResponse
    events: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, event_type: str, **data: Any) -> str:
        event_id = data.pop("event_id", None) or str(uuid.uuid4())
        await self.ws.send_str(json.dumps({"type": event_type, "event_id": event_id, **data}))
        return event_id

    async def speak(self, pcm: bytes, event_id: str | None = None) -> list[str]:
        """Stream ``pcm`` like the plugin: one fresh event id per chunk, then speak_end."""
        ids = [await self.send("agent.speak", audio=base64.b64encode(c).decode(),
                               event_id=event_id) for c in chunks(pcm)]
        ids.append(await self.send("agent.speak_end", event_id=event_id))
        return ids

    async def read(self) -> None:
        async for message in self.ws:
            if message.type is WSMsgType.TEXT:
                self.events.append(json.loads(message.data))
                self.changed.set()
        self.closed.set()
        self.changed.set()

    def of(self, event_type: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == event_type]

    async def wait_for(self, event_type: str, count: int = 1) -> list[dict[str, Any]]:
        async with asyncio.timeout(TIMEOUT):
            while len(self.of(event_type)) < count:
                self.changed.clear()
                if self.closed.is_set():
                    raise AssertionError(f"closed before {event_type}: {self.events}")
                await self.changed.wait()
        return self.of(event_type)


@pytest.fixture
async def lite_clients() -> AsyncIterator[list[tuple[Lite, asyncio.Task[None]]]]:
    opened: list[tuple[Lite, asyncio.Task[None]]] = []
    yield opened
    for lite, reader in opened:
        await lite.ws.close()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def lite_session(sim: SimClient, **fields: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    data = await liveavatar_token(sim, mode="LITE", **fields)
    started = (await liveavatar(sim, "start", bearer=data["session_token"]))["data"]
    return data, started


async def connect(sim: SimClient, ws_url: str,
                  opened: list[tuple[Lite, asyncio.Task[None]]]) -> Lite:
    # ws_url names the simulator as the client reached it: keep its path and query.
    path = ws_url[ws_url.index("/v1/"):]
    lite = Lite(await sim.ws_connect(path))
    opened.append((lite, asyncio.get_running_loop().create_task(lite.read())))
    return lite


async def stop(sim: SimClient, data: dict[str, Any]) -> None:
    await liveavatar(sim, "stop", {"reason": "USER_DISCONNECTED"}, bearer=data["session_token"])


# -- the protocol, no media needed --------------------------------------------------------------


async def test_ws_url_is_authenticated_by_its_query(sim: SimClient) -> None:
    data, started = await lite_session(sim)
    url = started["ws_url"]
    assert url.startswith(f"ws://127.0.0.1:{sim.port}/v1/sessions/ws?session_id={data['session_id']}&token=")
    path = url[url.index("/v1/"):]
    for bad in (path.replace("token=", "token=x"), path.split("&")[0],
                "/v1/sessions/ws?session_id=nope&token=x"):
        status, body = await call(sim, "GET", bad)
        assert status in (401, 404) and body["code"] == 4000 + status - 400, (bad, body)
    full = await liveavatar_token(sim)
    full_started = (await liveavatar(sim, "start", bearer=full["session_token"]))["data"]
    assert full_started["ws_url"] is None
    await stop(sim, full)
    await stop(sim, data)
    status, body = await call(sim, "GET", path)  # the session is over
    assert status == 409 and body["message"] == "Session already stopped"


async def test_bad_input_gets_error_events_and_the_session_keeps_working(
        sim: SimClient, lite_clients: list[tuple[Lite, asyncio.Task[None]]]) -> None:
    data, started = await lite_session(sim)
    lite = await connect(sim, started["ws_url"], lite_clients)
    [state] = await lite.wait_for("session.state_updated")
    assert state["state"] == "connected"

    await lite.ws.send_str("not json")
    await lite.ws.send_bytes(b"\x00\x01")
    await lite.ws.send_str(json.dumps(["agent.speak"]))
    await lite.send("agent.dance")
    await lite.send("agent.speak", audio="@@not base64@@")
    await lite.send("agent.speak", audio=base64.b64encode(b"\x01\x02\x03").decode())  # odd
    await lite.send("agent.speak")  # no audio
    oversized = base64.b64encode(bytes(800_000)).decode()  # > 1 MiB once base64-encoded
    await lite.send("agent.speak", audio=oversized)
    errors = await lite.wait_for("error", 8)
    assert [e["error"]["code"] for e in errors] == [
        "invalid_json", "invalid_frame", "invalid_event", "unknown_event_type", "invalid_audio",
        "invalid_audio", "invalid_audio", "packet_too_large"]
    assert all(e["error"]["message"] for e in errors)
    assert not lite.of("agent.audio_buffer_appended")

    # ... and it still speaks.
    ids = await lite.speak(speech_pcm("Still here."))
    [started_event] = await lite.wait_for("agent.speak_started")
    [ended] = await lite.wait_for("agent.speak_ended")
    assert started_event["event_id"] == ended["event_id"] == ids[0]
    assert started_event["task"]["id"] == ended["task"]["id"]
    assert [e["event_id"] for e in lite.of("agent.audio_buffer_appended")] == ids[:-1]
    assert [e["event_id"] for e in lite.of("agent.audio_buffer_committed")] == ids[-1:]
    await lite.send("session.keep_alive")
    await stop(sim, data)
    await lite.closed.wait()
    states = [e["state"] for e in lite.of("session.state_updated")]
    assert states == ["connected", "closing", "closed"]
    assert lite.ws.close_code == 1000


async def test_a_new_connection_replaces_the_old_one(
        sim: SimClient, lite_clients: list[tuple[Lite, asyncio.Task[None]]]) -> None:
    data, started = await lite_session(sim)
    first = await connect(sim, started["ws_url"], lite_clients)
    await first.wait_for("session.state_updated")
    second = await connect(sim, started["ws_url"], lite_clients)
    await second.wait_for("session.state_updated")
    async with asyncio.timeout(TIMEOUT):
        await first.closed.wait()
    assert first.ws.close_code == 4001
    await second.speak(speech_pcm("Once more."))
    await second.wait_for("agent.speak_ended")
    await stop(sim, data)


async def test_ws_url_faults_apply(sim: SimClient) -> None:
    data, started = await lite_session(sim)
    await admin(sim, "POST", "/sim/faults", {"endpoint": "/v1/sessions/ws", "kind": "error",
                                              "status": 503, "times": 1,
                                              "session_id": data["session_id"]}, expect=201)
    path = started["ws_url"][started["ws_url"].index("/v1/"):]
    status, body = await call(sim, "GET", path)
    assert status == 503 and body["code"] == 5000
    ws = await sim.ws_connect(path)  # the fault was used up
    message = await ws.receive_json()
    assert message["type"] == "session.state_updated"
    await ws.close()
    await stop(sim, data)


# -- with media: a real livekit SDK client in the room -----------------------------------------


def mouth_box(sim: SimClient, session_id: str) -> tuple[int, int, int, int]:
    app = sim.app
    assert app is not None
    session = app[BOOK].get(session_id, LiveAvatarSession.provider)
    assert session is not None and session.room is not None and session.room.avatar is not None
    upstream = session.room.avatar._upstream
    assert upstream is not None and upstream.renderer is not None
    box: tuple[int, int, int, int] = upstream.renderer.mouth_box
    return box


async def watch_mouth(track: rtc.Track, box: tuple[int, int, int, int],
                      out: list[tuple[float, float]]) -> None:
    """(arrival time, mean brightness of the mouth box) per video frame."""
    loop = asyncio.get_running_loop()
    x, y, w, h = box
    stream = rtc.VideoStream(track, capacity=4)
    try:
        async for event in stream:
            frame = event.frame.convert(rtc.VideoBufferType.I420)
            luma = np.frombuffer(frame.data, dtype=np.uint8)[:frame.width * frame.height]
            plane = luma.reshape(frame.height, frame.width)
            out.append((loop.time(), float(plane[y:y + h, x:x + w].mean())))
    finally:
        await stream.aclose()


def window(samples: list[tuple[float, float]], start: float, end: float) -> list[float]:
    return [v for t, v in samples if start <= t <= end]


@needs_netns
async def test_streamed_speech_is_heard_and_lip_synced(
        sim: SimClient, sdk_clients: list[SdkClient],
        lite_clients: list[tuple[Lite, asyncio.Task[None]]]) -> None:
    data, started = await lite_session(sim)
    client = SdkClient(started["livekit_url"], started["livekit_client_token"])
    sdk_clients.append(client)
    await client.connect()
    await client.wait_for(lambda: "video" in client.tracks and client.audio.frames >= 25)
    mouth: list[tuple[float, float]] = []
    watcher = asyncio.get_running_loop().create_task(
        watch_mouth(client.tracks["video"], mouth_box(sim, data["session_id"]), mouth))
    try:
        lite = await connect(sim, started["ws_url"], lite_clients)
        await lite.wait_for("session.state_updated")
        await client.wait_for(lambda: len(mouth) >= 15)
        loop = asyncio.get_running_loop()
        idle_from = loop.time()
        await asyncio.sleep(0.5)
        idle_to = loop.time()

        pcm = speech_pcm()
        ids = await lite.speak(pcm)
        [began] = await lite.wait_for("agent.speak_started")
        speak_from = loop.time()
        [ended] = await lite.wait_for("agent.speak_ended")
        speak_to = loop.time()
        await client.wait_for(lambda: bool(mouth) and mouth[-1][0] > speak_to + 0.3)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)

    # One task for the whole stream, reported with the first chunk's event id.
    assert began["event_id"] == ended["event_id"] == ids[0]
    assert began["task"]["id"] == ended["task"]["id"]
    assert not lite.of("agent.speak_interrupted")
    assert len(lite.of("agent.audio_buffer_appended")) == len(ids) - 1 >= 3
    # It was heard: loud while speaking, and for about as long as the audio lasts.
    assert client.peak_rms(since=speak_from) > 1000.0
    loud = [t for t, rms in client.audio.rms if rms > 300.0 and t >= speak_from - 0.5]
    duration = len(pcm) / 2 / RATE
    assert loud and loud[-1] - loud[0] > 0.6 * duration, (duration, loud[:1], loud[-1:])
    # ... and seen: the mouth moves while the audio plays, and rests before.
    idle = window(mouth, idle_from, idle_to)
    talking = window(mouth, speak_from, speak_to)
    assert len(idle) >= 5 and len(talking) >= 15
    assert float(np.std(talking)) > 4 * max(float(np.std(idle)), 0.05), (np.std(idle),
                                                                         np.std(talking))
    await stop(sim, data)
    await lite.closed.wait()


@needs_netns
async def test_interrupt_cuts_the_speech(
        sim: SimClient, sdk_clients: list[SdkClient],
        lite_clients: list[tuple[Lite, asyncio.Task[None]]]) -> None:
    data, started = await lite_session(sim)
    client = SdkClient(started["livekit_url"], started["livekit_client_token"])
    sdk_clients.append(client)
    await client.connect()
    lite = await connect(sim, started["ws_url"], lite_clients)
    await lite.wait_for("session.state_updated")
    long_pcm = speech_pcm(" ".join([SENTENCE] * 3))
    # The web SDK's way: every chunk and the end share one event id.
    shared = str(uuid.uuid4())
    await lite.speak(long_pcm, event_id=shared)
    [began] = await lite.wait_for("agent.speak_started")
    assert began["event_id"] == shared
    cut = await lite.send("agent.interrupt")
    [interrupted] = await lite.wait_for("agent.speak_interrupted")
    [ended] = await lite.wait_for("agent.speak_ended")
    [cleared] = lite.of("agent.audio_buffer_cleared")
    assert cleared["event_id"] == cut
    assert interrupted["task"] == ended["task"] == began["task"]
    order = [e["type"] for e in lite.events]
    assert order.index("agent.speak_interrupted") < order.index("agent.speak_ended")
    loop = asyncio.get_running_loop()
    quiet_from = loop.time() + 0.5
    await client.wait_for(lambda: bool(client.audio.rms) and client.audio.rms[-1][0] > quiet_from + 1.0)
    assert client.peak_rms(since=quiet_from) < 100.0  # silence, though seconds were left

    # The next speech after an interrupt is a new task that plays to its end.
    await lite.speak(speech_pcm("Next."))
    await lite.wait_for("agent.speak_ended", 2)
    assert len(lite.of("agent.speak_interrupted")) == 1
    await stop(sim, data)
    rows = (await ledger_json(sim))["sessions"]
    assert [r["stop_reason"] for r in rows] == ["stopped"]
    assert math.isfinite(rows[0]["billed_seconds"])


# -- the avatar's side: LocalUpstream.speak_audio streams ----------------------------------------


class Sink:
    """A MediaSink that keeps the audio and the events."""

    video_wanted = False

    def __init__(self) -> None:
        self.audio: list[np.ndarray] = []
        self.events: list[tuple[str, str | None, int]] = []
        """(event type, task id, audio frames played when it fired)"""

    def on_video_frame(self, frame: av.VideoFrame) -> None:
        pass

    def on_audio_frame(self, frame: av.AudioFrame) -> None:
        self.audio.append(frame.to_ndarray().reshape(-1).copy())

    def on_event(self, event: Any) -> None:
        self.events.append((str(event.type), event.task_id, len(self.audio)))

    def on_upstream_ended(self, reason: str) -> None:
        raise AssertionError(reason)

    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.events]


def sine(seconds: float) -> bytes:
    n = np.arange(int(seconds * RATE))
    return (0.3 * 32767 * np.sin(2 * np.pi * 220 * n / RATE)).astype("<i2").tobytes()


async def until(condition: Any) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            await asyncio.sleep(0.02)


async def test_streamed_chunks_play_gap_free_as_one_task() -> None:
    from gateway.config import QUALITY_TIERS
    from gateway.errors import BadRequest, Conflict
    from gateway.upstream.local import LocalUpstream

    upstream = LocalUpstream(QUALITY_TIERS["low"], SpeechSynthesizer("en-us"))
    sink = Sink()
    await upstream.start(sink)
    try:
        first = await upstream.speak_audio(sine(0.6), RATE, final=False)
        for _ in range(2):
            again = await upstream.speak_audio(sine(1.0), RATE, task_id=first.task_id, final=False)
            assert again.task_id == first.task_id
        # An underrun: the stream plays out what it has and waits, its task still open.
        await until(lambda: "avatar_start_talking" in sink.kinds())
        start_frame = sink.events[0][2]
        await until(lambda: len(sink.audio) > start_frame + int(2.6 * 50) + 25)
        assert "avatar_stop_talking" not in sink.kinds()
        await upstream.speak_audio(sine(0.5), RATE, task_id=first.task_id, final=False)
        await upstream.end_audio(first.task_id)
        await until(lambda: "avatar_stop_talking" in sink.kinds())
        assert sink.kinds() == ["avatar_start_talking", "avatar_stop_talking"]
        assert {task for _, task, _ in sink.events} == {first.task_id}
        with pytest.raises(Conflict):  # the stream is over
            await upstream.speak_audio(sine(0.1), RATE, task_id=first.task_id)
        with pytest.raises(BadRequest):
            await upstream.speak_audio(b"\x00", RATE)

        played = np.concatenate(sink.audio[start_frame - 1:sink.events[-1][2]])
        loud = np.flatnonzero(np.abs(played) > 1000)
        # The first 2.6 s (sent ahead of playback) are one gap-free run of 48 kHz audio.
        first_run = played[loud[0]:loud[0] + int(2.6 * 48_000) - 200]
        silent = np.abs(first_run) < 50
        longest, run = 0, 0
        for quiet in silent[::12]:  # 0.25 ms steps: a 220 Hz sine is never quiet that long
            run = run + 1 if quiet else 0
            longest = max(longest, run)
        assert longest < 4, longest
        # All of it played: 3.1 s of audio in 20 ms frames, give or take the edge frames.
        blocks = played[:len(played) // 960 * 960].reshape(-1, 960).astype(np.float64)
        sounding = int((np.sqrt((blocks ** 2).mean(axis=1)) > 1000).sum())
        assert abs(sounding - 155) <= 3, sounding
    finally:
        await upstream.stop()
