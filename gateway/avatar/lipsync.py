"""Mouth poses (visemes) for an utterance, from its phoneme timeline and audio.

Everything is precomputed on a 5 ms grid at construction so ``pose_at`` is a
couple of array lookups. Smoothing is centred (zero phase) rather than a
causal filter: the whole utterance is known up front, and a causal filter
would make the lips trail the audio.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .tts import Utterance

logger = logging.getLogger(__name__)

__all__ = ["REST", "LipSync", "MouthPose", "speech_level", "viseme"]

_GRID_HZ = 200  # pose samples per second
_RMS_WINDOW_S = 0.020
# Co-articulation: neighbouring visemes blend over roughly +-2 sigma.
_SMOOTH_SIGMA_S = 0.014
# Lips reach a shape slightly before its sound starts (most visible on m/b/p).
ANTICIPATION_S = 0.015
_EDGE_FADE_S = 0.030
# Audio without a phoneme timeline (LiveAvatar LITE: a client's own TTS) opens the jaw this far
# at full loudness; the envelope does the rest.
_AUDIO_ONLY_OPEN = 0.8
# Quietest speech reference accepted: below it (about -40 dBFS) noise would open the mouth wide.
_MIN_REFERENCE = 0.01


@dataclass(frozen=True, slots=True)
class MouthPose:
    open: float  # 0 closed .. 1 wide open (jaw)
    width: float  # 0 narrow/rounded (o, u, w) .. 1 wide (ee, i); neutral 0.5


REST = MouthPose(open=0.0, width=0.5)

# (open, width) targets. Keys are espeak mnemonics with stress marks removed;
# lookups fall back to ever shorter prefixes, so "a#" -> "a", "t2" -> "t".
_VISEMES: dict[str, tuple[float, float]] = {
    # open vowels
    "a": (0.85, 0.62), "aa": (0.95, 0.58), "A": (0.95, 0.5), "A:": (0.95, 0.5),
    "V": (0.75, 0.55), "a2": (0.65, 0.55),
    # mid / central vowels
    "E": (0.6, 0.75), "e": (0.55, 0.78), "@": (0.45, 0.5), "3": (0.45, 0.45),
    "3:": (0.45, 0.4),
    # close front vowels: spread lips
    "I": (0.32, 0.92), "i": (0.28, 1.0), "i:": (0.28, 1.0), "y": (0.25, 0.1),
    # rounded vowels
    "0": (0.7, 0.22), "O": (0.7, 0.15), "O:": (0.7, 0.12), "o": (0.55, 0.1),
    "U": (0.3, 0.08), "u": (0.25, 0.0), "u:": (0.25, 0.0),
    # bilabials: lips pressed together
    "p": (0.0, 0.45), "b": (0.0, 0.45), "m": (0.0, 0.48),
    # labiodentals: lower lip tucked under the teeth
    "f": (0.08, 0.45), "v": (0.08, 0.45),
    # dentals and alveolars: teeth nearly together, relaxed lips
    "T": (0.18, 0.55), "D": (0.18, 0.55), "s": (0.15, 0.65), "z": (0.15, 0.65),
    "t": (0.22, 0.6), "d": (0.22, 0.6), "n": (0.22, 0.58), "l": (0.3, 0.55),
    "r": (0.25, 0.32), "r-": (0.25, 0.32),
    # postalveolars: lips pushed forward
    "S": (0.2, 0.22), "Z": (0.2, 0.22), "tS": (0.2, 0.22), "dZ": (0.2, 0.22),
    # velars, glottals, glides
    "k": (0.3, 0.55), "g": (0.3, 0.55), "N": (0.28, 0.55), "x": (0.3, 0.5),
    "h": (0.4, 0.5), "?": (0.15, 0.5), "j": (0.25, 0.85),
    "w": (0.12, 0.02), "W": (0.12, 0.02),
}
_DEFAULT_VISEME = (0.3, 0.5)

# Diphthongs move during the vowel: first half one shape, second half another.
_DIPHTHONGS: dict[str, tuple[str, str]] = {
    "aI": ("a", "I"), "aU": ("a", "U"), "eI": ("E", "I"), "oU": ("o", "U"),
    "OI": ("O", "I"), "i@": ("i", "@"), "e@": ("E", "@"), "U@": ("U", "@"),
    "A@": ("A", "@"), "O@": ("O", "@"), "o@": ("o", "@"), "aI@": ("a", "@"),
    "aU@": ("a", "@"), "I@": ("I", "@"), "eU": ("E", "U"),
}


def viseme(symbol: str) -> tuple[float, float] | None:
    """(open, width) target for an espeak mnemonic; None for a pause."""
    sym = symbol.lstrip("',%=")
    if not sym or sym.startswith("_"):
        return None
    for n in range(len(sym), 0, -1):
        hit = _VISEMES.get(sym[:n])
        if hit is not None:
            return hit
    return _DEFAULT_VISEME


def _gaussian_smooth(x: npt.NDArray[np.float64], sigma: float) -> npt.NDArray[np.float64]:
    if sigma <= 0 or x.size < 2:
        return x
    radius = max(1, int(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    padded = np.pad(x, radius, mode="edge")
    return np.asarray(np.convolve(padded, k, mode="valid"), dtype=np.float64)


def _rms_grid(pcm: npt.NDArray[np.int16], rate: int, n: int) -> npt.NDArray[np.float64]:
    """Windowed RMS (full scale 1.0) on the pose grid."""
    # Energy per 5 ms block, then a centred window of whole blocks: O(n) and
    # vectorised, because long utterances are hundreds of seconds of audio.
    hop = rate // _GRID_HZ
    blocks = -(-pcm.size // hop)
    x = np.zeros(blocks * hop, dtype=np.float32)
    x[: pcm.size] = pcm
    x *= 1.0 / 32768.0
    frames = x.reshape(blocks, hop)
    energy = np.einsum("ij,ij->i", frames, frames, dtype=np.float64)
    csum = np.concatenate(([0.0], np.cumsum(energy)))
    half = max(1, round(_RMS_WINDOW_S * _GRID_HZ / 2))
    idx = np.arange(n)
    lo = np.clip(idx - half, 0, blocks)
    hi = np.clip(idx + half, 0, blocks)
    return np.asarray(np.sqrt((csum[hi] - csum[lo]) / (np.maximum(hi - lo, 1) * hop)),
                      dtype=np.float64)


def _reference(rms: npt.NDArray[np.float64]) -> float:
    """Loud-speech level of a stretch of audio (0 for digital silence)."""
    peak = float(rms.max()) if rms.size else 0.0
    if peak <= 1e-4:
        return 0.0
    return float(np.percentile(rms[rms > 0.1 * peak], 85))


def speech_level(pcm: npt.NDArray[np.int16], rate: int) -> float:
    """The loud-speech level :class:`LipSync` scales a stretch of audio by; a stream of
    chunks passes the running maximum as ``reference`` so every chunk opens the mouth alike."""
    n = int(np.ceil(pcm.size / rate * _GRID_HZ)) + 1 if pcm.size else 0
    return _reference(_rms_grid(pcm, rate, n)) if n else 0.0


def _envelope(pcm: npt.NDArray[np.int16], rate: int, n: int,
              reference: float | None = None) -> npt.NDArray[np.float64]:
    """Loudness in 0..1 on the pose grid: windowed RMS, gated and compressed."""
    rms = _rms_grid(pcm, rate, n)
    if reference is None:
        # Reference = loud-speech level, so one quiet utterance still opens fully.
        ref = _reference(rms)
        if ref <= 0.0:  # digital silence
            return np.zeros(n)
    else:
        ref = max(reference, _MIN_REFERENCE)
    gate = 0.04 * ref
    level = np.clip((rms - gate) / max(ref - gate, 1e-6), 0.0, 1.0)
    # sqrt: softer sounds (unstressed vowels, nasals) should still visibly move.
    return np.asarray(np.sqrt(level), dtype=np.float64)


class LipSync:
    """Mouth poses for one utterance.

    Viseme targets from the phoneme timeline, scaled by the audio envelope so
    pauses close the mouth, smoothed with a centred kernel (co-articulation
    without lag). An utterance without phonemes (audio from elsewhere) moves the jaw
    with its envelope alone.

    :param reference: loud-speech level to scale by (see :func:`speech_level`); None: this
        utterance's own.
    :param edge_fade: fade the first and last 30 ms to rest; off for the chunks of a stream,
        whose neighbours continue the movement.
    """

    def __init__(self, utterance: Utterance, *, reference: float | None = None,
                 edge_fade: bool = True) -> None:
        self._duration = utterance.duration
        n = int(np.ceil(self._duration * _GRID_HZ)) + 1 if self._duration > 0 else 0
        self._n = n
        if n == 0:
            self._open = np.zeros(0)
            self._width = np.zeros(0)
            return
        times = np.arange(n) / _GRID_HZ
        target_open = np.zeros(n)
        target_width = np.full(n, REST.width)
        voiced = np.zeros(n)
        phs = utterance.phonemes
        if not phs:
            target_open[:] = _AUDIO_ONLY_OPEN
            voiced[:] = 1.0
        for i, ph in enumerate(phs):
            start = ph.start - ANTICIPATION_S
            end = (phs[i + 1].start if i + 1 < len(phs) else self._duration) - ANTICIPATION_S
            if end <= start:
                continue
            parts = _DIPHTHONGS.get(ph.symbol.lstrip("',"))
            segments = (
                [(start, (start + end) / 2, parts[0]), ((start + end) / 2, end, parts[1])]
                if parts
                else [(start, end, ph.symbol)]
            )
            for s0, s1, sym in segments:
                vis = viseme(sym)
                a = max(0, int(np.ceil(s0 * _GRID_HZ)))
                b = min(n, int(np.ceil(s1 * _GRID_HZ)))
                if vis is None or b <= a:
                    continue
                target_open[a:b] = vis[0]
                target_width[a:b] = vis[1]
                voiced[a:b] = 1.0
        sigma = _SMOOTH_SIGMA_S * _GRID_HZ
        env = _envelope(utterance.pcm, utterance.sample_rate, n, reference)
        open_ = _gaussian_smooth(target_open, sigma) * _gaussian_smooth(env, sigma * 0.5)
        # Width relaxes to neutral wherever the mouth is not speaking.
        activity = np.clip(_gaussian_smooth(voiced, sigma) * np.minimum(1.0, env * 3.0), 0, 1)
        width = REST.width + (_gaussian_smooth(target_width, sigma) - REST.width) * activity
        # Fade in/out so the first and last video frames meet REST without a jump.
        fade = (np.clip(np.minimum(times, self._duration - times) / _EDGE_FADE_S, 0.0, 1.0)
                if edge_fade else np.ones(n))
        self._open = np.clip(open_ * fade, 0.0, 1.0)
        self._width = np.clip(REST.width + (width - REST.width) * fade, 0.0, 1.0)

    @property
    def duration(self) -> float:
        return self._duration

    @property
    def open_track(self) -> npt.NDArray[np.float64]:
        """The precomputed `open` values at 200 Hz (read-only view)."""
        v = self._open.view()
        v.flags.writeable = False
        return v

    def pose_at(self, t: float) -> MouthPose:
        if not (0.0 <= t <= self._duration) or self._n == 0:
            return REST
        x = t * _GRID_HZ
        i = min(int(x), self._n - 1)
        j = min(i + 1, self._n - 1)
        f = x - i
        o = self._open[i] + (self._open[j] - self._open[i]) * f
        w = self._width[i] + (self._width[j] - self._width[i]) * f
        return MouthPose(open=float(o), width=float(w))
