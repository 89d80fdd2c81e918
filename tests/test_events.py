from __future__ import annotations

import asyncio
import functools

from gateway.events import MAX_SPEECH_EVENTS, CurrentSpeech, EventLog, LoggedEvent, Subscription
from gateway.upstream.base import AvatarEvent, EventType


def _event(n: int) -> AvatarEvent:
    return AvatarEvent(EventType.AVATAR_TALKING_MESSAGE, "task", {"message": str(n)})


async def _drain(sub: object, limit: int = 1000) -> list[LoggedEvent]:
    out: list[LoggedEvent] = []
    async for item in sub:  # type: ignore[attr-defined]
        out.append(item)
        if len(out) >= limit:
            break
    return out


async def test_live_events_in_order_and_end_on_close() -> None:
    log = EventLog()
    sub = log.subscribe()
    for n in range(5):
        log.publish(_event(n))
    log.close()
    items = await _drain(sub)
    assert [i.id for i in items] == [1, 2, 3, 4, 5]
    assert [i.event.data["message"] for i in items] == ["0", "1", "2", "3", "4"]


async def test_replay_after_last_event_id() -> None:
    log = EventLog(history=3)
    for n in range(5):
        log.publish(_event(n))
    sub = log.subscribe(after_id=2)
    log.publish(_event(5))
    log.close()
    assert [i.id for i in await _drain(sub)] == [3, 4, 5, 6]


async def test_slow_subscriber_is_cut_off_not_buffered_forever() -> None:
    dropped: list[int] = []
    log = EventLog(subscriber_capacity=4, on_overflow=lambda: dropped.append(1))
    slow = log.subscribe()
    for n in range(10):
        log.publish(_event(n))
    items = await _drain(slow)
    assert [i.id for i in items] == [1, 2, 3, 4]
    assert slow.overflowed and dropped == [1]
    # A reconnect with Last-Event-ID gets the rest: nothing was lost.
    again = log.subscribe(after_id=items[-1].id)
    log.close()
    assert [i.id for i in await _drain(again)] == [5, 6, 7, 8, 9, 10]


async def test_waiting_with_a_timeout_loses_nothing() -> None:
    log = EventLog()
    sub = log.subscribe()
    try:
        async with asyncio.timeout(0.01):
            await anext(sub)
    except TimeoutError:
        pass
    log.publish(_event(1))
    item = await anext(sub)
    assert item.id == 1


async def test_subscribe_after_close_ends_immediately() -> None:
    log = EventLog()
    log.publish(_event(1))
    log.close()
    assert [i.id for i in await _drain(log.subscribe(after_id=0))] == [1]


async def test_client_streams_are_capped_per_log_and_per_client() -> None:
    import pytest

    from gateway.errors import CapacityError

    log = EventLog()
    capped = functools.partial(log.subscribe, max_total=3, max_per_client=2)
    a1, a2 = (capped(client="a") for _ in range(2))
    with pytest.raises(CapacityError, match="per client"):
        capped(client="a")
    b1 = capped(client="b")
    with pytest.raises(CapacityError, match="most it allows"):
        capped(client="c")
    internal = log.subscribe()  # the gateway's own readers are not capped, nor counted
    a1.close()
    a1.close()  # twice: counted once
    a3 = capped(client="a")
    assert (log.clients("a"), log.clients("b"), log.subscribers) == (2, 1, 4)
    for sub in (a2, a3, b1, internal):
        sub.close()
    assert (log.clients("a"), log.subscribers, log._per_client) == (0, 0, {})


def _speech(kind: EventType, task: str, word: str = "") -> AvatarEvent:
    return AvatarEvent(kind, task, {"message": word} if word else {})


async def _queued(sub: Subscription) -> list[LoggedEvent]:
    """What a new subscription starts with: closing it ends it after what it has queued."""
    sub.close()
    return await _drain(sub)


async def test_a_new_reader_gets_the_sentence_being_spoken_from_its_start() -> None:
    log = EventLog()
    log.publish(_speech(EventType.AVATAR_START_TALKING, "t1"))
    log.publish(_speech(EventType.AVATAR_TALKING_MESSAGE, "t1", "Done."))
    log.publish(_speech(EventType.AVATAR_STOP_TALKING, "t1"))
    assert await _queued(log.subscribe(current_speech=True)) == []  # nothing is being said
    log.publish(_speech(EventType.AVATAR_START_TALKING, "t2"))
    log.publish(AvatarEvent(EventType.USER_START))
    for word in ("Hello", "there,", "late"):
        log.publish(_speech(EventType.AVATAR_TALKING_MESSAGE, "t2", word))
    replay = [(i.event.type, i.event.task_id, i.event.data.get("message"))
              for i in await _queued(log.subscribe(current_speech=True))]
    assert replay == [("avatar_start_talking", "t2", None), ("avatar_talking_message", "t2", "Hello"),
                      ("avatar_talking_message", "t2", "there,"),
                      ("avatar_talking_message", "t2", "late")]
    assert await _queued(log.subscribe()) == []  # the gateway's own readers: live only


def test_current_speech_follows_the_utterance() -> None:
    speech = CurrentSpeech()

    # A function, so mypy does not narrow the property from one assertion to the next.
    def payloads() -> tuple[str, ...]:
        return speech.payloads

    def feed(event: AvatarEvent) -> str:
        payload = event.to_json()
        speech.track(event.type, payload)
        return payload

    feed(_speech(EventType.AVATAR_TALKING_MESSAGE, "t0", "stray"))
    assert not payloads()  # a word without its start is not replayed
    start = feed(_speech(EventType.AVATAR_START_TALKING, "t1"))
    feed(AvatarEvent(EventType.USER_START))
    word = feed(_speech(EventType.AVATAR_TALKING_MESSAGE, "t1", "Hi"))
    assert payloads() == (start, word)
    feed(_speech(EventType.AVATAR_STOP_TALKING, "t1"))
    assert not payloads()
    feed(_speech(EventType.AVATAR_START_TALKING, "t1"))
    for _ in range(MAX_SPEECH_EVENTS + 5):
        feed(_speech(EventType.AVATAR_TALKING_MESSAGE, "t1", "Hi"))
    assert len(payloads()) == MAX_SPEECH_EVENTS  # bounded
