"""The ``livekit`` distribution in real Chromium: the gateway's JS SDK with
``transport: "livekit"`` and livekit-client (npm, its UMD build as shipped) watch a session
through the operator's LiveKit (the simulator's), with the same events as over WHEP."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from playwright.async_api import Browser

from gateway.api.common import SESSIONS

from .livekit_rig import (
    CONTROLLER,
    OperatorLiveKit,
    livekit_gateway,
    livekit_session,
    operator_livekit,
)
from .provider_js import installed_file, installed_version
from .test_browser import ARTIFACTS, Tab, browser, chromium, needs_chromium, speech_wav

Client = TestClient[Any, Any]
__all__ = ["browser", "livekit_gateway", "operator_livekit"]  # fixtures

LIVEKIT_CLIENT = "2.15.7"  # what tests/js/package-lock.json pins (through the HeyGen SDKs)

WATCH = """async ([sessionId, token]) => {
  const sdk = await import('/web/sdk/index.js');
  const seen = window.seen = {events: [], ready: false, disconnected: null, rtp: []};
  const avatar = window.avatar = new sdk.default({
    basePath: location.origin, token, transport: 'livekit', livekit: window.LivekitClient,
    sessionId});
  for (const type of Object.values(sdk.StreamingEvents)) {
    avatar.on(type, (e) => seen.events.push({type, detail: e.detail}));
  }
  avatar.on(sdk.StreamingEvents.STREAM_READY, (e) => {
    seen.ready = true;
    const video = document.createElement('video');
    video.id = 'lk-video'; video.muted = true; video.autoplay = true; video.playsInline = true;
    video.srcObject = e.detail;
    document.body.appendChild(video);
    const onFrame = (now, meta) => {
      seen.rtp.push(meta.rtpTimestamp);
      video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
  });
  avatar.on(sdk.StreamingEvents.STREAM_DISCONNECTED, (e) => seen.disconnected = e.detail);
  await avatar.startSession();
}"""


@needs_chromium
async def test_livekit_client_in_chromium_watches_through_the_operators_room(
        livekit_gateway: Client, operator_livekit: OperatorLiveKit, browser: Browser) -> None:
    assert installed_version("livekit-client") == LIVEKIT_CLIENT
    umd = installed_file("livekit-client", "dist/livekit-client.umd.js")
    gateway = livekit_gateway
    session = await livekit_session(gateway)
    page = await browser.new_page()
    tab = Tab(page, "livekit", ARTIFACTS / "screenshots" / "livekit-browser")
    try:
        await page.goto(str(gateway.make_url("/web/viewer.html")))
        await page.add_script_tag(path=str(umd))
        minted = await gateway.post("/v1/tokens", json={"role": "viewer",
                                                        "session_id": session["id"]})
        await page.evaluate(WATCH, [session["id"], (await minted.json())["token"]])
        await tab.wait("() => window.seen.ready && window.seen.rtp.length >= 60", timeout=60)
        await tab.shot("playing")
        size = await page.evaluate(
            "() => [document.getElementById('lk-video').videoWidth,"
            " document.getElementById('lk-video').videoHeight]")
        assert size == [640, 360]

        spoken = await gateway.post(f"/v1/sessions/{session['id']}/speak",
                                    json={"text": "Hello, browser.", "task_type": "repeat"})
        task_id = (await spoken.json())["task_id"]
        await tab.wait(f"() => window.seen.events.some(e => e.type === 'avatar_stop_talking'"
                       f" && e.detail.task_id === '{task_id}')")
        kinds = await page.evaluate(
            f"() => window.seen.events.filter(e => e.detail && e.detail.task_id === '{task_id}')"
            ".map(e => e.type)")
        assert kinds[0] == "avatar_start_talking" and kinds[-1] == "avatar_stop_talking"
        # The stream's own clock: 90 kHz RTP timestamps of the frames Chromium rendered.
        rtp = await page.evaluate("() => window.seen.rtp.slice(-60)")
        rate = (len(rtp) - 1) / ((rtp[-1] - rtp[0]) / 90_000)
        print(f"livekit-client in Chromium: {rate:.1f} fps over the last {len(rtp)} frames")
        assert rate > 0

        # The session ends: the page is told.
        assert (await gateway.delete(f"/v1/sessions/{session['id']}")).status == 200
        await tab.wait("() => window.seen.disconnected !== null")
        await tab.shot("ended")
        assert tab.errors == []
    finally:
        await page.close()
    async with asyncio.timeout(20):
        while any(room.clients for room in operator_livekit.server.rooms):
            await asyncio.sleep(0.05)


TALK = """async ([token]) => {
  const sdk = await import('/web/sdk/index.js');
  const seen = window.seen = {events: []};
  const avatar = window.avatar = new sdk.default({
    basePath: location.origin, token, transport: 'livekit', livekit: window.LivekitClient});
  for (const type of Object.values(sdk.StreamingEvents)) {
    avatar.on(type, (e) => seen.events.push({type, detail: e.detail}));
  }
  const info = await avatar.createStartAvatar({quality: 'low'});
  await avatar.startListening();
  await avatar.startVoiceChat();
  return info.session_id;
}"""


@needs_chromium
async def test_voice_chat_over_livekit_in_chromium(livekit_gateway: Client, tmp_path: Path,
                                                   operator_livekit: OperatorLiveKit) -> None:
    # Chromium's fake microphone asks a question; the SDK publishes it into the room with
    # the controller's token, the gateway hears it, and the avatar's ears answer with events.
    wav = tmp_path / "question.wav"
    speech_wav(wav, "Hello. What is your name?")
    flags = ("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
             f"--use-file-for-fake-audio-capture={wav}%noloop")
    umd = installed_file("livekit-client", "dist/livekit-client.umd.js")
    async with chromium(*flags) as browser:
        page = await browser.new_page()
        tab = Tab(page, "voice", ARTIFACTS / "screenshots" / "livekit-browser")
        await page.goto(str(livekit_gateway.make_url("/web/viewer.html")))
        await page.add_script_tag(path=str(umd))
        session_id = await page.evaluate(TALK, [CONTROLLER])
        session = livekit_gateway.app[SESSIONS].get(session_id)
        assert session.distribution == "livekit"
        await tab.wait("() => window.seen.events.some(e => e.type === 'user_start')", timeout=40)
        await tab.wait("() => window.seen.events.some(e => e.type === 'user_end_message')",
                       timeout=40)
        await page.evaluate("() => window.avatar.stopAvatar()")
        assert not tab.errors, tab.errors
    async with asyncio.timeout(20):
        while any(room.clients for room in operator_livekit.server.rooms):
            await asyncio.sleep(0.05)
