"""The demo page, the viewer page and the JS SDK in real headless Chromium (Debian's ``chromium``,
driven by Playwright). Screenshots of every step go to ``artifacts/screenshots/<test>/``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import wave
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import Browser, Page, async_playwright

from gateway.api.common import SESSIONS
from gateway.app import create_app
from gateway.avatar import SpeechSynthesizer
from gateway.upstream.local import LocalUpstream

from .conftest import IN_NETNS, ClientFactory, make_settings

Client = TestClient[Any, Any]
CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    # Offer the real host candidate (the test namespace's veth address), not an mDNS name.
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--autoplay-policy=no-user-gesture-required",
]
ARTIFACTS = Path(os.environ.get("AVATAR_GATEWAY_ARTIFACTS",
                                Path(__file__).resolve().parent.parent / "artifacts"))
REFERENCE = Path(__file__).resolve().parent / "data" / "streaming_avatar_reference.json"
SDK_TYPES = Path(__file__).resolve().parent.parent / "web" / "sdk" / "index.d.ts"

T = TypeVar("T", bound=Callable[..., Any])


def needs_chromium(test: T) -> T:
    # CI must run it; a developer without root may skip it.
    test = pytest.mark.skipif(not os.path.exists(CHROMIUM) and os.environ.get("CI") != "true",
                              reason="Debian chromium is not installed (make test installs it)")(test)
    # Chromium, like libwebrtc, never gathers loopback candidates.
    test = pytest.mark.skipif(not IN_NETNS,
                              reason="needs the private network namespace (tests/netns.sh)")(test)
    return test


@contextlib.asynccontextmanager
async def chromium(*extra_flags: str) -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        instance = await pw.chromium.launch(executable_path=CHROMIUM, args=[*FLAGS, *extra_flags])
        try:
            yield instance
        finally:
            await instance.close()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as instance:
        yield instance


class Tab:
    """A page that records every console error, page error and failed response."""

    def __init__(self, page: Page, name: str, shots: Path) -> None:
        self.page = page
        self.name = name
        self.shots = shots
        self.errors: list[str] = []
        self._step = 0
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("response",
                lambda r: self.errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)

    async def shot(self, step: str) -> None:
        self._step += 1
        self.shots.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=str(self.shots / f"{self.name}-{self._step:02d}-{step}.png"))

    async def wait(self, expression: str, timeout: float = 30.0) -> None:
        await self.page.wait_for_function(expression, timeout=timeout * 1000)

    async def text(self, selector: str) -> str:
        return await self.page.text_content(selector) or ""

    async def wait_text(self, selector: str, needle: str, count: int = 1, timeout: float = 30.0) -> None:
        await self.page.wait_for_function(
            "([s, n, c]) => (document.querySelector(s).textContent.split(n).length - 1) >= c",
            arg=[selector, needle, count], timeout=timeout * 1000)

    async def playing(self) -> tuple[int, int]:
        """Wait until the video plays, return its size."""
        await self.wait("() => { const v = document.getElementById('avatar');"
                        " return v.videoWidth > 0 && v.currentTime > 0.5; }")
        size = await self.page.evaluate(
            "() => [document.getElementById('avatar').videoWidth,"
            " document.getElementById('avatar').videoHeight]")
        return int(size[0]), int(size[1])

    async def frames_decoded(self, handle: str) -> tuple[int, str]:
        """framesDecoded and codec of the inbound video, from the SDK's peer connection."""
        result = await self.page.evaluate(
            """async (handle) => {
                 const pc = window[handle].avatar.peerConnection;
                 const report = await pc.getStats();
                 let frames = -1, codecId = null; const codecs = {};
                 report.forEach((s) => {
                   if (s.type === 'inbound-rtp' && s.kind === 'video') {
                     frames = s.framesDecoded; codecId = s.codecId; }
                   if (s.type === 'codec') codecs[s.id] = s.mimeType; });
                 return [frames, codecs[codecId] || ''];
               }""", handle)
        return int(result[0]), str(result[1])

    async def decoding(self, handle: str, frames: int = 15, timeout: float = 30.0) -> str:
        """Wait until ``frames`` more video frames were decoded; return the codec."""
        first, codec = await self.frames_decoded(handle)
        assert first > 0, first
        async with asyncio.timeout(timeout):
            while (await self.frames_decoded(handle))[0] < first + frames:
                await self.page.wait_for_timeout(100)
        return codec


def shots_for(request: pytest.FixtureRequest) -> Path:
    return ARTIFACTS / "screenshots" / re.sub(r"[^\w.-]+", "_", request.node.name)


async def open_demo(browser: Browser, client: Client, shots: Path, codec: str = "",
                    token: str = "") -> Tab:
    tab = Tab(await browser.new_page(viewport={"width": 1100, "height": 900}), "demo", shots)
    await tab.page.goto(str(client.make_url("/")) + (f"#token={token}" if token else ""))
    await tab.wait("() => document.getElementById('upstream').options.length > 0"
                   " && document.getElementById('status').textContent.includes('press New')")
    if codec:
        await tab.page.select_option("#codec", codec)
    return tab


async def new_and_start(tab: Tab, avatar: str = "ada") -> str:
    await tab.page.select_option("#avatar-id", avatar)
    await tab.page.select_option("#quality", "low")
    await tab.page.click("#new")
    await tab.wait_text("#status", "created")
    await tab.shot("created")
    await tab.page.click("#start")
    await tab.wait_text("#status", "streaming")
    session_id = await tab.page.evaluate("() => window.avatarDemo.avatar.sessionId")
    return str(session_id)


@needs_chromium
async def test_demo_page_new_start_repeat_talk_close(client: Client, browser: Browser,
                                                     request: pytest.FixtureRequest) -> None:
    tab = await open_demo(browser, client, shots_for(request))
    await tab.shot("loaded")
    avatars = await tab.page.eval_on_selector_all("#avatar-id option", "os => os.map(o => o.value)")
    assert avatars == ["ada", "ben", "cleo"]
    assert "en-us" in await tab.page.eval_on_selector_all("#voice option", "os => os.map(o => o.value)")

    session_id = await new_and_start(tab, avatar="ben")
    session = client.app[SESSIONS].get(session_id)
    assert isinstance(session.upstream, LocalUpstream) and session.upstream.renderer is not None
    assert session.upstream.renderer.look.id == "ben"

    # Playing: the <video> has the tier's size and getStats() shows frames decoded increasing.
    assert await tab.playing() == (640, 360)
    codec = await tab.decoding("avatarDemo")
    assert codec == "video/VP8"  # Chromium lists VP8 first
    await tab.wait_text("#stats", "fps")
    await tab.shot("playing")

    # Repeat: the avatar says the text; the event log and the transcript show it.
    await tab.page.fill("#text", "Hello from the browser test.")
    await tab.page.click("#repeat")
    await tab.wait_text("#events", "avatar_stop_talking")
    events = await tab.text("#events")
    assert "avatar_start_talking" in events and "avatar_talking_message" in events
    await tab.wait_text("#transcript", "Hello from the browser test.")
    await tab.shot("repeated")

    # Talk: the gateway's chat answers (offline responder) and the avatar speaks the answer.
    await tab.page.fill("#text", "What are you working on these days?")
    await tab.page.click("#talk")
    await tab.wait_text("#events", "answer:")
    await tab.wait_text("#events", "avatar_stop_talking", count=2)
    transcript = await tab.text("#transcript")
    assert transcript.count("Avatar:") >= 2
    await tab.shot("talked")

    # On a phone's screen: one column, nothing wider than the screen.
    await tab.page.set_viewport_size({"width": 390, "height": 844})
    assert await tab.page.evaluate("() => document.documentElement.scrollWidth <= innerWidth")
    await tab.shot("phone")

    # The share link opens the viewer page for this very session.
    share = await tab.page.get_attribute("#share", "href")
    assert share is not None and share.endswith(f"/web/viewer.html?session={session_id}")

    # Close ends the session on the server (not only the browser's peer connection).
    await tab.page.click("#close")
    await tab.wait_text("#status", "idle")
    await tab.wait_text("#events", f"session {session_id} closed")
    await tab.shot("closed")
    assert client.app[SESSIONS].list() == []
    assert session.close_reason == "deleted"
    assert not tab.errors, tab.errors


@needs_chromium
@pytest.mark.parametrize("settings", ["two-workers"], indirect=True)
async def test_three_tabs_watch_the_same_session(client: Client, browser: Browser,
                                                 request: pytest.FixtureRequest) -> None:
    shots = shots_for(request)
    demo = await open_demo(browser, client, shots)
    session_id = await new_and_start(demo)
    assert await demo.playing() == (640, 360)
    share = await demo.page.get_attribute("#share", "href")
    assert share is not None

    viewers = []
    for index in range(3):
        viewer = Tab(await browser.new_page(viewport={"width": 390, "height": 844}),  # a phone
                     f"viewer{index + 1}", shots)
        await viewer.page.goto(share)
        viewers.append(viewer)
    for viewer in viewers:
        assert await viewer.playing() == (640, 360)
        await viewer.wait_text("#status", f"watching session {session_id[:8]}")
    session = client.app[SESSIONS].get(session_id)
    assert session.viewer_count == 4  # the demo tab and three viewer tabs
    for viewer in viewers:
        first, _codec = await viewer.frames_decoded("avatarViewer")
        assert first > 0

    # The controller speaks; every viewer tab sees the events and the transcript.
    await demo.page.fill("#text", "Three tabs, one stream.")
    await demo.page.click("#repeat")
    for tab in (demo, *viewers):
        await tab.wait_text("#events", "avatar_stop_talking")
        await tab.wait_text("#transcript", "Three tabs, one stream.")
        await tab.shot("spoke")

    # A viewer tab leaving does not end the session; the controller's Close does, for all.
    await viewers[0].page.close()
    async with asyncio.timeout(30):
        while session.viewer_count != 3:
            await demo.page.wait_for_timeout(100)
    assert session.viewer_count == 3 and session.close_reason is None
    await demo.page.click("#close")
    await demo.wait_text("#status", "idle")
    for viewer in viewers[1:]:
        await viewer.wait_text("#status", "the stream ended")
        await viewer.shot("ended")
    assert client.app[SESSIONS].list() == []
    for tab in (demo, *viewers):
        assert not tab.errors, (tab.name, tab.errors)


@needs_chromium
async def test_with_auth_the_share_link_carries_a_viewer_token(
        aiohttp_client: ClientFactory, browser: Browser, request: pytest.FixtureRequest) -> None:
    client = await aiohttp_client(create_app(make_settings(api_token="ctl-secret")))
    demo = await open_demo(browser, client, shots_for(request), token="ctl-secret")
    session_id = await new_and_start(demo)
    assert await demo.playing() == (640, 360)
    share = await demo.page.get_attribute("#share", "href")
    assert share is not None and "#token=v1." in share and "ctl-secret" not in share
    viewer = Tab(await browser.new_page(), "viewer", shots_for(request))
    await viewer.page.goto(share)
    assert await viewer.playing() == (640, 360)
    assert "token" not in viewer.page.url and "token" not in demo.page.url  # out of history
    await viewer.shot("watching")
    # The link watches; it does not drive: the viewer token is refused on speak.
    token = share.split("token=", 1)[1]
    refused = await client.post(f"/v1/sessions/{session_id}/speak", json={"text": "hi"},
                                headers={"Authorization": f"Bearer {token}"})
    assert refused.status == 403
    await demo.page.click("#close")
    await demo.wait_text("#status", "idle")
    await viewer.wait_text("#status", "the stream ended")
    for tab in (demo, viewer):
        assert not tab.errors, (tab.name, tab.errors)


@needs_chromium
async def test_h264_is_used_when_the_browser_prefers_it(client: Client, browser: Browser,
                                                        request: pytest.FixtureRequest) -> None:
    tab = await open_demo(browser, client, shots_for(request), codec="h264")
    session_id = await new_and_start(tab)
    assert await tab.playing() == (640, 360)
    codec = await tab.decoding("avatarDemo")
    assert codec == "video/H264", codec
    await tab.wait_text("#stats", "H264")
    await tab.shot("h264")
    session = client.app[SESSIONS].get(session_id)
    assert session.hub.video_codecs == ["h264"]  # nobody asked for VP8: it is not encoded
    await tab.page.click("#close")
    await tab.wait_text("#status", "idle")
    assert not tab.errors, tab.errors


def speech_wav(path: Path, text: str) -> None:
    """eSpeak saying ``text`` between silences, as the WAV Chromium's fake microphone plays."""
    pcm = SpeechSynthesizer("en-us").synthesize(text).pcm
    gap = np.zeros(int(1.5 * 48_000), dtype=np.int16)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(48_000)
        out.writeframes(np.concatenate([gap, pcm, gap, gap]).tobytes())


@needs_chromium
@pytest.mark.parametrize("settings", ["two-workers"], indirect=True)
async def test_voice_chat_with_the_local_avatar(client: Client, tmp_path: Path,
                                                request: pytest.FixtureRequest) -> None:
    # Chromium's fake microphone plays a WAV of someone asking a question; the local avatar
    # hears it (VAD + PocketSphinx, offline), the gateway's chat answers, the avatar speaks.
    wav = tmp_path / "question.wav"
    speech_wav(wav, "Hello. What is your name?")
    flags = ("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
             f"--use-file-for-fake-audio-capture={wav}%noloop")
    async with chromium(*flags) as browser:
        tab = await open_demo(browser, client, shots_for(request))
        session_id = await new_and_start(tab)
        await tab.playing()
        await tab.page.click("#voice-chat")
        await tab.wait_text("#events", "voice chat on")
        await tab.wait_text("#events", "user_start")
        await tab.wait_text("#events", "user_end_message", timeout=40)
        await tab.wait_text("#transcript", "You:")
        # The reply: a new utterance after the user's, spoken in full.
        await tab.wait_text("#events", "avatar_stop_talking", timeout=40)
        await tab.shot("answered")
        transcript = await tab.text("#transcript")
        assert transcript.index("You:") < transcript.index("Avatar:")
        session = client.app[SESSIONS].get(session_id)
        assert session.viewer_count == 1
        await tab.page.click("#voice-chat")
        await tab.wait_text("#events", "voice chat off")
        await tab.page.click("#close")
        await tab.wait_text("#status", "idle")
        assert not tab.errors, tab.errors


def reference() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(REFERENCE.read_text())
    return data


@needs_chromium
async def test_the_sdk_has_every_public_name_of_the_reference(client: Client, browser: Browser,
                                                              ) -> None:
    ref = reference()
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(str(client.make_url("/web/viewer.html")))
    surface = await page.evaluate("""async () => {
        const sdk = await import('/web/sdk/index.js');
        const cls = sdk.default;
        const instance = new cls({token: ''});
        const enums = {};
        for (const [name, value] of Object.entries(sdk)) {
          if (value && typeof value === 'object' && !Array.isArray(value)) enums[name] = {...value};
        }
        const proto = cls.prototype;
        return {
          defaultName: cls.name,
          named: Object.keys(sdk),
          methods: Object.getOwnPropertyNames(proto).filter(
            (n) => typeof Object.getOwnPropertyDescriptor(proto, n).value === 'function'),
          properties: [...Object.getOwnPropertyNames(proto).filter(
            (n) => Object.getOwnPropertyDescriptor(proto, n).get), ...Object.keys(instance)],
          enums,
        };
      }""")
    assert surface["defaultName"] == ref["class"] == ref["default_export"]
    assert ref["class"] in surface["named"]
    missing_methods = sorted(set(ref["methods"]) - set(surface["methods"]))
    assert not missing_methods, missing_methods
    missing_properties = sorted(set(ref["properties"]) - set(surface["properties"]))
    assert not missing_properties, missing_properties
    for name, members in ref["enums"].items():
        assert surface["enums"].get(name) == members, name
    assert not errors, errors


def test_the_sdk_types_declare_every_public_name_of_the_reference() -> None:
    ref = reference()
    types = SDK_TYPES.read_text()
    body = types[types.index(f"export class {ref['class']} {{"):]
    body = body[:body.index("\n}\n")]
    for name in (*ref["methods"], *ref["properties"]):
        assert re.search(rf"^\s+(?:get |readonly |async )?{name}\s*[(:<]", body, re.MULTILINE), name
    for name, members in ref["enums"].items():
        block = re.search(rf"export enum {name} \{{(.*?)\}}", types, re.DOTALL)
        assert block is not None, name
        declared = dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', block.group(1)))
        assert declared == members, name
    assert re.search(rf"export default {ref['class']}", types)
