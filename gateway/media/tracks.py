"""aiortc tracks that hand pre-encoded packets to a viewer's sender, and the sender hooks.

aiortc's ``RTCRtpSender`` only packetizes (no encode) when ``track.recv()`` returns an
``av.Packet`` (see ``RTCRtpSender._next_encoded_frame``). Each sender keeps its own SSRC,
sequence numbers and random RTP timestamp origin, so many senders can share one packet object.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import av
from aiortc import MediaStreamTrack, RTCRtpSender
from aiortc.mediastreams import MediaStreamError
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    AnyRtcpPacket,
    RtcpPsfbPacket,
    RtcpRtpfbPacket,
)

from .codecs import Packet
from .mailbox import Mailbox, MailboxClosed

MAX_SEND_BACKLOG = 128 * 1024
"""Bytes a viewer's socket may have waiting in asyncio (the kernel refused them: a full
uplink or a bloated queue on the way) before its tracks stop taking packets."""
BACKLOG_POLL = 0.02

if TYPE_CHECKING:
    from .hub import Hub


class PacketTrack(MediaStreamTrack):
    """One viewer's view of a shared encoder: a bounded queue of encoded packets.

    Nothing is queued until the sender first reads (aiortc starts reading only once DTLS is
    up), so a slow handshake never turns into a burst of stale video. Video then starts at a
    keyframe it requests and, if the viewer falls behind (queue full), the queue is flushed and
    the viewer resumes at the next keyframe. Audio drops the oldest packet instead. Either way
    memory is bounded and every drop is reported.
    """

    def __init__(
        self,
        hub: Hub,
        kind: str,
        capacity: int,
        on_first_packet: Callable[[], None] | None = None,
        codec: str = "vp8",
    ) -> None:
        super().__init__()
        self.kind = kind
        self.codec = codec
        self._hub = hub
        self._capacity = capacity
        self._queue: Mailbox[Packet] = Mailbox()  # capacity enforced in push, keyframe-aware
        self._awaiting_keyframe = kind == "video"
        self._reading = False
        self._on_first_packet = on_first_packet
        self.send_backlog: Callable[[], int] | None = None
        """Bytes waiting to be sent to this viewer (set by the viewer once it has a transport)."""
        self.dropped = 0

    @property
    def awaiting_keyframe(self) -> bool:
        return self._awaiting_keyframe

    def activate(self) -> None:
        """The sender started reading: join the hub's fan-out (and ask for a keyframe)."""
        if not self._reading and self.readyState == "live":
            self._reading = True
            self._hub.attach(self)

    def push(self, packet: Packet, keyframe: bool) -> None:
        """Called by the hub, on the loop, for every packet of this track's kind."""
        if self._awaiting_keyframe:
            if not keyframe:
                return
            self._awaiting_keyframe = False
        if len(self._queue) >= self._capacity:
            if self.kind == "video":
                self._drop(len(self._queue))
                self._queue.clear()
                if not keyframe:
                    self._awaiting_keyframe = True
                    self._hub.request_keyframe("overflow", self.codec)
                    return
            else:
                self._drop(1)
                self._queue.popleft()
        self._queue.put(packet)

    def _drop(self, count: int) -> None:
        self.dropped += count
        self._hub.count_dropped(self.kind, count)

    async def recv(self) -> Packet:
        self.activate()
        await self._wait_for_the_network()
        try:
            packet = await self._queue.get()
        except MailboxClosed:
            raise MediaStreamError from None
        if self._on_first_packet is not None:
            callback, self._on_first_packet = self._on_first_packet, None
            callback()
        return packet

    async def _wait_for_the_network(self) -> None:
        """UDP never pushes back on aiortc, and aioice ignores asyncio's pause_writing: what
        the kernel refuses piles up in the transport without bound. So wait here until the
        backlog drains; meanwhile the hub fills this track's queue, which overflows the usual
        way (skip to the next keyframe, drops counted), and memory stays bounded."""
        backlog = self.send_backlog
        if backlog is None:
            return
        # No event to wait on: asyncio tells only the protocol (aioice's), which ignores it.
        while self.readyState == "live" and backlog() > MAX_SEND_BACKLOG:  # noqa: ASYNC110
            await asyncio.sleep(BACKLOG_POLL)

    def stop(self) -> None:
        super().stop()
        self._queue.close()
        self._hub.unsubscribe(self)


class FrameTrack(MediaStreamTrack):
    """The naive design, kept only so ``bench/fanout.py`` can measure what encode-once saves:
    raw frames per viewer, so aiortc runs one encoder per sender (its default). Bounded; the
    oldest frame goes when the sender's encoder falls behind."""

    def __init__(self, hub: Hub, kind: str, capacity: int) -> None:
        super().__init__()
        self.kind = kind
        self._hub = hub
        self._queue: Mailbox[av.VideoFrame | av.AudioFrame] = Mailbox(maxlen=capacity)

    def push(self, frame: av.VideoFrame | av.AudioFrame) -> None:
        if self._queue.full:
            self._hub.count_dropped(self.kind, 1)
        self._queue.put(frame)

    async def recv(self) -> av.VideoFrame | av.AudioFrame:
        try:
            return await self._queue.get()
        except MailboxClosed:
            raise MediaStreamError from None

    def stop(self) -> None:
        super().stop()
        self._queue.close()
        self._hub.unsubscribe(self)


def attach_sender(sender: RTCRtpSender, hub: Hub, codec: str) -> None:
    """Route a sender's RTCP feedback to the shared encoder.

    In the packet path aiortc's own keyframe flag and REMB target are never read, so without
    this hook PLI/FIR would be silently ignored. Both attributes are private aiortc API (pinned
    version; ``tests/test_media.py`` checks the hook still fires).
    """
    sender._send_keyframe = lambda: hub.request_keyframe("pli", codec)  # type: ignore[method-assign]
    handle = sender._handle_rtcp_packet

    async def handle_and_count(packet: AnyRtcpPacket) -> None:
        if isinstance(packet, RtcpPsfbPacket):
            kind = {RTCP_PSFB_PLI: "pli", RTCP_PSFB_FIR: "fir", RTCP_PSFB_APP: "remb"}
            if packet.fmt in kind:
                hub.count_feedback(kind[packet.fmt])
        elif isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK:
            hub.count_feedback("nack")
        await handle(packet)

    sender._handle_rtcp_packet = handle_and_count  # type: ignore[method-assign]
