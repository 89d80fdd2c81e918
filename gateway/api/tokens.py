"""``POST /v1/tokens``: the gateway's own create_token. A backend holding a controller (or
admin) token mints what a browser gets: a viewer token for one session (a share link), or,
with the admin token, a short-lived controller token. Never a vendor key.

``POST /v1/sessions/{id}/livekit-token``: what a viewer needs to watch through the operator's
LiveKit instead (the ``livekit`` distribution)."""

from __future__ import annotations

import secrets
import time
from datetime import timedelta

from aiohttp import web

from .. import livekit_out
from ..auth import Role
from ..errors import BadRequest, Conflict, Forbidden, Unauthorized
from .common import SESSIONS, SETTINGS, TOKENS, optional_str, principal, read_json

routes = web.RouteTableDef()


@routes.post("/v1/tokens")
async def mint_token(request: web.Request) -> web.Response:
    data = await read_json(request)
    settings, authority = request.app[SETTINGS], request.app[TOKENS]
    role_name = optional_str(data, "role") or "viewer"
    if role_name not in ("viewer", "controller"):
        raise BadRequest(f"'role' must be viewer or controller, not {role_name!r}")
    role = Role[role_name.upper()]
    if role is Role.CONTROLLER and principal(request).role < Role.ADMIN:
        raise Forbidden("only the admin token may mint controller tokens")
    ttl = data.get("ttl", settings.viewer_token_ttl)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= authority.max_ttl:
        raise BadRequest(f"'ttl' must be a number of seconds in (0, {authority.max_ttl:g}]")
    session_id = optional_str(data, "session_id")
    if role is Role.VIEWER:
        if session_id is None:
            raise BadRequest("a viewer token is for one session: 'session_id' is required")
        request.app[SESSIONS].get(session_id)  # 404 for an unknown session
    elif session_id is not None:
        raise BadRequest("a controller token is for every session: leave out 'session_id'")
    token, expires = authority.mint(role, session_id, float(ttl))
    body: dict[str, object] = {"token": token, "role": role.label, "session_id": session_id,
                               "expires_at": round(expires, 3), "expires_in": float(ttl)}
    if session_id is not None:
        # In the fragment: it never reaches a server log or a Referer header.
        body["watch_url"] = f"/web/viewer.html?session={session_id}#token={token}"
    return web.json_response(body, status=201)


@routes.post("/v1/tokens/revoke")
async def revoke_token(request: web.Request) -> web.Response:
    """``{"token": "..."}``: that minted token is refused from now on, on every replica. A
    controller revokes viewer tokens (a share link that leaked); controller tokens need the
    admin token."""
    data = await read_json(request)
    token = optional_str(data, "token")
    if not token:
        raise BadRequest("'token' (the minted token to revoke) is required")
    authority = request.app[TOKENS]
    try:
        target = authority.principal(token)
    except Unauthorized as exc:
        raise BadRequest(f"that is not a token that works now: {exc.message}") from None
    if target.token_id is None or target.expires is None:
        raise BadRequest("configured tokens (API_TOKEN, ADMIN_TOKEN) cannot be revoked: "
                         "change them")
    if target.role >= Role.CONTROLLER and principal(request).role < Role.ADMIN:
        raise Forbidden("only the admin token may revoke controller tokens")
    authority.revoke(target)
    cluster = request.app[SESSIONS].cluster
    if cluster is not None:
        await cluster.revoke(target.token_id, target.expires)
    return web.json_response({"revoked": True, "role": target.role.label,
                              "session_id": target.session_id,
                              "expires_at": round(target.expires, 3)})


@routes.post("/v1/sessions/{session_id}/livekit-token")
async def mint_livekit_token(request: web.Request) -> web.Response:
    """Watch a ``livekit``-distributed session through the operator's LiveKit: a
    subscribe-only token for its room (no data), for livekit-client or any SDK. A controller's
    token may also publish a microphone when the session listens (voice chat)."""
    settings = request.app[SETTINGS]
    session = request.app[SESSIONS].get(request.match_info["session_id"])
    if session.livekit_room is None:
        raise Conflict(f"session {session.id} is not published to LiveKit (its distribution "
                       f"is {session.distribution!r}): watch it over WHEP")
    ttl = min(settings.viewer_token_ttl, settings.max_token_ttl)
    identity = f"viewer-{secrets.token_hex(6)}"
    microphone = principal(request).role >= Role.CONTROLLER and session.upstream.listens
    token = livekit_out.viewer_token(settings, session.id, identity, timedelta(seconds=ttl),
                                     microphone=microphone)
    return web.json_response({
        "url": settings.livekit_url, "room": session.livekit_room, "identity": identity,
        "token": token, "expires_at": round(time.time() + ttl, 3), "expires_in": ttl,
        "events_topic": livekit_out.EVENTS_TOPIC,
        "publisher": livekit_out.PUBLISHER_IDENTITY, "microphone": microphone}, status=201)
