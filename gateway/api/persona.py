"""The seed server's JSON API, at its paths and in its JSON, mapped onto the gateway's services.

Its clients keep working unchanged: ``/persona`` reads and edits the persona, ``/persona/heygen/*``
runs an avatar session in the old HeyGen v1 style (the server offers SDP, the browser answers and
trickles its candidates), and ``/openai`` + ``/openai/complete`` chat in the persona's voice. Errors
are the seed's ``{"success": false, "message", "error"}`` (rendered by ``app.py``'s middleware).

A seed ``session_id`` is the gateway session's id, so operators see it in ``/v1/sessions`` and can
follow its ``/events``; this module maps it to the one viewer (peer connection) it offered.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..audience import AnyViewer
from ..chat.persona import Persona
from ..config import Settings
from ..errors import BadRequest, Conflict, NotFound
from ..sessions import Session
from ..viewers.whep import SdpFragment, browser_ice_servers, parse_sdpfrag
from .common import (
    CHAT,
    PERSONAS,
    SESSIONS,
    SETTINGS,
    client_key,
    one_sentence,
    optional_str,
    read_json,
    required_str,
)

routes = web.RouteTableDef()

SWEEP_INTERVAL = 5.0
"""How often sessions that ended on their own (idle, upstream gone) are forgotten here."""
MAX_CONVERSATION_ID = 128


@dataclass(frozen=True, slots=True)
class SeedSession:
    session: Session
    viewer: AnyViewer


class SeedSessions:
    """Seed session id → (gateway session, its offering viewer).

    Bounded by the registry's session limit: entries are added only for sessions it created, and
    one whose session has closed (stopped, idle, upstream gone) is dropped when next looked up or
    swept.
    """

    def __init__(self) -> None:
        self._sessions: dict[str, SeedSession] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    def add(self, session: Session, viewer: AnyViewer) -> SeedSession:
        self.prune()
        seed = SeedSession(session, viewer)
        self._sessions[session.id] = seed
        return seed

    def get(self, session_id: str) -> SeedSession:
        seed = self._sessions.get(session_id)
        if seed is not None and seed.session.close_reason is not None:
            self._forget(session_id)
            seed = None
        if seed is None:
            raise NotFound(f"no session {session_id!r} (unknown, stopped or expired)")
        return seed

    def pop(self, session_id: str) -> SeedSession:
        seed = self.get(session_id)
        self._forget(session_id)
        return seed

    def prune(self) -> None:
        for session_id in [sid for sid, seed in self._sessions.items()
                           if seed.session.close_reason is not None]:
            self._forget(session_id)

    def clear(self) -> None:
        for session_id in list(self._sessions):
            self._forget(session_id)

    def _forget(self, session_id: str) -> None:
        del self._sessions[session_id]


SEED_SESSIONS = web.AppKey("seed_sessions", SeedSessions)


def _ok(message: str, **fields: Any) -> web.Response:
    return web.json_response({"success": True, "message": message, **fields})


# -- persona -------------------------------------------------------------------------------------

@routes.get("/persona")
async def get_persona(request: web.Request) -> web.Response:
    return web.json_response((await request.app[PERSONAS].get()).to_dict())


@routes.get("/persona/config")
async def get_persona_config(request: web.Request) -> web.Response:
    return web.json_response((await request.app[PERSONAS].get()).to_dict())


@routes.post("/persona")
async def update_persona_details(request: web.Request) -> web.Response:
    data = await read_json(request)
    persona = await request.app[PERSONAS].update_details(data)
    return _ok("Persona details updated successfully", persona=persona.to_dict())


@routes.post("/persona/update")
async def replace_persona(request: web.Request) -> web.Response:
    data = await read_json(request)
    # Some clients send the configuration itself, others wrap it: {"persona"|"config": {...}}.
    if len(data) == 1 and isinstance(next(iter(data.values())), dict) and \
            next(iter(data)) in ("persona", "config"):
        data = next(iter(data.values()))
    persona = await request.app[PERSONAS].replace(Persona.from_dict(data))
    return _ok("Persona configuration updated successfully", data=persona.to_dict())


# -- HeyGen v1 style sessions -------------------------------------------------------------------

@routes.post("/persona/heygen/init")
async def init_bot(request: web.Request) -> web.Response:
    await read_json(request, required=False)
    return _ok("Bot initialized successfully", data={"text": await request.app[CHAT].welcome()})


def ice_servers(settings: Settings) -> list[dict[str, Any]]:
    """The ICE servers for the browser, in HeyGen v1's ``ice_servers2`` shape."""
    return browser_ice_servers(settings.ice_servers, settings.ice_username,
                               settings.ice_credential.reveal())


@routes.post("/persona/heygen/session/create")
async def create_session(request: web.Request) -> web.Response:
    data = await read_json(request, required=False)
    avatar = optional_str(data, "avatar_name")
    voice = optional_str(data, "voice_id")
    quality = optional_str(data, "quality")
    settings = request.app[SETTINGS]
    # HeyGen avatar names and voice ids mean nothing to the local avatar (one face, eSpeak
    # voices): there they are accepted and ignored, so seed clients work unchanged.
    cloud = settings.default_upstream != "local"
    session = await request.app[SESSIONS].create(
        quality=quality, voice=voice if cloud else None, avatar_id=avatar if cloud else None)
    try:
        viewer, offer = await session.audience.add_offering_viewer(client_key(request))
    except BaseException:
        await session.close("start_failed")
        raise
    request.app[SEED_SESSIONS].add(session, viewer)
    servers = ice_servers(settings)
    return _ok("Session created successfully", data={
        "session_id": session.id,
        "sdp": {"type": "offer", "sdp": offer},
        "ice_servers2": servers,
        "ice_servers": [url for s in servers for url in s["urls"]],
        "upstream": session.upstream.kind,
        "quality": session.quality.name,
    })


def _answer_sdp(value: object) -> str:
    if isinstance(value, dict):
        kind = value.get("type", "answer")
        if kind != "answer":
            raise BadRequest(f"'sdp.type' must be 'answer' (the browser answers the gateway's "
                             f"offer), not {kind!r}")
        value = value.get("sdp")
        where = "'sdp.sdp'"
    else:
        where = "'sdp'"
    if value is None:
        raise BadRequest(f"{where} is required: the browser's SDP answer")
    if not isinstance(value, str):
        raise BadRequest(f"{where} must be a string (or 'sdp' an object {{type, sdp}})")
    if not value.strip():
        raise BadRequest(f"{where} is empty")
    return value


def _open_viewer(seed: SeedSession) -> AnyViewer:
    viewer = seed.viewer
    if viewer.close_reason is not None:
        raise Conflict(f"the session's peer connection has closed ({viewer.close_reason}); "
                       "stop this session and create a new one")
    return viewer


@routes.post("/persona/heygen/session/start")
async def start_session(request: web.Request) -> web.Response:
    data = await read_json(request)
    session_id = required_str(data, "session_id")
    answer = _answer_sdp(data.get("sdp"))
    seed = request.app[SEED_SESSIONS].get(session_id)
    viewer = _open_viewer(seed)
    await viewer.accept_answer(answer)
    return _ok("Session started successfully", data={"session_id": session_id})


def _candidate(value: object) -> SdpFragment:
    """A browser's ``RTCIceCandidateInit``; an empty ``candidate`` means end-of-candidates."""
    if not isinstance(value, dict):
        raise BadRequest("'candidate' is required: an object {candidate, sdpMid, sdpMLineIndex}")
    line = value.get("candidate")
    if not isinstance(line, str):
        raise BadRequest("'candidate.candidate' must be a string (empty for end-of-candidates)")
    mid = value.get("sdpMid")
    if mid is not None and not isinstance(mid, str):
        raise BadRequest("'candidate.sdpMid' must be a string or null")
    index = value.get("sdpMLineIndex")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
        raise BadRequest("'candidate.sdpMLineIndex' must be a non-negative integer or null")
    text = line.strip()
    if not text:
        return SdpFragment(ice_ufrag=None, ice_pwd=None, candidates=(), end_of_candidates=True)
    if "\r" in text or "\n" in text:
        raise BadRequest("'candidate.candidate' must be a single candidate line")
    text = text.removeprefix("a=").removeprefix("candidate:")
    fragment = parse_sdpfrag(f"a=candidate:{text}")
    if len(fragment.candidates) != 1:
        raise BadRequest("'candidate.candidate' is not an ICE candidate line")
    candidate = fragment.candidates[0]
    if not 0 < candidate.port < 65536 or candidate.component not in (1, 2) or \
            candidate.protocol.lower() not in ("udp", "tcp") or candidate.priority < 1 or \
            candidate.type not in ("host", "srflx", "prflx", "relay"):
        raise BadRequest(f"'candidate.candidate' is not a usable candidate: {line!r}")
    candidate.sdpMid = mid
    candidate.sdpMLineIndex = index
    return SdpFragment(ice_ufrag=None, ice_pwd=None, candidates=(candidate,),
                       end_of_candidates=False)


@routes.post("/persona/heygen/ice")
async def add_ice_candidate(request: web.Request) -> web.Response:
    data = await read_json(request)
    session_id = required_str(data, "session_id")
    fragment = _candidate(data.get("candidate"))
    seed = request.app[SEED_SESSIONS].get(session_id)
    await _open_viewer(seed).add_candidates(fragment)
    return _ok("ICE candidate handled successfully", data={"session_id": session_id})


@routes.post("/persona/heygen/text")
async def send_text(request: web.Request) -> web.Response:
    """Speak ``text``, or with ``generate_ai_response`` the persona's answer to it.

    The answer is streamed: each sentence is handed to the avatar as soon as the model has written
    it, so speech starts after the first sentence, not after the whole answer. The response comes
    once every sentence is queued; ``speaking_duration`` is the total speech, in seconds.
    ``ai_response`` is a string, as the seed documents it: the answer, or ``""`` when none was
    asked for.
    """
    data = await read_json(request)
    session_id = required_str(data, "session_id")
    text = required_str(data, "text").strip()
    limit = request.app[SETTINGS].max_text_chars
    if not text:
        raise BadRequest("'text' is empty")
    if len(text) > limit:
        raise BadRequest(f"'text' is longer than {limit} characters")
    generate = data.get("generate_ai_response", False)
    if not isinstance(generate, bool):
        raise BadRequest("'generate_ai_response' must be true or false")
    seed = request.app[SEED_SESSIONS].get(session_id)
    chat = request.app[CHAT]
    # Asked for an answer, the seed wants its text back: the gateway's chat answers, whatever
    # the upstream (a provider's own model would not tell it).
    conversation = seed.session.conversation
    if generate:
        spoken = await conversation.answer(text)
    else:
        async with contextlib.aclosing(one_sentence(text)) as sentences:
            spoken = await conversation.speak_sentences(sentences)
    ai_response = spoken.text if generate else ""
    task_ids, duration_ms = list(spoken.task_ids), spoken.duration_ms
    speaking_duration = round(duration_ms / 1000.0, 3)
    body = {"session_id": session_id, "text": text, "ai_response": ai_response,
            "speaking_duration": speaking_duration, "task_ids": task_ids,
            "offline": chat.offline if generate else None}
    # The seed documents the answer and the duration at the top level; ``data`` (free-form in
    # the seed) repeats them next to what only the gateway knows (task ids, offline).
    return _ok("Text sent successfully", data=body, ai_response=ai_response,
               speaking_duration=speaking_duration)


@routes.post("/persona/heygen/session/stop")
async def stop_session(request: web.Request) -> web.Response:
    data = await read_json(request)
    session_id = required_str(data, "session_id")
    seed = request.app[SEED_SESSIONS].pop(session_id)
    await seed.session.close("deleted")
    return _ok("Session stopped successfully", data={"session_id": session_id})


# -- chat ----------------------------------------------------------------------------------------

@routes.post("/openai")
async def init_chat(request: web.Request) -> web.Response:
    await read_json(request, required=False)
    # Exactly the seed's fields: whether the model or the offline responder answers shows in
    # every offline answer's label, and in the log at start-up.
    return _ok("AI service initialized successfully", text=await request.app[CHAT].welcome())


@routes.post("/openai/complete")
async def complete(request: web.Request) -> web.Response:
    """One answer in the persona's voice; with ``session_id``, within that conversation."""
    data = await read_json(request)
    prompt = required_str(data, "prompt").strip()
    limit = request.app[SETTINGS].max_text_chars
    if not prompt:
        raise BadRequest("'prompt' is empty")
    if len(prompt) > limit:
        raise BadRequest(f"'prompt' is longer than {limit} characters")
    conversation = optional_str(data, "session_id")
    if conversation is not None and not 0 < len(conversation) <= MAX_CONVERSATION_ID:
        raise BadRequest(f"'session_id' must be 1 to {MAX_CONVERSATION_ID} characters")
    reply = await request.app[CHAT].complete(prompt, conversation=conversation)
    # An offline reply says so in its text (OFFLINE_LABEL); the seed has no other field for it.
    return _ok("AI response generated successfully", text=reply.text)


# -- the seed sessions' upkeep -------------------------------------------------------------------

async def sweep_seed_sessions(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: forget the seed sessions that ended on their own, while the app runs."""
    seeds = app[SEED_SESSIONS]

    async def sweep() -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            seeds.prune()

    sweeper = asyncio.get_running_loop().create_task(sweep(), name="seed-session-sweeper")
    try:
        yield
    finally:
        sweeper.cancel()
        await asyncio.wait([sweeper])
        # The sessions are closed by now (the services' cleanup runs first); drop our
        # references, so a stopped application does not keep peer connections reachable.
        seeds.clear()
