"""The gateway's own voice, for upstreams that only lip-sync audio we send (LiveAvatar LITE).

Two engines behind one small interface, both giving 24 kHz 16-bit mono PCM (what LiveAvatar's
``agent.speak`` takes) and word timings for the ``avatar_talking_message`` events:

* :class:`EspeakVoice`: eSpeak NG, offline (the local avatar's engine); word timings are the
  engine's own.
* :class:`OpenAIVoice`: OpenAI's speech API (``audio.speech``, ``response_format="pcm"`` is
  24 kHz 16-bit mono) through the ``openai`` package, against any compatible server. It gives
  no timings, so words are spread over the audio by their length.

Provider failures become gateway errors with messages of our own (a provider's message can
echo part of the key): timeouts and 5xx are 503, 401/403 and anything else 502, 429 a 429.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np
import openai

from ..avatar.tts import SpeechSynthesizer, Utterance, Word, word_chunks
from ..chat.llm import openai_errors
from ..errors import (
    UpstreamAuthError,
    UpstreamError,
    UpstreamQuotaExceeded,
    UpstreamUnavailable,
)

logger = logging.getLogger(__name__)

SAMPLE_RATE = 24_000
"""LiveAvatar LITE takes 24 kHz 16-bit mono PCM."""
BYTES_PER_SECOND = SAMPLE_RATE * 2
MAX_SPEECH_BYTES = BYTES_PER_SECOND * 600
"""Ten minutes of audio: far more than one speak task holds (``max_text_chars``)."""


@dataclass(frozen=True, slots=True)
class Speech:
    text: str
    pcm: bytes
    """24 kHz 16-bit little-endian mono."""
    words: tuple[Word, ...]
    """Word onsets, seconds from the start of ``pcm``, in text order."""
    chunks: tuple[str, ...]
    """``text`` cut at the words: chunk i runs from word i to word i+1 (they rebuild it)."""

    @property
    def duration(self) -> float:
        return len(self.pcm) / BYTES_PER_SECOND


class Voice(abc.ABC):
    """Turns text into :class:`Speech`."""

    engine: str

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The voice used (eSpeak voice, OpenAI voice)."""

    @abc.abstractmethod
    async def synthesize(self, text: str) -> Speech: ...


class EspeakVoice(Voice):
    engine = "espeak"

    def __init__(self, synthesizer: SpeechSynthesizer) -> None:
        self._synthesizer = synthesizer

    @property
    def name(self) -> str:
        return self._synthesizer.voice

    async def synthesize(self, text: str) -> Speech:
        # eSpeak holds a process-wide lock and takes ~real-time/20: never on the loop.
        return await asyncio.get_running_loop().run_in_executor(None, self._synthesize, text)

    def _synthesize(self, text: str) -> Speech:
        utterance: Utterance = self._synthesizer.synthesize(text)
        pcm = resample(utterance.pcm, utterance.sample_rate)
        return Speech(text, pcm, utterance.words, word_chunks(text, [w.text for w in utterance.words]))


class OpenAIVoice(Voice):
    engine = "openai"

    def __init__(self, client: openai.AsyncOpenAI, *, model: str, voice: str,
                 timeout: float) -> None:
        self._client = client
        self._model = model
        self._voice = voice
        self._timeout = timeout

    @property
    def name(self) -> str:
        return self._voice

    async def synthesize(self, text: str) -> Speech:
        with openai_errors("the speech model", self._timeout):
            async with self._client.audio.speech.with_streaming_response.create(
                model=self._model, voice=self._voice, input=text, response_format="pcm",
            ) as response:
                pcm = bytearray()
                async for chunk in response.iter_bytes():
                    pcm += chunk
                    if len(pcm) > MAX_SPEECH_BYTES:
                        raise UpstreamError("the speech model answered with more than ten "
                                            "minutes of audio")
        if len(pcm) % 2:
            pcm = pcm[:-1]
        if not pcm:
            raise UpstreamError("the speech model answered with no audio")
        words = spread_words(text, len(pcm) / BYTES_PER_SECOND)
        return Speech(text, bytes(pcm), words, word_chunks(text, [w.text for w in words]))


def _provider_errors(timeout: float) -> Iterator[None]:
    try:
        yield
    except openai.APITimeoutError:
        raise UpstreamUnavailable(
            f"the speech model did not answer within {timeout:g} s", retry_after=5) from None
    except openai.APIConnectionError:
        raise UpstreamUnavailable("the speech model server cannot be reached",
                                  retry_after=5) from None
    except openai.APIStatusError as exc:
        status = exc.status_code
        if status in (401, 403):
            raise UpstreamAuthError(f"the speech model server refused the gateway's API key "
                                    f"(HTTP {status})") from None
        if status == 429:
            raise UpstreamQuotaExceeded("the speech model server is rate limiting the gateway",
                                        retry_after=10) from None
        if status >= 500:
            raise UpstreamUnavailable(f"the speech model server failed (HTTP {status})",
                                      retry_after=5) from None
        raise UpstreamError(f"the speech model refused the request (HTTP {status})") from None
    except openai.OpenAIError:
        raise UpstreamError("the speech model failed") from None


def resample(pcm: np.ndarray, rate: int) -> bytes:
    """16-bit mono PCM at ``rate`` to 24 kHz bytes (libswresample keeps the timing: sample n
    lands at n * 24000 / rate, so word onsets stay valid)."""
    if pcm.size == 0:
        return b""
    if rate == SAMPLE_RATE:
        return pcm.astype("<i2").tobytes()
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1).astype(np.int16), format="s16",
                                       layout="mono")
    frame.sample_rate = rate
    frame.pts = 0
    out = resampler.resample(frame) + resampler.resample(None)
    return b"".join(f.to_ndarray().astype("<i2").tobytes() for f in out)


def spread_words(text: str, duration: float) -> tuple[Word, ...]:
    """Word onsets for audio without timings: each word gets time in proportion to its length
    (a fair guess for one speaker at one rate), with a short lead-in."""
    tokens = text.split()
    if not tokens or duration <= 0:
        return ()
    lead = min(0.1, duration / 10)
    weights = [len(token) + 1 for token in tokens]
    total = sum(weights)
    words: list[Word] = []
    elapsed = 0
    for token, weight in zip(tokens, weights, strict=True):
        words.append(Word(lead + (duration - lead) * elapsed / total, token))
        elapsed += weight
    return tuple(words)
