"""The audience of one session: its viewers (one peer connection each), and their limits.

A viewer joins by WHEP (it offers, the gateway answers) or the seed API's way (the gateway
offers, the browser answers later). Connected viewers count toward the session's maximum;
viewers still connecting count only up to a bounded share, and a few per client, so that a
client posting offers it never completes cannot keep everyone else out.

With fan-out workers (:mod:`gateway.workers`) a viewer's peer connection lives in a worker
process and the audience holds its :class:`~gateway.workers.pool.RemoteViewer`, which has a
local viewer's interface; the naive baseline's hub cannot feed workers, so its viewers stay here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable

import av

from .config import Settings
from .errors import CapacityError, NotFound, Saturated
from .events import CurrentSpeech
from .loop_load import LoopLoad
from .media.hub import Hub
from .media.naive import NaiveHub
from .metrics import Metrics
from .viewers.peer import Viewer, rtc_configuration
from .viewers.whep import parse_offer
from .workers.pool import RemoteViewer, WorkerPool

Microphone = Callable[[av.AudioFrame], Awaitable[None]]
"""Where a controller's microphone audio goes (the session's upstream)."""

VIEWER_FAILURES = {
    "ice_failed": "viewer ICE failed: no candidate pair answered (the viewer cannot reach an "
                  "address the gateway offered, or the other way round)",
    "dtls_failed": "viewer DTLS failed: the encrypted handshake did not complete",
    "connect_timeout": "viewer did not connect in time: no ICE check arrived",
}
"""Close reasons that mean a player could not connect, as the session's status says them."""

AnyViewer = Viewer | RemoteViewer
"""A viewer in this process, or the handle on one in a fan-out worker."""


class Audience:
    def __init__(
        self,
        session_id: str,
        hub: Hub | NaiveHub,
        settings: Settings,
        metrics: Metrics,
        *,
        require_live: Callable[[], None],
        microphone: Microphone | None,
        workers: WorkerPool | None = None,
    ) -> None:
        """``require_live`` raises unless the session takes viewers; ``microphone`` is None
        when the upstream does not listen (then no offer gets two-way audio); ``workers``
        hold the peer connections when there are any."""
        self._session_id = session_id
        self._hub = hub
        self._settings = settings
        self._metrics = metrics
        self._require_live = require_live
        self._microphone = microphone
        self._workers = workers if isinstance(hub, Hub) else None
        self._viewers: dict[str, AnyViewer] = {}
        self._speech = CurrentSpeech()
        self.failures: dict[str, int] = {}
        """Viewers that could not connect, by close reason (:data:`VIEWER_FAILURES`)."""
        self.last_failure: tuple[str, float] | None = None
        """The latest such reason, and when (wall clock)."""
        self._rtc = rtc_configuration(
            settings.ice_servers, settings.ice_username, settings.ice_credential.reveal()
        )

    def __len__(self) -> int:
        return len(self._viewers)

    def viewers(self) -> tuple[AnyViewer, ...]:
        return tuple(self._viewers.values())

    def viewer(self, viewer_id: str) -> AnyViewer:
        try:
            return self._viewers[viewer_id]
        except KeyError:
            raise NotFound(f"no viewer {viewer_id!r} in session {self._session_id}") from None

    async def add_viewer(self, offer_sdp: str, microphone: bool = True,
                         client: str = "", rung: int = 0) -> tuple[AnyViewer, str]:
        """WHEP: the viewer offers, the gateway answers. ``microphone``: a controller's offer
        of two-way audio carries its microphone to the avatar; a viewer's never does.
        ``client`` says who asks (address and token), for the per-client limit. ``rung``:
        the best rung of the quality ladder the viewer may have."""
        offer = dataclasses.replace(parse_offer(offer_sdp), rung=rung)
        viewer = self._new_viewer(client)
        try:
            answer = await viewer.negotiate(offer, self._microphone if microphone else None)
        except BaseException:
            await viewer.close("negotiation_failed")
            raise
        viewer.expire_unless_connected(self._settings.viewer_connect_timeout)
        return viewer, answer

    async def add_offering_viewer(self, client: str = "") -> tuple[AnyViewer, str]:
        """The seed API (HeyGen v1 style): the gateway offers; the browser answers later
        through :meth:`Viewer.accept_answer`."""
        viewer = self._new_viewer(client)
        try:
            offer = await viewer.offer(self._microphone)
        except BaseException:
            await viewer.close("negotiation_failed")
            raise
        viewer.expire_unless_connected(self._settings.viewer_connect_timeout)
        return viewer, offer

    def _new_viewer(self, client: str) -> AnyViewer:
        self._require_live()
        settings, session_id = self._settings, self._session_id
        pending = [v for v in self._viewers.values() if v.state == "connecting"]
        if sum(v.client == client for v in pending) >= settings.max_pending_viewers_per_client:
            raise CapacityError(
                f"this client already has {settings.max_pending_viewers_per_client} viewers of "
                f"session {session_id} that have not connected; finish or delete those first",
                retry_after=5)
        if len(pending) >= settings.max_pending_viewers_per_session:
            raise CapacityError(f"session {session_id} has {len(pending)} viewers still "
                                "connecting; try again in a few seconds", retry_after=5)
        if len(self._viewers) >= settings.max_viewers_per_session:
            raise CapacityError(
                f"session {session_id} has its maximum of "
                f"{settings.max_viewers_per_session} viewers", retry_after=10)
        viewer: AnyViewer
        if self._workers is not None:
            viewer = self._workers.new_viewer(session_id, client, self._viewer_closed,
                                              self._speech.payloads)
        else:
            self._require_room_here()
            viewer = Viewer(self._hub, self._rtc, self._metrics, self._viewer_closed,
                            client=client, speech=self._speech,
                            adaptive=settings.adaptive_quality)
        self._viewers[viewer.id] = viewer
        return viewer

    def _require_room_here(self) -> None:
        """Without workers, viewers live on this process's loop: none is added while it is
        saturated (workers are checked the same way when one is picked)."""
        limit = self._settings.max_viewer_load
        load = LoopLoad.install(asyncio.get_running_loop())
        if limit < 1 and load is not None and (busy := load.busy()) >= limit:
            raise Saturated(f"the gateway is saturated (busy {busy:.0%} of the time lately); "
                            "try again shortly")

    def _viewer_closed(self, viewer: AnyViewer) -> None:
        self._viewers.pop(viewer.id, None)
        reason = viewer.close_reason
        if reason in VIEWER_FAILURES:
            self.failures[reason] = self.failures.get(reason, 0) + 1
            self.last_failure = (reason, time.time())

    def broadcast(self, kind: str, payload: str) -> None:
        """An event (its type, its JSON) to every viewer's data channel."""
        self._speech.track(kind, payload)
        for viewer in tuple(self._viewers.values()):
            viewer.send_event(payload)  # a no-op for a worker's viewer: it goes once per worker
        if self._workers is not None:
            self._workers.broadcast(self._session_id, kind, payload)

    async def close(self, reason: str) -> None:
        """Close every viewer; one that fails to close does not keep the others open."""
        await asyncio.gather(*(v.close(reason) for v in tuple(self._viewers.values())),
                             return_exceptions=True)
        if self._workers is not None:
            # A viewer still negotiating in a worker is not ours yet: the workers drop the rest.
            for worker in self._workers.workers:
                worker.notify_call("end_session", self._session_id)
