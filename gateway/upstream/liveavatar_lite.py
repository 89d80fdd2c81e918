"""LiveAvatar LITE mode: the avatar lip-syncs audio the gateway sends; the gateway speaks.

The protocol is the one LiveKit's ``livekit-plugins-liveavatar`` (1.8.9, ``avatar.py``) speaks,
the provider's own reference for LITE. ``sessions/token`` asks for ``mode: "LITE"``;
``sessions/start`` answers a ``ws_url`` next to the LiveKit room. Over that websocket go JSON
text frames:

* to the avatar: ``agent.speak {event_id, audio}`` (base64 of 24 kHz 16-bit mono PCM; a first
  chunk of ~0.5 s so the lips start early, then 1 s chunks; at most 1 MB a frame),
  ``agent.speak_end {event_id}`` after the last chunk of an utterance, ``agent.interrupt``,
  ``session.keep_alive`` (at least every 60 s);
* from the avatar: ``session.state_updated {state}`` (nothing may be sent before
  ``connected``; ``closing``/``closed`` end the session), ``agent.speak_started``,
  ``agent.speak_ended``, ``agent.speak_interrupted``,
  ``agent.audio_buffer_appended|committed|cleared``, ``error``.

The avatar's video and the audio it plays still arrive through the room (participant
``heygen``). The gateway emits the same events as its other upstreams, with the speak call's
task id, timed with the speech: ``avatar_start_talking`` when the avatar reports it started,
``avatar_talking_message`` word by word on the speech's own word timings, then
``avatar_end_message`` and ``avatar_stop_talking``. Utterances play one after another (the
next one's audio is sent once the previous has ended), so every avatar report belongs to the
utterance in flight. A socket that drops is a lost link: the session rejoins like a dropped
room (:class:`~gateway.upstream.cloud.RoomUpstream`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from ..config import QualityTier
from ..errors import BadRequest, CapacityError, Unprocessable, UpstreamUnavailable
from ..livekit_out import OperatorRoom
from .base import AvatarEvent, EventType, SpeakResult, TaskType
from .billing import BillingGuard
from .cloud import ProviderSession, ReconnectPolicy, RoomCredentials
from .liveavatar import LiveAvatarClient, LiveAvatarUpstream, stop_reason
from .speech import BYTES_PER_SECOND, Speech, Voice

logger = logging.getLogger(__name__)

FIRST_CHUNK_SECONDS = 0.5
"""The plugin's first chunk is 0.6 s at most: the avatar starts moving its lips sooner."""
CHUNK_SECONDS = 1.0
KEEP_ALIVE_SECONDS = 60.0
"""The plugin's interval; any frame sent restarts it."""
MAX_FRAME_BYTES = 1 << 20
"""Larger frames than LiveAvatar accepts (1 MB) are neither sent nor read."""
MAX_QUEUED = 16
"""Utterances waiting to be spoken; a chat answer queues one per sentence."""
START_WITHIN = 5.0
"""How long the avatar may take to report ``agent.speak_started`` before the gateway times the
events from its own clock instead."""
END_GRACE = 3.0
"""How long after the audio's end the avatar may take to report ``agent.speak_ended``."""


class LiteSocket:
    """The session's websocket: JSON frames out (serialised), server events in."""

    def __init__(self, http: aiohttp.ClientSession, url: str, *,
                 on_event: Callable[[dict[str, Any]], None], on_lost: Callable[[str], None],
                 keep_alive: float = KEEP_ALIVE_SECONDS) -> None:
        self._http = http
        self._url = url
        self._on_event = on_event
        self._on_lost = on_lost
        self._keep_alive = keep_alive
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._send_lock = asyncio.Lock()
        self._connected = asyncio.Event()
        self._last_sent = 0.0
        self._closing = False

    @property
    def connected(self) -> bool:
        return self._connected.is_set() and not self._closing

    async def open(self, within: float) -> None:
        """Connect and return once the avatar reports ``connected``."""
        try:
            async with asyncio.timeout(within):
                self._ws = await self._http.ws_connect(self._url, max_msg_size=MAX_FRAME_BYTES,
                                                       autoping=True)
                loop = asyncio.get_running_loop()
                reader = loop.create_task(self._read(self._ws), name="liveavatar-lite-read")
                self._tasks = [reader,
                               loop.create_task(self._keep(), name="liveavatar-lite-keepalive")]
                connected = loop.create_task(self._connected.wait())
                try:
                    # A socket the avatar closes before 'connected' fails now, not at the timeout.
                    await asyncio.wait((connected, reader), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    connected.cancel()
        except TimeoutError:
            await self.close()
            raise UpstreamUnavailable(f"LiveAvatar's websocket did not report 'connected' "
                                      f"within {within:g} s") from None
        except aiohttp.WSServerHandshakeError as exc:
            # Never the exception's text: it carries the URL, whose query authenticates us.
            await self.close()
            raise UpstreamUnavailable(f"LiveAvatar's websocket refused the connection "
                                      f"(HTTP {exc.status})") from None
        except aiohttp.ClientError as exc:
            await self.close()
            raise UpstreamUnavailable(f"cannot open LiveAvatar's websocket "
                                      f"({type(exc).__name__})") from None
        except BaseException:
            await asyncio.shield(self.close())
            raise
        if not self._connected.is_set() or self._ws is None or self._ws.closed:
            await self.close()
            raise UpstreamUnavailable("LiveAvatar's websocket closed before it reported "
                                      "'connected'")

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        reason = "liveavatar_socket_closed"
        try:
            async for message in ws:
                if message.type is aiohttp.WSMsgType.TEXT:
                    self._dispatch(message.data)
                elif message.type is aiohttp.WSMsgType.ERROR:
                    reason = f"liveavatar_socket_error:{type(ws.exception()).__name__}"
                    break
        finally:
            was_connected = self._connected.is_set()
            self._connected.clear()
            if not self._closing:
                self._closing = True
                logger.info("LiveAvatar websocket lost (%s, code %s)", reason, ws.close_code)
                if was_connected:
                    self._on_lost(reason)

    def _dispatch(self, text: str) -> None:
        try:
            body = json.loads(text)
        except json.JSONDecodeError:
            logger.warning("LiveAvatar websocket: a frame that is not JSON (%d characters)",
                           len(text))
            return
        if not isinstance(body, dict) or not isinstance(body.get("type"), str):
            logger.warning("LiveAvatar websocket: a frame without a type")
            return
        if body["type"] == "session.state_updated" and body.get("state") == "connected":
            self._connected.set()
        self._on_event(body)

    async def _keep(self) -> None:
        loop = asyncio.get_running_loop()
        await self._connected.wait()
        self._last_sent = loop.time()
        while True:
            await asyncio.sleep(max(0.0, self._last_sent + self._keep_alive - loop.time()))
            if loop.time() >= self._last_sent + self._keep_alive and self.connected:
                with contextlib.suppress(UpstreamUnavailable):
                    await self.send("session.keep_alive")

    async def send(self, kind: str, **fields: Any) -> None:
        """One frame ``{"type": kind, "event_id": ..., **fields}``, in order with the others."""
        frame = json.dumps({"type": kind, "event_id": str(uuid.uuid4()), **fields},
                           separators=(",", ":"))
        if len(frame) > MAX_FRAME_BYTES:
            raise ValueError(f"a {kind} frame of {len(frame)} bytes is over LiveAvatar's 1 MB")
        async with self._send_lock:
            ws = self._ws
            if ws is None or ws.closed or not self.connected:
                raise UpstreamUnavailable("LiveAvatar's websocket is not connected")
            try:
                await ws.send_str(frame)
            except (ConnectionError, aiohttp.ClientError) as exc:
                raise UpstreamUnavailable(f"LiveAvatar's websocket failed: {exc}") from None
            self._last_sent = asyncio.get_running_loop().time()

    async def close(self) -> None:
        """Close the socket and stop its tasks. Idempotent; never reports a loss."""
        self._closing = True
        self._connected.clear()
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._ws is not None:
            await self._ws.close()


@dataclass(slots=True)
class _Utterance:
    task_id: str
    speech: Speech
    started: asyncio.Event = field(default_factory=asyncio.Event)
    """The avatar reported ``agent.speak_started``..."""
    started_at: float | None = None
    """... at this loop time."""
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    """The avatar reported the end, the gateway interrupted it, or the link went away."""
    cut: bool = False
    """Ended early: words not yet said are not reported."""


def audio_chunks(pcm: bytes) -> list[bytes]:
    """The plugin's cadence: ~0.5 s first, then 1 s chunks (whole 16-bit samples)."""
    first = int(FIRST_CHUNK_SECONDS * BYTES_PER_SECOND)
    rest = int(CHUNK_SECONDS * BYTES_PER_SECOND)
    chunks, position, size = [], 0, first
    while position < len(pcm):
        chunks.append(pcm[position:position + size])
        position += size
        size = rest
    return chunks


class LiveAvatarLiteUpstream(LiveAvatarUpstream):
    """A LiveAvatar LITE session: the gateway's voice (:class:`Voice`), the avatar's lips."""

    mode = "LITE"
    answers_itself = False
    listens = False

    def __init__(self, client: LiveAvatarClient, quality: QualityTier, billing: BillingGuard,
                 *, avatar_id: str, voice: Voice, http: aiohttp.ClientSession,
                 encoding: str = "VP8", reconnect: ReconnectPolicy | None = None,
                 room: OperatorRoom | None = None) -> None:
        super().__init__(client, quality, billing, avatar_id=avatar_id, encoding=encoding,
                         reconnect=reconnect, room=room)
        self._voice = voice
        self._http = http
        self._socket: LiteSocket | None = None
        self._ready = asyncio.Event()
        self._queue: asyncio.Queue[_Utterance] = asyncio.Queue(maxsize=MAX_QUEUED)
        self._current: _Utterance | None = None
        self._ordering = asyncio.Lock()
        self._player: asyncio.Task[None] | None = None

    @property
    def voice(self) -> Voice:
        return self._voice

    # -- the link: websocket, then room ------------------------------------------------------

    async def _start_session(self, session: ProviderSession) -> RoomCredentials:
        credentials = await super()._start_session(session)
        if not credentials.ws_url:
            raise UpstreamUnavailable("liveavatar sessions/start: a LITE session came without "
                                      "a ws_url")
        return credentials

    async def _connect(self, credentials: RoomCredentials) -> None:
        assert credentials.ws_url is not None
        socket = LiteSocket(self._http, credentials.ws_url, on_event=self._on_socket_event,
                            on_lost=self._on_lost)
        await socket.open(self._policy.ready_within)
        self._socket = socket
        try:
            await super()._connect(credentials)
        except BaseException:
            self._socket = None
            await asyncio.shield(socket.close())
            raise
        self._ready.set()
        if self._player is None:
            self._player = asyncio.get_running_loop().create_task(
                self._play(), name="liveavatar-lite-player")
            self._player.add_done_callback(self._player_done)

    def _player_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._stopping:
            return
        exc = task.exception()
        logger.error("LiveAvatar LITE session %s: the speech player failed",
                     self.provider_session_id, exc_info=exc)
        self._end(f"the gateway's speech player failed: {exc!r}"[:200])

    async def _disconnect(self) -> None:
        self._ready.clear()
        current = self._current
        if current is not None:
            # Its audio went with the socket: report it ended now.
            current.cut = True
            current.ended.set()
        socket, self._socket = self._socket, None
        if socket is not None:
            await socket.close()
        await super()._disconnect()

    def _decode_event(self, payload: bytes, topic: str) -> list[AvatarEvent]:
        # The gateway reports speech itself (it knows the task ids); from the room only the
        # session's end counts.
        reason = stop_reason(payload, topic)
        if reason is not None:
            self._end(f"the provider stopped the session ({reason})")
        return []

    def _on_socket_event(self, body: dict[str, Any]) -> None:
        kind = body["type"]
        current = self._current
        if kind == "agent.speak_started":
            if current is not None and not current.started.is_set():
                current.started_at = asyncio.get_running_loop().time()
                current.started.set()
        # An end only counts for an utterance the avatar said it started: a late report about
        # an utterance the gateway already cut must not end the next one.
        elif kind == "agent.speak_ended":
            if current is not None and current.started.is_set():
                current.ended.set()
        elif kind in ("agent.speak_interrupted", "agent.audio_buffer_cleared"):
            if current is not None and current.started.is_set():
                current.cut = True
                current.ended.set()
        elif kind == "session.state_updated" and body.get("state") in ("closing", "closed"):
            # The provider is ending the session (its limit, its idle timer, a stop from
            # elsewhere): end now rather than rejoin when the socket closes next.
            self._end(f"the provider closed the session (state {body['state']})")
        elif kind == "session.stopped":
            reason = body.get("stop_reason") or body.get("end_reason") or "unknown"
            self._end(f"the provider stopped the session ({str(reason)[:100]})")
        elif kind == "error":
            detail = body.get("error") or body.get("message") or body
            logger.warning("LiveAvatar session %s reports an error: %s",
                           self.provider_session_id, str(detail)[:300])

    # -- speech ------------------------------------------------------------------------------

    async def speak(self, text: str, task_type: TaskType = TaskType.REPEAT) -> SpeakResult:
        if task_type is not TaskType.REPEAT:
            raise Unprocessable("a LiveAvatar LITE session has no language model of its own: "
                                "use task_type 'repeat' (talk is answered by the gateway's chat)")
        text = text.strip()
        if not text:
            raise BadRequest("text is empty")
        async with self._ordering:  # utterances play in the order they were asked for
            if self._queue.full():
                raise CapacityError(f"{MAX_QUEUED} utterances are already waiting to be spoken",
                                    retry_after=5)
            speech = await self._voice.synthesize(text)
            item = _Utterance(uuid.uuid4().hex, speech)
            self._queue.put_nowait(item)
        return SpeakResult(task_id=item.task_id, duration_ms=round(speech.duration * 1000, 1))

    async def interrupt(self) -> None:
        """Drop what waits, end what plays, and tell the avatar to stop."""
        while not self._queue.empty():
            self._queue.get_nowait()
        current = self._current
        if current is not None:
            current.cut = True
            current.ended.set()
        socket = self._socket
        if socket is not None and socket.connected:
            await socket.send("agent.interrupt")

    async def keep_alive(self) -> None:
        await super().keep_alive()
        socket = self._socket
        if socket is not None and socket.connected:
            with contextlib.suppress(UpstreamUnavailable):
                await socket.send("session.keep_alive")

    async def set_listening(self, listening: bool) -> None:
        raise Unprocessable("a LiveAvatar LITE session does not listen: the gateway speaks "
                            "for it")

    async def _play(self) -> None:
        while True:
            item = await self._queue.get()
            await self._ready.wait()
            self._current = item
            try:
                await self._say(item)
            finally:
                self._current = None

    async def _say(self, item: _Utterance) -> None:
        loop = asyncio.get_running_loop()
        socket = self._socket
        sent_at = loop.time()
        try:
            assert socket is not None
            for chunk in audio_chunks(item.speech.pcm):
                if item.ended.is_set():
                    break
                await socket.send("agent.speak", audio=base64.b64encode(chunk).decode("ascii"))
            if not item.ended.is_set():
                await socket.send("agent.speak_end")
        except UpstreamUnavailable as exc:
            # The socket went: the loss is reported by the socket itself and rejoined.
            logger.info("LiveAvatar LITE: utterance %s not sent: %s", item.task_id, exc.message)
            item.cut = True
            item.ended.set()
        # Time the words from the avatar's own start, or from ours if it says nothing.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(START_WITHIN):
                await _first(item.started, item.ended)
        origin = item.started_at if item.started_at is not None else sent_at
        self._emit(EventType.AVATAR_START_TALKING, item.task_id)
        speech, spoken = item.speech, []
        for word, text in zip(speech.words, speech.chunks, strict=True):
            delay = origin + word.start - loop.time()
            if delay > 0 and not item.ended.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await item.ended.wait()
            if item.cut:
                break
            spoken.append(text)
            self._emit(EventType.AVATAR_TALKING_MESSAGE, item.task_id, message=text)
        if not item.ended.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, origin + speech.duration - loop.time())
                                           + END_GRACE):
                    await item.ended.wait()
        played = min(loop.time() - origin, speech.duration) if item.cut else speech.duration
        self._emit(EventType.AVATAR_END_MESSAGE, item.task_id, message="".join(spoken))
        self._emit(EventType.AVATAR_STOP_TALKING, item.task_id,
                   duration_ms=round(max(0.0, played) * 1000, 1))

    def _emit(self, kind: EventType, task_id: str, **data: object) -> None:
        if self._sink is not None:
            self._sink.on_event(AvatarEvent(kind, task_id, data))

    async def stop(self) -> None:
        player, self._player = self._player, None
        if player is not None:
            player.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await player
        while not self._queue.empty():
            self._queue.get_nowait()
        await super().stop()


async def _first(*events: asyncio.Event) -> None:
    """Return once any of ``events`` is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
