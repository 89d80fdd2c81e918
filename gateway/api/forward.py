"""Requests for a session another replica holds (``gateway.cluster``).

A WHEP offer is redirected (307, which WHEP allows: the player then talks to the owner, where
its peer connection lives); every other session route is forwarded to the owner and its answer
relayed, streamed for the event stream. The token was checked here and is checked again there
(replicas share their token secret). A forwarded request is never forwarded again.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from ..errors import UpstreamUnavailable
from .common import SESSIONS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

FORWARDED = "X-Avatar-Gateway-Forwarded"
HTTP = web.AppKey("forward_http", aiohttp.ClientSession)
_REQUEST_HEADERS = ("Authorization", "Content-Type", "Accept", "Last-Event-ID", "If-Match")
_RESPONSE_HEADERS = ("Content-Type", "Location", "ETag", "Link", "Retry-After",
                     "Cache-Control")


async def forward_client(app: web.Application) -> AsyncIterator[None]:
    """The HTTP client that talks to the other replicas (only with a cluster)."""
    timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_read=None)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        app[HTTP] = http
        yield


@web.middleware
async def forward_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    session_id = request.match_info.get("session_id")
    cluster = request.app[SESSIONS].cluster
    if (session_id is None or cluster is None or FORWARDED in request.headers
            or request.app[SESSIONS].find(session_id) is not None):
        return await handler(request)
    remote = await cluster.remote(session_id)
    if remote is None:
        return await handler(request)  # nobody has it: the handler's 404
    target = remote.url.rstrip("/") + request.path_qs
    if request.method == "POST" and request.path.endswith("/whep"):
        raise web.HTTPTemporaryRedirect(target)
    return await _relay(request, target, remote.owner)


async def _relay(request: web.Request, target: str, owner: str) -> web.StreamResponse:
    headers = {name: request.headers[name] for name in _REQUEST_HEADERS
               if name in request.headers}
    headers[FORWARDED] = "1"
    body = await request.read() if request.can_read_body else None
    try:
        upstream = await request.app[HTTP].request(request.method, target, headers=headers,
                                                   data=body, allow_redirects=False)
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailable(f"replica {owner}, which holds this session, cannot be "
                                  f"reached: {exc}") from None
    async with upstream:
        out_headers = {name: upstream.headers[name] for name in _RESPONSE_HEADERS
                       if name in upstream.headers}
        response = web.StreamResponse(status=upstream.status, headers=out_headers)
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError, aiohttp.ClientError):
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        await response.write_eof()
        return response
