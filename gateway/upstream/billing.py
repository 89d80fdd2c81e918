"""The billing guard: nothing a provider bills is ever unknown to the journal, and nothing the
journal knows stays open.

Two ways a paid session could escape the gateway, and what this module does about each:

* **A create call answered too late.** HeyGen's ``streaming.new`` opens (and bills) a session
  whose id the gateway learns only from the answer. Before the call an *intent* is journaled
  (its time window); when the call fails without a clear answer (timeout, connection lost, 5xx,
  an answer we cannot read, cancelled), the guard asks the provider's ``streaming.list`` which
  sessions are open and stops the ones this gateway must have created (see :meth:`_reconcile`
  for how it tells them from other applications' sessions on the same key). LiveAvatar needs no
  intent: ``sessions/token`` hands out the id before the billed ``sessions/start``, and the
  upstream journals that id first, so an ambiguous start is answered by stopping that id.
* **A stop that fails.** The journal row stays, and the guard retries the stop in the background
  with capped exponential backoff until the provider confirms it or says the session is gone;
  ``avatargw_upstream_stops_pending`` counts them. A restart finds the rows (and intents) in
  the journal and does the same before it serves.

One asyncio task owns the retries; :meth:`BillingGuard.close` ends it (after one last bounded
try) so nothing outlives the application.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError
from ..errors import (
    Conflict,
    GatewayError,
    UpstreamAuthError,
    UpstreamQuotaExceeded,
    UpstreamSessionGone,
)
from ..journal import Intent, JournalEntry, SessionJournal
from ..metrics import Metrics

logger = logging.getLogger(__name__)

CLOCK_SLACK = 1.0
"""Seconds added to each side of an intent's window: ``streaming.list`` reports ``created_at``
in whole seconds (truncated), and the provider's clock is not ours."""

MAX_UNCLEAR_PASSES = 5
"""Reconcile passes that found more candidate sessions than failed calls before the guard gives
up on them (and says so in the log): stopping a session it cannot attribute could end another
application's session."""

DEFINITE_FAILURES: tuple[type[GatewayError], ...] = (
    UpstreamQuotaExceeded, UpstreamAuthError, UpstreamSessionGone, Conflict)
"""Create failures that prove no session was opened (the provider refused outright)."""

Stopper = Callable[[JournalEntry], Awaitable[None]]
"""Stops one journaled session; returns when the provider confirmed or said it is gone,
raises :class:`~gateway.errors.UpstreamError` otherwise."""

Lister = Callable[[], Awaitable[list[dict[str, Any]]]]
"""The provider's open sessions on this key: ``[{session_id, status, created_at}, ...]``."""


@dataclass(frozen=True, slots=True)
class BillingPolicy:
    interval: float = 5.0
    """Reconcile interval, and the first delay before a failed stop is retried."""
    max_delay: float = 300.0
    """Cap of the stop retries' exponential backoff."""
    call_timeout: float = 15.0
    """The provider calls' timeout: a create call cannot open a session later than this after
    it was sent (as far as the gateway can know), and it bounds the last try at shutdown."""

    def __post_init__(self) -> None:
        if not (self.interval > 0 and self.max_delay >= self.interval and self.call_timeout > 0):
            raise ConfigError("upstream_reconcile_interval must be positive and at most "
                              "upstream_stop_retry_max")

    def backoff(self, attempts: int) -> float:
        return min(self.max_delay, self.interval * 2.0 ** min(attempts - 1, 30))


@dataclass(slots=True)
class _PendingStop:
    entry: JournalEntry
    attempts: int = 0
    due: float = 0.0


@dataclass(slots=True)
class _PendingIntent:
    intent: Intent
    window_end: float
    due: float = 0.0
    unclear: int = 0
    attempts: int = 0


@dataclass(slots=True)
class _State:
    stops: dict[tuple[str, str], _PendingStop] = field(default_factory=dict)
    intents: dict[str, _PendingIntent] = field(default_factory=dict)
    in_flight: dict[str, Intent] = field(default_factory=dict)
    """Create calls under way, by nonce: their sessions may be in a list without a row yet."""
    forget: dict[str, float] = field(default_factory=dict)
    """Intents whose call failed definitely, by nonce: when to delete their journal rows."""


class BillingGuard:
    def __init__(self, journal: SessionJournal, metrics: Metrics, policy: BillingPolicy) -> None:
        self.journal = journal
        self._metrics = metrics
        self._policy = policy
        self._stoppers: dict[str, Stopper] = {}
        self._listers: dict[str, Lister] = {}
        self._state = _State()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def register(self, provider: str, stop: Stopper, lister: Lister | None = None) -> None:
        """Say how to stop (and, for providers whose create is ambiguous, list) sessions."""
        self._stoppers[provider] = stop
        if lister is not None:
            self._listers[provider] = lister

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="billing-guard")
            self._task.add_done_callback(_report_death)

    async def close(self) -> None:
        """End the retry task, after one last try at everything pending (bounded by the call
        timeout). What is still open then stays in the journal for the next start."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._policy.call_timeout):
                await self._pass(everything=True)
        self._state.stops.clear()
        self._gauge()

    @property
    def stops_pending(self) -> int:
        return len(self._state.stops)

    @property
    def intents_pending(self) -> int:
        return len(self._state.intents) + len(self._state.in_flight)

    # -- create calls -----------------------------------------------------------------------

    async def begin(self, provider: str) -> Intent:
        """Journal an intent before a billed create call whose answer carries the id."""
        now = time.time()
        intent = Intent(secrets.token_hex(8), provider, now,
                        now + self._policy.call_timeout + CLOCK_SLACK)
        await self.journal.intended(intent)
        self._state.in_flight[intent.nonce] = intent
        return intent

    async def created(self, intent: Intent, session_id: str, stop_info: dict[str, Any]) -> None:
        """The call answered with a session: its row replaces the intent."""
        await self.journal.opened_for(intent.nonce, intent.provider, session_id, stop_info)
        self._state.in_flight.pop(intent.nonce, None)

    def failed(self, intent: Intent, exc: BaseException) -> None:
        """The call failed. Synchronous, so it works from a cancelled task too: the guard's
        task does the journal work. A definite refusal opened nothing; anything else may have."""
        if self._state.in_flight.pop(intent.nonce, None) is None:
            return
        if isinstance(exc, DEFINITE_FAILURES):
            self._state.forget[intent.nonce] = 0.0
        else:
            logger.warning("%s: a create call failed without a clear answer (%s); reconciling "
                           "with the provider's list of open sessions", intent.provider,
                           getattr(exc, "message", None) or type(exc).__name__)
            end = min(intent.window_end, time.time() + CLOCK_SLACK)
            self._state.intents[intent.nonce] = _PendingIntent(intent, end, due=0.0)
        self._wake.set()

    def settled(self, intent: Intent) -> None:
        """The session is known (its row written, or being stopped): the intent is moot."""
        if self._state.in_flight.pop(intent.nonce, None) is not None:
            self._state.forget[intent.nonce] = 0.0
            self._wake.set()

    # -- stops ------------------------------------------------------------------------------

    async def opened(self, provider: str, session_id: str, stop_info: dict[str, Any]) -> None:
        await self.journal.opened(provider, session_id, stop_info)

    async def closed(self, provider: str, session_id: str) -> None:
        await self.journal.closed(provider, session_id)

    def stop_later(self, provider: str, session_id: str, stop_info: dict[str, Any]) -> None:
        """A stop failed (or was cut short): retry it in the background until the provider
        confirms. Synchronous, for the same reason as :meth:`failed`."""
        key = (provider, session_id)
        if provider not in self._stoppers:
            logger.error("%s session %s: no way to stop it is configured", provider, session_id)
        elif key not in self._state.stops:
            entry = JournalEntry(provider, session_id, time.time(), dict(stop_info))
            self._state.stops[key] = _PendingStop(entry, attempts=1,
                                                  due=time.monotonic() + self._policy.backoff(1))
            self._gauge()
            self._wake.set()

    async def reap(self) -> int:
        """At start, before serving: stop what the journal says a previous run left open, and
        reconcile its unanswered create calls. What fails now is retried in the background.
        Returns how many sessions were stopped."""
        stopped = 0
        for entry in await self.journal.entries():
            if entry.provider not in self._stoppers:
                logger.error("journal: orphan %s session %s but no %s key is configured",
                             entry.provider, entry.session_id, entry.provider)
                continue
            pending = _PendingStop(entry)
            self._state.stops[(entry.provider, entry.session_id)] = pending
            if await self._try_stop(pending):
                logger.warning("journal: stopped orphan %s session %s left by a previous run",
                               entry.provider, entry.session_id)
                stopped += 1
        for intent in await self.journal.intents():
            self._state.intents[intent.nonce] = _PendingIntent(intent, intent.window_end)
        stopped += await self._reconcile_due(time.monotonic(), everything=True)
        self._gauge()
        self._wake.set()  # what failed now is due later: the task must know
        return stopped

    # -- the task ---------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            delay = self._next_due() - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(None if math.isinf(delay) else delay):
                        await self._wake.wait()
                continue
            await self._pass()

    def _next_due(self) -> float:
        s = self._state
        dues = ([p.due for p in s.stops.values()] + [p.due for p in s.intents.values()]
                + list(s.forget.values()))
        return min(dues, default=math.inf)

    async def _pass(self, *, everything: bool = False) -> None:
        now = time.monotonic()
        for nonce, due in tuple(self._state.forget.items()):
            if not (everything or due <= now):
                continue
            if await _journal_ok(self.journal.settled(nonce)):
                self._state.forget.pop(nonce, None)
            else:
                self._state.forget[nonce] = now + self._policy.interval
        await self._reconcile_due(now, everything=everything)
        for pending in tuple(self._state.stops.values()):
            if everything or pending.due <= now:
                await self._try_stop(pending)
        self._gauge()

    async def _try_stop(self, pending: _PendingStop) -> bool:
        entry = pending.entry
        key = (entry.provider, entry.session_id)
        pending.attempts += 1
        try:
            # The row must outlive this process until the provider confirms.
            await self.journal.kept(entry.provider, entry.session_id, entry.stop_info)
            await self._stoppers[entry.provider](entry)
            await self.journal.closed(entry.provider, entry.session_id)
        except (GatewayError, sqlite3.Error, OSError) as exc:
            delay = self._policy.backoff(pending.attempts)
            pending.due = time.monotonic() + delay
            logger.warning("%s session %s: stop failed (try %d, next in %.1f s): %s",
                           entry.provider, entry.session_id, pending.attempts, delay,
                           getattr(exc, "message", None) or repr(exc))
            return False
        if self._state.stops.pop(key, None) is not None and pending.attempts > 1:
            logger.info("%s session %s stopped after %d tries", entry.provider,
                        entry.session_id, pending.attempts)
        return True

    async def _reconcile_due(self, now: float, *, everything: bool) -> int:
        due = {p.intent.provider for p in self._state.intents.values()
               if everything or p.due <= now}
        # All of a provider's unanswered calls at once: sessions are matched against the
        # calls together (two calls that failed together opened two sessions).
        by_provider: dict[str, list[_PendingIntent]] = {}
        for pending in self._state.intents.values():
            if pending.intent.provider in due:
                by_provider.setdefault(pending.intent.provider, []).append(pending)
        stopped = 0
        for provider, pendings in by_provider.items():
            if any(i.provider == provider for i in self._state.in_flight.values()):
                # Another create of ours is under way: its session may be listed before its
                # row is written. Wait for it to answer rather than take its session.
                for pending in pendings:
                    pending.due = now + self._policy.interval
                continue
            stopped += await self._reconcile(provider, pendings)
        return stopped

    async def _reconcile(self, provider: str, pendings: list[_PendingIntent]) -> int:
        """Find and stop the sessions that this provider opened for failed create calls.

        HeyGen's ``streaming.list`` gives only ``session_id``, ``status`` and ``created_at``
        for every session on the key, this gateway's and any other application's alike; no
        field names the caller. So a session counts as ours only if all of these hold:

        * its ``created_at`` lies inside the window of one of our unanswered calls (sent
          before it, could not have been answered after our timeout), widened by
          :data:`CLOCK_SLACK`;
        * its status is ``new``: we never started it (our call failed before we could), while
          an application that got its answer starts its session at once;
        * no journal row claims it (our live sessions, stops being retried) and no other
          create of ours is still under way (see :meth:`_reconcile_due`);
        * there are no more such sessions than failed calls. If there are more, another
          application created one in the same seconds and we cannot tell which is ours:
          nothing is stopped, and the next pass (``interval`` later) looks again, when the
          other application will have started its session. After :data:`MAX_UNCLEAR_PASSES`
          the guard gives up and logs the ids for an operator.

        That is the best the provider's API allows: a session another application created in
        the same seconds and left unstarted is indistinguishable from ours.
        """
        lister = self._listers.get(provider)
        if lister is None:
            for pending in pendings:
                logger.error("journal: an unanswered %s create call, but no %s key is "
                             "configured to reconcile it", provider, provider)
                self._state.intents.pop(pending.intent.nonce, None)
            return 0
        try:
            listed = await lister()
            claimed = {e.session_id for e in await self.journal.entries()
                       if e.provider == provider}
        except (GatewayError, sqlite3.Error, OSError) as exc:
            for pending in pendings:
                pending.attempts += 1
                pending.due = time.monotonic() + self._policy.backoff(pending.attempts)
            logger.warning("%s: could not reconcile %d unanswered create call(s): %s", provider,
                           len(pendings), getattr(exc, "message", None) or repr(exc))
            return 0
        candidates = [s for s in listed if _candidate(s, claimed, pendings)]
        now = time.monotonic()
        if len(candidates) > len(pendings):
            ids = ", ".join(str(s.get("session_id")) for s in candidates)
            for pending in pendings:
                pending.unclear += 1
                pending.due = now + self._policy.interval
            if pendings[0].unclear < MAX_UNCLEAR_PASSES:
                logger.warning("%s: %d unstarted sessions (%s) match %d unanswered create "
                               "call(s); waiting to tell ours from another application's",
                               provider, len(candidates), ids, len(pendings))
                return 0
            logger.error("%s: giving up attributing sessions %s to %d unanswered create "
                         "call(s); stop the ones that are this gateway's by hand", provider,
                         ids, len(pendings))
            candidates = []
        stopped = 0
        for listed_session in candidates:
            session_id = str(listed_session["session_id"])
            entry = JournalEntry(provider, session_id, time.time(), {"session_id": session_id})
            logger.warning("%s session %s: opened by a create call that failed without a clear "
                           "answer; stopping it", provider, session_id)
            self._metrics.upstream_reconciled.labels(provider).inc()
            pending_stop = self._state.stops.setdefault((provider, session_id),
                                                        _PendingStop(entry))
            if await self._try_stop(pending_stop):
                stopped += 1
        wall = time.time()
        for pending in pendings:
            if pending.unclear >= MAX_UNCLEAR_PASSES or wall >= pending.window_end:
                if await _journal_ok(self.journal.settled(pending.intent.nonce)):
                    self._state.intents.pop(pending.intent.nonce, None)
                else:
                    pending.due = now + self._policy.interval
            else:
                # Once more after the window closed: a session the list did not show yet.
                pending.due = now + max(pending.window_end - wall, 0.0)
        self._gauge()
        return stopped

    def _gauge(self) -> None:
        counts: dict[str, int] = dict.fromkeys(self._stoppers, 0)
        for provider, _ in self._state.stops:
            counts[provider] = counts.get(provider, 0) + 1
        for provider, count in counts.items():
            self._metrics.upstream_stops_pending.labels(provider).set(count)


def _candidate(listed: dict[str, Any], claimed: set[str],
               pendings: list[_PendingIntent]) -> bool:
    session_id, created = listed.get("session_id"), listed.get("created_at")
    if not isinstance(session_id, str | int) or isinstance(created, bool) \
            or not isinstance(created, int | float) or str(session_id) in claimed:
        return False
    if listed.get("status") != "new":
        return False
    return any(math.floor(p.intent.started_at - CLOCK_SLACK) <= created <= p.window_end
               for p in pendings)


async def _journal_ok(work: Awaitable[None]) -> bool:
    try:
        await work
    except (sqlite3.Error, OSError) as exc:
        logger.error("journal write failed: %r", exc)
        return False
    return True


def _report_death(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.critical("the billing guard stopped: failed stops are no longer retried",
                        exc_info=task.exception())
