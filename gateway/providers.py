"""Builds upstreams from settings: the local avatar and the cloud providers whose keys are set.

One aiohttp client pool serves every provider call. The journal's orphans (sessions a killed
gateway left open, create calls it never heard back from) are stopped here, at start-up, before
the gateway serves anyone; the billing guard (:mod:`.upstream.billing`) retries what fails.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import openai

from .avatar import SpeechSynthesizer
from .avatar.looks import LOOKS
from .config import QualityTier, Settings
from .errors import BadRequest, UpstreamError
from .journal import JournalEntry, SessionJournal
from .livekit_out import OperatorRoom
from .metrics import Metrics
from .upstream.base import Upstream
from .upstream.billing import BillingGuard, BillingPolicy
from .upstream.cloud import ReconnectPolicy
from .upstream.heygen import HeyGenClient, HeyGenUpstream
from .upstream.liveavatar import LiveAvatarClient, LiveAvatarUpstream
from .upstream.liveavatar_lite import LiveAvatarLiteUpstream
from .upstream.local import LocalUpstream
from .upstream.speech import EspeakVoice, OpenAIVoice, Voice

logger = logging.getLogger(__name__)


class Providers:
    def __init__(self, settings: Settings, metrics: Metrics, journal: SessionJournal) -> None:
        self._settings = settings
        self._metrics = metrics
        self.journal = journal
        self.billing = BillingGuard(journal, metrics, BillingPolicy(
            interval=settings.upstream_reconcile_interval,
            max_delay=settings.upstream_stop_retry_max,
            call_timeout=settings.upstream_timeout))
        self._http: aiohttp.ClientSession | None = None
        self._heygen: HeyGenClient | None = None
        self._liveavatar: LiveAvatarClient | None = None
        self._synthesizers: dict[str, SpeechSynthesizer] = {}
        self._openai: openai.AsyncOpenAI | None = None
        """The speech API client for LiveAvatar LITE with ``tts=openai``."""

    @property
    def available(self) -> tuple[str, ...]:
        kinds = ["local"]
        if self._settings.heygen_api_key:
            kinds.append("heygen")
        if self._settings.liveavatar_api_key:
            kinds.append("liveavatar")
        return tuple(kinds)

    async def start(self) -> None:
        self._http = aiohttp.ClientSession()
        s, timeout = self._settings, self._settings.upstream_timeout
        if s.heygen_api_key:
            heygen = self._heygen = HeyGenClient(s.heygen_base_url, s.heygen_api_key, self._http,
                                                 self._metrics, timeout=timeout)
            self.billing.register("heygen", self._stop_orphan, heygen.list_sessions)
        if s.liveavatar_api_key:
            self._liveavatar = LiveAvatarClient(s.liveavatar_base_url, s.liveavatar_api_key,
                                                self._http, self._metrics, timeout=timeout)
            self.billing.register("liveavatar", self._stop_orphan)
        self.billing.start()
        if s.tts == "openai" and s.liveavatar_mode == "lite":
            self._openai = openai.AsyncOpenAI(api_key=s.openai_api_key.reveal(),
                                              base_url=s.openai_base_url or None,
                                              timeout=s.openai_timeout, max_retries=1)

    async def close(self) -> None:
        await self.billing.close()
        if self._openai is not None:
            await self._openai.close()
        if self._http is not None:
            await self._http.close()
        await self.journal.close()

    async def synthesizer(self, voice: str) -> SpeechSynthesizer:
        if voice not in self._synthesizers:
            # The first use of a voice takes eSpeak's process-wide lock: not on the loop.
            loop = asyncio.get_running_loop()
            try:
                self._synthesizers[voice] = await loop.run_in_executor(
                    None, SpeechSynthesizer, voice, self._settings.tts_words_per_minute)
            except ValueError as exc:
                raise BadRequest(f"unknown voice {voice!r}: {exc}") from None
        return self._synthesizers[voice]

    async def make(self, kind: str, quality: QualityTier, *, voice: str | None = None,
                   avatar_id: str | None = None, room: OperatorRoom | None = None) -> Upstream:
        """``room``: the session's room in the operator's LiveKit, for an upstream that can
        publish into it itself (LiveAvatar); the others ignore it (the gateway republishes
        their media, see :mod:`gateway.livekit_out`)."""
        s = self._settings
        if kind not in self.available:
            known = ", ".join(self.available)
            hint = "" if kind not in ("heygen", "liveavatar") else \
                f" (set AVATAR_GATEWAY_{kind.upper()}_API_KEY to enable it)"
            raise BadRequest(f"upstream {kind!r} is not available{hint}; available: {known}")
        if kind == "local":
            look = avatar_id or s.local_avatar
            if look not in LOOKS:
                raise BadRequest(f"unknown avatar {look!r} for the local upstream; "
                                 f"available: {', '.join(LOOKS)}")
            synthesizer = await self.synthesizer(voice or s.tts_voice)
            return LocalUpstream(quality, synthesizer, fps=s.video_fps,
                                 max_text_chars=s.max_text_chars, look=look)
        policy = ReconnectPolicy(attempts=s.reconnect_attempts,
                                 ready_within=s.reconnect_ready_within)
        if kind == "heygen":
            assert self._heygen is not None
            return HeyGenUpstream(self._heygen, quality, self.billing,
                                  avatar_id=avatar_id or s.heygen_avatar_id,
                                  voice_id=voice or s.heygen_voice_id or None, reconnect=policy,
                                  room=room)
        assert self._liveavatar is not None
        if s.liveavatar_mode == "lite":
            assert self._http is not None
            return LiveAvatarLiteUpstream(self._liveavatar, quality, self.billing,
                                          avatar_id=avatar_id or s.liveavatar_avatar_id,
                                          voice=await self.voice(voice), http=self._http,
                                          reconnect=policy, room=room)
        return LiveAvatarUpstream(self._liveavatar, quality, self.billing,
                                  avatar_id=avatar_id or s.liveavatar_avatar_id, reconnect=policy,
                                  room=room)

    async def voice(self, name: str | None) -> Voice:
        """The gateway's own voice for LiveAvatar LITE (``tts``): eSpeak NG or OpenAI's."""
        s = self._settings
        if self._openai is not None:
            return OpenAIVoice(self._openai, model=s.openai_tts_model,
                               voice=name or s.openai_tts_voice, timeout=s.openai_timeout)
        return EspeakVoice(await self.synthesizer(name or s.tts_voice))

    async def reap_orphans(self) -> int:
        """Stop every session the journal says a previous run left open, and reconcile the
        create calls it never heard back from. Returns how many sessions were stopped."""
        return await self.billing.reap()

    async def stop_abandoned(self, entry: JournalEntry) -> None:
        """Stop a provider session another replica opened and can no longer stop (it died):
        now, and if that fails, through the billing guard's retries until it is confirmed."""
        try:
            await self._stop_orphan(entry)
        except UpstreamError as exc:
            logger.warning("%s session %s: stop failed (%s); retrying in the background",
                           entry.provider, entry.session_id, exc.message)
            self.billing.stop_later(entry.provider, entry.session_id, entry.stop_info)

    async def _stop_orphan(self, entry: JournalEntry) -> None:
        """Stop a journaled session with what its row says (no upstream object needed)."""
        if entry.provider == "heygen" and self._heygen is not None:
            await self._heygen.stop(entry.session_id)
        elif entry.provider == "liveavatar" and self._liveavatar is not None:
            await self._liveavatar.stop(entry.session_id,
                                        str(entry.stop_info.get("session_token", "")))
        else:
            raise UpstreamError(f"no {entry.provider} key is configured to stop session "
                                f"{entry.session_id}")
