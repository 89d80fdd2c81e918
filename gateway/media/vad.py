"""Voice activity detection from loudness: one small energy VAD for every listener.

The simulator's LiveKit room uses it to raise ``user_start`` / ``user_stop`` for a client's
microphone; the local avatar uses it to cut a controller's microphone into utterances for
speech recognition.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from typing import Any

import av
import numpy as np
import numpy.typing as npt


class Voice(enum.StrEnum):
    START = "user_start"
    STOP = "user_stop"


class EnergyVad:
    """Voice activity from loudness alone, with hysteresis in level and in time.

    Speech starts after ``start_after`` seconds of audio at or above ``threshold`` (RMS of
    int16 samples), and stops after ``stop_after`` seconds without any frame at or above half
    the threshold. Time is counted in audio seconds fed to :meth:`update`; a caller that
    receives no packets (the sender's DTX stops sending during silence) feeds the gap as silence.
    """

    def __init__(self, threshold: float = 500.0, start_after: float = 0.1, stop_after: float = 0.6) -> None:
        self.threshold = threshold
        self.start_after = start_after
        self.stop_after = stop_after
        self.speaking = False
        self._loud = 0.0
        self._quiet = 0.0

    def update(self, rms: float, duration: float) -> Voice | None:
        """Feed ``duration`` seconds of audio with loudness ``rms``; returns a transition."""
        level = self.threshold / 2 if self.speaking else self.threshold
        # A small tolerance so 5 x 20 ms frames make 100 ms despite float rounding.
        if rms >= level:
            self._loud += duration
            self._quiet = 0.0
            if not self.speaking and self._loud >= self.start_after - 1e-6:
                self.speaking = True
                return Voice.START
        else:
            self._loud = 0.0
            self._quiet += duration
            if self.speaking and self._quiet >= self.stop_after - 1e-6:
                self.speaking = False
                return Voice.STOP
        return None


def pcm_level(frame: av.AudioFrame) -> tuple[float, int]:
    """(RMS, peak) of an s16 audio frame, in int16 units."""
    samples = frame.to_ndarray()
    if samples.size == 0:
        return 0.0, 0
    return _rms(samples), int(np.max(np.abs(samples.astype(np.int32))))


def _rms(samples: npt.NDArray[np.number[Any]]) -> float:
    wide = samples.astype(np.int32)
    return math.sqrt(float(np.mean(wide * wide)))


class UtteranceCutter:
    """Cuts a mono s16 stream into utterances with an :class:`EnergyVad`.

    :meth:`push` returns :attr:`Voice.START` when speech begins and :attr:`Voice.STOP` when
    it ends; then take the utterance's audio with :meth:`cut`. It begins
    ``pre_roll`` seconds before the VAD noticed speech (the VAD needs ``start_after`` seconds
    of loud audio, and soft onsets are quieter still) and ends with the VAD's trailing quiet.
    An utterance that reaches ``max_duration`` seconds ends there (STOP); speech that goes on
    starts a new one. Memory is bounded by ``max_duration``.
    """

    def __init__(self, sample_rate: int, *, pre_roll: float = 0.3, max_duration: float = 15.0) -> None:
        if not 0 <= pre_roll < max_duration:
            raise ValueError("pre_roll must be at least 0 and shorter than max_duration")
        self.sample_rate = sample_rate
        self._pre_roll = int(pre_roll * sample_rate)
        self._max = int(max_duration * sample_rate)
        self._vad = EnergyVad()
        self._chunks: deque[npt.NDArray[np.int16]] = deque()
        self._samples = 0
        self._open = False
        self._ended: bytes | None = None

    @property
    def in_utterance(self) -> bool:
        """Between a START and its STOP (or the :meth:`cut` that ends it early)."""
        return self._open

    def push(self, samples: npt.NDArray[np.int16]) -> Voice | None:
        """Feed the next mono samples; returns a transition."""
        if samples.size == 0:
            return None
        self._chunks.append(samples)
        self._samples += samples.size
        change = self._vad.update(_rms(samples), samples.size / self.sample_rate)
        if change is Voice.START:
            self._open = True
        elif self._open and (change is Voice.STOP or self._samples >= self._max):
            self._ended = self._take()
            return Voice.STOP
        elif not self._open:
            while self._chunks and self._samples - self._chunks[0].size >= self._pre_roll:
                self._samples -= self._chunks.popleft().size
        return change

    def gap(self, duration: float) -> Voice | None:
        """``duration`` seconds passed without audio (DTX, a muted or gone sender): silence."""
        change = self._vad.update(0.0, duration)
        if self._open and change is Voice.STOP:
            self._ended = self._take()
            return change
        return None

    def cut(self) -> bytes | None:
        """The audio (s16le) of the utterance that just ended, or of the one in progress,
        which then ends here; ``None`` if there is neither. Starts over in silence."""
        ended, self._ended = self._ended, None
        if ended is not None:
            return ended
        if self._open:
            return self._take()
        self._chunks.clear()
        self._samples = 0
        self._vad = EnergyVad()
        return None

    def _take(self) -> bytes:
        pcm = np.concatenate(self._chunks).tobytes()
        self._chunks.clear()
        self._samples = 0
        self._open = False
        self._vad = EnergyVad()
        return pcm
