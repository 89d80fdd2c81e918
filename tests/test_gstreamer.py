"""A WHEP player we did not write: GStreamer's ``webrtcbin`` (Debian 1.22, RSA DTLS
certificate, ``actpass`` offer) plays the gateway's stream (``tests/gst_whep.py``)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from .conftest import IN_NETNS

Client = TestClient[Any, Any]
PLAYER = Path(__file__).with_name("gst_whep.py")
SYSTEM_PYTHON = "/usr/bin/python3"


def gstreamer_ready() -> bool:
    if not os.path.exists(SYSTEM_PYTHON):
        return False
    check = ("import gi; gi.require_version('GstWebRTC', '1.0'); "
             "from gi.repository import GstWebRTC")
    return os.system(f"{SYSTEM_PYTHON} -c \"{check}\" >/dev/null 2>&1") == 0


@pytest.mark.skipif(not IN_NETNS, reason="WebRTC needs the private network namespace")
@pytest.mark.skipif(not gstreamer_ready() and os.environ.get("CI") != "true",
                    reason="apt-get install gstreamer1.0-plugins-bad gstreamer1.0-nice "
                           "python3-gi gir1.2-gst-plugins-bad-1.0")
async def test_gstreamer_webrtcbin_plays_the_stream(client: Client, session_id: str) -> None:
    url = str(client.make_url(f"/v1/sessions/{session_id}/whep"))
    spoken = await client.post(f"/v1/sessions/{session_id}/speak",
                               json={"text": "Hello, GStreamer. Can you hear me now?"})
    assert spoken.status == 200
    process = await asyncio.create_subprocess_exec(
        SYSTEM_PYTHON, str(PLAYER), url, "8", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()[-2000:]
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["error"] == "", result
    # GStreamer offers actpass with an RSA certificate: the gateway is its DTLS server.
    assert result["answer_setup"] == "a=setup:passive", result
    assert result["video_frames"] >= 30 and result["audio_buffers"] >= 20, result
