"""The viewer page in real headless Chromium (Debian's ``chromium``, driven by Playwright)."""

from __future__ import annotations

import os
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.api.common import SESSIONS

from .conftest import IN_NETNS

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    # Offer the real host candidate (the test namespace's veth address), not an mDNS name.
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--autoplay-policy=no-user-gesture-required",
]

# CI must run it; a developer without root may skip it.
pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHROMIUM) and os.environ.get("CI") != "true",
                       reason="Debian chromium is not installed (make test installs it)"),
    # Chromium, like libwebrtc, never gathers loopback candidates.
    pytest.mark.skipif(not IN_NETNS, reason="needs the private network namespace (tests/netns.sh)"),
]


async def test_viewer_page_plays_the_avatar_and_makes_it_speak(client: TestClient[Any, Any]) -> None:
    from playwright.async_api import async_playwright

    base = str(client.make_url("/"))
    errors: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = await browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            await page.goto(base)
            # The page picked or created a session and plays it: the video has the tier's size
            # and its clock advances.
            await page.wait_for_function(
                "() => { const v = document.getElementById('video');"
                " return v.videoWidth > 0 && v.currentTime > 0.5; }", timeout=30_000)
            size = await page.evaluate(
                "() => [document.getElementById('video').videoWidth,"
                " document.getElementById('video').videoHeight]")
            assert size == [640, 360]
            assert "session=" in page.url

            await page.fill("#text", "Hello from the browser test.")
            await page.click("#speak button")
            await page.wait_for_function(
                "() => document.getElementById('log').textContent.includes('avatar_stop_talking')",
                timeout=30_000)
            log = await page.text_content("#log")
            assert log is not None and "avatar_start_talking" in log
            assert "Hello from the browser test." in log  # the end message carries the text

            sessions = client.app[SESSIONS].list()
            assert len(sessions) == 1 and sessions[0].viewer_count == 1
            await page.close()  # pagehide: the player DELETEs its WHEP resource
        finally:
            await browser.close()
    assert not errors, errors
