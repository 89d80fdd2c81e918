"""The HTTP listener's guard: connection caps, slow-request deadlines, descriptor hygiene.

aiohttp accepts every connection and waits as long as a client likes for its request line,
headers and body, so one address holding ~1000 half-open connections (slowloris) or event
streams exhausts a process's descriptors and locks everyone out. :class:`ConnectionGuard`
wraps the server's protocol factory and, before any parsing:

- counts connections in total and per peer address, and answers one over a cap with a short
  ``503`` (total) or ``429`` (that address) and closes it;
- closes a connection whose request line and headers do not arrive within ``header_timeout``
  (from the connection opening, or from a later request's first byte) with a ``408``, or
  whose ``Content-Length`` body does not arrive within ``body_timeout`` of its headers.
  Idle keep-alive connections are aiohttp's own ``keepalive_timeout``.

It tracks request framing only as far as it must (the end of the head, ``Content-Length``);
aiohttp still parses and validates everything. Bodies in chunked encoding and upgraded
connections are left alone after their head: the gateway's API sends neither.

:class:`AcceptErrorLog` keeps the event loop's "socket.accept() out of system resource"
(EMFILE) line to one per interval, and :func:`raise_fd_limit` lifts ``RLIMIT_NOFILE`` to its
hard limit at start.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .metrics import Metrics

logger = logging.getLogger(__name__)

_HEAD_END = b"\r\n\r\n"
_MAX_HEAD = 64 * 1024
"""Bytes of a head kept to read its framing headers (aiohttp refuses far smaller lines)."""
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*(\d{1,18})[ \t]*\r\n", re.I)
_UNFRAMED = re.compile(rb"\r\n(transfer-encoding|upgrade)[ \t]*:", re.I)

ACCEPT_RESOURCE_MESSAGE = "socket.accept() out of system resource"
"""What asyncio's accept loop reports on EMFILE/ENFILE/ENOBUFS/ENOMEM (selector_events)."""


def _refusal(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": {"code": "capacity", "message": message}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
            ).encode() + body


_TOO_MANY_TOTAL = _refusal(503, "Service Unavailable",
                           "the gateway has as many connections open as it allows")
_TOO_MANY_CLIENT = _refusal(429, "Too Many Requests",
                            "too many connections open from this address")
_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n"
            b"Connection: close\r\n\r\n")


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_total: int
    """Connections open at once."""
    max_per_client: int
    """Connections one peer address may hold open."""
    header_timeout: float
    """Seconds for a request's line and headers."""
    body_timeout: float
    """Seconds for a ``Content-Length`` body, after its head."""


def raise_fd_limit() -> tuple[int, int]:
    """Lift the soft ``RLIMIT_NOFILE`` to the hard limit (distributions start services at
    1024 soft, a few hundred connections). Returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:  # e.g. infinity above the kernel's nr_open
            logger.warning("cannot raise the descriptor limit from %d to %d: %s",
                           soft, target, exc)
            return soft, soft
        return soft, target
    return soft, soft


def connection_cap(configured: int, fd_limit: int) -> int:
    """``max_connections`` as set, or (0) three quarters of the descriptor limit: the rest is
    for viewers' UDP sockets, SQLite, logs and the listener itself."""
    return configured if configured > 0 else max(16, fd_limit * 3 // 4)


def accept_batch(fd_limit: int, cap: int) -> int:
    """The listener's ``backlog``: asyncio accepts up to that many sockets per readiness event
    and only then runs the protocol factory, where the guard refuses (and closes) those over
    the cap. So a burst holds ``cap + backlog`` descriptors for a moment; keep it within a
    quarter of what the cap leaves, and at asyncio's default of 100 where that is plenty."""
    return max(8, min(100, (fd_limit - cap) // 4))


class ConnectionGuard:
    """A protocol factory: ``loop.create_server(ConnectionGuard(runner.server, ...), ...)``."""

    def __init__(self, factory: Callable[[], asyncio.BaseProtocol], limits: ConnectionLimits,
                 metrics: Metrics | None = None) -> None:
        self._factory = factory
        self.limits = limits
        self._metrics = metrics
        self.open = 0
        self._per_client: dict[str, int] = {}
        """Open connections per address; entries go at 0, so bounded by ``max_total``."""
        self.refused = {"total": 0, "client": 0}
        self.timed_out = {"header": 0, "body": 0}

    def __call__(self) -> _GuardedProtocol:
        return _GuardedProtocol(self)

    def clients(self, address: str) -> int:
        return self._per_client.get(address, 0)

    def _admit(self, address: str) -> bytes | None:
        """None if the connection may proceed (and is counted), else the refusal to send."""
        if self.open >= self.limits.max_total:
            return self._refuse("total", _TOO_MANY_TOTAL)
        if self.clients(address) >= self.limits.max_per_client:
            return self._refuse("client", _TOO_MANY_CLIENT)
        self.open += 1
        self._per_client[address] = self.clients(address) + 1
        if self._metrics is not None:
            self._metrics.connections.set(self.open)
        return None

    def _refuse(self, limit: str, answer: bytes) -> bytes:
        self.refused[limit] += 1
        if self._metrics is not None:
            self._metrics.connections_refused.labels(limit).inc()
        return answer

    def _release(self, address: str) -> None:
        self.open -= 1
        left = self._per_client.pop(address, 1) - 1
        if left > 0:
            self._per_client[address] = left
        if self._metrics is not None:
            self._metrics.connections.set(self.open)

    def _timed_out(self, phase: str) -> None:
        self.timed_out[phase] += 1
        if self._metrics is not None:
            self._metrics.connections_timed_out.labels(phase).inc()


def _discard_received(transport: asyncio.Transport, most: int = _MAX_HEAD) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    left = most
    while left > 0:
        try:
            data = os.read(sock.fileno(), left)
        except OSError:  # nothing more (EAGAIN), or the peer is gone
            return
        if not data:
            return
        left -= len(data)


class _GuardedProtocol(asyncio.Protocol):
    """Stands in front of one aiohttp ``RequestHandler``: every event is passed on, after the
    guard's bookkeeping. A refused connection never gets a handler at all."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._address = ""
        self._deadline: asyncio.TimerHandle | None = None
        self._phase = "header"
        """``header`` (reading a head), ``body`` (``_remaining`` bytes to go) or ``free``."""
        self._head = bytearray()
        self._remaining = 0

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._address = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        refusal = self._guard._admit(self._address)
        if refusal is not None:
            # Answered before a byte is parsed. What already arrived is read and dropped: a
            # socket closed with unread data sends a reset, and the client loses the answer.
            _discard_received(transport)
            transport.write(refusal)
            transport.close()
            return
        inner = self._guard._factory()
        assert isinstance(inner, asyncio.Protocol)
        self._inner = inner
        self._arm(self._guard.limits.header_timeout)
        inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return  # refused: what the client sent anyway is dropped
        if self._phase != "free":
            self._track(data)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        inner, self._inner = self._inner, None
        if inner is None:
            return
        self._guard._release(self._address)
        inner.connection_lost(exc)

    # -- request framing and deadlines ----------------------------------------------------

    def _track(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self._phase != "free":
            if self._phase == "body":
                taken = min(self._remaining, len(view))
                self._remaining -= taken
                view = view[taken:]
                if self._remaining == 0:
                    self._phase = "header"
                    self._disarm()  # the next head's clock starts at its first byte
                continue
            if self._deadline is None:
                self._arm(self._guard.limits.header_timeout)
            # Search from 3 bytes back: the end of the head may straddle two reads.
            start = max(0, len(self._head) - 3)
            self._head += view[:_MAX_HEAD]
            end = self._head.find(_HEAD_END, start)
            if end < 0:
                if len(self._head) > _MAX_HEAD:
                    del self._head[:-3]  # aiohttp refuses it; only the deadline still matters
                return
            consumed = end + 4 - (len(self._head) - min(len(view), _MAX_HEAD))
            head = bytes(self._head[:end + 4])
            self._head.clear()
            view = view[consumed:]
            self._disarm()
            self._start_body(head)

    def _start_body(self, head: bytes) -> None:
        if _UNFRAMED.search(head):
            self._phase = "free"
            return
        length = _CONTENT_LENGTH.search(head)
        self._remaining = int(length.group(1)) if length else 0
        if self._remaining > 0:
            self._phase = "body"
            self._arm(self._guard.limits.body_timeout)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(seconds, self._expire, self._phase)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self, phase: str) -> None:
        self._deadline = None
        if self._transport is None or self._transport.is_closing():
            return
        self._guard._timed_out(phase)
        logger.debug("closing a connection from %s: its request %s took too long",
                     self._address, "head" if phase == "header" else "body")
        if phase == "header":
            self._transport.write(_TIMEOUT)
        self._transport.close()


class AcceptErrorLog:
    """An event-loop exception handler that reports accept() running out of descriptors at
    most once per ``interval`` (with a count), and passes everything else on.

    At the descriptor limit asyncio's accept loop reports the failure once per pending
    connection per wake-up (thousands of lines a second); one line that says how many, what
    is open, and what to change is what an operator can act on."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = 10.0,
                 metrics: Metrics | None = None,
                 connections: Callable[[], int] | None = None) -> None:
        self._previous = loop.get_exception_handler()
        self._interval = interval
        self._metrics = metrics
        self._connections = connections
        self._last = -float("inf")
        self.suppressed = 0
        self.total = 0

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.set_exception_handler(self)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != ACCEPT_RESOURCE_MESSAGE:
            if self._previous is not None:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self.total += 1
        if self._metrics is not None:
            self._metrics.accept_errors.inc()
        now = time.monotonic()
        if now - self._last < self._interval:
            self.suppressed += 1
            return
        self._last = now
        exc = context.get("exception")
        code = exc.errno if isinstance(exc, OSError) else None
        reason = errno.errorcode.get(code, "?") if code is not None else "?"
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        logger.error("cannot accept connections: out of %s (%s; %d more like it in the last "
                     "%.0f s); %s HTTP connections open, descriptor limit %d: lower "
                     "AVATAR_GATEWAY_MAX_CONNECTIONS or raise the limit",
                     "file descriptors" if reason in ("EMFILE", "ENFILE") else "memory",
                     reason, self.suppressed, self._interval,
                     self._connections() if self._connections is not None else "?", soft)
        self.suppressed = 0
