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
    """503 while draining, so load balancers stop sending. A gateway at its session limit stays
    ready: its open sessions' viewers and controllers must still reach it (``full`` says so,
    and creating one more session is a 429)."""
    sessions = request.app[SESSIONS]
    settings = request.app[SETTINGS]
    ready = not request.app[LIFECYCLE].draining
    body = {"status": "ok" if ready else "unavailable",
            "reasons": [] if ready else ["draining"],
            "sessions": len(sessions), "full": len(sessions) >= settings.max_sessions}
    return web.json_response(body, status=200 if ready else 503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    registry = request.app[METRICS].registry
    response = web.Response(body=generate_latest(registry))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
