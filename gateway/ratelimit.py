"""Requests per client: a token bucket per client address, bounded in memory.

A client may burst up to ``burst`` requests, then ``rate`` per second; beyond that it gets a
429 with ``Retry-After`` (seconds until one request is allowed again). Buckets live in an LRU
table of at most ``max_clients`` entries, so a flood from many addresses cannot grow memory:
the least recently seen client is forgotten (and starts again with a full bucket).
"""

from __future__ import annotations

import collections
import math
import time


class RateLimiter:
    def __init__(self, rate: float, burst: int, max_clients: int = 10_000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._max_clients = max_clients
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str, now: float | None = None) -> float:
        """Spend one request of ``client``'s bucket. Returns 0 when allowed, else the seconds
        to wait before the next request would be."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens, now)
        if len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)
        return wait


def retry_after(wait: float) -> int:
    """``Retry-After`` is whole seconds; never 0 for a refused request."""
    return max(1, math.ceil(wait))
