"""The composition root: every service the gateway runs, built and wired here, once.

``app.py`` puts each under its ``web.AppKey`` (:mod:`gateway.api.common`), where handlers look
them up; no handler and no other service constructs one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .api.sessions import session_json
from .auth import TokenAuthority
from .chat.llm import ChatService
from .chat.persona import PersonaStore
from .cluster import Cluster
from .config import Settings
from .journal import JournalEntry, SessionJournal
from .metrics import Metrics
from .providers import Providers
from .ratelimit import RateLimiter
from .sessions import SessionRegistry
from .upstream.cloud import RoomUpstream
from .workers.pool import WorkerPool, default_worker_count

logger = logging.getLogger(__name__)


def describe_sessions(sessions: SessionRegistry,
                      settings: Settings) -> list[tuple[dict[str, Any], JournalEntry | None]]:
    """This replica's sessions for the others: the API's JSON, and what stops each paid one."""
    out: list[tuple[dict[str, Any], JournalEntry | None]] = []
    for session in sessions.list():
        upstream = session.upstream
        stop = None
        if isinstance(upstream, RoomUpstream) and upstream.provider_session_id:
            stop = JournalEntry(upstream.kind, upstream.provider_session_id, session.created_at,
                                upstream.provider_stop_info or {})
        out.append((session_json(session, settings), stop))
    return out


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    metrics: Metrics
    tokens: TokenAuthority
    rate_limiter: RateLimiter
    providers: Providers
    """Upstreams from settings, the journal of paid sessions and its billing guard."""
    sessions: SessionRegistry
    workers: WorkerPool | None
    """The fan-out worker processes that hold the viewers' peer connections, if any."""
    personas: PersonaStore
    chat: ChatService
    """Answers in the persona's voice: the seed API's chat, and the sessions' talk rule."""
    cluster: Cluster | None
    """The other replicas (through Redis), if ``redis_url`` is set."""

    @classmethod
    def build(cls, settings: Settings) -> Services:
        metrics = Metrics(commit=settings.build_commit)
        state_dir = Path(settings.state_dir)
        providers = Providers(settings, metrics, SessionJournal(state_dir / "journal.sqlite3"))
        personas = PersonaStore(settings.persona_db or state_dir / "persona.sqlite3")
        chat = ChatService(settings, personas, metrics=metrics)
        sessions = SessionRegistry(settings, metrics, providers, answerer=chat.sentences)
        # A session's conversation ends with it: the chat's memory of it is bounded by the
        # sessions that are open, not by every session ever run.
        sessions.on_closed.append(chat.forget)
        count = settings.workers if settings.workers >= 0 else default_worker_count()
        workers = WorkerPool(settings, metrics, count, sessions.hub_of) if count else None
        sessions.workers = workers
        cluster = None
        if settings.redis_url:
            cluster = Cluster(settings, providers.stop_abandoned,
                              functools.partial(describe_sessions, sessions, settings))
            sessions.cluster = cluster
        return cls(
            settings=settings,
            metrics=metrics,
            tokens=TokenAuthority(settings),
            rate_limiter=RateLimiter(settings.rate_limit, settings.rate_limit_burst),
            providers=providers,
            sessions=sessions,
            workers=workers,
            personas=personas,
            chat=chat,
            cluster=cluster,
        )

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Open the stores and clients and stop the paid sessions a killed predecessor left
        open, before anyone is served; afterwards close every session, then the rest in
        reverse order (the sessions' ends still reach the chat and their workers)."""
        async with contextlib.AsyncExitStack() as stack:
            await self.personas.open()
            stack.push_async_callback(self.personas.close)
            await self.chat.start()
            stack.push_async_callback(self.chat.close)
            await self.providers.start()
            stack.push_async_callback(self.providers.close)
            if self.workers is not None:
                await self.workers.start()
                stack.push_async_callback(self.workers.close)
            if self.cluster is not None:
                await self.cluster.start()
                stack.push_async_callback(self.cluster.close)
            stack.push_async_callback(self.sessions.close_all, "shutdown")
            orphans = await self.providers.reap_orphans()
            if orphans:
                logger.warning("stopped %d upstream session(s) left open by a previous run",
                               orphans)
            yield
