"""One joined client: LiveKit's signaling protocol on a WebSocket, and its two peer connections.

This is LiveKit's dual peer connection mode ("v0", ``/rtc``): every WebSocket message is one
``SignalRequest`` / ``SignalResponse`` protobuf. The *subscriber* connection carries what the
client receives; the server offers it, right after the JoinResponse (``subscriber_primary``),
and again whenever the avatar joins or leaves. The *publisher* connection carries what the
client sends (microphone, data); the client offers it, lazily, and the server answers.
See ``specs/livekit-signaling.md`` for the sequence and for what the SDKs insist on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import av
from aiohttp import WSMsgType, web
from aiortc import (
    MediaStreamTrack,
    RTCBundlePolicy,
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCRtpCodecCapability,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.exceptions import InvalidAccessError, InvalidStateError
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import candidate_from_sdp
from google.protobuf.message import DecodeError
from livekit.protocol import models
from livekit.protocol import rtc as signal

from .media import FeedTrack, Publication, TrackFanout
from .room import AUDIO_QUEUE, VIDEO_QUEUE, State, new_sid

if TYPE_CHECKING:
    from .room import Room

logger = logging.getLogger(__name__)

SERVER_VERSION = "1.9.0"
SERVER_PROTOCOL = 16
PING_INTERVAL = 5
"""Seconds; must be > 0 (the Rust SDK feeds it to tokio's ``interval``, which panics on 0)."""
PING_TIMEOUT = 15
ANSWER_TIMEOUT = 10.0
LEAVE_GRACE = 1.0
"""After a LeaveRequest, how long the client gets to hang up by itself."""
OUTBOX = 256
"""Signaling messages queued for a client that does not read; then it is dropped."""
DATA_BACKLOG = 64
"""Data packets held until the subscriber's data channels open; the oldest go first."""
MAX_CHANNEL_BUFFER = 1 << 20

PeerError = (InvalidAccessError, InvalidStateError, ValueError)
"""What aiortc raises for an SDP or a state it cannot use: the client broke the protocol."""


def peer_configuration() -> RTCConfiguration:
    # No ICE servers: aiortc's default is a public STUN server. One bundled transport, so a
    # renegotiation that adds tracks never starts a second ICE/DTLS session.
    return RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)


def _codecs(kind: str, name: str) -> list[RTCRtpCodecCapability]:
    wanted = (f"{kind}/{name}".lower(), f"{kind}/rtx")
    return [c for c in RTCRtpSender.getCapabilities(kind).codecs if c.mimeType.lower() in wanted]


@dataclass(frozen=True, slots=True)
class Grant:
    """What a client's token lets it do in the room."""

    identity: str
    room: str
    name: str
    can_publish: bool = True
    can_subscribe: bool = True
    can_publish_data: bool = True
    hidden: bool = False
    """Not shown to the other participants (LiveKit's ``hidden`` grant: recorders, relays)."""
    can_publish_sources: tuple[str, ...] = ()
    """``camera``, ``microphone``, ...: the only sources it may publish (empty: any)."""


class ClientConnection:
    """Signaling and media for one client, from JoinResponse to the end of its socket.

    :meth:`run` owns the connection: it returns once the socket is gone and everything the
    connection started (tasks, peer connections, avatar tracks) is closed.
    """

    def __init__(self, room: Room, ws: web.WebSocketResponse, grant: Grant,
                 transport: asyncio.Transport | None = None,
                 on_closed: Callable[[ClientConnection], None] | None = None) -> None:
        self.sid = new_sid("PA_")
        self.identity = grant.identity
        self.joined_at = time.time()
        self._room = room
        self._ws = ws
        self._grant = grant
        self._transport = transport
        self._outbox: asyncio.Queue[bytes] = asyncio.Queue(OUTBOX)
        self._subscriber = RTCPeerConnection(peer_configuration())
        self._publisher: RTCPeerConnection | None = None
        self._channels: dict[bool, RTCDataChannel] = {}
        self._backlog: collections.deque[tuple[bytes, bool]] = collections.deque(maxlen=DATA_BACKLOG)
        self._senders: dict[str, tuple[Publication, FeedTrack, RTCRtpTransceiver]] = {}
        """By track sid: what this client is sent of the others' tracks."""
        self._published: dict[str, models.TrackInfo] = {}
        """By the client's track id (``cid``): tracks announced, their media still to come."""
        self._publications: dict[str, Publication] = {}
        """By track sid: tracks whose media arrives, forwarded to the other clients."""
        self._forwarding: dict[MediaStreamTrack, asyncio.Task[None]] = {}
        """The task forwarding each received track, cancelled when the client unpublishes it."""
        # Held by every operation on a peer connection: closing one while another task is
        # inside setLocalDescription (gathering) would leave the sockets gathered after the
        # close open forever.
        self._peer_lock = asyncio.Lock()
        self._offer_needed = asyncio.Event()
        self._answered = asyncio.Event()
        self._offer_id = 0
        self._version = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._closer: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._on_closed = on_closed
        self.data_dropped = 0

    def __repr__(self) -> str:
        return f"<ClientConnection {self.identity} {self.sid} room={self._room.name}>"

    @property
    def hidden(self) -> bool:
        return self._grant.hidden

    def publications(self) -> list[Publication]:
        return list(self._publications.values())

    @property
    def peer_connections(self) -> list[RTCPeerConnection]:
        return [pc for pc in (self._subscriber, self._publisher) if pc is not None]

    def info(self, state: State = models.ParticipantInfo.ACTIVE) -> models.ParticipantInfo:
        self._version += 1
        grant = self._grant
        tracks = [] if state == models.ParticipantInfo.DISCONNECTED else [
            p.info for p in self._publications.values()]
        return models.ParticipantInfo(
            sid=self.sid, identity=self.identity, name=grant.name, state=state, tracks=tracks,
            joined_at=int(self.joined_at), joined_at_ms=int(self.joined_at * 1000),
            version=self._version, is_publisher=bool(self._published),
            kind=models.ParticipantInfo.STANDARD,
            permission=models.ParticipantPermission(
                can_subscribe=grant.can_subscribe, can_publish=grant.can_publish,
                can_publish_data=grant.can_publish_data))

    # -- lifetime ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Join, then serve the client's requests until its socket closes; then clean up."""
        try:
            self._room.attach(self)
            self._post(signal.SignalResponse(join=signal.JoinResponse(
                room=self._room.info(),
                participant=self.info(models.ParticipantInfo.JOINED),
                other_participants=self._room.participants(exclude=self),
                server_version=SERVER_VERSION,
                server_info=models.ServerInfo(edition=models.ServerInfo.Standard, version=SERVER_VERSION,
                                              protocol=SERVER_PROTOCOL, node_id="sim"),
                subscriber_primary=True, ping_interval=PING_INTERVAL, ping_timeout=PING_TIMEOUT,
                ice_servers=[])))
            # The publishers are in other_participants, so their tracks may ride the first
            # offer. Tracks before data channels: aiortc (max-bundle) stops the shared
            # transport if the data channel's transport came first but its m-line comes after
            # the media's.
            self._sync_tracks()
            self._open_data_channels()
            self._spawn(self._write_loop(), "sim-signal-writer")
            # Offers wait for answers: never inside the read loop, which must keep reading.
            self._spawn(self._negotiate_loop(), "sim-subscriber-negotiation")
            self._offer_needed.set()
            await self._read_loop()
        finally:
            await self.close()

    async def leave(self, reason: models.DisconnectReason) -> None:
        """Ask the client to leave (LeaveRequest DISCONNECT), then close what is left."""
        if not self._closing:
            self._post(signal.SignalResponse(leave=signal.LeaveRequest(
                can_reconnect=False, reason=reason, action=signal.LeaveRequest.DISCONNECT)))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LEAVE_GRACE):
                    await self._closed.wait()
        await self.close()

    async def abort(self) -> None:
        """Cut the connection with no goodbye: TCP first, then the peer connections."""
        if self._transport is not None and not self._closing:
            self._transport.abort()
        await self.close()

    async def close(self) -> None:
        """Idempotent; every caller returns once everything is closed.

        The work runs in a task of its own, to completion even if the caller is cancelled
        (aiohttp may cancel the handler of a client that hung up): half-closed peer
        connections would keep their sockets and tasks forever.
        """
        if self._closer is None:
            self._closing = True
            self._closer = asyncio.get_running_loop().create_task(self._close(), name="sim-client-close")
        await asyncio.shield(self._closer)

    async def _close(self) -> None:
        try:
            self._room.detach(self)
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for publication, feed, _ in self._senders.values():
                publication.frames.unsubscribe(feed)
            self._senders.clear()
            for publication in self._publications.values():
                publication.frames.stop()
            self._publications.clear()
            self._backlog.clear()
            async with self._peer_lock:
                await self._subscriber.close()
                if self._publisher is not None:
                    await self._publisher.close()
            await self._ws.close()
        finally:
            self._closed.set()
            if self._on_closed is not None:
                self._on_closed(self)
            logger.info("%s closed", repr(self))

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        # A failed protocol task leaves the client waiting forever: end the connection loudly.
        logger.error("%s: %s failed; closing", repr(self), task.get_name(), exc_info=task.exception())
        self._hang_up()

    def _hang_up(self) -> None:
        """End the read loop (and so :meth:`run`) from a callback or a helper task."""
        if not self._closing and not self._ws.closed:
            task = asyncio.get_running_loop().create_task(self._ws.close(), name="sim-hang-up")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- signaling transport ----------------------------------------------------------------------

    def _post(self, message: signal.SignalResponse) -> None:
        if self._closing:
            return
        try:
            self._outbox.put_nowait(message.SerializeToString())
        except asyncio.QueueFull:
            logger.warning("%s does not read its signaling socket; dropping it", repr(self))
            self._hang_up()

    async def _write_loop(self) -> None:
        while True:
            data = await self._outbox.get()
            try:
                await self._ws.send_bytes(data)
            except ConnectionError as exc:
                logger.info("%s: signaling socket gone (%s)", repr(self), exc)
                return

    async def _read_loop(self) -> None:
        while True:
            try:
                message = await self._ws.receive(timeout=PING_TIMEOUT)
            except TimeoutError:
                logger.warning("%s: nothing for %d s (no pings); dropping it", repr(self), PING_TIMEOUT)
                return
            if message.type is WSMsgType.BINARY:
                try:
                    request = signal.SignalRequest.FromString(message.data)
                except DecodeError:
                    logger.warning("%s: undecodable signal request; dropping it", repr(self))
                    return
                if not await self._handle(request):
                    return
            elif message.type is WSMsgType.TEXT:
                logger.warning("%s: ignoring a text message (LiveKit signaling is binary)", repr(self))
            else:  # CLOSE, CLOSING, CLOSED, ERROR
                return

    # -- requests ----------------------------------------------------------------------------------

    async def _handle(self, request: signal.SignalRequest) -> bool:
        """Serve one request; False ends the connection."""
        if self._closing:
            return False
        kind = request.WhichOneof("message")
        if kind == "ping_req":
            self._post(signal.SignalResponse(pong_resp=signal.Pong(
                last_ping_timestamp=request.ping_req.timestamp, timestamp=int(time.time() * 1000))))
        elif kind == "ping":
            self._post(signal.SignalResponse(pong=int(time.time() * 1000)))
        elif kind == "trickle":
            await self._add_candidate(request.trickle)
        elif kind == "answer":
            try:
                async with self._peer_lock:
                    await self._subscriber.setRemoteDescription(
                        RTCSessionDescription(sdp=request.answer.sdp, type="answer"))
            except PeerError as exc:
                logger.warning("%s: unusable subscriber answer: %s", repr(self), exc)
                return False
            self._answered.set()
        elif kind == "offer":
            return await self._answer_publisher(request.offer)
        elif kind == "add_track":
            self._add_track(request.add_track)
        elif kind == "mute":
            for info in self._published.values():
                if info.sid == request.mute.sid:
                    info.muted = request.mute.muted
        elif kind == "leave":
            logger.info("%s leaves", repr(self))
            return False
        else:
            # subscription, track_setting, subscription_permission, sync_state, update_layers,
            # ...: a one-avatar room has nothing to adapt, so they need no answer.
            logger.debug("%s: ignoring %s", repr(self), kind)
        return True

    async def _add_candidate(self, trickle: signal.TrickleRequest) -> None:
        pc = self._subscriber if trickle.target == signal.SUBSCRIBER else self._publisher
        try:
            init = json.loads(trickle.candidateInit)
        except json.JSONDecodeError:
            logger.warning("%s: trickle with bad JSON: %.200s", repr(self), trickle.candidateInit)
            return
        text = str(init.get("candidate") or "").removeprefix("candidate:")
        if pc is None or not text:
            return  # end of candidates, or no publisher yet: aiortc needs neither
        try:
            if len(text.split()) < 8:  # candidate_from_sdp only asserts this
                raise ValueError("too few fields")
            candidate = candidate_from_sdp(text)
            candidate.sdpMid = init.get("sdpMid")
            candidate.sdpMLineIndex = init.get("sdpMLineIndex")
            async with self._peer_lock:
                await pc.addIceCandidate(candidate)
        except ValueError as exc:
            logger.warning("%s: ICE candidate %.200s not used: %s", repr(self), text, exc)

    def _add_track(self, request: signal.AddTrackRequest) -> None:
        if not self._grant.can_publish:
            # The SDKs check can_publish themselves; one that does not waits for its timeout.
            logger.warning("%s may not publish; ignoring track %r", repr(self), request.name)
            return
        source = models.TrackSource.Name(request.source).lower()
        if self._grant.can_publish_sources and source not in self._grant.can_publish_sources:
            logger.warning("%s may not publish a %s track; ignoring %r", repr(self), source,
                           request.name)
            return
        audio = request.type == models.AUDIO
        codec = "opus" if audio else "VP8"
        if not audio and request.simulcast_codecs:
            codec = request.simulcast_codecs[0].codec.upper() or codec
        info = models.TrackInfo(
            sid=new_sid("TR_"), type=request.type, name=request.name, source=request.source,
            muted=request.muted, width=request.width, height=request.height,
            disable_dtx=request.disable_dtx, stereo=request.stereo, layers=request.layers,
            mime_type=f"{'audio' if audio else 'video'}/{codec}")
        # The cid is the msid track id of this track in the coming publisher offer.
        self._published[request.cid] = info
        self._post(signal.SignalResponse(
            track_published=signal.TrackPublishedResponse(cid=request.cid, track=info)))

    async def _answer_publisher(self, offer: signal.SessionDescription) -> bool:
        async with self._peer_lock:
            if self._closing:
                return False  # a publisher created now would never be closed
            if self._publisher is None:
                self._publisher = RTCPeerConnection(peer_configuration())
                self._publisher.on("track", self._on_track)
                self._publisher.on("datachannel", self._on_client_channel)
            pc = self._publisher
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=offer.sdp, type="offer"))
                await pc.setLocalDescription(await pc.createAnswer())
            except PeerError as exc:
                logger.warning("%s: unusable publisher offer: %s", repr(self), exc)
                return False
            self._end_unpublished(pc)
        self._post(signal.SignalResponse(answer=signal.SessionDescription(
            type="answer", sdp=pc.localDescription.sdp, id=offer.id)))
        return True

    # -- what the client publishes -----------------------------------------------------------------

    def _on_track(self, track: MediaStreamTrack) -> None:
        info = self._published.pop(track.id, None)
        if info is None:  # a cid the SDK did not carry into the SDP: the oldest of its kind
            kind = models.AUDIO if track.kind == "audio" else models.VIDEO
            cid = next((c for c, i in self._published.items() if i.type == kind), None)
            info = self._published.pop(cid) if cid is not None else None
        if info is None:
            logger.warning("%s sends a %s track it did not announce; ignored", repr(self), track.kind)
            self._spawn(_drain(track), "sim-drain")
            return
        audio = track.kind == "audio"
        codec = self._negotiated_codec(track) or info.mime_type.partition("/")[2]
        info.mime_type = f"{track.kind}/{codec}"
        logger.info("%s publishes %s track %s (%s)", repr(self), track.kind, info.sid, codec)
        frames = TrackFanout(track.kind, AUDIO_QUEUE if audio else VIDEO_QUEUE)
        publication = Publication(self.sid, info, codec, frames)
        self._publications[info.sid] = publication
        self._room.tracks_changed(self)
        pump = (self._room.read_microphone(self.identity, track, frames) if audio
                else _forward(track, frames))
        self._spawn(self._publish(track, publication, pump), f"sim-publish-{track.kind}")

    def _negotiated_codec(self, track: MediaStreamTrack) -> str | None:
        """What the client sends the track in: the first codec of its m-line's answer (the
        SDKs do not always name it in the AddTrackRequest)."""
        pc = self._publisher
        for transceiver in pc.getTransceivers() if pc is not None else ():
            if transceiver.receiver.track is track:
                codecs = [c for c in transceiver._codecs if c.name.lower() != "rtx"]
                return codecs[0].name if codecs else None
        return None

    def _end_unpublished(self, pc: RTCPeerConnection) -> None:
        """A LiveKit client unpublishes by renegotiating its m-line to stop sending (aiortc
        keeps the receiving track alive): such tracks stop being forwarded."""
        for transceiver in pc.getTransceivers():
            track = transceiver.receiver.track
            if track is not None and transceiver._offerDirection in ("sendonly", "inactive"):
                task = self._forwarding.pop(track, None)
                if task is not None:
                    task.cancel()

    async def _publish(self, track: MediaStreamTrack, publication: Publication,
                       pump: Coroutine[Any, Any, None]) -> None:
        """Forward a published track until it ends or is unpublished."""
        task = asyncio.current_task()
        assert task is not None
        self._forwarding[track] = task
        try:
            await pump
        finally:
            self._forwarding.pop(track, None)
            publication.frames.stop()
            if self._publications.pop(publication.info.sid, None) is not None \
                    and not self._closing:
                self._room.tracks_changed(self)

    def _on_client_channel(self, channel: RTCDataChannel) -> None:
        if channel.label in ("_reliable", "_lossy"):
            channel.on("message", functools.partial(self._on_data_message, channel.label == "_reliable"))
        else:
            # e.g. "_data_track" (livekit-client 2.2x): data tracks, not DataPackets.
            logger.debug("%s: ignoring data channel %s", repr(self), channel.label)

    def _on_data_message(self, reliable: bool, message: bytes | str) -> None:
        if not isinstance(message, bytes):
            logger.warning("%s: ignoring a text data message (DataPackets are binary)", repr(self))
            return
        try:
            packet = models.DataPacket.FromString(message)
        except DecodeError:
            logger.warning("%s: undecodable data packet", repr(self))
            return
        if not self._grant.can_publish_data:
            logger.warning("%s may not publish data; packet dropped", repr(self))
            return
        self._room.receive_data(self, packet, reliable)

    # -- what the client receives ------------------------------------------------------------------

    def announce(self, participants: list[models.ParticipantInfo]) -> None:
        self._post(signal.SignalResponse(update=signal.ParticipantUpdate(participants=participants)))

    def update_tracks(self, participants: list[models.ParticipantInfo]) -> None:
        """Someone's tracks changed: describe them first, then offer (the SDKs drop a track
        whose participant or TrackInfo they do not know yet)."""
        if participants:
            self.announce(participants)
        self._offer_needed.set()

    def send_data(self, data: bytes, reliable: bool) -> None:
        """Queue one serialized DataPacket on the subscriber's ``_reliable`` / ``_lossy`` channel."""
        if self._closing:
            return
        channel = self._channels.get(reliable)
        if channel is None or channel.readyState != "open":
            if len(self._backlog) == self._backlog.maxlen:
                self.data_dropped += 1
            self._backlog.append((data, reliable))
        elif channel.bufferedAmount > MAX_CHANNEL_BUFFER:
            self.data_dropped += 1
        else:
            channel.send(data)

    def _open_data_channels(self) -> None:
        # In dual-PC mode the client receives on the channels the *server* opens.
        pc = self._subscriber
        self._channels[True] = pc.createDataChannel("_reliable", ordered=True)
        self._channels[False] = pc.createDataChannel("_lossy", ordered=False, maxRetransmits=0)
        for reliable, channel in self._channels.items():
            channel.on("open", self._flush_backlog)
            channel.on("message", functools.partial(self._on_data_message, reliable))

    def _flush_backlog(self) -> None:
        waiting = list(self._backlog)
        self._backlog.clear()
        for data, reliable in waiting:
            self.send_data(data, reliable)

    async def _negotiate_loop(self) -> None:
        """Offer the subscriber connection whenever the room's tracks change; one offer at
        a time, each answered before the next (changes meanwhile coalesce into one offer)."""
        pc = self._subscriber
        while True:
            await self._offer_needed.wait()
            self._offer_needed.clear()
            async with self._peer_lock:
                self._sync_tracks()
                await pc.setLocalDescription(await pc.createOffer())
            self._offer_id += 1
            self._answered.clear()
            self._post(signal.SignalResponse(offer=signal.SessionDescription(
                type="offer", sdp=pc.localDescription.sdp, id=self._offer_id)))
            try:
                async with asyncio.timeout(ANSWER_TIMEOUT):
                    await self._answered.wait()
            except TimeoutError:
                logger.warning("%r: no answer to offer %d in %.0f s; dropping it",
                               self, self._offer_id, ANSWER_TIMEOUT)
                self._hang_up()
                return

    def _sync_tracks(self) -> None:
        """Make the subscriber connection carry exactly the room's other tracks."""
        pc = self._subscriber
        wanted = {p.info.sid: p for p in self._room.publications(exclude=self)} \
            if self._grant.can_subscribe else {}
        for sid, (publication, feed, transceiver) in list(self._senders.items()):
            if sid not in wanted or wanted[sid].frames is not publication.frames:
                # aiortc cannot remove a transceiver: its track ends and it goes inactive.
                publication.frames.unsubscribe(feed)
                transceiver.direction = "inactive"
                del self._senders[sid]
        for sid, publication in wanted.items():
            if sid in self._senders:
                continue
            feed = publication.frames.subscribe()
            transceiver = pc.addTransceiver(feed, direction="sendonly")
            transceiver.setCodecPreferences(_codecs(feed.kind, publication.codec))
            # msid "<participant sid>|<track sid>" is how the SDKs map a track to its
            # TrackInfo. aiortc has no API for it, but createOffer writes these attributes.
            transceiver.sender._stream_id = f"{publication.participant_sid}|{sid}"
            transceiver.sender._track_id = sid
            self._senders[sid] = (publication, feed, transceiver)


async def _drain(track: MediaStreamTrack) -> None:
    with contextlib.suppress(MediaStreamError):
        while True:
            await track.recv()


async def _forward(track: MediaStreamTrack, frames: TrackFanout) -> None:
    with contextlib.suppress(MediaStreamError):
        while True:
            frame = await track.recv()
            assert isinstance(frame, av.VideoFrame)  # aiortc's receivers decode
            frames.push(frame)
