"""What a client can ask for: upstreams, their avatars and voices, quality tiers.

Pickers in the demo page (and any controller UI) read this instead of hard-coding ids. Cloud
upstreams list what the configuration names; the providers' own avatar catalogues are not
fetched (they need the key on every page load and differ per account).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from ..avatar.looks import DEFAULT_LOOK, LOOKS
from ..avatar.tts import available_voices
from ..config import QUALITY_TIERS, Settings
from .common import SETTINGS

routes = web.RouteTableDef()

_voices: list[str] | None = None


async def _local_voices() -> list[str]:
    global _voices  # the engine's list never changes within a process
    if _voices is None:
        # The first call may initialise eSpeak (a process-wide lock): not on the loop.
        _voices = await asyncio.get_running_loop().run_in_executor(None, available_voices)
    return _voices


def _named(*ids: str) -> list[dict[str, str]]:
    return [{"id": i, "name": i} for i in ids if i]


async def catalog_of(settings: Settings) -> dict[str, Any]:
    local_voices = _named(*await _local_voices())
    local = {
        "kind": "local",
        "available": True,
        "paid": False,
        "answers_itself": False,
        "listens": True,
        "avatars": [{"id": look.id, "name": look.title} for look in LOOKS.values()],
        "voices": local_voices,
        "default_avatar": DEFAULT_LOOK,
        "default_voice": settings.tts_voice,
    }
    heygen = {
        "kind": "heygen",
        "available": bool(settings.heygen_api_key),
        "paid": True,
        "answers_itself": True,
        "listens": True,
        "avatars": _named(settings.heygen_avatar_id),
        "voices": _named(settings.heygen_voice_id),
        "default_avatar": settings.heygen_avatar_id,
        "default_voice": settings.heygen_voice_id,
    }
    lite = settings.liveavatar_mode == "lite"
    # LITE: the gateway speaks (eSpeak NG or OpenAI's voice) and its chat answers `talk`.
    if not lite:
        lite_voices: list[dict[str, str]] = []
        lite_default = ""
    elif settings.tts == "openai":
        lite_voices, lite_default = _named(settings.openai_tts_voice), settings.openai_tts_voice
    else:
        lite_voices, lite_default = local_voices, settings.tts_voice
    liveavatar = {
        "kind": "liveavatar",
        "available": bool(settings.liveavatar_api_key),
        "paid": True,
        "mode": settings.liveavatar_mode,
        "answers_itself": not lite,
        # LITE only lip-syncs what the gateway sends: nobody there hears a microphone.
        "listens": not lite,
        "avatars": _named(settings.liveavatar_avatar_id),
        "voices": lite_voices,
        "default_avatar": settings.liveavatar_avatar_id,
        "default_voice": lite_default,
    }
    return {
        "default_upstream": settings.default_upstream,
        "default_quality": settings.default_quality,
        "qualities": [{"id": t.name, "width": t.width, "height": t.height, "bitrate": t.bitrate}
                      for t in QUALITY_TIERS.values()],
        "upstreams": [local, heygen, liveavatar],
        # Who answers `talk` for the upstreams without a model of their own: "offline" (the
        # offline responder, no OpenAI key) or "openai". Clients show the offline one as a badge.
        "chat": "openai" if settings.openai_api_key else "offline",
    }


@routes.get("/v1/catalog")
async def catalog(request: web.Request) -> web.Response:
    return web.json_response(await catalog_of(request.app[SETTINGS]))
