"""A real Prometheus (Debian's ``prometheus``) scrapes a gateway with live viewers; what it
stored is read back through its HTTP API (https://prometheus.io/docs/prometheus/latest/querying/api/).

The other tests read the ``/metrics`` text; this one shows that Prometheus ingests it, with the
names and label values of ``gateway/metrics.py``, and that the values follow viewers and sessions
as they come and go.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from gateway import __version__

from .rtc_client import WhepViewer

Client = TestClient[Any, Any]
Series = tuple[dict[str, str], float]

PROMETHEUS = Path("/usr/bin/prometheus")
HAVE_PROMETHEUS = PROMETHEUS.exists()
JOB = "avatar-gateway"
# Prometheus hands static targets to the scraper ~5 s after it starts, then scrapes every 1 s.
TIMEOUT = 30.0

pytestmark = pytest.mark.skipif(
    not HAVE_PROMETHEUS and os.environ.get("CI") != "true",
    reason=f"{PROMETHEUS} is missing ('sudo apt-get install prometheus'; make test installs it in CI)",
)


def free_port() -> int:
    # Inside tests/netns.sh the namespace has its own port space: nothing else can take it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(path: Path, target: str) -> None:
    # JSON is YAML: no YAML writer needed.
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": JOB, "metrics_path": "/metrics",
                            "static_configs": [{"targets": [target]}]}],
    }
    path.write_text(json.dumps(config, indent=2))


@pytest.fixture
def prometheus_log(tmp_path: Path) -> Iterator[BinaryIO]:
    with (tmp_path / "prometheus.log").open("wb") as log:
        yield log


@dataclass
class Prometheus:
    """A running server and the way to ask it things."""

    process: asyncio.subprocess.Process
    http: aiohttp.ClientSession
    base: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] or "(empty)"

    async def query(self, promql: str) -> list[Series]:
        async with self.http.get(f"{self.base}/api/v1/query", params={"query": promql}) as response:
            body = await response.json()
        assert response.status == 200 and body["status"] == "success", (promql, body)
        assert body["data"]["resultType"] == "vector", body
        return [(item["metric"], float(item["value"][1])) for item in body["data"]["result"]]

    async def targets(self) -> str:
        with contextlib.suppress(aiohttp.ClientError):
            async with self.http.get(f"{self.base}/api/v1/targets") as response:
                body = await response.json()
            return json.dumps([{k: t.get(k) for k in ("scrapeUrl", "health", "lastError")}
                               for t in body["data"]["activeTargets"]])
        return "(unreachable)"

    async def eventually(self, promql: str, check: Callable[[list[Series]], bool],
                         what: str) -> list[Series]:
        """Poll until ``check`` holds for the query's result; fail with everything we know."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        last: list[Series] | str = "(no answer yet)"
        while loop.time() < deadline:
            assert self.process.returncode is None, (
                f"prometheus exited ({self.process.returncode}) while waiting for {what}:\n"
                f"{self.log()}")
            try:
                result = await self.query(promql)
            except aiohttp.ClientError as exc:  # not listening yet
                last = repr(exc)
            else:
                if check(result):
                    return result
                last = result
            await asyncio.sleep(0.25)
        raise AssertionError(f"{what}: {promql} never held within {TIMEOUT:.0f} s; last answer {last}\n"
                             f"targets: {await self.targets()}\nprometheus log:\n{self.log()}")

    async def value(self, promql: str, check: Callable[[float], bool], what: str) -> float:
        """For a query that selects one series: wait until its value passes ``check``."""
        result = await self.eventually(promql, lambda r: len(r) == 1 and check(r[0][1]), what)
        return result[0][1]


@contextlib.asynccontextmanager
async def run_prometheus(tmp_path: Path, target: str, log: BinaryIO) -> AsyncIterator[Prometheus]:
    assert HAVE_PROMETHEUS, f"{PROMETHEUS} is missing; CI must install it (make test does)"
    config = tmp_path / "prometheus.yml"
    write_config(config, target)
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            yield Prometheus(process, http, f"http://127.0.0.1:{port}", Path(log.name))
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        assert process.returncode is not None
        with pytest.raises(ProcessLookupError):  # reaped: no process left behind
            os.kill(process.pid, 0)


async def test_prometheus_scrapes_viewer_and_session_metrics(
    client: Client, session_id: str, tmp_path: Path, prometheus_log: BinaryIO,
) -> None:
    viewers = [WhepViewer(client, session_id) for _ in range(3)]
    try:
        await asyncio.gather(*(v.connect() for v in viewers))
        async with asyncio.timeout(20):
            await asyncio.gather(*(v.first_frame.wait() for v in viewers))
        response = await client.post(f"/v1/sessions/{session_id}/speak", json={"text": "Hello, Prometheus."})
        assert response.status == 200, await response.text()

        target = f"{client.server.host}:{client.server.port}"
        async with run_prometheus(tmp_path, target, prometheus_log) as prom:
            await prom.value(f'up{{job="{JOB}"}}', lambda v: v == 1, "the gateway is scraped")
            await prom.value('avatargw_viewers{state="connected"}', lambda v: v == 3, "3 viewers")
            await prom.value('avatargw_sessions{upstream="local",state="live"}', lambda v: v == 1,
                             "one live local session")
            await prom.value('avatargw_viewer_sessions_total{result="created"}', lambda v: v == 3,
                             "3 WHEP POSTs answered")
            await prom.value('avatargw_speak_requests_total{upstream="local",task_type="repeat"}',
                             lambda v: v == 1, "one speak task")
            encoded = 'avatargw_frames_encoded_total{kind="video",codec="vp8"}'
            first = await prom.value(encoded, lambda v: v > 0, "VP8 frames encoded")
            await prom.value(encoded, lambda v: v > first, "the encoder keeps encoding")

            [(labels, value)] = await prom.eventually("avatargw_build_info", lambda r: len(r) == 1,
                                                      "build info")
            assert value == 1
            assert labels["version"] == __version__, labels
            assert labels["job"] == JOB and labels["instance"] == target, labels

            assert await viewers[0].delete() == 200
            await prom.value('avatargw_viewers{state="connected"}', lambda v: v == 2,
                             "2 viewers after one DELETE")
            await prom.value('avatargw_viewer_disconnects_total{reason="delete"}', lambda v: v == 1,
                             "the DELETE counted as the viewer's disconnect reason")

            response = await client.delete(f"/v1/sessions/{session_id}")
            assert response.status == 200, await response.text()
            await prom.value('avatargw_sessions{upstream="local",state="live"}', lambda v: v == 0,
                             "no live session after DELETE")
            await prom.value('avatargw_session_ends_total{upstream="local",reason="deleted"}',
                             lambda v: v == 1, "the session ended as deleted")
            await prom.value('avatargw_viewers{state="connected"}', lambda v: v == 0,
                             "the session's remaining viewers closed with it")
    finally:
        await asyncio.gather(*(v.close() for v in viewers))
