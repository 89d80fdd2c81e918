"""The upstream-session journal on real SQLite: rows survive the process, orphans are listed."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from gateway.journal import Intent, SessionJournal


async def test_open_close_and_list(tmp_path: Path) -> None:
    journal = SessionJournal(tmp_path / "state" / "journal.sqlite3")
    await journal.opened("heygen", "s1", {"x": 1})
    await journal.opened("liveavatar", "s2", {"session_token": "tok"})
    await journal.closed("heygen", "s1")
    entries = await journal.entries()
    assert [(e.provider, e.session_id, e.stop_info) for e in entries] == [
        ("liveavatar", "s2", {"session_token": "tok"})]
    await journal.closed("heygen", "never-opened")  # harmless
    await journal.close()


async def test_rows_survive_a_killed_process(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    script = (
        "import asyncio, os, signal\n"
        "from gateway.journal import SessionJournal\n"
        "async def main():\n"
        f"    j = SessionJournal({str(path)!r})\n"
        "    await j.opened('heygen', 'orphan', {'why': 'killed'})\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script)
    assert await asyncio.wait_for(proc.wait(), 30) == -9
    journal = SessionJournal(path)
    entries = await journal.entries()
    assert [(e.session_id, e.stop_info) for e in entries] == [("orphan", {"why": "killed"})]
    assert entries[0].opened_at > 0
    await journal.close()


async def test_an_intent_is_swapped_for_its_session_in_one_step(tmp_path: Path) -> None:
    journal = SessionJournal(tmp_path / "journal.sqlite3")
    answered, unanswered = Intent("n1", "heygen", 10.0, 30.0), Intent("n2", "heygen", 11.0, 31.0)
    await journal.intended(answered)
    await journal.intended(unanswered)
    await journal.opened_for("n1", "heygen", "s1", {"session_id": "s1"})
    assert [(e.session_id, e.stop_info) for e in await journal.entries()] == [
        ("s1", {"session_id": "s1"})]
    assert await journal.intents() == [unanswered]
    await journal.settled("n2")
    assert await journal.intents() == []
    await journal.kept("heygen", "s1", {"other": True})  # an existing row is kept as it is
    await journal.kept("heygen", "s2", {"session_id": "s2"})
    assert [(e.session_id, e.stop_info) for e in await journal.entries()] == [
        ("s1", {"session_id": "s1"}), ("s2", {"session_id": "s2"})]
    await journal.close()
