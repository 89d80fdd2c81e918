"""The encode-once hub and the per-viewer RTP streams it feeds, without a network.

The streams write into a recording output; the headers they write are parsed back with
aiortc's own RTP/RTCP parsers (what a receiver would make of them)."""

from __future__ import annotations

import asyncio
import fractions
import itertools
from dataclasses import dataclass, field

import av
import numpy as np
import pytest
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import (
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    HeaderExtensionsMap,
    RtcpPacket,
    RtcpPsfbPacket,
    RtcpReceiverInfo,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSrPacket,
    RtpPacket,
)

from gateway.media import rtp
from gateway.media.hub import Hub, HubConfig
from gateway.media.rtp import (
    ABS_SEND_TIME_URI,
    MAX_SEND_BACKLOG,
    MID_URI,
    RETRANSMIT_BUDGET,
    RtpFrame,
    RtpStream,
    StreamParameters,
)
from gateway.metrics import Metrics

TB = fractions.Fraction(1, 90_000)


def video_frame(index: int, width: int = 320, height: int = 180) -> av.VideoFrame:
    rng = np.random.default_rng(index)
    yuv = rng.integers(0, 255, size=(height * 3 // 2, width), dtype=np.uint8)
    frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
    frame.pts = index * 3000
    frame.time_base = TB
    return frame


def audio_frame(index: int) -> av.AudioFrame:
    t = (np.arange(960) + index * 960) / 48_000
    pcm = (np.sin(2 * np.pi * 220 * t) * 8000).astype(np.int16).reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
    frame.sample_rate = 48_000
    frame.pts = index * 960
    frame.time_base = fractions.Fraction(1, 48_000)
    return frame


def make_hub(**overrides: float) -> Hub:
    config = HubConfig(bitrate=300_000, **overrides)  # type: ignore[arg-type]
    return Hub(config, Metrics())


async def encode(hub: Hub, first: int, count: int, codecs: int = 1) -> None:
    """Push frames one at a time and wait for each to be encoded by every codec (no skipping)."""
    for index in range(first, first + count):
        before = hub.stats.video_frames_encoded
        hub.push_video(video_frame(index))
        async with asyncio.timeout(5):
            while hub.stats.video_frames_encoded < before + codecs:
                await asyncio.sleep(0.002)


@dataclass(eq=False)  # hashable by identity, like a stream
class Recorder:
    """A subscriber that keeps the frames the hub hands it."""

    kind: str = "video"
    codec: str = "vp8"
    frames: list[RtpFrame] = field(default_factory=list)
    lane: str = ""

    def __post_init__(self) -> None:
        self.lane = self.lane or self.codec

    def deliver(self, frame: RtpFrame) -> None:
        self.frames.append(frame)


def attach(hub: Hub, kind: str = "video", codec: str = "vp8") -> Recorder:
    recorder = Recorder(kind, codec if kind == "video" else "opus")
    assert hub.attach(recorder)
    return recorder


class Wire:
    """An :class:`~gateway.media.rtp.Output` that records datagrams (no SRTP: identity)."""

    def __init__(self) -> None:
        self.datagrams: list[bytes] = []
        self.queued = 0
        self.connected = True

    def writer(self) -> tuple[object, object] | None:
        if not self.connected:
            return None
        return (lambda data: data), self.datagrams.extend

    def protect_rtcp(self, data: bytes) -> bytes:
        return data

    def backlog(self) -> int:
        return self.queued

    def packets(self) -> list[RtpPacket]:
        extensions = HeaderExtensionsMap()
        extensions.configure(RTCRtpParameters(headerExtensions=[
            RTCRtpHeaderExtensionParameters(id=ext_id, uri=uri) for ext_id, uri in EXTENSIONS]))
        return [RtpPacket.parse(d, extensions) for d in self.datagrams]


EXTENSIONS = ((4, MID_URI), (2, ABS_SEND_TIME_URI))
SSRCS = itertools.count(1000)


def stream(hub: Hub, wire: Wire, kind: str = "video", rtx: bool = True) -> RtpStream:
    params = StreamParameters(
        kind=kind, codec="vp8" if kind == "video" else "opus",
        payload_type=96 if kind == "video" else 111, ssrc=next(SSRCS),
        cname="gw", mid="0" if kind == "video" else "1", extensions=EXTENSIONS,
        rtx_payload_type=97 if rtx and kind == "video" else None, rtx_ssrc=5000)
    out = RtpStream(params, wire, hub)  # type: ignore[arg-type]
    assert hub.attach(out)
    return out


def waiting(out: RtpStream) -> bool:
    """Whether the stream waits for a keyframe (read through a call: it changes under us)."""
    return out.awaiting_keyframe


# -- the hub ------------------------------------------------------------------------------------


async def test_one_encode_serves_every_viewer() -> None:
    hub = make_hub()
    recorders = [attach(hub) for _ in range(3)]
    await encode(hub, 0, 10)
    assert hub.stats.video_frames_encoded == 10
    assert [len(r.frames) for r in recorders] == [10, 10, 10]
    # The very same packetized frames: encoded and packetized once, handed out three times.
    for a, b, c in zip(*(r.frames for r in recorders), strict=True):
        assert a is b is c
    assert recorders[0].frames[0].keyframe
    await hub.close()


def nal_types(frame: RtpFrame) -> list[int]:
    """NAL unit types in an H.264 RTP frame (single NAL, STAP-A or FU-A payloads)."""
    types = []
    for payload in frame.payloads:
        kind = payload[0] & 0x1F
        if kind == 24:  # STAP-A: 2-byte sizes, NAL units
            pos = 1
            while pos + 2 < len(payload):
                size = int.from_bytes(payload[pos:pos + 2], "big")
                types.append(payload[pos + 2] & 0x1F)
                pos += 2 + size
        elif kind == 28:  # FU-A: the start fragment names the type
            if payload[1] & 0x80:
                types.append(payload[1] & 0x1F)
        else:
            types.append(kind)
    return types


async def test_each_codec_is_encoded_once_with_its_own_keyframes() -> None:
    hub = make_hub(keyframe_interval=60.0, keyframe_min_gap=0.0, keyframe_join_gap=0.0)
    vp8 = [attach(hub, codec="vp8") for _ in range(2)]
    h264 = [attach(hub, codec="h264") for _ in range(2)]
    assert hub.video_codecs == ["vp8", "h264"]
    await encode(hub, 0, 6, codecs=2)
    assert hub.stats.video_frames_encoded == 12  # 6 frames x 2 codecs, whatever the viewer count
    assert vp8[0].frames and all(a is b for a, b in zip(vp8[0].frames, vp8[1].frames, strict=True))
    assert h264[0].frames and all(a is b for a, b in zip(h264[0].frames, h264[1].frames,
                                                         strict=True))
    # H.264 starts on an IDR that carries its parameter sets, so a viewer can join there.
    first = h264[0].frames[0]
    assert first.keyframe and {7, 8, 5} <= set(nal_types(first))
    assert not any(f.keyframe for f in h264[0].frames[1:])
    # A keyframe request (PLI) on one codec costs only that codec a keyframe.
    hub.request_keyframe("pli", "h264")
    seen = len(vp8[0].frames), len(h264[0].frames)
    await encode(hub, 6, 2, codecs=2)
    assert h264[0].frames[seen[1]].keyframe
    assert not any(f.keyframe for f in vp8[0].frames[seen[0]:])
    await hub.close()
    assert hub.subscribers == 0 and not hub.attach(Recorder())


async def test_keyframe_requests_are_coalesced() -> None:
    hub = make_hub(keyframe_interval=60.0, keyframe_min_gap=30.0)
    attach(hub)
    for index in range(20):
        hub.request_keyframe("pli")
        await encode(hub, index, 1)
    assert hub.stats.keyframe_requests >= 21
    assert hub.stats.keyframes == 1  # start only: the storm is within one min_gap
    await hub.close()


async def test_joins_get_keyframes_sooner_than_repairs() -> None:
    hub = make_hub(keyframe_interval=60.0, keyframe_min_gap=30.0, keyframe_join_gap=0.05)
    attach(hub)
    await encode(hub, 0, 1)  # the start's keyframe
    hub.request_keyframe("pli")
    await asyncio.sleep(0.06)
    await encode(hub, 1, 1)
    assert hub.stats.keyframes == 1  # a repair waits for keyframe_min_gap
    hub.request_keyframe("join")  # a joiner does not (and the pending PLI goes with it)
    await encode(hub, 2, 1)
    assert hub.stats.keyframes == 2
    hub.request_keyframe("join")  # but joins too are coalesced
    await encode(hub, 3, 1)
    assert hub.stats.keyframes == 2
    await asyncio.sleep(0.06)
    await encode(hub, 4, 1)
    assert hub.stats.keyframes == 3
    await hub.close()


async def test_periodic_keyframe_bounds_recovery() -> None:
    hub = make_hub(keyframe_interval=0.05, keyframe_min_gap=0.01)
    attach(hub)
    for index in range(4):
        await encode(hub, index, 1)
        await asyncio.sleep(0.06)
    assert hub.stats.keyframes == 4
    await hub.close()


async def test_nobody_watching_costs_no_encode() -> None:
    hub = make_hub()
    for index in range(5):
        hub.push_video(video_frame(index))
        hub.push_audio(audio_frame(index))
    await asyncio.sleep(0.05)
    assert hub.stats.video_frames_encoded == 0
    assert hub.stats.audio_frames_encoded == 0
    assert not hub.video_wanted
    await hub.close()


async def test_audio_is_encoded_once_to_opus() -> None:
    hub = make_hub(audio_packet_ms=20)
    a, b = attach(hub, "audio"), attach(hub, "audio")
    for index in range(10):
        hub.push_audio(audio_frame(index))
    assert len(a.frames) >= 9 and all(p is q for p, q in zip(a.frames, b.frames, strict=True))
    # 48 kHz RTP clock, 20 ms apart.
    steps = {q.timestamp - p.timestamp for p, q in itertools.pairwise(a.frames)}
    assert steps == {960}
    hub.detach(a)
    hub.push_audio(audio_frame(10))
    assert len(b.frames) == len(a.frames) + 1
    await hub.close()


@pytest.mark.parametrize("packet_ms", [40, 60])
async def test_longer_audio_packets_are_fewer(packet_ms: int) -> None:
    hub = make_hub(audio_packet_ms=packet_ms)
    listener = attach(hub, "audio")
    for index in range(30):  # 0.6 s of 20 ms frames
        hub.push_audio(audio_frame(index))
    samples = packet_ms * 48
    assert 600 // packet_ms - 1 <= len(listener.frames) <= 600 // packet_ms
    steps = {q.timestamp - p.timestamp for p, q in itertools.pairwise(listener.frames)}
    assert steps == {samples}
    decoder = av.CodecContext.create("opus", "r")
    decoded = [f for frame in listener.frames
               for f in decoder.decode(av.Packet(frame.payloads[0]))]
    assert {f.samples for f in decoded} == {samples}
    await hub.close()


# -- one viewer's stream ------------------------------------------------------------------------


async def test_a_stream_writes_only_its_own_headers() -> None:
    hub = make_hub(keyframe_interval=60.0, keyframe_min_gap=0.0, keyframe_join_gap=0.0)
    wires = [Wire(), Wire()]
    streams = [stream(hub, w) for w in wires]
    shared = attach(hub)
    await encode(hub, 0, 6)
    frames = shared.frames
    for wire, out in zip(wires, streams, strict=True):
        packets = wire.packets()
        assert [p.payload for p in packets] == [x for f in frames for x in f.payloads]
        assert all(p.ssrc == out.params.ssrc and p.payload_type == 96 for p in packets)
        seqs = [p.sequence_number for p in packets]
        assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(seqs))
        # One marker per frame, on its last packet; one timestamp per frame, from its own origin.
        assert sum(p.marker for p in packets) == len(frames) and packets[-1].marker
        stamps = sorted({p.timestamp for p in packets})
        assert len(stamps) == len(frames)
        assert {(p.timestamp - f.timestamp) & 0xFFFFFFFF for p, f in zip(
            [q for q in packets if q.marker], frames, strict=True)} == {out._origin}
        assert {p.extensions.mid for p in packets} == {"0"}
        assert all(p.extensions.abs_send_time is not None for p in packets)
        assert out.frames == len(frames) and out.packets == len(packets)
    assert wires[0].packets()[0].ssrc != wires[1].packets()[0].ssrc
    await hub.close()


async def test_a_late_stream_starts_on_the_keyframe_its_join_asked_for() -> None:
    hub = make_hub(keyframe_interval=60.0, keyframe_min_gap=0.0, keyframe_join_gap=0.0,
                   fast_start_frames=4)  # the join comes 5 frames after the keyframe
    early = attach(hub)
    await encode(hub, 0, 5)
    wire = Wire()
    stream(hub, wire)
    await encode(hub, 5, 5)
    assert len(early.frames) == 10 and sum(f.keyframe for f in early.frames) == 2
    first_of_late = early.frames[5]
    assert first_of_late.keyframe  # the join's keyframe, and the late viewer's first packets
    assert wire.packets()[0].payload == first_of_late.payloads[0]
    await hub.close()


async def test_a_stream_joining_soon_after_a_keyframe_starts_on_it_at_once() -> None:
    """Fast start: the keyframe and the frames since, at once and as the others got them;
    no keyframe for the join, so nobody else pays for it."""
    hub = make_hub(keyframe_interval=60.0, keyframe_min_gap=0.0, keyframe_join_gap=0.0,
                   fast_start_frames=8)
    early = attach(hub)
    await encode(hub, 0, 3)  # the start's keyframe and two more
    requests = hub.stats.keyframe_requests
    wire = Wire()
    late = stream(hub, wire)
    replayed = wire.packets()  # before any new frame is encoded
    sent = [(p.payload, p.timestamp - late._origin & 0xFFFFFFFF) for p in replayed]
    assert sent == [(payload, f.timestamp) for f in early.frames for payload in f.payloads]
    assert hub.stats.keyframe_requests == requests
    assert hub.metrics.fast_starts._value.get() == 1
    await encode(hub, 3, 3)
    assert sum(f.keyframe for f in early.frames) == 1  # still only the start's
    assert len(wire.packets()) == sum(len(f.payloads) for f in early.frames)
    # Past fast_start_frames since the keyframe, a join asks for its own again.
    await encode(hub, 6, 4)
    stream(hub, Wire())
    assert hub.stats.keyframe_requests == requests + 1
    await hub.close()


async def test_a_backed_up_viewer_skips_to_a_keyframe_and_disturbs_no_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # No gaps between keyframes, the hub's or the viewer's own: each step is one frame.
    monkeypatch.setattr(rtp, "KEYFRAME_REQUEST_INTERVAL", 0.0)
    hub = make_hub(keyframe_interval=60.0, keyframe_min_gap=0.0, keyframe_join_gap=0.0)
    slow_wire, fast_wire = Wire(), Wire()
    slow, fast = stream(hub, slow_wire), stream(hub, fast_wire)
    await encode(hub, 0, 3)
    slow_wire.queued = MAX_SEND_BACKLOG + 1  # the kernel refused its datagrams
    requests = hub.stats.keyframe_requests
    await encode(hub, 3, 3)
    assert slow.dropped > 0 and hub.stats.packets_dropped == slow.dropped
    assert waiting(slow) and hub.stats.keyframe_requests > requests
    sent = len(slow_wire.datagrams)
    slow_wire.queued = 0
    await encode(hub, 6, 3)
    resumed = slow_wire.packets()[sent]
    # It resumed on a keyframe (VP8: payload descriptor, then P bit 0 in the frame header).
    assert resumed.payload[4] & 0x01 == 0 and not waiting(slow)
    assert fast.frames == 9 and fast.dropped == 0
    await hub.close()


async def test_a_nack_is_answered_with_rtx_within_a_budget() -> None:
    hub = make_hub()
    wire = Wire()
    out = stream(hub, wire)
    await encode(hub, 0, 4)
    original = wire.packets()[1]
    sent = len(wire.datagrams)
    out.handle_rtcp(RtcpRtpfbPacket(fmt=RTCP_RTPFB_NACK, ssrc=1, media_ssrc=out.params.ssrc,
                                    lost=[original.sequence_number, 65000]))
    assert len(wire.datagrams) == sent + 1  # 65000 was never sent: nothing to answer
    rtx = wire.packets()[-1]
    assert rtx.payload_type == 97 and rtx.ssrc == 5000 and rtx.timestamp == original.timestamp
    assert rtx.payload == original.sequence_number.to_bytes(2, "big") + original.payload
    # A flood of NACKs costs at most the budget per second, not a send per request.
    for _ in range(RETRANSMIT_BUDGET):
        out.handle_rtcp(RtcpRtpfbPacket(fmt=RTCP_RTPFB_NACK, ssrc=1, media_ssrc=out.params.ssrc,
                                        lost=[original.sequence_number] * 10))
    assert out.retransmitted == RETRANSMIT_BUDGET
    await hub.close()


async def test_without_rtx_a_nack_resends_the_packet_itself() -> None:
    hub = make_hub()
    wire = Wire()
    out = stream(hub, wire, rtx=False)
    await encode(hub, 0, 2)
    original = wire.packets()[0]
    out.retransmit(original.sequence_number)
    again = wire.packets()[-1]
    assert (again.sequence_number, again.ssrc, again.payload, again.marker) == (
        original.sequence_number, original.ssrc, original.payload, original.marker)
    await hub.close()


async def test_pli_asks_the_shared_encoder_and_reports_give_rtt_and_loss() -> None:
    hub = make_hub(keyframe_interval=60.0, keyframe_min_gap=0.0, keyframe_join_gap=0.0)
    wire = Wire()
    out = stream(hub, wire)
    await encode(hub, 0, 3)
    keyframes = hub.stats.keyframes
    out.handle_rtcp(RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=1, media_ssrc=out.params.ssrc))
    await encode(hub, 3, 1)
    assert hub.stats.keyframes == keyframes + 1
    # A sender report, then the viewer's receiver report that echoes it.
    report, _sdes = RtcpPacket.parse(out.sender_report())
    assert isinstance(report, RtcpSrPacket) and report.ssrc == out.params.ssrc
    assert report.sender_info.packet_count == out.packets
    assert report.sender_info.octet_count == out.octets
    lsr = (report.sender_info.ntp_timestamp >> 16) & 0xFFFFFFFF
    await asyncio.sleep(0.05)
    out.handle_rtcp(RtcpRrPacket(ssrc=1, reports=[RtcpReceiverInfo(
        ssrc=out.params.ssrc, fraction_lost=0, packets_lost=3, highest_sequence=0, jitter=0,
        lsr=lsr, dlsr=int(0.02 * 65536))]))
    assert out.remote_lost == 3
    assert out.rtt is not None and 0.0 <= out.rtt < 5.0
    await hub.close()


async def test_a_stream_sends_nothing_when_not_connected_or_closed() -> None:
    hub = make_hub()
    wire = Wire()
    out = stream(hub, wire)
    wire.connected = False
    await encode(hub, 0, 2)
    assert wire.datagrams == [] and out.awaiting_keyframe  # still waiting for its keyframe
    wire.connected = True
    out.closed = True
    hub.request_keyframe("test")
    await encode(hub, 2, 2)
    assert wire.datagrams == []
    await hub.close()
