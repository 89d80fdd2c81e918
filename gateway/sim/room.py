"""A simulated LiveKit room: connected SDK clients plus the avatar participant ``heygen``.

The room is the meeting point of the signaling connections (:mod:`gateway.sim.signaling`,
one per joined client) and the avatar (the embedded :class:`LocalUpstream`, publishing a video
and an audio track and HeyGen's data events). It also listens to what clients publish: their
microphone audio is decoded, measured and run through a small energy VAD, and their data
packets reach :attr:`Room.on_data`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import av
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from livekit.protocol import models

from ..avatar import SpeechSynthesizer
from ..config import QualityTier
from ..errors import Conflict
from ..media.vad import EnergyVad, Voice, pcm_level
from ..upstream.base import AvatarEvent, EventType, SpeakResult
from ..upstream.local import LocalUpstream
from .media import Publication, TrackFanout

if TYPE_CHECKING:
    from .signaling import ClientConnection

logger = logging.getLogger(__name__)

State = models.ParticipantInfo.State

AVATAR_IDENTITY = "heygen"
VIDEO_FPS = 30
# Per-subscriber queues: two video frames (~66 ms) and five 20 ms audio frames.
VIDEO_QUEUE = 2
AUDIO_QUEUE = 5
MIC_SILENCE_TICK = 0.25
"""With DTX a silent microphone sends (almost) no packets; after this long without a frame
the VAD is told that much silence passed, so ``user_stop`` still fires on time."""


def new_sid(prefix: str) -> str:
    """A LiveKit-style id: the SDKs require ``PA_`` for participants and ``TR_`` for tracks."""
    return prefix + secrets.token_hex(6)


class AgentParticipant:
    """A participant that publishes no tracks, only data: LiveAvatar's FULL-mode agent
    (``liveavatar-agent-<session_id>``), which the official web SDK waits for and whose
    ``agent-response`` packets carry the session's events."""

    def __init__(self, identity: str) -> None:
        self.identity = identity
        self.sid = new_sid("PA_")
        self.joined_at = time.time()
        self._version = 0

    def info(self, state: State = models.ParticipantInfo.ACTIVE) -> models.ParticipantInfo:
        self._version += 1
        return models.ParticipantInfo(
            sid=self.sid, identity=self.identity, name=self.identity, state=state,
            joined_at=int(self.joined_at), joined_at_ms=int(self.joined_at * 1000),
            version=self._version, kind=models.ParticipantInfo.AGENT,
            permission=models.ParticipantPermission(can_subscribe=True, can_publish_data=True))


def heygen_event_json(event: AvatarEvent) -> bytes | None:
    """HeyGen's wire format: the event as a UTF-8 JSON object (``type``, ``task_id``, ...)."""
    return event.to_json().encode()


@dataclass(frozen=True, slots=True)
class AvatarSpec:
    quality: QualityTier
    voice: str = "en-us"
    video_codec: str = "VP8"
    """``VP8`` or ``H264`` (HeyGen's ``video_encoding``): the only video codec offered."""
    event_topic: str = ""
    """Data topic of avatar events: empty for HeyGen, ``agent-response`` for LiveAvatar."""
    encode_event: Callable[[AvatarEvent], bytes | None] = heygen_event_json
    """Payload of one event; ``None`` means the event is not sent."""
    identity: str = AVATAR_IDENTITY
    """The avatar's participant identity: ``heygen``, or the identity in the token of a
    LiveAvatar ``livekit_config`` (the operator's own room)."""
    event_sender: str | None = None
    """Who the avatar's events appear to come from: None for the avatar itself, LiveAvatar
    FULL mode's agent participant otherwise."""

    def __post_init__(self) -> None:
        if self.video_codec not in ("VP8", "H264"):
            raise ValueError(f"video_codec must be VP8 or H264, not {self.video_codec!r}")


def _reason(reason: str) -> models.DisconnectReason:
    """``"room_deleted"`` -> ``ROOM_DELETED``; unknown names count as a deleted room."""
    try:
        return cast(models.DisconnectReason, models.DisconnectReason.Value(reason.upper()))
    except ValueError:
        return models.ROOM_DELETED


def _guarded(name: str, callback: Callable[..., None] | None, *args: object) -> None:
    """Run an owner's callback from a network event handler: an exception there must not tear
    down the SCTP or RTP machinery that called us, so it is logged (with a traceback) instead."""
    if callback is None:
        return
    try:
        callback(*args)
    except Exception:
        logger.exception("room callback %s%r failed", name, args)


class AvatarParticipant:
    """The ``heygen`` participant: the local avatar's media and events, sent to every client.

    It is the :class:`~gateway.upstream.base.MediaSink` of its :class:`LocalUpstream` and
    fans each frame out to one :class:`FeedTrack` per subscribed client.
    """

    def __init__(self, room: Room, spec: AvatarSpec) -> None:
        self.identity = spec.identity
        self.sid = new_sid("PA_")
        self.video_sid = new_sid("TR_")
        self.audio_sid = new_sid("TR_")
        self.spec = spec
        self.joined_at = time.time()
        self._room = room
        self._upstream: LocalUpstream | None = None
        self._video = TrackFanout("video", VIDEO_QUEUE)
        self._audio = TrackFanout("audio", AUDIO_QUEUE)
        self._talking: set[str] = set()
        self._queued: set[str] = set()
        self._version = 1
        self._gone = False

    # -- lifecycle ------------------------------------------------------------------------------

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        # The first use of a voice takes eSpeak's process-wide lock: not on the loop.
        synthesizer = await loop.run_in_executor(None, SpeechSynthesizer, self.spec.voice)
        upstream = LocalUpstream(self.spec.quality, synthesizer, fps=VIDEO_FPS)
        self._upstream = upstream
        await upstream.start(self)

    async def _stop(self) -> None:
        self._gone = True
        self._video.stop()
        self._audio.stop()
        self._talking.clear()
        self._queued.clear()
        if self._upstream is not None:
            # Shielded: a cancelled caller must not leave the media clocks running.
            await asyncio.shield(self._upstream.stop())

    async def leave(self) -> None:
        """Leave the room (fault "avatar leaves"): clients see it disconnect; the room stays."""
        await self._room._avatar_left(self)

    # -- what clients see --------------------------------------------------------------------------

    def publications(self) -> list[Publication]:
        quality = self.spec.quality
        video = models.TrackInfo(
            sid=self.video_sid, type=models.VIDEO, name="avatar_video", source=models.CAMERA,
            mime_type=f"video/{self.spec.video_codec}", width=quality.width, height=quality.height,
            layers=[models.VideoLayer(quality=models.HIGH, width=quality.width,
                                      height=quality.height, bitrate=quality.bitrate)])
        audio = models.TrackInfo(
            sid=self.audio_sid, type=models.AUDIO, name="avatar_audio", source=models.MICROPHONE,
            mime_type="audio/opus")
        return [Publication(self.sid, video, self.spec.video_codec, self._video),
                Publication(self.sid, audio, "opus", self._audio)]

    def info(self, state: State = models.ParticipantInfo.ACTIVE) -> models.ParticipantInfo:
        self._version += 1
        tracks = [] if state == models.ParticipantInfo.DISCONNECTED else [
            p.info for p in self.publications()]
        return models.ParticipantInfo(
            sid=self.sid, identity=self.identity, name=self.identity, state=state, tracks=tracks,
            joined_at=int(self.joined_at), joined_at_ms=int(self.joined_at * 1000),
            version=self._version, is_publisher=True, kind=models.ParticipantInfo.STANDARD,
            permission=models.ParticipantPermission(can_subscribe=True, can_publish=True,
                                                    can_publish_data=True))

    # -- MediaSink (called by LocalUpstream on the loop) ------------------------------------------

    @property
    def video_wanted(self) -> bool:
        return self._video.wanted

    def on_video_frame(self, frame: av.VideoFrame) -> None:
        self._video.push(frame)

    def on_audio_frame(self, frame: av.AudioFrame) -> None:
        self._audio.push(frame)

    def on_event(self, event: AvatarEvent) -> None:
        if event.task_id is not None:
            if event.type is EventType.AVATAR_START_TALKING:
                self._talking.add(event.task_id)
            elif event.type is EventType.AVATAR_STOP_TALKING:
                self._talking.discard(event.task_id)
                self._queued.discard(event.task_id)
        payload = self.spec.encode_event(event)
        if payload is not None and not self._gone:
            self._room._broadcast(payload, topic=self.spec.event_topic,
                                  sender=self.spec.event_sender or self.identity,
                                  reliable=True, destination=None)

    def on_upstream_ended(self, reason: str) -> None:
        logger.error("room %s: the avatar's media ended (%s); it leaves", self._room.name, reason)
        self._room._spawn(self.leave(), "sim-avatar-leave")

    # -- control ---------------------------------------------------------------------------------

    async def speak(self, text: str) -> SpeakResult:
        if self._gone or self._upstream is None:
            raise Conflict("the avatar has left the room")
        result = await self._upstream.speak(text)
        if self._gone:  # left while the speech was being synthesized
            raise Conflict("the avatar has left the room")
        # Nothing awaited since the utterance was scheduled (60 ms ahead): no event yet.
        self._queued.add(result.task_id)
        return result

    async def speak_audio(self, pcm: bytes, sample_rate: int, *, task_id: str | None = None,
                          final: bool = True) -> SpeakResult:
        """Lip-sync audio a client sent (LiveAvatar LITE): 16-bit mono PCM at ``sample_rate``;
        a stream of chunks with ``task_id``/``final`` (see :meth:`LocalUpstream.speak_audio`).
        Raises :class:`~gateway.errors.Conflict` once the avatar left or the stream ended."""
        if self._gone or self._upstream is None:
            raise Conflict("the avatar has left the room")
        result = await self._upstream.speak_audio(pcm, sample_rate, task_id=task_id, final=final)
        if self._gone:
            raise Conflict("the avatar has left the room")
        if task_id is None and result.task_id not in self._talking:
            self._queued.add(result.task_id)
        return result

    async def end_audio(self, task_id: str) -> None:
        """Close an audio stream: it ends once its audio has played."""
        if self._upstream is not None and not self._gone:
            await self._upstream.end_audio(task_id)

    async def interrupt(self) -> None:
        if self._upstream is not None and not self._gone:
            await self._upstream.interrupt()
            # Queued utterances that never started are dropped without events.
            self._queued &= self._talking

    @property
    def speaking(self) -> bool:
        """An utterance is playing or queued."""
        return bool(self._talking or self._queued)


class Room:
    """One room: its clients (one :class:`ClientConnection` each) and at most one avatar."""

    def __init__(self, name: str, on_closed: Callable[[Room], None] | None = None) -> None:
        self.name = name
        self.sid = new_sid("RM_")
        self.created = time.time()
        self.on_data: Callable[[str, str, bytes], None] | None = None
        self.on_client: Callable[[str, bool], None] | None = None
        self.on_voice: Callable[[str, str], None] | None = None
        self.on_microphone: Callable[[str, av.AudioFrame], None] | None = None
        """Every decoded frame of a client's microphone, listening or not (speech recognition)."""
        self.mic_frames = 0
        self.mic_peak = 0
        self._on_closed = on_closed
        self._connections: dict[str, ClientConnection] = {}
        self._avatar: AvatarParticipant | None = None
        self._agents: dict[str, AgentParticipant] = {}
        self._starting = False
        self._listening = False
        self._vads: dict[str, EnergyVad] = {}
        self._sequence = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._closer: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Room {self.name} {self.sid} clients={self.clients}>"

    @property
    def clients(self) -> list[str]:
        return list(self._connections)

    def connection(self, identity: str) -> ClientConnection | None:
        """The signaling connection of a client (tests inspect its peer connections)."""
        return self._connections.get(identity)

    @property
    def avatar(self) -> AvatarParticipant | None:
        return self._avatar

    @property
    def agents(self) -> list[str]:
        """Identities of the data-only agent participants."""
        return list(self._agents)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def listening(self) -> bool:
        return self._listening

    @listening.setter
    def listening(self, value: bool) -> None:
        # Each listening period starts from silence: no stale "speaking" state carries over.
        if value != self._listening:
            self._listening = value
            self._vads.clear()

    def info(self) -> models.Room:
        return models.Room(
            sid=self.sid, name=self.name, creation_time=int(self.created),
            creation_time_ms=int(self.created * 1000), empty_timeout=300, departure_timeout=20,
            num_participants=len(self._connections) + len(self._agents) + (self._avatar is not None),
            num_publishers=int(self._avatar is not None))

    def participants(self, exclude: ClientConnection | None = None) -> list[models.ParticipantInfo]:
        """Everyone a client sees: the avatar, the agents and the other clients that are not
        hidden, with the tracks they publish."""
        out = [self._avatar.info()] if self._avatar is not None else []
        out += [a.info() for a in self._agents.values()]
        out += [c.info() for c in self._connections.values() if c is not exclude and not c.hidden]
        return out

    def publications(self, exclude: ClientConnection | None = None) -> list[Publication]:
        """Every track a client can subscribe to: the avatar's and the other clients'. Like
        LiveKit's SFU, the room forwards what anyone publishes to everyone else (here by
        decoding it once and encoding it per subscriber)."""
        out = self._avatar.publications() if self._avatar is not None else []
        for connection in self._connections.values():
            if connection is not exclude:
                out += connection.publications()
        return out

    def tracks_changed(self, connection: ClientConnection) -> None:
        """A client published or unpublished a track: the others learn it, then get offers."""
        info = connection.info()
        for other in self._connections.values():
            if other is not connection:
                other.update_tracks([] if connection.hidden else [info])

    # -- clients (called by the signaling connections) ----------------------------------------------

    def attach(self, connection: ClientConnection) -> None:
        """Register a client that is about to receive its JoinResponse. Like LiveKit, a second
        client with the same identity replaces the first one, which is sent away with
        DUPLICATE_IDENTITY."""
        if self._closed:
            raise Conflict(f"room {self.name} is closed")
        previous = self._connections.get(connection.identity)
        self._connections[connection.identity] = connection
        if previous is not None:
            self._spawn(previous.leave(models.DUPLICATE_IDENTITY), "sim-duplicate-leave")
        if not connection.hidden:
            info = connection.info()
            for other in self._connections.values():
                if other is not connection:
                    other.announce([info])
        if previous is None:
            _guarded("on_client", self.on_client, connection.identity, True)

    def detach(self, connection: ClientConnection) -> None:
        if self._connections.get(connection.identity) is not connection:
            return  # replaced by a newer connection with the same identity
        del self._connections[connection.identity]
        self._vads.pop(connection.identity, None)
        gone = [] if connection.hidden else [connection.info(models.ParticipantInfo.DISCONNECTED)]
        published = bool(connection.publications())
        for other in self._connections.values():
            if published:
                other.update_tracks(gone)
            elif gone:
                other.announce(gone)
        _guarded("on_client", self.on_client, connection.identity, False)

    def receive_data(self, connection: ClientConnection, packet: models.DataPacket, reliable: bool) -> None:
        """A data packet a client published. User packets reach :attr:`on_data` (unless they
        are addressed only to other clients); every packet is forwarded to the other clients
        it is addressed to, stamped with its sender, as LiveKit does (so RPC and data streams
        between clients work too)."""
        kind = packet.WhichOneof("value")
        destination = list(packet.destination_identities)
        if kind == "user":
            user = packet.user
            destination = destination or list(user.destination_identities)
            avatar = self._avatar.identity if self._avatar is not None else AVATAR_IDENTITY
            to_provider = avatar in destination or not self._agents.keys().isdisjoint(destination)
            if not destination or to_provider:
                _guarded("on_data", self.on_data, connection.identity, user.topic, user.payload)
            user.participant_identity = connection.identity
            user.participant_sid = connection.sid
        else:
            logger.debug("room %s: %s packet from %s", self.name, kind, connection.identity)
        packet.participant_identity = connection.identity
        packet.participant_sid = connection.sid
        data = packet.SerializeToString()
        for other in self._connections.values():
            if other is not connection and (not destination or other.identity in destination):
                other.send_data(data, reliable)

    async def read_microphone(self, identity: str, track: MediaStreamTrack,
                              forward: TrackFanout | None = None) -> None:
        """Decode one client's published audio until it ends: count, measure, detect voice,
        and hand each frame to ``forward`` (the other clients' copies)."""
        while True:
            try:
                async with asyncio.timeout(MIC_SILENCE_TICK):
                    frame = await track.recv()
            except TimeoutError:
                self._voice(identity, 0.0, MIC_SILENCE_TICK)
                continue
            except MediaStreamError:
                break
            assert isinstance(frame, av.AudioFrame)
            if forward is not None:
                forward.push(frame)
            rms, peak = pcm_level(frame)
            self.mic_frames += 1
            self.mic_peak = max(self.mic_peak, peak)
            _guarded("on_microphone", self.on_microphone, identity, frame)
            self._voice(identity, rms, frame.samples / frame.sample_rate)
        vad = self._vads.pop(identity, None)
        if vad is not None and vad.speaking and self._listening:
            _guarded("on_voice", self.on_voice, identity, str(Voice.STOP))

    def _voice(self, identity: str, rms: float, duration: float) -> None:
        if not self._listening:
            return
        vad = self._vads.setdefault(identity, EnergyVad())
        change = vad.update(rms, duration)
        if change is not None:
            logger.debug("room %s: %s from %s", self.name, change, identity)
            _guarded("on_voice", self.on_voice, identity, str(change))

    # -- data from the room -----------------------------------------------------------------------

    async def send_data(self, payload: bytes, *, topic: str = "", sender: str = AVATAR_IDENTITY,
                        reliable: bool = True, destination: list[str] | None = None) -> None:
        """Send a user data packet to the clients (all, or those in ``destination``) as if
        participant ``sender`` had published it."""
        self._broadcast(payload, topic=topic, sender=sender, reliable=reliable, destination=destination)

    def _broadcast(self, payload: bytes, *, topic: str, sender: str, reliable: bool,
                   destination: list[str] | None) -> None:
        sender_sid = ""
        if self._avatar is not None and sender == self._avatar.identity:
            sender_sid = self._avatar.sid
        elif sender in self._agents:
            sender_sid = self._agents[sender].sid
        elif sender in self._connections:
            sender_sid = self._connections[sender].sid
        self._sequence += 1
        packet = models.DataPacket(
            kind=models.DataPacket.RELIABLE if reliable else models.DataPacket.LOSSY,
            participant_identity=sender, participant_sid=sender_sid,
            destination_identities=destination or [], sequence=self._sequence,
            user=models.UserPacket(payload=payload, topic=topic, participant_identity=sender,
                                   participant_sid=sender_sid))
        data = packet.SerializeToString()
        for connection in self._connections.values():
            if connection.identity != sender and (not destination or connection.identity in destination):
                connection.send_data(data, reliable)

    # -- the avatar --------------------------------------------------------------------------------

    async def start_avatar(self, spec: AvatarSpec) -> AvatarParticipant:
        """Join the avatar (identity ``heygen``): it publishes video at the spec's size, 30 fps,
        and 48 kHz mono audio. Raises :class:`~gateway.errors.Conflict` if one is present."""
        if self._closed:
            raise Conflict(f"room {self.name} is closed")
        if self._avatar is not None or self._starting:
            raise Conflict(f"room {self.name} already has an avatar")
        self._starting = True
        avatar = AvatarParticipant(self, spec)
        try:
            await avatar._start()
        except BaseException:
            await avatar._stop()
            raise
        finally:
            self._starting = False
        if self.closed:  # closed while the avatar was starting
            await avatar._stop()
            raise Conflict(f"room {self.name} closed while the avatar was starting")
        self._avatar = avatar
        info = avatar.info()
        for connection in self._connections.values():
            connection.update_tracks([info])
        logger.info("room %s: avatar %s joined (%s %dx%d)", self.name, avatar.sid,
                    spec.video_codec, spec.quality.width, spec.quality.height)
        return avatar

    async def _avatar_left(self, avatar: AvatarParticipant) -> None:
        if self._avatar is not avatar:
            return
        self._avatar = None
        gone = avatar.info(models.ParticipantInfo.DISCONNECTED)
        for connection in self._connections.values():
            connection.update_tracks([gone])
        await avatar._stop()
        logger.info("room %s: avatar %s left", self.name, avatar.sid)

    def add_agent(self, identity: str) -> AgentParticipant:
        """A data-only participant joins (see :class:`AgentParticipant`); idempotent."""
        if self._closed:
            raise Conflict(f"room {self.name} is closed")
        agent = self._agents.get(identity)
        if agent is None:
            agent = self._agents[identity] = AgentParticipant(identity)
            info = agent.info()
            for connection in self._connections.values():
                connection.announce([info])
        return agent

    def remove_agent(self, identity: str) -> None:
        agent = self._agents.pop(identity, None)
        if agent is not None:
            gone = agent.info(models.ParticipantInfo.DISCONNECTED)
            for connection in self._connections.values():
                connection.announce([gone])

    # -- faults and the end -----------------------------------------------------------------------

    async def drop_clients(self) -> None:
        """Fault "room dropped": cut every client's signaling socket and peer connections at
        once, with no LeaveRequest. The room and its avatar stay, so clients may come back.

        The Python SDK (1.2.0) notices at once (``reconnecting``), tries to resume (refused:
        resuming is not simulated), then rejoins from scratch within about 0.3 s: it sees the
        avatar disconnect and connect again, ``reconnected``, and media flows again.
        """
        await asyncio.gather(*(c.abort() for c in list(self._connections.values())))

    async def close(self, reason: str = "room_deleted") -> None:
        """Send every client a LeaveRequest (DISCONNECT), stop the avatar, forget the room.

        Idempotent. The work runs to completion in a task of its own, even if the caller (an
        HTTP handler whose client hung up, say) is cancelled.
        """
        if self._closer is None:
            self._closed = True
            if self._on_closed is not None:
                self._on_closed(self)
            self._closer = asyncio.get_running_loop().create_task(self._close(reason), name="sim-room-close")
        await asyncio.shield(self._closer)

    async def _close(self, reason: str) -> None:
        why = _reason(reason)
        await asyncio.gather(*(c.leave(why) for c in list(self._connections.values())))
        avatar, self._avatar = self._avatar, None
        self._agents.clear()
        if avatar is not None:
            await avatar._stop()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        logger.info("room %s closed (%s)", self.name, reason)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("room %s: task %s failed", self.name, task.get_name(), exc_info=task.exception())
