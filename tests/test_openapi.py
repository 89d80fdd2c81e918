"""The OpenAPI document: it lists exactly the app's routes, and a schemathesis fuzz run against the
served document (real HTTP on 127.0.0.1) finds no 5xx, no hang and no undocumented response.

schemathesis calls synchronously (``requests``), so the gateway runs in a thread with its own event
loop, the way httpx's test suite serves its apps.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

import hypothesis
import requests
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, Phase
from schemathesis import APIOperation, GenerationMode
from schemathesis import Case as GenericCase
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.app import create_app

from .conftest import make_settings

Client = TestClient[Any, Any]
METHODS = {"get", "post", "put", "patch", "delete"}
Stats = collections.Counter[tuple[str, int]]
"""Requests sent, by (operation, response status)."""
Case = GenericCase[APIOperation[Any, Any, Any, Any]]

# The WHEP bodies are text; schemathesis sends them like text/plain.
schemathesis.serializer.alias(["application/sdp", "application/trickle-ice-sdpfrag"], "text/plain")


def app_routes(app: web.Application) -> set[tuple[str, str]]:
    """(path, METHOD) of every route, without HEAD (aiohttp adds one to each GET), the demo page
    and the static files."""
    routes = set()
    for resource in app.router.resources():
        path = resource.canonical
        if path in ("/", "/web"):
            continue
        routes |= {(path, route.method) for route in resource if route.method != "HEAD"}
    return routes


async def test_the_document_lists_exactly_the_routes(client: Client) -> None:
    response = await client.get("/openapi.json")
    assert response.status == 200
    document = await response.json()
    documented = {(path, method.upper()) for path, item in document["paths"].items()
                  for method in item if method in METHODS}
    assert documented == app_routes(client.app)
    for path, item in document["paths"].items():
        for method in METHODS & set(item):
            operation = item[method]
            assert operation["responses"], (method, path)
            assert "default" in operation["responses"]
            seed = path.startswith(("/persona", "/openai"))
            expected = "SeedError" if seed else "GatewayError"
            assert operation["responses"]["default"]["$ref"].endswith(expected)
    schemas = document["components"]["schemas"]
    assert schemas["SeedError"]["required"] == ["success", "message", "error"]
    assert schemas["Speak"]["properties"]["text"]["maxLength"] == 5000


async def test_limits_in_the_document_follow_the_settings(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app(make_settings(max_text_chars=321)))
    document = await (await client.get("/openapi.json")).json()
    assert document["components"]["schemas"]["Speak"]["properties"]["text"]["maxLength"] == 321


class ServedApp:
    """The gateway on 127.0.0.1:<free port>, in a thread running its own event loop."""

    def __init__(self) -> None:
        self.base_url = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fuzzed-gateway", daemon=True)

    def __enter__(self) -> ServedApp:
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("the gateway did not start")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)
        assert not self._thread.is_alive(), "the gateway did not shut down"
        if self._error is not None and kind is None:
            raise self._error

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # handed to the test thread, which raises it
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        runner = web.AppRunner(create_app(make_settings()), shutdown_timeout=5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()


def fuzz(schema: Any, path: str, method: str, base_url: str, stats: Stats, *, examples: int,
         http: requests.Session, path_parameters: dict[str, str] | None = None,
         tweak: Callable[[Case], Case] | None = None) -> None:
    """Positive and negative cases for one operation: never a 5xx, never a hang; positive
    cases' responses must match the document (status, content type, schema)."""
    operation = schema[path][method]
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)
        if tweak is not None:
            strategy = strategy.map(tweak)
        _fuzz_mode(strategy, mode, f"{method.upper()} {path}", base_url, stats, examples, http)


def _fuzz_mode(strategy: Any, mode: GenerationMode, label: str, base_url: str, stats: Stats,
               examples: int, http: requests.Session) -> None:
    @hypothesis.settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                         phases=[Phase.explicit, Phase.generate],
                         suppress_health_check=list(HealthCheck))
    @hypothesis.given(case=strategy)
    def run(case: Case) -> None:
        response = case.call(base_url=base_url, session=http, timeout=15)
        stats[label, response.status_code] += 1
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path} body={case.body!r:.300} -> "
            f"{response.status_code} {response.text[:300]}")
        if mode is GenerationMode.POSITIVE:
            case.validate_response(response, checks=[
                status_code_conformance, content_type_conformance, response_schema_conformance])

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        # Nothing to invalidate (no parameters, no body): there are no negative cases.
        if mode is not GenerationMode.NEGATIVE:
            raise


def bounded_speech(session_id: str | None = None) -> Callable[[Case], Case]:
    """Live sessions: short texts and asynchronous speech (a sync speak of 5000 characters would
    hold the request for minutes; that is by design, not a hang)."""

    def tweak(case: Case) -> Case:
        if isinstance(case.body, dict):
            if session_id is not None and "session_id" in case.body:
                case.body["session_id"] = session_id
            text = case.body.get("text")
            if isinstance(text, str):
                case.body["text"] = text[:120]
            if case.body.get("task_mode") == "sync":
                case.body["task_mode"] = "async"
        return case

    return tweak


MEDIA_HEAVY = {("/v1/sessions", "POST"), ("/persona/heygen/session/create", "POST")}
ENDS_THE_SESSION = {("/v1/sessions/{session_id}", "DELETE"),
                    ("/persona/heygen/session/stop", "POST")}


def test_fuzz_the_served_document_finds_no_server_error() -> None:
    stats: Stats = collections.Counter()
    with ServedApp() as served, requests.Session() as http:
        base = served.base_url
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json", timeout=10)
        operations = {(op.ok().path, op.ok().method.upper()) for op in schema.get_all_operations()
                      if isinstance(op, Ok)}
        # schemathesis leaves out the operation that serves the document it was loaded from.
        assert operations == app_routes(create_app(make_settings())) - {("/openapi.json", "GET")}

        # 1. Every operation without a live session (unknown ids: 404s), persona and chat included.
        for path, method in sorted(operations - MEDIA_HEAVY):
            fuzz(schema, path, method.lower(), base, stats, examples=25, http=http)

        # 2. Against live sessions: a gateway session and a seed session (its viewer offered).
        #    Not the event stream: on a live session it streams until the client leaves.
        live = http.post(f"{base}/v1/sessions", json={}, timeout=30).json()["id"]
        created = http.post(f"{base}/persona/heygen/session/create", json={}, timeout=30).json()
        seed = created["data"]["session_id"]
        for path, method in sorted(operations - MEDIA_HEAVY - ENDS_THE_SESSION):
            if path.startswith("/v1/sessions/{session_id}") and not path.endswith("/events"):
                fuzz(schema, path, method.lower(), base, stats, examples=20, http=http,
                     path_parameters={"session_id": live}, tweak=bounded_speech())
            elif path.startswith("/persona/heygen/") and path != "/persona/heygen/init":
                fuzz(schema, path, method.lower(), base, stats, examples=20, http=http,
                     tweak=bounded_speech(seed))

        # 3. Session creation: each example starts an avatar (a renderer, a TTS voice), so few.
        for path, method in sorted(MEDIA_HEAVY):
            fuzz(schema, path, method.lower(), base, stats, examples=3, http=http)

        # 4. Ending the live sessions, last.
        fuzz(schema, "/persona/heygen/session/stop", "post", base, stats, examples=5, http=http,
             tweak=bounded_speech(seed))
        fuzz(schema, "/v1/sessions/{session_id}", "delete", base, stats, examples=5, http=http,
             path_parameters={"session_id": live})
        assert http.get(f"{base}/v1/sessions/{live}", timeout=10).status_code == 404
        assert http.get(f"{base}/livez", timeout=10).status_code == 200

    statuses = collections.Counter[int]()
    for (_, status), count in stats.items():
        statuses[status] += count
    print(f"\nfuzz: {sum(statuses.values())} requests over {len(operations)} operations; by status: "
          + ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items())))
    for (label, status), count in sorted(stats.items()):
        print(f"  {label:<55} {status}  x{count}")
    assert {label for label, _ in stats} == {f"{m} {p}" for p, m in operations}
    assert all(status < 500 for status in statuses)
