"""The embedded local avatar: eSpeak NG speech, lip sync and a rendered face."""

from .lipsync import REST, LipSync, MouthPose
from .renderer import FaceRenderer
from .tts import Phoneme, SpeechSynthesizer, TTSError, Utterance, Word, available_voices

__all__ = [
    "REST",
    "FaceRenderer",
    "LipSync",
    "MouthPose",
    "Phoneme",
    "SpeechSynthesizer",
    "TTSError",
    "Utterance",
    "Word",
    "available_voices",
]
