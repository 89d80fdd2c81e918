"""The OpenAPI 3.1 document of the whole HTTP API, served at ``GET /openapi.json``.

It is written by hand next to the handlers it describes, and ``tests/test_openapi.py`` keeps the
two in step: every route the application registers is documented (and nothing else), and a fuzz
run against the served document finds no 5xx. Limits in the schemas come from the settings, so
the document describes the running gateway, not a default one.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .. import __version__
from ..chat.persona import MAX_ITEMS, MAX_LONG, MAX_SHORT, MAX_YEAR
from ..config import QUALITY_TIERS, Settings
from ..upstream.base import TaskMode, TaskType
from .common import SETTINGS

Schema = dict[str, Any]

OPENAPI_PATH = "/openapi.json"

_GATEWAY = "gateway"
_SEED = "seed"


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: dict[str, Schema], required: tuple[str, ...] = (), *,
         additional: bool = True, **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if not additional:
        schema["additionalProperties"] = False
    schema.update(extra)
    return schema


def _str(**extra: Any) -> Schema:
    return {"type": "string", **extra}


def _strings(max_length: int = MAX_SHORT) -> Schema:
    return {"type": "array", "maxItems": MAX_ITEMS,
            "items": {"type": "string", "minLength": 1, "maxLength": max_length}}


def _json(schema: Schema, description: str = "OK", headers: Schema | None = None) -> Schema:
    response: Schema = {"description": description,
                        "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _body(schema: Schema, required: bool = True, media_type: str = "application/json") -> Schema:
    return {"required": required, "content": {media_type: {"schema": schema}}}


def _op(summary: str, tag: str, responses: Schema, *, api: str = _GATEWAY,
        body: Schema | None = None, params: list[Schema] | None = None,
        description: str | None = None, secured: bool = True) -> Schema:
    op: Schema = {"summary": summary, "tags": [tag], "operationId": _operation_id(summary),
                  "responses": dict(responses)}
    if description:
        op["description"] = description
    if body is not None:
        op["requestBody"] = body
    if params:
        op["parameters"] = params
    # Every error of an API has one shape; ``default`` covers the codes not listed one by one.
    op["responses"]["default"] = {"$ref": f"#/components/responses/{api.title()}Error"}
    if secured:
        op["security"] = [{}, {"bearerAuth": []}]
    return op


def _operation_id(summary: str) -> str:
    words = "".join(c if c.isalnum() else " " for c in summary).split()
    return words[0].lower() + "".join(w.title() for w in words[1:])


SESSION_ID: Schema = {"name": "session_id", "in": "path", "required": True,
                      "schema": {"type": "string"}}
VIEWER_ID: Schema = {"name": "viewer_id", "in": "path", "required": True,
                     "schema": {"type": "string"}}


def _schemas(settings: Settings) -> dict[str, Schema]:
    text = _str(minLength=1, maxLength=settings.max_text_chars)
    short = _str(minLength=1, maxLength=MAX_SHORT)
    year = _str(minLength=1, maxLength=MAX_YEAR, description=(
        "A string, as in the seed's API (\"2016\", \"third year\"); a number is refused."))
    education = {"degree": short, "year": year, "institution": short}
    session_id = {"session_id": _str(description="The id `session/create` returned.")}
    return {
        "Error": _obj({"error": _obj({"code": _str(), "message": _str()}, ("code", "message"))},
                      ("error",)),
        "SeedError": _obj({"success": {"const": False}, "message": _str(), "error": _str()},
                          ("success", "message", "error"), additional=False),
        "Session": _obj({
            "id": _str(), "upstream": _str(enum=["local", "heygen", "liveavatar"]),
            "state": _str(enum=["new", "starting", "live", "closing", "closed"]),
            "quality": _str(enum=list(QUALITY_TIERS)), "width": {"type": "integer"},
            "height": {"type": "integer"}, "viewers": {"type": "integer", "minimum": 0},
            "viewer_failures": {"type": "object", "additionalProperties": {"type": "integer"},
                                "description": (
                "Players that could not connect, by reason: `ice_failed`, `dtls_failed`, "
                "`connect_timeout`.")},
            "last_viewer_failure": _obj({"reason": _str(), "message": _str(),
                                         "at": {"type": "number"}}, ("reason", "message", "at"),
                                        description=(
                "The latest player that could not connect, e.g. \"viewer ICE failed: ...\".")),
            "created_at": {"type": "number"}, "whep_url": _str(), "events_url": _str(),
            "ice_servers": {"type": "array", "items": _ref("IceServer"), "description": (
                "For the player's RTCPeerConnection (the same servers as the WHEP Link headers, "
                "which arrive only after the offer).")},
            "distribution": _str(enum=["whep", "livekit"]),
            "livekit": _obj({"url": _str(), "room": _str(), "token_url": _str()},
                            ("url", "room", "token_url"), description=(
                "With the `livekit` distribution: the operator's LiveKit room the session is "
                "published into, and where a viewer gets a token for it.")),
        }, ("id", "upstream", "state", "quality", "width", "height", "viewers",
            "viewer_failures", "created_at", "whep_url", "events_url", "ice_servers",
            "distribution")),
        "SessionCreate": _obj({
            "upstream": _str(enum=["local", "heygen", "liveavatar"],
                             description="Default: AVATAR_GATEWAY_DEFAULT_UPSTREAM."),
            "quality": _str(enum=list(QUALITY_TIERS)),
            "voice": _str(description="eSpeak voice (local) or provider voice id."),
            "avatar_id": _str(),
            "distribution": _str(enum=["whep", "livekit"], description=(
                "`livekit`: also published into a room of the operator's LiveKit (needs "
                "AVATAR_GATEWAY_LIVEKIT_URL, _API_KEY, _API_SECRET). Default: "
                "AVATAR_GATEWAY_DISTRIBUTION.")),
        }),
        "LiveKitGrant": _obj({
            "url": _str(), "room": _str(), "identity": _str(), "token": _str(),
            "expires_at": {"type": "number"}, "expires_in": {"type": "number"},
            "events_topic": _str(description="Data topic of the session's events (JSON)."),
            "publisher": _str(description="The gateway's identity in the room; it leaves when "
                                          "the session ends."),
            "microphone": {"type": "boolean", "description": (
                "The token may publish a microphone (a controller's, when the session "
                "listens: voice chat); otherwise it only subscribes.")},
        }, ("url", "room", "identity", "token", "expires_at", "expires_in", "events_topic",
            "publisher", "microphone")),
        "Speak": _obj({
            "text": text,
            "task_type": _str(enum=[t.value for t in TaskType], default="repeat"),
            "task_mode": _str(enum=[m.value for m in TaskMode], default="async",
                              description="`sync` answers once the avatar has finished."),
        }, ("text",)),
        "SpeakResult": _obj({
            "task_id": {"type": ["string", "null"], "description": "The (first) utterance's id."},
            "duration_ms": {"type": "number"},
            "task_ids": {"type": "array", "items": _str(),
                         "description": "`talk` answered by the gateway: one task per sentence."},
            "text": _str(description="`talk` answered by the gateway: the answer spoken."),
            "offline": {"type": "boolean", "description": (
                "`talk` answered by the gateway: by its offline responder (no OpenAI key), "
                "not a language model. Show it as a badge; the avatar does not say it.")},
        }, ("task_id", "duration_ms")),
        "Catalog": _obj({
            "default_upstream": _str(), "default_quality": _str(enum=list(QUALITY_TIERS)),
            "qualities": {"type": "array", "items": _obj({
                "id": _str(), "width": {"type": "integer"}, "height": {"type": "integer"},
                "bitrate": {"type": "integer"}}, ("id", "width", "height", "bitrate"))},
            "upstreams": {"type": "array", "items": _obj({
                "kind": _str(enum=["local", "heygen", "liveavatar"]),
                "available": {"type": "boolean"}, "paid": {"type": "boolean"},
                "answers_itself": {"type": "boolean", "description": (
                    "`talk` is answered by the provider's language model, else by the gateway's.")},
                "listens": {"type": "boolean", "description": (
                    "Voice chat works: a controller's microphone reaches the avatar.")},
                "mode": _str(enum=["full", "lite"], description=(
                    "LiveAvatar only: `full` (the provider speaks and answers) or `lite` (the "
                    "gateway speaks; the avatar lip-syncs).")),
                "avatars": {"type": "array", "items": _ref("Named")},
                "voices": {"type": "array", "items": _ref("Named")},
                "default_avatar": _str(), "default_voice": _str(),
            }, ("kind", "available", "paid", "answers_itself", "listens", "avatars", "voices",
                "default_avatar", "default_voice"))},
            "chat": _str(enum=["offline", "openai"], description=(
                "Who answers `talk` for an upstream that does not answer itself: the offline "
                "responder (no OpenAI key) or an OpenAI-compatible model.")),
        }, ("default_upstream", "default_quality", "qualities", "upstreams", "chat")),
        "Named": _obj({"id": _str(), "name": _str()}, ("id", "name")),
        "TokenRequest": _obj({
            "role": _str(enum=["viewer", "controller"], default="viewer"),
            "session_id": _str(description="Required for a viewer token, absent otherwise."),
            "ttl": {"type": "number", "exclusiveMinimum": 0, "maximum": settings.max_token_ttl,
                    "default": settings.viewer_token_ttl, "description": "Lifetime, seconds."},
        }),
        "Token": _obj({
            "token": _str(), "role": _str(enum=["viewer", "controller"]),
            "session_id": {"type": ["string", "null"]}, "expires_at": {"type": "number"},
            "expires_in": {"type": "number"},
            "watch_url": _str(description="The viewer page for this session with this token."),
        }, ("token", "role", "session_id", "expires_at", "expires_in")),
        "Persona": _obj({
            "name": short, "title": short,
            "education": _obj(education, ("degree", "year", "institution"), additional=False),
            "technical": _obj({"languages": _strings(), "webStack": _strings(),
                               "projects": _strings()},
                              ("languages", "webStack", "projects"), additional=False),
            "personality": _obj({"style": _str(minLength=1, maxLength=MAX_LONG),
                                 "interests": _strings(), "goals": _strings()},
                                ("style", "interests", "goals"), additional=False),
            "traits": _strings(),
        }, ("name", "title", "education", "technical", "personality", "traits"),
            additional=False),
        "PersonaDetails": _obj({"name": short, "title": short,
                                "education": _obj(education, additional=False, minProperties=1)},
                               additional=False, minProperties=1,
                               description="Only what changes; `education` may be partial."),
        "IceServer": _obj({"urls": {"type": "array", "items": _str()}, "username": _str(),
                           "credential": _str(), "credentialType": _str()}, ("urls",)),
        "SeedSession": _obj({
            **session_id,
            "sdp": _obj({"type": {"const": "offer"}, "sdp": _str()}, ("type", "sdp")),
            "ice_servers2": {"type": "array", "items": _ref("IceServer")},
            "ice_servers": {"type": "array", "items": _str()},
            "upstream": _str(), "quality": _str(),
        }, ("session_id", "sdp", "ice_servers2"),
            description="`data` of `session/create`: the gateway's offer, HeyGen v1 style."),
        "SeedSessionRef": _obj(session_id, ("session_id",)),
        "SeedTextData": _obj({
            **session_id, "text": _str(), "ai_response": _str(),
            "speaking_duration": {"type": "number"},
            "task_ids": {"type": "array", "items": _str()},
            "offline": {"type": ["boolean", "null"]},
        }, ("session_id", "text", "ai_response", "speaking_duration", "task_ids")),
    }


def _seed_paths(settings: Settings) -> dict[str, Schema]:
    persona = _ref("Persona")
    required_id = _str(minLength=1)
    text = _str(minLength=1, maxLength=settings.max_text_chars)

    def envelope(message: str, **fields: Schema) -> Schema:
        """The seed's success envelope: its message string, exactly, and only its fields."""
        return _obj({"success": {"const": True}, "message": {"const": message}, **fields},
                    ("success", "message", *fields), additional=False)

    def post(summary: str, body: Schema | None, ok: Schema, *, required: bool = True,
             description: str | None = None) -> Schema:
        return {"post": _op(summary, "seed", {"200": _json(ok)}, api=_SEED,
                            body=_body(body, required) if body is not None else None,
                            description=description)}

    candidate = _obj({"candidate": _str(description="`candidate:...` line; empty ends "
                                                    "the candidates."),
                      "sdpMid": {"type": ["string", "null"]},
                      "sdpMLineIndex": {"type": ["integer", "null"], "minimum": 0},
                      "usernameFragment": {"type": ["string", "null"]}}, ("candidate",))
    answer = {"oneOf": [_str(minLength=1),
                        _obj({"type": {"const": "answer"}, "sdp": _str(minLength=1)}, ("sdp",))]}
    return {
        "/persona": {
            "get": _op("Get the persona", "seed", {"200": _json(persona)}, api=_SEED),
            **post("Update the persona's details", _ref("PersonaDetails"),
                   envelope("Persona details updated successfully", persona=persona),
                   description="Changes name, title and/or education; the rest is kept."),
        },
        "/persona/config": {
            "get": _op("Get the persona configuration", "seed", {"200": _json(persona)},
                       api=_SEED),
        },
        "/persona/update": post(
            "Replace the persona configuration", persona,
            envelope("Persona configuration updated successfully", data=persona),
            description="The whole configuration, also accepted wrapped as `{persona: ...}` or "
                        "`{config: ...}`."),
        "/persona/heygen/init": post(
            "Initialize the bot", _obj({}), required=False,
            ok=envelope("Bot initialized successfully",
                        data=_obj({"text": _str(description="A welcome line.")}, ("text",)))),
        "/persona/heygen/session/create": post(
            "Create a seed session", _obj({"avatar_name": _str(), "voice_id": _str(),
                                           "quality": _str(enum=list(QUALITY_TIERS))}),
            envelope("Session created successfully", data=_ref("SeedSession")), required=False,
            description="Starts an avatar session (configured default upstream) and one viewer "
                        "peer connection; `data.sdp` is the gateway's offer (HeyGen v1 style). "
                        "`avatar_name` and `voice_id` apply to cloud upstreams only."),
        "/persona/heygen/session/start": post(
            "Start a seed session", _obj({"session_id": required_id, "sdp": answer},
                                         ("session_id", "sdp")),
            envelope("Session started successfully", data=_ref("SeedSessionRef")),
            description="The browser's SDP answer (a string, as the seed documents it; "
                        "`{type: \"answer\", sdp}` also works); media starts."),
        "/persona/heygen/ice": post(
            "Add an ICE candidate", _obj({"session_id": required_id, "candidate": candidate},
                                         ("session_id", "candidate")),
            envelope("ICE candidate handled successfully", data=_ref("SeedSessionRef"))),
        "/persona/heygen/text": post(
            "Speak text or an AI answer",
            _obj({"session_id": required_id, "text": text,
                  "generate_ai_response": {"type": "boolean", "default": False}},
                 ("session_id", "text")),
            envelope("Text sent successfully", data=_ref("SeedTextData"),
                     ai_response=_str(description="The persona's answer, spoken; `\"\"` without "
                                                  "`generate_ai_response`."),
                     speaking_duration={"type": "number", "minimum": 0,
                                        "description": "Seconds of speech queued."}),
            description="With `generate_ai_response`, the persona's answer is streamed from the "
                        "language model and spoken sentence by sentence as it arrives."),
        "/persona/heygen/session/stop": post(
            "Stop a seed session", _obj({"session_id": required_id}, ("session_id",)),
            envelope("Session stopped successfully", data=_ref("SeedSessionRef")),
            description="Closes the viewer and the upstream session."),
        "/openai": post(
            "Initialize the chat service", _obj({}), required=False,
            ok=envelope("AI service initialized successfully",
                        text=_str(description="A welcome line in the persona's voice."))),
        "/openai/complete": post(
            "Complete a prompt",
            _obj({"prompt": text, "session_id": _str(minLength=1, maxLength=128,
                                                     description="Conversation to continue.")},
                 ("prompt",)),
            envelope("AI response generated successfully", text=_str()),
            description="Without an OpenAI key, the offline responder answers (its text starts "
                        "with `[offline]`; spoken answers go without it)."),
    }


def _gateway_paths(settings: Settings) -> dict[str, Schema]:
    session = _ref("Session")
    base = "/v1/sessions/{session_id}"
    empty = {"description": "OK"}
    sdp = {"application/sdp": {"schema": _str()}}
    return {
        "/v1/sessions": {
            "post": _op("Create a session", "sessions", {"201": _json(session, "Created", {
                "Location": {"schema": _str()}})}, body=_body(_ref("SessionCreate"), False)),
            "get": _op("List sessions", "sessions", {"200": _json(_obj(
                {"sessions": {"type": "array", "items": session}}, ("sessions",)))}),
        },
        "/v1/tokens": {"post": _op(
            "Mint a token", "auth", {"201": _json(_ref("Token"), "Created")},
            body=_body(_ref("TokenRequest")),
            description=("A viewer token watches one session (WHEP, its events, its JSON) until it "
                         "expires; a controller may mint those. A controller token (admin only) "
                         "drives every session. 401: no valid token; 403: a role that may not."))},
        "/v1/tokens/revoke": {"post": _op(
            "Revoke a token", "auth", {"200": _json(_obj({
                "revoked": {"const": True}, "role": _str(enum=["viewer", "controller"]),
                "session_id": {"type": ["string", "null"]}, "expires_at": {"type": "number"}},
                ("revoked", "role", "session_id", "expires_at")))},
            body=_body(_obj({"token": _str(minLength=1)}, ("token",))),
            description=("A minted token is refused from now on (on every replica), until it "
                         "would have expired anyway. A controller revokes viewer tokens; the "
                         "admin also controller tokens. 400 for a token that does not work now "
                         "or a configured one."))},
        "/v1/catalog": {"get": _op(
            "Catalog", "sessions", {"200": _json(_ref("Catalog"))},
            description="Upstreams, their avatars and voices, and the quality tiers.")},
        base: {
            "parameters": [SESSION_ID],
            "get": _op("Get a session", "sessions", {"200": _json(session)}),
            "delete": _op("Delete a session", "sessions", {"200": _json(session)}),
        },
        f"{base}/speak": {"parameters": [SESSION_ID], "post": _op(
            "Speak", "sessions", {"200": _json(_ref("SpeakResult"))}, body=_body(_ref("Speak")))},
        f"{base}/interrupt": {"parameters": [SESSION_ID], "post": _op(
            "Interrupt", "sessions", {"200": _json(_obj(
                {"id": _str(), "interrupted": {"const": True}}, ("id", "interrupted")))})},
        f"{base}/keep-alive": {"parameters": [SESSION_ID], "post": _op(
            "Keep alive", "sessions", {"200": _json(_obj(
                {"id": _str(), "kept_alive": {"const": True}}, ("id", "kept_alive")))})},
        f"{base}/listen": {"parameters": [SESSION_ID], "post": _op(
            "Listen", "sessions", {"200": _json(_obj(
                {"id": _str(), "listening": {"type": "boolean"}}, ("id", "listening")))},
            body=_body(_obj({"listening": {"type": "boolean"}}, ("listening",))))},
        f"{base}/events": {"parameters": [SESSION_ID], "get": _op(
            "Stream events", "sessions",
            {"200": {"description": "Server-sent events (`id`, `event`, `data`: one JSON event "
                                    "in HeyGen's shape); comments keep the stream alive.",
                     "content": {"text/event-stream": {"schema": _str()}}}},
            params=[{"name": "Last-Event-ID", "in": "header", "required": False,
                     "schema": _str(pattern="^[0-9]+$")},
                    {"name": "last_event_id", "in": "query", "required": False,
                     "schema": _str(pattern="^[0-9]+$")}])},
        f"{base}/livekit-token": {"parameters": [SESSION_ID], "post": _op(
            "Mint a LiveKit viewer token", "sessions", {"201": _json(_ref("LiveKitGrant"),
                                                                     "Created")},
            description=("For a session with the `livekit` distribution (409 otherwise): a "
                         "subscribe-only token for its room in the operator's LiveKit (no "
                         "tracks, no data). A viewer token of the session may ask."))},
        f"{base}/whep": {"parameters": [SESSION_ID], "post": _op(
            "Create a WHEP viewer", "whep",
            {"201": {"description": "The SDP answer (WHEP).", "content": sdp, "headers": {
                "Location": {"schema": _str()}, "ETag": {"schema": _str()},
                "Link": {"schema": _str(), "description": "ICE servers, rel=\"ice-server\"."}}}},
            body={"required": True, "content": sdp})},
        f"{base}/whep/{{viewer_id}}": {
            "parameters": [SESSION_ID, VIEWER_ID],
            "patch": _op(
                "Trickle ICE", "whep", {"204": {"description": "Candidates added."}},
                body={"required": True, "content": {
                    "application/trickle-ice-sdpfrag": {"schema": _str()}}},
                params=[{"name": "If-Match", "in": "header", "required": False,
                         "schema": _str()}],
                description="RFC 8840 fragment; an ICE restart is refused with 422."),
            "delete": _op("Delete a WHEP viewer", "whep", {"200": empty}),
        },
        "/livez": {"get": _op("Liveness", "ops", {"200": _json(_obj(
            {"status": {"const": "ok"}}, ("status",)))}, secured=False)},
        "/readyz": {"get": _op("Readiness", "ops", {
            "200": _json(_ref("Readiness")), "503": _json(_ref("Readiness"), "Not ready")},
            secured=False)},
        "/metrics": {"get": _op("Prometheus metrics", "ops", {"200": {
            "description": "Prometheus text exposition format.",
            "content": {"text/plain": {"schema": _str()}}}}, secured=False)},
        OPENAPI_PATH: {"get": _op("OpenAPI document", "ops", {"200": _json(
            {"type": "object"}, "This document.")}, secured=False)},
    }


def build_document(settings: Settings) -> Schema:
    schemas = _schemas(settings)
    schemas["Readiness"] = _obj({"status": _str(enum=["ok", "unavailable"]),
                                 "reasons": {"type": "array", "items": _str()},
                                 "sessions": {"type": "integer"},
                                 "full": {"type": "boolean", "description": (
                                     "At the session limit: still ready for the open sessions; "
                                     "one more is a 429.")}},
                                ("status", "reasons", "sessions", "full"))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "avatar-gateway",
            "version": __version__,
            "description": "One streaming avatar, many browsers. Gateway REST and WHEP under "
                           "`/v1/`, the seed server's JSON API under `/persona` and `/openai`, "
                           "and operations endpoints. Errors are `{error: {code, message}}`, "
                           "except on the seed API: `{success: false, message, error}`.",
        },
        "tags": [{"name": "sessions"}, {"name": "whep"}, {"name": "seed"}, {"name": "ops"}],
        "paths": {**_gateway_paths(settings), **_seed_paths(settings)},
        "components": {
            "schemas": schemas,
            "responses": {
                "GatewayError": _json(_ref("Error"), "Error (`code` names the kind, e.g. "
                                                     "`bad_request`, `not_found`)."),
                "SeedError": _json(_ref("SeedError"), "Error in the seed API's envelope."),
            },
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer",
                "description": "Required on `/v1/`, `/persona` and `/openai` when "
                               "AVATAR_GATEWAY_API_TOKEN is set; EventSource may pass "
                               "`?access_token=` instead."}},
        },
    }


DOCUMENT = web.AppKey("openapi_document", dict[str, Any])


async def _serve(request: web.Request) -> web.Response:
    return web.json_response(request.app[DOCUMENT])


def setup_openapi(app: web.Application) -> None:
    """Serve the document at ``GET /openapi.json``, built once from the app's settings."""
    app[DOCUMENT] = build_document(app[SETTINGS])
    app.router.add_get(OPENAPI_PATH, _serve)
