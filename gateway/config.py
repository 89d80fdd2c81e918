"""Settings: one frozen object, read from ``AVATAR_GATEWAY_*`` environment variables.

Every field has a default that runs the gateway on a laptop with no keys and no network.
Secrets are :class:`Secret` values whose ``repr`` never shows the value, so a logged
``Settings`` object cannot leak a key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .avatar.looks import LOOKS

ENV_PREFIX = "AVATAR_GATEWAY_"


class ConfigError(ValueError):
    """A setting has a value the gateway cannot run with."""


@dataclass(frozen=True, slots=True)
class Secret:
    """A string that redacts itself in ``repr``/``str``; read it with :meth:`reveal`."""

    _value: str = field(repr=False)

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class QualityTier:
    """One rung of the quality ladder, named like HeyGen's ``quality`` field."""

    name: str
    width: int
    height: int
    bitrate: int
    """Target video bitrate in bit/s (a ceiling: static avatar scenes use less)."""


QUALITY_TIERS: dict[str, QualityTier] = {
    # HeyGen: high = 720p/2000 kbps, medium = 480p/1000 kbps, low = 360p/500 kbps.
    "high": QualityTier("high", 1280, 720, 2_000_000),
    "medium": QualityTier("medium", 854, 480, 1_000_000),
    "low": QualityTier("low", 640, 360, 500_000),
}


@dataclass(frozen=True, slots=True)
class Settings:
    """Gateway settings. Field ``foo_bar`` is read from ``AVATAR_GATEWAY_FOO_BAR``."""

    host: str = "127.0.0.1"
    """Address to bind. A non-loopback address requires ``api_token`` or ``allow_insecure``."""
    port: int = 8080
    """TCP port for HTTP (signaling, API, pages, metrics)."""
    public_url: str = ""
    """Base URL clients use to reach the gateway (for printed links); derived when empty."""
    api_token: Secret = Secret("")
    """Controller bearer token: create, drive and delete sessions, mint viewer tokens. Empty
    with an empty ``admin_token``: no authentication (then only a loopback bind is allowed)."""
    admin_token: Secret = Secret("")
    """Admin bearer token: everything, and minting controller tokens (``POST /v1/tokens``)."""
    token_secret: Secret = Secret("")
    """HMAC key signing minted tokens; empty: a random key per process (tokens end with it)."""
    viewer_token_ttl: float = 3600.0
    """Default lifetime of a minted token, seconds."""
    max_token_ttl: float = 86400.0
    """Longest lifetime a minted token may ask for, seconds."""
    allow_insecure: bool = False
    """Permit binding a non-loopback address with no ``api_token``."""

    ice_servers: tuple[str, ...] = ()
    """STUN/TURN URLs handed to aiortc and to browsers, e.g. ``stun:stun.example.org:3478``."""
    ice_username: str = ""
    """TURN username for the ``turn:``/``turns:`` entries of ``ice_servers``."""
    ice_credential: Secret = Secret("")
    """TURN password; advertised to players in WHEP ``Link`` headers with the username."""
    ice_host_addresses: tuple[str, ...] = ()
    """Restrict the host addresses aiortc gathers candidates on (containers, multi-homed
    hosts, loopback-only test rigs). Empty: every interface but loopback (aioice default)."""

    default_quality: str = "high"
    """Quality of a session that names none: ``high`` 1280x720, ``medium`` 854x480, ``low``
    640x360 (HeyGen's tiers; the video bitrate ceiling follows)."""
    video_fps: int = 30
    """Frame rate of the local avatar and of the shared encoders (1..60)."""
    keyframe_interval: float = 4.0
    """Seconds between periodic keyframes: bounds recovery for a viewer whose PLI is lost."""
    keyframe_min_gap: float = 0.5
    """Forced keyframes for repair (PLI/FIR, a viewer that fell behind) are coalesced to at most
    one per this many seconds."""
    keyframe_join_gap: float = 0.2
    """Keyframes for joining viewers come sooner: at most one per this many seconds (a join
    storm costs a few keyframes; a joining viewer waits less for its first picture)."""
    audio_packet_ms: int = 40
    """Opus packet duration sent to viewers: 40, 60, or 20 (what browsers send). Audio was most
    of a viewer's packets at 20 ms; at 40 one core carries ~25% more viewers, for 20 ms more
    delay and a 40 ms gap where a packet is lost."""
    fast_start_frames: int = 8
    """A video viewer that connects within this many frames of a keyframe starts at once on a
    replay of that keyframe and the frames since, instead of waiting for a keyframe of its own
    (which every viewer would pay for). 0: every join waits for its own keyframe."""
    adaptive_quality: bool = True
    """Each video viewer moves between rungs of the quality ladder (full, half and quarter
    size, :mod:`gateway.media.ladder`) as its browser's bandwidth estimate and loss say.
    Off: every viewer stays on the rung it joined at (the ``max_height`` of its WHEP
    request)."""
    viewer_connect_timeout: float = 30.0
    """A viewer whose ICE/DTLS is not connected after this many seconds is closed."""
    stats_interval: float = 5.0
    """Seconds between samples of every viewer's RTP counters (packets sent, lost, RTT)."""

    workers: int = -1
    """Fan-out worker processes that hold the viewers' peer connections (the session's owner
    encodes once and hands each worker every packet once): -1 is one per CPU the process may
    use (its affinity, bounded by a cgroup CPU quota), 0 keeps viewers in the main process."""

    media_design: str = "encode-once"
    """``naive`` gives every viewer its own encoder (aiortc's default); only for benchmarks."""

    max_sessions: int = 8
    """Sessions open at once, of any upstream; more is a 429 with Retry-After."""
    max_viewers_per_session: int = 64
    """Viewer peer connections per session; more is a 429 with Retry-After."""
    max_pending_viewers_per_session: int = 32
    """Viewers of a session that have offered but not connected yet (ICE/DTLS pending); they
    hold a place among ``max_viewers_per_session`` only up to this share, so offers that never
    connect cannot lock a session. More is a 429 with Retry-After."""
    max_viewer_load: float = 0.95
    """A new viewer is refused (503, Retry-After) while the process that would carry it (a
    fan-out worker, or the main process without workers) has spent more than this share of
    the last few seconds busy: past it, everyone's video stalls together. 1 turns it off."""
    max_pending_viewers_per_client: int = 8
    """Unconnected viewers one client (its address and its token together) may hold in a
    session at once; more is a 429 with Retry-After."""
    max_connections: int = 0
    """HTTP connections open at once; more are answered 503 and closed before their request
    is read. 0: three quarters of the file-descriptor limit (the rest stays free for viewers'
    UDP sockets, SQLite and logs), so the listener never runs out of descriptors."""
    max_connections_per_client: int = 256
    """HTTP connections one client address may hold open at once; more are answered 429 and
    closed before their request is read."""
    max_event_streams_per_session: int = 256
    """Event streams (SSE, ``GET /v1/sessions/{id}/events``) open on one session; more is a
    429 with Retry-After."""
    max_event_streams_per_client: int = 32
    """Event streams one client (its address and its token together) may hold open on one
    session; more is a 429 with Retry-After."""
    header_timeout: float = 10.0
    """Seconds a client has to send a request's line and headers, from the connection opening
    (first request) or from the request's first byte; slower connections are closed with a
    408 (slowloris)."""
    body_timeout: float = 30.0
    """Seconds a client has to send a request body once its headers are in (bodies are at most
    ``max_body_bytes``); slower connections are closed."""
    keepalive_timeout: float = 30.0
    """Seconds an idle keep-alive connection (no request in progress) stays open."""
    rate_limit: float = 50.0
    """API requests per second a client address may sustain (0: no limit); more is a 429 with
    Retry-After. Probes, metrics and the pages are not limited."""
    rate_limit_burst: int = 200
    """Requests a client address may make at once before ``rate_limit`` applies."""
    max_body_bytes: int = 64 * 1024
    """Largest request body (JSON, SDP) accepted; larger is a 413."""
    max_text_chars: int = 5000
    """Longest text the avatar is asked to speak (and longest question to the chat)."""

    tts_voice: str = "en-us"
    """eSpeak NG voice of the local avatar (and of LiveAvatar LITE with ``tts=espeak``) when a
    session names none (``GET /v1/catalog`` lists them)."""
    tts_words_per_minute: int = 165
    """Speaking rate of the local avatar."""
    tts: str = "espeak"
    """Who speaks for LiveAvatar LITE (where the gateway makes the speech): ``espeak`` (eSpeak
    NG, offline) or ``openai`` (OpenAI's speech API through ``openai_api_key`` and
    ``openai_base_url``; ``openai_tts_model``, ``openai_tts_voice``)."""
    local_avatar: str = "ada"
    """The embedded avatar's look when a session names none (``GET /v1/catalog`` lists them)."""

    default_upstream: str = "local"
    """``local`` (embedded avatar), ``heygen`` or ``liveavatar``."""
    heygen_api_key: Secret = Secret("")
    """HeyGen API key; set, it makes the ``heygen`` upstream available. Never sent to a
    browser."""
    heygen_base_url: str = "https://api.heygen.com"
    """HeyGen API base (the simulator: ``http://127.0.0.1:8090``)."""
    heygen_avatar_id: str = "default"
    """HeyGen avatar of a session that names none."""
    heygen_voice_id: str = ""
    """HeyGen voice of a session that names none; empty: the avatar's own."""
    liveavatar_api_key: Secret = Secret("")
    """LiveAvatar API key; set, it makes the ``liveavatar`` upstream available."""
    liveavatar_base_url: str = "https://api.liveavatar.com"
    """LiveAvatar API base (the simulator: ``http://127.0.0.1:8090``)."""
    liveavatar_avatar_id: str = "default"
    """LiveAvatar avatar of a session that names none."""
    liveavatar_mode: str = "full"
    """``full``: LiveAvatar's own voice, language model and ears. ``lite``: the avatar only
    lip-syncs what the gateway says: the gateway's speech (``tts``) over the session's
    websocket, and ``talk`` answered by the gateway's chat (the persona)."""
    distribution: str = "whep"
    """How viewers get a session that does not say: ``whep`` (the gateway's own peer
    connections) or ``livekit`` (also published into a room of the operator's LiveKit, for
    audiences larger than one machine; needs ``livekit_url``, ``livekit_api_key`` and
    ``livekit_api_secret``)."""
    livekit_url: str = ""
    """The operator's LiveKit server or LiveKit Cloud project (``wss://...``); empty: the
    ``livekit`` distribution is unavailable."""
    livekit_api_key: str = ""
    """API key of the operator's LiveKit: the gateway mints its own and its viewers' tokens."""
    livekit_api_secret: Secret = Secret("")
    """The key's secret. Never sent to a browser (viewers get short-lived tokens)."""
    livekit_room_prefix: str = "avatar-"
    """A session's room in the operator's LiveKit is this plus the session id."""
    redis_url: Secret = Secret("")
    """``redis://host:6379/0``: replicas of the gateway share their sessions, the paid-session
    limit, and each other's leases there (see :mod:`gateway.cluster`). Empty: one process on
    its own. Replicas must share ``api_token``/``token_secret`` (a token works on any)."""
    replica_id: str = ""
    """This replica's name in Redis; empty: ``<hostname>-<pid>``."""
    replica_lease_ttl: float = 10.0
    """Seconds after a replica stops refreshing its lease (it died) until another replica
    stops its provider sessions."""
    upstream_timeout: float = 15.0
    """Seconds for one provider REST call."""
    upstream_reconcile_interval: float = 5.0
    """After a billed call failed without a clear answer (a HeyGen ``streaming.new`` timed
    out), the gateway asks the provider which sessions are open and stops the one it created;
    it asks again this often while the answer is unclear. Also the first delay before a failed
    stop is retried (then doubling up to ``upstream_stop_retry_max``)."""
    upstream_stop_retry_max: float = 300.0
    """Longest wait between two tries to stop a provider session whose stop failed. Stops are
    retried until the provider confirms or says the session is gone."""
    max_upstream_sessions: int = 3
    """Paid sessions open at once (HeyGen trial plans allow 3); more is a 429 with Retry-After."""
    idle_grace: float = 60.0
    """A session with no viewer and no controller activity for this long is stopped."""
    keep_alive_interval: float = 30.0
    """How often a watched session tells its provider it is in use."""
    reconnect_attempts: int = 5
    """Rejoins of a dropped provider room before the session is given up (and stopped)."""
    reconnect_ready_within: float = 20.0
    """Seconds a (re)join may take until the avatar's video and audio flow."""
    max_session_duration: float = 3600.0
    """Hard cap on any session's lifetime (a provider's own limit may be lower)."""
    state_dir: str = ".avatar-gateway"
    """Where the journal of open upstream sessions and the persona store live (SQLite)."""
    persona_db: str = ""
    """Persona store file; empty means ``<state_dir>/persona.sqlite3``."""
    cors_origins: tuple[str, ...] = ("*",)
    """Origins allowed to call the API from a browser (the seed server allowed any)."""

    openai_api_key: Secret = Secret("")
    """Empty: chat uses the offline responder (answers from the persona's facts)."""
    openai_base_url: str = ""
    """Any OpenAI-compatible server; empty means api.openai.com."""
    openai_model: str = "gpt-4o-mini"
    """Chat model for ``talk`` and the seed API's answers."""
    openai_tts_model: str = "gpt-4o-mini-tts"
    """Speech model when ``tts=openai``."""
    openai_tts_voice: str = "alloy"
    """OpenAI voice when ``tts=openai`` and a session names none."""
    openai_timeout: float = 30.0
    """Seconds for one chat request (streamed answers: until the last token)."""
    chat_history_turns: int = 20
    """Per-session conversation memory (user + assistant messages kept)."""
    log_format: str = "text"
    """``text`` (one readable line per record) or ``json`` (one JSON object per line, for log
    collectors)."""
    build_commit: str = ""
    """Source revision, set by the image build; the ``commit`` label of ``avatargw_build_info``."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be 1..65535, got {self.port}")
        if self.default_quality not in QUALITY_TIERS:
            raise ConfigError(
                f"default_quality must be one of {sorted(QUALITY_TIERS)}, "
                f"got {self.default_quality!r}"
            )
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be 'text' or 'json', got {self.log_format!r}")
        if self.workers < -1:
            raise ConfigError(f"workers must be -1 (one per core), 0 (none) or more, "
                              f"got {self.workers}")
        if self.media_design not in ("encode-once", "naive"):
            raise ConfigError(f"media_design must be 'encode-once' or 'naive', "
                              f"got {self.media_design!r}")
        if not 1 <= self.video_fps <= 60:
            raise ConfigError(f"video_fps must be 1..60, got {self.video_fps}")
        if self.local_avatar not in LOOKS:
            raise ConfigError(f"local_avatar must be one of {', '.join(LOOKS)}, "
                              f"got {self.local_avatar!r}")
        if self.default_upstream not in ("local", "heygen", "liveavatar"):
            raise ConfigError(f"default_upstream must be local, heygen or liveavatar, "
                              f"got {self.default_upstream!r}")
        if self.liveavatar_mode not in ("full", "lite"):
            raise ConfigError(f"liveavatar_mode must be 'full' or 'lite', "
                              f"got {self.liveavatar_mode!r}")
        if self.distribution not in ("whep", "livekit"):
            raise ConfigError(f"distribution must be 'whep' or 'livekit', "
                              f"got {self.distribution!r}")
        livekit = (self.livekit_url, self.livekit_api_key, self.livekit_api_secret.reveal())
        if any(livekit) and not all(livekit):
            raise ConfigError(f"the operator's LiveKit needs all of {ENV_PREFIX}LIVEKIT_URL, "
                              f"{ENV_PREFIX}LIVEKIT_API_KEY and {ENV_PREFIX}LIVEKIT_API_SECRET")
        if self.livekit_url and not self.livekit_url.startswith(("ws://", "wss://", "http://",
                                                                 "https://")):
            raise ConfigError(f"livekit_url must be a ws(s):// or http(s):// URL, "
                              f"got {self.livekit_url!r}")
        if self.distribution == "livekit" and not self.livekit_url:
            raise ConfigError(f"distribution=livekit needs the operator's LiveKit: set "
                              f"{ENV_PREFIX}LIVEKIT_URL, _API_KEY and _API_SECRET")
        if self.redis_url and not self.redis_url.reveal().startswith(("redis://", "rediss://",
                                                                      "unix://")):
            raise ConfigError("redis_url must be a redis://, rediss:// or unix:// URL")
        if self.tts not in ("espeak", "openai"):
            raise ConfigError(f"tts must be 'espeak' or 'openai', got {self.tts!r}")
        if self.tts == "openai" and not self.openai_api_key:
            raise ConfigError(f"tts=openai needs an OpenAI key: set {ENV_PREFIX}OPENAI_API_KEY "
                              f"(or OPENAI_API_KEY)")
        for name in ("keyframe_interval", "keyframe_min_gap", "keyframe_join_gap",
                     "viewer_connect_timeout",
                     "upstream_timeout", "idle_grace", "keep_alive_interval", "stats_interval",
                     "viewer_token_ttl", "max_token_ttl",
                     "reconnect_ready_within", "replica_lease_ttl",
                     "max_session_duration"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.audio_packet_ms not in (20, 40, 60):
            raise ConfigError(f"audio_packet_ms must be 20, 40 or 60, got {self.audio_packet_ms}")
        if not 0.1 <= self.max_viewer_load <= 1:
            raise ConfigError("max_viewer_load must be a share of the time from 0.1 to 1 (off)")
        if not 0 <= self.fast_start_frames <= 60:
            raise ConfigError("fast_start_frames must be 0 (off) to 60")
        if self.rate_limit < 0:
            raise ConfigError("rate_limit must be 0 (off) or positive")
        if self.max_connections < 0:
            raise ConfigError("max_connections must be 0 (from the descriptor limit) or positive")
        for name in ("max_connections_per_client", "max_event_streams_per_session",
                     "max_event_streams_per_client"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        for name in ("header_timeout", "body_timeout", "keepalive_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        for name in ("max_sessions", "max_upstream_sessions",
                     "rate_limit_burst",
                     "reconnect_attempts",
                     "max_viewers_per_session", "max_pending_viewers_per_session",
                     "max_pending_viewers_per_client", "max_body_bytes", "max_text_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        for address in self.ice_host_addresses:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ConfigError(f"ice_host_addresses: {address!r} is not an IP address") from None
        for url in self.ice_servers:
            if not url.startswith(("stun:", "turn:", "turns:")):
                raise ConfigError(f"ice_servers: {url!r} is not a stun:/turn:/turns: URL")
        if (not self.api_token and not self.admin_token and not self.allow_insecure
                and not is_loopback(self.host)):
            raise ConfigError(
                f"refusing to bind {self.host} without authentication: set "
                f"{ENV_PREFIX}API_TOKEN, or {ENV_PREFIX}ALLOW_INSECURE=1 if you really mean it"
            )

    @property
    def base_url(self) -> str:
        return base_url(self.host, self.port, self.public_url)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``AVATAR_GATEWAY_*`` variables; ``overrides`` (e.g. CLI flags) win.

        A ``*_FILE`` variable names a file holding a secret (Docker/Kubernetes secrets).
        """
        return load_env(cls, ENV_PREFIX, environ, overrides, aliases=_STANDARD_NAMES)


# Names the wider ecosystem already uses, honoured when the prefixed variable is unset.
_STANDARD_NAMES = {"openai_api_key": "OPENAI_API_KEY", "openai_base_url": "OPENAI_BASE_URL"}


S = TypeVar("S")


def load_env(cls: type[S], prefix: str, environ: Mapping[str, str] | None,
             overrides: Mapping[str, Any], aliases: Mapping[str, str] | None = None) -> S:
    """Build the frozen settings dataclass ``cls`` from ``<prefix><FIELD>`` variables.

    ``overrides`` (CLI flags, tests) win; a ``*_FILE`` variable names a file holding a secret
    (Docker/Kubernetes secrets); ``aliases`` maps fields to standard names read as a fallback.
    """
    env = os.environ if environ is None else environ
    types = {f.name: f.type for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for name, type_name in types.items():
        key = prefix + name.upper()
        raw = env.get(key)
        if raw is None and aliases and name in aliases:
            raw = env.get(aliases[name])
        if raw is None and type_name == "Secret" and (path := env.get(key + "_FILE")):
            try:
                with open(path, encoding="utf-8") as fh:
                    raw = fh.read().strip()
            except OSError as exc:
                raise ConfigError(f"{key}_FILE: cannot read {path}: {exc}") from None
        if raw is not None:
            values[name] = parse_value(key, type_name, raw)
    for name, value in overrides.items():
        if name not in types:
            raise ConfigError(f"unknown setting {name!r}")
        values[name] = Secret(value) if types[name] == "Secret" and isinstance(value, str) else value
    return cls(**values)


def base_url(host: str, port: int, public_url: str = "") -> str:
    """The URL a client should use: ``public_url`` if set, else one built from the bind."""
    if public_url:
        return public_url.rstrip("/")
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_value(key: str, type_name: object, raw: str) -> Any:
    try:
        match type_name:
            case "int":
                return int(raw)
            case "float":
                return float(raw)
            case "bool":
                if raw.lower() in ("1", "true", "yes", "on"):
                    return True
                if raw.lower() in ("0", "false", "no", "off", ""):
                    return False
                raise ValueError(raw)
            case "Secret":
                return Secret(raw)
            case "tuple[str, ...]":
                return tuple(item.strip() for item in raw.split(",") if item.strip())
            case _:
                return raw
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not a valid {type_name}") from None
