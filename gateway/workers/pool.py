"""The owner's side of the fan-out workers: start, feed, supervise, restart.

The owner (the process that serves HTTP and runs the sessions) keeps encoding once per codec.
A worker that holds viewers of a session's kind/codec is one :class:`WorkerLink` subscriber
of that session's hub, so each packetized frame is sent once per worker whatever its viewer
count. Viewers are placed on the worker with the fewest; the owner keeps a
:class:`RemoteViewer` for each, with the interface of a local
:class:`~gateway.viewers.peer.Viewer`, so the HTTP handlers and the session do not care
where a viewer lives.

A worker that dies loses only its viewers: their handles close (reason ``worker_died``), the
gauges they held are given back, the links leave the hubs, and the worker is started again
(with a back-off if it keeps dying). Calls in flight fail with a 503 the client may retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import secrets
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np
from prometheus_client import Gauge

from ..config import Settings
from ..errors import GatewayError, Saturated, ServiceUnavailable
from ..media.hub import Hub
from ..media.ladder import split_lane
from ..media.rtp import RtpFrame
from ..metrics import Metrics
from ..viewers.peer import new_viewer_id
from ..viewers.whep import Offer, SdpFragment
from .wire import Control, media_message, media_pair, send_media, split_kind

logger = logging.getLogger(__name__)

RESTART_BACKOFF = (0.2, 1.0, 5.0, 10.0)
MICROPHONE_QUEUE = 50  # 20 ms frames: 1 s of a controller's voice in flight at most
METRIC_OPS = frozenset({"inc", "dec", "set", "observe"})


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def default_worker_count(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """One worker per CPU this process may use: its affinity (cpusets), bounded by a cgroup v2
    CPU quota (a container limited to 2 CPUs on a 64-core host gets 2 workers, not 64)."""
    count = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    return count


class WorkerLink:
    """One worker's share of one session's video codec or audio: a hub subscriber that
    forwards each frame once. When the worker's socket is full the frame is dropped for that
    worker, and its video waits for a keyframe (asked for at once), like a slow viewer."""

    def __init__(self, worker: Worker, hub: Hub, session_id: str, key: str) -> None:
        self.kind, self.lane = split_kind(key)
        self.codec = split_lane(self.lane)[0] if self.kind == "video" else self.lane
        self._worker = worker
        self._hub = hub
        self._session = session_id.encode()
        self._key = key
        self.awaiting_keyframe = False
        self.dropped = 0

    def deliver(self, frame: RtpFrame) -> None:
        if self.awaiting_keyframe and not frame.keyframe:
            return
        if send_media(self._worker.media, media_message(self._session, self._key, frame)):
            self.awaiting_keyframe = False
            return
        self.dropped += 1
        self._hub.count_dropped(self.kind, len(frame.payloads))
        if self.kind == "video":
            self.awaiting_keyframe = True
            self._hub.request_keyframe("worker_overflow", self.lane)


class RemoteViewer:
    """The owner's handle on a viewer whose peer connection lives in a worker."""

    def __init__(self, worker: Worker, session_id: str, client: str,
                 on_closed: Callable[[RemoteViewer], None]) -> None:
        self.id = new_viewer_id()
        self.client = client
        self.etag = secrets.token_hex(8)
        self.created = time.monotonic()
        self.session_id = session_id
        self.worker = worker
        self.video_codec = ""
        self.close_reason: str | None = None
        self._state = "connecting"
        self._on_closed = on_closed
        self._closed = asyncio.Event()
        self._microphone: Callable[[av.AudioFrame], Awaitable[None]] | None = None
        self._mic_queue: asyncio.Queue[av.AudioFrame] | None = None
        self._mic_task: asyncio.Task[None] | None = None

    @property
    def state(self) -> str:
        return self._state

    def _listen(self, on_microphone: Callable[[av.AudioFrame], Awaitable[None]] | None) -> bool:
        self._microphone = on_microphone
        return on_microphone is not None

    async def negotiate(self, offer: Offer, on_microphone: Callable[[av.AudioFrame],
                        Awaitable[None]] | None = None) -> str:
        self.video_codec = offer.video_codec.name.lower() if offer.video_codec else ""
        answer: str = await self.worker.call("answer", self.session_id, self.id, self.client,
                                             offer, self._listen(on_microphone))
        return answer

    async def offer(self, on_microphone: Callable[[av.AudioFrame],
                    Awaitable[None]] | None = None) -> str:
        self.video_codec = "vp8"
        sdp: str = await self.worker.call("offer", self.session_id, self.id, self.client,
                                          self._listen(on_microphone))
        return sdp

    async def accept_answer(self, sdp: str) -> None:
        await self.worker.call("accept_answer", self.id, sdp)

    async def add_candidates(self, fragment: SdpFragment) -> None:
        await self.worker.call("add_candidates", self.id, fragment)

    def expire_unless_connected(self, timeout: float) -> None:
        self.worker.notify_call("expire", self.id, timeout)

    async def sample_stats(self) -> None:
        """The worker samples its own viewers (see :meth:`WorkerPool.sample_stats`)."""

    def send_event(self, payload: str) -> bool:
        """Events go once per worker (:meth:`WorkerPool.broadcast`), not once per viewer."""
        return False

    async def close(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
            with contextlib.suppress(GatewayError):
                await self.worker.call("close", self.id, reason)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await self._closed.wait()

    # -- from the worker ----------------------------------------------------------------------

    def on_state(self, state: str, reason: str | None) -> None:
        self._state = state
        if reason is not None and self.close_reason is None:
            self.close_reason = reason

    def on_microphone(self, frame: av.AudioFrame) -> None:
        if self._microphone is None:
            return
        if self._mic_queue is None:
            self._mic_queue = asyncio.Queue(MICROPHONE_QUEUE)
            self._mic_task = asyncio.get_running_loop().create_task(
                self._pump_microphone(self._microphone, self._mic_queue), name="remote-microphone")
        if self._mic_queue.full():
            return  # the upstream is not keeping up: drop, never grow
        self._mic_queue.put_nowait(frame)

    async def _pump_microphone(self, forward: Callable[[av.AudioFrame], Awaitable[None]],
                               queue: asyncio.Queue[av.AudioFrame]) -> None:
        while True:
            frame = await queue.get()
            try:
                await forward(frame)
            except GatewayError as exc:
                logger.warning("viewer %s: microphone audio refused: %s", self.id, exc.message)
                return

    def on_closed(self, reason: str | None, metrics: Metrics | None = None) -> None:
        """The worker closed it (or died: then ``metrics`` counts the disconnect the worker
        cannot; the gauges it held are given back by :meth:`Worker.lost`)."""
        if self._closed.is_set():
            return
        if metrics is not None:
            metrics.viewer_disconnects.labels(reason or "closed").inc()
        self._state = "closed"
        if self.close_reason is None:
            self.close_reason = reason or "closed"
        if self._mic_task is not None:
            self._mic_task.cancel()
        self._closed.set()
        self._on_closed(self)


class Worker:
    """One worker process and its two sockets."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.index = index
        self._pool = pool
        self.media: socket.socket
        self.control: Control
        self.process: asyncio.subprocess.Process | None = None
        self.viewers: dict[str, RemoteViewer] = {}
        self.links: dict[tuple[str, str], WorkerLink] = {}
        self.gauges_held: dict[tuple[str, tuple[str, ...]], float] = {}
        self.load = 0.0
        """How busy the worker's loop has been lately, as it last said (0 to 1)."""
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count()
        self.alive = False

    async def start(self) -> None:
        owner_control, worker_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        owner_media, worker_media = media_pair()
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.workers.process",
                str(worker_control.fileno()), str(worker_media.fileno()),
                pass_fds=(worker_control.fileno(), worker_media.fileno()))
        finally:
            worker_control.close()
            worker_media.close()
        self.media = owner_media
        self.load = 0.0
        self.control = await Control.open(owner_control)
        self.control.send("settings", self._pool.worker_settings)
        self.alive = True
        self._pool.count_alive()
        logger.info("fan-out worker %d started (pid %d)", self.index, self.process.pid)

    def notify_call(self, method: str, *args: Any) -> None:
        """A call whose answer nobody waits for."""
        if self.alive:
            self.control.send("call", -1, method, args)

    async def call(self, method: str, *args: Any) -> Any:
        if not self.alive:
            raise ServiceUnavailable("a fan-out worker is restarting; try again", retry_after=1)
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        try:
            self.control.send("call", call_id, method, args)
            return await future
        finally:
            self._calls.pop(call_id, None)

    async def serve(self) -> None:
        """Read what the worker says until it goes away."""
        pool, metrics = self._pool, self._pool.metrics
        while (message := await self.control.receive()) is not None:
            op = message[0]
            if op == "reply":
                future = self._calls.get(message[1])
                if future is not None and not future.done():
                    if message[2]:
                        future.set_result(message[3])
                    else:
                        future.set_exception(message[3])
            elif op == "state":
                viewer = self.viewers.get(message[1])
                if viewer is not None:
                    viewer.on_state(message[2], message[3])
            elif op == "closed":
                viewer = self.viewers.pop(message[1], None)
                if viewer is not None:
                    viewer.on_closed(message[2])
            elif op == "subscribe":
                self._subscribe(message[1], message[2])
            elif op == "unsubscribe":
                link = self.links.pop((message[1], message[2]), None)
                if link is not None:
                    link._hub.detach(link)
            elif op == "keyframe":
                hub = pool.hub_of(message[1])
                if hub is not None:
                    hub.request_keyframe(message[3], message[2])
            elif op == "microphone":
                self._microphone(*message[1:])
            elif op == "metrics":
                apply_metric_ops(metrics, message[1], self.gauges_held)
            elif op == "load":
                self.load = float(message[1])
                metrics.loop_busy.labels(f"worker-{self.index}").set(self.load)

    def _subscribe(self, session_id: str, key: str) -> None:
        hub = self._pool.hub_of(session_id)
        if hub is None or (session_id, key) in self.links:
            return
        link = WorkerLink(self, hub, session_id, key)
        if hub.attach(link):
            self.links[(session_id, key)] = link

    def _microphone(self, viewer_id: str, pcm: bytes, rate: int, layout: str, fmt: str) -> None:
        viewer = self.viewers.get(viewer_id)
        if viewer is None:
            return
        if fmt not in ("s16", "s16p"):  # what aiortc's Opus decoder gives
            return
        # Packed audio is one row of interleaved samples; planar one row per channel.
        rows = av.AudioLayout(layout).nb_channels if fmt == "s16p" else 1
        array = np.frombuffer(pcm, dtype=np.int16).reshape(rows, -1)
        frame = av.AudioFrame.from_ndarray(array, format=fmt, layout=layout)
        frame.sample_rate = rate
        viewer.on_microphone(frame)

    def lost(self) -> None:
        """The process is gone: fail its calls, close its viewers, leave the hubs."""
        self.alive = False
        self._pool.count_alive()
        for future in self._calls.values():
            if not future.done():
                future.set_exception(ServiceUnavailable(
                    "the fan-out worker holding this viewer stopped; try again", retry_after=1))
        for link in self.links.values():
            link._hub.detach(link)
        self.links.clear()
        for viewer in tuple(self.viewers.values()):
            viewer.on_closed("worker_died", self._pool.metrics)
        self.viewers.clear()
        # What its reports added to gauges, exactly: the owner's idea of its viewers' states
        # can be ahead of the last metrics batch that arrived (states are sent at once,
        # metrics every METRICS_FLUSH), and a guess left "connected" one short.
        for (name, labels), amount in self.gauges_held.items():
            if amount:
                gauge = getattr(self._pool.metrics, name)
                (gauge.labels(*labels) if labels else gauge).dec(amount)
        self.gauges_held.clear()
        self.media.close()


class WorkerPool:
    """``count`` fan-out workers, each restarted when it dies, until :meth:`close`."""

    def __init__(self, settings: Settings, metrics: Metrics, count: int,
                 hub_of: Callable[[str], Hub | None]) -> None:
        self.metrics = metrics
        self.hub_of = hub_of
        self._max_load = settings.max_viewer_load
        self.worker_settings = {
            "ice_servers": settings.ice_servers, "ice_username": settings.ice_username,
            "ice_credential": settings.ice_credential.reveal(),
            "ice_host_addresses": settings.ice_host_addresses,
            "fast_start_frames": settings.fast_start_frames,
            "adaptive_quality": settings.adaptive_quality,
            # The owner's level (a CLI flag, not a setting) and format.
            "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel()),
            "log_format": settings.log_format,
        }
        self.workers = [Worker(self, i) for i in range(count)]
        self._supervisors: list[asyncio.Task[None]] = []
        self._closing = False
        self.restarts = 0

    async def start(self) -> None:
        for worker in self.workers:
            await worker.start()
            self._supervisors.append(asyncio.get_running_loop().create_task(
                self._supervise(worker), name=f"fanout-worker-{worker.index}"))

    async def _supervise(self, worker: Worker) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            await worker.serve()
            worker.lost()
            assert worker.process is not None
            code = await worker.process.wait()
            await worker.control.close()
            if self._closing:
                return
            failures = 0 if time.monotonic() - started > 60 else failures + 1
            delay = RESTART_BACKOFF[min(failures, len(RESTART_BACKOFF) - 1)]
            logger.error("fan-out worker %d (pid %d) exited with %s; its viewers are closed, "
                         "restarting in %.1f s", worker.index, worker.process.pid, code, delay)
            self.restarts += 1
            self.metrics.worker_restarts.inc()
            await asyncio.sleep(delay)
            await worker.start()

    def count_alive(self) -> None:
        self.metrics.workers.set(sum(w.alive for w in self.workers))

    def pick(self) -> Worker:
        """The running worker with the fewest viewers among those that are not saturated."""
        alive = [w for w in self.workers if w.alive]
        if not alive:
            raise ServiceUnavailable("no fan-out worker is running; try again", retry_after=1)
        free = [w for w in alive if w.load < self._max_load] if self._max_load < 1 else alive
        if not free:
            raise Saturated(f"every fan-out worker is saturated (busy {max(w.load for w in alive):.0%}"
                            " of the time); try again shortly")
        return min(free, key=lambda w: len(w.viewers))

    def new_viewer(self, session_id: str, client: str, on_closed: Callable[[RemoteViewer], None],
                   speech: Sequence[str] = ()) -> RemoteViewer:
        """``speech``: the events of the utterance in progress (:class:`CurrentSpeech`). The
        worker takes them before any later event (one ordered socket), and from now on gets
        the session's events, so its viewers' channels open on the whole sentence."""
        worker = self.pick()
        viewer = RemoteViewer(worker, session_id, client, on_closed)
        worker.control.send("speech", session_id, list(speech))
        worker.viewers[viewer.id] = viewer
        return viewer

    def broadcast(self, session_id: str, kind: str, payload: str) -> None:
        for worker in self.workers:
            if worker.alive and any(v.session_id == session_id for v in worker.viewers.values()):
                worker.control.send("event", session_id, kind, payload)

    async def sample_stats(self) -> None:
        await asyncio.gather(*(w.call("sample_stats") for w in self.workers if w.alive),
                             return_exceptions=True)

    async def close(self) -> None:
        self._closing = True
        for worker in self.workers:
            if worker.alive:
                await worker.control.close()
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                try:
                    async with asyncio.timeout(10):
                        await worker.process.wait()
                except TimeoutError:
                    worker.process.kill()
                    await worker.process.wait()
        for task in self._supervisors:
            task.cancel()
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        self.metrics.workers.set(0)


def apply_metric_ops(metrics: Metrics, ops: list[tuple[str, tuple[str, ...], str, float]],
                     gauges_held: dict[tuple[str, tuple[str, ...]], float]) -> None:
    """A worker's metric operations, on the owner's registry (unknown names are ignored);
    what they add to gauges is summed in ``gauges_held``, to be given back if it dies."""
    for name, labels, op, amount in ops:
        metric = getattr(metrics, name, None)
        if metric is None or op not in METRIC_OPS or name.startswith("_"):
            continue
        try:
            target = metric.labels(*labels) if labels else metric
            getattr(target, op)(amount)
        except (AttributeError, ValueError, TypeError):
            logger.debug("worker metric %s %s %s refused", name, labels, op)
            continue
        if isinstance(metric, Gauge) and op in ("inc", "dec"):
            key = (name, labels)
            gauges_held[key] = gauges_held.get(key, 0.0) + (amount if op == "inc" else -amount)
