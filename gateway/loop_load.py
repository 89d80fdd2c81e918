"""How busy a process's event loop is, for admission control.

A gateway past its capacity does not slow down gracefully: viewers' ICE and DTLS retransmit,
RTCP piles up, every viewer's video stalls together (measured: one worker at 160 viewers on
a third of a core went from 30 fps to 0 for all of them). So a new viewer is refused (503,
Retry-After) while the process that would carry it is saturated.

The signal is the share of wall time the loop spent running callbacks rather than waiting in
``select()``, smoothed over a few seconds. Unlike CPU time it also sees a loop that is held back
(a CPU budget, a busy neighbour on the core); unlike callback lateness it does not jump with
one long fan-out, and a join burst of a fraction of a second moves it only a little.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

SMOOTHING = 3.0
"""Seconds: the time constant of the moving average."""


class LoopLoad:
    """The smoothed busy share (0 to 1) of the loop it was installed on."""

    def __init__(self, smoothing: float = SMOOTHING) -> None:
        self._smoothing = smoothing
        self._busy = 0.0
        self._last = time.perf_counter()
        """When the previous ``select()`` returned."""

    @classmethod
    def install(cls, loop: asyncio.AbstractEventLoop) -> LoopLoad | None:
        """Measure ``loop`` from now on (once per loop), or None if it has no selector to
        time (e.g. uvloop): the gateway then admits viewers without this check."""
        selector = getattr(loop, "_selector", None)  # asyncio's selector loops (private)
        if selector is None:
            return None
        if isinstance(selector, _TimedSelector):
            return selector.load
        load = cls()
        loop._selector = _TimedSelector(selector, load)  # type: ignore[attr-defined]
        return load

    def busy(self) -> float:
        """The share as of now: time since the last ``select()`` counts as busy, so a loop
        stuck in one long callback reads as loaded."""
        now = time.perf_counter()
        return self._blend(self._busy, 1.0, now - self._last)

    def _waited(self, started: float, ended: float) -> None:
        busy, idle = max(0.0, started - self._last), ended - started
        if busy + idle > 0:
            self._busy = self._blend(self._busy, busy / (busy + idle), busy + idle)
        self._last = ended

    def _blend(self, average: float, share: float, seconds: float) -> float:
        weight = 1.0 - math.exp(-seconds / self._smoothing)
        return average + weight * (share - average)


class _TimedSelector:
    """Passes everything to the loop's own selector, timing ``select()``."""

    def __init__(self, inner: Any, load: LoopLoad) -> None:
        self._inner = inner
        self.load = load

    def select(self, timeout: float | None = None) -> Any:
        started = time.perf_counter()
        try:
            return self._inner.select(timeout)
        finally:
            self.load._waited(started, time.perf_counter())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
