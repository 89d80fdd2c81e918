"""``POST /v1/tokens``: the gateway's own create_token. A backend holding a controller (or
admin) token mints what a browser gets: a viewer token for one session (a share link), or,
with the admin token, a short-lived controller token. Never a vendor key."""

from __future__ import annotations

from aiohttp import web

from ..auth import Role
from ..errors import BadRequest, Forbidden
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
