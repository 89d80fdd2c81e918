"""SQLite for an asyncio server: one connection, used from one worker thread.

The event loop never waits on a disk flush, and every statement of this process is serialized
before SQLite's own locks come into play. The connection opens lazily on the worker (so a
slow or failing ``open`` never blocks the loop) with whatever set-up the owner needs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class SqliteWorker:
    def __init__(self, path: str | Path, name: str,
                 setup: Callable[[sqlite3.Connection], None]) -> None:
        """``setup`` runs once on the fresh connection (pragmas, schema, seed rows)."""
        self._path = str(path)
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        self._setup = setup
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False,
                                 timeout=10.0)
            try:
                self._setup(db)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            return work(self._connect())

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def close(self) -> None:
        def work() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._pool, work)
        self._pool.shutdown(wait=True)
