"""The journal of paid upstream sessions this gateway opened and has not stopped yet.

A row is written as soon as a provider hands out a session id, before anything else can fail,
and deleted once the provider confirmed the stop. A gateway killed with SIGKILL leaves its rows
behind; the next start stops those orphans before it serves (``SessionRegistry.reap_orphans``).

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


@dataclass(frozen=True, slots=True)
class JournalEntry:
    provider: str
    session_id: str
    opened_at: float
    stop_info: dict[str, Any]
    """Whatever the provider needs to stop the session later (e.g. a session token)."""


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

    async def closed(self, provider: str, session_id: str) -> None:
        await self._run("DELETE FROM upstream_sessions WHERE provider = ? AND session_id = ?",
                        provider, session_id)

    async def entries(self) -> list[JournalEntry]:
        rows = await self._run(
            "SELECT provider, session_id, opened_at, stop_info FROM upstream_sessions "
            "ORDER BY opened_at")
        return [JournalEntry(p, s, float(t), json.loads(i)) for p, s, t, i in rows]

    async def close(self) -> None:
        await self._db.close()


def _setup(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(_SCHEMA)
