"""The seed contract: the persona server's API document, read at test time, against the gateway.

``tests/data/seed_persona_api.txt`` is a byte-for-byte copy of the seed document
(``../shared/seeds/000_4837692e21e6ed8f.txt``; CI's fresh clone has no ``../shared``, and where
it exists a test checks the copy has not drifted). The document is parsed, not transcribed: each
endpoint's method, path, request body and response shapes come from its text, and the gateway's
real answers (the aiohttp test client against ``create_app``) must have exactly the documented
messages, field names and JSON types. Undocumented fields are refused too, except inside objects
the seed leaves open (``"data": { // Response data }``).

The document's JSON is annotated pseudo-JSON. Its conventions, as parsed here:

- ``"string"``, ``number``, ``boolean``: any value of that JSON type;
- ``["string"]``: a list whose every item is a string;
- any other string, ``true``, ``false``: that literal value (messages, ``success``);
- ``{ // Updated persona object }``: the persona of ``GET /persona``; any other commented empty
  object: an object with any content.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from .test_seed_flow import without_candidates

Client = TestClient[Any, Any]
Shape = Any
"""A parsed documented shape: placeholders, literals, lists and dicts of them."""

SEED_COPY = Path(__file__).parent / "data" / "seed_persona_api.txt"
SEED_ORIGINAL = Path(__file__).resolve().parents[2] / "shared" / "seeds" / "000_4837692e21e6ed8f.txt"

STRING, NUMBER, BOOLEAN = "string", "<number>", "<boolean>"
PERSONA, ANY_OBJECT = "<persona>", "<object>"
"""Markers for the seed's placeholders; ``"string"`` is the document's own spelling."""
PERSONA_SECTION = "Get Persona Details"
"""The section whose response defines the persona object the others refer to."""


# -- reading the document ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Endpoint:
    title: str
    method: str
    path: str
    request: Shape | None
    response: Shape

    @property
    def route(self) -> tuple[str, str]:
        return self.method, self.path


@dataclass(frozen=True, slots=True)
class SeedContract:
    endpoints: tuple[Endpoint, ...]
    error: Shape
    """The error envelope every endpoint may answer with."""
    error_codes: Mapping[int, str]
    """The documented status codes and what they mean."""

    @property
    def persona(self) -> Shape:
        return self.endpoint(PERSONA_SECTION).response

    def endpoint(self, title: str) -> Endpoint:
        return next(e for e in self.endpoints if e.title == title)

    def by_route(self, method: str, path: str) -> Endpoint:
        return next(e for e in self.endpoints if e.route == (method, path))

    @property
    def invalid_parameters_status(self) -> int:
        return next(code for code, meaning in self.error_codes.items()
                    if "invalid parameters" in meaning)


_STRING_LITERAL = r'"(?:[^"\\]|\\.)*"'
_COMMENT = re.compile(rf"{_STRING_LITERAL}|//[^\n]*")
_BARE_TYPE = re.compile(rf"{_STRING_LITERAL}|\b(boolean|number)\b")
_OPEN_OBJECT = re.compile(r"\{\s*//([^\n]*)\n\s*\}")


def parse_shape(block: str) -> Shape:
    """One of the document's annotated JSON blocks, as a shape."""
    def open_object(match: re.Match[str]) -> str:
        return json.dumps(PERSONA if "persona object" in match.group(1).lower() else ANY_OBJECT)

    text = _OPEN_OBJECT.sub(open_object, block)
    text = _COMMENT.sub(lambda m: m.group(0) if m.group(0).startswith('"') else "", text)
    text = _BARE_TYPE.sub(lambda m: f'"<{m.group(1)}>"' if m.group(1) else m.group(0), text)
    return json.loads(text)


def _sections(text: str) -> Iterator[tuple[str, str]]:
    """(heading, body) for every ``##``..``####`` heading of the API part."""
    api = text[text.index("# Streaming Avatar API Documentation"):]
    parts = re.split(r"^#{2,4} (.+)$", api, flags=re.MULTILINE)
    yield from zip(parts[1::2], parts[2::2], strict=True)


def read_contract(path: Path = SEED_COPY) -> SeedContract:
    text = path.read_text(encoding="utf-8")
    raw: list[tuple[str, str, str, Shape | None, Shape | str]] = []
    error: Shape = None
    codes: dict[int, str] = {}
    for heading, body in _sections(text):
        route = re.search(r"^```\n(GET|POST|PUT|PATCH|DELETE) (/\S*)\n```", body, re.MULTILINE)
        if route is not None:
            title = re.sub(r"^[\d.]+\s+", "", heading.strip())
            request = re.search(r"\*\*Request Body:\*\*\s*```json\n(.*?)```", body, re.DOTALL)
            response = re.search(r"\*\*Response:\*\*\s*```json\n(.*?)```", body, re.DOTALL)
            same_as = re.search(r"\*\*Response:\*\*\s*Same as (.+?)\s*$", body, re.MULTILINE)
            answer: Shape | str
            if response is not None:
                answer = parse_shape(response.group(1))
            else:
                assert same_as is not None, f"no response documented in {heading!r}"
                answer = ("same as", same_as.group(1))
            raw.append((title, route.group(1), route.group(2),
                        parse_shape(request.group(1)) if request else None, answer))
        elif heading.strip() == "Error Handling":
            block = re.search(r"```json\n(.*?)```", body, re.DOTALL)
            assert block is not None
            error = parse_shape(block.group(1))
            codes = {int(code): meaning.strip()
                     for code, meaning in re.findall(r"^- `(\d{3})`: (.+)$", body, re.MULTILINE)}
    titles = {title: answer for title, _, _, _, answer in raw}
    endpoints = tuple(
        Endpoint(title, method, path, request,
                 titles[answer[1]] if isinstance(answer, tuple) else answer)
        for title, method, path, request, answer in raw)
    return SeedContract(endpoints, error, codes)


CONTRACT = read_contract()


# -- comparing JSON with a shape ------------------------------------------------------------------

def json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def mismatches(value: object, shape: Shape, where: str = "$",
               persona: Shape | None = None) -> list[str]:
    """Every way ``value`` differs from the documented ``shape`` (empty: it conforms)."""
    persona = CONTRACT.persona if persona is None else persona
    expected = {STRING: "string", NUMBER: "number", BOOLEAN: "boolean"}
    if shape == PERSONA:
        return mismatches(value, persona, where, persona)
    if shape == ANY_OBJECT:
        return [] if isinstance(value, dict) else [f"{where}: object expected, got {json_type(value)}"]
    if isinstance(shape, str) and shape in expected:
        got = json_type(value)
        return [] if got == expected[shape] else [f"{where}: {expected[shape]} expected, got {got} "
                                                  f"{value!r:.60}"]
    if isinstance(shape, (str, bool)):
        same = json_type(value) == json_type(shape) and value == shape
        return [] if same else [f"{where}: {shape!r} expected, got {value!r:.80}"]
    if isinstance(shape, list):
        if not isinstance(value, list):
            return [f"{where}: array expected, got {json_type(value)}"]
        return [m for i, item in enumerate(value)
                for m in mismatches(item, shape[0], f"{where}[{i}]", persona)]
    assert isinstance(shape, dict), shape
    if not isinstance(value, dict):
        return [f"{where}: object expected, got {json_type(value)}"]
    out = [f"{where}.{key}: missing" for key in shape if key not in value]
    out += [f"{where}.{key}: not in the seed document" for key in value if key not in shape]
    out += [m for key in shape if key in value
            for m in mismatches(value[key], shape[key], f"{where}.{key}", persona)]
    return out


def leaves(shape: Shape, where: str = "") -> Iterator[tuple[str, Shape]]:
    """(dotted path, shape) of every field of a request shape, objects and lists included."""
    if isinstance(shape, dict):
        for key, sub in shape.items():
            path = f"{where}.{key}" if where else key
            yield path, sub
            yield from leaves(sub, path)


def build(shape: Shape, given: Mapping[str, Any], where: str = "") -> Any:
    """A request body of the documented shape: ``given`` values where the test needs real ones
    (they must have the documented type too), a sample of the right type everywhere else."""
    if where in given:
        value = given[where]
        assert not mismatches(value, shape, where or "$"), (where, value, shape)
        return value
    if isinstance(shape, dict):
        return {key: build(sub, given, f"{where}.{key}" if where else key)
                for key, sub in shape.items()}
    if isinstance(shape, list):
        return [build(shape[0], given, f"{where}[0]")]
    samples = {STRING: f"sample {where}", NUMBER: 0, BOOLEAN: False}
    return samples[shape]


def wrong_type(shape: Shape) -> Any:
    """A value of another JSON type than the documented one."""
    if isinstance(shape, dict):
        return "not an object"
    if isinstance(shape, list):
        return "not a list"
    return {STRING: 12345, NUMBER: "not a number", BOOLEAN: "yes"}[shape]


def replaced(body: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    *parents, last = dotted.split(".")
    target = out
    for key in parents:
        target = target[key]
    target[last] = value
    return out


# -- the document itself --------------------------------------------------------------------------

def test_the_copy_is_the_seed_document() -> None:
    if not SEED_ORIGINAL.exists():
        pytest.skip("../shared is not checked out here (a fresh clone); the copy is the reference")
    assert SEED_COPY.read_bytes() == SEED_ORIGINAL.read_bytes()


def test_the_document_is_read_completely() -> None:
    """The parser found every endpoint and the facts the issue names: a parser that silently
    read less would make the contract below pass vacuously."""
    routes = [e.route for e in CONTRACT.endpoints]
    assert len(routes) == len(set(routes)) == 12
    assert ("GET", "/persona/config") in routes and ("POST", "/openai/complete") in routes
    assert CONTRACT.persona["education"]["year"] == STRING
    assert CONTRACT.persona["technical"]["webStack"] == [STRING]
    assert CONTRACT.endpoint("Get Persona Configuration").response == CONTRACT.persona
    text = CONTRACT.endpoint("Send Text to HeyGen")
    assert text.response["message"] == "Text sent successfully"
    assert (text.response["ai_response"], text.response["speaking_duration"]) == (STRING, NUMBER)
    assert text.request is not None and text.request["generate_ai_response"] == BOOLEAN
    assert CONTRACT.endpoint("Update Persona Details").response["persona"] == PERSONA
    ice = CONTRACT.endpoint("Handle ICE Candidate")
    assert ice.response["message"] == "ICE candidate handled successfully"
    assert ice.request is not None and ice.request["candidate"]["sdpMLineIndex"] == NUMBER
    assert CONTRACT.error == {"success": False, "message": STRING, "error": STRING}
    assert CONTRACT.invalid_parameters_status == 400


def test_the_comparison_catches_a_wrong_type_a_wrong_message_and_an_extra_field() -> None:
    """The checker is what makes the contract able to fail: prove it does."""
    good = {"name": "A", "title": "B", "education": {"degree": "C", "year": "2016",
                                                     "institution": "D"},
            "technical": {"languages": [], "webStack": ["x"], "projects": []},
            "personality": {"style": "s", "interests": [], "goals": []}, "traits": []}
    assert mismatches(good, CONTRACT.persona) == []
    numeric = replaced(good, "education.year", 2016)
    assert mismatches(numeric, CONTRACT.persona) == ["$.education.year: string expected, got number 2016"]
    assert mismatches(replaced(good, "technical.webStack", ["x", 1]), CONTRACT.persona) == [
        "$.technical.webStack[1]: string expected, got number 1"]
    ice = CONTRACT.endpoint("Handle ICE Candidate").response
    wrong = {"success": True, "message": "ICE candidate added successfully", "data": {}}
    assert mismatches(wrong, ice) == [
        "$.message: 'ICE candidate handled successfully' expected, got "
        "'ICE candidate added successfully'"]
    text = CONTRACT.endpoint("Send Text to HeyGen").response
    body = {"success": True, "message": "Text sent successfully", "data": {},
            "ai_response": None, "speaking_duration": 1.5, "task_ids": []}
    assert mismatches(body, text) == ["$.task_ids: not in the seed document",
                                      "$.ai_response: string expected, got null None"]
    assert mismatches({**body, "ai_response": "", "task_ids": None, "speaking_duration": True},
                      text)[1:] == ["$.speaking_duration: number expected, got boolean True"]


# -- the gateway against it -------------------------------------------------------------------------

async def call(client: Client, endpoint: Endpoint, body: Any = None) -> tuple[int, Any]:
    response = await client.request(endpoint.method, endpoint.path,
                                     json=body if endpoint.method != "GET" else None)
    assert response.content_type == "application/json", await response.text()
    return response.status, await response.json()


async def answers_as_documented(client: Client, endpoint: Endpoint,
                                given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Call ``endpoint`` with a body of its documented request shape; its 200 answer must have
    exactly the documented response shape."""
    body = build(endpoint.request, given or {}) if endpoint.request is not None else None
    status, answer = await call(client, endpoint, body)
    assert status == 200, (endpoint.route, body, answer)
    assert mismatches(answer, endpoint.response) == [], (endpoint.route, answer)
    return dict(answer)


def _first_candidate(answer_sdp: str) -> dict[str, Any]:
    _, candidates = without_candidates(answer_sdp)
    assert candidates, "aiortc's answer carries its candidates"
    return candidates[0]


async def test_every_documented_endpoint_answers_in_the_documented_shape(client: Client) -> None:
    exercised: set[tuple[str, str]] = set()

    async def check(title: str, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        endpoint = CONTRACT.endpoint(title)
        exercised.add(endpoint.route)
        return await answers_as_documented(client, endpoint, given)

    # Persona management: what is written is read back, with the documented types.
    await check("Get Persona Details")
    await check("Get Persona Configuration")
    details = await check("Update Persona Details", {"education.year": "third year"})
    assert details["persona"]["education"]["year"] == "third year"
    updated = await check("Update Persona Configuration")
    sent = build(CONTRACT.endpoint("Update Persona Configuration").request, {})
    assert updated["data"] == sent
    assert (await call(client, CONTRACT.endpoint("Get Persona Details")))[1] == sent

    # HeyGen integration, in the document's order, an aiortc peer playing the browser.
    await check("Initialize HeyGen Bot")
    created = await check("Create HeyGen Session")
    session_id, offer = created["data"]["session_id"], created["data"]["sdp"]["sdp"]
    browser = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        await browser.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        await browser.setLocalDescription(await browser.createAnswer())
        answer, _ = without_candidates(browser.localDescription.sdp)
        candidate = _first_candidate(browser.localDescription.sdp)
        # The documented type of `sdp` is a string: send exactly that.
        await check("Start HeyGen Session", {"session_id": session_id, "sdp": answer})
        repeated = await check("Send Text to HeyGen", {
            "session_id": session_id, "text": "Hello from the contract test.",
            "generate_ai_response": False})
        assert repeated["ai_response"] == "" and repeated["speaking_duration"] > 0
        answered = await check("Send Text to HeyGen", {
            "session_id": session_id, "text": "Where did you study?", "generate_ai_response": True})
        assert answered["ai_response"] and answered["speaking_duration"] > 0
        await check("Handle ICE Candidate", {
            "session_id": session_id, "candidate.candidate": candidate["candidate"],
            "candidate.sdpMid": candidate["sdpMid"],
            "candidate.sdpMLineIndex": candidate["sdpMLineIndex"]})
        await check("Stop HeyGen Session", {"session_id": session_id})
    finally:
        await browser.close()

    # Chat.
    await check("Initialize Chat Bot")
    await check("Get Chat Response", {"prompt": "Which languages do you write?"})

    assert exercised == {e.route for e in CONTRACT.endpoints}


async def _assert_documented_error(client: Client, endpoint: Endpoint, body: Any, *,
                                   status: int | None = None, raw: bytes | None = None) -> None:
    if raw is not None:
        response = await client.request(endpoint.method, endpoint.path, data=raw,
                                        headers={"Content-Type": "application/json"})
    else:
        response = await client.request(endpoint.method, endpoint.path, json=body)
    answer = await response.json()
    expected = CONTRACT.invalid_parameters_status if status is None else status
    assert response.status == expected, (endpoint.route, body, raw, answer)
    assert mismatches(answer, CONTRACT.error) == [], (endpoint.route, answer)
    assert answer["message"].strip() and answer["error"].strip()


async def test_bad_input_to_every_documented_route_is_a_documented_error(client: Client) -> None:
    """Each documented field of each request sent with another JSON type, malformed JSON and a
    non-object body: every one is the documented status for invalid parameters, in the
    documented error envelope; a method the document does not list is a 4xx in it too. Nothing
    is changed by a refused request."""
    persona = (await call(client, CONTRACT.endpoint("Get Persona Details")))[1]
    create = CONTRACT.endpoint("Create HeyGen Session")
    session_id = (await answers_as_documented(client, create))["data"]["session_id"]
    live = {"session_id": session_id}
    refused = 0
    for endpoint in CONTRACT.endpoints:
        documented_methods = {e.method for e in CONTRACT.endpoints if e.path == endpoint.path}
        for method in sorted({"GET", "POST", "PUT", "DELETE"} - documented_methods):
            response = await client.request(method, endpoint.path, json={})
            assert 400 <= response.status < 500, (method, endpoint.path)
            assert mismatches(await response.json(), CONTRACT.error) == []
        if endpoint.method == "GET":
            continue
        await _assert_documented_error(client, endpoint, None, raw=b'{"unterminated": ')
        await _assert_documented_error(client, endpoint, ["a", "list"])
        refused += 2
        if endpoint.request is None:
            continue
        valid = build(endpoint.request, {k: v for k, v in live.items() if k in endpoint.request})
        for where, shape in leaves(endpoint.request):
            await _assert_documented_error(client, endpoint, replaced(valid, where, wrong_type(shape)))
            refused += 1
            if isinstance(shape, list):
                await _assert_documented_error(client, endpoint, replaced(valid, where, [12345]))
                refused += 1
    assert refused > 40
    # Refused requests changed nothing: the persona is as it was, the one session still open.
    assert (await call(client, CONTRACT.endpoint("Get Persona Details")))[1] == persona
    stop = CONTRACT.endpoint("Stop HeyGen Session")
    await answers_as_documented(client, stop, live)


async def test_the_openapi_document_states_the_seed_contract(client: Client) -> None:
    """``/openapi.json`` describes the seed routes as the seed does: each success message as a
    constant, its fields and no others, and the persona's types."""
    document = await (await client.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]

    def resolve(schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
        return schema

    openapi_type = {STRING: "string", NUMBER: "number", BOOLEAN: "boolean"}
    for endpoint in CONTRACT.endpoints:
        operation = document["paths"][endpoint.path][endpoint.method.lower()]
        schema = resolve(operation["responses"]["200"]["content"]["application/json"]["schema"])
        shape = endpoint.response
        assert set(schema["properties"]) == set(shape), endpoint.route
        assert schema.get("additionalProperties") is False, endpoint.route
        for key, sub in shape.items():
            documented = resolve(schema["properties"][key])
            if isinstance(sub, str) and sub in openapi_type:
                assert documented["type"] == openapi_type[sub], (endpoint.route, key)
            elif isinstance(sub, bool) or (isinstance(sub, str) and not sub.startswith("<")):
                assert documented.get("const") == sub, (endpoint.route, key)
    persona = resolve(schemas["Persona"])
    assert persona["properties"]["education"]["properties"]["year"]["type"] == "string"
    assert set(resolve(schemas["SeedError"])["properties"]) == set(CONTRACT.error)
