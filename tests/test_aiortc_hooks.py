"""The private aiortc/aioice hooks (gateway/viewers/aiortc_hooks.py), proven on the wire.

Real aiortc viewers send real RTCP (PLI, NACK, receiver reports) through SRTP and the ICE
pair; the gateway must react as a sender should. If aiortc stopped calling a hook (a renamed
method, a new code path), the reaction would be missing here, not just a counter.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import re
import subprocess
import sys
from typing import Any

import aiortc.rtcdtlstransport
import pytest
from aiohttp.test_utils import TestClient
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
from OpenSSL import SSL

from gateway.api.common import METRICS, SESSIONS
from gateway.app import create_app
from gateway.media.rtp import RtpStream
from gateway.sessions import Session
from gateway.viewers import aiortc_hooks
from gateway.viewers.peer import Viewer

from .conftest import IN_NETNS, ClientFactory, make_settings
from .rtc_client import WhepViewer

Client = TestClient[Any, Any]


async def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


async def watching(client: Client) -> tuple[Session, WhepViewer, RtpStream, RTCRtpReceiver]:
    """A session, one viewer decoding it, the gateway's video stream for that viewer, and
    the viewer's video receiver (which sends the RTCP)."""
    created = await (await client.post("/v1/sessions")).json()
    session = client.app[SESSIONS].get(created["id"])
    viewer = WhepViewer(client, created["id"])
    await viewer.connect()
    async with asyncio.timeout(20):
        await viewer.first_frame.wait()
    assert viewer.location is not None
    server = session.viewer(viewer.location.rsplit("/", 1)[-1])
    (video,) = [s for s in server._streams if s.kind == "video"]
    (receiver,) = [t.receiver for t in viewer.pc.getTransceivers() if t.kind == "video"]
    return session, viewer, video, receiver


async def test_a_pli_on_the_wire_makes_the_shared_encoder_send_a_keyframe(
        aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app(make_settings(keyframe_min_gap=0.01)))
    metrics = client.app[METRICS]
    _session, viewer, video, receiver = await watching(client)
    try:
        keyframes = metrics.keyframes.labels("pli")._value.get()
        await receiver._send_rtcp_pli(video.params.ssrc)
        await wait_for(lambda: metrics.keyframes.labels("pli")._value.get() > keyframes)
        assert metrics.rtcp_feedback.labels("pli")._value.get() >= 1
    finally:
        await viewer.close()


async def test_a_nack_on_the_wire_is_answered_and_reports_give_an_rtt(
        aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app(make_settings()))
    metrics = client.app[METRICS]
    _session, viewer, video, receiver = await watching(client)
    try:
        assert video.params.rtx_payload_type is not None  # aiortc offers RTX, so it is used
        recent = (video._seq - 2) & 0xFFFF
        await receiver._send_rtcp_nack(video.params.ssrc, [recent])
        await wait_for(lambda: video.retransmitted == 1)
        assert metrics.rtcp_feedback.labels("nack")._value.get() >= 1
        # Our sender reports come back in the viewer's receiver reports (every ~1 s).
        await wait_for(lambda: video.rtt is not None)
        assert video.rtt is not None and 0.0 <= video.rtt < 1.0
        frames = len(viewer.received.video)
        await wait_for(lambda: len(viewer.received.video) > frames + 10)  # still playing
    finally:
        await viewer.close()


async def test_closing_a_viewer_stops_its_streams_through_aiortcs_own_close(
        aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app(make_settings()))
    session, viewer, video, _receiver = await watching(client)
    try:
        assert session.hub.subscribers == 2 and not video.closed
        await viewer.close()  # the viewer hangs up: ICE/DTLS end, aiortc stops the senders
        await wait_for(lambda: session.viewer_count == 0)
        assert session.hub.subscribers == 0
        assert video.closed
    finally:
        await viewer.close()


async def test_viewers_share_one_certificate_and_each_connects(
        aiohttp_client: ClientFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """One DTLS certificate (and SSL context) per process, not a key pair per viewer: a join
    makes no key pair or certificate at all, not even one that would be replaced."""
    client = await aiohttp_client(create_app(make_settings()))
    _session, first, _video, _receiver = await watching(client)
    second = WhepViewer(client, _session.id)  # the test's own peer makes its certificate here
    generate = aiortc.rtcdtlstransport.generate_certificate
    made: list[object] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        made.append(args)
        return generate(*args, **kwargs)

    monkeypatch.setattr(aiortc.rtcdtlstransport, "generate_certificate", counted)
    try:
        await second.connect()
        assert made == []
        async with asyncio.timeout(20):
            await second.first_frame.wait()
        fingerprints = [re.findall(r"^a=fingerprint:.*$", v.answer_sdp, re.MULTILINE)
                        for v in (first, second)]
        assert fingerprints[0] and fingerprints[0] == fingerprints[1]
    finally:
        await asyncio.gather(first.close(), second.close())


async def test_the_first_viewer_finds_certificate_and_dtls_context_made(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``gateway serve`` and each worker do before they take viewers: afterwards a peer
    connection gets the process's certificate, and its DTLS context exists already."""
    monkeypatch.setattr(aiortc_hooks, "_certificate", None)  # as in a fresh process
    await aiortc_hooks.prepare_peer_connections()
    prepared = aiortc_hooks._certificate
    assert prepared is not None
    made: list[str] = []

    def counting(name: str, make: Any) -> Any:
        def counted(*args: Any) -> Any:
            made.append(name)
            return make(*args)
        return counted

    dtls = aiortc.rtcdtlstransport
    monkeypatch.setattr(dtls, "generate_certificate",
                        counting("certificate", dtls.generate_certificate))
    monkeypatch.setattr(SSL, "Context", counting("DTLS context", SSL.Context))
    pc = aiortc_hooks.new_peer_connection(RTCConfiguration(iceServers=[]))
    try:
        certificate = pc._RTCPeerConnection__certificates[0]  # type: ignore[attr-defined]
        assert certificate is prepared[1]
        context = certificate._create_ssl_context(
            srtp_profiles=aiortc.rtcdtlstransport.SRTP_PROFILES)
        assert context is certificate._create_ssl_context(
            srtp_profiles=aiortc.rtcdtlstransport.SRTP_PROFILES)
        assert made == []
    finally:
        await pc.close()


@pytest.mark.skipif(not IN_NETNS, reason="unpinned gathering uses the host's interfaces")
async def test_unpinned_joins_share_one_walk_of_the_interfaces(
        aiohttp_client: ClientFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """aioice lists every interface for every join; unpinned, the gateway lists them once per
    ``HOST_ADDRESSES_TTL`` and its answers offer exactly those addresses."""
    walk = aiortc_hooks._every_interface
    walks: list[list[str]] = []

    def counted(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        walks.append(walk(use_ipv4, use_ipv6))
        return walks[-1]

    monkeypatch.setattr(aiortc_hooks, "_every_interface", counted)
    client = await aiohttp_client(create_app(make_settings()))  # unpinned: no ice_host_addresses
    session, first, _video, _receiver = await watching(client)
    second = WhepViewer(client, session.id)
    try:
        await second.connect()
        async with asyncio.timeout(20):
            await second.first_frame.wait()
        assert len(walks) == 1, walks  # both joins (and the test's own two peers) shared it
        for viewer in (first, second):
            offered = set(re.findall(r"^a=candidate:\S+ 1 udp \d+ (\S+) ", viewer.answer_sdp,
                                     re.MULTILINE))
            assert offered and offered <= set(walks[0]), (offered, walks[0])
        monkeypatch.setattr(aiortc_hooks, "HOST_ADDRESSES_TTL", 0.0)
        await first.close()
        first = WhepViewer(client, session.id)
        await first.connect()
        assert len(walks) > 1  # past the interval, a join walks them again
    finally:
        await asyncio.gather(first.close(), second.close())


@pytest.mark.parametrize(("offered", "answered"), [("actpass", "passive"),
                                                   ("passive", "active")])
async def test_the_gateway_is_dtls_server_unless_the_offer_wants_to_be(
        aiohttp_client: ClientFactory, offered: str, answered: str) -> None:
    """To an ``actpass`` offer the gateway answers ``passive`` (DTLS server: it starts media on
    the viewer's last flight); an offer that insists on being the server gets ``active``. The
    viewer decodes either way, so the roles on the wire are the ones the SDP says."""
    client = await aiohttp_client(create_app(make_settings()))
    created = await (await client.post("/v1/sessions")).json()
    viewer = WhepViewer(client, created["id"])
    try:
        offer = (await viewer.offer_sdp()).replace("a=setup:actpass", f"a=setup:{offered}")
        response = await client.post(f"/v1/sessions/{created['id']}/whep", data=offer,
                                     headers={"Content-Type": "application/sdp"})
        answer = await response.text()
        assert response.status == 201, answer
        assert set(re.findall(r"^a=setup:(\w+)", answer, re.MULTILINE)) == {answered}
        await viewer.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        async with asyncio.timeout(20):
            await viewer.first_frame.wait()
        session = client.app[SESSIONS].get(created["id"])
        (server,) = session.audience.viewers()
        assert isinstance(server, Viewer)
        (transport,) = {t.receiver.transport for t in server._pc.getTransceivers()}
        assert transport._role == ("server" if answered == "passive" else "client")
    finally:
        await viewer.close()


def estimator_of(receiver: RTCRtpReceiver) -> Any:
    return receiver.__dict__["_RTCRtpReceiver__remote_bitrate_estimator"]  # aiortc's private


async def test_bandwidth_estimators_are_built_only_by_receivers_that_receive(
        aiohttp_client: ClientFactory) -> None:
    """The gateway's viewers only send: their video receivers build no estimator. A viewer
    that receives video still estimates and sends REMB (the gateway counts it)."""
    client = await aiohttp_client(create_app(make_settings()))
    metrics = client.app[METRICS]
    session, viewer, _video, receiver = await watching(client)
    try:
        await wait_for(lambda: metrics.rtcp_feedback.labels("remb")._value.get() > 0)
        assert estimator_of(receiver)._estimator is not None
        assert viewer.location is not None
        server = session.viewer(viewer.location.rsplit("/", 1)[-1])
        assert isinstance(server, Viewer)
        (gateway_receiver,) = [t.receiver for t in server._pc.getTransceivers()
                               if t.kind == "video"]
        assert estimator_of(gateway_receiver)._estimator is None
    finally:
        await viewer.close()


def kernel_has_udp_gso() -> bool:
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    return sys.platform == "linux" and (major, minor) >= (4, 18)


@pytest.mark.parametrize("gso", [True, False], ids=["gso", "one-send-per-packet"])
async def test_both_send_paths_play(aiohttp_client: ClientFactory, monkeypatch: pytest.MonkeyPatch,
                                    gso: bool) -> None:
    """A frame's packets go out in one segmented send (UDP GSO) where the kernel can, else
    one by one; the viewer decodes either way, and a GSO-capable kernel keeps GSO on."""
    monkeypatch.setattr(aiortc_hooks, "_gso", gso)
    client = await aiohttp_client(create_app(make_settings()))
    _session, viewer, video, _receiver = await watching(client)
    try:
        frames = len(viewer.received.video)
        await wait_for(lambda: len(viewer.received.video) > frames + 30)
        assert video.frames > 30
        assert aiortc_hooks._gso is (gso and kernel_has_udp_gso())
    finally:
        await viewer.close()


def test_another_aiortc_version_is_refused_at_import() -> None:
    script = (
        "import importlib.metadata as m\n"
        "real = m.version\n"
        "m.version = lambda name: '1.99.0' if name == 'aiortc' else real(name)\n"
        "import gateway.viewers.aiortc_hooks\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert "written against aiortc 1.16.0, found 1.99.0" in result.stderr


async def test_a_failed_dtls_handshake_is_logged_with_its_reason(
        aiohttp_client: ClientFactory) -> None:
    """Hook 9: a viewer whose certificate does not match its offer's fingerprint (what a
    broken or hostile player looks like) fails DTLS; the gateway says so at INFO, with why,
    and counts the viewer as ``dtls_failed`` rather than an ICE failure."""
    client = await aiohttp_client(create_app(make_settings()))
    created = await client.post("/v1/sessions", json={"upstream": "local"})
    session_id = (await created.json())["id"]
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    dtls_logger = logging.getLogger("aiortc.rtcdtlstransport")
    dtls_logger.addHandler(handler)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        offer = re.sub(r"(a=fingerprint:sha-256 )\S+", r"\1" + ":".join(["AB"] * 32),
                       pc.localDescription.sdp)
        response = await client.post(f"/v1/sessions/{session_id}/whep", data=offer,
                                     headers={"Content-Type": "application/sdp"})
        assert response.status == 201, await response.text()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=await response.text(),
                                                            type="answer"))
        session = client.app[SESSIONS].get(session_id)
        await wait_for(lambda: session.viewer_count == 0)
    finally:
        dtls_logger.removeHandler(handler)
        await pc.close()
    failures = [r for r in records if "handshake failed" in r.getMessage()]
    assert failures and failures[0].levelno == logging.INFO, [r.getMessage() for r in records]
    assert "fingerprint mismatch" in failures[0].getMessage()
    metrics = client.app[METRICS]
    assert metrics.viewer_disconnects.labels("dtls_failed")._value.get() >= 1
