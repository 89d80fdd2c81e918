"""Chat against a local OpenAI-compatible server: the real ``openai`` client over loopback.

The fake speaks the Chat Completions wire format (JSON, or SSE ``data:`` chunks ending in
``[DONE]``) and can hold a stream mid-answer, fail with a status, or never answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.api.common import SESSIONS
from gateway.app import create_app
from gateway.chat.llm import OFFLINE_LABEL, ChatService, SentenceSplitter, split_sentences
from gateway.chat.persona import DEFAULT_PERSONA, PersonaStore
from gateway.config import Settings
from gateway.errors import (
    GatewayError,
    UpstreamAuthError,
    UpstreamError,
    UpstreamQuotaExceeded,
    UpstreamUnavailable,
)
from gateway.upstream.base import EventType

from .conftest import ClientFactory, make_settings

KEY = "sk-test-NEVER-SHOW-THIS-0123456789abcdef"
ServerFactory = Callable[..., Awaitable[TestServer]]


@dataclass
class FakeLLM:
    """An OpenAI-compatible ``/v1/chat/completions`` that records what it was sent."""

    answer: str = "I studied computer science at the University of Washington."
    chunks: list[str] = field(default_factory=list)
    status: int = 200
    retry_after: str | None = None
    hold: bool = False
    """Accept the request, then answer nothing until released (a provider that hangs)."""
    gate_at: int | None = None
    """Stream chunks before this index, then wait for :attr:`gate`."""
    stream_error_after: int | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.authorizations.append(request.headers.get("Authorization", ""))
        if self.hold:
            await self.release.wait()
        if self.status != 200:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            # Real providers echo (part of) the key in auth errors: the gateway must not.
            error = {"message": f"Incorrect API key provided: {KEY}", "type": "invalid_request_error",
                     "code": "invalid_api_key"}
            return web.json_response({"error": error}, status=self.status, headers=headers)
        if not body.get("stream"):
            return web.json_response({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": self.answer}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            })
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunks = self.chunks or [self.answer]
        for index, text in enumerate(chunks):
            if index == self.gate_at:
                await self.gate.wait()
            if index == self.stream_error_after:
                failure = {"error": {"message": f"overloaded {KEY}", "type": "server_error"}}
                await response.write(f"data: {json.dumps(failure)}\n\n".encode())
                return response
            delta: dict[str, Any] = {"content": text}
            if index == 0:
                delta["role"] = "assistant"
            chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                     "model": body["model"],
                     "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.sent.append(text)
        await response.write(b"data: [DONE]\n\n")
        return response


@pytest.fixture
async def fake_llm(aiohttp_server: ServerFactory) -> AsyncIterator[tuple[FakeLLM, str]]:
    fake = FakeLLM()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.handle)
    server = await aiohttp_server(app)
    yield fake, str(server.make_url("/v1"))
    # Let held handlers finish, so the server's shutdown does not wait for them.
    fake.release.set()
    fake.gate.set()


def llm_settings(base_url: str, **overrides: Any) -> Settings:
    return make_settings(openai_api_key=KEY, openai_base_url=base_url, openai_model="test-model",
                         **overrides)


@contextlib.asynccontextmanager
async def chat_service(settings: Settings, tmp_path: Path) -> AsyncIterator[ChatService]:
    store = PersonaStore(tmp_path / "persona.sqlite3")
    await store.open()
    chat = ChatService(settings, store, max_retries=0)
    await chat.start()
    try:
        yield chat
    finally:
        await chat.close()
        await store.close()


async def collect(chat: ChatService, question: str, conversation: str | None = None,
                  speaker: str | None = None) -> list[str]:
    async with contextlib.aclosing(chat.sentences(question, conversation, speaker)) as sentences:
        return [s async for s in sentences]


# -- requests and answers -----------------------------------------------------------------------

async def test_completion_sends_the_persona_prompt(fake_llm: tuple[FakeLLM, str],
                                                   tmp_path: Path) -> None:
    fake, base = fake_llm
    async with chat_service(llm_settings(base), tmp_path) as chat:
        reply = await chat.complete("Where did you study?")
    assert (reply.text, reply.offline) == (fake.answer, False)
    request = fake.requests[0]
    assert request["model"] == "test-model" and not request.get("stream")
    system, user = request["messages"]
    assert system["role"] == "system"
    for fact in (DEFAULT_PERSONA.name, DEFAULT_PERSONA.title, "University of Washington",
                 "TypeScript", "rock climbing", "first person"):
        assert fact in system["content"]
    assert user == {"role": "user", "content": "Where did you study?"}
    assert fake.authorizations == [f"Bearer {KEY}"]


async def test_history_is_kept_per_conversation_and_bounded(fake_llm: tuple[FakeLLM, str],
                                                             tmp_path: Path) -> None:
    fake, base = fake_llm
    async with chat_service(llm_settings(base, chat_history_turns=4), tmp_path) as chat:
        for i in range(3):
            fake.answer = f"Answer {i}."
            await chat.complete(f"Question {i}?", conversation="a")
        await chat.complete("Unrelated?", conversation="b")
        await chat.complete("One-off?")
        assert [m["content"] for m in chat.history("a")] == [
            "Question 1?", "Answer 1.", "Question 2?", "Answer 2."]
        assert chat.conversations == 2
    third = [m["content"] for m in fake.requests[2]["messages"][1:]]
    assert third == ["Question 0?", "Answer 0.", "Question 1?", "Answer 1.", "Question 2?"]
    assert len(fake.requests[3]["messages"]) == 2  # conversation "b" starts fresh
    assert len(fake.requests[4]["messages"]) == 2  # no conversation: no memory


async def test_streaming_yields_each_sentence_as_soon_as_it_is_written(
        fake_llm: tuple[FakeLLM, str], tmp_path: Path) -> None:
    fake, base = fake_llm
    fake.chunks = ["Hi there, I'm Alex", " Rivera. I build", " video relays.", " Thanks for asking!"]
    fake.gate_at = 2
    async with chat_service(llm_settings(base), tmp_path) as chat:
        async with contextlib.aclosing(chat.sentences("Who are you?", "c")) as sentences:
            first = await anext(sentences)
            # The model is still holding the rest of its answer.
            assert first == "Hi there, I'm Alex Rivera."
            assert fake.sent == fake.chunks[:2]
            fake.gate.set()
            rest = [s async for s in sentences]
        assert rest == ["I build video relays.", "Thanks for asking!"]
        assert chat.history("c")[-1]["content"] == "".join(fake.chunks)
    assert fake.requests[0]["stream"] is True


async def test_a_long_answer_is_cut_to_what_one_speech_task_may_hold(
        fake_llm: tuple[FakeLLM, str], tmp_path: Path) -> None:
    fake, base = fake_llm
    fake.chunks = ["word " * 50] * 10
    async with chat_service(llm_settings(base, max_text_chars=300), tmp_path) as chat:
        sentences = await collect(chat, "Talk forever?")
        fake.answer = "long " * 200
        reply = await chat.complete("Again?")
    assert sum(len(s) for s in sentences) <= 300 and all(len(s) <= 300 for s in sentences)
    assert len(reply.text) <= 300


# -- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("status", "error", "http"),
    [(401, UpstreamAuthError, 502), (403, UpstreamAuthError, 502),
     (429, UpstreamQuotaExceeded, 429), (500, UpstreamUnavailable, 503),
     (503, UpstreamUnavailable, 503), (400, UpstreamError, 502)],
)
async def test_error_statuses_are_mapped(fake_llm: tuple[FakeLLM, str], tmp_path: Path,
                                         status: int, error: type[GatewayError], http: int) -> None:
    fake, base = fake_llm
    fake.status = status
    fake.retry_after = "7"
    async with chat_service(llm_settings(base), tmp_path) as chat:
        with pytest.raises(error) as raised:
            await chat.complete("Hello?")
        with pytest.raises(error) as streamed:
            await collect(chat, "Hello?")
    for exc in (raised.value, streamed.value):
        assert type(exc) is error and exc.status == http
        assert KEY not in exc.message and "sk-" not in exc.message
        assert str(status) in exc.message or status == 429
    if status == 429:
        assert raised.value.retry_after == 7.0
    assert len(fake.requests) == 2  # max_retries=0: one request each


async def test_a_silent_provider_times_out_cleanly(fake_llm: tuple[FakeLLM, str],
                                                   tmp_path: Path) -> None:
    fake, base = fake_llm
    fake.hold = True
    async with chat_service(llm_settings(base, openai_timeout=0.3), tmp_path) as chat:
        for call in (chat.complete("Hello?"), collect(chat, "Hello?")):
            started = time.monotonic()
            with pytest.raises(UpstreamUnavailable, match=r"did not answer within 0\.3 s"):
                await call
            assert time.monotonic() - started < 5.0  # no retry, no hang (slack for a busy machine)


async def test_a_stream_that_stalls_midway_times_out(fake_llm: tuple[FakeLLM, str],
                                                     tmp_path: Path) -> None:
    fake, base = fake_llm
    fake.chunks = ["First sentence is here. ", "Never sent."]
    fake.gate_at = 1
    # Long enough for the first chunk to arrive on a busy machine; the second never does.
    async with chat_service(llm_settings(base, openai_timeout=2.0), tmp_path) as chat:
        got: list[str] = []
        with pytest.raises(UpstreamUnavailable):
            async with contextlib.aclosing(chat.sentences("Hello?", "c")) as sentences:
                async for sentence in sentences:
                    got.append(sentence)
        assert got == ["First sentence is here."]
        assert chat.history("c") == []  # an answer cut short is not remembered


async def test_an_unreachable_server_is_unavailable(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with chat_service(llm_settings(f"http://127.0.0.1:{port}/v1"), tmp_path) as chat:
        with pytest.raises(UpstreamUnavailable, match="cannot be reached"):
            await chat.complete("Hello?")


async def test_an_error_inside_the_stream_is_an_upstream_error(fake_llm: tuple[FakeLLM, str],
                                                               tmp_path: Path) -> None:
    fake, base = fake_llm
    fake.chunks = ["It starts well. ", "then"]
    fake.stream_error_after = 1
    async with chat_service(llm_settings(base), tmp_path) as chat:
        got: list[str] = []
        with pytest.raises(UpstreamError) as raised:
            async with contextlib.aclosing(chat.sentences("Hello?")) as sentences:
                async for sentence in sentences:
                    got.append(sentence)
    assert got == ["It starts well."]
    assert type(raised.value) is UpstreamError and KEY not in raised.value.message


# -- offline ------------------------------------------------------------------------------------

async def test_offline_responder_answers_from_the_persona(tmp_path: Path) -> None:
    async with chat_service(make_settings(), tmp_path) as chat:
        assert chat.offline and chat.mode == "offline"
        cases = {
            "Where did you go to university?": "University of Washington",
            "What programming languages do you use?": "TypeScript",
            "Which frameworks are in your stack?": "PostgreSQL",
            "Tell me about your projects": "video relay",
            "What do you do for fun?": "rock climbing",
            "What are your goals?": "conference talk",
            "How would you describe yourself?": "pragmatic",
            "Hello!": DEFAULT_PERSONA.name,
            "zzz qqq": "I can tell you about",
        }
        for question, fact in cases.items():
            reply = await chat.complete(question)
            assert reply.offline and reply.text.startswith(f"{OFFLINE_LABEL} "), reply
            assert fact in reply.text, (question, reply.text)
        sentences = await collect(chat, "Where did you study and what are your goals?", "c")
        # Spoken: without the label (clients show it as a badge, the avatar does not say it).
        assert len(sentences) == 2 and not any(OFFLINE_LABEL in s for s in sentences), sentences
        assert "University of Washington" in sentences[0]
        assert len(chat.history("c")) == 2
        # The default persona answers by the avatar's name; a persona someone named keeps it.
        greeting = " ".join(await collect(chat, "Hi, who are you?", "d", speaker="Ben"))
        assert "I'm Ben," in greeting and DEFAULT_PERSONA.name not in greeting, greeting
        store = chat._personas
        persona = DEFAULT_PERSONA.to_dict()
        persona["technical"]["languages"] = ["Haskell"]
        await store.replace(type(DEFAULT_PERSONA).from_dict(persona))
        assert "Haskell" in (await chat.complete("Which languages do you code in?")).text
        persona["name"] = "Dr. Jane Doe"
        await store.replace(type(DEFAULT_PERSONA).from_dict(persona))
        greeting = " ".join(await collect(chat, "Hello, who are you?", speaker="Ben"))
        assert "I'm Dr. Jane Doe," in greeting, greeting


def test_sentence_splitter_edge_cases() -> None:
    splitter = SentenceSplitter()
    out: list[str] = []
    for delta in ["Python 3.", "12 and node.js are fine, e.g. for Dr. Smith", ". Next one!",
                  " And a", " last\nline without end"]:
        out += splitter.feed(delta)
    rest = splitter.flush()
    assert out == ["Python 3.12 and node.js are fine, e.g. for Dr. Smith.", "Next one! And a last"]
    assert rest == "line without end"
    assert split_sentences("I have a B.Sc. from the U.S. and I liked it. Yes!") == [
        "I have a B.Sc. from the U.S. and I liked it.", "Yes!"]
    long = split_sentences("word " * 200, max_chars=100)
    assert all(len(s) <= 100 for s in long) and " ".join(long) == ("word " * 200).strip()


# -- through the seed API -----------------------------------------------------------------------

async def test_the_avatar_starts_speaking_before_the_model_finishes(
        aiohttp_client: ClientFactory, fake_llm: tuple[FakeLLM, str]) -> None:
    fake, base = fake_llm
    fake.chunks = ["Hi there, I'm Alex Rivera. ", "I build video relays. ", "Thanks for asking!"]
    fake.gate_at = 1
    client: TestClient[Any, Any] = await aiohttp_client(create_app(llm_settings(base)))
    created = await client.post("/persona/heygen/session/create", json={})
    session_id = (await created.json())["data"]["session_id"]
    session = client.app[SESSIONS].get(session_id)
    events = session.events.subscribe()
    started: str | None = None
    try:
        text = asyncio.create_task(client.post("/persona/heygen/text", json={
            "session_id": session_id, "text": "Who are you?", "generate_ai_response": True}))
        async with asyncio.timeout(10):
            async for item in events:
                if item.event.type is EventType.AVATAR_START_TALKING:
                    started = item.event.task_id
                    break
        assert fake.sent == fake.chunks[:1] and not text.done()
        fake.gate.set()
        response = await text
        body = await response.json()
        assert response.status == 200, body
    finally:
        events.close()
    assert body["ai_response"] == "Hi there, I'm Alex Rivera. I build video relays. Thanks for asking!"
    assert body["data"]["offline"] is False
    assert len(body["data"]["task_ids"]) == 3 and body["data"]["task_ids"][0] == started
    assert body["speaking_duration"] > 2.0
    # The default persona speaks as the session's avatar (the local avatar's default look).
    assert "You are Ada," in fake.requests[0]["messages"][0]["content"]
    await client.post("/persona/heygen/session/stop", json={"session_id": session_id})


async def test_the_api_key_never_reaches_a_client_or_a_log(
        aiohttp_client: ClientFactory, fake_llm: tuple[FakeLLM, str],
        caplog: pytest.LogCaptureFixture) -> None:
    fake, base = fake_llm
    caplog.set_level(logging.DEBUG)
    client: TestClient[Any, Any] = await aiohttp_client(create_app(llm_settings(base)))
    seen: list[str] = []
    for method, path, body in [("POST", "/openai", None), ("POST", "/openai/complete", {"prompt": "hi"}),
                               ("POST", "/persona/heygen/init", None), ("GET", "/persona", None),
                               ("GET", "/openapi.json", None), ("GET", "/metrics", None)]:
        response = await client.request(method, path, json=body)
        assert response.status == 200, await response.text()
        seen.append(await response.text() + str(dict(response.headers)))
    fake.status = 401
    failed = await client.post("/openai/complete", json={"prompt": "hi"})
    assert failed.status == 502
    error = await failed.json()
    assert error["success"] is False and error["error"].startswith("upstream_auth: ")
    seen.append(json.dumps(error) + str(dict(failed.headers)))
    assert fake.authorizations[-1] == f"Bearer {KEY}"  # it was used...
    assert not any(KEY in text or KEY[8:] in text for text in seen)  # ...and never shown
    assert KEY not in caplog.text and KEY[8:] not in caplog.text


async def test_chat_metrics(aiohttp_client: ClientFactory, fake_llm: tuple[FakeLLM, str]) -> None:
    fake, base = fake_llm
    client: TestClient[Any, Any] = await aiohttp_client(create_app(llm_settings(base)))
    ok = await client.post("/openai/complete", json={"prompt": "Where did you study?"})
    assert ok.status == 200
    fake.status = 500
    failed = await client.post("/openai/complete", json={"prompt": "And then?"})
    assert failed.status == 503
    metrics = await (await client.get("/metrics")).text()
    assert 'avatargw_chat_requests_total{mode="openai",result="ok"} 1.0' in metrics
    assert 'avatargw_chat_requests_total{mode="openai",result="error"} 1.0' in metrics
    assert 'avatargw_llm_tokens_total{model="test-model",type="completion"} 1.0' in metrics
    assert 'avatargw_llm_request_duration_seconds_count{model="test-model"} 1.0' in metrics
