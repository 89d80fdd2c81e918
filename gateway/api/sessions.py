"""Controller REST API: create, list, inspect, speak, interrupt, delete; SSE event stream."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from ..audience import VIEWER_FAILURES
from ..config import Settings
from ..conversation import SpokenAnswer
from ..errors import BadRequest
from ..sessions import Session
from ..upstream.base import TaskMode, TaskType
from ..viewers.whep import browser_ice_servers
from .common import (
    CHAT,
    SESSIONS,
    SETTINGS,
    client_key,
    optional_str,
    read_json,
    required_str,
)

routes = web.RouteTableDef()

SSE_KEEPALIVE = 15.0


def session_json(session: Session, settings: Settings) -> dict[str, Any]:
    """A session as the API shows it."""
    width, height = session.upstream.video_size
    return {
        "id": session.id,
        "upstream": session.upstream.kind,
        "state": str(session.state),
        "quality": session.quality.name,
        "width": width,
        "height": height,
        "viewers": len(session.audience),
        # Players that could not connect: the first thing to look at when a page stays black.
        "viewer_failures": dict(session.audience.failures),
        **({"last_viewer_failure": {"reason": last[0], "message": VIEWER_FAILURES[last[0]],
                                    "at": last[1]}}
           if (last := session.audience.last_failure) is not None else {}),
        "created_at": session.created_at,
        "whep_url": f"/v1/sessions/{session.id}/whep",
        "events_url": f"/v1/sessions/{session.id}/events",
        # What a player's peer connection needs before it offers (TURN behind NAT).
        "ice_servers": browser_ice_servers(settings.ice_servers, settings.ice_username,
                                           settings.ice_credential.reveal()),
        "distribution": session.distribution,
        **({"livekit": {"url": settings.livekit_url, "room": session.livekit_room,
                        "token_url": f"/v1/sessions/{session.id}/livekit-token"}}
           if session.livekit_room is not None else {}),
    }


@routes.post("/v1/sessions")
async def create_session(request: web.Request) -> web.Response:
    data = await read_json(request, required=False)
    session = await request.app[SESSIONS].create(
        upstream=optional_str(data, "upstream"),
        quality=optional_str(data, "quality"),
        voice=optional_str(data, "voice"),
        avatar_id=optional_str(data, "avatar_id"),
        distribution=optional_str(data, "distribution"),
    )
    return web.json_response(session_json(session, request.app[SETTINGS]), status=201,
                             headers={"Location": f"/v1/sessions/{session.id}"})


@routes.get("/v1/sessions")
async def list_sessions(request: web.Request) -> web.Response:
    settings, registry = request.app[SETTINGS], request.app[SESSIONS]
    listed = [session_json(s, settings) for s in registry.list()]
    if registry.cluster is not None:  # the other replicas' too
        listed += await registry.cluster.remote_sessions()
    return web.json_response({"sessions": listed})


@routes.get("/v1/sessions/{session_id}")
async def get_session(request: web.Request) -> web.Response:
    session = request.app[SESSIONS].get(request.match_info["session_id"])
    return web.json_response(session_json(session, request.app[SETTINGS]))


@routes.delete("/v1/sessions/{session_id}")
async def delete_session(request: web.Request) -> web.Response:
    session = request.app[SESSIONS].get(request.match_info["session_id"])
    await session.close("deleted")
    return web.json_response(session_json(session, request.app[SETTINGS]))


def _enum(cls: type[TaskType] | type[TaskMode], value: str | None, default: str) -> str:
    choice = value or default
    if choice not in {m.value for m in cls}:
        raise BadRequest(f"must be one of {', '.join(m.value for m in cls)}, not {choice!r}")
    return choice


@routes.post("/v1/sessions/{session_id}/speak")
async def speak(request: web.Request) -> web.Response:
    """``repeat`` speaks the text; ``talk`` speaks an answer to it: the provider's own language
    model's (HeyGen, LiveAvatar), or the gateway's chat in the persona's voice, streamed
    sentence by sentence (the talk rule, :mod:`gateway.conversation`)."""
    session = request.app[SESSIONS].get(request.match_info["session_id"])
    data = await read_json(request)
    text = required_str(data, "text")
    try:
        task_type = TaskType(_enum(TaskType, optional_str(data, "task_type"), "repeat"))
        task_mode = TaskMode(_enum(TaskMode, optional_str(data, "task_mode"), "async"))
    except BadRequest as exc:
        raise BadRequest(f"task_type/task_mode {exc.message}") from None
    spoken = await session.conversation.speak(text, task_type, task_mode)
    if isinstance(spoken, SpokenAnswer):
        return web.json_response({
            "task_id": spoken.task_ids[0] if spoken.task_ids else None,
            "duration_ms": spoken.duration_ms,
            "task_ids": list(spoken.task_ids),
            "text": spoken.text,
            # The offline responder answered: the text is not the model's (not spoken as such).
            "offline": request.app[CHAT].offline,
        })
    return web.json_response({"task_id": spoken.task_id, "duration_ms": spoken.duration_ms})


@routes.post("/v1/sessions/{session_id}/interrupt")
async def interrupt(request: web.Request) -> web.Response:
    session = request.app[SESSIONS].get(request.match_info["session_id"])
    await session.conversation.interrupt()
    return web.json_response({"id": session.id, "interrupted": True})


@routes.post("/v1/sessions/{session_id}/keep-alive")
async def keep_alive(request: web.Request) -> web.Response:
    session = request.app[SESSIONS].get(request.match_info["session_id"])
    await session.conversation.keep_alive()
    return web.json_response({"id": session.id, "kept_alive": True})


@routes.post("/v1/sessions/{session_id}/listen")
async def listen(request: web.Request) -> web.Response:
    """``{"listening": true|false}``: the avatar's listening state for voice chat."""
    session = request.app[SESSIONS].get(request.match_info["session_id"])
    data = await read_json(request)
    listening = data.get("listening")
    if not isinstance(listening, bool):
        raise BadRequest("'listening' must be true or false")
    await session.conversation.set_listening(listening)
    return web.json_response({"id": session.id, "listening": listening})


@routes.get("/v1/sessions/{session_id}/events")
async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events. ``Last-Event-ID`` (header or query) replays what was missed.

    Streams are capped per session and per client (address and token): each holds a
    connection and a queue for as long as the client likes, so they are refused (429) before
    anything is sent, rather than left to exhaust the gateway's descriptors."""
    session = request.app[SESSIONS].get(request.match_info["session_id"])
    last = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    try:
        after = int(last) if last else None
    except ValueError:
        raise BadRequest("Last-Event-ID must be an integer") from None
    settings = request.app[SETTINGS]
    subscription = session.events.subscribe(
        after, client=client_key(request), max_total=settings.max_event_streams_per_session,
        max_per_client=settings.max_event_streams_per_client, current_speech=True)
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    })
    await response.prepare(request)
    try:
        while True:
            try:
                async with asyncio.timeout(SSE_KEEPALIVE):
                    item = await anext(subscription)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            except StopAsyncIteration:
                break
            body = json.dumps(item.event.to_dict(), separators=(",", ":"))
            await response.write(f"id: {item.id}\nevent: {item.event.type}\ndata: {body}\n\n".encode())
    except ConnectionResetError:
        pass  # the reader left (or its connection was cut): the stream just ends
    finally:
        subscription.close()
    return response
