"""Session lifecycle shared by the HeyGen and LiveAvatar emulations.

One :class:`SimSession` per provider session, one :class:`SessionBook` per simulator. The
book enforces what costs money at the real providers: the per-account concurrency limit, the
idle timeout, the session duration limit, and the expiry of sessions created but never started
(INFERRED: HeyGen and LiveAvatar both reap those; the simulator closes them after
``SimSettings.start_timeout`` with reason ``never_started``). Every transition is written to
the :class:`~gateway.sim.ledger.Ledger`.

States follow HeyGen's ``new → connecting → connected → closing → closed``: ``connecting``
while the avatar joins the room, ``connected`` once it publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import re
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from aiohttp import web

from ..config import QualityTier
from ..errors import GatewayError
from ..upstream.base import AvatarEvent, EventType, SpeakResult
from .config import SimSettings
from .ledger import Ledger
from .livekit import LiveKitServer
from .room import AvatarParticipant, AvatarSpec, Room

logger = logging.getLogger(__name__)

Job = Callable[[], Awaitable[None]]

_JOB_QUEUE = 64
_CLOSED_KEPT = 1024
_CLOSE_ROOM_TIMEOUT = 10.0


class Provider(enum.StrEnum):
    HEYGEN = "heygen"
    LIVEAVATAR = "liveavatar"


class State(enum.StrEnum):
    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSING = "closing"
    CLOSED = "closed"


class SimApiError(Exception):
    """A provider API error; each provider subclass shapes its own body."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


class AvatarGone(RuntimeError):
    """The session is open but its avatar left the room (a fault, or a crash)."""


class SimSession:
    """One provider session. Subclasses say how events look on the wire and what clients'
    data packets and voice activity mean."""

    provider: ClassVar[Provider]
    event_topic: ClassVar[str] = ""

    def __init__(self, *, session_id: str, avatar_id: str, quality: QualityTier,
                 video_codec: str, voice: str, knowledge_base: str, mode: str,
                 idle_timeout: float | None, duration_limit: float,
                 livekit_room: str | None = None, avatar_identity: str | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.id = session_id
        self.avatar_id = avatar_id
        self.quality = quality
        self.video_codec = video_codec
        self.voice = voice
        self.knowledge_base = knowledge_base
        self.mode = mode
        self.idle_timeout = idle_timeout
        """None: the idle timeout is disabled."""
        self.duration_limit = duration_limit
        self.state = State.NEW
        self.created = loop.time()
        self.created_at = time.time()
        """Unix time, for listings."""
        self.started: float | None = None
        self.last_activity = self.created
        self.room: Room | None = None
        self.room_name = livekit_room or session_id
        """The LiveKit room the avatar joins: the session's own, named after it, unless the
        client brought its own room (LiveAvatar ``livekit_config``, HeyGen
        ``livekit_settings``)."""
        self.own_room = livekit_room is None
        """False for a client's room: the session ends by taking its avatar out, not by
        closing a room others are in."""
        self.avatar_identity = avatar_identity or "heygen"
        """The avatar's identity in the room: the one the client's token names, if any."""
        self.stop_reason: str | None = None
        self.closed = asyncio.Event()
        self.watchdog: asyncio.Task[None] | None = None
        self._jobs: asyncio.Queue[Job] = asyncio.Queue(_JOB_QUEUE)
        self._worker: asyncio.Task[None] | None = None
        self._speech_done: dict[str, asyncio.Future[None]] = {}
        self._finished: deque[str] = deque(maxlen=64)

    # -- what subclasses define ------------------------------------------------------------

    def wire(self, event: AvatarEvent) -> bytes | None:
        """The data packet an avatar event becomes (None: not sent)."""
        raise NotImplementedError

    def on_data(self, sender: str, topic: str, payload: bytes) -> None:
        """A client sent a data packet into the room."""

    def on_voice(self, identity: str, kind: str) -> None:
        """Voice activity in a client's microphone while the room is listening."""

    async def before_close(self, reason: str) -> None:
        """Last words into the room before it closes."""

    async def after_close(self) -> None:
        """The room is closed (or the avatar left a client's room); the session is ``closed``.
        Must not raise."""

    # -- shared behaviour ------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.state not in (State.CLOSING, State.CLOSED)

    @property
    def counts_toward_limit(self) -> bool:
        return self.is_open

    def touch(self) -> None:
        """User activity: the idle timer starts over."""
        self.last_activity = asyncio.get_running_loop().time()

    def deadline(self, settings: SimSettings) -> tuple[float, str]:
        """When the session ends by itself if nothing happens, and why."""
        if self.started is None:
            return self.created + settings.start_timeout, "never_started"
        deadline, reason = self.started + self.duration_limit, "duration_limit"
        if self.idle_timeout is not None and self.last_activity + self.idle_timeout < deadline:
            deadline, reason = self.last_activity + self.idle_timeout, "idle_timeout"
        return deadline, reason

    def avatar_spec(self) -> AvatarSpec:
        return AvatarSpec(quality=self.quality, voice=self.voice, video_codec=self.video_codec,
                          event_topic=self.event_topic, encode_event=self._encode,
                          identity=self.avatar_identity)

    def avatar(self) -> AvatarParticipant:
        avatar = self.room.avatar if self.room is not None else None
        if avatar is None:
            raise AvatarGone(f"session {self.id}: the avatar is not in the room")
        return avatar

    def _encode(self, event: AvatarEvent) -> bytes | None:
        # The avatar reports every event through this hook: it is also where a sync task
        # learns that its speech ended.
        if event.type is EventType.AVATAR_STOP_TALKING and event.task_id is not None:
            self._finished.append(event.task_id)
            waiter = self._speech_done.pop(event.task_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        return self.wire(event)

    async def speak(self, text: str, *, wait: bool = False) -> SpeakResult:
        """Speak ``text``; with ``wait`` return only after ``avatar_stop_talking`` (or once
        the session closes). Raises :class:`AvatarGone` if the avatar leaves first."""
        avatar = self.avatar()
        result = await avatar.speak(text)
        if not wait or result.task_id in self._finished:
            return result
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._speech_done[result.task_id] = waiter
        # Bounded: an avatar that never reports the end must not hold the request.
        give_up = loop.time() + result.duration_ms / 1000.0 + 10.0
        try:
            while not waiter.done():
                if self.room is None or self.room.avatar is not avatar:
                    raise AvatarGone(f"session {self.id}: the avatar left while speaking")
                if loop.time() > give_up:
                    raise TimeoutError(f"task {result.task_id} never reported its end")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.25):
                        await asyncio.shield(waiter)
        finally:
            self._speech_done.pop(result.task_id, None)
        return result

    def submit(self, job: Job) -> bool:
        """Run ``job`` after the ones before it (room commands keep their order)."""
        if not self.is_open:
            return False
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(
                self._work(), name=f"sim-session-{self.id}")
        try:
            self._jobs.put_nowait(job)
        except asyncio.QueueFull:
            logger.warning("session %s: %d commands pending, dropping one", self.id, _JOB_QUEUE)
            return False
        return True

    async def _work(self) -> None:
        while True:
            job = await self._jobs.get()
            try:
                await job()
            except (SimApiError, GatewayError, AvatarGone, TimeoutError) as exc:
                logger.warning("session %s: command failed: %s", self.id, exc)

    async def _shutdown(self) -> None:
        # Release sync tasks; their handlers see the new state and answer with it.
        for waiter in self._speech_done.values():
            if not waiter.done():
                waiter.set_result(None)
        self._speech_done.clear()
        tasks = [t for t in (self._worker, self.watchdog)
                 if t is not None and t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


class SessionBook:
    """Every session of both providers: limits, timers, start and stop, ledger rows."""

    def __init__(self, settings: SimSettings, ledger: Ledger, livekit: LiveKitServer) -> None:
        self.settings = settings
        self.ledger = ledger
        self.livekit = livekit
        self._open: dict[str, SimSession] = {}
        self._closed: OrderedDict[str, SimSession] = OrderedDict()

    def get(self, session_id: str, provider: Provider) -> SimSession | None:
        """An open or recently closed session of ``provider``."""
        session = self._open.get(session_id) or self._closed.get(session_id)
        return session if session is not None and session.provider is provider else None

    def open_sessions(self, provider: Provider | None = None) -> list[SimSession]:
        return [s for s in self._open.values() if provider is None or s.provider is provider]

    def at_capacity(self, provider: Provider) -> bool:
        used = sum(1 for s in self.open_sessions(provider) if s.counts_toward_limit)
        return used >= self.settings.concurrency_limit

    def add(self, session: SimSession) -> None:
        self._open[session.id] = session
        self.ledger.created(session.id, provider=str(session.provider), avatar=session.avatar_id,
                            quality=session.quality.name, mode=session.mode)
        self._watch(session)
        logger.info("%s session %s created (%s, %s)", session.provider, session.id,
                    session.avatar_id, session.quality.name)

    def create_room(self, session: SimSession) -> Room:
        if session.room is None:
            session.room = self.livekit.create_room(session.room_name)
            session.room.on_data = session.on_data
            session.room.on_voice = session.on_voice
        return session.room

    async def start(self, session: SimSession) -> None:
        """Bring the avatar into the room; ``connected`` once it publishes."""
        session.state = State.CONNECTING
        room = self.create_room(session)
        try:
            async with asyncio.timeout(self.settings.avatar_start_timeout):
                await room.start_avatar(session.avatar_spec())
        except BaseException:
            await self.stop(session, "start_failed")
            raise
        if session.state is not State.CONNECTING:
            return  # stopped (expired, shut down) while the avatar was joining
        session.state = State.CONNECTED
        session.started = asyncio.get_running_loop().time()
        session.touch()
        self.ledger.started(session.id)
        self._watch(session)
        logger.info("%s session %s connected", session.provider, session.id)

    async def stop(self, session: SimSession, reason: str) -> None:
        """Close the room, end the ledger row. A second call (or a call while closing) waits
        for the first to finish and changes nothing."""
        if session.state in (State.CLOSING, State.CLOSED):
            await session.closed.wait()
            return
        session.state = State.CLOSING
        session.stop_reason = reason
        try:
            await session._shutdown()
            if session.room is not None:
                try:
                    async with asyncio.timeout(_CLOSE_ROOM_TIMEOUT):
                        if session.room.avatar is not None:
                            await session.before_close(reason)
                        await self._close_room(session, reason)
                except TimeoutError:
                    logger.error("session %s: closing the room took over %.0f s", session.id,
                                 _CLOSE_ROOM_TIMEOUT)
        finally:
            session.state = State.CLOSED
            await session.after_close()
            self._open.pop(session.id, None)
            self._closed[session.id] = session
            while len(self._closed) > _CLOSED_KEPT:
                self._closed.popitem(last=False)
            session.closed.set()  # before the ledger write: a failing write must not hang waiters
            billed = self.ledger.stopped(session.id, reason)
            logger.info("%s session %s closed (%s), billed %.1f s", session.provider, session.id,
                        reason, billed)

    async def _close_room(self, session: SimSession, reason: str) -> None:
        room = session.room
        assert room is not None
        if session.own_room or room.closed:
            # Clients learn why from the LeaveRequest: shutdown vs. session ended.
            await room.close("server_shutdown" if reason == "shutdown" else "room_deleted")
            return
        # A client's own room: the avatar (and any agent) leave, the others stay.
        room.on_data = room.on_voice = None
        for agent in list(room.agents):
            room.remove_agent(agent)
        if room.avatar is not None:
            await room.avatar.leave()
        if not room.clients:
            await room.close("room_deleted")  # nobody left in it: forget it

    async def close_all(self, reason: str) -> None:
        sessions = list(self._open.values())
        results = await asyncio.gather(*(self.stop(s, reason) for s in sessions),
                                       return_exceptions=True)
        for session, result in zip(sessions, results, strict=True):
            if isinstance(result, BaseException):
                logger.error("session %s did not close cleanly", session.id, exc_info=result)

    def _watch(self, session: SimSession) -> None:
        if session.watchdog is not None:
            session.watchdog.cancel()
        session.watchdog = asyncio.get_running_loop().create_task(
            self._watchdog(session), name=f"sim-watchdog-{session.id}")

    async def _watchdog(self, session: SimSession) -> None:
        loop = asyncio.get_running_loop()
        while True:
            deadline, reason = session.deadline(self.settings)
            delay = deadline - loop.time()
            if delay <= 0:
                break
            await asyncio.sleep(delay)
        # Stop in its own task: stop() cancels and awaits the watchdog, which must not be us.
        stopper = loop.create_task(self.stop(session, reason), name=f"sim-expire-{session.id}")
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(stopper)


def livekit_url(request: web.Request, settings: SimSettings) -> str:
    """The LiveKit URL that points back at this simulator, as the client reached it."""
    base = settings.public_url.rstrip("/") or f"{request.scheme}://{request.host}"
    if base.startswith("https://"):
        return "wss://" + base[len("https://"):]
    if base.startswith("http://"):
        return "ws://" + base[len("http://"):]
    return base


def new_session_id() -> str:
    """A UUID v1 like HeyGen's (``eba59f0d-71f5-11ef-…``), with a random node instead of the
    host's MAC address."""
    return str(uuid.uuid1(node=uuid.uuid4().int & (1 << 48) - 1 | 1 << 40))


# -- the simulator's "LLM" ------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9']{3,}")
_SENTENCE = re.compile(r"[^.!?]+[.!?]*")
_ANSWER_CHARS = 300
_STOP_WORDS = frozenset((
    "the", "and", "are", "was", "were", "what", "when", "where", "which", "who", "whom", "why",
    "how", "does", "did", "can", "could", "would", "should", "will", "you", "your", "yours",
    "our", "ours", "for", "with", "this", "that", "these", "those", "there", "their", "from",
    "about", "have", "has", "had", "not", "but", "all", "any"))


def _keywords(text: str) -> set[str]:
    # Crude stemming ("opens" ~ "open") is enough for a deterministic stand-in.
    return {w.removesuffix("s") for w in _WORD.findall(text.lower()) if w not in _STOP_WORDS}


def answer(question: str, knowledge_base: str = "") -> str:
    """The simulator's deterministic stand-in for the provider's LLM (HeyGen ``talk``,
    LiveAvatar ``avatar.speak_response``).

    With a knowledge base: the knowledge-base sentence sharing the most keywords with the
    question (words of three or more letters, case-folded, common function words ignored, a
    trailing "s" dropped; ties go to the earliest sentence). Without one, or with no keyword
    in common: ``"You said: <question>"``. At most 300 characters.
    """
    question = " ".join(question.split())
    words = _keywords(question)
    best, best_score = "", 0
    for sentence in _SENTENCE.findall(knowledge_base):
        sentence = " ".join(sentence.split())
        score = len(words & _keywords(sentence))
        if score > best_score:
            best, best_score = sentence, score
    reply = best or f"You said: {question}"
    return reply[:_ANSWER_CHARS]
