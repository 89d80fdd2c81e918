"""HeyGen's own browser SDK, ``@heygen/streaming-avatar`` 2.0.16, unmodified, in real Chromium
against the simulator: the proof that the simulator's HeyGen is the one the SDK expects.

The SDK (bundled from npm by ``tests/provider_js.py``, no shims) always opens its chat socket
at ``wss://<basePath host>/v1/ws/streaming.chat`` on port 443, so the simulator serves TLS on
443 of the test namespace's address (self-signed; Chromium runs with
``--ignore-certificate-errors``); the page comes from another origin (HTTPS on another port:
``getUserMedia`` needs a secure context). The microphone is Chromium's fake capture device
playing a WAV of eSpeak saying :data:`PHRASE`, heard by the simulator's offline recognizer.
"""

from __future__ import annotations

import asyncio
import os
import wave
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from gateway.avatar import SpeechSynthesizer
from gateway.sim.app import create_sim_app
from gateway.sim.config import SimSettings
from gateway.sim.heygen_tls import server_context
from gateway.sim.ledger import Ledger
from tests.provider_js import ProviderJsUnavailable, bundle, installed_version
from tests.test_browser import chromium, needs_chromium

ADDRESS = "10.203.0.1"
"""The test namespace's own address (tests/netns.sh)."""
BASE = f"https://{ADDRESS}"
PAGE_PORT = 8443
HEYGEN_KEY = "sim-heygen-key"
PHRASE = "one two three four five"
"""PocketSphinx hears eSpeak's rendering as "well two three four five" (tests/test_local_listening.py)."""
SDK_SEND_AFTER_CLOSE = "WebSocket is already in CLOSING or CLOSED state."
"""What Chromium logs when a page sends on a closed WebSocket."""
AVATAR_EVENTS = ["avatar_start_talking", "avatar_talking_message", "avatar_end_message",
                 "avatar_stop_talking"]

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>streaming-avatar 2.0.16</title>
<link rel="icon" href="data:,">
<script src="/sdk.js"></script></head>
<body><video id="avatar" autoplay playsinline muted></video></body></html>"""

START = """async ({token, basePath, transport}) => {
  const sdk = window.StreamingAvatarSDK;
  const StreamingAvatar = sdk.default;
  const avatar = new StreamingAvatar({token, basePath});
  window.avatar = avatar;
  window.events = [];
  for (const name of Object.values(sdk.StreamingEvents)) {
    avatar.on(name, (e) => {
      const detail = name === sdk.StreamingEvents.STREAM_READY ? null : e.detail;
      window.events.push({name, detail: JSON.parse(JSON.stringify(detail ?? null))});
      if (name === sdk.StreamingEvents.STREAM_READY) {
        document.getElementById("avatar").srcObject = e.detail;
      }
    });
  }
  const info = await avatar.createStartAvatar({
    avatarName: "ada", quality: sdk.AvatarQuality.Low, voiceChatTransport: transport});
  return {session_id: info.session_id, transport: avatar.isLiveKitTransport ? "livekit" : "websocket",
          socket: avatar.webSocket ? avatar.webSocket.url : null};
}"""


def words(text: str) -> set[str]:
    return set(text.lower().replace(",", " ").replace(":", " ").split())


@pytest.fixture(scope="module")
def sdk_bundle() -> Path:
    try:
        path = bundle("streaming-avatar")
    except ProviderJsUnavailable as exc:
        if os.environ.get("CI") == "true":
            raise  # `make pytest` fetches it first (tests/prefetch.py); CI must run this test
        pytest.skip(str(exc))
    assert installed_version("@heygen/streaming-avatar") == "2.0.16"
    return path


@pytest.fixture
def speech_wav(tmp_path: Path) -> Path:
    """:data:`PHRASE` in eSpeak's voice, 48 kHz mono, between silences (Chromium loops it)."""
    pcm = SpeechSynthesizer("en-us").synthesize(PHRASE).pcm
    silence = np.zeros(48_000, dtype=np.int16)
    audio = np.concatenate([silence, pcm, silence, silence])
    path = tmp_path / "phrase.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(48_000)
        out.writeframes(audio.astype("<i2").tobytes())
    return path


@pytest.fixture
async def ledger() -> AsyncIterator[Ledger]:
    ledger = Ledger(":memory:")
    yield ledger
    ledger.close()


@pytest.fixture
async def simulator(ledger: Ledger, sdk_bundle: Path) -> AsyncIterator[None]:
    """The simulator on https://10.203.0.1 (443), the test page on https://10.203.0.1:8443."""
    tls = server_context(names=[ADDRESS])
    sim = web.AppRunner(create_sim_app(SimSettings.from_env({}), ledger=ledger))
    await sim.setup()
    script = await asyncio.to_thread(sdk_bundle.read_text)

    async def index(_: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def sdk(_: web.Request) -> web.Response:
        return web.Response(text=script, content_type="application/javascript")

    page_app = web.Application()
    page_app.router.add_get("/", index)
    page_app.router.add_get("/sdk.js", sdk)
    page = web.AppRunner(page_app)
    await page.setup()
    try:
        await web.TCPSite(sim, ADDRESS, 443, ssl_context=tls).start()
        await web.TCPSite(page, ADDRESS, PAGE_PORT, ssl_context=tls).start()
        yield
    finally:
        await page.cleanup()
        await sim.cleanup()


async def create_token() -> str:
    async with aiohttp.ClientSession() as http, http.post(
            f"{BASE}/v1/streaming.create_token", headers={"x-api-key": HEYGEN_KEY},
            ssl=False) as response:
        assert response.status == 200
        token: str = (await response.json())["data"]["token"]
    return token


async def wait_events(page: Any, expression: str, timeout: float = 60.0) -> None:
    await page.wait_for_function(f"() => {{ const events = window.events; return {expression}; }}",
                                 timeout=timeout * 1000)


def spoken(events: list[dict[str, Any]]) -> list[str]:
    """What the avatar said, per task, from its ``avatar_talking_message`` chunks."""
    out: dict[str, str] = {}
    for event in events:
        if event["name"] == "avatar_talking_message":
            task = event["detail"]["task_id"]
            out[task] = out.get(task, "") + event["detail"]["message"]
    return list(out.values())


async def transcripts(page: Any, good: Callable[[str], bool], timeout: float = 120.0) -> list[str]:
    """Every ``user_talking_message`` so far, once one of them is ``good``."""
    heard: list[str] = []
    async with asyncio.timeout(timeout):
        while not any(good(h) for h in heard):
            await asyncio.sleep(0.5)
            heard = [e["detail"]["message"] for e in await page.evaluate("() => window.events")
                     if e["name"] == "user_talking_message"]
    return heard


@needs_chromium
@pytest.mark.parametrize("transport", ["websocket", "livekit"])
async def test_the_official_sdk_starts_speaks_hears_and_stops(
        simulator: None, ledger: Ledger, speech_wav: Path, transport: str) -> None:
    flags = ["--ignore-certificate-errors", "--use-fake-device-for-media-stream",
             "--use-fake-ui-for-media-stream", f"--use-file-for-fake-audio-capture={speech_wav}"]
    async with chromium(*flags) as browser:
        page = await browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        await page.goto(f"https://{ADDRESS}:{PAGE_PORT}/")

        # createStartAvatar resolves: REST (CORS), the room, the chat socket on 443.
        started = await page.evaluate(START, {"token": await create_token(), "basePath": BASE,
                                              "transport": transport})
        assert started["transport"] == transport
        assert started["socket"].startswith(f"wss://{ADDRESS}/v1/ws/streaming.chat?session_id=")
        session_id = started["session_id"]
        [row] = ledger.entries(open_only=True)
        assert row.session_id == session_id and row.started_at is not None
        await wait_events(page, "events.some((e) => e.name === 'stream_ready')")
        await page.wait_for_function("() => document.getElementById('avatar').videoWidth > 0",
                                     timeout=60_000)

        # The default speak(): TALK + ASYNC, over the chat socket (websocket transport) or as
        # LiveKit data (livekit transport); the simulator answers it like a talk task.
        await page.evaluate("() => window.avatar.speak({text: 'Hello there'})")
        await wait_events(page, "events.some((e) => e.name === 'avatar_stop_talking')")
        events = await page.evaluate("() => window.events")
        names = [e["name"] for e in events if e["name"].startswith("avatar_")]
        assert sorted(set(names), key=names.index) == AVATAR_EVENTS, names
        assert names[0] == "avatar_start_talking" and names[-1] == "avatar_stop_talking"
        assert len({e["detail"]["task_id"] for e in events if e["name"].startswith("avatar_")}) == 1
        assert spoken(events) == ["You said: Hello there"]

        # Voice chat, without startListening: the fake microphone says PHRASE.
        await page.evaluate("() => window.avatar.startVoiceChat()")
        await wait_events(page, "events.some((e) => e.name === 'user_talking_message')", 90)
        events = await page.evaluate("() => window.events")
        user = [e["name"] for e in events if e["name"].startswith("user_")]
        # user_start/user_stop come over the chat socket, the transcript over LiveKit: only
        # the order within one utterance is certain (the looping WAV may start the next one).
        assert user[0] == "user_start" and user.index("user_stop") < user.index("user_talking_message"), user
        # Chromium loops the WAV; the avatar's answers make it deaf for a while, which can cut
        # an utterance short: some transcript, not necessarily the first, has the words.
        heard = await transcripts(page, lambda h: len(words(h) & words(PHRASE)) >= 2)
        # And the avatar answers what it heard, as in a real voice chat.
        async with asyncio.timeout(60):
            while not any(a.removeprefix("You said: ") in heard
                          for a in spoken(await page.evaluate("() => window.events"))[1:]):
                await asyncio.sleep(0.5)
                heard = await transcripts(page, lambda _: True)

        assert errors == []  # no failed request, CORS refusal or exception, from start on

        # stopAvatar: the session ends, nothing is left open.
        await page.evaluate("() => window.avatar.stopAvatar()")
        async with asyncio.timeout(30):
            while ledger.entries(open_only=True):
                await asyncio.sleep(0.1)
        [row] = ledger.entries()
        assert row.stop_reason == "stopped"
        # The SDK's own race, whatever the server does: stopAvatar() closes the chat socket it
        # opened while its WebSocketVoiceChat keeps a reference to it, and an onaudioprocess
        # event of the microphone's ScriptProcessor already queued still calls send() on it
        # (lib/index.esm.js, WebSocketVoiceChat._startVoiceChat and StreamingAvatar.stopAvatar).
        # Chromium logs that send; nothing else may fail.
        assert set(errors) <= {SDK_SEND_AFTER_CLOSE}, errors
