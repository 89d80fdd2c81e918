"""What the avatar of one session says: speech tasks, waits for their end, answers.

The talk rule lives here, once: what a user says to the avatar (typed as a ``talk`` task, or
spoken into a controller's microphone) is answered by the provider's own language model when
the upstream has one (:attr:`Upstream.answers_itself`), otherwise by the gateway's chat service,
whose answer is spoken sentence by sentence as the model writes it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

from .config import Settings
from .errors import BadRequest, Conflict, GatewayError
from .events import EventLog, Subscription
from .metrics import Metrics
from .upstream.base import AvatarEvent, EventType, SpeakResult, TaskMode, TaskType, Upstream

logger = logging.getLogger(__name__)

MAX_PENDING_TASKS = 256
"""Speak tasks remembered until their avatar_start_talking (for the latency histogram)."""
MAX_REPLIES = 2
"""Voice-chat replies in flight: one speaks while at most one more waits."""

Answerer = Callable[[str, str, str | None], AsyncGenerator[str, None]]
"""``(question, conversation id, the avatar's name) → the answer's sentences, to be spoken``:
the gateway's chat service."""


@dataclass(frozen=True, slots=True)
class SpokenAnswer:
    """What :meth:`Conversation.speak_sentences` queued: the text, one task per sentence."""

    text: str
    task_ids: tuple[str, ...]
    duration_ms: float


class Conversation:
    def __init__(
        self,
        session_id: str,
        upstream: Upstream,
        events: EventLog,
        settings: Settings,
        metrics: Metrics,
        *,
        answerer: Answerer,
        require_live: Callable[[], None],
        touch: Callable[[], None],
    ) -> None:
        """``require_live`` raises :class:`Conflict` unless the session is live; ``touch``
        tells it a controller used it (idle timer). ``session_id`` also names the chat's
        conversation, so the chat remembers what was said in this session."""
        self._session_id = session_id
        self._upstream = upstream
        self._events = events
        self._settings = settings
        self._metrics = metrics
        self._answerer = answerer
        self._require_live = require_live
        self._touch = touch
        self._answering = asyncio.Lock()
        self._replies: set[asyncio.Task[None]] = set()
        self._speak_submitted: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._speak_latency = metrics.speak_latency.labels(upstream.kind)

    @property
    def gateway_answers(self) -> bool:
        """The talk rule: the gateway's chat answers for an upstream without a model of its own."""
        return not self._upstream.answers_itself

    # -- speaking ----------------------------------------------------------------------------

    async def speak(self, text: str, task_type: TaskType = TaskType.REPEAT,
                    task_mode: TaskMode = TaskMode.ASYNC) -> SpeakResult | SpokenAnswer:
        """``repeat`` speaks the text; ``talk`` speaks an answer to it (see the talk rule):
        a :class:`SpokenAnswer` when the gateway's chat answered."""
        if task_type is TaskType.TALK and self.gateway_answers:
            if not text.strip():
                raise BadRequest("'text' is empty")
            return await self.answer(text, task_mode)
        return await self.speak_task(text, task_type, task_mode)

    async def speak_task(self, text: str, task_type: TaskType = TaskType.REPEAT,
                         task_mode: TaskMode = TaskMode.ASYNC) -> SpeakResult:
        """One task for the upstream, as it is (a ``talk`` is the provider's to answer)."""
        self._require_live()
        self._touch()
        if len(text) > self._settings.max_text_chars:
            raise BadRequest(f"text is longer than {self._settings.max_text_chars} characters")
        self._metrics.speak_requests.labels(self._upstream.kind, task_type).inc()
        if task_mode is TaskMode.ASYNC:
            return self._submitted(await self._upstream.speak(text, task_type))
        # Subscribe first: a short utterance could end before a later subscription started.
        subscription = self._events.subscribe()
        try:
            result = self._submitted(await self._upstream.speak(text, task_type))
            await self._spoken(subscription, result.task_id, result.duration_ms)
            return result
        finally:
            subscription.close()

    async def answer(self, question: str, task_mode: TaskMode = TaskMode.ASYNC) -> SpokenAnswer:
        """The gateway's chat answers ``question`` and the avatar speaks it, sentence by sentence."""
        async with contextlib.aclosing(self._answerer(question, self._session_id,
                                                     self._upstream.avatar_name)) as sentences:
            return await self.speak_sentences(sentences, task_mode)

    async def speak_sentences(self, sentences: AsyncIterator[str],
                              task_mode: TaskMode = TaskMode.ASYNC) -> SpokenAnswer:
        """Speak each sentence as it arrives (an answer streamed by the language model, so speech
        starts after its first sentence). One answer at a time: two never interleave."""
        spoken: list[str] = []
        task_ids: list[str] = []
        duration_ms = 0.0
        subscription = self._events.subscribe() if task_mode is TaskMode.SYNC else None
        try:
            async with self._answering:
                async for sentence in sentences:
                    result = await self.speak_task(sentence)
                    spoken.append(sentence)
                    task_ids.append(result.task_id)
                    duration_ms += result.duration_ms
            if subscription is not None and task_ids:
                await self._spoken(subscription, task_ids[-1], duration_ms)
        finally:
            if subscription is not None:
                subscription.close()
        return SpokenAnswer(" ".join(spoken), tuple(task_ids), round(duration_ms, 1))

    def _submitted(self, result: SpeakResult) -> SpeakResult:
        """Remember when a task was accepted, for the speak-latency histogram (bounded)."""
        self._speak_submitted[result.task_id] = time.monotonic()
        while len(self._speak_submitted) > MAX_PENDING_TASKS:
            self._speak_submitted.popitem(last=False)
        return result

    @staticmethod
    async def _spoken(subscription: Subscription, task_id: str, duration_ms: float) -> None:
        """Wait for the avatar to finish ``task_id`` (its ``avatar_stop_talking``)."""
        async with asyncio.timeout(duration_ms / 1000.0 + 10.0):
            async for item in subscription:
                event = item.event
                if event.type is EventType.AVATAR_STOP_TALKING and event.task_id == task_id:
                    return

    # -- the avatar's other controls ---------------------------------------------------------

    async def interrupt(self) -> None:
        self._require_live()
        self._touch()
        await self._upstream.interrupt()

    async def set_listening(self, listening: bool) -> None:
        self._require_live()
        self._touch()
        await self._upstream.set_listening(listening)

    async def keep_alive(self) -> None:
        self._require_live()
        self._touch()
        await self._upstream.keep_alive()

    # -- what the upstream reports -----------------------------------------------------------

    def on_event(self, event: AvatarEvent) -> None:
        if event.type is EventType.USER_END_MESSAGE:
            self._reply_to(str(event.data.get("message") or ""))
        elif event.type is EventType.AVATAR_START_TALKING and event.task_id is not None:
            submitted = self._speak_submitted.pop(event.task_id, None)
            if submitted is not None:
                self._speak_latency.observe(time.monotonic() - submitted)

    def _reply_to(self, question: str) -> None:
        """Voice chat: what the user said is answered by the talk rule. An upstream that answers
        itself already did; otherwise the gateway's chat answers in the background. A user does
        not queue questions: one beyond :data:`MAX_REPLIES` is dropped."""
        if not question.strip() or not self.gateway_answers:
            return
        try:
            self._require_live()
        except Conflict:
            return  # heard while starting or closing: nobody would hear the answer
        if len(self._replies) >= MAX_REPLIES:
            logger.warning("session %s: a voice-chat question dropped, two replies pending",
                           self._session_id)
            return

        async def reply() -> None:
            try:
                await self.answer(question)
            except GatewayError as exc:
                logger.warning("session %s: voice-chat reply failed: %s", self._session_id,
                               exc.message)

        task = asyncio.get_running_loop().create_task(reply(), name="voice-chat-reply")
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    def close(self) -> None:
        """Cancel the replies in flight (not the caller's own: a reply may close the session)."""
        for task in tuple(self._replies):
            if task is not asyncio.current_task():
                task.cancel()
