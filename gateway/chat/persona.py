"""The persona the avatar plays, validated, and its SQLite store.

The JSON shape is the seed server's (camelCase ``webStack`` included; every value a string or a
list of strings, ``education.year`` too), so its clients read and write it unchanged::

    {"name", "title", "education": {"degree", "year", "institution"},
     "technical": {"languages": [], "webStack": [], "projects": []},
     "personality": {"style", "interests": [], "goals": []}, "traits": []}

The store keeps one row. Every write is a ``BEGIN IMMEDIATE`` transaction, and a partial update
reads, merges and writes inside that one transaction, so concurrent updates (from this process or
another one sharing the file) never lose each other's changes or leave half a persona behind.
SQLite runs on one worker thread, so the event loop never waits for a disk flush.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..errors import BadRequest
from ..sqlite import SqliteWorker

MAX_SHORT = 200
"""Characters in a name, title, degree, institution or list item."""
MAX_LONG = 1000
"""Characters in the personality's style description."""
MAX_ITEMS = 50
"""Items in any list (languages, projects, traits, ...)."""

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Education:
    degree: str
    year: str
    """Always a string, as in the seed's API: ``"2019"``, ``"third year"``, ``"expected 2026"``."""
    institution: str


@dataclass(frozen=True, slots=True)
class Technical:
    languages: tuple[str, ...]
    web_stack: tuple[str, ...]
    projects: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Personality:
    style: str
    interests: tuple[str, ...]
    goals: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Persona:
    name: str
    title: str
    education: Education
    technical: Technical
    personality: Personality
    traits: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "education": {"degree": self.education.degree, "year": self.education.year,
                          "institution": self.education.institution},
            "technical": {"languages": list(self.technical.languages),
                          "webStack": list(self.technical.web_stack),
                          "projects": list(self.technical.projects)},
            "personality": {"style": self.personality.style,
                            "interests": list(self.personality.interests),
                            "goals": list(self.personality.goals)},
            "traits": list(self.traits),
        }

    @classmethod
    def from_dict(cls, data: object) -> Persona:
        """A whole persona from JSON; :class:`BadRequest` names the first field that is wrong."""
        obj = _object(data, "persona", ("name", "title", "education", "technical", "personality",
                                        "traits"))
        technical = _object(obj.get("technical"), "technical", ("languages", "webStack", "projects"))
        personality = _object(obj.get("personality"), "personality", ("style", "interests", "goals"))
        return cls(
            name=_text(obj.get("name"), "name"),
            title=_text(obj.get("title"), "title"),
            education=_education(obj.get("education"), None),
            technical=Technical(
                languages=_texts(technical.get("languages"), "technical.languages"),
                web_stack=_texts(technical.get("webStack"), "technical.webStack"),
                projects=_texts(technical.get("projects"), "technical.projects"),
            ),
            personality=Personality(
                style=_text(personality.get("style"), "personality.style", MAX_LONG),
                interests=_texts(personality.get("interests"), "personality.interests"),
                goals=_texts(personality.get("goals"), "personality.goals"),
            ),
            traits=_texts(obj.get("traits"), "traits"),
        )

    def with_details(self, details: Mapping[str, Any]) -> Persona:
        """This persona with ``name``, ``title`` and/or ``education`` changed (``POST /persona``).

        ``education`` may be partial: the fields it names replace the current ones.
        """
        obj = _object(details, "body", ("name", "title", "education"),
                      hint="use POST /persona/update to replace the whole configuration")
        if not obj:
            raise BadRequest("nothing to update: give 'name', 'title' and/or 'education'")
        changes: dict[str, Any] = {}
        if "name" in obj:
            changes["name"] = _text(obj["name"], "name")
        if "title" in obj:
            changes["title"] = _text(obj["title"], "title")
        if "education" in obj:
            changes["education"] = _education(obj["education"], self.education)
        return dataclasses.replace(self, **changes)


def _object(value: object, where: str, allowed: tuple[str, ...], hint: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"'{where}' must be an object" if where != "persona"
                         else "the persona must be a JSON object")
    unknown = sorted(k for k in value if k not in allowed)
    if unknown:
        prefix = "" if where in ("persona", "body") else f"{where}."
        names = ", ".join(f"'{prefix}{k}'" for k in unknown)
        expected = ", ".join(allowed)
        raise BadRequest(f"unknown field(s) {names}; expected {expected}" + (f" ({hint})" if hint else ""))
    return value


def _text(value: object, field: str, limit: int = MAX_SHORT) -> str:
    if value is None:
        raise BadRequest(f"'{field}' is required")
    if not isinstance(value, str):
        raise BadRequest(f"'{field}' must be a string")
    text = value.strip()
    if not text:
        raise BadRequest(f"'{field}' must not be empty")
    if len(text) > limit:
        raise BadRequest(f"'{field}' is longer than {limit} characters")
    return text


def _texts(value: object, field: str) -> tuple[str, ...]:
    if value is None:
        raise BadRequest(f"'{field}' is required (a list of strings, possibly empty)")
    if not isinstance(value, list):
        raise BadRequest(f"'{field}' must be a list of strings")
    if len(value) > MAX_ITEMS:
        raise BadRequest(f"'{field}' has more than {MAX_ITEMS} items")
    return tuple(_text(item, f"{field}[{i}]") for i, item in enumerate(value))


MAX_YEAR = 40
"""Characters in ``education.year`` ("2019", "expected 2026", "third year of four")."""


def _year(value: object) -> str:
    # The seed's type is a string; a bare number is refused rather than guessed at, so what a
    # client reads back is exactly what it wrote.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise BadRequest(f"'education.year' must be a string (e.g. \"{value}\"), not a number")
    return _text(value, "education.year", MAX_YEAR)


def _education(value: object, current: Education | None) -> Education:
    obj = _object(value, "education", ("degree", "year", "institution"))
    degree = current.degree if current and "degree" not in obj else \
        _text(obj.get("degree"), "education.degree")
    year = current.year if current and "year" not in obj else _year(obj.get("year"))
    institution = current.institution if current and "institution" not in obj else \
        _text(obj.get("institution"), "education.institution")
    return Education(degree=degree, year=year, institution=institution)


DEFAULT_PERSONA = Persona(
    name="Alex Rivera",
    title="Senior Software Engineer",
    education=Education(
        degree="B.Sc. in Computer Science",
        year="2016",
        institution="University of Washington",
    ),
    technical=Technical(
        languages=("Python", "TypeScript", "Go", "SQL"),
        web_stack=("React", "Node.js", "aiohttp", "PostgreSQL", "Redis", "Docker", "Kubernetes"),
        projects=(
            "A real-time video relay that streams one avatar session to hundreds of browsers",
            "An open-source library for typed, retrying HTTP clients",
            "A dashboard that turns Prometheus metrics into plain-language incident summaries",
        ),
    ),
    personality=Personality(
        style="Friendly and direct; explains technical ideas with everyday examples and "
              "keeps answers short",
        interests=("distributed systems", "developer tooling", "rock climbing",
                   "mentoring new engineers"),
        goals=("lead the design of a large-scale streaming platform",
               "give a conference talk on WebRTC", "mentor more first-time contributors"),
    ),
    traits=("curious", "pragmatic", "patient", "detail-oriented"),
)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS persona (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    body TEXT NOT NULL,
    revision INTEGER NOT NULL,
    updated_at REAL NOT NULL
)
"""


class PersonaStore:
    """The persona, persisted in SQLite (``Settings.persona_db``); seeded with a default."""

    def __init__(self, path: str | Path, default: Persona = DEFAULT_PERSONA) -> None:
        self._default = default
        self._db = SqliteWorker(path, "persona", self._setup)

    def _setup(self, db: sqlite3.Connection) -> None:
        # A rollback journal, not WAL: two processes opening a new file at once can both try
        # to switch it to WAL, and the loser fails at once ("database is locked") instead of
        # waiting. Writes are rare and tiny; the busy timeout covers every lock we take.
        db.execute("PRAGMA synchronous=FULL")
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(_SCHEMA)
            db.execute("INSERT OR IGNORE INTO persona VALUES (1, ?, 1, ?)",
                       (json.dumps(self._default.to_dict()), time.time()))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    async def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        return await self._db.run(work)

    async def open(self) -> None:
        """Create the file and the default persona now, so a bad path fails at start-up."""
        await self._run(lambda db: None)

    async def get(self) -> Persona:
        return await self._run(_read)

    async def revision(self) -> int:
        """How many times the persona was written (1: the default); for tests and diagnostics."""
        def work(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT revision FROM persona WHERE id = 1").fetchone()
            return int(row[0])

        return await self._run(work)

    async def replace(self, persona: Persona) -> Persona:
        return await self._run(lambda db: _write(db, lambda _: persona))

    async def update_details(self, details: Mapping[str, Any]) -> Persona:
        """Apply :meth:`Persona.with_details` to the stored persona, atomically."""
        return await self._run(lambda db: _write(db, lambda old: old.with_details(details)))

    async def close(self) -> None:
        await self._db.close()


def _read(db: sqlite3.Connection) -> Persona:
    row = db.execute("SELECT body FROM persona WHERE id = 1").fetchone()
    # Validated on the way in; a row that fails here was edited by hand: a real fault (500).
    return Persona.from_dict(_upgrade(json.loads(row[0])))


def _upgrade(body: Any) -> Any:
    """A row written before ``education.year`` became a string (the seed's type) held a number
    there; it reads back as that number's digits instead of failing validation."""
    education = body.get("education") if isinstance(body, dict) else None
    if isinstance(education, dict):
        year = education.get("year")
        if isinstance(year, int) and not isinstance(year, bool):
            education["year"] = str(year)
    return body


def _write(db: sqlite3.Connection, change: Callable[[Persona], Persona]) -> Persona:
    # IMMEDIATE takes the write lock before the read, so no other writer slips in between.
    db.execute("BEGIN IMMEDIATE")
    try:
        persona = change(_read(db))
        db.execute("UPDATE persona SET body = ?, revision = revision + 1, updated_at = ? "
                   "WHERE id = 1", (json.dumps(persona.to_dict()), time.time()))
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return persona
