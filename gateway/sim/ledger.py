"""The session ledger: every session the simulator ever created, in SQLite.

A row is written when a session is created, updated when it starts and when it stops (with
the reason and the billed seconds, start to stop). ``open`` sessions are rows not yet stopped;
tests assert there are none left, which is how they prove nothing kept running (and billing).

Statements run synchronously on the event loop, on purpose: each is one indexed INSERT or
UPDATE of one small row, a few per session lifetime, and the default database is in memory
(microseconds). A file ledger uses WAL with ``synchronous=NORMAL``, so a commit appends to
the WAL without an fsync. A worker thread would buy nothing measurable and would make every
lifecycle transition a suspension point where state can change underneath it.

Stop reasons: ``stopped`` (client called stop), ``idle_timeout``, ``duration_limit``,
``never_started``, ``expired`` (fault switch), ``start_failed``, ``shutdown``,
``sim_restart`` (left open by a previous run of a file ledger).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id     TEXT PRIMARY KEY,
    provider       TEXT NOT NULL,
    avatar         TEXT NOT NULL,
    quality        TEXT NOT NULL,
    mode           TEXT NOT NULL,
    created_at     REAL NOT NULL,
    started_at     REAL,
    stopped_at     REAL,
    stop_reason    TEXT,
    billed_seconds REAL
);
CREATE INDEX IF NOT EXISTS sessions_open ON sessions (stopped_at) WHERE stopped_at IS NULL;
"""

_COLUMNS = ("session_id, provider, avatar, quality, mode, created_at, started_at, stopped_at, "
            "stop_reason, billed_seconds")


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    session_id: str
    provider: str
    """``heygen`` or ``liveavatar``."""
    avatar: str
    quality: str
    mode: str
    """HeyGen API version (``v2``) or LiveAvatar mode (``FULL``/``LITE``)."""
    created_at: float
    """Unix time."""
    started_at: float | None
    stopped_at: float | None
    stop_reason: str | None
    billed_seconds: float | None
    """Seconds from start to stop; 0 for a session that never started; None while open."""

    @property
    def open(self) -> bool:
        return self.stopped_at is None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "open": self.open}


class Ledger:
    def __init__(self, path: str = ":memory:", *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._db = sqlite3.connect(path, isolation_level=None)
        if path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def created(self, session_id: str, *, provider: str, avatar: str, quality: str,
                mode: str) -> None:
        self._db.execute(
            "INSERT INTO sessions (session_id, provider, avatar, quality, mode, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (session_id, provider, avatar, quality, mode, self._clock()),
        )

    def started(self, session_id: str) -> None:
        self._db.execute(
            "UPDATE sessions SET started_at = ? WHERE session_id = ? AND started_at IS NULL",
            (self._clock(), session_id),
        )

    def stopped(self, session_id: str, reason: str) -> float:
        """Close the row; returns the billed seconds. A second call changes nothing."""
        now = self._clock()
        self._db.execute(
            "UPDATE sessions SET stopped_at = ?, stop_reason = ?, "
            "billed_seconds = CASE WHEN started_at IS NULL THEN 0.0 "
            "                      ELSE MAX(0.0, ? - started_at) END "
            "WHERE session_id = ? AND stopped_at IS NULL",
            (now, reason, now, session_id),
        )
        entry = self.get(session_id)
        if entry is None or entry.billed_seconds is None:
            return 0.0
        return entry.billed_seconds

    def close_orphans(self, reason: str = "sim_restart") -> int:
        """Close rows a previous process left open (a file ledger after a crash)."""
        now = self._clock()
        cursor = self._db.execute(
            "UPDATE sessions SET stopped_at = ?, stop_reason = ?, "
            "billed_seconds = CASE WHEN started_at IS NULL THEN 0.0 "
            "                      ELSE MAX(0.0, ? - started_at) END "
            "WHERE stopped_at IS NULL",
            (now, reason, now),
        )
        return cursor.rowcount

    def get(self, session_id: str) -> LedgerEntry | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM sessions WHERE session_id = ?",
                               (session_id,)).fetchone()
        return LedgerEntry(*row) if row is not None else None

    def entries(self, *, open_only: bool = False, provider: str | None = None) -> list[LedgerEntry]:
        query = f"SELECT {_COLUMNS} FROM sessions WHERE 1=1"
        params: list[Any] = []
        if open_only:
            query += " AND stopped_at IS NULL"
        if provider is not None:
            query += " AND provider = ?"
            params.append(provider)
        query += " ORDER BY created_at, rowid"
        return [LedgerEntry(*row) for row in self._db.execute(query, params)]

    def open_count(self) -> int:
        row = self._db.execute("SELECT COUNT(*) FROM sessions WHERE stopped_at IS NULL").fetchone()
        return int(row[0])

    def total_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0])
