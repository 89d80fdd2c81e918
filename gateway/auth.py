"""Who may do what: roles, signed tokens, and the one table that says what each route needs.

Roles, weakest first:

- ``viewer``: watches ONE session (WHEP offer/trickle/leave, its event stream, its JSON);
  never drives the avatar, never sends a microphone, never sees another session. Always a
  signed token with an expiry, minted for that session.
- ``controller``: drives sessions (create, speak, interrupt, voice chat, delete, the seed API)
  and may mint viewer tokens. The configured ``api_token``, or a signed controller token.
- ``admin``: the configured ``admin_token``; everything a controller may, and minting
  controller tokens (the gateway's own ``create_token``: a backend keeps the admin token and
  hands a browser a short-lived controller token, never a vendor key).

Signed tokens are ``v1.<payload>.<signature>``: base64url JSON ``{"role", "sid", "exp",
"jti"}`` and its HMAC-SHA256 under ``token_secret`` (random per process when unset, so
tokens then end with the process). With no ``api_token`` and no ``admin_token`` configured,
authentication is off and every request acts as admin (the loopback-only default).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from aiohttp import web

from .config import Settings
from .errors import Forbidden, Unauthorized


class Role(enum.IntEnum):
    VIEWER = 1
    CONTROLLER = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Principal:
    role: Role
    session_id: str | None = None
    """A viewer's one session; ``None`` for controllers and admins (every session)."""
    expires: float | None = None
    token_id: str | None = None
    """A minted token's ``jti``: what revoking it names."""

    def may_watch(self, session_id: str) -> bool:
        return self.role >= Role.CONTROLLER or self.session_id == session_id


OPEN = Principal(Role.ADMIN)
"""Authentication off: a loopback-only gateway with no token configured."""

_PREFIX = "v1"


class TokenAuthority:
    """Mints and checks signed tokens, and resolves a bearer token to a :class:`Principal`."""

    def __init__(self, settings: Settings) -> None:
        self._api_token = settings.api_token.reveal().encode()
        self._admin_token = settings.admin_token.reveal().encode()
        secret = settings.token_secret.reveal()
        self._key = secret.encode() if secret else secrets.token_bytes(32)
        self.enabled = bool(self._api_token or self._admin_token)
        self.max_ttl = settings.max_token_ttl
        self._revoked: dict[str, float] = {}
        """Revoked token ids -> their expiry (after which they are refused anyway)."""

    def mint(self, role: Role, session_id: str | None, ttl: float) -> tuple[str, float]:
        """A signed token and its expiry (unix time)."""
        if role is Role.ADMIN:
            raise ValueError("admin is a configured token, never a minted one")
        if (role is Role.VIEWER) != (session_id is not None):
            raise ValueError("a viewer token names exactly one session; a controller token none")
        expires = time.time() + ttl
        payload = {"role": role.label, "sid": session_id, "exp": round(expires, 3),
                   "jti": secrets.token_hex(8)}
        body = _b64(json.dumps(payload, separators=(",", ":")).encode())
        return f"{_PREFIX}.{body}.{_b64(self._sign(body))}", expires

    def principal(self, token: str) -> Principal:
        """Who ``token`` is. Raises :class:`Unauthorized` for anything not valid right now."""
        if not self.enabled:
            return OPEN
        if not token:
            raise Unauthorized("a valid 'Authorization: Bearer <token>' header is required")
        given = token.encode()
        if self._admin_token and hmac.compare_digest(given, self._admin_token):
            return Principal(Role.ADMIN)
        if self._api_token and hmac.compare_digest(given, self._api_token):
            return Principal(Role.CONTROLLER)
        return self._verify(token)

    def _verify(self, token: str) -> Principal:
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != _PREFIX:
            raise Unauthorized("the token is not valid")
        try:
            signature = base64.urlsafe_b64decode(parts[2] + "=" * (-len(parts[2]) % 4))
        except (binascii.Error, ValueError):
            raise Unauthorized("the token is not valid") from None
        if not hmac.compare_digest(signature, self._sign(parts[1])):
            raise Unauthorized("the token is not valid (bad signature)")
        try:
            payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
            role = Role[str(payload["role"]).upper()]
            expires = float(payload["exp"])
            session_id = payload.get("sid")
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise Unauthorized("the token is not valid") from None
        if role is Role.ADMIN or (role is Role.VIEWER and not isinstance(session_id, str)):
            raise Unauthorized("the token is not valid")
        if expires <= time.time():
            raise Unauthorized("the token has expired")
        token_id = payload.get("jti")
        token_id = token_id if isinstance(token_id, str) else None
        if token_id is not None and token_id in self._revoked:
            raise Unauthorized("the token has been revoked")
        return Principal(role, session_id if role is Role.VIEWER else None, expires, token_id)

    def revoke(self, principal: Principal) -> None:
        """Refuse this minted token from now on, here (replicas share it through Redis)."""
        if principal.token_id is None or principal.expires is None:
            raise ValueError("only minted tokens can be revoked")
        now = time.time()
        self._revoked = {k: v for k, v in self._revoked.items() if v > now}
        self._revoked[principal.token_id] = principal.expires

    def _sign(self, body: str) -> bytes:
        return hmac.new(self._key, body.encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


QUERY_TOKEN_ROUTES = frozenset({("GET", "/v1/sessions/{session_id}/events")})
"""Where ``?access_token=`` is accepted: only the event stream, because EventSource cannot set
headers. Anywhere else a token in the URL would only end up in proxy logs and history."""


def bearer(request: web.Request) -> str:
    """The bearer token: the header, or ``?access_token=`` on :data:`QUERY_TOKEN_ROUTES`."""
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header[7:].strip()
    if "access_token" not in request.query:
        return ""
    resource = request.match_info.route.resource
    if (request.method, resource.canonical if resource else "") not in QUERY_TOKEN_ROUTES:
        raise Unauthorized("?access_token= is only accepted on the event stream "
                           "(GET /v1/sessions/{id}/events); send 'Authorization: Bearer <token>'")
    return request.query["access_token"]


# -- what each route needs ------------------------------------------------------------------

PUBLIC_PATHS = frozenset({"/livez", "/readyz", "/metrics", "/openapi.json", "/"})
"""Probes, metrics, the API description and the pages: no secret behind them."""

VIEWER_ROUTES = frozenset({
    ("GET", "/v1/sessions/{session_id}"),
    ("GET", "/v1/sessions/{session_id}/events"),
    ("POST", "/v1/sessions/{session_id}/whep"),
    ("PATCH", "/v1/sessions/{session_id}/whep/{viewer_id}"),
    ("DELETE", "/v1/sessions/{session_id}/whep/{viewer_id}"),
    ("POST", "/v1/sessions/{session_id}/livekit-token"),
})
"""What a viewer token may call, for its own session only. Every other API route needs a
controller (minting a controller token: an admin, checked by the handler)."""


def required_role(request: web.Request) -> Role | None:
    """``None``: public. Unknown paths fall through to the router's 404/405 as controllers."""
    if request.method == "OPTIONS" or request.path in PUBLIC_PATHS or request.path.startswith("/web/"):
        return None
    resource = request.match_info.route.resource
    template = resource.canonical if resource is not None else request.path
    if (request.method, template) in VIEWER_ROUTES:
        return Role.VIEWER
    return Role.CONTROLLER


def check(principal: Principal, needed: Role, request: web.Request) -> None:
    """Raise :class:`Forbidden` unless ``principal`` may make this request."""
    if principal.role < needed:
        raise Forbidden(f"a {principal.role.label} token may not {request.method} {request.path}: "
                        f"it needs a {needed.label}")
    session_id = request.match_info.get("session_id")
    if session_id is not None and not principal.may_watch(session_id):
        raise Forbidden("this viewer token is for another session")
