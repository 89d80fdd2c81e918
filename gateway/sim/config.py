"""Simulator settings: one frozen object, read from ``AVATAR_GATEWAY_SIM_*`` variables.

The defaults emulate a trial account (3 concurrent sessions, 2-minute idle timeout, 10-minute
session limit). Every timer is a field so tests shorten time explicitly instead of patching
globals: e.g. ``SimSettings(idle_timeout_min=0.2, session_duration_limit=2.0)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError, Secret, base_url, is_loopback, load_env

SIM_ENV_PREFIX = "AVATAR_GATEWAY_SIM_"

DEFAULT_HEYGEN_API_KEY = "sim-heygen-key"
DEFAULT_LIVEAVATAR_API_KEY = "sim-liveavatar-key"


@dataclass(frozen=True, slots=True)
class SimSettings:
    """Field ``foo_bar`` is read from ``AVATAR_GATEWAY_SIM_FOO_BAR``."""

    host: str = "127.0.0.1"
    port: int = 8090
    public_url: str = ""
    """Base URL clients reach the simulator at. Empty: derived from each request's ``Host``
    header, so the LiveKit ``url`` handed out always points back at this process."""
    allow_public: bool = False
    """Permit binding a non-loopback address (the admin API has no authentication)."""
    tls_port: int = 0
    """Also serve everything over TLS on this port of ``host`` (0: no TLS). HeyGen's browser
    SDK opens its chat socket at ``wss://<host>/v1/ws/streaming.chat``, always on 443."""
    tls_cert: str = ""
    """PEM certificate (chain) for the TLS port; empty: a self-signed one made at start for
    ``host`` and the host of ``public_url``."""
    tls_key: str = ""
    """PEM private key of ``tls_cert``; empty: the key is in ``tls_cert``."""

    heygen_api_key: Secret = field(default_factory=lambda: Secret(DEFAULT_HEYGEN_API_KEY))
    liveavatar_api_key: Secret = field(default_factory=lambda: Secret(DEFAULT_LIVEAVATAR_API_KEY))
    livekit_api_key: str = "sim-key"
    livekit_api_secret: Secret = field(
        default_factory=lambda: Secret("sim-secret-at-least-32-characters-long"))

    concurrency_limit: int = 3
    """Open sessions per provider account (HeyGen trial plans allow 3)."""
    ledger_path: str = ":memory:"
    """SQLite file of every session ever created; ``:memory:`` lives as long as the app."""

    idle_timeout_default: float = 120.0
    """HeyGen ``activity_idle_timeout`` when the request does not set one."""
    idle_timeout_min: float = 30.0
    """Lowest ``activity_idle_timeout`` accepted (HeyGen: 30). Tests lower it to shorten time."""
    idle_timeout_max: float = 3600.0
    liveavatar_idle_timeout: float = 300.0
    """LiveAvatar closes a session after 5 minutes without keep-alive or command."""
    session_duration_limit: float = 600.0
    """Hard cap on a started session (HeyGen ``session_duration_limit``, LiveAvatar
    ``max_session_duration``)."""
    start_timeout: float = 300.0
    """A session created but never started is closed after this long (reason
    ``never_started``)."""
    avatar_start_timeout: float = 20.0
    """How long ``streaming.start`` / ``sessions/start`` waits for the avatar to publish."""
    fault_hang_cap: float = 120.0
    """A ``hang`` fault holds the request at most this long, then answers 504: longer than any
    sane client timeout, never forever."""

    max_body_bytes: int = 64 * 1024
    max_text_chars: int = 5000
    chat_max_frame_bytes: int = 64 * 1024
    """Largest message accepted on HeyGen's chat socket; a larger one closes it with 1009
    (the SDK's frames: 1 KiB of microphone audio, or one text to speak)."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be 1..65535, got {self.port}")
        if not 0 <= self.tls_port < 65536 or self.tls_port == self.port:
            raise ConfigError(f"tls_port must be 0 (no TLS) or a port other than {self.port}, "
                              f"got {self.tls_port}")
        if self.tls_key and not self.tls_cert:
            raise ConfigError("tls_key needs tls_cert")
        if self.concurrency_limit < 1:
            raise ConfigError("concurrency_limit must be at least 1")
        for name in ("idle_timeout_default", "idle_timeout_min", "idle_timeout_max",
                     "liveavatar_idle_timeout", "session_duration_limit", "start_timeout",
                     "avatar_start_timeout", "fault_hang_cap"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if not self.idle_timeout_min <= self.idle_timeout_default <= self.idle_timeout_max:
            raise ConfigError("idle_timeout_default must lie within "
                              "[idle_timeout_min, idle_timeout_max]")
        for name in ("max_body_bytes", "max_text_chars", "chat_max_frame_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if not (self.heygen_api_key and self.liveavatar_api_key):
            raise ConfigError("heygen_api_key and liveavatar_api_key must not be empty")
        if self.heygen_api_key.reveal() == self.liveavatar_api_key.reveal():
            raise ConfigError("heygen_api_key and liveavatar_api_key must differ: a key of "
                              "one provider must not work on the other")
        if len(self.livekit_api_secret.reveal()) < 32:
            raise ConfigError("livekit_api_secret must be at least 32 characters")
        if not self.allow_public and not is_loopback(self.host):
            raise ConfigError(
                f"refusing to bind {self.host}: the simulator's admin API has no "
                f"authentication; set {SIM_ENV_PREFIX}ALLOW_PUBLIC=1 if you really mean it")

    @property
    def base_url(self) -> str:
        return base_url(self.host, self.port, self.public_url)

    def replace(self, **changes: Any) -> SimSettings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> SimSettings:
        """Settings from ``AVATAR_GATEWAY_SIM_*`` variables; ``overrides`` (CLI flags) win.
        A ``*_FILE`` variable names a file holding a secret."""
        return load_env(cls, SIM_ENV_PREFIX, environ, overrides)
