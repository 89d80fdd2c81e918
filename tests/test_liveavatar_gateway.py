"""The gateway's LiveAvatar upstream, FULL and LITE, against the simulator, end to end: REST →
LiveKit room (real livekit SDK) → encode-once hub → three aiortc viewers. In LITE mode the
gateway's own voice goes over the session's websocket and the simulator's avatar lip-syncs it.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from livekit import rtc
from pytest_aiohttp import AiohttpServer

from gateway.avatar import FaceRenderer, SpeechSynthesizer
from gateway.sim.app import BOOK, LIVEKIT
from gateway.sim.room import Room
from gateway.sim.sessions import Provider
from gateway.upstream.liveavatar import LiveAvatarUpstream
from gateway.upstream.liveavatar_lite import LiveAvatarLiteUpstream
from gateway.upstream.speech import resample

from .cloud_rig import Rig
from .conftest import IN_NETNS
from .rtc_client import WhepViewer

pytestmark = pytest.mark.skipif(
    not IN_NETNS, reason="the livekit SDK needs the private network namespace (tests/netns.sh)")

TEXT = "Mama made a lovely apple pie, but papa ate it all before the party."
MOUTH_BOX = FaceRenderer(640, 360).mouth_box  # the simulator's avatar is the local one
DARK = 70  # luma below this inside the mouth box is the open mouth's interior
LITE = {"liveavatar_mode": "lite"}
OPENAI_VOICE = "openai-voice"


@pytest.fixture
def gateway_overrides(request: pytest.FixtureRequest,
                      speech_api: tuple[FakeSpeechApi, str]) -> dict[str, Any]:
    """The rig's gateway settings: FULL by default; ``LITE``; or ``OPENAI_VOICE`` (LITE with
    OpenAI's speech API, here a fake one on loopback)."""
    param = getattr(request, "param", {})
    if param == OPENAI_VOICE:
        return {**LITE, "tts": "openai", "openai_api_key": "sk-test-speech",
                "openai_base_url": speech_api[1], "openai_tts_voice": "nova"}
    overrides: dict[str, Any] = param
    return overrides


async def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


def kinds(viewer: WhepViewer, task_id: str) -> list[str]:
    return [e["type"] for e in viewer.received.events if e.get("task_id") == task_id]


MAX_LAG = 1.0
"""How far the lip-sync search looks: wider than MAX_SKEW, so an offset beyond it is found (and
fails) rather than hidden behind a poor correlation."""
MAX_SKEW = 0.4
"""Largest offset of sound and mouth the tests accept, in seconds."""


def lip_sync(viewer: WhepViewer, start: float, end: float) -> tuple[float, float]:
    """How well the mouth follows the sound a viewer received in [start, end] (when it read
    them): the correlation of the mouth's openness (dark pixels in the mouth box) with the
    audio's loudness around each video frame, at the best lag within ±MAX_LAG. Returns
    (correlation, lag in seconds; positive: the mouth moves after the sound).

    Frames are placed on the gateway's timeline, by their RTP timestamps and the gateway's
    sender reports, as a browser presents them; not at the moment this test peer read them.
    Three aiortc peers that share one busy process with the gateway and the simulator read
    their packets in bursts, up to seconds late and some dropped (a 0.4 s stall of the loop
    piled ~2 s into their receive queues), which smeared an arrival-clock measurement into a
    meaningless best lag (-1.2 s at r=0.32). Audio lost on the way leaves a gap, not silence:
    frames with no audio around them don't count. Sound and mouth leave the gateway within
    ~30 ms of each other (it holds the video for the audio's jitter buffer, see
    ``RoomLink._watch_sync``)."""
    received = viewer.received
    video = []
    for sample in received.video:
        if start <= sample.arrival <= end and sample.mouth is not None and sample.pts is not None:
            sent = received.sender_time("video", sample.pts, sample.arrival)
            if sent is not None:
                video.append((sent, float((sample.mouth < DARK).mean())))
    audio = []
    for (arrival, rms), pts in zip(received.audio_rms, received.audio_pts, strict=True):
        if start - MAX_LAG - 0.5 <= arrival <= end + MAX_LAG + 0.5 and pts is not None:
            sent = received.sender_time("audio", pts, arrival)
            if sent is not None:
                audio.append((sent, rms))
    assert len(video) > 60 and audio, (len(video), len(audio))
    times = np.array([t for t, _ in video])
    openness = np.array([o for _, o in video])
    audio_t = np.array([t for t, _ in audio])
    audio_rms = np.array([rms for _, rms in audio])
    step = float(np.median(np.diff(times)))

    def loudness(shift: float) -> np.ndarray:
        out = []
        for t in times + shift:
            window = audio_rms[(audio_t > t - 0.04) & (audio_t <= t + 0.04)]
            out.append(float(window.mean()) if window.size else np.nan)
        return np.array(out)

    by_lag = {}
    for k in range(-int(MAX_LAG / step), int(MAX_LAG / step) + 1):
        loud = loudness(-k * step)
        heard = ~np.isnan(loud)
        if heard.sum() > 60 and loud[heard].std() > 0 and openness[heard].std() > 0:
            by_lag[k * step] = float(np.corrcoef(openness[heard], loud[heard])[0, 1])
    best = max(by_lag, key=lambda lag: by_lag[lag])
    return by_lag[best], best


async def speak_to_three_viewers(rig: Rig, created: dict[str, Any], text: str
                                 ) -> tuple[list[WhepViewer], str, list[tuple[float, float]]]:
    """Three viewers watch; ``text`` is repeated; returns them once all saw it end, the task
    id and each viewer's lip-sync (correlation, lag)."""
    viewers = [WhepViewer(rig.gateway, created["id"], mouth_box=MOUTH_BOX) for _ in range(3)]
    try:
        await asyncio.gather(*(v.connect() for v in viewers))
        async with asyncio.timeout(30):
            await asyncio.gather(*(v.first_frame.wait() for v in viewers))
        await asyncio.sleep(1.0)  # some silence first: a closed mouth with no sound
        loop = asyncio.get_running_loop()
        began = loop.time()
        response = await rig.gateway.post(f"/v1/sessions/{created['id']}/speak",
                                          json={"text": text, "task_type": "repeat"})
        task = await response.json()
        assert response.status == 200, task
        task_id: str = task["task_id"]
        await wait_for(lambda: all("avatar_stop_talking" in kinds(v, task_id) for v in viewers),
                       timeout=task["duration_ms"] / 1000 + 30)
        await asyncio.sleep(1.0)  # the last syllables' media is still on its way
        ended = loop.time()
    except BaseException:  # the caller closes them only if they are returned
        await asyncio.gather(*(v.close() for v in viewers))
        raise
    return viewers, task_id, [lip_sync(v, began, ended) for v in viewers]


def check_spoken(viewer: WhepViewer, task_id: str, text: str | None) -> None:
    events = kinds(viewer, task_id)
    assert events[0] == "avatar_start_talking", events
    assert events[-2:] == ["avatar_end_message", "avatar_stop_talking"], events
    if text is not None:  # the gateway spoke it (LITE): every word, in order
        assert set(events[1:-2]) == {"avatar_talking_message"}
        words = "".join(e["message"] for e in viewer.received.events
                        if e.get("task_id") == task_id and e["type"] == "avatar_talking_message")
        assert words == text
    assert {(s.width, s.height) for s in viewer.received.video} == {(640, 360)}
    assert max(rms for _, rms in viewer.received.audio_rms) > 500  # the avatar was heard


def sim_room(rig: Rig, provider_id: str) -> Room:
    session = rig.sim.app[BOOK].get(provider_id, Provider.LIVEAVATAR)
    assert session is not None and session.room is not None
    return session.room


def jwt_subject(token: str) -> str:
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    subject: str = claims["sub"]
    return subject


# -- FULL ----------------------------------------------------------------------------------------


async def test_full_mode_three_viewers_see_the_lips_follow_the_voice(rig: Rig) -> None:
    created = await rig.create("liveavatar")
    upstream = rig.session(created["id"]).upstream
    assert type(upstream) is LiveAvatarUpstream and upstream.answers_itself
    viewers, task_id, sync = await speak_to_three_viewers(rig, created, TEXT)
    try:
        for viewer, (corr, lag) in zip(viewers, sync, strict=True):
            check_spoken(viewer, task_id, None)
            assert abs(lag) <= MAX_SKEW, sync
            # FULL: the avatar shapes its mouth from the text's phonemes (visemes), which
            # follow the loudness less closely than LITE's audio-driven lips (~0.5 here).
            assert corr > 0.3, sync
        print(f"FULL lip/audio correlation per viewer (corr, lag s): {sync}")
    finally:
        await asyncio.gather(*(v.close() for v in viewers))
    assert (await rig.gateway.delete(f"/v1/sessions/{created['id']}")).status == 200
    assert rig.open_sessions() == 0


async def test_full_mode_joins_as_the_client_and_takes_events_from_the_agent(rig: Rig) -> None:
    created = await rig.create("liveavatar")
    provider_id = rig.provider_id(created["id"])
    session = rig.session(created["id"])
    upstream = session.upstream
    assert isinstance(upstream, LiveAvatarUpstream) and upstream.link is not None
    credentials = upstream._credentials
    assert credentials is not None
    # The identity the provider's client token names (what its web SDK joins as), not the
    # agent's: a duplicate identity would kick the provider's own participant out.
    identity = upstream.link.identity
    assert identity == jwt_subject(credentials.token)
    agent = f"liveavatar-agent-{provider_id}"
    room = sim_room(rig, provider_id)
    assert identity in room.clients and identity not in (agent, "heygen")
    room.add_agent(agent)

    def response(event_type: str, source: str, **data: Any) -> bytes:
        return json.dumps({"event_id": "e-" + source, "event_type": event_type,
                           "session_id": provider_id, "source_event_id": source,
                           **data}).encode()

    def logged(task_id: str) -> list[str]:
        return [item.event.type for item in session.events._history
                if item.event.task_id == task_id]

    # Another client in the room (a real LiveKit participant) must not pass for the avatar.
    senders: list[str] = []  # what reached the gateway's room, before its filter
    upstream.link._room.on("data_received", lambda packet: senders.append(
        packet.participant.identity if packet.participant else ""))
    intruder = rtc.Room()
    token = rig.sim.app[LIVEKIT].token("intruder", room.name)
    await intruder.connect(credentials.url, token)
    try:
        await intruder.local_participant.publish_data(
            response("avatar.speak_started", "from-intruder"), topic="agent-response")
        await room.send_data(response("avatar.speak_started", "from-agent"),
                             topic="agent-response", sender=agent)
        await room.send_data(response("avatar.transcription", "from-agent", text="Hi."),
                             topic="agent-response", sender=agent)
        await wait_for(lambda: "avatar_talking_message" in logged("from-agent"))
        assert logged("from-agent") == ["avatar_start_talking", "avatar_talking_message"]
        await intruder.local_participant.publish_data(
            response("avatar.speak_ended", "from-intruder"), topic="agent-response")
        await room.send_data(response("avatar.speak_ended", "from-agent"),
                             topic="agent-response", sender=agent)
        await wait_for(lambda: "avatar_stop_talking" in logged("from-agent"))
        assert logged("from-intruder") == [] and senders.count("intruder") == 2, senders
    finally:
        await intruder.disconnect()
    # The agent says the session is over: it ends at once, with the provider's reason.
    await room.send_data(response("session.stopped", "bye", stop_reason="MAX_DURATION"),
                         topic="agent-response", sender=agent)
    await wait_for(lambda: session.state == "closed")
    ended = [item.event for item in session.events._history
             if item.event.type == "stream_disconnected"]
    assert ended and "MAX_DURATION" in ended[0].data["reason"], ended
    await wait_for(lambda: rig.open_sessions() == 0)


# -- LITE ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("gateway_overrides", [LITE], indirect=True)
async def test_lite_mode_the_gateway_speaks_and_the_lips_follow(rig: Rig) -> None:
    catalog = await (await rig.gateway.get("/v1/catalog")).json()
    entry = next(u for u in catalog["upstreams"] if u["kind"] == "liveavatar")
    assert entry["mode"] == "lite" and entry["answers_itself"] is False and entry["listens"] is False
    created = await rig.create("liveavatar")
    url = f"/v1/sessions/{created['id']}"
    upstream = rig.session(created["id"]).upstream
    assert isinstance(upstream, LiveAvatarLiteUpstream) and upstream.voice.engine == "espeak"
    viewers, task_id, sync = await speak_to_three_viewers(rig, created, TEXT)
    try:
        for viewer, (corr, lag) in zip(viewers, sync, strict=True):
            check_spoken(viewer, task_id, TEXT)
            assert corr > 0.5 and abs(lag) <= MAX_SKEW, sync
        print(f"LITE (eSpeak) lip/audio correlation per viewer (corr, lag s): {sync}")
        # talk: no language model at the provider in LITE; the gateway's chat answers.
        talk = await rig.gateway.post(f"{url}/speak", json={"text": "Where did you study?",
                                                            "task_type": "talk"})
        answer = await talk.json()
        assert talk.status == 200 and answer["task_ids"] and answer["text"], answer
        last = answer["task_ids"][-1]
        await wait_for(lambda: "avatar_stop_talking" in kinds(viewers[0], last), timeout=60)
        for spoken in answer["task_ids"]:
            check_spoken(viewers[0], spoken, None)
        # Barge in on a long utterance: it ends at once, and what waited is dropped.
        long = await (await rig.gateway.post(f"{url}/speak", json={"text": TEXT * 4})).json()
        queued = await (await rig.gateway.post(f"{url}/speak", json={"text": TEXT})).json()
        await wait_for(lambda: "avatar_talking_message" in kinds(viewers[0], long["task_id"]))
        assert (await rig.gateway.post(f"{url}/interrupt")).status == 200
        await wait_for(lambda: "avatar_stop_talking" in kinds(viewers[0], long["task_id"]))
        stop = next(e for e in viewers[0].received.events
                    if e.get("task_id") == long["task_id"] and e["type"] == "avatar_stop_talking")
        assert stop["duration_ms"] < long["duration_ms"]
        assert (await rig.gateway.post(f"{url}/keep-alive")).status == 200
        await asyncio.sleep(1.0)
        assert kinds(viewers[0], queued["task_id"]) == []
    finally:
        await asyncio.gather(*(v.close() for v in viewers))
    assert (await rig.gateway.delete(url)).status == 200
    assert rig.open_sessions() == 0
    # Nothing of the session lives on: its player, socket reader and keep-alive are gone.
    await wait_for(lambda: not [t for t in asyncio.all_tasks()
                                if t.get_name().startswith("liveavatar-lite")])


@pytest.mark.parametrize("gateway_overrides", [LITE], indirect=True)
async def test_lite_mode_a_dropped_socket_is_rejoined(rig: Rig) -> None:
    created = await rig.create("liveavatar")
    session = rig.session(created["id"])
    upstream = session.upstream
    assert isinstance(upstream, LiveAvatarLiteUpstream)
    credentials = upstream._credentials
    assert credentials is not None and credentials.ws_url
    viewer = WhepViewer(rig.gateway, created["id"])
    try:
        await viewer.connect()

        def states() -> list[str]:
            return [str(item.event.data["state"]) for item in session.events._history
                    if item.event.type == "session_state"]

        # A second connection replaces the gateway's (LiveAvatar keeps one per session): for
        # the gateway its socket dropped.
        async with aiohttp.ClientSession() as http, http.ws_connect(credentials.ws_url):
            await wait_for(lambda: "reconnecting" in states())
        await wait_for(lambda: states()[-1:] == ["live"])
        response = await rig.gateway.post(f"/v1/sessions/{created['id']}/speak",
                                          json={"text": "Back again."})
        task = await response.json()
        assert response.status == 200, task
        await wait_for(lambda: "avatar_stop_talking" in kinds(viewer, task["task_id"]))
        assert upstream.reconnects == 1 and rig.open_sessions() == 1
    finally:
        await viewer.close()
    assert (await rig.gateway.delete(f"/v1/sessions/{created['id']}")).status == 200


@pytest.mark.parametrize("gateway_overrides", [LITE], indirect=True)
async def test_lite_mode_ends_when_the_provider_closes_the_session(rig: Rig) -> None:
    created = await rig.create("liveavatar")
    session = rig.session(created["id"])
    await rig.admin("POST", f"/sim/sessions/{rig.provider_id(created['id'])}/expire")
    await wait_for(lambda: session.state == "closed", timeout=15)
    assert session.close_reason == "upstream_ended"
    assert (await rig.gateway.get(f"/v1/sessions/{created['id']}")).status == 404
    assert rig.open_sessions() == 0


# -- LITE with OpenAI's voice --------------------------------------------------------------------


class FakeSpeechApi:
    """OpenAI's ``/v1/audio/speech`` on loopback: real speech (eSpeak NG) as raw 24 kHz PCM,
    what ``response_format="pcm"`` returns."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self._synthesizer = SpeechSynthesizer("en-gb")

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        if request.headers.get("Authorization") != "Bearer sk-test-speech":
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        utterance = await asyncio.get_running_loop().run_in_executor(
            None, self._synthesizer.synthesize, body["input"])
        return web.Response(body=resample(utterance.pcm, utterance.sample_rate),
                            content_type="application/octet-stream")


@pytest.fixture
async def speech_api(aiohttp_server: AiohttpServer) -> AsyncIterator[tuple[FakeSpeechApi, str]]:
    fake = FakeSpeechApi()
    app = web.Application()
    app.router.add_post("/v1/audio/speech", fake.handle)
    server: TestServer = await aiohttp_server(app)
    yield fake, str(server.make_url("/v1"))


@pytest.mark.parametrize("gateway_overrides", [OPENAI_VOICE], indirect=True)
async def test_lite_mode_with_openais_voice(rig: Rig, speech_api: tuple[FakeSpeechApi, str]
                                            ) -> None:
    created = await rig.create("liveavatar")
    upstream = rig.session(created["id"]).upstream
    assert isinstance(upstream, LiveAvatarLiteUpstream) and upstream.voice.engine == "openai"
    viewers, task_id, sync = await speak_to_three_viewers(rig, created, TEXT)
    try:
        fake, _ = speech_api
        assert fake.requests[-1] == {"model": "gpt-4o-mini-tts", "voice": "nova", "input": TEXT,
                                     "response_format": "pcm"}
        for viewer, (corr, lag) in zip(viewers, sync, strict=True):
            check_spoken(viewer, task_id, TEXT)
            assert corr > 0.5 and abs(lag) <= MAX_SKEW, sync
        print(f"LITE (OpenAI voice) lip/audio correlation per viewer (corr, lag s): {sync}")
    finally:
        await asyncio.gather(*(v.close() for v in viewers))
    assert (await rig.gateway.delete(f"/v1/sessions/{created['id']}")).status == 200
    assert rig.open_sessions() == 0
