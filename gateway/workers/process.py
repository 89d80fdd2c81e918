"""A fan-out worker: viewers' peer connections, fed frames the owner packetized once.

Started by the owner (``pool.py``) as ``python -m gateway.workers.process CONTROL_FD
MEDIA_FD``. It never encodes and never talks HTTP: the owner forwards each viewer's
negotiation here as a call, sends each packetized frame once per worker, and this process
hands it to its viewers' :class:`~gateway.media.rtp.RtpStream` s exactly as the in-process
hub would. What the owner needs back — viewer states, keyframe requests, a controller's
microphone, metric operations — goes up the control socket.

The process ends when the control socket closes (the owner stopped or died): a worker never
outlives its owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections import defaultdict
from typing import Any, cast

import av

from ..errors import GatewayError, NotFound
from ..events import CurrentSpeech
from ..logs import configure as configure_logging
from ..loop_load import LoopLoad
from ..media.hub import FastStart, Hub, Subscriber, deliver_all
from ..media.rtp import RtpFrame
from ..metrics import Metrics
from ..runtime import freeze_heap
from ..viewers.aiortc_hooks import configure_ice_host_addresses, prepare_peer_connections
from ..viewers.peer import Viewer, rtc_configuration
from ..viewers.whep import Offer, SdpFragment
from .wire import MAX_MEDIA_MESSAGE, Control, parse_media

logger = logging.getLogger(__name__)

METRICS_FLUSH = 0.25
"""Seconds between metric batches to the owner (metric operations are per event, not per
packet: a batch is a few dozen tuples)."""


class MetricsRelay:
    """Looks like :class:`~gateway.metrics.Metrics` to a viewer; every ``inc``/``dec``/
    ``set``/``observe`` is recorded and shipped to the owner, which applies it to its own
    registry. So the owner's ``/metrics`` counts every worker's viewers, with no per-process
    files and no second registry to merge."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, tuple[str, ...], str, float]] = []

    def __getattr__(self, name: str) -> _RelayedMetric:
        return _RelayedMetric(self.pending, name, ())


class _RelayedMetric:
    def __init__(self, pending: list[tuple[str, tuple[str, ...], str, float]], name: str,
                 labels: tuple[str, ...]) -> None:
        self._pending, self._name, self._labels = pending, name, labels

    def labels(self, *values: str) -> _RelayedMetric:
        return _RelayedMetric(self._pending, self._name, values)

    def _record(self, op: str, amount: float) -> None:
        self._pending.append((self._name, self._labels, op, amount))

    def inc(self, amount: float = 1) -> None:
        self._record("inc", amount)

    def dec(self, amount: float = 1) -> None:
        self._record("dec", amount)

    def set(self, value: float) -> None:
        self._record("set", value)

    def observe(self, value: float) -> None:
        self._record("observe", value)


class SessionFeed:
    """One session's viewers in this worker: the :class:`~gateway.media.hub.Fanout` their
    streams attach to. The first stream of a kind/codec subscribes this worker at the owner
    (whose hub starts it on a recent keyframe or asks for one); later video streams start on
    this feed's own recent frames, or ask for their own keyframe."""

    def __init__(self, worker: Worker, session_id: str, fast_start_frames: int) -> None:
        self._worker = worker
        self.session_id = session_id
        self.subscribers: dict[str, set[Subscriber]] = defaultdict(set)
        self._fast_start_frames = fast_start_frames
        self._fast_starts: dict[str, FastStart] = {}
        self.closed = False

    @staticmethod
    def check_codec(codec: str) -> None:
        Hub.check_codec(codec)

    def attach(self, subscriber: Subscriber) -> bool:
        if self.closed:
            return False
        self._add(subscriber, f"{subscriber.kind}/{subscriber.lane}", "join")
        return True

    def _add(self, subscriber: Subscriber, key: str, reason: str | None) -> None:
        """``reason``: why ``subscriber`` needs a keyframe (``join``, ``switch``). None, a try
        up: nothing is asked for here; it moves at the lane's next keyframe (periodic, or the
        one the owner starts this worker's feed of that lane with)."""
        subscribers = self.subscribers[key]
        subscribers.add(subscriber)
        if len(subscribers) == 1:
            if subscriber.kind == "video":  # anew: an earlier subscription's frames are stale
                self._fast_starts[key] = FastStart(self._fast_start_frames)
            self._worker.control.send("subscribe", self.session_id, key)
            if reason == "switch":  # the owner's replay of recent frames is too old to move on
                self.request_keyframe(reason, key.partition("/")[2])
        elif subscriber.kind == "video" and reason is not None:
            fast_start = self._fast_starts.get(key)
            if reason == "join" and fast_start is not None and fast_start.replay(subscriber):
                self._worker.metrics.fast_starts.inc()
            else:
                self.request_keyframe(reason, key.partition("/")[2])

    def detach(self, subscriber: Subscriber) -> None:
        for key in [k for k, members in self.subscribers.items() if subscriber in members]:
            self._remove(subscriber, key)

    def _remove(self, subscriber: Subscriber, key: str) -> None:
        subscribers = self.subscribers.get(key)
        if subscribers is None or subscriber not in subscribers:
            return
        subscribers.discard(subscriber)
        if not subscribers and not self.closed:
            self._worker.control.send("unsubscribe", self.session_id, key)

    def join_lane(self, subscriber: Subscriber, lane: str, urgent: bool) -> None:
        if not self.closed:
            self._add(subscriber, f"video/{lane}", "switch" if urgent else None)

    def leave_lane(self, subscriber: Subscriber, lane: str) -> None:
        self._remove(subscriber, f"video/{lane}")

    def request_keyframe(self, reason: str, lane: str = "vp8") -> None:
        self._worker.control.send("keyframe", self.session_id, lane, reason)

    def count_dropped(self, kind: str, count: int) -> None:
        self._worker.metrics.packets_dropped.labels(kind).inc(count)

    def count_feedback(self, kind: str) -> None:
        self._worker.metrics.rtcp_feedback.labels(kind).inc()

    def deliver(self, key: str, frame: RtpFrame) -> None:
        subscribers = self.subscribers.get(key)
        if subscribers:
            fast_start = self._fast_starts.get(key)  # video only
            if fast_start is not None:
                fast_start.add(frame)
            deliver_all(frame, subscribers)


class Worker:
    def __init__(self, control: Control, media: socket.socket, settings: dict[str, Any]) -> None:
        self.control = control
        self._media = media
        self._settings = settings
        self.metrics = MetricsRelay()
        self._rtc = rtc_configuration(settings["ice_servers"], settings["ice_username"],
                                      settings["ice_credential"])
        self._viewers: dict[str, Viewer] = {}
        self._session_of: dict[str, str] = {}  # viewer id -> session id
        self._feeds: dict[str, SessionFeed] = {}
        self._speech: dict[str, CurrentSpeech] = {}
        """Per session with viewers here: the utterance in progress (see ``new_viewer``)."""
        self._buffer = bytearray(MAX_MEDIA_MESSAGE)
        self._tasks: set[asyncio.Task[None]] = set()
        self._load: LoopLoad | None = None

    # -- media ------------------------------------------------------------------------------

    def _on_media(self) -> None:
        view = memoryview(self._buffer)
        while True:
            try:
                size = self._media.recv_into(view)
            except (BlockingIOError, InterruptedError):
                return
            if size == 0:
                return
            try:
                session_id, key, frame = parse_media(view[:size])
            except (ValueError, IndexError, UnicodeDecodeError) as exc:
                logger.error("bad media message from the owner: %s", exc)
                continue
            feed = self._feeds.get(session_id)
            if feed is not None:
                feed.deliver(key, frame)

    # -- calls from the owner -----------------------------------------------------------------

    def _feed(self, session_id: str) -> SessionFeed:
        feed = self._feeds.get(session_id)
        if feed is None:
            feed = self._feeds[session_id] = SessionFeed(
                self, session_id, self._settings["fast_start_frames"])
        return feed

    def _new_viewer(self, session_id: str, viewer_id: str, client: str) -> Viewer:
        viewer = Viewer(self._feed(session_id), self._rtc, cast(Metrics, self.metrics),
                        self._viewer_closed, client=client, viewer_id=viewer_id,
                        on_state=self._viewer_state, adaptive=self._settings["adaptive_quality"],
                        speech=self._speech.setdefault(session_id, CurrentSpeech()))
        self._viewers[viewer_id] = viewer
        self._session_of[viewer_id] = session_id
        return viewer

    def _microphone(self, viewer_id: str) -> Any:
        async def forward(frame: av.AudioFrame) -> None:
            pcm = frame.to_ndarray().tobytes()
            self.control.send("microphone", viewer_id, pcm, frame.sample_rate,
                              frame.layout.name, frame.format.name)
        return forward

    async def call_answer(self, session_id: str, viewer_id: str, client: str, offer: Offer,
                          microphone: bool) -> str:
        """WHEP: the owner parsed and checked the offer; it arrives parsed (one parse less)."""
        viewer = self._new_viewer(session_id, viewer_id, client)
        try:
            return await viewer.negotiate(offer,
                                          self._microphone(viewer_id) if microphone else None)
        except BaseException:
            await viewer.close("negotiation_failed")
            raise

    async def call_offer(self, session_id: str, viewer_id: str, client: str,
                         microphone: bool) -> str:
        viewer = self._new_viewer(session_id, viewer_id, client)
        try:
            return await viewer.offer(self._microphone(viewer_id) if microphone else None)
        except BaseException:
            await viewer.close("negotiation_failed")
            raise

    def _viewer(self, viewer_id: str) -> Viewer:
        viewer = self._viewers.get(viewer_id)
        if viewer is None:
            raise NotFound(f"no viewer {viewer_id!r}")
        return viewer

    async def call_accept_answer(self, viewer_id: str, sdp: str) -> None:
        await self._viewer(viewer_id).accept_answer(sdp)

    async def call_add_candidates(self, viewer_id: str, fragment: SdpFragment) -> None:
        await self._viewer(viewer_id).add_candidates(fragment)

    async def call_expire(self, viewer_id: str, seconds: float) -> None:
        self._viewer(viewer_id).expire_unless_connected(seconds)

    async def call_close(self, viewer_id: str, reason: str) -> None:
        viewer = self._viewers.get(viewer_id)
        if viewer is not None:
            await viewer.close(reason)

    async def call_end_session(self, session_id: str) -> None:
        self._speech.pop(session_id, None)
        feed = self._feeds.pop(session_id, None)
        if feed is not None:
            feed.closed = True
        viewers = [self._viewers[v] for v, s in self._session_of.items() if s == session_id]
        await asyncio.gather(*(v.close("session_closed") for v in viewers),
                             return_exceptions=True)

    async def call_sample_stats(self) -> None:
        for viewer in tuple(self._viewers.values()):
            with contextlib.suppress(Exception):  # one closing under us; the next sample is fine
                await viewer.sample_stats()

    async def call_stats(self) -> dict[str, int]:
        """What a leak check reads: this process's viewers, tasks and open descriptors."""
        return {"viewers": len(self._viewers), "feeds": len(self._feeds),
                "tasks": len(asyncio.all_tasks()), "fds": len(os.listdir("/proc/self/fd")),
                "pid": os.getpid()}

    def broadcast(self, session_id: str, kind: str, payload: str) -> None:
        speech = self._speech.get(session_id)
        if speech is not None:
            speech.track(kind, payload)
        for viewer_id, session in tuple(self._session_of.items()):
            if session == session_id:
                self._viewers[viewer_id].send_event(payload)

    # -- what goes up -------------------------------------------------------------------------

    def _viewer_state(self, viewer: Viewer) -> None:
        self.control.send("state", viewer.id, viewer.state, viewer.close_reason)

    def _viewer_closed(self, viewer: Viewer) -> None:
        self._viewers.pop(viewer.id, None)
        self.control.send("closed", viewer.id, viewer.close_reason)
        session_id = self._session_of.pop(viewer.id, None)
        if session_id is not None and session_id not in self._session_of.values():
            self._speech.pop(session_id, None)
            feed = self._feeds.pop(session_id, None)
            if feed is not None:
                feed.closed = True

    async def _flush_metrics(self) -> None:
        """Metric operations, and how busy this worker's loop is (the owner places new
        viewers by it)."""
        while True:
            await asyncio.sleep(METRICS_FLUSH)
            if self.metrics.pending:
                batch, self.metrics.pending = self.metrics.pending, []
                self.control.send("metrics", batch)
            if self._load is not None:
                self.control.send("load", round(self._load.busy(), 3))

    # -- the loop ---------------------------------------------------------------------------

    def _run_call(self, call_id: int, method: str, args: tuple[Any, ...]) -> None:
        async def run() -> None:
            try:
                result = await getattr(self, f"call_{method}")(*args)
            except GatewayError as exc:
                self.control.send("reply", call_id, False, exc)
            except Exception as exc:
                logger.exception("worker call %s failed", method)
                self.control.send("reply", call_id, False,
                                  GatewayError(f"{method} failed in a fan-out worker: {exc}"))
            else:
                self.control.send("reply", call_id, True, result)

        task = asyncio.get_running_loop().create_task(run(), name=f"worker-{method}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._load = LoopLoad.install(loop)
        self._media.setblocking(False)
        loop.add_reader(self._media.fileno(), self._on_media)
        flusher = loop.create_task(self._flush_metrics(), name="worker-metrics")
        try:
            while (message := await self.control.receive()) is not None:
                op = message[0]
                if op == "call":
                    self._run_call(message[1], message[2], message[3])
                elif op == "event":
                    self.broadcast(message[1], message[2], message[3])
                elif op == "speech":  # the owner's, as a viewer of the session is placed here
                    self._speech[message[1]] = CurrentSpeech(message[2])
        finally:
            loop.remove_reader(self._media.fileno())
            flusher.cancel()
            await asyncio.gather(*(v.close("worker_stopped") for v in tuple(self._viewers.values())),
                                 return_exceptions=True)
            for task in tuple(self._tasks):
                task.cancel()
            self._media.close()
            await self.control.close()


async def main(control_fd: int, media_fd: int) -> None:
    control = await Control.open(socket.socket(fileno=control_fd))
    media = socket.socket(fileno=media_fd)
    hello = await control.receive()
    if hello is None or hello[0] != "settings":
        raise SystemExit("the owner sent no settings")
    settings: dict[str, Any] = hello[1]
    configure_logging(settings["log_level"], settings["log_format"])
    configure_ice_host_addresses(settings["ice_host_addresses"])
    await prepare_peer_connections()
    freeze_heap()
    started = time.monotonic()
    logger.info("fan-out worker %d ready", os.getpid())
    await Worker(control, media, settings).run()
    logger.info("fan-out worker %d stopped after %.0f s", os.getpid(), time.monotonic() - started)


if __name__ == "__main__":
    # The owner ends workers by closing their control socket; a terminal's Ctrl-C reaches the
    # whole process group, and the owner handles it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
