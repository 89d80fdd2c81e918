"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .common import LIFECYCLE, METRICS, SESSIONS, SETTINGS

routes = web.RouteTableDef()


@routes.get("/livez")
async def livez(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """503 while draining (so load balancers stop sending) or when no session can be created."""
    sessions = request.app[SESSIONS]
    settings = request.app[SETTINGS]
    reasons = []
    if request.app[LIFECYCLE].draining:
        reasons.append("draining")
    if len(sessions) >= settings.max_sessions:
        reasons.append("session limit reached")
    ready = not reasons
    request.app[METRICS].ready.set(1 if ready else 0)
    body = {"status": "ok" if ready else "unavailable", "reasons": reasons,
            "sessions": len(sessions)}
    return web.json_response(body, status=200 if ready else 503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    registry = request.app[METRICS].registry
    response = web.Response(body=generate_latest(registry))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
