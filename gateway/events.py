"""A session's event log: ordered, numbered, replayable, with bounded live subscriptions.

SSE readers reconnect with ``Last-Event-ID`` and get what they missed from the replay ring,
so a network blip loses nothing; a new reader gets the sentence being spoken from its start
(as does a viewer's data channel, :class:`CurrentSpeech`), not from its last word. A reader
too slow to keep up with its bounded queue is cut off (its stream ends) instead of growing
memory; it reconnects and replays. Readers that name
a client (the SSE route) are capped per log and per client, so one client cannot hold
thousands of streams open; the gateway's own readers (a sync speak waiting for its end) are not.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .errors import CapacityError
from .upstream.base import AvatarEvent, EventType


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    id: int
    event: AvatarEvent


_END = None

_SPEECH = (EventType.AVATAR_START_TALKING, EventType.AVATAR_TALKING_MESSAGE)
MAX_SPEECH_EVENTS = 512
"""Events of one utterance kept for a late viewer (a word each: a long sentence fits)."""


class CurrentSpeech:
    """The data-channel events (JSON) of the utterance being spoken, from its
    ``avatar_start_talking``: a viewer whose channel opens mid-sentence is sent these first,
    so its transcript holds the whole sentence. Fed every event (its type and its JSON), in
    order."""

    def __init__(self, payloads: Iterable[str] = ()) -> None:
        self._payloads = list(payloads)[:MAX_SPEECH_EVENTS]

    @property
    def payloads(self) -> tuple[str, ...]:
        return tuple(self._payloads)

    def track(self, kind: str, payload: str) -> None:
        if kind == EventType.AVATAR_START_TALKING:
            self._payloads = [payload]
        elif kind == EventType.AVATAR_STOP_TALKING:
            self._payloads = []
        elif (kind == EventType.AVATAR_TALKING_MESSAGE and self._payloads
              and len(self._payloads) < MAX_SPEECH_EVENTS):
            self._payloads.append(payload)


class Subscription:
    def __init__(self, log: EventLog, capacity: int, client: str | None = None) -> None:
        self._log = log
        self.client = client
        self._queue: asyncio.Queue[LoggedEvent | None] = asyncio.Queue(capacity + 1)
        self._capacity = capacity
        self.overflowed = False
        self._ended = False
        self._closed = False

    def _offer(self, item: LoggedEvent) -> bool:
        if self._queue.qsize() >= self._capacity:
            self.overflowed = True
            self.close()
            return False
        self._queue.put_nowait(item)
        return True

    def _end(self) -> None:
        if not self._queue.full():
            self._queue.put_nowait(_END)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._log._forget(self)
        self._end()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> LoggedEvent:
        """Next event; cancellation-safe (nothing is lost if a wait times out)."""
        if self._ended:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is None:
            self._ended = True
            self.close()
            raise StopAsyncIteration
        return item


class EventLog:
    def __init__(
        self,
        history: int = 512,
        subscriber_capacity: int = 256,
        on_overflow: Callable[[], None] | None = None,
    ) -> None:
        self._history: collections.deque[LoggedEvent] = collections.deque(maxlen=history)
        self._subscriptions: set[Subscription] = set()
        self._per_client: dict[str, int] = {}
        """Open subscriptions per named client; entries go at 0, so it is bounded by them."""
        self._client_subscriptions = 0
        self._capacity = subscriber_capacity
        self._next_id = 1
        self._on_overflow = on_overflow
        self._closed = False

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    @property
    def last_id(self) -> int:
        return self._next_id - 1

    def publish(self, event: AvatarEvent) -> LoggedEvent:
        item = LoggedEvent(self._next_id, event)
        self._next_id += 1
        self._history.append(item)
        for sub in tuple(self._subscriptions):
            if not sub._offer(item):
                self._forget(sub)
                if self._on_overflow is not None:
                    self._on_overflow()
        return item

    def clients(self, client: str) -> int:
        """Open subscriptions of ``client``."""
        return self._per_client.get(client, 0)

    def subscribe(self, after_id: int | None = None, *, client: str | None = None,
                  max_total: int | None = None, max_per_client: int | None = None,
                  current_speech: bool = False) -> Subscription:
        """Live events from now on, preceded by the retained ones with ``id > after_id``, or
        with ``current_speech`` (and no ``after_id``) by those of the utterance in progress.

        With ``client``: refused with :class:`CapacityError` when ``max_total`` client
        subscriptions are open, or ``max_per_client`` of that client's.
        """
        if client is not None:
            if max_total is not None and self._client_subscriptions >= max_total:
                raise CapacityError(f"this session has {self._client_subscriptions} event "
                                    f"streams open, the most it allows", retry_after=5)
            if max_per_client is not None and self.clients(client) >= max_per_client:
                raise CapacityError(f"at most {max_per_client} event streams per client on a "
                                    f"session", retry_after=5)
        if after_id is not None:
            replay = [item for item in self._history if item.id > after_id]
        else:
            replay = self._current_speech() if current_speech else []
        # The replay is bounded by the history size; the capacity bounds what piles up live.
        sub = Subscription(self, self._capacity + len(replay), client)
        for item in replay:
            sub._offer(item)
        if self._closed:
            sub.close()
        elif not sub._closed:
            self._subscriptions.add(sub)
            if client is not None:
                self._per_client[client] = self._per_client.get(client, 0) + 1
                self._client_subscriptions += 1
        return sub

    def _current_speech(self) -> list[LoggedEvent]:
        """The retained start and words of the utterance being spoken, if one is."""
        for index in range(len(self._history) - 1, -1, -1):
            kind = self._history[index].event.type
            if kind is EventType.AVATAR_STOP_TALKING:
                return []
            if kind is EventType.AVATAR_START_TALKING:
                return [item for item in itertools.islice(self._history, index, None)
                        if item.event.type in _SPEECH]
        return []

    def _forget(self, sub: Subscription) -> None:
        if sub not in self._subscriptions:
            return
        self._subscriptions.discard(sub)
        if sub.client is not None:
            self._client_subscriptions -= 1
            left = self._per_client.pop(sub.client, 1) - 1
            if left > 0:
                self._per_client[sub.client] = left

    def close(self) -> None:
        """End every subscription (after what it has queued) and refuse new live ones."""
        self._closed = True
        for sub in tuple(self._subscriptions):
            sub.close()
