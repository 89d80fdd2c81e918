"""The local avatar: a cartoon face rendered to yuv420p frames.

All drawing happens once, at construction: the figure is a parametric scene
of implicit shapes (anti-aliased from each shape's distance estimate) drawn
in float RGB and converted to BT.601 limited-range YUV. What varies per frame
is pre-rendered as opaque patches cut from the same scene with different
parameters: one per eye for every (blink level, gaze) pair, and one mouth
patch per quantised (open, width) pose, including the jaw drop. A frame is
then a crop of the base canvas (the crop offset is the idle sway) plus three
patch copies -- no per-pixel maths at run time. The colours come from a
:class:`~gateway.avatar.looks.Look`; assets are cached per (size, look).

Chroma is kept in four phases (even/odd crop offset in x and y) so the sway
can move in single-pixel steps without misaligning chroma against luma.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import av
import numpy as np
import numpy.typing as npt

from .lipsync import MouthPose
from .looks import DEFAULT_LOOK, Look, get_look
from .motion import GAZES, SWAY_X, SWAY_Y, blink_closure, gaze_index, sway
from .scene import (
    EYE_DX,
    EYE_PATCH,
    F32,
    MOUTH_PATCH,
    Box,
    Pose,
    Region,
    draw_eye,
    draw_figure,
    draw_mouth,
)

logger = logging.getLogger(__name__)

__all__ = ["FaceRenderer"]

U8 = npt.NDArray[np.uint8]
BLINK_LEVELS = (0.0, 0.35, 0.65, 0.88, 1.0)
MOUTH_OPEN_LEVELS = 12
MOUTH_WIDTH_LEVELS = 5
_PAD = 4  # patch render border, so gradients at its edge match the full render


def _to_yuv(rgb: F32) -> tuple[F32, F32, F32]:
    # BT.601 limited range, the matrix libvpx/browsers assume for untagged video.
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16.0 + 65.481 * r + 128.553 * g + 24.966 * b
    u = 128.0 - 37.797 * r - 74.203 * g + 112.0 * b
    v = 128.0 + 112.0 * r - 93.786 * g - 18.214 * b
    return y.astype(np.float32), u.astype(np.float32), v.astype(np.float32)


def _q(a: F32) -> U8:
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _chroma_phase(c: F32, py: int, px: int, h2: int, w2: int) -> U8:
    s = c[py : py + 2 * h2, px : px + 2 * w2]
    return _q(0.25 * (s[0::2, 0::2] + s[1::2, 0::2] + s[0::2, 1::2] + s[1::2, 1::2]))


@dataclass(frozen=True, slots=True)
class _Patch:
    """Opaque pre-rendered pixels at an even canvas position."""

    x: int
    y: int
    luma: U8
    chroma: tuple[tuple[U8, U8], ...]  # (U, V) per phase py * 2 + px


@dataclass(frozen=True, slots=True)
class _Assets:
    margin: int
    base: _Patch
    eyes: tuple[tuple[_Patch, ...], tuple[_Patch, ...]]  # [eye][blink * len(GAZES) + gaze]
    mouths: tuple[_Patch, ...]  # [open * MOUTH_WIDTH_LEVELS + width]


class _Builder:
    def __init__(self, width: int, height: int, look: Look) -> None:
        self.w, self.h, self.look = width, height, look
        self.scale = float(height)
        self.margin = math.ceil(max(SWAY_X, SWAY_Y) * self.scale) + 1
        self.cw, self.ch = width + 2 * self.margin, height + 2 * self.margin
        self.cx = self.cw / 2.0

    def rect(self, box: Box) -> tuple[int, int, int, int]:
        """Even-aligned canvas pixel rectangle (x, y, w, h) covering `box`."""
        x0 = (math.floor((self.cx + box[0] * self.scale) / 2)) * 2
        y0 = (math.floor((self.margin + box[1] * self.scale) / 2)) * 2
        x1 = (math.ceil((self.cx + box[2] * self.scale) / 2)) * 2
        y1 = (math.ceil((self.margin + box[3] * self.scale) / 2)) * 2
        x0, y0 = max(0, x0), max(0, y0)
        x1, y1 = min(self.cw - self.cw % 2, x1), min(self.ch - self.ch % 2, y1)
        return x0, y0, x1 - x0, y1 - y0

    def region(self, x: int, y: int, w: int, h: int) -> Region:
        return Region(self.look, self.scale, self.cx, float(self.margin), x, y, w, h)

    def cut(self, rgb: F32, x: int, y: int, w: int, h: int, pad: int) -> _Patch:
        """Quantise `rgb` (the canvas rectangle x, y, w, h plus `pad` px around)."""
        yy, uu, vv = _to_yuv(rgb)
        # Odd-phase chroma reads one pixel past the rectangle: the pad covers it.
        phases = []
        for py, px in ((0, 0), (0, 1), (1, 0), (1, 1)):
            h2, w2 = min(h // 2, (h + pad - py) // 2), min(w // 2, (w + pad - px) // 2)
            phases.append((_chroma_phase(uu, pad + py, pad + px, h2, w2),
                           _chroma_phase(vv, pad + py, pad + px, h2, w2)))
        chroma = tuple(phases)
        return _Patch(x, y, _q(yy[pad : pad + h, pad : pad + w]), chroma)

    def patch(self, rect: tuple[int, int, int, int], under: F32,
              draw: Callable[[Region], None]) -> _Patch:
        """`draw` over a copy of `under` (the figure around `rect`, padded by _PAD)."""
        x, y, w, h = rect
        r = self.region(x - _PAD, y - _PAD, w + 2 * _PAD, h + 2 * _PAD)
        r.rgb[:] = under
        draw(r)
        return self.cut(r.rgb, x, y, w, h, _PAD)

    def build(self) -> _Assets:
        full = self.region(0, 0, self.cw, self.ch)
        draw_figure(full, Pose())
        base = self.cut(full.rgb, 0, 0, self.cw, self.ch, 0)

        def crop(rect: tuple[int, int, int, int]) -> F32:
            x, y, w, h = rect
            if x < _PAD or y < _PAD or x + w + _PAD > self.cw or y + h + _PAD > self.ch:
                raise ValueError("frame too small for the avatar layout")
            return full.rgb[y - _PAD : y + h + _PAD, x - _PAD : x + w + _PAD]

        # Eyes do not change the figure, so they are drawn over the base render.
        eyes: list[tuple[_Patch, ...]] = []
        for s in (-1.0, 1.0):
            ex = s * EYE_DX
            rect = self.rect((ex + EYE_PATCH[0], EYE_PATCH[1], ex + EYE_PATCH[2], EYE_PATCH[3]))
            under = crop(rect)
            eyes.append(tuple(
                self.patch(rect, under, functools.partial(draw_eye, cx=ex, p=Pose(blink=b, gaze=g)))
                for b in BLINK_LEVELS
                for g in GAZES
            ))
        # The jaw depends on the opening only: one figure render per open level.
        mrect = self.rect(MOUTH_PATCH)
        base_under = crop(mrect)
        mouths: list[_Patch] = []
        for i in range(MOUTH_OPEN_LEVELS):
            o = i / (MOUTH_OPEN_LEVELS - 1)
            under = base_under
            if i > 0:
                x, y, w, h = mrect
                jaw = self.region(x - _PAD, y - _PAD, w + 2 * _PAD, h + 2 * _PAD)
                draw_figure(jaw, Pose(mouth_open=o))
                under = jaw.rgb
            for j in range(MOUTH_WIDTH_LEVELS):
                pose = Pose(mouth_open=o, mouth_width=j / (MOUTH_WIDTH_LEVELS - 1))
                mouths.append(self.patch(mrect, under, functools.partial(draw_mouth, p=pose)))
        return _Assets(self.margin, base, (eyes[0], eyes[1]), tuple(mouths))


_CACHE: dict[tuple[int, int, str], _Assets] = {}
_CACHE_LOCK = threading.Lock()


def _assets(width: int, height: int, look: Look) -> _Assets:
    # Assets are immutable, so renderers of the same size and look share one copy.
    key = (width, height, look.id)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is None:
            hit = _Builder(width, height, look).build()
            _CACHE[key] = hit
        return hit


class FaceRenderer:
    """Renders yuv420p frames of the avatar.

    Construction draws all assets (about a few hundred ms at 720p, cached per
    size and look for the process); `render` only copies memory. Instances may
    be used from any thread; each call builds a fresh frame.

    :param look: a key of :data:`~gateway.avatar.looks.LOOKS`, else ``ValueError``.
    """

    def __init__(self, width: int, height: int, look: str = DEFAULT_LOOK) -> None:
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"frame size must be positive and even, got {width}x{height}")
        if height < 64:
            raise ValueError("frame height must be at least 64")
        self._look = get_look(look)
        self._w, self._h = width, height
        self._a = _assets(width, height, self._look)
        # Frame-space boxes: the patch rectangles swept over all crop offsets,
        # plus a pixel for odd-phase chroma and one for decoder chroma upsampling.
        self._eye_box = self._swept(self._a.eyes[0][0], self._a.eyes[1][0])
        self._mouth_box = self._swept(self._a.mouths[0], self._a.mouths[0])

    def _swept(self, a: _Patch, b: _Patch) -> tuple[int, int, int, int]:
        m, pad = self._a.margin, 2
        ax, ay = round(SWAY_X * self._h), round(SWAY_Y * self._h)
        x0 = max(0, min(a.x, b.x) - (m + ax) - pad)
        y0 = max(0, min(a.y, b.y) - (m + ay) - pad)
        x1 = min(self._w, max(a.x + a.luma.shape[1], b.x + b.luma.shape[1]) - (m - ax) + pad)
        y1 = min(self._h, max(a.y + a.luma.shape[0], b.y + b.luma.shape[0]) - (m - ay) + pad)
        return x0, y0, x1 - x0, y1 - y0

    @property
    def width(self) -> int:
        return self._w

    @property
    def height(self) -> int:
        return self._h

    @property
    def look(self) -> Look:
        return self._look

    @property
    def mouth_box(self) -> tuple[int, int, int, int]:
        """(x, y, w, h) in frame pixels containing the mouth at any idle offset."""
        return self._mouth_box

    @property
    def eye_box(self) -> tuple[int, int, int, int]:
        """(x, y, w, h) in frame pixels containing both eyes at any idle offset."""
        return self._eye_box

    def offset(self, t: float) -> tuple[int, int]:
        """Crop offset into the canvas at time t (margin = centred)."""
        dx, dy = sway(t)
        m = self._a.margin
        ox = min(2 * m, max(0, m + round(dx * self._h)))
        oy = min(2 * m, max(0, m + round(dy * self._h)))
        return ox, oy

    def render(self, t: float, mouth: MouthPose) -> av.VideoFrame:
        ox, oy = self.offset(t)
        blink = blink_closure(t)
        b = min(range(len(BLINK_LEVELS)), key=lambda i: abs(BLINK_LEVELS[i] - blink))
        eye_state = b * len(GAZES) + gaze_index(t)
        mo = mouth.open if math.isfinite(mouth.open) else 0.0
        mw = mouth.width if math.isfinite(mouth.width) else 0.5
        oi = round(min(1.0, max(0.0, mo)) * (MOUTH_OPEN_LEVELS - 1))
        wi = round(min(1.0, max(0.0, mw)) * (MOUTH_WIDTH_LEVELS - 1))

        frame = av.VideoFrame(self._w, self._h, "yuv420p")
        h2, w2 = self._h // 2, self._w // 2
        # Write straight into the frame's buffers (minding line padding): one copy.
        planes = [
            np.frombuffer(memoryview(pl), dtype=np.uint8).reshape(-1, pl.line_size)[:rows, :cols]
            for pl, rows, cols in zip(frame.planes, (self._h, h2, h2), (self._w, w2, w2),
                                      strict=True)
        ]
        ph = (oy & 1) * 2 + (ox & 1)
        cy0, cx0 = oy >> 1, ox >> 1
        base = self._a.base
        planes[0][:] = base.luma[oy : oy + self._h, ox : ox + self._w]
        planes[1][:] = base.chroma[ph][0][cy0 : cy0 + h2, cx0 : cx0 + w2]
        planes[2][:] = base.chroma[ph][1][cy0 : cy0 + h2, cx0 : cx0 + w2]
        for patch in (self._a.eyes[0][eye_state], self._a.eyes[1][eye_state],
                      self._a.mouths[oi * MOUTH_WIDTH_LEVELS + wi]):
            self._blit(planes, patch, ox, oy, ph)
        return frame

    def _blit(self, planes: list[U8], p: _Patch, ox: int, oy: int, ph: int) -> None:
        # Patches lie more than the sway margin inside the canvas, so their
        # frame-space targets are in bounds at every crop offset.
        fy, fx = p.y - oy, p.x - ox
        h, w = p.luma.shape
        planes[0][fy : fy + h, fx : fx + w] = p.luma
        cy, cx = (p.y >> 1) - (oy >> 1), (p.x >> 1) - (ox >> 1)
        u, v = p.chroma[ph]
        planes[1][cy : cy + u.shape[0], cx : cx + u.shape[1]] = u
        planes[2][cy : cy + v.shape[0], cx : cx + v.shape[1]] = v
