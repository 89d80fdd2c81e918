"""HeyGen voice chat in the simulator: hear the user's microphone, find utterances, transcribe.

The real service listens whenever a voice chat sends it audio (no ``streaming.start_listening``
needed): ``@heygen/streaming-avatar`` sends the microphone over the chat socket (websocket
transport: 16 kHz mono s16le ``AudioRawFrame``s) or publishes it into the LiveKit room
(livekit transport), and gets ``user_start`` / ``user_stop`` from the socket and
``user_talking_message`` / ``user_end_message`` from LiveKit data.

The simulator has no recognizer of its own: it uses the local avatar's offline pieces, the
energy VAD's :class:`~gateway.media.vad.UtteranceCutter` and PocketSphinx in a child process
(:class:`~gateway.avatar.stt.RecognizerProcess`, one per simulator, shared by its sessions).
Each microphone (a room client, a chat socket) is cut separately; one session's
:class:`Listener` reports voice activity and words through two callbacks.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import av
import numpy as np
import numpy.typing as npt

from ..avatar.stt import RecognizerError, RecognizerProcess, SpeechRecognizer
from ..media.vad import UtteranceCutter, Voice

logger = logging.getLogger(__name__)

RATE = SpeechRecognizer.sample_rate
MIC_GAP = 0.25
"""During an utterance, after this long without audio (DTX, a muted or gone microphone) the
VAD is told that much silence passed, so the utterance still ends."""
MAX_RECOGNITIONS = 2
"""Utterances of one session handed to the recognizer and not yet transcribed."""
MAX_SOURCES = 8
"""Microphones one session follows at once (room clients and chat sockets)."""
IDLE_SOURCE = 30.0
"""A microphone silent this long (not mid-utterance) is forgotten when room is needed."""


@dataclass(slots=True)
class _Ear:
    """One microphone: its own cutter, resampler and utterance."""

    cutter: UtteranceCutter
    heard: float
    resampler: av.AudioResampler | None = None
    utterance: str = ""
    rate: tuple[int, int] = field(default=(0, 0))


class Listener:
    """Voice activity and transcripts for one session.

    :param recognizer: the simulator's shared recognizer.
    :param deaf: true while the avatar speaks: its own voice (played by the user's speakers)
        must not become a question, so the microphone is ignored then, and an utterance in
        progress ends when the avatar starts.
    :param on_voice: ``(utterance id, "user_start" | "user_stop")``.
    :param on_words: ``(utterance id, text)`` once an utterance is transcribed to some words.
    """

    def __init__(self, recognizer: RecognizerProcess, *, deaf: Callable[[], bool],
                 on_voice: Callable[[str, Voice], None], on_words: Callable[[str, str], None],
                 max_utterance: float = 15.0) -> None:
        self.enabled = True
        """False after ``streaming.stop_listening`` (until ``start_listening``)."""
        self._recognizer = recognizer
        self._deaf = deaf
        self._on_voice = on_voice
        self._on_words = on_words
        self._max_utterance = max_utterance
        self._ears: dict[str, _Ear] = {}
        self._recognitions: set[asyncio.Task[None]] = set()
        self._gap_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.utterances = 0
        """Utterances heard so far (the admin API shows it)."""

    # -- input ---------------------------------------------------------------------------------

    def hear_frame(self, source: str, frame: av.AudioFrame) -> None:
        """One decoded microphone frame (any rate, layout, sample format) from ``source``."""
        ear = self._ear(source)
        if ear is None:
            return
        if ear.resampler is None:
            ear.resampler = av.AudioResampler("s16", "mono", RATE)
        try:
            frames = ear.resampler.resample(frame)
        except ValueError:  # the sender changed its rate or layout: start over
            ear.resampler = av.AudioResampler("s16", "mono", RATE)
            frames = ear.resampler.resample(frame)
        for out in frames:
            self._push(source, ear, out.to_ndarray().astype(np.int16, copy=False).reshape(-1))

    def hear_pcm(self, source: str, pcm: bytes, sample_rate: int, channels: int) -> None:
        """Raw s16le interleaved PCM from ``source`` (the chat socket's ``AudioRawFrame``).

        :raises ValueError: ``pcm`` is not a whole number of frames of ``channels`` samples.
        """
        if len(pcm) % (2 * channels):
            raise ValueError(f"audio must hold whole {channels}-channel 16-bit frames")
        ear = self._ear(source)
        if ear is None or not pcm:
            return
        samples = np.frombuffer(pcm, dtype="<i2")
        if sample_rate == RATE and channels == 1:  # what the SDK sends: no resampling
            self._push(source, ear, samples.astype(np.int16))
            return
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1).astype(np.int16), format="s16",
                                           layout="mono" if channels == 1 else "stereo")
        frame.sample_rate = sample_rate
        if ear.rate != (sample_rate, channels):
            ear.rate, ear.resampler = (sample_rate, channels), None
        self.hear_frame(source, frame)

    def forget(self, source: str) -> None:
        """``source`` is gone (a socket closed): its utterance in progress ends now."""
        ear = self._ears.pop(source, None)
        if ear is not None:
            self._end(ear)

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled
        if not enabled:
            for ear in self._ears.values():
                self._end(ear)

    async def close(self) -> None:
        """Stop for good: no more events; transcriptions in progress are dropped."""
        self._closed = True
        if self._gap_timer is not None:
            self._gap_timer.cancel()
            self._gap_timer = None
        self._ears.clear()
        for task in self._recognitions:
            task.cancel()
        await asyncio.gather(*self._recognitions, return_exceptions=True)

    # -- the work -----------------------------------------------------------------------------

    def _ear(self, source: str) -> _Ear | None:
        if self._closed or not self.enabled:
            return None
        ear = self._ears.get(source)
        now = asyncio.get_running_loop().time()
        if ear is None:
            if len(self._ears) >= MAX_SOURCES:
                for name, other in list(self._ears.items()):
                    if not other.cutter.in_utterance and now - other.heard > IDLE_SOURCE:
                        del self._ears[name]
            if len(self._ears) >= MAX_SOURCES:
                return None
            ear = self._ears[source] = _Ear(
                UtteranceCutter(RATE, max_duration=self._max_utterance), heard=now)
        if self._deaf():
            self._end(ear)
            return None
        ear.heard = now
        return ear

    def _push(self, source: str, ear: _Ear, samples: npt.NDArray[np.int16]) -> None:
        change = ear.cutter.push(samples)
        if change is Voice.START:
            ear.utterance = uuid.uuid4().hex
            self.utterances += 1
            logger.debug("listener: %s starts utterance %s", source, ear.utterance)
            self._on_voice(ear.utterance, Voice.START)
            if self._gap_timer is None:
                self._gap_timer = asyncio.get_running_loop().call_later(MIC_GAP, self._check_gaps)
        elif change is Voice.STOP:
            self._end(ear)

    def _check_gaps(self) -> None:
        """Every ``MIC_GAP`` while any utterance lasts: missing audio counts as silence."""
        self._gap_timer = None
        now = asyncio.get_running_loop().time()
        talking = False
        for ear in list(self._ears.values()):
            if not ear.cutter.in_utterance:
                continue
            silent = now - ear.heard
            if silent >= MIC_GAP:
                ear.heard = now
                if ear.cutter.gap(silent) is Voice.STOP:
                    self._end(ear)
                    continue
            talking = True
        if talking and not self._closed:
            self._gap_timer = asyncio.get_running_loop().call_later(MIC_GAP, self._check_gaps)

    def _end(self, ear: _Ear) -> None:
        """Close ``ear``'s utterance, if any: ``user_stop`` now, the words once recognized."""
        pcm = ear.cutter.cut()
        if pcm is None or not ear.utterance:
            return
        utterance, ear.utterance = ear.utterance, ""
        self._on_voice(utterance, Voice.STOP)
        if len(self._recognitions) >= MAX_RECOGNITIONS:
            logger.warning("listener: speech recognition is behind; utterance %s is not "
                           "transcribed", utterance)
            return
        task = asyncio.get_running_loop().create_task(self._recognize(utterance, pcm),
                                                      name="sim-heygen-stt")
        self._recognitions.add(task)
        task.add_done_callback(self._recognized)

    async def _recognize(self, utterance: str, pcm: bytes) -> None:
        text = await self._recognizer.transcribe(pcm)
        logger.info("listener: utterance %s heard as %r", utterance, text)
        if text and not self._closed:
            self._on_words(utterance, text)

    def _recognized(self, task: asyncio.Task[None]) -> None:
        self._recognitions.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, RecognizerError):  # one utterance is lost; the chat goes on
            logger.error("listener: %s", error)
        elif error is not None:
            logger.error("listener: transcription failed", exc_info=error)
