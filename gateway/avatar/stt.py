"""Offline speech recognition for the local avatar: PocketSphinx, no network, no keys.

The ``pocketsphinx`` wheel carries its own US English acoustic model, CMU pronouncing
dictionary and trigram language model (``pocketsphinx/model/en-us``); nothing is downloaded
at run time. Accuracy is that of a small HMM recognizer: good enough to turn a short spoken
question into a chat prompt, not a dictation engine.

:class:`SpeechRecognizer` is the blocking recognizer. :class:`RecognizerProcess` runs one in a
child process for asyncio code, because PocketSphinx holds the GIL while it decodes. The
child is this file run as a script (``python -P stt.py``): it imports only the standard
library and ``pocketsphinx``, not the gateway.
"""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import sys
from typing import BinaryIO, ClassVar

import pocketsphinx  # type: ignore[import-untyped]

_REQUEST = struct.Struct("<I")
"""Parent to child: the PCM's length in bytes, then the PCM."""
_RESPONSE = struct.Struct("<BI")
"""Child to parent: status (0 = words, 1 = error message), text length, then UTF-8 text."""
_CHILD = os.path.abspath(__file__)


class RecognizerError(RuntimeError):
    """The recognizer process could not transcribe an utterance (it failed or died)."""


class SpeechRecognizer:
    """Blocking speech-to-text with one PocketSphinx decoder.

    Building one loads the models (about 0.25 s and 90 MiB on the development machine);
    :meth:`transcribe` costs 0.1 to 0.2 s of CPU per second of audio, all of it holding
    the GIL. Keep one and reuse it, from one thread at a time (the decoder is not thread-safe).

    The decoder keeps its default models and settings. Those make words out of pure digital
    silence (a second of zeros decodes as "dog"), so all-zero audio is answered ``""``
    without decoding. Dither (``dither=True``), the decoder's own remedy, made it hear
    "thank" in white noise instead.
    """

    sample_rate: ClassVar[int] = 16_000
    """Input rate, Hz (mono signed 16-bit little-endian)."""

    def __init__(self) -> None:
        self._decoder = pocketsphinx.Decoder(loglevel="FATAL")

    def transcribe(self, pcm: bytes) -> str:
        """The words spoken in one utterance, lower case and space separated; ``""`` if none.

        :param pcm: the whole utterance, 16 kHz mono s16le; a little silence around the
            speech helps.
        :raises ValueError: ``pcm`` is not a whole number of samples.
        :raises RuntimeError: the decoder failed.
        """
        if len(pcm) % 2:
            raise ValueError("pcm must hold whole 16-bit samples")
        if len(pcm) < self.sample_rate // 10 * 2 or not pcm.strip(b"\0"):
            return ""  # under 100 ms no word fits (and an empty buffer crashes the decoder)
        decoder = self._decoder
        decoder.start_utt()
        try:
            # One call with full_utt: acoustic normalisation sees the whole utterance at once
            # instead of a running estimate (fed in pieces, eSpeak test phrases came out worse).
            decoder.process_raw(pcm, full_utt=True)
        finally:
            decoder.end_utt()
        hypothesis = decoder.hyp()
        if hypothesis is None:
            return ""
        return " ".join(str(hypothesis.hypstr).split())


class RecognizerProcess:
    """One :class:`SpeechRecognizer` in a child process of its own, for the event loop.

    The wheel's Cython bindings never release the GIL, so a decoder on a thread of the
    gateway would stall the event loop, and with it every media clock, for hundreds of
    milliseconds at a time (up to 0.9 s measured). In a child process the loop loses nothing
    and the decode runs on another core.

    The child starts at :meth:`start` (or the first :meth:`transcribe`), builds its decoder
    once and then transcribes one utterance at a time, in order. If it dies, the call that
    was waiting raises :class:`RecognizerError` and the next call starts a new child.
    :meth:`close` kills it for good.

    Costs on the development machine: about 0.3 s to start, and 110 MiB (a Python
    interpreter and the decoder) growing to about 140 MiB with long utterances.
    """

    def __init__(self) -> None:
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    async def start(self) -> None:
        """Start the child and wait until its decoder is built, unless it runs already.

        :raises RecognizerError: the child could not start or build its decoder.
        """
        async with self._lock:
            await self._running()

    async def transcribe(self, pcm: bytes) -> str:
        """See :meth:`SpeechRecognizer.transcribe`. Calls wait for each other.

        :raises RecognizerError: the child failed or died.
        """
        async with self._lock:
            return await self._exchange(await self._running(), pcm)

    async def close(self) -> None:
        """Kill the child (whatever it is decoding is lost) and reap it, for good: later
        calls raise :class:`RecognizerError`. Idempotent."""
        self._closed = True
        await self._kill()  # now, whatever it is decoding
        async with self._lock:  # and a child started meanwhile
            await self._kill()

    async def _kill(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.returncode is None:
            process.kill()
        await process.wait()

    async def _running(self) -> asyncio.subprocess.Process:
        process = self._process
        if process is not None and process.returncode is None:
            return process
        if self._closed:
            raise RecognizerError("the speech recognizer is closed")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-P", _CHILD,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        self._process = process
        await self._exchange(process, b"")  # answered once the decoder is built
        return process

    async def _exchange(self, process: asyncio.subprocess.Process, pcm: bytes) -> str:
        assert process.stdin is not None and process.stdout is not None
        try:
            process.stdin.write(_REQUEST.pack(len(pcm)))
            process.stdin.write(pcm)
            await process.stdin.drain()
            status, size = _RESPONSE.unpack(await process.stdout.readexactly(_RESPONSE.size))
            text = (await process.stdout.readexactly(size)).decode()
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            await self._abandon(process)
            raise RecognizerError("the speech recognizer process died") from exc
        except BaseException:
            # Cancelled half-way: the request/response pairs are out of step for good.
            await asyncio.shield(self._abandon(process))
            raise
        if status:
            raise RecognizerError(f"speech recognition failed: {text}")
        return text

    async def _abandon(self, process: asyncio.subprocess.Process) -> None:
        if self._process is process:
            await self._kill()


def _serve(requests: BinaryIO, responses: BinaryIO) -> None:
    """The child: build a recognizer, then answer requests until the parent goes away."""
    recognizer = SpeechRecognizer()
    while True:
        header = requests.read(_REQUEST.size)
        if len(header) < _REQUEST.size:
            return
        (size,) = _REQUEST.unpack(header)
        pcm = requests.read(size)
        if len(pcm) < size:
            return
        try:
            status, text = 0, recognizer.transcribe(pcm)
        except (ValueError, RuntimeError) as exc:
            status, text = 1, repr(exc)
        body = text.encode()
        responses.write(_RESPONSE.pack(status, len(body)) + body)
        responses.flush()


if __name__ == "__main__":
    # The gateway stops the child itself; a terminal's Ctrl-C reaches the whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Responses get a private copy of stdout; anything else printed goes to stderr.
    responses = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    _serve(sys.stdin.buffer, responses)
