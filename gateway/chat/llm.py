"""The chat service: the persona answers, through any OpenAI-compatible server or offline.

Answers are streamed and cut into sentences as they arrive, so the avatar can start speaking the
first sentence while the model is still writing the rest. With no API key configured, an offline
responder answers from the persona's own facts (keyword matching, no network), and every answer
it writes starts with :data:`OFFLINE_LABEL`, so nobody mistakes it for the model.

Provider failures become gateway errors, with messages of our own (a provider's message can echo
part of the API key)::

    timeout, connection refused, HTTP 5xx  ->  UpstreamUnavailable     503
    HTTP 401 / 403                         ->  UpstreamAuthError       502
    HTTP 429                               ->  UpstreamQuotaExceeded   429 (Retry-After)
    any other provider error               ->  UpstreamError           502
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass

import openai
from openai.types.chat import ChatCompletionMessageParam

from ..config import Settings
from ..errors import (
    BadRequest,
    UpstreamAuthError,
    UpstreamError,
    UpstreamQuotaExceeded,
    UpstreamUnavailable,
)
from ..metrics import Metrics
from .persona import DEFAULT_PERSONA, Persona, PersonaStore

logger = logging.getLogger(__name__)

OFFLINE_LABEL = "[offline]"
"""Starts every written answer of the offline responder (the seed's chat API has no other way
to say so). Spoken answers go without it: the avatar does not say it, and clients learn it
from ``offline`` fields (the speak response, the catalog's ``chat``) and show a badge."""
MAX_SENTENCE_CHARS = 400
"""A run-on "sentence" is cut at a word boundary here, so speech never waits for a full stop."""
DEFAULT_RETRIES = 1
"""One retry (connection errors, 429, 5xx): an audience is waiting, so fail fast after that."""
MAX_CONVERSATIONS = 256
"""Conversations remembered at once; the least recently used is forgotten first."""


@dataclass(frozen=True, slots=True)
class ChatReply:
    text: str
    offline: bool


# -- sentences ---------------------------------------------------------------------------------

# Terminal punctuation (plus closing quotes/brackets) that is followed by whitespace: the
# whitespace proves the sentence ended ("3.5", "node.js" never split) but it may not have arrived
# yet, so a boundary is only taken once the next delta shows it.
_BOUNDARY = re.compile("[.!?\u2026]+[\"'\u201d\u2019)\\]]*(?=\\s)|\n")
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "vs", "st", "approx", "cf",
                            "inc", "ltd", "e.g", "i.e"})
_INITIALISM = re.compile(r"^(?:[a-z]{1,3}\.)+[a-z]{1,3}$")
"""Dotted short forms: "e.g", "U.S", "B.Sc", "Ph.D" (the final dot is the match itself)."""


class SentenceSplitter:
    """Cuts streamed text into sentences: :meth:`feed` deltas, then :meth:`flush` the rest.

    ``min_chars`` merges a very short sentence ("Hi!") into the next one, which sounds more natural
    and costs one speech task less; ``max_chars`` bounds how long speech can wait for a boundary.
    """

    def __init__(self, min_chars: int = 12, max_chars: int = MAX_SENTENCE_CHARS) -> None:
        if not 0 < min_chars < max_chars:
            raise ValueError("need 0 < min_chars < max_chars")
        self.min_chars = min_chars
        self.max_chars = max_chars
        self._buffer = ""
        self._scan = 0

    def feed(self, delta: str) -> list[str]:
        self._buffer += delta
        out: list[str] = []
        while (match := _BOUNDARY.search(self._buffer, self._scan)) is not None:
            end = match.end()
            sentence = self._buffer[:end].strip()
            if sentence and (len(sentence) < self.min_chars
                             or self._abbreviation_before(match.start())):
                self._scan = end
                continue
            if sentence:
                out.append(sentence)
            self._buffer = self._buffer[end:].lstrip()
            self._scan = 0
        while len(self._buffer) > self.max_chars:
            cut = self._buffer.rfind(" ", 0, self.max_chars)
            cut = cut if cut > 0 else self.max_chars
            out.append(self._buffer[:cut].strip())
            self._buffer = self._buffer[cut:].lstrip()
            self._scan = 0
        return out

    def flush(self) -> str | None:
        rest, self._buffer, self._scan = self._buffer.strip(), "", 0
        return rest or None

    def _abbreviation_before(self, position: int) -> bool:
        if self._buffer[position] != ".":
            return False
        words = self._buffer[:position].split()
        if not words:
            return False
        word = words[-1].lstrip("(\"'").lower()
        if word in _ABBREVIATIONS or _INITIALISM.match(word):
            return True
        # A single capital letter is an initial ("J. Smith").
        original = words[-1].lstrip("(\"'")
        return len(original) == 1 and original.isupper()


def split_sentences(text: str, max_chars: int = MAX_SENTENCE_CHARS) -> list[str]:
    splitter = SentenceSplitter(max_chars=max_chars)
    out = splitter.feed(text + " ")
    rest = splitter.flush()
    return [*out, rest] if rest else out


# -- the persona in words ----------------------------------------------------------------------

def _join(items: tuple[str, ...] | list[str], sep: str = ", ") -> str:
    if len(items) <= 1:
        return "".join(items)
    return sep.join(items[:-1]) + " and " + items[-1]


def _a(title: str) -> str:
    return f"an {title}" if title[:1].lower() in "aeiou" else f"a {title}"


def _lower_first(text: str) -> str:
    """"A dashboard" → "a dashboard" inside a sentence; "API gateway" stays as it is."""
    return text[0].lower() + text[1:] if text[:2].istitle() else text


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def system_prompt(persona: Persona) -> str:
    """Who the model plays. Built from the stored persona on every request, so edits apply."""
    p, e, t, s = persona, persona.education, persona.technical, persona.personality
    lines = [
        f"You are {p.name}, {_a(p.title)}. Stay in character: speak in the first person as "
        f"{p.name}, never as an AI assistant.",
        f"Your style: {_sentence(s.style)}",
        f"Your traits: {_join(list(p.traits)) or 'not specified'}.",
        f"Education: {e.degree}, {e.institution}, {e.year}.",
        f"Programming languages: {_join(list(t.languages)) or 'none listed'}.",
        f"Web stack and tools: {_join(list(t.web_stack)) or 'none listed'}.",
        f"Projects: {'; '.join(t.projects) or 'none listed'}.",
        f"Interests: {_join(list(s.interests)) or 'none listed'}.",
        f"Goals: {'; '.join(s.goals) or 'none listed'}.",
        "Your answers are spoken aloud by a video avatar: answer in two to four short sentences of "
        "plain text, with no lists, markdown, code or emoji. If you are asked about something these "
        "facts do not cover, say so briefly instead of inventing details.",
    ]
    return "\n".join(lines)


def welcome_line(persona: Persona) -> str:
    return (f"Hi, I'm {persona.name}, {_a(persona.title)}. Ask me about my projects, the "
            f"technology I work with, or what I'm aiming for next.")


_WORD = re.compile(r"[a-z0-9+#.]+")


def offline_answer(persona: Persona, question: str, *, labelled: bool = True) -> str:
    """Answer from the persona's facts by keyword matching; ``labelled`` (the written form)
    with :data:`OFFLINE_LABEL`, never mistaken for the model."""
    p, e, t, s = persona, persona.education, persona.technical, persona.personality
    words = {w.strip(".") for w in _WORD.findall(question.lower())}
    topics: list[tuple[frozenset[str], str]] = [
        (frozenset({"study", "studied", "degree", "university", "college", "school", "education",
                    "graduate", "graduated", "major", "academic"}),
         f"I have a {e.degree} from {e.institution} ({e.year})."),
        (frozenset({"language", "languages", "programming", "code", "coding", "write"})
         | {x.lower() for x in t.languages},
         f"I mostly write {_join(list(t.languages)) or 'whatever the job needs'}."),
        (frozenset({"web", "stack", "framework", "frameworks", "frontend", "backend", "tools",
                    "tech", "technology", "technologies", "database"})
         | {x.lower() for x in t.web_stack},
         f"My usual stack is {_join(list(t.web_stack)) or 'still taking shape'}."),
        (frozenset({"project", "projects", "built", "build", "building", "portfolio", "proud",
                    "working"}),
         f"Some things I've built: {'; '.join(map(_lower_first, t.projects)) or 'nothing public yet'}."),
        (frozenset({"interest", "interests", "hobby", "hobbies", "fun", "free", "enjoy", "passion",
                    "weekend", "weekends"}),
         f"Outside of work I'm into {_join(list(s.interests)) or 'a bit of everything'}."),
        (frozenset({"goal", "goals", "future", "plan", "plans", "ambition", "aspire", "next",
                    "career", "aiming"}),
         f"My goals: {'; '.join(s.goals) or 'to keep learning'}."),
        (frozenset({"personality", "describe", "yourself", "traits", "trait", "strengths",
                    "character", "style", "like"}),
         f"People describe me as {_join(list(p.traits)) or 'easy to work with'}. "
         f"My style: {_sentence(s.style)}"),
        (frozenset({"job", "role", "title", "position", "work", "profession", "company"}),
         f"I work as {_a(p.title)}."),
        (frozenset({"who", "name", "introduce", "hi", "hello", "hey", "greetings", "morning",
                    "evening"}),
         f"Hi, I'm {p.name}, {_a(p.title)}."),
    ]
    scored = sorted(((len(words & keys), -i, answer) for i, (keys, answer) in enumerate(topics)),
                    reverse=True)
    picked = [answer for score, _, answer in scored[:2] if score > 0]
    if not picked:
        picked = [f"I'm {p.name}, {_a(p.title)}. I can tell you about my education, the languages "
                  "and tools I use, my projects, my interests or my goals."]
    answer = " ".join(picked)
    return f"{OFFLINE_LABEL} {answer}" if labelled else answer


# -- provider errors ---------------------------------------------------------------------------

_SAFE_CODE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@contextlib.contextmanager
def openai_errors(what: str, timeout: float) -> Iterator[None]:
    """Map the ``openai`` package's errors onto ours, for any model behind it (``what``: "the
    language model", "the speech model"): never the provider's text verbatim."""
    try:
        yield
    except openai.APITimeoutError:
        raise UpstreamUnavailable(f"{what} did not answer within {timeout:g} s",
                                  retry_after=5) from None
    except openai.APIConnectionError:
        raise UpstreamUnavailable(f"{what} server cannot be reached", retry_after=5) from None
    except openai.APIStatusError as exc:
        raise _status_error(what, exc) from None
    except openai.OpenAIError as exc:
        # Errors inside a stream, invalid responses: the provider's fault, never shown verbatim.
        detail = getattr(exc, "code", None)
        suffix = f" ({detail})" if isinstance(detail, str) and _SAFE_CODE.match(detail) else ""
        raise UpstreamError(f"{what} failed{suffix}") from None


def _status_error(what: str, exc: openai.APIStatusError) -> UpstreamError:
    status = exc.status_code
    if status in (401, 403):
        return UpstreamAuthError(f"{what} server refused the gateway's API key (HTTP {status})")
    if status == 429:
        retry_after = 10.0
        header = exc.response.headers.get("retry-after")
        if header is not None:
            with contextlib.suppress(ValueError):
                retry_after = max(1.0, min(3600.0, float(header)))
        return UpstreamQuotaExceeded(f"{what}'s rate limit or quota is exhausted",
                                     retry_after=retry_after)
    if status >= 500:
        return UpstreamUnavailable(f"{what} server failed (HTTP {status})", retry_after=5)
    code = exc.code if isinstance(exc.code, str) and _SAFE_CODE.match(exc.code) else None
    return UpstreamError(f"{what} server rejected the request (HTTP {status}"
                         + (f", {code})" if code else ")"))


# -- the service -------------------------------------------------------------------------------

class ChatService:
    """Chat in the persona's voice, with a bounded memory per conversation.

    A conversation is any id the caller picks (the seed API uses the session id); ``None`` means a
    one-off question with no memory.
    """

    def __init__(self, settings: Settings, personas: PersonaStore, *,
                 metrics: Metrics | None = None,
                 max_retries: int = DEFAULT_RETRIES,
                 max_conversations: int = MAX_CONVERSATIONS) -> None:
        self._settings = settings
        self._metrics = metrics
        self._personas = personas
        self._max_retries = max_retries
        self._max_conversations = max_conversations
        self._client: openai.AsyncOpenAI | None = None
        self._histories: collections.OrderedDict[str, collections.deque[ChatCompletionMessageParam]] = \
            collections.OrderedDict()
        self._max_answer = settings.max_text_chars
        self._sentence_chars = max(20, min(MAX_SENTENCE_CHARS, settings.max_text_chars))

    @property
    def offline(self) -> bool:
        return not self._settings.openai_api_key

    @property
    def mode(self) -> str:
        return "offline" if self.offline else "openai"

    async def start(self) -> None:
        if self.offline:
            logger.info("chat: no OpenAI API key configured, using the offline responder")
            return
        s = self._settings
        self._client = openai.AsyncOpenAI(
            api_key=s.openai_api_key.reveal(),
            base_url=s.openai_base_url or None,
            timeout=s.openai_timeout,
            max_retries=self._max_retries,
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def welcome(self) -> str:
        return welcome_line(await self._personas.get())

    # -- memory ----------------------------------------------------------------------------------

    def forget(self, conversation: str) -> None:
        self._histories.pop(conversation, None)

    def history(self, conversation: str) -> list[ChatCompletionMessageParam]:
        return list(self._histories.get(conversation, ()))

    @property
    def conversations(self) -> int:
        return len(self._histories)

    def _remember(self, conversation: str | None, question: str, answer: str) -> None:
        if conversation is None or self._settings.chat_history_turns < 1:
            return
        history = self._histories.get(conversation)
        if history is None:
            history = collections.deque(maxlen=self._settings.chat_history_turns)
            self._histories[conversation] = history
            while len(self._histories) > self._max_conversations:
                self._histories.popitem(last=False)
        self._histories.move_to_end(conversation)
        history.append({"role": "user", "content": question})
        history.append({"role": "assistant", "content": answer})

    def _messages(self, persona: Persona, conversation: str | None,
                  question: str) -> list[ChatCompletionMessageParam]:
        past = self._histories.get(conversation, ()) if conversation is not None else ()
        return [{"role": "system", "content": system_prompt(persona)}, *past,
                {"role": "user", "content": question}]

    def _check(self, question: str) -> str:
        question = question.strip()
        if not question:
            raise BadRequest("the question is empty")
        if len(question) > self._settings.max_text_chars:
            raise BadRequest(f"the question is longer than {self._settings.max_text_chars} characters")
        return question

    def _client_or_fail(self) -> openai.AsyncOpenAI:
        if self._client is None:
            raise UpstreamUnavailable("the chat service is not started")
        return self._client

    # -- answers ---------------------------------------------------------------------------------

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.chat_requests.labels(self.mode, result).inc()

    def _timed(self, histogram: str, started: float) -> None:
        if self._metrics is not None and not self.offline:
            getattr(self._metrics, histogram).labels(self._settings.openai_model).observe(
                time.monotonic() - started)

    async def complete(self, question: str, conversation: str | None = None) -> ChatReply:
        """The whole answer at once (one non-streaming request)."""
        started = time.monotonic()
        try:
            reply = await self._complete(question, conversation)
        except UpstreamError:
            self._count("error")
            raise
        self._count("ok")
        self._timed("llm_duration", started)
        return reply

    async def _complete(self, question: str, conversation: str | None) -> ChatReply:
        question = self._check(question)
        persona = await self._personas.get()
        if self.offline:
            answer = offline_answer(persona, question)
            self._remember(conversation, question, answer)
            return ChatReply(answer, offline=True)
        client = self._client_or_fail()
        with openai_errors("the language model", self._settings.openai_timeout):
            response = await client.chat.completions.create(
                model=self._settings.openai_model,
                messages=self._messages(persona, conversation, question),
            )
        if self._metrics is not None and response.usage is not None:
            tokens = self._metrics.llm_tokens
            tokens.labels(self._settings.openai_model, "prompt").inc(response.usage.prompt_tokens)
            tokens.labels(self._settings.openai_model, "completion").inc(
                response.usage.completion_tokens)
        content = response.choices[0].message.content if response.choices else None
        answer = _truncate((content or "").strip(), self._max_answer)
        if not answer:
            raise UpstreamError("the language model returned an empty answer")
        self._remember(conversation, question, answer)
        return ChatReply(answer, offline=False)

    async def sentences(self, question: str, conversation: str | None = None,
                        speaker: str | None = None) -> AsyncGenerator[str, None]:
        """The answer sentence by sentence, each as soon as the model has finished writing it:
        the spoken form (an offline answer without its label). ``speaker``: the avatar's own
        name, which the default persona takes (a persona someone named keeps its name).

        Use with :func:`contextlib.aclosing`: leaving early closes the provider's stream. The
        conversation remembers the answer only once it was read to the end.
        """
        started = time.monotonic()
        first = True
        try:
            async with contextlib.aclosing(self._sentences(question, conversation, speaker)) as answer:
                async for sentence in answer:
                    if first:
                        first = False
                        self._timed("llm_first_token", started)
                    yield sentence
        except UpstreamError:
            self._count("error")
            raise
        self._count("ok")
        self._timed("llm_duration", started)

    async def _sentences(self, question: str, conversation: str | None,
                         speaker: str | None) -> AsyncGenerator[str, None]:
        question = self._check(question)
        persona = await self._personas.get()
        if speaker and persona.name == DEFAULT_PERSONA.name:
            persona = dataclasses.replace(persona, name=speaker)
        if self.offline:
            answer = offline_answer(persona, question, labelled=False)
            self._remember(conversation, question, answer)
            for sentence in split_sentences(answer, self._sentence_chars):
                yield sentence
            return
        client = self._client_or_fail()
        splitter = SentenceSplitter(max_chars=self._sentence_chars)
        parts: list[str] = []
        length = 0
        with openai_errors("the language model", self._settings.openai_timeout):
            stream = await client.chat.completions.create(
                model=self._settings.openai_model,
                messages=self._messages(persona, conversation, question),
                stream=True,
            )
            async with stream:
                async for chunk in stream:
                    delta = next((c.delta.content for c in chunk.choices
                                  if c.index == 0 and c.delta.content), None)
                    if not delta:
                        continue
                    # An answer longer than one speech task may be is cut, not refused.
                    delta = delta[: self._max_answer - length]
                    length += len(delta)
                    parts.append(delta)
                    for sentence in splitter.feed(delta):
                        yield sentence
                    if length >= self._max_answer:
                        break
        rest = splitter.flush()
        if rest:
            yield rest
        answer = "".join(parts).strip()
        if not answer:
            raise UpstreamError("the language model returned an empty answer")
        self._remember(conversation, question, answer)


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[: cut if cut > 0 else limit].rstrip()
