"""A small JSON-over-HTTP client shared by the HeyGen and LiveAvatar REST clients.

Both providers answer ``{"code": 100|1000, "message": ..., "data": ...}`` on success and
``{"code": <int>, "message": ...}`` with a 4xx on failure. This module turns every failure
into an exception from :mod:`gateway.errors`, retries only where the caller says a request is
safe to repeat, and measures every call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..errors import (
    GatewayError,
    UpstreamAuthError,
    UpstreamError,
    UpstreamQuotaExceeded,
    UpstreamSessionGone,
    UpstreamUnavailable,
)
from ..metrics import Metrics

logger = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 1 << 20
"""Provider answers are small JSON objects; anything bigger is not one of them."""

SUCCESS_CODES = (100, "100", 1000, "1000", "SUCCESS", "success")
"""HeyGen answers 100; LiveAvatar 1000 (its official SDK accepts nothing else; its docs show 100)."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 3
    """Tries in all, for requests marked safe to repeat; unsafe ones get exactly one."""
    backoff: float = 0.25
    """First delay in seconds; doubles each time, with jitter."""


ErrorClassifier = Callable[[int, Any, str], GatewayError | None]
"""(HTTP status, provider code, message) -> the exception to raise, or None for the default."""


class JsonApi:
    def __init__(
        self,
        provider: str,
        base_url: str,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        *,
        timeout: float = 15.0,
        retry: RetryPolicy | None = None,
        classify: ErrorClassifier | None = None,
    ) -> None:
        self.provider = provider
        self._base = base_url.rstrip("/")
        self._session = session
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._retry = retry or RetryPolicy()
        self._classify = classify

    async def call(
        self,
        method: str,
        path: str,
        *,
        endpoint: str,
        headers: Mapping[str, str],
        body: Mapping[str, Any] | None = None,
        safe_to_retry: bool = False,
        envelope: bool = True,
    ) -> Any:
        """Send one request; return the envelope's ``data`` (or the whole body if not ``envelope``)."""
        attempts = self._retry.attempts if safe_to_retry else 1
        delay = self._retry.backoff
        for attempt in range(1, attempts + 1):
            try:
                return await self._once(method, path, endpoint, headers, body, envelope)
            except UpstreamUnavailable as exc:
                if attempt == attempts:
                    raise
                logger.info("%s %s failed (%s); retry %d/%d in %.2f s", self.provider, endpoint,
                            exc.message, attempt, attempts - 1, delay)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay *= 2
        raise AssertionError("unreachable")

    async def _once(
        self,
        method: str,
        path: str,
        endpoint: str,
        headers: Mapping[str, str],
        body: Mapping[str, Any] | None,
        envelope: bool,
    ) -> Any:
        started = time.perf_counter()
        status = "error"
        try:
            async with self._session.request(
                method, self._base + path, json=body, headers=dict(headers), timeout=self._timeout
            ) as response:
                status = str(response.status)
                # Bounded, and never a decode error: a proxy's HTML page or a truncated body
                # must become a clear upstream error, not an exception of ours.
                raw = bytearray()
                async for chunk in response.content.iter_any():
                    raw += chunk
                    if len(raw) > MAX_RESPONSE_BYTES:
                        raise UpstreamError(f"{self.provider} {endpoint}: the response is "
                                            f"larger than {MAX_RESPONSE_BYTES} bytes")
                text = raw.decode("utf-8", errors="replace")
                return self._parse(endpoint, response.status, text, envelope)
        except TimeoutError:
            status = "timeout"
            raise UpstreamUnavailable(f"{self.provider} {endpoint} timed out") from None
        except aiohttp.ClientError as exc:
            status = "connection"
            raise UpstreamUnavailable(f"{self.provider} {endpoint}: {exc}") from None
        finally:
            self._metrics.upstream_api_requests.labels(self.provider, endpoint, status).inc()
            self._metrics.upstream_api_duration.labels(self.provider, endpoint).observe(
                time.perf_counter() - started)

    def _parse(self, endpoint: str, status: int, text: str, envelope: bool) -> Any:
        try:
            payload = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:
            payload = None
        code = payload.get("code") if isinstance(payload, dict) else None
        message = _message(payload) if isinstance(payload, dict) else _excerpt(text)
        failed = status >= 400 or (envelope and code is not None and code not in SUCCESS_CODES)
        if not failed and isinstance(payload, dict):
            return payload.get("data") if envelope else payload
        if not failed:
            raise UpstreamError(f"{self.provider} {endpoint}: unreadable response "
                                f"(HTTP {status}): {_excerpt(text)}")
        detail = (f"{self.provider} {endpoint} failed (HTTP {status}, code {code}): "
                  f"{message or _excerpt(text)}")
        if self._classify is not None and (custom := self._classify(status, code, message)):
            raise type(custom)(detail, retry_after=custom.retry_after)
        if status in (401, 403):
            raise UpstreamAuthError(detail)
        if status == 404:
            raise UpstreamSessionGone(detail)
        if status == 429:
            raise UpstreamQuotaExceeded(detail, retry_after=30)
        if status >= 500:
            raise UpstreamUnavailable(detail, retry_after=5)
        raise UpstreamError(detail)


def _message(payload: dict[str, Any]) -> str:
    """The provider's error text: ``message``, ``error``, or FastAPI's ``detail`` list (422)."""
    for key in ("message", "error", "detail"):
        value = payload.get(key)
        if isinstance(value, str) and value:
            return value[:300]
        if isinstance(value, list | dict) and value:
            return json.dumps(value)[:300]
    return ""


def _excerpt(text: str) -> str:
    """The start of a body that is not the JSON we expect, on one line (HTML, proxies)."""
    flat = " ".join(text.split())
    return repr(flat[:160] + ("…" if len(flat) > 160 else "")) if flat else "an empty body"
