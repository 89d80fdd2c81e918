"""Gateway replicas behind one address, sharing one Redis (``AVATAR_GATEWAY_REDIS_URL``).

A session lives in the replica that created it (its upstream, hub and WHEP viewers are that
process's). Redis holds what the others need:

``avatargw:sessions`` (hash)
    session id -> JSON: the session as the API shows it, its owner replica and that replica's
    public URL, and for a paid session what stops its provider session (the journal entry).
``avatargw:replica:<id>`` (string with expiry)
    The replica's lease: refreshed every ``lease_ttl / 3``; gone ``lease_ttl`` after a replica
    died. Each refresh also rewrites the replica's own session records, so a restarted (empty)
    Redis is whole again within one refresh.
``avatargw:paid`` (hash)
    Session id -> owner replica, for the ``max_upstream_sessions`` paid places across every
    replica; a place is taken atomically (one script: count and add) before a provider is
    called, and a dead replica's places are given back, even those of sessions it never
    finished creating.
``avatargw:rate:<client>`` (hash with expiry)
    A client's request budget (token bucket), spent atomically by whichever replica it calls.
``avatargw:revoked:<token id>`` (string with expiry)
    A revoked token, refused everywhere until it would have expired anyway.
``avatargw:reaped:<session id>`` (string with expiry)
    Taken with ``SET NX`` by the one replica that stops a dead replica's provider session: a
    session is reaped exactly once, however many replicas notice.

Any replica lists and describes every session; requests for another replica's session are
forwarded (:mod:`gateway.api.forward`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .config import Settings
from .errors import CapacityError, UpstreamUnavailable
from .journal import JournalEntry

logger = logging.getLogger(__name__)

PREFIX = "avatargw:"
SESSIONS = PREFIX + "sessions"
PAID = PREFIX + "paid"
REAP_CLAIM_TTL = 3600
"""Seconds a reap claim stays: long past any retry of the stop it guards."""

# KEYS[1] the paid places; ARGV the session id, the limit, the owner. 1: taken, 0: full.
_TAKE_PLACE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""


# A token bucket per client, on Redis's clock. KEYS[1] the bucket; ARGV rate, burst, expiry.
# Returns the seconds to wait ("0": allowed).
_TAKE_TOKEN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(b[1]) or burst
local at = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return tostring(wait)
"""


@dataclass(frozen=True, slots=True)
class Remote:
    """Another replica's session, as Redis has it."""

    session: dict[str, Any]
    owner: str
    url: str


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Cluster:
    def __init__(self, settings: Settings,
                 reap: Callable[[JournalEntry], Awaitable[None]],
                 describe: Callable[[], list[tuple[dict[str, Any], JournalEntry | None]]]
                 ) -> None:
        """``reap``: stop a dead replica's provider session (retried until the provider
        confirms). ``describe``: this replica's sessions as the API shows them, each with what
        stops its provider session (None for the local avatar)."""
        self.replica = settings.replica_id or default_replica_id()
        self.url = settings.base_url
        self._ttl = settings.replica_lease_ttl
        self._redis = aioredis.from_url(settings.redis_url.reveal(), decode_responses=True,
                                        socket_timeout=2.0, socket_connect_timeout=2.0,
                                        health_check_interval=5)
        self._reap = reap
        self._describe = describe
        self._paid: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self.reaped = 0

    async def start(self) -> None:
        try:
            await self._refresh()
        except RedisError as exc:
            raise UpstreamUnavailable(f"Redis (AVATAR_GATEWAY_REDIS_URL) cannot be reached: "
                                      f"{exc}") from None
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cluster")
        logger.info("replica %s (%s) joined the cluster", self.replica, self.url)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(RedisError):
            await self._redis.delete(self._lease_key(self.replica))
        await self._redis.aclose()

    # -- sessions ---------------------------------------------------------------------------------

    async def take_paid_place(self, session_id: str, limit: int) -> None:
        """Hold one of the cluster's ``limit`` paid places for ``session_id``, or raise."""
        try:
            taken = await self._redis.eval(_TAKE_PLACE, 1, PAID, session_id, limit,
                                           self.replica)
        except RedisError as exc:
            raise UpstreamUnavailable(f"the cluster's paid-session count is unreachable "
                                      f"(Redis: {exc}); try again") from None
        if not taken:
            raise CapacityError(f"{limit} provider sessions are open across the gateway's "
                                f"replicas, the configured maximum "
                                f"(AVATAR_GATEWAY_MAX_UPSTREAM_SESSIONS={limit})",
                                retry_after=30)
        self._paid.add(session_id)

    def _records(self) -> dict[str, str]:
        records = {}
        for session, stop in self._describe():
            records[session["id"]] = json.dumps({
                "session": session, "owner": self.replica, "url": self.url,
                "stop": None if stop is None else {
                    "provider": stop.provider, "session_id": stop.session_id,
                    "opened_at": stop.opened_at, "stop_info": stop.stop_info}})
        return records

    async def take_rate(self, client: str, rate: float, burst: float) -> float | None:
        """Spend one request of ``client``'s bucket, shared by every replica (a client that
        spreads its requests over them gets no more). Seconds to wait, 0 when allowed; None
        when Redis cannot say (the caller limits locally then)."""
        expiry = max(1, math.ceil(burst / rate) + 1)
        try:
            wait = await self._redis.eval(_TAKE_TOKEN, 1, f"{PREFIX}rate:{client}", rate, burst,
                                          expiry)
        except RedisError:
            return None
        return float(wait)

    async def revoke(self, token_id: str, expires: float) -> None:
        """A revoked token is refused by every replica until it would have expired."""
        seconds = max(1, math.ceil(expires - time.time()))
        try:
            await self._redis.set(f"{PREFIX}revoked:{token_id}", "1", ex=seconds)
        except RedisError as exc:
            raise UpstreamUnavailable(f"the revocation could not reach the other replicas "
                                      f"(Redis: {exc}); try again") from None

    async def is_revoked(self, token_id: str) -> bool:
        try:
            return bool(await self._redis.exists(f"{PREFIX}revoked:{token_id}"))
        except RedisError:
            return False  # this replica's own list still applies

    async def publish(self) -> None:
        """Write this replica's sessions now (a new one; the lease refresh does it anyway)."""
        with contextlib.suppress(RedisError):  # the next refresh writes them
            await self._refresh()

    async def withdraw(self, session_id: str) -> None:
        """One of this replica's sessions ended (or never started): record and place go."""
        self._paid.discard(session_id)
        with contextlib.suppress(RedisError):
            async with self._redis.pipeline(transaction=True) as pipe:
                _ = pipe.hdel(SESSIONS, session_id)
                _ = pipe.hdel(PAID, session_id)
                await pipe.execute()

    async def remote(self, session_id: str) -> Remote | None:
        """Another replica's session, if one holds it."""
        try:
            text = await self._redis.hget(SESSIONS, session_id)
        except RedisError as exc:
            logger.warning("cluster: Redis unreachable (%s); only local sessions are known", exc)
            return None
        if text is None:
            return None
        record = json.loads(text)
        if record["owner"] == self.replica:
            return None
        return Remote(record["session"], record["owner"], record["url"])

    async def remote_sessions(self) -> list[dict[str, Any]]:
        """Every other replica's sessions (as their owners last described them)."""
        try:
            records = cast(dict[str, str], await self._redis.hgetall(SESSIONS))
        except RedisError as exc:
            logger.warning("cluster: Redis unreachable (%s); listing local sessions", exc)
            return []
        out = []
        for text in records.values():
            record = json.loads(text)
            if record["owner"] != self.replica:
                out.append(record["session"])
        return out

    # -- leases and reaping ------------------------------------------------------------------------

    @staticmethod
    def _lease_key(replica: str) -> str:
        return f"{PREFIX}replica:{replica}"

    async def _refresh(self) -> None:
        records = self._records()
        async with self._redis.pipeline(transaction=False) as pipe:
            _ = pipe.set(self._lease_key(self.replica), self.url, ex=max(1, round(self._ttl)))
            if records:
                _ = pipe.hset(SESSIONS, mapping=cast(Any, records))
            if self._paid:
                _ = pipe.hset(PAID, mapping=cast(Any, dict.fromkeys(self._paid, self.replica)))
            await pipe.execute()

    async def _run(self) -> None:
        period = self._ttl / 3
        while True:
            await asyncio.sleep(period)
            try:
                await self._refresh()
                await self._reap_dead()
            except RedisError as exc:
                logger.warning("cluster: Redis unreachable (%s); retrying in %.1f s", exc, period)

    async def _reap_dead(self) -> None:
        """Stop the provider sessions of replicas whose lease ran out; forget their sessions
        and give back their paid places."""
        records = cast(dict[str, str], await self._redis.hgetall(SESSIONS))
        places = cast(dict[str, str], await self._redis.hgetall(PAID))
        owners = ({json.loads(text)["owner"] for text in records.values()}
                  | set(places.values())) - {self.replica}
        dead = {owner for owner in owners if not await self._redis.exists(self._lease_key(owner))}
        for session_id, text in records.items():
            record = json.loads(text)
            if record["owner"] not in dead:
                continue
            claim = f"{PREFIX}reaped:{session_id}"
            if not await self._redis.set(claim, self.replica, nx=True, ex=REAP_CLAIM_TTL):
                continue  # another replica has it
            stop = record.get("stop")
            logger.warning("replica %s is gone: its session %s ends here%s", record["owner"],
                           session_id, f" (stopping {stop['provider']} session "
                           f"{stop['session_id']})" if stop else "")
            if stop is not None:
                await self._reap(JournalEntry(stop["provider"], stop["session_id"],
                                              float(stop["opened_at"]), stop["stop_info"]))
            async with self._redis.pipeline(transaction=True) as pipe:
                _ = pipe.hdel(SESSIONS, session_id)
                _ = pipe.hdel(PAID, session_id)
                await pipe.execute()
            self.reaped += 1
        # Places of sessions a dead replica never finished creating (no record to reap).
        orphans = [sid for sid, owner in places.items() if owner in dead and sid not in records]
        if orphans:
            await self._redis.hdel(PAID, *orphans)
