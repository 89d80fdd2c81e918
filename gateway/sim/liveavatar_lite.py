"""LiveAvatar LITE mode: the session's ``ws_url`` websocket, where the client brings the audio.

The protocol is what LiveAvatar's own clients speak: LiveKit's ``livekit-plugins-liveavatar``
(1.8.9, ``avatar.py``) and the web SDK (``@heygen/liveavatar-web-sdk`` 0.0.18,
``sendCommandEventToWebSocket``), with the docs' event list (docs.liveavatar.com, LITE mode
events). Every frame is a JSON text frame with a ``type``.

Client → simulator:

* ``agent.speak {event_id?, audio}``: base64 of 16-bit mono PCM at 24 kHz, appended to the
  current speech (one is opened if none is). The plugin sends ~0.6 s then ~1 s chunks, each
  with a fresh ``event_id``; the web SDK 0.4 s then 1 s chunks sharing one ``event_id``. At
  most 1 MiB per frame (the docs' "max 1MB per packet").
* ``agent.speak_end {event_id}``: the current speech ends once its audio has played.
* ``agent.interrupt``: the speech stops now (5 ms fade), queued audio is dropped.
* ``agent.start_listening``, ``agent.stop_listening``: accepted; the simulator's LITE avatar
  has no listening state to show (INFERRED: the real one changes its idle animation).
* ``session.keep_alive``: the idle timer (5 min) starts over; so does every other command.

Simulator → client (each with ``type`` and ``event_id``):

* ``session.state_updated {state}``: ``connected`` on connect while the avatar is in the
  room (``connecting`` if it is not), ``closing`` and ``closed`` when the session ends; then
  the socket closes (code 1000).
* ``agent.audio_buffer_appended`` per accepted chunk and ``agent.audio_buffer_committed`` per
  ``speak_end`` (``event_id`` = the command's), ``agent.audio_buffer_cleared`` per interrupt.
* ``agent.speak_started {event_id, task: {id}}`` when the speech's first sample plays,
  ``agent.speak_ended`` (same ids) after its last; an interrupted speech sends
  ``agent.speak_interrupted`` right before its ``agent.speak_ended``. ``event_id`` is the
  first chunk's (a fresh id if it had none); ``task.id`` is the simulator's task id.
* ``error {error: {code, message, source_event_id}}`` for bad input: a non-JSON or binary
  frame, an unknown ``type``, bad base64, odd or empty PCM, a frame over 1 MiB, speech while
  the avatar is away. Bad input never ends the session or the connection.

One connection per session at a time: a new one replaces the old (closed with 4001), so a
client that lost its connection can come back. Audio plays as it arrives: each chunk is put
right after the previous one on the avatar's media clock, gap-free while the client keeps
ahead of playback (see :meth:`~gateway.upstream.local.LocalUpstream.speak_audio`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web

from ..errors import BadRequest, Conflict
from ..upstream.base import AvatarEvent, EventType
from .room import AvatarParticipant

logger = logging.getLogger(__name__)

SAMPLE_RATE = 24_000
MAX_PACKET = 1 << 20
"""Largest frame a command may be (1 MiB); larger ones get an ``error`` event."""
MAX_FRAME = 4 << 20
"""Frames beyond this are not even read: aiohttp closes the connection (1009) — the session
stays and the client may reconnect."""
OUT_QUEUE = 256
"""Events waiting for a client that does not read; past that it is disconnected."""
_CLOSE_TIMEOUT = 2.0
_TASKS_KEPT = 64
REPLACED = 4001


@dataclass(slots=True)
class _Speech:
    event_id: str
    task_id: str


class LiteLink:
    """The LITE side of one session: its websocket (at most one at a time) and the speech
    the client is streaming. Survives reconnections; ends with the session (:meth:`close`).

    :param avatar: the session's avatar in the room, or None while it is away.
    :param touch: user activity (the idle timer starts over).
    """

    def __init__(self, session_id: str, *, avatar: Callable[[], AvatarParticipant | None],
                 touch: Callable[[], None]) -> None:
        self.session_id = session_id
        self._avatar = avatar
        self._touch = touch
        self._ws: web.WebSocketResponse | None = None
        self._out: asyncio.Queue[dict[str, Any] | None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[bool]] = set()
        self._speech: _Speech | None = None
        self._sources: OrderedDict[str, str] = OrderedDict()
        """task id -> event id of the speech, for tasks not yet ended."""
        self._started: set[str] = set()
        self._interrupted: set[str] = set()
        self._closed = False
        self.errors = 0
        """Error events sent (tests and the admin API read it)."""

    @property
    def connected(self) -> bool:
        return self._ws is not None

    # -- the websocket ---------------------------------------------------------------------

    async def serve(self, request: web.Request) -> web.WebSocketResponse:
        """Run one client connection until it closes, is replaced or the session ends."""
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME, heartbeat=None)
        await ws.prepare(request)
        if self._closed:
            await ws.close(code=1000, message=b"session closed")
            return ws
        previous = self._ws
        if previous is not None:
            logger.info("LITE session %s: a new connection replaces the old one", self.session_id)
            await previous.close(code=REPLACED, message=b"replaced by a newer connection")
        out: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(OUT_QUEUE)
        writer = asyncio.get_running_loop().create_task(
            self._write(ws, out), name=f"sim-lite-writer-{self.session_id}")
        self._ws, self._out, self._writer = ws, out, writer
        try:
            self.send("session.state_updated",
                      state="connected" if self._avatar() is not None else "connecting")
            async for message in ws:
                if message.type is WSMsgType.TEXT:
                    await self._command(str(message.data))
                elif message.type is WSMsgType.BINARY:
                    self._error("invalid_frame", "frames must be JSON text, not binary")
                elif message.type is WSMsgType.ERROR:
                    logger.info("LITE session %s: connection error: %s", self.session_id,
                                ws.exception())
                    break
        finally:
            if self._ws is ws:
                self._ws = self._out = self._writer = None
            if not writer.done():
                with contextlib.suppress(asyncio.QueueFull):
                    out.put_nowait(None)
                try:
                    async with asyncio.timeout(_CLOSE_TIMEOUT):
                        await asyncio.shield(writer)
                except TimeoutError:
                    writer.cancel()
                    await asyncio.gather(writer, return_exceptions=True)
            await ws.close()
        return ws

    async def _write(self, ws: web.WebSocketResponse, out: asyncio.Queue[dict[str, Any] | None]) -> None:
        while (event := await out.get()) is not None:
            try:
                await ws.send_str(json.dumps(event))
            except (ConnectionError, RuntimeError) as exc:  # closing underneath us
                logger.info("LITE session %s: send failed: %s", self.session_id, exc)
                return

    def send(self, event_type: str, *, event_id: str | None = None, **data: Any) -> None:
        """Queue one event for the connected client (dropped when nobody is connected)."""
        out, ws = self._out, self._ws
        if out is None or ws is None:
            return
        try:
            out.put_nowait({"type": event_type, "event_id": event_id or str(uuid.uuid4()), **data})
        except asyncio.QueueFull:
            # A client that does not read its events: cut it loose rather than buffer forever.
            logger.warning("LITE session %s: %d events unread; disconnecting the client",
                           self.session_id, OUT_QUEUE)
            self._ws = self._out = self._writer = None
            task = asyncio.get_running_loop().create_task(
                ws.close(code=1008, message=b"events not read"), name="sim-lite-drop")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _error(self, code: str, message: str, source: str | None = None) -> None:
        self.errors += 1
        logger.info("LITE session %s: %s: %s", self.session_id, code, message)
        self.send("error", error={"code": code, "message": message, "source_event_id": source})

    # -- commands ---------------------------------------------------------------------------

    async def _command(self, text: str) -> None:
        if len(text) > MAX_PACKET:
            self._error("packet_too_large", f"a frame may carry at most {MAX_PACKET} bytes; "
                                            f"send the audio in ~1 s chunks")
            return
        try:
            command = json.loads(text)
        except json.JSONDecodeError as exc:
            self._error("invalid_json", f"the frame is not JSON: {exc}")
            return
        if not isinstance(command, dict) or not isinstance(command.get("type"), str):
            self._error("invalid_event", "an event is a JSON object with a string 'type'")
            return
        raw_id = command.get("event_id")
        event_id = raw_id if isinstance(raw_id, str) and raw_id else None
        kind: str = command["type"]
        match kind:
            case "agent.speak":
                self._touch()
                await self._speak(event_id, command.get("audio"))
            case "agent.speak_end":
                self._touch()
                await self._speak_end()
                self.send("agent.audio_buffer_committed", event_id=event_id)
            case "agent.interrupt":
                self._touch()
                await self._interrupt()
                self.send("agent.audio_buffer_cleared", event_id=event_id)
            case "agent.start_listening" | "agent.stop_listening" | "session.keep_alive":
                self._touch()
            case _:
                self._error("unknown_event_type", f"unknown event type {kind!r}", event_id)

    async def _speak(self, event_id: str | None, audio: object) -> None:
        if not isinstance(audio, str) or not audio:
            self._error("invalid_audio", "agent.speak needs 'audio': base64 of 16-bit mono "
                                         "PCM at 24 kHz", event_id)
            return
        try:
            pcm = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            self._error("invalid_audio", "'audio' is not valid base64", event_id)
            return
        avatar = self._avatar()
        if avatar is None:
            self._error("avatar_unavailable", "the avatar is not in the room", event_id)
            return
        try:
            if self._speech is not None:
                try:
                    await avatar.speak_audio(pcm, SAMPLE_RATE, task_id=self._speech.task_id,
                                             final=False)
                except Conflict:  # it was interrupted or has ended: this chunk starts anew
                    self._speech = None
            if self._speech is None:
                result = await avatar.speak_audio(pcm, SAMPLE_RATE, final=False)
                speech = self._speech = _Speech(event_id or str(uuid.uuid4()), result.task_id)
                # Nothing awaited since the audio was scheduled: its start cannot have fired.
                self._sources[speech.task_id] = speech.event_id
                while len(self._sources) > _TASKS_KEPT:
                    self._forget(next(iter(self._sources)))
        except BadRequest as exc:
            self._error("invalid_audio", str(exc), event_id)
            return
        except Conflict as exc:
            self._error("avatar_unavailable", str(exc), event_id)
            return
        self.send("agent.audio_buffer_appended", event_id=event_id)

    async def _speak_end(self) -> None:
        speech, self._speech = self._speech, None
        avatar = self._avatar()
        if speech is not None and avatar is not None:
            await avatar.end_audio(speech.task_id)

    async def _interrupt(self) -> None:
        self._speech = None
        for task_id in list(self._sources):
            if task_id in self._started:
                self._interrupted.add(task_id)
            else:
                self._forget(task_id)  # never played: dropped without events
        avatar = self._avatar()
        if avatar is not None:
            await avatar.interrupt()

    def _forget(self, task_id: str) -> None:
        self._sources.pop(task_id, None)
        self._started.discard(task_id)
        self._interrupted.discard(task_id)

    # -- what the avatar does (called on the loop by its audio clock) ------------------------

    def on_avatar_event(self, event: AvatarEvent) -> None:
        task_id = event.task_id
        if task_id is None or task_id not in self._sources:
            return
        source = self._sources[task_id]
        task = {"id": task_id}
        if event.type is EventType.AVATAR_START_TALKING:
            self._started.add(task_id)
            self.send("agent.speak_started", event_id=source, task=task)
        elif event.type is EventType.AVATAR_STOP_TALKING:
            if task_id in self._interrupted:
                self.send("agent.speak_interrupted", event_id=source, task=task)
            self.send("agent.speak_ended", event_id=source, task=task)
            self._forget(task_id)
            if self._speech is not None and self._speech.task_id == task_id:
                self._speech = None

    # -- the session's end -------------------------------------------------------------------

    def closing(self) -> None:
        self.send("session.state_updated", state="closing")

    async def close(self) -> None:
        """The session ended: say so, close the connection, refuse new ones."""
        self._closed = True
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        ws, out, writer = self._ws, self._out, self._writer
        self.send("session.state_updated", state="closed")
        if ws is None or out is None or writer is None:
            return
        with contextlib.suppress(asyncio.QueueFull):
            out.put_nowait(None)
        # The writer drains the queue (the last events); the close frame follows them.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await asyncio.shield(writer)
        await ws.close(code=1000, message=b"session closed")
