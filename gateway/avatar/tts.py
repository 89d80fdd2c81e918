"""Text-to-speech with eSpeak NG (the ``espeakng-loader`` wheel), bound with ctypes.

eSpeak NG keeps its synthesis state in process globals, so the library is
initialised once per process and every call into it is serialised with
``_LOCK``. Synthesis runs in synchronous mode: ``espeak_Synth`` returns only
after the callback has received all audio and events, on the calling thread.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

import av
import espeakng_loader
import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

__all__ = [
    "OUTPUT_SAMPLE_RATE",
    "Phoneme",
    "SpeechSynthesizer",
    "TTSError",
    "Utterance",
    "Word",
    "available_voices",
]

OUTPUT_SAMPLE_RATE = 48000

# speak_lib.h (espeak-ng 1.52) constants.
_AUDIO_OUTPUT_SYNCHRONOUS = 0x02
_INITIALIZE_PHONEME_EVENTS = 0x0001
_INITIALIZE_DONT_EXIT = 0x8000  # without it a bad data path calls exit(1) in the library
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE = 1
_EE_OK = 0
_EV_LIST_TERMINATED = 0
_EV_WORD = 1
_EV_PHONEME = 7
# Milliseconds of audio per callback; larger means fewer Python round trips.
_BUFFER_MS = 500
_MIN_WPM = 80
_MAX_WPM = 450


class TTSError(RuntimeError):
    """The speech engine failed to load or to synthesise."""


@dataclass(frozen=True, slots=True)
class Phoneme:
    start: float  # seconds from utterance start
    symbol: str  # espeak mnemonic without stress marks; "_", "_:" are pauses


@dataclass(frozen=True, slots=True)
class Word:
    start: float  # seconds from utterance start
    text: str  # as written in the input text


def _empty_pcm() -> npt.NDArray[np.int16]:
    return np.zeros(0, dtype=np.int16)


@dataclass(frozen=True, slots=True)
class Utterance:
    text: str
    pcm: npt.NDArray[np.int16] = field(default_factory=_empty_pcm)
    phonemes: tuple[Phoneme, ...] = ()
    words: tuple[Word, ...] = ()
    sample_rate: int = OUTPUT_SAMPLE_RATE

    @property
    def duration(self) -> float:
        return float(self.pcm.shape[0]) / float(self.sample_rate)


class _EventId(ctypes.Union):
    _fields_ = [
        ("number", ctypes.c_int),
        ("name", ctypes.c_char_p),
        ("string", ctypes.c_char * 8),
    ]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


class _Voice(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        # Not c_char_p: the field is a run of NUL-separated entries that ctypes
        # would cut at the first NUL.
        ("languages", ctypes.c_void_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)

# (kind, sample index at the engine rate, text_position (1-based), length, phoneme)
_RawEvent = tuple[int, int, int, int, str]


class _Engine:
    """The process-wide library handle. Only touch it while holding ``_LOCK``."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL(espeakng_loader.get_library_path())
            data_dir = espeakng_loader.get_data_path()
        except (OSError, RuntimeError) as exc:
            raise TTSError(f"cannot load eSpeak NG: {exc}") from exc
        lib.espeak_Initialize.argtypes = [
            ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
        ]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_SetVoiceByProperties.argtypes = [ctypes.POINTER(_Voice)]
        lib.espeak_SetVoiceByProperties.restype = ctypes.c_int
        lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        # The path argument is the directory that *contains* espeak-ng-data.
        parent = os.path.dirname(data_dir).encode()
        rate = int(
            lib.espeak_Initialize(
                _AUDIO_OUTPUT_SYNCHRONOUS,
                _BUFFER_MS,
                parent,
                _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_DONT_EXIT,
            )
        )
        if rate <= 0:
            raise TTSError(f"espeak_Initialize failed ({rate})")
        self.lib = lib
        self.sample_rate = rate
        self._chunks: list[bytes] = []
        self._events: list[_RawEvent] = []
        self._failed = False
        # Keep a reference: ctypes frees the trampoline when the object dies.
        self._callback = _SynthCallback(self._on_synth)
        lib.espeak_SetSynthCallback(self._callback)
        self.current_voice: str | None = None
        self._languages: frozenset[str] | None = None
        logger.info("eSpeak NG initialised: %d Hz, data %s", rate, data_dir)

    def _on_synth(
        self,
        wav: ctypes._Pointer[ctypes.c_short],
        numsamples: int,
        events: ctypes._Pointer[_Event],
    ) -> int:
        # An exception escaping a ctypes callback is only printed, so trap it,
        # abort the synthesis and let synth() raise.
        try:
            if numsamples > 0 and ctypes.cast(wav, ctypes.c_void_p).value:
                self._chunks.append(ctypes.string_at(wav, numsamples * 2))
            if ctypes.cast(events, ctypes.c_void_p).value:
                i = 0
                while True:
                    ev = events[i]
                    if ev.type == _EV_LIST_TERMINATED:
                        break
                    if ev.type == _EV_PHONEME:
                        raw = bytes(ev.id.string).split(b"\0", 1)[0]
                        sym = raw.decode("utf-8", "replace")
                        self._events.append((_EV_PHONEME, ev.sample, ev.text_position, 0, sym))
                    elif ev.type == _EV_WORD:
                        self._events.append(
                            (_EV_WORD, ev.sample, ev.text_position, ev.length, "")
                        )
                    i += 1
        except Exception:
            logger.exception("eSpeak NG callback failed")
            self._failed = True
            return 1
        return 0

    def set_voice(self, voice: str) -> bool:
        if voice == self.current_voice:
            return True
        ok = int(self.lib.espeak_SetVoiceByName(voice.encode("utf-8"))) == _EE_OK
        if not ok and voice.lower() in self.languages():
            # SetVoiceByName knows file and voice names ("en-us" is a file, "en-gb"
            # only a language of the voice "en"); languages go through properties.
            # Only for listed languages: properties fall back to *some* voice.
            lang = ctypes.create_string_buffer(voice.lower().encode("utf-8"))
            spec = _Voice(name=None, languages=ctypes.cast(lang, ctypes.c_void_p).value)
            ok = int(self.lib.espeak_SetVoiceByProperties(ctypes.byref(spec))) == _EE_OK
        self.current_voice = voice if ok else None
        return ok

    def languages(self) -> frozenset[str]:
        if self._languages is None:
            self._languages = frozenset(self.list_voices())
        return self._languages

    def synth(self, text: str, wpm: int) -> tuple[bytes, list[_RawEvent]]:
        self.lib.espeak_SetParameter(_PARAM_RATE, wpm, 0)
        self._chunks, self._events, self._failed = [], [], False
        data = text.encode("utf-8")
        size = len(data) + 1
        rc = int(self.lib.espeak_Synth(data, size, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None))
        chunks, events = self._chunks, self._events
        self._chunks, self._events = [], []
        if rc != _EE_OK or self._failed:
            raise TTSError(f"espeak_Synth failed ({rc})")
        return b"".join(chunks), events

    def list_voices(self) -> list[str]:
        names: set[str] = set()
        voices = self.lib.espeak_ListVoices(None)
        i = 0
        while voices and voices[i]:
            v = voices[i].contents
            i += 1
            ident = (v.identifier or b"").decode("utf-8", "replace")
            if ident.startswith("mb/"):
                continue  # MBROLA voices need an external binary we do not ship
            # languages is a run of (priority byte, NUL-terminated name), ending in 0.
            if not v.languages:
                continue
            addr = int(v.languages)
            for _ in range(16):  # a voice lists a handful of languages at most
                if ctypes.c_ubyte.from_address(addr).value == 0:  # priority 0 ends it
                    break
                lang = ctypes.string_at(addr + 1)
                if lang:
                    names.add(lang.decode("utf-8", "replace"))
                addr += len(lang) + 2
        return sorted(names)


_LOCK = threading.Lock()
_ENGINE: _Engine | None = None
_VOICES_OK: set[str] = set()


def _engine() -> _Engine:
    """The shared engine; caller holds ``_LOCK``."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = _Engine()
    return _ENGINE


def available_voices() -> list[str]:
    """Language/voice names accepted by :class:`SpeechSynthesizer`, e.g. "en-us"."""
    with _LOCK:
        return _engine().list_voices()


def _resample(pcm: npt.NDArray[np.int16], rate: int) -> npt.NDArray[np.int16]:
    if rate == OUTPUT_SAMPLE_RATE or pcm.size == 0:
        return pcm.copy()
    # libswresample compensates its own filter delay, so sample n of the input
    # lands at n * 48000 / rate in the output and event timestamps stay valid.
    resampler = av.AudioResampler(format="s16", layout="mono", rate=OUTPUT_SAMPLE_RATE)
    frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate
    frame.pts = 0
    out = resampler.resample(frame) + resampler.resample(None)
    parts = [f.to_ndarray().reshape(-1).astype(np.int16, copy=False) for f in out]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)


def _is_word_char(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "LNM"


def _tokens(text: str) -> list[tuple[int, int]]:
    """Whitespace-separated [start, end) character spans."""
    spans: list[tuple[int, int]] = []
    start = -1
    for i, ch in enumerate(text):
        if ch.isspace():
            if start >= 0:
                spans.append((start, i))
                start = -1
        elif start < 0:
            start = i
    if start >= 0:
        spans.append((start, len(text)))
    return spans


def _strip_punct(s: str) -> str:
    b, e = 0, len(s)
    while b < e and not _is_word_char(s[b]):
        b += 1
    while e > b and not _is_word_char(s[e - 1]):
        e -= 1
    return s[b:e]


def _build_words(
    text: str, events: list[_RawEvent], phoneme_times: list[float], rate: int
) -> tuple[Word, ...]:
    """One Word per whitespace-separated input token that espeak spoke.

    espeak's WORD events do not map one-to-one onto written words: it reports
    several events inside one token for expansions ("123", "dog-friendly"),
    length 0 when a word starts with a quote, and none at all for words it
    merges ("I am"). So words are the input tokens (surrounding punctuation
    stripped), timed by the first WORD event whose text_position falls in the
    token; tokens without one are interpolated and snapped to a phoneme onset.
    """
    spans = _tokens(text)
    times: list[float | None] = [None] * len(spans)
    spoken = [False] * len(spans)
    k = 0
    for kind, sample, pos, _, _ in events:
        if kind != _EV_WORD:
            continue
        idx = max(0, pos - 1)
        # Events arrive in text order, so a forward scan is enough; restart if
        # espeak ever reports a position behind us.
        if k >= len(spans) or spans[k][0] > idx:
            k = 0
        while k < len(spans) and spans[k][1] <= idx:
            k += 1
        if k < len(spans):
            spoken[k] = True
            if times[k] is None:
                times[k] = sample / rate
    keep = [
        i for i, (b, e) in enumerate(spans) if spoken[i] or _strip_punct(text[b:e])
    ]
    if not any(times[i] is not None for i in keep):
        return ()
    words: list[Word] = []
    for n, i in enumerate(keep):
        b, e = spans[i]
        t = times[i]
        if t is None:
            t = _interpolate(n, keep, spans, times, phoneme_times)
        words.append(Word(start=t, text=_strip_punct(text[b:e]) or text[b:e]))
    # Interpolation and snapping must never reorder words.
    out: list[Word] = []
    for w in words:
        if out and w.start < out[-1].start:
            w = Word(out[-1].start, w.text)
        out.append(w)
    return tuple(out)


def _interpolate(
    n: int,
    keep: list[int],
    spans: list[tuple[int, int]],
    times: list[float | None],
    phoneme_times: list[float],
) -> float:
    prev = next((keep[j] for j in range(n - 1, -1, -1) if times[keep[j]] is not None), None)
    nxt = next((keep[j] for j in range(n + 1, len(keep)) if times[keep[j]] is not None), None)
    i = keep[n]
    if prev is None:
        assert nxt is not None
        return times[nxt] or 0.0
    t0 = times[prev] or 0.0
    if nxt is None:
        t1 = phoneme_times[-1] if phoneme_times else t0
        c0, c1 = spans[prev][0], spans[-1][1]
    else:
        t1 = times[nxt] or t0
        c0, c1 = spans[prev][0], spans[nxt][0]
    guess = t0 + (t1 - t0) * (spans[i][0] - c0) / max(1, c1 - c0)
    inside = [p for p in phoneme_times if t0 < p < t1]
    if inside:
        guess = min(inside, key=lambda p: abs(p - guess))
    return guess


class SpeechSynthesizer:
    """Speaks text with one eSpeak NG voice; instances share the engine safely."""

    def __init__(self, voice: str = "en-us", words_per_minute: int = 165) -> None:
        if not voice or not voice.strip():
            raise ValueError("voice must be a non-empty name")
        self._wpm = min(_MAX_WPM, max(_MIN_WPM, int(words_per_minute)))
        self._voice = voice.strip()
        # Remember good voices so constructing another synthesizer for one never
        # waits on the engine lock behind a long synthesis. (Only good ones: the
        # set of bad names callers can invent is unbounded.)
        if self._voice not in _VOICES_OK:
            with _LOCK:
                if not _engine().set_voice(self._voice):
                    raise ValueError(f"unknown eSpeak NG voice: {voice!r}")
                _VOICES_OK.add(self._voice)

    @property
    def voice(self) -> str:
        return self._voice

    @property
    def words_per_minute(self) -> int:
        return self._wpm

    def synthesize(self, text: str) -> Utterance:
        """Blocking; run it in an executor. Serialised across all instances."""
        # NUL would truncate the C string; other control chars confuse espeak.
        # Replacing them one for one keeps espeak's character positions valid.
        clean = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)
        if not clean.strip():
            return Utterance(text=text)
        with _LOCK:
            engine = _engine()
            if not engine.set_voice(self._voice):
                raise TTSError(f"eSpeak NG could not select voice {self._voice!r}")
            raw, events = engine.synth(clean, self._wpm)
            rate = engine.sample_rate
        native = np.frombuffer(raw, dtype=np.int16)
        pcm = _resample(native, rate)
        duration = pcm.shape[0] / OUTPUT_SAMPLE_RATE
        phonemes: list[Phoneme] = []
        for kind, sample, _, _, sym in events:
            # Stress marks are prosody, not mouth shape; "(en)" marks a language switch.
            symbol = sym.lstrip("',")
            if kind == _EV_PHONEME and symbol and not symbol.startswith("("):
                phonemes.append(Phoneme(start=min(sample / rate, duration), symbol=symbol))
        phonemes.sort(key=lambda p: p.start)  # stable: keeps espeak's order on ties
        words = _build_words(clean, events, [p.start for p in phonemes], rate)
        words = tuple(Word(min(w.start, duration), w.text) for w in words)
        if native.size and not phonemes:
            logger.warning("eSpeak NG produced audio but no phoneme events")
        return Utterance(text=text, pcm=pcm, phonemes=tuple(phonemes), words=words)


def word_chunks(text: str, words: Sequence[str]) -> tuple[str, ...]:
    """Split ``text`` at the words' positions: chunk i runs from word i to word i+1, the first
    from the start and the last to the end, so the chunks rebuild ``text`` exactly."""
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
