"""The aiohttp application: routes, middlewares (errors → HTTP once, CORS, auth, metrics),
typed state, and the lifecycle that closes every session on shutdown."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

from .api import catalog, forward, ops, persona, sessions, tokens, whep
from .api.common import (
    CHAT,
    LIFECYCLE,
    METRICS,
    PERSONAS,
    PRINCIPAL,
    SESSIONS,
    SETTINGS,
    TOKENS,
    Lifecycle,
)
from .api.openapi import setup_openapi
from .api.persona import SEED_SESSIONS, SeedSessions
from .auth import OPEN, bearer, check, required_role
from .config import Settings
from .errors import GatewayError, RateLimited, Unauthorized
from .loop_load import LoopLoad
from .ratelimit import RateLimiter, retry_after
from .services import Services
from .viewers.aiortc_hooks import configure_ice_host_addresses

logger = logging.getLogger(__name__)

RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"

_API_PREFIXES = ("/v1/", "/persona", "/openai")
"""The gateway REST + WHEP (``/v1/``) and the seed server's JSON API."""
_SEED_PREFIXES = ("/persona", "/openai")
_EXPOSE = "Location, ETag, Link, Accept-Patch, Retry-After"
_PREFLIGHT_HEADERS = {
    "Access-Control-Allow-Methods": "GET, POST, PATCH, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match, Last-Event-ID",
    "Access-Control-Max-Age": "86400",
}


def _error_response(request: web.Request, status: int, code: str,
                    message: str) -> web.Response:
    """One error shape per API: the seed's ``{success, message, error}`` on its own paths, so
    its clients work unchanged (``error`` is the seed's "detailed error information": the
    code, then what went wrong); ``{"error": {code, message}}`` everywhere else."""
    if request.path.startswith(_SEED_PREFIXES):
        return web.json_response({"success": False, "message": message,
                                  "error": f"{code}: {message}"}, status=status)
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _allowed_origin(request: web.Request) -> str | None:
    origins = request.app[SETTINGS].cors_origins
    if "*" in origins:
        return "*"
    origin = request.headers.get("Origin")
    return origin if origin in origins else None


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[METRICS]
    route = request.match_info.route.resource
    template = route.canonical if route is not None else "unmatched"
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        metrics.http_requests.labels(template, request.method, str(status)).inc()
        metrics.http_duration.labels(template, request.method).observe(
            time.perf_counter() - started)


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """CORS for the APIs (browsers on other origins play WHEP and read Location/ETag).

    ``AVATAR_GATEWAY_CORS_ORIGINS`` restricts which origins may; the default allows any, as the
    seed server did."""
    if not request.path.startswith(_API_PREFIXES):
        return await handler(request)
    origin = _allowed_origin(request)
    allow = {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": _EXPOSE,
             "Vary": "Origin"} if origin else {"Vary": "Origin"}
    if request.method == "OPTIONS":
        headers = {**_PREFLIGHT_HEADERS, **allow}
        if request.path.endswith("/whep"):
            headers["Accept-Post"] = "application/sdp"
        elif "/whep/" in request.path:
            headers["Accept-Patch"] = "application/trickle-ice-sdpfrag"
        return web.Response(status=204, headers=headers)
    response = await handler(request)
    response.headers.update(allow)
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place exceptions become HTTP responses, all as ``{"error": {code, message}}``."""
    try:
        return await handler(request)
    except GatewayError as exc:
        response = _error_response(request, exc.status, exc.code, exc.message)
        if exc.retry_after is not None:
            response.headers["Retry-After"] = str(int(exc.retry_after))
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 413:
            message = f"the body is larger than {request.app[SETTINGS].max_body_bytes} bytes"
        response = _error_response(request, exc.status, code, message)
        for name in ("Allow", "Retry-After"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except ConnectionResetError:
        # The client hung up (or the connection guard cut a slow body) while its request was
        # read: nobody is left to answer, and nothing went wrong on our side.
        logger.debug("client left during %s %s", request.method, request.path)
        return _error_response(request, 400, "client_gone", "the connection was lost while "
                                                             "the request was read")
    except Exception:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return _error_response(request, 500, "internal_error", "internal server error")


@web.middleware
async def rate_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Before authentication, so a flood of bad tokens is limited too. Keyed by the peer
    address (behind a proxy: the proxy's; limit per client there)."""
    limiter = request.app[RATE_LIMITER]
    if limiter.enabled and required_role(request) is not None:
        client = request.remote or "unknown"
        cluster = request.app[SESSIONS].cluster  # replicas share one budget per client
        shared = await cluster.take_rate(client, limiter.rate, limiter.burst) if cluster else None
        wait = limiter.take(client) if shared is None else shared
        if wait > 0:
            raise RateLimited(f"too many requests: at most {limiter.rate:g} per second "
                              f"(bursts of {limiter.burst:g}) from one client",
                              retry_after=retry_after(wait))
    return await handler(request)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Resolve the bearer token to a principal and check it against the route's role, once,
    before any handler runs (``gateway/auth.py`` holds the table)."""
    needed = required_role(request)
    if needed is None:
        request[PRINCIPAL] = OPEN
    else:
        principal = request.app[TOKENS].principal(bearer(request))
        cluster = request.app[SESSIONS].cluster  # revoked on another replica?
        if principal.token_id and cluster and await cluster.is_revoked(principal.token_id):
            raise Unauthorized("the token has been revoked")
        check(principal, needed, request)
        request[PRINCIPAL] = principal
    return await handler(request)


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB_ROOT / "index.html")


def create_app(settings: Settings | None = None) -> web.Application:
    settings = settings or Settings.from_env()
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[metrics_middleware, cors_middleware, error_middleware, rate_limit_middleware,
                     auth_middleware, forward.forward_middleware],
    )
    services = Services.build(settings)
    app[SETTINGS] = settings
    app[METRICS] = services.metrics
    app[LIFECYCLE] = Lifecycle()
    app[TOKENS] = services.tokens
    app[RATE_LIMITER] = services.rate_limiter
    app[SESSIONS] = services.sessions
    app[PERSONAS] = services.personas
    app[CHAT] = services.chat
    app[SEED_SESSIONS] = SeedSessions()
    configure_ice_host_addresses(settings.ice_host_addresses)

    app.add_routes(ops.routes)
    app.add_routes(catalog.routes)
    app.add_routes(sessions.routes)
    app.add_routes(whep.routes)
    app.add_routes(tokens.routes)
    app.add_routes(persona.routes)
    setup_openapi(app)
    app.router.add_get("/", _index)
    if WEB_ROOT.is_dir():
        app.router.add_static("/web/", WEB_ROOT, follow_symlinks=False)

    app.on_shutdown.append(_drain)
    # Cleaned up in reverse: the seed API forgets its sessions after they have all closed.
    app.cleanup_ctx.append(persona.sweep_seed_sessions)
    app.cleanup_ctx.append(functools.partial(_run_services, services))
    if services.cluster is not None:
        app.cleanup_ctx.append(forward.forward_client)
    app.cleanup_ctx.append(_loop_lag_monitor)
    app.cleanup_ctx.append(_viewer_stats_sampler)
    return app


async def _drain(app: web.Application) -> None:
    """Readiness goes 503 first, then every session (viewers, hub, upstream) is closed."""
    app[LIFECYCLE].draining = True
    app[METRICS].ready.set(0)
    await app[SESSIONS].close_all("shutdown")


async def _loop_lag_monitor(app: web.Application) -> AsyncIterator[None]:
    """The loop's timer lateness, and its busy share (measured from start-up, so admission
    control has a history by the first viewer)."""
    histogram = app[METRICS].loop_lag
    busy = app[METRICS].loop_busy.labels("main")
    period = 0.25
    load = LoopLoad.install(asyncio.get_running_loop())

    async def measure() -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(period)
            histogram.observe(max(0.0, loop.time() - started - period))
            if load is not None:
                busy.set(round(load.busy(), 3))

    task = asyncio.get_running_loop().create_task(measure(), name="loop-lag-monitor")
    yield
    task.cancel()
    await asyncio.wait([task])


async def _viewer_stats_sampler(app: web.Application) -> AsyncIterator[None]:
    """Every ``stats_interval``: each viewer's RTP counters and RTT into the metrics."""
    registry, interval = app[SESSIONS], app[SETTINGS].stats_interval

    async def sample_all() -> None:
        # A function of its own: its locals (the last viewer) are gone while the loop sleeps.
        if registry.workers is not None:
            await registry.workers.sample_stats()  # each worker samples its own viewers
        for session in registry.list():
            for viewer in session.audience.viewers():
                try:
                    await viewer.sample_stats()
                except Exception:  # a viewer closing under us; the next sample is fine
                    logger.debug("viewer stats sample failed", exc_info=True)

    async def sample() -> None:
        while True:
            await asyncio.sleep(interval)
            await sample_all()

    task = asyncio.get_running_loop().create_task(sample(), name="viewer-stats-sampler")
    yield
    task.cancel()
    await asyncio.wait([task])


async def _run_services(services: Services, app: web.Application) -> AsyncIterator[None]:
    """Ready once the services run (a killed predecessor's paid sessions stopped)."""
    async with services.running():
        services.metrics.ready.set(1)
        yield
