"""Helpers every handler module shares: typed app state keys and request parsing."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncGenerator
from typing import Any

from aiohttp import web

from ..auth import Principal, TokenAuthority, bearer
from ..chat.llm import ChatService
from ..chat.persona import PersonaStore
from ..config import Settings
from ..errors import BadRequest, UnsupportedMediaType
from ..metrics import Metrics
from ..sessions import SessionRegistry

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
SESSIONS = web.AppKey("sessions", SessionRegistry)
TOKENS = web.AppKey("tokens", TokenAuthority)
PRINCIPAL = web.RequestKey("principal", Principal)
PERSONAS = web.AppKey("personas", PersonaStore)
CHAT = web.AppKey("chat", ChatService)


class Lifecycle:
    """Process-wide flags the ops endpoints report."""

    def __init__(self) -> None:
        self.draining = False


LIFECYCLE = web.AppKey("lifecycle", Lifecycle)


async def read_json(request: web.Request, *, required: bool = True) -> dict[str, Any]:
    """The body as a JSON object, or a 4xx that says what is wrong with it."""
    body = await request.read()
    if not body.strip():
        if required:
            raise BadRequest("the request body must be a JSON object")
        return {}
    if request.content_type not in ("application/json", "application/octet-stream", ""):
        raise UnsupportedMediaType(
            f"expected Content-Type application/json, got {request.content_type}")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    return data


def optional_str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"'{key}' must be a string")
    return value


def required_str(data: dict[str, Any], key: str) -> str:
    value = optional_str(data, key)
    if value is None:
        raise BadRequest(f"'{key}' is required")
    return value


async def one_sentence(text: str) -> AsyncGenerator[str, None]:
    """``text`` as a stream of one sentence, for :meth:`Session.speak_sentences`."""
    yield text


def client_key(request: web.Request) -> str:
    """One client, for per-client limits: its address and (a digest of) its token together.
    The token alone is shared by everyone a watch link reached; the address alone by everyone
    behind one NAT."""
    token = hashlib.sha256(bearer(request).encode()).hexdigest()[:16]
    return f"{request.remote or 'unknown'}|{token}"


def principal(request: web.Request) -> Principal:
    """Who is asking (the auth middleware sets it for every request it lets through)."""
    return request[PRINCIPAL]
