"""The avatar's involuntary motion: blinks, glances and idle sway, as pure functions of time.

Deterministic in the media time ``t`` (a hash per time slot instead of a random generator), so
any frame can be rendered again identically and tests can reason about the schedule.
"""

from __future__ import annotations

import math

GAZES: tuple[tuple[float, float], ...] = (
    (0.0, 0.0), (-0.0075, 0.001), (0.0075, 0.001), (-0.005, -0.004), (0.005, 0.004),
)
SWAY_X, SWAY_Y = 0.011, 0.006  # idle motion amplitude in figure units

_MASK64 = (1 << 64) - 1


def _hash01(k: int, salt: int) -> float:
    """Deterministic uniform [0, 1) from an integer (splitmix64 finaliser)."""
    z = (k * 0x9E3779B97F4A7C15 + salt * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


_BLINK_SLOT = 4.0  # one blink per slot at a random offset: 1..7 s apart, ~15/min
_BLINK_CLOSE, _BLINK_HOLD, _BLINK_OPEN = 0.07, 0.05, 0.12
_GAZE_SLOT = 1.9


def _blink_shape(dt: float) -> float:
    # Lids drop fast, rest a moment, rise more slowly.
    if dt < 0.0 or dt < _BLINK_CLOSE:
        return max(0.0, dt / _BLINK_CLOSE)
    return min(1.0, max(0.0, 1.0 - (dt - _BLINK_CLOSE - _BLINK_HOLD) / _BLINK_OPEN))


def blink_closure(t: float) -> float:
    """Lid closure 0..1 at media time t (deterministic, natural-looking)."""
    k = math.floor(t / _BLINK_SLOT)
    start = k * _BLINK_SLOT + 0.4 + 3.0 * _hash01(k, 1)
    c = _blink_shape(t - start)
    if _hash01(k, 2) < 0.15:  # occasional double blink
        c = max(c, _blink_shape(t - start - 0.32))
    return c


def gaze_index(t: float) -> int:
    """Index into GAZES: mostly at the viewer, with short saccades away."""
    k = math.floor(t / _GAZE_SLOT)
    if _hash01(k, 3) < 0.65:
        return 0
    return 1 + int(_hash01(k, 4) * (len(GAZES) - 1))


def sway(t: float) -> tuple[float, float]:
    """Idle motion in figure units: slow sway plus a breathing bob."""
    tau = 2 * math.pi * t
    dx = SWAY_X * (0.65 * math.sin(tau / 9.7) + 0.35 * math.sin(tau / 4.3 + 1.3))
    dy = SWAY_Y * (0.7 * math.sin(tau / 5.1 + 0.4) + 0.3 * math.sin(tau / 2.9))
    return dx, dy
