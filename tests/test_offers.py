"""What real players put in an offer, and what the gateway makes of it: Chromium's 40-odd
payload types are trimmed to the one video codec and Opus before aiortc parses them, and
candidates named by mDNS are resolved after the answer, never before it."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aioice.ice
import av
import numpy as np
import pytest
from aiohttp.test_utils import TestClient
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from gateway.api.common import METRICS, SESSIONS
from gateway.app import create_app
from gateway.viewers.peer import Viewer
from gateway.viewers.whep import parse_offer

from .conftest import ClientFactory, make_settings
from .rtc_client import Player, minimal_offer

Client = TestClient[Any, Any]
SDP = {"Content-Type": "application/sdp"}
FRAG = {"Content-Type": "application/trickle-ice-sdpfrag"}
CHROMIUM_OFFER = (Path(__file__).parent / "data" / "chromium_offer.sdp").read_text()
"""Chromium 156's offer to receive video and audio with a data channel (candidates removed)."""


def m_line(sdp: str, kind: str) -> list[str]:
    line = next(x for x in sdp.splitlines() if x.startswith(f"m={kind} "))
    return line.split(" ")[3:]


def rtpmaps(sdp: str, kind: str) -> list[str]:
    """The encodings of a section's payload types, in its m-line's order."""
    section = sdp[sdp.index(f"m={kind} "):]
    section = section[:section.find("\nm=", 1)] if "\nm=" in section else section
    names = dict(line[9:].split(" ", 1) for line in section.splitlines()
                 if line.startswith("a=rtpmap:"))
    return [names[pt].split("/")[0] for pt in m_line(section, kind)]


def test_a_chromium_offer_is_trimmed_to_what_the_hub_sends() -> None:
    assert len(rtpmaps(CHROMIUM_OFFER, "video")) > 30  # what the fixture is about
    assert {"VP9", "AV1", "red", "ulpfec"} <= set(rtpmaps(CHROMIUM_OFFER, "video"))
    offer = parse_offer(CHROMIUM_OFFER)
    assert rtpmaps(offer.sdp, "video") == ["VP8", "rtx"]
    assert rtpmaps(offer.sdp, "audio") == ["opus"]
    assert offer.video_codec is not None and offer.video_codec.mimeType == "video/VP8"
    kept = set(m_line(offer.sdp, "video")) | set(m_line(offer.sdp, "audio"))
    for line in offer.sdp.splitlines():  # no attribute is left for a payload type taken out
        if line.startswith(("a=rtpmap:", "a=fmtp:", "a=rtcp-fb:")):
            pt = line.split(":", 1)[1].split(" ", 1)[0]
            assert pt in kept or pt == "*", line
    assert len(offer.sdp.splitlines()) < len(CHROMIUM_OFFER.splitlines()) / 2
    # What stays is untouched: transport, extensions, the data channel.
    for prefix in ("a=fingerprint:", "a=ice-ufrag:", "a=extmap:", "m=application", "a=sctp-port"):
        assert [x for x in offer.sdp.splitlines() if x.startswith(prefix)] == \
            [x for x in CHROMIUM_OFFER.splitlines() if x.startswith(prefix)], prefix


@pytest.mark.parametrize(("order", "kept"), [
    (("VP9", "H264", "VP8"), ["H264", "rtx"]),  # the player's favourite we can send
    (("H264", "VP8"), ["H264", "rtx"]),
])
def test_the_trimmed_offer_keeps_the_players_favourite(order: tuple[str, ...],
                                                       kept: list[str]) -> None:
    offer = minimal_offer(video_codecs=order)
    # Each codec gets a retransmission type, as browsers offer them.
    lines = offer.splitlines()
    head = next(i for i, x in enumerate(lines) if x.startswith("m=video"))
    pts = lines[head].split(" ")[3:]
    lines[head] += "".join(f" {int(pt) + 1}" for pt in pts)
    lines[head + 1:head + 1] = [x for pt in pts for x in (f"a=rtpmap:{int(pt) + 1} rtx/90000",
                                                           f"a=fmtp:{int(pt) + 1} apt={pt}")]
    trimmed = parse_offer("\r\n".join(lines) + "\r\n")
    assert rtpmaps(trimmed.sdp, "video") == kept
    assert trimmed.video_codec is not None and trimmed.video_codec.mimeType == "video/H264"


async def test_chromiums_offer_is_answered_with_one_codec_per_kind(client: Client,
                                                                   session_id: str) -> None:
    response = await client.post(f"/v1/sessions/{session_id}/whep", data=CHROMIUM_OFFER,
                                 headers=SDP)
    answer = await response.text()
    assert response.status == 201, answer
    assert rtpmaps(answer, "video") == ["VP8", "rtx"]
    assert rtpmaps(answer, "audio") == ["opus"]
    assert "m=application" in answer
    assert (await client.delete(response.headers["Location"])).status == 200


class SlowResolver:
    """Stands in for aioice's mDNS responder socket: a name resolves only when the test says
    so, as one on another network never does within aioice's one-second timeout."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.release = asyncio.Event()

    async def resolve(self, hostname: str, timeout: float | None = 1.0) -> str | None:
        self.asked.append(hostname)
        await self.release.wait()
        return "127.0.0.1"


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> SlowResolver:
    fake = SlowResolver()

    async def protocol(subscriber: object) -> SlowResolver:
        return fake

    monkeypatch.setattr(aioice.ice, "get_or_create_mdns_protocol", protocol)
    monkeypatch.setattr(aioice.ice, "unref_mdns_protocol", lambda subscriber: asyncio.sleep(0))
    return fake


def remote_candidates(viewer: Viewer) -> list[str]:
    pc: RTCPeerConnection = viewer._pc  # what aiortc was given
    ice = pc.getTransceivers()[0].sender.transport.transport
    return [c.ip for c in ice.getRemoteCandidates()]


def with_candidates(offer: str, *lines: str) -> str:
    return offer.replace("a=mid:0\r\n", "a=mid:0\r\n" + "".join(f"{x}\r\n" for x in lines), 1)


MDNS = "a=candidate:1 1 udp 2113937151 5f3c1a2e-0b1d-4c55-9a7e-2b0c8d1e4f60.local 50000 typ host"


async def test_the_answer_does_not_wait_for_mdns(client: Client, session_id: str,
                                                 resolver: SlowResolver) -> None:
    offer = with_candidates(minimal_offer(), MDNS, "a=end-of-candidates")
    async with asyncio.timeout(30):  # (an answer that waits for the name never comes)
        response = await client.post(f"/v1/sessions/{session_id}/whep", data=offer, headers=SDP)
    assert response.status == 201, await response.text()
    # Answered while the name is still being resolved.
    assert resolver.asked == [MDNS.split(" ")[4]] and not resolver.release.is_set()
    session = client.app[SESSIONS].get(session_id)
    viewer = session.viewers()[0]
    assert isinstance(viewer, Viewer)
    assert remote_candidates(viewer) == []
    resolver.release.set()
    async with asyncio.timeout(10):
        while remote_candidates(viewer) != [MDNS.split(" ")[4]]:  # resolved to 127.0.0.1
            await asyncio.sleep(0.01)
    # end-of-candidates came after it, as in the offer (aioice refuses candidates after it).
    ice = viewer._pc.getTransceivers()[0].sender.transport.transport
    async with asyncio.timeout(10):
        while not ice._connection._remote_candidates_end:
            await asyncio.sleep(0.01)
    assert (await client.delete(response.headers["Location"])).status == 200


async def test_trickled_mdns_candidates_and_a_close_while_resolving(
        client: Client, session_id: str, resolver: SlowResolver) -> None:
    response = await client.post(f"/v1/sessions/{session_id}/whep", data=minimal_offer(),
                                 headers=SDP)
    assert response.status == 201, await response.text()
    location = response.headers["Location"]
    etag = response.headers["ETag"]
    fragment = "a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\nm=video 9 RTP/AVP 0\r\n" \
               f"a=mid:0\r\n{MDNS}\r\n"
    patch = await client.patch(location, data=fragment, headers={**FRAG, "If-Match": etag})
    assert patch.status == 204, await patch.text()
    # end-of-candidates in a later PATCH waits for the name still being resolved.
    patch = await client.patch(location, data="a=end-of-candidates\r\n",
                               headers={**FRAG, "If-Match": etag})
    assert patch.status == 204, await patch.text()
    assert len(resolver.asked) == 1
    viewer = client.app[SESSIONS].get(session_id).viewers()[0]
    assert isinstance(viewer, Viewer)
    pending = viewer._resolving
    assert pending is not None and not pending.done()
    # Closing while aioice resolves: nothing is left waiting.
    assert (await client.delete(location)).status == 200
    async with asyncio.timeout(10):
        while not pending.done():
            await asyncio.sleep(0.01)
    assert pending.cancelled()


@pytest.mark.parametrize("settings", ["in-process", "two-workers"], indirect=True)
async def test_an_audio_only_player_hears_the_avatar(client: Client, session_id: str) -> None:
    """A listener (a phone, a player that offers audio only) gets Opus and no video."""
    player = Player.receiving("audio")
    pc, tracks = player.pc, player.tracks
    try:
        response = await client.post(f"/v1/sessions/{session_id}/whep",
                                      data=await player.offer(), headers=SDP)
        answer = await response.text()
        assert response.status == 201, answer
        assert "m=video" not in answer and rtpmaps(answer, "audio") == ["opus"]
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        spoken = await client.post(f"/v1/sessions/{session_id}/speak", json={"text": "Hello."})
        assert spoken.status == 200
        await player.first_frame("audio")
        async with asyncio.timeout(20):
            loud = 0
            while loud < 5:  # frames with the avatar's voice in them
                frame = await tracks[0].recv()
                assert isinstance(frame, av.AudioFrame)
                if np.abs(frame.to_ndarray()).max() > 1000:
                    loud += 1
        session = client.app[SESSIONS].get(session_id)
        assert session.viewer_count == 1 and session.viewers()[0].video_codec == ""
        assert session.hub.video_codecs == []  # nothing encoded for a listener
        assert (await client.delete(response.headers["Location"])).status == 200
    finally:
        await pc.close()


async def test_a_trickle_only_player_plays(client: Client, session_id: str) -> None:
    """A player that offers no candidate at all and trickles them afterwards in PATCHes
    without If-Match (as some WHEP players do) connects and gets video."""
    player = Player.receiving("video", "audio")
    pc = player.pc
    try:
        await player.offer()
        full = pc.localDescription.sdp
        candidates = [line for line in full.splitlines() if line.startswith("a=candidate:")]
        assert candidates
        bare = "\r\n".join(line for line in full.splitlines()
                           if not line.startswith(("a=candidate:", "a=end-of-candidates"))) + "\r\n"
        response = await client.post(f"/v1/sessions/{session_id}/whep", data=bare, headers=SDP)
        answer = await response.text()
        assert response.status == 201, answer
        location = response.headers["Location"]
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        ufrag = next(x for x in full.splitlines() if x.startswith("a=ice-ufrag:"))
        pwd = next(x for x in full.splitlines() if x.startswith("a=ice-pwd:"))
        for candidate in candidates:  # one PATCH each, no If-Match
            fragment = f"{ufrag}\r\n{pwd}\r\nm=video 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n{candidate}\r\n"
            patched = await client.patch(location, data=fragment, headers=FRAG)
            assert patched.status == 204, await patched.text()
        ended = await client.patch(location, data="a=end-of-candidates\r\n", headers=FRAG)
        assert ended.status == 204
        frame = await player.first_frame("video")
        assert isinstance(frame, av.VideoFrame) and frame.width > 0
        assert (await client.delete(location)).status == 200
    finally:
        await pc.close()


async def test_a_viewer_that_never_connects_is_logged_with_the_candidates_seen(
        aiohttp_client: ClientFactory, caplog: pytest.LogCaptureFixture) -> None:
    """A player that offers and then goes silent (its network cannot reach the gateway, or a
    browser that ignores 127.0.0.1): the gateway says so at INFO with what each side offered,
    instead of a viewer that silently never plays."""
    client = await aiohttp_client(create_app(make_settings(viewer_connect_timeout=2.0)))
    created = await client.post("/v1/sessions", json={"upstream": "local", "quality": "low"})
    session_id = (await created.json())["id"]
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    offer = pc.localDescription.sdp
    await pc.close()  # its sockets are gone: the gateway's checks reach nobody
    caplog.set_level(logging.INFO, logger="gateway.viewers.peer")
    response = await client.post(f"/v1/sessions/{session_id}/whep", data=offer, headers=SDP)
    assert response.status == 201, await response.text()
    session = client.app[SESSIONS].get(session_id)
    async with asyncio.timeout(30):
        while session.viewer_count:
            await asyncio.sleep(0.1)
    failed = [r.getMessage() for r in caplog.records if "not connected" in r.getMessage()]
    assert failed, [r.getMessage() for r in caplog.records]
    assert "The viewer offered" in failed[0] and "host" in failed[0]
    assert "the gateway offered host" in failed[0]
    assert client.app[METRICS].viewer_disconnects.labels("connect_timeout")._value.get() == 1
