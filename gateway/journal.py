"""The journal of paid upstream sessions this gateway opened and has not stopped yet.

A row is written as soon as a provider hands out a session id, before anything else can fail,
and deleted once the provider confirmed the stop (or said the session is gone); a stop that
failed keeps its row while :mod:`gateway.upstream.billing` retries it. A gateway killed with
SIGKILL leaves its rows behind; the next start stops those orphans before it serves
(``Providers.reap_orphans``).

An *intent* is written before a call that may open a billed session whose id the gateway only
learns from the answer (HeyGen ``streaming.new``): if the answer never comes, the intent's time
window is what reconciliation matches the provider's list of open sessions against.

SQLite in WAL mode, used from one worker thread so the event loop never waits on a disk flush.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .sqlite import SqliteWorker

_SCHEMA = """
CREATE TABLE IF NOT EXISTS upstream_sessions (
    provider TEXT NOT NULL,
    session_id TEXT NOT NULL,
    opened_at REAL NOT NULL,
    stop_info TEXT NOT NULL,
    PRIMARY KEY (provider, session_id)
)
"""

_INTENTS = """
CREATE TABLE IF NOT EXISTS upstream_intents (
    nonce TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    started_at REAL NOT NULL,
    window_end REAL NOT NULL
)
"""


@dataclass(frozen=True, slots=True)
class JournalEntry:
    provider: str
    session_id: str
    opened_at: float
    stop_info: dict[str, Any]
    """Whatever the provider needs to stop the session later (e.g. a session token)."""


@dataclass(frozen=True, slots=True)
class Intent:
    """A billed create call under way (or one whose answer never came)."""

    nonce: str
    provider: str
    started_at: float
    """Unix time just before the call was sent."""
    window_end: float
    """Unix time after which the call cannot have opened a session any more (its timeout)."""


class SessionJournal:
    def __init__(self, path: str | Path) -> None:
        self._db = SqliteWorker(path, "journal", _setup)

    async def _run(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        return await self._db.run(lambda db: db.execute(sql, params).fetchall())

    async def opened(self, provider: str, session_id: str, stop_info: dict[str, Any]) -> None:
        await self._run(
            "INSERT OR REPLACE INTO upstream_sessions VALUES (?, ?, ?, ?)",
            provider, session_id, time.time(), json.dumps(stop_info),
        )

    async def kept(self, provider: str, session_id: str, stop_info: dict[str, Any]) -> None:
        """Make sure a row exists (a stop being retried must survive a restart)."""
        await self._run(
            "INSERT OR IGNORE INTO upstream_sessions VALUES (?, ?, ?, ?)",
            provider, session_id, time.time(), json.dumps(stop_info),
        )

    async def closed(self, provider: str, session_id: str) -> None:
        await self._run("DELETE FROM upstream_sessions WHERE provider = ? AND session_id = ?",
                        provider, session_id)

    async def entries(self) -> list[JournalEntry]:
        rows = await self._run(
            "SELECT provider, session_id, opened_at, stop_info FROM upstream_sessions "
            "ORDER BY opened_at")
        return [JournalEntry(p, s, float(t), json.loads(i)) for p, s, t, i in rows]

    async def intended(self, intent: Intent) -> None:
        await self._run("INSERT OR REPLACE INTO upstream_intents VALUES (?, ?, ?, ?)",
                        intent.nonce, intent.provider, intent.started_at, intent.window_end)

    async def opened_for(self, nonce: str, provider: str, session_id: str,
                         stop_info: dict[str, Any]) -> None:
        """The intent's call answered with a session: one transaction swaps the intent for
        the session's row, so a crash leaves one or the other, never neither."""
        row = (provider, session_id, time.time(), json.dumps(stop_info))

        def work(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("INSERT OR REPLACE INTO upstream_sessions VALUES (?, ?, ?, ?)", row)
                db.execute("DELETE FROM upstream_intents WHERE nonce = ?", (nonce,))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

        await self._db.run(work)

    async def settled(self, nonce: str) -> None:
        await self._run("DELETE FROM upstream_intents WHERE nonce = ?", nonce)

    async def intents(self) -> list[Intent]:
        rows = await self._run("SELECT nonce, provider, started_at, window_end "
                               "FROM upstream_intents ORDER BY started_at")
        return [Intent(n, p, float(s), float(e)) for n, p, s, e in rows]

    async def close(self) -> None:
        await self._db.close()


def _setup(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(_SCHEMA)
    db.execute(_INTENTS)
