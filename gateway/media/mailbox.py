"""A bounded FIFO between producers on the event loop and one consuming task.

Producers never wait: with ``maxlen`` the oldest item makes room (a deque's own rule), and a
caller with a smarter policy (drop to the next keyframe) checks :attr:`full` first. The
consumer awaits :meth:`get`; :meth:`close` wakes it with :class:`MailboxClosed`.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class MailboxClosed(Exception):
    pass


class Mailbox(Generic[T]):
    def __init__(self, maxlen: int | None = None) -> None:
        self._items: collections.deque[T] = collections.deque(maxlen=maxlen)
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)

    @property
    def full(self) -> bool:
        return self._items.maxlen is not None and len(self._items) >= self._items.maxlen

    def put(self, item: T) -> None:
        if self._closed:
            return
        self._items.append(item)
        self._wake()

    def popleft(self) -> T:
        return self._items.popleft()

    def clear(self) -> None:
        self._items.clear()

    def close(self) -> None:
        self._closed = True
        self._items.clear()
        self._wake()

    async def get(self) -> T:
        while not self._items:
            if self._closed:
                raise MailboxClosed
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
