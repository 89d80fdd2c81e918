"""The persona layer: a SQLite persona store and the LLM chat service built on it."""

from __future__ import annotations

from .llm import OFFLINE_LABEL, ChatReply, ChatService, SentenceSplitter, system_prompt
from .persona import DEFAULT_PERSONA, Persona, PersonaStore

__all__ = [
    "DEFAULT_PERSONA",
    "OFFLINE_LABEL",
    "ChatReply",
    "ChatService",
    "Persona",
    "PersonaStore",
    "SentenceSplitter",
    "system_prompt",
]
