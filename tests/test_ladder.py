"""The quality ladder (gateway/media/ladder.py): lanes per codec and rung, each encoded once;
a viewer's video on the rung its request and its feedback allow, moving only at a keyframe of
the rung it moves to; keyframes that stay on their rung; a PLI storm that costs one keyframe
a second. The network test (a viewer behind a shaped link) is tests/test_ladder_network.py."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from aiohttp.test_utils import TestClient
from aiortc.rtp import RTCP_PSFB_APP, RtcpPsfbPacket, RtcpReceiverInfo, RtcpRrPacket

from gateway.api.common import METRICS, SESSIONS
from gateway.app import create_app
from gateway.media.hub import Hub
from gateway.media.ladder import (
    FAILED_WITHIN,
    GRACE,
    LADDER,
    MAX_UP_HOLD,
    UP_HOLD,
    RungPolicy,
    lane_name,
    rung_for_height,
    scaled_size,
    split_lane,
)
from gateway.media.rtp import RtpStream, StreamParameters, remb_bitrate
from gateway.sessions import Session
from gateway.viewers.peer import Viewer

from .conftest import ClientFactory, make_settings
from .rtc_client import WhepViewer
from .test_media import Recorder, Wire, encode, make_hub, stream, video_frame

Client = TestClient[Any, Any]


def test_lane_names_and_sizes() -> None:
    assert [lane_name("vp8", r) for r in range(3)] == ["vp8", "vp8@1", "vp8@2"]
    assert split_lane("h264@2") == ("h264", 2) and split_lane("vp8") == ("vp8", 0)
    with pytest.raises(ValueError):
        split_lane("vp8@3")
    assert [scaled_size(1280, 720, rung.divisor) for rung in LADDER] == \
        [(1280, 720), (640, 360), (320, 180)]
    assert scaled_size(854, 480, LADDER[2].divisor) == (212, 120)  # even sides, as yuv420p needs
    assert [rung_for_height(720, h) for h in (1080, 720, 500, 360, 200, 180, 90)] == \
        [0, 0, 1, 1, 2, 2, 2]


def test_remb_bitrate_is_read_from_the_feedback() -> None:
    # 1.5 Mbit/s as exponent 3 and mantissa 187500, one SSRC.
    fci = b"REMB" + bytes([1, 3 << 2 | 187500 >> 16, 187500 >> 8 & 0xFF, 187500 & 0xFF]) + \
        (1234).to_bytes(4, "big")
    assert remb_bitrate(fci) == 1_500_000
    assert remb_bitrate(b"GOOG" + fci[4:]) is None and remb_bitrate(b"REMB") is None


def test_the_policy_moves_down_fast_and_up_slowly() -> None:
    policy = RungPolicy(0)
    video = 900_000.0  # what rung 0 sends this viewer
    assert policy.on_estimate(int(video * 1.1), video, 0.0) is None
    # One low estimate is noise; two move it down, to the best rung that fits 85% of it.
    # An estimator ramping up from its start is below the rate, but grows: no move.
    assert [policy.on_estimate(e, video, 2.0 + i) for i, e in
            enumerate((300_000, 350_000, 420_000, 500_000))] == [None] * 4
    # One that saw the link congest cuts its estimate: two such reports move it down.
    assert policy.on_estimate(450_000, video, 7.0) is None
    assert policy.on_estimate(450_000, video, 8.0) == 1  # rung 1's 300k fit 85% of 450k
    # Room to spare, but not for long enough yet.
    rung1 = video / 3
    roomy = int(1.5 * rung1)
    now = 8.0
    while now + 0.4 < 8.0 + UP_HOLD:
        now += 0.4
        assert policy.on_estimate(roomy, rung1, now) is None
    # After the hold, it tries the rung above (it has seen three roomy estimates and more).
    assert policy.on_estimate(roomy, rung1, 8.0 + UP_HOLD) == 0
    # Less room than 1.3x resets the count: three in a row are needed again.
    policy = RungPolicy(1)
    tight = int(1.1 * rung1)
    answers = [policy.on_estimate(e, rung1, 100.0 + i)
               for i, e in enumerate((roomy, roomy, tight, roomy, roomy, roomy))]
    assert answers == [None, None, None, None, None, 0]
    # Loss: one lossy report is noise, two move down ...
    policy = RungPolicy(0)
    assert policy.on_loss(0.3, 2.0) is None and policy.on_loss(0.3, 3.0) == 1
    # ... but not in the grace after a move: those reports count the queue of the rung it left.
    assert policy.on_loss(0.3, 3.5) is None and policy.on_loss(0.3, 4.0) is None
    # A try up ends at its first lossy report that counts only the try (the first after the
    # move counts mostly the rung below).
    now = roomy_until_move(policy, rung1, 4.5)
    assert policy.rung == 0 and policy.on_loss(0.3, now + 0.5) is None
    assert policy.on_loss(0.3, now + 1.5) == 1


def test_a_failed_try_up_doubles_the_hold_and_a_cap_is_kept() -> None:
    policy = RungPolicy(1)
    rung1, now = 300_000.0, 0.0
    roomy = int(1.5 * rung1)
    holds = []
    for _ in range(6):
        start = now
        while policy.on_estimate(roomy, rung1, now) != 0:  # wait for the try up
            now += 0.5
        holds.append(now - start)
        # The link could not carry it: lossy reports, back down at the first of the try's own.
        assert policy.on_loss(0.3, now + 0.5) is None and policy.on_loss(0.3, now + 1.0) == 1
        now += 1.0
    assert holds[0] < UP_HOLD + 2 and holds[1] > 1.8 * UP_HOLD
    assert holds[-1] <= MAX_UP_HOLD + 2 and holds == sorted(holds)
    # A try that holds resets the wait: the next rung up comes after UP_HOLD again.
    start = now
    while policy.on_estimate(roomy, rung1, now) != 0:
        now += 0.5
    assert now - start > MAX_UP_HOLD - 1  # still the long hold after the failures
    rung0 = rung1 * 3
    for _ in range(20):  # it holds at rung 0
        now += 0.5
        assert policy.on_estimate(int(rung0 * 1.1), rung0, now) is None
    assert policy._hold == UP_HOLD
    # A viewer that asked for at most rung 1 (max_height) is never moved above it.
    capped = RungPolicy(1, top=1)
    assert all(capped.on_estimate(roomy * 4, rung1, t * 1.0) is None for t in range(100))


def roomy_until_move(policy: RungPolicy, rate: float, now: float) -> float:
    """Estimates at 1.5x ``rate`` every 0.5 s from ``now``: the time of the move they make."""
    for step in range(100):
        if policy.on_estimate(int(1.5 * rate), rate, now + step * 0.5) is not None:
            return now + step * 0.5
    raise AssertionError(f"no move in 50 s on rung {policy.rung}")


def test_a_failed_try_keeps_the_viewer_off_that_rung_only() -> None:
    """A try into the full size that fails and drops the viewer two rungs (the burst cut its
    estimate) makes it wait twice as long on the middle rung, not on the lowest one too."""
    policy = RungPolicy(1)
    rung1 = 300_000.0
    rung0, rung2 = rung1 * 3, rung1 * 3 / 8
    now = roomy_until_move(policy, rung1, 0.0)
    for wait in (2 * UP_HOLD, MAX_UP_HOLD):
        assert policy.rung == 0
        policy.arrived(now)
        # The full size's burst congests the link: two cut estimates, down to what fits.
        assert policy.on_estimate(int(rung1 / 2), rung0, now + 2.0) is None
        assert policy.on_estimate(int(rung1 / 2), rung0, now + 2.5) == 2
        failed = now = now + 2.5
        policy.arrived(now)
        # The middle rung comes back after the usual hold ...
        now = roomy_until_move(policy, rung2, now)
        assert policy.rung == 1 and now - failed < UP_HOLD + 1
        policy.arrived(now)
        middle = now
        # ... and the full size is tried again after the doubled wait there (8 s, then 10).
        now = roomy_until_move(policy, rung1, now)
        assert policy.rung == 0 and middle + wait <= now < middle + wait + 0.5
    # This try holds: the full size's next failure starts from UP_HOLD again.
    policy.arrived(now)
    assert policy.on_estimate(int(1.1 * rung0), rung0, now + FAILED_WITHIN) is None
    assert policy._hold == UP_HOLD


class _Feedback:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.counted: list[str] = []
        self.joins: list[tuple[str, bool]] = []

    def request_keyframe(self, reason: str, lane: str) -> None:
        self.requests.append((reason, lane))

    def count_feedback(self, kind: str) -> None:
        self.counted.append(kind)

    def count_dropped(self, kind: str, count: int) -> None: ...

    def join_lane(self, subscriber: RtpStream, lane: str, urgent: bool) -> None:
        self.joins.append((lane, urgent))

    def leave_lane(self, subscriber: RtpStream, lane: str) -> None: ...


def test_a_pli_storm_from_one_viewer_asks_for_one_keyframe_a_second() -> None:
    from aiortc.rtp import RTCP_PSFB_PLI, RtcpPsfbPacket

    feedback = _Feedback()
    params = StreamParameters(kind="video", codec="vp8", payload_type=96, ssrc=7, cname="c")
    stream = RtpStream(params, cast(Any, None), feedback, lane="vp8@1")
    for _ in range(50):
        stream.handle_rtcp(RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=1, media_ssrc=7))
    assert feedback.requests == [("pli", "vp8@1")]  # its own rung's, once
    assert feedback.counted.count("pli") == 50
    assert feedback.counted.count("keyframe_request_limited") == 49


async def test_keyframes_asked_for_on_one_rung_are_encoded_on_that_rung_only() -> None:
    hub = make_hub(keyframe_interval=60.0, keyframe_min_gap=0.0, keyframe_join_gap=0.0)
    full, small = Recorder(lane="vp8"), Recorder(lane="vp8@1")
    assert hub.attach(full) and hub.attach(small)
    await encode(hub, 0, 3, codecs=2)
    assert sum(f.keyframe for f in full.frames) == 1 and sum(f.keyframe for f in small.frames) == 1
    for index in range(3, 9):
        hub.request_keyframe("pli", "vp8@1")
        await encode(hub, index, 1, codecs=2)
    assert sum(f.keyframe for f in small.frames) == 7
    assert sum(f.keyframe for f in full.frames) == 1  # untouched by the other rung's requests
    assert [lane.keyframes for lane in hub._lanes.values()] == [1, 7]
    # Every lane stamps a source frame alike: a viewer can move between them.
    assert [f.timestamp for f in full.frames] == [f.timestamp for f in small.frames]
    assert {f.lane for f in small.frames} == {"vp8@1"}
    await hub.close()


def video_stream(viewer: Viewer) -> RtpStream:
    return next(s for s in viewer._streams if s.kind == "video")


async def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


def sizes(viewer: WhepViewer) -> list[tuple[int, int]]:
    return [(s.width, s.height) for s in viewer.received.video]


@pytest.mark.parametrize("settings", [None, "two-workers"], indirect=True)
async def test_viewers_decode_the_rung_their_request_allows(client: Client) -> None:
    created = await (await client.post("/v1/sessions")).json()  # 640x360
    session = client.app[SESSIONS].get(created["id"])
    viewers = [WhepViewer(client, created["id"], query=q)
               for q in ("", "?max_height=200", "?max_height=90")]
    try:
        for viewer in viewers:
            await viewer.connect()
        await wait_for(lambda: all(len(v.received.video) >= 10 for v in viewers))
        assert [set(sizes(v)) for v in viewers] == [{(640, 360)}, {(320, 180)}, {(160, 90)}]
        assert sorted(session.hub.video_codecs) == ["vp8", "vp8@1", "vp8@2"]  # each once
        metrics = client.app[METRICS]
        await wait_for(lambda: [metrics.viewer_rungs.labels(str(r))._value.get()
                                for r in range(3)] == [1, 1, 1])
        bad = await client.post(f"/v1/sessions/{created['id']}/whep?max_height=tall",
                                data="v=0\r\n", headers={"Content-Type": "application/sdp"})
        assert bad.status == 400 and "max_height" in (await bad.json())["error"]["message"]
    finally:
        await asyncio.gather(*(v.close() for v in viewers))


@contextlib.asynccontextmanager
async def one_viewer(client: Client) -> AsyncIterator[tuple[WhepViewer, RtpStream, Session]]:
    """A session with one playing aiortc viewer: its player, its video stream in the gateway."""
    created = await (await client.post("/v1/sessions")).json()
    session = client.app[SESSIONS].get(created["id"])
    player = WhepViewer(client, created["id"])
    try:
        await player.connect()
        await wait_for(lambda: len(player.received.video) >= 10)
        (viewer,) = session.audience._viewers.values()
        assert isinstance(viewer, Viewer)
        yield player, video_stream(viewer), session
    finally:
        await player.close()


async def test_a_viewer_moves_between_rungs_at_a_keyframe(client: Client) -> None:
    async with one_viewer(client) as (player, stream, session):
        stream.move_to("vp8@1")
        await wait_for(lambda: stream.lane == "vp8@1")
        count = len(player.received.video)
        await wait_for(lambda: len(player.received.video) >= count + 10)
        seen = sizes(player)
        switch = seen.index((320, 180))
        # One move: the full size up to a frame, the half size from it on, nothing between.
        assert set(seen[:switch]) == {(640, 360)} and set(seen[switch:]) == {(320, 180)}
        # The full-size lane lost its only viewer: its encoder idles.
        assert isinstance(session.hub, Hub)
        lanes = session.hub._lanes
        assert not lanes["vp8"].subscribers and lanes["vp8@1"].subscribers == {stream}
        pts = [s.pts for s in player.received.video if s.pts is not None]
        assert all(0 < (b - a) % (1 << 32) < 1 << 31 for a, b in itertools.pairwise(pts))
        metrics = client.app[METRICS]
        assert metrics.rung_switches.labels("down")._value.get() == 1
        assert metrics.viewer_rungs.labels("0")._value.get() == 0
        assert metrics.viewer_rungs.labels("1")._value.get() == 1
        # And back up.
        stream.move_to("vp8")
        count = len(player.received.video)
        await wait_for(lambda: len(player.received.video) >= count + 10
                       and sizes(player)[-1] == (640, 360))
        assert metrics.rung_switches.labels("up")._value.get() == 1
    await wait_for(lambda: metrics.viewer_rungs.labels("0")._value.get() == 0)


def remb(bitrate: int, ssrc: int) -> RtcpPsfbPacket:
    exponent = max(0, bitrate.bit_length() - 18)
    mantissa = bitrate >> exponent
    fci = b"REMB" + bytes([1, exponent << 2 | mantissa >> 16, mantissa >> 8 & 0xFF,
                           mantissa & 0xFF]) + ssrc.to_bytes(4, "big")
    return RtcpPsfbPacket(fmt=RTCP_PSFB_APP, ssrc=1, media_ssrc=0, fci=fci)


async def test_with_adaptive_quality_a_viewers_feedback_moves_its_video(
        aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app(make_settings(adaptive_quality=True)))
    async with one_viewer(client) as (player, stream, _session):
        assert stream.lane == "vp8"
        await asyncio.sleep(GRACE)  # a joining viewer's estimates do not move it at once
        # What its browser says once its link congests: the estimate cut, twice, far below
        # the rate it is sent (the player's own estimates keep coming in between).
        await wait_for(lambda: stream.estimate is not None)
        for estimate in (60_000, 50_000):
            stream.handle_rtcp(remb(estimate, stream.params.ssrc))
        assert stream.next_lane in ("vp8@1", "vp8@2")
        await wait_for(lambda: stream.lane != "vp8")
        count = len(player.received.video)
        await wait_for(lambda: len(player.received.video) >= count + 5)
        assert sizes(player)[-1] in ((320, 180), (160, 90))
        assert client.app[METRICS].rung_switches.labels("down")._value.get() == 1


async def test_a_try_up_waits_for_the_full_lanes_own_keyframe() -> None:
    # No periodic keyframes here: every keyframe is one somebody asked for.
    hub = make_hub(keyframe_interval=3600.0, keyframe_min_gap=0.0, keyframe_join_gap=0.0)
    good = Recorder(lane="vp8")
    mover = stream(hub, Wire())
    assert hub.attach(good)
    mover.move_to("vp8@1")  # down: its rung is asked for a keyframe, and it moves on it
    await encode(hub, 0, 3, codecs=2)
    assert mover.lane == "vp8@1" and hub._lanes["vp8@1"].keyframes == 1
    full = hub._lanes["vp8"]
    before = full.keyframes
    # A try up asks for nothing: the viewers on the full size get no keyframe for it ...
    mover.move_to("vp8", urgent=False)
    await encode(hub, 3, 5, codecs=2)
    assert full.keyframes == before and (mover.lane, mover.next_lane) == ("vp8@1", "vp8")
    # ... and it moves on the next one the lane makes anyway (periodic, or a repair).
    hub.request_keyframe("pli", "vp8")
    await encode(hub, 8, 1)  # the half-size lane may stop with it: it loses its viewer
    await wait_for(lambda: mover.lane == "vp8")
    assert (mover.next_lane, full.keyframes) == (None, before + 1)
    assert sum(f.keyframe for f in good.frames) == before + 1
    # A try into a lane nobody watches asks at once: its keyframe costs nobody.
    more = itertools.count(10)
    mover.move_to("vp8@2")
    await wait_for(lambda: mover.lane == "vp8@2" or not push(hub, next(more)))
    smaller = hub._lanes["vp8@1"]
    before = smaller.keyframes
    mover.move_to("vp8@1", urgent=False)
    await wait_for(lambda: mover.lane == "vp8@1" or not push(hub, next(more)))
    assert smaller.keyframes == before + 1
    await hub.close()


def push(hub: Hub, index: int) -> bool:
    """One more source frame for :func:`wait_for` to wait on (False: keep waiting)."""
    hub.push_video(video_frame(index))
    return True


def test_the_policy_is_not_fed_while_a_move_waits_and_its_clock_starts_on_arrival() -> None:
    feedback = _Feedback()
    params = StreamParameters(kind="video", codec="vp8", payload_type=96, ssrc=7, cname="c")
    policy = RungPolicy(1, 0, time.monotonic() - 60.0)  # on rung 1 long enough to try up
    mover = RtpStream(params, cast(Any, None), feedback, lane="vp8@1", policy=policy)
    for _ in range(3):  # room to spare (nothing sent yet): try the rung above
        mover.handle_rtcp(remb(1_000_000, 7))
    assert feedback.joins == [("vp8", False)] and mover.next_lane == "vp8"
    # While it waits for the full lane's keyframe, its reports do not move it (two lossy
    # reports would have sent it back down, cancelling the try before it started).
    for _ in range(2):
        mover.handle_rtcp(RtcpRrPacket(ssrc=1, reports=[RtcpReceiverInfo(
            ssrc=7, fraction_lost=80, packets_lost=100, highest_sequence=0, jitter=0, lsr=0,
            dlsr=0)]))
    assert mover.next_lane == "vp8" and policy.rung == 0 and feedback.joins == [("vp8", False)]
    # Once there, the hold and the grace count from the arrival, not from the decision.
    arrival = time.monotonic()
    policy.arrived(arrival)
    assert policy._changed == arrival and policy._went_up == arrival
