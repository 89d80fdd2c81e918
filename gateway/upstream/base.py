"""The contract every avatar upstream implements (local avatar, HeyGen, LiveAvatar).

An upstream is started with a :class:`MediaSink`; from then on it pushes decoded video frames
(yuv420p, ``pts``/``time_base`` set from the upstream's own clock), 48 kHz audio frames and
:class:`AvatarEvent` s into the sink, on the event loop, until it is stopped or ends by itself.
The hub behind the sink never knows which upstream feeds it.
"""

from __future__ import annotations

import abc
import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import av

from ..errors import Unprocessable


class TaskType(enum.StrEnum):
    REPEAT = "repeat"
    """Speak the text verbatim."""
    TALK = "talk"
    """Let the provider's LLM answer the text, and speak the answer."""


class TaskMode(enum.StrEnum):
    ASYNC = "async"
    """Return once the task is scheduled."""
    SYNC = "sync"
    """Return once the avatar has finished speaking it."""


class EventType(enum.StrEnum):
    AVATAR_START_TALKING = "avatar_start_talking"
    AVATAR_TALKING_MESSAGE = "avatar_talking_message"
    AVATAR_END_MESSAGE = "avatar_end_message"
    AVATAR_STOP_TALKING = "avatar_stop_talking"
    USER_START = "user_start"
    USER_STOP = "user_stop"
    USER_TALKING_MESSAGE = "user_talking_message"
    USER_END_MESSAGE = "user_end_message"
    STREAM_DISCONNECTED = "stream_disconnected"
    SESSION_STATE = "session_state"


@dataclass(frozen=True, slots=True)
class AvatarEvent:
    """One event, in HeyGen's wire shape: ``{"type": ..., "task_id": ..., **data}``."""

    type: EventType
    task_id: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": str(self.type)}
        if self.task_id is not None:
            out["task_id"] = self.task_id
        out.update(self.data)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class SpeakResult:
    task_id: str
    duration_ms: float


class MediaSink(Protocol):
    """Where an upstream delivers what it produces. Called on the event loop only."""

    @property
    def video_wanted(self) -> bool:
        """False while nobody watches: an upstream that renders may skip frames."""
        ...

    def on_video_frame(self, frame: av.VideoFrame) -> None: ...

    def on_audio_frame(self, frame: av.AudioFrame) -> None: ...

    def on_event(self, event: AvatarEvent) -> None: ...

    def on_upstream_ended(self, reason: str) -> None:
        """The upstream stopped by itself (remote closed, fatal error); it will push no more."""
        ...


class Upstream(abc.ABC):
    """One avatar session at a provider (or the embedded avatar)."""

    kind: ClassVar[str]
    """Short bounded name, used as a metrics label: ``local``, ``heygen``, ``liveavatar``."""
    answers_itself: ClassVar[bool] = False
    """``speak(..., TALK)`` is answered by the provider's own language model. Otherwise the
    gateway answers with its chat service and speaks the answer (``Session.speak_sentences``)."""
    avatar_name: str | None = None
    """The avatar's own name (the local avatar's look): the default persona answers by it, so
    "Ben" does not introduce himself as someone else. None: the persona's name."""
    listens: ClassVar[bool] = False
    """Takes a controller's microphone: :meth:`set_listening` and :meth:`push_microphone`
    work, and user speech comes back as ``user_*`` events."""

    @property
    @abc.abstractmethod
    def video_size(self) -> tuple[int, int]:
        """Expected (width, height) of the frames this upstream pushes."""

    @abc.abstractmethod
    async def start(self, sink: MediaSink) -> None:
        """Open the session and begin pushing media into ``sink``."""

    @abc.abstractmethod
    async def speak(self, text: str, task_type: TaskType = TaskType.REPEAT) -> SpeakResult:
        """Queue an utterance; returns once it is scheduled."""

    @abc.abstractmethod
    async def interrupt(self) -> None:
        """Cut the current utterance short and drop queued ones."""

    async def keep_alive(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Tell the provider the session is in use (idle timers)."""

    async def set_listening(self, listening: bool) -> None:
        """Put the avatar in (or out of) its listening state, for voice chat."""
        raise Unprocessable(f"the {self.kind} upstream has no listening mode")

    async def push_microphone(self, frame: av.AudioFrame) -> None:
        """Forward a controller's microphone audio to the avatar."""
        raise Unprocessable(f"the {self.kind} upstream takes no microphone audio")

    @abc.abstractmethod
    async def stop(self) -> None:
        """Close the session at the provider. Idempotent; never raises for a gone session."""
