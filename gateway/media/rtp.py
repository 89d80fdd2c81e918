"""RTP out: a frame is packetized once per codec, and each viewer only writes its headers.

aiortc's sender does everything per viewer: packetize the frame, build an ``RtpPacket`` object
per packet, read the wall clock per packet, and await three coroutines per datagram. With a
browser's feedback on top that was ~60 µs of CPU per packet, so one core served ~45 viewers.
Here the hub packetizes each encoded frame once (:class:`Packetizer` → :class:`RtpFrame`) and
hands it to every viewer's :class:`RtpStream`, which, in one synchronous loop per frame, packs
a 12-byte header plus the extension block it built once for the frame, protects it (SRTP, one
C call) and writes it to the socket. No queue, no task switch, no object per packet.

What a sender owes its receiver is kept: per-viewer SSRC, sequence numbers and random
timestamp origin; the negotiated ``mid`` and ``abs-send-time`` header extensions; a history of
recent packets for NACK, answered with RTX when negotiated (rate-limited: a NACK flood cannot
turn into a send flood); sender reports with the NTP/RTP pair of the last frame; RTT and loss
from receiver reports; PLI/FIR as keyframe requests. A viewer whose socket backs up (the
kernel refused datagrams) skips frames, and video resumes at the next keyframe it asks for:
bounded memory, no stale burst.

Nothing here touches aiortc's private state: :mod:`gateway.viewers.aiortc_hooks` gives a
stream its :class:`Output` (SRTP + the ICE pair's socket) and routes RTCP to it.
"""

from __future__ import annotations

import collections
import random
import secrets
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    AnyRtcpPacket,
    RtcpByePacket,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSdesPacket,
    RtcpSenderInfo,
    RtcpSourceInfo,
    RtcpSrPacket,
)

from .codecs import Packet
from .ladder import RungPolicy, lane_name, split_lane

NTP_EPOCH_OFFSET = 2_208_988_800  # seconds from 1900 (NTP) to 1970 (Unix)
HISTORY = 512
"""Packets a stream keeps for retransmission: ~1.5 s of 720p video, longer than any NACK
worth answering (a browser gives up on a frame after ~1 RTT + jitter buffer)."""
RETRANSMIT_BUDGET = 300
"""Retransmissions per stream per second at most (about the stream's own packet rate), and
no more bytes than half the viewer's bandwidth estimate."""
RETRANSMIT_MAX_AGE = 1.0
"""Seconds (of media time) after which a packet is not sent again."""
RATE_WINDOW = 2.0
"""Seconds of sent video a viewer's rate is measured over, for its rung policy."""
MAX_SWITCH_LAG = 4500
"""RTP ticks (50 ms of video) a lane's first keyframe may lag what a viewer moving onto it
was last sent."""
KEYFRAME_REQUEST_INTERVAL = 1.0
"""Seconds between a viewer's keyframe requests that reach the hub: a PLI storm from one
viewer must not set the keyframe rate of everyone on its lane."""
MAX_SEND_BACKLOG = 128 * 1024
"""Bytes a viewer's socket may have waiting in asyncio (the kernel refused them: a full
uplink or a bloated queue on the way) before its streams stop taking frames."""
CLOCK_RATES = {"vp8": 90_000, "h264": 90_000, "opus": 48_000}

_HEADER = struct.Struct("!BBHII")
_RTX_OSN = struct.Struct("!H")
_EXT_HEAD = struct.Struct("!HH")
MID_URI = "urn:ietf:params:rtp-hdrext:sdes:mid"
ABS_SEND_TIME_URI = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"


def remb_bitrate(fci: bytes) -> int | None:
    """The bit rate of a REMB (draft-alvestrand-rmcat-remb): ``"REMB"``, a count, then 6 bits
    of exponent and 18 of mantissa. None for another kind of application feedback."""
    if len(fci) < 8 or fci[:4] != b"REMB":
        return None
    return (int.from_bytes(fci[5:8], "big") & 0x3FFFF) << (fci[5] >> 2)


def ntp_now() -> int:
    """The wall clock as 64-bit NTP (aiortc's goes through ``datetime``: ~10x slower)."""
    return int((time.time() + NTP_EPOCH_OFFSET) * (1 << 32))


@dataclass(frozen=True, slots=True)
class RtpFrame:
    """One encoded frame, packetized: what every viewer of a codec sends, with its own header."""

    payloads: tuple[bytes, ...]
    timestamp: int
    """In the codec's clock (90 kHz video, 48 kHz Opus), before a stream's random origin."""
    keyframe: bool
    ntp: int
    """When the frame is sent, 64-bit NTP: its packets leave within the same loop pass."""
    lane: str = ""
    """The hub lane (codec and ladder rung, :mod:`.ladder`) that encoded it. Every lane stamps
    a source frame with the same RTP timestamp, so a viewer can move between them."""

    @property
    def abs_send_time(self) -> int:
        """The ``abs-send-time`` extension's 24-bit 6.18 fixed-point seconds."""
        return (self.ntp >> 14) & 0xFFFFFF


class Packetizer:
    """RTP payloads for one codec, computed once per frame for every viewer.

    aiortc's codec classes know the payload formats (VP8 descriptor with a picture id, H.264
    FU-A/STAP-A, Opus as is); only their ``pack`` is used, never their encoders. One instance
    per lane, so every viewer sees the same picture-id sequence.
    """

    def __init__(self, codec: str, lane: str = "") -> None:
        self.codec = codec
        self.lane = lane or codec
        self._pack: Callable[[Packet], tuple[list[bytes], int]]
        if codec == "vp8":
            self._pack = Vp8Encoder().pack
        elif codec == "h264":
            self._pack = H264Encoder().pack
        elif codec == "opus":
            rate = CLOCK_RATES["opus"]
            self._pack = lambda p: ([bytes(p)], int(p.pts * p.time_base * rate))  # type: ignore[operator]
        else:
            raise ValueError(f"no packetizer for {codec!r}")

    def frame(self, packet: Packet) -> RtpFrame:
        payloads, timestamp = self._pack(packet)
        return RtpFrame(tuple(payloads), timestamp, bool(packet.is_keyframe), ntp_now(), self.lane)


class Output(Protocol):
    """Where a stream's datagrams go: SRTP-protected onto the viewer's ICE pair."""

    def writer(self) -> tuple[Callable[[bytes], bytes], Callable[[list[bytes]], None]] | None:
        """``(protect, send)`` for this frame, or None while not connected. ``send`` takes a
        frame's datagrams at once (one system call for all of them where the kernel can)."""

    def protect_rtcp(self, data: bytes) -> bytes: ...

    def backlog(self) -> int:
        """Bytes waiting in asyncio for this viewer's sockets."""


class Feedback(Protocol):
    """What a stream tells the hub: keyframe requests, lane moves and counts (no hub import
    here). A lane is a codec and a rung of the quality ladder (``"vp8"``, ``"vp8@1"``)."""

    def request_keyframe(self, reason: str, lane: str) -> None: ...

    def join_lane(self, subscriber: RtpStream, lane: str, urgent: bool) -> None:
        """Also deliver ``lane``'s frames to ``subscriber`` (it is moving there). ``urgent``:
        ask ``lane`` for a keyframe now; else only if nobody else receives it (the move
        then waits for its next periodic one)."""

    def leave_lane(self, subscriber: RtpStream, lane: str) -> None: ...

    def count_dropped(self, kind: str, count: int) -> None: ...

    def count_feedback(self, kind: str) -> None: ...


@dataclass(frozen=True, slots=True)
class StreamParameters:
    """What negotiation fixed for one sender."""

    kind: str
    codec: str
    payload_type: int
    ssrc: int
    cname: str
    mid: str | None = None
    extensions: Sequence[tuple[int, str]] = ()
    """``(id, uri)`` pairs the viewer accepted."""
    rtx_payload_type: int | None = None
    rtx_ssrc: int = 0


class RtpStream:
    """One viewer's sender of one kind: headers, SRTP, socket, and the RTCP it owes."""

    def __init__(self, params: StreamParameters, output: Output, feedback: Feedback,
                 on_first_frame: Callable[[], None] | None = None, *, lane: str = "",
                 on_lane: Callable[[str, str], None] | None = None,
                 on_estimate: Callable[[int], None] | None = None,
                 policy: RungPolicy | None = None) -> None:
        """``lane``: the hub lane it starts on (default: its codec, the ladder's top rung);
        ``on_lane(old, new)`` after it moved; ``on_estimate(bit/s)`` with each REMB;
        ``policy``: moves the (video) stream between rungs by the viewer's feedback."""
        self.params = params
        self.kind = params.kind
        self.codec = params.codec
        self.lane = lane or params.codec
        self.next_lane: str | None = None
        """The lane it moves to at that lane's next keyframe."""
        self.estimate: int | None = None
        """The viewer's latest bandwidth estimate (REMB), bit/s."""
        self._on_lane = on_lane
        self._on_estimate = on_estimate
        self._policy = policy
        self._sent_marks: collections.deque[tuple[float, int]] = collections.deque(
            [(time.monotonic(), 0)], maxlen=16)
        self._rate = 0.0
        self._keyframe_asked = -float("inf")
        self._output = output
        self._feedback = feedback
        self._on_first_frame = on_first_frame
        self._clock_rate = CLOCK_RATES[params.codec]
        self._pt = params.payload_type
        self._ssrc = params.ssrc
        self._seq = secrets.randbelow(1 << 15)  # lower half: no early wrap (SRTP index guess)
        self._origin = secrets.randbits(32)
        self._rtx_seq = secrets.randbelow(1 << 15)
        ids = {uri: ext_id for ext_id, uri in params.extensions}
        mid = (params.mid or "").encode()
        self._ext_mid = (bytes([ids[MID_URI] << 4 | (len(mid) - 1)]) + mid
                         if MID_URI in ids and 0 < len(mid) <= 16 else b"")
        self._abs_id = ids.get(ABS_SEND_TIME_URI, 0) if self.kind == "video" else 0
        self._fixed_ext = self._extensions(0) if not self._abs_id else None
        self._hist_seq = [-1] * HISTORY
        self._hist_payload: list[bytes] = [b""] * HISTORY
        self._hist_stamp = [0] * HISTORY  # timestamp << 1 | marker
        self._budget = RETRANSMIT_BUDGET
        self._budget_bytes = 1 << 30
        self._budget_at = time.monotonic()
        self.awaiting_keyframe = self.kind == "video"
        self.closed = False
        # Counters for sender reports and metrics.
        self.packets = 0
        self.octets = 0
        self.dropped = 0
        self.retransmitted = 0
        self.frames = 0
        self.remote_lost = 0
        self.rtt: float | None = None
        self._last_ntp = 0
        self._last_rtp = 0
        self._lsr = -1
        self._lsr_time = 0.0

    # -- media ------------------------------------------------------------------------------

    def _extensions(self, abs_send_time: int) -> bytes:
        body = self._ext_mid
        if self._abs_id:
            body += bytes([self._abs_id << 4 | 2]) + abs_send_time.to_bytes(3, "big")
        if not body:
            return b""
        body += b"\0" * (-len(body) % 4)
        return _EXT_HEAD.pack(0xBEDE, len(body) // 4) + body

    def deliver(self, frame: RtpFrame) -> None:
        """Send one frame now (called by the hub, on the loop, for every viewer in turn)."""
        if frame.lane != self.lane and frame.lane and not self._switch(frame):
            return
        if self.closed or (self.awaiting_keyframe and not frame.keyframe):
            return
        writer = self._output.writer()
        if writer is None:
            return
        if self._output.backlog() > MAX_SEND_BACKLOG:
            self._drop(len(frame.payloads))
            if self.kind == "video":
                self.awaiting_keyframe = True
                self._ask_keyframe("overflow")
            return
        self.awaiting_keyframe = False
        protect, send = writer
        ext = self._fixed_ext if self._fixed_ext is not None else self._extensions(
            frame.abs_send_time)
        first = 0x90 if ext else 0x80
        pt, ssrc, seq = self._pt, self._ssrc, self._seq
        timestamp = (self._origin + frame.timestamp) & 0xFFFFFFFF
        hist_seq, hist_payload, hist_stamp = self._hist_seq, self._hist_payload, self._hist_stamp
        pack = _HEADER.pack
        last = len(frame.payloads) - 1
        octets = 0
        datagrams = []
        for i, payload in enumerate(frame.payloads):
            marker = 0x80 if i == last else 0
            datagrams.append(protect(pack(first, pt | marker, seq, timestamp, ssrc) + ext + payload))
            slot = seq % HISTORY
            hist_seq[slot] = seq
            hist_payload[slot] = payload
            hist_stamp[slot] = timestamp << 1 | (i == last)
            octets += len(payload)
            seq = (seq + 1) & 0xFFFF
        send(datagrams)
        self._seq = seq
        self.packets += last + 1
        self.octets += octets
        self.frames += 1
        self._last_rtp = timestamp
        self._last_ntp = frame.ntp
        if self._on_first_frame is not None:
            callback, self._on_first_frame = self._on_first_frame, None
            callback()

    def move_to(self, lane: str, urgent: bool = True) -> None:
        """Change lanes (rungs) at the new lane's next keyframe; until then the old one plays.

        ``urgent`` asks that lane for a keyframe now. A move down is: the viewer's link is
        failing, and the lane below costs only the viewers on it. A try up is not: into a
        lane others watch it waits for the lane's periodic keyframe (at most
        ``keyframe_interval``), since asking would give each of them a keyframe per try of
        each viewer whose link cannot hold it."""
        if lane == (self.next_lane or self.lane):
            return
        if self.next_lane is not None:
            self._feedback.leave_lane(self, self.next_lane)
            self.next_lane = None
        if lane != self.lane:
            self.next_lane = lane
            self._feedback.join_lane(self, lane, urgent)

    def _switch(self, frame: RtpFrame) -> bool:
        """``frame`` is from another lane: True if it is the keyframe to move on.

        Lanes encode in their own threads, so the new lane's keyframe of a source frame may
        come after the old lane's version of it (or of the next) was sent: its timestamp is
        then moved just past the last one sent (this stream's origin moves with it; lip sync
        goes by the sender reports, which follow). One older than :data:`MAX_SWITCH_LAG` is
        a replay of recent frames, not a live one: wait for the next."""
        if frame.lane != self.next_lane or not frame.keyframe or self.closed:
            return False
        if self.frames:  # the lanes' timestamp of the last frame sent, without the origin
            behind = (self._last_rtp - self._origin - frame.timestamp) & 0xFFFFFFFF
            if behind < 1 << 31:  # not newer than what was sent
                if behind > MAX_SWITCH_LAG:
                    return False
                self._origin = (self._origin + behind + 1) & 0xFFFFFFFF
        old, self.lane, self.next_lane = self.lane, frame.lane, None
        self._feedback.leave_lane(self, old)
        if self._policy is not None:
            self._policy.arrived(time.monotonic())
        if self._on_lane is not None:
            self._on_lane(old, frame.lane)
        return True

    def _video_rate(self, now: float) -> float:
        """Bit/s sent over about the last RATE_WINDOW seconds (marks taken at each estimate):
        long enough that a keyframe does not look like a rate."""
        marks = self._sent_marks
        marks.append((now, self.octets))
        while len(marks) > 2 and now - marks[1][0] >= RATE_WINDOW:
            marks.popleft()
        at, octets = marks[0]
        if now - at >= 0.5:
            self._rate = (self.octets - octets) * 8 / (now - at)
        return self._rate

    def _adapt(self, rung: int | None) -> None:
        if rung is not None:
            self.move_to(lane_name(self.codec, rung), urgent=rung > split_lane(self.lane)[1])

    def _ask_keyframe(self, reason: str) -> None:
        """A keyframe of this viewer's lane, at most once per KEYFRAME_REQUEST_INTERVAL."""
        now = time.monotonic()
        if now - self._keyframe_asked < KEYFRAME_REQUEST_INTERVAL:
            self._feedback.count_feedback("keyframe_request_limited")
            return
        self._keyframe_asked = now
        self._feedback.request_keyframe(reason, self.lane)

    def _drop(self, count: int) -> None:
        self.dropped += count
        self._feedback.count_dropped(self.kind, count)

    def retransmit(self, seq: int) -> None:
        """Answer a NACK: the packet again, wrapped in RTX when the viewer negotiated it."""
        slot = seq % HISTORY
        if self._hist_seq[slot] != seq or self.closed:
            return
        stamp = self._hist_stamp[slot]
        if (self._last_rtp - (stamp >> 1)) & 0xFFFFFFFF > RETRANSMIT_MAX_AGE * self._clock_rate:
            return  # the player has decoded on or asked for a keyframe: it only costs its link
        payload = self._hist_payload[slot]
        now = time.monotonic()
        if now - self._budget_at >= 1.0:
            # Packets, and bytes: at most half of what the viewer's link is estimated to carry,
            # so repairs cannot crowd out the stream they repair on a slow link.
            estimate = self.estimate
            self._budget_at = now
            self._budget = RETRANSMIT_BUDGET
            self._budget_bytes = estimate // 16 if estimate else 1 << 30
        if self._budget <= 0 or self._budget_bytes < len(payload):
            return
        writer = self._output.writer()
        if writer is None:
            return
        self._budget -= 1
        self._budget_bytes -= len(payload)
        protect, send = writer
        pt, ssrc = self._pt, self._ssrc
        if self.params.rtx_payload_type is not None:
            payload = _RTX_OSN.pack(seq) + payload
            pt, ssrc, seq = self.params.rtx_payload_type, self.params.rtx_ssrc, self._rtx_seq
            self._rtx_seq = (seq + 1) & 0xFFFF
        ext = self._extensions((ntp_now() >> 14) & 0xFFFFFF)
        header = _HEADER.pack(0x90 if ext else 0x80, pt | (0x80 if stamp & 1 else 0), seq,
                              stamp >> 1, ssrc)
        send([protect(header + ext + payload)])
        self.retransmitted += 1

    # -- RTCP -------------------------------------------------------------------------------

    def handle_rtcp(self, packet: AnyRtcpPacket) -> None:
        """Feedback from the viewer about this stream (routed by SSRC)."""
        if isinstance(packet, RtcpRrPacket | RtcpSrPacket):
            for report in packet.reports:
                if report.ssrc != self._ssrc:
                    continue
                self.remote_lost = report.packets_lost
                if self._policy is not None and self.next_lane is None:
                    self._adapt(self._policy.on_loss(report.fraction_lost / 256, time.monotonic()))
                if report.lsr == self._lsr and report.dlsr:
                    self.rtt = max(0.0, time.time() - self._lsr_time - report.dlsr / 65536)
        elif isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK:
            self._feedback.count_feedback("nack")
            for seq in packet.lost[:64]:  # one NACK asks for a burst, not the history
                self.retransmit(seq)
        elif isinstance(packet, RtcpPsfbPacket):
            if packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
                self._feedback.count_feedback("pli" if packet.fmt == RTCP_PSFB_PLI else "fir")
                if self.kind == "video":
                    self._ask_keyframe("pli")
            elif packet.fmt == RTCP_PSFB_APP:
                self._feedback.count_feedback("remb")
                estimate = remb_bitrate(packet.fci)
                if estimate is not None and self.kind == "video":  # it is about video
                    self.estimate = estimate
                    if self._on_estimate is not None:
                        self._on_estimate(estimate)
                    if self._policy is not None and self.next_lane is None:  # not mid-move
                        now = time.monotonic()
                        self._adapt(self._policy.on_estimate(estimate, self._video_rate(now), now))

    def sender_report(self) -> bytes:
        """SR + SDES (CNAME), protected: sent every ~1 s by the viewer's RTCP task."""
        # Now, and the RTP time now (the last frame's, moved on by the time since it left), so
        # a receiver maps both kinds onto one clock for lip sync.
        ntp = ntp_now()
        elapsed = (ntp - self._last_ntp) / (1 << 32) if self._last_ntp else 0.0
        rtp = (self._last_rtp + int(elapsed * self._clock_rate)) & 0xFFFFFFFF
        self._lsr = (ntp >> 16) & 0xFFFFFFFF
        self._lsr_time = time.time()
        packets: list[AnyRtcpPacket] = [
            RtcpSrPacket(ssrc=self._ssrc, sender_info=RtcpSenderInfo(
                ntp_timestamp=ntp, rtp_timestamp=rtp,
                packet_count=self.packets & 0xFFFFFFFF, octet_count=self.octets & 0xFFFFFFFF)),
            RtcpSdesPacket(chunks=[RtcpSourceInfo(
                ssrc=self._ssrc, items=[(1, self.params.cname.encode())])]),
        ]
        return self._output.protect_rtcp(b"".join(bytes(p) for p in packets))

    def goodbye(self) -> bytes:
        return self._output.protect_rtcp(bytes(RtcpByePacket(sources=[self._ssrc])))

    @staticmethod
    def report_interval() -> float:
        """RFC 3550 §6.3.1's randomisation, around aiortc's 1 s."""
        return 0.5 + random.random()
