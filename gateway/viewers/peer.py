"""One viewer: an aiortc peer connection whose senders carry the hub's shared packets."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence

import av
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCIceCandidate,
    RTCIceServer,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.exceptions import OperationError
from aiortc.mediastreams import MediaStreamError

from ..errors import BadSDP, GatewayError, Unprocessable, UnsupportedCodec
from ..events import CurrentSpeech
from ..media.hub import Fanout
from ..media.ladder import RungPolicy, lane_name, split_lane
from ..media.naive import FrameTrack, NaiveHub
from ..media.rtp import RtpStream, StreamParameters
from ..metrics import Metrics
from .aiortc_hooks import (
    DtlsOutput,
    answer_as_dtls_server,
    new_peer_connection,
    take_over_sender,
)
from .whep import MAX_REMOTE_CANDIDATES, Offer, SdpFragment, count_candidates, parse_answer

logger = logging.getLogger(__name__)

# A viewer that cannot drain its data channel loses events rather than the gateway's memory.
MAX_CHANNEL_BUFFER = 1 << 20


def rtc_configuration(urls: Sequence[str], username: str = "", credential: str = "") -> RTCConfiguration:
    """Explicit ICE servers, never aiortc's built-in default (a public STUN server)."""
    servers = [RTCIceServer(urls=url, username=username or None, credential=credential or None)
               for url in urls]
    return RTCConfiguration(iceServers=servers)


def new_viewer_id() -> str:
    return secrets.token_urlsafe(16)


class Viewer:
    """A WHEP viewer of one session. Created by :meth:`negotiate`, ended by :meth:`close`."""

    def __init__(
        self,
        hub: Fanout | NaiveHub,
        configuration: RTCConfiguration,
        metrics: Metrics,
        on_closed: Callable[[Viewer], None],
        *,
        client: str = "",
        viewer_id: str | None = None,
        on_state: Callable[[Viewer], None] | None = None,
        speech: CurrentSpeech | None = None,
        adaptive: bool = False,
    ) -> None:
        """``adaptive``: the video moves between rungs of the quality ladder as the viewer's
        feedback says (``Settings.adaptive_quality``)."""
        self.id = viewer_id or new_viewer_id()
        self.client = client
        """Who offered (see :func:`gateway.api.common.client_key`), for per-client limits."""
        self.etag = secrets.token_hex(8)
        self.created = time.monotonic()
        self._hub = hub
        self._metrics = metrics
        self._on_closed = on_closed
        self._on_state = on_state
        self._pc = new_peer_connection(configuration)
        self._streams: list[RtpStream] = []
        self._frame_tracks: list[FrameTrack] = []  # the naive baseline's instead
        self._channel: RTCDataChannel | None = None
        self._speech = speech
        """The utterance in progress, sent first when the events channel opens."""
        self._adaptive = adaptive
        self._rung = 0
        """The best rung it may have (its offer's), where its video starts."""
        self._remote_ufrag = ""
        self._remote_candidates = 0
        self._state = "connecting"
        self._closing: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._microphone: asyncio.Task[None] | None = None
        self._resolving: asyncio.Task[None] | None = None
        """Adds the viewer's mDNS candidates as aioice resolves them, after the answer."""
        self.close_reason: str | None = None
        self.video_codec = ""
        """The codec this viewer's video is encoded with (``vp8`` or ``h264``), once negotiated."""
        self._rtp_counts: dict[str, tuple[int, int]] = {}
        """Per kind: (packets sent, packets the viewer reported lost) at the last sample."""
        metrics.viewers.labels("connecting").inc()

        pc = self._pc
        pc.on("connectionstatechange", self._on_connection_state)
        pc.on("datachannel", self._on_datachannel)

    @property
    def state(self) -> str:
        return self._state

    @property
    def connection_state(self) -> str:
        return str(self._pc.connectionState)

    async def negotiate(
        self, offer: Offer, on_microphone: Callable[[av.AudioFrame], Awaitable[None]] | None = None
    ) -> str:
        """Apply the viewer's offer and return the answer, with every candidate gathered.

        With ``on_microphone``, a player that offers its microphone (audio ``sendrecv``) gets
        a two-way audio m-line and its decoded audio is handed over frame by frame.
        """
        pc = self._pc
        codec = offer.video_codec
        self._rung = offer.rung
        if codec is not None:  # else a listener: audio only
            video = self._add_sender("video", codec.name.lower())
            # Only the codec the hub will encode for this viewer (plus its retransmissions).
            video.setCodecPreferences([
                c for c in RTCRtpSender.getCapabilities("video").codecs
                if c.mimeType.lower() == "video/rtx"
                or (c.mimeType.lower() == codec.mimeType.lower()
                    and c.parameters == codec.parameters)
            ])
        if offer.has_audio:
            audio = self._add_sender("audio")
            if offer.sends_audio and on_microphone is not None:
                audio.direction = "sendrecv"
                pc.on("track", lambda track: self._receive_microphone(track, on_microphone))
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer.sdp, type="offer"))
            if offer.dtls_actpass:
                answer_as_dtls_server(pc)
            await pc.setLocalDescription(await pc.createAnswer())
        except OperationError as exc:
            raise UnsupportedCodec(f"the offer cannot be used: {exc}") from None
        except (ValueError, AttributeError, TypeError, StopIteration) as exc:
            raise BadSDP(f"the offer cannot be used: {str(exc) or type(exc).__name__}") from None
        self._remote_ufrag = offer.ice_ufrag
        self._remote_candidates = count_candidates(offer.sdp) + len(offer.mdns_candidates)
        self._add_later(offer.mdns_candidates, offer.end_of_candidates)
        return pc.localDescription.sdp

    async def offer(
        self, on_microphone: Callable[[av.AudioFrame], Awaitable[None]] | None = None
    ) -> str:
        """The server offers (HeyGen v1 style, used by the seed API): VP8 video, Opus audio
        (two-way when ``on_microphone`` is given), and an ``events`` data channel.

        VP8 only: the codec of a viewer's track is fixed before the answer names one, and every
        browser that runs the seed's client (HeyGen v1 era, Chromium-based) decodes VP8."""
        pc = self._pc
        video = self._add_sender("video", "vp8")
        video.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs
                                   if c.mimeType.lower() in ("video/vp8", "video/rtx")])
        audio = self._add_sender("audio")
        if on_microphone is not None:
            audio.direction = "sendrecv"
            pc.on("track", lambda track: self._receive_microphone(track, on_microphone))
        self._channel = pc.createDataChannel("events")
        await pc.setLocalDescription(await pc.createOffer())
        return pc.localDescription.sdp

    async def accept_answer(self, sdp: str) -> None:
        """Apply the browser's answer to :meth:`offer`."""
        if self._pc.signalingState != "have-local-offer":
            raise Unprocessable("this viewer is not waiting for an answer")
        sdp = parse_answer(sdp)
        try:
            await self._pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
        except OperationError as exc:
            raise UnsupportedCodec(f"the answer cannot be used: {exc} (no codec in common)") from None
        except (ValueError, KeyError, IndexError, AssertionError, AttributeError, TypeError,
                StopIteration) as exc:
            raise BadSDP(f"the answer cannot be used: {str(exc) or type(exc).__name__}") from None
        match = re.search(r"^a=ice-ufrag:(\S+)", sdp, re.MULTILINE)
        self._remote_ufrag = match.group(1) if match else ""

    def expire_unless_connected(self, timeout: float) -> None:
        """Close the viewer if ICE/DTLS has not connected within ``timeout`` seconds.

        A player that POSTs an offer and vanishes before sending a single ICE check would
        otherwise hold its peer connection and hub tracks forever: aioice waits for remote
        candidates without a deadline.
        """
        async def expire() -> None:
            await asyncio.sleep(timeout)
            if self._state == "connecting":
                logger.info("viewer %s: not connected after %.0f s (ICE %s). %s", self.id,
                            timeout, self._pc.iceConnectionState, self._candidates_seen())
                await self.close("connect_timeout")

        self._watchdog = asyncio.get_running_loop().create_task(expire(), name="viewer-watchdog")

    def _add_sender(self, kind: str, codec: str | None = None) -> RTCRtpTransceiver:
        if isinstance(self._hub, NaiveHub):
            track = self._hub.subscribe_frames(kind)
            self._frame_tracks.append(track)
            return self._pc.addTransceiver(track, direction="sendonly")
        if kind == "video":
            codec = codec or "vp8"
            self._hub.check_codec(codec)
            self.video_codec = codec
        transceiver = self._pc.addTransceiver(kind, direction="sendonly")
        take_over_sender(transceiver.sender, codec or "opus", self._start_stream,
                         self._stop_stream)
        return transceiver

    def _start_stream(self, params: StreamParameters, output: DtlsOutput) -> RtpStream | None:
        """DTLS is up: join the hub's fan-out (video at a keyframe it asks for)."""
        hub = self._hub
        if self.close_reason is not None or isinstance(hub, NaiveHub):
            return None
        if params.kind != "video":
            stream = RtpStream(params, output, hub)
        else:
            stream = RtpStream(
                params, output, hub, self._first_video_packet,
                lane=lane_name(params.codec, self._rung), on_lane=self._moved,
                on_estimate=self._metrics.bandwidth_estimate.observe,
                policy=RungPolicy(self._rung, self._rung, time.monotonic())
                if self._adaptive else None)
        if not hub.attach(stream):
            return None
        self._streams.append(stream)
        if stream.kind == "video":
            self._metrics.viewer_rungs.labels(str(self._rung)).inc()
        return stream

    def _moved(self, old: str, new: str) -> None:
        """The video moved to another rung of the ladder."""
        before, after = split_lane(old)[1], split_lane(new)[1]
        self._metrics.viewer_rungs.labels(str(before)).dec()
        self._metrics.viewer_rungs.labels(str(after)).inc()
        self._metrics.rung_switches.labels("down" if after > before else "up").inc()
        logger.debug("viewer %s: video %s -> %s", self.id, old, new)

    def _stop_stream(self, stream: RtpStream) -> None:
        if stream.closed:
            return
        stream.closed = True
        if stream.kind == "video":
            self._metrics.viewer_rungs.labels(str(split_lane(stream.lane)[1])).dec()
        if not isinstance(self._hub, NaiveHub):
            self._hub.detach(stream)

    def _receive_microphone(self, track: MediaStreamTrack,
                            forward: Callable[[av.AudioFrame], Awaitable[None]]) -> None:
        if track.kind != "audio" or self._microphone is not None:
            return

        async def pump() -> None:
            with contextlib.suppress(MediaStreamError):
                while True:
                    frame = await track.recv()
                    assert isinstance(frame, av.AudioFrame)
                    try:
                        await forward(frame)
                    except GatewayError as exc:
                        logger.warning("viewer %s: microphone audio refused: %s", self.id,
                                       exc.message)
                        return

        self._microphone = asyncio.get_running_loop().create_task(pump(), name="viewer-microphone")

    def _first_video_packet(self) -> None:
        self._metrics.time_to_first_frame.observe(time.monotonic() - self.created)

    async def add_candidates(self, fragment: SdpFragment) -> None:
        """Trickle ICE from the viewer (PATCH). aiortc cannot restart ICE: WHEP (like WHIP,
        RFC 9725) says 422."""
        if fragment.ice_ufrag is not None and fragment.ice_ufrag != self._remote_ufrag:
            raise Unprocessable("ICE restart is not supported; start a new WHEP session")
        total = self._remote_candidates + len(fragment.candidates)
        if total > MAX_REMOTE_CANDIDATES:
            raise BadSDP(f"too many candidates: at most {MAX_REMOTE_CANDIDATES} per viewer "
                         f"(this one has sent {self._remote_candidates})")
        self._remote_candidates = total
        mdns = []
        for candidate in fragment.candidates:
            if candidate.sdpMid is None:
                candidate.sdpMid = self._pc.getTransceivers()[0].mid
            if candidate.ip.endswith(".local"):
                mdns.append(candidate)
            else:
                await self._pc.addIceCandidate(candidate)
        if mdns or (self._resolving is not None and not self._resolving.done()):
            self._add_later(mdns, fragment.end_of_candidates)
        elif fragment.end_of_candidates:
            await self._pc.addIceCandidate(None)

    def _add_later(self, mdns: Sequence[RTCIceCandidate], end_of_candidates: bool) -> None:
        """Add mDNS candidates while aioice resolves them (up to a second each, in parallel),
        then end-of-candidates if it came: it must follow every candidate, even one that
        arrived earlier and is still being resolved."""
        if not mdns and not end_of_candidates:
            return
        before = self._resolving

        async def add() -> None:
            if before is not None:
                await asyncio.wait([before])
            try:
                await asyncio.gather(*(self._pc.addIceCandidate(c) for c in mdns))
                if end_of_candidates:
                    await self._pc.addIceCandidate(None)
            except (ValueError, OSError) as exc:  # e.g. no mDNS socket on this host
                logger.info("viewer %s: remote mDNS candidates not added: %s", self.id, exc)

        self._resolving = asyncio.get_running_loop().create_task(add(), name="viewer-mdns")

    async def sample_stats(self) -> None:
        """Add this viewer's RTP counts since the last sample to the metrics, and its RTT
        (from its receiver reports; cumulative loss is signed and duplicates can lower it).
        The naive baseline's aiortc senders are not sampled."""
        for stream in self._streams:
            kind = stream.kind
            last_sent, last_lost = self._rtp_counts.get(kind, (0, 0))
            self._rtp_counts[kind] = (stream.packets, stream.remote_lost)
            self._metrics.sent_packets.labels(kind).inc(max(0, stream.packets - last_sent))
            self._metrics.packets_lost.labels(kind).inc(max(0, stream.remote_lost - last_lost))
            if stream.rtt is not None and kind == "video":
                self._metrics.viewer_rtt.observe(stream.rtt)

    def send_event(self, payload: str) -> bool:
        """Queue one JSON event on the viewer's data channel, if it opened one."""
        channel = self._channel
        if channel is None or channel.readyState != "open":
            return False
        if channel.bufferedAmount > MAX_CHANNEL_BUFFER:
            self._metrics.events_dropped.labels("datachannel").inc()
            return False
        channel.send(payload)
        return True

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if self._channel is not None:
            return
        self._channel = channel
        if self._speech is not None:
            # Open already (aiortc announces a player's channel once it is open); the words
            # said so far, before any new one, so the transcript starts at the sentence's start.
            for payload in self._speech.payloads:
                self.send_event(payload)

    async def _on_connection_state(self) -> None:
        state = self._pc.connectionState
        self._metrics.viewer_ice_transitions.labels(state).inc()
        if state == "connected" and self._state == "connecting":
            self._set_state("connected")
        elif state == "failed":
            if self._pc.iceConnectionState == "failed":  # then DTLS fails too ("connection")
                logger.info("viewer %s: ICE failed, no candidate pair answered. %s", self.id,
                            self._candidates_seen())
                self.close_soon("ice_failed")
            else:  # aiortc's reason is logged too (aiortc_hooks, hook 9)
                self.close_soon("dtls_failed")
        elif state == "closed":
            self.close_soon("closed")

    def _candidates_seen(self) -> str:
        """What each side offered, for a person who wonders why media never flowed."""
        transceivers = self._pc.getTransceivers()
        if not transceivers:
            return ""
        ice = transceivers[0].receiver.transport.transport
        remote = collections.Counter(
            "mdns" if c.ip.endswith(".local") else c.type for c in ice.getRemoteCandidates())
        local = [f"{c.type} {c.ip}" for c in ice.iceGatherer.getLocalCandidates()]
        seen = ", ".join(f"{n} {kind}" for kind, n in sorted(remote.items())) or "none"
        return (f"The viewer offered {seen}; the gateway offered {', '.join(local) or 'none'}. "
                "A browser must reach one of the gateway's addresses over UDP (or a TURN "
                "server both reach: AVATAR_GATEWAY_ICE_SERVERS); Chromium never uses "
                "127.0.0.1.")

    def _set_state(self, state: str) -> None:
        if self._state in ("connecting", "connected"):
            self._metrics.viewers.labels(self._state).dec()
        self._state = state
        if state in ("connecting", "connected"):
            self._metrics.viewers.labels(state).inc()
        if self._on_state is not None:
            self._on_state(self)

    def close_soon(self, reason: str) -> None:
        """Close from a callback that must not wait (aiortc event handlers)."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self.close(reason))

    async def close(self, reason: str) -> None:
        """Stop the peer connection and release the hub tracks. Idempotent."""
        if self.close_reason is not None:
            return
        self.close_reason = reason
        for task in (self._watchdog, self._microphone, self._resolving):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        with contextlib.suppress(Exception):  # the last seconds' counts; never fail a close
            await self.sample_stats()
        self._set_state("closed")
        self._metrics.viewer_disconnects.labels(reason).inc()
        self._metrics.viewer_duration.observe(time.monotonic() - self.created)
        for stream in self._streams:  # no more frames, even before aiortc's close is done
            self._stop_stream(stream)
        for track in self._frame_tracks:
            track.stop()
        try:
            # Shielded: a cancelled waiter would cancel aiortc's own close future (InvalidStateError).
            await asyncio.shield(self._pc.close())
        finally:
            self._on_closed(self)
