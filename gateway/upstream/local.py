"""The embedded local avatar as an upstream: rendered face + eSpeak NG speech, no network.

Audio and video share one media clock. Every utterance is placed on that clock *before* it
plays (``start`` in samples), so the audio clock and the video clock each look up "what is
being said at media time t" independently and agree exactly: lip sync is by construction,
not by racing two tasks. Events fire from the audio clock, when the sound is actually emitted.

Listening (voice chat) is offline too: a controller's microphone is resampled to 16 kHz mono,
cut into utterances by an energy VAD, and each utterance is transcribed by PocketSphinx in a
child process (it holds the GIL while it decodes). See :meth:`LocalUpstream.set_listening`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fractions
import logging
import uuid
from collections import deque
from dataclasses import dataclass, field

import av
import numpy as np
import numpy.typing as npt

from ..avatar import REST, FaceRenderer, LipSync, MouthPose, SpeechSynthesizer, Utterance
from ..avatar.looks import DEFAULT_LOOK
from ..avatar.stt import RecognizerError, RecognizerProcess, SpeechRecognizer
from ..config import QualityTier
from ..errors import BadRequest, Conflict, Unprocessable, UpstreamUnavailable
from ..media.vad import UtteranceCutter, Voice
from .base import AvatarEvent, EventType, MediaSink, SpeakResult, TaskType, Upstream

logger = logging.getLogger(__name__)

SAMPLE_RATE = 48_000
AUDIO_FRAME = 960  # 20 ms
VIDEO_CLOCK = 90_000
_FADE = np.linspace(1.0, 0.0, 240, dtype=np.float32)  # 5 ms, so an interrupt doesn't click
MIC_GAP = 0.25
"""During an utterance, after this long without a microphone frame (DTX, a muted or gone
track) the VAD is told that much silence passed, so the utterance still ends."""
MAX_RECOGNITIONS = 2
"""Utterances handed to the recognizer and not yet transcribed: one running, one waiting."""


@dataclass(slots=True)
class _Scheduled:
    task_id: str
    utterance: Utterance
    lipsync: LipSync
    start: int
    """First sample, on the media clock."""
    end: int
    chunks: tuple[str, ...] = ()
    """Per word, the text to announce when it starts: input text up to the next word, so the
    chunks concatenate back to exactly what was asked (punctuation included)."""
    next_word: int = 0
    started: bool = False
    spoken: list[str] = field(default_factory=list)


class LocalUpstream(Upstream):
    """The embedded avatar: speaks with eSpeak NG, renders its face, listens with PocketSphinx.

    :param echo_tail: seconds after the avatar's speech during which the microphone is still
        ignored (its voice comes back through the user's speakers, late by the playout and
        network delay).
    :param max_utterance: longest utterance given to the recognizer, in seconds; longer
        speech is cut into several.
    """

    kind = "local"
    listens = True

    def __init__(
        self,
        quality: QualityTier,
        synthesizer: SpeechSynthesizer,
        *,
        fps: int = 30,
        max_text_chars: int = 5000,
        start_lead: float = 0.06,
        look: str = DEFAULT_LOOK,
        echo_tail: float = 0.5,
        max_utterance: float = 15.0,
    ) -> None:
        self._quality = quality
        self._look = look
        self._synthesizer = synthesizer
        self._fps = fps
        self._max_text_chars = max_text_chars
        self._lead = int(start_lead * SAMPLE_RATE)
        self._sink: MediaSink | None = None
        self._renderer: FaceRenderer | None = None
        self._schedule: deque[_Scheduled] = deque()
        self._samples_played = 0
        self._tasks: list[asyncio.Task[None]] = []
        # Rendering and TTS each get one thread: TTS must not delay a frame, nor a frame a word.
        self._render_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="render")
        self._tts_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tts")
        self._stopped = False
        self._recognizer = RecognizerProcess()
        self._recognizer_ready = False
        self._recognitions: set[asyncio.Task[None]] = set()
        self._listening = False
        self._wants_listening = False
        self._max_utterance = max_utterance
        self._echo_tail = int(echo_tail * SAMPLE_RATE)
        self._deaf_until = 0
        """Media-clock sample until which the microphone is ignored (the avatar's echo)."""
        self._cutter: UtteranceCutter | None = None
        self._resampler: av.AudioResampler | None = None
        self._utterance_id = ""
        self._mic_heard = 0.0
        self._mic_watchdog: asyncio.TimerHandle | None = None

    @property
    def video_size(self) -> tuple[int, int]:
        return self._quality.width, self._quality.height

    @property
    def renderer(self) -> FaceRenderer | None:
        """The face renderer once started (tests read its ``mouth_box``)."""
        return self._renderer

    async def start(self, sink: MediaSink) -> None:
        loop = asyncio.get_running_loop()
        self._renderer = await loop.run_in_executor(
            self._render_pool, FaceRenderer, self._quality.width, self._quality.height, self._look
        )
        self._sink = sink
        origin = loop.time()
        self._tasks = [
            loop.create_task(self._audio_clock(origin), name="local-avatar-audio"),
            loop.create_task(self._video_clock(origin), name="local-avatar-video"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._clock_ended)

    def _clock_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._stopped:
            return
        exc = task.exception()
        logger.error("local avatar clock %s failed", task.get_name(), exc_info=exc)
        if self._sink is not None:
            self._sink.on_upstream_ended(f"local avatar failed: {exc!r}")

    async def speak(self, text: str, task_type: TaskType = TaskType.REPEAT) -> SpeakResult:
        if task_type is not TaskType.REPEAT:
            raise Unprocessable(
                "the local avatar has no language model: use task_type 'repeat'"
            )
        text = text.strip()
        if not text:
            raise BadRequest("text is empty")
        if len(text) > self._max_text_chars:
            raise BadRequest(f"text is longer than {self._max_text_chars} characters")
        loop = asyncio.get_running_loop()
        utterance, lipsync = await loop.run_in_executor(self._tts_pool, self._prepare, text)
        task_id = uuid.uuid4().hex
        # Queue behind whatever is already scheduled, never in the past.
        start = self._samples_played + self._lead
        if self._schedule:
            start = max(start, self._schedule[-1].end)
        end = start + len(utterance.pcm)
        chunks = _word_chunks(text, [w.text for w in utterance.words])
        self._schedule.append(_Scheduled(task_id, utterance, lipsync, start, end, chunks))
        return SpeakResult(task_id=task_id, duration_ms=round(utterance.duration * 1000.0, 1))

    def _prepare(self, text: str) -> tuple[Utterance, LipSync]:
        utterance = self._synthesizer.synthesize(text)
        return utterance, LipSync(utterance)

    async def interrupt(self) -> None:
        now = self._samples_played
        kept: deque[_Scheduled] = deque()
        for item in self._schedule:
            if item.started:
                # Cut at the next frame: the audio clock fades the last 5 ms and ends the task.
                item.end = min(item.end, now + len(_FADE))
                kept.append(item)
        self._schedule = kept

    async def stop(self) -> None:
        """Stop the clocks and the recognizer (utterances not yet transcribed are lost)."""
        if self._stopped:
            return
        self._stopped = True
        self._stop_listening(emit=False)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._render_pool.shutdown(wait=False)
        self._tts_pool.shutdown(wait=False)
        for recognition in self._recognitions:
            recognition.cancel()
        await asyncio.gather(*self._recognitions, return_exceptions=True)
        await self._recognizer.close()
        self._schedule.clear()

    # -- listening ---------------------------------------------------------------------------

    async def set_listening(self, listening: bool) -> None:
        """Listen to the microphone (:meth:`push_microphone`) for voice chat, or stop.

        While listening, every utterance becomes ``user_start`` when the speaker starts and
        ``user_stop`` when they stop, then, once transcribed and if any word was recognized,
        ``user_talking_message`` and ``user_end_message`` with the text as ``message``. All four
        carry the same ``task_id``. An utterance also ends when listening is turned off
        (push-to-talk), when the avatar starts speaking, or after ``max_utterance`` seconds.

        The microphone is ignored while the avatar speaks and ``echo_tail`` seconds after:
        the user's speakers play the avatar into the microphone, and the avatar must not
        answer itself. So there is no barge-in (interrupting the avatar by voice); a
        controller interrupts with :meth:`interrupt`.

        The recognizer (a child process, see :class:`~gateway.avatar.stt.RecognizerProcess`)
        starts at the first call that turns listening on (about 0.3 s) and runs until
        :meth:`stop`.

        :raises ~gateway.errors.UpstreamUnavailable: the recognizer could not start (503).
        """
        if self._stopped or self._sink is None:
            raise Conflict("the local avatar is not running")
        self._wants_listening = listening
        if not listening:
            self._stop_listening(emit=True)
            return
        if not self._recognizer_ready:
            try:
                await self._recognizer.start()
            except RecognizerError as exc:
                raise UpstreamUnavailable(f"the local avatar cannot listen: {exc}") from None
            self._recognizer_ready = True
        if self._wants_listening and not self._listening and not self._stopped:
            self._listening = True
            self._cutter = UtteranceCutter(SpeechRecognizer.sample_rate, max_duration=self._max_utterance)

    def _stop_listening(self, *, emit: bool) -> None:
        if emit:
            self._end_utterance()
        elif self._mic_watchdog is not None:
            self._mic_watchdog.cancel()
            self._mic_watchdog = None
        self._listening = False
        self._cutter = None
        self._resampler = None

    async def push_microphone(self, frame: av.AudioFrame) -> None:
        """Hear one frame of the controller's microphone (any rate, layout or sample format;
        aiortc gives 20 ms of 48 kHz s16 stereo). Cheap when not listening."""
        if not self._listening:
            return
        if self._schedule or self._samples_played < self._deaf_until:
            if self._resampler is not None:  # the first frame the avatar drowns out
                self._end_utterance()
                self._resampler = None
            return
        cutter = self._cutter
        assert cutter is not None
        self._mic_heard = asyncio.get_running_loop().time()
        for samples in self._resample(frame):
            change = cutter.push(samples)
            if change is Voice.START:
                self._utterance_id = uuid.uuid4().hex
                self._emit(EventType.USER_START, self._utterance_id)
                self._mic_watchdog = asyncio.get_running_loop().call_later(MIC_GAP, self._check_microphone)
            elif change is Voice.STOP:
                self._end_utterance()

    def _resample(self, frame: av.AudioFrame) -> list[npt.NDArray[np.int16]]:
        if self._resampler is None:
            self._resampler = av.AudioResampler("s16", "mono", SpeechRecognizer.sample_rate)
        try:
            frames = self._resampler.resample(frame)
        except ValueError:
            # The sender changed rate or channel count (a renegotiation): start over.
            self._resampler = av.AudioResampler("s16", "mono", SpeechRecognizer.sample_rate)
            frames = self._resampler.resample(frame)
        return [f.to_ndarray().astype(np.int16, copy=False).reshape(-1) for f in frames]

    def _check_microphone(self) -> None:
        """Every ``MIC_GAP`` while an utterance lasts: count missing frames as silence."""
        loop = asyncio.get_running_loop()
        self._mic_watchdog = None
        silent = loop.time() - self._mic_heard
        if silent >= MIC_GAP and self._cutter is not None:
            self._mic_heard = loop.time()
            if self._cutter.gap(silent) is Voice.STOP:
                self._end_utterance()
                return
        self._mic_watchdog = loop.call_later(MIC_GAP, self._check_microphone)

    def _end_utterance(self) -> None:
        """Close the utterance in progress, if any: ``user_stop`` now, the words when heard."""
        if self._mic_watchdog is not None:
            self._mic_watchdog.cancel()
            self._mic_watchdog = None
        pcm = self._cutter.cut() if self._cutter is not None else None
        if pcm is None:
            return
        utterance_id = self._utterance_id
        self._emit(EventType.USER_STOP, utterance_id)
        if len(self._recognitions) >= MAX_RECOGNITIONS:
            logger.warning("local avatar: speech recognition is behind; utterance %s is not "
                           "transcribed", utterance_id)
            return
        recognition = asyncio.get_running_loop().create_task(
            self._recognize(utterance_id, pcm), name="local-avatar-stt")
        self._recognitions.add(recognition)
        recognition.add_done_callback(self._recognized)

    async def _recognize(self, utterance_id: str, pcm: bytes) -> None:
        text = await self._recognizer.transcribe(pcm)
        if text and not self._stopped:
            self._emit(EventType.USER_TALKING_MESSAGE, utterance_id, message=text)
            self._emit(EventType.USER_END_MESSAGE, utterance_id, message=text)

    def _recognized(self, recognition: asyncio.Task[None]) -> None:
        self._recognitions.discard(recognition)
        if not recognition.cancelled() and recognition.exception() is not None:
            # One utterance is lost; the conversation goes on.
            logger.error("local avatar: speech recognition failed", exc_info=recognition.exception())

    # -- clocks ------------------------------------------------------------------------------

    async def _audio_clock(self, origin: float) -> None:
        loop = asyncio.get_running_loop()
        assert self._sink is not None
        time_base = fractions.Fraction(1, SAMPLE_RATE)
        while True:
            due = origin + (self._samples_played + AUDIO_FRAME) / SAMPLE_RATE
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            pcm = self._mix(self._samples_played, AUDIO_FRAME)
            frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            frame.pts = self._samples_played
            frame.time_base = time_base
            self._samples_played += AUDIO_FRAME
            self._sink.on_audio_frame(frame)

    def _mix(self, position: int, count: int) -> np.ndarray:
        """Samples [position, position+count) of the schedule; fires events as they play."""
        out = np.zeros(count, dtype=np.int16)
        stop = position + count
        while self._schedule and self._schedule[0].start < stop:
            item = self._schedule[0]
            if not item.started:
                item.started = True
                self._emit(EventType.AVATAR_START_TALKING, item.task_id)
            lo, hi = max(position, item.start), min(stop, item.end)
            if hi > lo:
                chunk = item.utterance.pcm[lo - item.start : hi - item.start]
                if hi == item.end and item.end < item.start + len(item.utterance.pcm):
                    fade = _FADE[-len(chunk):] if len(chunk) < len(_FADE) else _FADE
                    chunk = chunk.copy()
                    chunk[-len(fade):] = (chunk[-len(fade):] * fade).astype(np.int16)
                out[lo - position : hi - position] = chunk
            self._emit_words(item, (hi - item.start) / SAMPLE_RATE)
            if item.end > stop:
                break
            self._schedule.popleft()
            self._finish(item)
        return out

    def _emit_words(self, item: _Scheduled, until: float) -> None:
        words = item.utterance.words
        while item.next_word < len(words) and words[item.next_word].start <= until:
            chunk = item.chunks[item.next_word]
            item.next_word += 1
            item.spoken.append(chunk)
            self._emit(EventType.AVATAR_TALKING_MESSAGE, item.task_id, message=chunk)

    def _finish(self, item: _Scheduled) -> None:
        self._deaf_until = item.end + self._echo_tail
        duration_ms = round((item.end - item.start) * 1000 / SAMPLE_RATE, 1)
        self._emit(EventType.AVATAR_END_MESSAGE, item.task_id, message="".join(item.spoken))
        self._emit(EventType.AVATAR_STOP_TALKING, item.task_id, duration_ms=duration_ms)

    def _emit(self, type_: EventType, task_id: str, **data: object) -> None:
        assert self._sink is not None
        self._sink.on_event(AvatarEvent(type_, task_id, data))

    async def _video_clock(self, origin: float) -> None:
        loop = asyncio.get_running_loop()
        assert self._sink is not None and self._renderer is not None
        renderer, sink = self._renderer, self._sink
        time_base = fractions.Fraction(1, VIDEO_CLOCK)
        index = 0
        while True:
            due = origin + index / self._fps
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.5:
                # Fell far behind (suspended loop): skip ahead rather than burst old frames.
                index = int((loop.time() - origin) * self._fps)
                continue
            t = index / self._fps
            if sink.video_wanted:
                pose = self._pose_at(t)
                frame = await loop.run_in_executor(self._render_pool, renderer.render, t, pose)
                frame.pts = index * VIDEO_CLOCK // self._fps
                frame.time_base = time_base
                sink.on_video_frame(frame)
            index += 1

    def _pose_at(self, t: float) -> MouthPose:
        sample = int(t * SAMPLE_RATE)
        for item in self._schedule:
            if item.start <= sample < item.end:
                return item.lipsync.pose_at((sample - item.start) / SAMPLE_RATE)
            if item.start > sample:
                break
        return REST


def _word_chunks(text: str, words: list[str]) -> tuple[str, ...]:
    """Split ``text`` at the words' positions: chunk i runs from word i to word i+1."""
    starts: list[int] = []
    cursor = 0
    for word in words:
        found = text.find(word, cursor) if word else -1
        position = found if found >= 0 else cursor
        starts.append(position)
        cursor = position + len(word) if found >= 0 else cursor
    if not starts:
        return ()
    starts[0] = 0
    bounds = [*starts[1:], len(text)]
    return tuple(text[a:b] for a, b in zip(starts, bounds, strict=True))
