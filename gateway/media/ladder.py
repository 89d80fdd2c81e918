"""The quality ladder: a session's video at up to three sizes, each encoded once.

What SFUs get from simulcast, done with our own encoders: a lane of the hub per codec and
rung (rung 0 is the session's own size; rung 1 half its width and height, rung 2 a quarter),
each encoding only while a viewer is on it, so a session watched by phones on weak links and
desktops on good ones encodes at most three times per codec, never once per viewer. A rung's
frames are scaled from the upstream's in the lane's own thread.

A lane is named by a string everything else already keys on: ``"vp8"`` for rung 0 (as before
the ladder), ``"vp8@1"``, ``"vp8@2"`` for the smaller ones.
"""

from __future__ import annotations

from dataclasses import dataclass

RUNGS = 3


@dataclass(frozen=True, slots=True)
class Rung:
    index: int
    divisor: int
    """Each side of the picture is divided by this (1, 2, 4)."""
    bitrate_share: float
    """Of the session tier's bitrate: the rung's encoder ceiling."""


LADDER = (Rung(0, 1, 1.0), Rung(1, 2, 1 / 3), Rung(2, 4, 1 / 8))
"""720p at the high tier's 2 Mbps ceiling becomes 360p at ~670 kbps and 180p at 250 kbps; the
avatar, mostly still, uses about half of each ceiling."""


def lane_name(codec: str, rung: int) -> str:
    if not 0 <= rung < RUNGS:
        raise ValueError(f"no rung {rung}: the ladder has {RUNGS}")
    return codec if rung == 0 else f"{codec}@{rung}"


def split_lane(lane: str) -> tuple[str, int]:
    """``"vp8@2"`` → ``("vp8", 2)``; ``"vp8"`` → ``("vp8", 0)``."""
    codec, _, rung = lane.partition("@")
    index = int(rung) if rung else 0
    if not 0 <= index < RUNGS:
        raise ValueError(f"no rung {index} in lane {lane!r}")
    return codec, index


def scaled_size(width: int, height: int, divisor: int) -> tuple[int, int]:
    """Each side divided by ``divisor``, kept even (yuv420p)."""
    return max(2, width // divisor & ~1), max(2, height // divisor & ~1)


def rung_for_height(height: int, max_height: int) -> int:
    """The largest rung of a ``height``-pixel session no taller than ``max_height`` (the
    smallest rung if none is)."""
    for rung in LADDER:
        if scaled_size(height, height, rung.divisor)[1] <= max_height:
            return rung.index
    return RUNGS - 1


DOWN_AFTER = 2
"""Consecutive reports of too little bandwidth (or too much loss) before moving down; during
a try up, the first lossy report that counts only the try."""
UP_AFTER = 3
"""Consecutive estimates with room to spare before trying the rung above."""
MAX_LOSS = 0.10
"""Loss fraction (receiver reports) that counts as a congested link."""
GRACE = 2.0
"""Seconds after joining or moving in which estimates and loss do not move a viewer down (a
try up excepted): its rate then includes a keyframe, a new estimator starts low, and loss
reports still count the queue of the rung it left."""
UP_HOLD = 4.0
"""Seconds on a rung before trying the one above. A try that failed (the viewer came back
down within FAILED_WITHIN) doubles the time on the rung below the one it tried, up to
MAX_UP_HOLD, until a try into it holds; the rungs further down keep UP_HOLD, so a viewer
that fell two rungs is back on the middle one soon. The cap bounds how long a viewer whose
link opened waits: two rungs up in ~15 s."""
FAILED_WITHIN = 4.0
MAX_UP_HOLD = 10.0


class RungPolicy:
    """Which rung one viewer should be on, from what its browser reports.

    The estimate is the receiver's (REMB, from the arrival times of the video's packets: the
    capacity left for video once audio and anything else took theirs); it is compared with the
    video rate the viewer was sent lately. Down quickly: two estimates below 90% of that rate
    that did not grow (an estimator ramping up from its start is below the rate too, but
    grows; one that saw the link congest cuts its estimate), or two receiver reports with more
    than 10% loss, move it to the best rung whose rate fits
    85% of the estimate. Up slowly: after :data:`UP_HOLD` seconds on a rung, three estimates
    at 1.3x the rate (the estimator is not what limits it) try the rung above. A receiver's
    estimate never grows far past what it receives (Chromium and aiortc cap it at 1.5x), so
    "room to spare" is all it can say: a link between 1.3x one rung and the next rung's rate
    makes tries that fail, and a try that fails doubles the wait on the rung below before
    that rung is tried again (to at most 10 s), so such a link is probed less often; the
    rungs further down are climbed back at the usual pace.

    ``top`` is the best rung the viewer may have (its ``max_height``). Rates of rungs it is
    not on are its own rate scaled by the rungs' ceilings.
    """

    def __init__(self, rung: int, top: int = 0, now: float = 0.0) -> None:
        self.rung = rung
        self.top = top
        self._short = 0  # consecutive estimates below what is sent
        self._lossy = 0  # consecutive lossy reports
        self._room = 0  # consecutive estimates with room to spare
        self._changed = now
        self._went_up = -float("inf")
        self._trying = False  # moved up, and the try has no verdict yet (see _in_try)
        self._failed = RUNGS  # the rung whose last try failed (RUNGS: none)
        self._hold = UP_HOLD  # on the rung below _failed, before it is tried again
        self._last_estimate: int | None = None
        self._reported = -float("inf")  # when the last loss report came

    def on_loss(self, fraction: float, now: float) -> int | None:
        began, self._reported = self._reported, now  # what this report counts
        self._lossy = self._lossy + 1 if fraction > MAX_LOSS else 0
        if fraction > MAX_LOSS / 5:
            self._room = 0
        if self.rung == RUNGS - 1:
            return None
        # A try up is a guess ("room to spare" is all an estimate says): its first lossy
        # report ends it, before the queue it built at the bottleneck costs more frames. The
        # first report after the move counts mostly the rung below (a link just opened).
        if self._in_try(now):
            return self._move(self.rung + 1, now) if self._lossy and began >= self._went_up else None
        # Otherwise the reports of the first seconds on a rung still count the queue of the
        # rung it left (after a failed try they would push it one rung too far).
        if self._lossy >= DOWN_AFTER and now - self._changed >= GRACE:
            return self._move(self.rung + 1, now)
        return None

    def on_estimate(self, estimate: int, video_rate: float, now: float) -> int | None:
        """``video_rate``: bit/s of video sent to the viewer lately (at its current rung)."""
        previous, self._last_estimate = self._last_estimate, estimate
        if self._trying and not self._in_try(now):
            self._trying = False  # the try up held
            if self.rung <= self._failed:
                self._failed, self._hold = RUNGS, UP_HOLD
        if estimate < 0.9 * video_rate and previous is not None and estimate <= previous:
            self._short, self._room = self._short + 1, 0
            if (self._short >= DOWN_AFTER and self.rung < RUNGS - 1
                    and now - self._changed >= GRACE):
                return self._move(self._fitting(estimate, video_rate), now)
            return None
        self._short = 0
        self._room = self._room + 1 if estimate >= 1.3 * video_rate else 0
        if (self._room >= UP_AFTER and self.rung > self.top
                and now - self._changed >= (
                    self._hold if self.rung - 1 == self._failed else UP_HOLD)):
            return self._move(self.rung - 1, now)
        return None

    def arrived(self, now: float) -> None:
        """The stream is on :attr:`rung` now: a move waits for the rung's keyframe (a try up
        for its periodic one), and the hold, the grace and a try's verdict count from here."""
        self._changed = now
        if self._trying:
            self._went_up = now

    def _in_try(self, now: float) -> bool:
        """Moved up less than FAILED_WITHIN ago: a move down now means the try failed."""
        return self._trying and now - self._went_up < FAILED_WITHIN

    def _fitting(self, estimate: int, video_rate: float) -> int:
        """The best rung below this one whose video fits 85% of ``estimate``."""
        share = LADDER[self.rung].bitrate_share
        for rung in LADDER[self.rung + 1:]:
            if video_rate * rung.bitrate_share / share <= 0.85 * estimate:
                return rung.index
        return RUNGS - 1

    def _move(self, rung: int, now: float) -> int:
        if rung > self.rung:
            # Down soon after a try up: it failed, and the next try of that rung waits longer
            # on the rung below. Down later: the link changed, any try may come as soon.
            if self._in_try(now):
                hold = self._hold if self._failed == self.rung else UP_HOLD
                self._hold = min(MAX_UP_HOLD, hold * 2)
                self._failed = self.rung
            else:
                self._failed, self._hold = RUNGS, UP_HOLD
            self._trying = False
        else:
            self._went_up, self._trying = now, True
        self.rung, self._changed = rung, now
        self._short = self._lossy = self._room = 0
        return rung
