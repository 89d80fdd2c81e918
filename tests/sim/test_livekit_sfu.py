"""The simulator as the operator's LiveKit: what one client publishes, the others receive
(the real ``livekit`` SDK on both ends), permissions and hidden participants as LiveKit has them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
from collections.abc import AsyncIterator

import av
import numpy as np
import pytest
from livekit import rtc

from .conftest import LiveKitRig, SdkFactory, needs_netns
from .sdk_client import TIMEOUT, feed

WIDTH, HEIGHT, FPS = 320, 240, 30


def picture(index: int) -> np.ndarray:
    """A moving gradient, I420-sized RGB."""
    x = np.arange(WIDTH, dtype=np.uint16)
    row = ((x + index * 4) % 256).astype(np.uint8)
    rgb = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
    rgb[:] = row[None, :, None]
    return rgb


@contextlib.asynccontextmanager
async def camera(client_room: rtc.Room, codec: rtc.VideoCodec.ValueType | None = None
                 ) -> AsyncIterator[rtc.LocalTrackPublication]:
    """Publish a raw camera track (the SDK encodes it, in ``codec`` if given) and feed it at
    30 fps."""
    source = rtc.VideoSource(WIDTH, HEIGHT)
    track = rtc.LocalVideoTrack.create_video_track("camera", source)
    options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA)
    if codec is not None:
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA,
                                          video_codec=codec, simulcast=False)
    async with asyncio.timeout(TIMEOUT):
        publication = await client_room.local_participant.publish_track(track, options)

    async def run() -> None:
        index = 0
        while True:
            frame = rtc.VideoFrame(WIDTH, HEIGHT, rtc.VideoBufferType.RGB24,
                                   picture(index).tobytes())
            source.capture_frame(frame)
            index += 1
            await asyncio.sleep(1 / FPS)

    task = asyncio.get_running_loop().create_task(run())
    try:
        yield publication
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def encoded_camera(client_room: rtc.Room) -> AsyncIterator[rtc.EncodedVideoSource]:
    """Publish VP8 the publisher encoded itself (PyAV), passed through without a re-encode:
    what the gateway does with its hub's packets."""
    source = rtc.EncodedVideoSource(WIDTH, HEIGHT)
    track = rtc.LocalVideoTrack.create_video_track("encoded", source)
    options = rtc.TrackPublishOptions(
        source=rtc.TrackSource.SOURCE_CAMERA, video_codec=rtc.VideoCodec.VP8, simulcast=False,
        video_encoder=rtc.VideoEncoderBackend.ENCODER_BACKEND_PRE_ENCODED)
    async with asyncio.timeout(TIMEOUT):
        await client_room.local_participant.publish_track(track, options)
    encoder = av.CodecContext.create("libvpx", "w")
    assert isinstance(encoder, av.VideoCodecContext)
    encoder.width, encoder.height, encoder.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    encoder.time_base = fractions.Fraction(1, 90_000)
    encoder.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}

    async def run() -> None:
        index = 0
        while True:
            frame = av.VideoFrame.from_ndarray(picture(index), format="rgb24").reformat(
                format="yuv420p")
            frame.pts = index * 3000
            keyframe = index % 60 == 0 or source.take_feedback().keyframe_requested
            frame.pict_type = av.video.frame.PictureType.I if keyframe else \
                av.video.frame.PictureType.NONE
            for packet in encoder.encode(frame):
                source.capture_frame(rtc.EncodedVideoFrame(
                    bytes(packet), WIDTH, HEIGHT, rtc.VideoCodec.VP8,
                    rtc.EncodedFrameType.ENCODED_FRAME_KEY if packet.is_keyframe
                    else rtc.EncodedFrameType.ENCODED_FRAME_DELTA,
                    timestamp_us=index * 1_000_000 // FPS))
            index += 1
            await asyncio.sleep(1 / FPS)

    task = asyncio.get_running_loop().create_task(run())
    try:
        yield source
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@needs_netns
async def test_what_one_client_publishes_the_others_receive(livekit: LiveKitRig,
                                                            sdk_client: SdkFactory) -> None:
    publisher = await sdk_client("publisher")
    viewer = await sdk_client("viewer", can_publish=False, can_publish_data=False)
    async with camera(publisher.room):
        microphone = await publisher.publish_microphone()
        speaking = asyncio.get_running_loop().create_task(feed(microphone, 3.0, 0.3))
        try:
            await viewer.wait_for(lambda: viewer.video.frames >= 30 and viewer.audio.frames >= 50)
        finally:
            await speaking
    assert viewer.video.sizes == {(WIDTH, HEIGHT)}
    assert viewer.peak_rms() > 3000  # the publisher's 0.3 full-scale tone
    subscribed = viewer.seen("track_subscribed")
    assert sorted(s.split(":")[1] for s in subscribed) == ["audio", "video"]
    assert all(s.startswith("publisher:") for s in subscribed)
    remote = viewer.room.remote_participants["publisher"]
    assert {p.name for p in remote.track_publications.values()} == {"camera", "microphone"}
    # The publisher is not sent its own tracks back.
    assert publisher.video.frames == 0 and publisher.audio.frames == 0


@needs_netns
async def test_pre_encoded_vp8_reaches_a_subscriber(livekit: LiveKitRig,
                                                    sdk_client: SdkFactory) -> None:
    publisher = await sdk_client("publisher")
    viewer = await sdk_client("viewer", can_publish=False)
    async with encoded_camera(publisher.room):
        await viewer.wait_for(lambda: viewer.video.frames >= 30)
    assert viewer.video.sizes == {(WIDTH, HEIGHT)}
    remote = viewer.room.remote_participants["publisher"]
    [publication] = remote.track_publications.values()
    assert publication.mime_type.lower() == "video/vp8"


@needs_netns
async def test_unpublishing_ends_the_subscribers_track(livekit: LiveKitRig,
                                                       sdk_client: SdkFactory) -> None:
    publisher = await sdk_client("publisher")
    viewer = await sdk_client("viewer")
    async with camera(publisher.room) as publication:
        await viewer.wait_for(lambda: viewer.video.frames >= 10)
        await publisher.room.local_participant.unpublish_track(publication.sid)
        await viewer.wait_for(lambda: viewer.seen("track_unsubscribed") == ["publisher"])
    room = livekit.server.room("room-1")
    assert room is not None and room.publications() == []


@needs_netns
async def test_a_subscribe_only_token_cannot_publish(livekit: LiveKitRig,
                                                     sdk_client: SdkFactory) -> None:
    viewer = await sdk_client("viewer", can_publish=False, can_publish_data=False)
    other = await sdk_client("other")
    source = rtc.AudioSource(48_000, 1)
    track = rtc.LocalAudioTrack.create_audio_track("microphone", source)
    # Like LiveKit's server, the simulator ignores the AddTrackRequest of a participant
    # that may not publish (livekit-server logs "no permission to publish track"): the SDK
    # waits for a TrackPublishedResponse that never comes.
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(5):
            await viewer.room.local_participant.publish_track(track, rtc.TrackPublishOptions())
    with contextlib.suppress(Exception):  # the SDK may refuse locally; the server drops it
        await viewer.room.local_participant.publish_data(b"x", topic="t")
    await asyncio.sleep(0.5)
    room = livekit.server.room("room-1")
    assert room is not None and room.publications() == []
    assert not other.data and not other.seen("track_subscribed")


@needs_netns
async def test_a_hidden_participant_is_not_seen(livekit: LiveKitRig,
                                                sdk_client: SdkFactory) -> None:
    visible = await sdk_client("visible")
    await sdk_client("relay", hidden=True, can_publish=False)
    late = await sdk_client("late")
    await asyncio.sleep(0.3)
    assert "relay" not in visible.room.remote_participants
    assert list(late.room.remote_participants) == ["visible"]


@needs_netns
async def test_h264_published_by_one_client_reaches_another(livekit: LiveKitRig,
                                                            sdk_client: SdkFactory) -> None:
    publisher = await sdk_client("publisher")
    viewer = await sdk_client("viewer", can_publish=False)
    room = livekit.server.room("room-1")
    assert room is not None
    async with camera(publisher.room, rtc.VideoCodec.H264):
        await viewer.wait_for(lambda: viewer.video.frames >= 30)
    assert viewer.video.sizes == {(WIDTH, HEIGHT)}
    assert [p.codec for p in room.publications()] == ["H264"]
