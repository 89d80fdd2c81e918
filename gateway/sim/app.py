"""The simulator application: HeyGen + LiveAvatar REST, LiveKit signaling, admin API.

Admin API (no authentication: the simulator binds loopback unless told otherwise)::

    GET  /sim/ledger[?open=1][&provider=heygen|liveavatar]
         -> {"open": n, "total": n, "sessions": [ledger entry, ...]}
    GET  /sim/sessions                 -> {"sessions": [live session, ...]}
    GET  /sim/sessions/{id}            -> live (or recently closed) session
    POST /sim/sessions/{id}/drop_room    every client connection dropped abruptly
    POST /sim/sessions/{id}/avatar_leave the avatar leaves the room; the session stays open
    POST /sim/sessions/{id}/expire       the session ends now (reason "expired")
    GET|POST|DELETE /sim/faults, DELETE /sim/faults/{id}   see gateway/sim/faults.py

Admin errors are ``{"error": {"code", "message"}}`` like the gateway's own API.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from .config import SimSettings
from .faults import FaultBoard, FaultError
from .heygen import HeyGenApi, HeyGenError
from .ledger import Ledger
from .liveavatar import LiveAvatarApi, LiveAvatarError
from .livekit import LiveKitServer
from .sessions import Provider, SessionBook, SimApiError, SimSession

logger = logging.getLogger(__name__)

SIM_SETTINGS = web.AppKey("sim_settings", SimSettings)
LEDGER = web.AppKey("sim_ledger", Ledger)
FAULTS = web.AppKey("sim_faults", FaultBoard)
LIVEKIT = web.AppKey("sim_livekit", LiveKitServer)
BOOK = web.AppKey("sim_book", SessionBook)
HEYGEN = web.AppKey("sim_heygen", HeyGenApi)
LIVEAVATAR = web.AppKey("sim_liveavatar", LiveAvatarApi)


class AdminError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


_CORS_METHODS = "GET, POST, OPTIONS"
_CORS_HEADERS = "Authorization, Content-Type, X-API-KEY, x-api-key, Accept"


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The providers' APIs are called from browsers (the official web SDKs ``fetch`` them from
    the app's own page; LiveAvatar's with ``credentials: "include"``), so every provider route
    answers preflights and carries CORS headers. The admin API (``/sim/``) does not."""
    provider = request.path.startswith(("/v1/", "/v2/"))
    origin = request.headers.get("Origin")
    if provider and request.method == "OPTIONS" and origin is not None:
        response: web.StreamResponse = web.Response(status=204)
        response.headers["Access-Control-Allow-Methods"] = _CORS_METHODS
        response.headers["Access-Control-Allow-Headers"] = request.headers.get(
            "Access-Control-Request-Headers", _CORS_HEADERS)
        response.headers["Access-Control-Max-Age"] = "600"
    else:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if not provider or origin is None:
                raise
            response = exc
    if provider and origin is not None:
        # Credentialed requests need the exact origin, never "*".
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Vary"] = "Origin"
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Provider errors in the provider's own body shape; admin errors in the gateway's."""
    try:
        return await handler(request)
    except SimApiError as exc:
        return web.json_response(exc.body(), status=exc.status)
    except AdminError as exc:
        return web.json_response({"error": {"code": exc.code, "message": exc.message}},
                                 status=exc.status)


@web.middleware
async def fault_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    faults = request.app[FAULTS]
    resource = request.match_info.route.resource
    endpoint = resource.canonical if resource is not None else ""
    if endpoint not in faults.endpoints or not faults.list():
        return await handler(request)
    fault = faults.match(endpoint, await _session_hint(request))
    if fault is None:
        return await handler(request)
    logger.info("fault %s (%s) hits %s", fault.id, fault.kind, endpoint)
    outcome = await faults.apply(fault)
    if outcome.status is None:
        response = await handler(request)
        await faults.hold(outcome)
        return response
    error: SimApiError = (LiveAvatarError(outcome.status, outcome.message)
                          if endpoint.startswith("/v1/sessions/")
                          else HeyGenError(outcome.status, outcome.status, outcome.message))
    return web.json_response(error.body(), status=error.status)


async def _session_hint(request: web.Request) -> str | None:
    """The session a provider request is about: its body's ``session_id`` (its query's, for
    HeyGen's chat socket), else the session its Bearer session token belongs to."""
    if hint := request.query.get("session_id"):
        return hint
    if request.can_read_body:
        try:
            body = json.loads(await request.read())
        except (web.HTTPRequestEntityTooLarge, UnicodeDecodeError, json.JSONDecodeError):
            body = None
        if isinstance(body, dict) and isinstance(body.get("session_id"), str):
            return str(body["session_id"])
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        token = header[7:].strip()
        return (request.app[HEYGEN].session_for_token(token)
                or request.app[LIVEAVATAR].session_for_token(token))
    return None


def create_sim_app(settings: SimSettings | None = None, *,
                   ledger: Ledger | None = None) -> web.Application:
    """The simulator as an aiohttp application. A ``ledger`` passed in outlives the app
    (tests read it after shutdown); otherwise the app opens ``settings.ledger_path`` and
    closes it at cleanup."""
    settings = settings or SimSettings.from_env()
    app = web.Application(client_max_size=settings.max_body_bytes,
                          middlewares=[cors_middleware, error_middleware, fault_middleware])
    owned = ledger is None
    if ledger is None:
        ledger = Ledger(settings.ledger_path)
        # Only a ledger this app opened can hold a previous run's leftovers; one passed in
        # may belong to a simulator that is still running.
        orphans = ledger.close_orphans()
        if orphans:
            logger.warning("ledger: closed %d session(s) a previous run left open", orphans)
    livekit = LiveKitServer(settings.livekit_api_key, settings.livekit_api_secret.reveal())
    book = SessionBook(settings, ledger, livekit)
    heygen = HeyGenApi(settings, book)
    liveavatar = LiveAvatarApi(settings, book)
    app[SIM_SETTINGS] = settings
    app[LEDGER] = ledger
    app[LIVEKIT] = livekit
    app[BOOK] = book
    app[HEYGEN] = heygen
    app[LIVEAVATAR] = liveavatar

    heygen.add_routes(app)
    liveavatar.add_routes(app)
    app[FAULTS] = FaultBoard(
        {r.canonical for r in app.router.resources() if r.canonical.startswith("/v1/")},
        hang_cap=settings.fault_hang_cap)
    app.router.add_get("/sim/ledger", _ledger)
    app.router.add_get("/sim/sessions", _sessions)
    app.router.add_get("/sim/sessions/{id}", _session)
    app.router.add_post("/sim/sessions/{id}/drop_room", _drop_room)
    app.router.add_post("/sim/sessions/{id}/avatar_leave", _avatar_leave)
    app.router.add_post("/sim/sessions/{id}/expire", _expire)
    app.router.add_get("/sim/faults", _faults)
    app.router.add_post("/sim/faults", _add_fault)
    app.router.add_delete("/sim/faults", _clear_faults)
    app.router.add_delete("/sim/faults/{id}", _remove_fault)

    # Sessions end (and say so in their rooms) before the LiveKit server's own shutdown
    # closes the rooms: signals run in the order they were added.
    app.on_shutdown.append(_stop_sessions)
    livekit.add_routes(app)
    app.router.add_get("/", _livekit_root)
    app.cleanup_ctx.append(_lifecycle(owned))
    return app


async def _stop_sessions(app: web.Application) -> None:
    app[FAULTS].release()
    await app[BOOK].close_all("shutdown")


def _lifecycle(owns_ledger: bool) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        yield
        # Also here: an app that never served (startup failed) skips on_shutdown.
        await app[BOOK].close_all("shutdown")
        await app[LIVEKIT].close()
        if owns_ledger:
            app[LEDGER].close()

    return lifecycle


async def _livekit_root(request: web.Request) -> web.Response:
    """``GET|HEAD /``: a LiveKit server answers "OK" to anyone. livekit-client's
    ``Room.prepareConnection`` (which HeyGen's SDK calls first) fetches it from the app's page
    to warm the connection up; without an answer the console shows a CORS error."""
    return web.Response(text="OK", headers={"Access-Control-Allow-Origin": "*"})


# -- admin handlers ---------------------------------------------------------------------------


async def _ledger(request: web.Request) -> web.Response:
    ledger = request.app[LEDGER]
    provider = request.query.get("provider")
    if provider is not None and provider not in {str(p) for p in Provider}:
        raise AdminError(400, "bad_request", f"provider must be heygen or liveavatar, "
                                             f"got {provider!r}")
    open_only = request.query.get("open", "").lower() in ("1", "true", "yes")
    everything = ledger.entries(provider=provider)
    shown = [e for e in everything if e.open] if open_only else everything
    return web.json_response({"open": sum(1 for e in everything if e.open),
                              "total": len(everything),
                              "sessions": [e.to_dict() for e in shown]})


def _describe(session: SimSession, request: web.Request) -> dict[str, Any]:
    loop_now = asyncio.get_running_loop().time()
    deadline, reason = session.deadline(request.app[SIM_SETTINGS])
    room = session.room
    avatar = room.avatar if room is not None else None
    return {
        "session_id": session.id, "provider": str(session.provider),
        "state": str(session.state), "avatar_id": session.avatar_id,
        "quality": session.quality.name, "video_codec": session.video_codec,
        "mode": session.mode, "idle_timeout": session.idle_timeout,
        "duration_limit": session.duration_limit, "stop_reason": session.stop_reason,
        "ends_in": round(deadline - loop_now, 3) if session.is_open else None,
        "ends_by": reason if session.is_open else None,
        "room": None if room is None else {
            "name": room.name, "clients": room.clients, "avatar": avatar is not None,
            "speaking": avatar.speaking if avatar is not None else False,
            "listening": room.listening, "mic_frames": room.mic_frames,
            "mic_peak": room.mic_peak,
        },
    }


def _find(request: web.Request) -> SimSession:
    book = request.app[BOOK]
    session_id = request.match_info["id"]
    for provider in Provider:
        session = book.get(session_id, provider)
        if session is not None:
            return session
    raise AdminError(404, "not_found", f"no session {session_id}")


def _live(request: web.Request) -> SimSession:
    session = _find(request)
    if not session.is_open:
        raise AdminError(409, "conflict", f"session {session.id} is {session.state}")
    return session


async def _sessions(request: web.Request) -> web.Response:
    return web.json_response({"sessions": [_describe(s, request)
                                           for s in request.app[BOOK].open_sessions()]})


async def _session(request: web.Request) -> web.Response:
    return web.json_response(_describe(_find(request), request))


async def _drop_room(request: web.Request) -> web.Response:
    session = _live(request)
    if session.room is None:
        raise AdminError(409, "conflict", f"session {session.id} has no room yet")
    dropped = session.room.clients
    await session.room.drop_clients()
    logger.info("fault: session %s room dropped (%s)", session.id, ", ".join(dropped) or "empty")
    return web.json_response({"session_id": session.id, "dropped": dropped})


async def _avatar_leave(request: web.Request) -> web.Response:
    session = _live(request)
    avatar = session.room.avatar if session.room is not None else None
    if avatar is None:
        raise AdminError(409, "conflict", f"session {session.id} has no avatar in its room")
    await avatar.leave()
    logger.info("fault: session %s avatar left", session.id)
    return web.json_response({"session_id": session.id, "avatar": False})


async def _expire(request: web.Request) -> web.Response:
    session = _live(request)
    await request.app[BOOK].stop(session, "expired")
    entry = request.app[LEDGER].get(session.id)
    return web.json_response(entry.to_dict() if entry is not None else {"session_id": session.id})


async def _faults(request: web.Request) -> web.Response:
    board = request.app[FAULTS]
    return web.json_response({"faults": [f.to_dict() for f in board.list()],
                              "endpoints": sorted(board.endpoints)})


async def _add_fault(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdminError(400, "bad_request", "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise AdminError(400, "bad_request", "the body must be a JSON object")
    unknown = set(body) - {"endpoint", "kind", "session_id", "status", "seconds", "times"}
    if unknown:
        raise AdminError(400, "bad_request", f"unknown fields: {', '.join(sorted(unknown))}")
    try:
        fault = request.app[FAULTS].add(
            _typed(body, "endpoint", str, required=True), _typed(body, "kind", str, required=True),
            session_id=_typed(body, "session_id", str), status=_typed(body, "status", int),
            seconds=_typed(body, "seconds", float), times=_typed(body, "times", int))
    except FaultError as exc:
        raise AdminError(400, "bad_request", str(exc)) from None
    logger.info("fault %s armed: %s", fault.id, fault.to_dict())
    return web.json_response(fault.to_dict(), status=201)


def _typed(body: dict[str, Any], name: str, kind: type[Any], *, required: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise AdminError(400, "bad_request", f"'{name}' is required")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
        raise AdminError(400, "bad_request", f"'{name}' must be {kind.__name__}")
    return float(value) if kind is float else value


async def _clear_faults(request: web.Request) -> web.Response:
    request.app[FAULTS].clear(request.query.get("session_id"))
    return web.Response(status=204)


async def _remove_fault(request: web.Request) -> web.Response:
    if not request.app[FAULTS].remove(request.match_info["id"]):
        raise AdminError(404, "not_found", f"no fault {request.match_info['id']}")
    return web.Response(status=204)
