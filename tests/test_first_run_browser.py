"""What a new user sees in Chromium: empty states, readable errors, a failed connection that
explains itself, the voice picker, offline answers as a badge, one event line per utterance,
and a viewer who joins mid-sentence. Screenshots of each state go to
``artifacts/screenshots/<test>/``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import Browser

from gateway.api.common import SESSIONS
from gateway.app import create_app

from .conftest import ClientFactory, make_settings
from .test_browser import (
    Tab,
    chromium,
    needs_chromium,
    new_and_start,
    open_demo,
    shots_for,
)

Client = TestClient[Any, Any]

LONG_SENTENCE = ("Zebras graze slowly while the patient gateway keeps counting every single "
                 "word of this rather long sentence for viewers who arrive late.")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as instance:
        yield instance


async def visible(tab: Tab, selector: str) -> bool:
    return bool(await tab.page.is_visible(selector))


@needs_chromium
async def test_a_first_session_explains_itself(client: Client, browser: Browser,
                                               request: pytest.FixtureRequest) -> None:
    shots = shots_for(request)
    tab = await open_demo(browser, client, shots)
    # Before anything: the black box says what to do, Unmute waits for a stream, and the
    # header says who answers Talk (no OpenAI key here).
    assert "press New" in await tab.text("#placeholder") and await visible(tab, "#placeholder")
    assert not await visible(tab, "#unmute")
    assert await visible(tab, "#chat-badge") and await tab.text("#chat-badge") == "offline answers"
    await tab.shot("empty")

    # 151 eSpeak voices, grouped by language, with a search box.
    # (a language with one voice is an option of its own; those with variants a group).
    groups = await tab.page.eval_on_selector_all("#voice optgroup", "gs => gs.map(g => g.label)")
    assert {"English", "Spanish", "Portuguese"} <= set(groups), groups
    catalog = await (await client.get("/v1/catalog")).json()
    voices = next(u["voices"] for u in catalog["upstreams"] if u["kind"] == "local")
    options = await tab.page.eval_on_selector_all("#voice option", "os => os.map(o => o.text)")
    assert len(options) == len(voices) > 100  # all of them, each named
    assert "American English (en-us)" in options, options[:20]
    english = await tab.page.eval_on_selector_all(
        "#voice optgroup[label='English'] option", "os => os.map(o => o.value)")
    assert {"en-us", "en-gb"} <= set(english), english
    assert await tab.page.input_value("#voice") == "en-us"  # the default stays selected
    await tab.page.fill("#voice-search", "portug")
    found = await tab.page.eval_on_selector_all("#voice option", "os => os.map(o => o.text)")
    assert found and all("Portuguese" in text for text in found), found
    await tab.shot("voice-search")
    await tab.page.fill("#voice-search", "")
    await tab.page.select_option("#voice", "en-us")

    session_id = await new_and_start(tab, avatar="ben")
    await tab.playing()
    assert not await visible(tab, "#placeholder") and await visible(tab, "#unmute")

    # Talk: Ben answers as Ben; "[offline]" is a badge, never spoken or written as text.
    await tab.page.fill("#text", "Hi, who are you?")
    await tab.page.click("#talk")
    await tab.wait_text("#events", "answer:")
    answer = await tab.page.text_content("#events li:has-text('answer:')") or ""
    assert "I'm Ben" in answer and "[offline]" not in answer, answer
    assert await tab.page.is_visible("#events li:has-text('answer:') .badge")
    await tab.wait("() => document.querySelector('#transcript .badge') !== null")
    await tab.wait_text("#events", "avatar_stop_talking")
    assert "[offline]" not in await tab.text("#transcript")
    assert "I'm Ben" in await tab.text("#transcript")

    # The event log, oldest first like the transcript, folds an utterance's words into one line.
    await tab.page.fill("#text", LONG_SENTENCE)
    await tab.page.click("#repeat")
    await tab.wait_text("#events", "avatar_stop_talking", count=2)
    lines = await tab.page.eval_on_selector_all("#events li", "ls => ls.map(l => l.textContent)")
    words = [line for line in lines if "avatar_talking_message" in line]
    assert len(words) == 2, words  # one line per utterance, not one per word
    assert "Zebras graze slowly" in words[1] and "arrive late." in words[1], words[1]
    starts = [i for i, line in enumerate(lines) if "avatar_start_talking" in line]
    stops = [i for i, line in enumerate(lines) if "avatar_stop_talking" in line]
    assert starts[0] < stops[0] < starts[1] < stops[1], lines  # oldest first
    await tab.shot("talked")

    # A viewer who joins mid-sentence gets the whole sentence so far, not its last words.
    share = await tab.page.get_attribute("#share", "href")
    assert share is not None
    await tab.page.fill("#text", LONG_SENTENCE)
    await tab.page.click("#repeat")
    await tab.wait("() => [...document.querySelectorAll('#events li')].some("
                   "l => l.textContent.includes('avatar_talking_message \\u00d7 4 '))")
    viewer = Tab(await browser.new_page(viewport={"width": 1100, "height": 900}), "late-viewer",
                 shots)
    await viewer.page.goto(share)
    await viewer.playing()
    await viewer.wait_text("#transcript", "arrive late.")
    transcript = await viewer.text("#transcript")
    assert "Zebras graze slowly" in transcript, transcript
    await viewer.shot("joined-mid-sentence")

    await tab.page.click("#close")
    await tab.wait_text("#status", "idle")
    assert await visible(tab, "#placeholder") and not await visible(tab, "#unmute")
    await tab.shot("closed")
    assert client.app[SESSIONS].list() == [] and session_id
    for page in (tab, viewer):
        assert not page.errors, (page.name, page.errors)


@needs_chromium
async def test_viewer_page_errors_are_readable(aiohttp_client: ClientFactory, browser: Browser,
                                               request: pytest.FixtureRequest) -> None:
    client = await aiohttp_client(create_app(make_settings(api_token="ctl-secret")))
    shots = shots_for(request)
    base = str(client.make_url("/web/viewer.html"))
    cases = [
        ("no-session", base, "No session to watch", "Share viewer link"),
        ("bad-token", f"{base}?session=0123456789abcdef#token=v1.forged", "not authorised (401)",
         "Ask for a new link"),
        ("unknown-session", f"{base}?session=0123456789abcdef#token=ctl-secret",
         "not found (404)", "does not exist, or has ended"),
    ]
    for name, url, title, advice in cases:
        tab = Tab(await browser.new_page(viewport={"width": 900, "height": 700}), name, shots)
        await tab.page.goto(url)
        await tab.wait("() => !document.getElementById('problem').hidden")
        problem = await tab.text("#problem")
        assert title in problem and advice in problem, (name, problem)
        assert not await visible(tab, "#unmute")
        await tab.shot("problem")
        # What went wrong is the gateway's refusal (shown above), not a broken page.
        assert all(e.startswith(("401 ", "404 ", "Failed to load resource")) for e in tab.errors), \
            tab.errors


@needs_chromium
async def test_a_connection_that_cannot_work_says_why(aiohttp_client: ClientFactory,
                                                      browser: Browser,
                                                      request: pytest.FixtureRequest) -> None:
    # A browser whose UDP cannot reach the gateway (a firewall, a gateway reached through an
    # SSH tunnel or a loopback port): here the page's peer connections may use relays only and
    # no relay is configured, so no packet of media can flow either way. The page must say so
    # instead of "streaming" over a black box, and the session's status must say it too.
    client = await aiohttp_client(create_app(make_settings(viewer_connect_timeout=3.0)))
    tab = await open_demo(browser, client, shots_for(request))
    await tab.page.add_init_script("""
        const Native = RTCPeerConnection;
        window.RTCPeerConnection = function (config) {
          return new Native({ ...config, iceTransportPolicy: "relay" });
        };
        window.RTCPeerConnection.prototype = Native.prototype;""")
    await tab.page.reload()
    await tab.wait("() => document.getElementById('status').textContent.includes('press New')")
    await tab.page.select_option("#quality", "low")
    await tab.page.click("#new")
    await tab.wait_text("#status", "created")
    session_id = await tab.page.evaluate("() => window.avatarDemo.avatar.sessionId")
    await tab.page.click("#start")
    await tab.wait("() => !document.getElementById('problem').hidden", timeout=60)
    problem = await tab.text("#problem")
    assert "media connection failed" in problem and "could not connect" in problem, problem
    offered = await tab.page.evaluate(
        "() => window.avatarDemo.lastFailure && window.avatarDemo.lastFailure.gateway_candidates")
    assert offered and all(f" {c}" in problem or c in problem for c in offered), (offered, problem)
    assert "AVATAR_GATEWAY_ICE_SERVERS" in problem and "last_viewer_failure" in problem, problem
    status = await tab.text("#status")
    assert "connection failed" in status and "streaming" not in status, status
    assert not await visible(tab, "#unmute")
    await tab.shot("connection-failed")
    session = await (await client.get(f"/v1/sessions/{session_id}")).json()
    assert session["viewer_failures"] == {"connect_timeout": 1}, session
    assert "did not connect" in session["last_viewer_failure"]["message"], session
