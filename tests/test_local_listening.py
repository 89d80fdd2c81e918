"""The local avatar's ears: microphone → VAD → PocketSphinx → ``user_*`` events, offline.

Speech comes from our own eSpeak voice, pushed as aiortc delivers a browser's microphone
(20 ms frames of 48 kHz s16 stereo). PocketSphinx hears eSpeak poorly, and eSpeak's samples
differ a little from one synthesis to the next, so transcripts are checked for shared words
with phrases whose transcript held over 25 syntheses: "one two three four five" → "well two
three four five" (25 of 25), "where are you from" → "where" (25 of 25). Others are worse:
"what is your name" → "what is your day" (18 of 25) or "what the ..." (7), "hello" → "oh".
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import os
import signal
import threading
from collections.abc import AsyncIterator, Iterator

import av
import numpy as np
import numpy.typing as npt
import pytest

from gateway.avatar import SpeechSynthesizer
from gateway.avatar.stt import RecognizerError, RecognizerProcess, SpeechRecognizer
from gateway.config import QUALITY_TIERS
from gateway.errors import Conflict, UpstreamUnavailable
from gateway.media.vad import EnergyVad, UtteranceCutter, Voice
from gateway.upstream.base import AvatarEvent, EventType
from gateway.upstream.heygen import HeyGenUpstream
from gateway.upstream.liveavatar import LiveAvatarUpstream
from gateway.upstream.local import LocalUpstream

from .test_local_upstream import CaptureSink

RATE = 48_000
FRAME = 960
USER_EVENTS = (EventType.USER_START, EventType.USER_STOP,
               EventType.USER_TALKING_MESSAGE, EventType.USER_END_MESSAGE)

Pcm = npt.NDArray[np.int16]
ECHO_TAIL = 2.0


@pytest.fixture(scope="module")
def synthesizer() -> SpeechSynthesizer:
    return SpeechSynthesizer("en-us")


@contextlib.asynccontextmanager
async def listening_avatar(echo_tail: float = 0.5,
                           ) -> AsyncIterator[tuple[LocalUpstream, CaptureSink]]:
    upstream = LocalUpstream(QUALITY_TIERS["low"], SpeechSynthesizer("en-us"), echo_tail=echo_tail)
    sink = CaptureSink(video_wanted=False)
    await upstream.start(sink)
    await upstream.set_listening(True)
    try:
        yield upstream, sink
    finally:
        await upstream.stop()


@pytest.fixture
async def listening() -> AsyncIterator[tuple[LocalUpstream, CaptureSink]]:
    async with listening_avatar() as avatar:
        yield avatar


def silence(seconds: float) -> Pcm:
    return np.zeros(int(seconds * RATE), dtype=np.int16)


def noise(seconds: float, rms: float) -> Pcm:
    rng = np.random.default_rng(7)
    return np.clip(rng.normal(0.0, rms, int(seconds * RATE)), -32768, 32767).astype(np.int16)


def microphone(*parts: Pcm) -> Iterator[av.AudioFrame]:
    """Mono 48 kHz PCM as aiortc hands over a browser's Opus audio: 20 ms s16 stereo frames."""
    pcm = np.concatenate(parts)
    pcm = np.pad(pcm, (0, -len(pcm) % FRAME))
    stereo = np.repeat(pcm, 2).reshape(1, -1)
    for start in range(0, len(pcm), FRAME):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(stereo[:, 2 * start:2 * (start + FRAME)]),
                                           format="s16", layout="stereo")
        frame.sample_rate = RATE
        frame.pts = start
        frame.time_base = fractions.Fraction(1, RATE)
        yield frame


async def say(upstream: LocalUpstream, *parts: Pcm) -> None:
    for frame in microphone(*parts):
        await upstream.push_microphone(frame)


def user_events(sink: CaptureSink) -> list[AvatarEvent]:
    return [e for e in sink.events if e.type in USER_EVENTS]


async def wait_for(sink: CaptureSink, kind: EventType, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not any(e.type is kind for e in sink.events):
            await asyncio.sleep(0.02)


def words(text: str) -> set[str]:
    return set(text.lower().replace(",", " ").split())


# -- the whole path ----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "shared"), [("one two three four five", 3), ("where are you from", 1)])
async def test_speech_becomes_start_stop_and_a_transcript(
        listening: tuple[LocalUpstream, CaptureSink], synthesizer: SpeechSynthesizer,
        text: str, shared: int) -> None:
    upstream, sink = listening
    await say(upstream, silence(0.5), synthesizer.synthesize(text).pcm, silence(1.0))
    await wait_for(sink, EventType.USER_END_MESSAGE)
    events = user_events(sink)
    assert [e.type for e in events] == list(USER_EVENTS)
    assert len({e.task_id for e in events}) == 1 and events[0].task_id
    heard = events[2].data["message"]
    assert events[3].data["message"] == heard
    assert len(words(heard) & words(text)) >= shared, heard


async def test_turning_listening_off_ends_the_utterance(
        listening: tuple[LocalUpstream, CaptureSink], synthesizer: SpeechSynthesizer) -> None:
    """Push-to-talk: the controller releases the button right after the last word."""
    upstream, sink = listening
    await say(upstream, silence(0.3), synthesizer.synthesize("one two three four five").pcm)
    assert [e.type for e in user_events(sink)] == [EventType.USER_START]
    await upstream.set_listening(False)
    assert [e.type for e in user_events(sink)] == [EventType.USER_START, EventType.USER_STOP]
    await wait_for(sink, EventType.USER_END_MESSAGE)
    assert words(user_events(sink)[-1].data["message"]) & words("one two three four five")


async def test_a_microphone_that_goes_quiet_without_frames_still_ends_the_utterance(
        listening: tuple[LocalUpstream, CaptureSink], synthesizer: SpeechSynthesizer) -> None:
    """DTX or a gone track: no frames at all after the speech, yet user_stop comes."""
    upstream, sink = listening
    await say(upstream, silence(0.3), synthesizer.synthesize("one two three four five").pcm)
    await wait_for(sink, EventType.USER_STOP)
    await wait_for(sink, EventType.USER_END_MESSAGE)


async def test_not_listening_hears_nothing(synthesizer: SpeechSynthesizer) -> None:
    upstream, sink = LocalUpstream(QUALITY_TIERS["low"], synthesizer), CaptureSink(video_wanted=False)
    await upstream.start(sink)
    try:
        speech = synthesizer.synthesize("one two three four five").pcm
        await say(upstream, silence(0.3), speech, silence(1.0))
        await upstream.set_listening(True)
        await upstream.set_listening(False)
        await say(upstream, silence(0.3), speech, silence(1.0))
        await asyncio.sleep(0.5)
    finally:
        await upstream.stop()
    assert user_events(sink) == []


async def test_the_avatar_does_not_hear_itself(synthesizer: SpeechSynthesizer) -> None:
    """While it speaks (and its echo tail after), the microphone is ignored; then it listens."""
    # A long echo tail: the media clock runs on while a busy machine delays this test's
    # noticing that the avatar stopped.
    async with listening_avatar(echo_tail=ECHO_TAIL) as (upstream, sink):
        spoken = await upstream.speak("One two three four five.")
        echo = synthesizer.synthesize("one two three four five").pcm
        await say(upstream, silence(0.3), echo, silence(1.0))
        await wait_for(sink, EventType.AVATAR_STOP_TALKING, timeout=spoken.duration_ms / 1000 + 30)
        await say(upstream, echo[:RATE // 4])  # the echo's last words, inside the echo tail
        await asyncio.sleep(ECHO_TAIL + 0.1)
        assert user_events(sink) == []

        await say(upstream, silence(0.3), echo, silence(1.0))
        await wait_for(sink, EventType.USER_END_MESSAGE)
        assert [e.type for e in user_events(sink)] == list(USER_EVENTS)


async def test_silence_and_noise_make_no_message(listening: tuple[LocalUpstream, CaptureSink]) -> None:
    upstream, sink = listening
    await say(upstream, silence(1.0), noise(2.0, rms=100))  # room noise: under the VAD's threshold
    await asyncio.sleep(0.3)
    assert user_events(sink) == []
    await say(upstream, noise(1.0, rms=3000), silence(1.0))  # a loud hiss: voice activity, no words
    await wait_for(sink, EventType.USER_STOP)
    await asyncio.sleep(1.0)
    assert [e.type for e in user_events(sink)] == [EventType.USER_START, EventType.USER_STOP]


def threads() -> set[threading.Thread]:
    return set(threading.enumerate())


def child_processes() -> set[int]:
    me, children = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me:
                children.add(int(entry))
    return children


async def test_stop_leaves_no_thread_task_or_process(synthesizer: SpeechSynthesizer) -> None:
    await asyncio.sleep(0)
    threads_before, tasks_before, children_before = threads(), asyncio.all_tasks(), child_processes()
    upstream, sink = LocalUpstream(QUALITY_TIERS["low"], synthesizer), CaptureSink(video_wanted=False)
    await upstream.start(sink)
    await upstream.set_listening(True)
    assert child_processes() - children_before  # the recognizer runs
    # Stop with a transcription running and another one waiting.
    speech = synthesizer.synthesize("one two three four five").pcm
    await say(upstream, silence(0.3), speech, silence(1.0), speech, silence(1.0))
    assert sum(e.type is EventType.USER_STOP for e in sink.events) == 2
    await upstream.stop()
    async with asyncio.timeout(20):
        while threads() - threads_before or asyncio.all_tasks() - tasks_before:
            await asyncio.sleep(0.02)
    assert child_processes() == children_before
    await asyncio.sleep(0.1)
    assert not any(e.type is EventType.USER_END_MESSAGE for e in sink.events)


async def test_stop_while_the_recognizer_starts(synthesizer: SpeechSynthesizer) -> None:
    children_before = child_processes()
    upstream = LocalUpstream(QUALITY_TIERS["low"], synthesizer)
    await upstream.start(CaptureSink(video_wanted=False))
    starting = asyncio.create_task(upstream.set_listening(True))
    await asyncio.sleep(0.05)
    await upstream.stop()
    with contextlib.suppress(UpstreamUnavailable):  # the recognizer was closed while starting
        await starting
    assert child_processes() == children_before


async def test_listening_needs_a_running_avatar(synthesizer: SpeechSynthesizer) -> None:
    upstream = LocalUpstream(QUALITY_TIERS["low"], synthesizer)
    with pytest.raises(Conflict):
        await upstream.set_listening(True)
    await upstream.stop()


def test_which_upstreams_listen() -> None:
    assert LocalUpstream.listens and HeyGenUpstream.listens and LiveAvatarUpstream.listens


# -- the recognizer alone ------------------------------------------------------------------------


def to_16k(*parts: Pcm) -> bytes:
    resampler = av.AudioResampler("s16", "mono", SpeechRecognizer.sample_rate)
    return b"".join(f.to_ndarray().tobytes() for frame in microphone(*parts)
                    for f in resampler.resample(frame))


def test_recognizer_transcribes_and_stays_quiet_on_silence(synthesizer: SpeechSynthesizer) -> None:
    speech = to_16k(silence(0.3), synthesizer.synthesize("one two three four five").pcm, silence(0.5))
    recognizer = SpeechRecognizer()
    assert len(words(recognizer.transcribe(speech)) & words("one two three four five")) >= 2
    assert recognizer.transcribe(bytes(2 * SpeechRecognizer.sample_rate)) == ""  # 1 s of zeros
    assert recognizer.transcribe(b"") == ""
    with pytest.raises(ValueError):
        recognizer.transcribe(b"\x00")


async def test_a_recognizer_process_that_dies_is_replaced(synthesizer: SpeechSynthesizer) -> None:
    children_before = child_processes()
    recognizer = RecognizerProcess()
    await recognizer.start()
    (child,) = child_processes() - children_before
    os.kill(child, signal.SIGKILL)
    speech = to_16k(silence(0.3), synthesizer.synthesize("one two three four five").pcm, silence(0.5))
    with contextlib.suppress(RecognizerError):  # unless the death was noticed first
        await recognizer.transcribe(speech)
    assert words(await recognizer.transcribe(speech)) & words("one two three four five")
    await recognizer.close()
    assert child_processes() == children_before
    with pytest.raises(RecognizerError):
        await recognizer.transcribe(speech)


# -- the VAD -------------------------------------------------------------------------------------


def test_energy_vad_starts_after_100ms_loud_and_stops_after_600ms_quiet() -> None:
    vad = EnergyVad(threshold=500.0)
    assert [vad.update(1000.0, 0.02) for _ in range(4)] == [None] * 4
    assert vad.update(1000.0, 0.02) is Voice.START
    # Hysteresis: half the threshold keeps speech going.
    assert [vad.update(300.0, 0.02) for _ in range(50)] == [None] * 50
    assert [vad.update(100.0, 0.02) for _ in range(29)] == [None] * 29
    assert vad.update(100.0, 0.02) is Voice.STOP and not vad.speaking
    # A short click does not start speech.
    assert [vad.update(5000.0, 0.02) for _ in range(4)] + [vad.update(0.0, 0.02)] == [None] * 5


def tone(seconds: float, rate: int = 16_000, amplitude: int = 3000) -> Pcm:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.int16)


def feed(cutter: UtteranceCutter, pcm: Pcm, cuts: list[bytes] | None = None) -> list[Voice]:
    """Push ``pcm`` in 20 ms chunks; the audio of every utterance that ends goes to ``cuts``."""
    changes = []
    for i in range(0, len(pcm), 320):
        change = cutter.push(pcm[i:i + 320])
        if change is not None:
            changes.append(change)
        if change is Voice.STOP:
            pcm_cut = cutter.cut()
            assert pcm_cut is not None
            if cuts is not None:
                cuts.append(pcm_cut)
    return changes


def test_cutter_keeps_a_pre_roll_and_the_trailing_quiet() -> None:
    cutter = UtteranceCutter(16_000, pre_roll=0.3)
    quiet = np.zeros(16_000, dtype=np.int16)
    assert feed(cutter, quiet) == [] and not cutter.in_utterance
    assert cutter.cut() is None
    cuts: list[bytes] = []
    assert feed(cutter, np.concatenate([quiet, tone(1.0), quiet]), cuts) == [Voice.START, Voice.STOP]
    utterance = np.frombuffer(cuts[0], dtype=np.int16)
    sound = np.flatnonzero(utterance)
    # The VAD notices the tone in its fifth 20 ms chunk; the pre-roll reaches 0.3 s back
    # from that chunk.
    assert sound[0] == round((0.3 - 4 * 0.02) * 16_000) + 1  # (a sine starts at 0)
    assert sound[-1] - sound[0] < 16_000
    assert len(utterance) - sound[-1] - 1 >= round(0.6 * 16_000) - 320  # the quiet that ended it
    assert not cutter.in_utterance and cutter.cut() is None


def test_cutter_caps_an_utterance_and_goes_on_with_the_next() -> None:
    cutter = UtteranceCutter(16_000, pre_roll=0.2, max_duration=2.0)
    cuts: list[bytes] = []
    assert feed(cutter, tone(3.0), cuts) == [Voice.START, Voice.STOP, Voice.START]
    assert len(cuts[0]) // 2 == 2 * 16_000
    assert cutter.in_utterance


def test_cutter_ends_an_utterance_early_or_on_missing_audio() -> None:
    cutter = UtteranceCutter(16_000)
    assert cutter.gap(1.0) is None  # no utterance: nothing to end
    assert feed(cutter, tone(0.5)) == [Voice.START]
    assert cutter.gap(0.25) is None and cutter.gap(0.25) is None
    assert cutter.gap(0.25) is Voice.STOP
    pcm = cutter.cut()
    assert pcm is not None and len(pcm) // 2 == 8000
    assert feed(cutter, tone(0.5)) == [Voice.START]
    pcm = cutter.cut()  # listening turned off mid-sentence
    assert pcm is not None and len(pcm) // 2 == 8000
    assert not cutter.in_utterance and cutter.cut() is None
