"""WHEP endpoints (draft-ietf-wish-whep; HTTP rules shared with WHIP, RFC 9725): POST offer,
PATCH trickle, DELETE."""

from __future__ import annotations

from aiohttp import web

from ..auth import Role
from ..errors import BadRequest, PreconditionFailed, Saturated, UnsupportedMediaType
from ..media.ladder import rung_for_height
from ..viewers.whep import SDP_TYPE, SDPFRAG_TYPE, link_headers, parse_sdpfrag
from .common import METRICS, SESSIONS, SETTINGS, client_key, principal

routes = web.RouteTableDef()


def _text_body(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8 text") from None


def _rung(request: web.Request, height: int) -> int:
    """``?max_height=360``: the viewer's video is never taller (a phone's small screen, a
    metered link); the best rung of the quality ladder that fits, the smallest if none does."""
    value = request.query.get("max_height")
    if value is None:
        return 0
    if not value.isdigit() or not 0 < int(value) <= 10_000:
        raise BadRequest("max_height must be a positive number of pixels, e.g. 360")
    return rung_for_height(height, int(value))


@routes.post("/v1/sessions/{session_id}/whep")
async def create_viewer(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    if request.content_type != SDP_TYPE:
        metrics.viewer_sessions.labels("bad_request").inc()
        raise UnsupportedMediaType(f"a WHEP offer must be sent as {SDP_TYPE}, "
                                   f"not {request.content_type or 'no Content-Type'}")
    session = request.app[SESSIONS].get(request.match_info["session_id"])
    rung = _rung(request, session.upstream.video_size[1])
    offer = _text_body(await request.read())
    try:
        # Only a controller's microphone reaches the avatar; a viewer's offer is answered
        # receive-only whatever it offers.
        viewer, answer = await session.audience.add_viewer(
            offer, microphone=principal(request).role >= Role.CONTROLLER, client=client_key(request),
            rung=rung)
    except BadRequest:
        metrics.viewer_sessions.labels("bad_sdp").inc()
        raise
    except Saturated:
        metrics.viewer_sessions.labels("saturated").inc()
        raise
    metrics.viewer_sessions.labels("created").inc()
    settings = request.app[SETTINGS]
    headers = {
        "Content-Type": SDP_TYPE,
        "Location": f"/v1/sessions/{session.id}/whep/{viewer.id}",
        "ETag": f'"{viewer.etag}"',
        # Dropped from the final RFC, still read by some players (MediaMTX keeps it too).
        "Accept-Patch": SDPFRAG_TYPE,
    }
    response = web.Response(status=201, text=answer, headers=headers)
    response.content_type = SDP_TYPE
    for link in link_headers(settings.ice_servers, settings.ice_username,
                             settings.ice_credential.reveal()):
        response.headers.add("Link", link)
    return response


@routes.patch("/v1/sessions/{session_id}/whep/{viewer_id}")
async def patch_viewer(request: web.Request) -> web.Response:
    session = request.app[SESSIONS].get(request.match_info["session_id"])
    viewer = session.audience.viewer(request.match_info["viewer_id"])
    if request.content_type != SDPFRAG_TYPE:
        raise UnsupportedMediaType(f"trickle ICE must be sent as {SDPFRAG_TYPE}, "
                                   f"not {request.content_type or 'no Content-Type'}")
    # WHIP (RFC 9725) 4.3.1, which WHEP follows: If-Match names the ICE session; "*" is used by ICE restarts.
    if_match = request.headers.get("If-Match")
    if if_match not in (None, "*", f'"{viewer.etag}"', viewer.etag):
        raise PreconditionFailed("If-Match does not match this viewer's ETag")
    fragment = parse_sdpfrag(_text_body(await request.read()))
    await viewer.add_candidates(fragment)
    return web.Response(status=204)


@routes.delete("/v1/sessions/{session_id}/whep/{viewer_id}")
async def delete_viewer(request: web.Request) -> web.Response:
    session = request.app[SESSIONS].get(request.match_info["session_id"])
    viewer = session.audience.viewer(request.match_info["viewer_id"])
    await viewer.close("delete")
    return web.Response(status=200)
