"""The embedded local avatar as an upstream: rendered face + eSpeak NG speech, no network.

Audio and video share one media clock. Every utterance is placed on that clock *before* it
plays (``start`` in samples), so the audio clock and the video clock each look up "what is
being said at media time t" independently and agree exactly: lip sync is by construction,
not by racing two tasks. Events fire from the audio clock, when the sound is actually emitted.

Audio from elsewhere (:meth:`LocalUpstream.speak_audio`: LiveAvatar LITE, where the client
brings its own TTS) is resampled to 48 kHz and lip-synced from its own envelope. It may come
as a stream of chunks: each chunk is placed right after the previous one on the media clock,
so a stream that keeps ahead of playback plays without a gap, and one that falls behind
(underrun) holds silence without ending its task until :meth:`LocalUpstream.end_audio`.

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
from ..avatar.lipsync import speech_level
from ..avatar.looks import DEFAULT_LOOK, LOOKS
from ..avatar.stt import RecognizerError, RecognizerProcess, SpeechRecognizer
from ..avatar.tts import Word, word_chunks
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
MAX_AUDIO_SECONDS = 600.0
"""Longest audio one :meth:`LocalUpstream.speak_audio` call may bring (it is held in memory)."""


@dataclass(slots=True)
class _Part:
    """A stretch of an utterance's audio: the whole of a text utterance, or one chunk of a
    stream."""

    start: int
    """First sample, on the media clock."""
    pcm: npt.NDArray[np.int16]
    lipsync: LipSync

    @property
    def end(self) -> int:
        return self.start + len(self.pcm)


@dataclass(slots=True)
class _Scheduled:
    task_id: str
    parts: list[_Part]
    start: int
    """First sample, on the media clock."""
    end: int
    """Sample after the last one played (moved earlier by an interrupt)."""
    words: tuple[Word, ...] = ()
    chunks: tuple[str, ...] = ()
    """Per word, the text to announce when it starts: input text up to the next word, so the
    chunks concatenate back to exactly what was asked (punctuation included)."""
    next_word: int = 0
    started: bool = False
    spoken: list[str] = field(default_factory=list)
    open: bool = False
    """A stream that may still grow: it does not end at ``end`` until it is closed."""
    cut: bool = False
    """Interrupted: ``end`` moved before the audio's end, which fades out."""
    resampler: av.AudioResampler | None = None
    reference: float = 0.0
    """Running loud-speech level of a stream (see :func:`~gateway.avatar.lipsync.speech_level`)."""


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
        self.avatar_name = LOOKS[look].title if look in LOOKS else None
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
        self._close_streams()
        start = self._next_start()
        end = start + len(utterance.pcm)
        chunks = word_chunks(text, [w.text for w in utterance.words])
        self._schedule.append(_Scheduled(task_id, [_Part(start, utterance.pcm, lipsync)], start,
                                         end, utterance.words, chunks))
        return SpeakResult(task_id=task_id, duration_ms=round(utterance.duration * 1000.0, 1))

    def _next_start(self) -> int:
        """Behind whatever is already scheduled, never in the past."""
        start = self._samples_played + self._lead
        if self._schedule:
            start = max(start, self._schedule[-1].end)
        return start

    def _close_streams(self) -> None:
        # Something else queues behind an open stream: the stream cannot grow any more
        # without overlapping it, so it ends where its audio ends.
        for item in self._schedule:
            item.open = False

    async def speak_audio(self, pcm: bytes, sample_rate: int, *, task_id: str | None = None,
                          final: bool = True) -> SpeakResult:
        """Lip-sync and play 16-bit mono PCM at ``sample_rate`` (any rate; resampled to 48 kHz).

        Without ``task_id``, a new utterance (a new task) is queued; with ``final=False`` it is
        a stream that stays open for more chunks. With the ``task_id`` of an open stream,
        ``pcm`` is appended to it, right after its previous chunk (or, after an underrun, as
        soon as possible). The task's events are the text utterance's: ``avatar_start_talking``
        when its first sample plays, ``avatar_stop_talking`` after the last one of a closed
        stream (:meth:`end_audio`, or ``final=True``); no word events (there is no text).

        :raises ~gateway.errors.BadRequest: odd byte count, empty, too long, bad rate.
        :raises ~gateway.errors.Conflict: ``task_id`` names no open stream (it ended or was
            interrupted).
        """
        if not 8000 <= sample_rate <= 192_000:
            raise BadRequest(f"sample_rate must be 8000..192000 Hz, got {sample_rate}")
        if len(pcm) % 2:
            raise BadRequest("16-bit PCM needs an even number of bytes")
        if not pcm:
            raise BadRequest("the audio is empty")
        if len(pcm) / 2 / sample_rate > MAX_AUDIO_SECONDS:
            raise BadRequest(f"the audio is longer than {MAX_AUDIO_SECONDS:g} s")
        if self._stopped or self._sink is None:
            raise Conflict("the local avatar is not running")
        item = self._open_stream(task_id) if task_id is not None else None
        resampler = item.resampler if item is not None else None
        if resampler is None:
            resampler = av.AudioResampler("s16", "mono", SAMPLE_RATE)
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.int16, copy=False)
        loop = asyncio.get_running_loop()
        reference = item.reference if item is not None else 0.0
        audio, reference, lipsync = await loop.run_in_executor(
            self._tts_pool, _prepare_audio, resampler, samples, sample_rate, reference, final,
            item is None)
        if task_id is not None:
            item = self._open_stream(task_id)  # it may have been interrupted meanwhile
        if item is None:
            task_id = uuid.uuid4().hex
            self._close_streams()
            start = self._next_start()
            item = _Scheduled(task_id, [], start, start, open=not final, resampler=resampler)
            self._schedule.append(item)
        start = max(item.end, self._samples_played + self._lead)
        if len(audio):
            item.parts.append(_Part(start, audio, lipsync))
            item.end = start + len(audio)
        item.reference = reference
        if final:
            item.open = False
            item.resampler = None
        assert task_id is not None
        duration = (item.end - item.start) / SAMPLE_RATE
        return SpeakResult(task_id=task_id, duration_ms=round(duration * 1000.0, 1))

    async def end_audio(self, task_id: str) -> None:
        """Close the stream ``task_id``: it ends after the audio it has. A no-op for a task
        that already ended or was interrupted."""
        item = self._stream(task_id)
        if item is None:
            return
        resampler, item.resampler = item.resampler, None
        item.open = False
        if resampler is None:
            return
        # The resampler holds back a few samples (its filter delay): flush them.
        tail = _flush(resampler)
        if len(tail):
            start = max(item.end, self._samples_played + self._lead)
            lipsync = LipSync(Utterance("", tail), reference=item.reference, edge_fade=False)
            item.parts.append(_Part(start, tail, lipsync))
            item.end = start + len(tail)

    def _open_stream(self, task_id: str) -> _Scheduled:
        item = self._stream(task_id)
        if item is None:
            raise Conflict(f"task {task_id} is not an open audio stream (it ended or was "
                           f"interrupted)")
        return item

    def _stream(self, task_id: str) -> _Scheduled | None:
        for item in self._schedule:
            if item.task_id == task_id and item.open:
                return item
        return None

    def _prepare(self, text: str) -> tuple[Utterance, LipSync]:
        utterance = self._synthesizer.synthesize(text)
        return utterance, LipSync(utterance)

    async def interrupt(self) -> None:
        now = self._samples_played
        kept: deque[_Scheduled] = deque()
        for item in self._schedule:
            if item.started:
                # Cut at the next frame: the audio clock fades the last 5 ms and ends the task.
                if now + len(_FADE) < item.end:
                    item.end = now + len(_FADE)
                    item.cut = True
                item.open = False
                item.resampler = None
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
            for part in item.parts:
                a, b = max(lo, part.start), min(hi, part.end)
                if b > a:
                    out[a - position : b - position] = part.pcm[a - part.start : b - part.start]
            if item.cut and hi > lo:
                # The 5 ms before a cut fade out (they may straddle two frames).
                a = max(lo, item.end - len(_FADE))
                if hi > a:
                    fade = _FADE[a - (item.end - len(_FADE)) : hi - (item.end - len(_FADE))]
                    out[a - position : hi - position] = (
                        out[a - position : hi - position] * fade).astype(np.int16)
            self._emit_words(item, (hi - item.start) / SAMPLE_RATE)
            if item.end > stop or item.open:
                break  # still playing, or a stream waiting for more audio
            self._schedule.popleft()
            self._finish(item)
        return out

    def _emit_words(self, item: _Scheduled, until: float) -> None:
        words = item.words
        while item.next_word < len(words) and words[item.next_word].start <= until:
            chunk = item.chunks[item.next_word]
            item.next_word += 1
            item.spoken.append(chunk)
            self._emit(EventType.AVATAR_TALKING_MESSAGE, item.task_id, message=chunk)

    def _finish(self, item: _Scheduled) -> None:
        self._deaf_until = item.end + self._echo_tail
        duration_ms = round((item.end - item.start) * 1000 / SAMPLE_RATE, 1)
        if item.words:  # audio from elsewhere has no text to report
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
                for part in item.parts:
                    if part.start <= sample < part.end:
                        return part.lipsync.pose_at((sample - part.start) / SAMPLE_RATE)
                return REST  # a stream's underrun: silence, mouth at rest
            if item.start > sample:
                break
        return REST


def _prepare_audio(resampler: av.AudioResampler, samples: npt.NDArray[np.int16], rate: int,
                   reference: float, final: bool,
                   first: bool) -> tuple[npt.NDArray[np.int16], float, LipSync]:
    """On the TTS thread: resample one chunk to 48 kHz and compute its lip sync."""
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate
    pieces = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    if final:
        pieces.append(_flush(resampler))
    audio = (np.concatenate(pieces).astype(np.int16, copy=False) if pieces
             else np.zeros(0, dtype=np.int16))
    reference = max(reference, speech_level(audio, SAMPLE_RATE))
    # A whole utterance fades in and out at its edges; a stream's chunks join seamlessly.
    lipsync = LipSync(Utterance("", audio), reference=reference, edge_fade=first and final)
    return audio, reference, lipsync


def _flush(resampler: av.AudioResampler) -> npt.NDArray[np.int16]:
    frames = resampler.resample(None)
    if not frames:
        return np.zeros(0, dtype=np.int16)
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.int16, copy=False)
