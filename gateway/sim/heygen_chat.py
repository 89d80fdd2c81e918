"""HeyGen's chat socket, ``/v1/ws/streaming.chat``, for one session: sockets and voice chat.

``@heygen/streaming-avatar`` 2.0.16 opens it right after joining the room, at
``wss://<basePath host>/v1/ws/streaming.chat?session_id=..&session_token=..[&arch_version=v2]
&silence_response=..``, and ``createStartAvatar()`` fails if it does not open. Over it:

* client → server, binary protobuf ``pipecat.Frame`` (:mod:`gateway.sim.heygen_proto`):
  ``text`` is what the default ``speak()`` (TALK + ASYNC) sends: answered like a ``talk``
  task; ``audio`` is the websocket voice chat's microphone (16 kHz mono s16le, 512 samples);
  ``transcription`` (the SDK never sends one) is taken as words the user said, like ``text``.
* server → client, JSON text with ``event_type``: ``user_start`` and ``user_stop`` (the SDK
  emits ``event_type`` as its event), and ``error`` (``code``, ``message``) for a frame that
  was well formed but could not be used (empty or too long text, unusable audio).

Bad input closes the socket with a standard code and a reason, never the session: a text
message 1003, bytes that are not a ``pipecat.Frame`` 1007, a message over
``SimSettings.chat_max_frame_bytes`` 1009 (aiohttp's reader). The session ending closes its
sockets with 1000 (1001 at simulator shutdown). Authentication (the session's
``create_token`` token, or the API key) is checked before the upgrade: refusals are ordinary
HTTP errors with HeyGen's ``{"code", "message"}`` body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

import av
from aiohttp import WSCloseCode, WSMsgType, web

from ..avatar.stt import RecognizerProcess
from ..media.vad import Voice
from .heygen_listen import Listener
from .heygen_proto import AudioFrame, ProtoError, TextFrame, TranscriptionFrame, decode_frame

logger = logging.getLogger(__name__)

MAX_SOCKETS = 4
"""Chat sockets one session may have open at once (an app normally has one)."""
OUTBOX = 64
"""Events waiting to be written to one socket; more means the client stopped reading."""
CLOSE_TIMEOUT = 2.0
"""Seconds a closing socket waits for the client's close frame."""
RATES = range(8_000, 48_001)
"""Sample rates accepted in ``AudioRawFrame`` (the SDK sends 16 kHz)."""

Talk = Callable[[str], str | None]
"""Speak the answer to what the user said; returns why not (an error message) or None."""


class _Socket:
    """One open chat socket and the task that writes its events in order."""

    def __init__(self, ws: web.WebSocketResponse, number: int) -> None:
        self.ws = ws
        self.source = f"chat-socket-{number}"
        self.outbox: asyncio.Queue[str] = asyncio.Queue(OUTBOX)
        self.writer = asyncio.get_running_loop().create_task(self._write(),
                                                             name="sim-heygen-chat-writer")

    def post(self, event: dict[str, Any]) -> None:
        try:
            self.outbox.put_nowait(json.dumps(event, separators=(",", ":")))
        except asyncio.QueueFull:
            logger.warning("chat socket %s is not reading; event %s dropped", self.source,
                           event.get("event_type"))

    async def _write(self) -> None:
        while True:
            text = await self.outbox.get()
            if self.ws.closed:
                return
            with contextlib.suppress(ConnectionError):
                await self.ws.send_str(text)


class ChatHub:
    """A session's chat sockets and its voice-chat :class:`Listener`.

    Voice activity goes where the SDK listens for it: to the chat sockets as ``event_type``;
    a session with no socket open (a server-side client such as the gateway, which drives
    the session over REST and LiveKit only) gets it as LiveKit data ``{"type": ...}``
    instead, as the simulator always did. Transcripts always ride LiveKit data (the SDK
    reads ``user_talking_message`` and ``user_end_message`` there).

    :param send_data: publish a LiveKit data packet from the avatar into the session's room.
    :param talk: answer the user's words (see :data:`Talk`).
    :param touch: user activity (the idle timer starts over).
    :param deaf: true while the avatar speaks (see :class:`Listener`).
    """

    def __init__(self, recognizer: RecognizerProcess, *, max_frame_bytes: int,
                 max_text_chars: int, send_data: Callable[[bytes], None], talk: Talk,
                 touch: Callable[[], None], deaf: Callable[[], bool]) -> None:
        self._max_frame_bytes = max_frame_bytes
        self._max_text_chars = max_text_chars
        self._send_data = send_data
        self._talk = talk
        self._touch = touch
        self._sockets: list[_Socket] = []
        self._numbered = 0
        self._closed = False
        self.listener = Listener(recognizer, deaf=deaf, on_voice=self._voice,
                                 on_words=self._words)

    @property
    def sockets(self) -> int:
        return len(self._sockets)

    @property
    def full(self) -> bool:
        return len(self._sockets) >= MAX_SOCKETS

    # -- microphone from the room (livekit transport) -------------------------------------------

    def on_microphone(self, identity: str, frame: av.AudioFrame) -> None:
        self.listener.hear_frame(f"room-{identity}", frame)

    # -- events ----------------------------------------------------------------------------------

    def _voice(self, utterance: str, kind: Voice) -> None:
        self._touch()  # voice input is user activity (HeyGen's idle-timeout rule)
        if self._sockets:
            for socket in self._sockets:
                socket.post({"event_type": str(kind)})
        else:
            self._send_data(json.dumps({"type": str(kind)}).encode())

    def _words(self, utterance: str, text: str) -> None:
        self._touch()
        for kind in ("user_talking_message", "user_end_message"):
            self._send_data(json.dumps({"type": kind, "task_id": utterance, "message": text},
                                       separators=(",", ":")).encode())
        error = self._talk(text)
        if error is not None:
            logger.warning("voice chat: the avatar does not answer %r: %s", text, error)

    # -- one socket ------------------------------------------------------------------------------

    async def serve(self, request: web.Request) -> web.WebSocketResponse:
        """Upgrade ``request`` (already authorised) and serve the socket until it closes."""
        # A client that never answers our close frame holds streaming.stop at most
        # CLOSE_TIMEOUT; the heartbeat finds sockets whose client vanished.
        ws = web.WebSocketResponse(max_msg_size=self._max_frame_bytes, timeout=CLOSE_TIMEOUT,
                                   heartbeat=30.0)
        await ws.prepare(request)
        if self._closed:
            await ws.close(code=WSCloseCode.OK, message=b"the session has ended")
            return ws
        self._numbered += 1
        socket = _Socket(ws, self._numbered)
        self._sockets.append(socket)
        try:
            await self._read(socket)
        finally:
            self._sockets.remove(socket)
            self.listener.forget(socket.source)
            socket.writer.cancel()
            await asyncio.gather(socket.writer, return_exceptions=True)
            if not ws.closed:
                await ws.close()
        return ws

    async def _read(self, socket: _Socket) -> None:
        ws = socket.ws
        while True:
            message = await ws.receive()
            if message.type is WSMsgType.BINARY:
                assert isinstance(message.data, bytes)
                why = self._frame(socket, message.data)
                if why is not None:
                    logger.info("chat socket %s closed: %s", socket.source, why)
                    await ws.close(code=WSCloseCode.INVALID_TEXT, message=why.encode()[:120])
                    return
            elif message.type is WSMsgType.TEXT:
                await ws.close(code=WSCloseCode.UNSUPPORTED_DATA,
                               message=b"send binary protobuf pipecat.Frame messages")
                return
            elif message.type is WSMsgType.ERROR:
                # aiohttp's reader already chose the code (1009 for an oversized message).
                logger.info("chat socket %s closed: %s", socket.source, ws.exception())
                return
            else:  # CLOSE, CLOSING, CLOSED
                return

    def _frame(self, socket: _Socket, data: bytes) -> str | None:
        """Act on one binary message; returns why the socket must close (malformed)."""
        try:
            frame = decode_frame(data)
        except ProtoError as exc:
            return f"not a pipecat.Frame: {exc}"
        if isinstance(frame, AudioFrame):
            rate, channels = frame.sample_rate, frame.num_channels
            if rate not in RATES or channels not in (1, 2):
                socket.post(_error(f"audio must be 1 or 2 channels at 8000..48000 Hz; got "
                                   f"{channels} at {rate} Hz"))
                return None
            try:
                self.listener.hear_pcm(socket.source, frame.audio, rate, channels)
            except ValueError as exc:
                socket.post(_error(str(exc)))
            return None
        if isinstance(frame, TextFrame | TranscriptionFrame):
            text = frame.text.strip()
            if not text:
                socket.post(_error("text must not be empty"))
            elif len(text) > self._max_text_chars:
                socket.post(_error(f"text is longer than {self._max_text_chars} characters"))
            else:
                self._touch()
                error = self._talk(text)
                if error is not None:
                    socket.post(_error(error, code=500))
            return None
        socket.post(_error("the frame holds none of text, audio, transcription"))
        return None

    # -- the end ---------------------------------------------------------------------------------

    async def close(self, reason: str) -> None:
        """The session ended: close every socket (1001 at shutdown, else 1000), stop
        listening. Idempotent."""
        self._closed = True
        code = WSCloseCode.GOING_AWAY if reason == "shutdown" else WSCloseCode.OK
        await asyncio.gather(*(s.ws.close(code=code, message=f"session {reason}".encode())
                               for s in list(self._sockets)), return_exceptions=True)
        await self.listener.close()


def _error(message: str, *, code: int = 400175) -> dict[str, Any]:
    return {"event_type": "error", "code": code, "message": message}
