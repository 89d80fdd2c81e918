"""Fault injection: make the simulator misbehave on purpose, so reliability can be tested.

Two kinds of switch, both driven through the admin API (``gateway/sim/app.py``):

**Endpoint faults** (this module) act on REST requests to the provider APIs, before the
request is processed (so a failed request had no effect), for every session or for one::

    POST /sim/faults  {"endpoint": "/v1/streaming.task", "kind": "error", "status": 503,
                       "times": 2, "session_id": "<optional>"}         -> 201 {fault}
    GET /sim/faults                                                    -> {"faults": [...]}
    DELETE /sim/faults/{id}  |  DELETE /sim/faults[?session_id=...]     -> 204

* ``error``: answer ``status`` (500..599, default 503) with ``{"code", "message"}``.
* ``delay``: hold the request ``seconds``, then process it normally.
* ``late``: process the request at once (a ``streaming.new`` creates and bills its session),
  then hold the answer ``seconds``: a client that gave up before it never learns the result.
  This is the provider that answers after the client's timeout.
* ``hang``: hold the request ``seconds`` (default: the cap), then answer 504 without
  processing it. Always capped by ``SimSettings.fault_hang_cap`` and released at shutdown,
  so a forgotten switch cannot hang a test run forever.

``times`` limits how many requests a fault hits (default: until removed). Faults scoped to a
session match requests whose JSON body's ``session_id`` (or Bearer session token) names it;
they win over endpoint-wide ones; among equals the oldest wins.

**Session actions** act on a live session at once (they are not switches):
``POST /sim/sessions/{id}/drop_room`` (every client connection dropped abruptly),
``/avatar_leave`` (the avatar participant leaves the room, the session stays open),
``/expire`` (the session ends now, reason ``expired``, room closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any


class FaultKind(enum.StrEnum):
    ERROR = "error"
    DELAY = "delay"
    HANG = "hang"
    LATE = "late"


class FaultError(ValueError):
    """An admin request described a fault that cannot exist."""


@dataclass(slots=True)
class EndpointFault:
    id: str
    endpoint: str
    kind: FaultKind
    session_id: str | None
    status: int
    seconds: float
    remaining: int | None
    """Requests left to hit; None until removed."""
    hits: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "endpoint": self.endpoint, "kind": str(self.kind),
                "session_id": self.session_id, "status": self.status, "seconds": self.seconds,
                "remaining": self.remaining, "hits": self.hits}


@dataclass(frozen=True, slots=True)
class FaultOutcome:
    """What a fault did to a request: ``status`` None means process it normally."""

    fault: EndpointFault
    status: int | None
    message: str = ""
    late: float = 0.0
    """Seconds to hold the answer after processing (kind ``late``): see :meth:`hold`."""


class FaultBoard:
    def __init__(self, endpoints: Collection[str], *, hang_cap: float) -> None:
        self._endpoints = frozenset(endpoints)
        self._hang_cap = hang_cap
        self._faults: list[EndpointFault] = []
        self._ids = itertools.count(1)
        self._released = asyncio.Event()

    @property
    def endpoints(self) -> frozenset[str]:
        return self._endpoints

    def add(self, endpoint: str, kind: str, *, session_id: str | None = None,
            status: int | None = None, seconds: float | None = None,
            times: int | None = None) -> EndpointFault:
        if endpoint not in self._endpoints:
            raise FaultError(f"unknown endpoint {endpoint!r}; one of {sorted(self._endpoints)}")
        try:
            fault_kind = FaultKind(kind)
        except ValueError:
            raise FaultError(f"kind must be one of {[str(k) for k in FaultKind]}, "
                             f"got {kind!r}") from None
        if status is not None and (fault_kind is not FaultKind.ERROR or not 500 <= status <= 599):
            raise FaultError("status applies to kind 'error' and must be 500..599")
        if seconds is not None:
            if fault_kind is FaultKind.ERROR:
                raise FaultError("seconds applies to kinds 'delay', 'late' and 'hang'")
            if not 0 <= seconds <= self._hang_cap:
                raise FaultError(f"seconds must be 0..{self._hang_cap} (fault_hang_cap)")
        elif fault_kind in (FaultKind.DELAY, FaultKind.LATE):
            raise FaultError(f"a {str(fault_kind)!r} fault needs seconds")
        if times is not None and times < 1:
            raise FaultError("times must be at least 1 (omit it for 'until removed')")
        fault = EndpointFault(
            id=f"F{next(self._ids)}", endpoint=endpoint, kind=fault_kind, session_id=session_id,
            status=status if status is not None else (503 if fault_kind is FaultKind.ERROR else 504),
            seconds=seconds if seconds is not None else
            (self._hang_cap if fault_kind is FaultKind.HANG else 0.0),
            remaining=times,
        )
        self._faults.append(fault)
        return fault

    def remove(self, fault_id: str) -> bool:
        before = len(self._faults)
        self._faults = [f for f in self._faults if f.id != fault_id]
        return len(self._faults) != before

    def clear(self, session_id: str | None = None) -> int:
        """Remove every fault, or only those scoped to ``session_id``."""
        keep = [f for f in self._faults if session_id is not None and f.session_id != session_id]
        removed = len(self._faults) - len(keep)
        self._faults = keep
        return removed

    def list(self) -> list[EndpointFault]:
        return list(self._faults)

    def match(self, endpoint: str, session_id: str | None) -> EndpointFault | None:
        """The fault that hits this request (consuming one of its ``times``), if any."""
        candidates = [f for f in self._faults if f.endpoint == endpoint
                      and (f.session_id is None or f.session_id == session_id)]
        if not candidates:
            return None
        fault = next((f for f in candidates if f.session_id is not None), candidates[0])
        fault.hits += 1
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining == 0:
                self._faults.remove(fault)
        return fault

    async def apply(self, fault: EndpointFault) -> FaultOutcome:
        match fault.kind:
            case FaultKind.ERROR:
                return FaultOutcome(fault, fault.status,
                                    f"simulated fault {fault.id}: HTTP {fault.status}")
            case FaultKind.DELAY:
                await self._hold(fault.seconds)
                return FaultOutcome(fault, None)
            case FaultKind.LATE:
                return FaultOutcome(fault, None, late=fault.seconds)
            case FaultKind.HANG:
                await self._hold(min(fault.seconds, self._hang_cap))
                return FaultOutcome(fault, fault.status,
                                    f"simulated fault {fault.id}: the request hung "
                                    f"{fault.seconds:g} s and timed out")

    async def hold(self, outcome: FaultOutcome) -> None:
        """Hold a processed request's answer for a ``late`` fault (released at shutdown)."""
        if outcome.late > 0:
            await self._hold(outcome.late)

    async def _hold(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._released.wait(), seconds)

    def release(self) -> None:
        """End every hold now and skip future ones (shutdown must not wait on a hang)."""
        self._released.set()
