"""A real WHEP viewer for tests: an aiortc peer that decodes what the gateway sends."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
from aiohttp.test_utils import TestClient
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from aiortc.rtp import AnyRtcpPacket, RtcpSrPacket

Box = tuple[int, int, int, int]
CLOCK_RATES = {"audio": 48_000, "video": 90_000}


@dataclass
class VideoSample:
    arrival: float
    width: int
    height: int
    mouth: np.ndarray | None  # Y plane crop of the mouth box, if one was given
    pts: int | None = None
    """The frame's RTP timestamp."""


@dataclass(frozen=True)
class SenderReport:
    """An RTCP sender report: the sender's wall clock (NTP, seconds) at RTP time ``rtp``."""

    arrival: float
    ntp: float
    rtp: int


@dataclass
class Received:
    video: list[VideoSample] = field(default_factory=list)
    audio_rms: list[tuple[float, float]] = field(default_factory=list)
    audio_pts: list[int | None] = field(default_factory=list)
    """RTP timestamp of each ``audio_rms`` entry."""
    events: list[dict[str, Any]] = field(default_factory=list)
    reports: dict[str, list[SenderReport]] = field(
        default_factory=lambda: {"audio": [], "video": []})

    def sender_time(self, kind: str, pts: int, arrival: float) -> float | None:
        """When the sender sent the media of RTP time ``pts`` (its wall clock, seconds), by the
        sender reports nearest to ``arrival`` (the median of three: one report sent right
        after a stall of the sender's loop is off by the stall); None before any report. This
        is the timeline a player presents audio and video on (RFC 3550 §6.4.1, what browsers
        lip-sync with), so it does not depend on how late this test peer read its packets."""
        reports = sorted(self.reports[kind], key=lambda r: abs(r.arrival - arrival))[:3]
        if not reports:
            return None
        times = []
        for report in reports:
            delta = (pts - report.rtp + (1 << 31)) % (1 << 32) - (1 << 31)
            times.append(report.ntp + delta / CLOCK_RATES[kind])
        return float(np.median(times))


class WhepViewer:
    """Offers recvonly video + audio + an ``events`` data channel, like the web page does."""

    def __init__(self, client: TestClient[Any, Any], session_id: str, mouth_box: Box | None = None,
                 audio: bool = True, microphone: MediaStreamTrack | None = None,
                 prefer: str | None = None, headers: dict[str, str] | None = None,
                 query: str = "") -> None:
        """``query``: of the WHEP request, e.g. ``"?max_height=180"``."""
        self.client = client
        self.query = query
        self.headers = headers or {}
        self.session_id = session_id
        self.mouth_box = mouth_box
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.received = Received()
        self.location: str | None = None
        self.etag: str | None = None
        self._audio = audio
        self._microphone = microphone
        self._prefer = prefer
        self.answer_sdp = ""
        self._consumers: list[asyncio.Task[None]] = []
        self._connected = asyncio.Event()
        self.first_frame = asyncio.Event()

    async def offer_sdp(self) -> str:
        pc = self.pc
        video = pc.addTransceiver("video", direction="recvonly")
        if self._prefer is not None:
            # Like Safari, which lists H.264 first: the player's order is its preference.
            capabilities = RTCRtpReceiver.getCapabilities("video")
            assert capabilities is not None
            codecs = capabilities.codecs
            wanted = f"video/{self._prefer}".lower()
            video.setCodecPreferences(sorted(codecs, key=lambda c: c.mimeType.lower() != wanted))
        if self._microphone is not None:
            pc.addTransceiver(self._microphone, direction="sendrecv")
        elif self._audio:
            pc.addTransceiver("audio", direction="recvonly")
        channel = pc.createDataChannel("events")
        channel.on("message", self._on_message)
        pc.on("track", self._on_track)
        pc.on("connectionstatechange", self._on_state)
        await pc.setLocalDescription(await pc.createOffer())
        return str(pc.localDescription.sdp)

    async def connect(self, timeout: float = 20.0) -> None:
        offer = await self.offer_sdp()
        response = await self.client.post(
            f"/v1/sessions/{self.session_id}/whep{self.query}", data=offer,
            headers={"Content-Type": "application/sdp", **self.headers})
        body = await response.text()
        assert response.status == 201, body
        self.answer_sdp = body
        self.location = response.headers["Location"]
        self.etag = response.headers["ETag"]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    def _on_state(self) -> None:
        if self.pc.connectionState == "connected":
            self._connected.set()

    def _on_message(self, message: str | bytes) -> None:
        self.received.events.append(json.loads(message))

    def _on_track(self, track: MediaStreamTrack) -> None:
        receiver = next(t.receiver for t in self.pc.getTransceivers() if t.receiver.track is track)
        reports = self.received.reports[track.kind]
        handle = receiver._handle_rtcp_packet
        loop = asyncio.get_running_loop()

        async def on_rtcp(packet: AnyRtcpPacket) -> None:
            if isinstance(packet, RtcpSrPacket):
                info = packet.sender_info
                reports.append(SenderReport(loop.time(), info.ntp_timestamp / (1 << 32),
                                            info.rtp_timestamp))
            await handle(packet)

        receiver._handle_rtcp_packet = on_rtcp  # type: ignore[method-assign]
        consume = self._consume_video if track.kind == "video" else self._consume_audio
        self._consumers.append(loop.create_task(consume(track, receiver)))

    @staticmethod
    def _rtp_timestamp(receiver: RTCRtpReceiver, frame: av.VideoFrame | av.AudioFrame) -> int | None:
        """A decoded frame's RTP timestamp: aiortc counts ``pts`` from the first packet's."""
        mapper = receiver._RTCRtpReceiver__timestamp_mapper  # type: ignore[attr-defined]
        origin = mapper._origin
        if frame.pts is None or origin is None:
            return None
        return int((origin + frame.pts) % (1 << 32))

    async def _consume_video(self, track: MediaStreamTrack, receiver: RTCRtpReceiver) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                assert isinstance(frame, av.VideoFrame)
                arrival = loop.time()
                mouth = None
                if self.mouth_box is not None:
                    x, y, w, h = self.mouth_box
                    # The decoder's yuv420p luma is the gray image: no whole-frame conversion
                    # on the loop, which three viewers in one busy test process can't spare.
                    rows: np.ndarray
                    if frame.format.name == "yuv420p":
                        luma = frame.planes[0]
                        rows = np.frombuffer(memoryview(luma), np.uint8).reshape(-1, luma.line_size)
                    else:
                        rows = frame.to_ndarray(format="gray")
                    mouth = rows[y:y + h, x:x + w].copy()
                self.received.video.append(VideoSample(arrival, frame.width, frame.height, mouth,
                                                       self._rtp_timestamp(receiver, frame)))
                self.first_frame.set()

    async def _consume_audio(self, track: MediaStreamTrack, receiver: RTCRtpReceiver) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                assert isinstance(frame, av.AudioFrame)
                samples = frame.to_ndarray().astype(np.float64)
                rms = float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0
                self.received.audio_rms.append((loop.time(), rms))
                self.received.audio_pts.append(self._rtp_timestamp(receiver, frame))

    async def delete(self) -> int:
        assert self.location is not None
        response = await self.client.delete(self.location)
        return response.status

    async def close(self) -> None:
        await asyncio.shield(self.pc.close())
        for task in self._consumers:
            task.cancel()
        for task in self._consumers:
            with contextlib.suppress(asyncio.CancelledError):
                await task


H264_FMTP = "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f"


@dataclass
class Player:
    """A bare receiving peer for tests that drive WHEP by hand (redirects, trickle-only,
    audio-only): the peer connection and the tracks it got."""

    pc: RTCPeerConnection
    tracks: list[MediaStreamTrack] = field(default_factory=list)

    @classmethod
    def receiving(cls, *kinds: str) -> Player:
        player = cls(RTCPeerConnection(RTCConfiguration(iceServers=[])))
        for kind in kinds:
            player.pc.addTransceiver(kind, direction="recvonly")
        player.pc.on("track", player.tracks.append)
        return player

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def first_frame(self, kind: str, timeout: float = 20.0) -> av.VideoFrame | av.AudioFrame:
        async with asyncio.timeout(timeout):
            while not any(t.kind == kind for t in self.tracks):
                await asyncio.sleep(0.05)
            frame = await next(t for t in self.tracks if t.kind == kind).recv()
        assert isinstance(frame, av.VideoFrame | av.AudioFrame)
        return frame


def minimal_offer(video: bool = True, audio: bool = True, video_codecs: tuple[str, ...] = ("VP8",),
                  h264_fmtp: str = H264_FMTP) -> str:
    """A syntactically complete WHEP offer without a live peer behind it (negotiation tests).

    ``video_codecs`` in the player's order of preference, e.g. ``("H264", "VP8")`` like Safari.
    """
    lines = ["v=0", "o=- 1 1 IN IP4 0.0.0.0", "s=-", "t=0 0"]
    mids = [k for k, on in (("0", video), ("1", audio)) if on]
    lines.append("a=group:BUNDLE " + " ".join(mids))
    common = ["c=IN IP4 0.0.0.0", "a=ice-ufrag:abcd", "a=ice-pwd:abcdefghijklmnopqrstuvwx",
              "a=fingerprint:sha-256 " + ":".join(["AB"] * 32), "a=setup:actpass", "a=rtcp-mux",
              "a=recvonly"]
    if video:
        types = [str(96 + 2 * i) for i in range(len(video_codecs))]
        lines += [f"m=video 9 UDP/TLS/RTP/SAVPF {' '.join(types)}", *common, "a=mid:0"]
        for pt, codec in zip(types, video_codecs, strict=True):
            lines.append(f"a=rtpmap:{pt} {codec}/90000")
            if codec == "H264" and h264_fmtp:
                lines.append(f"a=fmtp:{pt} {h264_fmtp}")
    if audio:
        lines += ["m=audio 9 UDP/TLS/RTP/SAVPF 111", *common, "a=mid:1",
                  "a=rtpmap:111 opus/48000/2"]
    return "\r\n".join(lines) + "\r\n"


class ToneTrack(MediaStreamTrack):
    """A microphone that says "aaa" loudly: 48 kHz, 20 ms frames, paced in real time."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._index = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        delay = self._start + self._index * 0.02 - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        t = (np.arange(960) + self._index * 960) / 48_000
        pcm = (np.sin(2 * np.pi * 220 * t) * 12_000).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = 48_000
        frame.pts = self._index * 960
        frame.time_base = fractions.Fraction(1, 48_000)
        self._index += 1
        return frame
