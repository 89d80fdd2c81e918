"""What the owner and a fan-out worker say to each other, on two sockets.

* **Media** (owner → worker, ``SOCK_SEQPACKET``): one datagram per packetized frame per
  worker, sent with ``sendmsg`` (header + the payloads as separate buffers: no copy). The
  owner's socket is non-blocking and a full one drops the frame for that worker (video then
  waits for a keyframe: see ``pool.WorkerLink``), so a slow worker costs its own viewers frames,
  never the owner time or memory.
* **Control** (both ways, ``SOCK_STREAM``): length-prefixed pickles of small tuples — calls
  and replies, viewer state, subscriptions, keyframe requests, a controller's microphone, and
  metric operations. Both ends are this code base on a private socketpair, so pickle carries
  our own exceptions (``BadSDP`` …) across unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import socket
import struct
from collections.abc import Sequence
from typing import Any

from ..media.ladder import RUNGS, lane_name
from ..media.rtp import RtpFrame, ntp_now

MEDIA_BUFFER = 8 << 20
"""Socket buffer on both ends of the media socket: a few keyframes at 1080p, ~0.5 s of video."""
MAX_MEDIA_MESSAGE = 1 << 20
MAX_CONTROL_MESSAGE = 16 << 20
KINDS = ("audio/opus",
         *(f"video/{lane_name(codec, rung)}" for codec in ("vp8", "h264") for rung in range(RUNGS)))
"""What a media datagram may carry: audio, or a video lane (a codec and a ladder rung)."""

# session id length, kind index, keyframe, RTP timestamp, payload count (the send time is the
# worker's own: a frame leaves the worker when it arrives)
_MEDIA_HEAD = struct.Struct("!BBBIH")
_LENGTH = struct.Struct("!I")


def media_pair() -> tuple[socket.socket, socket.socket]:
    """(owner end, worker end); the owner's never blocks."""
    owner, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for sock, option in ((owner, socket.SO_SNDBUF), (worker, socket.SO_RCVBUF)):
        sock.setsockopt(socket.SOL_SOCKET, option, MEDIA_BUFFER)
    owner.setblocking(False)
    return owner, worker


def media_message(session_id: bytes, kind: str, frame: RtpFrame) -> list[bytes]:
    """The buffers of one media datagram (for ``sendmsg``)."""
    payloads = frame.payloads
    head = _MEDIA_HEAD.pack(len(session_id), KINDS.index(kind), frame.keyframe,
                            frame.timestamp, len(payloads))
    sizes = struct.pack(f"!{len(payloads)}H", *map(len, payloads))
    return [head, session_id, sizes, *payloads]


def parse_media(data: memoryview) -> tuple[str, str, RtpFrame]:
    """(session id, kind, frame) from one datagram; payloads are copied out of ``data``."""
    id_len, kind, keyframe, timestamp, count = _MEDIA_HEAD.unpack_from(data)
    pos = _MEDIA_HEAD.size
    session_id = bytes(data[pos:pos + id_len]).decode()
    pos += id_len
    sizes = struct.unpack_from(f"!{count}H", data, pos)
    pos += 2 * count
    payloads = []
    for size in sizes:
        payloads.append(bytes(data[pos:pos + size]))
        pos += size
    if pos != len(data):
        raise ValueError("media message length does not match its payloads")
    key = KINDS[kind]
    return session_id, key, RtpFrame(tuple(payloads), timestamp, bool(keyframe), ntp_now(),
                                      split_kind(key)[1])


class Control:
    """One end of the control socket: ``send`` never waits (asyncio buffers; the peer is our
    own process on the same host), ``receive`` returns the next message or None at EOF."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Control:
        reader, writer = await asyncio.open_unix_connection(sock=sock,
                                                            limit=MAX_CONTROL_MESSAGE)
        return cls(reader, writer)

    def send(self, *message: Any) -> None:
        if self._writer.is_closing():
            return
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._writer.write(_LENGTH.pack(len(data)) + data)

    async def receive(self) -> tuple[Any, ...] | None:
        try:
            (size,) = _LENGTH.unpack(await self._reader.readexactly(_LENGTH.size))
            if size > MAX_CONTROL_MESSAGE:
                raise ValueError(f"control message of {size} bytes")
            message: tuple[Any, ...] = pickle.loads(await self._reader.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        return message

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()


def split_kind(kind: str) -> tuple[str, str]:
    """``"video/vp8@1"`` → ``("video", "vp8@1")``: the kind and the lane."""
    media, _, codec = kind.partition("/")
    return media, codec


def send_media(sock: socket.socket, buffers: Sequence[bytes]) -> bool:
    """One datagram, now or never: False when the worker's queue is full."""
    try:
        sock.sendmsg(buffers)
    except (BlockingIOError, InterruptedError):
        return False
    return True
